//! One CPU training step (forward, fused loss, backward through NF4 weights, LoRA gradients) on the
//! tiny Qwen2 model: the reference backend's end-to-end cost, in tokens per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sqlora::model::autograd::{forward_backward, Batch, GradOptions};
use sqlora::model::forward::Model;
use sqlora::model::lora::{LoraConfig, LoraParams};
use sqlora::model::tiny::{write_tiny_model, TinyVariant};
use sqlora::util::rng::Rng;

fn train_step(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("sqlora-bench-tiny-qwen2");
    write_tiny_model(&dir, TinyVariant::Qwen2).unwrap();
    let model = Model::load_dir(&dir).unwrap().quantize_nf4();
    let lora = LoraParams::init(
        &model.config,
        LoraConfig {
            r: 16,
            ..Default::default()
        },
        1,
    );
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("train_step_cpu");
    for (seqs, len) in [(2usize, 128usize), (4, 256)] {
        let data: Vec<(Vec<u32>, Vec<Option<u32>>)> = (0..seqs)
            .map(|_| {
                let toks: Vec<u32> = (0..len).map(|_| rng.below(259) as u32).collect();
                let tg = (0..len)
                    .map(|i| (i >= len / 2 && i + 1 < len).then(|| toks[i + 1]))
                    .collect();
                (toks, tg)
            })
            .collect();
        let batch = Batch::pack(data.iter().map(|(t, g)| (&t[..], &g[..])));
        let inv = 1.0 / batch.label_count() as f32;
        g.throughput(Throughput::Elements((seqs * len) as u64));
        let mut grads = vec![0f32; lora.len()];
        g.bench_function(format!("tiny-qwen2/{seqs}x{len}"), |b| {
            b.iter(|| forward_backward(&model, &lora, &batch, inv, GradOptions::default(), &mut grads))
        });
    }
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
