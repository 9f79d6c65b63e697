//! The gRPC edge (DESIGN.md sections 7 and 8): `Info`, `Watch`, `Status`, `ReportStatus`.
//!
//! Streams are served from the [`Index`], never from etcd. Wire rules of `Watch`:
//!
//! - `WatchResponse.revision` is the revision the client has reached once it has applied
//!   the message. Snapshot chunks carry 0 except the last one, which carries the snapshot
//!   revision R (an empty `Events` message closes an empty snapshot), so a client cut off in
//!   the middle of a snapshot resumes from scratch, never from a half-applied snapshot.
//!   `Reset` carries 0.
//! - After the snapshot (or the missed events of a resume) one `Synced` per (cluster, kind)
//!   whose etcd marker exists; later markers are sent when they appear.
//! - Live events come in revision order, many per message; the events of one etcd watch
//!   response are coalesced. Within a batch events precede `Synced` markers.
//! - `Progress` with the stream's revision when nothing was sent for a heartbeat interval.
//! - A stream whose buffer fills up (the client does not read) is cut from live delivery
//!   and resumes from its own last revision when it drains: from the history without loss,
//!   or, when it fell behind the history, with the difference between etcd at its revision
//!   and the index now (see below).
//! - A resume older than the index's history (the server restarted, or the history was
//!   trimmed) reads the stream's keys from etcd at that revision (keys only) and sends one
//!   ordinary batch at the current revision: deletes for keys that are gone, upserts for
//!   objects modified after it. Only a revision etcd compacted gets `Reset` and a snapshot.
//!
//! Roles: agents and replicas of the serving cluster read every cluster; a peer reads only
//! the serving cluster's own data and sees `shared: false` services as absent.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{GetOptions, PutOptions};
use futures::Stream;
use mesh_core::ClusterName;
use mesh_core::select::{Reader, policy_presented, service_presented};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind, mesh_server};
use mesh_proto::tls::{AuthError, Caller, ConnInfo, Role, ServerTls};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, info_span, warn};

use crate::index::{Batch, Change, Index, Obj, Start, Subscription, Update};
use crate::metrics::{Metrics, RoleLabels};

/// Largest request the server decodes (an agent's status report is the biggest).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest response message the server encodes; messages are built well below it.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Errors of the gRPC edge. Each maps to one specific `tonic::Status` code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no client identity on this connection")]
    NoConnInfo,
    #[error("{caller} may only read the data of cluster {serving}, not of cluster {requested}")]
    ForeignCluster {
        caller: String,
        serving: String,
        requested: String,
    },
    #[error("invalid cluster name in request: {0}")]
    InvalidCluster(#[source] mesh_core::Error),
    #[error(
        "unknown kind {0} in request: expected one of config, node, identity, endpoint, service"
    )]
    InvalidKind(i32),
    #[error(
        "invalid resume_revision {0}: must be 0 (snapshot) or a revision received from this server"
    )]
    InvalidRevision(i64),
    #[error("{caller} may not call {rpc}: only agents of this cluster may")]
    NotAnAgent { caller: String, rpc: &'static str },
    #[error(
        "{caller} may not report the status of node {node:?}: a node reports only its own status"
    )]
    NodeMismatch { caller: String, node: String },
    #[error("invalid node name {0:?} in status report")]
    InvalidNode(String),
    #[error("etcd {op} failed: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("malformed WatchRequest: {0}")]
    MalformedRequest(#[source] prost::DecodeError),
    #[error("re-decoding a watch message this server encoded: {0}")]
    Reencode(#[source] prost::DecodeError),
}

impl ServeError {
    /// A short label for the `auth_refusals` metric, if this is a refusal.
    fn refusal_reason(&self) -> Option<&'static str> {
        Some(match self {
            ServeError::Auth(a) => match a {
                AuthError::NoCertificate { .. } => "no_certificate",
                AuthError::BadCertificate { .. } => "bad_certificate",
                AuthError::NoSpiffeId { .. } => "no_spiffe_id",
                AuthError::InvalidSpiffeId { .. } => "invalid_spiffe_id",
                AuthError::UnknownCluster { .. } => "unknown_cluster",
                AuthError::WrongCa { .. } => "wrong_ca",
                AuthError::ForeignAgent { .. } => "foreign_agent",
            },
            ServeError::NoConnInfo => "no_conn_info",
            ServeError::ForeignCluster { .. } => "foreign_cluster",
            ServeError::NotAnAgent { .. } => "not_an_agent",
            ServeError::NodeMismatch { .. } => "node_mismatch",
            _ => return None,
        })
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Auth(a) => a.into(),
            ServeError::NoConnInfo => Status::unauthenticated(e.to_string()),
            ServeError::ForeignCluster { .. }
            | ServeError::NotAnAgent { .. }
            | ServeError::NodeMismatch { .. } => Status::permission_denied(e.to_string()),
            ServeError::InvalidCluster(_)
            | ServeError::InvalidKind(_)
            | ServeError::InvalidRevision(_)
            | ServeError::InvalidNode(_)
            | ServeError::MalformedRequest(_) => Status::invalid_argument(e.to_string()),
            // Our own bytes did not decode: a bug here, not the caller's.
            ServeError::Reencode(_) => Status::internal(e.to_string()),
            ServeError::Etcd { .. } | ServeError::ShuttingDown => {
                Status::unavailable(e.to_string())
            }
        }
    }
}

/// How callers are identified.
#[derive(Clone)]
pub enum Authenticator {
    /// Mutual TLS: the caller is read from its certificate.
    Tls(Arc<ServerTls>),
    /// `--insecure` on loopback: every caller is treated as an agent of this cluster whose
    /// node is whatever it reports.
    Insecure,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Tls(_) => f.write_str("Tls"),
            Authenticator::Insecure => f.write_str("Insecure"),
        }
    }
}

/// The caller's access, relative to the serving cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    /// An agent (node known under TLS), a replica, or an insecure caller: reads everything.
    Local {
        who: String,
        node: Option<String>,
        agent: bool,
    },
    /// The apiserver of another cluster.
    Peer { who: String },
}

impl Access {
    fn who(&self) -> &str {
        match self {
            Access::Local { who, .. } | Access::Peer { who } => who,
        }
    }

    fn role_label(&self) -> &'static str {
        match self {
            Access::Local { agent: true, .. } => "agent",
            Access::Local { .. } => "replica",
            Access::Peer { .. } => "peer",
        }
    }
}

/// Serving settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The serving cluster's config (`Info`).
    pub local: pb::ClusterConfig,
    pub keys: Keys,
    pub heartbeat_interval: Duration,
    /// Events per `Events` message at most.
    pub max_events_per_message: usize,
    /// Target encoded size of an `Events` message (one bigger event is sent alone).
    pub max_message_bytes: usize,
    /// Agent status reports expire after this long.
    pub agent_status_ttl: Duration,
}

impl ServeConfig {
    pub fn new(local: pb::ClusterConfig, keys: Keys) -> Self {
        Self {
            local,
            keys,
            heartbeat_interval: Duration::from_secs(5),
            max_events_per_message: 4096,
            max_message_bytes: 1024 * 1024,
            agent_status_ttl: Duration::from_secs(30),
        }
    }
}

/// The `mesh.v1.Mesh` service.
#[derive(Clone)]
pub struct MeshService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshService")
            .field("cluster", &self.inner.cfg.local.name)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

struct Inner {
    cfg: ServeConfig,
    index: Index,
    etcd: etcd_client::Client,
    auth: Authenticator,
    metrics: Metrics,
    leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
}

/// What one stream reads.
#[derive(Debug, Clone)]
struct StreamFilter {
    /// `None` = every cluster.
    clusters: Option<BTreeSet<String>>,
    /// Empty = every kind.
    kinds: BTreeSet<i32>,
    /// Who reads: a peer sees `shared: false` services as absent
    /// ([`service_presented`]).
    reader: Reader,
}

impl StreamFilter {
    /// Whether the stream carries objects and Synced markers of (cluster, kind). A peer
    /// never gets policies, even when it asks for the kind ([`policy_presented`]).
    fn accepts(&self, cluster: &str, kind: Kind) -> bool {
        self.clusters.as_ref().is_none_or(|c| c.contains(cluster))
            && (self.kinds.is_empty() || self.kinds.contains(&(kind as i32)))
            && (kind != Kind::Policy || policy_presented(self.reader))
    }

    /// Whether the reader sees `obj` as it is (not a service the reader must see as absent).
    fn presented(&self, obj: &Obj) -> bool {
        obj.service_shared
            .is_none_or(|shared| service_presented(shared, self.reader))
    }

    /// The encoded event as this stream sees it: `None` when filtered out; a delete when
    /// the reader must not see the object (the only case that encodes anything per stream).
    fn present<'a>(&self, obj: &'a Obj) -> Option<Cow<'a, [u8]>> {
        if !self.accepts(
            &obj.cluster,
            Kind::try_from(obj.kind).unwrap_or(Kind::Unspecified),
        ) {
            return None;
        }
        if !self.presented(obj) {
            let mut ev = obj.event();
            ev.value = None;
            return Some(Cow::Owned(ev.encode_to_vec()));
        }
        Some(Cow::Borrowed(&obj.wire))
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn msg(revision: i64, payload: pb::watch_response::Payload) -> WireMsg {
    WireMsg::of(&pb::WatchResponse {
        revision,
        payload: Some(payload),
    })
}

/// `WatchResponse.revision` (field 1, varint) and `payload.events` (field 2, bytes).
const TAG_REVISION: u8 = 1 << 3;
const TAG_EVENTS: u8 = (2 << 3) | 2;
/// `Events.events` (field 1, length-delimited).
const TAG_EVENT: u8 = (1 << 3) | 2;

/// One encoded `WatchResponse`, the item of a watch stream on the wire. `Events`
/// messages are assembled from the index's pre-encoded events (a header, then the
/// events' bytes copied once into `body`); the others are encoded by prost.
#[derive(Debug, Clone, Default)]
pub struct WireMsg {
    head: Vec<u8>,
    body: Vec<u8>,
    /// Events in the message (for metrics).
    events: usize,
}

impl WireMsg {
    fn of(m: &pb::WatchResponse) -> Self {
        WireMsg {
            head: m.encode_to_vec(),
            body: Vec::new(),
            events: match &m.payload {
                Some(pb::watch_response::Payload::Events(e)) => e.events.len(),
                _ => 0,
            },
        }
    }

    /// An `Events` message at `revision` whose `Events` body (framed events) is `body`.
    fn events(revision: i64, body: Vec<u8>, events: usize) -> Self {
        let mut head = Vec::with_capacity(16);
        if revision != 0 {
            head.push(TAG_REVISION);
            prost::encoding::encode_varint(revision as u64, &mut head);
        }
        head.push(TAG_EVENTS);
        prost::encoding::encode_varint(body.len() as u64, &mut head);
        WireMsg { head, body, events }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message decoded (tests, and the typed `Mesh::watch`).
    pub fn decode(&self) -> Result<pb::WatchResponse, prost::DecodeError> {
        pb::WatchResponse::decode(bytes::Buf::chain(&self.head[..], &self.body[..]))
    }
}

/// The gRPC codec of the wire watch stream: decodes `WatchRequest`s with prost, writes
/// [`WireMsg`]s as they are.
#[derive(Debug, Clone, Copy, Default)]
struct WireCodec;

impl tonic::codec::Codec for WireCodec {
    type Encode = WireMsg;
    type Decode = pb::WatchRequest;
    type Encoder = WireCodec;
    type Decoder = WireCodec;

    fn encoder(&mut self) -> Self::Encoder {
        WireCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireCodec
    }
}

impl tonic::codec::Encoder for WireCodec {
    type Item = WireMsg;
    type Error = Status;

    fn encode(
        &mut self,
        item: WireMsg,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        dst.reserve(item.len());
        dst.put_slice(&item.head);
        dst.put_slice(&item.body);
        Ok(())
    }
}

impl tonic::codec::Decoder for WireCodec {
    type Item = pb::WatchRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::WatchRequest>, Status> {
        pb::WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| ServeError::MalformedRequest(e).into())
    }
}

/// Packs encoded events into `Events` bodies bounded by count and encoded size.
struct Chunker {
    max_events: usize,
    max_bytes: usize,
    body: Vec<u8>,
    events: usize,
    out: Vec<(Vec<u8>, usize)>,
}

impl Chunker {
    fn new(cfg: &ServeConfig) -> Self {
        Self {
            max_events: cfg.max_events_per_message.max(1),
            max_bytes: cfg.max_message_bytes.max(1),
            body: Vec::new(),
            events: 0,
            out: Vec::new(),
        }
    }

    /// Appends one encoded `pb::Event`, framed as an element of `Events.events`.
    fn push(&mut self, ev: &[u8]) {
        let len = 1 + prost::encoding::encoded_len_varint(ev.len() as u64) + ev.len();
        if self.events > 0
            && (self.events >= self.max_events || self.body.len() + len > self.max_bytes)
        {
            self.out.push((std::mem::take(&mut self.body), self.events));
            self.events = 0;
        }
        if self.body.is_empty() {
            self.body.reserve(len.max(self.max_bytes.min(16 * 1024)));
        }
        self.body.push(TAG_EVENT);
        prost::encoding::encode_varint(ev.len() as u64, &mut self.body);
        self.body.extend_from_slice(ev);
        self.events += 1;
    }

    fn finish(mut self) -> Vec<(Vec<u8>, usize)> {
        if self.events > 0 {
            self.out.push((self.body, self.events));
        }
        self.out
    }
}

// === impl MeshService ===

impl MeshService {
    pub fn new(
        cfg: ServeConfig,
        index: Index,
        etcd: etcd_client::Client,
        auth: Authenticator,
        metrics: Metrics,
        leader: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                index,
                etcd,
                auth,
                metrics,
                leader,
                shutdown,
            }),
        }
    }

    /// The tonic server for this service with message size limits: `Watch` is served
    /// with [`WireCodec`] (events encoded once in the index), the other methods by the
    /// generated server.
    pub fn into_server(self) -> MeshGrpc {
        MeshGrpc {
            typed: mesh_server::MeshServer::new(self.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            svc: self,
        }
    }

    fn local_cluster(&self) -> &str {
        &self.inner.cfg.local.name
    }

    /// Identifies the caller; refusals are counted and logged.
    fn access<T>(&self, req: &Request<T>) -> Result<Access, ServeError> {
        let r = match &self.inner.auth {
            Authenticator::Insecure => Ok(Access::Local {
                who: "insecure loopback client".into(),
                node: None,
                agent: true,
            }),
            Authenticator::Tls(tls) => match ConnInfo::of(req) {
                None => Err(ServeError::NoConnInfo),
                Some(_) => tls
                    .authenticate(req)
                    .map_err(ServeError::Auth)
                    .map(|caller| self.access_of(caller)),
            },
        };
        if let Err(e) = &r {
            self.refused(e, req);
        }
        r
    }

    fn access_of(&self, caller: Caller) -> Access {
        let who = caller.to_string();
        match caller.role {
            Role::Agent { node } => Access::Local {
                who,
                node: Some(node),
                agent: true,
            },
            Role::Replica | Role::Operator { .. } => Access::Local {
                who,
                node: None,
                agent: false,
            },
            Role::Peer => Access::Peer { who },
        }
    }

    fn refused<T>(&self, e: &ServeError, req: &Request<T>) {
        if let Some(reason) = e.refusal_reason() {
            Metrics::inc_reason(&self.inner.metrics.auth_refusals, reason);
            let remote = ConnInfo::of(req)
                .and_then(|c| c.remote_addr)
                .or_else(|| req.remote_addr());
            warn!(error = %e, reason, ?remote, "request refused");
        }
    }

    /// Validates a watch request against the caller's access.
    fn filter(&self, access: &Access, req: &pb::WatchRequest) -> Result<StreamFilter, ServeError> {
        if req.resume_revision < 0 {
            return Err(ServeError::InvalidRevision(req.resume_revision));
        }
        let mut clusters = BTreeSet::new();
        for c in &req.clusters {
            let name = ClusterName::new(c.clone()).map_err(ServeError::InvalidCluster)?;
            clusters.insert(name.to_string());
        }
        let mut kinds = BTreeSet::new();
        for k in &req.kinds {
            match Kind::try_from(*k) {
                Ok(Kind::Unspecified) | Err(_) => return Err(ServeError::InvalidKind(*k)),
                Ok(kind) => {
                    kinds.insert(kind as i32);
                }
            }
        }
        let local = self.local_cluster();
        let (clusters, reader) = match access {
            Access::Local { .. } => (
                (!clusters.is_empty()).then_some(clusters),
                Reader::OwnCluster,
            ),
            Access::Peer { who } => {
                if let Some(other) = clusters.iter().find(|c| c.as_str() != local) {
                    return Err(ServeError::ForeignCluster {
                        caller: who.clone(),
                        serving: local.to_owned(),
                        requested: other.clone(),
                    });
                }
                (Some(BTreeSet::from([local.to_owned()])), Reader::Peer)
            }
        };
        Ok(StreamFilter {
            clusters,
            kinds,
            reader,
        })
    }

    /// Reads every value under `prefix` and decodes it as `M`; undecodable values are
    /// logged with their key and skipped.
    async fn read_all<M: Message + Default>(&self, prefix: String) -> Result<Vec<M>, ServeError> {
        let mut kv = self.inner.etcd.kv_client();
        let resp = kv
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| ServeError::Etcd { op: "get", source })?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| match M::decode(kv.value()) {
                Ok(m) => Some(m),
                Err(error) => {
                    warn!(key = %String::from_utf8_lossy(kv.key()), %error, "skipping an undecodable status value");
                    None
                }
            })
            .collect())
    }
}

/// The watch stream of one client.
struct WatchStream {
    svc: MeshService,
    filter: StreamFilter,
    /// The revision the client has reached.
    revision: i64,
}

type ItemResult = Result<pb::WatchResponse, Status>;
type WireResult = Result<WireMsg, Status>;

/// Keys per page when a resume reads etcd's past (keys only, so pages can be large).
const HISTORY_READ_PAGE: i64 = 10_000;

impl WatchStream {
    /// Messages for a snapshot: optional reset, chunks, the closing revision, Synced.
    fn snapshot_messages(
        &self,
        snapshot: crate::index::Snapshot,
        reset: Option<crate::index::ResetReason>,
    ) -> Vec<WireMsg> {
        let cfg = &self.svc.inner.cfg;
        let metrics = &self.svc.inner.metrics;
        let mut out = Vec::new();
        if let Some(reason) = reset {
            Metrics::inc_reason(&metrics.resets, reason.label());
            info!(%reason, "resetting watch stream");
            out.push(msg(
                0,
                pb::watch_response::Payload::Reset(pb::Reset {
                    reason: reason.to_string(),
                }),
            ));
        }
        metrics.snapshots.inc();
        let mut chunker = Chunker::new(cfg);
        for obj in &snapshot.objects {
            // A peer never sees non-shared services: absent from its snapshot.
            if obj.deleted || !self.filter.presented(obj) {
                continue;
            }
            if let Some(e) = self.filter.present(obj) {
                chunker.push(&e);
            }
        }
        let mut chunks = chunker.finish();
        if chunks.is_empty() {
            chunks.push((Vec::new(), 0));
        }
        let n = chunks.len();
        for (i, (body, events)) in chunks.into_iter().enumerate() {
            let rev = if i + 1 == n { snapshot.revision } else { 0 };
            out.push(WireMsg::events(rev, body, events));
        }
        out.extend(self.synced_messages(&snapshot.synced, snapshot.revision));
        out
    }

    fn synced_messages(&self, synced: &[(String, Kind)], revision: i64) -> Vec<WireMsg> {
        synced
            .iter()
            .filter(|(c, k)| self.filter.accepts(c, *k))
            .map(|(c, k)| {
                msg(
                    revision,
                    pb::watch_response::Payload::Synced(pb::Synced {
                        cluster: c.clone(),
                        kind: *k as i32,
                    }),
                )
            })
            .collect()
    }

    /// Messages for consecutive batches: events coalesced across batches (each message
    /// ends on a batch boundary carrying that batch's revision when possible), Synced
    /// markers after the events of their batch.
    fn batch_messages(&mut self, batches: &[Arc<Batch>]) -> Vec<WireMsg> {
        let cfg = &self.svc.inner.cfg;
        let mut out = Vec::new();
        let mut chunker = Chunker::new(cfg);
        let mut synced = Vec::new();
        let mut pending_rev = self.revision;
        let flush = |chunker: Chunker, out: &mut Vec<WireMsg>, from: i64, to: i64| {
            let chunks = chunker.finish();
            let n = chunks.len();
            for (i, (body, events)) in chunks.into_iter().enumerate() {
                // Only the last chunk completes the batch(es): earlier chunks carry the
                // revision the client had before them.
                let rev = if i + 1 == n { to } else { from };
                out.push(WireMsg::events(rev, body, events));
            }
        };
        for b in batches {
            for c in &b.changes {
                match c {
                    Change::Object(obj) => {
                        if let Some(e) = self.filter.present(obj) {
                            chunker.push(&e);
                        }
                    }
                    Change::Synced { cluster, kind } => synced.push((cluster.clone(), *kind)),
                }
            }
            if !synced.is_empty() {
                flush(
                    std::mem::replace(&mut chunker, Chunker::new(cfg)),
                    &mut out,
                    pending_rev,
                    b.revision,
                );
                out.extend(self.synced_messages(&synced, b.revision));
                synced.clear();
                pending_rev = b.revision;
            }
            self.revision = b.revision;
        }
        flush(chunker, &mut out, pending_rev, self.revision);
        out
    }

    /// Subscribes (or re-subscribes after lagging) and returns the start messages.
    async fn start(&mut self, resume: i64) -> Result<(Subscription, Vec<WireMsg>), Status> {
        let filter = self.filter.clone();
        let keys = &self.svc.inner.cfg.keys;
        // Where a resume older than the history reads etcd's past: only the clusters this
        // stream may see.
        let prefixes: Vec<String> = match &filter.clusters {
            None => vec![keys.clusters_prefix()],
            Some(clusters) => clusters.iter().map(|c| keys.cluster_prefix(c)).collect(),
        };
        let accept = move |c: &str, k: Kind| filter.accepts(c, k);
        let mut sub = self
            .svc
            .inner
            .index
            .subscribe_resuming(
                &self.svc.inner.etcd,
                &prefixes,
                HISTORY_READ_PAGE,
                resume,
                &accept,
            )
            .await
            .map_err(|_| Status::from(ServeError::ShuttingDown))?;
        let start = std::mem::replace(
            &mut sub.start,
            Start::Resume {
                from: 0,
                missed: Vec::new(),
                synced: Vec::new(),
                revision: 0,
            },
        );
        let msgs = match start {
            Start::Snapshot { snapshot, reset } => {
                self.revision = snapshot.revision;
                self.snapshot_messages(snapshot, reset)
            }
            Start::Resume {
                from,
                missed,
                synced,
                revision,
            } => {
                self.svc.inner.metrics.resumes.inc();
                debug!(
                    from,
                    revision,
                    missed = missed.len(),
                    "resuming watch from history"
                );
                self.revision = from;
                let mut msgs = self.batch_messages(&missed);
                self.revision = revision;
                msgs.extend(self.synced_messages(&synced, revision));
                msgs
            }
        };
        Ok((sub, msgs))
    }

    fn into_stream(mut self, resume: i64) -> impl Stream<Item = WireResult> + Send + 'static {
        let metrics = self.svc.inner.metrics.clone();
        let shutdown = self.svc.inner.shutdown.clone();
        let heartbeat = self.svc.inner.cfg.heartbeat_interval;
        async_stream::stream! {
            let mut resume = resume;
            'subscribe: loop {
                let (mut sub, msgs) = match self.start(resume).await {
                    Ok(x) => x,
                    Err(status) => {
                        yield Err(status);
                        return;
                    }
                };
                for m in msgs {
                    count(&metrics, &m);
                    yield Ok(m);
                }
                // A heartbeat goes out when nothing was *sent* for an interval (batches
                // that filter to nothing do not count).
                let mut next_heartbeat = tokio::time::Instant::now() + heartbeat;
                loop {
                    enum Next {
                        Update(Update),
                        Heartbeat,
                        Shutdown,
                    }
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => Next::Shutdown,
                        u = sub.next() => Next::Update(u),
                        _ = tokio::time::sleep_until(next_heartbeat) => Next::Heartbeat,
                    };
                    match next {
                        Next::Heartbeat => {
                            next_heartbeat = tokio::time::Instant::now() + heartbeat;
                            metrics.messages_sent.inc();
                            yield Ok(msg(self.revision, pb::watch_response::Payload::Progress(pb::Progress {})));
                        }
                        Next::Update(Update::Batch(first)) => {
                            // Coalesce whatever is already queued behind it.
                            let mut batches = vec![first];
                            while batches.len() < 64 {
                                match sub.try_next() {
                                    Some(b) => batches.push(b),
                                    None => break,
                                }
                            }
                            for m in self.batch_messages(&batches) {
                                next_heartbeat = tokio::time::Instant::now() + heartbeat;
                                count(&metrics, &m);
                                yield Ok(m);
                            }
                        }
                        Next::Update(Update::Lagged) => {
                            debug!(revision = self.revision, "stream fell behind; resuming from its revision");
                            resume = self.revision;
                            continue 'subscribe;
                        }
                        Next::Update(Update::Closed) | Next::Shutdown => {
                            yield Err(Status::from(ServeError::ShuttingDown));
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn count(metrics: &Metrics, m: &WireMsg) {
    metrics.messages_sent.inc();
    if m.events > 0 {
        metrics.events_sent.inc_by(m.events as u64);
    }
}

/// Decrements the open-streams gauge when a stream ends, however it ends.
struct OpenStream {
    metrics: Metrics,
    role: &'static str,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics
            .watch_streams
            .get_or_create(&RoleLabels {
                role: self.role.into(),
            })
            .dec();
    }
}

type WatchResult = Pin<Box<dyn Stream<Item = ItemResult> + Send + 'static>>;
type WireStream = Pin<Box<dyn Stream<Item = WireResult> + Send + 'static>>;

impl MeshService {
    /// Opens a watch stream of encoded messages (see [`WireMsg`]).
    fn watch_wire(&self, req: Request<pb::WatchRequest>) -> Result<WireStream, Status> {
        let access = self.access(&req)?;
        let remote = ConnInfo::of(&req)
            .and_then(|c| c.remote_addr)
            .or_else(|| req.remote_addr());
        let filter = self
            .filter(&access, req.get_ref())
            .inspect_err(|e| self.refused(e, &req))?;
        let body = req.into_inner();
        let span = info_span!(
            "watch",
            caller = %access.who(),
            remote = ?remote,
            clusters = ?body.clusters,
            resume = body.resume_revision,
        );
        info!(parent: &span, "watch stream opened");
        let role = access.role_label();
        self.inner
            .metrics
            .watch_streams
            .get_or_create(&RoleLabels { role: role.into() })
            .inc();
        let guard = OpenStream {
            metrics: self.inner.metrics.clone(),
            role,
        };
        let inner = WatchStream {
            svc: self.clone(),
            filter,
            revision: 0,
        }
        .into_stream(body.resume_revision);
        Ok(Box::pin(SpannedStream {
            inner: Box::pin(inner),
            span,
            _guard: guard,
        }))
    }
}

/// The served `mesh.v1.Mesh`: `Watch` through [`WireCodec`], every other method through
/// the generated server.
#[derive(Clone)]
pub struct MeshGrpc {
    typed: mesh_server::MeshServer<MeshService>,
    svc: MeshService,
}

impl std::fmt::Debug for MeshGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshGrpc").field("svc", &self.svc).finish()
    }
}

impl tonic::server::NamedService for MeshGrpc {
    const NAME: &'static str =
        <mesh_server::MeshServer<MeshService> as tonic::server::NamedService>::NAME;
}

/// `Watch` as a tonic streaming service of [`WireMsg`]s.
struct WatchWire(MeshService);

impl tonic::server::ServerStreamingService<pb::WatchRequest> for WatchWire {
    type Response = WireMsg;
    type ResponseStream = WireStream;
    type Future = tonic::codegen::BoxFuture<Response<WireStream>, Status>;

    fn call(&mut self, request: Request<pb::WatchRequest>) -> Self::Future {
        let r = self.0.watch_wire(request).map(Response::new);
        Box::pin(async move { r })
    }
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for MeshGrpc
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if req.uri().path() == WATCH_PATH {
            let svc = WatchWire(self.svc.clone());
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(WireCodec).apply_max_message_size_config(
                    Some(MAX_REQUEST_BYTES),
                    Some(MAX_RESPONSE_BYTES),
                );
                Ok(grpc.server_streaming(svc, req).await)
            })
        } else {
            self.typed.call(req)
        }
    }
}

/// The path of the `Watch` method.
const WATCH_PATH: &str = "/mesh.v1.Mesh/Watch";

#[tonic::async_trait]
impl mesh_server::Mesh for MeshService {
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ClusterConfig>, Status> {
        self.access(&req)?;
        Ok(Response::new(self.inner.cfg.local.clone()))
    }

    type WatchStream = WatchResult;

    /// The typed form of the wire stream ([`MeshGrpc`] serves `Watch` without it): each
    /// message decoded from its bytes.
    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchResult>, Status> {
        use futures::StreamExt;
        let wire = self.watch_wire(req)?;
        let typed =
            wire.map(|r| r.and_then(|m| m.decode().map_err(|e| ServeError::Reencode(e).into())));
        Ok(Response::new(Box::pin(typed)))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let access = self.access(&req)?;
        if let Access::Peer { who } = &access {
            let e = ServeError::NotAnAgent {
                caller: who.clone(),
                rpc: "Status",
            };
            self.refused(&e, &req);
            return Err(e.into());
        }
        let keys = &self.inner.cfg.keys;
        let peers: Vec<pb::PeerStatus> = self.read_all(keys.peers_prefix()).await?;
        let mut agents: Vec<pb::AgentStatus> = self.read_all(keys.agents_prefix()).await?;
        agents.sort_by(|a, b| a.node.cmp(&b.node));
        let local = &self.inner.cfg.local;
        let clusters = self
            .inner
            .index
            .counts()
            .into_iter()
            .map(|(cluster, c)| pb::ClusterStatus {
                id: if cluster == local.name {
                    local.id
                } else {
                    c.id.unwrap_or(0)
                },
                local: cluster == local.name,
                counts: c
                    .kinds
                    .iter()
                    // A peer's policies are never imported: only the local cluster has the
                    // kind (and must sync it).
                    .filter(|(kind, ..)| {
                        cluster == local.name || !mesh_proto::keys::LOCAL_ONLY_KINDS.contains(kind)
                    })
                    .map(|(kind, count, synced)| pb::KindCount {
                        kind: *kind as i32,
                        count: *count,
                        synced: *synced,
                    })
                    .collect(),
                cluster,
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            local: Some(local.clone()),
            clusters,
            peers,
            agents,
            revision: self.inner.index.revision(),
            leader: *self.inner.leader.borrow(),
        }))
    }

    async fn report_status(
        &self,
        req: Request<pb::AgentStatus>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        let access = self.access(&req)?;
        let refuse = |e: ServeError| -> Status {
            self.refused(&e, &req);
            e.into()
        };
        let cert_node = match &access {
            Access::Local {
                agent: true, node, ..
            } => node.clone(),
            other => {
                return Err(refuse(ServeError::NotAnAgent {
                    caller: other.who().to_owned(),
                    rpc: "ReportStatus",
                }));
            }
        };
        let report_node = req.get_ref().node.clone();
        if let Some(n) = &cert_node
            && *n != report_node
        {
            return Err(refuse(ServeError::NodeMismatch {
                caller: access.who().to_owned(),
                node: report_node,
            }));
        }
        if report_node.is_empty() || report_node.contains('/') || report_node.len() > 253 {
            return Err(ServeError::InvalidNode(report_node).into());
        }
        let mut status = req.into_inner();
        if status.reported_at_unix_ms == 0 {
            status.reported_at_unix_ms = unix_ms();
        }
        let ttl = self.inner.cfg.agent_status_ttl.as_secs().max(1) as i64;
        let mut lease = self.inner.etcd.lease_client();
        let granted = lease
            .grant(ttl, None)
            .await
            .map_err(|source| ServeError::Etcd {
                op: "lease grant",
                source,
            })?;
        let mut kv = self.inner.etcd.kv_client();
        kv.put(
            self.inner.cfg.keys.agent(&report_node),
            status.encode_to_vec(),
            Some(PutOptions::new().with_lease(granted.id())),
        )
        .await
        .map_err(|source| ServeError::Etcd { op: "put", source })?;
        self.inner.metrics.status_reports.inc();
        debug!(node = %report_node, ttl, "stored agent status");
        Ok(Response::new(pb::ReportStatusResponse {}))
    }
}

/// A watch stream that enters its span while polled and counts itself open while alive.
struct SpannedStream {
    inner: WireStream,
    span: tracing::Span,
    _guard: OpenStream,
}

impl Stream for SpannedStream {
    type Item = WireResult;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<WireResult>> {
        let this = &mut *self;
        let _e = this.span.enter();
        this.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{IndexConfig, RawEvent};
    use futures::StreamExt;
    use mesh_proto::pb::mesh_server::Mesh;
    use pb::watch_response::Payload;

    fn svc(index: &Index, cfg: impl FnOnce(&mut ServeConfig)) -> (MeshService, CancellationToken) {
        let mut c = ServeConfig::new(
            pb::ClusterConfig {
                name: "east".into(),
                id: 1,
                ..Default::default()
            },
            Keys::default(),
        );
        c.heartbeat_interval = Duration::from_secs(5);
        cfg(&mut c);
        // The watch path never touches etcd; the client connects lazily.
        let etcd =
            futures::executor::block_on(etcd_client::Client::connect(["http://127.0.0.1:1"], None))
                .expect("lazy etcd client");
        let shutdown = CancellationToken::new();
        let svc = MeshService::new(
            c,
            index.clone(),
            etcd,
            Authenticator::Insecure,
            Metrics::default(),
            watch::channel(false).1,
            shutdown.clone(),
        );
        (svc, shutdown)
    }

    fn put(cluster: &str, kind: Kind, name: &str, value: Vec<u8>, rev: i64) -> RawEvent {
        RawEvent {
            key: Keys::default().object(cluster, kind, name).into_bytes(),
            value: Some(value),
            mod_revision: rev,
        }
    }

    fn node(cluster: &str, name: &str, rev: i64) -> RawEvent {
        put(
            cluster,
            Kind::Node,
            name,
            pb::Node {
                cluster: cluster.into(),
                name: name.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            rev,
        )
    }

    async fn open(svc: &MeshService, req: pb::WatchRequest) -> WatchResult {
        svc.watch(Request::new(req))
            .await
            .expect("watch")
            .into_inner()
    }

    async fn next(s: &mut WatchResult) -> pb::WatchResponse {
        s.next().await.expect("stream open").expect("message")
    }

    fn decoded(msgs: &[WireMsg]) -> Vec<pb::WatchResponse> {
        msgs.iter().map(|m| m.decode().expect("decodes")).collect()
    }

    fn events(m: &pb::WatchResponse) -> Vec<String> {
        match &m.payload {
            Some(Payload::Events(e)) => e
                .events
                .iter()
                .map(|e| format!("{}{}", e.name, if e.value.is_some() { "" } else { "-" }))
                .collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_chunks_carry_the_revision_only_on_the_last_and_heartbeats_when_idle() {
        let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
        index.with_state(|st| {
            st.reset(
                9,
                (1..=5).map(|i| node("east", &format!("n{i}"), i)).collect(),
            )
        });
        let (svc, _stop) = svc(&index, |c| c.max_events_per_message = 2);
        let mut s = open(&svc, pb::WatchRequest::default()).await;
        let chunks = [next(&mut s).await, next(&mut s).await, next(&mut s).await];
        assert_eq!(
            chunks.iter().map(|m| m.revision).collect::<Vec<_>>(),
            [0, 0, 9]
        );
        assert_eq!(
            chunks.iter().flat_map(events).collect::<Vec<_>>(),
            ["n1", "n2", "n3", "n4", "n5"]
        );

        // Idle: a heartbeat after exactly one interval (paused clock).
        let t0 = tokio::time::Instant::now();
        let m = next(&mut s).await;
        assert_eq!(m.payload, Some(Payload::Progress(pb::Progress {})));
        assert_eq!((m.revision, t0.elapsed()), (9, Duration::from_secs(5)));

        // A progress notification from etcd moves the heartbeat's revision.
        index.with_state(|st| st.advance(12));
        let m = next(&mut s).await;
        assert_eq!(
            (m.revision, m.payload),
            (12, Some(Payload::Progress(pb::Progress {})))
        );

        // Live batches: one message per batch when they arrive one by one.
        index.with_state(|st| st.apply(vec![node("east", "n6", 13)]));
        let m = next(&mut s).await;
        assert_eq!((m.revision, events(&m)), (13, vec!["n6".to_string()]));
    }

    #[tokio::test(start_paused = true)]
    async fn queued_batches_are_coalesced_and_synced_follows_its_events() {
        let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
        index.with_state(|st| st.reset(1, vec![]));
        let (svc, _stop) = svc(&index, |_| {});
        let mut s = open(&svc, pb::WatchRequest::default()).await;
        assert_eq!(next(&mut s).await.revision, 1);
        index.with_state(|st| {
            st.apply(vec![node("east", "a", 2)]);
            st.apply(vec![
                node("east", "b", 3),
                RawEvent {
                    key: Keys::default().synced("east", Kind::Node).into_bytes(),
                    value: Some(vec![]),
                    mod_revision: 3,
                },
            ]);
            st.apply(vec![node("east", "c", 4)]);
        });
        let m = next(&mut s).await;
        assert_eq!((m.revision, events(&m)), (3, vec!["a".into(), "b".into()]));
        let m = next(&mut s).await;
        assert_eq!(
            (m.revision, m.payload),
            (
                3,
                Some(Payload::Synced(pb::Synced {
                    cluster: "east".into(),
                    kind: Kind::Node as i32
                }))
            )
        );
        let m = next(&mut s).await;
        assert_eq!((m.revision, events(&m)), (4, vec!["c".to_string()]));
    }

    #[tokio::test(start_paused = true)]
    async fn peers_see_only_the_serving_cluster_and_no_unshared_services() {
        let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
        let svc_value = |shared| {
            pb::GlobalService {
                cluster: "east".into(),
                namespace: "ns".into(),
                name: "web".into(),
                shared,
                ..Default::default()
            }
            .encode_to_vec()
        };
        index.with_state(|st| {
            st.reset(
                3,
                vec![
                    put("east", Kind::Service, "ns/web", svc_value(false), 2),
                    node("east", "e1", 2),
                    node("west", "w1", 3),
                ],
            )
        });
        let (service, _stop) = svc(&index, |_| {});
        let filter = StreamFilter {
            clusters: Some(BTreeSet::from(["east".to_string()])),
            kinds: BTreeSet::new(),
            reader: Reader::Peer,
        };
        let mut ws = WatchStream {
            svc: service,
            filter,
            revision: 0,
        };
        let (mut sub, msgs) = ws.start(0).await.unwrap();
        let msgs = decoded(&msgs);
        assert_eq!(msgs.iter().flat_map(events).collect::<Vec<_>>(), ["e1"]);
        index.with_state(|st| {
            st.apply(vec![put(
                "east",
                Kind::Service,
                "ns/web",
                svc_value(true),
                4,
            )])
        });
        index.with_state(|st| {
            st.apply(vec![put(
                "east",
                Kind::Service,
                "ns/web",
                svc_value(false),
                5,
            )])
        });
        let Update::Batch(b1) = sub.next().await else {
            panic!()
        };
        let Update::Batch(b2) = sub.next().await else {
            panic!()
        };
        let msgs = decoded(&ws.batch_messages(&[b1, b2]));
        assert_eq!(
            msgs.iter().flat_map(events).collect::<Vec<_>>(),
            ["ns/web", "ns/web-"]
        );
    }

    /// DESIGN.md section 14: policies are for the cluster's own agents only. A peer gets no
    /// policy object and no policy Synced marker, in its snapshot or live, even when it asks
    /// for the kind; the cluster's own readers get both.
    #[tokio::test(start_paused = true)]
    async fn peers_never_receive_policies_even_when_they_ask_for_the_kind() {
        let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
        let name = "networkpolicies/shop/deny-all";
        let policy = |rev| {
            let value = pb::Policy {
                cluster: "east".into(),
                kind: pb::PolicyKind::NetworkPolicy as i32,
                namespace: "shop".into(),
                name: "deny-all".into(),
                object: format!(r#"{{"rev":{rev}}}"#),
            };
            put("east", Kind::Policy, name, value.encode_to_vec(), rev)
        };
        let synced = |kind, rev| RawEvent {
            key: Keys::default().synced("east", kind).into_bytes(),
            value: Some(pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec()),
            mod_revision: rev,
        };
        index.with_state(|st| {
            st.reset(
                3,
                vec![
                    policy(2),
                    node("east", "e1", 2),
                    synced(Kind::Node, 3),
                    synced(Kind::Policy, 3),
                ],
            )
        });
        let (service, _stop) = svc(&index, |_| {});
        let all = BTreeSet::new();
        let policies = BTreeSet::from([Kind::Policy as i32]);
        let both = BTreeSet::from([Kind::Policy as i32, Kind::Node as i32]);
        let mut rev = 3;
        for (reader, kinds, sees) in [
            (Reader::Peer, &all, false),
            (Reader::Peer, &policies, false),
            (Reader::Peer, &both, false),
            (Reader::OwnCluster, &all, true),
            (Reader::OwnCluster, &policies, true),
        ] {
            let case = format!("{reader:?} asking for {kinds:?}");
            let mut ws = WatchStream {
                svc: service.clone(),
                filter: StreamFilter {
                    clusters: Some(BTreeSet::from(["east".to_string()])),
                    kinds: kinds.clone(),
                    reader,
                },
                revision: 0,
            };
            let (mut sub, msgs) = ws.start(0).await.unwrap();
            let received = |msgs: &[pb::WatchResponse]| {
                let mut objects = Vec::new();
                let mut markers = Vec::new();
                for m in msgs {
                    match &m.payload {
                        Some(Payload::Events(e)) => {
                            objects.extend(e.events.iter().map(|e| (e.kind, e.name.clone())))
                        }
                        Some(Payload::Synced(s)) => markers.push(s.kind),
                        _ => {}
                    }
                }
                (objects, markers)
            };
            let (objects, markers) = received(&decoded(&msgs));
            let policy_objects = objects.iter().filter(|(k, _)| *k == Kind::Policy as i32);
            assert_eq!(
                policy_objects.count(),
                usize::from(sees),
                "{case}: {objects:?}"
            );
            assert_eq!(
                markers.contains(&(Kind::Policy as i32)),
                sees,
                "{case}: {markers:?}"
            );
            // A later change, then a delete, of the policy.
            rev += 1;
            index.with_state(|st| st.apply(vec![policy(rev)]));
            rev += 1;
            index.with_state(|st| {
                st.apply(vec![RawEvent {
                    value: None,
                    ..policy(rev)
                }])
            });
            let Update::Batch(b1) = sub.next().await else {
                panic!("{case}: expected a batch")
            };
            let Update::Batch(b2) = sub.next().await else {
                panic!("{case}: expected a batch")
            };
            let (objects, _) = received(&decoded(&ws.batch_messages(&[b1, b2])));
            let expected = if sees {
                vec![(Kind::Policy as i32, name.to_string()); 2]
            } else {
                vec![]
            };
            assert_eq!(objects, expected, "{case}");
            index.with_state(|st| st.apply(vec![policy(rev + 1)]));
            rev += 1;
        }
    }

    #[test]
    fn assembled_events_messages_are_the_prost_encoding() {
        let evs: Vec<pb::Event> = (0..3)
            .map(|i| pb::Event {
                kind: Kind::Node as i32,
                cluster: "east".into(),
                name: format!("n{i}"),
                revision: 300 + i,
                value: (i != 1).then(|| {
                    pb::event::Value::Node(pb::Node {
                        cluster: "east".into(),
                        name: format!("n{i}"),
                        ..Default::default()
                    })
                }),
            })
            .collect();
        for (revision, n) in [(0, 0), (0, 3), (1 << 40, 3), (7, 1)] {
            let mut chunker = Chunker::new(&ServeConfig::new(
                pb::ClusterConfig::default(),
                Keys::default(),
            ));
            for ev in &evs[..n] {
                chunker.push(&ev.encode_to_vec());
            }
            let (body, count) = chunker.finish().pop().unwrap_or_default();
            let wire = WireMsg::events(revision, body, count);
            let typed = pb::WatchResponse {
                revision,
                payload: Some(Payload::Events(pb::Events {
                    events: evs[..n].to_vec(),
                })),
            };
            let mut bytes = wire.head.clone();
            bytes.extend_from_slice(&wire.body);
            assert_eq!(
                bytes,
                typed.encode_to_vec(),
                "revision {revision}, {n} events"
            );
            assert_eq!((wire.events, wire.decode().unwrap()), (n, typed));
        }
    }

    #[test]
    fn every_error_maps_to_a_specific_code() {
        use tonic::Code;
        let garbage = || pb::WatchRequest::decode(&[0x0a, 0x05][..]).unwrap_err();
        let cases: Vec<(ServeError, Code)> = vec![
            (ServeError::NoConnInfo, Code::Unauthenticated),
            (
                ServeError::ForeignCluster {
                    caller: "peer".into(),
                    serving: "a".into(),
                    requested: "b".into(),
                },
                Code::PermissionDenied,
            ),
            (ServeError::InvalidKind(9), Code::InvalidArgument),
            (ServeError::InvalidRevision(-1), Code::InvalidArgument),
            (ServeError::InvalidNode("".into()), Code::InvalidArgument),
            (
                ServeError::NotAnAgent {
                    caller: "x".into(),
                    rpc: "ReportStatus",
                },
                Code::PermissionDenied,
            ),
            (ServeError::ShuttingDown, Code::Unavailable),
            (
                ServeError::MalformedRequest(garbage()),
                Code::InvalidArgument,
            ),
            (ServeError::Reencode(garbage()), Code::Internal),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg.as_str()));
        }
    }
}
