//! Batched generation on a device, with a KV cache: the device twin of `generate::greedy` and
//! `generate::candidates`.
//!
//! The prompts of a chunk are packed and run once (prefill), their keys and values written into a
//! cache that gives sequence b the rows `b * S .. (b + 1) * S` (S: the longest prompt plus the new
//! tokens); then each step runs one new token per unfinished sequence against its cache rows. Only
//! the logits of each sequence's last position are computed, and the argmax is taken on the device:
//! one token id per sequence comes back per step.

use super::layer::Attn;
use super::Engine;
use crate::engine::{Bf, Device};
use crate::model::autograd::Batch;
use crate::model::generate::{argmax, Sampling};
use crate::model::lora::LoraParams;
use crate::util::rng::Rng;
use anyhow::{ensure, Context, Result};
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
    /// own, so they do not depend on how prompts are chunked). Each prompt is run n times, as n
    /// sequences; the logits of every step come back to choose the tokens.
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
        let per_chunk = self.ce_rows.min(self.cap);
        let mut i = 0;
        while i < prompts.len() {
            let (mut j, mut total) = (i, 0);
            while j < prompts.len() && j - i < per_chunk && total + prompts[j].len() <= self.cap {
                total += prompts[j].len();
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
            self.generate_chunk(lora.is_some(), &prompts[i..j], max_new, stops, &mut out[i..j], chunk)?;
            i = j;
        }
        Ok(out)
    }

    /// Logits of the last position of each prompt, [prompts][vocab] (the first step of `generate`).
    pub fn last_logits(&mut self, lora: Option<&LoraParams>, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if let Some(lora) = lora {
            self.upload_adapters(lora)?;
        }
        ensure!(
            prompts.len() <= self.ce_rows.min(self.cap),
            "too many prompts for one call"
        );
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0) + 1;
        let rows = self.prefill(lora.is_some(), prompts, s)?;
        let v = self.config.vocab_size;
        let flat = self.dev.read(&self.s.logits, rows * v)?;
        Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
    }

    fn generate_chunk(
        &mut self,
        adapted: bool,
        prompts: &[Vec<u32>],
        max_new: usize,
        stops: &[u32],
        out: &mut [Vec<u32>],
        mut chunk: Chunk,
    ) -> Result<()> {
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new;
        let rows = self.prefill(adapted, prompts, s)?;
        let mut next = match chunk.draw.as_deref_mut() {
            None => self.argmax_of_logits(rows)?,
            Some(draw) => self.draw_from_logits(rows, chunk.first, draw)?,
        };
        // Every sequence decodes until the last one stops (a finished one's tokens are dropped), so
        // each step has the same shape and can replay one recorded graph. Sequence b's cache rows
        // b * s .. stay within its own: it decodes at most max_new - 1 steps past its prompt.
        let b = prompts.len();
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut done = vec![false; b];
        let start: Vec<i32> = (0..b).map(|i| (i * s) as i32).collect();
        let g = self.gen.as_mut().expect("allocated by the prefill");
        self.dev.write(&mut g.key_start, &start)?;
        let mut graph: Option<D::Graph> = None;
        let mut record = true;
        for step in 0.. {
            for i in 0..b {
                if !done[i] {
                    out[i].push(next[i]);
                    done[i] = stops.contains(&next[i]) || out[i].len() >= max_new;
                }
            }
            if done.iter().all(|&d| d) {
                return Ok(());
            }
            // One token per sequence, at its next position, against its cache rows.
            let ids: Vec<i32> = (0..b).map(|i| *out[i].last().expect("a token") as i32).collect();
            let pos: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
            let slot: Vec<i32> = (0..b).map(|i| (i * s + lens[i]) as i32).collect();
            let keys: Vec<i32> = lens.iter().map(|&n| n as i32 + 1).collect();
            let g = self.gen.as_mut().expect("allocated by the prefill");
            self.dev.write(&mut g.slot, &slot)?;
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
                None => self.decode_step(adapted, b, lens.iter().max().map_or(1, |&n| n + 1))?,
            }
            next = match chunk.draw.as_deref_mut() {
                None => self.next_tokens(b)?,
                Some(draw) => self.draw_from_logits(b, chunk.first, draw)?,
            };
            lens.iter_mut().for_each(|n| *n += 1);
        }
        unreachable!("the loop returns when every sequence is done")
    }

    /// One decoding step's launches for b sequences whose tokens, positions and cache rows are
    /// already on the device: embedding, the layers against the cache, the final norm, the head on
    /// every row, and the argmax into gen.next. `max_keys`: at least the longest key_len.
    fn decode_step(&mut self, adapted: bool, b: usize, max_keys: usize) -> Result<()> {
        let (dev, d) = (&self.dev, self.config.hidden_size);
        dev.embedding_fwd(&mut self.xs[0], &self.embed, &self.s.tokens, b, d)?;
        for l in 0..self.config.num_layers {
            let a = if self.checkpointing { 0 } else { l };
            self.layer_fwd(l, a, b, Attn::Decode { max_len: max_keys }, adapted, None)?;
        }
        let rows = self.logits_of_rows(b, None)?;
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

    /// Run the packed prompts through the model, filling the cache (sequence b at rows b * s ..),
    /// and leave the logits of each prompt's last position in s.logits; returns their row count.
    fn prefill(&mut self, adapted: bool, prompts: &[Vec<u32>], s: usize) -> Result<usize> {
        ensure!(
            prompts.iter().all(|p| !p.is_empty()),
            "an empty prompt has no last position to continue from"
        );
        self.ensure_cache(prompts.len() * s)?;
        let none: Vec<Option<u32>> = vec![None; prompts.iter().map(Vec::len).max().unwrap_or(0)];
        let batch = Batch::pack(prompts.iter().map(|p| (&p[..], &none[..p.len()])));
        let t = self.load_tokens(&batch)?;
        let mut slot = Vec::with_capacity(t);
        for (b, p) in prompts.iter().enumerate() {
            slot.extend((0..p.len()).map(|i| (b * s + i) as i32));
        }
        let last: Vec<i32> = batch.seqs.iter().map(|r| r.end as i32 - 1).collect();
        let g = self.gen.as_mut().expect("allocated above");
        self.dev.write(&mut g.slot, &slot)?;
        self.dev.write(&mut g.last, &last)?;
        let max_len = prompts.iter().map(Vec::len).max().unwrap_or(1);
        for l in 0..self.config.num_layers {
            let a = if self.checkpointing { 0 } else { l };
            self.layer_fwd(l, a, t, Attn::Prefill { max_len }, adapted, None)?;
        }
        self.logits_of_rows(t, Some(prompts.len()))
    }

    /// Final norm of the last layer's t rows, then the logits of rows `last[..n]` (`Some(n)`) or of
    /// all t rows (`None`) into s.logits [rows, vocab]; returns the row count.
    fn logits_of_rows(&mut self, t: usize, gather: Option<usize>) -> Result<usize> {
        self.final_norm(t)?;
        let d = self.config.hidden_size;
        let (dev, s) = (&self.dev, &mut self.s);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let rows = match gather {
            Some(n) => {
                let g = self.gen.as_ref().expect("allocated by the prefill");
                dev.gather_rows(&mut s.h_lab, &s.h, &g.last, n, d)?;
                dev.head_logits(&mut s.logits, &s.h_lab, head, 0, n, d)?;
                n
            }
            None => {
                dev.head_logits(&mut s.logits, &s.h, head, 0, t, d)?;
                t
            }
        };
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

    /// The token of each of the first `rows` rows of s.logits, for sequences `first..`: greedy for
    /// the first candidate of a prompt, drawn for the others (the logits come back to the host).
    fn draw_from_logits(&mut self, rows: usize, first: usize, draw: &mut Draw) -> Result<Vec<u32>> {
        let v = self.config.vocab_size;
        let logits = self.dev.read(&self.s.logits, rows * v)?; // [rows, vocab]
        let (n, sampling) = (draw.n, draw.sampling);
        let rngs = &mut draw.rngs[first..first + rows];
        // Rows are independent (each has its own generator): drawn in parallel on the host.
        Ok((logits.par_chunks(v).zip(rngs.par_iter_mut()).enumerate())
            .map(|(r, (row, rng))| match (first + r) % n {
                0 => argmax(row),
                _ => sampling.draw(row, rng),
            })
            .collect())
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
            next: dev.alloc(cap)?,
        });
        Ok(())
    }
}
