//! `soak`: one cluster (real etcd, the lab Kubernetes API, a mesh-apiserver process and a
//! mesh-agent process) with N synthetic agent streams (mesh-proto's resumable client over
//! mutual TLS, as in [`crate::fanout`]) under continuous churn for `--minutes`:
//!
//! - Kubernetes side, through the publisher: global Services created and deleted, their
//!   affinity annotation changed, their EndpointSlices scaled between 0 and 5 endpoints;
//! - peer side, written into etcd as an importer would: endpoints of a synthetic peer
//!   created, changed and deleted in transactions (`--rate` operations per second);
//! - etcd compacted at every sample, as kube-apiserver does, keeping one interval of
//!   history (a stream that falls behind it gets a `Reset` and sweeps).
//!
//! Every `--interval-s` one row: RSS and open fds of every process (apiserver, agent,
//! etcd, and mesh-bench itself, which runs the streams), etcd's revision, events received.
//! The verdict, at the end:
//!
//! - no unbounded growth of the mesh processes (apiserver, agent): the mean RSS of the
//!   last third of the rows at most 1.25 x that of the first third + 8 MiB, and their fd
//!   counts at most 5 above the first third's maximum (etcd and mesh-bench are shown, not
//!   judged: etcd's own memory follows its database, mesh-bench's holds the streams' state);
//! - every stream converged to etcd's state, key for key: after the churn stops, each
//!   stream's objects (cluster, kind, name -> value) equal etcd's under `clusters/` at the
//!   revision of the last event that stream applied, which is at or after the last write;
//! - both processes still run.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{CompactionOptions, GetOptions, Txn, TxnOp};
use mesh_lab::kube_api::{PatchType, Store, resources};
use mesh_proto::client::{Backoff, WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::keys::{ALL_KINDS, ClusterKey, Keys};
use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls, TlsIdentity};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cluster::{AgentNode, Cluster, ClusterSpec, Ctx, put_batched};
use crate::env::{self, Components};
use crate::report::{Figure, Machine, Report};
use crate::{Progress, step};

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// How long the churn runs, in minutes (fractions allowed).
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Synthetic agent streams.
    #[arg(long, default_value_t = 200)]
    pub streams: usize,
    /// Seconds between rows (default: the duration / 20, at least 5).
    #[arg(long)]
    pub interval_s: Option<u64>,
    /// Peer endpoint operations per second written into etcd.
    #[arg(long, default_value_t = 200)]
    pub rate: usize,
    /// Peer endpoint keys the churn works over (created, changed, deleted).
    #[arg(long, default_value_t = 2000)]
    pub keys: usize,
    /// Global Services the Kubernetes churn works over.
    #[arg(long, default_value_t = 20)]
    pub services: usize,
    /// Give up waiting for convergence after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

const PEER: &str = "peer";
const NS: &str = "default";
const NODE: &str = "soak-node";

/// A small deterministic PRNG (xorshift64*): reproducible churn without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

type ObjKey = (String, i32, String);

fn hash_value(v: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// What one stream holds: its objects (value hashes), the revision of the last event it
/// applied, and what happened to it.
#[derive(Default)]
struct StreamState {
    objects: HashMap<ObjKey, u64>,
    revision: i64,
    resets: u64,
    disconnects: u64,
}

fn peer_endpoint(i: usize, generation: u64) -> (String, Vec<u8>) {
    let ip = std::net::Ipv4Addr::from((10u32 << 24) | (128 << 16) | i as u32).to_string();
    let v = pb::event::Value::Endpoint(pb::Endpoint {
        ip: ip.clone(),
        identity: (2 << 16) | (256 + (generation % 1000) as u32),
        host_ip: Some("172.20.0.1".into()),
        node: format!("peer-node-{}", generation % 7),
        namespace: "default".into(),
        pod: format!("pod-{i}"),
        named_ports: vec![],
    });
    (
        Keys::default().object(PEER, Kind::Endpoint, &ip),
        mesh_proto::convert::encode_value(&v),
    )
}

fn service(i: usize, affinity: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": NS, "name": format!("soak-{i}"), "annotations": {
            "service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}},
        "spec": {"selector": {"app": format!("soak-{i}")},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice_endpoints(i: usize, n: usize) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..n)
        .map(|k| {
            json!({"addresses": [format!("10.1.{}.{}", i % 250, k + 10)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": NODE, "zone": "z1"})
        })
        .collect();
    serde_json::Value::Array(eps)
}

fn slice(i: usize, n: usize) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": NS, "name": format!("soak-{i}-a"),
                     "labels": {"kubernetes.io/service-name": format!("soak-{i}")}},
        "addressType": "IPv4",
        "endpoints": slice_endpoints(i, n),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// One Kubernetes operation on service `i`: create it (with a slice) when absent; else
/// delete it, change its affinity, or scale its slice.
fn kube_op(store: &Store, rng: &mut Rng, present: &mut [bool], i: usize) -> Result<()> {
    let err =
        |what: &str, e: mesh_lab::kube_api::ApiError| anyhow::anyhow!("{what} soak-{i}: {e:?}");
    let affinities = ["local", "remote", "none"];
    if !present[i] {
        store
            .create(
                &resources::SERVICES,
                Some(NS),
                service(i, affinities[rng.below(3)]),
            )
            .map_err(|e| err("creating Service", e))?;
        store
            .create(&resources::ENDPOINTSLICES, Some(NS), slice(i, rng.below(6)))
            .map_err(|e| err("creating EndpointSlice", e))?;
        present[i] = true;
        return Ok(());
    }
    match rng.below(4) {
        0 => {
            store
                .delete(
                    &resources::ENDPOINTSLICES,
                    Some(NS),
                    &format!("soak-{i}-a"),
                    None,
                )
                .map_err(|e| err("deleting EndpointSlice", e))?;
            store
                .delete(&resources::SERVICES, Some(NS), &format!("soak-{i}"), None)
                .map_err(|e| err("deleting Service", e))?;
            present[i] = false;
        }
        1 => {
            let patch = json!({"metadata": {"annotations": {
                "service.cilium.io/affinity": affinities[rng.below(3)]}}});
            store
                .patch(
                    &resources::SERVICES,
                    Some(NS),
                    &format!("soak-{i}"),
                    PatchType::Merge,
                    patch.to_string().as_bytes(),
                )
                .map_err(|e| err("annotating Service", e))?;
        }
        _ => {
            let patch = json!([{"op": "replace", "path": "/endpoints",
                                "value": slice_endpoints(i, rng.below(6))}]);
            store
                .patch(
                    &resources::ENDPOINTSLICES,
                    Some(NS),
                    &format!("soak-{i}-a"),
                    PatchType::Json,
                    patch.to_string().as_bytes(),
                )
                .map_err(|e| err("scaling EndpointSlice", e))?;
        }
    }
    Ok(())
}

/// A process the table follows.
struct Watched {
    name: &'static str,
    pid: u32,
    /// Judged by the verdict (the mesh's own processes).
    judged: bool,
}

fn fds(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count() as u64)
}

/// One row of the table.
struct Row {
    at: Duration,
    revision: i64,
    events: u64,
    /// (RSS KiB, fds) per watched process.
    procs: Vec<(u64, u64)>,
}

/// The objects under `clusters/` at `revision`: (cluster, kind, name) -> value hash.
async fn etcd_objects(etcd: &etcd_client::Client, revision: i64) -> Result<HashMap<ObjKey, u64>> {
    let keys = Keys::default();
    let mut c = etcd.clone();
    let r = c
        .get(
            keys.clusters_prefix(),
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        )
        .await
        .with_context(|| format!("reading etcd at revision {revision}"))?;
    let mut out = HashMap::new();
    for kv in r.kvs() {
        if let Some(ClusterKey::Object {
            cluster,
            kind,
            name,
        }) = keys.parse(kv.key_str()?)
        {
            out.insert((cluster, kind as i32, name), hash_value(kv.value()));
        }
    }
    Ok(out)
}

pub async fn run(opts: &Opts, components: &Components, machine: &Machine) -> Result<Report> {
    if opts.streams == 0 || opts.keys == 0 || opts.services == 0 || opts.minutes <= 0.0 {
        bail!("--minutes, --streams, --keys and --services must be positive");
    }
    let total = Duration::from_secs_f64(opts.minutes * 60.0);
    let interval = Duration::from_secs(
        opts.interval_s
            .unwrap_or((total.as_secs() / 20).max(5))
            .max(1),
    );
    let ctx = Ctx::new(components.clone())?;
    step("soak: starting etcd, lab Kubernetes API, mesh-apiserver");
    let mut cluster = Cluster::start(
        &ctx,
        ClusterSpec {
            name: "local",
            id: 1,
            pod_cidr: "10.1.0.0/16",
            service_cidr: "10.96.0.0/16",
            insecure: false,
            // A bounded history that fills within the first rows: the soak judges the
            // steady state, not the history ring filling up.
            apiserver_args: &["--history-events", "5000"],
        },
    )
    .await?;
    let etcd = cluster.etcd_client().await?;
    let mut init = vec![(
        Keys::default().object(PEER, Kind::Config, ""),
        mesh_proto::convert::encode_value(&pb::event::Value::Config(pb::ClusterConfig {
            name: PEER.into(),
            id: 2,
            pod_cidrs: vec!["10.128.0.0/9".into()],
            service_cidr: None,
            capabilities: vec![],
            version: "soak".into(),
        })),
    )];
    for kind in ALL_KINDS {
        use prost::Message;
        init.push((
            Keys::default().synced(PEER, kind),
            pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec(),
        ));
    }
    init.extend((0..opts.keys / 2).map(|i| peer_endpoint(i, 0)));
    put_batched(&etcd, init, 2, |_| {}).await?;

    step("soak: starting mesh-agent");
    let mut agent = AgentNode::prepare(&cluster, NODE, &[])?;
    agent.start(components)?;
    agent.wait_datapath().await?;

    step(&format!("soak: opening {} watch streams", opts.streams));
    let ca = tls::parse_certs(cluster.ca.cert_pem.as_bytes(), "ca")?;
    let events = Arc::new(AtomicU64::new(0));
    let states: Vec<Arc<Mutex<StreamState>>> = (0..opts.streams).map(|_| Arc::default()).collect();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(opts.streams);
    let mut tasks = tokio::task::JoinSet::new();
    for (n, state) in states.iter().enumerate() {
        let cert = cluster.ca.issue(&format!("agent/soak-{n}"));
        let id = TlsIdentity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())?;
        let ep = ClientEndpoint::new(
            cluster.grpc.to_string(),
            ClientTls::new(ca.clone(), id, Some(cluster.name.parse()?))?,
        );
        let mut watch = spawn_watch(
            connect_fn(move || {
                let ep = ep.clone();
                async move { tls::connect(&ep).await }
            }),
            pb::WatchRequest::default(),
            WatchOptions {
                heartbeat_interval: Duration::from_secs(1),
                backoff: Backoff::full_jitter(Duration::from_millis(50), Duration::from_secs(1)),
                healthy_after: Duration::from_secs(5),
                buffer: 1024,
                recorder: None,
            },
        );
        let state = state.clone();
        let events = events.clone();
        let ready = ready_tx.clone();
        tasks.spawn(async move {
            let mut ready = Some(ready);
            while let Some(u) = watch.recv().await {
                let mut st = state.lock().expect("stream state");
                match u {
                    WatchUpdate::Upsert {
                        cluster,
                        kind,
                        name,
                        revision,
                        value,
                    } => {
                        let v = mesh_proto::convert::encode_value(&value);
                        st.objects
                            .insert((cluster.to_string(), kind as i32, name), hash_value(&v));
                        st.revision = st.revision.max(revision);
                        events.fetch_add(1, Ordering::Relaxed);
                    }
                    WatchUpdate::Delete {
                        cluster,
                        kind,
                        name,
                        revision,
                    } => {
                        st.objects.remove(&(cluster.to_string(), kind as i32, name));
                        st.revision = st.revision.max(revision);
                        events.fetch_add(1, Ordering::Relaxed);
                    }
                    WatchUpdate::Synced {
                        kind: Kind::Endpoint,
                        ..
                    } => {
                        if let Some(r) = ready.take() {
                            let _ = r.try_send(());
                        }
                    }
                    WatchUpdate::Reset { .. } => st.resets += 1,
                    WatchUpdate::Disconnected { .. } => st.disconnects += 1,
                    _ => {}
                }
            }
        });
    }
    drop(ready_tx);
    let mut progress = Progress::new("streams synced", opts.streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.timeout_s);
    for i in 0..opts.streams {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(())) => progress.set(i + 1),
            _ => bail!(
                "only {i} of {} streams synced within {}s",
                opts.streams,
                opts.timeout_s
            ),
        }
    }
    progress.finish();

    let mut watched = vec![
        Watched {
            name: "apiserver",
            pid: cluster.apiserver.pid(),
            judged: true,
        },
        Watched {
            name: "agent",
            pid: agent.proc_mut()?.pid(),
            judged: true,
        },
        Watched {
            name: "etcd",
            pid: env::etcd_pid(cluster.etcd.data_dir())?,
            judged: false,
        },
        Watched {
            name: "mesh-bench",
            pid: std::process::id(),
            judged: false,
        },
    ];

    // === churn ===
    let stop = CancellationToken::new();
    let last_rev = Arc::new(AtomicU64::new(0));
    let peer_churn = {
        let etcd = etcd.clone();
        let stop = stop.clone();
        let last_rev = last_rev.clone();
        let (keys, rate) = (opts.keys, opts.rate.max(1));
        tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let tick = Duration::from_millis(50);
            let per_tick = (rate * tick.as_millis() as usize / 1000).max(1);
            let mut every = tokio::time::interval(tick);
            let mut generation = 0u64;
            let mut ops_done = 0u64;
            while !stop.is_cancelled() {
                every.tick().await;
                let mut ops = Vec::new();
                let mut touched = std::collections::HashSet::new();
                for _ in 0..per_tick {
                    let i = rng.below(keys);
                    if !touched.insert(i) {
                        continue; // one operation per key per transaction
                    }
                    generation += 1;
                    let (k, v) = peer_endpoint(i, generation);
                    if rng.below(3) == 0 {
                        ops.push(TxnOp::delete(k, None));
                    } else {
                        ops.push(TxnOp::put(k, v, None));
                    }
                }
                ops_done += ops.len() as u64;
                let mut c = etcd.clone();
                let r = c.txn(Txn::new().and_then(ops)).await?;
                if let Some(h) = r.header() {
                    last_rev.fetch_max(h.revision() as u64, Ordering::Relaxed);
                }
            }
            Ok::<u64, anyhow::Error>(ops_done)
        })
    };
    let kube_churn = {
        let store = cluster.kube.store().clone();
        let stop = stop.clone();
        let services = opts.services;
        tokio::spawn(async move {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03);
            let mut present = vec![false; services];
            let mut every = tokio::time::interval(Duration::from_millis(100));
            let mut ops = 0u64;
            while !stop.is_cancelled() {
                every.tick().await;
                let i = rng.below(services);
                kube_op(&store, &mut rng, &mut present, i)?;
                ops += 1;
            }
            Ok::<u64, anyhow::Error>(ops)
        })
    };

    // === the table ===
    let mut header = format!("{:>7} {:>9} {:>11}", "t(s)", "revision", "events");
    for w in &watched {
        header.push_str(&format!(" {:>17}", format!("{} MiB/fds", w.name)));
    }
    eprintln!("{header}");
    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut compact_at = 0i64;
    let mut next = tokio::time::Instant::now();
    while t0.elapsed() < total {
        next += interval;
        tokio::time::sleep_until(
            next.min(tokio::time::Instant::now() + total.saturating_sub(t0.elapsed())),
        )
        .await;
        cluster.apiserver.check_running()?;
        agent.proc_mut()?.check_running()?;
        let mut procs = Vec::new();
        for w in &mut watched {
            procs.push((env::rss_kib(w.pid)?, fds(w.pid)?));
        }
        let revision = last_rev.load(Ordering::Relaxed) as i64;
        let row = Row {
            at: t0.elapsed(),
            revision,
            events: events.load(Ordering::Relaxed),
            procs,
        };
        eprintln!("{}", render_row(&row));
        rows.push(row);
        // Compaction keeps one interval of history, as kube-apiserver's periodic one does.
        if compact_at > 0 {
            let mut c = etcd.clone();
            c.compact(compact_at, Some(CompactionOptions::new().with_physical()))
                .await
                .context("compacting etcd")?;
        }
        compact_at = revision;
    }
    stop.cancel();
    let peer_ops = peer_churn.await.context("peer churn")??;
    let kube_ops = kube_churn.await.context("kube churn")??;

    // === convergence ===
    step("soak: churn stopped; waiting for every stream to converge");
    let final_rev = {
        // A last write after the churn: every stream must get at least this far.
        let (k, v) = peer_endpoint(opts.keys, 1);
        let mut c = etcd.clone();
        c.put(k, v, None)
            .await?
            .header()
            .context("header")?
            .revision()
    };
    let deadline = Instant::now() + Duration::from_secs(opts.timeout_s);
    let mut converged = vec![false; opts.streams];
    let mut progress = Progress::new("streams converged", opts.streams);
    loop {
        for (n, st) in states.iter().enumerate() {
            if converged[n] {
                continue;
            }
            let (objects, rev) = {
                let st = st.lock().expect("stream state");
                (st.objects.clone(), st.revision)
            };
            if rev < final_rev {
                continue;
            }
            converged[n] = etcd_objects(&etcd, rev).await? == objects;
        }
        let done = converged.iter().filter(|c| **c).count();
        progress.set(done);
        if done == opts.streams || Instant::now() > deadline {
            break;
        }
        // The streams are in this process but apply updates on their own tasks.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
    let converged_n = converged.iter().filter(|c| **c).count();
    let (resets, disconnects) = states.iter().fold((0, 0), |(r, d), s| {
        let s = s.lock().expect("stream state");
        (r + s.resets, d + s.disconnects)
    });
    let apiserver_ok = cluster.apiserver.check_running().is_ok();
    let agent_ok = agent.proc_mut()?.check_running().is_ok();
    tasks.abort_all();

    // === verdict ===
    let mut report = Report::new(
        "soak",
        machine.clone(),
        "one cluster (etcd, lab Kubernetes API, mesh-apiserver, mesh-agent) and N synthetic \
         agent streams over mutual TLS under continuous churn (Services created, deleted, \
         re-annotated and scaled through Kubernetes; peer endpoints created, changed and \
         deleted in etcd; etcd compacted every row); RSS and fds from /proc every interval; \
         growth = mean of the last third of the rows vs the first third; convergence = each \
         stream's objects equal etcd's at the revision of its last event, key for key",
    );
    report.param("minutes", opts.minutes);
    report.param("streams", opts.streams);
    report.param("interval_s", interval.as_secs());
    report.param("rate", opts.rate);
    report.param("keys", opts.keys);
    report.param("services", opts.services);
    report.param("peer_ops", peer_ops);
    report.param("kube_ops", kube_ops);
    let mut table = vec![header];
    table.extend(rows.iter().map(render_row));
    report.notes.push(table.join("\n"));
    let mut ok = converged_n == opts.streams && apiserver_ok && agent_ok;
    let third = (rows.len() / 3).max(1);
    if rows.len() < 3 {
        report
            .notes
            .push(format!("only {} rows: growth not judged", rows.len()));
    }
    for (i, w) in watched.iter().enumerate() {
        if rows.len() < 3 {
            break;
        }
        let first = &rows[..third];
        let last = &rows[rows.len() - third..];
        let mean = |rs: &[Row]| {
            rs.iter().map(|r| r.procs[i].0 as f64).sum::<f64>() / rs.len() as f64 / 1024.0
        };
        let max_fd = |rs: &[Row]| rs.iter().map(|r| r.procs[i].1).max().unwrap_or(0);
        let (m0, m1) = (mean(first), mean(last));
        let (f0, f1) = (max_fd(first), max_fd(last));
        let rss_ok = m1 <= m0 * 1.25 + 8.0;
        let fd_ok = f1 <= f0 + 5;
        let fig = Figure::new(
            &format!("{}: RSS, mean of the last third", w.name),
            m1,
            "MiB",
        );
        let fdfig = Figure::new(
            &format!("{}: fds, max of the last third", w.name),
            f1 as f64,
            "fds",
        );
        if w.judged {
            ok &= rss_ok && fd_ok;
            report.figures.push(fig.with_target_text(
                &format!("<= 1.25 x first third ({m0:.1} MiB) + 8 MiB"),
                rss_ok,
            ));
            report
                .figures
                .push(fdfig.with_target_text(&format!("<= first third's max ({f0}) + 5"), fd_ok));
        } else {
            report.figures.push(Figure::new(
                &format!("{}: RSS, mean of the first third", w.name),
                m0,
                "MiB",
            ));
            report.figures.push(fig);
            report.figures.push(fdfig);
        }
    }
    report.figures.push(
        Figure::new(
            "streams converged to etcd, key for key",
            converged_n as f64,
            "streams",
        )
        .with_target_text(&format!("= {}", opts.streams), converged_n == opts.streams),
    );
    report.figures.push(Figure::new(
        "events received by all streams",
        events.load(Ordering::Relaxed) as f64,
        "events",
    ));
    report.figures.push(Figure::new(
        "stream resets (compaction or lag)",
        resets as f64,
        "resets",
    ));
    report.figures.push(Figure::new(
        "stream disconnects",
        disconnects as f64,
        "disconnects",
    ));
    report.figures.push(
        Figure::new(
            "processes still running",
            (apiserver_ok as u8 + agent_ok as u8) as f64,
            "of 2",
        )
        .with_target_text("= 2", apiserver_ok && agent_ok),
    );
    report.figures.push(
        Figure::new("verdict", ok as u8 as f64, "pass")
            .with_target_text(if ok { "PASS" } else { "FAIL" }, ok),
    );
    eprintln!("soak verdict: {}", if ok { "PASS" } else { "FAIL" });
    drop(agent);
    drop(cluster);
    drop(ctx);
    Ok(report)
}

fn render_row(r: &Row) -> String {
    let mut s = format!(
        "{:>7.0} {:>9} {:>11}",
        r.at.as_secs_f64(),
        r.revision,
        r.events
    );
    for (rss, fds) in &r.procs {
        s.push_str(&format!(
            " {:>17}",
            format!("{:.1}/{}", *rss as f64 / 1024.0, fds)
        ));
    }
    s
}

/// Whether the soak's verdict in `report` passed.
pub fn passed(report: &Report) -> bool {
    report
        .figures
        .iter()
        .any(|f| f.name == "verdict" && f.met == Some(true))
}
