//! mTLS through a real tonic server on a loopback port (DESIGN.md section 8).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::ClusterName;
use mesh_proto::pb;
use mesh_proto::pb::mesh_server::{Mesh, MeshServer};
use mesh_proto::tls::{
    self, ClientEndpoint, ClientTls, IncomingOptions, Role, ServerTls, ServerTlsFiles, TlsIdentity,
    TrustStore,
};
use mesh_testkit::certs::{TestCa, TestCert, Validity};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};

fn name(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn certs(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    tls::parse_certs(pem.as_bytes(), "test").unwrap()
}

fn identity(c: &TestCert) -> TlsIdentity {
    TlsIdentity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()
}

/// Answers `Info` with the authenticated caller: name = caller's cluster, capabilities =
/// [role, node].
struct EchoCaller {
    tls: Arc<ServerTls>,
}

#[tonic::async_trait]
impl Mesh for EchoCaller {
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ClusterConfig>, Status> {
        let caller = self.tls.authenticate(&request)?;
        let (role, node) = match caller.role {
            Role::Agent { node } => ("agent", node),
            Role::Peer => ("peer", String::new()),
            Role::Replica => ("replica", String::new()),
            Role::Operator { name } => ("operator", name),
        };
        Ok(Response::new(pb::ClusterConfig {
            name: caller.cluster.to_string(),
            capabilities: vec![role.into(), node],
            ..Default::default()
        }))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    /// Sends a Synced marker for the caller's cluster, then keeps the stream open.
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.tls.authenticate(&request)?;
        let first = pb::WatchResponse {
            revision: 1,
            payload: Some(pb::watch_response::Payload::Synced(pb::Synced {
                cluster: caller.cluster.to_string(),
                kind: pb::Kind::Node as i32,
            })),
        };
        let stream = futures::StreamExt::chain(
            futures::stream::iter([Ok(first)]),
            futures::stream::pending(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("status"))
    }

    async fn report_status(
        &self,
        _: Request<pb::AgentStatus>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        Err(Status::unimplemented("report_status"))
    }
}

/// A TLS server on a loopback port, stopped on drop.
struct Server {
    addr: SocketAddr,
    tls: Arc<ServerTls>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_server(ca: &TestCa, options: IncomingOptions) -> Server {
    let serving = ca.issue("apiserver");
    let trust = TrustStore::new(name(&ca.cluster), certs(&ca.cert_pem)).unwrap();
    let tls = ServerTls::new(identity(&serving), trust).unwrap();
    start_with(tls, options).await
}

async fn start_with(tls: Arc<ServerTls>, options: IncomingOptions) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tls::tls_incoming(listener, tls.clone(), options);
    let svc = MeshServer::new(EchoCaller { tls: tls.clone() });
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .expect("serving");
    });
    Server { addr, tls, task }
}

/// Dials `server` as `client` (trusting `server_ca`, expecting cluster `expect`) and calls
/// `Info`; any failure (connect or call) is returned as a string with the status code.
async fn call(
    server: &Server,
    server_ca: &TestCa,
    client: &TestCert,
    expect: &str,
) -> Result<pb::ClusterConfig, (Option<Code>, String)> {
    let tls = ClientTls::new(
        certs(&server_ca.cert_pem),
        identity(client),
        Some(name(expect)),
    )
    .unwrap();
    let mut ep = ClientEndpoint::new(format!("localhost:{}", server.addr.port()), tls);
    ep.resolved = Some(server.addr);
    let mut client = tls::connect(&ep)
        .await
        .map_err(|e| (None, format!("{e:#?}")))?;
    client
        .info(pb::InfoRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| (Some(s.code()), s.message().to_owned()))
}

#[tokio::test]
async fn agent_and_replica_accepted_with_correct_caller() {
    let ca = TestCa::new("alpha");
    let server = start_server(&ca, IncomingOptions::default()).await;

    let info = call(&server, &ca, &ca.issue("agent/node-1"), "alpha")
        .await
        .unwrap();
    assert_eq!(info.name, "alpha");
    assert_eq!(
        info.capabilities,
        vec!["agent".to_string(), "node-1".into()]
    );

    let info = call(&server, &ca, &ca.issue("apiserver"), "alpha")
        .await
        .unwrap();
    assert_eq!(info.capabilities[0], "replica");

    let info = call(&server, &ca, &ca.issue("operator/admin"), "alpha")
        .await
        .unwrap();
    assert_eq!(
        info.capabilities,
        vec!["operator".to_string(), "admin".into()]
    );
}

#[tokio::test]
async fn operator_of_another_cluster_refused() {
    let alpha = TestCa::new("alpha");
    let bravo = TestCa::new("bravo");
    let trust = TrustStore::new(name("alpha"), certs(&alpha.cert_pem)).unwrap();
    let tls = ServerTls::new(identity(&alpha.issue("apiserver")), trust).unwrap();
    tls.add_peer_ca(name("bravo"), certs(&bravo.cert_pem))
        .unwrap();
    let server = start_with(tls, IncomingOptions::default()).await;
    let (code, msg) = call(&server, &alpha, &bravo.issue("operator/admin"), "alpha")
        .await
        .unwrap_err();
    assert_eq!(code, Some(tonic::Code::PermissionDenied), "{msg}");
    assert!(msg.contains("spiffe://bravo.mesh/operator/admin"), "{msg}");
}

#[tokio::test]
async fn unknown_ca_refused() {
    let ca = TestCa::new("alpha");
    let stranger = TestCa::new("alpha");
    let server = start_server(&ca, IncomingOptions::default()).await;
    call(&server, &ca, &stranger.issue("agent/node-1"), "alpha")
        .await
        .expect_err("a certificate of an unknown CA must be refused");
    // The same identity from the right CA is served: the refusal was about the CA.
    call(&server, &ca, &ca.issue("agent/node-1"), "alpha")
        .await
        .unwrap();
}

#[tokio::test]
async fn expired_cert_refused() {
    let ca = TestCa::new("alpha");
    let server = start_server(&ca, IncomingOptions::default()).await;
    let expired = ca.issue_for("alpha", "agent/node-1", Validity::Expired);
    call(&server, &ca, &expired, "alpha")
        .await
        .expect_err("an expired certificate must be refused");
    // The same CA with a valid cert still works: the refusal was about expiry.
    call(&server, &ca, &ca.issue("agent/node-1"), "alpha")
        .await
        .unwrap();
}

#[tokio::test]
async fn cluster_claiming_another_is_refused_naming_both() {
    let a = TestCa::new("alpha");
    let b = TestCa::new("bravo");
    let c = TestCa::new("charlie");
    let server = start_server(&a, IncomingOptions::default()).await;
    server
        .tls
        .add_peer_ca(name("bravo"), certs(&b.cert_pem))
        .unwrap();
    server
        .tls
        .add_peer_ca(name("charlie"), certs(&c.cert_pem))
        .unwrap();

    // charlie's CA signs a cert claiming to be bravo's apiserver.
    let forged = c.issue_for("bravo", "apiserver", Validity::Valid);
    let (code, msg) = call(&server, &a, &forged, "alpha").await.unwrap_err();
    assert_eq!(code, Some(Code::PermissionDenied), "{msg}");
    assert!(msg.contains("spiffe://bravo.mesh/apiserver"), "{msg}");
    assert!(msg.contains("cluster bravo"), "{msg}");
    assert!(msg.contains("cluster charlie"), "{msg}");

    // charlie claiming to be an agent of alpha: same refusal.
    let forged = c.issue_for("alpha", "agent/node-1", Validity::Valid);
    let (code, msg) = call(&server, &a, &forged, "alpha").await.unwrap_err();
    assert_eq!(code, Some(Code::PermissionDenied), "{msg}");
    assert!(
        msg.contains("spiffe://alpha.mesh/agent/node-1") && msg.contains("charlie"),
        "{msg}"
    );

    // A genuine peer is accepted as a peer.
    let info = call(&server, &a, &b.issue("apiserver"), "alpha")
        .await
        .unwrap();
    assert_eq!(
        (info.name.as_str(), info.capabilities[0].as_str()),
        ("bravo", "peer")
    );

    // A peer's agent may not talk to us.
    let (code, msg) = call(&server, &a, &b.issue("agent/node-9"), "alpha")
        .await
        .unwrap_err();
    assert_eq!(code, Some(Code::PermissionDenied), "{msg}");
    assert!(
        msg.contains("spiffe://bravo.mesh/agent/node-9") && msg.contains("alpha"),
        "{msg}"
    );
}

#[tokio::test]
async fn plaintext_client_against_tls_server_refused() {
    let ca = TestCa::new("alpha");
    let server = start_server(&ca, IncomingOptions::default()).await;
    let ep = ClientEndpoint::plaintext(server.addr.to_string());
    let result = match tls::connect(&ep).await {
        Ok(mut client) => client
            .info(pb::InfoRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
        Err(e) => Err(e.to_string()),
    };
    result.expect_err("a plaintext client must not get an answer from a TLS server");
}

#[tokio::test]
async fn peer_ca_added_and_removed_at_runtime() {
    let a = TestCa::new("alpha");
    let b = TestCa::new("bravo");
    let server = start_server(&a, IncomingOptions::default()).await;
    let peer = b.issue("apiserver");

    call(&server, &a, &peer, "alpha")
        .await
        .expect_err("bravo is not trusted yet");

    server
        .tls
        .add_peer_ca(name("bravo"), certs(&b.cert_pem))
        .unwrap();
    let info = call(&server, &a, &peer, "alpha").await.unwrap();
    assert_eq!(info.capabilities[0], "peer");

    assert!(server.tls.remove_peer_ca(&name("bravo")).unwrap());
    call(&server, &a, &peer, "alpha")
        .await
        .expect_err("bravo is no longer trusted");
    assert!(
        server.tls.remove_peer_ca(&name("alpha")).is_err(),
        "the local CA stays"
    );
}

#[tokio::test]
async fn client_checks_server_identity() {
    let a = TestCa::new("alpha");
    let server = start_server(&a, IncomingOptions::default()).await;
    // The client expects bravo but reaches alpha's apiserver (signed by a CA it trusts).
    let (code, msg) = call(&server, &a, &a.issue("agent/node-1"), "bravo")
        .await
        .unwrap_err();
    assert_eq!(code, None, "the handshake must fail before any call: {msg}");
    assert!(
        msg.contains("expected the apiserver of cluster bravo"),
        "{msg}"
    );
}

#[tokio::test]
async fn server_cert_must_be_an_apiserver() {
    let a = TestCa::new("alpha");
    let trust = TrustStore::new(name("alpha"), certs(&a.cert_pem)).unwrap();
    // The server presents an agent certificate.
    let tls = ServerTls::new(identity(&a.issue("agent/node-1")), trust).unwrap();
    let server = start_with(tls, IncomingOptions::default()).await;
    let (code, msg) = call(&server, &a, &a.issue("agent/node-2"), "alpha")
        .await
        .unwrap_err();
    assert_eq!(code, None, "{msg}");
    assert!(msg.contains("is not an apiserver identity"), "{msg}");
}

#[tokio::test]
async fn stalled_clients_do_not_block_accept() {
    let ca = TestCa::new("alpha");
    let options = IncomingOptions {
        handshake_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let server = start_server(&ca, options).await;
    // Clients that connect and never speak, and one that sends garbage.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut garbage = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();

    let info = tokio::time::timeout(
        Duration::from_secs(20),
        call(&server, &ca, &ca.issue("agent/node-1"), "alpha"),
    )
    .await
    .expect("a good client must be served while others stall")
    .unwrap();
    assert_eq!(info.name, "alpha");
    drop(stalled);
}

#[tokio::test]
async fn files_are_reloaded_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = TestCa::new("alpha");
    let files = ServerTlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        ca: dir.path().join("ca.crt"),
    };
    let write = |ca: &TestCa| {
        let cert = ca.issue("apiserver");
        std::fs::write(&files.ca, &ca.cert_pem).unwrap();
        std::fs::write(&files.key, &cert.key_pem).unwrap();
        std::fs::write(&files.cert, &cert.cert_pem).unwrap();
    };
    write(&old);
    let tls = ServerTls::from_files(name("alpha"), &files).unwrap();
    let server = start_with(tls.clone(), IncomingOptions::default()).await;
    call(&server, &old, &old.issue("agent/node-1"), "alpha")
        .await
        .unwrap();

    // Rotate the CA: new files, watched every 20 ms.
    let watcher = tokio::spawn(
        tls.clone()
            .watch_files(files.clone(), Duration::from_millis(20)),
    );
    let new = TestCa::new("alpha");
    write(&new);
    let rotated = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if tls.trust().ca_of(&name("alpha")).unwrap() == certs(&new.cert_pem).as_slice() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    watcher.abort();
    rotated.expect("the watcher must pick the new files up");

    call(&server, &new, &new.issue("agent/node-1"), "alpha")
        .await
        .unwrap();
    call(&server, &new, &old.issue("agent/node-1"), "alpha")
        .await
        .expect_err("the old CA is no longer trusted");
}

#[tokio::test]
async fn broken_files_keep_the_previous_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("alpha");
    let cert = ca.issue("apiserver");
    let (c, k) = cert.write(dir.path(), "tls");
    let files = ServerTlsFiles {
        cert: c,
        key: k,
        ca: ca.write(dir.path()),
    };
    let tls = ServerTls::from_files(name("alpha"), &files).unwrap();
    std::fs::write(&files.key, "not a key").unwrap();
    let err = tls.reload_from_files(&files).unwrap_err();
    assert!(err.to_string().contains("tls.key"), "{err}");
    let server = start_with(tls, IncomingOptions::default()).await;
    call(&server, &ca, &ca.issue("agent/node-1"), "alpha")
        .await
        .unwrap();
}

#[test]
fn insecure_only_on_loopback() {
    tls::check_insecure_bind("127.0.0.1:1".parse().unwrap()).unwrap();
    tls::check_insecure_bind("[::1]:1".parse().unwrap()).unwrap();
    for bad in ["0.0.0.0:80", "10.1.2.3:80", "[::]:80"] {
        let err = tls::check_insecure_bind(bad.parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn missing_files_are_named() {
    let err = tls::load_certs(std::path::Path::new("/nonexistent/ca.crt")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = tls::load_certs(&empty).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
    let err = tls::load_key(&empty).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
}

#[tokio::test]
async fn watch_client_over_mtls() {
    use mesh_proto::client::{self, WatchOptions, WatchUpdate};
    let ca = TestCa::new("alpha");
    let server = start_server(&ca, IncomingOptions::default()).await;
    let agent = ca.issue("agent/node-1");
    let tls = ClientTls::new(certs(&ca.cert_pem), identity(&agent), Some(name("alpha"))).unwrap();
    let ep = ClientEndpoint::new(format!("127.0.0.1:{}", server.addr.port()), tls);
    let connect = client::connect_fn(move || {
        let ep = ep.clone();
        async move { tls::connect(&ep).await }
    });
    let mut watch = client::spawn_watch(
        connect,
        pb::WatchRequest::default(),
        WatchOptions::default(),
    );
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), watch.recv())
            .await
            .expect("an update")
            .expect("watch running")
    };
    assert_eq!(
        next().await,
        WatchUpdate::Connected {
            resumed: false,
            revision: 0
        }
    );
    assert_eq!(
        next().await,
        WatchUpdate::Synced {
            cluster: name("alpha"),
            kind: pb::Kind::Node
        }
    );
}

#[tokio::test]
async fn plaintext_only_on_loopback() {
    // A non-loopback listener is refused before serving anything.
    let any = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = tls::plain_incoming(any)
        .err()
        .expect("0.0.0.0 must be refused");
    assert!(err.to_string().contains("0.0.0.0"), "{err}");

    // A plaintext client refuses to dial a non-loopback address (nothing is sent).
    let err = tls::connect(&ClientEndpoint::plaintext("192.0.2.1:443"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, tls::TlsError::InsecureNonLoopback { .. }),
        "{err}"
    );

    // Loopback works end to end, and handlers see a ConnInfo without certificates.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tls::plain_incoming(listener).unwrap();
    let ca = TestCa::new("alpha");
    let trust = TrustStore::new(name("alpha"), certs(&ca.cert_pem)).unwrap();
    let server_tls = ServerTls::new(identity(&ca.issue("apiserver")), trust).unwrap();
    let svc = MeshServer::new(EchoCaller { tls: server_tls });
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    let mut client = tls::connect(&ClientEndpoint::plaintext(addr.to_string()))
        .await
        .unwrap();
    // The echo service authenticates: without a certificate the caller is unauthenticated,
    // and the message names the remote address.
    let status = client.info(pb::InfoRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("127.0.0.1"), "{status:?}");
    task.abort();
}
