//! Measurements: counters for live progress, per-task HdrHistograms merged at the end, and a
//! per-second timeline.
//!
//! Latencies are measured from the *intended* send time (the open-loop schedule, or the actual
//! send time in closed loop), so a stalled system cannot hide queueing delay (coordinated
//! omission). Lateness within the generator's timer resolution (up to 2 ms) is not counted; it is
//! reported as `schedule_lag` (see [`crate::runner::intended`]). End-to-end latency uses the
//! send time carried in the payload's first 8 bytes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

/// Largest latency recorded, in microseconds (a minute).
const MAX_US: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// State shared by every task of a run.
#[derive(Debug)]
pub struct Shared {
    /// Time zero of the run; payload timestamps are nanoseconds since it.
    pub base: Instant,
    /// True between the end of the warm-up and the end of the run.
    pub recording: AtomicBool,
    /// Cancelled when senders must stop (a sleeping sender wakes at once).
    pub stop: CancellationToken,
    /// Messages sent.
    pub sent: AtomicU64,
    /// Sends acknowledged.
    pub acked: AtomicU64,
    /// Deliveries received (one per recipient).
    pub delivered: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    merged: Mutex<Latencies>,
}

/// Latency histograms (microseconds).
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Send to acknowledgement.
    pub ack: Histogram<u64>,
    /// Send to delivery, at every recipient.
    pub e2e: Histogram<u64>,
    /// Scenario-specific latencies by name (e.g. `reconnect`, `mark_read`).
    pub other: BTreeMap<&'static str, Histogram<u64>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self { ack: histogram(), e2e: histogram(), other: BTreeMap::new() }
    }
}

impl Latencies {
    /// Records a send-to-ack latency.
    pub fn ack(&mut self, d: Duration) {
        let _ = self.ack.record(us(d));
    }

    /// Records a send-to-delivery latency.
    pub fn e2e(&mut self, d: Duration) {
        let _ = self.e2e.record(us(d));
    }

    /// Records a latency of the scenario-specific kind `name`.
    pub fn other(&mut self, name: &'static str, d: Duration) {
        let _ = self.other.entry(name).or_insert_with(histogram).record(us(d));
    }

    /// Adds `o`'s samples to these.
    pub fn add(&mut self, o: &Self) {
        let _ = self.ack.add(&o.ack);
        let _ = self.e2e.add(&o.e2e);
        for (name, h) in &o.other {
            let _ = self.other.entry(name).or_insert_with(histogram).add(h);
        }
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(MAX_US).clamp(1, MAX_US)
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            recording: AtomicBool::new(false),
            stop: CancellationToken::new(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            merged: Mutex::new(Latencies::default()),
        }
    }
}

impl Shared {
    /// Nanoseconds since [`Self::base`].
    #[must_use]
    pub fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant a stamp stands for.
    #[must_use]
    pub fn instant(&self, stamp: u64) -> Instant {
        self.base + Duration::from_nanos(stamp)
    }

    /// Whether samples count now.
    #[must_use]
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// Whether senders should stop.
    #[must_use]
    pub fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Counts an error by its code.
    pub fn error(&self, code: &str) {
        let mut e = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *e.entry(code.to_owned()).or_default() += 1;
    }

    /// Errors by code.
    #[must_use]
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Adds a task's histograms to the run's.
    pub fn merge(&self, local: &Latencies) {
        let mut m = self.merged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.add(local);
    }

    /// The merged histograms.
    #[must_use]
    pub fn latencies(&self) -> Latencies {
        self.merged.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
        }
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Messages sent.
    pub sent: u64,
    /// Sends acknowledged.
    pub acked: u64,
    /// Deliveries received.
    pub delivered: u64,
}

impl std::ops::Sub for Counts {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            sent: self.sent.saturating_sub(o.sent),
            acked: self.acked.saturating_sub(o.acked),
            delivered: self.delivered.saturating_sub(o.delivered),
        }
    }
}

/// Per-second rates over the run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timeline {
    /// Seconds since the start of measuring, and the counts in that second.
    pub seconds: Vec<(u64, Counts)>,
}
