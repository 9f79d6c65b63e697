use std::time::{Duration, Instant};

use mesh_proto::hubble::flow::{
    DropReason, Endpoint, Flow, Ip, Layer4, Policy, Service, Tcp, TrafficDirection, Udp, Verdict,
    layer4,
};
use mesh_proto::hubble::observer::GetFlowsResponse;
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;
use mesh_proto::hubble::relay::{NodeState, NodeStatusEvent};

use super::*;

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

struct F {
    ms: i64,
    node: &'static str,
    dir: TrafficDirection,
    src: &'static str,
    sport: u32,
    dst: &'static str,
    dport: u32,
    tcp: bool,
    verdict: Verdict,
}

fn flow(f: F) -> Flow {
    let proto = if f.tcp {
        layer4::Protocol::Tcp(Tcp {
            source_port: f.sport,
            destination_port: f.dport,
            flags: None,
        })
    } else {
        layer4::Protocol::Udp(Udp {
            source_port: f.sport,
            destination_port: f.dport,
        })
    };
    let cluster = f.node.split('/').next().unwrap();
    Flow {
        time: Some(ts(f.ms)),
        uuid: format!("{}-{}", f.node, f.ms),
        verdict: f.verdict as i32,
        ip: Some(Ip {
            source: f.src.into(),
            destination: f.dst.into(),
            ip_version: 1,
            encrypted: false,
        }),
        l4: Some(Layer4 {
            protocol: Some(proto),
        }),
        source: Some(Endpoint {
            cluster_name: if f.dir == TrafficDirection::Egress {
                cluster.into()
            } else {
                String::new()
            },
            namespace: "default".into(),
            pod_name: "x-wing".into(),
            ..Default::default()
        }),
        destination: Some(Endpoint {
            cluster_name: if f.dir == TrafficDirection::Ingress {
                cluster.into()
            } else {
                String::new()
            },
            namespace: "default".into(),
            pod_name: if f.dir == TrafficDirection::Ingress {
                "rebel-base-1".into()
            } else {
                String::new()
            },
            ..Default::default()
        }),
        node_name: f.node.into(),
        traffic_direction: f.dir as i32,
        is_reply: Some(false),
        ..Default::default()
    }
}

fn resp(f: Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: f.node_name.clone(),
        time: f.time,
        response_types: Some(ResponseTypes::Flow(f)),
    }
}

fn egress(ms: i64, node: &'static str) -> F {
    F {
        ms,
        node,
        dir: TrafficDirection::Egress,
        src: "10.1.1.5",
        sport: 0,
        dst: "10.2.1.7",
        dport: 80,
        tcp: true,
        verdict: Verdict::Forwarded,
    }
}

fn ingress(ms: i64, node: &'static str) -> F {
    F {
        dir: TrafficDirection::Ingress,
        sport: 40123,
        ..egress(ms, node)
    }
}

fn uuids(items: &[GetFlowsResponse]) -> Vec<String> {
    items
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
            _ => None,
        })
        .collect()
}

fn plain(ms: i64, node: &'static str) -> GetFlowsResponse {
    resp(flow(F {
        dport: 9000 + ms as u32,
        ..egress(ms, node)
    }))
}

#[test]
fn last_n_is_taken_across_nodes_not_per_node() {
    // Two nodes, each answering its own last 3: the relay keeps the 3 newest overall.
    let items = vec![
        plain(1, "east/n1"),
        plain(5, "east/n1"),
        plain(6, "east/n1"),
        plain(2, "east/n2"),
        plain(3, "east/n2"),
        plain(4, "east/n2"),
    ];
    let out = last_n(items.clone(), 3, false);
    assert_eq!(uuids(&out), ["east/n2-4", "east/n1-5", "east/n1-6"]);
    let out = last_n(items.clone(), 2, true);
    assert_eq!(uuids(&out), ["east/n1-1", "east/n2-2"]);
    // 0 = everything, in time order.
    assert_eq!(last_n(items, 0, false).len(), 6);
}

#[test]
fn last_n_keeps_node_status_events() {
    let status = GetFlowsResponse {
        node_name: String::new(),
        time: Some(ts(0)),
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: NodeState::NodeUnavailable as i32,
            node_names: vec!["east/n3".into()],
            message: "down".into(),
        })),
    };
    let items = vec![plain(1, "east/n1"), status, plain(2, "east/n1")];
    let out = last_n(items, 1, false);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(
        out[0].response_types,
        Some(ResponseTypes::NodeStatus(_))
    ));
    assert_eq!(uuids(&out), ["east/n1-2"]);
}

#[test]
fn egress_and_ingress_of_one_connection_become_one_flow() {
    let e = flow(egress(1000, "east/east-node1"));
    let mut i = flow(ingress(1003, "west/west-node2"));
    i.verdict = Verdict::Dropped as i32;
    i.drop_reason_desc = DropReason::PolicyDeny as i32;
    i.ingress_denied_by = vec![Policy {
        name: "deny-east".into(),
        namespace: "default".into(),
        kind: "CiliumNetworkPolicy".into(),
        ..Default::default()
    }];
    let mut e2 = e.clone();
    e2.destination_service = Some(Service {
        name: "rebel-base".into(),
        namespace: "default".into(),
    });
    let out = join_ends(
        vec![resp(e2), resp(i), plain(2000, "east/east-node1")],
        DEFAULT_JOIN_WINDOW,
    );
    assert_eq!(out.len(), 2, "{out:?}");
    let Some(ResponseTypes::Flow(j)) = &out[0].response_types else {
        panic!("a flow: {out:?}")
    };
    assert_eq!(j.verdict, Verdict::Dropped as i32);
    assert_eq!(j.drop_reason_desc, DropReason::PolicyDeny as i32);
    assert_eq!(j.ingress_denied_by[0].name, "deny-east");
    assert_eq!(j.node_name, "east/east-node1");
    assert_eq!(out[0].node_name, "east/east-node1");
    assert_eq!(
        j.node_labels,
        [
            "mesh.io/egress-node=east/east-node1",
            "mesh.io/ingress-node=west/west-node2"
        ]
    );
    // Source from the client, destination and real source port from the server.
    assert_eq!(j.source.as_ref().unwrap().cluster_name, "east");
    assert_eq!(j.destination.as_ref().unwrap().cluster_name, "west");
    assert_eq!(j.destination.as_ref().unwrap().pod_name, "rebel-base-1");
    assert_eq!(crate::relay::merge::l4(j), Some((true, 40123, 80)));
    assert_eq!(j.destination_service.as_ref().unwrap().name, "rebel-base");
    assert_eq!(j.time, Some(ts(1000)));
    assert!(
        j.summary
            .contains("west/west-node2 DROPPED by CiliumNetworkPolicy default/deny-east")
    );
    assert!(is_joined(j));
}

#[test]
fn records_that_differ_are_not_joined() {
    let base = || resp(flow(egress(1000, "east/n1")));
    let cases: Vec<(&str, F)> = vec![
        (
            "other destination port",
            F {
                dport: 81,
                ..ingress(1001, "west/n2")
            },
        ),
        (
            "other destination ip",
            F {
                dst: "10.2.1.8",
                ..ingress(1001, "west/n2")
            },
        ),
        (
            "other source ip",
            F {
                src: "10.1.1.6",
                ..ingress(1001, "west/n2")
            },
        ),
        (
            "udp against tcp",
            F {
                tcp: false,
                ..ingress(1001, "west/n2")
            },
        ),
        ("outside the window", ingress(4000, "west/n2")),
        (
            "two egress records",
            F {
                dir: TrafficDirection::Egress,
                ..ingress(1001, "west/n2")
            },
        ),
    ];
    for (what, other) in cases {
        let out = join_ends(vec![base(), resp(flow(other))], DEFAULT_JOIN_WINDOW);
        assert_eq!(out.len(), 2, "{what}: {out:?}");
    }
    // A bound egress source port must equal the ingress one.
    let e = flow(F {
        sport: 5555,
        ..egress(1000, "east/n1")
    });
    let out = join_ends(
        vec![resp(e), resp(flow(ingress(1001, "west/n2")))],
        DEFAULT_JOIN_WINDOW,
    );
    assert_eq!(out.len(), 2);
}

#[test]
fn each_record_joins_once_and_udp_joins_too() {
    // Two connections from the same client to the same backend port: two joined flows.
    let items = vec![
        resp(flow(egress(1000, "east/n1"))),
        resp(flow(egress(1001, "east/n1"))),
        resp(flow(ingress(1002, "west/n2"))),
        resp(flow(F {
            sport: 40124,
            ..ingress(1003, "west/n2")
        })),
    ];
    let out = join_ends(items, DEFAULT_JOIN_WINDOW);
    assert_eq!(out.len(), 2, "{out:?}");
    let ports: Vec<_> = out
        .iter()
        .map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => l4(f).unwrap().1,
            _ => 0,
        })
        .collect();
    assert_eq!(ports, [40123, 40124]);

    let udp = vec![
        resp(flow(F {
            tcp: false,
            ..egress(1000, "east/n1")
        })),
        resp(flow(F {
            tcp: false,
            ..ingress(1000, "east/n1")
        })),
    ];
    let out = join_ends(udp, DEFAULT_JOIN_WINDOW);
    assert_eq!(out.len(), 1);
}

#[test]
fn a_skewed_ingress_clock_still_joins() {
    // The server's node clock is a little behind: its record looks older.
    let out = join_ends(
        vec![
            resp(flow(ingress(990, "west/n2"))),
            resp(flow(egress(1000, "east/n1"))),
        ],
        DEFAULT_JOIN_WINDOW,
    );
    assert_eq!(out.len(), 1);
    let Some(ResponseTypes::Flow(j)) = &out[0].response_types else {
        panic!()
    };
    assert_eq!(j.node_name, "east/n1");
    assert_eq!(j.time, Some(ts(1000)));
}

#[test]
fn sort_window_releases_in_time_order_after_hold_or_when_full() {
    let t0 = Instant::now();
    let hold = Duration::from_millis(500);
    let mut w = SortWindow::new(3, hold, DEFAULT_JOIN_WINDOW);
    // Arrival order differs from time order (two nodes' streams interleave).
    w.push(plain(30, "east/n1"), t0);
    w.push(plain(10, "east/n2"), t0);
    w.push(plain(20, "east/n1"), t0);
    assert!(w.pop_ready(t0).is_empty(), "nothing is due yet");
    assert_eq!(w.next_due(), Some(t0 + hold));
    // A fourth item overflows the window: the oldest leaves at once.
    w.push(plain(25, "east/n2"), t0);
    assert_eq!(uuids(&w.pop_ready(t0)), ["east/n2-10"]);
    // After the hold, everything held since t0 is due, in time order.
    let later = t0 + hold;
    w.push(plain(40, "east/n2"), later);
    assert_eq!(
        uuids(&w.pop_ready(later)),
        ["east/n1-20", "east/n2-25", "east/n1-30"]
    );
    assert_eq!(w.len(), 1);
    assert_eq!(uuids(&w.drain()), ["east/n2-40"]);
    assert!(w.is_empty());
}

#[test]
fn sort_window_joins_ends_held_together() {
    let t0 = Instant::now();
    let mut w = SortWindow::new(100, Duration::from_millis(100), DEFAULT_JOIN_WINDOW);
    w.push(resp(flow(ingress(1002, "west/n2"))), t0);
    w.push(plain(1001, "east/n3"), t0);
    w.push(resp(flow(egress(1000, "east/n1"))), t0);
    let out = w.pop_ready(t0 + Duration::from_millis(100));
    assert_eq!(out.len(), 2, "{out:?}");
    let Some(ResponseTypes::Flow(j)) = &out[0].response_types else {
        panic!()
    };
    assert!(is_joined(j));
    assert_eq!(uuids(&out)[1], "east/n3-1001");
}

#[test]
fn the_nearest_ingress_is_the_partner_when_an_older_egress_is_missing() {
    // The egress record of an older connection was cut off (outside one node's last N),
    // its ingress record was not: the newer egress must take its own ingress, not the
    // older one that comes first.
    let items = vec![
        resp(flow(F {
            sport: 41000,
            ..ingress(1000, "west/n2")
        })),
        resp(flow(egress(1500, "east/n1"))),
        resp(flow(F {
            sport: 41001,
            ..ingress(1501, "west/n2")
        })),
    ];
    let out = join_ends(items, DEFAULT_JOIN_WINDOW);
    assert_eq!(out.len(), 2, "{out:?}");
    let ports: Vec<_> = out
        .iter()
        .map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => (is_joined(f), l4(f).unwrap().1),
            _ => (false, 0),
        })
        .collect();
    assert_eq!(ports, [(false, 41000), (true, 41001)]);
}

#[test]
fn a_bounded_answer_from_cut_sources_equals_the_answer_from_everything() {
    // east/n1: ten connections to distinct ports (egress at 0, 10, .. 90), then three
    // flows of its own at 91..93; west/n1: the ingress end of each connection, 1 ms later.
    let mut east = Vec::new();
    let mut west = Vec::new();
    for i in 0..10u32 {
        let ms = i64::from(i) * 10;
        east.push(resp(flow(F {
            dport: 80 + i,
            ..egress(ms, "east/n1")
        })));
        west.push(resp(flow(F {
            dport: 80 + i,
            ..ingress(ms + 1, "west/n1")
        })));
    }
    for ms in 91..=93 {
        east.push(plain(ms, "east/n1"));
    }
    let window = Duration::from_secs(2);
    let all: Vec<_> = east.iter().chain(&west).cloned().collect();
    // What a source answers when asked for `k`: its own newest (or oldest) k.
    let cut = |k: u64, first: bool| -> Vec<GetFlowsResponse> {
        let mut v = last_n(east.clone(), k, first);
        v.extend(last_n(west.clone(), k, first));
        v
    };
    for first in [false, true] {
        for n in 1..=14 {
            let want = bounded_answer(all.clone(), n, first, window);
            let got = bounded_answer(cut(per_source_number(n), first), n, first, window);
            assert_eq!(uuids(&got), uuids(&want), "n={n} first={first}");
            assert_eq!(uuids(&got).len(), want.len());
        }
    }
    // Asking each source for only n gets it wrong: west's ingress at 91 stands alone in
    // the newest 3 in place of east's own flow at 91.
    let want = bounded_answer(all, 3, false, window);
    assert_eq!(uuids(&want), ["east/n1-91", "east/n1-92", "east/n1-93"]);
    let naive = bounded_answer(cut(3, false), 3, false, window);
    assert_ne!(uuids(&naive), uuids(&want));
}
