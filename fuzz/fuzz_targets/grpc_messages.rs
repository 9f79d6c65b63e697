//! Every other message of the gRPC API, both directions: the first byte picks the message.
//! Each decodes and re-encodes to itself; values carried by responses convert to domain
//! objects or fail naming the object and field (`ConvertError`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::ClusterConfig;
use mesh_proto::convert::{PeerLink, WatchedObject};
use mesh_proto::pb;
use prost::Message;

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(&*m.encode_to_vec()).expect("re-encoded message decodes");
    assert_eq!(again, m);
    Some(m)
}

fn convert_value(v: pb::event::Value) {
    if let Err(e) = WatchedObject::try_from(v) {
        assert!(!e.object.is_empty() && !e.field.is_empty(), "{e}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            roundtrip::<pb::InfoRequest>(bytes);
        }
        1 => {
            if let Some(c) = roundtrip::<pb::ClusterConfig>(bytes) {
                if let Ok(cfg) = ClusterConfig::try_from(c) {
                    let back = pb::ClusterConfig::from(&cfg);
                    assert_eq!(ClusterConfig::try_from(back).as_ref(), Ok(&cfg));
                }
            }
        }
        2 => {
            roundtrip::<pb::StatusRequest>(bytes);
        }
        3 => {
            if let Some(s) = roundtrip::<pb::StatusResponse>(bytes)
                && let Some(local) = s.local
            {
                let _ = ClusterConfig::try_from(local);
            }
        }
        4 => {
            roundtrip::<pb::ReportStatusResponse>(bytes);
        }
        5 => {
            roundtrip::<pb::PeerStatus>(bytes);
        }
        6 => {
            if let Some(ev) = roundtrip::<pb::Event>(bytes)
                && let Some(v) = ev.value
            {
                convert_value(v);
            }
        }
        7 => {
            if let Some(r) = roundtrip::<pb::WatchResponse>(bytes)
                && let Some(pb::watch_response::Payload::Events(evs)) = r.payload
            {
                for v in evs.events.into_iter().filter_map(|e| e.value) {
                    convert_value(v);
                }
            }
        }
        8 => {
            if let Some(l) = roundtrip::<pb::PeerLink>(bytes)
                && let Ok(link) = PeerLink::try_from(l)
            {
                assert_eq!(PeerLink::try_from(pb::PeerLink::from(&link)), Ok(link));
            }
        }
        _ => {
            roundtrip::<pb::AgentStatus>(bytes);
        }
    }
});
