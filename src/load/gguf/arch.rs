//! From a GGUF file to what the rest of sqlora reads: an HF-style config, tensors under HF names and
//! layouts, and a tokenizer.json built from the `tokenizer.ggml.*` metadata.

use super::{GgufFile, MetaValue};
use crate::load::arch::TensorSource;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Pre-tokenizer split patterns of the BPE tokenizers llama.cpp names in `tokenizer.ggml.pre`.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl GgufFile {
    fn arch(&self) -> Result<&str> {
        let arch = self
            .meta("general.architecture")
            .and_then(MetaValue::as_str)
            .context("no general.architecture")?;
        match arch {
            "llama" | "qwen2" => Ok(arch),
            other => bail!("unsupported architecture \"{other}\": sqlora reads llama and qwen2 GGUF files"),
        }
    }

    fn arch_u64(&self, key: &str) -> Result<Option<u64>> {
        let arch = self.arch()?;
        Ok(self.meta(&format!("{arch}.{key}")).and_then(MetaValue::as_u64))
    }

    /// The model's HF config.json, from the GGUF metadata.
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.arch()?;
        let need = |k: &str| -> Result<u64> {
            self.arch_u64(k)?
                .with_context(|| format!("metadata {arch}.{k} is missing"))
        };
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        let embd = self
            .tensor("token_embd.weight")
            .context("tensor token_embd.weight is missing")?;
        if let Some(t) = self
            .meta(&format!("{arch}.rope.scaling.type"))
            .and_then(MetaValue::as_str)
        {
            if t != "none" {
                bail!("unsupported rope scaling \"{t}\" in GGUF metadata");
            }
        }
        let tok = |k: &str| self.meta(&format!("tokenizer.ggml.{k}")).and_then(MetaValue::as_u64);
        let theta = self
            .meta(&format!("{arch}.rope.freq_base"))
            .and_then(MetaValue::as_f64)
            .unwrap_or(10_000.0);
        let eps = self
            .meta(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(MetaValue::as_f64)
            .unwrap_or(1e-6);
        let head_dim = self.arch_u64("attention.key_length")?.unwrap_or(hidden / heads.max(1));
        let mut c = json!({
            "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
            "model_type": arch,
            "vocab_size": embd.dims.get(1).copied().unwrap_or(0),
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch_u64("attention.head_count_kv")?.unwrap_or(heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.arch_u64("context_length")?.unwrap_or(4096),
            "rms_norm_eps": eps,
            "rope_theta": theta,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "bos_token_id": tok("bos_token_id"),
            "eos_token_id": tok("eos_token_id"),
            "torch_dtype": "bfloat16",
        });
        if self.tensor("rope_freqs.weight").is_some() {
            let factors = self.f32("rope_freqs.weight")?;
            c["rope_scaling"] = llama3_scaling_of(&factors, theta as f32, head_dim as usize)
                .with_context(|| format!("rope_freqs.weight in {}", self.path.display()))?;
        }
        if arch == "llama" {
            c["attention_bias"] = json!(self.tensor("blk.0.attn_q.bias").is_some());
        } else {
            c["use_sliding_window"] = json!(false);
        }
        Ok(c)
    }

    /// tokenizer.json for the tokenizers crate (and transformers), from the GGUF vocabulary, merges,
    /// token types and pre-tokenizer name.
    pub fn tokenizer_json(&self) -> Result<Value> {
        let meta = |k: &str| self.meta(&format!("tokenizer.ggml.{k}"));
        let model = meta("model").and_then(MetaValue::as_str).unwrap_or("");
        if model != "gpt2" {
            bail!("tokenizer model \"{model}\" is not supported: sqlora reads byte-level BPE (\"gpt2\") tokenizers");
        }
        let tokens: Vec<&str> = meta("tokens")
            .and_then(MetaValue::as_array)
            .context("tokenizer.ggml.tokens is missing")?
            .iter()
            .map(|t| t.as_str().context("a token is not a string"))
            .collect::<Result<_>>()?;
        let types: Vec<u64> = match meta("token_type").and_then(MetaValue::as_array) {
            Some(a) => a.iter().map(|t| t.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let merges: Vec<Value> = meta("merges")
            .and_then(MetaValue::as_array)
            .context("tokenizer.ggml.merges is missing")?
            .iter()
            .map(|m| m.as_str().map(|s| json!(s)).context("a merge is not a string"))
            .collect::<Result<_>>()?;
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are special added tokens, matched before BPE.
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
            .map(|(i, (t, _))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let pre = meta("pre").and_then(MetaValue::as_str).unwrap_or("default");
        let split = |pattern: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
        };
        let (pre_tokenizer, normalizer, ignore_merges) = match pre {
            "smollm" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
                Value::Null,
                false,
            ),
            "qwen2" => (split(QWEN2_SPLIT), json!({"type": "NFC"}), false),
            "llama-bpe" | "llama3" => (split(LLAMA3_SPLIT), Value::Null, true),
            "default" | "gpt-2" | "gpt2" => (
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
                Value::Null,
                false,
            ),
            other => bail!("pre-tokenizer \"{other}\" is not supported (smollm, qwen2, llama-bpe, gpt-2 are)"),
        };
        let post = match (
            meta("add_bos_token").and_then(MetaValue::as_bool),
            meta("bos_token_id").and_then(MetaValue::as_u64),
        ) {
            (Some(true), Some(bos)) => {
                let b = tokens
                    .get(bos as usize)
                    .context("bos_token_id is outside the vocabulary")?;
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {*b: {"id": b, "ids": [bos], "tokens": [b]}}})
            }
            _ => Value::Null,
        };
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
        }))
    }

    /// The GGUF name of an HF tensor name.
    fn gguf_name(hf: &str) -> Option<String> {
        let fixed = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
            return Some(g.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        let parts = [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("self_attn.q_proj.", "attn_q."),
            ("self_attn.k_proj.", "attn_k."),
            ("self_attn.v_proj.", "attn_v."),
            ("self_attn.o_proj.", "attn_output."),
            ("mlp.gate_proj.", "ffn_gate."),
            ("mlp.up_proj.", "ffn_up."),
            ("mlp.down_proj.", "ffn_down."),
        ];
        parts
            .iter()
            .find_map(|(h, g)| tail.strip_prefix(h).map(|suffix| format!("blk.{layer}.{g}{suffix}")))
    }
}

/// A GGUF file read as HF-named tensors: dequantized, shape-checked, and for llama-arch files with the
/// rotary permutation of q_proj and k_proj undone (llama.cpp stores them interleaved).
pub struct GgufTensors<'a> {
    pub file: &'a GgufFile,
    heads: usize,
    kv_heads: usize,
    permuted: bool,
}

impl<'a> GgufTensors<'a> {
    pub fn new(file: &'a GgufFile) -> Result<GgufTensors<'a>> {
        let c = crate::load::config::ModelConfig::from_json(&file.hf_config()?.to_string())?;
        Ok(GgufTensors {
            file,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            permuted: file.arch()? == "llama",
        })
    }
}

/// Undo llama.cpp's rotary permutation: rows of each head are stored as (pair index, half) and
/// HF wants (half, pair index): `w.reshape(h, hd/2, 2, in).swapaxes(1, 2).reshape(out, in)`.
/// w: [h * hd, in] (rows of width `inner`; a bias has inner 1).
pub fn unpermute_rows(w: &[f32], heads: usize, inner: usize) -> Vec<f32> {
    let rows = w.len() / inner;
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..hd / 2 {
                let (dst, src) = (h * hd + a * hd / 2 + b, h * hd + 2 * b + a);
                out[dst * inner..(dst + 1) * inner].copy_from_slice(&w[src * inner..(src + 1) * inner]);
            }
        }
    }
    out
}

impl TensorSource for GgufTensors<'_> {
    fn contains(&self, name: &str) -> bool {
        GgufFile::gguf_name(name).is_some_and(|g| self.file.tensor(&g).is_some())
    }

    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let g = GgufFile::gguf_name(name).with_context(|| format!("no GGUF name for tensor {name}"))?;
        let info = self
            .file
            .tensor(&g)
            .with_context(|| format!("tensor {g} (for {name}) not found in {}", self.file.path.display()))?;
        if info.shape() != shape {
            bail!(
                "tensor {g} in {} has shape {:?}, expected {shape:?}",
                self.file.path.display(),
                info.shape()
            );
        }
        let w = self.file.f32(&g)?;
        let heads = if name.contains(".q_proj.") {
            Some(self.heads)
        } else if name.contains(".k_proj.") {
            Some(self.kv_heads)
        } else {
            None
        };
        Ok(match heads {
            Some(h) if self.permuted => unpermute_rows(&w, h, if shape.len() == 2 { shape[1] } else { 1 }),
            _ => w,
        })
    }
}

/// Llama-3.x's rope scaling as llama.cpp stores it: one factor per rotary frequency that divides it
/// (`rope_freqs.weight`, [head_dim / 2] f32). They come from HF's `llama3` rope_scaling; every
/// Llama-3.x release uses low_freq_factor 1, high_freq_factor 4 and an original context of 8192,
/// with `factor` (8 for 3.1, 32 for 3.2) the largest of them. Returns that rope_scaling after checking
/// that it gives back every stored factor; anything else is refused, never approximated.
pub fn llama3_scaling_of(factors: &[f32], theta: f32, head_dim: usize) -> Result<Value> {
    if factors.len() != head_dim / 2 {
        bail!(
            "{} factors for head width {head_dim} (expected {})",
            factors.len(),
            head_dim / 2
        );
    }
    let factor = factors.iter().copied().fold(f32::NAN, f32::max);
    if !(factor.is_finite() && factor >= 1.0) {
        bail!("the factors must be finite and at least 1 (largest: {factor})");
    }
    let (low, high, ctx) = (1.0f64, 4.0f64, 8192.0f64);
    for (i, &got) in factors.iter().enumerate() {
        // llama.cpp's conversion: the same ramp as HF's llama3 inverse frequencies, as a divisor.
        let inv = 1.0 / (theta as f64).powf((2 * i) as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / inv;
        let want = if wavelen < ctx / high {
            1.0
        } else if wavelen > ctx / low {
            factor as f64
        } else {
            let smooth = (ctx / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor as f64 + smooth)
        };
        if ((got as f64 - want) / want).abs() > 1e-4 {
            bail!(
                "factor {i} is {got}, but llama3 scaling with factor {factor}, low_freq_factor 1, \
                 high_freq_factor 4 and original context 8192 gives {want:.6}: an unsupported rope scaling"
            );
        }
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": ctx as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's rope_freqs for HF's llama3 rope_scaling (its conversion script's formula, in f32).
    fn llama_cpp_factors(theta: f32, hd: usize, factor: f32, low: f32, high: f32, ctx: f32) -> Vec<f32> {
        (0..hd / 2)
            .map(|i| {
                let inv = 1.0 / theta.powf((2 * i) as f32 / hd as f32);
                let wavelen = 2.0 * std::f32::consts::PI / inv;
                if wavelen < ctx / high {
                    1.0
                } else if wavelen > ctx / low {
                    factor
                } else {
                    let smooth = (ctx / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect()
    }

    #[test]
    fn rope_freqs_become_the_llama3_scaling_they_came_from() {
        // Llama-3.2-1B (width 64, factor 32) and Llama-3.1-8B (width 128, factor 8).
        for (hd, factor) in [(64usize, 32.0f32), (128, 8.0)] {
            let stored = llama_cpp_factors(500_000.0, hd, factor, 1.0, 4.0, 8192.0);
            let scaling = llama3_scaling_of(&stored, 500_000.0, hd).unwrap();
            assert_eq!(scaling["factor"], json!(factor));
            assert_eq!(scaling["original_max_position_embeddings"], json!(8192));
            // The config built from it rotates as llama.cpp would: base frequencies / stored factors.
            let config = json!({
                "model_type": "llama", "vocab_size": 10, "hidden_size": hd * 2, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": hd, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": scaling,
            });
            let c = crate::load::config::ModelConfig::from_json(&config.to_string()).unwrap();
            let inv = crate::model::forward::rope_inv_freq(&c);
            for (i, (&got, &f)) in inv.iter().zip(&stored).enumerate() {
                let want = 1.0 / 500_000f32.powf((2 * i) as f32 / hd as f32) / f;
                assert!(
                    ((got - want) / want).abs() < 1e-5,
                    "width {hd}, frequency {i}: {got} vs {want}"
                );
            }
            assert!(stored.iter().any(|&f| f > 1.0 && f < factor), "the ramp is exercised");
        }
        // Other ramps, or factors of another length, are refused.
        let other = llama_cpp_factors(500_000.0, 64, 32.0, 2.0, 4.0, 8192.0);
        assert!(llama3_scaling_of(&other, 500_000.0, 64).is_err());
        let stored = llama_cpp_factors(500_000.0, 64, 32.0, 1.0, 4.0, 8192.0);
        assert!(llama3_scaling_of(&stored[1..], 500_000.0, 64).is_err());
        assert!(llama3_scaling_of(&[f32::NAN; 32], 500_000.0, 64).is_err());
    }

    #[test]
    fn unpermute_inverts_the_conversion_permutation() {
        // HF -> GGUF (llama.cpp's convert): reshape(h, 2, hd/2, in).swapaxes(1, 2).
        let (h, hd, inner) = (3, 8, 5);
        let hf: Vec<f32> = (0..h * hd * inner).map(|i| i as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for hh in 0..h {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    let (src, dst) = (hh * hd + a * hd / 2 + b, hh * hd + 2 * b + a);
                    gguf[dst * inner..(dst + 1) * inner].copy_from_slice(&hf[src * inner..(src + 1) * inner]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, h, inner), hf);
        assert_ne!(gguf, hf);
    }

    #[test]
    fn names_map_both_ways_we_need() {
        assert_eq!(
            GgufFile::gguf_name("model.layers.3.self_attn.k_proj.bias").unwrap(),
            "blk.3.attn_k.bias"
        );
        assert_eq!(
            GgufFile::gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(GgufFile::gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(GgufFile::gguf_name("model.layers.0.nonsense").is_none());
    }
}
