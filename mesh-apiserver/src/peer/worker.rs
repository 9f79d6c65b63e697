//! One peer: dial (resolve, mutual TLS, `Info` check), watch with the resumable client,
//! write what arrives into our etcd under `clusters/<peer>/`, keep the peer status, and
//! withdraw the peer's data once it has been stale for the TTL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{DeleteOptions, GetOptions, Txn, TxnOp};
use futures::FutureExt;
use hickory_resolver::TokioResolver;
use mesh_core::validate::{Conflict, check_joins, validate_cluster_config};
use mesh_core::{Backoff, ClusterConfig, ClusterName};
use mesh_proto::client::{
    ResumePoint, Watch, WatchError, WatchStats, WatchUpdate, connect_fn, spawn_watch_from,
};
use mesh_proto::convert::{WatchedObject, encode_value};
use mesh_proto::keys::{ALL_KINDS, ClusterKey, Keys, own_readers_only};
use mesh_proto::pb::{self, Kind, mesh_client::MeshClient};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsError, TlsIdentity};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use super::metrics::{PeerKindLabels, PeerMetrics, kind_label};
use super::{ClientIdentity, ImporterOptions, PeerStats};
use crate::etcd_write::{Committed, GroupWriter, Sink, WriteError, write_batched};
use mesh_proto::peer_entry::{PeerSpec, split_address};

/// Why a connection to a peer failed or the peer was refused. Each names the peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer}: invalid address {address:?}: {reason}")]
    Address {
        peer: ClusterName,
        address: String,
        reason: String,
    },
    #[error("peer {peer}: resolving {host:?}: {reason}")]
    Resolve {
        peer: ClusterName,
        host: String,
        reason: String,
    },
    #[error("peer {peer}: TLS material: {source}")]
    TlsSetup {
        peer: ClusterName,
        #[source]
        source: tls::TlsError,
    },
    #[error(
        "refusing peer {peer} at {address}: its certificate is not the apiserver of cluster {peer} \
         under the configured CA of {peer}: {reason}"
    )]
    Certificate {
        peer: ClusterName,
        address: String,
        reason: String,
    },
    #[error("peer {peer}: {source}")]
    Connect {
        peer: ClusterName,
        #[source]
        source: tls::TlsError,
    },
    #[error("peer {peer} at {address}: Info failed: {code}: {message}")]
    Info {
        peer: ClusterName,
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("refusing peer {peer} at {address}: its cluster configuration is invalid: {reason}")]
    InvalidConfig {
        peer: ClusterName,
        address: String,
        reason: String,
    },
    #[error(
        "refusing peer {peer} at {address}: it says it is cluster {served:?}, but it is configured \
         as {peer:?}"
    )]
    NameMismatch {
        peer: ClusterName,
        address: String,
        served: String,
    },
    #[error("refusing peer {peer}: {conflict}")]
    Conflict {
        peer: ClusterName,
        #[source]
        conflict: Conflict,
    },
    #[error("peer {peer}: etcd {op}: {source}")]
    Etcd {
        peer: ClusterName,
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("peer {peer}: {source}")]
    Write {
        peer: ClusterName,
        #[source]
        source: WriteError,
    },
    #[error("peer {peer}: the watch task ended")]
    WatchEnded { peer: ClusterName },
}

impl PeerError {
    /// The refusal reason (metric label) when this error is a refusal of the peer, rather
    /// than a failure to reach it.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        Some(match self {
            PeerError::Certificate { .. } => "certificate",
            PeerError::InvalidConfig { .. } => "invalid_config",
            PeerError::NameMismatch { .. } => "name_mismatch",
            PeerError::Conflict { conflict, .. } => match conflict {
                Conflict::DuplicateName { .. } => "duplicate_name",
                Conflict::DuplicateId { .. } => "duplicate_id",
                Conflict::OverlappingPodCidrs { .. } => "overlapping_pod_cidrs",
            },
            _ => return None,
        })
    }
}

/// What the importer's tasks share.
pub(crate) struct Shared {
    pub etcd: etcd_client::Client,
    pub keys: Keys,
    pub local: ClusterConfig,
    pub identity: ClientIdentity,
    pub options: ImporterOptions,
    pub metrics: PeerMetrics,
    /// Configurations of the peers that passed the `Info` check, for [`check_joins`]:
    /// check and insert happen under this lock, so two peers cannot join with the same ID.
    pub accepted: Mutex<BTreeMap<ClusterName, ClusterConfig>>,
    pub resolver: tokio::sync::OnceCell<Result<TokioResolver, String>>,
    pub stats: watch::Sender<BTreeMap<ClusterName, PeerStats>>,
    /// Transactions in flight beyond each peer's first, shared by every peer
    /// (`ImporterOptions::txns_in_flight` of them; `etcd_write::write_batched`).
    pub txn_permits: Arc<tokio::sync::Semaphore>,
    /// Every peer's writes (objects, markers, statuses) go through it: the batches queued
    /// while a transaction is in flight share the next one (`etcd_write::GroupWriter`).
    pub writer: GroupWriter,
}

impl Shared {
    fn accepted(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClusterName, ClusterConfig>> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn forget_peer(&self, peer: &ClusterName) {
        self.accepted().remove(peer);
        self.stats.send_if_modified(|m| m.remove(peer).is_some());
        self.metrics.forget(peer.as_str());
    }

    async fn resolve(
        &self,
        peer: &ClusterName,
        host: &str,
        port: u16,
    ) -> Result<SocketAddr, PeerError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let err = |reason: String| PeerError::Resolve {
            peer: peer.clone(),
            host: host.to_owned(),
            reason,
        };
        let resolver = self
            .resolver
            .get_or_init(|| async {
                TokioResolver::builder_tokio()
                    .and_then(|b| b.build())
                    .map_err(|e| format!("reading the system DNS configuration: {e}"))
            })
            .await
            .as_ref()
            .map_err(|e| err(e.clone()))?;
        let ips = resolver
            .lookup_ip(host)
            .await
            .map_err(|e| err(e.to_string()))?;
        let ips: Vec<IpAddr> = ips.iter().collect();
        // Prefer IPv4: a dual-stack name often has an AAAA record the listener does not serve.
        let ip = ips
            .iter()
            .find(|i| i.is_ipv4())
            .or(ips.first())
            .copied()
            .ok_or_else(|| err("no address".into()))?;
        debug!(%peer, host, %ip, "resolved peer address");
        Ok(SocketAddr::new(ip, port))
    }
}

/// A refusal found while dialing, reported to the worker at once.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    message: String,
}

/// Dials the peer and checks its `Info` against the mesh. Called for every (re)connection.
async fn dial(shared: &Shared, spec: &PeerSpec) -> Result<MeshClient<Channel>, PeerError> {
    let peer = &spec.name;
    let (host, port) = split_address(&spec.address).map_err(|reason| PeerError::Address {
        peer: peer.clone(),
        address: spec.address.clone(),
        reason,
    })?;
    let addr = shared.resolve(peer, &host, port).await?;
    let tls_setup = |source| PeerError::TlsSetup {
        peer: peer.clone(),
        source,
    };
    let ca = tls::parse_certs(spec.ca_pem.as_bytes(), &format!("the CA of peer {peer}"))
        .map_err(tls_setup)?;
    // Loaded on every dial: a rotated certificate is picked up at the next reconnect.
    let identity =
        TlsIdentity::load(&shared.identity.cert, &shared.identity.key).map_err(tls_setup)?;
    let client_tls = ClientTls::new(ca, identity, Some(peer.clone())).map_err(tls_setup)?;
    let mut endpoint = ClientEndpoint::new(spec.address.clone(), client_tls);
    endpoint.resolved = Some(addr);
    endpoint.server_name = spec.server_name.clone();
    endpoint.connect_timeout = shared.options.connect_timeout;
    let client = match tls::connect(&endpoint).await {
        Ok(c) => c,
        Err(TlsError::ServerCertificate { reason, .. }) => {
            return Err(PeerError::Certificate {
                peer: peer.clone(),
                address: spec.address.clone(),
                reason,
            });
        }
        Err(source) => {
            return Err(PeerError::Connect {
                peer: peer.clone(),
                source,
            });
        }
    };
    let mut client = client.max_decoding_message_size(64 * 1024 * 1024);
    let info = tokio::time::timeout(
        shared.options.connect_timeout,
        client.info(pb::InfoRequest {}),
    )
    .await
    .map_err(|_| PeerError::Info {
        peer: peer.clone(),
        address: spec.address.clone(),
        code: tonic::Code::DeadlineExceeded,
        message: format!("no answer within {:?}", shared.options.connect_timeout),
    })?
    .map_err(|s| PeerError::Info {
        peer: peer.clone(),
        address: spec.address.clone(),
        code: s.code(),
        message: s.message().to_owned(),
    })?
    .into_inner();
    let invalid = |reason: String| PeerError::InvalidConfig {
        peer: peer.clone(),
        address: spec.address.clone(),
        reason,
    };
    if info.name != peer.as_str() {
        return Err(PeerError::NameMismatch {
            peer: peer.clone(),
            address: spec.address.clone(),
            served: info.name,
        });
    }
    let config = ClusterConfig::try_from(info).map_err(|e| invalid(e.to_string()))?;
    validate_cluster_config(&config).map_err(|e| invalid(e.to_string()))?;
    {
        let mut accepted = shared.accepted();
        let mut connected = vec![shared.local.clone()];
        connected.extend(
            accepted
                .iter()
                .filter(|(name, _)| *name != peer)
                .map(|(_, c)| c.clone()),
        );
        check_joins(&config, &connected).map_err(|conflict| PeerError::Conflict {
            peer: peer.clone(),
            conflict,
        })?;
        accepted.insert(peer.clone(), config);
    }
    Ok(client)
}

/// How a watch session ended.
enum Flow {
    /// Cancelled: the peer was removed, changed, or leadership was lost.
    Stop,
    /// The data was withdrawn after the stale TTL: start over with a fresh snapshot.
    Withdrawn,
    /// The peer's configuration changed into a conflict: reconnect, so the `Info` check
    /// refuses it until it is fixed (its data is kept, stale, until the TTL).
    Recheck,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Objects drained from the watch channel per etcd flush at most.
const MAX_DRAIN: usize = 16 * 1024;

pub(crate) struct Worker {
    shared: Arc<Shared>,
    spec: PeerSpec,
    stats: PeerStats,
    /// The peer's objects in our etcd (as staged), by kind.
    present: HashMap<Kind, HashSet<String>>,
    /// Synced markers in our etcd.
    markers: HashSet<Kind>,
    /// Kinds synced since the last snapshot began.
    synced_kinds: HashSet<Kind>,
    /// A snapshot is being received (a `Reset` right after a fresh `Connected` is the same
    /// snapshot, not another one).
    in_snapshot: bool,
    /// The data was withdrawn after the stale TTL and not imported again yet.
    withdrawn: bool,
    /// The peer's config changed into a conflict: end the session.
    recheck: bool,
    /// Staged writes, coalesced by key (`None` deletes).
    pending: BTreeMap<String, Option<Vec<u8>>>,
    /// When the peer was lost (monotonic), for the TTL.
    stale_at: Option<Instant>,
    dirty: bool,
    last_status_write: Option<Instant>,
    /// What `clusters/<peer>/link` holds as far as we know: `Some(None)` absent,
    /// `Some(Some(ms))` stale since ms, `None` unknown (written at the next status write).
    link_written: Option<Option<i64>>,
}

// === impl Worker ===

impl Worker {
    pub(crate) fn new(shared: Arc<Shared>, spec: PeerSpec) -> Self {
        let stats = PeerStats {
            address: spec.address.clone(),
            ..PeerStats::default()
        };
        Self {
            shared,
            spec,
            stats,
            present: HashMap::new(),
            markers: HashSet::new(),
            synced_kinds: HashSet::new(),
            in_snapshot: false,
            withdrawn: false,
            recheck: false,
            pending: BTreeMap::new(),
            stale_at: None,
            dirty: true,
            last_status_write: None,
            link_written: None,
        }
    }

    fn peer(&self) -> &str {
        self.spec.name.as_str()
    }

    fn etcd_err(&self, op: &'static str) -> impl Fn(etcd_client::Error) -> PeerError + use<> {
        let peer = self.spec.name.clone();
        move |source| PeerError::Etcd {
            peer: peer.clone(),
            op,
            source,
        }
    }

    /// Runs until `cancel`. etcd failures restart the session from what etcd holds.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut retries =
            Backoff::equal_jitter(Duration::from_millis(200), Duration::from_secs(30)).retries();
        loop {
            let r = async {
                let resume = self.load().await?;
                self.import(resume, &cancel).await
            }
            .await;
            match r {
                Ok(()) => return,
                Err(error) => {
                    let delay = retries.next_delay(rand::random());
                    error!(%error, ?delay, "peer import failed; starting over from etcd");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Reads what etcd holds for the peer: its objects, markers and persisted status.
    async fn load(&mut self) -> Result<ResumePoint, PeerError> {
        let keys = &self.shared.keys;
        let mut kv = self.shared.etcd.kv_client();
        let status = kv
            .get(keys.peer_status(self.peer()), None)
            .await
            .map_err(self.etcd_err("get status"))?;
        let persisted = status
            .kvs()
            .first()
            .and_then(|kv| pb::PeerStatus::decode(kv.value()).ok());
        if self.spec.name == self.shared.local.name {
            // A peer named like this cluster is always refused; what etcd holds under its
            // name is the local cluster's own data, never this importer's.
            return Ok(ResumePoint::default());
        }
        let listing = kv
            .get(
                keys.cluster_prefix(self.peer()),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(self.etcd_err("list"))?;
        self.present.clear();
        self.markers.clear();
        self.pending.clear();
        let mut known = Vec::new();
        for kv in listing.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            match keys.parse(key) {
                // Our own record of the link, not the peer's data (see `write_link`).
                Some(ClusterKey::Object {
                    kind: Kind::Link, ..
                }) => {}
                Some(ClusterKey::Object { kind, name, .. }) => {
                    self.present.entry(kind).or_default().insert(name.clone());
                    known.push((self.spec.name.clone(), kind, name));
                }
                Some(ClusterKey::Synced { kind, .. }) => {
                    self.markers.insert(kind);
                }
                None => warn!(key, "ignoring an unknown key under the peer's prefix"),
            }
        }
        self.synced_kinds = self.markers.clone();
        let revision = match &persisted {
            Some(s) if !known.is_empty() || !self.markers.is_empty() => s.revision,
            _ => 0,
        };
        if let Some(s) = &persisted {
            self.stats.reconnects = s.reconnects;
            if s.stale_since_unix_ms > 0 {
                let since = UNIX_EPOCH + Duration::from_millis(s.stale_since_unix_ms as u64);
                let ago = SystemTime::now().duration_since(since).unwrap_or_default();
                self.stats.stale_since = Some(since);
                self.stale_at = Some(Instant::now().checked_sub(ago).unwrap_or_else(Instant::now));
            }
        }
        self.stats.revision = revision;
        self.stats.synced = ALL_KINDS.iter().all(|k| self.markers.contains(k));
        self.stats.objects = self.present.values().map(|s| s.len() as u64).sum();
        info!(
            revision,
            objects = self.stats.objects,
            "loaded the peer's imported state from etcd"
        );
        self.dirty = true;
        self.link_written = None;
        Ok(ResumePoint { revision, known })
    }

    fn spawn_watch(&self, resume: ResumePoint, refusals: mpsc::UnboundedSender<Refusal>) -> Watch {
        let shared = self.shared.clone();
        let spec = self.spec.clone();
        let connect = connect_fn(move || {
            let shared = shared.clone();
            let spec = spec.clone();
            let refusals = refusals.clone();
            async move {
                match dial(&shared, &spec).await {
                    Ok(c) => Ok(c),
                    Err(e) => {
                        if let Some(reason) = e.refusal_reason() {
                            let _ = refusals.send(Refusal {
                                reason,
                                message: e.to_string(),
                            });
                            // A refused peer is retried slowly: its configuration must change
                            // first.
                            tokio::time::sleep(shared.options.refusal_retry).await;
                        }
                        Err(e)
                    }
                }
            }
        });
        let request = pb::WatchRequest {
            clusters: vec![self.peer().to_owned()],
            kinds: vec![],
            resume_revision: 0,
            // Set on every connection by the client, from `options.watch`.
            heartbeat_interval_ms: 0,
        };
        let mut options = self.shared.options.watch.clone();
        if let Some(dir) = &self.shared.options.record_dir {
            let path = dir.join(format!("{}.rec", self.peer()));
            match mesh_proto::record::FileRecorder::create(&path) {
                Ok(file) => options.recorder = Some(Arc::new(file)),
                Err(error) => warn!(%error, path = %path.display(), "cannot record the watch"),
            }
        }
        spawn_watch_from(connect, request, options, resume)
    }

    async fn import(
        &mut self,
        mut resume: ResumePoint,
        cancel: &CancellationToken,
    ) -> Result<(), PeerError> {
        loop {
            let (tx, mut refusals) = mpsc::unbounded_channel();
            let mut watch = self.spawn_watch(resume, tx);
            match self.session(&mut watch, &mut refusals, cancel).await? {
                Flow::Stop => return Ok(()),
                Flow::Withdrawn => resume = ResumePoint::default(),
                Flow::Recheck => resume = self.resume_point(),
            }
        }
    }

    /// Resumes from what is in etcd now.
    fn resume_point(&self) -> ResumePoint {
        let known = self
            .present
            .iter()
            .flat_map(|(kind, names)| {
                names
                    .iter()
                    .map(|n| (self.spec.name.clone(), *kind, n.clone()))
            })
            .collect();
        ResumePoint {
            revision: self.stats.revision,
            known,
        }
    }

    fn ttl_deadline(&self) -> Option<Instant> {
        let ttl = self.shared.options.stale_ttl?;
        let has_data = !self.present.is_empty() || !self.markers.is_empty();
        if !has_data {
            return None;
        }
        self.stale_at.map(|t| t + ttl)
    }

    async fn session(
        &mut self,
        watch: &mut Watch,
        refusals: &mut mpsc::UnboundedReceiver<Refusal>,
        cancel: &CancellationToken,
    ) -> Result<Flow, PeerError> {
        let stats = watch.stats();
        let mut tick = tokio::time::interval(self.shared.options.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.ttl_deadline();
            let ttl = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.pump(watch, &stats, None).await?;
                    // The stream closes with this task; the data stays, not stale.
                    self.stats.connected = false;
                    self.write_status(&stats).await?;
                    self.publish_stats(&stats);
                    return Ok(Flow::Stop);
                }
                update = watch.recv() => {
                    let Some(update) = update else {
                        return Err(PeerError::WatchEnded { peer: self.spec.name.clone() });
                    };
                    self.pump(watch, &stats, Some(update)).await?;
                    // Losing or regaining the peer reaches the agents at once (stale
                    // demotion), not at the next periodic status write.
                    if self.link_written != Some(self.link_wanted()) {
                        self.write_status(&stats).await?;
                    }
                    if std::mem::take(&mut self.recheck) {
                        self.stats.connected = false;
                        self.mark_stale();
                        self.write_status(&stats).await?;
                        self.publish_stats(&stats);
                        return Ok(Flow::Recheck);
                    }
                }
                Some(refusal) = refusals.recv() => self.record_refusal(refusal),
                _ = tick.tick() => {
                    self.pump(watch, &stats, None).await?;
                    self.maybe_write_status(&stats).await?;
                }
                _ = ttl => {
                    self.withdraw_stale(&stats).await?;
                    return Ok(Flow::Withdrawn);
                }
            }
            self.publish_stats(&stats);
        }
    }

    /// Applies `first` and whatever else is queued, writes it to etcd, and moves the
    /// resume point when everything the client delivered is in etcd.
    async fn pump(
        &mut self,
        watch: &mut Watch,
        stats: &WatchStats,
        first: Option<WatchUpdate>,
    ) -> Result<(), PeerError> {
        // Everything up to `mark` was sent into the channel before `mark` was published:
        // once the channel is drained, it has all been applied.
        let mark = stats.revision();
        if let Some(u) = first {
            self.handle(u);
        }
        let mut drained = false;
        for _ in 0..MAX_DRAIN {
            match watch.recv().now_or_never() {
                Some(Some(u)) => self.handle(u),
                Some(None) => break,
                None => {
                    drained = true;
                    break;
                }
            }
        }
        let wrote = !self.pending.is_empty();
        self.flush().await?;
        if drained && mark > self.stats.revision {
            self.stats.revision = mark;
            // A heartbeat that only moves the revision is persisted with the next periodic
            // refresh: writing the status at once would move our etcd's revision, hence
            // the peer's view of us, hence our status again, in a loop between two peers.
            if wrote {
                self.dirty = true;
            }
        }
        Ok(())
    }

    fn record_refusal(&mut self, r: Refusal) {
        error!(reason = r.reason, error = %r.message, "peer refused; nothing is imported from it");
        self.shared
            .metrics
            .refusals
            .get_or_create(&PeerMetrics::reason(self.peer(), r.reason))
            .inc();
        self.stats.refusals += 1;
        self.stats.last_refusal = Some(r.message.clone());
        self.stats.last_error = r.message;
        self.dirty = true;
    }

    fn mark_stale(&mut self) {
        if self.stale_at.is_none() {
            self.stale_at = Some(Instant::now());
            self.stats.stale_since = Some(SystemTime::now());
        }
    }

    fn handle(&mut self, update: WatchUpdate) {
        match update {
            WatchUpdate::Connected { resumed, revision } => {
                info!(resumed, revision, "connected to the peer");
                self.stats.connected = true;
                self.withdrawn = false;
                self.stats.stale_since = None;
                self.stale_at = None;
                self.stats.last_error.clear();
                self.stats.last_refusal = None;
                let labels = PeerMetrics::peer(self.peer());
                if resumed {
                    self.stats.resumes += 1;
                    self.shared.metrics.resumes.get_or_create(&labels).inc();
                } else {
                    self.begin_snapshot();
                }
                self.dirty = true;
            }
            WatchUpdate::Disconnected { error } => {
                match &error {
                    // The peer reached us and refused this cluster: its operator must act.
                    WatchError::Status {
                        code: tonic::Code::Unauthenticated | tonic::Code::PermissionDenied,
                        ..
                    } => {
                        error!(%error, "the peer refuses this cluster; keeping its data, marked stale")
                    }
                    _ if self.stats.connected => {
                        warn!(%error, "lost the peer; keeping its data, marked stale")
                    }
                    _ => debug!(%error, "cannot reach the peer"),
                }
                let error = error.to_string();
                self.stats.connected = false;
                self.mark_stale();
                // A refusal recorded while dialing is the better explanation.
                if self.stats.last_refusal.is_none() {
                    self.stats.last_error = error;
                }
                if self.withdrawn {
                    self.stats
                        .last_error
                        .push_str(&withdrawn_note(&self.shared.options));
                }
                self.stats.reconnects += 1;
                self.shared
                    .metrics
                    .reconnects
                    .get_or_create(&PeerMetrics::peer(self.peer()))
                    .inc();
                self.dirty = true;
            }
            WatchUpdate::Reset { reason } => {
                info!(%reason, "the peer reset the stream; a fresh snapshot follows");
                if !self.in_snapshot {
                    self.begin_snapshot();
                }
            }
            WatchUpdate::Upsert {
                cluster,
                kind,
                name,
                value,
                ..
            } => {
                let checked = if kind == pb::Kind::Link
                    || matches!(value, pb::event::Value::Link(_))
                {
                    // A peer's link state is what *our* importer observes; a peer never
                    // serves one (`own_readers_only`), and could not vouch for itself.
                    Err((
                        "link",
                        format!(
                            "link states are never imported (sent by peer {})",
                            self.peer()
                        ),
                    ))
                } else if kind == pb::Kind::Policy || matches!(value, pb::event::Value::Policy(_)) {
                    // DESIGN.md section 14: a policy applies only in its own cluster, and a
                    // conforming peer never serves one (`policy_presented`).
                    Err((
                        "policy",
                        format!(
                            "network policies are never imported (sent by peer {})",
                            self.peer()
                        ),
                    ))
                } else if let pb::event::Value::Service(s) = &value
                    && s.local_only
                {
                    // A non-global Service is for its own cluster's agents only; a
                    // conforming peer presents it as absent (`service_presented`).
                    Err((
                        "local_service",
                        format!(
                            "non-global services are never imported (sent by peer {})",
                            self.peer()
                        ),
                    ))
                } else if cluster != self.spec.name {
                    Err((
                        "foreign_cluster",
                        format!(
                            "sent as cluster {cluster} on the stream of peer {}",
                            self.peer()
                        ),
                    ))
                } else if let pb::event::Value::Config(c) = &value
                    && let Err(message) = self.recheck_config(c)
                {
                    Err(("conflict", message))
                } else {
                    self.check_object(&value)
                };
                match checked {
                    Ok(()) => self.stage(kind, name, Some(encode_value(&value))),
                    Err((reason, message)) => {
                        warn!(?kind, %name, reason, %message, "dropping an object of the peer");
                        self.shared
                            .metrics
                            .dropped
                            .get_or_create(&PeerMetrics::reason(self.peer(), reason))
                            .inc();
                        self.stats.dropped += 1;
                        // An earlier valid version must not linger, except a config that
                        // changed into a conflict: the accepted one stays with the data.
                        if cluster == self.spec.name
                            && !matches!(reason, "conflict" | "policy" | "link")
                        {
                            self.stage(kind, name, None);
                        }
                    }
                }
            }
            WatchUpdate::Delete {
                cluster,
                kind,
                name,
                ..
            } => {
                if cluster == self.spec.name && !own_readers_only(kind) {
                    self.stage(kind, name, None);
                }
            }
            WatchUpdate::Synced { cluster, kind } => {
                // No policy marker either: nothing of the kind is imported.
                if cluster != self.spec.name || own_readers_only(kind) {
                    return;
                }
                if !self.markers.contains(&kind) {
                    let marker = pb::SyncedMarker {
                        at_unix_ms: unix_ms(SystemTime::now()),
                    };
                    self.pending.insert(
                        self.shared.keys.synced(self.peer(), kind),
                        Some(marker.encode_to_vec()),
                    );
                    self.markers.insert(kind);
                }
                self.synced_kinds.insert(kind);
                let all = ALL_KINDS.iter().all(|k| self.synced_kinds.contains(k));
                if all {
                    self.in_snapshot = false;
                }
                if all && !self.stats.synced {
                    info!("peer synced");
                    self.stats.synced = true;
                    self.dirty = true;
                }
            }
        }
    }

    /// A config object of the peer: re-checked against the mesh when it differs from the
    /// one accepted at connection time. A conflict is a refusal.
    fn recheck_config(&mut self, value: &pb::ClusterConfig) -> Result<(), String> {
        let Ok(config) = ClusterConfig::try_from(value.clone()) else {
            // Invalid values are dropped by the object checks.
            return Ok(());
        };
        let mut accepted = self.shared.accepted();
        if accepted.get(&self.spec.name) == Some(&config) {
            return Ok(());
        }
        let mut connected = vec![self.shared.local.clone()];
        connected.extend(
            accepted
                .iter()
                .filter(|(name, _)| **name != self.spec.name)
                .map(|(_, c)| c.clone()),
        );
        let checked = if config.name != self.spec.name {
            Err(PeerError::NameMismatch {
                peer: self.spec.name.clone(),
                address: self.spec.address.clone(),
                served: config.name.to_string(),
            })
        } else {
            validate_cluster_config(&config)
                .map_err(|e| PeerError::InvalidConfig {
                    peer: self.spec.name.clone(),
                    address: self.spec.address.clone(),
                    reason: e.to_string(),
                })
                .and_then(|()| {
                    check_joins(&config, &connected).map_err(|conflict| PeerError::Conflict {
                        peer: self.spec.name.clone(),
                        conflict,
                    })
                })
        };
        match checked {
            Ok(()) => {
                accepted.insert(self.spec.name.clone(), config);
                Ok(())
            }
            Err(e) => {
                drop(accepted);
                let message = e.to_string();
                self.record_refusal(Refusal {
                    reason: e.refusal_reason().unwrap_or("invalid_config"),
                    message: message.clone(),
                });
                self.recheck = true;
                Err(message)
            }
        }
    }

    fn begin_snapshot(&mut self) {
        self.in_snapshot = true;
        self.stats.snapshots += 1;
        self.shared
            .metrics
            .snapshots
            .get_or_create(&PeerMetrics::peer(self.peer()))
            .inc();
        self.synced_kinds.clear();
        self.stats.synced = false;
        self.dirty = true;
    }

    /// Domain checks of an object of the peer: it decodes, it names no other cluster, its
    /// identities are in the peer's range.
    fn check_object(&self, value: &pb::event::Value) -> Result<(), (&'static str, String)> {
        let object =
            WatchedObject::try_from(value.clone()).map_err(|e| ("invalid", e.to_string()))?;
        if let Some(c) = object.cluster()
            && c != &self.spec.name
        {
            return Err((
                "foreign_cluster",
                format!("the object names cluster {c}, not {}", self.peer()),
            ));
        }
        let identity = match &object {
            WatchedObject::Identity(i) => Some(i.id),
            WatchedObject::Endpoint(e) => Some(e.identity),
            _ => None,
        };
        if let Some(id) = identity {
            let peer_id = self
                .shared
                .accepted()
                .get(&self.spec.name)
                .map(|c| c.id)
                .ok_or((
                    "invalid",
                    "the peer's cluster id is not known yet".to_owned(),
                ))?;
            id.check_range(&self.spec.name, peer_id)
                .map_err(|e| ("identity_out_of_range", e.to_string()))?;
        }
        Ok(())
    }

    fn stage(&mut self, kind: Kind, name: String, value: Option<Vec<u8>>) {
        let key = self.shared.keys.object(self.peer(), kind, &name);
        match value {
            Some(v) => {
                self.present.entry(kind).or_default().insert(name);
                self.pending.insert(key, Some(v));
            }
            None => {
                let was = self.present.get_mut(&kind).is_some_and(|s| s.remove(&name));
                if was || self.pending.contains_key(&key) {
                    self.pending.insert(key, None);
                }
            }
        }
    }

    /// Writes the staged changes with [`write_batched`] (no fence: the importer's task is
    /// cancelled with the leadership term), up to [`ImporterOptions::txns_in_flight`]
    /// transactions at a time. Those may commit in any order, so the synced markers go in a
    /// second call, once every object staged with them is committed: a reader that sees a
    /// marker has the objects it vouches for. Each key is staged once, so no order decides
    /// a value; the resume revision moves only after this returns (see [`Self::pump`]). On
    /// error, the run starts over from etcd.
    async fn flush(&mut self) -> Result<(), PeerError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let sink = Sink::Group(&self.shared.writer);
        let (mut puts, mut deletes) = (0usize, 0usize);
        let txns = &self.shared.metrics.txns;
        let labels = PeerMetrics::peer(self.spec.name.as_str());
        let max_ops = &self.shared.options.max_txn_ops;
        let in_flight = self.shared.options.txns_in_flight;
        let mut markers = BTreeMap::new();
        for kind in ALL_KINDS {
            let key = self.shared.keys.synced(self.peer(), kind);
            if let Some(v) = self.pending.remove(&key) {
                markers.insert(key, v);
            }
        }
        let mut count = |batch: Committed| {
            for (_, v) in &batch {
                match v {
                    Some(_) => puts += 1,
                    None => deletes += 1,
                }
            }
            txns.get_or_create(&labels).inc();
        };
        let mut written = write_batched(
            sink,
            &mut self.pending,
            max_ops,
            in_flight,
            Some(&self.shared.txn_permits),
            &mut count,
        )
        .await;
        if written.is_ok() {
            written = write_batched(sink, &mut markers, max_ops, 1, None, &mut count).await;
        }
        // What was not committed stays staged.
        self.pending.append(&mut markers);
        written.map_err(|source| PeerError::Write {
            peer: self.spec.name.clone(),
            source,
        })?;
        let ms = started.elapsed().as_millis() as u64;
        debug!(puts, deletes, ms, "imported changes written");
        let objects = self.present.values().map(|s| s.len() as u64).sum();
        if objects != self.stats.objects {
            self.stats.objects = objects;
            self.dirty = true;
        }
        Ok(())
    }

    /// Deletes the peer's data after the stale TTL; the next connection takes a snapshot.
    async fn withdraw_stale(&mut self, stats: &WatchStats) -> Result<(), PeerError> {
        let ttl = self.shared.options.stale_ttl.unwrap_or_default();
        warn!(
            ?ttl,
            objects = self.stats.objects,
            "peer stale for longer than the TTL; withdrawing its data"
        );
        withdraw(&self.shared, &self.spec.name, false).await?;
        self.present.clear();
        self.markers.clear();
        self.synced_kinds.clear();
        self.pending.clear();
        self.shared.accepted().remove(&self.spec.name);
        self.stats.synced = false;
        self.stats.objects = 0;
        self.stats.revision = 0;
        self.stats.withdrawals += 1;
        self.withdrawn = true;
        self.stats
            .last_error
            .push_str(&withdrawn_note(&self.shared.options));
        self.shared
            .metrics
            .withdrawals
            .get_or_create(&PeerMetrics::peer(self.peer()))
            .inc();
        self.dirty = true;
        self.write_status(stats).await?;
        self.publish_stats(stats);
        Ok(())
    }

    fn status(&self, stats: &WatchStats) -> pb::PeerStatus {
        pb::PeerStatus {
            cluster: self.peer().to_owned(),
            address: self.spec.address.clone(),
            connected: self.stats.connected,
            synced: self.stats.synced,
            stale_since_unix_ms: self.stats.stale_since.map(unix_ms).unwrap_or(0),
            last_error: self.stats.last_error.clone(),
            revision: self.stats.revision,
            reconnects: self.stats.reconnects,
            snapshots: self.stats.snapshots,
            resumes: self.stats.resumes,
            heartbeat_interval_ms: self.shared.options.watch.heartbeat_interval.as_millis() as i64,
            last_event_age_ms: stats
                .last_message_at()
                .map(|t| t.elapsed().as_millis() as i64)
                .unwrap_or(0),
        }
    }

    async fn maybe_write_status(&mut self, stats: &WatchStats) -> Result<(), PeerError> {
        // Refreshed now and then even without changes, so last_event_age stays meaningful.
        let refresh = self.shared.options.status_interval * 10;
        let due = self
            .last_status_write
            .is_none_or(|t| t.elapsed() >= refresh);
        if self.dirty || due {
            self.write_status(stats).await?;
        }
        Ok(())
    }

    /// What `clusters/<peer>/link` should hold: the stale-since time while the peer is
    /// stale and we hold its data (a withdrawn or never imported peer has nothing to demote,
    /// and a link alone would make a starting agent wait for a cluster that never syncs).
    fn link_wanted(&self) -> Option<i64> {
        let has_data = !self.present.is_empty() || !self.markers.is_empty();
        if self.spec.name == self.shared.local.name || !has_data {
            return None;
        }
        self.stats.stale_since.map(unix_ms)
    }

    /// Puts or deletes `clusters/<peer>/link` when it differs from [`Self::link_wanted`]:
    /// how the cluster's agents learn that the peer is stale (DESIGN.md section 13b).
    async fn write_link(&mut self) -> Result<(), PeerError> {
        let wanted = self.link_wanted();
        if self.link_written == Some(wanted) {
            return Ok(());
        }
        if self.spec.name == self.shared.local.name {
            // Never under the local cluster's own prefix.
            self.link_written = Some(wanted);
            return Ok(());
        }
        let key = self.shared.keys.object(self.peer(), Kind::Link, "");
        let mut kv = self.shared.etcd.kv_client();
        match wanted {
            Some(ms) => {
                let link = pb::PeerLink {
                    cluster: self.peer().to_owned(),
                    stale_since_unix_ms: ms,
                };
                kv.put(key, link.encode_to_vec(), None)
                    .await
                    .map_err(self.etcd_err("put link"))?;
                info!(stale_since_unix_ms = ms, "peer marked stale for the agents");
            }
            None => {
                kv.delete(key, None)
                    .await
                    .map_err(self.etcd_err("delete link"))?;
            }
        }
        self.link_written = Some(wanted);
        Ok(())
    }

    async fn write_status(&mut self, stats: &WatchStats) -> Result<(), PeerError> {
        self.write_link().await?;
        let status = self.status(stats);
        // Through the group writer: 250 peers' periodic statuses share transactions.
        let key = self.shared.keys.peer_status(self.peer());
        let (_, written) = self
            .shared
            .writer
            .write(vec![(key, Some(status.encode_to_vec()))])
            .await;
        written.map_err(|source| PeerError::Write {
            peer: self.spec.name.clone(),
            source,
        })?;
        self.dirty = false;
        self.last_status_write = Some(Instant::now());
        self.update_gauges(&status);
        Ok(())
    }

    fn update_gauges(&self, status: &pb::PeerStatus) {
        let m = &self.shared.metrics;
        let l = PeerMetrics::peer(self.peer());
        m.connected.get_or_create(&l).set(status.connected as i64);
        m.synced.get_or_create(&l).set(status.synced as i64);
        m.last_event_age_seconds
            .get_or_create(&l)
            .set(status.last_event_age_ms as f64 / 1000.0);
        m.stale_seconds.get_or_create(&l).set(
            self.stale_at
                .map(|t| t.elapsed().as_secs_f64())
                .unwrap_or(0.0),
        );
        for kind in ALL_KINDS {
            let n = self.present.get(&kind).map_or(0, HashSet::len);
            m.objects
                .get_or_create(&PeerKindLabels {
                    peer: self.peer().to_owned(),
                    kind: kind_label(kind).to_owned(),
                })
                .set(n as i64);
        }
    }

    fn publish_stats(&self, stats: &WatchStats) {
        let mut s = self.stats.clone();
        s.watch_revision = stats.revision();
        let name = self.spec.name.clone();
        self.shared.stats.send_if_modified(|m| {
            if m.get(&name) == Some(&s) {
                return false;
            }
            m.insert(name, s);
            true
        });
    }
}

fn withdrawn_note(options: &ImporterOptions) -> String {
    format!(
        " (its data was withdrawn: unreachable for longer than the stale TTL of {:?})",
        options.stale_ttl.unwrap_or_default()
    )
}

/// Deletes the peer's imported data (one atomic range delete), and its status when
/// `status` is set (the peer was removed from the configuration).
pub(crate) async fn withdraw(
    shared: &Shared,
    peer: &ClusterName,
    status: bool,
) -> Result<(), PeerError> {
    let etcd_err = |op| {
        let peer = peer.clone();
        move |source| PeerError::Etcd { peer, op, source }
    };
    if *peer == shared.local.name {
        // Never the local cluster's own data; only the status written for the refused
        // namesake goes.
        if status {
            shared
                .etcd
                .kv_client()
                .delete(shared.keys.peer_status(peer.as_str()), None)
                .await
                .map_err(etcd_err("delete status"))?;
        }
        return Ok(());
    }
    let mut ops = vec![TxnOp::delete(
        shared.keys.cluster_prefix(peer.as_str()),
        Some(DeleteOptions::new().with_prefix()),
    )];
    if status {
        ops.push(TxnOp::delete(shared.keys.peer_status(peer.as_str()), None));
    }
    shared
        .etcd
        .kv_client()
        .txn(Txn::new().and_then(ops))
        .await
        .map_err(etcd_err("withdraw"))?;
    info!(%peer, "peer data withdrawn from etcd");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons() {
        let a: ClusterName = "a".parse().unwrap();
        let e = PeerError::NameMismatch {
            peer: a.clone(),
            address: "x:1".into(),
            served: "c".into(),
        };
        assert_eq!(e.refusal_reason(), Some("name_mismatch"));
        assert!(e.to_string().contains("\"c\""), "{e}");
        let e = PeerError::Resolve {
            peer: a,
            host: "x".into(),
            reason: "nxdomain".into(),
        };
        assert_eq!(e.refusal_reason(), None);
    }
}
