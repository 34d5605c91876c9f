//! The CPU reference backend: every op as plain f32 loops, parallel over independent rows with rayon.
//! This file is the specification the CUDA kernels are checked against, so clarity wins over speed.
//!
//! Conventions: tensors are flat row-major `f32` slices; the comment beside each argument gives its
//! shape. `T` is the number of tokens in the call, `d` the model width, `hd` the head width.

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
        assert_eq!(w.len(), out_features * in_features, "linear weight does not match [{out_features}, {in_features}]");
        Linear {
            out_features,
            in_features,
            weight: LinearWeight::Dense(w),
            bias,
        }
    }

    /// The same layer with its weight quantized to NF4 (the bias stays f32).
    pub fn to_nf4(&self) -> Linear {
        let weight = match &self.weight {
            LinearWeight::Dense(w) => LinearWeight::Nf4(Nf4Tensor::quantize(w, &[self.out_features, self.in_features])),
            LinearWeight::Nf4(q) => LinearWeight::Nf4(q.clone()),
        };
        Linear {
            weight,
            ..self.clone()
        }
    }

    /// Row `j` of `W` as f32: borrowed when dense, dequantized into `buf` when NF4.
    #[inline]
    fn row<'a>(&'a self, j: usize, buf: &'a mut [f32]) -> &'a [f32] {
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

/// `out[t] = table[tokens[t]]`.
/// out: [T, d], table: [vocab, d].
pub fn embedding_fwd(out: &mut [f32], table: &[f32], tokens: &[u32], d: usize) {
    assert_eq!(out.len(), tokens.len() * d);
    for (row, &tok) in out.chunks_mut(d).zip(tokens) {
        let tok = tok as usize;
        assert!((tok + 1) * d <= table.len(), "token id {tok} is outside the embedding table");
        row.copy_from_slice(&table[tok * d..(tok + 1) * d]);
    }
}

/// RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, per row.
/// y: [T, d] (overwritten), x: [T, d], w: [d].
pub fn rmsnorm_fwd(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    });
}

/// Rotary position embedding in the "rotate half" layout used by HF checkpoints: dimension `i`
/// pairs with `i + hd/2`, rotated by the angle `pos * inv_freq[i]`.
/// x: [T, heads, hd] (in place), positions: [T].
pub fn rope_fwd(x: &mut [f32], positions: &[usize], inv_freq: &[f32], heads: usize) {
    let half = inv_freq.len();
    let hd = 2 * half;
    assert_eq!(x.len(), positions.len() * heads * hd);
    x.par_chunks_mut(heads * hd).zip(positions).for_each(|(tok, &pos)| {
        for head in tok.chunks_mut(hd) {
            for i in 0..half {
                // f32 angle as in the reference implementation, then an accurate cos/sin of it.
                let angle = (pos as f32 * inv_freq[i]) as f64;
                let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    });
}

/// Causal grouped-query attention of T new queries against a key/value history.
/// out: [T, h, hd] (overwritten), q: [T, h, hd], k, v: [S, h_kv, hd] where the new tokens are the
/// last T of the S cached ones, so query t sits at position `S - T + t` and sees keys `0..=S-T+t`.
/// Scores are scaled by `1/sqrt(hd)`; softmax in f32 with the max subtracted.
pub fn attention_fwd(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], heads: usize, kv_heads: usize, hd: usize) {
    let t_new = q.len() / (heads * hd);
    let s_all = k.len() / (kv_heads * hd);
    assert!(t_new <= s_all && v.len() == k.len() && out.len() == q.len());
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || vec![0f32; s_all],
        |scores, (row, o)| {
            let (t, h) = (row / heads, row % heads);
            let kvh = h / group;
            let visible = s_all - t_new + t + 1;
            let qv = &q[row * hd..(row + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (s, sc) in scores[..visible].iter_mut().enumerate() {
                let kr = &k[(s * kv_heads + kvh) * hd..][..hd];
                *sc = dot(qv, kr) * scale;
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in &mut scores[..visible] {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            o.fill(0.0);
            for (s, &p) in scores[..visible].iter().enumerate() {
                let vr = &v[(s * kv_heads + kvh) * hd..][..hd];
                let p = p / sum;
                for (oi, &vi) in o.iter_mut().zip(vr) {
                    *oi += p * vi;
                }
            }
        },
    );
}

/// SiLU, `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU: `out = silu(gate) * up`.
/// out, gate, up: [T, f].
pub fn swiglu_fwd(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(out.len() == gate.len() && gate.len() == up.len());
    out.par_iter_mut().zip(gate.par_iter().zip(up)).for_each(|(o, (&g, &u))| *o = silu(g) * u);
}

/// `x += y` (the residual connection).
/// x, y: [T, d].
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
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
                        assert!((y[r * n + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "({t},{n},{k}) [{r},{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn attention_single_key_returns_its_value_and_is_causal() {
        let mut rng = Rng::new(3);
        let (heads, kv_heads, hd) = (4, 2, 8);
        let (t, s) = (3, 5);
        let q = rng.normal_vec(t * heads * hd, 1.0);
        let k = rng.normal_vec(s * kv_heads * hd, 1.0);
        let mut v = rng.normal_vec(s * kv_heads * hd, 1.0);
        let mut out = vec![f32::NAN; q.len()];
        attention_fwd(&mut out, &q, &k, &v, heads, kv_heads, hd);
        // Changing the value of the last key must not change the first query's output (it cannot see it).
        let before = out[..heads * hd].to_vec();
        let last = (s - 1) * kv_heads * hd;
        v[last..].iter_mut().for_each(|x| *x += 10.0);
        attention_fwd(&mut out, &q, &k, &v, heads, kv_heads, hd);
        assert_eq!(before, out[..heads * hd].to_vec());
        // A query that sees exactly one key returns that key's value.
        let mut one = vec![f32::NAN; heads * hd];
        attention_fwd(&mut one, &q[..heads * hd], &k[..kv_heads * hd], &v[..kv_heads * hd], heads, kv_heads, hd);
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            assert_eq!(&one[h * hd..(h + 1) * hd], &v[kvh * hd..(kvh + 1) * hd]);
        }
    }

    #[test]
    fn rope_preserves_pair_norms_and_is_identity_at_zero() {
        let mut rng = Rng::new(11);
        let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
        let x = rng.normal_vec(2 * 3 * 8, 1.0);
        let mut y = x.clone();
        rope_fwd(&mut y, &[0, 9], &inv, 3);
        assert_eq!(&y[..24], &x[..24]);
        for h in 3..6 {
            for i in 0..4 {
                let n0 = x[h * 8 + i].hypot(x[h * 8 + i + 4]);
                let n1 = y[h * 8 + i].hypot(y[h * 8 + i + 4]);
                assert!((n0 - n1).abs() < 1e-5);
            }
        }
        assert_ne!(&y[24..], &x[24..]);
    }
}
