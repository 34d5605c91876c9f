//! Progress of a long job as a user sees it: a bar on a terminal, a line now and then in a log, both
//! with the time spent and an estimate of the time left.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A duration the way a person reads it: `42s`, `2m13s`, `3h05m`.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Seconds left for `remaining` more units of work, from `done` units that took `spent` seconds.
/// `None` until something is done.
pub fn eta_seconds(spent: f64, done: usize, remaining: usize) -> Option<f64> {
    (done > 0).then(|| spent / done as f64 * remaining as f64)
}

/// Counts units of a job of known size on stderr: an indicatif bar when stderr is a terminal,
/// otherwise a line at most every `every` (10 s) and one at the end, so a log shows how far it
/// got and how long is left.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    bar: Option<ProgressBar>,
    last_line: Instant,
    every: Duration,
    /// Units are bytes (shown as MB).
    bytes: bool,
}

impl Progress {
    /// A job of `total` units described by `what` (e.g. "predict").
    pub fn new(what: &str, total: u64) -> Progress {
        Progress::start(what, total, false)
    }

    /// A download or copy of `total` bytes.
    pub fn bytes(what: &str, total: u64) -> Progress {
        Progress::start(what, total, true)
    }

    fn start(what: &str, total: u64, bytes: bool) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = if bytes {
                "{msg} {bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec}  {elapsed} elapsed  ETA {eta}"
            } else {
                "{msg} {bar:30.cyan/blue} {pos}/{len}  {elapsed} elapsed  ETA {eta}"
            };
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar
        });
        let now = Instant::now();
        Progress {
            what: what.to_string(),
            total,
            done: 0,
            started: now,
            bar,
            last_line: now,
            every: Duration::from_secs(10),
            bytes,
        }
    }

    /// Report at most one line per `every` when not on a terminal.
    pub fn every(mut self, every: Duration) -> Progress {
        self.every = every;
        self
    }

    /// `n` more units are done.
    pub fn add(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.last_line.elapsed() >= self.every && self.done < self.total => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    /// The job is over: the bar is closed, or, in a log, a last line printed (for a job that took
    /// a couple of seconds or more).
    pub fn finish(self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None if self.started.elapsed() >= Duration::from_secs(2) => eprintln!("{}", self.line()),
            None => {}
        }
    }

    /// `what: done/total (p%)  elapsed  ETA`, as the log shows it.
    pub fn line(&self) -> String {
        let spent = self.started.elapsed().as_secs_f64();
        let pct = if self.total == 0 {
            100.0
        } else {
            100.0 * self.done as f64 / self.total as f64
        };
        let count = if self.bytes {
            format!("{:.1}/{:.1} MB", self.done as f64 / 1e6, self.total as f64 / 1e6)
        } else {
            format!("{}/{}", self.done, self.total)
        };
        let left = eta_seconds(spent, self.done as usize, (self.total - self.done) as usize);
        let eta = match left {
            _ if self.done == self.total => String::new(),
            Some(s) => format!("  ETA {}", human_duration(s)),
            None => String::new(),
        };
        format!(
            "{}: {count} ({pct:.0}%)  {} elapsed{eta}",
            self.what,
            human_duration(spent)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_writes_them() {
        assert_eq!(human_duration(0.4), "0s");
        assert_eq!(human_duration(42.0), "42s");
        assert_eq!(human_duration(133.0), "2m13s");
        assert_eq!(human_duration(3600.0 + 5.0 * 60.0 + 59.0), "1h05m");
        assert_eq!(human_duration(f64::NAN), "?");
    }

    #[test]
    fn the_estimate_is_the_mean_time_per_unit_times_what_is_left() {
        assert_eq!(eta_seconds(10.0, 0, 5), None);
        assert_eq!(eta_seconds(10.0, 4, 6), Some(15.0));
        let mut p = Progress::new("job", 4);
        p.add(4);
        let line = p.line();
        assert!(line.starts_with("job: 4/4 (100%)") && !line.contains("ETA"), "{line}");
    }
}
