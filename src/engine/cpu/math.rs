//! Scalar functions written so that loops over them vectorise (no calls into libm, no branches the
//! compiler cannot turn into selects), shared by the CPU engine's kernels: bf16 widening and
//! rounding, a lane-wise dot product, and e^x. Each is checked against the library function it replaces.

use half::bf16;

/// A bf16's value as f32 (exact).
#[inline(always)]
pub fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// `bf16::from_f32` (round to nearest even, NaN kept quiet) written without branches; the same
/// bits (tested).
#[inline(always)]
pub fn round_bf16(v: f32) -> bf16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = ((x >> 16) | 0x40) & 0xffff;
    bf16::from_bits(if x & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded } as u16)
}

/// sum of a[i] b[i] c[i] (c: None for 1) in 16 lanes, then the lanes: a vectorisable order.
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: Option<&[f32]>) -> f32 {
    let mut lanes = [0f32; 16];
    let n = a.len() / 16 * 16;
    // Whole chunks of 16, the third factor matched outside the loop: no bounds checks or options
    // inside it, so it compiles to vector multiplies and adds (it did not, indexed).
    let (a16, b16) = (a[..n].chunks_exact(16), b[..n].chunks_exact(16));
    match c {
        None => a16.zip(b16).for_each(|(x, y)| {
            for l in 0..16 {
                lanes[l] += x[l] * y[l];
            }
        }),
        Some(c) => a16.zip(b16).zip(c[..n].chunks_exact(16)).for_each(|((x, y), z)| {
            for l in 0..16 {
                lanes[l] += x[l] * y[l] * z[l];
            }
        }),
    }
    let tail: f32 = (n..a.len()).map(|i| a[i] * b[i] * c.map_or(1.0, |c| c[i])).sum();
    lanes.iter().sum::<f32>() + tail
}

/// e^x for x <= 88 (0 below -87): 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, and e^r by
/// its Taylor polynomial to r^6 (relative error under 4e-7, tested).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 2^23: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_n = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn exp_is_within_a_few_ulp() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.043;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 4e-7, "exp({x}) = {got}, not {want}");
        }
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    /// The branch-free rounding gives `half`'s bits: ties, carries into the exponent, infinities,
    /// NaNs and subnormals included; widening is exact.
    #[test]
    fn bf16_conversions_are_halfs() {
        let mut rng = Rng::new(1);
        let mut xs: Vec<u32> = (0..200_000).map(|_| rng.next_u64() as u32).collect();
        xs.extend([
            0,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0x3f80_8000,
        ]);
        xs.extend([0x3f81_8000, 0x7f7f_ffff, 0x0000_0001, 0x8000_8000, 0x3fff_ffff]);
        for x in xs {
            let v = f32::from_bits(x);
            let b = round_bf16(v);
            assert_eq!(b.to_bits(), bf16::from_f32(v).to_bits(), "{x:#x}");
            assert_eq!(widen(b).to_bits(), b.to_f32().to_bits(), "{x:#x}");
        }
    }
}
