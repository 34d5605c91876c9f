//! Seeded tiny random models for tests: an HF directory (config.json, model.safetensors,
//! tokenizer.json) that transformers and sqlora both load. The same variant always produces the
//! same bytes, so golden files made from it by tests/reference/make_golden.py stay valid.

use crate::load::weights::{save_safetensors, write_atomic, SaveDtype};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The tiny model variants: both families, tied and untied heads, three storage dtypes, GQA and MHA,
/// an explicit head_dim, and llama3 rope scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyVariant {
    /// Llama, untied head, bf16, GQA 4/2, llama3 rope scaling.
    Llama,
    /// Llama, tied head, f32, MHA, head_dim 24 (q width 96 != d 64).
    LlamaTied,
    /// Qwen2, untied head, bf16, GQA 4/1, q/k/v bias.
    Qwen2,
    /// Qwen2, tied head, f16, GQA 8/2, head_dim 8.
    Qwen2Tied,
}

impl TinyVariant {
    pub const ALL: [TinyVariant; 4] = [
        TinyVariant::Llama,
        TinyVariant::LlamaTied,
        TinyVariant::Qwen2,
        TinyVariant::Qwen2Tied,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TinyVariant::Llama => "llama",
            TinyVariant::LlamaTied => "llama-tied",
            TinyVariant::Qwen2 => "qwen2",
            TinyVariant::Qwen2Tied => "qwen2-tied",
        }
    }

    pub fn parse(s: &str) -> Result<TinyVariant> {
        match TinyVariant::ALL.into_iter().find(|v| v.name() == s) {
            Some(v) => Ok(v),
            None => bail!("unknown tiny variant \"{s}\": one of llama, llama-tied, qwen2, qwen2-tied"),
        }
    }

    fn is_llama(self) -> bool {
        matches!(self, TinyVariant::Llama | TinyVariant::LlamaTied)
    }
}

/// Token ids of the tiny tokenizer: 256 byte tokens, then three special tokens; the model's vocab is
/// padded past them, as real checkpoints often are.
pub const TINY_VOCAB: usize = 272;
const SPECIAL_BASE: u32 = 256;

/// The HF config.json of a variant.
pub fn tiny_config(v: TinyVariant) -> Value {
    let (model_type, heads, kv_heads, head_dim, layers, theta) = match v {
        TinyVariant::Llama => ("llama", 4, 2, 16, 2, 10_000.0),
        TinyVariant::LlamaTied => ("llama", 4, 4, 24, 2, 500_000.0),
        TinyVariant::Qwen2 => ("qwen2", 4, 1, 16, 3, 1_000_000.0),
        TinyVariant::Qwen2Tied => ("qwen2", 8, 2, 8, 2, 1_000_000.0),
    };
    let tied = matches!(v, TinyVariant::LlamaTied | TinyVariant::Qwen2Tied);
    let (bos, eos) = if v.is_llama() {
        (SPECIAL_BASE, SPECIAL_BASE + 1)
    } else {
        (SPECIAL_BASE, SPECIAL_BASE + 2)
    };
    let dtype = match v {
        TinyVariant::LlamaTied => "float32",
        TinyVariant::Qwen2Tied => "float16",
        _ => "bfloat16",
    };
    let mut c = json!({
        "architectures": [if v.is_llama() { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": model_type,
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": if v.is_llama() { 1e-5 } else { 1e-6 },
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
    });
    if v == TinyVariant::Llama {
        // Short original context so that all three frequency bands occur at head_dim 16.
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        c["attention_bias"] = json!(false);
    }
    if !v.is_llama() {
        c["use_sliding_window"] = json!(false);
    }
    c
}

/// GPT-2's reversible byte-to-character map used by byte-level BPE: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 onwards, in byte order.
pub fn byte_to_char(b: u8) -> char {
    let printable = |x: u32| (0x21..=0x7e).contains(&x) || (0xa1..=0xac).contains(&x) || (0xae..=0xff).contains(&x);
    if printable(b as u32) {
        return b as char;
    }
    let rank = (0..b as u32).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).expect("valid code point")
}

/// A byte-level BPE tokenizer.json: one token per byte (id = byte value) and three special tokens.
/// The llama variant's post-processor prepends BOS, like Llama's; the qwen2 variant adds nothing.
pub fn tiny_tokenizer(v: TinyVariant) -> Value {
    let specials: [&str; 3] = if v.is_llama() {
        ["<s>", "</s>", "<pad>"]
    } else {
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    };
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), json!(b as u32)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": SPECIAL_BASE + i as u32, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let post = if v.is_llama() {
        json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [SPECIAL_BASE], "tokens": ["<s>"]}}})
    } else {
        Value::Null
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Every tensor of a variant, in HF naming, drawn from a generator seeded by the variant.
/// Embeddings are N(0, 0.1^2), small beside the blocks' outputs, so a tied head does not just echo
/// the input token; projections are N(0, 1/in) so activations stay O(1); norm gains are 1 + N(0, 0.1^2) so that a
/// missing gain shows; biases are N(0, 0.1^2).
pub fn tiny_tensors(v: TinyVariant) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let c = crate::load::config::ModelConfig::from_json(&tiny_config(v).to_string()).expect("tiny config is valid");
    let mut rng = Rng::new(0x5179_104a ^ v as u64);
    let (d, vocab) = (c.hidden_size, c.vocab_size);
    let mut t = Vec::new();
    let gain = |rng: &mut Rng, name: String| {
        let g: Vec<f32> = rng.normal_vec(d, 0.1).into_iter().map(|x| 1.0 + x).collect();
        (name, vec![d], g)
    };
    t.push((
        "model.embed_tokens.weight".into(),
        vec![vocab, d],
        rng.normal_vec(vocab * d, 0.1),
    ));
    for i in 0..c.num_layers {
        t.push(gain(&mut rng, format!("model.layers.{i}.input_layernorm.weight")));
        t.push(gain(
            &mut rng,
            format!("model.layers.{i}.post_attention_layernorm.weight"),
        ));
        for p in crate::load::arch::Proj::ALL {
            let [out, inp] = p.shape(&c);
            let w = rng.normal_vec(out * inp, 1.0 / (inp as f32).sqrt());
            t.push((format!("{}.weight", p.path(i)), vec![out, inp], w));
            if p.has_bias(&c) {
                t.push((format!("{}.bias", p.path(i)), vec![out], rng.normal_vec(out, 0.1)));
            }
        }
    }
    t.push(gain(&mut rng, "model.norm.weight".into()));
    if !c.tie_word_embeddings {
        t.push((
            "lm_head.weight".into(),
            vec![vocab, d],
            rng.normal_vec(vocab * d, 1.0 / (d as f32).sqrt()),
        ));
    }
    t
}

/// Write a variant's HF directory into `dir` (created if needed).
pub fn write_tiny_model(dir: &Path, v: TinyVariant) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let dtype = match v {
        TinyVariant::LlamaTied => SaveDtype::F32,
        TinyVariant::Qwen2Tied => SaveDtype::F16,
        _ => SaveDtype::BF16,
    };
    save_safetensors(&dir.join("model.safetensors"), &tiny_tensors(v), dtype, None)?;
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&tiny_config(v))?.as_bytes(),
    )?;
    write_atomic(
        &dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tiny_tokenizer(v))?.as_bytes(),
    )?;
    Ok(())
}

/// A variant's model built in memory from [`tiny_tensors`] (f32, without the dtype round trip of
/// [`write_tiny_model`]).
pub fn tiny_model(v: TinyVariant) -> crate::model::forward::Model {
    struct Mem(std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>);
    impl crate::load::arch::TensorSource for Mem {
        fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
            match self.0.get(name) {
                Some((s, data)) if s == shape => Ok(data.clone()),
                Some((s, _)) => bail!("{name} is {s:?}, not {shape:?}"),
                None => bail!("no tensor {name}"),
            }
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
    }
    let tensors = Mem(tiny_tensors(v).into_iter().map(|(n, s, d)| (n, (s, d))).collect());
    let c = crate::load::config::ModelConfig::from_json(&tiny_config(v).to_string()).expect("tiny config is valid");
    crate::model::forward::Model::from_weights(c, &tensors).expect("tiny tensors match their config")
}

/// A packed batch of random tokens below `vocab`: one sequence per length, labelled on its second
/// half (as a prompt / answer split would be).
pub fn tiny_batch(seed: u64, lens: &[usize], vocab: usize) -> crate::model::autograd::Batch {
    let mut rng = Rng::new(seed);
    let seqs: Vec<(Vec<u32>, Vec<Option<u32>>)> = lens
        .iter()
        .map(|&n| {
            let tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
            let targets = (0..n)
                .map(|i| (i >= n / 2 && i + 1 < n).then(|| tokens[i + 1]))
                .collect();
            (tokens, targets)
        })
        .collect();
    crate::model::autograd::Batch::pack(seqs.iter().map(|(t, y)| (&t[..], &y[..])))
}

/// A seeded adapter for a tiny variant, PEFT-initialised and then given a random B (N(0, 0.2^2)) so
/// that the adapter changes the model and A receives gradient. The llama variants adapt all seven
/// projections; qwen2 uses rsLoRA; qwen2-tied adapts only q_proj and v_proj (PEFT's classic default).
pub fn tiny_adapter(v: TinyVariant) -> crate::model::lora::LoraParams {
    use crate::load::arch::Proj;
    use crate::model::lora::{LoraConfig, LoraParams};
    let c = crate::load::config::ModelConfig::from_json(&tiny_config(v).to_string()).expect("tiny config is valid");
    let config = LoraConfig {
        r: 4,
        alpha: if v == TinyVariant::Qwen2 { 6.0 } else { 8.0 },
        dropout: 0.0,
        use_rslora: v == TinyVariant::Qwen2,
        targets: if v == TinyVariant::Qwen2Tied {
            vec![Proj::Q, Proj::V]
        } else {
            Proj::ALL.to_vec()
        },
    };
    let mut p = LoraParams::init(&c, config, 0xada7 ^ v as u64);
    let mut rng = Rng::new(0xb0b ^ v as u64);
    for slot in p.slots.clone().iter().flatten().flatten() {
        for x in &mut p.data[slot.b.clone()] {
            *x = rng.normal() * 0.2;
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_known_chars() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(byte_to_char(b' '), '\u{120}'); // 'Ġ', the familiar space marker
        assert_eq!(byte_to_char(b'\n'), '\u{10a}'); // 'Ċ'
    }
}
