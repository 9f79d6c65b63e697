//! Harness of the peer importer tests: clusters made of a real etcd, a real apiserver
//! (serving side, mutual TLS with a CA per cluster) and, on the importing side, the
//! importer as a task. Data is written into etcd directly with the key layout.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use etcd_client::GetOptions;
use mesh_apiserver::peer::{
    ClientIdentity, Importer, ImporterConfig, ImporterOptions, PeerMetrics, PeerSet, PeerSource,
    PeerSpec, PeerStats,
};
use mesh_apiserver::{Args, Running, StartOptions};
use mesh_core::ClusterName;
use mesh_proto::client::{Backoff, WatchOptions};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::certs::{TestCa, TestCert, Validity};
use mesh_testkit::etcd::Etcd;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a test waits for one expected state before failing.
pub const STEP: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One cluster: its CA, etcd and (when started) apiserver.
pub struct Cluster {
    pub name: String,
    pub id: u32,
    pub pod_cidr: String,
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
    pub etcd: Etcd,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_path: PathBuf,
    /// The gRPC address; kept across restarts.
    pub addr: Option<SocketAddr>,
    pub running: Option<Running>,
    shutdown: CancellationToken,
    /// Peer CAs this apiserver trusts (re-applied on restart).
    trusted: std::sync::Mutex<Vec<(ClusterName, String)>>,
}

impl Cluster {
    /// A cluster whose apiserver presents a certificate of its own CA.
    pub fn new(name: &str, id: u32, pod_cidr: &str) -> Cluster {
        let ca = TestCa::new(name);
        let cert = ca.issue("apiserver");
        Self::with_cert(name, id, pod_cidr, ca, cert)
    }

    /// A cluster whose apiserver presents `cert` (e.g. one of another CA).
    pub fn with_cert(name: &str, id: u32, pod_cidr: &str, ca: TestCa, cert: TestCert) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = cert.write(dir.path(), "apiserver");
        let ca_path = ca.write(dir.path());
        Cluster {
            name: name.into(),
            id,
            pod_cidr: pod_cidr.into(),
            ca,
            dir,
            etcd: Etcd::start(),
            cert,
            key,
            ca_path,
            addr: None,
            running: None,
            shutdown: CancellationToken::new(),
            trusted: Default::default(),
        }
    }

    pub fn keys(&self) -> Keys {
        Keys::default()
    }

    pub fn cluster_name(&self) -> ClusterName {
        self.name.parse().unwrap()
    }

    pub fn config(&self) -> mesh_core::ClusterConfig {
        mesh_core::ClusterConfig {
            name: self.cluster_name(),
            id: mesh_core::ClusterId::new(self.id).unwrap(),
            pod_cidrs: vec![self.pod_cidr.parse().unwrap()],
            service_cidr: None,
            capabilities: vec![],
            version: "test".into(),
        }
    }

    /// Starts (or restarts, on the same port) the apiserver.
    pub async fn start(&mut self) {
        let listen = self
            .addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let argv: Vec<String> = [
            "mesh-apiserver",
            "--cluster-name",
            &self.name,
            "--cluster-id",
            &self.id.to_string(),
            "--pod-cidr",
            &self.pod_cidr,
            "--etcd-endpoints",
            &self.etcd.endpoint(),
            "--listen",
            &listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "1s",
            // Certificate rotation tests wait for the reload.
            "--tls-reload-interval",
            "200ms",
            "--tls-cert",
            self.cert.to_str().unwrap(),
            "--tls-key",
            self.key.to_str().unwrap(),
            "--tls-ca",
            self.ca_path.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let settings = Args::try_parse_from(argv)
            .expect("args")
            .validate()
            .expect("settings");
        self.shutdown = CancellationToken::new();
        let mut last = None;
        // The port of a stopped server can take a moment to be free again.
        for _ in 0..50 {
            match mesh_apiserver::start(
                settings.clone(),
                StartOptions { publisher: false },
                self.shutdown.clone(),
            )
            .await
            {
                Ok(running) => {
                    running.index.wait_loaded().await.expect("index loads");
                    self.addr = Some(running.grpc_addr);
                    let tls = running.tls.clone().expect("tls");
                    for (name, pem) in self.trusted.lock().unwrap().iter() {
                        let ca = tls::parse_certs(pem.as_bytes(), "ca").unwrap();
                        tls.add_peer_ca(name.clone(), ca).unwrap();
                    }
                    self.running = Some(running);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("apiserver {} does not start: {last:?}", self.name);
    }

    /// Stops the apiserver (its etcd keeps running).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), r.shutdown()).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("started")
    }

    /// Makes this apiserver trust `other`'s CA for `other`'s name.
    pub fn trust(&self, other: &Cluster) {
        let tls = self.running.as_ref().unwrap().tls.clone().expect("tls");
        let ca = tls::parse_certs(other.ca.cert_pem.as_bytes(), "ca").unwrap();
        tls.add_peer_ca(other.cluster_name(), ca).unwrap();
        self.trusted
            .lock()
            .unwrap()
            .push((other.cluster_name(), other.ca.cert_pem.clone()));
    }

    /// The peer entry another cluster needs to import this one.
    pub fn spec(&self) -> PeerSpec {
        PeerSpec {
            name: self.cluster_name(),
            address: self.addr().to_string(),
            ca_pem: self.ca.cert_pem.clone(),
            server_name: None,
        }
    }

    pub async fn etcd_client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.etcd.endpoint()], None)
            .await
            .expect("etcd client")
    }

    /// An agent's client of this cluster's apiserver.
    pub async fn agent_client(&self) -> pb::mesh_client::MeshClient<tonic::transport::Channel> {
        let cert = self.ca.issue("agent/node-1");
        let ca = tls::parse_certs(self.ca.cert_pem.as_bytes(), "ca").unwrap();
        let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        let client_tls = ClientTls::new(ca, id, Some(self.cluster_name())).unwrap();
        tls::connect(&ClientEndpoint::new(self.addr().to_string(), client_tls))
            .await
            .expect("agent connects")
    }

    /// Starts an importer in this cluster (the leader) with the given peers.
    pub async fn importer(
        &self,
        peers: watch::Receiver<Option<PeerSet>>,
        options: ImporterOptions,
    ) -> TestImporter {
        self.importer_from(PeerSource::Fixed(peers), options).await
    }

    pub async fn importer_from(
        &self,
        source: PeerSource,
        options: ImporterOptions,
    ) -> TestImporter {
        self.importer_as(source, options, true).await
    }

    /// An importer in this cluster, initially leader or follower.
    pub async fn importer_as(
        &self,
        source: PeerSource,
        options: ImporterOptions,
        leader: bool,
    ) -> TestImporter {
        let etcd = self.etcd_client().await;
        let mut registry = Registry::default();
        let metrics = PeerMetrics::register(&mut registry);
        let (leader_tx, leader_rx) = watch::channel(leader);
        let cfg = ImporterConfig {
            etcd,
            keys: self.keys(),
            local: self.config(),
            server_tls: self.running.as_ref().and_then(|r| r.tls.clone()),
            identity: ClientIdentity {
                cert: self.cert.clone(),
                key: self.key.clone(),
            },
            source,
            is_leader: leader_rx,
            options,
        };
        let importer = Importer::spawn_with_metrics(cfg, metrics, CancellationToken::new());
        TestImporter {
            importer: Some(importer),
            registry,
            leader: leader_tx,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options with short intervals for tests.
pub fn test_options(stale_ttl: Option<Duration>) -> ImporterOptions {
    ImporterOptions {
        stale_ttl,
        refusal_retry: Duration::from_millis(300),
        status_interval: Duration::from_millis(100),
        watch: WatchOptions {
            heartbeat_interval: Duration::from_secs(1),
            backoff: Backoff::full_jitter(Duration::from_millis(50), Duration::from_millis(300)),
            healthy_after: Duration::from_secs(1),
            buffer: 1024,
            recorder: None,
        },
        connect_timeout: Duration::from_secs(3),
        max_txn_ops: 128.into(),
        txns_in_flight: mesh_apiserver::peer::DEFAULT_PEER_TXNS_IN_FLIGHT,
        record_dir: None,
    }
}

pub fn peers(specs: &[PeerSpec]) -> PeerSet {
    specs.iter().map(|s| (s.name.clone(), s.clone())).collect()
}

pub struct TestImporter {
    pub importer: Option<Importer>,
    pub registry: Registry,
    pub leader: watch::Sender<bool>,
}

impl TestImporter {
    pub fn stats(&self, peer: &str) -> Option<PeerStats> {
        self.importer
            .as_ref()
            .unwrap()
            .stats()
            .get(&peer.parse::<ClusterName>().unwrap())
            .cloned()
    }

    /// Waits until `f` holds for the stats of `peer`.
    pub async fn wait(&self, peer: &str, what: &str, f: impl Fn(&PeerStats) -> bool) -> PeerStats {
        let name: ClusterName = peer.parse().unwrap();
        let mut rx = self.importer.as_ref().unwrap().subscribe();
        let r = tokio::time::timeout(STEP, async {
            loop {
                if let Some(s) = rx.borrow_and_update().get(&name)
                    && f(s)
                {
                    return s.clone();
                }
                rx.changed().await.expect("importer running");
            }
        })
        .await;
        match r {
            Ok(s) => s,
            Err(_) => panic!(
                "timed out waiting for peer {peer}: {what}; last stats: {:#?}",
                self.stats(peer)
            ),
        }
    }

    pub fn metrics_text(&self) -> String {
        mesh_apiserver::metrics::encode(&self.registry).unwrap()
    }

    pub async fn shutdown(&mut self) {
        if let Some(i) = self.importer.take() {
            i.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------- data

pub fn node(cluster: &str, name: &str, ip: &str) -> pb::Node {
    pb::Node {
        cluster: cluster.into(),
        name: name.into(),
        internal_ips: vec![ip.into()],
        pod_cidrs: vec![],
        ..Default::default()
    }
}

pub fn identity(id: u32, ns: &str, cluster: &str) -> pb::Identity {
    pb::Identity {
        id,
        labels: vec![
            format!("k8s:io.cilium.k8s.policy.cluster={cluster}"),
            format!("k8s:io.kubernetes.pod.namespace={ns}"),
        ],
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

pub fn service(cluster: &str, ns: &str, name: &str) -> pb::GlobalService {
    pb::GlobalService {
        cluster: cluster.into(),
        namespace: ns.into(),
        name: name.into(),
        shared: true,
        frontends: vec!["10.96.0.10".into()],
        ..Default::default()
    }
}

pub async fn put<M: Message>(c: &mut etcd_client::Client, key: String, value: &M) -> i64 {
    let r = c.put(key, value.encode_to_vec(), None).await.expect("put");
    r.header().unwrap().revision()
}

pub async fn delete(c: &mut etcd_client::Client, key: String) -> i64 {
    let r = c.delete(key, None).await.expect("delete");
    r.header().unwrap().revision()
}

/// Writes the config and a synced marker per kind (policies included): what a publisher
/// does after its sync.
pub async fn publish_config_and_markers(c: &mut etcd_client::Client, cluster: &Cluster) {
    let keys = cluster.keys();
    let cfg = pb::ClusterConfig::from(&cluster.config());
    put(c, keys.object(&cluster.name, Kind::Config, ""), &cfg).await;
    for kind in mesh_proto::keys::PUBLISHED_KINDS {
        put(
            c,
            keys.synced(&cluster.name, kind),
            &pb::SyncedMarker { at_unix_ms: 1 },
        )
        .await;
    }
}

/// Every key under `clusters/<cluster>/` with its value.
pub async fn cluster_keys(c: &mut etcd_client::Client, cluster: &str) -> BTreeMap<String, Vec<u8>> {
    let keys = Keys::default();
    let r = c
        .get(
            keys.cluster_prefix(cluster),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    r.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value().to_vec()))
        .collect()
}

/// The objects (not the markers) under `clusters/<cluster>/`.
pub async fn cluster_objects(
    c: &mut etcd_client::Client,
    cluster: &str,
) -> BTreeMap<String, Vec<u8>> {
    cluster_keys(c, cluster)
        .await
        .into_iter()
        .filter(|(k, _)| !k.contains("/synced/"))
        .collect()
}

/// Waits until `f` holds for the keys under `clusters/<cluster>/` of `c`, polling.
pub async fn wait_keys(
    c: &mut etcd_client::Client,
    cluster: &str,
    what: &str,
    f: impl Fn(&BTreeMap<String, Vec<u8>>) -> bool,
) -> BTreeMap<String, Vec<u8>> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let now = cluster_keys(c, cluster).await;
        if f(&now) {
            return now;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; keys under clusters/{cluster}/: {:#?}",
                now.keys()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn peer_status(c: &mut etcd_client::Client, peer: &str) -> Option<pb::PeerStatus> {
    let r = c
        .get(Keys::default().peer_status(peer), None)
        .await
        .expect("get");
    r.kvs()
        .first()
        .map(|kv| pb::PeerStatus::decode(kv.value()).expect("PeerStatus"))
}

/// A certificate of `ca` claiming `claimed`'s apiserver identity.
pub fn forged(ca: &TestCa, claimed: &str) -> TestCert {
    ca.issue_for(claimed, "apiserver", Validity::Valid)
}

/// Whether `cluster`'s apiserver trusts a CA for `peer`.
pub fn trusts(cluster: &Cluster, peer: &str) -> bool {
    cluster
        .running
        .as_ref()
        .and_then(|r| r.tls.as_ref())
        .expect("tls")
        .trust()
        .contains(&peer.parse().unwrap())
}

/// A TCP forwarder in front of an apiserver, to partition and heal the link between two
/// clusters while both stay up.
pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    /// Bumped on every cut: connection tasks of an older generation end.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, up_rx) = watch::channel(true);
        let (generation, gen_rx) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut gen_rx = gen_rx.clone();
                let current = *gen_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = gen_rx.wait_for(|g| *g != current) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
            task,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
