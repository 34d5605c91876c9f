//! `sqlora predict`: SQL for every example of a file, from a model and, optionally, an adapter; one
//! JSON line per example, in order, for `sqlora eval`.
//!
//! With one candidate per question (the default) the answer is the greedy continuation. With n,
//! it is chosen among the greedy one and n - 1 sampled ones by running them on the question's
//! database ([`crate::sql::choose`]): execution-guided decoding, which uses the database but never
//! the gold query. Answers in the template are held to their database's names as they are written
//! ([`crate::sql::guard`]) unless `guard` is off.

use crate::engine::target::Target;
use crate::model::generate::Sampling;
use crate::model::lora::LoraParams;
use crate::sql::choose::{choose, Choice};
use crate::sql::data::chat::{extract_sql, ChatFormat};
use crate::sql::data::Example;
use crate::sql::eval::resolve_db;
use crate::sql::exec::Db;
use crate::sql::guard::{Names, SchemaGuard};
use crate::sql::schema::Schema;
use crate::util::progress::Progress;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Sequences generated together per call (a chunk of questions times their candidates): large
/// enough to fill a GPU's batch, small enough that the progress moves.
const CHUNK_SEQUENCES: usize = 32;

/// How `predict` asks.
pub struct Generation {
    /// The longest answer, in tokens.
    pub max_new: usize,
    /// Whether the base is NF4 on the CPU reference (always so on a device engine).
    pub nf4: bool,
    pub prompt: PromptStyle,
    /// Candidates per question: 1 for greedy decoding alone.
    pub candidates: usize,
    /// How the candidates after the greedy one are drawn.
    pub sampling: Sampling,
    /// Where `<db_id>/<db_id>.sqlite` databases are, for choosing among candidates.
    pub db_root: Option<PathBuf>,
    /// Time limit of each candidate query.
    pub timeout: Duration,
    /// Hold template answers to their databases' names ([`crate::sql::guard`]).
    pub guard: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptStyle {
    /// The `### Schema ###` template adapters are trained on.
    Template,
    /// The model's own chat format, asking for one SQLite query (the answer is cut to its first
    /// statement).
    Chat,
}

/// Write one `{"sql": ...}` line per example of `data` to `out` (atomically). With candidates, each
/// line also lists them and how the choice went.
pub fn predict(
    model_path: &Path,
    adapter: Option<&Path>,
    data: &Path,
    out: &Path,
    how: &Generation,
    device: &str,
) -> Result<()> {
    let examples = crate::sql::data::read_jsonl(data)?;
    // The answers are written at the end: a place that cannot take them is an error now, not then.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    anyhow::ensure!(
        parent.is_dir(),
        "{}: the directory {} does not exist",
        out.display(),
        parent.display()
    );
    // With candidates, every example's database must open before any generation starts.
    let dbs = if how.candidates > 1 {
        open_dbs(&examples, data, how.db_root.as_deref())?
    } else {
        Vec::new()
    };
    // `auto` is cuda when a GPU is usable, else the CPU reference.
    let target = crate::sql::device::open(device, Target::cpu()?)?;
    let source = crate::load::open(model_path)?;
    let tok = source.tokenizer()?;
    let chat = match how.prompt {
        PromptStyle::Template => None,
        PromptStyle::Chat => Some(ChatFormat::of(&tok)?),
    };
    let model = target.load_model(&source, how.nf4)?;
    tok.check_fits(model.config.vocab_size, model_path)?;
    let lora = adapter.map(|a| LoraParams::load_peft(a, &model.config)).transpose()?;
    let mut stops = model.config.eos_token_ids.clone();
    if let Some(format) = chat {
        stops.extend(tok.token_id(format.end_of_turn()));
    }
    let prompts = (examples.iter())
        .map(|e| match chat {
            Some(format) => tok.encode(&format.prompt(&e.instruction, &e.input)),
            None => tok.encode(&crate::sql::data::prompt(&e.instruction, &e.input)),
        })
        .collect::<Result<Vec<_>>>()?;
    let n = how.candidates.max(1);
    // The guard needs each question's database; chat answers (prose, fences) are not guarded.
    let names = match how.guard && chat.is_none() {
        true => guard_names(&examples, data, how.db_root.as_deref()),
        false => vec![None; examples.len()],
    };
    let mut engine = target.generation_engine(model, lora.as_ref(), &prompts, n)?;
    // [examples][n] token ids, generated a chunk of questions at a time so that the progress shows.
    let mut outs: Vec<Vec<Vec<u32>>> = Vec::with_capacity(prompts.len());
    let mut progress = Progress::new("predict", prompts.len() as u64);
    for chunk in prompts.chunks(CHUNK_SEQUENCES.div_ceil(n)) {
        let these = &names[outs.len()..outs.len() + chunk.len()];
        if these.iter().any(Option::is_some) {
            engine.set_constraint(Some(Arc::new(SchemaGuard::new(tok.clone(), these.to_vec(), &stops))));
        }
        if n == 1 {
            let got = engine.generate(lora.as_ref(), chunk, how.max_new, &stops)?;
            outs.extend(got.into_iter().map(|o| vec![o]));
        } else {
            // The draws of each question are seeded by its place in the file, not in the chunk.
            let sampling = Sampling {
                first: outs.len(),
                ..how.sampling
            };
            outs.extend(engine.generate_candidates(lora.as_ref(), chunk, n, how.max_new, &stops, &sampling)?);
        }
        progress.add(chunk.len() as u64);
    }
    progress.finish();
    let mut text = String::new();
    for (i, cands) in outs.iter().enumerate() {
        let sqls = (cands.iter())
            .map(|o| {
                let a = tok.decode(o)?.trim().to_string();
                Ok(if chat.is_some() { extract_sql(&a) } else { a })
            })
            .collect::<Result<Vec<String>>>()?;
        let line = match dbs.get(i) {
            None => serde_json::json!({ "sql": sqls[0] }),
            Some(db) => {
                let Choice { index, runnable, votes } = choose(db, &sqls, how.timeout);
                serde_json::json!({
                    "sql": sqls[index], "chosen": index, "runnable": runnable, "votes": votes,
                    "candidates": sqls,
                })
            }
        };
        text += &line.to_string();
        text.push('\n');
    }
    crate::load::weights::write_atomic(out, text.as_bytes())
}

/// Each example's database's names for the guard, read once per database; `None` (and a line
/// saying how many) where the database is not found.
fn guard_names(examples: &[Example], data: &Path, db_root: Option<&Path>) -> Vec<Option<Arc<Names>>> {
    let base = data.parent().unwrap_or(Path::new("."));
    let mut read: HashMap<PathBuf, Option<Arc<Names>>> = HashMap::new();
    let names: Vec<Option<Arc<Names>>> = (examples.iter())
        .map(|e| {
            let path = resolve_db(e, base, db_root).ok()?;
            (read.entry(path.clone()))
                .or_insert_with(|| Schema::from_sqlite(&path, 0).ok().map(|s| Arc::new(Names::of(&s))))
                .clone()
        })
        .collect();
    let missing = names.iter().filter(|n| n.is_none()).count();
    if missing > 0 {
        eprintln!(
            "{}: {missing} of {} questions have no database found (--db-root): their answers are \
             not held to a schema",
            data.display(),
            examples.len()
        );
    }
    names
}

/// Each example's database, opened read-only once per file, in the examples' order.
fn open_dbs(examples: &[Example], data: &Path, db_root: Option<&Path>) -> Result<Vec<Rc<Db>>> {
    let base = data.parent().unwrap_or(Path::new("."));
    let mut open: HashMap<PathBuf, Rc<Db>> = HashMap::new();
    (examples.iter().enumerate())
        .map(|(i, e)| {
            let path = resolve_db(e, base, db_root).with_context(|| {
                format!(
                    "{}:{}: choosing among candidates needs the database",
                    data.display(),
                    i + 1
                )
            })?;
            if !open.contains_key(&path) {
                open.insert(path.clone(), Rc::new(Db::open(&path)?));
            }
            Ok(open[&path].clone())
        })
        .collect()
}
