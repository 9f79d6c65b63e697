use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use mesh_proto::hubble::flow::{
    CiliumEventType, DropReason, Endpoint, Flow, FlowFilter, Ip, Layer4, Policy, Service, Tcp,
    TrafficDirection, Verdict, layer4,
};
use mesh_proto::hubble::observer::GetFlowsResponse;
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ObserveArgs,
}

fn args(flags: &[&str]) -> ObserveArgs {
    let mut argv = vec!["observe"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("flags parse").args
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

#[test]
fn defaults_follow_hubble() {
    let r = args(&[]).request(now()).unwrap();
    assert_eq!((r.number, r.first, r.follow), (20, false, false));
    assert!(r.whitelist.is_empty());
    let r = args(&["-f"]).request(now()).unwrap();
    assert_eq!((r.number, r.follow), (0, true));
    let r = args(&["--last", "5", "-f"]).request(now()).unwrap();
    assert_eq!((r.number, r.follow), (5, true));
    let r = args(&["--first", "3"]).request(now()).unwrap();
    assert_eq!((r.number, r.first), (3, true));
    let r = args(&["--since", "5m"]).request(now()).unwrap();
    assert_eq!(r.number, 0);
    assert_eq!(r.since.unwrap().seconds, 1_800_000_000 - 300);
    let r = args(&[
        "--since",
        "2026-12-05T07:00:00Z",
        "--until",
        "2026-12-05T08:00:00.5+01:00",
    ])
    .request(now())
    .unwrap();
    assert_eq!(r.since.unwrap().seconds, 1_796_454_000);
    assert_eq!(
        (r.until.unwrap().seconds, r.until.unwrap().nanos),
        (1_796_454_000, 500_000_000)
    );
    assert!(args(&["--since", "yesterday"]).request(now()).is_err());
}

#[test]
fn from_and_to_flags_fill_one_filter() {
    let r = args(&[
        "--from-pod",
        "x-wing",
        "--to-pod",
        "other/rebel-base",
        "--from-cluster",
        "east",
        "--to-cluster",
        "west",
        "--to-namespace",
        "default",
        "--from-label",
        "app=x-wing",
        "--verdict",
        "dropped",
        "--type",
        "policy-verdict",
        "--traffic-direction",
        "ingress",
        "--to-port",
        "80",
        "--protocol",
        "tcp",
        "--to-service",
        "default/rebel-base",
        "--node-name",
        "west/",
    ])
    .request(now())
    .unwrap();
    assert_eq!(r.whitelist.len(), 1);
    let f = &r.whitelist[0];
    assert_eq!(f.source_pod, ["default/x-wing"]);
    assert_eq!(f.destination_pod, ["other/rebel-base", "default/"]);
    assert_eq!(
        f.source_label,
        ["app=x-wing", "io.cilium.k8s.policy.cluster=east"]
    );
    assert_eq!(f.destination_label, ["io.cilium.k8s.policy.cluster=west"]);
    assert_eq!(f.verdict, [Verdict::Dropped as i32]);
    assert_eq!(f.event_type[0].r#type, 5);
    assert_eq!(f.traffic_direction, [TrafficDirection::Ingress as i32]);
    assert_eq!(f.destination_port, ["80"]);
    assert_eq!(f.protocol, ["tcp"]);
    assert_eq!(f.destination_service, ["default/rebel-base"]);
    assert_eq!(f.node_name, ["west/"]);
}

#[test]
fn either_side_flags_make_two_filters() {
    let r = args(&["--pod", "x-wing", "--verdict", "FORWARDED", "--port", "80"])
        .request(now())
        .unwrap();
    let want_src = FlowFilter {
        source_pod: vec!["default/x-wing".into()],
        source_port: vec!["80".into()],
        verdict: vec![Verdict::Forwarded as i32],
        ..Default::default()
    };
    let want_dst = FlowFilter {
        destination_pod: vec!["default/x-wing".into()],
        destination_port: vec!["80".into()],
        verdict: vec![Verdict::Forwarded as i32],
        ..Default::default()
    };
    assert_eq!(r.whitelist, [want_src, want_dst]);
}

#[test]
fn bad_flag_values_are_named() {
    for (flags, what) in [
        (&["--verdict", "maybe"][..], "--verdict"),
        (&["--type", "l9"][..], "--type"),
        (&["--traffic-direction", "up"][..], "--traffic-direction"),
        (&["--from-ip", "10.0.0.300"][..], "source_ip"),
        (&["--to-port", "http"][..], "destination_port"),
    ] {
        let e = args(flags).request(now()).unwrap_err();
        assert!(format!("{e:#}").contains(what), "{flags:?}: {e:#}");
    }
}

#[test]
fn timestamps_round_trip() {
    for (secs, nanos, text) in [
        (0, 0, "1970-01-01T00:00:00Z"),
        (1_796_454_000, 0, "2026-12-05T07:00:00Z"),
        (1_796_454_000, 123_000_000, "2026-12-05T07:00:00.123Z"),
        (951_782_400, 1, "2000-02-29T00:00:00.000000001Z"),
    ] {
        let t = prost_types::Timestamp {
            seconds: secs,
            nanos,
        };
        assert_eq!(json::timestamp(&t), text);
        let back = json::parse_rfc3339(text).unwrap();
        assert_eq!(
            back.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(secs as u64, nanos as u32)
        );
    }
    assert_eq!(
        json::table_time(Some(&prost_types::Timestamp {
            seconds: 1_796_454_000,
            nanos: 7_000_000
        })),
        "Dec  5 07:00:00.007"
    );
}

fn sample() -> Flow {
    Flow {
        time: Some(prost_types::Timestamp {
            seconds: 1_796_454_000,
            nanos: 0,
        }),
        uuid: "u1".into(),
        verdict: Verdict::Dropped as i32,
        drop_reason: 181,
        drop_reason_desc: DropReason::PolicyDeny as i32,
        ip: Some(Ip {
            source: "10.1.1.5".into(),
            destination: "10.2.1.7".into(),
            ip_version: 1,
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 40000,
                destination_port: 80,
                flags: None,
            })),
        }),
        source: Some(Endpoint {
            identity: 65792,
            cluster_name: "east".into(),
            namespace: "default".into(),
            pod_name: "x-wing".into(),
            labels: vec!["k8s:app=x-wing".into()],
            ..Default::default()
        }),
        destination: Some(Endpoint {
            cluster_name: "west".into(),
            namespace: "default".into(),
            pod_name: "rebel-base-1".into(),
            ..Default::default()
        }),
        r#type: 1,
        node_name: "east/east-node1".into(),
        event_type: Some(CiliumEventType {
            r#type: 1,
            sub_type: 0,
        }),
        destination_service: Some(Service {
            name: "rebel-base".into(),
            namespace: "default".into(),
        }),
        traffic_direction: TrafficDirection::Egress as i32,
        is_reply: Some(false),
        socket_cookie: 12,
        ingress_denied_by: vec![Policy {
            name: "deny-east".into(),
            namespace: "default".into(),
            kind: "CiliumNetworkPolicy".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn json_is_protobufs_mapping_with_proto_names() {
    let r = GetFlowsResponse {
        node_name: "east/east-node1".into(),
        time: sample().time,
        response_types: Some(ResponseTypes::Flow(sample())),
    };
    let v = json::response(&r);
    assert_eq!(
        v,
        serde_json::json!({
            "flow": {
                "time": "2026-12-05T07:00:00Z",
                "uuid": "u1",
                "verdict": "DROPPED",
                "drop_reason": 181,
                "IP": {"source": "10.1.1.5", "destination": "10.2.1.7", "ipVersion": "IPv4"},
                "l4": {"TCP": {"source_port": 40000, "destination_port": 80}},
                "source": {"identity": 65792, "cluster_name": "east", "namespace": "default",
                           "labels": ["k8s:app=x-wing"], "pod_name": "x-wing"},
                "destination": {"cluster_name": "west", "namespace": "default",
                                "pod_name": "rebel-base-1"},
                "Type": "L3_L4",
                "node_name": "east/east-node1",
                "event_type": {"type": 1},
                "destination_service": {"name": "rebel-base", "namespace": "default"},
                "traffic_direction": "EGRESS",
                "drop_reason_desc": "POLICY_DENY",
                "is_reply": false,
                "socket_cookie": "12",
                "ingress_denied_by": [{"name": "deny-east", "namespace": "default",
                                       "kind": "CiliumNetworkPolicy"}]
            },
            "node_name": "east/east-node1",
            "time": "2026-12-05T07:00:00Z"
        })
    );
}

#[test]
fn table_row_names_clusters_and_the_rule() {
    let r = row(&sample());
    assert_eq!(r[0], "Dec  5 07:00:00.000");
    assert_eq!(r[1], "east/default/x-wing:40000");
    assert_eq!(r[2], "west/default/rebel-base-1:80");
    assert_eq!(r[3], "drop egress");
    assert_eq!(r[4], "DROPPED");
    assert_eq!(
        r[5],
        "TCP; service default/rebel-base; POLICY_DENY; ingress denied by CiliumNetworkPolicy default/deny-east"
    );
}
