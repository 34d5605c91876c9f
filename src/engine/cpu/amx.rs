//! The GEMM on AMX tiles (Intel's Advanced Matrix Extensions, Sapphire Rapids and later), where the
//! CPU has them and the OS lets this process use them: C[t, N] = alpha A[t, L] P[L, N] (+ bias)
//! (+ C), the contract of [`super::gemm::gemm`]; [`super::matmul`] hands products here. Reference twin:
//! `model::cpu::linear`, as for the GEMM.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of A by a 32 x 16 bf16 tile of P into a 16 x 16
//! f32 tile of sums: 16,384 FLOPs per instruction. Measured on one core of the 2-core Sapphire Rapids
//! VM that runs CI: 1.47 TFLOP/s in a loop of independent tiles, against 0.23 for AVX-512 FMAs.
//!
//! The blocking is the GEMM's (chunks of NC columns, blocks of KC steps of L, units of MC rows by a
//! group of panels, threads over units), with tiles for registers:
//! - A's tiles are 16 rows of 64 bytes, read with the row stride: bf16 rows of A in place (L a
//!   multiple of 32), else A rounded to bf16 once per call into [t_pad, L_pad] (zero past t and L).
//! - P's panels of NR = 32 columns come from the caller's decoder in f32, as for the FMA path, and are
//!   rounded to bf16 in the pair layout the instruction reads: [2 halves][KC_pad / 2][16 columns][2
//!   steps of L] (so one 64-byte tile row holds 16 columns' two consecutive steps).
//! - Each 32 x 32 block of C is four tiles of sums (tmm0-3), fed by two tiles of A (tmm4-5) and two
//!   of P (tmm6-7): four products for four tile loads.
//!
//! Numerics: A and P are rounded to bf16 (P's NF4 values times their f32 scale, once), products are
//! exact in f32 and summed in f32, as on the GPU's bf16 tensor cores; each output is rounded once.

use super::gemm::{epilogue_row_on, panel_on, Epilogue, Lhs, PanelFn, Shared, Store, Widen, NC};
use super::isa::Isa;
use super::math::round_bf16;
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows and columns of one block of C: two tiles each way.
const MR: usize = 32;
const NR: usize = 32;
/// Steps of L per tile product (32 bf16: one 64-byte tile row).
const KT: usize = 32;
/// Rows of A per unit of work.
const MC: usize = 128;

/// Whether this CPU has AMX with bf16 and this process may use its tile registers (Linux grants
/// them on request, `arch_prctl(ARCH_REQ_XCOMP_PERM)`): asked once.
pub fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(detect)
}

/// Whether the GEMM runs on AMX: the AVX-512 path, AMX [`ready`], and `SQLORA_CPU_AMX` not `off`
/// (which keeps the FMA GEMM, to test or compare it on a CPU with AMX).
pub fn enabled(isa: Isa) -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("SQLORA_CPU_AMX").is_ok_and(|v| v == "off"));
    isa == Isa::Avx512 && ready() && !off
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // (cpuid is present on every x86-64 CPU: the intrinsic is safe.)
    let (leaf1, leaf7) = (__cpuid_count(1, 0), __cpuid_count(7, 0));
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    if !(osxsave && amx_bf16 && amx_tile) {
        return false;
    }
    let xcr0: u64 = {
        let (lo, hi): (u32, u32);
        // SAFETY: xgetbv with ecx = 0 reads XCR0; OSXSAVE (checked above) says the OS enabled it.
        unsafe { std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        (hi as u64) << 32 | lo as u64
    };
    // XTILECFG (bit 17) and XTILEDATA (bit 18) saved by the OS.
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    request_tiles()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Ask Linux for the tile data state: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, for the
/// whole process. Without it the first tile instruction would kill the process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with this request only changes which register state the
    // kernel saves for this process; it reads and writes no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        )
    };
    ret == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// Steps of L per block: as even as blocks of at most 1,024 allow (an A block of MC rows, 256 KB,
/// stays in L2; measured against 512: 700 → 820-860 GFLOP/s at Qwen's MLP shapes, 2 cores, as the
/// sums' tiles are loaded and stored half as often), a multiple of [`KT`].
fn kc_of(l: usize) -> usize {
    let blocks = l.div_ceil(1024).max(1);
    l.div_ceil(blocks).div_ceil(KT) * KT
}

/// A with at least this many values (32 MB in bf16) is read in place where it can be ([`TileRows`]).
const INPLACE_MIN: usize = 16 << 20;

/// [`super::gemm::gemm`] on AMX tiles; the caller has checked the operands and that [`enabled`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<A: Widen, O: Store, P: PanelFn>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: &P,
    ep: Epilogue,
    out: &mut [O],
) {
    gemm_in(isa, a, t, l, n, panel, ep, out, INPLACE_MIN)
}

/// [`gemm`], reading A in place when it has at least `inplace_min` values (tests take both ways).
#[allow(clippy::too_many_arguments)]
fn gemm_in<A: Widen, O: Store, P: PanelFn>(
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: &P,
    ep: Epilogue,
    out: &mut [O],
    inplace_min: usize,
) {
    assert!(
        enabled(isa) || (isa == Isa::Avx512 && ready()),
        "the AMX GEMM needs AMX"
    );
    let t_pad = t.div_ceil(MR) * MR;
    let kc_max = kc_of(l);
    let ldc = NC.min(n.div_ceil(NR) * NR);
    // A in bf16 rows of stride L_pad; [t_pad, ldc] sums of one chunk; [NC / NR] panels of
    // [2][KC / 2][16][2].
    let ab = TileRows::of(isa, a, t, l, inplace_min);
    let mut c = vec![0f32; t_pad * ldc];
    let mut pb = vec![bf16::ZERO; kc_max * ldc];
    let mc = t_pad.div_ceil(t_pad.div_ceil(MC)).div_ceil(MR) * MR;
    let row_blocks = t_pad.div_ceil(mc);
    let dst = Shared(out.as_mut_ptr());
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(NR);
        let want = 4 * rayon::current_num_threads();
        let groups = want.div_ceil(row_blocks).min(panels).max(1);
        let per_group = panels.div_ceil(groups);
        for l0 in (0..l).step_by(kc_max) {
            let kc = kc_max.min(l - l0);
            let kc_pad = kc.div_ceil(KT) * KT;
            pb[..panels * kc_pad * NR]
                .par_chunks_mut(kc_pad * NR)
                .enumerate()
                .for_each_init(
                    || vec![0f32; kc_max * NR],
                    |f, (pi, p)| {
                        panel_on(isa, panel, jc + pi * NR, NR, l0, &mut f[..kc * NR]);
                        pairs_on(isa, &f[..kc * NR], kc, p);
                    },
                );
            let cs = Shared(c.as_mut_ptr());
            (0..row_blocks * groups).into_par_iter().for_each(|u| {
                let (rb, g) = (u / groups, u % groups);
                let rows = rb * mc..((rb + 1) * mc).min(t_pad);
                let _tiles = Tiles::configure();
                for pi in g * per_group..((g + 1) * per_group).min(panels) {
                    let p = &pb[pi * kc_pad * NR..(pi + 1) * kc_pad * NR];
                    for r0 in rows.clone().step_by(MR) {
                        // SAFETY: the tiles are configured on this thread (`_tiles`); A's rows r0 ..
                        // r0 + 32 lie inside ab (`TileRows::row` checks), and steps l0 .. l0 + kc_pad
                        // inside each row (its stride is L_pad >= l0 + kc_pad); p holds
                        // [2][kc_pad / 2][16][2]; rows r0 .. r0 + 32 and columns pi NR .. + 32 of c
                        // ([t_pad, ldc]) belong to this unit alone.
                        unsafe {
                            block(
                                ab.row(r0).add(l0),
                                ab.ld,
                                p.as_ptr(),
                                kc_pad,
                                cs.at(r0 * ldc + pi * NR),
                                ldc,
                                l0 > 0,
                            )
                        };
                    }
                }
            });
        }
        c[..t * ldc].par_chunks(ldc).enumerate().for_each(|(r, cr)| {
            // SAFETY: row r's columns jc .. jc + nc of out belong to this iteration alone.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n + jc), nc) };
            epilogue_row_on(isa, o, &cr[..nc], ep.bias.map(|b| &b[jc..jc + nc]), ep)
        });
    }
}

/// A as the tiles read it: bf16 rows of stride `ld` = L_pad, as many as t_pad. Whole blocks of 32
/// rows are read in place when A is bf16 by rows, L a multiple of 32 and A has at least
/// `inplace_min` values; the rest is rounded into a buffer (cache-line aligned), zero past t and L.
/// Packing costs a pass over A but was measured faster for A of 1-10 MB (the projections' inputs and
/// gradients at t = 1,024: 1,000-1,020 against 690-790 GFLOP/s in three of four shapes, 960 against
/// 1,110 in the fourth); in place saves copying the head's gradient (256 rows x 151,936: 78 MB, 4
/// times a step; the head's backward 856 → 506 ms per step).
struct TileRows<'a> {
    inplace: &'a [bf16],
    /// Rows read in place: a multiple of 32.
    t_in: usize,
    /// Rows t_in .. t_pad: [t_pad - t_in, ld], from `off` (the first cache-line boundary).
    packed: Vec<bf16>,
    off: usize,
    ld: usize,
}

impl<'a> TileRows<'a> {
    fn of<A: Widen>(isa: Isa, a: Lhs<'a, A>, t: usize, l: usize, inplace_min: usize) -> TileRows<'a> {
        let (t_pad, ld) = (t.div_ceil(MR) * MR, l.div_ceil(KT) * KT);
        let inplace = match a {
            Lhs::Rows(rows) if l.is_multiple_of(KT) && t * l >= inplace_min => A::as_bf16(rows).unwrap_or(&[]),
            _ => &[],
        };
        let t_in = if inplace.is_empty() { 0 } else { t / MR * MR };
        // 32 more values than needed, so that the rows can start on a cache line.
        let mut packed = vec![bf16::ZERO; (t_pad - t_in) * ld + 32];
        let off = packed.as_ptr().align_offset(64).min(32);
        packed[off..]
            .par_chunks_mut(ld)
            .take(t - t_in)
            .enumerate()
            .for_each(|(r, row)| a_row_on(isa, a, t, l, t_in + r, &mut row[..l]));
        TileRows {
            inplace,
            t_in,
            packed,
            off,
            ld,
        }
    }

    /// The first value of row r0 (a multiple of 32), whose 32 rows at stride `ld` lie in one part.
    fn row(&self, r0: usize) -> *const bf16 {
        debug_assert!(r0.is_multiple_of(MR));
        if r0 < self.t_in {
            assert!((r0 + MR) * self.ld <= self.inplace.len());
            self.inplace[r0 * self.ld..].as_ptr()
        } else {
            assert!(self.off + (r0 - self.t_in + MR) * self.ld <= self.packed.len());
            self.packed[self.off + (r0 - self.t_in) * self.ld..].as_ptr()
        }
    }
}

/// Row r of A, rounded to bf16. out: [L].
#[inline(always)]
fn a_row<A: Widen>(a: Lhs<A>, t: usize, l: usize, r: usize, out: &mut [bf16]) {
    match a {
        Lhs::Rows(a) => out
            .iter_mut()
            .zip(&a[r * l..(r + 1) * l])
            .for_each(|(o, v)| *o = round_bf16(v.widen())),
        Lhs::Cols(a) => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = round_bf16(a[i * t + r].widen())),
    }
}

/// An f32 panel [kc][NR] in the pair layout of the tiles: p[((h KCP/2 + i) 16 + c) 2 + e] =
/// f[(2i + e) NR + 16h + c], zero for steps past kc. p: [2][kc_pad / 2][16][2].
#[inline(always)]
fn pairs(f: &[f32], kc: usize, p: &mut [bf16]) {
    const ZERO: [f32; NR] = [0.0; NR];
    let (lo, hi) = p.split_at_mut(p.len() / 2);
    for (i, (lo, hi)) in lo.chunks_exact_mut(32).zip(hi.chunks_exact_mut(32)).enumerate() {
        let row = |k: usize| if k < kc { &f[k * NR..(k + 1) * NR] } else { &ZERO[..] };
        let (r0, r1) = (row(2 * i), row(2 * i + 1));
        for (h, out) in [lo, hi].into_iter().enumerate() {
            // One 64-byte tile row: 16 columns, each its two steps as one 32-bit word (low half the
            // even step), built in u32 lanes so that the loop vectorises, then stored whole.
            let mut words = [0u32; 16];
            for (c, w) in words.iter_mut().enumerate() {
                let (a, b) = (round_bf16(r0[16 * h + c]), round_bf16(r1[16 * h + c]));
                *w = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
            }
            assert_eq!(out.len(), 32);
            // SAFETY: out holds 32 bf16 (64 bytes, checked), words 16 u32 (64 bytes); on x86 (little
            // endian) each word's low half lands first, as the layout wants; byte copies need no
            // alignment.
            unsafe { std::ptr::copy_nonoverlapping(words.as_ptr() as *const u8, out.as_mut_ptr() as *mut u8, 64) };
        }
    }
}

crate::multiversion! {
    /// [`a_row`] on a path.
    fn a_row_on<A: Widen>(a: Lhs<A>, t: usize, l: usize, r: usize, out: &mut [bf16]) => a_row
}

crate::multiversion! {
    /// [`pairs`] on a path.
    fn pairs_on(f: &[f32], kc: usize, p: &mut [bf16]) => pairs
}

/// The tile configuration of this module, loaded on the current thread while it lives; the tiles
/// are released when it drops.
struct Tiles;

/// The 64-byte tile configuration: palette 1; tmm0-7 each 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Tiles {
    fn configure() -> Tiles {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for tile in 0..8 {
            cfg.0[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            cfg.0[48 + tile] = 16;
        }
        // SAFETY: AMX is ready (checked by `gemm`'s caller) and cfg is a valid 64-byte palette-1
        // configuration, aligned.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{}]",
                in(reg) cfg.0.as_ptr(),
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, readonly)
            )
        };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure` on this thread.
        unsafe {
            std::arch::asm!(
                "tilerelease",
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, nomem)
            )
        };
    }
}

/// Run `iters` rounds of four independent tile products (tmm0-3 += tmm4-5 x tmm6-7, tiles of bf16
/// 1.0 and 2^-20, so the sums stay finite) on this thread: the FLOPs done (16,384 per product).
/// What the CPU's bf16 peak is measured with where the GEMM runs on tiles ([`super::peak`]).
pub fn tile_loop(iters: u64) -> u64 {
    assert!(ready(), "the tile loop needs AMX");
    let ones = [bf16::ONE; 16 * 32];
    let small = [bf16::from_f32(1.0 / 1048576.0); 16 * 32];
    let _tiles = Tiles::configure();
    // SAFETY: the tiles are configured on this thread; each load reads 16 rows of 64 bytes of one
    // of the two 1 KB arrays (row stride 64).
    unsafe {
        std::arch::asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm5, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1]", "tileloadd tmm7, [{b} + {s}*1]",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}", "jnz 2b",
            a = in(reg) ones.as_ptr(), b = in(reg) small.as_ptr(), s = in(reg) 64usize,
            n = inout(reg) iters.max(1) => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack, readonly)
        )
    };
    iters.max(1) * 4 * 16 * 16 * 32 * 2
}

/// One 32 x 32 block of sums: c (+)= A[32, kc_pad] P[kc_pad, 32], adding to c when `load`.
///
/// a: the block's first row of A (bf16, row stride lda elements); p: the panel in pair layout,
/// [2][kc_pad / 2][16][2]; c: the block's first sum (f32, row stride ldc elements).
///
/// # Safety
/// The tiles are configured on this thread ([`Tiles`]); a holds 32 rows of kc_pad values at stride
/// lda, p holds kc_pad x 32 values, and c 32 rows of 32 values at stride ldc that no one else
/// touches during the call; kc_pad is a positive multiple of 32.
unsafe fn block(a: *const bf16, lda: usize, p: *const bf16, kc_pad: usize, c: *mut f32, ldc: usize, load: bool) {
    let (lda, ldc) = (lda * 2, ldc * 4);
    let c_lo = c.wrapping_add(16 * (ldc / 4));
    let a_lo = a.wrapping_add(16 * (lda / 2));
    let p_hi = p.wrapping_add(kc_pad / 2 * 32);
    let steps = kc_pad / KT;
    // SAFETY: as the caller promises. The sums' four tiles are loaded (or zeroed), each step reads
    // A's two tiles 64 bytes further along their rows and P's two tiles 16 rows (1,024 bytes)
    // further down each half, and the sums are stored back: one asm block, so no tile register has
    // to keep its value between blocks (every one is declared clobbered).
    unsafe {
        std::arch::asm!(
            "test {load}, {load}",
            "jz 3f",
            "tileloadd tmm0, [{c} + {ldc}*1]",
            "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{cl} + {ldc}*1]",
            "tileloadd tmm3, [{cl} + {ldc}*1 + 64]",
            "jmp 2f",
            "3:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm5, [{al} + {lda}*1]",
            "tileloadd tmm6, [{p} + {s64}*1]",
            "tileloadd tmm7, [{ph} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 64",
            "add {al}, 64",
            "add {p}, 1024",
            "add {ph}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            "tilestored [{cl} + {ldc}*1], tmm2",
            "tilestored [{cl} + {ldc}*1 + 64], tmm3",
            load = in(reg) load as usize,
            c = in(reg) c, cl = in(reg) c_lo, ldc = in(reg) ldc,
            a = inout(reg) a => _, al = inout(reg) a_lo => _,
            p = inout(reg) p => _, ph = inout(reg) p_hi => _,
            lda = in(reg) lda, s64 = in(reg) 64usize, n = inout(reg) steps => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        );
    }
}

#[cfg(test)]
mod tests;
