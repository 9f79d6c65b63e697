//! The fault matrix on the agent's stream (issue 16 part 3), each fault with churn running
//! (pods created and deleted, services scaled, annotations changed, services deleted) and
//! the watch-history checker on the agent's stream (its own recording, checked against
//! etcd's history), then the agent's maps compared with the maps computed from etcd: no
//! missed delete, no stale entry. Each test prints the checker's verdict per stream.
//!
//! Real etcd, the real apiserver (serving side, in this process, mutual TLS), the real agent
//! binary in a network namespace. Root only.

mod agent_support;

use agent_support::history::{
    await_churn, await_record, converge_and_check, read_history, records, start_churn,
    start_recorded_agent,
};
use agent_support::{Mesh, Net, Proc, answered, vip};
use mesh_proto::pb::{self, watch_response::Payload};
use mesh_proto::record::Record;

#[ctor::ctor(unsafe)]
fn child_process_entry() {
    agent_support::child_entry();
}

/// A mesh of two clusters with churn data, the agent started with its recording, first
/// sync checked.
async fn start(tag: &str, net: u8) -> Mesh {
    let mut mesh = Mesh::start(tag, Net(net)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    start_recorded_agent(&mut mesh);
    converge_and_check(&mesh, "first sync", None)
        .await
        .assert_ok();
    mesh
}

fn is_lost(r: &Record) -> bool {
    matches!(r, Record::Lost(_))
}

fn is_resumed_open(r: &Record) -> bool {
    matches!(r, Record::Opened(req) if req.resume_revision > 0)
}

fn is_reset(r: &Record) -> bool {
    matches!(r, Record::Message(m) if matches!(m.payload, Some(Payload::Reset(_))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restart_under_churn() {
    require_root!();
    let mut mesh = start("hap", 51).await;
    let churn = start_churn(&mesh, 51);
    await_churn(&churn, 50).await;
    let mark = records(&mesh).len();
    mesh.stop_apiserver().await;
    await_record(&mesh, mark, "the stream lost", is_lost).await;
    await_churn(&churn, 50).await;
    mesh.start_apiserver().await;
    // The restarted apiserver resumes the agent from etcd at its revision (no snapshot).
    await_record(&mesh, mark, "a resumed stream", is_resumed_open).await;
    await_churn(&churn, 50).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&mesh, "apiserver restart", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resumes >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_kill9_under_churn() {
    require_root!();
    let mut mesh = start("hak9", 56).await;
    mesh.apiserver_as_process().await;
    let churn = start_churn(&mesh, 56);
    await_churn(&churn, 50).await;
    let mark = records(&mesh).len();
    // SIGKILL: no graceful end of the stream, the index and its history are gone.
    mesh.kill9_apiserver();
    await_record(&mesh, mark, "the stream lost", is_lost).await;
    await_churn(&churn, 50).await;
    mesh.restart_apiserver_process();
    await_record(&mesh, mark, "a resumed stream", is_resumed_open).await;
    await_churn(&churn, 50).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&mesh, "apiserver kill -9 and restart", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resumes >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_kill_and_restart_under_churn() {
    require_root!();
    let mut mesh = start("het", 52).await;
    let churn = start_churn(&mesh, 52);
    await_churn(&churn, 50).await;
    // SIGKILL; churn's writes fail while it is down.
    mesh.etcd.kill();
    mesh.etcd.restart();
    await_churn(&churn, 100).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&mesh, "etcd kill -9 and restart", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_heal_under_churn() {
    require_root!();
    let mesh = start("hpt", 53).await;
    let churn = start_churn(&mesh, 53);
    await_churn(&churn, 50).await;
    let mark = records(&mesh).len();
    // Cut the node from its apiserver (no RST, no FIN: packets are dropped) until the
    // agent declares the stream lost (3 silent heartbeats of 1 s), then heal.
    mesh.netns.ip(&["link", "set", "eth0", "down"]);
    await_record(&mesh, mark, "the stream lost", is_lost).await;
    await_churn(&churn, 50).await;
    mesh.netns.ip(&["link", "set", "eth0", "up"]);
    await_record(&mesh, mark, "a resumed stream", is_resumed_open).await;
    await_churn(&churn, 50).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&mesh, "partition and heal", None).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resumes >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forces_reset_under_churn() {
    require_root!();
    let mut mesh = start("hcp", 54).await;
    let churn = start_churn(&mesh, 54);
    await_churn(&churn, 50).await;
    let mark = records(&mesh).len();
    // The apiserver goes away while churn goes on; etcd is compacted past the agent's
    // revision, so the restarted apiserver cannot resume it: Reset, then a snapshot.
    mesh.stop_apiserver().await;
    await_record(&mesh, mark, "the stream lost", is_lost).await;
    await_churn(&churn, 50).await;
    let before = read_history(&mesh, None).await;
    mesh.kv
        .compact(before.current(), None)
        .await
        .expect("etcd compaction");
    mesh.start_apiserver().await;
    await_record(&mesh, mark, "a Reset", is_reset).await;
    await_churn(&churn, 50).await;
    let ops = churn.stop().await;
    let v = converge_and_check(&mesh, "compaction forcing Reset", Some(&before)).await;
    println!("churn: {ops} changes");
    v.assert_ok();
    assert!(v.resets >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill_during_traffic_under_churn() {
    require_root!();
    let mut mesh = start("hak", 55).await;
    let churn = start_churn(&mesh, 55);
    await_churn(&churn, 50).await;
    // 300 connections to default/web (not churned), 10 ms apart, across the kill and the
    // restart: not one fails.
    let mut client = Proc::connect_loop(&mesh.netns, &mesh.cgroup, vip(), 300, 10);
    mesh.kill_agent();
    await_churn(&churn, 50).await;
    start_recorded_agent(&mut mesh);
    await_churn(&churn, 50).await;
    let outcomes = client.results();
    let seen = answered(&outcomes);
    assert_eq!(outcomes.len(), 300);
    assert!(
        seen.is_subset(&["east-n1", "east-n2", "west-w1"].map(String::from).into()),
        "{seen:?}"
    );
    let ops = churn.stop().await;
    // Both agent processes' streams are in the recording (a `Started` each).
    let v = converge_and_check(&mesh, "agent kill -9 during traffic", None).await;
    println!("churn: {ops} changes; traffic: 300 connections, none failed");
    v.assert_ok();
    assert_eq!(v.clients, 2, "{v}");
}
