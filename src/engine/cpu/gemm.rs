//! The CPU engine's GEMM: C[t, N] = alpha A[t, L] P[L, N] (+ bias[N]) (+ C, when accumulating), A
//! bf16 or f32 (stored by rows, or by columns: A = M^T), C bf16 or f32, P decoded panel by panel by
//! the caller (from NF4 bytes, bf16 or f32) into f32. Used by the NF4 GEMM in both orientations
//! (`nf4_gemm.rs`), the output head (`loss.rs`) and attention's products (`attention.rs`, through
//! [`micro_tile`]). Reference twin: `model::cpu::linear`. (The LoRA branch's products, thin in r,
//! have their own kernels: `thin.rs`.)
//!
//! The loops are the classic blocked ones (Goto's): N in chunks of NC columns, L in blocks of KC.
//! For each (chunk, block): P's piece is decoded once into f32 panels `[KC][NR]`, A's block is
//! widened into f32 tiles `[KC][MR]` (once per call: all of A at the first chunk when N spans
//! several and A is not huge; both packings transpose 16 x 16 blocks in registers on AVX-512,
//! [`transpose`]), and then units of work, each a block of MC
//! rows by a group of panels, run a register-blocked micro-kernel over every MR x NR tile: MR x NR
//! sums held in vector registers, one FMA per (row, vector) per step of L, while the A rows (MC x KC,
//! in L2) meet panel after panel. Sums carry in an f32 [t, NC] buffer from one block of L to the
//! next; the epilogue rounds them once. Units never split the sum over L, so a result does not
//! depend on the thread count: each element's sum runs over L in order, in f32. Every loop of a call
//! is compiled for the chosen path (`target_feature`), so the widening, decoding and epilogue
//! vectorise with it. On a CPU with AMX tiles or AVX512-BF16 dot products, `matmul.rs` hands AVX-512
//! products to `amx.rs` instead (A and P rounded to bf16 there; `SQLORA_CPU_GEMM=fma` keeps them
//! here).

use super::isa::Isa;
use half::bf16;
use rayon::prelude::*;

/// The small register tile of a path, MR rows of A by NR columns of P: what attention's blocks
/// and the LoRA's thin sums are multiples of.
pub(crate) fn tile(isa: Isa) -> (usize, usize) {
    match isa {
        // 16 zmm accumulators (8 rows x 2 vectors of 16), 2 for the panel row, 1 broadcast.
        Isa::Avx512 => (8, 32),
        // 8 ymm accumulators (4 x 2 vectors of 8), 2 for the panel row, 1 broadcast.
        Isa::Avx2 => (4, 16),
        Isa::Portable => (4, 16),
    }
}

/// The GEMM's register tile: on AVX-512 12 rows (24 zmm accumulators, 2 for the panel row, 1
/// broadcast), which loads less per FMA than the small tile (measured: 83% of the FMA peak against
/// 71%, in L1); elsewhere the small tile.
fn gemm_tile(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (12, 32),
        _ => tile(isa),
    }
}

/// Columns of N per chunk: the chunk's sums, [t, NC] f32, and its decoded panels, [KC, NC] f32.
pub(crate) const NC: usize = 1024;
/// The most f32 values of A packed whole (64 MB).
const A_WHOLE_MAX: usize = 16 << 20;
/// Rows of A per unit of work: an [MC, KC] block of A (up to 256 KB) stays in L2.
const MC: usize = 128;

/// Rows of L per block: as even as blocks of at most 448 allow, a multiple of 8.
fn kc_of(l: usize) -> usize {
    let blocks = l.div_ceil(448).max(1);
    l.div_ceil(blocks).div_ceil(8) * 8
}

/// What A holds: bf16 or f32 values.
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
    /// The values as bf16, when they are bf16 (the AMX GEMM then reads them in place).
    fn as_bf16(_values: &[Self]) -> Option<&[bf16]> {
        None
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        super::math::widen(self)
    }
    fn as_bf16(values: &[bf16]) -> Option<&[bf16]> {
        Some(values)
    }
}

/// What a GEMM writes: f32 as computed, or rounded to bf16.
pub trait Store: Widen {
    fn from_f32(v: f32) -> Self;
}

impl Store for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Store for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> bf16 {
        super::math::round_bf16(v)
    }
}

/// The left operand: [t, L] stored by rows, or stored by columns (the transpose of an [L, t] matrix).
#[derive(Clone, Copy)]
pub enum Lhs<'a, A> {
    Rows(&'a [A]),
    Cols(&'a [A]),
}

/// What is done with each sum s before it is stored: out = alpha s + bias (+ out when accumulating).
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    pub alpha: f32,
    pub bias: Option<&'a [f32]>,
    pub accumulate: bool,
}

impl Epilogue<'_> {
    /// out = s.
    pub const ASSIGN: Epilogue<'static> = Epilogue {
        alpha: 1.0,
        bias: None,
        accumulate: false,
    };
    /// out += alpha s.
    pub fn add(alpha: f32) -> Epilogue<'static> {
        Epilogue {
            alpha,
            bias: None,
            accumulate: true,
        }
    }
}

/// A buffer written by many threads at once, each to its own elements.
pub(crate) struct Shared<O>(pub(crate) *mut O);
// SAFETY: threads write through it only to disjoint elements (each unit of work owns its rows and
// columns), and the buffer outlives the parallel loop that uses it.
unsafe impl<O> Sync for Shared<O> {}
impl<O> Shared<O> {
    pub(crate) fn at(&self, i: usize) -> *mut O {
        self.0.wrapping_add(i)
    }
}

/// C[t, N] = alpha A[t, L] P[L, N] (+ bias) (+ C) into `out` ([t, N], row-major), on the path's
/// FMAs. `panel(j0, NR, l0, p)` writes P[l0 + i][j0 + c] into p[i NR + c] for i < p.len() / NR, zero
/// past N. (The engine calls [`super::matmul::gemm`], which hands the product to AMX tiles where
/// the CPU has them.)
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
    if !check(isa, &a, t, l, n, ep, out.len()) {
        return;
    }
    if l == 0 {
        // No steps: every sum is zero, and each output is the epilogue of zero.
        let zeros = vec![0f32; n];
        let bias = ep.bias.map(|b| &b[..n]);
        return out[..t * n]
            .chunks_mut(n)
            .for_each(|o| epilogue_row_on(isa, o, &zeros, bias, ep));
    }
    gemm_body(isa, a, t, l, n, &panel, ep, out)
}

/// Check a GEMM's operands against its shape (panics naming the short one): whether there is any
/// work (t and N nonzero).
pub(crate) fn check<A>(isa: Isa, a: &Lhs<A>, t: usize, l: usize, n: usize, ep: Epilogue, out: usize) -> bool {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    assert!(out >= t * n, "gemm: the output is shorter than [t, N]");
    match a {
        Lhs::Rows(a) => assert!(a.len() >= t * l, "gemm: the left operand is shorter than [t, L]"),
        Lhs::Cols(a) => assert!(a.len() >= t * l, "gemm: the left operand is shorter than [L, t]"),
    }
    if let Some(b) = ep.bias {
        assert!(b.len() >= n, "gemm: the bias is shorter than N");
    }
    t > 0 && n > 0
}

/// [`gemm`] on a path the CPU runs: each piece of parallel work runs compiled for it
/// (`multiversion!`).
#[allow(clippy::too_many_arguments)]
fn gemm_body<A: Widen, O: Store, P: Fn(usize, usize, usize, &mut [f32]) + Sync>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: &P,
    ep: Epilogue,
    out: &mut [O],
) {
    let (mr, nr) = gemm_tile(isa);
    let t_pad = t.div_ceil(mr) * mr;
    let kc_max = kc_of(l);
    let ldc = NC.min(n.div_ceil(nr) * nr);
    // [t_pad, ldc] sums of one chunk; [t_pad, KC] block of A; [NC / NR][KC][NR] panels.
    let mut c = vec![0f32; t_pad * ldc];
    // A packed whole, every block of L once per call, when N spans several chunks and A is not
    // huge; else one block at a time (packed again for each chunk when L has several blocks).
    let whole_a = n > NC && t_pad * l <= A_WHOLE_MAX;
    let mut ab = vec![0f32; t_pad * if whole_a { l } else { kc_max.min(l.max(1)) }];
    let mut pb = vec![0f32; kc_max * ldc];
    // Blocks of rows as even as whole register tiles allow.
    let mc = t.div_ceil(t.div_ceil(MC)).div_ceil(mr) * mr;
    let row_blocks = t.div_ceil(mc);
    let dst = Shared(out.as_mut_ptr());
    let mut widened = None;
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(nr);
        // Units: (block of MC rows, group of panels), enough to keep every thread busy.
        let want = 4 * rayon::current_num_threads();
        let groups = want.div_ceil(row_blocks).min(panels).max(1);
        let per_group = panels.div_ceil(groups);
        for l0 in (0..l).step_by(kc_max) {
            let kc = kc_max.min(l - l0);
            // A's block [t_pad, kc], at a0 in ab.
            let (a0, packed) = if whole_a {
                (t_pad * l0, jc > 0)
            } else {
                (0, widened == Some(l0))
            };
            if !packed {
                widen_block(isa, a, t, l, l0, kc, mr, &mut ab[a0..a0 + t_pad * kc]);
                widened = Some(l0);
            }
            pb[..panels * kc * nr]
                .par_chunks_mut(kc * nr)
                .enumerate()
                .for_each(|(pi, p)| panel_on(isa, panel, jc + pi * nr, nr, l0, p));
            let cs = Shared(c.as_mut_ptr());
            (0..row_blocks * groups).into_par_iter().for_each(|u| {
                // (micro_tile runs the path's intrinsics itself.)
                let (rb, g) = (u / groups, u % groups);
                let rows = rb * mc..((rb + 1) * mc).min(t);
                for pi in g * per_group..((g + 1) * per_group).min(panels) {
                    let p = &pb[pi * kc * nr..(pi + 1) * kc * nr];
                    for r0 in rows.clone().step_by(mr) {
                        let at = r0 * ldc + pi * nr;
                        // SAFETY: the path was checked by `gemm`; rows r0 .. r0 + MR (<= t_pad) and
                        // columns pi NR .. + NR (<= ldc) of c, [t_pad, ldc], belong to this unit alone.
                        unsafe {
                            micro_tile(
                                isa,
                                mr,
                                &ab[a0 + r0 * kc..],
                                ATile::Packed,
                                kc,
                                p,
                                cs.at(at),
                                ldc,
                                l0 > 0,
                            )
                        };
                    }
                }
            });
        }
        // The epilogue, rows in parallel: out[r, jc ..] = alpha c + bias (+ out).
        c[..t * ldc].par_chunks(ldc).enumerate().for_each(|(r, cr)| {
            // SAFETY: row r's columns jc .. jc + nc of out belong to this iteration alone.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n + jc), nc) };
            epilogue_row_on(isa, o, &cr[..nc], ep.bias.map(|b| &b[jc..jc + nc]), ep)
        });
    }
}

/// out = alpha s + bias (+ out), rounded to the output's type. out, s: [nc]; bias: [nc].
#[inline(always)]
pub(crate) fn epilogue_row<O: Store>(out: &mut [O], s: &[f32], bias: Option<&[f32]>, ep: Epilogue) {
    for (cc, (o, &s)) in out.iter_mut().zip(s).enumerate() {
        let mut v = ep.alpha * s;
        if let Some(b) = bias {
            v += b[cc];
        }
        if ep.accumulate {
            v += o.widen();
        }
        *o = O::from_f32(v);
    }
}

/// A[.., l0 .. l0 + kc] as f32, packed tile by tile: ab[(r0 + r) kc + c MR + r] = A[r0 + r][l0 + c]
/// for each tile of MR rows from r0 ([`ATile::Packed`]); rows past t stay zero, so every register
/// tile reads whole rows. ab: [t_pad, kc].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn widen_block<A: Widen>(isa: Isa, a: Lhs<A>, t: usize, l: usize, l0: usize, kc: usize, mr: usize, ab: &mut [f32]) {
    ab.par_chunks_mut(mr * kc)
        .enumerate()
        .for_each(|(ti, o)| widen_tile_on(isa, isa, a, t, l, l0, ti * mr, mr, o));
}

/// A decoder of panels (see [`gemm`]).
pub trait PanelFn: Fn(usize, usize, usize, &mut [f32]) + Sync {}
impl<P: Fn(usize, usize, usize, &mut [f32]) + Sync> PanelFn for P {}

/// The panels of a dense P[L, N] by rows (zero past N), as the decoders hand them out: for the
/// checks that run the GEMMs on plain matrices (`selftest`, the tests).
pub(crate) fn dense_panel(p: &[f32], l: usize, n: usize) -> impl PanelFn + '_ {
    move |j0, nr, l0, out| {
        for (i, row) in out.chunks_mut(nr).enumerate() {
            assert!(l0 + i < l, "a panel row past L");
            for (c, o) in row.iter_mut().enumerate() {
                *o = if j0 + c < n { p[(l0 + i) * n + j0 + c] } else { 0.0 };
            }
        }
    }
}

/// Decode one panel.
#[inline(always)]
fn run_panel<P: PanelFn>(panel: &P, j0: usize, nr: usize, l0: usize, p: &mut [f32]) {
    panel(j0, nr, l0, p)
}

crate::multiversion! {
    /// [`run_panel`] on a path.
    pub(crate) fn panel_on<P: PanelFn>(panel: &P, j0: usize, nr: usize, l0: usize, p: &mut [f32]) => run_panel
}

crate::multiversion! {
    /// [`widen_tile`] on a path.
    fn widen_tile_on<A: Widen>(tiles: Isa, a: Lhs<A>, t: usize, l: usize, l0: usize, r0: usize, mr: usize, o: &mut [f32]) => widen_tile
}

crate::multiversion! {
    /// [`epilogue_row`] on a path.
    pub(crate) fn epilogue_row_on<O: Store>(out: &mut [O], s: &[f32], bias: Option<&[f32]>, ep: Epilogue) => epilogue_row
}

/// One tile of [`widen_block`]: rows r0 .. r0 + MR. o: [kc, MR].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn widen_tile<A: Widen>(isa: Isa, a: Lhs<A>, t: usize, l: usize, l0: usize, r0: usize, mr: usize, o: &mut [f32]) {
    let rows = mr.min(t.saturating_sub(r0));
    match a {
        // By blocks of 16 steps: each row's piece widened (contiguous), then transposed.
        Lhs::Rows(a) => {
            let kc = o.len() / mr;
            let mut buf = [0f32; 16 * 16];
            for i0 in (0..kc).step_by(16) {
                let w = 16.min(kc - i0);
                for (r, row) in buf.chunks_mut(16).take(mr).enumerate() {
                    if r < rows {
                        row_piece(a, l, r0 + r, l0 + i0, &mut row[..w]);
                    } else {
                        row.fill(0.0);
                    }
                }
                transpose(isa, &buf, 16, mr, w, &mut o[i0 * mr..], mr);
            }
        }
        // A step of L's MR values are adjacent in the source: copy them as runs.
        Lhs::Cols(a) => {
            for (c, dst) in o.chunks_mut(mr).enumerate() {
                let src = &a[(l0 + c) * t + r0..(l0 + c) * t + r0 + rows];
                dst.iter_mut().zip(src).for_each(|(d, v)| *d = v.widen());
            }
        }
    }
}

/// An f32 [rows, cols] matrix packed for [`micro_tile`] as blocks of NR columns:
/// [cols_pad / NR][rows_pad][NR], zero past rows and cols; `get(i, j)` is element [i][j]. What
/// attention's products and the LoRA branch's `thin_add` read.
pub(crate) struct Panels {
    pub nr: usize,
    pub rows_pad: usize,
    pub blocks: usize,
    data: Vec<f32>,
}

impl Panels {
    pub fn pack(nr: usize, rows: usize, cols: usize, rows_pad: usize, get: impl Fn(usize, usize) -> f32) -> Panels {
        let blocks = cols.div_ceil(nr);
        let mut data = vec![0f32; blocks * rows_pad * nr];
        for (b, panel) in data.chunks_mut(rows_pad * nr).enumerate() {
            for (i, row) in panel.chunks_mut(nr).take(rows).enumerate() {
                for (c, o) in row.iter_mut().enumerate().take(cols.saturating_sub(b * nr)) {
                    *o = get(i, b * nr + c);
                }
            }
        }
        Panels {
            nr,
            rows_pad,
            blocks,
            data,
        }
    }

    /// Block b: [rows_pad][NR].
    pub fn block(&self, b: usize) -> &[f32] {
        &self.data[b * self.rows_pad * self.nr..(b + 1) * self.rows_pad * self.nr]
    }
}

/// How a micro-kernel finds A's MR x kc tile.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ATile {
    /// Rows of stride lda: a[r lda + i].
    Rows(usize),
    /// Packed by step of L: a[i MR + r], so that one step's MR values are adjacent.
    Packed,
}

/// c[r ldc + j] (+)= sum over i < kc of A[r][i] p[i][j], for the MR x NR tile of the path (mr: the
/// rows of its small [`tile`] or of the GEMM's), adding to c when `load` (else overwriting it).
/// a: A's tile laid out as `at` says; p: [kc, NR].
///
/// # Safety
/// The CPU runs `isa` (`Isa::supported`); c points to MR rows of stride ldc (>= NR), the first NR
/// values of each valid for reads and writes and touched by no one else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn micro_tile(
    isa: Isa,
    mr: usize,
    a: &[f32],
    at: ATile,
    kc: usize,
    p: &[f32],
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    let nr = tile(isa).1;
    assert!(
        mr == tile(isa).0 || mr == gemm_tile(isa).0,
        "micro_tile: no {mr}-row tile on {isa}"
    );
    match at {
        ATile::Rows(lda) => assert!(kc <= lda && a.len() >= (mr - 1) * lda + kc),
        ATile::Packed => assert!(a.len() >= kc * mr),
    }
    assert!(p.len() >= kc * nr && nr <= ldc);
    match (isa, at) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the slices are as long as asserted.
        (Isa::Avx512, ATile::Rows(lda)) if mr == 8 => unsafe {
            x86::tile_avx512::<false, 8>(a, lda, kc, p, c, ldc, load)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the slices are as long as asserted.
        (Isa::Avx512, ATile::Packed) if mr == 8 => unsafe { x86::tile_avx512::<true, 8>(a, 0, kc, p, c, ldc, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the slices are as long as asserted.
        (Isa::Avx512, ATile::Rows(lda)) => unsafe { x86::tile_avx512::<false, 12>(a, lda, kc, p, c, ldc, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the slices are as long as asserted.
        (Isa::Avx512, ATile::Packed) => unsafe { x86::tile_avx512::<true, 12>(a, 0, kc, p, c, ldc, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the slices are as long as asserted.
        (Isa::Avx2, ATile::Rows(lda)) => unsafe { x86::tile_avx2::<false>(a, lda, kc, p, c, ldc, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the slices are as long as asserted.
        (Isa::Avx2, ATile::Packed) => unsafe { x86::tile_avx2::<true>(a, 0, kc, p, c, ldc, load) },
        // SAFETY: as the caller promises.
        (_, ATile::Rows(lda)) => unsafe { tile_portable::<false>(a, lda, kc, p, c, ldc, load) },
        // SAFETY: as the caller promises.
        (_, ATile::Packed) => unsafe { tile_portable::<true>(a, 0, kc, p, c, ldc, load) },
    }
}

/// m[j][c0 .. c0 + out.len()] of a row-major matrix of `cols` columns, widened to f32: the `piece`
/// of [`transposed_panel`] and [`straight_panel`] for a matrix held as bf16 or f32.
#[inline(always)]
pub fn row_piece<E: Widen>(m: &[E], cols: usize, j: usize, c0: usize, out: &mut [f32]) {
    let src = &m[j * cols + c0..j * cols + c0 + out.len()];
    out.iter_mut().zip(src).for_each(|(o, v)| *o = v.widen());
}

/// The panel of W^T, for C = A W^T with W [n, k] given by pieces of rows: P[i][c] = W[j0 + c][l0 + i],
/// columns past n zero. `piece(j, l0, out)` writes W[j][l0 .. l0 + out.len()].
#[inline(always)]
pub fn transposed_panel(
    isa: Isa,
    n: usize,
    piece: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> impl Fn(usize, usize, usize, &mut [f32]) + Sync {
    move |j0: usize, nr: usize, l0: usize, p: &mut [f32]| {
        let kc = p.len() / nr;
        // Up to 16 of W's rows at a time, as rows of buf, then into the panel's columns.
        let mut buf = vec![0f32; 16 * kc];
        for c0 in (0..nr).step_by(16) {
            let width = 16.min(nr - c0);
            let have = width.min(n.saturating_sub(j0 + c0));
            for (c, row) in buf.chunks_mut(kc).take(width).enumerate() {
                if c < have {
                    piece(j0 + c0 + c, l0, row);
                } else {
                    row.fill(0.0);
                }
            }
            transpose(isa, &buf, kc, width, kc, &mut p[c0..], nr);
        }
    }
}

/// dst[i ld + c] = src[c ls + i] for c < width (<= 16) and i < cols: `width` rows of src (each
/// `cols` long, `ls` apart) become the first `width` columns of dst's rows (`ld` apart). On AVX-512
/// by 16 x 16 blocks in registers; elsewhere element by element.
pub(crate) fn transpose(isa: Isa, src: &[f32], ls: usize, width: usize, cols: usize, dst: &mut [f32], ld: usize) {
    assert!(
        width <= 16 && width <= ld,
        "transpose: at most 16 columns, within dst's rows"
    );
    if width == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= (width - 1) * ls + cols && dst.len() >= (cols - 1) * ld + width);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        done = cols / 16 * 16;
        for i0 in (0..done).step_by(16) {
            // SAFETY: the path was checked where the engine was built; rows c < width of src hold
            // columns i0 .. i0 + 16 <= cols, and dst rows i0 .. i0 + 16 hold `width` values from
            // their start (both asserted above).
            unsafe { x86::transpose16(src.as_ptr().add(i0), ls, width, dst.as_mut_ptr().add(i0 * ld), ld) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for i in done..cols {
        for c in 0..width {
            dst[i * ld + c] = src[c * ls + i];
        }
    }
}

/// The panel of W, for C = A W with W [n, k] given by pieces of rows: P[i][c] = W[l0 + i][c0 + c],
/// columns past k zero. `piece(j, c0, out)` writes W[j][c0 .. c0 + out.len()].
#[inline(always)]
pub fn straight_panel(
    k: usize,
    piece: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> impl Fn(usize, usize, usize, &mut [f32]) + Sync {
    move |c0: usize, nr: usize, l0: usize, p: &mut [f32]| {
        let cols = nr.min(k.saturating_sub(c0));
        for (i, dst) in p.chunks_mut(nr).enumerate() {
            piece(l0 + i, c0, &mut dst[..cols]);
            dst[cols..].fill(0.0);
        }
    }
}

/// The portable tile, 4 x 16: plain loops the compiler vectorises with the target's baseline.
///
/// # Safety
/// c: 4 rows of stride ldc, the first 16 values of each valid and not aliased; a: [4, lda] (the
/// last row kc long), or [kc, 4] when PACKED; p: [kc, 16].
unsafe fn tile_portable<const PACKED: bool>(
    a: &[f32],
    lda: usize,
    kc: usize,
    p: &[f32],
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    let (rs, ks) = if PACKED { (1, 4) } else { (lda, 1) };
    let mut acc = [[0f32; 16]; 4];
    for (r, acc) in acc.iter_mut().enumerate() {
        // SAFETY: row r of c, 16 values, as the caller promises.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), 16) };
        if load {
            acc.copy_from_slice(row);
        }
    }
    for i in 0..kc {
        let w = &p[i * 16..i * 16 + 16];
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = a[r * rs + i * ks];
            for (o, &wv) in acc.iter_mut().zip(w) {
                *o += x * wv;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r of c, 16 values, as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), 16) }.copy_from_slice(acc);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::transpose16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// dst[i ld + c] = src[c ls + i] for i < 16 and c < width (<= 16; rows of src past width read
    /// as zeros): a 16 x 16 block transposed in registers, in three rounds of shuffles (pairs of
    /// rows, pairs of pairs, then 128-bit lanes), its rows stored `width` lanes wide.
    ///
    /// # Safety
    /// The CPU has AVX-512F; src holds `width` rows of 16 values `ls` apart, dst 16 rows of
    /// `width` values `ld` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose16(src: *const f32, ls: usize, width: usize, dst: *mut f32, ld: usize) {
        // SAFETY: rows c < width of src are readable, 16 values each (the caller's promise).
        let r: [__m512; 16] = std::array::from_fn(|c| {
            if c < width {
                unsafe { _mm512_loadu_ps(src.add(c * ls)) }
            } else {
                _mm512_setzero_ps()
            }
        });
        // t[4k + 0/1]: rows 4k, 4k+1 interleaved (low / high pairs of each lane); t[4k + 2/3]: rows 4k+2, 4k+3.
        let mut t = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            t[4 * k] = _mm512_unpacklo_ps(r[4 * k], r[4 * k + 1]);
            t[4 * k + 1] = _mm512_unpackhi_ps(r[4 * k], r[4 * k + 1]);
            t[4 * k + 2] = _mm512_unpacklo_ps(r[4 * k + 2], r[4 * k + 3]);
            t[4 * k + 3] = _mm512_unpackhi_ps(r[4 * k + 2], r[4 * k + 3]);
        }
        // u[4k + j], lane L: column 4L + j of rows 4k .. 4k + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        let (lo, hi) = (
            |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
            |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
        );
        for k in 0..4 {
            u[4 * k] = lo(t[4 * k], t[4 * k + 2]);
            u[4 * k + 1] = hi(t[4 * k], t[4 * k + 2]);
            u[4 * k + 2] = lo(t[4 * k + 1], t[4 * k + 3]);
            u[4 * k + 3] = hi(t[4 * k + 1], t[4 * k + 3]);
        }
        // Lane L of u[j], u[4 + j], u[8 + j], u[12 + j] together: column 4L + j, all 16 rows.
        let mask: __mmask16 = ((1u32 << width) - 1) as __mmask16;
        for j in 0..4 {
            let v = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let w = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
            let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            let w2 = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
            let cols = [
                _mm512_shuffle_f32x4::<0x88>(v, v2),
                _mm512_shuffle_f32x4::<0x88>(w, w2),
                _mm512_shuffle_f32x4::<0xdd>(v, v2),
                _mm512_shuffle_f32x4::<0xdd>(w, w2),
            ];
            for (lane, col) in cols.into_iter().enumerate() {
                // SAFETY: row 4 lane + j < 16 of dst holds `width` values (the caller's promise).
                unsafe { _mm512_mask_storeu_ps(dst.add((4 * lane + j) * ld), mask, col) };
            }
        }
    }

    /// The AVX-512 tile, MR x 32: per step of kc, two 16-wide loads of the panel row and one
    /// broadcast per row of a feed 2 MR FMAs.
    ///
    /// # Safety
    /// The CPU has AVX-512F; a: [MR, lda] (the last row kc long), or [kc, MR] when PACKED;
    /// p: [kc, 32]; c: MR rows of stride ldc, the first 32 values of each valid and not aliased.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512<const PACKED: bool, const MR: usize>(
        a: &[f32],
        lda: usize,
        kc: usize,
        p: &[f32],
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let (rs, ks) = if PACKED { (1, MR) } else { (lda, 1) };
        let (ap, pp, cp) = (a.as_ptr(), p.as_ptr(), c);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load {
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r of c, as the caller promises.
                unsafe {
                    acc[0] = _mm512_loadu_ps(cp.add(r * ldc));
                    acc[1] = _mm512_loadu_ps(cp.add(r * ldc + 16));
                }
            }
        }
        for i in 0..kc {
            // SAFETY: i < kc, so p[i 32 .. i 32 + 32] and A[r][i] (r < MR) are in bounds.
            unsafe {
                let w0 = _mm512_loadu_ps(pp.add(i * 32));
                let w1 = _mm512_loadu_ps(pp.add(i * 32 + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(r * rs + i * ks));
                    acc[0] = _mm512_fmadd_ps(x, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, w1, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row r of c, as the caller promises.
            unsafe {
                _mm512_storeu_ps(cp.add(r * ldc), acc[0]);
                _mm512_storeu_ps(cp.add(r * ldc + 16), acc[1]);
            }
        }
    }

    /// The AVX2 tile, 4 x 16: two 8-wide loads of the panel row and one broadcast per row of a
    /// feed 8 FMAs per step of kc.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; a: [4, lda] (the last row kc long), or [kc, 4] when PACKED;
    /// p: [kc, 16]; c: 4 rows of stride
    /// ldc, the first 16 values of each valid and not aliased.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const PACKED: bool>(
        a: &[f32],
        lda: usize,
        kc: usize,
        p: &[f32],
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let (rs, ks) = if PACKED { (1, 4) } else { (lda, 1) };
        let (ap, pp, cp) = (a.as_ptr(), p.as_ptr(), c);
        let mut acc = [_mm256_setzero_ps(); 8];
        if load {
            for r in 0..4 {
                // SAFETY: row r of c, as the caller promises.
                unsafe {
                    acc[2 * r] = _mm256_loadu_ps(cp.add(r * ldc));
                    acc[2 * r + 1] = _mm256_loadu_ps(cp.add(r * ldc + 8));
                }
            }
        }
        for i in 0..kc {
            // SAFETY: i < kc, so p[i 16 .. i 16 + 16] and A[r][i] (r < 4) are in bounds.
            unsafe {
                let w0 = _mm256_loadu_ps(pp.add(i * 16));
                let w1 = _mm256_loadu_ps(pp.add(i * 16 + 8));
                for r in 0..4 {
                    let x = _mm256_set1_ps(*ap.add(r * rs + i * ks));
                    acc[2 * r] = _mm256_fmadd_ps(x, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(x, w1, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..4 {
            // SAFETY: row r of c, as the caller promises.
            unsafe {
                _mm256_storeu_ps(cp.add(r * ldc), acc[2 * r]);
                _mm256_storeu_ps(cp.add(r * ldc + 8), acc[2 * r + 1]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
