//! Attention on the GPU, two ways, and the choice between them.
//!
//! - `Simple` (kernels/attention.cu): a block per (token, head), the row's scores in shared memory;
//!   any head width up to 256, sequences up to what shared memory holds (~55k tokens on an H100).
//! - `Tiled` (kernels/flash_attention.cu): flash-style tiles of 64 queries or keys on tensor cores;
//!   head widths 32, 64 and 128, any sequence length.
//!
//! `Auto` (the default) runs the tiled kernels at a head width once they have agreed with the simple
//! ones there: on first use of each width it runs both, forward and backward, on a small packed batch
//! whose 64-token blocks straddle sequence boundaries, and falls back with a warning if they disagree,
//! so wrong numbers from the fast path cost speed, never correctness (a kernel that faults poisons the
//! CUDA context, as any would: `sqlora selftest` names it). `SQLORA_ATTENTION=simple|tiled` forces
//! one; `tiled` at a width without tiled kernels runs the simple ones, with a note.
//! Decoding (one new query per sequence) always runs the simple decode kernel.

use super::{blocks_for, rel_err, Cuda};
use crate::engine::AttentionOps;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// How the training step's attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    Auto,
    Tiled,
    Simple,
}

impl AttentionPath {
    /// From `SQLORA_ATTENTION` (auto, tiled or simple); `Auto` when unset.
    pub(super) fn from_env() -> Result<AttentionPath> {
        Ok(match std::env::var("SQLORA_ATTENTION").as_deref() {
            Err(_) | Ok("auto") => AttentionPath::Auto,
            Ok("tiled") => AttentionPath::Tiled,
            Ok("simple") => AttentionPath::Simple,
            Ok(other) => bail!("SQLORA_ATTENTION={other}: use auto, tiled or simple"),
        })
    }
}

/// The head widths kernels/flash_attention.cu is instantiated for (FLASH_ENTRIES).
pub const TILED_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Queries (forward, dq) or keys (dk, dv) per block of the tiled kernels (FA_ROWS).
const TILE: usize = 64;

/// The tiled kernels' two outputs agree with the simple ones' to bf16 rounding (the tiled path also
/// rounds P and dS to bf16 for the tensor cores): a few 1e-3; 2e-2 separates that from a bug.
const AGREE: f64 = 2e-2;

/// The dk/dv kernel's query tile (the QT of FLASH_ENTRIES: 32 at width 128, for registers).
fn dkv_query_tile(hd: usize) -> usize {
    if hd == 128 {
        32
    } else {
        64
    }
}

/// Dynamic shared memory of the dk/dv kernel at head width hd: K and V (64 rows) and Q and dO (QT
/// rows) of hd + 8 bf16, then QT each of lse, D and sequence starts (4 bytes each).
pub(super) fn dkv_smem(hd: usize) -> usize {
    let qt = dkv_query_tile(hd);
    (2 * TILE + 2 * qt) * (hd + 8) * 2 + 3 * qt * 4
}

/// The tiled kernels of one head width.
#[derive(Clone)]
pub struct TiledAttention {
    pub hd: usize,
    pub fwd: CudaFunction,
    pub bwd_dq: CudaFunction,
    pub bwd_dkv: CudaFunction,
    /// The three kernels' names, [`tiled_kernel_names`], for errors and profiles.
    pub names: [String; 3],
}

/// The entry points of kernels/flash_attention.cu at head width `hd` (FLASH_ENTRIES): forward, dq,
/// dk/dv.
pub fn tiled_kernel_names(hd: usize) -> [String; 3] {
    ["fwd", "bwd_dq", "bwd_dkv"].map(|kind| format!("flash_{kind}_hd{hd}"))
}

impl Cuda {
    fn tiled_kernels(&self, hd: usize) -> Option<&TiledAttention> {
        self.k.flash.iter().find(|f| f.hd == hd)
    }

    /// Which kernels run attention and the NF4 GEMMs, for logs and bench reports: e.g. "attention
    /// auto (tiled at width 64), NF4 GEMM Auto".
    pub fn kernel_paths(&self) -> String {
        let attention = match self.attention {
            AttentionPath::Auto => {
                let chosen = self.attention_chosen.lock().unwrap_or_else(|e| e.into_inner());
                let mut widths: Vec<_> = chosen.iter().collect();
                widths.sort();
                let said: Vec<String> = widths
                    .iter()
                    .map(|(hd, &tiled)| format!("{} at width {hd}", if tiled { "tiled" } else { "simple" }))
                    .collect();
                if said.is_empty() {
                    "auto".to_string()
                } else {
                    format!("auto ({})", said.join(", "))
                }
            }
            AttentionPath::Tiled => "tiled".into(),
            AttentionPath::Simple => "simple".into(),
        };
        format!("attention {attention}, NF4 GEMM {:?}, LoRA {:?}", self.gemm, self.lora)
    }

    /// Whether the training step's attention at head width hd runs the tiled kernels (see the module
    /// note); decided once per width.
    pub fn attention_tiled(&self, hd: usize) -> bool {
        if self.tiled_kernels(hd).is_none() {
            return false;
        }
        match self.attention {
            AttentionPath::Simple => false,
            AttentionPath::Tiled => true,
            AttentionPath::Auto => {
                let mut chosen = self.attention_chosen.lock().unwrap_or_else(|e| e.into_inner());
                *chosen.entry(hd).or_insert_with(|| match self.tiled_disagreement(hd) {
                    Ok(err) if err <= AGREE => true,
                    Ok(err) => {
                        eprintln!(
                            "warning: tiled attention disagrees with the simple kernels ({err:.1e}) at head width \
                             {hd}: not used"
                        );
                        false
                    }
                    Err(e) => {
                        eprintln!("warning: tiled attention failed at head width {hd} ({e:#}): not used");
                        false
                    }
                })
            }
        }
    }

    /// The largest relative difference between the tiled and the simple kernels' out, lse, dq, dk
    /// and dv on random packed sequences of 70, 50 and 9 tokens (4 query heads over 2).
    fn tiled_disagreement(&self, hd: usize) -> Result<f64> {
        let (lens, heads, kv_heads) = ([70usize, 50, 9], 4usize, 2usize);
        let t: usize = lens.iter().sum();
        let starts: Vec<i32> = (lens.iter().scan(0, |s0, &n| {
            let s = *s0;
            *s0 += n;
            Some(std::iter::repeat_n(s as i32, n))
        }))
        .flatten()
        .collect();
        let mut rng = Rng::new(0xa77e ^ hd as u64);
        let mut up = |n: usize| self.up(&rng.normal_vec(n, 1.0));
        let (q, k, v, dout) = (
            up(t * heads * hd)?,
            up(t * kv_heads * hd)?,
            up(t * kv_heads * hd)?,
            up(t * heads * hd)?,
        );
        let seq_start = self.stream.clone_htod(&starts)?;
        let dims = [heads, kv_heads, hd];
        let run = |path: AttentionPath| -> Result<Vec<Vec<f32>>> {
            let (mut o, mut lse, mut dd) = (
                self.poisoned(q.len())?,
                self.stream.alloc_zeros::<f32>(t * heads)?,
                self.stream.alloc_zeros::<f32>(t * heads)?,
            );
            let (mut dq, mut dk, mut dv) = (
                self.poisoned(q.len())?,
                self.poisoned(k.len())?,
                self.poisoned(v.len())?,
            );
            self.attention_fwd_via(path, &mut o, &mut lse, &q, &k, &v, &seq_start, t, dims, 70)?;
            let grads = [&mut dq, &mut dk, &mut dv];
            self.attention_bwd_via(
                path,
                grads,
                &mut dd,
                &dout,
                [&q, &k, &v],
                &o,
                &lse,
                &seq_start,
                t,
                dims,
                70,
            )?;
            Ok(vec![
                self.down(&o)?,
                self.down32(&lse)?,
                self.down(&dq)?,
                self.down(&dk)?,
                self.down(&dv)?,
            ])
        };
        let (want, got) = (run(AttentionPath::Simple)?, run(AttentionPath::Tiled)?);
        // NaN (a non-finite reference) counts as the largest disagreement.
        let worst =
            (got.iter().zip(&want).map(|(g, w)| rel_err(g, w)))
                .fold(0.0, |a: f64, e| if e.is_nan() || e > a { e } else { a });
        Ok(worst)
    }

    fn path_for(&self, hd: usize) -> AttentionPath {
        if self.attention_tiled(hd) {
            AttentionPath::Tiled
        } else {
            AttentionPath::Simple
        }
    }

    /// [`Cuda::attention_fwd`] by the given path (`Tiled` or `Simple`; the selftest checks both).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd_via(
        &self,
        path: AttentionPath,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        assert!(out.len() >= t * heads * hd && q.len() >= t * heads * hd && seq_start.len() >= t);
        assert!(k.len() >= t * kv_heads * hd && v.len() >= t * kv_heads * hd && lse.len() >= t * heads);
        assert!(heads.is_multiple_of(kv_heads));
        if t == 0 {
            return Ok(());
        }
        if path == AttentionPath::Auto {
            return self.attention_fwd(out, lse, q, k, v, seq_start, t, [heads, kv_heads, hd], max_len);
        }
        if path != AttentionPath::Tiled {
            return self.attention_fwd_simple(out, lse, q, k, v, seq_start, t, [heads, kv_heads, hd], max_len);
        }
        let f = self
            .tiled_kernels(hd)
            .with_context(|| format!("no tiled attention kernel for head width {hd}"))?;
        let (ti, hi, kvi) = (t as i32, heads as i32, kv_heads as i32);
        let mut l = self.stream.launch_builder(&f.fwd);
        l.arg(out)
            .arg(lse)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(seq_start)
            .arg(&ti)
            .arg(&hi)
            .arg(&kvi);
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(TILE) as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (x, h) takes tokens 64x .. 64x + 63 below t of head h: it reads their q rows and
        // the k, v rows from seq_start of its first token to its last (inside [0, t) for a valid
        // packing), and writes their rows of out and lse only; the kernel's width is hd; every buffer
        // is a whole (16-byte aligned) allocation of at least the asserted length.
        unsafe { self.launch(&mut l, cfg, &f.names[0]) }?;
        Ok(())
    }

    /// [`Cuda::attention_bwd`] by the given path; `grads` = [dq, dk, dv].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd_via(
        &self,
        path: AttentionPath,
        [dq, dk, dv]: [&mut CudaSlice<bf16>; 3],
        dd: &mut CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        [q, k, v]: [&CudaSlice<bf16>; 3],
        out: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        let (nq, nkv, rows) = (t * heads * hd, t * kv_heads * hd, t * heads);
        assert!(dq.len() >= nq && dout.len() >= nq && q.len() >= nq && out.len() >= nq && seq_start.len() >= t);
        assert!(dk.len() >= nkv && dv.len() >= nkv && k.len() >= nkv && v.len() >= nkv);
        assert!(lse.len() >= rows && dd.len() >= rows && heads.is_multiple_of(kv_heads));
        if t == 0 {
            return Ok(());
        }
        if path == AttentionPath::Auto {
            let dims = [heads, kv_heads, hd];
            return self.attention_bwd(dq, dk, dv, dd, dout, [q, k, v], out, lse, seq_start, t, dims, max_len);
        }
        if path != AttentionPath::Tiled {
            let dims = [heads, kv_heads, hd];
            return self.attention_bwd_simple(dq, dk, dv, dd, dout, [q, k, v], out, lse, seq_start, t, dims, max_len);
        }
        let f = self
            .tiled_kernels(hd)
            .with_context(|| format!("no tiled attention kernel for head width {hd}"))?;
        self.attention_rowdot(dd, dout, out, rows, hd)?;
        let (ti, hi, kvi) = (t as i32, heads as i32, kv_heads as i32);
        let mut l = self.stream.launch_builder(&f.bwd_dq);
        l.arg(dq)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*dd)
            .arg(seq_start);
        l.arg(&ti).arg(&hi).arg(&kvi);
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(TILE) as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as the forward's launch: block (x, h) reads q, dout, lse, dd rows of its tokens below
        // t and k, v rows from its first token's sequence start to its last token; writes its rows of dq.
        unsafe { self.launch(&mut l, cfg, &f.names[1]) }?;
        let mut l = self.stream.launch_builder(&f.bwd_dkv);
        l.arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*dd)
            .arg(seq_start);
        l.arg(&ti).arg(&hi).arg(&kvi);
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(TILE) as u32, kv_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: dkv_smem(hd) as u32,
        };
        // SAFETY: block (x, kvh) reads k, v rows of keys 64x .. 64x + 63 below t and the q, dout, lse, dd
        // rows of the group's heads for queries from its first key while their sequence started at or
        // before its last key (checked against t); writes only its keys' rows of dk and dv. The dynamic
        // shared memory is the kernel's carving at this width (its limit raised when the GPU was opened).
        unsafe { self.launch(&mut l, cfg, &f.names[2]) }?;
        Ok(())
    }

    /// dd[r] = dout[r] . out[r] for the t * heads attention rows (both backward paths' D).
    fn attention_rowdot(
        &self,
        dd: &mut CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        out: &CudaSlice<bf16>,
        rows: usize,
        hd: usize,
    ) -> Result<()> {
        assert!(dd.len() >= rows && dout.len() >= rows * hd && out.len() >= rows * hd);
        let (ri, hdi) = (rows as i32, hd as i32);
        let mut l = self.stream.launch_builder(&self.k.attention_bwd_rowdot);
        l.arg(dd).arg(dout).arg(out).arg(&ri).arg(&hdi);
        // SAFETY: one warp per row r < rows of dout and out [rows, hd]; writes dd[r].
        unsafe { self.launch(&mut l, blocks_for(rows * 32), "attention_bwd_rowdot") }?;
        Ok(())
    }

    /// The simple forward: a block per (token, head), the row's scores in shared memory (shapes
    /// asserted by the caller, [`Cuda::attention_fwd_via`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd_simple(
        &self,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        anyhow::ensure!(
            max_len * 4 <= self.attn_smem,
            "attention_fwd: sequences of {max_len} tokens exceed this GPU's shared memory (at most {})",
            self.attn_smem / 4
        );
        anyhow::ensure!(hd <= 256, "attention_fwd: head width {hd} is over 256");
        let (hi, kvi, hdi) = (heads as i32, kv_heads as i32, hd as i32);
        let mut l = self.stream.launch_builder(&self.k.attention_fwd);
        l.arg(out)
            .arg(lse)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(seq_start)
            .arg(&hi)
            .arg(&kvi)
            .arg(&hdi);
        let cfg = LaunchConfig {
            grid_dim: ((t * heads) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (max_len * 4) as u32,
        };
        // SAFETY: one block per (token, head) of the first t tokens; keys are read from seq_start[i] to
        // i only, which lie in [0, t) when seq_start is a valid packing; the probability row fits the
        // max_len floats requested; lse gets one value per block.
        unsafe { self.launch(&mut l, cfg, "attention_fwd") }?;
        Ok(())
    }

    /// The simple backward: a block per (token, head) for dq, per (key, kv head) for dk and dv (shapes
    /// asserted by the caller, [`Cuda::attention_bwd_via`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_simple(
        &self,
        dq: &mut CudaSlice<bf16>,
        dk: &mut CudaSlice<bf16>,
        dv: &mut CudaSlice<bf16>,
        dd: &mut CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        [q, k, v]: [&CudaSlice<bf16>; 3],
        out: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        let rows = t * heads;
        anyhow::ensure!(hd <= 256, "attention_bwd: head width {hd} is over 256");
        anyhow::ensure!(
            max_len * 4 <= self.attn_smem,
            "attention_bwd: sequences of {max_len} tokens exceed this GPU's shared memory (at most {})",
            self.attn_smem / 4
        );
        let (ti, hi, kvi, hdi) = (t as i32, heads as i32, kv_heads as i32, hd as i32);
        self.attention_rowdot(dd, dout, out, rows, hd)?;
        let mut l = self.stream.launch_builder(&self.k.attention_bwd_dq);
        l.arg(dq)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*dd)
            .arg(seq_start);
        l.arg(&hi).arg(&kvi).arg(&hdi);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (max_len * 4) as u32,
        };
        // SAFETY: one block per (token, head) of the first t tokens, reading keys and values of the
        // token's own sequence only (inside [0, t) for a valid packing); max_len floats of shared
        // memory hold its dS row; writes that row of dq.
        unsafe { self.launch(&mut l, cfg, "attention_bwd_dq") }?;
        let mut l = self.stream.launch_builder(&self.k.attention_bwd_dkv);
        l.arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*dd)
            .arg(seq_start);
        l.arg(&ti).arg(&hi).arg(&kvi).arg(&hdi);
        let cfg = LaunchConfig {
            grid_dim: ((t * kv_heads) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per (key, kv head) of the first t tokens; it reads queries t' >= key of the
        // same sequence (checked against t and seq_start) and writes that key's rows of dk and dv;
        // hd <= 256 fits the kernel's per-lane registers (checked above).
        unsafe { self.launch(&mut l, cfg, "attention_bwd_dkv") }?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
impl AttentionOps for Cuda {
    fn prepare_attention(&self, hd: usize) -> Result<()> {
        if !self.attention_tiled(hd) && self.attention == super::AttentionPath::Tiled {
            eprintln!(
                "note: SQLORA_ATTENTION=tiled, but there are tiled kernels for head widths {:?} only: \
                 width {hd} runs the simple ones",
                super::TILED_HEAD_DIMS
            );
        }
        Ok(())
    }

    /// Causal GQA attention over packed sequences, keeping each row's log-sum-exp, by the path
    /// [`Cuda::attention_tiled`] picks. out, q: [t, heads, hd]; lse: [t, heads] f32; k, v: [t,
    /// kv_heads, hd]; seq_start: [t] (index of the first token of each token's sequence); max_len:
    /// the longest sequence.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        let path = self.path_for(dims[2]);
        self.attention_fwd_via(path, out, lse, q, k, v, seq_start, t, dims, max_len)
    }

    /// Attention backward from the forward's output and log-sum-exp: dq, dk, dv: written (dk, dv:
    /// [t, kv_heads, hd]); dd: [t, heads] f32 scratch; the rest as in [`Cuda::attention_fwd`], plus
    /// dout: [t, heads, hd]. Deterministic: no atomics.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: &mut CudaSlice<bf16>,
        dk: &mut CudaSlice<bf16>,
        dv: &mut CudaSlice<bf16>,
        dd: &mut CudaSlice<f32>,
        dout: &CudaSlice<bf16>,
        qkv: [&CudaSlice<bf16>; 3],
        out: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        seq_start: &CudaSlice<i32>,
        t: usize,
        dims: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        let path = self.path_for(dims[2]);
        self.attention_bwd_via(path, [dq, dk, dv], dd, dout, qkv, out, lse, seq_start, t, dims, max_len)
    }

    /// Generation: query i < b (one new token) against its cached keys key_start[i] ..
    /// key_start[i] + key_len[i]. out, q: [b, heads, hd]; k, v: [rows, kv_heads, hd] (the cache).
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut CudaSlice<bf16>,
        q: &CudaSlice<bf16>,
        [k, v]: [&CudaSlice<bf16>; 2],
        key_start: &CudaSlice<i32>,
        key_len: &CudaSlice<i32>,
        b: usize,
        [heads, kv_heads, hd]: [usize; 3],
        max_len: usize,
    ) -> Result<()> {
        assert!(out.len() >= b * heads * hd && q.len() >= b * heads * hd && key_start.len() >= b && key_len.len() >= b);
        assert!(k.len() == v.len() && k.len().is_multiple_of(kv_heads * hd) && heads.is_multiple_of(kv_heads));
        anyhow::ensure!(
            max_len * 4 <= self.attn_smem,
            "attention_decode: {max_len} cached tokens exceed this GPU's shared memory (at most {})",
            self.attn_smem / 4
        );
        anyhow::ensure!(hd <= 256, "attention_decode: head width {hd} is over 256");
        let (hi, kvi, hdi) = (heads as i32, kv_heads as i32, hd as i32);
        let mut l = self.stream.launch_builder(&self.k.attention_decode);
        l.arg(out)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(key_start)
            .arg(key_len)
            .arg(&hi)
            .arg(&kvi)
            .arg(&hdi);
        let cfg = LaunchConfig {
            grid_dim: ((b * heads) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (max_len * 4) as u32,
        };
        // SAFETY: one block per (query, head) of the first b; it reads cache rows key_start[i] ..
        // key_start[i] + key_len[i], which the engine keeps inside k and v (each key_len <= max_len,
        // whose floats of shared memory are requested), and writes its row of out.
        unsafe { self.launch(&mut l, cfg, "attention_decode") }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tiled kernel the GPU will look up is in the fatbin (names are stored uncompressed), so
    /// a misnamed entry point fails here, without a GPU.
    #[test]
    fn every_tiled_kernel_is_in_the_fatbin() {
        if crate::engine::cuda::skips_without_kernels() {
            return;
        }
        let bin = crate::engine::cuda::kernels::FLASH_ATTENTION;
        for hd in TILED_HEAD_DIMS {
            for name in tiled_kernel_names(hd) {
                assert!(super::super::fatbin_has(bin, &name), "{name} is not in the fatbin");
            }
        }
        assert_eq!(tiled_kernel_names(64)[2], "flash_bwd_dkv_hd64");
    }

    /// The dk/dv kernel's shared memory fits every GPU the fatbin targets (99 KiB per block on
    /// sm_86 and sm_89, more on sm_80 and sm_90), and its carving matches the kernel's.
    #[test]
    fn the_dkv_kernel_fits_shared_memory() {
        for hd in TILED_HEAD_DIMS {
            assert!(dkv_smem(hd) <= 99 * 1024, "width {hd}: {} bytes", dkv_smem(hd));
        }
        // K, V: 64 rows, Q, dO: 64 rows of 72 bf16 at width 64, then 3 x 64 4-byte values.
        assert_eq!(dkv_smem(64), 256 * 72 * 2 + 3 * 64 * 4);
        assert_eq!(dkv_smem(128), (128 + 64) * 136 * 2 + 3 * 32 * 4);
    }
}
