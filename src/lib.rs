//! sqlora: QLoRA fine-tuning of small Llama / Qwen2 models for text-to-SQL.
//!
//! The crate is a pipeline in layers, read in this order:
//! 1. [`util`]: seeded random numbers and a byte fingerprint.
//! 2. [`load`]: model in. A model path (HF directory or GGUF file) opened once gives its config,
//!    its tensors by HF name and its tokenizer.
//! 3. [`model`]: the model in f32 on the CPU, the specification: NF4, the ops as plain loops, the
//!    decoder forward pass, LoRA adapters and PEFT files, the adapter-only autograd, AdamW,
//!    generation.
//! 4. [`engine`]: where steps and generation run, behind one interface: the f32 reference, or the
//!    step written once over a `Device` (our CUDA kernels, or the same contract on the CPU with
//!    bf16 storage); the memory plan; `--device`.
//! 5. [`sql`]: text-to-SQL. Examples, prompts and Spider import; schema snippets; read-only
//!    execution and execution accuracy; `predict`.
//! 6. [`train`]: the training loop, checkpoints and resume, its curves.
//! 7. [`bench`]: the toolbox's benchmarks (the binaries `train` and `sqlora` sit on top of all).
//!
//! Imports run one way: a module may import from its own layer and the layers above it in this
//! list, never from a later one. `tests/layers.rs` checks this (and that no modules import each
//! other in a loop) on every `cargo test`, reading this line:
//!
//! layers: util < load < model < engine < sql < train < bench

pub mod util;

pub mod load;

pub mod model;

pub mod engine;

pub mod sql;

pub mod train;

pub mod bench;
