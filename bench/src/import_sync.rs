//! `initial-sync --via-importer`: the initial sync of a large peer *through the importer*.
//! The peer (the same data as initial-sync's services case: endpoints, identities, nodes,
//! services with backends) is served by mesh-bench's [`generator`](crate::generator) over
//! the real gRPC Watch API with its own CA; the local apiserver's importer takes its
//! snapshot and writes it into etcd, the index serves it, and an agent that is already
//! running programs it. The clock starts when the peer entry is written.
//!
//! initial-sync's default cases write the peer's data straight into the local etcd (what
//! the importer would have relayed) and start the agent once the index holds it; this case
//! adds the importer (TLS, Info check, snapshot decode, per-object checks, batched etcd
//! writes) and the index's catch-up to the path.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_proto::pb::{self, Kind, event::Value};
use mesh_proto::peer_entry::render_entry;

use crate::cluster::{AgentNode, Ctx};
use crate::env::{self, Components};
use crate::generator::{self, SynthCluster};
use crate::initial_sync::{
    LOCAL, NAMESPACES, Opts, Sizes, create_global_services, service_name, start_local_cluster,
};
use crate::report::{Figure, Machine, Report, Target};
use crate::{Progress, step};

const PEER: &str = "peer";
const PEER_ID: u32 = 2;

fn endpoint_ip(i: usize) -> String {
    std::net::Ipv4Addr::from((10u32 << 24) | (128 << 16) | i as u32).to_string()
}

fn node_ip(n: usize) -> String {
    std::net::Ipv4Addr::from((172u32 << 24) | (20 << 16) | n as u32).to_string()
}

/// The peer's objects: initial-sync's services case.
fn peer(sizes: &Sizes, per_node: usize) -> std::sync::Arc<SynthCluster> {
    let config = pb::ClusterConfig {
        name: PEER.into(),
        id: PEER_ID,
        pod_cidrs: vec!["10.128.0.0/9".into()],
        service_cidr: Some("10.64.0.0/12".into()),
        capabilities: vec![],
        version: "synthetic".into(),
    };
    let mut objects = Vec::new();
    for n in 0..sizes.nodes {
        objects.push((
            Kind::Node,
            format!("node-{n}"),
            Value::Node(pb::Node {
                cluster: PEER.into(),
                name: format!("node-{n}"),
                internal_ips: vec![node_ip(n)],
                ..Default::default()
            }),
        ));
    }
    let identity = |i: usize| (PEER_ID << 16) | (256 + i as u32);
    for i in 0..sizes.identities {
        objects.push((
            Kind::Identity,
            identity(i).to_string(),
            Value::Identity(pb::Identity {
                id: identity(i),
                labels: vec![
                    format!("k8s:app=app-{i}"),
                    format!("k8s:io.cilium.k8s.policy.cluster={PEER}"),
                    format!("k8s:io.kubernetes.pod.namespace=ns-{}", i % NAMESPACES),
                ],
            }),
        ));
    }
    for i in 0..sizes.endpoints {
        let node = (i / per_node) % sizes.nodes;
        objects.push((
            Kind::Endpoint,
            endpoint_ip(i),
            Value::Endpoint(pb::Endpoint {
                ip: endpoint_ip(i),
                identity: identity(i % sizes.identities),
                host_ip: Some(node_ip(node)),
                node: format!("node-{node}"),
                namespace: format!("ns-{}", i % NAMESPACES),
                pod: format!("pod-{i}"),
                named_ports: vec![],
            }),
        ));
    }
    let port = |p: u32| pb::ServicePort {
        name: "http".into(),
        protocol: pb::Protocol::Tcp.into(),
        port: p,
    };
    let b = sizes.backends_per_service;
    for s in 0..sizes.services {
        let (namespace, name) = service_name(s);
        let backends = (s * b..(s + 1) * b)
            .map(|i| pb::Backend {
                ip: endpoint_ip(i),
                ports: vec![port(8080)],
                node: format!("node-{}", (i / per_node) % sizes.nodes),
                zone: String::new(),
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect();
        objects.push((
            Kind::Service,
            format!("{namespace}/{name}"),
            Value::Service(pb::GlobalService {
                cluster: PEER.into(),
                namespace,
                name,
                local_only: false,
                shared: true,
                affinity: pb::Affinity::None.into(),
                internal_traffic_policy: pb::TrafficPolicy::Cluster.into(),
                ports: vec![port(80)],
                frontends: vec![],
                backends,
            }),
        ));
    }
    SynthCluster::new(config, objects)
}

/// Polls `f` every `every` until it returns true; fails after `limit`.
async fn wait_until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if f()? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            anyhow::bail!("{what}: not reached within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

pub async fn run(opts: &Opts, components: &Components, machine: &Machine) -> Result<Report> {
    let sizes = Sizes::new(opts)?;
    let per_node = opts.endpoints_per_node.max(1);
    let ctx = Ctx::new(components.clone())?;
    let mut cluster = start_local_cluster(&ctx).await?;
    create_global_services(&cluster, sizes.services)?;
    // The lab API's default/kubernetes is local-only: one more local service.
    let local_services = (sizes.services + 1) as u64;
    wait_until(
        "the index holding the local Services",
        Duration::from_secs(300),
        Duration::from_millis(50),
        || Ok(cluster.index_objects(LOCAL, "services").unwrap_or(0) == local_services),
    )
    .await?;

    step(&format!(
        "serving the peer from the generator ({} endpoints, {} identities, {} services)",
        sizes.endpoints, sizes.identities, sizes.services
    ));
    let served = generator::serve(peer(&sizes, per_node), LOCAL, &cluster.ca.cert_pem).await?;
    let mut agent = AgentNode::prepare(&cluster, "n1", &[])?;
    agent.start(components)?;
    agent.wait_datapath().await?;
    let backends = (sizes.services * sizes.backends_per_service) as u64;
    let want = (
        (sizes.services + 1) as u64 + backends,
        backends,
        (sizes.endpoints + sizes.nodes) as u64,
    );

    step("writing the peer entry; the importer takes the peer's snapshot");
    let etcd_pid = env::etcd_pid(cluster.etcd.data_dir())?;
    let agent_pid = agent.proc_mut()?.pid();
    let pids = [
        cluster.apiserver.pid(),
        etcd_pid,
        agent_pid,
        std::process::id(),
    ];
    let cpu = || -> Result<Vec<Duration>> { pids.iter().map(|p| env::cpu_time(*p)).collect() };
    let cpu0 = cpu()?;
    let t0 = Instant::now();
    std::fs::write(
        cluster.dir.join("peers").join(format!("{PEER}.yaml")),
        render_entry(&served.peer_spec()?),
    )?;
    let mut progress = Progress::new("index (peer endpoints)", sizes.endpoints);
    let limit = Duration::from_secs(600);
    let mut index_at = None;
    let mut agent_at = None;
    while index_at.is_none() || agent_at.is_none() {
        cluster.apiserver.check_running()?;
        agent.proc_mut()?.check_running()?;
        // One read of each process's metrics per round (the polling's own cost lands on
        // the cores the import runs on).
        if index_at.is_none() {
            let counts = cluster
                .index_counts(&[(PEER, "endpoints"), (PEER, "services")])
                .unwrap_or_default();
            let (eps, svcs) = (counts.first().copied(), counts.get(1).copied());
            progress.set(eps.unwrap_or(0) as usize);
            if (eps, svcs) == (Some(sizes.endpoints as u64), Some(sizes.services as u64)) {
                index_at = Some(t0.elapsed());
            }
        }
        if agent_at.is_none() {
            let got = agent.map_counts().map(|(c, _)| (c[0], c[1], c[2]));
            if got == Some(want) {
                agent_at = Some(t0.elapsed());
            }
        }
        if t0.elapsed() > limit {
            anyhow::bail!(
                "the peer did not reach the index ({index_at:?}) and the agent's maps ({agent_at:?}) within {limit:?}; apiserver log:\n{}",
                cluster.apiserver.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    progress.finish();
    let cpu1 = cpu()?;
    let txns = crate::scale::metric_sum(
        &cluster.metrics_text()?,
        "mesh_apiserver_peer_etcd_txns_total",
    );
    let (index_at, agent_at) = (
        index_at.context("index time")?,
        agent_at.context("agent time")?,
    );
    let maps = mesh_maps::open_pinned_readonly(agent.bpffs.pin_dir())?;
    let dump = maps.dump().context("dumping the agent's maps")?;
    let got = (
        dump.services.len() as u64,
        dump.backends.len() as u64,
        dump.ipcache.len() as u64,
    );
    anyhow::ensure!(
        got == want,
        "the pinned maps hold (services, backends, ipcache) {got:?}, want {want:?}"
    );
    drop(dump);
    let agent_rss = env::rss_kib(agent.proc_mut()?.pid())?;
    let apiserver_rss = env::rss_kib(cluster.apiserver.pid())?;

    let mut report = Report::new(
        "initial-sync (via importer)",
        machine.clone(),
        "wall clock from writing the peer entry (the peer served by mesh-bench's generator \
         over the real gRPC Watch API with its own CA; the agent already running) until the \
         apiserver's index metrics hold every peer endpoint and service (polled every 5 ms), \
         and until the agent's mesh_agent_map_entries gauges equal the expected counts; the \
         pinned maps are then dumped and their counts checked",
    );
    report.param("scale", opts.scale);
    report.param("peer_endpoints", sizes.endpoints);
    report.param("peer_identities", sizes.identities);
    report.param("peer_services", sizes.services);
    report.param("peer_nodes", sizes.nodes);
    report.param("backends_per_service", sizes.backends_per_service);
    report.figures.push(Figure::new(
        "peer entry -> apiserver index holds the peer (importer + etcd + index)",
        index_at.as_secs_f64(),
        "s",
    ));
    report.figures.push(
        Figure::new(
            &format!(
                "peer entry -> running agent's maps hold {} endpoints + {} services ({} backends)",
                sizes.endpoints, sizes.services, backends
            ),
            agent_at.as_secs_f64(),
            "s",
        )
        .with_target_if(opts.scale == 1.0, Target::AtMost(2.0)),
    );
    report.figures.push(Figure::new(
        "importer etcd transactions (snapshot written)",
        txns,
        "txns",
    ));
    for (i, name) in ["apiserver", "etcd", "agent", "mesh-bench (generator)"]
        .iter()
        .enumerate()
    {
        report.figures.push(Figure::new(
            &format!("CPU until the agent's maps were full: {name}"),
            cpu1[i].saturating_sub(cpu0[i]).as_secs_f64(),
            "s",
        ));
    }
    let per = |kib: u64| kib as f64 * 1024.0 / sizes.endpoints as f64;
    report.figures.push(Figure::new(
        "agent RSS per remote endpoint",
        per(agent_rss),
        "bytes",
    ));
    report.figures.push(Figure::new(
        "apiserver RSS per cached endpoint",
        per(apiserver_rss),
        "bytes",
    ));
    report.notes.push(
        "the 2 s target is initial-sync's (a fresh agent, data already in the index); here \
         the clock also covers the importer and the index, so it is stricter"
            .into(),
    );
    drop(maps);
    drop(agent);
    drop(served);
    drop(cluster);
    drop(ctx);
    Ok(report)
}
