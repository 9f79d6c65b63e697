//! Which of the cluster's nodes stopped reporting (issue 14 part 4, "a cluster's own node
//! lost"): the publisher's judgement, from the agents' status records
//! (`agents/<node>`, written by `ReportStatus` with a lease).
//!
//! Pure and synchronous: the publisher reads the agents prefix every
//! `PublisherConfig::node_check_interval` and feeds each read to [`NodeLiveness::observe`]
//! with its own monotonic clock; [`NodeLiveness::judge`] says per node whether it reports.
//! Rules:
//!
//! - A report is *seen* when its etcd mod revision is new; the time is the publisher's own
//!   clock when it saw it (no agent clock is trusted).
//! - A node is **not reporting** when its last report was seen more than `intervals` x its
//!   agent's status interval (`AgentStatus.status_interval_ms`) ago. A record that vanished
//!   (its lease expired) keeps its last sighting: the node is still not reporting.
//! - A node whose agent never reported in this term, or reports no interval (an older
//!   agent), is **not judged** ([`Liveness::Unknown`]): the publisher keeps whatever mark etcd
//!   holds for it. So does a node during the grace after the term started, until its agent
//!   reports anew or the threshold passes from the term's start: records already in etcd
//!   count as seen at the start, so a fresh leader does not mark every node at once.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// One read of an agent's record: node, mod revision, status interval (zero: unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub node: String,
    pub revision: i64,
    pub interval: Duration,
}

/// What [`NodeLiveness::judge`] says of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its agent reported within the threshold since the term started.
    Reporting,
    /// No report for more than the threshold.
    NotReporting,
    /// Not judged: keep what etcd holds.
    Unknown,
}

#[derive(Debug, Clone)]
struct Seen {
    revision: i64,
    interval: Duration,
    at: Instant,
    /// Whether a report arrived after the first read of this term.
    fresh_in_term: bool,
}

/// The sightings of every agent's reports in one publishing term.
#[derive(Debug)]
pub struct NodeLiveness {
    intervals: u32,
    nodes: HashMap<String, Seen>,
    /// Whether a read was observed yet (the first one is the term's baseline).
    primed: bool,
}

impl NodeLiveness {
    /// `intervals`: how many status intervals without a report make a node not reporting.
    pub fn new(intervals: u32) -> Self {
        Self {
            intervals: intervals.max(1),
            nodes: HashMap::new(),
            primed: false,
        }
    }

    /// Feeds one complete read of the agents prefix at `now`.
    pub fn observe(&mut self, reports: impl IntoIterator<Item = Report>, now: Instant) {
        let baseline = !self.primed;
        self.primed = true;
        for r in reports {
            match self.nodes.get_mut(&r.node) {
                Some(seen) if seen.revision == r.revision => seen.interval = r.interval,
                Some(seen) => {
                    *seen = Seen {
                        revision: r.revision,
                        interval: r.interval,
                        at: now,
                        fresh_in_term: true,
                    }
                }
                None => {
                    self.nodes.insert(
                        r.node,
                        Seen {
                            revision: r.revision,
                            interval: r.interval,
                            at: now,
                            // A record first read after the baseline was written in this term.
                            fresh_in_term: !baseline,
                        },
                    );
                }
            }
        }
    }

    /// Whether `node` reports, as of `now`.
    pub fn judge(&self, node: &str, now: Instant) -> Liveness {
        let Some(seen) = self.nodes.get(node) else {
            return Liveness::Unknown;
        };
        if seen.interval.is_zero() {
            return Liveness::Unknown;
        }
        let threshold = seen.interval.saturating_mul(self.intervals);
        if now.saturating_duration_since(seen.at) > threshold {
            Liveness::NotReporting
        } else if seen.fresh_in_term {
            Liveness::Reporting
        } else {
            Liveness::Unknown
        }
    }

    /// Forgets nodes `keep` rejects (gone from Kubernetes).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.nodes.retain(|n, _| keep(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, revision: i64, ms: u64) -> Report {
        Report {
            node: node.into(),
            revision,
            interval: Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_is_judged_after_its_intervals_and_clears_on_a_new_report() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = NodeLiveness::new(3);
        // The baseline read: records already there count as seen at the term's start.
        l.observe([report("n1", 10, 1000), report("old", 5, 0)], t0);
        assert_eq!(
            l.judge("n1", t0),
            Liveness::Unknown,
            "grace: not judged yet"
        );
        assert_eq!(l.judge("never", t0), Liveness::Unknown);
        // n1 reports anew: reporting.
        l.observe([report("n1", 11, 1000)], t0 + s);
        assert_eq!(l.judge("n1", t0 + s), Liveness::Reporting);
        // Silent for 3 intervals: still reporting; beyond: not reporting.
        assert_eq!(l.judge("n1", t0 + 4 * s), Liveness::Reporting);
        assert_eq!(
            l.judge("n1", t0 + 4 * s + Duration::from_millis(1)),
            Liveness::NotReporting
        );
        // Its record vanished (lease expired): still not reporting.
        l.observe([], t0 + 40 * s);
        assert_eq!(l.judge("n1", t0 + 40 * s), Liveness::NotReporting);
        // Reports again (a new record, a new revision): reporting.
        l.observe([report("n1", 90, 1000)], t0 + 41 * s);
        assert_eq!(l.judge("n1", t0 + 41 * s), Liveness::Reporting);
        // An agent without an interval is never judged.
        assert_eq!(l.judge("old", t0 + 100 * s), Liveness::Unknown);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_from_before_the_term_is_judged_from_the_terms_start() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = NodeLiveness::new(3);
        l.observe([report("dead", 10, 1000)], t0);
        // The same record read again and again: the agent is silent.
        l.observe([report("dead", 10, 1000)], t0 + 2 * s);
        assert_eq!(l.judge("dead", t0 + 3 * s), Liveness::Unknown);
        l.observe([report("dead", 10, 1000)], t0 + 3 * s);
        assert_eq!(l.judge("dead", t0 + 4 * s), Liveness::NotReporting);
        // A record that appears after the baseline was written in this term.
        l.observe([report("new", 1, 1000)], t0 + 5 * s);
        assert_eq!(l.judge("new", t0 + 5 * s), Liveness::Reporting);
        l.retain(|n| n != "new");
        assert_eq!(l.judge("new", t0 + 5 * s), Liveness::Unknown);
    }
}
