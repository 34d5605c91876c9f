//! The LoRA branch on the GPU, two ways (kernels/lora.cu), chosen by `SQLORA_LORA`:
//!
//! - `tiled` (the default): each thread owns a 4 x 4 tile of outputs and a slice of the long sum,
//!   the slices added in order at the end (x A^T, dy B, dA, dB); the rank expansions (y += s xa B^T,
//!   dx += s g A) stage their small operands in shared memory so every global access is coalesced.
//! - `simple`: one output per thread (the first kernels written, kept to compare against).
//!
//! Both are deterministic and keep every intermediate in f32; the tiled sums add in another order,
//! so the two agree to rounding (`sqlora selftest` checks each against the CPU).

use super::Cuda;
use crate::engine::{Bf, LoraOps, F32};
use crate::model::lora::LoraAt;
use anyhow::{bail, Result};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;
use std::ops::Range;

/// The largest LoRA rank the GPU kernels take (kernels/lora.cu RP_MAX_R, TS_MAX_R, LT_MAX_R).
pub const MAX_RANK: usize = 64;

/// Which LoRA kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPath {
    Tiled,
    Simple,
}

impl LoraPath {
    /// From `SQLORA_LORA` (tiled or simple); `Tiled` when unset.
    pub(super) fn from_env() -> Result<LoraPath> {
        Ok(match std::env::var("SQLORA_LORA").as_deref() {
            Err(_) | Ok("tiled") => LoraPath::Tiled,
            Ok("simple") => LoraPath::Simple,
            Ok(other) => bail!("SQLORA_LORA={other}: use tiled or simple"),
        })
    }
}

/// The kernels of kernels/lora.cu in the order `Cuda::open` loads them: the simple six, then the
/// tiled six, each as xa, add, g, db, da, dx.
pub(super) const LORA_KERNELS: [&str; 12] = [
    "lora_xa",
    "lora_add",
    "lora_g",
    "lora_db",
    "lora_da",
    "lora_dx",
    "lora_xa_tiled",
    "lora_add_tiled",
    "lora_g_tiled",
    "lora_db_tiled",
    "lora_da_tiled",
    "lora_dx_tiled",
];

/// The long sums (xa, g, dB, dA): a block of 256 threads per 16 rows of the output, in both paths.
fn per_16(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(16).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The rank expansions (y += s xa B^T, dx += s g A) over a [t, n] output: one thread per element
/// (simple), or a block of 256 per tile of 16 rows by 64 columns (tiled).
fn expand_cfg(path: LoraPath, t: usize, n: usize) -> LaunchConfig {
    match path {
        LoraPath::Simple => super::blocks_for(t * n),
        LoraPath::Tiled => LaunchConfig {
            grid_dim: (n.div_ceil(64).max(1) as u32, t.div_ceil(16).max(1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
    }
}

/// Where A [r, in] and B [out, r] lie in an adapter buffer of `len` elements, after checking that
/// `at` places them back to back inside it and that the kernels take rank `r`.
fn adapter_ranges(at: LoraAt, r: usize, len: usize, dir: &str) -> Result<(Range<usize>, Range<usize>)> {
    let (k, n) = (at.inp, at.out);
    assert!(
        at.b == at.a + r * k && at.b + n * r <= len,
        "lora_{dir}: adapter out of range"
    );
    anyhow::ensure!(
        r <= MAX_RANK,
        "LoRA rank {r} is over the {MAX_RANK} the GPU kernels take"
    );
    Ok((at.a..at.b, at.b..at.b + n * r))
}

impl Cuda {
    /// The path's kernel `i` (0 xa, 1 add, 2 g, 3 db, 4 da, 5 dx), and its name for errors.
    fn lora_kernel(&self, path: LoraPath, i: usize) -> (&CudaFunction, &'static str) {
        let i = i + if path == LoraPath::Tiled { 6 } else { 0 };
        (&self.k.lora[i], LORA_KERNELS[i])
    }

    /// LoRA forward by `path`: xa = x A^T, then y += s xa B^T, with A [r, in] and B [out, r] where
    /// `at` places them in w (the adapters' bf16 copies). y: [t, out]; xa: [t, r] f32; x: [t, in].
    #[allow(clippy::too_many_arguments)]
    pub fn lora_fwd_via(
        &self,
        path: LoraPath,
        y: &mut CudaSlice<bf16>,
        xa: &mut CudaSlice<f32>,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        at: LoraAt,
        t: usize,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        let (k, n) = (at.inp, at.out);
        assert!(x.len() >= t * k && y.len() >= t * n && xa.len() >= t * r);
        let (ar, br) = adapter_ranges(at, r, w.len(), "fwd")?;
        let (a, b) = (w.slice(ar), w.slice(br));
        let (ti, ki, ni, ri) = (t as i32, k as i32, n as i32, r as i32);
        let (f, name) = self.lora_kernel(path, 0);
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut *xa).arg(x).arg(&a).arg(&ti).arg(&ki).arg(&ri);
        // SAFETY: a block per 16 rows of xa [t, r] (r <= MAX_RANK checked; rows bounded by t in the
        // kernel); reads x [t, in] and a [r, in] (asserted).
        unsafe { self.launch(&mut l, per_16(t), name) }?;
        let (f, name) = self.lora_kernel(path, 1);
        let mut l = self.stream.launch_builder(f);
        l.arg(y).arg(&*xa).arg(&b).arg(&ti).arg(&ni).arg(&ri).arg(&scale);
        // SAFETY: the grid covers y [t, out] (an element per thread, or 16 x 64 tiles), bounded by t
        // and out in the kernel; reads xa [t, r] and b [out, r].
        unsafe { self.launch(&mut l, expand_cfg(path, t, n), name) }?;
        Ok(())
    }

    /// LoRA backward by `path`: with g = dy B, dB += s dy^T xa, dA += s g^T x, dx += s g A; dA
    /// [r, in] and dB [out, r] (f32, accumulated) where `at` places them in grad, A and B where it
    /// places them in w. dx: [t, in] (added to); g: [t, r] f32 (scratch); dy: [t, out]; x: [t, in];
    /// xa: [t, r] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_bwd_via(
        &self,
        path: LoraPath,
        dx: &mut CudaSlice<bf16>,
        grad: &mut CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        dy: &CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        xa: &CudaSlice<f32>,
        w: &CudaSlice<bf16>,
        at: LoraAt,
        t: usize,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        let (k, n) = (at.inp, at.out);
        assert!(dx.len() >= t * k && x.len() >= t * k && dy.len() >= t * n && xa.len() >= t * r && g.len() >= t * r);
        let (ar, br) = adapter_ranges(at, r, w.len().min(grad.len()), "bwd")?;
        let (a, b) = (w.slice(ar.clone()), w.slice(br.clone()));
        let (mut lo, mut hi) = grad.split_at_mut(br.start);
        let (mut da, mut db) = (lo.slice_mut(ar.start..), hi.slice_mut(..br.len()));
        let (ti, ki, ni, ri) = (t as i32, k as i32, n as i32, r as i32);
        let (f, name) = self.lora_kernel(path, 2);
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut *g).arg(dy).arg(&b).arg(&ti).arg(&ni).arg(&ri);
        // SAFETY: a block per 16 rows of g [t, r] (r <= MAX_RANK checked; rows bounded by t in the
        // kernel); reads dy [t, out] and b [out, r].
        unsafe { self.launch(&mut l, per_16(t), name) }?;
        let (f, name) = self.lora_kernel(path, 3);
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut db).arg(dy).arg(xa).arg(&ti).arg(&ni).arg(&ri).arg(&scale);
        // SAFETY: a block per 16 columns of db [out, r] (r <= MAX_RANK checked; columns bounded by
        // out in the kernel); reads dy [t, out] and xa [t, r].
        unsafe { self.launch(&mut l, per_16(n), name) }?;
        let (f, name) = self.lora_kernel(path, 4);
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut da).arg(&*g).arg(x).arg(&ti).arg(&ki).arg(&ri).arg(&scale);
        // SAFETY: a block per 16 columns of da [r, in] (r <= MAX_RANK checked; columns bounded by
        // in in the kernel); reads g [t, r] and x [t, in].
        unsafe { self.launch(&mut l, per_16(k), name) }?;
        let (f, name) = self.lora_kernel(path, 5);
        let mut l = self.stream.launch_builder(f);
        l.arg(dx).arg(&*g).arg(&a).arg(&ti).arg(&ki).arg(&ri).arg(&scale);
        // SAFETY: the grid covers dx [t, in] (an element per thread, or 16 x 64 tiles), bounded by t
        // and in in the kernel; reads g [t, r] and a [r, in].
        unsafe { self.launch(&mut l, expand_cfg(path, t, k), name) }?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl LoraOps for Cuda {
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
        self.lora_fwd_via(self.lora, y, xa, x, w, at, t, r, scale)
    }
    fn lora_bwd(
        &self,
        dx: &mut Bf<Self>,
        grad: &mut F32<Self>,
        g: &mut F32<Self>,
        dy: &Bf<Self>,
        x: &Bf<Self>,
        xa: &F32<Self>,
        w: &Bf<Self>,
        at: LoraAt,
        t: usize,
        r: usize,
        scale: f32,
    ) -> Result<()> {
        self.lora_bwd_via(self.lora, dx, grad, g, dy, x, xa, w, at, t, r, scale)
    }
}
