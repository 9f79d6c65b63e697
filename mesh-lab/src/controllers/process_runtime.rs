//! A [`PodRuntime`] without namespaces or root: each pod is one local child process of the
//! built-in workload (`mesh-lab workload`), listening on the pod's own loopback address
//! `127.<x>.<y>.<z>` (all of 127/8 reaches `lo` on Linux, so nothing has to be configured).
//!
//! One process serves every container port of the pod; `args` of the first container that has
//! some become the workload's reply. `command` and images are ignored. Used by the tests and
//! by anyone running the controllers without the lab's netns runtime.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::kubelet::{PodKey, PodRuntime, PodSandboxSpec, Probe, StartedPod};
use crate::kube_api::LogSource;
use crate::pod_logs;

struct Running {
    child: Child,
    ip: Ipv4Addr,
    exit: Option<i32>,
}

#[derive(Default)]
struct State {
    pods: HashMap<PodKey, Running>,
    /// Addresses handed out, by pod (an address stays with its pod across restarts).
    ips: HashMap<PodKey, Ipv4Addr>,
    next: u32,
}

/// Pods as local processes on loopback addresses of one /16 of 127/8.
pub struct ProcessRuntime {
    binary: PathBuf,
    /// Pod addresses are `127.<net>.<y>.<z>`.
    net: u8,
    state: Arc<Mutex<State>>,
    /// Container logs: `<log_root>/<ns>_<pod>_<uid>/<container>.log` ([`crate::pod_logs`]).
    log_root: PathBuf,
    /// Whether `log_root` is ours to remove on drop.
    owns_log_root: bool,
}

impl ProcessRuntime {
    /// `binary` is the `mesh-lab` executable; pod addresses come from `127.<net>.0.0/16`
    /// (pick different `net`s for runtimes that run side by side).
    ///
    /// Container logs go to a fresh directory under the system temp dir, removed when the
    /// runtime is dropped ([`with_log_root`](Self::with_log_root) to choose one).
    pub fn new(binary: impl Into<PathBuf>, net: u8) -> Self {
        ProcessRuntime {
            binary: binary.into(),
            net,
            state: Arc::default(),
            log_root: std::env::temp_dir().join(format!(
                "mesh-lab-pod-logs-{}-{}",
                std::process::id(),
                crate::kube_api::util::random_hex(6)
            )),
            owns_log_root: true,
        }
    }

    /// Container logs under `dir` (kept when the runtime is dropped).
    pub fn with_log_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.log_root = dir.into();
        self.owns_log_root = false;
        self
    }

    fn pod_log_dir(&self, namespace: &str, pod: &str, uid: &str) -> PathBuf {
        pod_logs::pod_dir(&self.log_root, namespace, pod, uid)
    }

    /// A runtime on a random /16 of 127/8 (not 127.0/16), for tests running in parallel.
    pub fn with_random_net(binary: impl Into<PathBuf>) -> Self {
        Self::new(binary, rand::random_range(1..=254))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn address_for(&self, key: &PodKey) -> anyhow::Result<Ipv4Addr> {
        let mut st = self.lock();
        if let Some(ip) = st.ips.get(key) {
            return Ok(*ip);
        }
        // .0.0, .x.0 and .x.255 are skipped to keep addresses unsurprising.
        for _ in 0..65536 {
            st.next = st.next.wrapping_add(1) % 65536;
            let (y, z) = ((st.next >> 8) as u8, st.next as u8);
            if z == 0 || z == 255 {
                continue;
            }
            let ip = Ipv4Addr::new(127, self.net, y, z);
            if !st.ips.values().any(|i| *i == ip) {
                st.ips.insert(key.clone(), ip);
                return Ok(ip);
            }
        }
        anyhow::bail!("no free address left in 127.{}.0.0/16", self.net)
    }

    /// Kills a pod's process as a crash would (not through `stop`): the kubelet sees it exit.
    pub fn kill(&self, key: &PodKey) -> bool {
        let mut st = self.lock();
        match st.pods.get_mut(key) {
            Some(r) => r.child.start_kill().is_ok(),
            None => false,
        }
    }

    /// The pod's address, while it has one.
    pub fn pod_ip(&self, key: &PodKey) -> Option<Ipv4Addr> {
        self.lock().pods.get(key).map(|r| r.ip)
    }
}

impl PodRuntime for ProcessRuntime {
    fn start(&self, pod: PodSandboxSpec) -> BoxFuture<'static, anyhow::Result<StartedPod>> {
        let ip = self.address_for(&pod.key);
        let binary = self.binary.clone();
        let state = self.state.clone();
        let log_dir = self.pod_log_dir(&pod.key.namespace, &pod.key.name, &pod.key.uid);
        async move {
            let ip = ip?;
            let mut listen: Vec<String> = pod
                .containers
                .iter()
                .flat_map(|c| c.ports.iter())
                .filter(|(_, _, proto)| proto == "TCP")
                .map(|(_, port, _)| SocketAddr::from((ip, *port)).to_string())
                .collect();
            listen.sort();
            listen.dedup();
            if listen.is_empty() {
                listen.push(SocketAddr::from((ip, 80)).to_string());
            }
            let mut cmd = Command::new(&binary);
            cmd.arg("workload").arg("--log-dir").arg(&log_dir);
            for l in &listen {
                cmd.arg("--listen").arg(l);
            }
            for c in &pod.containers {
                cmd.arg("--container").arg(pod_logs::container_arg(&c.name, &c.tcp_ports()));
            }
            if let Some(c) = pod.containers.iter().find(|c| !c.args.is_empty()) {
                cmd.arg("--").args(&c.args);
            }
            // An inherited reply would leak into every pod.
            cmd.env_remove("MESH_LAB_REPLY");
            // Env of every container, the first container's value winning.
            let mut seen = std::collections::HashSet::new();
            for c in &pod.containers {
                for (k, v) in &c.env {
                    if seen.insert(k.clone()) {
                        cmd.env(k, v);
                    }
                }
            }
            cmd.env("MESH_LAB_POD_IP", ip.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let child = cmd
                .spawn()
                .with_context(|| format!("spawning {} workload for pod {}/{}", binary.display(), pod.key.namespace, pod.key.name))?;
            tracing::debug!(pod = %pod.key.name, %ip, ?listen, pid = child.id(), "workload process started");
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut old) = st.pods.insert(pod.key.clone(), Running { child, ip, exit: None }) {
                let _ = old.child.start_kill();
            }
            Ok(StartedPod {
                pod_ip: ip,
                host_ip: Ipv4Addr::LOCALHOST,
            })
        }
        .boxed()
    }

    fn stop(&self, key: PodKey) -> BoxFuture<'static, anyhow::Result<()>> {
        let running = self.lock().pods.remove(&key);
        async move {
            if let Some(mut r) = running {
                let _ = r.child.start_kill();
                r.child
                    .wait()
                    .await
                    .with_context(|| format!("waiting for pod {}/{}", key.namespace, key.name))?;
            }
            Ok(())
        }
        .boxed()
    }

    fn probe(&self, key: PodKey, probe: Probe) -> BoxFuture<'static, bool> {
        let ip = self.lock().pods.get(&key).map(|r| r.ip);
        async move {
            let Some(ip) = ip else { return false };
            match probe {
                Probe::Tcp { port } => TcpStream::connect((ip, port)).await.is_ok(),
                Probe::Http { port, path } => http_probe(SocketAddr::from((ip, port)), &path)
                    .await
                    .unwrap_or(false),
            }
        }
        .boxed()
    }

    fn running(&self, key: &PodKey) -> bool {
        let mut st = self.lock();
        let Some(r) = st.pods.get_mut(key) else {
            return false;
        };
        match r.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                r.exit = Some(status.code().unwrap_or(128 + 9));
                false
            }
            Err(_) => false,
        }
    }

    fn exit_code(&self, key: &PodKey) -> Option<i32> {
        self.lock().pods.get(key).and_then(|r| r.exit)
    }

    fn release(&self, key: &PodKey) {
        self.lock().ips.remove(key);
        // The pod is gone: so are its logs (kubelet removes a deleted pod's log directory).
        let _ = std::fs::remove_dir_all(self.pod_log_dir(&key.namespace, &key.name, &key.uid));
    }
}

impl LogSource for ProcessRuntime {
    fn container_log(
        &self,
        namespace: &str,
        pod: &str,
        uid: &str,
        container: &str,
    ) -> Option<PathBuf> {
        Some(pod_logs::container_file(
            &self.pod_log_dir(namespace, pod, uid),
            container,
        ))
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        if self.owns_log_root {
            let _ = std::fs::remove_dir_all(&self.log_root);
        }
    }
}

/// kubelet's rule: a status from 200 to 399 is a success.
async fn http_probe(addr: SocketAddr, path: &str) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((200..400).contains(&code))
}
