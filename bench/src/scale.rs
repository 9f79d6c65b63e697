//! `scale`: Cilium's clustermesh scale profile (250 clusters x 100 nodes, 250k endpoints,
//! 25k identities, ~325 changes/s) on one mesh-apiserver and one mesh-agent.
//!
//! The synthetic clusters are served by the [`generator`](crate::generator) in this process
//! (real gRPC Watch over mutual TLS, one CA and port per cluster) and imported by the
//! apiserver's real importer from its peers directory; the agent (running from the start)
//! programs everything into its pinned maps. Printed: time to full sync (index complete,
//! agent's ipcache complete), propagation under churn (pod replaced in a synthetic cluster
//! -> new address in the agent's ipcache / old address gone), CPU of each process during
//! the churn, RSS per endpoint, etcd's size.
//!
//! [`Background`] runs the same generator and churn behind another benchmark
//! (`propagation`/`failover --background-*`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_maps::PinnedMaps;
use mesh_proto::peer_entry::render_entry;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::{AgentNode, Cluster, Ctx};
use crate::env::{self, Components};
use crate::generator::{self, Pods, Served, Shape, SynthCluster};
use crate::report::{Distribution, Figure, LatencyTarget, Machine, Report, Target};
use crate::{Progress, step};

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Synthetic clusters (each served on its own port with its own CA).
    #[arg(long, default_value_t = 250)]
    pub clusters: usize,
    /// Nodes per synthetic cluster.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Pods (endpoints) per node.
    #[arg(long, default_value_t = 10)]
    pub pods_per_node: usize,
    /// Identities per synthetic cluster (250 x 100 = the profile's 25k).
    #[arg(long, default_value_t = 100)]
    pub identities_per_cluster: usize,
    /// Churn: pods replaced per second across all clusters (each replacement is one
    /// revision of its cluster: a new endpoint at a new address, the old one deleted).
    #[arg(long, default_value_t = 325.0)]
    pub churn: f64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Replacements timed: every Nth (0: about 50 per second).
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    /// Interval between two rounds of ipcache lookups of the pending samples (us).
    #[arg(long, default_value_t = 2000)]
    pub poll_interval_us: u64,
    /// A timed replacement not seen in the maps after this long counts as a timeout (ms).
    #[arg(long, default_value_t = 30_000)]
    pub sample_timeout_ms: u64,
    /// Give up the initial sync when nothing progressed for this many seconds.
    #[arg(long, default_value_t = 120)]
    pub stall_s: u64,
    /// Churn during the initial sync too (untimed): snapshots taken while the clusters
    /// change; the end-of-run check then shows whether any change was lost.
    #[arg(long)]
    pub churn_during_sync: bool,
    /// Every this many ms, drop the open streams of one synthetic cluster (round robin),
    /// so the importer reconnects and resumes under the churn (0: never).
    #[arg(long, default_value_t = 0)]
    pub kick_every_ms: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            clusters: 250,
            nodes: 100,
            pods_per_node: 10,
            identities_per_cluster: 100,
            churn: 325.0,
            duration: 60,
            sample_every: 0,
            poll_interval_us: 2000,
            sample_timeout_ms: 30_000,
            stall_s: 120,
            churn_during_sync: false,
            kick_every_ms: 0,
        }
    }
}

const NODE: &str = "n1";

/// The synthetic clusters of a run, served, with their pods.
pub struct Fleet {
    pub served: Vec<Served>,
    pub shape: Shape,
}

impl Fleet {
    /// Builds and serves `shape`'s clusters, trusting `importer`'s CA.
    pub async fn start(shape: Shape, importer: &Cluster) -> Result<Self> {
        shape.check()?;
        let mut progress = Progress::new("synthetic clusters served", shape.clusters);
        let mut served = Vec::with_capacity(shape.clusters);
        for i in 0..shape.clusters {
            let cluster = generator::profile_cluster(i, &shape);
            served.push(generator::serve(cluster, &importer.name, &importer.ca.cert_pem).await?);
            progress.set(i + 1);
        }
        progress.finish();
        Ok(Fleet { served, shape })
    }

    /// Writes one peer entry per cluster into `importer`'s peers directory (what
    /// `meshctl connect` would do), all at once.
    pub fn connect(&self, importer: &Cluster) -> Result<()> {
        for s in &self.served {
            let path = importer
                .dir
                .join("peers")
                .join(format!("{}.yaml", s.cluster.name));
            std::fs::write(&path, render_entry(&s.peer_spec()?))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    pub fn clusters(&self) -> Vec<Arc<SynthCluster>> {
        self.served.iter().map(|s| s.cluster.clone()).collect()
    }
}

/// `mesh_apiserver_index_objects{cluster=...,kind=KIND}` of every synthetic cluster.
pub fn index_counts(body: &str, kind: &str) -> BTreeMap<String, u64> {
    let suffix = format!("\",kind=\"{kind}\"}}");
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("mesh_apiserver_index_objects{cluster=\"syn-")?;
            let (labels, value) = rest.rsplit_once(' ')?;
            let name = labels.strip_suffix(&suffix)?;
            Some((format!("syn-{name}"), value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The sum of every series of a metric (any labels).
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Waits until the apiserver's index holds every synthetic cluster's endpoints; fails with
/// the clusters still short when nothing progressed for `stall`.
pub async fn wait_index(cluster: &mut Cluster, fleet: &Fleet, stall: Duration) -> Result<()> {
    let want = fleet.shape.pods() as u64;
    let total = fleet.shape.total_endpoints();
    let mut progress = Progress::new("apiserver index (synthetic endpoints)", total);
    let mut last = (0u64, Instant::now());
    loop {
        cluster.apiserver.check_running()?;
        let body = cluster.metrics_text().unwrap_or_default();
        let counts = index_counts(&body, "endpoints");
        let sum: u64 = counts.values().sum();
        progress.set(sum as usize);
        let complete = counts.len() == fleet.served.len() && counts.values().all(|n| *n == want);
        if complete {
            progress.finish();
            return Ok(());
        }
        if sum != last.0 {
            last = (sum, Instant::now());
        } else if last.1.elapsed() > stall {
            let short: Vec<String> = fleet
                .served
                .iter()
                .filter_map(|s| {
                    let n = counts.get(&s.cluster.name).copied().unwrap_or(0);
                    (n != want).then(|| format!("{} {n}/{want}", s.cluster.name))
                })
                .collect();
            bail!(
                "the apiserver's index stalled at {sum}/{total} synthetic endpoints for {stall:?}; \
                 {} clusters short: {}; peer snapshots {}, resumes {}, reconnects {}, dropped {}; \
                 apiserver log:\n{}",
                short.len(),
                short
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                metric_sum(&body, "mesh_apiserver_peer_snapshots_total"),
                metric_sum(&body, "mesh_apiserver_peer_resumes_total"),
                metric_sum(&body, "mesh_apiserver_peer_reconnects_total"),
                metric_sum(&body, "mesh_apiserver_peer_dropped_total"),
                cluster.apiserver.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the agent reports `want` ipcache entries; fails when nothing progressed
/// for `stall`.
async fn wait_agent_ipcache(agent: &mut AgentNode, want: u64, stall: Duration) -> Result<()> {
    let mut progress = Progress::new("agent ipcache entries", want as usize);
    let mut last = (0u64, Instant::now());
    loop {
        agent.proc_mut()?.check_running()?;
        let got = agent.map_entries("ipcache").unwrap_or(0);
        progress.set(got as usize);
        if got == want {
            progress.finish();
            return Ok(());
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > stall {
            bail!(
                "the agent's ipcache stalled at {got}/{want} entries for {stall:?}; log:\n{}",
                agent.proc_mut()?.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the agent reports at least `want` ipcache entries (other clusters' entries
/// may come on top).
async fn wait_agent_ipcache_at_least(
    agent: &mut AgentNode,
    want: u64,
    stall: Duration,
) -> Result<()> {
    let mut last = (0u64, Instant::now());
    loop {
        agent.proc_mut()?.check_running()?;
        let got = agent.map_entries("ipcache").unwrap_or(0);
        if got >= want {
            return Ok(());
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > stall {
            bail!(
                "the agent's ipcache stalled at {got} entries (want at least {want}) for {stall:?}; log:\n{}",
                agent.proc_mut()?.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ================================================================ churn

/// The pods of fresh profile clusters.
pub fn fresh_pods(shape: &Shape) -> Vec<Pods> {
    (0..shape.clusters).map(|i| Pods::new(i, shape)).collect()
}

/// A replacement: timed, or only reported so that a timed one it supersedes (the same
/// pod replaced again before the first change was seen) is dropped, not counted as lost.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub old: Ipv4Addr,
    pub new: Ipv4Addr,
    pub at: Instant,
    pub timed: bool,
}

/// What a churn run did.
#[derive(Debug)]
pub struct ChurnDone {
    pub replacements: u64,
    pub elapsed: Duration,
    pub pods: Vec<Pods>,
}

/// Replaces pods at `rate` per second (round robin over the clusters, a random pod of each)
/// until `stop`; every `sample_every`th replacement is sent to `samples`. `pods`: the
/// clusters' pods as they are now ([`Pods::new`] for fresh clusters).
pub fn spawn_churn(
    clusters: Vec<Arc<SynthCluster>>,
    mut pods: Vec<Pods>,
    shape: Shape,
    rate: f64,
    sample_every: usize,
    samples: Option<mpsc::UnboundedSender<Sample>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<ChurnDone> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::SmallRng::from_os_rng();
        let t0 = Instant::now();
        let mut done = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.is_cancelled() && rate > 0.0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let due = (rate * t0.elapsed().as_secs_f64()) as u64;
            while done < due {
                let i = (done % clusters.len() as u64) as usize;
                let pod = rng.random_range(0..shape.pods());
                let (old, new) = generator::replace_pod(&clusters[i], &mut pods[i], i, &shape, pod);
                if let Some(tx) = &samples {
                    let _ = tx.send(Sample {
                        old,
                        new,
                        at: Instant::now(),
                        timed: done.is_multiple_of(sample_every.max(1) as u64),
                    });
                }
                done += 1;
            }
        }
        ChurnDone {
            replacements: done,
            elapsed: t0.elapsed(),
            pods,
        }
    })
}

/// Timed samples: until the new address is in the ipcache and the old one is gone.
#[derive(Debug, Default)]
pub struct Timings {
    pub added: Vec<Duration>,
    pub removed: Vec<Duration>,
    pub timeouts_added: usize,
    pub timeouts_removed: usize,
    /// Timed replacements whose pod was replaced again before both were seen: dropped
    /// (the agent may never program an address that lived shorter than a reconcile).
    pub superseded: usize,
    pub lookups: u64,
    pub lookup_time: Duration,
    /// (replaced at, latency) of `added`, to see a trend (a backlog grows).
    pub added_in_order: Vec<(Instant, Duration)>,
}

impl Timings {
    /// Median latency of the first and of the last third of the samples (by replacement
    /// time): equal in a steady state, growing when a backlog builds up.
    pub fn thirds(&self) -> (f64, f64) {
        let mut v = self.added_in_order.clone();
        v.sort_by_key(|(at, _)| *at);
        let n = v.len() / 3;
        let median = |xs: &[(Instant, Duration)]| {
            let mut ms: Vec<f64> = xs.iter().map(|(_, d)| d.as_secs_f64() * 1e3).collect();
            ms.sort_by(f64::total_cmp);
            ms.get(ms.len() / 2).copied().unwrap_or(0.0)
        };
        if n == 0 {
            return (0.0, 0.0);
        }
        (median(&v[..n]), median(&v[v.len() - n..]))
    }

    /// The samples slower than `limit`, by the second of the churn they were replaced in
    /// (seconds since the first sample): whether the tail is spread out or comes in stalls.
    pub fn slow_by_second(&self, limit: Duration) -> Vec<(u64, usize)> {
        let Some(start) = self.added_in_order.iter().map(|(at, _)| *at).min() else {
            return Vec::new();
        };
        let mut by: BTreeMap<u64, usize> = BTreeMap::new();
        for (at, d) in &self.added_in_order {
            if *d > limit {
                *by.entry(at.duration_since(start).as_secs()).or_default() += 1;
            }
        }
        by.into_iter().collect()
    }
}

struct Pending {
    s: Sample,
    added: Option<Instant>,
    removed: Option<Instant>,
}

/// Polls the pinned ipcache for the samples of `rx` until it is closed and every sample is
/// done or timed out.
pub async fn time_samples(
    maps: &PinnedMaps,
    mut rx: mpsc::UnboundedReceiver<Sample>,
    interval: Duration,
    timeout: Duration,
) -> Result<Timings> {
    let mut t = Timings::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut open = true;
    while open || !pending.is_empty() {
        loop {
            match rx.try_recv() {
                Ok(s) => {
                    let before = pending.len();
                    pending.retain(|p| p.s.new != s.old || p.added.is_some());
                    t.superseded += before - pending.len();
                    if s.timed {
                        pending.push(Pending {
                            s,
                            added: None,
                            removed: None,
                        });
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let round = Instant::now();
        for p in &mut pending {
            // A lookup's start is the earliest time the change is known visible.
            if p.added.is_none() {
                let at = Instant::now();
                // No prefix covers the synthetic pod CIDRs: a hit is the /32 entry.
                if maps.ipcache_lookup(p.s.new)?.is_some() {
                    p.added = Some(at);
                }
                t.lookups += 1;
            }
            if p.removed.is_none() {
                let at = Instant::now();
                if maps.ipcache_lookup(p.s.old)?.is_none() {
                    p.removed = Some(at);
                }
                t.lookups += 1;
            }
        }
        t.lookup_time += round.elapsed();
        pending.retain(|p| {
            let expired = p.s.at.elapsed() > timeout;
            let done = p.added.is_some() && p.removed.is_some();
            if done || expired {
                match p.added {
                    Some(a) => {
                        let d = a.saturating_duration_since(p.s.at);
                        t.added.push(d);
                        t.added_in_order.push((p.s.at, d));
                    }
                    None => t.timeouts_added += 1,
                }
                match p.removed {
                    Some(r) => t.removed.push(r.saturating_duration_since(p.s.at)),
                    None => t.timeouts_removed += 1,
                }
            }
            !(done || expired)
        });
        // The lookups must not compete with what they measure: when a round is long (many
        // samples pending), wait 20 rounds' time, so they take at most ~5% of a core.
        tokio::time::sleep(interval.max(round.elapsed() * 20)).await;
    }
    Ok(t)
}

// ================================================================ background churn

/// The scale profile's churn behind another benchmark.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackgroundOpts {
    /// Synthetic clusters imported by the measured cluster while the samples run (0: none,
    /// an idle mesh). E.g. 250 with --background-nodes 100 --background-churn 325 is the
    /// scale profile.
    #[arg(long, default_value_t = 0)]
    pub background_clusters: usize,
    /// Nodes per background cluster (10 pods each).
    #[arg(long, default_value_t = 100)]
    pub background_nodes: usize,
    /// Background pods replaced per second, across the background clusters.
    #[arg(long, default_value_t = 325.0)]
    pub background_churn: f64,
}

/// A running background: the fleet and its churn; stopped on drop.
pub struct Background {
    fleet: Fleet,
    stop: CancellationToken,
    churn: Option<tokio::task::JoinHandle<ChurnDone>>,
    /// Peer entries written -> the importer's index holds every background endpoint.
    pub sync: Duration,
    /// Pods replaced per second while it ran (set by [`Background::stop`]).
    pub rate: f64,
}

impl Background {
    /// Serves the background clusters, has `importer` import them, waits until its index
    /// holds them all and `agent` (a node of `importer`) has them in its ipcache, and
    /// starts the churn. `None` when no background is asked for.
    pub async fn start(
        opts: &BackgroundOpts,
        importer: &mut Cluster,
        agent: &mut AgentNode,
    ) -> Result<Option<Self>> {
        if opts.background_clusters == 0 {
            return Ok(None);
        }
        let shape = Shape {
            clusters: opts.background_clusters,
            nodes: opts.background_nodes,
            pods_per_node: 10,
            identities_per_cluster: 100,
        };
        step(&format!(
            "background: {} synthetic clusters x {} nodes ({} endpoints), churn {}/s",
            shape.clusters,
            shape.nodes,
            shape.total_endpoints(),
            opts.background_churn
        ));
        let fleet = Fleet::start(shape, importer).await?;
        let t0 = Instant::now();
        fleet.connect(importer)?;
        let stall = Duration::from_secs(120);
        wait_index(importer, &fleet, stall).await?;
        let sync = t0.elapsed();
        let want = (shape.total_endpoints() + shape.total_nodes()) as u64;
        wait_agent_ipcache_at_least(agent, want, stall).await?;
        let stop = CancellationToken::new();
        // The first replacement is awaited before the samples start, so that they are taken
        // under churn however short they are (then the receiver goes: nothing queues).
        let (first_tx, mut first_rx) = mpsc::unbounded_channel();
        let churn = spawn_churn(
            fleet.clusters(),
            fresh_pods(&shape),
            shape,
            opts.background_churn,
            1,
            Some(first_tx),
            stop.clone(),
        );
        if opts.background_churn > 0.0 {
            let within = Duration::from_secs_f64(10.0 + 2.0 / opts.background_churn);
            if tokio::time::timeout(within, first_rx.recv()).await.is_err() {
                bail!("background: no pod replaced within {within:?} of starting the churn");
            }
        }
        drop(first_rx);
        Ok(Some(Background {
            fleet,
            stop,
            churn: Some(churn),
            sync,
            rate: 0.0,
        }))
    }

    /// Stops the churn and records the replacements made per second.
    pub async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        if let Some(churn) = self.churn.take() {
            let done = churn.await?;
            self.rate = done.replacements as f64 / done.elapsed.as_secs_f64().max(1e-9);
        }
        Ok(())
    }

    /// Adds the background's parameters and figures to `report`.
    pub fn describe(&self, report: &mut Report) {
        let s = &self.fleet.shape;
        report.param("background_clusters", s.clusters);
        report.param("background_nodes", s.nodes);
        report.param("background_endpoints", s.total_endpoints());
        report.figures.push(Figure::new(
            "background: synthetic clusters imported (index complete)",
            self.sync.as_secs_f64(),
            "s",
        ));
        report.figures.push(Figure::new(
            "background: pods replaced during the samples",
            self.rate,
            "per s",
        ));
        report.notes.push(format!(
            "measured while {} synthetic clusters ({} endpoints, served by mesh-bench's \
             generator over gRPC, imported by the measured cluster's importer, in the \
             measured agent's ipcache) had pods replaced in the background",
            s.clusters,
            s.total_endpoints()
        ));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ================================================================ the benchmark

/// CPU time of the processes of a run.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    apiserver: Duration,
    agent: Duration,
    etcd: Duration,
    bench: Duration,
}

fn cpu(apiserver: u32, agent: u32, etcd: u32) -> Result<Cpu> {
    Ok(Cpu {
        apiserver: env::cpu_time(apiserver)?,
        agent: env::cpu_time(agent)?,
        etcd: env::cpu_time(etcd)?,
        bench: env::cpu_time(std::process::id())?,
    })
}

async fn etcd_db_size(cluster: &Cluster) -> Result<f64> {
    let mut c = cluster.etcd_client().await?;
    let s = c.status().await.context("etcd status")?;
    Ok(s.db_size() as f64 / (1024.0 * 1024.0))
}

pub async fn run(opts: &Opts, components: &Components, machine: &Machine) -> Result<Report> {
    let shape = Shape {
        clusters: opts.clusters,
        nodes: opts.nodes,
        pods_per_node: opts.pods_per_node,
        identities_per_cluster: opts.identities_per_cluster,
    };
    shape.check()?;
    let ctx = Ctx::new(components.clone())?;
    let mut cluster = crate::initial_sync::start_local_cluster(&ctx).await?;
    step("starting mesh-agent on node n1");
    let mut agent = AgentNode::prepare(&cluster, NODE, &[])?;
    agent.start(components)?;
    agent.wait_datapath().await?;
    let etcd_pid = env::etcd_pid(cluster.etcd.data_dir())?;
    let agent_pid = agent.proc_mut()?.pid();
    let apiserver_pid = cluster.apiserver.pid();
    let etcd_before = etcd_db_size(&cluster).await?;

    step(&format!(
        "serving {} synthetic clusters x {} nodes x {} pods ({} endpoints, {} identities)",
        shape.clusters,
        shape.nodes,
        shape.pods_per_node,
        shape.total_endpoints(),
        shape.clusters * shape.identities_per_cluster
    ));
    let fleet = Fleet::start(shape, &cluster).await?;

    step("connecting: one peer entry per synthetic cluster in the apiserver's peers directory");
    let stall = Duration::from_secs(opts.stall_s);
    let sync_stop = CancellationToken::new();
    let sync_churn = opts.churn_during_sync.then(|| {
        step("the churn runs during the initial sync too (--churn-during-sync)");
        spawn_churn(
            fleet.clusters(),
            fresh_pods(&shape),
            shape,
            opts.churn,
            1,
            None,
            sync_stop.clone(),
        )
    });
    let kicker = (opts.kick_every_ms > 0).then(|| {
        let clusters = fleet.clusters();
        let every = Duration::from_millis(opts.kick_every_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            for i in 0.. {
                tick.tick().await;
                clusters[i % clusters.len()].kick();
            }
        })
    });
    let t0 = Instant::now();
    fleet.connect(&cluster)?;
    wait_index(&mut cluster, &fleet, stall).await?;
    let index_sync = t0.elapsed();
    let want_ipcache = (shape.total_endpoints() + shape.total_nodes()) as u64;
    wait_agent_ipcache(&mut agent, want_ipcache, stall).await?;
    let agent_sync = t0.elapsed();
    let pods = match sync_churn {
        Some(task) => {
            sync_stop.cancel();
            task.await?.pods
        }
        None => fresh_pods(&shape),
    };
    let body = cluster.metrics_text()?;
    let sync_snapshots = metric_sum(&body, "mesh_apiserver_peer_snapshots_total");
    let sync_reconnects = metric_sum(&body, "mesh_apiserver_peer_reconnects_total");
    let rss_sync = (
        env::rss_kib(apiserver_pid)?,
        env::rss_kib(agent_pid)?,
        env::rss_kib(etcd_pid)?,
        env::rss_kib(std::process::id())?,
    );
    let etcd_synced = etcd_db_size(&cluster).await?;

    let sample_every = if opts.sample_every > 0 {
        opts.sample_every
    } else {
        ((opts.churn / 50.0).round() as usize).max(1)
    };
    step(&format!(
        "churn: {} pods replaced per second for {} s, every {sample_every}th timed",
        opts.churn, opts.duration
    ));
    let maps = mesh_maps::open_pinned_readonly(agent.bpffs.pin_dir())
        .context("opening the agent's pinned maps")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let c0 = cpu(apiserver_pid, agent_pid, etcd_pid)?;
    let agent_body0 = env::http_get(agent.metrics, "/metrics").unwrap_or_default();
    let importer_writes = |text: &str| {
        (
            metric_sum(text, "mesh_apiserver_peer_txns_total"),
            metric_sum(text, "mesh_apiserver_peer_etcd_txns_total"),
        )
    };
    let (batches0, txns0) = importer_writes(&cluster.metrics_text()?);
    let w0 = Instant::now();
    let churn = spawn_churn(
        fleet.clusters(),
        pods,
        shape,
        opts.churn,
        sample_every,
        Some(tx),
        stop.clone(),
    );
    let stopper = {
        let stop = stop.clone();
        let d = Duration::from_secs(opts.duration);
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.cancel();
        })
    };
    let timings = time_samples(
        &maps,
        rx,
        Duration::from_micros(opts.poll_interval_us),
        Duration::from_millis(opts.sample_timeout_ms),
    )
    .await?;
    stopper.abort();
    stop.cancel();
    let done = churn.await?;
    let c1 = cpu(apiserver_pid, agent_pid, etcd_pid)?;
    let window = w0.elapsed();
    let agent_body1 = env::http_get(agent.metrics, "/metrics").unwrap_or_default();
    let (batches1, txns1) = importer_writes(&cluster.metrics_text()?);
    let delta = |name: &str| metric_sum(&agent_body1, name) - metric_sum(&agent_body0, name);
    let reconciles = delta("mesh_agent_reconcile_duration_seconds_count");
    let reconcile_s = delta("mesh_agent_reconcile_duration_seconds_sum");
    agent.proc_mut()?.check_running()?;
    cluster.apiserver.check_running()?;

    if let Some(k) = kicker {
        k.abort();
    }
    step("after the churn: waiting for the agent's ipcache to hold exactly the live pods");
    wait_index(&mut cluster, &fleet, stall).await?;
    wait_agent_ipcache(&mut agent, want_ipcache, stall).await?;
    let live: std::collections::HashSet<Ipv4Addr> =
        done.pods.iter().flat_map(|p| p.live()).copied().collect();
    let pod_range: ipnet::Ipv4Net = generator::POD_RANGE.parse()?;
    let converge_from = Instant::now();
    let (dump, missing, stale) = loop {
        agent.proc_mut()?.check_running()?;
        let dump = maps.dump().context("dumping the agent's maps")?;
        let missing = live
            .iter()
            .filter(|ip| {
                !dump
                    .ipcache
                    .contains_key(&ipnet::IpNet::V4(ipnet::Ipv4Net::from(**ip)))
            })
            .count();
        // Entries of synthetic pod addresses no live pod has (a delete not applied).
        let stale = dump
            .ipcache
            .keys()
            .filter(|net| match net {
                ipnet::IpNet::V4(n) => {
                    n.prefix_len() == 32
                        && pod_range.contains(&n.addr())
                        && !live.contains(&n.addr())
                }
                ipnet::IpNet::V6(_) => false,
            })
            .count();
        if (missing == 0 && stale == 0) || converge_from.elapsed() > stall {
            break (dump, missing, stale);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // From the churn's last replacement (the samples may have finished long after it).
    let churn_end = w0 + done.elapsed;
    let converged_in = Instant::now().saturating_duration_since(churn_end);
    let ipcache_entries = dump.ipcache.len();
    drop(dump);
    let rss_end = (env::rss_kib(apiserver_pid)?, env::rss_kib(agent_pid)?);
    let etcd_end = etcd_db_size(&cluster).await?;
    let body = cluster.metrics_text()?;

    let mut report = Report::new(
        "scale",
        machine.clone(),
        "Cilium's clustermesh scale profile: synthetic clusters served by mesh-bench's \
         generator (real mesh.v1 Watch over mutual TLS, one CA and port per cluster, data in \
         memory), imported by the apiserver's real importer (peers directory) into its etcd \
         and index, programmed by one running agent. Sync: wall clock from writing the peer \
         entries to the index metrics holding every endpoint (polled every 100 ms) and to the \
         agent's ipcache gauge holding every endpoint and node (every 20 ms). Churn: a pod \
         replaced = one revision of its cluster (new endpoint at a new address + old deleted); \
         timed from the generator's apply to the first ipcache lookup (pinned map, read-only, \
         one LPM lookup per address per round) that sees the new address / no longer sees \
         the old one. CPU = utime + stime (/proc/<pid>/stat) over the churn window",
    );
    report.param("clusters", shape.clusters);
    report.param("nodes_per_cluster", shape.nodes);
    report.param("pods_per_node", shape.pods_per_node);
    report.param("endpoints", shape.total_endpoints());
    report.param("identities", shape.clusters * shape.identities_per_cluster);
    report.param("churn_per_s", opts.churn);
    report.param("duration_s", opts.duration);
    report.param("sample_every", sample_every);
    report.param("poll_interval_us", opts.poll_interval_us);
    report.param("churn_during_sync", opts.churn_during_sync);
    report.param("kick_every_ms", opts.kick_every_ms);
    report.figures.push(Figure::new(
        "full sync: peer entries -> apiserver index holds every endpoint",
        index_sync.as_secs_f64(),
        "s",
    ));
    report.figures.push(Figure::new(
        &format!("full sync: peer entries -> agent ipcache holds {want_ipcache} entries"),
        agent_sync.as_secs_f64(),
        "s",
    ));
    report.figures.push(Figure::new(
        "peer snapshots / reconnects during the sync",
        sync_snapshots,
        &format!("snapshots / {sync_reconnects} reconnects"),
    ));
    let target = LatencyTarget {
        p50_ms: None,
        p99_ms: Some(100.0),
    };
    report.distributions.push(Distribution::new(
        "pod replaced -> new address in agent ipcache",
        &timings.added,
        timings.timeouts_added,
        Some(target),
    ));
    report.distributions.push(Distribution::new(
        "pod replaced -> old address out of agent ipcache",
        &timings.removed,
        timings.timeouts_removed,
        None,
    ));
    let (first, last) = timings.thirds();
    report.figures.push(Figure::new(
        "new address in ipcache: p50 of the first / last third of the churn",
        first,
        &format!("ms / {last:.0} ms"),
    ));
    let slow = timings.slow_by_second(Duration::from_millis(100));
    let when: Vec<String> = slow.iter().map(|(s, n)| format!("{n}@{s}s")).collect();
    report.figures.push(Figure::new(
        "new address in ipcache: samples over 100 ms (count@second of the churn)",
        slow.iter().map(|(_, n)| *n).sum::<usize>() as f64,
        &format!(
            "samples: {}",
            if when.is_empty() {
                "none".to_owned()
            } else {
                when.join(" ")
            }
        ),
    ));
    report.figures.push(Figure::new(
        "timed replacements superseded (pod replaced again first; not counted)",
        timings.superseded as f64,
        "samples",
    ));
    let achieved = done.replacements as f64 / done.elapsed.as_secs_f64().max(1e-9);
    report.figures.push(Figure::new(
        "churn achieved (pods replaced)",
        achieved,
        "per s",
    ));
    report.figures.push(Figure::new(
        "churn: events (2 per replacement)",
        achieved * 2.0,
        "per s",
    ));
    let pct =
        |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() * 100.0 / window.as_secs_f64();
    for (name, now, then) in [
        ("apiserver", c1.apiserver, c0.apiserver),
        ("agent", c1.agent, c0.agent),
        ("etcd", c1.etcd, c0.etcd),
        ("mesh-bench (generator + lookups)", c1.bench, c0.bench),
    ] {
        report.figures.push(Figure::new(
            &format!("CPU during churn: {name}"),
            pct(now, then),
            "% of a core",
        ));
    }
    report.figures.push(Figure::new(
        "agent reconciles during churn",
        reconciles,
        "reconciles",
    ));
    report.figures.push(Figure::new(
        "agent mean reconcile during churn (desired state computed and applied)",
        if reconciles > 0.0 {
            reconcile_s * 1e3 / reconciles
        } else {
            0.0
        },
        "ms",
    ));
    report.figures.push(Figure::new(
        "agent time in reconciles during churn",
        reconcile_s * 100.0 / window.as_secs_f64(),
        "% of the window",
    ));
    report.figures.push(Figure::new(
        "importer write batches during churn (all peers)",
        (batches1 - batches0) / window.as_secs_f64(),
        "per s",
    ));
    report.figures.push(Figure::new(
        "importer etcd transactions during churn (batches grouped)",
        (txns1 - txns0) / window.as_secs_f64(),
        "per s",
    ));
    let endpoints = shape.total_endpoints() as f64;
    let per = |kib: u64| kib as f64 * 1024.0 / endpoints;
    report.figures.push(Figure::new(
        "apiserver RSS after sync",
        rss_sync.0 as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(
        Figure::new(
            "apiserver RSS per cached endpoint (after sync)",
            per(rss_sync.0),
            "bytes",
        )
        .with_target(Target::AtMost(1024.0)),
    );
    report.figures.push(Figure::new(
        "agent RSS after sync",
        rss_sync.1 as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(
        Figure::new(
            "agent RSS per endpoint (after sync)",
            per(rss_sync.1),
            "bytes",
        )
        .with_target(Target::AtMost(2048.0)),
    );
    report.figures.push(Figure::new(
        "apiserver / agent RSS per endpoint after churn",
        per(rss_end.0),
        &format!("bytes / {:.0} bytes", per(rss_end.1)),
    ));
    report.figures.push(Figure::new(
        "etcd RSS after sync",
        rss_sync.2 as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(Figure::new(
        "mesh-bench RSS after sync (generator)",
        rss_sync.3 as f64 / 1024.0,
        "MiB",
    ));
    report.figures.push(Figure::new(
        "etcd db size: empty / synced / after churn",
        etcd_synced,
        &format!("MiB (empty {etcd_before:.1}, after churn {etcd_end:.1})"),
    ));
    report.figures.push(Figure::new(
        "agent ipcache entries after churn",
        ipcache_entries as f64,
        "entries",
    ));
    report.figures.push(Figure::new(
        "churn stopped -> agent ipcache holds exactly the live pods (1 s dumps)",
        converged_in.as_secs_f64(),
        "s",
    ));
    report.figures.push(
        Figure::new(
            "live synthetic pods missing from the agent's ipcache after churn",
            missing as f64,
            "pods",
        )
        .with_target_text("= 0", missing == 0),
    );
    report.figures.push(
        Figure::new(
            "replaced pods' old addresses still in the agent's ipcache after churn",
            stale as f64,
            "entries",
        )
        .with_target_text("= 0", stale == 0),
    );
    report.figures.push(Figure::new(
        "peer snapshots / resumes / reconnects (whole run)",
        metric_sum(&body, "mesh_apiserver_peer_snapshots_total"),
        &format!(
            "snapshots / {} resumes / {} reconnects",
            metric_sum(&body, "mesh_apiserver_peer_resumes_total"),
            metric_sum(&body, "mesh_apiserver_peer_reconnects_total")
        ),
    ));
    let mean_lookup_us = if timings.lookups == 0 {
        0.0
    } else {
        timings.lookup_time.as_secs_f64() * 1e6 / timings.lookups as f64
    };
    report.figures.push(Figure::new(
        "mean ipcache lookup (resolution: poll interval + a round)",
        mean_lookup_us,
        "us",
    ));
    report.notes.push(
        "RSS per endpoint divides the whole process's RSS (fixed overhead included) by the \
         synthetic endpoints; the apiserver's etcd is a separate process (etcd RSS row)"
            .into(),
    );
    report.notes.push(
        "not simulated: the synthetic clusters' own etcd and publishers (the generator \
         answers from memory), services (the profile is endpoints and identities), policy"
            .into(),
    );
    drop(maps);
    drop(agent);
    drop(fleet);
    drop(cluster);
    drop(ctx);
    Ok(report)
}
