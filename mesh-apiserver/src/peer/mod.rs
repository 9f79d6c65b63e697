//! The peer importer (DESIGN.md sections 2, 6, 8, 10): keeps a copy of every peer cluster's
//! own data in our etcd, under `clusters/<peer>/`, as a relay cache.
//!
//! - **Configuration** comes from a [`PeerSource`] (a Kubernetes Secret written by
//!   `meshctl connect`, or a directory of files), applied live: see [`source`] for the
//!   format. Every replica registers the peers' CAs in its server trust store (so peers can
//!   connect to any replica); only the leader imports.
//! - **Per peer** one task dials the peer's apiserver (DNS names are resolved with hickory on
//!   every reconnect; IP literals bypass DNS), authenticating with this apiserver's own
//!   certificate and requiring `spiffe://<peer>.mesh/apiserver` under the peer's CA. Before
//!   anything is imported, on every (re)connection, `Info` must name the configured peer and
//!   pass [`mesh_core::validate::check_joins`] against the local cluster and every other
//!   accepted peer; a refusal names both clusters and the values, and is recorded in the peer
//!   status (`last_error`), `mesh_apiserver_peer_refusals_total{peer,reason}` and the log,
//!   then retried slowly ([`ImporterOptions::refusal_retry`]).
//! - **Import**: only the peer's own cluster is requested; changes are written in
//!   transactions of at most 128 operations, with the synced markers. Identities (and
//!   endpoints) outside the peer's identity range and objects naming another cluster are
//!   dropped and counted. The resume revision is persisted in the peer status once the data
//!   up to it is in etcd, so a restarted importer (or a new leader) resumes instead of taking
//!   a new snapshot.
//! - **Staleness**: while the peer is unreachable its data is kept and the status says since
//!   when (`stale_since`); after [`ImporterOptions::stale_ttl`] the data is withdrawn, and
//!   the next connection imports a fresh snapshot. A peer removed from the configuration is
//!   withdrawn at once, with its status and its CA.
//!
//! Only the leader writes; the importer tasks stop as soon as leadership is lost (they are
//! not fenced like the publisher: a deposed leader may finish the transaction in flight,
//! which the next leader's importer overwrites with the peer's current state).

/// The importer's metrics live with the crate's others, in `crate::metrics`.
pub use crate::metrics;
pub mod source;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Args as ClapArgs;
use mesh_core::{ClusterConfig, ClusterName};
use mesh_proto::client::{Backoff, WatchOptions};
use mesh_proto::keys::Keys;
use mesh_proto::pb;
use mesh_proto::tls::{self, ServerTls};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

pub use mesh_proto::peer_entry::{PeerSet, PeerSpec};
pub use metrics::PeerMetrics;
pub use source::PeerSource;
pub use worker::PeerError;

use crate::etcd_write::GroupWriter;
use mesh_core::parse_duration;
use worker::{Shared, Worker, withdraw};

/// The default stale TTL: 10 minutes.
///
/// A peer that stops answering is usually still serving traffic: its apiserver is being
/// restarted or upgraded, its load balancer failed over, or the link between the clusters
/// flapped. Withdrawing its endpoints then would turn a control-plane hiccup into a
/// data-plane outage for every global service with backends there, so the TTL must be well
/// above routine restarts and rollouts (seconds to a few minutes). But the longer stale
/// endpoints are kept, the likelier their pod IPs have been reused by other pods in the peer
/// (busy clusters recycle IPs within tens of minutes), and traffic would reach the wrong
/// workload; 10 minutes bounds that window. Operators who prefer never to withdraw pass
/// `--peer-stale-ttl 0`.
pub const DEFAULT_STALE_TTL: Duration = Duration::from_secs(600);

/// Peer importer flags.
#[derive(Debug, Clone, ClapArgs)]
pub struct PeerArgs {
    /// The Secret holding the peers, `<namespace>/<name>` (one `<cluster>.yaml` key per peer).
    #[arg(
        long,
        env = "MESH_PEERS_SECRET",
        default_value = "kube-system/mesh-peers"
    )]
    pub peers_secret: String,

    /// Read the peers from `<cluster>.yaml` files of this directory instead of the Secret.
    #[arg(long, env = "MESH_PEERS_DIR")]
    pub peers_dir: Option<PathBuf>,

    /// How often --peers-dir is re-read.
    #[arg(long, env = "MESH_PEERS_DIR_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub peers_dir_interval: Duration,

    /// A peer unreachable for this long has its data withdrawn; 0 keeps it forever.
    #[arg(long, env = "MESH_PEER_STALE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub peer_stale_ttl: Duration,

    /// How often a refused peer (name, ID, CIDR or certificate conflict) is checked again.
    #[arg(long, env = "MESH_PEER_REFUSAL_RETRY", default_value = "30s", value_parser = parse_duration)]
    pub peer_refusal_retry: Duration,

    /// Interval of peer status updates in etcd (and metrics).
    #[arg(long, env = "MESH_PEER_STATUS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub peer_status_interval: Duration,

    /// Heartbeat interval asked of each peer's apiserver (100ms..60s). A peer that sends
    /// nothing for three intervals is lost: marked stale at once, so this cluster's agents
    /// demote its backends below every fresh one. Loss detection is bounded by 3 intervals.
    #[arg(long, env = "MESH_PEER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub peer_heartbeat_interval: Duration,

    /// etcd transactions the importer keeps in flight, all peers together (a snapshot is
    /// hundreds of them); small batches of many peers share one transaction meanwhile.
    /// 1 writes them one at a time.
    #[arg(long, env = "MESH_PEER_TXNS_IN_FLIGHT", default_value_t = DEFAULT_PEER_TXNS_IN_FLIGHT)]
    pub peer_txns_in_flight: usize,

    /// Record each peer's watch (every message received, every update delivered) to
    /// `<dir>/<peer>.rec`, for the watch-history checker (tests; `mesh_proto::record`).
    #[arg(long, env = "MESH_PEER_WATCH_RECORD_DIR", hide = true)]
    pub peer_watch_record_dir: Option<PathBuf>,
}

impl Default for PeerArgs {
    fn default() -> Self {
        Self {
            peers_secret: "kube-system/mesh-peers".into(),
            peers_dir: None,
            peers_dir_interval: Duration::from_secs(2),
            peer_stale_ttl: DEFAULT_STALE_TTL,
            peer_refusal_retry: Duration::from_secs(30),
            peer_status_interval: Duration::from_secs(1),
            peer_heartbeat_interval: DEFAULT_PEER_HEARTBEAT,
            peer_txns_in_flight: DEFAULT_PEER_TXNS_IN_FLIGHT,
            peer_watch_record_dir: None,
        }
    }
}

/// The default heartbeat interval asked of peers: a lost peer is stale within 3 s, which
/// leaves room inside DESIGN.md section 13b's 5 s goal for the status write and the agents'
/// reconcile, at one small message per second per idle peer stream.
pub const DEFAULT_PEER_HEARTBEAT: Duration = Duration::from_secs(1);

/// etcd transactions the importer keeps in flight. A peer's snapshot is hundreds of
/// transactions (951 for 100k endpoints); one at a time, each waits for the previous commit
/// and etcd sits idle between them. With 8 the writes run at etcd's own batched write rate
/// (measured in `mesh-bench initial-sync --via-importer`: 1 in flight 10.4 s, 4 7.8 s, 8
/// 6.3 s, 16 and 32 no clearly better); more only queue in etcd. They share the client's
/// HTTP/2 connection.
pub const DEFAULT_PEER_TXNS_IN_FLIGHT: usize = 8;

/// The heartbeat intervals a peer serves (the server clamps what it is asked to these).
pub const PEER_HEARTBEAT_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));

/// Errors of the importer's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ImporterError {
    #[error("--peers-secret {0:?}: expected <namespace>/<name>")]
    SecretName(String),
    #[error("{flag}: must be greater than zero")]
    Zero { flag: &'static str },
    #[error(
        "--peer-heartbeat-interval {value:?}: must be between {min:?} and {max:?} (what a peer serves)"
    )]
    HeartbeatRange {
        value: Duration,
        min: Duration,
        max: Duration,
    },
}

// === impl PeerArgs ===

impl PeerArgs {
    /// The importer options these flags describe.
    pub fn options(&self) -> Result<ImporterOptions, ImporterError> {
        if self.peer_txns_in_flight == 0 {
            return Err(ImporterError::Zero {
                flag: "--peer-txns-in-flight",
            });
        }
        for (flag, d) in [
            ("--peer-refusal-retry", self.peer_refusal_retry),
            ("--peer-status-interval", self.peer_status_interval),
            ("--peers-dir-interval", self.peers_dir_interval),
        ] {
            if d.is_zero() {
                return Err(ImporterError::Zero { flag });
            }
        }
        let (min, max) = PEER_HEARTBEAT_BOUNDS;
        let heartbeat = self.peer_heartbeat_interval;
        if heartbeat < min || heartbeat > max {
            return Err(ImporterError::HeartbeatRange {
                value: heartbeat,
                min,
                max,
            });
        }
        let defaults = ImporterOptions::default();
        Ok(ImporterOptions {
            stale_ttl: (!self.peer_stale_ttl.is_zero()).then_some(self.peer_stale_ttl),
            refusal_retry: self.peer_refusal_retry,
            status_interval: self.peer_status_interval,
            watch: WatchOptions {
                heartbeat_interval: heartbeat,
                ..defaults.watch.clone()
            },
            txns_in_flight: self.peer_txns_in_flight,
            record_dir: self.peer_watch_record_dir.clone(),
            ..defaults
        })
    }

    /// The source: the directory when given, else the Secret (needs `kube`).
    pub fn source(&self, kube: Option<kube::Client>) -> Result<Option<PeerSource>, ImporterError> {
        if let Some(path) = &self.peers_dir {
            return Ok(Some(PeerSource::Dir {
                path: path.clone(),
                interval: self.peers_dir_interval,
            }));
        }
        let (namespace, name) = self
            .peers_secret
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| ImporterError::SecretName(self.peers_secret.clone()))?;
        Ok(kube.map(|client| PeerSource::Secret {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }))
    }
}

/// Tuning of the importer.
#[derive(Debug, Clone)]
pub struct ImporterOptions {
    /// `None`: never withdraw a stale peer. See [`DEFAULT_STALE_TTL`].
    pub stale_ttl: Option<Duration>,
    pub refusal_retry: Duration,
    pub status_interval: Duration,
    /// The resumable client's options (heartbeat, backoff).
    pub watch: WatchOptions,
    pub connect_timeout: Duration,
    /// Operations per etcd transaction: etcd's limit as probed at start, shared with the
    /// publisher (default [`crate::store::DEFAULT_TXN_OPS`], unprobed).
    pub max_txn_ops: crate::store::TxnOps,
    /// etcd transactions in flight (at least 1): the group writer's bound, and each peer's
    /// (its first batch, plus the shared permits); see [`DEFAULT_PEER_TXNS_IN_FLIGHT`].
    pub txns_in_flight: usize,
    /// Record each peer's watch to `<dir>/<peer>.rec` (`--peer-watch-record-dir`).
    pub record_dir: Option<PathBuf>,
}

impl Default for ImporterOptions {
    fn default() -> Self {
        Self {
            stale_ttl: Some(DEFAULT_STALE_TTL),
            refusal_retry: Duration::from_secs(30),
            status_interval: Duration::from_secs(1),
            watch: WatchOptions {
                heartbeat_interval: DEFAULT_PEER_HEARTBEAT,
                backoff: Backoff::full_jitter(Duration::from_millis(200), Duration::from_secs(30)),
                ..WatchOptions::default()
            },
            connect_timeout: Duration::from_secs(5),
            max_txn_ops: crate::store::TxnOps::default(),
            txns_in_flight: DEFAULT_PEER_TXNS_IN_FLIGHT,
            record_dir: None,
        }
    }
}

/// This apiserver's own certificate and key (`spiffe://<self>.mesh/apiserver`), read on
/// every dial so a rotation is picked up.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What the importer knows about one peer (also written to etcd as `pb::PeerStatus`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerStats {
    pub address: String,
    pub connected: bool,
    pub synced: bool,
    pub stale_since: Option<SystemTime>,
    pub last_error: String,
    /// The last refusal's message, until the next successful connection.
    pub last_refusal: Option<String>,
    /// The peer revision everything up to which is in our etcd (the persisted resume point).
    pub revision: i64,
    /// The watch client's resume revision (may be ahead of `revision` until written).
    pub watch_revision: i64,
    pub reconnects: u64,
    pub snapshots: u64,
    pub resumes: u64,
    pub withdrawals: u64,
    pub refusals: u64,
    pub objects: u64,
    pub dropped: u64,
}

/// Everything the importer needs.
pub struct ImporterConfig {
    pub etcd: etcd_client::Client,
    pub keys: Keys,
    pub local: ClusterConfig,
    /// The server's trust store, to register the peers' CAs; `None` with `--insecure`.
    pub server_tls: Option<Arc<ServerTls>>,
    pub identity: ClientIdentity,
    pub source: PeerSource,
    /// Whether this replica leads (only the leader imports).
    pub is_leader: watch::Receiver<bool>,
    pub options: ImporterOptions,
}

/// A running importer.
pub struct Importer {
    peers: watch::Receiver<Option<PeerSet>>,
    stats: watch::Receiver<BTreeMap<ClusterName, PeerStats>>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

// === impl Importer ===

impl Importer {
    /// Starts the importer; metrics are registered into `registry`.
    pub fn spawn(
        cfg: ImporterConfig,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Self {
        let metrics = PeerMetrics::register(registry);
        Self::spawn_with_metrics(cfg, metrics, shutdown)
    }

    /// Starts the importer with already registered metrics.
    pub fn spawn_with_metrics(
        cfg: ImporterConfig,
        metrics: PeerMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (stats_tx, stats) = watch::channel(BTreeMap::new());
        let shutdown = shutdown.child_token();
        let peers = cfg.source.spawn(shutdown.clone());
        let peers_out = peers.clone();
        let permits = cfg.options.txns_in_flight;
        let writer = GroupWriter::spawn(
            cfg.etcd.kv_client(),
            cfg.options.max_txn_ops.clone(),
            cfg.options.txns_in_flight,
            metrics.etcd_txns.clone(),
        );
        let shared = Arc::new(Shared {
            etcd: cfg.etcd,
            keys: cfg.keys,
            local: cfg.local,
            identity: cfg.identity,
            options: cfg.options,
            metrics,
            accepted: Mutex::new(BTreeMap::new()),
            resolver: tokio::sync::OnceCell::new(),
            stats: stats_tx,
            txn_permits: Arc::new(tokio::sync::Semaphore::new(permits)),
            writer,
        });
        let supervisor = Supervisor {
            shared,
            server_tls: cfg.server_tls,
            peers,
            leader: cfg.is_leader,
            workers: BTreeMap::new(),
            cas: BTreeMap::new(),
            swept: false,
        };
        let stop = shutdown.clone();
        let task = tokio::spawn(supervisor.run(stop).instrument(info_span!("peers")));
        Self {
            peers: peers_out,
            stats,
            shutdown,
            task: Some(task),
        }
    }

    /// What the importer knows about each running peer.
    pub fn stats(&self) -> BTreeMap<ClusterName, PeerStats> {
        self.stats.borrow().clone()
    }

    /// The configured peers as the source reads them (on every replica, leader or not):
    /// the flow relay dials their relays with the importer's credentials.
    pub fn peers(&self) -> watch::Receiver<Option<PeerSet>> {
        self.peers.clone()
    }

    /// A receiver of [`Importer::stats`] changes.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<ClusterName, PeerStats>> {
        self.stats.clone()
    }

    /// Stops every peer task (their data and status stay in etcd) and waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Importer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs the importer until `shutdown`, registering its metrics into `registry`.
pub async fn run_importer(
    cfg: ImporterConfig,
    registry: &mut Registry,
    shutdown: CancellationToken,
) {
    let importer = Importer::spawn(cfg, registry, shutdown.clone());
    shutdown.cancelled().await;
    importer.shutdown().await;
}

struct Running {
    spec: PeerSpec,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Supervisor {
    shared: Arc<Shared>,
    server_tls: Option<Arc<ServerTls>>,
    peers: watch::Receiver<Option<PeerSet>>,
    leader: watch::Receiver<bool>,
    workers: BTreeMap<ClusterName, Running>,
    /// CA bundles registered in the trust store, by peer.
    cas: BTreeMap<ClusterName, String>,
    /// Orphans (statuses of peers no longer configured) were swept in this term.
    swept: bool,
}

// === impl Supervisor ===

impl Supervisor {
    async fn run(mut self, shutdown: CancellationToken) {
        let (mut source_open, mut leader_open) = (true, true);
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.peers.changed(), if source_open => if r.is_err() {
                    warn!("the peer source stopped; keeping the current peers");
                    source_open = false;
                },
                r = self.leader.changed(), if leader_open => if r.is_err() {
                    // The election is gone: stop importing.
                    warn!("the leader signal is gone; stopping the peer imports");
                    leader_open = false;
                    self.leader = watch::channel(false).1;
                },
            }
        }
        for (_, r) in std::mem::take(&mut self.workers) {
            stop(r).await;
        }
    }

    async fn reconcile(&mut self) {
        let Some(config) = self.peers.borrow_and_update().clone() else {
            return;
        };
        let leader = *self.leader.borrow_and_update();
        self.sync_cas(&config);

        // Stop what is no longer wanted (removed, changed, or not leader any more).
        let names: Vec<ClusterName> = self.workers.keys().cloned().collect();
        for name in names {
            let keep = leader && config.get(&name) == Some(&self.workers[&name].spec);
            if keep {
                continue;
            }
            let Some(r) = self.workers.remove(&name) else {
                continue;
            };
            stop(r).await;
            if leader && !config.contains_key(&name) {
                info!(peer = %name, "peer removed from the configuration; withdrawing its data");
                self.withdraw_removed(&name).await;
            }
        }
        if !leader {
            self.swept = false;
            return;
        }
        if !self.swept {
            self.sweep_orphans(&config).await;
        }
        for (name, spec) in &config {
            if self.workers.contains_key(name) {
                continue;
            }
            info!(peer = %name, address = %spec.address, "importing peer");
            let cancel = CancellationToken::new();
            let worker = Worker::new(self.shared.clone(), spec.clone());
            let task = tokio::spawn(
                worker
                    .run(cancel.clone())
                    .instrument(info_span!("peer", cluster = %name)),
            );
            self.workers.insert(
                name.clone(),
                Running {
                    spec: spec.clone(),
                    cancel,
                    task,
                },
            );
        }
    }

    async fn withdraw_removed(&mut self, name: &ClusterName) {
        if let Err(error) = withdraw(&self.shared, name, true).await {
            // Retried by the orphan sweep of the next leadership term.
            error!(peer = %name, %error, "cannot withdraw a removed peer");
            self.swept = false;
        }
        self.shared.forget_peer(name);
    }

    /// Withdraws peers that have a status in etcd but are not configured (removed while no
    /// importer was running).
    async fn sweep_orphans(&mut self, config: &PeerSet) {
        let prefix = self.shared.keys.peers_prefix();
        let resp = self
            .shared
            .etcd
            .kv_client()
            .get(
                prefix.clone(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await;
        let kvs = match resp {
            Ok(r) => r,
            Err(error) => {
                warn!(%error, "cannot list peer statuses; orphans are swept later");
                return;
            }
        };
        for kv in kvs.kvs() {
            let Ok(status) = pb::PeerStatus::decode(kv.value()) else {
                continue;
            };
            let Ok(name) = ClusterName::new(status.cluster.clone()) else {
                continue;
            };
            if !config.contains_key(&name) {
                info!(peer = %name, "a peer in etcd is no longer configured; withdrawing it");
                self.withdraw_removed(&name).await;
            }
        }
        self.swept = true;
    }

    /// Makes the trust store's peer CAs equal to the configured peers' (on every replica).
    fn sync_cas(&mut self, config: &PeerSet) {
        let Some(server_tls) = &self.server_tls else {
            return;
        };
        for (name, spec) in config {
            if name == &self.shared.local.name {
                warn!(peer = %name, "a peer named like the local cluster: its CA is not trusted");
                continue;
            }
            if self.cas.get(name) == Some(&spec.ca_pem) {
                continue;
            }
            let r = tls::parse_certs(spec.ca_pem.as_bytes(), &format!("the CA of peer {name}"))
                .and_then(|ca| server_tls.add_peer_ca(name.clone(), ca));
            match r {
                Ok(()) => {
                    self.cas.insert(name.clone(), spec.ca_pem.clone());
                }
                Err(error) => error!(peer = %name, %error, "cannot trust the CA of peer"),
            }
        }
        let gone: Vec<ClusterName> = self
            .cas
            .keys()
            .filter(|c| !config.contains_key(*c))
            .cloned()
            .collect();
        for name in gone {
            if let Err(error) = server_tls.remove_peer_ca(&name) {
                warn!(peer = %name, %error, "cannot remove the CA of peer");
            }
            self.cas.remove(&name);
        }
    }
}

async fn stop(r: Running) {
    r.cancel.cancel();
    let mut task = r.task;
    // The worker writes its final status on the way out; do not wait forever on etcd.
    if tokio::time::timeout(Duration::from_secs(10), &mut task)
        .await
        .is_err()
    {
        warn!(peer = %r.spec.name, "peer task did not stop in time; aborting it");
        task.abort();
        let _ = task.await;
    }
}
