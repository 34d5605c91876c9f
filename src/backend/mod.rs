//! Compute backends. [`cpu`] is the reference: plain f32 loops that define what every op means.
//! [`cuda`] runs our hand-written kernels from `kernels/` and is tested against it op by op
//! (`sqlora selftest`).

pub mod cpu;
pub mod cuda;

/// The CUDA kernels compiled by build.rs (empty when the build had no nvcc).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
