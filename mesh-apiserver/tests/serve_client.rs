//! The server against mesh-proto's resumable watch client (the one agents and importers
//! use): across a server restart and an etcd compaction, the client resets, sweeps and ends
//! up with exactly etcd's state.

mod serve_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::client::{Backoff, WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use serve_support::*;

type State = BTreeMap<(String, i32, String), Vec<u8>>;

fn apply(state: &mut State, u: &WatchUpdate) {
    match u {
        WatchUpdate::Upsert {
            cluster,
            kind,
            name,
            value,
            ..
        } => {
            let ev = pb::Event {
                value: Some(value.clone()),
                ..Default::default()
            };
            state.insert(
                (cluster.to_string(), *kind as i32, name.clone()),
                encode_value(&ev),
            );
        }
        WatchUpdate::Delete {
            cluster,
            kind,
            name,
            ..
        } => {
            state.remove(&(cluster.to_string(), *kind as i32, name.clone()));
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumable_client_converges_across_restart_and_compaction() {
    let etcd = mesh_testkit::etcd::Etcd::start();
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
    mark_synced(&mut c, &keys, "east", Kind::Node).await;
    let mut server = insecure_server(&etcd, "east", &["--heartbeat-interval", "300ms"]).await;

    let addr = Arc::new(Mutex::new(server.addr()));
    let target = addr.clone();
    let connect = connect_fn(move || {
        let a = *target.lock().unwrap();
        async move {
            tonic::transport::Channel::from_shared(format!("http://{a}"))
                .unwrap()
                .connect()
                .await
                .map(pb::mesh_client::MeshClient::new)
        }
    });
    let mut watch = spawn_watch(
        connect,
        pb::WatchRequest::default(),
        WatchOptions {
            heartbeat_interval: Duration::from_millis(300),
            backoff: Backoff::full_jitter(Duration::from_millis(20), Duration::from_millis(200)),
            ..Default::default()
        },
    );
    let mut state = State::new();
    let mut resets = 0;
    let recv = async |watch: &mut mesh_proto::client::Watch| {
        tokio::time::timeout(STEP, watch.recv())
            .await
            .expect("an update in time")
            .expect("watch running")
    };
    loop {
        let u = recv(&mut watch).await;
        apply(&mut state, &u);
        if matches!(u, WatchUpdate::Synced { .. }) {
            break;
        }
    }
    assert_eq!(state, etcd_state(&mut c, &keys).await);

    // Restart the server while etcd changes and is compacted underneath.
    server.stop().await;
    delete(&mut c, keys.object("east", Kind::Node, "a")).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "d"),
        &node("east", "d", "10.0.0.4"),
    )
    .await;
    let end = put(
        &mut c,
        keys.object("east", Kind::Node, "b"),
        &node("east", "b", "10.9.9.9"),
    )
    .await;
    c.compact(end, None).await.unwrap();
    let server = insecure_server(&etcd, "east", &["--heartbeat-interval", "300ms"]).await;
    *addr.lock().unwrap() = server.addr();

    let want = etcd_state(&mut c, &keys).await;
    while state != want {
        let u = recv(&mut watch).await;
        if matches!(u, WatchUpdate::Reset { .. }) {
            resets += 1;
        }
        apply(&mut state, &u);
    }
    // The resume point moves once the snapshot is known complete (next heartbeat at the
    // latest); heartbeats are not surfaced as updates, so poll the client's stats.
    let deadline = tokio::time::Instant::now() + STEP;
    while watch.stats().revision() < end {
        assert!(
            tokio::time::Instant::now() < deadline,
            "resume point stuck at {}",
            watch.stats().revision()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(resets, 1, "the old revision was compacted away: one reset");
    assert!(!state.contains_key(&("east".to_string(), Kind::Node as i32, "a".to_string())));
}
