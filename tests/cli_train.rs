//! The `train` binary and `sqlora bench` from the outside: configuration files, dry runs, bad
//! input, Ctrl-C and resume, device choices, and the benchmarks' reports.

use sqlora::load::tokenizer::Tokenizer;
use sqlora::model::forward::Model;
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{write_tiny_model, TinyVariant};
use std::process::Command;

fn sqlora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sqlora")).args(args).output().unwrap()
}

#[test]
fn train_reads_a_toml_config_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Qwen2).unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/singers.jsonl"), &data).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = {:?}\nmax_steps = 2\nbatch = 2\nlora-r = 4\nlr = 0.5\nwarmup = 0\n\
             schedule = \"constant\"\ntargets = [\"q_proj\", \"v_proj\"]\nno_nf4 = true\n",
            model.display().to_string(),
            data.display().to_string()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_train"))
            .args(["--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--lr", "0.001"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lrs: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64())
        .collect();
    assert_eq!(lrs.len(), 2);
    assert!(
        lrs.iter().all(|&lr| (lr - 0.001).abs() < 1e-9),
        "the flag wins over the file: {lrs:?}"
    );
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter["r"], 4);
    assert_eq!(adapter["target_modules"], serde_json::json!(["q_proj", "v_proj"]));

    std::fs::write(&config, "lora_rank = 8\n").unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("run.toml") && err.contains("unknown option \"lora_rank\""),
        "{err}"
    );
}

#[test]
fn dry_run_prints_the_plan_and_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    let m = dir.path().to_str().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--model", m, "--data", "unused.jsonl", "--out", "unused", "--dry-run"])
        .args(["--device", "reference"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for part in [
        "frozen linear weights",
        "adapter + AdamW state",
        "activations",
        "total",
        "tokens/s",
        "fits",
    ] {
        assert!(text.contains(part), "{part} missing from:\n{text}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_train"))
        .args([
            "--model",
            m,
            "--data",
            "x",
            "--out",
            "x",
            "--dry-run",
            "--batch",
            "64",
            "--max-seq-len",
            "4096",
        ])
        .args(["--memory-budget", "0.2", "--device", "reference"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("0.200 GiB are available") && err.contains("--checkpointing"),
        "{err}"
    );
}

#[test]
fn train_reports_bad_inputs_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Qwen2).unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"q\", \"output\": \"SELECT 1\"}\n{\"instruction\": \"q\"\n",
    )
    .unwrap();
    let train = |m: &str| {
        Command::new(env!("CARGO_BIN_EXE_train"))
            .args([
                "--model",
                m,
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let o = train(model.to_str().unwrap());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad.jsonl:2"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A model path that is neither a directory nor a .gguf file says so, for either spelling.
    for name in ["no-such-model", "no-such-model.gguf"] {
        let o = train(dir.path().join(name).to_str().unwrap());
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("{name}: no such model directory or .gguf file")),
            "{err}"
        );
    }
}

#[test]
fn ctrl_c_checkpoints_and_resume_finishes_the_run() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Qwen2).unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/singers.jsonl");
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "--model",
            model.to_str().unwrap(),
            "--data",
            data,
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(
            [
                "--max-steps",
                "400",
                "--batch",
                "2",
                "--lora-r",
                "4",
                "--sql-eval-samples",
                "0",
            ]
            .map(String::from),
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args(&[]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way, then interrupt it as a terminal's Ctrl-C would.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step     3/") {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("resume with --resume")), "{rest:?}");
    let ckpt = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("checkpoint-"))
        .expect("a checkpoint written on interrupt");
    let stopped_at: usize = ckpt["checkpoint-".len()..].parse().unwrap();
    assert!((3..400).contains(&stopped_at), "{ckpt}");
    // Resume finishes the run from there.
    let o = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args(&["--resume"]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("resumed from") && err.contains(&format!("at step {stopped_at}")),
        "{err}"
    );
    assert!(out.join("checkpoint-000400").exists() && out.join("adapter_model.safetensors").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"loss\"")).count(),
        400,
        "one line per step, none twice"
    );
}

#[test]
fn init_adapter_starts_from_an_adapter_and_refuses_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, TinyVariant::Llama).unwrap();
    let train = |out: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_train"))
            .args([
                "--model",
                model.to_str().unwrap(),
                "--out",
                dir.path().join(out).to_str().unwrap(),
            ])
            .args([
                "--device",
                "reference",
                "--max-steps",
                "2",
                "--batch",
                "1",
                "--lora-r",
                "4",
            ])
            .args(["--max-seq-len", "4096", "--sql-eval-samples", "0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = train("first", &["--lr", "0.01", "--warmup", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = dir.path().join("first");
    let config = Model::load_dir(&model).unwrap().config;
    let weights = |run: &str| LoraParams::load_peft(&dir.path().join(run), &config).unwrap().data;
    // Largest difference between two runs' adapters.
    let diff = |a: &str, b: &str| (weights(a).iter().zip(weights(b))).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    // With a vanishing learning rate nothing moves: the run writes the adapter it started from.
    let o = train("same", &["--init-adapter", first.to_str().unwrap(), "--lr", "1e-30"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("adapters start from"), "{err}");
    assert!(diff("same", "first") < 1e-6, "{}", diff("same", "first"));
    // Trained further, it moves away; a fresh start that does not move is another adapter.
    let o = train(
        "further",
        &[
            "--init-adapter",
            first.to_str().unwrap(),
            "--lr",
            "0.01",
            "--warmup",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(diff("further", "first") > 1e-4);
    let o = train("fresh", &["--lr", "1e-30"]);
    assert!(o.status.success());
    assert!(diff("fresh", "first") > 1e-4);
    // Another rank: refused, naming both layouts.
    let o = train("other", &["--init-adapter", first.to_str().unwrap(), "--lora-r", "8"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--init-adapter") && err.contains("rank 4") && err.contains("rank 8"),
        "{err}"
    );
}

#[test]
fn train_device_choices() {
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Qwen2Tied).unwrap();
    let train = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_train"))
            .args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--device", device, "--max-steps", "1", "--batch", "1", "--lora-r", "4"])
            .args(["--max-seq-len", "4096"])
            .output()
            .unwrap()
    };
    // The device step on the CPU trains and writes the same files.
    let o = train("cpu-bf16");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("device: CPU, bf16 storage"), "{err}");
    assert!(out.join("adapter_model.safetensors").exists());
    // An unknown device is named; without a GPU, asking for one says why it cannot be used.
    let o = train("tpu");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown device \"tpu\""));
    if let Some(why) = sqlora::engine::cuda::unavailable() {
        let o = train("cuda");
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        // A build without kernels says what to install; otherwise the driver's reason.
        let why = match sqlora::engine::cuda::kernels::KERNELS_BUILT {
            false => sqlora::sql::device::kernels_hint(),
            true => why,
        };
        assert!(err.contains("--device cuda") && err.contains(&why), "{err}");
    }
}

#[test]
fn bench_train_times_steps_of_a_named_shape() {
    let out = sqlora(&[
        "bench", "train", "--shape", "tiny", "--batch", "2", "--seq", "24", "--steps", "2", "--warmup", "1",
        "--device", "cpu-bf16", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tokens_per_s"].as_f64().map(|v| v > 0.0), Some(true), "{r}");
    assert_eq!(r["timed_steps"], 2);
    // Random weights and tokens: the loss is about ln(vocab) = ln(272) = 5.6.
    let loss = r["loss"].as_f64().unwrap();
    assert!((loss - 272f64.ln()).abs() < 1.0, "loss {loss}");
    assert!(r.get("profile").is_none(), "{r}");
    assert_eq!(r["labels"], 23, "every position with a next token");
    // --labels N: only each sequence's last N tokens are targets (instruction tuning's shape);
    // the head's unlabelled work is not counted as useful FLOPs.
    let some = sqlora(&[
        "bench", "train", "--shape", "tiny", "--batch", "2", "--seq", "24", "--labels", "5", "--steps", "2",
        "--warmup", "1", "--device", "cpu-bf16", "--json",
    ]);
    assert!(some.status.success(), "{}", String::from_utf8_lossy(&some.stderr));
    let s: serde_json::Value = serde_json::from_slice(&some.stdout).unwrap();
    assert_eq!(s["labels"], 5);
    let per_token = |r: &serde_json::Value| {
        r["mfu"].as_f64().unwrap() * r["peak_flops"].as_f64().unwrap() / r["tokens_per_s"].as_f64().unwrap()
    };
    assert!(per_token(&s) < per_token(&r), "{} vs {}", per_token(&s), per_token(&r));
    // --profile runs as many steps again with per-kernel timing: the CPU device times no kernels,
    // and says so.
    let out = sqlora(&[
        "bench",
        "train",
        "--shape",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "24",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu-bf16",
        "--profile",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("per-kernel times: not available on this device"),
        "{text}"
    );
    let bad = sqlora(&["bench", "train", "--shape", "gpt-5", "--device", "cpu-bf16"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown shape \"gpt-5\""));
}

#[test]
fn bench_generate_times_decoding() {
    let out = sqlora(&[
        "bench",
        "generate",
        "--shape",
        "tiny",
        "--batch",
        "3",
        "--prompt",
        "16",
        "--new-tokens",
        "8",
        "--device",
        "cpu-bf16",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["batch"], 3);
    assert_eq!(r["weights"], "random");

    // A model's own file instead of a shape (the comparison with llama.cpp reads the same file).
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    let path = dir.path().to_str().unwrap();
    let args = [
        "bench",
        "generate",
        "--model",
        path,
        "--prompt",
        "9",
        "--new-tokens",
        "4",
    ];
    let out = sqlora(&[&args[..], &["--device", "cpu", "--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["weights"].as_str(), r["shape"].as_str()),
        (Some("file"), Some(path)),
        "{r}"
    );
    assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // Decoding against the CPU's read bandwidth: the weights a step reads (NF4 projections, the
    // tiny model's bf16 head [272, 64]), and the bandwidth measured.
    assert!(r["decode_weight_bytes"].as_u64().unwrap() > 2 * 272 * 64, "{r}");
    assert!(r["read_bandwidth"].as_f64().unwrap() > 1e8, "{r}");
    assert!(r["bandwidth_source"].as_str().unwrap().contains("measured"), "{r}");
    let both = sqlora(&[&args[..], &["--shape", "tiny"]].concat());
    assert_eq!(both.status.code(), Some(2), "--shape and --model together are refused");
}

#[test]
fn a_memory_budget_that_only_checkpointing_meets_turns_it_on() {
    use sqlora::engine::plan::{plan, PlanInput};
    let dir = tempfile::tempdir().unwrap();
    let (model, out) = (dir.path().join("model"), dir.path().join("run"));
    write_tiny_model(&model, TinyVariant::Llama).unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/singers.jsonl");
    // The plan as train computes it: micro-batch 2, r 4 on all projections, the longest example.
    let tok = Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let m = Model::load_dir(&model).unwrap();
    let eos = m.config.eos_token_ids[0];
    let examples = sqlora::sql::data::read_jsonl(std::path::Path::new(data)).unwrap();
    let longest = (examples.iter())
        .map(|e| sqlora::sql::data::encode(&tok, e, eos).unwrap().tokens.len())
        .max()
        .unwrap();
    let input = |checkpointing| PlanInput {
        lora_r: 4,
        lora_targets: sqlora::load::arch::Proj::ALL.to_vec(),
        micro_batch: 2,
        max_seq_len: longest,
        checkpointing,
        nf4: true,
        threads: rayon::current_num_threads(),
        device: false,
    };
    let (without, with) = (
        plan(&m.config, &input(false)).total(),
        plan(&m.config, &input(true)).total(),
    );
    let budget = (with + without) as f64 / 2.0 / (1u64 << 30) as f64;
    let o = Command::new(env!("CARGO_BIN_EXE_train"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--data",
            data,
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--device",
            "reference",
            "--max-steps",
            "1",
            "--batch",
            "2",
            "--lora-r",
            "4",
        ])
        .args(["--memory-budget", &format!("{budget:.12}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("turning it on"), "{err}");
}
