//! etcd values of every kind: the first byte picks the key's kind, the rest is the value.
//! A value that decodes into a domain object encodes back to the same object, and the
//! agent's state (`MeshState`, shared with meshctl) accepts it under its own key and deletes
//! it again; one that does not is an error naming the kind (and the object and field when
//! it decoded as protobuf).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::ClusterName;
use mesh_proto::client::WatchUpdate;
use mesh_proto::convert::{
    ObjectError, ValueDecodeError, decode_object, decode_value, encode_object,
};
use mesh_proto::pb::Kind;
use mesh_proto::state::{Applied, MeshState};

const KINDS: [Kind; 8] = [
    Kind::Unspecified,
    Kind::Config,
    Kind::Node,
    Kind::Identity,
    Kind::Endpoint,
    Kind::Service,
    Kind::Policy,
    Kind::Link,
];

fuzz_target!(|data: &[u8]| {
    let Some((&k, bytes)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(k) % KINDS.len()];
    let value = decode_value(kind, bytes);
    match decode_object(kind, bytes) {
        Ok(object) => {
            assert_eq!(object.kind(), kind);
            let again = decode_object(kind, &encode_object(&object))
                .unwrap_or_else(|e| panic!("{object:?} re-encoded does not decode: {e}"));
            assert_eq!(again, object);
            let cluster = object
                .cluster()
                .cloned()
                .unwrap_or_else(|| ClusterName::new("east").unwrap());
            let mut state = MeshState::new(cluster.clone());
            let name = object.name();
            let upsert = WatchUpdate::Upsert {
                cluster: cluster.clone(),
                kind,
                name: name.clone(),
                revision: 1,
                value: value.expect("decoded once"),
            };
            let applied = state.apply(upsert);
            assert_eq!(
                applied,
                Applied::Changed,
                "{object:?} under {cluster}/{name}"
            );
            let delete = WatchUpdate::Delete {
                cluster,
                kind,
                name,
                revision: 2,
            };
            assert_eq!(state.apply(delete), Applied::Changed, "{object:?}");
        }
        Err(ObjectError::Decode(e)) => {
            assert!(value.is_err());
            if let ValueDecodeError::Corrupt { kind: k, .. } = &e {
                assert_eq!(*k, kind);
                assert!(e.to_string().contains(&format!("{kind:?}")), "{e}");
            }
        }
        Err(ObjectError::Convert(e)) => {
            assert!(value.is_ok());
            // "<object>: invalid <field> <value>: <reason>"
            assert!(!e.object.is_empty() && !e.field.is_empty(), "{e}");
        }
    }
});
