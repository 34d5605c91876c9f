//! The training step on a [`Device`]: the model uploaded once (NF4 projections, bf16 embedding, norms
//! and head), every buffer sized once for the largest micro-batch, and a forward + fused loss +
//! adapter-only backward that mirrors `autograd::forward_backward` op for op.
//!
//! The adapters live on the device in three flat buffers in `LoraParams::data`'s layout: f32
//! masters, their bf16 copies (what the LoRA kernels read) and f32 gradients. Training accumulates
//! gradients there over a step's micro-batches ([`Engine::accumulate`]) and updates the masters with
//! the paged AdamW of `engine::step::optim`; the host sees the adapters only when it asks
//! ([`Engine::download_adapters`], for checkpoints and evaluation). [`Engine::forward_backward`] is
//! the one-call form the tests and the selftest use: upload, accumulate, read the gradients back.

pub mod generate;
mod layer;
pub mod optim;

use crate::engine::plan::{PlanInput, CE_CHUNK_BYTES};
use crate::engine::{to_bf16, Bf, Device, Q8Head, F32};
use crate::load::arch::Proj;
use crate::load::config::ModelConfig;
use crate::model::autograd::{Batch, GradOptions};
use crate::model::cpu::LinearWeight;
use crate::model::forward::{Dropout, Model};
use crate::model::generate::Constraint;
use crate::model::lora::LoraAt;
use crate::model::lora::LoraParams;
use crate::model::q8::Q8Tensor;
use anyhow::{bail, ensure, Context, Result};
use layer::Attn;
use std::sync::Arc;

/// One layer's frozen weights on the device.
struct DeviceLayer<D: Device> {
    attn_norm: Bf<D>, // [d]
    mlp_norm: Bf<D>,  // [d]
    /// In the order of [`Proj::ALL`]; each [out, in] NF4.
    proj: Vec<D::Nf4>,
    /// [out] per projection, where the config has biases.
    bias: Vec<Option<Bf<D>>>,
}

impl<D: Device> DeviceLayer<D> {
    /// Bytes its weights hold: norms, NF4 projections, biases.
    fn bytes(&self) -> usize {
        let proj = self.proj.iter().map(D::nf4_bytes).sum::<usize>();
        let bias = self.bias.iter().flatten().map(|b| D::bytes(b)).sum::<usize>();
        proj + bias + D::bytes(&self.attn_norm) + D::bytes(&self.mlp_norm)
    }
}

/// Every adapter A and B in one flat buffer of each kind, in `LoraParams::data`'s layout ([`LoraAt`]
/// says where a projection's lie): one copy, one cast, one optimizer launch for all of them.
struct AdapterBufs<D: Device> {
    master: F32<D>, // [N] f32 masters, which the optimizer updates
    w: Bf<D>,       // [N] their bf16 copies, which the LoRA kernels read
    grad: F32<D>,   // [N] gradients, accumulated over a step's micro-batches
    len: usize,     // N
}

/// What a layer's forward keeps for its backward (one set per layer, or one in all with
/// checkpointing). Every buffer holds `cap` rows.
struct LayerBufs<D: Device> {
    rstd_attn: F32<D>, // [T] of rmsnorm(x_in)
    q: Bf<D>,          // [T, h, hd] after RoPE
    k: Bf<D>,          // [T, h_kv, hd] after RoPE
    v: Bf<D>,          // [T, h_kv, hd]
    att: Bf<D>,        // [T, h, hd]
    lse: F32<D>,       // [T, h] log-sum-exp of each attention row
    x_mid: Bf<D>,      // [T, d]
    rstd_mlp: F32<D>,  // [T] of rmsnorm(x_mid)
    gate: Bf<D>,       // [T, f]
    up: Bf<D>,         // [T, f]
    xa: Vec<F32<D>>,   // per projection [T, r]
}

/// Scratch of the backward and the loss, `cap` rows each; `w` = max(d, q_dim, f).
struct Scratch<D: Device> {
    tokens: D::Buf<i32>,    // [T]
    positions: D::Buf<i32>, // [T]
    seq_start: D::Buf<i32>, // [T]
    labels: D::Buf<i32>,    // [L] positions with a target (L <= T)
    targets: D::Buf<i32>,   // [L] their targets
    h: Bf<D>,               // [T, d] final norm output
    rstd: F32<D>,           // [T]
    h_lab: Bf<D>,           // [L, d] h at the labelled positions
    dh_lab: Bf<D>,          // [L, d]
    logits: F32<D>,         // [ce_rows, V] one chunk of rows
    dlogits: Bf<D>,         // [ce_rows, V]
    loss: F32<D>,           // [L]
    dx: Bf<D>,              // [T, d] gradient of a layer's output
    dx_in: Bf<D>,           // [T, d] gradient of its input
    dx_mid: Bf<D>,          // [T, d]
    dh: Bf<D>,              // [T, d]
    /// [T, d] rmsnorm(x_in), then rmsnorm(x_mid): the projections' input, made in the forward and
    /// made again in the backward from the kept x_in, x_mid and their rstd (cheaper than keeping it
    /// per layer).
    h_norm: Bf<D>,
    /// [T] the rstd of that recomputation (equal to the kept one).
    rstd_norm: F32<D>,
    /// [T, f] silu(gate) up: the down projection's input, made in the forward and made again in the
    /// backward from the kept gate and up (cheaper than keeping it per layer).
    act: Bf<D>,
    d_act: Bf<D>,  // [T, f]
    d_gate: Bf<D>, // [T, f]
    d_up: Bf<D>,   // [T, f]
    d_att: Bf<D>,  // [T, h, hd]
    dq: Bf<D>,     // [T, h, hd]
    dk: Bf<D>,     // [T, h_kv, hd]
    dv: Bf<D>,     // [T, h_kv, hd]
    dd: F32<D>,    // [T, h] dO . O per attention row
    ps: ProjScratch<D>,
    /// [T, w] dropout(x) in the forward.
    xd: Bf<D>,
}

/// Scratch of one projection's backward; `w` = max(d, q_dim, f).
struct ProjScratch<D: Device> {
    g: F32<D>,    // [T, r] dy B
    tmp: Bf<D>,   // [T, w] the projection's dx before it is added
    xd: Bf<D>,    // [T, w] dropout(x), then the masked LoRA dx
    dlora: Bf<D>, // [T, w] the LoRA dx before dropout
}

/// A model on a device, ready to run training steps of up to `cap` tokens.
pub struct Engine<D: Device> {
    pub dev: D,
    config: ModelConfig,
    embed: Bf<D>,           // [vocab, d]
    lm_head: Option<Bf<D>>, // [vocab, d] when untied
    /// The head (lm_head, or the embedding when tied) as Q8_0 where its values are Q8_0 (a GGUF's)
    /// and the device has the kernel: generation's logits read it instead of the bf16 copy.
    head_q8: Option<Q8Head<D>>,
    norm: Bf<D>,      // [d]
    inv_freq: F32<D>, // [hd/2]
    layers: Vec<DeviceLayer<D>>,
    /// Per layer, per projection (in [`Proj::ALL`] order): where its adapter lies, if it has one.
    slots: Vec<[Option<LoraAt>; 7]>,
    adapters: AdapterBufs<D>,
    rank: usize,
    scale: f32,
    /// LoRA dropout probability of the adapters.
    dropout: f32,
    /// The paged AdamW, once [`Engine::enable_optimizer`] has sized its window.
    opt: Option<optim::DeviceOptim<D>>,
    /// Residual stream: xs[l] is layer l's input, xs[L] the last layer's output. [T, d] each.
    xs: Vec<Bf<D>>,
    acts: Vec<LayerBufs<D>>,
    s: Scratch<D>,
    cap: usize,
    /// Labelled rows per chunk of the loss (bounds the [rows, V] logits buffer).
    ce_rows: usize,
    /// Labelled positions of the batch in the buffers.
    n_labels: usize,
    checkpointing: bool,
    /// The KV cache of generation, allocated on first use.
    gen: Option<generate::GenCache<D>>,
    /// Decoding steps run by replaying a recorded graph (for the selftest and benchmarks).
    pub graph_replays: usize,
    /// What generation may say ([`crate::engine::api::StepEngine::set_constraint`]).
    pub constraint: Option<Arc<dyn Constraint>>,
}

/// Projection p of layer l uploaded as NF4 (quantized on the device if the model holds it dense).
fn upload_proj<D: Device>(dev: &D, model: &Model, l: usize, p: Proj) -> Result<D::Nf4> {
    let lin = model.layers[l].proj(p);
    match &lin.weight {
        LinearWeight::Nf4(q) => dev.upload_nf4(q),
        LinearWeight::Dense(w) => dev.upload_nf4(&dev.quantize_nf4(w, &[lin.out_features, lin.in_features])?),
    }
}

fn dense_bf16<D: Device>(dev: &D, lin: &crate::model::cpu::Linear, what: &str) -> Result<Bf<D>> {
    match &lin.weight {
        LinearWeight::Dense(w) => dev.upload_vec(to_bf16(w)),
        LinearWeight::Nf4(_) => bail!("{what} must be dense"),
    }
}

/// Refuse a run whose device plan exceeds the device's free memory, up front, with the plan and
/// the options that would fit, rather than fail half-way through allocating.
pub fn ensure_fits<D: Device>(dev: &D, c: &ModelConfig, input: &PlanInput) -> Result<()> {
    if let Some(free) = dev.memory_free() {
        if let Some(why) = crate::engine::plan::refusal(c, input, free as u64) {
            bail!("out of device memory on {}: {why}", dev.describe());
        }
    }
    Ok(())
}

impl<D: Device> Engine<D> {
    /// Upload `model` (its projections quantized to NF4 if they are not already) and the adapter
    /// layout of `lora`, and size every buffer for micro-batches of up to `cap` tokens.
    pub fn new(dev: D, model: &Model, lora: &LoraParams, cap: usize, checkpointing: bool) -> Result<Engine<D>> {
        let c = model.config.clone();
        let (d, f, qd, kvd, r) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim(), lora.config.r);
        ensure!(cap > 0, "the step needs room for at least one token");
        let input = PlanInput {
            lora_r: r,
            lora_targets: lora.config.targets.clone(),
            micro_batch: 1,
            max_seq_len: cap,
            checkpointing,
            nf4: true,
            threads: 1,
            device: true,
        };
        ensure_fits(&dev, &c, &input)?;
        dev.prepare_attention(c.head_dim)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let layer = &model.layers[l];
            let mut proj = Vec::with_capacity(7);
            let mut bias = Vec::with_capacity(7);
            for p in Proj::ALL {
                let name = p.path(l);
                proj.push(upload_proj(&dev, model, l, p).with_context(|| format!("uploading {name}"))?);
                bias.push(
                    layer
                        .proj(p)
                        .bias
                        .as_ref()
                        .map(|b| dev.upload(&to_bf16(b)))
                        .transpose()?,
                );
            }
            layers.push(DeviceLayer {
                attn_norm: dev.upload(&to_bf16(&layer.attn_norm))?,
                mlp_norm: dev.upload(&to_bf16(&layer.mlp_norm))?,
                proj,
                bias,
            });
        }
        let slots = (lora.slots.iter())
            .map(|layer| layer.each_ref().map(|s| s.as_ref().map(LoraAt::of)))
            .collect();
        let n = lora.data.len();
        let adapters = AdapterBufs {
            master: dev.alloc(n)?,
            w: dev.alloc(n)?,
            grad: dev.alloc(n)?,
            len: n,
        };
        let n_acts = if checkpointing { 1 } else { c.num_layers };
        let mut acts = Vec::with_capacity(n_acts);
        for _ in 0..n_acts {
            acts.push(LayerBufs {
                rstd_attn: dev.alloc(cap)?,
                q: dev.alloc(cap * qd)?,
                k: dev.alloc(cap * kvd)?,
                v: dev.alloc(cap * kvd)?,
                att: dev.alloc(cap * qd)?,
                lse: dev.alloc(cap * c.num_heads)?,
                x_mid: dev.alloc(cap * d)?,
                rstd_mlp: dev.alloc(cap)?,
                gate: dev.alloc(cap * f)?,
                up: dev.alloc(cap * f)?,
                xa: (0..7).map(|_| dev.alloc(cap * r)).collect::<Result<_>>()?,
            });
        }
        let w = d.max(qd).max(f);
        let v = c.vocab_size;
        let ce_rows = (CE_CHUNK_BYTES / (6 * v)).max(64).min(cap);
        let s = Scratch {
            tokens: dev.alloc(cap)?,
            positions: dev.alloc(cap)?,
            seq_start: dev.alloc(cap)?,
            labels: dev.alloc(cap)?,
            targets: dev.alloc(cap)?,
            h: dev.alloc(cap * d)?,
            rstd: dev.alloc(cap)?,
            h_lab: dev.alloc(cap * d)?,
            dh_lab: dev.alloc(cap * d)?,
            logits: dev.alloc(ce_rows * v)?,
            dlogits: dev.alloc(ce_rows * v)?,
            loss: dev.alloc(cap)?,
            dx: dev.alloc(cap * d)?,
            dx_in: dev.alloc(cap * d)?,
            dx_mid: dev.alloc(cap * d)?,
            dh: dev.alloc(cap * d)?,
            h_norm: dev.alloc(cap * d)?,
            rstd_norm: dev.alloc(cap)?,
            act: dev.alloc(cap * f)?,
            d_act: dev.alloc(cap * f)?,
            d_gate: dev.alloc(cap * f)?,
            d_up: dev.alloc(cap * f)?,
            d_att: dev.alloc(cap * qd)?,
            dq: dev.alloc(cap * qd)?,
            dk: dev.alloc(cap * kvd)?,
            dv: dev.alloc(cap * kvd)?,
            dd: dev.alloc(cap * c.num_heads)?,
            ps: ProjScratch {
                g: dev.alloc(cap * r)?,
                tmp: dev.alloc(cap * w)?,
                xd: dev.alloc(cap * w)?,
                dlora: dev.alloc(cap * w)?,
            },
            xd: dev.alloc(cap * w)?,
        };
        let xs = (0..=c.num_layers).map(|_| dev.alloc(cap * d)).collect::<Result<_>>()?;
        let embed = dense_bf16(&dev, &model.embed, "the embedding")?;
        let lm_head = model
            .lm_head
            .as_ref()
            .map(|h| dense_bf16(&dev, h, "the output head"))
            .transpose()?;
        let head = model.lm_head.as_ref().unwrap_or(&model.embed);
        let head_q8 = match &head.weight {
            LinearWeight::Dense(w) if dev.has_q8_head() => Q8Tensor::exact(w, c.vocab_size, d),
            _ => None,
        };
        let head_q8 = head_q8.map(|q| Q8Head::upload(&dev, q)).transpose()?;
        Ok(Engine {
            embed,
            lm_head,
            head_q8,
            norm: dev.upload(&to_bf16(&model.norm))?,
            inv_freq: dev.upload(&model.inv_freq)?,
            layers,
            slots,
            adapters,
            rank: r,
            scale: lora.config.scale(),
            dropout: lora.config.dropout,
            opt: None,
            xs,
            acts,
            s,
            cap,
            ce_rows,
            n_labels: 0,
            checkpointing,
            gen: None,
            graph_replays: 0,
            constraint: None,
            config: c,
            dev,
        })
    }

    /// Process the loss in chunks of at most `rows` labelled rows (at least 1; at most what the
    /// engine was sized for). Smaller chunks bound the logits buffer; the results do not change.
    pub fn set_loss_chunk_rows(&mut self, rows: usize) {
        assert!(
            (1..=self.ce_rows).contains(&rows),
            "loss chunks of {rows} rows: the engine holds 1 to {}",
            self.ce_rows
        );
        self.ce_rows = rows;
    }

    /// Whether generation reads the output head as Q8_0 (`head_q8`) rather than bf16.
    pub fn head_is_q8(&self) -> bool {
        self.head_q8.is_some()
    }

    /// Bytes of weights one decoding step reads: every layer's NF4 projections, biases and norms,
    /// the final norm, and the head as generation reads it (Q8_0 or bf16). Adapters and the
    /// embedding's one row a token are left out.
    pub fn decode_weight_bytes(&self) -> usize {
        let head = match &self.head_q8 {
            Some(q8) => q8.bytes(),
            None => D::bytes(self.lm_head.as_ref().unwrap_or(&self.embed)),
        };
        head + D::bytes(&self.norm) + self.layers.iter().map(DeviceLayer::bytes).sum::<usize>()
    }

    /// Bytes of device memory the engine holds, counted buffer by buffer.
    pub fn device_bytes(&self) -> usize {
        fn sum<D: Device, T: crate::engine::Elem>(bufs: &[&D::Buf<T>]) -> usize {
            bufs.iter().map(|b| D::bytes(b)).sum()
        }
        let mut n = sum::<D, _>(&[&self.embed, &self.norm]) + D::bytes(&self.inv_freq);
        n += self.lm_head.as_ref().map_or(0, |h| D::bytes(h));
        n += self.head_q8.as_ref().map_or(0, |h| h.bytes());
        n += self.layers.iter().map(DeviceLayer::bytes).sum::<usize>();
        let ad = &self.adapters;
        n += D::bytes(&ad.w) + sum::<D, _>(&[&ad.master, &ad.grad]);
        n += self.opt.as_ref().map_or(0, |o| o.device_bytes());
        for a in &self.acts {
            let bf = [&a.q, &a.k, &a.v, &a.att, &a.x_mid, &a.gate, &a.up];
            n += sum::<D, _>(&bf) + sum::<D, _>(&[&a.rstd_attn, &a.rstd_mlp, &a.lse]);
            n += a.xa.iter().map(|b| D::bytes(b)).sum::<usize>();
        }
        n += self.xs.iter().map(|b| D::bytes(b)).sum::<usize>();
        let s = &self.s;
        n += sum::<D, _>(&[&s.tokens, &s.positions, &s.seq_start, &s.labels, &s.targets]);
        let bf = [
            &s.h,
            &s.h_lab,
            &s.dh_lab,
            &s.dlogits,
            &s.dx,
            &s.dx_in,
            &s.dx_mid,
            &s.dh,
            &s.h_norm,
            &s.act,
            &s.d_act,
            &s.d_gate,
            &s.d_up,
            &s.d_att,
            &s.dq,
            &s.dk,
            &s.dv,
            &s.ps.tmp,
            &s.ps.xd,
            &s.ps.dlora,
            &s.xd,
        ];
        n += sum::<D, _>(&bf);
        n + sum::<D, _>(&[&s.rstd, &s.rstd_norm, &s.logits, &s.loss, &s.dd, &s.ps.g])
    }

    /// Tokens per micro-batch this engine was sized for.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Forward, loss and backward of one micro-batch, as `autograd::forward_backward`: adds the
    /// gradient of `inv_count * loss_sum` into `grads` (the layout of `lora.data`) and returns the
    /// loss sum.
    pub fn forward_backward(
        &mut self,
        lora: &LoraParams,
        batch: &Batch,
        inv_count: f32,
        opts: GradOptions,
        grads: &mut [f32],
    ) -> Result<f64> {
        ensure!(
            grads.len() == lora.data.len(),
            "gradient buffer does not match the adapters"
        );
        self.upload_adapters(lora)?;
        let loss = self.accumulate(batch, inv_count, opts)?;
        if !grads.is_empty() {
            let got = self.dev.read(&self.adapters.grad, grads.len())?;
            grads.iter_mut().zip(got).for_each(|(g, v)| *g += v);
        }
        Ok(loss)
    }

    /// Forward, loss and backward of one micro-batch with the adapters already on the device: adds
    /// the gradient of `inv_count * loss_sum` into the device's adapter gradients and returns the
    /// loss sum. (The training loop's step: gradients stay on the device for the paged AdamW.)
    pub fn accumulate(&mut self, batch: &Batch, inv_count: f32, opts: GradOptions) -> Result<f64> {
        let dropout = (self.dropout > 0.0).then_some(Dropout {
            p: self.dropout,
            seed: opts.dropout_seed,
        });
        let t = self.load_tokens(batch)?;
        let max_len = batch.seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let layers = self.config.num_layers;
        for l in 0..layers {
            let a = if self.checkpointing { 0 } else { l };
            self.layer_fwd(l, a, t, Attn::Packed { max_len }, true, dropout)?;
        }
        let loss = self.loss_and_dh(t, inv_count, true)?;
        // dx = rmsnorm_bwd(dh) of the final norm: the gradient of the last layer's output.
        let (dev, s) = (&self.dev, &mut self.s);
        dev.rmsnorm_bwd(&mut s.dx, &s.dh, &self.xs[layers], &self.norm, &s.rstd, t)?;
        for l in (0..layers).rev() {
            let a = if self.checkpointing { 0 } else { l };
            if self.checkpointing {
                self.layer_fwd(l, a, t, Attn::Packed { max_len }, true, dropout)?;
            }
            self.layer_bwd(l, a, t, max_len, dropout)?;
            std::mem::swap(&mut self.s.dx, &mut self.s.dx_in);
        }
        Ok(loss)
    }

    /// Loss sum of a batch without gradients or dropout (`lora: None`: the base model).
    pub fn loss_sum(&mut self, lora: Option<&LoraParams>, batch: &Batch) -> Result<f64> {
        let t = self.load_batch(batch, lora)?;
        let max_len = batch.seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        for l in 0..self.config.num_layers {
            let a = if self.checkpointing { 0 } else { l };
            self.layer_fwd(l, a, t, Attn::Packed { max_len }, lora.is_some(), None)?;
        }
        self.loss_and_dh(t, 1.0, false)
    }

    /// Upload the batch (and the adapters, zeroing their gradients); returns its token count.
    fn load_batch(&mut self, batch: &Batch, lora: Option<&LoraParams>) -> Result<usize> {
        if let Some(lora) = lora {
            self.upload_adapters(lora)?;
        }
        self.load_tokens(batch)
    }

    /// Make `lora` the device's adapters: f32 masters, their bf16 copies, and zero gradients.
    pub fn upload_adapters(&mut self, lora: &LoraParams) -> Result<()> {
        let ad = &mut self.adapters;
        ensure!(
            lora.config.r == self.rank && lora.data.len() == ad.len,
            "the adapters changed shape since the engine was built"
        );
        if ad.len > 0 {
            self.dev.write(&mut ad.master, &lora.data)?;
            self.dev.cast_f32_bf16(&mut ad.w, &ad.master, ad.len)?;
        }
        self.dev.zero(&mut ad.grad)
    }

    /// Number of adapter parameters (the length of `LoraParams::data`).
    pub fn adapter_len(&self) -> usize {
        self.adapters.len
    }

    /// Upload a packed batch (tokens, positions, packing, labels) and embed it into xs[0]; returns
    /// its token count.
    fn load_tokens(&mut self, batch: &Batch) -> Result<usize> {
        let t = batch.tokens.len();
        ensure!(t > 0, "empty micro-batch");
        ensure!(
            t <= self.cap,
            "a micro-batch of {t} tokens exceeds the {} this engine was sized for",
            self.cap
        );
        let vocab = self.config.vocab_size;
        if let Some(&bad) = (batch.tokens.iter())
            .chain(batch.targets.iter().flatten())
            .find(|&&x| x as usize >= vocab)
        {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let (dev, s) = (&self.dev, &mut self.s);
        let mut starts = vec![0i32; t];
        for r in &batch.seqs {
            starts[r.clone()].fill(r.start as i32);
        }
        dev.write(&mut s.seq_start, &starts)?;
        let (labels, targets): (Vec<i32>, Vec<i32>) = (batch.targets.iter().enumerate())
            .filter_map(|(i, y)| y.map(|y| (i as i32, y as i32)))
            .unzip();
        dev.write(&mut s.labels, &labels)?;
        dev.write(&mut s.targets, &targets)?;
        self.n_labels = labels.len();
        let ids: Vec<i32> = batch.tokens.iter().map(|&x| x as i32).collect();
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        self.embed(&ids, &pos)?;
        Ok(t)
    }

    /// Upload tokens and their positions and embed them into xs[0].
    fn embed(&mut self, ids: &[i32], positions: &[i32]) -> Result<()> {
        let (dev, s) = (&self.dev, &mut self.s);
        dev.write(&mut s.tokens, ids)?;
        dev.write(&mut s.positions, positions)?;
        dev.embedding_fwd(
            &mut self.xs[0],
            &self.embed,
            &s.tokens,
            ids.len(),
            self.config.hidden_size,
        )
    }

    /// s.h = rmsnorm(last layer's output) over t rows (s.rstd kept for the backward).
    fn final_norm(&mut self, t: usize) -> Result<()> {
        let c = &self.config;
        let (x, s) = (&self.xs[c.num_layers], &mut self.s);
        self.dev
            .rmsnorm_fwd(&mut s.h, &mut s.rstd, x, &self.norm, t, c.rms_norm_eps)
    }

    /// Final norm, then the loss on the labelled rows in chunks of `ce_rows` (and, with `grad`, the
    /// gradient of `inv_count * loss` into s.dh, zero on unlabelled rows). Returns the loss sum.
    ///   logits = h_lab head^T;  loss = lse - logits[target];  dh_lab = inv_count (softmax - onehot) head
    fn loss_and_dh(&mut self, t: usize, inv_count: f32, grad: bool) -> Result<f64> {
        let (c, n) = (&self.config, self.n_labels);
        let (d, v) = (c.hidden_size, c.vocab_size);
        self.final_norm(t)?;
        let (dev, s) = (&self.dev, &mut self.s);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        dev.gather_rows(&mut s.h_lab, &s.h, &s.labels, n, d)?;
        for r0 in (0..n).step_by(self.ce_rows) {
            let rows = self.ce_rows.min(n - r0);
            dev.head_logits(&mut s.logits, &s.h_lab, head, r0, rows, d)?;
            dev.ce_softmax_grad(
                &mut s.dlogits,
                &mut s.loss,
                &s.logits,
                &s.targets,
                r0,
                rows,
                v,
                inv_count,
            )?;
            if grad {
                dev.head_grad(&mut s.dh_lab, &s.dlogits, head, r0, rows, d)?;
            }
        }
        if grad {
            dev.zero(&mut s.dh)?;
            dev.scatter_rows(&mut s.dh, &s.dh_lab, &s.labels, n, d)?;
        }
        if n == 0 {
            return Ok(0.0);
        }
        Ok(dev.read(&s.loss, n)?.iter().map(|&l| l as f64).sum())
    }
}
