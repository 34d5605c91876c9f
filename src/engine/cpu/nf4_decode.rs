//! NF4 codes to f32 on the CPU engine: `x = NF4_TABLE[code] absmax[block]`, two codes per byte
//! (the even element in the high nibble), one scale per block of 64. Reference twin:
//! `Nf4Tensor::dequantize_range`, whose values these are, bit for bit (one f32 product each).
//!
//! The vector paths look the 16-entry table up in registers: AVX-512 with one permute of a 16-lane
//! register (`vpermps`) per 16 codes, AVX2 with two 8-lane permutes and a blend per 8 codes.

use super::isa::Isa;
use crate::model::nf4::{Nf4Tensor, BLOCK, NF4_TABLE};

/// out = the flattened elements start .. start + out.len() of `q`, dequantized.
#[inline(always)]
pub fn decode(isa: Isa, q: &Nf4Tensor, start: usize, out: &mut [f32]) {
    assert!(start + out.len() <= q.numel(), "NF4 decode: range past the end");
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa; // only the portable path off x86
    let (packed, absmax) = (&q.packed[..], q.absmax());
    let mut i = start;
    let mut rest = out;
    while !rest.is_empty() {
        let scale = absmax[i / BLOCK];
        let run = (BLOCK - i % BLOCK).min(rest.len());
        let (now, later) = rest.split_at_mut(run);
        let mut done = 0;
        if i % 2 == 1 {
            now[0] = NF4_TABLE[(packed[i / 2] & 0x0f) as usize] * scale;
            done = 1;
        }
        // Whole groups from an even element: 16 (AVX-512) or 8 (AVX2) values at a time.
        #[cfg(target_arch = "x86_64")]
        {
            let bytes = &packed[(i + done) / 2..];
            let (step, avail) = (isa.decode_width(), run - done);
            let groups = avail.checked_div(step).unwrap_or(0);
            for g in 0..groups {
                let (o, b) = (&mut now[done + g * step..done + (g + 1) * step], &bytes[g * step / 2..]);
                match isa {
                    // SAFETY: the path was checked when the engine was built (`Isa::supported`);
                    // o holds 16 values and b at least 8 bytes.
                    Isa::Avx512 => unsafe { x86::decode16(b.as_ptr(), scale, o.as_mut_ptr()) },
                    // SAFETY: as above; o holds 8 values and b at least 4 bytes.
                    Isa::Avx2 => unsafe { x86::decode8(b.as_ptr(), scale, o.as_mut_ptr()) },
                    Isa::Portable => unreachable!(),
                }
            }
            done += groups * step;
        }
        for (e, o) in now.iter_mut().enumerate().skip(done) {
            let at = i + e;
            let byte = packed[at / 2];
            let code = if at.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f };
            *o = NF4_TABLE[code as usize] * scale;
        }
        i += run;
        rest = later;
    }
}

impl Isa {
    /// Values per vector step of [`decode`] (0: scalar only).
    fn decode_width(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Portable => 0,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NF4_TABLE;
    use std::arch::x86_64::*;

    /// out[0 .. 16] = NF4_TABLE[codes of bytes[0 .. 8]] scale.
    ///
    /// # Safety
    /// The CPU has AVX-512F; bytes: 8 readable bytes; out: 16 writable values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn decode16(bytes: *const u8, scale: f32, out: *mut f32) {
        // SAFETY: 8 bytes are readable, 16 values writable (the caller's promise).
        unsafe {
            let b = _mm_loadl_epi64(bytes as *const __m128i);
            // Each byte in a 16-bit lane: (low nibble << 8) | high nibble puts the codes in element
            // order, high nibble first.
            let w = _mm_cvtepu8_epi16(b);
            let codes = _mm_or_si128(
                _mm_srli_epi16(w, 4),
                _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x0f)), 8),
            );
            let idx = _mm512_cvtepu8_epi32(codes);
            let table = _mm512_loadu_ps(NF4_TABLE.as_ptr());
            let v = _mm512_permutexvar_ps(idx, table);
            _mm512_storeu_ps(out, _mm512_mul_ps(v, _mm512_set1_ps(scale)));
        }
    }

    /// out[0 .. 8] = NF4_TABLE[codes of bytes[0 .. 4]] scale.
    ///
    /// # Safety
    /// The CPU has AVX2; bytes: 4 readable bytes; out: 8 writable values.
    #[target_feature(enable = "avx2")]
    pub unsafe fn decode8(bytes: *const u8, scale: f32, out: *mut f32) {
        // SAFETY: 4 bytes are readable, 8 values writable (the caller's promise).
        unsafe {
            let b = _mm_cvtsi32_si128((bytes as *const i32).read_unaligned());
            let w = _mm_cvtepu8_epi16(b);
            let codes = _mm_or_si128(
                _mm_srli_epi16(w, 4),
                _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x0f)), 8),
            );
            let idx = _mm256_cvtepu8_epi32(codes);
            let lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(NF4_TABLE.as_ptr()), idx);
            let hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(NF4_TABLE.as_ptr().add(8)), idx);
            // Codes 8 .. 15 (bit 3 set) from the upper half of the table.
            let upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
            let v = _mm256_blendv_ps(lo, hi, upper);
            _mm256_storeu_ps(out, _mm256_mul_ps(v, _mm256_set1_ps(scale)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    /// Every path gives `dequantize_range`'s bits, from odd and even starts, across blocks.
    #[test]
    fn every_path_gives_the_references_bits() {
        let mut rng = Rng::new(17);
        let q = Nf4Tensor::quantize(&rng.normal_vec(64 * 9 + 31, 1.0), &[64 * 9 + 31]);
        for isa in Isa::available() {
            for (start, len) in [
                (0, 64 * 9 + 31),
                (1, 17),
                (3, 200),
                (62, 5),
                (64, 64),
                (130, 333),
                (575, 32),
            ] {
                let mut want = vec![0f32; len];
                q.dequantize_range(start, &mut want);
                let mut got = vec![f32::NAN; len];
                decode(isa, &q, start, &mut got);
                let (w, g): (Vec<u32>, Vec<u32>) = (
                    want.iter().map(|v| v.to_bits()).collect(),
                    got.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(w, g, "{isa} start {start} len {len}");
            }
        }
    }
}
