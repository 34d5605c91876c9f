//! The fast CPU engine, in progress: the [`crate::engine::Device`] contract (bf16 activations, f32
//! statistics and gradients, NF4 frozen weights) with hand-written SIMD kernels chosen at run time
//! ([`isa::Isa`]: AVX-512, AVX2 with FMA, or portable; `SQLORA_CPU_ISA` forces a lower one).
//!
//! Kernels written so far: a register-blocked GEMM over panels decoded into cache ([`gemm`]), the
//! NF4 GEMM in both orientations on it ([`nf4_gemm`]), the output head and loss ([`loss`]), and
//! the elementwise and row kernels split among threads ([`elementwise`]; the host device's
//! arithmetic, not yet vectorised by hand). Every other kernel family is still the host device's (the f32 reference widened from and rounded
//! to bf16, `engine::host`), which [`Cpu`] shares through [`super::host::OnHost`].

pub mod elementwise;
pub mod gemm;
pub mod isa;
pub mod loss;
pub mod nf4_gemm;
pub mod peak;

use super::host::OnHost;
use super::{Bf, Nf4Gemm};
use crate::model::cpu::Linear;
use anyhow::Result;
use isa::Isa;

/// The CPU with the kernels of one instruction-set path.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub isa: Isa,
}

impl Cpu {
    /// The best path this CPU runs, or the one `SQLORA_CPU_ISA` names.
    pub fn new() -> Result<Cpu> {
        Ok(Cpu { isa: Isa::from_env()? })
    }
}

impl OnHost for Cpu {
    fn describe(&self) -> String {
        format!(
            "CPU, {} SIMD GEMMs (NF4 and the head), attention and LoRA the bf16 host device's ({} threads)",
            self.isa,
            rayon::current_num_threads()
        )
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
        nf4_gemm::nf4_gemm_fwd(self.isa, y, x, w, bias.map(|b| &b[..]), t);
        Ok(())
    }
    fn nf4_gemm_bwd_input(&self, dx: &mut Bf<Self>, dy: &Bf<Self>, w: &Linear, t: usize) -> Result<()> {
        nf4_gemm::nf4_gemm_bwd_input(self.isa, dx, dy, w, t);
        Ok(())
    }
}
