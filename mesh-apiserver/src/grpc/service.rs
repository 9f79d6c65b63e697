//! The `mesh.v1.Mesh` service and its tonic wrapper [`MeshGrpc`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{GetOptions, PutOptions};
use mesh_core::select::Reader;
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, mesh_server};
use mesh_proto::request;
use mesh_proto::tls::{Caller, ConnInfo, Role};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::*;
use crate::index::Index;
use crate::metrics::Metrics;

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
    /// Largest request message decoded (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Watch streams open at once (`--max-watch-streams`).
    pub max_watch_streams: usize,
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
            max_request_bytes: MAX_REQUEST_BYTES,
            max_watch_streams: 10_000,
        }
    }
}

/// The `mesh.v1.Mesh` service.
#[derive(Clone)]
pub struct MeshService {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshService")
            .field("cluster", &self.inner.cfg.local.name)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    pub(super) cfg: ServeConfig,
    pub(super) index: Index,
    pub(super) etcd: etcd_client::Client,
    auth: Authenticator,
    pub(super) metrics: Metrics,
    leader: watch::Receiver<bool>,
    pub(super) shutdown: CancellationToken,
    /// Watch streams open now (bounded by `cfg.max_watch_streams`).
    pub(super) open_watches: Arc<std::sync::atomic::AtomicUsize>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
                open_watches: Arc::default(),
            }),
        }
    }

    /// The tonic server for this service with message size limits: `Watch` is served
    /// with [`WireCodec`] (events encoded once in the index), the unary methods with
    /// [`StrictCodec`] (an undecodable request is `InvalidArgument`), anything else by the
    /// generated server (`Unimplemented`).
    pub fn into_server(self) -> MeshGrpc {
        MeshGrpc {
            typed: mesh_server::MeshServer::new(self.clone())
                .max_decoding_message_size(self.inner.cfg.max_request_bytes)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            svc: self,
        }
    }

    fn local_cluster(&self) -> &str {
        &self.inner.cfg.local.name
    }

    /// Identifies the caller; refusals are counted and logged.
    pub(crate) fn access<T>(&self, req: &Request<T>) -> Result<Access, ServeError> {
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

    pub(super) fn refused<T>(&self, e: &ServeError, req: &Request<T>) {
        if let Some(reason) = e.refusal_reason() {
            Metrics::inc_reason(&self.inner.metrics.auth_refusals, reason);
            let remote = ConnInfo::of(req)
                .and_then(|c| c.remote_addr)
                .or_else(|| req.remote_addr());
            warn!(error = %e, reason, ?remote, "request refused");
        }
    }

    /// Validates a watch request against the caller's access
    /// ([`mesh_proto::request::watch_scope`], a pure function the fuzz targets drive).
    pub(super) fn filter(
        &self,
        access: &Access,
        req: &pb::WatchRequest,
    ) -> Result<StreamFilter, ServeError> {
        let reader = match access {
            Access::Local { .. } => Reader::OwnCluster,
            Access::Peer { .. } => Reader::Peer,
        };
        let scope = request::watch_scope(self.local_cluster(), reader, req)
            .map_err(|e| ServeError::from_request(e, access))?;
        Ok(StreamFilter {
            clusters: scope.clusters,
            kinds: scope.kinds,
            reader: scope.reader,
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
        use mesh_server::Mesh;
        let limit = Some(self.svc.inner.cfg.max_request_bytes);
        let svc = self.svc.clone();
        match req.uri().path() {
            WATCH_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(WireCodec)
                    .apply_max_message_size_config(limit, Some(MAX_RESPONSE_BYTES));
                Ok(grpc.server_streaming(WatchWire(svc), req).await)
            }),
            INFO_PATH => unary(svc, req, limit, |s, r| {
                Box::pin(async move { s.info(r).await })
            }),
            STATUS_PATH => unary(svc, req, limit, |s, r| {
                Box::pin(async move { s.status(r).await })
            }),
            REPORT_STATUS_PATH => unary(svc, req, limit, |s, r| {
                Box::pin(async move { s.report_status(r).await })
            }),
            _ => self.typed.call(req),
        }
    }
}

/// The paths of the methods.
const WATCH_PATH: &str = "/mesh.v1.Mesh/Watch";
const INFO_PATH: &str = "/mesh.v1.Mesh/Info";
const STATUS_PATH: &str = "/mesh.v1.Mesh/Status";
const REPORT_STATUS_PATH: &str = "/mesh.v1.Mesh/ReportStatus";

type UnaryFuture<Resp> = tonic::codegen::BoxFuture<Response<Resp>, Status>;

/// Serves one unary method with [`StrictCodec`] and the request size limit.
fn unary<B, Req, Resp>(
    svc: MeshService,
    req: tonic::codegen::http::Request<B>,
    limit: Option<usize>,
    f: fn(MeshService, Request<Req>) -> UnaryFuture<Resp>,
) -> tonic::codegen::BoxFuture<
    tonic::codegen::http::Response<tonic::body::Body>,
    std::convert::Infallible,
>
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(StrictCodec::<Resp, Req>::default())
            .apply_max_message_size_config(limit, Some(MAX_RESPONSE_BYTES));
        Ok(grpc.unary(Unary { svc, f }, req).await)
    })
}

/// A unary method of [`MeshService`] as a tonic service.
struct Unary<Req, Resp> {
    svc: MeshService,
    f: fn(MeshService, Request<Req>) -> UnaryFuture<Resp>,
}

impl<Req, Resp> tonic::server::UnaryService<Req> for Unary<Req, Resp>
where
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = UnaryFuture<Resp>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        (self.f)(self.svc.clone(), request)
    }
}

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
        if let Err(e) = request::check_report(cert_node.as_deref(), req.get_ref()) {
            let e = ServeError::from_request(e, &access);
            if e.refusal_reason().is_some() {
                return Err(refuse(e));
            }
            return Err(e.into());
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
