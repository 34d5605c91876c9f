//! The training loop: seeded epoch shuffles, micro-batches with gradient accumulation, AdamW with
//! clipping and a schedule, periodic validation loss, atomic checkpoints, and exact resume.
//!
//! Everything random is a function of the seed and the position in training (the epoch's shuffle of
//! the seed and epoch; dropout masks of the seed, step and micro-batch), so a run resumed from a
//! checkpoint continues exactly as the uninterrupted run would have.

pub mod plot;

use crate::engine::reference::Reference;
use crate::engine::step::Engine;
use crate::engine::{Device, StepEngine};
use crate::load::weights::{save_safetensors, write_atomic, SaveDtype, Weights};
use crate::model::autograd::{Batch, GradOptions};
use crate::model::forward::Model;
use crate::model::lora::{LoraConfig, LoraParams};
use crate::model::optim::{clip_factor, AdamW, AdamWConfig, Decay, HostPages, Schedule, PAGE};
use crate::sql::data::Encoded;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything that shapes a run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    pub adamw: AdamWConfig,
    pub lr: f32,
    pub warmup_steps: usize,
    pub decay: Decay,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f32,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs` for the schedule length).
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub checkpointing: bool,
    /// Within each shuffled group of 32 steps' worth of examples, order by length, so that a
    /// micro-batch holds sequences of similar length.
    pub group_by_length: bool,
    pub seed: u64,
    /// Validation loss every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    /// Keep only the newest N `checkpoint-NNNNNN/` directories (0: keep them all); `best/` is
    /// always kept. Older ones are deleted once the new one is whole on disk.
    pub save_total_limit: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).
    pub max_bad_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            lora: LoraConfig::default(),
            adamw: AdamWConfig::default(),
            lr: 2e-4,
            warmup_steps: 10,
            decay: Decay::Cosine,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            micro_batch: 4,
            grad_accum: 1,
            checkpointing: false,
            group_by_length: false,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            save_total_limit: 3,
            max_bad_steps: 5,
        }
    }
}

/// Where training stands: enough, with the checkpointed tensors, to continue exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Examples consumed since the start (the data position: epoch = consumed / n).
    pub consumed: usize,
    /// Fingerprint of the training data and run settings, checked on resume.
    pub fingerprint: String,
    /// Consecutive steps skipped for a non-finite loss or gradient.
    #[serde(default)]
    pub bad_steps: usize,
    /// Best execution accuracy seen, and its step (the adapter is in `out/best/`).
    #[serde(default)]
    pub best_exec_accuracy: Option<(f64, usize)>,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepReport {
    pub step: usize,
    /// The loss or gradient was not finite: no update was applied.
    pub skipped: bool,
    pub epoch: f64,
    /// Mean loss over the step's labelled tokens.
    pub loss: f64,
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens processed (prompt + SQL) and labelled tokens.
    pub tokens: usize,
    pub labels: usize,
    pub seconds: f64,
    /// Seconds since the run started, evaluations and checkpoints included (a resumed run counts
    /// the time it had run before its checkpoint).
    pub elapsed_s: f64,
    /// Estimated seconds to the run's last step: the mean time per step in this process (after its
    /// first step, which is slower, once there are others) times the steps left.
    pub eta_s: f64,
    /// Bytes of device memory in use after the step (GPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_memory: Option<usize>,
}

/// Execution accuracy on a validation sample, every `every` steps and at the end.
pub struct SqlEval {
    pub tasks: Vec<crate::sql::evaluate::SqlTask>,
    pub tokenizer: crate::load::tokenizer::Tokenizer,
    pub every: usize,
    pub max_new_tokens: usize,
}

/// The evaluations that ran after a step, if any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evals {
    /// Mean validation loss.
    pub loss: Option<f64>,
    /// Execution accuracy on the SQL-eval sample.
    pub exec_accuracy: Option<f64>,
}

/// Where the current adapters and optimizer moments are. Until the engine updates them, the host's
/// copy (`Trainer::lora`, `Trainer::opt`) is the one that counts: the engine takes it before each
/// step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Residence {
    /// Only the host has them (a fresh run, a resume, a new engine): upload before the next step.
    Host,
    /// Host and engine agree (after a sync or a skipped step); the host's copy is given to the
    /// engine again before the next step, so a change made to it there is not lost.
    Both,
    /// The device has updated them since the host last looked.
    Device,
}

/// What the trainer calls with a description of each evaluation before it starts.
pub type EvalNotice = dyn FnMut(&str);

pub struct Trainer {
    pub model: Arc<Model>,
    /// Where steps, validation losses and the SQL evaluation's generation run: the f32 reference
    /// (`engine::reference`) until [`Trainer::use_engine`] gives another.
    pub engine: Box<dyn StepEngine>,
    /// Optional execution-accuracy evaluation; the best adapter by it is kept in `out/best/`.
    pub sql_eval: Option<SqlEval>,
    /// Told before each evaluation starts (evaluations can take a while: the binary shows them).
    pub on_eval: Option<Box<EvalNotice>>,
    /// The adapters. The engine holds the current ones during training and these are brought up
    /// to date by [`Trainer::sync_host`] (which every method that reads them calls first).
    pub lora: LoraParams,
    /// AdamW: its moments' pages, and the step count (the moments brought up to date as `lora`).
    pub opt: AdamW,
    pub config: TrainConfig,
    /// Where the adapters and moments are current: see [`Residence`].
    residence: Residence,
    pub state: TrainState,
    train: Vec<Encoded>,
    val: Vec<Encoded>,
    out: PathBuf,
    base_model: String,
    clock: Clock,
}

/// The run's wall clock, for the elapsed time and the estimate of the time left.
#[derive(Clone, Copy, Debug, Default)]
struct Clock {
    /// Seconds run before this process (read back from the log on resume).
    before: f64,
    /// When this process's first step started, and ended, and the step count then.
    first: Option<(Instant, Instant, usize)>,
}

impl Trainer {
    /// A fresh run: PEFT-initialised adapters, zero optimizer state.
    pub fn new(
        model: Model,
        train: Vec<Encoded>,
        val: Vec<Encoded>,
        config: TrainConfig,
        out: &Path,
        base_model: &str,
    ) -> Result<Trainer> {
        if train.is_empty() {
            bail!("no training examples");
        }
        if config.micro_batch == 0 || config.grad_accum == 0 {
            bail!("micro-batch size and gradient accumulation must be at least 1");
        }
        let (l, width) = (&config.lora, model.config.hidden_size);
        if l.r == 0 || l.r > width || !l.alpha.is_finite() || !(0.0..1.0).contains(&l.dropout) {
            bail!("LoRA needs 1 <= r <= {width} (the model's width), a finite alpha and 0 <= dropout < 1");
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            bail!("the learning rate must be a positive number, not {}", config.lr);
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let lora = LoraParams::init(&model.config, config.lora.clone(), config.seed);
        let opt = AdamW::new(config.adamw, Box::new(HostPages::new(lora.len(), PAGE)));
        let fingerprint = fingerprint(&train, &config);
        let model = Arc::new(model);
        Ok(Trainer {
            engine: Box::new(Reference::new(model.clone(), &lora)),
            model,
            sql_eval: None,
            on_eval: None,
            lora,
            opt,
            residence: Residence::Host,
            state: TrainState {
                fingerprint,
                ..Default::default()
            },
            config,
            train,
            val,
            out: out.to_path_buf(),
            base_model: base_model.to_string(),
            clock: Clock::default(),
        })
    }

    /// Tokens a micro-batch can hold at most: the micro-batch size times the longest example.
    pub fn step_capacity(&self) -> usize {
        let longest = self
            .train
            .iter()
            .chain(&self.val)
            .map(|e| e.tokens.len())
            .max()
            .unwrap_or(1);
        self.config.micro_batch * longest
    }

    /// Run steps and validation on `dev`, with buffers sized for the longest possible micro-batch.
    pub fn use_device<D: Device + 'static>(&mut self, dev: D) -> Result<()> {
        let cap = self.step_capacity();
        let engine = Engine::new(dev, &self.model, &self.lora, cap, self.config.checkpointing)?;
        self.use_engine(Box::new(engine))
    }

    /// Run steps and validation on `engine` (built for this model and adapter layout, with room for
    /// [`Trainer::step_capacity`] tokens).
    pub fn use_engine(&mut self, mut engine: Box<dyn StepEngine>) -> Result<()> {
        self.sync_host()?;
        // The moments move into the device's kind of host pages (pinned on a GPU).
        let mut pages = engine.start_optimizer()?;
        let (m, v) = self.opt.state.export();
        pages.import(&m, &v)?;
        self.opt.state = pages;
        self.engine = engine;
        self.residence = Residence::Host;
        Ok(())
    }

    /// Bring `lora` and `opt` up to date from the device, if it has updated them.
    pub fn sync_host(&mut self) -> Result<()> {
        if self.residence == Residence::Device {
            self.engine.to_host(&mut self.lora, &mut self.opt)?;
            self.residence = Residence::Both;
        }
        Ok(())
    }

    /// Examples per optimizer step.
    pub fn examples_per_step(&self) -> usize {
        self.config.micro_batch * self.config.grad_accum
    }

    /// Length of the run in optimizer steps (the schedule spans exactly this).
    pub fn total_steps(&self) -> usize {
        self.config
            .max_steps
            .unwrap_or_else(|| (self.config.epochs * self.train.len()).div_ceil(self.examples_per_step()))
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            peak: self.config.lr,
            warmup: self.config.warmup_steps,
            total: self.total_steps(),
            decay: self.config.decay,
        }
    }

    /// The order of the training examples in `epoch`: a shuffle seeded by the seed and the epoch,
    /// then, with `group_by_length`, sorted longest-first within each group of 32 steps.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let n = self.train.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(self.config.seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for j in (1..n).rev() {
            order.swap(j, rng.below(j as u64 + 1) as usize);
        }
        if self.config.group_by_length {
            for group in order.chunks_mut(32 * self.examples_per_step()) {
                group.sort_by_key(|&e| std::cmp::Reverse(self.train[e].tokens.len()));
            }
        }
        order
    }

    /// Indices of the `count` examples consumed from position `start` (counted from the start of
    /// training; epochs follow one another).
    fn examples_from(&self, start: usize, count: usize) -> Vec<usize> {
        let n = self.train.len();
        let mut out = Vec::with_capacity(count);
        let mut order = (usize::MAX, Vec::new());
        for k in start..start + count {
            if order.0 != k / n {
                order = (k / n, self.epoch_order(k / n));
            }
            out.push(order.1[k % n]);
        }
        out
    }

    /// One optimizer step over `grad_accum` micro-batches. A non-finite loss or gradient skips the
    /// update (the report says so); `max_bad_steps` of them in a row is an error.
    pub fn step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let c = &self.config;
        let ids = self.examples_from(self.state.consumed, self.examples_per_step());
        let micro: Vec<Batch> = ids
            .chunks(c.micro_batch)
            .map(|ch| {
                Batch::pack(
                    ch.iter()
                        .map(|&i| (&self.train[i].tokens[..], &self.train[i].targets[..])),
                )
            })
            .collect();
        let labels: usize = micro.iter().map(Batch::label_count).sum();
        if labels == 0 {
            bail!("step {}: no labelled tokens in the batch", self.state.step + 1);
        }
        let inv = 1.0 / labels as f32;
        let opts = |m: usize| GradOptions {
            checkpointing: c.checkpointing,
            dropout_seed: c.seed ^ ((self.state.step as u64) << 16 | m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        let lr = self.schedule().lr(self.state.step);
        let mut loss = 0f64;
        // The engine holds the adapters and accumulates the gradients; its AdamW updates them there.
        if self.residence != Residence::Device {
            self.engine.to_device(&self.lora)?;
            self.residence = Residence::Both;
        }
        for (m, batch) in micro.iter().enumerate() {
            loss += self.engine.accumulate(batch, inv, opts(m))?;
        }
        let grad_norm = self.engine.grad_norm()?;
        let loss = loss / labels as f64;
        // A non-finite loss or gradient skips the step: its data is consumed, nothing is updated.
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            self.state.bad_steps += 1;
            if self.state.bad_steps >= c.max_bad_steps {
                bail!(
                    "non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {}, {} steps in a row: stopping \
                     (the adapter is unchanged since the last good step; try a lower --lr or --max-grad-norm)",
                    self.state.step + 1,
                    self.state.bad_steps
                );
            }
        } else {
            self.state.bad_steps = 0;
        }
        if skipped {
            self.engine.zero_grads()?;
        } else {
            (self.engine).adamw_update(&mut self.opt, lr, clip_factor(grad_norm, c.max_grad_norm))?;
            self.residence = Residence::Device;
        }
        self.state.step += 1;
        self.state.consumed += ids.len();
        let seconds = started.elapsed().as_secs_f64();
        let (elapsed_s, eta_s) = self.tick(started);
        Ok(StepReport {
            skipped,
            step: self.state.step,
            epoch: self.state.consumed as f64 / self.train.len() as f64,
            loss,
            lr,
            grad_norm,
            tokens: micro.iter().map(|b| b.tokens.len()).sum(),
            labels,
            seconds,
            elapsed_s,
            eta_s,
            device_memory: self.engine.memory_used(),
        })
    }

    /// After a step that started at `started`: seconds run so far, and the estimate of the seconds
    /// left to the last step.
    fn tick(&mut self, started: Instant) -> (f64, f64) {
        let now = Instant::now();
        let (t0, t1, s1) = *self.clock.first.get_or_insert((started, now, self.state.step));
        let left = self.total_steps().saturating_sub(self.state.step);
        let per_step = match self.state.step - s1 {
            0 => (now - t0).as_secs_f64(),
            after => (now - t1).as_secs_f64() / after as f64,
        };
        (self.clock.before + (now - t0).as_secs_f64(), per_step * left as f64)
    }

    /// Mean loss per labelled token over the validation examples, without dropout.
    pub fn eval_loss(&mut self) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        self.sync_host()?;
        let (mut sum, mut labels) = (0f64, 0usize);
        for chunk in self.val.chunks(self.config.micro_batch) {
            let batch = Batch::pack(chunk.iter().map(|e| (&e.tokens[..], &e.targets[..])));
            sum += self.engine.loss_sum(Some(&self.lora), &batch)?;
            labels += batch.label_count();
        }
        Ok(Some(sum / labels.max(1) as f64))
    }

    /// Append a JSON line to `out/metrics.jsonl`.
    pub fn log(&self, value: &serde_json::Value) -> Result<()> {
        let path = self.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(f, "{value}").with_context(|| format!("writing {}", path.display()))
    }

    /// Write `out/checkpoint-NNNNNN/` (adapter, optimizer moments, state) atomically: it is built
    /// under a temporary name and renamed into place, so a checkpoint directory is always whole.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let dir = self.out.join(format!("checkpoint-{:06}", self.state.step));
        let tmp = self.out.join(format!(".checkpoint-{:06}.partial", self.state.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
        }
        self.sync_host()?;
        self.lora.save_peft(&tmp, &self.base_model)?;
        let (m, v) = self.opt.state.export();
        let n = m.len();
        let tensors = vec![
            ("exp_avg".to_string(), vec![n], m),
            ("exp_avg_sq".to_string(), vec![n], v),
        ];
        let meta = [("adam_step".to_string(), self.opt.step.to_string())]
            .into_iter()
            .collect();
        save_safetensors(&tmp.join("optimizer.safetensors"), &tensors, SaveDtype::F32, Some(meta))?;
        write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&self.state)?.as_bytes(),
        )?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("moving checkpoint into {}", dir.display()))?;
        self.prune_checkpoints(&dir)?;
        if self.out.join("metrics.jsonl").exists() {
            crate::train::plot::write_curves(&self.out)?;
        }
        Ok(dir)
    }

    /// The `checkpoint-<step>` directories of the output directory, by step as a number (a stray
    /// name is not one), oldest first.
    pub fn checkpoints(&self) -> Vec<PathBuf> {
        let step_of = |p: &Path| -> Option<u64> { p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok() };
        let Ok(entries) = std::fs::read_dir(&self.out) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .filter_map(|p| Some((step_of(&p)?, p)))
            .collect();
        found.sort();
        found.into_iter().map(|(_, p)| p).collect()
    }

    /// The newest whole checkpoint in the output directory, if any.
    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        self.checkpoints().pop()
    }

    /// Delete all but the newest `save_total_limit` checkpoints, never `kept` (the one just
    /// written, already whole on disk) nor `best/`.
    fn prune_checkpoints(&self, kept: &Path) -> Result<()> {
        let limit = self.config.save_total_limit;
        if limit == 0 {
            return Ok(());
        }
        let all = self.checkpoints();
        for old in &all[..all.len().saturating_sub(limit)] {
            if old != kept {
                std::fs::remove_dir_all(old)
                    .with_context(|| format!("deleting the old checkpoint {}", old.display()))?;
            }
        }
        Ok(())
    }

    /// Continue from a checkpoint: adapter, optimizer moments and position. Refuses a checkpoint
    /// made from other data or settings. Log lines written after it are dropped.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).with_context(|| format!("reading {}", state_path.display()))?;
        let state: TrainState =
            serde_json::from_str(&text).with_context(|| format!("malformed {}", state_path.display()))?;
        if state.fingerprint != self.state.fingerprint {
            bail!(
                "{} was made with other training data or settings; refusing to resume from it",
                dir.display()
            );
        }
        if state.step > self.total_steps() {
            bail!(
                "{}: step {} is past this run's {} steps",
                state_path.display(),
                state.step,
                self.total_steps()
            );
        }
        let lora = LoraParams::load_peft(dir, &self.model.config)?;
        if lora.config != self.lora.config {
            bail!("{}: adapter config differs from this run's", dir.display());
        }
        let opt_path = dir.join("optimizer.safetensors");
        let w = Weights::open_files(std::slice::from_ref(&opt_path))?;
        let n = self.lora.len();
        let (m, v) = (w.f32("exp_avg", &[n])?, w.f32("exp_avg_sq", &[n])?);
        if !m.iter().all(|x| x.is_finite()) || !v.iter().all(|x| x.is_finite() && *x >= 0.0) {
            bail!(
                "{}: the AdamW moments are not finite (or a second moment is negative)",
                opt_path.display()
            );
        }
        self.opt.state.import(&m, &v)?;
        self.opt.step = w
            .metadata_of("exp_avg")?
            .get("adam_step")
            .and_then(|s| s.parse().ok())
            .filter(|&s: &u64| s <= state.step as u64)
            .with_context(|| format!("{} has no adam_step of at most step {}", opt_path.display(), state.step))?;
        self.lora = lora;
        self.state = state;
        self.residence = Residence::Host;
        self.truncate_log()
    }

    fn truncate_log(&mut self) -> Result<()> {
        let path = self.out.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let keep: Vec<&str> = text
            .lines()
            .filter(|l| {
                let step = serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64());
                step.is_some_and(|s| s as usize <= self.state.step)
            })
            .collect();
        // The time run before the checkpoint: the last kept step's.
        self.clock = Clock {
            before: (keep.iter().rev())
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["elapsed_s"].as_f64())
                .unwrap_or(0.0),
            first: None,
        };
        write_atomic(
            &path,
            (keep.join("\n") + if keep.is_empty() { "" } else { "\n" }).as_bytes(),
        )
    }

    /// Write the final adapter (PEFT files) into the output directory itself.
    pub fn save_final(&mut self) -> Result<()> {
        self.sync_host()?;
        self.lora.save_peft(&self.out, &self.base_model)
    }

    /// Execution accuracy of the current adapter on the SQL-eval sample; keeps the best adapter in
    /// `out/best/`. None when no SQL evaluation is configured.
    pub fn eval_exec_accuracy(&mut self) -> Result<Option<f64>> {
        if self.sql_eval.is_none() {
            return Ok(None);
        }
        self.sync_host()?;
        let Some(se) = &self.sql_eval else { return Ok(None) };
        let prompts: Vec<Vec<u32>> = se.tasks.iter().map(|t| t.prompt.clone()).collect();
        let stops = &self.model.config.eos_token_ids;
        let outs = (self.engine).generate(Some(&self.lora), &prompts, se.max_new_tokens, stops)?;
        let sqls = (outs.iter())
            .map(|o| Ok(se.tokenizer.decode(o)?.trim().to_string()))
            .collect::<Result<Vec<_>>>()?;
        let acc = crate::sql::evaluate::score(&se.tasks, &sqls)?;
        if self.state.best_exec_accuracy.is_none_or(|(best, _)| acc > best) {
            self.state.best_exec_accuracy = Some((acc, self.state.step));
            self.lora.save_peft(&self.out.join("best"), &self.base_model)?;
        }
        Ok(Some(acc))
    }

    fn announce(&mut self, what: &str) {
        if let Some(f) = &mut self.on_eval {
            f(what);
        }
    }

    /// Train until `until` steps are done (or the run's end), calling `report` after every step and
    /// evaluation, checkpointing on schedule and at the end. `stop` is polled between steps (Ctrl-C):
    /// when it is set, a checkpoint is written and the loop returns early.
    pub fn run(
        &mut self,
        until: usize,
        stop: &dyn Fn() -> bool,
        report: &mut dyn FnMut(&StepReport, &Evals),
    ) -> Result<()> {
        let end = until.min(self.total_steps());
        while self.state.step < end {
            let r = self.step()?;
            self.log(&serde_json::to_value(&r)?)?;
            // The last step is checkpointed before its evaluations: an error or a stop during them
            // loses no training (that checkpoint's state lacks only the last evaluation's best).
            let last = r.step == self.total_steps();
            if last {
                self.save_checkpoint()?;
            }
            let c = &self.config;
            let due = (c.eval_every > 0 && r.step % c.eval_every == 0) || last;
            let eval = if due && !self.val.is_empty() {
                let what = format!("validation loss on {} examples", self.val.len());
                self.announce(&what);
                self.eval_loss()?
            } else {
                None
            };
            let sql_due = self
                .sql_eval
                .as_ref()
                .is_some_and(|se| se.every > 0 && r.step % se.every == 0);
            let exec = if sql_due || (last && self.sql_eval.is_some()) {
                let n = self.sql_eval.as_ref().map_or(0, |se| se.tasks.len());
                self.announce(&format!("execution accuracy on {n} generated answers"));
                self.eval_exec_accuracy()?
            } else {
                None
            };
            if let Some(e) = eval {
                self.log(&serde_json::json!({"step": r.step, "eval_loss": e}))?;
            }
            if let Some(a) = exec {
                self.log(&serde_json::json!({"step": r.step, "exec_accuracy": a}))?;
            }
            let c = &self.config;
            report(
                &r,
                &Evals {
                    loss: eval,
                    exec_accuracy: exec,
                },
            );
            let stopping = stop();
            if !last && ((c.save_every > 0 && r.step % c.save_every == 0) || r.step == end || stopping) {
                self.save_checkpoint()?;
            } else if last {
                crate::train::plot::write_curves(&self.out)?; // with the final evaluations
            }
            if stopping {
                break;
            }
        }
        self.sync_host()
    }
}

/// A fingerprint of the training set and the settings that change what a step computes.
fn fingerprint(train: &[Encoded], c: &TrainConfig) -> String {
    let mut bytes = Vec::new();
    for e in train {
        bytes.extend(e.tokens.iter().flat_map(|t| t.to_le_bytes()));
        bytes.extend(e.targets.iter().map(|t| t.is_some() as u8));
    }
    let settings = format!(
        "{:?}|{:?}|{}|{}|{:?}|{}|{}|{:?}|{}|{}|{}",
        c.lora,
        c.adamw,
        c.lr,
        c.warmup_steps,
        c.decay,
        c.max_grad_norm,
        c.epochs,
        c.max_steps,
        c.micro_batch,
        c.grad_accum,
        c.seed
    );
    bytes.extend(settings.as_bytes());
    format!("{:016x}", crate::util::fnv1a64(&bytes))
}
