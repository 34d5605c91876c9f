//! Running model-written SQL safely: the database is opened read-only, an authorizer allows only
//! reading (no writes, no PRAGMA, no ATTACH), only one statement runs, and a progress handler stops
//! any query that outlives its time limit. A predicted query can never modify the database.

use super::exact::Catalog;
use super::schema::Schema;
use anyhow::{Context, Result};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A result cell. Integers and reals that hold the same number compare equal (1 == 1.0), as in the
/// Python evaluators; text never equals a number ('30' != 30).
#[derive(Clone, Debug)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// A hashable canonical form of a [`Value`]: integral reals become integers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Null,
    Int(i64),
    Real(u64),
    Text(String),
    Blob(Vec<u8>),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Null => write!(f, "NULL"),
            Key::Int(i) => write!(f, "{i}"),
            Key::Real(b) => write!(f, "{}", f64::from_bits(*b)),
            Key::Text(s) => write!(f, "{s}"),
            Key::Blob(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

/// Rows as an aligned text table under a header; at most `max_rows` rows, then a count of the rest.
pub fn format_table(names: &[String], rows: &[Row], max_rows: usize) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .take(max_rows)
        .map(|r| r.iter().map(|k| k.to_string()).collect())
        .collect();
    let widths: Vec<usize> = (0..names.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .chain([names[c].chars().count()])
                .max()
                .unwrap_or(0)
                .min(40)
        })
        .collect();
    let line = |vals: &[String]| -> String {
        let parts: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, &w)| format!("{:<w$}", v.chars().take(40).collect::<String>()))
            .collect();
        parts.join(" | ").trim_end().to_string()
    };
    let mut out = vec![
        line(names),
        widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("-+-"),
    ];
    out.extend(cells.iter().map(|r| line(r)));
    if rows.len() > max_rows {
        out.push(format!("... {} more rows", rows.len() - max_rows));
    }
    out.push(format!(
        "({} row{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    out.join("\n")
}

impl Value {
    pub fn key(&self) -> Key {
        match self {
            Value::Null => Key::Null,
            Value::Int(i) => Key::Int(*i),
            Value::Real(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Key::Int(*f as i64),
            Value::Real(f) => Key::Real(f.to_bits()),
            Value::Text(s) => Key::Text(s.clone()),
            Value::Blob(b) => Key::Blob(b.clone()),
        }
    }
}

/// One result row, keyed.
pub type Row = Vec<Key>;

/// Why a query gave no result.
#[derive(Clone, Debug, PartialEq)]
pub enum QueryError {
    /// It ran past its time limit and was stopped.
    Timeout,
    /// SQLite refused or failed it (syntax, unknown column, a write attempt, ...).
    Sql(String),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Timeout => write!(f, "time limit exceeded"),
            QueryError::Sql(m) => write!(f, "{m}"),
        }
    }
}

/// Rows above this count are an error rather than a memory hazard.
const MAX_ROWS: usize = 2_000_000;

/// A read-only SQLite database for running untrusted queries.
pub struct Db {
    conn: Connection,
    path: PathBuf,
    /// Its tables and columns for exact set match, read on first use.
    catalog: OnceCell<Option<Catalog>>,
}

impl Db {
    /// Open `path` read-only. The file must exist; nothing is ever created or written.
    pub fn open(path: &Path) -> Result<Db> {
        if !path.is_file() {
            anyhow::bail!("database {} does not exist", path.display());
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).with_context(|| format!("opening {}", path.display()))?;
        // SQLite reads the file only at the first statement: make that now, so a file that is not a
        // database is named here rather than as a failed query later.
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .with_context(|| format!("{} is not a SQLite database", path.display()))?;
        conn.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
            AuthAction::Select | AuthAction::Read { .. } | AuthAction::Function { .. } | AuthAction::Recursive => {
                Authorization::Allow
            }
            _ => Authorization::Deny,
        }));
        Ok(Db {
            conn,
            path: path.to_path_buf(),
            catalog: OnceCell::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database's tables, columns and foreign keys (read once, through a separate read-only
    /// connection); `None` when they cannot be read.
    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog
            .get_or_init(|| {
                Schema::from_sqlite(&self.path, 0)
                    .ok()
                    .map(|s| Catalog::from_schema(&s))
            })
            .as_ref()
    }

    /// Run one query with a time limit and return its rows.
    pub fn query(&self, sql: &str, limit: Duration) -> Result<Vec<Row>, QueryError> {
        self.query_named(sql, limit).map(|(_, rows)| rows)
    }

    /// [`Db::query`], with the result's column names.
    pub fn query_named(&self, sql: &str, limit: Duration) -> Result<(Vec<String>, Vec<Row>), QueryError> {
        let deadline = Instant::now() + limit;
        let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = timed_out.clone();
        // Called every 1000 virtual-machine steps; returning true interrupts the statement.
        self.conn.progress_handler(
            1000,
            Some(move || {
                let late = Instant::now() > deadline;
                if late {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                late
            }),
        );
        let result = self.run(sql);
        self.conn.progress_handler(0, None::<fn() -> bool>);
        match result {
            Err(_) if timed_out.load(std::sync::atomic::Ordering::Relaxed) => Err(QueryError::Timeout),
            other => other,
        }
    }

    fn run(&self, sql: &str) -> Result<(Vec<String>, Vec<Row>), QueryError> {
        let err = |e: rusqlite::Error| QueryError::Sql(e.to_string());
        let mut stmt = self.conn.prepare(sql).map_err(err)?;
        let n = stmt.column_count();
        let names: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let mut rows = stmt.query([]).map_err(err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(err)? {
            let mut r = Vec::with_capacity(n);
            for i in 0..n {
                let v = match row.get_ref(i).map_err(err)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(x) => Value::Int(x),
                    ValueRef::Real(x) => Value::Real(x),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                };
                r.push(v.key());
            }
            out.push(r);
            if out.len() > MAX_ROWS {
                return Err(QueryError::Sql(format!("result has more than {MAX_ROWS} rows")));
            }
        }
        Ok((names, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_count() {
        let names = vec!["name".to_string(), "n".to_string()];
        let rows = vec![
            vec![Key::Text("Ada".into()), Key::Int(3)],
            vec![Key::Text("Bartholomew".into()), Key::Null],
            vec![Key::Text("Cy".into()), Value::Real(2.5).key()],
        ];
        let t = format_table(&names, &rows, 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "name        | n");
        assert_eq!(lines[1], "------------+-----");
        assert_eq!(lines[2], "Ada         | 3");
        assert_eq!(lines[3], "Bartholomew | NULL");
        assert_eq!(lines[4], "... 1 more rows");
        assert_eq!(lines[5], "(3 rows)");
        assert_eq!(Value::Real(2.0).key(), Key::Int(2));
    }
}
