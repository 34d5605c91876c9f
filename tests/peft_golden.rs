//! LoRA parity with PyTorch + peft (files made by tests/reference/make_lora_golden.py): the adapter
//! sqlora writes loads in peft and gives the same logits, and sqlora's loss and every A/B gradient
//! match peft's autograd.

mod common;
use common::rel_err;

use sqlora::load::weights::Weights;
use sqlora::model::autograd::{forward_backward, Batch, GradOptions};
use sqlora::model::forward::{KvCache, Logits, Model};
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{tiny_adapter, write_tiny_model, TinyVariant, TINY_VOCAB};
use sqlora::util::fnv1a64;
use std::path::PathBuf;

#[test]
fn loss_logits_and_lora_gradients_match_peft() {
    for v in TinyVariant::ALL {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/reference/golden/lora-{}.safetensors", v.name()));
        let golden = Weights::open_files(&[path]).unwrap();
        let meta = golden.metadata_of("loss").unwrap().clone();

        // The same base and adapter bytes the golden file was made from, read back through the PEFT loader.
        let base = tempfile::tempdir().unwrap();
        let adapter_dir = tempfile::tempdir().unwrap();
        write_tiny_model(base.path(), v).unwrap();
        tiny_adapter(v).save_peft(adapter_dir.path(), "tiny").unwrap();
        let fingerprint = |p: PathBuf| format!("{:016x}", fnv1a64(&std::fs::read(p).unwrap()));
        let stale = "the tiny model or adapter changed: run python3 tests/reference/make_lora_golden.py";
        assert_eq!(
            fingerprint(base.path().join("model.safetensors")),
            meta["weights_fnv1a64"],
            "{stale}"
        );
        assert_eq!(
            fingerprint(adapter_dir.path().join("adapter_model.safetensors")),
            meta["adapter_fnv1a64"],
            "{stale}"
        );
        let model = Model::load_dir(base.path()).unwrap();
        let lora = LoraParams::load_peft(adapter_dir.path(), &model.config).unwrap();
        assert_eq!(lora.data, tiny_adapter(v).data, "PEFT files round-trip exactly");

        let seq = |i: usize| {
            let toks: Vec<u32> = golden
                .ints(&format!("tokens_{i}"))
                .unwrap()
                .iter()
                .map(|&x| x as u32)
                .collect();
            let tg: Vec<Option<u32>> = golden
                .ints(&format!("targets_{i}"))
                .unwrap()
                .iter()
                .map(|&x| (x >= 0).then_some(x as u32))
                .collect();
            (toks, tg)
        };
        let (s0, s1) = (seq(0), seq(1));

        // Logits with the adapter applied.
        let want = golden.f32("logits_0", &[s0.0.len(), TINY_VOCAB]).unwrap();
        let got = model.forward_adapted(&s0.0, &mut KvCache::new(&model.config), Logits::All, Some(&lora));
        let err = rel_err(&got, &want);
        // Same f32 math as peft 0.21: predicted ~1e-6, measured at most 9.6e-7.
        assert!(err < 1e-4, "{}: adapted logits relative error {err:e}", v.name());
        let base_logits = model.forward(&s0.0, &mut KvCache::new(&model.config), Logits::All);
        assert!(
            rel_err(&base_logits, &want) > 1e-2,
            "{}: the adapter must change the logits",
            v.name()
        );

        // Loss and gradients of the packed batch of both sequences.
        let batch = Batch::pack([(&s0.0[..], &s0.1[..]), (&s1.0[..], &s1.1[..])]);
        let inv = 1.0 / batch.label_count() as f32;
        let mut grads = vec![0f32; lora.len()];
        let loss = forward_backward(&model, &lora, &batch, inv, GradOptions::default(), &mut grads) * inv as f64;
        let want_loss = golden.f32("loss", &[]).unwrap()[0] as f64;
        // Measured at most 1.0e-7 relative to peft's loss.
        assert!(
            (loss - want_loss).abs() / want_loss < 1e-5,
            "{}: loss {loss} vs peft {want_loss}",
            v.name()
        );
        for (name, shape, range) in lora.named_ranges() {
            let want = golden.f32(&format!("{name}.grad"), &shape).unwrap();
            let err = rel_err(&grads[range], &want);
            // Predicted a little above the logits' ~1e-6 (longer chains of f32 sums); measured at
            // most 2.4e-6 for any A or B gradient, far below the bound.
            assert!(err < 1e-4, "{}: {name} gradient relative error {err:e}", v.name());
        }
    }
}
