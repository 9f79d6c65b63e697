//! The eBPF maps of a node as Rust sees them, without loading anything:
//!
//! - [`layout`]: `#[repr(C)]` mirrors of `bpf/mesh.h` (the raw map entries),
//!   the map sizes and the shape every pinned map must have;
//! - the plain types of the crate root ([`ServiceEntryKey`], [`BackendValue`],
//!   [`DatapathDump`], ...), in host order, converted to and from the layouts;
//! - [`sys`]: the bpf(2) commands aya 0.14 lacks (read-only opening of pins,
//!   map and link info, `BPF_LINK_UPDATE`, batch updates and lookups checked
//!   against the map's key and value sizes);
//! - [`open_pinned_readonly`]: a node's pinned maps opened with `BPF_F_RDONLY`
//!   and dumped, for meshctl and the benchmarks;
//! - [`policy`]: the network-policy maps (dump, counters, writes, and the plan of writes
//!   from one content to another).
//!
//! No build script and no eBPF objects: loading and attaching the programs is
//! mesh-agent's job, so meshctl can read maps without clang or the agent.
//! `unsafe` lives in `layout` (the `aya::Pod` impls) and `sys` (the syscalls).

#[cfg(test)]
mod kernel_tests;
pub mod layout;
mod pinned;
pub mod policy;
pub mod sys;
mod types;

pub use pinned::{
    BATCH_CHUNK, Error, LbMaps, LbRawMaps, PinnedMaps, QuarantinedBackend, Result,
    open_pinned_readonly, read_quarantines, sum_flows,
};
pub use types::{
    BackendValue, DatapathDump, FlowCounters, IdentityPair, IpcacheValue, PROTO_TCP, PROTO_UDP,
    ServiceEntryKey, ServiceEntryValue, ip_from_raw, ip_to_raw,
};

/// Map names: the names in the eBPF objects and of the pins under
/// `<pin_dir>/maps/`.
pub const MAP_IPCACHE: &str = "mesh_ipcache";
pub const MAP_SERVICES: &str = "mesh_services";
pub const MAP_BACKENDS: &str = "mesh_backends";
pub const MAP_REV_NAT: &str = "mesh_rev_nat";
pub const MAP_SOCK_REV: &str = "mesh_sock_rev";
pub const MAP_FLOWS: &str = "mesh_flows";
pub const MAP_POLICY_ENDPOINTS: &str = "mesh_policy_endpoints";
pub const MAP_POLICY: &str = "mesh_policy";
pub const MAP_POLICY_NETNS: &str = "mesh_policy_netns";
pub const MAP_POLICY_REPLIES: &str = "mesh_policy_replies";
pub const MAP_POLICY_COUNTERS: &str = "mesh_policy_counters";
pub const MAP_POLICY_RULES: &str = "mesh_policy_rules";
pub const MAP_EVENTS: &str = "mesh_events";
pub const MAP_EVENT_CONFIG: &str = "mesh_event_config";
pub const MAP_EVENT_STATS: &str = "mesh_event_stats";
pub const MAP_EVENT_SEEN: &str = "mesh_event_seen";
pub const MAP_BACKEND_HEALTH: &str = "mesh_backend_health";
pub const MAP_QUARANTINE: &str = "mesh_quarantine";
