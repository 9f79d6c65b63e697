//! Churn for the fault matrix: changes written into etcd until stopped, as a cluster's
//! publisher would write them (DESIGN.md section 6 keys, protobuf values): pods (endpoints)
//! created and deleted, a global service scaled (its backends), its annotations changed
//! (affinity, shared), the whole service deleted and created again; a pod start writes its
//! endpoint and the scaled service in one transaction (two keys at one revision).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use prost::Message;
use rand::{Rng, SeedableRng};

/// One cluster churn writes into.
#[derive(Debug, Clone)]
pub struct ChurnCluster {
    pub name: String,
    pub id: u32,
    /// The node the churned pods run on, and its IP.
    pub node: String,
    pub node_ip: Ipv4Addr,
    /// The ClusterIP of `default/churn` in this cluster.
    pub vip: Ipv4Addr,
    /// Pod IPs are `<pods>.1` to `<pods>.12` (a /24's first three octets).
    pub pods: [u8; 3],
}

/// A running churn (see the module's documentation).
pub struct Churn {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Churn {
    /// Starts writing into etcd at `endpoint`, about 100 changes a second, reproducible
    /// from `seed`. Failed writes (etcd down: a fault under test) are skipped.
    pub fn start(endpoint: String, keys: Keys, clusters: Vec<ChurnCluster>, seed: u64) -> Self {
        assert!(!clusters.is_empty());
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut kv: Option<etcd_client::Client> = None;
            while !s.load(Ordering::Relaxed) {
                if kv.is_none() {
                    kv = etcd_client::Client::connect([endpoint.as_str()], None)
                        .await
                        .ok();
                }
                if let Some(client) = kv.as_mut() {
                    let c = &clusters[rng.random_range(0..clusters.len())];
                    let txn = churn_op(&keys, c, &mut rng);
                    if client.txn(txn).await.is_ok() {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Pacing of the load, not a wait for an event.
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        });
        Self { stop, ops, task }
    }

    /// Changes committed so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Waits until `n` more changes were committed (panics after `timeout`).
    pub async fn wait_ops(&self, n: u64, timeout: Duration) {
        let target = self.ops() + n;
        let deadline = Instant::now() + timeout;
        while self.ops() < target {
            assert!(
                Instant::now() < deadline,
                "churn made no progress in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops and returns how many changes were committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.ops.load(Ordering::Relaxed)
    }
}

fn churn_op(keys: &Keys, c: &ChurnCluster, rng: &mut impl Rng) -> Txn {
    let [a, b, d] = c.pods;
    let ip = format!("{a}.{b}.{d}.{}", rng.random_range(1..=12));
    let key = |kind: Kind, name: &str| keys.object(&c.name, kind, name);
    let service = |rng: &mut _| {
        TxnOp::put(
            key(Kind::Service, "default/churn"),
            churn_service(c, rng).encode_to_vec(),
            None,
        )
    };
    let ops = match rng.random_range(0..10) {
        // A pod starts: its endpoint, and the service scaled with it, in one transaction.
        0..=3 => {
            let endpoint = pb::Endpoint {
                ip: ip.clone(),
                identity: (c.id << 16) | 256,
                host_ip: Some(c.node_ip.to_string()),
                node: c.node.clone(),
                namespace: "default".into(),
                pod: format!("churn-{ip}"),
                named_ports: vec![],
            };
            vec![
                TxnOp::put(key(Kind::Endpoint, &ip), endpoint.encode_to_vec(), None),
                service(rng),
            ]
        }
        // A pod goes away.
        4..=5 => vec![TxnOp::delete(key(Kind::Endpoint, &ip), None)],
        // Scaled, or an annotation changed (affinity, shared).
        6..=8 => vec![service(rng)],
        // The service is deleted (the next change creates it again).
        _ => vec![TxnOp::delete(key(Kind::Service, "default/churn"), None)],
    };
    Txn::new().and_then(ops)
}

fn churn_service(c: &ChurnCluster, rng: &mut impl Rng) -> pb::GlobalService {
    let [a, b, d] = c.pods;
    let port = |name: &str, port| pb::ServicePort {
        name: name.into(),
        protocol: pb::Protocol::Tcp.into(),
        port,
    };
    let mut backends = Vec::new();
    for n in 1..=12 {
        if rng.random_bool(0.4) {
            let ready = rng.random_bool(0.8);
            backends.push(pb::Backend {
                ip: format!("{a}.{b}.{d}.{n}"),
                ports: vec![port("http", 8080)],
                node: c.node.clone(),
                zone: String::new(),
                ready,
                serving: ready,
                terminating: false,
            });
        }
    }
    let affinity = [
        pb::Affinity::None,
        pb::Affinity::Local,
        pb::Affinity::Remote,
    ][rng.random_range(0..3)];
    pb::GlobalService {
        cluster: c.name.clone(),
        namespace: "default".into(),
        name: "churn".into(),
        local_only: false,
        shared: rng.random_bool(0.8),
        affinity: affinity.into(),
        internal_traffic_policy: pb::TrafficPolicy::Cluster.into(),
        ports: vec![port("http", 80)],
        frontends: vec![c.vip.to_string()],
        backends,
    }
}
