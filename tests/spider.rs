//! Spider import and gold-against-gold evaluation on the training split in ../shared/data.
//! Skipped, with a message, when that directory is not beside the repository.

mod common;
use common::{for_each_spider_gold, spider_dir};

use sqlora::sql::data::read_jsonl;
use sqlora::sql::data::spider::{import_spider, ImportOptions};
use sqlora::sql::eval::{evaluate_one, summarize, EvalOptions};
use std::collections::HashSet;

#[test]
fn import_gives_every_example_a_snippet_and_holds_out_whole_databases() {
    let Some(dir) = spider_dir() else { return };
    let out = tempfile::tempdir().unwrap();
    let (train_path, val_path) = (out.path().join("train.jsonl"), out.path().join("val.jsonl"));
    let opts = ImportOptions {
        holdout_dbs: 8,
        ..Default::default()
    };
    let r = import_spider(&dir, &opts, &train_path, Some(&val_path)).unwrap();
    assert_eq!(r.examples, 7000);
    assert_eq!(r.from_sqlite + r.from_tables_json, 7000);
    // baseball_1 (82) and soccer_1 (14) have no database file: their snippets come from tables.json.
    assert_eq!(r.from_tables_json, 96);
    let (train, val) = (read_jsonl(&train_path).unwrap(), read_jsonl(&val_path).unwrap());
    assert_eq!(train.len() + val.len(), 7000);
    assert_eq!(val.len(), r.validation);
    assert!(
        train.iter().chain(&val).all(|e| !e.input.trim().is_empty()),
        "an example without a snippet"
    );
    let train_dbs: HashSet<_> = train.iter().map(|e| e.db_id.clone()).collect();
    let val_dbs: HashSet<_> = val.iter().map(|e| e.db_id.clone()).collect();
    assert_eq!(val_dbs.len(), 8);
    assert!(train_dbs.is_disjoint(&val_dbs), "a database is in both splits");
    // Training snippets contain the tables the gold query uses.
    let e = train.iter().find(|e| e.output.contains("JOIN")).unwrap();
    let first_table = e
        .output
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("from"))
        .nth(1)
        .unwrap();
    assert!(
        e.input
            .to_lowercase()
            .contains(&format!("{}(", first_table.to_lowercase())),
        "{}\n{}",
        e.output,
        e.input
    );
}

#[test]
fn gold_against_gold_scores_one() {
    let Some(dir) = spider_dir() else { return };
    let mut verdicts = Vec::new();
    for_each_spider_gold(&dir, |_, db, sql| {
        verdicts.push(evaluate_one(db, sql, sql, EvalOptions::default()))
    });
    let r = summarize(&verdicts);
    assert_eq!(r.n, 6904);
    assert_eq!(r.gold_errors, 3, "the data's README names three gold queries that fail");
    let runnable: Vec<_> = verdicts.iter().filter(|d| d.error.is_none()).collect();
    assert!(runnable.iter().all(|d| d.exec_match && d.exact_match));
    assert_eq!(runnable.len(), 6901);
    assert_eq!(r.timeouts, 0);
    assert!(r.by_hardness.values().all(|g| g.n > 500), "{:?}", r.by_hardness);
}
