//! The elementwise and row kernels on the CPU engine. Reference twins: `model::cpu` (`rmsnorm`,
//! `rope`, `swiglu`, `elementwise`), which `engine::host` runs widened from and rounded to bf16.
//!
//! Each kernel splits its rows or values among threads, and each piece runs compiled for the chosen
//! path (`multiversion!`), widening and rounding bf16 in registers (`math`). Where the arithmetic is the
//! host device's, in its order, the result is its bits: embedding, gathers, add, cast, dropout (by
//! an integer threshold on the draw, [`keep_threshold`]) and RoPE (whose angles come from a table
//! per call, computed as the host computes each). RMSNorm's sums run in vector lanes and SwiGLU
//! uses `math::exp`, so those two are within a few bf16 roundings of the host (tested).

use super::math::{dot3, exp, round_bf16, widen};
use super::Cpu;
use crate::engine::{Bf, Elementwise, F32};
use crate::util::rng::{mix, GOLDEN};
use anyhow::Result;
use half::bf16;
use rayon::prelude::*;

/// Values per parallel chunk of the flat kernels.
const CHUNK: usize = 1 << 14;

/// row as f32 into `out`.
#[inline(always)]
fn widen_into(out: &mut [f32], row: &[bf16]) {
    out.iter_mut().zip(row).for_each(|(o, &v)| *o = widen(v));
}

#[allow(clippy::too_many_arguments)]
impl Elementwise for Cpu {
    fn rmsnorm_fwd(
        &self,
        y: &mut Bf<Self>,
        rstd: &mut F32<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        t: usize,
        eps: f32,
    ) -> Result<()> {
        self.profile.time("rmsnorm_fwd", || {
            // y = x r w with r = 1 / sqrt(mean(x^2) + eps).
            let d = w.len();
            let mut wf = vec![0f32; d];
            widen_into(&mut wf, w);
            (y[..t * d].par_chunks_mut(d))
                .zip(x[..t * d].par_chunks(d))
                .zip(rstd[..t].par_iter_mut())
                .for_each_init(
                    || vec![0f32; d],
                    |xf, ((yr, xr), r)| {
                        *r = rmsnorm_fwd_on(self.isa, yr, xr, &wf, eps, xf);
                    },
                );
            Ok(())
        })
    }
    fn rmsnorm_bwd(
        &self,
        dx: &mut Bf<Self>,
        dy: &Bf<Self>,
        x: &Bf<Self>,
        w: &Bf<Self>,
        rstd: &F32<Self>,
        t: usize,
    ) -> Result<()> {
        self.profile.time("rmsnorm_bwd", || {
            // dx = r w dy - (r^3 / d) x sum(dy w x), with the forward's r.
            let d = w.len();
            let mut wf = vec![0f32; d];
            widen_into(&mut wf, w);
            (dx[..t * d].par_chunks_mut(d))
                .zip(dy[..t * d].par_chunks(d).zip(x[..t * d].par_chunks(d)))
                .zip(rstd[..t].par_iter())
                .for_each_init(
                    || (vec![0f32; d], vec![0f32; d]),
                    |(dyf, xf), ((o, (dyr, xr)), &r)| {
                        rmsnorm_bwd_on(self.isa, o, dyr, xr, &wf, r, dyf, xf);
                    },
                );
            Ok(())
        })
    }
    fn rope_rotate(
        &self,
        x: &mut Bf<Self>,
        pos: &Vec<i32>,
        inv_freq: &F32<Self>,
        t: usize,
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        self.profile.time("rope_rotate", || {
            // Each pair (x_i, x_{i + hd/2}) rotated by sign pos inv_freq[i]: the angles' cos and sin
            // once per position of the call (as the host computes them: an f32 angle, f64 cos/sin).
            let half = inv_freq.len();
            let (hd, row) = (2 * half, heads * 2 * half);
            let angles = |p: i32| {
                inv_freq.iter().map(move |&f| {
                    let angle = (p as f32 * f) as f64;
                    (angle.cos() as f32, sign * angle.sin() as f32)
                })
            };
            let top = pos[..t].iter().map(|&p| p as usize).max().unwrap_or(0);
            // A table of every position up to the last, unless rows are fewer than positions
            // (decoding: one token at position 500), where each row's angles come on their own.
            let table: Option<Vec<(f32, f32)>> =
                (2 * t > top + 1).then(|| (0..=top as i32).into_par_iter().flat_map_iter(angles).collect());
            (x[..t * row].par_chunks_mut(row))
                .zip(pos[..t].par_iter())
                .for_each(|(xr, &p)| match &table {
                    Some(table) => rope_row_on(self.isa, xr, &table[p as usize * half..(p as usize + 1) * half], hd),
                    None => rope_row_on(self.isa, xr, &angles(p).collect::<Vec<_>>(), hd),
                });
            Ok(())
        })
    }
    fn swiglu_fwd(&self, out: &mut Bf<Self>, gate: &Bf<Self>, up: &Bf<Self>, n: usize) -> Result<()> {
        self.profile.time("swiglu_fwd", || {
            // out = silu(g) u, silu(g) = g / (1 + e^-g).
            (out[..n].par_chunks_mut(CHUNK))
                .zip(gate[..n].par_chunks(CHUNK).zip(up[..n].par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| {
                    swiglu_fwd_on(self.isa, o, g, u);
                });
            Ok(())
        })
    }
    fn swiglu_bwd(
        &self,
        dgate: &mut Bf<Self>,
        dup: &mut Bf<Self>,
        dout: &Bf<Self>,
        gate: &Bf<Self>,
        up: &Bf<Self>,
        n: usize,
    ) -> Result<()> {
        self.profile.time("swiglu_bwd", || {
            // With s = sigmoid(g): dg = dout u s (1 + g (1 - s)), du = dout g s.
            (dgate[..n].par_chunks_mut(CHUNK).zip(dup[..n].par_chunks_mut(CHUNK)))
                .zip(dout[..n].par_chunks(CHUNK))
                .zip(gate[..n].par_chunks(CHUNK).zip(up[..n].par_chunks(CHUNK)))
                .for_each(|(((dg, du), d), (g, u))| {
                    swiglu_bwd_on(self.isa, dg, du, d, g, u);
                });
            Ok(())
        })
    }
    fn embedding_fwd(&self, out: &mut Bf<Self>, table: &Bf<Self>, tokens: &Vec<i32>, t: usize, d: usize) -> Result<()> {
        self.profile.time("embedding_fwd", || {
            if let Some(&bad) =
                (tokens[..t].iter()).find(|&&tok| usize::try_from(tok).map_or(true, |v| (v + 1) * d > table.len()))
            {
                anyhow::bail!("token id {bad} is outside the embedding table");
            }
            (out[..t * d].par_chunks_mut(d))
                .zip(tokens[..t].par_iter())
                .for_each(|(o, &tok)| o.copy_from_slice(&table[tok as usize * d..(tok as usize + 1) * d]));
            Ok(())
        })
    }
    fn gather_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &Vec<i32>, n: usize, d: usize) -> Result<()> {
        self.profile.time("gather_rows", || {
            (out[..n * d].par_chunks_mut(d))
                .zip(idx[..n].par_iter())
                .for_each(|(o, &r)| o.copy_from_slice(&x[r as usize * d..(r as usize + 1) * d]));
            Ok(())
        })
    }
    fn scatter_rows(&self, out: &mut Bf<Self>, x: &Bf<Self>, idx: &Vec<i32>, n: usize, d: usize) -> Result<()> {
        self.profile.time("scatter_rows", || {
            for (i, &r) in idx[..n].iter().enumerate() {
                out[r as usize * d..(r as usize + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
            }
            Ok(())
        })
    }
    fn add(&self, x: &mut Bf<Self>, y: &Bf<Self>, n: usize) -> Result<()> {
        self.profile.time("add", || {
            (x[..n].par_chunks_mut(CHUNK))
                .zip(y[..n].par_chunks(CHUNK))
                .for_each(|(a, b)| {
                    add_on(self.isa, a, b);
                });
            Ok(())
        })
    }
    fn cast_f32_bf16(&self, out: &mut Bf<Self>, x: &F32<Self>, n: usize) -> Result<()> {
        self.profile.time("cast_f32_bf16", || {
            (out[..n].par_chunks_mut(CHUNK))
                .zip(x[..n].par_chunks(CHUNK))
                .for_each(|(o, v)| cast_on(self.isa, o, v));
            Ok(())
        })
    }
    /// `model::cpu::dropout`'s counter-based mask, each chunk drawing from where it starts, decided
    /// by an integer threshold on the 53-bit draw (the same decisions, [`keep_threshold`]).
    fn dropout(&self, out: &mut Bf<Self>, x: &Bf<Self>, seed: u64, p: f32, n: usize) -> Result<()> {
        self.profile.time("dropout", || {
            let (thr, keep) = (keep_threshold(p), 1.0 / (1.0 - p));
            (out[..n].par_chunks_mut(CHUNK))
                .zip(x[..n].par_chunks(CHUNK))
                .enumerate()
                .for_each(|(c, (o, v))| dropout_on(self.isa, o, v, seed, (c * CHUNK) as u64, thr, keep));
            Ok(())
        })
    }
}

/// One row of RMSNorm: y = x r w, r = 1 / sqrt(mean(x^2) + eps), returned. xf: [d] scratch.
#[inline(always)]
fn rmsnorm_fwd_row(y: &mut [bf16], x: &[bf16], w: &[f32], eps: f32, xf: &mut [f32]) -> f32 {
    widen_into(xf, x);
    let r = 1.0 / (dot3(xf, xf, None) / w.len() as f32 + eps).sqrt();
    y.iter_mut()
        .zip(xf.iter().zip(w))
        .for_each(|(o, (&v, &g))| *o = round_bf16(v * r * g));
    r
}

/// One row of RMSNorm's backward: dx = r w dy - (r^3 / d) x sum(dy w x). dyf, xf: [d] scratch.
#[inline(always)]
fn rmsnorm_bwd_row(dx: &mut [bf16], dy: &[bf16], x: &[bf16], w: &[f32], r: f32, dyf: &mut [f32], xf: &mut [f32]) {
    widen_into(dyf, dy);
    widen_into(xf, x);
    let c = r * r * r / w.len() as f32 * dot3(dyf, w, Some(xf));
    for (j, o) in dx.iter_mut().enumerate() {
        *o = round_bf16(r * w[j] * dyf[j] - c * xf[j]);
    }
}

/// One token's heads rotated: each pair (x_i, x_{i + hd/2}) by the angle whose (cos, sin) is cs[i].
#[inline(always)]
fn rope_row(x: &mut [bf16], cs: &[(f32, f32)], hd: usize) {
    let half = hd / 2;
    for head in x.chunks_mut(hd) {
        let (lo, hi) = head.split_at_mut(half);
        for ((a, b), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs) {
            let (x0, x1) = (widen(*a), widen(*b));
            *a = round_bf16(x0 * cos - x1 * sin);
            *b = round_bf16(x1 * cos + x0 * sin);
        }
    }
}

/// out = silu(g) u, silu(g) = g / (1 + e^-g).
#[inline(always)]
fn swiglu_fwd_run(out: &mut [bf16], gate: &[bf16], up: &[bf16]) {
    for (o, (&g, &u)) in out.iter_mut().zip(gate.iter().zip(up)) {
        let g = widen(g);
        *o = round_bf16(g / (1.0 + exp(-g)) * widen(u));
    }
}

/// With s = sigmoid(g): dg = dout u s (1 + g (1 - s)), du = dout g s.
#[inline(always)]
fn swiglu_bwd_run(dgate: &mut [bf16], dup: &mut [bf16], dout: &[bf16], gate: &[bf16], up: &[bf16]) {
    for (i, (dg, du)) in dgate.iter_mut().zip(dup.iter_mut()).enumerate() {
        let (g, u, d) = (widen(gate[i]), widen(up[i]), widen(dout[i]));
        let s = 1.0 / (1.0 + exp(-g));
        *dg = round_bf16(d * u * s * (1.0 + g * (1.0 - s)));
        *du = round_bf16(d * g * s);
    }
}

/// x += y.
#[inline(always)]
fn add_run(x: &mut [bf16], y: &[bf16]) {
    x.iter_mut()
        .zip(y)
        .for_each(|(a, &b)| *a = round_bf16(widen(*a) + widen(b)));
}

/// out = bf16(x).
#[inline(always)]
fn cast_run(out: &mut [bf16], x: &[f32]) {
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = round_bf16(v));
}

crate::multiversion! { fn rmsnorm_fwd_on(y: &mut [bf16], x: &[bf16], w: &[f32], eps: f32, xf: &mut [f32]) -> f32 => rmsnorm_fwd_row }
crate::multiversion! { fn rmsnorm_bwd_on(dx: &mut [bf16], dy: &[bf16], x: &[bf16], w: &[f32], r: f32, dyf: &mut [f32], xf: &mut [f32]) => rmsnorm_bwd_row }
crate::multiversion! { fn rope_row_on(x: &mut [bf16], cs: &[(f32, f32)], hd: usize) => rope_row }
crate::multiversion! { fn swiglu_fwd_on(out: &mut [bf16], gate: &[bf16], up: &[bf16]) => swiglu_fwd_run }
crate::multiversion! { fn swiglu_bwd_on(dgate: &mut [bf16], dup: &mut [bf16], dout: &[bf16], gate: &[bf16], up: &[bf16]) => swiglu_bwd_run }
crate::multiversion! { fn add_on(x: &mut [bf16], y: &[bf16]) => add_run }
crate::multiversion! { fn cast_on(out: &mut [bf16], x: &[f32]) => cast_run }
crate::multiversion! { fn dropout_on(out: &mut [bf16], x: &[bf16], seed: u64, start: u64, thr: u64, keep: f32) => dropout_run }

/// The smallest 53-bit draw u that `model::cpu::dropout` keeps: it keeps an element when
/// `f32(u 2^-53) >= p`, and rounding to f32 never decreases, so the kept draws are exactly u >= this.
pub fn keep_threshold(p: f32) -> u64 {
    let kept = |u: u64| (u as f64 * (1.0 / (1u64 << 53) as f64)) as f32 >= p;
    let (mut lo, mut hi) = (0u64, 1u64 << 53);
    // Invariant: every u < lo is dropped, every u >= hi kept (hi = 2^53: none is).
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if kept(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// out[i] = bf16(x[i] keep) if draw start + i of `seed`'s stream is kept, else 0. out, x: [len].
#[inline(always)]
fn dropout_run(out: &mut [bf16], x: &[bf16], seed: u64, start: u64, thr: u64, keep: f32) {
    let base = seed.wrapping_add(start.wrapping_mul(GOLDEN));
    for (i, (o, v)) in out.iter_mut().zip(x).enumerate() {
        let z = mix(base.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
        // (A select of the scaled value, not a branch, so the loop vectorises.)
        let kept = round_bf16(widen(*v) * keep);
        *o = if z >> 11 >= thr { kept } else { bf16::ZERO };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::isa::Isa;
    use crate::engine::cuda::rel_err;
    use crate::engine::host::Host;
    use crate::engine::{to_bf16, to_f32};
    use crate::util::rng::Rng;

    fn bits(v: &[bf16]) -> Vec<u16> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every kernel gives the host device's bits, over more values than one chunk (so the chunks'
    /// seams, the dropout streams' above all, are crossed), outputs poisoned first.
    /// The dropout's integer threshold makes the reference's decisions on every path, at rates
    /// from none to nearly all, over chunk seams; and it is the exact edge of the reference's rule.
    #[test]
    fn dropout_gives_the_host_devices_bits_on_every_path() {
        let mut rng = Rng::new(5);
        let n = CHUNK * 2 + 77;
        let x = to_bf16(&rng.normal_vec(n, 1.0));
        for isa in Isa::available() {
            let cpu = Cpu::with_isa(isa);
            for p in [0.0, 0.05, 0.1, 0.5, 0.999] {
                let (mut want, mut got) = (vec![bf16::NAN; n], vec![bf16::NAN; n]);
                Host.dropout(&mut want, &x, 1234, p, n).unwrap();
                cpu.dropout(&mut got, &x, 1234, p, n).unwrap();
                assert_eq!(bits(&want), bits(&got), "{isa} p {p}");
            }
        }
        for p in [0.05f32, 0.1, 1.0 / 3.0, 0.7] {
            let u = keep_threshold(p);
            let f = |u: u64| (u as f64 / (1u64 << 53) as f64) as f32;
            assert!(f(u) >= p && f(u - 1) < p, "p {p}: threshold {u}");
        }
        assert_eq!(keep_threshold(0.0), 0);
    }

    #[test]
    fn every_kernel_matches_the_host_device_on_every_path() {
        for isa in Isa::available() {
            every_kernel_matches_the_host_device(Cpu::with_isa(isa));
        }
    }

    /// The kernels of one path against the host device: the same bits where the arithmetic is the
    /// same; RMSNorm and SwiGLU within a bf16 rounding of some elements (4e-3 overall, the rstd
    /// 1e-6). Odd sizes, a flat length over several chunks, outputs poisoned first.
    fn every_kernel_matches_the_host_device(cpu: Cpu) {
        let isa = cpu.isa;
        let mut rng = Rng::new(21);
        let (t, heads, hd) = (37, 3, 16);
        let d = heads * hd;
        let n = CHUNK * 2 + 999;
        let bf = |rng: &mut Rng, n: usize| to_bf16(&rng.normal_vec(n, 1.0));
        let (x, w, dy) = (bf(&mut rng, t * d), bf(&mut rng, d), bf(&mut rng, t * d));
        let nan = |n: usize| vec![bf16::NAN; n];

        let (mut y0, mut r0, mut y1, mut r1) = (nan(t * d), vec![0f32; t], nan(t * d), vec![f32::NAN; t]);
        Host.rmsnorm_fwd(&mut y0, &mut r0, &x, &w, t, 1e-5).unwrap();
        cpu.rmsnorm_fwd(&mut y1, &mut r1, &x, &w, t, 1e-5).unwrap();
        assert!(rel_err(&to_f32(&y1), &to_f32(&y0)) < 4e-3, "{isa} rmsnorm_fwd");
        assert!(rel_err(&r1, &r0) < 1e-6, "{isa} rmsnorm_fwd rstd");
        let (mut d0, mut d1) = (nan(t * d), nan(t * d));
        Host.rmsnorm_bwd(&mut d0, &dy, &x, &w, &r0, t).unwrap();
        cpu.rmsnorm_bwd(&mut d1, &dy, &x, &w, &r0, t).unwrap();
        assert!(rel_err(&to_f32(&d1), &to_f32(&d0)) < 4e-3, "{isa} rmsnorm_bwd");

        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        // Packed sequences (a table of positions), and decoding's few rows far along (each row's
        // own angles).
        let packed: Vec<i32> = (0..t as i32).map(|i| i * 7 % 50).collect();
        let late: Vec<i32> = (0..t as i32).map(|i| 3 * t as i32 + 500 + i).collect();
        for (pos, sign) in [(&packed, 1.0), (&packed, -1.0), (&late, 1.0), (&late, -1.0)] {
            let (mut a, mut b) = (x.clone(), x.clone());
            Host.rope_rotate(&mut a, pos, &inv, t, heads, sign).unwrap();
            cpu.rope_rotate(&mut b, pos, &inv, t, heads, sign).unwrap();
            assert_eq!(bits(&a), bits(&b), "{isa} rope {sign} from position {}", pos[0]);
        }

        let (g, u, dout) = (bf(&mut rng, n), bf(&mut rng, n), bf(&mut rng, n));
        let (mut o0, mut o1) = (nan(n), nan(n));
        Host.swiglu_fwd(&mut o0, &g, &u, n).unwrap();
        cpu.swiglu_fwd(&mut o1, &g, &u, n).unwrap();
        assert!(rel_err(&to_f32(&o1), &to_f32(&o0)) < 4e-3, "{isa} swiglu_fwd");
        let (mut dg0, mut du0, mut dg1, mut du1) = (nan(n), nan(n), nan(n), nan(n));
        Host.swiglu_bwd(&mut dg0, &mut du0, &dout, &g, &u, n).unwrap();
        cpu.swiglu_bwd(&mut dg1, &mut du1, &dout, &g, &u, n).unwrap();
        assert!(rel_err(&to_f32(&dg1), &to_f32(&dg0)) < 4e-3, "{isa} swiglu_bwd dg");
        assert!(rel_err(&to_f32(&du1), &to_f32(&du0)) < 4e-3, "{isa} swiglu_bwd du");

        let (mut a0, mut a1) = (g.clone(), g.clone());
        Host.add(&mut a0, &u, n).unwrap();
        cpu.add(&mut a1, &u, n).unwrap();
        assert_eq!(bits(&a0), bits(&a1), "add");
        let f = rng.normal_vec(n, 3.0);
        let (mut c0, mut c1) = (nan(n), nan(n));
        Host.cast_f32_bf16(&mut c0, &f, n).unwrap();
        cpu.cast_f32_bf16(&mut c1, &f, n).unwrap();
        assert_eq!(bits(&c0), bits(&c1), "cast");
        let (mut p0, mut p1) = (nan(n), nan(n));
        Host.dropout(&mut p0, &g, 99, 0.1, n).unwrap();
        cpu.dropout(&mut p1, &g, 99, 0.1, n).unwrap();
        assert_eq!(bits(&p0), bits(&p1), "dropout");
        assert!(p1.iter().any(|v| v.to_f32() == 0.0) && p1.iter().any(|v| v.to_f32() != 0.0));

        let table = bf(&mut rng, 50 * d);
        let toks: Vec<i32> = (0..t as i32).map(|i| i * 13 % 50).collect();
        let (mut e0, mut e1) = (nan(t * d), nan(t * d));
        Host.embedding_fwd(&mut e0, &table, &toks, t, d).unwrap();
        cpu.embedding_fwd(&mut e1, &table, &toks, t, d).unwrap();
        assert_eq!(bits(&e0), bits(&e1), "embedding");
        assert!(
            cpu.embedding_fwd(&mut e1, &table, &vec![50; t], t, d).is_err(),
            "an id past the table"
        );
        let idx: Vec<i32> = (0..10).map(|i| (i * 3 + 1) % t as i32).collect();
        let (mut g0, mut g1) = (nan(10 * d), nan(10 * d));
        Host.gather_rows(&mut g0, &x, &idx, 10, d).unwrap();
        cpu.gather_rows(&mut g1, &x, &idx, 10, d).unwrap();
        assert_eq!(bits(&g0), bits(&g1), "gather");
    }
}
