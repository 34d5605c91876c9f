//! Decoding under a constraint (`generate::Constraint`, as the schema guard uses it): every token
//! taken is one the constraint allows, and it is the token the model likes best among those, on the
//! f32 reference and on the device engine, greedy and with candidates, whatever the chunking.

use sqlora::engine::api::StepEngine;
use sqlora::engine::host::Host;
use sqlora::engine::step::Engine;
use sqlora::model::forward::{KvCache, Logits, Model};
use sqlora::model::generate::{
    argmax, candidates, constrained, constrained_greedy, greedy_batch, Constraint, Sampling, CONSTRAINED_TRIES,
};
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{tiny_adapter, write_tiny_model, TinyVariant, TINY_VOCAB};
use sqlora::util::rng::Rng;
use std::sync::Arc;

/// Prompt p's continuation may take token t at step j only when t + p + j is odd: which half of
/// the vocabulary is allowed depends on the prompt's number and on the tokens so far.
struct Parity;

impl Constraint for Parity {
    fn allows(&self, p: usize, so_far: &[u32], token: u32) -> bool {
        (token as usize + p + so_far.len()) % 2 == 1
    }
}

fn setup(v: TinyVariant) -> (Model, LoraParams) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), v).unwrap();
    (Model::load_dir(dir.path()).unwrap().quantize_nf4(), tiny_adapter(v))
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(0xc0a5);
    [7usize, 3, 12, 5]
        .iter()
        .map(|&n| (0..n).map(|_| rng.below(TINY_VOCAB as u64) as u32).collect())
        .collect()
}

/// The best token of `logits` that prompt p's constraint allows after `so_far`.
fn best_allowed(logits: &[f32], p: usize, so_far: &[u32]) -> u32 {
    best(logits, |t| Parity.allows(p, so_far, t))
}

#[test]
fn a_refused_choice_is_chosen_again_and_a_constraint_that_allows_nothing_gives_way() {
    // Poisoned: the first choice (index 2) is refused, the next best allowed one is index 4.
    let logits = [0.5, 3.0, 9.0, -1.0, 4.0, 2.0];
    assert_eq!(constrained(2, &logits, argmax, |t| t % 2 == 0 && t != 2), 4);
    assert_eq!(constrained(2, &logits, argmax, |_| true), 2);
    // Nothing allowed: the first choice, after at most CONSTRAINED_TRIES tries.
    let tries = std::cell::Cell::new(0);
    let got = constrained(2, &logits, argmax, |_| {
        tries.set(tries.get() + 1);
        false
    });
    assert_eq!(got, 2);
    assert!(tries.get() <= CONSTRAINED_TRIES.min(logits.len()));
    // Greedy: the same answers, from the logits' order; ties go to the lower id.
    assert_eq!(constrained_greedy(2, &logits, |t| t % 2 == 0 && t != 2), 4);
    assert_eq!(constrained_greedy(2, &logits, |_| false), 2);
    assert_eq!(constrained_greedy(0, &[1.0, 5.0, 5.0], |t| t != 0), 1);
    // Over a large vocabulary, the best allowed token even far down the order.
    let mut rng = Rng::new(5);
    let big: Vec<f32> = (0..50_000).map(|_| rng.uniform() as f32).collect();
    let allowed = |t: u32| t % 97 == 3;
    assert_eq!(constrained_greedy(argmax(&big), &big, allowed), best(&big, allowed));
}

/// The allowed token of highest logit, by a plain scan.
fn best(logits: &[f32], allowed: impl Fn(u32) -> bool) -> u32 {
    let mut masked = logits.to_vec();
    for (t, l) in masked.iter_mut().enumerate() {
        if !allowed(t as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
    argmax(&masked)
}

#[test]
fn the_reference_takes_the_best_allowed_token_at_every_step() {
    for v in [TinyVariant::Llama, TinyVariant::Qwen2] {
        let (model, lora) = setup(v);
        let ps = prompts();
        let free = greedy_batch(&model, Some(&lora), &ps, 6, &[], None);
        // Prompt j of this call is the constraint's prompt 10 + j.
        let outs = greedy_batch(&model, Some(&lora), &ps, 6, &[], Some((&Parity, 10)));
        assert_ne!(outs, free, "{v:?}: the constraint changed nothing");
        for (j, (p, o)) in ps.iter().zip(&outs).enumerate() {
            assert_eq!(o.len(), 6);
            for k in 0..o.len() {
                let prefix: Vec<u32> = p.iter().chain(&o[..k]).copied().collect();
                let logits =
                    model.forward_adapted(&prefix, &mut KvCache::new(&model.config), Logits::Last, Some(&lora));
                assert_eq!(
                    o[k],
                    best_allowed(&logits, 10 + j, &o[..k]),
                    "{v:?}, prompt {j}, step {k}"
                );
            }
        }
    }
}

#[test]
fn the_device_engine_takes_the_best_allowed_token_greedy_and_with_candidates() {
    let (model, lora) = setup(TinyVariant::Qwen2);
    let mut engine = Engine::new(Host, &model, &lora, 64, false).unwrap();
    engine.set_constraint(Some(Arc::new(Parity)));
    let outs = engine.generate(Some(&lora), &prompts(), 6, &[]).unwrap();
    for (p, (prompt, o)) in prompts().iter().zip(&outs).enumerate() {
        for k in 0..o.len() {
            let prefix: Vec<u32> = prompt.iter().chain(&o[..k]).copied().collect();
            let logits = engine.last_logits(Some(&lora), &[prefix]).unwrap();
            // Exact: on the host device the cached decode runs the same ops as the prefill.
            assert_eq!(o[k], best_allowed(&logits[0], p, &o[..k]), "prompt {p}, step {k}");
        }
    }
    // An engine for 20 tokens runs the prompts in several chunks: each keeps its own number.
    let mut small = Engine::new(Host, &model, &lora, 20, false).unwrap();
    small.set_constraint(Some(Arc::new(Parity)));
    assert_eq!(small.generate(Some(&lora), &prompts(), 6, &[]).unwrap(), outs);
    // Candidates: the first is the constrained greedy answer; every drawn token is allowed.
    let sampling = Sampling {
        temperature: 1.0,
        top_p: 1.0,
        seed: 3,
        first: 0,
    };
    let c = engine
        .generate_candidates(Some(&lora), &prompts(), 3, 6, &[], &sampling)
        .unwrap();
    for (p, (ci, g)) in c.iter().zip(&outs).enumerate() {
        assert_eq!(ci[0], *g, "prompt {p}");
        for o in ci {
            assert!(
                (0..o.len()).all(|k| Parity.allows(p, &o[..k], o[k])),
                "prompt {p}: {o:?}"
            );
        }
    }
    // The reference's candidates under the same constraint: all allowed too.
    for (p, prompt) in prompts().iter().enumerate() {
        for o in candidates(&model, Some(&lora), prompt, 3, 6, &[], &sampling, p, Some(&Parity)) {
            assert!(
                (0..o.len()).all(|k| Parity.allows(p, &o[..k], o[k])),
                "reference, prompt {p}"
            );
        }
    }
    // Without the constraint, the same engine is free again.
    engine.set_constraint(None);
    let free = engine.generate(Some(&lora), &prompts(), 6, &[]).unwrap();
    assert!((free.iter().enumerate()).any(|(p, o)| (0..o.len()).any(|k| !Parity.allows(p, &o[..k], o[k]))));
}
