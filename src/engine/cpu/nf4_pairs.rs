//! NF4 weights straight into the pair layout of the AMX tiles, for Y = X W^T and dX = dY W: no f32
//! panel, no transpose of f32 values, no second pass to round. Reference twin: the general route of
//! [`super::amx`] (`nf4_decode::decode` of W's rows, `gemm::transposed_panel`, then `amx::pairs`),
//! whose bits these are (one f32 product `NF4_TABLE[code] absmax`, rounded to bf16 once).
//!
//! ```text
//! p[h][i][c][e] = bf16(W[j0 + 16h + c][l0 + 2i + e])     h < 2, i < kc / 2, c < 16, e < 2
//! ```
//! (zero for rows past N). Per 16 rows and 32 steps: each row's 16 bytes become 32 bf16, one
//! 64-byte register of 16 pairs; the 16 registers are transposed as 32-bit words, and each becomes
//! one 64-byte tile row. For W itself (dX = dY W, the steps down W's rows), a tile row is two rows'
//! 16 values, interleaved: p[h][i][c][e] = bf16(W[l0 + 2i + e][j0 + 16h + c]).
//!
//! The fast route needs every 32 steps of a row inside one block of 64 (k a multiple of 64, l0 and
//! kc of 32); [`fits`] says so, and the GEMM takes the general route otherwise.

use super::isa::Isa;
use crate::model::nf4::{Nf4Tensor, BLOCK};
use half::bf16;

/// Whether [`transposed_pairs`] can decode panels of a [n, k] weight: k a multiple of the block.
pub fn fits(isa: Isa, k: usize) -> bool {
    isa == Isa::Avx512 && k.is_multiple_of(BLOCK)
}

/// The panel of W^T (W: `q`, shape [n, k]) for columns j0 .. j0 + 32 and steps l0 .. l0 + kc, in
/// pair layout: p [2][kc / 2][16][2], rows of W past n zero. Needs [`fits`], l0 and kc multiples of
/// 32.
pub fn transposed_pairs(isa: Isa, q: &Nf4Tensor, j0: usize, l0: usize, kc: usize, p: &mut [bf16]) {
    let [n, k] = q.shape[..] else {
        panic!("transposed_pairs: a weight of shape {:?}, not [n, k]", q.shape)
    };
    assert!(fits(isa, k) && l0.is_multiple_of(32) && kc.is_multiple_of(32) && l0 + kc <= k);
    assert!(p.len() >= 32 * kc, "transposed_pairs: panel too small");
    #[cfg(target_arch = "x86_64")]
    {
        let half = kc / 2 * 32;
        for h in 0..2 {
            let rows = 16.min(n.saturating_sub(j0 + 16 * h));
            for s in 0..kc / 32 {
                // SAFETY: `fits` says the CPU has AVX-512 (the path was checked where the engine was
                // built); rows j0 + 16h + c < n hold steps l0 + 32s .. + 32 inside q (n k <= numel,
                // its shape), each inside one block of 64; the 16 tile rows from pair row 16s of
                // half h lie inside p (p.len() >= 32 kc, asserted).
                unsafe {
                    x86::tile_rows(
                        q,
                        (j0 + 16 * h) * k + l0 + 32 * s,
                        k,
                        rows,
                        p[h * half + s * 16 * 32..].as_mut_ptr(),
                    )
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("transposed_pairs needs AVX-512 ({isa}, {n}, {j0})");
}

/// The panel of W (`q`, shape [n, k]) for columns j0 .. j0 + 32 and steps (rows of W) l0 .. l0 +
/// kc, in pair layout: p[h][i][c][e] = bf16(W[l0 + 2i + e][j0 + 16h + c]), p [2][kc / 2][16][2]: two
/// rows' 16 values each, interleaved, per tile row. Needs [`fits`], j0 + 32 <= k, l0 + kc <= n, l0
/// and kc multiples of 32.
pub fn straight_pairs(isa: Isa, q: &Nf4Tensor, j0: usize, l0: usize, kc: usize, p: &mut [bf16]) {
    let [n, k] = q.shape[..] else {
        panic!("straight_pairs: a weight of shape {:?}, not [n, k]", q.shape)
    };
    assert!(fits(isa, k) && j0.is_multiple_of(32) && j0 + 32 <= k);
    assert!(l0.is_multiple_of(32) && kc.is_multiple_of(32) && l0 + kc <= n);
    assert!(p.len() >= 32 * kc, "straight_pairs: panel too small");
    #[cfg(target_arch = "x86_64")]
    {
        let half = kc / 2 * 32;
        for h in 0..2 {
            for i in 0..kc / 2 {
                // SAFETY: `fits` says the CPU has AVX-512; rows l0 + 2i and l0 + 2i + 1 < n hold
                // columns j0 + 16h .. + 16 < k (asserted), 16 values inside one block of 64 (k and
                // j0 + 16h multiples of 64 and 16); tile row i of half h lies inside p.
                unsafe {
                    x86::pair_row(
                        q,
                        (l0 + 2 * i) * k + j0 + 16 * h,
                        k,
                        p[h * half + i * 32..].as_mut_ptr(),
                    )
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("straight_pairs needs AVX-512 ({isa}, {n}, {j0})");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{bf16, Nf4Tensor, BLOCK};
    use crate::engine::cpu::gemm::transpose16;
    use crate::model::nf4::NF4_TABLE;
    use std::arch::x86_64::*;

    /// 16 tile rows of 64 bytes at `out`: row i holds, for c < 16, the bf16 pair of elements
    /// start + c k + 2i, + 1 of q (zero for c >= rows).
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW); for c < rows, elements start + c k .. + 32 lie inside q and one
    /// block; out: 16 x 32 writable bf16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn tile_rows(q: &Nf4Tensor, start: usize, k: usize, rows: usize, out: *mut bf16) {
        let (packed, absmax) = (q.packed.as_ptr(), q.absmax());
        let table = _mm512_loadu_ps(NF4_TABLE.as_ptr());
        // Element m of the 32 as 16 bits: the low half of 32-bit lane m of (lo, hi).
        let idx = _mm512_set_epi16(
            62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10,
            8, 6, 4, 2, 0,
        );
        let mut words = [0f32; 16 * 16];
        for c in 0..rows {
            let e = start + c * k;
            let scale = _mm512_set1_ps(absmax[e / BLOCK]);
            // SAFETY: 16 bytes from element e (even: k and start are) lie inside packed (the
            // caller's promise); words has room for row c.
            unsafe {
                let bytes = packed.add(e / 2);
                let lo = round(_mm512_mul_ps(codes8(bytes, table), scale));
                let hi = round(_mm512_mul_ps(codes8(bytes.add(8), table), scale));
                let pairs = _mm512_permutex2var_epi16(lo, idx, hi);
                _mm512_storeu_si512(words.as_mut_ptr().add(16 * c) as *mut __m512i, pairs);
            }
        }
        // SAFETY: words holds 16 rows of 16 (zero past `rows`), out 16 rows of 16 words (64 bytes),
        // all written; the transpose moves bits only.
        unsafe { transpose16(words.as_ptr(), 16, 16, out as *mut f32, 16) };
    }

    /// One tile row of 64 bytes at `out`: for c < 16, the bf16 pair of elements e + c and e + k + c
    /// of q (two rows' values, the first in the low half).
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW); elements e .. e + 16 and e + k .. e + k + 16 lie inside q, each
    /// run inside one block, e and k even; out: 32 writable bf16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pair_row(q: &Nf4Tensor, e: usize, k: usize, out: *mut bf16) {
        let (packed, absmax) = (q.packed.as_ptr(), q.absmax());
        let table = _mm512_loadu_ps(NF4_TABLE.as_ptr());
        // SAFETY: 8 bytes from elements e and e + k lie inside packed (the caller's promise).
        unsafe {
            let a = _mm512_mul_ps(codes8(packed.add(e / 2), table), _mm512_set1_ps(absmax[e / BLOCK]));
            let b = _mm512_mul_ps(
                codes8(packed.add((e + k) / 2), table),
                _mm512_set1_ps(absmax[(e + k) / BLOCK]),
            );
            let words = _mm512_or_si512(round(a), _mm512_slli_epi32(round(b), 16));
            _mm512_storeu_si512(out as *mut __m512i, words);
        }
    }

    /// The 16 values of 8 bytes of codes (the even element in the high nibble), from the table.
    #[inline(always)]
    unsafe fn codes8(bytes: *const u8, table: __m512) -> __m512 {
        // SAFETY: 8 bytes readable (the caller's promise).
        let b = unsafe { _mm_loadl_epi64(bytes as *const __m128i) };
        let w = _mm_cvtepu8_epi16(b);
        let codes = _mm_or_si128(
            _mm_srli_epi16(w, 4),
            _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x0f)), 8),
        );
        _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), table)
    }

    /// Each f32 rounded to bf16 (to nearest, ties to even; finite inputs), in the low half of its lane.
    #[inline(always)]
    unsafe fn round(v: __m512) -> __m512i {
        let x = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        _mm512_srli_epi32(
            _mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))),
            16,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::amx::{FromF32, Panels};
    use crate::engine::cpu::gemm::{straight_panel, transposed_panel, PanelFn};
    use crate::engine::cpu::nf4_decode::decode;
    use crate::util::rng::Rng;

    /// Whether `fast` writes the bits the general route (`general`'s f32 panel, rounded into pairs)
    /// writes for the panel (j0, l0, kc), both into poisoned buffers.
    fn same_bits(general: &impl PanelFn, (j0, l0, kc): (usize, usize, usize), fast: impl Fn(&mut [bf16])) -> bool {
        let mut want = vec![bf16::NAN; 32 * kc];
        FromF32(general).pairs(Isa::Avx512, j0, l0, kc, &mut want, &mut vec![f32::NAN; 32 * kc]);
        let mut got = vec![bf16::NAN; 32 * kc];
        fast(&mut got);
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&got) == bits(&want)
    }

    /// The bits of the general route (f32 decode, transpose, round into pairs), for panels whole
    /// and past N, at the first and later steps, from poisoned buffers; and `fits` only where it
    /// should.
    #[test]
    fn panels_have_the_general_routes_bits() {
        assert!(fits(Isa::Avx512, 128) && !fits(Isa::Avx512, 96));
        assert!(!fits(Isa::Avx2, 128) && !fits(Isa::Portable, 128));
        let isa = Isa::best();
        if isa != Isa::Avx512 {
            // Without AVX-512 the fast route is never taken (`fits` is false on every other path).
            return assert!(!fits(isa, 128));
        }
        let mut rng = Rng::new(21);
        for (n, k) in [(40, 128), (64, 896), (17, 192), (96, 64)] {
            let q = Nf4Tensor::quantize(&rng.normal_vec(n * k, 1.0), &[n, k]);
            let general = transposed_panel(isa, n, |j, l0, out| decode(isa, &q, j * k + l0, out));
            for (j0, l0, kc) in [(0, 0, k), (32, 0, k), (0, 32, k - 32), (32, k - 32, 32)] {
                if j0 >= n {
                    continue;
                }
                let same = same_bits(&general, (j0, l0, kc), |p| transposed_pairs(isa, &q, j0, l0, kc, p));
                assert!(same, "W^T, n {n} k {k} j0 {j0} l0 {l0} kc {kc}: other bits");
            }
            // W itself: columns of W (k) by 32, steps down its rows (n).
            let general = straight_panel(k, |j, c0, out| decode(isa, &q, j * k + c0, out));
            let n32 = n / 32 * 32;
            if n32 == 0 {
                continue;
            }
            for (j0, l0, kc) in [(0, 0, n32), (k - 32, 0, n32), (32.min(k - 32), n32 - 32, 32)] {
                let same = same_bits(&general, (j0, l0, kc), |p| straight_pairs(isa, &q, j0, l0, kc, p));
                assert!(same, "W, n {n} k {k} j0 {j0} l0 {l0} kc {kc}: other bits");
            }
        }
    }
}
