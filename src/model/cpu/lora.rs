//! The low-rank adapter branch of a linear layer: `y += s (x A^T) B^T`.
//! A: [r, in] and B: [out, r] are the only trained parameters in sqlora.

use super::dot;
use rayon::prelude::*;

/// LoRA forward: `xa = x A^T`, then `y += s xa B^T`.
/// y: [T, out] (accumulated), xa: [T, r] (overwritten, saved for backward), x: [T, in] (after
/// dropout), a: [r, in], b: [out, r].
pub fn lora_fwd(y: &mut [f32], xa: &mut [f32], x: &[f32], a: &[f32], b: &[f32], rank: usize, scale: f32) {
    let (k, n) = (a.len() / rank, b.len() / rank);
    let t = x.len() / k;
    assert!(
        y.len() == t * n && xa.len() == t * rank,
        "LoRA forward: shapes do not match"
    );
    y.par_chunks_mut(n)
        .zip(xa.par_chunks_mut(rank))
        .zip(x.par_chunks(k))
        .for_each(|((yr, xar), xr)| {
            for (c, o) in xar.iter_mut().enumerate() {
                *o = dot(xr, &a[c * k..(c + 1) * k]);
            }
            for (j, o) in yr.iter_mut().enumerate() {
                *o += scale * dot(xar, &b[j * rank..(j + 1) * rank]);
            }
        });
}

/// LoRA backward. With `g = dy B` ([T, r]):
///   dB += s dy^T xa        [out, r]
///   dA += s g^T x          [r, in]
///   dx_lora = s g A        [T, in]   (the caller adds it to the frozen path's dx)
/// dx_lora: [T, in] (overwritten), da: [r, in] and db: [out, r] (accumulated), dy: [T, out],
/// x: [T, in] (the input the forward used, after dropout), xa: [T, r] (saved by the forward).
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd(
    dx_lora: &mut [f32],
    da: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    xa: &[f32],
    a: &[f32],
    b: &[f32],
    rank: usize,
    scale: f32,
) {
    let (k, n) = (a.len() / rank, b.len() / rank);
    let t = x.len() / k;
    assert!(dy.len() == t * n && xa.len() == t * rank && dx_lora.len() == t * k);
    assert!(da.len() == a.len() && db.len() == b.len());
    // g = dy B: [T, r]
    let mut g = vec![0f32; t * rank];
    g.par_chunks_mut(rank).zip(dy.par_chunks(n)).for_each(|(gr, dyr)| {
        for (j, &d) in dyr.iter().enumerate() {
            let brow = &b[j * rank..(j + 1) * rank];
            gr.iter_mut().zip(brow).for_each(|(o, &bv)| *o += d * bv);
        }
    });
    // dB[j, :] += s sum_t dy[t, j] xa[t, :]; one task per output row, tokens summed in order.
    db.par_chunks_mut(rank).enumerate().for_each(|(j, dbr)| {
        for tt in 0..t {
            let d = scale * dy[tt * n + j];
            dbr.iter_mut()
                .zip(&xa[tt * rank..(tt + 1) * rank])
                .for_each(|(o, &v)| *o += d * v);
        }
    });
    // dA[c, :] += s sum_t g[t, c] x[t, :]
    da.par_chunks_mut(k).enumerate().for_each(|(c, dar)| {
        for tt in 0..t {
            let gv = scale * g[tt * rank + c];
            dar.iter_mut()
                .zip(&x[tt * k..(tt + 1) * k])
                .for_each(|(o, &v)| *o += gv * v);
        }
    });
    // dx_lora[t, :] = s sum_c g[t, c] A[c, :]
    dx_lora.par_chunks_mut(k).zip(g.par_chunks(rank)).for_each(|(dxr, gr)| {
        dxr.fill(0.0);
        for (c, &gv) in gr.iter().enumerate() {
            let arow = &a[c * k..(c + 1) * k];
            dxr.iter_mut().zip(arow).for_each(|(o, &av)| *o += scale * gv * av);
        }
    });
}
