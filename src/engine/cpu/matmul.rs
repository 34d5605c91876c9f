//! Which GEMM runs a product: AMX tiles ([`super::amx`]) on the AVX-512 path of a CPU that has
//! them, else the path's FMA GEMM ([`super::gemm`]). The NF4 GEMMs and the output head call this.

#[cfg(target_arch = "x86_64")]
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
    #[cfg(target_arch = "x86_64")]
    if super::amx::enabled(isa) {
        if check(isa, &a, t, l, n, ep, out.len()) {
            super::amx::gemm(isa, a, t, l, n, &FromF32(&panel), ep, out);
        }
        return;
    }
    super::gemm::gemm(isa, a, t, l, n, panel, ep, out)
}

/// [`gemm`], where the tiles take P's panels from `pairs`, straight in their layout (the FMA GEMM
/// from `panel`, as before).
#[allow(clippy::too_many_arguments)]
pub fn gemm_pairs<A: Widen, O: Store, P: Fn(usize, usize, usize, &mut [f32]) + Sync, Q: Panels>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: P,
    pairs: &Q,
    ep: Epilogue,
    out: &mut [O],
) {
    #[cfg(target_arch = "x86_64")]
    if super::amx::enabled(isa) {
        if check(isa, &a, t, l, n, ep, out.len()) {
            super::amx::gemm(isa, a, t, l, n, pairs, ep, out);
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pairs;
    super::gemm::gemm(isa, a, t, l, n, panel, ep, out)
}
