//! The architecture's names: the seven projections of a decoder layer and where their tensors
//! are, and the interface every weight format answers to by HF tensor name.

use super::config::ModelConfig;
use super::weights::Weights;
use anyhow::Result;

/// The seven linear projections of a decoder layer, in HF naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module name (`q_proj`, ..., `down_proj`), as PEFT's `target_modules` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The module path inside layer `i` (`self_attn.q_proj`, `mlp.gate_proj`, ...).
    pub fn path(self, layer: usize) -> String {
        let block = match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.name())
    }

    /// `[out, in]` of this projection's weight.
    pub fn shape(self, c: &ModelConfig) -> [usize; 2] {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        match self {
            Proj::Q => [c.q_dim(), d],
            Proj::K | Proj::V => [c.kv_dim(), d],
            Proj::O => [d, c.q_dim()],
            Proj::Gate | Proj::Up => [f, d],
            Proj::Down => [d, f],
        }
    }

    /// Whether the config gives this projection a bias.
    pub fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => c.qkv_bias,
            Proj::O => c.o_bias,
            Proj::Gate | Proj::Up | Proj::Down => c.mlp_bias,
        }
    }
}

/// Where model tensors come from, by HF name: safetensors files, or a GGUF file read through the
/// name and layout mapping.
pub trait TensorSource {
    /// The tensor as f32, checked against `shape`.
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    fn contains(&self, name: &str) -> bool;
}

impl TensorSource for Weights {
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Weights::f32(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
}
