//! The one interface every engine answers to: the f32 reference ([`super::reference`]) and the
//! device engines ([`super::step::Engine`] over the CUDA kernels or the bf16 host device). The
//! training loop, `predict`, `eval` and `bench` hold a `Box<dyn StepEngine>` and never ask which
//! one it is.

use super::plan::OPTIMIZER_WINDOW;
use super::step::Engine;
use super::Device;
use crate::model::autograd::{Batch, GradOptions};
use crate::model::generate::{Constraint, Sampling};
use crate::model::lora::LoraParams;
use crate::model::optim::{AdamW, StatePages, PAGE};
use anyhow::Result;
use serde::Serialize;
use std::sync::Arc;

/// One row of `sqlora selftest`: a kernel on some inputs against its reference, as
/// ‖out − ref‖ / ‖ref‖ and the tolerance it must meet.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub op: String,
    pub size: String,
    pub rel_err: f64,
    pub tolerance: f64,
    pub pass: bool,
}

/// One kernel's (or cuBLAS call's) share of the profiled work.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileRow {
    pub name: String,
    pub calls: u64,
    pub ms: f64,
}

/// A training step, validation loss and generation on some engine, behind one object-safe interface.
///
/// The adapters live in the engine during training: [`StepEngine::to_device`] gives it the host's,
/// [`StepEngine::accumulate`] adds one micro-batch's gradients, [`StepEngine::grad_norm`] and
/// [`StepEngine::adamw_update`] finish the step, and [`StepEngine::to_host`] brings the adapters
/// (and moments the engine holds) back for checkpoints and evaluations.
pub trait StepEngine {
    /// One line naming where the work runs.
    fn describe(&self) -> String;
    /// Summed loss over the batch's labelled tokens, without dropout (as `autograd::loss_sum`).
    fn loss_sum(&mut self, lora: Option<&LoraParams>, batch: &Batch) -> Result<f64>;
    /// Give the engine its paged AdamW (`PAGE`, `OPTIMIZER_WINDOW`); returns zeroed host pages of
    /// the engine's kind (pinned on a GPU) for the moments.
    fn start_optimizer(&mut self) -> Result<Box<dyn StatePages + Send>>;
    /// Make `lora` the engine's adapters and have the optimizer take the host's moments.
    fn to_device(&mut self, lora: &LoraParams) -> Result<()>;
    /// The engine's adapters and moments into `lora` and `opt`.
    fn to_host(&mut self, lora: &mut LoraParams, opt: &mut AdamW) -> Result<()>;
    /// Add one micro-batch's gradients (scaled by `inv_count`) into the engine's; returns the
    /// micro-batch's summed loss.
    fn accumulate(&mut self, batch: &Batch, inv_count: f32, opts: GradOptions) -> Result<f64>;
    /// Global L2 norm of the accumulated gradients.
    fn grad_norm(&mut self) -> Result<f32>;
    /// The AdamW update, gradients scaled by `gscale` (the clipping factor) first; zeroes the
    /// gradients.
    fn adamw_update(&mut self, opt: &mut AdamW, lr: f32, gscale: f32) -> Result<()>;
    /// Drop the accumulated gradients (a skipped step).
    fn zero_grads(&mut self) -> Result<()>;
    /// Wait until the engine has done all the work queued.
    fn synchronize(&self) -> Result<()>;
    /// Greedy continuations, as `generate::greedy` for each prompt.
    fn generate(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stops: &[u32],
    ) -> Result<Vec<Vec<u32>>>;
    /// `n` continuations of each prompt, greedy first, as `generate::candidates`.
    fn generate_candidates(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        n: usize,
        max_new: usize,
        stops: &[u32],
        sampling: &Sampling,
    ) -> Result<Vec<Vec<Vec<u32>>>>;
    /// Have `generate` and `generate_candidates` ask `c` before taking each token (the prompts of
    /// each call numbered from 0, the candidates of a prompt sharing its number); `None`: no
    /// constraint.
    fn set_constraint(&mut self, c: Option<Arc<dyn Constraint>>);
    /// Device memory in use, where the engine can tell.
    fn memory_used(&self) -> Option<usize>;
    /// Decoding steps so far that replayed a recorded graph.
    fn graph_replays(&self) -> usize;
    /// Bytes of weights one decoding step reads, where the engine holds them in a fixed form
    /// ([`Engine::decode_weight_bytes`]).
    fn decode_weight_bytes(&self) -> Option<usize> {
        None
    }
    /// Per-kernel timing on or off ([`Device::set_profiling`]).
    fn set_profiling(&self, on: bool);
    /// The kernels' times since the last call ([`Device::take_profile`]).
    fn take_profile(&self) -> Result<Vec<ProfileRow>>;
}

impl<D: Device> StepEngine for Engine<D> {
    fn describe(&self) -> String {
        match self.head_is_q8() {
            true => format!("{}; output head Q8_0 as in the file", self.dev.describe()),
            false => self.dev.describe(),
        }
    }
    fn loss_sum(&mut self, lora: Option<&LoraParams>, batch: &Batch) -> Result<f64> {
        Engine::loss_sum(self, lora, batch)
    }
    fn start_optimizer(&mut self) -> Result<Box<dyn StatePages + Send>> {
        self.enable_optimizer(PAGE, OPTIMIZER_WINDOW)?;
        self.dev.state_pages(self.adapter_len(), PAGE)
    }
    fn to_device(&mut self, lora: &LoraParams) -> Result<()> {
        self.upload_adapters(lora)?;
        self.load_optimizer()
    }
    fn to_host(&mut self, lora: &mut LoraParams, opt: &mut AdamW) -> Result<()> {
        self.download_adapters(lora)?;
        self.save_optimizer(opt)
    }
    fn accumulate(&mut self, batch: &Batch, inv_count: f32, opts: GradOptions) -> Result<f64> {
        Engine::accumulate(self, batch, inv_count, opts)
    }
    fn grad_norm(&mut self) -> Result<f32> {
        Engine::grad_norm(self)
    }
    fn adamw_update(&mut self, opt: &mut AdamW, lr: f32, gscale: f32) -> Result<()> {
        Engine::adamw_update(self, opt, lr, gscale)
    }
    fn zero_grads(&mut self) -> Result<()> {
        Engine::zero_grads(self)
    }
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }
    fn generate(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stops: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        Engine::generate(self, lora, prompts, max_new, stops)
    }
    fn generate_candidates(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        n: usize,
        max_new: usize,
        stops: &[u32],
        sampling: &Sampling,
    ) -> Result<Vec<Vec<Vec<u32>>>> {
        Engine::generate_candidates(self, lora, prompts, n, max_new, stops, sampling)
    }
    fn set_constraint(&mut self, c: Option<Arc<dyn Constraint>>) {
        self.constraint = c;
    }
    fn memory_used(&self) -> Option<usize> {
        self.dev.memory_used()
    }
    fn graph_replays(&self) -> usize {
        self.graph_replays
    }
    fn decode_weight_bytes(&self) -> Option<usize> {
        Some(Engine::decode_weight_bytes(self))
    }
    fn set_profiling(&self, on: bool) {
        self.dev.set_profiling(on)
    }
    fn take_profile(&self) -> Result<Vec<ProfileRow>> {
        self.dev.take_profile()
    }
}
