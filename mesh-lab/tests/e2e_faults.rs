//! Faults on a two-cluster lab, each driven with the mesh-lab CLI and kubectl: an agent
//! restarted during traffic (no failed request), a peer apiserver killed while its cluster
//! changes (converges, no stale backend), and a partition between the clusters (peer shown
//! disconnected and stale, then converged after heal).

mod e2e_support;
mod lab_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e_support::{Failures, Lab, counts, require_root};

const STEP: Duration = Duration::from_secs(60);

fn annotate(lab: &Lab, cluster: &str, kv: &str) {
    lab.kubectl(
        cluster,
        &[
            "-n",
            "demo",
            "annotate",
            "service",
            "rebel-base",
            kv,
            "--overwrite",
        ],
    );
}

#[test]
fn faults_agent_apiserver_partition() {
    require_root("faults_agent_apiserver_partition");
    let lab = Lab::up('f', 2, 2);
    for c in ["east", "west"] {
        lab.apply_example(c, "rebel-base.yaml");
        lab.apply_example(c, "x-wing.yaml");
        annotate(&lab, c, "service.cilium.io/global=true");
    }
    for c in ["east", "west"] {
        lab.rollout(c, "rebel-base");
        lab.rollout(c, "x-wing");
    }
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["east", "west"],
        STEP,
        Failures::Forbidden,
    );

    // Agent restart on x-wing's node during traffic: the whole restart window (kill ->
    // the new agent process started and synced with every cluster) lies inside the
    // traffic, and not one request of it fails.
    let node = lab
        .pod_nodes("east", "x-wing")
        .into_iter()
        .next()
        .expect("x-wing's node");
    let agent = format!("agent/{node}");
    let mut stream = lab.spawn_requests("east", "rebel-base", 1000);
    // The first reply: traffic is flowing before the agent is killed.
    let first = stream.next_reply("cluster").expect("a first reply");
    let killed_at = unix_ms();
    lab.lab(&["kill", "east", &agent]);
    lab.lab(&["start", "east", &agent]);
    let ready_at = wait_agent_restarted(&lab, "east", &node, killed_at);
    let mut replies = vec![first];
    replies.extend(stream.finish("cluster"));
    let during = replies
        .iter()
        .filter(|r| r.at_ms > killed_at && r.at_ms < ready_at)
        .count();
    let after = replies.iter().filter(|r| r.at_ms > ready_at).count();
    let values: Vec<String> = replies
        .iter()
        .map(|r| r.value.clone().unwrap_or_else(|| "(failed)".into()))
        .collect();
    let c = counts(&values);
    eprintln!(
        "{} requests across an agent restart ({} ms from kill to synced): {during} during \
         the restart, {after} after; {c:?}",
        replies.len(),
        ready_at - killed_at
    );
    assert!(during > 0, "no request was sent while the agent restarted");
    assert!(after > 0, "the traffic did not outlast the agent restart");
    assert!(
        !c.contains_key("(failed)"),
        "no failed request across the agent restart: {c:?}"
    );

    // West's apiserver killed; west changes while it is down; east converges after the
    // restart to exactly west's pods, with no stale backend (a request to one would fail).
    annotate(&lab, "east", "service.cilium.io/affinity=remote");
    lab.converge(
        "east",
        "rebel-base",
        "cluster",
        &["west"],
        STEP,
        Failures::Forbidden,
    );
    lab.lab(&["kill", "west", "apiserver"]);
    lab.scale("west", "rebel-base", 1);
    let west_pods = wait_pods(&lab, "west", 1);
    lab.lab(&["start", "west", "apiserver"]);
    let want: Vec<&str> = west_pods.iter().map(String::as_str).collect();
    lab.converge(
        "east",
        "rebel-base",
        "pod",
        &want,
        STEP,
        Failures::Tolerated,
    );

    // Partition: east sees west disconnected and stale; west scales up meanwhile; after
    // heal east converges to exactly west's new pods.
    lab.lab(&["partition", "east", "west"]);
    let deadline = Instant::now() + STEP;
    loop {
        let p = lab.peer_status("east", "west");
        if p["connected"] == false && p["stale_for_seconds"].is_u64() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never shown disconnected and stale: {p}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.scale("west", "rebel-base", 2);
    lab.rollout("west", "rebel-base");
    let west_pods = wait_pods(&lab, "west", 2);
    lab.lab(&["heal"]);
    // The importer reconnects with capped exponential backoff (at most 30 s plus jitter).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let p = lab.peer_status("east", "west");
        if p["connected"] == true && p["synced"] == true {
            eprintln!("after heal: {p}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never connected again after heal: {p}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let want: Vec<&str> = west_pods.iter().map(String::as_str).collect();
    lab.converge(
        "east",
        "rebel-base",
        "pod",
        &want,
        STEP,
        Failures::Tolerated,
    );
    let p = lab.peer_status("east", "west");
    assert_eq!(p["connected"], true, "west still connected: {p}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Waits until `meshctl status` shows the agent of `node` started after `since` (Unix ms)
/// and synced with every cluster; returns when that was seen (Unix ms).
fn wait_agent_restarted(lab: &Lab, cluster: &str, node: &str, since: u64) -> u64 {
    let deadline = Instant::now() + STEP;
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&lab.meshctl(cluster, &["status", "-o", "json"]))
                .expect("status JSON");
        let agent = v["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["node"] == node).cloned());
        if let Some(a) = &agent {
            let started = a["started_at_unix_ms"].as_u64().unwrap_or(0);
            let unsynced = a["unsynced_clusters"].as_array().map_or(1, Vec::len);
            if started > since && unsynced == 0 {
                return unix_ms();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent of {node} never came back synced: {agent:?}"
        );
        // Another process's state, read through the users' tool: no event to await.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the cluster has exactly `n` rebel-base pods and returns their names.
fn wait_pods(lab: &Lab, cluster: &str, n: usize) -> BTreeSet<String> {
    let deadline = Instant::now() + STEP;
    loop {
        let pods = lab.pods(cluster, "rebel-base");
        if pods.len() == n {
            return pods;
        }
        assert!(
            Instant::now() < deadline,
            "{cluster}: rebel-base pods {pods:?}, want {n}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
