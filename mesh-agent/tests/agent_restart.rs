//! The agent is killed (SIGKILL) and restarted while a client keeps connecting to a global
//! service: no connection fails, and after the restart the maps hold exactly the desired
//! state — what changed in etcd while the agent was down is applied, nothing is left over,
//! and only the difference is written.
//!
//! Root only (skips otherwise).

mod agent_support;

use std::collections::BTreeMap;
use std::net::IpAddr;

use agent_support::{
    Mesh, Net, Proc, VIP, answered, backend, exactly, identity, targets, vip, web,
};
use ipnet::IpNet;
use mesh_proto::pb::{self, Kind};

#[ctor::ctor(unsafe)]
fn child_process_entry() {
    agent_support::child_entry();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_keeps_serving_and_converges_to_exactly_the_desired_state() {
    require_root!();
    let mut mesh = Mesh::start("rst", Net(21)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.backend("10.1.1.12", agent_support::TARGET_PORT, "east-n1b");
    mesh.start_agent(&[]);
    let before = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("first start", |d| exactly(d, &before)).await;

    // 300 connections, 10 ms apart, across the kill, the changes and the restart.
    let mut client = Proc::connect_loop(&mesh.netns, &mesh.cgroup, vip(), 300, 10);
    mesh.kill_agent();

    // While the agent is down: node-2's pod goes away, a second pod starts on node-1.
    let net = mesh.net;
    mesh.delete("east", Kind::Endpoint, "10.1.2.11").await;
    mesh.put_endpoint("east", "10.1.1.12", identity(1, 257), "node-1", net.host(2))
        .await;
    mesh.put_identity("east", identity(1, 257), "web2").await;
    mesh.put_service(&web(
        "east",
        VIP,
        pb::Affinity::None,
        vec![
            backend("10.1.1.11", "node-1", true),
            backend("10.1.1.12", "node-1", true),
        ],
    ))
    .await;
    // The pinned maps still serve the old state with no agent running.
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 20));
    assert!(
        seen.contains("east-n2"),
        "old state still served while down: {seen:?}"
    );

    mesh.start_agent(&[]);
    let after = targets(&["10.1.1.11", "10.1.1.12", "10.2.1.11"]);
    mesh.converge("after restart", |d| exactly(d, &after)).await;

    // The ipcache holds exactly the node IPs and the endpoints that exist now.
    let host = |n| IpAddr::V4(net.host(n));
    let want: BTreeMap<IpNet, (u32, Option<IpAddr>)> = [
        (host(2), (1, None)),
        (host(3), (6, None)),
        (host(4), (6, None)),
        (
            "10.1.1.11".parse().unwrap(),
            (identity(1, 256), Some(host(2))),
        ),
        (
            "10.1.1.12".parse().unwrap(),
            (identity(1, 257), Some(host(2))),
        ),
        (
            "10.2.1.11".parse().unwrap(),
            (identity(2, 256), Some(host(4))),
        ),
    ]
    .into_iter()
    .map(|(ip, v)| (IpNet::from(ip), v))
    .collect();
    mesh.converge("ipcache after restart", |d| {
        let got: BTreeMap<IpNet, (u32, Option<IpAddr>)> = d
            .ipcache
            .iter()
            .map(|(k, v)| (*k, (v.identity, v.tunnel_endpoint.map(IpAddr::V4))))
            .collect();
        if got == want {
            Ok(())
        } else {
            Err(format!("ipcache {got:?}, want {want:?}"))
        }
    })
    .await;

    let results = client.results();
    assert_eq!(results.len(), 300);
    let seen = answered(&results);
    assert!(
        seen.contains("east-n1b"),
        "the new backend served after the restart: {seen:?}"
    );

    // The restarted agent wrote only the difference: one backend in, one out, one slot
    // rewritten, one ipcache entry in and one out; the master entry was never touched.
    let ops = |op: &str| {
        let series = format!("mesh_agent_map_operations_total{{op=\"{op}\"}}");
        mesh.metric(&series)
            .unwrap_or_else(|| panic!("the agent exports no {series}"))
    };
    assert_eq!(ops("backend_upsert"), 1.0);
    assert_eq!(ops("backend_delete"), 1.0);
    assert_eq!(ops("slot_upsert"), 1.0);
    assert_eq!(ops("master_upsert"), 0.0);
    assert_eq!(ops("master_delete"), 0.0);
    assert_eq!(ops("ipcache_upsert"), 1.0);
    assert_eq!(ops("ipcache_delete"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_changes_nothing_until_the_local_cluster_is_synced() {
    require_root!();
    let mut mesh = Mesh::start("gate", Net(22)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.start_agent(&[]);
    let before = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("first start", |d| exactly(d, &before)).await;
    let pinned = mesh.dump();
    mesh.kill_agent();

    // The restarted agent sees a snapshot in which `east` has not finished its initial
    // sync, and whose service lost a backend.
    mesh.unmark_synced("east").await;
    mesh.put_service(&web(
        "east",
        VIP,
        pb::Affinity::None,
        vec![backend("10.1.1.11", "node-1", true)],
    ))
    .await;
    mesh.start_agent(&[]);
    // Once /readyz names the missing sync, the agent has processed the snapshot.
    let deadline = std::time::Instant::now() + agent_support::CONVERGE;
    loop {
        let ready = mesh.agent_http("/readyz");
        if ready.contains("waiting for the initial sync of cluster east") {
            assert!(ready.lines().next().unwrap().contains(" 503 "), "{ready}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "readyz: {ready}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(mesh.dump(), pinned, "nothing changed before the sync");
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30));
    assert!(seen.contains("east-n2"), "{seen:?}");

    mesh.mark_synced("east").await;
    let after = targets(&["10.1.1.11", "10.2.1.11"]);
    mesh.converge("after the sync", |d| exactly(d, &after))
        .await;
}

/// Once the agent programs, a cluster that has never synced (a peer's first snapshot on its
/// way) is left out of the maps: its objects arriving cost no reconcile, only a status
/// report with their counts; its markers bring it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_still_syncing_costs_no_reconcile_and_joins_once_synced() {
    require_root!();
    let mut mesh = Mesh::start("join", Net(24)).await;
    let net = mesh.net;
    // The local backend is on another node: a pod of this node without a network
    // namespace would have the agent reconcile every second until it appears.
    mesh.put_config("east", 1, "10.1.0.0/16").await;
    mesh.put_node("east", "node-1", net.host(2), "10.1.1.0/24")
        .await;
    mesh.put_node("east", "node-2", net.host(3), "10.1.2.0/24")
        .await;
    mesh.put_identity("east", identity(1, 256), "web").await;
    mesh.put_endpoint("east", "10.1.2.11", identity(1, 256), "node-2", net.host(3))
        .await;
    mesh.put_service(&web(
        "east",
        VIP,
        pb::Affinity::None,
        vec![backend("10.1.2.11", "node-2", true)],
    ))
    .await;
    mesh.backend("10.1.2.11", agent_support::TARGET_PORT, "east-n2");
    mesh.mark_synced("east").await;
    mesh.start_agent(&[]);
    let east_only = targets(&["10.1.2.11"]);
    mesh.converge("east alone", |d| exactly(d, &east_only))
        .await;
    let before = reconciles(&mesh);
    let programmed = mesh.dump();

    // west's objects, without its markers.
    agent_support::west_unsynced(&mut mesh, pb::Affinity::None).await;
    // The status report counts them (the agent has applied every one of them)...
    mesh.wait_agent_status("west's objects counted", |s| {
        s.clusters
            .iter()
            .any(|w| w.cluster == "west" && !w.synced && w.endpoints == 1 && w.services == 1)
    })
    .await;
    // ...while no reconcile ran and the maps are as they were.
    assert_eq!(
        reconciles(&mesh),
        before,
        "reconciles for a cluster left out"
    );
    assert_eq!(mesh.dump(), programmed, "the maps changed");

    mesh.mark_synced("west").await;
    let both = targets(&["10.1.2.11", "10.2.1.11"]);
    mesh.converge("west joined", |d| exactly(d, &both)).await;
    assert!(reconciles(&mesh) > before);
}

/// How many reconciles the agent has run.
fn reconciles(mesh: &Mesh) -> f64 {
    mesh.metric("mesh_agent_reconcile_duration_seconds_count")
        .expect("the agent exports its reconcile count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_resumes_after_an_apiserver_restart_and_misses_no_delete() {
    require_root!();
    let mut mesh = Mesh::start("apr", Net(23)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.start_agent(&[]);
    let before = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("first start", |d| exactly(d, &before)).await;

    // The apiserver goes away; the datapath keeps serving.
    mesh.stop_apiserver().await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30));
    assert_eq!(seen.len(), 3, "{seen:?}");

    // What changes meanwhile (a remote backend is deleted) arrives after the restart.
    mesh.put_service(&web("west", "10.97.0.10", pb::Affinity::None, vec![]))
        .await;
    mesh.delete("west", Kind::Endpoint, "10.2.1.11").await;
    mesh.start_apiserver().await;
    let after = targets(&["10.1.1.11", "10.1.2.11"]);
    mesh.converge("after the apiserver restart", |d| {
        exactly(d, &after)?;
        let gone = IpNet::from(IpAddr::from([10, 2, 1, 11]));
        match d.ipcache.contains_key(&gone) {
            false => Ok(()),
            true => Err(format!("{gone} still in the ipcache")),
        }
    })
    .await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 20));
    assert!(!seen.contains("west-w1"), "{seen:?}");
    let reconnects = mesh.metric("mesh_agent_watch_reconnects_total");
    assert!(reconnects.is_some_and(|r| r >= 1.0), "{reconnects:?}");
    mesh.agent.as_mut().unwrap().assert_running();
}
