//! Rate limits (GCRA, from the governor crate), shared by all shards so that a user's limit
//! holds across their sessions on different shards.
//!
//! | limiter  | key     | config                                              |
//! |----------|---------|-----------------------------------------------------|
//! | send     | user    | `limits.send_rate_per_sec`, `limits.send_burst`     |
//! | typing   | user    | `limits.typing_rate_per_sec`, `limits.typing_burst` |
//! | receipts | user    | `limits.receipt_rate_per_sec`, `limits.receipt_burst` |
//! | connect  | peer IP | `limits.connect_rate_per_ip`, `limits.connect_burst_per_ip` |
//! | refresh  | user    | fixed: a burst of 10 `RefreshToken`s, then one per second |
//!
//! Open connections are capped too ([`Slots`]): in all (`limits.max_connections`) and per
//! peer address (`limits.max_connections_per_ip`), checked when a connection is accepted,
//! before anything is allocated for it.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitsConfig;

/// One keyed GCRA limiter.
pub struct Keyed<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Keyed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed").field("keys", &self.limiter.len()).finish()
    }
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(per_sec: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one cell for `key`; when over the limit, how long until one is available.
    ///
    /// # Errors
    /// The wait, when the key is over its limit.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets keys whose state is back to full (keeps memory bounded).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// All limiters.
#[derive(Debug)]
pub struct Limiters {
    /// Sends per user.
    pub send: Keyed<Arc<str>>,
    /// Typing updates per user.
    pub typing: Keyed<Arc<str>>,
    /// Receipt updates per user.
    pub receipts: Keyed<Arc<str>>,
    /// New connections per IP address.
    pub connect: Keyed<IpAddr>,
    /// `RefreshToken` requests per user (each costs a signature check).
    pub refresh: Keyed<Arc<str>>,
    /// Open connections, in all and per IP address.
    pub slots: Arc<Slots>,
}

/// Which connection cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// `limits.max_connections`.
    Total,
    /// `limits.max_connections_per_ip`.
    PerIp,
}

impl SlotRefusal {
    /// The limit's name, as a metrics label and in messages.
    #[must_use]
    pub fn limit(self) -> &'static str {
        match self {
            Self::Total => "max_connections",
            Self::PerIp => "max_connections_per_ip",
        }
    }

    /// Counts the refusal and says why, for the refused client.
    #[must_use]
    pub fn refused(self) -> String {
        metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "limit" => self.limit())
            .increment(1);
        format!("too many connections ({})", self.limit())
    }
}

/// Open-connection counters shared by every shard and transport.
#[derive(Debug)]
pub struct Slots {
    max_total: usize,
    max_per_ip: usize,
    total: std::sync::atomic::AtomicUsize,
    per_ip: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl Slots {
    /// Caps of `max_total` connections and `max_per_ip` per address; 0 means no cap.
    #[must_use]
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            total: std::sync::atomic::AtomicUsize::new(0),
            per_ip: std::sync::Mutex::default(),
        }
    }

    /// Takes a slot for a connection from `ip`, held until the returned guard drops.
    ///
    /// # Errors
    /// Which cap is reached.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, SlotRefusal> {
        use std::sync::atomic::Ordering;
        let total = self.total.fetch_add(1, Ordering::AcqRel);
        if self.max_total > 0 && total >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(SlotRefusal::Total);
        }
        if self.max_per_ip > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(SlotRefusal::PerIp);
            }
            *n += 1;
        }
        Ok(Slot { slots: self.clone(), ip })
    }

    /// Open connections.
    #[must_use]
    pub fn open(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A held connection slot; released on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if self.slots.max_per_ip > 0 {
            let mut per_ip =
                self.slots.per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

impl Limiters {
    /// Limiters configured from `[limits]`.
    #[must_use]
    pub fn new(l: &LimitsConfig) -> Self {
        Self {
            send: Keyed::new(l.send_rate_per_sec, l.send_burst),
            typing: Keyed::new(l.typing_rate_per_sec, l.typing_burst),
            receipts: Keyed::new(l.receipt_rate_per_sec, l.receipt_burst),
            connect: Keyed::new(l.connect_rate_per_ip, l.connect_burst_per_ip),
            refresh: Keyed::new(1, 10),
            slots: Arc::new(Slots::new(l.max_connections, l.max_connections_per_ip)),
        }
    }

    /// Periodic housekeeping.
    pub fn forget_idle(&self) {
        self.send.forget_idle();
        self.typing.forget_idle();
        self.receipts.forget_idle();
        self.connect.forget_idle();
        self.refresh.forget_idle();
    }
}

/// Milliseconds to tell a client to wait, rounded up (at least 1).
#[must_use]
pub fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn given_burst_used_up_should_reject_with_a_wait_and_keep_keys_apart() {
        let l: Keyed<Arc<str>> = Keyed::new(1, 3);
        let a: Arc<str> = Arc::from("a");
        for _ in 0..3 {
            assert!(l.check(&a).is_ok());
        }
        let wait = l.check(&a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(retry_after_ms(wait) >= 1);
        assert!(l.check(&Arc::from("b")).is_ok(), "another user has their own budget");
    }

    #[test]
    fn given_connection_caps_should_refuse_beyond_them_and_free_slots_on_drop() {
        let slots = Arc::new(Slots::new(3, 2));
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        let a1 = slots.acquire(a).unwrap();
        let _a2 = slots.acquire(a).unwrap();
        assert_eq!(slots.acquire(a).unwrap_err(), SlotRefusal::PerIp);
        let _b1 = slots.acquire(b).unwrap();
        assert_eq!(slots.acquire(b).unwrap_err(), SlotRefusal::Total);
        assert_eq!(slots.open(), 3, "refusals hold no slot");
        drop(a1);
        assert!(slots.acquire(b).is_ok(), "a freed slot is usable by anyone");
        let unlimited = Arc::new(Slots::new(0, 0));
        let held: Vec<Slot> = (0..100).map(|_| unlimited.acquire(a).unwrap()).collect();
        assert_eq!(unlimited.open(), 100);
        drop(held);
        assert_eq!(unlimited.open(), 0);
    }
}
