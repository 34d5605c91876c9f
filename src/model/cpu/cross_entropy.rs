//! Cross-entropy through the output head, fused: the logits of a position exist only as one `[vocab]`
//! row inside the task that handles it, so `[T, vocab]` is never materialised.

use super::linear::dot_rows;
use super::Linear;
use rayon::prelude::*;

/// Loss and input gradient of `loss = inv_count * sum_t -log softmax(h_t W^T)[target_t]` over the
/// positions that have a target. With `p = softmax(h_t W^T)`:
///   dlogits_t = inv_count (p - onehot(target_t)),   dh_t = dlogits_t W
/// Returns the un-normalised sum of the per-position losses, in f64 (summed in position order).
/// Parallel over blocks of labelled positions; each block reads every row of the head once.
/// dh: [T, d] (overwritten; zero where there is no target) or None for the loss alone,
/// h: [T, d] (final-normed hidden states), head: [vocab, d], targets: [T].
pub fn cross_entropy_fwd_bwd(
    dh: Option<&mut [f32]>,
    h: &[f32],
    head: &Linear,
    targets: &[Option<u32>],
    inv_count: f32,
) -> f64 {
    let (vocab, d) = (head.out_features, head.in_features);
    assert_eq!(
        h.len(),
        targets.len() * d,
        "cross-entropy: hidden states are not [T, {d}]"
    );
    if let Some(dh) = &dh {
        assert_eq!(dh.len(), h.len(), "cross-entropy: dh is not [T, {d}]");
    }
    // The positions with a target, in order, in blocks of ROWS_PER_TASK: a block reads each row of
    // the head once for all its positions.
    let labelled: Vec<(usize, usize)> = (targets.iter().enumerate())
        .filter_map(|(t, tg)| tg.map(|tg| (t, tg as usize)))
        .collect();
    if let Some(&(_, target)) = labelled.iter().find(|&&(_, tg)| tg >= vocab) {
        panic!("target token {target} is outside the vocabulary ({vocab})");
    }
    let want_grad = dh.is_some();
    let blocks: Vec<(Vec<f64>, Vec<f32>)> = labelled
        .par_chunks(ROWS_PER_TASK)
        .map(|block| block_loss(block, h, head, inv_count, want_grad))
        .collect();
    if let Some(dh) = dh {
        dh.fill(0.0);
        let grads = blocks.iter().flat_map(|(_, g)| g.chunks(d));
        for (&(t, _), g) in labelled.iter().zip(grads) {
            dh[t * d..(t + 1) * d].copy_from_slice(g);
        }
    }
    blocks.iter().flat_map(|(losses, _)| losses).sum()
}

/// Positions handled together by one task of [`cross_entropy_fwd_bwd`] (their logits, [8, vocab],
/// live only inside the task).
const ROWS_PER_TASK: usize = 8;

/// The losses of a block of (position, target) pairs, and, with `grad`, their rows of dh ([rows, d],
/// in the block's order; empty without). Each position's logits and gradient are summed exactly as
/// one position at a time would sum them.
fn block_loss(block: &[(usize, usize)], h: &[f32], head: &Linear, inv_count: f32, grad: bool) -> (Vec<f64>, Vec<f32>) {
    let (vocab, d) = (head.out_features, head.in_features);
    let hrow = |i: usize| &h[block[i].0 * d..(block[i].0 + 1) * d];
    let bias = |v: usize| head.bias.as_ref().map_or(0.0, |b| b[v]);
    let rows = block.len();
    let mut wbuf = vec![0f32; d];
    let mut logits = vec![0f32; rows * vocab]; // [rows, vocab], this block only
    for v in 0..vocab {
        let w = head.row(v, &mut wbuf);
        dot_rows(hrow, 0..rows, w, |i, l| logits[i * vocab + v] = l + bias(v));
    }
    let mut losses = Vec::with_capacity(rows);
    for (i, &(_, target)) in block.iter().enumerate() {
        let row = &mut logits[i * vocab..(i + 1) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        losses.push(lse - row[target] as f64);
        if grad {
            // The row becomes dlogits in place.
            for (v, l) in row.iter_mut().enumerate() {
                let p = ((*l as f64 - lse).exp()) as f32;
                *l = inv_count * (p - (v == target) as u8 as f32);
            }
        }
    }
    if !grad {
        return (losses, Vec::new());
    }
    let mut dh = vec![0f32; rows * d]; // [rows, d]
    for v in 0..vocab {
        let w = head.row(v, &mut wbuf);
        for (i, g) in dh.chunks_mut(d).enumerate() {
            let dl = logits[i * vocab + v];
            g.iter_mut().zip(w).for_each(|(o, &wi)| *o += dl * wi);
        }
    }
    (losses, dh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn blocked_loss_and_gradient_match_one_position_at_a_time_in_f64() {
        // 13 positions, 11 with targets: a full block, a part block, and rows of dh left zero.
        let (t, d, vocab) = (13, 24, 37);
        let mut rng = Rng::new(9);
        let h = rng.normal_vec(t * d, 1.0);
        let head = Linear::dense(
            vocab,
            d,
            rng.normal_vec(vocab * d, 0.3),
            Some(rng.normal_vec(vocab, 0.1)),
        );
        let targets: Vec<Option<u32>> = (0..t).map(|i| (i % 6 != 2).then_some((i * 7 % vocab) as u32)).collect();
        let inv = 1.0 / 11.0;
        for layer in [head.clone(), head.to_nf4()] {
            let w = layer.rows(0, vocab, &mut vec![0f32; vocab * d]).to_vec();
            let b = layer.bias.clone().unwrap();
            let mut dh = vec![f32::NAN; t * d];
            let loss = cross_entropy_fwd_bwd(Some(&mut dh), &h, &layer, &targets, inv);
            assert_eq!(loss, cross_entropy_fwd_bwd(None, &h, &layer, &targets, inv));
            let mut want_loss = 0f64;
            for (i, tg) in targets.iter().enumerate() {
                let Some(tg) = tg.map(|x| x as usize) else {
                    assert!(dh[i * d..(i + 1) * d].iter().all(|&g| g == 0.0), "row {i} not zeroed");
                    continue;
                };
                let z: Vec<f64> = (0..vocab)
                    .map(|v| (0..d).map(|j| h[i * d + j] as f64 * w[v * d + j] as f64).sum::<f64>() + b[v] as f64)
                    .collect();
                let lse = z.iter().cloned().fold(f64::MIN, f64::max);
                let lse = lse + z.iter().map(|&x| (x - lse).exp()).sum::<f64>().ln();
                want_loss += lse - z[tg];
                for j in 0..d {
                    let g: f64 = (0..vocab)
                        .map(|v| inv as f64 * ((z[v] - lse).exp() - (v == tg) as u8 as f64) * w[v * d + j] as f64)
                        .sum();
                    assert!(
                        (dh[i * d + j] as f64 - g).abs() < 1e-5,
                        "dh[{i},{j}] {} vs {g}",
                        dh[i * d + j]
                    );
                }
            }
            assert!((loss - want_loss).abs() < 1e-4 * want_loss, "{loss} vs {want_loss}");
        }
    }
}
