//! Execution-accuracy evaluation: semantics, safety, time limits, the `eval` contract, and the
//! bundled shop dataset. Runs without ../shared (tests/spider.rs covers the Spider files).

use sqlora::sql::data::shop::{generate_pairs, write_shop_dataset, write_shop_db};
use sqlora::sql::eval::{evaluate_one, EvalOptions};
use sqlora::sql::exec::{Db, QueryError};
use sqlora::sql::hardness::Hardness;
use sqlora::sql::schema::Schema;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn shop() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.sqlite");
    write_shop_db(&db).unwrap();
    (dir, db)
}

fn judge(db: &Db, gold: &str, pred: &str) -> sqlora::sql::eval::Detail {
    evaluate_one(db, gold, pred, EvalOptions::default())
}

#[test]
fn disagreements_behave_as_specified() {
    let (_d, path) = shop();
    let db = Db::open(&path).unwrap();
    let hit = |g: &str, p: &str| judge(&db, g, p).exec_match;
    // Row order matters only when the gold query has ORDER BY.
    assert!(hit(
        "SELECT name FROM users WHERE id < 5",
        "SELECT name FROM users WHERE id < 5 ORDER BY name DESC"
    ));
    assert!(!hit(
        "SELECT name FROM users WHERE id < 5 ORDER BY id",
        "SELECT name FROM users WHERE id < 5 ORDER BY id DESC"
    ));
    assert!(
        hit(
            "SELECT name FROM users WHERE id < 5 ORDER BY id",
            "SELECT name FROM users WHERE id < 5"
        ),
        "same order by accident is fine"
    );
    // Duplicates count (multisets), unless DISTINCT is removed from both sides.
    assert!(!hit("SELECT city FROM users", "SELECT city FROM users GROUP BY city"));
    assert!(
        hit("SELECT DISTINCT city FROM users", "SELECT city FROM users"),
        "DISTINCT is removed by default"
    );
    let keep = EvalOptions {
        keep_distinct: true,
        ..Default::default()
    };
    assert!(!evaluate_one(&db, "SELECT DISTINCT city FROM users", "SELECT city FROM users", keep).exec_match);
    // Columns may come in another order.
    assert!(hit("SELECT name, city FROM users", "SELECT city, name FROM users"));
    assert!(!hit("SELECT name, city FROM users", "SELECT name FROM users"));
    // Types: 1 and 1.0 are the same number; '30' is not 30.
    assert!(hit("SELECT count(*) FROM users", "SELECT count(*) * 1.0 FROM users"));
    assert!(!hit(
        "SELECT count(*) FROM users",
        "SELECT CAST(count(*) AS TEXT) FROM users"
    ));
    // Wrong answers and broken SQL are misses; broken SQL is invalid, with its error.
    assert!(!hit("SELECT count(*) FROM users", "SELECT count(*) FROM orders"));
    let d = judge(&db, "SELECT count(*) FROM users", "SELECT count(* FROM users");
    assert!(!d.exec_match && !d.valid_sql && d.error.is_some());
    let d = judge(&db, "SELECT count(*) FROM users", "SELECT count(*) FROM nope");
    assert!(d.error.unwrap().contains("no such table"));
    // Exact match is Spider's exact set match (tested below).
    assert!(judge(&db, "select name from users", "SELECT  name FROM users;").exact_match);
}

#[test]
fn exact_match_is_spider_set_match() {
    let (_d, path) = shop();
    let db = Db::open(&path).unwrap();
    // Columns are a set, aliases resolve, values are ignored: exact but not the same result.
    let d = judge(
        &db,
        "SELECT name, city FROM users WHERE id < 5",
        "SELECT T.city, T.name FROM users AS T WHERE T.id < 7",
    );
    assert!(d.exact_match && !d.exec_match, "{d:?}");
    assert!(
        !judge(
            &db,
            "SELECT name FROM users ORDER BY id",
            "SELECT name FROM users ORDER BY id DESC"
        )
        .exact_match
    );
    assert!(!judge(&db, "SELECT name FROM users", "SELECT name FROM users LIMIT 3").exact_match);
    // orders.user_id references users.id, so the two are one column.
    let g = "SELECT T1.name, count(*) FROM users AS T1 JOIN orders AS T2 ON T1.id = T2.user_id GROUP BY T1.id";
    let d = judge(&db, g, &g.replace("GROUP BY T1.id", "GROUP BY T2.user_id"));
    assert!(d.exact_match && d.exec_match, "{d:?}");
    // An unparseable prediction never matches; an unparseable gold query falls back to text.
    assert!(!judge(&db, "SELECT count(*) FROM users", "SELECT count(* FROM users").exact_match);
    assert!(judge(&db, "SELECT upper(name) FROM users", "select UPPER(name) from users").exact_match);
    assert!(!judge(&db, "SELECT upper(name) FROM users", "SELECT lower(name) FROM users").exact_match);
    // DISTINCT is ignored, as officially, unless kept.
    let (a, b) = ("SELECT DISTINCT city FROM users", "SELECT city FROM users");
    assert!(judge(&db, a, b).exact_match);
    let keep = EvalOptions {
        keep_distinct: true,
        ..Default::default()
    };
    assert!(!evaluate_one(&db, a, b, keep).exact_match);
}

#[test]
fn a_pathological_query_stops_at_the_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE t (x INTEGER);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) INSERT INTO t SELECT i FROM n;",
    )
    .unwrap();
    drop(conn);
    let db = Db::open(&path).unwrap();
    let start = Instant::now();
    let r = db.query(
        "SELECT count(*) FROM t AS a, t AS b, t AS c WHERE a.x + b.x = c.x",
        Duration::from_millis(300),
    );
    assert_eq!(r, Err(QueryError::Timeout));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "stopped after {:?}",
        start.elapsed()
    );
    let opts = EvalOptions {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let d = evaluate_one(
        &db,
        "SELECT count(*) FROM t",
        "SELECT count(*) FROM t AS a, t AS b, t AS c",
        opts,
    );
    assert!(d.timeout && !d.exec_match && !d.valid_sql);
    // The connection is still usable after an interrupted query.
    assert!(db.query("SELECT count(*) FROM t", Duration::from_secs(5)).is_ok());
}

#[test]
fn writes_fail_and_leave_the_file_byte_identical() {
    let (dir, path) = shop();
    let before = std::fs::read(&path).unwrap();
    let db = Db::open(&path).unwrap();
    let attach = format!(
        "ATTACH DATABASE '{}' AS other",
        dir.path().join("other.sqlite").display()
    );
    for sql in [
        "DROP TABLE users",
        "DELETE FROM users",
        "UPDATE users SET name = 'x'",
        "INSERT INTO users VALUES (99, 'x', 'x', 'x', 'x')",
        attach.as_str(),
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = WAL",
        "CREATE TABLE evil (x)",
        "CREATE TEMP TABLE evil (x)",
        "SELECT 1; DROP TABLE users",
        "VACUUM",
    ] {
        let r = db.query(sql, Duration::from_secs(2));
        assert!(r.is_err(), "{sql} must fail, got {r:?}");
        let d = judge(&db, "SELECT count(*) FROM users", sql);
        assert!(!d.exec_match && !d.valid_sql, "{sql}");
    }
    drop(db);
    assert_eq!(std::fs::read(&path).unwrap(), before, "the database file changed");
    assert!(!dir.path().join("other.sqlite").exists(), "ATTACH created a file");
    assert!(
        Db::open(&dir.path().join("missing.sqlite")).is_err(),
        "a missing database is never created"
    );
    assert!(!dir.path().join("missing.sqlite").exists());
}

#[test]
fn shop_pairs_are_verified_deterministic_and_varied() {
    let (_d, path) = shop();
    let a = generate_pairs(&path, 5, 7).unwrap();
    let b = generate_pairs(&path, 5, 7).unwrap();
    assert_eq!(a, b);
    let db = Db::open(&path).unwrap();
    let mut levels = std::collections::HashSet::new();
    for ex in &a {
        let rows = db.query(&ex.output, Duration::from_secs(5)).unwrap();
        assert!(!rows.is_empty(), "{}", ex.output);
        let d = judge(&db, &ex.output, &ex.output);
        assert!(d.exec_match, "{}", ex.output);
        levels.insert(d.hardness);
        assert!(ex.input.contains("orders.user_id -> users.id"));
    }
    assert_eq!(levels.len(), 4, "every hardness level occurs: {levels:?}");
    let text: String = a.iter().map(|e| e.output.to_lowercase()).collect::<Vec<_>>().join("\n");
    for feature in [
        "join",
        "group by",
        "having",
        "order by",
        "limit",
        "between",
        "like",
        "intersect",
        "(select",
    ] {
        assert!(text.contains(feature), "no generated query uses {feature}");
    }
}

#[test]
fn schema_snippets_prune_and_link() {
    let (_d, path) = shop();
    let s = Schema::from_sqlite(&path, 2).unwrap();
    let all = s.render_all();
    assert!(all.starts_with("categories(id INTEGER PRIMARY KEY, name TEXT (e.g. 'Books', 'Electronics'))"));
    assert!(all.contains("order_items.product_id -> products.id"));
    // Training: the gold query's tables, plus distractors, in schema order.
    let mut rng = sqlora::util::rng::Rng::new(1);
    let snip = s.training_snippet("SELECT name FROM products", 1, &mut rng);
    assert_eq!(snip.lines().filter(|l| l.contains('(')).count(), 2);
    assert!(snip.contains("products("));
    let none = s.training_snippet("SELECT name FROM products", 0, &mut rng);
    assert!(
        !none.contains("users(") && !none.contains("->"),
        "no arrow without both tables"
    );
    // Inference under a budget: the linker keeps the table the question is about.
    let chars = |t: &str| t.len();
    let q = s.question_snippet("What is the email of Ada Silva?", 300, &chars);
    assert!(q.contains("users(") && q.len() <= 300, "{q}");
    assert_eq!(s.question_snippet("anything", 100_000, &chars), all);
    // Values the question names (any case, whole words) come first among their column's examples,
    // as stored; the count of examples stays; nothing else changes.
    let oslo = s.question_snippet("How many users live in oslo?", 100_000, &chars);
    assert!(oslo.contains("city TEXT (e.g. 'Oslo', 'Lagos')"), "{oslo}");
    assert_eq!(oslo.replace("'Oslo', 'Lagos'", "'Lagos', 'Osaka'"), all);
    assert_eq!(
        s.question_snippet("How many users live in Oslon?", 100_000, &chars),
        all
    );
}

fn sqlora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sqlora")).args(args).output().unwrap()
}

#[test]
fn eval_command_contract() {
    let dir = tempfile::tempdir().unwrap();
    let out = sqlora(&[
        "prepare",
        "shop",
        "--out",
        dir.path().to_str().unwrap(),
        "--per-template",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gold = dir.path().join("train.jsonl");
    let examples = sqlora::sql::data::read_jsonl(&gold).unwrap();
    // Predictions: gold for even lines, a wrong query for odd lines, one broken one.
    let preds: Vec<String> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sql = match i {
                1 => "SELEC nothing".to_string(),
                i if i % 2 == 1 => "SELECT -1".to_string(),
                _ => e.output.clone(),
            };
            serde_json::json!({ "sql": sql }).to_string()
        })
        .collect();
    let pred = dir.path().join("pred.jsonl");
    std::fs::write(&pred, preds.join("\n") + "\n").unwrap();
    let details = dir.path().join("details.jsonl");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let out = sqlora(&[
        "eval",
        "--data",
        &p(&gold),
        "--pred",
        &p(&pred),
        "--json",
        "--details",
        &p(&details),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = examples.len();
    assert_eq!(r["n"], n);
    let hits = n.div_ceil(2);
    assert!((r["execution_accuracy"].as_f64().unwrap() - hits as f64 / n as f64).abs() < 1e-9);
    assert!((r["valid_sql_rate"].as_f64().unwrap() - (n - 1) as f64 / n as f64).abs() < 1e-9);
    for key in ["exact_match", "timeouts", "by_hardness"] {
        assert!(r.get(key).is_some(), "missing {key}");
    }
    for h in Hardness::ALL {
        assert!(r["by_hardness"][h.name()]["execution_accuracy"].is_number());
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&details)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n);
    assert_eq!(lines[0]["exec_match"], true);
    assert_eq!(lines[0]["error"], serde_json::Value::Null);
    assert_eq!(lines[1]["exec_match"], false);
    assert!(lines[1]["error"].as_str().unwrap().contains("syntax error"));
    assert!(lines[2]["exact_match"].is_boolean() && lines[2]["hardness"].is_string());
    // Every miss has its kind, every hit none; the report counts them.
    assert_eq!(lines[0]["miss"], serde_json::Value::Null);
    assert_eq!(lines[1]["miss"], "syntax error");
    assert_eq!(
        lines[3]["miss"], "wrong, not parsed",
        "SELECT -1 has no FROM for the parser"
    );
    let misses = r["misses"].as_object().unwrap();
    assert_eq!(
        misses.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        (n - hits) as u64
    );
    assert_eq!(misses["syntax error"], 1);
    let se = r["execution_accuracy_se"].as_f64().unwrap();
    let p_hit = hits as f64 / n as f64;
    assert!((se - (p_hit * (1.0 - p_hit) / n as f64).sqrt()).abs() < 1e-12);

    // Mismatched counts are an error naming both files.
    std::fs::write(&pred, "{\"sql\": \"SELECT 1\"}\n").unwrap();
    let out = sqlora(&["eval", "--data", &p(&gold), "--pred", &p(&pred)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pred.jsonl has 1 predictions"));
}

#[test]
fn shop_dataset_files() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = write_shop_dataset(dir.path(), 10, 42).unwrap();
    // Templates without slots give one pair each: 117 + 12 at 10 per template.
    assert!(train >= 100 && val >= 10, "{train} / {val}");
    let t = sqlora::sql::data::read_jsonl(&dir.path().join("train.jsonl")).unwrap();
    let v = sqlora::sql::data::read_jsonl(&dir.path().join("val.jsonl")).unwrap();
    assert_eq!((t.len(), v.len()), (train, val));
    let tq: std::collections::HashSet<_> = t.iter().map(|e| &e.output).collect();
    assert!(v.iter().all(|e| e.db_path.as_deref() == Some("shop.sqlite")));
    assert!(
        v.iter().any(|e| !tq.contains(&e.output)),
        "validation holds unseen queries"
    );
}

#[test]
fn the_bundled_shop_database_is_the_generated_one() {
    // shop/shop.sqlite ships with the repository so that `ask --db shop/shop.sqlite` works right
    // after a clone; it must hold exactly what `sqlora prepare shop` writes.
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("shop/shop.sqlite");
    let (_d, fresh) = shop();
    let (a, b) = (Db::open(&bundled).unwrap(), Db::open(&fresh).unwrap());
    let limit = Duration::from_secs(10);
    let dump = |db: &Db| -> Vec<sqlora::sql::exec::Row> {
        let tables = db
            .query(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name",
                limit,
            )
            .unwrap();
        let mut out = tables.clone();
        for t in &tables {
            let sqlora::sql::exec::Key::Text(name) = &t[0] else {
                panic!("table name {:?}", t[0])
            };
            out.extend(
                db.query(&format!("SELECT * FROM \"{name}\" ORDER BY rowid"), limit)
                    .unwrap(),
            );
        }
        out
    };
    let (da, db_) = (dump(&a), dump(&b));
    assert!(da.len() > 100, "{} rows", da.len());
    assert!(
        da == db_,
        "shop/shop.sqlite differs from write_shop_db's: run `sqlora prepare shop --out shop`"
    );
}
