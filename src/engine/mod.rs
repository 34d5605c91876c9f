//! Engines: where a training step, a validation loss and generation run, behind one interface
//! ([`StepEngine`], in [`api`]). [`target`] resolves `--device` to one of them:
//! - [`reference::Reference`]: the f32 model of `crate::model` as it is (the specification);
//! - [`step::Engine`] over a [`Device`], the training step written once for any device with our
//!   kernels, with the CUDA kernels' exact semantics: bf16 activations, f32 statistics and
//!   gradients, explicit row counts `t` (a buffer may be longer than a call uses, so the step sizes
//!   every buffer once, for the longest micro-batch, and never allocates inside a step). Two
//!   devices implement [`Device`]:
//!   - [`cuda::Cuda`]: the hand-written kernels of `kernels/` on the GPU;
//!   - [`host::Host`]: the same contract on the CPU, each op computed by the f32 reference
//!     (`model::cpu`) and rounded to bf16 where the kernel stores bf16. It is how the step itself is
//!     tested without a GPU, and the CPU side of the GPU step check in `sqlora selftest`.
//!
//! [`plan`] is what each engine will allocate, computed before it does.

pub mod api;
pub mod cpu;
pub mod cuda;
pub mod host;
pub mod plan;
pub mod reference;
pub mod step;
pub mod target;

use crate::model::lora::LoraAt;
use crate::model::nf4::Nf4Tensor;
use crate::model::optim::{AdamStep, StatePages};
use crate::model::q8::Q8Tensor;
use anyhow::Result;
pub use api::{Check, ProfileRow, StepEngine};

/// Every device trait, for code that calls a device's methods on a concrete device type.
pub mod prelude {
    pub use super::{AttentionOps, Device, DeviceBase, Elementwise, LoraOps, LossOps, Nf4Gemm, OptimOps};
}

use half::bf16;

/// An element type a device buffer can hold: plain bytes of a fixed size (a device moves them as
/// such), one of the four the kernels take.
pub trait Elem: bytemuck::Pod + Default + Send + Sync + Unpin + 'static {}
impl Elem for bf16 {}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for u8 {}

/// Partial norms written by [`Device::partial_norms`].
pub const SUM_PARTS: usize = 256;

/// Bf16 buffer of a device.
pub type Bf<D> = <D as DeviceBase>::Buf<bf16>;
/// F32 buffer of a device.
pub type F32<D> = <D as DeviceBase>::Buf<f32>;

/// What every device provides besides its kernels: buffers and copies, streams, recorded
/// graphs, profiling, NF4 weights, memory figures. Shapes are given per argument; `t` is the
/// number of rows (tokens) a call covers.
pub trait DeviceBase {
    /// A buffer of `T` in device memory.
    type Buf<T: Elem>;
    /// A frozen linear weight in NF4.
    type Nf4;
    /// A recorded sequence of launches, replayed as one (a CUDA graph).
    type Graph;

    /// One line naming the device, for logs.
    fn describe(&self) -> String;
    /// A zero-filled buffer of n elements.
    fn alloc<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    /// A buffer holding a copy of `host`.
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    /// A buffer holding `host`, which the device may take over rather than copy (the host engines
    /// keep it as it is).
    fn upload_vec<T: Elem>(&self, host: Vec<T>) -> Result<Self::Buf<T>> {
        self.upload(&host)
    }
    /// Copy `host` into the start of `dst` (which may be longer).
    fn write<T: Elem>(&self, dst: &mut Self::Buf<T>, host: &[T]) -> Result<()> {
        self.write_at(dst, 0, host)
    }
    /// Copy `host` into dst[off .. off + host.len()].
    fn write_at<T: Elem>(&self, dst: &mut Self::Buf<T>, off: usize, host: &[T]) -> Result<()>;
    /// The first n elements of `src` (waits for the stream).
    fn read<T: Elem>(&self, src: &Self::Buf<T>, n: usize) -> Result<Vec<T>>;
    /// Copy src[off .. off + out.len()] into `out`. Into pinned memory the copy may still be in flight
    /// when this returns: [`Device::synchronize`] before reading `out`.
    fn read_into<T: Elem>(&self, src: &Self::Buf<T>, off: usize, out: &mut [T]) -> Result<()>;
    /// Wait until everything queued on the device is done (on both of its streams).
    fn synchronize(&self) -> Result<()>;
    /// [`Device::write_at`] on the device's copy stream, so it may overlap launches on the compute
    /// stream; order the two with [`Device::compute_waits_copies`] and [`Device::copies_wait_compute`].
    /// Where the device has one stream (the CPU), the same as `write_at`.
    fn copy_in_at<T: Elem>(&self, dst: &mut Self::Buf<T>, off: usize, host: &[T]) -> Result<()> {
        self.write_at(dst, off, host)
    }
    /// [`Device::read_into`] on the copy stream (in flight until [`Device::synchronize`]).
    fn copy_out_into<T: Elem>(&self, src: &Self::Buf<T>, off: usize, out: &mut [T]) -> Result<()> {
        self.read_into(src, off, out)
    }
    /// Time each kernel from now on (`sqlora bench train --profile`), or stop; a no-op where the
    /// device cannot.
    fn set_profiling(&self, _on: bool) {}
    /// The time of each kernel recorded since the last call, summed by name (waits for the device;
    /// empty where the device does not profile).
    fn take_profile(&self) -> Result<Vec<ProfileRow>> {
        Ok(Vec::new())
    }
    /// Work queued on the compute stream from now on waits for the copies queued so far.
    fn compute_waits_copies(&self) -> Result<()> {
        Ok(())
    }
    /// Copies queued from now on wait for the compute work queued so far.
    fn copies_wait_compute(&self) -> Result<()> {
        Ok(())
    }
    /// Record the launches that follow instead of running them, until [`Device::end_capture`];
    /// false (and nothing changes) where the device does not record.
    fn begin_capture(&self) -> Result<bool>;
    /// Stop recording: the graph, or None when the recording failed (the recorded work did not run
    /// either way).
    fn end_capture(&self) -> Result<Option<Self::Graph>>;
    /// Run a recorded graph on the device's stream.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;
    /// Host memory for the optimizer's moments of `len` parameters in pages of `page` values:
    /// pinned on a GPU, so that pages move by DMA.
    fn state_pages(&self, len: usize, page: usize) -> Result<Box<dyn StatePages + Send>>;
    /// Set every element to zero.
    fn zero<T: Elem>(&self, buf: &mut Self::Buf<T>) -> Result<()>;
    /// Quantize x (row-major, of `shape`) to NF4 on the device and return it: the same bytes as
    /// `Nf4Tensor::quantize(x, shape)` (the model loader's [`crate::model::nf4::Quantizer`]).
    fn quantize_nf4(&self, x: &[f32], shape: &[usize]) -> Result<Nf4Tensor>;
    /// Upload an NF4 weight of shape [out, in].
    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Self::Nf4>;
    /// Bytes a buffer holds.
    fn bytes<T: Elem>(buf: &Self::Buf<T>) -> usize;
    /// Bytes an uploaded NF4 weight holds on the device.
    fn nf4_bytes(w: &Self::Nf4) -> usize;
    /// Bytes of device memory in use by this process's context, if the device can tell.
    fn memory_used(&self) -> Option<usize>;
    /// Bytes of device memory free now, if the device can tell.
    fn memory_free(&self) -> Option<usize>;
}

/// The kernels of the elementwise and row kernels (rmsnorm.cu, rope.cu, swiglu.cu, embedding.cu, elementwise.cu). Each method is one kernel launch (or a few) on the device's stream.
#[allow(clippy::too_many_arguments)]
pub trait Elementwise: DeviceBase {
    /// y = rmsnorm(x) w; rstd = 1 / sqrt(mean(x^2) + eps). y, x: [t, d]; w: [d]; rstd: [t] f32.
    fn rmsnorm_fwd(
        &self,
        y: &mut Bf<Self>,
        rstd: &mut F32<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        t: usize,
        eps: f32,
    ) -> Result<()>;
    /// dx = r w dy - (r^3 / d) x sum(dy w x) with r = rstd. dx, dy, x: [t, d]; w: [d]; rstd: [t].
    fn rmsnorm_bwd(
        &self,
        dx: &mut Bf<Self>,
        dy: &Bf<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        rstd: &F32<Self>,
        t: usize,
    ) -> Result<()>;
    /// Rotate pairs of x in place by sign * pos * inv_freq. x: [t, heads, hd]; pos: [t]; inv_freq: [hd/2].
    fn rope_rotate(
        &self,
        x: &mut Bf<Self>,
        pos: &Self::Buf<i32>,
        inv_freq: &F32<Self>,
        t: usize,
        heads: usize,
        sign: f32,
    ) -> Result<()>;
    /// out = silu(gate) up over n values.
    fn swiglu_fwd(&self, out: &mut Bf<Self>, gate: &Bf<Self>, up: &Bf<Self>, n: usize) -> Result<()>;
    /// Gradients of silu(gate) up over n values.
    fn swiglu_bwd(
        &self,
        dgate: &mut Bf<Self>,
        dup: &mut Bf<Self>,
        dout: &Bf<Self>,
        gate: &Bf<Self>,
        up: &Bf<Self>,
        n: usize,
    ) -> Result<()>;
    /// out[i] = table[tokens[i]]. out: [t, d]; table: [vocab, d]; tokens: [t].
    fn embedding_fwd(
        &self,
        out: &mut Bf<Self>,
        table: &Bf<Self>,
        tokens: &Self::Buf<i32>,
        t: usize,
        d: usize,
    ) -> Result<()>;
    /// out[i] = x[idx[i]], rows of d, for i < n. out: [n, d]; x: [T, d]; idx: [n].
    fn gather_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &Self::Buf<i32>, n: usize, d: usize) -> Result<()>;
    /// out[idx[i]] = x[i], rows of d, for i < n; other rows unchanged. out: [T, d]; x: [n, d].
    fn scatter_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &Self::Buf<i32>, n: usize, d: usize) -> Result<()>;
    /// x += y over n values.
    fn add(&self, x: &mut Bf<Self>, y: &Bf<Self>, n: usize) -> Result<()>;
    /// out = bf16(x) over n values.
    fn cast_f32_bf16(&self, out: &mut Bf<Self>, x: &F32<Self>, n: usize) -> Result<()>;
    /// out = dropout(x) with the counter-based mask of `seed` (`model::cpu::dropout`), n values.
    fn dropout(&self, out: &mut Bf<Self>, x: &Bf<Self>, seed: u64, p: f32, n: usize) -> Result<()>;
}

/// The kernels of the fused NF4 GEMM in both orientations (nf4.cu). Each method is one kernel launch (or a few) on the device's stream.
#[allow(clippy::too_many_arguments)]
pub trait Nf4Gemm: DeviceBase {
    /// y = x W^T (+ bias). y: [t, out]; x: [t, in]; bias: [out].
    fn nf4_gemm_fwd(
        &self,
        y: &mut Bf<Self>,
        x: &Bf<Self>,
        w: &Self::Nf4,
        bias: Option<&Bf<Self>>,
        t: usize,
    ) -> Result<()>;
    /// dx = dy W. dx: [t, in]; dy: [t, out].
    fn nf4_gemm_bwd_input(&self, dx: &mut Bf<Self>, dy: &Bf<Self>, w: &Self::Nf4, t: usize) -> Result<()>;
}

/// The kernels of the LoRA branch of a projection, forward and backward (lora.cu). Each method is one kernel launch (or a few) on the device's stream.
#[allow(clippy::too_many_arguments)]
pub trait LoraOps: DeviceBase {
    /// xa = x A^T; y += s xa B^T, with A [r, in] and B [out, r] where `at` places them in `w`, the
    /// adapters' bf16 copies. y: [t, out]; xa: [t, r] f32; x: [t, in].
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
    ) -> Result<()>;
    /// With g = dy B: dB += s dy^T xa, dA += s g^T x, dx += s g A; dA and dB where `at` places them
    /// in `grad` (f32, the layout of `w`). dx: [t, in]; g: [t, r] f32 scratch; dy: [t, out];
    /// x: [t, in]; xa: [t, r] f32.
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
    ) -> Result<()>;
}

/// The kernels of the output head and the loss over labelled rows (cross_entropy.cu). Each method is one kernel launch (or a few) on the device's stream.
#[allow(clippy::too_many_arguments)]
pub trait LossOps: DeviceBase {
    /// logits[i] = h[row0 + i] head^T, i < rows. logits: [rows, V] f32; h: [.., d]; head: [V, d].
    fn head_logits(
        &self,
        logits: &mut F32<Self>,
        h: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()>;
    /// Whether [`LossOps::head_logits_q8`] runs on this device (the engine keeps a Q8_0 head only
    /// then; the GPU has no such kernel and decodes from bf16).
    fn has_q8_head(&self) -> bool {
        false
    }
    /// [`LossOps::head_logits`] with the head as Q8_0 blocks (`model::q8`, a GGUF head's own
    /// values): logits[i] = h[i] head^T, i < rows. logits: [rows, V] f32; h: [rows.., d].
    fn head_logits_q8(
        &self,
        _logits: &mut F32<Self>,
        _h: &Bf<Self>,
        _head: &Q8Head<Self>,
        _rows: usize,
        _d: usize,
    ) -> Result<()> {
        anyhow::bail!("{} has no Q8_0 head kernel", self.describe())
    }
    /// Per row i < rows, with lse = logsumexp(logits[i]) and y = targets[row0 + i]:
    /// loss[row0 + i] = lse - logits[i, y]; dlogits[i] = inv_count (softmax(logits[i]) - onehot(y)).
    /// dlogits: [rows, V]; loss, targets: [.. row0 + rows]; logits: [rows, V] f32.
    fn ce_softmax_grad(
        &self,
        dlogits: &mut Bf<Self>,
        loss: &mut F32<Self>,
        logits: &F32<Self>,
        targets: &Self::Buf<i32>,
        row0: usize,
        rows: usize,
        vocab: usize,
        inv_count: f32,
    ) -> Result<()>;
    /// dh[row0 + i] = dlogits[i] head, i < rows. dh: [.., d]; dlogits: [rows, V]; head: [V, d].
    fn head_grad(
        &self,
        dh: &mut Bf<Self>,
        dlogits: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()>;
    /// out[i] = the first index of the largest value of logits[i] (`generate::argmax`), i < rows.
    /// out: [rows ..] i32; logits: [rows, v] f32.
    fn argmax_rows(&self, out: &mut Self::Buf<i32>, logits: &F32<Self>, rows: usize, v: usize) -> Result<()>;
}

/// An output head kept on a device as Q8_0 (`model::q8`): what a decoding step reads instead of the
/// bf16 head, 8.5 bits per weight with the file's values exactly.
pub struct Q8Head<D: DeviceBase + ?Sized> {
    /// [V, d]: the i8 codes as bytes.
    pub codes: D::Buf<u8>,
    /// [V, d / 32].
    pub scales: F32<D>,
}

impl<D: DeviceBase> Q8Head<D> {
    /// The head on `dev`.
    pub fn upload(dev: &D, q: Q8Tensor) -> Result<Q8Head<D>> {
        let codes: Vec<u8> = bytemuck::allocation::cast_vec(q.codes);
        Ok(Q8Head {
            codes: dev.upload_vec(codes)?,
            scales: dev.upload_vec(q.scales)?,
        })
    }

    /// Bytes it holds on the device.
    pub fn bytes(&self) -> usize {
        D::bytes(&self.codes) + D::bytes(&self.scales)
    }
}

/// The kernels of causal GQA attention over packed sequences, and decoding against a KV cache (attention.cu, flash_attention.cu). Each method is one kernel launch (or a few) on the device's stream.
#[allow(clippy::too_many_arguments)]
pub trait AttentionOps: DeviceBase {
    /// Settle how attention runs at head width `hd` before any step (the GPU's `auto` choice runs
    /// both of its paths once on a small batch), so that no step allocates for it.
    fn prepare_attention(&self, _hd: usize) -> Result<()> {
        Ok(())
    }
    /// Causal GQA attention within packed sequences. out, q: [t, heads, hd]; lse: [t, heads] f32
    /// (each row's log-sum-exp of the scaled scores, for the backward); k, v: [t, kv_heads, hd];
    /// seq_start: [t], the first token of each token's sequence; max_len: the longest sequence.
    fn attention_fwd(
        &self,
        out: &mut Bf<Self>,
        lse: &mut F32<Self>,
        q: &Bf<Self>,
        k: &Bf<Self>,
        v: &Bf<Self>,
        seq_start: &Self::Buf<i32>,
        t: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()>;
    /// Attention backward from the forward's output and lse: dq, dk, dv written; dd: [t, heads] f32
    /// scratch.
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
        seq_start: &Self::Buf<i32>,
        t: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()>;
    /// Generation: query i < b against cached keys key_start[i] .. key_start[i] + key_len[i].
    /// out, q: [b, heads, hd]; k, v: [rows, kv_heads, hd]; key_start, key_len: [b]; max_len: the
    /// longest key_len.
    fn attention_decode(
        &self,
        out: &mut Bf<Self>,
        q: &Bf<Self>,
        kv: [&Bf<Self>; 2],
        key_start: &Self::Buf<i32>,
        key_len: &Self::Buf<i32>,
        b: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()>;
}

/// The kernels of the gradient norm and AdamW over the flat adapter buffers (adamw.cu). Each method is one kernel launch (or a few) on the device's stream.
#[allow(clippy::too_many_arguments)]
pub trait OptimOps: DeviceBase {
    /// parts[at + b], b < [`SUM_PARTS`]: partial norms of x[..n], sqrt(sum of x[i]^2 over a share of
    /// the i), summed in f64 so that no square overflows; the whole norm is sqrt(sum of parts^2).
    /// How the values are split among the parts is the device's choice; it is fixed for a given n.
    fn partial_norms(&self, parts: &mut F32<Self>, at: usize, x: &F32<Self>, n: usize) -> Result<()>;
    /// AdamW on n values (`AdamStep::apply`): p[p_off..] with gradients g[p_off..], moments m[s_off..]
    /// and v[s_off..]. p, g: [p_off + n ..]; m, v: [s_off + n ..]; all f32.
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
    ) -> Result<()>;
}

/// The kernels of a training step on one device: everything [`step::Engine`] calls. Implemented by
/// every type that implements the families above.
pub trait Device: DeviceBase + Elementwise + Nf4Gemm + LoraOps + LossOps + AttentionOps + OptimOps {}

impl<D: DeviceBase + Elementwise + Nf4Gemm + LoraOps + LossOps + AttentionOps + OptimOps> Device for D {}

/// f32 values rounded to bf16.
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    use rayon::prelude::*;
    // A model's embedding is ~10^8 values: converted on every core.
    if v.len() >= 1 << 20 {
        return v.par_iter().map(|&x| bf16::from_f32(x)).collect();
    }
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// bf16 values widened to f32.
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
