//! Execution accuracy, Spider test-suite style: gold and predicted SQL run on the same read-only
//! database with a time limit, and their results are compared (see [`super::compare`]). Also
//! Spider's exact set match (see [`super::exact`]), the valid-SQL rate, time-outs, accuracy per
//! hardness level, and the kind of each miss (see [`super::miss`]).

use super::compare::{normalize, order_matters, remove_distinct, results_match};
use super::exact::exact_match;
use super::exec::{Db, QueryError};
use super::hardness::{hardness, Hardness};
use super::miss;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    /// Time limit of each query (gold and predicted).
    pub timeout: Duration,
    /// Keep DISTINCT (the official evaluator removes it from both queries, for execution and for
    /// exact set match alike).
    pub keep_distinct: bool,
}

impl Default for EvalOptions {
    fn default() -> EvalOptions {
        EvalOptions {
            timeout: Duration::from_secs(10),
            keep_distinct: false,
        }
    }
}

/// The verdict on one prediction.
#[derive(Clone, Debug, Serialize)]
pub struct Detail {
    pub exec_match: bool,
    pub exact_match: bool,
    pub valid_sql: bool,
    pub timeout: bool,
    pub hardness: Hardness,
    /// Why the prediction (or the gold query) gave no result, if it did not.
    pub error: Option<String>,
    /// The kind of miss (one of [`miss::KINDS`]); `None` for a hit.
    pub miss: Option<&'static str>,
}

/// Judge one prediction against its gold query on `db`. Exact match is Spider's exact set match
/// against `db`'s schema; when the gold query cannot be parsed for it (or the schema cannot be read),
/// it falls back to normalised text equality.
pub fn evaluate_one(db: &Db, gold: &str, pred: &str, opts: EvalOptions) -> Detail {
    let prep = |sql: &str| {
        if opts.keep_distinct {
            sql.to_string()
        } else {
            remove_distinct(sql)
        }
    };
    let level = hardness(gold);
    let exact_match = match db.catalog() {
        Some(cat) => exact_match(cat, gold, pred, opts.keep_distinct),
        None => normalize(gold) == normalize(pred),
    };
    let pred_result = db.query(&prep(pred), opts.timeout);
    let (valid_sql, timeout) = match &pred_result {
        Ok(_) => (true, false),
        Err(QueryError::Timeout) => (false, true),
        Err(QueryError::Sql(_)) => (false, false),
    };
    let verdict = |exec_match, error, miss| Detail {
        exec_match,
        exact_match,
        valid_sql,
        timeout,
        hardness: level,
        error,
        miss,
    };
    let gold_rows = match db.query(&prep(gold), opts.timeout) {
        Ok(rows) => rows,
        Err(e) => {
            return verdict(
                false,
                Some(format!("gold query failed: {e}")),
                Some("gold query failed"),
            )
        }
    };
    match pred_result {
        _ if pred.trim().is_empty() => verdict(false, Some("no SQL".into()), Some("no SQL")),
        Ok(rows) if results_match(&gold_rows, &rows, order_matters(gold)) => verdict(true, None, None),
        Ok(_) => verdict(false, None, Some(miss::wrong_answer(db.catalog(), gold, pred))),
        Err(e) => verdict(false, Some(e.to_string()), Some(miss::run_error(&e))),
    }
}

/// Accuracy over a group of examples.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Group {
    pub n: usize,
    pub execution_accuracy: f64,
}

/// The standard error of a rate `p` measured on `n` independent examples: sqrt(p (1 - p) / n).
pub fn standard_error(p: f64, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        (p * (1.0 - p) / n as f64).sqrt()
    }
}

/// The whole evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub n: usize,
    pub execution_accuracy: f64,
    /// The standard error of `execution_accuracy` (see [`standard_error`]).
    pub execution_accuracy_se: f64,
    pub exact_match: f64,
    pub valid_sql_rate: f64,
    pub timeouts: usize,
    /// Examples whose gold query itself failed (they count as misses).
    pub gold_errors: usize,
    pub by_hardness: BTreeMap<&'static str, Group>,
    /// How many misses of each kind (see [`miss::KINDS`]), kinds with none left out.
    pub misses: BTreeMap<&'static str, usize>,
}

pub fn summarize(details: &[Detail]) -> Report {
    let n = details.len();
    let rate = |f: &dyn Fn(&Detail) -> bool| {
        if n == 0 {
            0.0
        } else {
            details.iter().filter(|d| f(d)).count() as f64 / n as f64
        }
    };
    let by_hardness = Hardness::ALL
        .iter()
        .map(|&h| {
            let group: Vec<&Detail> = details.iter().filter(|d| d.hardness == h).collect();
            let hits = group.iter().filter(|d| d.exec_match).count();
            let acc = if group.is_empty() {
                0.0
            } else {
                hits as f64 / group.len() as f64
            };
            (
                h.name(),
                Group {
                    n: group.len(),
                    execution_accuracy: acc,
                },
            )
        })
        .collect();
    let mut misses = BTreeMap::new();
    for kind in details.iter().filter_map(|d| d.miss) {
        *misses.entry(kind).or_insert(0) += 1;
    }
    let execution_accuracy = rate(&|d| d.exec_match);
    Report {
        n,
        execution_accuracy,
        execution_accuracy_se: standard_error(execution_accuracy, n),
        exact_match: rate(&|d| d.exact_match),
        valid_sql_rate: rate(&|d| d.valid_sql),
        timeouts: details.iter().filter(|d| d.timeout).count(),
        gold_errors: details.iter().filter(|d| d.miss == Some("gold query failed")).count(),
        by_hardness,
        misses,
    }
}

/// Read predictions: one {"sql": ...} per non-blank line.
pub fn read_predictions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let sql = v["sql"]
            .as_str()
            .with_context(|| format!("{}:{}: no string \"sql\"", path.display(), i + 1))?;
        out.push(sql.to_string());
    }
    Ok(out)
}

/// Judge every prediction of `pred` against the gold examples of `data`, in order. Databases come
/// from each example's `db_path` (relative paths resolve against the gold file's directory) or its
/// `db_id` under `db_root`; each is opened once, read-only.
pub fn evaluate_files(data: &Path, pred: &Path, db_root: Option<&Path>, opts: EvalOptions) -> Result<Vec<Detail>> {
    let gold = crate::sql::data::read_jsonl(data)?;
    let preds = read_predictions(pred)?;
    if gold.len() != preds.len() {
        bail!(
            "{} has {} examples but {} has {} predictions",
            data.display(),
            gold.len(),
            pred.display(),
            preds.len()
        );
    }
    let base = data.parent().unwrap_or(Path::new("."));
    let mut dbs: HashMap<PathBuf, Db> = HashMap::new();
    let mut verdicts = Vec::with_capacity(gold.len());
    let mut progress = crate::util::progress::Progress::new("eval", gold.len() as u64);
    for (i, (g, p)) in gold.iter().zip(&preds).enumerate() {
        let path = resolve_db(g, base, db_root).with_context(|| format!("{}:{}", data.display(), i + 1))?;
        if !dbs.contains_key(&path) {
            let db = Db::open(&path).with_context(|| format!("{}:{}", data.display(), i + 1))?;
            dbs.insert(path.clone(), db);
        }
        verdicts.push(evaluate_one(&dbs[&path], &g.output, p, opts));
        progress.add(1);
    }
    progress.finish();
    Ok(verdicts)
}

/// The database of an example: its `db_path` (a relative path resolves against `base`, the directory
/// of the file it came from, unless it exists as given), or `db_root/<db_id>/<db_id>.sqlite`.
pub fn resolve_db(e: &crate::sql::data::Example, base: &Path, db_root: Option<&Path>) -> Result<PathBuf> {
    match (&e.db_path, &e.db_id, db_root) {
        (Some(p), _, _) => {
            let p = PathBuf::from(p);
            Ok(if p.is_relative() && !p.exists() {
                base.join(p)
            } else {
                p
            })
        }
        (None, Some(id), Some(root)) => Ok(root.join(id).join(format!("{id}.sqlite"))),
        (None, Some(_), None) => bail!("the example has a db_id; give --db-root"),
        (None, None, _) => bail!("the example needs \"db_id\" or \"db_path\""),
    }
}
