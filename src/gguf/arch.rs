//! From a GGUF file to what the rest of sqlora reads: an HF-style config, tensors under HF names and
//! layouts, and a tokenizer.json built from the `tokenizer.ggml.*` metadata.

use super::{GgufFile, MetaValue};
use crate::model::TensorSource;
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
        if self.tensor("rope_freqs.weight").is_some() {
            bail!("rope_freqs.weight (llama3 rope scaling stored as factors) is not supported yet");
        }
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
        let c = crate::config::ModelConfig::from_json(&file.hf_config()?.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
