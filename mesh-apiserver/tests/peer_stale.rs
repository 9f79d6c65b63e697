//! Staleness (DESIGN.md section 10): while A's apiserver is down, B keeps A's data marked
//! stale; when A returns, B resumes from its revision (no new snapshot) and converges to
//! exactly A's state, deletions included; a restarted importer resumes from the revision
//! persisted in etcd; after the TTL with A still down, A's data is withdrawn, and imported
//! again when A returns.

mod peer_support;

use std::time::Duration;

use mesh_proto::pb::Kind;
use peer_support::*;
use tokio::sync::watch;

async fn seed(a: &Cluster) {
    let keys = a.keys();
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, a).await;
    for i in 1..=3 {
        put(
            &mut ea,
            keys.object("a", Kind::Node, &format!("n{i}")),
            &node("a", &format!("n{i}"), &format!("192.168.1.{i}")),
        )
        .await;
        let id = (1 << 16) | (300 + i);
        put(
            &mut ea,
            keys.object("a", Kind::Endpoint, &format!("10.1.0.{i}")),
            &endpoint(&format!("10.1.0.{i}"), id),
        )
        .await;
    }
}

/// Waits until B holds exactly A's keys (objects and markers; marker values are B's own),
/// except A's own-readers-only kinds (policies), which are never imported.
async fn converged(a: &Cluster, b: &Cluster) {
    let mut ea = a.etcd_client().await;
    let mut eb = b.etcd_client().await;
    let keys = a.keys();
    let local_only = |k: &str| {
        let kind = match keys.parse(k) {
            Some(mesh_proto::keys::ClusterKey::Object { kind, .. }) => kind,
            Some(mesh_proto::keys::ClusterKey::Synced { kind, .. }) => kind,
            None => return false,
        };
        mesh_proto::keys::LOCAL_ONLY_KINDS.contains(&kind)
    };
    let want: std::collections::BTreeMap<String, Vec<u8>> = cluster_keys(&mut ea, "a")
        .await
        .into_iter()
        .filter(|(k, _)| !local_only(k))
        .collect();
    wait_keys(&mut eb, "a", "B to hold exactly A's state", |have| {
        have.len() == want.len()
            && want.iter().all(|(k, v)| {
                have.get(k)
                    .is_some_and(|h| k.contains("/synced/") || h == v)
            })
    })
    .await;
}

/// Waits until B's status in etcd says A is disconnected and stale.
async fn status_stale(b: &Cluster) {
    let mut eb = b.etcd_client().await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let st = peer_status(&mut eb, "a").await.expect("status");
        if !st.connected && st.stale_since_unix_ms > 0 && !st.last_error.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never stale: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until A is synced and the resume point is past the snapshot and persisted (a
/// snapshot interrupted before its end is taken again, by design of the client).
async fn synced_and_resumable(importer: &TestImporter) {
    importer
        .wait("a", "synced with a persisted resume point", |s| {
            s.synced && s.watch_revision > 0 && s.revision == s.watch_revision
        })
        .await;
}

/// Deletes, adds and changes objects of A.
async fn change_a(a: &Cluster) {
    let keys = a.keys();
    let mut ea = a.etcd_client().await;
    delete(&mut ea, keys.object("a", Kind::Node, "n1")).await;
    delete(&mut ea, keys.object("a", Kind::Endpoint, "10.1.0.1")).await;
    put(
        &mut ea,
        keys.object("a", Kind::Node, "n4"),
        &node("a", "n4", "192.168.1.4"),
    )
    .await;
    put(
        &mut ea,
        keys.object("a", Kind::Node, "n2"),
        &node("a", "n2", "192.168.2.2"),
    )
    .await;
}

/// The link to A is cut while both apiservers stay up: B keeps A's data marked stale; on
/// heal it resumes from its revision (A still holds the history) without a snapshot and
/// converges to exactly A's state. A restarted importer resumes from the revision it
/// persisted in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_keeps_stale_data_then_resumes_without_snapshot() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);
    seed(&a).await;
    let keys = a.keys();
    let proxy = Proxy::start(a.addr()).await;
    let mut spec = a.spec();
    spec.address = proxy.addr.to_string();

    let (_tx, rx) = watch::channel(Some(peers(&[spec])));
    let mut importer = b.importer(rx.clone(), test_options(None)).await;
    synced_and_resumable(&importer).await;
    converged(&a, &b).await;
    let mut eb = b.etcd_client().await;
    let before = cluster_keys(&mut eb, "a").await;

    proxy.cut();
    let s = importer
        .wait("a", "disconnected and stale", |s| {
            !s.connected && s.stale_since.is_some()
        })
        .await;
    assert!(!s.last_error.is_empty(), "{s:#?}");
    status_stale(&b).await;
    change_a(&a).await;
    // B's agents learn that A is stale from clusters/a/link (stale demotion), written with
    // the status's stale-since time.
    let link_key = keys.object("a", Kind::Link, "");
    let mut held = cluster_keys(&mut eb, "a").await;
    let link = held
        .remove(&link_key)
        .unwrap_or_else(|| panic!("no {link_key} while A is stale: {:#?}", held.keys()));
    let link = <mesh_proto::pb::PeerLink as prost::Message>::decode(&link[..]).unwrap();
    let st = peer_status(&mut eb, "a").await.unwrap();
    assert_eq!(
        (link.cluster.as_str(), link.stale_since_unix_ms),
        ("a", st.stale_since_unix_ms)
    );
    assert_eq!(
        st.heartbeat_interval_ms,
        test_options(None).watch.heartbeat_interval.as_millis() as i64
    );
    assert_eq!(held, before, "A's data must be kept while stale");

    proxy.heal();
    let s = importer
        .wait("a", "reconnected", |s| s.connected && s.resumes >= 1)
        .await;
    converged(&a, &b).await;
    let s2 = importer.stats("a").unwrap();
    assert_eq!(
        (s.snapshots, s2.snapshots),
        (1, 1),
        "a resumed stream must not take a snapshot: {s2:#?}"
    );
    assert!(s2.stale_since.is_none());
    wait_keys(
        &mut eb,
        "a",
        "the link record gone once A is back",
        |have| !have.contains_key(&link_key),
    )
    .await;
    let text = importer.metrics_text();
    assert!(
        text.contains(r#"mesh_apiserver_peer_snapshots_total{peer="a"} 1"#),
        "{text}"
    );

    // A restarted importer resumes from the revision persisted in etcd.
    let persisted = importer
        .wait("a", "revision persisted", |s| {
            s.revision > 0 && s.revision == s.watch_revision
        })
        .await;
    importer.shutdown().await;
    let st = peer_status(&mut eb, "a").await.unwrap();
    assert_eq!(st.revision, persisted.revision, "{st:?}");
    let mut ea = a.etcd_client().await;
    delete(&mut ea, keys.object("a", Kind::Node, "n4")).await;
    let importer = b.importer(rx, test_options(None)).await;
    let s = importer
        .wait("a", "resumed after restart", |s| {
            s.connected && s.resumes == 1
        })
        .await;
    converged(&a, &b).await;
    assert_eq!(s.snapshots, 0, "a restarted importer must resume: {s:#?}");
    assert_eq!(importer.stats("a").unwrap().snapshots, 0);
    assert!(
        !cluster_keys(&mut eb, "a")
            .await
            .contains_key(&keys.object("a", Kind::Node, "n4"))
    );
}

/// A's apiserver is stopped and started again: B keeps A's data marked stale meanwhile,
/// reconnects asking to resume from its revision, and converges to exactly A's state,
/// including the deletions made while A was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restart_keeps_stale_data_and_converges() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);
    seed(&a).await;

    let (_tx, rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b.importer(rx, test_options(None)).await;
    synced_and_resumable(&importer).await;
    converged(&a, &b).await;
    let mut eb = b.etcd_client().await;
    let before = cluster_keys(&mut eb, "a").await;

    a.stop().await;
    importer
        .wait("a", "disconnected and stale", |s| {
            !s.connected && s.stale_since.is_some()
        })
        .await;
    status_stale(&b).await;
    change_a(&a).await;
    let mut held = cluster_keys(&mut eb, "a").await;
    let link_key = a.keys().object("a", Kind::Link, "");
    assert!(
        held.remove(&link_key).is_some(),
        "A is stale: {link_key} must tell B's agents"
    );
    assert_eq!(held, before, "A's data must be kept while stale");

    a.start().await;
    importer
        .wait("a", "reconnected, asking to resume", |s| {
            s.connected && s.resumes >= 1
        })
        .await;
    converged(&a, &b).await;
    let s = importer
        .wait("a", "synced again", |s| s.synced && s.stale_since.is_none())
        .await;
    assert_eq!(s.withdrawals, 0, "{s:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_after_ttl_and_reimported() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);
    seed(&a).await;

    let ttl = Duration::from_millis(1500);
    let (_tx, rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b.importer(rx, test_options(Some(ttl))).await;
    importer.wait("a", "synced", |s| s.synced).await;
    converged(&a, &b).await;

    a.stop().await;
    let lost = tokio::time::Instant::now();
    let mut eb = b.etcd_client().await;
    // Kept while stale, within the TTL.
    importer
        .wait("a", "stale", |s| s.stale_since.is_some())
        .await;
    if lost.elapsed() < ttl / 2 {
        assert!(
            !cluster_keys(&mut eb, "a").await.is_empty(),
            "withdrawn before the TTL"
        );
    }
    let s = importer
        .wait("a", "withdrawn", |s| s.withdrawals == 1)
        .await;
    assert!(
        lost.elapsed() >= ttl,
        "withdrawn after {:?}, before the TTL",
        lost.elapsed()
    );
    assert!(
        s.last_error.contains("stale TTL") && s.last_error.contains("withdrawn"),
        "{s:#?}"
    );
    wait_keys(&mut eb, "a", "A's data withdrawn", |m| m.is_empty()).await;
    let st = peer_status(&mut eb, "a").await.expect("status stays");
    assert!(!st.connected && !st.synced && st.revision == 0, "{st:?}");
    assert!(
        importer
            .metrics_text()
            .contains(r#"mesh_apiserver_peer_withdrawals_total{peer="a"} 1"#)
    );

    // A returns: imported again, from a fresh snapshot.
    a.start().await;
    let s = importer
        .wait("a", "re-imported", |s| s.synced && s.connected)
        .await;
    assert_eq!(s.snapshots, 2, "{s:#?}");
    converged(&a, &b).await;
}
