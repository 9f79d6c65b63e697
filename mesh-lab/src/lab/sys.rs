//! Kernel primitives of the lab: named network namespaces, links, addresses, routes and
//! rules (through iproute2's `ip`, which speaks netlink, with `-batch` so one process
//! configures a namespace), sysctls, cgroup v2 directories, and entering a namespace from
//! one thread (probes) or from a child process before it execs (`mesh-lab enter`).
//!
//! Why `ip` and not rtnetlink in-process: a netlink socket is bound to the network namespace
//! of the thread that opened it, so configuring dozens of namespaces in-process means one
//! socket per namespace opened on a thread that did `setns`; `ip -n NS -batch -` does the
//! same in one short-lived process per namespace, with the kernel's own error text.

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Nix {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("no cgroup2 mount in /proc/mounts: the lab needs cgroup v2")]
    NoCgroup2,
    #[error("{0}")]
    Timeout(String),
}

pub type Result<T, E = SysError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SysError {
    let what = what.into();
    move |source| SysError::Io { what, source }
}

pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs a command, returning stdout; a failure carries the command line and its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("running {command}")))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .map_err(io(format!("writing to {command}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io(format!("running {command}")))?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if let Some(input) = stdin {
            stderr.push_str(&format!(" (input:\n{input})"));
        }
        return Err(SysError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n NS] -batch -` with one command per line.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let input = lines.join("\n") + "\n";
    run("ip", &args, Some(&input)).map(|_| ())
}

pub fn ip(netns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut all = Vec::new();
    if let Some(ns) = netns {
        all.extend(["-n", ns]);
    }
    all.extend_from_slice(args);
    run("ip", &all, None)
}

// === network namespaces ===

/// Creates a named netns (like `ip netns add`) with its loopback up.
pub fn netns_add(name: &str) -> Result<()> {
    run("ip", &["netns", "add", name], None)?;
    ip(Some(name), &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named netns (unmount + unlink); a missing one is not an error.
pub fn netns_delete(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    run("ip", &["netns", "delete", name], None).map(|_| ())
}

/// Named network namespaces whose name starts with `prefix`.
pub fn netns_list(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Runs `f` on a new thread that entered the named netns; sockets it opens live there.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = netns_path(name);
    let file = fs::File::open(&path).map_err(io(format!("opening {}", path.display())))?;
    let what = format!("entering netns {name}");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| SysError::Nix { what, source })?;
        Ok(f())
    })
    .join()
    .map_err(|_| SysError::Io {
        what: "netns thread".into(),
        source: std::io::Error::other("panicked"),
    })?
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside a netns.
pub fn sysctls(netns: &str, values: &[(&str, &str)]) -> Result<()> {
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ns = netns.to_owned();
    in_netns(netns, move || {
        for (k, v) in values {
            let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
            fs::write(&path, &v).map_err(io(format!("netns {ns}: sysctl {k}={v}")))?;
        }
        Ok(())
    })?
}

/// Inode of a netns file, to find the processes inside it.
pub fn netns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Pids whose network namespace is one of `inodes`.
pub fn pids_in_netns(inodes: &[u64]) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(m) = fs::metadata(entry.path().join("ns/net"))
            && inodes.contains(&m.ino())
        {
            pids.push(pid);
        }
    }
    pids
}

// === cgroup v2 ===

/// The cgroup2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(io("reading /proc/mounts"))?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(mnt))
        })
        .ok_or(SysError::NoCgroup2)
}

pub fn cgroup_create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(io(format!("creating cgroup {}", path.display())))
}

/// Kills every process in the cgroup and its descendants (`cgroup.kill`), waits until it is
/// empty, and removes it and its descendants. A missing cgroup is not an error.
pub fn cgroup_remove(path: &Path, timeout: Duration) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + timeout;
    loop {
        let events = fs::read_to_string(path.join("cgroup.events")).unwrap_or_default();
        if !events.lines().any(|l| l == "populated 1") {
            break;
        }
        if Instant::now() > deadline {
            return Err(SysError::Timeout(format!(
                "cgroup {} still has processes after cgroup.kill",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_dirs_bottom_up(path)
}

fn remove_dirs_bottom_up(path: &Path) -> Result<()> {
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_dirs_bottom_up(&entry.path())?;
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SysError::Io {
            what: format!("removing cgroup {}", path.display()),
            source: e,
        }),
    }
}

/// Pids in a cgroup (not its descendants).
pub fn cgroup_pids(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

// === bpffs ===

pub fn is_mountpoint_of(path: &Path, fstype: &str) -> bool {
    let Some(p) = path.to_str() else { return false };
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split_whitespace();
            let _ = f.next();
            f.next() == Some(p) && f.next() == Some(fstype)
        })
}

/// Mount points at or below `path`, deepest first.
pub fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(PathBuf::from))
        .filter(|m| m.starts_with(path))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Mounts a bpffs on /sys/fs/bpf when none is there (as systemd does at boot), under a lock
/// so two labs starting at once do not stack two mounts.
pub fn ensure_bpffs(path: &Path, lock_dir: &Path) -> Result<()> {
    fs::create_dir_all(lock_dir).map_err(io(format!("creating {}", lock_dir.display())))?;
    let lock_path = lock_dir.join(".bpffs.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, source)| SysError::Nix {
            what: format!("locking {}", lock_path.display()),
            source,
        },
    )?;
    if is_mountpoint_of(path, "bpf") {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SysError::Nix {
        what: format!("mounting bpffs on {}", path.display()),
        source,
    })
}

// === processes ===

/// Arguments of `mesh-lab enter`: what a child process joins before it execs its command.
#[derive(Clone, Debug, Default)]
pub struct Enter {
    pub netns: Option<String>,
    pub cgroup: Option<PathBuf>,
    /// Bind-mounted over /etc/resolv.conf in a private mount namespace.
    pub resolv: Option<PathBuf>,
    /// Die with this process (PR_SET_PDEATHSIG=SIGKILL), checked against a race.
    pub parent: Option<u32>,
}

impl Enter {
    /// `[enter flags..., "--"]` to put between `mesh-lab` and the command.
    pub fn args(&self) -> Vec<String> {
        let mut v = vec!["enter".to_owned()];
        if let Some(n) = &self.netns {
            v.extend(["--netns".into(), n.clone()]);
        }
        if let Some(c) = &self.cgroup {
            v.extend(["--cgroup".into(), c.display().to_string()]);
        }
        if let Some(r) = &self.resolv {
            v.extend(["--resolv".into(), r.display().to_string()]);
        }
        if let Some(p) = self.parent {
            v.extend(["--parent".into(), p.to_string()]);
        }
        v.push("--".into());
        v
    }

    /// In the child, before exec: joins the cgroup, the netns and a private mount namespace,
    /// then replaces this process with `command`. Returns only on failure.
    pub fn exec(&self, command: &[String]) -> anyhow::Result<std::convert::Infallible> {
        use anyhow::Context;
        if let Some(parent) = self.parent {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .context("PR_SET_PDEATHSIG")?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                anyhow::bail!("parent {parent} is gone");
            }
        }
        if let Some(cg) = &self.cgroup {
            fs::write(cg.join("cgroup.procs"), "0")
                .with_context(|| format!("joining cgroup {}", cg.display()))?;
        }
        if let Some(ns) = &self.netns {
            let path = netns_path(ns);
            let f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering netns {ns}"))?;
        }
        if let Some(resolv) = &self.resolv {
            use nix::mount::{MsFlags, mount};
            nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .context("making / private")?;
            mount(
                Some(resolv.as_path()),
                "/etc/resolv.conf",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {} on /etc/resolv.conf", resolv.display()))?;
        }
        let Some(program) = command.first() else {
            anyhow::bail!("no command to run");
        };
        let cargs: Vec<std::ffi::CString> = command
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .context("argument with a NUL byte")?;
        let err = nix::unistd::execvp(&cargs[0], &cargs).unwrap_err();
        Err(anyhow::anyhow!("exec {program}: {err}"))
    }
}

/// Sends a signal to a pid, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'))
            })
            .unwrap_or(true)
}
