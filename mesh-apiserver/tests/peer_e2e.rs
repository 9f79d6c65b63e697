//! Two whole apiservers (`mesh_apiserver::start`: publisher, index, gRPC, importer), each
//! with its own lab Kubernetes API and etcd, connected both ways: A reads its peers from
//! `--peers-dir`, B from the `kube-system/mesh-peers` Secret applied with kubectl. A global
//! service created with kubectl in A shows up in B's `Status` and in B's Watch.

mod publish_common;

use std::time::Duration;

use clap::Parser;
use mesh_apiserver::peer::PeerSpec;
use mesh_apiserver::{Args, Running, StartOptions};
use mesh_core::ClusterName;
use mesh_proto::client::{WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::pb;
use mesh_proto::peer_entry::render_entry;
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::certs::TestCa;
use mesh_testkit::etcd::Etcd;
use publish_common::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

struct Side {
    name: &'static str,
    ca: TestCa,
    dir: tempfile::TempDir,
    _etcd: Etcd,
    lab: Lab,
    running: Running,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Side {
    async fn start(name: &'static str, id: u32, pod_cidr: &str, peers_dir: bool) -> Side {
        let ca = TestCa::new(name);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.issue("apiserver").write(dir.path(), "apiserver");
        let ca_path = ca.write(dir.path());
        std::fs::create_dir(dir.path().join("peers")).unwrap();
        let etcd = Etcd::start();
        let lab = Lab::start().await;
        let kubeconfig = lab.api.kubeconfig_path().to_str().unwrap().to_owned();
        let peers = dir.path().join("peers");
        let id = id.to_string();
        let endpoint = etcd.endpoint();
        let mut argv = vec![
            "mesh-apiserver",
            "--cluster-name",
            name,
            "--cluster-id",
            &id,
            "--pod-cidr",
            pod_cidr,
            "--etcd-endpoints",
            &endpoint,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--kubeconfig",
            &kubeconfig,
            "--heartbeat-interval",
            "1s",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca_path.to_str().unwrap(),
            "--peers-dir-interval",
            "100ms",
            "--peer-status-interval",
            "100ms",
        ];
        if peers_dir {
            argv.extend(["--peers-dir", peers.to_str().unwrap()]);
        }
        let settings = Args::try_parse_from(argv)
            .expect("args")
            .validate()
            .expect("settings");
        let shutdown = CancellationToken::new();
        let running = mesh_apiserver::start(settings, StartOptions::default(), shutdown.clone())
            .await
            .expect("apiserver starts");
        Side {
            name,
            ca,
            dir,
            _etcd: etcd,
            lab,
            running,
            _shutdown: shutdown.drop_guard(),
        }
    }

    fn spec(&self) -> PeerSpec {
        PeerSpec {
            name: self.name.parse().unwrap(),
            address: self.running.grpc_addr.to_string(),
            ca_pem: self.ca.cert_pem.clone(),
            server_name: None,
        }
    }

    fn agent_endpoint(&self) -> ClientEndpoint {
        let cert = self.ca.issue("agent/node-1");
        let ca = tls::parse_certs(self.ca.cert_pem.as_bytes(), "ca").unwrap();
        let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        let name: ClusterName = self.name.parse().unwrap();
        ClientEndpoint::new(
            self.running.grpc_addr.to_string(),
            ClientTls::new(ca, id, Some(name)).unwrap(),
        )
    }

    async fn status(&self) -> pb::StatusResponse {
        let mut c = tls::connect(&self.agent_endpoint())
            .await
            .expect("agent connects");
        c.status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    /// Waits until this side's Status shows `peer` connected and synced.
    async fn peer_synced(&self, peer: &str) -> pb::StatusResponse {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let s = self.status().await;
            if s.peers
                .iter()
                .any(|p| p.cluster == peer && p.connected && p.synced)
            {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never saw {peer} synced: {:#?}",
                self.name,
                s.peers
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_service_of_a_reaches_b() {
    init_logs();
    let a = Side::start("a", 1, "10.0.0.0/16", true).await;
    let b = Side::start("b", 2, "10.9.0.0/16", false).await;

    // A: a global service with one ready backend.
    a.lab.namespace("shop").await;
    a.lab.node("n1", "192.168.0.1", "10.0.1.0/24").await;
    a.lab.global_service("shop", "web", json!({})).await;
    a.lab
        .pod("shop", "web-1", "web", "10.0.1.1", "n1", "192.168.0.1")
        .await;
    a.lab.slice("shop", "web", &["10.0.1.1"], "n1").await;

    // Connect: A gets B from its directory, B gets A from its Secret (kubectl apply).
    std::fs::write(a.dir.path().join("peers/b.yaml"), render_entry(&b.spec())).unwrap();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "mesh-peers", "namespace": "kube-system"},
        "stringData": {"a.yaml": render_entry(&a.spec())},
    });
    b.lab.apply(&secret).await;

    let status = b.peer_synced("a").await;
    let counts = status
        .clusters
        .iter()
        .find(|c| c.cluster == "a")
        .expect("cluster a in B's Status");
    assert_eq!(counts.id, 1, "{counts:?}");
    let services = counts
        .counts
        .iter()
        .find(|k| k.kind == pb::Kind::Service as i32)
        .expect("service count");
    assert!(services.count >= 1 && services.synced, "{counts:?}");
    a.peer_synced("b").await;

    // An agent of B sees A's service and its backend.
    let ep = b.agent_endpoint();
    let mut watch = spawn_watch(
        connect_fn(move || {
            let ep = ep.clone();
            async move { tls::connect(&ep).await }
        }),
        pb::WatchRequest {
            clusters: vec!["a".into()],
            kinds: vec![pb::Kind::Service as i32],
            ..Default::default()
        },
        WatchOptions::default(),
    );
    let svc = tokio::time::timeout(T, async {
        loop {
            if let Some(WatchUpdate::Upsert {
                value: pb::event::Value::Service(s),
                ..
            }) = watch.recv().await
                && s.name == "web"
                && s.backends.len() == 1
            {
                return s;
            }
        }
    })
    .await
    .expect("A's service in B's watch");
    assert_eq!(svc.cluster, "a");
    assert_eq!(svc.backends[0].ip, "10.0.1.1");
}
