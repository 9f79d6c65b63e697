use super::*;
use crate::hubble::flow::{
    CiliumEventType, Endpoint, Flow, FlowFilter, Ip, Layer4, Service, Tcp, TcpFlags,
    TrafficDirection, Udp, Verdict,
};

fn endpoint(cluster: &str, ns: &str, pod: &str, identity: u32, app: &str) -> Endpoint {
    Endpoint {
        identity,
        cluster_name: cluster.into(),
        namespace: ns.into(),
        pod_name: pod.into(),
        labels: vec![
            format!("k8s:app={app}"),
            format!("k8s:{CLUSTER_LABEL}={cluster}"),
            format!("k8s:io.kubernetes.pod.namespace={ns}"),
        ],
        ..Default::default()
    }
}

/// x-wing in west to rebel-base in east through the global service, dropped by policy.
fn flow() -> Flow {
    Flow {
        uuid: "u-1".into(),
        verdict: Verdict::Dropped as i32,
        ip: Some(Ip {
            source: "10.1.0.5".into(),
            destination: "10.2.0.7".into(),
            ip_version: 1,
            ..Default::default()
        }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 40000,
                destination_port: 80,
                flags: Some(TcpFlags {
                    syn: true,
                    ..Default::default()
                }),
            })),
        }),
        source: Some(endpoint("west", "default", "x-wing-1", 0x10100, "x-wing")),
        destination: Some(endpoint(
            "east",
            "default",
            "rebel-base-2",
            0x20100,
            "rebel-base",
        )),
        destination_service: Some(Service {
            name: "rebel-base".into(),
            namespace: "default".into(),
        }),
        node_name: "west/west-node1".into(),
        traffic_direction: TrafficDirection::Egress as i32,
        event_type: Some(CiliumEventType {
            r#type: event_type::DROP,
            sub_type: 133,
        }),
        is_reply: Some(false),
        ..Default::default()
    }
}

fn sel(white: Vec<FlowFilter>, black: Vec<FlowFilter>) -> bool {
    FlowFilters::new(&white, &black).unwrap().matches(&flow())
}

fn one(f: FlowFilter) -> bool {
    sel(vec![f], vec![])
}

#[test]
fn no_filter_selects_everything() {
    assert!(sel(vec![], vec![]));
}

#[test]
fn each_field_matches_and_mismatches() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases: Vec<(FlowFilter, bool)> = vec![
        (
            FlowFilter {
                source_ip: s(&["10.1.0.5"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_ip: s(&["10.1.0.0/16"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_ip: s(&["10.2.0.0/16"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                destination_ip: s(&["10.9.9.9", "10.2.0.7"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_pod: s(&["default/x-wing"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_pod: s(&["default/"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_pod: s(&["kube-system/"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                source_pod: s(&["x-wing"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                destination_pod: s(&["default/x-wing"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                destination_service: s(&["default/rebel-base"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_service: s(&["default/rebel-base"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                source_label: s(&["app=x-wing"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_label: s(&["k8s:app in (a, x-wing)"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                destination_label: s(&[&format!("{CLUSTER_LABEL}=east")]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                destination_label: s(&[&format!("{CLUSTER_LABEL}=west")]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                destination_port: s(&["80"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                source_port: s(&["80"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                source_identity: vec![0x10100],
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                destination_identity: vec![0x10100],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                verdict: vec![Verdict::Forwarded as i32],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                traffic_direction: vec![TrafficDirection::Ingress as i32],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                protocol: s(&["TCP"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                protocol: s(&["udp"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                reply: vec![false],
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                reply: vec![true],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                event_type: vec![crate::hubble::flow::EventTypeFilter {
                    r#type: event_type::DROP,
                    match_sub_type: true,
                    sub_type: 133,
                }],
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                event_type: vec![crate::hubble::flow::EventTypeFilter {
                    r#type: event_type::DROP,
                    match_sub_type: true,
                    sub_type: 181,
                }],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                event_type: vec![crate::hubble::flow::EventTypeFilter {
                    r#type: event_type::TRACE_SOCK,
                    ..Default::default()
                }],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                tcp_flags: vec![TcpFlags {
                    syn: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                tcp_flags: vec![TcpFlags {
                    fin: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                node_name: s(&["west/"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                node_name: s(&["west/*-node1"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                node_name: s(&["west-node1"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                node_name: s(&["east/"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                node_name: s(&["*node2"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                uuid: s(&["u-1"]),
                ..Default::default()
            },
            true,
        ),
        (
            FlowFilter {
                ip_version: vec![2],
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                source_fqdn: s(&["example.com"]),
                ..Default::default()
            },
            false,
        ),
        (
            FlowFilter {
                http_method: s(&["GET"]),
                ..Default::default()
            },
            false,
        ),
    ];
    for (i, (f, want)) in cases.into_iter().enumerate() {
        assert_eq!(one(f.clone()), want, "case {i}: {f:?}");
    }
}

#[test]
fn all_fields_of_a_filter_must_match() {
    let f = FlowFilter {
        source_pod: vec!["default/x-wing".into()],
        destination_port: vec!["8080".into()],
        ..Default::default()
    };
    assert!(!one(f));
}

#[test]
fn whitelist_is_any_blacklist_excludes() {
    let drop = FlowFilter {
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    };
    let fwd = FlowFilter {
        verdict: vec![Verdict::Forwarded as i32],
        ..Default::default()
    };
    assert!(sel(vec![fwd.clone(), drop.clone()], vec![]));
    assert!(!sel(vec![fwd.clone()], vec![]));
    assert!(!sel(vec![], vec![drop.clone()]));
    assert!(sel(vec![drop], vec![fwd]));
}

#[test]
fn udp_ports_and_missing_endpoints() {
    let mut f = flow();
    f.l4 = Some(Layer4 {
        protocol: Some(layer4::Protocol::Udp(Udp {
            source_port: 5353,
            destination_port: 53,
        })),
    });
    f.source = None;
    let by = |filter: FlowFilter| FlowFilters::new(&[filter], &[]).unwrap().matches(&f);
    assert!(by(FlowFilter {
        destination_port: vec!["53".into()],
        protocol: vec!["udp".into()],
        ..Default::default()
    }));
    assert!(!by(FlowFilter {
        source_pod: vec!["default/".into()],
        ..Default::default()
    }));
    assert!(!by(FlowFilter {
        source_label: vec!["app=x-wing".into()],
        ..Default::default()
    }));
}

#[test]
fn invalid_filters_name_list_index_and_field() {
    let bad = |f: FlowFilter, field: &str| {
        let e = FlowFilters::new(&[FlowFilter::default()], &[f]).unwrap_err();
        assert_eq!((e.list, e.index, e.field), ("blacklist", 0, field), "{e}");
        e.to_string()
    };
    assert!(
        bad(
            FlowFilter {
                source_ip: vec!["10.0.0.300".into()],
                ..Default::default()
            },
            "source_ip"
        )
        .contains("10.0.0.300")
    );
    bad(
        FlowFilter {
            destination_port: vec!["http".into()],
            ..Default::default()
        },
        "destination_port",
    );
    bad(
        FlowFilter {
            source_label: vec!["app in (x".into()],
            ..Default::default()
        },
        "source_label",
    );
    assert!(
        bad(
            FlowFilter {
                protocol: vec!["quic".into()],
                ..Default::default()
            },
            "protocol"
        )
        .contains("quic")
    );
    let status: tonic::Status = FlowFilters::new(
        &[],
        &[FlowFilter {
            source_ip: vec!["x".into()],
            ..Default::default()
        }],
    )
    .unwrap_err()
    .into();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn glob_patterns() {
    assert!(glob("a*c", "abbbc"));
    assert!(glob("*", ""));
    assert!(glob("a*b*c", "axbyc"));
    assert!(!glob("a*b*c", "axcyb"));
    assert!(!glob("abc", "abcd"));
    assert!(glob("ab*", "ab"));
}

#[test]
fn event_type_names_round_trip() {
    for t in [
        event_type::DROP,
        event_type::TRACE,
        event_type::POLICY_VERDICT,
        event_type::TRACE_SOCK,
    ] {
        assert_eq!(event_type::by_name(event_type::name(t)), Some(t));
    }
    assert_eq!(event_type::by_name("nope"), None);
}
