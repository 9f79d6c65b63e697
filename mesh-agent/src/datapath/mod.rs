//! The eBPF datapath: loads the programs of `bpf/`, pins their maps and links
//! under a per-node bpffs directory, and gives typed access to the maps.
//!
//! Pin layout under [`DatapathConfig::pin_dir`]:
//!
//! ```text
//! <pin_dir>/maps/mesh_ipcache, mesh_services, mesh_backends, mesh_rev_nat, mesh_sock_rev,
//!                mesh_flows
//! <pin_dir>/links/mesh_connect4, mesh_sendmsg4, mesh_recvmsg4, mesh_getpeername4
//! <pin_dir>/maps/mesh_policy_endpoints, mesh_policy, mesh_policy_netns, mesh_policy_replies,
//!                mesh_policy_counters, mesh_policy_rules
//! <pin_dir>/links/mesh_policy_ingress, mesh_sock_ops, mesh_sock_release
//! <pin_dir>/maps/mesh_backend_health, mesh_quarantine
//! <pin_dir>/maps/mesh_events, mesh_event_config, mesh_event_stats, mesh_event_seen
//! <pin_dir>/links/mesh_flows_tc_ingress, mesh_flows_tc_egress
//! ```
//!
//! Everything is pinned, so the programs keep working with the last programmed
//! maps while no agent runs. [`Datapath::open`] reuses the pinned maps as they
//! are (no empty window on restart) and replaces the program of each pinned
//! link in place (`BPF_LINK_UPDATE`), so a restart never attaches twice and
//! never detaches. A pinned link whose target is gone or differs from the
//! configuration (other cgroup, other interface) is replaced.
//!
//! The map layouts, the plain entry types, the bpf(2) calls aya 0.14 lacks
//! (batch updates and lookups, link info and update) and the dump come from
//! mesh-maps, which meshctl shares without this crate's eBPF build; this
//! module loads, attaches and writes. Its only `unsafe` is in `sys` (host
//! syscalls other than bpf(2)).

mod events;
mod health;
mod load;
mod maps;
mod netns;
mod pinned;
mod sys;

pub use events::{EventControl, EventCounters, EventMaps};
pub use maps::{IpcacheWriter, LbWriter};
pub use netns::{NetnsInfo, NetnsScanner};
pub use sys::{async_ring, boottime_ns};

use std::{io, path::PathBuf};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuHashMap},
    programs::{ProgramError, TcAttachType, links::LinkError},
};
use ipnet::IpNet;
pub use mesh_maps::layout;
pub use mesh_maps::{
    BackendValue, DatapathDump, FlowCounters, IdentityPair, IpcacheValue, PROTO_TCP, PROTO_UDP,
    ServiceEntryKey, ServiceEntryValue,
};
use mesh_maps::{
    LbMaps,
    sys::{self as bpf},
};

static SOCK_LB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.bpf.o"));
static FLOWS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flows.bpf.o"));

/// The cgroup sock_addr programs: (program name in sock_lb.bpf.c, attach type).
const SOCK_PROGRAMS: &[(&str, u32)] = &[
    ("mesh_connect4", bpf::BPF_CGROUP_INET4_CONNECT),
    ("mesh_sendmsg4", bpf::BPF_CGROUP_UDP4_SENDMSG),
    ("mesh_recvmsg4", bpf::BPF_CGROUP_UDP4_RECVMSG),
    ("mesh_getpeername4", bpf::BPF_CGROUP_INET4_GETPEERNAME),
];
/// The cgroup_skb program of ingress policy (sock_lb.bpf.c), on the same cgroup.
const POLICY_INGRESS_PROGRAM: &str = "mesh_policy_ingress";
/// The cgroup sock_ops program of passive backend health (sock_lb.bpf.c).
const SOCK_OPS_PROGRAM: &str = "mesh_sock_ops";
/// The cgroup sock_release program that forgets a released socket's translation
/// (sock_lb.bpf.c).
const SOCK_RELEASE_PROGRAM: &str = "mesh_sock_release";
const FLOWS_PROGRAM: &str = "mesh_flows_tc";
const FLOWS_LINKS: &[(&str, TcAttachType, u32)] = &[
    (
        "mesh_flows_tc_ingress",
        TcAttachType::Ingress,
        bpf::BPF_TCX_INGRESS,
    ),
    (
        "mesh_flows_tc_egress",
        TcAttachType::Egress,
        bpf::BPF_TCX_EGRESS,
    ),
];

/// Errors of the datapath. Each names the object (path, map, program, link)
/// and what went wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pin directory {path} is not on a bpffs and {mount_point} is not an empty directory \
         to mount one on"
    )]
    NoBpffs { path: PathBuf, mount_point: PathBuf },
    #[error("mount bpffs on {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("load eBPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program}: reading its info: {source}")]
    ProgramInfo {
        program: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("enabling eBPF run-time statistics (BPF_ENABLE_STATS): {source}")]
    Stats {
        #[source]
        source: io::Error,
    },
    #[error("program {program} is missing from eBPF object {object}")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("program {program}: its link is not a bpf_link (kernel too old?): {source}")]
    LinkFd {
        program: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("map {map} is missing from eBPF object {object}")]
    MissingMap {
        object: &'static str,
        map: &'static str,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {map}, entry {key}: {source}")]
    MapEntry {
        map: &'static str,
        key: String,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "pinned map {path} is {found:?}, this agent expects {expected:?}; remove the pin \
         (after draining the node) to let the agent recreate it"
    )]
    IncompatibleMap {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("map {map} holds an invalid entry: {detail}")]
    InvalidEntry { map: &'static str, detail: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("interface {iface}: {source}")]
    Interface {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{net} is not an IPv4 prefix: the IPv6 maps do not exist yet")]
    NotIpv4 { net: IpNet },
    /// Opening or reading the maps (shared with `meshctl`), or a batch call.
    #[error(transparent)]
    Maps(#[from] mesh_maps::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where and how to set up the datapath of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Per-node directory on bpffs for the pinned maps and links, e.g.
    /// `/sys/fs/bpf/mesh/<node>`. If it is not on a bpffs, one is mounted on
    /// its nearest existing ancestor when that is an empty directory.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory whose processes get socket load balancing.
    pub cgroup_path: PathBuf,
    /// Interface (in the caller's network namespace) to count flows on, at
    /// ingress and egress; `None` detaches a previously attached classifier.
    pub flow_iface: Option<String>,
    /// Network namespace (a path such as `/run/netns/<name>`) in which
    /// `flow_iface` lives; `None` is the caller's.
    pub flow_netns: Option<PathBuf>,
}

impl DatapathConfig {
    /// Socket load balancing for `cgroup_path`, no flow accounting.
    pub fn new(pin_dir: impl Into<PathBuf>, cgroup_path: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            cgroup_path: cgroup_path.into(),
            flow_iface: None,
            flow_netns: None,
        }
    }

    /// Counts flows on `iface` (in the caller's network namespace).
    pub fn with_flow_iface(mut self, iface: impl Into<String>) -> Self {
        self.flow_iface = Some(iface.into());
        self
    }

    /// The network namespace of the flow interface.
    pub fn with_flow_netns(mut self, netns: impl Into<PathBuf>) -> Self {
        self.flow_netns = Some(netns.into());
        self
    }
}

/// Whether [`Datapath::open`] attached a program or took over a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// A new link was attached and pinned.
    Attached,
    /// A pinned link to the same target existed; its program was replaced.
    Reused,
}

/// One pinned program link after [`Datapath::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub name: &'static str,
    pub pin: PathBuf,
    pub state: LinkState,
}

/// The loaded datapath of one node. Dropping it (or [`Datapath::close`])
/// leaves the programs attached and the maps pinned; [`Datapath::unpin_all`]
/// tears everything down.
pub struct Datapath {
    pin_dir: PathBuf,
    /// Services, backends and ipcache: typed handles and raw ones for batches.
    lb: LbMaps,
    flows: PerCpuHashMap<MapData, layout::FlowKey, layout::FlowValue>,
    /// The network-policy maps.
    policy: mesh_maps::policy::PolicyMaps,
    /// The flow-event maps, until [`Datapath::take_events`].
    events: Option<EventMaps>,
    /// Passive backend health: the datapath's counters and the agent's quarantines.
    health: health::HealthMaps,
    _rev_nat: HashMap<MapData, layout::RevNatKey, layout::RevNatValue>,
    batch: BatchSupport,
    links: Vec<LinkStatus>,
    // The loaded objects; their programs stay attached through the pinned
    // links, these only keep the program file descriptors for our lifetime.
    objects: Vec<Ebpf>,
}

/// The kernel's accounting of one of this datapath's programs: total run time and runs,
/// counted only while run-time statistics are on ([`RunTimeStats::enable`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time: std::time::Duration,
    pub run_count: u64,
}

/// Kernel-wide eBPF run-time statistics (`BPF_ENABLE_STATS`), on while this value lives.
/// They cost every program on the machine two clock reads per run: for benchmarks and
/// diagnosis, not for the agent's normal operation.
#[derive(Debug)]
pub struct RunTimeStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<Self> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| Self { _fd: fd })
            .map_err(|e| Error::Stats {
                source: io::Error::other(e),
            })
    }
}

/// Run time and runs of every program loaded in the kernel (by any process: the agents of a
/// lab's nodes included) whose name is in `names` (as the kernel keeps it: its first 15
/// bytes), summed per name, in the order of `names`
/// (zero unless [`RunTimeStats`] are on). A program unloaded while the kernel's list is
/// walked (or that cannot be opened) is left out: the caller sees no runs for it.
pub fn kernel_program_stats(names: &[&str]) -> Vec<ProgramStats> {
    let mut out: Vec<ProgramStats> = names
        .iter()
        .map(|n| ProgramStats {
            name: (*n).to_owned(),
            run_time: std::time::Duration::ZERO,
            run_count: 0,
        })
        .collect();
    for info in aya::programs::loaded_programs() {
        let Ok(info) = info else { continue };
        let Some(name) = info.name_as_str() else {
            continue;
        };
        // The kernel keeps the first BPF_OBJ_NAME_LEN - 1 = 15 bytes of a program's name.
        if let Some(s) = out
            .iter_mut()
            .find(|s| s.name.get(..s.name.len().min(15)) == Some(name))
        {
            s.run_time += info.run_time();
            s.run_count += info.run_count();
        }
    }
    out
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

use maps::*;
pub use pinned::unpin_dir;
use pinned::*;

#[cfg(test)]
mod tests;
