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
    let mut groups: Vec<Group> = Vec::new();
    let mut runnable = 0;
    // The group of each distinct text (None: it did not run): a repeated text, and sampled
    // candidates often repeat the greedy one, neither runs nor is compared again.
    let mut seen: HashMap<&str, Option<usize>> = HashMap::new();
    for (i, sql) in sqls.iter().enumerate() {
        let group = *seen.entry(sql.trim()).or_insert_with(|| {
            let rows = run(db, sql, limit)?;
            let same = groups.iter().position(|g| results_match(&g.rows, &rows, false));
            Some(same.unwrap_or_else(|| {
                groups.push(Group {
                    rows,
                    first: i,
                    votes: 0,
                });
                groups.len() - 1
            }))
        });
        if let Some(k) = group {
            groups[k].votes += 1;
            runnable += 1;
        }
    }
    // Groups stand in the order of their first members, so on equal keys the earlier one wins.
    let key = |g: &Group| (!g.rows.is_empty(), g.votes);
    let best = (groups.iter()).fold(None, |best: Option<&Group>, g| match best {
        Some(b) if key(b) >= key(g) => Some(b),
        _ => Some(g),
    });
    match best {
        Some(g) => Choice {
            index: g.first,
            runnable,
            votes: g.votes,
        },
        None => Choice {
            index: 0,
            runnable: 0,
            votes: 0,
        },
    }
}

/// Candidates that gave the same result.
struct Group {
    rows: Vec<Row>,
    /// The first candidate that gave it.
    first: usize,
    votes: usize,
}

/// The rows of `sql`, or `None` when it fails or runs out of time.
fn run(db: &Db, sql: &str, limit: Duration) -> Option<Vec<Row>> {
    if sql.trim().is_empty() {
        return None;
    }
    db.query(sql, limit).ok()
}
