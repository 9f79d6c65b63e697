//! Mutual TLS and roles (DESIGN.md section 8): agents read everything, peers only the
//! serving cluster's own shared data; wrong CA, wrong claimed cluster, expired certs,
//! plaintext clients and `--insecure` on a non-loopback address are refused with clear
//! messages.

mod serve_support;

use clap::Parser;
use mesh_apiserver::Args;
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind, mesh_client::MeshClient, watch_response::Payload};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::certs::{TestCa, TestCert, Validity};
use mesh_testkit::etcd::Etcd;
use serve_support::*;
use tonic::transport::Channel;

struct TlsSetup {
    _dir: tempfile::TempDir,
    east: TestCa,
    west: TestCa,
    server: Server,
    etcd: Etcd,
}

async fn setup() -> TlsSetup {
    let dir = tempfile::tempdir().unwrap();
    let east = TestCa::new("east");
    let west = TestCa::new("west");
    let (cert, key) = east.issue("apiserver").write(dir.path(), "server");
    let ca = east.write(dir.path());
    let peers = dir.path().join("peers");
    std::fs::create_dir(&peers).unwrap();
    write_file(&peers, "west.crt", &west.cert_pem);
    let etcd = Etcd::start();
    let argv = base_args(
        &etcd,
        "east",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
            "--peer-ca-dir",
            peers.to_str().unwrap(),
        ],
    );
    let server = start_server(argv).await;
    // The peer CA directory is applied before the server serves.
    let tls = server.running().tls.clone().expect("tls");
    assert!(tls.trust().contains(&"west".parse().unwrap()));
    TlsSetup {
        _dir: dir,
        east,
        west,
        server,
        etcd,
    }
}

async fn client_with(
    server_ca: &TestCa,
    cert: &TestCert,
    addr: std::net::SocketAddr,
) -> Result<MeshClient<Channel>, tls::TlsError> {
    let ca = tls::parse_certs(server_ca.cert_pem.as_bytes(), "ca").unwrap();
    let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
    let tls = ClientTls::new(ca, id, Some("east".parse().unwrap())).unwrap();
    tls::connect(&ClientEndpoint::new(addr.to_string(), tls)).await
}

/// Any error the client sees when its TLS identity is refused: at connect or at the first
/// call, as a transport error or a status.
async fn refused_message(
    server_ca: &TestCa,
    cert: &TestCert,
    addr: std::net::SocketAddr,
) -> String {
    match client_with(server_ca, cert, addr).await {
        Err(e) => format!("{e} / {:?}", std::error::Error::source(&e)),
        Ok(mut c) => match c.info(pb::InfoRequest {}).await {
            Ok(_) => panic!("the call was accepted"),
            Err(s) => format!(
                "{:?}: {} / {:?}",
                s.code(),
                s.message(),
                std::error::Error::source(&s)
            ),
        },
    }
}

#[tokio::test]
async fn agent_reads_everything_and_reports_only_its_own_status() {
    let s = setup().await;
    let keys = Keys::default();
    let mut c = etcd_client(&s.etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "n1"),
        &node("east", "n1", "10.0.0.1"),
    )
    .await;
    let rev = put(
        &mut c,
        keys.object("west", Kind::Node, "w1"),
        &node("west", "w1", "10.0.0.2"),
    )
    .await;
    s.server.running().index.wait_revision(rev).await.unwrap();

    let mut agent = client_with(&s.east, &s.east.issue("agent/node-1"), s.server.addr())
        .await
        .expect("agent connects");
    let mut w = Watcher::open(&mut agent, pb::WatchRequest::default())
        .await
        .unwrap();
    w.until_revision(rev).await;
    assert_eq!(w.state.len(), 2, "an agent reads every cluster");

    agent
        .report_status(pb::AgentStatus {
            node: "node-1".into(),
            ..Default::default()
        })
        .await
        .expect("own status accepted");
    let err = agent
        .report_status(pb::AgentStatus {
            node: "node-2".into(),
            ..Default::default()
        })
        .await
        .expect_err("someone else's status refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "agent node-1 of cluster east may not report the status of node \"node-2\": a node reports only its own status"
    );
}

#[tokio::test]
async fn peer_reads_only_the_serving_clusters_shared_data() {
    let s = setup().await;
    let keys = Keys::default();
    let mut c = etcd_client(&s.etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Service, "default/shared"),
        &service("east", "default", "shared", true),
    )
    .await;
    put(
        &mut c,
        keys.object("east", Kind::Service, "default/private"),
        &service("east", "default", "private", false),
    )
    .await;
    put(
        &mut c,
        keys.object("third", Kind::Node, "t1"),
        &node("third", "t1", "10.3.0.1"),
    )
    .await;
    let rev = mark_synced(&mut c, &keys, "east", Kind::Service).await;
    s.server.running().index.wait_revision(rev).await.unwrap();

    let mut peer = client_with(&s.east, &s.west.issue("apiserver"), s.server.addr())
        .await
        .expect("peer connects");

    // Asking for another cluster's data: refused, naming the cluster.
    let err = peer
        .watch(pb::WatchRequest {
            clusters: vec!["third".into()],
            ..Default::default()
        })
        .await
        .expect_err("foreign cluster refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "peer apiserver of cluster west may only read the data of cluster east, not of cluster third"
    );

    // Everything it may read: east only, without the non-shared service.
    let mut w = Watcher::open(&mut peer, pb::WatchRequest::default())
        .await
        .unwrap();
    w.until_synced("east", Kind::Service).await;
    let names: Vec<String> = w.state.keys().map(|(c, _, n)| format!("{c}/{n}")).collect();
    assert_eq!(names, ["east/default/shared"]);

    // A service turning non-shared disappears for the peer; turning shared appears.
    let r1 = put(
        &mut c,
        keys.object("east", Kind::Service, "default/shared"),
        &service("east", "default", "shared", false),
    )
    .await;
    let m = w.next().await;
    assert_eq!(m.revision, r1);
    let Some(Payload::Events(evs)) = &m.payload else {
        panic!("{m:?}")
    };
    assert_eq!(
        (evs.events[0].name.as_str(), evs.events[0].value.is_none()),
        ("default/shared", true)
    );
    let r2 = put(
        &mut c,
        keys.object("east", Kind::Service, "default/private"),
        &service("east", "default", "private", true),
    )
    .await;
    w.until_revision(r2).await;
    let names: Vec<String> = w.state.keys().map(|(c, _, n)| format!("{c}/{n}")).collect();
    assert_eq!(names, ["east/default/private"]);

    // Peers write nothing and see no Status.
    let err = peer
        .report_status(pb::AgentStatus {
            node: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("peer may not report");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("only agents of this cluster may"),
        "{}",
        err.message()
    );
    let err = peer
        .status(pb::StatusRequest {})
        .await
        .expect_err("no status for peers");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn wrong_ca_wrong_claim_expired_and_plaintext_are_refused() {
    let s = setup().await;
    let addr = s.server.addr();

    // A cert from a CA the server does not know at all: refused in the handshake.
    let rogue = TestCa::new("rogue");
    let msg = refused_message(
        &s.east,
        &rogue.issue_for("east", "agent/node-1", Validity::Valid),
        addr,
    )
    .await;
    assert!(msg.contains("received fatal alert: UnknownCA"), "{msg}");

    // A cert of west's CA claiming to be an east agent: authenticated, then refused by name.
    let msg = refused_message(
        &s.east,
        &s.west.issue_for("east", "agent/node-1", Validity::Valid),
        addr,
    )
    .await;
    assert!(msg.starts_with("PermissionDenied"), "{msg}");
    assert!(
        msg.contains("certificate claims") && msg.contains("not signed by the CA of cluster east"),
        "{msg}"
    );

    // An expired cert of the right CA: refused in the handshake.
    let msg = refused_message(
        &s.east,
        &s.east.issue_for("east", "agent/node-1", Validity::Expired),
        addr,
    )
    .await;
    assert!(
        msg.contains("received fatal alert: CertificateExpired"),
        "{msg}"
    );

    // A plaintext client against the TLS listener.
    let mut plain = MeshClient::connect(format!("http://{addr}")).await;
    let msg = match &mut plain {
        Err(e) => format!("{e:?}"),
        Ok(c) => {
            let e = c
                .info(pb::InfoRequest {})
                .await
                .expect_err("plaintext refused");
            format!("{:?}: {}", e.code(), e.message())
        }
    };
    // The server answers a plaintext HTTP/2 preface with a failed handshake and closes.
    assert!(msg.contains("transport error"), "{msg}");

    let refusals = s.server.running().metrics.auth_refusals.get_or_create(
        &mesh_apiserver::metrics::ReasonLabels {
            reason: "wrong_ca".into(),
        },
    );
    assert_eq!(refusals.get(), 1);

    // The server still serves a good client afterwards.
    let mut agent = client_with(&s.east, &s.east.issue("agent/node-1"), addr)
        .await
        .unwrap();
    agent
        .info(pb::InfoRequest {})
        .await
        .expect("good client served");
}

#[tokio::test]
async fn insecure_on_a_non_loopback_address_is_refused() {
    let etcd = Etcd::start();
    let mut argv = base_args(&etcd, "east", &["--insecure"]);
    let at = argv.iter().position(|a| a == "--listen").unwrap();
    argv[at + 1] = "0.0.0.0:0".into();
    let err = Args::try_parse_from(argv).unwrap().validate().unwrap_err();
    assert_eq!(
        err.to_string(),
        "--insecure refuses to serve plaintext on 0.0.0.0:0: plaintext is only allowed on a loopback address (127.0.0.0/8 or ::1)"
    );
}
