//! The loss through Llama-3.2-1B's output head (vocabulary 128,256, width 2048) for one chunk of 512
//! labelled rows: head GEMM, softmax and gradient, second GEMM, by our tensor-core GEMMs and by
//! cuBLAS. Throughput in FLOPs of the two GEMMs.

mod common;
use common::*;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sqlora::engine::cuda::GemmPath;
use sqlora::engine::prelude::*;

fn loss(c: &mut Criterion) {
    let Some(gpu) = gpu() else { return };
    let (rows, vocab, d) = (512usize, 128_256usize, 2048usize);
    let (h, head) = (
        normal_bf16(&gpu, rows * d, 1.0, 1),
        normal_bf16(&gpu, vocab * d, 0.02, 2),
    );
    let targets: Vec<i32> = (0..rows as i32).map(|i| i * 97 % vocab as i32).collect();
    let targets = gpu.stream.clone_htod(&targets).unwrap();
    let (mut logits, mut dlogits) = (zeros(&gpu, rows * vocab), zeros(&gpu, rows * vocab));
    let (mut loss, mut dh) = (zeros(&gpu, rows), zeros(&gpu, rows * d));
    let mut g = c.benchmark_group("loss_512x128256x2048");
    g.throughput(Throughput::Elements((2 * 2 * rows * vocab * d) as u64));
    let mut paths = vec![("mma", GemmPath::Mma)];
    if gpu.gemm_state.lock().unwrap().has_blas() {
        paths.push(("cublas", GemmPath::Cublas));
    }
    for (name, path) in paths {
        g.bench_function(format!("logits+softmax_grad+dh {name}"), |b| {
            b.iter(|| {
                gpu.head_logits_via(path, &mut logits, &h, &head, 0, rows, d).unwrap();
                gpu.ce_softmax_grad(&mut dlogits, &mut loss, &logits, &targets, 0, rows, vocab, 1.0)
                    .unwrap();
                gpu.head_grad_via(path, &mut dh, &dlogits, &head, 0, rows, d).unwrap();
                sync(&gpu);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, loss);
criterion_main!(benches);
