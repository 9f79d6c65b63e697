//! An independent client of the relay (issue 13, "an independent client built from Hubble's
//! Observer API definitions"): Python's grpcio over modules generated from
//! proto/proto/*.proto at test time (`mesh_testkit::hubble`), sharing no code with mesh.

mod relay_support;

use mesh_testkit::hubble::{PythonObserver, Target};
use relay_support::*;
use serde_json::Value;

async fn python_read(
    py: &std::sync::Arc<PythonObserver>,
    cluster: &Cluster,
    number: u64,
    all: bool,
) -> Value {
    let (ca, cert, key) = cluster.operator_files();
    let address = cluster.addr().to_string();
    let py = py.clone();
    let out = tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            py.read(
                &Target {
                    address,
                    ca: ca.as_ref(),
                    cert: cert.as_ref(),
                    key: key.as_ref(),
                    server_name: None,
                    all_clusters: all,
                },
                number,
            )
        }),
    )
    .await
    .expect("the python client returns")
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).expect("the client prints JSON")
}

fn flow_uuids(v: &Value) -> Vec<String> {
    v["responses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["flow"]["uuid"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_generated_from_the_protos_reads_get_flows_and_server_status() {
    let py = std::sync::Arc::new(PythonObserver::generate());

    let east = Cluster::start("east", 1, "10.1.0.0/16").await;
    let west = Cluster::start("west", 2, "10.2.0.0/16").await;
    east.peer_with(&west);
    west.peer_with(&east);
    let t = now_ms();
    let e1 = TestAgent::start(
        &east.ca,
        "east-node1",
        vec![FlowSpec::egress(t, "east/east-node1", "west", "10.2.1.7").build()],
    )
    .await;
    let mut other = FlowSpec::egress(t + 5, "east/east-node2", "east", "10.1.2.4");
    other.uuid = "east-other".into();
    let e2 = TestAgent::start(&east.ca, "east-node2", vec![other.build()]).await;
    let w1 = TestAgent::start(
        &west.ca,
        "west-node1",
        vec![
            FlowSpec::ingress(t + 1, "west/west-node1", "west", "10.2.1.7")
                .denied("default", "deny-east")
                .build(),
        ],
    )
    .await;
    east.report("east-node1", &e1.addr.to_string()).await;
    east.report("east-node2", &e2.addr.to_string()).await;
    west.report("west-node1", &w1.addr.to_string()).await;

    // This cluster's relay.
    let v = python_read(&py, &east, 10, false).await;
    assert_eq!(
        flow_uuids(&v),
        [format!("east/east-node1-{t}"), "east-other".to_string()],
        "{v:#}"
    );
    let first = &v["responses"][0];
    assert_eq!(first["node_name"], "east/east-node1");
    assert_eq!(first["flow"]["verdict"], "FORWARDED");
    assert_eq!(first["flow"]["traffic_direction"], "EGRESS");
    assert_eq!(first["flow"]["source"]["pod_name"], "x-wing");
    assert_eq!(first["flow"]["destination"]["cluster_name"], "west");
    assert_eq!(first["flow"]["destination_service"]["name"], "rebel-base");
    assert_eq!(first["flow"]["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(v["status"]["num_flows"], "2");
    assert_eq!(v["status"]["num_connected_nodes"], 2);

    // Every cluster, --last 1: the joined cross-cluster flow is older than east-other.
    let deadline = tokio::time::Instant::now() + STEP;
    let v = loop {
        let v = python_read(&py, &east, 10, true).await;
        if v["status"]["num_connected_nodes"] == 3 {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        flow_uuids(&v),
        [format!("east/east-node1-{t}"), "east-other".to_string()],
        "{v:#}"
    );
    let joined = &v["responses"][0]["flow"];
    assert_eq!(joined["verdict"], "DROPPED");
    assert_eq!(joined["drop_reason_desc"], "POLICY_DENY");
    assert_eq!(joined["ingress_denied_by"][0]["name"], "deny-east");
    assert_eq!(v["status"]["num_flows"], "3");
    let v = python_read(&py, &east, 1, true).await;
    assert_eq!(flow_uuids(&v), ["east-other"]);
}
