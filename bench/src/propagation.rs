//! `propagation` and `failover`: two clusters, each with the lab Kubernetes API, etcd and
//! a mesh-apiserver process; B imports A (peers directory); a mesh-agent process of B
//! programs its pinned maps. `default/web` is global in both clusters; B's Service gives
//! the frontend (its ClusterIP), A's backends are remote.
//!
//! - propagation (affinity none): an endpoint of A's EndpointSlice becomes ready ->
//!   its backend appears in B's service map; then not ready -> it leaves the map.
//! - failover (affinity local): B's only local backend becomes not ready -> the map holds
//!   A's backends; ready again -> back to the local one.
//!
//! Each sample writes the EndpointSlice through the lab API's store (the same validation,
//! resourceVersion and watch machinery kubectl's writes go through, without an HTTP round
//! trip on the clock) and polls the pinned maps read-only until they show the change.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::kube_api::{PatchType, Store, resources};
use mesh_maps::{PROTO_TCP, PinnedMaps, ServiceEntryKey};
use serde_json::json;

use crate::cluster::{AgentNode, Cluster, ClusterSpec, Ctx};
use crate::env::Components;
use crate::hops::Hops;
use crate::report::{Distribution, Figure, LatencyTarget, Machine, Report};
use crate::{Progress, step};

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Samples (each one change and its reversal).
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Interval between two reads of the maps, in microseconds (0: read continuously).
    #[arg(long, default_value_t = 250)]
    pub poll_interval_us: u64,
    /// A sample that takes longer than this (ms) counts as a timeout.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Ready backends of A that never change.
    #[arg(long, default_value_t = 3)]
    pub remote_backends: u8,
    /// The scale profile's churn in the background (bench/src/scale.rs).
    #[command(flatten)]
    pub background: crate::scale::BackgroundOpts,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            samples: 200,
            poll_interval_us: 250,
            timeout_ms: 5000,
            remote_backends: 3,
            background: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Propagation,
    Failover,
}

const NS: &str = "default";
const SVC: &str = "web";
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// The endpoint of A that propagation flips.
const FLIP_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
/// B's local backend.
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 10);
const NODE: &str = "b1";

fn remote_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 10 + i)
}

type Backends = BTreeSet<(Ipv4Addr, u16)>;

/// Map reads: count, time spent, reads that caught the maps mid-update (torn).
type Reads = (u64, Duration, u64);

/// The backends b1's maps hold for a frontend (`None`: no master entry), read with
/// point lookups (the master, each slot, each slot's backend), checking that the slots
/// and backends they point to exist. A dump of the two maps walks every bucket: about
/// 0.9 ms here, which kept a core of this 2-core machine busy at a 1 ms read interval.
pub fn frontend_backends(
    maps: &PinnedMaps,
    vip: Ipv4Addr,
    port: u16,
) -> Result<Result<Option<Backends>, String>> {
    let master = ServiceEntryKey::master(vip, port, PROTO_TCP);
    let Some(m) = maps.service(master).context("reading the service map")? else {
        return Ok(Ok(None));
    };
    let mut out = BTreeSet::new();
    for slot in 1..=m.count {
        let Some(v) = maps
            .service(master.with_slot(slot))
            .context("reading the service map")?
        else {
            return Ok(Err(format!("slot {slot} of {} missing", m.count)));
        };
        let Some(b) = maps
            .backend(v.backend_id)
            .context("reading the backend map")?
        else {
            return Ok(Err(format!(
                "slot {slot} points at missing backend {}",
                v.backend_id
            )));
        };
        out.insert((b.ip, b.port));
    }
    Ok(Ok(Some(out)))
}

fn slice(
    name: &str,
    service: &str,
    node: &str,
    endpoints: &[(Ipv4Addr, bool)],
) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, ready)| {
            json!({"addresses": [ip.to_string()], "conditions": {"ready": ready, "serving": ready, "terminating": false},
                   "nodeName": node, "zone": "z1"})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": NS, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}]
    })
}

fn global_service(affinity: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": NS, "name": SVC, "annotations": {
            "service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}},
        "spec": {"selector": {"app": SVC}, "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET_PORT}]}
    })
}

/// Sets the conditions of endpoint `index` of a slice (JSON patch through the store).
fn set_ready(store: &Store, slice: &str, index: usize, ready: bool) -> Result<()> {
    let patch = json!([{"op": "replace", "path": format!("/endpoints/{index}/conditions"),
        "value": {"ready": ready, "serving": ready, "terminating": false}}]);
    store
        .patch(
            &resources::ENDPOINTSLICES,
            Some(NS),
            slice,
            PatchType::Json,
            patch.to_string().as_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("patching EndpointSlice {NS}/{slice}: {e:?}"))?;
    Ok(())
}

/// Reads the maps until `want` holds; returns when it was first seen, `None` at `timeout`.
/// Also accumulates the time spent in map reads (for the resolution figure).
async fn poll_until(
    maps: &PinnedMaps,
    vip: Ipv4Addr,
    interval: Duration,
    timeout: Duration,
    reads: &mut Reads,
    want: impl Fn(&Backends) -> bool,
) -> Result<Option<Instant>> {
    let deadline = Instant::now() + timeout;
    loop {
        let t = Instant::now();
        let read = frontend_backends(maps, vip, PORT)?;
        let seen = Instant::now();
        reads.0 += 1;
        reads.1 += seen - t;
        let now = match read {
            Ok(b) => b.unwrap_or_default(),
            Err(_) => {
                // The entries are read one after the other while the agent updates them:
                // a slot read before a backend's removal can point at it. Read again.
                reads.2 += 1;
                if seen > deadline {
                    return Ok(None);
                }
                continue;
            }
        };
        if want(&now) {
            // The change happened between the previous read and this one; this read's
            // start is the earliest time it is known to be visible.
            return Ok(Some(t));
        }
        if seen > deadline {
            return Ok(None);
        }
        if interval.is_zero() {
            tokio::task::yield_now().await;
        } else {
            // `interval` after this read's start, slept on the thread (the runtime moves its
            // other tasks away): tokio's timer rounds up to its 1 ms ticks, which made reads
            // about 2 ms apart with the default 1 ms.
            let wake = t + interval;
            tokio::task::block_in_place(|| {
                std::thread::sleep(wake.saturating_duration_since(Instant::now()))
            });
        }
    }
}

struct Topology {
    // Drop order: the agent first, then the clusters, then the files.
    agent: AgentNode,
    b: Cluster,
    a: Cluster,
    _ctx: Ctx,
}

async fn setup(kind: Kind, opts: &Opts, components: &Components) -> Result<(Topology, Ipv4Addr)> {
    let ctx = Ctx::new(components.clone())?;
    step("starting cluster a (etcd, lab Kubernetes API, mesh-apiserver)");
    let a = Cluster::start(
        &ctx,
        ClusterSpec {
            name: "a",
            id: 1,
            pod_cidr: "10.1.0.0/16",
            service_cidr: "10.96.0.0/16",
            insecure: false,
            apiserver_args: &[],
        },
    )
    .await?;
    step("starting cluster b, importing a through its peers directory");
    let b = Cluster::start(
        &ctx,
        ClusterSpec {
            name: "b",
            id: 2,
            pod_cidr: "10.2.0.0/16",
            service_cidr: "10.96.0.0/16",
            insecure: false,
            apiserver_args: &[],
        },
    )
    .await?;
    b.import(&a)?;

    let affinity = match kind {
        Kind::Propagation => "none",
        Kind::Failover => "local",
    };
    let create = |store: &Store, rt, obj: serde_json::Value| {
        store
            .create(rt, Some(NS), obj)
            .map_err(|e| anyhow::anyhow!("creating an object in the lab API: {e:?}"))
    };
    let a_store = a.kube.store().clone();
    create(&a_store, &resources::SERVICES, global_service(affinity))?;
    let mut a_eps: Vec<(Ipv4Addr, bool)> = (0..opts.remote_backends)
        .map(|i| (remote_ip(i), true))
        .collect();
    if kind == Kind::Propagation {
        a_eps.push((FLIP_IP, false));
    }
    create(
        &a_store,
        &resources::ENDPOINTSLICES,
        slice("web-a", SVC, "a1", &a_eps),
    )?;
    let b_store = b.kube.store().clone();
    let svc = create(&b_store, &resources::SERVICES, global_service(affinity))?;
    create(
        &b_store,
        &resources::ENDPOINTSLICES,
        slice("web-b", SVC, NODE, &[(LOCAL_IP, true)]),
    )?;
    let vip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .context("B's Service has no ClusterIP")?
        .parse()?;

    step("starting mesh-agent on node b1 of cluster b");
    let mut agent = AgentNode::prepare(&b, NODE, &[])?;
    agent.start(components)?;
    agent.wait_datapath().await?;
    Ok((
        Topology {
            agent,
            b,
            a,
            _ctx: ctx,
        },
        vip,
    ))
}

/// The observation points of the path (see [`crate::hops`]): a's Kubernetes watch, etcd
/// and index, then b's etcd and index for propagation; b's alone for failover.
async fn observe_hops(kind: Kind, topo: &Topology) -> Result<Hops> {
    let svc = format!("{NS}/{SVC}");
    let mut hops = Hops::new(topo.agent.metrics);
    let (src, clusters) = match kind {
        Kind::Propagation => (&topo.a, vec![&topo.a, &topo.b]),
        Kind::Failover => (&topo.b, vec![&topo.b]),
    };
    hops.kube_watch(&format!("{} k8s watch", src.name), src.kube.store(), NS)?;
    for c in clusters {
        hops.etcd_key(&format!("etcd {}", c.name), c, &src.name, &svc)
            .await?;
        hops.index_watch(&format!("{}'s index", c.name), c, &src.name)
            .await?;
    }
    Ok(hops)
}

/// Runs `propagation` or `failover`.
pub async fn run(
    kind: Kind,
    opts: &Opts,
    components: &Components,
    machine: &Machine,
) -> Result<Report> {
    if opts.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if kind == Kind::Failover && opts.remote_backends == 0 {
        bail!("failover needs --remote-backends of at least 1");
    }
    let name = match kind {
        Kind::Propagation => "propagation",
        Kind::Failover => "failover",
    };
    let (mut topo, vip) = setup(kind, opts, components).await?;
    let maps = mesh_maps::open_pinned_readonly(topo.agent.bpffs.pin_dir())
        .context("opening the agent's pinned maps")?;
    let interval = Duration::from_micros(opts.poll_interval_us);
    let timeout = Duration::from_millis(opts.timeout_ms);
    let local: Backends = [(LOCAL_IP, TARGET_PORT)].into();
    let remote: Backends = (0..opts.remote_backends)
        .map(|i| (remote_ip(i), TARGET_PORT))
        .collect();
    let flip = (FLIP_IP, TARGET_PORT);

    // The steady state before the first sample.
    let initial: Backends = match kind {
        Kind::Propagation => local.union(&remote).copied().collect(),
        Kind::Failover => local.clone(),
    };
    step("waiting for b's agent to program the service (a imported into b)");
    let mut reads: Reads = (0, Duration::ZERO, 0);
    let converged = {
        let want = initial.clone();
        poll_until(
            &maps,
            vip,
            interval,
            Duration::from_secs(60),
            &mut reads,
            move |b| *b == want,
        )
        .await?
    };
    if converged.is_none() {
        let log = topo.agent.proc_mut()?.log_tail();
        bail!(
            "b's agent did not program {NS}/{SVC} ({vip}:{PORT}) with {initial:?} within 60s; agent log:\n{log}"
        );
    }
    let mut background =
        crate::scale::Background::start(&opts.background, &mut topo.b, &mut topo.agent).await?;
    let mut reads: Reads = (0, Duration::ZERO, 0);
    step("opening the hop observers (Kubernetes, etcd and gRPC watches)");
    let mut hops = observe_hops(kind, &topo).await?;

    let a_store = topo.a.kube.store().clone();
    let b_store = topo.b.kube.store().clone();
    let mut forward = Vec::with_capacity(opts.samples);
    let mut backward = Vec::with_capacity(opts.samples);
    let (mut fwd_timeouts, mut back_timeouts) = (0, 0);
    let mut progress = Progress::new(&format!("{name} samples"), opts.samples);
    for i in 0..opts.samples {
        topo.agent.proc_mut()?.check_running()?;
        // Forward change, then its reversal; each timed separately.
        for forward_step in [true, false] {
            hops.before_sample();
            let t0 = Instant::now();
            let seen = match (kind, forward_step) {
                (Kind::Propagation, ready) => {
                    set_ready(&a_store, "web-a", usize::from(opts.remote_backends), ready)?;
                    poll_until(&maps, vip, interval, timeout, &mut reads, |b| {
                        b.contains(&flip) == ready
                    })
                    .await?
                }
                (Kind::Failover, to_remote) => {
                    set_ready(&b_store, "web-b", 0, !to_remote)?;
                    let want = if to_remote { &remote } else { &local };
                    poll_until(&maps, vip, interval, timeout, &mut reads, |b| b == want).await?
                }
            };
            let label = if forward_step { "forward" } else { "back" };
            hops.after_sample(label, t0, seen).await;
            match (seen, forward_step) {
                (Some(t), true) => forward.push(t.saturating_duration_since(t0)),
                (Some(t), false) => backward.push(t.saturating_duration_since(t0)),
                (None, true) => fwd_timeouts += 1,
                (None, false) => back_timeouts += 1,
            }
        }
        progress.set(i + 1);
    }
    progress.finish();
    if let Some(bg) = background.as_mut() {
        bg.stop().await?;
    }

    let mean_read_us = if reads.0 == 0 {
        0.0
    } else {
        reads.1.as_secs_f64() * 1e6 / reads.0 as f64
    };
    let (method, fwd_name, back_name, target) = match kind {
        Kind::Propagation => (
            "wall clock from the EndpointSlice write in a's Kubernetes API (endpoint ready / \
             not ready) to the first read of b1's pinned mesh_services + mesh_backends maps \
             (read-only lookups of the frontend's master, slots and backends) that shows the \
             backend added / removed",
            "ready in a -> in b1's map",
            "not ready in a -> out of b1's map",
            LatencyTarget {
                p50_ms: Some(20.0),
                p99_ms: Some(50.0),
            },
        ),
        Kind::Failover => (
            "wall clock from the EndpointSlice write in b's Kubernetes API (b's only local \
             backend not ready / ready, affinity local) to the first read of b1's pinned maps \
             that shows exactly a's backends / the local one",
            "local not ready -> remote in map",
            "local ready -> back to local",
            LatencyTarget {
                p50_ms: None,
                p99_ms: Some(100.0),
            },
        ),
    };
    let mut report = Report::new(
        name,
        machine.clone(),
        &format!(
            "{method}; a read starts every {} us (a thread sleep), so the resolution is the read \
             interval (mean read {mean_read_us:.0} us); path: Kubernetes \
             watch -> apiserver {src} publisher -> etcd -> {relay}gRPC watch -> agent -> maps",
            opts.poll_interval_us,
            src = if kind == Kind::Propagation { "a" } else { "b" },
            relay = if kind == Kind::Propagation {
                "a's index -> gRPC -> b's importer -> b's etcd -> b's index -> "
            } else {
                "b's index -> "
            },
        ),
    );
    report.param("samples", opts.samples);
    report.param("poll_interval_us", opts.poll_interval_us);
    report.param("remote_backends", opts.remote_backends);
    report.param("timeout_ms", opts.timeout_ms);
    report.distributions.push(Distribution::new(
        fwd_name,
        &forward,
        fwd_timeouts,
        Some(target),
    ));
    report
        .distributions
        .push(Distribution::new(back_name, &backward, back_timeouts, None));
    let (hop_dists, samples) = hops.finish("write");
    report.hops = hop_dists;
    report.samples = Some(samples);
    report
        .figures
        .push(Figure::new("map reads", reads.0 as f64, "reads"));
    report
        .figures
        .push(Figure::new("mean map read", mean_read_us, "us"));
    if let Some(bg) = &background {
        bg.describe(&mut report);
    }
    report.figures.push(Figure::new(
        "torn map reads (read again)",
        reads.2 as f64,
        "reads",
    ));
    drop(maps);
    drop(topo);
    Ok(report)
}
