//! The CUDA backend: our kernels from kernels/*.cu (compiled by build.rs), loaded through cudarc.
//! Every kernel is looked up once, when the device is opened, so a missing kernel is an error at
//! start-up that names it, never a failed lookup in the middle of a run.
//!
//! Each kernel family of [`crate::engine::Device`] is implemented in the file that launches it
//! (`ops.rs`, `gemm.rs`, `lora.rs`, `head.rs`, `attention.rs`); `device.rs` holds the rest of the
//! contract (buffers, streams, graphs), so the training step of `engine::step` runs on the GPU.
//! `sqlora selftest` checks each kernel against the CPU reference. Attention runs tiled on tensor
//! cores or by the simple kernels (`attention.rs`).

/// The CUDA kernels compiled by build.rs (empty when the build had no nvcc).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

mod attention;
mod device;
mod gemm;
mod head;
mod lora;
mod ops;
pub use lora::{LoraPath, MAX_RANK};
mod pinned;
mod profile;
pub use profile::Profiler;
mod quantize;
pub mod selftest;

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use attention::{AttentionPath, TiledAttention, TILED_HEAD_DIMS};
pub use gemm::{GemmPath, GemmState};

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
#[derive(Clone)]
pub struct Kernels {
    pub rmsnorm_fwd: CudaFunction,
    pub rmsnorm_bwd: CudaFunction,
    pub rope_rotate: CudaFunction,
    pub swiglu_fwd: CudaFunction,
    pub swiglu_bwd: CudaFunction,
    pub adamw_step: CudaFunction,
    pub partial_norms: CudaFunction,
    pub nf4_quantize: CudaFunction,
    pub nf4_absmax_mean: CudaFunction,
    pub nf4_double_quantize: CudaFunction,
    pub nf4_dequantize_absmax: CudaFunction,
    pub nf4_dequantize: CudaFunction,
    pub nf4_gemm_fwd: CudaFunction,
    pub nf4_gemm_bwd_input: CudaFunction,
    pub nf4_gemm_fwd_mma: CudaFunction,
    pub nf4_gemm_bwd_input_mma: CudaFunction,
    pub nf4_gemv: CudaFunction,
    pub embedding_fwd: CudaFunction,
    /// kernels/lora.cu in `lora::LORA_KERNELS`' order: the simple six, then the tiled six.
    pub lora: [CudaFunction; 12],
    pub attention_fwd: CudaFunction,
    pub attention_bwd_rowdot: CudaFunction,
    pub attention_bwd_dq: CudaFunction,
    pub attention_bwd_dkv: CudaFunction,
    pub attention_decode: CudaFunction,
    /// kernels/flash_attention.cu, one set per head width of [`TILED_HEAD_DIMS`].
    pub flash: Vec<TiledAttention>,
    pub head_logits: CudaFunction,
    pub head_grad: CudaFunction,
    pub ce_softmax_grad: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub add_bf16: CudaFunction,
    pub cast_f32_bf16: CudaFunction,
    pub dropout_bf16: CudaFunction,
    pub gather_rows: CudaFunction,
    pub scatter_rows: CudaFunction,
    pub add_bias_rows: CudaFunction,
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
#[derive(Clone)]
pub struct Cuda {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// A second stream for host-device copies that overlap the compute stream's work (the streamed
    /// pages of the optimizer), ordered against `stream` by events. Made on first use: a context
    /// with one stream skips cudarc's per-buffer events on every launch.
    pub copies: Arc<OnceLock<Arc<CudaStream>>>,
    pub k: Kernels,
    /// Which NF4 GEMM the training step uses (`SQLORA_NF4_GEMM=auto|tiled|mma|cublas`).
    pub gemm: GemmPath,
    /// cuBLAS, its weight scratch and the tuner's choices, shared by clones.
    pub gemm_state: Arc<Mutex<GemmState>>,
    /// Whether this Cuda records CUDA graphs (`Cuda::open`).
    pub graphs: bool,
    /// Dynamic shared memory the attention kernels may use per block (4 bytes per key of the
    /// longest sequence): the GPU's opt-in maximum less their static shared memory.
    pub attn_smem: usize,
    /// Which attention the training step uses (`SQLORA_ATTENTION=auto|tiled|simple`).
    pub attention: AttentionPath,
    /// Which LoRA kernels run (`SQLORA_LORA=tiled|simple`).
    pub lora: LoraPath,
    /// `Auto`'s verdict per head width: whether the tiled kernels agreed with the simple ones.
    pub attention_chosen: Arc<Mutex<HashMap<usize, bool>>>,
    /// Whether launches are timed (`profile.rs`), and what they recorded.
    pub profiling: Arc<std::sync::atomic::AtomicBool>,
    pub profiler: Arc<Mutex<Profiler>>,
}

/// Let the attention kernels that keep a row of scores in dynamic shared memory use as much as the
/// GPU allows (beyond the default 48 KB); returns the bytes each may ask for.
fn opt_in_attention_smem(ctx: &CudaContext, kernels: &[&CudaFunction]) -> Result<usize> {
    use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
    let optin = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .context("the GPU's shared memory per block")? as usize;
    let mut allowed = optin;
    for f in kernels {
        let dynamic =
            optin.saturating_sub(f.shared_size_bytes().context("an attention kernel's shared memory")? as usize);
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic as i32,
        )
        .context("raising an attention kernel's shared memory limit")?;
        allowed = allowed.min(dynamic);
    }
    Ok(allowed)
}

/// The tiled attention kernels of every width (one module), each dk/dv kernel allowed the shared
/// memory it carves.
fn load_tiled_attention(ctx: &Arc<CudaContext>) -> Result<Vec<TiledAttention>> {
    use cudarc::driver::sys::CUfunction_attribute;
    let names: Vec<String> = TILED_HEAD_DIMS
        .iter()
        .flat_map(|&hd| attention::tiled_kernel_names(hd))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut kernels = load(ctx, "flash_attention", kernels::FLASH_ATTENTION, &names)?.into_iter();
    TILED_HEAD_DIMS
        .iter()
        .map(|&hd| {
            let mut next = || kernels.next().expect("three kernels per width");
            let (fwd, bwd_dq, bwd_dkv) = (next(), next(), next());
            bwd_dkv
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    attention::dkv_smem(hd) as i32,
                )
                .with_context(|| format!("allowing flash_bwd_dkv_hd{hd} its shared memory"))?;
            Ok(TiledAttention {
                hd,
                fwd,
                bwd_dq,
                bwd_dkv,
                names: attention::tiled_kernel_names(hd),
            })
        })
        .collect()
}

/// Grid of a tensor-core NF4 GEMM: 64 x 64 output tiles, 4 warps each.
fn mma_tiles(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Every kernel [`Cuda::open`] looks up, by file: kernels/<file>.cu, its fatbin, and the names in the
/// order `open` takes them (the tiled attention's are named per head width, `load_tiled_attention`).
/// A test checks that each name is in its fatbin, so a misnamed kernel fails without a GPU.
fn kernel_table() -> [(&'static str, &'static [u8], &'static [&'static str]); 10] {
    [
        ("rmsnorm", kernels::RMSNORM, &["rmsnorm_fwd", "rmsnorm_bwd"]),
        ("rope", kernels::ROPE, &["rope_rotate"]),
        ("swiglu", kernels::SWIGLU, &["swiglu_fwd", "swiglu_bwd"]),
        ("adamw", kernels::ADAMW, &["adamw_step", "partial_norms"]),
        (
            "nf4",
            kernels::NF4,
            &[
                "nf4_quantize",
                "nf4_absmax_mean",
                "nf4_double_quantize",
                "nf4_dequantize_absmax",
                "nf4_dequantize",
                "nf4_gemm_fwd",
                "nf4_gemm_bwd_input",
                "nf4_gemm_fwd_mma",
                "nf4_gemm_bwd_input_mma",
                "nf4_gemv",
            ],
        ),
        ("lora", kernels::LORA, &lora::LORA_KERNELS),
        (
            "attention",
            kernels::ATTENTION,
            &[
                "attention_fwd",
                "attention_bwd_rowdot",
                "attention_bwd_dq",
                "attention_bwd_dkv",
                "attention_decode",
            ],
        ),
        (
            "cross_entropy",
            kernels::CROSS_ENTROPY,
            &["head_logits", "head_grad", "ce_softmax_grad", "argmax_rows"],
        ),
        ("embedding", kernels::EMBEDDING, &["embedding_fwd"]),
        (
            "elementwise",
            kernels::ELEMENTWISE,
            &[
                "add_bf16",
                "cast_f32_bf16",
                "dropout_bf16",
                "gather_rows",
                "scatter_rows",
                "add_bias_rows",
            ],
        ),
    ]
}

/// The kernels of kernels/<file>.cu, in [`kernel_table`]'s order.
fn load_file(ctx: &Arc<CudaContext>, file: &str) -> Result<Vec<CudaFunction>> {
    let (_, fatbin, names) = (kernel_table().into_iter())
        .find(|(f, _, _)| *f == file)
        .with_context(|| format!("no kernel file {file} in the table"))?;
    load(ctx, file, fatbin, names)
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

/// ‖got − want‖ / ‖want‖ in f64; infinite when `got` has a non-finite value or another length (an
/// unwritten, poisoned element fails any check). Used by the selftest and the GEMM tuner.
pub(crate) fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Test data in and out of the GPU, for the selftest and the attention path's agreement check.
impl Cuda {
    /// `v` rounded to bf16, on the device.
    pub(super) fn up(&self, v: &[f32]) -> Result<CudaSlice<bf16>> {
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(self.stream.clone_htod(&h)?)
    }
    pub(super) fn up32<T: cudarc::driver::DeviceRepr + Clone>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(v)?)
    }
    /// A bf16 buffer of n NaNs: an element the kernel fails to write stays NaN and fails the check.
    pub(super) fn poisoned(&self, n: usize) -> Result<CudaSlice<bf16>> {
        Ok(self.stream.clone_htod(&vec![bf16::NAN; n])?)
    }
    pub(super) fn poisoned32(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(&vec![f32::NAN; n])?)
    }
    pub(super) fn down(&self, s: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(s)?.iter().map(|x| x.to_f32()).collect())
    }
    pub(super) fn down32(&self, s: &CudaSlice<f32>) -> Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(s)?)
    }
}

/// A driver error with what was being done. Launches are asynchronous: a kernel that faults is
/// reported by a later call, so for the errors that poison the context the message says so and how
/// to find the kernel that faulted.
fn driver_error(e: cudarc::driver::DriverError, doing: &str) -> anyhow::Error {
    use cudarc::driver::sys::CUresult::*;
    let sticky = matches!(
        e.0,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_LAUNCH_TIMEOUT
    );
    if sticky {
        anyhow::Error::new(e).context(format!(
            "{doing}: a kernel queued before this call failed (run with CUDA_LAUNCH_BLOCKING=1 to name it)"
        ))
    } else {
        anyhow::Error::new(e).context(doing.to_string())
    }
}

/// Whether `e` comes from the driver running out of device memory.
fn is_out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<cudarc::driver::DriverError>()
            .is_some_and(|d| d.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    })
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
    /// The copy stream (made now if this is its first use). A second stream would turn on cudarc's
    /// automatic synchronization (an event recorded or waited on per buffer of every launch), so
    /// event tracking is turned off first: the only buffers used on both streams, the optimizer's
    /// window slots and pinned pages, are ordered by explicit events and freed after a synchronize.
    pub fn copy_stream(&self) -> Result<&Arc<CudaStream>> {
        if self.copies.get().is_none() {
            // SAFETY: see above; every other buffer stays on `self.stream`.
            unsafe { self.ctx.disable_event_tracking() };
            let s = self.ctx.new_stream().context("creating a CUDA copy stream")?;
            let _ = self.copies.set(s);
        }
        Ok(self.copies.get().expect("set above"))
    }

    /// The GPU's name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Bytes of device memory in all.
    pub fn total_memory(&self) -> usize {
        self.ctx.mem_get_info().map_or(0, |(_, total)| total)
    }

    /// Open GPU 0 and load every kernel; with `SQLORA_CUDA_GRAPHS=1`, able to record CUDA graphs
    /// (greedy decoding then replays one per token).
    pub fn new() -> Result<Cuda> {
        Cuda::open(std::env::var("SQLORA_CUDA_GRAPHS").is_ok_and(|v| v == "1"))
    }

    /// Open GPU 0 and load every kernel. `graphs`: work goes to a stream of its own (the legacy
    /// default stream cannot be recorded), with cudarc's per-buffer events off (one stream needs
    /// none, and an event recorded before a capture must not be waited on inside it).
    pub fn open(graphs: bool) -> Result<Cuda> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        let ctx = CudaContext::new(0).context("opening CUDA device 0")?;
        let stream = if graphs {
            // SAFETY: every buffer of this Cuda is used on its one stream only.
            unsafe { ctx.disable_event_tracking() };
            ctx.new_stream().context("creating a CUDA stream")?
        } else {
            ctx.default_stream()
        };
        let [rmsnorm_fwd, rmsnorm_bwd]: [CudaFunction; 2] = load_file(&ctx, "rmsnorm")?.try_into().unwrap();
        let [rope_rotate]: [CudaFunction; 1] = load_file(&ctx, "rope")?.try_into().unwrap();
        let [swiglu_fwd, swiglu_bwd]: [CudaFunction; 2] = load_file(&ctx, "swiglu")?.try_into().unwrap();
        let [adamw_step, partial_norms]: [CudaFunction; 2] = load_file(&ctx, "adamw")?.try_into().unwrap();
        let [nf4_quantize, nf4_absmax_mean, nf4_double_quantize, nf4_dequantize_absmax, nf4_dequantize, nf4_gemm_fwd, nf4_gemm_bwd_input, nf4_gemm_fwd_mma, nf4_gemm_bwd_input_mma, nf4_gemv]: [CudaFunction; 10] = load_file(&ctx, "nf4")?
        .try_into()
        .unwrap();
        let lora: [CudaFunction; 12] = load_file(&ctx, "lora")?.try_into().unwrap();
        let [attention_fwd, attention_bwd_rowdot, attention_bwd_dq, attention_bwd_dkv, attention_decode]: [CudaFunction;
            5] = load_file(&ctx, "attention")?.try_into().unwrap();
        let [head_logits, head_grad, ce_softmax_grad, argmax_rows]: [CudaFunction; 4] =
            load_file(&ctx, "cross_entropy")?.try_into().unwrap();
        let [embedding_fwd]: [CudaFunction; 1] = load_file(&ctx, "embedding")?.try_into().unwrap();
        let [add_bf16, cast_f32_bf16, dropout_bf16, gather_rows, scatter_rows, add_bias_rows]: [CudaFunction; 6] =
            load_file(&ctx, "elementwise")?.try_into().unwrap();
        let attn_smem = opt_in_attention_smem(&ctx, &[&attention_fwd, &attention_bwd_dq, &attention_decode])?;
        let flash = load_tiled_attention(&ctx)?;
        Ok(Cuda {
            graphs,
            attn_smem,
            attention: AttentionPath::from_env()?,
            lora: LoraPath::from_env()?,
            attention_chosen: Arc::default(),
            profiling: Arc::default(),
            profiler: Arc::default(),
            gemm: GemmPath::from_env()?,
            gemm_state: GemmState::new(&stream),
            copies: Arc::default(),
            ctx,
            stream,
            k: Kernels {
                rmsnorm_fwd,
                rmsnorm_bwd,
                rope_rotate,
                swiglu_fwd,
                swiglu_bwd,
                adamw_step,
                partial_norms,
                nf4_quantize,
                nf4_absmax_mean,
                nf4_double_quantize,
                nf4_dequantize_absmax,
                nf4_dequantize,
                nf4_gemm_fwd,
                nf4_gemm_bwd_input,
                nf4_gemm_fwd_mma,
                nf4_gemm_bwd_input_mma,
                nf4_gemv,
                embedding_fwd,
                lora,
                attention_fwd,
                attention_bwd_rowdot,
                attention_bwd_dq,
                attention_bwd_dkv,
                attention_decode,
                flash,
                head_logits,
                head_grad,
                ce_softmax_grad,
                argmax_rows,
                add_bf16,
                cast_f32_bf16,
                dropout_bf16,
                gather_rows,
                scatter_rows,
                add_bias_rows,
            },
        })
    }
}

/// Whether a kernel named exactly `name` is in a fatbin: its symbol or section name, ended by NUL
/// (names are stored uncompressed; `nf4_gemm_fwd` does not match `nf4_gemm_fwd_mma`).
#[cfg(test)]
pub(crate) fn fatbin_has(bin: &[u8], name: &str) -> bool {
    [b'\0', b'.'].iter().any(|&before| {
        let mut pat = vec![before];
        pat.extend_from_slice(name.as_bytes());
        pat.push(0);
        bin.windows(pat.len()).any(|w| w == pat)
    })
}

/// For unit tests that need the compiled kernels: true (after saying so) when the build has none.
/// Under CI (`SQLORA_CI=1`, set by .ci/run, which installs nvcc) that is a failure instead.
#[cfg(test)]
pub(crate) fn skips_without_kernels() -> bool {
    if kernels::KERNELS_BUILT {
        return false;
    }
    let ci = std::env::var("SQLORA_CI").is_ok_and(|v| v == "1");
    assert!(!ci, "a CI build without CUDA kernels: nvcc was not found");
    eprintln!("skipped: this build has no CUDA kernels (no nvcc at build time)");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel `Cuda::open` looks up is in its file's fatbin, and every kernels/*.cu file is
    /// loaded: a misnamed or missing kernel fails here, without a GPU.
    #[test]
    fn every_kernel_open_looks_up_is_compiled() {
        if skips_without_kernels() {
            return;
        }
        for (file, bin, names) in kernel_table() {
            for name in names {
                assert!(fatbin_has(bin, name), "{name} is not in kernels/{file}.cu's fatbin");
            }
        }
        assert!(!fatbin_has(kernels::NF4, "nf4_gemm_fw"), "the match must be exact");
        let mut files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".cu").map(String::from))
            .collect();
        files.sort();
        let mut loaded: Vec<String> = kernel_table().iter().map(|(f, _, _)| f.to_string()).collect();
        loaded.push("flash_attention".into()); // by head width: load_tiled_attention
        loaded.sort();
        assert_eq!(files, loaded, "every kernels/*.cu file is loaded by Cuda::open");
    }
}
