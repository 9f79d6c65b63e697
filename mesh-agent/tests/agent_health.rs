//! Passive backend health on one node (DESIGN.md section 13b, issue #14 part 3): connects
//! to a backend that refuses them quarantine it on this node, so the next connections go to
//! the others without failing; while it stays dead the agent's own probes keep it
//! quarantined past its period, so no client connect reaches it again; once it answers, a
//! probe ends the quarantine and it returns; the last usable backends are never quarantined
//! away.
//!
//! Root only. Own etcd, apiserver, namespace, cgroup, bpffs and node network.

mod agent_support;

use std::time::Duration;

use agent_support::{Mesh, Net, Outcome, Proc, TARGET_PORT, exactly, targets, vip};
use mesh_proto::pb;

#[ctor::ctor(unsafe)]
fn child_process_entry() {
    agent_support::child_entry();
}

fn failed(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Err { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backends_are_quarantined_on_the_node_never_the_last() {
    require_root!();
    let mut mesh = Mesh::start("hlt", Net(42)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.start_agent(&[
        "--quarantine-base",
        "1s",
        "--quarantine-max",
        "2s",
        "--quarantine-probe-timeout",
        "500ms",
    ]);
    let all = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("affinity none", |d| exactly(d, &all)).await;
    let ok = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 20);
    assert_eq!(failed(&ok), 0);

    // east-n1's server stops: its address refuses connects (RST).
    drop(mesh.servers.remove(0));
    let during = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30);
    let failures = failed(&during);
    assert!(
        failures >= 1,
        "some connects reached the dead backend: {during:?}"
    );
    let rest = targets(&["10.1.2.11", "10.2.1.11"]);
    mesh.converge("east-n1 quarantined", |d| exactly(d, &rest))
        .await;
    let after = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 40);
    assert_eq!(
        failed(&after),
        0,
        "no connect fails once it is quarantined: {after:?}"
    );
    assert_eq!(mesh.metric("mesh_agent_backends_quarantined"), Some(1.0));
    assert!(mesh.metric("mesh_agent_backend_quarantines_total").unwrap() >= 1.0);
    let status = mesh
        .wait_agent_status("the quarantine reported", |s| !s.quarantines.is_empty())
        .await;
    assert_eq!(status.quarantines.len(), 1);
    assert_eq!(status.quarantines[0].ip, "10.1.1.11");
    assert_eq!(status.quarantines[0].port, u32::from(TARGET_PORT));
    assert!(status.quarantines[0].failures >= 1);
    // meshctl bpf lb list reads it from the pinned quarantine map.
    let q = mesh.datapath().quarantines().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(
        (q[0].ip.to_string(), q[0].port),
        ("10.1.1.11".to_string(), TARGET_PORT)
    );

    // The period is over and the backend is still dead: the agent's probe fails and the
    // quarantine goes on, so clients' connects still never reach it.
    let probe_failed = r#"mesh_agent_quarantine_probes_total{result="failure"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while mesh.metric(probe_failed).unwrap_or(0.0) < 2.0 {
        mesh.agent.as_mut().expect("agent").assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "no two failed probes in 30 s: {:?}",
            mesh.metric(probe_failed)
        );
        // Another process's state, read through its metrics: no event to await.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 40);
    assert_eq!(
        failed(&still),
        0,
        "no connect fails after the period while probes fail: {still:?}"
    );
    exactly(&mesh.dump(), &rest).expect("still quarantined after failed probes");
    assert_eq!(
        mesh.metric(r#"mesh_agent_quarantine_probes_total{result="success"}"#),
        Some(0.0)
    );

    // Back: the server answers again; the next probe connects, the quarantine ends and the
    // backend returns to the service.
    mesh.servers.push(Proc::server(
        &mesh.netns,
        &format!("10.1.1.11:{TARGET_PORT}"),
        "east-n1",
    ));
    mesh.converge("east-n1 back after its quarantine", |d| exactly(d, &all))
        .await;
    let back = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30);
    assert_eq!(failed(&back), 0);
    assert_eq!(mesh.metric("mesh_agent_backends_quarantined"), Some(0.0));
    assert!(
        mesh.metric(r#"mesh_agent_quarantine_probes_total{result="success"}"#)
            .unwrap()
            >= 1.0
    );

    // Every backend fails: none is quarantined away, the service keeps all three (a
    // quarantined backend is better than refusing every connection).
    mesh.servers.clear();
    let dead = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30);
    assert_eq!(failed(&dead), 30);
    // Give the agent several health rounds to act on the failures it has seen.
    for _ in 0..5 {
        let _ = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 5);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let d = mesh.dump();
        exactly(&d, &all).expect("all backends stay programmed");
    }
}
