//! Choosing one answer among several candidate queries by running them (execution-guided
//! decoding): a query SQLite rejects, or one that runs past its time limit, cannot be the answer,
//! and among the queries that run, the answer most of them agree on is the likeliest.
//!
//! Only the question's database is used, never the gold query: the choice is what a deployed model
//! could make, and evaluation scores it like any other prediction. Each query runs read-only with
//! a time limit (see [`super::exec`]).

use super::compare::results_match;
use super::exec::{Db, Row};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// The chosen candidate and how the vote went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Choice {
    /// Index of the chosen candidate.
    pub index: usize,
    /// How many candidates ran.
    pub runnable: usize,
    /// How many of those gave the chosen one's result.
    pub votes: usize,
}

/// Choose among `sqls` (most preferred first; the greedy answer should come first): the runnable
/// candidates are grouped by result (rows as multisets, columns in any order, as evaluation
/// compares them); a group with rows beats one whose result is empty, then the larger group wins,
/// then the group whose first member comes first. The answer is that first member. When nothing
/// runs, it is candidate 0.
pub fn choose(db: &Db, sqls: &[String], limit: Duration) -> Choice {
    // One entry per distinct result: its rows, the first candidate giving it, its votes.
    let mut groups: Vec<(Vec<Row>, usize, usize)> = Vec::new();
    let mut runnable = 0;
    // Each distinct text runs once (sampled candidates often repeat the greedy one).
    let mut ran: HashMap<&str, Option<Vec<Row>>> = HashMap::new();
    for (i, sql) in sqls.iter().enumerate() {
        let rows = ran.entry(sql.trim()).or_insert_with(|| run(db, sql, limit)).clone();
        let Some(rows) = rows else { continue };
        runnable += 1;
        match groups.iter_mut().find(|g| results_match(&g.0, &rows, false)) {
            Some(g) => g.2 += 1,
            None => groups.push((rows, i, 1)),
        }
    }
    let best = (groups.iter()).max_by(|a, b| {
        let key = |g: &(Vec<Row>, usize, usize)| (!g.0.is_empty(), g.2);
        key(a).cmp(&key(b)).then(b.1.cmp(&a.1))
    });
    match best {
        Some(g) => Choice {
            index: g.1,
            runnable,
            votes: g.2,
        },
        None => Choice {
            index: 0,
            runnable: 0,
            votes: 0,
        },
    }
}

/// The rows of `sql`, or `None` when it fails or runs out of time.
fn run(db: &Db, sql: &str, limit: Duration) -> Option<Vec<Row>> {
    if sql.trim().is_empty() {
        return None;
    }
    db.query(sql, limit).ok()
}
