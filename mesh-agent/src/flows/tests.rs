use std::net::Ipv4Addr;
use std::time::{Duration, UNIX_EPOCH};

use mesh_core::ClusterName;
use mesh_core::policy::{Direction, PolicyKind, PolicyRef, RuleRef, SpecSource, Verdict as RV};
use mesh_maps::layout::{self, FlowEvent};
use mesh_proto::flows::{FlowFilters, event_type};
use mesh_proto::hubble::flow::{DropReason, FlowFilter, TrafficDirection, Verdict, layer4};

use super::decorate::{AddressInfo, FlowContext, decorate, wall_time};
use super::*;

fn cluster(s: &str) -> ClusterName {
    s.parse().unwrap()
}

const WEST_XWING: u32 = (1 << 16) | 300;
const EAST_REBEL: u32 = (2 << 16) | 400;
const RULE: u32 = 77;

fn ctx() -> FlowContext {
    let mut c = FlowContext::new(cluster("west"), "west-node1".into());
    c.clusters.insert(1, cluster("west"));
    c.clusters.insert(2, cluster("east"));
    c.insert_identity(
        &cluster("west"),
        WEST_XWING,
        vec![
            "k8s:app=x-wing".to_string(),
            "k8s:io.cilium.k8s.policy.cluster=west".into(),
            "k8s:io.kubernetes.pod.namespace=default".into(),
        ]
        .into(),
    );
    c.insert_identity(
        &cluster("east"),
        EAST_REBEL,
        vec![
            "k8s:app=rebel-base".to_string(),
            "k8s:io.cilium.k8s.policy.cluster=east".into(),
            "k8s:io.kubernetes.pod.namespace=default".into(),
        ]
        .into(),
    );
    c.insert_pod(
        Ipv4Addr::new(10, 1, 0, 5),
        AddressInfo {
            cluster: cluster("west"),
            namespace: "default".into(),
            pod: "x-wing-1".into(),
            node: "west-node1".into(),
        },
    );
    c.insert_pod(
        Ipv4Addr::new(10, 2, 0, 7),
        AddressInfo {
            cluster: cluster("east"),
            namespace: "default".into(),
            pod: "rebel-base-2".into(),
            node: "east-node1".into(),
        },
    );
    c.services.insert(
        (Ipv4Addr::new(10, 96, 0, 10), 80, 6),
        ("default".into(), "rebel-base".into()),
    );
    c.rules.insert(
        RULE,
        RuleRef {
            policy: PolicyRef {
                kind: PolicyKind::CiliumNetworkPolicy,
                cluster: cluster("west"),
                namespace: Some("default".into()),
                name: "x-wing-to-west".into(),
            },
            spec: SpecSource::Spec,
            direction: Direction::Egress,
            section: RV::Allow,
            index: 0,
        },
    );
    c
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// x-wing's connect() to the rebel-base service, translated to east's pod.
fn translated() -> FlowEvent {
    FlowEvent {
        time_ns: 5,
        cookie: 42,
        src_ip: be(Ipv4Addr::new(10, 1, 0, 5)),
        dst_ip: be(Ipv4Addr::new(10, 2, 0, 7)),
        orig_ip: be(Ipv4Addr::new(10, 96, 0, 10)),
        src_identity: WEST_XWING,
        dst_identity: EAST_REBEL,
        rule: RULE,
        dst_port: 8080u16.to_be(),
        orig_port: 80u16.to_be(),
        backend_cluster: 2,
        direction: layout::DIRECTION_EGRESS,
        proto: 6,
        verdict: layout::EVENT_FORWARDED,
        reason: layout::DROP_NONE,
        flags: layout::EVENT_F_TRANSLATED | layout::EVENT_F_POLICY,
        ..Default::default()
    }
}

#[test]
fn a_translated_connection_names_both_clusters_the_service_and_the_rule() {
    let t = UNIX_EPOCH + Duration::from_secs(1_000);
    let f = decorate(&translated(), &ctx(), t, "u".into());
    assert_eq!(f.verdict, Verdict::Forwarded as i32);
    assert_eq!(f.node_name, "west/west-node1");
    assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);
    let (src, dst) = (f.source.as_ref().unwrap(), f.destination.as_ref().unwrap());
    assert_eq!(
        (src.cluster_name.as_str(), src.pod_name.as_str()),
        ("west", "x-wing-1")
    );
    assert_eq!(
        (dst.cluster_name.as_str(), dst.pod_name.as_str()),
        ("east", "rebel-base-2")
    );
    assert!(dst.labels.contains(&"k8s:app=rebel-base".to_string()));
    assert_eq!(src.identity, WEST_XWING);
    let svc = f.destination_service.as_ref().unwrap();
    assert_eq!(
        (svc.namespace.as_str(), svc.name.as_str()),
        ("default", "rebel-base")
    );
    let ip = f.ip.as_ref().unwrap();
    assert_eq!(
        (ip.source.as_str(), ip.destination.as_str()),
        ("10.1.0.5", "10.2.0.7")
    );
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(tcp)) => {
            assert_eq!(tcp.destination_port, 8080);
            assert!(tcp.flags.unwrap().syn);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.event_type.unwrap().r#type, event_type::POLICY_VERDICT);
    assert_eq!(f.egress_allowed_by.len(), 1);
    assert_eq!(f.egress_allowed_by[0].name, "x-wing-to-west");
    assert_eq!(f.egress_allowed_by[0].kind, "CiliumNetworkPolicy");
    assert!(f.egress_denied_by.is_empty());
    assert_eq!(f.is_reply, Some(false));
    assert_eq!(f.time.unwrap().seconds, 1_000);
    assert!(
        f.summary.contains("rebel-base") && f.summary.contains("east"),
        "{}",
        f.summary
    );
    // The filters select it the way `meshctl observe --to-cluster east` asks.
    let to_east = FlowFilter {
        destination_label: vec!["io.cilium.k8s.policy.cluster=east".into()],
        destination_service: vec!["default/rebel-base".into()],
        ..Default::default()
    };
    assert!(FlowFilters::new(&[to_east], &[]).unwrap().matches(&f));
}

#[test]
fn drops_carry_hubble_reasons_and_the_denying_rule() {
    let c = ctx();
    let t = UNIX_EPOCH;
    let mut ev = translated();
    ev.verdict = layout::EVENT_DROPPED;
    ev.reason = layout::DROP_POLICY_DEFAULT;
    ev.rule = 0;
    ev.flags = layout::EVENT_F_POLICY;
    ev.dst_ip = ev.orig_ip;
    ev.dst_port = ev.orig_port;
    let f = decorate(&ev, &c, t, "u".into());
    assert_eq!(f.verdict, Verdict::Dropped as i32);
    assert_eq!(f.drop_reason_desc, DropReason::PolicyDenied as i32);
    assert_eq!(f.event_type.unwrap().r#type, event_type::DROP);
    assert_eq!(
        f.event_type.unwrap().sub_type,
        DropReason::PolicyDenied as i32
    );
    // Refused before translation: the frontend names the service.
    assert_eq!(f.destination_service.as_ref().unwrap().name, "rebel-base");
    assert!(f.summary.contains("default deny"), "{}", f.summary);

    ev.reason = layout::DROP_POLICY_RULE;
    ev.rule = RULE;
    let f = decorate(&ev, &c, t, "u".into());
    assert_eq!(f.drop_reason_desc, DropReason::PolicyDeny as i32);
    assert_eq!(f.egress_denied_by[0].name, "x-wing-to-west");

    ev.reason = layout::DROP_NO_BACKEND;
    ev.rule = 0;
    ev.flags = 0;
    let f = decorate(&ev, &c, t, "u".into());
    assert_eq!(
        f.drop_reason_desc,
        DropReason::ServiceBackendNotFound as i32
    );
}

#[test]
fn ingress_records_and_unknown_addresses() {
    let c = ctx();
    let ev = FlowEvent {
        src_ip: be(Ipv4Addr::new(192, 0, 2, 1)),
        src_port: 40000u16.to_be(),
        dst_ip: be(Ipv4Addr::new(10, 1, 0, 5)),
        dst_port: 80u16.to_be(),
        src_identity: layout::IDENTITY_WORLD,
        dst_identity: WEST_XWING,
        direction: layout::DIRECTION_INGRESS,
        proto: 17,
        verdict: layout::EVENT_FORWARDED,
        ..Default::default()
    };
    let f = decorate(&ev, &c, UNIX_EPOCH, "u".into());
    assert_eq!(f.traffic_direction, TrafficDirection::Ingress as i32);
    assert_eq!(f.source.as_ref().unwrap().labels, vec!["reserved:world"]);
    assert_eq!(f.destination.as_ref().unwrap().pod_name, "x-wing-1");
    assert_eq!(f.event_type.unwrap().r#type, event_type::TRACE);
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Udp(u)) => {
            assert_eq!((u.source_port, u.destination_port), (40000, 80))
        }
        other => panic!("{other:?}"),
    }
    // A host process (identity 0 from the datapath) is the host.
    let mut host = translated();
    host.src_identity = 0;
    host.src_ip = 0;
    let f = decorate(&host, &c, UNIX_EPOCH, "u".into());
    assert_eq!(f.source.as_ref().unwrap().identity, layout::IDENTITY_HOST);
    assert_eq!(f.source.as_ref().unwrap().labels, vec!["reserved:host"]);
}

#[test]
fn boot_time_maps_to_wall_time() {
    let now = UNIX_EPOCH + Duration::from_secs(100);
    assert_eq!(
        wall_time(7_000_000_000, 10_000_000_000, now),
        UNIX_EPOCH + Duration::from_secs(97)
    );
    assert_eq!(
        wall_time(11_000_000_000, 10_000_000_000, now),
        UNIX_EPOCH + Duration::from_secs(101)
    );
}

#[test]
fn metrics_bound_namespace_labels() {
    let mut reg = prometheus_client::registry::Registry::default();
    let m = FlowMetrics::register(&mut reg);
    let mut f = decorate(&translated(), &ctx(), UNIX_EPOCH, "u".into());
    for i in 0..(NAMESPACE_LABEL_VALUES + 10) {
        f.source.as_mut().unwrap().namespace = format!("ns-{i}");
        m.observe(&f);
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
    let series = out
        .lines()
        .filter(|l| l.starts_with("mesh_agent_flows_total{"))
        .count();
    // "default" (the destination) takes one of the budget's values, the first 63 sources
    // the rest; every later source is "other".
    assert_eq!(series, NAMESPACE_LABEL_VALUES - 1 + 1, "{out}");
    assert!(out.contains("source_namespace=\"other\""));
    assert!(out.contains("destination_cluster=\"east\""));
}

#[test]
fn uuids_are_version_4_and_distinct() {
    let (a, b) = (new_uuid(), new_uuid());
    assert_ne!(a, b);
    assert_eq!(a.len(), 36);
    assert_eq!(&a[14..15], "4");
}
