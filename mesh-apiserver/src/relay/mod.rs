//! The flow relay (DESIGN.md section 15): Hubble's `observer.Observer` served on the
//! apiserver's gRPC port, aggregating the Observer servers of this cluster's agents and,
//! when asked, the relays of the connected peers.
//!
//! - **Agents** are found through their status records (`agents/<node>`:
//!   `AgentStatus.observer_address`); an agent with no address does not serve flows and is
//!   left out. Each is dialed with this apiserver's own certificate, and must prove
//!   `spiffe://<cluster>.mesh/agent/<node>` (`ClientTls::for_agent`). Channels are kept
//!   per node and address and dropped when a call fails, so the next request dials again.
//! - **GetFlows** fans the request out to every source. Without `follow` the answers are
//!   collected, the two ends of each connection joined ([`merge::join_ends`]), ordered by
//!   time and cut to `number` in total ([`merge::last_n`]: `--last N` is N across every
//!   node and cluster). With `follow` the streams go through a bounded sort window
//!   ([`merge::SortWindow`]) that joins ends held together. A source that cannot be reached
//!   is reported as a `relay.NodeStatusEvent` (`NODE_UNAVAILABLE`, its node names) and the
//!   request goes on without it.
//! - **Scope**: by default this cluster's agents. A caller of this cluster that sends gRPC
//!   metadata `x-mesh-scope: all-clusters` also gets each connected peer's own flows (the
//!   peer's relay, dialed with the importer's credentials: this apiserver's certificate
//!   and the peer's CA). A peer caller (`Role::Peer`) always gets only this cluster's own
//!   agents, whatever it sends: a relay never fans out for a peer (DESIGN.md section 8).

pub mod merge;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::GetOptions;
use futures::Stream;
use mesh_core::ClusterName;
use mesh_proto::flows::FlowFilters;
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;
use mesh_proto::hubble::observer::observer_client::ObserverClient;
use mesh_proto::hubble::observer::observer_server::{Observer, ObserverServer};
use mesh_proto::hubble::observer::{
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, GetNodesResponse, Node,
    ServerStatusRequest, ServerStatusResponse, Tls,
};
use mesh_proto::hubble::relay::{NodeState, NodeStatusEvent};
use mesh_proto::keys::Keys;
use mesh_proto::pb;
use mesh_proto::peer_entry::{PeerSet, PeerSpec};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::grpc::{Access, MeshService};

/// The gRPC metadata key a caller sets to widen the scope of a request.
pub const SCOPE_HEADER: &str = "x-mesh-scope";
/// The value of [`SCOPE_HEADER`] asking for every connected cluster's flows.
pub const SCOPE_ALL_CLUSTERS: &str = "all-clusters";

/// How the relay dials: this apiserver's identity and the cluster's CA (`None` with
/// `--insecure`: agents are dialed in plaintext, on loopback only).
#[derive(Debug, Clone)]
pub struct RelayIdentity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub local: ClusterName,
    pub keys: Keys,
    pub identity: Option<RelayIdentity>,
    /// Limit for dialing one agent or peer (TCP + TLS).
    pub connect_timeout: Duration,
    /// Limit for a non-follow request or a status call to one source.
    pub request_timeout: Duration,
    /// Follow mode: how long a flow is held for ordering, and how many at most.
    pub sort_hold: Duration,
    pub sort_max: usize,
    /// How far apart the two records of one connection may be.
    pub join_window: Duration,
}

impl RelayConfig {
    pub fn new(local: ClusterName, keys: Keys, identity: Option<RelayIdentity>) -> Self {
        Self {
            local,
            keys,
            identity,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(15),
            sort_hold: Duration::from_secs(1),
            sort_max: 1000,
            join_window: merge::DEFAULT_JOIN_WINDOW,
        }
    }
}

/// Where flows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// An agent of this cluster: node name and Observer address.
    Agent { node: String, address: String },
    /// A connected peer's relay.
    Peer(PeerSpec),
}

impl Source {
    /// The channel cache's key: a changed address or CA dials again.
    fn key(&self) -> String {
        match self {
            Source::Agent { node, address } => format!("agent|{node}|{address}"),
            Source::Peer(spec) => format!(
                "peer|{}|{}|{}|{}",
                spec.name,
                spec.address,
                spec.server_name.as_deref().unwrap_or(""),
                spec.ca_pem
            ),
        }
    }
}

/// The relay: `observer.Observer` over this cluster's agents and its peers' relays.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RelayConfig,
    svc: MeshService,
    etcd: etcd_client::Client,
    peers: Option<watch::Receiver<Option<PeerSet>>>,
    channels: Mutex<HashMap<String, Channel>>,
    started: Instant,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("cluster", &self.inner.cfg.local)
            .finish_non_exhaustive()
    }
}

fn now_ts() -> prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn node_status(state: NodeState, node_names: Vec<String>, message: String) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: String::new(),
        time: Some(now_ts()),
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: state as i32,
            node_names,
            message,
        })),
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;
type BytesStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

// === impl Relay ===

impl Relay {
    pub fn new(
        cfg: RelayConfig,
        svc: MeshService,
        etcd: etcd_client::Client,
        peers: Option<watch::Receiver<Option<PeerSet>>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                svc,
                etcd,
                peers,
                channels: Mutex::new(HashMap::new()),
                started: Instant::now(),
            }),
        }
    }

    /// The tonic server for the relay.
    pub fn into_server(self) -> ObserverServer<Relay> {
        ObserverServer::new(self)
            .max_decoding_message_size(crate::grpc::MAX_REQUEST_BYTES)
            .max_encoding_message_size(crate::grpc::MAX_RESPONSE_BYTES)
    }

    fn local(&self) -> &str {
        self.inner.cfg.local.as_str()
    }

    /// The name a source's flows and statuses carry: `cluster/node` for an agent,
    /// `cluster/` (every node of it) for a peer's relay.
    fn source_name(&self, s: &Source) -> String {
        match s {
            Source::Agent { node, .. } => format!("{}/{node}", self.local()),
            Source::Peer(spec) => format!("{}/", spec.name),
        }
    }

    /// Whether the request may and does ask for every cluster.
    fn all_clusters<T>(&self, access: &Access, req: &Request<T>) -> bool {
        let asked = req
            .metadata()
            .get(SCOPE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(SCOPE_ALL_CLUSTERS));
        // A peer reads only this cluster's own data: never a further fan-out.
        asked && matches!(access, Access::Local { .. })
    }

    /// The agents serving Observer, from their status records, and the peers when asked.
    async fn sources(&self, all_clusters: bool) -> Result<Vec<Source>, Status> {
        let mut kv = self.inner.etcd.kv_client();
        let resp = kv
            .get(
                self.inner.cfg.keys.agents_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| Status::unavailable(format!("reading agent statuses from etcd: {e}")))?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            match pb::AgentStatus::decode(kv.value()) {
                Ok(s) if !s.observer_address.is_empty() => out.push(Source::Agent {
                    node: s.node,
                    address: s.observer_address,
                }),
                Ok(_) => {}
                Err(error) => {
                    warn!(key = %String::from_utf8_lossy(kv.key()), %error, "skipping an undecodable agent status")
                }
            }
        }
        out.sort_by_key(|s| self.source_name(s));
        if all_clusters && let Some(peers) = &self.inner.peers {
            let set = peers.borrow().clone().unwrap_or_default();
            out.extend(
                set.into_values()
                    .filter(|s| s.name != self.inner.cfg.local)
                    .map(Source::Peer),
            );
        }
        Ok(out)
    }

    /// A channel to `source`, dialed when none is cached.
    async fn channel(&self, source: &Source) -> Result<Channel, String> {
        if let Some(ch) = self.cached(source) {
            return Ok(ch);
        }
        let cfg = &self.inner.cfg;
        let endpoint = match (source, &cfg.identity) {
            (Source::Agent { address, .. }, None) => ClientEndpoint::plaintext(address.clone()),
            (Source::Agent { node, address }, Some(id)) => {
                let ca = tls::load_certs(&id.ca).map_err(|e| e.to_string())?;
                let me = TlsIdentity::load(&id.cert, &id.key).map_err(|e| e.to_string())?;
                let client = ClientTls::for_agent(ca, me, cfg.local.clone(), node.clone())
                    .map_err(|e| e.to_string())?;
                ClientEndpoint::new(address.clone(), client)
            }
            (Source::Peer(spec), Some(id)) => {
                let ca = tls::parse_certs(
                    spec.ca_pem.as_bytes(),
                    &format!("the CA of peer {}", spec.name),
                )
                .map_err(|e| e.to_string())?;
                let me = TlsIdentity::load(&id.cert, &id.key).map_err(|e| e.to_string())?;
                let client =
                    ClientTls::new(ca, me, Some(spec.name.clone())).map_err(|e| e.to_string())?;
                let mut ep = ClientEndpoint::new(spec.address.clone(), client);
                ep.server_name = spec.server_name.clone();
                ep
            }
            (Source::Peer(_), None) => return Err("peers need TLS".into()),
        };
        let mut endpoint = endpoint;
        endpoint.connect_timeout = cfg.connect_timeout;
        let ch = tls::connect_channel(&endpoint)
            .await
            .map_err(|e| e.to_string())?;
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.key(), ch.clone());
        Ok(ch)
    }

    fn cached(&self, source: &Source) -> Option<Channel> {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&source.key())
            .cloned()
    }

    /// Forgets a source's channel after a failed call, so the next request dials again.
    fn forget(&self, source: &Source) {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&source.key());
    }

    /// Drops cached channels of sources that are gone.
    fn prune(&self, sources: &[Source]) {
        let keep: Vec<String> = sources.iter().map(Source::key).collect();
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep.contains(k) || k.starts_with("peer|"));
    }

    async fn client(&self, source: &Source) -> Result<ObserverClient<Channel>, String> {
        Ok(ObserverClient::new(self.channel(source).await?)
            .max_decoding_message_size(crate::grpc::MAX_RESPONSE_BYTES))
    }

    /// Opens `GetFlows` on one source.
    async fn open_flows(
        &self,
        source: &Source,
        req: GetFlowsRequest,
    ) -> Result<tonic::Streaming<GetFlowsResponse>, String> {
        let mut client = self.client(source).await?;
        match client.get_flows(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                self.forget(source);
                Err(format!("{}: {}", s.code(), s.message()))
            }
        }
    }

    /// Non-follow: every source's answer, joined, ordered and cut to `number` in total.
    async fn collect(&self, sources: Vec<Source>, req: GetFlowsRequest) -> Vec<GetFlowsResponse> {
        let timeout = self.inner.cfg.request_timeout;
        let mut set = JoinSet::new();
        let per_source = GetFlowsRequest {
            number: merge::per_source_number(req.number),
            ..req.clone()
        };
        for s in sources {
            let relay = self.clone();
            let req = per_source.clone();
            set.spawn(async move {
                let name = relay.source_name(&s);
                let run = async {
                    let mut stream = relay.open_flows(&s, req).await?;
                    let mut got = Vec::new();
                    while let Some(item) = stream
                        .message()
                        .await
                        .map_err(|st| format!("{}: {}", st.code(), st.message()))?
                    {
                        got.push(item);
                    }
                    Ok::<_, String>(got)
                };
                let r = match tokio::time::timeout(timeout, run).await {
                    Ok(Ok(got)) => Ok(got),
                    Ok(Err(e)) => {
                        relay.forget(&s);
                        Err(e)
                    }
                    Err(_) => Err(format!("no complete answer within {timeout:?}")),
                };
                (name, r)
            });
        }
        let mut unavailable = Vec::new();
        let mut items = Vec::new();
        while let Some(r) = set.join_next().await {
            let Ok((name, r)) = r else { continue };
            match r {
                Ok(got) => items.extend(got),
                Err(e) => {
                    debug!(source = %name, error = %e, "flow source unavailable");
                    unavailable.push((name, e));
                }
            }
        }
        unavailable.sort();
        let (status, flows): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|r| !matches!(r.response_types, Some(ResponseTypes::Flow(_))));
        let flows = merge::bounded_answer(flows, req.number, req.first, self.inner.cfg.join_window);
        let mut out = Vec::new();
        if !unavailable.is_empty() {
            out.push(unavailable_event(&unavailable));
        }
        // Status events of peers' relays (their unavailable nodes) come first too.
        out.extend(status);
        out.extend(flows);
        out
    }

    /// Follow: every source streams into one sort window until the caller goes away.
    async fn follow(
        &self,
        sources: Vec<Source>,
        req: GetFlowsRequest,
        out: mpsc::Sender<Result<GetFlowsResponse, Status>>,
    ) {
        let (tx, mut rx) = mpsc::channel::<Result<GetFlowsResponse, (String, String)>>(1024);
        let mut tasks = JoinSet::new();
        let mut unavailable = Vec::new();
        for s in sources {
            let name = self.source_name(&s);
            match self.open_flows(&s, req.clone()).await {
                Err(e) => unavailable.push((name, e)),
                Ok(mut stream) => {
                    let tx = tx.clone();
                    let relay = self.clone();
                    tasks.spawn(async move {
                        loop {
                            match stream.message().await {
                                Ok(Some(item)) => {
                                    if tx.send(Ok(item)).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {
                                    let _ = tx.send(Err((name, "stream ended".into()))).await;
                                    return;
                                }
                                Err(st) => {
                                    relay.forget(&s);
                                    let msg = format!("{}: {}", st.code(), st.message());
                                    let _ = tx.send(Err((name, msg))).await;
                                    return;
                                }
                            }
                        }
                    });
                }
            }
        }
        drop(tx);
        if !unavailable.is_empty() && out.send(Ok(unavailable_event(&unavailable))).await.is_err() {
            return;
        }
        let cfg = &self.inner.cfg;
        let mut window = merge::SortWindow::new(cfg.sort_max, cfg.sort_hold, cfg.join_window);
        let mut open = true;
        while open || !window.is_empty() {
            let due = window.next_due();
            let sleep = async {
                match due {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = out.closed() => return,
                m = rx.recv(), if open => match m {
                    Some(Ok(item)) => window.push(item, Instant::now()),
                    Some(Err((name, msg))) => {
                        let ev = unavailable_event(&[(name, msg)]);
                        if out.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    None => open = false,
                },
                _ = sleep => {}
            }
            let ready = if open {
                window.pop_ready(Instant::now())
            } else {
                window.drain()
            };
            for item in ready {
                if out.send(Ok(item)).await.is_err() {
                    return;
                }
            }
        }
        tasks.abort_all();
    }

    /// ServerStatus of one source, within the request timeout.
    async fn status_of(&self, source: &Source) -> Result<ServerStatusResponse, String> {
        let run = async {
            let mut client = self.client(source).await?;
            client
                .server_status(ServerStatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        };
        let r = match tokio::time::timeout(self.inner.cfg.request_timeout, run).await {
            Ok(r) => r,
            Err(_) => Err("no answer in time".into()),
        };
        if r.is_err() {
            self.forget(source);
        }
        r
    }

    async fn statuses(
        &self,
        sources: &[Source],
    ) -> Vec<(Source, Result<ServerStatusResponse, String>)> {
        let futs = sources
            .iter()
            .map(|s| async move { (s.clone(), self.status_of(s).await) });
        futures::future::join_all(futs).await
    }

    fn uptime_ns(&self) -> u64 {
        self.inner.started.elapsed().as_nanos() as u64
    }
}

/// One `NODE_UNAVAILABLE` event naming every source that could not be read.
fn unavailable_event(unavailable: &[(String, String)]) -> GetFlowsResponse {
    let names = unavailable.iter().map(|(n, _)| n.clone()).collect();
    let message = unavailable
        .iter()
        .map(|(n, e)| format!("{n}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    node_status(NodeState::NodeUnavailable, names, message)
}

#[tonic::async_trait]
impl Observer for Relay {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        req: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let access = self.inner.svc.access(&req)?;
        let all = self.all_clusters(&access, &req);
        let request = req.into_inner();
        // Invalid filters are the caller's error, reported before any fan-out.
        FlowFilters::new(&request.whitelist, &request.blacklist)?;
        let sources = self.sources(all).await?;
        if !all {
            self.prune(&sources);
        }
        debug!(who = %access.who(), sources = sources.len(), all, follow = request.follow, "relaying flows");
        let (tx, rx) = mpsc::channel(256);
        let relay = self.clone();
        tokio::spawn(async move {
            if request.follow {
                relay.follow(sources, request, tx).await;
            } else {
                for item in relay.collect(sources, request).await {
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetAgentEventsStream = BytesStream<GetAgentEventsResponse>;

    async fn get_agent_events(
        &self,
        req: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        self.inner.svc.access(&req)?;
        Err(Status::unimplemented("mesh serves no agent events"))
    }

    type GetDebugEventsStream = BytesStream<GetDebugEventsResponse>;

    async fn get_debug_events(
        &self,
        req: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        self.inner.svc.access(&req)?;
        Err(Status::unimplemented("mesh serves no debug events"))
    }

    async fn get_nodes(
        &self,
        req: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let access = self.inner.svc.access(&req)?;
        let all = self.all_clusters(&access, &req);
        let sources = self.sources(all).await?;
        let mut nodes = Vec::new();
        let (agents, peers): (Vec<_>, Vec<_>) = sources
            .into_iter()
            .partition(|s| matches!(s, Source::Agent { .. }));
        for (s, st) in self.statuses(&agents).await {
            let Source::Agent { node, address } = &s else {
                continue;
            };
            let mut n = Node {
                name: self.source_name(&s),
                address: address.clone(),
                tls: Some(Tls {
                    enabled: self.inner.cfg.identity.is_some(),
                    server_name: format!("spiffe://{}.mesh/agent/{node}", self.local()),
                }),
                ..Default::default()
            };
            match st {
                Ok(st) => {
                    n.state = NodeState::NodeConnected as i32;
                    n.version = st.version;
                    n.uptime_ns = st.uptime_ns;
                    n.num_flows = st.num_flows;
                    n.max_flows = st.max_flows;
                    n.seen_flows = st.seen_flows;
                }
                Err(_) => n.state = NodeState::NodeUnavailable as i32,
            }
            nodes.push(n);
        }
        for s in &peers {
            let Source::Peer(spec) = s else { continue };
            let got = async {
                let mut c = self.client(s).await?;
                c.get_nodes(GetNodesRequest {})
                    .await
                    .map(|r| r.into_inner().nodes)
                    .map_err(|st| st.message().to_owned())
            };
            match tokio::time::timeout(self.inner.cfg.request_timeout, got).await {
                Ok(Ok(peer_nodes)) => nodes.extend(peer_nodes),
                _ => {
                    self.forget(s);
                    nodes.push(Node {
                        name: format!("{}/", spec.name),
                        address: spec.address.clone(),
                        state: NodeState::NodeUnavailable as i32,
                        ..Default::default()
                    });
                }
            }
        }
        Ok(Response::new(GetNodesResponse { nodes }))
    }

    async fn server_status(
        &self,
        req: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let access = self.inner.svc.access(&req)?;
        let all = self.all_clusters(&access, &req);
        let sources = self.sources(all).await?;
        let mut out = ServerStatusResponse {
            uptime_ns: self.uptime_ns(),
            version: format!("mesh-relay {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let (mut connected, mut unavailable) = (0u32, Vec::new());
        for (s, st) in self.statuses(&sources).await {
            match st {
                Ok(st) => {
                    out.num_flows += st.num_flows;
                    out.max_flows += st.max_flows;
                    out.seen_flows += st.seen_flows;
                    match s {
                        // A peer's relay counts its own nodes.
                        Source::Peer(_) => {
                            connected += st.num_connected_nodes.unwrap_or(0);
                            unavailable.extend(st.unavailable_nodes);
                        }
                        Source::Agent { .. } => connected += 1,
                    }
                }
                Err(_) => unavailable.push(self.source_name(&s)),
            }
        }
        unavailable.sort();
        out.num_connected_nodes = Some(connected);
        out.num_unavailable_nodes = Some(unavailable.len() as u32);
        out.unavailable_nodes = unavailable;
        Ok(Response::new(out))
    }
}
