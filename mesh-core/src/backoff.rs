//! The retry policy every reconnect and retry loop of mesh uses: capped exponential backoff
//! with jitter.
//!
//! Policy: the ceiling of retry `n` (0-based) is `min(max, initial * 2^n)`. The delay is
//! drawn under that ceiling according to [`Jitter`]:
//!
//! - [`Jitter::Full`]: uniform in `[0, ceiling]`. For many clients of one server (agents and
//!   peers reconnecting to an apiserver): they spread out instead of stampeding it when it
//!   comes back (the "full jitter" of the AWS architecture blog's backoff study).
//! - [`Jitter::Equal`]: uniform in `[ceiling / 2, ceiling]`. For a process retrying its own
//!   dependency (etcd, leader election): it keeps a floor, so a retry never fires at once, and
//!   replicas still drift apart.
//! - [`Jitter::None`]: exactly the ceiling (kubelet's CrashLoopBackOff, which the lab mimics).
//!
//! The delay never exceeds `max`. The caller owns the randomness (this crate does no IO and
//! holds no RNG): [`Backoff::delay`] takes a sample in `[0, 1]`, and [`Retries`] counts
//! attempts for a loop that retries until success and then [`Retries::reset`]s.
//!
//! Hand-written rather than `backon` (already in the tree through kube-runtime): backon's
//! jitter adds up to one more delay on top (`[d, 2d)`, above the cap), it has neither full
//! nor equal jitter, and its delays are an iterator without a per-attempt ceiling to test
//! against.

use std::time::Duration;

/// How the delay is spread under the ceiling (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`.
    #[default]
    Full,
    /// Uniform in `[ceiling / 2, ceiling]`.
    Equal,
    /// The ceiling itself.
    None,
}

/// Capped exponential backoff: `initial`, doubled per attempt up to `max`, with `jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

// === impl Backoff ===

impl Backoff {
    /// Full jitter between `initial` and `max`.
    pub const fn full_jitter(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: Jitter::Full,
        }
    }

    /// Equal jitter between `initial` and `max`.
    pub const fn equal_jitter(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: Jitter::Equal,
        }
    }

    /// No jitter: `initial`, `2 * initial`, ... up to `max`.
    pub const fn exact(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: Jitter::None,
        }
    }

    /// The upper bound of the delay before retry `attempt` (0-based):
    /// `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `attempt`, given `sample`, a uniform random number in `[0, 1]`
    /// (clamped; ignored by [`Jitter::None`]).
    pub fn delay(&self, attempt: u32, sample: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let sample = if sample.is_nan() {
            0.0
        } else {
            sample.clamp(0.0, 1.0)
        };
        let delay = match self.jitter {
            Jitter::Full => ceiling.mul_f64(sample),
            Jitter::Equal => {
                let half = ceiling / 2;
                half + (ceiling - half).mul_f64(sample)
            }
            Jitter::None => ceiling,
        };
        delay.min(ceiling)
    }

    /// A counter of attempts under this policy.
    pub fn retries(self) -> Retries {
        Retries {
            policy: self,
            attempt: 0,
        }
    }
}

/// The attempts of one retry loop under a [`Backoff`]: each [`Retries::next_delay`] is the
/// delay before the next attempt; [`Retries::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    attempt: u32,
}

// === impl Retries ===

impl Retries {
    /// The delay before the next attempt (`sample` as in [`Backoff::delay`]); counts it.
    pub fn next_delay(&mut self, sample: f64) -> Duration {
        let d = self.policy.delay(self.attempt, sample);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts over from `initial` (after a success, or a connection that stayed healthy).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Retries counted since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn policy(&self) -> &Backoff {
        &self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_and_is_capped() {
        let b = Backoff::full_jitter(100 * MS, Duration::from_secs(5));
        assert_eq!(b.ceiling(0), 100 * MS);
        assert_eq!(b.ceiling(1), 200 * MS);
        assert_eq!(b.ceiling(5), 3200 * MS);
        assert_eq!(b.ceiling(6), Duration::from_secs(5));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_bounds() {
        let c = Duration::from_secs(4);
        let full = Backoff::full_jitter(c, c);
        assert_eq!(full.delay(0, 0.0), Duration::ZERO);
        assert_eq!(full.delay(0, 0.5), c / 2);
        assert_eq!(full.delay(0, 1.0), c);
        let equal = Backoff::equal_jitter(c, c);
        assert_eq!(equal.delay(0, 0.0), c / 2);
        assert_eq!(equal.delay(0, 1.0), c);
        let exact = Backoff::exact(c, c);
        assert_eq!(exact.delay(0, 0.3), c);
        // Out-of-range samples are clamped, never above the cap.
        assert_eq!(full.delay(0, 7.0), c);
        assert_eq!(full.delay(0, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn retries_count_and_reset() {
        let mut r = Backoff::exact(10 * MS, 35 * MS).retries();
        let got: Vec<_> = (0..4).map(|_| r.next_delay(0.0)).collect();
        assert_eq!(got, [10 * MS, 20 * MS, 35 * MS, 35 * MS]);
        assert_eq!(r.attempt(), 4);
        r.reset();
        assert_eq!(r.next_delay(0.0), 10 * MS);
    }

    proptest! {
        #[test]
        fn delay_stays_within_the_policy(
            initial_ms in 1u64..10_000,
            max_ms in 1u64..100_000,
            attempt in 0u32..100,
            sample in 0.0f64..=1.0,
        ) {
            let (initial, max) = (MS * initial_ms as u32, MS * max_ms as u32);
            for b in [Backoff::full_jitter(initial, max), Backoff::equal_jitter(initial, max), Backoff::exact(initial, max)] {
                let c = b.ceiling(attempt);
                prop_assert!(c <= max);
                let d = b.delay(attempt, sample);
                prop_assert!(d <= c);
                if b.jitter == Jitter::Equal {
                    prop_assert!(d >= c / 2);
                }
            }
        }
    }
}
