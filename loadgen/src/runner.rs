//! Drives connected clients: one sender task per sending connection (open loop at a rate, or
//! closed loop with a window of sends in flight), one reader task per connection, a sampler for
//! the timeline and the progress bar, and the warm-up and measurement windows.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::stats::{Counts, Latencies, Shared, Timeline};
use crate::target::{self, Connection, Event, Rx, Target, Tx};

/// How load is offered.
#[derive(Debug, Clone)]
pub struct Load {
    /// Total messages per second over all senders (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Sends in flight per sender (closed loop).
    pub in_flight: usize,
    /// Payload bytes per message.
    pub payload: usize,
    /// Measurement time.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
    /// Show a progress bar.
    pub progress: bool,
}

/// One client: its connection, its index, and the channel it sends to (if it sends).
#[derive(Debug)]
pub struct Client<C> {
    /// The connection.
    pub conn: C,
    /// Index, carried in payloads.
    pub index: u64,
    /// Where it sends, if it sends.
    pub sends_to: Option<String>,
}

/// What a drive measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Counts within the measurement window.
    pub window: Counts,
    /// Seconds measured.
    pub seconds: f64,
    /// Latencies within the window.
    pub latencies: Latencies,
    /// Per-second counts.
    pub timeline: Timeline,
    /// Broker usage at the start and end of the window, when known.
    pub broker: Option<(crate::procstat::Usage, crate::procstat::Usage)>,
}

/// Opens `n` connections as `user(i)`, `parallel` at a time, spreading them over `sources`.
///
/// # Errors
/// The first connection that fails.
pub async fn connect_all<T: Target>(
    target: &T,
    n: usize,
    user: impl Fn(usize) -> String,
    sources: &[IpAddr],
    parallel: usize,
) -> anyhow::Result<Vec<T::Conn>> {
    let results: Vec<anyhow::Result<T::Conn>> = futures::stream::iter(0..n)
        .map(|i| {
            let local = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            let user = user(i);
            async move { target.connect(&user, local).await }
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Runs the load on `clients` and measures it.
pub async fn drive<T: Target>(
    target: &T,
    shared: &Arc<Shared>,
    clients: Vec<Client<T::Conn>>,
    load: &Load,
    broker_pid: Option<u32>,
) -> Measured {
    let acks = target.acks();
    let senders = clients.iter().filter(|c| c.sends_to.is_some()).count().max(1);
    let done = CancellationToken::new();
    let start = Instant::now();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    let mut sender_index = 0u32;
    for client in clients {
        let (tx, rx) = client.conn.split();
        // Closed loop only: open-loop sends are paced by the schedule, not by acks.
        let window = load.rate.is_none().then(|| Arc::new(Semaphore::new(load.in_flight.max(1))));
        readers.push(tokio::spawn(read(
            rx,
            shared.clone(),
            client.index,
            acks,
            window.clone(),
            done.clone(),
        )));
        let Some(channel) = client.sends_to else {
            writers.push(tokio::spawn(keepalive(tx, shared.clone())));
            continue;
        };
        // Open loop: sender k of n starts k/rate in, so the n schedules interleave evenly
        // (each sender then sends every n/rate) instead of firing together.
        let offset = load
            .rate
            .map_or(Duration::ZERO, |rate| Duration::from_secs_f64(f64::from(sender_index) / rate));
        sender_index += 1;
        writers.push(tokio::spawn(send(
            tx,
            shared.clone(),
            client.index,
            channel,
            load.clone(),
            senders,
            window,
            start + offset,
        )));
    }

    let w = measure(shared, load, broker_pid).await;
    for w in writers {
        let _ = w.await;
    }
    // Let what is in flight land (it is not counted), then stop the readers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.cancel();
    for r in readers {
        let _ = r.await;
    }
    w.finish(shared)
}

/// What [`measure`] saw: the measurement window, before the latencies are collected.
#[derive(Debug)]
pub struct Window {
    counts: Counts,
    seconds: f64,
    timeline: Timeline,
    broker: Option<(crate::procstat::Usage, crate::procstat::Usage)>,
}

impl Window {
    /// The measurement, with the latencies merged into `shared` by now.
    #[must_use]
    pub fn finish(self, shared: &Shared) -> Measured {
        Measured {
            window: self.counts,
            seconds: self.seconds,
            latencies: shared.latencies(),
            timeline: self.timeline,
            broker: self.broker,
        }
    }
}

/// Samples the counters every second through the warm-up and the measurement (the progress
/// bar, the timeline), switches recording on after the warm-up, and returns when the run is
/// over with recording off and `shared.stop` set (the load's tasks then wind down).
pub async fn measure(shared: &Shared, load: &Load, broker_pid: Option<u32>) -> Window {
    let start = Instant::now();
    let bar = load.progress.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(250));
        pb
    });
    let mut timeline = Timeline::default();
    let total = load.warmup + load.duration;
    let mut last = shared.counts();
    let mut window_start = (last, Instant::now(), broker_pid.and_then(crate::procstat::usage));
    if load.warmup.is_zero() {
        shared.recording.store(true, Ordering::Relaxed);
    }
    let mut second = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let elapsed = start.elapsed();
        let now = shared.counts();
        let delta = now - last;
        last = now;
        if shared.recording() {
            timeline.seconds.push((second, delta));
            second += 1;
        }
        if let Some(pb) = &bar {
            let phase = if shared.recording() { "measuring" } else { "warming up" };
            pb.set_message(format!(
                "{phase} {:>4.0}/{:.0} s   sent {:>9}/s   acked {:>9}/s   delivered {:>10}/s",
                elapsed.as_secs_f64(),
                total.as_secs_f64(),
                delta.sent,
                delta.acked,
                delta.delivered
            ));
        }
        if !shared.recording() && elapsed >= load.warmup {
            shared.recording.store(true, Ordering::Relaxed);
            window_start =
                (shared.counts(), Instant::now(), broker_pid.and_then(crate::procstat::usage));
        }
        // Ticks are a second apart: end at the tick that completes the measurement time.
        if shared.recording()
            && window_start.1.elapsed() + Duration::from_millis(50) >= load.duration
        {
            break;
        }
    }
    let window_end = (shared.counts(), Instant::now(), broker_pid.and_then(crate::procstat::usage));
    shared.recording.store(false, Ordering::Relaxed);
    shared.stop.cancel();
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Window {
        counts: window_end.0 - window_start.0,
        seconds: window_end.1.duration_since(window_start.1).as_secs_f64(),
        timeline,
        broker: window_start.2.zip(window_end.2),
    }
}

async fn read<R: Rx>(
    mut rx: R,
    shared: Arc<Shared>,
    me: u64,
    acks: bool,
    window: Option<Arc<Semaphore>>,
    done: CancellationToken,
) {
    let mut local = Latencies::default();
    loop {
        let event = tokio::select! {
            () = done.cancelled() => break,
            e = rx.next() => e,
        };
        let Some(event) = event else { break };
        let now = Instant::now();
        match event {
            Event::Ack(id) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
                if shared.recording() {
                    local.ack(now.saturating_duration_since(shared.instant(id)));
                }
                release(window.as_deref());
            }
            Event::Delivery(payload) => {
                let Some((stamp, sender)) = target::parse(&payload) else { continue };
                if sender == me {
                    // Targets that echo a publisher's own messages: the echo is its ack.
                    if !acks {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                        if shared.recording() {
                            local.ack(now.saturating_duration_since(shared.instant(stamp)));
                        }
                        release(window.as_deref());
                    }
                    continue;
                }
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                if shared.recording() {
                    local.e2e(now.saturating_duration_since(shared.instant(stamp)));
                }
            }
            Event::Error(code, id) => {
                shared.error(&code);
                if id.is_some() {
                    release(window.as_deref());
                }
            }
        }
    }
    shared.merge(&local);
}

#[allow(clippy::too_many_arguments)]
async fn send<X: Tx>(
    mut tx: X,
    shared: Arc<Shared>,
    me: u64,
    channel: String,
    load: Load,
    senders: usize,
    window: Option<Arc<Semaphore>>,
    first: Instant,
) {
    let mut last_id = 0u64;
    let mut next_id = |stamp: u64| {
        last_id = stamp.max(last_id + 1);
        last_id
    };
    let mut lag = Latencies::default();
    match load.rate {
        Some(rate) => {
            // Open loop: message k is due at first + k·interval, whatever happened before;
            // latency counts from that intended time (see `intended`).
            let interval = Duration::from_secs_f64(senders as f64 / rate.max(0.001));
            let mut due = first;
            while !shared.stopping() {
                let now = Instant::now();
                if due > now {
                    tokio::select! {
                        () = tokio::time::sleep_until(due.into()) => {}
                        () = shared.stop.cancelled() => break,
                    }
                    continue;
                }
                let mut n = 0;
                while due <= now && n < 256 {
                    let stamp = shared.stamp(intended(due, now, &shared, &mut lag));
                    let p = target::payload(stamp, me, load.payload);
                    if tx.send(&channel, next_id(stamp), p).await.is_err() {
                        shared.error("send failed");
                        return;
                    }
                    due += interval;
                    n += 1;
                }
                if tx.flush().await.is_err() {
                    shared.error("send failed");
                    return;
                }
                shared.sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        None => {
            // Closed loop: keep `in_flight` sends outstanding.
            let Some(window) = window else { return };
            loop {
                let permit = tokio::select! {
                    p = window.acquire() => p,
                    () = shared.stop.cancelled() => break,
                };
                let Ok(permit) = permit else { return };
                permit.forget();
                let mut n = 1;
                while let Ok(p) = window.try_acquire() {
                    p.forget();
                    n += 1;
                }
                for _ in 0..n {
                    let stamp = shared.stamp(Instant::now());
                    let p = target::payload(stamp, me, load.payload);
                    if tx.send(&channel, next_id(stamp), p).await.is_err() {
                        shared.error("send failed");
                        return;
                    }
                }
                if tx.flush().await.is_err() {
                    shared.error("send failed");
                    return;
                }
                shared.sent.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    shared.merge(&lag);
}

/// Returns an acknowledged send's slot to the closed-loop window (open loop has none).
fn release(window: Option<&Semaphore>) {
    if let Some(w) = window {
        w.add_permits(1);
    }
}

/// How late an open-loop send may be and still be measured from when it was written: the
/// generator's own timer resolution (tokio's timers round up to the next millisecond, plus
/// the wake-up), not the system's doing. A send later than this is measured from its intended
/// time, so a stalled system cannot hide queueing delay (coordinated omission).
pub const TIMER_SLACK: Duration = Duration::from_millis(2);

/// The instant an open-loop send due at `due` and written at `now` is measured from; records
/// the lateness as `schedule_lag` while recording.
pub fn intended(due: Instant, now: Instant, shared: &Shared, lag: &mut Latencies) -> Instant {
    let late = now.saturating_duration_since(due);
    if shared.recording() {
        lag.other("schedule_lag", late);
    }
    if late <= TIMER_SLACK { now } else { due }
}

/// Pings an idle connection often enough to stay within the broker's idle timeout.
pub async fn keepalive<X: Tx>(mut tx: X, shared: Arc<Shared>) {
    let mut t = tokio::time::interval(Duration::from_secs(10));
    t.tick().await;
    loop {
        tokio::select! {
            _ = t.tick() => {
                if tx.ping().await.is_err() {
                    return;
                }
            }
            () = shared.stop.cancelled() => return,
        }
    }
}
