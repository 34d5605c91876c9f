//! The GPU's [`DeviceBase`]: buffers and copies on its two streams, CUDA graphs, pinned pages for
//! the optimizer, NF4 weights. Each kernel family of [`crate::engine::Device`] is implemented
//! where its launches are: `ops.rs` (elementwise and rows, AdamW), `gemm.rs` (NF4 GEMM), `lora.rs`,
//! `head.rs` (output head and loss), `attention.rs`.

use super::{Cuda, Nf4Device};
use crate::engine::{DeviceBase, Elem};
use crate::model::nf4::{dynamic_map, Nf4Tensor};
use crate::model::optim::StatePages;
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

impl DeviceBase for Cuda {
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
