//! The CPU engine's GEMM: C[t, N] = A[t, L] P[L, N] (+ bias[N]), A bf16, C bf16 or f32, P decoded
//! panel by panel by the caller (from NF4 bytes, or bf16) into f32. Used by the NF4 GEMM in both
//! orientations (`nf4_gemm.rs`) and by the output head (`loss.rs`). Reference twin:
//! `model::cpu::linear`.
//!
//! A is widened to f32 once ([t, L], rows padded with zeros to a whole number of register tiles).
//! P is decoded one panel of NR columns at a time into an f32 tile `[L][NR]` that stays in cache
//! while a register-blocked micro-kernel sweeps every block of MR rows of A over it: MR x NR
//! accumulators held in vector registers, one FMA per (row, vector) per step of L. Threads take
//! whole panels (never a share of the sum over L), so a result does not depend on the thread count;
//! each element's sum runs over L in order, in f32.

use super::isa::Isa;
use half::bf16;
use rayon::prelude::*;

/// The register tile of a path: MR rows of A by NR columns of P.
fn tile(isa: Isa) -> (usize, usize) {
    match isa {
        // 16 zmm accumulators (8 rows x 2 vectors of 16), 2 for the panel row, 1 broadcast.
        Isa::Avx512 => (8, 32),
        // 8 ymm accumulators (4 x 2 vectors of 8), 2 for the panel row, 1 broadcast.
        Isa::Avx2 => (4, 16),
        Isa::Portable => (4, 16),
    }
}

/// A decoder of panels: `(first column, NR, [L][NR] out, scratch)`.
pub type Panel<'a> = dyn Fn(usize, usize, &mut [f32], &mut Vec<f32>) + Sync + 'a;

/// What a GEMM writes: f32 as computed, or rounded to bf16.
pub trait Store: Copy + Send + Sync {
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

/// The output, written by many threads at once, each to its own columns.
struct Out<O>(*mut O);
// SAFETY: threads write through it only to disjoint elements (each panel owns its columns), and
// the buffer outlives the parallel loop that uses it.
unsafe impl<O> Sync for Out<O> {}
impl<O> Out<O> {
    fn at(&self, i: usize) -> *mut O {
        self.0.wrapping_add(i)
    }
}

/// C[t, N] = A[t, L] P[L, N] (+ bias[N]) into `out` ([t, N], row-major), with P decoded panel by
/// panel by `panel`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<O: Store>(
    isa: Isa,
    a: &[bf16],
    t: usize,
    l: usize,
    n: usize,
    panel: &Panel,
    bias: Option<&[f32]>,
    out: &mut [O],
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    if t == 0 || n == 0 {
        return;
    }
    let (mr, nr) = tile(isa);
    // [t_pad, L] f32, zero rows past t: every register tile reads whole rows.
    let t_pad = t.div_ceil(mr) * mr;
    let mut af = vec![0f32; t_pad * l];
    af[..t * l]
        .par_chunks_mut(l.max(1))
        .zip(a.par_chunks(l.max(1)))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, v)| *o = v.to_f32()));
    assert!(out.len() >= t * n);
    let dst = Out(out.as_mut_ptr());
    let scratch = || (vec![0f32; l * nr], Vec::new(), vec![0f32; mr * nr]);
    (0..n.div_ceil(nr))
        .into_par_iter()
        .for_each_init(scratch, |(p, row, c), pi| {
            let j0 = pi * nr;
            panel(j0, nr, p, row);
            let cols = nr.min(n - j0);
            for r0 in (0..t).step_by(mr) {
                micro_tile(isa, &af[r0 * l..(r0 + mr) * l], l, p, c);
                for r in 0..mr.min(t - r0) {
                    for cc in 0..cols {
                        let v = c[r * nr + cc] + bias.map_or(0.0, |b| b[j0 + cc]);
                        let i = (r0 + r) * n + j0 + cc;
                        // SAFETY: i < t n <= out.len(); column j0 + cc belongs to this panel alone, so
                        // no other thread writes element i.
                        unsafe { *dst.at(i) = O::from_f32(v) };
                    }
                }
            }
        });
}

/// c[r][j] = sum over i < l of a[r][i] p[i][j], for the MR x NR tile of the path. a: [MR, l];
/// p: [l, NR]; c: [MR, NR].
fn micro_tile(isa: Isa, a: &[f32], l: usize, p: &[f32], c: &mut [f32]) {
    let (mr, nr) = tile(isa);
    assert!(a.len() >= mr * l && p.len() >= l * nr && c.len() >= mr * nr);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `gemm` checked that the CPU has AVX-512F; the slices are as long as asserted.
        Isa::Avx512 => unsafe { x86::tile_avx512(a, l, p, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `gemm` checked that the CPU has AVX2 and FMA; the slices are as long as asserted.
        Isa::Avx2 => unsafe { x86::tile_avx2(a, l, p, c) },
        _ => tile_portable(a, l, p, c),
    }
}

/// The panel of W^T, for C = A W^T with W [n, k] given by rows: P[l][c] = W[j0 + c][l], columns
/// past n zero. `row(j, out)` writes row j of W ([k]).
pub fn transposed_panel<'a>(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync + 'a) -> Box<Panel<'a>> {
    Box::new(move |j0: usize, nr: usize, p: &mut [f32], buf: &mut Vec<f32>| {
        buf.resize(k, 0.0);
        for c in 0..nr {
            if j0 + c < n {
                row(j0 + c, buf);
                for (l, &v) in buf.iter().enumerate() {
                    p[l * nr + c] = v;
                }
            } else {
                (0..k).for_each(|l| p[l * nr + c] = 0.0);
            }
        }
    })
}

/// The panel of W, for C = A W with W [n, k] given by pieces of rows: P[j][c] = W[j][c0 + c],
/// columns past k zero. `piece(j, c0, out)` writes W[j][c0 .. c0 + out.len()].
pub fn straight_panel<'a>(n: usize, k: usize, piece: impl Fn(usize, usize, &mut [f32]) + Sync + 'a) -> Box<Panel<'a>> {
    Box::new(move |c0: usize, nr: usize, p: &mut [f32], _buf: &mut Vec<f32>| {
        let cols = nr.min(k - c0);
        for (j, dst) in p.chunks_mut(nr).enumerate().take(n) {
            piece(j, c0, &mut dst[..cols]);
            dst[cols..].fill(0.0);
        }
    })
}

/// The portable tile, 4 x 16: plain loops the compiler vectorises with the target's baseline.
fn tile_portable(a: &[f32], l: usize, p: &[f32], c: &mut [f32]) {
    let mut acc = [[0f32; 16]; 4];
    for i in 0..l {
        let w = &p[i * 16..i * 16 + 16];
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = a[r * l + i];
            for (o, &wv) in acc.iter_mut().zip(w) {
                *o += x * wv;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        c[r * 16..r * 16 + 16].copy_from_slice(acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The AVX-512 tile, 8 x 32: per step of l, two 16-wide loads of the panel row and one
    /// broadcast per row of a feed 16 FMAs.
    ///
    /// # Safety
    /// The CPU has AVX-512F; a: [8, l], p: [l, 32], c: [8, 32] at least.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(a: &[f32], l: usize, p: &[f32], c: &mut [f32]) {
        let (ap, pp, cp) = (a.as_ptr(), p.as_ptr(), c.as_mut_ptr());
        let mut acc = [_mm512_setzero_ps(); 16];
        for i in 0..l {
            // SAFETY: i < l, so p[i 32 .. i 32 + 32] and a[r l + i] (r < 8) are in bounds.
            unsafe {
                let w0 = _mm512_loadu_ps(pp.add(i * 32));
                let w1 = _mm512_loadu_ps(pp.add(i * 32 + 16));
                for r in 0..8 {
                    let x = _mm512_set1_ps(*ap.add(r * l + i));
                    acc[2 * r] = _mm512_fmadd_ps(x, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(x, w1, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..8 {
            // SAFETY: c holds [8, 32].
            unsafe {
                _mm512_storeu_ps(cp.add(r * 32), acc[2 * r]);
                _mm512_storeu_ps(cp.add(r * 32 + 16), acc[2 * r + 1]);
            }
        }
    }

    /// The AVX2 tile, 4 x 16: two 8-wide loads of the panel row and one broadcast per row of a
    /// feed 8 FMAs per step of l.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; a: [4, l], p: [l, 16], c: [4, 16] at least.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(a: &[f32], l: usize, p: &[f32], c: &mut [f32]) {
        let (ap, pp, cp) = (a.as_ptr(), p.as_ptr(), c.as_mut_ptr());
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in 0..l {
            // SAFETY: i < l, so p[i 16 .. i 16 + 16] and a[r l + i] (r < 4) are in bounds.
            unsafe {
                let w0 = _mm256_loadu_ps(pp.add(i * 16));
                let w1 = _mm256_loadu_ps(pp.add(i * 16 + 8));
                for r in 0..4 {
                    let x = _mm256_set1_ps(*ap.add(r * l + i));
                    acc[2 * r] = _mm256_fmadd_ps(x, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(x, w1, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..4 {
            // SAFETY: c holds [4, 16].
            unsafe {
                _mm256_storeu_ps(cp.add(r * 16), acc[2 * r]);
                _mm256_storeu_ps(cp.add(r * 16 + 8), acc[2 * r + 1]);
            }
        }
    }
}
