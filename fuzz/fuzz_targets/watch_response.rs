//! Client side of the gRPC API: a sequence of `WatchResponse`s (frames, see
//! `mesh_fuzz::frames`; an empty frame is a reconnection) driven through the watch
//! client's own protocol state (`mesh_proto::client::StreamState`, which the running
//! client's worker uses). After every message, what a consumer applying every update holds
//! equals the client's own account of what it delivered (so a `Reset` and its snapshot
//! never leave a stale key nor lose a delete), the resume revision never goes back, and
//! every upsert carries a value of its kind.
#![no_main]
use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use mesh_proto::client::{ResumePoint, StreamState, WatchUpdate};
use mesh_proto::convert::value_kind;
use mesh_proto::pb;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let mut state = StreamState::new(ResumePoint::default());
    let mut held = BTreeSet::new();
    let mut revision = state.revision();
    let apply = |updates: Vec<WatchUpdate>, held: &mut BTreeSet<_>| {
        for u in updates {
            match u {
                WatchUpdate::Upsert {
                    cluster,
                    kind,
                    name,
                    value,
                    ..
                } => {
                    assert_eq!(value_kind(&value), kind);
                    held.insert((cluster, kind, name));
                }
                WatchUpdate::Delete {
                    cluster,
                    kind,
                    name,
                    ..
                } => {
                    held.remove(&(cluster, kind, name));
                }
                WatchUpdate::Connected { .. }
                | WatchUpdate::Reset { .. }
                | WatchUpdate::Synced { .. } => {}
                WatchUpdate::Disconnected { .. } => panic!("the state never disconnects"),
            }
        }
    };
    apply(state.open(), &mut held);
    for frame in mesh_fuzz::frames(data) {
        let updates = if frame.is_empty() {
            state.open()
        } else {
            let Ok(response) = pb::WatchResponse::decode(frame) else {
                continue;
            };
            state.apply(response)
        };
        apply(updates, &mut held);
        assert_eq!(held, state.delivered());
        assert!(
            state.revision() >= revision,
            "the resume revision went back"
        );
        revision = state.revision();
    }
});
