//! The GPU as an [`engine::Device`](crate::engine::Device): each method forwards to the typed launch
//! wrapper of the same name (ops.rs), so the training step of `engine::step` runs our kernels.

use super::{Cuda, Nf4Device};
use crate::engine::{Bf, Device, Elem, F32};
use crate::model::lora::LoraAt;
use crate::model::nf4::{dynamic_map, Nf4Tensor};
use crate::model::optim::{AdamStep, StatePages};
use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::any::{Any, TypeId};

/// Run `$body` with the type alias `$u` naming the concrete element type that the generic `$t`
/// is. The engine's [`Elem`] does not name cudarc's traits (`DeviceRepr`, `ValidAsZeroBits`); the
/// four types it is implemented for do have them, and this finds which one `$t` is at run time
/// (one comparison of type ids per transfer) so the body can call cudarc with it.
macro_rules! as_cuda_elem {
    ($t:ty, $u:ident => $body:expr) => {{
        let id = TypeId::of::<$t>();
        if id == TypeId::of::<bf16>() {
            type $u = bf16;
            $body
        } else if id == TypeId::of::<f32>() {
            type $u = f32;
            $body
        } else if id == TypeId::of::<i32>() {
            type $u = i32;
            $body
        } else if id == TypeId::of::<u8>() {
            type $u = u8;
            $body
        } else {
            unreachable!("Elem is implemented for bf16, f32, i32 and u8 only")
        }
    }};
}

/// `a` as the type `B` that [`as_cuda_elem`] found it to be (a checked downcast: never fails there).
fn same<A: 'static, B: 'static>(a: A) -> B {
    *(Box::new(a) as Box<dyn Any>)
        .downcast::<B>()
        .expect("as_cuda_elem matched the element type")
}

/// [`same`] for a shared reference.
fn same_ref<A: 'static, B: 'static>(a: &A) -> &B {
    (a as &dyn Any)
        .downcast_ref::<B>()
        .expect("as_cuda_elem matched the element type")
}

/// [`same`] for an exclusive reference.
fn same_mut<A: 'static, B: 'static>(a: &mut A) -> &mut B {
    (a as &mut dyn Any)
        .downcast_mut::<B>()
        .expect("as_cuda_elem matched the element type")
}

#[allow(clippy::too_many_arguments)]
impl Device for Cuda {
    type Buf<T: Elem> = CudaSlice<T>;
    type Nf4 = Nf4Device;
    type Graph = cudarc::driver::CudaGraph;

    fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
        format!(
            "{name} ({:.1} of {:.1} GiB free); {}",
            free as f64 / GIB,
            total as f64 / GIB,
            self.kernel_paths()
        )
    }
    fn alloc<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        as_cuda_elem!(T, U => {
            let buf = self.stream.alloc_zeros::<U>(n.max(1));
            Ok(same(buf.map_err(|e| oom(self, e, n * size_of::<T>()))?))
        })
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        as_cuda_elem!(T, U => {
            let buf = self.stream.clone_htod(bytemuck::cast_slice::<T, U>(host));
            Ok(same(buf.map_err(|e| oom(self, e, std::mem::size_of_val(host)))?))
        })
    }
    fn write_at<T: Elem>(&self, dst: &mut CudaSlice<T>, off: usize, host: &[T]) -> Result<()> {
        as_cuda_elem!(T, U => {
            let mut dst = same_mut::<_, CudaSlice<U>>(dst).slice_mut(off..off + host.len());
            let host = bytemuck::cast_slice::<T, U>(host);
            self.stream.memcpy_htod(host, &mut dst).context("copy to the GPU")
        })
    }
    fn read<T: Elem>(&self, src: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        as_cuda_elem!(T, U => {
            let src = same_ref::<_, CudaSlice<U>>(src).slice(..n);
            Ok(same(self.stream.clone_dtoh(&src).context("copy from the GPU")?))
        })
    }
    fn read_into<T: Elem>(&self, src: &CudaSlice<T>, off: usize, out: &mut [T]) -> Result<()> {
        as_cuda_elem!(T, U => {
            let src = same_ref::<_, CudaSlice<U>>(src).slice(off..off + out.len());
            let out = bytemuck::cast_slice_mut::<T, U>(out);
            self.stream.memcpy_dtoh(&src, out).context("copy from the GPU")
        })
    }
    fn synchronize(&self) -> Result<()> {
        if let Some(copies) = self.copies.get() {
            copies.synchronize().context("waiting for the GPU's copy stream")?;
        }
        self.stream.synchronize().context("waiting for the GPU")
    }
    fn copy_in_at<T: Elem>(&self, dst: &mut CudaSlice<T>, off: usize, host: &[T]) -> Result<()> {
        as_cuda_elem!(T, U => {
            let mut dst = same_mut::<_, CudaSlice<U>>(dst).slice_mut(off..off + host.len());
            let host = bytemuck::cast_slice::<T, U>(host);
            self.copy_stream()?
                .memcpy_htod(host, &mut dst)
                .context("copy to the GPU (copy stream)")
        })
    }
    fn copy_out_into<T: Elem>(&self, src: &CudaSlice<T>, off: usize, out: &mut [T]) -> Result<()> {
        as_cuda_elem!(T, U => {
            let src = same_ref::<_, CudaSlice<U>>(src).slice(off..off + out.len());
            let out = bytemuck::cast_slice_mut::<T, U>(out);
            self.copy_stream()?
                .memcpy_dtoh(&src, out)
                .context("copy from the GPU (copy stream)")
        })
    }
    fn set_profiling(&self, on: bool) {
        Cuda::set_profiling(self, on)
    }
    fn take_profile(&self) -> Result<Vec<crate::engine::ProfileRow>> {
        Cuda::take_profile(self)
    }
    fn prepare_attention(&self, hd: usize) -> Result<()> {
        if !self.attention_tiled(hd) && self.attention == super::AttentionPath::Tiled {
            eprintln!(
                "note: SQLORA_ATTENTION=tiled, but there are tiled kernels for head widths {:?} only: \
                 width {hd} runs the simple ones",
                super::TILED_HEAD_DIMS
            );
        }
        Ok(())
    }
    fn compute_waits_copies(&self) -> Result<()> {
        match self.copies.get() {
            Some(copies) => self
                .stream
                .join(copies)
                .context("ordering the compute stream after copies"),
            None => Ok(()),
        }
    }
    fn copies_wait_compute(&self) -> Result<()> {
        self.copy_stream()?
            .join(&self.stream)
            .context("ordering copies after the compute stream")
    }
    fn begin_capture(&self) -> Result<bool> {
        // Profiling records timing events per launch, which a captured graph could not report.
        if !self.graphs || self.profiling_on() {
            return Ok(false);
        }
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("starting a CUDA graph capture")?;
        Ok(true)
    }
    fn end_capture(&self) -> Result<Option<cudarc::driver::CudaGraph>> {
        use cudarc::driver::sys::CUgraphInstantiate_flags;
        match self.stream.end_capture(CUgraphInstantiate_flags(0)) {
            Ok(graph) => Ok(graph),
            Err(e) => {
                eprintln!("note: recording a CUDA graph failed ({e}); running without");
                Ok(None)
            }
        }
    }
    fn replay(&self, graph: &cudarc::driver::CudaGraph) -> Result<()> {
        graph.launch().context("replaying a CUDA graph")
    }
    fn state_pages(&self, len: usize, page: usize) -> Result<Box<dyn StatePages + Send>> {
        Ok(Box::new(super::pinned::PinnedPages::new(&self.ctx, len, page)?))
    }
    fn zero<T: Elem>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
        as_cuda_elem!(T, U => {
            let buf = same_mut::<_, CudaSlice<U>>(buf);
            self.stream.memset_zeros(buf).context("memset on the GPU")
        })
    }
    fn quantize_nf4(&self, x: &[f32], shape: &[usize]) -> Result<Nf4Tensor> {
        self.quantize_to_host(x, shape)
    }
    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Nf4Device> {
        let [out_features, in_features] = w.shape[..] else {
            anyhow::bail!("an NF4 linear weight must be 2-D, not {:?}", w.shape);
        };
        self.reserve_gemm_scratch(out_features * in_features)?;
        // The scales travel double-quantized (1 byte per 64 weights) and are expanded on the device.
        let qabsmax = self.upload(&w.scales.qabsmax)?;
        let absmax2 = self.upload(&w.scales.absmax2)?;
        let mut absmax = self.alloc::<f32>(qabsmax.len())?;
        self.nf4_dequantize_absmax(
            &mut absmax,
            &qabsmax,
            &absmax2,
            &self.upload(&dynamic_map())?,
            w.scales.offset,
        )?;
        Ok(Nf4Device {
            packed: self.upload(&w.packed)?,
            absmax,
            out_features,
            in_features,
        })
    }
    fn bytes<T: Elem>(buf: &CudaSlice<T>) -> usize {
        buf.len() * size_of::<T>()
    }
    fn nf4_bytes(w: &Nf4Device) -> usize {
        w.packed.len() + 4 * w.absmax.len()
    }
    fn memory_free(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free)
    }
    fn memory_used(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, total)| total - free)
    }

    fn rmsnorm_fwd(
        &self,
        y: &mut Bf<Self>,
        rstd: &mut F32<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        t: usize,
        eps: f32,
    ) -> Result<()> {
        Cuda::rmsnorm_fwd(self, y, rstd, x, w, t, eps)
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
        Cuda::rmsnorm_bwd(self, dx, dy, x, w, rstd, t)
    }
    fn rope_rotate(
        &self,
        x: &mut Bf<Self>,
        pos: &CudaSlice<i32>,
        inv_freq: &F32<Self>,
        t: usize,
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        Cuda::rope_rotate(self, x, pos, inv_freq, t, heads, sign)
    }
    fn swiglu_fwd(&self, out: &mut Bf<Self>, gate: &Bf<Self>, up: &Bf<Self>, n: usize) -> Result<()> {
        Cuda::swiglu_fwd(self, out, gate, up, n)
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
        Cuda::swiglu_bwd(self, dgate, dup, dout, gate, up, n)
    }
    fn embedding_fwd(
        &self,
        out: &mut Bf<Self>,
        table: &Bf<Self>,
        tokens: &CudaSlice<i32>,
        t: usize,
        d: usize,
    ) -> Result<()> {
        Cuda::embedding_fwd(self, out, table, tokens, t, d)
    }
    fn nf4_gemm_fwd(
        &self,
        y: &mut Bf<Self>,
        x: &Bf<Self>,
        w: &Nf4Device,
        bias: Option<&Bf<Self>>,
        t: usize,
    ) -> Result<()> {
        Cuda::nf4_gemm_fwd(self, y, x, w, bias, t)
    }
    fn nf4_gemm_bwd_input(&self, dx: &mut Bf<Self>, dy: &Bf<Self>, w: &Nf4Device, t: usize) -> Result<()> {
        Cuda::nf4_gemm_bwd_input(self, dx, dy, w, t)
    }
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
    fn argmax_rows(&self, out: &mut CudaSlice<i32>, logits: &F32<Self>, rows: usize, v: usize) -> Result<()> {
        Cuda::argmax_rows(self, out, logits, rows, v)
    }
    fn gather_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &CudaSlice<i32>, n: usize, d: usize) -> Result<()> {
        Cuda::gather_rows(self, out, x, idx, n, d)
    }
    fn scatter_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &CudaSlice<i32>, n: usize, d: usize) -> Result<()> {
        Cuda::scatter_rows(self, out, x, idx, n, d)
    }
    fn head_logits(
        &self,
        logits: &mut F32<Self>,
        h: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        Cuda::head_logits(self, logits, h, head, row0, rows, d)
    }
    fn ce_softmax_grad(
        &self,
        dlogits: &mut Bf<Self>,
        loss: &mut F32<Self>,
        logits: &F32<Self>,
        targets: &CudaSlice<i32>,
        row0: usize,
        rows: usize,
        vocab: usize,
        inv_count: f32,
    ) -> Result<()> {
        Cuda::ce_softmax_grad(self, dlogits, loss, logits, targets, row0, rows, vocab, inv_count)
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
        Cuda::head_grad(self, dh, dlogits, head, row0, rows, d)
    }
    fn attention_fwd(
        &self,
        out: &mut Bf<Self>,
        lse: &mut F32<Self>,
        q: &Bf<Self>,
        k: &Bf<Self>,
        v: &Bf<Self>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        Cuda::attention_fwd(self, out, lse, q, k, v, seq_start, t, dims, max_len)
    }
    fn attention_bwd(
        &self,
        dq: &mut Bf<Self>,
        dk: &mut Bf<Self>,
        dv: &mut Bf<Self>,
        dd: &mut F32<Self>,
        dout: &Bf<Self>,
        qkv: [&Bf<Self>; 3],
        out: &Bf<Self>,
        lse: &F32<Self>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        Cuda::attention_bwd(self, dq, dk, dv, dd, dout, qkv, out, lse, seq_start, t, dims, max_len)
    }
    fn attention_decode(
        &self,
        out: &mut Bf<Self>,
        q: &Bf<Self>,
        [k, v]: [&Bf<Self>; 2],
        key_start: &CudaSlice<i32>,
        key_len: &CudaSlice<i32>,
        b: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        Cuda::attention_decode(self, out, q, k, v, key_start, key_len, b, dims, max_len)
    }
    fn partial_norms(&self, parts: &mut F32<Self>, at: usize, x: &F32<Self>, n: usize) -> Result<()> {
        Cuda::partial_norms(self, parts, at, x, n)
    }
    fn adamw_step(
        &self,
        p: &mut F32<Self>,
        m: &mut F32<Self>,
        v: &mut F32<Self>,
        g: &F32<Self>,
        p_off: usize,
        s_off: usize,
        n: usize,
        h: &AdamStep,
    ) -> Result<()> {
        Cuda::adamw_step(self, p, m, v, g, p_off, s_off, n, h)
    }
    fn add(&self, x: &mut Bf<Self>, y: &Bf<Self>, n: usize) -> Result<()> {
        Cuda::add(self, x, y, n)
    }
    fn cast_f32_bf16(&self, out: &mut Bf<Self>, x: &F32<Self>, n: usize) -> Result<()> {
        Cuda::cast_f32_bf16(self, out, x, n)
    }
    fn dropout(&self, out: &mut Bf<Self>, x: &Bf<Self>, seed: u64, p: f32, n: usize) -> Result<()> {
        Cuda::dropout(self, out, x, seed, p, n)
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The error of a failed allocation or upload: with the memory plan's advice when the GPU is out of
/// memory; any other driver error (e.g. an earlier kernel's fault, reported at the next call) as is.
fn oom(gpu: &Cuda, e: cudarc::driver::DriverError, bytes: usize) -> anyhow::Error {
    use cudarc::driver::sys::CUresult;
    if e.0 != CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        let what = format!(
            "allocating or copying {:.1} MiB on the GPU",
            bytes as f64 / (1 << 20) as f64
        );
        return super::driver_error(e, &what);
    }
    let (free, total) = gpu.ctx.mem_get_info().unwrap_or((0, 0));
    anyhow::anyhow!(
        "out of GPU memory: asked for {:.1} MiB with {:.2} of {:.2} GiB free ({e}); run `train --dry-run` for the \
         memory plan, and lower --micro-batch or --max-len, or turn on --checkpointing",
        bytes as f64 / (1 << 20) as f64,
        free as f64 / GIB,
        total as f64 / GIB
    )
}
