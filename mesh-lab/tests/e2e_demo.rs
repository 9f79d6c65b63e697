//! The Cluster Mesh demo (scripts/demo.sh), every step asserted on the replies x-wing gets
//! from rebel-base: a two-cluster lab driven with kubectl and the mesh-lab CLI.

mod e2e_support;
mod lab_support;

use std::time::Duration;

use e2e_support::{Failures, Lab, require_root};

const STEP: Duration = Duration::from_secs(60);

#[test]
fn cluster_mesh_demo() {
    require_root("cluster_mesh_demo");
    let lab = Lab::up('d', 2, 2);
    assert_eq!(lab.clusters, ["east", "west"]);
    for c in ["east", "west"] {
        lab.apply_example(c, "rebel-base.yaml");
        lab.apply_example(c, "x-wing.yaml");
    }
    lab.apply_example("east", "echo.yaml");
    for c in ["east", "west"] {
        lab.rollout(c, "rebel-base");
        lab.rollout(c, "x-wing");
    }
    lab.rollout("east", "echo");

    // The cluster DNS is a pod with CoreDNS's identity, behind the kube-dns Service: the
    // names every step below resolves (`rebel-base.demo`) are answered by it.
    for c in ["east", "west"] {
        lab.kubectl(
            c,
            &[
                "-n",
                "kube-system",
                "rollout",
                "status",
                "deployment/coredns",
                "--timeout=90s",
            ],
        );
        let pod_ip = lab.kubectl(
            c,
            &[
                "-n",
                "kube-system",
                "get",
                "pods",
                "-l",
                "k8s-app=kube-dns",
                "-o",
                "jsonpath={.items[0].status.podIP}",
            ],
        );
        let slices = lab.kubectl(
            c,
            &[
                "-n",
                "kube-system",
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=kube-dns",
                "-o",
                "jsonpath={.items[*].endpoints[*].addresses[*]}",
            ],
        );
        assert!(
            !pod_ip.is_empty() && slices.split_whitespace().any(|a| a == pod_ip),
            "{c}: kube-dns endpoints {slices:?} hold the coredns pod {pod_ip:?}"
        );
    }

    // 1. A plain Service: the cluster's own service proxy, local backends only.
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east"],
        STEP,
        Failures::Forbidden,
    );
    lab.converge(
        "west",
        "rebel-base",
        "cluster",
        &["west"],
        STEP,
        Failures::Forbidden,
    );
    // Both local pods answer, so the plain Service really balances.
    let pods = lab.pods("east", "rebel-base");
    assert_eq!(pods.len(), 2);
    let by_pod = lab.converge(
        "east",
        "rebel-base",
        "pod",
        &pods.iter().map(String::as_str).collect::<Vec<_>>(),
        STEP,
        Failures::Forbidden,
    );
    assert_eq!(by_pod.counts.values().sum::<usize>(), 20);

    // 2. Global on both sides: both clusters answer, from both sides.
    for c in ["east", "west"] {
        lab.kubectl(
            c,
            &[
                "-n",
                "demo",
                "annotate",
                "service",
                "rebel-base",
                "service.cilium.io/global=true",
                "--overwrite",
            ],
        );
    }
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );
    lab.converge(
        "west",
        "rebel-base",
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );

    // The service map of x-wing's node, read with meshctl in the environment of
    // `mesh-lab env east` (MESH_BPFFS_ROOT): rebel-base's ClusterIP has backends of both
    // clusters (east is cluster 1, west 2). The replies above came through this map.
    let xwing_node = lab
        .pod_nodes("east", "x-wing")
        .into_iter()
        .next()
        .expect("x-wing's node");
    let vip = lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "get",
            "service",
            "rebel-base",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    let rows: serde_json::Value = serde_json::from_str(&lab.meshctl(
        "east",
        &["bpf", "lb", "list", "--node", &xwing_node, "-o", "json"],
    ))
    .expect("meshctl bpf lb list -o json");
    let frontend = format!("{}:80/TCP", vip.trim());
    let clusters: std::collections::BTreeSet<u64> = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["service"] == frontend.as_str())
        .filter_map(|r| r["cluster_id"].as_u64())
        .collect();
    assert_eq!(
        clusters,
        [1, 2].into(),
        "backends of {frontend} on {xwing_node}: {rows:#}"
    );

    // kubectl logs of lab pods: west's rebel-base logged the requests of east's x-wing
    // (its client address is in east's pod CIDR 10.1.0.0/16).
    let west_logs: Vec<String> = lab
        .pods("west", "rebel-base")
        .iter()
        .map(|p| lab.kubectl("west", &["-n", "demo", "logs", p]))
        .collect();
    assert!(
        west_logs.iter().flat_map(|l| l.lines()).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 4 && f[1].starts_with("10.1.") && f[2..5] == ["\"GET", "/\"", "200"]
        }),
        "no request of east's x-wing in west's rebel-base logs: {west_logs:#?}"
    );

    // 3. Affinity local in east: only east answers east's x-wing; west still sees both.
    lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "annotate",
            "service",
            "rebel-base",
            "service.cilium.io/affinity=local",
            "--overwrite",
        ],
    );
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east"],
        STEP,
        Failures::Forbidden,
    );
    lab.converge(
        "west",
        "rebel-base",
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );

    // 4. Failover: east's rebel-base scaled to 0 with kubectl, west answers; and back.
    lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "scale",
            "deployment",
            "rebel-base",
            "--replicas=0",
        ],
    );
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["west"],
        STEP,
        Failures::Forbidden,
    );
    lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "scale",
            "deployment",
            "rebel-base",
            "--replicas=2",
        ],
    );
    lab.rollout("east", "rebel-base");
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east"],
        STEP,
        Failures::Forbidden,
    );

    // 5. Affinity remote in east: only west answers east's x-wing.
    lab.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "annotate",
            "service",
            "rebel-base",
            "service.cilium.io/affinity=remote",
            "--overwrite",
        ],
    );
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["west"],
        STEP,
        Failures::Forbidden,
    );

    // 6. internalTrafficPolicy: echo-1 (Cluster) spreads over both nodes, echo-2 (Local)
    //    answers only from x-wing's node.
    let echo_nodes = lab.pod_nodes("east", "echo");
    assert_eq!(echo_nodes.len(), 2, "one echo pod per node: {echo_nodes:?}");
    lab.converge(
        "east",
        "echo-1",
        "node",
        &echo_nodes.iter().map(String::as_str).collect::<Vec<_>>(),
        STEP,
        Failures::Forbidden,
    );
    lab.converge(
        "east",
        "echo-2",
        "node",
        &[xwing_node.as_str()],
        STEP,
        Failures::Forbidden,
    );

    // The operator's view: status green, and explain names why west's... and east's
    // backends are selected or left out under affinity remote.
    let status = lab.meshctl("east", &["status"]);
    assert!(
        status.contains("west"),
        "meshctl status names the peer: {status}"
    );
    let explain = lab.meshctl(
        "east",
        &[
            "service",
            "explain",
            "demo/rebel-base",
            "--node",
            &xwing_node,
        ],
    );
    assert!(
        explain.contains("west") && explain.contains("affinity"),
        "explain: {explain}"
    );
}
