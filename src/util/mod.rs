//! The toolbox every layer may use: seeded random numbers ([`rng`]), a byte fingerprint, the
//! progress of long jobs ([`progress`]: bars, elapsed time, ETA), and [`on_workers`].

pub mod progress;
pub mod rng;

/// FNV-1a, 64-bit: a dependency-free fingerprint of bytes (golden files record the one of the
/// weights they were made from; a training run, the one of its data and settings).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Stack of rayon's worker threads under [`on_workers`]: the main thread's 8 MB, and more, since a
/// command's whole work then runs on one of them.
const WORKER_STACK: usize = 16 << 20;

/// Run `f` (a command's whole work) on one of rayon's worker threads, the calling thread waiting.
///
/// The CPU engine's kernels each split their work among rayon's threads. Called from a thread
/// outside the pool, each call hands its work to the pool and puts the caller to sleep until the
/// workers finish, so every kernel pays two thread wake-ups: measured on a 2-core VM, 20-50 us per
/// call, which on a decoding step's ~170 small GEMVs was a tenth of the step (a [128, 896] NF4 GEMV
/// took 21 us from outside the pool and 8 us from inside it). Called from a worker, the caller
/// takes a share of the work itself and nobody sleeps.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Fails only where the global pool already exists (a second call, a test harness): then that
    // pool is used as it is.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK).build_global();
    rayon::scope(|_| f())
}

#[cfg(test)]
mod worker_tests {
    /// The work runs on one of the pool's threads (so that the kernels it calls split their work
    /// from inside the pool), and its result comes back.
    #[test]
    fn on_workers_runs_the_work_on_a_worker_thread() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is not a worker");
        let got = super::on_workers(|| (rayon::current_thread_index(), 6 * 7));
        assert!(got.0.is_some(), "ran outside the pool");
        assert_eq!(got.1, 42);
    }
}
