//! The sync gate: which clusters a node's agent programs (ARCHITECTURE.md, mesh-agent).
//!
//! A cluster is *synced* once every kind of object it publishes has had its `Synced` marker
//! (at least once: a reconnect does not unsync it, the watch client keeps the state
//! consistent through it). Programming a cluster that is not synced would withdraw backends
//! that simply have not arrived yet, so:
//!
//! - nothing is programmed until the local cluster is synced, and until the initial-sync
//!   deadline passes, every cluster seen: after a restart the pinned maps keep serving the old
//!   state meanwhile;
//! - once programming has begun it goes on, and a cluster that is not synced is left out of
//!   the programmed state.

use std::collections::BTreeSet;
use std::fmt;

use crate::ClusterName;

/// What the gate decides from, besides each cluster's sync fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateInput<'a> {
    pub local_cluster: &'a ClusterName,
    /// The initial-sync deadline (`--initial-sync-timeout` after the agent started) passed.
    pub deadline_passed: bool,
    /// The gate opened before: the agent is programming already.
    pub programming: bool,
}

/// The gate's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncGate {
    /// Program nothing yet: the maps keep what they hold.
    Wait(Waiting),
    /// Program the synced clusters; `left_out` were seen but never synced.
    Program {
        clusters: BTreeSet<ClusterName>,
        left_out: BTreeSet<ClusterName>,
    },
}

/// Why nothing is programmed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// The local cluster (the only source of frontends) is not synced.
    LocalCluster(ClusterName),
    /// Some cluster seen is not synced and the deadline has not passed.
    EveryCluster { unsynced: BTreeSet<ClusterName> },
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::LocalCluster(c) => write!(f, "waiting for the initial sync of cluster {c}"),
            Waiting::EveryCluster { .. } => {
                f.write_str("waiting for the initial sync of every cluster")
            }
        }
    }
}

/// Decides which clusters to program from each cluster's sync fact (`(cluster, synced at
/// least once)`, every cluster seen so far, in any order).
pub fn sync_gate<'a>(
    input: &GateInput<'_>,
    facts: impl IntoIterator<Item = (&'a ClusterName, bool)>,
) -> SyncGate {
    let mut clusters = BTreeSet::new();
    let mut left_out = BTreeSet::new();
    for (name, synced) in facts {
        if synced {
            clusters.insert(name.clone());
        } else {
            left_out.insert(name.clone());
        }
    }
    if !input.programming {
        if !clusters.contains(input.local_cluster) {
            return SyncGate::Wait(Waiting::LocalCluster(input.local_cluster.clone()));
        }
        if !left_out.is_empty() && !input.deadline_passed {
            return SyncGate::Wait(Waiting::EveryCluster { unsynced: left_out });
        }
    }
    SyncGate::Program { clusters, left_out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn set(names: &[&str]) -> BTreeSet<ClusterName> {
        names.iter().map(|n| name(n)).collect()
    }

    #[test]
    fn gate_table() {
        let local = name("local");
        let (l, e, w) = (name("local"), name("east"), name("west"));
        struct Row {
            facts: Vec<(ClusterName, bool)>,
            deadline_passed: bool,
            programming: bool,
            want: SyncGate,
        }
        let program = |c: &[&str], out: &[&str]| SyncGate::Program {
            clusters: set(c),
            left_out: set(out),
        };
        let rows = [
            // Nothing seen yet, or the local cluster unsynced: wait, deadline or not.
            Row {
                facts: vec![],
                deadline_passed: true,
                programming: false,
                want: SyncGate::Wait(Waiting::LocalCluster(local.clone())),
            },
            Row {
                facts: vec![(l.clone(), false), (e.clone(), true)],
                deadline_passed: true,
                programming: false,
                want: SyncGate::Wait(Waiting::LocalCluster(local.clone())),
            },
            // A remote unsynced before the deadline: wait for it.
            Row {
                facts: vec![(l.clone(), true), (e.clone(), false), (w.clone(), true)],
                deadline_passed: false,
                programming: false,
                want: SyncGate::Wait(Waiting::EveryCluster {
                    unsynced: set(&["east"]),
                }),
            },
            // After the deadline: program what is synced.
            Row {
                facts: vec![(l.clone(), true), (e.clone(), false), (w.clone(), true)],
                deadline_passed: true,
                programming: false,
                want: program(&["local", "west"], &["east"]),
            },
            // Everything synced: no need to wait for the deadline.
            Row {
                facts: vec![(l.clone(), true), (e.clone(), true)],
                deadline_passed: false,
                programming: false,
                want: program(&["local", "east"], &[]),
            },
            // Once programming, a new unsynced cluster is left out, never waited for.
            Row {
                facts: vec![(l.clone(), true), (e.clone(), false)],
                deadline_passed: false,
                programming: true,
                want: program(&["local"], &["east"]),
            },
        ];
        for (i, r) in rows.into_iter().enumerate() {
            let got = sync_gate(
                &GateInput {
                    local_cluster: &local,
                    deadline_passed: r.deadline_passed,
                    programming: r.programming,
                },
                r.facts.iter().map(|(n, s)| (n, *s)),
            );
            assert_eq!(got, r.want, "row {i}");
        }
    }

    #[test]
    fn waiting_reasons_name_the_cluster() {
        assert_eq!(
            Waiting::LocalCluster(name("east")).to_string(),
            "waiting for the initial sync of cluster east"
        );
        assert_eq!(
            Waiting::EveryCluster {
                unsynced: set(&["west"])
            }
            .to_string(),
            "waiting for the initial sync of every cluster"
        );
    }
}
