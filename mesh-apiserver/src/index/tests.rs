use std::sync::Arc;

use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use prost::Message;

use super::*;
use crate::metrics::Metrics;

fn cfg(history: usize, buffer: usize) -> IndexConfig {
    let mut c = IndexConfig::new(Keys::default());
    c.history_events = history;
    c.subscriber_buffer = buffer;
    c
}

fn node_put(cluster: &str, name: &str, rev: i64) -> RawEvent {
    let keys = Keys::default();
    RawEvent {
        key: keys.object(cluster, Kind::Node, name).into_bytes(),
        value: Some(
            pb::Node {
                cluster: cluster.into(),
                name: name.into(),
                internal_ips: vec![format!("10.0.0.{rev}")],
                pod_cidrs: vec![],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        mod_revision: rev,
    }
}

fn del(cluster: &str, name: &str, rev: i64) -> RawEvent {
    RawEvent {
        key: Keys::default()
            .object(cluster, Kind::Node, name)
            .into_bytes(),
        value: None,
        mod_revision: rev,
    }
}

fn all(_: &str, _: Kind) -> bool {
    true
}

fn names(objs: &[Arc<Obj>]) -> Vec<String> {
    objs.iter().map(|e| e.name()).collect()
}

fn batch_of(u: Update) -> Arc<Batch> {
    match u {
        Update::Batch(b) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

#[tokio::test]
async fn snapshot_then_live_batches() {
    let mut st = State::new(&cfg(100, 16), Metrics::default());
    st.reset(5, vec![node_put("a", "n1", 3), node_put("a", "n2", 5)]);
    let mut sub = st.subscribe(0, &all);
    let Start::Snapshot { snapshot, reset } = &sub.start else {
        panic!("expected a snapshot")
    };
    assert_eq!(reset, &None);
    assert_eq!(snapshot.revision, 5);
    assert_eq!(names(&snapshot.objects), ["n1", "n2"]);

    st.apply(vec![node_put("a", "n3", 6), del("a", "n1", 6)]);
    let b = batch_of(sub.next().await);
    assert_eq!(b.revision, 6);
    assert_eq!(b.changes.len(), 2, "one watch response is one batch");
    let IndexChange::Object(ev) = &b.changes[1] else {
        panic!()
    };
    assert_eq!((ev.name().as_str(), ev.deleted), ("n1", true));
}

#[tokio::test]
async fn resume_from_history_and_reset_when_too_old() {
    let mut st = State::new(&cfg(3, 16), Metrics::default());
    st.reset(1, vec![]);
    for rev in 2..=6 {
        st.apply(vec![node_put("a", &format!("n{rev}"), rev)]);
    }
    // History holds revisions 4, 5, 6: resumable from 3 on.
    assert_eq!(st.history_start(), 3);
    let sub = st.subscribe(4, &all);
    let Start::Resume { missed, .. } = &sub.start else {
        panic!("expected a resume, got {:?}", sub.start)
    };
    assert_eq!(
        missed.iter().map(|b| b.revision).collect::<Vec<_>>(),
        [5, 6]
    );

    let sub = st.subscribe(2, &all);
    let Start::Snapshot { reset, snapshot } = &sub.start else {
        panic!("expected a reset")
    };
    assert_eq!(
        reset,
        &Some(ResetReason::TooOld {
            requested: 2,
            oldest: 3
        })
    );
    assert_eq!(snapshot.objects.len(), 5);

    let sub = st.subscribe(99, &all);
    assert!(matches!(
        sub.start,
        Start::Snapshot {
            reset: Some(ResetReason::Ahead { .. }),
            ..
        }
    ));
}

fn key_at(cluster: &str, name: &str, rev: i64) -> (Vec<u8>, i64) {
    (
        Keys::default()
            .object(cluster, Kind::Node, name)
            .into_bytes(),
        rev,
    )
}

#[tokio::test]
async fn a_subscriber_older_than_the_history_gets_the_difference_as_one_batch() {
    let mut st = State::new(&cfg(100, 16), Metrics::default());
    // Loaded at 20 (a restarted server): history starts at 20.
    st.reset(
        20,
        vec![
            node_put("a", "kept", 3),
            node_put("a", "changed", 12),
            node_put("a", "added", 15),
            node_put("b", "other", 18),
        ],
    );
    // What etcd held at revision 10.
    let at_10 = [
        key_at("a", "kept", 3),
        key_at("a", "changed", 5),
        key_at("a", "gone", 7),
        key_at("b", "other-gone", 8),
    ];
    assert!(st.needs_diff(10));
    let only_a = |c: &str, _: Kind| c == "a";
    let sub = st.subscribe_diff(10, &at_10, &only_a);
    let Start::Resume {
        from,
        missed,
        revision,
        ..
    } = &sub.start
    else {
        panic!("expected a resume, got {:?}", sub.start)
    };
    assert_eq!((*from, *revision), (10, 20));
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0].revision, 20);
    let mut got: Vec<String> = missed[0]
        .changes
        .iter()
        .map(|c| match c {
            IndexChange::Object(e) => format!("{}:{}", e.name(), !e.deleted),
            IndexChange::Synced { .. } => panic!("no synced in the diff"),
        })
        .collect();
    got.sort();
    assert_eq!(got, ["added:true", "changed:true", "gone:false"]);
    assert_eq!(st.subscribers(), 1);
    // Inside the history, or ahead: the ordinary paths.
    assert!(!st.needs_diff(20));
    assert!(!st.needs_diff(21));
    assert!(!st.needs_diff(0));
}

#[test]
fn matches_keys_compares_keys_and_mod_revisions() {
    let mut st = State::new(&cfg(100, 16), Metrics::default());
    st.reset(9, vec![node_put("a", "n1", 3), node_put("a", "n2", 9)]);
    assert!(st.matches_keys(&[key_at("a", "n1", 3), key_at("a", "n2", 9)]));
    assert!(!st.matches_keys(&[key_at("a", "n1", 3), key_at("a", "n2", 10)]));
    assert!(
        !st.matches_keys(&[key_at("a", "n1", 3)]),
        "a delete not applied"
    );
    assert!(!st.matches_keys(&[
        key_at("a", "n1", 3),
        key_at("a", "n2", 9),
        key_at("a", "n3", 11)
    ]));
    let synced = (Keys::default().synced("a", Kind::Node).into_bytes(), 5);
    assert!(!st.matches_keys(&[key_at("a", "n1", 3), key_at("a", "n2", 9), synced]));
}

#[tokio::test]
async fn slow_subscriber_is_cut_off_not_waited_for() {
    let mut st = State::new(&cfg(100, 2), Metrics::default());
    st.reset(1, vec![]);
    let mut slow = st.subscribe(0, &all);
    let mut fast = st.subscribe(0, &all);
    for rev in 2..=5 {
        st.apply(vec![node_put("a", &format!("n{rev}"), rev)]);
        assert_eq!(batch_of(fast.next().await).revision, rev);
    }
    assert_eq!(batch_of(slow.next().await).revision, 2);
    assert_eq!(batch_of(slow.next().await).revision, 3);
    assert!(matches!(slow.next().await, Update::Lagged));
    assert_eq!(st.subscribers(), 1);
}

#[tokio::test]
async fn corrupt_value_is_skipped_and_withdraws_the_old_value() {
    let metrics = Metrics::default();
    let mut st = State::new(&cfg(100, 16), metrics.clone());
    st.reset(2, vec![node_put("a", "n1", 2)]);
    let mut sub = st.subscribe(0, &all);
    let key = Keys::default().object("a", Kind::Node, "n1").into_bytes();
    st.apply(vec![
        RawEvent {
            key,
            value: Some(vec![0xff, 0xff, 0xff]),
            mod_revision: 3,
        },
        node_put("a", "n2", 3),
    ]);
    let b = batch_of(sub.next().await);
    let got: Vec<(String, bool)> = b
        .changes
        .iter()
        .map(|c| match c {
            IndexChange::Object(e) => (e.name(), !e.deleted),
            IndexChange::Synced { .. } => panic!("unexpected synced"),
        })
        .collect();
    assert_eq!(got, [("n1".to_string(), false), ("n2".to_string(), true)]);
    assert_eq!(
        metrics
            .decode_errors
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: "value".into()
            })
            .get(),
        1
    );
}

#[tokio::test]
async fn relist_diff_emits_deletes_for_vanished_keys() {
    let mut st = State::new(&cfg(100, 16), Metrics::default());
    st.reset(3, vec![node_put("a", "n1", 2), node_put("a", "n2", 3)]);
    let mut sub = st.subscribe(0, &all);
    // After a compaction: n1 vanished, n2 unchanged, n3 appeared, synced marker appeared.
    let synced = RawEvent {
        key: Keys::default().synced("a", Kind::Node).into_bytes(),
        value: Some(pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec()),
        mod_revision: 9,
    };
    st.reset(
        10,
        vec![node_put("a", "n2", 3), node_put("a", "n3", 8), synced],
    );
    let b = batch_of(sub.next().await);
    assert_eq!(b.revision, 10);
    let got: Vec<String> = b
        .changes
        .iter()
        .map(|c| match c {
            IndexChange::Object(e) => format!("{}:{}", e.name(), !e.deleted),
            IndexChange::Synced { cluster, kind } => format!("synced {cluster} {kind:?}"),
        })
        .collect();
    assert_eq!(got, ["n1:false", "n3:true", "synced a Node"]);
    assert_eq!(st.counts()["a"].kinds[1], (Kind::Node, 2, true));
}
