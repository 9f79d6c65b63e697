//! An independent client of the relay (issue 13, "an independent client built from Hubble's
//! Observer API definitions"): Python's grpcio with modules that Debian's protoc and
//! grpc_python_plugin generate from proto/proto/*.proto at test time, in a temp dir. It
//! shares no code with mesh: what it reads proves the wire contract, not our codegen.
//! Needs python3-grpcio, python3-protobuf and protobuf-compiler-grpc (scripts/setup.sh).

mod relay_support;

use std::path::Path;
use std::process::Command;

use relay_support::*;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const PLUGIN: &str = "/usr/bin/grpc_python_plugin";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// protoc + grpc_python_plugin over the three .proto files, into `out`.
fn generate(out: &Path) {
    for tool in [PYTHON, PLUGIN] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run scripts/setup.sh (python3-grpcio, python3-protobuf, protobuf-compiler-grpc)"
        );
    }
    let protos = repo().join("proto/proto");
    let st = Command::new("/usr/bin/protoc")
        .arg(format!("-I{}", protos.display()))
        .arg("-I/usr/include")
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg(format!("--plugin=protoc-gen-grpc_python={PLUGIN}"))
        .args([
            "flow/flow.proto",
            "relay/relay.proto",
            "observer/observer.proto",
        ])
        .current_dir(&protos)
        .status()
        .expect("protoc runs (scripts/setup.sh installs protobuf-compiler)");
    assert!(st.success(), "protoc failed: {st}");
}

async fn python_read(generated: &Path, cluster: &Cluster, number: u64, all: bool) -> Value {
    let (ca, cert, key) = cluster.operator_files();
    let mut cmd = tokio::process::Command::new(PYTHON);
    cmd.arg(repo().join("mesh-apiserver/tests/observer_client/observer_client.py"))
        .arg(generated)
        .arg(cluster.addr().to_string())
        .args([&ca, &cert, &key])
        .arg(number.to_string());
    if all {
        cmd.arg("all-clusters");
    }
    // Debian's python3 and its dist-packages, whatever python is first on PATH.
    cmd.env_remove("PYTHONPATH").env_remove("PYTHONHOME");
    let out = tokio::time::timeout(STEP, cmd.output())
        .await
        .expect("the python client returns")
        .expect("python runs");
    assert!(
        out.status.success(),
        "python client: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the client prints JSON")
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
    let generated = tempfile::tempdir().unwrap();
    generate(generated.path());

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
    let v = python_read(generated.path(), &east, 10, false).await;
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
        let v = python_read(generated.path(), &east, 10, true).await;
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
    let v = python_read(generated.path(), &east, 1, true).await;
    assert_eq!(flow_uuids(&v), ["east-other"]);
}
