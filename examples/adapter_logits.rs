//! Last-position logits of a base model with a PEFT adapter, for prompts given as text, written to a
//! safetensors file (`ids_<i>`: the prompt's token ids as f32, `logits_<i>`: [vocab] f32) that
//! tests/reference/check_adapter.py compares with transformers + peft.
//!
//! `cargo run --release --example adapter_logits -- MODEL_DIR ADAPTER_DIR OUT.safetensors "prompt" ...`
use sqlora::load::weights::{save_safetensors, SaveDtype};
use sqlora::model::forward::{KvCache, Logits, Model};
use sqlora::model::lora::LoraParams;
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: MODEL_DIR ADAPTER_DIR OUT.safetensors PROMPT..."
    );
    let (model_dir, adapter_dir, out) = (Path::new(&args[0]), Path::new(&args[1]), Path::new(&args[2]));
    let model = Model::load(model_dir)?;
    let tok = sqlora::load::open(model_dir)?.tokenizer()?;
    let lora = LoraParams::load_peft(adapter_dir, &model.config)?;
    let mut tensors = Vec::new();
    for (i, prompt) in args[3..].iter().enumerate() {
        let ids = tok.encode(prompt)?;
        let logits = model.forward_adapted(&ids, &mut KvCache::new(&model.config), Logits::Last, Some(&lora));
        tensors.push((
            format!("ids_{i}"),
            vec![ids.len()],
            ids.iter().map(|&x| x as f32).collect(),
        ));
        tensors.push((format!("logits_{i}"), vec![logits.len()], logits));
    }
    save_safetensors(out, &tensors, SaveDtype::F32, None)
}
