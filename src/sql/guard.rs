//! The schema guard: decoding that never names a table or column the database does not have.
//!
//! Half of what the tuned model gets wrong on held-out databases is a column that does not exist
//! where the query puts it (`T1.name` where T1 is `drivers`, which has no `name`), and those
//! queries fail outright. The guard reads the SQL written so far (with the token being considered)
//! and refuses the token if it makes a name impossible: a table that is not in the schema, a
//! column that is not in the table its qualifier is bound to, a bare column that none of the
//! query's tables has. Refused tokens are masked and the next choice is asked, so the answer is
//! still the model's greedy (or sampled) one among the tokens that keep the query possible.
//!
//! It checks what can be known from the text so far, as text-to-SQL's constrained decoders do
//! (PICARD's "guards"), with two things that Spider-style SQL needs:
//! - names are checked as they are typed: a half-written name must begin some name that fits, so
//!   the model is turned away while it can still choose another word;
//! - a qualifier used before the FROM clause binds it (`SELECT T1.name FROM drivers AS T1`) is
//!   remembered: Spider's k-th table is `Tk`, so the first table must have `name` (where some table
//!   does), and whatever the aliases, every qualified column is checked when its scope ends. Bare
//!   columns of the select list are checked when the FROM clause ends.
//!
//! Names are compared without case, as SQLite does. String literals (single- or double-quoted, as
//! Spider writes values), quoted identifiers, derived tables and CTEs are not checked: the guard
//! refuses what would certainly fail, with two exceptions. A FROM clause against the `Tk`
//! convention may be refused (two of Spider's 6,904 training queries are), and a whole bare word
//! of a select list must be a column of the schema, so a derived table's column named before the
//! subquery that defines it (`SELECT avg(n) FROM (SELECT count(*) AS n ...)`) is refused (none of
//! Spider's training queries does that). The third training query refused joins a table its
//! database does not have (tests/guard.rs).

use super::schema::Schema;
use crate::load::tokenizer::Tokenizer;
use crate::model::generate::Constraint;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Keywords, functions and other bare words SQLite takes that are neither tables nor columns.
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "select", "from", "where", "group", "by", "order", "having", "limit", "offset", "join", "inner",
    "left", "right", "full", "outer", "cross", "natural", "on", "using", "as", "and", "or", "not", "in",
    "is", "null", "like", "glob", "between", "exists", "distinct", "all", "union", "intersect",
    "except", "asc", "desc", "case", "when", "then", "else", "end", "cast", "collate", "nocase",
    "escape", "true", "false", "current_date", "current_time", "current_timestamp", "integer", "int",
    "real", "text", "numeric", "float", "count", "sum", "avg", "min", "max", "abs", "length", "lower",
    "upper", "substr", "substring", "round", "strftime", "date", "time", "datetime", "julianday",
    "ifnull", "coalesce", "nullif", "iif", "instr", "replace", "trim", "ltrim", "rtrim", "typeof",
    "total", "group_concat", "printf", "random", "rowid",
    "isnull",
    "notnull", "regexp", "varchar", "char", "boolean", "double", "decimal", "blob", "bigint", "values",
    "recursive", "with", "hex", "quote", "unicode", "sign", "ceil", "ceiling", "floor", "sqrt", "power",
    "pow", "exp", "ln", "log", "log10", "mod", "pi", "concat", "concat_ws", "format", "string_agg",
    "json_extract", "row_number", "rank", "dense_rank", "lag", "lead", "ntile", "first_value",
    "last_value", "nth_value", "percent_rank", "cume_dist", "unixepoch", "median",
];

/// Keywords that end a FROM clause.
const AFTER_FROM: &[&str] = &[
    "where",
    "group",
    "order",
    "having",
    "limit",
    "union",
    "intersect",
    "except",
];

/// Keywords of a join. With [`AFTER_FROM`], what may follow a table in a FROM clause: an alias
/// written without AS never begins with one.
const JOINING: &[&str] = &["join", "on", "left", "inner", "cross", "natural", "using"];

/// The schema's names, lowercased: each table's columns.
#[derive(Clone, Debug, Default)]
pub struct Names {
    tables: HashMap<String, HashSet<String>>,
    columns: HashSet<String>,
}

impl Names {
    pub fn of(schema: &Schema) -> Names {
        let mut names = Names::default();
        for t in &schema.tables {
            let cols: HashSet<String> = t.columns.iter().map(|c| c.name.to_lowercase()).collect();
            names.columns.extend(cols.iter().cloned());
            names.tables.insert(t.name.to_lowercase(), cols);
        }
        names
    }

    /// Names from `(table, [columns])` pairs (tests, and schemas read elsewhere).
    pub fn from_pairs(pairs: &[(&str, &[&str])]) -> Names {
        let mut names = Names::default();
        for (t, cols) in pairs {
            let cols: HashSet<String> = cols.iter().map(|c| c.to_lowercase()).collect();
            names.columns.extend(cols.iter().cloned());
            names.tables.insert(t.to_lowercase(), cols);
        }
        names
    }
}

/// The guard as a decoding constraint ([`Constraint`]): each prompt's answer so far, decoded and
/// checked against its database's names.
pub struct SchemaGuard {
    tok: Tokenizer,
    /// [prompts] the names each prompt's answer is held to; `None`: not guarded.
    names: Vec<Option<Arc<Names>>>,
    /// Tokens that end an answer: taking one checks the answer as finished.
    stops: Vec<u32>,
}

impl SchemaGuard {
    pub fn new(tok: Tokenizer, names: Vec<Option<Arc<Names>>>, stops: &[u32]) -> SchemaGuard {
        SchemaGuard {
            tok,
            names,
            stops: stops.to_vec(),
        }
    }
}

impl Constraint for SchemaGuard {
    fn allows(&self, p: usize, so_far: &[u32], token: u32) -> bool {
        let Some(names) = self.names.get(p).and_then(|n| n.as_deref()) else {
            return true;
        };
        let text = |ids: &[u32]| self.tok.decode(ids).unwrap_or_default();
        // Stopping checks the answer as finished: what was left to its end must hold.
        if self.stops.contains(&token) {
            let t = text(so_far);
            return check(names, &t, true).is_ok() || check(names, &t, false).is_err();
        }
        // An answer the guard has already given way on (no allowed token was among the tries) is
        // not held to it any more: the rest is the model's own.
        check(names, &text(&[so_far, &[token]].concat()), false).is_ok() || check(names, &text(so_far), false).is_err()
    }
}

/// Whether `partial` begins some word of `words`.
fn begins<'a>(partial: &str, mut words: impl Iterator<Item = &'a String>) -> bool {
    words.any(|w| w.starts_with(partial))
}

fn is_word(w: &str) -> bool {
    WORDS.contains(&w)
}

/// One piece of SQL text as the guard sees it.
#[derive(Clone, Debug, PartialEq)]
enum Piece {
    /// A bare word, lowercased; `open` when the text ends inside it (more letters may follow).
    Word { w: String, open: bool },
    /// Punctuation or an operator character.
    Punct(char),
    /// A literal or quoted name: nothing to check.
    Other,
}

/// Split `sql` into pieces. Comments are not expected in a model's answer and read as punctuation.
fn pieces(sql: &str) -> Vec<Piece> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if matches!(c, '\'' | '"' | '`' | '[') {
            let close = if c == '[' { ']' } else { c };
            i += 1;
            while i < chars.len() && chars[i] != close {
                i += 1;
            }
            i += 1;
            out.push(Piece::Other);
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Piece::Other);
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                i += 1;
            }
            let w: String = chars[start..i].iter().collect::<String>().to_lowercase();
            out.push(Piece::Word {
                w,
                open: i == chars.len(),
            });
        } else {
            out.push(Piece::Punct(c));
            i += 1;
        }
    }
    out
}

/// What the next word of a scope is.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    /// Anything: select list, conditions, ...
    Any,
    /// A table name (after FROM, JOIN, or a comma in the FROM clause).
    Table,
    /// After a table name: an alias, or a keyword.
    AfterTable(String),
    /// After `table AS`: the table's alias.
    Alias(String),
    /// After `expr AS`: a column alias (or CAST's type).
    Named,
}

/// One SELECT: its tables, the names it binds, and the references it makes before binding them.
#[derive(Clone, Debug, Default)]
struct Scope {
    /// The parenthesis depth this SELECT opened at.
    depth: usize,
    /// Tables of its FROM clause, lowercased.
    tables: Vec<String>,
    /// Aliases (and tables named bare) to tables; `None` for a derived table.
    bound: HashMap<String, Option<String>>,
    /// The FROM clause holds a subquery: its columns are not known.
    derived: bool,
    in_from: bool,
    after_from: bool,
    /// `qualifier.column` written before the qualifier was bound.
    pending_qualified: Vec<(String, String)>,
    /// Bare columns written before the FROM clause.
    pending_bare: Vec<String>,
}

/// Why the guard refuses a text.
pub type Refusal = String;

/// Check SQL text (a model's answer so far). `finished`: the text is the whole answer (the model
/// is about to stop), so clauses still open are checked as ended.
pub fn check(names: &Names, sql: &str, finished: bool) -> Result<(), Refusal> {
    // One statement: what follows a `;` is not run.
    let sql = match sql.find(';') {
        Some(k) => return check(names, &sql[..k], true),
        None => sql,
    };
    let mut ps = pieces(sql);
    if finished {
        // The last word is whole: nothing more will be written.
        if let Some(Piece::Word { open, .. }) = ps.last_mut() {
            *open = false;
        }
    }
    if matches!(ps.first(), Some(Piece::Word { w, open: false }) if w == "with") {
        return Ok(());
    }
    Checker {
        names,
        ps: &ps,
        scopes: vec![Scope::default()],
        depth: 0,
        expect: Expect::Any,
        named: HashSet::new(),
    }
    .run(finished)
}

struct Checker<'a> {
    names: &'a Names,
    ps: &'a [Piece],
    /// Open SELECTs, innermost last.
    scopes: Vec<Scope>,
    depth: usize,
    expect: Expect,
    /// Column aliases declared with AS anywhere so far.
    named: HashSet<String>,
}

impl Checker<'_> {
    fn run(mut self, finished: bool) -> Result<(), Refusal> {
        for i in 0..self.ps.len() {
            match &self.ps[i] {
                Piece::Other => self.expect = Expect::Any,
                Piece::Punct(c) => self.punct(*c)?,
                Piece::Word { w, open } => self.word(i, w, *open)?,
            }
        }
        if finished {
            while let Some(scope) = self.scopes.pop() {
                self.close(&scope)?;
            }
        }
        Ok(())
    }

    fn top(&mut self) -> &mut Scope {
        self.scopes.last_mut().expect("a scope is always open")
    }

    fn punct(&mut self, c: char) -> Result<(), Refusal> {
        match c {
            '(' => {
                self.depth += 1;
                if self.expect == Expect::Table {
                    // A derived table: its columns are not tracked.
                    self.top().derived = true;
                }
                self.expect = Expect::Any;
            }
            ')' => {
                if self.scopes.len() > 1 && self.top().depth == self.depth {
                    let scope = self.scopes.pop().expect("more than one");
                    self.close(&scope)?;
                    if self.top().in_from {
                        // `FROM (SELECT ...) AS sub`: the alias names a table of unknown columns.
                        self.expect = Expect::AfterTable(String::new());
                        self.depth = self.depth.saturating_sub(1);
                        return Ok(());
                    }
                }
                self.depth = self.depth.saturating_sub(1);
                self.expect = Expect::Any;
            }
            ',' if self.top().in_from && self.top().depth == self.depth => self.expect = Expect::Table,
            _ => self.expect = Expect::Any,
        }
        Ok(())
    }

    fn word(&mut self, i: usize, w: &str, open: bool) -> Result<(), Refusal> {
        let prev = |k: usize| i.checked_sub(k).map(|j| &self.ps[j]);
        let qualifier = match (prev(1), prev(2)) {
            (Some(Piece::Punct('.')), Some(Piece::Word { w: q, .. })) => Some(q.clone()),
            _ => None,
        };
        if let Some(q) = qualifier {
            self.expect = Expect::Any;
            return self.qualified(&q, w, open);
        }
        // A word followed by `.` qualifies the next one; followed by `(` it names a function.
        let next = self.ps.get(i + 1);
        if matches!(next, Some(Piece::Punct('.')) | Some(Piece::Punct('('))) {
            if self.expect == Expect::Table {
                return Err(format!("'{w}' is followed by what no table name is"));
            }
            return self.keyword(w);
        }
        match self.expect.clone() {
            Expect::Table => {
                let fitting = self.fitting_tables();
                let mut tables = (self.names.tables.keys()).filter(|t| fitting.as_ref().is_none_or(|f| f.contains(t)));
                if open {
                    return match tables.any(|t| t.starts_with(w)) {
                        true => Ok(()),
                        false => Err(format!("no table that fits begins '{w}'")),
                    };
                }
                if !tables.any(|t| t == w) {
                    return Err(format!("'{w}' is not a table that fits the query"));
                }
                let top = self.top();
                top.tables.push(w.to_string());
                top.bound.insert(w.to_string(), Some(w.to_string()));
                self.expect = Expect::AfterTable(w.to_string());
                Ok(())
            }
            Expect::AfterTable(table) if !(is_word(w) || open && begins_word(w)) => {
                // An alias without AS that begins with a clause's keyword is that keyword run into
                // a name (`WHERECrime_rate`).
                if let Some(k) = AFTER_FROM.iter().chain(JOINING).find(|k| w.starts_with(*k)) {
                    return Err(format!("'{w}' runs '{k}' into a name"));
                }
                self.alias(w, &table, open);
                Ok(())
            }
            Expect::Alias(table) => {
                self.alias(w, &table, open);
                Ok(())
            }
            Expect::Named => {
                if !open {
                    self.named.insert(w.to_string());
                    self.expect = Expect::Any;
                }
                Ok(())
            }
            _ => {
                if open {
                    // A clause keyword ends the FROM clause as soon as it is written.
                    if AFTER_FROM.contains(&w) {
                        self.end_from()?;
                    }
                    return self.bare_prefix(w);
                }
                if is_word(w) {
                    return self.keyword(w);
                }
                self.expect = Expect::Any;
                self.bare(w)
            }
        }
    }

    /// A keyword (or function name): what it changes.
    fn keyword(&mut self, w: &str) -> Result<(), Refusal> {
        match w {
            "select" => {
                let opened_by_paren = self.depth > 0 && self.top().depth != self.depth;
                if opened_by_paren {
                    let depth = self.depth;
                    self.scopes.push(Scope {
                        depth,
                        ..Scope::default()
                    });
                }
                self.expect = Expect::Any;
            }
            "from" => {
                self.top().in_from = true;
                self.expect = Expect::Table;
            }
            "join" => self.expect = Expect::Table,
            "as" => {
                self.expect = match self.expect.clone() {
                    Expect::AfterTable(t) => Expect::Alias(t),
                    _ => Expect::Named,
                }
            }
            "on" | "using" => self.expect = Expect::Any,
            _ if AFTER_FROM.contains(&w) => {
                self.end_from()?;
                if matches!(w, "union" | "intersect" | "except") {
                    // The next SELECT at this depth is a new scope.
                    let scope = self.scopes.pop().expect("a scope");
                    self.close(&scope)?;
                    self.scopes.push(Scope {
                        depth: scope.depth,
                        ..Scope::default()
                    });
                }
                self.expect = Expect::Any;
            }
            "left" | "right" | "inner" | "outer" | "cross" | "natural" | "full" => {
                if let Expect::AfterTable(_) = self.expect {
                    self.expect = Expect::Any;
                }
            }
            _ => {
                if !matches!(self.expect, Expect::Table) {
                    self.expect = Expect::Any;
                }
            }
        }
        Ok(())
    }

    /// The FROM clause of the innermost scope ends: its bare columns must be in its tables.
    fn end_from(&mut self) -> Result<(), Refusal> {
        let top = self.top();
        if !top.in_from {
            return Ok(());
        }
        top.in_from = false;
        top.after_from = true;
        let pending = std::mem::take(&mut top.pending_bare);
        for c in pending {
            if !self.in_scope(&c) {
                return Err(format!("no table of the FROM clause has '{c}'"));
            }
        }
        Ok(())
    }

    /// A scope closes (`)`, a set operation, or the end): what it left pending must hold.
    fn close(&mut self, scope: &Scope) -> Result<(), Refusal> {
        if scope.in_from {
            self.scopes.push(scope.clone());
            let r = self.end_from();
            self.scopes.pop();
            r?;
        }
        for (q, c) in &scope.pending_qualified {
            if let Some((table, alias)) = q.split_once('.') {
                return Err(format!("'{alias}' was used for '{c}', which '{table}' does not have"));
            }
            let bound = (scope.bound.get(q)).or_else(|| self.scopes.iter().rev().find_map(|s| s.bound.get(q)));
            match bound {
                Some(Some(t)) if self.names.tables.get(t).is_some_and(|cols| !cols.contains(c)) => {
                    return Err(format!("'{q}' ({t}) has no '{c}'"));
                }
                None if !scope.derived && !scope.tables.is_empty() => {
                    return Err(format!("'{q}' names no table of the query"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether bare column `c` belongs to a table of the innermost scope or an enclosing one.
    fn in_scope(&self, c: &str) -> bool {
        if self.named.contains(c) {
            return true;
        }
        self.scopes.iter().rev().any(|s| {
            s.derived || (s.tables.iter()).any(|t| self.names.tables.get(t).is_some_and(|cols| cols.contains(c)))
        })
    }

    /// The table a qualifier names: `Some(Some(t))` bound to t, `Some(None)` bound to a derived
    /// table, `None` unknown so far.
    fn resolve(&self, q: &str) -> Option<Option<String>> {
        let top = self.scopes.last().expect("a scope");
        if let Some(b) = top.bound.get(q) {
            return Some(b.clone());
        }
        // Before its FROM clause, a qualifier may be bound by it (`SELECT T1.a FROM t AS T1`),
        // whatever enclosing scopes call T1.
        if top.in_from || top.after_from {
            for s in self.scopes.iter().rev().skip(1) {
                if let Some(b) = s.bound.get(q) {
                    return Some(b.clone());
                }
            }
        }
        None
    }

    /// `q.c`: c must be a column of the table q is bound to. Until the scope's FROM clause ends, q
    /// may be bound later: c must then be some table's column (q's, if q is a table's name), and
    /// is checked when the scope closes. After the FROM clause, q must be bound.
    fn qualified(&mut self, q: &str, c: &str, open: bool) -> Result<(), Refusal> {
        let top = self.scopes.last().expect("a scope");
        // SQLite lets an ON clause name a table joined after it: only after the FROM clause is
        // every binding known.
        let settled = top.after_from;
        let table = match self.resolve(q) {
            Some(None) => return Ok(()),
            Some(Some(t)) => Some(t),
            None if settled && !self.scopes.iter().any(|s| s.derived) => {
                return Err(format!("'{q}' is not a table or alias of the query"));
            }
            None => None,
        };
        let cols = (table.as_deref().or(Some(q))).and_then(|t| self.names.tables.get(t));
        let fits = match cols {
            Some(cols) if open => begins(c, cols.iter()),
            Some(cols) => cols.contains(c),
            None if open => begins(c, self.names.columns.iter()),
            None => self.names.columns.contains(c),
        };
        if !fits {
            return Err(format!("'{q}' has no column '{c}{}'", if open { "..." } else { "" }));
        }
        if !open && table.is_none() {
            self.top().pending_qualified.push((q.to_string(), c.to_string()));
        }
        Ok(())
    }

    /// An alias bound to `table` once written whole. (A qualifier the query used before binding it
    /// is checked when the alias is bound, by [`Checker::close`].)
    fn alias(&mut self, a: &str, table: &str, open: bool) {
        if open {
            return;
        }
        let bound = (!table.is_empty()).then(|| table.to_string());
        let top = self.top();
        top.bound.insert(a.to_string(), bound.clone());
        if let Some(cols) = bound.and_then(|t| self.names.tables.get(&t)) {
            // `SELECT T1.c ... FROM t AS T1`: c must be t's. Pending until the scope closes.
            let top = self.scopes.last_mut().expect("a scope");
            for (q, c) in &mut top.pending_qualified {
                if q == a && !cols.contains(c.as_str()) {
                    *q = format!("{table}.{a}");
                }
            }
        }
        self.expect = Expect::Any;
    }

    /// The tables the next table of the FROM clause may be, where the query so far says (`None`:
    /// any). Spider-style SQL names the k-th table of a FROM clause `Tk`: if the select list used
    /// `Tk.a, Tk.b`, the k-th table must have a and b (where no table has both, nothing is said:
    /// the SQL fails either way). Two of Spider's 6,904 training queries break the convention
    /// (tests/guard.rs). Bare columns say nothing of the first table: a join may follow.
    fn fitting_tables(&self) -> Option<Vec<String>> {
        let top = self.scopes.last().expect("a scope");
        let k = top.tables.len() + 1;
        let alias = format!("t{k}");
        let needed: Vec<&String> = (top.pending_qualified.iter())
            .filter(|(q, _)| *q == alias)
            .map(|(_, c)| c)
            .collect();
        if needed.is_empty() || top.derived {
            return None;
        }
        let fit: Vec<String> = (self.names.tables.iter())
            .filter(|(_, cols)| needed.iter().all(|c| cols.contains(c.as_str())))
            .map(|(t, _)| t.clone())
            .collect();
        (!fit.is_empty()).then_some(fit)
    }

    /// A half-written bare word must begin some name or keyword.
    fn bare_prefix(&self, w: &str) -> Result<(), Refusal> {
        let alias_like = w.starts_with('t') && w[1..].chars().all(|c| c.is_ascii_digit());
        let top = self.scopes.last().expect("a scope");
        // Once the FROM clause has begun, a bare column must be one of its tables'.
        let columns = match (top.in_from || top.after_from) && !self.scopes.iter().any(|s| s.derived) {
            true => (self.scopes.iter().flat_map(|s| &s.tables))
                .filter_map(|t| self.names.tables.get(t))
                .any(|cols| begins(w, cols.iter())),
            false => begins(w, self.names.columns.iter()),
        };
        let ok = alias_like
            || begins_word(w)
            || columns
            || begins(w, self.names.tables.keys())
            || begins(w, self.named.iter())
            || self.scopes.iter().any(|s| begins(w, s.bound.keys()));
        match ok {
            true => Ok(()),
            false => Err(format!("no name begins '{w}'")),
        }
    }

    /// A whole bare word in an expression: a column of the query's tables (checked when they are
    /// known) or an alias. (A table's name is only whole before `.`, which makes it a qualifier.)
    fn bare(&mut self, w: &str) -> Result<(), Refusal> {
        if self.named.contains(w) || self.scopes.iter().any(|s| s.bound.contains_key(w)) {
            return Ok(());
        }
        let top = self.scopes.last().expect("a scope");
        let before_from = !(top.in_from || top.after_from);
        if !self.names.columns.contains(w) {
            // After `FROM (SELECT ...)`, the subquery's columns are not known.
            if before_from || !self.scopes.iter().any(|s| s.derived) {
                return Err(format!("no column '{w}'"));
            }
        }
        if !before_from {
            return match self.in_scope(w) {
                true => Ok(()),
                false => Err(format!("no table of the query has '{w}'")),
            };
        }
        self.top().pending_bare.push(w.to_string());
        Ok(())
    }
}

/// Whether `w` begins a keyword or function name.
fn begins_word(w: &str) -> bool {
    WORDS.iter().any(|k| k.starts_with(w))
}

#[cfg(test)]
mod tests;
