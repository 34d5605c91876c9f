//! Which GEMM runs a product: the bf16 pair GEMM ([`super::amx`]: AMX tiles or AVX512-BF16 dot
//! products) on the AVX-512 path of a CPU that has either (and L is not empty), else the path's FMA
//! GEMM ([`super::gemm`]). The NF4 GEMMs and the output head call this.

use super::amx::FromF32;
pub use super::amx::Panels;
use super::gemm::{check, Epilogue, Lhs, Store, Widen};
use super::isa::Isa;

/// C[t, N] = alpha A[t, L] P[L, N] (+ bias) (+ C) into `out`: [`super::gemm::gemm`]'s contract.
#[allow(clippy::too_many_arguments)]
pub fn gemm<A: Widen, O: Store, P: Fn(usize, usize, usize, &mut [f32]) + Sync>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: P,
    ep: Epilogue,
    out: &mut [O],
) {
    gemm_pairs(isa, a, t, l, n, panel, None::<&FromF32<P>>, ep, out)
}

/// [`gemm`], where the pair GEMM takes P's panels from `pairs` if given, straight in their layout
/// (else `panel`'s, rounded into it); the FMA GEMM takes `panel`'s.
#[allow(clippy::too_many_arguments)]
pub fn gemm_pairs<A: Widen, O: Store, P: Fn(usize, usize, usize, &mut [f32]) + Sync, Q: Panels>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: P,
    pairs: Option<&Q>,
    ep: Epilogue,
    out: &mut [O],
) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(kernel), true) = (super::amx::kernel(isa), l > 0) {
        if check(isa, &a, t, l, n, ep, out.len()) {
            match pairs {
                Some(q) => super::amx::gemm(kernel, isa, a, t, l, n, q, ep, out),
                None => super::amx::gemm(kernel, isa, a, t, l, n, &FromF32(&panel), ep, out),
            }
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pairs;
    super::gemm::gemm(isa, a, t, l, n, panel, ep, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L = 0 (no steps) on every path: the sums are zero, so out = bias, the pair GEMM not taken.
    #[test]
    fn an_empty_l_gives_the_bias() {
        for isa in Isa::available() {
            let (t, n) = (3, 5);
            let bias: Vec<f32> = (0..n).map(|j| j as f32 - 1.5).collect();
            let mut out = vec![f32::NAN; t * n];
            let ep = Epilogue {
                bias: Some(&bias),
                ..Epilogue::ASSIGN
            };
            let panel = |_: usize, _: usize, _: usize, _: &mut [f32]| panic!("no panel has steps");
            gemm(isa, Lhs::Rows(&[] as &[f32]), t, 0, n, panel, ep, &mut out);
            assert!(out.chunks(n).all(|r| r == &bias[..]), "{isa}: {out:?}");
        }
    }
}
