use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use mesh_core::select::Reader;
use mesh_proto::keys::Keys;
use mesh_proto::pb::mesh_server::Mesh;
use mesh_proto::pb::{self, Kind};
use pb::watch_response::Payload;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use super::*;
use crate::index::{Index, Update};
use crate::index::{IndexConfig, RawEvent};
use crate::metrics::Metrics;

fn svc(index: &Index, cfg: impl FnOnce(&mut ServeConfig)) -> (MeshService, CancellationToken) {
    let mut c = ServeConfig::new(
        pb::ClusterConfig {
            name: "east".into(),
            id: 1,
            ..Default::default()
        },
        Keys::default(),
    );
    c.heartbeat_interval = Duration::from_secs(5);
    cfg(&mut c);
    // The watch path never touches etcd; the client connects lazily.
    let etcd =
        futures::executor::block_on(etcd_client::Client::connect(["http://127.0.0.1:1"], None))
            .expect("lazy etcd client");
    let shutdown = CancellationToken::new();
    let svc = MeshService::new(
        c,
        index.clone(),
        etcd,
        Authenticator::Insecure,
        Metrics::default(),
        watch::channel(false).1,
        shutdown.clone(),
    );
    (svc, shutdown)
}

fn put(cluster: &str, kind: Kind, name: &str, value: Vec<u8>, rev: i64) -> RawEvent {
    RawEvent {
        key: Keys::default().object(cluster, kind, name).into_bytes(),
        value: Some(value),
        mod_revision: rev,
    }
}

fn node(cluster: &str, name: &str, rev: i64) -> RawEvent {
    put(
        cluster,
        Kind::Node,
        name,
        pb::Node {
            cluster: cluster.into(),
            name: name.into(),
            ..Default::default()
        }
        .encode_to_vec(),
        rev,
    )
}

async fn open(svc: &MeshService, req: pb::WatchRequest) -> WatchResult {
    svc.watch(Request::new(req))
        .await
        .expect("watch")
        .into_inner()
}

async fn next(s: &mut WatchResult) -> pb::WatchResponse {
    s.next().await.expect("stream open").expect("message")
}

fn decoded(msgs: &[WireMsg]) -> Vec<pb::WatchResponse> {
    msgs.iter().map(|m| m.decode().expect("decodes")).collect()
}

fn events(m: &pb::WatchResponse) -> Vec<String> {
    match &m.payload {
        Some(Payload::Events(e)) => e
            .events
            .iter()
            .map(|e| format!("{}{}", e.name, if e.value.is_some() { "" } else { "-" }))
            .collect(),
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn snapshot_chunks_carry_the_revision_only_on_the_last_and_heartbeats_when_idle() {
    let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
    index.with_state(|st| {
        st.reset(
            9,
            (1..=5).map(|i| node("east", &format!("n{i}"), i)).collect(),
        )
    });
    let (svc, _stop) = svc(&index, |c| c.max_events_per_message = 2);
    let mut s = open(&svc, pb::WatchRequest::default()).await;
    let chunks = [next(&mut s).await, next(&mut s).await, next(&mut s).await];
    assert_eq!(
        chunks.iter().map(|m| m.revision).collect::<Vec<_>>(),
        [0, 0, 9]
    );
    assert_eq!(
        chunks.iter().flat_map(events).collect::<Vec<_>>(),
        ["n1", "n2", "n3", "n4", "n5"]
    );

    // Idle: a heartbeat after exactly one interval (paused clock).
    let t0 = tokio::time::Instant::now();
    let m = next(&mut s).await;
    assert_eq!(m.payload, Some(Payload::Progress(pb::Progress {})));
    assert_eq!((m.revision, t0.elapsed()), (9, Duration::from_secs(5)));

    // A progress notification from etcd moves the heartbeat's revision.
    index.with_state(|st| st.advance(12));
    let m = next(&mut s).await;
    assert_eq!(
        (m.revision, m.payload),
        (12, Some(Payload::Progress(pb::Progress {})))
    );

    // Live batches: one message per batch when they arrive one by one.
    index.with_state(|st| st.apply(vec![node("east", "n6", 13)]));
    let m = next(&mut s).await;
    assert_eq!((m.revision, events(&m)), (13, vec!["n6".to_string()]));
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_is_encoded_one_chunk_at_a_time_as_it_is_sent() {
    let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
    index.with_state(|st| {
        st.reset(
            9,
            (1..=7).map(|i| node("east", &format!("n{i}"), i)).collect(),
        )
    });
    let (svc, _stop) = svc(&index, |c| c.max_events_per_message = 2);
    let req = Request::new(pb::WatchRequest::default());
    let access = svc.access(&req).expect("insecure access");
    let mut stream = stream::WatchStream {
        filter: svc.filter(&access, req.get_ref()).expect("filter"),
        svc: svc.clone(),
        revision: 0,
        heartbeat: Duration::from_secs(5),
    };
    let (_sub, start) = stream.start(0).await.expect("subscribed");
    let stream::StartMessages::Snapshot(mut snapshot) = start else {
        panic!("a fresh stream starts with a snapshot");
    };
    assert_eq!(
        snapshot.objects_left(),
        7,
        "nothing encoded before the first poll"
    );
    let first = snapshot
        .next()
        .expect("first chunk")
        .decode()
        .expect("decodes");
    assert_eq!(
        (first.revision, events(&first)),
        (0, vec!["n1".into(), "n2".into()])
    );
    // The third object closed the first chunk; the rest waits for the next poll.
    assert_eq!(snapshot.objects_left(), 4);
    let rest = decoded(&snapshot.collect::<Vec<_>>());
    assert_eq!(
        rest.iter().map(|m| m.revision).collect::<Vec<_>>(),
        [0, 0, 9],
        "chunks before the last carry no revision"
    );
    assert_eq!(
        rest.iter().flat_map(events).collect::<Vec<_>>(),
        ["n3", "n4", "n5", "n6", "n7"]
    );
}

#[tokio::test(start_paused = true)]
async fn queued_batches_are_coalesced_and_synced_follows_its_events() {
    let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
    index.with_state(|st| st.reset(1, vec![]));
    let (svc, _stop) = svc(&index, |_| {});
    let mut s = open(&svc, pb::WatchRequest::default()).await;
    assert_eq!(next(&mut s).await.revision, 1);
    index.with_state(|st| {
        st.apply(vec![node("east", "a", 2)]);
        st.apply(vec![
            node("east", "b", 3),
            RawEvent {
                key: Keys::default().synced("east", Kind::Node).into_bytes(),
                value: Some(vec![]),
                mod_revision: 3,
            },
        ]);
        st.apply(vec![node("east", "c", 4)]);
    });
    let m = next(&mut s).await;
    assert_eq!((m.revision, events(&m)), (3, vec!["a".into(), "b".into()]));
    let m = next(&mut s).await;
    assert_eq!(
        (m.revision, m.payload),
        (
            3,
            Some(Payload::Synced(pb::Synced {
                cluster: "east".into(),
                kind: Kind::Node as i32
            }))
        )
    );
    let m = next(&mut s).await;
    assert_eq!((m.revision, events(&m)), (4, vec!["c".to_string()]));
}

#[tokio::test(start_paused = true)]
async fn peers_see_only_the_serving_cluster_and_no_unshared_services() {
    let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
    let svc_value = |shared| {
        pb::GlobalService {
            cluster: "east".into(),
            namespace: "ns".into(),
            name: "web".into(),
            shared,
            ..Default::default()
        }
        .encode_to_vec()
    };
    index.with_state(|st| {
        st.reset(
            3,
            vec![
                put("east", Kind::Service, "ns/web", svc_value(false), 2),
                node("east", "e1", 2),
                node("west", "w1", 3),
            ],
        )
    });
    let (service, _stop) = svc(&index, |_| {});
    let filter = StreamFilter {
        clusters: Some(BTreeSet::from(["east".to_string()])),
        kinds: BTreeSet::new(),
        reader: Reader::Peer,
    };
    let mut ws = WatchStream {
        svc: service,
        filter,
        revision: 0,
        heartbeat: Duration::from_secs(5),
    };
    let (mut sub, msgs) = ws.start(0).await.unwrap();
    let msgs = decoded(&msgs.collect::<Vec<_>>());
    assert_eq!(msgs.iter().flat_map(events).collect::<Vec<_>>(), ["e1"]);
    index.with_state(|st| {
        st.apply(vec![put(
            "east",
            Kind::Service,
            "ns/web",
            svc_value(true),
            4,
        )])
    });
    index.with_state(|st| {
        st.apply(vec![put(
            "east",
            Kind::Service,
            "ns/web",
            svc_value(false),
            5,
        )])
    });
    let Update::Batch(b1) = sub.next().await else {
        panic!()
    };
    let Update::Batch(b2) = sub.next().await else {
        panic!()
    };
    let msgs = decoded(&ws.batch_messages(&[b1, b2]));
    assert_eq!(
        msgs.iter().flat_map(events).collect::<Vec<_>>(),
        ["ns/web", "ns/web-"]
    );
}

/// Issue #12: every Service is published for the cluster's own agents (their socket LB
/// translates every ClusterIP), but a non-global one is never presented to a peer: absent
/// from its snapshot, and a global service that stops being global reaches it as a delete.
/// The cluster's own readers see both, unchanged.
#[tokio::test(start_paused = true)]
async fn peers_never_see_local_only_services() {
    let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
    let svc_value = |name: &str, local_only| {
        pb::GlobalService {
            cluster: "east".into(),
            namespace: "kube-system".into(),
            name: name.into(),
            shared: true,
            local_only,
            ..Default::default()
        }
        .encode_to_vec()
    };
    index.with_state(|st| {
        st.reset(
            3,
            vec![
                put(
                    "east",
                    Kind::Service,
                    "kube-system/kube-dns",
                    svc_value("kube-dns", true),
                    2,
                ),
                put(
                    "east",
                    Kind::Service,
                    "kube-system/web",
                    svc_value("web", false),
                    3,
                ),
            ],
        )
    });
    let (service, _stop) = svc(&index, |_| {});
    let mut streams = Vec::new();
    for reader in [Reader::Peer, Reader::OwnCluster] {
        let mut ws = WatchStream {
            svc: service.clone(),
            filter: StreamFilter {
                clusters: Some(BTreeSet::from(["east".to_string()])),
                kinds: BTreeSet::new(),
                reader,
            },
            revision: 0,
            heartbeat: Duration::from_secs(5),
        };
        let (sub, msgs) = ws.start(0).await.unwrap();
        let got: Vec<String> = decoded(&msgs.collect::<Vec<_>>())
            .iter()
            .flat_map(events)
            .collect();
        let want: &[&str] = match reader {
            Reader::Peer => &["kube-system/web"],
            Reader::OwnCluster => &["kube-system/kube-dns", "kube-system/web"],
        };
        assert_eq!(got, want, "{reader:?}");
        streams.push((reader, ws, sub));
    }
    // web loses its global annotation: the peer gets a delete, the own reader the object.
    index.with_state(|st| {
        st.apply(vec![put(
            "east",
            Kind::Service,
            "kube-system/web",
            svc_value("web", true),
            4,
        )])
    });
    for (reader, ws, sub) in &mut streams {
        let Update::Batch(b) = sub.next().await else {
            panic!()
        };
        let got: Vec<String> = decoded(&ws.batch_messages(&[b]))
            .iter()
            .flat_map(events)
            .collect();
        let want = match reader {
            Reader::Peer => "kube-system/web-",
            Reader::OwnCluster => "kube-system/web",
        };
        assert_eq!(got, [want], "{reader:?}");
    }
}

/// DESIGN.md section 14: policies are for the cluster's own agents only. A peer gets no
/// policy object and no policy Synced marker, in its snapshot or live, even when it asks
/// for the kind; the cluster's own readers get both.
#[tokio::test(start_paused = true)]
async fn peers_never_receive_policies_even_when_they_ask_for_the_kind() {
    let index = Index::new(&IndexConfig::new(Keys::default()), Metrics::default());
    let name = "networkpolicies/shop/deny-all";
    let policy = |rev| {
        let value = pb::Policy {
            cluster: "east".into(),
            kind: pb::PolicyKind::NetworkPolicy as i32,
            namespace: "shop".into(),
            name: "deny-all".into(),
            object: format!(r#"{{"rev":{rev}}}"#),
        };
        put("east", Kind::Policy, name, value.encode_to_vec(), rev)
    };
    let synced = |kind, rev| RawEvent {
        key: Keys::default().synced("east", kind).into_bytes(),
        value: Some(pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec()),
        mod_revision: rev,
    };
    index.with_state(|st| {
        st.reset(
            3,
            vec![
                policy(2),
                node("east", "e1", 2),
                synced(Kind::Node, 3),
                synced(Kind::Policy, 3),
            ],
        )
    });
    let (service, _stop) = svc(&index, |_| {});
    let all = BTreeSet::new();
    let policies = BTreeSet::from([Kind::Policy as i32]);
    let both = BTreeSet::from([Kind::Policy as i32, Kind::Node as i32]);
    let mut rev = 3;
    for (reader, kinds, sees) in [
        (Reader::Peer, &all, false),
        (Reader::Peer, &policies, false),
        (Reader::Peer, &both, false),
        (Reader::OwnCluster, &all, true),
        (Reader::OwnCluster, &policies, true),
    ] {
        let case = format!("{reader:?} asking for {kinds:?}");
        let mut ws = WatchStream {
            svc: service.clone(),
            filter: StreamFilter {
                clusters: Some(BTreeSet::from(["east".to_string()])),
                kinds: kinds.clone(),
                reader,
            },
            revision: 0,
            heartbeat: Duration::from_secs(5),
        };
        let (mut sub, msgs) = ws.start(0).await.unwrap();
        let received = |msgs: &[pb::WatchResponse]| {
            let mut objects = Vec::new();
            let mut markers = Vec::new();
            for m in msgs {
                match &m.payload {
                    Some(Payload::Events(e)) => {
                        objects.extend(e.events.iter().map(|e| (e.kind, e.name.clone())))
                    }
                    Some(Payload::Synced(s)) => markers.push(s.kind),
                    _ => {}
                }
            }
            (objects, markers)
        };
        let (objects, markers) = received(&decoded(&msgs.collect::<Vec<_>>()));
        let policy_objects = objects.iter().filter(|(k, _)| *k == Kind::Policy as i32);
        assert_eq!(
            policy_objects.count(),
            usize::from(sees),
            "{case}: {objects:?}"
        );
        assert_eq!(
            markers.contains(&(Kind::Policy as i32)),
            sees,
            "{case}: {markers:?}"
        );
        // A later change, then a delete, of the policy.
        rev += 1;
        index.with_state(|st| st.apply(vec![policy(rev)]));
        rev += 1;
        index.with_state(|st| {
            st.apply(vec![RawEvent {
                value: None,
                ..policy(rev)
            }])
        });
        let Update::Batch(b1) = sub.next().await else {
            panic!("{case}: expected a batch")
        };
        let Update::Batch(b2) = sub.next().await else {
            panic!("{case}: expected a batch")
        };
        let (objects, _) = received(&decoded(&ws.batch_messages(&[b1, b2])));
        let expected = if sees {
            vec![(Kind::Policy as i32, name.to_string()); 2]
        } else {
            vec![]
        };
        assert_eq!(objects, expected, "{case}");
        index.with_state(|st| st.apply(vec![policy(rev + 1)]));
        rev += 1;
    }
}

#[test]
fn assembled_events_messages_are_the_prost_encoding() {
    let evs: Vec<pb::Event> = (0..3)
        .map(|i| pb::Event {
            kind: Kind::Node as i32,
            cluster: "east".into(),
            name: format!("n{i}"),
            revision: 300 + i,
            value: (i != 1).then(|| {
                pb::event::Value::Node(pb::Node {
                    cluster: "east".into(),
                    name: format!("n{i}"),
                    ..Default::default()
                })
            }),
        })
        .collect();
    for (revision, n) in [(0, 0), (0, 3), (1 << 40, 3), (7, 1)] {
        let mut chunker = Chunker::new(&ServeConfig::new(
            pb::ClusterConfig::default(),
            Keys::default(),
        ));
        for ev in &evs[..n] {
            chunker.push(&ev.encode_to_vec());
        }
        let (body, count) = chunker.finish().pop().unwrap_or_default();
        let wire = WireMsg::events(revision, body, count);
        let typed = pb::WatchResponse {
            revision,
            payload: Some(Payload::Events(pb::Events {
                events: evs[..n].to_vec(),
            })),
        };
        let mut bytes = wire.head.clone();
        bytes.extend_from_slice(&wire.body);
        assert_eq!(
            bytes,
            typed.encode_to_vec(),
            "revision {revision}, {n} events"
        );
        assert_eq!((wire.events, wire.decode().unwrap()), (n, typed));
    }
}

#[test]
fn every_error_maps_to_a_specific_code() {
    use tonic::Code;
    let garbage = || pb::WatchRequest::decode(&[0x0a, 0x05][..]).unwrap_err();
    let cases: Vec<(ServeError, Code)> = vec![
        (ServeError::NoConnInfo, Code::Unauthenticated),
        (
            ServeError::ForeignCluster {
                caller: "peer".into(),
                serving: "a".into(),
                requested: "b".into(),
            },
            Code::PermissionDenied,
        ),
        (ServeError::InvalidKind(9), Code::InvalidArgument),
        (ServeError::InvalidRevision(-1), Code::InvalidArgument),
        (ServeError::InvalidNode("".into()), Code::InvalidArgument),
        (
            ServeError::NotAnAgent {
                caller: "x".into(),
                rpc: "ReportStatus",
            },
            Code::PermissionDenied,
        ),
        (ServeError::ShuttingDown, Code::Unavailable),
        (
            ServeError::MalformedRequest(garbage()),
            Code::InvalidArgument,
        ),
        (ServeError::Reencode(garbage()), Code::Internal),
    ];
    for (e, code) in cases {
        let msg = e.to_string();
        let s = Status::from(e);
        assert_eq!((s.code(), s.message()), (code, msg.as_str()));
    }
}

#[test]
fn a_stream_heartbeats_at_the_interval_its_client_asks_for_within_bounds() {
    use super::stream::heartbeat_for;
    let server = Duration::from_secs(5);
    assert_eq!(heartbeat_for(0, server), server);
    assert_eq!(heartbeat_for(1000, server), Duration::from_secs(1));
    assert_eq!(heartbeat_for(10, server), Duration::from_millis(100));
    assert_eq!(heartbeat_for(3_600_000, server), Duration::from_secs(60));
}

#[test]
fn peers_never_get_link_states_and_own_readers_do() {
    for (reader, want) in [(Reader::Peer, false), (Reader::OwnCluster, true)] {
        let filter = StreamFilter {
            clusters: None,
            kinds: BTreeSet::new(),
            reader,
        };
        assert_eq!(filter.accepts("east", Kind::Link), want, "{reader:?}");
        assert!(filter.accepts("east", Kind::Service), "{reader:?}");
    }
}
