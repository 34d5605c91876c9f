//! The CPU's peaks, measured: its read bandwidth ([`read_bandwidth`], what decoding is bound by),
//! and its peak f32 rate: every thread runs a loop of independent FMAs on the widest
//! vectors its path has, long enough to reach the clock it sustains under load. What MFU on the
//! CPU is measured against (`sqlora bench train`), so that a figure is a fraction of what the
//! cores can do, not of what our own reference code happens to reach. Where the CPU has bf16 dot
//! products (`vdpbf16ps`, 4 FLOPs per f32 lane), their loop is measured too and the higher of the
//! two is the peak: on the Xeon of our baselines it runs at half the FMA rate (one per two cycles
//! against two FMAs per cycle). That Xeon (Sapphire Rapids) also has AMX tiles, whose bf16 products
//! run ~6x faster than its FMAs: where the GEMM runs on them ([`super::amx`]), the peak is their
//! loop's.

use super::isa::Isa;
use rayon::prelude::*;
use std::time::Instant;

/// Peak FLOP/s of what `isa`'s GEMM runs on, on all of rayon's threads, and a line saying how it
/// was taken: AMX tile products where the GEMM uses them ([`super::amx::enabled`]; the FMA loop's
/// rate is given beside), else the higher of the FMA loop and the bf16 dot-product loop.
pub fn measured_peak(isa: Isa) -> (f64, String) {
    let threads = rayon::current_num_threads();
    let rate = on_every_thread(1 << 24, |iters| fma_loop(isa, iters));
    let how = format!("{isa} FMA loop on {threads} threads, measured");
    #[cfg(target_arch = "x86_64")]
    if super::amx::enabled(isa) {
        let tiles = on_every_thread(1 << 21, super::amx::tile_loop);
        let how = format!(
            "{isa} + AMX bf16 tile-product loop on {threads} threads, measured; the FMA loop: {:.0} GFLOP/s",
            rate / 1e9
        );
        return (tiles.max(rate), how);
    }
    match bf16_dot_peak(isa) {
        Some(dot) if dot > rate => (
            dot,
            format!("{isa} bf16 dot-product loop on {threads} threads, measured"),
        ),
        Some(dot) => (
            rate,
            format!("{how}; bf16 dot products measured lower, {:.0} GFLOP/s", dot / 1e9),
        ),
        None => (rate, how),
    }
}

/// FLOP/s of bf16 dot products (`vdpbf16ps`) on all of rayon's threads, where the path is
/// AVX-512 and the CPU has them.
pub fn bf16_dot_peak(isa: Isa) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the CPU has AVX-512F and AVX512_BF16 (detected above).
        return Some(on_every_thread(1 << 23, |iters| unsafe { x86::bf16_dot(iters) }));
    }
    let _ = isa;
    None
}

/// Bytes per second that all of rayon's threads read from memory at once, and how it was taken:
/// each thread sums its share of a 512 MiB buffer (far past any last-level cache), best of three
/// passes after one that faults the pages in. What decoding is measured against: a decoding step
/// reads every weight once, so its rate is bound by this.
pub fn read_bandwidth() -> (f64, String) {
    const BYTES: usize = 512 << 20;
    let buf = vec![1u64; BYTES / 8];
    let threads = rayon::current_num_threads();
    let share = buf.len().div_ceil(threads);
    let pass = || {
        let start = Instant::now();
        let sum: u64 = (buf.par_chunks(share))
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .sum();
        std::hint::black_box(sum);
        BYTES as f64 / start.elapsed().as_secs_f64()
    };
    pass();
    let best = (0..3).map(|_| pass()).fold(0f64, f64::max);
    (best, format!("a sum over 512 MiB on {threads} threads, measured"))
}

/// FLOP/s of `run(iters)` (which returns the FLOPs it did) on every one of rayon's threads at
/// once, after one short run so that the clock has ramped up for the timed one.
fn on_every_thread(iters: u64, run: impl Fn(u64) -> u64 + Sync) -> f64 {
    let threads = rayon::current_num_threads();
    let timed = |iters: u64| -> f64 {
        let start = Instant::now();
        let flops: u64 = (0..threads).into_par_iter().map(|_| run(iters)).sum();
        flops as f64 / start.elapsed().as_secs_f64()
    };
    timed(iters / 8);
    timed(iters)
}

/// Run `iters` rounds of independent FMAs; returns the FLOPs done (2 per lane per FMA).
fn fma_loop(isa: Isa, iters: u64) -> u64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path was chosen because the CPU has these instructions.
        Isa::Avx512 if isa.supported() => unsafe { x86::avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if isa.supported() => unsafe { x86::avx2(iters) },
        _ => portable(iters),
    }
}

/// 8 independent accumulators of 8 lanes, in plain Rust.
fn portable(iters: u64) -> u64 {
    let mut acc = [[1f32; 8]; 8];
    let (a, b) = (std::hint::black_box(0.999_999f32), std::hint::black_box(1e-7f32));
    for _ in 0..iters {
        for row in acc.iter_mut() {
            for v in row.iter_mut() {
                *v = v.mul_add(a, b);
            }
        }
    }
    std::hint::black_box(acc);
    iters * 8 * 8 * 2
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 12 independent zmm accumulators (enough to cover the FMA latency on two ports).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: u64) -> u64 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        iters * 12 * 16 * 2
    }

    /// 12 independent zmm accumulators of bf16 dot products: 16 lanes x 2 products x 2 FLOPs.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_dot(iters: u64) -> u64 {
        // Pairs of bf16 (1.0, 1.0) and (2^-25, 2^-25): the sums grow slowly and stay finite.
        let a: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0), _mm512_set1_ps(1.0));
        let b: __m512bh = _mm512_cvtne2ps_pbh(
            _mm512_set1_ps(std::hint::black_box(2.98e-8)),
            _mm512_set1_ps(std::hint::black_box(2.98e-8)),
        );
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        iters * 12 * 16 * 4
    }

    /// 12 independent ymm accumulators.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: u64) -> u64 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        iters * 12 * 8 * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read bandwidth is a finite rate above 100 MB/s (any machine that runs the tests reads
    /// faster), and says how it was taken.
    #[test]
    fn read_bandwidth_is_measured() {
        let (rate, how) = read_bandwidth();
        assert!(rate.is_finite() && rate > 1e8, "{rate}");
        assert!(how.contains("512 MiB") && how.contains("measured"), "{how}");
    }

    /// Every path's FMA loop gives a positive, finite rate, and the peak is never below it; where
    /// the CPU has bf16 dot products their loop runs and is reported.
    #[test]
    fn peaks_are_measured_and_the_higher_one_is_taken() {
        for isa in Isa::available() {
            let fma = fma_loop(isa, 1 << 10);
            assert!(fma > 0);
            let (peak, how) = measured_peak(isa);
            assert!(peak.is_finite() && peak > 0.0, "{isa}: {peak}");
            assert!(how.contains(&isa.to_string()), "{how}");
            #[cfg(target_arch = "x86_64")]
            if crate::engine::cpu::amx::enabled(isa) {
                assert!(how.contains("AMX") && how.contains("FMA loop"), "{how}");
                continue;
            }
            match bf16_dot_peak(isa) {
                Some(dot) => {
                    assert!(dot.is_finite() && dot > 0.0);
                    assert!(how.contains("bf16 dot"), "{how}");
                }
                None => assert!(!how.contains("bf16"), "{how}"),
            }
        }
    }
}
