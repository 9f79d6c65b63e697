//! The publisher: Kubernetes -> cluster model -> mesh objects -> etcd.
//!
//! Only the elected leader publishes. Each leadership term starts from scratch:
//!
//! 1. list what etcd holds for this cluster (the mark) and load the identities;
//! 2. write the cluster config (from flags) and its synced marker;
//! 3. start the watchers; apply their events to the [`ClusterModel`] in batches (every event
//!    that is queued is applied before anything is written, which coalesces bursts);
//! 4. once the inputs of a kind have been listed, publish every object of that kind, delete
//!    the keys of that kind that no longer exist (the sweep), and write
//!    `clusters/<c>/synced/<kind>`; from then on publish only what changed.
//!
//! Network policies are parsed with `mesh_core::policy::parse_policy` (the function agents
//! and meshctl re-parse them with) and published as the object's slim JSON. An invalid one
//! is reported (Warning Event `InvalidPolicy`, metric, log) and not published; if an earlier
//! version of the object was valid, that version **stays published** (fail-safe, as Cilium
//! keeps the previous revision when an update fails to import) until the object is fixed or
//! deleted. Unenforceable parts (`Policy::problems`) are published (they fail closed) and
//! reported as `PolicyNotFullyEnforced`.
//!
//! Nothing is deleted before the initial sync, and a value equal to the one in etcd is not
//! rewritten, so a restart neither makes objects blink nor produces write churn.
//!
//! Nodes not reporting (issue 14 part 4): every `node_check_interval` the term reads the
//! agents' status records (`agents/<node>`) and [`NodeLiveness`] judges each node; a node
//! whose agent stopped reporting is published with `stale_since_unix_ms` set (only marked,
//! never withdrawn: its endpoints and backends stay), and without it once it reports again.
//! A mark found in etcd at the start of a term is kept until the node is judged (grace).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1 as corev1;
use kube::api::{Api, PostParams};
use mesh_core::Backoff;
use mesh_core::annotations::AnnotationProblem;
use mesh_core::policy::{PolicyKind, parse_policy};
use mesh_core::{ClusterConfig, ClusterName, IdentityId};
use mesh_proto::convert::PolicyObject;
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::identity::{self, IdentityAllocator};
use crate::kube_source::{
    self, ClusterModel, KubeObjectKey, PolicyInfo, ResourceKind, ServiceInfo,
};
use crate::leader::{self, Elector, IsLeader, LeaderConfig, LeaderSignal};
use crate::liveness::{Liveness, NodeLiveness, Report};
pub use crate::metrics::PublisherMetrics;
use crate::metrics::{KindLabel, PolicyProblemLabels};
use crate::store::{self, EtcdStore, Fence, KeyChange};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
    #[error("all Kubernetes watchers of cluster {cluster} stopped")]
    WatchersStopped { cluster: ClusterName },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn is_fenced(&self) -> bool {
        matches!(
            self,
            Error::Store(store::Error::Fenced { .. })
                | Error::Identity(identity::Error::Fenced { .. })
        )
    }
}

// ===== configuration =====

/// What the publisher needs from the apiserver's flags.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// This cluster (name, id, CIDRs, ...), published as `clusters/<c>/config`.
    pub cluster: ClusterConfig,
    /// etcd key prefix, default `mesh/v1/`.
    pub prefix: String,
    /// How long an identity no endpoint uses stays allocated (default 5 minutes).
    pub identity_gc_grace: Duration,
    /// TTL of the leader lease (default 10 s): how long a crashed leader blocks a takeover.
    pub lease_ttl: Duration,
    /// This replica's name in the leader key (default `<hostname>-<pid>`).
    pub holder: String,
    /// Operations per etcd transaction: etcd's limit as probed at start, shared with the
    /// importer (default [`store::DEFAULT_TXN_OPS`], unprobed).
    pub max_txn_ops: store::TxnOps,
    /// Create Kubernetes Events for invalid annotations.
    pub kube_events: bool,
    /// A node whose agent has not reported for this many of its status intervals is marked
    /// not reporting (`--node-stale-intervals`, default 3).
    pub node_stale_intervals: u32,
    /// How often the agents' status records are read to judge the nodes (default 1 s).
    pub node_check_interval: Duration,
}

impl PublisherConfig {
    pub fn new(cluster: ClusterConfig) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "mesh-apiserver".into());
        Self {
            cluster,
            prefix: mesh_proto::keys::DEFAULT_PREFIX.to_string(),
            identity_gc_grace: identity::DEFAULT_GC_GRACE,
            lease_ttl: leader::DEFAULT_LEASE_TTL,
            holder: format!("{host}-{}", std::process::id()),
            max_txn_ops: store::TxnOps::default(),
            kube_events: true,
            node_stale_intervals: DEFAULT_NODE_STALE_INTERVALS,
            node_check_interval: DEFAULT_NODE_CHECK_INTERVAL,
        }
    }
}

/// Default of [`PublisherConfig::node_stale_intervals`].
pub const DEFAULT_NODE_STALE_INTERVALS: u32 = 3;
/// Default of [`PublisherConfig::node_check_interval`].
pub const DEFAULT_NODE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

fn kind_name(kind: pb::Kind) -> &'static str {
    mesh_proto::keys::kind_segment(kind).unwrap_or("unknown")
}

// ===== encoding (pb messages as stored in etcd) =====

mod encode {
    use mesh_core::{ClusterConfig, Endpoint, GlobalService, Node};
    use mesh_proto::pb;
    use prost::Message;

    pub(super) fn config(c: &ClusterConfig) -> Vec<u8> {
        pb::ClusterConfig::from(c).encode_to_vec()
    }

    pub(super) fn node(n: &Node) -> Vec<u8> {
        pb::Node::from(n).encode_to_vec()
    }

    pub(super) fn endpoint(e: &Endpoint) -> Vec<u8> {
        pb::Endpoint::from(e).encode_to_vec()
    }

    pub(super) fn service(s: &GlobalService) -> Vec<u8> {
        pb::GlobalService::from(s).encode_to_vec()
    }
}

// ===== Kubernetes Events for invalid annotations and policies =====

/// A Warning Event to create about one object.
struct EventRequest {
    /// Where the Event lives: the object's namespace, `default` for a cluster-scoped one
    /// (as kube-apiserver's own components do).
    namespace: String,
    object: corev1::ObjectReference,
    reason: &'static str,
    message: String,
}

impl EventRequest {
    fn describe(&self) -> String {
        format!(
            "{} {}",
            self.object.kind.as_deref().unwrap_or_default(),
            self.object.name.as_deref().unwrap_or_default()
        )
    }
}

/// Creates Kubernetes Events off the publishing path (a slow API server never delays etcd
/// writes; when the queue is full the Event is dropped, the log line and metric remain).
#[derive(Clone)]
struct EventReporter {
    tx: Option<mpsc::Sender<EventRequest>>,
}

impl EventReporter {
    fn spawn(
        client: kube::Client,
        holder: String,
        metrics: Arc<PublisherMetrics>,
        token: CancellationToken,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<EventRequest>(256);
        tokio::spawn(
            async move {
                loop {
                    let req = tokio::select! {
                        _ = token.cancelled() => return,
                        r = rx.recv() => match r { Some(r) => r, None => return },
                    };
                    match create_event(&client, &holder, &req).await {
                        Ok(()) => {
                            metrics.kube_events.inc();
                        }
                        Err(error) => {
                            metrics.kube_event_failures.inc();
                            warn!(object = %req.describe(), %error, "creating a Kubernetes Event failed");
                        }
                    };
                }
            }
            .instrument(info_span!("kube_events")),
        );
        Self { tx: Some(tx) }
    }

    fn disabled() -> Self {
        Self { tx: None }
    }

    fn report(&self, service: &ServiceInfo, problem: &AnnotationProblem) {
        self.send(EventRequest {
            namespace: service.key.namespace.clone(),
            object: corev1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(service.key.namespace.clone()),
                name: Some(service.key.name.clone()),
                uid: service.uid.clone(),
                ..Default::default()
            },
            reason: INVALID_ANNOTATION_REASON,
            message: problem.to_string(),
        });
    }

    fn report_policy(&self, policy: &PolicyInfo, reason: &'static str, message: String) {
        let resource = ResourceKind::of_policy(policy.kind);
        let namespace = (!policy.key.namespace.is_empty()).then(|| policy.key.namespace.clone());
        self.send(EventRequest {
            namespace: namespace.clone().unwrap_or_else(|| "default".into()),
            object: corev1::ObjectReference {
                api_version: Some(resource.api_version().into()),
                kind: Some(resource.as_str().into()),
                namespace,
                name: Some(policy.key.name.clone()),
                uid: policy.uid.clone(),
                ..Default::default()
            },
            reason,
            message,
        });
    }

    fn send(&self, req: EventRequest) {
        let Some(tx) = &self.tx else { return };
        let object = req.describe();
        if tx.try_send(req).is_err() {
            warn!(%object, "Kubernetes Event queue full; event dropped");
        }
    }
}

/// Reason of the Warning Event for a policy object that does not parse (not applied).
pub const INVALID_POLICY_REASON: &str = "InvalidPolicy";
/// Reason of the Warning Event for a policy with parts mesh cannot enforce (published; those
/// parts fail closed).
pub const POLICY_NOT_FULLY_ENFORCED_REASON: &str = "PolicyNotFullyEnforced";

/// Reason of the Warning Event for an invalid Cilium annotation.
pub const INVALID_ANNOTATION_REASON: &str = "InvalidAnnotation";

async fn create_event(
    client: &kube::Client,
    holder: &str,
    req: &EventRequest,
) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let api: Api<corev1::Event> = Api::namespaced(client.clone(), &req.namespace);
    let ev = corev1::Event {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                req.object.name.as_deref().unwrap_or("object"),
                now.as_nanosecond()
            )),
            namespace: Some(req.namespace.clone()),
            ..Default::default()
        },
        involved_object: req.object.clone(),
        reason: Some(req.reason.into()),
        message: Some(req.message.clone()),
        type_: Some("Warning".into()),
        source: Some(corev1::EventSource {
            component: Some("mesh-apiserver".into()),
            host: None,
        }),
        reporting_component: Some("mesh-apiserver".into()),
        reporting_instance: Some(holder.to_string()),
        first_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        last_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        count: Some(1),
        ..Default::default()
    };
    api.create(&PostParams::default(), &ev).await.map(|_| ())
}

// ===== the publisher =====

/// The publishing side of an apiserver: leader election plus one term per leadership.
pub struct Publisher {
    cfg: PublisherConfig,
    metrics: Arc<PublisherMetrics>,
    signal: LeaderSignal,
    is_leader: IsLeader,
}

impl Publisher {
    /// Creates the publisher and registers its metrics.
    pub fn new(cfg: PublisherConfig, registry: &mut Registry) -> Self {
        Self::with_metrics(cfg, PublisherMetrics::register(registry))
    }

    pub fn with_metrics(cfg: PublisherConfig, metrics: Arc<PublisherMetrics>) -> Self {
        let (signal, is_leader) = LeaderSignal::new();
        Self {
            cfg,
            metrics,
            signal,
            is_leader,
        }
    }

    /// Whether this replica publishes now (for `/readyz` and `Status`).
    pub fn is_leader(&self) -> IsLeader {
        self.is_leader.clone()
    }

    pub fn metrics(&self) -> Arc<PublisherMetrics> {
        self.metrics.clone()
    }

    /// Campaigns, publishes while leader, campaigns again after losing leadership; returns
    /// when `shutdown` is cancelled (resigning, so another replica takes over at once).
    pub async fn run(
        self,
        etcd: etcd_client::Client,
        kube: kube::Client,
        shutdown: CancellationToken,
    ) -> Result<()> {
        run(etcd, kube, self.cfg, self.metrics, self.signal, shutdown).await
    }
}

/// See [`Publisher::run`].
pub async fn run(
    etcd: etcd_client::Client,
    kube: kube::Client,
    cfg: PublisherConfig,
    metrics: Arc<PublisherMetrics>,
    signal: LeaderSignal,
    shutdown: CancellationToken,
) -> Result<()> {
    let span = info_span!("publisher", cluster = %cfg.cluster.name);
    run_terms(etcd, kube, cfg, metrics, signal, shutdown)
        .instrument(span)
        .await
}

async fn run_terms(
    etcd: etcd_client::Client,
    kube: kube::Client,
    cfg: PublisherConfig,
    metrics: Arc<PublisherMetrics>,
    signal: LeaderSignal,
    shutdown: CancellationToken,
) -> Result<()> {
    let keys = Keys::new(cfg.prefix.clone());
    let elector = Elector::new(
        etcd.clone(),
        LeaderConfig {
            key: keys.leader(),
            holder: cfg.holder.clone(),
            ttl: cfg.lease_ttl,
        },
        signal,
    );
    let events = if cfg.kube_events {
        EventReporter::spawn(
            kube.clone(),
            cfg.holder.clone(),
            metrics.clone(),
            shutdown.child_token(),
        )
    } else {
        EventReporter::disabled()
    };
    let mut reported = Reported::default();
    let mut retries =
        Backoff::equal_jitter(Duration::from_millis(200), Duration::from_secs(10)).retries();
    loop {
        let Some(leadership) = elector.campaign(&shutdown).await else {
            return Ok(());
        };
        metrics.leader.set(1);
        metrics.terms.inc();
        let term_token = shutdown.child_token();
        let lost = leadership.lost.clone();
        let tt = term_token.clone();
        let linker = tokio::spawn(async move {
            lost.cancelled().await;
            tt.cancel();
        });
        let mut term = Term::new(&cfg, &keys, metrics.clone(), events.clone(), &mut reported);
        let res = term
            .run(
                etcd.clone(),
                kube.clone(),
                leadership.fence.clone(),
                term_token.clone(),
            )
            .await;
        term_token.cancel();
        linker.abort();
        metrics.leader.set(0);
        for kind in mesh_proto::keys::PUBLISHED_KINDS {
            metrics
                .synced
                .get_or_create(&KindLabel {
                    kind: kind_name(kind).into(),
                })
                .set(0);
        }
        let lost_leadership = leadership.lost.is_cancelled();
        leadership.resign().await;
        match res {
            Ok(()) if shutdown.is_cancelled() => {
                info!("publisher stopped");
                return Ok(());
            }
            Ok(()) => warn!(lost_leadership, "publishing term ended; campaigning again"),
            Err(e) if e.is_fenced() => {
                warn!(error = %e, "lost leadership while writing; campaigning again")
            }
            Err(e) => {
                let delay = retries.next_delay(rand::random());
                error!(error = %e, retry_in = ?delay, "publishing term failed; campaigning again");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        }
        retries.reset();
    }
}

/// Inputs of each published kind: it is published once all of them are listed.
fn inputs(kind: pb::Kind) -> &'static [ResourceKind] {
    match kind {
        pb::Kind::Node => &[ResourceKind::Node],
        pb::Kind::Endpoint | pb::Kind::Identity => &[ResourceKind::Pod, ResourceKind::Namespace],
        pb::Kind::Service => &[ResourceKind::Service, ResourceKind::EndpointSlice],
        pb::Kind::Policy => &ResourceKind::POLICIES,
        // The link state is the importer's, never published from Kubernetes.
        pb::Kind::Config | pb::Kind::Link | pb::Kind::Unspecified => &[],
    }
}

/// How often endpoints whose identity allocation failed, and failed collections, are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Maximum number of watcher events applied before publishing (bounds latency under a
/// flood while still coalescing bursts).
const MAX_EVENTS_PER_BATCH: usize = 8192;

/// Problems already reported (log, metric, Event), kept across terms so a new term does not
/// repeat them: per Service, and per policy object.
#[derive(Default)]
struct Reported {
    services: HashSet<(KubeObjectKey, String)>,
    policies: HashSet<(PolicyKind, KubeObjectKey, String)>,
}

/// One leadership term.
struct Term<'a> {
    cfg: &'a PublisherConfig,
    keys: &'a Keys,
    cluster: ClusterName,
    metrics: Arc<PublisherMetrics>,
    events: EventReporter,
    reported: &'a mut Reported,
    model: ClusterModel,
    /// Endpoints this term published, with the identity each holds a reference on.
    endpoints: HashMap<IpAddr, IdentityId>,
    /// Endpoints whose identity could not be allocated: retried on every batch and on a
    /// timer; their keys in etcd (if any) are left alone meanwhile.
    retry: BTreeSet<IpAddr>,
    synced: HashSet<pb::Kind>,
    /// Sightings of the agents' status reports in this term.
    liveness: NodeLiveness,
    /// Nodes marked not reporting, and since when: what the published Node objects carry.
    /// Loaded from etcd at the term's start (kept until judged), then this term's marks.
    not_reporting: HashMap<String, SystemTime>,
}

impl<'a> Term<'a> {
    fn new(
        cfg: &'a PublisherConfig,
        keys: &'a Keys,
        metrics: Arc<PublisherMetrics>,
        events: EventReporter,
        reported: &'a mut Reported,
    ) -> Self {
        Self {
            cfg,
            keys,
            cluster: cfg.cluster.name.clone(),
            metrics,
            events,
            reported,
            model: ClusterModel::new(),
            endpoints: HashMap::new(),
            retry: BTreeSet::new(),
            synced: HashSet::new(),
            liveness: NodeLiveness::new(cfg.node_stale_intervals),
            not_reporting: HashMap::new(),
        }
    }

    async fn run(
        &mut self,
        etcd: etcd_client::Client,
        kube: kube::Client,
        fence: Fence,
        token: CancellationToken,
    ) -> Result<()> {
        let cluster = self.cluster.as_str().to_string();
        let mut store = EtcdStore::load(
            etcd.kv_client(),
            self.keys.clone(),
            &cluster,
            Some(fence.clone()),
            self.cfg.max_txn_ops.clone(),
        )
        .await?;
        let mut alloc = IdentityAllocator::load(
            etcd.kv_client(),
            self.keys.clone(),
            self.cluster.clone(),
            self.cfg.cluster.id,
            Some(fence),
            self.cfg.identity_gc_grace,
        )
        .await?;
        self.metrics.identities.set(alloc.len() as i64);
        self.not_reporting = marked_nodes(&store, self.keys, &cluster);
        info!(
            keys = store
                .keys_under(&self.keys.cluster_prefix(&cluster))
                .count(),
            identities = alloc.len(),
            "term started"
        );

        store.set(
            self.keys.object(&cluster, pb::Kind::Config, ""),
            encode::config(&self.cfg.cluster),
        );
        self.flush(&mut store, &token).await?;
        self.mark_synced(&mut store, pb::Kind::Config);
        self.flush(&mut store, &token).await?;

        let (tx, mut rx) = mpsc::channel(4096);
        let mut watchers =
            kube_source::spawn_watchers(kube, tx, self.metrics.clone(), token.child_token());
        let mut gc_timer = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
        let mut liveness_timer = tokio::time::interval(self.cfg.node_check_interval);
        liveness_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut agents = etcd.kv_client();
        // After a failed collection, wait before the next attempt.
        let mut gc_not_before = Instant::now();
        loop {
            let gc_at = if self.synced.contains(&pb::Kind::Endpoint) {
                alloc.next_gc_at()
            } else {
                None
            };
            if let Some(at) = gc_at {
                gc_timer.as_mut().reset(at.max(gc_not_before));
            }
            tokio::select! {
                _ = token.cancelled() => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else {
                        return Err(Error::WatchersStopped { cluster: self.cluster.clone() });
                    };
                    self.model.handle(ev);
                    let mut n = 1;
                    while n < MAX_EVENTS_PER_BATCH {
                        match rx.try_recv() {
                            Ok(ev) => { self.model.handle(ev); n += 1; }
                            Err(_) => break,
                        }
                    }
                    debug!(events = n, "applying a batch");
                    // Abandoned when the term ends (e.g. etcd hangs and the lease is lost).
                    tokio::select! {
                        r = self.publish(&mut store, &mut alloc, &token) => r?,
                        _ = token.cancelled() => break,
                    }
                }
                _ = &mut gc_timer, if gc_at.is_some() => {
                    let collected = tokio::select! {
                        r = alloc.gc(Instant::now()) => r,
                        _ = token.cancelled() => break,
                    };
                    match collected {
                        Ok(collected) => {
                            self.metrics.identities_collected.inc_by(collected.len() as u64);
                            self.metrics.identities.set(alloc.len() as i64);
                        }
                        Err(e @ identity::Error::Fenced { .. }) => return Err(e.into()),
                        Err(error) => {
                            warn!(%error, "collecting unused identities failed; retrying");
                            gc_not_before = Instant::now() + RETRY_INTERVAL;
                        }
                    }
                }
                _ = liveness_timer.tick() => {
                    tokio::select! {
                        r = self.check_nodes(&mut store, &mut agents, &token) => r?,
                        _ = token.cancelled() => break,
                    }
                }
                _ = tokio::time::sleep(RETRY_INTERVAL), if !self.retry.is_empty() => {
                    debug!(endpoints = self.retry.len(), "retrying endpoints without an identity");
                    tokio::select! {
                        r = self.publish(&mut store, &mut alloc, &token) => r?,
                        _ = token.cancelled() => break,
                    }
                }
                Some(_) = watchers.join_next() => {
                    if watchers.is_empty() && !token.is_cancelled() {
                        return Err(Error::WatchersStopped { cluster: self.cluster.clone() });
                    }
                }
            }
        }
        watchers.shutdown().await;
        Ok(())
    }

    fn ready(&self, kind: pb::Kind) -> bool {
        inputs(kind).iter().all(|k| self.model.is_synced(*k))
    }

    /// Publishes what the last batch of events changed, and the initial sync of every kind
    /// whose inputs just became listed.
    async fn publish(
        &mut self,
        store: &mut EtcdStore,
        alloc: &mut IdentityAllocator,
        token: &CancellationToken,
    ) -> Result<()> {
        let dirty = self.model.take_dirty();
        let cluster = self.cluster.as_str().to_string();
        let mut newly_synced = Vec::new();

        // Nodes.
        if self.ready(pb::Kind::Node) {
            let first = !self.synced.contains(&pb::Kind::Node);
            let names: Vec<String> = if first {
                self.model.node_names().cloned().collect()
            } else {
                dirty.nodes.iter().cloned().collect()
            };
            for name in &names {
                self.publish_node(store, &cluster, name);
            }
            if first {
                let desired: HashSet<String> = names
                    .iter()
                    .map(|n| self.keys.object(&cluster, pb::Kind::Node, n))
                    .collect();
                self.sweep(store, pb::Kind::Node, &desired);
                newly_synced.push(pb::Kind::Node);
            }
        }

        // Endpoints (and the identities they need).
        if self.ready(pb::Kind::Endpoint) {
            let first = !self.synced.contains(&pb::Kind::Endpoint);
            let mut ips: BTreeSet<IpAddr> = if first {
                self.model.endpoint_ips().copied().collect()
            } else {
                dirty.endpoints
            };
            ips.extend(std::mem::take(&mut self.retry));
            let now = Instant::now();
            for ip in ips {
                self.publish_endpoint(store, alloc, &cluster, ip, now)
                    .await?;
            }
            if first {
                let desired: HashSet<String> = self
                    .endpoints
                    .keys()
                    .chain(self.retry.iter())
                    .map(|ip| {
                        self.keys
                            .object(&cluster, pb::Kind::Endpoint, &ip.to_string())
                    })
                    .collect();
                self.sweep(store, pb::Kind::Endpoint, &desired);
                newly_synced.push(pb::Kind::Identity);
                newly_synced.push(pb::Kind::Endpoint);
            }
            self.metrics.identities.set(alloc.len() as i64);
        }

        // Policies.
        if self.ready(pb::Kind::Policy) {
            let first = !self.synced.contains(&pb::Kind::Policy);
            let policies: Vec<(PolicyKind, KubeObjectKey)> = if first {
                self.model
                    .policies()
                    .map(|p| (p.kind, p.key.clone()))
                    .collect()
            } else {
                dirty.policies.iter().cloned().collect()
            };
            let mut desired = HashSet::new();
            for (kind, key) in &policies {
                if let Some(k) = self.publish_policy(store, &cluster, *kind, key) {
                    desired.insert(k);
                }
            }
            if first {
                self.sweep(store, pb::Kind::Policy, &desired);
                newly_synced.push(pb::Kind::Policy);
            }
        }

        // Services.
        if self.ready(pb::Kind::Service) {
            let first = !self.synced.contains(&pb::Kind::Service);
            let svcs: Vec<KubeObjectKey> = if first {
                self.model.services().map(|s| s.key.clone()).collect()
            } else {
                dirty.services.iter().cloned().collect()
            };
            let mut desired = HashSet::new();
            for key in &svcs {
                let name = format!("{}/{}", key.namespace, key.name);
                let etcd_key = self.keys.object(&cluster, pb::Kind::Service, &name);
                self.report_problems(key);
                match self.model.global_service(&self.cluster, key) {
                    Some(gs) => {
                        store.set(etcd_key.clone(), encode::service(&gs));
                        desired.insert(etcd_key);
                    }
                    None => store.remove(&etcd_key),
                }
            }
            if first {
                self.sweep(store, pb::Kind::Service, &desired);
                newly_synced.push(pb::Kind::Service);
            }
        }

        self.flush(store, token).await?;
        if !newly_synced.is_empty() {
            for kind in &newly_synced {
                self.mark_synced(store, *kind);
            }
            self.flush(store, token).await?;
        }
        for kind in [
            pb::Kind::Node,
            pb::Kind::Endpoint,
            pb::Kind::Service,
            pb::Kind::Policy,
        ] {
            self.metrics
                .objects
                .get_or_create(&KindLabel {
                    kind: kind_name(kind).into(),
                })
                .set(store.count(kind) as i64);
        }
        self.metrics
            .objects
            .get_or_create(&KindLabel {
                kind: kind_name(pb::Kind::Identity).into(),
            })
            .set(alloc.len() as i64);
        Ok(())
    }

    /// Publishes (or removes) one node, with its not-reporting mark.
    fn publish_node(&self, store: &mut EtcdStore, cluster: &str, name: &str) {
        let key = self.keys.object(cluster, pb::Kind::Node, name);
        match self.model.node(name) {
            Some(n) => {
                let mut node = kube_source::build_node(&self.cluster, n);
                node.stale_since = self.not_reporting.get(name).copied();
                store.set(key, encode::node(&node));
            }
            None => store.remove(&key),
        }
    }

    /// Reads the agents' status records, judges every node, and republishes the nodes whose
    /// mark changed. A failed read is logged and retried at the next tick (nothing is
    /// judged from it).
    async fn check_nodes(
        &mut self,
        store: &mut EtcdStore,
        kv: &mut etcd_client::KvClient,
        token: &CancellationToken,
    ) -> Result<()> {
        // Nodes are judged once Kubernetes' nodes are listed: the first read after that is
        // the term's baseline.
        if !self.ready(pb::Kind::Node) {
            return Ok(());
        }
        let prefix = self.keys.agents_prefix();
        let resp = match kv
            .get(
                prefix.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
        {
            Ok(r) => r,
            Err(error) => {
                warn!(%error, "reading the agents' status reports failed; retrying");
                return Ok(());
            }
        };
        let now = Instant::now();
        let reports: Vec<Report> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let node = kv.key_str().ok()?.strip_prefix(prefix.as_str())?.to_owned();
                let status = match pb::AgentStatus::decode(kv.value()) {
                    Ok(s) => s,
                    Err(error) => {
                        debug!(%node, %error, "skipping an undecodable agent status");
                        return None;
                    }
                };
                Some(Report {
                    node,
                    revision: kv.mod_revision(),
                    interval: Duration::from_millis(status.status_interval_ms),
                })
            })
            .collect();
        self.liveness.observe(reports, now);
        self.liveness.retain(|n| self.model.node(n).is_some());
        let mut changed = Vec::new();
        for name in self.model.node_names() {
            let marked = self.not_reporting.contains_key(name);
            match self.liveness.judge(name, now) {
                Liveness::NotReporting if !marked => {
                    warn!(node = %name, "the node's agent stopped reporting: its backends are demoted");
                    self.not_reporting.insert(name.clone(), SystemTime::now());
                    changed.push(name.clone());
                }
                Liveness::Reporting if marked => {
                    info!(node = %name, "the node's agent reports again");
                    self.not_reporting.remove(name);
                    changed.push(name.clone());
                }
                _ => {}
            }
        }
        self.not_reporting
            .retain(|n, _| self.model.node(n).is_some());
        self.metrics
            .nodes_not_reporting
            .set(self.not_reporting.len() as i64);
        // Before the initial sync of nodes, the marks go out with it.
        if changed.is_empty() || !self.synced.contains(&pb::Kind::Node) {
            return Ok(());
        }
        let cluster = self.cluster.as_str().to_string();
        for name in &changed {
            self.publish_node(store, &cluster, name);
        }
        self.flush(store, token).await
    }

    async fn publish_endpoint(
        &mut self,
        store: &mut EtcdStore,
        alloc: &mut IdentityAllocator,
        cluster: &str,
        ip: IpAddr,
        now: Instant,
    ) -> Result<()> {
        let key = self
            .keys
            .object(cluster, pb::Kind::Endpoint, &ip.to_string());
        let previous = self.endpoints.get(&ip).copied();
        let Some(pod) = self.model.endpoint_pod(&ip) else {
            store.remove(&key);
            if let Some(old) = self.endpoints.remove(&ip) {
                alloc.release(old, now);
            }
            return Ok(());
        };
        let labels = self.model.identity_labels(&self.cluster, pod);
        let known = alloc.lookup(&labels).is_some();
        let id = match alloc.allocate(&labels).await {
            Ok(id) => id,
            Err(e @ identity::Error::Fenced { .. }) => return Err(e.into()),
            Err(error) => {
                // One pod's identity failing must not stop the others: leave its endpoint
                // as it is in etcd, say which pod, and retry.
                error!(pod = %pod.key, %ip, %error, "cannot allocate an identity; will retry");
                self.retry.insert(ip);
                return Ok(());
            }
        };
        if !known {
            self.metrics.identity_allocations.inc();
        }
        let ep = kube_source::build_endpoint(pod, ip, id);
        store.set(key, encode::endpoint(&ep));
        if previous != Some(id) {
            alloc.acquire(id);
            if let Some(old) = previous {
                alloc.release(old, now);
            }
            self.endpoints.insert(ip, id);
        }
        Ok(())
    }

    /// Publishes (or removes) one policy object; returns its etcd key when the key is to be
    /// kept (a valid object, or the last valid version of one that became invalid).
    fn publish_policy(
        &mut self,
        store: &mut EtcdStore,
        cluster: &str,
        kind: PolicyKind,
        key: &KubeObjectKey,
    ) -> Option<String> {
        let namespace = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
        let name = mesh_proto::keys::policy_name(kind, namespace, &key.name);
        let etcd_key = self.keys.object(cluster, pb::Kind::Policy, &name);
        let Some(info) = self.model.policy(kind, key).cloned() else {
            store.remove(&etcd_key);
            self.reported
                .policies
                .retain(|(k, o, _)| (*k, o) != (kind, key));
            return None;
        };
        match parse_policy(&info.object, &self.cluster) {
            Ok(policy) => {
                let findings = policy
                    .problems
                    .iter()
                    .map(|p| {
                        (
                            POLICY_NOT_FULLY_ENFORCED_REASON,
                            format!("{p} (this part fails closed)"),
                        )
                    })
                    .collect();
                self.report_policy(&info, findings);
                let value = PolicyObject {
                    object: info.object.to_string(),
                    policy,
                };
                store.set(etcd_key.clone(), pb::Policy::from(&value).encode_to_vec());
                Some(etcd_key)
            }
            Err(error) => {
                let kept = store.contains(&etcd_key);
                let message = if kept {
                    format!("{error} (not applied; the last valid version stays enforced)")
                } else {
                    format!("{error} (not applied)")
                };
                self.report_policy(&info, vec![(INVALID_POLICY_REASON, message)]);
                kept.then_some(etcd_key)
            }
        }
    }

    /// Reports each distinct finding of a policy object once: log, metric, Warning Event.
    fn report_policy(&mut self, info: &PolicyInfo, findings: Vec<(&'static str, String)>) {
        let current: HashSet<String> = findings.iter().map(|(r, m)| format!("{r}: {m}")).collect();
        // A fixed problem may be reported again if it comes back.
        self.reported
            .policies
            .retain(|(k, o, p)| (*k, o) != (info.kind, &info.key) || current.contains(p));
        for (reason, message) in findings {
            let id = (info.kind, info.key.clone(), format!("{reason}: {message}"));
            if self.reported.policies.insert(id) {
                warn!(kind = %info.kind, object = %info.key, reason, %message, "network policy problem");
                self.metrics
                    .policy_problems
                    .get_or_create(&PolicyProblemLabels {
                        kind: info.kind.as_str().into(),
                        reason: reason.into(),
                    })
                    .inc();
                self.events.report_policy(info, reason, message);
            }
        }
    }

    fn report_problems(&mut self, key: &KubeObjectKey) {
        let Some(svc) = self.model.service(key) else {
            self.reported.services.retain(|(k, _)| k != key);
            return;
        };
        let current: HashSet<String> = svc.problems.iter().map(ToString::to_string).collect();
        // A fixed problem may be reported again if it comes back.
        self.reported
            .services
            .retain(|(k, p)| k != key || current.contains(p));
        for problem in &svc.problems {
            if self
                .reported
                .services
                .insert((key.clone(), problem.to_string()))
            {
                warn!(service = %key, problem = %problem, "invalid service annotation");
                self.metrics.annotation_problems.inc();
                self.events.report(svc, problem);
            }
        }
    }

    /// Deletes the keys of `kind` etcd holds that are not `desired` (after the initial sync).
    fn sweep(&self, store: &mut EtcdStore, kind: pb::Kind, desired: &HashSet<String>) {
        let cluster = self.cluster.as_str();
        let prefix = self.keys.kind_prefix(cluster, kind);
        let stale: Vec<String> = store
            .keys_under(&prefix)
            .filter(|k| !desired.contains(*k))
            .filter(|k| matches!(self.keys.parse(k), Some(ClusterKey::Object { kind: k2, .. }) if k2 == kind))
            .cloned()
            .collect();
        if !stale.is_empty() {
            info!(
                kind = kind_name(kind),
                keys = stale.len(),
                "sweeping keys of objects that no longer exist"
            );
        }
        for k in stale {
            store.remove(&k);
        }
    }

    fn mark_synced(&mut self, store: &mut EtcdStore, kind: pb::Kind) {
        if !self.synced.insert(kind) {
            return;
        }
        let key = self.keys.synced(self.cluster.as_str(), kind);
        // An existing marker stays as it is: the data under it was never withdrawn.
        if !store.contains(&key) {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            store.set(key, pb::SyncedMarker { at_unix_ms: at }.encode_to_vec());
        }
        self.metrics
            .synced
            .get_or_create(&KindLabel {
                kind: kind_name(kind).into(),
            })
            .set(1);
        info!(kind = kind_name(kind), "initial sync published");
    }

    async fn flush(&self, store: &mut EtcdStore, token: &CancellationToken) -> Result<()> {
        if store.pending_len() == 0 {
            return Ok(());
        }
        let metrics = &self.metrics;
        let keys = self.keys;
        let stats = store
            .flush_retrying(token, |key, change| {
                let kind = match keys.parse(key) {
                    Some(ClusterKey::Object { kind, .. }) => kind_name(kind),
                    Some(ClusterKey::Synced { .. }) => "synced",
                    None => "other",
                };
                metrics.write(
                    kind,
                    if change == KeyChange::Deleted {
                        "delete"
                    } else {
                        "put"
                    },
                );
            })
            .await?;
        metrics.txns.inc_by(stats.txns as u64);
        debug!(
            puts = stats.puts,
            deletes = stats.deletes,
            txns = stats.txns,
            "flushed"
        );
        Ok(())
    }
}

/// The not-reporting marks the cluster's Node objects carry in etcd (`store`, as listed at a
/// term's start): a new term keeps them until it judges the nodes itself.
fn marked_nodes(store: &EtcdStore, keys: &Keys, cluster: &str) -> HashMap<String, SystemTime> {
    let prefix = keys.kind_prefix(cluster, pb::Kind::Node);
    store
        .keys_under(&prefix)
        .filter_map(|k| {
            let node = pb::Node::decode(store.get(k)?).ok()?;
            let ms = u64::try_from(node.stale_since_unix_ms)
                .ok()
                .filter(|ms| *ms > 0)?;
            Some((node.name, std::time::UNIX_EPOCH + Duration::from_millis(ms)))
        })
        .collect()
}

/// The policy path of a term with its real neighbours: a real etcd, the lab Kubernetes API
/// (for the Warning Events) and the model fed exactly what the policy watchers send. The
/// watchers themselves need an API serving the policy types, which the lab API does not
/// yet (tests/publish_kube.rs covers their absence).
#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::kube_source::{SlimObject, SourceEvent};
    use kube::api::ListParams;
    use mesh_lab::kube_api::{KubeApi, KubeApiConfig};
    use serde_json::json;

    const CLUSTER: &str = "east";

    struct Env {
        _etcd: mesh_testkit::etcd::Etcd,
        _dir: tempfile::TempDir,
        _api: mesh_lab::kube_api::KubeApiHandle,
        kv: etcd_client::KvClient,
        kube: kube::Client,
        cfg: PublisherConfig,
        keys: Keys,
    }

    async fn env() -> Env {
        let etcd = mesh_testkit::etcd::Etcd::start();
        let client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("etcd client");
        let dir = tempfile::tempdir().unwrap();
        let api = KubeApi::start(KubeApiConfig::new(dir.path().join("api"), CLUSTER))
            .await
            .expect("lab API");
        let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig_path()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let kube = kube::Client::try_from(config).unwrap();
        let ns: corev1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
        Api::<corev1::Namespace>::all(kube.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace shop");
        let cfg = PublisherConfig::new(ClusterConfig {
            name: ClusterName::new(CLUSTER).unwrap(),
            id: mesh_core::ClusterId::new(3).unwrap(),
            pod_cidrs: vec![],
            service_cidr: None,
            capabilities: vec![],
            version: "test".into(),
        });
        Env {
            _etcd: etcd,
            _dir: dir,
            _api: api,
            kv: client.kv_client(),
            kube,
            keys: Keys::new(cfg.prefix.clone()),
            cfg,
        }
    }

    fn policy(
        kind: ResourceKind,
        ns: Option<&str>,
        name: &str,
        spec: serde_json::Value,
    ) -> SlimObject {
        let mut metadata = json!({"name": name, "uid": format!("uid-{name}")});
        if let Some(ns) = ns {
            metadata["namespace"] = ns.into();
        }
        let obj = json!({"metadata": metadata, "spec": spec});
        SlimObject::Policy(kube_source::slim_policy(kind, obj))
    }

    async fn warnings(kube: &kube::Client, reason: &str) -> Vec<corev1::Event> {
        Api::<corev1::Event>::all(kube.clone())
            .list(&ListParams::default())
            .await
            .expect("listing events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    async fn until_warnings(kube: &kube::Client, reason: &str, n: usize) -> Vec<corev1::Event> {
        // The reporter creates Events off the publishing path; wait for them (bounded).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let evs = warnings(kube, reason).await;
            if evs.len() >= n {
                return evs;
            }
            assert!(
                Instant::now() < deadline,
                "{n} {reason} Events expected, got {evs:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn value(kv: &mut etcd_client::KvClient, key: &str) -> Option<pb::Policy> {
        let r = kv.get(key, None).await.unwrap();
        r.kvs()
            .first()
            .map(|kv| pb::Policy::decode(kv.value()).expect("a Policy value"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn policies_are_published_invalid_ones_reported_and_the_last_valid_kept() {
        let mut env = env().await;
        let metrics = Arc::new(PublisherMetrics::default());
        let token = CancellationToken::new();
        let events = EventReporter::spawn(
            env.kube.clone(),
            "test".into(),
            metrics.clone(),
            token.clone(),
        );
        let mut reported = Reported::default();
        let mut store = EtcdStore::load(env.kv.clone(), env.keys.clone(), CLUSTER, None, 128)
            .await
            .unwrap();
        let mut alloc = IdentityAllocator::load(
            env.kv.clone(),
            env.keys.clone(),
            env.cfg.cluster.name.clone(),
            env.cfg.cluster.id,
            None,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let mut term = Term::new(&env.cfg, &env.keys, metrics.clone(), events, &mut reported);
        let key = |kind, ns, name| {
            env.keys.object(
                CLUSTER,
                pb::Kind::Policy,
                &mesh_proto::keys::policy_name(kind, ns, name),
            )
        };
        let allow_key = key(PolicyKind::CiliumNetworkPolicy, Some("shop"), "allow-web");
        let broken_key = key(PolicyKind::NetworkPolicy, Some("shop"), "broken");
        let l7_key = key(PolicyKind::CiliumClusterwideNetworkPolicy, None, "l7");

        let allow = |port: &str| {
            policy(
                ResourceKind::CiliumNetworkPolicy,
                Some("shop"),
                "allow-web",
                json!({"endpointSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"fromEndpoints": [{}],
                                    "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}),
            )
        };
        // The initial lists: one of each kind.
        for (kind, obj) in [
            (ResourceKind::CiliumNetworkPolicy, allow("80")),
            (
                ResourceKind::NetworkPolicy,
                policy(
                    ResourceKind::NetworkPolicy,
                    Some("shop"),
                    "broken",
                    json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http x"}]}]}),
                ),
            ),
            (
                ResourceKind::CiliumClusterwideNetworkPolicy,
                policy(
                    ResourceKind::CiliumClusterwideNetworkPolicy,
                    None,
                    "l7",
                    json!({"endpointSelector": {},
                           "ingress": [{"toPorts": [{"ports": [{"port": "80"}],
                                                      "rules": {"http": [{"method": "GET"}]}}]}]}),
                ),
            ),
        ] {
            term.model.handle(SourceEvent::Init(kind));
            term.model.handle(SourceEvent::InitApply(obj));
            term.model.handle(SourceEvent::InitDone(kind));
        }
        term.publish(&mut store, &mut alloc, &token).await.unwrap();

        let published = value(&mut env.kv, &allow_key)
            .await
            .expect("allow-web published");
        assert_eq!(
            (
                published.cluster.as_str(),
                published.namespace.as_str(),
                published.name.as_str()
            ),
            (CLUSTER, "shop", "allow-web")
        );
        // What agents get re-parses to what the publisher validated.
        let reparsed = PolicyObject::try_from(published.clone()).expect("agents can parse it");
        assert_eq!(reparsed.policy.reference.object(), "shop/allow-web");
        assert_eq!(
            value(&mut env.kv, &broken_key).await,
            None,
            "invalid: not published"
        );
        assert!(
            value(&mut env.kv, &l7_key).await.is_some(),
            "unenforceable parts are published"
        );
        assert!(
            env.kv
                .get(env.keys.synced(CLUSTER, pb::Kind::Policy), None)
                .await
                .unwrap()
                .count()
                == 1,
            "synced/policies written"
        );

        let invalid = until_warnings(&env.kube, INVALID_POLICY_REASON, 1).await;
        let ev = &invalid[0];
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.involved_object.kind.as_deref(), Some("NetworkPolicy"));
        assert_eq!(ev.involved_object.name.as_deref(), Some("broken"));
        assert_eq!(ev.involved_object.uid.as_deref(), Some("uid-broken"));
        let msg = ev.message.as_deref().unwrap();
        assert!(
            msg.contains("spec.ingress[0].ports[0].port") && msg.contains("http x"),
            "{msg}"
        );
        let partial = until_warnings(&env.kube, POLICY_NOT_FULLY_ENFORCED_REASON, 1).await;
        let ev = &partial[0];
        assert_eq!(
            ev.involved_object.kind.as_deref(),
            Some("CiliumClusterwideNetworkPolicy")
        );
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"));
        assert!(ev.message.as_deref().unwrap().contains("rules"), "{ev:?}");
        assert_eq!(
            metrics.policy_problems(PolicyKind::NetworkPolicy, INVALID_POLICY_REASON),
            1
        );
        assert_eq!(
            metrics.policy_problems(
                PolicyKind::CiliumClusterwideNetworkPolicy,
                POLICY_NOT_FULLY_ENFORCED_REASON
            ),
            1
        );

        // allow-web becomes invalid: reported, and its last valid version stays published.
        term.model.handle(SourceEvent::Apply(allow("http x")));
        term.publish(&mut store, &mut alloc, &token).await.unwrap();
        assert_eq!(
            value(&mut env.kv, &allow_key).await,
            Some(published.clone())
        );
        let invalid = until_warnings(&env.kube, INVALID_POLICY_REASON, 2).await;
        let ev = invalid
            .iter()
            .find(|e| e.involved_object.name.as_deref() == Some("allow-web"))
            .expect("an Event on allow-web");
        assert!(
            ev.message
                .as_deref()
                .unwrap()
                .contains("the last valid version stays enforced"),
            "{ev:?}"
        );
        // The same problem again (any unrelated change re-publishes it): reported once.
        term.model.handle(SourceEvent::Apply(allow("http x")));
        term.publish(&mut store, &mut alloc, &token).await.unwrap();
        assert_eq!(
            metrics.policy_problems(PolicyKind::CiliumNetworkPolicy, INVALID_POLICY_REASON),
            1
        );

        // Fixed: the new version replaces the old one. Deleted: gone.
        term.model.handle(SourceEvent::Apply(allow("8080")));
        term.publish(&mut store, &mut alloc, &token).await.unwrap();
        let fixed = value(&mut env.kv, &allow_key).await.unwrap();
        assert!(fixed.object.contains("8080"), "{fixed:?}");
        term.model.handle(SourceEvent::Delete(
            ResourceKind::CiliumNetworkPolicy,
            KubeObjectKey::new("shop", "allow-web"),
        ));
        term.publish(&mut store, &mut alloc, &token).await.unwrap();
        assert_eq!(value(&mut env.kv, &allow_key).await, None);
        token.cancel();
    }
}
