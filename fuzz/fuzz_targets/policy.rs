//! The policy resources (`mesh_core::policy`): NetworkPolicy, CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy as JSON (or YAML, as users write them). A policy either
//! parses or is refused with an error naming the object; a parsed policy survives the wire
//! (`pb::Policy` and back), compiles against a small two-cluster world, and the datapath's
//! tables decide every flow as `decide` does.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_core::policy::{
    Direction, IdentityTable, PolicyError, PolicySet, compile, decide, decide_tables, parse_policy,
    policy_tables,
};
use mesh_core::{ClusterId, ClusterName, IdentityId, IdentityLabels, Protocol};
use mesh_proto::convert::PolicyObject;
use mesh_proto::pb;

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn world() -> &'static (IdentityTable, Vec<IdentityId>) {
    static WORLD: OnceLock<(IdentityTable, Vec<IdentityId>)> = OnceLock::new();
    WORLD.get_or_init(|| {
        let mut table = IdentityTable::new();
        let mut ids = vec![IdentityId(1), IdentityId(2), IdentityId(6)];
        let pods: [(&str, u32, &str, &[(&str, &str)]); 5] = [
            ("east", 1, "default", &[("app", "web")]),
            ("east", 1, "default", &[("app", "client")]),
            ("east", 1, "kube-system", &[("k8s-app", "kube-dns")]),
            ("west", 2, "default", &[("app", "web")]),
            ("west", 2, "other", &[("app", "db"), ("tier", "data")]),
        ];
        for (i, (cluster, cid, ns, labels)) in pods.into_iter().enumerate() {
            let c = ClusterName::new(cluster).unwrap();
            let id = IdentityId::new(ClusterId::new(cid).unwrap(), 256 + i as u32).unwrap();
            table.insert(id, IdentityLabels::for_pod(&c, ns, labels.iter().copied()));
            ids.push(id);
        }
        (table, ids)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = mesh_lab::kube_api::patch::parse_body(data) else {
        return;
    };
    let policy = match parse_policy(&value, &east()) {
        Ok(p) => p,
        Err(e) => {
            match &e {
                PolicyError::NotAnObject => assert!(!value.is_object()),
                PolicyError::UnsupportedKind { object, .. }
                | PolicyError::Invalid { object, .. } => {
                    assert!(!object.is_empty());
                    assert!(e.to_string().starts_with(object.as_str()), "{e}");
                }
            }
            return;
        }
    };
    // The wire: the publisher sends the object as JSON, readers re-parse it.
    let object = PolicyObject {
        object: value.to_string(),
        policy: policy.clone(),
    };
    let wire = pb::Policy::from(&object);
    let back = PolicyObject::try_from(wire).unwrap_or_else(|e| panic!("{}: {e}", object.object));
    assert_eq!(back.policy, policy);

    let (table, ids) = world();
    let set: PolicySet = [policy].into_iter().collect();
    let compiled = compile(&set, table, &east());
    let tables = policy_tables(&compiled);
    for &local in &ids[3..] {
        for &remote in ids {
            for direction in [Direction::Ingress, Direction::Egress] {
                for (protocol, port) in [
                    (Protocol::Tcp, 80),
                    (Protocol::Udp, 53),
                    (Protocol::Tcp, 8080),
                ] {
                    let want = decide(&compiled, local, direction, remote, protocol, port);
                    let (verdict, _) =
                        decide_tables(&tables, local, direction, remote, protocol, port);
                    assert_eq!(
                        verdict, want.verdict,
                        "{local:?} {direction:?} {remote:?} {port}"
                    );
                }
            }
        }
    }
});
