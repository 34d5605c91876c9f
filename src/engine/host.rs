//! The [`Device`] contract on the CPU: each op widens its bf16 inputs to f32, runs the reference op
//! of `model::cpu`, and rounds what the kernel stores as bf16. It follows the kernels' storage
//! precision exactly (so the step's bf16 round trips are exercised without a GPU), though not their
//! order of f32 summation.

use super::{
    to_bf16, to_f32, AttentionOps, Bf, DeviceBase, Elem, Elementwise, LoraOps, LossOps, Nf4Gemm, OptimOps, ProfileRow,
    Q8Head, F32,
};
use crate::model::cpu::{self, Linear, LinearWeight};
use crate::model::lora::LoraAt;
use crate::model::nf4::Nf4Tensor;
use crate::model::optim::{AdamStep, HostPages, StatePages};
use crate::model::q8;
use anyhow::Result;
use half::bf16;
use std::ops::Range;

/// The CPU as a [`Device`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

/// A device whose buffers are host memory (`Vec`s) and whose kernels are, unless it implements a
/// family itself, this file's: the reference ops widened from and rounded to bf16. [`Host`] is one;
/// the fast CPU engine (`engine::cpu`) is another, with its own NF4 GEMM.
pub trait OnHost: Clone + Send + Sync {
    /// One line naming the device, for logs.
    fn describe(&self) -> String;
    /// Run one kernel, `f`, timing it under `name` where the device profiles.
    fn timed<R>(&self, _name: &'static str, f: impl FnOnce() -> R) -> R {
        f()
    }
    /// Time each kernel from now on, or stop (a no-op where the device does not profile).
    fn set_profiling(&self, _on: bool) {}
    /// The kernels' times since the last call, largest first.
    fn take_profile(&self) -> Vec<ProfileRow> {
        Vec::new()
    }
}

impl OnHost for Host {
    fn describe(&self) -> String {
        format!("CPU, bf16 storage emulated ({} threads)", rayon::current_num_threads())
    }
}

/// Store f32 results into the start of a bf16 buffer.
pub(crate) fn store(dst: &mut [bf16], v: &[f32]) {
    dst[..v.len()]
        .iter_mut()
        .zip(v)
        .for_each(|(o, &x)| *o = bf16::from_f32(x));
}

/// One row of the RMSNorm backward with the forward's `r` (the kernel's formula):
/// dx = r w dy - (r^3 / d) x sum(dy w x). o, dy, x, w: [d].
pub(crate) fn rmsnorm_bwd_row(o: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], r: f32) {
    let d = w.len();
    let dot: f32 = (0..d).map(|j| dy[j] * w[j] * x[j]).sum();
    let c = r * r * r / d as f32 * dot;
    (0..d).for_each(|j| o[j] = r * w[j] * dy[j] - c * x[j]);
}

/// One row of the loss: with lse = logsumexp(z) and target y (None: unlabelled),
/// dz = bf16(inv_count (softmax(z) - onehot(y))); returns lse - z[y] (NaN when unlabelled).
/// z, dz: [vocab].
pub(crate) fn ce_row(dz: &mut [bf16], z: &[f32], y: Option<usize>, inv_count: f32) -> f32 {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = m + z.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
    for (v, o) in dz.iter_mut().enumerate() {
        let onehot = if Some(v) == y { 1.0 } else { 0.0 };
        *o = bf16::from_f32(inv_count * ((z[v] - lse).exp() - onehot));
    }
    y.map_or(f32::NAN, |y| lse - z[y])
}

/// The sequences of a packing, from each token's sequence start.
pub(crate) fn seqs(seq_start: &[i32], t: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, &s) in seq_start[..t].iter().enumerate() {
        match out.last_mut() {
            Some(r) if r.start == s as usize => r.end = i + 1,
            _ => out.push(s as usize..i + 1),
        }
    }
    out
}

impl<H: OnHost> DeviceBase for H {
    type Buf<T: Elem> = Vec<T>;
    type Nf4 = Linear;
    type Graph = ();

    fn describe(&self) -> String {
        OnHost::describe(self)
    }
    fn set_profiling(&self, on: bool) {
        OnHost::set_profiling(self, on)
    }
    fn take_profile(&self) -> Result<Vec<ProfileRow>> {
        Ok(OnHost::take_profile(self))
    }
    fn alloc<T: Elem>(&self, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); n])
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }
    fn upload_vec<T: Elem>(&self, host: Vec<T>) -> Result<Vec<T>> {
        Ok(host)
    }
    fn write_at<T: Elem>(&self, dst: &mut Vec<T>, off: usize, host: &[T]) -> Result<()> {
        dst[off..off + host.len()].copy_from_slice(host);
        Ok(())
    }
    fn read<T: Elem>(&self, src: &Vec<T>, n: usize) -> Result<Vec<T>> {
        Ok(src[..n].to_vec())
    }
    fn read_into<T: Elem>(&self, src: &Vec<T>, off: usize, out: &mut [T]) -> Result<()> {
        out.copy_from_slice(&src[off..off + out.len()]);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn begin_capture(&self) -> Result<bool> {
        Ok(false)
    }
    fn end_capture(&self) -> Result<Option<()>> {
        Ok(None)
    }
    fn replay(&self, _graph: &()) -> Result<()> {
        Ok(())
    }
    fn state_pages(&self, len: usize, page: usize) -> Result<Box<dyn StatePages + Send>> {
        Ok(Box::new(HostPages::new(len, page)))
    }
    fn zero<T: Elem>(&self, buf: &mut Vec<T>) -> Result<()> {
        buf.fill(T::default());
        Ok(())
    }
    fn quantize_nf4(&self, x: &[f32], shape: &[usize]) -> Result<Nf4Tensor> {
        Ok(Nf4Tensor::quantize(x, shape))
    }
    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Linear> {
        let [out_features, in_features] = w.shape[..] else {
            anyhow::bail!("an NF4 linear weight must be 2-D, not {:?}", w.shape);
        };
        Ok(Linear {
            out_features,
            in_features,
            weight: LinearWeight::Nf4(w.clone()),
            bias: None,
        })
    }
    fn bytes<T: Elem>(buf: &Vec<T>) -> usize {
        std::mem::size_of_val(&buf[..])
    }
    fn nf4_bytes(w: &Linear) -> usize {
        match &w.weight {
            // What the GPU keeps: the packed codes and the f32 block scales.
            LinearWeight::Nf4(q) => q.packed.len() + 4 * q.absmax().len(),
            LinearWeight::Dense(v) => 4 * v.len(),
        }
    }
    fn memory_used(&self) -> Option<usize> {
        None
    }
    fn memory_free(&self) -> Option<usize> {
        None
    }
}

#[allow(clippy::too_many_arguments)]
impl Elementwise for Host {
    fn rmsnorm_fwd(
        &self,
        y: &mut Bf<Self>,
        rstd: &mut F32<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        t: usize,
        eps: f32,
    ) -> Result<()> {
        let d = w.len();
        let (xf, wf) = (to_f32(&x[..t * d]), to_f32(w));
        let mut yf = vec![0f32; t * d];
        for ((yr, xr), r) in yf.chunks_mut(d).zip(xf.chunks(d)).zip(rstd.iter_mut()) {
            *r = cpu::rmsnorm_fwd_row(yr, xr, &wf, eps);
        }
        store(y, &yf);
        Ok(())
    }
    fn rmsnorm_bwd(
        &self,
        dx: &mut Bf<Self>,
        dy: &Bf<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        rstd: &F32<Self>,
        t: usize,
    ) -> Result<()> {
        // The kernel's formula with the forward's rstd: dx = r w dy - (r^3 / d) x sum(dy w x).
        let d = w.len();
        let (dyf, xf, wf) = (to_f32(&dy[..t * d]), to_f32(&x[..t * d]), to_f32(w));
        let mut out = vec![0f32; t * d];
        for (i, o) in out.chunks_mut(d).enumerate() {
            rmsnorm_bwd_row(o, &dyf[i * d..(i + 1) * d], &xf[i * d..(i + 1) * d], &wf, rstd[i]);
        }
        store(dx, &out);
        Ok(())
    }
    fn rope_rotate(
        &self,
        x: &mut Bf<Self>,
        pos: &Vec<i32>,
        inv_freq: &F32<Self>,
        t: usize,
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        let n = t * heads * 2 * inv_freq.len();
        let mut xf = to_f32(&x[..n]);
        let positions: Vec<usize> = pos[..t].iter().map(|&p| p as usize).collect();
        if sign > 0.0 {
            cpu::rope_fwd(&mut xf, &positions, inv_freq, heads);
        } else {
            cpu::rope_bwd(&mut xf, &positions, inv_freq, heads);
        }
        store(x, &xf);
        Ok(())
    }
    fn swiglu_fwd(&self, out: &mut Bf<Self>, gate: &Bf<Self>, up: &Bf<Self>, n: usize) -> Result<()> {
        let mut o = vec![0f32; n];
        cpu::swiglu_fwd(&mut o, &to_f32(&gate[..n]), &to_f32(&up[..n]));
        store(out, &o);
        Ok(())
    }
    fn swiglu_bwd(
        &self,
        dgate: &mut Bf<Self>,
        dup: &mut Bf<Self>,
        dout: &Bf<Self>,
        gate: &Bf<Self>,
        up: &Bf<Self>,
        n: usize,
    ) -> Result<()> {
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        cpu::swiglu_bwd(
            &mut dg,
            &mut du,
            &to_f32(&dout[..n]),
            &to_f32(&gate[..n]),
            &to_f32(&up[..n]),
        );
        store(dgate, &dg);
        store(dup, &du);
        Ok(())
    }
    fn embedding_fwd(&self, out: &mut Bf<Self>, table: &Bf<Self>, tokens: &Vec<i32>, t: usize, d: usize) -> Result<()> {
        for (i, &tok) in tokens[..t].iter().enumerate() {
            let tok = usize::try_from(tok).ok().filter(|&v| (v + 1) * d <= table.len());
            let tok = tok.ok_or_else(|| anyhow::anyhow!("token id {} is outside the embedding table", tokens[i]))?;
            out[i * d..(i + 1) * d].copy_from_slice(&table[tok * d..(tok + 1) * d]);
        }
        Ok(())
    }
    fn gather_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &Vec<i32>, n: usize, d: usize) -> Result<()> {
        for (i, &r) in idx[..n].iter().enumerate() {
            out[i * d..(i + 1) * d].copy_from_slice(&x[r as usize * d..(r as usize + 1) * d]);
        }
        Ok(())
    }
    fn scatter_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &Vec<i32>, n: usize, d: usize) -> Result<()> {
        for (i, &r) in idx[..n].iter().enumerate() {
            out[r as usize * d..(r as usize + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
        }
        Ok(())
    }
    fn add(&self, x: &mut Bf<Self>, y: &Bf<Self>, n: usize) -> Result<()> {
        x[..n]
            .iter_mut()
            .zip(&y[..n])
            .for_each(|(a, b)| *a = bf16::from_f32(a.to_f32() + b.to_f32()));
        Ok(())
    }
    fn cast_f32_bf16(&self, out: &mut Bf<Self>, x: &F32<Self>, n: usize) -> Result<()> {
        out[..n].copy_from_slice(&to_bf16(&x[..n]));
        Ok(())
    }
    fn dropout(&self, out: &mut Bf<Self>, x: &Bf<Self>, seed: u64, p: f32, n: usize) -> Result<()> {
        let mut o = vec![0f32; n];
        cpu::dropout(&mut o, &to_f32(&x[..n]), seed, p);
        store(out, &o);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl Nf4Gemm for Host {
    fn nf4_gemm_fwd(
        &self,
        y: &mut Bf<Self>,
        x: &Bf<Self>,
        w: &Linear,
        bias: Option<&Bf<Self>>,
        t: usize,
    ) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        let mut yf = vec![0f32; t * n];
        cpu::linear_fwd(&mut yf, &to_f32(&x[..t * k]), w);
        if let Some(b) = bias {
            let b = to_f32(b);
            yf.chunks_mut(n).for_each(|row| cpu::add_inplace(row, &b));
        }
        store(y, &yf);
        Ok(())
    }
    fn nf4_gemm_bwd_input(&self, dx: &mut Bf<Self>, dy: &Bf<Self>, w: &Linear, t: usize) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        let mut out = vec![0f32; t * k];
        cpu::linear_bwd_input(&mut out, &to_f32(&dy[..t * n]), w);
        store(dx, &out);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl LoraOps for Host {
    fn lora_fwd(
        &self,
        y: &mut Bf<Self>,
        xa: &mut F32<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        at: LoraAt,
        t: usize,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        self.timed("lora_fwd", || {
            let (k, n) = (at.inp, at.out);
            let mut yf = to_f32(&y[..t * n]);
            cpu::lora_fwd(
                &mut yf,
                &mut xa[..t * r],
                &to_f32(&x[..t * k]),
                &to_f32(&w[at.a..at.a + r * k]),
                &to_f32(&w[at.b..at.b + n * r]),
                r,
                scale,
            );
            store(y, &yf);
            Ok(())
        })
    }
    fn lora_bwd(
        &self,
        dx: &mut Bf<Self>,
        grad: &mut F32<Self>,
        _g: &mut F32<Self>,
        dy: &Bf<Self>,
        x: &Bf<Self>,
        xa: &F32<Self>,
        w: &Bf<Self>,
        at: LoraAt,
        t: usize,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        self.timed("lora_bwd", || {
            let (k, n) = (at.inp, at.out);
            let mut dx_lora = vec![0f32; t * k];
            let (dyf, xf) = (to_f32(&dy[..t * n]), to_f32(&x[..t * k]));
            let (da, db) = grad[at.a..at.b + n * r].split_at_mut(r * k);
            cpu::lora_bwd(
                &mut dx_lora,
                da,
                db,
                &dyf,
                &xf,
                &xa[..t * r],
                &to_f32(&w[at.a..at.a + r * k]),
                &to_f32(&w[at.b..at.b + n * r]),
                r,
                scale,
            );
            cpu::add_inplace(&mut dx_lora, &to_f32(&dx[..t * k]));
            store(dx, &dx_lora);
            Ok(())
        })
    }
}

#[allow(clippy::too_many_arguments)]
impl LossOps for Host {
    fn head_logits(
        &self,
        logits: &mut F32<Self>,
        h: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let head = Linear::dense(head.len() / d, d, to_f32(head), None);
        let v = head.out_features;
        cpu::linear_fwd(&mut logits[..rows * v], &to_f32(&h[row0 * d..(row0 + rows) * d]), &head);
        Ok(())
    }
    fn has_q8_head(&self) -> bool {
        true
    }
    fn head_logits_q8(
        &self,
        logits: &mut F32<Self>,
        h: &Bf<Self>,
        head: &Q8Head<Self>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.codes.len() / d;
        let mut w = vec![0f32; v * d];
        q8::decode(bytemuck::cast_slice(&head.codes), &head.scales, &mut w);
        let head = Linear::dense(v, d, w, None);
        cpu::linear_fwd(&mut logits[..rows * v], &to_f32(&h[..rows * d]), &head);
        Ok(())
    }
    fn ce_softmax_grad(
        &self,
        dlogits: &mut Bf<Self>,
        loss: &mut F32<Self>,
        logits: &F32<Self>,
        targets: &Vec<i32>,
        row0: usize,
        rows: usize,
        vocab: usize,
        inv_count: f32,
    ) -> Result<()> {
        for i in 0..rows {
            let z = &logits[i * vocab..(i + 1) * vocab];
            let y = usize::try_from(targets[row0 + i]).ok().filter(|&y| y < vocab);
            loss[row0 + i] = ce_row(&mut dlogits[i * vocab..(i + 1) * vocab], z, y, inv_count);
        }
        Ok(())
    }
    fn head_grad(
        &self,
        dh: &mut Bf<Self>,
        dlogits: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let head = Linear::dense(head.len() / d, d, to_f32(head), None);
        let v = head.out_features;
        let mut out = vec![0f32; rows * d];
        cpu::linear_bwd_input(&mut out, &to_f32(&dlogits[..rows * v]), &head);
        store(&mut dh[row0 * d..], &out);
        Ok(())
    }
    fn argmax_rows(&self, out: &mut Vec<i32>, logits: &Vec<f32>, rows: usize, v: usize) -> Result<()> {
        for (o, row) in out[..rows].iter_mut().zip(logits.chunks(v)) {
            *o = crate::model::generate::argmax(row) as i32;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl AttentionOps for Host {
    fn attention_fwd(
        &self,
        out: &mut Bf<Self>,
        lse: &mut F32<Self>,
        q: &Bf<Self>,
        k: &Bf<Self>,
        v: &Bf<Self>,
        seq_start: &Vec<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        _max_len: usize,
    ) -> Result<()> {
        self.timed("attention_fwd", || {
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            let (qf, kf, vf) = (to_f32(&q[..t * qd]), to_f32(&k[..t * kvd]), to_f32(&v[..t * kvd]));
            let mut o = vec![0f32; t * qd];
            for s in seqs(seq_start, t) {
                let (qr, kr) = (s.start * qd..s.end * qd, s.start * kvd..s.end * kvd);
                cpu::attention_fwd(
                    &mut o[qr.clone()],
                    &qf[qr],
                    &kf[kr.clone()],
                    &vf[kr],
                    heads,
                    kv_heads,
                    hd,
                );
                // Each row's log-sum-exp, as the kernel keeps it (the CPU backward does not need it).
                let scale = 1.0 / (hd as f32).sqrt();
                for i in s.clone() {
                    for h in 0..heads {
                        let (qv, kvh) = (&qf[(i * heads + h) * hd..][..hd], h / (heads / kv_heads));
                        let scores: Vec<f32> = (s.start..=i)
                            .map(|j| cpu::dot(qv, &kf[(j * kv_heads + kvh) * hd..][..hd]) * scale)
                            .collect();
                        let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        lse[i * heads + h] = m + scores.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
                    }
                }
            }
            store(out, &o);
            Ok(())
        })
    }
    fn attention_bwd(
        &self,
        dq: &mut Bf<Self>,
        dk: &mut Bf<Self>,
        dv: &mut Bf<Self>,
        _dd: &mut F32<Self>,
        dout: &Bf<Self>,
        [q, k, v]: [&Bf<Self>; 3],
        _out: &Bf<Self>,
        _lse: &F32<Self>,
        seq_start: &Vec<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        _max_len: usize,
    ) -> Result<()> {
        self.timed("attention_bwd", || {
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            let (qf, kf, vf) = (to_f32(&q[..t * qd]), to_f32(&k[..t * kvd]), to_f32(&v[..t * kvd]));
            let dof = to_f32(&dout[..t * qd]);
            let (mut dqf, mut dkf, mut dvf) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
            for s in seqs(seq_start, t) {
                let (qr, kr) = (s.start * qd..s.end * qd, s.start * kvd..s.end * kvd);
                cpu::attention_bwd(
                    &mut dqf[qr.clone()],
                    &mut dkf[kr.clone()],
                    &mut dvf[kr.clone()],
                    &dof[qr.clone()],
                    &qf[qr],
                    &kf[kr.clone()],
                    &vf[kr],
                    heads,
                    kv_heads,
                    hd,
                );
            }
            store(dq, &dqf);
            store(dk, &dkf);
            store(dv, &dvf);
            Ok(())
        })
    }
    fn attention_decode(
        &self,
        out: &mut Bf<Self>,
        q: &Bf<Self>,
        [k, v]: [&Bf<Self>; 2],
        key_start: &Vec<i32>,
        key_len: &Vec<i32>,
        b: usize,
        [heads, kv_heads, hd]: [usize; 3],
        _max_len: usize,
    ) -> Result<()> {
        self.timed("attention_decode", || {
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            for i in 0..b {
                let (s, n) = (key_start[i] as usize, key_len[i] as usize);
                let (kf, vf) = (to_f32(&k[s * kvd..(s + n) * kvd]), to_f32(&v[s * kvd..(s + n) * kvd]));
                // One query at the end of its keys: the reference's KV-cache attention.
                let mut o = vec![0f32; qd];
                cpu::attention_fwd(&mut o, &to_f32(&q[i * qd..(i + 1) * qd]), &kf, &vf, heads, kv_heads, hd);
                store(&mut out[i * qd..], &o);
            }
            Ok(())
        })
    }
}

#[allow(clippy::too_many_arguments)]
impl<H: OnHost> OptimOps for H {
    fn partial_norms(&self, parts: &mut Vec<f32>, at: usize, x: &Vec<f32>, n: usize) -> Result<()> {
        self.timed("partial_norms", || {
            // The whole norm (summed in f64) in the first part.
            let total: f64 = x[..n].iter().map(|&v| v as f64 * v as f64).sum();
            parts[at..at + super::SUM_PARTS].fill(0.0);
            parts[at] = total.sqrt() as f32;
            Ok(())
        })
    }
    fn adamw_step(
        &self,
        p: &mut Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        g: &Vec<f32>,
        p_off: usize,
        s_off: usize,
        n: usize,
        h: &AdamStep,
    ) -> Result<()> {
        self.timed("adamw_step", || {
            let (ps, ss) = (p_off..p_off + n, s_off..s_off + n);
            h.apply(&mut p[ps.clone()], &mut m[ss.clone()], &mut v[ss], &g[ps]);
            Ok(())
        })
    }
}
