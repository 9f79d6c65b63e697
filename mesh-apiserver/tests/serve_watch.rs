//! Watch semantics against a real etcd and a real tonic server: snapshot, Synced markers,
//! live batches in order, resume without loss or duplicates (from the history, or as the
//! difference read from etcd when older than it), reset after compaction and restart, etcd
//! restart, heartbeats.

mod serve_support;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind, watch_response::Payload};
use prost::Message;
use serve_support::*;

fn events(m: &pb::WatchResponse) -> &[pb::Event] {
    match &m.payload {
        Some(Payload::Events(e)) => &e.events,
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test]
async fn snapshot_then_synced_then_live_events_in_order() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Config, ""),
        &pb::ClusterConfig {
            name: "east".into(),
            id: 1,
            ..Default::default()
        },
    )
    .await;
    for i in 1..=3 {
        put(
            &mut c,
            keys.object("east", Kind::Node, &format!("n{i}")),
            &node("east", &format!("n{i}"), &format!("192.168.0.{i}")),
        )
        .await;
    }
    put(
        &mut c,
        keys.object("west", Kind::Service, "default/web"),
        &service("west", "default", "web", true),
    )
    .await;
    let snap_rev = mark_synced(&mut c, &keys, "east", Kind::Node).await;

    let server = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(server.addr(), 0).await;

    // Snapshot: one chunk here, carrying the snapshot revision, config first.
    let m = w.next().await;
    assert_eq!(m.revision, snap_rev);
    let names: Vec<(String, i32, String)> = events(&m)
        .iter()
        .map(|e| (e.cluster.clone(), e.kind, e.name.clone()))
        .collect();
    assert_eq!(
        names,
        [
            ("east".into(), Kind::Config as i32, "".into()),
            ("east".into(), Kind::Node as i32, "n1".into()),
            ("east".into(), Kind::Node as i32, "n2".into()),
            ("east".into(), Kind::Node as i32, "n3".into()),
            ("west".into(), Kind::Service as i32, "default/web".into()),
        ]
    );
    // Then the synced marker that exists.
    let m = w.next().await;
    assert_eq!(
        m.payload,
        Some(Payload::Synced(pb::Synced {
            cluster: "east".into(),
            kind: Kind::Node as i32
        }))
    );

    // Live: one etcd transaction = one message, events in order.
    let txn = Txn::new().when([] as [Compare; 0]).and_then([
        TxnOp::put(
            keys.object("east", Kind::Node, "n4"),
            node("east", "n4", "192.168.0.4").encode_to_vec(),
            None,
        ),
        TxnOp::delete(keys.object("east", Kind::Node, "n1"), None),
    ]);
    let rev = c.txn(txn).await.unwrap().header().unwrap().revision();
    let m = w.next().await;
    assert_eq!(m.revision, rev);
    let evs = events(&m);
    assert_eq!(evs.len(), 2, "one etcd response is one message: {evs:?}");
    assert_eq!(
        (
            evs[0].name.as_str(),
            evs[0].value.is_some(),
            evs[0].revision
        ),
        ("n4", true, rev)
    );
    assert_eq!(
        (evs[1].name.as_str(), evs[1].value.is_some()),
        ("n1", false)
    );

    // A synced marker appearing later is sent when it appears.
    let rev = mark_synced(&mut c, &keys, "west", Kind::Service).await;
    let m = w.next().await;
    assert_eq!(m.revision, rev);
    assert_eq!(
        m.payload,
        Some(Payload::Synced(pb::Synced {
            cluster: "west".into(),
            kind: Kind::Service as i32
        }))
    );

    // Single puts in order.
    let mut revs = Vec::new();
    for i in 5..10 {
        revs.push(
            put(
                &mut c,
                keys.object("east", Kind::Node, &format!("n{i}")),
                &node("east", "x", "10.0.0.1"),
            )
            .await,
        );
    }
    w.until_revision(*revs.last().unwrap()).await;
    let tail: Vec<i64> = w
        .log
        .iter()
        .rev()
        .take(5)
        .map(|e| e.revision)
        .rev()
        .collect();
    assert_eq!(tail, revs);
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
    let _ = CompareOp::Equal;
}

#[tokio::test]
async fn filters_by_cluster_and_kind_and_rejects_bad_requests() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "n1"),
        &node("east", "n1", "10.0.0.1"),
    )
    .await;
    put(
        &mut c,
        keys.object("west", Kind::Node, "n1"),
        &node("west", "n1", "10.0.0.2"),
    )
    .await;
    put(
        &mut c,
        keys.object("west", Kind::Endpoint, "10.2.0.1"),
        &endpoint("10.2.0.1", 70000),
    )
    .await;
    let server = insecure_server(&etcd, "east", &[]).await;
    let mut client = grpc(server.addr()).await;

    let mut w = Watcher::open(
        &mut client,
        pb::WatchRequest {
            clusters: vec!["west".into()],
            kinds: vec![Kind::Endpoint as i32],
            resume_revision: 0,
            heartbeat_interval_ms: 0,
        },
    )
    .await
    .unwrap();
    let m = w.next().await;
    let got: Vec<_> = events(&m)
        .iter()
        .map(|e| (e.cluster.as_str(), e.name.as_str()))
        .collect();
    assert_eq!(got, [("west", "10.2.0.1")]);
    // Changes outside the filter are not sent; the next message is the matching one.
    put(
        &mut c,
        keys.object("east", Kind::Endpoint, "10.1.0.9"),
        &endpoint("10.1.0.9", 65800),
    )
    .await;
    let rev = put(
        &mut c,
        keys.object("west", Kind::Endpoint, "10.2.0.2"),
        &endpoint("10.2.0.2", 70001),
    )
    .await;
    let m = w.next().await;
    assert_eq!(m.revision, rev);
    assert_eq!(
        events(&m)
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["10.2.0.2"]
    );

    for (req, want) in [
        (
            pb::WatchRequest {
                kinds: vec![42],
                ..Default::default()
            },
            "unknown kind 42",
        ),
        (
            pb::WatchRequest {
                clusters: vec!["Not_A_Cluster".into()],
                ..Default::default()
            },
            "invalid cluster name",
        ),
        (
            pb::WatchRequest {
                resume_revision: -5,
                ..Default::default()
            },
            "invalid resume_revision -5",
        ),
    ] {
        let err = client.watch(req).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(want), "{err:?}");
    }
}

#[tokio::test]
async fn resume_gets_exactly_the_missed_events() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "n0"),
        &node("east", "n0", "10.0.0.1"),
    )
    .await;
    mark_synced(&mut c, &keys, "east", Kind::Node).await;
    let server = insecure_server(&etcd, "east", &[]).await;

    let mut w = Watcher::all(server.addr(), 0).await;
    let rev = put(
        &mut c,
        keys.object("east", Kind::Node, "n1"),
        &node("east", "n1", "10.0.0.2"),
    )
    .await;
    w.until_revision(rev).await;
    let last = w.revision;
    let state = w.state.clone();
    drop(w);

    // Missed while disconnected: 3 upserts, 1 delete, 1 update.
    let mut missed = Vec::new();
    for i in 2..5 {
        missed.push(
            put(
                &mut c,
                keys.object("east", Kind::Node, &format!("n{i}")),
                &node("east", "n", "10.0.0.3"),
            )
            .await,
        );
    }
    missed.push(delete(&mut c, keys.object("east", Kind::Node, "n0")).await);
    missed.push(
        put(
            &mut c,
            keys.object("east", Kind::Node, "n1"),
            &node("east", "n1", "10.9.9.9"),
        )
        .await,
    );
    let end = *missed.last().unwrap();

    let mut w = Watcher::all(server.addr(), last).await;
    w.state = state;
    w.revision = last;
    w.until_revision(end).await;
    let got: Vec<i64> = w.log.iter().map(|e| e.revision).collect();
    assert_eq!(
        got, missed,
        "exactly the missed events, in order, no snapshot, no duplicates"
    );
    assert!(w.resets.is_empty());
    // The synced markers that exist come with the resume: after the replayed history, which
    // may end before `end` when the index has not seen the last write yet (then the rest
    // follows live), so they are not necessarily the message after `end`.
    w.until_synced("east", Kind::Node).await;
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
}

#[tokio::test]
async fn resume_older_than_the_trimmed_history_gets_only_the_difference_from_etcd() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    for i in 0..10 {
        put(
            &mut c,
            keys.object("east", Kind::Node, &format!("n{i}")),
            &node("east", "n", "10.0.0.1"),
        )
        .await;
    }
    mark_synced(&mut c, &keys, "east", Kind::Node).await;
    let server = insecure_server(&etcd, "east", &["--history-events", "8"]).await;

    let mut w = Watcher::all(server.addr(), 0).await;
    w.until_synced("east", Kind::Node).await;
    let last = w.revision;
    let state = w.state.clone();
    drop(w);

    // 50 changes: deletes of half the old nodes, new nodes, updates.
    for i in 0..5 {
        delete(&mut c, keys.object("east", Kind::Node, &format!("n{i}"))).await;
    }
    let mut end = 0;
    for i in 0..45 {
        end = put(
            &mut c,
            keys.object("east", Kind::Node, &format!("m{}", i % 30)),
            &node("east", "m", &format!("10.0.1.{i}")),
        )
        .await;
    }
    server.running().index.wait_revision(end).await.unwrap();

    let mut w = Watcher::all(server.addr(), last).await;
    w.state = state;
    w.revision = last;
    assert!(
        server.running().index.with_state(|st| st.history_start()) > last,
        "the history (8 events) no longer reaches back to the client's revision"
    );
    w.synced.clear();
    w.until_synced("east", Kind::Node).await;
    assert!(w.resets.is_empty(), "no reset expected: {:?}", w.resets);
    assert!(w.revision >= end);
    // Exactly the difference: 5 deletes and the 30 distinct m-nodes, each once.
    let deletes = w.log.iter().filter(|e| e.value.is_none()).count();
    assert_eq!((deletes, w.log.len()), (5, 35), "{:#?}", w.log);
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
}

#[tokio::test]
async fn compaction_and_restart_resets_old_clients() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "a"),
        &node("east", "a", "10.0.0.1"),
    )
    .await;
    let mut server = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    let r0 = put(
        &mut c,
        keys.object("east", Kind::Node, "b"),
        &node("east", "b", "10.0.0.2"),
    )
    .await;
    w.until_revision(r0).await;
    let state = w.state.clone();
    drop(w);
    server.stop().await;

    delete(&mut c, keys.object("east", Kind::Node, "a")).await;
    let end = put(
        &mut c,
        keys.object("east", Kind::Node, "c"),
        &node("east", "c", "10.0.0.3"),
    )
    .await;
    c.compact(end, None).await.expect("compact");

    let server = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(server.addr(), r0).await;
    w.state = state;
    w.revision = r0;
    let m = w.next().await;
    assert!(
        matches!(m.payload, Some(Payload::Reset(_))),
        "expected a reset, got {m:?}"
    );
    w.until_revision(end).await;
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
    assert!(
        !w.state
            .contains_key(&("east".into(), Kind::Node as i32, "a".into()))
    );
}

#[tokio::test]
async fn etcd_restart_is_survived_without_losing_events() {
    let mut etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "a"),
        &node("east", "a", "10.0.0.1"),
    )
    .await;
    let server = insecure_server(&etcd, "east", &["--heartbeat-interval", "200ms"]).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    w.next().await;

    etcd.restart();
    let mut c = etcd_client(&etcd).await;
    let del = delete(&mut c, keys.object("east", Kind::Node, "a")).await;
    let end = put(
        &mut c,
        keys.object("east", Kind::Node, "b"),
        &node("east", "b", "10.0.0.2"),
    )
    .await;
    w.until_revision(end).await;
    assert!(
        w.log.iter().any(|e| e.revision == del && e.value.is_none()),
        "the delete was delivered"
    );
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
    assert!(w.resets.is_empty(), "a watch restart needs no client reset");
}

#[tokio::test]
async fn idle_streams_get_progress_heartbeats_with_the_current_revision() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "a"),
        &node("east", "a", "10.0.0.1"),
    )
    .await;
    let server = insecure_server(&etcd, "east", &["--heartbeat-interval", "200ms"]).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    let snap = w.next().await;
    // A write outside clusters/ moves etcd's revision; the heartbeat reports progress
    // once etcd confirms it (progress notification), so a resume skips it.
    let other = put(&mut c, keys.agent("node-x"), &pb::AgentStatus::default()).await;
    loop {
        let m = w.next().await;
        if let Some(Payload::Progress(_)) = m.payload {
            assert!(m.revision >= snap.revision);
            if m.revision >= other {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_the_index_is_cut_off_is_repaired_by_a_relist_and_diff() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let proxy = Proxy::start(etcd.endpoint()).await;
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    for n in ["a", "b", "c"] {
        put(
            &mut c,
            keys.object("east", Kind::Node, n),
            &node("east", n, "10.0.0.1"),
        )
        .await;
    }
    // The server reaches etcd only through the proxy.
    let mut argv = base_args(&etcd, "east", &["--insecure"]);
    let at = argv.iter().position(|a| a == "--etcd-endpoints").unwrap();
    argv[at + 1] = proxy.endpoint();
    let server = start_server(argv).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    let mut old = Watcher::all(server.addr(), 0).await;
    w.next().await;
    old.next().await;
    let before = w.revision;
    let relists = server.running().metrics.etcd_relists.get();

    // Cut the index off, change etcd (deletes included) and compact past the index.
    proxy.cut();
    delete(&mut c, keys.object("east", Kind::Node, "a")).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "b"),
        &node("east", "b", "10.9.9.9"),
    )
    .await;
    let end = put(
        &mut c,
        keys.object("east", Kind::Node, "d"),
        &node("east", "d", "10.0.0.4"),
    )
    .await;
    c.compact(end, None).await.expect("compact");
    proxy.heal();

    // The live stream gets the difference, the delete of `a` included, without a reset.
    w.until_revision(end).await;
    assert!(w.resets.is_empty(), "{:?}", w.resets);
    assert!(
        w.log.iter().any(|e| e.name == "a" && e.value.is_none()),
        "delete of a sent"
    );
    assert_eq!(w.encoded(), etcd_state(&mut c, &keys).await);
    assert_eq!(server.running().metrics.etcd_relists.get(), relists + 1);

    // A client that resumes from before the compaction resumes from the server's history
    // (the relist diff is in it): no reset either.
    drop(old);
    let mut again = Watcher::all(server.addr(), before).await;
    again.revision = before;
    again.until_revision(end).await;
    assert!(again.resets.is_empty());
    let names: Vec<(String, bool)> = again
        .log
        .iter()
        .map(|e| (e.name.clone(), e.value.is_some()))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&("a".to_string(), false)));
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "a"),
        &node("east", "a", "10.0.0.1"),
    )
    .await;
    let mut server = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    w.next().await;
    // Graceful shutdown does not wait for clients to hang up.
    tokio::time::timeout(STEP, server.stop())
        .await
        .expect("shutdown with an open stream completes");
    let err = loop {
        match w.next_result().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "the server is shutting down");
}
