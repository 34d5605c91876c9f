//! The Llama / Qwen2 decoder, forward pass on the CPU reference backend.
//!
//! ```text
//! x = embed[tokens]                                   [T, d]
//! for each layer:
//!     h = rmsnorm(x) ; q, k, v = h Wq^T, h Wk^T, h Wv^T   [T, h*hd], [T, h_kv*hd] x2
//!     q, k = rope(q), rope(k) ; append k, v to the cache
//!     x += attention(q, K_cache, V_cache) Wo^T           causal, grouped-query
//!     h = rmsnorm(x) ; x += (silu(h Wg^T) * h Wu^T) Wd^T  SwiGLU MLP
//! logits = rmsnorm(x) W_lm^T                           [T, vocab]
//! ```

use crate::backend::cpu::{self, Linear};
use crate::config::{ModelConfig, RopeScaling};
use crate::weights::Weights;
use anyhow::{Context, Result};
use std::path::Path;

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

/// One decoder layer's frozen weights.
pub struct Layer {
    /// `[d]` RMSNorm gain before attention.
    pub attn_norm: Vec<f32>,
    /// `[d]` RMSNorm gain before the MLP.
    pub mlp_norm: Vec<f32>,
    /// The projections, indexed in the order of [`Proj::ALL`].
    pub proj: [Linear; 7],
}

impl Layer {
    pub fn proj(&self, p: Proj) -> &Linear {
        &self.proj[p as usize]
    }
}

/// A loaded model: config, frozen weights and the rotary frequency table.
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, d]` token embedding (also the output head when tied).
    pub embed: Linear,
    pub layers: Vec<Layer>,
    /// `[d]` final RMSNorm gain.
    pub norm: Vec<f32>,
    /// `[vocab, d]`; `None` when tied to `embed`.
    pub lm_head: Option<Linear>,
    /// `[hd/2]` rotary inverse frequencies (after any rope scaling).
    pub inv_freq: Vec<f32>,
}

/// Keys and values of every position seen so far, per layer.
pub struct KvCache {
    /// Per layer: `[S, h_kv, hd]`.
    k: Vec<Vec<f32>>,
    /// Per layer: `[S, h_kv, hd]`.
    v: Vec<Vec<f32>>,
    /// `S`, the number of positions cached.
    len: usize,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> KvCache {
        KvCache {
            k: vec![Vec::new(); config.num_layers],
            v: vec![Vec::new(); config.num_layers],
            len: 0,
        }
    }

    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[T, vocab]`.
    All,
    /// Only the last position: `[1, vocab]` (generation).
    Last,
}

impl Model {
    /// Load `config.json` and the safetensors weights of an HF model directory (f32 compute).
    pub fn load_dir(dir: &Path) -> Result<Model> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open_dir(dir)?;
        Model::from_weights(config, &weights)
    }

    /// Build the model from named HF tensors, checking every shape against the config.
    pub fn from_weights(config: ModelConfig, w: &Weights) -> Result<Model> {
        let c = &config;
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        let embed = Linear::dense(vocab, d, w.f32("model.embed_tokens.weight", &[vocab, d])?, None);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let norm = |name: &str| w.f32(&format!("model.layers.{i}.{name}.weight"), &[d]);
            let proj = Proj::ALL.map(|p| load_linear(w, c, p, i));
            let proj = proj.into_iter().collect::<Result<Vec<_>>>()?;
            layers.push(Layer {
                attn_norm: norm("input_layernorm")?,
                mlp_norm: norm("post_attention_layernorm")?,
                proj: proj.try_into().unwrap_or_else(|_| unreachable!("seven projections")),
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Linear::dense(vocab, d, w.f32("lm_head.weight", &[vocab, d])?, None))
        };
        Ok(Model {
            inv_freq: rope_inv_freq(c),
            norm: w.f32("model.norm.weight", &[d])?,
            embed,
            layers,
            lm_head,
            config,
        })
    }

    /// The same model with the seven linear projections of every layer quantized to NF4.
    /// Embeddings, norms and the output head stay dense, as in QLoRA.
    pub fn quantize_nf4(mut self) -> Model {
        for layer in &mut self.layers {
            for p in &mut layer.proj {
                *p = p.to_nf4();
            }
        }
        self
    }

    /// Run `tokens` (positions `cache.len()..`) through the model, appending their keys and values
    /// to the cache. Returns logits `[T, vocab]` (`Logits::All`) or `[1, vocab]` (`Logits::Last`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Vec<f32> {
        let c = &self.config;
        let (t, d, f) = (tokens.len(), c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        assert!(t > 0, "forward needs at least one token");
        let positions: Vec<usize> = (cache.len..cache.len + t).collect();

        let mut x = vec![0f32; t * d]; // [T, d] residual stream
        let table = match &self.embed.weight {
            cpu::LinearWeight::Dense(w) => w,
            cpu::LinearWeight::Nf4(_) => unreachable!("embeddings stay dense"),
        };
        cpu::embedding_fwd(&mut x, table, tokens, d);

        let mut h = vec![0f32; t * d]; // [T, d] normed input of a block
        let mut q = vec![0f32; t * qd]; // [T, h, hd]
        let mut k = vec![0f32; t * kvd]; // [T, h_kv, hd]
        let mut v = vec![0f32; t * kvd]; // [T, h_kv, hd]
        let mut att = vec![0f32; t * qd]; // [T, h, hd]
        let mut proj_out = vec![0f32; t * d]; // [T, d]
        let mut gate = vec![0f32; t * f]; // [T, f]
        let mut up = vec![0f32; t * f]; // [T, f]
        let mut act = vec![0f32; t * f]; // [T, f] silu(gate) * up
        for (l, layer) in self.layers.iter().enumerate() {
            cpu::rmsnorm_fwd(&mut h, &x, &layer.attn_norm, c.rms_norm_eps);
            cpu::linear_fwd(&mut q, &h, layer.proj(Proj::Q));
            cpu::linear_fwd(&mut k, &h, layer.proj(Proj::K));
            cpu::linear_fwd(&mut v, &h, layer.proj(Proj::V));
            cpu::rope_fwd(&mut q, &positions, &self.inv_freq, c.num_heads);
            cpu::rope_fwd(&mut k, &positions, &self.inv_freq, c.num_kv_heads);
            cache.k[l].extend_from_slice(&k);
            cache.v[l].extend_from_slice(&v);
            cpu::attention_fwd(&mut att, &q, &cache.k[l], &cache.v[l], c.num_heads, c.num_kv_heads, c.head_dim);
            cpu::linear_fwd(&mut proj_out, &att, layer.proj(Proj::O));
            cpu::add_inplace(&mut x, &proj_out);

            cpu::rmsnorm_fwd(&mut h, &x, &layer.mlp_norm, c.rms_norm_eps);
            cpu::linear_fwd(&mut gate, &h, layer.proj(Proj::Gate));
            cpu::linear_fwd(&mut up, &h, layer.proj(Proj::Up));
            cpu::swiglu_fwd(&mut act, &gate, &up);
            cpu::linear_fwd(&mut proj_out, &act, layer.proj(Proj::Down));
            cpu::add_inplace(&mut x, &proj_out);
        }
        cache.len += t;

        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[(t - 1) * d..],
        };
        let mut normed = vec![0f32; rows.len()]; // [T or 1, d]
        cpu::rmsnorm_fwd(&mut normed, rows, &self.norm, c.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; normed.len() / d * c.vocab_size]; // [T or 1, vocab]
        cpu::linear_fwd(&mut logits, &normed, head);
        logits
    }
}

fn load_linear(w: &Weights, c: &ModelConfig, p: Proj, layer: usize) -> Result<Linear> {
    let [out, inp] = p.shape(c);
    let base = p.path(layer);
    let weight = w.f32(&format!("{base}.weight"), &[out, inp])?;
    let bias = if p.has_bias(c) {
        Some(w.f32(&format!("{base}.bias"), &[out]).context("the config says this projection has a bias")?)
    } else {
        None
    };
    Ok(Linear::dense(out, inp, weight, bias))
}

/// Rotary inverse frequencies `theta^(-2i/hd)`, `i < hd/2`, in f32 as the HF reference computes
/// them, then adjusted by the config's rope scaling.
pub fn rope_inv_freq(c: &ModelConfig) -> Vec<f32> {
    let hd = c.head_dim;
    let base: Vec<f32> = (0..hd / 2).map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / hd as f32)).collect();
    match c.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            // Wavelengths longer than the original context / low_freq_factor are slowed by `factor`;
            // shorter than context / high_freq_factor are kept; in between, a linear blend in
            // `context / wavelen`.
            let ctx = original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (ctx / low_freq_factor, ctx / high_freq_factor);
            base.into_iter()
                .map(|inv| {
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    if wavelen < high_wavelen {
                        inv
                    } else if wavelen > low_wavelen {
                        inv / factor
                    } else {
                        let smooth = (ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * inv / factor + smooth * inv
                    }
                })
                .collect()
        }
    }
}
