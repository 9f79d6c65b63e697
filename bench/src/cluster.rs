//! Topology pieces: a cluster (its CA, a real etcd, the lab Kubernetes API in this process,
//! and a mesh-apiserver process) and an agent node (a mesh-agent process with its own
//! bpffs pins and cgroup). Fields drop in declaration order: processes first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{Txn, TxnOp};
use mesh_lab::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle};
use mesh_proto::peer_entry::PeerSpec;
use mesh_proto::peer_entry::render_entry;
use mesh_testkit::certs::TestCa;
use mesh_testkit::etcd::Etcd;

use crate::env::{self, Bpffs, Cgroup, Components, Proc};

/// How long a component may take to come up.
pub const STARTUP: Duration = Duration::from_secs(60);

/// Settings shared by the pieces of one run.
pub struct Ctx {
    pub components: Components,
    /// Holds every file of the run (certificates, logs, kubeconfigs); removed on drop.
    pub dir: tempfile::TempDir,
}

impl Ctx {
    pub fn new(components: Components) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("mesh-bench-").tempdir()?;
        Ok(Ctx { components, dir })
    }
}

/// Options of a cluster.
pub struct ClusterSpec<'a> {
    pub name: &'a str,
    pub id: u32,
    pub pod_cidr: &'a str,
    /// Service CIDR of the lab Kubernetes API (ClusterIPs).
    pub service_cidr: &'a str,
    /// Serve gRPC in plaintext (`--insecure`, loopback only) instead of mutual TLS. Only
    /// for benchmarks that compare transports: agents and peers of such a cluster must
    /// connect in plaintext too.
    pub insecure: bool,
    /// Extra flags for the mesh-apiserver process.
    pub apiserver_args: &'a [&'a str],
}

/// One cluster: mesh-apiserver process, lab Kubernetes API, etcd.
pub struct Cluster {
    pub apiserver: Proc,
    pub kube: KubeApiHandle,
    pub etcd: Etcd,
    pub name: String,
    pub ca: TestCa,
    pub dir: PathBuf,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl Cluster {
    /// Starts etcd, the lab Kubernetes API and the apiserver (publisher, index, gRPC over
    /// mutual TLS or, with `spec.insecure`, plaintext on loopback, importer reading `<dir>/peers`, peer CAs from `<dir>/peer-cas`), and
    /// waits for its `/healthz`.
    pub async fn start(ctx: &Ctx, spec: ClusterSpec<'_>) -> Result<Self> {
        let dir = ctx.dir.path().join(spec.name);
        for sub in ["", "peers", "peer-cas", "kube"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let ca = TestCa::new(spec.name);
        let ca_path = ca.write(&dir);
        let (cert, key) = ca.issue("apiserver").write(&dir, "apiserver");
        let etcd = Etcd::start();
        let mut kcfg = KubeApiConfig::new(dir.join("kube"), spec.name);
        kcfg.service_cidr = spec
            .service_cidr
            .parse()
            .with_context(|| format!("service CIDR {}", spec.service_cidr))?;
        let kube = KubeApi::start(kcfg)
            .await
            .context("starting the lab Kubernetes API")?;
        let grpc = SocketAddr::from(([127, 0, 0, 1], env::free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], env::free_port()));
        let mut cmd = ctx.components.command("apiserver")?;
        cmd.args(["--cluster-name", spec.name])
            .args(["--cluster-id", &spec.id.to_string()])
            .args(["--pod-cidr", spec.pod_cidr])
            .args(["--etcd-endpoints", &etcd.endpoint()])
            .args(["--listen", &grpc.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--kubeconfig")
            .arg(kube.kubeconfig_path())
            .arg("--peers-dir")
            .arg(dir.join("peers"))
            .args(["--peers-dir-interval", "200ms"])
            .args(["--heartbeat-interval", "1s"])
            .args(spec.apiserver_args)
            .env("RUST_LOG", "warn");
        if spec.insecure {
            cmd.arg("--insecure");
        } else {
            cmd.arg("--tls-cert")
                .arg(&cert)
                .arg("--tls-key")
                .arg(&key)
                .arg("--tls-ca")
                .arg(&ca_path)
                .arg("--peer-ca-dir")
                .arg(dir.join("peer-cas"))
                .args(["--tls-reload-interval", "200ms"]);
        }
        let apiserver = Proc::spawn(
            &format!("mesh-apiserver {}", spec.name),
            cmd,
            dir.join("apiserver.log"),
        )?;
        let mut cluster = Cluster {
            apiserver,
            kube,
            etcd,
            name: spec.name.to_owned(),
            ca,
            dir,
            grpc,
            metrics,
        };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            self.apiserver.check_running()?;
            if env::http_get(self.metrics, "/healthz").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-apiserver of {} not healthy after {STARTUP:?}; log:\n{}",
                    self.name,
                    self.apiserver.log_tail()
                );
            }
            // Another process's state: nothing to await but its listener.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes this cluster import `peer` (peer file in our directory, our CA registered
    /// with the peer), as `meshctl connect` does one way.
    pub fn import(&self, peer: &Cluster) -> Result<()> {
        let spec = PeerSpec {
            name: peer.name.parse()?,
            address: peer.grpc.to_string(),
            ca_pem: peer.ca.cert_pem.clone(),
            server_name: None,
        };
        std::fs::write(
            peer.dir.join("peer-cas").join(format!("{}.crt", self.name)),
            &self.ca.cert_pem,
        )?;
        std::fs::write(
            self.dir.join("peers").join(format!("{}.yaml", peer.name)),
            render_entry(&spec),
        )?;
        Ok(())
    }

    /// The apiserver's `/metrics` body.
    pub fn metrics_text(&self) -> Result<String> {
        env::http_get(self.metrics, "/metrics")
    }

    /// `mesh_apiserver_index_objects` of (cluster, kind segment), 0 if absent.
    pub fn index_objects(&self, cluster: &str, kind: &str) -> Result<u64> {
        Ok(self.index_counts(&[(cluster, kind)])?[0])
    }

    /// [`Cluster::index_objects`] of each (cluster, kind segment), from one read of the
    /// metrics: a benchmark that polls reads each process's metrics once per round, so the
    /// polling costs the processes it measures as little as it can.
    pub fn index_counts(&self, series: &[(&str, &str)]) -> Result<Vec<u64>> {
        let body = self.metrics_text()?;
        Ok(series
            .iter()
            .map(|(cluster, kind)| {
                let series = format!(
                    "mesh_apiserver_index_objects{{cluster=\"{cluster}\",kind=\"{kind}\"}}"
                );
                env::metric(&body, &series).unwrap_or(0.0) as u64
            })
            .collect())
    }

    pub async fn etcd_client(&self) -> Result<etcd_client::Client> {
        etcd_client::Client::connect([self.etcd.endpoint()], None)
            .await
            .context("connecting to etcd")
    }
}

/// A node running mesh-agent: the process, its pins and its cgroup.
pub struct AgentNode {
    pub proc: Option<Proc>,
    pub bpffs: Bpffs,
    pub cgroup: Cgroup,
    pub node: String,
    pub metrics: SocketAddr,
    cmd_args: Vec<std::ffi::OsString>,
    starts: u32,
    dir: PathBuf,
}

impl AgentNode {
    /// Prepares the node (bpffs, cgroup, certificate) of `cluster`; no agent runs yet.
    /// The agent routes nothing (`--routing none`): its programs act only on the bench's
    /// own cgroup, so the host is untouched.
    pub fn prepare(cluster: &Cluster, node: &str, extra: &[&str]) -> Result<Self> {
        let bpffs = Bpffs::mount(node)?;
        let cgroup = Cgroup::new(node)?;
        let dir = cluster.dir.join(format!("node-{node}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = cluster
            .ca
            .issue(&format!("agent/{node}"))
            .write(&dir, "agent");
        let metrics = SocketAddr::from(([127, 0, 0, 1], env::free_port()));
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut push = |a: &dyn AsRef<std::ffi::OsStr>| args.push(a.as_ref().to_owned());
        for a in ["--node-name", node, "--cluster-name", &cluster.name] {
            push(&a);
        }
        push(&"--apiserver");
        push(&cluster.grpc.to_string());
        push(&"--tls-ca");
        push(&cluster.dir.join(format!("{}-ca.crt", cluster.name)));
        push(&"--tls-cert");
        push(&cert);
        push(&"--tls-key");
        push(&key);
        push(&"--cgroup-path");
        push(&cgroup.path);
        push(&"--bpffs-dir");
        push(&bpffs.pin_dir());
        for a in ["--routing", "none", "--heartbeat-interval", "1s"] {
            push(&a);
        }
        push(&"--metrics-listen");
        push(&metrics.to_string());
        for a in extra {
            push(a);
        }
        Ok(AgentNode {
            proc: None,
            bpffs,
            cgroup,
            node: node.to_owned(),
            metrics,
            cmd_args: args,
            starts: 0,
            dir,
        })
    }

    /// Starts the agent process; returns at once (see [`AgentNode::wait_datapath`]).
    pub fn start(&mut self, components: &Components) -> Result<()> {
        if self.proc.is_some() {
            bail!("the agent of {} already runs", self.node);
        }
        let mut cmd = components.command("agent")?;
        cmd.args(&self.cmd_args)
            .env("RUST_LOG", "warn,mesh_agent=info");
        self.starts += 1;
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        self.proc = Some(Proc::spawn(&format!("mesh-agent {}", self.node), cmd, log)?);
        Ok(())
    }

    /// Kills the agent (SIGKILL); the pins stay.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn proc_mut(&mut self) -> Result<&mut Proc> {
        self.proc.as_mut().context("the agent does not run")
    }

    /// Waits until the agent has pinned its maps (its log says `datapath ready`).
    pub async fn wait_datapath(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let p = self.proc_mut()?;
            p.check_running()?;
            if p.log_text().contains("datapath ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent did not open its datapath:\n{}", p.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `mesh_agent_map_entries{map=...}` (services, backends, ipcache), if reported yet.
    pub fn map_entries(&self, map: &str) -> Option<u64> {
        let body = env::http_get(self.metrics, "/metrics").ok()?;
        map_entries(&body, map)
    }

    /// The entries of the services, backends and ipcache maps (0 for a gauge not yet
    /// there), and the body they were read from, in one read of the agent's metrics.
    pub fn map_counts(&self) -> Option<([u64; 3], String)> {
        let body = env::http_get(self.metrics, "/metrics").ok()?;
        let n = |map| map_entries(&body, map).unwrap_or(0);
        Some(([n("services"), n("backends"), n("ipcache")], body))
    }
}

/// `mesh_agent_map_entries` of `map` in an agent's metrics.
fn map_entries(body: &str, map: &str) -> Option<u64> {
    env::metric(body, &format!("mesh_agent_map_entries{{map=\"{map}\"}}")).map(|v| v as u64)
}

/// Puts `kvs` into etcd in transactions of the importer's size (the apiserver's default
/// `--etcd-max-txn-ops`, which the benchmark's etcd accepts), `parallel` transactions in
/// flight; calls `progress` with the number written so far.
pub async fn put_batched(
    client: &etcd_client::Client,
    kvs: Vec<(String, Vec<u8>)>,
    parallel: usize,
    progress: impl FnMut(usize),
) -> Result<()> {
    let ops = mesh_apiserver::store::DEFAULT_TXN_OPS;
    put_batched_ops(client, kvs, ops, parallel, progress).await
}

/// [`put_batched`] with `ops` operations per transaction (at least 1).
pub async fn put_batched_ops(
    client: &etcd_client::Client,
    kvs: Vec<(String, Vec<u8>)>,
    ops: usize,
    parallel: usize,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    use futures::StreamExt;
    let chunks: Vec<Vec<(String, Vec<u8>)>> = kvs
        .chunks(ops.max(1))
        .map(<[(String, Vec<u8>)]>::to_vec)
        .collect();
    let mut done = 0;
    let mut results = futures::stream::iter(chunks.into_iter().map(|chunk| {
        let mut c = client.clone();
        async move {
            let n = chunk.len();
            let ops: Vec<TxnOp> = chunk
                .into_iter()
                .map(|(k, v)| TxnOp::put(k, v, None))
                .collect();
            c.txn(Txn::new().and_then(ops))
                .await
                .context("etcd transaction")?;
            Ok::<usize, anyhow::Error>(n)
        }
    }))
    .buffer_unordered(parallel.max(1));
    while let Some(r) = results.next().await {
        done += r?;
        progress(done);
    }
    Ok(())
}
