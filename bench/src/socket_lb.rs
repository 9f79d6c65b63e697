//! `socket-lb`: DESIGN.md section 12's socket-LB numbers. TCP connect() from a pod network
//! namespace, three ways, with the same N services (default 1000 and 10000, each with
//! `--backends-per-service` backends):
//!
//! - **socket-lb**: connect() to a service VIP, translated at connect() by the agent's
//!   cgroup programs (`mesh_agent::datapath::Datapath`, maps programmed through its batch
//!   API) attached to the client's cgroup;
//! - **direct**: connect() straight to a backend address from the same cgroup (the programs
//!   run and find no service);
//! - **nft-dnat**: connect() to a service VIP from a second client namespace, in a cgroup
//!   without the programs, where nftables rules shaped like kube-proxy's nftables mode DNAT
//!   it: one verdict-map element per service (`ip daddr . tcp dport vmap @service_ips`) to
//!   the service's chain, which picks a backend with `numgen random mod <count>`.
//!
//! Topology (all created here, removed on drop, also on Ctrl-C): a server namespace that
//! owns the backends' /16 as local addresses (`ip route add local`), with one listener on
//! 0.0.0.0; a client namespace per side, each wired to the server by a veth pair. The DNAT
//! side has its own namespace so the socket-LB and direct sides do not pay for netfilter's
//! conntrack and NAT hooks, which a node using socket LB instead of kube-proxy does not run.
//! Each measurement is a `mesh-bench socket-lb-client` process started with `nsenter --net`
//! (not `ip netns exec`, which remounts /sys and hides the cgroup mount) that moves itself
//! into its cgroup, then times `--connects` connect() calls over consecutive services (each
//! closed with a reset: no TIME_WAIT, so the port search is not measured). Rounds alternate
//! the three sides in a rotating order, so drift of the machine cancels out of the ratios.
//! Nothing is asserted about speed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_agent::datapath::{
    BackendValue, Datapath, DatapathConfig, PROTO_TCP, ProgramStats, RunTimeStats, ServiceEntryKey,
    ServiceEntryValue,
};

use crate::env::{Bpffs, Cgroup, Proc};
use crate::report::{Figure, Machine, Report, Target, percentile};

/// Service VIPs: `SERVICE_NET + i`, port 80.
const SERVICE_NET: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_PORT: u16 = 80;
/// Backends: `BACKEND_NET + 1 + id`, all local addresses of the server namespace.
const BACKEND_NET: u32 = u32::from_be_bytes([10, 201, 0, 0]);
const BACKEND_PORT: u16 = 8080;
/// Connects before the timed ones (page faults, the listener's first accepts).
const WARMUP: usize = 200;

#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Numbers of services to measure with (comma-separated, each at most 65000 / backends).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub services: Vec<usize>,
    /// Backends of each service.
    #[arg(long, default_value_t = 3)]
    pub backends_per_service: usize,
    /// Timed connect() calls per side and round.
    #[arg(long, default_value_t = 5000)]
    pub connects: usize,
    /// Rounds per size (each measures the three sides, in a rotating order).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            services: vec![1000, 10000],
            backends_per_service: 3,
            connects: 5000,
            rounds: 5,
        }
    }
}

/// What a client process connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientTarget {
    /// Service VIPs (translated by socket LB or DNAT'ed by nftables).
    Vip,
    /// Backend addresses.
    Backend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    SocketLb,
    Direct,
    Dnat,
}

impl Side {
    const ALL: [Side; 3] = [Side::SocketLb, Side::Direct, Side::Dnat];

    fn name(self) -> &'static str {
        match self {
            Side::SocketLb => "socket-lb",
            Side::Direct => "direct",
            Side::Dnat => "nft-dnat",
        }
    }
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(SERVICE_NET + i as u32)
}

fn backend_ip(id: usize) -> Ipv4Addr {
    Ipv4Addr::from(BACKEND_NET + 1 + id as u32)
}

// === the client process ===

/// One blocking connect() to `addr`, timed, then closed with a reset (SO_LINGER 0): no
/// TIME_WAIT, so a long run never makes the kernel search for a free ephemeral port (with
/// the range full of TIME_WAIT sockets to one destination, each connect() spins for
/// milliseconds in that search, which is not what a benchmark of connect() means to time).
pub(crate) fn timed_connect(addr: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let s = TcpStream::connect(addr)?;
    let e = t.elapsed();
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    drop(s);
    Ok(e)
}

/// `mesh-bench socket-lb-client`: joins `cgroup`, connects `WARMUP` + `count` times to
/// consecutive services (or one of their backends) from `start`, and prints the loop's
/// wall time and then each timed connect(), in nanoseconds, on one line.
pub fn client(
    cgroup: &Path,
    target: ClientTarget,
    services: usize,
    backends: usize,
    count: usize,
    start: usize,
) -> Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    let addr = |k: usize| -> SocketAddr {
        let i = (start + k) % services;
        match target {
            ClientTarget::Vip => SocketAddrV4::new(vip(i), SERVICE_PORT).into(),
            ClientTarget::Backend => {
                SocketAddrV4::new(backend_ip(i * backends + k % backends), BACKEND_PORT).into()
            }
        }
    };
    let connect = |k: usize| -> Result<Duration> {
        let a = addr(k);
        timed_connect(a).with_context(|| format!("connect #{k} to {a}"))
    };
    for k in 0..WARMUP {
        connect(count + k)?;
    }
    let mut out = String::with_capacity(count * 8);
    let t0 = Instant::now();
    let mut times = Vec::with_capacity(count);
    for k in 0..count {
        times.push(connect(k)?);
    }
    out.push_str(&t0.elapsed().as_nanos().to_string());
    for t in times {
        out.push(' ');
        out.push_str(&t.as_nanos().to_string());
    }
    println!("{out}");
    Ok(())
}

/// One client run: the loop's wall time and each connect()'s, and the time the kernel
/// accounted to each of the datapath's programs during the run (warm-up included).
#[derive(Debug, Clone, PartialEq)]
struct Run {
    wall: Duration,
    connects: Vec<Duration>,
    programs: Vec<ProgramStats>,
}

/// The programs whose time a connect() pays, with the close that ends it (sock_release), as
/// the benchmarks report them (socket-lb, policy); the first runs once per connect().
pub(crate) const PROGRAMS: [&str; 4] = [
    "mesh_connect4",
    "mesh_sock_ops",
    "mesh_policy_ingress",
    "mesh_sock_release",
];

/// `after - before` per program (both from [`Datapath::program_stats`]).
fn program_delta(before: &[ProgramStats], after: &[ProgramStats]) -> Vec<ProgramStats> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.name == a.name);
            ProgramStats {
                name: a.name.clone(),
                run_time: a
                    .run_time
                    .saturating_sub(b.map_or(Duration::ZERO, |b| b.run_time)),
                run_count: a.run_count - b.map_or(0, |b| b.run_count),
            }
        })
        .collect()
}

impl Run {
    fn rate(&self) -> f64 {
        self.connects.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Parses the client's line (see [`client`]).
fn parse_run(line: &str) -> Result<Run> {
    let mut nums = line.split_whitespace().map(|w| {
        w.parse::<u64>()
            .map(Duration::from_nanos)
            .with_context(|| format!("{w:?} is not a number of nanoseconds"))
    });
    let wall = nums.next().context("the client printed nothing")??;
    let connects = nums.collect::<Result<Vec<_>>>()?;
    if connects.is_empty() {
        bail!("the client timed no connect()");
    }
    Ok(Run {
        wall,
        connects,
        programs: Vec::new(),
    })
}

// === the server process ===

/// `mesh-bench socket-lb-server`: accepts on 0.0.0.0:`port` until killed.
pub fn server(port: u16) -> Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    // A deep accept queue (somaxconn is raised in the namespace): a full one drops SYNs, and
    // each drop costs a 1 s retransmit in the figures.
    socket.listen(65535)?;
    let listener: TcpListener = socket.into();
    println!("listening on {}", listener.local_addr()?);
    for s in listener.incoming() {
        drop(s);
    }
    Ok(())
}

// === topology guards ===

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace (`ip netns add`); deleted, with its veths, routes and nftables
/// tables, on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = crate::env::unique(&format!("mesh-slb-{tag}"));
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Netns { name })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command in the namespace.
    fn exec(&self, args: &[&str]) -> Result<()> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Wires `client` to `server` with a veth pair on 192.168.`subnet`.0/24 (server .1, client
/// .2); the client routes everything through the server.
fn wire(server: &Netns, client: &Netns, subnet: u8) -> Result<()> {
    let (s, c) = (format!("slbs{subnet}"), format!("slbc{subnet}"));
    run_cmd(Command::new("ip").args([
        "link",
        "add",
        &s,
        "netns",
        &server.name,
        "type",
        "veth",
        "peer",
        "name",
        &c,
        "netns",
        &client.name,
    ]))?;
    server.exec(&[
        "ip",
        "addr",
        "add",
        &format!("192.168.{subnet}.1/24"),
        "dev",
        &s,
    ])?;
    server.exec(&["ip", "link", "set", &s, "up"])?;
    client.exec(&[
        "ip",
        "addr",
        "add",
        &format!("192.168.{subnet}.2/24"),
        "dev",
        &c,
    ])?;
    client.exec(&["ip", "link", "set", &c, "up"])?;
    client.exec(&["ip", "link", "set", "lo", "up"])?;
    client.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("192.168.{subnet}.1"),
    ])?;
    Ok(())
}

/// nftables rules for services `from..to`, as kube-proxy's nftables mode shapes them: the
/// VIP:port verdict map jumps to the service's chain, which DNATs to a random backend.
fn nft_services(from: usize, to: usize, backends: usize, first: bool) -> String {
    let mut s = String::new();
    if first {
        s.push_str(
            "table ip mesh_bench {\n  map service_ips { type ipv4_addr . inet_service : verdict; }\n  \
             chain output { type nat hook output priority -100; policy accept; \
             ip daddr . tcp dport vmap @service_ips; }\n}\n",
        );
    }
    for i in from..to {
        let targets: Vec<String> = (0..backends)
            .map(|j| format!("{j} : {} . {BACKEND_PORT}", backend_ip(i * backends + j)))
            .collect();
        s.push_str(&format!(
            "add chain ip mesh_bench svc_{i}\nadd rule ip mesh_bench svc_{i} meta l4proto tcp \
             dnat ip to numgen random mod {backends} map {{ {} }}\n\
             add element ip mesh_bench service_ips {{ {} . {SERVICE_PORT} : goto svc_{i} }}\n",
            targets.join(", "),
            vip(i)
        ));
    }
    s
}

/// Everything the benchmark made; dropped in reverse order of creation.
struct Topology {
    server_proc: Proc,
    datapath: Datapath,
    _bpffs: Bpffs,
    lb_cgroup: Cgroup,
    plain_cgroup: Cgroup,
    lb_ns: Netns,
    nat_ns: Netns,
    _server_ns: Netns,
    programmed: usize,
    logs: tempfile::TempDir,
}

impl Topology {
    fn new(self_exe: &Path) -> Result<Self> {
        let logs = tempfile::Builder::new()
            .prefix("mesh-bench-slb-")
            .tempdir()?;
        let server_ns = Netns::new("srv")?;
        let lb_ns = Netns::new("lb")?;
        let nat_ns = Netns::new("nat")?;
        server_ns.exec(&["ip", "link", "set", "lo", "up"])?;
        server_ns.exec(&[
            "ip",
            "route",
            "add",
            "local",
            &format!("{}/16", Ipv4Addr::from(BACKEND_NET)),
            "dev",
            "lo",
        ])?;
        server_ns.exec(&["sysctl", "-qw", "net.core.somaxconn=65535"])?;
        server_ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_max_syn_backlog=65535"])?;
        wire(&server_ns, &lb_ns, 251)?;
        wire(&server_ns, &nat_ns, 252)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", server_ns.path().display()))
            .arg("--")
            .arg(self_exe)
            .args(["socket-lb-server", "--port", &BACKEND_PORT.to_string()]);
        let server_proc = Proc::spawn("socket-lb server", cmd, logs.path().join("server.log"))?;
        let lb_cgroup = Cgroup::new("slb")?;
        let plain_cgroup = Cgroup::new("slb-plain")?;
        let bpffs = Bpffs::mount("slb")?;
        let datapath = Datapath::open(DatapathConfig::new(bpffs.pin_dir(), &lb_cgroup.path))
            .context("loading the socket-LB programs")?;
        let t = Topology {
            server_proc,
            datapath,
            _bpffs: bpffs,
            lb_cgroup,
            plain_cgroup,
            lb_ns,
            nat_ns,
            _server_ns: server_ns,
            programmed: 0,
            logs,
        };
        // Wait for the listener (the first line of its log).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.server_proc.log_text().contains("listening") {
            if Instant::now() > deadline {
                bail!("the server did not listen: {}", t.server_proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t)
    }

    /// Adds services `programmed..n` to the socket-LB maps and the DNAT rules.
    fn grow(&mut self, n: usize, backends: usize) -> Result<()> {
        let from = self.programmed;
        if n <= from {
            return Ok(());
        }
        let mut be = Vec::with_capacity((n - from) * backends);
        let mut slots = Vec::with_capacity((n - from) * (backends + 1));
        let mut masters = Vec::with_capacity(n - from);
        for i in from..n {
            let frontend = ServiceEntryKey::master(vip(i), SERVICE_PORT, PROTO_TCP);
            for j in 0..backends {
                let id = i * backends + j;
                let backend = BackendValue {
                    ip: backend_ip(id),
                    port: BACKEND_PORT,
                    proto: PROTO_TCP,
                    cluster_id: 1,
                    flags: 0,
                };
                be.push((id as u32 + 1, backend));
                slots.push((
                    frontend.with_slot(j as u16 + 1),
                    ServiceEntryValue::backend(id as u32 + 1, backend),
                ));
            }
            masters.push((frontend, ServiceEntryValue::master(backends as u16)));
        }
        // The agent's order: backends, then slots, then the masters' counts.
        self.datapath.upsert_backends(&be)?;
        self.datapath.upsert_service_slots(&slots)?;
        self.datapath.upsert_service_slots(&masters)?;
        let rules = self.logs.path().join(format!("services-{n}.nft"));
        std::fs::write(&rules, nft_services(from, n, backends, from == 0))?;
        self.nat_ns
            .exec(&["nft", "-f", &rules.display().to_string()])
            .context("loading the DNAT rules")?;
        self.programmed = n;
        Ok(())
    }

    fn measure(
        &mut self,
        self_exe: &Path,
        side: Side,
        services: usize,
        backends: usize,
        connects: usize,
        start: usize,
    ) -> Result<Run> {
        self.server_proc.check_running()?;
        let (ns, cgroup, target) = match side {
            Side::SocketLb => (&self.lb_ns, &self.lb_cgroup, "vip"),
            Side::Direct => (&self.lb_ns, &self.lb_cgroup, "backend"),
            Side::Dnat => (&self.nat_ns, &self.plain_cgroup, "vip"),
        };
        let before = self.datapath.program_stats()?;
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(self_exe)
            .arg("socket-lb-client")
            .arg("--cgroup")
            .arg(&cgroup.path)
            .args(["--target", target])
            .args(["--services", &services.to_string()])
            .args(["--backends", &backends.to_string()])
            .args(["--count", &connects.to_string()])
            .args(["--start", &start.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("running the client")?;
        if !out.status.success() {
            bail!(
                "the {} client failed ({}): {}",
                side.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut run = parse_run(&String::from_utf8_lossy(&out.stdout))?;
        run.programs = program_delta(&before, &self.datapath.program_stats()?);
        Ok(run)
    }
}

// === the benchmark ===

pub async fn run(opts: &Opts, machine: &Machine) -> Result<Report> {
    let opts = opts.clone();
    let machine = machine.clone();
    // Blocking processes and map writes: off the runtime's threads. Ctrl-C drops the
    // JoinHandle only, so the thread is told to stop through `stop` and its guards clean up.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guard = StopOnDrop(stop.clone());
    let r = tokio::task::spawn_blocking(move || run_blocking(&opts, machine, &stop))
        .await
        .context("the socket-lb benchmark's thread")?;
    drop(guard);
    r
}

/// Sets the flag when the benchmark's future is dropped (Ctrl-C).
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn pct_us(v: &[Duration], p: f64) -> f64 {
    let mut us: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    percentile(&us, p)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn run_blocking(
    opts: &Opts,
    machine: Machine,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Report> {
    let b = opts.backends_per_service;
    let mut sizes = opts.services.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if b == 0 || b > 255 {
        bail!("--backends-per-service must be 1..=255");
    }
    if sizes.iter().any(|&n| n == 0 || n * b > 65000) {
        bail!("services x backends must be 1..=65000 (the backends share one /16)");
    }
    if opts.rounds == 0 || opts.connects == 0 {
        bail!("--rounds and --connects must be at least 1");
    }
    let self_exe = std::env::current_exe().context("mesh-bench's own path")?;
    crate::step("socket-lb: creating the namespaces, cgroups and datapath");
    let mut topo = Topology::new(&self_exe)?;
    let mut report = Report::new(
        "socket-lb",
        machine,
        "wall clock of connect() in a client process per side and round (nsenter into the \
         client netns, joined to its cgroup); rate = timed connects / loop time; consecutive \
         services per connect, closed with RST; sides alternate in rotating order per round; \
         ratios are medians of per-round ratios",
    );
    report.param("services", &sizes);
    report.param("backends_per_service", b);
    report.param("connects", opts.connects);
    report.param("rounds", opts.rounds);
    report.param(
        "dnat",
        "nft: vmap ip daddr . tcp dport -> per-service chain, numgen random dnat map",
    );
    for &n in &sizes {
        crate::step(&format!(
            "socket-lb: programming {n} services x {b} backends"
        ));
        topo.grow(n, b)?;
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 3];
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
        let (mut vs_direct, mut vs_dnat) = (Vec::new(), Vec::new());
        let mut progress = crate::Progress::new(&format!("socket-lb {n} services"), opts.rounds);
        for round in 0..opts.rounds {
            let mut rate = [0.0; 3];
            for k in 0..3 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    bail!("interrupted");
                }
                let s = (round + k) % 3;
                let start = (round * opts.connects) % n;
                let r = topo.measure(&self_exe, Side::ALL[s], n, b, opts.connects, start)?;
                rate[s] = r.rate();
                rates[s].push(r.rate());
                samples[s].extend(r.connects);
            }
            vs_direct.push((1.0 - rate[0] / rate[1]) * 100.0);
            vs_dnat.push(rate[0] / rate[2]);
            progress.set(round + 1);
        }
        progress.finish();
        // Where a connect()'s eBPF time goes: one more run of the two sides with programs,
        // with the kernel's per-program accounting on (two clock reads per program run, so
        // not during the timed rounds). Warm-up connects included.
        let mut prog_time = vec![vec![(Duration::ZERO, 0u64); PROGRAMS.len()]; 2];
        {
            let _stats = RunTimeStats::enable()?;
            for (s, side) in [Side::SocketLb, Side::Direct].into_iter().enumerate() {
                let r = topo.measure(&self_exe, side, n, b, opts.connects, 0)?;
                for (p, name) in PROGRAMS.iter().enumerate() {
                    if let Some(d) = r.programs.iter().find(|d| d.name == *name) {
                        prog_time[s][p] = (d.run_time, d.run_count);
                    }
                }
            }
        }
        report.figures.push(Figure::new(
            &format!("{n} services: connect() calls timed per side"),
            samples.iter().map(Vec::len).min().unwrap_or(0) as f64,
            "connects",
        ));
        for (s, side) in Side::ALL.iter().enumerate() {
            let name = format!("{n} services: {}", side.name());
            report.figures.push(Figure::new(
                &format!("{name} connect rate (median round)"),
                median(rates[s].clone()).round(),
                "connects/s",
            ));
            for p in [50.0, 90.0, 99.0] {
                report.figures.push(Figure::new(
                    &format!("{name} connect() p{p}"),
                    (pct_us(&samples[s], p) * 10.0).round() / 10.0,
                    "us",
                ));
            }
        }
        for s in [0, 1] {
            let connects = prog_time[s][0].1.max(1) as f64;
            let ns = |t: Duration| (t.as_nanos() as f64 / connects).round();
            let total: Duration = prog_time[s].iter().map(|p| p.0).sum();
            report.figures.push(Figure::new(
                &format!(
                    "{n} services: {} eBPF time per connect()",
                    Side::ALL[s].name()
                ),
                ns(total),
                "ns",
            ));
            for (p, name) in PROGRAMS.iter().enumerate() {
                report.figures.push(Figure::new(
                    &format!(
                        "{n} services: {}   {name} ({:.1} runs per connect())",
                        Side::ALL[s].name(),
                        prog_time[s][p].1 as f64 / connects
                    ),
                    ns(prog_time[s][p].0),
                    "ns",
                ));
            }
        }
        let slower = median(vs_direct);
        report.figures.push(
            Figure::new(
                &format!("{n} services: socket LB vs direct (% slower, connect rate)"),
                (slower * 10.0).round() / 10.0,
                "%",
            )
            .with_target(Target::AtMost(5.0)),
        );
        // The rate includes socket() and the reset close; connect() alone, as latency:
        let p50 = |s: usize| pct_us(&samples[s], 50.0);
        report.figures.push(Figure::new(
            &format!("{n} services: socket LB vs direct (% slower, p50 connect())"),
            ((p50(0) / p50(1) - 1.0) * 1000.0).round() / 10.0,
            "%",
        ));
        let faster = median(vs_dnat);
        report.figures.push(
            Figure::new(
                &format!("{n} services: socket LB vs nft DNAT (connect rate ratio)"),
                (faster * 1000.0).round() / 1000.0,
                "x",
            )
            .with_target_text("> 1 (faster than DNAT)", faster > 1.0),
        );
    }
    report.notes.push(
        "flow events are off (the maps' default); the DNAT side runs in its own netns so \
         conntrack and NAT hooks load only there; listener and clients share the machine's \
         cores"
            .into(),
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_clients_line() {
        let r = parse_run("2000000 1500 2500\n").unwrap();
        assert_eq!(r.wall, Duration::from_millis(2));
        assert_eq!(
            r.connects,
            vec![Duration::from_nanos(1500), Duration::from_nanos(2500)]
        );
        assert_eq!(r.rate(), 1000.0);
        assert!(parse_run("").is_err());
        assert!(parse_run("100").is_err(), "no timed connect");
        assert!(parse_run("100 x").is_err());
    }

    #[test]
    fn dnat_rules_name_every_backend() {
        let s = nft_services(0, 2, 3, true);
        assert!(s.starts_with("table ip mesh_bench"));
        assert!(s.contains(
            "dnat ip to numgen random mod 3 map { 0 : 10.201.0.1 . 8080, 1 : 10.201.0.2 . 8080, 2 : 10.201.0.3 . 8080 }"
        ));
        assert!(s.contains("{ 10.96.0.1 . 80 : goto svc_1 }"));
        assert!(!nft_services(2, 3, 3, false).contains("table"));
    }
}
