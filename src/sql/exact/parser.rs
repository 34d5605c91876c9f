//! The parser behind [`super::parse`]: recursive descent over [`lex`] tokens, FROM first (as Spider's
//! parser does) so that the select list's columns resolve against its tables.

use super::{Catalog, ColUnit, Cond, Query, TableUnit, ValUnit};
use crate::sql::lex::{lex, Tok};

/// See [`super::parse`].
pub(super) fn parse(cat: &Catalog, sql: &str, keep_distinct: bool) -> Result<Query, String> {
    let mut toks = lex(sql);
    while toks.last().is_some_and(|t| t.is_punct(";")) {
        toks.pop();
    }
    let mut p = Parser {
        toks,
        pos: 0,
        cat,
        keep_distinct,
        count_distinct: keep_distinct,
        keys: None,
        scopes: Vec::new(),
        depth: 0,
    };
    let q = p.query(Keys::Own)?;
    if p.pos != p.toks.len() {
        return p.fail("unexpected text after the query");
    }
    Ok(q)
}

/// Words that are never a column or an alias.
const RESERVED: &str = "select from where group by having order limit offset intersect union except join inner \
    left right full outer cross natural on using as and or not in like between is null asc desc distinct all \
    exists case when then else end";
const AGGREGATES: [&str; 5] = ["max", "min", "count", "sum", "avg"];
const UNIT_OPS: [&str; 4] = ["-", "+", "*", "/"];
/// Comparison operators as written, and as recorded.
const OPS: [(&str, &str); 12] = [
    ("=", "="),
    ("==", "="),
    (">", ">"),
    ("<", "<"),
    (">=", ">="),
    ("<=", "<="),
    ("!=", "!="),
    ("<>", "!="),
    ("between", "between"),
    ("in", "in"),
    ("like", "like"),
    ("is", "is"),
];
/// Deepest nesting of queries and parentheses accepted.
const MAX_DEPTH: usize = 48;

/// The names visible in one query: aliases (or table names) with their table (`None` for a FROM
/// subquery), and the FROM tables in order.
#[derive(Default)]
struct Scope {
    names: Vec<(String, Option<String>)>,
    tables: Vec<String>,
    has_subquery: bool,
}

/// Where the foreign-key map applies: to the columns of the outermost query's FROM tables, in that
/// query (`Own`) and in the right-hand side of its INTERSECT/UNION/EXCEPT (`Given` those tables);
/// never in a nested query (`Given(None)`), which also keeps its DISTINCT.
enum Keys {
    Own,
    Given(Option<Vec<String>>),
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    cat: &'a Catalog,
    keep_distinct: bool,
    /// Whether DISTINCT counts in the query being parsed.
    count_distinct: bool,
    /// The tables whose columns map through the foreign keys in the query being parsed.
    keys: Option<Vec<String>>,
    scopes: Vec<Scope>,
    depth: usize,
}

type Parsed<T> = Result<T, String>;
/// Conditions and the connectives between them.
type Conditions = (Vec<Cond>, Vec<&'static str>);

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

impl Parser<'_> {
    fn fail<T>(&self, what: &str) -> Parsed<T> {
        Err(format!("{what} (token {})", self.pos + 1))
    }

    fn tok(&self, ahead: usize) -> Option<&Tok> {
        self.toks.get(self.pos + ahead)
    }

    /// At keyword or punctuation `s`.
    fn at(&self, s: &str) -> bool {
        self.tok(0).is_some_and(|t| t.is(s) || t.is_punct(s))
    }

    /// At `( SELECT`.
    fn at_subquery(&self) -> bool {
        self.at("(") && self.tok(1).is_some_and(|t| t.is("select"))
    }

    /// At `agg (`: the aggregate.
    fn at_aggregate(&self) -> Option<&'static str> {
        let agg = AGGREGATES.into_iter().find(|a| self.at(a))?;
        self.tok(1).is_some_and(|t| t.is_punct("(")).then_some(agg)
    }

    fn at_unit_op(&self) -> Option<&'static str> {
        UNIT_OPS.into_iter().find(|op| self.at(op))
    }

    fn eat(&mut self, s: &str) -> bool {
        let hit = self.at(s);
        self.pos += hit as usize;
        hit
    }

    fn expect(&mut self, s: &str) -> Parsed<()> {
        if self.eat(s) {
            Ok(())
        } else {
            self.fail(&format!("expected {s}"))
        }
    }

    /// Run `f` one level deeper, refusing input nested past [`MAX_DEPTH`].
    fn nest<T>(&mut self, f: impl FnOnce(&mut Self) -> Parsed<T>) -> Parsed<T> {
        if self.depth >= MAX_DEPTH {
            return self.fail("nested too deeply");
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    /// `( f )`, one level deeper.
    fn parens<T>(&mut self, f: impl FnOnce(&mut Self) -> Parsed<T>) -> Parsed<T> {
        self.nest(|p| {
            p.expect("(")?;
            let r = f(p)?;
            p.expect(")")?;
            Ok(r)
        })
    }

    /// One or more of `f`, separated by commas.
    fn list<T>(&mut self, mut f: impl FnMut(&mut Self) -> Parsed<T>) -> Parsed<Vec<T>> {
        let mut out = vec![f(self)?];
        while self.eat(",") {
            out.push(f(self)?);
        }
        Ok(out)
    }

    /// An identifier (bare or quoted; a bare one must not be a keyword), lowercased.
    fn ident(&mut self) -> Parsed<String> {
        let name = match self.tok(0) {
            Some(Tok::Word(w)) if !RESERVED.split_whitespace().any(|r| w.eq_ignore_ascii_case(r)) => w,
            Some(Tok::Quoted(q)) => q,
            _ => return self.fail("expected a name"),
        };
        let name = name.to_lowercase();
        self.pos += 1;
        Ok(name)
    }

    /// An optional alias: `AS name`, or a bare name that is not a keyword.
    fn alias(&mut self) -> Parsed<Option<String>> {
        if self.eat("as") {
            return self.ident().map(Some);
        }
        Ok(self.ident().ok())
    }

    fn query(&mut self, keys: Keys) -> Parsed<Query> {
        if self.at_subquery() {
            return self.parens(|p| p.query(keys));
        }
        self.nest(|p| p.query_inner(keys))
    }

    fn nested_query(&mut self) -> Parsed<Query> {
        self.parens(|p| p.query(Keys::Given(None)))
    }

    fn query_inner(&mut self, keys: Keys) -> Parsed<Query> {
        self.expect("select")?;
        let distinct = self.eat("distinct");
        let select_at = self.pos;
        let from_at = self.find_from()?;
        self.pos = from_at + 1;
        self.scopes.push(Scope::default());
        let outer = (self.keys.take(), self.count_distinct);
        let body = self.query_body(keys, distinct, select_at, from_at);
        let mine = std::mem::replace(&mut self.keys, outer.0);
        self.count_distinct = outer.1;
        self.scopes.pop();
        let mut q = body?;
        if let Some(op) = ["intersect", "union", "except"].into_iter().find(|op| self.at(op)) {
            self.pos += 1;
            if self.at("all") {
                return self.fail("UNION ALL is not supported");
            }
            q.keywords.insert(op);
            q.compound = Some((op, Box::new(self.query(Keys::Given(mine))?)));
        }
        Ok(q)
    }

    /// The position of this query's FROM (outside any parentheses).
    fn find_from(&self) -> Parsed<usize> {
        let mut depth = 0usize;
        for (i, t) in self.toks.iter().enumerate().skip(self.pos) {
            if t.is_punct("(") {
                depth += 1;
            } else if t.is_punct(")") {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            } else if depth == 0 && t.is("from") {
                return Ok(i);
            }
        }
        self.fail("no FROM clause")
    }

    /// Parse FROM (at the current position), then the select list (between `select_at` and
    /// `from_at`), then the clauses after FROM.
    fn query_body(&mut self, keys: Keys, distinct: bool, select_at: usize, from_at: usize) -> Parsed<Query> {
        let (tables, (join_conds, join_conns)) = self.tables_and_joins()?;
        self.keys = match keys {
            Keys::Own => self.scopes.last().map(|s| s.tables.clone()),
            Keys::Given(k) => k,
        };
        self.count_distinct = self.keep_distinct || self.keys.is_none();
        let after_from = self.pos;
        self.pos = select_at;
        let select = self.list(Self::select_item)?;
        if self.pos != from_at {
            return self.fail("unexpected text in the select list");
        }
        self.pos = after_from;
        let (conds, conns) = self.conditions_after("where")?;
        let group = if self.eat("group") {
            self.expect("by")?;
            self.list(Self::col_unit)?
        } else {
            Vec::new()
        };
        let (having, having_conns) = self.conditions_after("having")?;
        let mut order = None;
        if self.eat("order") {
            self.expect("by")?;
            let mut dir = "asc";
            let units = self.list(|p| {
                let unit = p.val_unit()?;
                if let Some(d) = ["asc", "desc"].into_iter().find(|d| p.eat(d)) {
                    dir = d;
                }
                Ok(unit)
            })?;
            order = Some((dir, units));
        }
        let limit = self.eat("limit");
        if limit {
            self.number()?;
            if self.eat("offset") || self.eat(",") {
                self.number()?;
            }
        }

        let all_conds = || join_conds.iter().chain(&conds).chain(&having);
        let present = [
            (!conds.is_empty(), "where"),
            (!group.is_empty(), "group"),
            (!having.is_empty(), "having"),
            (order.is_some(), "order"),
            (order.is_some(), order.as_ref().map_or("", |o| o.0)),
            (limit, "limit"),
            (
                join_conns.iter().chain(&conns).chain(&having_conns).any(|&c| c == "or"),
                "or",
            ),
            (all_conds().any(|c| c.not), "not"),
            (all_conds().any(|c| c.op == "in"), "in"),
            (all_conds().any(|c| c.op == "like"), "like"),
        ];
        Ok(Query {
            distinct: distinct && self.count_distinct,
            select: sorted(select),
            tables: sorted(tables),
            conds: sorted(conds),
            connectives: conns.into_iter().collect(),
            having: if group.is_empty() { Vec::new() } else { having },
            group,
            order,
            limit,
            keywords: present.into_iter().filter(|p| p.0).map(|p| p.1).collect(),
            compound: None,
        })
    }

    fn number(&mut self) -> Parsed<()> {
        if !matches!(self.tok(0), Some(Tok::Num(_))) {
            return self.fail("expected a number");
        }
        self.pos += 1;
        Ok(())
    }

    /// FROM's table units (registered in the current scope), with its join conditions.
    fn tables_and_joins(&mut self) -> Parsed<(Vec<TableUnit>, Conditions)> {
        let (mut units, mut conds, mut conns) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            if self.at_subquery() {
                let q = self.nested_query()?;
                let alias = self.alias()?;
                let scope = self.scopes.last_mut().expect("a scope per query");
                scope.has_subquery = true;
                scope.names.extend(alias.map(|a| (a, None)));
                units.push(TableUnit::Query(Box::new(q)));
            } else {
                let name = self.ident()?;
                if !self.cat.has_table(&name) {
                    return self.fail(&format!("no table {name}"));
                }
                let alias = self.alias()?.unwrap_or_else(|| name.clone());
                let scope = self.scopes.last_mut().expect("a scope per query");
                scope.names.push((alias, Some(name.clone())));
                scope.tables.push(name.clone());
                units.push(TableUnit::Table(name));
            }
            if self.eat("on") {
                let (c, k) = self.conditions()?;
                if !conds.is_empty() {
                    conns.push("and");
                }
                conds.extend(c);
                conns.extend(k);
            }
            self.pos += (self.at("inner") && self.tok(1).is_some_and(|t| t.is("join"))) as usize;
            if !(self.eat(",") || self.eat("join")) {
                return Ok((units, (conds, conns)));
            }
        }
    }

    /// A select item, its alias skipped. `agg(value unit)` keeps its aggregate on the item, as
    /// Spider's parser does; anything else is a value unit whose columns carry their aggregates.
    fn select_item(&mut self) -> Parsed<(&'static str, ValUnit)> {
        let start = self.pos;
        if let Some(agg) = self.at_aggregate() {
            self.pos += 1;
            let whole = self.parens(|p| {
                let distinct = p.eat("distinct") && p.count_distinct;
                let mut unit = p.val_unit()?;
                unit.a.distinct |= distinct;
                Ok(unit)
            });
            match whole {
                Ok(unit) if self.at_unit_op().is_none() => {
                    self.alias()?;
                    return Ok((agg, unit));
                }
                _ => self.pos = start,
            }
        }
        let unit = self.val_unit()?;
        self.alias()?;
        Ok(("", unit))
    }

    fn val_unit(&mut self) -> Parsed<ValUnit> {
        if self.at("(") && !self.at_subquery() {
            return self.parens(Self::val_unit);
        }
        let a = self.col_unit()?;
        let op = match self.at_unit_op() {
            Some(op) => {
                self.pos += 1;
                Some((op, self.col_unit()?))
            }
            None => None,
        };
        Ok(ValUnit { a, op })
    }

    fn col_unit(&mut self) -> Parsed<ColUnit> {
        if let Some(agg) = self.at_aggregate() {
            self.pos += 1;
            return self.parens(|p| {
                let distinct = p.eat("distinct") && p.count_distinct;
                // An aggregate over arithmetic (beyond Spider's grammar) is one opaque column.
                let col = match p.val_unit()? {
                    ValUnit { a, op: None } if a.agg.is_empty() && !a.distinct => a.col,
                    other => format!("{other:?}"),
                };
                Ok(ColUnit { agg, col, distinct })
            });
        }
        if self.at("(") && !self.at_subquery() {
            return self.parens(Self::col_unit);
        }
        let distinct = self.eat("distinct") && self.count_distinct;
        let col = self.column()?;
        Ok(ColUnit { agg: "", col, distinct })
    }

    /// A column reference, resolved to `table.column` (or `*`).
    fn column(&mut self) -> Parsed<String> {
        if self.eat("*") {
            return Ok("*".into());
        }
        let first = self.ident()?;
        if !self.eat(".") {
            return self.resolve_bare(&first);
        }
        // After a qualifier, even a keyword is a column name.
        let Some(col) = self.tok(0).and_then(Tok::ident) else {
            return self.fail("expected a column name");
        };
        self.pos += 1;
        for scope in self.scopes.iter().rev() {
            if let Some((_, source)) = scope.names.iter().find(|(n, _)| *n == first) {
                return match source {
                    Some(t) => self.table_column(t, &col),
                    None => Ok(format!("(query).{col}")),
                };
            }
        }
        // A table name, or (as Spider's parser allows) an alias declared anywhere in the query.
        let table = Some(first.clone())
            .filter(|t| self.cat.has_table(t))
            .or_else(|| self.declared_alias(&first));
        match table {
            Some(t) => self.table_column(&t, &col),
            None => self.fail(&format!("no table or alias {first}")),
        }
    }

    /// The table of `table AS alias` anywhere in the query text.
    fn declared_alias(&self, alias: &str) -> Option<String> {
        self.toks.windows(3).find_map(|w| {
            let table = w[0].ident().filter(|t| self.cat.has_table(t))?;
            (w[1].is("as") && w[2].ident().as_deref() == Some(alias)).then_some(table)
        })
    }

    /// A bare column: the first FROM table that has it, innermost query first.
    fn resolve_bare(&self, col: &str) -> Parsed<String> {
        for scope in self.scopes.iter().rev() {
            if let Some(t) = scope.tables.iter().find(|t| self.cat.has_column(t, col)) {
                return self.table_column(t, col);
            }
            if scope.has_subquery {
                return Ok(format!("(query).{col}"));
            }
        }
        self.fail(&format!("no column {col} in the FROM tables"))
    }

    /// `table.column`, mapped through the foreign keys where [`Keys`] says so.
    fn table_column(&self, table: &str, col: &str) -> Parsed<String> {
        if !self.cat.has_column(table, col) {
            return self.fail(&format!("no column {table}.{col}"));
        }
        let key = format!("{table}.{col}");
        Ok(match self.cat.key_map.get(&key) {
            Some(rep) if self.keys.as_ref().is_some_and(|k| k.iter().any(|t| t == table)) => rep.clone(),
            _ => key,
        })
    }

    /// The conditions after keyword `kw`, if it comes next.
    fn conditions_after(&mut self, kw: &str) -> Parsed<Conditions> {
        if self.eat(kw) {
            self.conditions()
        } else {
            Ok(Default::default())
        }
    }

    /// Conditions joined by AND / OR (parenthesised groups flattened), with the connectives.
    fn conditions(&mut self) -> Parsed<Conditions> {
        let (mut conds, mut conns) = (Vec::new(), Vec::new());
        loop {
            self.condition(&mut conds, &mut conns)?;
            match ["and", "or"].into_iter().find(|c| self.eat(c)) {
                Some(c) => conns.push(c),
                None => return Ok((conds, conns)),
            }
        }
    }

    fn condition(&mut self, conds: &mut Vec<Cond>, conns: &mut Vec<&'static str>) -> Parsed<()> {
        if self.at("(") && !self.at_subquery() {
            let start = self.pos;
            if let Ok((c, k)) = self.parens(Self::conditions) {
                conds.extend(c);
                conns.extend(k);
                return Ok(());
            }
            self.pos = start;
        }
        let mut not = self.eat("not");
        let lhs = self.val_unit()?;
        not |= self.eat("not");
        let Some(op) = OPS.iter().find(|(written, _)| self.at(written)).map(|o| o.1) else {
            return self.fail("expected a comparison operator");
        };
        self.pos += 1;
        not |= op == "is" && self.eat("not");
        let v1 = self.value()?;
        let v2 = if op == "between" {
            self.expect("and")?;
            self.value()?
        } else {
            None
        };
        conds.push(Cond { not, op, lhs, v1, v2 });
        Ok(())
    }

    /// A right-hand side: a nested query, or a value (literal, column, list, arithmetic), which is
    /// checked and then dropped.
    fn value(&mut self) -> Parsed<Option<Box<Query>>> {
        if self.at_subquery() {
            return Ok(Some(Box::new(self.nested_query()?)));
        }
        self.expression()?;
        Ok(None)
    }

    /// Operands joined by arithmetic operators.
    fn expression(&mut self) -> Parsed<()> {
        self.operand()?;
        while self.at_unit_op().is_some() {
            self.pos += 1;
            self.operand()?;
        }
        Ok(())
    }

    fn operand(&mut self) -> Parsed<()> {
        match self.tok(0) {
            Some(Tok::Num(_) | Tok::Str(_) | Tok::Quoted(_)) => self.pos += 1,
            Some(t) if ["null", "true", "false"].iter().any(|w| t.is(w)) => self.pos += 1,
            Some(t) if t.is_punct("-") || t.is_punct("+") => {
                self.pos += 1;
                return self.nest(Self::operand);
            }
            Some(t) if t.is_punct("(") => {
                if self.at_subquery() {
                    return self.nested_query().map(drop);
                }
                return self.parens(|p| p.list(Self::expression)).map(drop);
            }
            _ => self.col_unit().map(drop)?,
        }
        Ok(())
    }
}
