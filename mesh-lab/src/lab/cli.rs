//! The lab commands. `up` drives the real `meshctl` for certificates, `connect` and
//! `status --wait`; everything else talks to the supervisor's control socket, except `down`,
//! which also works without it (it derives everything from the naming prefixes).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};

use super::control::{self, LabStatus, Request};
use super::sys::{self, Enter};
use super::topology::{self, DEFAULT_UNDERLAY, LabSpec};
use super::{LabFiles, find_binary, network};

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug, Clone)]
pub struct NameArg {
    /// Lab name (1-8 characters of [a-z0-9]).
    #[arg(long, env = "MESH_LAB_NAME", default_value = "mesh")]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Number of clusters (east, west, north, south, central, c6, ...).
    #[arg(long, default_value_t = 2)]
    pub clusters: usize,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Underlay network (an IPv4 /16), or `auto` for the first free one of 172.16-31.0.0/16.
    #[arg(long, env = "MESH_LAB_UNDERLAY", default_value = DEFAULT_UNDERLAY)]
    pub underlay: String,
    /// Leave everything in place when `up` fails, to look at it.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Namespace of the pod.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    pub cluster: String,
    /// Pod name, or deploy/NAME for the first ready pod of a Deployment.
    pub pod: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ComponentArgs {
    #[command(flatten)]
    pub name: NameArg,
    pub cluster: String,
    /// apiserver, etcd or agent/NODE.
    pub component: String,
}

#[derive(Args, Debug)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub name: NameArg,
    pub a: String,
    pub b: String,
}

/// `mesh-lab enter` (hidden): join namespaces and cgroup, then exec.
#[derive(Args, Debug)]
pub struct EnterArgs {
    #[arg(long)]
    pub netns: Option<String>,
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long)]
    pub resolv: Option<PathBuf>,
    #[arg(long)]
    pub parent: Option<u32>,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn enter(a: EnterArgs) -> anyhow::Result<()> {
    let e = Enter {
        netns: a.netns,
        cgroup: a.cgroup,
        resolv: a.resolv,
        parent: a.parent,
    };
    e.exec(&a.command)?;
    Ok(())
}

// === up ===

struct Progress {
    start: Instant,
    tty: bool,
}

impl Progress {
    fn step(&self, what: &str) -> Instant {
        if self.tty {
            println!("\x1b[1m==>\x1b[0m {what}");
        } else {
            println!("==> {what}");
        }
        Instant::now()
    }

    fn done(&self, t: Instant) {
        println!(
            "    done in {:.1}s ({:.1}s total)",
            t.elapsed().as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
    }
}

pub fn up(a: UpArgs) -> anyhow::Result<()> {
    let name = a.name.name.clone();
    topology::check_name(&name)?;
    let files = LabFiles::new(&name);
    let leftovers = leftovers(&name);
    if !leftovers.is_empty() || files.dir.exists() {
        bail!(
            "lab {name} already exists ({}): run `mesh-lab down --name {name}` first",
            if leftovers.is_empty() {
                files.dir.display().to_string()
            } else {
                leftovers.join(", ")
            }
        );
    }
    // Binaries first, so a missing build fails before anything is created.
    for b in ["meshctl", "mesh-apiserver", "mesh-agent"] {
        find_binary(b)?;
    }
    let parent = topology::state_parent();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    // Held until the supervisor has created the bridge: concurrent `up`s pick distinct
    // underlays.
    let lock_path = parent.join(".up.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", lock_path.display()))?;
    let underlay = choose_underlay(&a.underlay)?;
    let spec = LabSpec::new(&name, a.clusters, a.nodes, underlay)?;
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("creating {}", files.dir.display()))?;
    std::fs::write(&files.lab_json, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("writing {}", files.lab_json.display()))?;

    let p = Progress {
        start: Instant::now(),
        tty: std::io::stdout().is_terminal(),
    };
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let result = up_steps(&spec, &files, &p, deadline, lock);
    match result {
        Ok(()) => {
            print_summary(&spec, &files, &p);
            Ok(())
        }
        Err(e) => {
            eprintln!("mesh-lab up: {e:#}");
            eprintln!(
                "logs: {} and {}/<cluster>/logs/",
                files.supervisor_log.display(),
                files.dir.display()
            );
            if a.keep_on_failure {
                eprintln!(
                    "--keep-on-failure: lab {name} left in place; remove it with `mesh-lab down --name {name}`"
                );
            } else {
                // Keep the logs: copy them out of the state dir before it is removed.
                let keep = std::env::temp_dir().join(format!("mesh-lab-{name}-failed-logs"));
                let _ = copy_logs(&files.dir, &keep);
                eprintln!("tearing down (logs kept in {})", keep.display());
                if let Err(de) = down_lab(&name) {
                    eprintln!("mesh-lab down: {de:#}");
                }
            }
            Err(anyhow!("mesh-lab up failed"))
        }
    }
}

fn copy_logs(dir: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in walk(dir) {
        if entry.extension().is_some_and(|e| e == "log") {
            let rel = entry.strip_prefix(dir).unwrap_or(&entry);
            let target = to.join(rel.to_string_lossy().replace('/', "_"));
            let _ = std::fs::copy(&entry, target);
        }
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn choose_underlay(arg: &str) -> anyhow::Result<ipnet::Ipv4Net> {
    if arg == "auto" {
        for b in (16..=31u8).rev() {
            let net = topology::parse_underlay(&format!("172.{b}.0.0/16"))?;
            if network::host_routes_overlapping(net)?.is_empty() {
                return Ok(net);
            }
        }
        bail!("--underlay auto: every 172.16-31.0.0/16 overlaps a route of this host");
    }
    let net = topology::parse_underlay(arg)?;
    let overlaps = network::host_routes_overlapping(net)?;
    if let Some(r) = overlaps.first() {
        bail!(
            "--underlay {net} overlaps the host route `{r}`: pick another /16 with --underlay \
             (or --underlay auto)"
        );
    }
    Ok(net)
}

fn up_steps(
    spec: &LabSpec,
    files: &LabFiles,
    p: &Progress,
    deadline: Instant,
    lock: nix::fcntl::Flock<std::fs::File>,
) -> anyhow::Result<()> {
    let n = spec.clusters.len();
    let m = spec.clusters[0].nodes.len();
    let t = p.step(&format!(
        "starting the supervisor of lab {}: {n} clusters x {m} nodes, underlay {} (bridge {})",
        spec.name,
        spec.underlay,
        spec.bridge()
    ));
    let log = std::fs::File::create(&files.supervisor_log)
        .with_context(|| format!("creating {}", files.supervisor_log.display()))?;
    let mut sup = Command::new(std::env::current_exe()?)
        .args(["supervise", "--name", &spec.name])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the supervisor")?;
    loop {
        if let Ok(r) = control::call(&files.control_sock, &Request::Status, CALL_TIMEOUT)
            && r.ok
        {
            break;
        }
        if let Some(status) = sup.try_wait()? {
            bail!(
                "the supervisor exited ({status}) while starting:\n{}",
                tail(&files.supervisor_log, 15)
            );
        }
        if Instant::now() > deadline {
            bail!("the supervisor did not become ready in time");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(lock);
    p.done(t);

    let t = p.step("creating CAs and certificates with meshctl");
    let meshctl = find_binary("meshctl")?;
    for c in &spec.clusters {
        let pki = files.dir.join(&c.name).join("pki");
        let pki_s = pki.display().to_string();
        run_tool(
            &meshctl,
            &["ca", "create", "--cluster", &c.name, "--out-dir", &pki_s],
        )?;
        let cp = c.cp_ip.to_string();
        run_tool(
            &meshctl,
            &[
                "cert",
                "issue",
                "--ca-dir",
                &pki_s,
                "--cluster",
                &c.name,
                "--apiserver",
                "--ip",
                &cp,
                "--ip",
                "127.0.0.1",
                "--dns",
                "mesh-apiserver.mesh-system.svc",
                "--dns",
                "mesh-apiserver.mesh-system.svc.cluster.local",
                "--dns",
                "localhost",
                "--out-dir",
                &pki_s,
            ],
        )?;
        for node in &c.nodes {
            run_tool(
                &meshctl,
                &[
                    "cert",
                    "issue",
                    "--ca-dir",
                    &pki_s,
                    "--cluster",
                    &c.name,
                    "--agent",
                    &node.name,
                    "--out-dir",
                    &pki_s,
                ],
            )?;
        }
        run_tool(
            &meshctl,
            &[
                "cert",
                "issue",
                "--ca-dir",
                &pki_s,
                "--cluster",
                &c.name,
                "--operator",
                "admin",
                "--out-dir",
                &pki_s,
            ],
        )?;
    }
    p.done(t);

    let t = p.step("starting etcd, mesh-apiserver and the mesh-agents");
    control::call_ok(&files.control_sock, &Request::MeshUp, CALL_TIMEOUT)?;
    p.done(t);

    let kubeconfig = files.kubeconfig.display().to_string();
    if n > 1 {
        let t = p.step("connecting every pair of clusters with meshctl connect");
        for (i, a) in spec.clusters.iter().enumerate() {
            for b in &spec.clusters[i + 1..] {
                let args = [
                    "connect",
                    "--kubeconfig",
                    &kubeconfig,
                    "--namespace",
                    "mesh-system",
                    "--peers-secret",
                    "mesh-system/mesh-peers",
                    "--context",
                    &spec.context(&a.name),
                    "--destination-context",
                    &spec.context(&b.name),
                ];
                // The LoadBalancer controller sets the Service's ingress asynchronously.
                loop {
                    match run_tool(&meshctl, &args) {
                        Ok(_) => break,
                        Err(e) if Instant::now() > deadline => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
                println!("    {} <-> {}", a.name, b.name);
            }
        }
        p.done(t);
    }

    let t = p.step("waiting for meshctl status --wait to be green in every cluster");
    for c in &spec.clusters {
        wait_green(spec, files, &meshctl, &c.name, deadline)?;
        println!("    {}: ready", c.name);
    }
    p.done(t);
    Ok(())
}

/// `meshctl` connection flags for the apiserver of a cluster, as the lab's operator.
pub fn meshctl_conn(spec: &LabSpec, files: &LabFiles, cluster: &str) -> Vec<String> {
    let c = spec.cluster(cluster).expect("known cluster");
    let pki = files.dir.join(cluster).join("pki");
    vec![
        "--server".into(),
        format!("{}:{}", c.cp_ip, topology::APISERVER_PORT),
        "--tls-ca".into(),
        pki.join("ca.crt").display().to_string(),
        "--tls-cert".into(),
        pki.join("operator-admin.crt").display().to_string(),
        "--tls-key".into(),
        pki.join("operator-admin.key").display().to_string(),
        "--cluster".into(),
        cluster.into(),
    ]
}

fn wait_green(
    spec: &LabSpec,
    files: &LabFiles,
    meshctl: &Path,
    cluster: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let conn = meshctl_conn(spec, files, cluster);
    let want_peers = spec.clusters.len() - 1;
    let want_agents = spec.clusters[0].nodes.len();
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("cluster {cluster}: the mesh is not ready: {last}");
        }
        let mut args: Vec<String> = vec!["status".into(), "--wait".into(), "--timeout".into()];
        args.push(format!("{}s", left.as_secs().clamp(1, 30)));
        args.extend(conn.iter().cloned());
        args.extend(["-o".into(), "json".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match run_tool(meshctl, &refs) {
            Ok(out) => match serde_json::from_str::<serde_json::Value>(&out) {
                Ok(v) => {
                    let peers = v["peers"].as_array().map(Vec::len).unwrap_or(0);
                    let agents = v["agents_synced"].as_u64().unwrap_or(0) as usize;
                    let not_ready = v["not_ready"].as_array().map(Vec::len).unwrap_or(1);
                    if peers == want_peers && agents == want_agents && not_ready == 0 {
                        return Ok(());
                    }
                    last = format!(
                        "{peers}/{want_peers} peers, {agents}/{want_agents} agents synced, not ready: {}",
                        v["not_ready"]
                    );
                }
                Err(e) => last = format!("undecodable meshctl status output: {e}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_summary(spec: &LabSpec, files: &LabFiles, p: &Progress) {
    let k = files.kubeconfig.display();
    println!(
        "\nlab {} is up in {:.1}s: {} clusters ({}), {} nodes each",
        spec.name,
        p.start.elapsed().as_secs_f64(),
        spec.clusters.len(),
        spec.clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        spec.clusters[0].nodes.len()
    );
    println!("kubeconfig: {k}");
    println!("\nnext steps:");
    println!("  export KUBECONFIG={k}");
    let c0 = &spec.clusters[0].name;
    println!("  kubectl --context {} get nodes", spec.context(c0));
    println!("  mesh-lab status --name {}", spec.name);
    println!(
        "  eval \"$(mesh-lab env --name {} {c0})\" && meshctl status",
        spec.name
    );
    println!(
        "  mesh-lab exec --name {} {c0} deploy/NAME -- curl -s http://SERVICE",
        spec.name
    );
    println!("  mesh-lab down --name {}", spec.name);
}

/// Runs a tool, returning its stdout; failure includes its stderr.
fn run_tool(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}{}",
            program.file_name().unwrap_or_default().to_string_lossy(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// === down ===

/// What of lab `name` exists on this machine, by naming prefix.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut v = Vec::new();
    for ns in sys::netns_list(&topology::netns_prefix(name)) {
        v.push(format!("netns {ns}"));
    }
    if Path::new("/sys/class/net")
        .join(topology::bridge_name(name))
        .exists()
    {
        v.push(format!("bridge {}", topology::bridge_name(name)));
    }
    if let Ok(cg2) = sys::cgroup2_mount() {
        let cg = topology::lab_cgroup(&cg2, name);
        if cg.exists() {
            v.push(format!("cgroup {}", cg.display()));
        }
    }
    let pins = topology::lab_bpffs(name);
    if pins.exists() {
        v.push(format!("bpffs dir {}", pins.display()));
    }
    v
}

pub fn down(a: NameArg) -> anyhow::Result<()> {
    let removed = down_lab(&a.name)?;
    if removed.is_empty() {
        println!("lab {}: nothing to remove", a.name);
    } else {
        println!("lab {}: removed", a.name);
        for r in removed {
            println!("  {r}");
        }
    }
    Ok(())
}

/// Removes everything of lab `name`; returns what was removed. Idempotent.
pub fn down_lab(name: &str) -> anyhow::Result<Vec<String>> {
    topology::check_name(name)?;
    let files = LabFiles::new(name);
    let mut removed = Vec::new();
    // 1. Ask the supervisor to stop its pods and children.
    if files.control_sock.exists()
        && control::call(
            &files.control_sock,
            &Request::Shutdown,
            Duration::from_secs(5),
        )
        .is_ok_and(|r| r.ok)
    {
        removed.push("supervisor (shut down)".to_owned());
    }
    // 2. The supervisor process itself (also after a crash or when it hangs).
    if let Some(pid) = std::fs::read_to_string(&files.supervisor_pid)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        && is_supervisor(pid, name)
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while sys::pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if sys::pid_alive(pid) {
            sys::signal(pid, nix::sys::signal::Signal::SIGKILL);
            removed.push(format!("supervisor pid {pid} (killed)"));
        }
    }
    // 3. Every process in the lab's cgroups, then the cgroups.
    let cg2 = sys::cgroup2_mount()?;
    let cg = topology::lab_cgroup(&cg2, name);
    if cg.exists() {
        sys::cgroup_remove(&cg, Duration::from_secs(20))?;
        removed.push(format!("cgroup {} (processes killed)", cg.display()));
    }
    let parent = cg2.join("mesh-lab");
    let _ = std::fs::remove_dir(&parent);
    // 4. Processes left in the lab's namespaces outside its cgroups.
    let nss = sys::netns_list(&topology::netns_prefix(name));
    let inodes: Vec<u64> = nss
        .iter()
        .filter_map(|n| sys::netns_inode(&sys::netns_path(n)))
        .collect();
    for pid in sys::pids_in_netns(&inodes) {
        sys::signal(pid, nix::sys::signal::Signal::SIGKILL);
        removed.push(format!("process {pid}"));
    }
    // 5. Namespaces (their veths go with them), then the bridge.
    for ns in &nss {
        sys::netns_delete(ns)?;
        removed.push(format!("netns {ns}"));
    }
    let br = topology::bridge_name(name);
    if Path::new("/sys/class/net").join(&br).exists() {
        sys::ip(None, &["link", "del", &br])?;
        removed.push(format!("bridge {br} (and its addresses)"));
    }
    // 6. Pinned maps and links (removing the pins detaches the programs).
    let pins = topology::lab_bpffs(name);
    for m in sys::mounts_below(&pins) {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        removed.push(format!("mount {}", m.display()));
    }
    if pins.exists() {
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        removed.push(format!("bpffs dir {}", pins.display()));
        let _ = std::fs::remove_dir(pins.parent().expect("has a parent"));
    }
    // 7. The state directory.
    if files.dir.exists() {
        std::fs::remove_dir_all(&files.dir)
            .with_context(|| format!("removing {}", files.dir.display()))?;
        removed.push(format!("state dir {}", files.dir.display()));
    }
    Ok(removed)
}

fn is_supervisor(pid: i32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<String> = c
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == "supervise") && args.iter().any(|a| a == name)
        })
        .unwrap_or(false)
}

// === status, kubeconfig, exec, faults ===

fn socket_of(name: &str) -> anyhow::Result<PathBuf> {
    topology::check_name(name)?;
    let files = LabFiles::new(name);
    if !files.control_sock.exists() {
        bail!(
            "lab {name} is not running (no {}); start it with `mesh-lab up --name {name}`",
            files.control_sock.display()
        );
    }
    Ok(files.control_sock)
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let sock = socket_of(&a.name.name)?;
    let r = control::call_ok(&sock, &Request::Status, CALL_TIMEOUT)?;
    let st = r
        .status
        .ok_or_else(|| anyhow!("the supervisor sent no status"))?;
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&st)?),
        Format::Table => print_status(&st),
    }
    Ok(())
}

fn print_status(st: &LabStatus) {
    println!(
        "lab {} (supervisor pid {}, underlay {})",
        st.lab, st.supervisor_pid, st.underlay
    );
    println!("kubeconfig: {}", st.kubeconfig);
    if !st.partitions.is_empty() {
        let p: Vec<String> = st
            .partitions
            .iter()
            .map(|(a, b)| format!("{a} <-/-> {b}"))
            .collect();
        println!("partitions: {}", p.join(", "));
    }
    let rows: Vec<[String; 5]> = st
        .components
        .iter()
        .map(|c| {
            [
                c.cluster.clone(),
                c.component.clone(),
                c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if c.component == "pods" {
                    c.detail.clone()
                } else {
                    c.state.clone()
                },
                c.address.clone(),
            ]
        })
        .collect();
    let header = ["CLUSTER", "COMPONENT", "PID", "STATE", "ADDRESS"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(&header);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

pub fn kubeconfig(a: NameArg) -> anyhow::Result<()> {
    topology::check_name(&a.name)?;
    let files = LabFiles::new(&a.name);
    if !files.kubeconfig.exists() {
        bail!(
            "lab {} has no kubeconfig ({} is missing): is it up?",
            a.name,
            files.kubeconfig.display()
        );
    }
    println!("{}", files.kubeconfig.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct EnvArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The cluster whose mesh-apiserver meshctl should talk to.
    pub cluster: String,
}

/// Prints `export` lines that point meshctl at a cluster of the lab (its apiserver's
/// LoadBalancer address and the lab operator's certificate, and `meshctl bpf` at the
/// cluster's pin directories) and kubectl at the lab's kubeconfig, for
/// `eval "$(mesh-lab env east)"`.
pub fn env(a: EnvArgs) -> anyhow::Result<()> {
    topology::check_name(&a.name.name)?;
    let files = LabFiles::new(&a.name.name);
    let raw = std::fs::read(&files.lab_json).with_context(|| {
        format!(
            "lab {} is not up ({} is missing)",
            a.name.name,
            files.lab_json.display()
        )
    })?;
    let spec: LabSpec = serde_json::from_slice(&raw)
        .with_context(|| format!("decoding {}", files.lab_json.display()))?;
    if spec.cluster(&a.cluster).is_none() {
        let known: Vec<&str> = spec.clusters.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "lab {} has no cluster {:?} (clusters: {})",
            a.name.name,
            a.cluster,
            known.join(", ")
        );
    }
    let conn = meshctl_conn(&spec, &files, &a.cluster);
    let flag = |f: &str| {
        conn.iter()
            .position(|x| x == f)
            .map(|i| conn[i + 1].clone())
            .unwrap_or_default()
    };
    let quote = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
    for (k, v) in [
        ("KUBECONFIG", files.kubeconfig.display().to_string()),
        ("MESH_SERVER", flag("--server")),
        ("MESH_TLS_CA", flag("--tls-ca")),
        ("MESH_TLS_CERT", flag("--tls-cert")),
        ("MESH_TLS_KEY", flag("--tls-key")),
        ("MESH_CLUSTER_NAME", a.cluster.clone()),
        // `meshctl bpf ... --node N` reads `<root>/<N>`: the lab pins per lab and cluster.
        (
            "MESH_BPFFS_ROOT",
            topology::lab_bpffs(&a.name.name)
                .join(&a.cluster)
                .display()
                .to_string(),
        ),
    ] {
        println!("export {k}={}", quote(&v));
    }
    Ok(())
}

/// Runs a command in a pod; returns its exit code.
pub fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let sock = socket_of(&a.name.name)?;
    let r = control::call_ok(
        &sock,
        &Request::Pod {
            cluster: a.cluster.clone(),
            namespace: a.namespace.clone(),
            pod: a.pod.clone(),
        },
        CALL_TIMEOUT,
    )?;
    let place = r.pod.ok_or_else(|| anyhow!("the supervisor sent no pod"))?;
    let e = Enter {
        netns: Some(place.netns),
        cgroup: Some(place.cgroup),
        resolv: Some(place.resolv),
        parent: None,
    };
    let status = Command::new(std::env::current_exe()?)
        .args(e.args())
        .args(&a.command)
        .status()
        .context("running the command in the pod")?;
    Ok(status.code().unwrap_or(128 + 9))
}

pub fn kill(a: ComponentArgs) -> anyhow::Result<()> {
    let sock = socket_of(&a.name.name)?;
    control::call_ok(
        &sock,
        &Request::Kill {
            cluster: a.cluster.clone(),
            component: a.component.clone(),
        },
        CALL_TIMEOUT,
    )?;
    println!("{} {}: killed", a.cluster, a.component);
    Ok(())
}

pub fn start(a: ComponentArgs) -> anyhow::Result<()> {
    let sock = socket_of(&a.name.name)?;
    control::call_ok(
        &sock,
        &Request::Start {
            cluster: a.cluster.clone(),
            component: a.component.clone(),
        },
        CALL_TIMEOUT,
    )?;
    println!("{} {}: started", a.cluster, a.component);
    Ok(())
}

pub fn partition(a: PartitionArgs) -> anyhow::Result<()> {
    let sock = socket_of(&a.name.name)?;
    control::call_ok(
        &sock,
        &Request::Partition {
            a: a.a.clone(),
            b: a.b.clone(),
        },
        CALL_TIMEOUT,
    )?;
    println!("partitioned {} from {}", a.a, a.b);
    Ok(())
}

pub fn heal(a: NameArg) -> anyhow::Result<()> {
    let sock = socket_of(&a.name)?;
    control::call_ok(&sock, &Request::Heal, CALL_TIMEOUT)?;
    println!("healed: every partition removed");
    Ok(())
}
