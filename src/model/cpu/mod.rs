//! The CPU reference backend: every op as plain f32 loops, parallel over independent rows with rayon.
//! One file per op family, forward and backward side by side, mirroring kernels/*.cu. This module is
//! the specification the CUDA kernels are checked against, so clarity wins over speed.
//!
//! Conventions: tensors are flat row-major `f32` slices; the comment beside each argument gives its
//! shape. `T` is the number of tokens in the call, `d` the model width, `hd` the head width.

mod attention;
mod cross_entropy;
mod elementwise;
mod linear;
mod lora;
mod rmsnorm;
mod rope;
mod swiglu;

pub use attention::*;
pub use cross_entropy::*;
pub use elementwise::*;
pub use linear::*;
pub use lora::*;
pub use rmsnorm::*;
pub use rope::*;
pub use swiglu::*;

/// `out[t] = table[tokens[t]]`.
/// out: [T, d], table: [vocab, d].
pub fn embedding_fwd(out: &mut [f32], table: &[f32], tokens: &[u32], d: usize) {
    assert_eq!(out.len(), tokens.len() * d);
    for (row, &tok) in out.chunks_mut(d).zip(tokens) {
        let tok = tok as usize;
        assert!(
            (tok + 1) * d <= table.len(),
            "token id {tok} is outside the embedding table"
        );
        row.copy_from_slice(&table[tok * d..(tok + 1) * d]);
    }
}
