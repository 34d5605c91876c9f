//! The optimizer's moments in page-locked host memory, so that the paged AdamW (engine/step/optim.rs)
//! moves them to and from its device window by DMA. Same layout as `optim::HostPages`.

use crate::model::optim::StatePages;
use anyhow::{Context, Result};
use cudarc::driver::{CudaContext, PinnedHostSlice};
use std::ops::Range;
use std::sync::Arc;

/// Pinned pages of `m` and `v`, `page` values each (the last one shorter).
pub struct PinnedPages {
    len: usize,
    page: usize,
    m: Vec<PinnedHostSlice<f32>>,
    v: Vec<PinnedHostSlice<f32>>,
}

/// One zeroed page of n values.
fn zeroed(ctx: &Arc<CudaContext>, n: usize) -> Result<PinnedHostSlice<f32>> {
    // SAFETY: the memory is uninitialised until the fill below, and nothing reads it before. Flags 0:
    // cached memory (not write-combined), because the host reads the moments back for checkpoints.
    let mut p = unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }
        .with_context(|| format!("allocating {} MiB of pinned host memory", (4 * n) >> 20))?;
    p.as_mut_slice().context("pinned host memory")?.fill(0.0);
    Ok(p)
}

impl PinnedPages {
    /// Zeroed state for `len` parameters in pages of `page` values.
    pub fn new(ctx: &Arc<CudaContext>, len: usize, page: usize) -> Result<PinnedPages> {
        assert!(page > 0);
        let sizes: Vec<usize> = (0..len.div_ceil(page)).map(|i| page.min(len - i * page)).collect();
        Ok(PinnedPages {
            len,
            page,
            m: sizes.iter().map(|&n| zeroed(ctx, n)).collect::<Result<_>>()?,
            v: sizes.iter().map(|&n| zeroed(ctx, n)).collect::<Result<_>>()?,
        })
    }
}

fn slice(p: &mut PinnedHostSlice<f32>) -> &mut [f32] {
    p.as_mut_slice().expect("pinned host memory became unusable")
}

impl StatePages for PinnedPages {
    fn len(&self) -> usize {
        self.len
    }

    fn pages_mut(&mut self) -> Vec<(Range<usize>, &mut [f32], &mut [f32])> {
        let page = self.page;
        // The pages reach cudarc as plain slices, so it records no events on them: the paged AdamW
        // synchronizes the device after its copies to or from them (engine/step/optim.rs, also when a
        // step fails), so none is in flight when the host holds these slices.
        (self.m.iter_mut().zip(&mut self.v).enumerate())
            .map(|(i, (m, v))| {
                let (m, v) = (slice(m), slice(v));
                (i * page..i * page + m.len(), m, v)
            })
            .collect()
    }
}
