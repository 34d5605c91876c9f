//! Batched generation on a device, with a KV cache: the device twin of `generate::greedy` and
//! `generate::candidates`.
//!
//! The prompts of a chunk are packed and run once (prefill), their keys and values written into a
//! cache that gives sequence b the rows `b * S .. (b + 1) * S` (S: the longest prompt plus the new
//! tokens); then each step runs one new token per unfinished sequence against its cache rows. Only
//! the logits of each sequence's last position are computed, and the argmax is taken on the device:
//! one token id per sequence comes back per step.
//!
//! Prompts that begin as an earlier prompt of the chunk does (questions over one database share
//! its schema; the candidates of one question share all of it) are not run from their start: the
//! shared start's keys and values are copied from the earlier prompt's cache rows, and only the
//! rest runs, a row per token against the cache, as decoding runs ([`plan_starts`]). A Spider
//! prompt is ~1,700 tokens of schema and ~30 of question, so a chunk of questions over one
//! database costs about one prefill, and n candidates cost one prefill, not n.

use super::layer::Attn;
use super::Engine;
use crate::engine::{Bf, Device};
use crate::model::autograd::Batch;
use crate::model::generate::{argmax, constrained, constrained_greedy, Sampling};
use crate::model::lora::LoraParams;
use crate::util::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

/// The KV cache and the index buffers of generation.
pub(super) struct GenCache<D: Device> {
    /// Per layer: [rows, h_kv, hd] keys and values, after RoPE.
    pub(super) k: Vec<Bf<D>>,
    pub(super) v: Vec<Bf<D>>,
    pub(super) rows: usize,
    /// [cap] the cache row of each token of the current call.
    pub(super) slot: D::Buf<i32>,
    /// [cap] first cache row and number of cached keys of each decoded sequence.
    pub(super) key_start: D::Buf<i32>,
    pub(super) key_len: D::Buf<i32>,
    /// [cap] the packed row of each prompt's last token.
    last: D::Buf<i32>,
    /// [cap] the cache rows a shared start is copied from (to the rows in `slot`).
    from: D::Buf<i32>,
    /// [cap] the greedy choice of each row of logits.
    next: D::Buf<i32>,
}

/// How candidates are drawn: sequence g is candidate `g % n` of prompt `g / n`, with generator
/// `rngs[g]`.
struct Draw {
    sampling: Sampling,
    n: usize,
    rngs: Vec<Rng>,
}

/// A chunk's cache holds at most this many times the engine's token capacity in rows: prompts that
/// share a start fit many more per chunk than their tokens, but each takes its own rows.
const CACHE_ROWS_PER_CAP: usize = 4;

/// How a prompt of a chunk gets into the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Run from its first token (a prefill).
    Whole,
    /// Its first `shared` tokens are those of the chunk's prompt `root`, which runs whole: their
    /// cache rows are copied from the root's, and only the tokens after them run.
    Shared { root: usize, shared: usize },
}

impl Start {
    /// How many of `prompt`'s tokens run.
    pub fn runs(self, prompt: &[u32]) -> usize {
        match self {
            Start::Whole => prompt.len(),
            Start::Shared { shared, .. } => prompt.len() - shared,
        }
    }
}

/// How `prompt` starts after the chunk's earlier prompts (`chunk`, started as `starts` says): it
/// shares the start of the whole-run prompt it has the longest common start with, when that
/// covers at least half of it (the rest runs a row per token, which for long rests is slower than
/// a prefill); the first such prompt on ties. Its last token always runs: its logits are wanted.
pub fn start_of(chunk: &[Vec<u32>], starts: &[Start], prompt: &[u32]) -> Start {
    let common = |a: &[u32]| a.iter().zip(prompt).take_while(|(x, y)| x == y).count();
    let most = prompt.len().saturating_sub(1);
    let best = (0..chunk.len())
        .filter(|&r| starts[r] == Start::Whole)
        .map(|r| (common(&chunk[r]).min(most), r))
        .max_by_key(|&(n, r)| (n, std::cmp::Reverse(r)));
    match best {
        Some((shared, root)) if shared > 0 && 2 * shared >= prompt.len() => Start::Shared { root, shared },
        _ => Start::Whole,
    }
}

/// [`start_of`] for each prompt of a chunk in turn.
pub fn plan_starts(prompts: &[Vec<u32>]) -> Vec<Start> {
    let mut starts = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let start = start_of(&prompts[..i], &starts, p);
        starts.push(start);
    }
    starts
}

/// Where a chunk of sequences sits among all of a call's: its first one's index, and the draws.
struct Chunk<'a> {
    first: usize,
    draw: Option<&'a mut Draw>,
}

impl<D: Device> Engine<D> {
    /// Greedy continuations of `prompts` (with the adapters, if given): at most `max_new` tokens
    /// each, stopping after the first token in `stops` (which is kept, as `generate::greedy` does).
    /// Prompts are processed in chunks that fit the engine's buffers.
    pub fn generate(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stops: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_drawn(lora, prompts, max_new, stops, None)
    }

    /// `n` continuations of each prompt, as `generate::candidates` makes them: the greedy one first,
    /// then `n - 1` drawn with `sampling` (each sequence's draws seeded by its prompt's index and its
    /// own, so they do not depend on how prompts are chunked). Each prompt becomes n sequences that
    /// share its run (one prefill); the logits of every step come back to choose the tokens.
    pub fn generate_candidates(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        n: usize,
        max_new: usize,
        stops: &[u32],
        sampling: &Sampling,
    ) -> Result<Vec<Vec<Vec<u32>>>> {
        if n == 0 {
            return Ok(vec![Vec::new(); prompts.len()]);
        }
        let many: Vec<Vec<u32>> = (prompts.iter())
            .flat_map(|p| std::iter::repeat_n(p.clone(), n))
            .collect();
        let mut draw = Draw {
            sampling: *sampling,
            n,
            rngs: (0..many.len()).map(|g| sampling.rng(g / n, g % n)).collect(),
        };
        let mut outs = self
            .generate_drawn(lora, &many, max_new, stops, Some(&mut draw))?
            .into_iter();
        Ok((0..prompts.len()).map(|_| outs.by_ref().take(n).collect()).collect())
    }

    fn generate_drawn(
        &mut self,
        lora: Option<&LoraParams>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stops: &[u32],
        mut draw: Option<&mut Draw>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); prompts.len()];
        if max_new == 0 || prompts.is_empty() {
            return Ok(out);
        }
        if let Some(lora) = lora {
            self.upload_adapters(lora)?;
        }
        // A chunk: as many prompts as the buffers take, counting the tokens that run (a shared
        // start runs once) and the cache rows every sequence takes.
        let per_chunk = self.ce_rows.min(self.cap);
        let row_budget = CACHE_ROWS_PER_CAP * self.cap;
        let mut i = 0;
        while i < prompts.len() {
            let (mut j, mut runs, mut longest) = (i, 0, 0);
            let mut starts = Vec::new();
            while j < prompts.len() && j - i < per_chunk {
                let start = start_of(&prompts[i..j], &starts, &prompts[j]);
                let s = longest.max(prompts[j].len()) + max_new;
                if runs + start.runs(&prompts[j]) > self.cap || (j > i && (j - i + 1) * s > row_budget) {
                    break;
                }
                runs += start.runs(&prompts[j]);
                longest = longest.max(prompts[j].len());
                starts.push(start);
                j += 1;
            }
            ensure!(
                j > i,
                "a prompt of {} tokens exceeds the {} this engine holds",
                prompts[i].len(),
                self.cap
            );
            let chunk = Chunk {
                first: i,
                draw: draw.as_deref_mut(),
            };
            let prompts = &prompts[i..j];
            self.generate_chunk(lora.is_some(), prompts, &starts, max_new, stops, &mut out[i..j], chunk)?;
            i = j;
        }
        Ok(out)
    }

    /// Logits of the last position of each prompt, [prompts][vocab] (the first step of `generate`,
    /// prompts that share a start sharing it as there).
    pub fn last_logits(&mut self, lora: Option<&LoraParams>, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if let Some(lora) = lora {
            self.upload_adapters(lora)?;
        }
        ensure!(
            prompts.len() <= self.ce_rows.min(self.cap),
            "too many prompts for one call"
        );
        let starts = plan_starts(prompts);
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0) + 1;
        let v = self.config.vocab_size;
        let mut out = vec![Vec::new(); prompts.len()];
        self.prefill_shared(lora.is_some(), prompts, &starts, s, |e, seqs| {
            let flat = e.dev.read(&e.s.logits, seqs.len() * v)?;
            for (&b, row) in seqs.iter().zip(flat.chunks(v)) {
                out[b] = row.to_vec();
            }
            Ok(())
        })?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn generate_chunk(
        &mut self,
        adapted: bool,
        prompts: &[Vec<u32>],
        starts: &[Start],
        max_new: usize,
        stops: &[u32],
        out: &mut [Vec<u32>],
        mut chunk: Chunk,
    ) -> Result<()> {
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new;
        let mut next = vec![0u32; prompts.len()];
        let none_done = vec![false; prompts.len()];
        self.prefill_shared(adapted, prompts, starts, s, |e, seqs| {
            let mut got = match chunk.draw.as_deref_mut() {
                None => e.argmax_of_logits(seqs.len())?,
                Some(draw) => e.draw_from_logits(seqs, chunk.first, draw)?,
            };
            e.constrain(seqs, &mut got, out, &mut chunk, &none_done)?;
            for (&b, id) in seqs.iter().zip(got) {
                next[b] = id;
            }
            Ok(())
        })?;
        // Where the device records a decoding step, every sequence decodes until the last one stops
        // (a finished one's tokens are dropped), so each step has the same shape and replays one
        // recording; elsewhere only the unfinished sequences run. Sequence b's cache rows b * s ..
        // stay within its own: it decodes at most max_new - 1 steps past its prompt.
        let b = prompts.len();
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut done = vec![false; b];
        // The sequences the last step ran, in order, whose tokens `next` holds.
        let mut ran: Vec<usize> = (0..b).collect();
        let mut graph: Option<D::Graph> = None;
        let mut record = true;
        for step in 0.. {
            for (&i, &id) in ran.iter().zip(&next) {
                if !done[i] {
                    out[i].push(id);
                    done[i] = stops.contains(&id) || out[i].len() >= max_new;
                }
            }
            if done.iter().all(|&d| d) {
                return Ok(());
            }
            ran = match record {
                true => (0..b).collect(),
                false => (0..b).filter(|&i| !done[i]).collect(),
            };
            // One token per sequence, at its next position, against its cache rows.
            let at = |f: &dyn Fn(usize) -> usize| -> Vec<i32> { ran.iter().map(|&i| f(i) as i32).collect() };
            let ids = at(&|i| *out[i].last().expect("a token") as usize);
            let (pos, keys) = (at(&|i| lens[i]), at(&|i| lens[i] + 1));
            let (start, slot) = (at(&|i| i * s), at(&|i| i * s + lens[i]));
            let g = self.gen.as_mut().expect("allocated by the prefill");
            self.dev.write(&mut g.slot, &slot)?;
            self.dev.write(&mut g.key_start, &start)?;
            self.dev.write(&mut g.key_len, &keys)?;
            self.dev.write(&mut self.s.tokens, &ids)?;
            self.dev.write(&mut self.s.positions, &pos)?;
            // The first step runs as is (it also lets the GEMM tuner time its shapes); the second
            // is recorded where the device can, and from then on the recording is replayed.
            // The recording bounds the keys by s - 1, the most any step can have; a step run as is
            // takes this step's longest (so a long max_new never asks for more than is used).
            if graph.is_none() && step >= 1 && record {
                graph = self.record_decode_step(adapted, b, s - 1)?;
                record = graph.is_some();
            }
            match &graph {
                Some(g) => {
                    self.dev.replay(g)?;
                    self.graph_replays += 1;
                }
                None => self.decode_step(adapted, ran.len(), keys.iter().max().map_or(1, |&k| k as usize))?,
            }
            next = match chunk.draw.as_deref_mut() {
                None => self.next_tokens(ran.len())?,
                Some(draw) => self.draw_from_logits(&ran, chunk.first, draw)?,
            };
            self.constrain(&ran, &mut next, out, &mut chunk, &done)?;
            lens.iter_mut().for_each(|n| *n += 1);
        }
        unreachable!("the loop returns when every sequence is done")
    }

    /// One decoding step's launches for b sequences whose tokens, positions and cache rows are
    /// already on the device: embedding, the layers against the cache, the final norm, the head on
    /// every row, and the argmax into gen.next. `max_keys`: at least the longest key_len.
    fn decode_step(&mut self, adapted: bool, b: usize, max_keys: usize) -> Result<()> {
        let rows = self.rows_fwd(adapted, b, max_keys, None)?;
        let v = self.config.vocab_size;
        let g = self.gen.as_mut().expect("allocated by the prefill");
        self.dev.argmax_rows(&mut g.next, &self.s.logits, rows, v)
    }

    /// Record [`Engine::decode_step`] as a graph (None where the device does not record, or the
    /// recording failed: decoding then goes on step by step).
    fn record_decode_step(&mut self, adapted: bool, b: usize, max_keys: usize) -> Result<Option<D::Graph>> {
        if !self.dev.begin_capture()? {
            return Ok(None);
        }
        let recorded = self.decode_step(adapted, b, max_keys);
        let graph = self.dev.end_capture()?;
        if let Err(e) = recorded {
            eprintln!("note: a decoding step could not be recorded ({e:#}); running without a graph");
            return Ok(None);
        }
        Ok(graph)
    }

    /// The embedding, the layers and the logits of `t` rows whose tokens, positions and cache rows
    /// are already on the device, each row one query against its keys in the cache (`max_keys`: at
    /// least the longest key_len); logits as [`Engine::logits_of_rows`] makes them.
    fn rows_fwd(&mut self, adapted: bool, t: usize, max_keys: usize, gather: Option<usize>) -> Result<usize> {
        let (dev, d) = (&self.dev, self.config.hidden_size);
        dev.embedding_fwd(&mut self.xs[0], &self.embed, &self.s.tokens, t, d)?;
        for l in 0..self.config.num_layers {
            let a = if self.checkpointing { 0 } else { l };
            self.layer_fwd(l, a, t, Attn::Decode { max_len: max_keys }, adapted, None)?;
        }
        self.logits_of_rows(t, gather)
    }

    /// Run a chunk's prompts into the cache (prompt b at rows b * s ..) as `starts` says: first the
    /// prompts that run whole, packed, then the others, their shared starts copied from their
    /// roots' rows and the rest run against them. After each of the two passes s.logits holds the
    /// logits of the last positions of the pass's prompts, in order, and `take(engine, the pass's
    /// prompts)` uses them.
    fn prefill_shared(
        &mut self,
        adapted: bool,
        prompts: &[Vec<u32>],
        starts: &[Start],
        s: usize,
        mut take: impl FnMut(&mut Self, &[usize]) -> Result<()>,
    ) -> Result<()> {
        ensure!(
            prompts.iter().all(|p| !p.is_empty()),
            "an empty prompt has no last position to continue from"
        );
        self.ensure_cache(prompts.len() * s)?;
        let whole: Vec<usize> = (0..prompts.len()).filter(|&b| starts[b] == Start::Whole).collect();
        self.prefill(adapted, prompts, &whole, s)?;
        take(self, &whole)?;
        let shared: Vec<(usize, usize, usize)> = (starts.iter().enumerate())
            .filter_map(|(b, start)| match *start {
                Start::Shared { root, shared } => Some((b, root, shared)),
                Start::Whole => None,
            })
            .collect();
        if shared.is_empty() {
            return Ok(());
        }
        self.copy_starts(&shared, s)?;
        self.extend(adapted, prompts, &shared, s)?;
        take(self, &shared.iter().map(|&(b, ..)| b).collect::<Vec<_>>())
    }

    /// Run prompts `which` (packed) through the model, filling their cache rows (prompt b at rows
    /// b * s ..), and leave the logits of each one's last position in s.logits.
    fn prefill(&mut self, adapted: bool, prompts: &[Vec<u32>], which: &[usize], s: usize) -> Result<()> {
        let max_len = which.iter().map(|&b| prompts[b].len()).max().unwrap_or(1);
        let none: Vec<Option<u32>> = vec![None; max_len];
        let batch = Batch::pack(which.iter().map(|&b| (&prompts[b][..], &none[..prompts[b].len()])));
        let t = self.load_tokens(&batch)?;
        let mut slot = Vec::with_capacity(t);
        for &b in which {
            slot.extend((0..prompts[b].len()).map(|i| (b * s + i) as i32));
        }
        let last: Vec<i32> = batch.seqs.iter().map(|r| r.end as i32 - 1).collect();
        let g = self.gen.as_mut().expect("allocated by prefill_shared");
        self.dev.write(&mut g.slot, &slot)?;
        self.dev.write(&mut g.last, &last)?;
        for l in 0..self.config.num_layers {
            let a = if self.checkpointing { 0 } else { l };
            self.layer_fwd(l, a, t, Attn::Prefill { max_len }, adapted, None)?;
        }
        self.logits_of_rows(t, Some(which.len()))?;
        Ok(())
    }

    /// Copy the shared starts of `shared` ((prompt, root, tokens) each) from their roots' cache rows
    /// into their own, every layer's keys and values, staged through one layer's key rows (acts[0].k,
    /// [cap, kv_dim]) at most cap rows at a time.
    fn copy_starts(&mut self, shared: &[(usize, usize, usize)], s: usize) -> Result<()> {
        let (from, to): (Vec<i32>, Vec<i32>) = (shared.iter())
            .flat_map(|&(b, root, n)| (0..n).map(move |p| ((root * s + p) as i32, (b * s + p) as i32)))
            .unzip();
        let (dev, kvd) = (&self.dev, self.config.kv_dim());
        let g = self.gen.as_mut().expect("allocated by prefill_shared");
        let stage = &mut self.acts[0].k;
        for (f, t) in from.chunks(self.cap).zip(to.chunks(self.cap)) {
            dev.write(&mut g.from, f)?;
            dev.write(&mut g.slot, t)?;
            for l in 0..self.config.num_layers {
                dev.gather_rows(stage, &g.k[l], &g.from, f.len(), kvd)?;
                dev.scatter_rows(&mut g.k[l], stage, &g.slot, f.len(), kvd)?;
                dev.gather_rows(stage, &g.v[l], &g.from, f.len(), kvd)?;
                dev.scatter_rows(&mut g.v[l], stage, &g.slot, f.len(), kvd)?;
            }
        }
        Ok(())
    }

    /// Run the tokens after the shared starts of `shared` ((prompt, root, tokens) each), a row per
    /// token against its prompt's cache rows (the copied start, then its own earlier tokens, as
    /// decoding runs), and leave the logits of each prompt's last token in s.logits.
    fn extend(
        &mut self,
        adapted: bool,
        prompts: &[Vec<u32>],
        shared: &[(usize, usize, usize)],
        s: usize,
    ) -> Result<()> {
        // Per row: token, position, cache row, first cache row and keys of its prompt.
        let (mut ids, mut pos, mut slot) = (Vec::new(), Vec::new(), Vec::new());
        let (mut start, mut keys, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for &(b, _, n) in shared {
            for (p, &id) in prompts[b].iter().enumerate().skip(n) {
                ids.push(id as i32);
                pos.push(p as i32);
                slot.push((b * s + p) as i32);
                start.push((b * s) as i32);
                keys.push(p as i32 + 1);
            }
            last.push(ids.len() as i32 - 1);
        }
        let t = ids.len();
        ensure!(t <= self.cap, "{t} rows exceed the {} this engine holds", self.cap);
        let vocab = self.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let g = self.gen.as_mut().expect("allocated by prefill_shared");
        self.dev.write(&mut g.slot, &slot)?;
        self.dev.write(&mut g.key_start, &start)?;
        self.dev.write(&mut g.key_len, &keys)?;
        self.dev.write(&mut g.last, &last)?;
        self.dev.write(&mut self.s.tokens, &ids)?;
        self.dev.write(&mut self.s.positions, &pos)?;
        let max_keys = keys.iter().max().map_or(1, |&k| k as usize);
        self.rows_fwd(adapted, t, max_keys, Some(shared.len()))?;
        Ok(())
    }

    /// Final norm of the last layer's t rows, then the logits of rows `last[..n]` (`Some(n)`) or of
    /// all t rows (`None`) into s.logits [rows, vocab]; returns the row count.
    fn logits_of_rows(&mut self, t: usize, gather: Option<usize>) -> Result<usize> {
        self.final_norm(t)?;
        let d = self.config.hidden_size;
        let (dev, s) = (&self.dev, &mut self.s);
        let (h, rows) = match gather {
            Some(n) => {
                let g = self.gen.as_ref().expect("allocated by the prefill");
                dev.gather_rows(&mut s.h_lab, &s.h, &g.last, n, d)?;
                (&s.h_lab, n)
            }
            None => (&s.h, t),
        };
        match &self.head_q8 {
            Some(q8) => dev.head_logits_q8(&mut s.logits, h, q8, rows, d)?,
            None => {
                let head = self.lm_head.as_ref().unwrap_or(&self.embed);
                dev.head_logits(&mut s.logits, h, head, 0, rows, d)?
            }
        }
        Ok(rows)
    }

    /// The greedy token of each of the first `rows` rows of s.logits, chosen on the device (only
    /// the token ids come back, not the [rows, vocab] logits).
    fn argmax_of_logits(&mut self, rows: usize) -> Result<Vec<u32>> {
        let v = self.config.vocab_size;
        let g = self.gen.as_mut().expect("allocated by the prefill");
        self.dev.argmax_rows(&mut g.next, &self.s.logits, rows, v)?;
        self.next_tokens(rows)
    }

    /// The token of each row of s.logits for the chunk's sequences `seqs` (ascending; the chunk
    /// starts at sequence `first` of the call): greedy for the first candidate of a prompt, drawn
    /// for the others (the logits come back to the host).
    fn draw_from_logits(&mut self, seqs: &[usize], first: usize, draw: &mut Draw) -> Result<Vec<u32>> {
        let v = self.config.vocab_size;
        let logits = self.dev.read(&self.s.logits, seqs.len() * v)?; // [seqs, vocab]
        let (n, sampling) = (draw.n, draw.sampling);
        let mut wanted = seqs.iter().peekable();
        let rngs: Vec<(usize, &mut Rng)> = (draw.rngs[first..].iter_mut().enumerate())
            .filter(|(b, _)| wanted.next_if_eq(&b).is_some())
            .map(|(b, rng)| (first + b, rng))
            .collect();
        ensure!(rngs.len() == seqs.len(), "draw_from_logits: sequences not ascending");
        // Rows are independent (each has its own generator): drawn in parallel on the host.
        Ok((logits.par_chunks(v).zip(rngs.into_par_iter()))
            .map(|(row, (g, rng))| match g % n {
                0 => argmax(row),
                _ => sampling.draw(row, rng),
            })
            .collect())
    }

    /// With a constraint ([`Engine::constraint`]), each token of `next` that it refuses (row k of
    /// s.logits is the chunk's sequence `seqs[k]`, whose tokens so far are `out[seqs[k]]`) is chosen
    /// again from its row: greedy rows as [`constrained_greedy`] does, drawn rows as [`constrained`]
    /// does with their own generator. Sequences already `done` are left alone.
    fn constrain(
        &mut self,
        seqs: &[usize],
        next: &mut [u32],
        out: &[Vec<u32>],
        chunk: &mut Chunk,
        done: &[bool],
    ) -> Result<()> {
        let Some(c) = self.constraint.clone() else {
            return Ok(());
        };
        // Sequence g of the call is candidate g % n of prompt g / n.
        let n = chunk.draw.as_ref().map_or(1, |d| d.n);
        let prompt = |b: usize| (chunk.first + b) / n;
        let refused: Vec<usize> = (0..seqs.len())
            .filter(|&k| !done[seqs[k]] && !c.allows(prompt(seqs[k]), &out[seqs[k]], next[k]))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        let v = self.config.vocab_size;
        let logits = self.dev.read(&self.s.logits, seqs.len() * v)?; // [seqs, vocab]
        for k in refused {
            let (b, row) = (seqs[k], &logits[k * v..(k + 1) * v]);
            let (g, allowed) = (chunk.first + b, |t| c.allows(prompt(b), &out[b], t));
            next[k] = match chunk.draw.as_deref_mut() {
                Some(d) if g % d.n != 0 => {
                    let (sampling, rng) = (d.sampling, &mut d.rngs[g]);
                    constrained(next[k], row, |r| sampling.draw(r, rng), allowed)
                }
                _ => constrained_greedy(next[k], row, allowed),
            };
        }
        Ok(())
    }

    /// The first `rows` token ids of gen.next.
    fn next_tokens(&self, rows: usize) -> Result<Vec<u32>> {
        let g = self.gen.as_ref().expect("allocated by the prefill");
        Ok(self.dev.read(&g.next, rows)?.iter().map(|&i| i as u32).collect())
    }

    /// A cache of at least `rows` rows per layer (grown, never shrunk).
    fn ensure_cache(&mut self, rows: usize) -> Result<()> {
        if self.gen.as_ref().is_some_and(|g| g.rows >= rows) {
            return Ok(());
        }
        let (kvd, cap, dev) = (self.config.kv_dim(), self.cap, &self.dev);
        let layers = self.config.num_layers;
        let alloc_layers = || {
            let mib = (2 * layers * rows * kvd * 2) as f64 / (1 << 20) as f64;
            let what = || format!("the generation KV cache: {layers} layers x {rows} rows x 2 ({mib:.0} MiB)");
            (0..layers)
                .map(|_| dev.alloc(rows * kvd).with_context(what))
                .collect::<Result<Vec<_>>>()
        };
        self.gen = None; // free the old cache before allocating the new one
        self.gen = Some(GenCache {
            k: alloc_layers()?,
            v: alloc_layers()?,
            rows,
            slot: dev.alloc(cap)?,
            key_start: dev.alloc(cap)?,
            key_len: dev.alloc(cap)?,
            last: dev.alloc(cap)?,
            from: dev.alloc(cap)?,
            next: dev.alloc(cap)?,
        });
        Ok(())
    }
}
