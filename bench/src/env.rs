//! The benchmark's environment: preconditions (root, etcd), child processes, the cgroup and
//! bpffs an agent needs, `/proc` readings (CPU time, RSS) and `/metrics` scraping.
//!
//! Every resource is a guard whose `Drop` releases it, so a failed or interrupted run
//! (Ctrl-C drops the running benchmark's future) leaves no process, cgroup, pin or mount.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

// === preconditions ===

/// Checks what every benchmark needs, with a message that says how to fix it.
pub fn check_preconditions() -> Result<()> {
    if !mesh_testkit::is_root() {
        bail!(
            "mesh-bench must run as root: the agent loads eBPF programs, mounts a bpffs and \
             creates a cgroup (run it with sudo, or as root)"
        );
    }
    let etcd = std::env::var("MESH_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let found = Command::new(&etcd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!(
            "etcd is not installed (no working `{etcd} --version`): install Debian's \
             etcd-server with scripts/setup.sh, or point MESH_ETCD_BIN at an etcd binary"
        );
    }
    cgroup2_mount().context("finding the cgroup v2 mount")?;
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let (_dev, dir, fs) = (w.next()?, w.next()?, w.next()?);
            (fs == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 filesystem is mounted (the agent attaches to a cgroup v2 directory)")
}

/// A name unique to this process and call.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn free_port() -> u16 {
    mesh_testkit::free_port()
}

// === how components run ===

/// How the apiserver and agent processes are started.
#[derive(Debug, Clone)]
pub enum Components {
    /// The real `mesh-apiserver` and `mesh-agent` binaries from this directory.
    Binaries(PathBuf),
    /// This binary re-executed as `mesh-bench component apiserver|agent -- ARGS` (the same
    /// library code as the binaries, in a process of its own).
    SelfExec,
}

impl Components {
    /// `dir`: explicit directory of the binaries; else the directory of this executable if
    /// both binaries are there (scripts/bench.sh builds them together); else self-exec.
    pub fn resolve(dir: Option<PathBuf>, force_self: bool) -> Result<Self> {
        if force_self {
            return Ok(Components::SelfExec);
        }
        let has = |d: &Path| d.join("mesh-apiserver").is_file() && d.join("mesh-agent").is_file();
        if let Some(d) = dir {
            if !has(&d) {
                bail!(
                    "--bin-dir {}: mesh-apiserver and mesh-agent are not both there \
                     (build them with cargo build --release -p mesh-apiserver -p mesh-agent)",
                    d.display()
                );
            }
            return Ok(Components::Binaries(d));
        }
        let own = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        Ok(match own {
            Some(d) if has(&d) => Components::Binaries(d),
            _ => Components::SelfExec,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Components::Binaries(d) => format!("binaries in {}", d.display()),
            Components::SelfExec => "mesh-bench re-executed per component".into(),
        }
    }

    /// The command that runs `role` (`apiserver` or `agent`); the caller adds its flags.
    pub fn command(&self, role: &str) -> Result<Command> {
        Ok(match self {
            Components::Binaries(d) => Command::new(d.join(format!("mesh-{role}"))),
            Components::SelfExec => {
                let mut c = Command::new(std::env::current_exe().context("finding mesh-bench")?);
                c.args(["component", role, "--"]);
                c
            }
        })
    }
}

// === child processes ===

/// A child process with its output in a log file; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {log:?}"))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fails (with the log) if the process exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!(
                "{} exited with {status}; its log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// === cgroup and bpffs ===

/// A cgroup v2 directory for an agent's programs; removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let root = cgroup2_mount()?;
        let path = root.join(unique(&format!("mesh-bench-{tag}")));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {path:?}"))?;
        Ok(Cgroup { path, root })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A bpffs mounted on a temporary directory; on drop the node's pins are removed (the
/// programs detach) and the bpffs is unmounted.
pub struct Bpffs {
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
}

impl Bpffs {
    pub fn mount(node: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-bench-bpffs-")
            .tempdir()?;
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .context("running mount")?
            .success();
        if !ok {
            bail!("mount -t bpf on {} failed", dir.path().display());
        }
        let pin_dir = dir.path().join("mesh").join(node);
        Ok(Bpffs { dir, pin_dir })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Removes the pins (a fresh agent then starts from empty maps).
    pub fn unpin(&self) {
        let _ = mesh_agent::datapath::unpin_dir(&self.pin_dir);
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        self.unpin();
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

// === /proc ===

/// USER_HZ: the unit of `utime`/`stime` in `/proc/<pid>/stat` (100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Busy and total CPU time of the whole machine so far, in USER_HZ ticks (the `cpu` line
/// of `/proc/stat`: idle and iowait count as idle).
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("malformed /proc/stat cpu line"))
        .collect::<Result<_>>()?;
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Waits until the machine is quiet: a window of `window` in which at most `busy_share` of
/// its CPU time was busy, for at most `max`; returns how long it waited and whether it got
/// quiet. A benchmark that times one process calls it first, so that the kernel's deferred
/// work of what it tore down before (freeing a stopped agent's 512k-entry maps keeps a
/// kworker busy for about 0.3 s) does not run on the clock.
pub async fn settle(window: Duration, busy_share: f64, max: Duration) -> Result<(Duration, bool)> {
    let t0 = Instant::now();
    let mut last = machine_ticks()?;
    loop {
        tokio::time::sleep(window).await;
        let now = machine_ticks()?;
        let (busy, total) = (now.0 - last.0, now.1 - last.1);
        last = now;
        if total > 0 && (busy as f64) <= busy_share * total as f64 {
            return Ok((t0.elapsed(), true));
        }
        if t0.elapsed() >= max {
            return Ok((t0.elapsed(), false));
        }
    }
}

/// User + system CPU time of a process so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: count fields after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(Duration::from_secs_f64(
        (utime + stime) as f64 / TICKS_PER_SECOND,
    ))
}

/// Resident set size of a process, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size of a process so far, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The pid of the etcd whose data directory is `data_dir` (mesh-testkit's `Etcd` does not
/// expose it): the process whose command line names that directory.
pub fn etcd_pid(data_dir: &Path) -> Result<u32> {
    let needle = format!("--data-dir={}", data_dir.join("data").display());
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == needle.as_bytes())
        {
            return Ok(pid);
        }
    }
    bail!("no etcd process with {needle}")
}

// === /metrics ===

/// `GET path` over plain HTTP/1.0 (the components' metrics listeners); returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {addr}{path}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{addr}{path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// The value of the series `series` (name and labels exactly as exposed) in a Prometheus
/// text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_rss() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        cpu_time(pid).unwrap();
    }

    #[test]
    fn finds_a_series() {
        let body = "# HELP x y\nmesh_agent_map_entries{map=\"ipcache\"} 12\nmesh_agent_map_entries{map=\"services\"} 3\n";
        assert_eq!(
            metric(body, "mesh_agent_map_entries{map=\"services\"}"),
            Some(3.0)
        );
        assert_eq!(metric(body, "mesh_agent_map_entries{map=\"x\"}"), None);
    }
}
