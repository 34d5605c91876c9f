//! Greedy decoding with a KV cache: the prompt is run once, then one token per step.

use crate::lora::LoraParams;
use crate::model::{KvCache, Logits, Model};

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of `prompt` (with adapters, if given): at most `max_new` tokens, stopping
/// after the first token in `eos` (which is included in the result, as transformers' `generate`
/// includes it).
pub fn greedy(model: &Model, lora: Option<&LoraParams>, prompt: &[u32], max_new: usize, eos: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(max_new);
    if max_new == 0 {
        return out;
    }
    let mut cache = KvCache::new(&model.config);
    let mut logits = model.forward_adapted(prompt, &mut cache, Logits::Last, lora);
    loop {
        let next = argmax(&logits);
        out.push(next);
        if eos.contains(&next) || out.len() == max_new {
            return out;
        }
        logits = model.forward_adapted(&[next], &mut cache, Logits::Last, lora);
    }
}
