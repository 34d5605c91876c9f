//! The CPU engine's other kernel families at SmolLM2-135M's training shapes (a 4 x 256 micro-batch),
//! on every instruction-set path this CPU has: attention forward and backward (GFLOP/s of the
//! causal products), the LoRA branch (GFLOP/s), the decoding GEMV (GB/s of NF4 bytes read), and the
//! memory-bound elementwise kernels (GB/s of bf16 read and written). Criterion's "elem/s" is the
//! unit named in each group.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use sqlora::engine::cpu::gemv::{gemv, Weights};
use sqlora::engine::cpu::isa::Isa;
use sqlora::engine::cpu::Cpu;
use sqlora::engine::prelude::*;
use sqlora::engine::to_bf16;
use sqlora::model::cpu::{Linear, LinearWeight};
use sqlora::model::lora::LoraAt;
use sqlora::model::q8::Q8Tensor;
use sqlora::util::rng::Rng;

fn bf(rng: &mut Rng, n: usize) -> Vec<bf16> {
    rng.normal_vec(n, 1.0).iter().map(|&v| bf16::from_f32(v)).collect()
}

fn kernels(c: &mut Criterion) {
    let mut rng = Rng::new(9);
    let (seqs, len, heads, kv, hd) = (4usize, 256usize, 9usize, 3usize, 64usize);
    let t = seqs * len;
    let seq_start: Vec<i32> = (0..t).map(|i| (i / len * len) as i32).collect();
    let (q, k, v) = (
        bf(&mut rng, t * heads * hd),
        bf(&mut rng, t * kv * hd),
        bf(&mut rng, t * kv * hd),
    );
    let dims = [heads, kv, hd];
    // Causal: half of the t x len score matrix per head, 2 flops per multiply-add, QK^T and PV.
    let attn_flops = (seqs * len * len / 2 * heads * hd * 2 * 2) as u64;
    let mut g = c.benchmark_group("cpu_attention_4x256_h9_kv3_d64 (FLOP/s)");
    g.sample_size(10);
    for isa in Isa::available() {
        let cpu = Cpu::with_isa(isa);
        let (mut o, mut lse) = (vec![bf16::ZERO; t * heads * hd], vec![0f32; t * heads]);
        g.throughput(Throughput::Elements(attn_flops));
        g.bench_function(BenchmarkId::new("fwd", isa), |b| {
            b.iter(|| {
                cpu.attention_fwd(&mut o, &mut lse, &q, &k, &v, &seq_start, t, dims, len)
                    .unwrap()
            })
        });
        let dout = bf(&mut rng, t * heads * hd);
        let (mut dq, mut dk, mut dv) = (o.clone(), k.clone(), v.clone());
        let mut dd = vec![0f32; t * heads];
        // The backward's five products against the forward's two.
        g.throughput(Throughput::Elements(attn_flops * 5 / 2));
        g.bench_function(BenchmarkId::new("bwd", isa), |b| {
            b.iter(|| {
                cpu.attention_bwd(
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &mut dd,
                    &dout,
                    [&q, &k, &v],
                    &o,
                    &lse,
                    &seq_start,
                    t,
                    dims,
                    len,
                )
                .unwrap()
            })
        });
    }
    g.finish();

    let (n, kk, r) = (1536usize, 576usize, 16usize);
    let at = LoraAt {
        a: 0,
        b: r * kk,
        inp: kk,
        out: n,
    };
    let w = bf(&mut rng, r * kk + n * r);
    let (x, dy) = (bf(&mut rng, t * kk), bf(&mut rng, t * n));
    let mut g = c.benchmark_group("cpu_lora_1536x576_r16_t1024 (FLOP/s)");
    g.sample_size(10);
    for isa in Isa::available() {
        let cpu = Cpu::with_isa(isa);
        let (mut y, mut xa, mut dx) = (vec![bf16::ZERO; t * n], vec![0f32; t * r], vec![bf16::ZERO; t * kk]);
        let (mut grad, mut gs) = (vec![0f32; r * kk + n * r], vec![0f32; t * r]);
        g.throughput(Throughput::Elements((2 * t * r * (kk + n)) as u64));
        g.bench_function(BenchmarkId::new("fwd", isa), |b| {
            b.iter(|| cpu.lora_fwd(&mut y, &mut xa, &x, &w, at, t, r, 2.0).unwrap())
        });
        g.throughput(Throughput::Elements((4 * t * r * (kk + n)) as u64));
        g.bench_function(BenchmarkId::new("bwd", isa), |b| {
            b.iter(|| {
                cpu.lora_bwd(&mut dx, &mut grad, &mut gs, &dy, &x, &xa, &w, at, t, r, 2.0)
                    .unwrap()
            })
        });
    }
    g.finish();

    // Decoding: one token against Qwen2.5-0.5B's MLP up-projection, [4864, 896] in NF4.
    let (n, kk) = (4864usize, 896usize);
    let lin = Linear::dense(n, kk, rng.normal_vec(n * kk, 0.05), None).to_nf4();
    let LinearWeight::Nf4(qw) = &lin.weight else {
        unreachable!()
    };
    let x1 = bf(&mut rng, kk);
    let mut g = c.benchmark_group("cpu_gemv_nf4_4864x896_t1 (bytes/s)");
    g.throughput(Throughput::Elements((qw.packed.len() + 4 * qw.absmax().len()) as u64));
    for isa in Isa::available() {
        let mut y = vec![bf16::ZERO; n];
        g.bench_function(BenchmarkId::new("gemv", isa), |b| {
            b.iter(|| gemv(isa, &mut y, &x1, Weights::Nf4(qw), None, 1, n, kk))
        });
    }
    g.finish();

    // Decoding's head: one token against Qwen2.5-0.5B's [151936, 896], bf16 and as a GGUF's Q8_0.
    let (v, d) = (151_936usize, 896usize);
    let w = rng.normal_vec(v * d, 0.05);
    let (head, q8) = (to_bf16(&w), Q8Tensor::quantize(&w, v, d));
    drop(w);
    let h = bf(&mut rng, d);
    let mut logits = vec![0f32; v];
    let mut g = c.benchmark_group("cpu_gemv_head_151936x896_t1 (bytes/s)");
    g.sample_size(20);
    for isa in Isa::available() {
        g.throughput(Throughput::Elements((2 * v * d) as u64));
        g.bench_function(BenchmarkId::new("bf16", isa), |b| {
            b.iter(|| gemv(isa, &mut logits, &h, Weights::Bf16(&head), None, 1, v, d))
        });
        g.throughput(Throughput::Elements(q8.bytes() as u64));
        let w = Weights::Q8 {
            codes: &q8.codes,
            scales: &q8.scales,
        };
        g.bench_function(BenchmarkId::new("q8_0", isa), |b| {
            b.iter(|| gemv(isa, &mut logits, &h, w, None, 1, v, d))
        });
    }
    g.finish();

    let m = t * 1536;
    let (gate, up, dout) = (bf(&mut rng, m), bf(&mut rng, m), bf(&mut rng, m));
    let mut g = c.benchmark_group("cpu_elementwise_1024x1536 (bytes/s)");
    g.sample_size(20);
    for isa in Isa::available() {
        let cpu = Cpu::with_isa(isa);
        let (mut o, mut o2) = (vec![bf16::ZERO; m], vec![bf16::ZERO; m]);
        g.throughput(Throughput::Elements((3 * 2 * m) as u64));
        g.bench_function(BenchmarkId::new("swiglu_fwd", isa), |b| {
            b.iter(|| cpu.swiglu_fwd(&mut o, &gate, &up, m).unwrap())
        });
        g.throughput(Throughput::Elements((5 * 2 * m) as u64));
        g.bench_function(BenchmarkId::new("swiglu_bwd", isa), |b| {
            b.iter(|| cpu.swiglu_bwd(&mut o, &mut o2, &dout, &gate, &up, m).unwrap())
        });
        g.throughput(Throughput::Elements((2 * 2 * m) as u64));
        g.bench_function(BenchmarkId::new("dropout", isa), |b| {
            b.iter(|| cpu.dropout(&mut o, &gate, 7, 0.05, m).unwrap())
        });
        let (d, rows) = (1536usize, t);
        let wn = bf(&mut rng, d);
        let mut rstd = vec![0f32; rows];
        g.throughput(Throughput::Elements((2 * 2 * m) as u64));
        g.bench_function(BenchmarkId::new("rmsnorm_fwd", isa), |b| {
            b.iter(|| cpu.rmsnorm_fwd(&mut o, &mut rstd, &gate, &wn, rows, 1e-5).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
