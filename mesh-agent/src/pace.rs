//! When a reconcile runs after a watch update: adaptive batching instead of a fixed window.
//!
//! A fixed debounce makes every lone change wait the whole window (5 ms was half of the
//! propagation time on an idle mesh), while under churn any window shorter than a reconcile
//! buys little. The [`Pacer`] decides from what the agent just did: after a reconcile that
//! took `c`, the agent **cools down** for [`BURST_FACTOR`] x `c` (at least
//! [`MIN_COOL_DOWN`], at most `max_wait`, `--debounce`):
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

/// The shortest cool-down: a reconcile that did almost nothing (e.g. the sync gate still
/// closed during an initial snapshot of 512k entries) would otherwise allow one reconcile
/// per update. Changes on a quiet mesh arrive further apart than this and never wait.
pub const MIN_COOL_DOWN: Duration = Duration::from_millis(1);

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
            Some(done) => {
                let cool = (self.last_cost * BURST_FACTOR)
                    .max(MIN_COOL_DOWN)
                    .min(self.max_wait);
                now.max(done + cool)
            }
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
    fn a_cheap_reconcile_still_cools_down_a_millisecond() {
        let mut p = Pacer::new(5 * MS);
        let t = Instant::now();
        let done = t + Duration::from_micros(5);
        p.reconciled(t, done);
        assert_eq!(p.due(done), done + MS);
        assert_eq!(p.due(done + 2 * MS), done + 2 * MS, "past it: at once");
    }

    #[test]
    fn the_cool_down_is_capped_by_max_wait() {
        let mut p = Pacer::new(5 * MS);
        let t = Instant::now();
        p.reconciled(t, t + 10 * MS);
        assert_eq!(p.due(t + 11 * MS), t + 15 * MS);
    }

    /// The agent's loop driven by a steady stream of changes (one every 100 us for 100 ms)
    /// with reconciles of 1 ms: changes are batched (one reconcile per 1 ms + 4 ms cool-down,
    /// not one per change) and the last change is applied.
    #[test]
    fn a_steady_stream_is_batched_and_fully_applied() {
        let us = Duration::from_micros;
        let mut p = Pacer::new(5 * MS);
        let start = Instant::now();
        let arrivals: Vec<Instant> = (0..1000).map(|i| start + us(100 * i)).collect();
        let (mut next, mut now) = (0, start);
        let (mut due, mut reconciles, mut applied) = (None::<Instant>, 0, 0);
        while applied < arrivals.len() {
            // Updates that arrived by `now` are received; the first sets when to reconcile.
            while next < arrivals.len() && arrivals[next] <= now {
                due.get_or_insert_with(|| p.due(arrivals[next]));
                next += 1;
            }
            match due {
                Some(at) if at <= now => {
                    due = None;
                    reconciles += 1;
                    applied = next;
                    p.reconciled(now, now + MS);
                    now += MS;
                }
                Some(at) => now = at.min(arrivals.get(next).copied().unwrap_or(at)),
                None => now = arrivals[next],
            }
        }
        assert!(
            (19..=22).contains(&reconciles),
            "{reconciles} reconciles for 1000 changes over 100 ms"
        );
    }

    #[test]
    fn a_zero_max_wait_never_waits() {
        let mut p = Pacer::new(Duration::ZERO);
        let t = Instant::now();
        p.reconciled(t, t + 3 * MS);
        assert_eq!(p.due(t + 3 * MS), t + 3 * MS);
    }
}
