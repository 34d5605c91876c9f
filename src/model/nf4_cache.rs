//! The NF4 cache: a model's quantized projections, kept on disk after the first load, so that a
//! later run reads ~0.56 bytes per weight instead of decoding the source (for a GGUF file, its own
//! quantization) and quantizing every projection again. `ask` pays this on every call: for
//! Qwen2.5-0.5B from Q4_K_M it was most of the time before the first token.
//!
//! One safetensors file per model source, in `cache_dir()/nf4/`, named by the source's path and
//! stamped (in its metadata) with the size and modification time of each of the source's files. A
//! file whose stamp does not match, or that cannot be read, is quantized again and replaced. The
//! file is written under a temporary name and renamed, so no reader sees half of one. The cache
//! holds only what [`Nf4Tensor::quantize`] writes, byte for byte; norms, biases and the embedding
//! still come from the source.
//!
//! Per projection (`model.layers.{i}.{proj}.weight`), four tensors:
//! - `{name}.nf4`: `[ceil(out*in/2)] u8`, the packed codes;
//! - `{name}.qabsmax`: `[ceil(out*in/64)] u8`, the double-quantized block scales;
//! - `{name}.absmax2`: `[ceil(nblocks/256)] f32`, the scales of those;
//! - `{name}.offset`: `[1] f32`, their mean.

use crate::load::arch::Proj;
use crate::load::config::ModelConfig;
use crate::load::source::ModelSource;
use crate::load::weights::Weights;
use crate::model::cpu::LinearWeight;
use crate::model::forward::Model;
use crate::model::nf4::{DoubleQuant, Nf4Tensor, Quantizer, BLOCK, DQ_BLOCK};
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What the cache file's `format` entry says; a file with anything else is quantized again. The
/// crate's version is part of it, so that a release whose quantizer or decoders change does not
/// read an older release's bytes.
const FORMAT: &str = concat!(
    "sqlora ",
    env!("CARGO_PKG_VERSION"),
    " NF4 cache: blocks of 64, double-quantized scales in blocks of 256"
);

/// The cache directory `ask`, `predict` and `train` use: `cache_dir()/nf4`, or none when
/// `SQLORA_NF4_CACHE` is `off` (or no cache directory can be named).
pub fn default_dir() -> Option<PathBuf> {
    if std::env::var("SQLORA_NF4_CACHE").is_ok_and(|v| v == "off") {
        return None;
    }
    crate::load::fetch::cache_dir().ok().map(|d| d.join("nf4"))
}

/// Projection weights below which a model is quantized afresh each time: a test's tiny model
/// takes milliseconds, and would only fill the cache.
pub const MIN_WEIGHTS: usize = 20_000_000;

/// Whether a model is big enough to cache: at least [`MIN_WEIGHTS`] projection weights.
pub fn worth_caching(c: &ModelConfig) -> bool {
    let per_layer: usize = Proj::ALL.iter().map(|p| p.shape(c).iter().product::<usize>()).sum();
    per_layer * c.num_layers >= MIN_WEIGHTS
}

/// The model of `src` with its projections in NF4: read from the cache in `dir` when it holds this
/// source's (same files, sizes and times), else quantized by `quantize` and written there. The cache
/// never makes a load fail: a cache that cannot be read or written is reported and passed by.
pub fn load(src: &ModelSource, quantize: &Quantizer, dir: &Path) -> Result<Model> {
    let stamp = match stamp(src) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("not caching the NF4 weights of {}: {e:#}", src.path().display());
            return Model::from_source(src, Some(quantize));
        }
    };
    let file = dir.join(file_name(src.path()));
    if file.exists() {
        match read(src, &file, &stamp.0) {
            Ok(model) => return Ok(model),
            Err(e) => eprintln!("{}: {e:#}; quantizing again", file.display()),
        }
    }
    let model = Model::from_source(src, Some(quantize))?;
    // A source written in the last 2 s could still change without its time changing (coarse file
    // times): not cached, as `fetch` does with its checks.
    if stamp.1 + 2_000_000_000 > now_ns() {
        return Ok(model);
    }
    let stamp = stamp.0;
    match write(&model, &file, &stamp) {
        Ok(()) => eprintln!("{}: NF4 weights cached for the next run", file.display()),
        Err(e) => eprintln!("could not cache the NF4 weights in {}: {e:#}", file.display()),
    }
    Ok(model)
}

/// The cache file's name: the source's file name and a fingerprint of its full path.
fn file_name(source: &Path) -> String {
    let full = source.canonicalize().unwrap_or_else(|_| source.to_path_buf());
    let stem = full
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let hash = crate::util::fnv1a64(full.to_string_lossy().as_bytes());
    format!("{stem}-{hash:016x}.nf4.safetensors")
}

/// Nanoseconds since the epoch, now.
fn now_ns() -> u128 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_nanos())
}

/// Every file the weights come from (the GGUF file, or a directory's safetensors), with its size and
/// modification time: the cache is valid while this is unchanged. Also the newest of the times.
fn stamp(src: &ModelSource) -> Result<(String, u128)> {
    let mut files = if src.is_gguf() {
        vec![src.path().to_path_buf()]
    } else {
        let dir = std::fs::read_dir(src.path()).with_context(|| format!("reading {}", src.path().display()))?;
        let mut v = Vec::new();
        for e in dir {
            let p = e.with_context(|| format!("reading {}", src.path().display()))?.path();
            if p.extension().is_some_and(|x| x == "safetensors" || x == "json") {
                v.push(p);
            }
        }
        v
    };
    files.sort();
    let (mut out, mut newest) = (String::new(), 0);
    for f in files {
        let meta = std::fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
        let time = meta
            .modified()
            .with_context(|| format!("the modification time of {}", f.display()))?;
        let ns = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        out += &format!("{} {} {ns}\n", f.display(), meta.len());
        newest = newest.max(ns);
    }
    Ok((out, newest))
}

/// The model from the cache file, if its format and stamp are this source's.
fn read(src: &ModelSource, file: &Path, stamp: &str) -> Result<Model> {
    let w = Weights::open_files(&[file.to_path_buf()])?;
    let first = format!("{}.weight.nf4", Proj::ALL[0].path(0));
    let meta = w.metadata_of(&first)?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("not an NF4 cache of this version");
    }
    if meta.get("source").map(String::as_str) != Some(stamp) {
        bail!("made from other files than {} holds now", src.path().display());
    }
    let c = &src.config;
    let nf4 = |p: Proj, i: usize| -> Result<Nf4Tensor> {
        let name = format!("{}.weight", p.path(i));
        let [out, inp] = p.shape(c);
        let n = out * inp;
        let blocks = n.div_ceil(BLOCK);
        let packed = w.u8s(&format!("{name}.nf4"), &[n.div_ceil(2)])?.to_vec();
        let scales = DoubleQuant {
            qabsmax: w.u8s(&format!("{name}.qabsmax"), &[blocks])?.to_vec(),
            absmax2: w.f32(&format!("{name}.absmax2"), &[blocks.div_ceil(DQ_BLOCK)])?,
            offset: w.f32(&format!("{name}.offset"), &[1])?[0],
        };
        Ok(Nf4Tensor::from_quantized(&[out, inp], packed, scales))
    };
    let model = Model::from_weights_nf4(c.clone(), &*src.tensors()?, &nf4);
    model.with_context(|| format!("in {}", src.path().display()))
}

/// A tensor to write: name, dtype, shape, bytes.
type Part<'a> = (String, safetensors::Dtype, Vec<usize>, Cow<'a, [u8]>);

/// Write the model's NF4 projections to `file`, stamped.
fn write(model: &Model, file: &Path, stamp: &str) -> Result<()> {
    let c: &ModelConfig = &model.config;
    let mut parts: Vec<Part> = Vec::new();
    for i in 0..c.num_layers {
        for p in Proj::ALL {
            let name = format!("{}.weight", p.path(i));
            let LinearWeight::Nf4(q) = &model.layers[i].proj(p).weight else {
                bail!("{name} is not in NF4");
            };
            let f32s = |v: &[f32]| Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect());
            let s = &q.scales;
            parts.push((
                format!("{name}.nf4"),
                safetensors::Dtype::U8,
                vec![q.packed.len()],
                Cow::Borrowed(&q.packed[..]),
            ));
            parts.push((
                format!("{name}.qabsmax"),
                safetensors::Dtype::U8,
                vec![s.qabsmax.len()],
                Cow::Borrowed(&s.qabsmax[..]),
            ));
            parts.push((
                format!("{name}.absmax2"),
                safetensors::Dtype::F32,
                vec![s.absmax2.len()],
                f32s(&s.absmax2),
            ));
            parts.push((
                format!("{name}.offset"),
                safetensors::Dtype::F32,
                vec![1],
                f32s(&[s.offset]),
            ));
        }
    }
    let views = parts
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), &bytes[..])?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("source".to_string(), stamp.to_string()),
    ]);
    let dir = file.parent().context("the cache file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Streamed to a temporary file (not built in memory: 4 GB for an 8B model), then renamed.
    let name = file
        .file_name()
        .map_or("cache".into(), |n| n.to_string_lossy().into_owned());
    let tmp = file.with_file_name(format!(".{name}.{}.partial", std::process::id()));
    let done = safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, file).map_err(anyhow::Error::from));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

#[cfg(test)]
mod tests;
