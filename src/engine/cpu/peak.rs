//! The CPU's peak f32 rate, measured: every thread runs a loop of independent FMAs on the widest
//! vectors its path has, long enough to reach the clock it sustains under load. What MFU on the
//! CPU is measured against (`sqlora bench train`), so that a figure is a fraction of what the
//! cores can do, not of what our own reference code happens to reach.

use super::isa::Isa;
use rayon::prelude::*;
use std::time::Instant;

/// Peak f32 FLOP/s of `isa`'s FMAs on all of rayon's threads, and a line saying how it was taken.
pub fn measured_peak(isa: Isa) -> (f64, String) {
    let threads = rayon::current_num_threads();
    let iters = 1 << 24;
    // One short run first, so the clock has ramped up for the timed one.
    let run = |iters: u64| -> f64 {
        let start = Instant::now();
        let flops: u64 = (0..threads).into_par_iter().map(|_| fma_loop(isa, iters)).sum();
        flops as f64 / start.elapsed().as_secs_f64()
    };
    run(iters / 8);
    let rate = run(iters);
    let how = format!("{isa} FMA loop on {threads} threads, measured");
    (rate, how)
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
