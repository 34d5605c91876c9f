//! `train`: fine-tune LoRA adapters of a Llama/Qwen2 model on text-to-SQL examples (QLoRA: the
//! frozen base is quantized to NF4 unless --no-nf4).

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sqlora::engine::target::Target;
use sqlora::load::tokenizer::Tokenizer;
use sqlora::model::lora::{LoraConfig, LoraParams};
use sqlora::model::optim::{AdamWConfig, Decay};
use sqlora::sql::data::{encode, read_jsonl, Encoded};
use sqlora::train::{SqlEval, TrainConfig, Trainer};
use sqlora::util::progress::human_duration;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "QLoRA fine-tuning for text-to-SQL. With no option but --out, SmolLM2-135M-Instruct (fetched \
             once into the cache) learns the bundled shop database's questions.",
    args_override_self = true,
    after_help = "A TOML file given with --config sets any option by its name (lora_r = 16, schedule = \"cosine\"); \
                  options on the command line override it."
)]
struct Args {
    /// Training examples, JSONL: {"instruction", "input", "output"} per line [default: the bundled
    /// shop database and its generated questions, written to OUT/data].
    #[arg(long, help_heading = "Data")]
    data: Option<PathBuf>,
    /// Validation examples (same format): loss every --eval-every steps, execution accuracy when
    /// they name a database [default: the shop questions held out, without --data].
    #[arg(long, help_heading = "Data")]
    val: Option<PathBuf>,
    /// Drop examples longer than this many tokens.
    #[arg(long, default_value_t = 1024, help_heading = "Data")]
    max_seq_len: usize,
    /// Put examples of similar length in the same micro-batch (within shuffled groups).
    #[arg(long, help_heading = "Data")]
    group_by_length: bool,

    /// HF model directory (config.json, model.safetensors, tokenizer.json), a .gguf file, or the
    /// name of a model `sqlora fetch-model` knows (smollm2, qwen05) [default: smollm2,
    /// SmolLM2-135M-Instruct, fetched into the cache on first use].
    #[arg(long, help_heading = "Model")]
    model: Option<PathBuf>,
    /// Keep the frozen base in f32 instead of NF4 (plain LoRA rather than QLoRA).
    #[arg(long, help_heading = "Model")]
    no_nf4: bool,

    /// Adapter rank.
    #[arg(long, default_value_t = 16, help_heading = "LoRA")]
    lora_r: usize,
    /// Adapter scale numerator: the update is scaled by alpha / r.
    #[arg(long, default_value_t = 32.0, help_heading = "LoRA")]
    lora_alpha: f32,
    /// Dropout on the adapters' input during training.
    #[arg(long, default_value_t = 0.05, help_heading = "LoRA")]
    lora_dropout: f32,
    /// Scale the adapter by alpha/sqrt(r) instead of alpha/r.
    #[arg(long, help_heading = "LoRA")]
    rslora: bool,
    /// Projections to adapt: `all` or a list like `q_proj,v_proj`.
    #[arg(long, default_value = "all", help_heading = "LoRA")]
    targets: String,
    /// Start from this PEFT adapter (a directory `train` or PEFT wrote) instead of a fresh
    /// initialisation, to train it further; its rank, alpha, scaling and targets must be this
    /// run's. The optimizer and the schedule start afresh. A checkpoint `--resume` finds wins.
    #[arg(long, help_heading = "LoRA")]
    init_adapter: Option<PathBuf>,

    /// Passes over the training data.
    #[arg(long, default_value_t = 1, help_heading = "Schedule")]
    epochs: usize,
    /// Stop after this many optimizer steps (the schedule then spans exactly these).
    #[arg(long, help_heading = "Schedule")]
    max_steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4, help_heading = "Schedule")]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, help_heading = "Schedule")]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, help_heading = "Schedule")]
    lr: f32,
    /// Steps of linear warmup to the peak.
    #[arg(long, default_value_t = 10, help_heading = "Schedule")]
    warmup: usize,
    /// Decay after the warmup: constant, linear or cosine.
    #[arg(long, default_value = "cosine", help_heading = "Schedule")]
    schedule: String,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0, help_heading = "Schedule")]
    weight_decay: f32,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0, help_heading = "Schedule")]
    max_grad_norm: f32,
    /// Seed of the adapters' initialisation, the data order and dropout.
    #[arg(long, default_value_t = 42, help_heading = "Schedule")]
    seed: u64,
    /// Skip steps whose loss or gradient is not finite; stop after this many in a row.
    #[arg(long, default_value_t = 5, help_heading = "Schedule")]
    max_bad_steps: usize,

    /// Validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 0, help_heading = "Evaluation")]
    eval_every: usize,
    /// Execution accuracy on this many validation questions (those naming a database), at the end
    /// and every --sql-eval-every steps; the best adapter is kept in OUT/best. 0 turns it off.
    #[arg(long, default_value_t = 32, help_heading = "Evaluation")]
    sql_eval_samples: usize,
    /// Execution accuracy every N steps (0: only at the end).
    #[arg(long, default_value_t = 0, help_heading = "Evaluation")]
    sql_eval_every: usize,
    /// Longest SQL generated during evaluation, in tokens.
    #[arg(long, default_value_t = 128, help_heading = "Evaluation")]
    sql_max_new_tokens: usize,
    /// Directory holding <db_id>/<db_id>.sqlite, for examples that name a db_id.
    #[arg(long, help_heading = "Evaluation")]
    db_root: Option<PathBuf>,

    /// Output directory: the adapter, checkpoints, metrics.jsonl, curves.png.
    #[arg(long, help_heading = "Output and checkpoints")]
    out: PathBuf,
    /// TOML file of options (keys are the option names, with _ or -); the command line overrides it.
    #[arg(long, help_heading = "Output and checkpoints")]
    config: Option<PathBuf>,
    /// Write a checkpoint (adapter, optimizer moments, position) every N steps (0: only at the end).
    #[arg(long, default_value_t = 0, help_heading = "Output and checkpoints")]
    save_every: usize,
    /// Keep the newest N checkpoints (and best/), deleting older ones once a new one is written (0: keep all).
    #[arg(long, default_value_t = 3, help_heading = "Output and checkpoints")]
    save_total_limit: usize,
    /// Continue from the newest checkpoint in --out.
    #[arg(long, help_heading = "Output and checkpoints")]
    resume: bool,

    /// Compute device: `auto` (`cuda` when a GPU and kernels are present, else `cpu`), `cuda` (our
    /// kernels on GPU 0), `cpu` (the CPU engine: SIMD kernels, NF4 base, bf16 activations),
    /// `reference` (the f32 reference, for checks) or `cpu-bf16` (the device step with the
    /// reference's arithmetic rounded to bf16: slow, for checks).
    #[arg(long, default_value = "auto", help_heading = "Device and memory")]
    device: String,
    /// Recompute each layer's activations in the backward instead of keeping them.
    #[arg(long, help_heading = "Device and memory")]
    checkpointing: bool,
    /// Memory the run may use, in GiB [default: the GPU's free memory, or the machine's available
    /// memory on the CPU]. When the plan exceeds it and checkpointing would make it fit,
    /// checkpointing is turned on.
    #[arg(long, help_heading = "Device and memory")]
    memory_budget: Option<f64>,
    /// Print the memory plan and a throughput estimate, then exit (non-zero if it does not fit).
    #[arg(long, help_heading = "Device and memory")]
    dry_run: bool,
}

fn main() {
    let args = match with_config_file(std::env::args().collect()) {
        Ok(a) => Args::parse_from(a),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = sqlora::util::on_workers(|| run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Insert the options of a `--config` TOML file before the command-line arguments, so that the
/// command line wins (the last occurrence of an option is the one used).
fn with_config_file(args: Vec<String>) -> Result<Vec<String>> {
    use clap::CommandFactory;
    let at = args.iter().position(|a| a == "--config");
    let path = match at {
        Some(i) => args.get(i + 1).context("--config needs a file")?.clone(),
        None => match args.iter().find_map(|a| a.strip_prefix("--config=")) {
            Some(p) => p.to_string(),
            None => return Ok(args),
        },
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{path} is not valid TOML"))?;
    let known: Vec<String> = Args::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let mut from_file = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        if !known.contains(&id) || id == "config" {
            bail!("{path}: unknown option \"{key}\" (see train --help)");
        }
        let flag = format!("--{}", id.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => from_file.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => from_file.extend([flag, s]),
            toml::Value::Integer(i) => from_file.extend([flag, i.to_string()]),
            toml::Value::Float(f) => from_file.extend([flag, f.to_string()]),
            toml::Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))
                    .collect();
                from_file.extend([flag, parts.join(",")]);
            }
            other => bail!("{path}: option \"{key}\" has an unsupported value {other}"),
        }
    }
    let mut out = vec![args[0].clone()];
    out.extend(from_file);
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

/// `--dry-run`: the plan, the estimate, and whether it fits.
fn dry_run(a: &Args, model: &Path, target: &Target) -> Result<()> {
    use sqlora::engine::plan::{
        available_memory, flops_per_token, measure_cpu_flops, measure_engine_flops, plan, refusal, PlanInput,
    };
    let config = sqlora::load::open(model)?.config;
    let input = PlanInput {
        lora_r: a.lora_r,
        lora_targets: LoraConfig::parse_targets(&a.targets)?,
        micro_batch: a.batch,
        max_seq_len: a.max_seq_len,
        checkpointing: a.checkpointing,
        nf4: !a.no_nf4,
        threads: rayon::current_num_threads(),
        device: target.stores_bf16(),
    };
    let p = plan(&config, &input);
    let gpu = target.gpu();
    let where_ = gpu.as_ref().map_or("CPU".to_string(), |g| g.name());
    println!(
        "memory plan ({where_}; {} sequences of up to {} tokens per micro-batch):",
        a.batch, a.max_seq_len
    );
    println!("{p}");
    let per_token = flops_per_token(&config, a.max_seq_len / 2, a.checkpointing);
    if gpu.is_some() {
        println!(
            "{:.1} GFLOP per token; for the GPU's rate on this shape run `sqlora bench train`",
            per_token / 1e9
        );
    } else {
        // The engine's GEMM rate, of which a whole step reaches about 60%; the reference's matmul
        // rate, of which it reaches about 70% (docs/cpu-performance.md).
        let (rate, share, what) = match target {
            Target::CpuSimd(cpu) => (measure_engine_flops(cpu.isa), 0.6, "the CPU engine's NF4 GEMM"),
            _ => (measure_cpu_flops(), 0.7, "the reference's matmul"),
        };
        println!(
            "estimated throughput: {:.0} tokens/s ({:.1} GFLOP per token at {:.0}% of {:.1} GFLOP/s, {what} measured on this machine)",
            share * rate / per_token,
            per_token / 1e9,
            share * 100.0,
            rate / 1e9
        );
    }
    let budget = match (a.memory_budget, &gpu) {
        (Some(g), _) => Some((g * (1u64 << 30) as f64) as u64),
        (None, Some(g)) => Some(g.total_memory() as u64),
        (None, None) => available_memory(),
    };
    match budget {
        Some(b) if p.total() > b => {
            let why = refusal(&config, &input, b).expect("over budget");
            bail!("{}", why.lines().next().unwrap_or_default())
        }
        Some(b) => println!("fits: {:.3} GiB available", b as f64 / (1u64 << 30) as f64),
        None => println!("(available memory unknown)"),
    }
    Ok(())
}

fn load_examples(path: &Path, tok: &Tokenizer, eos: u32, max_len: usize) -> Result<Vec<Encoded>> {
    let examples = read_jsonl(path)?;
    let mut out = Vec::with_capacity(examples.len());
    for ex in &examples {
        let e = encode(tok, ex, eos)?;
        if e.tokens.len() <= max_len {
            out.push(e);
        }
    }
    let dropped = examples.len() - out.len();
    if dropped > 0 {
        eprintln!(
            "{}: dropped {dropped} of {} examples longer than {max_len} tokens",
            path.display(),
            examples.len()
        );
    }
    if out.is_empty() {
        bail!(
            "{}: every example is longer than --max-seq-len {max_len}",
            path.display()
        );
    }
    Ok(out)
}

/// Put the adapter in `dir` (PEFT files) in place of the trainer's fresh one; its layout must be the
/// run's.
fn start_from(trainer: &mut Trainer, dir: &Path) -> Result<()> {
    let init = LoraParams::load_peft(dir, &trainer.model.config)?;
    let (got, want) = (&init.config, &trainer.lora.config);
    let same =
        got.r == want.r && got.alpha == want.alpha && got.use_rslora == want.use_rslora && got.targets == want.targets;
    if !same {
        bail!(
            "--init-adapter {}: the adapter has rank {}, alpha {}, rslora {}, targets {:?}; this run \
             asks for rank {}, alpha {}, rslora {}, targets {:?} (set --lora-r, --lora-alpha, --rslora, \
             --targets to match)",
            dir.display(),
            got.r,
            got.alpha,
            got.use_rslora,
            got.targets,
            want.r,
            want.alpha,
            want.use_rslora,
            want.targets
        );
    }
    trainer.lora.data.copy_from_slice(&init.data);
    Ok(())
}

/// Whether the memory budget calls for activation checkpointing (said on stderr when it does).
fn auto_checkpointing(
    a: &Args,
    c: &sqlora::load::config::ModelConfig,
    train: &[Encoded],
    val: &[Encoded],
    target: &Target,
) -> Result<bool> {
    use sqlora::engine::plan::{available_memory, checkpointing_needed, PlanInput};
    use sqlora::engine::DeviceBase;
    let budget = match (a.memory_budget, target.gpu()) {
        (Some(g), _) => Some((g * (1u64 << 30) as f64) as u64),
        (None, Some(g)) => g.memory_free().map(|b| b as u64),
        (None, None) => available_memory(),
    };
    let Some(budget) = budget else { return Ok(false) };
    let input = PlanInput {
        lora_r: a.lora_r,
        lora_targets: LoraConfig::parse_targets(&a.targets)?,
        micro_batch: a.batch,
        max_seq_len: train.iter().chain(val).map(|e| e.tokens.len()).max().unwrap_or(1),
        checkpointing: false,
        nf4: !a.no_nf4,
        threads: rayon::current_num_threads(),
        device: target.stores_bf16(),
    };
    let needed = checkpointing_needed(c, &input, budget);
    if needed {
        eprintln!(
            "the memory plan does not fit in {:.2} GiB without activation checkpointing: turning it on",
            budget as f64 / (1u64 << 30) as f64
        );
    }
    Ok(needed)
}

fn run(a: Args) -> Result<()> {
    // The GPU, when there is one, is opened first: it quantizes each projection as the model loads
    // (the same bytes as the CPU would write), and its free memory is the default budget of the plan.
    let target = sqlora::sql::device::open(&a.device, Target::cpu()?)?;
    let model_path = sqlora::load::fetch::resolve(a.model.as_deref())?;
    if a.dry_run {
        return dry_run(&a, &model_path, &target);
    }
    let source = sqlora::load::open(&model_path)?;
    let tok = source.tokenizer()?;
    let model = target.load_model(&source, !a.no_nf4)?;
    tok.check_fits(model.config.vocab_size, &model_path)?;
    let eos = *model
        .config
        .eos_token_ids
        .first()
        .context("config.json has no eos_token_id")?;
    let (data, val_path) = match &a.data {
        Some(d) => (d.clone(), a.val.clone()),
        None => {
            let dir = a.out.join("data");
            let (n_train, n_val) = sqlora::sql::data::shop::write_shop_dataset(&dir, 25, a.seed)?;
            eprintln!(
                "no --data: using the bundled shop dataset ({n_train} training, {n_val} validation pairs) in {}",
                dir.display()
            );
            (dir.join("train.jsonl"), a.val.clone().or(Some(dir.join("val.jsonl"))))
        }
    };
    let train = load_examples(&data, &tok, eos, a.max_seq_len)?;
    let val = match &val_path {
        Some(p) => load_examples(p, &tok, eos, a.max_seq_len)?,
        None => vec![],
    };
    let checkpointing = a.checkpointing || auto_checkpointing(&a, &model.config, &train, &val, &target)?;
    let config = TrainConfig {
        lora: LoraConfig {
            r: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            use_rslora: a.rslora,
            targets: LoraConfig::parse_targets(&a.targets)?,
        },
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        lr: a.lr,
        warmup_steps: a.warmup,
        decay: Decay::parse(&a.schedule)?,
        max_grad_norm: a.max_grad_norm,
        epochs: a.epochs,
        max_steps: a.max_steps,
        micro_batch: a.batch,
        grad_accum: a.grad_accum,
        checkpointing,
        group_by_length: a.group_by_length,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        save_total_limit: a.save_total_limit,
        max_bad_steps: a.max_bad_steps,
    };
    let mut trainer = Trainer::new(model, train, val, config, &a.out, &model_path.display().to_string())?;
    if let (Some(vp), true) = (&val_path, a.sql_eval_samples > 0) {
        let examples: Vec<_> = read_jsonl(vp)?
            .into_iter()
            .filter(|e| e.db_id.is_some() || e.db_path.is_some())
            .take(a.sql_eval_samples)
            .collect();
        if examples.is_empty() {
            eprintln!(
                "{}: no example names a database; execution accuracy is not measured",
                vp.display()
            );
        } else {
            let base = vp.parent().unwrap_or(Path::new("."));
            trainer.sql_eval = Some(SqlEval {
                tasks: sqlora::sql::evaluate::tasks(&examples, &tok, base, a.db_root.as_deref())
                    .with_context(|| format!("in {}", vp.display()))?,
                tokenizer: tok.clone(),
                every: a.sql_eval_every,
                max_new_tokens: a.sql_max_new_tokens,
            });
        }
    }
    if let Some(dir) = &a.init_adapter {
        start_from(&mut trainer, dir)?;
        eprintln!("adapters start from {}", dir.display());
    }
    if a.resume {
        match trainer.latest_checkpoint() {
            Some(dir) => {
                trainer.resume_from(&dir)?;
                eprintln!("resumed from {} at step {}", dir.display(), trainer.state.step);
            }
            None => eprintln!(
                "no checkpoint in {}: starting at step 0{}",
                a.out.display(),
                match &a.init_adapter {
                    Some(dir) => format!(" from the adapter in {}", dir.display()),
                    None => " with fresh adapters".into(),
                }
            ),
        }
    }
    let cap = trainer.step_capacity();
    let engine = target.engine(&trainer.model, &trainer.lora, cap, checkpointing)?;
    trainer.use_engine(engine)?;
    eprintln!("device: {}", trainer.engine.describe());
    let total = trainer.total_steps();
    eprintln!(
        "training {} adapter parameters ({} examples/step, {total} steps, NF4 base: {})",
        trainer.lora.len(),
        trainer.examples_per_step(),
        !a.no_nf4
    );

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C does not wait
        }
        eprintln!("\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;

    // A live bar on a terminal; one line per step otherwise (logs, CI). Evaluations always get a line.
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_position(trainer.state.step as u64);
        Some(bar)
    } else {
        None
    };
    let bar_for_evals = bar.clone();
    trainer.on_eval = Some(Box::new(move |what: &str| match &bar_for_evals {
        Some(bar) => bar.set_message(format!("evaluating: {what}")),
        None => eprintln!("evaluating: {what}"),
    }));
    trainer.run(total, &|| stop.load(Ordering::SeqCst), &mut |r, evals| {
        let skipped = if r.skipped { "  SKIPPED (non-finite)" } else { "" };
        let memory = r
            .device_memory
            .map(|b| format!("  mem {:.2} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_default();
        let eta = if r.step < total {
            format!("  ETA {}", human_duration(r.eta_s))
        } else {
            String::new()
        };
        let line = format!(
            "epoch {:.2}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s  {} elapsed{eta}{memory}{skipped}",
            r.epoch,
            r.loss,
            r.lr,
            r.grad_norm,
            r.tokens as f64 / r.seconds,
            human_duration(r.elapsed_s),
        );
        let mut evals_line = evals.loss.map(|e| format!("  eval loss {e:.4}")).unwrap_or_default();
        if let Some(a) = evals.exec_accuracy {
            evals_line += &format!("  execution accuracy {a:.4}");
        }
        match &bar {
            Some(bar) => {
                bar.set_position(r.step as u64);
                bar.set_message(line);
                if !evals_line.is_empty() {
                    bar.println(format!("step {}:{evals_line}", r.step));
                }
            }
            None => eprintln!("step {:>5}/{total}  {line}{evals_line}", r.step),
        }
    })?;
    if let Some(bar) = &bar {
        bar.finish();
    }
    if stop.load(Ordering::SeqCst) {
        eprintln!("stopped at step {}; resume with --resume", trainer.state.step);
        std::process::exit(130);
    }
    trainer.save_final()?;
    eprintln!("adapter written to {}", a.out.display());
    Ok(())
}
