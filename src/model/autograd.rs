//! The autograd, limited to the adapters: a forward that records what each layer's backward needs
//! (or, with activation checkpointing, only each layer's input, recomputing the rest), the fused
//! loss, and a backward that walks the layers in reverse. Gradients flow through the frozen weights
//! to the activations (`dx = dy W`), but are only ever accumulated for LoRA A and B.
//!
//! Activation gradients are assigned; parameter gradients accumulate (`+=`), so gradient
//! accumulation over micro-batches is just calling [`forward_backward`] again with the same buffer.

use crate::load::arch::Proj;
use crate::model::cpu;
use crate::model::forward::{Attention, Dropout, LayerActs, Model};
use crate::model::lora::LoraParams;
use std::ops::Range;

/// A micro-batch: sequences packed end to end, each attending only within itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// [T] input token ids.
    pub tokens: Vec<u32>,
    /// [T] the token each position must predict (the next one), or None where there is no loss
    /// (the prompt, and the last position of each sequence).
    pub targets: Vec<Option<u32>>,
    /// [T] position of each token within its own sequence (RoPE restarts at 0 per sequence).
    pub positions: Vec<usize>,
    /// Token range of each sequence.
    pub seqs: Vec<Range<usize>>,
}

impl Batch {
    /// Pack sequences, each given as (tokens, targets) of equal length.
    pub fn pack<'a>(seqs: impl IntoIterator<Item = (&'a [u32], &'a [Option<u32>])>) -> Batch {
        let mut b = Batch::default();
        for (tokens, targets) in seqs {
            assert_eq!(
                tokens.len(),
                targets.len(),
                "a sequence needs one target slot per token"
            );
            let start = b.tokens.len();
            b.tokens.extend_from_slice(tokens);
            b.targets.extend_from_slice(targets);
            b.positions.extend(0..tokens.len());
            b.seqs.push(start..b.tokens.len());
        }
        b
    }

    /// Number of positions that carry a loss.
    pub fn label_count(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

/// How to run the backward.
#[derive(Clone, Copy, Debug, Default)]
pub struct GradOptions {
    /// Keep only each layer's input during the forward and recompute the layer in the backward.
    pub checkpointing: bool,
    /// Seed of this micro-batch's dropout masks (the rate comes from the LoRA config).
    pub dropout_seed: u64,
}

/// Loss of a batch without gradients and without dropout: the sum over labelled positions of
/// `-log p(target)` (divide by [`Batch::label_count`] for the mean). `lora: None` is the base model.
pub fn loss_sum(model: &Model, lora: Option<&LoraParams>, batch: &Batch) -> f64 {
    let c = &model.config;
    let mut x = model.embed_tokens(&batch.tokens);
    let mut acts = LayerActs::default();
    for l in 0..c.num_layers {
        acts.x_in = x;
        x = model.layer_fwd(
            l,
            &mut acts,
            &batch.positions,
            Attention::Packed(&batch.seqs),
            lora.map(|p| (p, None)),
        );
    }
    let mut h = vec![0f32; x.len()]; // [T, d]
    cpu::rmsnorm_fwd(&mut h, &x, &model.norm, c.rms_norm_eps);
    cpu::cross_entropy_fwd_bwd(None, &h, model.head(), &batch.targets, 1.0)
}

/// Forward, loss and backward of one micro-batch. Adds the gradient of `inv_count * loss_sum` with
/// respect to every adapter parameter into `grads` (same layout as `lora.data`) and returns the
/// un-normalised loss sum. Pass `inv_count = 1 / (labels in the whole optimizer step)` so that
/// accumulating micro-batches gives exactly the gradient of the step's mean loss.
pub fn forward_backward(
    model: &Model,
    lora: &LoraParams,
    batch: &Batch,
    inv_count: f32,
    opts: GradOptions,
    grads: &mut [f32],
) -> f64 {
    assert_eq!(
        grads.len(),
        lora.data.len(),
        "gradient buffer does not match the adapters"
    );
    let c = &model.config;
    let dropout = (lora.config.dropout > 0.0).then_some(Dropout {
        p: lora.config.dropout,
        seed: opts.dropout_seed,
    });
    let run_layer = |l: usize, acts: &mut LayerActs| {
        let attn = Attention::Packed(&batch.seqs);
        model.layer_fwd(l, acts, &batch.positions, attn, Some((lora, dropout)))
    };

    // Forward, keeping every layer's activations (or only its input when checkpointing).
    let mut saved: Vec<LayerActs> = Vec::with_capacity(c.num_layers);
    let mut x = model.embed_tokens(&batch.tokens); // [T, d]
    let mut scratch = LayerActs::default();
    for l in 0..c.num_layers {
        let mut acts = LayerActs {
            x_in: x,
            ..Default::default()
        };
        if opts.checkpointing {
            scratch.x_in = acts.x_in.clone();
            x = run_layer(l, &mut scratch);
        } else {
            x = run_layer(l, &mut acts);
        }
        saved.push(acts);
    }

    // Final norm and the fused loss.
    let mut h = vec![0f32; x.len()]; // [T, d]
    cpu::rmsnorm_fwd(&mut h, &x, &model.norm, c.rms_norm_eps);
    let mut dh = vec![0f32; x.len()]; // [T, d]
    let loss = cpu::cross_entropy_fwd_bwd(Some(&mut dh), &h, model.head(), &batch.targets, inv_count);
    let mut dx = vec![0f32; x.len()]; // [T, d] gradient w.r.t. the residual stream
    cpu::rmsnorm_bwd(&mut dx, &dh, &x, &model.norm, c.rms_norm_eps);

    // Backward through the layers in reverse.
    for l in (0..c.num_layers).rev() {
        let mut acts = std::mem::take(&mut saved[l]);
        if opts.checkpointing {
            run_layer(l, &mut acts);
        }
        dx = layer_bwd(
            model,
            lora,
            dropout,
            l,
            &acts,
            &batch.positions,
            &batch.seqs,
            &dx,
            grads,
        );
    }
    loss
}

/// Backward of one layer: from `dout` ([T, d], gradient of the layer output) to the gradient of its
/// input, accumulating the layer's adapter gradients into `grads`.
///   x_mid = x_in + o(attention(rope(q(h1)), rope(k(h1)), v(h1))),  h1 = rmsnorm(x_in)
///   x_out = x_mid + down(silu(gate(h2)) * up(h2)),                   h2 = rmsnorm(x_mid)
/// so d x_mid = dout + rmsnorm_bwd(gate^T(dg) + up^T(du)) and d x_in = d x_mid + rmsnorm_bwd(q^T dq + k^T dk + v^T dv).
#[allow(clippy::too_many_arguments)]
fn layer_bwd(
    model: &Model,
    lora: &LoraParams,
    dropout: Option<Dropout>,
    l: usize,
    a: &LayerActs,
    positions: &[usize],
    seqs: &[Range<usize>],
    dout: &[f32],
    grads: &mut [f32],
) -> Vec<f32> {
    let c = &model.config;
    let layer = &model.layers[l];
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let mut proj = |p: Proj, dy: &[f32], x: &[f32], dx: &mut Vec<f32>, accumulate: bool| {
        proj_bwd(
            model,
            lora,
            dropout,
            l,
            p,
            dy,
            x,
            &a.xa[p as usize],
            dx,
            accumulate,
            grads,
        )
    };

    // MLP block.
    let mut d_act = Vec::new(); // [T, f]
    proj(Proj::Down, dout, &a.act, &mut d_act, false);
    let (mut d_gate, mut d_up) = (vec![0f32; d_act.len()], vec![0f32; d_act.len()]); // [T, f]
    cpu::swiglu_bwd(&mut d_gate, &mut d_up, &d_act, &a.gate, &a.up);
    let mut dh = Vec::new(); // [T, d]
    proj(Proj::Gate, &d_gate, &a.h_mlp, &mut dh, false);
    proj(Proj::Up, &d_up, &a.h_mlp, &mut dh, true);
    let mut dx_mid = vec![0f32; dout.len()]; // [T, d]
    cpu::rmsnorm_bwd(&mut dx_mid, &dh, &a.x_mid, &layer.mlp_norm, c.rms_norm_eps);
    cpu::add_inplace(&mut dx_mid, dout);

    // Attention block.
    let mut d_att = Vec::new(); // [T, h, hd]
    proj(Proj::O, &dx_mid, &a.att, &mut d_att, false);
    let mut dq = vec![0f32; a.q.len()]; // [T, h, hd]
    let mut dk = vec![0f32; a.k.len()]; // [T, h_kv, hd]
    let mut dv = vec![0f32; a.v.len()]; // [T, h_kv, hd]
    for s in seqs {
        let (qr, kr) = (s.start * qd..s.end * qd, s.start * kvd..s.end * kvd);
        cpu::attention_bwd(
            &mut dq[qr.clone()],
            &mut dk[kr.clone()],
            &mut dv[kr.clone()],
            &d_att[qr.clone()],
            &a.q[qr],
            &a.k[kr.clone()],
            &a.v[kr],
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
        );
    }
    cpu::rope_bwd(&mut dq, positions, &model.inv_freq, c.num_heads);
    cpu::rope_bwd(&mut dk, positions, &model.inv_freq, c.num_kv_heads);
    proj(Proj::Q, &dq, &a.h_attn, &mut dh, false);
    proj(Proj::K, &dk, &a.h_attn, &mut dh, true);
    proj(Proj::V, &dv, &a.h_attn, &mut dh, true);
    let mut dx_in = vec![0f32; dout.len()]; // [T, d]
    cpu::rmsnorm_bwd(&mut dx_in, &dh, &a.x_in, &layer.attn_norm, c.rms_norm_eps);
    cpu::add_inplace(&mut dx_in, &dx_mid);
    dx_in
}

/// Backward of one projection `y = x W^T + b + s (dropout(x) A^T) B^T`:
///   dx = dy W + dropout'(s (dy B) A),  dA += s (dy B)^T dropout(x),  dB += s dy^T (dropout(x) A^T)
/// dx: [T, in] (assigned, or added to when `accumulate`), dy: [T, out], x: [T, in], xa: [T, r].
#[allow(clippy::too_many_arguments)]
fn proj_bwd(
    model: &Model,
    lora: &LoraParams,
    dropout: Option<Dropout>,
    l: usize,
    p: Proj,
    dy: &[f32],
    x: &[f32],
    xa: &[f32],
    dx: &mut Vec<f32>,
    accumulate: bool,
    grads: &mut [f32],
) {
    let mut d = vec![0f32; x.len()]; // [T, in]
    cpu::linear_bwd_input(&mut d, dy, model.layers[l].proj(p));
    if let Some(slot) = lora.slot(l, p) {
        let xd = Dropout::apply(dropout, l, p, x);
        let (a, b) = (&lora.data[slot.a.clone()], &lora.data[slot.b.clone()]);
        // A precedes B in the buffer: split there to borrow both gradients at once.
        let (head, tail) = grads.split_at_mut(slot.b.start);
        let (da, db) = (&mut head[slot.a.clone()], &mut tail[..slot.b.len()]);
        let mut dx_lora = vec![0f32; x.len()]; // [T, in]
        cpu::lora_bwd(
            &mut dx_lora,
            da,
            db,
            dy,
            &xd,
            xa,
            a,
            b,
            lora.config.r,
            lora.config.scale(),
        );
        let dx_lora = Dropout::apply(dropout, l, p, &dx_lora);
        cpu::add_inplace(&mut d, &dx_lora);
    }
    if accumulate {
        cpu::add_inplace(dx, &d);
    } else {
        *dx = d;
    }
}
