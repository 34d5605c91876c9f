//! The CUDA kernels against the CPU reference (`sqlora selftest` in-process). Skipped, with the
//! reason, on machines without a GPU; without compiled kernels too, except under CI, which
//! installs nvcc (a build without kernels there is a failure).

mod common;
use sqlora::engine::cuda;

#[test]
fn every_kernel_matches_the_cpu_reference() {
    if let Some(why) = cuda::unavailable() {
        if cuda::kernels::KERNELS_BUILT {
            eprintln!("skipped: {why}"); // CI has no GPU: the emulators check the kernels there
        } else {
            common::missing(&why);
        }
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
