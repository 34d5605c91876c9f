//! The loss's two GEMMs through the output head (dense bf16 [V, d]), on the labelled rows of a chunk:
//! logits = h head^T (f32 out) and dh = dlogits head. Two ways each:
//!
//! - `Mma`: our tensor-core tiles (kernels/cross_entropy.cu over kernels/mma.cuh);
//! - `Cublas`: cuBLAS GemmEx, bf16 in, f32 accumulate (and f32 out for the logits).
//!
//! With `SQLORA_NF4_GEMM=auto` (the default) the first call of each shape times both, keeps only a
//! cuBLAS result that agrees with ours, and from then on uses the faster (the NF4 GEMMs' tuner,
//! gemm.rs); `tiled` or `mma` forces our kernels, `cublas` cuBLAS.

use super::block_per_row;
use super::gemm::{GemmKind, GemmPath, Shape};
use super::{mma_tiles, Cuda};
use crate::engine::LossOps;
use anyhow::{bail, Context, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

impl Cuda {
    /// The paths the head GEMMs may take under `self.gemm` (with cuBLAS available or not), the
    /// reference (our kernel) first.
    fn head_candidates(&self, has_blas: bool) -> Vec<GemmPath> {
        match self.gemm {
            GemmPath::Cublas => vec![GemmPath::Cublas],
            GemmPath::Auto if has_blas => vec![GemmPath::Mma, GemmPath::Cublas],
            _ => vec![GemmPath::Mma],
        }
    }

    /// [`Cuda::head_logits`] by the given path (`Mma` or `Cublas`; the selftest checks both).
    #[allow(clippy::too_many_arguments)]
    pub fn head_logits_via(
        &self,
        path: GemmPath,
        logits: &mut CudaSlice<f32>,
        h: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.len() / d;
        assert!(logits.len() >= rows * v && h.len() >= (row0 + rows) * d && head.len() == v * d);
        if rows == 0 {
            return Ok(()); // an empty grid is not a launch
        }
        match path {
            GemmPath::Mma => {}
            GemmPath::Cublas => return self.cublas_head_logits(logits, h, head, row0, rows, d),
            other => bail!("the head GEMMs run by Mma or Cublas, not {other:?}"),
        }
        let (r0, ri, vi, di) = (row0 as i32, rows as i32, v as i32, d as i32);
        let mut l = self.stream.launch_builder(&self.k.head_logits);
        l.arg(logits).arg(h).arg(head).arg(&r0).arg(&ri).arg(&vi).arg(&di);
        // SAFETY: the GEMM reads h rows [row0, row0 + rows) and the head [V, d], writes logits
        // [rows, V] (lengths asserted); every access is bounds-checked against rows, V, d.
        unsafe { self.launch(&mut l, mma_tiles(rows, v), "head_logits") }?;
        Ok(())
    }

    /// [`Cuda::head_grad`] by the given path (`Mma` or `Cublas`).
    #[allow(clippy::too_many_arguments)]
    pub fn head_grad_via(
        &self,
        path: GemmPath,
        dh: &mut CudaSlice<bf16>,
        dlogits: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.len() / d;
        assert!(dlogits.len() >= rows * v && dh.len() >= (row0 + rows) * d && head.len() == v * d);
        if rows == 0 {
            return Ok(()); // an empty grid is not a launch
        }
        match path {
            GemmPath::Mma => {}
            GemmPath::Cublas => return self.cublas_head_grad(dh, dlogits, head, row0, rows, d),
            other => bail!("the head GEMMs run by Mma or Cublas, not {other:?}"),
        }
        let (r0, ri, vi, di) = (row0 as i32, rows as i32, v as i32, d as i32);
        let mut l = self.stream.launch_builder(&self.k.head_grad);
        l.arg(dh).arg(dlogits).arg(head).arg(&r0).arg(&ri).arg(&vi).arg(&di);
        // SAFETY: the GEMM reads dlogits [rows, V] and the head [V, d], writes dh rows
        // [row0, row0 + rows) (lengths asserted); every access is bounds-checked.
        unsafe { self.launch(&mut l, mma_tiles(rows, d), "head_grad") }?;
        Ok(())
    }

    /// Row-major logits [rows, V] = h [rows, d] head^T is column-major logits^T = head h^T:
    /// GemmEx(T, N, m = V, n = rows, k = d), bf16 in, f32 out.
    fn cublas_head_logits(
        &self,
        logits: &mut CudaSlice<f32>,
        h: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.len() / d;
        let st = self.gemm_state.lock().expect("GEMM state lock");
        let blas = st
            .blas()
            .context("cuBLAS (libcublas) is not available on this machine")?;
        let h_rows = h.slice(row0 * d..(row0 + rows) * d);
        let (a, _ra) = head.device_ptr(&self.stream);
        let (b, _rb) = h_rows.device_ptr(&self.stream);
        let (c, _rc) = logits.device_ptr_mut(&self.stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.timed("cublas head_logits", || {
            // SAFETY: A is the head [V, d] (lda d, transposed), B the rows [row0, row0 + rows) of h
            // (ldb d), C the first rows x V of logits (ldc V): all inside their buffers (asserted by the
            // caller); alpha and beta are f32 as the f32 compute type requires; cuBLAS runs on
            // self.stream, as the pointers' events record.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    v as i32,
                    rows as i32,
                    d as i32,
                    (&alpha) as *const f32 as *const _,
                    a as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    d as i32,
                    b as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    d as i32,
                    (&beta) as *const f32 as *const _,
                    c as *mut _,
                    cudaDataType_t::CUDA_R_32F,
                    v as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .context("cuBLAS gemm (head logits)")
        })
    }

    /// Row-major dh [rows, d] = dlogits [rows, V] head is column-major dh^T = head^T dlogits^T:
    /// gemm(N, N, m = d, n = rows, k = V).
    fn cublas_head_grad(
        &self,
        dh: &mut CudaSlice<bf16>,
        dlogits: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.len() / d;
        let st = self.gemm_state.lock().expect("GEMM state lock");
        let blas = st
            .blas()
            .context("cuBLAS (libcublas) is not available on this machine")?;
        let mut dh_rows = dh.slice_mut(row0 * d..(row0 + rows) * d);
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: d as i32,
            n: rows as i32,
            k: v as i32,
            alpha: bf16::ONE,
            lda: d as i32,
            ldb: v as i32,
            beta: bf16::ZERO,
            ldc: d as i32,
        };
        self.timed("cublas head_grad", || {
            // SAFETY: A is the head seen column-major as [d, V] (lda d), B the first rows x V of dlogits
            // (ldb V), C the rows [row0, row0 + rows) of dh (ldc d): all inside their buffers.
            unsafe { blas.gemm(cfg, head, dlogits, &mut dh_rows) }.context("cuBLAS gemm (head gradient)")
        })
    }
}

#[allow(clippy::too_many_arguments)]
impl LossOps for Cuda {
    /// logits[i] = h[row0 + i] head^T for i < rows. logits: [rows, V] f32; h: [>= row0 + rows, d];
    /// head: [V, d].
    fn head_logits(
        &self,
        logits: &mut CudaSlice<f32>,
        h: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.len() / d;
        if rows == 0 {
            return Ok(()); // nothing to race on
        }
        let shape: Shape = (GemmKind::HeadLogits, v, d, rows.next_power_of_two());
        let path = self.choose(
            shape,
            &|has_blas| self.head_candidates(has_blas),
            logits,
            0..rows * v,
            |x| *x,
            &mut |gpu, path, out| gpu.head_logits_via(path, out, h, head, row0, rows, d),
        )?;
        self.head_logits_via(path, logits, h, head, row0, rows, d)
    }

    /// Per row i < rows: loss[row0 + i] = lse - z[target], dlogits[i] = inv_count (softmax(z) - onehot).
    /// dlogits: [rows, V]; loss, targets: [>= row0 + rows]; logits: [rows, V] f32.
    #[allow(clippy::too_many_arguments)]
    fn ce_softmax_grad(
        &self,
        dlogits: &mut CudaSlice<bf16>,
        loss: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        row0: usize,
        rows: usize,
        vocab: usize,
        inv_count: f32,
    ) -> Result<()> {
        assert!(dlogits.len() >= rows * vocab && logits.len() >= rows * vocab);
        assert!(loss.len() >= row0 + rows && targets.len() >= row0 + rows);
        if rows == 0 {
            return Ok(());
        }
        let (r0, vi) = (row0 as i32, vocab as i32);
        let mut l = self.stream.launch_builder(&self.k.ce_softmax_grad);
        l.arg(dlogits)
            .arg(loss)
            .arg(logits)
            .arg(targets)
            .arg(&r0)
            .arg(&vi)
            .arg(&inv_count);
        // SAFETY: one block per row i < rows reads logits row i [V] and targets[row0 + i], writes
        // dlogits row i and loss[row0 + i]; the lengths are asserted above.
        unsafe { self.launch(&mut l, block_per_row(rows), "ce_softmax_grad") }?;
        Ok(())
    }

    /// dh[row0 + i] = dlogits[i] head for i < rows. dh: [>= row0 + rows, d]; dlogits: [rows, V].
    fn head_grad(
        &self,
        dh: &mut CudaSlice<bf16>,
        dlogits: &CudaSlice<bf16>,
        head: &CudaSlice<bf16>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let v = head.len() / d;
        if rows == 0 {
            return Ok(());
        }
        let shape: Shape = (GemmKind::HeadGrad, v, d, rows.next_power_of_two());
        let written = row0 * d..(row0 + rows) * d;
        let path = self.choose(
            shape,
            &|has_blas| self.head_candidates(has_blas),
            dh,
            written,
            |x| x.to_f32(),
            &mut |gpu, path, out| gpu.head_grad_via(path, out, dlogits, head, row0, rows, d),
        )?;
        self.head_grad_via(path, dh, dlogits, head, row0, rows, d)
    }

    /// out[i] = argmax of logits[i] (first index of the largest; `generate::argmax`), i < rows.
    /// out: [rows ..] i32; logits: [rows, v] f32.
    fn argmax_rows(&self, out: &mut CudaSlice<i32>, logits: &CudaSlice<f32>, rows: usize, v: usize) -> Result<()> {
        assert!(out.len() >= rows && logits.len() >= rows * v && v > 0);
        if rows == 0 {
            return Ok(());
        }
        let (ri, vi) = (rows as i32, v as i32);
        let mut b = self.stream.launch_builder(&self.k.argmax_rows);
        b.arg(out).arg(logits).arg(&ri).arg(&vi);
        // SAFETY: one block of 256 threads per row reads logits[row, ..v] and writes out[row].
        unsafe { self.launch(&mut b, block_per_row(rows), "argmax_rows") }?;
        Ok(())
    }
}
