//! Q8_0: 8-bit codes in blocks of [`Q8_BLOCK`] = 32 consecutive values with one scale each (the
//! layout of ggml's `Q8_0`). A GGUF file often stores a model's output head this way; the loader
//! dequantizes it to f32 like every tensor. [`Q8Tensor::exact`] finds those codes again, so a
//! decoder can read the head at 8.5 bits per weight instead of bf16's 16, with the file's values
//! exactly (bf16 would round them).
//!
//! Layout of `W: [n, k]` (row-major, k a multiple of 32): `codes: [n k] i8`, `scales: [n k / 32] f32`;
//! value `i` is `codes[i] * scales[i / 32]`.
//!
//! Why the codes come back exactly: ggml writes a block as `d = f16(absmax / 127)` and
//! `q = round(x / d)`, so the block's largest |value| is `127 d` and every value is `q d`, products
//! that f32 holds exactly. From the dequantized values, `absmax / 127` is `d` again (the quotient is
//! exact) and `round(x / d)` is `q`. [`Q8Tensor::exact`] checks every value rather than trusting
//! this: a tensor that is not Q8_0 in disguise (a bf16 or f32 head) is `None`.

use rayon::prelude::*;

/// Values per Q8_0 block (ggml's `QK8_0`).
pub const Q8_BLOCK: usize = 32;

/// A weight `[n, k]` as Q8_0 codes and f32 scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Tensor {
    pub n: usize,
    pub k: usize,
    /// [n, k]: value i is codes[i] * scales[i / Q8_BLOCK].
    pub codes: Vec<i8>,
    /// [n, k / Q8_BLOCK].
    pub scales: Vec<f32>,
}

/// out[i] = codes[i] * scales[i / 32]: whole blocks, as many as `out` holds.
pub fn decode(codes: &[i8], scales: &[f32], out: &mut [f32]) {
    for ((o, c), &s) in out.chunks_mut(Q8_BLOCK).zip(codes.chunks(Q8_BLOCK)).zip(scales) {
        o.iter_mut().zip(c).for_each(|(o, &q)| *o = q as f32 * s);
    }
}

/// One block's scale, with its codes written, when `x` is exactly `codes * scale`; else None.
/// Written without calls (`round` is a libm call on baseline x86-64, once per value): a
/// 136M-value head takes 0.15-0.19 s on 2 Zen 4 cores, page faults for the codes included.
fn exact_block(x: &[f32; Q8_BLOCK], codes: &mut [i8; Q8_BLOCK]) -> Option<f32> {
    // 1.5 * 2^23: adding it leaves round-to-nearest(v) in the low bits of any |v| < 2^22.
    const ROUND: f32 = 12_582_912.0;
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs())); // max ignores NaN; the check below does not
    if !absmax.is_finite() {
        return None;
    }
    let scale = absmax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut exact = true;
    for (c, &v) in codes.iter_mut().zip(x) {
        // |q| <= 127 because |v| <= absmax; the product is the test of exactness.
        let q = (v * inv + ROUND) - ROUND;
        *c = q as i8;
        exact &= q * scale == v;
    }
    exact.then_some(scale)
}

impl Q8Tensor {
    /// W's Q8_0 codes when every block of 32 values is exactly `codes * scale` with
    /// `scale = absmax / 127` (a tensor read from a GGUF Q8_0 block), else None. w: [n, k].
    pub fn exact(w: &[f32], n: usize, k: usize) -> Option<Q8Tensor> {
        if k == 0 || !k.is_multiple_of(Q8_BLOCK) || w.len() != n * k {
            return None;
        }
        let mut codes = vec![0i8; n * k];
        let mut scales = vec![0f32; n * k / Q8_BLOCK];
        // A head is ~10^8 values: blocks on every core, 1024 per task.
        let per = 1024;
        let all = (codes.par_chunks_mut(per * Q8_BLOCK).zip(scales.par_chunks_mut(per)))
            .zip(w.par_chunks(per * Q8_BLOCK))
            .all(|((c, s), x)| {
                let blocks = c
                    .as_chunks_mut::<Q8_BLOCK>()
                    .0
                    .iter_mut()
                    .zip(x.as_chunks::<Q8_BLOCK>().0);
                (blocks.zip(s.iter_mut())).all(|((c, x), s)| exact_block(x, c).map(|v| *s = v).is_some())
            });
        all.then_some(Q8Tensor { n, k, codes, scales })
    }

    /// Quantize w [n, k] to Q8_0 as ggml does (`scale = absmax / 127` rounded to f16, codes
    /// rounded to nearest): lossy, for tests and benchmarks that need a head a GGUF would hold.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Q8Tensor {
        assert!(
            k.is_multiple_of(Q8_BLOCK) && w.len() == n * k,
            "Q8_0 needs [n, k] with k a multiple of 32"
        );
        let mut codes = vec![0i8; n * k];
        let scales = (codes.chunks_mut(Q8_BLOCK).zip(w.chunks(Q8_BLOCK)))
            .map(|(c, x)| {
                let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = half::f16::from_f32(absmax / 127.0).to_f32();
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                c.iter_mut()
                    .zip(x)
                    .for_each(|(c, &v)| *c = (v * inv).round().clamp(-127.0, 127.0) as i8);
                d
            })
            .collect();
        Q8Tensor { n, k, codes, scales }
    }

    /// The f32 values [n, k].
    pub fn dequantize(&self) -> Vec<f32> {
        (self.codes.chunks(Q8_BLOCK).zip(&self.scales))
            .flat_map(|(c, &s)| c.iter().map(move |&q| q as f32 * s))
            .collect()
    }

    /// Bytes held: one per code, four per scale.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::gguf::quants::{dequantize, GgmlType};
    use crate::util::rng::Rng;

    /// Q8_0 blocks as ggml writes them (f16 scale, then 32 codes), from random values.
    fn ggml_blocks(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in x.chunks(Q8_BLOCK) {
            let absmax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = absmax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend(half::f16::from_f32(d).to_le_bytes());
            out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
        }
        out
    }

    /// What the GGUF loader reads from a Q8_0 tensor comes back as the file's codes and scales,
    /// all-zero blocks included.
    #[test]
    fn a_gguf_q8_0_tensor_is_found_exactly() {
        let mut rng = Rng::new(5);
        let (n, k) = (37, 96);
        let mut x = rng.normal_vec(n * k, 0.7);
        x[..Q8_BLOCK].iter_mut().for_each(|v| *v = 0.0);
        let bytes = ggml_blocks(&x);
        let w = dequantize(GgmlType::Q8_0, &bytes, n * k).unwrap();
        let q = Q8Tensor::exact(&w, n, k).expect("a Q8_0 tensor is exact");
        assert_eq!(q.dequantize(), w);
        for (b, blk) in bytes.chunks(34).enumerate() {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            assert_eq!(q.scales[b], d, "block {b}");
            let codes: Vec<i8> = blk[2..].iter().map(|&c| c as i8).collect();
            assert_eq!(&q.codes[b * Q8_BLOCK..(b + 1) * Q8_BLOCK], &codes[..], "block {b}");
        }
        let mut row = vec![f32::NAN; k];
        decode(&q.codes[5 * k..6 * k], &q.scales[5 * k / Q8_BLOCK..], &mut row);
        assert_eq!(&row[..], &w[5 * k..6 * k]);
    }

    /// Values that are not Q8_0 (random f32, bf16, a NaN) and shapes without whole blocks are None.
    #[test]
    fn other_tensors_are_not_q8() {
        let mut rng = Rng::new(6);
        let x = rng.normal_vec(64 * 32, 1.0);
        assert!(Q8Tensor::exact(&x, 64, 32).is_none());
        let b: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert!(Q8Tensor::exact(&b, 64, 32).is_none());
        let mut q = Q8Tensor::quantize(&x, 64, 32).dequantize();
        assert!(Q8Tensor::exact(&q, 64, 32).is_some());
        q[77] = f32::NAN;
        assert!(Q8Tensor::exact(&q, 64, 32).is_none());
        assert!(Q8Tensor::exact(&q[..60 * 33], 60, 33).is_none());
    }
}
