//! Harness of the agent tests: a real etcd, the real mesh-apiserver (serving side, mutual
//! TLS) in this process, and the real mesh-agent binary running inside a network namespace
//! the test creates, with a cgroup and a bpffs pin directory of its own.
//!
//! Cluster data is written into etcd directly with the key layout of DESIGN.md section 6
//! (`Keys` + protobuf values), for the local cluster (`east`) and a remote one (`west`)
//! standing in for what the peer importer will write.
//!
//! Backends are small TCP servers (this test binary re-executed in a role) on addresses of
//! the namespace's `lo`, answering their name; clients are the same binary, placed in the
//! agent's cgroup and namespace.
//!
//! Every resource is released by a Drop guard, processes first.
#![allow(dead_code)]

pub mod history;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use ipnet::IpNet;
use mesh_agent::datapath::{Datapath, DatapathConfig, DatapathDump, IpcacheValue, unpin_dir};
use mesh_apiserver::{Args as ServerArgs, Running, StartOptions};
use mesh_proto::keys::Keys;
use mesh_proto::pb::{self, Kind};
use mesh_testkit::certs::TestCa;
use mesh_testkit::etcd::Etcd;
use prost::Message;
use tokio_util::sync::CancellationToken;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
pub const EPERM: i32 = 1;
/// How long a test waits for the agent to converge.
pub const CONVERGE: Duration = Duration::from_secs(20);

// === small helpers ===

#[macro_export]
macro_rules! require_root {
    () => {
        mesh_testkit::require_root("the agent tests")
    };
}

/// A name unique to this process and call, short enough for interfaces.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// === guards ===

/// A network namespace with `lo` up, deleted on drop (with the veth ends inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The agent's routes (`proto 77`) as `dst -> via`.
    pub fn agent_routes(&self) -> BTreeMap<String, String> {
        self.ip(&["-4", "-o", "route", "show", "proto", "77"])
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let via = w.iter().position(|x| *x == "via")?;
                Some((w[0].to_owned(), w.get(via + 1)?.to_string()))
            })
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory, removed on drop (its processes moved out first).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        let path = Path::new(CGROUP_ROOT).join(format!("mesh-agent-test-{}", unique(tag)));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {path:?}: {e}"));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(CGROUP_ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A bpffs mounted on a temporary directory; on drop, unpins the node and unmounts.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mounted() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mesh-agent-bpffs")
            .tempdir()
            .unwrap();
        run("mount", &["-t", "bpf", "bpf", dir.path().to_str().unwrap()]);
        Self { dir }
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("mesh").join("node-1")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = unpin_dir(&self.pin_dir());
        if !Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

// === child processes ===

/// This test binary re-executed in a role, in a netns (and optionally a cgroup).
pub struct Proc {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    pub fn spawn(netns: &Netns, cgroup: Option<&Cgroup>, role: &str, args: &[&str]) -> Self {
        let exe = std::env::current_exe().unwrap();
        let script = match cgroup {
            Some(_) => r#"echo $$ > "$1" && exec nsenter --net="$2" -- "$3""#,
            None => r#"exec nsenter --net="$2" -- "$3""#,
        };
        let procs = cgroup
            .map(|c| c.path.join("cgroup.procs"))
            .unwrap_or_default();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(procs)
            .arg(netns.path())
            .arg(exe)
            .env("MESH_AGENT_TEST_CHILD", role)
            .env("MESH_AGENT_TEST_ARGS", args.join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {role}: {e}"));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout }
    }

    /// A TCP server answering `name` on `addr`, returned once it listens.
    pub fn server(netns: &Netns, addr: &str, name: &str) -> Self {
        let mut proc = Self::spawn(netns, None, "tcp-server", &[addr, name]);
        let mut line = String::new();
        loop {
            line.clear();
            let n = proc.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "server {name} on {addr} exited before it was ready");
            if line.trim_end() == "READY" {
                return proc;
            }
        }
    }

    /// Runs `count` connections to `target` from the cgroup; returns what each saw.
    pub fn connect(netns: &Netns, cgroup: &Cgroup, target: SocketAddr, count: u32) -> Vec<Outcome> {
        let count = count.to_string();
        let mut proc = Self::spawn(
            netns,
            Some(cgroup),
            "tcp-client",
            &[&target.to_string(), &count, "0"],
        );
        proc.results()
    }

    /// A client connecting `count` times, `pause_ms` apart, in the background.
    pub fn connect_loop(
        netns: &Netns,
        cgroup: &Cgroup,
        target: SocketAddr,
        count: u32,
        pause_ms: u32,
    ) -> Self {
        Self::spawn(
            netns,
            Some(cgroup),
            "tcp-client",
            &[
                &target.to_string(),
                &count.to_string(),
                &pause_ms.to_string(),
            ],
        )
    }

    /// `GET path` from the agent's `/metrics` listener (inside the namespace); returns the
    /// whole response (status line, headers, body).
    pub fn http_get(netns: &Netns, addr: &str, path: &str) -> String {
        let mut proc = Self::spawn(netns, None, "http-get", &[addr, path]);
        let mut out = String::new();
        proc.stdout.read_to_string(&mut out).unwrap();
        proc.child.wait().unwrap();
        out.split_once("HTTP-BEGIN\n")
            .map(|(_, r)| r.to_owned())
            .unwrap_or_else(|| panic!("no response from {addr}{path}: {out}"))
    }

    /// Waits for the client to finish; returns its results.
    pub fn results(&mut self) -> Vec<Outcome> {
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "client failed: {status}\n{out}");
        out.lines()
            .filter_map(|l| l.find("RESULT ").map(|i| &l[i + "RESULT ".len()..]))
            .map(Outcome::parse)
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client saw for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok { name: String },
    Err { errno: i32 },
}

impl Outcome {
    fn parse(line: &str) -> Self {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["ok", name] => Self::Ok {
                name: (*name).to_owned(),
            },
            ["err", errno] => Self::Err {
                errno: errno.parse().unwrap(),
            },
            _ => panic!("bad child output {line:?}"),
        }
    }
}

/// The names that answered; panics if any connection failed.
pub fn answered(outcomes: &[Outcome]) -> BTreeSet<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Ok { name } => name.clone(),
            Outcome::Err { errno } => {
                panic!("a connection failed with errno {errno}: {outcomes:?}")
            }
        })
        .collect()
}

/// Entry point of the re-executed children: call from an ELF constructor of each test binary
/// (`#[ctor::ctor(unsafe)] fn child_process_entry()`), so a child runs its role before
/// libtest's `main` and the entry is never counted as a test. Returns at once in a test run.
pub fn child_entry() {
    let Ok(role) = std::env::var("MESH_AGENT_TEST_CHILD") else {
        return;
    };
    mesh_testkit::init_child_process();
    let args = std::env::var("MESH_AGENT_TEST_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.split_whitespace().collect();
    child_main(&role, &args);
    std::io::stdout().flush().unwrap();
    std::process::exit(0);
}

fn child_main(role: &str, args: &[&str]) {
    const TIMEOUT: Duration = Duration::from_secs(2);
    match (role, args) {
        ("tcp-server", [addr, name]) => {
            let listener = TcpListener::bind(addr).unwrap();
            println!("READY");
            std::io::stdout().flush().unwrap();
            for stream in listener.incoming() {
                let _ = stream.and_then(|mut s| s.write_all(name.as_bytes()));
            }
        }
        ("tcp-client", [target, count, pause_ms]) => {
            let target: SocketAddr = target.parse().unwrap();
            let pause = Duration::from_millis(pause_ms.parse().unwrap());
            for _ in 0..count.parse::<u32>().unwrap() {
                let r = (|| {
                    let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
                    s.set_read_timeout(Some(TIMEOUT))?;
                    let mut name = String::new();
                    s.read_to_string(&mut name)?;
                    Ok::<_, std::io::Error>(name)
                })();
                match r {
                    Ok(name) => println!("RESULT ok {name}"),
                    Err(e) => println!("RESULT err {}", e.raw_os_error().unwrap_or(-1)),
                }
                std::io::stdout().flush().unwrap();
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        }
        ("http-get", [addr, path]) => {
            let r = (|| {
                let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok::<_, std::io::Error>(body)
            })();
            println!();
            println!("HTTP-BEGIN");
            match r {
                Ok(body) => print!("{body}"),
                Err(e) => print!("ERROR {e}"),
            }
        }
        // The serving side of mesh-apiserver in a process of its own, so a test can SIGKILL
        // it: args are its argv (with --listen); prints READY once its index is loaded.
        ("apiserver", argv) => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let settings = ServerArgs::try_parse_from(argv.iter().copied())
                    .expect("apiserver args")
                    .validate()
                    .expect("apiserver settings");
                let running = mesh_apiserver::start(
                    settings,
                    StartOptions { publisher: false },
                    CancellationToken::new(),
                )
                .await
                .expect("apiserver starts");
                running.index.wait_loaded().await.expect("index loads");
                println!("READY");
                std::io::stdout().flush().unwrap();
                std::future::pending::<()>().await;
            });
        }
        _ => panic!("unknown child role {role} {args:?}"),
    }
}

// === the mesh: etcd, apiserver, agent ===

/// Addresses of one test's network: `172.30.<net>.0/24` between the root namespace
/// (`.1`, where the apiserver listens) and the node's namespace (`.2`, node-1).
#[derive(Clone, Copy, Debug)]
pub struct Net(pub u8);

impl Net {
    pub fn root_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, self.0, 1)
    }
    /// Host `.n` of the node network (node-1 is `.2`).
    pub fn host(self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, self.0, n)
    }
}

/// Everything a test needs; dropped in field order: agent, servers, apiserver, etcd, then
/// the datapath pins, the cgroup and the namespace.
pub struct Mesh {
    pub agent: Option<Agent>,
    pub servers: Vec<Proc>,
    pub apiserver: Option<Running>,
    pub shutdown: CancellationToken,
    pub etcd: Etcd,
    pub kv: etcd_client::Client,
    pub keys: Keys,
    pub bpffs: Bpffs,
    pub cgroup: Cgroup,
    pub netns: Netns,
    pub net: Net,
    pub dir: tempfile::TempDir,
    pub grpc_addr: SocketAddr,
    pub files: CertFiles,
    /// The interface (in the node's namespace) the agent counts flows on, if any; the
    /// test's own datapath handle must name it too, or opening would detach it.
    pub flow_iface: Option<String>,
    apiserver_argv: Vec<String>,
    /// The apiserver when it runs as a process ([`Mesh::apiserver_as_process`]).
    apiserver_process: Option<ApiserverProcess>,
}

/// The apiserver's process, killed on drop.
pub struct ApiserverProcess(Child);

impl Drop for ApiserverProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The serving side of mesh-apiserver (no publisher) on `listen`, its index loaded.
async fn start_apiserver(argv: &[String], listen: SocketAddr) -> (Running, CancellationToken) {
    let mut argv = argv.to_vec();
    argv.extend(["--listen".to_owned(), listen.to_string()]);
    let settings = ServerArgs::try_parse_from(argv)
        .expect("apiserver args")
        .validate()
        .expect("apiserver settings");
    let shutdown = CancellationToken::new();
    let running = mesh_apiserver::start(
        settings,
        StartOptions { publisher: false },
        shutdown.clone(),
    )
    .await
    .expect("apiserver starts");
    running.index.wait_loaded().await.expect("index loads");
    (running, shutdown)
}

pub struct CertFiles {
    pub ca: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
}

impl Mesh {
    /// etcd, the apiserver of cluster `east` (TLS, on the root side of the node network),
    /// the node-1 namespace with its veth, a cgroup and a bpffs. No agent yet.
    pub async fn start(tag: &str, net: Net) -> Self {
        let netns = Netns::new(tag);
        let root_if = unique("ma");
        netns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", &root_if,
        ]);
        netns.ip(&["link", "set", &root_if, "netns", "1"]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.root_ip()),
                "dev",
                &root_if,
            ],
        );
        run("ip", &["link", "set", &root_if, "up"]);
        netns.ip(&["addr", "add", &format!("{}/24", net.host(2)), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        let cgroup = Cgroup::new(tag);
        let bpffs = Bpffs::mounted();

        let dir = tempfile::Builder::new()
            .prefix("mesh-agent-test")
            .tempdir()
            .unwrap();
        let ca = TestCa::new("east");
        let ca_path = ca.write(dir.path());
        let (server_cert, server_key) = ca.issue("apiserver").write(dir.path(), "apiserver");
        let (agent_cert, agent_key) = ca.issue("agent/node-1").write(dir.path(), "agent");

        let etcd = Etcd::start();
        let kv = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("etcd client");
        let apiserver_argv: Vec<String> = [
            "mesh-apiserver",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--pod-cidr",
            "10.1.0.0/16",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "1s",
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
            "--tls-ca",
            ca_path.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let listen = SocketAddr::from((net.root_ip(), 0));
        let (running, shutdown) = start_apiserver(&apiserver_argv, listen).await;
        let grpc_addr = running.grpc_addr;
        Self {
            agent: None,
            servers: Vec::new(),
            apiserver: Some(running),
            shutdown,
            etcd,
            kv,
            keys: Keys::default(),
            bpffs,
            cgroup,
            netns,
            net,
            dir,
            grpc_addr,
            files: CertFiles {
                ca: ca_path,
                agent_cert,
                agent_key,
            },
            flow_iface: None,
            apiserver_argv,
            apiserver_process: None,
        }
    }

    /// Stops the apiserver (graceful: its streams end, the agent sees a lost stream).
    pub async fn stop_apiserver(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.apiserver.take() {
            running.shutdown().await.expect("apiserver stops cleanly");
        }
    }

    /// Starts the apiserver again on the same address.
    pub async fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "the apiserver runs");
        let (running, shutdown) = start_apiserver(&self.apiserver_argv, self.grpc_addr).await;
        self.apiserver = Some(running);
        self.shutdown = shutdown;
    }

    /// Moves the apiserver into a process of its own (this test binary re-executed, on
    /// the same address), so that [`Mesh::kill9_apiserver`] can SIGKILL it.
    pub async fn apiserver_as_process(&mut self) {
        self.stop_apiserver().await;
        self.spawn_apiserver_process();
    }

    fn spawn_apiserver_process(&mut self) {
        assert!(
            self.apiserver_process.is_none(),
            "the apiserver process runs"
        );
        let mut argv = self.apiserver_argv.clone();
        argv.extend(["--listen".to_owned(), self.grpc_addr.to_string()]);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("MESH_AGENT_TEST_CHILD", "apiserver")
            .env("MESH_AGENT_TEST_ARGS", argv.join(" "))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the apiserver process");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            // The port of the previous server can take a moment to be free: the child
            // panics (and exits) then, and is started again.
            if stdout.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                return self.spawn_apiserver_process();
            }
            if line.trim_end() == "READY" {
                break;
            }
        }
        self.apiserver_process = Some(ApiserverProcess(child));
    }

    /// SIGKILLs the apiserver process ([`Mesh::apiserver_as_process`]).
    pub fn kill9_apiserver(&mut self) {
        let mut p = self.apiserver_process.take().expect("an apiserver process");
        p.0.kill().expect("SIGKILL");
        p.0.wait().unwrap();
    }

    /// Starts the apiserver process again on the same address.
    pub fn restart_apiserver_process(&mut self) {
        self.spawn_apiserver_process();
    }

    /// A backend server answering `name` on `ip:port` (the address is added to `lo`).
    pub fn backend(&mut self, ip: &str, port: u16, name: &str) {
        self.netns
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        let proc = Proc::server(&self.netns, &format!("{ip}:{port}"), name);
        self.servers.push(proc);
    }

    /// Starts the agent binary inside the node's namespace.
    pub fn start_agent(&mut self, extra: &[&str]) {
        assert!(self.agent.is_none(), "an agent is already running");
        let mut agent = Agent::spawn(self, extra);
        // The test reads the maps through its own `Datapath::open`; two opens racing to
        // create the same pins would fail, so wait for the agent's to be done.
        let deadline = Instant::now() + CONVERGE;
        while !agent.log().contains("datapath ready") {
            agent.assert_running();
            assert!(
                Instant::now() < deadline,
                "the agent did not open its datapath:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent = Some(agent);
    }

    /// Kills the agent with SIGKILL.
    pub fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("an agent runs");
        agent.kill();
    }

    /// The pinned maps, read through the datapath (programs are replaced in place by
    /// identical ones; the maps are only read).
    pub fn dump(&self) -> DatapathDump {
        self.datapath().dump().expect("dump")
    }

    /// A handle on the pinned datapath, configured like the agent's.
    pub fn datapath(&self) -> Datapath {
        let mut config = DatapathConfig::new(self.bpffs.pin_dir(), &self.cgroup.path);
        if let Some(iface) = &self.flow_iface {
            config = config
                .with_flow_iface(iface)
                .with_flow_netns(self.netns.path());
        }
        Datapath::open(config).expect("open the pinned datapath")
    }

    /// Polls the maps until `check` passes (returns `Ok`), or panics with its last error.
    pub async fn converge<T>(
        &self,
        what: &str,
        mut check: impl FnMut(&DatapathDump) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let dump = self.dump();
            match check(&dump) {
                Ok(v) => return v,
                Err(e) if Instant::now() >= deadline => {
                    let log = self.agent.as_ref().map(|a| a.log()).unwrap_or_default();
                    panic!("{what}: not converged after {CONVERGE:?}: {e}\nagent log:\n{log}");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// `GET path` on the agent's metrics listener.
    pub fn agent_http(&self, path: &str) -> String {
        let addr = self.agent.as_ref().expect("an agent runs").metrics_addr();
        Proc::http_get(&self.netns, &addr, path)
    }

    /// The value of a metric line starting with `series` (name and labels), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let body = self.agent_http("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    /// The agent's status report as the apiserver stored it in etcd.
    pub async fn agent_status(&mut self) -> Option<pb::AgentStatus> {
        let r = self
            .kv
            .get(self.keys.agent("node-1"), None)
            .await
            .expect("etcd get");
        r.kvs()
            .first()
            .map(|kv| pb::AgentStatus::decode(kv.value()).expect("an AgentStatus"))
    }

    /// Waits until the agent's status report, as the apiserver stored it in etcd, passes
    /// `check` (an etcd watch on its key: the report is awaited, not polled); panics naming
    /// `what`, with the last report and the agent's log, after [`CONVERGE`].
    pub async fn wait_agent_status(
        &mut self,
        what: &str,
        check: impl Fn(&pb::AgentStatus) -> bool,
    ) -> pb::AgentStatus {
        let key = self.keys.agent("node-1");
        // Watch first, then read: a report written between the two is in the stream.
        let mut stream = self
            .kv
            .watch(key.clone(), None)
            .await
            .expect("watch the agent's status");
        let mut last = self.agent_status().await;
        if let Some(s) = last.as_ref().filter(|s| check(s)) {
            return s.clone();
        }
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            let resp = match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(resp) => resp
                    .expect("the agent's status watch")
                    .expect("the agent's status watch ended"),
                Err(_) => panic!(
                    "{what}: the agent's status report did not pass after {CONVERGE:?}; the \
                     last one: {last:?}\nagent log:\n{}",
                    self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
                ),
            };
            for kv in resp.events().iter().filter_map(|e| e.kv()) {
                if kv.value().is_empty() {
                    continue;
                }
                let s = pb::AgentStatus::decode(kv.value()).expect("an AgentStatus");
                if check(&s) {
                    return s;
                }
                last = Some(s);
            }
        }
    }

    // --- writing cluster data into etcd (DESIGN.md section 6) ---

    pub async fn put<M: Message>(&mut self, cluster: &str, kind: Kind, name: &str, value: &M) {
        self.kv
            .put(
                self.keys.object(cluster, kind, name),
                value.encode_to_vec(),
                None,
            )
            .await
            .expect("etcd put");
    }

    pub async fn delete(&mut self, cluster: &str, kind: Kind, name: &str) {
        self.kv
            .delete(self.keys.object(cluster, kind, name), None)
            .await
            .expect("etcd delete");
    }

    pub async fn unmark_synced(&mut self, cluster: &str) {
        // Every kind a cluster publishes for its own agents (policies included; a remote
        // cluster's policy marker is simply not needed).
        for kind in mesh_proto::keys::PUBLISHED_KINDS {
            self.kv
                .delete(self.keys.synced(cluster, kind), None)
                .await
                .expect("etcd delete");
        }
    }

    pub async fn mark_synced(&mut self, cluster: &str) {
        // Every kind a cluster publishes for its own agents (policies included; a remote
        // cluster's policy marker is simply not needed).
        for kind in mesh_proto::keys::PUBLISHED_KINDS {
            self.kv
                .put(
                    self.keys.synced(cluster, kind),
                    pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec(),
                    None,
                )
                .await
                .expect("etcd put");
        }
    }

    pub async fn put_config(&mut self, cluster: &str, id: u32, pod_cidr: &str) {
        let v = pb::ClusterConfig {
            name: cluster.into(),
            id,
            pod_cidrs: vec![pod_cidr.into()],
            service_cidr: None,
            capabilities: vec![],
            version: "test".into(),
        };
        self.put(cluster, Kind::Config, "", &v).await;
    }

    pub async fn put_node(&mut self, cluster: &str, name: &str, ip: Ipv4Addr, pod_cidr: &str) {
        let v = pb::Node {
            cluster: cluster.into(),
            name: name.into(),
            internal_ips: vec![ip.to_string()],
            pod_cidrs: vec![pod_cidr.into()],
            ..Default::default()
        };
        self.put(cluster, Kind::Node, name, &v).await;
    }

    pub async fn put_identity(&mut self, cluster: &str, id: u32, app: &str) {
        let v = pb::Identity {
            id,
            labels: vec![
                format!("k8s:app={app}"),
                format!("k8s:io.cilium.k8s.policy.cluster={cluster}"),
                "k8s:io.kubernetes.pod.namespace=default".into(),
            ],
        };
        self.put(cluster, Kind::Identity, &id.to_string(), &v).await;
    }

    pub async fn put_endpoint(
        &mut self,
        cluster: &str,
        ip: &str,
        identity: u32,
        node: &str,
        host_ip: Ipv4Addr,
    ) {
        let v = pb::Endpoint {
            ip: ip.into(),
            identity,
            host_ip: Some(host_ip.to_string()),
            node: node.into(),
            namespace: "default".into(),
            pod: format!("pod-{ip}"),
            named_ports: vec![],
        };
        self.put(cluster, Kind::Endpoint, ip, &v).await;
    }

    pub async fn put_service(&mut self, svc: &pb::GlobalService) {
        let name = format!("{}/{}", svc.namespace, svc.name);
        let cluster = svc.cluster.clone();
        self.put(&cluster, Kind::Service, &name, svc).await;
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
        self.servers.clear();
        self.shutdown.cancel();
        self.apiserver.take();
        self.apiserver_process.take();
    }
}

/// The agent binary, run inside the node's namespace with its log in a file.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn spawn(mesh: &Mesh, extra: &[&str]) -> Self {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log = mesh.dir.path().join(format!(
            "agent-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", mesh.netns.path().display()))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["--node-name", "node-1", "--cluster-name", "east"])
            .arg("--apiserver")
            .arg(mesh.grpc_addr.to_string())
            .args(["--apiserver-server-name", "localhost"])
            .arg("--tls-ca")
            .arg(&mesh.files.ca)
            .arg("--tls-cert")
            .arg(&mesh.files.agent_cert)
            .arg("--tls-key")
            .arg(&mesh.files.agent_key)
            .arg("--cgroup-path")
            .arg(&mesh.cgroup.path)
            .arg("--bpffs-dir")
            .arg(mesh.bpffs.pin_dir())
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--status-interval", "1s", "--heartbeat-interval", "1s"])
            .args(["--initial-sync-timeout", "10s"])
            .args(
                mesh.flow_iface
                    .as_deref()
                    .map(|i| vec!["--flow-iface", i])
                    .unwrap_or_default(),
            )
            .args(extra)
            .env("RUST_LOG", "info,mesh_agent=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("spawn mesh-agent");
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of `/metrics` (inside the node's namespace), from the agent's log.
    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("serving /metrics"))
            .unwrap_or_else(|| panic!("no metrics listener in the log:\n{log}"));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("addr= field");
        // Strip ANSI colour codes, if any.
        addr.chars()
            .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Panics with the log if the agent exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the agent exited with {status}:\n{}", self.log());
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

// === the service under test ===

pub const VIP: &str = "10.96.0.10";
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

pub fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), PORT)
}

/// A backend of the `default/web` service: `(ip, node, ready)`.
pub fn backend(ip: &str, node: &str, ready: bool) -> pb::Backend {
    pb::Backend {
        ip: ip.into(),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp.into(),
            port: u32::from(TARGET_PORT),
        }],
        node: node.into(),
        zone: String::new(),
        ready,
        serving: ready,
        terminating: false,
    }
}

/// `default/web` as `cluster` publishes it.
pub fn web(
    cluster: &str,
    frontend: &str,
    affinity: pb::Affinity,
    backends: Vec<pb::Backend>,
) -> pb::GlobalService {
    pb::GlobalService {
        cluster: cluster.into(),
        namespace: "default".into(),
        name: "web".into(),
        local_only: false,
        shared: true,
        affinity: affinity.into(),
        internal_traffic_policy: pb::TrafficPolicy::Cluster.into(),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp.into(),
            port: u32::from(PORT),
        }],
        frontends: vec![frontend.into()],
        backends,
    }
}

/// The identity of an app in a cluster: `(cluster_id << 16) | local`.
pub fn identity(cluster_id: u32, local: u32) -> u32 {
    (cluster_id << 16) | local
}

/// Two clusters: `east` (local, id 1: node-1 = this node, node-2) and `west` (id 2: w1).
/// Backends: east-n1 10.1.1.11 (node-1), east-n2 10.1.2.11 (node-2), west-w1 10.2.1.11.
pub async fn two_clusters(mesh: &mut Mesh, affinity: pb::Affinity) {
    two_clusters_unsynced(mesh, affinity).await;
    mesh.mark_synced("east").await;
    mesh.mark_synced("west").await;
}

/// [`two_clusters`] without the synced markers: the data and the backend servers only.
pub async fn two_clusters_unsynced(mesh: &mut Mesh, affinity: pb::Affinity) {
    let net = mesh.net;
    mesh.put_config("east", 1, "10.1.0.0/16").await;
    mesh.put_node("east", "node-1", net.host(2), "10.1.1.0/24")
        .await;
    mesh.put_node("east", "node-2", net.host(3), "10.1.2.0/24")
        .await;
    mesh.put_identity("east", identity(1, 256), "web").await;
    mesh.put_endpoint("east", "10.1.1.11", identity(1, 256), "node-1", net.host(2))
        .await;
    mesh.put_endpoint("east", "10.1.2.11", identity(1, 256), "node-2", net.host(3))
        .await;
    mesh.put_service(&web(
        "east",
        VIP,
        affinity,
        vec![
            backend("10.1.1.11", "node-1", true),
            backend("10.1.2.11", "node-2", true),
        ],
    ))
    .await;
    mesh.backend("10.1.1.11", TARGET_PORT, "east-n1");
    mesh.backend("10.1.2.11", TARGET_PORT, "east-n2");
    west_unsynced(mesh, affinity).await;
}

/// The remote cluster `west` of [`two_clusters`], without its markers: its config, node
/// `w1`, identity, endpoint 10.2.1.11 with its backend server, and its `web` service.
pub async fn west_unsynced(mesh: &mut Mesh, affinity: pb::Affinity) {
    let net = mesh.net;
    mesh.put_config("west", 2, "10.2.0.0/16").await;
    mesh.put_node("west", "w1", net.host(4), "10.2.1.0/24")
        .await;
    mesh.put_identity("west", identity(2, 256), "web").await;
    mesh.put_endpoint("west", "10.2.1.11", identity(2, 256), "w1", net.host(4))
        .await;
    mesh.put_service(&web(
        "west",
        "10.97.0.10",
        affinity,
        vec![backend("10.2.1.11", "w1", true)],
    ))
    .await;
    mesh.backend("10.2.1.11", TARGET_PORT, "west-w1");
}

// === reading the maps ===

/// The backends (`ip:port`) the maps hold for a frontend, checking that the entries are
/// consistent: a master entry, slots `1..=count` and no more, each pointing at an existing
/// backend. `None` if the frontend has no master entry.
pub fn frontend_backends(
    dump: &DatapathDump,
    vip: SocketAddr,
) -> Result<Option<BTreeSet<SocketAddr>>, String> {
    let std::net::IpAddr::V4(ip) = vip.ip() else {
        return Err("IPv4 only".into());
    };
    let master = mesh_agent::datapath::ServiceEntryKey::master(ip, vip.port(), 6);
    let slots: Vec<_> = dump
        .services
        .iter()
        .filter(|(k, _)| k.vip == ip && k.port == vip.port() && k.proto == 6)
        .collect();
    let Some(m) = dump.services.get(&master) else {
        return if slots.is_empty() {
            Ok(None)
        } else {
            Err(format!("slots without a master entry: {slots:?}"))
        };
    };
    let mut out = BTreeSet::new();
    for slot in 1..=m.count {
        let v = dump
            .services
            .get(&master.with_slot(slot))
            .ok_or_else(|| format!("slot {slot} of {} missing", m.count))?;
        let b = dump
            .backends
            .get(&v.backend_id)
            .ok_or_else(|| format!("slot {slot} points at missing backend {}", v.backend_id))?;
        out.insert(SocketAddr::new(b.ip.into(), b.port));
    }
    if slots.len() != usize::from(m.count) + 1 {
        return Err(format!(
            "{} entries for count {}: {slots:?}",
            slots.len(),
            m.count
        ));
    }
    Ok(Some(out))
}

/// `ip:8080` of each address.
pub fn targets(ips: &[&str]) -> BTreeSet<SocketAddr> {
    ips.iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), TARGET_PORT))
        .collect()
}

/// Checks that the frontend has exactly `want` and that the backend map has nothing else.
pub fn exactly(dump: &DatapathDump, want: &BTreeSet<SocketAddr>) -> Result<(), String> {
    let got = frontend_backends(dump, vip())?.ok_or("no master entry")?;
    if &got != want {
        return Err(format!("frontend has {got:?}, want {want:?}"));
    }
    let all: BTreeSet<SocketAddr> = dump
        .backends
        .values()
        .map(|b| SocketAddr::new(b.ip.into(), b.port))
        .collect();
    if &all != want || dump.backends.len() != want.len() {
        return Err(format!(
            "backend map holds {:?}, want {want:?}",
            dump.backends
        ));
    }
    Ok(())
}

pub fn ipcache(dump: &DatapathDump) -> BTreeMap<IpNet, IpcacheValue> {
    dump.ipcache.clone()
}
