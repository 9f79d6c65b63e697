//! When a reconcile runs after a watch update: adaptive batching instead of a fixed window.
//!
//! A fixed debounce makes every lone change wait the whole window (5 ms was half of the
//! propagation time on an idle mesh), while under churn any window shorter than a reconcile
//! buys little. The [`Pacer`] decides from what the agent just did: after a reconcile that
//! took `c`, the agent **cools down** for [`BURST_FACTOR`] x `c` (at most `max_wait`,
//! `--debounce`):
//!
//! - a change that arrives after the cool-down (a quiet mesh) reconciles at once;
//! - a change that arrives during it (a burst: changes back to back) waits until it ends,
//!   and whatever arrives meanwhile is applied in the same reconcile.
//!
//! So reconciling takes at most about 1/(1 + BURST_FACTOR) of the agent's time under churn,
//! batches grow with the reconcile's cost, and a lone change never waits.
//!
//! Pure: the caller passes the time in; the agent's loop sleeps until [`Pacer::due`]'s
//! answer (no periodic timer).

use std::time::Duration;

use tokio::time::Instant;

/// In a burst, wait this many times the last reconcile's duration.
pub const BURST_FACTOR: u32 = 4;

/// Decides when a reconcile triggered by watch updates is due.
#[derive(Debug, Clone)]
pub struct Pacer {
    max_wait: Duration,
    last_cost: Duration,
    last_done: Option<Instant>,
}

// === impl Pacer ===

impl Pacer {
    /// `max_wait`: the longest cool-down, hence the longest a change waits (`--debounce`).
    pub fn new(max_wait: Duration) -> Self {
        Pacer {
            max_wait,
            last_cost: Duration::ZERO,
            last_done: None,
        }
    }

    /// A change arrived at `now` and no reconcile is due yet: when it should run.
    pub fn due(&self, now: Instant) -> Instant {
        match self.last_done {
            Some(done) => now.max(done + (self.last_cost * BURST_FACTOR).min(self.max_wait)),
            None => now,
        }
    }

    /// A reconcile ran from `started` to `finished`.
    pub fn reconciled(&mut self, started: Instant, finished: Instant) {
        self.last_cost = finished.saturating_duration_since(started);
        self.last_done = Some(finished);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lone_change_goes_at_once() {
        let mut p = Pacer::new(5 * MS);
        let t = Instant::now();
        assert_eq!(p.due(t), t, "nothing reconciled yet");
        p.reconciled(t, t + MS);
        let later = t + MS + 4 * MS;
        assert_eq!(p.due(later), later, "the cool-down (4 x 1 ms) is over");
    }

    #[test]
    fn a_change_during_the_cool_down_waits_for_its_end() {
        let mut p = Pacer::new(5 * MS);
        let t = Instant::now();
        let done = t + Duration::from_micros(500);
        p.reconciled(t, done);
        assert_eq!(p.due(done), done + 2 * MS, "4 x 0.5 ms after the reconcile");
        assert_eq!(
            p.due(done + MS),
            done + 2 * MS,
            "the same end, whenever it arrives"
        );
    }

    #[test]
    fn the_cool_down_is_capped_by_max_wait() {
        let mut p = Pacer::new(5 * MS);
        let t = Instant::now();
        p.reconciled(t, t + 10 * MS);
        assert_eq!(p.due(t + 11 * MS), t + 15 * MS);
    }

    #[test]
    fn a_zero_max_wait_never_waits() {
        let mut p = Pacer::new(Duration::ZERO);
        let t = Instant::now();
        p.reconciled(t, t + 3 * MS);
        assert_eq!(p.due(t + 3 * MS), t + 3 * MS);
    }
}
