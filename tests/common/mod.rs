//! Helpers shared by the integration tests (each test crate uses some of them).
#![allow(dead_code)]

use sqlora::sql::exec::Db;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Whether this is a CI run (`CI` is `true` or `1`, as CI services set it, or `SQLORA_CI=1`, which
/// `.ci/run` sets): there every prerequisite of a test must be present.
pub fn in_ci() -> bool {
    let on = |v: &str| std::env::var(v).is_ok_and(|x| x == "1" || x.eq_ignore_ascii_case("true"));
    on("CI") || on("SQLORA_CI")
}

/// A test's prerequisite is missing: outside CI the test is skipped with `why` on stderr; under
/// CI ([`in_ci`]) the test fails, so that nothing counts as passed for lack of its input.
pub fn missing(why: &str) {
    assert!(
        !in_ci(),
        "{why}; CI provides it (.ci/run), so its absence is a failure, not a skip"
    );
    eprintln!("skipped: {why}");
}

/// ‖a − b‖ / ‖b‖, in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "comparing tensors of different sizes");
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Spider's training split in ../shared/data, or None (saying the tests that need it are skipped)
/// when that directory is not beside the repository.
pub fn spider_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/spider-train");
    if dir.join("tables.json").exists() {
        Some(dir)
    } else {
        missing(&format!(
            "{} not found (Spider's training split lives in ../shared)",
            dir.display()
        ));
        None
    }
}

/// f(db_id, db, gold SQL) for every question of Spider's training split (in `dir`) whose database
/// is present, each database opened once.
pub fn for_each_spider_gold(dir: &Path, mut f: impl FnMut(&str, &Db, &str)) {
    let questions: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train_spider.json")).unwrap()).unwrap();
    let mut dbs: HashMap<String, Db> = HashMap::new();
    for q in &questions {
        let (sql, id) = (q["query"].as_str().unwrap(), q["db_id"].as_str().unwrap());
        let path = dir.join("database").join(id).join(format!("{id}.sqlite"));
        if !path.exists() {
            continue;
        }
        let db = dbs.entry(id.to_string()).or_insert_with(|| Db::open(&path).unwrap());
        f(id, db, sql);
    }
}
