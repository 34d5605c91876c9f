//! A model path, opened once: an HF directory (config.json, safetensors, tokenizer.json) or a GGUF
//! file (metadata, tensors and vocabulary in one). Everything that reads a model starts here, so
//! "directory or GGUF" is decided in one place and a GGUF file is parsed once per run.

use super::arch::TensorSource;
use super::config::ModelConfig;
use super::gguf::arch::GgufTensors;
use super::gguf::GgufFile;
use super::tokenizer::Tokenizer;
use super::weights::Weights;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// An opened model: its config, and where its tensors and tokenizer come from.
pub struct ModelSource {
    path: PathBuf,
    /// The architecture, with the stop tokens of `generation_config.json` where a directory has one.
    pub config: ModelConfig,
    format: Format,
}

enum Format {
    /// An HF directory: the safetensors are memory-mapped when the tensors are asked for.
    Dir,
    /// A GGUF file, memory-mapped and its header parsed.
    Gguf(GgufFile),
}

/// Whether a model path names a GGUF file (rather than an HF directory).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Open the model at `path`. A path that is neither a directory nor a `.gguf` file is an error that
/// says so (rather than a missing config.json inside a directory that is not there).
pub fn open(path: &Path) -> Result<ModelSource> {
    let format = if is_gguf(path) {
        Format::Gguf(GgufFile::open(path)?)
    } else if path.is_dir() {
        Format::Dir
    } else if path.exists() {
        bail!(
            "{}: a model is an HF directory (config.json, safetensors, tokenizer.json) or a .gguf file",
            path.display()
        );
    } else {
        bail!("{}: no such model directory or .gguf file", path.display())
    };
    let config = match &format {
        Format::Dir => {
            let missing: Vec<&str> = (["config.json", "tokenizer.json"].into_iter())
                .filter(|f| !path.join(f).exists())
                .collect();
            if missing.contains(&"config.json") {
                bail!(
                    "{}: an HF model directory holds config.json, tokenizer.json and safetensors weights; \
                     this one has no {}",
                    path.display(),
                    missing.join(" and no ")
                );
            }
            let mut config = ModelConfig::from_file(&path.join("config.json"))?;
            config.add_generation_stops(path)?;
            config
        }
        Format::Gguf(file) => {
            let json = file.hf_config().with_context(|| format!("in {}", path.display()))?;
            ModelConfig::from_json(&json.to_string()).with_context(|| format!("in {}", path.display()))?
        }
    };
    Ok(ModelSource {
        path: path.to_path_buf(),
        config,
        format,
    })
}

impl ModelSource {
    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self.format, Format::Gguf(_))
    }

    /// The tensors, by HF name (a GGUF file's through the name and layout mapping).
    pub fn tensors(&self) -> Result<Box<dyn TensorSource + '_>> {
        Ok(match &self.format {
            Format::Dir => Box::new(Weights::open_dir(&self.path)?),
            Format::Gguf(file) => {
                Box::new(GgufTensors::new(file).with_context(|| format!("in {}", self.path.display()))?)
            }
        })
    }

    /// The tokenizer: `tokenizer.json` in a directory, or the GGUF file's own vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.format {
            Format::Dir => Tokenizer::from_file(&self.path.join("tokenizer.json")),
            Format::Gguf(file) => {
                let json =
                    (file.tokenizer_json()).with_context(|| format!("the vocabulary of {}", self.path.display()))?;
                Tokenizer::from_json(&json.to_string())
                    .with_context(|| format!("building the tokenizer of {}", self.path.display()))
            }
        }
    }
}
