//! Causal GQA attention over packed sequences, forward and backward: 8 sequences of 512 tokens,
//! 32 query heads over 8 key/value heads of width 64 (Llama-3.2-1B). Throughput in FLOPs (the
//! causal half of 4 S^2 hd per head forward, twice that backward), shown as elements/s. Both
//! paths: the simple kernels (a block per token and head) and the tiled ones (tensor cores).

mod common;
use common::*;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sqlora::engine::cuda::AttentionPath;

fn attention(c: &mut Criterion) {
    let Some(gpu) = gpu() else { return };
    let (b, s, h, kv, hd) = (8usize, 512usize, 32usize, 8usize, 64usize);
    let t = b * s;
    let (q, k, v, dout) = (
        normal_bf16(&gpu, t * h * hd, 1.0, 1),
        normal_bf16(&gpu, t * kv * hd, 1.0, 2),
        normal_bf16(&gpu, t * kv * hd, 1.0, 3),
        normal_bf16(&gpu, t * h * hd, 1.0, 4),
    );
    let starts: Vec<i32> = (0..t).map(|i| (i / s * s) as i32).collect();
    let starts = gpu.stream.clone_htod(&starts).unwrap();
    let (mut out, mut dq) = (zeros(&gpu, t * h * hd), zeros(&gpu, t * h * hd));
    let (mut dk, mut dv) = (zeros(&gpu, t * kv * hd), zeros(&gpu, t * kv * hd));
    let (mut lse, mut dd) = (zeros(&gpu, t * h), zeros(&gpu, t * h));
    let fwd_flops = (b * h * 2 * s * s * hd) as u64; // 4 S^2 hd per head, halved by the mask
    let mut g = c.benchmark_group("attention_8x512_h32_kv8_hd64");
    for (name, path) in [("simple", AttentionPath::Simple), ("tiled", AttentionPath::Tiled)] {
        g.throughput(Throughput::Elements(fwd_flops));
        g.bench_function(format!("fwd {name}"), |bch| {
            bch.iter(|| {
                gpu.attention_fwd_via(path, &mut out, &mut lse, &q, &k, &v, &starts, t, [h, kv, hd], s)
                    .unwrap();
                sync(&gpu);
            })
        });
        g.throughput(Throughput::Elements(2 * fwd_flops));
        g.bench_function(format!("bwd {name}"), |bch| {
            bch.iter(|| {
                gpu.attention_bwd_via(
                    path,
                    [&mut dq, &mut dk, &mut dv],
                    &mut dd,
                    &dout,
                    [&q, &k, &v],
                    &out,
                    &lse,
                    &starts,
                    t,
                    [h, kv, hd],
                    s,
                )
                .unwrap();
                sync(&gpu);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
