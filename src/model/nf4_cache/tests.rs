use super::*;
use crate::model::tiny::{write_tiny_model, TinyVariant};

fn cpu(w: &[f32], shape: &[usize]) -> Result<Nf4Tensor> {
    Ok(Nf4Tensor::quantize(w, shape))
}

/// Every projection of `a` and `b`: the same NF4 bytes and the same biases; and the same dense
/// tensors.
fn assert_same(a: &Model, b: &Model) {
    assert_eq!(a.layers.len(), b.layers.len());
    for (i, (la, lb)) in a.layers.iter().zip(&b.layers).enumerate() {
        for p in Proj::ALL {
            let (pa, pb) = (la.proj(p), lb.proj(p));
            match (&pa.weight, &pb.weight) {
                (LinearWeight::Nf4(x), LinearWeight::Nf4(y)) => assert_eq!(x, y, "{}", p.path(i)),
                _ => panic!("{}: not NF4 in both", p.path(i)),
            }
            assert_eq!(pa.bias, pb.bias, "{} bias", p.path(i));
        }
        assert_eq!(la.attn_norm, lb.attn_norm);
        assert_eq!(la.mlp_norm, lb.mlp_norm);
    }
    match (&a.embed.weight, &b.embed.weight) {
        (LinearWeight::Dense(x), LinearWeight::Dense(y)) => assert_eq!(x, y, "embedding"),
        _ => panic!("the embedding is not dense in both"),
    }
    assert_eq!(a.norm, b.norm);
}

/// Date every file of a model directory `secs` seconds back: a source written in the last 2 s is
/// not cached (its time could still hide a change).
fn age(dir: &Path, secs: u64) {
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    for e in std::fs::read_dir(dir).unwrap() {
        let f = std::fs::File::options().write(true).open(e.unwrap().path()).unwrap();
        f.set_modified(then).unwrap();
    }
}

/// A tiny model written to `dir` and dated a minute back.
fn write_old(dir: &Path, v: TinyVariant) {
    write_tiny_model(dir, v).unwrap();
    age(dir, 60);
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn the_cached_model_is_the_quantized_model_and_is_read_back() {
    for v in [TinyVariant::Llama, TinyVariant::Qwen2] {
        let tmp = tempfile::tempdir().unwrap();
        let (model_dir, cache) = (tmp.path().join("m"), tmp.path().join("nf4"));
        write_old(&model_dir, v);
        let src = crate::load::open(&model_dir).unwrap();
        let fresh = Model::from_source(&src, Some(&cpu)).unwrap();

        let first = load(&src, &cpu, &cache).unwrap();
        assert_same(&first, &fresh);
        let files = cache_files(&cache);
        assert_eq!(files.len(), 1, "one cache file, no temporary left: {files:?}");

        // The second load must come from the file: a quantizer that fails proves it is not called.
        let refuse = |_: &[f32], _: &[usize]| -> Result<Nf4Tensor> { bail!("quantized again") };
        let second = load(&src, &refuse, &cache).unwrap();
        assert_same(&second, &fresh);
        assert_eq!(cache_files(&cache), files);
    }
}

#[test]
fn a_changed_source_or_a_damaged_cache_is_quantized_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, cache) = (tmp.path().join("m"), tmp.path().join("nf4"));
    write_old(&model_dir, TinyVariant::Qwen2);
    let src = crate::load::open(&model_dir).unwrap();
    load(&src, &cpu, &cache).unwrap();
    let file = cache_files(&cache).remove(0);
    let refuse = |_: &[f32], _: &[usize]| -> Result<Nf4Tensor> { bail!("quantized again") };

    // Other weights under the same path: a new modification time makes the stamp differ, and the
    // refusing quantizer is called (the error says so), so the stale cache was not used.
    write_tiny_model(&model_dir, TinyVariant::Qwen2Tied).unwrap();
    age(&model_dir, 30);
    let src = crate::load::open(&model_dir).unwrap();
    let Err(err) = load(&src, &refuse, &cache) else {
        panic!("the stale cache was used")
    };
    assert!(format!("{err:#}").contains("quantized again"), "{err:#}");
    let fresh = Model::from_source(&src, Some(&cpu)).unwrap();
    assert_same(&load(&src, &cpu, &cache).unwrap(), &fresh);
    assert_same(&load(&src, &refuse, &cache).unwrap(), &fresh);

    // A truncated cache file: reported, quantized again, and replaced by a whole one.
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load(&src, &refuse, &cache).is_err());
    assert_same(&load(&src, &cpu, &cache).unwrap(), &fresh);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), bytes.len() as u64);
    assert_same(&load(&src, &refuse, &cache).unwrap(), &fresh);

    // A cache file from another format: quantized again.
    let w = Weights::open_files(std::slice::from_ref(&file)).unwrap();
    let name = format!("{}.weight.nf4", Proj::ALL[0].path(0));
    assert_eq!(w.metadata_of(&name).unwrap()["format"], FORMAT);
    std::fs::write(&file, b"not a safetensors file").unwrap();
    assert!(load(&src, &refuse, &cache).is_err());
}

#[test]
fn a_source_written_just_now_is_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, cache) = (tmp.path().join("m"), tmp.path().join("nf4"));
    write_tiny_model(&model_dir, TinyVariant::Llama).unwrap();
    let src = crate::load::open(&model_dir).unwrap();
    assert_same(
        &load(&src, &cpu, &cache).unwrap(),
        &Model::from_source(&src, Some(&cpu)).unwrap(),
    );
    assert!(!cache.exists() || cache_files(&cache).is_empty());
}

#[test]
fn a_cache_that_cannot_be_written_does_not_fail_the_load() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("m");
    write_old(&model_dir, TinyVariant::Llama);
    // The cache "directory" is a file: nothing can be written under it.
    let blocked = tmp.path().join("blocked");
    std::fs::write(&blocked, b"").unwrap();
    let src = crate::load::open(&model_dir).unwrap();
    let fresh = Model::from_source(&src, Some(&cpu)).unwrap();
    assert_same(&load(&src, &cpu, &blocked.join("nf4")).unwrap(), &fresh);
    assert!(blocked.is_file());
}

#[test]
fn two_sources_get_two_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("nf4");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_old(&a, TinyVariant::Llama);
    write_old(&b, TinyVariant::LlamaTied);
    let (sa, sb) = (crate::load::open(&a).unwrap(), crate::load::open(&b).unwrap());
    load(&sa, &cpu, &cache).unwrap();
    load(&sb, &cpu, &cache).unwrap();
    assert_eq!(cache_files(&cache).len(), 2);
    assert_same(
        &load(&sb, &cpu, &cache).unwrap(),
        &Model::from_source(&sb, Some(&cpu)).unwrap(),
    );
}

#[test]
fn tiny_models_are_not_cached_and_real_ones_are() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(&tmp.path().join("m"), TinyVariant::Llama).unwrap();
    let tiny = crate::load::open(&tmp.path().join("m")).unwrap();
    assert!(!worth_caching(&tiny.config));
    // SmolLM2-135M's shape: 30 layers of d 576, ffn 1536, 3 KV heads of 64: 106M projection weights.
    let mut c = tiny.config.clone();
    (c.hidden_size, c.intermediate_size, c.num_layers) = (576, 1536, 30);
    (c.num_heads, c.num_kv_heads, c.head_dim) = (9, 3, 64);
    assert!(worth_caching(&c));
}
