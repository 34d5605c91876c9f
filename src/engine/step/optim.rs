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
//!   moves it back, so the optimizer's device memory is two pages whatever the adapter size. The
//!   copies run on the device's copy stream, double-buffered: while page i is updated on the compute
//!   stream, page i + 1 comes in and, once its update is done, page i goes out.
//!
//! One step, after the micro-batches have accumulated their gradients g on the device (every
//! adapter tensor lies in one flat buffer of each kind, so each line is one launch, or one per page):
//!   norm   = sqrt(sum(g^2))                          partial sums in f32 on the device, then in f64
//!   factor = clip_factor(norm, max_norm)              as torch.nn.utils.clip_grad_norm_
//!   for each page of the state:                       adamw_step(master, m, v, g, gscale = factor)
//!   bf16 copies = bf16(masters);  g = 0

use super::Engine;
use crate::engine::{Device, F32, SUM_PARTS};
use crate::model::lora::LoraParams;
use crate::model::optim::{AdamStep, AdamW};
use anyhow::{ensure, Context, Result};

/// The optimizer's device side.
pub(super) struct DeviceOptim<D: Device> {
    /// Moments in the window: resident, one buffer [len] at the parameters' own offsets; streaming,
    /// two slots [page] that pages alternate between.
    m: Vec<F32<D>>,
    v: Vec<F32<D>>,
    /// Every page fits: the window holds the whole state.
    resident: bool,
    /// The resident window holds the host's current moments.
    loaded: bool,
    /// [SUM_PARTS] partial norms of the gradients.
    parts: F32<D>,
}

impl<D: Device> DeviceOptim<D> {
    pub(super) fn device_bytes(&self) -> usize {
        let slots: usize = self.m.iter().chain(&self.v).map(D::bytes).sum();
        slots + D::bytes(&self.parts)
    }
}

/// The optimizer's device side, or the error of an engine whose optimizer was never enabled.
fn enabled<D: Device>(opt: &mut Option<DeviceOptim<D>>) -> Result<&mut DeviceOptim<D>> {
    opt.as_mut()
        .context("the engine's optimizer is not enabled (Engine::enable_optimizer)")
}

impl<D: Device> Engine<D> {
    /// Allocate the optimizer's device side for host state in pages of `page` values: the whole
    /// state when it fits in `max_window` values per moment, else two pages (`page <= max_window`).
    pub fn enable_optimizer(&mut self, page: usize, max_window: usize) -> Result<()> {
        let len = self.adapter_len();
        let resident = len <= max_window;
        ensure!(
            resident || page <= max_window,
            "optimizer pages of {page} values do not fit a device window of {max_window}"
        );
        let (slots, window) = if resident { (1, len) } else { (2, page) };
        let alloc = || (0..slots).map(|_| self.dev.alloc(window)).collect::<Result<Vec<_>>>();
        let (m, v) = (alloc()?, alloc()?);
        self.opt = Some(DeviceOptim {
            m,
            v,
            resident,
            loaded: false,
            parts: self.dev.alloc(SUM_PARTS)?,
        });
        Ok(())
    }

    /// Whether the optimizer's moments stay on the device between steps.
    pub fn optimizer_resident(&self) -> Option<bool> {
        self.opt.as_ref().map(|o| o.resident)
    }

    /// Take the host's moments: a resident window copies them in before the next update.
    pub fn load_optimizer(&mut self) -> Result<()> {
        enabled(&mut self.opt)?.loaded = false;
        Ok(())
    }

    /// Copy the resident window's moments back into the host pages (streamed pages are always
    /// current on the host).
    pub fn save_optimizer(&mut self, opt: &mut AdamW) -> Result<()> {
        let o = enabled(&mut self.opt)?;
        if o.resident && o.loaded {
            let save = opt.state.pages_mut().into_iter().try_for_each(|(range, m, v)| {
                self.dev.read_into(&o.m[0], range.start, m)?;
                self.dev.read_into(&o.v[0], range.start, v)
            });
            settled(&self.dev, save)?;
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated adapter gradients (NaN or infinite if any value is).
    pub fn grad_norm(&mut self) -> Result<f32> {
        let o = enabled(&mut self.opt)?;
        let ad = &self.adapters;
        self.dev.partial_norms(&mut o.parts, 0, &ad.grad, ad.len)?;
        let parts = self.dev.read(&o.parts, SUM_PARTS)?;
        Ok(parts.iter().map(|&p| p as f64 * p as f64).sum::<f64>().sqrt() as f32)
    }

    /// One AdamW update (number `opt.step + 1`) of the masters from the accumulated gradients times
    /// `gscale`; then the bf16 copies are refreshed and the gradients zeroed.
    pub fn adamw_update(&mut self, opt: &mut AdamW, lr: f32, gscale: f32) -> Result<()> {
        let (dev, ad) = (&self.dev, &mut self.adapters);
        ensure!(
            opt.state.len() == ad.len,
            "optimizer state for {} parameters, adapters of {}",
            opt.state.len(),
            ad.len
        );
        let o = enabled(&mut self.opt)?;
        opt.step += 1;
        let h = AdamStep::new(opt.config, opt.step, lr, gscale);
        let pages = opt.state.pages_mut();
        if o.resident {
            let (m_dev, v_dev) = (&mut o.m[0], &mut o.v[0]);
            if !o.loaded {
                let load = pages.iter().try_for_each(|(range, m, v)| {
                    dev.write_at(m_dev, range.start, m)?;
                    dev.write_at(v_dev, range.start, v)
                });
                // From pinned pages the copies are asynchronous: done before the host may write them.
                settled(dev, load)?;
                o.loaded = true;
            }
            dev.adamw_step(&mut ad.master, m_dev, v_dev, &ad.grad, 0, 0, ad.len, &h)?;
        } else {
            // The host pages must hold the copies before anyone reads them (or frees them, after an
            // error).
            settled(dev, stream_pages(dev, o, &mut ad.master, &ad.grad, pages, &h))?;
        }
        dev.cast_f32_bf16(&mut ad.w, &ad.master, ad.len)?;
        self.zero_grads()
    }

    /// Zero the accumulated gradients (after an update, or instead of a skipped one).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.dev.zero(&mut self.adapters.grad)
    }

    /// The device's f32 adapters into `lora.data`.
    pub fn download_adapters(&mut self, lora: &mut LoraParams) -> Result<()> {
        let ad = &self.adapters;
        ensure!(
            lora.data.len() == ad.len,
            "the adapters changed shape since the engine was built"
        );
        if ad.len > 0 {
            self.dev.read_into(&ad.master, 0, &mut lora.data)?;
        }
        self.dev.synchronize()
    }
}

/// `r`, once everything queued on the device is done, whatever `r` is: no copy to or from the host
/// pages may outlive the call that queued it.
fn settled<D: Device>(dev: &D, r: Result<()>) -> Result<()> {
    let synced = dev.synchronize();
    r.and(synced)
}

/// The streamed update: every page of the moments in through the two window slots, updated, out.
///   copy stream:    in(0) | in(i+1), wait for update(i), out(i) | ...
///   compute stream:       update(i), wait for in(i+1) | update(i+1) ...
/// Slot i % 2 is written again by in(i+2) only after out(i), queued before it on the copy stream;
/// update(i + 1) waits for in(i + 1) alone, so it overlaps out(i). The caller synchronizes.
fn stream_pages<D: Device>(
    dev: &D,
    o: &mut DeviceOptim<D>,
    master: &mut F32<D>,
    grad: &F32<D>,
    mut pages: Vec<(std::ops::Range<usize>, &mut [f32], &mut [f32])>,
    h: &AdamStep,
) -> Result<()> {
    dev.copies_wait_compute()?; // the gradients and masters of this step are done
    if let Some((_, m, v)) = pages.first() {
        dev.copy_in_at(&mut o.m[0], 0, m)?;
        dev.copy_in_at(&mut o.v[0], 0, v)?;
    }
    dev.compute_waits_copies()?;
    for i in 0..pages.len() {
        let (slot, next) = (i % 2, (i + 1) % 2);
        let (start, n) = (pages[i].0.start, pages[i].0.len());
        let [m_slot, m_next] = o.m.get_disjoint_mut([slot, next]).expect("two slots");
        let [v_slot, v_next] = o.v.get_disjoint_mut([slot, next]).expect("two slots");
        dev.adamw_step(master, m_slot, v_slot, grad, start, 0, n, h)?;
        if let Some((_, m, v)) = pages.get(i + 1) {
            dev.copy_in_at(m_next, 0, m)?;
            dev.copy_in_at(v_next, 0, v)?;
            dev.compute_waits_copies()?;
        }
        dev.copies_wait_compute()?;
        let (_, m, v) = &mut pages[i];
        dev.copy_out_into(m_slot, 0, m)?;
        dev.copy_out_into(v_slot, 0, v)?;
    }
    Ok(())
}
