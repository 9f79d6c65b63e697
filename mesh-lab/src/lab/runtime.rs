//! The lab's [`PodRuntime`]: each pod is a network namespace plugged into its node's
//! namespace by a veth, an IP from the node's pod CIDR, a cgroup under the node's cgroup (so
//! the node agent's socket load balancing applies to it), and one `mesh-lab workload`
//! process in a private mount namespace whose /etc/resolv.conf points at the cluster DNS.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::network;
use super::process::{self, ChildSpec};
use super::sys::{self, Enter};
use super::topology::{LabSpec, pod_veth};
use crate::controllers::{PodKey, PodRuntime, PodSandboxSpec, Probe, StartedPod};
use crate::kube_api::{LogSource, Store};
use crate::pod_logs;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a pod lives: enough to run a command inside it (`mesh-lab exec`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodPlace {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub cgroup: PathBuf,
    pub resolv: PathBuf,
    pub pid: Option<u32>,
}

struct PodEntry {
    place: PodPlace,
    running: Arc<AtomicBool>,
    exit_code: Arc<Mutex<Option<i32>>>,
    /// The cluster DNS this pod serves (the kube-dns pod only); dropped with the pod.
    dns: Option<crate::dns::DnsHandle>,
}

/// Namespace and label of the pods that serve the cluster DNS (CoreDNS's in a real cluster).
pub const DNS_NAMESPACE: &str = "kube-system";
pub const DNS_LABEL: (&str, &str) = ("k8s-app", "kube-dns");

fn is_dns_pod(pod: &PodSandboxSpec) -> bool {
    pod.key.namespace == DNS_NAMESPACE
        && pod.labels.get(DNS_LABEL.0).map(String::as_str) == Some(DNS_LABEL.1)
}

struct Inner {
    spec: Arc<LabSpec>,
    cluster: String,
    cgroup2: PathBuf,
    /// `<state dir>/<cluster>/pods`: resolv.conf and process output of each pod.
    pods_dir: PathBuf,
    /// `<state dir>/<cluster>/pod-logs`: container logs ([`crate::pod_logs`]), kept across
    /// container restarts, removed when the pod is deleted.
    logs_dir: PathBuf,
    /// By (namespace, name).
    pods: Mutex<BTreeMap<(String, String), PodEntry>>,
    /// What the DNS pods serve from (set by the supervisor).
    dns_store: std::sync::OnceLock<Arc<Store>>,
}

/// The netns runtime of one cluster.
#[derive(Clone)]
pub struct NetnsRuntime {
    inner: Arc<Inner>,
}

impl NetnsRuntime {
    pub fn new(spec: Arc<LabSpec>, cluster: &str, cgroup2: PathBuf, state_dir: PathBuf) -> Self {
        NetnsRuntime {
            inner: Arc::new(Inner {
                pods_dir: state_dir.join(cluster).join("pods"),
                logs_dir: state_dir.join(cluster).join("pod-logs"),
                spec,
                cluster: cluster.to_owned(),
                cgroup2,
                pods: Mutex::new(BTreeMap::new()),
                dns_store: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Makes the `kube-system` pods labelled `k8s-app=kube-dns` serve the cluster DNS from
    /// `store`, bound in their network namespace at their pod IP, port 53 UDP and TCP.
    pub fn serve_cluster_dns(&self, store: Arc<Store>) {
        let _ = self.inner.dns_store.set(store);
    }

    /// The pod's place, when it runs here.
    pub fn place(&self, namespace: &str, name: &str) -> Option<PodPlace> {
        let pods = self.inner.pods.lock().expect("pods lock");
        pods.get(&(namespace.to_owned(), name.to_owned()))
            .map(|e| e.place.clone())
    }

    pub fn pod_count(&self) -> usize {
        self.inner.pods.lock().expect("pods lock").len()
    }
}

impl Inner {
    fn allocate_ip(&self, node: &str) -> anyhow::Result<Ipv4Addr> {
        let (_, n) = self
            .spec
            .node(node)
            .ok_or_else(|| anyhow!("node {node} is not a node of this lab"))?;
        let pods = self.pods.lock().expect("pods lock");
        let used: BTreeSet<Ipv4Addr> = pods
            .values()
            .filter(|e| e.place.node == node)
            .map(|e| e.place.ip)
            .collect();
        n.pod_cidr
            .hosts()
            .skip(1)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| anyhow!("node {node}: pod CIDR {} is full", n.pod_cidr))
    }

    fn start_blocking(&self, pod: &PodSandboxSpec, ip: Ipv4Addr) -> anyhow::Result<PodPlace> {
        let key = &pod.key;
        let (cluster, node) = self
            .spec
            .node(&pod.node)
            .ok_or_else(|| anyhow!("node {} is not a node of this lab", pod.node))?;
        anyhow::ensure!(
            cluster.name == self.cluster,
            "node {} belongs to cluster {}, not {}",
            pod.node,
            cluster.name,
            self.cluster
        );
        let netns = self
            .spec
            .pod_netns(&self.cluster, &key.namespace, &key.name);
        let node_netns = self.spec.node_netns(&node.name);
        let veth = pod_veth(&self.cluster, &key.namespace, &key.name);
        // A namespace left by an earlier incarnation of the same pod name is replaced.
        let _ = sys::netns_delete(&netns);
        sys::netns_add(&netns).with_context(|| format!("pod {}/{}", key.namespace, key.name))?;
        network::plug_pod(&node_netns, node.ip, &netns, &veth, ip)
            .with_context(|| format!("pod {}/{}: network", key.namespace, key.name))?;
        let cgroup = self
            .spec
            .node_cgroup(&self.cgroup2, &self.cluster, &node.name)
            .join(format!("{}.{}", key.namespace, key.name));
        sys::cgroup_remove(&cgroup, Duration::from_secs(5))?;
        sys::cgroup_create(&cgroup)?;
        let dir = self
            .pods_dir
            .join(format!("{}.{}", key.namespace, key.name));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            format!(
                "nameserver {}\nsearch {}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
                cluster.dns_ip(), key.namespace
            ),
        )
        .with_context(|| format!("writing {}", resolv.display()))?;
        Ok(PodPlace {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: key.uid.clone(),
            node: node.name.clone(),
            ip,
            netns,
            cgroup,
            resolv,
            pid: None,
        })
    }

    fn workload(&self, pod: &PodSandboxSpec, place: &PodPlace) -> anyhow::Result<ChildSpec> {
        let exe = std::env::current_exe().context("locating mesh-lab")?;
        let mut ports: Vec<u16> = pod
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .filter(|(_, _, proto)| proto.is_empty() || proto.eq_ignore_ascii_case("TCP"))
            .map(|(_, p, _)| *p)
            .collect();
        // Port 53 of the DNS pod is the cluster DNS's (bound by the runtime), not the workload's.
        if is_dns_pod(pod) {
            ports.retain(|p| *p != 53);
        }
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            ports.push(80);
        }
        let mut args = vec!["workload".to_owned()];
        for p in &ports {
            args.extend(["--listen".to_owned(), format!("0.0.0.0:{p}")]);
        }
        let log_dir = pod_logs::pod_dir(&self.logs_dir, &place.namespace, &place.name, &place.uid);
        args.extend(["--log-dir".to_owned(), log_dir.display().to_string()]);
        for c in &pod.containers {
            args.extend([
                "--container".to_owned(),
                pod_logs::container_arg(&c.name, &c.tcp_ports()),
            ]);
        }
        let mut env: Vec<(String, String)> = pod
            .containers
            .iter()
            .flat_map(|c| c.env.iter().cloned())
            .collect();
        // Container args set the reply (`mesh-lab workload ... -- ARGS`).
        if let Some(c) = pod.containers.iter().find(|c| !c.args.is_empty()) {
            args.push("--".to_owned());
            args.extend(c.args.iter().cloned());
        }
        // The kubelet already sets MESH_LAB_POD/NAMESPACE/NODE/CLUSTER in each container's env.
        env.push(("MESH_LAB_POD_IP".to_owned(), place.ip.to_string()));
        Ok(ChildSpec {
            program: exe,
            args,
            env,
            enter: Enter {
                netns: Some(place.netns.clone()),
                cgroup: Some(place.cgroup.clone()),
                resolv: Some(place.resolv.clone()),
                parent: None,
            },
            log: self
                .pods_dir
                .join(format!("{}.{}", place.namespace, place.name))
                .join("workload.log"),
        })
    }

    fn stop_blocking(&self, key: &PodKey) -> anyhow::Result<()> {
        let entry = self
            .pods
            .lock()
            .expect("pods lock")
            .remove(&(key.namespace.clone(), key.name.clone()));
        let Some(entry) = entry else {
            return Ok(());
        };
        let place = entry.place;
        sys::cgroup_remove(&place.cgroup, Duration::from_secs(10))?;
        sys::netns_delete(&place.netns)?;
        let node_netns = self.spec.node_netns(&place.node);
        let veth = pod_veth(&self.cluster, &place.namespace, &place.name);
        // Deleting the pod netns removes the veth pair; this only catches leftovers.
        let _ = sys::ip(Some(&node_netns), &["link", "del", &veth]);
        let _ = std::fs::remove_dir_all(
            self.pods_dir
                .join(format!("{}.{}", place.namespace, place.name)),
        );
        Ok(())
    }
}

/// Binds the cluster DNS in the pod's network namespace at its IP, port 53 UDP and TCP.
async fn serve_dns_in(
    store: Arc<Store>,
    place: &PodPlace,
) -> anyhow::Result<crate::dns::DnsHandle> {
    let addr = SocketAddr::from((place.ip, 53));
    let netns = place.netns.clone();
    let (udp, tcp) = tokio::task::spawn_blocking(move || {
        sys::in_netns(&netns, move || -> std::io::Result<_> {
            Ok((
                std::net::UdpSocket::bind(addr)?,
                std::net::TcpListener::bind(addr)?,
            ))
        })
    })
    .await??
    .with_context(|| format!("binding the cluster DNS at {addr} in netns {}", place.netns))?;
    let handle = crate::dns::DnsServer::serve(store, udp, tcp)?;
    tracing::info!(pod = %format!("{}/{}", place.namespace, place.name), %addr, "cluster DNS bound in the pod");
    Ok(handle)
}

/// One probe from inside the node netns (as kubelet probes from the node).
fn probe_from(node_netns: &str, ip: Ipv4Addr, probe: Probe) -> bool {
    sys::in_netns(node_netns, move || {
        let port = match &probe {
            Probe::Http { port, .. } | Probe::Tcp { port } => *port,
        };
        let addr = SocketAddr::from((ip, port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
            return false;
        };
        let Probe::Http { path, .. } = probe else {
            return true;
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n"
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut buf[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        // "HTTP/1.1 200": kubelet counts 200-399 as success.
        std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (200..400).contains(&c))
    })
    .unwrap_or(false)
}

impl PodRuntime for NetnsRuntime {
    fn start(&self, pod: PodSandboxSpec) -> BoxFuture<'static, anyhow::Result<StartedPod>> {
        let inner = self.inner.clone();
        async move {
            let key = pod.key.clone();
            // Restarting a pod that still runs: stop the old sandbox first.
            let inner2 = inner.clone();
            let k2 = key.clone();
            tokio::task::spawn_blocking(move || inner2.stop_blocking(&k2)).await??;
            let ip = inner.allocate_ip(&pod.node)?;
            let host_ip = inner
                .spec
                .node(&pod.node)
                .map(|(_, n)| n.ip)
                .ok_or_else(|| anyhow!("node {} is not a node of this lab", pod.node))?;
            // Reserve the IP before the slow part, so concurrent starts get distinct ones.
            let running = Arc::new(AtomicBool::new(false));
            let exit_code = Arc::new(Mutex::new(None));
            let mut place = PodPlace {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: key.uid.clone(),
                node: pod.node.clone(),
                ip,
                netns: inner.spec.pod_netns(&inner.cluster, &key.namespace, &key.name),
                cgroup: PathBuf::new(),
                resolv: PathBuf::new(),
                pid: None,
            };
            inner.pods.lock().expect("pods lock").insert(
                (key.namespace.clone(), key.name.clone()),
                PodEntry {
                    place: place.clone(),
                    running: running.clone(),
                    exit_code: exit_code.clone(),
                    dns: None,
                },
            );
            let inner2 = inner.clone();
            let (pod, setup) = tokio::task::spawn_blocking(move || {
                let r = inner2.start_blocking(&pod, ip);
                (pod, r)
            })
            .await?;
            let mut dns = None;
            let started = match setup {
                Ok(p) => {
                    place = p;
                    let served = match inner.dns_store.get().filter(|_| is_dns_pod(&pod)) {
                        Some(store) => serve_dns_in(store.clone(), &place)
                            .await
                            .map(|h| dns = Some(h)),
                        None => Ok(()),
                    };
                    served.and_then(|()| {
                        inner.workload(&pod, &place).and_then(|spec| {
                            process::spawn(spec).context("starting the workload process")
                        })
                    })
                }
                Err(e) => Err(e),
            };
            let mut child = match started {
                Ok(c) => c,
                Err(e) => {
                    // Leave nothing half-made behind; the kubelet retries.
                    if let Some(entry) = inner
                        .pods
                        .lock()
                        .expect("pods lock")
                        .get_mut(&(key.namespace.clone(), key.name.clone()))
                    {
                        entry.place = place.clone();
                    }
                    let inner2 = inner.clone();
                    let k2 = key.clone();
                    let _ = tokio::task::spawn_blocking(move || inner2.stop_blocking(&k2)).await;
                    return Err(e.context(format!(
                        "starting pod {}/{} on {}",
                        key.namespace, key.name, pod.node
                    )));
                }
            };
            place.pid = Some(child.pid);
            running.store(true, Ordering::SeqCst);
            if let Some(entry) = inner
                .pods
                .lock()
                .expect("pods lock")
                .get_mut(&(key.namespace.clone(), key.name.clone()))
            {
                entry.place = place.clone();
                entry.dns = dns;
            }
            let flag = running.clone();
            let what = format!("{}/{}", key.namespace, key.name);
            tokio::spawn(async move {
                let status = child.wait().await;
                *exit_code.lock().expect("exit code lock") = status.code();
                flag.store(false, Ordering::SeqCst);
                tracing::info!(pod = %what, %status, "workload process exited");
            });
            tracing::info!(pod = %format!("{}/{}", key.namespace, key.name), node = %pod.node, %ip, "pod started");
            Ok(StartedPod {
                pod_ip: ip,
                host_ip,
            })
        }
        .boxed()
    }

    fn stop(&self, key: PodKey) -> BoxFuture<'static, anyhow::Result<()>> {
        let inner = self.inner.clone();
        async move { tokio::task::spawn_blocking(move || inner.stop_blocking(&key)).await? }.boxed()
    }

    fn probe(&self, key: PodKey, probe: Probe) -> BoxFuture<'static, bool> {
        let inner = self.inner.clone();
        async move {
            let place = inner
                .pods
                .lock()
                .expect("pods lock")
                .get(&(key.namespace.clone(), key.name.clone()))
                .map(|e| e.place.clone());
            let Some(place) = place else { return false };
            let node_netns = inner.spec.node_netns(&place.node);
            tokio::task::spawn_blocking(move || probe_from(&node_netns, place.ip, probe))
                .await
                .unwrap_or(false)
        }
        .boxed()
    }

    fn running(&self, key: &PodKey) -> bool {
        self.inner
            .pods
            .lock()
            .expect("pods lock")
            .get(&(key.namespace.clone(), key.name.clone()))
            .is_some_and(|e| e.running.load(Ordering::SeqCst))
    }

    fn exit_code(&self, key: &PodKey) -> Option<i32> {
        let pods = self.inner.pods.lock().expect("pods lock");
        let e = pods.get(&(key.namespace.clone(), key.name.clone()))?;
        *e.exit_code.lock().expect("exit code lock")
    }

    fn release(&self, key: &PodKey) {
        // The pod is deleted: its logs go with it (kept across container restarts until then).
        let dir = pod_logs::pod_dir(&self.inner.logs_dir, &key.namespace, &key.name, &key.uid);
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl LogSource for NetnsRuntime {
    fn container_log(
        &self,
        namespace: &str,
        pod: &str,
        uid: &str,
        container: &str,
    ) -> Option<PathBuf> {
        let dir = pod_logs::pod_dir(&self.inner.logs_dir, namespace, pod, uid);
        Some(pod_logs::container_file(&dir, container))
    }
}
