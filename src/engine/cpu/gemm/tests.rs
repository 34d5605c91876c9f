use super::*;
use crate::engine::cuda::rel_err;
use crate::util::rng::Rng;

/// Every path's transpose against the definition, for every width up to 16 and lengths with
/// and without a partial block of 16, rows padded on both sides; dst poisoned, and the values
/// past each row's width left alone.
#[test]
fn transpose_is_the_transpose_on_every_path() {
    let mut rng = Rng::new(5);
    for isa in Isa::available() {
        for width in 1..=16 {
            for cols in [1, 15, 16, 17, 40] {
                let (ls, ld) = (cols + 3, width + 2);
                let src = rng.normal_vec(width * ls, 1.0);
                let mut dst = vec![f32::NAN; cols * ld];
                transpose(isa, &src, ls, width, cols, &mut dst, ld);
                for i in 0..cols {
                    for c in 0..ld {
                        let (got, want) = (dst[i * ld + c], if c < width { src[c * ls + i] } else { f32::NAN });
                        assert!(
                            got.to_bits() == want.to_bits(),
                            "{isa} width {width} cols {cols} at {i}, {c}"
                        );
                    }
                }
            }
        }
    }
}

/// Every path's FMA GEMM against f64 sums, at shapes that cross the blocks of L (KC), the chunks
/// of N (NC) and the blocks of rows (MC), with each kind of operand and epilogue; outputs
/// poisoned where overwritten. (f32 operands keep f32 precision here; the AMX GEMM, which
/// rounds them to bf16, is checked in `amx.rs`.)
#[test]
fn every_path_matches_f64_sums_across_blocks() {
    let mut rng = Rng::new(9);
    for isa in Isa::available() {
        for (t, l, n) in [(3, 5, 7), (130, 1100, 40), (9, 70, 1100), (200, 33, 1030)] {
            let a = rng.normal_vec(t * l, 1.0);
            let w = rng.normal_vec(l * n, 1.0);
            let bias = rng.normal_vec(n, 1.0);
            let want = |trans: bool, alpha: f64, add: Option<&[f32]>| -> Vec<f32> {
                (0..t * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        let s: f64 = (0..l)
                            .map(|q| {
                                let av = if trans { a[q * t + i] } else { a[i * l + q] };
                                av as f64 * w[q * n + j] as f64
                            })
                            .sum();
                        (alpha * s + add.map_or(bias[j] as f64, |o| o[e] as f64)) as f32
                    })
                    .collect()
            };
            let panel = straight_panel(n, |q, c0, out: &mut [f32]| {
                out.copy_from_slice(&w[q * n + c0..q * n + c0 + out.len()])
            });
            // Rows, bias, f32 out.
            let mut out = vec![f32::NAN; t * n];
            let ep = Epilogue {
                bias: Some(&bias),
                ..Epilogue::ASSIGN
            };
            gemm(isa, Lhs::Rows(&a), t, l, n, &panel, ep, &mut out);
            let err = rel_err(&out, &want(false, 1.0, None));
            assert!(err < 1e-5, "{isa} rows {t}x{l}x{n}: {err}");
            // Columns (A stored as [l, t]), alpha, accumulate.
            let base = rng.normal_vec(t * n, 1.0);
            let mut out = base.clone();
            gemm(isa, Lhs::Cols(&a), t, l, n, &panel, Epilogue::add(0.5), &mut out);
            let err = rel_err(&out, &want(true, 0.5, Some(&base)));
            assert!(err < 1e-5, "{isa} cols {t}x{l}x{n}: {err}");
        }
    }
}
