//! `sqlora export-adapter`: a PEFT adapter rewritten in bf16 loads back as the same adapter to within
//! one bf16 rounding per value, at half the size; a broken adapter is refused naming the tensor, and
//! nothing is left at the output.

use sqlora::load::config::ModelConfig;
use sqlora::model::lora::LoraParams;
use sqlora::model::tiny::{tiny_adapter, write_tiny_model, TinyVariant};
use std::path::Path;
use std::process::Command;

fn sqlora(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sqlora")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p.join("adapter_model.safetensors")).unwrap().len()
}

#[test]
fn a_bf16_export_loads_back_within_one_rounding_at_half_the_size() {
    let model = tempfile::tempdir().unwrap();
    write_tiny_model(model.path(), TinyVariant::Llama).unwrap();
    let config = ModelConfig::from_file(&model.path().join("config.json")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (f32_dir, bf16_dir) = (work.path().join("f32"), work.path().join("bf16"));
    let mut lora = tiny_adapter(TinyVariant::Llama);
    // Values of every size, so that rounding is exercised (not only small random ones).
    for (i, v) in lora.data.iter_mut().enumerate() {
        *v = (i as f32 * 0.37).sin() * 10f32.powi((i % 7) as i32 - 3);
    }
    lora.save_peft(&f32_dir, "tiny").unwrap();
    let (code, err) = sqlora(&["export-adapter", "--adapter", s(&f32_dir), "--out", s(&bf16_dir)]);
    assert_eq!(code, Some(0), "{err}");

    let back = LoraParams::load_peft(&bf16_dir, &config).unwrap();
    assert_eq!(back.data.len(), lora.data.len());
    for (i, (&b, &a)) in back.data.iter().zip(&lora.data).enumerate() {
        // bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of it.
        assert!((b - a).abs() <= a.abs() * (1.0 / 256.0), "value {i}: {a} became {b}");
        assert_eq!(b, half::bf16::from_f32(a).to_f32(), "value {i} is not a's nearest bf16");
    }
    let (small, big) = (size(&bf16_dir), size(&f32_dir));
    assert!(
        small * 2 <= big + 4096 && small * 2 >= big - 4096,
        "{small} bytes against {big}"
    );
    assert_eq!(
        std::fs::read(bf16_dir.join("adapter_config.json")).unwrap(),
        std::fs::read(f32_dir.join("adapter_config.json")).unwrap()
    );
}

#[test]
fn a_non_finite_adapter_is_refused_and_nothing_is_written() {
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let mut lora = tiny_adapter(TinyVariant::Llama);
    let (name, _, range) = lora.named_ranges().remove(1);
    lora.data[range.start + 2] = f32::NAN;
    lora.save_peft(&src, "tiny").unwrap();
    let (code, err) = sqlora(&["export-adapter", "--adapter", s(&src), "--out", s(&dst)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&name) && err.contains("NaN"), "{err}");
    assert!(!dst.exists(), "a refused export left {}", dst.display());
    let (code, err) = sqlora(&[
        "export-adapter",
        "--adapter",
        s(&src),
        "--out",
        s(&dst),
        "--dtype",
        "f8",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--dtype f8"), "{err}");
}

#[test]
fn the_shipped_spider_adapter_is_whole_and_fits_qwen() {
    // adapters/qwen2.5-coder-0.5b-spider: PEFT files for Qwen2.5-Coder-0.5B, bf16, under 25 MB,
    // every tensor present with Qwen's shapes, finite, and trained (B no longer zero).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters/qwen2.5-coder-0.5b-spider");
    assert!(size(&dir) < 25 << 20, "{} bytes", size(&dir));
    let config = sqlora::bench::shape_config("qwen2.5-0.5b").unwrap();
    let lora = LoraParams::load_peft(&dir, &config).unwrap();
    assert_eq!(lora.config.r, 16);
    assert_eq!(lora.config.targets.len(), 7);
    assert_eq!(lora.len(), 8_798_208, "r 16 on all seven projections of 24 layers");
    assert!(lora.data.iter().all(|v| v.is_finite()));
    let b_norm: f64 = (lora.named_ranges().into_iter())
        .filter(|(name, _, _)| name.contains("lora_B"))
        .flat_map(|(_, _, r)| lora.data[r].iter().map(|&v| (v as f64).powi(2)).collect::<Vec<_>>())
        .sum();
    assert!(b_norm > 1e-6, "B is trained: |B|^2 = {b_norm}");
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "Qwen/Qwen2.5-Coder-0.5B-Instruct");
    assert!(dir.join("README.md").is_file() && dir.join("curves.png").is_file());
}
