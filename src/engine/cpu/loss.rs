//! The output head and the loss on the CPU engine: the head's two GEMMs through [`super::gemm`]
//! (the head is dense bf16 [V, d]), the softmax and its gradient row by row in parallel. Reference
//! twin: `model::cpu::cross_entropy`, as `engine::host` runs it (the same per-row formulas, with the
//! sums in vector lanes and a vectorisable exp, so within a bf16 rounding of the host's).

use super::gemm::{row_piece, straight_panel, transposed_panel, Epilogue, Lhs};
use super::gemv::{gemv, Weights, GEMV_MAX_T};
use super::math::{exp, round_bf16};
use super::matmul::gemm;
use super::Cpu;
use crate::engine::{Bf, LossOps, Q8Head, F32};
use anyhow::Result;
use half::bf16;
use rayon::prelude::*;

/// One row of the loss: with lse = logsumexp(z) and target y (None: unlabelled),
/// dz = bf16(inv_count (softmax(z) - onehot(y))); returns lse - z[y] (NaN when unlabelled). The host
/// device's `ce_row` with the maximum and sums in vector lanes and `math::exp`. z, dz: [vocab].
#[inline(always)]
fn ce_row(dz: &mut [bf16], z: &[f32], y: Option<usize>, inv_count: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let whole = z.len() / 16 * 16;
    for c in z[..whole].chunks_exact(16) {
        m.iter_mut().zip(c).for_each(|(m, &v)| *m = m.max(v));
    }
    let m = z[whole..].iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0f32; 16];
    for c in z[..whole].chunks_exact(16) {
        sums.iter_mut().zip(c).for_each(|(s, &v)| *s += exp(v - m));
    }
    let sum: f32 = sums.iter().sum::<f32>() + z[whole..].iter().map(|&v| exp(v - m)).sum::<f32>();
    let lse = m + sum.ln();
    for (o, &v) in dz.iter_mut().zip(z) {
        *o = round_bf16(inv_count * exp(v - lse));
    }
    match y {
        Some(y) => {
            dz[y] = round_bf16(inv_count * (exp(z[y] - lse) - 1.0));
            lse - z[y]
        }
        None => f32::NAN,
    }
}

crate::multiversion! { fn ce_row_on(dz: &mut [bf16], z: &[f32], y: Option<usize>, inv_count: f32) -> f32 => ce_row }

#[allow(clippy::too_many_arguments)]
impl LossOps for Cpu {
    /// logits[i] = h[row0 + i] head^T. logits: [rows, V] f32; h: [.., d]; head: [V, d].
    fn head_logits(
        &self,
        logits: &mut F32<Self>,
        h: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        self.profile.time("head_logits", || {
            let v = head.len() / d;
            if (1..=GEMV_MAX_T).contains(&rows) {
                let h = &h[row0 * d..(row0 + rows) * d];
                gemv(
                    self.isa,
                    &mut logits[..rows * v],
                    h,
                    Weights::Bf16(head),
                    None,
                    rows,
                    v,
                    d,
                );
                return Ok(());
            }
            let panel = transposed_panel(self.isa, v, |j, l0, out| row_piece(head, d, j, l0, out));
            gemm(
                self.isa,
                Lhs::Rows(&h[row0 * d..(row0 + rows) * d]),
                rows,
                d,
                v,
                panel,
                Epilogue::ASSIGN,
                &mut logits[..rows * v],
            );
            Ok(())
        })
    }

    fn has_q8_head(&self) -> bool {
        true
    }

    /// The GEMV from the Q8_0 codes, up to [`GEMV_MAX_T`] rows of h at a time.
    fn head_logits_q8(
        &self,
        logits: &mut F32<Self>,
        h: &Bf<Self>,
        head: &Q8Head<Self>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        self.profile.time("head_logits_q8", || {
            let codes: &[i8] = bytemuck::cast_slice(&head.codes);
            let v = codes.len() / d;
            let w = Weights::Q8 {
                codes,
                scales: &head.scales,
            };
            let (h, logits) = (&h[..rows * d], &mut logits[..rows * v]);
            for (h, y) in h.chunks(GEMV_MAX_T * d).zip(logits.chunks_mut(GEMV_MAX_T * v)) {
                gemv(self.isa, y, h, w, None, h.len() / d, v, d);
            }
            Ok(())
        })
    }

    /// Per row ([`ce_row`]), rows split among threads: lse = logsumexp(logits[i]);
    /// loss[row0 + i] = lse - logits[i, y]; dlogits[i] = inv_count (softmax(logits[i]) - onehot(y)).
    fn ce_softmax_grad(
        &self,
        dlogits: &mut Bf<Self>,
        loss: &mut F32<Self>,
        logits: &F32<Self>,
        targets: &Vec<i32>,
        row0: usize,
        rows: usize,
        vocab: usize,
        inv_count: f32,
    ) -> Result<()> {
        self.profile.time("ce_softmax_grad", || {
            let losses: Vec<f32> = (dlogits[..rows * vocab].par_chunks_mut(vocab))
                .zip(logits[..rows * vocab].par_chunks(vocab))
                .enumerate()
                .map(|(i, (dz, z))| {
                    let y = usize::try_from(targets[row0 + i]).ok().filter(|&y| y < vocab);
                    ce_row_on(self.isa, dz, z, y, inv_count)
                })
                .collect();
            loss[row0..row0 + rows].copy_from_slice(&losses);
            Ok(())
        })
    }

    /// dh[row0 + i] = dlogits[i] head. dh: [.., d]; dlogits: [rows, V]; head: [V, d].
    fn head_grad(
        &self,
        dh: &mut Bf<Self>,
        dlogits: &Bf<Self>,
        head: &Bf<Self>,
        row0: usize,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        self.profile.time("head_grad", || {
            let v = head.len() / d;
            let panel = straight_panel(d, |j, c0, out| row_piece(head, d, j, c0, out));
            gemm(
                self.isa,
                Lhs::Rows(&dlogits[..rows * v]),
                rows,
                v,
                d,
                panel,
                Epilogue::ASSIGN,
                &mut dh[row0 * d..(row0 + rows) * d],
            );
            Ok(())
        })
    }

    fn argmax_rows(&self, out: &mut Vec<i32>, logits: &Vec<f32>, rows: usize, v: usize) -> Result<()> {
        self.profile.time("argmax_rows", || {
            (out[..rows].par_iter_mut())
                .zip(logits.par_chunks(v))
                .for_each(|(o, row)| *o = crate::model::generate::argmax(row) as i32);
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

    /// Each path against the host device (the f32 reference on the same bf16 values), outputs
    /// poisoned first, at a row offset and with odd sizes. Logits are f32, so only the order of the
    /// sums differs (1e-5); dh and the softmax gradient are rounded to bf16 once (4e-3); the losses
    /// differ by the order of the sums and `math::exp` (1e-5).
    #[test]
    fn every_path_matches_the_host_device() {
        let mut rng = Rng::new(11);
        for isa in Isa::available() {
            let cpu = Cpu::with_isa(isa);
            for (rows, v, d, row0) in [(1, 7, 16, 0), (5, 33, 24, 2), (9, 100, 40, 3)] {
                let all = row0 + rows;
                let h = to_bf16(&rng.normal_vec(all * d, 1.0));
                let head = to_bf16(&rng.normal_vec(v * d, 0.3));
                let mut want = vec![0f32; rows * v];
                Host.head_logits(&mut want, &h, &head, row0, rows, d).unwrap();
                let mut got = vec![f32::NAN; rows * v];
                cpu.head_logits(&mut got, &h, &head, row0, rows, d).unwrap();
                assert!(rel_err(&got, &want) < 1e-5, "{isa} logits {rows}x{v}x{d}");

                let targets: Vec<i32> = (0..all as i32)
                    .map(|i| if i % 4 == 1 { -100 } else { i % v as i32 })
                    .collect();
                let (mut dz_want, mut loss_want) = (vec![bf16::ZERO; rows * v], vec![0f32; all]);
                Host.ce_softmax_grad(&mut dz_want, &mut loss_want, &want, &targets, row0, rows, v, 0.25)
                    .unwrap();
                let (mut dz, mut loss) = (vec![bf16::NAN; rows * v], vec![0f32; all]);
                cpu.ce_softmax_grad(&mut dz, &mut loss, &want, &targets, row0, rows, v, 0.25)
                    .unwrap();
                assert!(rel_err(&to_f32(&dz), &to_f32(&dz_want)) < 4e-3, "{isa} dlogits");
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0) || (a.is_nan() && b.is_nan());
                assert!(loss.iter().zip(&loss_want).all(|(&a, &b)| close(a, b)), "{isa} losses");

                let mut dh_want = vec![bf16::ZERO; all * d];
                Host.head_grad(&mut dh_want, &dz, &head, row0, rows, d).unwrap();
                let mut dh = vec![bf16::NAN; all * d];
                cpu.head_grad(&mut dh, &dz, &head, row0, rows, d).unwrap();
                let err = rel_err(&to_f32(&dh[row0 * d..]), &to_f32(&dh_want[row0 * d..]));
                assert!(err < 4e-3, "{isa} dh: {err}");
                assert!(
                    dh[..row0 * d].iter().all(|x| x.is_nan()),
                    "{isa}: dh rows before row0 untouched"
                );
            }
        }
    }
}
