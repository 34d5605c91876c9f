//! Weights from safetensors files, memory-mapped: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Tensors are read on demand and converted to f32.
//!
//! Every error names the file and, where there is one, the tensor.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where one tensor lives: which file, its dtype and shape, and its bytes within the mapping.
#[derive(Clone, Debug)]
struct TensorInfo {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

/// A set of memory-mapped safetensors files, indexed by tensor name.
pub struct Weights {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    /// Per file: the free-form `__metadata__` of its header.
    metadata: Vec<HashMap<String, String>>,
    tensors: HashMap<String, TensorInfo>,
}

impl Weights {
    /// Open the weights of an HF model directory: `model.safetensors.index.json` if present
    /// (sharded), else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Weights> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("malformed {}", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
            let mut shards: BTreeMap<&str, ()> = BTreeMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .with_context(|| format!("{}: shard of {name} is not a string", index.display()))?;
                shards.insert(file, ());
            }
            let paths: Vec<PathBuf> = shards.keys().map(|f| dir.join(f)).collect();
            let weights = Weights::open_files(&paths)?;
            for name in map.keys() {
                if !weights.tensors.contains_key(name) {
                    bail!(
                        "{} lists tensor {name}, but its shard does not hold it",
                        index.display()
                    );
                }
            }
            Ok(weights)
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                bail!(
                    "{} has neither model.safetensors nor model.safetensors.index.json",
                    dir.display()
                );
            }
            Weights::open_files(&[single])
        }
    }

    /// Map and validate the given safetensors files. A truncated or malformed file is an error
    /// naming it; so is a tensor name that appears in two files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Weights> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut metadata = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the mapping is read-only; sqlora never writes the files it maps. A file changed
            // underneath us by another process could change what we read, as with any mmap reader.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
            let st = SafeTensors::deserialize(&map).with_context(|| {
                format!(
                    "{} is not a valid safetensors file (truncated or corrupt?)",
                    path.display()
                )
            })?;
            let (_, header) =
                SafeTensors::read_metadata(&map).with_context(|| format!("header of {}", path.display()))?;
            metadata.push(header.metadata().clone().unwrap_or_default());
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let info = TensorInfo {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                if let Some(prev) = tensors.insert(name.clone(), info) {
                    bail!(
                        "tensor {name} is in both {} and {}",
                        paths[prev.file].display(),
                        path.display()
                    );
                }
            }
            maps.push(map);
        }
        Ok(Weights {
            paths: paths.to_vec(),
            maps,
            metadata,
            tensors,
        })
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Shape of a tensor, or an error naming the files searched.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.info(name)?.shape)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .with_context(|| format!("tensor {name} not found in {}", self.describe_files()))
    }

    fn describe_files(&self) -> String {
        self.paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The `__metadata__` entries of the file holding `name`.
    pub fn metadata_of(&self, name: &str) -> Result<&HashMap<String, String>> {
        Ok(&self.metadata[self.info(name)?.file])
    }

    /// Read an integer tensor (I64, I32, U32) of any shape as i64.
    pub fn ints(&self, name: &str) -> Result<Vec<i64>> {
        let info = self.info(name)?;
        let bytes = &self.maps[info.file][info.bytes.clone()];
        let word = |b: &[u8]| -> [u8; 4] { [b[0], b[1], b[2], b[3]] };
        Ok(match info.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(word(b)) as i64)
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(word(b)) as i64)
                .collect(),
            other => bail!(
                "tensor {name} in {} has dtype {other:?}, not an integer type",
                self.paths[info.file].display()
            ),
        })
    }

    /// The bytes of a U8 tensor, checking its shape.
    pub fn u8s(&self, name: &str, shape: &[usize]) -> Result<&[u8]> {
        let info = self.info(name)?;
        let path = self.paths[info.file].display();
        if info.dtype != Dtype::U8 || info.shape != shape {
            bail!(
                "tensor {name} in {path} is {:?} {:?}, expected U8 {shape:?}",
                info.dtype,
                info.shape
            );
        }
        Ok(&self.maps[info.file][info.bytes.clone()])
    }

    /// Read a tensor as f32, checking its shape. Accepts F32, F16 and BF16 storage.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let path = self.paths[info.file].display();
        if info.shape != shape {
            bail!("tensor {name} in {path} has shape {:?}, expected {shape:?}", info.shape);
        }
        let bytes = &self.maps[info.file][info.bytes.clone()];
        let out = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!("tensor {name} in {path} has dtype {other:?}; sqlora reads F32, F16 and BF16"),
        };
        Ok(out)
    }
}

/// Storage dtype when writing tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
    BF16,
}

/// Write named f32 tensors to a safetensors file, converting to `dtype`. The file is written to a
/// temporary name beside the target and renamed into place, so a reader never sees half a file.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: SaveDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes = match dtype {
                SaveDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                SaveDtype::F16 => data.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
                SaveDtype::BF16 => data.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            };
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::F16 => Dtype::F16,
        SaveDtype::BF16 => Dtype::BF16,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .with_context(|| format!("tensor {name}: data does not match shape {shape:?}"))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata).with_context(|| format!("serializing {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Fill the directory `out` through `fill`, which writes into a sibling staging directory that
/// takes the place of `out` only when everything is written: a failure leaves `out` as it was (and
/// no staging directory). An existing `out` is replaced only if it holds nothing but files named in
/// `ours` (an earlier run's output); anything else there is refused before any work.
pub fn write_dir_atomic(out: &Path, ours: &[&str], fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() {
        let entries = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("reading {}", out.display()))?;
            let name = e.file_name();
            anyhow::ensure!(
                e.path().is_file() && ours.iter().any(|o| name == *o),
                "{} holds {}, which this command does not write: choose another --out",
                out.display(),
                name.to_string_lossy()
            );
        }
    }
    let name = out
        .file_name()
        .with_context(|| format!("{} names no directory", out.display()))?;
    let staging = out.with_file_name(format!("{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let done = fill(&staging).and_then(|()| {
        if out.exists() {
            std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
        }
        std::fs::rename(&staging, out).with_context(|| format!("renaming {} to {}", staging.display(), out.display()))
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    done
}

/// Write a file via a temporary sibling and a rename: the target is either the old or the new file.
/// The temporary name carries the process id and a count, so two writers of one target (two runs
/// filling one cache, two threads) cannot mix their bytes; the last rename wins. A failed write
/// leaves no temporary file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.{}-{count}.tmp-write", std::process::id()));
    let done = std::fs::write(&tmp, bytes)
        .with_context(|| format!("writing {} (through {})", path.display(), tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}
