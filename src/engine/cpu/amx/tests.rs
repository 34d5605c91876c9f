use super::*;
use crate::engine::cpu::gemm::{dense_panel, gemm as gemm_fma};
use crate::engine::cuda::rel_err;
use crate::engine::{to_bf16, to_f32};
use crate::util::rng::Rng;

/// Whether the CPU says it has AMX with bf16 (then [`ready`] must be true: a CPU that has the tiles
/// and a process that cannot use them is a failure, not a skip).
fn cpu_has_amx() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| s.contains(" amx_bf16") && s.contains(" amx_tile"))
}

/// The kernels the tests below run: the tiles where the CPU has AMX (then they must be usable), dot
/// products where it lists avx512_bf16; elsewhere the GEMM must never take the tiles.
fn kernels_here() -> Vec<Kernel> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let have = Kernel::available();
    assert_eq!(
        have.contains(&Kernel::Tiles),
        cpu_has_amx(),
        "cpuinfo and the tile request disagree"
    );
    assert_eq!(
        have.contains(&Kernel::Dots),
        cpuinfo.contains(" avx512_bf16"),
        "cpuinfo and cpuid disagree"
    );
    if !cpu_has_amx() {
        assert!(
            !enabled(Isa::Avx512),
            "no AMX on this CPU: the GEMM must not take the tiles"
        );
    }
    have
}

/// C = A P on `kernel`, A [t, L] by rows, P dense [L, N].
#[allow(clippy::too_many_arguments)]
fn assign<A: Widen, O: Store>(kernel: Kernel, a: &[A], p: &[f32], t: usize, l: usize, n: usize, out: &mut [O]) {
    let (lhs, panel) = (Lhs::Rows(a), FromF32(&dense_panel(p, l, n)));
    gemm(kernel, Isa::Avx512, lhs, t, l, n, &panel, Epilogue::ASSIGN, out)
}

/// out = alpha A P + bias (+ out0), in f64 from the f32 values; a: [t, L] by rows.
fn reference(a: &[f32], p: &[f32], t: usize, l: usize, n: usize, ep: Epilogue, out0: &[f32]) -> Vec<f32> {
    let mut want = vec![0f32; t * n];
    for r in 0..t {
        for j in 0..n {
            let s: f64 = (0..l).map(|i| a[r * l + i] as f64 * p[i * n + j] as f64).sum();
            let mut v = ep.alpha as f64 * s + ep.bias.map_or(0.0, |b| b[j] as f64);
            if ep.accumulate {
                v += out0[r * n + j] as f64;
            }
            want[r * n + j] = v as f32;
        }
    }
    want
}

#[test]
fn amx_is_ready_where_the_cpu_has_it() {
    assert_eq!(ready(), cpu_has_amx(), "cpuinfo and the tile request disagree");
}

/// The pair GEMM, on each kernel, against the f64 sum of the same values, and against the FMA GEMM, at sizes that
/// leave partial tiles, panels and units of work (odd t, L and N; L up to 2,080, N over 1,024), A by
/// rows and by columns, bf16 and f32, outputs bf16 and f32, with a bias and accumulating; outputs
/// poisoned first, and nothing written past [t, N]. Inputs and P are rounded to bf16 first where
/// the test compares at f32 precision, so the bound is the f32 sums' alone.
#[test]
fn the_pair_gemm_matches_the_reference_and_the_fma_gemm() {
    for kernel in kernels_here() {
        matches_the_reference(kernel);
    }
}

fn matches_the_reference(kernel: Kernel) {
    let mut rng = Rng::new(11);
    for (t, l, n) in [
        (1, 1, 1),
        (5, 40, 77),
        (17, 64, 33),
        (33, 130, 95),
        (64, 512, 64),
        (100, 600, 1100),
        (257, 896, 130),
        (96, 64, 40),
        (40, 1100, 70),
        (70, 2080, 33),
    ] {
        // Values exact in bf16, so A P is the same product on every path.
        let a = to_f32(&to_bf16(&rng.normal_vec(t * l, 1.0)));
        let p = to_f32(&to_bf16(&rng.normal_vec(l * n, 0.5)));
        let bias = rng.normal_vec(n, 0.1);
        let out0 = to_f32(&to_bf16(&rng.normal_vec(t * n, 1.0)));
        for (cols, ep) in [
            (false, Epilogue::ASSIGN),
            (
                true,
                Epilogue {
                    alpha: 0.5,
                    bias: Some(&bias),
                    accumulate: true,
                },
            ),
        ] {
            let want = reference(&a, &p, t, l, n, ep, &out0);
            let a_cols: Vec<f32> = if cols {
                (0..l * t).map(|x| a[(x % t) * l + x / t]).collect()
            } else {
                a.clone()
            };
            let a_src = a_cols;
            let run_f32 = |amx: bool| {
                let mut out = out0.clone();
                out.extend([f32::NAN; 3]);
                let lhs = if cols {
                    Lhs::Cols(&a_src[..])
                } else {
                    Lhs::Rows(&a_src[..])
                };
                match amx {
                    true => gemm(
                        kernel,
                        Isa::Avx512,
                        lhs,
                        t,
                        l,
                        n,
                        &FromF32(&dense_panel(&p, l, n)),
                        ep,
                        &mut out,
                    ),
                    false => gemm_fma(Isa::Avx512, lhs, t, l, n, dense_panel(&p, l, n), ep, &mut out),
                }
                assert!(out[t * n..].iter().all(|v| v.is_nan()), "wrote past [t, N]");
                out.truncate(t * n);
                out
            };
            let (amx, fma) = (run_f32(true), run_f32(false));
            let (e_amx, e_fma) = (rel_err(&amx, &want), rel_err(&fma, &want));
            assert!(e_amx < 1e-5, "t {t} L {l} N {n} cols {cols}: {kernel:?} {e_amx}");
            assert!(e_fma < 1e-5, "t {t} L {l} N {n} cols {cols}: FMA {e_fma}");

            // bf16 A and output, as the NF4 GEMMs run: one rounding of each output; A packed, and
            // read in place (by rows, L a multiple of 32); panels in 1 MB, and in 8 KB (units of
            // one or a few panels, L in blocks of 128 steps or fewer, the sums kept between them).
            let a16 = to_bf16(&a_src);
            for (inplace_min, panel_bytes) in [(usize::MAX, 1 << 20), (0, 1 << 20), (usize::MAX, 8192), (0, 8192)] {
                let mut out = to_bf16(&out0);
                out.extend([bf16::NAN; 3]);
                let lhs = if cols { Lhs::Cols(&a16[..]) } else { Lhs::Rows(&a16[..]) };
                gemm_in(
                    kernel,
                    Isa::Avx512,
                    lhs,
                    t,
                    l,
                    n,
                    &FromF32(&dense_panel(&p, l, n)),
                    ep,
                    &mut out,
                    Tune {
                        inplace_min,
                        panel_bytes,
                    },
                );
                assert!(out[t * n..].iter().all(|v| v.is_nan()), "wrote past [t, N]");
                let e = rel_err(&to_f32(&out[..t * n]), &want);
                assert!(
                    e < 4e-3,
                    "t {t} L {l} N {n} cols {cols} in place from {inplace_min}, panels in {panel_bytes}: {kernel:?} bf16 {e}"
                );
            }
        }
    }
}

/// A and P that bf16 does not hold exactly are rounded once each: the error is bf16's, ~2^-9 per
/// value, well inside the bf16 kernels' 1e-2.
#[test]
fn values_not_exact_in_bf16_are_rounded_once() {
    let mut rng = Rng::new(5);
    let (t, l, n) = (70, 300, 90);
    let a = rng.normal_vec(t * l, 1.0);
    let p = rng.normal_vec(l * n, 1.0);
    let want = reference(&a, &p, t, l, n, Epilogue::ASSIGN, &[]);
    for kernel in kernels_here() {
        let mut out = vec![f32::NAN; t * n];
        assign(kernel, &a, &p, t, l, n, &mut out);
        let e = rel_err(&out, &want);
        assert!(e > 1e-5 && e < 5e-3, "{kernel:?}: {e}");
    }
}

/// Threads split panels and rows, never a sum: the same bits with one thread as with three.
#[test]
fn pair_gemm_results_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(2);
    let (t, l, n) = (150, 700, 300);
    let a = to_bf16(&rng.normal_vec(t * l, 1.0));
    let p = rng.normal_vec(l * n, 1.0);
    for kernel in kernels_here() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![bf16::NAN; t * n];
            pool.install(|| assign(kernel, &a, &p, t, l, n, &mut out));
            out
        };
        assert_eq!(run(1), run(3), "{kernel:?}");
    }
}

/// Units of panels share out evenly over the threads: 6 panels on 2 threads as 6 units of 1, not 3
/// of 2; SmolLM2's up-projection (48 panels of L 576) as 4 units of 12; no more than fit the buffer,
/// and the largest size within 1/8 of the most even (Qwen's 152 panels of L 896: 9 fit in 512 KB, 81
/// panels on the busier thread against 76 with units of 4; in 1 MB, units of 17 of the 18 that fit: 85 against 76); and L in
/// blocks where one panel of all of L does not fit.
#[test]
fn blocking_shares_units_out_evenly() {
    assert_eq!(blocking(6, 576, 2, 512 << 10), (1, 576));
    assert_eq!(blocking(48, 576, 2, 512 << 10), (12, 576));
    assert_eq!(blocking(152, 896, 2, 512 << 10), (9, 896));
    assert_eq!(blocking(152, 896, 2, 1 << 20), (17, 896));
    assert_eq!(blocking(1, 40, 2, 512 << 10), (1, 64));
    let (group, kc) = blocking(28, 151_936, 2, 1 << 20);
    assert_eq!(group, 7);
    assert!(kc % KT == 0 && kc * group * NR * 2 <= 1 << 20 && kc >= 2048, "{kc}");
}
