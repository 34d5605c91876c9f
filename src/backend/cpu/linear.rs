//! Frozen linear layers `y = x W^T + b` over dense or NF4 weights.

use crate::nf4::Nf4Tensor;
use rayon::prelude::*;

/// The weight of a frozen linear layer `y = x W^T + b`, `W: [out, in]`.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// `[out * in]` f32, row-major.
    Dense(Vec<f32>),
    /// NF4 with double-quantized scales, flattened row-major `[out, in]` as bitsandbytes stores it.
    Nf4(Nf4Tensor),
}

/// A frozen linear layer.
#[derive(Clone, Debug)]
pub struct Linear {
    pub out_features: usize,
    pub in_features: usize,
    pub weight: LinearWeight,
    /// `[out]`, if the layer has a bias.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// A dense layer; panics if the data does not match the shape (loaders check shapes first).
    pub fn dense(out_features: usize, in_features: usize, w: Vec<f32>, bias: Option<Vec<f32>>) -> Linear {
        assert_eq!(
            w.len(),
            out_features * in_features,
            "linear weight does not match [{out_features}, {in_features}]"
        );
        Linear {
            out_features,
            in_features,
            weight: LinearWeight::Dense(w),
            bias,
        }
    }

    /// The same layer with its weight quantized to NF4 (the bias stays f32).
    pub fn to_nf4(&self) -> Linear {
        self.to_nf4_with(&|w, shape| Ok(Nf4Tensor::quantize(w, shape)))
            .expect("quantizing on the CPU cannot fail")
    }

    /// [`Linear::to_nf4`] with the quantization done by `quantize` (the CPU's, or a GPU's kernel that
    /// writes the same bytes).
    pub fn to_nf4_with(&self, quantize: &crate::nf4::Quantizer) -> anyhow::Result<Linear> {
        let weight = match &self.weight {
            LinearWeight::Dense(w) => LinearWeight::Nf4(quantize(w, &[self.out_features, self.in_features])?),
            LinearWeight::Nf4(q) => LinearWeight::Nf4(q.clone()),
        };
        Ok(Linear { weight, ..self.clone() })
    }

    /// Row `j` of `W` as f32: borrowed when dense, dequantized into `buf` when NF4.
    #[inline]
    pub(crate) fn row<'a>(&'a self, j: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let k = self.in_features;
        match &self.weight {
            LinearWeight::Dense(w) => &w[j * k..(j + 1) * k],
            LinearWeight::Nf4(q) => {
                q.dequantize_range(j * k, buf);
                buf
            }
        }
    }
}

/// Dot product with eight independent accumulators (lets the compiler vectorise).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y = x W^T + b`.
/// y: [T, out] (overwritten), x: [T, in].
/// Parallel over output features; each row of `W` is read (or dequantized) once for all T tokens.
pub fn linear_fwd(y: &mut [f32], x: &[f32], lin: &Linear) {
    let (n, k) = (lin.out_features, lin.in_features);
    assert_eq!(x.len() % k, 0, "linear: input width is not {k}");
    let t = x.len() / k;
    assert_eq!(y.len(), t * n, "linear: output is not [{t}, {n}]");
    // yt: [out, T], one contiguous column per output feature so threads never share a cache line.
    let mut yt = vec![0f32; n * t];
    yt.par_chunks_mut(t).enumerate().for_each_init(
        || vec![0f32; k],
        |buf, (j, col)| {
            let w = lin.row(j, buf);
            let b = lin.bias.as_ref().map_or(0.0, |b| b[j]);
            for (r, out) in col.iter_mut().enumerate() {
                *out = dot(&x[r * k..(r + 1) * k], w) + b;
            }
        },
    );
    for (j, col) in yt.chunks(t).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
}

/// Input gradient through a frozen linear layer: `dx = dy W` (no weight gradient: W is frozen).
/// dx: [T, in] (overwritten), dy: [T, out].
/// Parallel over blocks of tokens; each block reads (or dequantizes) every row of `W` once.
pub fn linear_bwd_input(dx: &mut [f32], dy: &[f32], lin: &Linear) {
    let (n, k) = (lin.out_features, lin.in_features);
    let t = dy.len() / n;
    assert!(
        dy.len() == t * n && dx.len() == t * k,
        "linear backward: shapes do not match [{t}, {n}] -> [{t}, {k}]"
    );
    const TOKENS_PER_TASK: usize = 16;
    dx.par_chunks_mut(TOKENS_PER_TASK * k)
        .enumerate()
        .for_each(|(blk, dxb)| {
            dxb.fill(0.0);
            let t0 = blk * TOKENS_PER_TASK;
            let mut buf = vec![0f32; k];
            for j in 0..n {
                let w = lin.row(j, &mut buf);
                for (r, dxr) in dxb.chunks_mut(k).enumerate() {
                    let g = dy[(t0 + r) * n + j];
                    if g != 0.0 {
                        dxr.iter_mut().zip(w).for_each(|(o, &wi)| *o += g * wi);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn linear_matches_naive_triple_loop_dense_and_nf4() {
        let mut rng = Rng::new(7);
        for &(t, n, k) in &[(1, 3, 5), (4, 17, 64), (3, 33, 100)] {
            let x = rng.normal_vec(t * k, 1.0);
            let lin = Linear::dense(n, k, rng.normal_vec(n * k, 0.5), Some(rng.normal_vec(n, 0.1)));
            for layer in [lin.clone(), lin.to_nf4()] {
                let w = match &layer.weight {
                    LinearWeight::Dense(w) => w.clone(),
                    LinearWeight::Nf4(q) => q.dequantize(),
                };
                let mut y = vec![f32::NAN; t * n];
                linear_fwd(&mut y, &x, &layer);
                for r in 0..t {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum::<f64>()
                            + layer.bias.as_ref().unwrap()[j] as f64;
                        assert!(
                            (y[r * n + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "({t},{n},{k}) [{r},{j}]"
                        );
                    }
                }
            }
        }
    }
}
