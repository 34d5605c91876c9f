//! Typed launch wrappers, one per kernel. Each checks that its buffers hold the shapes it is told
//! (`t` is the number of rows, i.e. tokens, in the call; a buffer may be longer than the call needs,
//! so the training step can size its buffers once for the longest micro-batch), then launches.
//! Every launch error names the kernel.

use super::{block_per_row, blocks_for, Cuda};
use crate::engine::SUM_PARTS;
use crate::engine::{Elementwise, OptimOps};
use crate::model::optim::AdamStep;
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

impl Cuda {
    /// The per-64-block scales of an NF4 tensor from its double-quantized form.
    /// absmax: [nblocks]; qabsmax: [nblocks] u8; absmax2: [ceil(nblocks / 256)]; dyn_map: [256].
    pub fn nf4_dequantize_absmax(
        &self,
        absmax: &mut CudaSlice<f32>,
        qabsmax: &CudaSlice<u8>,
        absmax2: &CudaSlice<f32>,
        dyn_map: &CudaSlice<f32>,
        offset: f32,
    ) -> Result<()> {
        let n = qabsmax.len();
        assert!(absmax.len() == n && absmax2.len() == n.div_ceil(256) && dyn_map.len() == 256);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.nf4_dequantize_absmax);
        b.arg(absmax)
            .arg(qabsmax)
            .arg(absmax2)
            .arg(dyn_map)
            .arg(&offset)
            .arg(&ni);
        // SAFETY: one thread per block scale, bounded inside the kernel; lengths asserted above.
        unsafe { self.launch(&mut b, blocks_for(n), "nf4_dequantize_absmax") }?;
        Ok(())
    }

    /// Packed NF4 codes of n values to bf16. out: [n ..]; packed: [ceil(n / 2)]; absmax: [ceil(n / 64)].
    pub fn nf4_dequantize(
        &self,
        out: &mut CudaSlice<bf16>,
        packed: &CudaSlice<u8>,
        absmax: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        assert!(out.len() >= n && packed.len() == n.div_ceil(2) && absmax.len() == n.div_ceil(64));
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.nf4_dequantize);
        b.arg(out).arg(packed).arg(absmax).arg(&ni);
        // SAFETY: one thread per packed byte, bounded by n inside the kernel; lengths asserted above.
        unsafe { self.launch(&mut b, blocks_for(n.div_ceil(2)), "nf4_dequantize") }?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl Elementwise for Cuda {
    /// y = rmsnorm(x) * w, keeping each row's inverse RMS.
    /// y, x: [t, d]; rstd: [t]; w: [d].
    fn rmsnorm_fwd(
        &self,
        y: &mut CudaSlice<bf16>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        t: usize,
        eps: f32,
    ) -> Result<()> {
        let d = w.len();
        assert!(y.len() >= t * d && x.len() >= t * d && rstd.len() >= t);
        let di = d as i32;
        let mut b = self.stream.launch_builder(&self.k.rmsnorm_fwd);
        b.arg(y).arg(rstd).arg(x).arg(w).arg(&di).arg(&eps);
        // SAFETY: one block per row for t rows; the kernel reads x [t, d] and w [d] and writes y [t, d]
        // and rstd [t], all within the buffers (lengths asserted above).
        unsafe { self.launch(&mut b, block_per_row(t), "rmsnorm_fwd") }?;
        Ok(())
    }

    /// dx of RMSNorm (frozen gain). dx, dy, x: [t, d]; w: [d]; rstd: [t] from the forward.
    fn rmsnorm_bwd(
        &self,
        dx: &mut CudaSlice<bf16>,
        dy: &CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        rstd: &CudaSlice<f32>,
        t: usize,
    ) -> Result<()> {
        let d = w.len();
        assert!(dx.len() >= t * d && dy.len() >= t * d && x.len() >= t * d && rstd.len() >= t);
        let di = d as i32;
        let mut b = self.stream.launch_builder(&self.k.rmsnorm_bwd);
        b.arg(dx).arg(dy).arg(x).arg(w).arg(rstd).arg(&di);
        // SAFETY: one block per row for t rows; reads dy, x [t, d], w [d], rstd [t]; writes dx [t, d];
        // lengths asserted.
        unsafe { self.launch(&mut b, block_per_row(t), "rmsnorm_bwd") }?;
        Ok(())
    }

    /// Rotate x in place by `sign * pos * inv_freq` (sign +1 forward, -1 backward).
    /// x: [t, heads, hd]; pos: [t]; inv_freq: [hd/2].
    fn rope_rotate(
        &self,
        x: &mut CudaSlice<bf16>,
        pos: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        t: usize,
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        let hd = 2 * inv_freq.len();
        assert!(x.len() >= t * heads * hd && pos.len() >= t);
        let n = t * heads * hd / 2;
        let (ti, hi, hdi) = (t as i32, heads as i32, hd as i32);
        let mut b = self.stream.launch_builder(&self.k.rope_rotate);
        b.arg(x).arg(pos).arg(inv_freq).arg(&ti).arg(&hi).arg(&hdi).arg(&sign);
        // SAFETY: one thread per (token, head, pair), bounded by t * heads * hd / 2 inside the kernel;
        // x holds [t, heads, hd] and pos [t] (asserted), inv_freq [hd/2].
        unsafe { self.launch(&mut b, blocks_for(n), "rope_rotate") }?;
        Ok(())
    }

    /// out = silu(gate) * up over the first n values.
    fn swiglu_fwd(
        &self,
        out: &mut CudaSlice<bf16>,
        gate: &CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<()> {
        assert!(out.len() >= n && gate.len() >= n && up.len() >= n);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.swiglu_fwd);
        b.arg(out).arg(gate).arg(up).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; all three buffers hold n.
        unsafe { self.launch(&mut b, blocks_for(n), "swiglu_fwd") }?;
        Ok(())
    }

    /// SwiGLU backward over the first n values.
    fn swiglu_bwd(
        &self,
        dgate: &mut CudaSlice<bf16>,
        dup: &mut CudaSlice<bf16>,
        dout: &CudaSlice<bf16>,
        gate: &CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<()> {
        assert!(dgate.len() >= n && dup.len() >= n && dout.len() >= n && gate.len() >= n && up.len() >= n);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.swiglu_bwd);
        b.arg(dgate).arg(dup).arg(dout).arg(gate).arg(up).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; all five buffers hold n.
        unsafe { self.launch(&mut b, blocks_for(n), "swiglu_bwd") }?;
        Ok(())
    }

    /// out[i] = table[tokens[i]] for i < t. out: [t, d]; table: [vocab, d]; tokens: [t].
    fn embedding_fwd(
        &self,
        out: &mut CudaSlice<bf16>,
        table: &CudaSlice<bf16>,
        tokens: &CudaSlice<i32>,
        t: usize,
        d: usize,
    ) -> Result<()> {
        let vocab = table.len() / d;
        assert!(out.len() >= t * d && tokens.len() >= t && table.len() == vocab * d);
        let (ti, di, vi) = (t as i32, d as i32, vocab as i32);
        let mut b = self.stream.launch_builder(&self.k.embedding_fwd);
        b.arg(out).arg(table).arg(tokens).arg(&ti).arg(&di).arg(&vi);
        // SAFETY: one thread per output value (bounded by t * d in the kernel); token ids are checked
        // against vocab before the table is read.
        unsafe { self.launch(&mut b, blocks_for(t * d), "embedding_fwd") }?;
        Ok(())
    }

    /// out[i] = x[idx[i]] (rows of d) for i < n. out: [n, d]; idx: [n], each < rows of x.
    fn gather_rows(
        &self,
        out: &mut CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        idx: &CudaSlice<i32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        assert!(out.len() >= n * d && idx.len() >= n);
        let (ni, di) = (n as i32, d as i32);
        let mut b = self.stream.launch_builder(&self.k.gather_rows);
        b.arg(out).arg(x).arg(idx).arg(&ni).arg(&di);
        // SAFETY: one thread per element of out [n, d]; reads x at rows idx[i], which the caller (the
        // engine) builds from positions inside the batch, so below x.len() / d.
        unsafe { self.launch(&mut b, blocks_for(n * d), "gather_rows") }?;
        Ok(())
    }

    /// out[idx[i]] = x[i] (rows of d) for i < n; other rows unchanged. x: [n, d]; idx: [n].
    fn scatter_rows(
        &self,
        out: &mut CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        idx: &CudaSlice<i32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        assert!(x.len() >= n * d && idx.len() >= n);
        let (ni, di) = (n as i32, d as i32);
        let mut b = self.stream.launch_builder(&self.k.scatter_rows);
        b.arg(out).arg(x).arg(idx).arg(&ni).arg(&di);
        // SAFETY: one thread per element of x [n, d]; writes out at rows idx[i], positions inside the
        // batch (so below out.len() / d), each row by exactly one thread.
        unsafe { self.launch(&mut b, blocks_for(n * d), "scatter_rows") }?;
        Ok(())
    }

    /// x += y over the first n values. x, y: bf16.
    fn add(&self, x: &mut CudaSlice<bf16>, y: &CudaSlice<bf16>, n: usize) -> Result<()> {
        assert!(x.len() >= n && y.len() >= n);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.add_bf16);
        b.arg(x).arg(y).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; both buffers hold n.
        unsafe { self.launch(&mut b, blocks_for(n), "add_bf16") }?;
        Ok(())
    }

    /// out = bf16(x) over the first n values.
    fn cast_f32_bf16(&self, out: &mut CudaSlice<bf16>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
        assert!(out.len() >= n && x.len() >= n);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.cast_f32_bf16);
        b.arg(out).arg(x).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; both buffers hold n.
        unsafe { self.launch(&mut b, blocks_for(n), "cast_f32_bf16") }?;
        Ok(())
    }

    /// out = dropout(x) with the counter-based mask of `seed` (see cpu::dropout), first n values.
    fn dropout(&self, out: &mut CudaSlice<bf16>, x: &CudaSlice<bf16>, seed: u64, p: f32, n: usize) -> Result<()> {
        assert!(out.len() >= n && x.len() >= n && (0.0..1.0).contains(&p));
        let (ni, keep) = (n as i64, 1.0 / (1.0 - p));
        let mut b = self.stream.launch_builder(&self.k.dropout_bf16);
        b.arg(out).arg(x).arg(&seed).arg(&p).arg(&keep).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; both buffers hold n.
        unsafe { self.launch(&mut b, blocks_for(n), "dropout_bf16") }?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl OptimOps for Cuda {
    /// parts[at + b] for b < SUM_PARTS: partial norms of x[..n] (each the square root of an f64 sum
    /// of squares over a share of the i); the norm is sqrt(sum of parts^2).
    /// parts: [at + SUM_PARTS ..] f32; x: [n ..] f32.
    fn partial_norms(&self, parts: &mut CudaSlice<f32>, at: usize, x: &CudaSlice<f32>, n: usize) -> Result<()> {
        assert!(
            at + SUM_PARTS <= parts.len() && n <= x.len(),
            "partial_norms: out of range"
        );
        let mut out = parts.slice_mut(at..at + SUM_PARTS);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.partial_norms);
        b.arg(&mut out).arg(x).arg(&ni);
        let cfg = LaunchConfig {
            grid_dim: (SUM_PARTS as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: SUM_PARTS blocks write one part each into the view of SUM_PARTS; reads stop at n.
        unsafe { self.launch(&mut b, cfg, "partial_norms") }?;
        Ok(())
    }

    /// One AdamW update of n values: p[p_off..] with gradients g[p_off..] and moments m[s_off..],
    /// v[s_off..]. p, g: [p_off + n ..] f32; m, v: [s_off + n ..] f32.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        p: &mut CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        p_off: usize,
        s_off: usize,
        n: usize,
        h: &AdamStep,
    ) -> Result<()> {
        assert!(
            p_off + n <= p.len() && p_off + n <= g.len(),
            "adamw_step: parameters out of range"
        );
        assert!(
            s_off + n <= m.len() && s_off + n <= v.len(),
            "adamw_step: moments out of range"
        );
        if n == 0 {
            return Ok(());
        }
        let (mut p, g) = (p.slice_mut(p_off..p_off + n), g.slice(p_off..p_off + n));
        let (mut m, mut v) = (m.slice_mut(s_off..s_off + n), v.slice_mut(s_off..s_off + n));
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.adamw_step);
        b.arg(&mut p).arg(&mut m).arg(&mut v).arg(&g).arg(&ni);
        b.arg(&h.gscale).arg(&h.lr).arg(&h.beta1).arg(&h.beta2);
        b.arg(&h.eps).arg(&h.weight_decay).arg(&h.bc1).arg(&h.bc2_sqrt);
        // SAFETY: elementwise over n values, bounded inside the kernel; the four views hold n each.
        unsafe { self.launch(&mut b, blocks_for(n), "adamw_step") }?;
        Ok(())
    }
}
