//! Property tests: every valid domain object survives core -> pb -> etcd bytes -> pb -> core.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::model::Identity;
use mesh_core::{
    Affinity, Backend, BackendConditions, ClusterConfig, ClusterId, ClusterName, Endpoint,
    GlobalService, IdentityId, IdentityLabels, Node, Protocol, ServicePort, TrafficPolicy,
};
use mesh_proto::convert::{
    WatchedObject, decode_object, decode_value, encode_object, encode_value,
};
use mesh_proto::pb;
use proptest::prelude::*;

fn cluster() -> impl Strategy<Value = ClusterName> {
    "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"
        .prop_filter("default is reserved", |s| s != "default")
        .prop_map(|s| ClusterName::new(s).unwrap())
}

fn ip() -> impl Strategy<Value = IpAddr> {
    any::<IpAddr>()
}

fn net() -> impl Strategy<Value = IpNet> {
    (ip(), any::<u8>()).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        IpNet::new(ip, len % (max + 1)).unwrap().trunc()
    })
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][-a-z0-9.]{0,15}"
}

fn port() -> impl Strategy<Value = ServicePort> {
    (
        "[a-z0-9-]{0,8}",
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ],
        1u16..,
    )
        .prop_map(|(name, protocol, port)| ServicePort {
            name,
            protocol,
            port,
        })
}

fn backend() -> impl Strategy<Value = Backend> {
    (
        ip(),
        proptest::collection::vec(port(), 0..3),
        name(),
        "[a-z0-9-]{0,8}",
        any::<(bool, bool, bool)>(),
    )
        .prop_map(
            |(ip, ports, node, zone, (ready, serving, terminating))| Backend {
                ip,
                ports,
                node,
                zone,
                conditions: BackendConditions {
                    ready,
                    serving,
                    terminating,
                },
            },
        )
}

fn object() -> impl Strategy<Value = WatchedObject> {
    let config = (
        cluster(),
        1u32..=255,
        proptest::collection::vec(net(), 0..3),
        proptest::option::of(net()),
        proptest::collection::vec("[a-z]{1,8}", 0..3),
        "[0-9a-z.]{0,8}",
    )
        .prop_map(
            |(name, id, pod_cidrs, service_cidr, capabilities, version)| {
                WatchedObject::Config(ClusterConfig {
                    name,
                    id: ClusterId::new(id).unwrap(),
                    pod_cidrs,
                    service_cidr,
                    capabilities,
                    version,
                })
            },
        );
    let node = (
        cluster(),
        name(),
        proptest::collection::vec(ip(), 0..3),
        proptest::collection::vec(net(), 0..3),
        proptest::option::of(1u64..=4_000_000_000_000),
    )
        .prop_map(|(cluster, name, internal_ips, pod_cidrs, stale_ms)| {
            WatchedObject::Node(Node {
                cluster,
                name,
                internal_ips,
                pod_cidrs,
                // Whole milliseconds: the wire's resolution.
                stale_since: stale_ms
                    .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
            })
        });
    let identity = (
        1u32..,
        proptest::collection::vec("k8s:[a-z.]{1,8}=[a-z0-9]{0,6}", 0..4),
    )
        .prop_map(|(id, labels)| {
            WatchedObject::Identity(Identity {
                id: IdentityId(id),
                labels: IdentityLabels::from_strings(labels).unwrap(),
            })
        });
    let endpoint = (
        ip(),
        1u32..,
        proptest::option::of(ip()),
        name(),
        name(),
        name(),
        proptest::collection::vec(port(), 0..3),
    )
        .prop_map(|(ip, id, host_ip, node, namespace, pod, named_ports)| {
            WatchedObject::Endpoint(Endpoint {
                ip,
                identity: IdentityId(id),
                host_ip,
                node,
                namespace,
                pod,
                named_ports,
            })
        });
    let service = (
        cluster(),
        name(),
        name(),
        (any::<bool>(), any::<bool>()),
        prop_oneof![
            Just(Affinity::None),
            Just(Affinity::Local),
            Just(Affinity::Remote)
        ],
        prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)],
        proptest::collection::vec(port(), 0..3),
        proptest::collection::vec(ip(), 0..2),
        proptest::collection::vec(backend(), 0..4),
    )
        .prop_map(
            |(
                cluster,
                namespace,
                name,
                (global, shared),
                affinity,
                internal_traffic_policy,
                ports,
                frontends,
                backends,
            )| {
                WatchedObject::Service(GlobalService {
                    cluster,
                    namespace,
                    name,
                    global,
                    shared,
                    affinity,
                    internal_traffic_policy,
                    ports,
                    frontends,
                    backends,
                })
            },
        );
    prop_oneof![config, node, identity, endpoint, service]
}

proptest! {
    #[test]
    fn objects_roundtrip_through_etcd_bytes(obj in object()) {
        let bytes = encode_object(&obj);
        let back = decode_object(obj.kind(), &bytes).unwrap();
        prop_assert_eq!(&back, &obj);

        let value = pb::event::Value::from(&obj);
        let again = decode_value(obj.kind(), &encode_value(&value)).unwrap();
        prop_assert_eq!(again, value);
    }

    /// Arbitrary bytes never panic the decoder: either a value or an error.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), kind in 0i32..6) {
        let kind = pb::Kind::try_from(kind).unwrap();
        if let Ok(v) = decode_value(kind, &bytes) {
            let _ = WatchedObject::try_from(v);
        }
    }
}
