//! Running model-written SQL safely: the database is opened read-only, an authorizer allows only
//! reading (no writes, no PRAGMA, no ATTACH), only one statement runs, and a progress handler stops
//! any query that outlives its time limit. A predicted query can never modify the database.

use anyhow::{Context, Result};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
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
}

impl Db {
    /// Open `path` read-only. The file must exist; nothing is ever created or written.
    pub fn open(path: &Path) -> Result<Db> {
        if !path.is_file() {
            anyhow::bail!("database {} does not exist", path.display());
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).with_context(|| format!("opening {}", path.display()))?;
        conn.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
            AuthAction::Select | AuthAction::Read { .. } | AuthAction::Function { .. } | AuthAction::Recursive => {
                Authorization::Allow
            }
            _ => Authorization::Deny,
        }));
        Ok(Db {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run one query with a time limit and return its rows.
    pub fn query(&self, sql: &str, limit: Duration) -> Result<Vec<Row>, QueryError> {
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

    fn run(&self, sql: &str) -> Result<Vec<Row>, QueryError> {
        let err = |e: rusqlite::Error| QueryError::Sql(e.to_string());
        let mut stmt = self.conn.prepare(sql).map_err(err)?;
        let n = stmt.column_count();
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
        Ok(out)
    }
}
