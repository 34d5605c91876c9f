//! Several candidates per prompt (`generate::candidates`, `Engine::generate_candidates`) and the
//! execution-guided choice among them (`sql::choose`): the batched decoding rows equal one sequence
//! at a time, candidate 0 is the greedy answer, the draws follow the distribution they claim and
//! depend only on the seed, and the choice follows the vote of the queries that run.

mod common;
use common::rel_err;

use sqlora::engine::host::Host;
use sqlora::engine::step::Engine;
use sqlora::model::forward::{KvCache, Logits, Model};
use sqlora::model::generate::{candidates, greedy, greedy_batch, Sampling};
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{tiny_adapter, write_tiny_model, TinyVariant, TINY_VOCAB};
use sqlora::sql::choose::{choose, Choice};
use sqlora::sql::exec::Db;
use sqlora::util::rng::Rng;
use std::time::Duration;

fn setup(v: TinyVariant) -> (Model, LoraParams) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), v).unwrap();
    (Model::load_dir(dir.path()).unwrap().quantize_nf4(), tiny_adapter(v))
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(0xca4d);
    [9usize, 2, 17]
        .iter()
        .map(|&n| (0..n).map(|_| rng.below(TINY_VOCAB as u64) as u32).collect())
        .collect()
}

const SAMPLING: Sampling = Sampling {
    temperature: 1.0,
    top_p: 1.0,
    seed: 7,
    first: 0,
};

#[test]
fn rows_of_several_caches_equal_one_sequence_at_a_time() {
    for v in TinyVariant::ALL {
        let (model, lora) = setup(v);
        let ps = prompts();
        // Caches at different lengths, each advanced by one token in a single call.
        let mut caches: Vec<KvCache> = ps.iter().map(|_| KvCache::new(&model.config)).collect();
        let mut alone: Vec<KvCache> = ps.iter().map(|_| KvCache::new(&model.config)).collect();
        for ((p, c), a) in ps.iter().zip(&mut caches).zip(&mut alone) {
            model.forward_adapted(p, c, Logits::Last, Some(&lora));
            model.forward_adapted(p, a, Logits::Last, Some(&lora));
        }
        let vocab = model.config.vocab_size;
        for step in 0..3u32 {
            let tokens: Vec<u32> = (0..ps.len() as u32)
                .map(|i| (5 * i + step + 1) % TINY_VOCAB as u32)
                .collect();
            let rows = model.forward_rows(&tokens, &mut caches, Some(&lora)); // [3, vocab]
            assert_eq!(rows.len(), ps.len() * vocab);
            for (i, (&t, a)) in tokens.iter().zip(&mut alone).enumerate() {
                let want = model.forward_adapted(&[t], a, Logits::Last, Some(&lora));
                let got = &rows[i * vocab..(i + 1) * vocab];
                assert_eq!(got, &want[..], "{v:?}, row {i}, step {step}: {:e}", rel_err(got, &want));
                assert_eq!(caches[i].len(), a.len());
            }
        }
    }
}

#[test]
fn the_first_candidate_is_the_greedy_answer_and_draws_depend_only_on_the_seed() {
    let (model, lora) = setup(TinyVariant::Llama);
    for (i, p) in prompts().iter().enumerate() {
        let g = greedy(&model, Some(&lora), p, 10, &[]);
        assert_eq!(
            candidates(&model, Some(&lora), p, 1, 10, &[], &SAMPLING, i, None),
            vec![g.clone()]
        );
        let c = candidates(&model, Some(&lora), p, 5, 10, &[], &SAMPLING, i, None);
        assert_eq!(c.len(), 5);
        assert_eq!(c[0], g);
        assert!(c.iter().all(|o| o.len() == 10));
        // At temperature 1 over a random model's flat distribution, draws differ from greedy.
        assert!(c[1..].iter().any(|o| *o != g), "prompt {i}: every draw was greedy");
        assert_eq!(candidates(&model, Some(&lora), p, 5, 10, &[], &SAMPLING, i, None), c);
        let other = Sampling { seed: 8, ..SAMPLING };
        assert_ne!(
            candidates(&model, Some(&lora), p, 5, 10, &[], &other, i, None)[1..],
            c[1..]
        );
        // A call whose prompts start at prompt 2 of the set draws for its prompt i what prompt
        // i + 2 gets (a file cut into calls gives the same candidates).
        let later = Sampling { first: 2, ..SAMPLING };
        assert_eq!(
            candidates(&model, Some(&lora), p, 5, 10, &[], &later, i, None),
            candidates(&model, Some(&lora), p, 5, 10, &[], &SAMPLING, i + 2, None)
        );
        // A stop token ends each candidate where it first appears, and is kept.
        let stop = c[2][3];
        let stopped = candidates(&model, Some(&lora), p, 5, 10, &[stop], &SAMPLING, i, None);
        for (s, full) in stopped.iter().zip(&c) {
            let end = full.iter().position(|&t| t == stop).map_or(full.len(), |k| k + 1);
            assert_eq!(s[..], full[..end]);
        }
    }
}

#[test]
fn prompts_decoded_together_give_each_prompts_greedy_answer() {
    for v in [TinyVariant::Llama, TinyVariant::Qwen2Tied] {
        let (model, lora) = setup(v);
        let ps = prompts();
        let alone: Vec<Vec<u32>> = ps.iter().map(|p| greedy(&model, Some(&lora), p, 12, &[])).collect();
        assert_eq!(greedy_batch(&model, Some(&lora), &ps, 12, &[], None), alone, "{v:?}");
        // Sequences that stop early leave the batch; the others go on.
        let stop = alone[1][1];
        let want: Vec<Vec<u32>> = ps.iter().map(|p| greedy(&model, Some(&lora), p, 12, &[stop])).collect();
        assert_eq!(greedy_batch(&model, Some(&lora), &ps, 12, &[stop], None), want, "{v:?}");
        assert!(want[1].len() <= 2, "prompt 1 stops at its second token or before");
    }
}

#[test]
fn draws_follow_the_tempered_distribution_cut_to_its_nucleus() {
    // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1.
    let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
    let counts = |s: Sampling| {
        let mut rng = Rng::new(3);
        let mut n = [0usize; 4];
        for _ in 0..40_000 {
            n[s.draw(&logits, &mut rng) as usize] += 1;
        }
        n.map(|c| c as f64 / 40_000.0)
    };
    let full = counts(SAMPLING);
    for (f, p) in full.iter().zip([0.5, 0.25, 0.125, 0.125]) {
        assert!((f - p).abs() < 0.01, "{full:?}");
    }
    // top_p 0.7: the nucleus is {0, 1} (0.5 + 0.25 reaches 0.7), renormalised to 2/3, 1/3.
    let cut = counts(Sampling { top_p: 0.7, ..SAMPLING });
    assert!(
        (cut[0] - 2.0 / 3.0).abs() < 0.01 && cut[2] == 0.0 && cut[3] == 0.0,
        "{cut:?}"
    );
    // Temperature 1/2 squares the odds: 16:4:1:1.
    let cold = counts(Sampling {
        temperature: 0.5,
        ..SAMPLING
    });
    assert!(
        (cold[0] - 16.0 / 22.0).abs() < 0.01 && (cold[1] - 4.0 / 22.0).abs() < 0.01,
        "{cold:?}"
    );
    // A tiny top_p keeps only the most likely token.
    assert_eq!(
        counts(Sampling {
            top_p: 1e-6,
            ..SAMPLING
        }),
        [1.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn device_candidates_start_with_its_greedy_answer_and_do_not_depend_on_chunking() {
    let (model, lora) = setup(TinyVariant::Qwen2);
    let mut engine = Engine::new(Host, &model, &lora, 64, false).unwrap();
    let greedy = engine.generate(Some(&lora), &prompts(), 6, &[]).unwrap();
    let c = (engine.generate_candidates(Some(&lora), &prompts(), 3, 6, &[], &SAMPLING)).unwrap();
    assert_eq!(c.len(), 3);
    for (i, (ci, g)) in c.iter().zip(&greedy).enumerate() {
        assert_eq!(ci.len(), 3);
        assert_eq!(ci[0], *g, "prompt {i}");
        assert!(ci.iter().all(|o| o.len() == 6));
    }
    assert!(
        c.iter().any(|ci| ci[1..].iter().any(|o| o != &ci[0])),
        "every draw was greedy"
    );
    // An engine for 20 tokens runs the 9 sequences in several chunks: the same draws.
    let mut small = Engine::new(Host, &model, &lora, 20, false).unwrap();
    assert_eq!(
        small
            .generate_candidates(Some(&lora), &prompts(), 3, 6, &[], &SAMPLING)
            .unwrap(),
        c
    );
}

/// A database with a table `t(id, name)` of three rows.
fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t(id INTEGER, name TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c');")
        .unwrap();
    drop(conn);
    let db = Db::open(&path).unwrap();
    (dir, db)
}

#[test]
fn the_choice_follows_the_vote_of_the_queries_that_run() {
    let (_dir, db) = db();
    let limit = Duration::from_secs(5);
    let sqls = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Two runnable results agree (columns swapped, rows reordered): they outvote the first.
    let c = choose(
        &db,
        &sqls(&[
            "SELECT name FROM t WHERE id = 1",
            "SELECT nme FROM t",
            "SELECT id, name FROM t",
            "SELECT name, id FROM t ORDER BY id DESC",
        ]),
        limit,
    );
    assert_eq!(
        c,
        Choice {
            index: 2,
            runnable: 3,
            votes: 2
        }
    );
    // A tie goes to the earlier candidate; an empty result loses to any rows.
    let c = choose(
        &db,
        &sqls(&[
            "SELECT id FROM t WHERE id > 5",
            "SELECT id FROM t WHERE id > 5",
            "SELECT name FROM t WHERE id = 2",
            "SELECT id FROM t WHERE id = 3",
        ]),
        limit,
    );
    assert_eq!(
        c,
        Choice {
            index: 2,
            runnable: 4,
            votes: 1
        }
    );
    // Nothing runs (an error, a write the database refuses, an empty answer): candidate 0.
    let c = choose(&db, &sqls(&["SELECT nope FROM t", "DELETE FROM t", ""]), limit);
    assert_eq!(
        c,
        Choice {
            index: 0,
            runnable: 0,
            votes: 0
        }
    );
    // The refused write changed nothing.
    assert_eq!(db.query("SELECT id FROM t", limit).unwrap().len(), 3);
}
