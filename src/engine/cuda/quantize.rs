//! NF4 quantization on the GPU (kernels/nf4.cu: nf4_quantize, nf4_absmax_mean,
//! nf4_double_quantize), byte for byte the same as `Nf4Tensor::quantize`: weights are quantized
//! where the GEMMs will read them, one projection at a time as the model loads.

use super::Cuda;
use crate::engine::prelude::*;
use crate::model::nf4::{dynamic_map, DoubleQuant, Nf4Tensor, BLOCK, DQ_BLOCK};
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// An NF4 tensor as the quantize kernels leave it on the device.
pub struct DeviceNf4Parts {
    pub packed: CudaSlice<u8>,   // [ceil(n / 2)]
    pub qabsmax: CudaSlice<u8>,  // [nblocks]
    pub absmax2: CudaSlice<f32>, // [ceil(nblocks / 256)]
    pub offset: CudaSlice<f32>,  // [1]
}

impl Cuda {
    /// Quantize x: [n] f32 (already on the device) to NF4 with double-quantized scales.
    pub fn nf4_quantize(&self, x: &CudaSlice<f32>, n: usize) -> Result<DeviceNf4Parts> {
        ensure!(
            n > 0 && n <= x.len(),
            "nf4_quantize: {n} values of a buffer of {}",
            x.len()
        );
        let nblocks = n.div_ceil(BLOCK);
        let s = &self.stream;
        // Through Device::alloc / upload: an out-of-memory error comes with the memory plan's advice.
        let mut packed = self.alloc::<u8>(n.div_ceil(2))?;
        let mut absmax = self.alloc::<f32>(nblocks)?;
        let mut qabsmax = self.alloc::<u8>(nblocks)?;
        let mut absmax2 = self.alloc::<f32>(nblocks.div_ceil(DQ_BLOCK))?;
        let mut offset = self.alloc::<f32>(1)?;
        let map = self.upload(&dynamic_map())?;
        let ni = n as i64;
        let nb = nblocks as i64;

        let mut b = s.launch_builder(&self.k.nf4_quantize);
        b.arg(&mut packed).arg(&mut absmax).arg(x).arg(&ni);
        // Eight warps per block of 256 threads, one warp per block of 64 values.
        let cfg = LaunchConfig {
            grid_dim: (nblocks.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: warp w of block g takes NF4 block 8g + w < nblocks; it writes absmax[that block]
        // and the bytes of its 64 values below ceil(n / 2); reads of x stop at n.
        unsafe { self.launch(&mut b, cfg, "nf4_quantize") }?;

        let mut b = s.launch_builder(&self.k.nf4_absmax_mean);
        b.arg(&mut offset).arg(&absmax).arg(&nb);
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block reads absmax[..nblocks] and writes offset[0].
        unsafe { self.launch(&mut b, one_block, "nf4_absmax_mean") }?;

        let mut b = s.launch_builder(&self.k.nf4_double_quantize);
        b.arg(&mut qabsmax)
            .arg(&mut absmax2)
            .arg(&absmax)
            .arg(&offset)
            .arg(&map)
            .arg(&nb);
        let cfg = LaunchConfig {
            grid_dim: (nblocks.div_ceil(DQ_BLOCK) as u32, 1, 1),
            block_dim: (DQ_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block g covers scales 256g .. 256g + 255 (bounded by nblocks) and writes
        // absmax2[g]; the map holds 256 entries.
        unsafe { self.launch(&mut b, cfg, "nf4_double_quantize") }?;
        Ok(DeviceNf4Parts {
            packed,
            qabsmax,
            absmax2,
            offset,
        })
    }

    /// Quantize a host tensor on the GPU and bring the result back: the same bytes as
    /// `Nf4Tensor::quantize(x, shape)`, computed where the weights are going.
    pub fn quantize_to_host(&self, x: &[f32], shape: &[usize]) -> Result<Nf4Tensor> {
        ensure!(
            x.len() == shape.iter().product::<usize>(),
            "NF4 quantize: {} values do not match shape {shape:?}",
            x.len()
        );
        let dev = self.upload(x).context("copying a weight to the GPU")?;
        let q = self.nf4_quantize(&dev, x.len())?;
        let s = &self.stream;
        let scales = DoubleQuant {
            qabsmax: s.clone_dtoh(&q.qabsmax)?,
            absmax2: s.clone_dtoh(&q.absmax2)?,
            offset: s.clone_dtoh(&q.offset)?[0],
        };
        Ok(Nf4Tensor::from_quantized(shape, s.clone_dtoh(&q.packed)?, scales))
    }
}
