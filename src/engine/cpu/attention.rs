//! Causal grouped-query attention on the CPU engine, forward and backward over packed sequences, and
//! decoding against a KV cache. Reference twin: `model::cpu::attention` (`attention_fwd`,
//! `attention_bwd`), which `engine::host` runs per sequence.
//!
//! A unit of work is one (sequence, KV head): its keys and values are widened to f32 once, into the
//! panel layout of the GEMM micro-kernel (`gemm::micro_tile`), and every query head of its group
//! runs against them in blocks of [`BQ`] queries. A block's scores [BQ, keys] live in a scratch row
//! block, never the whole [T, T] matrix; the products around them (Q K^T, P V, and in the backward
//! dO V^T, dS K, dS^T Q, P^T dO) are micro-kernel tiles. Units are independent (a KV head's dK and
//! dV are summed inside its unit, over its query heads in order), so results do not depend on the
//! number of threads.
//!
//! ```text
//! forward   S = scale Q K^T (causal)   lse_i = logsumexp_j S_ij   P = exp(S - lse)   O = P V
//! backward  dP = dO V^T   D_i = dO_i . O_i   dS = P (dP - D)
//!           dQ = scale dS K   dK = scale dS^T Q   dV = P^T dO
//! ```
//! (the softmax's Jacobian gives dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik), and sum_k P_ik dP_ik =
//! dO_i . (sum_k P_ik V_k) = dO_i . O_i = D_i.)

use super::gemm::{micro_tile, tile, ATile, Panels};
use super::isa::Isa;
use super::math::exp;
use super::Cpu;
use crate::engine::host::seqs;
use crate::engine::{AttentionOps, Bf, F32};
use anyhow::Result;
use half::bf16;
use rayon::prelude::*;
use std::ops::Range;

/// Queries per block: a multiple of every path's MR.
pub const BQ: usize = 64;

/// The shapes of one call: heads, KV heads, head width.
#[derive(Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
}

/// C[m, blocks NR] (+)= A[m, k] B[k, blocks NR], B's first `blocks` column blocks. a: rows of
/// stride lda; c: rows of stride ldc; m a multiple of MR; k <= B's rows.
#[allow(clippy::too_many_arguments)]
fn mm(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    b: &Panels,
    blocks: usize,
    c: &mut [f32],
    ldc: usize,
    load: bool,
) {
    let (mr, nr) = tile(isa);
    assert!(m.is_multiple_of(mr) && k <= b.rows_pad && blocks <= b.blocks);
    assert!(
        blocks * nr <= ldc && c.len() >= m * ldc,
        "mm: C is smaller than [m, blocks NR]"
    );
    for cb in 0..blocks {
        for r0 in (0..m).step_by(mr) {
            let at = r0 * ldc + cb * nr;
            // SAFETY: the callers checked the path (`forward`, `backward`, `decode`); rows r0 .. r0 + MR
            // and columns cb NR .. + NR of c are in bounds (asserted), and c is borrowed mutably here.
            unsafe {
                micro_tile(
                    isa,
                    mr,
                    &a[r0 * lda..],
                    ATile::Rows(lda),
                    k,
                    b.block(cb),
                    c.as_mut_ptr().add(at),
                    ldc,
                    load,
                )
            };
        }
    }
}

/// A token's row of one head in a [t, heads, hd] tensor, widened.
#[inline(always)]
fn row(x: &[bf16], heads: usize, hd: usize, i: usize, h: usize) -> &[bf16] {
    &x[(i * heads + h) * hd..(i * heads + h + 1) * hd]
}

/// Results written by many units at once, each to rows of its own (sequence, head).
struct Shared<T>(*mut T);
// SAFETY: units write only elements of their own sequence's rows and their own heads (disjoint),
// and the buffers outlive the parallel loop.
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    /// # Safety
    /// No other thread accesses elements i .. i + n while the slice lives; they are in bounds.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, i: usize, n: usize) -> &mut [T] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i), n) }
    }
}

/// The forward: out, q: [t, heads, hd]; lse: [t, heads]; k, v: [t, kv_heads, hd].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    isa: Isa,
    out: &mut [bf16],
    lse: &mut [f32],
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    seq_start: &[i32],
    t: usize,
    dims: Dims,
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    let Dims { heads, kv_heads, hd } = dims;
    assert!(out.len() >= t * heads * hd && lse.len() >= t * heads && k.len() >= t * kv_heads * hd);
    let units: Vec<(Range<usize>, usize)> = seqs(seq_start, t)
        .into_iter()
        .flat_map(|s| (0..kv_heads).map(move |g| (s.clone(), g)))
        .collect();
    let (o, l) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    units
        .par_iter()
        .for_each(|(s, g)| fwd_on(isa, isa, &o, &l, q, k, v, s.clone(), *g, dims));
}

/// One (sequence, KV head) of the forward.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_unit(
    isa: Isa,
    out: &Shared<bf16>,
    lse: &Shared<f32>,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    s: Range<usize>,
    g: usize,
    Dims { heads, kv_heads, hd }: Dims,
) {
    let (_, nr) = tile(isa);
    let (len, s0) = (s.len(), s.start);
    let len_pad = len.div_ceil(nr) * nr;
    let scale = 1.0 / (hd as f32).sqrt();
    // K^T [hd, len] and V [len, hd] in panels.
    let kt = Panels::pack(nr, hd, len, hd, |d, j| row(k, kv_heads, hd, s0 + j, g)[d].to_f32());
    let vp = Panels::pack(nr, len, hd, len_pad, |j, d| row(v, kv_heads, hd, s0 + j, g)[d].to_f32());
    let hd_pad = vp.blocks * nr;
    let mut qs = vec![0f32; BQ * hd];
    let mut p = vec![0f32; BQ * len_pad];
    let mut o = vec![0f32; BQ * hd_pad];
    let group = heads / kv_heads;
    for h in g * group..(g + 1) * group {
        for i0 in (0..len).step_by(BQ) {
            let rows = BQ.min(len - i0);
            // Keys 0 .. kb NR cover every key the block's last query sees.
            let kb = (i0 + rows).div_ceil(nr);
            qs.fill(0.0);
            for (i, qr) in qs.chunks_mut(hd).take(rows).enumerate() {
                let src = row(q, heads, hd, s0 + i0 + i, h);
                qr.iter_mut().zip(src).for_each(|(o, x)| *o = x.to_f32() * scale);
            }
            mm(isa, &qs, hd, BQ, hd, &kt, kb, &mut p, len_pad, false);
            for (i, pr) in p.chunks_mut(len_pad).enumerate() {
                let pr = &mut pr[..kb * nr];
                if i >= rows {
                    pr.fill(0.0);
                    continue;
                }
                let seen = i0 + i + 1;
                let m = pr[..seen].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for x in &mut pr[..seen] {
                    *x = exp(*x - m);
                    sum += *x;
                }
                let inv = 1.0 / sum;
                pr[..seen].iter_mut().for_each(|x| *x *= inv);
                pr[seen..].fill(0.0);
                // SAFETY: row s0 + i0 + i, head h belongs to this unit alone.
                unsafe { lse.slice((s0 + i0 + i) * heads + h, 1)[0] = m + sum.ln() };
            }
            mm(isa, &p, len_pad, BQ, kb * nr, &vp, vp.blocks, &mut o, hd_pad, false);
            for (i, orow) in o.chunks(hd_pad).take(rows).enumerate() {
                // SAFETY: row s0 + i0 + i, head h belongs to this unit alone.
                let dst = unsafe { out.slice(((s0 + i0 + i) * heads + h) * hd, hd) };
                dst.iter_mut().zip(orow).for_each(|(d, &x)| *d = bf16::from_f32(x));
            }
        }
    }
}

/// The backward: dq, dout, out, q: [t, heads, hd]; dk, dv, k, v: [t, kv_heads, hd]; lse: [t, heads].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    [dq, dk, dv]: [&mut [bf16]; 3],
    dout: &[bf16],
    [q, k, v]: [&[bf16]; 3],
    out: &[bf16],
    lse: &[f32],
    seq_start: &[i32],
    t: usize,
    dims: Dims,
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    let Dims { heads, kv_heads, hd } = dims;
    assert!(dq.len() >= t * heads * hd && dk.len() >= t * kv_heads * hd && dv.len() >= t * kv_heads * hd);
    let units: Vec<(Range<usize>, usize)> = seqs(seq_start, t)
        .into_iter()
        .flat_map(|s| (0..kv_heads).map(move |g| (s.clone(), g)))
        .collect();
    let d = [
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    ];
    let ins = BwdIn {
        dout,
        q,
        k,
        v,
        out,
        lse,
    };
    units
        .par_iter()
        .for_each(|(s, g)| bwd_on(isa, isa, &d, &ins, s.clone(), *g, dims));
}

/// The backward's inputs.
struct BwdIn<'a> {
    dout: &'a [bf16],
    q: &'a [bf16],
    k: &'a [bf16],
    v: &'a [bf16],
    out: &'a [bf16],
    lse: &'a [f32],
}

/// One (sequence, KV head) of the backward: dQ of its query heads, dK and dV of its KV head.
#[inline(always)]
fn bwd_unit(isa: Isa, [dq, dk, dv]: &[Shared<bf16>; 3], x: &BwdIn, s: Range<usize>, g: usize, dims: Dims) {
    let Dims { heads, kv_heads, hd } = dims;
    let (_, nr) = tile(isa);
    let (len, s0) = (s.len(), s.start);
    let len_pad = len.div_ceil(nr) * nr;
    let scale = 1.0 / (hd as f32).sqrt();
    let kf = |j: usize, d: usize| row(x.k, kv_heads, hd, s0 + j, g)[d].to_f32();
    let vf = |j: usize, d: usize| row(x.v, kv_heads, hd, s0 + j, g)[d].to_f32();
    // K^T and V^T [hd, len] for the scores and dP; K [len, hd] for dQ.
    let kt = Panels::pack(nr, hd, len, hd, |d, j| kf(j, d));
    let vt = Panels::pack(nr, hd, len, hd, |d, j| vf(j, d));
    let kp = Panels::pack(nr, len, hd, len_pad, kf);
    let hd_pad = kp.blocks * nr;
    // dK, dV sums [len_pad, hd_pad] over the group's heads and query blocks.
    let (mut dks, mut dvs) = (vec![0f32; len_pad * hd_pad], vec![0f32; len_pad * hd_pad]);
    let (mut qs, mut dob) = (vec![0f32; BQ * hd], vec![0f32; BQ * hd]);
    let (mut p, mut ds) = (vec![0f32; BQ * len_pad], vec![0f32; BQ * len_pad]);
    let mut tr = vec![0f32; len_pad * BQ];
    let mut dqb = vec![0f32; BQ * hd_pad];
    let mut dd = [0f32; BQ];
    let group = heads / kv_heads;
    for h in g * group..(g + 1) * group {
        for i0 in (0..len).step_by(BQ) {
            let rows = BQ.min(len - i0);
            let kb = (i0 + rows).div_ceil(nr);
            let keys = kb * nr;
            qs.fill(0.0);
            dob.fill(0.0);
            for i in 0..rows {
                let ti = s0 + i0 + i;
                let (qr, dor, orow) = (
                    row(x.q, heads, hd, ti, h),
                    row(x.dout, heads, hd, ti, h),
                    row(x.out, heads, hd, ti, h),
                );
                let (qd, dod) = (&mut qs[i * hd..(i + 1) * hd], &mut dob[i * hd..(i + 1) * hd]);
                qd.iter_mut().zip(qr).for_each(|(o, v)| *o = v.to_f32() * scale);
                dod.iter_mut().zip(dor).for_each(|(o, v)| *o = v.to_f32());
                dd[i] = dod.iter().zip(orow).map(|(a, b)| a * b.to_f32()).sum();
            }
            // P from the scores and the forward's lse; dP = dO V^T; dS = P (dP - D).
            mm(isa, &qs, hd, BQ, hd, &kt, kb, &mut p, len_pad, false);
            mm(isa, &dob, hd, BQ, hd, &vt, kb, &mut ds, len_pad, false);
            for i in 0..BQ {
                let (pr, dr) = (
                    &mut p[i * len_pad..i * len_pad + keys],
                    &mut ds[i * len_pad..i * len_pad + keys],
                );
                let seen = if i < rows { i0 + i + 1 } else { 0 };
                if seen > 0 {
                    let l = x.lse[(s0 + i0 + i) * heads + h];
                    for (pv, dv) in pr[..seen].iter_mut().zip(dr[..seen].iter_mut()) {
                        *pv = exp(*pv - l);
                        *dv = *pv * (*dv - dd[i]);
                    }
                }
                pr[seen..].fill(0.0);
                dr[seen..].fill(0.0);
            }
            // dQ = scale dS K.
            mm(isa, &ds, len_pad, BQ, keys, &kp, kp.blocks, &mut dqb, hd_pad, false);
            for (i, r) in dqb.chunks(hd_pad).take(rows).enumerate() {
                // SAFETY: row s0 + i0 + i, head h belongs to this unit alone.
                let dst = unsafe { dq.slice(((s0 + i0 + i) * heads + h) * hd, hd) };
                dst.iter_mut().zip(r).for_each(|(o, &v)| *o = bf16::from_f32(scale * v));
            }
            // dK += dS^T (scale Q); dV += P^T dO (the transposes [keys, BQ] through `tr`).
            let qp = Panels::pack(nr, BQ, hd, BQ, |i, d| qs[i * hd + d]);
            transpose(&ds, len_pad, keys, &mut tr);
            mm(isa, &tr, BQ, keys, BQ, &qp, qp.blocks, &mut dks, hd_pad, true);
            let dop = Panels::pack(nr, BQ, hd, BQ, |i, d| dob[i * hd + d]);
            transpose(&p, len_pad, keys, &mut tr);
            mm(isa, &tr, BQ, keys, BQ, &dop, dop.blocks, &mut dvs, hd_pad, true);
        }
    }
    for j in 0..len {
        let at = ((s0 + j) * kv_heads + g) * hd;
        // SAFETY: row s0 + j of KV head g belongs to this unit alone.
        let (dkr, dvr) = unsafe { (dk.slice(at, hd), dv.slice(at, hd)) };
        dkr.iter_mut()
            .zip(&dks[j * hd_pad..])
            .for_each(|(o, &v)| *o = bf16::from_f32(v));
        dvr.iter_mut()
            .zip(&dvs[j * hd_pad..])
            .for_each(|(o, &v)| *o = bf16::from_f32(v));
    }
}

/// tr[j][i] = m[i][j] for i < BQ, j < cols. m: rows of stride ld; tr: [cols, BQ].
#[inline(always)]
fn transpose(m: &[f32], ld: usize, cols: usize, tr: &mut [f32]) {
    for i in 0..BQ {
        for j in 0..cols {
            tr[j * BQ + i] = m[i * ld + j];
        }
    }
}

/// Decoding: query i < b against its cached keys key_start[i] .. + key_len[i]. out, q: [b, heads,
/// hd]; k, v: [rows, kv_heads, hd]; key_start, key_len: [b].
#[allow(clippy::too_many_arguments)]
pub fn decode(
    isa: Isa,
    out: &mut [bf16],
    q: &[bf16],
    [k, v]: [&[bf16]; 2],
    key_start: &[i32],
    key_len: &[i32],
    b: usize,
    dims: Dims,
) {
    assert!(isa.supported(), "the {isa} kernels need instructions this CPU lacks");
    let Dims { heads, kv_heads, hd } = dims;
    assert!(out.len() >= b * heads * hd && q.len() >= b * heads * hd);
    let o = Shared(out.as_mut_ptr());
    (0..b * kv_heads).into_par_iter().for_each(|u| {
        let (i, g) = (u / kv_heads, u % kv_heads);
        let keys = key_start[i] as usize..(key_start[i] + key_len[i]) as usize;
        assert!(keys.end * kv_heads * hd <= k.len(), "decode: keys past the cache");
        decode_on(isa, &o, q, [k, v], keys, i, g, dims)
    });
}

/// Keys per block of the decoding scores: one vector of lanes.
const KB: usize = 16;

/// One (query, KV head) of [`decode`]: the query heads of group g of query i.
///
/// Scores by blocks of [`KB`] keys, the keys in lanes: a block's rows of K are widened transposed
/// ([hd][KB]), and each query head of the group sums q[d] K[j][d] over d in order, for the block's
/// KB keys at once (no sum across lanes per key; each key's sum is the plain order). Then the
/// softmax per head (its max and sum in lanes), and each cached value row, widened once, is met by
/// every head of the group. scores: [group][n_pad]; sums: [group][hd].
#[inline(always)]
fn decode_unit(
    out: &Shared<bf16>,
    q: &[bf16],
    [k, v]: [&[bf16]; 2],
    keys: Range<usize>,
    i: usize,
    g: usize,
    dims: Dims,
) {
    let Dims { heads, kv_heads, hd } = dims;
    let (n, group) = (keys.len(), heads / kv_heads);
    let n_pad = n.div_ceil(KB) * KB;
    let scale = 1.0 / (hd as f32).sqrt();
    let heads_of = g * group..(g + 1) * group;
    // The group's queries, scaled: [group][hd].
    let qf: Vec<f32> = heads_of
        .clone()
        .flat_map(|h| row(q, heads, hd, i, h).iter().map(move |v| v.to_f32() * scale))
        .collect();
    let mut sc = vec![0f32; group * n_pad];
    let mut kt = vec![0f32; hd * KB];
    for b in (0..n).step_by(KB) {
        for jj in 0..KB {
            match b + jj < n {
                true => row(k, kv_heads, hd, keys.start + b + jj, g)
                    .iter()
                    .enumerate()
                    .for_each(|(d, x)| kt[d * KB + jj] = x.to_f32()),
                false => (0..hd).for_each(|d| kt[d * KB + jj] = 0.0),
            }
        }
        for (hh, qh) in qf.chunks(hd).enumerate() {
            let mut acc = [0f32; KB];
            for (&qd, kd) in qh.iter().zip(kt.chunks_exact(KB)) {
                acc.iter_mut().zip(kd).for_each(|(a, &x)| *a += qd * x);
            }
            sc[hh * n_pad + b..][..KB].copy_from_slice(&acc);
        }
    }
    let mut sums = vec![0f32; group];
    for (sc, sum) in sc.chunks_mut(n_pad).zip(&mut sums) {
        let sc = &mut sc[..n];
        let m = lanes(sc, f32::NEG_INFINITY, f32::max);
        sc.iter_mut().for_each(|s| *s = exp(*s - m));
        *sum = lanes(sc, 0.0, |a, b| a + b);
    }
    let mut o = vec![0f32; group * hd];
    let mut r = vec![0f32; hd];
    for j in 0..n {
        r.iter_mut()
            .zip(row(v, kv_heads, hd, keys.start + j, g))
            .for_each(|(o, v)| *o = v.to_f32());
        for (hh, oh) in o.chunks_mut(hd).enumerate() {
            let p = sc[hh * n_pad + j];
            oh.iter_mut().zip(&r).for_each(|(o, &v)| *o += p * v);
        }
    }
    for ((h, oh), sum) in heads_of.zip(o.chunks(hd)).zip(&sums) {
        // SAFETY: query i, head h belongs to this unit alone.
        let dst = unsafe { out.slice((i * heads + h) * hd, hd) };
        dst.iter_mut().zip(oh).for_each(|(d, &x)| *d = bf16::from_f32(x / sum));
    }
}

/// `f` folded over x in [`KB`] lanes from `init`, then over the lanes: a vectorisable order (for
/// the max and the sum of a row of scores).
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut l = [init; KB];
    for c in x.chunks(KB) {
        l.iter_mut().zip(c).for_each(|(a, &b)| *a = f(*a, b));
    }
    l.into_iter().fold(init, f)
}

// The units compiled for each path, so that their softmax and packing loops vectorise with it
// (`path`, the same as the first argument, goes on to the micro-kernel).
crate::multiversion! {
    fn fwd_on(path: Isa, out: &Shared<bf16>, lse: &Shared<f32>, q: &[bf16], k: &[bf16], v: &[bf16], s: Range<usize>, g: usize, dims: Dims) => fwd_unit
}
crate::multiversion! {
    fn bwd_on(path: Isa, d: &[Shared<bf16>; 3], x: &BwdIn, s: Range<usize>, g: usize, dims: Dims) => bwd_unit
}
crate::multiversion! {
    fn decode_on(out: &Shared<bf16>, q: &[bf16], kv: [&[bf16]; 2], keys: Range<usize>, i: usize, g: usize, dims: Dims) => decode_unit
}

#[allow(clippy::too_many_arguments)]
impl AttentionOps for Cpu {
    fn attention_fwd(
        &self,
        out: &mut Bf<Self>,
        lse: &mut F32<Self>,
        q: &Bf<Self>,
        k: &Bf<Self>,
        v: &Bf<Self>,
        seq_start: &Vec<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        _max_len: usize,
    ) -> Result<()> {
        let dims = Dims { heads, kv_heads, hd };
        self.profile.time("attention_fwd", || {
            forward(self.isa, out, lse, q, k, v, seq_start, t, dims)
        });
        Ok(())
    }
    fn attention_bwd(
        &self,
        dq: &mut Bf<Self>,
        dk: &mut Bf<Self>,
        dv: &mut Bf<Self>,
        _dd: &mut F32<Self>,
        dout: &Bf<Self>,
        [q, k, v]: [&Bf<Self>; 3],
        out: &Bf<Self>,
        lse: &F32<Self>,
        seq_start: &Vec<i32>,
        t: usize,
        [heads, kv_heads, hd]: [usize; 3],
        _max_len: usize,
    ) -> Result<()> {
        let dims = Dims { heads, kv_heads, hd };
        self.profile.time("attention_bwd", || {
            backward(self.isa, [dq, dk, dv], dout, [q, k, v], out, lse, seq_start, t, dims)
        });
        Ok(())
    }
    fn attention_decode(
        &self,
        out: &mut Bf<Self>,
        q: &Bf<Self>,
        [k, v]: [&Bf<Self>; 2],
        key_start: &Vec<i32>,
        key_len: &Vec<i32>,
        b: usize,
        [heads, kv_heads, hd]: [usize; 3],
        _max_len: usize,
    ) -> Result<()> {
        let dims = Dims { heads, kv_heads, hd };
        self.profile.time("attention_decode", || {
            decode(self.isa, out, q, [k, v], key_start, key_len, b, dims)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::rel_err;
    use crate::engine::host::Host;
    use crate::engine::{to_bf16, to_f32};
    use crate::util::rng::Rng;

    /// Every path against the host device (the f32 reference per sequence) on packed sequences of
    /// odd lengths, one past a block of queries, and head widths that are and are not a whole number
    /// of panels; outputs poisoned first. O and the gradients are rounded to bf16 once (and the
    /// backward's D is taken from the bf16 O, as the GPU's is): 5e-3 and 1e-2; lse is f32.
    #[test]
    fn every_path_matches_the_host_device() {
        let mut rng = Rng::new(31);
        for isa in Isa::available() {
            let cpu = Cpu::with_isa(isa);
            for (lens, heads, kv_heads, hd) in [
                (vec![1, 5], 2, 1, 16),
                (vec![37, 70, 3], 6, 2, 24),
                (vec![130], 3, 3, 64),
            ] {
                let t: usize = lens.iter().sum();
                let seq_start: Vec<i32> = lens
                    .iter()
                    .scan(0, |at, &l| {
                        let s = *at;
                        *at += l;
                        Some(vec![s as i32; l])
                    })
                    .flatten()
                    .collect();
                let (qd, kvd) = (heads * hd, kv_heads * hd);
                let q = to_bf16(&rng.normal_vec(t * qd, 1.0));
                let k = to_bf16(&rng.normal_vec(t * kvd, 1.0));
                let v = to_bf16(&rng.normal_vec(t * kvd, 1.0));
                let dims = [heads, kv_heads, hd];
                let (mut o_want, mut lse_want) = (vec![bf16::ZERO; t * qd], vec![0f32; t * heads]);
                Host.attention_fwd(&mut o_want, &mut lse_want, &q, &k, &v, &seq_start, t, dims, 0)
                    .unwrap();
                let (mut o, mut lse) = (vec![bf16::NAN; t * qd], vec![f32::NAN; t * heads]);
                cpu.attention_fwd(&mut o, &mut lse, &q, &k, &v, &seq_start, t, dims, 0)
                    .unwrap();
                let what = format!("{isa} lens {lens:?} heads {heads}/{kv_heads} hd {hd}");
                let err = rel_err(&to_f32(&o), &to_f32(&o_want));
                assert!(err < 5e-3, "{what}: out {err}");
                assert!(rel_err(&lse, &lse_want) < 1e-5, "{what}: lse");

                let dout = to_bf16(&rng.normal_vec(t * qd, 1.0));
                let mut want = [
                    vec![bf16::ZERO; t * qd],
                    vec![bf16::ZERO; t * kvd],
                    vec![bf16::ZERO; t * kvd],
                ];
                let [wq, wk, wv] = &mut want;
                let mut dd = vec![0f32; t * heads];
                Host.attention_bwd(
                    wq,
                    wk,
                    wv,
                    &mut dd,
                    &dout,
                    [&q, &k, &v],
                    &o,
                    &lse,
                    &seq_start,
                    t,
                    dims,
                    0,
                )
                .unwrap();
                let mut got = [
                    vec![bf16::NAN; t * qd],
                    vec![bf16::NAN; t * kvd],
                    vec![bf16::NAN; t * kvd],
                ];
                let [gq, gk, gv] = &mut got;
                cpu.attention_bwd(
                    gq,
                    gk,
                    gv,
                    &mut dd,
                    &dout,
                    [&q, &k, &v],
                    &o,
                    &lse,
                    &seq_start,
                    t,
                    dims,
                    0,
                )
                .unwrap();
                for (name, g, w) in [
                    ("dq", &got[0], &want[0]),
                    ("dk", &got[1], &want[1]),
                    ("dv", &got[2], &want[2]),
                ] {
                    let err = rel_err(&to_f32(g), &to_f32(w));
                    assert!(err < 1e-2, "{what}: {name} {err}");
                }

                // Decoding: each sequence's last query against its keys, as a KV cache holds them.
                let b = lens.len();
                let mut starts = Vec::new();
                let mut at = 0;
                for &l in &lens {
                    starts.push(at as i32);
                    at += l;
                }
                let key_len: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
                let last: Vec<usize> = starts.iter().zip(&lens).map(|(&s, &l)| s as usize + l - 1).collect();
                let qb: Vec<bf16> = last.iter().flat_map(|&i| q[i * qd..(i + 1) * qd].to_vec()).collect();
                let (mut d_want, mut d_got) = (vec![bf16::ZERO; b * qd], vec![bf16::NAN; b * qd]);
                Host.attention_decode(&mut d_want, &qb, [&k, &v], &starts, &key_len, b, dims, 0)
                    .unwrap();
                cpu.attention_decode(&mut d_got, &qb, [&k, &v], &starts, &key_len, b, dims, 0)
                    .unwrap();
                let err = rel_err(&to_f32(&d_got), &to_f32(&d_want));
                assert!(err < 5e-3, "{what}: decode {err}");
                let o_last: Vec<f32> = last.iter().flat_map(|&i| to_f32(&o[i * qd..(i + 1) * qd])).collect();
                assert!(
                    rel_err(&to_f32(&d_got), &o_last) < 5e-3,
                    "{what}: decode against the forward"
                );
            }
        }
    }
}
