//! mesh-agent: from the local apiserver to eBPF maps (DESIGN.md sections 5 and 9).
//!
//! [`run`] wires the parts together:
//!
//! - the resumable watch of the local mesh-apiserver (`mesh_proto::client`), feeding
//!   [`state::MeshState`] (every cluster's config, nodes, identities, endpoints, services);
//! - after a batch of updates (paced by [`pace::Pacer`]: at once on a quiet mesh, in a burst
//!   after a cool-down of a few reconcile durations, at most `--debounce`), [`desired::compute`] over the
//!   clusters that are synced, then [`reconcile::Reconciler`] applies the difference to the
//!   pinned maps and [`routes::RouteTable`] to the agent's routes;
//! - status reports to the apiserver (`ReportStatus`), `/metrics`, `/healthz`, `/readyz`.
//!
//! Nothing is programmed before the local cluster is synced and, until
//! `--initial-sync-timeout`, every cluster seen in the snapshot (mesh-core's sync gate,
//! `mesh_core::select::sync_gate`): after a restart the pinned maps keep serving the last
//! state until the new one is known, then only the difference is applied.

pub mod config;
pub mod datapath;
pub mod desired;
pub mod flows;
pub mod ipcache;
pub mod metrics;
pub mod pace;
pub mod policy;
pub mod reconcile;
pub mod routes;
/// The watched state of every cluster: mesh-proto's, shared with `meshctl service explain`.
pub use mesh_proto::state;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::ClusterName;
use mesh_core::select::GateInput;
use mesh_proto::client::{WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::pb::{self, mesh_client::MeshClient};
use mesh_proto::tls::{self, ClientEndpoint};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use config::{Args, Settings};

use crate::datapath::{Datapath, DatapathConfig};
use crate::metrics::{
    ClusterLabels, KindLabels, MapLabels, Metrics, OpLabels, Readiness, ReasonLabels,
};
use crate::reconcile::Reconciler;
use crate::routes::RouteTable;
use crate::state::{Applied, MeshState};

/// What a batch of watch updates asks of the agent's loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Needs {
    /// The programmed state may have changed.
    reconcile: bool,
    /// Only the status report's per-cluster counts moved.
    status: bool,
}

/// How soon the status report follows changes that need no reconcile (at most this often).
const STATUS_ONLY_INTERVAL: Duration = Duration::from_millis(250);

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("datapath: {0}")]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Metrics(#[from] mesh_proto::serve::HealthError),
    #[error("routes: {0}")]
    Routes(#[from] routes::Error),
    #[error("the watch of the local apiserver ended")]
    WatchEnded,
    #[error("Observer API on {addr}: {reason}")]
    Observer {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("--watch-record {}: {source}", path.display())]
    WatchRecord {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` is cancelled. The pinned maps, links and routes stay
/// when it returns: the datapath keeps serving the last state.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let flow_metrics = flows::FlowMetrics::register(&mut registry);
    let readiness = Readiness::default();
    readiness.set(false, "starting");
    let (_, health) = mesh_proto::serve::bind_health(
        settings.metrics_listen,
        Arc::new(registry),
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    // Its failure is logged where it happens; the agent keeps programming the datapath.
    tokio::spawn(health);

    // The watch starts before the datapath opens: the snapshot is received and applied to
    // the state while the programs load (a few hundred ms, on a blocking thread). Nothing
    // is programmed before the sync gate passes, in `Agent::run`, as before.
    let endpoint = settings.endpoint.clone();
    let connect = connect_fn(move || {
        let endpoint = endpoint.clone();
        async move { tls::connect(&endpoint).await.map(max_message_size) }
    });
    let recorder = match &settings.watch_record {
        Some(path) => {
            let file = mesh_proto::record::FileRecorder::create(path).map_err(|source| {
                Error::WatchRecord {
                    path: path.clone(),
                    source,
                }
            })?;
            let recorder: Arc<dyn mesh_proto::client::WatchRecorder> = Arc::new(file);
            Some(recorder)
        }
        None => None,
    };
    let options = WatchOptions {
        heartbeat_interval: settings.heartbeat_interval,
        recorder,
        ..WatchOptions::default()
    };
    let mut watch = spawn_watch(connect, pb::WatchRequest::default(), options);
    let mut state = MeshState::new(settings.cluster.clone());
    let mut dp_config = DatapathConfig::new(&settings.pin_dir, &settings.cgroup_path);
    dp_config.flow_iface = settings.flow_iface.clone();
    let mut open = tokio::task::spawn_blocking(move || Datapath::open(dp_config));
    let mut changed = false;
    let opened = loop {
        tokio::select! {
            opened = &mut open => break opened,
            batch = watch.recv_batch() => {
                let Some(batch) = batch else { return Err(Error::WatchEnded) };
                metrics.initial_sync.mark("first_message");
                for update in batch {
                    changed |= apply_update(&mut state, &metrics, update);
                }
            }
        }
    };
    let mut dp = match opened {
        Ok(dp) => dp?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("opening the datapath was cancelled: {e}"),
    };
    metrics.initial_sync.mark("datapath_open");
    info!(node = %settings.node, cluster = %settings.cluster, pin_dir = %settings.pin_dir.display(),
        links = ?dp.links(), "datapath ready");

    // Flows: the datapath's records, decorated into the node's ring, served to the relay.
    let flow_ctx: flows::SharedContext = Arc::new(std::sync::RwLock::new(Arc::new(
        flows::FlowContext::new(settings.cluster.clone(), settings.node.clone()),
    )));
    let flow_ring = Arc::new(flows::FlowRing::new(
        settings.flows.capacity,
        settings.flows.capacity.max(1024),
    ));
    if let Some(events) = dp.take_events() {
        let reader = flows::run_reader(
            events,
            flows::FlowSettings {
                rate: settings.flows.rate,
                burst: settings.flows.burst,
                stats_interval: Duration::from_secs(1),
            },
            flow_ctx.clone(),
            flow_ring.clone(),
            flow_metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(
            async move {
                if let Err(e) = reader.await {
                    error!(error = %e, "the flow reader stopped; no more flows on this node");
                }
            }
            .instrument(info_span!("flows")),
        );
    }
    let mut observer_address = String::new();
    if let Some((addr, advertise)) = settings.flows.listen.clone() {
        let observer_err = |reason: String| Error::Observer { addr, reason };
        let tls = match &settings.flows.tls {
            Some(files) => Some(
                tls::ServerTls::from_files(settings.cluster.clone(), files)
                    .map_err(|e| observer_err(e.to_string()))?,
            ),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| observer_err(e.to_string()))?;
        let observer = flows::observer::AgentObserver::new(
            flow_ring.clone(),
            format!("{}/{}", settings.cluster, settings.node),
            advertise.clone(),
            tls.clone(),
        );
        if let Some(tls) = &tls
            && let Some(files) = settings.flows.tls.clone()
        {
            // Certificates and CA bundles are reloaded without restart (DESIGN section 8).
            tokio::spawn(tls.clone().watch_files(files, Duration::from_secs(10)));
        }
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = flows::serve_observer(listener, observer, tls, stop).await {
                error!(error = %e, "the Observer API stopped");
            }
        });
        info!(%addr, %advertise, "serving Hubble's Observer API");
        observer_address = advertise;
    }

    let status = Arc::new(Mutex::new(pb::AgentStatus {
        node: settings.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        observer_address,
        // The publisher judges the node not reporting after --node-stale-intervals of these.
        status_interval_ms: u64::try_from(settings.status_interval.as_millis()).unwrap_or(u64::MAX),
        ..Default::default()
    }));
    let report_now = Arc::new(Notify::new());
    tokio::spawn(
        report_loop(
            settings.endpoint.clone(),
            status.clone(),
            report_now.clone(),
            settings.status_interval,
            metrics.clone(),
            shutdown.clone(),
        )
        .instrument(info_span!("status_report")),
    );

    let routes = match settings.routing {
        config::Routing::Native => Some(RouteTable::new()?),
        config::Routing::None => None,
    };
    let health_config = settings.health;
    let netns = crate::datapath::NetnsScanner::new(&settings.cgroup_path);
    let mut agent = Agent {
        netns,
        policy: crate::policy::PolicyReconciler::default(),
        cidr: mesh_core::policy::CidrIdentities::new(),
        policy_cache: crate::policy::PolicyCache::default(),
        ipcache: crate::ipcache::IpcacheBuilder::new(),
        services_cache: desired::ServicesCache::default(),
        stale_nodes: BTreeMap::new(),
        flow_inputs: None,
        unresolved_endpoints: 0,
        routes,
        settings,
        state,
        reconciler: Reconciler::new(dp),
        flow_ctx,
        health: mesh_core::health::HealthTracker::new(
            health_config,
            crate::datapath::boottime_ns(),
        ),
        quarantined: BTreeMap::new(),
        published_quarantines: None,
        metrics,
        readiness,
        status,
        report_now,
        programmed: false,
        last_error: None,
        failures: 0,
    };
    agent.run(watch, shutdown, changed).await
}

/// A reconcile with at least this many map operations (a first sync, a peer arriving or
/// leaving) is followed by giving the memory freed back to the system.
const LARGE_RECONCILE_OPS: u64 = 4096;

/// The shortest interval between two rebuilds of the flow context under churn (the flow
/// reader holds records back until the rebuild).
const FLOW_CONTEXT_INTERVAL: Duration = Duration::from_millis(100);

/// A cluster's nodes marked not reporting, and since when.
type StaleNodes = Vec<(String, std::time::SystemTime)>;

/// Where probes of quarantined backends report `(backend, connected)`.
type ProbeSender = tokio::sync::mpsc::UnboundedSender<(mesh_core::health::BackendAddr, bool)>;

fn max_message_size(c: MeshClient<Channel>) -> MeshClient<Channel> {
    c.max_decoding_message_size(256 * 1024 * 1024)
}

struct Agent {
    /// Finds the network namespaces of the node's pods (egress policy).
    netns: crate::datapath::NetnsScanner,
    /// What flow records are decorated with; rebuilt after reconciles, when the flow reader
    /// has records for it (`refresh_flow_context`).
    flow_ctx: flows::SharedContext,
    /// Passive backend health: the datapath's connect counters judged into quarantines.
    health: mesh_core::health::HealthTracker,
    /// The quarantines the maps were last programmed with.
    quarantined: BTreeMap<mesh_core::health::BackendAddr, mesh_core::health::Quarantine>,
    /// The quarantines last written to the quarantine map and the status (`None`: write
    /// again, after a failure or at the periodic resync).
    published_quarantines:
        Option<BTreeMap<mesh_core::health::BackendAddr, mesh_core::health::Quarantine>>,
    policy: crate::policy::PolicyReconciler,
    /// CIDR identities of the prefixes policies name, stable across compiles.
    cidr: mesh_core::policy::CidrIdentities,
    /// The last policy compilation, with the inputs it was made from.
    policy_cache: crate::policy::PolicyCache,
    /// The desired ipcache, kept up to date cluster by cluster.
    ipcache: crate::ipcache::IpcacheBuilder,
    /// The desired services and backends, computed again when their inputs moved.
    services_cache: desired::ServicesCache,
    /// Each programmed cluster's nodes marked not reporting, with the cluster's addresses
    /// generation they were read at.
    stale_nodes: BTreeMap<ClusterName, (Option<u64>, StaleNodes)>,
    /// The clusters and policy rules of the last reconcile, until the flow context is
    /// rebuilt from them.
    flow_inputs: Option<(
        std::collections::BTreeSet<ClusterName>,
        Option<Arc<mesh_core::policy::PolicyTables>>,
    )>,
    /// Local endpoints whose network namespace the last scan did not find.
    unresolved_endpoints: usize,
    settings: Settings,
    state: MeshState,
    reconciler: Reconciler<Datapath>,
    routes: Option<RouteTable>,
    metrics: Metrics,
    readiness: Readiness,
    status: Arc<Mutex<pb::AgentStatus>>,
    report_now: Arc<Notify>,
    /// The initial sync gate passed: the maps are being programmed.
    programmed: bool,
    last_error: Option<String>,
    /// Consecutive failed reconciles (for the retry backoff).
    failures: u32,
}

// === impl Agent ===

impl Agent {
    /// `changed`: updates applied before (while the datapath opened) changed the state.
    async fn run(
        &mut self,
        mut watch: mesh_proto::client::Watch,
        shutdown: CancellationToken,
        changed: bool,
    ) -> Result<(), Error> {
        let stats = watch.stats();
        let started = Instant::now();
        let initial_deadline = started + self.settings.initial_sync_timeout;
        let mut pacer = pace::Pacer::new(self.settings.debounce);
        let mut due: Option<Instant> = changed.then(|| pacer.due(Instant::now()));
        // A status report of changes that need no reconcile (see `on_updates`).
        let mut status_due: Option<Instant> = None;
        // When the flow context is rebuilt next, and when it last was.
        let mut flow_due: Option<Instant> = None;
        let mut flow_built: Option<Instant> = None;
        let flow_wanted = self
            .flow_ctx
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .wanted
            .clone();
        let mut timed_out = false;
        let mut resync = tokio::time::interval_at(
            started + self.settings.resync_interval,
            self.settings.resync_interval,
        );
        let mut reconnects = 0;
        let mut health_tick = tokio::time::interval(self.settings.health_interval);
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel();
        loop {
            tokio::select! {
                _ = health_tick.tick(), if self.programmed => {
                    if self.check_health(&probe_tx) {
                        due.get_or_insert_with(Instant::now);
                    }
                }
                Some((addr, ok)) = probe_rx.recv() => {
                    if self.on_probe(addr, ok) {
                        due.get_or_insert_with(Instant::now);
                    }
                }
                _ = shutdown.cancelled() => {
                    info!("shutting down; the pinned datapath keeps serving");
                    return Ok(());
                }
                batch = watch.recv_batch() => {
                    let Some(batch) = batch else { return Err(Error::WatchEnded) };
                    let needs = self.on_updates(batch);
                    if needs.reconcile {
                        due.get_or_insert_with(|| pacer.due(Instant::now()));
                    }
                    if needs.status {
                        status_due.get_or_insert_with(|| Instant::now() + STATUS_ONLY_INTERVAL);
                    }
                    let r = stats.reconnects();
                    if r > reconnects {
                        self.metrics.watch_reconnects.inc_by(r - reconnects);
                        reconnects = r;
                    }
                }
                _ = sleep_until(status_due) => {
                    status_due = None;
                    // A reconcile due meanwhile reports the status itself.
                    if due.is_none() {
                        self.update_status(None, false);
                    }
                }
                _ = sleep_until(due) => {
                    due = None;
                    let began = Instant::now();
                    let result = self.reconcile(started).await;
                    pacer.reconciled(began, Instant::now());

                    if let Err(retry_in) = result {
                        due = Some(Instant::now() + retry_in);
                    } else if self.unresolved_endpoints > 0 {
                        // A pod's namespace not found yet: look again soon, so its egress
                        // policy applies within a second of its process appearing.
                        due = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                _ = flow_wanted.notified(), if self.flow_inputs.is_some() => {
                    let now = Instant::now();
                    let at = flow_built.map_or(now, |b| (b + FLOW_CONTEXT_INTERVAL).max(now));
                    flow_due.get_or_insert(at);
                }
                _ = sleep_until(flow_due) => {
                    flow_due = None;
                    flow_built = Some(Instant::now());
                    self.refresh_flow_context();
                }
                _ = tokio::time::sleep_until(initial_deadline), if !self.programmed && !timed_out => {
                    // Program what is synced, even if some cluster never finishes its sync.
                    timed_out = true;
                    due.get_or_insert_with(Instant::now);
                }
                _ = resync.tick() => {
                    debug!("periodic resync: re-reading the maps and routes");
                    self.reconciler.invalidate();
                    self.policy.invalidate();
                    self.published_quarantines = None;
                    if let Some(table) = &mut self.routes {
                        table.invalidate();
                    }
                    due.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// Feeds the datapath's connect counters to the health tracker and starts the probes
    /// that are due (their results come back through `probes`); returns whether the set of
    /// quarantined backends changed (a quarantine began or ended).
    fn check_health(&mut self, probes: &ProbeSender) -> bool {
        let now = crate::datapath::boottime_ns();
        let counters = match self.reconciler.maps_mut().health_counters() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reading the backend health counters failed");
                return false;
            }
        };
        for (k, v) in counters {
            let protocol = match k.proto {
                6 => mesh_core::Protocol::Tcp,
                17 => mesh_core::Protocol::Udp,
                _ => continue,
            };
            let addr = mesh_core::health::BackendAddr {
                ip: std::net::Ipv4Addr::from(u32::from_be(k.ip)).into(),
                port: u16::from_be(k.port),
                protocol,
            };
            let sample = mesh_core::health::HealthSample {
                failures: v.failures,
                successes: v.successes,
                last_failure_ns: v.last_failure_ns,
                last_success_ns: v.last_success_ns,
            };
            if self.health.observe(addr, sample, now) {
                if self.health.quarantined(now).contains_key(&addr) {
                    self.metrics.backend_quarantines.inc();
                    warn!(backend = %addr.ip, port = addr.port, failures = v.failures,
                        "connects to the backend failed: quarantined on this node");
                } else {
                    info!(backend = %addr.ip, port = addr.port, "backend healthy again");
                }
            }
        }
        for addr in self.health.start_probes(now) {
            let (tx, timeout) = (probes.clone(), self.settings.probe_timeout);
            tokio::spawn(async move {
                let target = std::net::SocketAddr::new(addr.ip, addr.port);
                let ok = matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await,
                    Ok(Ok(_))
                );
                let _ = tx.send((addr, ok));
            });
        }
        let now_set = self.health.quarantined(now);
        !now_set.keys().eq(self.quarantined.keys())
    }

    /// A probe's result (see [`mesh_core::health::HealthTracker::start_probes`]); returns
    /// whether the quarantine ended.
    fn on_probe(&mut self, addr: mesh_core::health::BackendAddr, ok: bool) -> bool {
        let result = if ok { "success" } else { "failure" };
        self.metrics
            .quarantine_probes
            .get_or_create(&metrics::ProbeLabels { result })
            .inc();
        let ended = self
            .health
            .probe_result(addr, ok, crate::datapath::boottime_ns());
        if ended {
            info!(backend = %addr.ip, port = addr.port, "probe connected: backend healthy again");
        } else {
            debug!(backend = %addr.ip, port = addr.port, "probe failed: quarantined again");
        }
        ended
    }

    /// Writes the quarantines in force to `mesh_quarantine` (for `meshctl bpf lb list`),
    /// the metrics and the status report.
    fn publish_quarantines(&mut self) {
        // Unchanged since the last write (most reconciles under churn): nothing to do.
        if self.published_quarantines.as_ref() == Some(&self.quarantined) {
            return;
        }
        self.published_quarantines = Some(self.quarantined.clone());
        let now_boot = crate::datapath::boottime_ns();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut want = BTreeMap::new();
        let mut report = Vec::new();
        for (a, q) in &self.quarantined {
            let std::net::IpAddr::V4(ip) = a.ip else {
                continue;
            };
            let until_unix_ms = now_ms + q.until_ns.saturating_sub(now_boot) / 1_000_000;
            let proto = match a.protocol {
                mesh_core::Protocol::Tcp => 6,
                mesh_core::Protocol::Udp => 17,
                mesh_core::Protocol::Sctp => 132,
            };
            want.insert(
                crate::datapath::layout::HealthKey {
                    ip: u32::from(ip).to_be(),
                    port: a.port.to_be(),
                    proto,
                    pad: 0,
                },
                crate::datapath::layout::QuarantineValue {
                    until_unix_ms,
                    failures: u32::try_from(q.failures).unwrap_or(u32::MAX),
                    level: q.level,
                },
            );
            report.push(pb::BackendQuarantine {
                ip: ip.to_string(),
                port: u32::from(a.port),
                protocol: pb::Protocol::from(a.protocol).into(),
                until_unix_ms: until_unix_ms as i64,
                failures: q.failures,
            });
        }
        if let Err(e) = self.reconciler.maps_mut().set_quarantines(&want) {
            warn!(error = %e, "writing the quarantine map failed");
            self.published_quarantines = None;
        }
        self.metrics.backends_quarantined.set(want.len() as i64);
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .quarantines = report;
    }

    /// Applies a batch of updates (one message of the watch stream), in order; returns
    /// what they ask of the loop: a reconcile, or only a status report.
    fn on_updates(&mut self, batch: Vec<WatchUpdate>) -> Needs {
        if !self.programmed {
            self.metrics.initial_sync.mark("first_message");
        }
        let mut needs = Needs::default();
        for update in batch {
            // Once programming has begun, the objects of a cluster that has never synced
            // are left out of it (the sync gate) until its markers arrive, which asks for a
            // reconcile of their own: until then a change to them only moves the counts
            // of the status report. A peer's first snapshot (100k objects over seconds)
            // would otherwise recompute the programmed state hundreds of times for nothing.
            let left_out = self.programmed
                && match &update {
                    WatchUpdate::Upsert { cluster, .. } | WatchUpdate::Delete { cluster, .. } => {
                        !self.state.gate_programs(cluster)
                    }
                    _ => false,
                };
            if apply_update(&mut self.state, &self.metrics, update) {
                if left_out {
                    needs.status = true;
                } else {
                    needs.reconcile = true;
                }
            }
        }
        needs
    }

    /// Recomputes and applies the desired datapath; `Err(delay)` asks for a retry.
    async fn reconcile(&mut self, started: Instant) -> Result<(), Duration> {
        let local = self.settings.cluster.clone();
        let first = !self.programmed;
        let gate = GateInput {
            local_cluster: &local,
            deadline_passed: started.elapsed() >= self.settings.initial_sync_timeout,
            programming: self.programmed,
        };
        let clusters = match self.state.programmable(&gate) {
            Ok(clusters) => clusters,
            Err(waiting) => {
                // Nothing is programmed yet: the pinned maps keep their state.
                self.update_status(Some(waiting.to_string()), false);
                return Ok(());
            }
        };
        if first {
            info!(
                clusters = self.state.clusters().len(),
                all_synced = self.state.all_synced(),
                "initial sync done: programming the datapath"
            );
            self.programmed = true;
            self.metrics.initial_sync.mark("snapshot_applied");
        }

        let t0 = Instant::now();
        let programmed: std::collections::BTreeSet<ClusterName> =
            clusters.keys().cloned().collect();
        let node = self.settings.node.as_str();
        let metrics = &self.metrics;
        let builder = &mut self.ipcache;
        let state = &self.state;
        let addresses = |name: &ClusterName| state.cluster(name).map(|c| c.generations.addresses);
        // Two threads: this one computes the services, routes and policy while a second one
        // brings the ipcache up to date (under churn the ipcache builder only recomputes
        // the clusters that changed). The plan then writes the ipcache upserts first, a
        // large number of them beside the rest of the plan (`Reconciler::reconcile_changes`).
        let (ipcache_part, services_part) = std::thread::scope(|s| {
            let ipcache = s.spawn(|| {
                let changes = builder.update(&clusters, addresses, &local, node);
                if first {
                    metrics.initial_sync.mark("ipcache_computed");
                }
                changes
            });
            // The view's stale nodes, kept per cluster with its addresses generation.
            let cache = &mut self.stale_nodes;
            cache.retain(|name, _| clusters.contains_key(name));
            for (name, c) in &clusters {
                let g = state.cluster(name).map(|c| c.generations.addresses);
                if cache
                    .get(name)
                    .is_none_or(|(have, _)| g.is_none() || *have != g)
                {
                    cache.insert(name.clone(), (g, mesh_proto::state::stale_nodes(c)));
                }
            }
            let stale = cache
                .iter()
                .flat_map(|(n, (_, v))| v.iter().map(move |(node, t)| (n, node.as_str(), *t)));
            let view = mesh_proto::state::mesh_view_with(
                &clusters,
                &local,
                std::time::SystemTime::now(),
                stale,
            );
            let (desired, dropped) = self.services_cache.compute(
                &view,
                &clusters,
                |name| state.cluster(name).map(|c| c.generations),
                &local,
                node,
            );
            drop(view);
            let want_routes = self
                .routes
                .is_some()
                .then(|| routes::desired_routes(&clusters, &local, node));
            // Policy: compiled against the identities of the clusters programmed, again only
            // when its inputs changed.
            let policy = self
                .policy_cache
                .compile(&self.state, &clusters, &mut self.cidr);
            if first {
                metrics.initial_sync.mark("computed");
            }
            let ipcache_part = ipcache
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let services_part = (desired, dropped, want_routes, policy);
            (ipcache_part, services_part)
        });
        let mut ipcache_changes = ipcache_part;
        let (mut desired, mut dropped, want_routes, policy) = services_part;
        let mut error = None;
        // The policy's CIDR identities join the ipcache (under every endpoint and node
        // entry) before the policy maps name them.
        let policy_tables = match policy {
            policy::Compiled::Tables { tables, cidrs } => {
                let changes = self.ipcache.set_cidrs(cidrs);
                ipcache_changes = ipcache_changes.merge(changes);
                Some(tables)
            }
            policy::Compiled::Failed(e) => {
                error = Some(format!("policy: {e}"));
                None
            }
            policy::Compiled::NoLocalCluster => None,
        };
        dropped.extend(self.ipcache.dropped());
        // Lent to the desired state for this reconcile, returned at its end.
        desired.ipcache = self.ipcache.take();
        // Passive health: backends no service selects any more are forgotten (no probe, no
        // quarantine), and quarantined backends leave the services that have others.
        let selected: std::collections::BTreeSet<mesh_core::health::BackendAddr> = desired
            .services
            .values()
            .flatten()
            .map(|b| mesh_core::health::BackendAddr {
                ip: b.ip,
                port: b.port,
                protocol: b.proto,
            })
            .collect();
        self.health.retain(|a| selected.contains(a));
        self.quarantined = self.health.quarantined(crate::datapath::boottime_ns());
        desired::apply_quarantine(&mut desired, &self.quarantined);
        let computed = t0.elapsed();
        self.record_dropped(&dropped);
        let written = self
            .reconciler
            .reconcile_changes(&desired, &ipcache_changes);
        let mut large = false;
        match written {
            Ok(counts) => {
                if first {
                    self.metrics.initial_sync.mark("maps_written");
                    info!(
                        compute_ms = computed.as_millis() as u64,
                        maps_ms = (t0.elapsed() - computed).as_millis() as u64,
                        ipcache = desired.ipcache.len(),
                        services = desired.services.len(),
                        backends = desired.backends.len(),
                        "datapath programmed"
                    );
                }
                large = counts.values().sum::<u64>() >= LARGE_RECONCILE_OPS;
                for (op, n) in counts {
                    self.metrics
                        .map_operations
                        .get_or_create(&OpLabels { op: op.to_owned() })
                        .inc_by(n);
                }
            }
            Err(e) => {
                error!(error = %e, "reconciling the maps failed; retrying");
                self.metrics.reconcile_errors.inc();
                error = Some(format!("maps: {e}"));
            }
        }
        self.publish_quarantines();
        if let Some(tables) = &policy_tables
            && error.is_none()
            && let Err(e) = self.reconcile_policy(tables)
        {
            error!(error = %e, "reconciling the policy maps failed; retrying");
            self.metrics.reconcile_errors.inc();
            error = Some(format!("policy maps: {e}"));
        }
        if let (Some(table), Some(want)) = (&mut self.routes, want_routes) {
            match table.reconcile(&want).await {
                Ok(changes) if changes.errors.is_empty() => {}
                Ok(changes) => {
                    self.metrics
                        .route_errors
                        .inc_by(changes.errors.len() as u64);
                    let errors: Vec<String> =
                        changes.errors.iter().map(ToString::to_string).collect();
                    error.get_or_insert(format!("routes: {}", errors.join("; ")));
                }
                Err(e) => {
                    self.metrics.route_errors.inc();
                    error.get_or_insert(format!("routes: {e}"));
                }
            }
            if let Some(current) = table.current() {
                self.metrics.routes.set(current.len() as i64);
            }
        }
        self.metrics
            .reconcile_duration
            .observe(t0.elapsed().as_secs_f64());
        let failed = error.is_some();
        if failed {
            self.failures += 1;
        } else {
            self.failures = 0;
        }
        let changed_error = self.last_error != error;
        self.last_error = error;
        self.update_status(None, changed_error);
        if first {
            self.metrics.initial_sync.mark("finished");
        }
        if first || large {
            // A first sync, a peer arriving or leaving, a fresh snapshot: what they
            // allocated on the way is freed by now; give it back (see the function).
            let t = Instant::now();
            mesh_proto::serve::release_freed_memory();
            debug!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                "freed memory released"
            );
        }
        self.ipcache.put_back(std::mem::take(&mut desired.ipcache));
        // What flow records are decorated with follows the maps (see `refresh_flow_context`);
        // the reader holds records back until it does.
        self.flow_inputs = Some((programmed, policy_tables));
        self.flow_ctx
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .supersede();
        if failed {
            Err(Duration::from_millis(100 << self.failures.min(7)))
        } else {
            Ok(())
        }
    }

    /// Rebuilds what flow records are decorated with from the last reconcile's clusters and
    /// rules. Not on the datapath's path: when the flow reader asks for it (it has records
    /// and the context is superseded), at most every [`FLOW_CONTEXT_INTERVAL`] (a
    /// cluster's part is rebuilt when its addresses or identities changed: under the scale
    /// profile's churn, rebuilding after each of ~20 reconciles a second cost more than the
    /// reconciles' own ipcache work).
    fn refresh_flow_context(&mut self) {
        let Some((programmed, tables)) = self.flow_inputs.take() else {
            return;
        };
        let flow_ctx = flows::FlowContext::build(
            &self.settings.cluster,
            &self.settings.node,
            self.state
                .clusters()
                .iter()
                .filter(|(name, _)| programmed.contains(*name)),
            tables.as_ref().map(|t| &t.rules),
            Some(&self.flow_ctx.read().unwrap_or_else(|e| e.into_inner())),
        );
        *self.flow_ctx.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(flow_ctx);
    }

    /// Programs the policy maps: `tables`, and the namespaces of the node's endpoints.
    fn reconcile_policy(
        &mut self,
        tables: &mesh_core::policy::PolicyTables,
    ) -> Result<(), datapath::Error> {
        let endpoints = policy::local_endpoints(
            self.ipcache
                .cluster_entries(&self.settings.cluster)
                .iter()
                .map(|(p, i)| (p, i)),
        );
        let namespaces = self.netns.scan().unwrap_or_else(|e| {
            warn!(error = %e, cgroup = %self.settings.cgroup_path.display(),
                "cannot scan the cgroup for pod network namespaces");
            Vec::new()
        });
        let (want, missing) = policy::desired_policy(tables, &namespaces, &endpoints);
        if !missing.is_empty() {
            debug!(?missing, "local endpoints without a network namespace yet");
        }
        self.unresolved_endpoints = missing.len();
        let counts = self.policy.reconcile(self.reconciler.maps_mut(), &want)?;
        for (op, n) in counts {
            self.metrics
                .map_operations
                .get_or_create(&OpLabels { op: op.to_owned() })
                .inc_by(n);
        }
        Ok(())
    }

    fn record_dropped(&self, dropped: &[desired::Dropped]) {
        let mut by_reason: BTreeMap<&str, i64> = BTreeMap::new();
        for d in dropped {
            let reason = d.reason.label();
            debug!(entry = %d, "dropped");
            *by_reason.entry(reason).or_default() += 1;
        }
        self.metrics.dropped_entries.clear();
        for (reason, n) in by_reason {
            self.metrics
                .dropped_entries
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .set(n);
        }
    }

    /// Refreshes the status report, readiness and entry gauges; reports at once when the
    /// sync state or the error changed.
    fn update_status(&mut self, waiting: Option<String>, changed_error: bool) {
        let mut entries = BTreeMap::new();
        if let Some(m) = self.reconciler.mirror() {
            let (services, backends, ipcache) = m.entries();
            entries.insert("services".to_owned(), services as u64);
            entries.insert("backends".to_owned(), backends as u64);
            entries.insert("ipcache".to_owned(), ipcache as u64);
        }
        if let Some(r) = self.routes.as_ref().and_then(|t| t.current()) {
            entries.insert("routes".to_owned(), r.len() as u64);
        }
        for (map, n) in &entries {
            self.metrics
                .map_entries
                .get_or_create(&MapLabels { map: map.clone() })
                .set(*n as i64);
        }
        // Under churn this runs after every reconcile (hundreds per second with 250
        // clusters): compare the clusters' sync state with the report in place, and build
        // the report's copy (names as strings) only when it changed.
        let syncs: Vec<(&ClusterName, &mesh_proto::state::ClusterData, bool)> =
            self.state.sync_states().collect();
        let unsynced: Vec<&str> = syncs
            .iter()
            .filter(|(_, _, synced)| !synced)
            .map(|(n, _, _)| n.as_str())
            .collect();
        let report = |(name, c, synced): &(&ClusterName, &mesh_proto::state::ClusterData, bool)| {
            pb::ClusterSync {
                cluster: name.to_string(),
                synced: *synced,
                endpoints: c.state.endpoints.len() as u64,
                services: c.state.services.len() as u64,
            }
        };
        match (waiting, &self.last_error) {
            (Some(reason), _) => self.readiness.set(false, reason),
            (None, Some(e)) => self
                .readiness
                .set(false, format!("last reconcile failed: {e}")),
            (None, None) if !unsynced.is_empty() => self.readiness.set(
                false,
                format!("clusters not synced: {}", unsynced.join(", ")),
            ),
            (None, None) => self.readiness.set(true, ""),
        }
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let sync_changed = status.clusters.len() != syncs.len()
            || !status
                .clusters
                .iter()
                .zip(&syncs)
                .all(|(have, (name, c, synced))| {
                    have.cluster == name.as_str()
                        && have.synced == *synced
                        && have.endpoints == c.state.endpoints.len() as u64
                        && have.services == c.state.services.len() as u64
                });
        // One gauge per cluster: set when a cluster's sync state or counts changed, not on
        // every reconcile (250 label sets looked up each time under churn).
        if sync_changed {
            let clusters: Vec<pb::ClusterSync> = syncs.iter().map(report).collect();
            for c in &clusters {
                self.metrics
                    .cluster_synced
                    .get_or_create(&ClusterLabels {
                        cluster: c.cluster.clone(),
                    })
                    .set(i64::from(c.synced));
            }
            status.clusters = clusters;
        }
        status.map_entries = entries.into_iter().collect();
        status.last_error = self.last_error.clone().unwrap_or_default();
        drop(status);
        if sync_changed || changed_error {
            self.report_now.notify_one();
        }
    }
}

/// Applies one update to `state` (logged, counted); returns whether a reconcile is needed.
fn apply_update(state: &mut MeshState, metrics: &Metrics, update: WatchUpdate) -> bool {
    match &update {
        WatchUpdate::Connected { resumed, revision } => {
            info!(resumed, revision, "watching the local apiserver");
        }
        WatchUpdate::Disconnected { error } => {
            warn!(%error, "lost the local apiserver; the datapath keeps its state");
        }
        WatchUpdate::Reset { reason } => {
            info!(%reason, "watch reset: a fresh snapshot follows");
        }
        _ => {}
    }
    match state.apply(update) {
        Applied::Changed => true,
        Applied::ClusterSynced(cluster) => {
            metrics
                .cluster_synced
                .get_or_create(&ClusterLabels {
                    cluster: cluster.to_string(),
                })
                .set(1);
            true
        }
        Applied::Unchanged => false,
        Applied::Rejected { kind, .. } => {
            metrics
                .rejected_objects
                .get_or_create(&KindLabels {
                    kind: state::kind_name(kind).to_owned(),
                })
                .inc();
            false
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        // Due now (the pacer's answer to a lone change): a timer would round up to the next
        // millisecond tick of tokio's wheel.
        Some(at) if at <= Instant::now() => {}
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends the status every `interval` and whenever `now` is notified.
async fn report_loop(
    endpoint: ClientEndpoint,
    status: Arc<Mutex<pb::AgentStatus>>,
    now: Arc<Notify>,
    interval: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut client: Option<MeshClient<Channel>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = now.notified() => {}
        }
        let mut report = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        report.reported_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if client.is_none() {
            match tls::connect(&endpoint).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    warn!(error = %e, "cannot reach the apiserver to report status");
                    metrics.status_report_errors.inc();
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        match tokio::time::timeout(Duration::from_secs(10), c.report_status(report)).await {
            Ok(Ok(_)) => {
                debug!("status reported");
                metrics.status_reports.inc();
            }
            Ok(Err(status)) => {
                warn!(code = ?status.code(), message = status.message(), "status report refused");
                metrics.status_report_errors.inc();
            }
            Err(_) => {
                warn!("status report timed out");
                metrics.status_report_errors.inc();
                client = None;
            }
        }
    }
}
