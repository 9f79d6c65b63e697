//! Corrupt etcd values, Status, ReportStatus, Info, /metrics, /healthz, /readyz.

mod serve_support;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::GetOptions;
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use prost::Message;
use serve_support::*;

/// Captures log output of the current thread (current-thread runtime: the server's tasks
/// run on it too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

#[tokio::test]
async fn corrupt_values_are_skipped_with_their_key_logged_and_the_stream_goes_on() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Endpoint, "10.1.0.1"),
        &endpoint("10.1.0.1", 65800),
    )
    .await;
    let bad_before = keys.object("east", Kind::Endpoint, "10.1.0.66");
    put_raw(&mut c, bad_before.clone(), vec![0xff, 0xfe, 0x01, 0x02]).await;

    let server = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    w.next().await;
    assert_eq!(w.state.len(), 1, "the corrupt value is not in the snapshot");

    let bad_live = keys.object("east", Kind::Service, "default/broken");
    put_raw(
        &mut c,
        bad_live.clone(),
        b"\x0a\xff\xff\xff\xff\xff garbage".to_vec(),
    )
    .await;
    let rev = put(
        &mut c,
        keys.object("east", Kind::Endpoint, "10.1.0.2"),
        &endpoint("10.1.0.2", 65801),
    )
    .await;
    w.until_revision(rev).await;
    assert_eq!(w.state.len(), 2);
    assert!(!w.log.iter().any(|e| e.name == "default/broken"));

    let text = logs.text();
    for key in [&bad_before, &bad_live] {
        assert!(
            text.contains(key.as_str()),
            "log names the key {key}:\n{text}"
        );
    }
    let errors = server
        .running()
        .metrics
        .decode_errors
        .get_or_create(&mesh_apiserver::metrics::ReasonLabels {
            reason: "value".into(),
        })
        .get();
    assert_eq!(errors, 2);
}

#[tokio::test]
async fn status_reports_counts_synced_flags_agents_and_revision() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("west", Kind::Config, ""),
        &pb::ClusterConfig {
            name: "west".into(),
            id: 7,
            ..Default::default()
        },
    )
    .await;
    for i in 0..3 {
        put(
            &mut c,
            keys.object("west", Kind::Endpoint, &format!("10.2.0.{i}")),
            &endpoint("10.2.0.1", 7 << 16 | 300),
        )
        .await;
    }
    mark_synced(&mut c, &keys, "west", Kind::Endpoint).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "n1"),
        &node("east", "n1", "10.0.0.1"),
    )
    .await;
    put(
        &mut c,
        keys.peer_status("west"),
        &pb::PeerStatus {
            cluster: "west".into(),
            connected: true,
            ..Default::default()
        },
    )
    .await;
    let rev = put(
        &mut c,
        keys.object("east", Kind::Service, "default/web"),
        &service("east", "default", "web", true),
    )
    .await;

    let server = insecure_server(&etcd, "east", &["--agent-status-ttl", "30s"]).await;
    server.running().index.wait_revision(rev).await.unwrap();
    let mut client = grpc(server.addr()).await;

    // ReportStatus stores the report under agents/<node> with a lease.
    client
        .report_status(pb::AgentStatus {
            node: "node-1".into(),
            version: "test".into(),
            ..Default::default()
        })
        .await
        .expect("report");
    let got = c
        .get(keys.agent("node-1"), Some(GetOptions::new()))
        .await
        .unwrap();
    let kv = &got.kvs()[0];
    assert_ne!(kv.lease(), 0, "agent status is stored with a lease");
    let ttl = c.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert!(ttl.granted_ttl() == 30, "granted ttl {}", ttl.granted_ttl());
    let stored = pb::AgentStatus::decode(kv.value()).unwrap();
    assert!(stored.reported_at_unix_ms > 0);

    let err = client
        .report_status(pb::AgentStatus {
            node: "".into(),
            ..Default::default()
        })
        .await
        .expect_err("empty node refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let st = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.local.as_ref().unwrap().name, "east");
    assert_eq!(st.revision, server.running().index.revision());
    assert!(!st.leader, "no publisher runs in this process");
    assert_eq!(st.peers.len(), 1);
    assert_eq!(
        st.agents
            .iter()
            .map(|a| a.node.as_str())
            .collect::<Vec<_>>(),
        ["node-1"]
    );
    let count = |cluster: &str, kind: Kind| {
        let cs = st
            .clusters
            .iter()
            .find(|c| c.cluster == cluster)
            .expect("cluster listed");
        let k = cs.counts.iter().find(|k| k.kind == kind as i32).unwrap();
        (k.count, k.synced)
    };
    assert_eq!(count("west", Kind::Endpoint), (3, true));
    assert_eq!(count("west", Kind::Node), (0, false));
    assert_eq!(count("east", Kind::Node), (1, false));
    assert_eq!(count("east", Kind::Service), (1, false));
    let west = st.clusters.iter().find(|c| c.cluster == "west").unwrap();
    assert_eq!((west.id, west.local), (7, false));
    let east = st.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_eq!((east.id, east.local), (1, true));

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.name.as_str(), info.id, info.pod_cidrs.clone()),
        ("east", 1, vec!["10.1.0.0/16".to_string()])
    );
}

#[tokio::test]
async fn metrics_healthz_and_readyz() {
    let mut etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "n1"),
        &node("east", "n1", "10.0.0.1"),
    )
    .await;
    let server = insecure_server(&etcd, "east", &["--heartbeat-interval", "200ms"]).await;
    let maddr = server.running().metrics_addr;
    let mut w = Watcher::all(server.addr(), 0).await;
    w.next().await;

    assert_eq!(http_get(maddr, "/healthz").await.0, 200);
    let (code, body) = http_get(maddr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready (serving only)\n"));
    let (code, body) = http_get(maddr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "mesh_apiserver_index_objects{cluster=\"east\",kind=\"nodes\"} 1",
        "mesh_apiserver_watch_streams{role=\"agent\"} 1",
        "mesh_apiserver_snapshots_total 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }

    // etcd gone: not ready, and the body says why.
    etcd.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(maddr, "/readyz").await;
        if code == 503 {
            assert!(body.contains("etcd"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
        // Polling an HTTP endpoint: the observation itself is the event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    etcd.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while http_get(maddr, "/readyz").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
