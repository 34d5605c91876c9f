//! Training examples: the JSONL format, the prompt template, and tokenization with the label mask.
//!
//! One example per line: `{"instruction": question, "input": schema snippet, "output": SQL}` plus
//! optional `"db_id"` / `"db_path"`. The model sees
//!
//! ```text
//! ### Schema ###
//! {input}
//!
//! ### Question ###
//! {instruction}
//!
//! ### SQL ###
//! {output}<eos>
//! ```
//!
//! and is trained only on `{output}<eos>`.

pub mod chat;
pub mod shop;
pub mod spider;

use crate::load::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One text-to-SQL example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// The question in natural language.
    pub instruction: String,
    /// The schema snippet (may be empty).
    #[serde(default)]
    pub input: String,
    /// The gold SQL.
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_path: Option<String>,
}

/// Read a JSONL file of examples. Blank lines are skipped; any other line that is not a valid
/// example is an error naming the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text); // a byte-order mark some editors write
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not a valid example", path.display(), i + 1))?;
        if ex.instruction.trim().is_empty() || ex.output.trim().is_empty() {
            bail!(
                "{}:{}: \"instruction\" and \"output\" must not be empty",
                path.display(),
                i + 1
            );
        }
        out.push(ex);
    }
    if out.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(out)
}

/// Write examples as JSONL, atomically.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let mut text = String::new();
    for e in examples {
        text += &serde_json::to_string(e)?;
        text.push('\n');
    }
    crate::load::weights::write_atomic(path, text.as_bytes())
}

/// The prompt up to and including the SQL header: everything the model conditions on.
pub fn prompt(instruction: &str, schema: &str) -> String {
    format!("### Schema ###\n{schema}\n\n### Question ###\n{instruction}\n\n### SQL ###\n")
}

/// A tokenized example: inputs and next-token targets, with the loss only on the SQL and EOS.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// [L] token ids: prompt (with the tokenizer's BOS, if any), SQL, EOS.
    pub tokens: Vec<u32>,
    /// [L] `targets[t] = tokens[t + 1]` where that token is part of the SQL or the EOS; None elsewhere.
    pub targets: Vec<Option<u32>>,
}

impl Encoded {
    /// Number of positions with a loss.
    pub fn labels(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

/// Tokenize an example for training. The prompt and the SQL are tokenized separately (the prompt
/// ends in a newline, a natural token boundary) so that the mask falls exactly on the SQL.
pub fn encode(tok: &Tokenizer, ex: &Example, eos: u32) -> Result<Encoded> {
    let mut tokens = tok.encode(&prompt(&ex.instruction, &ex.input))?;
    let prompt_len = tokens.len();
    tokens.extend(tok.encode_plain(ex.output.trim())?);
    tokens.push(eos);
    let targets = (0..tokens.len())
        .map(|t| (t + 1 >= prompt_len && t + 1 < tokens.len()).then(|| tokens[t + 1]))
        .collect();
    Ok(Encoded { tokens, targets })
}
