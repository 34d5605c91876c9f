//! The pair GEMM's 32 x 32 block on AVX512-BF16 dot products (`vdpbf16ps`), for CPUs that have the
//! instruction and no AMX tiles (AMD Zen 4 and later). It reads the operands the tiles read
//! ([`super`]): A as 16-row tiles of 32 bf16 steps, P's panels in the pair layout, so the same
//! blocking, the same A and the same panels (NF4 decoded straight into pairs) serve both. Reference
//! twin: `model::cpu::linear`, as for every GEMM; the tests compare it there and with the FMA GEMM.
//!
//! One `vdpbf16ps` takes 16 f32 sums, 16 pairs of bf16 from A and 16 pairs from P, and adds each
//! lane's two products to its sum: 64 FLOPs. Zen 4 runs one per cycle on zmm, against one f32 zmm
//! FMA (32 FLOPs), so bf16 pairs double the GEMM's arithmetic rate there. (On Sapphire Rapids it is
//! one per two cycles, half its FMAs' rate; there the tiles run instead.)
//!
//! Register tile: 8 rows x 32 columns of sums (16 zmm). Per pair of steps: P's two 64-byte rows (one
//! per half of the panel: columns 0-15, 16-31), one 32-bit broadcast of A's pair per row, and 16 dot
//! products. A 32 x 32 block is four such passes over the panel, which lies in L2 (the unit's).
//!
//! Numerics: the tiles'. Products of bf16 are exact in f32, each pair's two are added, then summed in
//! f32 in order of L.
//!
//! Compiled for x86-64 only, as its parent [`super`] is.

use super::BlockArgs;
use std::arch::x86_64::*;

/// Rows of sums held in registers at once.
const ROWS: usize = 8;

/// Whether this CPU has AVX-512 with bf16 dot products.
pub fn ready() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// One 32 x 32 block of sums, as [`super`]'s tiles compute it: store = (load +) A[32, kc_pad]
/// P[kc_pad, 32], in four passes of 8 rows.
///
/// # Safety
/// The CPU has AVX-512F and AVX512_BF16 ([`ready`]); the args' A tiles (`steps` of each half of 16
/// rows), P's two halves ([steps 16][16][2] each), and the load and store rows (32 f32 each) are
/// valid, and no one else touches the stored rows during the call.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block(args: &BlockArgs) {
    // The sums start from zero where `load` is null (`load_lo` is then not read either).
    let halves = [
        (args.a, args.load, args.store),
        (args.a_lo, args.load_lo, args.store_lo),
    ];
    for (a, load, store) in halves {
        for part in 0..16 / ROWS {
            let a = a.wrapping_byte_add(part * ROWS * args.a_stride);
            let load = match args.load.is_null() {
                true => std::ptr::null(),
                false => load.wrapping_byte_add(part * ROWS * args.ld_load),
            };
            let store = store.wrapping_byte_add(part * ROWS * args.ld_store);
            // SAFETY: rows part 8 .. part 8 + 8 of this half lie inside the caller's.
            unsafe { rows(args, a as *const u8, load, store) };
        }
    }
}

/// Eight rows of a block: store[r] = (load[r] +) sum over steps of A[r] P, r < 8.
///
/// # Safety
/// As [`block`]'s, for these eight rows.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn rows(args: &BlockArgs, a: *const u8, load: *const f32, store: *mut f32) {
    // acc[r][h]: row r, columns 16 h .. 16 h + 16.
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    if !load.is_null() {
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the caller's load rows hold 32 f32 each, ld_load bytes apart.
            let row = unsafe { load.byte_add(r * args.ld_load) };
            // SAFETY: as above; unaligned loads.
            *acc = unsafe { [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))] };
        }
    }
    let (mut p0, mut p1) = (args.p as *const u8, args.p_hi as *const u8);
    let mut step = a;
    for _ in 0..args.steps {
        for i in 0..16 {
            // SAFETY: pair row i of this step lies in each half ([16][16][2] bf16 a step, 1 KB).
            let (b0, b1) = unsafe { (pair_row(p0.add(64 * i)), pair_row(p1.add(64 * i))) };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r's steps 2i, 2i + 1 of this tile: a_stride bytes a row, 4 a pair.
                let pair = unsafe { (step.add(r * args.a_stride + 4 * i) as *const i32).read_unaligned() };
                let av: __m512bh = bh(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        // SAFETY: the next step's tile of A and rows of P (past the last step these are never read).
        unsafe {
            p0 = p0.add(1024);
            p1 = p1.add(1024);
        }
        step = step.wrapping_add(args.a_step);
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's store rows hold 32 f32 each, ld_store bytes apart, and are ours.
        unsafe {
            let row = store.byte_add(r * args.ld_store);
            _mm512_storeu_ps(row, acc[0]);
            _mm512_storeu_ps(row.add(16), acc[1]);
        }
    }
}

/// One 64-byte row of a panel's half: 16 columns' pairs.
///
/// # Safety
/// p points at 64 readable bytes.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn pair_row(p: *const u8) -> __m512bh {
    // SAFETY: as the caller promises; an unaligned load.
    bh(unsafe { _mm512_loadu_si512(p as *const __m512i) })
}

/// 32 bf16 as the dot product's operand type (the same 512 bits).
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data; every bit pattern is a valid bf16 vector.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
