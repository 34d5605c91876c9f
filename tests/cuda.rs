//! The CUDA kernels against the CPU reference (`sqlora selftest` in-process). Skipped, with the
//! reason, on machines without a GPU or without compiled kernels.

use sqlora::engine::cuda;

#[test]
fn every_kernel_matches_the_cpu_reference() {
    if let Some(why) = cuda::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let gpu = cuda::Cuda::new().unwrap();
    for seed in [1, 2] {
        let checks = cuda::selftest::run(&gpu, seed, &mut |_| {}).unwrap();
        assert!(checks.len() >= 30);
        let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "{failed:#?}");
    }
}

#[test]
fn without_a_gpu_the_reason_is_clear() {
    if let Some(why) = cuda::unavailable() {
        let err = cuda::Cuda::new().err().expect("no device can be opened");
        assert_eq!(format!("{err:#}"), why);
        assert!(why.contains("nvcc") || why.contains("driver"), "{why}");
    }
}
