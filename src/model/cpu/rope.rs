//! Rotary position embedding.

use rayon::prelude::*;

/// Rotary position embedding in the "rotate half" layout used by HF checkpoints: dimension `i`
/// pairs with `i + hd/2`, rotated by the angle `pos * inv_freq[i]`.
/// x: [T, heads, hd] (in place), positions: [T].
pub fn rope_fwd(x: &mut [f32], positions: &[usize], inv_freq: &[f32], heads: usize) {
    rotate(x, positions, inv_freq, heads, 1.0);
}

/// RoPE backward. The forward is a rotation by `+angle` of each pair `(x_i, x_{i+hd/2})`, an
/// orthogonal map, so its transpose is the rotation by `-angle`:
///   dx_i = dy_i cos + dy_{i+hd/2} sin,   dx_{i+hd/2} = -dy_i sin + dy_{i+hd/2} cos
/// dx: [T, heads, hd] (in place: holds dy on entry), positions: [T].
pub fn rope_bwd(dx: &mut [f32], positions: &[usize], inv_freq: &[f32], heads: usize) {
    rotate(dx, positions, inv_freq, heads, -1.0);
}

/// Rotate every head's pairs by `sign * pos * inv_freq[i]`.
fn rotate(x: &mut [f32], positions: &[usize], inv_freq: &[f32], heads: usize, sign: f32) {
    let half = inv_freq.len();
    let hd = 2 * half;
    assert_eq!(x.len(), positions.len() * heads * hd);
    x.par_chunks_mut(heads * hd).zip(positions).for_each(|(tok, &pos)| {
        for head in tok.chunks_mut(hd) {
            for i in 0..half {
                // f32 angle as in the reference implementation, then an accurate cos/sin of it.
                let angle = (pos as f32 * inv_freq[i]) as f64;
                let (sin, cos) = (sign * angle.sin() as f32, angle.cos() as f32);
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

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
