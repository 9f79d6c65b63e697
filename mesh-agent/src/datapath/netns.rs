//! Finding the network namespaces of the node's pods, for egress policy.
//!
//! connect4/sendmsg4 run before the kernel picks the socket's source address, so the
//! programs name the client by its network namespace (`bpf_get_netns_cookie`), and the agent
//! tells them which endpoint each namespace is (`mesh_policy_netns`). The agent finds the
//! namespaces from the processes of its cgroup subtree (`--cgroup-path`, where the socket
//! programs apply): every process's `/proc/<pid>/ns/net`, each distinct namespace entered
//! once on a short-lived thread to read its cookie and IPv4 addresses. Namespaces are
//! remembered by inode, so a rescan enters only new ones; the cookie of a namespace never
//! changes.
//!
//! A pod whose namespace is not found yet (no process yet) has no entry: its egress is not
//! enforced until the next scan. The agent rescans on every reconcile and, while some local
//! endpoint is unresolved, every second.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::sys;

/// One network namespace found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsInfo {
    pub cookie: u64,
    pub addrs: Vec<Ipv4Addr>,
}

/// Finds the network namespaces of the processes under a cgroup.
#[derive(Debug)]
pub struct NetnsScanner {
    cgroup: PathBuf,
    /// (device, inode) of a namespace -> what it is.
    known: HashMap<(u64, u64), NetnsInfo>,
}

// === impl NetnsScanner ===

impl NetnsScanner {
    pub fn new(cgroup: impl Into<PathBuf>) -> Self {
        Self {
            cgroup: cgroup.into(),
            known: HashMap::new(),
        }
    }

    /// Every network namespace some process of the cgroup subtree is in. Processes that exit
    /// during the scan are skipped; a namespace that cannot be entered is logged and
    /// skipped (its endpoint's egress stays unenforced until a later scan succeeds).
    pub fn scan(&mut self) -> io::Result<Vec<NetnsInfo>> {
        let mut pids = Vec::new();
        collect_pids(&self.cgroup, &mut pids)?;
        let mut seen = HashSet::new();
        for pid in pids {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let Ok(meta) = fs::metadata(&path) else {
                continue; // exited
            };
            let id = (meta.dev(), meta.ino());
            if !seen.insert(id) || self.known.contains_key(&id) {
                continue;
            }
            match sys::run_in_netns(&path, sys::current_netns) {
                Ok(Ok((cookie, addrs))) => {
                    self.known.insert(id, NetnsInfo { cookie, addrs });
                }
                Ok(Err(e)) | Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::debug!(path = %path.display(), error = %e,
                            "cannot inspect a network namespace");
                    }
                }
            }
        }
        self.known.retain(|id, _| seen.contains(id));
        Ok(self.known.values().cloned().collect())
    }
}

/// The pids of `dir` and every cgroup below it.
fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> io::Result<()> {
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
        // A cgroup removed while we walk.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}
