//! The eBPF datapath against the real kernel: socket load balancing in a
//! cgroup, UDP reverse translation, pinned maps and links across a restart,
//! and flow accounting on a veth pair.
//!
//! These tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and fail
//! with a message otherwise (`--profile unprivileged` leaves them out). Each test creates its own network namespaces,
//! cgroup and bpffs, and removes them in Drop guards, so they run in
//! parallel and clean up when they fail.
//!
//! Clients and servers are this test binary re-executed in a role (picked up
//! by `child_process_entry` before the test harness starts), moved into the
//! test's cgroup by `sh` and into its network namespace by `nsenter`.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use mesh_agent::datapath::{
    BackendValue, Datapath, DatapathConfig, IdentityPair, IpcacheValue, LinkState, PROTO_TCP,
    PROTO_UDP, RunTimeStats, ServiceEntryKey, ServiceEntryValue, kernel_program_stats, unpin_dir,
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
const EPERM: i32 = 1;
const ENETUNREACH: i32 = 101;

// === harness ===

macro_rules! require_root {
    () => {
        mesh_testkit::require_root("the datapath tests")
    };
}

/// A name unique to this process and call, short enough for interfaces.
fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with `lo` up, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = unique(tag);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
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
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn new(tag: &str) -> Self {
        let path = Path::new(CGROUP_ROOT).join(format!("mesh-test-{}", unique(tag)));
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

/// A temporary directory for a bpffs; on drop, unpins the node's datapath and
/// unmounts whatever was mounted there.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    /// An empty directory: `Datapath::open` must mount the bpffs itself.
    fn unmounted() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("mesh-bpffs")
                .tempdir()
                .unwrap(),
        }
    }

    fn mounted() -> Self {
        let fs = Self::unmounted();
        run(
            "mount",
            &["-t", "bpf", "bpf", fs.dir.path().to_str().unwrap()],
        );
        fs
    }

    fn pin_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("mesh").join(node)
    }

    fn is_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let dir = self.dir.path().to_str().unwrap();
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(dir) && l.starts_with("bpf "))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = unpin_dir(&self.dir.path().join("mesh").join("node"));
        while self.is_mounted() {
            if !Command::new("umount")
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
                break;
            }
        }
    }
}

/// This binary re-executed in a child role, in a netns (and a cgroup).
struct Proc {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(netns: &Netns, cgroup: Option<&Cgroup>, role: &str, args: &[&str]) -> Self {
        Self::spawn_with(netns, cgroup, role, args, None)
    }

    fn spawn_with(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        role: &str,
        args: &[&str],
        timeout_ms: Option<u64>,
    ) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new("sh");
        let script = match cgroup {
            // Join the cgroup first, so the process runs in it from exec on.
            Some(_) => r#"echo $$ > "$1" && exec nsenter --net="$2" -- "$3""#,
            None => r#"exec nsenter --net="$2" -- "$3""#,
        };
        let procs = cgroup
            .map(|c| c.path.join("cgroup.procs"))
            .unwrap_or_default();
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(procs)
            .arg(netns.path())
            .arg(exe)
            .env("MESH_DP_CHILD", role)
            .env("MESH_DP_ARGS", args.join(" "))
            .env(
                "MESH_DP_TIMEOUT_MS",
                timeout_ms.map_or_else(String::new, |t| t.to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {role}: {e}"));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout }
    }

    /// A server, returned once it listens.
    fn server(netns: &Netns, role: &str, args: &[&str]) -> Self {
        Self::server_in(netns, None, role, args)
    }

    /// A server in `cgroup` (so its sockets get the cgroup's ingress policy).
    fn server_in(netns: &Netns, cgroup: Option<&Cgroup>, role: &str, args: &[&str]) -> Self {
        let mut proc = Self::spawn(netns, cgroup, role, args);
        let mut line = String::new();
        loop {
            line.clear();
            let n = proc.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "{role} {args:?} exited before it was ready");
            if line.trim() == "READY" {
                return proc;
            }
        }
    }

    /// Runs a client to completion; returns its RESULT lines.
    fn client(netns: &Netns, cgroup: Option<&Cgroup>, role: &str, args: &[&str]) -> Vec<Outcome> {
        Self::client_with(netns, cgroup, role, args, None)
    }

    /// [`Proc::client`] with its own connect/read timeout.
    fn client_with(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        role: &str,
        args: &[&str],
        timeout_ms: Option<u64>,
    ) -> Vec<Outcome> {
        let mut proc = Self::spawn_with(netns, cgroup, role, args, timeout_ms);
        let mut out = String::new();
        proc.stdout.read_to_string(&mut out).unwrap();
        let status = proc.child.wait().unwrap();
        assert!(status.success(), "{role} {args:?} failed: {status}\n{out}");
        out.lines()
            .filter_map(|l| l.strip_prefix("RESULT "))
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

/// What a client saw for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The server's name and the peer address the socket reports.
    Ok {
        name: String,
        peer: SocketAddr,
    },
    Err {
        errno: i32,
    },
}

impl Outcome {
    fn parse(line: &str) -> Self {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["ok", name, peer] => Self::Ok {
                name: (*name).to_owned(),
                peer: peer.parse().unwrap(),
            },
            ["err", errno] => Self::Err {
                errno: errno.parse().unwrap(),
            },
            _ => panic!("bad child output {line:?}"),
        }
    }
}

// === child roles ===

/// Entry point of the re-executed children. It runs before libtest's `main` (an ELF
/// constructor), so a child never starts the test harness and the entry is not a test;
/// in a normal test run (no `MESH_DP_CHILD`) it returns at once.
#[ctor::ctor(unsafe)]
fn child_process_entry() {
    let Ok(role) = std::env::var("MESH_DP_CHILD") else {
        return;
    };
    mesh_testkit::init_child_process();
    let args = std::env::var("MESH_DP_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.split_whitespace().collect();
    child_main(&role, &args);
    std::io::stdout().flush().unwrap();
    std::process::exit(0);
}

fn ready() {
    println!("READY");
    std::io::stdout().flush().unwrap();
}

fn report(result: std::io::Result<(String, SocketAddr)>) {
    match result {
        Ok((name, peer)) => println!("RESULT ok {name} {peer}"),
        Err(e) => println!("RESULT err {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn child_main(role: &str, args: &[&str]) {
    let timeout = Duration::from_millis(
        std::env::var("MESH_DP_TIMEOUT_MS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(3000),
    );
    match (role, args) {
        ("idle", []) => {
            // Keeps a process in the namespace and cgroup; bounded, killed on drop.
            ready();
            std::thread::sleep(Duration::from_secs(300));
        }
        ("tcp-server", [addr, name]) => {
            let listener = TcpListener::bind(addr).unwrap();
            ready();
            for stream in listener.incoming() {
                let _ = stream.and_then(|mut s| s.write_all(name.as_bytes()));
            }
        }
        ("udp-server", [addr, name]) => {
            let socket = UdpSocket::bind(addr).unwrap();
            ready();
            let mut buf = [0u8; 64];
            loop {
                let (_, from) = socket.recv_from(&mut buf).unwrap();
                socket.send_to(name.as_bytes(), from).unwrap();
            }
        }
        ("tcp-client", [target, count]) => {
            let target: SocketAddr = target.parse().unwrap();
            for _ in 0..count.parse::<u32>().unwrap() {
                report((|| {
                    let mut s = TcpStream::connect_timeout(&target, timeout)?;
                    s.set_read_timeout(Some(timeout))?;
                    let peer = s.peer_addr()?;
                    let mut name = String::new();
                    s.read_to_string(&mut name)?;
                    Ok((name, peer))
                })());
            }
        }
        ("udp-client", [target, mode, count]) => {
            let target: SocketAddr = target.parse().unwrap();
            for _ in 0..count.parse::<u32>().unwrap() {
                report((|| {
                    let socket = UdpSocket::bind("0.0.0.0:0")?;
                    socket.set_read_timeout(Some(timeout))?;
                    let mut buf = [0u8; 64];
                    if *mode == "connected" {
                        socket.connect(target)?;
                        socket.send(b"hi")?;
                        let n = socket.recv(&mut buf)?;
                        let peer = socket.peer_addr()?;
                        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), peer))
                    } else {
                        socket.send_to(b"hi", target)?;
                        let (n, from) = socket.recv_from(&mut buf)?;
                        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
                    }
                })());
            }
        }
        _ => panic!("unknown child role {role} {args:?}"),
    }
}

// === helpers ===

fn program_service(
    dp: &mut Datapath,
    frontend: ServiceEntryKey,
    backends: &[(u32, Ipv4Addr, u16)],
) {
    let value = |ip, port| BackendValue {
        ip,
        port,
        proto: frontend.proto,
        cluster_id: 1,
        flags: 0,
    };
    for &(id, ip, port) in backends {
        dp.upsert_backend(id, value(ip, port)).unwrap();
    }
    for (i, &(id, ip, port)) in backends.iter().enumerate() {
        let slot = u16::try_from(i + 1).unwrap();
        let entry = ServiceEntryValue::backend(id, value(ip, port));
        dp.upsert_service_slot(frontend.with_slot(slot), entry)
            .unwrap();
    }
    let count = u16::try_from(backends.len()).unwrap();
    dp.upsert_service_slot(frontend, ServiceEntryValue::master(count))
        .unwrap();
}

fn names(outcomes: &[Outcome], vip: SocketAddr) -> BTreeSet<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Ok { name, peer } => {
                assert_eq!(*peer, vip, "the peer address must be the service address");
                name.clone()
            }
            Outcome::Err { errno } => panic!("connect to {vip} failed with errno {errno}"),
        })
        .collect()
}

/// A netns with two backend addresses on lo and a TCP server on each.
struct TwoBackends {
    _servers: Vec<Proc>,
    netns: Netns,
}

const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

impl TwoBackends {
    fn new(tag: &str) -> Self {
        let netns = Netns::new(tag);
        netns.ip(&["addr", "add", "10.0.1.1/32", "dev", "lo"]);
        netns.ip(&["addr", "add", "10.0.1.2/32", "dev", "lo"]);
        let servers = vec![
            Proc::server(&netns, "tcp-server", &["10.0.1.1:8080", "backend-a"]),
            Proc::server(&netns, "tcp-server", &["10.0.1.2:8080", "backend-b"]),
        ];
        Self {
            _servers: servers,
            netns,
        }
    }
}

fn tcp_frontend() -> (ServiceEntryKey, SocketAddr) {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    (
        ServiceEntryKey::master(vip, 80, PROTO_TCP),
        SocketAddr::from((vip, 80)),
    )
}

// === tests ===

#[test]
fn tcp_connect_to_service_is_load_balanced_and_refused_without_backends() {
    require_root!();
    // Declared first, dropped last: processes, then datapath pins, then cgroup.
    let cgroup = Cgroup::new("lb");
    let bpffs = Bpffs::mounted();
    let net = TwoBackends::new("lb");
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    assert!(
        dp.links().iter().all(|l| l.state == LinkState::Attached),
        "{:?}",
        dp.links()
    );

    let (frontend, vip) = tcp_frontend();
    program_service(
        &mut dp,
        frontend,
        &[(1, BACKEND_A, 8080), (2, BACKEND_B, 8080)],
    );

    let outcomes = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "40"],
    );
    assert_eq!(outcomes.len(), 40);
    assert_eq!(
        names(&outcomes, vip),
        BTreeSet::from(["backend-a".to_owned(), "backend-b".to_owned()]),
        "every connection reaches a backend and both backends are used"
    );
    // names() checked getpeername() showed the vip: TCP sockets keep their reverse
    // translation by socket cookie, nothing in the datagrams' LRU map; the client has
    // exited, and each socket's release deleted its entry.
    assert_eq!(rev_nat_entries(&bpffs.pin_dir("node")), 0);
    assert_eq!(sock_rev_entries(&bpffs.pin_dir("node")), 0);

    // A process outside the cgroup is not load balanced: nothing routes the vip.
    let outside = Proc::client(&net.netns, None, "tcp-client", &[&vip.to_string(), "1"]);
    assert_eq!(outside, vec![Outcome::Err { errno: ENETUNREACH }]);

    // An address that is not a frontend is left alone.
    let direct = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &["10.0.1.2:8080", "1"],
    );
    assert_eq!(
        direct,
        vec![Outcome::Ok {
            name: "backend-b".into(),
            peer: "10.0.1.2:8080".parse().unwrap()
        }]
    );

    // No backend left: the connect fails at once and never reaches the old ones.
    dp.upsert_service_slot(frontend, ServiceEntryValue::master(0))
        .unwrap();
    let refused = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "10"],
    );
    assert_eq!(refused, vec![Outcome::Err { errno: EPERM }; 10]);

    // The dump shows exactly what was programmed.
    let dump = dp.dump().unwrap();
    assert_eq!(dump.backends.len(), 2);
    assert_eq!(dump.backends[&2].ip, BACKEND_B);
    assert_eq!(dump.backends[&2].port, 8080);
    assert_eq!(dump.services.len(), 3);
    assert_eq!(dump.services[&frontend], ServiceEntryValue::master(0));
    assert_eq!(
        dump.services[&frontend.with_slot(2)],
        ServiceEntryValue::backend(2, dump.backends[&2])
    );

    // Removal reports whether the entry existed.
    assert!(dp.remove_service_slot(frontend.with_slot(2)).unwrap());
    assert!(!dp.remove_service_slot(frontend.with_slot(2)).unwrap());
    assert!(dp.remove_backend(2).unwrap());
    assert!(!dp.remove_backend(2).unwrap());
    assert_eq!(dp.backend(2).unwrap(), None);
    assert_eq!(
        dp.service_slot(frontend).unwrap(),
        Some(ServiceEntryValue::master(0))
    );
}

/// Runs of `name` in `stats` (from `Datapath::program_stats` or `kernel_program_stats`).
fn runs(stats: &[mesh_agent::datapath::ProgramStats], name: &str) -> u64 {
    stats
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.run_count)
        .sum()
}

#[test]
fn run_time_statistics_count_connects_by_the_kernels_program_names() {
    require_root!();
    let cgroup = Cgroup::new("stats");
    let bpffs = Bpffs::mounted();
    let net = TwoBackends::new("stats");
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    let (frontend, vip) = tcp_frontend();
    program_service(&mut dp, frontend, &[(1, BACKEND_A, 8080)]);
    // Names longer than the kernel keeps (15 bytes): "mesh_policy_ingress" is
    // "mesh_policy_ing" there.
    let names = ["mesh_connect4", "mesh_policy_ingress"];

    let _stats = RunTimeStats::enable().unwrap();
    let (own_before, all_before) = (dp.program_stats().unwrap(), kernel_program_stats(&names));
    let outcomes = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "10"],
    );
    assert_eq!(outcomes.len(), 10);
    let (own_after, all_after) = (dp.program_stats().unwrap(), kernel_program_stats(&names));

    assert_eq!(
        all_after
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        names,
        "one entry per name asked for, in order"
    );
    for name in names {
        let own = runs(&own_after, name) - runs(&own_before, name);
        let all = runs(&all_after, name) - runs(&all_before, name);
        assert!(
            own >= 10,
            "{name}: this datapath's program ran {own} times for 10 connects"
        );
        // Other tests' datapaths may run meanwhile: the kernel-wide sum holds at least ours.
        assert!(
            all >= own,
            "{name}: {all} runs kernel-wide, {own} in this datapath"
        );
    }
    assert_eq!(
        runs(&own_after, "mesh_connect4") - runs(&own_before, "mesh_connect4"),
        10,
        "one connect4 run per connect()"
    );
}

#[test]
fn udp_replies_appear_to_come_from_the_service() {
    require_root!();
    let cgroup = Cgroup::new("udp");
    let bpffs = Bpffs::mounted();
    let netns = Netns::new("udp");
    netns.ip(&["addr", "add", "10.0.2.1/32", "dev", "lo"]);
    let _server = Proc::server(&netns, "udp-server", &["10.0.2.1:5353", "udp-a"]);
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();

    let vip = SocketAddr::from(([10, 96, 0, 20], 53));
    let frontend = ServiceEntryKey::master(Ipv4Addr::new(10, 96, 0, 20), 53, PROTO_UDP);
    program_service(&mut dp, frontend, &[(7, Ipv4Addr::new(10, 0, 2, 1), 5353)]);

    // sendmsg4 rewrites, recvmsg4 translates the source back.
    let unconnected = Proc::client(
        &netns,
        Some(&cgroup),
        "udp-client",
        &[&vip.to_string(), "unconnected", "3"],
    );
    assert_eq!(
        unconnected,
        vec![
            Outcome::Ok {
                name: "udp-a".into(),
                peer: vip
            };
            3
        ]
    );
    // Each unconnected socket's reverse entry is in the LRU map (one socket, many peers).
    let pin_dir = bpffs.pin_dir("node");
    assert_eq!(rev_nat_entries(&pin_dir), 3);
    // connect4 rewrites, getpeername4 reports the service: from the socket's entry by
    // cookie, deleted when the socket is released.
    let connected = Proc::client(
        &netns,
        Some(&cgroup),
        "udp-client",
        &[&vip.to_string(), "connected", "3"],
    );
    assert_eq!(
        connected,
        vec![
            Outcome::Ok {
                name: "udp-a".into(),
                peer: vip
            };
            3
        ]
    );
    assert_eq!(
        rev_nat_entries(&pin_dir),
        3,
        "a connected socket's entry is its own"
    );
    assert_eq!(sock_rev_entries(&pin_dir), 0, "released with the sockets");

    // A TCP frontend on the same vip and port is a different service.
    let tcp = Proc::client(
        &netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "1"],
    );
    assert_eq!(tcp, vec![Outcome::Err { errno: ENETUNREACH }]);

    // sendmsg4 refuses when the service has no backend.
    dp.upsert_service_slot(frontend, ServiceEntryValue::master(0))
        .unwrap();
    let refused = Proc::client(
        &netns,
        Some(&cgroup),
        "udp-client",
        &[&vip.to_string(), "unconnected", "1"],
    );
    assert_eq!(refused, vec![Outcome::Err { errno: EPERM }]);
}

/// Entries of the LRU reverse-translation map (datagrams of unconnected sockets).
fn rev_nat_entries(pin_dir: &Path) -> usize {
    map_entries(pin_dir, "mesh_rev_nat")
}

/// Entries of the connected sockets' reverse translations (open sockets only).
fn sock_rev_entries(pin_dir: &Path) -> usize {
    map_entries(pin_dir, "mesh_sock_rev")
}

/// Entries of a pinned map, as bpftool dumps them.
fn map_entries(pin_dir: &Path, map: &str) -> usize {
    let path = pin_dir.join("maps").join(map);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map dump {}", path.display());
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    entries.len()
}

/// Counts the programs attached to a cgroup, as the kernel reports them.
fn attached_programs(cgroup: &Cgroup) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&cgroup.path)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .matches("\"attach_type\"")
        .count()
}

#[test]
fn pinned_maps_and_links_survive_an_agent_restart() {
    require_root!();
    let cgroup = Cgroup::new("rs");
    let bpffs = Bpffs::unmounted();
    let net = TwoBackends::new("rs");
    let config = DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path);
    let (frontend, vip) = tcp_frontend();

    let mut dp = Datapath::open(config.clone()).unwrap();
    assert!(
        bpffs.is_mounted(),
        "open mounts a bpffs when the pin root is not on one"
    );
    program_service(
        &mut dp,
        frontend,
        &[(1, BACKEND_A, 8080), (2, BACKEND_B, 8080)],
    );
    let before = dp.dump().unwrap();
    dp.close();

    // No Datapath object exists: the pinned programs still load balance.
    let outcomes = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "20"],
    );
    assert_eq!(names(&outcomes, vip).len(), 2, "{outcomes:?}");
    assert_eq!(attached_programs(&cgroup), 7);

    // Restart: maps reused with their content, links taken over, not doubled.
    let mut dp = Datapath::open(config.clone()).unwrap();
    assert_eq!(dp.links().len(), 7);
    assert!(
        dp.links().iter().all(|l| l.state == LinkState::Reused),
        "{:?}",
        dp.links()
    );
    assert_eq!(attached_programs(&cgroup), 7);
    assert_eq!(dp.dump().unwrap(), before);
    let outcomes = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "20"],
    );
    assert_eq!(names(&outcomes, vip).len(), 2, "{outcomes:?}");

    // The reopened handle writes the maps the attached programs read.
    program_service(&mut dp, frontend, &[(2, BACKEND_B, 8080)]);
    let outcomes = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "10"],
    );
    assert_eq!(
        names(&outcomes, vip),
        BTreeSet::from(["backend-b".to_owned()])
    );

    // Teardown detaches everything and removes the pins.
    let pin_dir = dp.pin_dir().to_path_buf();
    dp.unpin_all().unwrap();
    assert!(!pin_dir.exists());
    assert_eq!(attached_programs(&cgroup), 0);
    let outcomes = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "1"],
    );
    assert_eq!(outcomes, vec![Outcome::Err { errno: ENETUNREACH }]);
}

#[test]
fn classifier_counts_flows_per_identity_pair() {
    require_root!();
    let cgroup = Cgroup::new("fl");
    let bpffs = Bpffs::mounted();
    let a = Netns::new("fa");
    let b = Netns::new("fb");
    let (va, vb) = (unique("va"), unique("vb"));
    a.ip(&[
        "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", "10.1.0.1/24", "dev", &va]);
    a.ip(&["link", "set", &va, "up"]);
    b.ip(&["addr", "add", "10.1.0.2/24", "dev", &vb]);
    b.ip(&["addr", "add", "10.1.0.3/24", "dev", &vb]);
    b.ip(&["link", "set", &vb, "up"]);
    let _udp = Proc::server(&b, "udp-server", &["10.1.0.2:9001", "udp-b"]);
    let _tcp = Proc::server(&b, "tcp-server", &["10.1.0.3:9000", "tcp-world"]);

    let config = DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)
        .with_flow_iface(&va)
        .with_flow_netns(a.path());
    let mut dp = Datapath::open(config.clone()).unwrap();
    assert_eq!(dp.links().len(), 9, "{:?}", dp.links());

    let value = |identity| IpcacheValue {
        identity,
        tunnel_endpoint: Some(Ipv4Addr::new(192, 168, 0, 1)),
        cluster_id: 1,
        flags: 0,
    };
    dp.upsert_ipcache("10.1.0.1/32".parse().unwrap(), value(1000))
        .unwrap();
    dp.upsert_ipcache("10.1.0.2/32".parse().unwrap(), value(2000))
        .unwrap();
    dp.upsert_ipcache("10.2.0.0/16".parse().unwrap(), value(3000))
        .unwrap();
    assert_eq!(
        dp.ipcache_lookup(Ipv4Addr::new(10, 1, 0, 2)).unwrap(),
        Some(value(2000))
    );
    assert_eq!(
        dp.ipcache_lookup(Ipv4Addr::new(10, 2, 3, 4)).unwrap(),
        Some(value(3000))
    );
    assert_eq!(dp.ipcache_lookup(Ipv4Addr::new(10, 1, 0, 3)).unwrap(), None);
    let dump = dp.dump().unwrap();
    assert_eq!(dump.ipcache.len(), 3);
    assert_eq!(dump.ipcache[&"10.2.0.0/16".parse().unwrap()], value(3000));

    let ab = IdentityPair {
        src: 1000,
        dst: 2000,
    };
    let ba = IdentityPair {
        src: 2000,
        dst: 1000,
    };
    let udp = |n: &str| Proc::client(&a, None, "udp-client", &["10.1.0.2:9001", "unconnected", n]);

    // One datagram each way: counted exactly once at egress and ingress.
    let outcome = udp("1");
    assert_eq!(outcome.len(), 1);
    assert!(
        matches!(&outcome[0], Outcome::Ok { name, .. } if name == "udp-b"),
        "{outcome:?}"
    );
    let flows = dp.flows().unwrap();
    assert_eq!(flows[&ab].packets, 1, "{flows:?}");
    assert_eq!(flows[&ba].packets, 1, "{flows:?}");
    // Ethernet + IPv4 + UDP headers and the payload ("hi" / "udp-b").
    assert_eq!(flows[&ab].bytes, 14 + 20 + 8 + 2, "{flows:?}");
    assert_eq!(flows[&ba].bytes, 14 + 20 + 8 + 5, "{flows:?}");

    // After a restart the classifier is not attached twice: still one count
    // per packet.
    dp.close();
    let dp = Datapath::open(config).unwrap();
    assert!(
        dp.links().iter().all(|l| l.state == LinkState::Reused),
        "{:?}",
        dp.links()
    );
    assert_eq!(udp("2").len(), 2);
    let flows = dp.flows().unwrap();
    assert_eq!(flows[&ab].packets, 3, "{flows:?}");
    assert_eq!(flows[&ba].packets, 3, "{flows:?}");

    // An address the ipcache does not know is "world" (2).
    let tcp = Proc::client(&a, None, "tcp-client", &["10.1.0.3:9000", "3"]);
    assert!(
        tcp.iter().all(|o| matches!(o, Outcome::Ok { .. })),
        "{tcp:?}"
    );
    let flows = dp.flows().unwrap();
    let to_world = flows[&IdentityPair { src: 1000, dst: 2 }];
    let from_world = flows[&IdentityPair { src: 2, dst: 1000 }];
    assert!(
        to_world.packets >= 3 && from_world.packets >= 3,
        "{flows:?}"
    );
}

#[test]
fn bulk_ipcache_updates_are_all_readable() {
    require_root!();
    let cgroup = Cgroup::new("bk");
    let bpffs = Bpffs::mounted();
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    const N: u32 = 100_000;
    let value = |i: u32| IpcacheValue {
        identity: (2 << 16) | (256 + i % 60_000),
        tunnel_endpoint: Some(Ipv4Addr::new(192, 168, (i >> 8) as u8, i as u8)),
        cluster_id: 2,
        flags: 0,
    };
    let net = |i: u32| {
        ipnet::IpNet::from(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a40_0000 + i), 32).unwrap())
    };
    let started = std::time::Instant::now();
    for i in 0..N {
        dp.upsert_ipcache(net(i), value(i)).unwrap();
    }
    let one_by_one = started.elapsed();
    let batch: Vec<_> = (N..2 * N).map(|i| (net(i), value(i))).collect();
    let started = std::time::Instant::now();
    dp.upsert_ipcache_entries(&batch).unwrap();
    let batched = started.elapsed();
    let started = std::time::Instant::now();
    let dump = dp.dump().unwrap();
    let dumped = started.elapsed();
    eprintln!(
        "{N} ipcache entries: one by one {one_by_one:?}, batched {batched:?}; dump of {}: {dumped:?}",
        2 * N
    );
    assert_eq!(dump.ipcache.len(), 2 * N as usize);
    assert_eq!(dump.ipcache[&net(12_345)], value(12_345));
    assert_eq!(dump.ipcache[&net(N + 12_345)], value(N + 12_345));

    // Services and backends in batches, in order: the last write of a key wins.
    let frontend = ServiceEntryKey::master(Ipv4Addr::new(10, 96, 1, 1), 443, PROTO_TCP);
    let backends: Vec<_> = (1..=1000u32)
        .map(|id| {
            let b = BackendValue {
                ip: Ipv4Addr::from(0x0a50_0000 + id),
                port: 8443,
                proto: PROTO_TCP,
                cluster_id: 3,
                flags: 0,
            };
            (id, b)
        })
        .collect();
    dp.upsert_backends(&backends).unwrap();
    let mut slots: Vec<_> = (1..=1000u16)
        .map(|s| {
            (
                frontend.with_slot(s),
                ServiceEntryValue::backend(u32::from(s), backends[usize::from(s) - 1].1),
            )
        })
        .collect();
    slots.push((frontend, ServiceEntryValue::master(999)));
    slots.push((frontend, ServiceEntryValue::master(1000)));
    dp.upsert_service_slots(&slots).unwrap();
    let dump = dp.dump().unwrap();
    assert_eq!(dump.backends.len(), 1000);
    assert_eq!(dump.backends[&77], backends[76].1);
    assert_eq!(dump.services.len(), 1001);
    assert_eq!(dump.services[&frontend], ServiceEntryValue::master(1000));

    // IPv6 is refused before anything is written.
    let v6 = vec![
        (net(3 * N), value(0)),
        ("fd00::1/128".parse().unwrap(), value(0)),
    ];
    assert!(dp.upsert_ipcache_entries(&v6).is_err());
    assert_eq!(
        dp.ipcache_lookup(Ipv4Addr::from(0x0a40_0000 + 3 * N))
            .unwrap(),
        None
    );
}

/// A reconcile with more ipcache upserts than `IPCACHE_BESIDE_MIN` writes part of them
/// through the datapath's second ipcache writer, beside the service maps: the maps read back
/// equal the desired state.
#[test]
fn a_large_reconcile_writes_the_ipcache_beside_the_services() {
    use mesh_agent::desired::{
        self, BackendInfo, BackendKey, DesiredState, IpcacheInfo, ServiceKey,
    };
    use mesh_agent::reconcile::{IPCACHE_BESIDE_MIN, Reconciler, SPLIT_MIN, from_dump};
    use mesh_core::Protocol;
    require_root!();
    let cgroup = Cgroup::new("bs");
    let bpffs = Bpffs::mounted();
    let dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    let mut want = DesiredState::default();
    let info = |i: u32| IpcacheInfo {
        identity: (2 << 16) | (256 + i % 1000),
        host_ip: Some(std::net::IpAddr::V4(Ipv4Addr::new(
            192,
            168,
            2,
            (i % 200) as u8,
        ))),
        cluster_id: 2,
        local_node: false,
        remote_cluster: true,
    };
    let n = 2 * IPCACHE_BESIDE_MIN as u32;
    for i in 0..n {
        let ip = Ipv4Addr::from(0x0a40_0000 + i);
        want.ipcache.insert(
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(ip, 32).unwrap()),
            info(i),
        );
    }
    // 500 services of 20 backends each, the first backends among the ipcache's
    // addresses: 10000 backends and 10000 slots, batches large enough to be written half on
    // a second thread (SPLIT_MIN), through the datapath's second handles on the maps.
    for s in 0..500u32 {
        let key = ServiceKey {
            vip: Ipv4Addr::from(0x0a60_0200 + s).into(),
            port: 80,
            proto: Protocol::Tcp,
        };
        let backends: Vec<BackendKey> = (0..20u32)
            .map(|b| BackendKey {
                ip: Ipv4Addr::from(0x0a40_0000 + s * 20 + b).into(),
                port: 8080,
                proto: Protocol::Tcp,
            })
            .collect();
        for b in &backends {
            std::sync::Arc::make_mut(&mut want.backends).insert(*b, BackendInfo { cluster_id: 2 });
        }
        std::sync::Arc::make_mut(&mut want.services).insert(key, backends);
    }
    let mut r = Reconciler::new(dp);
    let counts = r.reconcile(&want).unwrap();
    assert!(r.ipcache_written_beside());
    assert_eq!(counts["ipcache_upsert"], u64::from(n));
    const { assert!(SPLIT_MIN <= 10000) };
    assert_eq!(
        (counts["backend_upsert"], counts["slot_upsert"]),
        (10000, 10000)
    );
    let (state, foreign) = from_dump(&r.maps().dump().unwrap());
    assert!(foreign.is_empty());
    assert_eq!(state.ipcache.len(), n as usize);
    assert!(
        desired::plan(&state, &want).is_empty(),
        "the maps hold the desired state"
    );
    assert_eq!(Some(&state), r.mirror());
}

#[test]
fn a_pinned_map_with_another_layout_is_refused_before_attaching() {
    require_root!();
    let cgroup = Cgroup::new("inc");
    let bpffs = Bpffs::mounted();
    pin_hash_map(&bpffs.pin_dir("node"), "mesh_services", 4, 4);
    let err = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("mesh_services") && msg.contains("expects"),
        "{msg}"
    );
    assert_eq!(attached_programs(&cgroup), 0, "nothing is attached");
}

/// Pins a 16-entry hash map named `name` with `key`- and `value`-byte entries where the
/// datapath pins its map of that name (a map another layout left); returns its path.
fn pin_hash_map(pin_dir: &Path, name: &str, key: u32, value: u32) -> PathBuf {
    let maps = pin_dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let path = maps.join(name);
    let (key, value) = (key.to_string(), value.to_string());
    let args = [
        "map",
        "create",
        path.to_str().unwrap(),
        "type",
        "hash",
        "key",
        &key,
        "value",
        &value,
        "entries",
        "16",
        "name",
        name,
    ];
    run("bpftool", &args);
    path
}

#[test]
fn a_pinned_per_socket_map_of_another_layout_is_replaced() {
    require_root!();
    let cgroup = Cgroup::new("repl");
    let bpffs = Bpffs::mounted();
    // An older agent's mesh_sock_rev (socket storage then; any other shape here).
    let stale = pin_hash_map(&bpffs.pin_dir("node"), "mesh_sock_rev", 4, 12);
    let dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    assert_eq!(attached_programs(&cgroup), 7);
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&stale)
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&shown["type"], &shown["bytes_key"], &shown["max_entries"]),
        (&"lru_hash".into(), &8.into(), &131072.into()),
        "{shown}"
    );
    drop(dp);
}

// === network policy ===

/// Identities of the policy tests' endpoints.
const ID_CLIENT_A: u32 = 1001;
const ID_SERVER: u32 = 1002;
const ID_CLIENT_B: u32 = 1003;
const ID_OTHER: u32 = 1004;
/// What a client reports when its connect or read timed out (no errno), and EAGAIN.
const TIMED_OUT: i32 = -1;
const EAGAIN: i32 = 11;

/// Two client namespaces (A, B) and a server namespace S joined by veth pairs; S holds the
/// server address and a second backend address on lo and routes to each client.
struct PolicyNet {
    a: Netns,
    b: Netns,
    s: Netns,
}

impl PolicyNet {
    fn new() -> Self {
        let (a, b, s) = (Netns::new("pa"), Netns::new("pb"), Netns::new("ps"));
        for (client, ip) in [(&a, "10.0.5.1"), (&b, "10.0.5.3")] {
            let (outer, inner) = (unique("po"), unique("pi"));
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &inner,
                    "netns",
                    &client.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &outer,
                    "netns",
                    &s.name,
                ],
            );
            client.ip(&["addr", "add", &format!("{ip}/32"), "dev", &inner]);
            client.ip(&["link", "set", &inner, "up"]);
            client.ip(&["route", "add", "10.0.5.0/24", "dev", &inner]);
            s.ip(&["link", "set", &outer, "up"]);
            s.ip(&["route", "add", &format!("{ip}/32"), "dev", &outer]);
        }
        s.ip(&["addr", "add", "10.0.5.2/32", "dev", "lo"]);
        s.ip(&["addr", "add", "10.0.5.4/32", "dev", "lo"]);
        Self { a, b, s }
    }
}

fn policy_identities() -> mesh_core::policy::IdentityTable {
    use mesh_core::{ClusterName, IdentityId, IdentityLabels};
    let cluster: ClusterName = "east".parse().unwrap();
    let mut t = mesh_core::policy::IdentityTable::new();
    for (id, app) in [
        (ID_CLIENT_A, "client-a"),
        (ID_SERVER, "server"),
        (ID_CLIENT_B, "client-b"),
        (ID_OTHER, "other"),
    ] {
        t.insert(
            IdentityId(id),
            IdentityLabels::for_pod(&cluster, "default", [("app", app)]),
        );
    }
    t
}

/// The policies of the test, as users write them.
fn policy_objects() -> Vec<serde_json::Value> {
    vec![
        // The server accepts client A only, on TCP 8080 and UDP 5353.
        serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "server-ingress", "namespace": "default"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{
                    "fromEndpoints": [{"matchLabels": {"app": "client-a"}}],
                    "toPorts": [{"ports": [
                        {"port": "8080", "protocol": "TCP"},
                        {"port": "5353", "protocol": "UDP"}
                    ]}]
                }]
            }
        }),
        // Client B may not reach the server's 8080 (it may reach everything else).
        serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "b-no-server", "namespace": "default"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "client-b"}},
                "enableDefaultDeny": {"egress": false},
                "egressDeny": [{
                    "toEndpoints": [{"matchLabels": {"app": "server"}}],
                    "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]
                }]
            }
        }),
        // Client A accepts nothing: replies to its own connections must still pass.
        serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "a-closed", "namespace": "default"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "client-a"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "nobody"}}]}]
            }
        }),
    ]
}

/// Compiles `objects` the way the agent does and returns the tables and the compiled form.
fn compile_policies(
    objects: &[serde_json::Value],
) -> (
    mesh_core::policy::PolicyTables,
    mesh_core::policy::CompiledPolicy,
) {
    let cluster: mesh_core::ClusterName = "east".parse().unwrap();
    let set: mesh_core::policy::PolicySet = objects
        .iter()
        .map(|o| mesh_core::policy::parse_policy(o, &cluster).unwrap())
        .collect();
    let compiled = mesh_core::policy::compile(&set, &policy_identities(), &cluster);
    (mesh_core::policy::policy_tables(&compiled), compiled)
}

/// The ipcache of the policy tests (every address of the test, with its identity).
fn program_policy_ipcache(dp: &mut Datapath) {
    for (ip, identity) in [
        ("10.0.5.1/32", ID_CLIENT_A),
        ("10.0.5.2/32", ID_SERVER),
        ("10.0.5.3/32", ID_CLIENT_B),
        ("10.0.5.4/32", ID_OTHER),
    ] {
        dp.upsert_ipcache(
            ip.parse().unwrap(),
            IpcacheValue {
                identity,
                tunnel_endpoint: None,
                cluster_id: 1,
                flags: 1,
            },
        )
        .unwrap();
    }
}

/// The local endpoints map the agent derives from its ipcache.
fn policy_endpoints() -> std::collections::BTreeMap<Ipv4Addr, u32> {
    [
        (Ipv4Addr::new(10, 0, 5, 1), ID_CLIENT_A),
        (Ipv4Addr::new(10, 0, 5, 2), ID_SERVER),
        (Ipv4Addr::new(10, 0, 5, 3), ID_CLIENT_B),
        (Ipv4Addr::new(10, 0, 5, 4), ID_OTHER),
    ]
    .into()
}

#[test]
fn policy_is_enforced_in_both_directions_for_tcp_and_udp() {
    require_root!();
    let cgroup = Cgroup::new("pol");
    let bpffs = Bpffs::mounted();
    let net = PolicyNet::new();
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    program_policy_ipcache(&mut dp);
    // Servers in the cgroup (their sockets get ingress policy); idle processes keep the
    // client namespaces in the cgroup for the agent's scan.
    let _servers = [
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.2:8080", "server"],
        ),
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.2:9090", "server-9090"],
        ),
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "udp-server",
            &["10.0.5.2:5353", "server-udp"],
        ),
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.4:8080", "other"],
        ),
        Proc::server_in(&net.a, Some(&cgroup), "idle", &[]),
        Proc::server_in(&net.b, Some(&cgroup), "idle", &[]),
    ];

    // The agent's path: compile, tables, namespaces of the cgroup, reconcile.
    let (tables, compiled) = compile_policies(&policy_objects());
    let mut scanner = mesh_agent::datapath::NetnsScanner::new(&cgroup.path);
    let namespaces = scanner.scan().unwrap();
    let (want, missing) =
        mesh_agent::policy::desired_policy(&tables, &namespaces, &policy_endpoints());
    // S holds two endpoint addresses; a namespace is named by the first (a pod has one).
    assert_eq!(
        missing,
        vec![Ipv4Addr::new(10, 0, 5, 4)],
        "every other namespace is found"
    );
    assert_eq!(want.netns.len(), 3, "A, B and S: {:?}", want.netns);
    let mut reconciler = mesh_agent::policy::PolicyReconciler::default();
    reconciler.reconcile(&mut dp, &want).unwrap();
    assert_eq!(
        dp.policy_dump().unwrap(),
        want,
        "the maps hold what was planned"
    );

    let tcp = |ns: &Netns, target: &str, timeout: u64| {
        Proc::client_with(
            ns,
            Some(&cgroup),
            "tcp-client",
            &[target, "1"],
            Some(timeout),
        )
    };
    let udp = |ns: &Netns, target: &str| {
        Proc::client_with(
            ns,
            Some(&cgroup),
            "udp-client",
            &[target, "unconnected", "1"],
            Some(500),
        )
    };
    let ok = |name: &str, peer: &str| {
        vec![Outcome::Ok {
            name: name.into(),
            peer: peer.parse().unwrap(),
        }]
    };

    // A -> S:8080 allowed by the server's ingress; the SYN-ACK reaches A although A's own
    // ingress allows nothing (replies pass).
    assert_eq!(
        tcp(&net.a, "10.0.5.2:8080", 3000),
        ok("server", "10.0.5.2:8080")
    );
    // B -> S:8080: B's egress deny refuses the connect at once.
    assert_eq!(
        tcp(&net.b, "10.0.5.2:8080", 3000),
        vec![Outcome::Err { errno: EPERM }]
    );
    // B -> S:9090: B's egress allows it, the server's ingress drops the SYN.
    assert_eq!(
        tcp(&net.b, "10.0.5.2:9090", 500),
        vec![Outcome::Err { errno: TIMED_OUT }]
    );
    // A -> S:9090: not in the server's allowed ports either.
    assert_eq!(
        tcp(&net.a, "10.0.5.2:9090", 500),
        vec![Outcome::Err { errno: TIMED_OUT }]
    );
    // UDP: A's datagram is allowed in and S's reply reaches A (A's ingress is closed);
    // B's datagram is dropped at S.
    assert_eq!(
        udp(&net.a, "10.0.5.2:5353"),
        ok("server-udp", "10.0.5.2:5353")
    );
    assert_eq!(
        udp(&net.b, "10.0.5.2:5353"),
        vec![Outcome::Err { errno: EAGAIN }]
    );
    // An endpoint no policy selects for ingress accepts everyone.
    assert_eq!(
        tcp(&net.b, "10.0.5.4:8080", 3000),
        ok("other", "10.0.5.4:8080")
    );

    // Each verdict the kernel gave agrees with the pure lookup, rule included.
    let counters = dp.policy_counters().unwrap();
    let dir = |d: u8| {
        if d == 0 {
            mesh_core::policy::Direction::Ingress
        } else {
            mesh_core::policy::Direction::Egress
        }
    };
    for (k, c) in &counters {
        assert!(c.packets > 0);
        let port_proto = match (k.direction, k.local, k.remote, k.verdict) {
            (1, ID_CLIENT_B, ID_SERVER, 2) => (8080, mesh_core::Protocol::Tcp),
            _ => continue,
        };
        let (verdict, rule) = mesh_core::policy::decide_tables(
            &tables,
            mesh_core::IdentityId(k.local),
            dir(k.direction),
            mesh_core::IdentityId(k.remote),
            port_proto.1,
            port_proto.0,
        );
        assert_eq!(k.verdict, 2, "{k:?}");
        assert_eq!(verdict, mesh_core::policy::Verdict::Deny);
        assert_eq!(rule, Some(k.rule));
    }
    let denied_egress = counters
        .keys()
        .find(|k| {
            k.direction == 1 && k.local == ID_CLIENT_B && k.remote == ID_SERVER && k.verdict == 2
        })
        .expect("the egress denial is counted");
    let rule_name = &want.rules[&denied_egress.rule];
    assert!(
        rule_name.contains("b-no-server") && rule_name.contains("egressDeny[0]"),
        "{rule_name}"
    );
    let decided = mesh_core::policy::decide(
        &compiled,
        mesh_core::IdentityId(ID_CLIENT_B),
        mesh_core::policy::Direction::Egress,
        mesh_core::IdentityId(ID_SERVER),
        mesh_core::Protocol::Tcp,
        8080,
    );
    assert_eq!(decided.reason.to_string(), *rule_name);
    let dropped_ingress: u64 = counters
        .iter()
        .filter(|(k, _)| k.direction == 0 && k.local == ID_SERVER && k.verdict == 2)
        .map(|(_, c)| c.packets)
        .sum();
    assert!(
        dropped_ingress >= 3,
        "SYNs and a datagram dropped at the server: {counters:?}"
    );

    // Removing the policies opens everything again, with the same reconciler.
    let (empty, _) = compile_policies(&[]);
    let (want, _) = mesh_agent::policy::desired_policy(&empty, &namespaces, &policy_endpoints());
    reconciler.reconcile(&mut dp, &want).unwrap();
    assert!(dp.policy_dump().unwrap().entries.is_empty());
    assert_eq!(
        tcp(&net.b, "10.0.5.2:8080", 3000),
        ok("server", "10.0.5.2:8080")
    );
    assert_eq!(
        tcp(&net.b, "10.0.5.2:9090", 3000),
        ok("server-9090", "10.0.5.2:9090")
    );
}

#[test]
fn service_connections_go_to_a_backend_the_client_may_reach() {
    require_root!();
    let cgroup = Cgroup::new("psvc");
    let bpffs = Bpffs::mounted();
    let net = PolicyNet::new();
    let config = DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path);
    let mut dp = Datapath::open(config.clone()).unwrap();
    program_policy_ipcache(&mut dp);
    let _procs = [
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.2:8080", "server"],
        ),
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.4:8080", "other"],
        ),
        Proc::server_in(&net.a, Some(&cgroup), "idle", &[]),
        Proc::server_in(&net.b, Some(&cgroup), "idle", &[]),
    ];
    let (frontend, vip) = tcp_frontend();
    program_service(
        &mut dp,
        frontend,
        &[
            (1, Ipv4Addr::new(10, 0, 5, 2), 8080),
            (2, Ipv4Addr::new(10, 0, 5, 4), 8080),
        ],
    );
    // Only B's egress deny to the server: the server's ingress stays open here.
    let (tables, _) = compile_policies(&policy_objects()[1..2]);
    let namespaces = mesh_agent::datapath::NetnsScanner::new(&cgroup.path)
        .scan()
        .unwrap();
    let (want, _) = mesh_agent::policy::desired_policy(&tables, &namespaces, &policy_endpoints());
    mesh_agent::policy::PolicyReconciler::default()
        .reconcile(&mut dp, &want)
        .unwrap();

    let connect =
        |ns: &Netns, n: &str| Proc::client(ns, Some(&cgroup), "tcp-client", &[&vip.to_string(), n]);
    // A (no egress policy) uses both backends; B only the one it may reach, every time.
    assert_eq!(
        names(&connect(&net.a, "30"), vip),
        BTreeSet::from(["other".to_owned(), "server".to_owned()])
    );
    let b = connect(&net.b, "30");
    assert_eq!(b.len(), 30);
    assert_eq!(names(&b, vip), BTreeSet::from(["other".to_owned()]));

    // With the allowed backend gone, B's connect is refused at once.
    program_service(&mut dp, frontend, &[(1, Ipv4Addr::new(10, 0, 5, 2), 8080)]);
    assert_eq!(connect(&net.b, "3"), vec![Outcome::Err { errno: EPERM }; 3]);

    // An agent restart keeps enforcing: the pinned maps and links serve while no agent
    // runs, and the reopened agent's reconcile finds nothing to change.
    dp.close();
    assert_eq!(connect(&net.b, "3"), vec![Outcome::Err { errno: EPERM }; 3]);
    let mut dp = Datapath::open(config).unwrap();
    assert!(dp.links().iter().all(|l| l.state == LinkState::Reused));
    assert_eq!(connect(&net.b, "3"), vec![Outcome::Err { errno: EPERM }; 3]);
    let counts = mesh_agent::policy::PolicyReconciler::default()
        .reconcile(&mut dp, &want)
        .unwrap();
    assert!(
        counts.is_empty(),
        "nothing to rewrite after a restart: {counts:?}"
    );
    assert_eq!(
        names(&connect(&net.a, "3"), vip),
        BTreeSet::from(["server".to_owned()])
    );
}

/// Every record in the ring buffer now.
fn drain(
    events: &mut mesh_agent::datapath::EventMaps,
) -> Vec<mesh_agent::datapath::layout::FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = events.ring.next() {
        out.push(mesh_agent::datapath::layout::FlowEvent::from_bytes(&item).expect("record size"));
    }
    out
}

#[test]
fn flow_events_record_connections_and_drops_and_count_what_is_lost() {
    use mesh_agent::datapath::layout as l;
    require_root!();
    let cgroup = Cgroup::new("fev");
    let bpffs = Bpffs::mounted();
    let net = PolicyNet::new();
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    let mut events = dp.take_events().unwrap();
    // Events are off until the agent sets a rate: nothing is recorded.
    program_policy_ipcache(&mut dp);
    let _procs = [
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.2:8080", "server"],
        ),
        Proc::server_in(
            &net.s,
            Some(&cgroup),
            "tcp-server",
            &["10.0.5.4:8080", "other"],
        ),
        Proc::server_in(&net.a, Some(&cgroup), "idle", &[]),
        Proc::server_in(&net.b, Some(&cgroup), "idle", &[]),
    ];
    let (frontend, vip) = tcp_frontend();
    program_service(&mut dp, frontend, &[(1, Ipv4Addr::new(10, 0, 5, 2), 8080)]);
    let (tables, _) = compile_policies(&policy_objects()[1..2]);
    let namespaces = mesh_agent::datapath::NetnsScanner::new(&cgroup.path)
        .scan()
        .unwrap();
    let (want, _) = mesh_agent::policy::desired_policy(&tables, &namespaces, &policy_endpoints());
    mesh_agent::policy::PolicyReconciler::default()
        .reconcile(&mut dp, &want)
        .unwrap();
    let connect =
        |ns: &Netns, n: &str| Proc::client(ns, Some(&cgroup), "tcp-client", &[&vip.to_string(), n]);
    assert_eq!(connect(&net.a, "1").len(), 1);
    assert!(drain(&mut events).is_empty(), "events are off by default");

    events.control.configure(1_000_000, 1_000_000).unwrap();
    // A reaches the server through the service: its connect() is translated (egress record)
    // and the server's SYN arrives at a local endpoint (ingress record).
    let a = connect(&net.a, "2");
    assert!(
        a.iter()
            .all(|o| matches!(o, Outcome::Ok { name, .. } if name == "server"))
    );
    // B's egress policy denies the only backend: refused by the deny rule.
    assert_eq!(connect(&net.b, "3"), vec![Outcome::Err { errno: EPERM }; 3]);
    let got = drain(&mut events);
    let be = |ip: [u8; 4]| u32::from(Ipv4Addr::from(ip)).to_be();
    let SocketAddr::V4(vip4) = vip else {
        unreachable!("an IPv4 frontend")
    };
    let vip_be = u32::from(*vip4.ip()).to_be();
    let egress_a: Vec<_> = got
        .iter()
        .filter(|e| e.direction == l::DIRECTION_EGRESS && e.src_identity == ID_CLIENT_A)
        .collect();
    assert_eq!(egress_a.len(), 2, "{got:#?}");
    for e in &egress_a {
        assert_eq!(e.verdict, l::EVENT_FORWARDED);
        assert_eq!(e.flags & l::EVENT_F_TRANSLATED, l::EVENT_F_TRANSLATED);
        assert_eq!(
            (e.src_ip, e.dst_ip, u16::from_be(e.dst_port)),
            (be([10, 0, 5, 1]), be([10, 0, 5, 2]), 8080)
        );
        assert_eq!((e.orig_ip, e.orig_port), (vip_be, vip.port().to_be()));
        // program_service puts its backends in cluster 1.
        assert_eq!(
            (e.dst_identity, e.proto, e.backend_cluster),
            (ID_SERVER, 6, 1)
        );
        assert!(e.time_ns > 0 && e.cookie != 0);
    }
    let ingress: Vec<_> = got
        .iter()
        .filter(|e| e.direction == l::DIRECTION_INGRESS && e.dst_identity == ID_SERVER)
        .collect();
    assert_eq!(ingress.len(), 2, "{got:#?}");
    for e in &ingress {
        assert_eq!(
            (e.src_identity, e.src_ip, e.verdict),
            (ID_CLIENT_A, be([10, 0, 5, 1]), l::EVENT_FORWARDED)
        );
        assert_ne!(e.src_port, 0, "the SYN carries the client's port");
        assert_eq!(u16::from_be(e.dst_port), 8080);
    }
    let deny_rule = tables
        .rules
        .iter()
        .find(|(_, r)| r.policy.name == "b-no-server")
        .map(|(id, _)| *id)
        .unwrap();
    let denied: Vec<_> = got
        .iter()
        .filter(|e| e.src_identity == ID_CLIENT_B)
        .collect();
    assert_eq!(denied.len(), 3, "{got:#?}");
    for e in &denied {
        assert_eq!(
            (e.verdict, e.reason, e.rule),
            (l::EVENT_DROPPED, l::DROP_POLICY_RULE, deny_rule)
        );
        assert_eq!(
            (e.direction, e.dst_identity),
            (l::DIRECTION_EGRESS, ID_SERVER)
        );
    }
    assert_eq!(got.len(), 2 + 2 + 3, "nothing else: {got:#?}");
    let c0 = events.control.counters().unwrap();
    assert_eq!((c0.emitted, c0.lost_ring_full, c0.rate_limited), (7, 0, 0));

    // A full ring: records the reader did not take are counted, none silently dropped.
    let record = std::mem::size_of::<l::FlowEvent>() as u64 + 8; // + ring buffer header
    let room = u64::from(l::EVENTS_RING_BYTES) / record;
    let n = room + 2000;
    let out = connect(&net.b, &n.to_string());
    assert_eq!(out.len() as u64, n);
    let c1 = events.control.counters().unwrap();
    let (emitted, lost) = (
        c1.emitted - c0.emitted,
        c1.lost_ring_full - c0.lost_ring_full,
    );
    assert_eq!(emitted + lost, n, "{c1:?}");
    assert!(lost >= 2000 && emitted <= room, "{c1:?}");
    assert_eq!(drain(&mut events).len() as u64, emitted);

    // Over the rate: a CPU writes its burst, then one record per token.
    events.control.configure(1, 5).unwrap();
    let c2 = events.control.counters().unwrap();
    assert_eq!(connect(&net.b, "50").len(), 50);
    let c3 = events.control.counters().unwrap();
    let (emitted, limited) = (c3.emitted - c2.emitted, c3.rate_limited - c2.rate_limited);
    assert_eq!(emitted + limited, 50, "{c3:?}");
    assert!(limited >= 40, "{c3:?}");
}

#[test]
fn sock_ops_counts_failed_connects_per_backend_and_successes_after_them() {
    require_root!();
    let cgroup = Cgroup::new("hlth");
    let bpffs = Bpffs::mounted();
    let net = TwoBackends::new("hlth");
    let mut dp = Datapath::open(DatapathConfig::new(bpffs.pin_dir("node"), &cgroup.path)).unwrap();
    let (frontend, vip) = tcp_frontend();
    // Backend A answers; 10.0.1.3 is an address of the namespace with no listener: refused.
    net.netns.ip(&["addr", "add", "10.0.1.3/32", "dev", "lo"]);
    program_service(&mut dp, frontend, &[(1, BACKEND_A, 8080)]);
    let connect = |n: &str| {
        Proc::client(
            &net.netns,
            Some(&cgroup),
            "tcp-client",
            &[&vip.to_string(), n],
        )
    };
    assert!(connect("4").iter().all(|o| matches!(o, Outcome::Ok { .. })));
    program_service(&mut dp, frontend, &[(2, Ipv4Addr::new(10, 0, 1, 3), 8080)]);
    assert!(
        connect("3")
            .iter()
            .all(|o| matches!(o, Outcome::Err { .. }))
    );
    // A direct connect (not translated by socket LB) is not a backend's health.
    let direct = Proc::client(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &["10.0.1.3:8080", "2"],
    );
    assert!(direct.iter().all(|o| matches!(o, Outcome::Err { .. })));
    let counters = |dp: &Datapath| -> std::collections::BTreeMap<(Ipv4Addr, u16), (u64, u64)> {
        dp.health_counters()
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                (
                    (Ipv4Addr::from(u32::from_be(k.ip)), u16::from_be(k.port)),
                    (v.successes, v.failures),
                )
            })
            .collect()
    };
    // Successes of a backend with no failure on record make no entry (nothing to heal).
    assert_eq!(
        counters(&dp),
        std::collections::BTreeMap::from([((Ipv4Addr::new(10, 0, 1, 3), 8080), (0, 3))])
    );
    // Once it has failed, its successes are counted (the agent heals it on them).
    let _back = Proc::server(&net.netns, "tcp-server", &["10.0.1.3:8080", "back"]);
    assert!(connect("2").iter().all(|o| matches!(o, Outcome::Ok { .. })));
    assert_eq!(
        counters(&dp),
        std::collections::BTreeMap::from([((Ipv4Addr::new(10, 0, 1, 3), 8080), (2, 3))])
    );

    // A connect the application gives up while its SYN goes unanswered (routed into a
    // veth whose peer is down, which drops it) is a failure, counted once: when the socket
    // is released in SYN_SENT (its translation is gone by the time sock_ops sees SYN_SENT
    // -> CLOSE).
    let silent = Ipv4Addr::new(10, 0, 9, 9);
    net.netns.ip(&[
        "link", "add", "silent0", "type", "veth", "peer", "name", "silent1",
    ]);
    net.netns.ip(&["link", "set", "silent0", "up"]);
    net.netns
        .ip(&["route", "add", "10.0.9.9/32", "dev", "silent0"]);
    program_service(&mut dp, frontend, &[(3, silent, 8080)]);
    let gave_up = Proc::client_with(
        &net.netns,
        Some(&cgroup),
        "tcp-client",
        &[&vip.to_string(), "2"],
        Some(300),
    );
    assert!(
        gave_up.iter().all(|o| matches!(o, Outcome::Err { .. })),
        "{gave_up:?}"
    );
    assert_eq!(counters(&dp).get(&(silent, 8080)), Some(&(0, 2)));
    assert_eq!(sock_rev_entries(&bpffs.pin_dir("node")), 0);
}
