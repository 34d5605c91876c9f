//! Finite-difference checks of every backward op, and of the whole model's LoRA gradients.
//!
//! Each op is wrapped in a scalar `L = sum_i w_i out_i` with random `w`, so that `dL/dout = w`; the
//! analytic gradient from the backward is compared with central differences of L, computed in f64
//! from f32 forwards. Inputs are random normals (never zeros); several sizes per op.

mod common;
use common::rel_err;

use sqlora::model::autograd::{forward_backward, loss_sum, Batch, GradOptions};
use sqlora::model::cpu::{self, Linear};
use sqlora::model::forward::Model;
use sqlora::model::lora::{LoraConfig, LoraParams};
use sqlora::model::tiny::{write_tiny_model, TinyVariant};
use sqlora::util::rng::Rng;

/// Central differences of `f` at `x` for the given indices (all when `None`).
fn numeric_grad(f: &dyn Fn(&[f32]) -> f64, x: &[f32], eps: f32, idx: &[usize]) -> Vec<f32> {
    let mut xp = x.to_vec();
    idx.iter()
        .map(|&i| {
            let orig = xp[i];
            xp[i] = orig + eps;
            let up = f(&xp);
            xp[i] = orig - eps;
            let down = f(&xp);
            xp[i] = orig;
            ((up - down) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

fn weighted(out: &[f32], w: &[f32]) -> f64 {
    out.iter().zip(w).map(|(&o, &wi)| o as f64 * wi as f64).sum()
}

fn check(name: &str, analytic: &[f32], f: &dyn Fn(&[f32]) -> f64, x: &[f32]) {
    let idx: Vec<usize> = (0..x.len()).collect();
    let numeric = numeric_grad(f, x, 1e-2, &idx);
    let err = rel_err(analytic, &numeric);
    assert!(
        err < 5e-3,
        "{name}: analytic vs numeric gradient relative error {err:e}"
    );
    assert!(numeric.iter().any(|&g| g.abs() > 1e-3), "{name}: gradient is vacuous");
}

#[test]
fn rmsnorm_backward() {
    let mut rng = Rng::new(1);
    for &(t, d) in &[(1, 8), (3, 24), (5, 64)] {
        let x = rng.normal_vec(t * d, 1.0);
        let g = rng.normal_vec(d, 1.0);
        let w = rng.normal_vec(t * d, 1.0);
        let f = |x: &[f32]| {
            let mut y = vec![f32::NAN; x.len()];
            cpu::rmsnorm_fwd(&mut y, x, &g, 1e-5);
            weighted(&y, &w)
        };
        let mut dx = vec![f32::NAN; x.len()];
        cpu::rmsnorm_bwd(&mut dx, &w, &x, &g, 1e-5);
        check(&format!("rmsnorm {t}x{d}"), &dx, &f, &x);
    }
}

#[test]
fn rope_backward() {
    let mut rng = Rng::new(2);
    for &(t, heads, hd) in &[(1, 1, 4), (4, 3, 8), (7, 2, 16)] {
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let positions: Vec<usize> = (0..t).map(|i| 3 * i + 1).collect();
        let x = rng.normal_vec(t * heads * hd, 1.0);
        let w = rng.normal_vec(x.len(), 1.0);
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            cpu::rope_fwd(&mut y, &positions, &inv, heads);
            weighted(&y, &w)
        };
        let mut dx = w.clone();
        cpu::rope_bwd(&mut dx, &positions, &inv, heads);
        check(&format!("rope {t}x{heads}x{hd}"), &dx, &f, &x);
    }
}

#[test]
fn swiglu_backward() {
    let mut rng = Rng::new(3);
    for &n in &[1, 17, 300] {
        let (gate, up, w) = (rng.normal_vec(n, 2.0), rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        cpu::swiglu_bwd(&mut dg, &mut du, &w, &gate, &up);
        let fg = |g: &[f32]| {
            let mut y = vec![f32::NAN; n];
            cpu::swiglu_fwd(&mut y, g, &up);
            weighted(&y, &w)
        };
        let fu = |u: &[f32]| {
            let mut y = vec![f32::NAN; n];
            cpu::swiglu_fwd(&mut y, &gate, u);
            weighted(&y, &w)
        };
        check(&format!("swiglu gate {n}"), &dg, &fg, &gate);
        check(&format!("swiglu up {n}"), &du, &fu, &up);
    }
}

#[test]
fn attention_backward() {
    let mut rng = Rng::new(4);
    for &(t, heads, kv_heads, hd) in &[(1, 2, 1, 4), (5, 4, 2, 8), (9, 3, 3, 6), (6, 4, 1, 16)] {
        let q = rng.normal_vec(t * heads * hd, 1.0);
        let k = rng.normal_vec(t * kv_heads * hd, 1.0);
        let v = rng.normal_vec(t * kv_heads * hd, 1.0);
        let w = rng.normal_vec(q.len(), 1.0);
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![f32::NAN; q.len()];
            cpu::attention_fwd(&mut o, q, k, v, heads, kv_heads, hd);
            weighted(&o, &w)
        };
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; q.len()],
            vec![f32::NAN; k.len()],
            vec![f32::NAN; v.len()],
        );
        cpu::attention_bwd(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, heads, kv_heads, hd);
        let shape = format!("{t}x{heads}/{kv_heads}x{hd}");
        if t > 1 {
            check(&format!("attention dq {shape}"), &dq, &|x| run(x, &k, &v), &q);
            check(&format!("attention dk {shape}"), &dk, &|x| run(&q, x, &v), &k);
        } else {
            // One token attends to itself only: softmax is constant, dq = dk = 0 exactly.
            assert!(dq.iter().chain(&dk).all(|&g| g == 0.0));
        }
        check(&format!("attention dv {shape}"), &dv, &|x| run(&q, &k, x), &v);
    }
}

#[test]
fn linear_backward_dense_and_nf4() {
    let mut rng = Rng::new(5);
    for &(t, n, k) in &[(1, 3, 5), (4, 20, 64), (17, 9, 70)] {
        let dense = Linear::dense(n, k, rng.normal_vec(n * k, 0.3), Some(rng.normal_vec(n, 0.1)));
        for lin in [dense.clone(), dense.to_nf4()] {
            let x = rng.normal_vec(t * k, 1.0);
            let w = rng.normal_vec(t * n, 1.0);
            let f = |x: &[f32]| {
                let mut y = vec![f32::NAN; t * n];
                cpu::linear_fwd(&mut y, x, &lin);
                weighted(&y, &w)
            };
            let mut dx = vec![f32::NAN; x.len()];
            cpu::linear_bwd_input(&mut dx, &w, &lin);
            check(&format!("linear {t}x{n}x{k}"), &dx, &f, &x);
        }
    }
}

#[test]
fn lora_backward() {
    let mut rng = Rng::new(6);
    for &(t, n, k, r) in &[(1, 3, 5, 1), (6, 12, 10, 4), (9, 7, 33, 8)] {
        let (x, a, b) = (
            rng.normal_vec(t * k, 1.0),
            rng.normal_vec(r * k, 0.5),
            rng.normal_vec(n * r, 0.5),
        );
        let w = rng.normal_vec(t * n, 1.0);
        let s = 2.5;
        let run = |x: &[f32], a: &[f32], b: &[f32]| {
            let mut y = vec![0.25f32; t * n]; // accumulated into: start from a nonzero base
            let mut xa = vec![f32::NAN; t * r];
            cpu::lora_fwd(&mut y, &mut xa, x, a, b, r, s);
            weighted(&y, &w)
        };
        let mut xa = vec![f32::NAN; t * r];
        cpu::lora_fwd(&mut vec![0.0; t * n], &mut xa, &x, &a, &b, r, s);
        let (mut dx, mut da, mut db) = (vec![f32::NAN; x.len()], vec![0.5f32; a.len()], vec![-0.5f32; b.len()]);
        cpu::lora_bwd(&mut dx, &mut da, &mut db, &w, &x, &xa, &a, &b, r, s);
        // The parameter gradients accumulate onto what was there.
        da.iter_mut().for_each(|g| *g -= 0.5);
        db.iter_mut().for_each(|g| *g += 0.5);
        let shape = format!("{t}x{n}x{k} r{r}");
        check(&format!("lora dx {shape}"), &dx, &|v| run(v, &a, &b), &x);
        check(&format!("lora dA {shape}"), &da, &|v| run(&x, v, &b), &a);
        check(&format!("lora dB {shape}"), &db, &|v| run(&x, &a, v), &b);
    }
}

#[test]
fn cross_entropy_backward() {
    let mut rng = Rng::new(7);
    for &(t, d, vocab) in &[(1, 4, 5), (6, 16, 40), (4, 32, 300)] {
        let head = Linear::dense(vocab, d, rng.normal_vec(vocab * d, 0.3), None);
        let h = rng.normal_vec(t * d, 1.0);
        let targets: Vec<Option<u32>> = (0..t)
            .map(|i| {
                if i % 3 == 1 {
                    None
                } else {
                    Some(rng.below(vocab as u64) as u32)
                }
            })
            .collect();
        let inv = 1.0 / targets.iter().flatten().count() as f32;
        let f = |h: &[f32]| cpu::cross_entropy_fwd_bwd(None, h, &head, &targets, 1.0) * inv as f64;
        let mut dh = vec![f32::NAN; h.len()];
        let loss = cpu::cross_entropy_fwd_bwd(Some(&mut dh), &h, &head, &targets, inv);
        assert!(
            (loss * inv as f64 - f(&h)).abs() < 1e-9,
            "the loss does not depend on asking for gradients"
        );
        check(&format!("cross-entropy {t}x{d}x{vocab}"), &dh, &f, &h);
        for (i, tgt) in targets.iter().enumerate() {
            if tgt.is_none() {
                assert!(dh[i * d..(i + 1) * d].iter().all(|&g| g == 0.0), "no loss, no gradient");
            }
        }
    }
}

/// A tiny model with adapters whose B is nonzero (so A gets gradient) and a packed batch of two
/// sequences with prompt positions masked out.
fn model_and_batch(v: TinyVariant, dropout: f32, nf4: bool) -> (tempfile::TempDir, Model, LoraParams, Batch) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), v).unwrap();
    let mut model = Model::load_dir(dir.path()).unwrap();
    if nf4 {
        model = model.quantize_nf4();
    }
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        ..Default::default()
    };
    let mut lora = LoraParams::init(&model.config, config, 9);
    let mut rng = Rng::new(10);
    for slot in lora.slots.clone().iter().flatten().flatten() {
        for x in &mut lora.data[slot.b.clone()] {
            *x = rng.normal() * 0.2;
        }
    }
    let seq = |len: usize, prompt: usize, rng: &mut Rng| {
        let toks: Vec<u32> = (0..len).map(|_| rng.below(259) as u32).collect();
        let tg: Vec<Option<u32>> = (0..len)
            .map(|i| (i >= prompt && i + 1 < len).then(|| toks[i + 1]))
            .collect();
        (toks, tg)
    };
    let (a, b) = (seq(11, 4, &mut rng), seq(7, 2, &mut rng));
    let batch = Batch::pack([(&a.0[..], &a.1[..]), (&b.0[..], &b.1[..])]);
    (dir, model, lora, batch)
}

#[test]
fn whole_model_lora_gradients_match_finite_differences() {
    for (v, nf4) in [(TinyVariant::Llama, false), (TinyVariant::Qwen2Tied, true)] {
        let (_dir, model, lora, batch) = model_and_batch(v, 0.0, nf4);
        let inv = 1.0 / batch.label_count() as f32;
        let mut grads = vec![0f32; lora.len()];
        forward_backward(&model, &lora, &batch, inv, GradOptions::default(), &mut grads);
        // Sample parameters across every layer and projection, both A and B.
        let mut rng = Rng::new(11);
        let idx: Vec<usize> = lora
            .slots
            .iter()
            .flatten()
            .flatten()
            .flat_map(|s| {
                [
                    s.a.start + rng.below(s.a.len() as u64) as usize,
                    s.b.start + rng.below(s.b.len() as u64) as usize,
                ]
            })
            .collect();
        let f = |data: &[f32]| {
            let mut p = lora.clone();
            p.data.copy_from_slice(data);
            loss_sum(&model, Some(&p), &batch) * inv as f64
        };
        let numeric = numeric_grad(&f, &lora.data, 1e-2, &idx);
        let analytic: Vec<f32> = idx.iter().map(|&i| grads[i]).collect();
        let err = rel_err(&analytic, &numeric);
        assert!(
            err < 1e-2,
            "{}: whole-model LoRA gradient relative error {err:e}",
            v.name()
        );
    }
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    for dropout in [0.0, 0.1] {
        let (_dir, model, lora, batch) = model_and_batch(TinyVariant::Qwen2, dropout, true);
        let inv = 1.0 / batch.label_count() as f32;
        let (mut g1, mut g2) = (vec![0f32; lora.len()], vec![0f32; lora.len()]);
        let opts = GradOptions {
            checkpointing: false,
            dropout_seed: 77,
        };
        let l1 = forward_backward(&model, &lora, &batch, inv, opts, &mut g1);
        let l2 = forward_backward(
            &model,
            &lora,
            &batch,
            inv,
            GradOptions {
                checkpointing: true,
                ..opts
            },
            &mut g2,
        );
        assert_eq!(l1, l2);
        assert_eq!(
            g1, g2,
            "recomputing a layer must reproduce its activations exactly (dropout {dropout})"
        );
        assert!(g1.iter().any(|&g| g != 0.0));
    }
}

#[test]
fn dropout_changes_the_gradient_and_its_seed_reproduces_it() {
    let (_dir, model, lora, batch) = model_and_batch(TinyVariant::Llama, 0.3, false);
    let inv = 1.0 / batch.label_count() as f32;
    let run = |seed: u64| {
        let mut g = vec![0f32; lora.len()];
        let opts = GradOptions {
            checkpointing: false,
            dropout_seed: seed,
        };
        forward_backward(&model, &lora, &batch, inv, opts, &mut g);
        g
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}
