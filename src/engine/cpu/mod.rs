//! The CPU engine (`--device cpu`, and `auto` without a GPU): the [`crate::engine::Device`] contract
//! (bf16 activations, f32 statistics and gradients, NF4 frozen weights) with hand-written SIMD
//! kernels chosen at run time ([`isa::Isa`]: AVX-512, AVX2 with FMA, or portable;
//! `SQLORA_CPU_ISA` forces a lower one), each beside its reference twin and checked against it on
//! every path:
//! - [`gemm`]: the blocked GEMM and its register tiles, under the NF4 GEMM in both orientations
//!   ([`nf4_gemm`], decoding through [`nf4_decode`], or on bf16 pairs ([`amx`]: AMX tiles or
//!   AVX512-BF16 dot products, [`amx::dots`]) straight into their layout through [`nf4_pairs`])
//!   and the head and loss ([`loss`]); [`thin`] for the LoRA branch's products ([`lora`]), thin
//!   in the rank; [`gemv`] for decoding's few rows;
//! - [`attention`]: causal GQA attention over packed sequences, forward and backward, and decoding;
//! - [`elementwise`]: RMSNorm, RoPE, SwiGLU, embedding, dropout and the rest.
//!
//! AdamW and the gradient norm are the host device's (`engine::host`, shared through
//! [`super::host::OnHost`]): they touch only the adapters, a few million values per step.
//! [`profile`] times each kernel for `bench train --profile`; [`peak`] measures the FMA peak that
//! MFU is reported against.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod elementwise;
pub mod gemm;
pub mod gemv;
pub mod isa;
pub mod lora;
pub mod loss;
pub mod math;
pub mod matmul;
pub mod nf4_decode;
pub mod nf4_gemm;
pub mod nf4_pairs;
pub mod peak;
pub mod profile;
pub mod selftest;
pub mod thin;

use super::host::OnHost;
use super::{Bf, Nf4Gemm};
use crate::model::cpu::Linear;
use anyhow::Result;
use isa::Isa;
use std::sync::Arc;

/// The CPU with the kernels of one instruction-set path.
#[derive(Clone, Debug)]
pub struct Cpu {
    pub isa: Isa,
    /// Per-kernel times while profiling (shared by the clones of one device).
    profile: Arc<profile::Recorder>,
}

impl Cpu {
    /// The best path this CPU runs, or the one `SQLORA_CPU_ISA` names.
    pub fn new() -> Result<Cpu> {
        Ok(Cpu::with_isa(Isa::from_env()?))
    }

    /// The kernels of `isa` (which this CPU must run).
    pub fn with_isa(isa: Isa) -> Cpu {
        Cpu {
            isa,
            profile: Arc::default(),
        }
    }
}

impl OnHost for Cpu {
    fn describe(&self) -> String {
        format!(
            "CPU engine, {} kernels ({} threads)",
            self.isa,
            rayon::current_num_threads()
        )
    }
    fn timed<R>(&self, name: &'static str, f: impl FnOnce() -> R) -> R {
        self.profile.time(name, f)
    }
    fn set_profiling(&self, on: bool) {
        self.profile.set(on)
    }
    fn take_profile(&self) -> Vec<crate::engine::ProfileRow> {
        self.profile.take()
    }
}

impl Nf4Gemm for Cpu {
    fn nf4_gemm_fwd(
        &self,
        y: &mut Bf<Self>,
        x: &Bf<Self>,
        w: &Linear,
        bias: Option<&Bf<Self>>,
        t: usize,
    ) -> Result<()> {
        self.timed("nf4_gemm_fwd", || {
            nf4_gemm::nf4_gemm_fwd(self.isa, y, x, w, bias.map(|b| &b[..]), t)
        });
        Ok(())
    }
    fn nf4_gemm_bwd_input(&self, dx: &mut Bf<Self>, dy: &Bf<Self>, w: &Linear, t: usize) -> Result<()> {
        self.timed("nf4_gemm_bwd_input", || {
            nf4_gemm::nf4_gemm_bwd_input(self.isa, dx, dy, w, t)
        });
        Ok(())
    }
}
