//! The CPU engine's NF4 GEMM, both orientations, on every instruction-set path this CPU has,
//! against the f32 reference's linear (`model::cpu::linear`) at the same shapes, and against the
//! CPU's peak (an FMA loop on every thread, printed first). Throughput is in FLOPs (criterion's
//! "elem/s" is FLOP/s): 2 t n k per call.
//!
//! Shapes: SmolLM2-135M's and Qwen2.5-0.5B's MLP up-projection ([1536, 576], [4864, 896]) and
//! down-projection ([576, 1536], [896, 4864]) at a training micro-batch of 4 x 256 tokens, and 8
//! rows (batched decoding). On a CPU with AMX tiles or AVX512-BF16 dot products the avx512 rows run
//! on them (`engine/cpu/amx.rs`); set `SQLORA_CPU_GEMM=fma` to time the AVX-512 FMA GEMM instead.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use sqlora::engine::cpu::isa::Isa;
use sqlora::engine::cpu::nf4_gemm::{nf4_gemm_bwd_input, nf4_gemm_fwd};
use sqlora::engine::cpu::peak::measured_peak;
use sqlora::model::cpu::{linear_bwd_input, linear_fwd, Linear};
use sqlora::util::rng::Rng;

fn gemm(c: &mut Criterion) {
    let (peak, how) = measured_peak(Isa::best());
    eprintln!("peak: {:.1} GFLOP/s ({how})", peak / 1e9);
    let mut rng = Rng::new(5);
    for (n, k) in [(1536usize, 576usize), (576, 1536), (4864, 896), (896, 4864)] {
        let w = Linear::dense(n, k, rng.normal_vec(n * k, 0.05), None).to_nf4();
        let mut g = c.benchmark_group(format!("cpu_nf4_gemm_{n}x{k}"));
        g.sample_size(10);
        for t in [8usize, 1024] {
            let x: Vec<bf16> = rng.normal_vec(t * k, 1.0).iter().map(|&v| bf16::from_f32(v)).collect();
            let dy: Vec<bf16> = rng.normal_vec(t * n, 1.0).iter().map(|&v| bf16::from_f32(v)).collect();
            let (mut y, mut dx) = (vec![bf16::ZERO; t * n], vec![bf16::ZERO; t * k]);
            g.throughput(Throughput::Elements((2 * t * n * k) as u64));
            for isa in Isa::available() {
                g.bench_with_input(BenchmarkId::new(format!("fwd_{isa}"), t), &t, |b, &t| {
                    b.iter(|| nf4_gemm_fwd(isa, &mut y, &x, &w, None, t))
                });
                g.bench_with_input(BenchmarkId::new(format!("bwd_{isa}"), t), &t, |b, &t| {
                    b.iter(|| nf4_gemm_bwd_input(isa, &mut dx, &dy, &w, t))
                });
            }
            let (xf, dyf): (Vec<f32>, Vec<f32>) = (
                x.iter().map(|v| v.to_f32()).collect(),
                dy.iter().map(|v| v.to_f32()).collect(),
            );
            let (mut yf, mut dxf) = (vec![0f32; t * n], vec![0f32; t * k]);
            g.bench_with_input(BenchmarkId::new("fwd_reference", t), &t, |b, _| {
                b.iter(|| linear_fwd(&mut yf, &xf, &w))
            });
            g.bench_with_input(BenchmarkId::new("bwd_reference", t), &t, |b, _| {
                b.iter(|| linear_bwd_input(&mut dxf, &dyf, &w))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, gemm);
criterion_main!(benches);
