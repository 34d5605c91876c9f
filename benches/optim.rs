//! The host side of a device training step for Llama-3.2-1B with rank-16 adapters on all seven
//! projections (11.3M parameters): AdamW over the paged state and global-norm clipping.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sqlora::model::optim::{clip_grad_norm, AdamW, AdamWConfig, HostPages};
use sqlora::util::rng::Rng;

fn optim(c: &mut Criterion) {
    let n = 11_272_192;
    let mut rng = Rng::new(1);
    let mut params = rng.normal_vec(n, 0.01);
    let mut grads = rng.normal_vec(n, 1e-3);
    let mut opt = AdamW::new(AdamWConfig::default(), Box::new(HostPages::new(n, 1 << 20)));
    let mut g = c.benchmark_group("optimizer_host_11.3M");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    g.bench_function("adamw_update", |b| b.iter(|| opt.update(&mut params, &grads, 1e-4)));
    g.bench_function("clip_grad_norm", |b| b.iter(|| clip_grad_norm(&mut grads, 1e9)));
    g.finish();
}

criterion_group!(benches, optim);
criterion_main!(benches);
