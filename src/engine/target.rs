//! `--device`: where a command runs, resolved once for every binary (`train`, and `sqlora`'s `ask`,
//! `predict` and `bench`). Every target gives an engine behind [`StepEngine`]; past this file no
//! caller asks which one it has.

use super::api::StepEngine;
use super::cpu::Cpu;
use super::host::Host;
use super::reference::Reference;
use super::step::Engine;
use crate::engine::cuda::{self, Cuda};
use crate::load::ModelSource;
use crate::model::forward::Model;
use crate::model::lora::{LoraConfig, LoraParams};
use crate::model::nf4::Nf4Tensor;
use anyhow::{bail, Context, Result};
use std::sync::Arc;

/// Where the work runs.
#[derive(Clone)]
pub enum Target {
    /// The f32 reference on the CPU (`engine::reference`).
    Reference,
    /// The device engine on the CPU, storing what the kernels store in bf16 (`engine::host::Host`).
    CpuBf16,
    /// The device engine on the CPU with its SIMD kernels (`engine::cpu`): what `cpu` and `auto`
    /// without a GPU run.
    CpuSimd(Cpu),
    /// The device engine on GPU 0, opened.
    Cuda(Box<Cuda>),
}

/// GPU 0 with our kernels, or why not.
fn open_gpu() -> Result<Cuda> {
    if let Some(why) = cuda::unavailable() {
        bail!("{why}");
    }
    Cuda::new()
}

/// Most tokens a generation engine runs per prefill chunk: room for a dozen Spider prompts with their
/// schemas, while the engine (forward only, one layer's activations; the KV cache comes on top)
/// plans about 2 GiB for a 0.5B model and 12 GiB for an 8B one.
const GENERATION_CAP: usize = 8192;

impl Target {
    /// The CPU engine (SIMD kernels, the best path this CPU runs or the one `SQLORA_CPU_ISA` names).
    pub fn cpu() -> Result<Target> {
        Ok(Target::CpuSimd(Cpu::new().context("--device cpu")?))
    }

    /// Resolve `--device NAME`: `cpu` (the CPU engine; `cpu-simd` is another name for it),
    /// `reference` (the f32 reference), `cpu-bf16` (the device step with the host device's f32
    /// arithmetic rounded to bf16, for checks), `cuda` (an error saying why when the GPU cannot be
    /// used) or `auto` (the GPU when it opens, else `fallback`, with the reason on stderr).
    pub fn open(name: &str, fallback: Target) -> Result<Target> {
        Ok(match name {
            "reference" => Target::Reference,
            "cpu" | "cpu-simd" => Target::cpu()?,
            "cpu-bf16" => Target::CpuBf16,
            "cuda" => Target::Cuda(Box::new(open_gpu().context("--device cuda")?)),
            "auto" => match open_gpu() {
                Ok(gpu) => Target::Cuda(Box::new(gpu)),
                Err(why) => {
                    eprintln!("running on {}: {why:#}", fallback.describe());
                    fallback
                }
            },
            other => bail!("unknown device \"{other}\": one of auto, cuda, cpu, reference, cpu-bf16"),
        })
    }

    /// What runs where, in a few words.
    pub fn describe(&self) -> &'static str {
        match self {
            Target::Reference => "the f32 reference on the CPU",
            Target::CpuBf16 => "the device step on the CPU with the host device's arithmetic (bf16 storage)",
            Target::CpuSimd(_) => "the CPU engine",
            Target::Cuda(_) => "the GPU",
        }
    }

    /// Whether the engine stores activations as the kernels do (bf16; everything but the f32
    /// reference): what the memory plan counts.
    pub fn stores_bf16(&self) -> bool {
        !matches!(self, Target::Reference)
    }

    /// The GPU, if this is it.
    pub fn gpu(&self) -> Option<&Cuda> {
        match self {
            Target::Cuda(g) => Some(g.as_ref()),
            Target::Reference | Target::CpuBf16 | Target::CpuSimd(_) => None,
        }
    }

    /// Load a model for this target: projections quantized to NF4 as they are read when `nf4` or on
    /// a device engine (which needs NF4), on the GPU when there is one (the same bytes as the CPU's).
    pub fn load_model(&self, source: &ModelSource, nf4: bool) -> Result<Model> {
        let cpu = |w: &[f32], shape: &[usize]| Ok(Nf4Tensor::quantize(w, shape));
        match self.gpu() {
            Some(g) => {
                let model = Model::from_source(source, Some(&|w: &[f32], s: &[usize]| g.quantize_to_host(w, s)))?;
                // The quantizer's buffers go back to the driver's pool at a synchronize: free
                // memory reads true afterwards (the memory plan is checked against it).
                g.stream.synchronize().context("waiting for the GPU")?;
                Ok(model)
            }
            // Quantized on the CPU: the NF4 cache keeps the result for the next run.
            None if nf4 || self.stores_bf16() => match crate::model::nf4_cache::default_dir() {
                Some(dir) if crate::model::nf4_cache::worth_caching(&source.config) => {
                    crate::model::nf4_cache::load(source, &cpu, &dir)
                }
                _ => Model::from_source(source, Some(&cpu)),
            },
            None => Model::from_source(source, None),
        }
    }

    /// The engine for `model` with the adapter layout of `lora` and room for `cap` tokens per
    /// micro-batch (the device engines size their buffers once, for it).
    pub fn engine(
        &self,
        model: &Arc<Model>,
        lora: &LoraParams,
        cap: usize,
        checkpointing: bool,
    ) -> Result<Box<dyn StepEngine>> {
        if self.gpu().is_some() && lora.config.r > cuda::MAX_RANK {
            bail!(
                "LoRA rank {} is over the {} the GPU kernels take: use --lora-r {} or less",
                lora.config.r,
                cuda::MAX_RANK,
                cuda::MAX_RANK
            );
        }
        Ok(match self {
            Target::Reference => Box::new(Reference::new(model.clone(), lora)),
            Target::CpuBf16 => Box::new(Engine::new(Host, model, lora, cap, checkpointing)?),
            Target::CpuSimd(cpu) => Box::new(Engine::new(cpu.clone(), model, lora, cap, checkpointing)?),
            Target::Cuda(g) => Box::new(Engine::new((**g).clone(), model, lora, cap, checkpointing)?),
        })
    }

    /// An engine for generating from `prompts`, each `n` times, with `lora`'s layout (an empty
    /// layout without one). A device engine keeps one layer's activations (generation has no
    /// backward) and holds as many prompts per chunk as fit in [`GENERATION_CAP`] tokens. On the
    /// reference, an NF4 base keeps its NF4-rounded values but stored decoded, so generation decodes
    /// no weights per token (the same outputs bit for bit).
    pub fn generation_engine(
        &self,
        model: Model,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        n: usize,
    ) -> Result<Box<dyn StepEngine>> {
        let model = Arc::new(match self {
            Target::Reference => model.nf4_decoded(),
            Target::CpuBf16 | Target::CpuSimd(_) | Target::Cuda(_) => model,
        });
        let layout = lora.cloned().unwrap_or_else(|| {
            let none = LoraConfig {
                targets: vec![],
                ..Default::default()
            };
            LoraParams::zeros(&model.config, none)
        });
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let total = prompts.iter().map(Vec::len).sum::<usize>() * n;
        let cap = total.clamp(longest, longest.max(GENERATION_CAP));
        let engine = self.engine(&model, &layout, cap, true)?;
        eprintln!("generating on {}", engine.describe());
        Ok(engine)
    }
}
