//! Test harness shared by the mesh crates. Every resource a test starts here is released
//! by a guard's `Drop`, so a failing test leaves no process or directory behind.

pub mod bins;
pub mod certs;
mod child;
pub mod etcd;
#[cfg(feature = "history")]
pub mod history;
pub mod hubble;

use std::net::{SocketAddr, TcpListener};

pub use child::init_child_process;

/// A loopback TCP port that was free when asked, below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): the ports the kernel hands out on its own (a connect(),
/// a bind to port 0, in any process of the suite) never take it before the caller binds it.
/// Only another explicit bind to the same port can, which the random pick in a range of
/// about 20k ports makes rare. Where that range is too small to pick from, falls back to
/// a port the kernel picks (inside the ephemeral range). Callers that can bind port 0
/// themselves should do that instead.
pub fn free_port() -> u16 {
    const LOW: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOW + 1_000 {
        for _ in 0..200 {
            let port = LOW + (random_u64() % u64::from(ephemeral_low - LOW)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.port())
        .expect("binding a loopback port")
}

/// A random number from the standard library's per-process random hash keys (no
/// dependency for picking a port).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_bindable() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
        for &p in &ports {
            assert!(
                (10_000..low).contains(&p),
                "port {p}, ephemeral range from {low}"
            );
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert!(distinct.len() > 10, "not random: {ports:?}");
    }
}
