//! The NF4 GEMM three ways (tiled f32, tensor cores, dequantize + cuBLAS; and the GEMV at decode
//! shapes), both orientations, on
//! Llama-3.2-1B's projection shapes: decode shapes (M <= 16: bytes/s of weight traffic) and
//! training shapes (M = 4096: FLOP/s, shown by criterion as elements/s). And NF4 quantization.

mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sqlora::engine::cuda::{GemmPath, Nf4Device};
use sqlora::engine::prelude::*;
use sqlora::model::nf4::Nf4Tensor;
use sqlora::util::rng::Rng;

fn nf4_gemm(c: &mut Criterion) {
    let Some(gpu) = gpu() else { return };
    let paths = [GemmPath::Tiled, GemmPath::Mma, GemmPath::Cublas];
    let paths: Vec<_> = paths
        .into_iter()
        .filter(|&p| p != GemmPath::Cublas || gpu.gemm_state.lock().is_ok_and(|s| s.has_blas()))
        .collect();
    for (n, k, what) in [(8192, 2048, "gate"), (2048, 8192, "down"), (2048, 2048, "q")] {
        let w: Nf4Device = gpu
            .upload_nf4(&Nf4Tensor::random(&[n, k], 0.02, &mut Rng::new(1)))
            .unwrap();
        for m in [1usize, 16, 4096] {
            let x = normal_bf16(&gpu, m * k.max(n), 1.0, 2);
            let mut y = zeros(&gpu, m * k.max(n));
            let mut g = c.benchmark_group(format!("nf4_gemm_{what}_{n}x{k}_m{m}"));
            if m <= 16 {
                g.throughput(Throughput::Bytes((n * k / 2 + n * k / 64 * 4 + 2 * m * (n + k)) as u64));
            } else {
                g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            }
            for &p in &paths {
                g.bench_function(BenchmarkId::new("fwd", format!("{p:?}")), |b| {
                    b.iter(|| {
                        gpu.nf4_gemm_fwd_via(p, &mut y, &x, &w, None, m).unwrap();
                        sync(&gpu);
                    })
                });
                g.bench_function(BenchmarkId::new("bwd_input", format!("{p:?}")), |b| {
                    b.iter(|| {
                        gpu.nf4_gemm_bwd_input_via(p, &mut y, &x, &w, m).unwrap();
                        sync(&gpu);
                    })
                });
            }
            if m <= 16 {
                g.bench_function(BenchmarkId::new("fwd", "Gemv"), |b| {
                    b.iter(|| {
                        gpu.nf4_gemm_fwd_via(GemmPath::Gemv, &mut y, &x, &w, None, m).unwrap();
                        sync(&gpu);
                    })
                });
            }
            g.finish();
        }
    }
}

/// Quantizing a projection on the GPU (codes, scales and double quantization; the weight already on
/// the device): bytes/s of the f32 weight read.
fn nf4_quantize(c: &mut Criterion) {
    let Some(gpu) = gpu() else { return };
    let (n, k) = (8192usize, 2048usize);
    let w = normal_f32(&gpu, n * k, 0.02, 3);
    let mut g = c.benchmark_group(format!("nf4_quantize_{n}x{k}"));
    g.throughput(Throughput::Bytes((4 * n * k) as u64));
    g.bench_function("quantize", |b| {
        b.iter(|| {
            gpu.nf4_quantize(&w, n * k).unwrap();
            sync(&gpu);
        })
    });
    g.finish();
}

criterion_group!(benches, nf4_gemm, nf4_quantize);
criterion_main!(benches);
