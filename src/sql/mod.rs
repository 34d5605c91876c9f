//! Text-to-SQL: the data a model learns from and the SQL it writes, judged by running it.
//!
//! Read in this order: [`data`] (JSONL examples, the `### Schema ###` prompt, chat formats, Spider
//! import, the bundled shop database, packing), [`schema`] (schema snippets from SQLite files),
//! [`exec`] (read-only, time-limited execution), [`compare`] and [`eval`] (execution accuracy as
//! Spider's test-suite evaluator computes it, with [`exact`] set match, [`hardness`] and the kinds of
//! [`miss`]),
//! [`guard`] (decoding held to a database's names), [`choose`] (execution-guided choice among
//! candidates), [`evaluate`] (generate and score a validation sample), [`predict`] (`sqlora
//! predict`) and [`ask`] (`sqlora ask`). [`device`] resolves the commands'
//! `--device`, with what a user is told about the GPU.

pub mod ask;
pub mod choose;
pub mod compare;
pub mod data;
pub mod device;
pub mod eval;
pub mod evaluate;
pub mod exact;
pub mod exec;
pub mod guard;
pub mod hardness;
pub mod lex;
pub mod miss;
pub mod predict;
pub mod schema;
