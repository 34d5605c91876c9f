//! The LoRA branch of Llama-3.2-1B's gate projection (in 2048, out 8192, rank 16) over 4096 tokens,
//! forward and backward, by the tiled and the simple kernels. Throughput in FLOPs (2 r T (in + out)
//! forward, twice that backward).

mod common;
use common::*;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sqlora::engine::cuda::LoraPath;

fn lora(c: &mut Criterion) {
    let Some(gpu) = gpu() else { return };
    let (t, k, n, r) = (4096usize, 2048usize, 8192usize, 16usize);
    // A and B side by side in one adapter buffer, as the engine keeps them.
    let at = sqlora::model::lora::LoraAt {
        a: 0,
        b: r * k,
        inp: k,
        out: n,
    };
    let (x, w, dy) = (
        normal_bf16(&gpu, t * k, 1.0, 1),
        normal_bf16(&gpu, r * (k + n), 0.02, 2),
        normal_bf16(&gpu, t * n, 1.0, 4),
    );
    let (mut y, mut xa, mut dx) = (zeros(&gpu, t * n), zeros(&gpu, t * r), zeros(&gpu, t * k));
    let (mut grad, mut g32) = (zeros(&gpu, r * (k + n)), zeros(&gpu, t * r));
    let flops = (2 * r * t * (k + n)) as u64;
    let mut g = c.benchmark_group("lora_4096x2048x8192_r16");
    for (name, path) in [("tiled", LoraPath::Tiled), ("simple", LoraPath::Simple)] {
        g.throughput(Throughput::Elements(flops));
        g.bench_function(format!("fwd {name}"), |b| {
            b.iter(|| {
                gpu.lora_fwd_via(path, &mut y, &mut xa, &x, &w, at, t, r, 2.0).unwrap();
                sync(&gpu);
            })
        });
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function(format!("bwd {name}"), |b| {
            b.iter(|| {
                gpu.lora_bwd_via(path, &mut dx, &mut grad, &mut g32, &dy, &x, &xa, &w, at, t, r, 2.0)
                    .unwrap();
                sync(&gpu);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lora);
criterion_main!(benches);
