//! CPU reference throughput: NF4 quantize/dequantize and the dense vs NF4 linear forward.
//! (The CUDA kernels get their own benches beside these when the CUDA backend lands.)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sqlora::model::cpu::{linear_fwd, Linear};
use sqlora::model::nf4::Nf4Tensor;
use sqlora::util::rng::Rng;
use std::hint::black_box;

fn nf4(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    // Llama-3.2-1B's q_proj: [2048, 2048].
    let (n, k) = (2048, 2048);
    let w = rng.normal_vec(n * k, 0.02);
    let mut g = c.benchmark_group("nf4_cpu");
    g.throughput(Throughput::Elements((n * k) as u64));
    g.bench_function("quantize_2048x2048", |b| {
        b.iter(|| Nf4Tensor::quantize(black_box(&w), &[n, k]))
    });
    let q = Nf4Tensor::quantize(&w, &[n, k]);
    g.bench_function("dequantize_2048x2048", |b| b.iter(|| black_box(&q).dequantize()));
    g.finish();

    let dense = Linear::dense(n, k, w, None);
    let packed = dense.to_nf4();
    let mut g = c.benchmark_group("linear_fwd_cpu");
    for t in [1usize, 16] {
        let x = rng.normal_vec(t * k, 1.0);
        let mut y = vec![0f32; t * n];
        g.throughput(Throughput::Elements((2 * t * n * k) as u64)); // flops
        g.bench_with_input(BenchmarkId::new("dense", t), &t, |b, _| {
            b.iter(|| linear_fwd(&mut y, &x, &dense))
        });
        g.bench_with_input(BenchmarkId::new("nf4", t), &t, |b, _| {
            b.iter(|| linear_fwd(&mut y, &x, &packed))
        });
    }
    g.finish();
}

criterion_group!(benches, nf4);
criterion_main!(benches);
