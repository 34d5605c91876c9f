//! GGML tensor types and their dequantization to f32, following the block definitions of ggml.
//!
//! Legacy quants work on blocks of 32 values with an f16 scale `d` (and min `m` for the `_1` kinds);
//! K-quants on super-blocks of 256 values split into sub-blocks with 6-bit (Q4_K, Q5_K) or 8-bit
//! (Q6_K) scales.

use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes of `numel` values, if that is a whole number of blocks.
    pub fn bytes_for(self, numel: u64) -> Option<u64> {
        let (per, bytes) = self.block();
        numel
            .is_multiple_of(per as u64)
            .then(|| numel / per as u64 * bytes as u64)
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantize `numel` values of type `ty` from `data` (exactly their bytes).
pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Result<Vec<f32>> {
    let (per, bsize) = ty.block();
    if !numel.is_multiple_of(per) || data.len() != numel / per * bsize {
        bail!(
            "{numel} values of {ty:?} need {} bytes, found {}",
            numel / per * bsize,
            data.len()
        );
    }
    let mut out = vec![0f32; numel];
    // An embedding or a head is ~10^8 values: 4096 blocks per task, on every core.
    let tasks = data.par_chunks(4096 * bsize).zip(out.par_chunks_mut(4096 * per));
    tasks.for_each(|(data, out)| dequantize_blocks(ty, data, out));
    Ok(out)
}

/// Whole blocks of `ty` from `data` into `out`.
fn dequantize_blocks(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per, bsize) = ty.block();
    for (blk, y) in data.chunks_exact(bsize).zip(out.chunks_exact_mut(per)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => y[0] = half(blk, 0),
            GgmlType::BF16 => y[0] = bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q4_0 => q4_0(blk, y),
            GgmlType::Q4_1 => q4_1(blk, y),
            GgmlType::Q5_0 => q5(blk, y, false),
            GgmlType::Q5_1 => q5(blk, y, true),
            GgmlType::Q8_0 => q8_0(blk, y),
            GgmlType::Q4K => q4_k(blk, y),
            GgmlType::Q5K => q5_k(blk, y),
            GgmlType::Q6K => q6_k(blk, y),
        }
    }
}

/// Q4_0: `d: f16, qs: [u8; 16]`. Value j (< 16) is the low nibble of qs[j], value j + 16 the high
/// nibble; `x = (q - 8) d`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`, nibbles as Q4_0; `x = q d + m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 0xF) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

/// Q5_0 / Q5_1: `d: f16, [m: f16], qh: u32, qs: [u8; 16]`. The fifth bit of value j is bit j of qh,
/// of value j + 16 bit j + 16. Q5_0: `x = (q - 16) d`; Q5_1: `x = q d + m`.
fn q5(b: &[u8], y: &mut [f32], with_min: bool) {
    let d = half(b, 0);
    let (m, o) = if with_min { (half(b, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let qs = &b[o + 4..o + 20];
    let shift = if with_min { 0 } else { 16 };
    for j in 0..16 {
        let lo = (qs[j] & 0xF) as i32 | ((((qh >> j) & 1) as i32) << 4);
        let hi = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
        y[j] = (lo - shift) as f32 * d + m;
        y[j + 16] = (hi - shift) as f32 * d + m;
    }
}

/// Q8_0: `d: f16, qs: [i8; 32]`; `x = q d`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K:
/// sub-blocks 0-3 keep theirs in the low 6 bits of bytes j and j + 4; sub-blocks 4-7 combine a
/// nibble of byte j + 4 with the top two bits of bytes j - 4 and j.
fn scale_min(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Each 64 values use 32 bytes of qs:
/// the first 32 values are their low nibbles (sub-block 2i), the next 32 the high nibbles
/// (sub-block 2i + 1); `x = d sc q - dmin m`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for i in 0..4 {
        let (s1, m1) = scale_min(2 * i, scales);
        let (s2, m2) = scale_min(2 * i + 1, scales);
        let q = &qs[32 * i..32 * i + 32];
        for l in 0..32 {
            y[64 * i + l] = d * s1 * (q[l] & 0xF) as f32 - dmin * m1;
            y[64 * i + 32 + l] = d * s2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// Q5_K: `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`. As Q4_K, with a fifth bit
/// per value from qh: for the i-th 64 values, bit 2i of qh[l] (low-nibble half) and bit 2i + 1
/// (high-nibble half).
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for i in 0..4 {
        let (s1, m1) = scale_min(2 * i, scales);
        let (s2, m2) = scale_min(2 * i + 1, scales);
        let q = &qs[32 * i..32 * i + 32];
        for l in 0..32 {
            let lo = (q[l] & 0xF) as u32 + (((qh[l] >> (2 * i)) & 1) as u32) * 16;
            let hi = (q[l] >> 4) as u32 + (((qh[l] >> (2 * i + 1)) & 1) as u32) * 16;
            y[64 * i + l] = d * s1 * lo as f32 - dmin * m1;
            y[64 * i + 32 + l] = d * s2 * hi as f32 - dmin * m2;
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Each half of 128 values uses 64
/// bytes of ql and 32 of qh; value `l + 32k` (k = 0..4) takes a nibble of ql (low for k even, high for
/// k odd; bytes l or l + 32) and bits 2k..2k+1 of qh[l], minus 32, times `d * scales[l/16 + 2k]`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 208);
    for h in 0..2 {
        let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let yh = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yh[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yh[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yh[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yh[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
