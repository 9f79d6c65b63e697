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
//!   `mesh-lab exec`), without a policy and with an egress policy selecting it (the
//!   datapath then checks every connect and picks an allowed backend), in `--rounds` rounds
//!   that alternate which side goes first (the policy applied or deleted with kubectl, and
//!   awaited in every node's maps, between sides). Per round the ratio of the trimmed means
//!   (middle 90%); the figure is the median of the rounds' ratios. Beside it the kernel's own
//!   run time of the programs per connect() (`BPF_ENABLE_STATS`, summed over every node's
//!   programs: only x-wing connects meanwhile), which shows the policy's datapath cost apart
//!   from the noise of the wall clock on a shared machine.
//!
//! The lab binaries (mesh-lab, meshctl, mesh-apiserver, mesh-agent) are taken from
//! `--bin-dir` or next to mesh-bench. Nothing is asserted about speed; the lab is removed at
//! the end (`mesh-lab down`), also on Ctrl-C.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_agent::datapath::{RunTimeStats, kernel_program_stats};
use mesh_maps::policy::{PolicyDump, PolicyMaps};
use mesh_maps::sys::Access;

use crate::lab::LabGuard;
use crate::report::{Distribution, Figure, LatencyTarget, Machine, Report, Target};
use crate::socket_lb::{PROGRAMS, timed_connect};

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
    /// connect() calls per side and round.
    #[arg(long, default_value_t = 2000)]
    pub connects: usize,
    /// Rounds of the connect() comparison; each measures both sides, alternating which goes
    /// first.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
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
            rounds: 5,
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
/// connect() calls to ADDR, each on a fresh socket closed at once with a reset (as
/// `socket-lb`'s client: no TIME_WAIT, no ephemeral-port search); prints each call's
/// nanoseconds. A failed connect is an error.
pub fn connect_loop(addr: &str, count: usize) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse().context("ADDR is IP:PORT")?;
    let mut out = String::with_capacity(count * 8);
    for i in 0..count + 100 {
        let e = timed_connect(addr).with_context(|| format!("connect #{i}"))?;
        if i >= 100 {
            out.push_str(&e.as_nanos().to_string());
            out.push(' ');
        }
    }
    println!("{out}");
    Ok(())
}

/// Median of `v` in microseconds.
fn median(v: &[Duration]) -> f64 {
    median_f64(v.iter().map(|d| d.as_secs_f64() * 1e6).collect())
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    crate::report::percentile(&v, 50.0)
}

/// Mean of the middle 90% of `v` (the fastest and slowest 5% left out), in microseconds.
/// The connect() times are bimodal (rebel-base's backends sit on this node and on others),
/// so a round's median jumps between the modes with the mix of backends picked, while a
/// mean moves with the mix only in proportion; the trim keeps a few stalls of the shared
/// machine (milliseconds each) from deciding a round.
fn trimmed_mean_us(v: &[Duration]) -> f64 {
    let mut us: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let cut = us.len() / 20;
    let mid = &us[cut..us.len() - cut];
    mid.iter().sum::<f64>() / mid.len().max(1) as f64
}

/// One side of the connect() comparison: its samples and its programs' kernel time.
#[derive(Default)]
struct Side {
    samples: Vec<Duration>,
    prog_time: [Duration; PROGRAMS.len()],
    prog_runs: [u64; PROGRAMS.len()],
}

const EGRESS_POLICY: &str = "bench-egress";

/// Reads every node's maps until no rule whose name contains `marker` is enforced anywhere.
fn wait_gone(
    maps: &[(String, PolicyMaps)],
    marker: &str,
    poll: Duration,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let still = maps.iter().try_fold(false, |acc, (_, m)| {
            Ok::<_, anyhow::Error>(acc || enforced(&m.dump()?, marker))
        })?;
        if !still {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "a policy matching {marker:?} was still enforced on a node {timeout:?} after its deletion"
            );
        }
        std::thread::sleep(poll);
    }
}

/// Applies (`on`) or deletes the egress policy selecting x-wing and waits until every node's
/// maps say so; when applying, also until x-wing's network namespace is known to its node
/// (egress applies to a known endpoint only).
fn set_egress_policy(
    lab: &LabGuard,
    maps: &[(String, PolicyMaps)],
    on: bool,
    xwing_ip: &str,
    poll: Duration,
    timeout: Duration,
) -> Result<()> {
    let marker = format!("demo/{EGRESS_POLICY} ");
    if !on {
        lab.kubectl(
            CLUSTER,
            &["-n", "demo", "delete", "ciliumnetworkpolicy", EGRESS_POLICY],
            None,
        )?;
        return wait_gone(maps, &marker, poll, timeout);
    }
    let spec = "  endpointSelector: {matchLabels: {app: x-wing}}\n  egress:\n  - toEndpoints:\n    \
                - matchLabels: {app: rebel-base}\n    toPorts:\n    - ports:\n      - {port: \"8080\", protocol: TCP}\n";
    lab.kubectl(
        CLUSTER,
        &["apply", "-f", "-"],
        Some(&cnp(EGRESS_POLICY, spec)),
    )?;
    let done = wait_enforced(maps, &marker, Instant::now(), poll, timeout)?;
    if done.iter().any(Option::is_none) {
        bail!("the egress policy was not enforced on every node within {timeout:?}");
    }
    let deadline = Instant::now() + timeout;
    loop {
        let known = maps.iter().try_fold(false, |acc, (_, m)| {
            Ok::<_, anyhow::Error>(
                acc || m
                    .dump()?
                    .netns
                    .values()
                    .any(|n| n.ip.to_string() == xwing_ip),
            )
        })?;
        if known {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("x-wing's network namespace never appeared in its node's policy maps");
        }
        std::thread::sleep(poll);
    }
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
    // rebel-base's ingress allows only those policies' ports while any is enforced: the
    // connect() comparison starts once they are gone from every node.
    wait_gone(&maps, "demo/bench-", poll, timeout)?;

    // connect() to the global service, without and with an egress policy on the client, in
    // rounds that alternate which side goes first, so drift of the machine cancels out of the
    // per-round ratios.
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
    eprintln!(
        "policy: {} rounds of {} connect() calls to {addr} per side",
        opts.rounds, opts.connects
    );
    let _stats = RunTimeStats::enable()?;
    let mut sides = [Side::default(), Side::default()];
    let mut ratios_mean = Vec::new();
    let mut ratios_p50 = Vec::new();
    let mut policy_on = false;
    for round in 0..opts.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut means = [0.0; 2];
        let mut p50s = [0.0; 2];
        for with_policy in order {
            if with_policy != policy_on {
                set_egress_policy(&lab, &maps, with_policy, xwing_ip.trim(), poll, timeout)?;
                policy_on = with_policy;
            }
            let before = kernel_program_stats(&PROGRAMS);
            let v = connects(&lab, &bench, &addr, opts.connects)?;
            let after = kernel_program_stats(&PROGRAMS);
            let side = &mut sides[usize::from(with_policy)];
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                side.prog_time[i] += a.run_time.saturating_sub(b.run_time);
                side.prog_runs[i] += a.run_count.saturating_sub(b.run_count);
            }
            means[usize::from(with_policy)] = trimmed_mean_us(&v);
            p50s[usize::from(with_policy)] = median(&v);
            side.samples.extend(v);
        }
        ratios_mean.push(means[1] / means[0]);
        ratios_p50.push(p50s[1] / p50s[0]);
        eprintln!(
            "policy: round {}/{}: trimmed mean {:.1} us without, {:.1} us with the egress policy",
            round + 1,
            opts.rounds,
            means[0],
            means[1]
        );
    }
    if policy_on {
        set_egress_policy(&lab, &maps, false, xwing_ip.trim(), poll, timeout)?;
    }

    let mut report = Report::new(
        "policy",
        machine,
        "a lab (mesh-lab up: 1 cluster, real apiserver and agents, pods in network namespaces); \
         CiliumNetworkPolicies applied with kubectl one after the other, each node's pinned \
         policy maps read read-only until the policy's rule is in an endpoint's table; then \
         x-wing calls connect() to rebel-base's global ClusterIP without and with an egress \
         policy selecting it, in rounds alternating which side goes first; per round the ratio \
         of the trimmed means (middle 90%), the figure the median over rounds; eBPF time from \
         the kernel's run-time statistics of every node's programs",
    );
    report.param("policies", opts.policies);
    report.param("nodes", maps.len());
    report.param("connects_per_side_and_round", opts.connects);
    report.param("rounds", opts.rounds);
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
    for (name, side) in [
        ("connect() to the global service, no policy", &sides[0]),
        ("connect() to the global service, egress policy", &sides[1]),
    ] {
        report
            .distributions
            .push(Distribution::new(name, &side.samples, 0, None));
    }
    report.figures.push(
        Figure::new(
            "connect() with an egress policy vs none (% slower, trimmed mean per round, median of rounds)",
            (median_f64(ratios_mean) - 1.0) * 100.0,
            "%",
        )
        .with_target(Target::AtMost(5.0)),
    );
    report.figures.push(Figure::new(
        "connect() with an egress policy vs none (% slower, p50 per round, median of rounds)",
        (median_f64(ratios_p50) - 1.0) * 100.0,
        "%",
    ));
    let mut ebpf_ns = [0.0; 2];
    for (s, (label, side)) in [("no policy", &sides[0]), ("egress policy", &sides[1])]
        .into_iter()
        .enumerate()
    {
        let connects = side.prog_runs[0].max(1) as f64;
        let total: Duration = side.prog_time.iter().sum();
        ebpf_ns[s] = total.as_nanos() as f64 / connects;
        report.figures.push(Figure::new(
            &format!("{label}: eBPF time per connect()"),
            ebpf_ns[s],
            "ns",
        ));
        for (i, p) in PROGRAMS.iter().enumerate() {
            report.figures.push(Figure::new(
                &format!(
                    "{label}:   {p} ({:.1} runs per connect())",
                    side.prog_runs[i] as f64 / connects
                ),
                side.prog_time[i].as_nanos() as f64 / connects,
                "ns",
            ));
        }
    }
    report.figures.push(Figure::new(
        "eBPF time the egress policy adds, in % of a connect() without policy (trimmed mean)",
        (ebpf_ns[1] - ebpf_ns[0]) / 10.0 / trimmed_mean_us(&sides[0].samples),
        "%",
    ));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_trimmed_mean_leaves_out_the_slowest_and_fastest_twentieth() {
        let us = Duration::from_micros;
        // 20 samples: one of each end is cut, so a 10 ms stall among them changes nothing.
        let mut v: Vec<_> = (0..18).map(|_| us(100)).collect();
        v.push(us(10_000));
        v.push(us(1));
        assert!((super::trimmed_mean_us(&v) - 100.0).abs() < 1e-9);
        // Two modes: the mean moves with the mix in proportion.
        let v: Vec<_> = (0..20).map(|i| us(if i < 10 { 50 } else { 150 })).collect();
        assert!((super::trimmed_mean_us(&v) - 100.0).abs() < 1e-9);
        assert_eq!(super::trimmed_mean_us(&[]), 0.0);
    }
}
