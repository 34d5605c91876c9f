//! One decoder layer of the device step, forward and backward, and its projections with their
//! adapters: the device twin of `model::Model::layer_fwd` and `autograd::layer_bwd`.

use super::{DeviceLayer, Engine, ProjScratch};
use crate::engine::{Bf, Device, F32};
use crate::load::arch::Proj;
use crate::load::config::ModelConfig;
use crate::model::forward::Dropout;
use crate::model::lora::LoraAt;
use anyhow::Result;

/// How a layer's attention sees keys and values.
#[derive(Clone, Copy, Debug)]
pub(super) enum Attn {
    /// Training: sequences packed end to end, each causal within itself.
    Packed { max_len: usize },
    /// Generation, the prompts: as `Packed`, and their keys and values go into the cache.
    Prefill { max_len: usize },
    /// Generation, one new token per sequence against its cache (keys of up to `max_len` tokens).
    Decode { max_len: usize },
}

/// The adapters as one layer's projections see them.
pub(super) struct Adapt<'a, D: Device> {
    /// Where this layer's adapters lie, per projection; `None` runs the base model.
    at: Option<&'a [Option<LoraAt>; 7]>,
    /// [N] every adapter's bf16 copy.
    w: &'a Bf<D>,
    c: &'a ModelConfig,
    l: usize,
    rank: usize,
    scale: f32,
    dropout: Option<Dropout>,
}

impl<D: Device> Engine<D> {
    /// Layer `l`'s forward from xs[l] into xs[l + 1], keeping its activations in acts[a].
    pub(super) fn layer_fwd(
        &mut self,
        l: usize,
        a: usize,
        t: usize,
        attn: Attn,
        adapted: bool,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let Engine {
            dev,
            config: c,
            layers,
            slots,
            adapters,
            xs,
            acts,
            s,
            inv_freq,
            rank,
            scale,
            gen,
            ..
        } = self;
        let (layer, acts) = (&layers[l], &mut acts[a]);
        let (head, tail) = xs.split_at_mut(l + 1);
        let (x_in, out) = (&head[l], &mut tail[0]);
        let ad = Adapt {
            at: adapted.then_some(&slots[l]),
            w: &adapters.w,
            c,
            l,
            rank: *rank,
            scale: *scale,
            dropout,
        };
        let (d, f, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let dims = [c.num_heads, c.num_kv_heads, c.head_dim];
        let xa = &mut acts.xa;
        dev.rmsnorm_fwd(&mut s.h_norm, &mut acts.rstd_attn, x_in, &layer.attn_norm, t, eps)?;
        proj_fwd(dev, layer, &ad, Proj::Q, &mut acts.q, &s.h_norm, xa, &mut s.xd, t)?;
        proj_fwd(dev, layer, &ad, Proj::K, &mut acts.k, &s.h_norm, xa, &mut s.xd, t)?;
        proj_fwd(dev, layer, &ad, Proj::V, &mut acts.v, &s.h_norm, xa, &mut s.xd, t)?;
        dev.rope_rotate(&mut acts.q, &s.positions, inv_freq, t, c.num_heads, 1.0)?;
        dev.rope_rotate(&mut acts.k, &s.positions, inv_freq, t, c.num_kv_heads, 1.0)?;
        let (q, k, v) = (&acts.q, &acts.k, &acts.v);
        match attn {
            Attn::Packed { max_len } => {
                dev.attention_fwd(&mut acts.att, &mut acts.lse, q, k, v, &s.seq_start, t, dims, max_len)?
            }
            Attn::Prefill { max_len } | Attn::Decode { max_len } => {
                // Keys and values go into the cache rows of their sequences and positions first.
                let g = gen.as_mut().expect("generation allocates its cache first");
                dev.scatter_rows(&mut g.k[l], k, &g.slot, t, c.kv_dim())?;
                dev.scatter_rows(&mut g.v[l], v, &g.slot, t, c.kv_dim())?;
                if let Attn::Prefill { .. } = attn {
                    dev.attention_fwd(&mut acts.att, &mut acts.lse, q, k, v, &s.seq_start, t, dims, max_len)?
                } else {
                    let kv = [&g.k[l], &g.v[l]];
                    dev.attention_decode(&mut acts.att, q, kv, &g.key_start, &g.key_len, t, dims, max_len)?
                }
            }
        }
        proj_fwd(dev, layer, &ad, Proj::O, &mut acts.x_mid, &acts.att, xa, &mut s.xd, t)?;
        dev.add(&mut acts.x_mid, x_in, t * d)?; // x_mid = x_in + o(att)
        dev.rmsnorm_fwd(&mut s.h_norm, &mut acts.rstd_mlp, &acts.x_mid, &layer.mlp_norm, t, eps)?;
        proj_fwd(dev, layer, &ad, Proj::Gate, &mut acts.gate, &s.h_norm, xa, &mut s.xd, t)?;
        proj_fwd(dev, layer, &ad, Proj::Up, &mut acts.up, &s.h_norm, xa, &mut s.xd, t)?;
        dev.swiglu_fwd(&mut s.act, &acts.gate, &acts.up, t * f)?;
        proj_fwd(dev, layer, &ad, Proj::Down, out, &s.act, xa, &mut s.xd, t)?;
        dev.add(out, &acts.x_mid, t * d) // out = x_mid + down(act)
    }

    /// Layer `l`'s backward: from s.dx (gradient of its output) to s.dx_in (of its input),
    /// accumulating its adapters' gradients. The math is `autograd::layer_bwd`'s:
    ///   d x_mid = dout + rmsnorm_bwd(gate^T(dg) + up^T(du)),  dg, du = swiglu_bwd(down^T(dout))
    ///   d x_in  = d x_mid + rmsnorm_bwd(q^T dq + k^T dk + v^T dv),
    ///   dq, dk, dv = rope^-1(attention_bwd(o^T(d x_mid)))
    pub(super) fn layer_bwd(
        &mut self,
        l: usize,
        a: usize,
        t: usize,
        max_len: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let Engine {
            dev,
            config: c,
            layers,
            slots,
            adapters,
            xs,
            acts,
            s,
            inv_freq,
            rank,
            scale,
            ..
        } = self;
        let (layer, acts, x_in) = (&layers[l], &acts[a], &xs[l]);
        let grad = &mut adapters.grad;
        let ad = Adapt {
            at: Some(&slots[l]),
            w: &adapters.w,
            c,
            l,
            rank: *rank,
            scale: *scale,
            dropout,
        };
        let (d, f, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let dims = [c.num_heads, c.num_kv_heads, c.head_dim];
        let ps = &mut s.ps;

        // MLP block. The down projection's input is made again from gate and up.
        dev.swiglu_fwd(&mut s.act, &acts.gate, &acts.up, t * f)?;
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::Down,
            &s.dx,
            &s.act,
            &acts.xa,
            &mut s.d_act,
            false,
            ps,
            t,
        )?;
        dev.swiglu_bwd(&mut s.d_gate, &mut s.d_up, &s.d_act, &acts.gate, &acts.up, t * f)?;
        dev.rmsnorm_fwd(&mut s.h_norm, &mut s.rstd_norm, &acts.x_mid, &layer.mlp_norm, t, eps)?;
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::Gate,
            &s.d_gate,
            &s.h_norm,
            &acts.xa,
            &mut s.dh,
            false,
            ps,
            t,
        )?;
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::Up,
            &s.d_up,
            &s.h_norm,
            &acts.xa,
            &mut s.dh,
            true,
            ps,
            t,
        )?;
        dev.rmsnorm_bwd(&mut s.dx_mid, &s.dh, &acts.x_mid, &layer.mlp_norm, &acts.rstd_mlp, t)?;
        dev.add(&mut s.dx_mid, &s.dx, t * d)?;

        // Attention block.
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::O,
            &s.dx_mid,
            &acts.att,
            &acts.xa,
            &mut s.d_att,
            false,
            ps,
            t,
        )?;
        dev.attention_bwd(
            &mut s.dq,
            &mut s.dk,
            &mut s.dv,
            &mut s.dd,
            &s.d_att,
            [&acts.q, &acts.k, &acts.v],
            &acts.att,
            &acts.lse,
            &s.seq_start,
            t,
            dims,
            max_len,
        )?;
        dev.rope_rotate(&mut s.dq, &s.positions, inv_freq, t, c.num_heads, -1.0)?;
        dev.rope_rotate(&mut s.dk, &s.positions, inv_freq, t, c.num_kv_heads, -1.0)?;
        dev.rmsnorm_fwd(&mut s.h_norm, &mut s.rstd_norm, x_in, &layer.attn_norm, t, eps)?;
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::Q,
            &s.dq,
            &s.h_norm,
            &acts.xa,
            &mut s.dh,
            false,
            ps,
            t,
        )?;
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::K,
            &s.dk,
            &s.h_norm,
            &acts.xa,
            &mut s.dh,
            true,
            ps,
            t,
        )?;
        proj_bwd(
            dev,
            layer,
            &ad,
            grad,
            Proj::V,
            &s.dv,
            &s.h_norm,
            &acts.xa,
            &mut s.dh,
            true,
            ps,
            t,
        )?;
        dev.rmsnorm_bwd(&mut s.dx_in, &s.dh, x_in, &layer.attn_norm, &acts.rstd_attn, t)?;
        dev.add(&mut s.dx_in, &s.dx_mid, t * d)
    }
}

/// `y = x W^T + b (+ s (dropout(x) A^T) B^T)`, saving `dropout(x) A^T` in xa[p].
/// y: [t, out]; x: [t, in]; xa: per projection [t, r]; xd: [t, in] scratch for dropout(x).
#[allow(clippy::too_many_arguments)]
fn proj_fwd<D: Device>(
    dev: &D,
    layer: &DeviceLayer<D>,
    ad: &Adapt<D>,
    p: Proj,
    y: &mut Bf<D>,
    x: &Bf<D>,
    xa: &mut [F32<D>],
    xd: &mut Bf<D>,
    t: usize,
) -> Result<()> {
    let i = p as usize;
    dev.nf4_gemm_fwd(y, x, &layer.proj[i], layer.bias[i].as_ref(), t)?;
    let Some(at) = ad.at.and_then(|s| s[i]) else {
        return Ok(());
    };
    let x = match ad.dropout {
        Some(dr) => {
            dev.dropout(xd, x, dr.seed_for(ad.l, p), dr.p, t * p.shape(ad.c)[1])?;
            &*xd
        }
        None => x,
    };
    dev.lora_fwd(y, &mut xa[i], x, ad.w, at, t, ad.rank, ad.scale)
}

/// Backward of one projection (see `autograd::proj_bwd`):
///   dx = dy W + dropout'(s (dy B) A),  dA += s (dy B)^T dropout(x),  dB += s dy^T (dropout(x) A^T)
/// dx: [t, in], assigned or (with `accumulate`) added to; dy: [t, out]; x: [t, in]; xa: per projection.
#[allow(clippy::too_many_arguments)]
fn proj_bwd<D: Device>(
    dev: &D,
    layer: &DeviceLayer<D>,
    ad: &Adapt<D>,
    grad: &mut F32<D>,
    p: Proj,
    dy: &Bf<D>,
    x: &Bf<D>,
    xa: &[F32<D>],
    dx: &mut Bf<D>,
    accumulate: bool,
    ps: &mut ProjScratch<D>,
    t: usize,
) -> Result<()> {
    let (i, n) = (p as usize, t * p.shape(ad.c)[1]);
    let (r, scale) = (ad.rank, ad.scale);
    let target = if accumulate { &mut ps.tmp } else { &mut *dx };
    dev.nf4_gemm_bwd_input(target, dy, &layer.proj[i], t)?;
    if let Some(at) = ad.at.and_then(|s| s[i]) {
        match ad.dropout {
            Some(dr) => {
                let seed = dr.seed_for(ad.l, p);
                dev.dropout(&mut ps.xd, x, seed, dr.p, n)?;
                dev.zero(&mut ps.dlora)?;
                dev.lora_bwd(
                    &mut ps.dlora,
                    grad,
                    &mut ps.g,
                    dy,
                    &ps.xd,
                    &xa[i],
                    ad.w,
                    at,
                    t,
                    r,
                    scale,
                )?;
                dev.dropout(&mut ps.xd, &ps.dlora, seed, dr.p, n)?;
                dev.add(target, &ps.xd, n)?;
            }
            None => dev.lora_bwd(target, grad, &mut ps.g, dy, x, &xa[i], ad.w, at, t, r, scale)?,
        }
    }
    if accumulate {
        dev.add(dx, &ps.tmp, n)?;
    }
    Ok(())
}
