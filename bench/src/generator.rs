//! The synthetic peer generator: one process (mesh-bench itself) serving many synthetic
//! clusters over the real `mesh.v1` gRPC API, each cluster with its own test CA, serving
//! certificate and port, its objects held in memory (no etcd). An apiserver under test
//! imports them with its real importer, as it would real peers.
//!
//! Each cluster answers `Info` with its config and `Watch` as a mesh-apiserver does
//! (`mesh-apiserver/src/grpc/stream.rs`): a snapshot (events in chunks, revision 0 but on
//! the last chunk, which carries the snapshot's revision), a `Synced` per kind, then live
//! batches (each message carrying its batch's revision), `Progress` after a heartbeat
//! interval with nothing sent; a resume from a revision still in the cluster's history gets
//! exactly the missed batches, an older one a `Reset` and a fresh snapshot. Changes
//! ([`SynthCluster::apply`]) are one revision each, like one etcd transaction.
//!
//! Not simulated: etcd (no compaction, no write latency on the peer side), the peer's
//! publisher and index, policies and link records (never served to peers).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_core::ClusterName;
use mesh_proto::keys::ALL_KINDS;
use mesh_proto::pb::{self, Kind, event::Value, watch_response::Payload};
use mesh_proto::peer_entry::PeerSpec;
use mesh_proto::tls::{self, IncomingOptions, ServerTls, TlsIdentity, TrustStore};
use mesh_testkit::certs::TestCa;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

/// Events per snapshot message.
const SNAPSHOT_CHUNK: usize = 1000;
/// Batches kept for resumes, per cluster.
const HISTORY: usize = 20_000;
/// Live batches a stream may fall behind before it re-reads the history.
const LIVE_BUFFER: usize = 4096;

/// One object of a synthetic cluster: (kind, name) -> value.
pub type Object = (Kind, String, Value);

/// A change: an upsert (`Some`) or a delete (`None`) of (kind, name).
pub type Change = (Kind, String, Option<Value>);

/// A batch of changes at one revision.
#[derive(Debug)]
struct Batch {
    revision: i64,
    events: Vec<pb::Event>,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    /// (kind, name) -> (mod revision, value).
    objects: BTreeMap<(i32, String), (i64, Value)>,
    history: VecDeque<Arc<Batch>>,
    /// The oldest revision a client may resume from (everything after it is in `history`).
    oldest_resumable: i64,
}

/// One synthetic cluster's state and live feed.
#[derive(Debug)]
pub struct SynthCluster {
    pub name: String,
    pub config: pb::ClusterConfig,
    state: Mutex<State>,
    live: broadcast::Sender<Arc<Batch>>,
    /// Ends every open stream of the cluster (a lost connection, for resume tests).
    kick: tokio::sync::Notify,
}

impl SynthCluster {
    /// A cluster holding `objects` (plus its config object) at revision 1.
    pub fn new(config: pb::ClusterConfig, objects: Vec<Object>) -> Arc<Self> {
        let mut state = State {
            revision: 1,
            oldest_resumable: 1,
            ..State::default()
        };
        state.objects.insert(
            (Kind::Config as i32, String::new()),
            (1, Value::Config(config.clone())),
        );
        for (kind, name, value) in objects {
            state.objects.insert((kind as i32, name), (1, value));
        }
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Arc::new(SynthCluster {
            name: config.name.clone(),
            config,
            state: Mutex::new(state),
            live,
            kick: tokio::sync::Notify::new(),
        })
    }

    /// Ends every stream open now with `UNAVAILABLE`, as a lost connection: the importer
    /// reconnects and resumes (or takes a snapshot again if the first was not complete).
    pub fn kick(&self) {
        self.kick.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Objects of `kind` held now.
    pub fn count(&self, kind: Kind) -> usize {
        let k = kind as i32;
        self.lock()
            .objects
            .range((k, String::new())..(k + 1, String::new()))
            .count()
    }

    /// Applies `changes` as one revision and sends them to every open stream; returns the
    /// revision.
    pub fn apply(&self, changes: Vec<Change>) -> i64 {
        let mut state = self.lock();
        state.revision += 1;
        let revision = state.revision;
        let mut events = Vec::with_capacity(changes.len());
        for (kind, name, value) in changes {
            let key = (kind as i32, name.clone());
            match &value {
                Some(v) => {
                    state.objects.insert(key, (revision, v.clone()));
                }
                None => {
                    if state.objects.remove(&key).is_none() {
                        continue;
                    }
                }
            }
            events.push(pb::Event {
                kind: kind as i32,
                cluster: self.name.clone(),
                name,
                revision,
                value,
            });
        }
        let batch = Arc::new(Batch { revision, events });
        state.history.push_back(batch.clone());
        while state.history.len() > HISTORY {
            if let Some(old) = state.history.pop_front() {
                state.oldest_resumable = old.revision;
            }
        }
        // Sent under the lock: a stream subscribing concurrently sees either the batch in
        // its start messages or on its receiver (duplicates are filtered by revision).
        let _ = self.live.send(batch);
        revision
    }

    /// The messages that start a stream resuming from `resume` (0: snapshot), the live
    /// receiver subscribed at the same instant, and the revision the messages reach.
    fn start(
        &self,
        resume: i64,
        kinds: &HashSet<i32>,
    ) -> (Vec<pb::WatchResponse>, broadcast::Receiver<Arc<Batch>>, i64) {
        let state = self.lock();
        let rx = self.live.subscribe();
        let mut out = Vec::new();
        let resumable = resume > 0 && resume >= state.oldest_resumable && resume <= state.revision;
        if resumable {
            let missed: Vec<Arc<Batch>> = state
                .history
                .iter()
                .filter(|b| b.revision > resume)
                .cloned()
                .collect();
            out.extend(batch_messages(&missed, kinds));
            return (out, rx, state.revision);
        }
        if resume > 0 {
            out.push(msg(
                0,
                Payload::Reset(pb::Reset {
                    reason: format!(
                        "revision {resume} is not in the synthetic cluster's history ({}..={})",
                        state.oldest_resumable, state.revision
                    ),
                }),
            ));
        }
        let mut chunk = Vec::new();
        for ((kind, name), (rev, value)) in &state.objects {
            if !kinds.contains(kind) {
                continue;
            }
            chunk.push(pb::Event {
                kind: *kind,
                cluster: self.name.clone(),
                name: name.clone(),
                revision: *rev,
                value: Some(value.clone()),
            });
            if chunk.len() == SNAPSHOT_CHUNK {
                out.push(events_msg(0, std::mem::take(&mut chunk)));
            }
        }
        out.push(events_msg(state.revision, chunk));
        for kind in ALL_KINDS {
            if kinds.contains(&(kind as i32)) {
                out.push(msg(
                    state.revision,
                    Payload::Synced(pb::Synced {
                        cluster: self.name.clone(),
                        kind: kind as i32,
                    }),
                ));
            }
        }
        (out, rx, state.revision)
    }
}

fn msg(revision: i64, payload: Payload) -> pb::WatchResponse {
    pb::WatchResponse {
        revision,
        payload: Some(payload),
    }
}

fn events_msg(revision: i64, events: Vec<pb::Event>) -> pb::WatchResponse {
    msg(revision, Payload::Events(pb::Events { events }))
}

/// One message for consecutive batches (the last one's revision), filtered to `kinds`.
fn batch_messages(batches: &[Arc<Batch>], kinds: &HashSet<i32>) -> Option<pb::WatchResponse> {
    let last = batches.last()?;
    let events = batches
        .iter()
        .flat_map(|b| b.events.iter())
        .filter(|e| kinds.contains(&e.kind))
        .cloned()
        .collect();
    Some(events_msg(last.revision, events))
}

/// The gRPC service of one synthetic cluster.
struct Service {
    cluster: Arc<SynthCluster>,
    tls: Arc<ServerTls>,
}

type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchResponse, Status>>;

#[tonic::async_trait]
impl pb::mesh_server::Mesh for Service {
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ClusterConfig>, Status> {
        self.tls
            .authenticate(&request)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(Response::new(self.cluster.config.clone()))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.tls
            .authenticate(&request)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let req = request.into_inner();
        if !req.clusters.is_empty() && !req.clusters.contains(&self.cluster.name) {
            return Err(Status::permission_denied(format!(
                "synthetic cluster {} serves only its own data, not {:?}",
                self.cluster.name, req.clusters
            )));
        }
        // Policies and links are never served to peers.
        let kinds: HashSet<i32> = if req.kinds.is_empty() {
            ALL_KINDS.iter().map(|k| *k as i32).collect()
        } else {
            req.kinds
                .iter()
                .copied()
                .filter(|k| ALL_KINDS.iter().any(|a| *a as i32 == *k))
                .collect()
        };
        let heartbeat = if req.heartbeat_interval_ms == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(req.heartbeat_interval_ms.into())
                .clamp(Duration::from_millis(100), Duration::from_secs(60))
        };
        let (tx, rx) = mpsc::channel(64);
        let cluster = self.cluster.clone();
        tokio::spawn(serve_stream(
            cluster,
            req.resume_revision,
            kinds,
            heartbeat,
            tx,
        ));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("a synthetic cluster has no status"))
    }

    async fn report_status(
        &self,
        _: Request<pb::AgentStatus>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        Err(Status::unimplemented("a synthetic cluster has no agents"))
    }
}

/// Feeds one stream until the client goes away.
async fn serve_stream(
    cluster: Arc<SynthCluster>,
    resume: i64,
    kinds: HashSet<i32>,
    heartbeat: Duration,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
) {
    let (msgs, mut rx, mut sent) = cluster.start(resume, &kinds);
    for m in msgs {
        if tx.send(Ok(m)).await.is_err() {
            return;
        }
    }
    let mut next_heartbeat = tokio::time::Instant::now() + heartbeat;
    loop {
        let out = tokio::select! {
            _ = tx.closed() => return,
            _ = cluster.kick.notified() => {
                let _ = tx.send(Err(Status::unavailable("synthetic cluster dropped the stream"))).await;
                return;
            }
            _ = tokio::time::sleep_until(next_heartbeat) => {
                Some(msg(sent, Payload::Progress(pb::Progress {})))
            }
            b = rx.recv() => match b {
                Ok(first) => {
                    // Coalesce what is already queued behind it.
                    let mut batches = vec![first];
                    while batches.len() < 64 {
                        match rx.try_recv() {
                            Ok(b) => batches.push(b),
                            Err(_) => break,
                        }
                    }
                    batches.retain(|b| b.revision > sent);
                    batch_messages(&batches, &kinds)
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live buffer: continue from the history.
                    let (msgs, new_rx, _) = cluster.start(sent, &kinds);
                    rx = new_rx;
                    for m in msgs {
                        sent = sent.max(m.revision);
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    next_heartbeat = tokio::time::Instant::now() + heartbeat;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(m) = out {
            sent = sent.max(m.revision);
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
            next_heartbeat = tokio::time::Instant::now() + heartbeat;
        }
    }
}

/// A synthetic cluster being served: its CA, address and server task (stopped on drop).
pub struct Served {
    pub cluster: Arc<SynthCluster>,
    pub ca: TestCa,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Served {
    /// The peer entry an importer needs for this cluster.
    pub fn peer_spec(&self) -> Result<PeerSpec> {
        Ok(PeerSpec {
            name: self.cluster.name.parse()?,
            address: self.addr.to_string(),
            ca_pem: self.ca.cert_pem.clone(),
            server_name: None,
        })
    }
}

/// Serves `cluster` on a loopback port of its own with a fresh CA, accepting clients whose
/// certificates chain to `client_ca_pem` (the importing cluster `client_cluster`'s CA).
pub async fn serve(
    cluster: Arc<SynthCluster>,
    client_cluster: &str,
    client_ca_pem: &str,
) -> Result<Served> {
    let ca = TestCa::new(&cluster.name);
    let serving = ca.issue("apiserver");
    let parse = |pem: &str, what: &str| tls::parse_certs(pem.as_bytes(), what);
    let own: ClusterName = cluster.name.parse()?;
    let mut trust = TrustStore::new(own, parse(&ca.cert_pem, "synthetic CA")?)?;
    trust.insert(client_cluster.parse()?, parse(client_ca_pem, "client CA")?)?;
    let identity = TlsIdentity::from_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())?;
    let server_tls = ServerTls::new(identity, trust)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a synthetic cluster's port")?;
    let addr = listener.local_addr()?;
    let incoming = tls::tls_incoming(listener, server_tls.clone(), IncomingOptions::default());
    let svc = pb::mesh_server::MeshServer::new(Service {
        cluster: cluster.clone(),
        tls: server_tls,
    })
    .max_encoding_message_size(64 * 1024 * 1024);
    let name = cluster.name.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("synthetic cluster {name}: server ended: {e}");
        }
    });
    Ok(Served {
        cluster,
        ca,
        addr,
        task,
    })
}

// ================================================================ the scale profile's shape

/// The shape of the synthetic clusters of a profile.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub clusters: usize,
    pub nodes: usize,
    pub pods_per_node: usize,
    pub identities_per_cluster: usize,
}

impl Shape {
    pub fn pods(&self) -> usize {
        self.nodes * self.pods_per_node
    }

    pub fn total_endpoints(&self) -> usize {
        self.clusters * self.pods()
    }

    pub fn total_nodes(&self) -> usize {
        self.clusters * self.nodes
    }

    pub fn check(&self) -> Result<()> {
        anyhow::ensure!(
            (1..=MAX_CLUSTERS).contains(&self.clusters),
            "--clusters must be 1..={MAX_CLUSTERS} (cluster ids {FIRST_ID}..=255)"
        );
        anyhow::ensure!(
            (1..=1024).contains(&self.nodes),
            "nodes per cluster must be 1..=1024"
        );
        anyhow::ensure!(
            self.pods() >= 1 && self.pods() <= 16_000,
            "pods per cluster (nodes x pods per node) must be 1..=16000 (one /18 each)"
        );
        anyhow::ensure!(
            (1..=60_000).contains(&self.identities_per_cluster),
            "identities per cluster must be 1..=60000"
        );
        Ok(())
    }
}

/// Cluster ids 1 and 2 are the benchmarks' own clusters.
const FIRST_ID: usize = 3;
pub const MAX_CLUSTERS: usize = 255 - FIRST_ID + 1;

/// Name of synthetic cluster `i`.
pub fn cluster_name(i: usize) -> String {
    format!("syn-{i:03}")
}

fn cluster_id(i: usize) -> u32 {
    (FIRST_ID + i) as u32
}

/// Pod address `slot` (1..=SLOTS) of cluster `i`: its /18 in 10.128.0.0/9 (clear of the
/// benchmarks' own clusters, 10.1/16 and 10.2/16, and of the 10.96/12 service CIDRs).
pub fn pod_ip(i: usize, slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(POD_BASE + ((i as u32) << 14) + (slot & 0x3fff))
}

fn pod_cidr(i: usize) -> String {
    format!("{}/18", Ipv4Addr::from(POD_BASE + ((i as u32) << 14)))
}

const POD_BASE: u32 = (10 << 24) | (128 << 16);
/// Where every synthetic cluster's pods are.
pub const POD_RANGE: &str = "10.128.0.0/9";
/// Address slots of a cluster's /18 (its first and last addresses are left out).
const SLOTS: u32 = (1 << 14) - 2;

/// Node `n` of cluster `i`: 100.64.0.0/10, 1024 addresses per cluster.
pub fn node_ip(i: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::from((100u32 << 24) | (64 << 16) | ((i as u32) << 10) | n as u32)
}

fn identity(i: usize, shape: &Shape, pod: usize) -> u32 {
    (cluster_id(i) << 16) | (256 + (pod % shape.identities_per_cluster) as u32)
}

fn endpoint(i: usize, shape: &Shape, pod: usize, ip: Ipv4Addr, generation: u64) -> Value {
    let node = pod / shape.pods_per_node;
    Value::Endpoint(pb::Endpoint {
        ip: ip.to_string(),
        identity: identity(i, shape, pod),
        host_ip: Some(node_ip(i, node).to_string()),
        node: format!("node-{node}"),
        namespace: format!("ns-{}", pod % 10),
        pod: format!("pod-{pod}-{generation}"),
        named_ports: vec![],
    })
}

/// Synthetic cluster `i` of `shape`: config, nodes, identities, one endpoint per pod slot
/// (pod `p` at address slot `p`). No services (the scale profile is about endpoints and
/// identities).
pub fn profile_cluster(i: usize, shape: &Shape) -> Arc<SynthCluster> {
    let name = cluster_name(i);
    let config = pb::ClusterConfig {
        name: name.clone(),
        id: cluster_id(i),
        pod_cidrs: vec![pod_cidr(i)],
        service_cidr: Some("10.96.0.0/12".into()),
        capabilities: vec![],
        version: "synthetic".into(),
    };
    let mut objects = Vec::with_capacity(shape.nodes + shape.identities_per_cluster + shape.pods());
    for n in 0..shape.nodes {
        objects.push((
            Kind::Node,
            format!("node-{n}"),
            Value::Node(pb::Node {
                cluster: name.clone(),
                name: format!("node-{n}"),
                internal_ips: vec![node_ip(i, n).to_string()],
                ..Default::default()
            }),
        ));
    }
    for l in 0..shape.identities_per_cluster {
        let id = (cluster_id(i) << 16) | (256 + l as u32);
        objects.push((
            Kind::Identity,
            id.to_string(),
            Value::Identity(pb::Identity {
                id,
                labels: vec![
                    format!("k8s:app=app-{l}"),
                    format!("k8s:io.cilium.k8s.policy.cluster={name}"),
                    format!("k8s:io.kubernetes.pod.namespace=ns-{}", l % 10),
                ],
            }),
        ));
    }
    for p in 0..shape.pods() {
        let ip = pod_ip(i, p as u32 + 1);
        objects.push((Kind::Endpoint, ip.to_string(), endpoint(i, shape, p, ip, 0)));
    }
    SynthCluster::new(config, objects)
}

/// The pods of one profile cluster: the address of each slot, and the next address to try.
#[derive(Debug)]
pub struct Pods {
    ips: Vec<Ipv4Addr>,
    live: HashSet<Ipv4Addr>,
    next_slot: u32,
    generation: u64,
}

impl Pods {
    pub fn new(i: usize, shape: &Shape) -> Self {
        let ips: Vec<Ipv4Addr> = (0..shape.pods()).map(|p| pod_ip(i, p as u32 + 1)).collect();
        Pods {
            live: ips.iter().copied().collect(),
            ips,
            next_slot: shape.pods() as u32 + 1,
            generation: 0,
        }
    }

    /// Every live pod address.
    pub fn live(&self) -> impl Iterator<Item = &Ipv4Addr> {
        self.ips.iter()
    }
}

/// Replaces pod `pod` of cluster `i` by a new one at a new address (one revision: the new
/// endpoint created, the old one deleted, as a Deployment's rollout replaces a pod).
/// Returns (old, new) addresses.
pub fn replace_pod(
    cluster: &SynthCluster,
    pods: &mut Pods,
    i: usize,
    shape: &Shape,
    pod: usize,
) -> (Ipv4Addr, Ipv4Addr) {
    let old = pods.ips[pod];
    let new = loop {
        let ip = pod_ip(i, pods.next_slot);
        pods.next_slot = if pods.next_slot >= SLOTS {
            1
        } else {
            pods.next_slot + 1
        };
        if !pods.live.contains(&ip) {
            break ip;
        }
    };
    pods.generation += 1;
    pods.live.remove(&old);
    pods.live.insert(new);
    pods.ips[pod] = new;
    cluster.apply(vec![
        (
            Kind::Endpoint,
            new.to_string(),
            Some(endpoint(i, shape, pod, new, pods.generation)),
        ),
        (Kind::Endpoint, old.to_string(), None),
    ]);
    (old, new)
}
