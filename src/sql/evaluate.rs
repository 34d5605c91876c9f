//! Generate SQL for examples with a model (and adapter), and score it by execution: what `sqlora
//! predict` writes and what training reports as execution accuracy on a validation sample.

use crate::load::tokenizer::Tokenizer;
use crate::model::forward::Model;
use crate::model::generate::{greedy_batch, DECODE_GROUP};
use crate::model::lora::LoraParams;
use crate::sql::data::{prompt, Example};
use crate::sql::eval::{evaluate_one, resolve_db, EvalOptions};
use crate::sql::exec::Db;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One question to answer: its prompt tokens, the gold SQL and the database to judge on.
#[derive(Clone, Debug)]
pub struct SqlTask {
    /// [L] the prompt, through "### SQL ###\n".
    pub prompt: Vec<u32>,
    pub gold: String,
    pub db: PathBuf,
}

/// Tasks for examples read from a file in `base` (relative `db_path`s resolve against it). Every
/// database is opened once here, so a missing one stops a run before training rather than at its
/// first evaluation.
pub fn tasks(examples: &[Example], tok: &Tokenizer, base: &Path, db_root: Option<&Path>) -> Result<Vec<SqlTask>> {
    let tasks = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let db = resolve_db(e, base, db_root)
                .with_context(|| format!("validation example {} ({})", i + 1, e.instruction))?;
            Ok(SqlTask {
                prompt: tok.encode(&prompt(&e.instruction, &e.input))?,
                gold: e.output.clone(),
                db,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dbs: std::collections::BTreeSet<&Path> = tasks.iter().map(|t| t.db.as_path()).collect();
    for db in dbs {
        Db::open(db).context("a validation database")?;
    }
    Ok(tasks)
}

/// Fraction of tasks whose greedy SQL gives the gold result (decoded `DECODE_GROUP` at a
/// time; databases opened once, read-only).
pub fn exec_accuracy(
    model: &Model,
    lora: Option<&LoraParams>,
    tok: &Tokenizer,
    tasks: &[SqlTask],
    max_new: usize,
) -> Result<f64> {
    let stops = &model.config.eos_token_ids;
    let mut sqls = Vec::with_capacity(tasks.len());
    for group in tasks.chunks(DECODE_GROUP) {
        let prompts: Vec<Vec<u32>> = group.iter().map(|t| t.prompt.clone()).collect();
        for out in greedy_batch(model, lora, &prompts, max_new, stops, None) {
            sqls.push(tok.decode(&out)?.trim().to_string());
        }
    }
    score(tasks, &sqls)
}

/// Fraction of tasks whose predicted SQL (one per task, in order) gives the gold result.
pub fn score(tasks: &[SqlTask], sqls: &[String]) -> Result<f64> {
    anyhow::ensure!(
        tasks.len() == sqls.len(),
        "{} predictions for {} tasks",
        sqls.len(),
        tasks.len()
    );
    let mut dbs: HashMap<&Path, Db> = HashMap::new();
    let mut hits = 0;
    for (t, sql) in tasks.iter().zip(sqls) {
        if !dbs.contains_key(t.db.as_path()) {
            dbs.insert(&t.db, Db::open(&t.db)?);
        }
        hits += evaluate_one(&dbs[t.db.as_path()], &t.gold, sql, EvalOptions::default()).exec_match as usize;
    }
    Ok(hits as f64 / tasks.len().max(1) as f64)
}
