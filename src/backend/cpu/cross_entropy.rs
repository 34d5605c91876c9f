//! Cross-entropy through the output head, fused: the logits of a position exist only as one `[vocab]`
//! row inside the task that handles it, so `[T, vocab]` is never materialised.

use super::{dot, Linear};
use rayon::prelude::*;

/// Loss and input gradient of `loss = inv_count * sum_t -log softmax(h_t W^T)[target_t]` over the
/// positions that have a target. With `p = softmax(h_t W^T)`:
///   dlogits_t = inv_count (p - onehot(target_t)),   dh_t = dlogits_t W
/// Returns the un-normalised sum of the per-position losses, in f64 (summed in position order).
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
    let row_loss = |t: usize, dh_row: Option<&mut [f32]>| -> f64 {
        let Some(target) = targets[t] else {
            if let Some(g) = dh_row {
                g.fill(0.0);
            }
            return 0.0;
        };
        let target = target as usize;
        assert!(
            target < vocab,
            "target token {target} is outside the vocabulary ({vocab})"
        );
        let hr = &h[t * d..(t + 1) * d];
        let mut wbuf = vec![0f32; d];
        let mut logits = vec![0f32; vocab]; // [vocab], this position only
        for (v, l) in logits.iter_mut().enumerate() {
            *l = dot(hr, head.row(v, &mut wbuf)) + head.bias.as_ref().map_or(0.0, |b| b[v]);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        let loss = lse - logits[target] as f64;
        if let Some(g) = dh_row {
            g.fill(0.0);
            for (v, &l) in logits.iter().enumerate() {
                let p = ((l as f64 - lse).exp()) as f32;
                let dl = inv_count * (p - (v == target) as u8 as f32);
                let w = head.row(v, &mut wbuf);
                g.iter_mut().zip(w).for_each(|(o, &wi)| *o += dl * wi);
            }
        }
        loss
    };
    let losses: Vec<f64> = match dh {
        Some(dh) => {
            assert_eq!(dh.len(), h.len());
            dh.par_chunks_mut(d)
                .enumerate()
                .map(|(t, g)| row_loss(t, Some(g)))
                .collect()
        }
        None => (0..targets.len()).into_par_iter().map(|t| row_loss(t, None)).collect(),
    };
    losses.iter().sum()
}
