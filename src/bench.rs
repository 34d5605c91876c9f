//! `sqlora bench train` and `bench generate`. Train: time the training step on a model of a real shape with random NF4 weights
//! (never zeros), LoRA r 16 on all seven projections, batch B x T tokens. It reports tokens/s,
//! ms/step, the device memory in use, and MFU (useful FLOPs over a peak rate).
//!
//! A timed step is what `train` does per optimizer step: forward, loss and backward on the device,
//! then gradient clipping and AdamW over the adapters on the host.

use crate::engine::ProfileRow;
use crate::engine::StepEngine;
use crate::load::arch::Proj;
use crate::load::config::ModelConfig;
use crate::model::autograd::{Batch, GradOptions};
use crate::model::cpu::{Linear, LinearWeight};
use crate::model::forward::{rope_inv_freq, Layer, Model};
use crate::model::lora::{LoraConfig, LoraParams};
use crate::model::nf4::Nf4Tensor;
use crate::model::optim::{clip_factor, AdamW, AdamWConfig};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// The shapes `bench train` knows, as HF config.json fields.
pub const SHAPES: [&str; 8] = [
    "llama-3.2-1b",
    "qwen2.5-0.5b",
    "tinyllama-1.1b",
    "qwen2.5-1.5b",
    "smollm2-135m",
    "llama-3-8b",
    "llama-3-70b",
    "tiny",
];

/// The config of a named shape.
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    // (arch, d, f, layers, heads, kv heads, vocab, tied, rope theta)
    let (arch, d, f, l, h, kv, vocab, tied, theta) = match name {
        "llama-3.2-1b" => ("llama", 2048, 8192, 16, 32, 8, 128_256, true, 500_000.0),
        "qwen2.5-0.5b" => ("qwen2", 896, 4864, 24, 14, 2, 151_936, true, 1_000_000.0),
        "tinyllama-1.1b" => ("llama", 2048, 5632, 22, 32, 4, 32_000, false, 10_000.0),
        "qwen2.5-1.5b" => ("qwen2", 1536, 8960, 28, 12, 2, 151_936, true, 1_000_000.0),
        "smollm2-135m" => ("llama", 576, 1536, 30, 9, 3, 49_152, true, 100_000.0),
        "llama-3-8b" => ("llama", 4096, 14_336, 32, 32, 8, 128_256, false, 500_000.0),
        "llama-3-70b" => ("llama", 8192, 28_672, 80, 64, 8, 128_256, false, 500_000.0),
        "tiny" => ("llama", 64, 160, 2, 4, 2, 272, false, 10_000.0),
        other => bail!("unknown shape \"{other}\": one of {}", SHAPES.join(", ")),
    };
    let mut j = json!({
        "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": arch,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": l,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "rope_theta": theta,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "eos_token_id": 0,
    });
    if name == "llama-3.2-1b" {
        j["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192
        });
    }
    ModelConfig::from_json(&j.to_string())
}

/// A model of the config's shape with random weights: NF4 projections with random codes and scales
/// near 0.02 (so activations stay O(1)), N(0, 0.02^2) embeddings, unit-ish norm gains. Layers and
/// embedding rows are drawn in parallel, each from its own seeded generator (an 8B shape takes
/// seconds, not minutes, of the GPU machine's time).
pub fn random_model(c: &ModelConfig, seed: u64) -> Model {
    use rayon::prelude::*;
    let (d, vocab) = (c.hidden_size, c.vocab_size);
    let rng_for = |stream: u64| Rng::new(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // [vocab, d], 4096 rows per generator.
    let dense = |stream: u64| {
        let mut w = vec![0f32; vocab * d];
        w.par_chunks_mut(4096 * d).enumerate().for_each(|(i, chunk)| {
            let mut rng = rng_for(stream << 32 | i as u64);
            chunk.iter_mut().for_each(|x| *x = rng.normal() * 0.02);
        });
        Linear::dense(vocab, d, w, None)
    };
    let gain = |rng: &mut Rng| -> Vec<f32> { (0..d).map(|_| rng.uniform_in(0.9, 1.1)).collect() };
    let layers = (0..c.num_layers)
        .into_par_iter()
        .map(|l| {
            let mut rng = rng_for(l as u64 + 1);
            Layer {
                attn_norm: gain(&mut rng),
                mlp_norm: gain(&mut rng),
                proj: Proj::ALL.map(|p| {
                    let [out, inp] = p.shape(c);
                    let scale = 1.0 / (inp as f32).sqrt();
                    Linear {
                        out_features: out,
                        in_features: inp,
                        weight: LinearWeight::Nf4(Nf4Tensor::random(&[out, inp], scale, &mut rng)),
                        bias: p.has_bias(c).then(|| rng.normal_vec(out, 0.02)),
                    }
                }),
            }
        })
        .collect();
    let mut rng = rng_for(0);
    Model {
        embed: dense(1 << 20),
        lm_head: (!c.tie_word_embeddings).then(|| dense(2 << 20)),
        norm: gain(&mut rng),
        inv_freq: rope_inv_freq(c),
        layers,
        config: c.clone(),
    }
}

/// Builds the engine a benchmark times, from the model, the adapters and the tokens per step.
pub type EngineFor<'a> = dyn FnMut(&Arc<Model>, &LoraParams, usize) -> Result<Box<dyn StepEngine>> + 'a;

/// What one benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub shape: String,
    pub device: String,
    pub batch: usize,
    pub seq: usize,
    /// Labelled positions per sequence (the loss and the head run on these only).
    pub labels: usize,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub adapter_params: usize,
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    /// Device memory in use at the end of the timed steps (all buffers are allocated before them).
    pub device_memory_bytes: Option<usize>,
    /// Useful FLOP/s over `peak_flops`.
    pub mfu: f64,
    pub peak_flops: f64,
    /// Where `peak_flops` comes from.
    pub peak_source: String,
    /// Mean loss of the timed steps (random weights and tokens: about ln(vocab)).
    pub loss: f64,
    /// With `--profile`: per step, each kernel's calls and milliseconds, largest first (empty
    /// where the device does not time kernels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfileRow>>,
}

/// How `bench train` runs.
#[derive(Clone, Copy, Debug)]
pub struct TrainBench<'a> {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Labelled positions per sequence, its last ones (`seq` or more: every position that has a
    /// next token).
    pub labels: usize,
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    pub checkpointing: bool,
    /// The rate MFU is measured against, FLOP/s, and where it comes from.
    pub peak_flops: f64,
    pub peak_source: &'a str,
    /// After the timed steps, as many again with every kernel timed (`--profile`).
    pub profile: bool,
    /// LoRA dropout on each adapted projection's input (`--lora-dropout`).
    pub dropout: f32,
}

/// Run `warmup` then `steps` timed steps of `batch` sequences of `seq` random tokens (then, with
/// `profile`, `steps` more with per-kernel timing, which slows them: they are not in the rate).
pub fn bench_train(shape: &str, engine_for: &mut EngineFor, o: TrainBench) -> Result<BenchReport> {
    let TrainBench {
        batch,
        seq,
        labels,
        warmup,
        steps,
        checkpointing,
        peak_flops,
        peak_source,
        profile,
        dropout,
    } = o;
    if batch == 0 || seq < 2 || steps == 0 || labels == 0 {
        bail!("bench train needs --batch >= 1, --seq >= 2, --labels >= 1 and --steps >= 1");
    }
    if !(0.0..1.0).contains(&dropout) {
        bail!("bench train needs 0 <= --lora-dropout < 1, not {dropout}");
    }
    let c = shape_config(shape)?;
    let model = Arc::new(random_model(&c, 0xbe7c));
    let lora_config = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout,
        use_rslora: false,
        targets: Proj::ALL.to_vec(),
    };
    let mut lora = LoraParams::init(&c, lora_config, 1);
    // PEFT starts B at zero; give it values so every branch of the backward does real work.
    let mut rng = Rng::new(2);
    lora.data.iter_mut().for_each(|x| *x += rng.normal() * 1e-3);
    let mut engine = engine_for(&model, &lora, batch * seq)?;
    // The training loop's step: gradients, clipping and the paged AdamW all on the device.
    let pages = engine.start_optimizer()?;
    let mut opt = AdamW::new(AdamWConfig::default(), pages);
    engine.to_device(&lora)?;
    let seqs: Vec<(Vec<u32>, Vec<Option<u32>>)> = (0..batch)
        .map(|_| {
            let toks: Vec<u32> = (0..seq).map(|_| rng.below(c.vocab_size as u64) as u32).collect();
            // Position i predicts token i + 1; only the last `labels` tokens are targets.
            let targets = (0..seq)
                .map(|i| {
                    if i + 1 + labels >= seq {
                        toks.get(i + 1).copied()
                    } else {
                        None
                    }
                })
                .collect();
            (toks, targets)
        })
        .collect();
    let b = Batch::pack(seqs.iter().map(|(t, y)| (&t[..], &y[..])));
    let inv = 1.0 / b.label_count() as f32;
    let (mut started, mut loss) = (Instant::now(), 0.0);
    let step = |engine: &mut dyn StepEngine, opt: &mut AdamW, s: usize| -> Result<f64> {
        let opts = GradOptions {
            checkpointing,
            dropout_seed: s as u64,
        };
        let l = engine.accumulate(&b, inv, opts)? * inv as f64;
        // The norm is read back to the host (as training does, to decide the clipping factor):
        // this also waits for the step, so the clock measures finished work.
        let norm = engine.grad_norm()?;
        engine.adamw_update(opt, 1e-4, clip_factor(norm, 1.0))?;
        Ok(l)
    };
    for s in 0..warmup + steps {
        if s == warmup {
            started = Instant::now();
        }
        let l = step(&mut *engine, &mut opt, s)?;
        if s >= warmup {
            loss += l / steps as f64;
        }
    }
    engine.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    let mut kernels = Vec::new();
    if profile {
        engine.set_profiling(true);
        for s in 0..steps {
            step(&mut *engine, &mut opt, warmup + steps + s)?;
        }
        kernels = engine.take_profile()?;
        engine.set_profiling(false);
        for k in &mut kernels {
            k.ms /= steps as f64;
            k.calls = (k.calls as f64 / steps as f64).round() as u64;
        }
    }
    let tokens_per_s = (batch * seq * steps) as f64 / seconds;
    // The head runs on labelled positions only: unlabelled ones do none of its work.
    let head = (c.vocab_size * c.hidden_size) as f64 * if checkpointing { 6.0 } else { 4.0 };
    let unlabelled = 1.0 - b.label_count() as f64 / (batch * (seq - 1)) as f64;
    let per_token = crate::engine::plan::flops_per_token(&c, seq, checkpointing) - head * unlabelled;
    let useful = per_token * tokens_per_s;
    Ok(BenchReport {
        shape: shape.into(),
        device: engine.describe(),
        batch,
        seq,
        labels: b.label_count() / batch,
        warmup_steps: warmup,
        timed_steps: steps,
        adapter_params: lora.len(),
        tokens_per_s,
        ms_per_step: seconds * 1e3 / steps as f64,
        device_memory_bytes: engine.memory_used(),
        mfu: useful / peak_flops,
        peak_flops,
        peak_source: peak_source.to_string(),
        loss,
        profile: profile.then_some(kernels),
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "bench train: {} (NF4, random weights), LoRA r16 on all 7 projections ({} params), batch {} x {} tokens ({} labelled each)",
            self.shape, self.adapter_params, self.batch, self.seq, self.labels
        )?;
        writeln!(f, "device: {}", self.device)?;
        writeln!(
            f,
            "{} warm-up + {} timed steps: {:.0} tokens/s, {:.1} ms/step, loss {:.3}",
            self.warmup_steps, self.timed_steps, self.tokens_per_s, self.ms_per_step, self.loss
        )?;
        let mem = self
            .device_memory_bytes
            .map_or("n/a".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64));
        let peak = if self.peak_flops >= 1e12 {
            format!("{:.0} TFLOP/s", self.peak_flops / 1e12)
        } else {
            format!("{:.1} GFLOP/s", self.peak_flops / 1e9)
        };
        write!(
            f,
            "device memory in use: {mem}; MFU {:.1}% of {peak} ({})",
            self.mfu * 100.0,
            self.peak_source
        )?;
        match &self.profile {
            None => Ok(()),
            Some(rows) if rows.is_empty() => write!(f, "\nper-kernel times: not available on this device"),
            Some(rows) => {
                let total: f64 = rows.iter().map(|r| r.ms).sum();
                write!(
                    f,
                    "\nper step, profiled ({:.1} ms of kernels; timing each launch slows the step):",
                    total
                )?;
                write!(f, "\n  {:<28} {:>6} {:>10} {:>6}", "kernel", "calls", "ms", "share")?;
                for r in rows {
                    let share = 100.0 * r.ms / total.max(f64::MIN_POSITIVE);
                    write!(f, "\n  {:<28} {:>6} {:>10.3} {:>5.1}%", r.name, r.calls, r.ms, share)?;
                }
                Ok(())
            }
        }
    }
}

/// What a generation benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateReport {
    /// The shape's name (random weights) or the model file's path.
    pub shape: String,
    /// "random" or "file".
    pub weights: String,
    pub device: String,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Timed repetitions; the figures are their medians.
    pub reps: usize,
    /// Prefill of all prompts, seconds.
    pub prefill_s: f64,
    /// Generated tokens per second over the decode steps (all sequences together).
    pub decode_tokens_per_s: f64,
    /// Decoding steps of the timed runs that replayed a recorded CUDA graph (0: step by step).
    pub graph_replays: usize,
    pub device_memory_bytes: Option<usize>,
    /// Bytes of weights a decoding step reads, where the engine can tell.
    pub decode_weight_bytes: Option<usize>,
    /// The read bandwidth decoding is measured against, bytes/s, and how it was taken (the CPU's,
    /// measured; none on a GPU).
    pub read_bandwidth: Option<f64>,
    pub bandwidth_source: Option<String>,
}

/// Which model `bench generate` decodes with.
pub enum GenerateModel {
    /// A named shape with random NF4 weights ([`random_model`]).
    Shape(String),
    /// A loaded model (its projections in NF4), named by its path: the same file a peer such as
    /// llama.cpp reads.
    File(String, Arc<Model>),
}

/// Greedy decoding of `batch` random prompts of `prompt` tokens for `new` tokens each (no stop
/// token), without adapters, `reps` times after a warm-up: the median prefill time and decode rate,
/// beside `bandwidth` (bytes/s and its source) where the device has one to measure against.
pub fn bench_generate(
    which: GenerateModel,
    engine_for: &mut EngineFor,
    batch: usize,
    prompt: usize,
    [new, reps]: [usize; 2],
    bandwidth: Option<(f64, String)>,
) -> Result<GenerateReport> {
    if batch == 0 || prompt == 0 || new < 2 {
        bail!("bench generate needs --batch >= 1, --prompt >= 1 and --new-tokens >= 2");
    }
    let (shape, weights, model) = match which {
        GenerateModel::Shape(name) => {
            let c = shape_config(&name)?;
            (name, "random", Arc::new(random_model(&c, 0xbe7c)))
        }
        GenerateModel::File(path, model) => (path, "file", model),
    };
    let c = &model.config;
    let none = LoraConfig {
        targets: vec![],
        ..Default::default()
    };
    let layout = LoraParams::zeros(c, none);
    let mut engine = engine_for(&model, &layout, batch * prompt)?;
    let mut rng = Rng::new(3);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..prompt).map(|_| rng.below(c.vocab_size as u64) as u32).collect())
        .collect();
    // Warm-up: the cache's allocation, the GEMM tuner's choices, and (with graphs) a recording.
    engine.generate(None, &prompts, 4, &[])?;
    let replays_before = engine.graph_replays();
    // Per repetition: the prefill alone, then prefill and decoding; medians of each (a shared
    // machine's bandwidth varies from second to second).
    let (mut prefills, mut rates) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let started = Instant::now();
        engine.generate(None, &prompts, 1, &[])?;
        let prefill_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let out = engine.generate(None, &prompts, new, &[])?;
        let decode_s = (started.elapsed().as_secs_f64() - prefill_s).max(1e-9);
        let decoded: usize = out.iter().map(|o| o.len() - 1).sum();
        prefills.push(prefill_s);
        rates.push(decoded as f64 / decode_s);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (prefill_s, decode_tokens_per_s) = (median(prefills), median(rates));
    Ok(GenerateReport {
        shape,
        weights: weights.into(),
        device: engine.describe(),
        batch,
        prompt_tokens: prompt,
        new_tokens: new,
        reps: reps.max(1),
        prefill_s,
        decode_tokens_per_s,
        graph_replays: engine.graph_replays() - replays_before,
        device_memory_bytes: engine.memory_used(),
        decode_weight_bytes: engine.decode_weight_bytes(),
        read_bandwidth: bandwidth.as_ref().map(|b| b.0),
        bandwidth_source: bandwidth.map(|b| b.1),
    })
}

impl std::fmt::Display for GenerateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let weights = match self.weights.as_str() {
            "random" => "NF4, random weights",
            _ => "projections in NF4",
        };
        writeln!(
            f,
            "bench generate: {} ({weights}), {} prompts of {} tokens, {} new tokens each",
            self.shape, self.batch, self.prompt_tokens, self.new_tokens
        )?;
        writeln!(f, "device: {}", self.device)?;
        write!(
            f,
            "prefill {:.1} ms; decode {:.0} tokens/s ({:.2} ms per step{}), median of {}",
            self.prefill_s * 1e3,
            self.decode_tokens_per_s,
            1e3 * self.batch as f64 / self.decode_tokens_per_s,
            if self.graph_replays > 0 { ", CUDA graph" } else { "" },
            self.reps
        )?;
        if let Some(bytes) = self.decode_weight_bytes {
            // One step decodes a token of every sequence, reading the weights once.
            let rate = bytes as f64 * self.decode_tokens_per_s / self.batch as f64;
            write!(
                f,
                "\nweights read a step: {:.1} MB, {:.1} GB/s",
                bytes as f64 / 1e6,
                rate / 1e9
            )?;
            if let (Some(peak), Some(how)) = (self.read_bandwidth, &self.bandwidth_source) {
                write!(
                    f,
                    ", {:.0}% of the read bandwidth ({:.1} GB/s: {how})",
                    100.0 * rate / peak,
                    peak / 1e9
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::device_plan;

    #[test]
    fn a_profiled_report_shows_each_kernel_and_its_share() {
        let row = |name: &str, calls, ms| ProfileRow {
            name: name.into(),
            calls,
            ms,
        };
        let mut r = BenchReport {
            shape: "tiny".into(),
            device: "test".into(),
            batch: 1,
            seq: 8,
            labels: 7,
            warmup_steps: 0,
            timed_steps: 1,
            adapter_params: 10,
            tokens_per_s: 1.0,
            ms_per_step: 8.0,
            device_memory_bytes: None,
            mfu: 0.1,
            peak_flops: 1e12,
            peak_source: "test".into(),
            loss: 1.0,
            profile: Some(vec![row("cublas nf4_fwd", 112, 3.0), row("flash_fwd_hd64", 16, 1.0)]),
        };
        let text = r.to_string();
        assert!(text.contains("(4.0 ms of kernels"), "{text}");
        assert!(
            text.contains("cublas nf4_fwd") && text.contains("75.0%") && text.contains("25.0%"),
            "{text}"
        );
        r.profile = None;
        assert!(!r.to_string().contains("kernel"), "{r}");
    }

    const GIB: u64 = 1 << 30;

    /// Issue 7: a Llama-3-8B QLoRA step (r 16 on all seven projections, batch 1 x 2048) fits in 20 GiB,
    /// so a 24 GB card trains it, and a Llama-3-70B step at batch 1 x 512 fits the 80 GB H100. The
    /// plan is what the engine allocates, buffer for buffer (tests/engine.rs), so this bounds the
    /// engine's memory (the CUDA context and cuBLAS workspace come on top: ~0.5-1 GiB).
    #[test]
    fn large_shapes_fit_their_cards() {
        let c = shape_config("llama-3-8b").unwrap();
        let p = device_plan(&c, 16, &Proj::ALL, 2048, true);
        assert!(p.total() < 20 * GIB, "8B, 1 x 2048, checkpointing:\n{p}");
        let without = device_plan(&c, 16, &Proj::ALL, 2048, false);
        assert!(without.total() > p.total(), "checkpointing saves memory");
        let c = shape_config("llama-3-70b").unwrap();
        let p = device_plan(&c, 16, &Proj::ALL, 512, true);
        assert!(p.total() < 75 * GIB, "70B, 1 x 512, checkpointing:\n{p}");
    }
}
