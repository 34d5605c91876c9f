//! The matrix-vector products of decoding on the CPU engine: Y[t, n] = X[t, k] W[n, k]^T for a few
//! rows (t <= [`GEMV_MAX_T`]: one new token per sequence), W read once, row by row, from its stored
//! form (NF4 bytes, bf16 or Q8_0), decoded into a row of f32 that stays in L1 while every row of X
//! meets it. Decoding is memory-bound: the GEMM's panels would write and read W again as f32 (8x
//! the NF4 bytes); here each weight byte is read once. Threads take blocks of W's rows; X's rows
//! meet a block in groups of up to [`GROUP`], whose sums stay in registers, while the block stays
//! in cache. On AVX-512 no f32 row is written: NF4 codes are looked up in the table straight from
//! their bytes, X's columns put in the order the nibbles come in (`x86::nf4_rows`,
//! [`nibble_order`]); bf16 and Q8_0 weights are widened in registers (`x86::bf16_rows`,
//! `x86::q8_rows`). Reference twin: `model::cpu::linear_fwd`.

use super::gemm::Store;
use super::isa::Isa;
use super::math::{dot3, widen};
use super::nf4_decode;
use crate::model::nf4::{Nf4Tensor, BLOCK};
use crate::model::q8::{self, Q8_BLOCK};
use half::bf16;
use rayon::prelude::*;

/// The most rows of X the GEMV takes; more go to the GEMM. Measured on the Qwen2.5-0.5B MLP's
/// [4864, 896] (NF4, 2 cores, AVX-512): the GEMM, which decodes all of W per call, overtakes eight
/// groups of eight rows only past 64 rows.
pub const GEMV_MAX_T: usize = 64;

/// Rows of X whose sums the kernels keep in registers: more rows go in groups of this many.
const GROUP: usize = 8;

/// Rows of W per piece of work.
const ROWS: usize = 32;

/// Where W's rows come from.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    Nf4(&'a Nf4Tensor),
    Bf16(&'a [bf16]),
    /// Q8_0 (`model::q8`): codes [n, k] and scales [n, k / 32]; k is a multiple of 32.
    Q8 {
        codes: &'a [i8],
        scales: &'a [f32],
    },
}

/// Y[t, n] = X[t, k] W^T (+ bias[n]). y: [t, n]; x: [t, k] bf16; W: [n, k].
#[allow(clippy::too_many_arguments)]
pub fn gemv<O: Store>(
    isa: Isa,
    y: &mut [O],
    x: &[bf16],
    w: Weights,
    bias: Option<&[f32]>,
    t: usize,
    n: usize,
    k: usize,
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    assert!(
        (1..=GEMV_MAX_T).contains(&t),
        "gemv takes 1 to {GEMV_MAX_T} rows, not {t}"
    );
    assert!(
        x.len() >= t * k && y.len() >= t * n,
        "gemv: buffers shorter than [t, k], [t, n]"
    );
    match w {
        Weights::Nf4(q) => assert_eq!(q.numel(), n * k, "gemv: the NF4 weight is not [n, k]"),
        Weights::Bf16(b) => assert!(b.len() >= n * k, "gemv: the weight is shorter than [n, k]"),
        Weights::Q8 { codes, scales } => assert!(
            k.is_multiple_of(Q8_BLOCK) && codes.len() >= n * k && scales.len() >= n * k / Q8_BLOCK,
            "gemv: the Q8_0 weight is not [n, k] in whole blocks"
        ),
    }
    let xf: Vec<f32> = x[..t * k].iter().map(|&v| widen(v)).collect();
    // The sums by blocks of W's rows, [blocks][groups][rows of the block][rows of the group]; then
    // transposed into y.
    let mut sums = vec![0f32; n * t];
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, Weights::Nf4(q)) = (isa, w) {
        if k.is_multiple_of(BLOCK) {
            let (xp, kp) = nibble_order(&xf, t, k);
            sums.par_chunks_mut(ROWS * t).enumerate().for_each(|(b, s)| {
                for (i0, tg, s) in groups(s, t) {
                    // SAFETY: the CPU has AVX-512 (`isa.supported()`, asserted above); k is a whole
                    // number of blocks, so each row's codes and scales are whole; xp holds [t, kp]
                    // in `nibble_order`; tg <= GROUP.
                    unsafe { x86::by_rows!(tg, x86::nf4_rows(q, &xp[i0 * kp..], k, b * ROWS, s)) }
                }
            });
            return finish(y, &sums, bias, t, n);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, Weights::Bf16(b)) = (isa, w) {
        sums.par_chunks_mut(ROWS * t).enumerate().for_each(|(blk, s)| {
            for (i0, tg, s) in groups(s, t) {
                // SAFETY: the CPU has AVX-512 (`isa.supported()`, asserted above); b holds [n, k]
                // (asserted above), so rows blk ROWS .. + s.len() / tg are whole; tg <= GROUP.
                unsafe { x86::by_rows!(tg, x86::bf16_rows(b, &xf[i0 * k..], k, blk * ROWS, s)) }
            }
        });
        return finish(y, &sums, bias, t, n);
    }
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, Weights::Q8 { codes, scales }) = (isa, w) {
        sums.par_chunks_mut(ROWS * t).enumerate().for_each(|(blk, s)| {
            for (i0, tg, s) in groups(s, t) {
                // SAFETY: the CPU has AVX-512 (`isa.supported()`, asserted above); the codes and
                // scales hold [n, k] in whole blocks (asserted above); tg <= GROUP.
                unsafe { x86::by_rows!(tg, x86::q8_rows(codes, scales, &xf[i0 * k..], k, blk * ROWS, s)) }
            }
        });
        return finish(y, &sums, bias, t, n);
    }
    sums.par_chunks_mut(ROWS * t).enumerate().for_each_init(
        || vec![0f32; k],
        |row, (b, s)| {
            for (i0, tg, s) in groups(s, t) {
                rows_on(isa, isa, w, &xf[i0 * k..], tg, k, b * ROWS, s, row)
            }
        },
    );
    finish(y, &sums, bias, t, n)
}

/// A block's sums (`s`: [rows of the block, t] in all) cut by groups of X's rows: (first row of
/// X, rows in the group, the group's sums [rows of the block][rows of the group]).
fn groups(s: &mut [f32], t: usize) -> impl Iterator<Item = (usize, usize, &mut [f32])> {
    let rows = s.len() / t;
    (s.chunks_mut(rows * GROUP).enumerate()).map(move |(g, sg)| (g * GROUP, sg.len() / rows, sg))
}

/// Per 128 columns, the column each of the 8 vectors of `x86::nf4_rows` holds at lane l, less 8 l.
/// Vector s looks up nibble s of each 32-bit lane of 64 code bytes: byte s / 2 of the lane, its
/// low nibble (the odd column of the pair) for even s, its high nibble (the even column) for odd s.
const NIBBLE_COL: [usize; 8] = [1, 0, 3, 2, 5, 4, 7, 6];

/// X's rows in the order `x86::nf4_rows` meets the codes: per 128 columns, 8 vectors of 16, lane l
/// of vector s holding column 8 l + NIBBLE_COL[s]; zero past k. Returns ([t, kp], kp), kp = k rounded
/// up to 128. xf: [t, k].
fn nibble_order(xf: &[f32], t: usize, k: usize) -> (Vec<f32>, usize) {
    let kp = k.div_ceil(128) * 128;
    let mut xp = vec![0f32; t * kp];
    for (x, out) in xf.chunks(k).zip(xp.chunks_mut(kp)).take(t) {
        for (c, out) in out.chunks_mut(128).enumerate() {
            for (s, v) in out.chunks_mut(16).enumerate() {
                for (l, o) in v.iter_mut().enumerate() {
                    *o = x.get(128 * c + 8 * l + NIBBLE_COL[s]).copied().unwrap_or(0.0);
                }
            }
        }
    }
    (xp, kp)
}

/// y[i][j] = (X[i] . W[j]) + bias[j], from the sums as [`gemv`] lays them out. y: [t, n].
fn finish<O: Store>(y: &mut [O], sums: &[f32], bias: Option<&[f32]>, t: usize, n: usize) {
    for (b, s) in sums.chunks(ROWS * t).enumerate() {
        let rows = s.len() / t;
        for g in (0..t).step_by(GROUP) {
            let tg = GROUP.min(t - g);
            let sg = &s[rows * g..rows * (g + tg)]; // [rows][tg]
            for (jj, sj) in sg.chunks(tg).enumerate() {
                let j = b * ROWS + jj;
                let add = bias.map_or(0.0, |b| b[j]);
                for (i, &v) in sj.iter().enumerate() {
                    y[(g + i) * n + j] = O::from_f32(v + add);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::model::nf4::{Nf4Tensor, BLOCK, NF4_TABLE};
    use half::bf16;
    use std::arch::x86_64::*;

    /// `f::<T>(args)` for the row count t (1 to GROUP) known at compile time, so that the
    /// sums of every row of X stay in registers (with t a variable they lived on the stack).
    macro_rules! by_rows {
        ($t:expr, $($f:ident)::+($($arg:expr),*)) => {
            match $t {
                1 => $($f)::+::<1>($($arg),*),
                2 => $($f)::+::<2>($($arg),*),
                3 => $($f)::+::<3>($($arg),*),
                4 => $($f)::+::<4>($($arg),*),
                5 => $($f)::+::<5>($($arg),*),
                6 => $($f)::+::<6>($($arg),*),
                7 => $($f)::+::<7>($($arg),*),
                _ => $($f)::+::<8>($($arg),*),
            }
        };
    }
    pub(super) use by_rows;

    /// s[jj t + i] = X[i] . W[j0 + jj] for the rows of one piece, W bf16: each 16 weights widened
    /// in registers once and met by every row of X, so W streams from memory in one pass (a row
    /// widened into a buffer first ran at half the bandwidth). Two sums per row of X, alternating
    /// by 16 columns, keep the FMAs' latency hidden when t is 1. xf: [t, k].
    ///
    /// # Safety
    /// The CPU has AVX-512F; t <= GROUP; w holds rows j0 .. j0 + s.len() / t of k values.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // acc and X's rows share the index i
    pub unsafe fn bf16_rows<const T: usize>(w: &[bf16], xf: &[f32], k: usize, j0: usize, s: &mut [f32]) {
        let t = T;
        assert!(t <= super::GROUP && xf.len() >= t * k);
        assert!((j0 + s.len() / t) * k <= w.len());
        let whole = k / 16 * 16;
        for (jj, sj) in s.chunks_mut(t).enumerate() {
            let row = w[(j0 + jj) * k..(j0 + jj + 1) * k].as_ptr();
            let mut acc = [[_mm512_setzero_ps(); T]; 2];
            for (c, c0) in (0..whole).step_by(16).enumerate() {
                // SAFETY: columns c0 .. c0 + 16 <= k of row j and of X's rows (asserted above).
                unsafe {
                    if c % 2 == 0 {
                        // The same line eight rows on (a hint: never faults, even past w's end).
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(c0 + 8 * k) as *const i8);
                    }
                    let v = _mm256_loadu_si256(row.add(c0) as *const __m256i);
                    let wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
                    for i in 0..t {
                        let x = _mm512_loadu_ps(xf.as_ptr().add(i * k + c0));
                        acc[c % 2][i] = _mm512_fmadd_ps(wv, x, acc[c % 2][i]);
                    }
                }
            }
            for (i, o) in sj.iter_mut().enumerate() {
                let tail: f32 = (whole..k)
                    // SAFETY: column c < k of row j.
                    .map(|c| f32::from(unsafe { *row.add(c) }) * xf[i * k + c])
                    .sum();
                *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i])) + tail;
            }
        }
    }

    /// s[jj t + i] = X[i] . W[j0 + jj] for the rows of one piece, W as Q8_0 codes and scales: per
    /// block of 32, the codes widened to f32 in registers (exact), met by every row of X, and the
    /// block's sum scaled once. Two sums per row of X, alternating by block, keep the FMAs' latency
    /// hidden when t is 1. xf: [t, k].
    ///
    /// # Safety
    /// The CPU has AVX-512F; k is a multiple of 32; t <= GROUP; codes and scales hold rows
    /// j0 .. j0 + s.len() / t.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // acc and X's rows share the index i
    pub unsafe fn q8_rows<const T: usize>(
        codes: &[i8],
        scales: &[f32],
        xf: &[f32],
        k: usize,
        j0: usize,
        s: &mut [f32],
    ) {
        use crate::model::q8::Q8_BLOCK;
        let t = T;
        let blocks = k / Q8_BLOCK;
        assert!(t <= super::GROUP && xf.len() >= t * k && k.is_multiple_of(Q8_BLOCK));
        let rows = s.len() / t;
        assert!((j0 + rows) * k <= codes.len() && (j0 + rows) * blocks <= scales.len());
        for (jj, sj) in s.chunks_mut(t).enumerate() {
            let j = j0 + jj;
            let (row, sc) = (codes[j * k..].as_ptr(), &scales[j * blocks..(j + 1) * blocks]);
            let mut tot = [[_mm512_setzero_ps(); T]; 2];
            for (b, &scale) in sc.iter().enumerate() {
                let c0 = b * Q8_BLOCK;
                // SAFETY: columns c0 .. c0 + 32 <= k of row j and of X's rows (asserted above).
                unsafe {
                    if b % 2 == 0 {
                        // The same line four rows on (a hint: never faults, even past the end).
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(c0 + 4 * k));
                    }
                    let c = _mm256_loadu_si256(row.add(c0) as *const __m256i);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(c)));
                    let scale = _mm512_set1_ps(scale);
                    for i in 0..t {
                        let x = xf.as_ptr().add(i * k + c0);
                        let p = _mm512_mul_ps(lo, _mm512_loadu_ps(x));
                        let p = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.add(16)), p);
                        tot[b % 2][i] = _mm512_fmadd_ps(p, scale, tot[b % 2][i]);
                    }
                }
            }
            for (i, o) in sj.iter_mut().enumerate() {
                *o = _mm512_reduce_add_ps(_mm512_add_ps(tot[0][i], tot[1][i]));
            }
        }
    }

    /// s[jj t + i] = X[i] . W[j0 + jj] for the rows of one piece, straight from the NF4 bytes. Per
    /// 64 bytes of a row (128 columns, two blocks), no code is unpacked: `vpermps` reads only the
    /// low 4 bits of each 32-bit index, so the bytes themselves, shifted right by 0, 4, .. 28, look
    /// up the 8 nibbles of every lane in the table. X comes in that order (`nibble_order`); each
    /// 128 columns' sums are scaled by their two blocks' absmax at once (lanes 0-7, 8-15). A row
    /// whose last 64 bytes hold one block reads it masked, with a zero scale in the other half.
    /// xp: [t, kp] from `nibble_order`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; k is a multiple of 64; t <= GROUP; q holds rows j0 .. j0 + s.len() / t.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // acc, tot and X's rows share the index i
    pub unsafe fn nf4_rows<const T: usize>(q: &Nf4Tensor, xp: &[f32], k: usize, j0: usize, s: &mut [f32]) {
        let t = T;
        let (packed, absmax) = (&q.packed[..], q.absmax());
        let (half, kp, nb) = (k / 2, k.div_ceil(128) * 128, k / BLOCK);
        assert!(t <= super::GROUP && xp.len() >= t * kp && k.is_multiple_of(BLOCK));
        assert!((j0 + s.len() / t) * k <= q.numel());
        let table = _mm512_loadu_ps(NF4_TABLE.as_ptr());
        // Lanes 0-7 take the first of two scales, lanes 8-15 the second.
        let pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        for (jj, sj) in s.chunks_mut(t).enumerate() {
            let j = j0 + jj;
            let row = packed[j * half..(j + 1) * half].as_ptr();
            let scales = &absmax[j * nb..(j + 1) * nb];
            let mut tot = [_mm512_setzero_ps(); T];
            for c in 0..kp / 128 {
                // SAFETY: bytes 64 c .. 64 c + 64 of the row, or its first 32 (masked) where the
                // row ends with one block; scales 2 c and 2 c + 1 exist when 2 c + 1 < nb.
                let (codes, scale) = unsafe {
                    // The same bytes eight rows on: a hint, never a fault, even past the end.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(64 * c + 8 * half) as *const i8);
                    if 2 * c + 1 < nb {
                        let two = _mm_loadl_epi64(scales.as_ptr().add(2 * c) as *const __m128i);
                        let scale = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_castsi128_ps(two)));
                        (_mm512_loadu_si512(row.add(64 * c) as *const __m512i), scale)
                    } else {
                        let scale = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(scales[2 * c]));
                        (_mm512_maskz_loadu_epi32(0x00ff, row.add(64 * c) as *const i32), scale)
                    }
                };
                // Two sums per row of X (even and odd s): chains half as long.
                let mut acc = [[_mm512_setzero_ps(); T]; 2];
                let mut idx = codes;
                for sft in 0..8 {
                    if sft > 0 {
                        idx = _mm512_srli_epi32::<4>(idx);
                    }
                    let w = _mm512_permutexvar_ps(idx, table);
                    for i in 0..t {
                        // SAFETY: xp holds [t, kp] (asserted above); 128 c + 16 sft + 16 <= kp.
                        let x = unsafe { _mm512_loadu_ps(xp.as_ptr().add(i * kp + 128 * c + 16 * sft)) };
                        acc[sft % 2][i] = _mm512_fmadd_ps(w, x, acc[sft % 2][i]);
                    }
                }
                for i in 0..t {
                    tot[i] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][i], acc[1][i]), scale, tot[i]);
                }
            }
            for (i, o) in sj.iter_mut().enumerate() {
                *o = _mm512_reduce_add_ps(tot[i]);
            }
        }
    }
}

/// s[jj t + i] = X[i] . W[j0 + jj] for the rows of this block. row: [k] scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows(isa: Isa, w: Weights, xf: &[f32], t: usize, k: usize, j0: usize, s: &mut [f32], row: &mut [f32]) {
    for (jj, sj) in s.chunks_mut(t).enumerate() {
        let j = j0 + jj;
        match w {
            Weights::Nf4(q) => nf4_decode::decode(isa, q, j * k, row),
            Weights::Bf16(b) => row
                .iter_mut()
                .zip(&b[j * k..(j + 1) * k])
                .for_each(|(o, &v)| *o = widen(v)),
            Weights::Q8 { codes, scales } => q8::decode(&codes[j * k..(j + 1) * k], &scales[j * k / Q8_BLOCK..], row),
        }
        for (i, o) in sj.iter_mut().enumerate() {
            *o = dot3(&xf[i * k..(i + 1) * k], row, None);
        }
    }
}

crate::multiversion! {
    /// [`rows`] compiled for a path (`path`, the same, goes on to the decoder).
    fn rows_on(path: Isa, w: Weights, xf: &[f32], t: usize, k: usize, j0: usize, s: &mut [f32], row: &mut [f32]) => rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::rel_err;
    use crate::engine::{to_bf16, to_f32};
    use crate::model::cpu::{linear_fwd, Linear, LinearWeight};
    use crate::model::q8::Q8Tensor;
    use crate::util::rng::Rng;

    /// Every path against the f32 reference at 1 to 64 rows (one group, several, a part group),
    /// odd n and k, NF4, bf16 and Q8_0 weights, outputs poisoned first: one bf16 rounding (4e-3), or f32
    /// sums in another order (1e-5).
    #[test]
    fn every_path_matches_the_reference() {
        let mut rng = Rng::new(41);
        for isa in Isa::available() {
            for (t, n, k) in [
                (1, 1, 64),
                (1, 67, 200),
                (3, 40, 77),
                (8, 100, 576),
                (19, 45, 128),
                (64, 33, 192),
            ] {
                let lin = Linear::dense(n, k, rng.normal_vec(n * k, 0.5), None).to_nf4();
                let LinearWeight::Nf4(q) = &lin.weight else {
                    unreachable!()
                };
                let x = to_bf16(&rng.normal_vec(t * k, 1.0));
                let bias = rng.normal_vec(n, 0.1);
                let mut want = vec![0f32; t * n];
                linear_fwd(&mut want, &to_f32(&x), &lin);
                want.chunks_mut(n)
                    .for_each(|r| r.iter_mut().zip(&bias).for_each(|(o, b)| *o += b));
                let mut y = vec![bf16::NAN; t * n];
                gemv(isa, &mut y, &x, Weights::Nf4(q), Some(&bias), t, n, k);
                let err = rel_err(&to_f32(&y), &want);
                assert!(err < 4e-3, "{isa} nf4 t {t} n {n} k {k}: {err}");

                let wb = to_bf16(&rng.normal_vec(n * k, 0.5));
                let dense = Linear::dense(n, k, to_f32(&wb), None);
                let mut want = vec![0f32; t * n];
                linear_fwd(&mut want, &to_f32(&x), &dense);
                let mut y = vec![f32::NAN; t * n];
                gemv(isa, &mut y, &x, Weights::Bf16(&wb), None, t, n, k);
                assert!(rel_err(&y, &want) < 1e-5, "{isa} bf16 t {t} n {n} k {k}");

                // Q8_0 where k is whole blocks: the reference on its exact f32 values.
                if k % Q8_BLOCK == 0 {
                    let q = Q8Tensor::quantize(&rng.normal_vec(n * k, 0.5), n, k);
                    let dense = Linear::dense(n, k, q.dequantize(), None);
                    let mut want = vec![0f32; t * n];
                    linear_fwd(&mut want, &to_f32(&x), &dense);
                    let mut y = vec![f32::NAN; t * n];
                    let w = Weights::Q8 {
                        codes: &q.codes,
                        scales: &q.scales,
                    };
                    gemv(isa, &mut y, &x, w, None, t, n, k);
                    assert!(rel_err(&y, &want) < 1e-5, "{isa} q8 t {t} n {n} k {k}");
                }
            }
        }
    }
}
