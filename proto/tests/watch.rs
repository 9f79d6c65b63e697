//! The resumable watch client against an in-process tonic server (over `tokio::io::duplex`)
//! whose `Watch` streams the test scripts message by message.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_core::ClusterName;
use mesh_proto::client::{
    self, Backoff, ConnectFn, Phase, ProtocolError, ResumePoint, Watch, WatchError, WatchOptions,
    WatchUpdate,
};
use mesh_proto::pb::mesh_client::MeshClient;
use mesh_proto::pb::mesh_server::{Mesh, MeshServer};
use mesh_proto::pb::{self, Kind, watch_response::Payload};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

type StreamTx = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// Hands every `Watch` call (its request and the sender of its response stream) to the test.
struct ScriptedMesh {
    calls: mpsc::Sender<(pb::WatchRequest, StreamTx)>,
}

#[tonic::async_trait]
impl Mesh for ScriptedMesh {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ClusterConfig>, Status> {
        Err(Status::unimplemented("info"))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        self.calls
            .send((request.into_inner(), tx))
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
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

struct TestServer {
    conns: mpsc::Sender<tokio::io::DuplexStream>,
    calls: Mutex<mpsc::Receiver<(pb::WatchRequest, StreamTx)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    fn start() -> Arc<Self> {
        let (conns, conn_rx) = mpsc::channel::<tokio::io::DuplexStream>(16);
        let (calls_tx, calls) = mpsc::channel(16);
        let incoming = ReceiverStream::new(conn_rx).map(Ok::<_, io::Error>);
        let svc = MeshServer::new(ScriptedMesh { calls: calls_tx });
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
                .expect("serving");
        });
        Arc::new(Self {
            conns,
            calls: Mutex::new(calls),
            task,
        })
    }

    /// A connect closure dialing this server in memory.
    fn connector(self: &Arc<Self>) -> ConnectFn {
        let conns = self.conns.clone();
        client::connect_fn(move || {
            let conns = conns.clone();
            async move {
                let (client_io, server_io) = tokio::io::duplex(1 << 16);
                conns
                    .send(server_io)
                    .await
                    .map_err(|_| io::Error::other("server gone"))?;
                let mut once = Some(client_io);
                let channel = tonic::transport::Endpoint::from_static("http://in-process")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let io = once.take();
                        async move {
                            io.map(TokioIo::new)
                                .ok_or_else(|| io::Error::other("in-process connection used"))
                        }
                    }))
                    .await?;
                Ok::<_, client::BoxError>(MeshClient::new(channel))
            }
        })
    }

    /// The next `Watch` call.
    async fn next_call(&self) -> (pb::WatchRequest, StreamTx) {
        tokio::time::timeout(Duration::from_secs(60), self.calls.lock().await.recv())
            .await
            .expect("the client must call Watch")
            .expect("server running")
    }
}

fn c(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn node_event(cluster: &str, name: &str, revision: i64) -> pb::Event {
    pb::Event {
        kind: Kind::Node as i32,
        cluster: cluster.into(),
        name: name.into(),
        revision,
        value: Some(pb::event::Value::Node(pb::Node {
            cluster: cluster.into(),
            name: name.into(),
            ..Default::default()
        })),
    }
}

fn delete_event(cluster: &str, kind: Kind, name: &str, revision: i64) -> pb::Event {
    pb::Event {
        kind: kind as i32,
        cluster: cluster.into(),
        name: name.into(),
        revision,
        value: None,
    }
}

fn events(revision: i64, events: Vec<pb::Event>) -> Result<pb::WatchResponse, Status> {
    Ok(pb::WatchResponse {
        revision,
        payload: Some(Payload::Events(pb::Events { events })),
    })
}

fn synced(revision: i64, cluster: &str, kind: Kind) -> Result<pb::WatchResponse, Status> {
    Ok(pb::WatchResponse {
        revision,
        payload: Some(Payload::Synced(pb::Synced {
            cluster: cluster.into(),
            kind: kind as i32,
        })),
    })
}

fn progress(revision: i64) -> Result<pb::WatchResponse, Status> {
    Ok(pb::WatchResponse {
        revision,
        payload: Some(Payload::Progress(pb::Progress {})),
    })
}

fn reset(revision: i64) -> Result<pb::WatchResponse, Status> {
    Ok(pb::WatchResponse {
        revision,
        payload: Some(Payload::Reset(pb::Reset {
            reason: "revision compacted".into(),
        })),
    })
}

fn options() -> WatchOptions {
    WatchOptions {
        heartbeat_interval: Duration::from_secs(5),
        backoff: Backoff::full_jitter(Duration::from_millis(10), Duration::from_millis(100)),
        healthy_after: Duration::from_secs(10),
        buffer: 64,
        recorder: None,
    }
}

async fn next(w: &mut Watch) -> WatchUpdate {
    tokio::time::timeout(Duration::from_secs(60), w.recv())
        .await
        .expect("an update must arrive")
        .expect("watch running")
}

fn upsert_name(u: &WatchUpdate) -> Option<(&str, i64)> {
    match u {
        WatchUpdate::Upsert { name, revision, .. } => Some((name.as_str(), *revision)),
        _ => None,
    }
}

fn template() -> pb::WatchRequest {
    pb::WatchRequest {
        clusters: vec!["east".into()],
        kinds: vec![Kind::Node as i32],
        resume_revision: 99,
        heartbeat_interval_ms: 0,
    }
}

#[tokio::test]
async fn snapshot_synced_then_live() {
    let server = TestServer::start();
    let mut w = client::spawn_watch(server.connector(), template(), options());
    let (req, tx) = server.next_call().await;
    assert_eq!(req.resume_revision, 0, "the first call takes a snapshot");
    assert_eq!(req.clusters, vec!["east".to_string()]);
    assert_eq!(req.kinds, vec![Kind::Node as i32]);
    assert_eq!(
        req.heartbeat_interval_ms as u128,
        options().heartbeat_interval.as_millis(),
        "the client asks for the heartbeat it expects"
    );

    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Connected {
            resumed: false,
            revision: 0
        }
    );
    tx.send(events(
        10,
        vec![node_event("east", "n1", 4), node_event("east", "n2", 10)],
    ))
    .await
    .unwrap();
    tx.send(synced(10, "east", Kind::Node)).await.unwrap();
    tx.send(events(11, vec![delete_event("east", Kind::Node, "n1", 11)]))
        .await
        .unwrap();

    assert_eq!(upsert_name(&next(&mut w).await), Some(("n1", 4)));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("n2", 10)));
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Synced {
            cluster: c("east"),
            kind: Kind::Node
        }
    );
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Delete {
            cluster: c("east"),
            kind: Kind::Node,
            name: "n1".into(),
            revision: 11
        }
    );
    assert_eq!(w.stats().revision(), 11);
    assert!(w.stats().connected());
    assert!(w.stats().last_message_at().is_some());
    assert_eq!(w.stats().reconnects(), 0);
}

#[tokio::test]
async fn resume_gets_only_missed_events() {
    let server = TestServer::start();
    let mut w = client::spawn_watch(server.connector(), template(), options());
    let (_, tx) = server.next_call().await;
    tx.send(events(10, vec![node_event("east", "n1", 10)]))
        .await
        .unwrap();
    tx.send(synced(10, "east", Kind::Node)).await.unwrap();
    tx.send(events(12, vec![node_event("east", "n2", 12)]))
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, WatchUpdate::Connected { .. }));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("n1", 10)));
    assert!(matches!(next(&mut w).await, WatchUpdate::Synced { .. }));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("n2", 12)));

    // The server goes away.
    tx.send(Err(Status::unavailable("apiserver restarting")))
        .await
        .unwrap();
    drop(tx);
    match next(&mut w).await {
        WatchUpdate::Disconnected {
            error:
                WatchError::Status {
                    phase: Phase::Stream,
                    code: tonic::Code::Unavailable,
                    message,
                },
        } => assert_eq!(message, "apiserver restarting"),
        other => panic!("expected Disconnected, got {other:?}"),
    }

    let (req, tx) = server.next_call().await;
    assert_eq!(
        req.resume_revision, 12,
        "resumes at the last delivered revision"
    );
    assert_eq!(
        req.clusters,
        vec!["east".to_string()],
        "the template is kept"
    );
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Connected {
            resumed: true,
            revision: 12
        }
    );
    tx.send(events(13, vec![node_event("east", "n3", 13)]))
        .await
        .unwrap();
    tx.send(progress(14)).await.unwrap();
    // Exactly the missed event: no snapshot, no Synced again.
    assert_eq!(upsert_name(&next(&mut w).await), Some(("n3", 13)));
    tokio::time::timeout(Duration::from_secs(5), async {
        while w.stats().revision() != 14 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("progress moves the resume point");
    assert_eq!(w.stats().reconnects(), 1);
}

#[tokio::test]
async fn reset_sweeps_vanished_keys_only() {
    let server = TestServer::start();
    let mut w = client::spawn_watch(server.connector(), pb::WatchRequest::default(), options());
    let (_, tx) = server.next_call().await;
    tx.send(events(
        20,
        vec![
            node_event("east", "keep", 5),
            node_event("east", "gone", 6),
            node_event("west", "w-gone", 7),
        ],
    ))
    .await
    .unwrap();
    tx.send(synced(20, "east", Kind::Node)).await.unwrap();
    tx.send(synced(20, "west", Kind::Node)).await.unwrap();
    tx.send(progress(20)).await.unwrap();
    for _ in 0..6 {
        next(&mut w).await;
    }
    drop(tx);
    assert!(matches!(
        next(&mut w).await,
        WatchUpdate::Disconnected { .. }
    ));

    // The client resumes at 20, which the server no longer holds.
    let (req, tx) = server.next_call().await;
    assert_eq!(req.resume_revision, 20);
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Connected {
            resumed: true,
            revision: 20
        }
    );
    tx.send(reset(50)).await.unwrap();
    tx.send(events(
        50,
        vec![node_event("east", "keep", 5), node_event("east", "new", 40)],
    ))
    .await
    .unwrap();
    tx.send(synced(50, "east", Kind::Node)).await.unwrap();
    // west has no Synced in the new snapshot (the cluster is gone): swept at the end.
    tx.send(events(51, vec![node_event("east", "live", 51)]))
        .await
        .unwrap();

    assert!(matches!(next(&mut w).await, WatchUpdate::Reset { .. }));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("keep", 5)));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("new", 40)));
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Delete {
            cluster: c("east"),
            kind: Kind::Node,
            name: "gone".into(),
            revision: 50
        }
    );
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Synced {
            cluster: c("east"),
            kind: Kind::Node
        }
    );
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Delete {
            cluster: c("west"),
            kind: Kind::Node,
            name: "w-gone".into(),
            revision: 50
        }
    );
    assert_eq!(upsert_name(&next(&mut w).await), Some(("live", 51)));
    assert_eq!(w.stats().revision(), 51);
}

#[tokio::test]
async fn interrupted_snapshot_is_not_resumed_as_complete() {
    let server = TestServer::start();
    let mut w = client::spawn_watch(server.connector(), pb::WatchRequest::default(), options());
    let (_, tx) = server.next_call().await;
    // Half a snapshot at revision 30, then the stream dies before Synced.
    tx.send(events(
        30,
        vec![node_event("east", "a", 3), node_event("east", "stale", 4)],
    ))
    .await
    .unwrap();
    assert!(matches!(next(&mut w).await, WatchUpdate::Connected { .. }));
    next(&mut w).await;
    next(&mut w).await;
    drop(tx);
    assert!(matches!(
        next(&mut w).await,
        WatchUpdate::Disconnected { .. }
    ));

    let (req, tx) = server.next_call().await;
    assert_eq!(
        req.resume_revision, 0,
        "half a snapshot is not a resume point"
    );
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Connected {
            resumed: false,
            revision: 0
        }
    );
    assert!(matches!(next(&mut w).await, WatchUpdate::Reset { .. }));
    tx.send(events(31, vec![node_event("east", "a", 3)]))
        .await
        .unwrap();
    tx.send(synced(31, "east", Kind::Node)).await.unwrap();
    assert_eq!(upsert_name(&next(&mut w).await), Some(("a", 3)));
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Delete {
            cluster: c("east"),
            kind: Kind::Node,
            name: "stale".into(),
            revision: 31
        }
    );
    assert!(matches!(next(&mut w).await, WatchUpdate::Synced { .. }));
}

#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_reconnects() {
    let server = TestServer::start();
    let mut w = client::spawn_watch(server.connector(), pb::WatchRequest::default(), options());
    let (_, tx) = server.next_call().await;
    tx.send(events(7, vec![node_event("east", "n1", 7)]))
        .await
        .unwrap();
    tx.send(synced(7, "east", Kind::Node)).await.unwrap();
    tx.send(progress(8)).await.unwrap();
    for _ in 0..3 {
        next(&mut w).await;
    }
    let silent_since = tokio::time::Instant::now();
    // The server keeps the stream open and says nothing (`tx` is alive).
    match next(&mut w).await {
        WatchUpdate::Disconnected {
            error: error @ WatchError::Protocol(ProtocolError::Silent(_)),
        } => assert!(error.to_string().contains("heartbeat"), "{error}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_secs(15) && waited < Duration::from_secs(16),
        "reconnects after 3 heartbeat intervals, not {waited:?}"
    );
    let (req, _tx2) = server.next_call().await;
    assert_eq!(req.resume_revision, 8);
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Connected {
            resumed: true,
            revision: 8
        }
    );
    assert_eq!(w.stats().reconnects(), 1);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn failed_connects_back_off_and_retry() {
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let connect = {
        let attempts = attempts.clone();
        let times = times.clone();
        client::connect_fn(move || {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            times.lock().unwrap().push(tokio::time::Instant::now());
            async {
                Err::<MeshClient<tonic::transport::Channel>, _>(io::Error::other(
                    "connection refused",
                ))
            }
        })
    };
    let opts = WatchOptions {
        backoff: Backoff::full_jitter(Duration::from_secs(1), Duration::from_secs(8)),
        ..options()
    };
    let mut w = client::spawn_watch(connect, pb::WatchRequest::default(), opts.clone());
    for _ in 0..10 {
        match next(&mut w).await {
            WatchUpdate::Disconnected {
                error: error @ WatchError::Connect(_),
            } => assert!(error.to_string().contains("connection refused"), "{error}"),
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    let times = times.lock().unwrap().clone();
    assert!(times.len() >= 10);
    for (i, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let ceiling = opts.backoff.ceiling(i as u32);
        assert!(
            gap <= ceiling,
            "attempt {i}: waited {gap:?}, ceiling {ceiling:?}"
        );
    }
    assert!(w.stats().reconnects() >= 9);
    assert!(!w.stats().connected());
}

#[tokio::test]
async fn malformed_messages_are_skipped() {
    let server = TestServer::start();
    let mut w = client::spawn_watch(server.connector(), pb::WatchRequest::default(), options());
    let (_, tx) = server.next_call().await;
    let mut no_kind = node_event("east", "bad", 3);
    no_kind.kind = 0;
    let mut bad_cluster = node_event("East_1", "bad2", 3);
    bad_cluster.kind = Kind::Node as i32;
    let mut wrong_value = node_event("east", "bad3", 3);
    wrong_value.kind = Kind::Endpoint as i32;
    // An invalid value of the right kind is passed through: the consumer decides.
    let mut invalid_value = node_event("east", "odd", 3);
    if let Some(pb::event::Value::Node(n)) = invalid_value.value.as_mut() {
        n.internal_ips = vec!["not-an-ip".into()];
    }
    tx.send(Ok(pb::WatchResponse {
        revision: 3,
        payload: None,
    }))
    .await
    .unwrap();
    tx.send(events(
        3,
        vec![
            no_kind,
            bad_cluster,
            wrong_value,
            invalid_value,
            node_event("east", "ok", 3),
        ],
    ))
    .await
    .unwrap();
    assert!(matches!(next(&mut w).await, WatchUpdate::Connected { .. }));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("odd", 3)));
    assert_eq!(upsert_name(&next(&mut w).await), Some(("ok", 3)));
}

#[tokio::test]
async fn resume_point_from_a_previous_run_is_swept_on_reset() {
    let server = TestServer::start();
    let resume = ResumePoint {
        revision: 40,
        known: vec![(c("east"), Kind::Node, "old".into())],
    };
    let mut w = client::spawn_watch_from(
        server.connector(),
        pb::WatchRequest::default(),
        options(),
        resume,
    );
    let (req, tx) = server.next_call().await;
    assert_eq!(req.resume_revision, 40);
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Connected {
            resumed: true,
            revision: 40
        }
    );
    tx.send(reset(60)).await.unwrap();
    tx.send(synced(60, "east", Kind::Node)).await.unwrap();
    assert!(matches!(next(&mut w).await, WatchUpdate::Reset { .. }));
    assert_eq!(
        next(&mut w).await,
        WatchUpdate::Delete {
            cluster: c("east"),
            kind: Kind::Node,
            name: "old".into(),
            revision: 60
        }
    );
}
