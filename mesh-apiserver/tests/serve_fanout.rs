//! Fan-out: many concurrent streams each receive every event; a stalled client (never
//! reads) blocks nobody, is cut from live delivery, and converges once it reads again.

mod serve_support;

use etcd_client::{Compare, Txn, TxnOp};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use prost::Message;
use serve_support::*;

const STREAMS: usize = 50;
const TXNS: usize = 100;
const PER_TXN: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_get_every_event_and_a_stalled_one_blocks_nobody() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "seed"),
        &node("east", "seed", "10.0.0.1"),
    )
    .await;
    let server = insecure_server(&etcd, "east", &["--stream-buffer", "4"]).await;
    let addr = server.addr();

    // The stalled client: opens its stream and never reads while the events flow.
    let mut stalled = Watcher::open(
        &mut grpc_small_window(addr).await,
        pb::WatchRequest::default(),
    )
    .await
    .expect("watch");

    let mut readers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(STREAMS);
    let (end_tx, end_rx) = tokio::sync::watch::channel(0i64);
    for _ in 0..STREAMS {
        let ready = ready_tx.clone();
        let mut end = end_rx.clone();
        readers.push(tokio::spawn(async move {
            let mut w = Watcher::all(addr, 0).await;
            w.next().await; // the snapshot
            ready.send(()).await.unwrap();
            let target = *end.wait_for(|e| *e > 0).await.unwrap();
            w.until_revision(target).await;
            w
        }));
    }
    for _ in 0..STREAMS {
        ready_rx.recv().await.unwrap();
    }

    // ~2 MB of changes (well beyond HTTP/2 flow-control windows), in transactions of 20.
    let big = "x".repeat(1000);
    let mut expected = Vec::new();
    let mut end = 0;
    for t in 0..TXNS {
        let ops: Vec<TxnOp> = (0..PER_TXN)
            .map(|i| {
                let name = format!("n{}", (t * PER_TXN + i) % 500);
                let mut n = node("east", &name, "10.0.0.2");
                n.pod_cidrs = vec![big.clone()];
                TxnOp::put(
                    keys.object("east", Kind::Node, &name),
                    n.encode_to_vec(),
                    None,
                )
            })
            .collect();
        let r = c
            .txn(Txn::new().when([] as [Compare; 0]).and_then(ops))
            .await
            .unwrap();
        end = r.header().unwrap().revision();
        expected.extend(std::iter::repeat_n(end, PER_TXN));
    }
    end_tx.send(end).unwrap();

    let want = etcd_state(&mut c, &keys).await;
    for r in readers {
        let w = r.await.expect("reader");
        let got: Vec<i64> = w.log.iter().skip(1).map(|e| e.revision).collect();
        assert_eq!(got.len(), expected.len(), "every stream gets every event");
        assert_eq!(got, expected, "in revision order, no duplicates");
        assert!(w.resets.is_empty());
        assert_eq!(w.encoded(), want);
    }

    // The stalled stream was cut from live delivery instead of being waited for.
    let drops = server.running().metrics.slow_client_drops.get();
    assert!(
        drops >= 1,
        "the stalled stream should have been cut off (drops = {drops})"
    );

    // Once it reads, it catches up (from the history, or via a reset) and converges.
    stalled.until_revision(end).await;
    assert_eq!(stalled.encoded(), want);
}

#[tokio::test]
async fn oversized_and_garbage_requests_are_refused_without_harm() {
    let etcd = mesh_testkit::etcd::Etcd::start();
    let keys = Keys::default();
    let mut c = etcd_client(&etcd).await;
    put(
        &mut c,
        keys.object("east", Kind::Node, "a"),
        &node("east", "a", "10.0.0.1"),
    )
    .await;
    let server = insecure_server(&etcd, "east", &[]).await;
    let mut w = Watcher::all(server.addr(), 0).await;
    w.next().await;

    // An oversized request: refused by tonic's decoding limit.
    let mut client = grpc(server.addr())
        .await
        .max_encoding_message_size(64 * 1024 * 1024);
    let huge = pb::WatchRequest {
        clusters: vec!["a".repeat(30); 400_000],
        ..Default::default()
    };
    let err = client
        .watch(huge)
        .await
        .expect_err("oversized request refused");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");

    // Garbage bytes on the gRPC port: the connection is dropped, nothing else happens.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let _ = s
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff garbage garbage")
            .await;
        let _ = s.shutdown().await;
    }

    // The existing stream and new streams still work.
    let rev = put(
        &mut c,
        keys.object("east", Kind::Node, "b"),
        &node("east", "b", "10.0.0.2"),
    )
    .await;
    w.until_revision(rev).await;
    let mut w2 = Watcher::all(server.addr(), 0).await;
    w2.until_revision(rev).await;
    assert_eq!(w2.encoded(), etcd_state(&mut c, &keys).await);
}
