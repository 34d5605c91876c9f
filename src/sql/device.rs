//! `--device` as the commands resolve it (`train`, `predict`, `ask`, `bench`): the engine's
//! [`Target::open`], with what a user is told about the GPU. Where there is no GPU, `auto` runs on
//! the CPU without a word. Where there is one but this build has no CUDA kernels (nvcc was missing
//! when it was built), one line says what to install to use it.

use crate::engine::cuda;
use crate::engine::target::Target;
use anyhow::{bail, Result};
use std::path::Path;

/// The pip packages that give nvcc (CUDA 13.0, as `.ci/run` installs them); `build.rs` finds them
/// in python3's site-packages.
pub const NVCC_PIP: &str = "nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
                            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85";

/// Whether this machine has an NVIDIA GPU and driver, whatever this build can do with it.
pub fn gpu_present() -> bool {
    let linux = ["/dev/nvidia0", "/proc/driver/nvidia/version"];
    if cfg!(target_os = "linux") {
        return linux.iter().any(|p| Path::new(p).exists());
    }
    // SAFETY: only checks whether libcuda can be loaded; calls nothing in it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// What a user with a GPU does to use it with a build that has no kernels.
pub fn kernels_hint() -> String {
    format!(
        "this build has no CUDA kernels (nvcc was missing when it was built): to use the GPU, \
         `python3 -m pip install {NVCC_PIP}`, then rebuild with `SQLORA_REQUIRE_KERNELS=1 cargo build --release`"
    )
}

/// Resolve `--device NAME` as [`Target::open`] does, except that `auto` says nothing on a machine
/// without a GPU, and that a GPU this build cannot use (no kernels) gets [`kernels_hint`] instead
/// of the engine's message.
pub fn open(name: &str, fallback: Target) -> Result<Target> {
    let built = cuda::kernels::KERNELS_BUILT;
    match name {
        "cuda" if !built => bail!("--device cuda: {}", kernels_hint()),
        "auto" if !gpu_present() => Ok(fallback),
        "auto" if !built => {
            eprintln!("running on {}: {}", fallback.describe(), kernels_hint());
            Ok(fallback)
        }
        _ => Target::open(name, fallback),
    }
}
