//! `initial-sync`: a synthetic peer cluster written straight into an apiserver's etcd under
//! the peer's key layout (what the importer would have relayed), served by a mesh-apiserver
//! process; then a fresh mesh-agent process starts and the clock runs until its maps hold
//! everything. Two cases: the services case (endpoints, identities, services with
//! backends) and the ipcache case (more endpoints, up to 512k ipcache entries in total).
//!
//! The local cluster's Kubernetes API holds the same Services (frontends come only from
//! local Services, DESIGN.md section 5), published by the apiserver itself.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::kube_api::resources;
use mesh_proto::convert::encode_value;
use mesh_proto::keys::{ALL_KINDS, Keys};
use mesh_proto::pb::{self, Kind, event::Value};
use serde_json::json;

use crate::cluster::{AgentNode, Cluster, ClusterSpec, Ctx, put_batched};
use crate::env::{self, Components};
use crate::report::{Figure, Machine, Report, Target};
use crate::{Progress, step};

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Multiplies every size (1: 100k endpoints, 10k identities, 10k services, 512k
    /// ipcache entries).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Skip the second case (512k ipcache entries).
    #[arg(long)]
    pub skip_ipcache: bool,
    /// Endpoints per node of the synthetic peer.
    #[arg(long, default_value_t = 100)]
    pub endpoints_per_node: usize,
    /// etcd transactions in flight while writing the data.
    #[arg(long, default_value_t = 4)]
    pub parallel_txns: usize,
    /// Backends (endpoints of the peer) per service: 10k services x 10 = the 100k endpoints.
    /// The agent's service and backend maps hold 262144 entries each (bpf/mesh.h).
    #[arg(long, default_value_t = 10)]
    pub backends_per_service: usize,
    /// Instead: the services case from a peer served by the generator over gRPC and
    /// imported by the real importer, into a running agent (bench/src/import_sync.rs).
    #[arg(long)]
    pub via_importer: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            scale: 1.0,
            skip_ipcache: false,
            endpoints_per_node: 100,
            parallel_txns: 4,
            backends_per_service: 10,
            via_importer: false,
        }
    }
}

pub(crate) const LOCAL: &str = "local";
const PEER: &str = "peer";
const PEER_ID: u32 = 2;
pub(crate) const NAMESPACES: usize = 10;
const NODE: &str = "n1";

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub endpoints: usize,
    pub identities: usize,
    pub services: usize,
    pub ipcache: usize,
    pub nodes: usize,
    pub backends_per_service: usize,
}

impl Sizes {
    pub fn new(opts: &Opts) -> Result<Self> {
        let n = |base: f64| ((base * opts.scale).round() as usize).max(1);
        let endpoints = n(100_000.0);
        let identities = n(10_000.0);
        let services = n(10_000.0).min(endpoints);
        let nodes = endpoints.div_ceil(opts.endpoints_per_node.max(1));
        let ipcache = n(512_000.0).max(endpoints + nodes);
        if identities > 65_535 - 256 {
            bail!(
                "--scale {}: {identities} identities do not fit a cluster's identity range (256..=65535)",
                opts.scale
            );
        }
        if ipcache > 8_000_000 {
            bail!(
                "--scale {}: {ipcache} ipcache entries exceed the synthetic address range",
                opts.scale
            );
        }
        let backends_per_service = opts.backends_per_service;
        if services * backends_per_service > endpoints {
            bail!(
                "{services} services x {backends_per_service} backends need more than the {endpoints} endpoints"
            );
        }
        Ok(Sizes {
            backends_per_service,
            endpoints,
            identities,
            services,
            ipcache,
            nodes,
        })
    }
}

fn endpoint_ip(i: usize) -> String {
    // 10.128.0.0/9: room for 8M endpoints.
    let v = (10u32 << 24) | (128 << 16) | i as u32;
    std::net::Ipv4Addr::from(v).to_string()
}

fn node_ip(i: usize) -> String {
    let v = (172u32 << 24) | (20 << 16) | i as u32;
    std::net::Ipv4Addr::from(v).to_string()
}

fn identity_id(i: usize) -> u32 {
    (PEER_ID << 16) | (256 + i as u32)
}

pub(crate) fn service_name(i: usize) -> (String, String) {
    (format!("ns-{}", i % NAMESPACES), format!("svc-{i}"))
}

/// Backends of service `s`: endpoints `[s * b, (s + 1) * b)` with `b` backends per service.
fn backends_of(s: usize, sizes: &Sizes) -> std::ops::Range<usize> {
    let start = s * sizes.backends_per_service;
    start..start + sizes.backends_per_service
}

fn kv(keys: &Keys, kind: Kind, name: &str, value: Value) -> (String, Vec<u8>) {
    (keys.object(PEER, kind, name), encode_value(&value))
}

fn endpoint_kv(keys: &Keys, i: usize, sizes: &Sizes, per_node: usize) -> (String, Vec<u8>) {
    let node = (i / per_node) % sizes.nodes;
    let ip = endpoint_ip(i);
    kv(
        keys,
        Kind::Endpoint,
        &ip,
        Value::Endpoint(pb::Endpoint {
            ip: ip.clone(),
            identity: identity_id(i % sizes.identities),
            host_ip: Some(node_ip(node)),
            node: format!("node-{node}"),
            namespace: format!("ns-{}", i % NAMESPACES),
            pod: format!("pod-{i}"),
            named_ports: vec![],
        }),
    )
}

/// The peer's config, nodes, identities, endpoints `[0, sizes.endpoints)` and services.
fn peer_data(keys: &Keys, sizes: &Sizes, per_node: usize) -> Vec<(String, Vec<u8>)> {
    let mut out =
        Vec::with_capacity(sizes.endpoints + sizes.identities + sizes.services + sizes.nodes + 8);
    out.push(kv(
        keys,
        Kind::Config,
        "",
        Value::Config(pb::ClusterConfig {
            name: PEER.into(),
            id: PEER_ID,
            pod_cidrs: vec!["10.128.0.0/9".into()],
            service_cidr: Some("10.64.0.0/12".into()),
            capabilities: vec![],
            version: "bench".into(),
        }),
    ));
    for n in 0..sizes.nodes {
        out.push(kv(
            keys,
            Kind::Node,
            &format!("node-{n}"),
            Value::Node(pb::Node {
                cluster: PEER.into(),
                name: format!("node-{n}"),
                internal_ips: vec![node_ip(n)],
                pod_cidrs: vec![],
                ..Default::default()
            }),
        ));
    }
    for i in 0..sizes.identities {
        let id = identity_id(i);
        out.push(kv(
            keys,
            Kind::Identity,
            &id.to_string(),
            Value::Identity(pb::Identity {
                id,
                labels: vec![
                    format!("k8s:app=app-{i}"),
                    format!("k8s:io.cilium.k8s.policy.cluster={PEER}"),
                    format!("k8s:io.kubernetes.pod.namespace=ns-{}", i % NAMESPACES),
                ],
            }),
        ));
    }
    for i in 0..sizes.endpoints {
        out.push(endpoint_kv(keys, i, sizes, per_node));
    }
    let port = |p: u32| pb::ServicePort {
        name: "http".into(),
        protocol: pb::Protocol::Tcp.into(),
        port: p,
    };
    for s in 0..sizes.services {
        let (ns, name) = service_name(s);
        let backends = backends_of(s, sizes)
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
        out.push(kv(
            keys,
            Kind::Service,
            &format!("{ns}/{name}"),
            Value::Service(pb::GlobalService {
                cluster: PEER.into(),
                namespace: ns,
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
    for kind in ALL_KINDS {
        out.push((keys.synced(PEER, kind), encode_marker()));
    }
    out
}

fn encode_marker() -> Vec<u8> {
    use prost::Message;
    pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec()
}

/// What the agent's maps must hold for `endpoints` peer endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    services: u64,
    backends: u64,
    ipcache: u64,
}

/// Non-global Services of the local cluster besides the benchmark's: the lab API's
/// `default/kubernetes`.
const LOCAL_ONLY_SERVICES: usize = 1;

fn expected(sizes: &Sizes, endpoints: usize) -> Expected {
    // One frontend (ClusterIP:80/TCP) per service: a master entry and one slot per backend.
    let backends: usize = (0..sizes.services)
        .map(|s| backends_of(s, sizes).len())
        .sum();
    // Plus the local cluster's `default/kubernetes` Service (not global: published for the
    // cluster's own agents, whose socket LB translates every ClusterIP; no EndpointSlice in
    // the lab API, so a master entry with no backend).
    Expected {
        services: (sizes.services + LOCAL_ONLY_SERVICES + backends) as u64,
        backends: backends as u64,
        ipcache: (endpoints + sizes.nodes) as u64,
    }
}

/// Waits until the apiserver's index holds `endpoints` peer endpoints and every service.
async fn wait_index(cluster: &mut Cluster, sizes: &Sizes, endpoints: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        cluster.apiserver.check_running()?;
        let want = [
            endpoints as u64,
            sizes.services as u64,
            (sizes.services + LOCAL_ONLY_SERVICES) as u64,
        ];
        let ok = cluster
            .index_counts(&[(PEER, "endpoints"), (PEER, "services"), (LOCAL, "services")])
            .is_ok_and(|got| got == want);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the apiserver's index did not reach {endpoints} peer endpoints and {} services; log:\n{}",
                sizes.services,
                cluster.apiserver.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct SyncResult {
    /// How long the machine took to get quiet before the clock started, and whether it did
    /// (within 10 s).
    settled: (Duration, bool),
    elapsed: Duration,
    agent_rss_kib: u64,
    /// VmHWM: the agent's peak RSS during the sync.
    agent_peak_kib: u64,
    apiserver_rss_kib: u64,
    /// The agent's `mesh_agent_initial_sync_seconds{phase}`: when each phase ended, in
    /// seconds since the agent started, in the order of [`SYNC_PHASES`].
    phases: Vec<(&'static str, f64)>,
}

use mesh_agent::metrics::SYNC_PHASES;

/// What each phase of the agent's initial sync covers, for the report.
fn phase_text(phase: &str) -> &'static str {
    match phase {
        "datapath_open" => "open the datapath (load, pin, attach programs)",
        "first_message" => "first message of the watch stream",
        "snapshot_applied" => "snapshot received and applied (sync gate passed)",
        "computed" => "compute services, backends, policy (thread 1)",
        "ipcache_computed" => "compute the ipcache (thread 2)",
        "maps_written" => "write the ipcache, service and backend maps",
        "finished" => "policy maps, routes, status (end of 1st reconcile)",
        _ => "?",
    }
}

/// The agent's phase marks, read from its /metrics.
fn read_phases(agent: &AgentNode) -> Vec<(&'static str, f64)> {
    let body = env::http_get(agent.metrics, "/metrics").unwrap_or_default();
    SYNC_PHASES
        .iter()
        .filter_map(|&p| {
            let series = format!("mesh_agent_initial_sync_seconds{{phase=\"{p}\"}}");
            env::metric(&body, &series).map(|v| (p, v))
        })
        .collect()
}

/// One figure per phase of the sync: how long after the end of the previous one it ended,
/// named with when it ended; then the rest of the wall clock (spawning the process,
/// observing the gauges). The figures sum to the wall clock.
fn phase_figures(case: &str, r: &SyncResult) -> Vec<Figure> {
    let (waited, quiet) = r.settled;
    let mut out = vec![Figure::new(
        &match quiet {
            true => format!("{case}: wait for a quiet machine before the clock (not timed)"),
            false => {
                format!("{case}: wait for a quiet machine before the clock (NOT quiet after 10 s)")
            }
        },
        waited.as_secs_f64() * 1e3,
        "ms",
    )];
    let mut prev = 0.0;
    // Phases may overlap (the datapath opens while the snapshot arrives; the ipcache is
    // written while the services are computed): in the order they ended, each from the end
    // of the one before.
    let mut phases = r.phases.clone();
    phases.sort_by(|a, b| a.1.total_cmp(&b.1));
    for &(phase, end) in &phases {
        out.push(Figure::new(
            &format!(
                "{case} phase: {} (ends at {:.0} ms)",
                phase_text(phase),
                end * 1e3
            ),
            (end - prev) * 1e3,
            "ms",
        ));
        prev = end;
    }
    out.push(Figure::new(
        &format!("{case} phase: spawn the agent, observe its gauges (rest)"),
        (r.elapsed.as_secs_f64() - prev) * 1e3,
        "ms",
    ));
    out
}

/// Starts a fresh agent (empty pins) and times it until its maps hold `want`.
async fn time_agent_sync(
    agent: &mut AgentNode,
    cluster: &Cluster,
    components: &Components,
    want: Expected,
) -> Result<SyncResult> {
    agent.stop();
    agent.bpffs.unpin();
    // The clock starts on a quiet machine: the kernel frees the stopped agent's maps (and
    // etcd settles after the writes) in the background, not on the new agent's time.
    let settled = env::settle(Duration::from_millis(100), 0.15, Duration::from_secs(10)).await?;
    let t0 = Instant::now();
    agent.start(components)?;
    let deadline = t0 + Duration::from_secs(600);
    let mut progress = Progress::new("agent maps (ipcache entries)", want.ipcache as usize);
    let elapsed = loop {
        agent.proc_mut()?.check_running()?;
        // One read of the agent's metrics per round.
        let (counts, body) = agent.map_counts().unwrap_or_default();
        let got = Expected {
            services: counts[0],
            backends: counts[1],
            ipcache: counts[2],
        };
        if got == want {
            break t0.elapsed();
        }
        let errors = env::metric(&body, "mesh_agent_reconcile_errors_total").unwrap_or(0.0);
        if errors > 0.0 {
            bail!(
                "the agent failed to program its maps (want {want:?}); log:\n{}",
                agent.proc_mut()?.log_tail()
            );
        }
        progress.set(got.ipcache as usize);
        if Instant::now() > deadline {
            bail!(
                "the agent's maps hold {got:?}, want {want:?}; log:\n{}",
                agent.proc_mut()?.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    progress.finish();
    // Check the kernel's maps, not only the agent's account of them.
    let maps = mesh_maps::open_pinned_readonly(agent.bpffs.pin_dir())?;
    let dump = maps.dump().context("dumping the agent's maps")?;
    let got = Expected {
        services: dump.services.len() as u64,
        backends: dump.backends.len() as u64,
        ipcache: dump.ipcache.len() as u64,
    };
    if got != want {
        bail!("the pinned maps hold {got:?}, want {want:?}");
    }
    drop(dump);
    let agent_pid = agent.proc_mut()?.pid();
    Ok(SyncResult {
        settled,
        phases: read_phases(agent),
        elapsed,
        agent_rss_kib: env::rss_kib(agent_pid)?,
        agent_peak_kib: env::peak_rss_kib(agent_pid)?,
        apiserver_rss_kib: env::rss_kib(cluster.apiserver.pid())?,
    })
}

/// Starts the benchmark's local cluster (etcd, lab Kubernetes API, mesh-apiserver over
/// mutual TLS): the one that imports the peer here, in `import_sync` and in `scale`.
pub(crate) async fn start_local_cluster(ctx: &Ctx) -> Result<Cluster> {
    step("starting the local cluster (etcd, lab Kubernetes API, mesh-apiserver)");
    Cluster::start(
        ctx,
        ClusterSpec {
            name: LOCAL,
            id: 1,
            pod_cidr: "10.1.0.0/16",
            service_cidr: "10.96.0.0/12",
            insecure: false,
            apiserver_args: &[],
        },
    )
    .await
}

/// Creates `services` global Services (`service_name(i)`, port 80 -> 8080) and their
/// namespaces in the cluster's Kubernetes API: the local halves of the peer's services.
pub(crate) fn create_global_services(cluster: &Cluster, services: usize) -> Result<()> {
    step(&format!(
        "creating {services} global Services in the local Kubernetes API"
    ));
    let store = cluster.kube.store().clone();
    for n in 0..NAMESPACES.min(services) {
        store
            .create(
                &resources::NAMESPACES,
                None,
                json!({"metadata": {"name": format!("ns-{n}")}}),
            )
            .map_err(|e| anyhow::anyhow!("creating namespace ns-{n}: {e:?}"))?;
    }
    for s in 0..services {
        let (ns, name) = service_name(s);
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "annotations": {"service.cilium.io/global": "true"}},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        });
        store
            .create(&resources::SERVICES, Some(&ns), svc)
            .map_err(|e| anyhow::anyhow!("creating Service {ns}/{name}: {e:?}"))?;
    }
    Ok(())
}

pub async fn run(opts: &Opts, components: &Components, machine: &Machine) -> Result<Report> {
    if opts.via_importer {
        return crate::import_sync::run(opts, components, machine).await;
    }
    let sizes = Sizes::new(opts)?;
    let per_node = opts.endpoints_per_node.max(1);
    let ctx = Ctx::new(components.clone())?;
    let mut cluster = start_local_cluster(&ctx).await?;
    create_global_services(&cluster, sizes.services)?;

    let keys = Keys::default();
    let etcd = cluster.etcd_client().await?;
    let data = peer_data(&keys, &sizes, per_node);
    let total = data.len();
    let mut progress = Progress::new("writing the peer into etcd (keys)", total);
    let t = Instant::now();
    put_batched(&etcd, data, opts.parallel_txns, |n| progress.set(n)).await?;
    progress.finish();
    let write_rate = total as f64 / t.elapsed().as_secs_f64();
    step("waiting for the apiserver's index to hold the peer");
    wait_index(&mut cluster, &sizes, sizes.endpoints).await?;

    let mut agent = AgentNode::prepare(&cluster, NODE, &[])?;
    step("case 1: starting a fresh agent (services, backends, ipcache)");
    let want1 = expected(&sizes, sizes.endpoints);
    let r1 = time_agent_sync(&mut agent, &cluster, components, want1).await?;

    let mut report = Report::new(
        "initial-sync",
        machine.clone(),
        "wall clock from spawning a fresh mesh-agent (empty pins; the clock starts once the \
         machine is quiet, at most 15% of its CPU busy over 100 ms, so the kernel's freeing of \
         the previous agent's maps is not timed) until its mesh_agent_map_entries gauges (set after each reconcile) equal the expected counts, \
         read every 5 ms over HTTP; the pinned maps are then dumped and their counts checked. \
         The data is in the apiserver's index before the agent starts. RSS is VmRSS of each \
         process (/proc/<pid>/status) right after the sync and the dump, peak RSS the agent's \
         VmHWM",
    );
    report.param("scale", opts.scale);
    report.param("peer_endpoints", sizes.endpoints);
    report.param("peer_identities", sizes.identities);
    report.param("peer_services", sizes.services);
    report.param("peer_nodes", sizes.nodes);
    report.param("backends_per_service", sizes.backends_per_service);
    report.figures.push(Figure::new(
        "etcd write rate (peer data, batched txns)",
        write_rate,
        "keys/s",
    ));
    report.figures.push(
        Figure::new(
            &format!(
                "sync {} endpoints + {} services ({} backends) into the maps",
                sizes.endpoints, sizes.services, want1.backends
            ),
            r1.elapsed.as_secs_f64(),
            "s",
        )
        .with_target_if(opts.scale == 1.0, Target::AtMost(2.0)),
    );
    report.figures.extend(phase_figures("case 1", &r1));
    let per = |kib: u64, n: usize| kib as f64 * 1024.0 / n as f64;
    report.figures.push(Figure::new(
        "agent RSS after case 1",
        r1.agent_rss_kib as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(Figure::new(
        "agent peak RSS during case 1 (VmHWM)",
        r1.agent_peak_kib as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(
        Figure::new(
            "agent RSS per remote endpoint (case 1)",
            per(r1.agent_rss_kib, sizes.endpoints),
            "bytes",
        )
        .with_target(Target::AtMost(2048.0)),
    );
    report.figures.push(Figure::new(
        "apiserver RSS after case 1",
        r1.apiserver_rss_kib as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(
        Figure::new(
            "apiserver RSS per cached endpoint (case 1)",
            per(r1.apiserver_rss_kib, sizes.endpoints),
            "bytes",
        )
        .with_target(Target::AtMost(1024.0)),
    );

    if !opts.skip_ipcache {
        let endpoints2 = sizes.ipcache - sizes.nodes;
        let extra: Vec<(String, Vec<u8>)> = (sizes.endpoints..endpoints2)
            .map(|i| endpoint_kv(&keys, i, &sizes, per_node))
            .collect();
        let mut progress = Progress::new("case 2: writing more endpoints (keys)", extra.len());
        put_batched(&etcd, extra, opts.parallel_txns, |n| progress.set(n)).await?;
        progress.finish();
        wait_index(&mut cluster, &sizes, endpoints2).await?;
        step(&format!(
            "case 2: starting a fresh agent ({} ipcache entries)",
            sizes.ipcache
        ));
        let want2 = expected(&sizes, endpoints2);
        let r2 = time_agent_sync(&mut agent, &cluster, components, want2).await?;
        report.param("ipcache_entries", sizes.ipcache);
        report.figures.push(
            Figure::new(
                &format!(
                    "sync {} ipcache entries (+ services) into the maps",
                    sizes.ipcache
                ),
                r2.elapsed.as_secs_f64(),
                "s",
            )
            .with_target_if(opts.scale == 1.0, Target::AtMost(2.0)),
        );
        report.figures.extend(phase_figures("case 2", &r2));
        report.figures.push(Figure::new(
            "agent RSS after case 2",
            r2.agent_rss_kib as f64 / 1024.0,
            "MiB",
        ));
        report.figures.push(Figure::new(
            "agent peak RSS during case 2 (VmHWM)",
            r2.agent_peak_kib as f64 / 1024.0,
            "MiB",
        ));
        report.figures.push(
            Figure::new(
                "agent RSS per remote endpoint (case 2)",
                per(r2.agent_rss_kib, endpoints2),
                "bytes",
            )
            .with_target(Target::AtMost(2048.0)),
        );
        let added = endpoints2 - sizes.endpoints;
        if added > 0 {
            report.figures.push(Figure::new(
                "agent RSS per added endpoint (case 2 - case 1)",
                per(r2.agent_rss_kib.saturating_sub(r1.agent_rss_kib), added),
                "bytes",
            ));
        }
        report.figures.push(
            Figure::new(
                "apiserver RSS per cached endpoint (case 2)",
                per(r2.apiserver_rss_kib, endpoints2),
                "bytes",
            )
            .with_target(Target::AtMost(1024.0)),
        );
        if added > 0 {
            report.figures.push(Figure::new(
                "apiserver RSS per added endpoint (case 2 - case 1)",
                per(
                    r2.apiserver_rss_kib.saturating_sub(r1.apiserver_rss_kib),
                    added,
                ),
                "bytes",
            ));
        }
    }
    report.notes.push(
        "RSS per endpoint divides the whole process's RSS (fixed overhead included); the \
         'added endpoint' rows are the marginal cost between the two cases"
            .into(),
    );
    drop(agent);
    drop(cluster);
    drop(ctx);
    Ok(report)
}
