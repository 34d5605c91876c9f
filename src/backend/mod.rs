//! Compute backends. [`cpu`] is the reference: plain f32 loops that define what every op means.
//! The CUDA backend (hand-written kernels from `kernels/`) will implement the same op set and is
//! tested against it op by op.

pub mod cpu;

/// The CUDA kernels compiled by build.rs (empty when the build had no nvcc).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
