//! Reconnect policy: full-jitter exponential backoff.

use std::time::Duration;

use rand::Rng;

/// How the client reconnects after losing its connection.
///
/// The wait before reconnect attempt `n` (0-based, reset after every successful handshake) is
/// drawn uniformly from `0..=min(cap, base * 2^n)` ("full jitter"), and is never shorter than
/// the `retry_after_ms` the broker asked for in its `Disconnect` or `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// The ceiling of the first wait. Default 200 ms.
    pub base: Duration,
    /// The largest ceiling. Default 30 s.
    pub cap: Duration,
    /// Whether to reconnect at all. When false, a lost connection closes the client.
    pub enabled: bool,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self { base: Duration::from_millis(200), cap: Duration::from_secs(30), enabled: true }
    }
}

impl ReconnectPolicy {
    /// A policy that never reconnects.
    #[must_use]
    pub fn disabled() -> Self {
        Self { enabled: false, ..Self::default() }
    }

    /// The upper bound of the wait before attempt `attempt`: `min(cap, base * 2^attempt)`.
    #[must_use]
    pub fn ceiling(&self, attempt: u32) -> Duration {
        2u32.checked_pow(attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// A random wait before attempt `attempt`, uniform in `0..=ceiling(attempt)`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }

    /// [`delay`](Self::delay), but at least `floor` (the broker's `retry_after_ms`).
    pub(crate) fn delay_at_least(
        &self,
        attempt: u32,
        floor: Duration,
        rng: &mut impl Rng,
    ) -> Duration {
        self.delay(attempt, rng).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn given_default_policy_when_computing_ceilings_should_double_from_base_up_to_cap() {
        let p = ReconnectPolicy::default();
        assert_eq!(p.ceiling(0), Duration::from_millis(200));
        assert_eq!(p.ceiling(1), Duration::from_millis(400));
        assert_eq!(p.ceiling(5), Duration::from_millis(6400));
        assert_eq!(p.ceiling(7), Duration::from_millis(25_600));
        assert_eq!(p.ceiling(8), Duration::from_secs(30));
        assert_eq!(p.ceiling(1000), Duration::from_secs(30), "huge attempts saturate at cap");
    }

    #[test]
    fn given_many_draws_when_computing_delay_should_stay_within_zero_and_ceiling() {
        let p = ReconnectPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let ceiling = p.ceiling(attempt);
            for _ in 0..200 {
                let d = p.delay(attempt, &mut rng);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
    }

    #[test]
    fn given_many_draws_when_computing_delay_should_use_the_whole_range() {
        let p = ReconnectPolicy::default();
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<Duration> = (0..1000).map(|_| p.delay(10, &mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(3)), "full jitter reaches low");
        assert!(draws.iter().any(|d| *d > Duration::from_secs(27)), "and high values");
    }

    #[test]
    fn given_server_retry_after_when_computing_delay_should_wait_at_least_that_long() {
        let p = ReconnectPolicy::default();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let d = p.delay_at_least(0, Duration::from_secs(5), &mut rng);
            assert!(d >= Duration::from_secs(5));
            assert!(d <= Duration::from_secs(5), "attempt 0 ceiling is 200 ms, so floor wins");
        }
    }

    #[test]
    fn given_zero_base_when_computing_delay_should_be_zero() {
        let p = ReconnectPolicy { base: Duration::ZERO, ..ReconnectPolicy::default() };
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(p.delay(3, &mut rng), Duration::ZERO);
    }
}
