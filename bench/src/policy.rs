//! `policy`: DESIGN.md section 14's numbers in a lab (`mesh-lab up`: one cluster of N
//! nodes, the real apiserver and agents, pods in network namespaces), driven with kubectl
//! as a user would:
//!
//! - **applied -> enforced**: CiliumNetworkPolicies applied one after the other with
//!   `kubectl apply`; from the moment kubectl returns (the API holds the object), every
//!   node's pinned policy maps are read (`BPF_F_RDONLY`, every `--poll-interval-us`) until
//!   the policy's rule is in the table of the endpoint it selects (the agent writes rule
//!   names and entries before the endpoint that uses them, so this is "enforced"). One
//!   sample per (policy, node), and per policy the time until the last node.
//! - **connect() with a policy vs without**: x-wing (a pod) calls `connect()` to rebel-base's
//!   global ClusterIP `--connects` times (`mesh-bench connect-loop` run in the pod with
//!   `mesh-lab exec`), without a policy, with an egress policy selecting it (the datapath
//!   then checks every connect and picks an allowed backend), and without again.
//!
//! The lab binaries (mesh-lab, meshctl, mesh-apiserver, mesh-agent) are taken from
//! `--bin-dir` or next to mesh-bench. Nothing is asserted about speed; the lab is removed at
//! the end (`mesh-lab down`), also on Ctrl-C.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_maps::policy::{PolicyDump, PolicyMaps};
use mesh_maps::sys::Access;

use crate::lab::LabGuard;
use crate::report::{Distribution, Figure, LatencyTarget, Machine, Report, Target};

const REBEL_BASE: &str = include_str!("../../examples/lab-demo/rebel-base.yaml");
const X_WING: &str = include_str!("../../examples/lab-demo/x-wing.yaml");
const CLUSTER: &str = "east";

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Policies applied one after the other (one sample per policy and node).
    #[arg(long, default_value_t = 30)]
    pub policies: usize,
    /// Nodes of the lab's cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// connect() calls per side.
    #[arg(long, default_value_t = 2000)]
    pub connects: usize,
    /// How often each node's policy maps are read while waiting.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_us: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            policies: 30,
            nodes: 3,
            connects: 2000,
            poll_interval_us: 1000,
        }
    }
}

/// The pinned policy maps of every node of the cluster, opened read-only.
fn node_maps(lab: &LabGuard) -> Result<Vec<(String, PolicyMaps)>> {
    lab.node_pin_dirs(CLUSTER)?
        .into_iter()
        .map(|(n, pin)| {
            let dir = pin.join("maps");
            PolicyMaps::open_pinned(&dir, Access::ReadOnly)
                .with_context(|| format!("opening {}", dir.display()))
                .map(|m| (n, m))
        })
        .collect()
}

/// Whether a rule whose name contains `policy` is in the table of some endpoint (ingress or
/// egress): the policy is enforced by this node's maps.
fn enforced(dump: &PolicyDump, policy: &str) -> bool {
    let rules: Vec<u32> = dump
        .rules
        .iter()
        .filter(|(_, name)| name.contains(policy))
        .map(|(id, _)| *id)
        .collect();
    if rules.is_empty() {
        return false;
    }
    dump.endpoints.values().any(|ep| {
        dump.entries.iter().any(|(k, v)| {
            rules.contains(&v.rule) && (k.table == ep.ingress_table || k.table == ep.egress_table)
        })
    })
}

/// Reads every node's maps until `policy` is enforced there; per node the time since `t0`
/// (`None`: not within `timeout`).
fn wait_enforced(
    maps: &[(String, PolicyMaps)],
    policy: &str,
    t0: Instant,
    poll: Duration,
    timeout: Duration,
) -> Result<Vec<Option<Duration>>> {
    let mut done: Vec<Option<Duration>> = vec![None; maps.len()];
    while done.iter().any(Option::is_none) && t0.elapsed() < timeout {
        for (i, (_, m)) in maps.iter().enumerate() {
            if done[i].is_none() && enforced(&m.dump()?, policy) {
                done[i] = Some(t0.elapsed());
            }
        }
        std::thread::sleep(poll);
    }
    Ok(done)
}

fn cnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  \
         namespace: demo\n  labels: {{mesh-bench: policy}}\nspec:\n{spec}"
    )
}

/// Runs `connect-loop` in x-wing: `count` connect() calls to `addr`, each timed.
fn connects(lab: &LabGuard, bench: &Path, addr: &str, count: usize) -> Result<Vec<Duration>> {
    let out = lab.lab(&[
        "exec",
        CLUSTER,
        "-n",
        "demo",
        "deploy/x-wing",
        "--",
        bench.to_str().context("mesh-bench path")?,
        "connect-loop",
        addr,
        &count.to_string(),
    ])?;
    out.split_whitespace()
        .map(|ns| {
            Ok(Duration::from_nanos(
                ns.parse().context("connect-loop output")?,
            ))
        })
        .collect()
}

/// `mesh-bench connect-loop ADDR COUNT` (run inside a pod): after 100 warm-up calls, COUNT
/// connect() calls to ADDR, each on a fresh socket closed at once; prints each call's
/// nanoseconds. A failed connect is an error.
pub fn connect_loop(addr: &str, count: usize) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse().context("ADDR is IP:PORT")?;
    let mut out = String::with_capacity(count * 8);
    for i in 0..count + 100 {
        let t = Instant::now();
        let s = std::net::TcpStream::connect(addr).with_context(|| format!("connect #{i}"))?;
        let e = t.elapsed();
        drop(s);
        if i >= 100 {
            out.push_str(&e.as_nanos().to_string());
            out.push(' ');
        }
    }
    println!("{out}");
    Ok(())
}

fn median(v: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    ms.sort_by(f64::total_cmp);
    crate::report::percentile(&ms, 50.0)
}

pub async fn run(opts: &Opts, bin_dir: &Path, machine: &Machine) -> Result<Report> {
    let opts = opts.clone();
    let bin_dir = bin_dir.to_owned();
    let machine = machine.clone();
    // Blocking processes and map reads: off the runtime's threads.
    tokio::task::spawn_blocking(move || run_blocking(&opts, &bin_dir, machine))
        .await
        .context("the policy benchmark's thread")?
}

fn run_blocking(opts: &Opts, bin_dir: &Path, machine: Machine) -> Result<Report> {
    let bench = std::env::current_exe().context("mesh-bench's own path")?;
    let lab = LabGuard::up_from(bin_dir, "pb", 1, opts.nodes)?;
    lab.kubectl(CLUSTER, &["apply", "-f", "-"], Some(REBEL_BASE))?;
    lab.kubectl(CLUSTER, &["apply", "-f", "-"], Some(X_WING))?;
    lab.kubectl(
        CLUSTER,
        &[
            "-n",
            "demo",
            "annotate",
            "service",
            "rebel-base",
            "service.cilium.io/global=true",
        ],
        None,
    )?;
    for d in ["rebel-base", "x-wing"] {
        lab.kubectl(
            CLUSTER,
            &[
                "-n",
                "demo",
                "rollout",
                "status",
                &format!("deployment/{d}"),
                "--timeout=120s",
            ],
            None,
        )?;
    }
    let maps = node_maps(&lab)?;
    let poll = Duration::from_micros(opts.poll_interval_us);
    let timeout = Duration::from_secs(10);

    // Applied -> enforced on every node.
    eprintln!(
        "policy: {} policies applied one after the other, {} nodes",
        opts.policies,
        maps.len()
    );
    let mut per_node = Vec::new();
    let mut every_node = Vec::new();
    let mut kubectl_times = Vec::new();
    let (mut node_timeouts, mut policy_timeouts) = (0, 0);
    for i in 0..opts.policies {
        let name = format!("bench-{i}");
        let spec = format!(
            "  endpointSelector: {{matchLabels: {{app: rebel-base}}}}\n  ingress:\n  - fromEndpoints:\n    \
             - matchLabels: {{app: x-wing}}\n    toPorts:\n    - ports:\n      - {{port: \"{}\", protocol: TCP}}\n",
            10000 + i
        );
        let t = Instant::now();
        lab.kubectl(CLUSTER, &["apply", "-f", "-"], Some(&cnp(&name, &spec)))?;
        kubectl_times.push(t.elapsed());
        let t0 = Instant::now();
        let done = wait_enforced(&maps, &format!("demo/{name} "), t0, poll, timeout)?;
        for d in &done {
            match d {
                Some(d) => per_node.push(*d),
                None => node_timeouts += 1,
            }
        }
        match done.iter().copied().collect::<Option<Vec<_>>>() {
            Some(all) => every_node.push(all.into_iter().max().unwrap_or_default()),
            None => policy_timeouts += 1,
        }
    }
    lab.kubectl(
        CLUSTER,
        &[
            "-n",
            "demo",
            "delete",
            "ciliumnetworkpolicy",
            "-l",
            "mesh-bench=policy",
        ],
        None,
    )?;

    // connect() to the global service, without and with an egress policy on the client.
    let vip = lab.kubectl(
        CLUSTER,
        &[
            "-n",
            "demo",
            "get",
            "service",
            "rebel-base",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    )?;
    let addr = format!("{}:80", vip.trim());
    eprintln!(
        "policy: {} connect() calls to {addr} per side",
        opts.connects
    );
    let without = connects(&lab, &bench, &addr, opts.connects)?;
    let spec = "  endpointSelector: {matchLabels: {app: x-wing}}\n  egress:\n  - toEndpoints:\n    \
                - matchLabels: {app: rebel-base}\n    toPorts:\n    - ports:\n      - {port: \"8080\", protocol: TCP}\n";
    lab.kubectl(
        CLUSTER,
        &["apply", "-f", "-"],
        Some(&cnp("bench-egress", spec)),
    )?;
    let t0 = Instant::now();
    let done = wait_enforced(&maps, "demo/bench-egress ", t0, poll, timeout)?;
    if done.iter().any(Option::is_none) {
        bail!("the egress policy was not enforced on every node within {timeout:?}");
    }
    // The client's namespace must be known to its node's agent for egress to apply.
    let xwing_ip = lab.kubectl(
        CLUSTER,
        &[
            "-n",
            "demo",
            "get",
            "pods",
            "-l",
            "app=x-wing",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
        None,
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        let known = maps.iter().try_fold(false, |acc, (_, m)| {
            Ok::<_, anyhow::Error>(
                acc || m
                    .dump()?
                    .netns
                    .values()
                    .any(|n| n.ip.to_string() == xwing_ip.trim()),
            )
        })?;
        if known {
            break;
        }
        if Instant::now() > deadline {
            bail!("x-wing's network namespace never appeared in its node's policy maps");
        }
        std::thread::sleep(poll);
    }
    let with = connects(&lab, &bench, &addr, opts.connects)?;
    lab.kubectl(
        CLUSTER,
        &[
            "-n",
            "demo",
            "delete",
            "ciliumnetworkpolicy",
            "bench-egress",
        ],
        None,
    )?;
    let t0 = Instant::now();
    while Instant::now() < t0 + timeout {
        if !maps
            .iter()
            .map(|(_, m)| m.dump().map(|d| enforced(&d, "demo/bench-egress ")))
            .collect::<Result<Vec<_>, _>>()?
            .contains(&true)
        {
            break;
        }
        std::thread::sleep(poll);
    }
    let without_again = connects(&lab, &bench, &addr, opts.connects)?;

    let mut report = Report::new(
        "policy",
        machine,
        "a lab (mesh-lab up: 1 cluster, real apiserver and agents, pods in network namespaces); \
         CiliumNetworkPolicies applied with kubectl one after the other, each node's pinned \
         policy maps read read-only until the policy's rule is in an endpoint's table; then \
         x-wing calls connect() to rebel-base's global ClusterIP without a policy, with an \
         egress policy selecting it, and without again",
    );
    report.param("policies", opts.policies);
    report.param("nodes", maps.len());
    report.param("connects_per_side", opts.connects);
    report.param("poll_interval_us", opts.poll_interval_us);
    report.distributions.push(Distribution::new(
        "kubectl apply returned -> enforced on a node",
        &per_node,
        node_timeouts,
        None,
    ));
    report.distributions.push(Distribution::new(
        "kubectl apply returned -> enforced on every node",
        &every_node,
        policy_timeouts,
        Some(LatencyTarget {
            p50_ms: None,
            p99_ms: Some(100.0),
        }),
    ));
    report.distributions.push(Distribution::new(
        "kubectl apply itself (process start to exit)",
        &kubectl_times,
        0,
        None,
    ));
    for (name, v) in [
        ("connect() to the global service, no policy", &without),
        ("connect() to the global service, egress policy", &with),
        (
            "connect() to the global service, no policy (again)",
            &without_again,
        ),
    ] {
        report
            .distributions
            .push(Distribution::new(name, v, 0, None));
    }
    let base = (median(&without) + median(&without_again)) / 2.0;
    let ratio = median(&with) / base;
    report.figures.push(
        Figure::new(
            "connect() median with policy / without (mean of both runs without)",
            (ratio - 1.0) * 100.0,
            "% slower",
        )
        .with_target(Target::AtMost(5.0)),
    );
    let mut by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for (n, _) in &maps {
        *by_node.entry(n.as_str()).or_default() += 1;
    }
    report.notes.push(format!(
        "nodes read: {}; map read every {} us (each read dumps the node's policy maps)",
        by_node.keys().copied().collect::<Vec<_>>().join(", "),
        opts.poll_interval_us
    ));
    Ok(report)
}
