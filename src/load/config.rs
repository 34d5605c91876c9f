//! `ModelConfig`: the architecture of a Llama- or Qwen2-family model, read from an HF `config.json`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The model families sqlora knows. Both are pre-norm decoders with RMSNorm, RoPE, GQA and SwiGLU;
/// they differ in which projections carry a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// How rotary frequencies are adjusted for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama-3.1/3.2 "llama3": low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// SwiGLU inner width `f`.
    pub intermediate_size: usize,
    pub num_layers: usize,
    /// Query heads `h`.
    pub num_heads: usize,
    /// Key/value heads `h_kv` (GQA: `h` is a multiple of `h_kv`).
    pub num_kv_heads: usize,
    /// Per-head width `hd` (usually `d / h`, but a config may set it).
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q_proj, k_proj and v_proj carry a bias (always for Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry a bias (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
}

/// The fields of config.json we read; the rest are ignored.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 folds rope_theta and rope_scaling into one object.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    use_sliding_window: Option<bool>,
}

impl ModelConfig {
    /// Read and validate `config.json`; every error names the file.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parse and validate the text of a config.json.
    pub fn from_json(text: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(text).context("malformed config.json")?;
        let arch = match raw.model_type.as_deref() {
            Some("llama") => Arch::Llama,
            Some("qwen2") => Arch::Qwen2,
            Some(other) => bail!("unsupported model_type \"{other}\": sqlora supports \"llama\" and \"qwen2\""),
            None => bail!("config.json has no model_type: sqlora supports \"llama\" and \"qwen2\""),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                bail!("unsupported hidden_act \"{act}\": only \"silu\" (SwiGLU) is implemented");
            }
        }
        if arch == Arch::Qwen2 && raw.use_sliding_window == Some(true) {
            bail!("use_sliding_window=true is not supported: sqlora uses full causal attention");
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0 || num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            );
        }
        let head_dim = match raw.head_dim {
            Some(hd) => hd,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    bail!(
                        "hidden_size {} is not divisible by num_attention_heads {}",
                        raw.hidden_size,
                        raw.num_attention_heads
                    );
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("head_dim {head_dim} must be even and positive for rotary embeddings");
        }

        // rope_theta and rope_scaling live at the top level (transformers 4) or in rope_parameters (5).
        let params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let theta = raw
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        let scaling = match raw.rope_scaling.as_ref().filter(|v| !v.is_null()).or(params) {
            Some(v) => parse_rope_scaling(v)?,
            None => RopeScaling::None,
        };

        let qkv_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama => raw.attention_bias.unwrap_or(false),
        };
        let o_bias = arch == Arch::Llama && raw.attention_bias.unwrap_or(false);
        check_sizes(&raw, head_dim)?;
        if !(theta.is_finite() && theta > 0.0) {
            bail!("rope_theta {theta} must be a positive number");
        }
        let bos_token_id = token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?.first().copied();
        let eos_token_ids = token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?;
        for (field, id) in bos_token_id
            .iter()
            .map(|&b| ("bos_token_id", b))
            .chain(eos_token_ids.iter().map(|&e| ("eos_token_id", e)))
        {
            if id as usize >= raw.vocab_size {
                bail!(
                    "{field} {id} is outside the vocabulary of {} tokens (vocab_size)",
                    raw.vocab_size
                );
            }
        }
        Ok(ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: theta as f32,
            rope_scaling: scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
        })
    }

    /// Add the stop tokens of an HF directory's `generation_config.json`, if it has one, after the
    /// config's own (their order is kept: the first is the EOS that training appends).
    pub fn add_generation_stops(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))?;
        for id in token_ids(v.get("eos_token_id"), "eos_token_id").with_context(|| format!("in {}", path.display()))? {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// Width of the query projection output, `h * hd`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs, `h_kv * hd`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The largest layer count and width a config may give: far beyond any model sqlora is for (0.1B
/// to 8B; Llama-3-70B has 80 layers and width 28,672), and small enough that no size computed from
/// them overflows.
const MAX_LAYERS: usize = 1024;
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 22;

/// Sizes that are zero, or so large that allocating by them would abort, are refused here.
fn check_sizes(raw: &RawConfig, head_dim: usize) -> Result<()> {
    for (field, n, max) in [
        ("num_hidden_layers", raw.num_hidden_layers, MAX_LAYERS),
        ("hidden_size", raw.hidden_size, MAX_WIDTH),
        ("intermediate_size", raw.intermediate_size, MAX_WIDTH),
        ("vocab_size", raw.vocab_size, MAX_VOCAB),
        (
            "num_attention_heads * head_dim",
            raw.num_attention_heads.saturating_mul(head_dim),
            MAX_WIDTH,
        ),
    ] {
        if n == 0 || n > max {
            bail!("{field} {n} is outside 1..={max}");
        }
    }
    Ok(())
}

/// A token id field: absent/null, one integer, or a list of integers.
fn token_ids(v: Option<&Value>, field: &str) -> Result<Vec<u32>> {
    let as_id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("{field}: {x} is not a token id"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(xs)) => xs.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn parse_rope_scaling(v: &Value) -> Result<RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        v.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("rope_scaling \"{kind}\" needs a number \"{key}\""))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "llama3" => {
            let (factor, low, high) = (num("factor")?, num("low_freq_factor")?, num("high_freq_factor")?);
            let original = num("original_max_position_embeddings")?;
            // The scaling divides by factor and by (high - low), and the wavelengths by original.
            if !(factor > 0.0 && low > 0.0 && high > low && original >= 1.0) {
                bail!(
                    "rope_scaling \"llama3\" needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                     original_max_position_embeddings >= 1 (got {factor}, {low}, {high}, {original})"
                );
            }
            Ok(RopeScaling::Llama3 {
                factor: factor as f32,
                low_freq_factor: low as f32,
                high_freq_factor: high as f32,
                original_max_position_embeddings: original as usize,
            })
        }
        other => bail!("unsupported rope_scaling type \"{other}\": sqlora implements \"default\" and \"llama3\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const QWEN: &str = r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,"intermediate_size":4864,
        "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"rms_norm_eps":1e-6,
        "rope_theta":1000000.0,"tie_word_embeddings":true,"bos_token_id":151643,"eos_token_id":151645,
        "hidden_act":"silu","use_sliding_window":false,"max_position_embeddings":32768}"#;

    #[test]
    fn sizes_token_ids_and_rope_values_that_would_break_a_run_are_refused() {
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut v: Value = serde_json::from_str(QWEN).unwrap();
            edit(&mut v);
            ModelConfig::from_json(&v.to_string()).map_err(|e| format!("{e:#}"))
        };
        assert!(with(&|_| {}).is_ok());
        let refused = [
            (
                with(&|v| v["eos_token_id"] = json!(151936)),
                "eos_token_id 151936 is outside",
            ),
            (with(&|v| v["bos_token_id"] = json!(1u64 << 33)), "bos_token_id"),
            (
                with(&|v| v["num_hidden_layers"] = json!(100_000_000_000u64)),
                "num_hidden_layers",
            ),
            (with(&|v| v["num_hidden_layers"] = json!(0)), "num_hidden_layers 0"),
            (with(&|v| v["vocab_size"] = json!(1u64 << 62)), "vocab_size"),
            (with(&|v| v["rope_theta"] = json!(0.0)), "rope_theta"),
            (
                with(&|v| {
                    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
                }),
                "low_freq_factor < high_freq_factor",
            ),
        ];
        for (got, want) in refused {
            let err = got.expect_err(want);
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn reads_qwen2() {
        let c = ModelConfig::from_json(QWEN).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (64, 896, 128));
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert_eq!(c.rope_theta, 1e6);
    }

    #[test]
    fn reads_llama3_scaling_both_spellings() {
        let old = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
            "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
            "rope_theta":500000.0,"eos_token_id":[128001,128008,128009],
            "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;
        let new = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
            "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
            "eos_token_id":[128001,128008,128009],
            "rope_parameters":{"rope_theta":500000.0,"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;
        let (a, b) = (
            ModelConfig::from_json(old).unwrap(),
            ModelConfig::from_json(new).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.eos_token_ids.len(), 3);
        assert_eq!(a.rope_theta, 5e5);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn generation_config_adds_stop_tokens_after_the_configs_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ModelConfig::from_json(QWEN).unwrap();
        c.add_generation_stops(dir.path()).unwrap();
        assert_eq!(c.eos_token_ids, vec![151645], "no file: unchanged");
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [151643, 151645]}"#,
        )
        .unwrap();
        c.add_generation_stops(dir.path()).unwrap();
        assert_eq!(c.eos_token_ids, vec![151645, 151643], "the config's EOS stays first");
        std::fs::write(dir.path().join("generation_config.json"), "{").unwrap();
        let err = format!("{:#}", c.add_generation_stops(dir.path()).unwrap_err());
        assert!(err.contains("generation_config.json"), "{err}");
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let err = |s: &str| format!("{:#}", ModelConfig::from_json(s).unwrap_err());
        assert!(err(&QWEN.replace("qwen2", "mistral")).contains("unsupported model_type \"mistral\""));
        assert!(err(&QWEN.replace("\"silu\"", "\"gelu\"")).contains("hidden_act \"gelu\""));
        assert!(err(&QWEN.replace("\"use_sliding_window\":false", "\"use_sliding_window\":true")).contains("sliding"));
        assert!(err(&QWEN.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3")).contains("multiple"));
        assert!(err("{\"model_type\": \"llama\",").contains("malformed config.json"));
        assert!(err(&QWEN.replace("\"vocab_size\":151936,", "")).contains("vocab_size"));
        let yarn = QWEN.replace(
            "\"max_position_embeddings\"",
            "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0},\"max_position_embeddings\"",
        );
        assert!(err(&yarn).contains("unsupported rope_scaling type \"yarn\""));
    }
}
