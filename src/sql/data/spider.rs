//! Spider import: questions + tables.json + database/ -> sqlora JSONL with schema snippets.
//!
//! Snippets come from the SQLite file itself (with sample values) when it is present, else from
//! tables.json. Training snippets keep the tables the gold query uses plus random distractors;
//! dev snippets list every table (pruned by the lexical linker when over the token budget).
//! A few whole databases can be held out as a validation split: no database is in both.

use crate::sql::data::{write_jsonl, Example};
use crate::sql::schema::Schema;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    pub examples: usize,
    pub databases: usize,
    /// Examples whose snippet came from the SQLite file.
    pub from_sqlite: usize,
    /// Examples whose database file is missing: snippet from tables.json.
    pub from_tables_json: usize,
    /// Examples written to the validation file (held-out databases).
    pub validation: usize,
    pub validation_dbs: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// "train" (train_spider.json, + train_others.json if present) or "dev" (dev.json).
    pub split: String,
    /// Distractor tables added to each training snippet.
    pub distractors: usize,
    /// Sample values per text column.
    pub samples: usize,
    /// Hold out this many whole databases (chosen by `seed`) into the validation file.
    pub holdout_dbs: usize,
    /// Token budget of dev snippets, counted as characters / 4.
    pub budget: usize,
    pub seed: u64,
}

impl Default for ImportOptions {
    fn default() -> ImportOptions {
        ImportOptions {
            split: "train".into(),
            distractors: 2,
            samples: 3,
            holdout_dbs: 0,
            budget: 1500,
            seed: 42,
        }
    }
}

/// Import a Spider directory. Writes `out` and, when databases are held out, `val_out`.
pub fn import_spider(dir: &Path, opts: &ImportOptions, out: &Path, val_out: Option<&Path>) -> Result<ImportReport> {
    if opts.holdout_dbs > 0 && val_out.is_none() {
        bail!(
            "--holdout-dbs {} needs --val-out for the held-out questions",
            opts.holdout_dbs
        );
    }
    let files: &[&str] = match opts.split.as_str() {
        "train" => &["train_spider.json", "train_others.json"],
        "dev" => &["dev.json"],
        other => bail!("unknown split \"{other}\": train or dev"),
    };
    let tables_path = dir.join("tables.json");
    let tables: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(&tables_path).with_context(|| format!("reading {}", tables_path.display()))?,
    )
    .with_context(|| format!("malformed {}", tables_path.display()))?;
    let entries: HashMap<String, &serde_json::Value> = tables
        .iter()
        .filter_map(|t| Some((t["db_id"].as_str()?.to_string(), t)))
        .collect();

    let mut raw = Vec::new();
    for (k, f) in files.iter().enumerate() {
        let p = dir.join(f);
        if !p.exists() && k > 0 {
            continue; // train_others.json is optional
        }
        let items: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("malformed {}", p.display()))?;
        for (i, it) in items.iter().enumerate() {
            let field = |k: &str| {
                it[k]
                    .as_str()
                    .map(String::from)
                    .with_context(|| format!("{} item {i}: no string \"{k}\"", p.display()))
            };
            raw.push((field("question")?, field("query")?, field("db_id")?));
        }
    }

    let dbs: BTreeSet<&str> = raw.iter().map(|r| r.2.as_str()).collect();
    let mut rng = Rng::new(opts.seed);
    let mut pool: Vec<&str> = dbs.iter().copied().collect();
    let mut held: BTreeSet<String> = BTreeSet::new();
    for _ in 0..opts.holdout_dbs.min(pool.len().saturating_sub(1)) {
        held.insert(pool.swap_remove(rng.below(pool.len() as u64) as usize).to_string());
    }

    let mut schemas: HashMap<String, (Schema, bool)> = HashMap::new();
    let mut report = ImportReport {
        databases: dbs.len(),
        validation_dbs: held.iter().cloned().collect(),
        ..Default::default()
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (question, query, db_id) in raw {
        if !schemas.contains_key(&db_id) {
            let file = dir.join("database").join(&db_id).join(format!("{db_id}.sqlite"));
            let loaded = if file.is_file() {
                (Schema::from_sqlite(&file, opts.samples)?, true)
            } else {
                let entry = entries
                    .get(&db_id)
                    .with_context(|| format!("{db_id}: no database file and no tables.json entry"))?;
                (Schema::from_spider_tables(entry)?, false)
            };
            schemas.insert(db_id.clone(), loaded);
        }
        let (schema, from_file) = &schemas[&db_id];
        let holdout = held.contains(&db_id);
        let input = if opts.split == "train" && !holdout {
            schema.training_snippet(&query, opts.distractors, &mut rng)
        } else {
            schema.question_snippet(&question, opts.budget, &|s: &str| s.len() / 4)
        };
        if *from_file {
            report.from_sqlite += 1;
        } else {
            report.from_tables_json += 1;
        }
        let ex = Example {
            instruction: question,
            input,
            output: query,
            db_id: Some(db_id),
            db_path: None,
        };
        if holdout {
            val.push(ex);
        } else {
            train.push(ex);
        }
    }
    report.examples = train.len() + val.len();
    report.validation = val.len();
    if let Some(v) = val_out {
        write_jsonl(v, &val)?;
    }
    write_jsonl(out, &train)?;
    Ok(report)
}
