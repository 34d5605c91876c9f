//! The NF4 GEMMs of a projection, three ways, and the choice between them.
//!
//! - `Tiled`: kernels/nf4.cu's shared-memory tiles with f32 FMA (the plainest version);
//! - `Mma`: the same dequantize-in-the-tile GEMM on tensor cores (kernels/mma.cuh);
//! - `Cublas`: dequantize the whole weight to bf16 into a scratch buffer, then cuBLAS;
//! - `Gemv`: decode shapes only (forward, at most 16 rows): a warp per output reads each weight
//!   row once, 32 codes per 16-byte load. Chosen by `Auto` only.
//!
//! `Auto` (the default) times every available path the first time it meets a shape (orientation,
//! out, in, and tokens rounded up to a power of two), keeps only the paths whose output agrees with
//! the tiled kernel's, and from then on uses the fastest: the engine runs whichever measures faster
//! per shape, and a broken fast path can only lose the race, not corrupt training.

use super::{gemm_tiles, is_out_of_memory, mma_tiles, Cuda, Nf4Device};
use crate::engine::Nf4Gemm;
use anyhow::{bail, Context, Result};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How a projection's NF4 GEMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmPath {
    Tiled,
    Mma,
    Cublas,
    Gemv,
    Auto,
}

/// The most rows of x the GEMV kernel takes (kernels/nf4.cu: GEMV_MAX_M).
pub const GEMV_MAX_M: usize = 16;

impl GemmPath {
    /// From `SQLORA_NF4_GEMM` (auto, tiled, mma or cublas); `Auto` when unset.
    pub(super) fn from_env() -> Result<GemmPath> {
        Ok(match std::env::var("SQLORA_NF4_GEMM").as_deref() {
            Err(_) | Ok("auto") => GemmPath::Auto,
            Ok("tiled") => GemmPath::Tiled,
            Ok("mma") => GemmPath::Mma,
            Ok("cublas") => GemmPath::Cublas,
            Ok(other) => bail!("SQLORA_NF4_GEMM={other}: use auto, tiled, mma or cublas"),
        })
    }
}

/// One GEMM call with its inputs bound, run by the given path into the given output.
pub(super) type GemmCall<'a, T> = dyn FnMut(&Cuda, GemmPath, &mut CudaSlice<T>) -> Result<()> + 'a;

/// Which GEMM the tuner is choosing for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum GemmKind {
    /// y = x W^T with W in NF4.
    Nf4Fwd,
    /// dx = dy W with W in NF4.
    Nf4BwdInput,
    /// The loss's logits = h head^T (f32 out), dense bf16 head.
    HeadLogits,
    /// dh = dlogits head.
    HeadGrad,
}

/// A GEMM shape as the tuner keys it: (kind, out, in, tokens rounded up to a power of two).
pub(super) type Shape = (GemmKind, usize, usize, usize);

/// State shared by every clone of a [`Cuda`]: the cuBLAS handle, the dequantized-weight scratch, and
/// the tuner's choices.
pub struct GemmState {
    blas: Option<CudaBlas>,
    /// The stream cuBLAS runs on (checked before the handle is destroyed).
    stream: Option<Arc<cudarc::driver::CudaStream>>,
    /// [out * in] bf16: the weight of the current cuBLAS call, grown to the largest seen.
    scratch: Option<CudaSlice<bf16>>,
    /// The scratch did not fit: the NF4 GEMMs no longer race cuBLAS (the head's GEMMs still may).
    no_scratch: bool,
    chosen: HashMap<Shape, GemmPath>,
}

impl GemmState {
    /// Make the weight scratch hold at least `numel` values (where cuBLAS is there to use it); a
    /// smaller one is freed before the larger is allocated.
    fn grow_scratch(&mut self, stream: &Arc<cudarc::driver::CudaStream>, numel: usize) -> Result<()> {
        if self.blas.is_some() && !self.no_scratch && self.scratch.as_ref().is_none_or(|s| s.len() < numel) {
            self.scratch = None;
            let mib = (2 * numel) as f64 / (1 << 20) as f64;
            let scratch = stream.alloc_zeros(numel);
            self.scratch = Some(scratch.with_context(|| format!("the cuBLAS path's weight scratch ({mib:.0} MiB)"))?);
        }
        Ok(())
    }

    /// Stop using the NF4 GEMMs' cuBLAS path: free its scratch and forget the shapes it won. The
    /// handle stays for the head's GEMMs, which need no scratch.
    fn drop_blas_path(&mut self) {
        self.scratch = None;
        self.no_scratch = true;
        self.chosen.retain(|_, path| *path != GemmPath::Cublas);
    }

    /// Whether the cuBLAS path is available.
    pub fn has_blas(&self) -> bool {
        self.blas.is_some()
    }

    /// Whether the cuBLAS path is available to GEMMs of `kind` (the NF4 ones need the scratch).
    fn blas_for(&self, kind: GemmKind) -> bool {
        match kind {
            GemmKind::Nf4Fwd | GemmKind::Nf4BwdInput => self.has_blas() && !self.no_scratch,
            GemmKind::HeadLogits | GemmKind::HeadGrad => self.has_blas(),
        }
    }

    /// cuBLAS, when available.
    pub(super) fn blas(&self) -> Option<&CudaBlas> {
        self.blas.as_ref()
    }

    /// cuBLAS on the stream, when libcublas can be loaded.
    pub(super) fn new(stream: &Arc<cudarc::driver::CudaStream>) -> Arc<Mutex<GemmState>> {
        // SAFETY: only checks whether libcublas can be loaded; calls nothing in it.
        let blas = unsafe { cudarc::cublas::sys::is_culib_present() }
            .then(|| CudaBlas::new(stream.clone()).ok())
            .flatten();
        if blas.is_none() {
            eprintln!(
                "note: cuBLAS (libcublas.so.13) was not found or did not start: the NF4 GEMMs use our kernels \
                 only (put its folder on LD_LIBRARY_PATH to let the tuner try it)"
            );
        }
        Arc::new(Mutex::new(GemmState {
            blas,
            stream: Some(stream.clone()),
            scratch: None,
            no_scratch: false,
            chosen: HashMap::new(),
        }))
    }
}

impl Drop for GemmState {
    /// cublasDestroy synchronizes the device, so after a kernel fault it fails, and cudarc's drop
    /// would then panic over the error being reported. A faulted context keeps its handle.
    fn drop(&mut self) {
        if let Some(blas) = self.blas.take() {
            if self.stream.as_ref().is_some_and(|s| s.synchronize().is_err()) {
                std::mem::forget(blas);
            }
        }
    }
}

impl Cuda {
    /// Run `gemm` by the configured path, or by the tuner's choice for `shape` (choosing it first
    /// if this shape is new). `out` holds `out_len` meaningful values.
    fn tuned(&self, shape: Shape, out: &mut CudaSlice<bf16>, out_len: usize, gemm: &mut GemmCall<bf16>) -> Result<()> {
        if self.gemm != GemmPath::Auto {
            return gemm(self, self.gemm, out);
        }
        if out_len == 0 {
            return gemm(self, GemmPath::Tiled, out); // nothing to race on (and nothing to do)
        }
        let candidates = |has_blas: bool| {
            let mut c = vec![GemmPath::Tiled, GemmPath::Mma];
            if has_blas {
                c.push(GemmPath::Cublas);
            }
            if shape.0 == GemmKind::Nf4Fwd && shape.3 <= GEMV_MAX_M {
                c.push(GemmPath::Gemv);
            }
            c
        };
        let path = self.choose(shape, &candidates, out, 0..out_len, |v| v.to_f32(), gemm)?;
        gemm(self, path, out)
    }

    /// The tuner's path for `shape`: the one chosen before, or else the fastest of `candidates(cuBLAS
    /// is available)` whose output (`out[range]`) agrees with the first candidate's (the reference)
    /// within 2e-2 (a single candidate is taken as it is). Each runs twice, the
    /// second time timed; a path that fails (e.g. cuBLAS refusing a shape) drops out of the race,
    /// except the reference, whose error is returned (a kernel fault would poison the context and fail
    /// the next call anyway). The caller runs the chosen path once more: the race leaves `out` written
    /// by whichever path ran last.
    pub(super) fn choose<T: cudarc::driver::DeviceRepr>(
        &self,
        shape: Shape,
        candidates: &dyn Fn(bool) -> Vec<GemmPath>,
        out: &mut CudaSlice<T>,
        range: std::ops::Range<usize>,
        to_f32: fn(&T) -> f32,
        gemm: &mut GemmCall<T>,
    ) -> Result<GemmPath> {
        // One lock on the hot path: a shape seen before returns here.
        let candidates = {
            let mut st = self.gemm_state.lock().expect("GEMM state lock");
            if let Some(&path) = st.chosen.get(&shape) {
                return Ok(path);
            }
            let candidates = candidates(st.blas_for(shape.0));
            if let [only] = candidates[..] {
                st.chosen.insert(shape, only);
                return Ok(only);
            }
            candidates
        };
        let mut timed: Vec<(GemmPath, f64)> = Vec::new();
        let mut reference: Option<Vec<f32>> = None;
        for &path in &candidates {
            let mut timed_call = || -> Result<f64> {
                gemm(self, path, out)?;
                self.stream.synchronize()?;
                let started = Instant::now();
                gemm(self, path, out)?;
                self.stream.synchronize()?;
                Ok(started.elapsed().as_secs_f64())
            };
            let seconds = match timed_call() {
                Ok(s) => s,
                Err(e) if reference.is_some() => {
                    eprintln!("warning: GEMM path {path:?} failed on {shape:?} ({e:#}): not used");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let got: Vec<f32> = self
                .stream
                .clone_dtoh(&out.slice(range.clone()))?
                .iter()
                .map(to_f32)
                .collect();
            match &reference {
                None => {
                    reference = Some(got);
                    timed.push((path, seconds));
                }
                Some(want) => {
                    let err = super::rel_err(&got, want);
                    if err <= 2e-2 {
                        timed.push((path, seconds));
                    } else {
                        eprintln!(
                            "warning: GEMM path {path:?} disagrees with {:?} ({err:.1e}) on {shape:?}: not used",
                            candidates[0]
                        );
                    }
                }
            }
        }
        let best = timed
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(candidates[0], |b| b.0);
        self.gemm_state
            .lock()
            .expect("GEMM state lock")
            .chosen
            .insert(shape, best);
        Ok(best)
    }

    /// y = x W^T (+ bias) with W in NF4 by the given path. y: [t, out]; x: [t, in]; bias: [out].
    pub fn nf4_gemm_fwd_via(
        &self,
        path: GemmPath,
        y: &mut CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        w: &Nf4Device,
        bias: Option<&CudaSlice<bf16>>,
        t: usize,
    ) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        assert!(x.len() >= t * k && y.len() >= t * n && bias.is_none_or(|b| b.len() == n));
        assert!(w.packed.len() == (n * k).div_ceil(2) && w.absmax.len() == (n * k).div_ceil(64));
        if t == 0 {
            return Ok(()); // an empty grid is not a launch
        }
        let (ti, ni, ki, null) = (t as i32, n as i32, k as i32, 0u64);
        let (kernel, grid, name) = match path {
            GemmPath::Tiled => (&self.k.nf4_gemm_fwd, gemm_tiles(t, n), "nf4_gemm_fwd"),
            GemmPath::Mma => (&self.k.nf4_gemm_fwd_mma, mma_tiles(t, n), "nf4_gemm_fwd_mma"),
            GemmPath::Cublas => return self.cublas_fwd(y, x, w, bias, t),
            GemmPath::Gemv => {
                anyhow::ensure!(t <= GEMV_MAX_M, "nf4_gemv takes at most {GEMV_MAX_M} rows, not {t}");
                let grid = super::blocks_for(n * 32);
                (&self.k.nf4_gemv, grid, "nf4_gemv")
            }
            GemmPath::Auto => return self.nf4_gemm_fwd(y, x, w, bias, t),
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(y).arg(x).arg(&w.packed).arg(&w.absmax);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&null), // a null `const bf16*`: no bias
        };
        b.arg(&ti).arg(&ni).arg(&ki);
        // SAFETY: reads x [t, in], the packed weight and scales of [out, in] (lengths asserted) and
        // bias [out] if given; writes y [t, out]. Each kernel bounds-checks every access against
        // t, N, K, and its grid covers [t, out] (in tiles, or one warp per output column with
        // t <= GEMV_MAX_M checked above).
        unsafe { self.launch(&mut b, grid, name) }?;
        Ok(())
    }

    /// dx = dy W with W in NF4 by the given path. dx: [t, in]; dy: [t, out].
    pub fn nf4_gemm_bwd_input_via(
        &self,
        path: GemmPath,
        dx: &mut CudaSlice<bf16>,
        dy: &CudaSlice<bf16>,
        w: &Nf4Device,
        t: usize,
    ) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        assert!(dy.len() >= t * n && dx.len() >= t * k);
        assert!(w.packed.len() == (n * k).div_ceil(2) && w.absmax.len() == (n * k).div_ceil(64));
        if t == 0 {
            return Ok(());
        }
        let (ti, ni, ki) = (t as i32, n as i32, k as i32);
        let (kernel, grid, name) = match path {
            GemmPath::Tiled => (&self.k.nf4_gemm_bwd_input, gemm_tiles(t, k), "nf4_gemm_bwd_input"),
            GemmPath::Mma => (
                &self.k.nf4_gemm_bwd_input_mma,
                mma_tiles(t, k),
                "nf4_gemm_bwd_input_mma",
            ),
            GemmPath::Cublas => return self.cublas_bwd_input(dx, dy, w, t),
            GemmPath::Gemv => bail!("nf4_gemv has no input-gradient orientation"),
            GemmPath::Auto => return self.nf4_gemm_bwd_input(dx, dy, w, t),
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(dx)
            .arg(dy)
            .arg(&w.packed)
            .arg(&w.absmax)
            .arg(&ti)
            .arg(&ni)
            .arg(&ki);
        // SAFETY: reads dy [t, out] and the NF4 weight [out, in]; writes dx [t, in]; either kernel
        // bounds-checks every access against t, N, K, and its grid covers [t, in] in its tile size.
        unsafe { self.launch(&mut b, grid, name) }?;
        Ok(())
    }

    /// Size the cuBLAS path's weight scratch for a weight of `numel` values now (the engine calls
    /// this as it uploads each weight), so that no GEMM allocates inside a training step. The path
    /// is optional under `auto`: without room for the scratch, the tuner keeps to our kernels.
    pub fn reserve_gemm_scratch(&self, numel: usize) -> Result<()> {
        if !matches!(self.gemm, GemmPath::Auto | GemmPath::Cublas) {
            return Ok(()); // a forced path that never dequantizes a whole weight
        }
        let mut st = self.gemm_state.lock().expect("GEMM state lock");
        match st.grow_scratch(&self.stream, numel) {
            Err(e) if self.gemm == GemmPath::Auto && is_out_of_memory(&e) => {
                eprintln!("note: no room on the GPU for {e:#}; the NF4 GEMMs use our kernels only");
                st.drop_blas_path();
                Ok(())
            }
            r => r,
        }
    }

    /// Dequantize W [out, in] into the scratch and hand it, with cuBLAS, to `f`.
    fn with_dequantized(
        &self,
        w: &Nf4Device,
        f: &mut dyn FnMut(&CudaBlas, &CudaSlice<bf16>) -> Result<()>,
    ) -> Result<()> {
        let numel = w.out_features * w.in_features;
        let mut st = self.gemm_state.lock().expect("GEMM state lock");
        st.grow_scratch(&self.stream, numel)?;
        let GemmState { blas, scratch, .. } = &mut *st;
        let blas = blas
            .as_ref()
            .context("cuBLAS (libcublas) is not available on this machine")?;
        let scratch = scratch
            .as_mut()
            .context("the cuBLAS path's weight scratch did not fit on the GPU")?;
        self.nf4_dequantize(scratch, &w.packed, &w.absmax, numel)?;
        f(blas, scratch)
    }

    /// Row-major y [t, n] = x [t, k] W^T is column-major y^T = W x^T: gemm(T, N, m = n, n = t, k).
    fn cublas_fwd(
        &self,
        y: &mut CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        w: &Nf4Device,
        bias: Option<&CudaSlice<bf16>>,
        t: usize,
    ) -> Result<()> {
        let (n, k) = (w.out_features as i32, w.in_features as i32);
        self.with_dequantized(w, &mut |blas, wd| {
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: n,
                n: t as i32,
                k,
                alpha: bf16::ONE,
                lda: k,
                ldb: k,
                beta: bf16::ZERO,
                ldc: n,
            };
            self.timed("cublas nf4_fwd", || {
                // SAFETY: A is the [n, k] weight (lda k), B the first t rows of x (ldb k), C the first t
                // rows of y (ldc n); the buffers hold at least that much (asserted by the caller).
                unsafe { blas.gemm(cfg, wd, x, y) }.context("cuBLAS gemm (NF4 forward)")
            })
        })?;
        if let Some(bias) = bias {
            let (ti, ni) = (t as i32, n);
            let mut b = self.stream.launch_builder(&self.k.add_bias_rows);
            b.arg(&mut *y).arg(bias).arg(&ti).arg(&ni);
            // SAFETY: one thread per element of y's first t rows of n; bias holds n (asserted).
            unsafe { self.launch(&mut b, super::blocks_for(t * n as usize), "add_bias_rows") }?;
        }
        Ok(())
    }

    /// Row-major dx [t, k] = dy [t, n] W is column-major dx^T = W^T dy^T: gemm(N, N, m = k, n = t, k = n).
    fn cublas_bwd_input(&self, dx: &mut CudaSlice<bf16>, dy: &CudaSlice<bf16>, w: &Nf4Device, t: usize) -> Result<()> {
        let (n, k) = (w.out_features as i32, w.in_features as i32);
        self.with_dequantized(w, &mut |blas, wd| {
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: k,
                n: t as i32,
                k: n,
                alpha: bf16::ONE,
                lda: k,
                ldb: n,
                beta: bf16::ZERO,
                ldc: k,
            };
            self.timed("cublas nf4_bwd_input", || {
                // SAFETY: A is the weight seen column-major as [k, n] (lda k), B the first t rows of dy
                // (ldb n), C the first t rows of dx (ldc k); the buffers hold at least that much.
                unsafe { blas.gemm(cfg, wd, dy, dx) }.context("cuBLAS gemm (NF4 input gradient)")
            })
        })
    }
}

#[allow(clippy::too_many_arguments)]
impl Nf4Gemm for Cuda {
    /// y = x W^T (+ bias) with W in NF4, by `self.gemm`'s path. y: [t, out]; x: [t, in]; bias: [out].
    fn nf4_gemm_fwd(
        &self,
        y: &mut CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        w: &Nf4Device,
        bias: Option<&CudaSlice<bf16>>,
        t: usize,
    ) -> Result<()> {
        let shape = (GemmKind::Nf4Fwd, w.out_features, w.in_features, t.next_power_of_two());
        self.tuned(shape, y, t * w.out_features, &mut |gpu, path, y| {
            gpu.nf4_gemm_fwd_via(path, y, x, w, bias, t)
        })
    }

    /// dx = dy W with W in NF4, by `self.gemm`'s path. dx: [t, in]; dy: [t, out].
    fn nf4_gemm_bwd_input(
        &self,
        dx: &mut CudaSlice<bf16>,
        dy: &CudaSlice<bf16>,
        w: &Nf4Device,
        t: usize,
    ) -> Result<()> {
        let shape = (
            GemmKind::Nf4BwdInput,
            w.out_features,
            w.in_features,
            t.next_power_of_two(),
        );
        self.tuned(shape, dx, t * w.in_features, &mut |gpu, path, dx| {
            gpu.nf4_gemm_bwd_input_via(path, dx, dy, w, t)
        })
    }
}
