//! AdamW with decoupled weight decay and bias correction, global-norm gradient clipping, learning
//! rate schedules, and the paged optimizer state.
//!
//! Update for parameter p with gradient g at step t (1-based), as `torch.optim.AdamW`:
//!   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//!   p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

use anyhow::{bail, Result};
use rayon::prelude::*;
use std::ops::Range;

/// Values of the optimizer state per page (1M floats: 4 MiB per moment per page).
pub const PAGE: usize = 1 << 20;

/// Storage of the optimizer moments `m` and `v`, in pages. The CUDA backend keeps pages in pinned
/// host memory and streams them through a fixed device window on a side stream; on the CPU the
/// pages are plain memory. The update only ever sees one page at a time through this interface.
/// A visitor of one page: the parameter range it covers, its `m` and its `v`.
pub type PageFn<'a> = dyn FnMut(Range<usize>, &mut [f32], &mut [f32]) + 'a;

pub trait StatePages {
    /// Number of parameters covered.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every page, in order: the parameter range it covers (contiguous from 0), its `m` and its `v`.
    fn pages_mut(&mut self) -> Vec<(Range<usize>, &mut [f32], &mut [f32])>;
    /// Visit every page in order with the parameter range it covers and its `m` and `v`.
    fn for_each_page(&mut self, f: &mut PageFn) {
        for (r, m, v) in self.pages_mut() {
            f(r, m, v);
        }
    }
    /// Copy out all of `m` and `v` (for checkpoints).
    fn export(&mut self) -> (Vec<f32>, Vec<f32>) {
        let (mut m, mut v) = (vec![0f32; self.len()], vec![0f32; self.len()]);
        self.for_each_page(&mut |r, pm, pv| {
            m[r.clone()].copy_from_slice(pm);
            v[r].copy_from_slice(pv);
        });
        (m, v)
    }
    /// Overwrite all of `m` and `v` (resuming from a checkpoint).
    fn import(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        if m.len() != self.len() || v.len() != self.len() {
            bail!(
                "optimizer state has {} and {} values, expected {}",
                m.len(),
                v.len(),
                self.len()
            );
        }
        self.for_each_page(&mut |r, pm, pv| {
            pm.copy_from_slice(&m[r.clone()]);
            pv.copy_from_slice(&v[r]);
        });
        Ok(())
    }
}

/// Host-memory pages: the CPU backend's state store.
pub struct HostPages {
    len: usize,
    page: usize,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl HostPages {
    /// Zeroed state for `len` parameters in pages of `page` values.
    pub fn new(len: usize, page: usize) -> HostPages {
        assert!(page > 0);
        let sizes: Vec<usize> = (0..len.div_ceil(page)).map(|i| page.min(len - i * page)).collect();
        HostPages {
            len,
            page,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }
}

impl StatePages for HostPages {
    fn len(&self) -> usize {
        self.len
    }

    fn pages_mut(&mut self) -> Vec<(Range<usize>, &mut [f32], &mut [f32])> {
        let page = self.page;
        (self.m.iter_mut().zip(&mut self.v).enumerate())
            .map(|(i, (m, v))| (i * page..i * page + m.len(), &mut m[..], &mut v[..]))
            .collect()
    }
}

/// AdamW hyper-parameters (PyTorch's defaults but for the learning rate, which the schedule gives).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over one flat parameter buffer, with its moments behind [`StatePages`].
pub struct AdamW {
    pub config: AdamWConfig,
    pub state: Box<dyn StatePages + Send>,
    /// Updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, state: Box<dyn StatePages + Send>) -> AdamW {
        AdamW { config, state, step: 0 }
    }

    /// Apply one update with learning rate `lr`.
    /// params, grads: [n] in the same layout as the state.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        assert!(params.len() == self.state.len() && grads.len() == params.len());
        self.step += 1;
        let h = AdamStep::new(self.config, self.step, lr, 1.0);
        // Pages are independent: update them in parallel, each with its slice of params and grads.
        let mut work = Vec::new();
        let (mut p_rest, mut g_rest) = (params, grads);
        for (range, m, v) in self.state.pages_mut() {
            let (p, p_tail) = std::mem::take(&mut p_rest).split_at_mut(range.len());
            let (g, g_tail) = g_rest.split_at(range.len());
            (p_rest, g_rest) = (p_tail, g_tail);
            work.push((p, g, m, v));
        }
        work.into_par_iter().for_each(|(p, g, m, v)| h.apply(p, m, v, g));
    }
}

/// The scalars of one AdamW update: what every device's update of a value needs (the CUDA kernel
/// `adamw_step` takes exactly these). `gscale` multiplies each gradient first: the clipping factor
/// when clipping is folded into the update, else 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub gscale: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 - beta1^t.
    pub bc1: f32,
    /// sqrt(1 - beta2^t).
    pub bc2_sqrt: f32,
}

impl AdamStep {
    /// The scalars of update number `step` (1-based).
    pub fn new(c: AdamWConfig, step: u64, lr: f32, gscale: f32) -> AdamStep {
        assert!(step > 0, "AdamW steps count from 1");
        let t = step.min(i32::MAX as u64) as i32;
        AdamStep {
            lr,
            gscale,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bc1: 1.0 - c.beta1.powi(t),
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt(),
        }
    }

    /// Update p, m, v from g, value by value (the formula at the top of this file), in f32 and in
    /// the kernel's order of operations.
    pub fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let (b1, b2) = (self.beta1, self.beta2);
        let decay = 1.0 - self.lr * self.weight_decay;
        for i in 0..p.len() {
            let gi = g[i] * self.gscale;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            p[i] = p[i] * decay - self.lr * (m[i] / self.bc1) / (v[i].sqrt() / self.bc2_sqrt + self.eps);
        }
    }
}

/// The clipping factor for a gradient of global norm `norm` (as `torch.nn.utils.clip_grad_norm_`:
/// `max_norm / (norm + 1e-6)`, never above 1; 1 when `max_norm` is 0, i.e. no clipping).
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// Scale `grads` so their global L2 norm is at most `max_norm` (as `torch.nn.utils.clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)`, never above 1). Returns the norm before clipping.
/// The sum of squares is taken in f64 over fixed chunks in parallel, then over the chunks in order,
/// so it does not depend on the thread count.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    let factor = clip_factor(norm, max_norm);
    if factor < 1.0 {
        scale(grads, factor);
    }
    norm
}

/// Global L2 norm of `grads`: squares summed in f64 over fixed chunks in parallel, then over the
/// chunks in order (the same bits whatever the thread count).
pub fn grad_norm(grads: &[f32]) -> f32 {
    let partial: Vec<f64> = (grads.par_chunks(1 << 16))
        .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>().sqrt() as f32
}

/// Multiply every gradient by `factor` (a clipping factor).
pub fn scale(grads: &mut [f32], factor: f32) {
    grads.par_iter_mut().for_each(|g| *g *= factor);
}

/// How the learning rate decays after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

impl Decay {
    pub fn parse(s: &str) -> Result<Decay> {
        match s {
            "constant" => Ok(Decay::Constant),
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            _ => bail!("unknown schedule \"{s}\": constant, linear or cosine"),
        }
    }
}

/// Linear warmup to `peak` over `warmup` updates, then `decay` to zero at update `total`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub peak: f32,
    pub warmup: usize,
    pub total: usize,
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate of update `step` (0-based). Warmup reaches `peak` on its last step, so no update
    /// is wasted at lr 0; after warmup, `progress` runs from 0 towards 1 at `total`.
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f32 / span as f32).min(1.0);
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak * (1.0 - progress),
            Decay::Cosine => self.peak * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    /// The textbook formulas in f64, one parameter at a time, for comparison.
    fn reference_adamw(p: &mut [f64], g_steps: &[Vec<f64>], lr: f64, c: AdamWConfig) {
        let (b1, b2, eps, wd) = (c.beta1 as f64, c.beta2 as f64, c.eps as f64, c.weight_decay as f64);
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in g_steps.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
                p[i] -= lr * wd * p[i] + lr * mh / (vh.sqrt() + eps);
            }
        }
    }

    #[test]
    fn adamw_matches_the_formulas_across_page_boundaries() {
        let mut rng = Rng::new(1);
        let n = 23;
        let c = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let p0 = rng.normal_vec(n, 1.0);
        let grads: Vec<Vec<f32>> = (0..5).map(|_| rng.normal_vec(n, 0.5)).collect();
        let mut want: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let g64: Vec<Vec<f64>> = grads.iter().map(|g| g.iter().map(|&x| x as f64).collect()).collect();
        reference_adamw(&mut want, &g64, 1e-2, c);
        for page in [1, 5, 23, 64] {
            let mut p = p0.clone();
            let mut opt = AdamW::new(c, Box::new(HostPages::new(n, page)));
            for g in &grads {
                opt.update(&mut p, g, 1e-2);
            }
            for (a, b) in p.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-6, "page {page}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.3, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let s = |decay| Schedule {
            peak: 1.0,
            warmup: 4,
            total: 14,
            decay,
        };
        let cos = s(Decay::Cosine);
        assert_eq!(cos.lr(0), 0.25);
        assert_eq!(cos.lr(3), 1.0);
        assert_eq!(cos.lr(4), 1.0);
        assert!((cos.lr(9) - 0.5).abs() < 1e-6);
        assert!(cos.lr(13) < 0.03 && cos.lr(13) > 0.0);
        assert!((s(Decay::Linear).lr(9) - 0.5).abs() < 1e-6);
        assert_eq!(s(Decay::Constant).lr(13), 1.0);
        assert_eq!(cos.lr(100), 0.0);
    }

    #[test]
    fn state_export_import_round_trips() {
        let mut a = HostPages::new(10, 3);
        a.import(&(0..10).map(|i| i as f32).collect::<Vec<_>>(), &[2.0; 10])
            .unwrap();
        let (m, v) = a.export();
        assert_eq!(m[9], 9.0);
        assert_eq!(v, vec![2.0; 10]);
        assert!(a.import(&[0.0; 3], &[0.0; 3]).is_err());
    }
}
