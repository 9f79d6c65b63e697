//! Flow visibility across clusters (issue 13), driven only with kubectl, mesh-lab and
//! `meshctl observe -o json`: requests from x-wing in east to the global rebel-base show the
//! source and destination cluster, the service and the verdict, each connection to west
//! once with both ends; `--last N` is N across nodes and clusters; with west's policy
//! denying east's x-wing, the dropped flow names the cluster, node and rule that dropped it.

mod e2e_support;
mod lab_support;

use std::time::{Duration, Instant};

use e2e_support::{Failures, Lab, require_root};
use serde_json::Value;

const STEP: Duration = Duration::from_secs(60);

fn observe(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["observe", "-o", "json"];
    a.extend_from_slice(args);
    lab.meshctl("east", &a)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn flows(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter_map(|l| l.get("flow")).collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_str()
        .unwrap_or_default()
}

fn has_label(f: &Value, label: &str) -> bool {
    f["node_labels"].as_array().is_some_and(|a| {
        a.iter()
            .any(|l| l.as_str().is_some_and(|l| l.starts_with(label)))
    })
}

/// Repeats `observe` until `ok` holds for its answer, or fails with the last one.
fn observe_until(
    lab: &Lab,
    args: &[&str],
    what: &str,
    ok: impl Fn(&[&Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + STEP;
    loop {
        let lines = observe(lab, args);
        if ok(&flows(&lines)) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: meshctl observe {args:?} never showed it; last answer:\n{}",
            lines
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn observe_shows_cross_cluster_flows_with_service_verdict_and_the_denying_rule() {
    require_root("observe_shows_cross_cluster_flows_with_service_verdict_and_the_denying_rule");
    let lab = Lab::up('o', 2, 2);
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
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );

    // x-wing's connections through the global service, as east's relay sees every cluster.
    let x_wing_tcp = [
        "--all-clusters",
        "--from-pod",
        "demo/x-wing",
        "--protocol",
        "tcp",
        "--last",
        "200",
    ];
    let lines = observe_until(&lab, &x_wing_tcp, "a connection to each cluster", |fs| {
        ["east", "west"].iter().all(|c| {
            fs.iter().any(|f| {
                s(f, &["destination", "cluster_name"]) == *c
                    && has_label(f, "mesh.io/ingress-node=")
            })
        })
    });
    for f in flows(&lines) {
        assert_eq!(s(f, &["source", "cluster_name"]), "east", "{f}");
        assert_eq!(s(f, &["source", "namespace"]), "demo", "{f}");
    }
    let to_west = flows(&lines)
        .into_iter()
        .find(|f| {
            s(f, &["destination", "cluster_name"]) == "west"
                && has_label(f, "mesh.io/ingress-node=")
        })
        .unwrap();
    // One flow with both ends: east's egress (the service it went through) and west's
    // ingress node.
    assert_eq!(s(to_west, &["verdict"]), "FORWARDED", "{to_west}");
    assert_eq!(s(to_west, &["traffic_direction"]), "EGRESS", "{to_west}");
    assert_eq!(s(to_west, &["destination_service", "name"]), "rebel-base");
    assert_eq!(s(to_west, &["destination_service", "namespace"]), "demo");
    assert!(s(to_west, &["destination", "pod_name"]).starts_with("rebel-base-"));
    assert!(
        s(to_west, &["node_name"]).starts_with("east/east-node"),
        "{to_west}"
    );
    assert!(
        has_label(to_west, "mesh.io/ingress-node=west/west-node"),
        "{to_west}"
    );
    assert_eq!(to_west["l4"]["TCP"]["destination_port"], 8080);

    // --last N is N in total across nodes and clusters: with a fixed --until the answer is
    // the newest N of the longer answer.
    let until = lines.last().unwrap()["time"].as_str().unwrap().to_owned();
    let long = observe(&lab, &["--all-clusters", "--until", &until, "--last", "60"]);
    let short = observe(&lab, &["--all-clusters", "--until", &until, "--last", "5"]);
    let uuid = |v: &Value| v["flow"]["uuid"].as_str().unwrap().to_owned();
    let long_flows: Vec<String> = long
        .iter()
        .filter(|l| l.get("flow").is_some())
        .map(uuid)
        .collect();
    let short_flows: Vec<String> = short
        .iter()
        .filter(|l| l.get("flow").is_some())
        .map(uuid)
        .collect();
    assert_eq!(short_flows.len(), 5, "{short:#?}");
    assert_eq!(
        short_flows,
        long_flows[long_flows.len() - 5..],
        "the newest 5 overall"
    );
    // The answer holds records of nodes of both clusters: a flow's own node, or the node of
    // the other end joined into it (a connection from east to west is one flow with east's
    // node name and west's node as its ingress node).
    let nodes: std::collections::BTreeSet<&str> = long
        .iter()
        .filter_map(|l| l["node_name"].as_str())
        .chain(flows(&long).into_iter().flat_map(|f| {
            f["node_labels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str())
                .filter_map(|l| {
                    l.strip_prefix("mesh.io/ingress-node=")
                        .or_else(|| l.strip_prefix("mesh.io/egress-node="))
                })
        }))
        .collect();
    assert!(
        nodes.iter().any(|n| n.starts_with("east/"))
            && nodes.iter().any(|n| n.starts_with("west/")),
        "60 flows with records of nodes of both clusters: {nodes:?}"
    );
    let times: Vec<&str> = long.iter().filter_map(|l| l["time"].as_str()).collect();
    assert!(times.is_sorted(), "time order: {times:?}");

    // West denies east's x-wing at rebel-base's ingress: east's connections to west are
    // dropped on west's nodes, and the flow names west's node and the rule.
    lab.kubectl(
        "west",
        &[
            "apply",
            "-f",
            &format!(
                "{}/../examples/lab-demo/policy/rebel-base-deny-east.yaml",
                env!("CARGO_MANIFEST_DIR")
            ),
        ],
    );
    let dropped_args = [
        "--all-clusters",
        "--from-pod",
        "demo/x-wing",
        "--verdict",
        "DROPPED",
        "--last",
        "50",
    ];
    let deadline = Instant::now() + STEP;
    let lines = loop {
        // Some of these go to west and time out: the policy is doing its job.
        let _ = lab.requests("east", "rebel-base", "cluster", 6);
        let lines = observe(&lab, &dropped_args);
        if !flows(&lines).is_empty() {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "no dropped flow after the deny policy"
        );
    };
    let dropped = flows(&lines)[0];
    assert_eq!(s(dropped, &["verdict"]), "DROPPED", "{dropped}");
    assert_eq!(
        s(dropped, &["drop_reason_desc"]),
        "POLICY_DENY",
        "{dropped}"
    );
    let rule = &dropped["ingress_denied_by"][0];
    assert_eq!(rule["name"], "rebel-base-deny-east-x-wing", "{dropped}");
    assert_eq!(rule["namespace"], "demo");
    assert_eq!(rule["kind"], "CiliumNetworkPolicy");
    assert!(
        s(dropped, &["node_name"]).starts_with("west/west-node"),
        "{dropped}"
    );
    assert_eq!(s(dropped, &["destination", "cluster_name"]), "west");
    assert_eq!(s(dropped, &["source", "cluster_name"]), "east");

    // Without the verdict filter the same connection is one flow with both ends: the
    // client's egress in east, west's drop and rule.
    let lines = observe(&lab, &x_wing_tcp);
    let joined_drop = flows(&lines)
        .into_iter()
        .find(|f| s(f, &["verdict"]) == "DROPPED" && has_label(f, "mesh.io/ingress-node=west/"))
        .unwrap_or_else(|| panic!("no joined dropped flow in {lines:#?}"));
    assert_eq!(
        joined_drop["ingress_denied_by"][0]["name"],
        "rebel-base-deny-east-x-wing"
    );
    assert!(has_label(joined_drop, "mesh.io/egress-node=east/"));
    assert_eq!(
        s(joined_drop, &["destination_service", "name"]),
        "rebel-base"
    );
}
