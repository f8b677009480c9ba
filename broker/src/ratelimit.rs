//! Rate limits (GCRA, from the governor crate), shared by all shards so that a user's limit
//! holds across their sessions on different shards.
//!
//! | limiter  | key     | config                                              |
//! |----------|---------|-----------------------------------------------------|
//! | send     | user    | `limits.send_rate_per_sec`, `limits.send_burst`     |
//! | typing   | user    | `limits.typing_rate_per_sec`, `limits.typing_burst` |
//! | receipts | user    | `limits.receipt_rate_per_sec`, `limits.receipt_burst` |
//! | connect  | peer IP | `limits.connect_rate_per_ip`, `limits.connect_burst_per_ip` |

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
        }
    }

    /// Periodic housekeeping.
    pub fn forget_idle(&self) {
        self.send.forget_idle();
        self.typing.forget_idle();
        self.receipts.forget_idle();
        self.connect.forget_idle();
    }
}

/// Milliseconds to tell a client to wait, rounded up (at least 1).
#[must_use]
pub fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
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
}
