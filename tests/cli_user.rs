//! What a user sees from the command line: the step line with elapsed time and ETA, the grouped
//! `--help`, no GPU talk on a machine without one, `train` without `--model`, and the checkpoints
//! a run keeps.

mod common;

use sqlora::model::tiny::{write_tiny_model, TinyVariant};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/singers.jsonl")
}

#[test]
fn each_step_line_shows_the_time_run_and_the_time_left() {
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Qwen2).unwrap();
    let o = train(
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            examples().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "5",
            "--save-every",
            "1",
            "--save-total-limit",
            "2",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let steps: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 5, "{err}");
    for (k, line) in steps.iter().enumerate() {
        let elapsed = line.split("  ").find(|f| f.ends_with(" elapsed"));
        assert!(
            elapsed.is_some_and(|e| e.trim_end_matches(" elapsed").ends_with('s')),
            "{line}"
        );
        // Every step but the last says how long is left.
        assert_eq!(line.contains("  ETA "), k < 4, "{line}");
    }
    // Without validation data nothing is evaluated, and nothing says it is.
    assert!(!err.contains("evaluating"), "{err}");
    // Without a GPU, no word about CUDA or nvcc.
    if !sqlora::sql::device::gpu_present() {
        assert!(!err.contains("nvcc") && !err.contains("CUDA"), "{err}");
    }
    // --save-total-limit 2 with a checkpoint per step: the last two are kept.
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-000004", "checkpoint-000005"]);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["elapsed_s"].as_f64().is_some_and(|s| s > 0.0), "{last}");
    assert_eq!(last["eta_s"].as_f64(), Some(0.0), "{last}");
}

#[test]
fn help_groups_the_options_and_shows_the_defaults() {
    let o = train(&["--help"], &[]);
    let help = String::from_utf8_lossy(&o.stdout);
    let headings: Vec<&str> = help
        .lines()
        .filter(|l| l.ends_with(':') && !l.starts_with(' '))
        .collect();
    assert_eq!(
        headings,
        [
            "Options:",
            "Data:",
            "Model:",
            "LoRA:",
            "Schedule:",
            "Evaluation:",
            "Output and checkpoints:",
            "Device and memory:"
        ],
        "{help}"
    );
    let section = |name: &str| {
        help.split(name)
            .nth(1)
            .unwrap()
            .split("\n\n")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(section("LoRA:").contains("--lora-r") && section("LoRA:").contains("[default: 16]"));
    assert!(section("Schedule:").contains("--lr") && section("Schedule:").contains("[default: 0.0002]"));
    assert!(section("Model:").contains("[default: smollm2"), "{help}");
    let out = section("Output and checkpoints:");
    assert!(
        out.contains("--save-total-limit") && out.contains("[default: 3]"),
        "{out}"
    );
    // The toolbox groups its longest command's options too.
    let o = Command::new(env!("CARGO_BIN_EXE_sqlora"))
        .args(["predict", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for h in ["Data:", "Model:", "Decoding:", "Device:"] {
        assert!(help.contains(&format!("\n{h}\n")), "{h}: {help}");
    }
}

#[test]
fn predict_and_eval_say_nothing_of_cuda_without_a_gpu() {
    if sqlora::sql::device::gpu_present() {
        return; // on a GPU machine the hint (or the GPU) is what a user should see
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, TinyVariant::Qwen2).unwrap();
    let pred = dir.path().join("pred.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_sqlora"))
        .args(["predict", "--model", model.to_str().unwrap(), "--data"])
        .args([examples().to_str().unwrap(), "--out", pred.to_str().unwrap()])
        .args(["--max-new-tokens", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(std::fs::read_to_string(&pred).unwrap().lines().count(), 8);
    assert!(!err.contains("nvcc") && !err.contains("CUDA"), "{err}");
}

/// `train` with no `--model` runs on SmolLM2-135M-Instruct from the cache (here a copy of the
/// test model, so that nothing is downloaded; the file is checked against its SHA-256 first).
#[test]
fn train_without_a_model_uses_smollm2_from_the_cache() {
    let Some(models) = std::env::var_os("SQLORA_TEST_MODELS").map(PathBuf::from) else {
        common::missing("SQLORA_TEST_MODELS is not set (the SmolLM2 GGUF for the default model)");
        return;
    };
    let file = sqlora::load::fetch::known("smollm2").unwrap().file;
    let cache = tempfile::tempdir().unwrap();
    std::fs::copy(models.join(file), cache.path().join(file)).unwrap();
    let out = cache.path().join("run");
    let o = train(
        &["--out", out.to_str().unwrap(), "--dry-run"],
        &[("SQLORA_CACHE", cache.path())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no --model: using SmolLM2-135M-Instruct"), "{err}");
    assert!(err.contains("checksum verified"), "{err}");
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(plan.contains("memory plan"), "{plan}");
    // A damaged cached file is not used: it would be fetched again (here, from nowhere).
    std::fs::write(cache.path().join(file), b"not a model").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--out", out.to_str().unwrap(), "--dry-run"])
        .env("SQLORA_CACHE", cache.path())
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("ALL_PROXY", "http://127.0.0.1:9")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is not the expected"), "{err}");
    assert!(!cache.path().join(file).exists(), "the damaged file is gone");
}
