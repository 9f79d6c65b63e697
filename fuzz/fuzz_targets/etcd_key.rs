//! etcd key parsing (`mesh_proto::keys`): every key a reader parses formats back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_proto::keys::{ClusterKey, Keys, parse_policy_name, policy_name};

fuzz_target!(|data: &[u8]| {
    let Ok(key) = std::str::from_utf8(data) else {
        return;
    };
    for keys in [Keys::default(), Keys::new("")] {
        match keys.parse(key) {
            Some(ClusterKey::Object {
                cluster,
                kind,
                name,
            }) => assert_eq!(keys.object(&cluster, kind, &name), key),
            Some(ClusterKey::Synced { cluster, kind }) => {
                assert_eq!(keys.synced(&cluster, kind), key)
            }
            None => {}
        }
    }
    if let Some((kind, namespace, name)) = parse_policy_name(key) {
        assert_eq!(policy_name(kind, namespace, name), key);
    }
});
