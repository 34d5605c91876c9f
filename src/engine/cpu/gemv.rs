//! The matrix-vector products of decoding on the CPU engine: Y[t, n] = X[t, k] W[n, k]^T for a few
//! rows (t <= [`GEMV_MAX_T`]: one new token per sequence), W read once, row by row, from its stored
//! form (NF4 bytes or bf16), decoded into a row of f32 that stays in L1 while every row of X meets
//! it. Decoding is memory-bound: the GEMM's panels would write and read W again as f32 (8x the NF4
//! bytes); here each weight byte is read once. Threads take blocks of W's rows; X's rows meet a
//! block in groups of up to [`GROUP`], whose sums stay in registers, while the block stays in
//! cache. On AVX-512 an NF4
//! weight whose rows are whole blocks skips the f32 row: codes are looked up in registers and meet
//! X's even and odd columns apart (`x86::nf4_rows`); so are bf16 weights and a GGUF head's Q8_0
//! blocks (`x86::bf16_rows`, `x86::q8_rows`). Reference twin: `model::cpu::linear_fwd`.

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
            // X's even and odd columns apart: [t, k/2] each, matching a byte's two codes.
            let (xe, xo): (Vec<f32>, Vec<f32>) = xf.chunks(2).map(|p| (p[0], p[1])).unzip();
            let half = k / 2;
            sums.par_chunks_mut(ROWS * t).enumerate().for_each(|(b, s)| {
                for (i0, tg, s) in groups(s, t) {
                    let (xe, xo) = (&xe[i0 * half..], &xo[i0 * half..]);
                    // SAFETY: the CPU has AVX-512 (`isa.supported()`, asserted above); k is a whole
                    // number of blocks, so each row's codes and scales are whole; tg <= GROUP.
                    unsafe { x86::by_rows!(tg, x86::nf4_rows(q, xe, xo, k, b * ROWS, s)) }
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

    /// s[jj t + i] = X[i] . W[j0 + jj] for the rows of one piece, straight from the NF4 bytes: per
    /// 16 bytes, the high nibbles (even columns) and the low nibbles (odd columns) are looked up in
    /// the table apart (`vpermps`) and multiplied with X's even and odd columns, so no code is
    /// moved into element order; each block's sum is scaled once, by its absmax.
    /// xe, xo: [t, k/2], X's even and odd columns.
    ///
    /// # Safety
    /// The CPU has AVX-512F; k is a multiple of 64; t <= GROUP; q holds rows j0 .. j0 + s.len() / t.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // acc, tot and X's rows share the index i
    pub unsafe fn nf4_rows<const T: usize>(q: &Nf4Tensor, xe: &[f32], xo: &[f32], k: usize, j0: usize, s: &mut [f32]) {
        let t = T;
        let (packed, absmax) = (&q.packed[..], q.absmax());
        let half = k / 2;
        assert!(t <= super::GROUP && xe.len() >= t * half && xo.len() >= t * half);
        assert!((j0 + s.len() / t) * k <= q.numel());
        let table = _mm512_loadu_ps(NF4_TABLE.as_ptr());
        let nib = _mm512_set1_epi32(0x0f);
        for (jj, sj) in s.chunks_mut(t).enumerate() {
            let j = j0 + jj;
            let mut tot = [_mm512_setzero_ps(); T];
            for b in 0..k / BLOCK {
                let scale = _mm512_set1_ps(absmax[(j * k) / BLOCK + b]);
                // The even and the odd columns' products in sums of their own: two chains of
                // FMAs, not one twice as long.
                let mut acc = [[_mm512_setzero_ps(); T]; 2];
                // The block eight rows on: a hint, never a fault, even past the end.
                _mm_prefetch::<_MM_HINT_T0>(packed.as_ptr().wrapping_add((j + 8) * half + b * BLOCK / 2) as *const i8);
                for h in 0..2 {
                    // Bytes m .. m + 16 of the row: columns 2m .. 2m + 32.
                    let m = b * BLOCK / 2 + h * 16;
                    // SAFETY: byte (j k) / 2 + m + 15 lies in row j (asserted above); X's halves hold
                    // [t, k/2] (asserted above).
                    unsafe {
                        let bytes = _mm_loadu_si128(packed.as_ptr().add(j * half + m) as *const __m128i);
                        let codes = _mm512_cvtepu8_epi32(bytes);
                        let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
                        let lo = _mm512_permutexvar_ps(_mm512_and_si512(codes, nib), table);
                        for i in 0..t {
                            let e = _mm512_loadu_ps(xe.as_ptr().add(i * half + m));
                            let o = _mm512_loadu_ps(xo.as_ptr().add(i * half + m));
                            acc[0][i] = _mm512_fmadd_ps(hi, e, acc[0][i]);
                            acc[1][i] = _mm512_fmadd_ps(lo, o, acc[1][i]);
                        }
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
