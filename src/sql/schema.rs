//! Database schemas and the "### Schema ###" snippets built from them.
//!
//! A snippet lists tables in the database's own order, one per line, with typed columns and primary
//! keys, then foreign keys as arrows:
//!
//! ```text
//! users(id INTEGER PRIMARY KEY, name TEXT (e.g. 'Ada', 'Bo'), city TEXT)
//! orders(id INTEGER PRIMARY KEY, user_id INTEGER, placed_on TEXT)
//! orders.user_id -> users.id
//! ```

use super::lex::lex;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use rusqlite::{Connection, OpenFlags};
use std::collections::HashSet;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    /// Declared type as written (may be empty).
    pub ty: String,
    pub primary_key: bool,
    /// A few distinct example values (text columns only), already quoted for display.
    pub samples: Vec<String>,
    /// Distinct values of a text column (up to [`LINKED_VALUES`], as stored): what a question's
    /// words are matched against (see [`Schema::question_snippet`]).
    pub values: Vec<String>,
}

/// How many distinct values of each text column are kept for linking a question to them.
pub const LINKED_VALUES: usize = 2000;

#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ForeignKey {
    pub table: String,
    pub column: String,
    pub ref_table: String,
    pub ref_column: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schema {
    pub tables: Vec<Table>,
    pub foreign_keys: Vec<ForeignKey>,
}

/// Quote an identifier for SQLite.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl Schema {
    /// Read the schema of a SQLite file (opened read-only), with up to `samples` distinct values per
    /// text column.
    pub fn from_sqlite(path: &Path, samples: usize) -> Result<Schema> {
        if !path.is_file() {
            bail!("database {} does not exist", path.display());
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        let ctx = || format!("reading the schema of {}", path.display());
        let names: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .with_context(ctx)?;
        let mut tables = Vec::new();
        let mut foreign_keys = Vec::new();
        for t in &names {
            let mut cols: Vec<Column> = conn
                .prepare(&format!("PRAGMA table_info({})", ident(t)))
                .and_then(|mut s| {
                    s.query_map([], |r| {
                        Ok(Column {
                            name: r.get(1)?,
                            ty: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                            primary_key: r.get::<_, i64>(5)? > 0,
                            samples: vec![],
                            values: vec![],
                        })
                    })?
                    .collect()
                })
                .with_context(ctx)?;
            for c in cols.iter_mut().filter(|c| samples > 0 && is_text(&c.ty)) {
                let distinct = |limit: usize| -> Result<Vec<String>> {
                    let q = format!(
                        "SELECT DISTINCT {col} FROM {t} WHERE {col} IS NOT NULL AND {col} != '' LIMIT {limit}",
                        col = ident(&c.name),
                        t = ident(t)
                    );
                    let vals = conn
                        .prepare(&q)
                        .and_then(|mut s| {
                            s.query_map([], |r| r.get::<_, rusqlite::types::Value>(0))?
                                .collect::<Result<Vec<_>, _>>()
                        })
                        .with_context(ctx)?;
                    Ok(vals
                        .into_iter()
                        .filter_map(|v| match v {
                            rusqlite::types::Value::Text(s) => Some(s),
                            _ => None,
                        })
                        .collect())
                };
                c.samples = distinct(samples)?.iter().map(|s| quote_sample(s)).collect();
                c.values = distinct(LINKED_VALUES)?;
            }
            let fks: Vec<(String, String, Option<String>)> = conn
                .prepare(&format!("PRAGMA foreign_key_list({})", ident(t)))
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(2)?, r.get(3)?, r.get(4)?)))?.collect())
                .with_context(ctx)?;
            for (ref_table, column, ref_column) in fks {
                // A foreign key without a target column refers to the referenced table's primary key.
                let ref_column = ref_column.unwrap_or_else(|| "rowid".into());
                foreign_keys.push(ForeignKey {
                    table: t.clone(),
                    column,
                    ref_table,
                    ref_column,
                });
            }
            tables.push(Table {
                name: t.clone(),
                columns: cols,
            });
        }
        let mut s = Schema { tables, foreign_keys };
        s.resolve_implicit_fk_targets();
        Ok(s)
    }

    /// `REFERENCES t` without a column names t's primary key: fill it in.
    fn resolve_implicit_fk_targets(&mut self) {
        let tables = self.tables.clone();
        for fk in &mut self.foreign_keys {
            if fk.ref_column == "rowid" {
                if let Some(pk) = tables
                    .iter()
                    .find(|t| t.name.eq_ignore_ascii_case(&fk.ref_table))
                    .and_then(|t| t.columns.iter().find(|c| c.primary_key))
                {
                    fk.ref_column = pk.name.clone();
                }
            }
        }
    }

    /// A schema from one entry of Spider's tables.json (used when the database file is missing).
    pub fn from_spider_tables(entry: &serde_json::Value) -> Result<Schema> {
        let db = entry["db_id"].as_str().unwrap_or("?");
        let err = || format!("tables.json entry {db} is malformed");
        let strs = |v: &serde_json::Value| -> Option<Vec<String>> {
            v.as_array()?.iter().map(|x| x.as_str().map(String::from)).collect()
        };
        let table_names = strs(&entry["table_names_original"]).with_context(err)?;
        let types = strs(&entry["column_types"]).with_context(err)?;
        let cols = entry["column_names_original"].as_array().with_context(err)?;
        let pks: HashSet<u64> = entry["primary_keys"]
            .as_array()
            .with_context(err)?
            .iter()
            .flat_map(|p| match p {
                serde_json::Value::Array(xs) => xs.iter().filter_map(|x| x.as_u64()).collect(),
                x => x.as_u64().into_iter().collect::<Vec<_>>(),
            })
            .collect();
        let mut tables: Vec<Table> = table_names
            .iter()
            .map(|n| Table {
                name: n.clone(),
                columns: vec![],
            })
            .collect();
        let mut col_ref = Vec::new(); // column index -> (table, name)
        for (i, c) in cols.iter().enumerate() {
            let t = c[0].as_i64().filter(|&t| t >= -1).with_context(err)?; // -1: the `*` column
            let name = c[1].as_str().with_context(err)?.to_string();
            col_ref.push((t, name.clone()));
            if t >= 0 {
                let table = tables.get_mut(t as usize).with_context(err)?;
                table.columns.push(Column {
                    name,
                    ty: types.get(i).cloned().unwrap_or_default().to_uppercase(),
                    primary_key: pks.contains(&(i as u64)),
                    samples: vec![],
                    values: vec![],
                });
            }
        }
        let mut foreign_keys = Vec::new();
        for (k, fk) in entry["foreign_keys"].as_array().with_context(err)?.iter().enumerate() {
            // Each side: a column index whose column belongs to a table (not `*`).
            let side = |v: &serde_json::Value| -> Option<(String, String)> {
                let (t, name) = col_ref.get(usize::try_from(v.as_u64()?).ok()?)?;
                Some((table_names.get(usize::try_from(*t).ok()?)?.clone(), name.clone()))
            };
            let bad = || format!("tables.json entry {db}: foreign key {k} ({fk}) does not join two table columns");
            let ((table, column), (ref_table, ref_column)) =
                (side(&fk[0]).with_context(bad)?, side(&fk[1]).with_context(bad)?);
            foreign_keys.push(ForeignKey {
                table,
                column,
                ref_table,
                ref_column,
            });
        }
        Ok(Schema { tables, foreign_keys })
    }

    /// The snippet of the given tables (indices, any order), rendered in schema order; foreign keys
    /// are listed when both of their tables are present.
    pub fn render(&self, tables: &[usize]) -> String {
        let keep: HashSet<usize> = tables.iter().copied().collect();
        let mut lines = Vec::new();
        for t in self
            .tables
            .iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, t)| t)
        {
            let cols: Vec<String> = t
                .columns
                .iter()
                .map(|c| {
                    let mut s = c.name.clone();
                    if !c.ty.is_empty() {
                        s += &format!(" {}", c.ty);
                    }
                    if c.primary_key {
                        s += " PRIMARY KEY";
                    }
                    if !c.samples.is_empty() {
                        s += &format!(" (e.g. {})", c.samples.join(", "));
                    }
                    s
                })
                .collect();
            lines.push(format!("{}({})", t.name, cols.join(", ")));
        }
        let names: HashSet<String> = keep.iter().map(|&i| self.tables[i].name.to_lowercase()).collect();
        for fk in &self.foreign_keys {
            if names.contains(&fk.table.to_lowercase()) && names.contains(&fk.ref_table.to_lowercase()) {
                lines.push(format!(
                    "{}.{} -> {}.{}",
                    fk.table, fk.column, fk.ref_table, fk.ref_column
                ));
            }
        }
        lines.join("\n")
    }

    /// The whole schema.
    pub fn render_all(&self) -> String {
        self.render(&(0..self.tables.len()).collect::<Vec<_>>())
    }

    /// Indices of the tables a query names.
    pub fn tables_in_sql(&self, sql: &str) -> Vec<usize> {
        let idents: HashSet<String> = lex(sql).iter().filter_map(|t| t.ident()).collect();
        (0..self.tables.len())
            .filter(|&i| idents.contains(&self.tables[i].name.to_lowercase()))
            .collect()
    }

    /// Training snippet: the tables the gold query uses plus up to `distractors` others drawn at
    /// random, so that the model does not learn that every listed table is used.
    pub fn training_snippet(&self, gold_sql: &str, distractors: usize, rng: &mut Rng) -> String {
        let mut chosen = self.tables_in_sql(gold_sql);
        let mut rest: Vec<usize> = (0..self.tables.len()).filter(|i| !chosen.contains(i)).collect();
        for _ in 0..distractors.min(rest.len()) {
            let j = rng.below(rest.len() as u64) as usize;
            chosen.push(rest.swap_remove(j));
        }
        if chosen.is_empty() {
            return self.render_all();
        }
        self.render(&chosen)
    }

    /// Inference snippet: every table, or, when that is over `budget` tokens (as `count` counts
    /// them), the tables a lexical linker ranks highest for the question, as many as fit (at least
    /// one). A text column's stored values that the question names (whole words, any case: "Oslo"
    /// in "How many users live in oslo?") come first among its examples, so that the model copies the
    /// value as stored rather than a look-alike from the examples.
    pub fn question_snippet(&self, question: &str, budget: usize, count: &dyn Fn(&str) -> usize) -> String {
        let linked = self.with_question_values(question);
        let this = linked.as_ref().unwrap_or(self);
        let all = this.render_all();
        if count(&all) <= budget || self.tables.is_empty() {
            return all;
        }
        let ranked = this.rank_tables(question);
        let mut chosen = vec![ranked[0]];
        for &t in &ranked[1..] {
            chosen.push(t);
            if count(&this.render(&chosen)) > budget {
                chosen.pop();
            }
        }
        this.render(&chosen)
    }

    /// This schema with the values the question names first among each column's examples (as many
    /// examples as before, or all the named values if more); `None` when the question names none.
    fn with_question_values(&self, question: &str) -> Option<Schema> {
        let asked = words(question);
        let named = |v: &str| {
            let w = words(v);
            // One to four words, not a lone short word or number ("a", "1"): too easily a false match.
            let plain = w.len() == 1 && (w[0].chars().count() < 3 || w[0].chars().all(|c| c.is_ascii_digit()));
            !w.is_empty() && w.len() <= 4 && !plain && asked.windows(w.len()).any(|g| g == &w[..])
        };
        let mut out = self.clone();
        let mut any = false;
        for c in out.tables.iter_mut().flat_map(|t| t.columns.iter_mut()) {
            let hits: Vec<String> = c.values.iter().filter(|v| named(v)).map(|v| quote_sample(v)).collect();
            if hits.is_empty() {
                continue;
            }
            any = true;
            let keep = c.samples.len().max(hits.len());
            let rest = c.samples.iter().filter(|s| !hits.contains(s)).cloned();
            c.samples = hits.iter().cloned().chain(rest).take(keep).collect();
        }
        any.then_some(out)
    }

    /// Tables ordered by lexical overlap with the question: a question word naming the table scores
    /// 3, naming one of its columns 2, matching a sample value 1 (ties keep schema order).
    pub fn rank_tables(&self, question: &str) -> Vec<usize> {
        let asked: HashSet<String> = words(question).into_iter().filter(|w| w.len() >= 3).collect();
        let matches = |name: &str| {
            words(name)
                .iter()
                .any(|w| asked.contains(w) || asked.contains(&format!("{w}s")))
        };
        let mut scored: Vec<(usize, usize)> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut s = 3 * matches(&t.name) as usize;
                for c in &t.columns {
                    s += 2 * matches(&c.name) as usize;
                    s += c
                        .samples
                        .iter()
                        .any(|v| asked.iter().any(|w| v.to_lowercase().contains(w.as_str())))
                        as usize;
                }
                (i, s)
            })
            .collect();
        scored.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().map(|(i, _)| i).collect()
    }
}

/// Lowercased alphanumeric words of a name or sentence (snake_case and camelCase split).
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for ch in s.chars() {
        if ch.is_alphanumeric() {
            if ch.is_uppercase() && prev_lower && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = ch.is_lowercase();
            cur.extend(ch.to_lowercase());
        } else {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A value as the snippet shows it: single-quoted, cut to 30 characters.
fn quote_sample(s: &str) -> String {
    format!("'{}'", s.chars().take(30).collect::<String>().replace('\'', "''"))
}

fn is_text(ty: &str) -> bool {
    let t = ty.to_uppercase();
    t.contains("CHAR") || t.contains("TEXT") || t.contains("CLOB") || t.is_empty()
}
