//! The memory plan of a training run, computed from the config before anything is allocated:
//! `train --dry-run` prints it, with a throughput estimate, and refuses a plan that does not fit.
//!
//! Sizes are for the CPU reference backend (f32 activations; f32 or NF4 base weights), or, with
//! `PlanInput::device`, exactly what the device engine allocates ([`device_plan`]).

use super::SUM_PARTS;
use crate::load::arch::Proj;
use crate::load::config::ModelConfig;
use crate::model::optim::PAGE;
use std::fmt;

/// Bytes the loss's logits and dlogits chunk may take (f32 + bf16 per element).
pub const CE_CHUNK_BYTES: usize = 256 << 20;

/// Values per moment the optimizer may keep on the device (256 MiB each for m and v).
pub const OPTIMIZER_WINDOW: usize = 64 << 20;

/// Bytes of device memory the optimizer takes for `len` adapter parameters in host pages of `page`
/// values: [`device_plan`]'s formula.
pub fn optimizer_bytes(len: usize, page: usize) -> usize {
    let window = if len <= OPTIMIZER_WINDOW { len.max(1) } else { 2 * page };
    2 * 4 * window + 4 * SUM_PARTS
}

/// Bytes of the CUDA device's weight scratch for the cuBLAS GEMM path: the largest projection
/// dequantized to bf16 (`Cuda::reserve_gemm_scratch`, called as each weight is uploaded). Only a
/// device with cuBLAS holds it; the plan counts it always.
pub fn gemm_scratch_bytes(c: &ModelConfig) -> usize {
    Proj::ALL
        .iter()
        .map(|p| 2 * p.shape(c).iter().product::<usize>())
        .max()
        .unwrap_or(0)
}

/// What [`Engine::new`] allocates for a model of config `c`, adapters of rank `r` on `targets`, and
/// micro-batches of up to `cap` tokens, with the optimizer enabled as training enables it
/// (`Engine::enable_optimizer(PAGE, OPTIMIZER_WINDOW)`), by the same formulas: the device side of
/// `train --dry-run`. The workspace includes [`gemm_scratch_bytes`].
pub fn device_plan(c: &ModelConfig, r: usize, targets: &[Proj], cap: usize, checkpointing: bool) -> Plan {
    let (d, f, qd, kvd, v, l) = (
        c.hidden_size,
        c.intermediate_size,
        c.q_dim(),
        c.kv_dim(),
        c.vocab_size,
        c.num_layers,
    );
    let mut base_linear = 0;
    for p in Proj::ALL {
        let n: usize = p.shape(c).iter().product();
        base_linear += n.div_ceil(2) + 4 * n.div_ceil(crate::model::nf4::BLOCK);
        base_linear += if p.has_bias(c) { 2 * p.shape(c)[0] } else { 0 };
    }
    let head = if c.tie_word_embeddings { 0 } else { v * d };
    let adapter: usize = targets.iter().map(|p| r * p.shape(c).iter().sum::<usize>()).sum();
    let h = c.num_heads;
    let per_token_layer = 2 * (d + 2 * qd + 2 * kvd + 2 * f) + 4 * (2 + h + 7 * r);
    let n_acts = if checkpointing { 1 } else { l };
    let ce_rows = (CE_CHUNK_BYTES / (6 * v)).max(64).min(cap);
    let w = d.max(qd).max(f);
    let scratch_per_token = 4 * 5 + 2 * (8 * d + 4 * f + 2 * qd + 2 * kvd + 4 * w) + 4 * (3 + h + r);
    Plan {
        base_linear: (l * base_linear) as u64,
        base_other: (2 * (v * d + head + (2 * l + 1) * d) + 4 * (c.head_dim / 2)) as u64,
        // bf16 copies, f32 masters and gradients; the optimizer's window.
        adapter_and_optimizer: (l * adapter * (2 + 4 + 4) + optimizer_bytes(l * adapter, PAGE)) as u64,
        activations: (cap * (n_acts * per_token_layer + (l + 1) * 2 * d)) as u64,
        workspace: (cap * scratch_per_token + ce_rows * v * (4 + 2) + gemm_scratch_bytes(c)) as u64,
        device: true,
    }
}

/// What the plan depends on.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub lora_r: usize,
    pub lora_targets: Vec<Proj>,
    /// Sequences per micro-batch and the longest sequence: the worst-case tokens per micro-batch.
    pub micro_batch: usize,
    pub max_seq_len: usize,
    pub checkpointing: bool,
    pub nf4: bool,
    /// Threads of the CPU backend (each holds a vocabulary-sized row in the fused loss).
    pub threads: usize,
    /// Plan the device engine's memory (`engine::step`: bf16 activations, NF4 base, the adapters'
    /// AdamW state on the host) rather than the CPU reference's.
    pub device: bool,
}

/// Bytes per part of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The frozen linear layers (NF4 or f32).
    pub base_linear: u64,
    /// Embedding, output head (when untied) and norms, f32.
    pub base_other: u64,
    /// LoRA A and B, their gradients, and AdamW's two moments (all f32).
    pub adapter_and_optimizer: u64,
    /// Activations kept for the backward (every layer, or only layer inputs with checkpointing).
    pub activations: u64,
    /// Transient buffers of the backward and the fused loss.
    pub workspace: u64,
    /// A device plan: the adapter line then counts parameters and gradients only.
    pub device: bool,
}

impl Plan {
    pub fn total(&self) -> u64 {
        self.base_linear + self.base_other + self.adapter_and_optimizer + self.activations + self.workspace
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  frozen linear weights   {:>9.3} GiB", gib(self.base_linear))?;
        writeln!(f, "  embedding, head, norms  {:>9.3} GiB", gib(self.base_other))?;
        let adapter = if self.device {
            "adapter, grads, AdamW  "
        } else {
            "adapter + AdamW state  "
        };
        writeln!(f, "  {adapter} {:>9.3} GiB", gib(self.adapter_and_optimizer))?;
        writeln!(f, "  activations             {:>9.3} GiB", gib(self.activations))?;
        writeln!(f, "  workspace               {:>9.3} GiB", gib(self.workspace))?;
        write!(f, "  total                   {:>9.3} GiB", gib(self.total()))
    }
}

/// Compute the plan.
pub fn plan(c: &ModelConfig, p: &PlanInput) -> Plan {
    if p.device {
        let cap = p.micro_batch * p.max_seq_len;
        return device_plan(c, p.lora_r, &p.lora_targets, cap, p.checkpointing);
    }
    let (d, f, v, l) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
        c.num_layers as u64,
    );
    let (qd, kvd, r) = (c.q_dim() as u64, c.kv_dim() as u64, p.lora_r as u64);
    let linear_numel: u64 = Proj::ALL
        .iter()
        .map(|pr| pr.shape(c).iter().product::<usize>() as u64)
        .sum::<u64>()
        * l;
    // NF4: half a byte per weight, one u8 scale per 64, one f32 per 256 scales.
    let base_linear = if p.nf4 {
        linear_numel / 2 + linear_numel / 64 + linear_numel / 64 / 256 * 4
    } else {
        linear_numel * 4
    };
    let head = if c.tie_word_embeddings { 0 } else { v * d };
    let base_other = 4 * (v * d + head + (2 * l + 1) * d);
    let adapter: u64 = p
        .lora_targets
        .iter()
        .map(|pr| r * pr.shape(c).iter().sum::<usize>() as u64)
        .sum::<u64>()
        * l;
    let adapter_and_optimizer = 4 * adapter * 4; // params, grads, m, v
    let t = (p.micro_batch * p.max_seq_len) as u64;
    // Saved per token and layer: x_in, h_attn, x_mid, h_mlp, plus rstd-free q, k, v, att, gate, up, act, xa.
    let per_layer = 4 * d + 2 * qd + 2 * kvd + 3 * f + 7 * r + d;
    let activations = 4
        * t
        * if p.checkpointing {
            l * d + per_layer
        } else {
            l * per_layer
        };
    // The backward holds a few [T, max(d, f)] gradients at a time; the loss one [vocab] row per thread.
    let workspace = 4 * (6 * t * d.max(f).max(qd) + p.threads as u64 * v);
    Plan {
        base_linear,
        base_other,
        adapter_and_optimizer,
        activations,
        workspace,
        device: false,
    }
}

/// Useful FLOPs per trained token: the forward (2 per weight), the input-gradient backward (2 per
/// weight; frozen weights get no weight gradient), the forward again with checkpointing, and
/// attention (quadratic in the sequence length, counted at its mean).
pub fn flops_per_token(c: &ModelConfig, seq: usize, checkpointing: bool) -> f64 {
    let n: f64 = Proj::ALL
        .iter()
        .map(|p| p.shape(c).iter().product::<usize>() as f64)
        .sum::<f64>()
        * c.num_layers as f64
        + (c.vocab_size * c.hidden_size) as f64;
    let passes = if checkpointing { 6.0 } else { 4.0 };
    let attention = 4.0 * seq as f64 / 2.0 * c.q_dim() as f64 * c.num_layers as f64 * passes / 2.0;
    passes * n + attention
}

/// Measure this machine's f32 matmul speed (FLOP/s) with the CPU backend's own linear layer.
pub fn measure_cpu_flops() -> f64 {
    let (t, n, k) = (64, 512, 512);
    let mut rng = crate::util::rng::Rng::new(1);
    let lin = crate::model::cpu::Linear::dense(n, k, rng.normal_vec(n * k, 0.1), None);
    let x = rng.normal_vec(t * k, 1.0);
    let mut y = vec![0f32; t * n];
    crate::model::cpu::linear_fwd(&mut y, &x, &lin); // warm-up
    let start = std::time::Instant::now();
    let reps = 5;
    for _ in 0..reps {
        crate::model::cpu::linear_fwd(&mut y, &x, &lin);
    }
    (2 * t * n * k * reps) as f64 / start.elapsed().as_secs_f64()
}

/// FLOP/s of the CPU engine's NF4 GEMM (the forward, 256 rows through a 1024 x 1024 weight) on
/// this machine, on the path `isa`: what a step on `--device cpu` is estimated from (a step runs at
/// about 60% of it: attention, LoRA and the elementwise kernels are slower per FLOP).
pub fn measure_engine_flops(isa: crate::engine::cpu::isa::Isa) -> f64 {
    let (t, n, k) = (256, 1024, 1024);
    let mut rng = crate::util::rng::Rng::new(1);
    let lin = crate::model::cpu::Linear::dense(n, k, rng.normal_vec(n * k, 0.1), None).to_nf4();
    let x: Vec<half::bf16> = rng
        .normal_vec(t * k, 1.0)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    let mut y = vec![half::bf16::ZERO; t * n];
    crate::engine::cpu::nf4_gemm::nf4_gemm_fwd(isa, &mut y, &x, &lin, None, t); // warm-up
    let start = std::time::Instant::now();
    let reps = 10;
    for _ in 0..reps {
        crate::engine::cpu::nf4_gemm::nf4_gemm_fwd(isa, &mut y, &x, &lin, None, t);
    }
    (2 * t * n * k * reps) as f64 / start.elapsed().as_secs_f64()
}

/// Memory this machine can give the run: `MemAvailable` of /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Changes that would make the plan fit in `budget` bytes, most useful first.
pub fn suggestions(c: &ModelConfig, p: &PlanInput, budget: u64) -> Vec<String> {
    let mut out = Vec::new();
    let fits = |q: &PlanInput| plan(c, q).total() <= budget;
    if !p.checkpointing {
        let q = PlanInput {
            checkpointing: true,
            ..p.clone()
        };
        if fits(&q) {
            out.push("--checkpointing".to_string());
        }
    }
    // Smaller micro-batches that divide the current one, with gradient accumulation making up the rest.
    'outer: for b in (1..p.micro_batch).rev().filter(|b| p.micro_batch.is_multiple_of(*b)) {
        for ckpt in [p.checkpointing, true] {
            let q = PlanInput {
                micro_batch: b,
                checkpointing: ckpt,
                ..p.clone()
            };
            if fits(&q) {
                let extra = if ckpt && !p.checkpointing {
                    " --checkpointing"
                } else {
                    ""
                };
                let k = p.micro_batch / b;
                out.push(format!(
                    "--batch {b} with --grad-accum {k} times larger{extra} (same examples per step)"
                ));
                break 'outer;
            }
        }
    }
    if !p.nf4 {
        let q = PlanInput { nf4: true, ..p.clone() };
        if fits(&q) {
            out.push("drop --no-nf4".to_string());
        }
    }
    out
}

/// Whether to turn activation checkpointing on by itself: the plan without it exceeds `budget` bytes
/// and the plan with it fits. (`p.checkpointing` is ignored.)
pub fn checkpointing_needed(c: &ModelConfig, p: &PlanInput, budget: u64) -> bool {
    let with = |ckpt| {
        plan(
            c,
            &PlanInput {
                checkpointing: ckpt,
                ..p.clone()
            },
        )
        .total()
    };
    with(false) > budget && with(true) <= budget
}

/// Why the plan does not fit in `budget` bytes, with the plan and the options that would fit; `None`
/// when it fits. What `train --dry-run` prints, and the error a device run gives before allocating.
pub fn refusal(c: &ModelConfig, p: &PlanInput, budget: u64) -> Option<String> {
    let total = plan(c, p).total();
    if total <= budget {
        return None;
    }
    let fixes = suggestions(c, p, budget);
    let hint = if fixes.is_empty() {
        "a smaller --max-seq-len or --lora-r".to_string()
    } else {
        fixes.join("; or ")
    };
    Some(format!(
        "the plan needs {:.3} GiB but {:.3} GiB are available: try {hint}\n{}",
        gib(total),
        gib(budget),
        plan(c, p)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen05() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"tie_word_embeddings":true}"#,
        )
        .unwrap()
    }

    /// r 16 on all seven projections, NF4, batch 8 x 512, no checkpointing.
    fn batch_8x512(threads: usize, device: bool) -> PlanInput {
        PlanInput {
            lora_r: 16,
            lora_targets: Proj::ALL.to_vec(),
            micro_batch: 8,
            max_seq_len: 512,
            checkpointing: false,
            nf4: true,
            threads,
            device,
        }
    }

    #[test]
    fn checkpointing_is_turned_on_only_when_it_makes_the_plan_fit() {
        let c = qwen05();
        let p = batch_8x512(1, true);
        let (without, with) = (
            plan(&c, &p).total(),
            plan(
                &c,
                &PlanInput {
                    checkpointing: true,
                    ..p.clone()
                },
            )
            .total(),
        );
        assert!(with < without);
        assert!(!checkpointing_needed(&c, &p, without), "fits as it is");
        assert!(
            checkpointing_needed(&c, &p, (with + without) / 2),
            "fits only with checkpointing"
        );
        assert!(!checkpointing_needed(&c, &p, with - 1), "does not fit either way");
    }

    #[test]
    fn a_device_plan_over_budget_is_refused_with_what_would_fit() {
        let c = qwen05();
        let p = batch_8x512(1, true);
        let total = plan(&c, &p).total();
        assert!(refusal(&c, &p, total).is_none());
        let why = refusal(&c, &p, total / 2).expect("half the memory does not fit");
        assert!(why.contains("--checkpointing") && why.contains("activations"), "{why}");
    }

    #[test]
    fn nf4_and_checkpointing_shrink_the_plan_as_expected() {
        let c = qwen05();
        let p = batch_8x512(2, false);
        let a = plan(&c, &p);
        // Qwen2.5-0.5B has 357.9M linear weights: NF4 is ~0.516 bytes each.
        assert!(
            (a.base_linear as f64 / 357.9e6 - 0.516).abs() < 0.01,
            "{}",
            a.base_linear
        );
        // Its LoRA r=16 on all seven projections has 8.8M parameters: x4 tensors x4 bytes.
        assert!(
            (a.adapter_and_optimizer as f64 / 16.0 / 8.8e6 - 1.0).abs() < 0.01,
            "{}",
            a.adapter_and_optimizer
        );
        let f32_base = plan(
            &c,
            &PlanInput {
                nf4: false,
                ..p.clone()
            },
        );
        assert!(f32_base.base_linear > 7 * a.base_linear);
        let ckpt = plan(
            &c,
            &PlanInput {
                checkpointing: true,
                ..p.clone()
            },
        );
        assert!(ckpt.activations * 5 < a.activations);
        let budget = ckpt.total() + 1;
        assert!(a.total() > budget);
        assert_eq!(suggestions(&c, &p, budget)[0], "--checkpointing");
    }
}
