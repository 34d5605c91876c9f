//! Spider's hardness levels (easy, medium, hard, extra), from the component counts of the official
//! evaluator, computed on tokens rather than on Spider's parse tree:
//!
//! - component1: WHERE, GROUP BY, ORDER BY, LIMIT present (1 each); joins (tables in FROM - 1);
//!   each OR and each LIKE in the join conditions, WHERE and HAVING;
//! - component2: nested queries (subqueries in WHERE/HAVING, plus one for INTERSECT/UNION/EXCEPT);
//! - others: more than one aggregate; more than one selected column; more than one WHERE
//!   condition; more than one GROUP BY column (1 each).
//!
//! Only the outermost query's clauses are counted, as in the official evaluator.

use super::lex::{lex, Tok};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hardness {
    Easy,
    Medium,
    Hard,
    Extra,
}

impl Hardness {
    pub const ALL: [Hardness; 4] = [Hardness::Easy, Hardness::Medium, Hardness::Hard, Hardness::Extra];

    pub fn name(self) -> &'static str {
        match self {
            Hardness::Easy => "easy",
            Hardness::Medium => "medium",
            Hardness::Hard => "hard",
            Hardness::Extra => "extra",
        }
    }
}

/// The three component counts of a query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Components {
    pub component1: usize,
    pub component2: usize,
    pub others: usize,
}

const CLAUSES: [&str; 7] = ["select", "from", "where", "group", "having", "order", "limit"];
const AGGS: [&str; 5] = ["max", "min", "count", "sum", "avg"];

/// Count the components of `sql`.
pub fn components(sql: &str) -> Components {
    let toks = lex(sql);
    // Depth of every token: parentheses opened before it and not yet closed.
    let mut depth = Vec::with_capacity(toks.len());
    let mut d = 0usize;
    for t in &toks {
        if t.is_punct(")") {
            d = d.saturating_sub(1);
        }
        depth.push(d);
        if t.is_punct("(") {
            d += 1;
        }
    }
    let top = |i: usize| depth[i] == 0;
    // The outermost query ends at a top-level INTERSECT/UNION/EXCEPT.
    let set_op = (0..toks.len()).find(|&i| top(i) && ["intersect", "union", "except"].iter().any(|k| toks[i].is(k)));
    let end = set_op.unwrap_or(toks.len());
    // Clause of each top-level token.
    let mut clause = vec![""; end];
    let mut current = "";
    for i in 0..end {
        if top(i) {
            if let Some(k) = CLAUSES.iter().find(|k| toks[i].is(k)) {
                current = k;
            }
        }
        clause[i] = current;
    }
    let in_clause = |i: usize, names: &[&str]| top(i) && names.contains(&clause[i]);
    let count = |names: &[&str], pred: &dyn Fn(&Tok) -> bool| {
        (0..end).filter(|&i| in_clause(i, names) && pred(&toks[i])).count()
    };
    let has = |name: &str| (0..end).any(|i| clause[i] == name);

    // Conditions: ANDs that are not a BETWEEN's upper bound, and ORs.
    let between_and: Vec<bool> = {
        let mut v = vec![false; end];
        let mut pending = false;
        for i in 0..end {
            if top(i) && toks[i].is("between") {
                pending = true;
            } else if top(i) && toks[i].is("and") && pending {
                v[i] = true;
                pending = false;
            }
        }
        v
    };
    let connectives = |name: &str| {
        (0..end)
            .filter(|&i| clause[i] == name && top(i) && (toks[i].is("or") || (toks[i].is("and") && !between_and[i])))
            .count()
    };

    let mut c1 = 0;
    c1 += ["where", "group", "order", "limit"].iter().filter(|c| has(c)).count();
    let tables = 1 + count(&["from"], &|t| t.is("join") || t.is_punct(","));
    c1 += tables - 1;
    c1 += count(&["from", "where", "having"], &|t| t.is("or"));
    c1 += count(&["from", "where", "having"], &|t| t.is("like"));

    // Subqueries directly inside WHERE/HAVING: "(" at top level followed by SELECT.
    let nested = (0..end.saturating_sub(1))
        .filter(|&i| in_clause(i, &["where", "having"]) && toks[i].is_punct("(") && toks[i + 1].is("select"))
        .count();
    let c2 = nested + set_op.is_some() as usize;

    let aggs = (0..end.saturating_sub(1))
        .filter(|&i| {
            in_clause(i, &["select", "where", "group", "order", "having"])
                && AGGS.iter().any(|a| toks[i].is(a))
                && toks[i + 1].is_punct("(")
        })
        .count();
    let select_cols = 1 + count(&["select"], &|t| t.is_punct(","));
    let group_cols = if has("group") {
        1 + count(&["group"], &|t| t.is_punct(","))
    } else {
        0
    };
    let others = (aggs > 1) as usize
        + (select_cols > 1) as usize
        + (connectives("where") > 0) as usize
        + (group_cols > 1) as usize;
    Components {
        component1: c1,
        component2: c2,
        others,
    }
}

/// Spider's hardness level of a (gold) query.
pub fn hardness(sql: &str) -> Hardness {
    let Components {
        component1: c1,
        component2: c2,
        others: o,
    } = components(sql);
    if c1 <= 1 && o == 0 && c2 == 0 {
        Hardness::Easy
    } else if (o <= 2 && c1 <= 1 && c2 == 0) || (c1 <= 2 && o < 2 && c2 == 0) {
        Hardness::Medium
    } else if (o > 2 && c1 <= 2 && c2 == 0)
        || (c1 > 2 && c1 <= 3 && o <= 2 && c2 == 0)
        || (c1 <= 1 && o == 0 && c2 <= 1)
    {
        Hardness::Hard
    } else {
        Hardness::Extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spider_examples() {
        // Worked by hand from the official rules.
        assert_eq!(hardness("SELECT count(*) FROM head WHERE age > 56"), Hardness::Easy);
        assert_eq!(hardness("SELECT name FROM singer"), Hardness::Easy);
        // two columns, two aggregates: others 2, component1 0 -> medium
        assert_eq!(
            hardness("SELECT max(budget), min(budget) FROM department"),
            Hardness::Medium
        );
        // one join + ORDER BY + LIMIT: component1 3, others 0 -> hard
        assert_eq!(
            hardness("SELECT T1.name FROM a AS T1 JOIN b AS T2 ON T1.id = T2.aid ORDER BY T2.x LIMIT 1"),
            Hardness::Hard
        );
        // a nested query and two columns: component2 1, others 1 -> extra
        assert_eq!(
            hardness("SELECT name, age FROM s WHERE age > (SELECT avg(age) FROM s)"),
            Hardness::Extra
        );
        // INTERSECT alone with nothing else: component2 1, component1 0, others 0 -> hard
        assert_eq!(hardness("SELECT a FROM t INTERSECT SELECT a FROM u"), Hardness::Hard);
        // BETWEEN ... AND is one condition
        let c = components("SELECT a FROM t WHERE x BETWEEN 1 AND 3");
        assert_eq!((c.component1, c.others), (1, 0));
        let c = components("SELECT a FROM t WHERE x = 1 OR name LIKE '%a%'");
        assert_eq!((c.component1, c.others), (3, 1));
    }
}
