//! Test harness shared by the mesh crates. Every resource a test starts here is released
//! by a guard's `Drop`, so a failing test leaves no process or directory behind.

pub mod bins;
pub mod certs;
pub mod etcd;
#[cfg(feature = "history")]
pub mod history;
pub mod hubble;

use std::net::{SocketAddr, TcpListener};

/// A loopback TCP port that was free when asked. Another process may take it before the
/// caller binds it; callers that can bind port 0 themselves should do that instead.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.port())
        .expect("binding a loopback port")
}

/// Fails the calling test unless the process runs as root.
///
/// A test that cannot run must not report a pass: privileged tests (netns, cgroups, eBPF,
/// whole labs) panic here with what is missing. A developer without root skips them
/// explicitly with `cargo nextest run --profile unprivileged`, whose filter leaves them out,
/// so nextest reports them as skipped.
#[track_caller]
pub fn require_root(what: &str) {
    if !is_root() {
        panic!(
            "{what} needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN: network namespaces, \
             cgroups, eBPF). Run the suite as root (bash scripts/test.sh), or leave the \
             privileged tests out explicitly: cargo nextest run --profile unprivileged"
        );
    }
}

/// Whether the current process runs as root (needed for netns, cgroups and eBPF tests).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
