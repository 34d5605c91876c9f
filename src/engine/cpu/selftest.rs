//! `sqlora selftest` on the CPU engine: every kernel family of every instruction-set path this CPU
//! runs, against the host device (the f32 reference widened from and rounded to bf16), on fresh
//! random inputs at a training-like and an odd size, outputs poisoned (NaN) first so that an
//! unwritten element fails. The measure is ‖out − ref‖ / ‖ref‖; the unit tests beside each kernel
//! check more (edges, bits, thread counts), and this table is what a user runs on their machine.

use super::isa::Isa;
use super::Cpu;
use crate::engine::cuda::rel_err;
use crate::engine::host::Host;
use crate::engine::prelude::*;
use crate::engine::{to_bf16, to_f32, Check, Q8Head};
use crate::model::cpu::Linear;
use crate::model::lora::LoraAt;
use crate::model::q8::Q8Tensor;
use crate::util::rng::Rng;
use anyhow::Result;
use half::bf16;

/// One bf16 rounding of the output, with sums in another order: a few 1e-3; 1e-2 is the bound.
const TOL_BF16: f64 = 1e-2;
/// f32 outputs, sums in another order.
const TOL_F32: f64 = 1e-4;

/// Every check on every path, each handed to `echo` as it is made.
pub fn run(seed: u64, echo: &mut dyn FnMut(&Check)) -> Result<Vec<Check>> {
    let mut rows = Vec::new();
    for isa in Isa::available() {
        let cpu = Cpu::with_isa(isa);
        let mut rng = Rng::new(seed);
        let mut push = |op: &str, size: String, err: f64, tol: f64| {
            let c = Check {
                op: format!("{isa} {op}"),
                size,
                rel_err: err,
                tolerance: tol,
                pass: err <= tol,
            };
            echo(&c);
            rows.push(c);
        };
        let bf = |rng: &mut Rng, n: usize, s: f32| to_bf16(&rng.normal_vec(n, s));
        let nan = |n: usize| vec![bf16::NAN; n];
        let err = |a: &[bf16], b: &[bf16]| rel_err(&to_f32(a), &to_f32(b));

        for (t, n, k) in [(256, 576, 1536), (37, 100, 77), (3, 96, 64)] {
            let size = format!("{t}x{n}x{k}");
            let w = Linear::dense(n, k, rng.normal_vec(n * k, 0.05), None).to_nf4();
            let x = bf(&mut rng, t * k, 1.0);
            let (mut want, mut got) = (nan(t * n), nan(t * n));
            Host.nf4_gemm_fwd(&mut want, &x, &w, None, t)?;
            cpu.nf4_gemm_fwd(&mut got, &x, &w, None, t)?;
            push("nf4_gemm_fwd", size.clone(), err(&got, &want), TOL_BF16);
            let dy = bf(&mut rng, t * n, 1.0);
            let (mut want, mut got) = (nan(t * k), nan(t * k));
            Host.nf4_gemm_bwd_input(&mut want, &dy, &w, t)?;
            cpu.nf4_gemm_bwd_input(&mut got, &dy, &w, t)?;
            push("nf4_gemm_bwd_input", size.clone(), err(&got, &want), TOL_BF16);

            let r = 16;
            let at = LoraAt {
                a: 0,
                b: r * k,
                inp: k,
                out: n,
            };
            let lw = bf(&mut rng, r * k + n * r, 0.1);
            let y0 = bf(&mut rng, t * n, 1.0);
            let (mut yw, mut yg) = (y0.clone(), y0);
            let (mut xaw, mut xag) = (vec![0f32; t * r], vec![f32::NAN; t * r]);
            Host.lora_fwd(&mut yw, &mut xaw, &x, &lw, at, t, r, 2.0)?;
            cpu.lora_fwd(&mut yg, &mut xag, &x, &lw, at, t, r, 2.0)?;
            push(
                "lora_fwd",
                size.clone(),
                err(&yg, &yw).max(rel_err(&xag, &xaw)),
                TOL_BF16,
            );
            let dx0 = bf(&mut rng, t * k, 1.0);
            let (mut dxw, mut dxg) = (dx0.clone(), dx0);
            let (mut gw, mut gg) = (vec![0f32; r * k + n * r], vec![0f32; r * k + n * r]);
            let mut g = vec![f32::NAN; t * r];
            Host.lora_bwd(&mut dxw, &mut gw, &mut g.clone(), &dy, &x, &xaw, &lw, at, t, r, 2.0)?;
            cpu.lora_bwd(&mut dxg, &mut gg, &mut g, &dy, &x, &xaw, &lw, at, t, r, 2.0)?;
            push("lora_bwd dx", size.clone(), err(&dxg, &dxw), TOL_BF16);
            push("lora_bwd dA dB", size.clone(), rel_err(&gg, &gw), TOL_F32);
        }

        for (op, size, e, tol) in gemm_routes(isa, &mut rng) {
            push(&op, size, e, tol);
        }

        for (lens, heads, kv, hd) in [(vec![256, 256], 9, 3, 64), (vec![37, 70, 3], 6, 2, 24)] {
            let t: usize = lens.iter().sum();
            let size = format!("{lens:?} h{heads}/{kv} d{hd}");
            let seq_start: Vec<i32> = lens
                .iter()
                .scan(0i32, |at, &l| {
                    let s = *at;
                    *at += l as i32;
                    Some(vec![s; l])
                })
                .flatten()
                .collect();
            let (qd, kvd, dims) = (heads * hd, kv * hd, [heads, kv, hd]);
            let (q, k, v) = (
                bf(&mut rng, t * qd, 1.0),
                bf(&mut rng, t * kvd, 1.0),
                bf(&mut rng, t * kvd, 1.0),
            );
            let (mut ow, mut lw) = (nan(t * qd), vec![0f32; t * heads]);
            let (mut og, mut lg) = (nan(t * qd), vec![f32::NAN; t * heads]);
            Host.attention_fwd(&mut ow, &mut lw, &q, &k, &v, &seq_start, t, dims, 0)?;
            cpu.attention_fwd(&mut og, &mut lg, &q, &k, &v, &seq_start, t, dims, 0)?;
            push(
                "attention_fwd",
                size.clone(),
                err(&og, &ow).max(rel_err(&lg, &lw)),
                TOL_BF16,
            );
            let dout = bf(&mut rng, t * qd, 1.0);
            let mut dd = vec![0f32; t * heads];
            let (mut a, mut b, mut c) = (nan(t * qd), nan(t * kvd), nan(t * kvd));
            Host.attention_bwd(
                &mut a,
                &mut b,
                &mut c,
                &mut dd,
                &dout,
                [&q, &k, &v],
                &ow,
                &lw,
                &seq_start,
                t,
                dims,
                0,
            )?;
            let (mut a2, mut b2, mut c2) = (nan(t * qd), nan(t * kvd), nan(t * kvd));
            cpu.attention_bwd(
                &mut a2,
                &mut b2,
                &mut c2,
                &mut dd,
                &dout,
                [&q, &k, &v],
                &ow,
                &lw,
                &seq_start,
                t,
                dims,
                0,
            )?;
            let e = err(&a2, &a).max(err(&b2, &b)).max(err(&c2, &c));
            push("attention_bwd", size.clone(), e, TOL_BF16);
        }

        let (t, d) = (67, 576);
        let (x, w, dy) = (bf(&mut rng, t * d, 1.0), bf(&mut rng, d, 1.0), bf(&mut rng, t * d, 1.0));
        let (mut yw, mut rw, mut yg, mut rg) = (nan(t * d), vec![0f32; t], nan(t * d), vec![f32::NAN; t]);
        Host.rmsnorm_fwd(&mut yw, &mut rw, &x, &w, t, 1e-5)?;
        cpu.rmsnorm_fwd(&mut yg, &mut rg, &x, &w, t, 1e-5)?;
        push(
            "rmsnorm_fwd",
            format!("{t}x{d}"),
            err(&yg, &yw).max(rel_err(&rg, &rw)),
            TOL_BF16,
        );
        let (mut dw, mut dg) = (nan(t * d), nan(t * d));
        Host.rmsnorm_bwd(&mut dw, &dy, &x, &w, &rw, t)?;
        cpu.rmsnorm_bwd(&mut dg, &dy, &x, &w, &rw, t)?;
        push("rmsnorm_bwd", format!("{t}x{d}"), err(&dg, &dw), TOL_BF16);
        let n = 100_003;
        let (g, u, dout) = (bf(&mut rng, n, 2.0), bf(&mut rng, n, 1.0), bf(&mut rng, n, 1.0));
        let (mut ow, mut og) = (nan(n), nan(n));
        Host.swiglu_fwd(&mut ow, &g, &u, n)?;
        cpu.swiglu_fwd(&mut og, &g, &u, n)?;
        push("swiglu_fwd", format!("{n}"), err(&og, &ow), TOL_BF16);
        let (mut a, mut b, mut a2, mut b2) = (nan(n), nan(n), nan(n), nan(n));
        Host.swiglu_bwd(&mut a, &mut b, &dout, &g, &u, n)?;
        cpu.swiglu_bwd(&mut a2, &mut b2, &dout, &g, &u, n)?;
        push("swiglu_bwd", format!("{n}"), err(&a2, &a).max(err(&b2, &b)), TOL_BF16);
        let (mut pw, mut pg) = (nan(n), nan(n));
        Host.dropout(&mut pw, &g, seed, 0.1, n)?;
        cpu.dropout(&mut pg, &g, seed, 0.1, n)?;
        push("dropout", format!("{n}"), err(&pg, &pw), 0.0);
        let pos: Vec<i32> = (0..t as i32).map(|i| i * 5 % 40).collect();
        let inv: Vec<f32> = (0..32).map(|i| 1.0 / 10000f32.powf(i as f32 / 32.0)).collect();
        let (mut rw2, mut rg2) = (x.clone(), x.clone());
        Host.rope_rotate(&mut rw2, &pos, &inv, t, 9, 1.0)?;
        cpu.rope_rotate(&mut rg2, &pos, &inv, t, 9, 1.0)?;
        push("rope_rotate", format!("{t}x9x64"), err(&rg2, &rw2), 0.0);

        let (rows_, v) = (19, 5003);
        let h = bf(&mut rng, rows_ * d, 1.0);
        let head = bf(&mut rng, v * d, 0.05);
        let (mut lw, mut lg) = (vec![0f32; rows_ * v], vec![f32::NAN; rows_ * v]);
        Host.head_logits(&mut lw, &h, &head, 0, rows_, d)?;
        cpu.head_logits(&mut lg, &h, &head, 0, rows_, d)?;
        push("head_logits", format!("{rows_}x{v}x{d}"), rel_err(&lg, &lw), TOL_F32);
        // The Q8_0 head of generation, in one GEMV call and in several (past GEMV_MAX_T rows).
        let q = Q8Tensor::quantize(&rng.normal_vec(v * d, 0.05), v, d);
        let (qw, qg) = (Q8Head::upload(&Host, q.clone())?, Q8Head::upload(&cpu, q)?);
        for n in [rows_, 70] {
            let h = bf(&mut rng, n * d, 1.0);
            let (mut lw, mut lg) = (vec![0f32; n * v], vec![f32::NAN; n * v]);
            Host.head_logits_q8(&mut lw, &h, &qw, n, d)?;
            cpu.head_logits_q8(&mut lg, &h, &qg, n, d)?;
            push("head_logits_q8", format!("{n}x{v}x{d}"), rel_err(&lg, &lw), TOL_F32);
        }
        let targets: Vec<i32> = (0..rows_ as i32).map(|i| i * 7 % v as i32).collect();
        let (mut zw, mut sw) = (nan(rows_ * v), vec![0f32; rows_]);
        let (mut zg, mut sg) = (nan(rows_ * v), vec![0f32; rows_]);
        Host.ce_softmax_grad(&mut zw, &mut sw, &lw, &targets, 0, rows_, v, 0.1)?;
        cpu.ce_softmax_grad(&mut zg, &mut sg, &lw, &targets, 0, rows_, v, 0.1)?;
        push(
            "ce_softmax_grad",
            format!("{rows_}x{v}"),
            err(&zg, &zw).max(rel_err(&sg, &sw)),
            TOL_BF16,
        );
        let (mut hw, mut hg) = (nan(rows_ * d), nan(rows_ * d));
        Host.head_grad(&mut hw, &zw, &head, 0, rows_, d)?;
        cpu.head_grad(&mut hg, &zw, &head, 0, rows_, d)?;
        push("head_grad", format!("{rows_}x{v}x{d}"), err(&hg, &hw), TOL_BF16);
    }
    Ok(rows)
}

/// Every GEMM this path can run, called directly whichever one `matmul` would choose, so that a
/// CPU with a faster one checks the others too: the FMA GEMM, and on AVX-512 each pair kernel the
/// CPU has (AMX tiles, AVX512-BF16 dot products). C = A P on f32 values against their f64 sums;
/// the pair kernels round A and P to bf16, so they get the bf16 bound. Rows: (op, size, error,
/// tolerance).
fn gemm_routes(isa: Isa, rng: &mut Rng) -> Vec<(String, String, f64, f64)> {
    use super::gemm::{dense_panel, Epilogue, Lhs};
    let mut rows = Vec::new();
    for (t, l, n) in [(256, 576, 192), (37, 100, 77)] {
        let size = format!("{t}x{n}x{l}");
        let (a, p) = (rng.normal_vec(t * l, 1.0), rng.normal_vec(l * n, 0.5));
        let want: Vec<f32> = (0..t * n)
            .map(|i| {
                (0..l)
                    .map(|s| a[i / n * l + s] as f64 * p[s * n + i % n] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let panel = dense_panel(&p, l, n);
        let mut got = vec![f32::NAN; t * n];
        super::gemm::gemm(isa, Lhs::Rows(&a), t, l, n, &panel, Epilogue::ASSIGN, &mut got);
        rows.push(("gemm fma".into(), size.clone(), rel_err(&got, &want), TOL_F32));
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            use super::amx::{FromF32, Kernel};
            for kernel in Kernel::available() {
                let mut got = vec![f32::NAN; t * n];
                let (a, p) = (Lhs::Rows(&a[..]), &FromF32(&panel));
                super::amx::gemm(kernel, isa, a, t, l, n, p, Epilogue::ASSIGN, &mut got);
                let op = format!("gemm {}", format!("{kernel:?}").to_lowercase());
                rows.push((op, size.clone(), rel_err(&got, &want), TOL_BF16));
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    /// The table `sqlora selftest` prints passes on every path of this CPU.
    #[test]
    fn every_row_passes() {
        let rows = super::run(5, &mut |_| {}).unwrap();
        assert!(rows.len() >= 20, "{} rows", rows.len());
        let failed: Vec<_> = rows.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "{failed:?}");
    }
}
