//! `sqlora`: the toolbox around the training engine.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sqlora::config::ModelConfig;
use sqlora::model::Model;
use sqlora::tiny::{write_tiny_model, TinyVariant};
use sqlora::tokenizer::Tokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "sqlora",
    version,
    about = "QLoRA fine-tuning of small LLMs for text-to-SQL: the toolbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the greedy continuation of a raw prompt (just the generated text).
    Ask {
        /// HF model directory (config.json, model.safetensors[.index.json], tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Stop after this many new tokens (or at EOS).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Compute device; only `cpu` is available in this build.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Run the base model quantized to NF4 (as QLoRA trains it) instead of f32 as stored.
        #[arg(long)]
        nf4: bool,
        /// Apply a LoRA adapter (a PEFT adapter directory, as `train` writes).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt, tokenized as is.
        prompt: String,
    },
    /// Merge a LoRA adapter into its base model and write the result as bf16 safetensors.
    Merge {
        /// Base HF model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Output model directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a model directory: architecture, parameter counts, NF4 footprint.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Write a seeded tiny random model (HF directory) for tests and experiments.
    TinyModel {
        /// llama, llama-tied, qwen2 or qwen2-tied.
        #[arg(long)]
        variant: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Also write a seeded LoRA adapter for it (PEFT files) into this directory.
        #[arg(long)]
        adapter_out: Option<PathBuf>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ask {
            model,
            max_new_tokens,
            device,
            nf4,
            adapter,
            prompt,
        } => ask(&model, max_new_tokens, &device, nf4, adapter.as_deref(), &prompt),
        Command::Merge { model, adapter, out } => sqlora::lora::merge_model(&model, &adapter, &out),
        Command::Info { model } => info(&model),
        Command::TinyModel {
            variant,
            out,
            adapter_out,
        } => {
            let v = TinyVariant::parse(&variant)?;
            write_tiny_model(&out, v)?;
            match adapter_out {
                Some(dir) => sqlora::tiny::tiny_adapter(v).save_peft(&dir, &out.display().to_string()),
                None => Ok(()),
            }
        }
    }
}

/// Stop ids: the config's eos_token_id plus generation_config.json's, if that file exists.
fn stop_ids(dir: &Path, config: &ModelConfig) -> Result<Vec<u32>> {
    let mut ids = config.eos_token_ids.clone();
    let gen = dir.join("generation_config.json");
    if gen.exists() {
        let text = std::fs::read_to_string(&gen).with_context(|| format!("reading {}", gen.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("malformed {}", gen.display()))?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Array(xs)) => ids.extend(xs.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
            Some(x) => ids.extend(x.as_u64().map(|x| x as u32)),
            None => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn ask(dir: &Path, max_new: usize, device: &str, nf4: bool, adapter: Option<&Path>, prompt: &str) -> Result<()> {
    if device != "cpu" {
        bail!("device \"{device}\" is not available: this build runs on the CPU reference backend (--device cpu)");
    }
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let mut model = Model::load_dir(dir)?;
    if nf4 {
        model = model.quantize_nf4();
    }
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let eos = stop_ids(dir, &model.config)?;
    let lora = match adapter {
        Some(a) => Some(sqlora::lora::LoraParams::load_peft(a, &model.config)?),
        None => None,
    };
    let out = sqlora::generate::greedy(&model, lora.as_ref(), &ids, max_new, &eos);
    let text = tokenizer.decode(&out)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}

fn info(dir: &Path) -> Result<()> {
    let model = Model::load_dir(dir)?;
    let c = &model.config.clone();
    let linear: usize = sqlora::model::Proj::ALL
        .iter()
        .map(|p| p.shape(c).iter().product::<usize>())
        .sum::<usize>()
        * c.num_layers;
    let embed = c.vocab_size * c.hidden_size;
    let head = if c.tie_word_embeddings { 0 } else { embed };
    let nf4 = model.quantize_nf4();
    let nf4_bytes: usize = nf4
        .layers
        .iter()
        .flat_map(|l| l.proj.iter())
        .map(|p| match &p.weight {
            sqlora::backend::cpu::LinearWeight::Nf4(q) => q.size_bytes(),
            sqlora::backend::cpu::LinearWeight::Dense(w) => 4 * w.len(),
        })
        .sum();
    println!("architecture     {:?}", c.arch);
    println!(
        "layers           {} (d {}, ffn {}, heads {}/{} kv, head_dim {})",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!(
        "vocab            {} (tied head: {})",
        c.vocab_size, c.tie_word_embeddings
    );
    println!(
        "linear params    {:.1} M -> NF4 {:.1} MiB ({:.3} bits/param)",
        linear as f64 / 1e6,
        nf4_bytes as f64 / (1 << 20) as f64,
        nf4_bytes as f64 * 8.0 / linear as f64
    );
    println!(
        "embed/head       {:.1} M params (kept in 16-bit)",
        (embed + head) as f64 / 1e6
    );
    Ok(())
}
