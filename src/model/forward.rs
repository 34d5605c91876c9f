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

use crate::load::arch::{Proj, TensorSource};
use crate::load::config::{ModelConfig, RopeScaling};
use crate::load::source::ModelSource;
use crate::model::cpu::{self, Linear, LinearWeight};
use crate::model::lora::LoraParams;
use crate::model::nf4::{Nf4Tensor, Quantizer};
use anyhow::{Context, Result};
use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

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

/// Keys and values of every position seen so far, per layer. Cloning one lets several
/// continuations of the same prompt share its prefill.
#[derive(Clone)]
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
    /// Load `config.json` (with the stop tokens of `generation_config.json`, if present) and the
    /// safetensors weights of an HF model directory (f32 compute).
    pub fn load_dir(dir: &Path) -> Result<Model> {
        Model::load(dir)
    }

    /// Load an HF model directory or a `.gguf` file.
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_as(path, false)
    }

    /// [`Model::load`], with every projection quantized to NF4 as soon as it is read (`nf4`), so the
    /// host never holds more than one projection in f32: the same model as `load(path)?.quantize_nf4()`
    /// at a fraction of the peak memory.
    pub fn load_as(path: &Path, nf4: bool) -> Result<Model> {
        let cpu = |w: &[f32], shape: &[usize]| Ok(Nf4Tensor::quantize(w, shape));
        Model::load_with(path, nf4.then_some(&cpu as &Quantizer))
    }

    /// [`Model::load`], with every projection quantized by `quantize` as soon as it is read (a
    /// device's kernel: `engine::Device::quantize_nf4`), or left in f32 when `None`.
    pub fn load_with(path: &Path, quantize: Option<&Quantizer>) -> Result<Model> {
        Model::from_source(&crate::load::open(path)?, quantize)
    }

    /// The model of an opened model path, each projection quantized by `quantize` as it is read.
    pub fn from_source(src: &ModelSource, quantize: Option<&Quantizer>) -> Result<Model> {
        let model = Model::from_weights_with(src.config.clone(), &*src.tensors()?, quantize);
        match src.is_gguf() {
            true => model.with_context(|| format!("in {}", src.path().display())),
            false => model,
        }
    }

    /// Build the model from named HF tensors, checking every shape against the config.
    pub fn from_weights(config: ModelConfig, w: &dyn TensorSource) -> Result<Model> {
        Model::from_weights_with(config, w, None)
    }

    /// [`Model::from_weights`], quantizing each projection to NF4 with `quantize` as it is read.
    pub fn from_weights_with(config: ModelConfig, w: &dyn TensorSource, quantize: Option<&Quantizer>) -> Result<Model> {
        let c = config.clone();
        Model::assemble(config, w, &|p, i| {
            let lin = load_linear(w, &c, p, i)?;
            match quantize {
                Some(q) => lin.to_nf4_with(q).with_context(|| format!("quantizing {}", p.path(i))),
                None => Ok(lin),
            }
        })
    }

    /// The model from named HF tensors, with every projection's weight already in NF4: `nf4(p, i)`
    /// is projection `p` of layer `i` (a cached quantization, [`crate::model::nf4_cache`]); the
    /// biases, norms and embedding come from `w`.
    pub fn from_weights_nf4(
        config: ModelConfig,
        w: &dyn TensorSource,
        nf4: &dyn Fn(Proj, usize) -> Result<Nf4Tensor>,
    ) -> Result<Model> {
        let c = config.clone();
        Model::assemble(config, w, &|p, i| {
            let [out, inp] = p.shape(&c);
            let q = nf4(p, i)?;
            anyhow::ensure!(
                q.shape == [out, inp],
                "{}: the NF4 weight is {:?}, the config says [{out}, {inp}]",
                p.path(i),
                q.shape
            );
            Ok(Linear {
                out_features: out,
                in_features: inp,
                weight: LinearWeight::Nf4(q),
                bias: load_bias(w, &c, p, i)?,
            })
        })
    }

    /// The model from `w`'s embedding, norms and head, and `proj(p, i)`'s projections.
    fn assemble(
        config: ModelConfig,
        w: &dyn TensorSource,
        proj: &dyn Fn(Proj, usize) -> Result<Linear>,
    ) -> Result<Model> {
        let c = &config;
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        let embed = Linear::dense(vocab, d, w.f32("model.embed_tokens.weight", &[vocab, d])?, None);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let norm = |name: &str| w.f32(&format!("model.layers.{i}.{name}.weight"), &[d]);
            let proj = Proj::ALL.map(|p| proj(p, i));
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
    pub fn quantize_nf4(self) -> Model {
        self.map_projections(Linear::to_nf4)
    }

    /// The model with `f` applied to each layer's projections.
    fn map_projections(mut self, f: impl Fn(&Linear) -> Linear) -> Model {
        for layer in &mut self.layers {
            for p in &mut layer.proj {
                *p = f(p);
            }
        }
        self
    }

    /// The same model with each NF4 projection stored as its decoded f32 values: the same numbers,
    /// so the same outputs bit for bit, in 8x the memory and with no decoding at each use. For
    /// generating on the CPU, where every decoding step would otherwise decode every weight for
    /// one token.
    pub fn nf4_decoded(self) -> Model {
        self.map_projections(Linear::decoded)
    }

    /// Run `tokens` (positions `cache.len()..`) through the model, appending their keys and values
    /// to the cache. Returns logits `[T, vocab]` (`Logits::All`) or `[1, vocab]` (`Logits::Last`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Vec<f32> {
        self.forward_adapted(tokens, cache, which, None)
    }

    /// [`Model::forward`] with LoRA adapters applied (no dropout: this is inference).
    pub fn forward_adapted(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        lora: Option<&LoraParams>,
    ) -> Vec<f32> {
        let c = &self.config;
        let (t, d) = (tokens.len(), c.hidden_size);
        assert!(t > 0, "forward needs at least one token");
        let positions: Vec<usize> = (cache.len..cache.len + t).collect();
        let mut x = self.embed_tokens(tokens); // [T, d] residual stream
        let mut acts = LayerActs::default();
        for l in 0..c.num_layers {
            acts.x_in = x;
            let attn = Attention::Cached {
                k: &mut cache.k[l],
                v: &mut cache.v[l],
            };
            x = self.layer_fwd(l, &mut acts, &positions, attn, lora.map(|p| (p, None)));
        }
        cache.len += t;

        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[(t - 1) * d..],
        };
        self.final_logits(rows)
    }

    /// The final norm and the output head: logits `[R, vocab]` of the residual rows `x` ([R, d]).
    fn final_logits(&self, x: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let mut normed = vec![0f32; x.len()]; // [R, d]
        cpu::rmsnorm_fwd(&mut normed, x, &self.norm, c.rms_norm_eps);
        let mut logits = vec![0f32; x.len() / c.hidden_size * c.vocab_size]; // [R, vocab]
        cpu::linear_fwd(&mut logits, &normed, self.head());
        logits
    }

    /// One new token for each of several sequences: `tokens[i]` continues the sequence of
    /// `caches[i]` (at its own position), and its keys and values are appended there. The rows share
    /// each read of the weights, so B rows cost far less than B calls of [`Model::forward_adapted`],
    /// whose results they equal. Returns logits `[B, vocab]`.
    pub fn forward_rows(&self, tokens: &[u32], caches: &mut [KvCache], lora: Option<&LoraParams>) -> Vec<f32> {
        let c = &self.config;
        assert!(
            !tokens.is_empty() && tokens.len() == caches.len(),
            "one token per cache"
        );
        let positions: Vec<usize> = caches.iter().map(KvCache::len).collect();
        let mut x = self.embed_tokens(tokens); // [B, d] residual stream
        let mut acts = LayerActs::default();
        for l in 0..c.num_layers {
            acts.x_in = x;
            let attn = Attention::PerRow { caches, layer: l };
            x = self.layer_fwd(l, &mut acts, &positions, attn, lora.map(|p| (p, None)));
        }
        caches.iter_mut().for_each(|cache| cache.len += 1);
        self.final_logits(&x)
    }

    /// The output head: `lm_head`, or the embedding when tied. `[vocab, d]`.
    pub fn head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// `[T, d]` embeddings of `tokens`.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.config.hidden_size;
        let table = match &self.embed.weight {
            cpu::LinearWeight::Dense(w) => w,
            cpu::LinearWeight::Nf4(_) => unreachable!("embeddings stay dense"),
        };
        let mut x = vec![0f32; tokens.len() * d];
        cpu::embedding_fwd(&mut x, table, tokens, d);
        x
    }

    /// One decoder layer. Reads `acts.x_in` ([T, d]), fills the rest of `acts` with what the
    /// backward needs, and returns the layer output ([T, d]).
    pub fn layer_fwd(
        &self,
        l: usize,
        acts: &mut LayerActs,
        positions: &[usize],
        attn: Attention,
        lora: Option<(&LoraParams, Option<Dropout>)>,
    ) -> Vec<f32> {
        let c = &self.config;
        let layer = &self.layers[l];
        let t = positions.len();
        let (d, f, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let a = acts;
        resize(&mut a.h_attn, t * d);
        cpu::rmsnorm_fwd(&mut a.h_attn, &a.x_in, &layer.attn_norm, c.rms_norm_eps);
        self.proj_fwd(l, Proj::Q, &mut a.q, &a.h_attn, &mut a.xa, lora, t * qd);
        self.proj_fwd(l, Proj::K, &mut a.k, &a.h_attn, &mut a.xa, lora, t * kvd);
        self.proj_fwd(l, Proj::V, &mut a.v, &a.h_attn, &mut a.xa, lora, t * kvd);
        cpu::rope_fwd(&mut a.q, positions, &self.inv_freq, c.num_heads);
        cpu::rope_fwd(&mut a.k, positions, &self.inv_freq, c.num_kv_heads);
        resize(&mut a.att, t * qd);
        let (h, hkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        match attn {
            Attention::Cached { k, v } => {
                k.extend_from_slice(&a.k);
                v.extend_from_slice(&a.v);
                cpu::attention_fwd(&mut a.att, &a.q, k, v, h, hkv, hd);
            }
            Attention::PerRow { caches, layer } => {
                for (i, cache) in caches.iter_mut().enumerate() {
                    let (k, v) = (&mut cache.k[layer], &mut cache.v[layer]);
                    k.extend_from_slice(&a.k[i * kvd..(i + 1) * kvd]);
                    v.extend_from_slice(&a.v[i * kvd..(i + 1) * kvd]);
                    let rows = i * qd..(i + 1) * qd;
                    cpu::attention_fwd(&mut a.att[rows.clone()], &a.q[rows], k, v, h, hkv, hd);
                }
            }
            Attention::Packed(seqs) => {
                for s in seqs {
                    let (qr, kr) = (s.start * qd..s.end * qd, s.start * kvd..s.end * kvd);
                    cpu::attention_fwd(&mut a.att[qr.clone()], &a.q[qr], &a.k[kr.clone()], &a.v[kr], h, hkv, hd);
                }
            }
        }
        let mut o = Vec::new(); // [T, d]
        self.proj_fwd(l, Proj::O, &mut o, &a.att, &mut a.xa, lora, t * d);
        a.x_mid = a.x_in.clone();
        cpu::add_inplace(&mut a.x_mid, &o);

        resize(&mut a.h_mlp, t * d);
        cpu::rmsnorm_fwd(&mut a.h_mlp, &a.x_mid, &layer.mlp_norm, c.rms_norm_eps);
        self.proj_fwd(l, Proj::Gate, &mut a.gate, &a.h_mlp, &mut a.xa, lora, t * f);
        self.proj_fwd(l, Proj::Up, &mut a.up, &a.h_mlp, &mut a.xa, lora, t * f);
        resize(&mut a.act, t * f);
        cpu::swiglu_fwd(&mut a.act, &a.gate, &a.up);
        let mut out = Vec::new(); // [T, d]
        self.proj_fwd(l, Proj::Down, &mut out, &a.act, &mut a.xa, lora, t * d);
        cpu::add_inplace(&mut out, &a.x_mid);
        out
    }

    /// `y = x W^T + b (+ s (dropout(x) A^T) B^T)`; y: [T, out] (resized to `len`), x: [T, in].
    /// Saves `x A^T` ([T, r]) in `xa[p]` for the backward.
    #[allow(clippy::too_many_arguments)]
    fn proj_fwd(
        &self,
        l: usize,
        p: Proj,
        y: &mut Vec<f32>,
        x: &[f32],
        xa: &mut [Vec<f32>; 7],
        lora: Option<(&LoraParams, Option<Dropout>)>,
        len: usize,
    ) {
        resize(y, len);
        cpu::linear_fwd(y, x, self.layers[l].proj(p));
        if let Some((params, dropout)) = lora {
            if let Some(slot) = params.slot(l, p) {
                let r = params.config.r;
                let xa = &mut xa[p as usize];
                resize(xa, x.len() / slot.in_features * r);
                let xd = Dropout::apply(dropout, l, p, x);
                let (a, b) = (&params.data[slot.a.clone()], &params.data[slot.b.clone()]);
                cpu::lora_fwd(y, xa, &xd, a, b, r, params.config.scale());
            }
        }
    }
}

/// How a layer's attention sees keys and values.
pub enum Attention<'a> {
    /// Generation: append this call's keys/values (`[S, h_kv, hd]` each) and attend over all of them.
    Cached { k: &'a mut Vec<f32>, v: &'a mut Vec<f32> },
    /// Generation of several sequences at once: row i is the next token of `caches[i]`; its keys
    /// and values are appended to that cache's `layer`, and it attends over all of them.
    PerRow { caches: &'a mut [KvCache], layer: usize },
    /// Training: the tokens are independent sequences packed end to end; each attends causally
    /// within its own range only.
    Packed(&'a [Range<usize>]),
}

/// What one layer's forward keeps for its backward. Buffers are reused across calls.
#[derive(Default, Clone)]
pub struct LayerActs {
    /// [T, d] the layer input (residual stream).
    pub x_in: Vec<f32>,
    /// [T, d] rmsnorm(x_in), input of q/k/v.
    pub h_attn: Vec<f32>,
    /// [T, h, hd] queries after RoPE.
    pub q: Vec<f32>,
    /// [T, h_kv, hd] keys after RoPE.
    pub k: Vec<f32>,
    /// [T, h_kv, hd] values.
    pub v: Vec<f32>,
    /// [T, h, hd] attention output, input of o_proj.
    pub att: Vec<f32>,
    /// [T, d] residual after attention.
    pub x_mid: Vec<f32>,
    /// [T, d] rmsnorm(x_mid), input of gate/up.
    pub h_mlp: Vec<f32>,
    /// [T, f] gate and up projections, and silu(gate) * up (input of down_proj).
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub act: Vec<f32>,
    /// Per projection: [T, r] `dropout(x) A^T` of its adapter (empty when not adapted).
    pub xa: [Vec<f32>; 7],
}

/// Inverted dropout on an adapter's input, `x * mask / (1 - p)`, with a mask drawn from a generator
/// seeded by (step seed, layer, projection), so the backward regenerates it instead of storing it.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// `dropout(x)` for projection `p` of layer `l`; borrowed unchanged when there is no dropout.
    /// Also the backward: the gradient of dropout is the same masked scaling of the incoming gradient.
    pub fn apply(d: Option<Dropout>, l: usize, p: Proj, x: &[f32]) -> Cow<'_, [f32]> {
        match d {
            Some(d) if d.p > 0.0 => {
                let mut out = vec![0f32; x.len()];
                cpu::dropout(&mut out, x, d.seed_for(l, p), d.p);
                Cow::Owned(out)
            }
            _ => Cow::Borrowed(x),
        }
    }

    /// The mask seed of projection `p` in layer `l`.
    pub fn seed_for(self, l: usize, p: Proj) -> u64 {
        self.seed ^ ((l as u64) << 8 | p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

fn load_linear(w: &dyn TensorSource, c: &ModelConfig, p: Proj, layer: usize) -> Result<Linear> {
    let [out, inp] = p.shape(c);
    let base = p.path(layer);
    let weight = w.f32(&format!("{base}.weight"), &[out, inp])?;
    Ok(Linear::dense(out, inp, weight, load_bias(w, c, p, layer)?))
}

/// Projection `p`'s bias in layer `layer`, where the config says it has one.
fn load_bias(w: &dyn TensorSource, c: &ModelConfig, p: Proj, layer: usize) -> Result<Option<Vec<f32>>> {
    if !p.has_bias(c) {
        return Ok(None);
    }
    let [out, _] = p.shape(c);
    let name = format!("{}.bias", p.path(layer));
    let bias = w
        .f32(&name, &[out])
        .context("the config says this projection has a bias")?;
    Ok(Some(bias))
}

/// Rotary inverse frequencies `theta^(-2i/hd)`, `i < hd/2`, in f32 as the HF reference computes
/// them, then adjusted by the config's rope scaling.
pub fn rope_inv_freq(c: &ModelConfig) -> Vec<f32> {
    let hd = c.head_dim;
    let base: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / hd as f32))
        .collect();
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
