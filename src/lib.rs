//! sqlora: QLoRA fine-tuning of small Llama / Qwen2 models for text-to-SQL.
//!
//! Read in this order:
//! 1. [`config`]: what a model looks like (HF config.json -> [`config::ModelConfig`]).
//! 2. [`weights`]: memory-mapped safetensors, converted to f32 on demand.
//! 3. [`nf4`]: the 4-bit NormalFloat format, byte-compatible with bitsandbytes.
//! 4. [`backend::cpu`]: every op of the forward pass as plain loops; the reference for the GPU.
//! 5. [`model`]: the decoder forward pass, top to bottom, with a KV cache.
//! 6. [`generate`]: greedy decoding.
//! 7. [`tokenizer`], [`tiny`]: text in and out; seeded tiny models for tests.
//! 8. [`autograd`], [`optim`], [`train`]: the adapter-only backward, AdamW, the training loop.
//! 9. [`engine`]: the same step over the kernels of a device (bf16 storage), and
//!    [`backend::cuda`], where those kernels run on the GPU.

pub mod autograd;
pub mod backend;
pub mod bench;
pub mod data;
pub mod engine;
pub mod evaluate;
pub mod generate;
pub mod load;
pub mod lora;
pub mod model;
pub mod nf4;
pub mod optim;
pub mod plot;
pub mod predict;
pub mod sql;
pub mod tiny;
pub mod train;
pub mod util;
