//! The LoRA branch of a projection on the CPU engine, forward and backward, as six thin GEMMs
//! (`thin.rs`: one side of each is the rank r), each reading bf16 operands widened once to f32,
//! summing in f32, and adding into its output with one rounding. Reference twin: `model::cpu::lora`
//! (`lora_fwd`, `lora_bwd`), which `engine::host` runs. A: [r, in] and B: [out, r] are the
//! adapters' bf16 copies, where `at` places them in `w`; their gradients are f32, where `at`
//! places them in `grad`.
//!
//! ```text
//! forward   xa[t, r] = x[t, k] A^T            y[t, n] += s xa B^T
//! backward  g[t, r]  = dy[t, n] B             dB[n, r] += s dy^T xa
//!           dA[r, k] += s g^T x               dx[t, k] += s g A
//! ```
//! (the backward's four lines are the chain rule through y = s (x A^T) B^T: dy flows to xa as
//! s dy B = s g, to B as s dy^T xa, and from xa to A as g^T x and to x as g A.)

use super::gemm::{tile, transpose, Panels};
use super::math::widen;
use super::thin::{thin_add, thin_sum, widen_padded, Scratch, LANES, ROW_PAD};
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
            let isa = self.isa;
            let (k, n) = (at.inp, at.out);
            let (a, b) = (&w[at.a..at.a + r * k], &w[at.b..at.b + n * r]);
            let (rp, t_pad) = (r.next_multiple_of(LANES), t.next_multiple_of(ROW_PAD));
            // xa = x A^T: x's rows [t_pad, k] against A^T [k, rp].
            let xf = widen_padded(isa, &x[..t * k], t, k, t_pad, k);
            // A^T: A's rows widened (rp of them, zeros past r), then transposed 16 at a time.
            let af = widen_padded(isa, a, r, k, rp, k);
            let mut a_t = Scratch::take(k * rp);
            for c0 in (0..rp).step_by(LANES) {
                transpose(isa, &af[c0 * k..], k, LANES, k, &mut a_t[c0..], rp);
            }
            let mut xa_p = Scratch::take(t_pad * rp);
            thin_sum(isa, &xf, k, 1, t_pad, k, &a_t, rp, &mut xa_p);
            unpad(&xa_p, rp, &mut xa[..t * r], r);
            // y += s xa B^T: Q = B^T [r, n].
            let q = Panels::pack(tile(isa).1, r, n, r, |i, j| widen(b[j * r + i]));
            thin_add(isa, &mut y[..t * n], t, n, scale, &xa_p, rp, r, &q);
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
            let isa = self.isa;
            let (k, n) = (at.inp, at.out);
            let (a, b) = (&w[at.a..at.a + r * k], &w[at.b..at.b + n * r]);
            let rp = r.next_multiple_of(LANES);
            let [t_pad, n_pad, k_pad] = [t, n, k].map(|m| m.next_multiple_of(ROW_PAD));
            // dy as f32 [t_pad, n_pad]: read by rows for g, by columns for dB.
            let dyf = widen_padded(isa, &dy[..t * n], t, n, t_pad, n_pad);
            // g[t, r] = dy[t, n] B[n, r]
            let bf = widen_padded(isa, b, n, r, n, rp);
            let mut g_p = Scratch::take(t_pad * rp);
            thin_sum(isa, &dyf, n_pad, 1, t_pad, n, &bf, rp, &mut g_p);
            unpad(&g_p, rp, &mut g[..t * r], r);
            let (da, db) = grad[at.a..at.b + n * r].split_at_mut(r * k);
            // dB[n, r] += s dy^T[n, t] xa[t, r]: dy's columns against xa's rows.
            let xa_p = widen_padded(isa, &xa[..t * r], t, r, t, rp);
            let mut db_p = Scratch::take(n_pad * rp);
            thin_sum(isa, &dyf, 1, n_pad, n_pad, t, &xa_p, rp, &mut db_p);
            for (j, row) in db[..n * r].chunks_mut(r).enumerate() {
                row.iter_mut().zip(&db_p[j * rp..]).for_each(|(d, &v)| *d += scale * v);
            }
            // dA[r, k] += s g^T[r, t] x[t, k], as dA^T[k, r] = x^T g: x's columns against g's rows.
            let xf = widen_padded(isa, &x[..t * k], t, k, t, k_pad);
            let mut da_p = Scratch::take(k_pad * rp);
            thin_sum(isa, &xf, 1, k_pad, k_pad, t, &g_p, rp, &mut da_p);
            for (c, row) in da[..r * k].chunks_mut(k).enumerate() {
                row.iter_mut()
                    .enumerate()
                    .for_each(|(q, d)| *d += scale * da_p[q * rp + c]);
            }
            // dx[t, k] += s g[t, r] A[r, k]
            let q = Panels::pack(tile(isa).1, r, k, r, |i, j| widen(a[i * k + j]));
            thin_add(isa, &mut dx[..t * k], t, k, scale, &g_p, rp, r, &q);
            Ok(())
        })
    }
}

/// The first r columns of each row of src [rows, ld] into dst [rows, r].
fn unpad(src: &[f32], ld: usize, dst: &mut [f32], r: usize) {
    for (d, s) in dst.chunks_mut(r).zip(src.chunks(ld)) {
        d.copy_from_slice(&s[..r]);
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
