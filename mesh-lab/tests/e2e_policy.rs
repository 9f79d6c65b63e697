//! Network policy across clusters, driven only with kubectl and meshctl (issue #12): Cilium's
//! Cluster Mesh example (x-wing may reach rebel-base only in west) sends every connection to
//! an allowed backend; the same rule without the cluster label stays in the local cluster; a
//! deny beats the allow; removing the policies opens the service again.
//!
//! Requests go to rebel-base's ClusterIP; `e2e_policy_names.rs` covers names resolved through
//! the lab DNS under an egress default deny with the DNS allowance.

mod e2e_support;
mod lab_support;

use std::time::Duration;

use e2e_support::{Failures, Lab, counts, require_root};

const STEP: Duration = Duration::from_secs(60);

fn policy_file(name: &str) -> String {
    format!(
        "{}/../examples/lab-demo/policy/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Applies a policy given as YAML text through kubectl (stdin).
fn apply_yaml(lab: &Lab, cluster: &str, yaml: &str) {
    let path = std::env::temp_dir().join(format!("mesh-e2e-policy-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    lab.kubectl(cluster, &["apply", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn policies_span_clusters_and_steer_service_connections() {
    require_root("policies_span_clusters_and_steer_service_connections");
    let lab = Lab::up('p', 2, 1);
    for c in ["east", "west"] {
        lab.apply_example(c, "rebel-base.yaml");
        lab.kubectl(
            c,
            &[
                "-n",
                "demo",
                "annotate",
                "service",
                "rebel-base",
                "service.cilium.io/global=true",
            ],
        );
    }
    lab.apply_example("east", "x-wing.yaml");
    for c in ["east", "west"] {
        lab.rollout(c, "rebel-base");
    }
    lab.rollout("east", "x-wing");
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
    lab.converge(
        "east",
        &vip,
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );

    // Cilium's cluster-mesh example: x-wing may reach rebel-base only in west. Every
    // connection goes to west (none is refused on an east backend).
    lab.kubectl(
        "east",
        &["apply", "-f", &policy_file("x-wing-to-west.yaml")],
    );
    let c = lab.converge(
        "east",
        &vip,
        "cluster",
        &["west"],
        STEP,
        Failures::Tolerated,
    );
    let steady = lab.replies("east", &vip, "cluster", 40);
    assert_eq!(
        counts(&steady).get("west"),
        Some(&40),
        "{:?} (converged {c:?})",
        counts(&steady)
    );

    // meshctl policy check says why east's rebel-base is refused (exit code 1 = deny).
    let xwing = lab.pods("east", "x-wing").into_iter().next().unwrap();
    let east_rebel = lab.pods("east", "rebel-base").into_iter().next().unwrap();
    let west_rebel = lab.pods("west", "rebel-base").into_iter().next().unwrap();
    let check = |to: &str| {
        lab.meshctl_status(
            "east",
            &[
                "policy",
                "check",
                "--from",
                &format!("east/demo/{xwing}"),
                "--to",
                to,
                "--port",
                "8080/TCP",
            ],
        )
    };
    let (code, out) = check(&format!("east/demo/{east_rebel}"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("default deny"), "{out}");
    // To west: east's egress allows it; west's ingress is west's to decide (exit 2: only
    // west's apiserver serves west's policies).
    let (code, out) = check(&format!("west/demo/{west_rebel}"));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            "Egress:  allow by CiliumNetworkPolicy east/demo/x-wing-to-rebel-base-in-west"
        ),
        "{out}"
    );

    // The node's policy map shows the rule and counts the connections it allowed.
    let node = lab.pod_nodes("east", "x-wing").into_iter().next().unwrap();
    let bpf = lab.meshctl("east", &["bpf", "policy", "list", "--node", &node]);
    let allowed = bpf
        .lines()
        .find(|l| l.contains("8080/TCP") && l.contains("spec.egress[0]"))
        .unwrap_or_else(|| panic!("no allow row in\n{bpf}"));
    let packets: u64 = allowed.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert!(packets >= 40, "{bpf}");

    // The same rule without the cluster label selects only the local cluster.
    let local_only = std::fs::read_to_string(policy_file("x-wing-to-west.yaml"))
        .unwrap()
        .replace("        io.cilium.k8s.policy.cluster: west\n", "");
    apply_yaml(&lab, "east", &local_only);
    lab.converge(
        "east",
        &vip,
        "cluster",
        &["east"],
        STEP,
        Failures::Tolerated,
    );
    let steady = lab.replies("east", &vip, "cluster", 40);
    assert_eq!(
        counts(&steady).get("east"),
        Some(&40),
        "{:?}",
        counts(&steady)
    );

    // A deny beats the allow: with east's rebel-base denied too, nothing is left.
    apply_yaml(
        &lab,
        "east",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-rebel-base, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: x-wing}}
  egressDeny:
  - toEndpoints:
    - matchLabels: {app: rebel-base}
"#,
    );
    lab.converge(
        "east",
        &vip,
        "cluster",
        &[e2e_support::FAILED],
        STEP,
        Failures::Tolerated,
    );

    // Without policies, both clusters answer again.
    lab.kubectl(
        "east",
        &["-n", "demo", "delete", "ciliumnetworkpolicy", "--all"],
    );
    lab.converge(
        "east",
        &vip,
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Tolerated,
    );
}
