//! The f32 reference as an engine: [`crate::model::forward::Model`]'s forward pass, [`crate::model::autograd`]'s
//! adapter-only backward, the host [`AdamW`] and [`crate::model::generate`]'s decoding, behind the same
//! [`StepEngine`] as the device engines. What it computes is the specification the others are
//! checked against; here it is only put behind the interface, not changed.

use super::api::{ProfileRow, StepEngine};
use crate::model::autograd::{forward_backward, loss_sum, Batch, GradOptions};
use crate::model::forward::Model;
use crate::model::generate::{candidates, greedy_batch, Constraint, Sampling, DECODE_GROUP};
use crate::model::lora::LoraParams;
use crate::model::optim::{grad_norm, scale, AdamW, HostPages, StatePages, PAGE};
use anyhow::{ensure, Result};
use std::sync::Arc;

/// The reference engine: the model (shared with whoever loaded it), the adapters being trained and
/// their f32 gradients.
pub struct Reference {
    model: Arc<Model>,
    /// The current adapters (the layout given at the start, then [`StepEngine::to_device`]'s;
    /// updated by each AdamW step).
    lora: LoraParams,
    /// [lora.len()] gradients accumulated since the last update.
    grads: Vec<f32>,
    constraint: Option<Arc<dyn Constraint>>,
}

impl Reference {
    /// An engine for `model` with the adapter layout of `lora`.
    pub fn new(model: Arc<Model>, lora: &LoraParams) -> Reference {
        Reference {
            model,
            grads: vec![0f32; lora.len()],
            lora: lora.clone(),
            constraint: None,
        }
    }
}

impl StepEngine for Reference {
    fn describe(&self) -> String {
        "the CPU reference (f32)".to_string()
    }
    fn loss_sum(&mut self, lora: Option<&LoraParams>, batch: &Batch) -> Result<f64> {
        Ok(loss_sum(&self.model, lora, batch))
    }
    fn start_optimizer(&mut self) -> Result<Box<dyn StatePages + Send>> {
        Ok(Box::new(HostPages::new(self.lora.len(), PAGE)))
    }
    fn to_device(&mut self, lora: &LoraParams) -> Result<()> {
        ensure!(lora.len() == self.lora.len(), "adapter layouts differ");
        self.lora.data.copy_from_slice(&lora.data);
        Ok(())
    }
    fn to_host(&mut self, lora: &mut LoraParams, _opt: &mut AdamW) -> Result<()> {
        // The moments are the host's own (`adamw_update` updates them in place).
        ensure!(lora.len() == self.lora.len(), "adapter layouts differ");
        lora.data.copy_from_slice(&self.lora.data);
        Ok(())
    }
    fn accumulate(&mut self, batch: &Batch, inv_count: f32, opts: GradOptions) -> Result<f64> {
        Ok(forward_backward(
            &self.model,
            &self.lora,
            batch,
            inv_count,
            opts,
            &mut self.grads,
        ))
    }
    fn grad_norm(&mut self) -> Result<f32> {
        Ok(grad_norm(&self.grads))
    }
    fn adamw_update(&mut self, opt: &mut AdamW, lr: f32, gscale: f32) -> Result<()> {
        if gscale < 1.0 {
            scale(&mut self.grads, gscale);
        }
        opt.update(&mut self.lora.data, &self.grads, lr);
        self.grads.fill(0.0);
        Ok(())
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill(0.0);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn generate(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stops: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        // A few prompts at a time, decoded together (they share each read of the weights).
        let mut outs = Vec::with_capacity(prompts.len());
        for (k, group) in prompts.chunks(DECODE_GROUP).enumerate() {
            let c = self.constraint.as_deref().map(|c| (c, k * DECODE_GROUP));
            outs.extend(greedy_batch(&self.model, lora, group, max_new, stops, c));
        }
        Ok(outs)
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
        Ok((prompts.iter().enumerate())
            .map(|(i, p)| {
                let c = self.constraint.as_deref();
                candidates(&self.model, lora, p, n, max_new, stops, sampling, i, c)
            })
            .collect())
    }
    fn set_constraint(&mut self, c: Option<Arc<dyn Constraint>>) {
        self.constraint = c;
    }
    fn memory_used(&self) -> Option<usize> {
        None
    }
    fn graph_replays(&self) -> usize {
        0
    }
    fn set_profiling(&self, _on: bool) {}
    fn take_profile(&self) -> Result<Vec<ProfileRow>> {
        Ok(Vec::new())
    }
}
