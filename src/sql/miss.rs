//! What kind of miss a wrong prediction is: the error analysis behind "what is left to learn".
//!
//! A prediction that does not run is named by SQLite's complaint (an unknown column or table, an
//! ambiguous column, a syntax error, a time-out). One that runs but answers wrongly is named by the
//! first part of its parsed form (see [`super::exact`]) that differs from the gold query's: the
//! tables it joins, what it selects, its conditions, grouping, ordering, set operations. When the
//! forms agree, the literal values decide between a wrong value (`'Alabama'` for `'AL'`) and the
//! rest (join keys, which exact set match does not compare).

use super::exact::{first_difference, parse, Catalog};
use super::exec::QueryError;
use super::lex::{lex, Tok};

/// The kinds, in the order reports list them.
pub const KINDS: [&str; 18] = [
    "no SQL",
    "unknown column",
    "unknown table",
    "ambiguous column",
    "syntax error",
    "other SQL error",
    "time-out",
    "wrong tables (join)",
    "wrong select list",
    "wrong condition",
    "wrong grouping",
    "wrong order or limit",
    "wrong set operation",
    "wrong keyword",
    "wrong value",
    "join keys or other",
    "wrong, not parsed",
    "gold query failed",
];

/// Why a query did not run, from SQLite's message.
pub fn run_error(e: &QueryError) -> &'static str {
    let QueryError::Sql(m) = e else {
        return "time-out";
    };
    let m = m.to_lowercase();
    if m.contains("no such column") {
        "unknown column"
    } else if m.contains("no such table") {
        "unknown table"
    } else if m.contains("ambiguous column") {
        "ambiguous column"
    } else if m.contains("syntax error") || m.contains("incomplete input") || m.contains("unrecognized token") {
        "syntax error"
    } else {
        "other SQL error"
    }
}

/// The kind of a prediction that ran and gave the wrong rows. `cat` is the database's catalog when
/// it could be read; without one, or when the parser cannot read either query (LEFT JOIN, CASE,
/// no FROM, ...), the kind is "wrong, not parsed".
pub fn wrong_answer(cat: Option<&Catalog>, gold: &str, pred: &str) -> &'static str {
    let parsed = cat.and_then(|c| Some((parse(c, gold, false).ok()?, parse(c, pred, false).ok()?)));
    let Some((g, p)) = parsed else {
        return "wrong, not parsed";
    };
    if let Some(part) = first_difference(&g, &p) {
        return match part {
            "from" => "wrong tables (join)",
            "select" => "wrong select list",
            "where" => "wrong condition",
            "group" => "wrong grouping",
            "order" => "wrong order or limit",
            "compound" => "wrong set operation",
            _ => "wrong keyword",
        };
    }
    if literals(gold) != literals(pred) {
        "wrong value"
    } else {
        "join keys or other"
    }
}

/// The literal values of a query, sorted (numbers by value: 1 and 1.0 are one value).
fn literals(sql: &str) -> Vec<String> {
    let mut v: Vec<String> = lex(sql)
        .into_iter()
        .filter_map(|t| match t {
            Tok::Str(s) => Some(format!("'{s}")),
            Tok::Num(n) => Some(n.parse::<f64>().map_or(n, |x| x.to_string())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> Catalog {
        Catalog::new(&[
            ("users", vec!["id", "name", "city", "age"]),
            ("orders", vec!["id", "user_id", "total"]),
        ])
        .with_foreign_keys(&[("orders.user_id", "users.id")])
    }

    #[test]
    fn run_errors_are_named_by_sqlites_complaint() {
        let sql = |m: &str| run_error(&QueryError::Sql(m.into()));
        assert_eq!(sql("no such column: T2.born_state"), "unknown column");
        assert_eq!(sql("no such table: heads"), "unknown table");
        assert_eq!(sql("ambiguous column name: id"), "ambiguous column");
        assert_eq!(sql("near \"FROM\": syntax error"), "syntax error");
        assert_eq!(sql("incomplete input"), "syntax error");
        assert_eq!(sql("attempt to write a readonly database"), "other SQL error");
        assert_eq!(run_error(&QueryError::Timeout), "time-out");
    }

    #[test]
    fn wrong_answers_are_named_by_the_first_part_that_differs() {
        let c = cat();
        let kind = |g: &str, p: &str| wrong_answer(Some(&c), g, p);
        let gold = "SELECT name FROM users WHERE city = 'Oslo'";
        assert_eq!(
            kind(
                gold,
                "SELECT users.name FROM users JOIN orders ON users.id = orders.user_id WHERE city = 'Oslo'"
            ),
            "wrong tables (join)"
        );
        assert_eq!(
            kind(gold, "SELECT name, age FROM users WHERE city = 'Oslo'"),
            "wrong select list"
        );
        assert_eq!(kind(gold, "SELECT name FROM users WHERE age > 3"), "wrong condition");
        assert_eq!(
            kind(gold, "SELECT name FROM users WHERE city = 'Oslo' GROUP BY name"),
            "wrong grouping"
        );
        assert_eq!(
            kind(gold, "SELECT name FROM users WHERE city = 'Oslo' LIMIT 1"),
            "wrong order or limit"
        );
        assert_eq!(
            kind(gold, "SELECT name FROM users WHERE city LIKE 'Oslo'"),
            "wrong condition"
        );
        assert_eq!(
            kind(gold, "SELECT name FROM users WHERE city = 'Bergen'"),
            "wrong value"
        );
        assert_eq!(kind(gold, "SELECT name FROM users WHERE city = 'oslo'"), "wrong value");
        assert_eq!(
            kind(
                "SELECT users.name FROM users JOIN orders ON users.id = orders.user_id",
                "SELECT users.name FROM users JOIN orders ON users.id = orders.id"
            ),
            "join keys or other"
        );
        // Without a catalog, or for a query the parser cannot read, the kind is not guessed.
        assert_eq!(
            wrong_answer(None, gold, "SELECT name FROM users WHERE city = 'Bergen'"),
            "wrong, not parsed"
        );
        assert_eq!(kind(gold, "SELECT -1"), "wrong, not parsed");
        for k in [
            kind(gold, "SELECT age FROM users"),
            run_error(&QueryError::Timeout),
            "no SQL",
        ] {
            assert!(KINDS.contains(&k), "{k} is listed");
        }
    }
}
