//! `sqlora ask`: one answer from a model, and with `--db`, a question over a database answered in
//! SQL that is then run read-only and printed as a table.

use crate::engine::target::Target;
use crate::load::tokenizer::Tokenizer;
use crate::load::ModelSource;
use crate::model::lora::LoraParams;
use crate::sql::exec::{format_table, Db};
use crate::sql::guard::{Names, SchemaGuard};
use crate::sql::schema::Schema;
use anyhow::{bail, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How `ask` answers.
pub struct Asking<'a> {
    /// The longest answer, in tokens.
    pub max_new: usize,
    /// `--device`, as [`crate::sql::device::open`] resolves it.
    pub device: &'a str,
    /// Run the base NF4-quantized.
    pub nf4: bool,
    /// A PEFT adapter directory.
    pub adapter: Option<&'a Path>,
    /// With a database, hold the SQL to its names ([`crate::sql::guard`]).
    pub guard: bool,
}

/// The training template around a question over `db`, with the schema snippet the model expects
/// (the values the question names first among each column's examples, pruned to 1,500 tokens).
pub fn question_prompt(tok: &Tokenizer, db: &Path, question: &str) -> Result<String> {
    let schema = Schema::from_sqlite(db, 3)?;
    let count = |s: &str| tok.encode_plain(s).map(|t| t.len()).unwrap_or(usize::MAX);
    Ok(crate::sql::data::prompt(
        question,
        &schema.question_snippet(question, 1500, &count),
    ))
}

/// The greedy continuation of `prompt`, decoded; held to `names` if given.
pub fn ask(source: &ModelSource, how: &Asking, prompt: &str, names: Option<Arc<Names>>) -> Result<String> {
    let (tokenizer, loaded) = load(source, how);
    let (tokenizer, loaded) = (tokenizer?, loaded?);
    answer(source, &tokenizer, loaded, how, prompt, names)
}

/// The model, its adapter and the device, loaded with the tokenizer built beside them (the two
/// take a few tenths of a second each, on different threads).
struct Loaded {
    target: Target,
    model: crate::model::forward::Model,
    lora: Option<LoraParams>,
}

/// The source's tokenizer and the rest of what an answer needs, built at once.
fn load(source: &ModelSource, how: &Asking) -> (Result<Tokenizer>, Result<Loaded>) {
    rayon::join(
        || source.tokenizer(),
        || {
            let target = crate::sql::device::open(how.device, Target::cpu()?)?;
            let model = target.load_model(source, how.nf4)?;
            let lora = (how.adapter)
                .map(|a| LoraParams::load_peft(a, &model.config))
                .transpose()?;
            Ok(Loaded { target, model, lora })
        },
    )
}

/// The greedy continuation of `prompt` by the loaded model, decoded; held to `names` if given.
fn answer(
    source: &ModelSource,
    tokenizer: &Tokenizer,
    loaded: Loaded,
    how: &Asking,
    prompt: &str,
    names: Option<Arc<Names>>,
) -> Result<String> {
    let Loaded { target, model, lora } = loaded;
    tokenizer.check_fits(model.config.vocab_size, source.path())?;
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let eos = model.config.eos_token_ids.clone();
    let prompts = [ids];
    let mut engine = target.generation_engine(model, lora.as_ref(), &prompts, 1)?;
    if let Some(names) = names {
        let guard = SchemaGuard::new(tokenizer.clone(), vec![Some(names)], &eos);
        engine.set_constraint(Some(Arc::new(guard)));
    }
    let out = engine.generate(lora.as_ref(), &prompts, how.max_new, &eos)?.remove(0);
    tokenizer.decode(&out)
}

/// Answer `question` over the SQLite database `db` in SQL, print it, run it read-only with a 10 s
/// limit, and print its rows as a table.
pub fn ask_db(source: &ModelSource, how: &Asking, db: &Path, question: &str) -> Result<()> {
    let (tokenizer, loaded) = load(source, how);
    let tokenizer = tokenizer?;
    let prompt = question_prompt(&tokenizer, db, question)?;
    let names = (how.guard)
        .then(|| Schema::from_sqlite(db, 0).map(|s| Arc::new(Names::of(&s))))
        .transpose()?;
    let sql = answer(source, &tokenizer, loaded?, how, &prompt, names)?;
    let sql = sql.trim();
    println!("{sql}\n");
    let conn = Db::open(db)?;
    match conn.query_named(sql, Duration::from_secs(10)) {
        Ok((names, rows)) => {
            println!("{}", format_table(&names, &rows, 50));
            Ok(())
        }
        Err(e) => bail!("the generated SQL did not run on {}: {e}", db.display()),
    }
}
