//! The GEMM on bf16 pairs, where the CPU multiplies them in hardware: C[t, N] = alpha A[t, L] P[L, N]
//! (+ bias) (+ C), the contract of [`super::gemm::gemm`]; [`super::matmul`] hands products here.
//! Reference twin: `model::cpu::linear`, as for the GEMM. Two kernels compute its 32 x 32 blocks
//! ([`Kernel`]) from the same operands:
//! - AMX tiles (Intel Sapphire Rapids and later): one `tdpbf16ps` multiplies a 16 x 32 bf16 tile of A
//!   by a 32 x 16 bf16 tile of P into a 16 x 16 f32 tile of sums, 16,384 FLOPs per instruction.
//!   Measured on one core of the 2-core Sapphire Rapids VM: 3.1-3.4 TFLOP/s in a loop of
//!   independent tiles, against 0.2 for AVX-512 FMAs.
//! - AVX512-BF16 dot products (`vdpbf16ps`, AMD Zen 4 and later), twice the FMAs' rate there
//!   ([`dots`]).
//!
//! Blocking (measured first on a loop of tile loads and products, one core: operands from L1 run at
//! the peak, from L2 at ~70%, from L3 at 13% on this VM, so no operand may come from L3 twice):
//! - A unit of work owns a group of P's panels (NR = 32 columns), decodes them into its own buffer,
//!   rounded to bf16 in the pair layout the instructions read ([2 halves][KC / 2][16 columns][2
//!   steps of L]), and runs every 32 rows of A past them while they sit in its core's L2.
//! - A is rounded to bf16 once per call and packed as tiles, 16 rows x 32 steps in 1 KB, so that a
//!   tile load reads one contiguous KB (bf16 rows of A too large to copy are read in place).
//! - Each 32 x 32 block of C is four tiles of sums (tmm0-3), fed by two tiles of A (tmm4-5) and two
//!   of P (tmm6-7): four products for four tile loads; the tiles two steps on are prefetched.
//! - L is one block wherever a panel of all of L fits the unit's buffer: the sums then leave the
//!   tiles once, through a 4 KB scratch, straight into `out`.
//!
//! Numerics: A and P are rounded to bf16 (P's NF4 values times their f32 scale, once), products are
//! exact in f32 and summed in f32, as on the GPU's bf16 tensor cores; each output is rounded once.

use super::gemm::{epilogue_row, panel_on, Epilogue, Lhs, PanelFn, Shared, Store, Widen};
use super::isa::Isa;
use super::math::round_bf16;
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

pub mod dots;

/// Rows and columns of one block of C: two tiles each way.
const MR: usize = 32;
const NR: usize = 32;
/// Steps of L per tile product (32 bf16: one 64-byte tile row).
const KT: usize = 32;

/// What multiplies the pairs in a 32 x 32 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tile products (`tdpbf16ps`).
    Tiles,
    /// AVX512-BF16 dot products (`vdpbf16ps`), [`dots`].
    Dots,
}

impl Kernel {
    /// Whether this CPU and process can run the kernel.
    pub fn usable(self) -> bool {
        match self {
            Kernel::Tiles => ready(),
            Kernel::Dots => dots::ready(),
        }
    }

    /// The kernels this CPU and process can run, the faster first.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Tiles, Kernel::Dots]
            .into_iter()
            .filter(|k| k.usable())
            .collect()
    }

    /// The sizes this kernel blocks with: a unit's panels stay in its core's L2 (2 MB a core on
    /// Sapphire Rapids, 1 MB on Zen 4).
    fn tune(self) -> Tune {
        match self {
            Kernel::Tiles => TUNE,
            Kernel::Dots => Tune {
                panel_bytes: 512 << 10,
                ..TUNE
            },
        }
    }
}

/// Whether this CPU has AMX with bf16 and this process may use its tile registers (Linux grants
/// them on request, `arch_prctl(ARCH_REQ_XCOMP_PERM)`): asked once.
pub fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(detect)
}

/// The kernel the GEMM runs on `isa`, or None for the path's FMA GEMM. On the AVX-512 path: the
/// tiles where AMX is [`ready`], else dot products where the CPU has them (not on a CPU with AMX
/// unless asked: there they run at half the FMAs' rate). `SQLORA_CPU_GEMM` chooses: `fma` (the FMA
/// GEMM, to test or compare it), `dots` or `tiles` (where available), else the default.
/// Decided once: every GEMM call asks.
pub fn kernel(isa: Isa) -> Option<Kernel> {
    static CHOICE: OnceLock<Option<Kernel>> = OnceLock::new();
    let choice = CHOICE.get_or_init(|| {
        let have = Kernel::available();
        match std::env::var("SQLORA_CPU_GEMM").ok().as_deref() {
            Some("fma") => None,
            Some("dots") if Kernel::Dots.usable() => Some(Kernel::Dots),
            Some("tiles") if Kernel::Tiles.usable() => Some(Kernel::Tiles),
            _ => have.first().copied(),
        }
    });
    if isa == Isa::Avx512 {
        *choice
    } else {
        None
    }
}

/// Whether the GEMM runs on AMX tiles ([`kernel`]).
pub fn enabled(isa: Isa) -> bool {
    kernel(isa) == Some(Kernel::Tiles)
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

/// Panels per unit of work and steps of L per block, for N's `panels` of NR columns. A unit's panels
/// stay in its core's L2 in `panel_bytes`. Where one panel of the whole of L fits, L is one block
/// (the sums leave the tiles once) and a unit takes as many panels as fit, but no more than leave
/// two units per thread: the largest such size whose busiest thread, when the threads share the
/// units out, has at most 1/8 more panels than the best size's (larger units read A fewer times).
/// So 6 panels on 2 threads go as 6 units of 1 (3 panels a thread), not 3 of 2 (4 panels on one
/// thread); Qwen's 152 panels in 512 KB as 17 units of 9 (81 panels on the busier thread, against
/// 76 with units of 4, which would read A twice as often). Else (the head's gradient:
/// L = 151,936) a unit takes its share of panels for two units per thread, and L goes in even
/// blocks that fill `panel_bytes` (a multiple of [`KT`]).
fn blocking(panels: usize, l: usize, threads: usize, panel_bytes: usize) -> (usize, usize) {
    let l_pad = l.div_ceil(KT) * KT;
    let per_panel = l_pad * NR * 2;
    let share = panels.div_ceil(2 * threads).max(1);
    if per_panel <= panel_bytes {
        let most = share.min(panel_bytes / per_panel).max(1);
        // Panels on the busiest thread when units of g panels are shared out.
        let span = |g: usize| panels.div_ceil(g).div_ceil(threads) * g;
        let best = (1..=most).map(span).min().unwrap_or(1);
        let group = (1..=most).rev().find(|&g| span(g) * 8 <= best * 9).unwrap_or(1);
        return (group, l_pad);
    }
    let kc_fit = (panel_bytes / (share * NR * 2) / KT * KT).max(KT);
    let blocks = l.div_ceil(kc_fit);
    (share, l.div_ceil(blocks).div_ceil(KT) * KT)
}

/// A source of P's panels for the tiles.
pub trait Panels: Sync {
    /// Columns j0 .. j0 + NR and steps l0 .. l0 + kc of P in pair layout, zero past N and kc: p
    /// [2][kc_pad / 2][16][2]. f: scratch for a route through f32, [kc_max, NR].
    fn pairs(&self, isa: Isa, j0: usize, l0: usize, kc: usize, p: &mut [bf16], f: &mut [f32]);
}

/// The panels of a decoder of f32 panels (the FMA GEMM's [`PanelFn`]), rounded into pairs.
pub(crate) struct FromF32<'a, P>(pub &'a P);

impl<P: PanelFn> Panels for FromF32<'_, P> {
    fn pairs(&self, isa: Isa, j0: usize, l0: usize, kc: usize, p: &mut [bf16], f: &mut [f32]) {
        let f = &mut f[..kc * NR];
        panel_on(isa, self.0, j0, NR, l0, f);
        pairs_on(isa, f, kc, p);
    }
}

/// The sizes [`gemm`] blocks with; tests take smaller ones, to reach every path at small sizes.
#[derive(Clone, Copy)]
struct Tune {
    /// A with at least this many values is read in place where it can be ([`TileRows`]).
    inplace_min: usize,
    /// The most bytes of panels a unit of work decodes at once ([`blocking`]).
    panel_bytes: usize,
}

/// A read in place from 16M values (32 MB in bf16); panels in 1 MB (measured against 512 KB at
/// Qwen's MLP shapes: 1,040-1,300 against 820-1,280 GFLOP/s, as smaller groups read A more often).
const TUNE: Tune = Tune {
    inplace_min: 16 << 20,
    panel_bytes: 1 << 20,
};

/// [`super::gemm::gemm`] on `kernel`; the caller has checked the operands and that the kernel is
/// [`usable`](Kernel::usable).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<A: Widen, O: Store, P: Panels>(
    kernel: Kernel,
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: &P,
    ep: Epilogue,
    out: &mut [O],
) {
    gemm_in(kernel, isa, a, t, l, n, panel, ep, out, kernel.tune())
}

/// [`gemm`], blocked by `tune`.
///
/// Units of work are groups of panels (columns of C). A unit decodes its panels, for one block of
/// L at a time, into its own buffer, where they stay (in its core's L2) while every 32 rows of A go
/// past them, each block of A's rows (from L2 after its first panel) against each panel. Measured
/// on a tile loop: tiles read from L1 run at the peak, from L2 at 70-75% of it, from L3 (on this
/// VM) at 13-28%, so what matters is that no operand comes from L3 more than once. Where L takes one
/// block, the sums go from the tiles through a 4 KB scratch straight to `out`; otherwise the unit
/// keeps them between blocks in its [t_pad, group NR] buffer.
#[allow(clippy::too_many_arguments)]
fn gemm_in<A: Widen, O: Store, P: Panels>(
    kernel: Kernel,
    isa: Isa,
    a: Lhs<A>,
    t: usize,
    l: usize,
    n: usize,
    panel: &P,
    ep: Epilogue,
    out: &mut [O],
    tune: Tune,
) {
    assert!(
        isa == Isa::Avx512 && kernel.usable(),
        "the pair GEMM's {kernel:?} need the AVX-512 path and a CPU that has them"
    );
    assert!(
        l > 0,
        "the AMX GEMM needs L > 0 (the FMA GEMM writes the epilogue of empty sums)"
    );
    let t_pad = t.div_ceil(MR) * MR;
    let panels = n.div_ceil(NR);
    let (group, kc_max) = blocking(panels, l, rayon::current_num_threads(), tune.panel_bytes);
    let ab = TileRows::of(isa, a, t, l, tune.inplace_min);
    let dst = Shared(out.as_mut_ptr());
    (0..panels.div_ceil(group)).into_par_iter().for_each_init(
        || Unit::new(t_pad, group, kc_max, l),
        |unit, g| {
            let _tiles = (kernel == Kernel::Tiles).then(Tiles::configure);
            let first = g * group;
            let mine = group.min(panels - first);
            let ldc = group * NR;
            for l0 in (0..l).step_by(kc_max) {
                let kc = kc_max.min(l - l0);
                let kc_pad = kc.div_ceil(KT) * KT;
                let last = l0 + kc == l;
                // This block of L of the unit's panels, [mine][2][kc_pad / 2][16][2].
                for (q, p) in unit.pb.chunks_mut(kc_pad * NR).take(mine).enumerate() {
                    panel.pairs(isa, (first + q) * NR, l0, kc, p, &mut unit.f);
                }
                for r0 in (0..t_pad).step_by(MR) {
                    let (a0, a_stride, a_step) = ab.at(r0, l0);
                    for q in 0..mine {
                        let p = &unit.pb[q * kc_pad * NR..(q + 1) * kc_pad * NR];
                        let sums = unit.c.as_mut_ptr().wrapping_add(r0 * ldc + q * NR);
                        let (store, ld_store) = match last {
                            true => (unit.scratch.0.as_mut_ptr(), NR),
                            false => (sums, ldc),
                        };
                        let args = BlockArgs {
                            a: a0,
                            a_lo: a0.wrapping_add(16 * ab.ld),
                            a_stride: a_stride * 2,
                            a_step: a_step * 2,
                            p: p.as_ptr(),
                            p_hi: p.as_ptr().wrapping_add(kc_pad / 2 * 32),
                            steps: kc_pad / KT,
                            load: if l0 > 0 { sums } else { std::ptr::null_mut() },
                            load_lo: sums.wrapping_add(16 * ldc),
                            ld_load: ldc * 4,
                            store,
                            store_lo: store.wrapping_add(16 * ld_store),
                            ld_store: ld_store * 4,
                        };
                        // SAFETY: the kernel is available (asserted above) and, for the tiles,
                        // configured on this thread (`_tiles`); A's rows r0 ..
                        // r0 + 32 and steps l0 .. l0 + kc_pad lie inside ab (`TileRows::at` checks);
                        // p holds [2][kc_pad / 2][16][2]; the sums (read when l0 > 0, and written
                        // unless `last`: rows r0 .. r0 + 32, columns q NR .. + 32 of the unit's c,
                        // which holds [t_pad, ldc] whenever L takes more than one block) and the
                        // scratch are this unit's.
                        match kernel {
                            Kernel::Tiles => unsafe { block(&args) },
                            Kernel::Dots => unsafe { dots::block(&args) },
                        }
                        if last && r0 < t {
                            let (j0, cols) = ((first + q) * NR, NR.min(n - (first + q) * NR));
                            let bias = ep.bias.map(|b| &b[j0..j0 + cols]);
                            let rows = MR.min(t - r0);
                            // SAFETY: rows r0 .. r0 + rows, columns j0 .. j0 + cols of out lie inside
                            // [t, N] and belong to this unit alone (its panels); the AVX-512 path is
                            // the AMX GEMM's (`enabled`).
                            unsafe { block_out(dst.at(r0 * n + j0), n, rows, cols, &unit.scratch, bias, ep) };
                        }
                    }
                }
            }
        },
    );
}

/// What a unit of work writes: its panels in pair layout ([group][2][KC / 2][16][2]), one panel in
/// f32 on the way there ([KC][NR]), the sums between blocks of L ([t_pad, group NR], empty when L
/// takes one block) and one block's sums on their way to `out`.
struct Unit {
    pb: Vec<bf16>,
    f: Vec<f32>,
    c: Vec<f32>,
    scratch: Box<Scratch>,
}

impl Unit {
    fn new(t_pad: usize, group: usize, kc_max: usize, l: usize) -> Unit {
        Unit {
            pb: vec![bf16::ZERO; group * kc_max * NR],
            f: vec![0.0; kc_max * NR],
            c: if kc_max < l {
                vec![0.0; t_pad * group * NR]
            } else {
                Vec::new()
            },
            scratch: Box::new(Scratch([0.0; MR * NR])),
        }
    }
}

/// out[r n + c] = the epilogue of sums[r NR + c], for r < rows and c < cols: one block's sums from
/// the scratch into `out`, rounded once.
///
/// # Safety
/// The CPU has AVX-512 (F, BW, DQ, VL); out holds `rows` rows of `cols` values at stride n that no
/// one else touches during the call; bias (if any) holds cols values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn block_out<O: Store>(
    out: *mut O,
    n: usize,
    rows: usize,
    cols: usize,
    sums: &Scratch,
    bias: Option<&[f32]>,
    ep: Epilogue,
) {
    for (r, s) in sums.0.chunks_exact(NR).take(rows).enumerate() {
        // SAFETY: row r's cols values are the caller's to write.
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(r * n), cols) };
        epilogue_row(o, &s[..cols], bias, ep);
    }
}

/// One 32 x 32 block's sums on their way from the tiles to `out`.
#[repr(C, align(64))]
struct Scratch([f32; MR * NR]);

/// A as the tiles read it, t_pad rows of L_pad = `ld` steps (zero past t and L), in two parts:
/// - rows 0 .. t_in (whole blocks of 32) read in place, by rows (stride `ld`), when A is bf16 by
///   rows, L a multiple of 32 and A has at least `inplace_min` values;
/// - the rest rounded into a buffer as whole tiles, each 16 rows x 32 steps contiguous (1 KB, from a
///   cache-line boundary), a group of 16 rows' tiles in order of L: [(t_pad - t_in) / 16][ld /
///   32][16][32]. Tile loads then read 1 KB in a row, which the prefetchers follow, instead of 16
///   lines `ld` apart.
///
/// Packing costs a pass over A; in place saves copying the head's gradient (256 rows x 151,936: 78
/// MB, 4 times a step; the head's backward 856 → 506 ms per step).
struct TileRows<'a> {
    inplace: &'a [bf16],
    /// Rows read in place: a multiple of 32.
    t_in: usize,
    /// Rows t_in .. t_pad as tiles, from `off` (the first cache-line boundary).
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
        // 32 more values than needed, so that the tiles can start on a cache line.
        let mut packed = vec![bf16::ZERO; (t_pad - t_in) * ld + 32];
        let off = packed.as_ptr().align_offset(64).min(32);
        let groups = (t.saturating_sub(t_in)).div_ceil(16);
        packed[off..]
            .par_chunks_mut(16 * ld)
            .take(groups)
            .enumerate()
            .for_each_init(
                || vec![bf16::ZERO; ld],
                |row, (g, tiles)| {
                    for rr in 0..16.min(t - t_in - 16 * g) {
                        a_row_on(isa, a, t, l, t_in + 16 * g + rr, &mut row[..l]);
                        for (s, step) in row.chunks_exact(KT).enumerate() {
                            tiles[s * 16 * KT + rr * KT..][..KT].copy_from_slice(step);
                        }
                    }
                },
            );
        TileRows {
            inplace,
            t_in,
            packed,
            off,
            ld,
        }
    }

    /// Where the tiles of rows r0 .. r0 + 32 (r0 a multiple of 32) start at step l0 (a multiple of
    /// 32): the first value, the stride between a tile's rows and the distance from one step's tile
    /// to the next, in values. The lower 16 rows' tile is always 16 `ld` values on.
    fn at(&self, r0: usize, l0: usize) -> (*const bf16, usize, usize) {
        debug_assert!(r0.is_multiple_of(MR) && l0.is_multiple_of(KT));
        if r0 < self.t_in {
            assert!((r0 + MR) * self.ld <= self.inplace.len());
            (self.inplace[r0 * self.ld + l0..].as_ptr(), self.ld, KT)
        } else {
            assert!(self.off + (r0 - self.t_in + MR) * self.ld <= self.packed.len());
            (
                self.packed[self.off + (r0 - self.t_in) * self.ld + 16 * l0..].as_ptr(),
                KT,
                16 * KT,
            )
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

/// Where [`block`] (and [`dots::block`]) reads and writes; strides and steps in bytes.
#[repr(C)]
pub(super) struct BlockArgs {
    /// The first value of A's upper and lower 16 rows' tiles (bf16); a tile's rows are `a_stride`
    /// apart, and the next step's tile `a_step` on.
    pub(super) a: *const bf16,
    pub(super) a_lo: *const bf16,
    pub(super) a_stride: usize,
    pub(super) a_step: usize,
    /// The panel's two halves (bf16, [kc_pad / 2][16][2] each).
    pub(super) p: *const bf16,
    pub(super) p_hi: *const bf16,
    /// Tile products per pair of tiles: kc_pad / 32, at least 1.
    pub(super) steps: usize,
    /// Sums to start from (f32, rows of 32 `ld_load` apart: upper 16 at `load`, lower 16 at
    /// `load_lo`), or null to start from zero.
    pub(super) load: *const f32,
    pub(super) load_lo: *const f32,
    pub(super) ld_load: usize,
    /// Where the sums go, likewise.
    pub(super) store: *mut f32,
    pub(super) store_lo: *mut f32,
    pub(super) ld_store: usize,
}

// The asm reads the fields at these offsets.
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(BlockArgs, a_lo) == 8 && offset_of!(BlockArgs, a_step) == 24);
    assert!(offset_of!(BlockArgs, p) == 32 && offset_of!(BlockArgs, steps) == 48);
    assert!(offset_of!(BlockArgs, load) == 56 && offset_of!(BlockArgs, load_lo) == 64);
    assert!(offset_of!(BlockArgs, ld_load) == 72 && offset_of!(BlockArgs, store) == 80);
    assert!(offset_of!(BlockArgs, store_lo) == 88 && offset_of!(BlockArgs, ld_store) == 96);
};

/// One 32 x 32 block of sums: store = (load +) A[32, kc_pad] P[kc_pad, 32].
///
/// # Safety
/// The tiles are configured on this thread ([`Tiles`]); the args' A tiles (`steps` of each half),
/// P's two halves, and the load and store rows (32 f32 each) are valid, and no one else touches the
/// stored rows during the call.
unsafe fn block(args: &BlockArgs) {
    // SAFETY: as the caller promises. The sums' four tiles are loaded (or zeroed), each step reads
    // A's two tiles `a_step` further on and P's two tiles 16 rows (1,024 bytes) further down each
    // half, and the sums are stored: one asm block, so no tile register has to keep its value
    // between blocks (every one is declared clobbered). Offsets into BlockArgs: 8 bytes a field.
    unsafe {
        std::arch::asm!(
            "mov {x}, [{args} + 56]",
            "test {x}, {x}",
            "jz 3f",
            "mov {y}, [{args} + 72]",
            "tileloadd tmm0, [{x} + {y}*1]",
            "tileloadd tmm1, [{x} + {y}*1 + 64]",
            "mov {x}, [{args} + 64]",
            "tileloadd tmm2, [{x} + {y}*1]",
            "tileloadd tmm3, [{x} + {y}*1 + 64]",
            "jmp 4f",
            "3:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "4:",
            "mov {x}, [{args}]",
            "mov {y}, [{args} + 8]",
            "mov {ast}, [{args} + 16]",
            "mov {adv}, [{args} + 24]",
            "mov {p}, [{args} + 32]",
            "mov {ph}, [{args} + 40]",
            "mov {n}, [{args} + 48]",
            "mov {s64}, 64",
            "2:",
            // The tiles two steps on, into L1: P's always, A's where it is packed as tiles (1 KB
            // each, `adv` 1,024 bytes apart).
            "prefetcht0 [{p} + 2048]",
            "prefetcht0 [{ph} + 2048]",
            "prefetcht0 [{p} + 2112]",
            "prefetcht0 [{ph} + 2112]",
            "prefetcht0 [{p} + 2176]",
            "prefetcht0 [{ph} + 2176]",
            "prefetcht0 [{p} + 2240]",
            "prefetcht0 [{ph} + 2240]",
            "prefetcht0 [{p} + 2304]",
            "prefetcht0 [{ph} + 2304]",
            "prefetcht0 [{p} + 2368]",
            "prefetcht0 [{ph} + 2368]",
            "prefetcht0 [{p} + 2432]",
            "prefetcht0 [{ph} + 2432]",
            "prefetcht0 [{p} + 2496]",
            "prefetcht0 [{ph} + 2496]",
            "prefetcht0 [{p} + 2560]",
            "prefetcht0 [{ph} + 2560]",
            "prefetcht0 [{p} + 2624]",
            "prefetcht0 [{ph} + 2624]",
            "prefetcht0 [{p} + 2688]",
            "prefetcht0 [{ph} + 2688]",
            "prefetcht0 [{p} + 2752]",
            "prefetcht0 [{ph} + 2752]",
            "prefetcht0 [{p} + 2816]",
            "prefetcht0 [{ph} + 2816]",
            "prefetcht0 [{p} + 2880]",
            "prefetcht0 [{ph} + 2880]",
            "prefetcht0 [{p} + 2944]",
            "prefetcht0 [{ph} + 2944]",
            "prefetcht0 [{p} + 3008]",
            "prefetcht0 [{ph} + 3008]",
            "cmp {adv}, 1024",
            "jne 5f",
            "prefetcht0 [{x} + {adv}*2 + 0]",
            "prefetcht0 [{y} + {adv}*2 + 0]",
            "prefetcht0 [{x} + {adv}*2 + 64]",
            "prefetcht0 [{y} + {adv}*2 + 64]",
            "prefetcht0 [{x} + {adv}*2 + 128]",
            "prefetcht0 [{y} + {adv}*2 + 128]",
            "prefetcht0 [{x} + {adv}*2 + 192]",
            "prefetcht0 [{y} + {adv}*2 + 192]",
            "prefetcht0 [{x} + {adv}*2 + 256]",
            "prefetcht0 [{y} + {adv}*2 + 256]",
            "prefetcht0 [{x} + {adv}*2 + 320]",
            "prefetcht0 [{y} + {adv}*2 + 320]",
            "prefetcht0 [{x} + {adv}*2 + 384]",
            "prefetcht0 [{y} + {adv}*2 + 384]",
            "prefetcht0 [{x} + {adv}*2 + 448]",
            "prefetcht0 [{y} + {adv}*2 + 448]",
            "prefetcht0 [{x} + {adv}*2 + 512]",
            "prefetcht0 [{y} + {adv}*2 + 512]",
            "prefetcht0 [{x} + {adv}*2 + 576]",
            "prefetcht0 [{y} + {adv}*2 + 576]",
            "prefetcht0 [{x} + {adv}*2 + 640]",
            "prefetcht0 [{y} + {adv}*2 + 640]",
            "prefetcht0 [{x} + {adv}*2 + 704]",
            "prefetcht0 [{y} + {adv}*2 + 704]",
            "prefetcht0 [{x} + {adv}*2 + 768]",
            "prefetcht0 [{y} + {adv}*2 + 768]",
            "prefetcht0 [{x} + {adv}*2 + 832]",
            "prefetcht0 [{y} + {adv}*2 + 832]",
            "prefetcht0 [{x} + {adv}*2 + 896]",
            "prefetcht0 [{y} + {adv}*2 + 896]",
            "prefetcht0 [{x} + {adv}*2 + 960]",
            "prefetcht0 [{y} + {adv}*2 + 960]",
            "5:",
            "tileloadd tmm4, [{x} + {ast}*1]",
            "tileloadd tmm5, [{y} + {ast}*1]",
            "tileloadd tmm6, [{p} + {s64}*1]",
            "tileloadd tmm7, [{ph} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {x}, {adv}",
            "add {y}, {adv}",
            "add {p}, 1024",
            "add {ph}, 1024",
            "dec {n}",
            "jnz 2b",
            "mov {x}, [{args} + 80]",
            "mov {y}, [{args} + 96]",
            "tilestored [{x} + {y}*1], tmm0",
            "tilestored [{x} + {y}*1 + 64], tmm1",
            "mov {x}, [{args} + 88]",
            "tilestored [{x} + {y}*1], tmm2",
            "tilestored [{x} + {y}*1 + 64], tmm3",
            args = in(reg) args as *const BlockArgs,
            x = out(reg) _, y = out(reg) _, ast = out(reg) _, adv = out(reg) _,
            p = out(reg) _, ph = out(reg) _, n = out(reg) _, s64 = out(reg) _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        );
    }
}

#[cfg(test)]
mod tests;
