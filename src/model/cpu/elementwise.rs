//! Elementwise glue: residual adds and adapter dropout. Twin of kernels/elementwise.cu.

use crate::util::rng::Rng;

/// `x += y` (the residual connection).
/// x, y: [T, d].
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}

/// Inverted dropout, `x * mask / (1 - p)`, with element `i` kept when the `i`-th uniform draw of
/// SplitMix64 seeded with `seed` is `>= p`. The stream is counter-based (each draw is a function of
/// `seed` and `i` alone), so the CUDA kernel draws the same mask in parallel, and the backward
/// regenerates it instead of storing it: the gradient of dropout is this same call on the gradient.
/// out, x: [n].
pub fn dropout(out: &mut [f32], x: &[f32], seed: u64, p: f32) {
    dropout_from(out, x, seed, 0, p);
}

/// [`dropout`] of the elements `start .. start + x.len()` of a longer stream: their draws are
/// those of positions `start ..`, so pieces of a tensor can be masked apart (in parallel).
pub fn dropout_from(out: &mut [f32], x: &[f32], seed: u64, start: u64, p: f32) {
    assert_eq!(out.len(), x.len());
    let mut rng = Rng::new(seed);
    rng.skip(start);
    let keep = 1.0 / (1.0 - p);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if rng.uniform() as f32 >= p { v * keep } else { 0.0 };
    }
}
