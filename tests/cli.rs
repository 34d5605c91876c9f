//! The `sqlora` toolbox from the outside: the `ask` contract and its errors.

use sqlora::generate::greedy;
use sqlora::model::Model;
use sqlora::tiny::{write_tiny_model, TinyVariant};
use sqlora::tokenizer::Tokenizer;
use std::process::Command;

fn sqlora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sqlora")).args(args).output().unwrap()
}

#[test]
fn ask_prints_exactly_the_greedy_continuation() {
    for v in TinyVariant::ALL {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), v).unwrap();
        let prompt = "SELECT count(*) FROM singer";
        let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
        let ids = tok.encode(prompt).unwrap();
        // BOS only where the tokenizer's post-processor adds it: the llama variants, not qwen2.
        let bos_added = ids.len() == prompt.len() + 1;
        assert_eq!(
            bos_added,
            matches!(v, TinyVariant::Llama | TinyVariant::LlamaTied),
            "{}",
            v.name()
        );
        assert_eq!(
            ids[ids.len() - prompt.len()..],
            prompt.bytes().map(u32::from).collect::<Vec<_>>()[..]
        );

        let model = Model::load_dir(dir.path()).unwrap();
        let want_ids = greedy(&model, &ids, 20, &model.config.eos_token_ids);
        let want = tok.decode(&want_ids).unwrap();

        let out = sqlora(&[
            "ask",
            "--model",
            dir.path().to_str().unwrap(),
            "--max-new-tokens",
            "20",
            prompt,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{want}\n"),
            "{}",
            v.name()
        );
        assert!(
            !want.contains("<s>") && !want.contains("<|im_end|>"),
            "special tokens are not printed"
        );
    }
}

#[test]
fn ask_nf4_runs_the_quantized_base() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    let prompt = "SELECT name FROM";
    let model = Model::load_dir(dir.path()).unwrap().quantize_nf4();
    let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let want = tok
        .decode(&greedy(
            &model,
            &tok.encode(prompt).unwrap(),
            12,
            &model.config.eos_token_ids,
        ))
        .unwrap();
    let out = sqlora(&[
        "ask",
        "--model",
        dir.path().to_str().unwrap(),
        "--nf4",
        "--max-new-tokens",
        "12",
        prompt,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{want}\n"));
}

#[test]
fn ask_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = sqlora(&["ask", "--model", dir.path().to_str().unwrap(), "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("tokenizer.json"), "{err}");

    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    let out = sqlora(&["ask", "--model", dir.path().to_str().unwrap(), "--device", "tpu", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device \"tpu\""));
    assert!(out.stdout.is_empty(), "nothing but the answer goes to stdout");
}
