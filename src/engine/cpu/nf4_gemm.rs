//! The NF4 GEMM on the CPU, in both orientations, from the packed bytes (through [`super::gemm`]).
//! Reference twin: `model::cpu::linear` (`linear_fwd`, `linear_bwd_input`), which `engine::host` runs.
//!
//! ```text
//! forward   Y[t, n]  = X[t, k]  W[n, k]^T (+ b)      X, Y bf16; W NF4 [out = n, in = k]
//! backward  dX[t, k] = dY[t, n] W[n, k]              dY, dX bf16
//! ```
//!
//! Forward: A = X, L = k, P = W^T, each panel's NR rows of W decoded from NF4 and transposed; for
//! up to `GEMV_MAX_T` rows (decoding), the GEMV of `gemv.rs` instead.
//! Backward: A = dY, L = n, P = W, each panel NR columns of every row of W.

use super::gemm::{straight_panel, transposed_panel, Epilogue, Lhs};
use super::gemv::{gemv, Weights, GEMV_MAX_T};
use super::isa::Isa;
use super::matmul::{gemm, gemm_pairs, Panels};
use super::{nf4_decode, nf4_pairs};
use crate::model::cpu::{Linear, LinearWeight};
use crate::model::nf4::Nf4Tensor;
use half::bf16;

/// Y = X W^T (+ bias). y: [t, n] (the first t n values written); x: [t, k]; bias: [n].
pub fn nf4_gemm_fwd(isa: Isa, y: &mut [bf16], x: &[bf16], w: &Linear, bias: Option<&[bf16]>, t: usize) {
    let (n, k) = (w.out_features, w.in_features);
    assert!(
        x.len() >= t * k && y.len() >= t * n,
        "nf4_gemm_fwd: buffers shorter than [t, in], [t, out]"
    );
    let bias: Option<Vec<f32>> = bias.map(|b| b[..n].iter().map(|v| v.to_f32()).collect());
    if let (LinearWeight::Nf4(q), 1..=GEMV_MAX_T) = (&w.weight, t) {
        return gemv(isa, y, x, Weights::Nf4(q), bias.as_deref(), t, n, k);
    }
    let panel = transposed_panel(isa, n, |j, l0, out| decode(isa, w, j * k + l0, out));
    let ep = Epilogue {
        bias: bias.as_deref(),
        ..Epilogue::ASSIGN
    };
    match &w.weight {
        LinearWeight::Nf4(q) if nf4_pairs::fits(isa, k) && q.shape == [n, k] => {
            let pairs = Nf4Pairs(q, true);
            gemm_pairs(isa, Lhs::Rows(&x[..t * k]), t, k, n, panel, Some(&pairs), ep, y)
        }
        _ => gemm(isa, Lhs::Rows(&x[..t * k]), t, k, n, panel, ep, y),
    }
}

/// The panels of W^T (true) or W for the tiles, straight from NF4 ([`nf4_pairs`]).
struct Nf4Pairs<'a>(&'a Nf4Tensor, bool);

impl Panels for Nf4Pairs<'_> {
    fn pairs(&self, isa: Isa, j0: usize, l0: usize, kc: usize, p: &mut [bf16], _f: &mut [f32]) {
        match self.1 {
            true => nf4_pairs::transposed_pairs(isa, self.0, j0, l0, kc, p),
            false => nf4_pairs::straight_pairs(isa, self.0, j0, l0, kc, p),
        }
    }
}

/// dX = dY W. dx: [t, k] (the first t k values written); dy: [t, n].
pub fn nf4_gemm_bwd_input(isa: Isa, dx: &mut [bf16], dy: &[bf16], w: &Linear, t: usize) {
    let (n, k) = (w.out_features, w.in_features);
    assert!(
        dy.len() >= t * n && dx.len() >= t * k,
        "nf4_gemm_bwd_input: buffers shorter than [t, out], [t, in]"
    );
    let panel = straight_panel(k, |j, c0, out| decode(isa, w, j * k + c0, out));
    let a = Lhs::Rows(&dy[..t * n]);
    match &w.weight {
        LinearWeight::Nf4(q) if nf4_pairs::fits(isa, k) && n.is_multiple_of(32) && q.shape == [n, k] => {
            gemm_pairs(isa, a, t, n, k, panel, Some(&Nf4Pairs(q, false)), Epilogue::ASSIGN, dx)
        }
        _ => gemm(isa, a, t, n, k, panel, Epilogue::ASSIGN, dx),
    }
}

/// The flattened weights `start .. start + out.len()` of `w` as f32.
#[inline(always)]
fn decode(isa: Isa, w: &Linear, start: usize, out: &mut [f32]) {
    match &w.weight {
        LinearWeight::Nf4(q) => nf4_decode::decode(isa, q, start, out),
        LinearWeight::Dense(v) => out.copy_from_slice(&v[start..start + out.len()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::rel_err;
    use crate::engine::{to_bf16, to_f32};
    use crate::model::cpu::{linear_bwd_input, linear_fwd};
    use crate::util::rng::Rng;

    /// Every path against the f32 reference on the same bf16 inputs, at sizes that leave partial
    /// register tiles and panels (odd t, n and k) and whole ones, outputs poisoned first. The one
    /// rounding of each output to bf16 bounds the error: ~2^-9 relative per element, ~1e-3 overall.
    #[test]
    fn every_path_matches_the_reference_in_both_orientations() {
        let mut rng = Rng::new(7);
        for isa in Isa::available() {
            for (t, n, k) in [
                (1, 1, 64),
                (3, 17, 64),
                (9, 33, 130),
                (17, 64, 192),
                (64, 96, 256),
                (5, 40, 77),
            ] {
                let w = Linear::dense(n, k, rng.normal_vec(n * k, 0.5), None).to_nf4();
                let x = to_bf16(&rng.normal_vec(t * k, 1.0));
                let b = to_bf16(&rng.normal_vec(n, 0.1));
                let mut want = vec![0f32; t * n];
                linear_fwd(&mut want, &to_f32(&x), &w);
                want.chunks_mut(n)
                    .for_each(|r| r.iter_mut().zip(&b).for_each(|(o, v)| *o += v.to_f32()));
                let mut y = vec![bf16::NAN; t * n + 3];
                nf4_gemm_fwd(isa, &mut y, &x, &w, Some(&b), t);
                let err = rel_err(&to_f32(&y[..t * n]), &want);
                assert!(err < 4e-3, "{isa} forward t {t} n {n} k {k}: {err}");
                assert!(y[t * n..].iter().all(|v| v.is_nan()), "{isa}: wrote past [t, n]");

                let dy = to_bf16(&rng.normal_vec(t * n, 1.0));
                let mut want = vec![0f32; t * k];
                linear_bwd_input(&mut want, &to_f32(&dy), &w);
                let mut dx = vec![bf16::NAN; t * k + 3];
                nf4_gemm_bwd_input(isa, &mut dx, &dy, &w, t);
                let err = rel_err(&to_f32(&dx[..t * k]), &want);
                assert!(err < 4e-3, "{isa} backward t {t} n {n} k {k}: {err}");
                assert!(dx[t * k..].iter().all(|v| v.is_nan()), "{isa}: wrote past [t, k]");
            }
        }
    }

    /// Threads split panels, never a sum: the same bits with one thread as with many.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = Rng::new(3);
        let (t, n, k) = (13, 100, 128);
        let w = Linear::dense(n, k, rng.normal_vec(n * k, 0.5), None).to_nf4();
        let x = to_bf16(&rng.normal_vec(t * k, 1.0));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut y = vec![bf16::ZERO; t * n];
            pool.install(|| nf4_gemm_fwd(Isa::best(), &mut y, &x, &w, None, t));
            y
        };
        assert_eq!(run(1), run(3));
    }
}
