//! Prometheus metrics of the agent (DESIGN.md section 11), all named `mesh_agent_*`, and what
//! `/readyz` answers (the server is [`mesh_proto::serve`], shared with mesh-apiserver).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// The agent's metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Entries per map (`services`, `backends`, `ipcache`) after the last reconcile.
    pub map_entries: Family<MapLabels, Gauge>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Counter,
    /// Map operations applied, by kind (`backend_upsert`, `slot_delete`, ...).
    pub map_operations: Family<OpLabels, Counter>,
    /// Entries left out of the desired state by the last computation, by reason.
    pub dropped_entries: Family<ReasonLabels, Gauge>,
    /// Watched values that could not be used, by kind.
    pub rejected_objects: Family<KindLabels, Counter>,
    pub watch_reconnects: Counter,
    /// 1 when every kind of the cluster is synced.
    pub cluster_synced: Family<ClusterLabels, Gauge>,
    /// Routes the agent owns.
    pub routes: Gauge,
    pub route_errors: Counter,
    pub status_reports: Counter,
    pub status_report_errors: Counter,
    /// Quarantines begun (passive backend health).
    pub backend_quarantines: Counter,
    /// Backends quarantined on this node now.
    pub backends_quarantined: Gauge,
    /// The agent's own probe connects to quarantined backends, by result.
    pub quarantine_probes: Family<ProbeLabels, Counter>,
    /// When each phase of the initial sync ended, in seconds since the agent started.
    pub initial_sync: InitialSync,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// The phases of the initial sync, in order (`mesh_agent_initial_sync_seconds{phase}`):
/// when each ended, in seconds since the agent started. A phase that has not ended has no
/// series.
pub const SYNC_PHASES: [&str; 7] = [
    // The pinned maps and programs are loaded and attached.
    "datapath_open",
    // The first message of the watch stream arrived (the stream is open).
    "first_message",
    // The snapshot is applied to the state and the sync gate let it through.
    "snapshot_applied",
    // The services, backends, routes and policy are computed (while another thread
    // computes the ipcache).
    "computed",
    // The ipcache is computed (the second thread).
    "ipcache_computed",
    // The ipcache, service and backend maps are written (a large ipcache beside the
    // others, once the entries the backends need are in).
    "maps_written",
    // Policy maps, routes and status are done (the flow context follows).
    "finished",
];

/// `mesh_agent_initial_sync_seconds`: marks the end of each phase of the initial sync
/// (see [`SYNC_PHASES`]), once.
#[derive(Clone, Debug)]
pub struct InitialSync {
    started: Instant,
    family: Family<PhaseLabels, Gauge<f64, AtomicU64>>,
}

impl InitialSync {
    /// Marks `phase` as ended now, unless it was marked before.
    pub fn mark(&self, phase: &'static str) {
        debug_assert!(SYNC_PHASES.contains(&phase), "unknown phase {phase}");
        let labels = PhaseLabels { phase };
        if self.family.get(&labels).is_none() {
            self.family
                .get_or_create(&labels)
                .set(self.started.elapsed().as_secs_f64());
        }
    }

    /// When `phase` ended (seconds since the agent started), if it did.
    pub fn get(&self, phase: &'static str) -> Option<f64> {
        self.family.get(&PhaseLabels { phase }).map(|g| g.get())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

// === impl Metrics ===

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            map_entries: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            reconcile_errors: Counter::default(),
            map_operations: Family::default(),
            dropped_entries: Family::default(),
            rejected_objects: Family::default(),
            watch_reconnects: Counter::default(),
            cluster_synced: Family::default(),
            routes: Gauge::default(),
            route_errors: Counter::default(),
            status_reports: Counter::default(),
            status_report_errors: Counter::default(),
            backend_quarantines: Counter::default(),
            backends_quarantined: Gauge::default(),
            quarantine_probes: Family::default(),
            initial_sync: InitialSync {
                started: Instant::now(),
                family: Family::default(),
            },
        };
        let r = registry.sub_registry_with_prefix("mesh_agent");
        r.register("map_entries", "Entries per eBPF map", m.map_entries.clone());
        r.register(
            "reconcile_duration_seconds",
            "Time to compute and apply the desired datapath",
            m.reconcile_duration.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles",
            m.reconcile_errors.clone(),
        );
        r.register(
            "map_operations",
            "Map operations applied, by kind",
            m.map_operations.clone(),
        );
        for op in crate::reconcile::OP_KINDS {
            let _ = m
                .map_operations
                .get_or_create(&OpLabels { op: op.to_owned() });
        }
        r.register(
            "dropped_entries",
            "Entries left out of the desired state, by reason",
            m.dropped_entries.clone(),
        );
        r.register(
            "rejected_objects",
            "Watched values that could not be used, by kind",
            m.rejected_objects.clone(),
        );
        r.register(
            "watch_reconnects",
            "Reconnects of the watch of the local apiserver",
            m.watch_reconnects.clone(),
        );
        r.register(
            "cluster_synced",
            "1 when every kind of the cluster is synced",
            m.cluster_synced.clone(),
        );
        r.register("routes", "Routes owned by the agent", m.routes.clone());
        r.register(
            "route_errors",
            "Routes that could not be applied",
            m.route_errors.clone(),
        );
        r.register(
            "status_reports",
            "Status reports sent",
            m.status_reports.clone(),
        );
        r.register(
            "status_report_errors",
            "Status reports that failed",
            m.status_report_errors.clone(),
        );
        r.register(
            "backend_quarantines",
            "Backends quarantined on this node after failed connects (passive health)",
            m.backend_quarantines.clone(),
        );
        r.register(
            "backends_quarantined",
            "Backends quarantined on this node now",
            m.backends_quarantined.clone(),
        );
        r.register(
            "quarantine_probes",
            "Probe connects to quarantined backends whose period is over, by result",
            m.quarantine_probes.clone(),
        );
        r.register(
            "initial_sync_seconds",
            "When each phase of the initial sync ended, in seconds since the agent started",
            m.initial_sync.family.clone(),
        );
        for result in ["success", "failure"] {
            let _ = m.quarantine_probes.get_or_create(&ProbeLabels { result });
        }
        m
    }
}

/// Readiness: every cluster synced and the last reconcile succeeded.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    reason: Arc<std::sync::Mutex<String>>,
}

// === impl Readiness ===

impl Readiness {
    pub fn set(&self, ready: bool, reason: impl Into<String>) {
        self.ready.store(ready, Ordering::Relaxed);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
    }

    pub fn get(&self) -> (bool, String) {
        (
            self.ready.load(Ordering::Relaxed),
            self.reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl mesh_proto::serve::Readiness for Readiness {
    fn check(&self) -> Result<String, String> {
        match self.get() {
            (true, _) => Ok("ready\n".to_owned()),
            (false, reason) => Err(format!("not ready: {reason}\n")),
        }
    }
}
