//! Comparing query results the way Spider's test-suite evaluator does: rows as a multiset (as a list
//! when the gold query orders them), columns matched under any permutation.

use super::exec::{Key, Row};
use super::lex::{lex, render, Tok};
use std::collections::HashMap;

/// Whether row order is part of the answer: decided by the gold query alone, as `'order by' in
/// gold.lower()` decides it in the official evaluator.
pub fn order_matters(gold_sql: &str) -> bool {
    let toks = lex(gold_sql);
    toks.windows(2).any(|w| w[0].is("order") && w[1].is("by"))
}

/// The query with every DISTINCT keyword removed (the official evaluator compares results without
/// DISTINCT, on both sides).
pub fn remove_distinct(sql: &str) -> String {
    let toks: Vec<Tok> = lex(sql).into_iter().filter(|t| !t.is("distinct")).collect();
    render(&toks)
}

fn multiset(rows: &[Row]) -> HashMap<&Row, usize> {
    let mut m = HashMap::new();
    for r in rows {
        *m.entry(r).or_insert(0) += 1;
    }
    m
}

/// Whether two results are the same answer. Columns of `pred` may be in any order; rows are
/// compared as multisets unless `ordered`, then as sequences.
pub fn results_match(gold: &[Row], pred: &[Row], ordered: bool) -> bool {
    if gold.is_empty() && pred.is_empty() {
        return true;
    }
    if gold.len() != pred.len() {
        return false;
    }
    let ncol = gold[0].len();
    if pred[0].len() != ncol || gold.iter().chain(pred).any(|r| r.len() != ncol) {
        return false;
    }
    // Quick rejection: each row's sorted cells must match as a multiset, whatever the column order.
    let sorted_rows = |rows: &[Row]| -> Vec<Row> {
        rows.iter()
            .map(|r| {
                let mut s = r.clone();
                s.sort();
                s
            })
            .collect()
    };
    let (gs, ps) = (sorted_rows(gold), sorted_rows(pred));
    if ordered {
        if gs != ps {
            return false;
        }
    } else if multiset(&gs) != multiset(&ps) {
        return false;
    }
    // Candidate sources for each gold column: the pred columns whose values all occur in it.
    let gold_sets: Vec<std::collections::HashSet<&Key>> =
        (0..ncol).map(|c| gold.iter().map(|r| &r[c]).collect()).collect();
    let candidates: Vec<Vec<usize>> = (0..ncol)
        .map(|gc| {
            (0..ncol)
                .filter(|&pc| pred.iter().all(|r| gold_sets[gc].contains(&r[pc])))
                .collect()
        })
        .collect();
    let gold_ms = multiset(gold);
    let mut perm = vec![usize::MAX; ncol];
    let mut used = vec![false; ncol];
    try_perms(0, &candidates, &mut perm, &mut used, &mut |perm| {
        let permuted: Vec<Row> = pred
            .iter()
            .map(|r| perm.iter().map(|&pc| r[pc].clone()).collect())
            .collect();
        if ordered {
            permuted == gold
        } else {
            multiset(&permuted) == gold_ms
        }
    })
}

/// Depth-first search over the column permutations allowed by `candidates`; stops at the first one
/// that `accept` takes.
fn try_perms(
    gc: usize,
    candidates: &[Vec<usize>],
    perm: &mut [usize],
    used: &mut [bool],
    accept: &mut dyn FnMut(&[usize]) -> bool,
) -> bool {
    if gc == candidates.len() {
        return accept(perm);
    }
    for &pc in &candidates[gc] {
        if !used[pc] {
            used[pc] = true;
            perm[gc] = pc;
            if try_perms(gc + 1, candidates, perm, used, accept) {
                return true;
            }
            used[pc] = false;
        }
    }
    false
}

/// A query normalised for exact-match comparison: keywords and bare identifiers lowercased, one
/// space between tokens, no trailing semicolon, `AS` dropped, `==`/`<>` spelled `=`/`!=`. Quoted
/// text keeps its case and is written with single quotes whichever quotes it had (SQLite, and
/// Spider's gold queries, use double quotes for string values too).
pub fn normalize(sql: &str) -> String {
    let toks: Vec<Tok> = lex(sql)
        .into_iter()
        .filter(|t| !t.is_punct(";") && !t.is("as"))
        .map(|t| match t {
            Tok::Word(w) => Tok::Word(w.to_lowercase()),
            Tok::Str(s) | Tok::Quoted(s) => Tok::Str(s),
            Tok::Num(n) => Tok::Num(n.to_lowercase()),
            Tok::Punct(p) => Tok::Punct(if p == "==" {
                "=".into()
            } else if p == "<>" {
                "!=".into()
            } else {
                p
            }),
        })
        .collect();
    render(&toks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&[i64]]) -> Vec<Row> {
        v.iter().map(|r| r.iter().map(|&x| Key::Int(x)).collect()).collect()
    }

    #[test]
    fn column_permutations_and_multisets() {
        let g = rows(&[&[1, 10], &[2, 20], &[2, 20]]);
        assert!(results_match(&g, &rows(&[&[20, 2], &[10, 1], &[20, 2]]), false));
        assert!(
            !results_match(&g, &rows(&[&[20, 2], &[10, 1], &[10, 1]]), false),
            "duplicates count"
        );
        assert!(
            !results_match(&g, &rows(&[&[20, 2], &[10, 1], &[20, 2]]), true),
            "order matters"
        );
        assert!(results_match(&g, &rows(&[&[10, 1], &[20, 2], &[20, 2]]), true));
        assert!(!results_match(&g, &rows(&[&[1, 10], &[2, 20]]), false));
        assert!(!results_match(&rows(&[&[1, 2]]), &rows(&[&[1, 2, 3]]), false));
        // Same values, but no permutation maps every row: (1,2),(2,1) vs (1,1),(2,2).
        assert!(!results_match(
            &rows(&[&[1, 2], &[2, 1]]),
            &rows(&[&[1, 1], &[2, 2]]),
            false
        ));
        assert!(results_match(&[], &[], true));
    }

    #[test]
    fn distinct_order_and_normalisation() {
        assert_eq!(remove_distinct("SELECT DISTINCT name FROM t"), "SELECT name FROM t");
        assert!(order_matters("select a from t ORDER  BY a"));
        assert!(!order_matters("select 'order by' from t"));
        assert_eq!(
            normalize("SELECT T1.name AS n FROM Singer AS T1;"),
            normalize("select t1.name n from singer t1")
        );
        assert_eq!(
            normalize("select a from t where b = \"X\""),
            normalize("select a from t where b = 'X'")
        );
        assert_ne!(
            normalize("select name from t where x = 'A'"),
            normalize("select name from t where x = 'a'")
        );
    }
}
