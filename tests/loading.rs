//! Model loading: sharded checkpoints, dtype handling, and clear errors for bad input.

use sqlora::load::weights::{save_safetensors, SaveDtype};
use sqlora::model::forward::{KvCache, Logits, Model};
use sqlora::model::tiny::{tiny_tensors, write_tiny_model, TinyVariant};
use std::path::Path;

fn tiny(v: TinyVariant) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), v).unwrap();
    dir
}

fn logits(dir: &Path) -> Vec<f32> {
    let model = Model::load_dir(dir).unwrap();
    let mut cache = KvCache::new(&model.config);
    model.forward(&[1, 200, 37, 99, 5], &mut cache, Logits::All)
}

/// The full error chain, as the binaries print it.
fn load_err(dir: &Path) -> String {
    match Model::load_dir(dir) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let single = tiny(TinyVariant::Qwen2);
    let sharded = tiny(TinyVariant::Qwen2);
    let d = sharded.path();
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    // Split the tensors over two shards, as HF does for big models, and write the index.
    let tensors = tiny_tensors(TinyVariant::Qwen2);
    let (a, b) = tensors.split_at(tensors.len() / 2);
    save_safetensors(&d.join("model-00001-of-00002.safetensors"), a, SaveDtype::BF16, None).unwrap();
    save_safetensors(&d.join("model-00002-of-00002.safetensors"), b, SaveDtype::BF16, None).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(
            b.iter()
                .map(|t| (t.0.clone(), "model-00002-of-00002.safetensors".into())),
        )
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(single.path()), logits(d));

    // A shard named by the index but missing on disk is an error naming it.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(d);
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn malformed_config_names_the_file() {
    let dir = tiny(TinyVariant::Llama);
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"llama\", \"hidden_size\": 64,",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("malformed"), "{err}");
}

#[test]
fn unknown_model_type_is_named() {
    let dir = tiny(TinyVariant::Llama);
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&path, text).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("unsupported model_type \"gpt_neox\""), "{err}");
}

#[test]
fn missing_tensor_is_named_with_the_file() {
    let dir = tiny(TinyVariant::Llama);
    let tensors: Vec<_> = tiny_tensors(TinyVariant::Llama)
        .into_iter()
        .filter(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
        .collect();
    save_safetensors(&dir.path().join("model.safetensors"), &tensors, SaveDtype::BF16, None).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("tensor model.layers.1.mlp.up_proj.weight not found"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let dir = tiny(TinyVariant::Qwen2);
    let tensors: Vec<_> = tiny_tensors(TinyVariant::Qwen2)
        .into_iter()
        .map(|(name, shape, data)| {
            if name == "model.layers.0.self_attn.k_proj.weight" {
                // Same element count, transposed shape: only the shape check can catch it.
                (name, vec![shape[1], shape[0]], data)
            } else {
                (name, shape, data)
            }
        })
        .collect();
    save_safetensors(&dir.path().join("model.safetensors"), &tensors, SaveDtype::BF16, None).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.layers.0.self_attn.k_proj.weight"), "{err}");
    assert!(err.contains("[64, 16]") && err.contains("expected [16, 64]"), "{err}");
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = tiny(TinyVariant::Llama);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    // A file cut inside its header is caught too.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_bias_is_explained() {
    let dir = tiny(TinyVariant::Qwen2);
    let tensors: Vec<_> = tiny_tensors(TinyVariant::Qwen2)
        .into_iter()
        .filter(|t| t.0 != "model.layers.2.self_attn.v_proj.bias")
        .collect();
    save_safetensors(&dir.path().join("model.safetensors"), &tensors, SaveDtype::BF16, None).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.2.self_attn.v_proj.bias") && err.contains("bias"),
        "{err}"
    );
}

#[test]
fn empty_directory_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn quantizing_while_loading_gives_the_same_nf4_model() {
    use sqlora::model::cpu::LinearWeight;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Qwen2).unwrap();
    let after = Model::load(dir.path()).unwrap().quantize_nf4();
    let streamed = Model::load_as(dir.path(), true).unwrap();
    for (a, b) in after.layers.iter().zip(&streamed.layers) {
        for (pa, pb) in a.proj.iter().zip(&b.proj) {
            let (LinearWeight::Nf4(qa), LinearWeight::Nf4(qb)) = (&pa.weight, &pb.weight) else {
                panic!("every projection is NF4");
            };
            assert_eq!(qa.packed, qb.packed);
            assert_eq!(qa.absmax(), qb.absmax());
            assert_eq!(pa.bias, pb.bias);
        }
    }
}

#[test]
fn a_device_quantizer_loads_the_same_model_and_its_failure_names_the_tensor() {
    use sqlora::engine::{host::Host, prelude::*};
    use sqlora::model::cpu::LinearWeight;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    let on_cpu = Model::load_as(dir.path(), true).unwrap();
    let calls = std::cell::Cell::new(0);
    let device = |w: &[f32], s: &[usize]| {
        calls.set(calls.get() + 1);
        Host.quantize_nf4(w, s)
    };
    let loaded = Model::load_with(dir.path(), Some(&device)).unwrap();
    assert_eq!(calls.get(), 7 * on_cpu.layers.len(), "one call per projection");
    for (a, b) in on_cpu.layers.iter().zip(&loaded.layers) {
        for (pa, pb) in a.proj.iter().zip(&b.proj) {
            let (LinearWeight::Nf4(qa), LinearWeight::Nf4(qb)) = (&pa.weight, &pb.weight) else {
                panic!("every projection is NF4");
            };
            assert_eq!(qa, qb);
        }
    }
    let failing = |_: &[f32], _: &[usize]| -> anyhow::Result<sqlora::model::nf4::Nf4Tensor> {
        anyhow::bail!("out of device memory")
    };
    let Err(err) = Model::load_with(dir.path(), Some(&failing)) else {
        panic!("a failing quantizer fails the load");
    };
    let err = format!("{err:#}");
    assert!(
        err.contains("quantizing model.layers.0.self_attn.q_proj") && err.contains("out of device memory"),
        "{err}"
    );
}
