//! A thin wrapper over the `tokenizers` crate: load tokenizer.json, encode raw text the way the
//! model's own post-processor says (BOS only if it adds one), decode without special tokens.

use anyhow::{anyhow, Context, Result};
use std::path::Path;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Load a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading tokenizer {}", path.display()))?;
        Ok(Tokenizer { inner })
    }

    /// A tokenizer from the text of a `tokenizer.json` (a GGUF file's vocabulary is rebuilt as one).
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow!("{e}"))?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` alone, without any special tokens (for text that continues a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, leaving out special tokens (BOS, EOS, chat markers).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of tokens the tokenizer knows (the model's vocab may be padded beyond it).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuse a tokenizer that can produce ids the model of `model` has no embedding for (its
    /// `vocab_size`), before any text is encoded.
    pub fn check_fits(&self, vocab_size: usize, model: &Path) -> Result<()> {
        let vocab = self.inner.get_vocab(true);
        if let Some((token, &id)) = vocab.iter().max_by_key(|(_, &id)| id) {
            anyhow::ensure!(
                (id as usize) < vocab_size,
                "the tokenizer of {} has token {token:?} with id {id}, outside the model's vocabulary of \
                 {vocab_size} (vocab_size in its config)",
                model.display()
            );
        }
        Ok(())
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
