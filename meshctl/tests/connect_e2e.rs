//! Issue #4 end to end: two clusters, each a lab Kubernetes API, a real etcd and a real
//! mesh-apiserver *process* (this test binary re-executed as `mesh_apiserver::run`, exactly
//! what the binary's `main` does, so it can be killed with SIGKILL and restarted), and the
//! real `meshctl` binary for certificates, `connect --wait` and `status --wait`.
//!
//! Shown: a global service created with kubectl in alpha reaches beta's Status and an agent
//! watch of beta; alpha's apiserver killed: beta keeps alpha's data marked stale; changes
//! made in alpha's Kubernetes API while it is down reach beta after the restart through a
//! *resume* (no snapshot), deletions included, and beta converges to exactly alpha's state;
//! with alpha down again and a short `--peer-stale-ttl`, alpha's data leaves beta's etcd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_lab::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle};
use mesh_proto::client::{WatchOptions, WatchUpdate, connect_fn, spawn_watch};
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::{self, ClientEndpoint, ClientTls};
use serde_json::{Value, json};

/// Environment variable that turns this binary into a mesh-apiserver (JSON argv).
const CHILD_ENV: &str = "MESH_E2E_APISERVER_ARGV";
/// The longest any single expected state may take to appear.
const T: Duration = Duration::from_secs(60);

/// Not a test: the mesh-apiserver process of `Apiserver::spawn`, run from an ELF constructor
/// before libtest's `main` (returns at once in a test run, where `CHILD_ENV` is unset).
#[ctor::ctor(unsafe)]
fn apiserver_process() {
    let Ok(argv) = std::env::var(CHILD_ENV) else {
        return;
    };
    mesh_testkit::init_child_process();
    use clap::Parser;
    let argv: Vec<String> = serde_json::from_str(&argv).expect("argv JSON");
    let args = mesh_apiserver::Args::try_parse_from(argv).expect("mesh-apiserver flags");
    mesh_apiserver::init_tracing(&args.log);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(mesh_apiserver::run(args))
        .expect("mesh-apiserver failed");
    // Never fall through into the test harness.
    std::process::exit(0);
}

/// A mesh-apiserver process; killed (SIGKILL) on drop.
struct Apiserver {
    child: Child,
    log: PathBuf,
}

impl Apiserver {
    fn spawn(argv: &[String], log: PathBuf) -> Apiserver {
        let mut full = vec!["mesh-apiserver".to_owned()];
        full.extend(argv.iter().cloned());
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, serde_json::to_string(&full).unwrap())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawning the apiserver process");
        Apiserver { child, log }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One cluster: lab Kubernetes API, etcd, certificates, and its apiserver's fixed ports.
struct Cluster {
    name: &'static str,
    id: u32,
    pod_cidr: &'static str,
    dir: PathBuf,
    api: KubeApiHandle,
    etcd: mesh_testkit::etcd::Etcd,
    grpc: SocketAddr,
    metrics: SocketAddr,
    apiserver: Option<Apiserver>,
    starts: u32,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running a command")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn meshctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    c.env_remove("KUBECONFIG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    c
}

/// Runs meshctl off the async runtime; prints the command and what it printed (the
/// closing note of the issue lists them).
async fn meshctl_out(args: Vec<String>, env: Vec<(String, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let out = run(meshctl().args(&args).envs(env));
        println!(
            "$ meshctl {}\n{}{}[exit {}]",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code().unwrap_or(-1)
        );
        out
    })
    .await
    .unwrap()
}

impl Cluster {
    async fn new(root: &Path, name: &'static str, id: u32, pod_cidr: &'static str) -> Cluster {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = KubeApiConfig::new(dir.join("kube"), name);
        cfg.context = format!("ctx-{name}");
        let api = KubeApi::start(cfg).await.expect("lab Kubernetes API");
        let etcd = mesh_testkit::etcd::Etcd::start();
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let c = Cluster {
            name,
            id,
            pod_cidr,
            dir,
            api,
            etcd,
            grpc: port(mesh_testkit::free_port()),
            metrics: port(mesh_testkit::free_port()),
            apiserver: None,
            starts: 0,
        };
        c.certificates();
        c.setup_kube().await;
        c
    }

    fn path(&self, p: &str) -> String {
        self.dir.join(p).to_str().unwrap().to_owned()
    }

    /// CA, apiserver certificate, an operator certificate (`op/`: ca.crt, tls.crt, tls.key,
    /// the layout `connect --source-tls-dir` reads) and an agent certificate, all issued by
    /// the real meshctl.
    fn certificates(&self) {
        let ca = self.path("ca");
        ok(
            run(meshctl().args(["ca", "create", "--cluster", self.name, "--out-dir", &ca])),
            "meshctl ca create",
        );
        let issue = |extra: &[&str]| {
            let mut args = vec!["cert", "issue", "--ca-dir", &ca, "--cluster", self.name];
            args.extend_from_slice(extra);
            ok(run(meshctl().args(&args)), "meshctl cert issue");
        };
        let own = self.path("");
        let op = self.path("op");
        issue(&["--apiserver", "--ip", "127.0.0.1", "--out-dir", &own]);
        issue(&["--operator", "e2e", "--name", "tls", "--out-dir", &op]);
        issue(&["--agent", "node-1", "--out-dir", &own]);
        std::fs::copy(self.dir.join("ca/ca.crt"), self.dir.join("op/ca.crt")).unwrap();
    }

    async fn kubectl(&self, args: &[&str], stdin: Option<String>) -> String {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.api.kubeconfig_path())
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG");
        let what = format!("kubectl {args:?} ({})", self.name);
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("kubectl");
            let mut input = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                input.write_all(s.as_bytes()).unwrap();
            }
            drop(input);
            ok(child.wait_with_output().unwrap(), &what)
        })
        .await
        .unwrap()
    }

    async fn apply(&self, manifest: Value) {
        self.kubectl(&["apply", "-f", "-"], Some(manifest.to_string()))
            .await;
    }

    async fn set_status(&self, kind: &str, ns: Option<&str>, name: &str, status: Value) {
        let patch = json!({ "status": status }).to_string();
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

    /// What `meshctl connect` reads: namespace, the TLS Secret's ca.crt, the ConfigMap.
    async fn setup_kube(&self) {
        let ca = std::fs::read_to_string(self.dir.join("ca/ca.crt")).unwrap();
        self.apply(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh-system"}}),
        )
        .await;
        self.apply(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "mesh-apiserver-tls", "namespace": "mesh-system"},
            "stringData": {"ca.crt": ca}
        }))
        .await;
        self.apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mesh-config", "namespace": "mesh-system"},
            "data": {"MESH_CLUSTER_NAME": self.name, "MESH_CLUSTER_ID": self.id.to_string(),
                     "MESH_POD_CIDR": self.pod_cidr, "MESH_SERVICE_CIDR": "10.96.0.0/16"}
        }))
        .await;
    }

    fn argv(&self, stale_ttl: &str) -> Vec<String> {
        [
            "--cluster-name",
            self.name,
            "--cluster-id",
            &self.id.to_string(),
            "--pod-cidr",
            self.pod_cidr,
            "--etcd-endpoints",
            &self.etcd.endpoint(),
            "--listen",
            &self.grpc.to_string(),
            "--metrics-listen",
            &self.metrics.to_string(),
            "--kubeconfig",
            self.api.kubeconfig_path().to_str().unwrap(),
            "--tls-cert",
            &self.path("apiserver.crt"),
            "--tls-key",
            &self.path("apiserver.key"),
            "--tls-ca",
            &self.path("ca/ca.crt"),
            "--peers-secret",
            "mesh-system/mesh-peers",
            "--heartbeat-interval",
            "1s",
            "--peer-status-interval",
            "100ms",
            "--peer-stale-ttl",
            stale_ttl,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Starts the apiserver process and waits until it says it started (both listeners
    /// bound: a connect to the port alone could reach another process holding it). Its
    /// ports are fixed (`meshctl connect` writes them into the peers' Secrets before the
    /// first start); `free_port` picks them outside the kernel's ephemeral range, so no
    /// other process's connect() or bind to port 0 can take them meanwhile.
    async fn start(&mut self, stale_ttl: &str) {
        self.starts += 1;
        let log = self.dir.join(format!("apiserver-{}.log", self.starts));
        self.apiserver = Some(Apiserver::spawn(&self.argv(stale_ttl), log));
        let deadline = Instant::now() + T;
        loop {
            let a = self.apiserver.as_mut().unwrap();
            let text = std::fs::read_to_string(&a.log).unwrap_or_default();
            if text.contains("mesh-apiserver started") {
                return;
            }
            if let Some(status) = a.child.try_wait().unwrap() {
                // The error is logged before the panic's backtrace: show the start.
                let head: Vec<&str> = text.lines().take(30).collect();
                panic!(
                    "apiserver {} exited ({status}) before it started on {}:\n{}",
                    self.name,
                    self.grpc,
                    head.join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "apiserver {} did not start on {}:\n{}",
                self.name,
                self.grpc,
                a.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the apiserver process still runs, or how it ended (a signal says who
    /// stopped it when its log says nothing).
    fn process_state(&mut self) -> String {
        match self.apiserver.as_mut().map(|a| a.child.try_wait()) {
            None => "not started".to_owned(),
            Some(Ok(None)) => "running".to_owned(),
            Some(Ok(Some(status))) => format!("exited: {status}"),
            Some(Err(e)) => format!("unknown: {e}"),
        }
    }

    fn kill(&mut self) {
        if let Some(mut a) = self.apiserver.take() {
            a.kill();
        }
    }

    fn log_tail(&self) -> String {
        self.apiserver
            .as_ref()
            .map(Apiserver::log_tail)
            .unwrap_or_default()
    }

    /// The whole log of the running apiserver process.
    fn log_tail_all(&self) -> String {
        self.apiserver
            .as_ref()
            .map(|a| std::fs::read_to_string(&a.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// `--tls-*` flags of meshctl for this cluster's apiserver with the operator cert.
    fn conn_flags(&self) -> Vec<String> {
        vec![
            "--server".into(),
            self.grpc.to_string(),
            "--tls-ca".into(),
            self.path("op/ca.crt"),
            "--tls-cert".into(),
            self.path("op/tls.crt"),
            "--tls-key".into(),
            self.path("op/tls.key"),
            "--cluster".into(),
            self.name.into(),
        ]
    }

    /// `meshctl status -o json` of this cluster (quietly: polled).
    async fn status(&self) -> Value {
        let mut args = vec!["status".to_owned(), "-o".into(), "json".into()];
        args.extend(self.conn_flags());
        let out = tokio::task::spawn_blocking(move || run(meshctl().args(&args)))
            .await
            .unwrap();
        let text = ok(out, "meshctl status -o json");
        serde_json::from_str(&text).expect("status JSON")
    }

    /// Polls this cluster's status until `f` holds; panics with the last status.
    async fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let s = self.status().await;
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} never happened; last status:\n{s:#}\nlog:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn metrics_text(&self) -> String {
        let addr = self.metrics;
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap()
    }

    async fn etcd(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.etcd.endpoint()], None)
            .await
            .expect("etcd client")
    }

    fn agent_endpoint(&self) -> ClientEndpoint {
        let tls = ClientTls::from_files(
            &self.dir.join("ca/ca.crt"),
            &self.dir.join("agent-node-1.crt"),
            &self.dir.join("agent-node-1.key"),
            Some(self.name.parse().unwrap()),
        )
        .expect("agent TLS");
        ClientEndpoint::new(self.grpc.to_string(), tls)
    }
}

/// The objects (not synced markers) of cluster `of` in `etcd`: key suffix -> value bytes.
async fn objects_of(
    etcd: &mut etcd_client::Client,
    of: &str,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let keys = Keys::default();
    let resp = etcd
        .get(
            keys.cluster_prefix(of),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("etcd get");
    resp.kvs()
        .iter()
        .filter_map(|kv| {
            let key = kv.key_str().ok()?;
            // The peer's objects; not the importer's own link record (stale demotion), and
            // not the Services a cluster publishes for its own agents only (local-only: never
            // exported to peers).
            let local_only = || {
                <mesh_proto::pb::GlobalService as prost::Message>::decode(kv.value())
                    .is_ok_and(|s| s.local_only)
            };
            match keys.parse(key) {
                Some(ClusterKey::Object {
                    kind: Kind::Link, ..
                }) => None,
                Some(ClusterKey::Object {
                    kind: Kind::Service,
                    ..
                }) if local_only() => None,
                Some(ClusterKey::Object { .. }) => Some((key.to_owned(), kv.value().to_vec())),
                _ => None,
            }
        })
        .collect()
}

fn peer<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

fn cluster_count(status: &Value, cluster: &str, kind: &str) -> Option<u64> {
    status["clusters"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == cluster)?["counts"][kind]
        .as_u64()
}

/// A's workload: namespace, node, global services `web` (2 backends) and `api` (1).
async fn workload(a: &Cluster) {
    a.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .await;
    a.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"podCIDR": "10.1.1.0/24", "podCIDRs": ["10.1.1.0/24"]}
    }))
    .await;
    a.set_status(
        "node",
        None,
        "n1",
        json!({"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}]}),
    )
    .await;
    for (svc, pods) in [
        ("web", &["10.1.1.11", "10.1.1.12"][..]),
        ("api", &["10.1.1.21"][..]),
    ] {
        a.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": svc,
                         "annotations": {"service.cilium.io/global": "true"}},
            "spec": {"selector": {"app": svc},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .await;
        for (i, ip) in pods.iter().enumerate() {
            let pod = format!("{svc}-{i}");
            a.apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": "shop", "name": pod, "labels": {"app": svc}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox:1"}]}
            }))
            .await;
            a.set_status(
                "pod",
                Some("shop"),
                &pod,
                json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.1.1"}),
            )
            .await;
        }
        slice(a, svc, pods).await;
    }
}

async fn slice(a: &Cluster, svc: &str, ips: &[&str]) {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}))
        .collect();
    a.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": format!("{svc}-slice"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .await;
}

/// Waits until beta's etcd holds exactly alpha's objects (the relay is value for value).
async fn converged(a: &Cluster, b: &Cluster) {
    let (mut ea, mut eb) = (a.etcd().await, b.etcd().await);
    let deadline = Instant::now() + T;
    loop {
        let (want, got) = (
            objects_of(&mut ea, a.name).await,
            objects_of(&mut eb, a.name).await,
        );
        if want == got {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "beta never converged to alpha's state:\nalpha: {:?}\nbeta: {:?}\nbeta's log:\n{}",
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_restart_resume_and_withdraw() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Cluster::new(root.path(), "alpha", 1, "10.1.0.0/16").await;
    let mut b = Cluster::new(root.path(), "beta", 2, "10.2.0.0/16").await;
    let kubeconfig = format!(
        "{}:{}",
        a.api.kubeconfig_path().display(),
        b.api.kubeconfig_path().display()
    );
    let (a_grpc, b_grpc) = (a.grpc.to_string(), b.grpc.to_string());
    let connect = |extra: &[String]| {
        let mut args: Vec<String> = [
            "connect",
            "--context",
            "ctx-alpha",
            "--destination-context",
            "ctx-beta",
            "--peers-secret",
            "mesh-system/mesh-peers",
            "--source-endpoint",
            &a_grpc,
            "--destination-endpoint",
            &b_grpc,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        args
    };
    let env = vec![("KUBECONFIG".to_owned(), kubeconfig.clone())];

    // --wait without a way to read the destination's Status is refused before any write.
    let out = meshctl_out(
        connect(&["--wait".into(), "--source-tls-dir".into(), a.path("op")]),
        env.clone(),
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--wait needs --destination-tls-dir") && err.contains("nothing was written"),
        "{err}"
    );
    let secret = a
        .kubectl(
            &[
                "get",
                "secret",
                "mesh-peers",
                "-n",
                "mesh-system",
                "--ignore-not-found",
                "-o",
                "name",
            ],
            None,
        )
        .await;
    assert!(secret.trim().is_empty(), "nothing may be written: {secret}");

    let tls_flags = vec![
        "--wait".to_owned(),
        "--source-tls-dir".into(),
        a.path("op"),
        "--destination-tls-dir".into(),
        b.path("op"),
    ];
    // No apiserver runs yet: --wait times out, says what is missing and why, exits non-zero.
    let mut flags = tls_flags.clone();
    flags.extend(["--timeout".into(), "1s".into()]);
    let out = meshctl_out(connect(&flags), env.clone()).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out after 1s")
            && err.contains(&format!("alpha: cannot reach its apiserver at {}", a.grpc))
            && err.contains(&format!("beta: cannot reach its apiserver at {}", b.grpc)),
        "{err}"
    );

    workload(&a).await;
    a.start("10m").await;
    b.start("10m").await;

    // connect --wait: both sides connected and synced, with progress on the way.
    let mut flags = tls_flags.clone();
    flags.extend(["--timeout".into(), "60s".into()]);
    let out = meshctl_out(connect(&flags), env.clone()).await;
    // On failure, both apiservers' logs and whether they still run (it failed in CI with
    // alpha's apiserver started, then gone without a word in its log: SIGPIPE, see
    // `mesh_testkit::init_child_process`).
    let what = format!(
        "meshctl connect --wait (alpha: {}, beta: {})\n--- alpha's log:\n{}\n--- beta's log:\n{}",
        a.process_state(),
        b.process_state(),
        a.log_tail(),
        b.log_tail()
    );
    let stdout = ok(out, &what);
    assert!(
        stdout.contains("connected cluster alpha (id 1")
            && stdout.contains("alpha sees beta connected and synced")
            && stdout.contains("beta sees alpha connected and synced"),
        "{stdout}"
    );

    // The global services of alpha are in beta's Status ...
    let s = b
        .wait_status("alpha's two services imported", |s| {
            cluster_count(s, "alpha", "services") == Some(2)
        })
        .await;
    let p = peer(&s, "alpha").expect("peer alpha");
    assert_eq!(
        (p["connected"].as_bool(), p["synced"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(p["snapshots"].as_u64(), Some(1), "{p}");
    // ... and in the watch of an agent of beta.
    let ep = b.agent_endpoint();
    let mut watch = spawn_watch(
        connect_fn(move || {
            let ep = ep.clone();
            async move { tls::connect(&ep).await }
        }),
        pb::WatchRequest {
            clusters: vec!["alpha".into()],
            kinds: vec![pb::Kind::Service as i32],
            ..Default::default()
        },
        WatchOptions::default(),
    );
    let web = tokio::time::timeout(T, async {
        loop {
            if let Some(WatchUpdate::Upsert {
                value: pb::event::Value::Service(s),
                ..
            }) = watch.recv().await
                && s.name == "web"
                && s.backends.len() == 2
            {
                return s;
            }
        }
    })
    .await
    .expect("alpha's web service in beta's watch");
    assert_eq!(web.cluster, "alpha");

    // meshctl status --wait against beta returns success.
    let mut args = vec![
        "status".to_owned(),
        "--wait".into(),
        "--timeout".into(),
        "60s".into(),
    ];
    args.extend(b.conn_flags());
    let out = meshctl_out(args, vec![]).await;
    let table = ok(out, "meshctl status --wait");
    assert!(
        table.contains("SNAPSHOTS") && table.contains("alpha"),
        "{table}"
    );
    converged(&a, &b).await;

    // beta's importer has persisted the revision it resumes from (its watch client moves
    // the resume point once the snapshot is complete, at the next message after Synced).
    b.wait_status("a resume revision persisted for alpha", |s| {
        peer(s, "alpha").is_some_and(|p| p["revision"].as_i64() > Some(0))
    })
    .await;

    // alpha's apiserver killed: beta keeps alpha's data, marked stale.
    let mut eb = b.etcd().await;
    let before = objects_of(&mut eb, "alpha").await;
    a.kill();
    let s = b
        .wait_status("alpha marked stale", |s| {
            peer(s, "alpha").is_some_and(|p| {
                p["connected"] == false && p["stale_for_seconds"].as_u64().is_some()
            })
        })
        .await;
    assert_eq!(cluster_count(&s, "alpha", "services"), Some(2), "{s:#}");
    assert_eq!(
        objects_of(&mut eb, "alpha").await,
        before,
        "kept while stale"
    );
    let link = Keys::default().object("alpha", Kind::Link, "");
    assert_eq!(
        eb.get(link.clone(), None).await.expect("etcd get").count(),
        1,
        "{link} tells beta's agents that alpha is stale"
    );

    // While alpha is down: api deleted, web loses a backend (its publisher sees it only
    // after the restart).
    a.kubectl(&["delete", "service", "api", "-n", "shop"], None)
        .await;
    a.kubectl(
        &["delete", "endpointslice", "api-slice", "-n", "shop"],
        None,
    )
    .await;
    a.kubectl(&["delete", "pod", "web-1", "-n", "shop"], None)
        .await;
    slice(&a, "web", &["10.1.1.11"]).await;

    // The dead apiserver's leader lease expires (etcd deletes the key), so alpha's etcd
    // moves past every revision beta heard of: the restarted index's history begins after
    // beta's resume revision, and only etcd's own history can serve that resume.
    let mut ea = a.etcd().await;
    let deadline = Instant::now() + T;
    while !ea
        .get(Keys::default().leader(), None)
        .await
        .expect("etcd get")
        .kvs()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "alpha's leader lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // alpha restarted: beta resumes (no snapshot) and converges, deletions included.
    a.start("10m").await;
    let s = b
        .wait_status("alpha reconnected and synced", |s| {
            peer(s, "alpha").is_some_and(|p| {
                p["connected"] == true && p["synced"] == true && p["resumes"].as_u64() >= Some(1)
            }) && cluster_count(s, "alpha", "services") == Some(1)
        })
        .await;
    converged(&a, &b).await;
    let p = peer(&s, "alpha").unwrap();
    assert_eq!(
        p["snapshots"].as_u64(),
        Some(1),
        "beta must resume from its revision, not take a fresh snapshot: {p}"
    );
    let metrics = b.metrics_text().await;
    assert!(
        metrics.contains(r#"mesh_apiserver_peer_snapshots_total{peer="alpha"} 1"#),
        "{metrics}"
    );
    // The restarted alpha served beta's resume from etcd's history: a resume, no reset.
    let metrics = a.metrics_text().await;
    assert!(
        !metrics.contains("mesh_apiserver_resets_total{"),
        "the restarted alpha reset a stream:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_apiserver_resumes_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        a.log_tail_all().contains("resuming from etcd's history"),
        "{}",
        a.log_tail()
    );
    let after = objects_of(&mut eb, "alpha").await;
    assert!(
        !after.keys().any(|k| k.ends_with("/services/shop/api")),
        "api was deleted while alpha was down: {:?}",
        after.keys()
    );
    // The agent watch saw the same, without a reset.
    let web = tokio::time::timeout(T, async {
        loop {
            match watch.recv().await {
                Some(WatchUpdate::Upsert {
                    value: pb::event::Value::Service(s),
                    ..
                }) if s.name == "web" && s.backends.len() == 1 => return s,
                Some(WatchUpdate::Reset { reason }) => panic!("beta's agent was reset: {reason}"),
                Some(_) => {}
                None => panic!("watch ended"),
            }
        }
    })
    .await
    .expect("web with one backend in beta's watch");
    assert_eq!(web.backends[0].ip, "10.1.1.11");

    // alpha down again; beta restarted with a short stale TTL: alpha's data is withdrawn.
    a.kill();
    b.kill();
    b.start("2s").await;
    let deadline = Instant::now() + T;
    loop {
        let left = objects_of(&mut eb, "alpha").await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alpha's data never withdrawn from beta's etcd: {:?}\n{}",
            left.keys(),
            b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = b
        .wait_status("alpha's data gone from beta's index", |s| {
            cluster_count(s, "alpha", "services").unwrap_or(0) == 0
        })
        .await;
    let p = peer(&s, "alpha").expect("peer alpha still configured");
    assert_eq!(p["connected"], false, "{p}");
    println!("beta after the TTL:\n{s:#}");
}
