//! Asking an instruct model for SQL in its own chat format: how an untuned base is measured fairly.
//!
//! A fine-tuned adapter answers the `### Schema ###` template it was trained on; the base model was
//! never shown that template and merely continues it (a schema, a CREATE TABLE). Published prompted
//! results for instruct models use their chat template, so `sqlora predict --prompt chat` does too:
//! a system turn asking for one SQLite query, a user turn with the schema and the question, and the
//! assistant's turn opened with a ```sql fence so that the answer starts as code. What comes back is
//! cut down to its first statement by [`extract_sql`].
//!
//! Two chat formats cover the families sqlora loads: ChatML (Qwen2, SmolLM2) and Llama 3's header
//! tokens. The format is recognised from the tokenizer's special tokens, never guessed from a name.

use crate::load::tokenizer::Tokenizer;
use anyhow::{bail, Result};

/// How a model's turns are marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\n … <|im_end|>\n` (Qwen2, SmolLM2).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n … <|eot_id|>` (Llama 3.x).
    Llama3,
}

/// The system turn: what the model is asked to do.
pub const SYSTEM: &str = "You are an expert in SQLite. Given a database schema and a question, answer with one \
SQLite query that computes the answer, and nothing else.";

/// What opens the assistant's turn, so that the answer begins as SQL.
pub const ANSWER_OPENING: &str = "```sql\n";

impl ChatFormat {
    /// The format whose marker tokens the tokenizer knows; an error names what was looked for.
    pub fn of(tok: &Tokenizer) -> Result<ChatFormat> {
        if tok.token_id("<|im_start|>").is_some() && tok.token_id("<|im_end|>").is_some() {
            Ok(ChatFormat::ChatMl)
        } else if tok.token_id("<|start_header_id|>").is_some() && tok.token_id("<|eot_id|>").is_some() {
            Ok(ChatFormat::Llama3)
        } else {
            bail!(
                "the tokenizer has no chat format sqlora knows (ChatML's <|im_start|>/<|im_end|> or \
                 Llama 3's <|start_header_id|>/<|eot_id|>); use --prompt template"
            )
        }
    }

    /// The token that ends a turn: generation stops there as at EOS.
    pub fn end_of_turn(self) -> &'static str {
        match self {
            ChatFormat::ChatMl => "<|im_end|>",
            ChatFormat::Llama3 => "<|eot_id|>",
        }
    }

    /// The conversation up to the opened assistant answer. The tokenizer's post-processor adds
    /// BOS where the model has one (Llama 3's `<|begin_of_text|>`), so it is not written here.
    pub fn prompt(self, instruction: &str, schema: &str) -> String {
        // The question first and the request last: small models otherwise take the DDL-like
        // schema as a cue to write more DDL (measured: SmolLM2-135M answered CREATE TABLE).
        let user = format!(
            "Question: {instruction}\n\n\
             Database schema (one table per line, then foreign keys as child -> parent):\n{schema}\n\n\
             Write one SQLite SELECT query that answers the question."
        );
        let turns = [("system", SYSTEM), ("user", user.as_str())];
        let mut text = String::new();
        match self {
            ChatFormat::ChatMl => {
                for (role, content) in turns {
                    text += &format!("<|im_start|>{role}\n{content}<|im_end|>\n");
                }
                text += "<|im_start|>assistant\n";
            }
            ChatFormat::Llama3 => {
                for (role, content) in turns {
                    text += &format!("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>");
                }
                text += "<|start_header_id|>assistant<|end_header_id|>\n\n";
            }
        }
        text + ANSWER_OPENING
    }
}

/// The first SQL statement of a chat answer (which began inside a ```sql fence): everything up to a
/// closing fence, then up to the first `;` outside quotes, trimmed. An answer that opens another
/// fence first (a model that restarts its answer) is read from inside that fence.
pub fn extract_sql(answer: &str) -> String {
    let mut text = answer.trim_start();
    if let Some(rest) = text.strip_prefix("```") {
        // A second opening fence: skip its language tag line.
        text = rest.split_once('\n').map_or("", |(_, body)| body);
    }
    if let Some(end) = text.find("```") {
        text = &text[..end];
    }
    first_statement(text).trim().to_string()
}

/// `sql` up to (not including) its first `;` outside '…', "…" and `…` quotes.
fn first_statement(sql: &str) -> &str {
    let mut quote: Option<char> = None;
    for (i, c) in sql.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if matches!(c, '\'' | '"' | '`') => quote = Some(c),
            None if c == ';' => return &sql[..i],
            None => {}
        }
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_cuts_at_the_fence_and_the_first_statement() {
        assert_eq!(extract_sql("SELECT 1\n```\nThis query counts."), "SELECT 1");
        assert_eq!(extract_sql("SELECT a FROM t;\nSELECT b FROM t;"), "SELECT a FROM t");
        assert_eq!(extract_sql("  SELECT name FROM singer  "), "SELECT name FROM singer");
        // A semicolon inside a string literal or a quoted name does not end the statement.
        assert_eq!(
            extract_sql("SELECT * FROM t WHERE a = 'x;y' AND \"b;\" = 1; DROP TABLE t"),
            "SELECT * FROM t WHERE a = 'x;y' AND \"b;\" = 1"
        );
        // A model that opens a second fence is read from inside it.
        assert_eq!(extract_sql("```sql\nSELECT 2;\n```"), "SELECT 2");
        assert_eq!(extract_sql("```\nSELECT 3\n```"), "SELECT 3");
        assert_eq!(extract_sql("```"), "");
        assert_eq!(extract_sql(""), "");
    }

    #[test]
    fn prompts_open_the_answer_inside_a_sql_fence() {
        let chatml = ChatFormat::ChatMl.prompt("How many singers?", "singer(id INT, name TEXT)");
        assert!(chatml.starts_with("<|im_start|>system\nYou are an expert in SQLite."));
        assert!(chatml.contains("<|im_start|>user\nQuestion: How many singers?\n\nDatabase schema"));
        assert!(chatml.contains("singer(id INT, name TEXT)\n\nWrite one SQLite SELECT query"));
        assert!(chatml.contains("answers the question.<|im_end|>\n<|im_start|>assistant\n"));
        assert!(chatml.ends_with("<|im_end|>\n<|im_start|>assistant\n```sql\n"));
        assert_eq!(chatml.matches("<|im_start|>").count(), 3);
        assert_eq!(chatml.matches("<|im_end|>").count(), 2);

        let llama = ChatFormat::Llama3.prompt("How many singers?", "singer(id INT, name TEXT)");
        assert!(llama.starts_with("<|start_header_id|>system<|end_header_id|>\n\nYou are"));
        assert!(llama.ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n```sql\n"));
        assert_eq!(llama.matches("<|eot_id|>").count(), 2);
        assert_eq!(ChatFormat::ChatMl.end_of_turn(), "<|im_end|>");
        assert_eq!(ChatFormat::Llama3.end_of_turn(), "<|eot_id|>");
    }
}
