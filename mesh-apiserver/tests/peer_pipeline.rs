//! The importer keeps several etcd transactions in flight (`ImporterOptions::txns_in_flight`):
//! a snapshot of many transactions, with the same keys changed and deleted while it is
//! being written, ends with the peer's last values, and every `peers/<peer>/status` it
//! persisted claims only a revision whose data was in etcd when the status was committed
//! (so a restart resumes correctly); each synced marker is committed after the objects it
//! vouches for.

mod peer_support;

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{GetOptions, Txn, TxnOp};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use peer_support::*;
use prost::Message;
use tokio::sync::watch;

/// Endpoints of the snapshot: with 16 operations per transaction, about 190 transactions.
const ENDPOINTS: usize = 3000;
const MAX_TXN_OPS: usize = 16;
const ROUNDS: u32 = 20;
/// The round whose transaction also deletes the [`deleted`] endpoints.
const DELETE_ROUND: u32 = 10;

fn ip(i: usize) -> String {
    format!("10.1.{}.{}", i / 250, i % 250 + 1)
}

/// Changed in every round: spread over the key range, so they fall into many transactions.
fn hot(i: usize) -> bool {
    i.is_multiple_of(100) || !(5..ENDPOINTS - 5).contains(&i)
}

fn deleted(i: usize) -> bool {
    i % 101 == 50
}

/// An endpoint of A whose `pod` carries the version of its value.
fn versioned(i: usize, version: u32) -> pb::Endpoint {
    pb::Endpoint {
        pod: format!("v{version}"),
        ..endpoint(&ip(i), (1 << 16) | 300)
    }
}

fn version(value: &[u8]) -> u32 {
    let e = pb::Endpoint::decode(value).expect("an endpoint");
    e.pod
        .strip_prefix('v')
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {e:?}"))
}

/// The endpoints of A under `clusters/a/` at `revision` (0: now), with their versions.
async fn endpoints_at(c: &mut etcd_client::Client, revision: i64) -> BTreeMap<String, u32> {
    let prefix = Keys::default().kind_prefix("a", Kind::Endpoint);
    let r = c
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        )
        .await
        .expect("get endpoints");
    r.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), version(kv.value())))
        .collect()
}

/// Every version of `key` in etcd's history, newest first: `(mod_revision, value)`.
async fn history(c: &mut etcd_client::Client, key: &str) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let r = c
            .get(key, Some(GetOptions::new().with_revision(at)))
            .await
            .expect("get history");
        let Some(kv) = r.kvs().first() else { break };
        out.push((kv.mod_revision(), kv.value().to_vec()));
        if kv.version() == 1 {
            break;
        }
        at = kv.mod_revision() - 1;
    }
    out
}

/// Waits (an etcd watch) until the importer persisted a status of `peer` claiming
/// `revision` or later.
async fn persisted_status_at_least(c: &mut etcd_client::Client, peer: &str, revision: i64) {
    let mut stream = c
        .watch(Keys::default().peer_status(peer), None)
        .await
        .expect("watch the status");
    if peer_status(c, peer)
        .await
        .is_some_and(|s| s.revision >= revision)
    {
        return;
    }
    let wait = async {
        while let Some(resp) = stream.message().await.expect("status watch") {
            let claims =
                |v: &[u8]| pb::PeerStatus::decode(v).expect("PeerStatus").revision >= revision;
            if resp
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .any(|kv| claims(kv.value()))
            {
                return;
            }
        }
        panic!("the status watch ended");
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no status claiming revision {revision} persisted in 20 s"));
}

async fn txn(c: &mut etcd_client::Client, ops: Vec<TxnOp>) -> i64 {
    let r = c.txn(Txn::new().and_then(ops)).await.expect("txn");
    r.header().unwrap().revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_snapshot_keeps_last_values_and_status_behind_data() {
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
    let all: Vec<usize> = (0..ENDPOINTS).collect();
    for chunk in all.chunks(128) {
        let ops = chunk
            .iter()
            .map(|&i| {
                let key = keys.object("a", Kind::Endpoint, &ip(i));
                TxnOp::put(key, versioned(i, 0).encode_to_vec(), None)
            })
            .collect();
        txn(&mut ea, ops).await;
    }

    let mut options = test_options(None);
    options.max_txn_ops = MAX_TXN_OPS.into();
    assert!(options.txns_in_flight > 1, "the test is about pipelining");
    let (_peers_tx, peers_rx) = watch::channel(Some(peers(&[a.spec()])));
    let mut importer = b.importer(peers_rx, options).await;
    importer.wait("a", "connected", |s| s.connected).await;

    // While the snapshot is being written: the hot keys change in every round, one
    // transaction each, and some endpoints go.
    let mut last = 0;
    for round in 1..=ROUNDS {
        let mut ops: Vec<TxnOp> = (0..ENDPOINTS)
            .filter(|&i| hot(i) && !deleted(i))
            .map(|i| {
                let key = keys.object("a", Kind::Endpoint, &ip(i));
                TxnOp::put(key, versioned(i, round).encode_to_vec(), None)
            })
            .collect();
        if round == DELETE_ROUND {
            ops.extend(
                (0..ENDPOINTS)
                    .filter(|&i| deleted(i))
                    .map(|i| TxnOp::delete(keys.object("a", Kind::Endpoint, &ip(i)), None)),
            );
        }
        last = txn(&mut ea, ops).await;
        if round == DELETE_ROUND {
            // At least one status is persisted mid-way, however fast the machine: the
            // final one alone (written on shutdown) would leave the check below one case.
            persisted_status_at_least(&mut eb, "a", last).await;
        }
    }
    let expected = endpoints_at(&mut ea, 0).await;
    assert_eq!(
        expected.len(),
        ENDPOINTS - (0..ENDPOINTS).filter(|&i| deleted(i)).count()
    );

    // Once the importer's resume point is past A's last change, everything is in B: the
    // revision moves only after the writes up to it committed.
    importer
        .wait("a", "resume point past A's last change", |s| {
            s.synced && s.revision >= last
        })
        .await;
    let imported = endpoints_at(&mut eb, 0).await;
    assert_eq!(
        imported, expected,
        "B's copy of A's endpoints differs from A's (keys and versions)"
    );
    let txns = importer
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("mesh_apiserver_peer_txns_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(
        txns >= (ENDPOINTS / MAX_TXN_OPS) as f64,
        "the snapshot took {txns} transactions"
    );
    // Stopping writes the final status.
    importer.shutdown().await;

    // Every status B persisted: when it was committed, B held A's data up to the revision
    // it claims (a key at that version or later; deleted keys gone, as none comes back).
    let status_key = keys.peer_status("a");
    let statuses = history(&mut eb, &status_key).await;
    let mut checked = 0;
    for (committed_at, value) in &statuses {
        let status = pb::PeerStatus::decode(value.as_slice()).expect("PeerStatus");
        if status.revision == 0 {
            continue;
        }
        let in_a = endpoints_at(&mut ea, status.revision).await;
        let in_b = endpoints_at(&mut eb, *committed_at).await;
        for (key, v) in &in_a {
            match in_b.get(key) {
                Some(w) => assert!(
                    w >= v,
                    "status with revision {} committed at B's revision {committed_at}: {key} \
                     holds version {w}, A had {v} at that revision",
                    status.revision
                ),
                None => assert!(
                    !expected.contains_key(key),
                    "status with revision {} committed at B's revision {committed_at}: {key} \
                     (version {v} in A) is not in B yet",
                    status.revision
                ),
            }
        }
        let gone: Vec<_> = in_b.keys().filter(|k| !in_a.contains_key(*k)).collect();
        assert!(
            gone.is_empty(),
            "status with revision {} committed at B's revision {committed_at}: B still holds \
             {gone:?}, deleted in A by then",
            status.revision
        );
        checked += 1;
    }
    let final_revision = statuses
        .first()
        .map(|(_, v)| pb::PeerStatus::decode(v.as_slice()).unwrap().revision);
    assert!(
        final_revision >= Some(last),
        "the final status claims A's last change ({last}): {final_revision:?}"
    );
    assert!(checked > 1, "only {checked} statuses with a revision");

    // The endpoints' synced marker: when B committed it, every endpoint of the snapshot
    // was in B (the deleted ones may be gone already).
    let marker = keys.synced("a", Kind::Endpoint);
    let created = history(&mut eb, &marker)
        .await
        .last()
        .map(|(rev, _)| *rev)
        .expect("B has the endpoints' synced marker");
    let at_marker: BTreeSet<String> = endpoints_at(&mut eb, created).await.into_keys().collect();
    let missing: Vec<_> = (0..ENDPOINTS)
        .filter(|&i| !deleted(i))
        .map(|i| keys.object("a", Kind::Endpoint, &ip(i)))
        .filter(|k| !at_marker.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "the endpoints' synced marker was committed at B's revision {created} before {} \
         endpoints, e.g. {:?}",
        missing.len(),
        missing.first()
    );
}
