//! The paged AdamW on a device: the twin of `optim::AdamW::update` and `optim::clip_grad_norm`, run
//! where the adapters' f32 masters and gradients already are, so a training step moves no adapter
//! bytes between host and device.
//!
//! The moments m and v belong to host pages (`optim::StatePages`; pinned memory on a GPU) and pass
//! through a device window:
//! - resident: when the whole state fits in [`OPTIMIZER_WINDOW`] values per moment (64M; a rank-16
//!   adapter on every projection of a 1B model has 11M parameters, of an 8B model 42M, of a 70B
//!   model 207M), the pages are copied in once, stay on the device between steps, and are copied
//!   back only when the host needs them (for a checkpoint);
//! - streaming: otherwise every step moves each page in, updates the adapter tensors it covers and
//!   moves it back, so the optimizer's device memory is one page whatever the adapter size.
//!
//! One step, after the micro-batches have accumulated their gradients g on the device:
//!   norm   = sqrt(sum over tensors of sum(g^2))      partial sums in f32 on the device, then in f64
//!   factor = clip_factor(norm, max_norm)              as torch.nn.utils.clip_grad_norm_
//!   for each page, for each piece of a tensor in it:  adamw_step(master, m, v, g, gscale = factor)
//!   bf16 copies = bf16(masters);  g = 0

use super::step::Engine;
use super::{Device, F32, SUM_PARTS};
use crate::lora::LoraParams;
use crate::optim::{AdamStep, AdamW};
use anyhow::{ensure, Context, Result};

/// Values per moment the optimizer may keep on the device (256 MiB each for m and v).
pub const OPTIMIZER_WINDOW: usize = 64 << 20;

/// The optimizer's device side.
pub(super) struct DeviceOptim<D: Device> {
    m: F32<D>, // [window] moments of the page(s) in the window
    v: F32<D>, // [window]
    /// Every page fits: the window holds the whole state, at the parameters' own offsets.
    resident: bool,
    /// The resident window holds the host's current moments.
    loaded: bool,
    /// [tensors * SUM_PARTS] partial sums of squares of each gradient tensor.
    parts: F32<D>,
}

impl<D: Device> DeviceOptim<D> {
    pub(super) fn device_bytes(&self) -> usize {
        D::bytes(&self.m) + D::bytes(&self.v) + D::bytes(&self.parts)
    }
}

/// Bytes of device memory the optimizer takes for `len` adapter parameters in `tensors` tensors,
/// host pages of `page` values: [`device_plan`](super::step::device_plan)'s formula.
pub fn optimizer_bytes(len: usize, tensors: usize, page: usize) -> usize {
    let window = if len <= OPTIMIZER_WINDOW { len } else { page };
    2 * 4 * window.max(1) + 4 * (tensors * SUM_PARTS).max(1)
}

impl<D: Device> Engine<D> {
    /// Allocate the optimizer's device side for host state in pages of `page` values: the whole
    /// state when it fits in `max_window` values per moment, else one page.
    pub fn enable_optimizer(&mut self, page: usize, max_window: usize) -> Result<()> {
        let len = self.adapter_len();
        let resident = len <= max_window;
        ensure!(
            resident || page <= max_window,
            "optimizer pages of {page} values do not fit a device window of {max_window}"
        );
        let window = if resident { len } else { page };
        let tensors = 2 * self.slots.iter().flatten().flatten().count();
        self.opt = Some(DeviceOptim {
            m: self.dev.alloc(window)?,
            v: self.dev.alloc(window)?,
            resident,
            loaded: false,
            parts: self.dev.alloc(tensors * SUM_PARTS)?,
        });
        Ok(())
    }

    /// Whether the optimizer's moments stay on the device between steps.
    pub fn optimizer_resident(&self) -> Option<bool> {
        self.opt.as_ref().map(|o| o.resident)
    }

    fn optim(&mut self) -> Result<&mut DeviceOptim<D>> {
        self.opt
            .as_mut()
            .context("the engine's optimizer is not enabled (Engine::enable_optimizer)")
    }

    /// Take the host's moments: a resident window copies them in before the next update.
    pub fn load_optimizer(&mut self) -> Result<()> {
        self.optim()?.loaded = false;
        Ok(())
    }

    /// Copy the resident window's moments back into the host pages (streaming pages are always
    /// current on the host).
    pub fn save_optimizer(&mut self, opt: &mut AdamW) -> Result<()> {
        let o = self.opt.as_mut().context("the engine's optimizer is not enabled")?;
        if o.resident && o.loaded {
            for (range, m, v) in opt.state.pages_mut() {
                self.dev.read_into(&o.m, range.start, m)?;
                self.dev.read_into(&o.v, range.start, v)?;
            }
            self.dev.synchronize()?;
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated adapter gradients (NaN or infinite if any value is).
    pub fn grad_norm(&mut self) -> Result<f32> {
        let o = self.opt.as_mut().context("the engine's optimizer is not enabled")?;
        let mut at = 0;
        for slot in self.slots.iter().flatten().flatten() {
            self.dev.sum_squares(&mut o.parts, at, &slot.da, slot.slot.a.len())?;
            self.dev
                .sum_squares(&mut o.parts, at + SUM_PARTS, &slot.db, slot.slot.b.len())?;
            at += 2 * SUM_PARTS;
        }
        let parts = self.dev.read(&o.parts, at)?;
        Ok(parts.iter().map(|&p| p as f64).sum::<f64>().sqrt() as f32)
    }

    /// One AdamW update (number `opt.step + 1`) of the masters from the accumulated gradients times
    /// `gscale`; then the bf16 copies are refreshed and the gradients zeroed.
    pub fn adamw_update(&mut self, opt: &mut AdamW, lr: f32, gscale: f32) -> Result<()> {
        ensure!(
            opt.state.len() == self.adapter_len(),
            "optimizer state for {} parameters, adapters of {}",
            opt.state.len(),
            self.adapter_len()
        );
        let dev = &self.dev;
        let o = self.opt.as_mut().context("the engine's optimizer is not enabled")?;
        opt.step += 1;
        let h = AdamStep::new(opt.config, opt.step, lr, gscale);
        let mut pages = opt.state.pages_mut();
        if o.resident && !o.loaded {
            for (range, m, v) in &pages {
                dev.write_at(&mut o.m, range.start, m)?;
                dev.write_at(&mut o.v, range.start, v)?;
            }
            o.loaded = true;
        }
        for (range, m, v) in &mut pages {
            // Where parameter x's moments sit in the window.
            let base = if o.resident { 0 } else { range.start };
            if !o.resident {
                dev.write_at(&mut o.m, 0, m)?;
                dev.write_at(&mut o.v, 0, v)?;
            }
            for slot in self.slots.iter_mut().flatten().flatten() {
                let tensors = [
                    (slot.slot.a.clone(), &mut slot.a32, &slot.da),
                    (slot.slot.b.clone(), &mut slot.b32, &slot.db),
                ];
                for (t, p32, g) in tensors {
                    let (lo, hi) = (t.start.max(range.start), t.end.min(range.end));
                    if lo < hi {
                        dev.adamw_step(p32, &mut o.m, &mut o.v, g, lo - t.start, lo - base, hi - lo, &h)?;
                    }
                }
            }
            if !o.resident {
                dev.read_into(&o.m, 0, m)?;
                dev.read_into(&o.v, 0, v)?;
            }
        }
        drop(pages);
        if !o.resident {
            // The host pages must hold the copies before anyone reads them.
            dev.synchronize()?;
        }
        for slot in self.slots.iter_mut().flatten().flatten() {
            dev.cast_f32_bf16(&mut slot.a, &slot.a32, slot.slot.a.len())?;
            dev.cast_f32_bf16(&mut slot.b, &slot.b32, slot.slot.b.len())?;
        }
        self.zero_grads()
    }

    /// Zero the accumulated gradients (after an update, or instead of a skipped one).
    pub fn zero_grads(&mut self) -> Result<()> {
        for slot in self.slots.iter_mut().flatten().flatten() {
            self.dev.zero(&mut slot.da)?;
            self.dev.zero(&mut slot.db)?;
        }
        Ok(())
    }

    /// The device's f32 adapters into `lora.data`.
    pub fn download_adapters(&mut self, lora: &mut LoraParams) -> Result<()> {
        ensure!(
            lora.data.len() == self.adapter_len(),
            "the adapters changed shape since the engine was built"
        );
        for slot in self.slots.iter().flatten().flatten() {
            self.dev.read_into(&slot.a32, 0, &mut lora.data[slot.slot.a.clone()])?;
            self.dev.read_into(&slot.b32, 0, &mut lora.data[slot.slot.b.clone()])?;
        }
        self.dev.synchronize()
    }
}
