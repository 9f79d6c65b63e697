//! The agent end to end on one node: a process in the agent's cgroup connects to a global
//! service's ClusterIP and is answered by the backends the rules of DESIGN.md section 5
//! allow, as the service changes in etcd (local cluster `east`, remote cluster `west`
//! written the way the peer importer will write it).
//!
//! Root only (skips otherwise). Each test has its own etcd, apiserver, namespace, cgroup,
//! bpffs and node network (`172.30.<n>.0/24`).

mod agent_support;

use agent_support::{
    EPERM, Mesh, Net, Outcome, Proc, VIP, answered, backend, exactly, targets, vip, web,
};
use mesh_proto::pb;

#[ctor::ctor(unsafe)]
fn child_process_entry() {
    agent_support::child_entry();
}

fn names(list: &[&str]) -> std::collections::BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_none_uses_both_clusters() {
    require_root!();
    let mut mesh = Mesh::start("lbn", Net(11)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.start_agent(&[]);
    let all = targets(&["10.1.1.11", "10.1.2.11", "10.2.1.11"]);
    mesh.converge("affinity none", |d| exactly(d, &all)).await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 40));
    assert_eq!(seen, names(&["east-n1", "east-n2", "west-w1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_local_fails_over_to_remote_and_back_without_a_failed_connection() {
    require_root!();
    let mut mesh = Mesh::start("lbl", Net(12)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::Local).await;
    mesh.start_agent(&[]);
    let east = targets(&["10.1.1.11", "10.1.2.11"]);
    let west = targets(&["10.2.1.11"]);
    mesh.converge("affinity local", |d| exactly(d, &east)).await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30));
    assert_eq!(seen, names(&["east-n1", "east-n2"]), "only local backends");

    // A client keeps connecting while the local backends go away and come back.
    let mut client = Proc::connect_loop(&mesh.netns, &mesh.cgroup, vip(), 150, 20);
    let svc = |ready| {
        web(
            "east",
            VIP,
            pb::Affinity::Local,
            vec![
                backend("10.1.1.11", "node-1", ready),
                backend("10.1.2.11", "node-2", ready),
            ],
        )
    };
    mesh.put_service(&svc(false)).await;
    mesh.converge("failover to remote", |d| exactly(d, &west))
        .await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 20));
    assert_eq!(seen, names(&["west-w1"]), "remote backends after failover");

    mesh.put_service(&svc(true)).await;
    mesh.converge("back to local", |d| exactly(d, &east)).await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30));
    assert_eq!(seen, names(&["east-n1", "east-n2"]), "local backends again");

    let during = client.results();
    assert_eq!(during.len(), 150);
    let seen = answered(&during);
    assert!(
        seen.contains("west-w1") && seen.contains("east-n1"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_remote_is_the_mirror_image() {
    require_root!();
    let mut mesh = Mesh::start("lbr", Net(13)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::Remote).await;
    mesh.start_agent(&[]);
    mesh.converge("affinity remote", |d| exactly(d, &targets(&["10.2.1.11"])))
        .await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 20));
    assert_eq!(seen, names(&["west-w1"]), "only remote backends");

    // The remote backend is not ready: failover to the local ones.
    mesh.put_service(&web(
        "west",
        "10.97.0.10",
        pb::Affinity::Remote,
        vec![backend("10.2.1.11", "w1", false)],
    ))
    .await;
    let east = targets(&["10.1.1.11", "10.1.2.11"]);
    mesh.converge("failover to local", |d| exactly(d, &east))
        .await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30));
    assert_eq!(seen, names(&["east-n1", "east-n2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_traffic_policy_local_uses_only_this_nodes_backends() {
    require_root!();
    let mut mesh = Mesh::start("lbi", Net(14)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    let mut svc = web(
        "east",
        VIP,
        pb::Affinity::None,
        vec![
            backend("10.1.1.11", "node-1", true),
            backend("10.1.2.11", "node-2", true),
        ],
    );
    svc.internal_traffic_policy = pb::TrafficPolicy::Local.into();
    mesh.put_service(&svc).await;
    mesh.start_agent(&[]);
    mesh.converge("internalTrafficPolicy Local", |d| {
        exactly(d, &targets(&["10.1.1.11"]))
    })
    .await;
    let seen = answered(&Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 30));
    assert_eq!(
        seen,
        names(&["east-n1"]),
        "never another node's or a remote backend"
    );

    // This node's backend goes away: nothing is left, never a remote one.
    svc.backends = vec![
        backend("10.1.1.11", "node-1", false),
        backend("10.1.2.11", "node-2", true),
    ];
    mesh.put_service(&svc).await;
    mesh.converge("no local backend", |d| exactly(d, &targets(&[])))
        .await;
    let outcomes = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 5);
    assert_eq!(outcomes, vec![Outcome::Err { errno: EPERM }; 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_backend_anywhere_refuses_at_once() {
    require_root!();
    let mut mesh = Mesh::start("lb0", Net(15)).await;
    agent_support::two_clusters(&mut mesh, pb::Affinity::None).await;
    mesh.put_service(&web(
        "east",
        VIP,
        pb::Affinity::None,
        vec![
            backend("10.1.1.11", "node-1", false),
            backend("10.1.2.11", "node-2", false),
        ],
    ))
    .await;
    mesh.put_service(&web(
        "west",
        "10.97.0.10",
        pb::Affinity::None,
        vec![backend("10.2.1.11", "w1", false)],
    ))
    .await;
    mesh.start_agent(&[]);
    mesh.converge("no backend", |d| exactly(d, &targets(&[])))
        .await;
    let started = std::time::Instant::now();
    let outcomes = Proc::connect(&mesh.netns, &mesh.cgroup, vip(), 10);
    assert_eq!(outcomes, vec![Outcome::Err { errno: EPERM }; 10]);
    // Ten refused connects plus a process start: far below one connect timeout (2 s).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
