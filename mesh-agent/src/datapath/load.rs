//! The eBPF datapath: loads the programs of `bpf/`, pins their maps and links
//! under a per-node bpffs directory, and gives typed access to the maps.
//!
//! Pin layout under [`DatapathConfig::pin_dir`]:
//!
//! ```text
//! <pin_dir>/maps/mesh_ipcache, mesh_services, mesh_backends, mesh_rev_nat, mesh_flows
//! <pin_dir>/links/mesh_connect4, mesh_sendmsg4, mesh_recvmsg4, mesh_getpeername4
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

mod sys;

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuHashMap, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError},
        tc::TcAttachOptions,
    },
    sys::SyscallError,
};
use ipnet::IpNet;
pub use mesh_maps::layout;
use mesh_maps::{
    BATCH_CHUNK, LbMaps, LbRawMaps, MAP_BACKENDS, MAP_FLOWS, MAP_IPCACHE, MAP_REV_NAT,
    MAP_SERVICES,
    sys::{self as bpf, Access, BatchError, RawMap},
};
pub use mesh_maps::{
    BackendValue, DatapathDump, FlowCounters, IdentityPair, IpcacheValue, PROTO_TCP, PROTO_UDP,
    ServiceEntryKey, ServiceEntryValue,
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
    _rev_nat: HashMap<MapData, layout::RevNatKey, layout::RevNatValue>,
    batch: BatchSupport,
    links: Vec<LinkStatus>,
    // The loaded objects; their programs stay attached through the pinned
    // links, these only keep the program file descriptors for our lifetime.
    _objects: Vec<Ebpf>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

// === impl Datapath ===

impl Datapath {
    /// Loads the programs, creates or reuses the pinned maps, and attaches or
    /// takes over the pinned links (see the module documentation).
    pub fn open(config: DatapathConfig) -> Result<Self> {
        let DatapathConfig {
            pin_dir,
            cgroup_path,
            flow_iface,
            flow_netns,
        } = config;
        ensure_bpffs(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }

        check_pinned_maps(&maps_dir)?;
        let mut sock_lb = load_object("sock_lb.bpf.o", SOCK_LB_OBJ, &maps_dir)?;
        // Typed handles first: nothing is attached if a map is not as expected.
        let services = take_map(&mut sock_lb, MAP_SERVICES)?;
        let backends = take_map(&mut sock_lb, MAP_BACKENDS)?;
        let ipcache = take_map(&mut sock_lb, MAP_IPCACHE)?;
        let flows = take_map(&mut sock_lb, MAP_FLOWS)?;
        // Only the programs use its content; held so its fd stays valid
        // until the programs are loaded.
        let rev_nat = take_map(&mut sock_lb, MAP_REV_NAT)?;
        let mut links = Vec::new();

        let cgroup = fs::File::open(&cgroup_path).map_err(|source| Error::Cgroup {
            path: cgroup_path.clone(),
            source,
        })?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(|source| Error::Cgroup {
                path: cgroup_path.clone(),
                source,
            })?
            .ino();
        for &(name, attach_type) in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = sock_lb
                .program_mut(name)
                .ok_or(Error::MissingProgram {
                    object: "sock_lb.bpf.o",
                    program: name,
                })?
                .try_into()
                .map_err(program_err(name))?;
            prog.load().map_err(program_err(name))?;
            let prog_fd = program_fd(name, prog.fd())?;
            let pin = links_dir.join(name);
            let expect = ExpectedLink {
                link_type: bpf::BPF_LINK_TYPE_CGROUP,
                target: cgroup_id,
                attach_type,
            };
            let state = ensure_link(&pin, &prog_fd, expect, || {
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(program_err(name))?;
                let link = prog.take_link(id).map_err(program_err(name))?;
                FdLink::try_from(link).map_err(|source| Error::LinkFd {
                    program: name,
                    source,
                })
            })?;
            links.push(LinkStatus { name, pin, state });
        }

        let mut objects = Vec::new();
        match &flow_iface {
            Some(iface) => {
                let mut flows = load_object("flows.bpf.o", FLOWS_OBJ, &maps_dir)?;
                let flows_ref = &mut flows;
                let links_dir = &links_dir;
                let mut attach = move || attach_flows(flows_ref, iface, links_dir);
                let flow_links = match &flow_netns {
                    Some(netns) => {
                        sys::run_in_netns(netns, attach).map_err(|source| Error::Netns {
                            path: netns.clone(),
                            source,
                        })??
                    }
                    None => attach()?,
                };
                links.extend(flow_links);
                objects.push(flows);
            }
            None => {
                for &(name, _, _) in FLOWS_LINKS {
                    remove_pin(&links_dir.join(name))?;
                }
            }
        }

        objects.push(sock_lb);
        let raw = LbRawMaps::open_pinned(&maps_dir, Access::ReadWrite)?;

        tracing::info!(pin_dir = %pin_dir.display(), cgroup = %cgroup_path.display(),
            flow_iface = ?flow_iface, ?links, "datapath open");
        Ok(Self {
            pin_dir,
            lb: LbMaps {
                services,
                backends,
                ipcache,
                raw,
            },
            flows,
            _rev_nat: rev_nat,
            batch: BatchSupport {
                services: true,
                backends: true,
                ipcache: true,
            },
            links,
            _objects: objects,
        })
    }

    /// The links set up by [`Datapath::open`], and whether each was reused.
    pub fn links(&self) -> &[LinkStatus] {
        &self.links
    }

    /// The per-node pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Closes the maps and program handles. Programs stay attached and the
    /// maps pinned, so sockets keep being load balanced with the current maps.
    pub fn close(self) {}

    /// Detaches every program and removes the pinned maps and links of this
    /// node (agent teardown).
    pub fn unpin_all(self) -> Result<()> {
        let pin_dir = self.pin_dir.clone();
        drop(self);
        unpin_dir(&pin_dir)
    }

    // --- services ---

    /// Inserts or replaces one slot of `mesh_services`.
    pub fn upsert_service_slot(
        &mut self,
        key: ServiceEntryKey,
        value: ServiceEntryValue,
    ) -> Result<()> {
        self.lb
            .services
            .insert(
                layout::ServiceKey::from(key),
                layout::ServiceValue::from(value),
                0,
            )
            .map_err(entry_err(MAP_SERVICES, &key))
    }

    /// Removes one slot; `Ok(false)` if it did not exist.
    pub fn remove_service_slot(&mut self, key: ServiceEntryKey) -> Result<bool> {
        removed(self.lb.services.remove(&layout::ServiceKey::from(key)))
            .map_err(entry_err(MAP_SERVICES, &key))
    }

    /// One slot of `mesh_services`, if present.
    pub fn service_slot(&self, key: ServiceEntryKey) -> Result<Option<ServiceEntryValue>> {
        found(self.lb.services.get(&layout::ServiceKey::from(key), 0))
            .map(|v| v.map(ServiceEntryValue::from))
            .map_err(entry_err(MAP_SERVICES, &key))
    }

    // --- backends ---

    /// Inserts or replaces backend `id` (never 0).
    pub fn upsert_backend(&mut self, id: u32, value: BackendValue) -> Result<()> {
        self.lb
            .backends
            .insert(id, layout::BackendValue::from(value), 0)
            .map_err(entry_err(MAP_BACKENDS, &id))
    }

    /// Removes backend `id`; `Ok(false)` if it did not exist.
    pub fn remove_backend(&mut self, id: u32) -> Result<bool> {
        removed(self.lb.backends.remove(&id)).map_err(entry_err(MAP_BACKENDS, &id))
    }

    /// Backend `id`, if present.
    pub fn backend(&self, id: u32) -> Result<Option<BackendValue>> {
        found(self.lb.backends.get(&id, 0))
            .map(|v| v.map(BackendValue::from))
            .map_err(entry_err(MAP_BACKENDS, &id))
    }

    // --- ipcache ---

    /// Inserts or replaces the ipcache entry of a prefix (IPv4 only for now).
    pub fn upsert_ipcache(&mut self, net: IpNet, value: IpcacheValue) -> Result<()> {
        let key = ipcache_key(net)?;
        self.lb
            .ipcache
            .insert(&key, layout::IpcacheValue::from(value), 0)
            .map_err(entry_err(MAP_IPCACHE, &net))
    }

    /// Removes the ipcache entry of exactly this prefix; `Ok(false)` if absent.
    pub fn remove_ipcache(&mut self, net: IpNet) -> Result<bool> {
        let key = ipcache_key(net)?;
        removed(self.lb.ipcache.remove(&key)).map_err(entry_err(MAP_IPCACHE, &net))
    }

    /// Longest-prefix match of an address, as the programs see it.
    pub fn ipcache_lookup(&self, ip: Ipv4Addr) -> Result<Option<IpcacheValue>> {
        let key = Key::new(32, mesh_maps::ip_to_raw(ip));
        found(self.lb.ipcache.get(&key, 0))
            .map(|v| v.map(IpcacheValue::from))
            .map_err(entry_err(MAP_IPCACHE, &ip))
    }

    // --- batches ---

    /// Inserts or replaces many backends with few syscalls (`BPF_MAP_UPDATE_BATCH`,
    /// per entry on kernels without it), in order. On error, the entries
    /// before the failing one are written.
    pub fn upsert_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<()> {
        let keys: Vec<u32> = entries.iter().map(|(id, _)| *id).collect();
        let values: Vec<layout::BackendValue> = entries.iter().map(|(_, v)| (*v).into()).collect();
        let LbMaps { backends, raw, .. } = &mut self.lb;
        batch_update(
            &mut self.batch.backends,
            &raw.backends,
            &keys,
            &values,
            |i| {
                backends
                    .insert(keys[i], values[i], 0)
                    .map_err(entry_err(MAP_BACKENDS, &keys[i]))
            },
        )
    }

    /// Inserts or replaces many service slots, in order (see [`Self::upsert_backends`]).
    pub fn upsert_service_slots(
        &mut self,
        entries: &[(ServiceEntryKey, ServiceEntryValue)],
    ) -> Result<()> {
        let keys: Vec<layout::ServiceKey> = entries.iter().map(|(k, _)| (*k).into()).collect();
        let values: Vec<layout::ServiceValue> = entries.iter().map(|(_, v)| (*v).into()).collect();
        let LbMaps { services, raw, .. } = &mut self.lb;
        batch_update(
            &mut self.batch.services,
            &raw.services,
            &keys,
            &values,
            |i| {
                services
                    .insert(keys[i], values[i], 0)
                    .map_err(entry_err(MAP_SERVICES, &entries[i].0))
            },
        )
    }

    /// Inserts or replaces many ipcache entries, in order (see
    /// [`Self::upsert_backends`]). IPv6 prefixes are refused before anything
    /// is written.
    pub fn upsert_ipcache_entries(&mut self, entries: &[(IpNet, IpcacheValue)]) -> Result<()> {
        let keys = entries
            .iter()
            .map(|(net, _)| ipcache_key(*net))
            .collect::<Result<Vec<Key<u32>>>>()?;
        let values: Vec<layout::IpcacheValue> = entries.iter().map(|(_, v)| (*v).into()).collect();
        let LbMaps { ipcache, raw, .. } = &mut self.lb;
        batch_update(&mut self.batch.ipcache, &raw.ipcache, &keys, &values, |i| {
            ipcache
                .insert(&keys[i], values[i], 0)
                .map_err(entry_err(MAP_IPCACHE, &entries[i].0))
        })
    }

    // --- whole state ---

    /// Reads every entry of the service, backend and ipcache maps (batched
    /// lookups where the kernel offers them, else one entry at a time).
    pub fn dump(&self) -> Result<DatapathDump> {
        Ok(self.lb.dump()?)
    }

    /// Flow counters per identity pair, summed over CPUs.
    pub fn flows(&self) -> Result<BTreeMap<IdentityPair, FlowCounters>> {
        Ok(mesh_maps::sum_flows(&self.flows)?)
    }
}

/// Detaches the programs and removes the pinned maps and links under
/// `pin_dir`, without needing an open [`Datapath`]. Missing pins are fine.
pub fn unpin_dir(pin_dir: &Path) -> Result<()> {
    // Links first: the programs detach as soon as their last pin goes.
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::PinDir { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
            remove_pin(&entry.path())?;
        }
        remove_dir(&dir)?;
    }
    remove_dir(pin_dir)
}

// === helpers ===

/// Per map: whether the kernel took batch updates so far (cleared the first
/// time it refuses one, so later writes go entry by entry at once).
struct BatchSupport {
    services: bool,
    backends: bool,
    ipcache: bool,
}

/// Writes `keys[i] -> values[i]` in chunks with `BPF_MAP_UPDATE_BATCH`;
/// per entry with `single(i)` when the kernel does not offer batches.
fn batch_update<K: aya::Pod, V: aya::Pod>(
    supported: &mut bool,
    raw: &RawMap,
    keys: &[K],
    values: &[V],
    mut single: impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    let map = raw.name();
    let mut start = 0;
    let mut batching = *supported;
    while batching && start < keys.len() {
        let end = (start + BATCH_CHUNK).min(keys.len());
        match raw.update_batch(&keys[start..end], &values[start..end]) {
            Ok(()) => start = end,
            Err(e) if e.is_unsupported() => {
                tracing::debug!(map, error = %e, "no batch updates; writing entry by entry");
                *supported = false;
                batching = false;
            }
            Err(BatchError::Kernel {
                done, source: e, ..
            }) => {
                // Go on entry by entry: the failing entry gets an error that
                // names it, or succeeds (e.g. memory was short) and we go on.
                tracing::debug!(map, error = %e, done, "batch update stopped");
                start += done;
                batching = false;
            }
            // A layout mismatch is a bug of this build: writing entry by
            // entry would not fix it.
            Err(e) => return Err(mesh_maps::Error::from(e).into()),
        }
    }
    for i in start..keys.len() {
        single(i)?;
    }
    Ok(())
}

/// Loads the classifier and attaches it at TCX ingress and egress of `iface`
/// (in the calling thread's network namespace), reusing pinned links.
fn attach_flows(flows: &mut Ebpf, iface: &str, links_dir: &Path) -> Result<Vec<LinkStatus>> {
    let ifindex = sys::ifindex(iface).map_err(|source| Error::Interface {
        iface: iface.to_owned(),
        source,
    })?;
    let prog: &mut SchedClassifier = flows
        .program_mut(FLOWS_PROGRAM)
        .ok_or(Error::MissingProgram {
            object: "flows.bpf.o",
            program: FLOWS_PROGRAM,
        })?
        .try_into()
        .map_err(program_err(FLOWS_PROGRAM))?;
    prog.load().map_err(program_err(FLOWS_PROGRAM))?;
    let prog_fd = program_fd(FLOWS_PROGRAM, prog.fd())?;
    let mut links = Vec::new();
    for &(name, tc_type, attach_type) in FLOWS_LINKS {
        let pin = links_dir.join(name);
        let expect = ExpectedLink {
            link_type: bpf::BPF_LINK_TYPE_TCX,
            target: u64::from(ifindex),
            attach_type,
        };
        let state = ensure_link(&pin, &prog_fd, expect, || {
            let id = prog
                .attach_with_options(
                    iface,
                    tc_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(program_err(FLOWS_PROGRAM))?;
            let link = prog.take_link(id).map_err(program_err(FLOWS_PROGRAM))?;
            FdLink::try_from(link).map_err(|source| Error::LinkFd {
                program: FLOWS_PROGRAM,
                source,
            })
        })?;
        links.push(LinkStatus { name, pin, state });
    }
    Ok(links)
}

#[derive(Clone, Copy, Debug)]
struct ExpectedLink {
    link_type: u32,
    target: u64,
    attach_type: u32,
}

/// Takes over the link pinned at `pin` if it is attached where expected
/// (replacing its program in place), else replaces it with a new one.
fn ensure_link(
    pin: &Path,
    prog_fd: &OwnedFd,
    expect: ExpectedLink,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<LinkState> {
    let link_err = |source| Error::Link {
        path: pin.to_path_buf(),
        source,
    };
    match bpf::obj_get(pin, Access::ReadWrite) {
        Ok(link) => {
            let info = bpf::link_info(link.as_fd()).map_err(link_err)?;
            if info.link_type == expect.link_type
                && info.target == expect.target
                && info.attach_type == expect.attach_type
            {
                bpf::link_update(link.as_fd(), prog_fd.as_fd()).map_err(link_err)?;
                return Ok(LinkState::Reused);
            }
            tracing::info!(pin = %pin.display(), ?info, ?expect,
                "pinned link attached elsewhere or defunct; replacing it");
            // Removing the pin and closing our fd detaches the old link.
            fs::remove_file(pin).map_err(link_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(link_err(e)),
    }
    let link = attach()?;
    link.pin(pin).map_err(|e| Error::Link {
        path: pin.to_path_buf(),
        source: io::Error::other(e),
    })?;
    Ok(LinkState::Attached)
}

/// Makes sure `pin_dir` will be on a bpffs: fine if its nearest existing
/// ancestor is on one; otherwise mounts one there if it is an empty directory.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing.parent().ok_or_else(|| Error::NoBpffs {
            path: pin_dir.to_path_buf(),
            mount_point: PathBuf::from("/"),
        })?;
    }
    let on_bpffs = sys::is_bpffs(existing).map_err(|source| Error::PinDir {
        path: existing.to_path_buf(),
        source,
    })?;
    if on_bpffs {
        return Ok(());
    }
    let empty_dir = fs::read_dir(existing)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(false);
    if !empty_dir {
        return Err(Error::NoBpffs {
            path: pin_dir.to_path_buf(),
            mount_point: existing.to_path_buf(),
        });
    }
    sys::mount_bpffs(existing).map_err(|source| Error::MountBpffs {
        path: existing.to_path_buf(),
        source,
    })?;
    tracing::info!(path = %existing.display(), "mounted bpffs");
    Ok(())
}

/// Refuses to reuse a pinned map whose type, sizes or flags differ from what
/// this build's programs expect (e.g. left by an agent with another layout).
fn check_pinned_maps(maps_dir: &Path) -> Result<()> {
    for (map, want) in layout::expected_shapes() {
        let path = maps_dir.join(map);
        let found = match RawMap::open_pinned(&path, map, Access::ReadOnly) {
            Ok(raw) => raw.shape(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::PinDir { path, source }),
        };
        if found != want {
            return Err(Error::IncompatibleMap {
                path,
                found: format!("{found:?}"),
                expected: format!("{want:?}"),
            });
        }
    }
    Ok(())
}

fn load_object(object: &'static str, bytes: &[u8], maps_dir: &Path) -> Result<Ebpf> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(bytes)
        .map_err(|source| Error::Load {
            object,
            source: Box::new(source),
        })
}

fn take_map<M>(ebpf: &mut Ebpf, map: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let raw = ebpf.take_map(map).ok_or(Error::MissingMap {
        object: "sock_lb.bpf.o",
        map,
    })?;
    M::try_from(raw).map_err(map_err(map))
}

fn program_fd(
    program: &'static str,
    fd: Result<&aya::programs::ProgramFd, ProgramError>,
) -> Result<OwnedFd> {
    fd.map_err(program_err(program))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::Program {
            program,
            source: Box::new(ProgramError::IOError(e)),
        })
}

fn ipcache_key(net: IpNet) -> Result<Key<u32>> {
    match net {
        IpNet::V4(v4) => Ok(Key::new(
            u32::from(v4.prefix_len()),
            mesh_maps::ip_to_raw(v4.network()),
        )),
        IpNet::V6(_) => Err(Error::NotIpv4 { net }),
    }
}

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

fn removed(r: Result<(), MapError>) -> Result<bool, MapError> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn found<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn program_err<E: Into<ProgramError>>(program: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Program {
        program,
        source: Box::new(e.into()),
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        map,
        source: Box::new(source),
    }
}

fn entry_err<K: std::fmt::Debug>(map: &'static str, key: &K) -> impl FnOnce(MapError) -> Error {
    let key = format!("{key:?}");
    move |source| Error::MapEntry {
        map,
        key,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Datapath>();
    }

    #[test]
    fn ipv6_prefixes_are_refused_with_the_prefix_named() {
        let net: IpNet = "fd00::/64".parse().unwrap();
        let Err(err) = ipcache_key(net) else {
            panic!("an IPv6 prefix must be refused");
        };
        assert!(err.to_string().contains("fd00::/64"), "{err}");
        let key = ipcache_key("10.1.2.0/24".parse().unwrap()).unwrap();
        assert_eq!(key.prefix_len(), 24);
        assert_eq!(key.data().to_ne_bytes(), [10, 1, 2, 0]);
    }
}
