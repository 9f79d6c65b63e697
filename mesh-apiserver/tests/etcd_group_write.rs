//! The importer's group writer (`etcd_write::GroupWriter`) against a real etcd: batches of
//! many writers queued together share transactions, yet each batch commits whole; a shared
//! transaction that fails is retried batch by batch so each writer gets its own outcome; a
//! batch whose writer stopped waiting is never written.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Client, GetOptions, WatchOptions};
use futures::FutureExt;
use mesh_apiserver::etcd_write::{Committed, GroupWriter};
use mesh_testkit::etcd::Etcd;
use prometheus_client::metrics::counter::Counter;

const WRITERS: usize = 40;
const ROUNDS: usize = 15;

async fn connect(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connecting to etcd")
}

/// The keys under `prefix`, in order.
async fn keys_under(client: &mut Client, prefix: &str) -> Vec<String> {
    client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

/// Writer `w`'s batch of round `r`: its `w % 5 + 1` keys, each holding `r`.
fn batch(w: usize, r: usize) -> Committed {
    (0..w % 5 + 1)
        .map(|k| (format!("g/w{w:02}/k{k}"), Some(r.to_string().into_bytes())))
        .collect()
}

#[tokio::test]
async fn concurrent_writers_share_transactions_and_each_batch_commits_whole() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let start = client
        .get("g/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let txns = Counter::default();
    let writer = GroupWriter::spawn(client.kv_client(), 128, 2, txns.clone());

    let writers = (0..WRITERS).map(|w| {
        let writer = writer.clone();
        async move {
            for r in 0..ROUNDS {
                let sent = batch(w, r);
                let (back, result) = writer.write(sent.clone()).await;
                result.unwrap_or_else(|e| panic!("writer {w} round {r}: {e}"));
                assert_eq!(back, sent, "writer {w} got another batch back");
            }
        }
    });
    futures::future::join_all(writers).await;

    let batches = (WRITERS * ROUNDS) as u64;
    assert!(
        txns.get() < batches,
        "{} transactions for {batches} batches queued together",
        txns.get()
    );

    // Every put, by revision, from the watch history.
    let mut stream = client
        .watch(
            "g/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start + 1),
            ),
        )
        .await
        .unwrap();
    let total: usize = (0..WRITERS).map(|w| (w % 5 + 1) * ROUNDS).sum();
    let mut puts: Vec<(i64, String, String)> = Vec::new();
    while puts.len() < total {
        let resp = stream.message().await.unwrap().expect("watch stream open");
        for ev in resp.events() {
            let kv = ev.kv().unwrap();
            puts.push((
                kv.mod_revision(),
                kv.key_str().unwrap().to_owned(),
                kv.value_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(puts.len(), total, "puts beyond the batches written");

    // Each writer's batch of each round: all its keys in one revision, nothing else of that
    // writer in it.
    let mut by_batch: BTreeMap<(String, String), BTreeSet<i64>> = BTreeMap::new();
    let mut writers_at: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for (rev, key, value) in &puts {
        let w = key.split('/').nth(1).unwrap().to_owned();
        by_batch
            .entry((w.clone(), value.clone()))
            .or_default()
            .insert(*rev);
        writers_at.entry(*rev).or_default().insert(w);
    }
    assert_eq!(by_batch.len(), WRITERS * ROUNDS);
    for ((w, r), revs) in &by_batch {
        assert_eq!(
            revs.len(),
            1,
            "writer {w} round {r} split over revisions {revs:?}"
        );
    }
    let shared = writers_at.values().filter(|ws| ws.len() > 1).count();
    assert!(shared > 0, "no transaction held two writers' batches");
    assert_eq!(
        writers_at.len() as u64,
        txns.get(),
        "revisions written vs transactions counted"
    );

    let last = client
        .get("g/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(
        last.kvs()
            .iter()
            .all(|kv| kv.value_str().unwrap() == (ROUNDS - 1).to_string()),
        "a key does not hold the last round"
    );
}

#[tokio::test]
async fn a_failing_shared_transaction_is_retried_batch_by_batch() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let txns = Counter::default();
    let writer = GroupWriter::spawn(client.kv_client(), 128, 1, txns.clone());

    let good = |k: &str| vec![(format!("f/{k}"), Some(b"v".to_vec()))];
    // etcd refuses a transaction that names one key twice: this batch fails alone, and
    // fails any transaction it shares.
    let bad: Committed = vec![
        ("f/bad".to_owned(), Some(b"1".to_vec())),
        ("f/bad".to_owned(), Some(b"2".to_vec())),
    ];
    // Queued together before the writer's task runs (this runtime has one thread).
    let (a, b, c) = tokio::join!(
        writer.write(good("a")),
        writer.write(bad.clone()),
        writer.write(good("c")),
    );
    a.1.expect("a good batch sharing a failed transaction is written alone");
    c.1.expect("a good batch sharing a failed transaction is written alone");
    let err = b.1.expect_err("a batch naming one key twice");
    assert!(
        err.to_string().contains("duplicate key"),
        "the writer of the bad batch gets etcd's error: {err}"
    );
    assert_eq!(b.0, bad, "the failed batch is handed back");
    assert_eq!(keys_under(&mut client, "f/").await, ["f/a", "f/c"]);
}

#[tokio::test]
async fn a_batch_whose_writer_stopped_waiting_is_not_written() {
    let etcd = Etcd::start();
    let mut client = connect(&etcd).await;
    let writer = GroupWriter::spawn(client.kv_client(), 128, 1, Counter::default());

    // Queued, then abandoned before the writer's task ran (one thread).
    let abandoned = writer.write(vec![("s/gone".to_owned(), Some(b"v".to_vec()))]);
    assert!(
        abandoned.now_or_never().is_none(),
        "written without the task running"
    );
    let (_, kept) = writer
        .write(vec![("s/kept".to_owned(), Some(b"v".to_vec()))])
        .await;
    kept.expect("the batch still awaited");
    assert_eq!(keys_under(&mut client, "s/").await, ["s/kept"]);
}
