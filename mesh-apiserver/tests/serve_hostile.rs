//! Hostile clients (issue 16 part 4) against a real mesh-apiserver *process* (mutual TLS,
//! real etcd): invalid protobuf bodies in well-framed gRPC messages, unknown fields,
//! oversized messages (announced and real), thousands of idle streams, clients that never
//! read and clients that read slowly. For each: a clear status, no crash, a well-behaved
//! stream that keeps receiving every event meanwhile, and the server's RSS (read from
//! `/proc/<pid>/status`) within a bound that per-stream buffering or a leak would exceed.

mod serve_support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use etcd_client::{Txn, TxnOp};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind, mesh_client::MeshClient};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::certs::TestCa;
use mesh_testkit::etcd::Etcd;
use prost::Message;
use serve_support::*;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

const MIB: u64 = 1024;

// ---------------------------------------------------------------- the server process

/// The cluster whose objects the tests write into etcd directly, as a peer importer would:
/// the serving cluster's own keys belong to its publisher (which sweeps what Kubernetes
/// does not have).
const DATA: &str = "west";

/// A mesh-apiserver process serving mutual TLS, its publisher fed by the lab's Kubernetes
/// API; killed on drop.
struct Apiserver {
    child: Child,
    grpc: SocketAddr,
    metrics: SocketAddr,
    ca: TestCa,
    _kube: mesh_lab::kube_api::KubeApiHandle,
    dir: tempfile::TempDir,
}

impl Apiserver {
    async fn start(etcd: &Etcd, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("east");
        let ca_path = ca.write(dir.path());
        let (cert, key) = ca.issue("apiserver").write(dir.path(), "server");
        let grpc = SocketAddr::from(([127, 0, 0, 1], mesh_testkit::free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], mesh_testkit::free_port()));
        let kube = mesh_lab::kube_api::KubeApi::start(mesh_lab::kube_api::KubeApiConfig::new(
            dir.path().join("kube"),
            "east",
        ))
        .await
        .expect("lab Kubernetes API");
        let log = std::fs::File::create(dir.path().join("apiserver.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mesh-apiserver"))
            .args(["--cluster-name", "east", "--cluster-id", "1"])
            .args(["--pod-cidr", "10.1.0.0/16"])
            .args(["--etcd-endpoints", &etcd.endpoint()])
            .args(["--listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(&ca_path)
            .arg("--kubeconfig")
            .arg(kube.kubeconfig_path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning mesh-apiserver");
        let mut s = Apiserver {
            child,
            grpc,
            metrics,
            ca,
            _kube: kube,
            dir,
        };
        // Another process's listener: nothing to await but polling it.
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            s.assert_running();
            if http_get(s.metrics, "/readyz")
                .await
                .is_some_and(|b| b.contains("200 OK"))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "apiserver not ready:\n{}",
                s.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }

    #[track_caller]
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("mesh-apiserver exited ({status}):\n{}", self.log());
        }
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Established connections to the gRPC port (server side: local port = the port).
    fn grpc_connections(&self) -> usize {
        let port = format!(":{:04X}", self.grpc.port());
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&port) && f[3] == "01"
            })
            .count()
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// The sum of every series of `name` on `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let body = http_get(self.metrics, "/metrics").await.expect("metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }

    /// Polls `/metrics` until `name` equals `want` (another process's state).
    async fn wait_metric(&self, name: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let v = self.metric(name).await;
            if v == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} stayed {v}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn client_tls(&self, node: &str) -> ClientTls {
        let ca = tls::parse_certs(self.ca.cert_pem.as_bytes(), "ca").unwrap();
        let cert = self.ca.issue(&format!("agent/{node}"));
        let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        ClientTls::new(ca, id, Some("east".parse().unwrap())).unwrap()
    }

    /// A new mutual-TLS connection as the agent of `node`.
    async fn channel(&self, node: &str) -> Channel {
        tls::connect_channel(&ClientEndpoint::new(
            self.grpc.to_string(),
            self.client_tls(node),
        ))
        .await
        .expect("connect")
    }

    async fn client(&self, node: &str) -> MeshClient<Channel> {
        MeshClient::new(self.channel(node).await).max_decoding_message_size(64 << 20)
    }

    /// A well-behaved agent stream that has read its snapshot.
    async fn watcher(&self, node: &str) -> Watcher {
        let mut w = Watcher::open(&mut self.client(node).await, pb::WatchRequest::default())
            .await
            .expect("watch");
        w.next().await;
        w
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

// ---------------------------------------------------------------- raw gRPC calls

/// Sends raw bytes as the request message; returns raw bytes.
#[derive(Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

const WATCH: &str = "/mesh.v1.Mesh/Watch";
const INFO: &str = "/mesh.v1.Mesh/Info";
const STATUS: &str = "/mesh.v1.Mesh/Status";
const REPORT: &str = "/mesh.v1.Mesh/ReportStatus";

/// Calls `path` with `body` as the request message's bytes; returns the response's bytes
/// (a streaming method's first message).
async fn raw_call(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(64 << 20);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let req = tonic::Request::new(Bytes::from(body));
    let call = async {
        if path.path() == WATCH {
            let mut s = grpc
                .server_streaming(req, path, RawCodec)
                .await?
                .into_inner();
            s.message()
                .await?
                .ok_or_else(|| Status::unknown("stream ended"))
        } else {
            Ok(grpc.unary(req, path, RawCodec).await?.into_inner())
        }
    };
    tokio::time::timeout(STEP, call)
        .await
        .expect("no answer in time")
}

/// Appends one unknown field of each wire type (numbers no message of ours uses).
fn with_unknown_fields(mut body: Vec<u8>, blob: usize) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    encode_key(1000, WireType::Varint, &mut body);
    encode_varint(u64::MAX, &mut body);
    encode_key(1001, WireType::LengthDelimited, &mut body);
    encode_varint(blob as u64, &mut body);
    body.extend(std::iter::repeat_n(0xA5, blob));
    encode_key(1002, WireType::SixtyFourBit, &mut body);
    body.extend([7; 8]);
    encode_key(1003, WireType::ThirtyTwoBit, &mut body);
    body.extend([7; 4]);
    encode_key(1004, WireType::StartGroup, &mut body);
    encode_key(1, WireType::Varint, &mut body);
    encode_varint(1, &mut body);
    encode_key(1004, WireType::EndGroup, &mut body);
    body
}

async fn put_node(c: &mut etcd_client::Client, name: &str) -> i64 {
    put(
        c,
        Keys::default().object(DATA, Kind::Node, name),
        &node(DATA, name, "10.0.0.9"),
    )
    .await
}

type State = std::collections::BTreeMap<(String, i32, String), Vec<u8>>;

/// The objects of [`DATA`] only (the publisher writes the serving cluster's own meanwhile).
fn of_data(state: State) -> State {
    state.into_iter().filter(|((c, ..), _)| c == DATA).collect()
}

async fn data_state(c: &mut etcd_client::Client) -> State {
    of_data(etcd_state(c, &Keys::default()).await)
}

// ---------------------------------------------------------------- tests

/// Bytes that are no protobuf message at all, whatever the message type.
const GARBAGE: &[(&str, &[u8])] = &[
    ("truncated length-delimited field", &[0x0a, 0x05, b'e']),
    ("wire type 7", &[0x0f]),
    ("field number 0", &[0x00, 0x01]),
    (
        "varint of 11 bytes",
        &[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
    ),
    (
        "length of 4 GiB",
        &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, b'x'],
    ),
    ("group never closed", &[0x0b, 0x08, 0x01]),
    ("end of a group never opened", &[0x0c]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_protobuf_bodies_are_invalid_argument_and_harm_nobody() {
    let etcd = Etcd::start();
    let mut c = etcd_client(&etcd).await;
    put_node(&mut c, "a").await;
    let mut server = Apiserver::start(&etcd, &[]).await;
    let mut w = server.watcher("node-w").await;
    let channel = server.channel("node-x").await;

    let mut cases: Vec<(&str, &'static str, Vec<u8>)> = Vec::new();
    for path in [WATCH, INFO, STATUS, REPORT] {
        for (what, body) in GARBAGE {
            cases.push((what, path, body.to_vec()));
        }
    }
    // Well-formed protobuf, but a string field that is not UTF-8 (WatchRequest.clusters,
    // AgentStatus.node) and a varint where a string is declared.
    cases.push((
        "invalid UTF-8 in clusters",
        WATCH,
        vec![0x0a, 0x02, 0xff, 0xfe],
    ));
    cases.push((
        "invalid UTF-8 in node",
        REPORT,
        vec![0x0a, 0x02, 0xc3, 0x28],
    ));
    cases.push(("varint as a string", WATCH, vec![0x08, 0x01]));
    cases.push(("varint as a string", REPORT, vec![0x08, 0x01]));
    for (what, path, body) in cases {
        let status = raw_call(&channel, path, body)
            .await
            .expect_err(&format!("{path} with {what} must be refused"));
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{path} with {what}: {}",
            status_code_and_message(&status)
        );
        assert!(
            status.message().starts_with("malformed "),
            "{path} with {what}: {}",
            status.message()
        );
        server.assert_running();
    }

    // The well-behaved stream kept receiving; the same connection still serves.
    let rev = put_node(&mut c, "b").await;
    w.until_revision(rev).await;
    assert_eq!(of_data(w.encoded()), data_state(&mut c).await);
    raw_call(&channel, INFO, vec![])
        .await
        .expect("Info still answers");
    server.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_skipped_and_unknown_enum_values_refused() {
    let etcd = Etcd::start();
    let mut c = etcd_client(&etcd).await;
    put_node(&mut c, "a").await;
    let mut server = Apiserver::start(&etcd, &[]).await;
    let mut w = server.watcher("node-w").await;
    let channel = server.channel("node-x").await;

    // A newer client's fields are skipped (protobuf's rule), at every wire type.
    let req = pb::WatchRequest {
        clusters: vec![DATA.into()],
        kinds: vec![Kind::Node as i32],
        ..Default::default()
    };
    let first = raw_call(
        &channel,
        WATCH,
        with_unknown_fields(req.encode_to_vec(), 100),
    )
    .await
    .expect("unknown fields are skipped");
    let first = pb::WatchResponse::decode(first).expect("a WatchResponse");
    match first.payload {
        Some(pb::watch_response::Payload::Events(e)) => {
            assert_eq!(e.events.len(), 1, "the snapshot of the one node: {e:?}");
            assert_eq!(e.events[0].name, "a");
        }
        other => panic!("expected the snapshot, got {other:?}"),
    }
    let report = pb::AgentStatus {
        node: "node-x".into(),
        reported_at_unix_ms: 1,
        ..Default::default()
    };
    raw_call(
        &channel,
        REPORT,
        with_unknown_fields(report.encode_to_vec(), 100),
    )
    .await
    .expect("a report with unknown fields is stored");
    raw_call(&channel, INFO, with_unknown_fields(Vec::new(), 100))
        .await
        .expect("Info with unknown fields");

    // An enum value this server does not know is refused, naming it: watching "every
    // kind" instead would hand the client what it did not ask for.
    let req = pb::WatchRequest {
        kinds: vec![99],
        ..Default::default()
    };
    let status = raw_call(&channel, WATCH, req.encode_to_vec())
        .await
        .expect_err("unknown kind");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("unknown kind 99"), "{status:?}");

    let rev = put_node(&mut c, "b").await;
    w.until_revision(rev).await;
    server.assert_running();
}

/// Opens an HTTP/2 stream with `h2` directly and sends one gRPC frame header announcing
/// `announced` bytes followed by only `sent` bytes, then waits (without ending the stream)
/// for the server's answer; returns its grpc-status and grpc-message.
async fn announce(server: &Apiserver, path: &str, announced: u32, sent: usize) -> (i32, String) {
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(server.client_tls("node-h2").config());
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let io = connector.connect(name, tcp).await.expect("TLS");
    let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = tonic::codegen::http::Request::post(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let mut frame = vec![0u8];
    frame.extend(announced.to_be_bytes());
    frame.extend(std::iter::repeat_n(0u8, sent));
    send.send_data(frame.into(), false).unwrap();
    let resp = tokio::time::timeout(STEP, resp)
        .await
        .expect("the server answers before the announced body arrives")
        .expect("response");
    let (parts, mut body) = resp.into_parts();
    let headers = if parts.headers.contains_key("grpc-status") {
        parts.headers
    } else {
        while let Some(d) = tokio::time::timeout(STEP, body.data()).await.expect("body") {
            d.expect("data");
        }
        tokio::time::timeout(STEP, body.trailers())
            .await
            .expect("trailers in time")
            .expect("trailers")
            .expect("grpc-status trailer")
    };
    conn.abort();
    let code = headers["grpc-status"].to_str().unwrap().parse().unwrap();
    let msg = headers
        .get("grpc-message")
        .map(|m| m.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (code, msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_at_the_configured_limit() {
    const LIMIT: usize = 64 * 1024;
    let etcd = Etcd::start();
    let mut c = etcd_client(&etcd).await;
    put_node(&mut c, "a").await;
    let limit = LIMIT.to_string();
    let mut server = Apiserver::start(&etcd, &["--max-request-bytes", &limit]).await;
    let mut w = server.watcher("node-w").await;
    let channel = server.channel("node-x").await;
    let rss0 = server.rss_kib();

    // Just below the limit: served (the blob is an unknown field, skipped).
    let near = with_unknown_fields(Vec::new(), LIMIT - 64);
    assert!(near.len() <= LIMIT);
    raw_call(&channel, WATCH, near.clone())
        .await
        .expect("below the limit");
    raw_call(&channel, INFO, near)
        .await
        .expect("below the limit");
    // Just above it: OUT_OF_RANGE on every method.
    let over = with_unknown_fields(Vec::new(), LIMIT + 1);
    for path in [WATCH, INFO, STATUS, REPORT] {
        let status = raw_call(&channel, path, over.clone())
            .await
            .expect_err("above the limit");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{path}: {status:?}");
        assert!(status.message().contains("too large"), "{path}: {status:?}");
    }

    // A frame header announcing 1 GiB: refused from the header, before the body comes
    // (the stream stays open on the client side; the answer must not wait for it).
    for path in [WATCH, REPORT] {
        let (code, msg) = announce(&server, path, 1 << 30, 16 * 1024).await;
        assert_eq!(code, tonic::Code::OutOfRange as i32, "{path}: {msg}");
        server.assert_running();
    }
    // Many such requests buffer nothing.
    for _ in 0..50 {
        let (code, _) = announce(&server, WATCH, u32::MAX, 60 * 1024).await;
        assert_eq!(code, tonic::Code::OutOfRange as i32);
    }
    let grown = server.rss_kib().saturating_sub(rss0);
    assert!(grown < 32 * MIB, "RSS grew by {grown} KiB");

    let rev = put_node(&mut c, "b").await;
    w.until_revision(rev).await;
    assert_eq!(of_data(w.encoded()), data_state(&mut c).await);
    server.assert_running();
}

/// Opens `n` watch streams on one connection and reads each one's snapshot.
async fn open_idle(server: &Apiserver, conn: usize, n: usize) -> Vec<Watcher> {
    let mut client = server.client(&format!("node-{conn}")).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut w = Watcher::open(&mut client, pb::WatchRequest::default())
            .await
            .expect("watch");
        w.next().await;
        out.push(w);
    }
    out
}

/// Opens `conns` x `per_conn` idle streams, each having read its snapshot.
async fn open_many(
    server: &std::sync::Arc<Apiserver>,
    conns: usize,
    per_conn: usize,
) -> Vec<Watcher> {
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..conns {
        let server = server.clone();
        tasks.spawn(async move { open_idle(&server, conn, per_conn).await });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("opening streams"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_streams_cost_bounded_memory_and_the_limit_holds() {
    const CONNS: usize = 20;
    const PER_CONN: usize = 100;
    const STREAMS: usize = CONNS * PER_CONN;
    let etcd = Etcd::start();
    let mut c = etcd_client(&etcd).await;
    for i in 0..50 {
        put_node(&mut c, &format!("n{i}")).await;
    }
    let max = (STREAMS + 1).to_string();
    let per_conn = PER_CONN.to_string();
    let server = std::sync::Arc::new(
        Apiserver::start(
            &etcd,
            &[
                "--max-watch-streams",
                &max,
                "--max-streams-per-connection",
                &per_conn,
            ],
        )
        .await,
    );
    let mut w = server.watcher("node-w").await;
    let (rss0, fds0) = (server.rss_kib(), server.fds());

    let mut idle = open_many(&server, CONNS, PER_CONN).await;
    assert_eq!(idle.len(), STREAMS);
    server
        .wait_metric("mesh_apiserver_watch_streams", (STREAMS + 1) as f64)
        .await;
    let rss1 = server.rss_kib();
    let per_stream = (rss1.saturating_sub(rss0)) * 1024 / STREAMS as u64;
    eprintln!(
        "{STREAMS} idle streams: RSS {rss0} -> {rss1} KiB ({per_stream} B per stream), fds {fds0} -> {}",
        server.fds()
    );
    // A stream holds its subscription, its filter and the HTTP/2 state: a few KiB. A
    // per-stream copy of the state or an unbounded buffer would exceed this.
    assert!(
        per_stream < 48 * 1024,
        "{per_stream} B of RSS per idle stream"
    );

    // One more is refused with a clear status; nothing else changes.
    let mut extra = server.client("node-extra").await;
    let status = Watcher::open(&mut extra, pb::WatchRequest::default())
        .await
        .err()
        .or(None);
    let status = match status {
        Some(s) => s,
        None => {
            // tonic may return the stream before the status: the first read carries it.
            let mut s = Watcher::open(&mut extra, pb::WatchRequest::default())
                .await
                .unwrap();
            s.next_result().await.expect_err("refused")
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-watch-streams"),
        "{status:?}"
    );
    assert_eq!(
        server
            .metric("mesh_apiserver_watch_streams_refused_total")
            .await,
        1.0
    );

    // Every stream, idle or not, gets the next event.
    let rev = put_node(&mut c, "fresh").await;
    w.until_revision(rev).await;
    for s in &mut idle {
        s.until_revision(rev).await;
    }
    let want = data_state(&mut c).await;
    assert_eq!(of_data(w.encoded()), want);
    assert!(idle.iter().all(|s| of_data(s.encoded()) == want));

    // Closed streams release everything: a second round costs no more than the first.
    drop(idle);
    server
        .wait_metric("mesh_apiserver_watch_streams", 1.0)
        .await;
    let idle = open_many(&server, CONNS, PER_CONN).await;
    server
        .wait_metric("mesh_apiserver_watch_streams", (STREAMS + 1) as f64)
        .await;
    let rss2 = server.rss_kib();
    drop(idle);
    server
        .wait_metric("mesh_apiserver_watch_streams", 1.0)
        .await;
    eprintln!("second round: RSS {rss2} KiB");
    assert!(
        rss2 <= rss1 + 16 * MIB,
        "a second round of {STREAMS} streams grew RSS from {rss1} to {rss2} KiB: a leak"
    );
    // Every connection but the watcher's closes once its client drops it (the clients
    // close theirs in the background: polled, with a deadline), and the server keeps no
    // descriptor for them (its other fds, to etcd and Kubernetes, may have opened since).
    drop(extra);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let conns = server.grpc_connections();
        if conns == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{conns} connections to the gRPC port after every client but one closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fds2 = server.fds();
    eprintln!("after closing: fds {fds0} -> {fds2}, 1 gRPC connection");
    assert!(
        fds2 <= fds0 + 16,
        "fds {fds0} -> {fds2} after {CONNS} connections closed twice"
    );

    let rev = put_node(&mut c, "after").await;
    w.until_revision(rev).await;
    let mut server = std::sync::Arc::try_unwrap(server).ok().expect("one owner");
    server.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_or_read_slowly_are_cut_not_buffered() {
    const STALLED: usize = 20;
    const SLOW: usize = 4;
    const TXNS: usize = 200;
    const PER_TXN: usize = 50;
    const KEYS: usize = 500;
    const VALUE: usize = 1000;
    let etcd = Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put_node(&mut c, "seed").await;
    let mut server = Apiserver::start(
        &etcd,
        &["--stream-buffer", "32", "--history-events", "20000"],
    )
    .await;
    let mut w = server.watcher("node-w").await;

    // Stalled clients: each on its own connection (HTTP/2 windows of 2 MiB, less than
    // the 10 MB written), never reading after the request.
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut client = server.client(&format!("stalled-{i}")).await;
        stalled.push(
            Watcher::open(&mut client, pb::WatchRequest::default())
                .await
                .expect("watch"),
        );
    }
    // Slow clients: read one message, then pause, as a loaded node would.
    let (end_tx, end_rx) = tokio::sync::watch::channel(0i64);
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let mut s = server.watcher(&format!("slow-{i}")).await;
        let mut end = end_rx.clone();
        slow.push(tokio::spawn(async move {
            while *end.borrow_and_update() == 0 || s.revision < *end.borrow() {
                s.next().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s
        }));
    }
    let rss0 = server.rss_kib();

    // 10 MB of changes (200 transactions of 50 puts of 1 KB over 500 keys) while the
    // well-behaved stream reads everything. The history holds them all, so even a reader
    // cut off for being slow resumes with exactly the events it missed.
    let reader = tokio::spawn(async move {
        let mut end = end_rx;
        let target = *end.wait_for(|e| *e > 0).await.unwrap();
        w.until_revision(target).await;
        w
    });
    let mut end = 0;
    let mut expected = Vec::new();
    let mut peak = rss0;
    for t in 0..TXNS {
        let ops: Vec<TxnOp> = (0..PER_TXN)
            .map(|i| {
                let name = format!("k{}", (t * PER_TXN + i) % KEYS);
                let mut n = node(DATA, &name, "10.0.0.2");
                n.pod_cidrs = vec![format!("{t}-{}", "x".repeat(VALUE))];
                TxnOp::put(
                    keys.object(DATA, Kind::Node, &name),
                    n.encode_to_vec(),
                    None,
                )
            })
            .collect();
        let r = c.txn(Txn::new().and_then(ops)).await.unwrap();
        end = r.header().unwrap().revision();
        expected.extend(std::iter::repeat_n(end, PER_TXN));
        if t % 20 == 0 {
            peak = peak.max(server.rss_kib());
        }
    }
    end_tx.send(end).unwrap();
    let w = reader.await.expect("reader");
    peak = peak.max(server.rss_kib());
    server.assert_running();

    // The well-behaved stream got every event, in order, once, and converged.
    let got: Vec<i64> = w
        .log
        .iter()
        .filter(|e| e.cluster == DATA && e.name.starts_with('k'))
        .map(|e| e.revision)
        .collect();
    assert!(
        got == expected,
        "every event once, in revision order: got {} events, expected {}; first difference at {:?}",
        got.len(),
        expected.len(),
        got.iter().zip(&expected).position(|(a, b)| a != b)
    );
    let want = data_state(&mut c).await;
    assert_eq!(of_data(w.encoded()), want);

    // The stalled streams were cut from live delivery, not buffered for: 10 MB for each
    // of them would be 200 MB.
    let drops = server
        .metric("mesh_apiserver_slow_client_drops_total")
        .await;
    assert!(drops >= STALLED as f64, "slow-client drops: {drops}");
    let grown = peak.saturating_sub(rss0);
    eprintln!("RSS {rss0} KiB before, peak {peak} KiB; slow-client drops {drops}");
    assert!(
        grown < 64 * MIB,
        "RSS grew by {grown} KiB with {STALLED} stalled streams"
    );

    // Slow readers and a stalled one that starts reading converge to etcd's state.
    for s in slow {
        let s = s.await.expect("slow reader");
        assert_eq!(of_data(s.encoded()), want, "a slow reader converges");
    }
    let mut s = stalled.pop().unwrap();
    s.until_revision(end).await;
    assert_eq!(
        of_data(s.encoded()),
        want,
        "a stalled reader that resumes reading converges"
    );
    server.assert_running();
}
