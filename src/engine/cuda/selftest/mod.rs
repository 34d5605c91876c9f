//! `sqlora selftest`: every CUDA kernel against the CPU reference, on fresh random inputs at several
//! sizes (odd ones included), with outputs poisoned (NaN) before each run so an unwritten element
//! fails. The measure is ‖gpu − cpu‖ / ‖cpu‖, with a tolerance suited to bf16 outputs. Then a whole
//! training step of tiny models on both devices (`selftest_step.rs`).

mod step;

use super::{rel_err, AttentionPath, Cuda, GemmPath, LoraPath, TILED_HEAD_DIMS};
use crate::engine::prelude::*;
use crate::engine::SUM_PARTS;
use crate::model::cpu;
use crate::model::nf4::{dynamic_map, Nf4Tensor};
use crate::model::optim::{AdamStep, AdamWConfig};
use crate::util::rng::Rng;
use anyhow::Result;
use half::bf16;

/// bf16 keeps 8 significant bits: a relative error of a few 1e-3 is rounding, 1e-2 is the bound.
const TOL_BF16: f64 = 1e-2;
const TOL_F32: f64 = 1e-5;

pub use crate::engine::api::Check;

/// The checks made so far, each also handed to `echo` as it is made (so a run that stops on an
/// error has already shown its rows).
pub struct Checks<'a> {
    pub rows: Vec<Check>,
    echo: &'a mut dyn FnMut(&Check),
}

impl Checks<'_> {
    pub fn push(&mut self, c: Check) {
        (self.echo)(&c);
        self.rows.push(c);
    }
}

/// Round through bf16, as the device sees the values.
fn bf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// Run every check, handing each to `echo` as it is made; the caller fails on any `pass == false`.
pub fn run(gpu: &Cuda, seed: u64, echo: &mut dyn FnMut(&Check)) -> Result<Vec<Check>> {
    let mut rng = Rng::new(seed);
    let mut out = Checks { rows: Vec::new(), echo };
    let mut push = |op: &str, size: String, err: f64, tol: f64| {
        out.push(Check {
            op: op.into(),
            size,
            rel_err: err,
            tolerance: tol,
            pass: err <= tol,
        })
    };

    for &(t, d) in &[(1usize, 64usize), (7, 576), (33, 1000), (4, 4096)] {
        let size = format!("{t}x{d}");
        let (x, w, dy) = (
            bf(&rng.normal_vec(t * d, 1.0)),
            bf(&rng.normal_vec(d, 0.5)),
            bf(&rng.normal_vec(t * d, 1.0)),
        );
        let (xd, wd, dyd) = (gpu.up(&x)?, gpu.up(&w)?, gpu.up(&dy)?);
        let (mut y, mut rstd) = (gpu.poisoned(t * d)?, gpu.poisoned32(t)?);
        gpu.rmsnorm_fwd(&mut y, &mut rstd, &xd, &wd, t, 1e-5)?;
        let mut want = vec![0f32; t * d];
        cpu::rmsnorm_fwd(&mut want, &x, &w, 1e-5);
        push("rmsnorm_fwd", size.clone(), rel_err(&gpu.down(&y)?, &want), TOL_BF16);
        let mut dx = gpu.poisoned(t * d)?;
        gpu.rmsnorm_bwd(&mut dx, &dyd, &xd, &wd, &rstd, t)?;
        cpu::rmsnorm_bwd(&mut want, &dy, &x, &w, 1e-5);
        push("rmsnorm_bwd", size, rel_err(&gpu.down(&dx)?, &want), TOL_BF16);
    }

    for &(t, heads, hd) in &[(5usize, 3usize, 64usize), (17, 9, 64), (3, 2, 128)] {
        let size = format!("{t}x{heads}x{hd}");
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 100_000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let pos: Vec<usize> = (0..t).map(|i| 7 * i + 3).collect();
        let x = bf(&rng.normal_vec(t * heads * hd, 1.0));
        let (posd, invd) = (
            gpu.up32(&pos.iter().map(|&p| p as i32).collect::<Vec<_>>())?,
            gpu.up32(&inv)?,
        );
        for (op, sign) in [("rope_fwd", 1.0), ("rope_bwd", -1.0)] {
            let mut xd = gpu.up(&x)?;
            gpu.rope_rotate(&mut xd, &posd, &invd, t, heads, sign)?;
            let mut want = x.clone();
            if sign > 0.0 {
                cpu::rope_fwd(&mut want, &pos, &inv, heads);
            } else {
                cpu::rope_bwd(&mut want, &pos, &inv, heads);
            }
            push(op, size.clone(), rel_err(&gpu.down(&xd)?, &want), TOL_BF16);
        }
    }

    for &n in &[1usize, 1000, 65_537] {
        let (g, u, dout) = (
            bf(&rng.normal_vec(n, 2.0)),
            bf(&rng.normal_vec(n, 1.0)),
            bf(&rng.normal_vec(n, 1.0)),
        );
        let (gd, ud, dd) = (gpu.up(&g)?, gpu.up(&u)?, gpu.up(&dout)?);
        let mut o = gpu.poisoned(n)?;
        gpu.swiglu_fwd(&mut o, &gd, &ud, n)?;
        let mut want = vec![0f32; n];
        cpu::swiglu_fwd(&mut want, &g, &u);
        push("swiglu_fwd", n.to_string(), rel_err(&gpu.down(&o)?, &want), TOL_BF16);
        let (mut dg, mut du) = (gpu.poisoned(n)?, gpu.poisoned(n)?);
        gpu.swiglu_bwd(&mut dg, &mut du, &dd, &gd, &ud, n)?;
        let (mut wg, mut wu) = (vec![0f32; n], vec![0f32; n]);
        cpu::swiglu_bwd(&mut wg, &mut wu, &dout, &g, &u);
        let err = rel_err(&gpu.down(&dg)?, &wg).max(rel_err(&gpu.down(&du)?, &wu));
        push("swiglu_bwd", n.to_string(), err, TOL_BF16);
    }

    for &n in &[1usize, 1000, 100_003] {
        // A window into longer buffers (p at offset 7, moments at offset 3), with a clipping factor on
        // the second of three steps: the paged optimizer's use of the kernel.
        let c = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let (p_off, s_off) = (7, 3);
        let p0 = rng.normal_vec(p_off + n, 0.1);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.normal_vec(p_off + n, 0.01)).collect();
        let (mut want_p, mut want_m, mut want_v) = (p0.clone(), vec![0f32; s_off + n], vec![0f32; s_off + n]);
        let (mut p, mut m, mut v) = (gpu.up32(&p0)?, gpu.up32(&want_m)?, gpu.up32(&want_v)?);
        for (s, g) in grads.iter().enumerate() {
            let h = AdamStep::new(c, s as u64 + 1, 1e-3, if s == 1 { 0.37 } else { 1.0 });
            let (ps, ss) = (p_off..p_off + n, s_off..s_off + n);
            h.apply(
                &mut want_p[ps.clone()],
                &mut want_m[ss.clone()],
                &mut want_v[ss],
                &g[ps],
            );
            gpu.adamw_step(&mut p, &mut m, &mut v, &gpu.up32(g)?, p_off, s_off, n, &h)?;
        }
        let got = gpu.down32(&p)?;
        // Compare the updates, not the parameters (which barely move); the values outside the
        // window must not move at all.
        let delta = |x: &[f32]| x.iter().zip(&p0).map(|(a, b)| a - b).collect::<Vec<f32>>();
        let outside = got[..p_off] != p0[..p_off];
        let err = rel_err(&delta(&got), &delta(&want_p)).max(rel_err(&gpu.down32(&v)?, &want_v));
        // Every operation is rounded as on the CPU (no fused multiply-adds): equal to an ulp or so.
        push(
            "adamw_step",
            format!("{n} x3"),
            if outside { f64::INFINITY } else { err },
            1e-6,
        );
    }

    for &n in &[1usize, 1000, 100_003, 1 << 20] {
        // 3e19: every f32 square overflows, but the norm fits f32 as on the CPU.
        for (scale, label) in [(0.3f32, ""), (3e19, " (|x| ~ 3e19)")] {
            let x = rng.normal_vec(n, scale);
            let at = 5;
            let mut parts = gpu.poisoned32(at + SUM_PARTS + 2)?;
            gpu.partial_norms(&mut parts, at, &gpu.up32(&x)?, n)?;
            let parts = gpu.down32(&parts)?;
            let got = parts[at..at + SUM_PARTS]
                .iter()
                .map(|&p| p as f64 * p as f64)
                .sum::<f64>()
                .sqrt();
            let want = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            // Only the parts' slots are written: the poison around them stays.
            let outside = !parts[..at].iter().chain(&parts[at + SUM_PARTS..]).all(|p| p.is_nan());
            let err = if outside || !got.is_finite() {
                f64::INFINITY
            } else {
                (got - want).abs() / want
            };
            push(&format!("partial_norms{label}"), n.to_string(), err, TOL_F32);
        }
    }

    // Quantization must write bitsandbytes' bytes, so it is checked for equality, not closeness:
    // the count of differing packed bytes, scale codes, group scales and offsets. The data holds an
    // all-zero block and a NaN (the cases the spec pins down) among Gaussian weights.
    for &n in &[64usize, 1000, 65 * 64 + 13, 300 * 64 + 1, 1 << 20] {
        let mut w = rng.normal_vec(n, 0.02);
        if n >= 192 {
            w[64..128].fill(0.0);
            w[130] = f32::NAN;
        }
        let want = Nf4Tensor::quantize(&w, &[n]);
        let got = gpu.quantize_to_host(&w, &[n])?;
        let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
        let bits = |v: &[f32]| v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect::<Vec<u8>>();
        let mismatches = differ(&got.packed, &want.packed)
            + differ(&got.scales.qabsmax, &want.scales.qabsmax)
            + differ(&bits(&got.scales.absmax2), &bits(&want.scales.absmax2))
            + (got.scales.offset.to_bits() != want.scales.offset.to_bits()) as usize;
        push("nf4_quantize (values differing)", n.to_string(), mismatches as f64, 0.0);
    }

    let map = dynamic_map();
    for &n in &[64usize, 1000, 65 * 64 + 13, 300 * 64] {
        let w = rng.normal_vec(n, 0.02);
        let q = Nf4Tensor::quantize(&w, &[n]);
        let nblocks = q.scales.qabsmax.len();
        let mut absmax = gpu.poisoned32(nblocks)?;
        let (qa, a2, dm) = (
            gpu.up32(&q.scales.qabsmax)?,
            gpu.up32(&q.scales.absmax2)?,
            gpu.up32(&map)?,
        );
        gpu.nf4_dequantize_absmax(&mut absmax, &qa, &a2, &dm, q.scales.offset)?;
        push(
            "nf4_dequantize_absmax",
            n.to_string(),
            rel_err(&gpu.down32(&absmax)?, q.absmax()),
            TOL_F32,
        );
        let mut out = gpu.poisoned(n)?;
        gpu.nf4_dequantize(&mut out, &gpu.up32(&q.packed)?, &absmax, n)?;
        push(
            "nf4_dequantize",
            n.to_string(),
            rel_err(&gpu.down(&out)?, &q.dequantize()),
            TOL_BF16,
        );
    }
    for &(t, n, k, with_bias) in &[
        (1usize, 64usize, 64usize, false),
        (5, 96, 200, true),
        (17, 300, 576, false),
        (40, 128, 1000, true),
        (130, 256, 512, true), // whole 64 x 64 tiles: the tensor-core kernels' vectorised staging
        (3, 300, 512, false),  // a decode shape with K % 32 == 0: the GEMV's 16-byte path
    ] {
        let size = format!("{t}x{n}x{k}");
        let dense = cpu::Linear::dense(
            n,
            k,
            rng.normal_vec(n * k, 0.05),
            with_bias.then(|| bf(&rng.normal_vec(n, 0.1))),
        );
        let lin = dense.to_nf4();
        let cpu::LinearWeight::Nf4(q) = &lin.weight else {
            unreachable!("quantized")
        };
        let w = super::Nf4Device {
            packed: gpu.up32(&q.packed)?,
            absmax: gpu.up32(q.absmax())?,
            out_features: n,
            in_features: k,
        };
        let x = bf(&rng.normal_vec(t * k, 1.0));
        let bias = lin.bias.as_ref().map(|b| gpu.up(b)).transpose()?;
        let mut want_y = vec![0f32; t * n];
        cpu::linear_fwd(&mut want_y, &x, &lin);
        let dy = bf(&rng.normal_vec(t * n, 1.0));
        let mut want_dx = vec![0f32; t * k];
        cpu::linear_bwd_input(&mut want_dx, &dy, &lin);
        let mut paths = vec![(GemmPath::Tiled, ""), (GemmPath::Mma, "_mma")];
        if gpu.gemm_state.lock().is_ok_and(|s| s.has_blas()) {
            paths.push((GemmPath::Cublas, "_cublas"));
        }
        if t <= super::gemm::GEMV_MAX_M {
            let mut y = gpu.poisoned(t * n)?;
            gpu.nf4_gemm_fwd_via(GemmPath::Gemv, &mut y, &gpu.up(&x)?, &w, bias.as_ref(), t)?;
            push("nf4_gemv", size.clone(), rel_err(&gpu.down(&y)?, &want_y), TOL_BF16);
        }
        for (path, suffix) in paths {
            let mut y = gpu.poisoned(t * n)?;
            gpu.nf4_gemm_fwd_via(path, &mut y, &gpu.up(&x)?, &w, bias.as_ref(), t)?;
            let err = rel_err(&gpu.down(&y)?, &want_y);
            push(&format!("nf4_gemm_fwd{suffix}"), size.clone(), err, TOL_BF16);
            let mut dx = gpu.poisoned(t * k)?;
            gpu.nf4_gemm_bwd_input_via(path, &mut dx, &gpu.up(&dy)?, &w, t)?;
            let err = rel_err(&gpu.down(&dx)?, &want_dx);
            push(&format!("nf4_gemm_bwd_input{suffix}"), size.clone(), err, TOL_BF16);
        }
    }

    for &(t, d, vocab) in &[(1usize, 64usize, 10usize), (37, 576, 300)] {
        let table = bf(&rng.normal_vec(vocab * d, 1.0));
        let tokens: Vec<u32> = (0..t).map(|_| rng.below(vocab as u64) as u32).collect();
        let mut o = gpu.poisoned(t * d)?;
        let ids: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
        gpu.embedding_fwd(&mut o, &gpu.up(&table)?, &gpu.up32(&ids)?, t, d)?;
        let mut want = vec![0f32; t * d];
        cpu::embedding_fwd(&mut want, &table, &tokens, d);
        push("embedding_fwd", format!("{t}x{d}"), rel_err(&gpu.down(&o)?, &want), 0.0);
    }
    // Both paths. Token counts past one chunk of 32 (simple) or 64 (tiled) rows, column counts past
    // one block of 16 or one tile of 64, ranks that are not a multiple of 4, the largest rank.
    let lora_cases = [
        (1usize, 3usize, 5usize, 1usize),
        (6, 40, 64, 4),
        (33, 96, 200, 16),
        (70, 50, 33, 64),
        (37, 130, 150, 12),
        (130, 70, 20, 5),
    ];
    for (path, &(t, n, k, r)) in [LoraPath::Tiled, LoraPath::Simple]
        .into_iter()
        .flat_map(|p| lora_cases.iter().map(move |c| (p, c)))
    {
        let name = |op: &str| format!("{op} ({})", format!("{path:?}").to_lowercase());
        let size = format!("{t}x{n}x{k} r{r}");
        let (x, a, b) = (
            bf(&rng.normal_vec(t * k, 1.0)),
            bf(&rng.normal_vec(r * k, 0.3)),
            bf(&rng.normal_vec(n * r, 0.3)),
        );
        let y0 = bf(&rng.normal_vec(t * n, 1.0));
        // A and B inside flat adapter buffers, after 5 values of another adapter and before 3 more
        // (as the engine lays them out); the gradients' neighbours are NaN and must stay so.
        let at = crate::model::lora::LoraAt {
            a: 5,
            b: 5 + r * k,
            inp: k,
            out: n,
        };
        let len = at.b + n * r + 3;
        let mut w = bf(&rng.normal_vec(len, 0.3));
        w[at.a..at.b].copy_from_slice(&a);
        w[at.b..at.b + n * r].copy_from_slice(&b);
        let (xd, wd) = (gpu.up(&x)?, gpu.up(&w)?);
        let (mut y, mut xa) = (gpu.up(&y0)?, gpu.poisoned32(t * r)?);
        gpu.lora_fwd_via(path, &mut y, &mut xa, &xd, &wd, at, t, r, 2.0)?;
        let (mut want_y, mut want_xa) = (y0.clone(), vec![0f32; t * r]);
        cpu::lora_fwd(&mut want_y, &mut want_xa, &x, &a, &b, r, 2.0);
        push(
            &name("lora_fwd"),
            size.clone(),
            rel_err(&gpu.down(&y)?, &want_y),
            TOL_BF16,
        );
        push(
            &name("lora_fwd xa"),
            size.clone(),
            rel_err(&gpu.down32(&xa)?, &want_xa),
            TOL_F32,
        );
        let (dy, dx0) = (bf(&rng.normal_vec(t * n, 1.0)), bf(&rng.normal_vec(t * k, 1.0)));
        let mut grad0 = vec![f32::NAN; len];
        grad0[at.a..at.b + n * r].fill(0.0);
        let (mut dx, mut grad, mut g) = (gpu.up(&dx0)?, gpu.up32(&grad0)?, gpu.poisoned32(t * r)?);
        gpu.lora_bwd_via(
            path,
            &mut dx,
            &mut grad,
            &mut g,
            &gpu.up(&dy)?,
            &xd,
            &xa,
            &wd,
            at,
            t,
            r,
            2.0,
        )?;
        let grad = gpu.down32(&grad)?;
        let outside = !grad[..at.a].iter().chain(&grad[at.b + n * r..]).all(|v| v.is_nan());
        let (da, db) = (&grad[at.a..at.b], &grad[at.b..at.b + n * r]);
        let (mut dx_l, mut wda, mut wdb) = (vec![0f32; t * k], vec![0f32; r * k], vec![0f32; n * r]);
        cpu::lora_bwd(&mut dx_l, &mut wda, &mut wdb, &dy, &x, &want_xa, &a, &b, r, 2.0);
        let want_dx: Vec<f32> = dx0.iter().zip(&dx_l).map(|(p, q)| p + q).collect();
        push(
            &name("lora_bwd dx"),
            size.clone(),
            rel_err(&gpu.down(&dx)?, &want_dx),
            TOL_BF16,
        );
        let outside = if outside { f64::INFINITY } else { 0.0 };
        push(&name("lora_bwd dA"), size.clone(), rel_err(da, &wda).max(outside), 1e-4);
        push(&name("lora_bwd dB"), size, rel_err(db, &wdb).max(outside), 1e-4);
    }

    // The loss as the engine runs it: gather the labelled rows, then per chunk of rows the head
    // GEMM, softmax and gradient, and the second GEMM; scatter dh back. Two chunks, so row offsets
    // are exercised.
    for &(t, d, vocab) in &[
        (1usize, 64usize, 10usize),
        (13, 128, 1000),
        (70, 576, 3001),
        (170, 256, 1000),
    ] {
        let size = format!("{t}x{d}x{vocab}");
        let (h, w) = (bf(&rng.normal_vec(t * d, 1.0)), bf(&rng.normal_vec(vocab * d, 0.1)));
        let targets: Vec<Option<u32>> = (0..t)
            .map(|i| (i % 4 != 3).then(|| rng.below(vocab as u64) as u32))
            .collect();
        let (labels, ids): (Vec<i32>, Vec<i32>) = (targets.iter().enumerate())
            .filter_map(|(i, y)| y.map(|y| (i as i32, y as i32)))
            .unzip();
        let n = labels.len();
        let inv = 1.0 / n as f32;
        let (hd, wd, labd, idd) = (gpu.up(&h)?, gpu.up(&w)?, gpu.up32(&labels)?, gpu.up32(&ids)?);
        let head = cpu::Linear::dense(vocab, d, w.clone(), None);
        let h_labelled: Vec<f32> = labels
            .iter()
            .flat_map(|&r| h[r as usize * d..(r as usize + 1) * d].to_vec())
            .collect();
        let mut want_logits = vec![0f32; n * vocab];
        cpu::linear_fwd(&mut want_logits, &h_labelled, &head);
        let mut want = vec![0f32; t * d];
        let want_loss = cpu::cross_entropy_fwd_bwd(Some(&mut want), &h, &head, &targets, inv);
        // Our tensor-core GEMMs, and cuBLAS's where it is there (the tuner races the two).
        let mut paths = vec![GemmPath::Mma];
        if gpu.gemm_state.lock().expect("GEMM state lock").has_blas() {
            paths.push(GemmPath::Cublas);
        }
        for path in paths {
            let name = |op: &str| match path {
                GemmPath::Cublas => format!("{op} (cublas)"),
                _ => op.to_string(),
            };
            let mut h_lab = gpu.poisoned(n * d)?;
            gpu.gather_rows(&mut h_lab, &hd, &labd, n, d)?;
            let chunk = n.div_ceil(2);
            let (mut dh_lab, mut loss) = (gpu.poisoned(n * d)?, gpu.poisoned32(n)?);
            let mut logits_all = Vec::new();
            for r0 in (0..n).step_by(chunk) {
                let rows = chunk.min(n - r0);
                let (mut logits, mut dlogits) = (gpu.poisoned32(rows * vocab)?, gpu.poisoned(rows * vocab)?);
                gpu.head_logits_via(path, &mut logits, &h_lab, &wd, r0, rows, d)?;
                logits_all.extend(gpu.down32(&logits)?);
                gpu.ce_softmax_grad(&mut dlogits, &mut loss, &logits, &idd, r0, rows, vocab, inv)?;
                gpu.head_grad_via(path, &mut dh_lab, &dlogits, &wd, r0, rows, d)?;
            }
            let mut dh = gpu.poisoned(t * d)?;
            gpu.stream.memset_zeros(&mut dh)?;
            gpu.scatter_rows(&mut dh, &dh_lab, &labd, n, d)?;
            push(
                &name("head_logits"),
                size.clone(),
                rel_err(&logits_all, &want_logits),
                1e-4,
            );
            push(
                &name("cross_entropy dh"),
                size.clone(),
                rel_err(&gpu.down(&dh)?, &want),
                TOL_BF16,
            );
            let got_loss: f64 = gpu.down32(&loss)?.iter().map(|&l| l as f64).sum();
            push(
                &name("cross_entropy loss"),
                size.clone(),
                ((got_loss - want_loss) / want_loss).abs(),
                1e-4,
            );
        }
    }
    // Short and long sequences (past one pass of 128 threads over the keys), head widths that are
    // and are not multiples of 32, up to the 256 the simple kernels take; at the tiled kernels' widths
    // (32, 64, 128) both paths, with 64-token blocks that straddle sequence boundaries.
    for (lens, heads, kv_heads, hd) in [
        (vec![3usize, 5], 4usize, 2usize, 16usize),
        (vec![17], 3, 3, 8),
        (vec![40, 9], 8, 1, 64),
        (vec![300, 1, 129], 8, 2, 80),
        (vec![130], 2, 1, 256),
        (vec![65, 63, 1], 4, 2, 64),
        (vec![200, 1, 90], 6, 3, 32),
        (vec![130, 7], 4, 1, 128),
        (vec![64], 2, 2, 128),
    ] {
        let t: usize = lens.iter().sum();
        let size = format!("{lens:?}x{heads}/{kv_heads}x{hd}");
        let (q, k, v) = (
            bf(&rng.normal_vec(t * heads * hd, 1.0)),
            bf(&rng.normal_vec(t * kv_heads * hd, 1.0)),
            bf(&rng.normal_vec(t * kv_heads * hd, 1.0)),
        );
        let dout = bf(&rng.normal_vec(t * heads * hd, 1.0));
        let mut starts = Vec::new();
        for (i, &n) in lens.iter().enumerate() {
            let s0: usize = lens[..i].iter().sum();
            starts.extend(std::iter::repeat_n(s0 as i32, n));
        }
        let max_len = *lens.iter().max().unwrap();
        let dims = [heads, kv_heads, hd];
        // The log-sum-exp as the CPU device computes it from the same bf16 inputs.
        let (mut host_o, mut want_lse) = (vec![bf16::ZERO; q.len()], vec![0f32; t * heads]);
        let to_bf = |v: &[f32]| crate::engine::to_bf16(v);
        let (qh, kh, vh) = (to_bf(&q), to_bf(&k), to_bf(&v));
        crate::engine::host::Host.attention_fwd(
            &mut host_o,
            &mut want_lse,
            &qh,
            &kh,
            &vh,
            &starts,
            t,
            dims,
            max_len,
        )?;
        let (mut wo, mut wdq, mut wdk, mut wdv) = (
            vec![0f32; q.len()],
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let mut s0 = 0;
        for &n in &lens {
            let (qr, kr) = (
                s0 * heads * hd..(s0 + n) * heads * hd,
                s0 * kv_heads * hd..(s0 + n) * kv_heads * hd,
            );
            cpu::attention_fwd(
                &mut wo[qr.clone()],
                &q[qr.clone()],
                &k[kr.clone()],
                &v[kr.clone()],
                heads,
                kv_heads,
                hd,
            );
            cpu::attention_bwd(
                &mut wdq[qr.clone()],
                &mut wdk[kr.clone()],
                &mut wdv[kr.clone()],
                &dout[qr.clone()],
                &q[qr],
                &k[kr.clone()],
                &v[kr],
                heads,
                kv_heads,
                hd,
            );
            s0 += n;
        }
        let (qd, kd, vd, sd) = (gpu.up(&q)?, gpu.up(&k)?, gpu.up(&v)?, gpu.up32(&starts)?);
        let doutd = gpu.up(&dout)?;
        let tiled = TILED_HEAD_DIMS.contains(&hd);
        for path in [AttentionPath::Simple, AttentionPath::Tiled] {
            if path == AttentionPath::Tiled && !tiled {
                continue;
            }
            let name = |op: &str| match path {
                AttentionPath::Tiled => format!("{op} (tiled)"),
                _ => op.to_string(),
            };
            let (mut o, mut lse) = (gpu.poisoned(t * heads * hd)?, gpu.poisoned32(t * heads)?);
            gpu.attention_fwd_via(path, &mut o, &mut lse, &qd, &kd, &vd, &sd, t, dims, max_len)?;
            let (mut dq, mut dk, mut dv, mut dd) = (
                gpu.poisoned(q.len())?,
                gpu.poisoned(k.len())?,
                gpu.poisoned(v.len())?,
                gpu.poisoned32(t * heads)?,
            );
            gpu.attention_bwd_via(
                path,
                [&mut dq, &mut dk, &mut dv],
                &mut dd,
                &doutd,
                [&qd, &kd, &vd],
                &o,
                &lse,
                &sd,
                t,
                dims,
                max_len,
            )?;
            push(
                &name("attention_fwd lse"),
                size.clone(),
                rel_err(&gpu.down32(&lse)?, &want_lse),
                1e-5,
            );
            push(
                &name("attention_fwd"),
                size.clone(),
                rel_err(&gpu.down(&o)?, &wo),
                TOL_BF16,
            );
            for (op, got, want) in [("dq", &dq, &wdq), ("dk", &dk, &wdk), ("dv", &dv, &wdv)] {
                let err = rel_err(&gpu.down(got)?, want);
                push(&name(&format!("attention_bwd {op}")), size.clone(), err, TOL_BF16);
            }
        }
    }

    // Decoding: query b against cache rows key_start[b] .. + key_len[b], against the CPU device.
    for (key_lens, heads, kv_heads, hd) in [(vec![1usize, 7, 200], 4usize, 2usize, 64usize), (vec![33], 6, 3, 96)] {
        let b = key_lens.len();
        let rows: usize = key_lens.iter().sum::<usize>() + 5;
        let (q, k, v) = (
            bf(&rng.normal_vec(b * heads * hd, 1.0)),
            bf(&rng.normal_vec(rows * kv_heads * hd, 1.0)),
            bf(&rng.normal_vec(rows * kv_heads * hd, 1.0)),
        );
        // Sequences stored back to front, with a gap, so the starts are not just prefix sums.
        let mut starts = vec![0i32; b];
        let mut next = 5;
        for i in (0..b).rev() {
            starts[i] = next as i32;
            next += key_lens[i];
        }
        let lens: Vec<i32> = key_lens.iter().map(|&n| n as i32).collect();
        let max_len = *key_lens.iter().max().unwrap();
        let dims = [heads, kv_heads, hd];
        let mut o = gpu.poisoned(b * heads * hd)?;
        let (kd, vd) = (gpu.up(&k)?, gpu.up(&v)?);
        let (sd, ld) = (gpu.up32(&starts)?, gpu.up32(&lens)?);
        gpu.attention_decode(&mut o, &gpu.up(&q)?, [&kd, &vd], &sd, &ld, b, dims, max_len)?;
        let to_bf = |v: &[f32]| crate::engine::to_bf16(v);
        let mut want = vec![bf16::ZERO; q.len()];
        let (kh, vh) = (to_bf(&k), to_bf(&v));
        crate::engine::host::Host.attention_decode(
            &mut want,
            &to_bf(&q),
            [&kh, &vh],
            &starts,
            &lens,
            b,
            dims,
            max_len,
        )?;
        let size = format!("{key_lens:?}x{heads}/{kv_heads}x{hd}");
        push(
            "attention_decode",
            size,
            rel_err(&gpu.down(&o)?, &crate::engine::to_f32(&want)),
            TOL_BF16,
        );
    }

    // Greedy decoding's argmax: exact, with a tie (the first index wins) and a row led by NaN.
    for &(rows, v) in &[(1usize, 7usize), (5, 49_152), (3, 128_256)] {
        let mut logits = rng.normal_vec(rows * v, 3.0);
        logits[v / 3] = 50.0;
        logits[v / 2] = 50.0;
        if rows > 1 {
            logits[v] = f32::NAN;
        }
        let mut out = gpu.up32(&vec![-1i32; rows])?;
        gpu.argmax_rows(&mut out, &gpu.up32(&logits)?, rows, v)?;
        let got = gpu.stream.clone_dtoh(&out)?;
        let wrong = (got.iter().zip(logits.chunks(v)))
            .filter(|(g, row)| **g != crate::model::generate::argmax(row) as i32)
            .count();
        push("argmax_rows (rows differing)", format!("{rows}x{v}"), wrong as f64, 0.0);
    }

    for &n in &[1usize, 1000, 65_537] {
        let (x, y) = (bf(&rng.normal_vec(n, 1.0)), bf(&rng.normal_vec(n, 1.0)));
        let mut xd = gpu.up(&x)?;
        gpu.add(&mut xd, &gpu.up(&y)?, n)?;
        let mut want = x.clone();
        cpu::add_inplace(&mut want, &y);
        push("add", n.to_string(), rel_err(&gpu.down(&xd)?, &want), TOL_BF16);
        let f = rng.normal_vec(n, 3.0);
        let mut o = gpu.poisoned(n)?;
        gpu.cast_f32_bf16(&mut o, &gpu.up32(&f)?, n)?;
        push("cast_f32_bf16", n.to_string(), rel_err(&gpu.down(&o)?, &bf(&f)), 0.0);
        // Dropout must draw exactly the CPU's mask: compare which elements were zeroed, and the values.
        let seed = rng.next_u64();
        let mut o = gpu.poisoned(n)?;
        gpu.dropout(&mut o, &gpu.up(&x)?, seed, 0.1, n)?;
        let mut want = vec![0f32; n];
        cpu::dropout(&mut want, &x, seed, 0.1);
        let got = gpu.down(&o)?;
        let masks_differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| (**a == 0.0) != (**b == 0.0))
            .count();
        push("dropout mask", n.to_string(), masks_differ as f64, 0.0);
        push("dropout", n.to_string(), rel_err(&got, &bf(&want)), 0.0);
    }
    gpu.stream.synchronize()?;
    step::run(gpu, &mut out)?;
    Ok(out.rows)
}
