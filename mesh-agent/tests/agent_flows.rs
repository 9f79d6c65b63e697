//! The agent's flows end to end on one node: connections to a global service made in the
//! agent's cgroup become flow records in the datapath, flows in the agent's ring, decorated
//! with clusters, pods and the service, and are read back over Hubble's Observer API with
//! mutual TLS, as the apiserver's relay and operators read them.
//!
//! Root only. Own etcd, apiserver, namespace, cgroup, bpffs and node network.

mod agent_support;

use std::time::{Duration, SystemTime};

use agent_support::{Mesh, Net, Outcome, Proc, exactly, targets, vip};
use mesh_proto::hubble::flow::{Flow, FlowFilter, TrafficDirection, Verdict};
use mesh_proto::hubble::observer::{
    GetFlowsRequest, ServerStatusRequest, get_flows_response::ResponseTypes,
    observer_client::ObserverClient,
};
use mesh_proto::pb;
use mesh_proto::tls::{ClientEndpoint, ClientTls, TlsIdentity, connect_channel, load_certs};
use tonic::transport::Channel;

#[ctor::ctor(unsafe)]
fn child_process_entry() {
    agent_support::child_entry();
}

const NET: Net = Net(41);

async fn observer(mesh: &Mesh, as_who: &str) -> ObserverClient<Channel> {
    let dir = mesh.dir.path();
    let identity = TlsIdentity::load(
        &dir.join(format!("{as_who}.crt")),
        &dir.join(format!("{as_who}.key")),
    )
    .unwrap();
    let tls = ClientTls::for_agent(
        load_certs(&mesh.files.ca).unwrap(),
        identity,
        "east".parse().unwrap(),
        "node-1".into(),
    )
    .unwrap();
    let endpoint = ClientEndpoint::new(format!("{}:4244", NET.host(2)), tls);
    ObserverClient::new(connect_channel(&endpoint).await.unwrap())
}

async fn flows(client: &mut ObserverClient<Channel>, req: GetFlowsRequest) -> Vec<Flow> {
    let mut stream = client.get_flows(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        assert_eq!(msg.node_name, "east/node-1");
        if let Some(ResponseTypes::Flow(f)) = msg.response_types {
            out.push(f);
        }
    }
    out
}

fn dst_cluster(f: &Flow) -> &str {
    f.destination
        .as_ref()
        .map_or("", |e| e.cluster_name.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_become_decorated_flows_served_over_mutual_tls() {
    require_root!();
    let mut mesh = Mesh::start("flw", NET).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.start_agent(&["--hubble-listen-address", &format!("{}:4244", NET.host(2))]);
    let all = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("affinity none", |d| exactly(d, &all)).await;

    let outcomes = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30);
    let to_west = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Ok { name } if name == "west-w1"))
        .count();
    assert_eq!(outcomes.len(), 30);

    // The apiserver's certificate (the relay) may read flows.
    let mut client = observer(&mesh, "apiserver").await;
    // The reader is asynchronous: wait for the ring to hold the 30 records.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = flows(&mut client, GetFlowsRequest::default()).await;
        let egress: Vec<Flow> = got
            .into_iter()
            .filter(|f| f.traffic_direction == TrafficDirection::Egress as i32)
            .collect();
        if egress.len() >= 30 || std::time::Instant::now() > deadline {
            break egress;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.len(), 30, "one egress flow per connection: {got:#?}");
    for f in &got {
        assert_eq!(f.verdict, Verdict::Forwarded as i32);
        assert_eq!(f.node_name, "east/node-1");
        let svc = f.destination_service.as_ref().expect("the service");
        assert_eq!(
            (svc.namespace.as_str(), svc.name.as_str()),
            ("default", "web")
        );
        let dst = f.destination.as_ref().unwrap();
        assert!(dst.pod_name.starts_with("pod-10."), "{dst:?}");
        assert!(dst.labels.iter().any(|l| l == "k8s:app=web"), "{dst:?}");
        // A process of the node's own namespace is the host.
        assert_eq!(f.source.as_ref().unwrap().identity, 1);
    }
    // The flows say which cluster answered: as many to west as connections west answered.
    let west: Vec<&Flow> = got.iter().filter(|f| dst_cluster(f) == "west").collect();
    assert_eq!(west.len(), to_west);
    assert!(
        got.iter()
            .all(|f| matches!(dst_cluster(f), "east" | "west"))
    );

    // Filters, as `meshctl observe --to-cluster west` sends them.
    let to_west_filter = FlowFilter {
        destination_label: vec!["io.cilium.k8s.policy.cluster=west".into()],
        ..Default::default()
    };
    let filtered = flows(
        &mut client,
        GetFlowsRequest {
            whitelist: vec![to_west_filter.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(filtered.len(), to_west);
    let not_west = flows(
        &mut client,
        GetFlowsRequest {
            blacklist: vec![to_west_filter],
            whitelist: vec![FlowFilter {
                traffic_direction: vec![TrafficDirection::Egress as i32],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(not_west.len(), 30 - to_west);

    // The last N, in time order.
    let last3 = flows(
        &mut client,
        GetFlowsRequest {
            number: 3,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(last3.len(), 3);
    let all_now = flows(&mut client, GetFlowsRequest::default()).await;
    assert_eq!(last3, all_now[all_now.len() - 3..].to_vec());

    // An independent client built from Hubble's Observer API definitions (Python grpcio)
    // reads the same last 3 from the agent, over mutual TLS, naming the server as Hubble's
    // CLI does with --tls-server-name (the test certificates name localhost).
    let dir = mesh.dir.path().to_path_buf();
    let ca = mesh.files.ca.clone();
    let python = tokio::task::spawn_blocking(move || {
        mesh_testkit::hubble::PythonObserver::generate().read(
            &mesh_testkit::hubble::Target {
                address: format!("{}:4244", NET.host(2)),
                ca: &ca,
                cert: &dir.join("apiserver.crt"),
                key: &dir.join("apiserver.key"),
                server_name: Some("localhost"),
                all_clusters: false,
            },
            3,
        )
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    let python: serde_json::Value = serde_json::from_str(&python).unwrap();
    let uuids: Vec<&str> = python["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["node_name"], "east/node-1", "{r}");
            r["flow"]["uuid"].as_str().unwrap()
        })
        .collect();
    let expected: Vec<&str> = last3.iter().map(|f| f.uuid.as_str()).collect();
    assert_eq!(uuids, expected, "{python:#}");
    assert_eq!(python["status"]["max_flows"], "4095", "{python:#}");
    let times: Vec<_> = all_now.iter().map(|f| f.time.unwrap()).collect();
    assert!(
        times
            .windows(2)
            .all(|w| (w[0].seconds, w[0].nanos) <= (w[1].seconds, w[1].nanos))
    );

    // Follow: new connections arrive on an open stream.
    let since = SystemTime::now();
    let mut follow = client
        .get_flows(GetFlowsRequest {
            follow: true,
            since: Some(since.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let more = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 5);
    assert_eq!(more.len(), 5);
    let mut followed = 0;
    while followed < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(10), follow.message())
            .await
            .expect("a followed flow within 10 s")
            .unwrap()
            .expect("the stream stays open");
        if let Some(ResponseTypes::Flow(f)) = msg.response_types
            && f.traffic_direction == TrafficDirection::Egress as i32
        {
            assert!(SystemTime::try_from(f.time.unwrap()).unwrap() >= since);
            followed += 1;
        }
    }

    let status = client
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.max_flows, 4095);
    assert!(status.seen_flows >= 35, "{status:?}");
    assert_eq!(status.num_flows, status.seen_flows.min(4095));

    // The relay finds the agent through its status record.
    let observer_address = format!("{}:4244", NET.host(2));
    mesh.wait_agent_status("the observer's address reported", |s| {
        s.observer_address == observer_address
    })
    .await;

    // Flow metrics count by destination cluster.
    let series = "mesh_agent_flows_total{source_cluster=\"east\",destination_cluster=\"west\",source_namespace=\"\",destination_namespace=\"default\",direction=\"egress\",verdict=\"forwarded\",drop_reason=\"\"}";
    assert!(mesh.metric(series).unwrap_or(0.0) >= to_west as f64);

    // Another agent may not read this node's flows.
    let mut other = observer(&mesh, "agent").await;
    let err = other
        .get_flows(GetFlowsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("agent node-1"), "{err}");
}
