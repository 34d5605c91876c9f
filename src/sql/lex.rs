//! A small SQL lexer: enough to normalise queries, strip DISTINCT, find table names and count the
//! components that decide Spider's hardness. String literals and quoted identifiers stay intact.

/// One token of SQL text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tok {
    /// A keyword or bare identifier, as written.
    Word(String),
    /// A quoted identifier (`"x"`, `` `x` ``, `[x]`), without its quotes.
    Quoted(String),
    /// A string literal (`'x'`), without its quotes, with `''` unescaped.
    Str(String),
    /// A numeric literal, as written.
    Num(String),
    /// Punctuation or an operator: `(`, `)`, `,`, `.`, `*`, `=`, `<=`, `!=`, `||`, ...
    Punct(String),
}

impl Tok {
    /// Whether this is the keyword `kw` (case-insensitive).
    pub fn is(&self, kw: &str) -> bool {
        matches!(self, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
    }

    pub fn is_punct(&self, p: &str) -> bool {
        matches!(self, Tok::Punct(x) if x == p)
    }

    /// An identifier's name (bare or quoted), lowercased.
    pub fn ident(&self) -> Option<String> {
        match self {
            Tok::Word(w) | Tok::Quoted(w) => Some(w.to_lowercase()),
            _ => None,
        }
    }
}

/// Split SQL into tokens. Unterminated quotes run to the end of the text (the database, not the
/// lexer, reports the error).
pub fn lex(sql: &str) -> Vec<Tok> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let take_until = |i: &mut usize, close: char| -> String {
        let mut s = String::new();
        while *i < chars.len() {
            if chars[*i] == close {
                if close == '\'' && chars.get(*i + 1) == Some(&'\'') {
                    s.push('\'');
                    *i += 2;
                    continue;
                }
                *i += 1;
                break;
            }
            s.push(chars[*i]);
            *i += 1;
        }
        s
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '\'' {
            i += 1;
            out.push(Tok::Str(take_until(&mut i, '\'')));
        } else if c == '"' || c == '`' || c == '[' {
            i += 1;
            let close = if c == '[' { ']' } else { c };
            out.push(Tok::Quoted(take_until(&mut i, close)));
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["<=", ">=", "!=", "<>", "==", "||"].contains(&two.as_str()) {
                out.push(Tok::Punct(two));
                i += 2;
            } else {
                out.push(Tok::Punct(c.to_string()));
                i += 1;
            }
        }
    }
    out
}

/// Render tokens back to SQL, one space between tokens (quotes restored).
pub fn render(toks: &[Tok]) -> String {
    let parts: Vec<String> = toks
        .iter()
        .map(|t| match t {
            Tok::Word(w) | Tok::Num(w) | Tok::Punct(w) => w.clone(),
            Tok::Quoted(q) => format!("\"{}\"", q.replace('"', "\"\"")),
            Tok::Str(s) => format!("'{}'", s.replace('\'', "''")),
        })
        .collect();
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_strings_identifiers_and_operators() {
        let t = lex("SELECT \"a b\", 'it''s' FROM [t] WHERE x<=3.5 AND y != -- note\n 2");
        assert_eq!(t[1], Tok::Quoted("a b".into()));
        assert_eq!(t[3], Tok::Str("it's".into()));
        assert_eq!(t[5], Tok::Quoted("t".into()));
        assert!(t[8].is_punct("<="));
        assert_eq!(t[9], Tok::Num("3.5".into()));
        assert_eq!(t[11], Tok::Word("y".into()));
        assert!(t[12].is_punct("!="));
        assert_eq!(t.len(), 14, "the comment is skipped");
        assert_eq!(render(&lex("select 'a''b'")), "select 'a''b'");
    }
}
