//! The toolbox every layer may use: seeded random numbers ([`rng`]), a byte fingerprint, and the
//! progress of long jobs ([`progress`]: bars, elapsed time, ETA).

pub mod progress;
pub mod rng;

/// FNV-1a, 64-bit: a dependency-free fingerprint of bytes (golden files record the one of the
/// weights they were made from; a training run, the one of its data and settings).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
