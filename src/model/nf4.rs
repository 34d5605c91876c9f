//! NF4 on the CPU: the specification the CUDA kernels follow, byte-compatible with bitsandbytes.
//!
//! Layout of a quantized weight `W: [out, in]` (row-major, flattened to `n = out * in` values):
//! - `packed: [ceil(n / 2)] u8`: element `2j` in the HIGH nibble of byte `j`, element `2j + 1` in the
//!   low nibble (a trailing odd element leaves the low nibble 0).
//! - blocks of [`BLOCK`] = 64 consecutive flattened values share one scale, `absmax_b = max |x|`;
//!   each value stores the index of the nearest entry of [`NF4_TABLE`] to `x * (1 / absmax_b)`.
//! - double quantization: the per-block `absmax: [nblocks] f32` is itself quantized. With
//!   `offset = mean(absmax)`, the centred values `absmax_b - offset` are split into blocks of
//!   [`DQ_BLOCK`] = 256, each with its own fp32 scale `absmax2_c = max |absmax_b - offset|`, and each is
//!   stored as the u8 index of the nearest entry of the signed dynamic map ([`dynamic_map`]) to
//!   `(absmax_b - offset) * (1 / absmax2_c)`.
//!
//! Dequantization: `x ≈ NF4_TABLE[q] * (DYN[qabs_b] * absmax2_c + offset)`.

use rayon::prelude::*;

/// Values per NF4 block (bitsandbytes' `blocksize=64`, the QLoRA default).
pub const BLOCK: usize = 64;
/// Absmax values per double-quantization block (bitsandbytes' nested `blocksize=256`).
pub const DQ_BLOCK: usize = 256;

/// The 16 NF4 code values (QLoRA paper, appendix E; bitsandbytes `get_4bit_type("nf4")`), ascending.
/// They are the quantiles of N(0, 1) normalised to [-1, 1], with an exact zero at index 7.
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Decision thresholds between neighbouring codes: `NF4_MIDPOINTS[i]` is the midpoint of
/// `NF4_TABLE[i]` and `NF4_TABLE[i + 1]`, rounded to f32. A normalised value strictly greater than
/// it takes code `i + 1` or above; a value exactly on it takes the lower code, as bitsandbytes does.
pub const NF4_MIDPOINTS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_41,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// The NF4 code of one normalised value (`x` in [-1, 1]; NaN maps to code 0 like bitsandbytes).
#[inline]
pub fn quantize_value(x: f32) -> u8 {
    // A branch-free count of the thresholds below x: equal to bitsandbytes' decision tree.
    NF4_MIDPOINTS.iter().map(|&m| (x > m) as u8).sum()
}

/// The signed 8-bit "dynamic tree" map bitsandbytes uses for nested (double) quantization,
/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 ascending values in
/// [-1, 1]. For exponent `e` in 0..7 it holds the `2^e` mid-points of `linspace(0.1, 1, 2^e + 1)`
/// scaled by `10^(e - 6)`, with both signs, plus 0 and 1.
///
/// We compute each entry in f64 and round once to f32. bitsandbytes builds the map at run time with
/// torch's vectorised `linspace`, whose last bit depends on the CPU's vector width; ours is within one
/// ulp of it (tests/nf4.rs checks against torch), which never changes a nearest-code choice except for
/// a value within an ulp of a decision boundary.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for e in 0..7i32 {
        let n = 1usize << e; // mid-points at this exponent
        let scale = 10f64.powi(e - 6);
        for i in 0..n {
            let lo = 0.1 + 0.9 * i as f64 / n as f64;
            let hi = 0.1 + 0.9 * (i + 1) as f64 / n as f64;
            let mean = (lo + hi) / 2.0;
            data.push((scale * mean) as f32);
            data.push((-scale * mean) as f32);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("the dynamic map has exactly 256 entries")
}

/// Index of the entry of an ascending `table` nearest to `x` (ties go to the lower index).
fn nearest_index(table: &[f32], x: f32) -> u8 {
    let hi = table.partition_point(|&t| t < x).min(table.len() - 1);
    let lo = hi.saturating_sub(1);
    let pick = if (x - table[lo]).abs() <= (table[hi] - x).abs() {
        lo
    } else {
        hi
    };
    pick as u8
}

/// Blockwise quantization of a flat slice: the scales of each `block`-sized chunk (the last may be
/// short) and the per-value codes, chosen by `code_of(x * (1 / absmax))`.
fn quantize_blocks(xs: &[f32], block: usize, code_of: impl Fn(f32) -> u8 + Sync) -> (Vec<f32>, Vec<u8>) {
    // Blocks are independent: each fills its scale and codes, in parallel (the result does not
    // depend on it).
    let mut scales = vec![0f32; xs.len().div_ceil(block)];
    let mut codes = vec![0u8; xs.len()];
    (scales
        .par_iter_mut()
        .zip(codes.par_chunks_mut(block))
        .zip(xs.par_chunks(block)))
    .for_each(|((scale, out), chunk)| {
        let absmax = chunk.iter().fold(0f32, |m, &x| m.max(x.abs()));
        // An all-zero block gets the exact-zero code (x * 0 = 0), so it dequantizes to 0 even
        // though double quantization reconstructs its scale as nonzero. (bitsandbytes multiplies
        // by 1/0 and stores the code NaN falls to, -1.0; we deliberately differ on this
        // degenerate block only.)
        let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
        *scale = absmax;
        out.iter_mut().zip(chunk).for_each(|(o, &x)| *o = code_of(x * inv));
    });
    (scales, codes)
}

/// The double-quantized block scales of an NF4 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// `[nblocks] u8`: index into [`dynamic_map`] of each centred, normalised absmax.
    pub qabsmax: Vec<u8>,
    /// `[ceil(nblocks / DQ_BLOCK)] f32`: scale of each group of 256 centred absmax values.
    pub absmax2: Vec<f32>,
    /// Mean of the original absmax values, added back after dequantization.
    pub offset: f32,
}

impl DoubleQuant {
    /// Quantize per-block absmax values (bitsandbytes `compress_statistics=True`).
    pub fn quantize(absmax: &[f32]) -> DoubleQuant {
        let map = dynamic_map();
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
        };
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (absmax2, qabsmax) = quantize_blocks(&centred, DQ_BLOCK, |x| nearest_index(&map, x));
        DoubleQuant {
            qabsmax,
            absmax2,
            offset,
        }
    }

    /// Reconstructed fp32 absmax of every NF4 block: `[nblocks]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.qabsmax
            .iter()
            .enumerate()
            .map(|(b, &q)| map[q as usize] * self.absmax2[b / DQ_BLOCK] + self.offset)
            .collect()
    }
}

/// Something that quantizes a row-major f32 tensor of a shape to NF4, byte for byte as
/// [`Nf4Tensor::quantize`]: the CPU, or a device (`engine::Device::quantize_nf4`).
pub type Quantizer<'a> = dyn Fn(&[f32], &[usize]) -> anyhow::Result<Nf4Tensor> + 'a;

/// An NF4-quantized tensor with double-quantized scales, as stored by bitsandbytes' `Linear4bit`.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape, row-major (for a linear weight: `[out, in]`).
    pub shape: Vec<usize>,
    /// `[ceil(numel / 2)] u8`: two codes per byte, even element in the high nibble. Shared, not
    /// copied, when a host engine takes the weight over from the model.
    pub packed: std::sync::Arc<Vec<u8>>,
    /// The per-64-block scales, double-quantized.
    pub scales: DoubleQuant,
    /// `[nblocks] f32`: the dequantized scales, cached because every dequantization needs them.
    absmax: Vec<f32>,
}

impl Nf4Tensor {
    /// Quantize a row-major tensor of the given shape.
    pub fn quantize(xs: &[f32], shape: &[usize]) -> Nf4Tensor {
        assert_eq!(
            xs.len(),
            shape.iter().product::<usize>(),
            "NF4 quantize: data does not match shape {shape:?}"
        );
        let (absmax, codes) = quantize_blocks(xs, BLOCK, quantize_value);
        Nf4Tensor::from_parts(shape, pack_nibbles(&codes), &absmax)
    }

    /// A tensor from its packed codes and its block scales before double quantization.
    fn from_parts(shape: &[usize], packed: Vec<u8>, absmax: &[f32]) -> Nf4Tensor {
        Nf4Tensor::from_quantized(shape, packed, DoubleQuant::quantize(absmax))
    }

    /// A tensor from its packed codes and double-quantized scales (quantized elsewhere, e.g. on a
    /// GPU).
    pub fn from_quantized(shape: &[usize], packed: Vec<u8>, scales: DoubleQuant) -> Nf4Tensor {
        let n: usize = shape.iter().product();
        assert!(
            packed.len() == n.div_ceil(2) && scales.qabsmax.len() == n.div_ceil(BLOCK),
            "NF4 parts do not match shape {shape:?}"
        );
        let absmax = scales.dequantize();
        Nf4Tensor {
            shape: shape.to_vec(),
            packed: std::sync::Arc::new(packed),
            scales,
            absmax,
        }
    }

    /// A random tensor of the given shape, without quantizing one: uniformly random codes and block
    /// scales uniform in [0.5, 1.5) x `scale` (double-quantized as usual). For benchmarks, which need
    /// the bytes and the work of a real weight, never zeros.
    pub fn random(shape: &[usize], scale: f32, rng: &mut crate::util::rng::Rng) -> Nf4Tensor {
        let n: usize = shape.iter().product();
        let mut packed = Vec::with_capacity(n.div_ceil(2) + 8);
        while packed.len() < n.div_ceil(2) {
            packed.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        packed.truncate(n.div_ceil(2));
        let absmax: Vec<f32> = (0..n.div_ceil(BLOCK))
            .map(|_| rng.uniform_in(0.5, 1.5) * scale)
            .collect();
        Nf4Tensor::from_parts(shape, packed, &absmax)
    }

    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Reconstructed fp32 scale of every 64-block: `[nblocks]`.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// Bytes the quantized form occupies (codes + u8 scales + nested fp32 scales + offset).
    pub fn size_bytes(&self) -> usize {
        self.packed.len() + self.scales.qabsmax.len() + 4 * self.scales.absmax2.len() + 4
    }

    /// [`Nf4Tensor::size_bytes`] of a tensor of `numel` values, without quantizing one: packed codes,
    /// one u8 scale per block, one f32 per 256 scales, and the f32 offset.
    pub fn size_bytes_of(numel: usize) -> usize {
        let blocks = numel.div_ceil(BLOCK);
        numel.div_ceil(2) + blocks + 4 * blocks.div_ceil(DQ_BLOCK) + 4
    }

    /// The NF4 code of flattened element `i`.
    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Dequantize the flattened elements `start .. start + out.len()` into `out`.
    /// Block by block: one scale per run of up to 64 values, two codes per byte.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        assert!(start + out.len() <= self.numel(), "NF4 dequantize: range past the end");
        let mut i = start;
        let mut rest = out;
        while !rest.is_empty() {
            let scale = self.absmax[i / BLOCK];
            let run = (BLOCK - i % BLOCK).min(rest.len());
            let (now, later) = rest.split_at_mut(run);
            let mut o = now.iter_mut();
            if i % 2 == 1 {
                // An odd start takes the low nibble of its byte first.
                *o.next().unwrap() = NF4_TABLE[(self.packed[i / 2] & 0x0f) as usize] * scale;
            }
            let bytes = &self.packed[i.div_ceil(2)..];
            for (pair, &byte) in o.into_slice().chunks_mut(2).zip(bytes) {
                pair[0] = NF4_TABLE[(byte >> 4) as usize] * scale;
                if let Some(second) = pair.get_mut(1) {
                    *second = NF4_TABLE[(byte & 0x0f) as usize] * scale;
                }
            }
            i += run;
            rest = later;
        }
    }

    /// Dequantize the whole tensor (row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_range(0, &mut out);
        out
    }
}

/// Pack 4-bit codes two per byte, the even element in the high nibble.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_rebuilt_from_its_parts_is_the_same_tensor() {
        let w = crate::util::rng::Rng::new(4).normal_vec(65 * 64 + 3, 0.05);
        let shape = [w.len()];
        let q = Nf4Tensor::quantize(&w, &shape);
        let rebuilt = Nf4Tensor::from_quantized(&shape, q.packed.to_vec(), q.scales.clone());
        assert_eq!(rebuilt, q);
    }

    #[test]
    fn a_range_dequantizes_as_its_elements_do() {
        // Ranges starting and ending on odd elements, inside one block and across several.
        let w = crate::util::rng::Rng::new(5).normal_vec(3 * 64 + 7, 0.05);
        let q = Nf4Tensor::quantize(&w, &[w.len()]);
        let one = |i: usize| NF4_TABLE[q.code(i) as usize] * q.absmax[i / BLOCK];
        for (start, len) in [(0, 1), (1, 1), (3, 60), (63, 2), (5, 130), (64, 64), (1, w.len() - 1)] {
            let mut out = vec![f32::NAN; len];
            q.dequantize_range(start, &mut out);
            for (k, &v) in out.iter().enumerate() {
                assert_eq!(v.to_bits(), one(start + k).to_bits(), "start {start} len {len} at {k}");
            }
        }
    }

    #[test]
    fn midpoints_lie_between_codes() {
        for i in 0..15 {
            let mid = (NF4_TABLE[i] as f64 + NF4_TABLE[i + 1] as f64) / 2.0;
            assert!((NF4_MIDPOINTS[i] as f64 - mid).abs() < 1e-7, "midpoint {i}");
            assert_eq!(quantize_value(NF4_TABLE[i]), i as u8);
        }
        assert_eq!(quantize_value(f32::NAN), 0);
        assert_eq!(quantize_value(NF4_MIDPOINTS[3]), 3, "a tie takes the lower code");
    }

    /// The table as published (bitsandbytes `get_4bit_type("nf4")`), in full precision.
    #[allow(clippy::excessive_precision)]
    const NF4_TABLE_F64: [f64; 16] = [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ];

    #[test]
    fn table_is_the_published_one() {
        for (i, (&t, &r)) in NF4_TABLE.iter().zip(&NF4_TABLE_F64).enumerate() {
            assert_eq!(t, r as f32, "NF4_TABLE[{i}]");
        }
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
        // the largest magnitude is the last e=6 mid-point, (1 - 0.9/64 + 1) / 2; the smallest is 0.55e-6
        assert!((m[0] + 0.992_968_75).abs() < 1e-6, "{}", m[0]);
        assert!(m.iter().any(|&v| (v - 5.5e-7).abs() < 1e-12));
    }
}
