//! The CUDA backend: our kernels from kernels/*.cu (compiled by build.rs), loaded through cudarc.
//! Every kernel is looked up once, when the device is opened, so a missing kernel is an error at
//! start-up that names it, never a failed lookup in the middle of a run.
//!
//! Status: RMSNorm, RoPE, SwiGLU, AdamW, embedding, LoRA, fused cross-entropy, packed attention, NF4
//! dequantization and the NF4 GEMM (both orientations, tiled, f32 accumulation) are here and checked
//! by `sqlora selftest` against the CPU reference; the fast kernels (tensor cores, flash-style
//! attention) and training on the device are still to come.

pub mod selftest;

use super::kernels;
use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::bf16;
use std::sync::Arc;

/// Why there is no usable GPU, in words a user can act on; `None` when one can be opened.
pub fn unavailable() -> Option<String> {
    if !kernels::KERNELS_BUILT {
        return Some(
            "this build has no CUDA kernels (nvcc was not found at build time): run .ci/run once, or set NVCC \
             or CUDA_HOME, and rebuild"
                .into(),
        );
    }
    // SAFETY: only checks whether libcuda can be loaded; calls nothing in it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver (libcuda) on this machine".into());
    }
    None
}

/// The kernels, loaded.
pub struct Kernels {
    pub rmsnorm_fwd: CudaFunction,
    pub rmsnorm_bwd: CudaFunction,
    pub rope_rotate: CudaFunction,
    pub swiglu_fwd: CudaFunction,
    pub swiglu_bwd: CudaFunction,
    pub adamw_step: CudaFunction,
    pub nf4_dequantize_absmax: CudaFunction,
    pub nf4_dequantize: CudaFunction,
    pub nf4_gemm_fwd: CudaFunction,
    pub nf4_gemm_bwd_input: CudaFunction,
    pub embedding_fwd: CudaFunction,
    pub lora: [CudaFunction; 6],
    pub attention_fwd: CudaFunction,
    pub attention_bwd: CudaFunction,
    pub cross_entropy_fwd_bwd: CudaFunction,
}

/// An NF4 weight on the device: packed codes and dequantized per-64 scales.
pub struct Nf4Device {
    /// [ceil(out * in / 2)] u8
    pub packed: CudaSlice<u8>,
    /// [ceil(out * in / 64)] f32
    pub absmax: CudaSlice<f32>,
    pub out_features: usize,
    pub in_features: usize,
}

/// Grid of a tiled NF4 GEMM: 64 output columns by 16 rows per block of (64, 4) threads.
fn gemm_tiles(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(64) as u32, rows.div_ceil(16) as u32, 1),
        block_dim: (64, 4, 1),
        shared_mem_bytes: 0,
    }
}

/// An opened GPU with our kernels loaded.
pub struct Cuda {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub k: Kernels,
}

fn load(ctx: &Arc<CudaContext>, file: &str, fatbin: &[u8], names: &[&str]) -> Result<Vec<CudaFunction>> {
    let module = ctx
        .load_module(Ptx::from_binary(fatbin.to_vec()))
        .with_context(|| format!("loading kernels/{file}.cu (does the fatbin have code for this GPU?)"))?;
    names
        .iter()
        .map(|n| {
            module
                .load_function(n)
                .with_context(|| format!("kernel {n} is missing from kernels/{file}.cu"))
        })
        .collect()
}

/// A launch configuration of `ceil(n / 256)` blocks of 256 threads.
fn blocks_for(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of 256 threads per row.
fn block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Cuda {
    /// Open GPU 0 and load every kernel.
    pub fn new() -> Result<Cuda> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        let ctx = CudaContext::new(0).context("opening CUDA device 0")?;
        let stream = ctx.default_stream();
        let [rmsnorm_fwd, rmsnorm_bwd]: [CudaFunction; 2] =
            load(&ctx, "rmsnorm", kernels::RMSNORM, &["rmsnorm_fwd", "rmsnorm_bwd"])?
                .try_into()
                .unwrap();
        let [rope_rotate]: [CudaFunction; 1] = load(&ctx, "rope", kernels::ROPE, &["rope_rotate"])?.try_into().unwrap();
        let [swiglu_fwd, swiglu_bwd]: [CudaFunction; 2] =
            load(&ctx, "swiglu", kernels::SWIGLU, &["swiglu_fwd", "swiglu_bwd"])?
                .try_into()
                .unwrap();
        let [adamw_step]: [CudaFunction; 1] = load(&ctx, "adamw", kernels::ADAMW, &["adamw_step"])?
            .try_into()
            .unwrap();
        let [nf4_dequantize_absmax, nf4_dequantize, nf4_gemm_fwd, nf4_gemm_bwd_input]: [CudaFunction; 4] = load(
            &ctx,
            "nf4",
            kernels::NF4,
            &[
                "nf4_dequantize_absmax",
                "nf4_dequantize",
                "nf4_gemm_fwd",
                "nf4_gemm_bwd_input",
            ],
        )?
        .try_into()
        .unwrap();
        let lora: [CudaFunction; 6] = load(
            &ctx,
            "lora",
            kernels::LORA,
            &["lora_xa", "lora_add", "lora_g", "lora_db", "lora_da", "lora_dx"],
        )?
        .try_into()
        .unwrap();
        let [attention_fwd, attention_bwd]: [CudaFunction; 2] = load(
            &ctx,
            "attention",
            kernels::ATTENTION,
            &["attention_fwd", "attention_bwd"],
        )?
        .try_into()
        .unwrap();
        let [cross_entropy_fwd_bwd]: [CudaFunction; 1] = load(
            &ctx,
            "cross_entropy",
            kernels::CROSS_ENTROPY,
            &["cross_entropy_fwd_bwd"],
        )?
        .try_into()
        .unwrap();
        let [embedding_fwd]: [CudaFunction; 1] = load(&ctx, "embedding", kernels::EMBEDDING, &["embedding_fwd"])?
            .try_into()
            .unwrap();
        Ok(Cuda {
            ctx,
            stream,
            k: Kernels {
                rmsnorm_fwd,
                rmsnorm_bwd,
                rope_rotate,
                swiglu_fwd,
                swiglu_bwd,
                adamw_step,
                nf4_dequantize_absmax,
                nf4_dequantize,
                nf4_gemm_fwd,
                nf4_gemm_bwd_input,
                embedding_fwd,
                lora,
                attention_fwd,
                attention_bwd,
                cross_entropy_fwd_bwd,
            },
        })
    }

    /// y = rmsnorm(x) * w, keeping each row's inverse RMS.
    /// y, x: [T, d]; rstd: [T]; w: [d].
    pub fn rmsnorm_fwd(
        &self,
        y: &mut CudaSlice<bf16>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        eps: f32,
    ) -> Result<()> {
        let d = w.len();
        let rows = x.len() / d;
        assert!(y.len() == x.len() && rstd.len() == rows);
        let di = d as i32;
        let mut b = self.stream.launch_builder(&self.k.rmsnorm_fwd);
        b.arg(y).arg(rstd).arg(x).arg(w).arg(&di).arg(&eps);
        // SAFETY: the kernel reads x [rows, d] and w [d], writes y [rows, d] and rstd [rows]; the
        // buffers have exactly those lengths (asserted above) and one block handles one row.
        unsafe { b.launch(block_per_row(rows)) }.context("kernel rmsnorm_fwd")?;
        Ok(())
    }

    /// dx of RMSNorm (frozen gain). dx, dy, x: [T, d]; w: [d]; rstd: [T] from the forward.
    pub fn rmsnorm_bwd(
        &self,
        dx: &mut CudaSlice<bf16>,
        dy: &CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        rstd: &CudaSlice<f32>,
    ) -> Result<()> {
        let d = w.len();
        let rows = x.len() / d;
        assert!(dx.len() == x.len() && dy.len() == x.len() && rstd.len() == rows);
        let di = d as i32;
        let mut b = self.stream.launch_builder(&self.k.rmsnorm_bwd);
        b.arg(dx).arg(dy).arg(x).arg(w).arg(rstd).arg(&di);
        // SAFETY: reads dy, x [rows, d], w [d], rstd [rows]; writes dx [rows, d]; lengths asserted.
        unsafe { b.launch(block_per_row(rows)) }.context("kernel rmsnorm_bwd")?;
        Ok(())
    }

    /// Rotate x in place by `sign * pos * inv_freq` (sign +1 forward, -1 backward).
    /// x: [T, heads, hd]; pos: [T]; inv_freq: [hd/2].
    pub fn rope_rotate(
        &self,
        x: &mut CudaSlice<bf16>,
        pos: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        let (t, hd) = (pos.len(), 2 * inv_freq.len());
        assert_eq!(x.len(), t * heads * hd);
        let n = t * heads * hd / 2;
        let (ti, hi, hdi) = (t as i32, heads as i32, hd as i32);
        let mut b = self.stream.launch_builder(&self.k.rope_rotate);
        b.arg(x).arg(pos).arg(inv_freq).arg(&ti).arg(&hi).arg(&hdi).arg(&sign);
        // SAFETY: one thread per (token, head, pair), bounded by n inside the kernel; x is [T, heads, hd]
        // (asserted), pos [T], inv_freq [hd/2].
        unsafe { b.launch(blocks_for(n)) }.context("kernel rope_rotate")?;
        Ok(())
    }

    /// out = silu(gate) * up. All [n].
    pub fn swiglu_fwd(&self, out: &mut CudaSlice<bf16>, gate: &CudaSlice<bf16>, up: &CudaSlice<bf16>) -> Result<()> {
        let n = gate.len();
        assert!(out.len() == n && up.len() == n);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.swiglu_fwd);
        b.arg(out).arg(gate).arg(up).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; all three buffers hold n.
        unsafe { b.launch(blocks_for(n)) }.context("kernel swiglu_fwd")?;
        Ok(())
    }

    /// SwiGLU backward. All [n].
    pub fn swiglu_bwd(
        &self,
        dgate: &mut CudaSlice<bf16>,
        dup: &mut CudaSlice<bf16>,
        dout: &CudaSlice<bf16>,
        gate: &CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
    ) -> Result<()> {
        let n = gate.len();
        assert!(dgate.len() == n && dup.len() == n && dout.len() == n && up.len() == n);
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.swiglu_bwd);
        b.arg(dgate).arg(dup).arg(dout).arg(gate).arg(up).arg(&ni);
        // SAFETY: elementwise over n values, bounded inside the kernel; all five buffers hold n.
        unsafe { b.launch(blocks_for(n)) }.context("kernel swiglu_bwd")?;
        Ok(())
    }

    /// One AdamW update of a page. p, m, v, g: [n] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        p: &mut CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        lr: f32,
        c: crate::optim::AdamWConfig,
        step: u64,
    ) -> Result<()> {
        let n = p.len();
        assert!(m.len() == n && v.len() == n && g.len() == n && step > 0);
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(step as i32)).sqrt();
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.adamw_step);
        b.arg(p)
            .arg(m)
            .arg(v)
            .arg(g)
            .arg(&ni)
            .arg(&lr)
            .arg(&c.beta1)
            .arg(&c.beta2);
        b.arg(&c.eps).arg(&c.weight_decay).arg(&bc1).arg(&bc2_sqrt);
        // SAFETY: elementwise over n values, bounded inside the kernel; all four buffers hold n.
        unsafe { b.launch(blocks_for(n)) }.context("kernel adamw_step")?;
        Ok(())
    }

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
        unsafe { b.launch(blocks_for(n)) }.context("kernel nf4_dequantize_absmax")?;
        Ok(())
    }

    /// Packed NF4 codes to bf16. out: [n]; packed: [ceil(n / 2)]; absmax: [ceil(n / 64)].
    pub fn nf4_dequantize(
        &self,
        out: &mut CudaSlice<bf16>,
        packed: &CudaSlice<u8>,
        absmax: &CudaSlice<f32>,
    ) -> Result<()> {
        let n = out.len();
        assert!(packed.len() == n.div_ceil(2) && absmax.len() == n.div_ceil(64));
        let ni = n as i64;
        let mut b = self.stream.launch_builder(&self.k.nf4_dequantize);
        b.arg(out).arg(packed).arg(absmax).arg(&ni);
        // SAFETY: one thread per packed byte, bounded by n inside the kernel; lengths asserted above.
        unsafe { b.launch(blocks_for(n.div_ceil(2))) }.context("kernel nf4_dequantize")?;
        Ok(())
    }

    /// y = x W^T (+ bias) with W in NF4. y: [T, out]; x: [T, in]; bias: [out].
    pub fn nf4_gemm_fwd(
        &self,
        y: &mut CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        w: &Nf4Device,
        bias: Option<&CudaSlice<bf16>>,
    ) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        let t = x.len() / k;
        assert!(x.len() == t * k && y.len() == t * n && bias.is_none_or(|b| b.len() == n));
        assert!(w.packed.len() == (n * k).div_ceil(2) && w.absmax.len() == (n * k).div_ceil(64));
        let (ti, ni, ki, null) = (t as i32, n as i32, k as i32, 0u64);
        let mut b = self.stream.launch_builder(&self.k.nf4_gemm_fwd);
        b.arg(y).arg(x).arg(&w.packed).arg(&w.absmax);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&null), // a null `const bf16*`: no bias
        };
        b.arg(&ti).arg(&ni).arg(&ki);
        // SAFETY: reads x [T, in], the packed weight and scales of [out, in] (lengths asserted) and
        // bias [out] if given; writes y [T, out]. Every access is bounds-checked against T, N, K.
        unsafe { b.launch(gemm_tiles(t, n)) }.context("kernel nf4_gemm_fwd")?;
        Ok(())
    }

    /// dx = dy W with W in NF4. dx: [T, in]; dy: [T, out].
    pub fn nf4_gemm_bwd_input(&self, dx: &mut CudaSlice<bf16>, dy: &CudaSlice<bf16>, w: &Nf4Device) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        let t = dy.len() / n;
        assert!(dy.len() == t * n && dx.len() == t * k);
        let (ti, ni, ki) = (t as i32, n as i32, k as i32);
        let mut b = self.stream.launch_builder(&self.k.nf4_gemm_bwd_input);
        b.arg(dx)
            .arg(dy)
            .arg(&w.packed)
            .arg(&w.absmax)
            .arg(&ti)
            .arg(&ni)
            .arg(&ki);
        // SAFETY: reads dy [T, out] and the NF4 weight [out, in]; writes dx [T, in]; every access is
        // bounds-checked against T, N, K inside the kernel.
        unsafe { b.launch(gemm_tiles(t, k)) }.context("kernel nf4_gemm_bwd_input")?;
        Ok(())
    }

    /// out[t] = table[tokens[t]]. out: [T, d]; table: [vocab, d]; tokens: [T].
    pub fn embedding_fwd(
        &self,
        out: &mut CudaSlice<bf16>,
        table: &CudaSlice<bf16>,
        tokens: &CudaSlice<i32>,
        d: usize,
    ) -> Result<()> {
        let (t, vocab) = (tokens.len(), table.len() / d);
        assert!(out.len() == t * d && table.len() == vocab * d);
        let (ti, di, vi) = (t as i32, d as i32, vocab as i32);
        let mut b = self.stream.launch_builder(&self.k.embedding_fwd);
        b.arg(out).arg(table).arg(tokens).arg(&ti).arg(&di).arg(&vi);
        // SAFETY: one thread per output value (bounded by T * d in the kernel); token ids are checked
        // against vocab before the table is read.
        unsafe { b.launch(blocks_for(t * d)) }.context("kernel embedding_fwd")?;
        Ok(())
    }

    /// LoRA forward: xa = x A^T, then y += s xa B^T.
    /// y: [T, out]; xa: [T, r] f32; x: [T, in]; a: [r, in]; b: [out, r].
    #[allow(clippy::too_many_arguments)]
    pub fn lora_fwd(
        &self,
        y: &mut CudaSlice<bf16>,
        xa: &mut CudaSlice<f32>,
        x: &CudaSlice<bf16>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        let (k, n) = (a.len() / r, b.len() / r);
        let t = x.len() / k;
        assert!(x.len() == t * k && y.len() == t * n && xa.len() == t * r);
        let (ti, ki, ni, ri) = (t as i32, k as i32, n as i32, r as i32);
        let mut l = self.stream.launch_builder(&self.k.lora[0]);
        l.arg(&mut *xa).arg(x).arg(a).arg(&ti).arg(&ki).arg(&ri);
        // SAFETY: one warp per (t, c) of xa [T, r], bounded in the kernel; x [T, in], a [r, in] asserted.
        unsafe { l.launch(blocks_for(t * r * 32)) }.context("kernel lora_xa")?;
        let mut l = self.stream.launch_builder(&self.k.lora[1]);
        l.arg(y).arg(&*xa).arg(b).arg(&ti).arg(&ni).arg(&ri).arg(&scale);
        // SAFETY: one thread per element of y [T, out], bounded in the kernel; xa [T, r], b [out, r].
        unsafe { l.launch(blocks_for(t * n)) }.context("kernel lora_add")?;
        Ok(())
    }

    /// LoRA backward: with g = dy B, dB += s dy^T xa, dA += s g^T x, dx += s g A.
    /// dx: [T, in] (added to); da: [r, in] f32 and db: [out, r] f32 (accumulated); g: [T, r] f32
    /// (scratch); dy: [T, out]; x: [T, in]; xa: [T, r] f32 from the forward.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_bwd(
        &self,
        dx: &mut CudaSlice<bf16>,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        dy: &CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        xa: &CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        let (k, n) = (a.len() / r, b.len() / r);
        let t = x.len() / k;
        assert!(dx.len() == t * k && dy.len() == t * n && xa.len() == t * r && g.len() == t * r);
        assert!(da.len() == a.len() && db.len() == b.len());
        let (ti, ki, ni, ri) = (t as i32, k as i32, n as i32, r as i32);
        let mut l = self.stream.launch_builder(&self.k.lora[2]);
        l.arg(&mut *g).arg(dy).arg(b).arg(&ti).arg(&ni).arg(&ri);
        // SAFETY: one warp per (t, c) of g [T, r]; dy [T, out], b [out, r]; bounded in the kernel.
        unsafe { l.launch(blocks_for(t * r * 32)) }.context("kernel lora_g")?;
        let mut l = self.stream.launch_builder(&self.k.lora[3]);
        l.arg(db).arg(dy).arg(xa).arg(&ti).arg(&ni).arg(&ri).arg(&scale);
        // SAFETY: one thread per element of db [out, r]; reads dy [T, out] and xa [T, r].
        unsafe { l.launch(blocks_for(n * r)) }.context("kernel lora_db")?;
        let mut l = self.stream.launch_builder(&self.k.lora[4]);
        l.arg(da).arg(&*g).arg(x).arg(&ti).arg(&ki).arg(&ri).arg(&scale);
        // SAFETY: one thread per element of da [r, in]; reads g [T, r] and x [T, in].
        unsafe { l.launch(blocks_for(r * k)) }.context("kernel lora_da")?;
        let mut l = self.stream.launch_builder(&self.k.lora[5]);
        l.arg(dx).arg(&*g).arg(a).arg(&ti).arg(&ki).arg(&ri).arg(&scale);
        // SAFETY: one thread per element of dx [T, in]; reads g [T, r] and a [r, in].
        unsafe { l.launch(blocks_for(t * k)) }.context("kernel lora_dx")?;
        Ok(())
    }

    /// Fused loss and input gradient through the output head, on rows with a target (-1: none).
    /// dh: [T, d]; loss: [T] f32 (per row, un-normalised); h: [T, d]; head: [vocab, d]; targets: [T].
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_fwd_bwd(
        &self,
        dh: &mut CudaSlice<bf16>,
        loss: &mut CudaSlice<f32>,
        h: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        targets: &CudaSlice<i32>,
        d: usize,
        inv_count: f32,
    ) -> Result<()> {
        let (t, vocab) = (targets.len(), head.len() / d);
        assert!(dh.len() == t * d && h.len() == t * d && loss.len() == t && head.len() == vocab * d);
        let (di, vi) = (d as i32, vocab as i32);
        let mut l = self.stream.launch_builder(&self.k.cross_entropy_fwd_bwd);
        l.arg(dh)
            .arg(loss)
            .arg(h)
            .arg(head)
            .arg(targets)
            .arg(&di)
            .arg(&vi)
            .arg(&inv_count);
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (2 * d * 4) as u32,
        };
        // SAFETY: one block per row of h [T, d]; each reads the whole head [vocab, d] (asserted) and
        // writes its row of dh and loss; 2 d floats of dynamic shared memory are requested.
        unsafe { l.launch(cfg) }.context("kernel cross_entropy_fwd_bwd")?;
        Ok(())
    }

    /// Causal GQA attention over packed sequences. out, q: [T, heads, hd]; k, v: [T, kv_heads, hd];
    /// seq_start: [T] (index of the first token of each token's sequence); max_len: longest sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd(
        &self,
        out: &mut CudaSlice<bf16>,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        seq_start: &CudaSlice<i32>,
        heads: usize,
        kv_heads: usize,
        max_len: usize,
    ) -> Result<()> {
        let t = seq_start.len();
        let hd = q.len() / (t * heads);
        assert!(
            out.len() == q.len()
                && k.len() == t * kv_heads * hd
                && v.len() == k.len()
                && heads.is_multiple_of(kv_heads)
        );
        anyhow::ensure!(
            max_len * 4 <= 48 * 1024,
            "attention_fwd: sequences of {max_len} tokens exceed shared memory"
        );
        let (hi, kvi, hdi) = (heads as i32, kv_heads as i32, hd as i32);
        let mut l = self.stream.launch_builder(&self.k.attention_fwd);
        l.arg(out)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(seq_start)
            .arg(&hi)
            .arg(&kvi)
            .arg(&hdi);
        let cfg = LaunchConfig {
            grid_dim: ((t * heads) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (max_len * 4) as u32,
        };
        // SAFETY: one block per (token, head); keys are read from seq_start[t] to t only, which lie in
        // [0, T) when seq_start is a valid packing; the probability row fits the max_len floats requested.
        unsafe { l.launch(cfg) }.context("kernel attention_fwd")?;
        Ok(())
    }

    /// Attention backward. dq: [T, heads, hd] (written); dk, dv: [T, kv_heads, hd] f32 (accumulated:
    /// zero them first); the rest as in [`Cuda::attention_fwd`], plus dout: [T, heads, hd].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        dq: &mut CudaSlice<bf16>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        seq_start: &CudaSlice<i32>,
        heads: usize,
        kv_heads: usize,
        max_len: usize,
    ) -> Result<()> {
        let t = seq_start.len();
        let hd = q.len() / (t * heads);
        assert!(dq.len() == q.len() && dout.len() == q.len() && dk.len() == k.len() && dv.len() == v.len());
        anyhow::ensure!(
            2 * max_len * 4 <= 48 * 1024,
            "attention_bwd: sequences of {max_len} tokens exceed shared memory"
        );
        let (hi, kvi, hdi, mli) = (heads as i32, kv_heads as i32, hd as i32, max_len as i32);
        let mut l = self.stream.launch_builder(&self.k.attention_bwd);
        l.arg(dq).arg(dk).arg(dv).arg(dout).arg(q).arg(k).arg(v).arg(seq_start);
        l.arg(&hi).arg(&kvi).arg(&hdi).arg(&mli);
        let cfg = LaunchConfig {
            grid_dim: ((t * heads) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (2 * max_len * 4) as u32,
        };
        // SAFETY: as attention_fwd; dk and dv have the shape of k and v (asserted) and only keys of the
        // token's own sequence are touched; 2 max_len floats of shared memory are requested.
        unsafe { l.launch(cfg) }.context("kernel attention_bwd")?;
        Ok(())
    }
}
