//! The CPU engine's GEMM: C[t, N] = alpha A[t, L] P[L, N] (+ bias[N]) (+ C, when accumulating), A
//! bf16 or f32 (stored by rows, or by columns: A = M^T), C bf16 or f32, P decoded panel by panel by
//! the caller (from NF4 bytes, bf16 or f32) into f32. Used by the NF4 GEMM in both orientations
//! (`nf4_gemm.rs`), the LoRA branch (`lora.rs`) and the output head (`loss.rs`). Reference twin:
//! `model::cpu::linear`.
//!
//! A is widened to f32 once ([t, L], rows padded with zeros to a whole number of register tiles).
//! P is decoded one panel of NR columns at a time, KC rows of L at a time, into an f32 tile
//! `[KC][NR]` that stays in the L1/L2 cache while a register-blocked micro-kernel sweeps every block
//! of MR rows of A over it: MR x NR accumulators held in vector registers, one FMA per (row,
//! vector) per step of L, carried in an f32 [t, NR] buffer from one block of KC to the next. Threads
//! take whole panels, or for narrow outputs (few panels) groups of rows of a panel; never a share
//! of the sum over L, so a result does not depend on the thread count: each element's sum runs over
//! L in order, in f32.

use super::isa::Isa;
use half::bf16;
use rayon::prelude::*;

/// The register tile of a path: MR rows of A by NR columns of P.
pub(crate) fn tile(isa: Isa) -> (usize, usize) {
    match isa {
        // 16 zmm accumulators (8 rows x 2 vectors of 16), 2 for the panel row, 1 broadcast.
        Isa::Avx512 => (8, 32),
        // 8 ymm accumulators (4 x 2 vectors of 8), 2 for the panel row, 1 broadcast.
        Isa::Avx2 => (4, 16),
        Isa::Portable => (4, 16),
    }
}

/// Rows of L per decoded block of a panel: KC x NR f32 (64 KB at NR = 32) stays in L2 beside the
/// rows of A it meets.
const KC: usize = 512;

/// A decoder of panels: `(first column, NR, first row of L, [KC'][NR] out, scratch)`, writing rows
/// `l0 .. l0 + out.len() / NR` of L.
pub type Panel<'a> = dyn Fn(usize, usize, usize, &mut [f32], &mut Vec<f32>) + Sync + 'a;

/// What A holds: bf16 or f32 values.
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// What a GEMM writes: f32 as computed, or rounded to bf16.
pub trait Store: Widen {
    fn from_f32(v: f32) -> Self;
}

impl Store for f32 {
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Store for bf16 {
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
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

/// The output, written by many threads at once, each to its own elements.
struct Out<O>(*mut O);
// SAFETY: threads write through it only to disjoint elements (each unit of work owns its columns
// and rows), and the buffer outlives the parallel loop that uses it.
unsafe impl<O> Sync for Out<O> {}
impl<O> Out<O> {
    fn at(&self, i: usize) -> *mut O {
        self.0.wrapping_add(i)
    }
}

/// C[t, N] = alpha A[t, L] P[L, N] (+ bias) (+ C) into `out` ([t, N], row-major), with P decoded
/// panel by panel by `panel`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<A: Widen, O: Store>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: &Panel,
    ep: Epilogue,
    out: &mut [O],
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    assert!(out.len() >= t * n, "gemm: the output is shorter than [t, N]");
    if t == 0 || n == 0 {
        return;
    }
    let (mr, nr) = tile(isa);
    let af = widen_lhs(a, t, l, mr);
    let dst = Out(out.as_mut_ptr());
    // Units of work: (panel, group of row tiles). Rows are split only when there are too few
    // panels to keep every thread busy; each group decodes its panel itself.
    let panels = n.div_ceil(nr);
    let row_tiles = t.div_ceil(mr);
    let want = 4 * rayon::current_num_threads();
    let groups = if panels >= want {
        1
    } else {
        want.div_ceil(panels).min(row_tiles)
    };
    let per_group = row_tiles.div_ceil(groups);
    let scratch = || (vec![0f32; KC.min(l.max(1)) * nr], Vec::new(), Vec::new());
    (0..panels * groups)
        .into_par_iter()
        .for_each_init(scratch, |(p, buf, c), unit| {
            let (pi, g) = (unit / groups, unit % groups);
            let (j0, cols) = (pi * nr, nr.min(n - pi * nr));
            let rows = g * per_group * mr..((g + 1) * per_group * mr).min(t);
            if rows.is_empty() {
                return;
            }
            // [rows, NR] f32 sums, carried across the blocks of L.
            c.clear();
            c.resize(rows.len().div_ceil(mr) * mr * nr, 0.0);
            for l0 in (0..l).step_by(KC) {
                let kc = KC.min(l - l0);
                panel(j0, nr, l0, &mut p[..kc * nr], buf);
                for (ti, r0) in rows.clone().step_by(mr).enumerate() {
                    let c = &mut c[ti * mr * nr..(ti + 1) * mr * nr];
                    micro_tile(isa, &af[r0 * l + l0..], l, kc, &p[..kc * nr], c, nr, l0 > 0);
                }
            }
            for (ti, r0) in rows.clone().step_by(mr).enumerate() {
                for r in 0..mr.min(t - r0) {
                    for cc in 0..cols {
                        let s = c[(ti * mr + r) * nr + cc];
                        let i = (r0 + r) * n + j0 + cc;
                        // SAFETY: i < t n <= out.len(); row r0 + r and column j0 + cc belong to this
                        // unit alone, so no other thread touches element i.
                        unsafe {
                            let o = dst.at(i);
                            let mut v = ep.alpha * s + ep.bias.map_or(0.0, |b| b[j0 + cc]);
                            if ep.accumulate {
                                v += (*o).widen();
                            }
                            *o = O::from_f32(v);
                        }
                    }
                }
            }
        });
}

/// A as f32 [t_pad, L], t_pad a whole number of MR-row tiles, zero rows past t (every register
/// tile reads whole rows).
fn widen_lhs<A: Widen>(a: Lhs<A>, t: usize, l: usize, mr: usize) -> Vec<f32> {
    let t_pad = t.div_ceil(mr) * mr;
    let mut af = vec![0f32; t_pad * l];
    let rows = af[..t * l].par_chunks_mut(l.max(1));
    match a {
        Lhs::Rows(a) => rows
            .zip(a[..t * l].par_chunks(l.max(1)))
            .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, v)| *o = v.widen())),
        Lhs::Cols(a) => {
            assert!(a.len() >= t * l, "gemm: the left operand is shorter than [L, t]");
            rows.enumerate()
                .for_each(|(i, o)| o.iter_mut().enumerate().for_each(|(j, o)| *o = a[j * t + i].widen()))
        }
    }
    af
}

/// c[r ldc + j] (+)= sum over i < kc of a[r lda + i] p[i][j], for the MR x NR tile of the path,
/// adding to c when `load` (else overwriting it). a: [MR, lda] from the block's first column;
/// p: [kc, NR]; c: [MR, ldc] from the tile's first column. The caller has checked that the CPU runs
/// `isa` (`Isa::supported`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn micro_tile(isa: Isa, a: &[f32], lda: usize, kc: usize, p: &[f32], c: &mut [f32], ldc: usize, load: bool) {
    let (mr, nr) = tile(isa);
    assert!(kc <= lda && a.len() >= (mr - 1) * lda + kc && p.len() >= kc * nr);
    assert!(nr <= ldc && c.len() >= (mr - 1) * ldc + nr);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU has AVX-512F; the slices are as long as asserted.
        Isa::Avx512 => unsafe { x86::tile_avx512(a, lda, kc, p, c, ldc, load) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU has AVX2 and FMA; the slices are as long as asserted.
        Isa::Avx2 => unsafe { x86::tile_avx2(a, lda, kc, p, c, ldc, load) },
        _ => tile_portable(a, lda, kc, p, c, ldc, load),
    }
}

/// The panel of W^T, for C = A W^T with W [n, k] given by pieces of rows: P[i][c] = W[j0 + c][l0 + i],
/// columns past n zero. `piece(j, l0, out)` writes W[j][l0 .. l0 + out.len()].
pub fn transposed_panel<'a>(n: usize, piece: impl Fn(usize, usize, &mut [f32]) + Sync + 'a) -> Box<Panel<'a>> {
    Box::new(
        move |j0: usize, nr: usize, l0: usize, p: &mut [f32], buf: &mut Vec<f32>| {
            let kc = p.len() / nr;
            buf.resize(kc, 0.0);
            for c in 0..nr {
                if j0 + c < n {
                    piece(j0 + c, l0, buf);
                    for (i, &v) in buf.iter().enumerate() {
                        p[i * nr + c] = v;
                    }
                } else {
                    (0..kc).for_each(|i| p[i * nr + c] = 0.0);
                }
            }
        },
    )
}

/// The panel of W, for C = A W with W [n, k] given by pieces of rows: P[i][c] = W[l0 + i][c0 + c],
/// columns past k zero. `piece(j, c0, out)` writes W[j][c0 .. c0 + out.len()].
pub fn straight_panel<'a>(k: usize, piece: impl Fn(usize, usize, &mut [f32]) + Sync + 'a) -> Box<Panel<'a>> {
    Box::new(
        move |c0: usize, nr: usize, l0: usize, p: &mut [f32], _buf: &mut Vec<f32>| {
            let cols = nr.min(k - c0);
            for (i, dst) in p.chunks_mut(nr).enumerate() {
                piece(l0 + i, c0, &mut dst[..cols]);
                dst[cols..].fill(0.0);
            }
        },
    )
}

/// The portable tile, 4 x 16: plain loops the compiler vectorises with the target's baseline.
fn tile_portable(a: &[f32], lda: usize, kc: usize, p: &[f32], c: &mut [f32], ldc: usize, load: bool) {
    let mut acc = [[0f32; 16]; 4];
    if load {
        acc.iter_mut()
            .enumerate()
            .for_each(|(r, acc)| acc.copy_from_slice(&c[r * ldc..r * ldc + 16]));
    }
    for i in 0..kc {
        let w = &p[i * 16..i * 16 + 16];
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = a[r * lda + i];
            for (o, &wv) in acc.iter_mut().zip(w) {
                *o += x * wv;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        c[r * ldc..r * ldc + 16].copy_from_slice(acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The AVX-512 tile, 8 x 32: per step of kc, two 16-wide loads of the panel row and one
    /// broadcast per row of a feed 16 FMAs.
    ///
    /// # Safety
    /// The CPU has AVX-512F; a: [8, lda] (the last row kc long), p: [kc, 32], c: [8, ldc] (the last row
    /// 32 long) at least.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(a: &[f32], lda: usize, kc: usize, p: &[f32], c: &mut [f32], ldc: usize, load: bool) {
        let (ap, pp, cp) = (a.as_ptr(), p.as_ptr(), c.as_mut_ptr());
        let mut acc = [_mm512_setzero_ps(); 16];
        if load {
            for r in 0..8 {
                // SAFETY: c holds [8, ldc], ldc >= 32.
                unsafe {
                    acc[2 * r] = _mm512_loadu_ps(cp.add(r * ldc));
                    acc[2 * r + 1] = _mm512_loadu_ps(cp.add(r * ldc + 16));
                }
            }
        }
        for i in 0..kc {
            // SAFETY: i < kc, so p[i 32 .. i 32 + 32] and a[r lda + i] (r < 8) are in bounds.
            unsafe {
                let w0 = _mm512_loadu_ps(pp.add(i * 32));
                let w1 = _mm512_loadu_ps(pp.add(i * 32 + 16));
                for r in 0..8 {
                    let x = _mm512_set1_ps(*ap.add(r * lda + i));
                    acc[2 * r] = _mm512_fmadd_ps(x, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(x, w1, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..8 {
            // SAFETY: c holds [8, ldc], ldc >= 32.
            unsafe {
                _mm512_storeu_ps(cp.add(r * ldc), acc[2 * r]);
                _mm512_storeu_ps(cp.add(r * ldc + 16), acc[2 * r + 1]);
            }
        }
    }

    /// The AVX2 tile, 4 x 16: two 8-wide loads of the panel row and one broadcast per row of a
    /// feed 8 FMAs per step of kc.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; a: [4, lda] (the last row kc long), p: [kc, 16], c: [4, ldc] (the
    /// last row 16 long) at least.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(a: &[f32], lda: usize, kc: usize, p: &[f32], c: &mut [f32], ldc: usize, load: bool) {
        let (ap, pp, cp) = (a.as_ptr(), p.as_ptr(), c.as_mut_ptr());
        let mut acc = [_mm256_setzero_ps(); 8];
        if load {
            for r in 0..4 {
                // SAFETY: c holds [4, ldc], ldc >= 16.
                unsafe {
                    acc[2 * r] = _mm256_loadu_ps(cp.add(r * ldc));
                    acc[2 * r + 1] = _mm256_loadu_ps(cp.add(r * ldc + 8));
                }
            }
        }
        for i in 0..kc {
            // SAFETY: i < kc, so p[i 16 .. i 16 + 16] and a[r lda + i] (r < 4) are in bounds.
            unsafe {
                let w0 = _mm256_loadu_ps(pp.add(i * 16));
                let w1 = _mm256_loadu_ps(pp.add(i * 16 + 8));
                for r in 0..4 {
                    let x = _mm256_set1_ps(*ap.add(r * lda + i));
                    acc[2 * r] = _mm256_fmadd_ps(x, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(x, w1, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..4 {
            // SAFETY: c holds [4, ldc], ldc >= 16.
            unsafe {
                _mm256_storeu_ps(cp.add(r * ldc), acc[2 * r]);
                _mm256_storeu_ps(cp.add(r * ldc + 8), acc[2 * r + 1]);
            }
        }
    }
}
