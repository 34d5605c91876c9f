//! Bad input is refused with an error that names the file, field or tensor: no panic, and no
//! partial output left behind.

use serde_json::{json, Value};
use sqlora::load::config::ModelConfig;
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{tiny_adapter, write_tiny_model, TinyVariant};
use std::path::Path;
use std::process::Command;

/// Exit code and stderr of one of the binaries.
fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn sqlora(args: &[&str]) -> (Option<i32>, String) {
    run(env!("CARGO_BIN_EXE_sqlora"), args)
}

/// A change to a JSON file.
type Edit = fn(&mut Value);

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_tokenizer_with_ids_past_the_embedding_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    // vocab_size is 272: a token with id 300 would index past the embedding table.
    edit_json(&dir.path().join("tokenizer.json"), |t| {
        t["model"]["vocab"]["zzz"] = json!(300)
    });
    let (code, err) = sqlora(&["ask", "--model", s(dir.path()), "--device", "reference", "hi"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("\"zzz\" with id 300") && err.contains("vocabulary of 272"),
        "{err}"
    );
}

#[test]
fn an_adapter_that_does_not_fit_the_model_is_refused_naming_what() {
    let config = |v: TinyVariant| {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), v).unwrap();
        ModelConfig::from_file(&dir.path().join("config.json")).unwrap()
    };
    let c = config(TinyVariant::Llama);
    let saved = || {
        let d = tempfile::tempdir().unwrap();
        tiny_adapter(TinyVariant::Llama).save_peft(d.path(), "tiny").unwrap();
        d
    };
    let refused = |d: &tempfile::TempDir| format!("{:#}", LoraParams::load_peft(d.path(), &c).unwrap_err());
    assert!(LoraParams::load_peft(saved().path(), &c).is_ok());

    let cases: [(Edit, &str); 8] = [
        (|v| v["r"] = json!(0), "\"r\" must be a whole number"),
        (|v| v["r"] = json!(4.7), "\"r\" must be a whole number"),
        (|v| v["r"] = json!(1e18), "\"r\" must be a whole number"),
        (|v| v["use_dora"] = json!(true), "use_dora = true is not supported"),
        (|v| v["layers_to_transform"] = json!([0]), "layers_to_transform"),
        (|v| v["target_modules"] = json!([]), "unsupported target_modules"),
        (|v| v["target_modules"] = json!(["q_proj", 3]), "not a name"),
        // The file holds all seven projections: six of them are then unaccounted for.
        (|v| v["target_modules"] = json!(["q_proj"]), "is not one this model"),
    ];
    for (edit, want) in cases {
        let d = saved();
        edit_json(&d.path().join("adapter_config.json"), edit);
        let err = refused(&d);
        assert!(err.contains(want) && err.contains("adapter_"), "{want}: {err}");
    }

    // A non-finite value: the tensor is named.
    let d = tempfile::tempdir().unwrap();
    let mut lora = tiny_adapter(TinyVariant::Llama);
    let at = lora.data.len() - 1;
    lora.data[at] = f32::NAN;
    lora.save_peft(d.path(), "tiny").unwrap();
    let err = refused(&d);
    assert!(err.contains("lora_B") && err.contains("NaN"), "{err}");
    // Another model's adapter (other widths): the first tensor of another shape is named.
    let err = format!(
        "{:#}",
        LoraParams::load_peft(saved().path(), &config(TinyVariant::Qwen2)).unwrap_err()
    );
    assert!(
        err.contains("k_proj.lora_B.weight") && err.contains("has shape [32, 4]"),
        "{err}"
    );
}

#[test]
fn merge_and_prepare_leave_nothing_behind_when_they_fail() {
    let (base, adapter, parent) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    write_tiny_model(base.path(), TinyVariant::Llama).unwrap();
    tiny_adapter(TinyVariant::Llama)
        .save_peft(adapter.path(), "tiny")
        .unwrap();
    std::fs::remove_file(base.path().join("tokenizer.json")).unwrap();
    let out = parent.path().join("merged");
    let merge = |out: &Path| {
        sqlora(&[
            "merge",
            "--model",
            s(base.path()),
            "--adapter",
            s(adapter.path()),
            "--out",
            s(out),
        ])
    };
    let (code, err) = merge(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("tokenizer.json is missing"), "{err}");
    assert_eq!(
        std::fs::read_dir(parent.path()).unwrap().count(),
        0,
        "no output, no staging directory"
    );

    // Another run's output is replaced; a directory holding anything else is refused and kept.
    write_tiny_model(base.path(), TinyVariant::Llama).unwrap();
    for _ in 0..2 {
        let (code, err) = merge(&out);
        assert_eq!(code, Some(0), "{err}");
    }
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (code, err) = merge(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("notes.txt, which this command does not write"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert!(out.join("model.safetensors").exists());
    std::fs::remove_dir_all(&out).unwrap();

    // Held-out databases without a file for them: refused before anything is read or written.
    let train = parent.path().join("train.jsonl");
    let (code, err) = sqlora(&[
        "prepare",
        "spider",
        "--spider-dir",
        s(parent.path()),
        "--split",
        "train",
        "--out",
        s(&train),
        "--holdout-dbs",
        "2",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--val-out"), "{err}");
    assert!(!train.exists());

    // Answers that could not be written are refused before any is generated.
    let data = parent.path().join("q.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"q\", \"input\": \"\", \"output\": \"SELECT 1\"}\n",
    )
    .unwrap();
    let pred = parent.path().join("no/such/dir/pred.jsonl");
    let (code, err) = sqlora(&[
        "predict",
        "--model",
        s(base.path()),
        "--data",
        s(&data),
        "--out",
        s(&pred),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no/such/dir") && err.contains("does not exist"), "{err}");
}

#[test]
fn validation_databases_are_opened_before_training_starts() {
    let (model, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_tiny_model(model.path(), TinyVariant::Qwen2).unwrap();
    let example = |db: &Path| json!({"instruction": "How many?", "input": "t(a)", "output": "SELECT 1", "db_path": db});
    let write = |name: &str, db: &Path| {
        let p = work.path().join(name);
        std::fs::write(&p, format!("{}\n", example(db))).unwrap();
        p
    };
    let not_sqlite = work.path().join("notes.sqlite");
    std::fs::write(
        &not_sqlite,
        "not a database, but long enough to have a header of 100 bytes ".repeat(4),
    )
    .unwrap();
    let cases = [
        (
            write("missing.jsonl", &work.path().join("nowhere.sqlite")),
            "nowhere.sqlite does not exist",
        ),
        (
            write("text.jsonl", &not_sqlite),
            "notes.sqlite is not a SQLite database",
        ),
    ];
    let data = write("train.jsonl", &not_sqlite);
    for (val, want) in cases {
        let out = work.path().join("run");
        let (code, err) = run(
            env!("CARGO_BIN_EXE_train"),
            &[
                "--model",
                s(model.path()),
                "--data",
                s(&data),
                "--val",
                s(&val),
                "--out",
                s(&out),
                "--max-steps",
                "3",
                "--device",
                "reference",
            ],
        );
        assert_eq!(code, Some(1), "{err}");
        let file = val.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(want) && err.contains(file), "{want}: {err}");
        let checkpoints = std::fs::read_dir(&out).map_or(0, |d| d.count());
        assert_eq!(checkpoints, 0, "refused before the first step: {err}");
    }
}

#[test]
fn malformed_schemas_and_logits_are_errors_or_fallbacks_not_panics() {
    // A Spider foreign key on the `*` column (table -1), and one past the columns.
    let entry = |fk: Value| {
        json!({"db_id": "shop", "table_names_original": ["item"], "column_types": ["text", "number"],
               "column_names_original": [[-1, "*"], [0, "id"]], "primary_keys": [1], "foreign_keys": [fk]})
    };
    for fk in [json!([0, 1]), json!([1, 9])] {
        let err = format!(
            "{:#}",
            sqlora::sql::schema::Schema::from_spider_tables(&entry(fk)).unwrap_err()
        );
        assert!(err.contains("tables.json entry shop: foreign key 0"), "{err}");
    }
    // Sampling from logits that are all NaN (a broken adapter) answers as argmax does.
    let sampling = sqlora::model::generate::Sampling {
        temperature: 0.7,
        top_p: 0.95,
        seed: 1,
        first: 0,
    };
    let nan = vec![f32::NAN; 5];
    assert_eq!(
        sampling.draw(&nan, &mut sampling.rng(0, 1)),
        sqlora::model::generate::argmax(&nan)
    );
    // A byte-order mark before the first line of a JSONL file is not an error.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bom.jsonl");
    std::fs::write(
        &p,
        "\u{feff}{\"instruction\": \"q\", \"input\": \"\", \"output\": \"SELECT 1\"}\n",
    )
    .unwrap();
    assert_eq!(sqlora::sql::data::read_jsonl(&p).unwrap().len(), 1);
}
