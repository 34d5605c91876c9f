//! GGUF files (llama.cpp's format, versions 2 and 3), memory-mapped: metadata, tensor infos and
//! dequantized tensors. Every read is bounds-checked: a corrupt or truncated file is an error that
//! names the file and what was wrong, never a panic or an out-of-bounds read.
//!
//! Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
//! (key, u32 type, value), the tensor infos (name, u32 n_dims, u64 dims[n_dims], u32 type,
//! u64 offset), padding to `general.alignment` (default 32), then the tensor data. Dims are listed
//! fastest-first: a weight `[out, in]` row-major appears as `[in, out]`.

pub mod arch;
pub mod quants;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use quants::GgmlType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(x) => Some(x as u64),
            MetaValue::U16(x) => Some(x as u64),
            MetaValue::U32(x) => Some(x as u64),
            MetaValue::U64(x) => Some(x),
            MetaValue::I8(x) if x >= 0 => Some(x as u64),
            MetaValue::I16(x) if x >= 0 => Some(x as u64),
            MetaValue::I32(x) if x >= 0 => Some(x as u64),
            MetaValue::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(x) => Some(x as f64),
            MetaValue::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dims fastest-first, as stored (`[in, out]` for a weight).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub bytes: std::ops::Range<usize>,
}

impl TensorInfo {
    /// Row-major shape (slowest-first): `[out, in]` for a weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    map: Mmap,
}

/// A bounds-checked reader over the header bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "truncated: needed {n} bytes at offset {} of {}",
                self.pos,
                self.buf.len()
            )
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .context("string length past the end")?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8()?),
            1 => MetaValue::I8(self.u8()? as i8),
            2 => MetaValue::U16(self.u16()?),
            3 => MetaValue::I16(self.u16()? as i16),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(self.u32()? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32()?)),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    bail!("arrays nested too deeply");
                }
                let item = self.u32()?;
                let n = self.u64()?;
                // Every item takes at least one byte: a count beyond the file is corrupt.
                if n > (self.buf.len() - self.pos) as u64 {
                    bail!("array of {n} items cannot fit in the file");
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

impl GgufFile {
    /// Map and parse a GGUF file; errors name it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only mapping of a file we never write; see weights.rs.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Self::parse(map, path).with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    fn parse(map: Mmap, path: &Path) -> Result<GgufFile> {
        let (version, metadata, tensors) = parse_header(&map)?;
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            index,
            map,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor dequantized to f32, row-major.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .with_context(|| format!("tensor {name} not found in {}", self.path.display()))?;
        quants::dequantize(t.ty, &self.map[t.bytes.clone()], t.numel())
            .with_context(|| format!("tensor {name} in {}", self.path.display()))
    }
}

/// Write an HF directory for a GGUF model: config.json, tokenizer.json, and model.safetensors in bf16
/// under HF names and layouts (the rotary permutation undone), loadable by transformers.
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    use crate::load::arch::{Proj, TensorSource};
    let file = GgufFile::open(gguf)?;
    let in_file = || format!("in {}", gguf.display());
    let config_json = file.hf_config().with_context(in_file)?;
    let c = crate::load::config::ModelConfig::from_json(&config_json.to_string()).with_context(in_file)?;
    let src = arch::GgufTensors::new(&file)?;
    let (d, v) = (c.hidden_size, c.vocab_size);
    let mut names: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, d]),
        ("model.norm.weight".into(), vec![d]),
    ];
    if !c.tie_word_embeddings {
        names.push(("lm_head.weight".into(), vec![v, d]));
    }
    for l in 0..c.num_layers {
        names.push((format!("model.layers.{l}.input_layernorm.weight"), vec![d]));
        names.push((format!("model.layers.{l}.post_attention_layernorm.weight"), vec![d]));
        for p in Proj::ALL {
            names.push((format!("{}.weight", p.path(l)), p.shape(&c).to_vec()));
            if p.has_bias(&c) {
                names.push((format!("{}.bias", p.path(l)), vec![p.shape(&c)[0]]));
            }
        }
    }
    // Everything that can fail on the file's contents before anything is written.
    let tokenizer = file.tokenizer_json().with_context(in_file)?.to_string();
    tokenizers::Tokenizer::from_bytes(tokenizer.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("building the tokenizer of {}", gguf.display()))?;
    let mut tensors = Vec::with_capacity(names.len());
    for (name, shape) in names {
        let data = src.f32(&name, &shape)?;
        tensors.push((name, shape, data));
    }
    let ours = ["model.safetensors", "config.json", "tokenizer.json"];
    crate::load::weights::write_dir_atomic(out, &ours, |dir| {
        let bf16 = crate::load::weights::SaveDtype::BF16;
        crate::load::weights::save_safetensors(&dir.join("model.safetensors"), &tensors, bf16, None)?;
        let config = serde_json::to_string_pretty(&config_json)?;
        crate::load::weights::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        crate::load::weights::write_atomic(&dir.join("tokenizer.json"), tokenizer.as_bytes())
    })
}

/// Parse everything before the tensor data; check every tensor's bytes lie inside `buf`.
pub fn parse_header(buf: &[u8]) -> Result<(u32, HashMap<String, MetaValue>, Vec<TensorInfo>)> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4).ok() != Some(b"GGUF".as_slice()) {
        bail!("bad magic (not a GGUF file)");
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        bail!("GGUF version {version} is not supported (2 and 3 are)");
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    if n_tensors > buf.len() as u64 || n_kv > buf.len() as u64 {
        bail!("header counts ({n_tensors} tensors, {n_kv} metadata) cannot fit in the file");
    }
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let v = c.value(ty, 0).with_context(|| format!("metadata {key}"))?;
        metadata.insert(key, v);
    }
    let mut raw = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > 4 {
            bail!("tensor {name}: {n_dims} dimensions");
        }
        let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<u64>>>()?;
        let ty = c.u32()?;
        let offset = c.u64()?;
        raw.push((name, dims, ty, offset));
    }
    let align = match metadata.get("general.alignment") {
        Some(v) => v
            .as_u64()
            .filter(|&a| a > 0 && a.is_power_of_two())
            .context("general.alignment is not a power of two")?,
        None => 32,
    } as usize;
    let data_start = c.pos.div_ceil(align) * align;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ty, offset) in raw {
        let ty = GgmlType::from_id(ty).with_context(|| format!("tensor {name}: unknown type {ty}"))?;
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n <= 1 << 40)
            .with_context(|| format!("tensor {name}: shape {dims:?} overflows"))?;
        let size = ty
            .bytes_for(numel)
            .with_context(|| format!("tensor {name}: {numel} values is not whole {ty:?} blocks"))?;
        let start = (data_start as u64)
            .checked_add(offset)
            .filter(|_| offset % align as u64 == 0);
        let start = start.with_context(|| format!("tensor {name}: misaligned offset {offset}"))?;
        let end = start.checked_add(size).filter(|&e| e <= buf.len() as u64);
        let Some(end) = end else {
            bail!("tensor {name}: data ends past the end of the file (truncated?)")
        };
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            bytes: start as usize..end as usize,
        });
    }
    Ok((version, metadata, tensors))
}
