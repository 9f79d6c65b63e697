//! The supervisor (`mesh-lab supervise --name LAB`): one process per lab. In-process, per
//! cluster: the Kubernetes API, the controllers and kubelet (with [`NetnsRuntime`]), the
//! DNS server and the kube-proxy rule writer. As children: etcd and mesh-apiserver in the
//! control-plane netns, one mesh-agent per node netns, one workload per pod. It restarts
//! nothing on its own: a child that exits is logged and shown in `status` until `start`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::control::{Component, LabStatus, Request, Response};
use super::network;
use super::process::{self, ChildSpec, Running};
use super::runtime::{NetnsRuntime, PodPlace};
use super::sys::{self, Enter};
use super::topology::{
    APISERVER_METRICS_PORT, APISERVER_PORT, BPFFS, ClusterSpec, HUBBLE_PORT, KUBE_API_PORT, LabSpec,
};
use super::{LabFiles, find_binary};
use crate::controllers::{self, Controllers, ControllersConfig};
use crate::kube_api::resources as r;
use crate::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle, Store};

/// A child the supervisor runs (etcd, apiserver, agent).
struct Child {
    spec: ChildSpec,
    address: String,
    running: Option<Running>,
    /// Stopped on request (`kill`), not by itself.
    killed: bool,
}

impl Child {
    fn state(&self) -> (Option<u32>, String) {
        match &self.running {
            None => (None, "not started".into()),
            Some(r) => match r.exited() {
                None => (Some(r.pid), "running".into()),
                Some(_) if self.killed => (None, "killed".into()),
                Some(s) => (None, format!("exited ({s})")),
            },
        }
    }
}

struct ClusterRt {
    spec: ClusterSpec,
    api: KubeApiHandle,
    runtime: NetnsRuntime,
    controllers: Mutex<Option<Controllers>>,
    _proxy: tokio::task::JoinHandle<()>,
    /// By component name: `etcd`, `apiserver`, `agent/<node>`.
    children: Mutex<BTreeMap<String, Child>>,
}

struct Supervisor {
    spec: Arc<LabSpec>,
    files: LabFiles,
    cgroup2: PathBuf,
    clusters: Vec<ClusterRt>,
    partitions: Mutex<Vec<(String, String)>>,
    shutdown: watch::Sender<bool>,
}

/// Runs the supervisor of lab `name` until `shutdown` or SIGTERM.
pub async fn run(name: &str) -> anyhow::Result<()> {
    // A session of its own: the terminal that ran `mesh-lab up` can close.
    let _ = nix::unistd::setsid();
    let files = LabFiles::new(name);
    let spec: LabSpec = serde_json::from_slice(
        &std::fs::read(&files.lab_json)
            .with_context(|| format!("reading {}", files.lab_json.display()))?,
    )
    .with_context(|| format!("decoding {}", files.lab_json.display()))?;
    let spec = Arc::new(spec);
    std::fs::write(&files.supervisor_pid, std::process::id().to_string())
        .with_context(|| format!("writing {}", files.supervisor_pid.display()))?;
    let cgroup2 = sys::cgroup2_mount()?;

    let t = Instant::now();
    let setup = {
        let spec = spec.clone();
        let cgroup2 = cgroup2.clone();
        let parent = files
            .dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            network::build(&spec).context("building the lab network")?;
            for c in &spec.clusters {
                sys::cgroup_create(&spec.control_cgroup(&cgroup2, &c.name))?;
                for n in &c.nodes {
                    sys::cgroup_create(&spec.node_cgroup(&cgroup2, &c.name, &n.name))?;
                }
            }
            sys::ensure_bpffs(Path::new(BPFFS), &parent)?;
            for c in &spec.clusters {
                for n in &c.nodes {
                    let dir = spec.pin_dir(&c.name, &n.name);
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
            }
            Ok(())
        })
        .await?
    };
    setup?;
    tracing::info!(elapsed = ?t.elapsed(), "network, cgroups and bpffs ready");

    let mut clusters = Vec::new();
    let mut creds = Vec::new();
    for c in &spec.clusters {
        let rt = start_cluster(&spec, c, &files, &cgroup2).await?;
        creds.push((
            spec.context(&c.name),
            rt.api.credentials(),
            files.dir.join(&c.name).join("kube").join("ca.crt"),
        ));
        clusters.push(rt);
    }
    write_kubeconfig(&files.kubeconfig, &creds)?;
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let sup = Arc::new(Supervisor {
        spec: spec.clone(),
        files: files.clone(),
        cgroup2,
        clusters,
        partitions: Mutex::new(Vec::new()),
        shutdown,
    });

    let _ = std::fs::remove_file(&files.control_sock);
    let listener = UnixListener::bind(&files.control_sock)
        .with_context(|| format!("binding {}", files.control_sock.display()))?;
    tracing::info!(lab = %spec.name, socket = %files.control_sock.display(), elapsed = ?t.elapsed(), "supervisor ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = shutdown_rx.changed() => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                let sup = sup.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = stream.into_split();
                    let mut lines = BufReader::new(rd).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let resp = match serde_json::from_str::<Request>(&line) {
                            Ok(req) => sup.handle(req).await,
                            Err(e) => Response::error(format!("bad request {line:?}: {e}")),
                        };
                        let mut out = serde_json::to_string(&resp).unwrap_or_default();
                        out.push('\n');
                        if wr.write_all(out.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
    tracing::info!("shutting down");
    sup.stop_all().await;
    let _ = std::fs::remove_file(&files.control_sock);
    tracing::info!("supervisor stopped");
    Ok(())
}

async fn start_cluster(
    spec: &Arc<LabSpec>,
    c: &ClusterSpec,
    files: &LabFiles,
    cgroup2: &Path,
) -> anyhow::Result<ClusterRt> {
    let mut cfg = KubeApiConfig::new(files.dir.join(&c.name).join("kube"), &c.name);
    cfg.listen = SocketAddr::from((c.host_ip, KUBE_API_PORT));
    cfg.context = spec.context(&c.name);
    cfg.service_cidr = c.service_cidr.into();
    cfg.extra_sans = vec![c.host_ip.to_string(), "127.0.0.1".into()];
    let api = KubeApi::start(cfg)
        .await
        .with_context(|| format!("cluster {}: starting the Kubernetes API", c.name))?;
    let store = api.store().clone();
    bootstrap_objects(&store, c).with_context(|| format!("cluster {}: bootstrap", c.name))?;

    let runtime = NetnsRuntime::new(
        spec.clone(),
        &c.name,
        cgroup2.to_path_buf(),
        files.dir.clone(),
    );
    api.set_log_source(Arc::new(runtime.clone()));
    let [a, b, _, _] = spec.underlay.network().octets();
    let mut ccfg = ControllersConfig::new(&c.name, Arc::new(runtime.clone())).with_lb_range(
        std::net::Ipv4Addr::new(a, b, c.id, 200),
        std::net::Ipv4Addr::new(a, b, c.id, 250),
    );
    ccfg.nodes = c.nodes.iter().map(|n| n.name.clone()).collect();
    ccfg.lb_static = vec![c.cp_ip];
    let controllers = controllers::spawn_all(store.clone(), ccfg);

    // The cluster DNS is the kube-dns pod (see `bootstrap_objects`), served by the runtime.
    runtime.serve_cluster_dns(store.clone());

    // kube-proxy: the latest ruleset, applied in every node netns of the cluster.
    let (rules_tx, mut rules_rx) = watch::channel(String::new());
    let _rules_watch = crate::proxy_rules::spawn(store.clone(), move |text: String| {
        let _ = rules_tx.send(text);
    });
    let node_netns: Vec<String> = c.nodes.iter().map(|n| spec.node_netns(&n.name)).collect();
    let cluster_name = c.name.clone();
    let proxy = tokio::spawn(async move {
        let _keep = _rules_watch;
        while rules_rx.changed().await.is_ok() {
            let text = rules_rx.borrow_and_update().clone();
            let nss = node_netns.clone();
            let r = tokio::task::spawn_blocking(move || -> Result<(), sys::SysError> {
                for ns in &nss {
                    sys::run("ip", &["netns", "exec", ns, "nft", "-f", "-"], Some(&text))?;
                }
                Ok(())
            })
            .await;
            match r {
                Ok(Ok(())) => tracing::debug!(cluster = %cluster_name, "service rules applied"),
                Ok(Err(error)) => {
                    tracing::warn!(cluster = %cluster_name, %error, "applying service rules failed")
                }
                Err(error) => tracing::warn!(%error, "service rules task failed"),
            }
        }
    });

    Ok(ClusterRt {
        spec: c.clone(),
        api,
        runtime,
        controllers: Mutex::new(Some(controllers)),
        _proxy: proxy,
        children: Mutex::new(BTreeMap::new()),
    })
}

fn create_or_keep(
    store: &Store,
    rt: &'static r::ResourceType,
    ns: Option<&str>,
    obj: Value,
) -> anyhow::Result<Value> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    match store.create(rt, ns, obj) {
        Ok(v) => Ok(v),
        Err(e) if e.code == 409 => Ok(store.get(rt, ns, &name)?),
        Err(e) => Err(anyhow!("creating {} {name}: {e}", rt.kind)),
    }
}

/// Nodes, the mesh's CRDs, namespace mesh-system, ConfigMap mesh-config, Service
/// mesh-apiserver.
fn bootstrap_objects(store: &Store, c: &ClusterSpec) -> anyhow::Result<()> {
    crate::mesh_crds::install(store)?;
    cluster_dns(store, c)?;
    for n in &c.nodes {
        let node = json!({
            "metadata": {"name": n.name, "labels": {
                "kubernetes.io/hostname": n.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
                "topology.kubernetes.io/region": c.name,
                "topology.kubernetes.io/zone": format!("{}-{}", c.name, n.index),
            }},
            "spec": {"podCIDR": n.pod_cidr.to_string(), "podCIDRs": [n.pod_cidr.to_string()]},
        });
        let mut obj = create_or_keep(store, &r::NODES, None, node)?;
        obj["status"] = json!({
            "addresses": [
                {"type": "InternalIP", "address": n.ip.to_string()},
                {"type": "Hostname", "address": n.name},
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "mesh-lab node is ready",
            }],
            "nodeInfo": {"kubeletVersion": "v1.31.0-mesh-lab", "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH, "containerRuntimeVersion": "mesh-lab://netns",
                "kernelVersion": "", "osImage": "mesh-lab", "kubeProxyVersion": "",
                "machineID": "", "systemUUID": "", "bootID": ""},
        });
        store
            .update_status(&r::NODES, None, &n.name, obj)
            .map_err(|e| anyhow!("node {} status: {e}", n.name))?;
    }
    create_or_keep(
        store,
        &r::NAMESPACES,
        None,
        json!({"metadata": {"name": "mesh-system"}}),
    )?;
    create_or_keep(
        store,
        &r::CONFIGMAPS,
        Some("mesh-system"),
        json!({
            "metadata": {"name": "mesh-config", "namespace": "mesh-system"},
            "data": {
                "MESH_CLUSTER_NAME": c.name,
                "MESH_CLUSTER_ID": c.id.to_string(),
                "MESH_POD_CIDR": c.pod_cidr.to_string(),
                "MESH_SERVICE_CIDR": c.service_cidr.to_string(),
            },
        }),
    )?;
    create_or_keep(
        store,
        &r::SERVICES,
        Some("mesh-system"),
        json!({
            "metadata": {"name": "mesh-apiserver", "namespace": "mesh-system",
                "labels": {"app.kubernetes.io/name": "mesh-apiserver"}},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerIP": c.cp_ip.to_string(),
                "selector": {"app.kubernetes.io/name": "mesh-apiserver"},
                "ports": [{"name": "grpc", "port": APISERVER_PORT, "targetPort": APISERVER_PORT, "protocol": "TCP"}],
            },
        }),
    )?;
    Ok(())
}

/// The cluster DNS as real clusters have it: a `coredns` Deployment in kube-system, labelled
/// `k8s-app=kube-dns` (its pod serves the lab's DNS at its pod IP, see
/// `NetnsRuntime::serve_cluster_dns`), and the `kube-dns` Service at the ClusterIP pods use
/// as their nameserver. Policies select it as they select CoreDNS.
fn cluster_dns(store: &Store, c: &ClusterSpec) -> anyhow::Result<()> {
    use super::runtime::{DNS_LABEL, DNS_NAMESPACE};
    let labels = json!({ DNS_LABEL.0: DNS_LABEL.1 });
    create_or_keep(
        store,
        &r::SERVICES,
        Some(DNS_NAMESPACE),
        json!({
            "metadata": {"name": "kube-dns", "namespace": DNS_NAMESPACE,
                "labels": {DNS_LABEL.0: DNS_LABEL.1, "kubernetes.io/name": "CoreDNS"}},
            "spec": {
                "clusterIP": c.dns_ip().to_string(),
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP"},
                    {"name": "metrics", "port": 9153, "targetPort": 9153, "protocol": "TCP"},
                ],
            },
        }),
    )?;
    create_or_keep(
        store,
        &r::DEPLOYMENTS,
        Some(DNS_NAMESPACE),
        json!({
            "metadata": {"name": "coredns", "namespace": DNS_NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{
                        "name": "coredns",
                        "image": "registry.k8s.io/coredns/coredns:v1.11.3",
                        "ports": [
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 9153, "protocol": "TCP"},
                        ],
                    }]},
                },
            },
        }),
    )?;
    Ok(())
}

/// One kubeconfig with a context per cluster, the first one current.
fn write_kubeconfig(
    path: &Path,
    creds: &[(String, crate::kube_api::Credentials, PathBuf)],
) -> anyhow::Result<()> {
    let clusters: Vec<Value> = creds
        .iter()
        .map(|(ctx, c, ca)| {
            json!({"name": ctx, "cluster": {
            "server": c.url, "certificate-authority": ca.display().to_string()}})
        })
        .collect();
    let users: Vec<Value> = creds
        .iter()
        .map(|(ctx, c, _)| json!({"name": ctx, "user": {"token": c.token}}))
        .collect();
    let contexts: Vec<Value> = creds
        .iter()
        .map(|(ctx, _, _)| json!({"name": ctx, "context": {"cluster": ctx, "user": ctx, "namespace": "default"}}))
        .collect();
    let cfg = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": clusters, "users": users, "contexts": contexts,
        "current-context": creds.first().map(|(c, _, _)| c.clone()).unwrap_or_default(),
        "preferences": {},
    });
    let text = serde_yaml::to_string(&cfg)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
    }
    Ok(())
}

// === impl Supervisor ===

impl Supervisor {
    fn cluster(&self, name: &str) -> anyhow::Result<&ClusterRt> {
        self.clusters
            .iter()
            .find(|c| c.spec.name == name)
            .ok_or_else(|| {
                anyhow!(
                    "no cluster {name:?} in lab {} (clusters: {})",
                    self.spec.name,
                    self.clusters
                        .iter()
                        .map(|c| c.spec.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    async fn handle(self: &Arc<Self>, req: Request) -> Response {
        let r = match req {
            Request::Status => Ok(Response {
                ok: true,
                status: Some(self.status()),
                ..Default::default()
            }),
            Request::Kill { cluster, component } => self.kill(&cluster, &component).await,
            Request::Start { cluster, component } => self.start(&cluster, &component).await,
            Request::Partition { a, b } => self.partition(&a, &b).await,
            Request::Heal => self.heal().await,
            Request::Shutdown => {
                let _ = self.shutdown.send(true);
                Ok(Response::ok())
            }
            Request::MeshUp => self.mesh_up().await,
            Request::Pod {
                cluster,
                namespace,
                pod,
            } => self.pod(&cluster, &namespace, &pod).map(|p| Response {
                ok: true,
                pod: Some(p),
                ..Default::default()
            }),
        };
        r.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    fn status(&self) -> LabStatus {
        let mut components = Vec::new();
        let me = Some(std::process::id());
        for c in &self.clusters {
            let name = &c.spec.name;
            components.push(Component {
                cluster: name.clone(),
                component: "kube-api".into(),
                pid: me,
                state: "running".into(),
                address: c.api.addr().to_string(),
                detail: String::new(),
            });
            components.push(Component {
                cluster: name.clone(),
                component: "dns".into(),
                pid: me,
                state: "running".into(),
                address: format!("{}:53", c.spec.dns_ip()),
                detail: "Service kube-system/kube-dns -> the coredns pod".into(),
            });
            let children = c.children.lock().expect("children lock");
            let order = ["etcd".to_owned(), "apiserver".to_owned()];
            for comp in order.iter() {
                components.push(child_component(name, comp, children.get(comp)));
            }
            for n in &c.spec.nodes {
                let agent = format!("agent/{}", n.name);
                let mut comp = child_component(name, &agent, children.get(&agent));
                if comp.address.is_empty() {
                    comp.address = n.ip.to_string();
                }
                components.push(comp);
            }
            components.push(Component {
                cluster: name.clone(),
                component: "pods".into(),
                pid: None,
                state: "running".into(),
                address: c.spec.pod_cidr.to_string(),
                detail: format!("{} pods", c.runtime.pod_count()),
            });
        }
        LabStatus {
            lab: self.spec.name.clone(),
            supervisor_pid: std::process::id(),
            kubeconfig: self.files.kubeconfig.display().to_string(),
            underlay: self.spec.underlay.to_string(),
            partitions: self.partitions.lock().expect("partitions").clone(),
            components,
        }
    }

    fn child_spec(&self, c: &ClusterSpec, component: &str) -> anyhow::Result<(ChildSpec, String)> {
        let dir = self.files.dir.join(&c.name);
        let pki = dir.join("pki");
        let logs = dir.join("logs");
        let control = Enter {
            netns: Some(self.spec.cp_netns(&c.name)),
            cgroup: Some(self.spec.control_cgroup(&self.cgroup2, &c.name)),
            ..Default::default()
        };
        let p = |x: &Path| x.display().to_string();
        match component {
            "etcd" => Ok((
                ChildSpec {
                    program: which("etcd")?,
                    args: [
                        "--name",
                        &c.name,
                        "--data-dir",
                        &p(&dir.join("etcd")),
                        "--listen-client-urls",
                        "http://127.0.0.1:2379",
                        "--advertise-client-urls",
                        "http://127.0.0.1:2379",
                        "--listen-peer-urls",
                        "http://127.0.0.1:2380",
                        "--initial-advertise-peer-urls",
                        "http://127.0.0.1:2380",
                        "--initial-cluster",
                        &format!("{}=http://127.0.0.1:2380", c.name),
                        "--heartbeat-interval",
                        "50",
                        "--election-timeout",
                        "500",
                        // mesh-apiserver's default --etcd-max-txn-ops.
                        "--max-txn-ops",
                        "1024",
                        "--log-level",
                        "warn",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                    env: vec![],
                    enter: control,
                    log: logs.join("etcd.log"),
                },
                "127.0.0.1:2379 (cp netns)".into(),
            )),
            "apiserver" => Ok((
                ChildSpec {
                    program: find_binary("mesh-apiserver")?,
                    args: vec![
                        "--cluster-name".into(),
                        c.name.clone(),
                        "--cluster-id".into(),
                        c.id.to_string(),
                        "--pod-cidr".into(),
                        c.pod_cidr.to_string(),
                        "--service-cidr".into(),
                        c.service_cidr.to_string(),
                        "--etcd-endpoints".into(),
                        "http://127.0.0.1:2379".into(),
                        "--kubeconfig".into(),
                        p(&self.files.kubeconfig),
                        "--kube-context".into(),
                        self.spec.context(&c.name),
                        "--listen".into(),
                        format!("0.0.0.0:{APISERVER_PORT}"),
                        "--metrics-listen".into(),
                        format!("{}:{APISERVER_METRICS_PORT}", c.cp_ip),
                        "--tls-cert".into(),
                        p(&pki.join("apiserver.crt")),
                        "--tls-key".into(),
                        p(&pki.join("apiserver.key")),
                        "--tls-ca".into(),
                        p(&pki.join("ca.crt")),
                        "--peers-secret".into(),
                        "mesh-system/mesh-peers".into(),
                    ],
                    env: vec![],
                    enter: control,
                    log: logs.join("apiserver.log"),
                },
                format!("{}:{APISERVER_PORT}", c.cp_ip),
            )),
            agent if agent.starts_with("agent/") => {
                let node = &agent["agent/".len()..];
                let n = c
                    .nodes
                    .iter()
                    .find(|n| n.name == node)
                    .ok_or_else(|| anyhow!("cluster {} has no node {node:?}", c.name))?;
                let cgroup = self.spec.node_cgroup(&self.cgroup2, &c.name, &n.name);
                Ok((
                    ChildSpec {
                        program: find_binary("mesh-agent")?,
                        args: vec![
                            "--node-name".into(),
                            n.name.clone(),
                            "--cluster-name".into(),
                            c.name.clone(),
                            "--apiserver".into(),
                            format!("{}:{APISERVER_PORT}", c.cp_ip),
                            "--tls-ca".into(),
                            p(&pki.join("ca.crt")),
                            "--tls-cert".into(),
                            p(&pki.join(format!("agent-{}.crt", n.name))),
                            "--tls-key".into(),
                            p(&pki.join(format!("agent-{}.key", n.name))),
                            "--cgroup-path".into(),
                            p(&cgroup),
                            "--bpffs-dir".into(),
                            p(&self.spec.pin_dir(&c.name, &n.name)),
                            "--status-interval".into(),
                            "2s".into(),
                            // Hubble's Observer API on the node's address, which the
                            // cluster's apiserver (the relay) dials.
                            "--hubble-listen-address".into(),
                            format!("{}:{HUBBLE_PORT}", n.ip),
                            "--hubble-advertise-address".into(),
                            format!("{}:{HUBBLE_PORT}", n.ip),
                        ],
                        env: vec![],
                        enter: Enter {
                            netns: Some(self.spec.node_netns(&n.name)),
                            cgroup: Some(cgroup),
                            ..Default::default()
                        },
                        log: logs.join(format!("agent-{}.log", n.name)),
                    },
                    format!("{} (node netns)", n.ip),
                ))
            }
            other => bail!("unknown component {other:?}: expected apiserver, etcd or agent/<node>"),
        }
    }

    /// Starts a component that is not running.
    async fn start_child(&self, cluster: &str, component: &str) -> anyhow::Result<()> {
        let c = self.cluster(cluster)?;
        let (spec, address) = self.child_spec(&c.spec, component)?;
        {
            let children = c.children.lock().expect("children lock");
            if let Some(ch) = children.get(component)
                && ch.running.as_ref().is_some_and(|r| r.exited().is_none())
            {
                bail!("{component} of cluster {cluster} is already running");
            }
        }
        let running = process::spawn(spec.clone())
            .with_context(|| format!("starting {component} of cluster {cluster}"))?;
        tracing::info!(cluster, component, pid = running.pid, "started");
        let mut watcher = running.clone();
        let (cl, co) = (cluster.to_owned(), component.to_owned());
        tokio::spawn(async move {
            let status = watcher.wait().await;
            tracing::warn!(cluster = %cl, component = %co, %status, "child exited");
        });
        c.children.lock().expect("children lock").insert(
            component.to_owned(),
            Child {
                spec,
                address,
                running: Some(running),
                killed: false,
            },
        );
        Ok(())
    }

    async fn kill(&self, cluster: &str, component: &str) -> anyhow::Result<Response> {
        let c = self.cluster(cluster)?;
        self.child_spec(&c.spec, component)?;
        let mut running = {
            let mut children = c.children.lock().expect("children lock");
            let ch = children
                .get_mut(component)
                .filter(|ch| ch.running.as_ref().is_some_and(|r| r.exited().is_none()))
                .ok_or_else(|| anyhow!("{component} of cluster {cluster} is not running"))?;
            ch.killed = true;
            ch.running.clone().expect("checked")
        };
        sys::signal(running.pid as i32, nix::sys::signal::Signal::SIGKILL);
        tokio::time::timeout(Duration::from_secs(10), running.wait())
            .await
            .map_err(|_| anyhow!("{component} of cluster {cluster} did not exit after SIGKILL"))?;
        tracing::info!(cluster, component, "killed on request");
        Ok(Response::ok())
    }

    async fn start(&self, cluster: &str, component: &str) -> anyhow::Result<Response> {
        self.start_child(cluster, component).await?;
        Ok(Response::ok())
    }

    async fn partition(&self, a: &str, b: &str) -> anyhow::Result<Response> {
        self.cluster(a)?;
        self.cluster(b)?;
        if a == b {
            bail!("cannot partition cluster {a} from itself");
        }
        {
            let p = self.partitions.lock().expect("partitions");
            if p.iter()
                .any(|(x, y)| (x == a && y == b) || (x == b && y == a))
            {
                bail!("clusters {a} and {b} are already partitioned");
            }
        }
        let spec = self.spec.clone();
        let (a2, b2) = (a.to_owned(), b.to_owned());
        tokio::task::spawn_blocking(move || network::partition(&spec, &a2, &b2)).await??;
        self.partitions
            .lock()
            .expect("partitions")
            .push((a.to_owned(), b.to_owned()));
        tracing::info!(a, b, "partitioned");
        Ok(Response::ok())
    }

    async fn heal(&self) -> anyhow::Result<Response> {
        let spec = self.spec.clone();
        tokio::task::spawn_blocking(move || network::heal(&spec)).await??;
        self.partitions.lock().expect("partitions").clear();
        tracing::info!("healed");
        Ok(Response::ok())
    }

    async fn mesh_up(&self) -> anyhow::Result<Response> {
        for c in &self.clusters {
            let pki = self.files.dir.join(&c.spec.name).join("pki");
            let ca = std::fs::read_to_string(pki.join("ca.crt"))
                .with_context(|| format!("reading {}", pki.join("ca.crt").display()))?;
            create_or_keep(
                c.api.store(),
                &r::SECRETS,
                Some("mesh-system"),
                json!({"metadata": {"name": "mesh-apiserver-tls", "namespace": "mesh-system"},
                    "type": "Opaque", "stringData": {"ca.crt": ca}}),
            )?;
        }
        for c in &self.clusters {
            let name = c.spec.name.clone();
            if !self.is_running(&name, "etcd") {
                self.start_child(&name, "etcd").await?;
            }
        }
        for c in &self.clusters {
            let netns = self.spec.cp_netns(&c.spec.name);
            wait_tcp(
                &netns,
                SocketAddr::from(([127, 0, 0, 1], 2379)),
                Duration::from_secs(30),
            )
            .await
            .with_context(|| format!("cluster {}: etcd did not come up", c.spec.name))?;
        }
        for c in &self.clusters {
            let name = c.spec.name.clone();
            if !self.is_running(&name, "apiserver") {
                self.start_child(&name, "apiserver").await?;
            }
            for n in &c.spec.nodes {
                let agent = format!("agent/{}", n.name);
                if !self.is_running(&name, &agent) {
                    self.start_child(&name, &agent).await?;
                }
            }
        }
        Ok(Response::ok())
    }

    fn is_running(&self, cluster: &str, component: &str) -> bool {
        self.cluster(cluster).is_ok_and(|c| {
            c.children
                .lock()
                .expect("children lock")
                .get(component)
                .and_then(|ch| ch.running.as_ref())
                .is_some_and(|r| r.exited().is_none())
        })
    }

    fn pod(&self, cluster: &str, namespace: &str, pod: &str) -> anyhow::Result<PodPlace> {
        let c = self.cluster(cluster)?;
        let name = match pod
            .strip_prefix("deploy/")
            .or_else(|| pod.strip_prefix("deployment/"))
        {
            None => pod.to_owned(),
            Some(deploy) => first_ready_pod(c.api.store(), namespace, deploy)?,
        };
        c.runtime
            .place(namespace, &name)
            .ok_or_else(|| anyhow!("pod {namespace}/{name} is not running in cluster {cluster}"))
    }

    async fn stop_all(&self) {
        for c in &self.clusters {
            let ctl = c.controllers.lock().expect("controllers lock").take();
            if let Some(ctl) = ctl {
                let _ = tokio::time::timeout(Duration::from_secs(20), ctl.shutdown()).await;
            }
        }
        let mut waits = Vec::new();
        for c in &self.clusters {
            for ch in c.children.lock().expect("children lock").values() {
                if let Some(r) = &ch.running
                    && r.exited().is_none()
                {
                    sys::signal(r.pid as i32, nix::sys::signal::Signal::SIGTERM);
                    waits.push(r.clone());
                }
            }
        }
        for mut w in waits {
            if tokio::time::timeout(Duration::from_secs(5), w.wait())
                .await
                .is_err()
            {
                sys::signal(w.pid as i32, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn child_component(cluster: &str, component: &str, child: Option<&Child>) -> Component {
    let (pid, state) = child
        .map(Child::state)
        .unwrap_or((None, "not started".into()));
    Component {
        cluster: cluster.to_owned(),
        component: component.to_owned(),
        pid,
        state,
        address: child.map(|c| c.address.clone()).unwrap_or_default(),
        detail: child
            .map(|c| c.spec.log.display().to_string())
            .unwrap_or_default(),
    }
}

fn first_ready_pod(store: &Store, namespace: &str, deploy: &str) -> anyhow::Result<String> {
    let d = store
        .get(&r::DEPLOYMENTS, Some(namespace), deploy)
        .map_err(|e| anyhow!("deployment {namespace}/{deploy}: {e}"))?;
    let selector: BTreeMap<String, String> = d
        .pointer("/spec/selector/matchLabels")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let (pods, _) = store.list(
        &r::PODS,
        Some(namespace),
        &Default::default(),
        &Default::default(),
    );
    pods.iter()
        .filter(|p| {
            selector.iter().all(|(k, v)| {
                p.pointer(&format!(
                    "/metadata/labels/{}",
                    k.replace('~', "~0").replace('/', "~1")
                ))
                .and_then(Value::as_str)
                    == Some(v)
            })
        })
        .filter(|p| {
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .filter_map(|p| p.pointer("/metadata/name").and_then(Value::as_str))
        .map(str::to_owned)
        .next()
        .ok_or_else(|| anyhow!("deployment {namespace}/{deploy} has no ready pod"))
}

/// Waits until a TCP connect from inside `netns` succeeds (state owned by another process).
async fn wait_tcp(netns: &str, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ns = netns.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            sys::in_netns(&ns, move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            })
            .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} in netns {netns} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{program} not found on PATH (install it: bash scripts/setup.sh)"))
}
