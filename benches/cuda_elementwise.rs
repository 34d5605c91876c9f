//! Bandwidth-bound kernels against the device-to-device copy (the practical limit): RMSNorm, RoPE,
//! SwiGLU, residual add, dropout and AdamW, forward and backward, at training sizes (4096 tokens of
//! a 2048-wide model, 8192-wide MLP). Throughput is bytes read + written per call.

mod common;
use common::*;
use sqlora::engine::prelude::*;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;

fn elementwise(c: &mut Criterion) {
    let Some(gpu) = gpu() else { return };
    let (t, d, f, heads, hd) = (4096usize, 2048usize, 8192usize, 32usize, 64usize);
    let mut g = c.benchmark_group("bandwidth");

    let src = normal_bf16(&gpu, t * f, 1.0, 1);
    let mut dst = zeros::<bf16>(&gpu, t * f);
    g.throughput(Throughput::Bytes((2 * 2 * t * f) as u64));
    g.bench_function("memcpy_dtod (limit)", |b| {
        b.iter(|| {
            gpu.stream.memcpy_dtod(&src, &mut dst).unwrap();
            sync(&gpu);
        })
    });

    let (x, w, dy) = (
        normal_bf16(&gpu, t * d, 1.0, 2),
        normal_bf16(&gpu, d, 0.1, 3),
        normal_bf16(&gpu, t * d, 1.0, 4),
    );
    let (mut y, mut rstd, mut dx) = (
        zeros::<bf16>(&gpu, t * d),
        zeros::<f32>(&gpu, t),
        zeros::<bf16>(&gpu, t * d),
    );
    g.throughput(Throughput::Bytes((2 * 2 * t * d) as u64));
    g.bench_function("rmsnorm_fwd", |b| {
        b.iter(|| {
            gpu.rmsnorm_fwd(&mut y, &mut rstd, &x, &w, t, 1e-5).unwrap();
            sync(&gpu);
        })
    });
    g.throughput(Throughput::Bytes((3 * 2 * t * d) as u64));
    g.bench_function("rmsnorm_bwd", |b| {
        b.iter(|| {
            gpu.rmsnorm_bwd(&mut dx, &dy, &x, &w, &rstd, t).unwrap();
            sync(&gpu);
        })
    });

    let mut q = normal_bf16(&gpu, t * heads * hd, 1.0, 5);
    let pos: Vec<i32> = (0..t as i32).map(|i| i % 512).collect();
    let pos = gpu.stream.clone_htod(&pos).unwrap();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let inv = gpu.stream.clone_htod(&inv).unwrap();
    g.throughput(Throughput::Bytes((2 * 2 * t * heads * hd) as u64));
    g.bench_function("rope", |b| {
        b.iter(|| {
            gpu.rope_rotate(&mut q, &pos, &inv, t, heads, 1.0).unwrap();
            sync(&gpu);
        })
    });

    let (gate, up, dout) = (
        normal_bf16(&gpu, t * f, 1.0, 6),
        normal_bf16(&gpu, t * f, 1.0, 7),
        normal_bf16(&gpu, t * f, 1.0, 8),
    );
    let (mut o, mut dg, mut du) = (
        zeros::<bf16>(&gpu, t * f),
        zeros::<bf16>(&gpu, t * f),
        zeros::<bf16>(&gpu, t * f),
    );
    g.throughput(Throughput::Bytes((3 * 2 * t * f) as u64));
    g.bench_function("swiglu_fwd", |b| {
        b.iter(|| {
            gpu.swiglu_fwd(&mut o, &gate, &up, t * f).unwrap();
            sync(&gpu);
        })
    });
    g.throughput(Throughput::Bytes((5 * 2 * t * f) as u64));
    g.bench_function("swiglu_bwd", |b| {
        b.iter(|| {
            gpu.swiglu_bwd(&mut dg, &mut du, &dout, &gate, &up, t * f).unwrap();
            sync(&gpu);
        })
    });
    g.throughput(Throughput::Bytes((3 * 2 * t * f) as u64));
    g.bench_function("add", |b| {
        b.iter(|| {
            gpu.add(&mut o, &gate, t * f).unwrap();
            sync(&gpu);
        })
    });
    g.throughput(Throughput::Bytes((2 * 2 * t * f) as u64));
    g.bench_function("dropout", |b| {
        b.iter(|| {
            gpu.dropout(&mut o, &gate, 7, 0.05, t * f).unwrap();
            sync(&gpu);
        })
    });

    // AdamW over a rank-16 adapter of Llama-3.2-1B (11.3M values): p, m, v read and written, g read.
    let n = 11_272_192;
    let (mut p, mut m, mut v, grad) = (
        normal_f32(&gpu, n, 0.01, 9),
        zeros::<f32>(&gpu, n),
        zeros::<f32>(&gpu, n),
        normal_f32(&gpu, n, 1e-3, 10),
    );
    g.throughput(Throughput::Bytes((7 * 4 * n) as u64));
    let h = sqlora::model::optim::AdamStep::new(Default::default(), 1, 1e-4, 0.5);
    g.bench_function("adamw", |b| {
        b.iter(|| {
            gpu.adamw_step(&mut p, &mut m, &mut v, &grad, 0, 0, n, &h).unwrap();
            sync(&gpu);
        })
    });
    g.finish();
}

criterion_group!(benches, elementwise);
criterion_main!(benches);
