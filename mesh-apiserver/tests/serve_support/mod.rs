//! Shared harness of the serving-side tests: a real etcd, a real apiserver (serving side
//! only, no publisher) on loopback, data written to etcd directly with the key layout and
//! protobuf values, and a watch client that keeps the state a real consumer would.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use etcd_client::{GetOptions, PutOptions};
use mesh_apiserver::{Args, Running, StartOptions};
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb::{self, Kind, mesh_client::MeshClient};
use mesh_testkit::etcd::Etcd;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a test waits for any single expected message before failing.
pub const STEP: Duration = Duration::from_secs(15);

pub struct Server {
    pub running: Option<Running>,
    pub shutdown: CancellationToken,
}

impl Server {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().expect("running").grpc_addr
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Base arguments for a plaintext loopback server against `etcd`.
pub fn base_args(etcd: &Etcd, cluster: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "mesh-apiserver",
        "--cluster-name",
        cluster,
        "--cluster-id",
        "1",
        "--pod-cidr",
        "10.1.0.0/16",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub async fn start_server(argv: Vec<String>) -> Server {
    let args = Args::try_parse_from(argv).expect("args");
    let settings = args.validate().expect("valid settings");
    let shutdown = CancellationToken::new();
    let running = mesh_apiserver::start(
        settings,
        StartOptions { publisher: false },
        shutdown.clone(),
    )
    .await
    .expect("server starts");
    running.index.wait_loaded().await.expect("index loads");
    Server {
        running: Some(running),
        shutdown,
    }
}

/// A plaintext server for `cluster` with extra flags.
pub async fn insecure_server(etcd: &Etcd, cluster: &str, extra: &[&str]) -> Server {
    let mut e = vec!["--insecure"];
    e.extend_from_slice(extra);
    start_server(base_args(etcd, cluster, &e)).await
}

pub async fn etcd_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client")
}

pub async fn grpc(addr: std::net::SocketAddr) -> MeshClient<Channel> {
    MeshClient::connect(format!("http://{addr}"))
        .await
        .expect("grpc connect")
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// A client with small HTTP/2 windows (64 KiB), so a client that does not read stalls the
/// server's sending quickly.
pub async fn grpc_small_window(addr: std::net::SocketAddr) -> MeshClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("grpc connect");
    MeshClient::new(ch).max_decoding_message_size(64 * 1024 * 1024)
}

// ---------------------------------------------------------------- writing data

pub fn node(cluster: &str, name: &str, ip: &str) -> pb::Node {
    pb::Node {
        cluster: cluster.into(),
        name: name.into(),
        internal_ips: vec![ip.into()],
        pod_cidrs: vec!["10.1.1.0/24".into()],
        ..Default::default()
    }
}

pub fn service(cluster: &str, ns: &str, name: &str, shared: bool) -> pb::GlobalService {
    pb::GlobalService {
        cluster: cluster.into(),
        namespace: ns.into(),
        name: name.into(),
        shared,
        frontends: vec!["10.96.0.10".into()],
        ..Default::default()
    }
}

pub fn endpoint(ip: &str, identity: u32) -> pb::Endpoint {
    pb::Endpoint {
        ip: ip.into(),
        identity,
        host_ip: Some("192.168.0.1".into()),
        node: "node-1".into(),
        namespace: "default".into(),
        pod: format!("pod-{ip}"),
        named_ports: vec![],
    }
}

/// Puts one object; returns the revision of the write.
pub async fn put<M: Message>(c: &mut etcd_client::Client, key: String, value: &M) -> i64 {
    let r = c.put(key, value.encode_to_vec(), None).await.expect("put");
    r.header().expect("header").revision()
}

pub async fn put_raw(c: &mut etcd_client::Client, key: String, value: Vec<u8>) -> i64 {
    let r = c.put(key, value, None).await.expect("put");
    r.header().expect("header").revision()
}

pub async fn delete(c: &mut etcd_client::Client, key: String) -> i64 {
    let r = c.delete(key, None).await.expect("delete");
    r.header().expect("header").revision()
}

pub async fn mark_synced(
    c: &mut etcd_client::Client,
    keys: &Keys,
    cluster: &str,
    kind: Kind,
) -> i64 {
    put(
        c,
        keys.synced(cluster, kind),
        &pb::SyncedMarker { at_unix_ms: 1 },
    )
    .await
}

pub async fn with_lease_put(c: &mut etcd_client::Client, key: String, value: Vec<u8>, lease: i64) {
    c.put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put with lease");
}

/// The decodable objects under `clusters/` as etcd holds them now: (cluster, kind, name)
/// -> encoded value.
pub async fn etcd_state(
    c: &mut etcd_client::Client,
    keys: &Keys,
) -> BTreeMap<(String, i32, String), Vec<u8>> {
    let r = c
        .get(
            keys.clusters_prefix(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    let mut out = BTreeMap::new();
    for kv in r.kvs() {
        if let Some(ClusterKey::Object {
            cluster,
            kind,
            name,
        }) = keys.parse(kv.key_str().unwrap())
        {
            out.insert((cluster, kind as i32, name), kv.value().to_vec());
        }
    }
    out
}

pub fn encode_value(ev: &pb::Event) -> Vec<u8> {
    use pb::event::Value;
    match ev.value.as_ref().expect("value") {
        Value::Config(v) => v.encode_to_vec(),
        Value::Node(v) => v.encode_to_vec(),
        Value::Identity(v) => v.encode_to_vec(),
        Value::Endpoint(v) => v.encode_to_vec(),
        Value::Service(v) => v.encode_to_vec(),
        Value::Policy(v) => v.encode_to_vec(),
        Value::Link(v) => v.encode_to_vec(),
    }
}

// ---------------------------------------------------------------- a watch consumer

/// A consumer of one watch stream, keeping the state a real client would (including the
/// sweep after a reset).
pub struct Watcher {
    pub stream: tonic::Streaming<pb::WatchResponse>,
    pub state: BTreeMap<(String, i32, String), pb::Event>,
    pub revision: i64,
    pub synced: BTreeSet<(String, i32)>,
    pub resets: Vec<String>,
    /// Every event received, in order.
    pub log: Vec<pb::Event>,
    /// Every message received, in order.
    pub messages: Vec<pb::WatchResponse>,
    in_reset: Option<BTreeMap<(String, i32, String), pb::Event>>,
}

impl Watcher {
    pub async fn open(
        client: &mut MeshClient<Channel>,
        req: pb::WatchRequest,
    ) -> Result<Self, tonic::Status> {
        let stream = client.watch(req).await?.into_inner();
        Ok(Self {
            stream,
            state: BTreeMap::new(),
            revision: 0,
            synced: BTreeSet::new(),
            resets: Vec::new(),
            log: Vec::new(),
            messages: Vec::new(),
            in_reset: None,
        })
    }

    pub async fn all(addr: std::net::SocketAddr, resume: i64) -> Self {
        let mut c = grpc(addr).await;
        Self::open(
            &mut c,
            pb::WatchRequest {
                resume_revision: resume,
                ..Default::default()
            },
        )
        .await
        .expect("watch")
    }

    /// The next message (applied to the state); panics after `STEP`.
    pub async fn next(&mut self) -> pb::WatchResponse {
        let m = tokio::time::timeout(STEP, self.stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no watch message within {STEP:?}; at revision {}",
                    self.revision
                )
            })
            .expect("stream error")
            .expect("stream ended");
        self.apply(&m);
        m
    }

    pub async fn next_result(&mut self) -> Result<Option<pb::WatchResponse>, tonic::Status> {
        let m = tokio::time::timeout(STEP, self.stream.message())
            .await
            .expect("no watch message in time")?;
        if let Some(m) = &m {
            self.apply(m);
        }
        Ok(m)
    }

    fn apply(&mut self, m: &pb::WatchResponse) {
        use pb::watch_response::Payload;
        self.messages.push(m.clone());
        match m.payload.as_ref().expect("payload") {
            Payload::Reset(r) => {
                self.resets.push(r.reason.clone());
                // Keep serving the old state; start collecting the snapshot.
                self.in_reset = Some(BTreeMap::new());
            }
            Payload::Events(evs) => {
                for e in &evs.events {
                    self.log.push(e.clone());
                    let key = (e.cluster.clone(), e.kind, e.name.clone());
                    let target = self.in_reset.as_mut().unwrap_or(&mut self.state);
                    if e.value.is_some() {
                        target.insert(key, e.clone());
                    } else {
                        target.remove(&key);
                    }
                }
                // The last chunk of a snapshot after a reset: sweep what it did not contain.
                if m.revision != 0
                    && let Some(fresh) = self.in_reset.take()
                {
                    self.state = fresh;
                }
            }
            Payload::Synced(s) => {
                self.synced.insert((s.cluster.clone(), s.kind));
            }
            Payload::Progress(_) => {}
        }
        if m.revision != 0 {
            assert!(
                m.revision >= self.revision,
                "revisions went backwards: {} after {}",
                m.revision,
                self.revision
            );
            self.revision = m.revision;
        }
    }

    /// Reads until the stream's revision reaches `rev` (non-progress messages only count
    /// when they carry it; a progress heartbeat at `rev` counts too).
    pub async fn until_revision(&mut self, rev: i64) {
        while self.revision < rev {
            self.next().await;
        }
    }

    /// Reads until `(cluster, kind)` is synced.
    pub async fn until_synced(&mut self, cluster: &str, kind: Kind) {
        while !self.synced.contains(&(cluster.to_string(), kind as i32)) {
            self.next().await;
        }
    }

    /// The state as (cluster, kind, name) -> encoded value.
    pub fn encoded(&self) -> BTreeMap<(String, i32, String), Vec<u8>> {
        self.state
            .iter()
            .map(|(k, v)| (k.clone(), encode_value(v)))
            .collect()
    }
}

/// Writes `pem` files for a CA, a server cert and returns their paths.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write");
    p
}

pub fn status_code_and_message(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

// ---------------------------------------------------------------- a cuttable TCP proxy

/// A TCP proxy in front of etcd that the test can cut (every connection dropped, new
/// ones closed at once) and heal, to take etcd away from the server only.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    conns: Vec<tokio::task::AbortHandle>,
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default()));
        let st = state.clone();
        let target = target.trim_start_matches("http://").to_string();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if st.lock().unwrap().cut {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                st.lock().unwrap().conns.push(task.abort_handle());
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        let mut st = self.state.lock().unwrap();
        st.cut = true;
        for c in st.conns.drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.state.lock().unwrap().conns.drain(..) {
            c.abort();
        }
    }
}
