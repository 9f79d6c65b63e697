//! Resuming across a real apiserver restart: a client older than the restarted server's
//! history gets exactly what it missed (the difference between etcd at its revision and
//! now), never a `Reset`; only a revision etcd compacted gets `Reset` and a snapshot.

mod serve_support;

use std::collections::BTreeSet;

use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind, watch_response::Payload};
use serve_support::*;

/// (name, is_upsert) of every event in `msgs`, sorted.
fn event_set(msgs: &[pb::WatchResponse]) -> BTreeSet<(String, String, bool)> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Some(Payload::Events(e)) => Some(e.events.iter()),
            _ => None,
        })
        .flatten()
        .map(|e| (e.cluster.clone(), e.name.clone(), e.value.is_some()))
        .collect()
}

#[tokio::test]
async fn restarted_server_resumes_an_old_client_with_exactly_the_difference() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    for n in ["keep", "gone", "changed", "recreated"] {
        put(
            &mut c,
            keys.object("east", Kind::Node, n),
            &node("east", n, "10.0.0.1"),
        )
        .await;
    }
    put(
        &mut c,
        keys.object("west", Kind::Node, "w1"),
        &node("west", "w1", "10.9.0.1"),
    )
    .await;
    mark_synced(&mut c, &keys, "east", Kind::Node).await;

    // First server instance: the client takes its snapshot (of cluster east only) there.
    let mut first = insecure_server(&etcd, "east", &[]).await;
    let mut grpc1 = grpc(first.addr()).await;
    let request = |resume| pb::WatchRequest {
        clusters: vec!["east".into()],
        resume_revision: resume,
        ..Default::default()
    };
    let mut w = Watcher::open(&mut grpc1, request(0)).await.expect("watch");
    w.until_synced("east", Kind::Node).await;
    assert_eq!(w.state.len(), 4, "{:?}", w.state.keys());
    let seen = w.revision;
    let state = w.state.clone();
    drop(w);
    drop(grpc1);
    first.stop().await;

    // While no server runs: deletes, updates, a delete + re-create, an add then delete
    // (the client must hear nothing of it), changes of another cluster (filtered out).
    delete(&mut c, keys.object("east", Kind::Node, "gone")).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "changed"),
        &node("east", "changed", "10.0.0.2"),
    )
    .await;
    delete(&mut c, keys.object("east", Kind::Node, "recreated")).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "recreated"),
        &node("east", "recreated", "10.0.0.3"),
    )
    .await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "new"),
        &node("east", "new", "10.0.0.4"),
    )
    .await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "transient"),
        &node("east", "transient", "10.0.0.5"),
    )
    .await;
    delete(&mut c, keys.object("east", Kind::Node, "transient")).await;
    let end = put(
        &mut c,
        keys.object("west", Kind::Node, "w2"),
        &node("west", "w2", "10.9.0.2"),
    )
    .await;

    // A new server instance on the same etcd: its history starts after `seen`.
    let second = insecure_server(&etcd, "east", &[]).await;
    let start = second.running().index.with_state(|st| st.history_start());
    assert!(
        start > seen,
        "the restarted index's history ({start}) must begin after the client's revision ({seen})"
    );
    let mut grpc2 = grpc(second.addr()).await;
    let mut w = Watcher::open(&mut grpc2, request(seen))
        .await
        .expect("watch");
    w.state = state;
    w.revision = seen;
    w.until_synced("east", Kind::Node).await;
    assert!(w.resets.is_empty(), "no reset expected: {:?}", w.resets);
    assert!(w.revision >= end, "{} < {end}", w.revision);
    let expected: BTreeSet<(String, String, bool)> = [
        ("east", "gone", false),
        ("east", "changed", true),
        ("east", "recreated", true),
        ("east", "new", true),
    ]
    .into_iter()
    .map(|(c, n, u)| (c.to_string(), n.to_string(), u))
    .collect();
    assert_eq!(event_set(&w.messages), expected, "{:#?}", w.messages);
    assert_eq!(
        w.log.len(),
        expected.len(),
        "each change exactly once: {:#?}",
        w.log
    );
    let mut want = etcd_state(&mut c, &keys).await;
    want.retain(|(cluster, _, _), _| cluster == "east");
    assert_eq!(w.encoded(), want);

    // Then live, from the new server.
    let live = put(
        &mut c,
        keys.object("east", Kind::Node, "after"),
        &node("east", "after", "10.0.0.6"),
    )
    .await;
    w.until_revision(live).await;
    assert!(
        w.state
            .contains_key(&("east".into(), Kind::Node as i32, "after".into()))
    );
    let metrics = &second.running().metrics;
    assert_eq!(metrics.resumes.get(), 1, "counted as a resume");
    assert_eq!(metrics.snapshots.get(), 0, "no snapshot was sent");
}

#[tokio::test]
async fn a_revision_compacted_in_etcd_still_gets_reset_and_a_snapshot() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    let seen = put(
        &mut c,
        keys.object("east", Kind::Node, "a"),
        &node("east", "a", "10.0.0.1"),
    )
    .await;
    let state = {
        let mut first = insecure_server(&etcd, "east", &[]).await;
        let mut w = Watcher::all(first.addr(), 0).await;
        w.until_revision(seen).await;
        let s = w.state.clone();
        drop(w);
        first.stop().await;
        s
    };
    delete(&mut c, keys.object("east", Kind::Node, "a")).await;
    let end = put(
        &mut c,
        keys.object("east", Kind::Node, "b"),
        &node("east", "b", "10.0.0.2"),
    )
    .await;
    c.compact(end, None).await.expect("compact");

    let second = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(second.addr(), seen).await;
    w.state = state;
    w.revision = seen;
    let m = w.next().await;
    let Some(Payload::Reset(r)) = &m.payload else {
        panic!("expected a reset, got {m:?}")
    };
    assert!(
        r.reason.contains(&format!(
            "resume revision {seen} is older than the server's history"
        )) && r.reason.contains("compacted"),
        "{}",
        r.reason
    );
    w.until_revision(end).await;
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
}
