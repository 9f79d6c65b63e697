//! `fanout`: N watch streams of one mesh-apiserver (mesh-proto's resumable client, one
//! connection each) while a writer puts E new endpoint keys into its etcd, run three times
//! side by side, each against fresh processes:
//!
//! - `apiserver (mTLS)`: streams over mutual TLS with an agent certificate each, as agents
//!   connect;
//! - `apiserver (plaintext)`: the same apiserver with `--insecure` on loopback, the same
//!   transport as the direct side;
//! - `direct etcd`: the same N clients each watching etcd directly (etcd-client watch on
//!   the prefix, plaintext, one connection each: Cilium's original design).
//!
//! Every stream must receive every event: each counts the distinct endpoints it saw
//! (a bitset), and the run reports how many streams got all E. CPU is user + system time
//! from `/proc/<pid>/stat` of the apiserver and etcd processes over the window from the
//! first write to the last stream's last event; the clients' (this process's) CPU is
//! reported apart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::WatchOptions as EtcdWatchOptions;
use mesh_proto::client::{Backoff, WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::keys::{ALL_KINDS, Keys};
use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use mesh_testkit::etcd::Etcd;
use tokio::task::JoinSet;

use crate::cluster::{Cluster, ClusterSpec, Ctx, put_batched, put_batched_ops};
use crate::env::{self, Components};
use crate::report::{Figure, Machine, Report, Target};
use crate::{Progress, step};

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Watch streams (agents).
    #[arg(long, default_value_t = 200)]
    pub streams: usize,
    /// Events written (distinct endpoint keys); every stream must receive all of them.
    #[arg(long, default_value_t = 2000)]
    pub events: usize,
    /// etcd transactions in flight while writing.
    #[arg(long, default_value_t = 2)]
    pub parallel_txns: usize,
    /// Give up waiting for the streams after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Objects per etcd transaction of the writer (128: etcd's default limit, which
    /// spreads each message's cost over 128 events; 1: one event per transaction).
    #[arg(long, default_value_t = 128)]
    pub txn_ops: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            streams: 200,
            events: 2000,
            parallel_txns: 2,
            timeout_s: 300,
            txn_ops: 128,
        }
    }
}

const PEER: &str = "peer";
const BASE: u32 = (10 << 24) | (128 << 16);

fn endpoint_ip(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(BASE + i as u32)
}

/// The event index of an endpoint name (its IP), if it is one of ours.
fn index_of(name: &str, events: usize) -> Option<usize> {
    let ip: std::net::Ipv4Addr = name.parse().ok()?;
    let i = u32::from(ip).checked_sub(BASE)? as usize;
    (i < events).then_some(i)
}

fn events_data(keys: &Keys, events: usize) -> Vec<(String, Vec<u8>)> {
    (0..events)
        .map(|i| {
            let ip = endpoint_ip(i).to_string();
            let v = pb::event::Value::Endpoint(pb::Endpoint {
                ip: ip.clone(),
                identity: (2 << 16) | 256,
                host_ip: Some("172.20.0.1".into()),
                node: "node-0".into(),
                namespace: "default".into(),
                pod: format!("pod-{i}"),
                named_ports: vec![],
            });
            (
                keys.object(PEER, Kind::Endpoint, &ip),
                mesh_proto::convert::encode_value(&v),
            )
        })
        .collect()
}

/// What one side measured.
struct Side {
    elapsed: Duration,
    complete: usize,
    delivered: u64,
    server_cpu: Duration,
    etcd_cpu: Duration,
    client_cpu: Duration,
    write: Duration,
}

/// Per-stream receipt: a bitset of the events seen, done when all are.
struct Receipt {
    seen: Vec<bool>,
    count: usize,
}

impl Receipt {
    fn new(events: usize) -> Self {
        Receipt {
            seen: vec![false; events],
            count: 0,
        }
    }

    /// Records an event; returns whether every event has now been seen.
    fn record(&mut self, i: usize, delivered: &AtomicU64) -> bool {
        if !self.seen[i] {
            self.seen[i] = true;
            self.count += 1;
            delivered.fetch_add(1, Ordering::Relaxed);
        }
        self.count == self.seen.len()
    }
}

/// The processes whose CPU a side counts.
#[derive(Debug, Clone, Copy)]
struct Pids {
    /// The apiserver (none on the direct side).
    server: Option<u32>,
    etcd: u32,
}

/// Writes the events, then waits for every stream task; returns the side's figures.
async fn drive(
    label: &str,
    etcd: &etcd_client::Client,
    keys: &Keys,
    opts: &Opts,
    mut streams: JoinSet<Option<Instant>>,
    delivered: Arc<AtomicU64>,
    pids: Pids,
) -> Result<Side> {
    let Pids {
        server: server_pid,
        etcd: etcd_pid,
    } = pids;
    let me = std::process::id();
    let cpu = |pid: Option<u32>| pid.map_or(Ok(Duration::ZERO), env::cpu_time);
    let (s0, e0, c0) = (
        cpu(server_pid)?,
        env::cpu_time(etcd_pid)?,
        env::cpu_time(me)?,
    );
    let t0 = Instant::now();
    let data = events_data(keys, opts.events);
    put_batched_ops(etcd, data, opts.txn_ops, opts.parallel_txns, |_| {}).await?;
    let write = t0.elapsed();
    let total = (opts.streams * opts.events) as u64;
    let mut progress = Progress::new(&format!("{label}: events delivered"), total as usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.timeout_s);
    let mut last = t0;
    let mut complete = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !streams.is_empty() {
        tokio::select! {
            r = streams.join_next() => {
                if let Some(Ok(Some(at))) = r {
                    complete += 1;
                    last = last.max(at);
                }
            }
            _ = tick.tick() => progress.set(delivered.load(Ordering::Relaxed) as usize),
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("{label}: timed out after {}s with {} streams incomplete", opts.timeout_s, streams.len());
                streams.abort_all();
                last = Instant::now();
                break;
            }
        }
    }
    progress.set(delivered.load(Ordering::Relaxed) as usize);
    progress.finish();
    let (s1, e1, c1) = (
        cpu(server_pid)?,
        env::cpu_time(etcd_pid)?,
        env::cpu_time(me)?,
    );
    Ok(Side {
        elapsed: last.saturating_duration_since(t0),
        complete,
        delivered: delivered.load(Ordering::Relaxed),
        server_cpu: s1.saturating_sub(s0),
        etcd_cpu: e1.saturating_sub(e0),
        client_cpu: c1.saturating_sub(c0),
        write,
    })
}

async fn via_apiserver(
    opts: &Opts,
    components: &Components,
    insecure: bool,
) -> Result<(Side, String)> {
    let label = if insecure {
        "apiserver (plaintext)"
    } else {
        "apiserver (mTLS)"
    };
    let ctx = Ctx::new(components.clone())?;
    step(&format!(
        "{label}: starting etcd, lab Kubernetes API, mesh-apiserver"
    ));
    let mut cluster = Cluster::start(
        &ctx,
        ClusterSpec {
            name: "local",
            id: 1,
            pod_cidr: "10.1.0.0/16",
            service_cidr: "10.96.0.0/16",
            insecure,
            apiserver_args: &[],
        },
    )
    .await?;
    let keys = Keys::default();
    let etcd = cluster.etcd_client().await?;
    // The peer exists (config and synced markers) so each stream gets its Synced marker.
    let mut init = vec![(
        keys.object(PEER, Kind::Config, ""),
        mesh_proto::convert::encode_value(&pb::event::Value::Config(pb::ClusterConfig {
            name: PEER.into(),
            id: 2,
            pod_cidrs: vec!["10.128.0.0/9".into()],
            service_cidr: None,
            capabilities: vec![],
            version: "bench".into(),
        })),
    )];
    for kind in ALL_KINDS {
        use prost::Message;
        init.push((
            keys.synced(PEER, kind),
            pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec(),
        ));
    }
    put_batched(&etcd, init, 1, |_| {}).await?;

    step(&format!("{label}: opening {} watch streams", opts.streams));
    let ca = tls::parse_certs(cluster.ca.cert_pem.as_bytes(), "ca")?;
    let delivered = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(opts.streams);
    let mut streams = JoinSet::new();
    let mut progress = Progress::new("streams synced", opts.streams);
    for n in 0..opts.streams {
        let ep = if insecure {
            ClientEndpoint::plaintext(cluster.grpc.to_string())
        } else {
            let cert = cluster.ca.issue(&format!("agent/node-{n}"));
            let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())?;
            ClientEndpoint::new(
                cluster.grpc.to_string(),
                ClientTls::new(ca.clone(), id, Some(cluster.name.parse()?))?,
            )
        };
        let mut watch = spawn_watch(
            connect_fn(move || {
                let ep = ep.clone();
                async move { tls::connect(&ep).await }
            }),
            pb::WatchRequest {
                clusters: vec![PEER.into()],
                kinds: vec![Kind::Endpoint as i32],
                ..Default::default()
            },
            WatchOptions {
                heartbeat_interval: Duration::from_secs(1),
                backoff: Backoff::full_jitter(Duration::from_millis(50), Duration::from_secs(1)),
                healthy_after: Duration::from_secs(5),
                buffer: 1024,
                recorder: None,
            },
        );
        let events = opts.events;
        let delivered = delivered.clone();
        let ready = ready_tx.clone();
        streams.spawn(async move {
            let mut receipt = Receipt::new(events);
            let mut ready = Some(ready);
            while let Some(u) = watch.recv().await {
                match u {
                    WatchUpdate::Synced {
                        kind: Kind::Endpoint,
                        ..
                    } => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(()).await;
                        }
                    }
                    WatchUpdate::Upsert {
                        kind: Kind::Endpoint,
                        name,
                        ..
                    } => {
                        if let Some(i) = index_of(&name, events)
                            && receipt.record(i, &delivered)
                        {
                            return Some(Instant::now());
                        }
                    }
                    _ => {}
                }
            }
            None
        });
    }
    drop(ready_tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for i in 0..opts.streams {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(())) => progress.set(i + 1),
            _ => bail!(
                "only {i} of {} streams synced within 120s; apiserver log:\n{}",
                opts.streams,
                cluster.apiserver.log_tail()
            ),
        }
    }
    progress.finish();
    cluster.apiserver.check_running()?;
    let etcd_pid = env::etcd_pid(cluster.etcd.data_dir())?;
    let side = drive(
        label,
        &etcd,
        &keys,
        opts,
        streams,
        delivered,
        Pids {
            server: Some(cluster.apiserver.pid()),
            etcd: etcd_pid,
        },
    )
    .await?;
    let body = cluster.metrics_text().unwrap_or_default();
    let sum = |name: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .map(|v| v as u64)
            .sum()
    };
    let notes = format!(
        "{label}: apiserver counters during the run: slow-client drops {}, resets {}, resumes {}",
        sum("mesh_apiserver_slow_client_drops_total"),
        sum("mesh_apiserver_resets_total"),
        sum("mesh_apiserver_resumes_total"),
    );
    drop(cluster);
    drop(ctx);
    Ok((side, notes))
}

async fn direct_etcd(opts: &Opts) -> Result<Side> {
    step(&format!(
        "direct side: a fresh etcd and {} clients each watching it",
        opts.streams
    ));
    let etcd_proc = Etcd::start();
    let keys = Keys::default();
    let writer = etcd_client::Client::connect([etcd_proc.endpoint()], None).await?;
    let prefix = keys.kind_prefix(PEER, Kind::Endpoint);
    let delivered = Arc::new(AtomicU64::new(0));
    let mut streams = JoinSet::new();
    let mut progress = Progress::new("etcd watchers created", opts.streams);
    for n in 0..opts.streams {
        let mut c = etcd_client::Client::connect([etcd_proc.endpoint()], None)
            .await
            .context("connecting a watcher to etcd")?;
        let mut stream = c
            .watch(prefix.clone(), Some(EtcdWatchOptions::new().with_prefix()))
            .await
            .context("creating an etcd watch")?;
        let events = opts.events;
        let delivered = delivered.clone();
        let prefix = prefix.clone();
        streams.spawn(async move {
            let _client = c;
            let mut receipt = Receipt::new(events);
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                        continue;
                    };
                    if let Some(i) = index_of(name, events)
                        && receipt.record(i, &delivered)
                    {
                        return Some(Instant::now());
                    }
                }
            }
            None
        });
        progress.set(n + 1);
    }
    progress.finish();
    let etcd_pid = env::etcd_pid(etcd_proc.data_dir())?;
    let side = drive(
        "direct etcd",
        &writer,
        &keys,
        opts,
        streams,
        delivered,
        Pids {
            server: None,
            etcd: etcd_pid,
        },
    )
    .await?;
    drop(etcd_proc);
    Ok(side)
}

pub async fn run(opts: &Opts, components: &Components, machine: &Machine) -> Result<Report> {
    if opts.streams == 0 || opts.events == 0 || opts.txn_ops == 0 {
        bail!("--streams, --events and --txn-ops must be at least 1");
    }
    let (tls, tls_notes) = via_apiserver(opts, components, false).await?;
    let (plain, plain_notes) = via_apiserver(opts, components, true).await?;
    let direct = direct_etcd(opts).await?;
    let total = (opts.streams * opts.events) as f64;
    let mut report = Report::new(
        "fanout",
        machine.clone(),
        "three runs against fresh processes: apiserver streams over mutual TLS, the same over \
         plaintext (--insecure on loopback), and the same number of clients each watching \
         etcd directly (plaintext); wall clock from the first etcd write to the last stream \
         receiving its last event; each stream counts the distinct endpoints it received; \
         CPU = utime + stime of each process (/proc/<pid>/stat, 10 ms ticks) over that \
         window, divided by the events delivered (streams x events)",
    );
    report.param("streams", opts.streams);
    report.param("events", opts.events);
    report.param("deliveries", total as u64);
    report.param("txn_ops", opts.txn_ops);
    let us_per = |cpu: Duration, n: u64| {
        if n == 0 {
            0.0
        } else {
            cpu.as_secs_f64() * 1e6 / n as f64
        }
    };
    let rate = |s: &Side| s.delivered as f64 / s.elapsed.as_secs_f64().max(1e-9);
    let d_cpu = us_per(direct.etcd_cpu, direct.delivered);
    let sides = [
        ("apiserver (mTLS)", &tls),
        ("apiserver (plaintext)", &plain),
        ("direct etcd", &direct),
    ];
    for (label, s) in sides {
        let via_apiserver = label != "direct etcd";
        report.figures.push(
            Figure::new(
                &format!("{label}: streams that received every event"),
                s.complete as f64,
                "streams",
            )
            .with_target_text(
                &format!("= {}", opts.streams),
                s.complete == opts.streams && s.delivered as f64 == total,
            ),
        );
        report.figures.push(Figure::new(
            &format!("{label}: events delivered"),
            s.delivered as f64,
            "events",
        ));
        report.figures.push(Figure::new(
            &format!("{label}: write time ({} keys)", opts.events),
            s.write.as_secs_f64() * 1e3,
            "ms",
        ));
        report.figures.push(
            Figure::new(
                &format!("{label}: delivery rate, total"),
                rate(s),
                "events/s",
            )
            .with_target_if(via_apiserver, Target::AtLeast(50_000.0)),
        );
        if via_apiserver {
            report.figures.push(Figure::new(
                &format!("{label}: apiserver CPU per event"),
                us_per(s.server_cpu, s.delivered),
                "us",
            ));
        }
        let e_cpu = us_per(s.etcd_cpu, s.delivered);
        report.figures.push(Figure::new(
            &format!("{label}: etcd CPU per event"),
            e_cpu,
            "us",
        ));
        if via_apiserver {
            let both = us_per(s.server_cpu + s.etcd_cpu, s.delivered);
            report.figures.push(
                Figure::new(
                    &format!("{label}: apiserver + etcd CPU per event"),
                    both,
                    "us",
                )
                .with_target_text(&format!("< direct etcd ({d_cpu:.3} us)"), both < d_cpu),
            );
        }
        report.figures.push(Figure::new(
            &format!("{label}: clients' CPU per event (mesh-bench)"),
            us_per(s.client_cpu, s.delivered),
            "us",
        ));
    }
    report.notes.push(tls_notes);
    report.notes.push(plain_notes);
    report.notes.push(
        "clients and the writer run in mesh-bench itself (one tokio runtime); their CPU \
         includes the writer, and TLS on the mTLS side"
            .into(),
    );
    report.notes.push(
        "the direct etcd clients use plaintext (the lab's etcd has no TLS): compare it with \
         the plaintext apiserver side for the same transport"
            .into(),
    );
    Ok(report)
}
