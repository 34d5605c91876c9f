//! Shared by the CUDA benches: open the GPU (or say why not and skip), and random device buffers.
#![allow(dead_code)]

use cudarc::driver::CudaSlice;
use half::bf16;
use sqlora::engine::cuda::{self, Cuda};
use sqlora::util::rng::Rng;

/// The GPU, or None after printing why the CUDA benches are skipped.
pub fn gpu() -> Option<Cuda> {
    match cuda::unavailable() {
        Some(why) => {
            eprintln!("CUDA benches skipped: {why}");
            None
        }
        None => Some(Cuda::new().expect("opening the GPU")),
    }
}

/// n values from N(0, std^2), as bf16 on the device.
pub fn normal_bf16(gpu: &Cuda, n: usize, std: f32, seed: u64) -> CudaSlice<bf16> {
    let v: Vec<bf16> = Rng::new(seed)
        .normal_vec(n, std)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    gpu.stream.clone_htod(&v).expect("upload")
}

/// n values from N(0, std^2), as f32 on the device.
pub fn normal_f32(gpu: &Cuda, n: usize, std: f32, seed: u64) -> CudaSlice<f32> {
    gpu.stream
        .clone_htod(&Rng::new(seed).normal_vec(n, std))
        .expect("upload")
}

pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(gpu: &Cuda, n: usize) -> CudaSlice<T> {
    gpu.stream.alloc_zeros(n).expect("alloc")
}

pub fn sync(gpu: &Cuda) {
    gpu.stream.synchronize().expect("synchronize");
}
