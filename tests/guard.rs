//! The schema guard on Spider's gold queries: a guard that refused correct SQL would make the
//! model worse. Every prefix of every gold query of the training split (in ../shared/data) must
//! pass, on the schema of its database as SQLite reads it.

mod common;
use common::{for_each_spider_gold, spider_dir};

use sqlora::sql::guard::{check, Names};
use sqlora::sql::schema::Schema;
use std::collections::HashMap;

#[test]
fn no_prefix_of_a_gold_query_is_refused() {
    let Some(dir) = spider_dir() else { return };
    let mut names: HashMap<String, Names> = HashMap::new();
    let (mut n, mut refused) = (0, Vec::new());
    for_each_spider_gold(&dir, |id, db, sql| {
        let names =
            (names.entry(id.to_string())).or_insert_with(|| Names::of(&Schema::from_sqlite(db.path(), 0).unwrap()));
        n += 1;
        let first = (sql.char_indices().map(|(k, _)| k).skip(1))
            .map(|k| (&sql[..k], check(names, &sql[..k], false)))
            .chain(std::iter::once((sql, check(names, sql, true))))
            .find(|(_, r)| r.is_err());
        if let Some((prefix, r)) = first {
            refused.push(format!("{id}: {sql}\n    at {prefix:?}: {}", r.unwrap_err()));
        }
    });
    assert_eq!(n, 6904);
    // Three are refused: one joins a table its database does not have (Ref_Company_Types, in
    // assets_maintenance) and fails when run; two name their first table T2, against the convention
    // the guard follows (`Checker::fitting_tables`).
    assert!(refused.len() <= 3, "{} refused:\n{}", refused.len(), refused.join("\n"));
}

#[test]
fn the_guard_as_a_constraint_decodes_the_answer_and_checks_it() {
    use sqlora::model::generate::Constraint;
    use sqlora::model::tiny::{write_tiny_model, TinyVariant};
    use sqlora::sql::guard::SchemaGuard;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    // The tiny tokenizer has a token per byte (id = the byte's value).
    let tok = sqlora::load::open(dir.path()).unwrap().tokenizer().unwrap();
    let names = Names::from_pairs(&[("users", &["id", "name", "city"])]);
    let stop = 300;
    let guard = SchemaGuard::new(tok, vec![Some(Arc::new(names)), None], &[stop]);
    let ids = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
    let so_far = ids("SELECT na");
    assert!(guard.allows(0, &so_far, b'm' as u32));
    assert!(!guard.allows(0, &so_far, b'x' as u32), "no name begins 'nax'");
    assert!(guard.allows(1, &so_far, b'x' as u32), "prompt 1 is not guarded");
    // Stopping checks the answer as finished: T1 was never bound.
    assert!(!guard.allows(0, &ids("SELECT T1.name FROM users AS T2"), stop));
    assert!(guard.allows(0, &ids("SELECT T1.name FROM users AS T1"), stop));
    assert!(!guard.allows(0, &ids("SELECT city FROM users WHERE nam"), b'x' as u32));
    assert!(
        !guard.allows(0, &ids("SELECT T1.name FROM "), b'c' as u32),
        "no table begins 'c'"
    );
    // An answer already refused (the guard gave way) is no longer held to the schema.
    assert!(guard.allows(0, &ids("SELECT nax"), b'y' as u32));
}
