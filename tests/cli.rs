//! The `sqlora` toolbox from the outside: `ask`, `merge`, `predict` and `eval`, their contracts and errors.

mod common;
use common::rel_err;

use sqlora::load::tokenizer::Tokenizer;
use sqlora::model::forward::Model;
use sqlora::model::forward::{KvCache, Logits};
use sqlora::model::generate::{greedy, greedy_batch};
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{tiny_adapter, write_tiny_model, TinyVariant};
use sqlora::sql::data::chat::{extract_sql, ChatFormat};
use sqlora::sql::guard::{Names, SchemaGuard};
use sqlora::sql::schema::Schema;
use std::process::Command;
use std::sync::Arc;

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
        let want_ids = greedy(&model, None, &ids, 20, &model.config.eos_token_ids);
        let want = tok.decode(&want_ids).unwrap();

        let out = sqlora(&[
            "ask",
            "--model",
            dir.path().to_str().unwrap(),
            "--device",
            "reference",
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
            None,
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
    // The device path (here on the CPU with bf16 storage) answers too, through the KV-cache decoder.
    let m = dir.path().to_str().unwrap();
    let out = sqlora(&[
        "ask",
        "--model",
        m,
        "--device",
        "cpu-bf16",
        "--max-new-tokens",
        "5",
        "hi",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty());
}

#[test]
fn ask_with_an_adapter_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    tiny_adapter(TinyVariant::Qwen2)
        .save_peft(adapter.path(), "tiny")
        .unwrap();
    let model = Model::load_dir(dir.path()).unwrap();
    let lora = LoraParams::load_peft(adapter.path(), &model.config).unwrap();
    let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let prompt = "SELECT name FROM";
    let ids = tok.encode(prompt).unwrap();
    let eos = &model.config.eos_token_ids;
    let with = tok.decode(&greedy(&model, Some(&lora), &ids, 16, eos)).unwrap();
    let without = tok.decode(&greedy(&model, None, &ids, 16, eos)).unwrap();
    assert_ne!(with, without, "the adapter changes the continuation");
    let (m, a) = (dir.path().to_str().unwrap(), adapter.path().to_str().unwrap());
    let out = sqlora(&[
        "ask",
        "--model",
        m,
        "--adapter",
        a,
        "--device",
        "reference",
        "--max-new-tokens",
        "16",
        prompt,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{with}\n"));
}

#[test]
fn merge_folds_the_adapter_into_bf16_weights() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = tempfile::tempdir().unwrap();
    let merged = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    tiny_adapter(TinyVariant::Llama)
        .save_peft(adapter.path(), "tiny")
        .unwrap();
    let (m, a, o) = (
        dir.path().to_str().unwrap(),
        adapter.path().to_str().unwrap(),
        merged.path().to_str().unwrap(),
    );
    let out = sqlora(&["merge", "--model", m, "--adapter", a, "--out", o]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let base = Model::load_dir(dir.path()).unwrap();
    let lora = LoraParams::load_peft(adapter.path(), &base.config).unwrap();
    let tokens: Vec<u32> = (0..15).map(|i| (i * 53 + 7) % 259).collect();
    let adapted = base.forward_adapted(&tokens, &mut KvCache::new(&base.config), Logits::All, Some(&lora));
    let plain = base.forward(&tokens, &mut KvCache::new(&base.config), Logits::All);
    let merged_model = Model::load_dir(merged.path()).unwrap();
    let folded = merged_model.forward(&tokens, &mut KvCache::new(&merged_model.config), Logits::All);
    // bf16 storage of W + s B A rounds each weight to 8 significant bits: predicted ~2^-9 per
    // weight, a few 1e-3 in the logits; measured 4.3e-3
    // (and the adapter alone moves the logits by 1.02).
    assert!(
        rel_err(&folded, &adapted) < 1e-2,
        "merged vs adapted: {}",
        rel_err(&folded, &adapted)
    );
    assert!(
        rel_err(&plain, &adapted) > 5e-2,
        "the adapter must matter for this test to mean anything"
    );
    assert!(merged.path().join("tokenizer.json").exists());
}

#[test]
fn ask_db_wraps_the_question_in_the_template() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    let db = dir.path().join("shop.sqlite");
    sqlora::sql::data::shop::write_shop_db(&db).unwrap();
    let question = "How many users are there?";
    let snippet = sqlora::sql::schema::Schema::from_sqlite(&db, 3).unwrap().render_all();
    let prompt = sqlora::sql::data::prompt(question, &snippet);
    let model = Model::load_dir(dir.path()).unwrap();
    let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let want = tok
        .decode(&greedy(
            &model,
            None,
            &tok.encode(&prompt).unwrap(),
            8,
            &model.config.eos_token_ids,
        ))
        .unwrap();
    let (m, d) = (dir.path().to_str().unwrap(), db.to_str().unwrap());
    let before = std::fs::read(&db).unwrap();
    let ask = |extra: &[&str]| {
        let args = [
            "ask",
            "--model",
            m,
            "--db",
            d,
            "--device",
            "reference",
            "--max-new-tokens",
            "8",
        ];
        sqlora(&[&args[..], extra, &[question]].concat())
    };
    let out = ask(&["--no-guard"]);
    // The random model's answer is not SQL: it is printed, then its failure is reported.
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{}\n", want.trim())));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not run on") && err.contains("shop.sqlite"), "{err}");
    // With the schema guard (the default), the answer is the guarded greedy one.
    let names = Arc::new(Names::of(&Schema::from_sqlite(&db, 0).unwrap()));
    let eos = &model.config.eos_token_ids;
    let guard = SchemaGuard::new(tok.clone(), vec![Some(names)], eos);
    let ids = greedy_batch(&model, None, &[tok.encode(&prompt).unwrap()], 8, eos, Some((&guard, 0)));
    let guarded = tok.decode(&ids[0]).unwrap();
    assert_ne!(guarded, want, "the guard changed nothing");
    let out = ask(&[]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{}\n", guarded.trim())));
    assert_eq!(std::fs::read(&db).unwrap(), before);
}

#[test]
fn train_without_data_uses_the_bundled_shop_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Llama).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
        // The tiny tokenizer is byte-level: a shop prompt is ~1100 tokens (a BPE vocabulary gives ~300).
        .args([
            "--max-steps",
            "1",
            "--batch",
            "2",
            "--lora-r",
            "4",
            "--max-seq-len",
            "4096",
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("bundled shop dataset"), "{err}");
    assert!(
        err.contains("evaluating: validation loss on"),
        "evaluations are announced: {err}"
    );
    for f in [
        "data/shop.sqlite",
        "data/train.jsonl",
        "data/val.jsonl",
        "adapter_model.safetensors",
        "checkpoint-000001",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(
        log.contains("\"eval_loss\""),
        "the last step reports validation loss: {log}"
    );
}

#[test]
fn predict_writes_one_sql_per_example_that_eval_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = (dir.path().join("model"), dir.path().join("data"));
    write_tiny_model(&model, TinyVariant::Qwen2).unwrap();
    let out = sqlora(&[
        "prepare",
        "shop",
        "--out",
        data.to_str().unwrap(),
        "--per-template",
        "1",
    ]);
    assert!(out.status.success());
    // Three validation questions are enough to exercise the contract.
    let val = data.join("train.jsonl");
    let three: Vec<String> = std::fs::read_to_string(&val)
        .unwrap()
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    std::fs::write(&val, three.join("\n") + "\n").unwrap();
    let pred = dir.path().join("pred.jsonl");
    let (m, v, p) = (model.to_str().unwrap(), val.to_str().unwrap(), pred.to_str().unwrap());
    let predict = |max_new: &str, more: &[&str]| {
        let args = [
            "predict",
            "--model",
            m,
            "--data",
            v,
            "--out",
            p,
            "--max-new-tokens",
            max_new,
        ];
        sqlora(&[&args[..], more].concat())
    };
    let out = predict("6", &["--device", "reference"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read_lines = || -> Vec<serde_json::Value> {
        (std::fs::read_to_string(&pred).unwrap().lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let greedy_lines = read_lines();
    assert_eq!(greedy_lines.len(), 3);
    let out = sqlora(&["eval", "--data", v, "--pred", p, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["n"], 3);
    assert_eq!(r["execution_accuracy"], 0.0, "a random model answers nothing right");
    // The device path (batched generation with a KV cache; here on the CPU with bf16 storage).
    let out = predict("6", &["--device", "cpu-bf16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("CPU, bf16 storage"), "{err}");
    assert_eq!(std::fs::read_to_string(&pred).unwrap().lines().count(), 3);

    // Execution-guided: three candidates per question, the greedy answer first; the line's SQL is
    // the chosen one, and eval reads the file as any other.
    let out = predict("6", &["--candidates", "3", "--device", "reference"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (line, g) in read_lines().iter().zip(&greedy_lines) {
        let c = line["candidates"].as_array().unwrap();
        assert_eq!((c.len(), &c[0]), (3, &g["sql"]), "{line}");
        assert_eq!(line["sql"], c[line["chosen"].as_u64().unwrap() as usize]);
        assert!(line["runnable"].as_u64().unwrap() <= 3 && line["votes"].as_u64() <= line["runnable"].as_u64());
    }
    let out = sqlora(&["eval", "--data", v, "--pred", p, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Candidates need each question's database: without one, the error names the line, and
    // nothing is written.
    let nodb = dir.path().join("nodb.jsonl");
    let line = r#"{"instruction":"How many singers?","input":"singer(id INT)","output":"SELECT 1"}"#;
    std::fs::write(&nodb, format!("{line}\n")).unwrap();
    let lost = dir.path().join("lost.jsonl");
    let (n, l) = (nodb.to_str().unwrap(), lost.to_str().unwrap());
    let out = sqlora(&["predict", "--model", m, "--data", n, "--out", l, "--candidates", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nodb.jsonl:1") && err.contains("database"),
        "{err}"
    );
    assert!(!lost.exists());

    // In the model's chat format: each line is the first statement of the greedy answer to the
    // ChatML conversation, stopped at EOS or the end of the turn.
    let out = predict("12", &["--prompt", "chat", "--device", "reference"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (tok, tiny) = (
        sqlora::load::open(&model).unwrap().tokenizer().unwrap(),
        Model::load(&model).unwrap(),
    );
    let format = ChatFormat::of(&tok).unwrap();
    assert_eq!(format, ChatFormat::ChatMl);
    let mut stops = tiny.config.eos_token_ids.clone();
    stops.push(tok.token_id("<|im_end|>").unwrap());
    let examples = sqlora::sql::data::read_jsonl(&val).unwrap();
    let lines: Vec<serde_json::Value> = (std::fs::read_to_string(&pred).unwrap().lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (e, line) in examples.iter().zip(&lines) {
        let ids = tok.encode(&format.prompt(&e.instruction, &e.input)).unwrap();
        assert_eq!(
            ids.iter().filter(|&&t| Some(t) == tok.token_id("<|im_start|>")).count(),
            3
        );
        let answer = tok.decode(&greedy(&tiny, None, &ids, 12, &stops)).unwrap();
        assert_eq!(line["sql"], extract_sql(answer.trim()), "{answer:?}");
    }
}

#[test]
fn predict_chat_needs_a_known_chat_format() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    // The tiny llama's tokenizer has only <s>, </s> and <pad>: no chat markers.
    write_tiny_model(&model, TinyVariant::Llama).unwrap();
    let data = dir.path().join("val.jsonl");
    let line = r#"{"instruction":"How many singers?","input":"singer(id INT)","output":"SELECT count(*) FROM singer"}"#;
    std::fs::write(&data, format!("{line}\n")).unwrap();
    let out = sqlora(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("pred.jsonl").to_str().unwrap(),
        "--prompt",
        "chat",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no chat format"), "{err}");
    assert!(!dir.path().join("pred.jsonl").exists());
}
