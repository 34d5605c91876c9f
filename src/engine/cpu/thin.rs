//! The thin GEMMs of the LoRA branch on the CPU engine, where one side is the rank r (a few to a
//! few dozen): the blocked GEMM of `gemm.rs` would spend more time packing its operands than
//! multiplying them. Here the wide operand is widened once to f32 (contiguous, vectorised) and read
//! in place, and the thin one, r columns, is a vector or two per step. Reference twin: the loops of
//! `model::cpu::lora`, which `lora.rs` checks against.
//!
//! ```text
//! thin_sum   O[m, c]  = sum over q < l of A(m, q) P[q, c]    A(m, q) = a[m rs + q ks]  (f32, rows or columns)
//!            P: [l, ldp] f32, O: [rows, ldp] f32, ldp a multiple of LANES
//! thin_add   Y[t, n] += s G[t, r] Q[r, n]                    Y bf16 or f32, rounded once; G f32
//! ```
//! Each element of O or Y is one f32 sum over q in order, whatever the thread count.

use super::gemm::{micro_tile, row_piece, tile, ATile, Panels, Store, Widen};
use super::isa::Isa;
use rayon::prelude::*;

/// Columns of P per register tile of [`thin_sum`]: ldp is a multiple of it.
pub const LANES: usize = 16;

/// Rows of A per register tile of [`thin_sum`] on a path, by whether A's rows are adjacent values
/// (rs = 1: a tile's step reads one cache line); every path's tiles (these and the GEMM's, which
/// [`thin_add`] uses) divide [`ROW_PAD`].
fn sum_rows(isa: Isa, adjacent: bool) -> usize {
    match (isa, adjacent) {
        (Isa::Avx512, true) => 16,
        (Isa::Avx512, false) => 8,
        (Isa::Avx2 | Isa::Portable, _) => 4,
    }
}

/// What the rows of the operands given to [`thin_sum`] and [`thin_add`] are padded to.
pub const ROW_PAD: usize = 48;

/// A reusable f32 buffer of this thread's (the LoRA kernels' operands and sums, megabytes each
/// step after step): taken from a pool and given back when dropped, so that no call pays for fresh
/// pages. Its values are whatever the last user left: every user writes all it reads.
pub struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// A buffer of `len` values.
    pub fn take(len: usize) -> Scratch {
        // The smallest pooled buffer that holds len values, else the largest (grown).
        let mut buf = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let fit = (0..p.len()).filter(|&i| p[i].len() >= len).min_by_key(|&i| p[i].len());
            let pick = fit.or_else(|| (0..p.len()).max_by_key(|&i| p[i].len()));
            pick.map(|i| p.swap_remove(i)).unwrap_or_default()
        });
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Scratch { buf, len }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        POOL.with(|p| p.borrow_mut().push(buf));
    }
}

/// src [rows, cols] (bf16 or f32) as f32 [rows_pad, cols_pad], zeros in the padding.
pub fn widen_padded<E: Widen>(
    isa: Isa,
    src: &[E],
    rows: usize,
    cols: usize,
    rows_pad: usize,
    cols_pad: usize,
) -> Scratch {
    assert!(src.len() >= rows * cols && rows <= rows_pad && cols <= cols_pad);
    let mut out = Scratch::take(rows_pad * cols_pad);
    if cols_pad > 0 {
        out.par_chunks_mut(cols_pad * 64)
            .enumerate()
            .for_each(|(ci, o)| widen_rows_on(isa, src, rows, cols, ci * 64, cols_pad, o));
    }
    out
}

/// Rows r0 .. of the padded [`widen_padded`] (as many as o holds at cols_pad): src's rows widened,
/// then zeros.
#[inline(always)]
fn widen_rows<E: Widen>(src: &[E], rows: usize, cols: usize, r0: usize, cols_pad: usize, o: &mut [f32]) {
    for (r, row) in o.chunks_mut(cols_pad).enumerate() {
        let (head, tail) = row.split_at_mut(if r0 + r < rows { cols } else { 0 });
        if !head.is_empty() {
            row_piece(src, cols, r0 + r, 0, head);
        }
        tail.fill(0.0);
    }
}

crate::multiversion! {
    /// [`widen_rows`] on a path.
    fn widen_rows_on<E: Widen>(src: &[E], rows: usize, cols: usize, r0: usize, cols_pad: usize, o: &mut [f32]) => widen_rows
}

/// O[m, c] = sum over q < l of a[m rs + q ks] p[q ldp + c], for m < rows (a multiple of
/// [`ROW_PAD`]) and c < ldp (a multiple of [`LANES`]). out: [rows, ldp].
#[allow(clippy::too_many_arguments)]
pub fn thin_sum(
    isa: Isa,
    a: &[f32],
    rs: usize,
    ks: usize,
    rows: usize,
    l: usize,
    p: &[f32],
    ldp: usize,
    out: &mut [f32],
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    assert!(
        rows.is_multiple_of(ROW_PAD) && ldp.is_multiple_of(LANES),
        "thin_sum: unpadded operands"
    );
    assert!(out.len() >= rows * ldp && p.len() >= l * ldp, "thin_sum: short buffers");
    if rows == 0 || ldp == 0 {
        return;
    }
    if l == 0 {
        out[..rows * ldp].fill(0.0);
        return;
    }
    assert!(
        a.len() > (rows - 1) * rs + (l - 1) * ks,
        "thin_sum: A is shorter than its rows and steps"
    );
    let mr = sum_rows(isa, rs == 1);
    // Pieces of work: a few register tiles of rows each, every column group. Within a piece, L
    // goes by blocks of LB steps so that A's block (strided when read by columns) stays in L2
    // while every tile of the piece meets it; a tile's sums carry from block to block in o.
    const LB: usize = 128;
    let per = mr * (rows / mr).div_ceil(8 * rayon::current_num_threads()).max(1);
    out[..rows * ldp]
        .par_chunks_mut(per * ldp)
        .enumerate()
        .for_each(|(pi, o)| {
            for l0 in (0..l).step_by(LB) {
                let lb = LB.min(l - l0);
                for ti in 0..o.len() / ldp / mr {
                    let m0 = pi * per + ti * mr;
                    for g in 0..ldp / LANES {
                        // SAFETY: the path was checked above; rows m0 .. m0 + MR of A at steps l0 ..
                        // l0 + lb are within a (asserted: m0 + MR <= rows, l0 + lb <= l), p's columns
                        // g LANES .. + LANES of those rows within p, and o's MR rows of this tile
                        // belong to this piece alone.
                        unsafe {
                            sum_tile(
                                isa,
                                mr,
                                a.as_ptr().add(m0 * rs + l0 * ks),
                                rs,
                                ks,
                                lb,
                                p.as_ptr().add(l0 * ldp + g * LANES),
                                ldp,
                                o.as_mut_ptr().add(ti * mr * ldp + g * LANES),
                                l0 > 0,
                            )
                        }
                    }
                }
            }
        });
}

/// One register tile of [`thin_sum`]: o[m ldp + c] = sum over q < l of a[m rs + q ks] p[q ldp + c]
/// for m < mr (the path's [`sum_rows`]) and c < LANES, added to o's values when `load`.
///
/// # Safety
/// The CPU runs `isa`; a, p and o are valid for those reads and writes, o touched by no one else.
#[allow(clippy::too_many_arguments)]
unsafe fn sum_tile(
    isa: Isa,
    mr: usize,
    a: *const f32,
    rs: usize,
    ks: usize,
    l: usize,
    p: *const f32,
    ldp: usize,
    o: *mut f32,
    load: bool,
) {
    match (isa, mr) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises.
        (Isa::Avx512, 16) => unsafe { x86::sum_avx512::<16>(a, rs, ks, l, p, ldp, o, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises.
        (Isa::Avx512, _) => unsafe { x86::sum_avx512::<8>(a, rs, ks, l, p, ldp, o, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises.
        (Isa::Avx2, _) => unsafe { x86::sum_avx2(a, rs, ks, l, p, ldp, o, load) },
        // SAFETY: as the caller promises.
        _ => unsafe { sum_portable(a, rs, ks, l, p, ldp, o, load) },
    }
}

/// The portable tile, 4 rows x 16 columns, in loops the compiler vectorises.
///
/// # Safety
/// As [`sum_tile`]'s.
#[allow(clippy::too_many_arguments)]
unsafe fn sum_portable(
    a: *const f32,
    rs: usize,
    ks: usize,
    l: usize,
    p: *const f32,
    ldp: usize,
    o: *mut f32,
    load: bool,
) {
    let mut acc = [[0f32; LANES]; 4];
    if load {
        for (m, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row m of the tile in o is readable and ours.
            acc.copy_from_slice(unsafe { std::slice::from_raw_parts(o.add(m * ldp), LANES) });
        }
    }
    for q in 0..l {
        // SAFETY: step q of the tile's rows and row q of p are readable (the caller's promise).
        let w = unsafe { std::slice::from_raw_parts(p.add(q * ldp), LANES) };
        for (m, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = unsafe { *a.add(m * rs + q * ks) };
            acc.iter_mut().zip(w).for_each(|(s, &w)| *s += x * w);
        }
    }
    for (m, acc) in acc.iter().enumerate() {
        // SAFETY: row m of the tile in o is writable and ours.
        unsafe { std::slice::from_raw_parts_mut(o.add(m * ldp), LANES) }.copy_from_slice(acc);
    }
}

/// Y[t, n] += s G[t, r] Q[r, n], each sum rounded once into Y. g: [t_pad, ldg] f32 (t_pad = t
/// rounded up to [`ROW_PAD`], the padding rows zero); q: Q packed in the small tile's panels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn thin_add<O: Store>(
    isa: Isa,
    y: &mut [O],
    t: usize,
    n: usize,
    s: f32,
    g: &[f32],
    ldg: usize,
    r: usize,
    q: &Panels,
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    let (mr, nr) = tile(isa);
    let t_pad = t.next_multiple_of(ROW_PAD);
    assert!(
        y.len() >= t * n && r <= ldg && g.len() >= t_pad * ldg,
        "thin_add: short buffers"
    );
    assert!(
        q.nr == nr && q.blocks >= n.div_ceil(nr) && q.rows_pad >= r,
        "thin_add: Q's panels are not [r, n]"
    );
    if t == 0 || n == 0 || r == 0 {
        return;
    }
    // Pieces: whole register tiles of rows, so each writes its rows of y alone.
    let per = mr * (t_pad / mr).div_ceil(8 * rayon::current_num_threads()).max(1);
    y[..t * n]
        .par_chunks_mut(per * n)
        .enumerate()
        .for_each(|(pi, yp)| add_rows_on(isa, isa, yp, pi * per, n, s, g, ldg, r, q, mr, nr));
}

/// [`thin_add`] for the rows of y held in yp (from row r0): each MR x NR tile summed into a
/// buffer in registers' reach, then added into y and rounded.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_rows<O: Store>(
    isa: Isa,
    yp: &mut [O],
    r0: usize,
    n: usize,
    s: f32,
    g: &[f32],
    ldg: usize,
    r: usize,
    q: &Panels,
    mr: usize,
    nr: usize,
) {
    let rows = yp.len() / n;
    let mut c = [0f32; 12 * 32];
    for i0 in (0..rows).step_by(mr) {
        for (pi, j0) in (0..n).step_by(nr).enumerate() {
            // SAFETY: the path was checked by `thin_add`; G's rows r0 + i0 .. + MR are within its
            // t_pad rows and each r wide (r <= ldg); the panel holds [r, NR]; c holds MR x NR
            // values of stride NR, this call's alone.
            unsafe {
                micro_tile(
                    isa,
                    mr,
                    &g[(r0 + i0) * ldg..],
                    ATile::Rows(ldg),
                    r,
                    q.block(pi),
                    c.as_mut_ptr(),
                    nr,
                    false,
                )
            };
            let cols = nr.min(n - j0);
            for i in 0..mr.min(rows - i0) {
                let out = &mut yp[(i0 + i) * n + j0..(i0 + i) * n + j0 + cols];
                out.iter_mut()
                    .zip(&c[i * nr..i * nr + cols])
                    .for_each(|(o, &v)| *o = O::from_f32(o.widen() + s * v));
            }
        }
    }
}

crate::multiversion! {
    /// [`add_rows`] on a path (the path given twice: once to compile for, once for the tiles).
    fn add_rows_on<O: Store>(tiles: Isa, yp: &mut [O], r0: usize, n: usize, s: f32, g: &[f32], ldg: usize, r: usize, q: &Panels, mr: usize, nr: usize) => add_rows
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The AVX-512 tile of `thin_sum`: MR rows x 16 columns, one zmm each; per step one load of P's
    /// row and MR broadcasts of A feed MR FMAs.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as `sum_tile`'s.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sum_avx512<const MR: usize>(
        a: *const f32,
        rs: usize,
        ks: usize,
        l: usize,
        p: *const f32,
        ldp: usize,
        o: *mut f32,
        load: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); MR];
        if load {
            for (m, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row m of the tile in o is readable and ours.
                *acc = unsafe { _mm512_loadu_ps(o.add(m * ldp)) };
            }
        }
        let rows: [*const f32; MR] = std::array::from_fn(|m| a.wrapping_add(m * rs));
        for q in 0..l {
            // SAFETY: step q of each row and row q of p are readable (the caller's promise).
            unsafe {
                let w = _mm512_loadu_ps(p.add(q * ldp));
                for m in 0..MR {
                    acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(*rows[m].add(q * ks)), w, acc[m]);
                }
            }
        }
        for (m, acc) in acc.iter().enumerate() {
            // SAFETY: row m of the tile in o is writable and ours.
            unsafe { _mm512_storeu_ps(o.add(m * ldp), *acc) };
        }
    }

    /// The AVX2 tile of `thin_sum`: 4 rows x 16 columns, two ymm each.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as `sum_tile`'s.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sum_avx2(
        a: *const f32,
        rs: usize,
        ks: usize,
        l: usize,
        p: *const f32,
        ldp: usize,
        o: *mut f32,
        load: bool,
    ) {
        const MR: usize = 4;
        let mut acc = [_mm256_setzero_ps(); 2 * MR];
        if load {
            for m in 0..MR {
                // SAFETY: row m of the tile in o is readable and ours.
                unsafe {
                    acc[2 * m] = _mm256_loadu_ps(o.add(m * ldp));
                    acc[2 * m + 1] = _mm256_loadu_ps(o.add(m * ldp + 8));
                }
            }
        }
        let rows: [*const f32; MR] = std::array::from_fn(|m| a.wrapping_add(m * rs));
        for q in 0..l {
            // SAFETY: step q of each row and row q of p are readable (the caller's promise).
            unsafe {
                let w0 = _mm256_loadu_ps(p.add(q * ldp));
                let w1 = _mm256_loadu_ps(p.add(q * ldp + 8));
                for m in 0..MR {
                    let x = _mm256_set1_ps(*rows[m].add(q * ks));
                    acc[2 * m] = _mm256_fmadd_ps(x, w0, acc[2 * m]);
                    acc[2 * m + 1] = _mm256_fmadd_ps(x, w1, acc[2 * m + 1]);
                }
            }
        }
        for m in 0..MR {
            // SAFETY: row m of the tile in o is writable and ours.
            unsafe {
                _mm256_storeu_ps(o.add(m * ldp), acc[2 * m]);
                _mm256_storeu_ps(o.add(m * ldp + 8), acc[2 * m + 1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::rel_err;
    use crate::util::rng::Rng;
    use half::bf16;

    /// Every path against f64 sums: thin_sum reading A by rows and by columns, at steps that cross
    /// its blocks of L (LB), with widths of one and two column groups; thin_add into bf16 and f32
    /// at odd sizes. Outputs poisoned where overwritten, random where added to; pooled buffers
    /// reused between calls, so stale values would show.
    #[test]
    fn every_path_matches_f64_sums() {
        let mut rng = Rng::new(31);
        for isa in Isa::available() {
            for (m, l, r) in [(5usize, 3, 2usize), (50, 130, 16), (97, 300, 20), (1, 1, 1)] {
                let (rows, ldp) = (m.next_multiple_of(ROW_PAD), r.next_multiple_of(LANES));
                let x: Vec<f32> = rng.normal_vec(m * l, 1.0);
                let p = widen_padded(isa, &rng.normal_vec(l * r, 1.0), l, r, l, ldp);
                let want: Vec<f64> = (0..m * r)
                    .map(|e| {
                        (0..l)
                            .map(|q| x[e / r * l + q] as f64 * p[q * ldp + e % r] as f64)
                            .sum()
                    })
                    .collect();
                let got_of = |o: &[f32]| -> Vec<f32> { (0..m * r).map(|e| o[e / r * ldp + e % r]).collect() };
                let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                // By rows: A = x [rows, l].
                let xr = widen_padded(isa, &x, m, l, rows, l);
                let mut o = vec![f32::NAN; rows * ldp];
                thin_sum(isa, &xr, l, 1, rows, l, &p, ldp, &mut o);
                assert!(rel_err(&got_of(&o), &want32) < 1e-5, "{isa} rows {m}x{l}x{r}");
                // By columns: A = (x^T) [l, rows], read down its columns.
                let xt: Vec<f32> = (0..l * m).map(|e| x[(e % m) * l + e / m]).collect();
                let xc = widen_padded(isa, &xt, l, m, l, rows);
                let mut o = vec![f32::NAN; rows * ldp];
                thin_sum(isa, &xc, 1, rows, rows, l, &p, ldp, &mut o);
                assert!(rel_err(&got_of(&o), &want32) < 1e-5, "{isa} columns {m}x{l}x{r}");
                drop((xr, xc));

                // thin_add: y[m, n] += s g[m, r] q[r, n].
                let n = l;
                let g = widen_padded(isa, &rng.normal_vec(m * r, 1.0), m, r, rows, ldp);
                let qv = rng.normal_vec(r * n, 1.0);
                let q = Panels::pack(tile(isa).1, r, n, r, |i, j| qv[i * n + j]);
                let y0 = rng.normal_vec(m * n, 1.0);
                let want: Vec<f32> = (0..m * n)
                    .map(|e| {
                        let s: f64 = (0..r)
                            .map(|c| g[e / n * ldp + c] as f64 * qv[c * n + e % n] as f64)
                            .sum();
                        (y0[e] as f64 + 0.5 * s) as f32
                    })
                    .collect();
                let mut y = y0.clone();
                thin_add(isa, &mut y, m, n, 0.5, &g, ldp, r, &q);
                assert!(rel_err(&y, &want) < 1e-5, "{isa} add f32 {m}x{n}x{r}");
                let mut yb: Vec<bf16> = y0.iter().map(|&v| bf16::from_f32(v)).collect();
                let base: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
                let want_b: Vec<f32> = (0..m * n).map(|e| want[e] - y0[e] + base[e]).collect();
                thin_add(isa, &mut yb, m, n, 0.5, &g, ldp, r, &q);
                let got: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
                assert!(rel_err(&got, &want_b) < 4e-3, "{isa} add bf16 {m}x{n}x{r}");
            }
        }
    }
}
