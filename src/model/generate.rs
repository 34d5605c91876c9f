//! Decoding with a KV cache: greedy continuations, and several candidates per prompt (the greedy
//! one, then sampled ones) decoded together.

use crate::model::forward::{KvCache, Logits, Model};
use crate::model::lora::LoraParams;
use crate::util::rng::Rng;

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

/// What a continuation may say next (a grammar, a database's names), asked before a token is
/// taken. Decoding with one chooses, among the tokens it allows, the one it would have chosen.
pub trait Constraint: Send + Sync {
    /// Whether prompt `p`'s continuation `so_far` may go on with `token`.
    fn allows(&self, p: usize, so_far: &[u32], token: u32) -> bool;
}

/// Tokens drawn at one sampled step before a constraint gives way (and its first choice is taken).
pub const CONSTRAINED_TRIES: usize = 64;

/// The token to take when `first` was chosen from `logits` ([vocab]) by `choose`: `first` if
/// `allowed`, else `choose` again with each refused token masked, at most [`CONSTRAINED_TRIES`]
/// tokens in all; if none is allowed, `first`.
pub fn constrained(
    first: u32,
    logits: &[f32],
    mut choose: impl FnMut(&[f32]) -> u32,
    allowed: impl Fn(u32) -> bool,
) -> u32 {
    if allowed(first) {
        return first;
    }
    let mut masked = logits.to_vec();
    masked[first as usize] = f32::NEG_INFINITY;
    for _ in 1..CONSTRAINED_TRIES {
        let t = choose(&masked);
        if masked[t as usize] == f32::NEG_INFINITY {
            break; // nothing left to choose from
        }
        if allowed(t) {
            return t;
        }
        masked[t as usize] = f32::NEG_INFINITY;
    }
    first
}

/// Tokens tried, best first, at one greedy step before a constraint gives way.
pub const CONSTRAINED_GREEDY_TRIES: usize = 512;

/// [`constrained`] for greedy decoding, where the choice is the logits' order: the allowed token
/// of highest logit among the [`CONSTRAINED_GREEDY_TRIES`] highest (ties to the lower id, as
/// [`argmax`]); `first` if none is allowed.
pub fn constrained_greedy(first: u32, logits: &[f32], allowed: impl Fn(u32) -> bool) -> u32 {
    if allowed(first) {
        return first;
    }
    let k = CONSTRAINED_GREEDY_TRIES.min(logits.len());
    let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
        ids.truncate(k);
    }
    ids.sort_unstable_by(order);
    ids.into_iter().find(|&t| allowed(t)).unwrap_or(first)
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

/// How the candidates after the first are drawn: from `softmax(logits / temperature)`, cut to the
/// smallest set of most likely tokens whose probabilities reach `top_p` (nucleus sampling).
/// Candidate 0 of every prompt is the greedy continuation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Where the call's prompts start in the whole set (a file cut into calls): the draws of
    /// prompt `i` of a call are those of prompt `first + i` of the set, so the cut changes nothing.
    pub first: usize,
}

impl Sampling {
    /// The generator of candidate `j` of prompt `i` (counted from [`Sampling::first`]): fixed by the
    /// seed, whatever the batching.
    pub fn rng(&self, i: usize, j: usize) -> Rng {
        let i = (self.first + i) as u64;
        let mut mix = Rng::new(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Rng::new(mix.next_u64() ^ (j as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// One token drawn from `logits` ([vocab]). NaN logits are never drawn; with no finite or
    /// infinite logit at all (a broken adapter) it answers as [`argmax`] does.
    pub fn draw(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        let t = self.temperature.max(1e-6);
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        // Tokens below max - 30 t have, all together, at most V e^-30 of the best one's probability
        // (under 1e-8 for 152k tokens): leaving them out keeps the sort short over a large vocabulary.
        let floor = max - 30.0 * t;
        let mut probs: Vec<(u32, f64)> = (logits.iter().enumerate())
            .filter(|(_, &v)| v >= floor)
            .map(|(i, &v)| (i as u32, (((v - max) / t) as f64).exp()))
            .collect();
        if probs.is_empty() {
            return argmax(logits);
        }
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut kept = 0.0;
        let mut n = 0;
        while n < probs.len() && (n == 0 || kept < self.top_p as f64 * total) {
            kept += probs[n].1;
            n += 1;
        }
        let mut u = rng.uniform() * kept;
        for &(id, p) in &probs[..n] {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs[n - 1].0
    }
}

/// Prompts that callers of [`greedy_batch`] decode together on the CPU: enough rows to share the
/// reads of the weights, few enough caches to keep.
pub const DECODE_GROUP: usize = 8;

/// Greedy continuations of several prompts, decoded together: each prompt runs on its own, then
/// every step runs one row per unfinished sequence ([`Model::forward_rows`]), so the rows share
/// each read of the weights. The same tokens as [`greedy`] on each prompt; with a constraint
/// `(c, p0)`, prompt j is the constraint's prompt `p0 + j`.
pub fn greedy_batch(
    model: &Model,
    lora: Option<&LoraParams>,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
    constraint: Option<(&dyn Constraint, usize)>,
) -> Vec<Vec<u32>> {
    if max_new == 0 {
        return vec![Vec::new(); prompts.len()];
    }
    let mut caches = Vec::with_capacity(prompts.len());
    let mut rows = Vec::with_capacity(prompts.len() * model.config.vocab_size); // [prompts, vocab]
    for p in prompts {
        let mut cache = KvCache::new(&model.config);
        rows.extend(model.forward_adapted(p, &mut cache, Logits::Last, lora));
        caches.push(cache);
    }
    decode_together(model, lora, caches, rows, max_new, eos, |j, so_far, row| {
        let first = argmax(row);
        match constraint {
            None => first,
            Some((c, p0)) => constrained_greedy(first, row, |t| c.allows(p0 + j, so_far, t)),
        }
    })
}

/// `n` continuations of `prompt`: the greedy one first, then `n - 1` drawn with `sampling` (`i`:
/// the prompt's index, which seeds its draws, and is the constraint's prompt). The prompt runs once; its cache is then copied for
/// each candidate, and the candidates decode together, one row each, until each has stopped (as
/// [`greedy`] stops).
#[allow(clippy::too_many_arguments)]
pub fn candidates(
    model: &Model,
    lora: Option<&LoraParams>,
    prompt: &[u32],
    n: usize,
    max_new: usize,
    eos: &[u32],
    sampling: &Sampling,
    i: usize,
    constraint: Option<&dyn Constraint>,
) -> Vec<Vec<u32>> {
    if max_new == 0 || n == 0 {
        return vec![Vec::new(); n];
    }
    let mut rngs: Vec<Rng> = (0..n).map(|j| sampling.rng(i, j)).collect();
    let mut cache = KvCache::new(&model.config);
    let logits = model.forward_adapted(prompt, &mut cache, Logits::Last, lora); // [1, vocab]
    decode_together(
        model,
        lora,
        vec![cache; n],
        logits.repeat(n),
        max_new,
        eos,
        |j, so_far, row| {
            let rng = &mut rngs[j];
            let mut choose = |r: &[f32]| match j {
                0 => argmax(r),
                _ => sampling.draw(r, rng),
            };
            let first = choose(row);
            match constraint {
                None => first,
                Some(c) if j == 0 => constrained_greedy(first, row, |t| c.allows(i, so_far, t)),
                Some(c) => constrained(first, row, choose, |t| c.allows(i, so_far, t)),
            }
        },
    )
}

/// Decode sequences together from their caches and the logits of their last positions (`rows`,
/// [sequences, vocab]): `pick(j, so_far, logits)` chooses sequence j's next token; a sequence stops after
/// a token in `eos` (kept) or at `max_new` tokens, and leaves the batch with its cache.
fn decode_together(
    model: &Model,
    lora: Option<&LoraParams>,
    mut caches: Vec<KvCache>,
    mut rows: Vec<f32>,
    max_new: usize,
    eos: &[u32],
    mut pick: impl FnMut(usize, &[u32], &[f32]) -> u32,
) -> Vec<Vec<u32>> {
    let v = model.config.vocab_size;
    let mut outs = vec![Vec::with_capacity(max_new); caches.len()];
    // The unfinished sequences, in order, beside their caches and their rows of logits.
    let mut live: Vec<usize> = (0..caches.len()).collect();
    loop {
        let (mut still, mut kept, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for ((j, cache), row) in live.into_iter().zip(caches).zip(rows.chunks(v)) {
            let id = pick(j, &outs[j], row);
            outs[j].push(id);
            if !eos.contains(&id) && outs[j].len() < max_new {
                still.push(j);
                kept.push(cache);
                ids.push(id);
            }
        }
        (live, caches) = (still, kept);
        if live.is_empty() {
            return outs;
        }
        rows = model.forward_rows(&ids, &mut caches, lora);
    }
}
