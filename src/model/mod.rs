//! The model, in f32 on the CPU: the specification every engine is checked against.
//!
//! Read in this order: [`nf4`] (the 4-bit format, byte-compatible with bitsandbytes; [`q8`], a GGUF
//! head's 8-bit blocks kept for decoding), [`cpu`] (every
//! op as plain loops, forward and backward side by side: the CUDA kernels' twins), [`forward`] (the
//! decoder, top to bottom, with a KV cache; [`nf4_cache`] keeps its quantized projections on disk), [`lora`] (adapters, PEFT files, merging), [`autograd`]
//! (the adapter-only backward), [`optim`] (AdamW, its paged state, schedules, clipping),
//! [`generate`] (greedy and sampled decoding), and [`tiny`] (seeded tiny models for tests).

pub mod autograd;
pub mod cpu;
pub mod forward;
pub mod generate;
pub mod lora;
pub mod nf4;
pub mod nf4_cache;
pub mod optim;
pub mod q8;
pub mod tiny;
