//! LoRA adapters: configuration, one flat f32 buffer for every A and B (llm.c style: one allocation
//! handed out as named views), PEFT's initialisation, and PEFT-compatible files.
//!
//! On a target projection `y = x W^T + b`, the adapter adds `s (dropout(x) A^T) B^T` with
//! A: [r, in], B: [out, r] and `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA).

use crate::load::arch::Proj;
use crate::load::config::ModelConfig;
use crate::load::weights::{save_safetensors, write_atomic, write_dir_atomic, SaveDtype, Weights};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::ops::Range;
use std::path::Path;

/// Adapter hyper-parameters (PEFT's `LoraConfig` fields of the same names).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    /// Which projections carry an adapter, in [`Proj::ALL`] order.
    pub targets: Vec<Proj>,
}

impl Default for LoraConfig {
    /// r 16, alpha 32, dropout 0.05 on all seven projections: the common QLoRA recipe.
    fn default() -> LoraConfig {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            use_rslora: false,
            targets: Proj::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// The scale `s` applied to the adapter branch.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// Parse a comma-separated list of module names (`q_proj,v_proj`) or `all`.
    pub fn parse_targets(s: &str) -> Result<Vec<Proj>> {
        if s == "all" {
            return Ok(Proj::ALL.to_vec());
        }
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim) {
            match Proj::ALL.iter().find(|p| p.name() == name) {
                Some(&p) => out.push(p),
                None => {
                    bail!("unknown LoRA target \"{name}\": use q_proj k_proj v_proj o_proj gate_proj up_proj down_proj")
                }
            }
        }
        out.sort_by_key(|&p| p as usize);
        out.dedup();
        Ok(out)
    }
}

/// Where one projection's adapter lives in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSlot {
    /// `[r, in]` A.
    pub a: Range<usize>,
    /// `[out, r]` B.
    pub b: Range<usize>,
    pub in_features: usize,
    pub out_features: usize,
}

/// Where one projection's adapter lies in the flat adapter buffers (the layout of
/// `LoraParams::data`): A [r, inp] from offset `a`, then B [out, r] from offset `b` = a + r inp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraAt {
    pub a: usize,
    pub b: usize,
    pub inp: usize,
    pub out: usize,
}

impl LoraAt {
    pub fn of(slot: &LoraSlot) -> LoraAt {
        assert_eq!(slot.a.end, slot.b.start, "B follows A in the adapter layout");
        LoraAt {
            a: slot.a.start,
            b: slot.b.start,
            inp: slot.in_features,
            out: slot.out_features,
        }
    }
}

/// All adapter parameters of a model in one buffer; gradients and optimizer moments use the same
/// layout, so an update is a loop over one slice.
#[derive(Clone, Debug)]
pub struct LoraParams {
    pub config: LoraConfig,
    /// Per layer, per projection (indexed by `Proj as usize`): its slot, if targeted.
    pub slots: Vec<[Option<LoraSlot>; 7]>,
    /// Every A and B, layer by layer, in [`Proj::ALL`] order, A before B.
    pub data: Vec<f32>,
}

impl LoraParams {
    /// Lay out the buffer for a model, all zeros.
    pub fn zeros(model: &ModelConfig, config: LoraConfig) -> LoraParams {
        let r = config.r;
        let mut next = 0;
        let mut take = |n: usize| {
            next += n;
            next - n..next
        };
        let slots = (0..model.num_layers)
            .map(|_| {
                Proj::ALL.map(|p| {
                    config.targets.contains(&p).then(|| {
                        let [out, inp] = p.shape(model);
                        LoraSlot {
                            a: take(r * inp),
                            b: take(out * r),
                            in_features: inp,
                            out_features: out,
                        }
                    })
                })
            })
            .collect();
        LoraParams {
            config,
            slots,
            data: vec![0.0; next],
        }
    }

    /// PEFT's initialisation: A from Kaiming-uniform with `a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in)),
    /// and B = 0, so the adapted model starts equal to the base.
    pub fn init(model: &ModelConfig, config: LoraConfig, seed: u64) -> LoraParams {
        let mut p = LoraParams::zeros(model, config);
        let mut rng = Rng::new(seed);
        for slot in p.slots.iter().flatten().flatten() {
            let bound = 1.0 / (slot.in_features as f32).sqrt();
            for x in &mut p.data[slot.a.clone()] {
                *x = rng.uniform_in(-bound, bound);
            }
        }
        p
    }

    pub fn slot(&self, layer: usize, p: Proj) -> Option<&LoraSlot> {
        self.slots[layer][p as usize].as_ref()
    }

    /// Number of trainable parameters.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Every (PEFT tensor name, shape, range in `data`), in layout order.
    pub fn named_ranges(&self) -> Vec<(String, [usize; 2], Range<usize>)> {
        let r = self.config.r;
        let mut out = Vec::new();
        for (i, layer) in self.slots.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(s) = &layer[p as usize] {
                    let base = format!("base_model.model.{}", p.path(i));
                    out.push((format!("{base}.lora_A.weight"), [r, s.in_features], s.a.clone()));
                    out.push((format!("{base}.lora_B.weight"), [s.out_features, r], s.b.clone()));
                }
            }
        }
        out
    }

    /// Write `adapter_model.safetensors` (f32) and `adapter_config.json` as PEFT does.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = self
            .named_ranges()
            .into_iter()
            .map(|(name, shape, range)| (name, shape.to_vec(), self.data[range].to_vec()))
            .collect();
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors, SaveDtype::F32, None)?;
        let c = &self.config;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.r,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.use_rslora,
            "target_modules": c.targets.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "use_dora": false,
        });
        write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )
    }

    /// Read a PEFT LoRA adapter directory for this model; every tensor is checked against the model's
    /// shapes and errors name the file and tensor.
    pub fn load_peft(dir: &Path, model: &ModelConfig) -> Result<LoraParams> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("malformed {}", cfg_path.display()))?;
        let field = |k: &str| {
            v.get(k)
                .with_context(|| format!("{} has no \"{k}\"", cfg_path.display()))
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            bail!("{}: peft_type is not \"LORA\"", cfg_path.display());
        }
        let targets = match field("target_modules")? {
            serde_json::Value::Array(xs) if !xs.is_empty() => {
                let names = xs.iter().map(|x| x.as_str()).collect::<Option<Vec<&str>>>();
                let names =
                    names.with_context(|| format!("{}: a target_modules entry is not a name", cfg_path.display()))?;
                LoraConfig::parse_targets(&names.join(",")).with_context(|| format!("in {}", cfg_path.display()))?
            }
            serde_json::Value::String(s) if s == "all-linear" => Proj::ALL.to_vec(),
            other => bail!("{}: unsupported target_modules {other}", cfg_path.display()),
        };
        // PEFT options that would change what the tensors mean, which this reader does not implement.
        for (key, plain) in [
            ("use_dora", serde_json::json!(false)),
            ("fan_in_fan_out", serde_json::json!(false)),
            ("bias", serde_json::json!("none")),
            ("layers_to_transform", serde_json::Value::Null),
        ] {
            if let Some(x) = v.get(key).filter(|x| **x != plain && !x.is_null()) {
                bail!("{}: {key} = {x} is not supported (only {plain})", cfg_path.display());
            }
        }
        let num = |k: &str| {
            field(k)?
                .as_f64()
                .filter(|x| x.is_finite())
                .with_context(|| format!("{}: \"{k}\" is not a finite number", cfg_path.display()))
        };
        let r = field("r")?
            .as_u64()
            .filter(|&r| r >= 1 && r as usize <= model.hidden_size);
        let r = r.with_context(|| {
            format!(
                "{}: \"r\" must be a whole number from 1 to the model's width {}",
                cfg_path.display(),
                model.hidden_size
            )
        })?;
        let config = LoraConfig {
            r: r as usize,
            alpha: num("lora_alpha")? as f32,
            dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
            use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            targets,
        };
        let mut params = LoraParams::zeros(model, config);
        let file = dir.join("adapter_model.safetensors");
        let weights = Weights::open_files(std::slice::from_ref(&file))?;
        let ranges = params.named_ranges();
        for (name, shape, range) in &ranges {
            let data = finite(&file, name, weights.f32(name, shape)?)?;
            params.data[range.clone()].copy_from_slice(&data);
        }
        // A tensor the configuration does not account for (another layer, another target) means
        // the adapter was made for a different model or configuration.
        let expected: std::collections::HashSet<&str> = ranges.iter().map(|(n, _, _)| n.as_str()).collect();
        if let Some(extra) = weights.names().into_iter().find(|n| !expected.contains(n)) {
            bail!(
                "{}: tensor {extra} is not one this model and {} ask for (another model's adapter?)",
                file.display(),
                cfg_path.display()
            );
        }
        Ok(params)
    }
}

impl LoraParams {
    /// Fold the adapter of projection `p` in layer `l` into its weight: `W += s B A`.
    /// w: [out, in].
    pub fn merge_into(&self, l: usize, p: Proj, w: &mut [f32]) {
        let Some(slot) = self.slot(l, p) else { return };
        let (r, k, s) = (self.config.r, slot.in_features, self.config.scale());
        let (a, b) = (&self.data[slot.a.clone()], &self.data[slot.b.clone()]);
        assert_eq!(w.len(), slot.out_features * k);
        for (j, row) in w.chunks_mut(k).enumerate() {
            for c in 0..r {
                let bjc = s * b[j * r + c];
                row.iter_mut()
                    .zip(&a[c * k..(c + 1) * k])
                    .for_each(|(o, &av)| *o += bjc * av);
            }
        }
    }
}

/// Write `out`: the base model of `base` with the adapter in `adapter` merged into its weights, as
/// bf16 safetensors, with config.json (dtype bfloat16) and the tokenizer files copied beside it.
pub fn merge_model(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let config = ModelConfig::from_file(&base.join("config.json"))?;
    let lora = LoraParams::load_peft(adapter, &config)?;
    let tokenizer = base.join("tokenizer.json");
    anyhow::ensure!(
        tokenizer.exists(),
        "{} is missing: the merged model needs it",
        tokenizer.display()
    );
    let weights = Weights::open_dir(base)?;
    let mut tensors = Vec::new();
    for name in weights.names() {
        let shape = weights.shape(name)?.to_vec();
        let mut data = weights.f32(name, &shape)?;
        for l in 0..config.num_layers {
            for p in Proj::ALL {
                if name == format!("{}.weight", p.path(l)) {
                    anyhow::ensure!(
                        shape == p.shape(&config),
                        "{}: tensor {name} has shape {shape:?}, but config.json makes it {:?}",
                        base.display(),
                        p.shape(&config)
                    );
                    lora.merge_into(l, p, &mut data);
                }
            }
        }
        tensors.push((name.to_string(), shape, data));
    }
    let cfg_path = base.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text)?;
    cfg["torch_dtype"] = json!("bfloat16");
    let copied = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ];
    let ours: Vec<&str> = ["model.safetensors", "config.json"].into_iter().chain(copied).collect();
    crate::load::weights::write_dir_atomic(out, &ours, |dir| {
        save_safetensors(&dir.join("model.safetensors"), &tensors, SaveDtype::BF16, None)?;
        write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        for f in copied {
            let (from, to) = (base.join(f), dir.join(f));
            if from.exists() {
                std::fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            }
        }
        Ok(())
    })
}

/// Rewrite the PEFT adapter in `src` into `dst` with its tensors stored as `dtype` (bf16 halves the
/// f32 file `train` writes, for shipping; loading widens either back to f32). Every tensor of the
/// file is converted, under its own name and shape, and must be finite; adapter_config.json is
/// copied. `dst` appears whole or not at all.
pub fn convert_peft(src: &Path, dst: &Path, dtype: SaveDtype) -> Result<()> {
    let file = src.join("adapter_model.safetensors");
    let config = src.join("adapter_config.json");
    let config_text = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
    let weights = Weights::open_files(std::slice::from_ref(&file))?;
    let mut tensors = Vec::new();
    for name in weights.names() {
        let shape = weights.shape(name)?.to_vec();
        let data = finite(&file, name, weights.f32(name, &shape)?)?;
        tensors.push((name.to_string(), shape, data));
    }
    let ours = ["adapter_model.safetensors", "adapter_config.json"];
    write_dir_atomic(dst, &ours, |dir| {
        save_safetensors(&dir.join(ours[0]), &tensors, dtype, None)?;
        write_atomic(&dir.join(ours[1]), &config_text)
    })
}

/// `data`, tensor `name` of `file`, if every value is finite; else an error naming the first one.
fn finite(file: &Path, name: &str, data: Vec<f32>) -> Result<Vec<f32>> {
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        bail!("{}: tensor {name} holds {} at index {i}", file.display(), data[i]);
    }
    Ok(data)
}
