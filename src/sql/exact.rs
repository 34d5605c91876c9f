//! Spider's exact set match, written from the definition of the official evaluator (taoyds/spider,
//! `evaluation.py` with its parser `process_sql.py`): both queries are parsed into components, columns
//! are resolved against the database schema, literal values are dropped, and the components are
//! compared as the official evaluator compares them:
//!
//! - select: the multiset of (aggregate, value unit) items; a value unit is a column (or `*`) or
//!   `column op column`, each column with its own aggregate and DISTINCT flag;
//! - where: the multiset of conditions (NOT flag, operator, left-hand value unit, right-hand side), and
//!   the set of AND/OR connectives between them; a right-hand side that is a literal *or a column* is
//!   one placeholder (as officially), a nested query is compared as a query;
//! - group: the GROUP BY columns (in order) and, when either query groups, the HAVING conditions (in
//!   order);
//! - order: the direction and the ORDER BY value units (in order); the direction is the last one
//!   written (ASC when none is), as the official parser keeps one direction per clause;
//! - LIMIT by presence; INTERSECT / UNION / EXCEPT by operator and, recursively, right-hand query;
//! - keywords: the set of where, group, having, order, asc/desc, limit, intersect, union, except, and
//!   or / not / in / like as used in join, where or having conditions;
//! - FROM: the multiset of table units (tables, or subqueries compared as queries). Join conditions
//!   count only through the keyword set, as officially.
//!
//! As officially, columns linked by a foreign key are one column when their table is in the outermost
//! query's FROM (in that query and the right-hand side of its INTERSECT/UNION/EXCEPT, not in nested
//! queries), and DISTINCT is ignored (`DISABLE_DISTINCT`) except inside nested queries;
//! `keep_distinct` makes it count everywhere.
//!
//! Where this differs from the official code: nested queries are compared with these same set rules
//! and without their values (officially, condition subqueries are compared structurally, and FROM
//! subqueries keep their values); aliases are scoped per query (officially one alias map serves the
//! whole text; it is used here only as a last resort). Accepted beyond the official grammar: column
//! aliases in the select list, table aliases without AS, comma joins and INNER JOIN, parenthesised
//! conditions (flattened), prefix NOT, IS [NOT] NULL, value lists after IN, arithmetic on right-hand
//! sides and inside aggregates, LIMIT ... OFFSET, and bare columns of a correlated outer query. Not
//! supported (a parse error): other joins (LEFT, CROSS, NATURAL, USING), UNION ALL, EXISTS, CASE,
//! CAST and other functions.

mod parser;
#[cfg(test)]
mod tests;

use super::compare::normalize;
use super::schema::Schema;
use std::collections::{BTreeSet, HashMap};

/// Table and column names of a database (compared lowercased), with the columns that foreign keys link.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    tables: Vec<(String, Vec<String>)>,
    /// `table.column` -> the representative of the columns linked to it by foreign keys.
    key_map: HashMap<String, String>,
}

impl Catalog {
    /// A catalog of `(table, columns)`.
    pub fn new<S: AsRef<str>>(tables: &[(S, Vec<S>)]) -> Catalog {
        let lower = |s: &S| s.as_ref().to_lowercase();
        let tables = tables.iter().map(|(t, cs)| (lower(t), cs.iter().map(lower).collect()));
        Catalog {
            tables: tables.collect(),
            key_map: HashMap::new(),
        }
    }

    /// Add foreign keys, each a pair of `table.column` names.
    pub fn with_foreign_keys<S: AsRef<str>>(mut self, links: &[(S, S)]) -> Catalog {
        let mut groups: Vec<BTreeSet<String>> = Vec::new();
        for (a, b) in links {
            let (a, b) = (a.as_ref().to_lowercase(), b.as_ref().to_lowercase());
            let mut merged: BTreeSet<String> = [a.clone(), b.clone()].into();
            groups.retain(|g| {
                let linked = g.contains(&a) || g.contains(&b);
                if linked {
                    merged.extend(g.iter().cloned());
                }
                !linked
            });
            groups.push(merged);
        }
        for g in groups {
            let rep = g.first().cloned().unwrap_or_default();
            self.key_map.extend(g.into_iter().map(|c| (c, rep.clone())));
        }
        self
    }

    /// The catalog of a schema read from a database (see [`Schema::from_sqlite`]).
    pub fn from_schema(s: &Schema) -> Catalog {
        let tables: Vec<(String, Vec<String>)> = s
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.columns.iter().map(|c| c.name.clone()).collect()))
            .collect();
        let links: Vec<(String, String)> = s
            .foreign_keys
            .iter()
            .map(|f| {
                (
                    format!("{}.{}", f.table, f.column),
                    format!("{}.{}", f.ref_table, f.ref_column),
                )
            })
            .collect();
        Catalog::new(&tables).with_foreign_keys(&links)
    }

    fn has_table(&self, t: &str) -> bool {
        self.tables.iter().any(|(n, _)| n == t)
    }

    fn has_column(&self, t: &str, c: &str) -> bool {
        self.tables.iter().any(|(n, cs)| n == t && cs.iter().any(|x| x == c))
    }
}

/// A column (`table.column`, `*`, or `(query).column` for a FROM subquery's output) under an
/// aggregate (`""` for none).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ColUnit {
    agg: &'static str,
    col: String,
    distinct: bool,
}

/// A column unit, or two joined by an arithmetic operator.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ValUnit {
    a: ColUnit,
    op: Option<(&'static str, ColUnit)>,
}

/// One condition; a right-hand side is `None` for a value (or column), a query when nested.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Cond {
    not: bool,
    op: &'static str,
    lhs: ValUnit,
    v1: Option<Box<Query>>,
    v2: Option<Box<Query>>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TableUnit {
    Table(String),
    Query(Box<Query>),
}

/// A parsed query in canonical form: the components that exact set match compares, multisets
/// sorted, so that two queries match exactly when their forms are equal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Query {
    distinct: bool,
    select: Vec<(&'static str, ValUnit)>,
    tables: Vec<TableUnit>,
    conds: Vec<Cond>,
    connectives: BTreeSet<&'static str>,
    group: Vec<ColUnit>,
    having: Vec<Cond>,
    order: Option<(&'static str, Vec<ValUnit>)>,
    limit: bool,
    keywords: BTreeSet<&'static str>,
    compound: Option<(&'static str, Box<Query>)>,
}

/// Whether `pred` matches `gold` under Spider's exact set match on the database described by `cat`.
/// A prediction that cannot be parsed (or names unknown tables or columns) never matches. A gold
/// query that cannot be parsed falls back to normalised text equality of the two queries.
pub fn exact_match(cat: &Catalog, gold: &str, pred: &str, keep_distinct: bool) -> bool {
    match parse(cat, gold, keep_distinct) {
        Ok(g) => parse(cat, pred, keep_distinct).is_ok_and(|p| p == g),
        Err(_) => normalize(gold) == normalize(pred),
    }
}

/// Parse `sql` into its canonical form, or say why it cannot be parsed.
pub fn parse(cat: &Catalog, sql: &str, keep_distinct: bool) -> Result<Query, String> {
    parser::parse(cat, sql, keep_distinct)
}

/// The first part in which two parsed queries differ, in the order a reader checks a query: `from`
/// (the tables joined), `select`, `where` (conditions and their connectives, values aside), `group`
/// (with HAVING), `order` (with LIMIT), `compound` (INTERSECT / UNION / EXCEPT), `keywords` (what
/// the parts above leave out, such as OR in a join condition). `None` when the forms are equal: the
/// queries differ at most in literal values or join keys, which exact set match does not compare.
pub fn first_difference(gold: &Query, pred: &Query) -> Option<&'static str> {
    let same = [
        ("from", gold.tables == pred.tables),
        ("select", gold.select == pred.select && gold.distinct == pred.distinct),
        (
            "where",
            gold.conds == pred.conds && gold.connectives == pred.connectives,
        ),
        ("group", gold.group == pred.group && gold.having == pred.having),
        ("order", gold.order == pred.order && gold.limit == pred.limit),
        ("compound", gold.compound == pred.compound),
        ("keywords", gold.keywords == pred.keywords),
    ];
    same.iter().find(|(_, s)| !s).map(|(part, _)| *part)
}
