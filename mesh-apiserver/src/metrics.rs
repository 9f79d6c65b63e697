//! Prometheus metrics of mesh-apiserver (DESIGN.md section 11), all named `mesh_apiserver_*`:
//! the serving side, the publisher, and the peer importer (`mesh_apiserver_peer_*`, also
//! reachable as `peer::metrics`).
//!
//! One `Metrics` value is created at start-up, registered into the process registry and
//! shared (it is cheap to clone: every metric is an `Arc` inside).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use mesh_core::policy::PolicyKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::kube_source::ResourceKind;

/// `cluster`, `kind` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterKindLabels {
    pub cluster: String,
    pub kind: String,
}

/// `role` label (agent, peer, insecure).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: String,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Serving-side metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Watch streams currently open, by caller role.
    pub watch_streams: Family<RoleLabels, Gauge>,
    /// Events sent on watch streams (snapshot and live).
    pub events_sent: Counter,
    /// Watch response messages sent.
    pub messages_sent: Counter,
    /// Snapshots sent (fresh watches and resets).
    pub snapshots: Counter,
    /// Resets sent, by reason (`too_old`, `ahead`, `etcd_reset`).
    pub resets: Family<ReasonLabels, Counter>,
    /// Streams that fell behind their buffer and were cut from live delivery.
    pub slow_client_drops: Counter,
    /// Streams resumed from the history (client reconnects and internal catch-up).
    pub resumes: Counter,
    /// Objects in the serving index, by cluster and kind.
    pub index_objects: Family<ClusterKindLabels, Gauge>,
    /// The etcd revision the index has applied.
    pub index_revision: Gauge,
    /// Events in the history ring.
    pub history_events: Gauge,
    /// Times the etcd watch was re-established, by reason (`error`, `closed`, `compacted`,
    /// `canceled`).
    pub etcd_watch_restarts: Family<ReasonLabels, Counter>,
    /// Full re-lists of etcd (start, compaction).
    pub etcd_relists: Counter,
    /// Values or keys under `clusters/` that could not be decoded, by kind.
    pub decode_errors: Family<ReasonLabels, Counter>,
    /// Requests refused by authentication or authorization, by reason.
    pub auth_refusals: Family<ReasonLabels, Counter>,
    /// Agent status reports stored.
    pub status_reports: Counter,
    /// Watch streams refused because `--max-watch-streams` were open.
    pub watch_streams_refused: Counter,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them under `mesh_apiserver_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("mesh_apiserver");
        r.register(
            "watch_streams",
            "Watch streams currently open, by caller role",
            m.watch_streams.clone(),
        );
        r.register(
            "events_sent",
            "Events sent on watch streams",
            m.events_sent.clone(),
        );
        r.register(
            "messages_sent",
            "Watch response messages sent",
            m.messages_sent.clone(),
        );
        r.register(
            "snapshots",
            "Snapshots sent to watch streams",
            m.snapshots.clone(),
        );
        r.register("resets", "Resets sent, by reason", m.resets.clone());
        r.register(
            "slow_client_drops",
            "Watch streams cut from live delivery because their buffer was full",
            m.slow_client_drops.clone(),
        );
        r.register(
            "resumes",
            "Watch streams resumed from the history",
            m.resumes.clone(),
        );
        r.register(
            "index_objects",
            "Objects in the serving index, by cluster and kind",
            m.index_objects.clone(),
        );
        r.register(
            "index_revision",
            "etcd revision applied by the serving index",
            m.index_revision.clone(),
        );
        r.register(
            "history_events",
            "Events held in the resume history",
            m.history_events.clone(),
        );
        r.register(
            "etcd_watch_restarts",
            "Times the etcd watch feeding the index was re-established, by reason",
            m.etcd_watch_restarts.clone(),
        );
        r.register(
            "etcd_relists",
            "Full lists of the clusters prefix (start-up and compaction)",
            m.etcd_relists.clone(),
        );
        r.register(
            "decode_errors",
            "Keys or values under clusters/ that could not be decoded and were skipped",
            m.decode_errors.clone(),
        );
        r.register(
            "auth_refusals",
            "Requests refused by authentication or authorization, by reason",
            m.auth_refusals.clone(),
        );
        r.register(
            "status_reports",
            "Agent status reports stored",
            m.status_reports.clone(),
        );
        r.register(
            "watch_streams_refused",
            "Watch streams refused with RESOURCE_EXHAUSTED because --max-watch-streams were open",
            m.watch_streams_refused.clone(),
        );
        m
    }

    /// Increments `family{reason}`.
    pub(crate) fn inc_reason(family: &Family<ReasonLabels, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Renders a registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

// === publisher metrics (`mesh_publisher_*`, the publishing side) ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PolicyProblemLabels {
    pub(crate) kind: String,
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WriteLabels {
    pub(crate) kind: String,
    pub(crate) op: String,
}

/// The publisher's metrics, all named `mesh_publisher_*`.
#[derive(Debug, Default)]
pub struct PublisherMetrics {
    pub(crate) objects: Family<KindLabel, Gauge>,
    pub(crate) writes: Family<WriteLabels, Counter>,
    pub(crate) txns: Counter,
    pub(crate) annotation_problems: Counter,
    pub(crate) policy_problems: Family<PolicyProblemLabels, Counter>,
    pub(crate) decode_failures: Family<KindLabel, Counter>,
    pub(crate) watch_errors: Family<KindLabel, Counter>,
    pub(crate) synced: Family<KindLabel, Gauge>,
    pub(crate) identities: Gauge,
    pub(crate) identity_allocations: Counter,
    pub(crate) identities_collected: Counter,
    pub(crate) leader: Gauge,
    pub(crate) terms: Counter,
    pub(crate) kube_events: Counter,
    pub(crate) kube_event_failures: Counter,
    pub(crate) nodes_not_reporting: Gauge,
}

impl PublisherMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("mesh_publisher");
        r.register(
            "objects",
            "Objects this cluster has in etcd, by kind",
            m.objects.clone(),
        );
        r.register(
            "writes",
            "Keys written to etcd, by kind and op (put, delete)",
            m.writes.clone(),
        );
        r.register(
            "etcd_txns",
            "etcd transactions committed by the publisher",
            m.txns.clone(),
        );
        r.register(
            "annotation_problems",
            "Invalid Cilium service annotations found (each distinct problem once)",
            m.annotation_problems.clone(),
        );
        r.register(
            "policy_problems",
            "Network policy problems reported (each distinct problem of an object once), by \
             policy kind and reason (InvalidPolicy: not applied; PolicyNotFullyEnforced: \
             published, the unenforceable part fails closed)",
            m.policy_problems.clone(),
        );
        r.register(
            "decode_failures",
            "Kubernetes objects skipped because they could not be decoded, by kind",
            m.decode_failures.clone(),
        );
        r.register(
            "watch_errors",
            "Kubernetes watch errors, by kind",
            m.watch_errors.clone(),
        );
        r.register(
            "synced",
            "1 once the initial sync of a kind is in etcd",
            m.synced.clone(),
        );
        r.register(
            "identities",
            "Identities allocated in this cluster",
            m.identities.clone(),
        );
        r.register(
            "identity_allocations",
            "Identities allocated",
            m.identity_allocations.clone(),
        );
        r.register(
            "identities_collected",
            "Unused identities deleted",
            m.identities_collected.clone(),
        );
        r.register(
            "leader",
            "1 while this replica is the publishing leader",
            m.leader.clone(),
        );
        r.register("terms", "Leadership terms started", m.terms.clone());
        r.register(
            "kube_events",
            "Kubernetes Events created",
            m.kube_events.clone(),
        );
        r.register(
            "kube_event_failures",
            "Kubernetes Events that could not be created",
            m.kube_event_failures.clone(),
        );
        r.register(
            "nodes_not_reporting",
            "Nodes of this cluster marked not reporting (their agent's status is overdue)",
            m.nodes_not_reporting.clone(),
        );
        Arc::new(m)
    }

    pub fn decode_failure(&self, kind: ResourceKind) {
        self.decode_failures
            .get_or_create(&KindLabel {
                kind: kind.as_str().into(),
            })
            .inc();
    }

    pub fn watch_error(&self, kind: ResourceKind) {
        self.watch_errors
            .get_or_create(&KindLabel {
                kind: kind.as_str().into(),
            })
            .inc();
    }

    pub fn decode_failures(&self, kind: ResourceKind) -> u64 {
        self.decode_failures
            .get_or_create(&KindLabel {
                kind: kind.as_str().into(),
            })
            .get()
    }

    pub fn annotation_problems(&self) -> u64 {
        self.annotation_problems.get()
    }

    pub fn policy_problems(&self, kind: PolicyKind, reason: &str) -> u64 {
        self.policy_problems
            .get_or_create(&PolicyProblemLabels {
                kind: kind.as_str().into(),
                reason: reason.into(),
            })
            .get()
    }

    pub fn txns(&self) -> u64 {
        self.txns.get()
    }

    pub(crate) fn write(&self, kind: &str, op: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.into(),
                op: op.into(),
            })
            .inc();
    }
}

// === importer (peer) metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerReasonLabels {
    pub peer: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerKindLabels {
    pub peer: String,
    pub kind: String,
}

/// Importer metrics. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    /// 1 while a watch stream to the peer is open.
    pub connected: Family<PeerLabels, Gauge>,
    /// 1 once every kind of the peer is in etcd (stays 1 while stale).
    pub synced: Family<PeerLabels, Gauge>,
    /// Seconds since the peer was lost; 0 when connected.
    pub stale_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Seconds since the last message (event or heartbeat) from the peer.
    pub last_event_age_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Lost connections and failed connection attempts.
    pub reconnects: Family<PeerLabels, Counter>,
    /// Objects of the peer in etcd, by kind.
    pub objects: Family<PeerKindLabels, Gauge>,
    /// Refusals of the peer, by reason (`duplicate_id`, `duplicate_name`,
    /// `overlapping_pod_cidrs`, `name_mismatch`, `invalid_config`, `certificate`).
    pub refusals: Family<PeerReasonLabels, Counter>,
    /// Objects dropped instead of imported, by reason (`policy`, `identity_out_of_range`,
    /// `foreign_cluster`, `invalid`).
    pub dropped: Family<PeerReasonLabels, Counter>,
    /// Full snapshots taken (first import, server reset, after a withdrawal).
    pub snapshots: Family<PeerLabels, Counter>,
    /// Streams resumed from the last imported revision (no snapshot).
    pub resumes: Family<PeerLabels, Counter>,
    /// Times the peer's data was withdrawn after the stale TTL.
    pub withdrawals: Family<PeerLabels, Counter>,
    /// Batches written for the peer (several peers' batches may share one transaction).
    pub txns: Family<PeerLabels, Counter>,
    /// etcd transactions the importer sent, all peers together (`etcd_write::GroupWriter`).
    pub etcd_txns: Counter,
}

// === impl PeerMetrics ===

impl PeerMetrics {
    /// Creates the metrics and registers them under `mesh_apiserver_peer_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("mesh_apiserver_peer");
        r.register(
            "connected",
            "1 while a watch stream to the peer is open",
            m.connected.clone(),
        );
        r.register(
            "synced",
            "1 once every kind of the peer has been imported",
            m.synced.clone(),
        );
        r.register(
            "stale_seconds",
            "Seconds since the peer was lost (0 when connected)",
            m.stale_seconds.clone(),
        );
        r.register(
            "last_event_age_seconds",
            "Seconds since the last message from the peer",
            m.last_event_age_seconds.clone(),
        );
        r.register(
            "reconnects",
            "Lost connections and failed connection attempts",
            m.reconnects.clone(),
        );
        r.register(
            "objects",
            "Objects of the peer held in etcd, by kind",
            m.objects.clone(),
        );
        r.register(
            "refusals",
            "Times the peer was refused, by reason",
            m.refusals.clone(),
        );
        r.register(
            "dropped",
            "Objects of the peer dropped instead of imported, by reason",
            m.dropped.clone(),
        );
        r.register(
            "snapshots",
            "Full snapshots taken from the peer",
            m.snapshots.clone(),
        );
        r.register(
            "resumes",
            "Streams resumed from the last imported revision",
            m.resumes.clone(),
        );
        r.register(
            "withdrawals",
            "Times the peer's data was withdrawn after the stale TTL",
            m.withdrawals.clone(),
        );
        r.register(
            "txns",
            "Write batches of the peer (batches of several peers may share one etcd transaction)",
            m.txns.clone(),
        );
        r.register(
            "etcd_txns",
            "etcd transactions sent by the importer, all peers together",
            m.etcd_txns.clone(),
        );
        m
    }

    pub(crate) fn peer(peer: &str) -> PeerLabels {
        PeerLabels {
            peer: peer.to_owned(),
        }
    }

    pub(crate) fn reason(peer: &str, reason: &str) -> PeerReasonLabels {
        PeerReasonLabels {
            peer: peer.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// Forgets the gauges of a removed peer (counters stay: they are totals).
    pub(crate) fn forget(&self, peer: &str) {
        let l = Self::peer(peer);
        self.connected.remove(&l);
        self.synced.remove(&l);
        self.stale_seconds.remove(&l);
        self.last_event_age_seconds.remove(&l);
        for kind in mesh_proto::keys::ALL_KINDS {
            self.objects.remove(&PeerKindLabels {
                peer: peer.to_owned(),
                kind: kind_label(kind).to_owned(),
            });
        }
    }
}

pub(crate) fn kind_label(kind: mesh_proto::pb::Kind) -> &'static str {
    mesh_proto::keys::kind_segment(kind).unwrap_or("unspecified")
}
