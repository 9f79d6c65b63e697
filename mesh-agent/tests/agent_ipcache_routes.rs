//! The agent's ipcache, routes, status report, health and metrics, end to end.
//!
//! Root only (skips otherwise).

mod agent_support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use agent_support::{Mesh, Net, exactly, identity, targets};
use ipnet::IpNet;
use mesh_agent::datapath::IpcacheValue;
use mesh_agent::reconcile::{IPCACHE_F_LOCAL, IPCACHE_F_REMOTE};
use mesh_proto::pb::{self, Kind};

#[ctor::ctor(unsafe)]
fn child_process_entry() {
    agent_support::child_entry();
}

fn routes(list: &[(&str, Ipv4Addr)]) -> BTreeMap<String, String> {
    list.iter()
        .map(|(d, v)| (d.to_string(), v.to_string()))
        .collect()
}

/// Polls the agent's routes until they equal `want`.
async fn wait_routes(mesh: &Mesh, want: &BTreeMap<String, String>) {
    let deadline = std::time::Instant::now() + agent_support::CONVERGE;
    loop {
        let got = mesh.netns.agent_routes();
        if &got == want {
            return;
        }
        if std::time::Instant::now() >= deadline {
            let log = mesh.agent.as_ref().map(|a| a.log()).unwrap_or_default();
            panic!("routes {got:?}, want {want:?}\nagent log:\n{log}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipcache_holds_every_endpoint_and_routes_follow_remote_nodes() {
    require_root!();
    let mut mesh = Mesh::start("rt", Net(31)).await;
    let net = mesh.net;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    // A route the agent does not own, and one it owned in an earlier life that no node
    // needs any more.
    let foreign = net.host(5).to_string();
    mesh.netns
        .ip(&["route", "add", "10.9.0.0/24", "via", &foreign]);
    mesh.netns.ip(&[
        "route",
        "add",
        "10.8.0.0/24",
        "via",
        &net.host(6).to_string(),
        "proto",
        "77",
    ]);
    mesh.start_agent(&[]);

    // Every endpoint of both clusters, and every node IP, with identity and node IP.
    let host = |n| IpAddr::V4(net.host(n));
    let entry = |identity, tunnel: Option<IpAddr>, cluster_id, flags| IpcacheValue {
        identity,
        tunnel_endpoint: tunnel.map(|ip| match ip {
            IpAddr::V4(v) => v,
            IpAddr::V6(_) => unreachable!(),
        }),
        cluster_id,
        flags,
    };
    let want: BTreeMap<IpNet, IpcacheValue> = [
        (host(2), entry(1, None, 1, IPCACHE_F_LOCAL)),
        (host(3), entry(6, None, 1, 0)),
        (host(4), entry(6, None, 2, IPCACHE_F_REMOTE)),
        (
            "10.1.1.11".parse().unwrap(),
            entry(identity(1, 256), Some(host(2)), 1, IPCACHE_F_LOCAL),
        ),
        (
            "10.1.2.11".parse().unwrap(),
            entry(identity(1, 256), Some(host(3)), 1, 0),
        ),
        (
            "10.2.1.11".parse().unwrap(),
            entry(identity(2, 256), Some(host(4)), 2, IPCACHE_F_REMOTE),
        ),
    ]
    .into_iter()
    .map(|(ip, v)| (IpNet::from(ip), v))
    .collect();
    mesh.converge("ipcache", |d| {
        if d.ipcache == want {
            Ok(())
        } else {
            Err(format!("ipcache {:?}, want {want:?}", d.ipcache))
        }
    })
    .await;

    // Routes to the other nodes' pod CIDRs, via their node IPs; the stale one is gone,
    // the foreign one untouched.
    wait_routes(
        &mesh,
        &routes(&[("10.1.2.0/24", net.host(3)), ("10.2.1.0/24", net.host(4))]),
    )
    .await;
    let all = mesh.netns.ip(&["-4", "route", "show"]);
    assert!(all.contains(&format!("10.9.0.0/24 via {foreign}")), "{all}");

    // A remote node goes away: its route is withdrawn; a new one appears.
    mesh.delete("west", Kind::Node, "w1").await;
    wait_routes(&mesh, &routes(&[("10.1.2.0/24", net.host(3))])).await;
    mesh.put_node("west", "w2", net.host(7), "10.2.2.0/24")
        .await;
    wait_routes(
        &mesh,
        &routes(&[("10.1.2.0/24", net.host(3)), ("10.2.2.0/24", net.host(7))]),
    )
    .await;
    let all = mesh.netns.ip(&["-4", "route", "show"]);
    assert!(all.contains(&format!("10.9.0.0/24 via {foreign}")), "{all}");

    // The status report reaches the apiserver: both clusters synced, entry counts.
    mesh.wait_agent_status("both clusters synced, entry counts", |s| {
        s.clusters.len() == 2
            && s.clusters.iter().all(|c| c.synced)
            && s.map_entries.get("ipcache") == Some(&6)
            && s.map_entries.get("routes") == Some(&2)
            && s.last_error.is_empty()
    })
    .await;

    // Health, readiness and metrics.
    let status_line = |r: &str| r.lines().next().unwrap_or_default().to_owned();
    let health = mesh.agent_http("/healthz");
    assert!(status_line(&health).ends_with(" 200 OK"), "{health}");
    let ready = mesh.agent_http("/readyz");
    assert!(status_line(&ready).ends_with(" 200 OK"), "{ready}");
    assert_eq!(
        mesh.metric("mesh_agent_map_entries{map=\"ipcache\"}"),
        Some(6.0)
    );
    assert_eq!(
        mesh.metric("mesh_agent_map_entries{map=\"backends\"}"),
        Some(3.0)
    );
    assert_eq!(
        mesh.metric("mesh_agent_cluster_synced{cluster=\"west\"}"),
        Some(1.0)
    );
    assert_eq!(mesh.metric("mesh_agent_routes"), Some(2.0));
    assert!(
        mesh.metric("mesh_agent_reconcile_duration_seconds_count")
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_skipped_and_counted_and_routing_none_installs_nothing() {
    require_root!();
    let mut mesh = Mesh::start("bad", Net(32)).await;
    let net = mesh.net;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    // Valid protobuf, invalid content: an endpoint whose IP is not an address.
    let bad = pb::Endpoint {
        ip: "not-an-ip".into(),
        identity: identity(1, 256),
        host_ip: Some(net.host(2).to_string()),
        node: "node-1".into(),
        namespace: "default".into(),
        pod: "bad".into(),
        named_ports: vec![],
    };
    mesh.put("east", Kind::Endpoint, "not-an-ip", &bad).await;
    mesh.start_agent(&["--routing", "none"]);
    let all = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("service despite a bad object", |d| exactly(d, &all))
        .await;
    mesh.converge("ipcache despite a bad object", |d| {
        if d.ipcache.len() == 6 {
            Ok(())
        } else {
            Err(format!(
                "{} ipcache entries: {:?}",
                d.ipcache.len(),
                d.ipcache
            ))
        }
    })
    .await;
    assert_eq!(
        mesh.metric("mesh_agent_rejected_objects_total{kind=\"endpoints\"}"),
        Some(1.0)
    );
    assert!(mesh.agent.as_ref().unwrap().log().contains("not-an-ip"));
    // --routing none: no route of the agent's protocol.
    assert_eq!(mesh.netns.agent_routes(), BTreeMap::new());
    mesh.agent.as_mut().unwrap().assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_between_two_pods_are_counted_by_their_identities() {
    require_root!();
    let mut mesh = Mesh::start("flw", Net(33)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    // A pod of `west` (identity west/257) behind interface fl0 of the node; the source
    // pod is east's 10.1.1.11 (identity east/256) on the node.
    let pod = agent_support::Netns::new("flp");
    mesh.netns.ip(&[
        "link", "add", "fl0", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    mesh.netns.ip(&["link", "set", "fl0", "up"]);
    mesh.netns.ip(&[
        "route",
        "add",
        "10.2.1.21/32",
        "dev",
        "fl0",
        "src",
        "10.1.1.11",
    ]);
    pod.ip(&["addr", "add", "10.2.1.21/32", "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "10.1.1.11/32", "dev", "eth0"]);
    let _server = agent_support::Proc::server(&pod, "10.2.1.21:9000", "pod-w");
    mesh.put_identity("west", identity(2, 257), "client").await;
    mesh.put_endpoint(
        "west",
        "10.2.1.21",
        identity(2, 257),
        "w1",
        mesh.net.host(4),
    )
    .await;

    mesh.flow_iface = Some("fl0".into());
    mesh.start_agent(&[]);
    mesh.converge("ipcache of the pod", |d| {
        let want = IpNet::from(IpAddr::from([10, 2, 1, 21]));
        match d.ipcache.get(&want) {
            Some(v) if v.identity == identity(2, 257) => Ok(()),
            other => Err(format!("{want}: {other:?}")),
        }
    })
    .await;

    let target = "10.2.1.21:9000".parse().unwrap();
    let outcomes = agent_support::Proc::connect(&mesh.netns, &mesh.cgroup, target, 3);
    assert_eq!(
        agent_support::answered(&outcomes),
        ["pod-w".to_owned()].into()
    );
    let flows = mesh.datapath().flows().expect("flows");
    let pair = |src, dst| mesh_agent::datapath::IdentityPair { src, dst };
    let out = flows.get(&pair(identity(1, 256), identity(2, 257)));
    let back = flows.get(&pair(identity(2, 257), identity(1, 256)));
    // Three TCP connections: at least SYN, ACK, FIN each way per connection.
    assert!(out.is_some_and(|c| c.packets >= 9), "{flows:?}");
    assert!(back.is_some_and(|c| c.packets >= 9), "{flows:?}");
}
