//! Per-peer metrics of the importer (DESIGN.md section 11), named `mesh_apiserver_peer_*`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    /// etcd transactions written for the peer.
    pub txns: Family<PeerLabels, Counter>,
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
            "etcd transactions written for the peer",
            m.txns.clone(),
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
