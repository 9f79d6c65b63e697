//! Cluster B imports cluster A (DESIGN.md sections 2, 6, 10): A's objects appear in B's
//! etcd under `clusters/a/` with the same values, and in B's Watch; deletes propagate;
//! synced markers are written; objects outside A's identity range or naming another
//! cluster are dropped and counted; the peer status is in etcd and in `Status`.

mod peer_support;

use mesh_apiserver::peer::PeerSource;
use mesh_proto::client::{WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use peer_support::*;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_imports_a_and_follows_changes() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);

    let keys = a.keys();
    let mut ea = a.etcd_client().await;
    let mut eb = b.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let id_ok = (1 << 16) | 300;
    // n1's agent stopped reporting: A's publisher marked it (issue 14 part 4). The byte for
    // byte comparison below shows the importer relays the mark, so B's agents demote it.
    put(
        &mut ea,
        keys.object("a", Kind::Node, "n1"),
        &pb::Node {
            stale_since_unix_ms: 1_700_000_000_000,
            ..node("a", "n1", "192.168.1.1")
        },
    )
    .await;
    put(
        &mut ea,
        keys.object("a", Kind::Identity, &id_ok.to_string()),
        &identity(id_ok, "default", "a"),
    )
    .await;
    put(
        &mut ea,
        keys.object("a", Kind::Endpoint, "10.1.0.5"),
        &endpoint("10.1.0.5", id_ok),
    )
    .await;
    put(
        &mut ea,
        keys.object("a", Kind::Service, "default/web"),
        &service("a", "default", "web"),
    )
    .await;
    // Not A's to publish: an identity of cluster 2's range, and a node claiming cluster c.
    let id_foreign = (2 << 16) | 300;
    put(
        &mut ea,
        keys.object("a", Kind::Identity, &id_foreign.to_string()),
        &identity(id_foreign, "default", "a"),
    )
    .await;
    put(
        &mut ea,
        keys.object("a", Kind::Node, "intruder"),
        &node("c", "intruder", "192.168.9.9"),
    )
    .await;

    // A's network policy: for A's own agents only, never served to B (DESIGN.md section 14).
    let policy_key = keys.object(
        "a",
        Kind::Policy,
        &mesh_proto::keys::policy_name(
            mesh_core::policy::PolicyKind::NetworkPolicy,
            Some("default"),
            "deny-all",
        ),
    );
    put(
        &mut ea,
        policy_key.clone(),
        &pb::Policy {
            cluster: "a".into(),
            kind: pb::PolicyKind::NetworkPolicy as i32,
            namespace: "default".into(),
            name: "deny-all".into(),
            object: r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"deny-all","namespace":"default"},"spec":{"podSelector":{}}}"#.into(),
        },
    )
    .await;

    let (_peers_tx, peers_rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b.importer(peers_rx, test_options(None)).await;
    let stats = importer
        .wait("a", "synced", |s| s.synced && s.connected)
        .await;
    assert_eq!(stats.snapshots, 1, "{stats:#?}");
    assert_eq!(stats.dropped, 2, "{stats:#?}");

    // B's etcd holds exactly A's valid objects, byte for byte, and the synced markers.
    let a_objects = cluster_objects(&mut ea, "a").await;
    let expected: std::collections::BTreeMap<_, _> = a_objects
        .iter()
        .filter(|(k, _)| {
            !k.ends_with(&id_foreign.to_string()) && !k.ends_with("/intruder") && *k != &policy_key
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(expected.len(), 5);
    let imported = wait_keys(&mut eb, "a", "A's objects in B", |m| {
        m.iter()
            .filter(|(k, _)| !k.contains("/synced/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            == expected
    })
    .await;
    for kind in mesh_proto::keys::ALL_KINDS {
        assert!(
            imported.contains_key(&keys.synced("a", kind)),
            "no synced marker for {kind:?}"
        );
    }
    assert!(
        !imported.contains_key(&keys.synced("a", Kind::Policy)),
        "a peer's policy marker is never imported"
    );
    let text = importer.metrics_text();
    assert!(
        text.contains(
            r#"mesh_apiserver_peer_dropped_total{peer="a",reason="identity_out_of_range"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"mesh_apiserver_peer_dropped_total{peer="a",reason="foreign_cluster"} 1"#),
        "{text}"
    );

    // An agent of B sees A's objects through B's Watch.
    let agent_cert = b.ca.issue("agent/node-1");
    let ca = tls::parse_certs(b.ca.cert_pem.as_bytes(), "ca").unwrap();
    let id = TlsIdentity::from_pem(
        agent_cert.cert_pem.as_bytes(),
        agent_cert.key_pem.as_bytes(),
    )
    .unwrap();
    let endpoint = ClientEndpoint::new(
        b.addr().to_string(),
        ClientTls::new(ca, id, Some(b.cluster_name())).unwrap(),
    );
    let mut w = spawn_watch(
        connect_fn(move || {
            let ep = endpoint.clone();
            async move { tls::connect(&ep).await }
        }),
        pb::WatchRequest {
            clusters: vec!["a".into()],
            ..Default::default()
        },
        Default::default(),
    );
    let mut seen = std::collections::BTreeSet::new();
    tokio::time::timeout(STEP, async {
        while seen.len() < 5 {
            match w.recv().await.unwrap() {
                WatchUpdate::Upsert { kind, name, .. } => {
                    seen.insert((kind, name));
                }
                WatchUpdate::Synced { .. } | WatchUpdate::Connected { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("A's objects in B's watch");
    assert!(
        seen.contains(&(Kind::Endpoint, "10.1.0.5".into())),
        "{seen:?}"
    );

    // Changes in A propagate: a delete and a new object.
    delete(&mut ea, keys.object("a", Kind::Endpoint, "10.1.0.5")).await;
    put(
        &mut ea,
        keys.object("a", Kind::Node, "n2"),
        &node("a", "n2", "192.168.1.2"),
    )
    .await;
    tokio::time::timeout(STEP, async {
        let (mut deleted, mut added) = (false, false);
        while !(deleted && added) {
            match w.recv().await.unwrap() {
                WatchUpdate::Delete {
                    kind: Kind::Endpoint,
                    name,
                    ..
                } if name == "10.1.0.5" => deleted = true,
                WatchUpdate::Upsert {
                    kind: Kind::Node,
                    name,
                    ..
                } if name == "n2" => added = true,
                _ => {}
            }
        }
    })
    .await
    .expect("changes of A in B's watch");
    let now = cluster_objects(&mut eb, "a").await;
    assert!(!now.contains_key(&keys.object("a", Kind::Endpoint, "10.1.0.5")));
    assert!(now.contains_key(&keys.object("a", Kind::Node, "n2")));

    // The peer status, in etcd and through B's Status.
    let rev_a = ea
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let deadline = tokio::time::Instant::now() + STEP;
    let status = loop {
        let s = peer_status(&mut eb, "a").await;
        if let Some(s) = s.filter(|s| s.revision >= rev_a) {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status revision never reached {rev_a}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.connected && status.synced, "{status:?}");
    assert_eq!(status.stale_since_unix_ms, 0);
    assert_eq!(status.address, a.addr().to_string());
    let mut agent = b.agent_client().await;
    let resp = agent
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let peer = resp
        .peers
        .iter()
        .find(|p| p.cluster == "a")
        .expect("peer a in Status");
    assert!(peer.connected && peer.synced, "{peer:?}");
    // The importer registered A's CA in B's trust store (so A's importer can dial B).
    assert!(trusts(&b, "a"));
}

/// Addresses may be DNS names: `localhost` is resolved by hickory (from /etc/hosts) on
/// every connection, and the certificate is checked against the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_names_are_resolved() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let mut spec = a.spec();
    spec.address = format!("localhost:{}", a.addr().port());
    let (_tx, rx) = watch::channel(Some(peers(&[spec])));
    let importer = b.importer(rx, test_options(None)).await;
    importer
        .wait("a", "synced through a DNS name", |s| s.synced)
        .await;
    let mut eb = b.etcd_client().await;
    wait_keys(&mut eb, "a", "A's config in B", |m| {
        m.contains_key(&a.keys().object("a", Kind::Config, ""))
    })
    .await;
}

/// Only the leader imports; every replica trusts the peers' CAs. Losing leadership stops
/// the import (the data stays for the next leader), regaining it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_imports() {
    init_tracing();
    let mut a = Cluster::new("a", 1, "10.1.0.0/16");
    let mut b = Cluster::new("b", 2, "10.2.0.0/16");
    a.start().await;
    b.start().await;
    a.trust(&b);
    let mut ea = a.etcd_client().await;
    publish_config_and_markers(&mut ea, &a).await;
    let (_tx, rx) = watch::channel(Some(peers(&[a.spec()])));
    let importer = b
        .importer_as(PeerSource::Fixed(rx), test_options(None), false)
        .await;
    // A follower registers the CA (so A can reach this replica) but imports nothing.
    let mut trusted = false;
    let deadline = tokio::time::Instant::now() + STEP;
    while !trusted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's CA never trusted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        trusted = trusts(&b, "a");
    }
    // The trust and the worker decisions are made in the same reconcile pass: no worker.
    let mut eb = b.etcd_client().await;
    assert!(importer.stats("a").is_none_or(|s| !s.connected));
    assert!(cluster_keys(&mut eb, "a").await.is_empty());

    importer.leader.send_replace(true);
    let s = importer
        .wait("a", "synced as leader", |s| s.synced && s.connected)
        .await;
    assert_eq!(s.snapshots, 1);
    importer
        .wait("a", "resume point persisted", |s| {
            s.revision > 0 && s.revision == s.watch_revision
        })
        .await;

    importer.leader.send_replace(false);
    importer.wait("a", "stopped", |s| !s.connected).await;
    // The stopped worker wrote its final status; the data stays for the next leader.
    let st = peer_status(&mut eb, "a").await.expect("status");
    assert!(!st.connected && st.revision > 0, "{st:?}");
    assert!(
        !cluster_keys(&mut eb, "a").await.is_empty(),
        "a follower keeps the data"
    );

    importer.leader.send_replace(true);
    let s = importer
        .wait("a", "resumed as leader again", |s| {
            s.connected && s.resumes >= 1
        })
        .await;
    assert_eq!(
        s.snapshots, 0,
        "a new leader resumes from the persisted revision: {s:#?}"
    );
}
