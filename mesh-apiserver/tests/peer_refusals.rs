//! Refusals (DESIGN.md sections 8 and 10): a peer whose ID or name collides, whose pod
//! CIDRs overlap, or that presents the wrong certificate is refused with a message naming
//! both clusters and the values; nothing of it is imported; the refusal is in the peer
//! status (etcd and `Status`), the metrics and the log. A peer cannot read a third
//! cluster's relayed data.

mod peer_support;

use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::certs::TestCa;
use peer_support::*;
use tokio::sync::watch;

/// B (id 2, 10.2.0.0/16) is asked to import `spec`; waits until it was refused twice
/// (the retry is refused too), checks that nothing was imported and that the status and
/// metrics say why. Returns the refusal message.
async fn refused(b: &Cluster, spec: mesh_apiserver::peer::PeerSpec, reason: &str) -> String {
    let peer = spec.name.to_string();
    let mut eb = b.etcd_client().await;
    let before = cluster_keys(&mut eb, &peer).await;
    let (_tx, rx) = watch::channel(Some(peers(&[spec])));
    let importer = b.importer(rx, test_options(None)).await;
    let s = importer
        .wait(&peer, "refused twice", |s| s.refusals >= 2)
        .await;
    let message = s.last_refusal.clone().expect("a refusal message");
    assert!(!s.connected && !s.synced, "{s:#?}");
    assert_eq!(s.objects, 0, "{s:#?}");
    assert_eq!(s.snapshots, 0, "{s:#?}");
    assert_eq!(
        cluster_keys(&mut eb, &peer).await,
        before,
        "nothing may be imported from a refused peer"
    );

    // The refusal is in the status (etcd, and B's Status RPC) and the metrics.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let st = peer_status(&mut eb, &peer).await;
        if st.as_ref().is_some_and(|st| st.last_error == message) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status without the refusal: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut agent = b.agent_client().await;
    let resp = agent
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let p = resp
        .peers
        .iter()
        .find(|p| p.cluster == peer)
        .expect("peer in Status");
    assert_eq!(p.last_error, message);
    let text = importer.metrics_text();
    let line = format!(r#"mesh_apiserver_peer_refusals_total{{peer="{peer}",reason="{reason}"}}"#);
    assert!(text.contains(&line), "no {line} in\n{text}");
    message
}

fn cluster_b() -> Cluster {
    Cluster::new("b", 2, "10.2.0.0/16")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_cluster_id() {
    init_tracing();
    let mut a = Cluster::new("a", 2, "10.1.0.0/16");
    let mut b = cluster_b();
    a.start().await;
    b.start().await;
    a.trust(&b);
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let msg = refused(&b, a.spec(), "duplicate_id").await;
    assert!(
        msg.contains(r#"cluster "a" (id 2)"#) && msg.contains(r#""b" (id 2)"#),
        "{msg}"
    );
    assert!(msg.contains("same cluster id"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_cluster_name() {
    init_tracing();
    // Another cluster called "b", with its own CA and ID.
    let mut other = Cluster::new("b", 3, "10.3.0.0/16");
    let mut b = cluster_b();
    other.start().await;
    b.start().await;
    other.trust(&b);
    let mut eb = b.etcd_client().await;
    let own = b.keys().object("b", Kind::Node, "own-node");
    put(&mut eb, own.clone(), &node("b", "own-node", "192.168.2.1")).await;
    let msg = refused(&b, other.spec(), "duplicate_name").await;
    assert!(
        msg.contains(r#"cluster "b" (id 3)"#) && msg.contains(r#"cluster "b" (id 2)"#),
        "{msg}"
    );
    // B's own CA was not replaced by the namesake's: B's agents still get in.
    assert!(
        b.agent_client()
            .await
            .info(pb::InfoRequest {})
            .await
            .is_ok()
    );

    // Removing the namesake removes its status, never B's own data.
    let (_tx, rx) = watch::channel(Some(peers(&[])));
    let _importer = b.importer(rx, test_options(None)).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while peer_status(&mut eb, "b").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the namesake's status stays"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        cluster_keys(&mut eb, "b").await.contains_key(&own),
        "B's own data was deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pod_cidrs() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.2.128.0/17");
    let mut b = cluster_b();
    a.start().await;
    b.start().await;
    a.trust(&b);
    let msg = refused(&b, a.spec(), "overlapping_pod_cidrs").await;
    assert!(
        msg.contains("10.2.128.0/17")
            && msg.contains("10.2.0.0/16")
            && msg.contains(r#""a""#)
            && msg.contains(r#""b""#),
        "{msg}"
    );
}

/// Two peers with the same ID: the second to connect is refused, naming the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_with_one_id() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut c = Cluster::new("c", 1, "10.3.0.0/16");
    let mut b = cluster_b();
    a.start().await;
    c.start().await;
    b.start().await;
    a.trust(&b);
    c.trust(&b);
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let (tx, rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b.importer(rx, test_options(None)).await;
    importer.wait("a", "synced", |s| s.synced).await;
    tx.send_replace(Some(peers(&[a.spec(), c.spec()])));
    let s = importer.wait("c", "refused", |s| s.refusals >= 1).await;
    let msg = s.last_refusal.unwrap();
    assert!(
        msg.contains(r#"cluster "c" (id 1)"#) && msg.contains(r#""a" (id 1)"#),
        "{msg}"
    );
    assert!(importer.stats("a").unwrap().connected);
    let mut eb = b.etcd_client().await;
    assert!(cluster_keys(&mut eb, "c").await.is_empty());
}

/// A server at A's address with a certificate claiming A but signed by C's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_of_another_ca_claiming_the_peer() {
    init_tracing();
    let real_a = TestCa::new("a");
    let c_ca = TestCa::new("c");
    let forged_cert = forged(&c_ca, "a");
    let mut impostor = Cluster::with_cert("a", 1, "10.1.0.0/16", c_ca, forged_cert);
    let mut b = cluster_b();
    impostor.start().await;
    b.start().await;
    impostor.trust(&b);
    let mut spec = impostor.spec();
    spec.ca_pem = real_a.cert_pem.clone();
    let msg = refused(&b, spec, "certificate").await;
    assert!(
        msg.contains("refusing peer a") && msg.contains("certificate"),
        "{msg}"
    );
}

/// A's address serves cluster C's own certificate (the configured CA is C's): the server
/// is not A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_address_serving_another_cluster() {
    init_tracing();
    let mut c = Cluster::new("c", 3, "10.3.0.0/16");
    let mut b = cluster_b();
    c.start().await;
    b.start().await;
    c.trust(&b);
    let mut spec = c.spec();
    spec.name = "a".parse().unwrap();
    let msg = refused(&b, spec, "certificate").await;
    assert!(
        msg.contains("spiffe://c.mesh/apiserver")
            && msg.contains("expected the apiserver of cluster a"),
        "{msg}"
    );
}

/// B's peer-role client asking A for cluster C's (relayed) data is refused by A; B's
/// importer only ever asks for, and writes, A's own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_cannot_read_relayed_data() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = cluster_b();
    a.start().await;
    b.start().await;
    a.trust(&b);
    let keys = a.keys();
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    // C's data, relayed in A's etcd by A's own importer.
    put(
        &mut ea,
        keys.object("c", Kind::Node, "c1"),
        &node("c", "c1", "192.168.3.1"),
    )
    .await;

    let ca = tls::parse_certs(a.ca.cert_pem.as_bytes(), "ca").unwrap();
    let id = TlsIdentity::load(&b.cert, &b.key).unwrap();
    let client_tls = ClientTls::new(ca, id, Some(a.cluster_name())).unwrap();
    let mut as_peer = tls::connect(&ClientEndpoint::new(a.addr().to_string(), client_tls))
        .await
        .expect("B connects to A as a peer");
    let err = as_peer
        .watch(pb::WatchRequest {
            clusters: vec!["c".into()],
            ..Default::default()
        })
        .await
        .expect_err("a peer must not read a third cluster's data");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("may only read the data of cluster a, not of cluster c"),
        "{}",
        err.message()
    );

    let (_tx, rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b.importer(rx, test_options(None)).await;
    importer.wait("a", "synced", |s| s.synced).await;
    let mut eb = b.etcd_client().await;
    assert!(
        cluster_keys(&mut eb, "c").await.is_empty(),
        "C's data must not be relayed to B"
    );
    assert!(!cluster_keys(&mut eb, "a").await.is_empty());
}

/// A connected peer whose published config changes into a conflict (here: B's cluster ID)
/// is refused on the spot: the conflicting config is not imported, the accepted one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changing_into_a_conflict_is_refused() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = cluster_b();
    a.start().await;
    b.start().await;
    a.trust(&b);
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let (_tx, rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b.importer(rx, test_options(None)).await;
    importer.wait("a", "synced", |s| s.synced).await;
    let key = a.keys().object("a", Kind::Config, "");
    let mut eb = b.etcd_client().await;
    let accepted = cluster_keys(&mut eb, "a").await[&key].clone();

    let mut conflicting = pb::ClusterConfig::from(&a.config());
    conflicting.id = 2;
    put(&mut ea, key.clone(), &conflicting).await;
    let s = importer.wait("a", "refused", |s| s.refusals >= 1).await;
    assert!(s.dropped >= 1, "{s:#?}");
    let text = importer.metrics_text();
    assert!(
        text.contains(r#"mesh_apiserver_peer_refusals_total{peer="a",reason="duplicate_id"}"#),
        "{text}"
    );
    assert_eq!(
        cluster_keys(&mut eb, "a").await[&key],
        accepted,
        "the accepted config stays"
    );
}
