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
//! Nothing is deleted before the initial sync, and a value equal to the one in etcd is not
//! rewritten, so a restart neither makes objects blink nor produces write churn.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as corev1;
use kube::api::{Api, PostParams};
use mesh_core::Backoff;
use mesh_core::annotations::AnnotationProblem;
use mesh_core::{ClusterConfig, ClusterName, IdentityId};
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::identity::{self, IdentityAllocator};
use crate::kube_source::{self, ClusterModel, ObjKey, ResourceKind, ServiceInfo};
use crate::leader::{self, Elector, IsLeader, LeaderConfig, LeaderSignal};
use crate::store::{self, Change, EtcdStore, Fence};

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
    /// Operations per etcd transaction (at most etcd's default 128).
    pub max_txn_ops: usize,
    /// Create Kubernetes Events for invalid annotations.
    pub kube_events: bool,
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
            max_txn_ops: store::DEFAULT_MAX_TXN_OPS,
            kube_events: true,
        }
    }
}

// ===== metrics =====

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: String,
    op: String,
}

/// The publisher's metrics, all named `mesh_publisher_*`.
#[derive(Debug, Default)]
pub struct PublisherMetrics {
    objects: Family<KindLabel, Gauge>,
    writes: Family<WriteLabels, Counter>,
    txns: Counter,
    annotation_problems: Counter,
    decode_failures: Family<KindLabel, Counter>,
    watch_errors: Family<KindLabel, Counter>,
    synced: Family<KindLabel, Gauge>,
    identities: Gauge,
    identity_allocations: Counter,
    identities_collected: Counter,
    leader: Gauge,
    terms: Counter,
    kube_events: Counter,
    kube_event_failures: Counter,
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

    pub fn txns(&self) -> u64 {
        self.txns.get()
    }

    fn write(&self, kind: &str, op: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.into(),
                op: op.into(),
            })
            .inc();
    }
}

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

// ===== Kubernetes Events for invalid annotations =====

struct EventRequest {
    service: ObjKey,
    uid: Option<String>,
    problem: AnnotationProblem,
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
                            warn!(service = %req.service, %error, "creating a Kubernetes Event failed");
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
        let Some(tx) = &self.tx else { return };
        let req = EventRequest {
            service: service.key.clone(),
            uid: service.uid.clone(),
            problem: problem.clone(),
        };
        if tx.try_send(req).is_err() {
            warn!(service = %service.key, "Kubernetes Event queue full; event dropped");
        }
    }
}

/// Reason of the Warning Event for an invalid Cilium annotation.
pub const INVALID_ANNOTATION_REASON: &str = "InvalidAnnotation";

async fn create_event(
    client: &kube::Client,
    holder: &str,
    req: &EventRequest,
) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let api: Api<corev1::Event> = Api::namespaced(client.clone(), &req.service.namespace);
    let ev = corev1::Event {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(format!("{}.{:x}", req.service.name, now.as_nanosecond())),
            namespace: Some(req.service.namespace.clone()),
            ..Default::default()
        },
        involved_object: corev1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(req.service.namespace.clone()),
            name: Some(req.service.name.clone()),
            uid: req.uid.clone(),
            ..Default::default()
        },
        reason: Some(INVALID_ANNOTATION_REASON.into()),
        message: Some(req.problem.to_string()),
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
    let mut reported: HashSet<(ObjKey, String)> = HashSet::new();
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
        for kind in mesh_proto::keys::ALL_KINDS {
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
        pb::Kind::Config | pb::Kind::Unspecified => &[],
    }
}

/// How often endpoints whose identity allocation failed, and failed collections, are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Maximum number of watcher events applied before publishing (bounds latency under a
/// flood while still coalescing bursts).
const MAX_EVENTS_PER_BATCH: usize = 8192;

/// One leadership term.
struct Term<'a> {
    cfg: &'a PublisherConfig,
    keys: &'a Keys,
    cluster: ClusterName,
    metrics: Arc<PublisherMetrics>,
    events: EventReporter,
    reported: &'a mut HashSet<(ObjKey, String)>,
    model: ClusterModel,
    /// Endpoints this term published, with the identity each holds a reference on.
    endpoints: HashMap<IpAddr, IdentityId>,
    /// Endpoints whose identity could not be allocated: retried on every batch and on a
    /// timer; their keys in etcd (if any) are left alone meanwhile.
    retry: BTreeSet<IpAddr>,
    synced: HashSet<pb::Kind>,
}

impl<'a> Term<'a> {
    fn new(
        cfg: &'a PublisherConfig,
        keys: &'a Keys,
        metrics: Arc<PublisherMetrics>,
        events: EventReporter,
        reported: &'a mut HashSet<(ObjKey, String)>,
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
            self.cfg.max_txn_ops,
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
                let key = self.keys.object(&cluster, pb::Kind::Node, name);
                match self.model.node(name) {
                    Some(n) => store.set(
                        key,
                        encode::node(&kube_source::build_node(&self.cluster, n)),
                    ),
                    None => store.remove(&key),
                }
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

        // Services.
        if self.ready(pb::Kind::Service) {
            let first = !self.synced.contains(&pb::Kind::Service);
            let svcs: Vec<ObjKey> = if first {
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
        for kind in [pb::Kind::Node, pb::Kind::Endpoint, pb::Kind::Service] {
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
        let labels = kube_source::pod_identity_labels(&self.cluster, pod);
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

    fn report_problems(&mut self, key: &ObjKey) {
        let Some(svc) = self.model.service(key) else {
            self.reported.retain(|(k, _)| k != key);
            return;
        };
        let current: HashSet<String> = svc.problems.iter().map(ToString::to_string).collect();
        // A fixed problem may be reported again if it comes back.
        self.reported
            .retain(|(k, p)| k != key || current.contains(p));
        for problem in &svc.problems {
            if self.reported.insert((key.clone(), problem.to_string())) {
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
                    if change == Change::Deleted {
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
