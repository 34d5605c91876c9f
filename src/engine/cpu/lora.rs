//! The LoRA branch of a projection on the CPU engine, forward and backward, as six small GEMMs
//! through [`super::gemm`] (each reads the bf16 operands directly, sums in f32, and adds into its
//! output in the epilogue). Reference twin: `model::cpu::lora` (`lora_fwd`, `lora_bwd`), which
//! `engine::host` runs. A: [r, in] and B: [out, r] are the adapters' bf16 copies, where `at` places
//! them in `w`; their gradients are f32, where `at` places them in `grad`.
//!
//! ```text
//! forward   xa[t, r] = x[t, k] A^T            y[t, n] += s xa B^T
//! backward  g[t, r]  = dy[t, n] B             dB[n, r] += s dy^T xa
//!           dA[r, k] += s g^T x               dx[t, k] += s g A
//! ```
//! (the backward's four lines are the chain rule through y = s (x A^T) B^T: dy flows to xa as
//! s dy B = s g, to B as s dy^T xa, and from xa to A as g^T x and to x as g A.)

use super::gemm::{gemm, row_piece, straight_panel, transposed_panel, Epilogue, Lhs};
use super::Cpu;
use crate::engine::{Bf, LoraOps, F32};
use crate::model::lora::LoraAt;
use anyhow::Result;

#[allow(clippy::too_many_arguments)]
impl LoraOps for Cpu {
    /// xa = x A^T; y += s xa B^T. y: [t, out]; xa: [t, r] f32; x: [t, in].
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
        self.profile.time("lora_fwd", || {
            let (k, n) = (at.inp, at.out);
            let (a, b) = (&w[at.a..at.a + r * k], &w[at.b..at.b + n * r]);
            let xa = &mut xa[..t * r];
            let pa = transposed_panel(r, |j, l0, out| row_piece(a, k, j, l0, out));
            gemm(self.isa, Lhs::Rows(&x[..t * k]), t, k, r, pa, Epilogue::ASSIGN, xa);
            let pb = transposed_panel(n, |j, l0, out| row_piece(b, r, j, l0, out));
            gemm(
                self.isa,
                Lhs::Rows(&*xa),
                t,
                r,
                n,
                pb,
                Epilogue::add(scale),
                &mut y[..t * n],
            );
            Ok(())
        })
    }

    /// g = dy B; dB += s dy^T xa; dA += s g^T x; dx += s g A. dx: [t, in]; g: [t, r] f32;
    /// dy: [t, out]; x: [t, in]; xa: [t, r] f32.
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
        self.profile.time("lora_bwd", || {
            let (k, n) = (at.inp, at.out);
            let (a, b) = (&w[at.a..at.a + r * k], &w[at.b..at.b + n * r]);
            let (dy, x, xa) = (&dy[..t * n], &x[..t * k], &xa[..t * r]);
            let g = &mut g[..t * r];
            // g[t, r] = dy[t, n] B[n, r]
            let pb = straight_panel(r, |j, c0, out| row_piece(b, r, j, c0, out));
            gemm(self.isa, Lhs::Rows(dy), t, n, r, pb, Epilogue::ASSIGN, g);
            let (da, db) = grad[at.a..at.b + n * r].split_at_mut(r * k);
            // dB[n, r] += s dy^T[n, t] xa[t, r]
            let pxa = straight_panel(r, |j, c0, out| row_piece(xa, r, j, c0, out));
            gemm(
                self.isa,
                Lhs::Cols(dy),
                n,
                t,
                r,
                pxa,
                Epilogue::add(scale),
                &mut db[..n * r],
            );
            // dA[r, k] += s g^T[r, t] x[t, k]
            let px = straight_panel(k, |j, c0, out| row_piece(x, k, j, c0, out));
            gemm(
                self.isa,
                Lhs::Cols(&*g),
                r,
                t,
                k,
                px,
                Epilogue::add(scale),
                &mut da[..r * k],
            );
            // dx[t, k] += s g[t, r] A[r, k]
            let pa = straight_panel(k, |j, c0, out| row_piece(a, k, j, c0, out));
            gemm(
                self.isa,
                Lhs::Rows(&*g),
                t,
                r,
                k,
                pa,
                Epilogue::add(scale),
                &mut dx[..t * k],
            );
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::isa::Isa;
    use crate::engine::cuda::rel_err;
    use crate::engine::host::Host;
    use crate::engine::{to_bf16, to_f32};
    use crate::util::rng::Rng;

    /// Each path against the host device (the f32 reference on the same bf16 values), at odd sizes
    /// and one past a block of L, outputs poisoned where the kernel overwrites and random where it
    /// adds. y and dx are rounded to bf16 once (4e-3); xa and the f32 gradients differ only in the
    /// order of their f32 sums (1e-5).
    #[test]
    fn every_path_matches_the_host_device() {
        let mut rng = Rng::new(23);
        for isa in Isa::available() {
            let cpu = Cpu::with_isa(isa);
            for (t, k, n, r) in [
                (1, 8, 5, 2),
                (7, 33, 19, 4),
                (13, 64, 96, 16),
                (600, 40, 24, 8),
                (9, 700, 30, 16),
            ] {
                // w holds [pad | A | B | pad]; grad has the same layout.
                let at = LoraAt {
                    a: 3,
                    b: 3 + r * k,
                    inp: k,
                    out: n,
                };
                let len = at.b + n * r + 5;
                let w = to_bf16(&rng.normal_vec(len, 0.2));
                let x = to_bf16(&rng.normal_vec(t * k, 1.0));
                let y0 = to_bf16(&rng.normal_vec(t * n, 1.0));
                let (mut y_want, mut y) = (y0.clone(), y0);
                let (mut xa_want, mut xa) = (vec![0f32; t * r], vec![f32::NAN; t * r]);
                Host.lora_fwd(&mut y_want, &mut xa_want, &x, &w, at, t, r, 0.7).unwrap();
                cpu.lora_fwd(&mut y, &mut xa, &x, &w, at, t, r, 0.7).unwrap();
                assert!(rel_err(&xa, &xa_want) < 1e-5, "{isa} xa t {t} k {k} n {n} r {r}");
                let err = rel_err(&to_f32(&y), &to_f32(&y_want));
                assert!(err < 4e-3, "{isa} y t {t} k {k} n {n} r {r}: {err}");

                let dy = to_bf16(&rng.normal_vec(t * n, 1.0));
                let dx0 = to_bf16(&rng.normal_vec(t * k, 1.0));
                let g0 = rng.normal_vec(len, 0.1);
                let (mut dx_want, mut dx) = (dx0.clone(), dx0);
                let (mut grad_want, mut grad) = (g0.clone(), g0);
                let mut g = vec![f32::NAN; t * r];
                Host.lora_bwd(
                    &mut dx_want,
                    &mut grad_want,
                    &mut g.clone(),
                    &dy,
                    &x,
                    &xa_want,
                    &w,
                    at,
                    t,
                    r,
                    0.7,
                )
                .unwrap();
                cpu.lora_bwd(&mut dx, &mut grad, &mut g, &dy, &x, &xa_want, &w, at, t, r, 0.7)
                    .unwrap();
                let err = rel_err(&to_f32(&dx), &to_f32(&dx_want));
                assert!(err < 4e-3, "{isa} dx t {t} k {k} n {n} r {r}: {err}");
                let (ga, gb) = (at.a..at.b, at.b..at.b + n * r);
                assert!(
                    rel_err(&grad[ga.clone()], &grad_want[ga]) < 1e-5,
                    "{isa} dA t {t} k {k}"
                );
                assert!(
                    rel_err(&grad[gb.clone()], &grad_want[gb]) < 1e-5,
                    "{isa} dB t {t} n {n}"
                );
                assert_eq!(grad[..3], grad_want[..3], "{isa}: wrote before A's gradient");
                assert_eq!(grad[len - 5..], grad_want[len - 5..], "{isa}: wrote past B's gradient");
            }
        }
    }
}
