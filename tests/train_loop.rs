//! The training loop on the CPU: gradient accumulation, exact resume, memorisation, and failures.

mod common;
use common::rel_err;

use sqlora::load::tokenizer::Tokenizer;
use sqlora::model::forward::Model;
use sqlora::model::lora::LoraConfig;
use sqlora::model::optim::Decay;
use sqlora::model::tiny::{write_tiny_model, TinyVariant};
use sqlora::sql::data::{encode, read_jsonl, Encoded, Example};
use sqlora::train::{StepReport, TrainConfig, Trainer};
use std::path::Path;

const QUESTIONS: [(&str, &str); 8] = [
    ("How many singers are there?", "SELECT count(*) FROM singer"),
    ("List all singer names.", "SELECT name FROM singer"),
    ("What is the average age of singers?", "SELECT avg(age) FROM singer"),
    (
        "Show names of singers older than 30.",
        "SELECT name FROM singer WHERE age > 30",
    ),
    (
        "Which singer is the oldest?",
        "SELECT name FROM singer ORDER BY age DESC LIMIT 1",
    ),
    (
        "Count concerts per stadium.",
        "SELECT stadium_id, count(*) FROM concert GROUP BY stadium_id",
    ),
    ("List stadium names.", "SELECT name FROM stadium"),
    ("What is the largest capacity?", "SELECT max(capacity) FROM stadium"),
];

fn examples() -> Vec<Example> {
    QUESTIONS
        .iter()
        .map(|(q, sql)| Example {
            instruction: q.to_string(),
            input: "singer(singer_id, name, age)\nstadium(stadium_id, name, capacity)".into(),
            output: sql.to_string(),
            db_id: None,
            db_path: None,
        })
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    model_dir: std::path::PathBuf,
    data: Vec<Encoded>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_tiny_model(&model_dir, TinyVariant::Qwen2).unwrap();
    let tok = Tokenizer::from_file(&model_dir.join("tokenizer.json")).unwrap();
    let model = Model::load_dir(&model_dir).unwrap();
    let eos = model.config.eos_token_ids[0];
    let data = examples().iter().map(|e| encode(&tok, e, eos).unwrap()).collect();
    Setup {
        _dir: dir,
        model_dir,
        data,
    }
}

fn config(micro_batch: usize, grad_accum: usize) -> TrainConfig {
    TrainConfig {
        lora: LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
            ..Default::default()
        },
        lr: 5e-3,
        warmup_steps: 2,
        decay: Decay::Cosine,
        max_steps: Some(6),
        micro_batch,
        grad_accum,
        seed: 3,
        ..Default::default()
    }
}

/// The recipe that makes the tiny model memorise the eight examples: 100 steps at lr 1e-2, r 16.
fn memorising_config() -> TrainConfig {
    let mut c = config(4, 1);
    c.lora = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        ..Default::default()
    };
    c.lr = 1e-2;
    c.max_steps = Some(100);
    c
}

fn trainer(s: &Setup, c: TrainConfig, out: &Path) -> Trainer {
    let model = Model::load_dir(&s.model_dir).unwrap().quantize_nf4();
    Trainer::new(model, s.data.clone(), s.data[..2].to_vec(), c, out, "tiny").unwrap()
}

fn run(t: &mut Trainer, until: usize) -> Vec<StepReport> {
    let mut reports = Vec::new();
    t.run(until, &|| false, &mut |r, _| reports.push(r.clone())).unwrap();
    reports
}

#[test]
fn encoding_masks_everything_but_the_sql_and_eos() {
    let s = setup();
    let tok = Tokenizer::from_file(&s.model_dir.join("tokenizer.json")).unwrap();
    let e = &s.data[1];
    let sql = tok.encode_plain("SELECT name FROM singer").unwrap();
    assert_eq!(e.labels(), sql.len() + 1, "the SQL tokens and EOS carry the loss");
    let labelled: Vec<u32> = e.targets.iter().flatten().copied().collect();
    assert_eq!(&labelled[..sql.len()], &sql[..]);
    assert_eq!(*labelled.last().unwrap(), *e.tokens.last().unwrap());
    assert_eq!(e.targets.last(), Some(&None));
}

#[test]
fn gradient_accumulation_2x2_equals_one_batch_of_4() {
    accumulation_matches_one_batch(false);
}

#[test]
fn on_the_device_engine_gradient_accumulation_2x2_equals_one_batch_of_4() {
    accumulation_matches_one_batch(true);
}

/// Without dropout (its masks are drawn per micro-batch), two micro-batches of 2 and one of 4 see the
/// same examples and normalise by the same label count: the same update up to summation order.
fn accumulation_matches_one_batch(device: bool) {
    let s = setup();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let make = |m, g, out: &Path| {
        let mut c = config(m, g);
        c.lora.dropout = 0.0;
        if device {
            device_trainer(&s, c, out)
        } else {
            trainer(&s, c, out)
        }
    };
    let mut a = make(2, 2, d1.path());
    let mut b = make(4, 1, d2.path());
    let (ra, rb) = (run(&mut a, 3), run(&mut b, 3));
    for (x, y) in ra.iter().zip(&rb) {
        assert!(
            (x.loss - y.loss).abs() < 1e-5 * x.loss,
            "step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert_eq!(x.labels, y.labels);
    }
    let err = rel_err(&a.lora.data, &b.lora.data);
    assert!(err < 1e-5, "parameters differ: relative {err:e}");
}

#[test]
fn resume_reproduces_the_uninterrupted_run_exactly() {
    let s = setup();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = trainer(&s, config(2, 2), d1.path());
    let straight = run(&mut whole, 6);

    let mut first = trainer(&s, config(2, 2), d2.path());
    let mut losses: Vec<f64> = run(&mut first, 3).iter().map(|r| r.loss).collect();
    drop(first); // the process "dies" after its checkpoint at step 3
    let mut second = trainer(&s, config(2, 2), d2.path());
    let ckpt = second.latest_checkpoint().expect("a checkpoint at step 3");
    assert!(ckpt.ends_with("checkpoint-000003"));
    second.resume_from(&ckpt).unwrap();
    losses.extend(run(&mut second, 6).iter().map(|r| r.loss));

    assert_eq!(losses, straight.iter().map(|r| r.loss).collect::<Vec<_>>());
    assert_eq!(second.lora.data, whole.lora.data);
    let log = std::fs::read_to_string(d2.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.contains("\"loss\"")).count(),
        6,
        "one log line per step"
    );
}

#[test]
fn resume_refuses_a_checkpoint_from_other_settings() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer(&s, config(2, 2), d.path());
    run(&mut t, 2);
    let mut other = config(2, 2);
    other.lr = 1e-3;
    let mut u = trainer(&s, other, d.path());
    let err = format!("{:#}", u.resume_from(&t.latest_checkpoint().unwrap()).unwrap_err());
    assert!(err.contains("other training data or settings"), "{err}");
}

#[test]
fn resume_takes_the_highest_step_and_refuses_a_corrupted_checkpoint() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer(&s, config(2, 2), d.path());
    run(&mut t, 2);
    let ckpt = t.latest_checkpoint().unwrap();
    // By step as a number, not as text; names that are not checkpoint-<step> directories are no
    // checkpoint at all.
    let later = d.path().join("checkpoint-1000000");
    std::fs::create_dir(&later).unwrap();
    std::fs::create_dir(d.path().join("checkpoint-zzz")).unwrap();
    std::fs::write(d.path().join("checkpoint-2000000"), b"a file").unwrap();
    assert_eq!(t.latest_checkpoint().unwrap(), later);
    std::fs::remove_dir(&later).unwrap();
    assert_eq!(t.latest_checkpoint().unwrap(), ckpt);

    let state = ckpt.join("trainer_state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["step"] = serde_json::json!(u64::MAX);
    std::fs::write(&state, v.to_string()).unwrap();
    let mut u = trainer(&s, config(2, 2), d.path());
    let err = format!("{:#}", u.resume_from(&ckpt).unwrap_err());
    assert!(
        err.contains("trainer_state.json") && err.contains("past this run's"),
        "{err}"
    );
}

#[test]
fn a_tiny_model_memorises_a_small_dataset() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let c = memorising_config();
    let mut t = trainer(&s, c, d.path());
    let reports = run(&mut t, 100); // measured: 6.09 -> 0.29
    let (first, last) = (reports[0].loss, reports.last().unwrap().loss);
    assert!(last < first / 10.0, "loss went from {first} to {last}");
    t.save_final().unwrap();
    assert!(d.path().join("adapter_model.safetensors").exists());
    // Curves were drawn at the final checkpoint: an SVG with the loss, validation loss and lr lines
    // (and their legend's samples), and a PNG.
    let svg = std::fs::read_to_string(d.path().join("curves.svg")).unwrap();
    let lines: Vec<&str> = svg.split("<polyline").skip(1).collect();
    for (name, colour) in [
        ("training loss", "#1F77B4"),
        ("validation loss", "#D62728"),
        ("learning rate", "#2CA02C"),
    ] {
        assert!(svg.contains(&format!("\n{name}\n</text>")), "{name}: {svg}");
        assert!(lines.iter().any(|l| l.contains(colour)), "no {name} line: {svg}");
    }
    let png = std::fs::read(d.path().join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn non_finite_losses_skip_steps_and_k_in_a_row_stop_the_run() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let mut c = config(2, 2);
    c.max_bad_steps = 3;
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
    for device in [false, true] {
        let mut t = if device {
            device_trainer(&s, c.clone(), d.path())
        } else {
            trainer(&s, c.clone(), d.path())
        };
        let b = t.lora.slot(0, sqlora::load::arch::Proj::Q).unwrap().b.start;
        t.lora.data[b] = f32::NAN; // poisons every forward from now on
        let before = t.lora.data.clone();
        for step in 1..=2 {
            let r = t.step().unwrap();
            assert!(r.skipped && r.loss.is_nan(), "step {step} is skipped (device {device})");
            t.sync_host().unwrap();
            assert!(same(&t.lora.data, &before), "a skipped step changes nothing");
            assert_eq!(t.opt.step, 0, "no AdamW update (device {device})");
        }
        let err = format!("{:#}", t.step().unwrap_err());
        assert!(
            err.contains("non-finite") && err.contains("step 3") && err.contains("3 steps in a row"),
            "{err}"
        );
        t.sync_host().unwrap();
        assert!(same(&t.lora.data, &before));
    }

    // One good step in between resets the count.
    let mut t = trainer(&s, config(2, 2), d.path());
    let b = t.lora.slot(0, sqlora::load::arch::Proj::Q).unwrap().b.start;
    t.lora.data[b] = f32::NAN;
    assert!(t.step().unwrap().skipped);
    t.lora.data[b] = 0.0;
    assert!(!t.step().unwrap().skipped);
    assert_eq!(t.state.bad_steps, 0);
}

#[test]
fn an_unwritable_output_directory_is_a_clear_error() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("run");
    let model = Model::load_dir(&s.model_dir).unwrap();
    let err = Trainer::new(model, s.data.clone(), vec![], config(2, 1), &out, "tiny")
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains(&out.display().to_string()), "{err:#}");
    // A checkpoint that cannot be written fails the run loudly and leaves no partial directory.
    let mut t = trainer(&s, config(2, 1), d.path());
    std::fs::write(
        d.path().join(".checkpoint-000001.partial"),
        "a file where the directory goes",
    )
    .unwrap();
    let err = t.run(1, &|| false, &mut |_, _| {}).unwrap_err();
    assert!(format!("{err:#}").contains("checkpoint-000001"), "{err:#}");
}

#[test]
fn a_stop_request_checkpoints_and_returns() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer(&s, config(2, 2), d.path());
    let steps = std::cell::Cell::new(0);
    t.run(6, &|| steps.get() >= 2, &mut |_, _| steps.set(steps.get() + 1))
        .unwrap();
    assert_eq!(t.state.step, 2);
    assert!(d.path().join("checkpoint-000002/adapter_model.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "no half-written checkpoint stays behind");
}

#[test]
fn malformed_jsonl_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("train.jsonl");
    let good = serde_json::to_string(&examples()[0]).unwrap();
    std::fs::write(
        &path,
        format!("{good}\n\n{good}\n{{\"instruction\": \"q\", \"output\": 3}}\n"),
    )
    .unwrap();
    let err = format!("{:#}", read_jsonl(&path).unwrap_err());
    assert!(err.contains("train.jsonl:4"), "{err}");
    std::fs::write(
        &path,
        format!("{good}\n{{\"instruction\": \"q\", \"outptu\": \"SELECT 1\"}}\n"),
    )
    .unwrap();
    let err = format!("{:#}", read_jsonl(&path).unwrap_err());
    assert!(err.contains("train.jsonl:2") && err.contains("outptu"), "{err}");
    std::fs::write(&path, "\n").unwrap();
    assert!(format!("{:#}", read_jsonl(&path).unwrap_err()).contains("no examples"));
}

#[test]
fn epochs_are_seeded_permutations_and_length_grouping_sorts_within_groups() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let t = trainer(&s, config(2, 1), d.path());
    let (e0, e1) = (t.epoch_order(0), t.epoch_order(1));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..s.data.len()).collect::<Vec<_>>());
    assert_ne!(e0, e1, "each epoch has its own shuffle");
    assert_eq!(
        e0,
        trainer(&s, config(2, 1), d.path()).epoch_order(0),
        "and it is seeded"
    );
    let mut c = config(2, 1);
    c.group_by_length = true;
    let g = trainer(&s, c, d.path()).epoch_order(0);
    let lens: Vec<usize> = g.iter().map(|&i| s.data[i].tokens.len()).collect();
    assert!(
        lens.windows(2).all(|w| w[0] >= w[1]),
        "one group here: longest first {lens:?}"
    );
}

/// A small singer/stadium database matching the examples' schema.
fn singer_db(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("singers.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER);
         CREATE TABLE stadium (stadium_id INTEGER PRIMARY KEY, name TEXT, capacity INTEGER);
         CREATE TABLE concert (concert_id INTEGER PRIMARY KEY, stadium_id INTEGER);
         INSERT INTO singer VALUES (1, 'Ana', 25), (2, 'Bo', 41), (3, 'Cyd', 33);
         INSERT INTO stadium VALUES (1, 'North', 5000), (2, 'South', 12000);
         INSERT INTO concert VALUES (1, 1), (2, 1), (3, 2);",
    )
    .unwrap();
    path
}

#[test]
fn execution_accuracy_after_memorising_is_high_and_the_best_adapter_is_kept() {
    memorise_and_evaluate(false);
}

/// The same on the device engine (CPU with bf16 storage): its training and its batched KV-cache
/// generation get the tiny model to answer as well.
#[test]
fn execution_accuracy_after_memorising_on_the_device_engine() {
    memorise_and_evaluate(true);
}

fn memorise_and_evaluate(device: bool) {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let db = singer_db(d.path());
    let tok = Tokenizer::from_file(&s.model_dir.join("tokenizer.json")).unwrap();
    let exs: Vec<Example> = examples()
        .into_iter()
        .map(|mut e| {
            e.db_path = Some(db.display().to_string());
            e
        })
        .collect();
    let tasks = sqlora::sql::evaluate::tasks(&exs, &tok, d.path(), None).unwrap();
    let c = memorising_config();
    let out = d.path().join("run");
    let mut t = if device {
        device_trainer(&s, c, &out)
    } else {
        trainer(&s, c, &out)
    };
    let before = sqlora::sql::evaluate::exec_accuracy(&t.model, Some(&t.lora), &tok, &tasks, 40).unwrap();
    t.sql_eval = Some(sqlora::train::SqlEval {
        tasks,
        tokenizer: tok,
        every: 50,
        max_new_tokens: 40,
    });
    let mut accs = Vec::new();
    t.run(100, &|| false, &mut |_, e| accs.extend(e.exec_accuracy)).unwrap();
    assert_eq!(accs.len(), 2, "at step 50 and at the end");
    let last = *accs.last().unwrap();
    assert_eq!(before, 0.0, "the untrained model writes no correct SQL");
    // Measured 0.5 at step 50 and 0.75 at step 100 (from 0.0 untrained); the same on the device engine.
    assert!(
        last >= 0.5,
        "execution accuracy after memorising (device {device}): {accs:?}"
    );
    let (best, _) = t.state.best_exec_accuracy.unwrap();
    assert_eq!(best, accs.iter().cloned().fold(0.0, f64::max));
    assert!(out.join("best/adapter_model.safetensors").exists());
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.matches("exec_accuracy").count(), 2);
}

/// The same run with its steps on the device engine (here the CPU with bf16 storage, as on a GPU).
fn device_trainer(s: &Setup, c: TrainConfig, out: &Path) -> Trainer {
    let mut t = trainer(s, c, out);
    t.use_device(sqlora::engine::host::Host).unwrap();
    t
}

#[test]
fn the_device_step_trains_like_the_reference() {
    let s = setup();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut reference = trainer(&s, config(2, 2), d1.path());
    let mut device = device_trainer(&s, config(2, 2), d2.path());
    let (want, got) = (run(&mut reference, 6), run(&mut device, 6));
    // Each device step's gradients are a few percent off f32 (bf16 activations; tests/engine.rs
    // has the figures), so over six steps: loss within 1e-2 at every step, gradient norm within
    // 5e-2, and the adapters after six AdamW steps within 5e-2, as measured.
    for (w, g) in want.iter().zip(&got) {
        let err = (g.loss - w.loss).abs() / w.loss;
        assert!(err < 1e-2, "step {}: loss {} vs reference {}", w.step, g.loss, w.loss);
        let err = (g.grad_norm - w.grad_norm).abs() / w.grad_norm;
        assert!(
            err < 5e-2,
            "step {}: |g| {} vs reference {}",
            w.step,
            g.grad_norm,
            w.grad_norm
        );
    }
    assert!(
        got[5].loss < got[0].loss,
        "the loss fell: {} -> {}",
        got[0].loss,
        got[5].loss
    );
    let err = rel_err(&device.lora.data, &reference.lora.data);
    assert!(err < 5e-2, "adapters after 6 steps differ by {err:e}");
    assert!(device.eval_loss().unwrap().is_some());
}

#[test]
fn resume_on_the_device_reproduces_the_uninterrupted_run_exactly() {
    let s = setup();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = device_trainer(&s, config(2, 1), d1.path());
    let straight: Vec<f64> = run(&mut whole, 4).iter().map(|r| r.loss).collect();
    let mut first = device_trainer(&s, config(2, 1), d2.path());
    let mut losses: Vec<f64> = run(&mut first, 2).iter().map(|r| r.loss).collect();
    drop(first);
    let mut second = device_trainer(&s, config(2, 1), d2.path());
    second.resume_from(&second.latest_checkpoint().unwrap()).unwrap();
    losses.extend(run(&mut second, 4).iter().map(|r| r.loss));
    assert_eq!(losses, straight);
    assert_eq!(second.lora.data, whole.lora.data);
}

#[test]
fn only_the_newest_checkpoints_are_kept_and_resume_takes_the_newest() {
    let s = setup();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let checkpoints = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint-") || n.contains("partial"))
            .collect();
        names.sort();
        names
    };
    let mut c = config(2, 2);
    c.save_every = 1;
    // 0 keeps every checkpoint.
    c.save_total_limit = 0;
    let mut whole = trainer(&s, c.clone(), d1.path());
    run(&mut whole, 6);
    assert_eq!(checkpoints(d1.path()).len(), 6);

    c.save_total_limit = 2;
    let mut first = trainer(&s, c.clone(), d2.path());
    std::fs::create_dir(d2.path().join("best")).unwrap();
    let seen = std::cell::RefCell::new(Vec::new());
    first
        .run(4, &|| false, &mut |r, _| {
            // Before step r's checkpoint: never more than the limit on disk.
            seen.borrow_mut().push((r.step, checkpoints(d2.path()).len()));
        })
        .unwrap();
    assert_eq!(*seen.borrow(), [(1, 0), (2, 1), (3, 2), (4, 2)]);
    assert_eq!(checkpoints(d2.path()), ["checkpoint-000003", "checkpoint-000004"]);
    drop(first); // the process dies after its checkpoint at step 4
    let mut second = trainer(&s, c, d2.path());
    let newest = second.latest_checkpoint().unwrap();
    assert!(newest.ends_with("checkpoint-000004"), "{}", newest.display());
    second.resume_from(&newest).unwrap();
    run(&mut second, 6);
    assert_eq!(checkpoints(d2.path()), ["checkpoint-000005", "checkpoint-000006"]);
    assert!(d2.path().join("best").is_dir(), "best/ is never deleted");
    assert_eq!(second.lora.data, whole.lora.data, "pruning changes nothing in the run");
}

#[test]
fn each_step_reports_the_time_run_and_an_estimate_of_the_time_left() {
    let s = setup();
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer(&s, config(2, 2), d.path());
    let r = run(&mut t, 4);
    for (k, w) in r.windows(2).enumerate() {
        assert!(w[1].elapsed_s >= w[0].elapsed_s + w[1].seconds, "step {}", k + 2);
    }
    assert!(r[0].elapsed_s >= r[0].seconds);
    // After the first step, the estimate is the mean time of the steps since it, times those left:
    // at least their compute time's share, at most the whole time run's.
    for (k, x) in r.iter().enumerate().skip(1) {
        let left = (6 - x.step) as f64;
        let computed: f64 = r[1..=k].iter().map(|y| y.seconds).sum();
        let per_step = (computed / k as f64, x.elapsed_s / k as f64);
        assert!(
            x.eta_s >= per_step.0 * left && x.eta_s <= per_step.1 * left,
            "step {}: ETA {} not in [{}, {}]",
            x.step,
            x.eta_s,
            per_step.0 * left,
            per_step.1 * left
        );
    }
    // The log has both; a resumed run counts from the time run before its checkpoint.
    let log = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["elapsed_s"].as_f64(), Some(r[3].elapsed_s));
    assert_eq!(last["eta_s"].as_f64(), Some(r[3].eta_s));
    drop(t);
    let mut again = trainer(&s, config(2, 2), d.path());
    again.resume_from(&again.latest_checkpoint().unwrap()).unwrap();
    let rest = run(&mut again, 6);
    assert!(rest[0].elapsed_s >= r[3].elapsed_s + rest[0].seconds);
    assert_eq!(rest.last().unwrap().eta_s, 0.0, "nothing is left after the last step");
}

#[test]
fn without_validation_examples_no_evaluation_is_announced_or_logged() {
    let s = setup();
    for with_val in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let mut c = config(2, 1);
        c.eval_every = 2;
        let model = Model::load_dir(&s.model_dir).unwrap().quantize_nf4();
        let val = if with_val { s.data[..2].to_vec() } else { vec![] };
        let mut t = Trainer::new(model, s.data.clone(), val, c, d.path(), "tiny").unwrap();
        let said = std::rc::Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
        let to = said.clone();
        t.on_eval = Some(Box::new(move |what: &str| to.borrow_mut().push(what.to_string())));
        run(&mut t, 6);
        let log = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
        if with_val {
            assert_eq!(*said.borrow(), vec!["validation loss on 2 examples"; 3]);
            assert_eq!(log.matches("eval_loss").count(), 3);
        } else {
            assert!(said.borrow().is_empty(), "{:?}", said.borrow());
            assert!(!log.contains("eval_loss"));
        }
    }
}
