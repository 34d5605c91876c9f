//! `--device`: where a command runs, resolved once for every binary (`train`, and `sqlora`'s `ask`,
//! `predict` and `bench`).

use super::host::Host;
use super::step::Engine;
use crate::backend::cuda::{self, Cuda};
use crate::lora::LoraParams;
use crate::model::Model;
use crate::train::StepEngine;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Where the work runs.
#[derive(Clone)]
pub enum Target {
    /// The f32 reference on the CPU (no device engine).
    Cpu,
    /// The device engine on the CPU, storing what the kernels store in bf16 (`engine::host::Host`).
    CpuBf16,
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

impl Target {
    /// Resolve `--device NAME`: `cpu`, `cpu-bf16`, `cuda` (an error saying why when the GPU cannot be
    /// used) or `auto` (the GPU when it opens, else `fallback`, with the reason on stderr).
    pub fn open(name: &str, fallback: Target) -> Result<Target> {
        Ok(match name {
            "cpu" => Target::Cpu,
            "cpu-bf16" => Target::CpuBf16,
            "cuda" => Target::Cuda(Box::new(open_gpu().context("--device cuda")?)),
            "auto" => match open_gpu() {
                Ok(gpu) => Target::Cuda(Box::new(gpu)),
                Err(why) => {
                    eprintln!("running on {}: {why:#}", fallback.describe());
                    fallback
                }
            },
            other => bail!("unknown device \"{other}\": one of auto, cuda, cpu, cpu-bf16"),
        })
    }

    /// What runs where, in a few words.
    pub fn describe(&self) -> &'static str {
        match self {
            Target::Cpu => "the CPU reference backend",
            Target::CpuBf16 => "the device engine on the CPU (bf16 storage)",
            Target::Cuda(_) => "the GPU",
        }
    }

    /// Whether steps and generation run on a device engine (everything but the f32 reference).
    pub fn on_engine(&self) -> bool {
        !matches!(self, Target::Cpu)
    }

    /// The GPU, if this is it.
    pub fn gpu(&self) -> Option<&Cuda> {
        match self {
            Target::Cuda(g) => Some(g.as_ref()),
            Target::Cpu | Target::CpuBf16 => None,
        }
    }

    /// Load a model for this target: projections quantized to NF4 as they are read when `nf4` or on
    /// a device engine (which needs NF4), on the GPU when there is one (the same bytes as the CPU's).
    pub fn load_model(&self, path: &Path, nf4: bool) -> Result<Model> {
        match self.gpu() {
            Some(g) => {
                let model = Model::load_with(path, Some(&|w: &[f32], s: &[usize]| g.quantize_to_host(w, s)))?;
                // The quantizer's buffers go back to the driver's pool at a synchronize: free
                // memory reads true afterwards (the memory plan is checked against it).
                g.stream.synchronize().context("waiting for the GPU")?;
                Ok(model)
            }
            None => Model::load_as(path, nf4 || self.on_engine()),
        }
    }

    /// A device engine for `model` with the adapter layout of `lora` and room for `cap` tokens per
    /// micro-batch; `None` for the f32 reference.
    pub fn engine(
        &self,
        model: &Model,
        lora: &LoraParams,
        cap: usize,
        checkpointing: bool,
    ) -> Result<Option<Box<dyn StepEngine>>> {
        if self.gpu().is_some() && lora.config.r > cuda::MAX_RANK {
            bail!(
                "LoRA rank {} is over the {} the GPU kernels take: use --lora-r {} or less",
                lora.config.r,
                cuda::MAX_RANK,
                cuda::MAX_RANK
            );
        }
        Ok(match self {
            Target::Cpu => None,
            Target::CpuBf16 => Some(Box::new(Engine::new(Host, model, lora, cap, checkpointing)?)),
            Target::Cuda(g) => Some(Box::new(Engine::new((**g).clone(), model, lora, cap, checkpointing)?)),
        })
    }
}
