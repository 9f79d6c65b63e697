//! The flow relay (issue 13 part 3) against real components: a real etcd, the real
//! apiserver over mutual TLS, and test Observer servers standing in for agents (real gRPC,
//! real mutual TLS with node certificates). Agents are found through their status records.

mod relay_support;

use std::time::Duration;

use mesh_proto::hubble::flow::{FlowFilter, TrafficDirection, Verdict};
use mesh_proto::hubble::observer::get_flows_response::ResponseTypes;
use mesh_proto::hubble::observer::observer_client::ObserverClient;
use mesh_proto::hubble::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, ServerStatusRequest,
};
use mesh_proto::hubble::relay::NodeState;
use relay_support::*;
use tonic::transport::Channel;

async fn flows(
    client: &mut ObserverClient<Channel>,
    req: GetFlowsRequest,
    all_clusters: bool,
) -> Vec<GetFlowsResponse> {
    let mut r = tonic::Request::new(req);
    if all_clusters {
        r.metadata_mut()
            .insert("x-mesh-scope", "all-clusters".parse().unwrap());
    }
    let mut s = tokio::time::timeout(STEP, client.get_flows(r))
        .await
        .expect("GetFlows answers")
        .expect("GetFlows succeeds")
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(STEP, s.message())
        .await
        .expect("the stream goes on")
        .expect("no stream error")
    {
        out.push(m);
    }
    out
}

fn last(n: u64) -> GetFlowsRequest {
    GetFlowsRequest {
        number: n,
        ..Default::default()
    }
}

fn flow_of(r: &GetFlowsResponse) -> &mesh_proto::hubble::flow::Flow {
    match &r.response_types {
        Some(ResponseTypes::Flow(f)) => f,
        other => panic!("not a flow: {other:?}"),
    }
}

async fn next(s: &mut tonic::Streaming<GetFlowsResponse>) -> GetFlowsResponse {
    tokio::time::timeout(STEP, s.message())
        .await
        .expect("a flow in time")
        .unwrap()
        .expect("stream open")
}

fn plain(ms: i64, node: &str, port: u32) -> mesh_proto::hubble::flow::Flow {
    let mut s = FlowSpec::egress(ms, node, "east", "10.1.2.9");
    s.destination_port = port;
    s.build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_merges_agents_in_time_order_last_n_overall_and_reports_unavailable_nodes() {
    let east = Cluster::start("east", 1, "10.1.0.0/16").await;
    let t = now_ms();
    let n1 = TestAgent::start(
        &east.ca,
        "node-1",
        vec![
            plain(t + 1, "east/node-1", 81),
            plain(t + 5, "east/node-1", 85),
            plain(t + 6, "east/node-1", 86),
        ],
    )
    .await;
    let n2 = TestAgent::start(
        &east.ca,
        "node-2",
        vec![
            plain(t + 2, "east/node-2", 82),
            plain(t + 3, "east/node-2", 83),
            plain(t + 4, "east/node-2", 84),
        ],
    )
    .await;
    east.report("node-1", &n1.addr.to_string()).await;
    east.report("node-2", &n2.addr.to_string()).await;
    // Reported, but nothing listens there: unavailable, not a failed request.
    let dead = format!("127.0.0.1:{}", mesh_testkit::free_port());
    east.report("node-3", &dead).await;
    // An agent that serves no Observer is not a flow source.
    east.report("node-4", "").await;

    let mut op = east.client_as(&east.ca, "operator/admin").await;

    // --last 3 is 3 in total across the nodes, oldest first; node-3 reported unavailable.
    let got = flows(&mut op, last(3), false).await;
    assert_eq!(
        uuids(&got),
        [
            format!("east/node-2-{}", t + 4),
            format!("east/node-1-{}", t + 5),
            format!("east/node-1-{}", t + 6)
        ],
        "{got:#?}"
    );
    assert_eq!(unavailable(&got), ["east/node-3"]);
    let Some(ResponseTypes::NodeStatus(ev)) = &got[0].response_types else {
        panic!("a node status first: {got:#?}")
    };
    assert_eq!(ev.state_change, NodeState::NodeUnavailable as i32);

    // --first 2, and everything (0) in time order.
    let got = flows(
        &mut op,
        GetFlowsRequest {
            number: 2,
            first: true,
            ..Default::default()
        },
        false,
    )
    .await;
    assert_eq!(
        uuids(&got),
        [
            format!("east/node-1-{}", t + 1),
            format!("east/node-2-{}", t + 2)
        ]
    );
    let all = flows(&mut op, last(0), false).await;
    let times: Vec<_> = all
        .iter()
        .filter(|r| matches!(r.response_types, Some(ResponseTypes::Flow(_))))
        .map(|r| flow_of(r).time.unwrap().nanos)
        .collect();
    assert_eq!(times.len(), 6);
    assert!(times.is_sorted(), "time order: {times:?}");

    // Filters reach the agents: port 83 or 85 only.
    let got = flows(
        &mut op,
        GetFlowsRequest {
            whitelist: vec![FlowFilter {
                destination_port: vec!["83".into(), "85".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
        false,
    )
    .await;
    assert_eq!(
        uuids(&got),
        [
            format!("east/node-2-{}", t + 3),
            format!("east/node-1-{}", t + 5)
        ]
    );
    // An invalid filter is the caller's error.
    let bad = op
        .get_flows(GetFlowsRequest {
            whitelist: vec![FlowFilter {
                source_ip: vec!["not-an-ip".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect_err("invalid filter refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // The relay dialed the agents as this cluster's apiserver.
    assert!(
        n1.callers
            .lock()
            .unwrap()
            .iter()
            .all(|c| c == "apiserver replica of cluster east"),
        "{:?}",
        n1.callers.lock().unwrap()
    );

    // ServerStatus and GetNodes aggregate.
    let st = op
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.num_flows, 6);
    assert_eq!(st.max_flows, 2 * 4096);
    assert_eq!(st.num_connected_nodes, Some(2));
    assert_eq!(st.num_unavailable_nodes, Some(1));
    assert_eq!(st.unavailable_nodes, ["east/node-3"]);
    let nodes = op
        .get_nodes(GetNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let states: Vec<_> = nodes.iter().map(|n| (n.name.as_str(), n.state)).collect();
    assert_eq!(
        states,
        [
            ("east/node-1", NodeState::NodeConnected as i32),
            ("east/node-2", NodeState::NodeConnected as i32),
            ("east/node-3", NodeState::NodeUnavailable as i32),
        ]
    );
    assert_eq!(nodes[0].num_flows, 3);
    assert_eq!(
        nodes[0].tls.as_ref().unwrap().server_name,
        "spiffe://east.mesh/agent/node-1"
    );

    // An agent that goes away is reported, and the request still answers.
    n2.stop().await;
    let got = flows(&mut op, last(10), false).await;
    assert_eq!(uuids(&got).len(), 3, "{got:#?}");
    let mut un = unavailable(&got);
    un.sort();
    assert_eq!(un, ["east/node-2", "east/node-3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_both_nodes_in_time_order_and_joins_the_two_ends() {
    let east = Cluster::start("east", 1, "10.1.0.0/16").await;
    let t = now_ms();
    let n1 = TestAgent::start(&east.ca, "node-1", vec![plain(t - 10, "east/node-1", 81)]).await;
    let n2 = TestAgent::start(&east.ca, "node-2", vec![]).await;
    east.report("node-1", &n1.addr.to_string()).await;
    east.report("node-2", &n2.addr.to_string()).await;
    let mut op = east.client_as(&east.ca, "operator/admin").await;
    let mut stream = op
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The backlog first.
    let first = next(&mut stream).await;
    assert_eq!(flow_of(&first).uuid, format!("east/node-1-{}", t - 10));

    // Node-1 reports a newer flow before node-2 reports an older one: the relay's sort
    // window puts them back in time order.
    n1.emit(plain(t + 20, "east/node-1", 90));
    n2.emit(plain(t + 10, "east/node-2", 91));
    let a = next(&mut stream).await;
    let b = next(&mut stream).await;
    assert_eq!(
        [flow_of(&a).uuid.clone(), flow_of(&b).uuid.clone()],
        [
            format!("east/node-2-{}", t + 10),
            format!("east/node-1-{}", t + 20)
        ]
    );

    // A pod on node-1 connects to a pod on node-2 that denies it: the client's egress
    // record and the server's ingress record come out as one flow with both ends.
    let e = FlowSpec::egress(t + 30, "east/node-1", "east", "10.1.2.7").build();
    let i = FlowSpec::ingress(t + 31, "east/node-2", "east", "10.1.2.7")
        .denied("default", "deny-xwing")
        .build();
    n2.emit(i);
    n1.emit(e);
    let j = next(&mut stream).await;
    let f = flow_of(&j);
    assert_eq!(f.verdict, Verdict::Dropped as i32, "{f:#?}");
    assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);
    assert_eq!(f.ingress_denied_by[0].name, "deny-xwing");
    assert_eq!(
        f.node_labels,
        [
            "mesh.io/egress-node=east/node-1",
            "mesh.io/ingress-node=east/node-2"
        ]
    );
    assert_eq!(f.node_name, "east/node-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_clusters_adds_each_peers_own_flows_joins_across_clusters_and_never_fans_out_for_a_peer()
 {
    let mut east = Cluster::start("east", 1, "10.1.0.0/16").await;
    let west = Cluster::start("west", 2, "10.2.0.0/16").await;
    east.peer_with(&west);
    west.peer_with(&east);
    let t = now_ms();
    // x-wing in east connects to rebel-base in west; west's policy denies it at ingress.
    let e_agent = TestAgent::start(
        &east.ca,
        "east-node1",
        vec![
            plain(t, "east/east-node1", 81),
            FlowSpec::egress(t + 100, "east/east-node1", "west", "10.2.1.7").build(),
        ],
    )
    .await;
    let w_agent = TestAgent::start(
        &west.ca,
        "west-node1",
        vec![
            FlowSpec::ingress(t + 102, "west/west-node1", "west", "10.2.1.7")
                .denied("default", "deny-east")
                .build(),
            {
                let mut s = FlowSpec::egress(t + 200, "west/west-node1", "west", "10.2.1.8");
                s.source_ip = "10.2.1.9".into();
                s.uuid = "west-local".into();
                s.build()
            },
        ],
    )
    .await;
    east.report("east-node1", &e_agent.addr.to_string()).await;
    west.report("west-node1", &w_agent.addr.to_string()).await;
    let mut op = east.client_as(&east.ca, "operator/admin").await;

    // Own cluster only by default.
    let got = flows(&mut op, last(10), false).await;
    assert_eq!(uuids(&got).len(), 2, "{got:#?}");

    // All clusters: the peers directory is re-read every 100 ms; wait until west is in.
    let deadline = tokio::time::Instant::now() + STEP;
    let got = loop {
        let got = flows(&mut op, last(10), true).await;
        if uuids(&got).contains(&"west-local".to_string()) {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "west's flows never came: {got:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // 4 records, the cross-cluster pair joined into one: 3 flows, in time order.
    assert_eq!(
        uuids(&got),
        [
            format!("east/east-node1-{t}"),
            format!("east/east-node1-{}", t + 100),
            "west-local".to_string()
        ],
        "{got:#?}"
    );
    let joined = flow_of(&got[1]);
    assert_eq!(joined.verdict, Verdict::Dropped as i32);
    assert_eq!(joined.ingress_denied_by[0].name, "deny-east");
    assert_eq!(joined.source.as_ref().unwrap().cluster_name, "east");
    assert_eq!(joined.destination.as_ref().unwrap().cluster_name, "west");
    assert_eq!(
        joined.destination_service.as_ref().unwrap().name,
        "rebel-base"
    );
    assert_eq!(
        joined.node_labels,
        [
            "mesh.io/egress-node=east/east-node1",
            "mesh.io/ingress-node=west/west-node1"
        ]
    );
    assert!(
        w_agent
            .callers
            .lock()
            .unwrap()
            .iter()
            .all(|c| c == "apiserver replica of cluster west"),
        "west's agent is read by west's relay only: {:?}",
        w_agent.callers.lock().unwrap()
    );

    // --last 2 across clusters: the 2 newest overall.
    let got = flows(&mut op, last(2), true).await;
    assert_eq!(
        uuids(&got),
        [
            format!("east/east-node1-{}", t + 100),
            "west-local".to_string()
        ]
    );

    // ServerStatus across clusters counts both relays' nodes.
    let mut r = tonic::Request::new(ServerStatusRequest {});
    r.metadata_mut()
        .insert("x-mesh-scope", "all-clusters".parse().unwrap());
    let st = op.server_status(r).await.unwrap().into_inner();
    assert_eq!(st.num_connected_nodes, Some(2));
    assert_eq!(st.num_flows, 4);

    // West's apiserver (a peer of east) asking east for all clusters gets east's own only:
    // east never fans out for a peer.
    let mut as_peer = east.client_as(&west.ca, "apiserver").await;
    let got = flows(&mut as_peer, last(10), true).await;
    assert_eq!(uuids(&got).len(), 2, "{got:#?}");
    assert!(!uuids(&got).contains(&"west-local".to_string()));

    // A peer that cannot be reached is reported, east's flows still come.
    drop(w_agent);
    let mut west = west;
    west.stop().await;
    let got = flows(&mut op, last(10), true).await;
    assert_eq!(uuids(&got).len(), 2, "{got:#?}");
    assert_eq!(unavailable(&got), ["west/"]);
    east.stop().await;
}
