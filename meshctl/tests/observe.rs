//! `meshctl observe` end to end against the real apiserver's relay (in-process, mutual
//! TLS, real etcd) and test Observer servers standing in for agents: the real meshctl
//! binary, its flags turned into filters the agents apply, `--last N` across nodes and
//! clusters, and each output format.

#[path = "../../mesh-apiserver/tests/relay_support/mod.rs"]
mod relay_support;

use std::process::Output;

use relay_support::*;
use serde_json::Value;

/// Runs meshctl observe against `cluster` with the operator's certificate.
async fn observe(cluster: &Cluster, flags: &[&str]) -> Output {
    let (ca, cert, key) = cluster.operator_files();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.arg("observe")
        .args(["--server", &cluster.addr().to_string()])
        .args(["--tls-ca", ca.to_str().unwrap()])
        .args(["--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", key.to_str().unwrap()])
        .args(["--cluster", &cluster.name])
        .args(flags)
        .env_remove("MESH_SERVER");
    let out = tokio::time::timeout(STEP, cmd.output())
        .await
        .expect("meshctl observe returns")
        .expect("meshctl runs");
    assert!(
        out.status.success(),
        "meshctl observe {flags:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn uuids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|v| v["flow"]["uuid"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_prints_flows_of_every_node_and_cluster_with_hubbles_flags() {
    let east = Cluster::start("east", 1, "10.1.0.0/16").await;
    let west = Cluster::start("west", 2, "10.2.0.0/16").await;
    east.peer_with(&west);
    west.peer_with(&east);
    let t = now_ms();
    let mut local = FlowSpec::egress(t + 10, "east/east-node2", "east", "10.1.2.4");
    local.uuid = "east-local".into();
    let e1 = TestAgent::start(
        &east.ca,
        "east-node1",
        vec![FlowSpec::egress(t, "east/east-node1", "west", "10.2.1.7").build()],
    )
    .await;
    let e2 = TestAgent::start(&east.ca, "east-node2", vec![local.build()]).await;
    let mut west_local = FlowSpec::egress(t + 20, "west/west-node1", "west", "10.2.1.8");
    west_local.source_ip = "10.2.1.9".into();
    west_local.source = endpoint("west", "default", "tie-fighter", "tie-fighter", 0x2_0200);
    west_local.uuid = "west-local".into();
    let w1 = TestAgent::start(
        &west.ca,
        "west-node1",
        vec![
            FlowSpec::ingress(t + 2, "west/west-node1", "west", "10.2.1.7")
                .denied("default", "deny-east")
                .build(),
            west_local.build(),
        ],
    )
    .await;
    east.report("east-node1", &e1.addr.to_string()).await;
    east.report("east-node2", &e2.addr.to_string()).await;
    west.report("west-node1", &w1.addr.to_string()).await;

    // This cluster's nodes, oldest first.
    let lines = json_lines(&observe(&east, &["-o", "json"]).await);
    assert_eq!(
        uuids(&lines),
        [format!("east/east-node1-{t}"), "east-local".into()],
        "{lines:#?}"
    );
    assert_eq!(lines[0]["node_name"], "east/east-node1");
    assert_eq!(lines[0]["flow"]["traffic_direction"], "EGRESS");
    assert_eq!(lines[0]["flow"]["verdict"], "FORWARDED");
    assert_eq!(
        lines[0]["flow"]["destination_service"]["name"],
        "rebel-base"
    );
    assert_eq!(lines[0]["flow"]["destination"]["cluster_name"], "west");

    // --last 1 across this cluster's two nodes.
    let lines = json_lines(&observe(&east, &["-o", "jsonpb", "--last", "1"]).await);
    assert_eq!(uuids(&lines), ["east-local"]);

    // --all-clusters: west's relay adds west's own flows (the peers directory is read
    // every 100 ms: poll until west is in); the cross-cluster pair is one flow naming
    // the cluster and rule that dropped it.
    let deadline = tokio::time::Instant::now() + STEP;
    let lines = loop {
        let lines = json_lines(&observe(&east, &["-o", "json", "--all-clusters"]).await);
        if uuids(&lines).contains(&"west-local".to_string()) {
            break lines;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        uuids(&lines),
        [
            format!("east/east-node1-{t}"),
            "east-local".into(),
            "west-local".into()
        ]
    );
    let joined = &lines[0]["flow"];
    assert_eq!(joined["verdict"], "DROPPED");
    assert_eq!(joined["drop_reason_desc"], "POLICY_DENY");
    assert_eq!(joined["ingress_denied_by"][0]["name"], "deny-east");
    assert_eq!(joined["source"]["cluster_name"], "east");
    assert_eq!(joined["destination"]["cluster_name"], "west");
    assert_eq!(
        joined["node_labels"],
        serde_json::json!([
            "mesh.io/egress-node=east/east-node1",
            "mesh.io/ingress-node=west/west-node1"
        ])
    );

    // --last 2 across clusters.
    let lines = json_lines(&observe(&east, &["-o", "json", "--all-clusters", "--last", "2"]).await);
    assert_eq!(uuids(&lines), ["east-local", "west-local"]);

    // Filters: --from-cluster west selects west's own flow only. Each agent filters its
    // own records: with --verdict DROPPED east's egress record (forwarded at connect) is
    // left out, and west's ingress record comes alone, naming west's node and rule.
    let lines = json_lines(
        &observe(
            &east,
            &["-o", "json", "--all-clusters", "--from-cluster", "west"],
        )
        .await,
    );
    assert_eq!(uuids(&lines), ["west-local"]);
    let lines = json_lines(
        &observe(
            &east,
            &[
                "-o",
                "json",
                "--all-clusters",
                "--from-pod",
                "default/x-wing",
                "--verdict",
                "DROPPED",
            ],
        )
        .await,
    );
    assert_eq!(
        uuids(&lines),
        [format!("west/west-node1-{}", t + 2)],
        "{lines:#?}"
    );
    assert_eq!(
        lines[0]["flow"]["ingress_denied_by"][0]["name"],
        "deny-east"
    );
    assert_eq!(lines[0]["node_name"], "west/west-node1");

    // The table names clusters as cluster/ns/pod and the rule.
    let out = observe(
        &east,
        &["-o", "table", "--all-clusters", "--verdict", "DROPPED"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = text.lines();
    let header: Vec<&str> = rows.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "TIMESTAMP",
            "SOURCE",
            "DESTINATION",
            "TYPE",
            "VERDICT",
            "SUMMARY"
        ]
    );
    let row = rows.next().expect("one row");
    assert!(row.contains("east/default/x-wing:"), "{row}");
    assert!(row.contains("west/default/rebel-base:80"), "{row}");
    assert!(row.contains("ingress"), "the server's record: {row}");
    assert!(row.contains("DROPPED"), "{row}");
    assert!(
        row.contains("ingress denied by CiliumNetworkPolicy default/deny-east"),
        "{row}"
    );
    assert!(rows.next().is_none(), "{text}");

    // Compact is the default.
    let out = observe(&east, &["--last", "1"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[east/east-node2]: east/default/x-wing -> east/default/rebel-base:80"),
        "{text}"
    );
}
