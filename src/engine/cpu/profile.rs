//! Per-kernel wall time on the CPU engine (`sqlora bench train --profile`): each kernel call, while
//! profiling is on, adds its elapsed time to its name's row. The kernels run one after another on
//! the calling thread (each splits its own work among the pool), so wall time per call is the
//! kernel's time.

use crate::engine::ProfileRow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The rows recorded since the last [`Recorder::take`], by kernel name.
#[derive(Debug, Default)]
pub struct Recorder {
    on: AtomicBool,
    rows: Mutex<Vec<(&'static str, u64, Duration)>>,
}

impl Recorder {
    /// Time calls from now on, or stop.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Run `f`, adding its time to `name`'s row when profiling is on.
    pub fn time<R>(&self, name: &'static str, f: impl FnOnce() -> R) -> R {
        if !self.on.load(Ordering::Relaxed) {
            return f();
        }
        let start = Instant::now();
        let out = f();
        let took = start.elapsed();
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        match rows.iter_mut().find(|r| r.0 == name) {
            Some(r) => {
                r.1 += 1;
                r.2 += took;
            }
            None => rows.push((name, 1, took)),
        }
        out
    }

    /// The rows so far, largest first, and a fresh start.
    pub fn take(&self) -> Vec<ProfileRow> {
        let rows = std::mem::take(&mut *self.rows.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<ProfileRow> = rows
            .into_iter()
            .map(|(name, calls, took)| ProfileRow {
                name: name.to_string(),
                calls,
                ms: took.as_secs_f64() * 1e3,
            })
            .collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_calls_by_name_only_while_on() {
        let r = Recorder::default();
        r.time("a", || ());
        r.set(true);
        r.time("a", || std::thread::sleep(Duration::from_millis(2)));
        r.time("b", || ());
        r.time("a", || ());
        let rows = r.take();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].name.as_str(), rows[0].calls), ("a", 2));
        assert!(rows[0].ms >= 2.0, "{}", rows[0].ms);
        assert_eq!((rows[1].name.as_str(), rows[1].calls), ("b", 1));
        assert!(r.take().is_empty(), "take starts afresh");
    }
}
