//! Time per kernel, for `sqlora bench train --profile`: with profiling on, every launch through
//! [`Cuda::launch`] (and every cuBLAS call through [`Cuda::timed`]) records a pair of CUDA events;
//! [`Cuda::take_profile`] waits for the GPU, reads each pair's elapsed time and sums them by name.
//! Off (the default), a launch costs one atomic load more.

use super::Cuda;
use crate::engine::ProfileRow;
use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, LaunchArgs, LaunchConfig};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Launches recorded while profiling: (name, start, end), in launch order.
#[derive(Default)]
pub struct Profiler {
    pending: Vec<(String, CudaEvent, CudaEvent)>,
}

/// Sum (name, milliseconds) samples by name, largest total first (ties by name).
pub fn summarize(samples: impl IntoIterator<Item = (String, f64)>) -> Vec<ProfileRow> {
    let mut by_name: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for (name, ms) in samples {
        let e = by_name.entry(name).or_default();
        e.0 += 1;
        e.1 += ms;
    }
    let mut rows: Vec<ProfileRow> = (by_name.into_iter())
        .map(|(name, (calls, ms))| ProfileRow { name, calls, ms })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    rows
}

impl Cuda {
    /// Turn per-kernel timing on or off (what was recorded stays until [`Cuda::take_profile`]).
    pub fn set_profiling(&self, on: bool) {
        self.profiling.store(on, Ordering::Relaxed);
    }

    pub(super) fn profiling_on(&self) -> bool {
        self.profiling.load(Ordering::Relaxed)
    }

    /// Launch `args` as `kernel`, timed by events while profiling.
    ///
    /// # Safety
    /// As [`LaunchArgs::launch`]: the arguments must match the kernel's parameters and the grid
    /// must keep every access inside its buffers (each call site's SAFETY line says why).
    pub(super) unsafe fn launch(&self, args: &mut LaunchArgs, cfg: LaunchConfig, kernel: &str) -> Result<()> {
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return Ok(()); // nothing to run (CUDA would refuse an empty grid as an invalid launch)
        }
        let profiling = self.profiling_on();
        if profiling {
            args.record_kernel_launch(CUevent_flags::CU_EVENT_DEFAULT);
        }
        // SAFETY: the caller's.
        let events = unsafe { args.launch(cfg) }.map_err(|e| super::driver_error(e, &format!("kernel {kernel}")))?;
        if let Some((start, end)) = events.filter(|_| profiling) {
            let mut p = self.profiler.lock().unwrap_or_else(|e| e.into_inner());
            p.pending.push((kernel.to_string(), start, end));
        }
        Ok(())
    }

    /// Run `f` (work queued on the stream, e.g. a cuBLAS call) as `name`, timed while profiling.
    /// Every cuBLAS call comes through here, so the context is made current first: cuBLAS works in
    /// whatever context the calling thread has current, and unlike a kernel launch it does not bind one.
    pub(super) fn timed<R>(&self, name: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.ctx.bind_to_thread().context("making the CUDA context current")?;
        if !self.profiling_on() {
            return f();
        }
        let mark = || self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let start = mark().context("recording a profiling event")?;
        let r = f()?;
        let end = mark().context("recording a profiling event")?;
        let mut p = self.profiler.lock().unwrap_or_else(|e| e.into_inner());
        p.pending.push((name.to_string(), start, end));
        Ok(r)
    }

    /// Wait for the GPU and return the time of every recorded launch since the last call, summed by
    /// kernel name.
    pub fn take_profile(&self) -> Result<Vec<ProfileRow>> {
        self.stream.synchronize().context("waiting for the GPU")?;
        let pending = std::mem::take(&mut self.profiler.lock().unwrap_or_else(|e| e.into_inner()).pending);
        let mut samples = Vec::with_capacity(pending.len());
        for (name, start, end) in pending {
            let ms = start.elapsed_ms(&end).with_context(|| format!("timing {name}"))?;
            samples.push((name, ms as f64));
        }
        Ok(summarize(samples))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_sum_by_name_largest_first() {
        let rows = summarize([
            ("rope".to_string(), 0.5),
            ("gemm".to_string(), 2.0),
            ("rope".to_string(), 0.25),
            ("add".to_string(), 0.75),
        ]);
        let want = [("gemm", 1, 2.0), ("rope", 2, 0.75), ("add", 1, 0.75)];
        let got: Vec<(&str, u64, f64)> = rows.iter().map(|r| (r.name.as_str(), r.calls, r.ms)).collect();
        // rope and add tie at 0.75 ms: by name, add first.
        assert_eq!(got, vec![want[0], want[2], want[1]]);
        assert!(summarize(Vec::<(String, f64)>::new()).is_empty());
    }
}
