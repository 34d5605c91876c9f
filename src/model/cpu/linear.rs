//! Frozen linear layers `y = x W^T + b` over dense or NF4 weights.

use crate::model::nf4::Nf4Tensor;
use rayon::prelude::*;
use std::ops::Range;

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
    pub fn to_nf4_with(&self, quantize: &crate::model::nf4::Quantizer) -> anyhow::Result<Linear> {
        let weight = match &self.weight {
            LinearWeight::Dense(w) => LinearWeight::Nf4(quantize(w, &[self.out_features, self.in_features])?),
            LinearWeight::Nf4(q) => LinearWeight::Nf4(q.clone()),
        };
        // Field by field: `..self.clone()` would copy the f32 weight only to drop it.
        Ok(Linear {
            out_features: self.out_features,
            in_features: self.in_features,
            weight,
            bias: self.bias.clone(),
        })
    }

    /// The same layer with an NF4 weight stored as its decoded f32 values (a dense one unchanged).
    pub fn decoded(&self) -> Linear {
        match &self.weight {
            LinearWeight::Dense(_) => self.clone(),
            LinearWeight::Nf4(q) => Linear {
                out_features: self.out_features,
                in_features: self.in_features,
                weight: LinearWeight::Dense(q.dequantize()),
                bias: self.bias.clone(),
            },
        }
    }

    /// Row `j` of `W` as f32: borrowed when dense, dequantized into `buf` when NF4.
    #[inline]
    pub(crate) fn row<'a>(&'a self, j: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.rows(j, 1, buf)
    }

    /// Rows `j .. j + count` of `W` as f32, `[count, in]`: borrowed when dense, dequantized into
    /// `buf` (at least `count * in` long) when NF4.
    #[inline]
    pub(crate) fn rows<'a>(&'a self, j: usize, count: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let k = self.in_features;
        match &self.weight {
            LinearWeight::Dense(w) => &w[j * k..(j + count) * k],
            LinearWeight::Nf4(q) => {
                let buf = &mut buf[..count * k];
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

/// [`dot`] of four rows of x with one w, each summed in `dot`'s order (so equal to four calls, bit
/// for bit), loading each value of w once for all four.
#[inline]
fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let whole = w.len() / 8 * 8;
    let mut acc = [[0f32; 8]; 4];
    let mut xs = x.map(|r| r[..whole].chunks_exact(8));
    for wc in w[..whole].chunks_exact(8) {
        for (a, xc) in acc.iter_mut().zip(xs.iter_mut()) {
            let xc = xc.next().expect("rows as long as w");
            for l in 0..8 {
                a[l] += xc[l] * wc[l];
            }
        }
    }
    let mut out = [0f32; 4];
    for ((o, a), r) in out.iter_mut().zip(&acc).zip(x) {
        let mut s: f32 = a.iter().sum();
        for (xv, wv) in r[whole..].iter().zip(&w[whole..]) {
            s += xv * wv;
        }
        *o = s;
    }
    out
}

/// `put(r, dot(x(r), w))` for each r in `rows`, four rows per load of w ([`dot4`]), so each value
/// is what [`dot`] gives.
#[inline]
pub(super) fn dot_rows<'a>(
    x: impl Fn(usize) -> &'a [f32],
    rows: Range<usize>,
    w: &[f32],
    mut put: impl FnMut(usize, f32),
) {
    let mut r = rows.start;
    while r + 4 <= rows.end {
        let d = dot4([x(r), x(r + 1), x(r + 2), x(r + 3)], w);
        for (i, v) in d.into_iter().enumerate() {
            put(r + i, v);
        }
        r += 4;
    }
    for r in r..rows.end {
        put(r, dot(x(r), w));
    }
}

/// Rows of W a task dequantizes (or borrows) at once, and tokens per cache tile of x: a panel of 64
/// rows and a tile of 64 tokens stay in a core's L2 (2 x 147 KB at in = 576) while they are reused.
const W_PANEL: usize = 64;
const X_TILE: usize = 64;

/// `y = x W^T + b`.
/// y: [T, out] (overwritten), x: [T, in].
/// Parallel over panels of output features; each row of `W` is read (or dequantized) once for all
/// T tokens, and each value of W loaded once for four tokens.
pub fn linear_fwd(y: &mut [f32], x: &[f32], lin: &Linear) {
    let (n, k) = (lin.out_features, lin.in_features);
    assert_eq!(x.len() % k, 0, "linear: input width is not {k}");
    let t = x.len() / k;
    assert_eq!(y.len(), t * n, "linear: output is not [{t}, {n}]");
    if t == 0 {
        return;
    }
    let xrow = |r: usize| &x[r * k..(r + 1) * k];
    // yt: [out, T], one contiguous column per output feature so threads never share a cache line.
    let mut yt = vec![0f32; n * t];
    yt.par_chunks_mut(W_PANEL * t).enumerate().for_each_init(
        || vec![0f32; W_PANEL * k],
        |buf, (p, cols)| {
            let count = cols.len() / t;
            let w = lin.rows(p * W_PANEL, count, buf); // [count, in]
            for t0 in (0..t).step_by(X_TILE) {
                let t1 = (t0 + X_TILE).min(t);
                for (jr, col) in cols.chunks_mut(t).enumerate() {
                    let wj = &w[jr * k..(jr + 1) * k];
                    let b = lin.bias.as_ref().map_or(0.0, |b| b[p * W_PANEL + jr]);
                    dot_rows(xrow, t0..t1, wj, |r, v| col[r] = v + b);
                }
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
/// A panel of rows of `W` at a time (read or dequantized once), shared by parallel blocks of tokens;
/// each element of dx adds its terms in order of the output feature j, four rows of W per pass.
pub fn linear_bwd_input(dx: &mut [f32], dy: &[f32], lin: &Linear) {
    let (n, k) = (lin.out_features, lin.in_features);
    let t = dy.len() / n;
    assert!(
        dy.len() == t * n && dx.len() == t * k,
        "linear backward: shapes do not match [{t}, {n}] -> [{t}, {k}]"
    );
    const TOKENS_PER_TASK: usize = 16;
    dx.fill(0.0);
    let mut buf = vec![0f32; W_PANEL * k];
    for j0 in (0..n).step_by(W_PANEL) {
        let count = W_PANEL.min(n - j0);
        let w = lin.rows(j0, count, &mut buf); // [count, in]
        dx.par_chunks_mut(TOKENS_PER_TASK * k)
            .enumerate()
            .for_each(|(blk, dxb)| {
                for (r, dxr) in dxb.chunks_mut(k).enumerate() {
                    let g = &dy[(blk * TOKENS_PER_TASK + r) * n + j0..][..count]; // [count]
                    let mut j = 0;
                    while j + 4 <= count {
                        let gs = [g[j], g[j + 1], g[j + 2], g[j + 3]];
                        if gs != [0.0; 4] {
                            let [w0, w1, w2, w3] = [0, 1, 2, 3].map(|i| &w[(j + i) * k..(j + i + 1) * k]);
                            let ws = w0.iter().zip(w1).zip(w2).zip(w3);
                            for (o, (((a, b), c), d)) in dxr.iter_mut().zip(ws) {
                                *o = *o + gs[0] * a + gs[1] * b + gs[2] * c + gs[3] * d;
                            }
                        }
                        j += 4;
                    }
                    for (jr, &gj) in g.iter().enumerate().skip(j) {
                        if gj != 0.0 {
                            let wj = &w[jr * k..(jr + 1) * k];
                            dxr.iter_mut().zip(wj).for_each(|(o, &wi)| *o += gj * wi);
                        }
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn linear_matches_naive_triple_loop_dense_and_nf4() {
        let mut rng = Rng::new(7);
        for &(t, n, k) in &[(1, 3, 5), (4, 17, 64), (3, 33, 100), (70, 130, 43)] {
            let x = rng.normal_vec(t * k, 1.0);
            let lin = Linear::dense(n, k, rng.normal_vec(n * k, 0.5), Some(rng.normal_vec(n, 0.1)));
            for layer in [lin.clone(), lin.to_nf4()] {
                let w = layer.rows(0, n, &mut vec![0f32; n * k]).to_vec();
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

    #[test]
    fn linear_backward_matches_naive_triple_loop_dense_and_nf4() {
        // Panels of W and blocks of tokens with remainders; whole rows of dy zero (skipped terms).
        let mut rng = Rng::new(8);
        for &(t, n, k) in &[(1, 3, 5), (17, 67, 64), (35, 130, 43)] {
            let mut dy = rng.normal_vec(t * n, 1.0);
            if t > 1 {
                dy[n..2 * n].fill(0.0);
            }
            let lin = Linear::dense(n, k, rng.normal_vec(n * k, 0.5), None);
            for layer in [lin.clone(), lin.to_nf4()] {
                let w = layer.rows(0, n, &mut vec![0f32; n * k]).to_vec();
                let mut dx = vec![f32::NAN; t * k];
                linear_bwd_input(&mut dx, &dy, &layer);
                for r in 0..t {
                    for i in 0..k {
                        let want: f64 = (0..n).map(|j| dy[r * n + j] as f64 * w[j * k + i] as f64).sum();
                        assert!(
                            (dx[r * k + i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "({t},{n},{k}) [{r},{i}]"
                        );
                    }
                }
            }
        }
    }
}
