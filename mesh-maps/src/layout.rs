//! `#[repr(C)]` mirrors of the map layouts in `bpf/mesh.h`.
//!
//! These are the raw wire format of the maps: addresses and ports in network
//! byte order, explicit padding, no bools. Everything else uses the plain
//! types of the crate root (`ServiceEntryKey`, ...), converted with `From`.
//! `tests::c_layout_matches` compiles assertions generated from these structs
//! against the C header, so the two definitions cannot drift apart.

use std::mem::size_of;

use crate::sys::{
    BPF_F_NO_PREALLOC, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_RINGBUF, MapShape,
};
use crate::{
    MAP_BACKEND_HEALTH, MAP_BACKENDS, MAP_EVENT_CONFIG, MAP_EVENT_SEEN, MAP_EVENT_STATS,
    MAP_EVENTS, MAP_FLOWS, MAP_IPCACHE, MAP_POLICY, MAP_POLICY_COUNTERS, MAP_POLICY_ENDPOINTS,
    MAP_POLICY_NETNS, MAP_POLICY_REPLIES, MAP_POLICY_RULES, MAP_QUARANTINE, MAP_REV_NAT,
    MAP_SERVICES, MAP_SOCK_REV,
};

/// Reserved identity of addresses the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;

/// Map sizes (`MESH_*_MAX` in bpf/mesh.h).
pub const IPCACHE_MAX: u32 = 524_288;
pub const SERVICES_MAX: u32 = 262_144;
pub const BACKENDS_MAX: u32 = 262_144;
pub const REV_NAT_MAX: u32 = 262_144;
pub const SOCK_REV_MAX: u32 = 131_072;
pub const FLOWS_MAX: u32 = 65_536;
pub const POLICY_ENDPOINTS_MAX: u32 = 65_536;
pub const POLICY_MAX: u32 = 1_048_576;
pub const POLICY_NETNS_MAX: u32 = 65_536;
pub const POLICY_REPLIES_MAX: u32 = 262_144;
pub const POLICY_COUNTERS_MAX: u32 = 65_536;
pub const POLICY_RULES_MAX: u32 = 65_536;

/// Flow events (`MESH_EVENTS_RING_BYTES`, `MESH_EVENT_SEEN_MAX`).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
pub const EVENT_SEEN_MAX: u32 = 65_536;
/// `MESH_HEALTH_MAX`: backends tracked for passive health.
pub const HEALTH_MAX: u32 = 65_536;
/// `mesh_flow_event.verdict`.
pub const EVENT_FORWARDED: u8 = 1;
pub const EVENT_DROPPED: u8 = 2;
/// `mesh_flow_event.reason` (`MESH_DROP_*`).
pub const DROP_NONE: u8 = 0;
pub const DROP_POLICY_DEFAULT: u8 = 1;
pub const DROP_POLICY_RULE: u8 = 2;
pub const DROP_NO_BACKEND: u8 = 3;
/// `mesh_flow_event.flags` (`MESH_EVENT_F_*`).
pub const EVENT_F_TRANSLATED: u8 = 1 << 0;
pub const EVENT_F_POLICY: u8 = 1 << 1;

/// Reserved identity of the local host (`MESH_IDENTITY_HOST`).
pub const IDENTITY_HOST: u32 = 1;

/// `mesh_policy_endpoint.flags`.
pub const POLICY_F_INGRESS_ENFORCED: u32 = 1 << 0;
pub const POLICY_F_EGRESS_ENFORCED: u32 = 1 << 1;
/// Bits of `mesh_policy_key` before the port (`MESH_POLICY_PREFIX_FIXED`).
pub const POLICY_PREFIX_FIXED: u32 = 80;
/// `MESH_VERDICT_*`.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// `MESH_DIRECTION_*`.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;
/// `MESH_RULE_NONE`: no rule decided (not enforced, or default deny).
pub const RULE_NONE: u32 = 0;
/// `MESH_POLICY_RULE_NAME_LEN`.
pub const POLICY_RULE_NAME_LEN: usize = 248;

/// `struct mesh_ipcache_key`. The kernel LPM trie key: prefix length in bits,
/// then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    /// Network order.
    pub ip4: u32,
}

/// `struct mesh_ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Node IP, network order, 0 = none.
    pub tunnel_endpoint: u32,
    pub cluster_id: u16,
    pub pad: u16,
    pub flags: u32,
}

/// `struct mesh_service_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceKey {
    /// Network order.
    pub vip: u32,
    /// Network order.
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct mesh_service_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub pad: u16,
    pub flags: u32,
    /// Slot > 0: a copy of `mesh_backends[backend_id]` (what the connect path reads).
    pub backend: BackendValue,
}

/// `struct mesh_backend_value` (the key is a `u32` backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    /// Network order.
    pub ip: u32,
    /// Network order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub cluster_id: u16,
    pub pad2: u16,
    pub flags: u32,
}

/// `struct mesh_rev_nat_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatKey {
    pub cookie: u64,
    /// Network order.
    pub backend_ip: u32,
    /// Network order.
    pub backend_port: u16,
    pub pad: u16,
}

/// `struct mesh_rev_nat_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    /// Network order.
    pub vip: u32,
    /// Network order.
    pub port: u16,
    pub pad: u16,
}

/// `struct mesh_sock_rev`: the entry (`mesh_sock_rev`, an LRU hash by socket cookie) of an
/// open socket whose connect() socket LB rewrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRev {
    /// Network order.
    pub backend_ip: u32,
    /// Network order.
    pub backend_port: u16,
    /// The frontend's, network order.
    pub port: u16,
    /// Network order.
    pub vip: u32,
}

/// `struct mesh_flow_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub src_identity: u32,
    pub dst_identity: u32,
}

/// `struct mesh_flow_value` (one per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct mesh_policy_endpoint` (the key is a `u32` local identity).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEndpoint {
    pub ingress_table: u32,
    pub egress_table: u32,
    pub flags: u32,
}

/// `struct mesh_policy_key` without its `prefixlen` (aya's `lpm_trie::Key<PolicyKeyData>`
/// adds it): table, remote identity (0 = any), protocol (0 = any), port (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyData {
    pub table: u32,
    pub remote: u32,
    pub proto: u8,
    pub pad: u8,
    /// Network order.
    pub port: u16,
}

/// `struct mesh_policy_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub table: u32,
    pub remote: u32,
    pub proto: u8,
    pub pad: u8,
    pub port: u16,
}

/// `struct mesh_policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub rule: u32,
    pub rank: u32,
    pub verdict: u8,
    pub pad: [u8; 3],
}

/// `struct mesh_policy_netns_value` (the key is a `u64` netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyNetnsValue {
    pub identity: u32,
    /// Network order.
    pub ip4: u32,
}

/// `struct mesh_policy_reply_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyReplyKey {
    pub cookie: u64,
    pub remote_ip: u32,
    pub remote_port: u16,
    pub pad: u16,
}

/// `struct mesh_policy_counter_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyCounterKey {
    pub local: u32,
    pub remote: u32,
    pub rule: u32,
    pub direction: u8,
    pub verdict: u8,
    pub pad: u16,
}

/// `struct mesh_policy_counter_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct mesh_flow_event`: one record of the `mesh_events` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub time_ns: u64,
    pub cookie: u64,
    pub src_ip: u32,
    pub dst_ip: u32,
    pub orig_ip: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub orig_port: u16,
    pub backend_cluster: u16,
    pub direction: u8,
    pub proto: u8,
    pub verdict: u8,
    pub reason: u8,
    pub flags: u8,
    pub pad: [u8; 7],
}

impl FlowEvent {
    /// Reads a record from the ring buffer's bytes; `None` when the length is not a record's.
    #[allow(unsafe_code)]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the length is checked, FlowEvent is plain integers (any bit pattern is
        // valid), and read_unaligned has no alignment requirement.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

/// `struct mesh_event_config`: `mesh_event_config[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventConfig {
    pub rate: u32,
    pub burst: u32,
}

/// `struct mesh_event_stats`: per-CPU `mesh_event_stats[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    pub emitted: u64,
    pub lost_ring_full: u64,
    pub rate_limited: u64,
    pub tokens: u64,
    pub last_ns: u64,
}

/// `struct mesh_event_seen_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSeenKey {
    pub cookie: u64,
    pub remote_ip: u32,
    pub remote_port: u16,
    pub direction: u8,
    pub pad: u8,
}

/// `struct mesh_health_key`: a backend address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HealthKey {
    pub ip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// `struct mesh_health_value`: the datapath's connect counters of a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthValue {
    pub last_failure_ns: u64,
    pub last_success_ns: u64,
    pub failures: u64,
    pub successes: u64,
}

/// `struct mesh_quarantine_value`: a quarantine the agent put a backend in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuarantineValue {
    pub until_unix_ms: u64,
    pub failures: u32,
    pub level: u32,
}

/// `struct mesh_policy_rule_name`: NUL-padded UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRuleName {
    pub name: [u8; POLICY_RULE_NAME_LEN],
}

impl Default for PolicyRuleName {
    fn default() -> Self {
        Self {
            name: [0; POLICY_RULE_NAME_LEN],
        }
    }
}

impl PolicyRuleName {
    /// `name` truncated to the field (at a character boundary), NUL-padded.
    pub fn new(name: &str) -> Self {
        let mut out = Self::default();
        let mut end = name.len().min(POLICY_RULE_NAME_LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        out.name[..end].copy_from_slice(&name.as_bytes()[..end]);
        out
    }

    pub fn as_str(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Every map of bpf/mesh.h with the type, sizes and flags its definition
/// gives it: what a pinned map must be for this build to use it.
pub fn expected_shapes() -> [(&'static str, MapShape); 18] {
    let shape = |map_type, key: usize, value: usize, max_entries, map_flags| MapShape {
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
        map_flags,
    };
    [
        (
            MAP_IPCACHE,
            shape(
                BPF_MAP_TYPE_LPM_TRIE,
                size_of::<IpcacheKey>(),
                size_of::<IpcacheValue>(),
                IPCACHE_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_SERVICES,
            shape(
                BPF_MAP_TYPE_HASH,
                size_of::<ServiceKey>(),
                size_of::<ServiceValue>(),
                SERVICES_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_BACKENDS,
            shape(
                BPF_MAP_TYPE_HASH,
                size_of::<u32>(),
                size_of::<BackendValue>(),
                BACKENDS_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_REV_NAT,
            shape(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<RevNatKey>(),
                size_of::<RevNatValue>(),
                REV_NAT_MAX,
                0,
            ),
        ),
        (
            MAP_SOCK_REV,
            shape(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<u64>(),
                size_of::<SockRev>(),
                SOCK_REV_MAX,
                0,
            ),
        ),
        (
            MAP_FLOWS,
            shape(
                BPF_MAP_TYPE_LRU_PERCPU_HASH,
                size_of::<FlowKey>(),
                size_of::<FlowValue>(),
                FLOWS_MAX,
                0,
            ),
        ),
        (
            MAP_POLICY_ENDPOINTS,
            shape(
                BPF_MAP_TYPE_HASH,
                size_of::<u32>(),
                size_of::<PolicyEndpoint>(),
                POLICY_ENDPOINTS_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_POLICY,
            shape(
                BPF_MAP_TYPE_LPM_TRIE,
                size_of::<PolicyKey>(),
                size_of::<PolicyValue>(),
                POLICY_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_POLICY_NETNS,
            shape(
                BPF_MAP_TYPE_HASH,
                size_of::<u64>(),
                size_of::<PolicyNetnsValue>(),
                POLICY_NETNS_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_POLICY_REPLIES,
            shape(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<PolicyReplyKey>(),
                size_of::<u32>(),
                POLICY_REPLIES_MAX,
                0,
            ),
        ),
        (
            MAP_POLICY_COUNTERS,
            shape(
                BPF_MAP_TYPE_LRU_PERCPU_HASH,
                size_of::<PolicyCounterKey>(),
                size_of::<PolicyCounterValue>(),
                POLICY_COUNTERS_MAX,
                0,
            ),
        ),
        (
            MAP_POLICY_RULES,
            shape(
                BPF_MAP_TYPE_HASH,
                size_of::<u32>(),
                size_of::<PolicyRuleName>(),
                POLICY_RULES_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
        (
            MAP_EVENTS,
            shape(BPF_MAP_TYPE_RINGBUF, 0, 0, EVENTS_RING_BYTES, 0),
        ),
        (
            MAP_EVENT_CONFIG,
            shape(
                BPF_MAP_TYPE_ARRAY,
                size_of::<u32>(),
                size_of::<EventConfig>(),
                1,
                0,
            ),
        ),
        (
            MAP_EVENT_STATS,
            shape(
                BPF_MAP_TYPE_PERCPU_ARRAY,
                size_of::<u32>(),
                size_of::<EventStats>(),
                1,
                0,
            ),
        ),
        (
            MAP_EVENT_SEEN,
            shape(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<EventSeenKey>(),
                size_of::<u64>(),
                EVENT_SEEN_MAX,
                0,
            ),
        ),
        (
            MAP_BACKEND_HEALTH,
            shape(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<HealthKey>(),
                size_of::<HealthValue>(),
                HEALTH_MAX,
                0,
            ),
        ),
        (
            MAP_QUARANTINE,
            shape(
                BPF_MAP_TYPE_HASH,
                size_of::<HealthKey>(),
                size_of::<QuarantineValue>(),
                HEALTH_MAX,
                BPF_F_NO_PREALLOC,
            ),
        ),
    ]
}

// SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, made only of
// integers and integer arrays with explicit padding fields, so it has no
// implicit padding bytes and every bit pattern is a valid value, which is what
// `aya::Pod` requires to copy it to and from the kernel.
#[allow(unsafe_code)]
mod pod {
    use super::*;
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for PolicyEndpoint {}
    unsafe impl aya::Pod for PolicyKeyData {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyNetnsValue {}
    unsafe impl aya::Pod for PolicyReplyKey {}
    unsafe impl aya::Pod for PolicyCounterKey {}
    unsafe impl aya::Pod for PolicyCounterValue {}
    unsafe impl aya::Pod for PolicyRuleName {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for EventConfig {}
    unsafe impl aya::Pod for EventStats {}
    unsafe impl aya::Pod for EventSeenKey {}
    unsafe impl aya::Pod for HealthKey {}
    unsafe impl aya::Pod for HealthValue {}
    unsafe impl aya::Pod for QuarantineValue {}
}

/// (C struct name, size, [(field, offset)]) of every mirrored struct, for the
/// layout tests.
#[cfg(test)]
macro_rules! layout_table {
    ($($rust:ty => $c:literal { $($field:ident),* $(,)? }),* $(,)?) => {
        vec![$(
            (
                $c,
                std::mem::size_of::<$rust>(),
                vec![$((stringify!($field), std::mem::offset_of!($rust, $field))),*],
            )
        ),*]
    };
}

#[cfg(test)]
type Layout = Vec<(&'static str, usize, Vec<(&'static str, usize)>)>;

#[cfg(test)]
fn layouts() -> Layout {
    layout_table! {
        IpcacheKey => "mesh_ipcache_key" { prefixlen, ip4 },
        IpcacheValue => "mesh_ipcache_value" { identity, tunnel_endpoint, cluster_id, pad, flags },
        ServiceKey => "mesh_service_key" { vip, port, slot, proto, pad },
        ServiceValue => "mesh_service_value" { backend_id, count, pad, flags, backend },
        BackendValue => "mesh_backend_value" { ip, port, proto, pad, cluster_id, pad2, flags },
        RevNatKey => "mesh_rev_nat_key" { cookie, backend_ip, backend_port, pad },
        RevNatValue => "mesh_rev_nat_value" { vip, port, pad },
        SockRev => "mesh_sock_rev" { backend_ip, backend_port, port, vip },
        FlowKey => "mesh_flow_key" { src_identity, dst_identity },
        FlowValue => "mesh_flow_value" { packets, bytes },
        PolicyEndpoint => "mesh_policy_endpoint" { ingress_table, egress_table, flags },
        PolicyKey => "mesh_policy_key" { prefixlen, table, remote, proto, pad, port },
        PolicyValue => "mesh_policy_value" { rule, rank, verdict, pad },
        PolicyNetnsValue => "mesh_policy_netns_value" { identity, ip4 },
        PolicyReplyKey => "mesh_policy_reply_key" { cookie, remote_ip, remote_port, pad },
        PolicyCounterKey => "mesh_policy_counter_key" { local, remote, rule, direction, verdict, pad },
        PolicyCounterValue => "mesh_policy_counter_value" { packets, bytes },
        PolicyRuleName => "mesh_policy_rule_name" { name },
        FlowEvent => "mesh_flow_event" {
            time_ns, cookie, src_ip, dst_ip, orig_ip, src_identity, dst_identity, rule,
            src_port, dst_port, orig_port, backend_cluster, direction, proto, verdict, reason,
            flags, pad,
        },
        EventConfig => "mesh_event_config" { rate, burst },
        EventStats => "mesh_event_stats" { emitted, lost_ring_full, rate_limited, tokens, last_ns },
        EventSeenKey => "mesh_event_seen_key" { cookie, remote_ip, remote_port, direction, pad },
        HealthKey => "mesh_health_key" { ip, port, proto, pad },
        HealthValue => "mesh_health_value" { last_failure_ns, last_success_ns, failures, successes },
        QuarantineValue => "mesh_quarantine_value" { until_unix_ms, failures, level },
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, path::Path, process::Command};

    use super::*;

    /// Pins the Rust layouts: a change here is a change of the map ABI and
    /// needs a matching change in bpf/mesh.h (and a plan for pinned maps).
    #[test]
    fn rust_layout_is_pinned() {
        let expected: Layout = vec![
            ("mesh_ipcache_key", 8, vec![("prefixlen", 0), ("ip4", 4)]),
            (
                "mesh_ipcache_value",
                16,
                vec![
                    ("identity", 0),
                    ("tunnel_endpoint", 4),
                    ("cluster_id", 8),
                    ("pad", 10),
                    ("flags", 12),
                ],
            ),
            (
                "mesh_service_key",
                12,
                vec![
                    ("vip", 0),
                    ("port", 4),
                    ("slot", 6),
                    ("proto", 8),
                    ("pad", 9),
                ],
            ),
            (
                "mesh_service_value",
                28,
                vec![
                    ("backend_id", 0),
                    ("count", 4),
                    ("pad", 6),
                    ("flags", 8),
                    ("backend", 12),
                ],
            ),
            (
                "mesh_backend_value",
                16,
                vec![
                    ("ip", 0),
                    ("port", 4),
                    ("proto", 6),
                    ("pad", 7),
                    ("cluster_id", 8),
                    ("pad2", 10),
                    ("flags", 12),
                ],
            ),
            (
                "mesh_rev_nat_key",
                16,
                vec![
                    ("cookie", 0),
                    ("backend_ip", 8),
                    ("backend_port", 12),
                    ("pad", 14),
                ],
            ),
            (
                "mesh_rev_nat_value",
                8,
                vec![("vip", 0), ("port", 4), ("pad", 6)],
            ),
            (
                "mesh_sock_rev",
                12,
                vec![
                    ("backend_ip", 0),
                    ("backend_port", 4),
                    ("port", 6),
                    ("vip", 8),
                ],
            ),
            (
                "mesh_flow_key",
                8,
                vec![("src_identity", 0), ("dst_identity", 4)],
            ),
            ("mesh_flow_value", 16, vec![("packets", 0), ("bytes", 8)]),
            (
                "mesh_policy_endpoint",
                12,
                vec![("ingress_table", 0), ("egress_table", 4), ("flags", 8)],
            ),
            (
                "mesh_policy_key",
                16,
                vec![
                    ("prefixlen", 0),
                    ("table", 4),
                    ("remote", 8),
                    ("proto", 12),
                    ("pad", 13),
                    ("port", 14),
                ],
            ),
            (
                "mesh_policy_value",
                12,
                vec![("rule", 0), ("rank", 4), ("verdict", 8), ("pad", 9)],
            ),
            (
                "mesh_policy_netns_value",
                8,
                vec![("identity", 0), ("ip4", 4)],
            ),
            (
                "mesh_policy_reply_key",
                16,
                vec![
                    ("cookie", 0),
                    ("remote_ip", 8),
                    ("remote_port", 12),
                    ("pad", 14),
                ],
            ),
            (
                "mesh_policy_counter_key",
                16,
                vec![
                    ("local", 0),
                    ("remote", 4),
                    ("rule", 8),
                    ("direction", 12),
                    ("verdict", 13),
                    ("pad", 14),
                ],
            ),
            (
                "mesh_policy_counter_value",
                16,
                vec![("packets", 0), ("bytes", 8)],
            ),
            ("mesh_policy_rule_name", 248, vec![("name", 0)]),
            (
                "mesh_flow_event",
                64,
                vec![
                    ("time_ns", 0),
                    ("cookie", 8),
                    ("src_ip", 16),
                    ("dst_ip", 20),
                    ("orig_ip", 24),
                    ("src_identity", 28),
                    ("dst_identity", 32),
                    ("rule", 36),
                    ("src_port", 40),
                    ("dst_port", 42),
                    ("orig_port", 44),
                    ("backend_cluster", 46),
                    ("direction", 48),
                    ("proto", 49),
                    ("verdict", 50),
                    ("reason", 51),
                    ("flags", 52),
                    ("pad", 53),
                ],
            ),
            ("mesh_event_config", 8, vec![("rate", 0), ("burst", 4)]),
            (
                "mesh_event_stats",
                40,
                vec![
                    ("emitted", 0),
                    ("lost_ring_full", 8),
                    ("rate_limited", 16),
                    ("tokens", 24),
                    ("last_ns", 32),
                ],
            ),
            (
                "mesh_event_seen_key",
                16,
                vec![
                    ("cookie", 0),
                    ("remote_ip", 8),
                    ("remote_port", 12),
                    ("direction", 14),
                    ("pad", 15),
                ],
            ),
            (
                "mesh_health_key",
                8,
                vec![("ip", 0), ("port", 4), ("proto", 6), ("pad", 7)],
            ),
            (
                "mesh_health_value",
                32,
                vec![
                    ("last_failure_ns", 0),
                    ("last_success_ns", 8),
                    ("failures", 16),
                    ("successes", 24),
                ],
            ),
            (
                "mesh_quarantine_value",
                16,
                vec![("until_unix_ms", 0), ("failures", 8), ("level", 12)],
            ),
        ];
        assert_eq!(layouts(), expected);
        // aya's LPM key type must have the layout of mesh_ipcache_key.
        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<u32>>(),
            size_of::<IpcacheKey>()
        );
        assert_eq!(
            size_of::<aya::maps::lpm_trie::Key<PolicyKeyData>>(),
            size_of::<PolicyKey>()
        );
    }

    /// Compiles `_Static_assert`s generated from the Rust layouts against
    /// bpf/mesh.h for the BPF target: clang fails, naming the struct and field,
    /// when the C and Rust definitions disagree.
    #[test]
    fn c_layout_matches() {
        let mut src = String::from("#include <stddef.h>\n#include \"mesh.h\"\n");
        for (name, size, fields) in layouts() {
            writeln!(
                src,
                "_Static_assert(sizeof(struct {name}) == {size}, \"sizeof(struct {name}) != {size} (Rust)\");"
            )
            .unwrap();
            for (field, offset) in fields {
                writeln!(
                    src,
                    "_Static_assert(offsetof(struct {name}, {field}) == {offset}, \
                     \"offsetof(struct {name}, {field}) != {offset} (Rust)\");"
                )
                .unwrap();
            }
        }
        for (name, value) in [
            ("MESH_IDENTITY_WORLD", IDENTITY_WORLD),
            ("MESH_IPCACHE_MAX", IPCACHE_MAX),
            ("MESH_SERVICES_MAX", SERVICES_MAX),
            ("MESH_BACKENDS_MAX", BACKENDS_MAX),
            ("MESH_REV_NAT_MAX", REV_NAT_MAX),
            ("MESH_SOCK_REV_MAX", SOCK_REV_MAX),
            ("MESH_FLOWS_MAX", FLOWS_MAX),
            ("MESH_POLICY_ENDPOINTS_MAX", POLICY_ENDPOINTS_MAX),
            ("MESH_POLICY_MAX", POLICY_MAX),
            ("MESH_POLICY_NETNS_MAX", POLICY_NETNS_MAX),
            ("MESH_POLICY_REPLIES_MAX", POLICY_REPLIES_MAX),
            ("MESH_POLICY_COUNTERS_MAX", POLICY_COUNTERS_MAX),
            ("MESH_POLICY_RULES_MAX", POLICY_RULES_MAX),
            ("MESH_IDENTITY_HOST", IDENTITY_HOST),
            ("MESH_POLICY_F_INGRESS_ENFORCED", POLICY_F_INGRESS_ENFORCED),
            ("MESH_POLICY_F_EGRESS_ENFORCED", POLICY_F_EGRESS_ENFORCED),
            ("MESH_POLICY_PREFIX_FIXED", POLICY_PREFIX_FIXED),
            ("MESH_VERDICT_ALLOW", VERDICT_ALLOW.into()),
            ("MESH_VERDICT_DENY", VERDICT_DENY.into()),
            ("MESH_DIRECTION_INGRESS", DIRECTION_INGRESS.into()),
            ("MESH_DIRECTION_EGRESS", DIRECTION_EGRESS.into()),
            ("MESH_RULE_NONE", RULE_NONE),
            ("MESH_POLICY_RULE_NAME_LEN", POLICY_RULE_NAME_LEN as u32),
            ("MESH_EVENTS_RING_BYTES", EVENTS_RING_BYTES),
            ("MESH_EVENT_SEEN_MAX", EVENT_SEEN_MAX),
            ("MESH_HEALTH_MAX", HEALTH_MAX),
            ("MESH_EVENT_FORWARDED", EVENT_FORWARDED.into()),
            ("MESH_EVENT_DROPPED", EVENT_DROPPED.into()),
            ("MESH_DROP_NONE", DROP_NONE.into()),
            ("MESH_DROP_POLICY_DEFAULT", DROP_POLICY_DEFAULT.into()),
            ("MESH_DROP_POLICY_RULE", DROP_POLICY_RULE.into()),
            ("MESH_DROP_NO_BACKEND", DROP_NO_BACKEND.into()),
            ("MESH_EVENT_F_TRANSLATED", EVENT_F_TRANSLATED.into()),
            ("MESH_EVENT_F_POLICY", EVENT_F_POLICY.into()),
        ] {
            writeln!(
                src,
                "_Static_assert({name} == {value}, \"{name} != {value} (Rust)\");"
            )
            .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("layout_check.c");
        std::fs::write(&file, &src).unwrap();
        let bpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf");
        let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
        let out = Command::new(&clang)
            .args(["-target", "bpf", "-fsyntax-only", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-I")
            .arg(&bpf_dir)
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("run {clang} (install it with scripts/setup.sh): {e}"));
        assert!(
            out.status.success(),
            "bpf/mesh.h and mesh-maps/src/layout.rs disagree:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The check must be able to fail: a wrong offset is rejected.
        std::fs::write(
            &file,
            "#include <stddef.h>\n#include \"mesh.h\"\n\
             _Static_assert(offsetof(struct mesh_service_key, slot) == 5, \"x\");\n",
        )
        .unwrap();
        let out = Command::new(&clang)
            .args(["-target", "bpf", "-fsyntax-only"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-I")
            .arg(&bpf_dir)
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "a wrong offset must fail the check");
    }
}
