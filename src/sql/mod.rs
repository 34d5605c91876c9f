//! SQL: schemas and snippets, safe execution, and execution-accuracy evaluation.

pub mod choose;
pub mod compare;
pub mod eval;
pub mod exact;
pub mod exec;
pub mod hardness;
pub mod lex;
pub mod schema;
