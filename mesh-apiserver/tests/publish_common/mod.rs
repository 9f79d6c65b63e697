//! Harness shared by the publisher's tests: an in-process lab Kubernetes API driven by the
//! real kubectl, a real etcd, publishers as tasks, and etcd waits driven by etcd watches.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, WatchOptions};
use mesh_apiserver::leader::IsLeader;
use mesh_apiserver::publisher::{Publisher, PublisherConfig, PublisherMetrics};
use mesh_core::{ClusterConfig, ClusterId, ClusterName};
use mesh_lab::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle};
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb;
use prost::Message;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const CLUSTER: &str = "east";
pub const CLUSTER_ID: u32 = 7;
pub const PREFIX: &str = "mesh/v1/";

static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Log output of this test binary, captured (every test of the binary writes here).
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        // Shown by the test harness for failing tests only.
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a capturing log subscriber once (`RUST_LOG` selects what is shown).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mesh_apiserver=info,warn".into()),
        )
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

pub struct Lab {
    pub api: KubeApiHandle,
    dir: TempDir,
    cache: TempDir,
}

impl Lab {
    pub async fn start() -> Lab {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = tempfile::tempdir().expect("kubectl cache dir");
        let mut config = KubeApiConfig::new(dir.path().join("api"), CLUSTER);
        config.context = format!("lab-{CLUSTER}");
        let api = KubeApi::start(config)
            .await
            .expect("starting the lab Kubernetes API");
        Lab { api, dir, cache }
    }

    /// Runs the real kubectl against the lab, asserts success, returns stdout.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.api.kubeconfig_path())
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawning kubectl");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = child.wait_with_output().await.expect("waiting for kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn apply(&self, manifest: &serde_json::Value) -> String {
        self.kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()))
            .await
    }

    /// Sets an object's status through the status subresource, as a kubelet would.
    pub async fn set_status(
        &self,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        status: serde_json::Value,
    ) {
        let patch = serde_json::json!({ "status": status }).to_string();
        let mut args = vec![
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.kubectl(&args, None).await;
    }

    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.api.kubeconfig_path())
            .expect("reading kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube config");
        kube::Client::try_from(config).expect("kube client")
    }

    // --- fixtures ---

    pub async fn namespace(&self, name: &str) {
        self.apply(&serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
            .await;
    }

    pub async fn node(&self, name: &str, ip: &str, cidr: &str) {
        self.apply(&serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}
        }))
        .await;
        self.set_status(
            "node",
            None,
            name,
            serde_json::json!({"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}),
        )
        .await;
    }

    pub async fn global_service(&self, ns: &str, name: &str, extra_annotations: serde_json::Value) {
        let mut annotations = serde_json::json!({"service.cilium.io/global": "true"});
        annotations
            .as_object_mut()
            .unwrap()
            .extend(extra_annotations.as_object().cloned().unwrap_or_default());
        self.apply(&serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "annotations": annotations},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .await;
    }

    /// A running pod with an IP on `node` (created with kubectl, status set as a kubelet would).
    pub async fn pod(&self, ns: &str, name: &str, app: &str, ip: &str, node: &str, host_ip: &str) {
        self.apply(&serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox:1"}]}
        }))
        .await;
        self.set_status(
            "pod",
            Some(ns),
            name,
            serde_json::json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip}),
        )
        .await;
    }

    /// Writes the EndpointSlice of a service (there is no slice controller in the lab yet).
    pub async fn slice(&self, ns: &str, service: &str, ips: &[&str], node: &str) {
        let endpoints: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node, "zone": "z1"}))
            .collect();
        let manifest = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": format!("{service}-slice"),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        });
        let name = format!("{service}-slice");
        let exists = self
            .kubectl(
                &[
                    "get",
                    "endpointslice",
                    &name,
                    "-n",
                    ns,
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
                None,
            )
            .await;
        if exists.trim().is_empty() {
            self.apply(&manifest).await;
        } else {
            // A merge patch replaces the endpoint list as a whole.
            let patch = serde_json::json!({"endpoints": manifest["endpoints"]}).to_string();
            self.kubectl(
                &[
                    "patch",
                    "endpointslice",
                    &name,
                    "-n",
                    ns,
                    "--type=merge",
                    "-p",
                    &patch,
                ],
                None,
            )
            .await;
        }
    }
}

pub fn cluster_config() -> ClusterConfig {
    ClusterConfig {
        name: ClusterName::new(CLUSTER).unwrap(),
        id: ClusterId::new(CLUSTER_ID).unwrap(),
        pod_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
        service_cidr: Some("10.96.0.0/16".parse().unwrap()),
        capabilities: vec![],
        version: "test".into(),
    }
}

pub fn publisher_config(holder: &str, grace: Duration) -> PublisherConfig {
    let mut cfg = PublisherConfig::new(cluster_config());
    cfg.prefix = PREFIX.into();
    cfg.identity_gc_grace = grace;
    cfg.lease_ttl = Duration::from_secs(2);
    cfg.holder = holder.into();
    cfg
}

/// A publisher running as a task; aborting the task is an abrupt stop.
pub struct Running {
    pub task: JoinHandle<()>,
    pub shutdown: CancellationToken,
    pub is_leader: IsLeader,
    pub metrics: Arc<PublisherMetrics>,
}

impl Running {
    pub fn start(etcd: &Client, kube: kube::Client, cfg: PublisherConfig) -> Running {
        let mut registry = prometheus_client::registry::Registry::default();
        let publisher = Publisher::new(cfg, &mut registry);
        let is_leader = publisher.is_leader();
        let metrics = publisher.metrics();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let etcd = etcd.clone();
            let shutdown = shutdown.clone();
            async move {
                publisher
                    .run(etcd, kube, shutdown)
                    .await
                    .expect("publisher failed");
            }
        });
        Running {
            task,
            shutdown,
            is_leader,
            metrics,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

pub async fn connect(etcd: &mesh_testkit::etcd::Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connecting to etcd")
}

pub async fn list(client: &Client, prefix: &str) -> (BTreeMap<String, Vec<u8>>, i64) {
    let resp = client
        .clone()
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("listing etcd");
    let rev = resp.header().unwrap().revision();
    (
        resp.kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec()))
            .collect(),
        rev,
    )
}

/// Waits until the keys under `prefix` satisfy `pred`, re-checking on every etcd change (an
/// etcd watch, not a poll). Panics with `what` and the last state at the deadline.
pub async fn wait_until(
    client: &Client,
    prefix: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&State) -> bool,
) -> State {
    let deadline = Instant::now() + timeout;
    loop {
        let (kvs, rev) = list(client, prefix).await;
        let state = State::new(kvs);
        if pred(&state) {
            return state;
        }
        let mut watch = client
            .clone()
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            )
            .await
            .expect("watching etcd");
        loop {
            match tokio::time::timeout_at(deadline, watch.message()).await {
                Err(_) => panic!(
                    "timed out waiting for {what}; etcd holds:\n{}",
                    state.describe()
                ),
                Ok(Ok(Some(m))) if !m.events().is_empty() => break,
                Ok(Ok(Some(_))) => continue,
                Ok(other) => panic!("etcd watch ended: {other:?}"),
            }
        }
    }
}

/// Waits for a condition outside etcd (e.g. a Kubernetes Event), retrying until a deadline.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cluster's keys in etcd, decoded.
#[derive(Debug, Clone)]
pub struct State {
    pub raw: BTreeMap<String, Vec<u8>>,
    keys: Keys,
}

impl State {
    pub fn new(raw: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            raw,
            keys: Keys::new(PREFIX),
        }
    }

    pub fn describe(&self) -> String {
        self.raw
            .iter()
            .map(|(k, v)| match self.keys.parse(k) {
                Some(ClusterKey::Object { kind, .. }) => {
                    format!("  {k} = {}", describe_value(kind, v))
                }
                _ => format!("  {k} ({} bytes)", v.len()),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn names(&self, kind: pb::Kind) -> Vec<String> {
        self.raw
            .keys()
            .filter_map(|k| match self.keys.parse(k) {
                Some(ClusterKey::Object {
                    kind: k2,
                    name,
                    cluster,
                }) if k2 == kind && cluster == CLUSTER => Some(name),
                _ => None,
            })
            .collect()
    }

    pub fn service(&self, ns: &str, name: &str) -> Option<pb::GlobalService> {
        let v = self.raw.get(&self.keys.object(
            CLUSTER,
            pb::Kind::Service,
            &format!("{ns}/{name}"),
        ))?;
        Some(pb::GlobalService::decode(v.as_slice()).expect("service value"))
    }

    /// The published global services, `ns/name`.
    pub fn services(&self) -> Vec<String> {
        self.names(pb::Kind::Service)
            .into_iter()
            .filter(|n| {
                let (ns, name) = n.split_once('/').expect("ns/name");
                self.service(ns, name).is_some_and(|s| !s.local_only)
            })
            .collect()
    }

    /// The published non-global (local-only) services, `ns/name`: every Service with a
    /// ClusterIP, for the cluster's own agents (the lab API's `default/kubernetes` too).
    pub fn local_services(&self) -> Vec<String> {
        self.names(pb::Kind::Service)
            .into_iter()
            .filter(|n| {
                let (ns, name) = n.split_once('/').expect("ns/name");
                self.service(ns, name).is_some_and(|s| s.local_only)
            })
            .collect()
    }

    pub fn endpoint(&self, ip: &str) -> Option<pb::Endpoint> {
        let v = self
            .raw
            .get(&self.keys.object(CLUSTER, pb::Kind::Endpoint, ip))?;
        Some(pb::Endpoint::decode(v.as_slice()).expect("endpoint value"))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.names(pb::Kind::Endpoint)
    }

    pub fn identities(&self) -> BTreeMap<u32, pb::Identity> {
        self.names(pb::Kind::Identity)
            .into_iter()
            .map(|n| {
                let v = &self.raw[&self.keys.object(CLUSTER, pb::Kind::Identity, &n)];
                (
                    n.parse().unwrap(),
                    pb::Identity::decode(v.as_slice()).expect("identity value"),
                )
            })
            .collect()
    }

    pub fn node(&self, name: &str) -> Option<pb::Node> {
        let v = self
            .raw
            .get(&self.keys.object(CLUSTER, pb::Kind::Node, name))?;
        Some(pb::Node::decode(v.as_slice()).expect("node value"))
    }

    pub fn config(&self) -> Option<pb::ClusterConfig> {
        let v = self
            .raw
            .get(&self.keys.object(CLUSTER, pb::Kind::Config, ""))?;
        Some(pb::ClusterConfig::decode(v.as_slice()).expect("config value"))
    }

    /// Every kind the cluster publishes, policies included (the lab API serves no policy
    /// types yet: that must not hold the marker back).
    pub fn all_synced(&self) -> bool {
        mesh_proto::keys::PUBLISHED_KINDS
            .iter()
            .all(|k| self.raw.contains_key(&self.keys.synced(CLUSTER, *k)))
    }

    pub fn backend_ips(&self, ns: &str, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .service(ns, name)
            .map(|s| s.backends.into_iter().map(|b| b.ip).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn describe_value(kind: pb::Kind, v: &[u8]) -> String {
    match kind {
        pb::Kind::Service => format!("{:?}", pb::GlobalService::decode(v)),
        pb::Kind::Endpoint => format!("{:?}", pb::Endpoint::decode(v)),
        pb::Kind::Identity => format!("{:?}", pb::Identity::decode(v)),
        pb::Kind::Node => format!("{:?}", pb::Node::decode(v)),
        pb::Kind::Config => format!("{:?}", pb::ClusterConfig::decode(v)),
        pb::Kind::Policy => format!("{:?}", pb::Policy::decode(v)),
        pb::Kind::Link => format!("{:?}", pb::PeerLink::decode(v)),
        pb::Kind::Unspecified => format!("{} bytes", v.len()),
    }
}
