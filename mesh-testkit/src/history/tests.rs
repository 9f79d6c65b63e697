//! The checker itself, on hand-built histories: a correct recording passes, and each
//! property catches its own violation.

use super::*;
use mesh_proto::record::Record::{self, Delivered, Lost, Message, Opened, Started};
use prost::Message as _;

fn keys() -> Keys {
    Keys::default()
}

fn node(name: &str, ip: &str) -> pb::Node {
    pb::Node {
        cluster: "east".into(),
        name: name.into(),
        internal_ips: vec![ip.into()],
        pod_cidrs: vec![],
        ..Default::default()
    }
}

fn put(revision: i64, name: &str, ip: &str) -> Change {
    Change {
        revision,
        key: keys().object("east", Kind::Node, name),
        value: Some(node(name, ip).encode_to_vec()),
    }
}

fn del(revision: i64, name: &str) -> Change {
    Change {
        revision,
        key: keys().object("east", Kind::Node, name),
        value: None,
    }
}

/// rev 2: n1 = .1; rev 3: n2; rev 4 (one transaction): n1 = .2 and n3; rev 5: n2 deleted.
fn history() -> History {
    History::from_parts(
        1,
        [],
        [
            put(2, "n1", "10.0.0.1"),
            put(3, "n2", "10.0.0.2"),
            put(4, "n1", "10.0.0.12"),
            put(4, "n3", "10.0.0.3"),
            del(5, "n2"),
        ],
    )
}

fn ev(revision: i64, name: &str, ip: Option<&str>) -> pb::Event {
    pb::Event {
        cluster: "east".into(),
        kind: Kind::Node as i32,
        name: name.into(),
        revision,
        value: ip.map(|ip| pb::event::Value::Node(node(name, ip))),
    }
}

fn events(revision: i64, events: Vec<pb::Event>) -> Record {
    Message(pb::WatchResponse {
        revision,
        payload: Some(Payload::Events(pb::Events { events })),
    })
}

fn progress(revision: i64) -> Record {
    Message(pb::WatchResponse {
        revision,
        payload: Some(Payload::Progress(pb::Progress {})),
    })
}

fn synced(revision: i64) -> Record {
    Message(pb::WatchResponse {
        revision,
        payload: Some(Payload::Synced(pb::Synced {
            cluster: "east".into(),
            kind: Kind::Node as i32,
        })),
    })
}

fn reset() -> Record {
    Message(pb::WatchResponse {
        revision: 0,
        payload: Some(Payload::Reset(pb::Reset {
            reason: "compacted".into(),
        })),
    })
}

fn opened(resume: i64) -> Record {
    Opened(pb::WatchRequest {
        resume_revision: resume,
        ..Default::default()
    })
}

fn connected(resumed: bool, revision: i64) -> Record {
    Delivered(WatchUpdate::Connected { resumed, revision })
}

/// What the consumer is handed for an event.
fn upd(e: &pb::Event) -> Record {
    let cluster = e.cluster.parse().unwrap();
    let kind = Kind::try_from(e.kind).unwrap();
    Delivered(match &e.value {
        Some(value) => WatchUpdate::Upsert {
            cluster,
            kind,
            name: e.name.clone(),
            revision: e.revision,
            value: value.clone(),
        },
        None => WatchUpdate::Delete {
            cluster,
            kind,
            name: e.name.clone(),
            revision: e.revision,
        },
    })
}

/// A message and what the client hands over for it.
fn msg(revision: i64, evs: Vec<pb::Event>) -> Vec<Record> {
    let mut out: Vec<Record> = evs.iter().map(upd).collect();
    out.insert(0, events(revision, evs));
    out
}

/// Snapshot at 2, live 3, lost, resumed at 3, live 4 and 5, a heartbeat.
fn good() -> Vec<Record> {
    let mut r = vec![Started(0), opened(0), connected(false, 0)];
    r.extend(msg(2, vec![ev(2, "n1", Some("10.0.0.1"))]));
    r.push(synced(2));
    r.extend(msg(3, vec![ev(3, "n2", Some("10.0.0.2"))]));
    r.push(Lost("stream ended by the server".into()));
    r.extend([opened(3), connected(true, 3)]);
    r.extend(msg(
        4,
        vec![
            ev(4, "n1", Some("10.0.0.12")),
            ev(4, "n3", Some("10.0.0.3")),
        ],
    ));
    r.extend(msg(5, vec![ev(5, "n2", None)]));
    r.push(progress(5));
    r
}

fn verdict(records: &[Record]) -> Verdict {
    check("test", records, &history(), &keys(), &View::Own)
}

#[track_caller]
fn assert_breaks(records: &[Record], property: Property) {
    let v = verdict(records);
    assert!(
        v.broken().contains(&property),
        "{property} not reported:\n{v}"
    );
}

/// Replaces the first record equal to `old` by `new` (any number of records).
fn replace(mut records: Vec<Record>, old: &Record, new: Vec<Record>) -> Vec<Record> {
    let i = records
        .iter()
        .position(|r| r == old)
        .unwrap_or_else(|| panic!("{old:?} not in the recording"));
    records.splice(i..=i, new);
    records
}

#[test]
fn a_correct_recording_passes() {
    let v = verdict(&good());
    v.assert_ok();
    assert_eq!((v.sessions, v.resumes, v.snapshots), (2, 1, 1));
    assert_eq!(v.live_events, 4);
}

#[test]
fn a_reset_then_a_snapshot_with_the_sweep_passes() {
    let mut r = good();
    r.truncate(r.iter().position(|x| *x == opened(3)).unwrap());
    r.extend([opened(3), connected(true, 3), reset()]);
    r.push(Delivered(WatchUpdate::Reset {
        reason: "compacted".into(),
    }));
    let snap = [
        ev(4, "n1", Some("10.0.0.12")),
        ev(4, "n3", Some("10.0.0.3")),
    ];
    r.push(events(0, vec![snap[0].clone()]));
    r.push(upd(&snap[0]));
    r.push(events(5, vec![snap[1].clone()]));
    r.push(upd(&snap[1]));
    r.push(synced(5));
    // The client's sweep: n2 was not in the snapshot.
    r.push(upd(&ev(5, "n2", None)));
    r.push(progress(5));
    verdict(&r).assert_ok();
}

#[test]
fn ordered_catches_a_revision_going_back() {
    let r = replace(good(), &progress(5), vec![progress(5), progress(4)]);
    assert_breaks(&r, Property::Ordered);
    let r = replace(
        good(),
        &events(5, vec![ev(5, "n2", None)]),
        vec![events(5, vec![ev(6, "n2", None)])],
    );
    assert_breaks(&r, Property::Ordered);
}

#[test]
fn unique_catches_an_event_delivered_twice() {
    let twice = ev(4, "n3", Some("10.0.0.3"));
    let r = replace(
        good(),
        &events(5, vec![ev(5, "n2", None)]),
        vec![events(5, vec![twice, ev(5, "n2", None)])],
    );
    assert_breaks(&r, Property::Unique);
}

#[test]
fn atomic_catches_a_revision_split_across_messages() {
    let r = replace(
        good(),
        &events(
            4,
            vec![
                ev(4, "n1", Some("10.0.0.12")),
                ev(4, "n3", Some("10.0.0.3")),
            ],
        ),
        vec![
            events(4, vec![ev(4, "n1", Some("10.0.0.12"))]),
            events(5, vec![ev(4, "n3", Some("10.0.0.3"))]),
        ],
    );
    assert_breaks(&r, Property::Atomic);
}

#[test]
fn complete_catches_a_missed_delete_and_an_old_value() {
    let missed = replace(
        good(),
        &events(5, vec![ev(5, "n2", None)]),
        vec![events(5, vec![])],
    );
    let v = verdict(&missed);
    assert!(v.broken().contains(&Property::Complete), "{v}");
    assert!(!v.broken().contains(&Property::Atomic), "{v}");
    let old = replace(
        good(),
        &events(
            4,
            vec![
                ev(4, "n1", Some("10.0.0.12")),
                ev(4, "n3", Some("10.0.0.3")),
            ],
        ),
        vec![events(
            4,
            vec![ev(4, "n1", Some("10.0.0.1")), ev(4, "n3", Some("10.0.0.3"))],
        )],
    );
    assert_breaks(&old, Property::Complete);
    // A snapshot that lacks an object.
    let mut r = good();
    r.truncate(r.iter().position(|x| *x == opened(3)).unwrap());
    r.extend([opened(3), connected(true, 3), reset()]);
    r.push(events(5, vec![ev(4, "n1", Some("10.0.0.12"))]));
    assert_breaks(&r, Property::Complete);
}

#[test]
fn resume_catches_a_replay_a_gap_and_a_wrong_resume_point() {
    // Events at or before the resume revision.
    let r = replace(
        good(),
        &events(
            4,
            vec![
                ev(4, "n1", Some("10.0.0.12")),
                ev(4, "n3", Some("10.0.0.3")),
            ],
        ),
        vec![events(
            4,
            vec![
                ev(3, "n2", Some("10.0.0.2")),
                ev(4, "n1", Some("10.0.0.12")),
                ev(4, "n3", Some("10.0.0.3")),
            ],
        )],
    );
    assert_breaks(&r, Property::Resume);
    // The client resumes at 2 though it was handed revision 3's n2.
    let r = replace(good(), &opened(3), vec![opened(2)]);
    let r = replace(r, &connected(true, 3), vec![connected(true, 2)]);
    assert_breaks(&r, Property::Resume);
    // The first message after the resume lacks what changed at 4 and 5 (a server
    // resuming from the wrong point): a gap.
    let r = replace(
        good(),
        &events(
            4,
            vec![
                ev(4, "n1", Some("10.0.0.12")),
                ev(4, "n3", Some("10.0.0.3")),
            ],
        ),
        vec![events(5, vec![ev(5, "n2", None)])],
    );
    let r = replace(r, &events(5, vec![ev(5, "n2", None)]), vec![]);
    assert_breaks(&r, Property::Resume);
}

#[test]
fn converged_catches_a_stale_entry_and_a_missed_delete_in_the_consumer() {
    // The client did not hand over the delete it received: a stale entry.
    let r = replace(good(), &upd(&ev(5, "n2", None)), vec![]);
    let v = verdict(&r);
    assert_eq!(v.broken(), BTreeSet::from([Property::Converged]), "{v}");
    // After a reset, the sweep of n2 is missing.
    let mut r = good();
    r.truncate(r.iter().position(|x| *x == opened(3)).unwrap());
    r.extend([opened(3), connected(true, 3), reset()]);
    let snap = [
        ev(4, "n1", Some("10.0.0.12")),
        ev(4, "n3", Some("10.0.0.3")),
    ];
    r.push(events(5, snap.to_vec()));
    r.extend(snap.iter().map(upd));
    r.push(synced(5));
    r.push(progress(5));
    let v = verdict(&r);
    assert_eq!(v.broken(), BTreeSet::from([Property::Converged]), "{v}");
}

#[test]
fn a_peer_view_leaves_out_other_clusters_and_non_shared_services() {
    let svc = |shared| pb::GlobalService {
        cluster: "east".into(),
        namespace: "default".into(),
        name: "web".into(),
        shared,
        ..Default::default()
    };
    let k = keys();
    let h = History::from_parts(
        1,
        [],
        [
            put(2, "n1", "10.0.0.1"),
            Change {
                revision: 3,
                key: k.object("east", Kind::Service, "default/web"),
                value: Some(svc(false).encode_to_vec()),
            },
            Change {
                revision: 4,
                key: k.object("west", Kind::Node, "w1"),
                value: Some(node("w1", "10.0.1.1").encode_to_vec()),
            },
        ],
    );
    let peer = View::Peer {
        cluster: "east".into(),
    };
    let at = h.view_at(&k, &peer, 4).unwrap();
    assert_eq!(at.keys().map(show).collect::<Vec<_>>(), ["east/Node/n1"]);
    assert_eq!(h.view_at(&k, &View::Own, 4).unwrap().len(), 3);
}

#[test]
fn a_history_read_after_a_compaction_extends_an_earlier_one() {
    let mut early =
        History::from_parts(1, [], [put(2, "n1", "10.0.0.1"), put(3, "n2", "10.0.0.2")]);
    let later = History::from_parts(
        3,
        [
            (
                keys().object("east", Kind::Node, "n1"),
                node("n1", "10.0.0.1").encode_to_vec(),
            ),
            (
                keys().object("east", Kind::Node, "n2"),
                node("n2", "10.0.0.2").encode_to_vec(),
            ),
        ],
        [del(4, "n1")],
    );
    early.extend(later);
    assert_eq!(early.current(), 4);
    assert_eq!(early.base(), 1);
    assert_eq!(early.view_at(&keys(), &View::Own, 2).unwrap().len(), 1);
    let at4 = early.view_at(&keys(), &View::Own, 4).unwrap();
    assert_eq!(at4.keys().map(show).collect::<Vec<_>>(), ["east/Node/n2"]);
}
