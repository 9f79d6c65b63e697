//! Handles on a node's maps and the whole-map reads: the dump of the service,
//! backend and ipcache maps (shared by the agent's `Datapath` and the
//! read-only [`PinnedMaps`]) and the flow counters.

use std::{collections::BTreeMap, io, net::Ipv4Addr, path::Path, path::PathBuf};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuHashMap};
use ipnet::{IpNet, Ipv4Net};

use crate::sys::{Access, BatchError, RawMap};
use crate::{
    BackendValue, DatapathDump, FlowCounters, IdentityPair, IpcacheValue, MAP_BACKENDS, MAP_FLOWS,
    MAP_IPCACHE, MAP_SERVICES, ServiceEntryKey, ServiceEntryValue, ip_from_raw, layout,
};

/// Errors of opening and reading maps. Each names the map or the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {map} holds an invalid entry: {detail}")]
    InvalidEntry { map: &'static str, detail: String },
    #[error(transparent)]
    Batch(#[from] BatchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Entries per batch syscall.
pub const BATCH_CHUNK: usize = 8192;

/// The load-balancing maps and the ipcache: typed handles (aya) for single
/// entries and iteration, raw ones for the batch calls aya 0.14 lacks.
pub struct LbMaps {
    pub services: HashMap<MapData, layout::ServiceKey, layout::ServiceValue>,
    pub backends: HashMap<MapData, u32, layout::BackendValue>,
    pub ipcache: LpmTrie<MapData, u32, layout::IpcacheValue>,
    pub raw: LbRawMaps,
}

/// Second handles on the maps of [`LbMaps`], for the batch calls.
pub struct LbRawMaps {
    pub services: RawMap,
    pub backends: RawMap,
    pub ipcache: RawMap,
}

impl LbRawMaps {
    /// Opens the three maps pinned under `maps_dir`.
    pub fn open_pinned(maps_dir: &Path, access: Access) -> Result<Self> {
        let open = |map: &'static str| {
            let path = maps_dir.join(map);
            RawMap::open_pinned(&path, map, access).map_err(|source| Error::PinDir { path, source })
        };
        Ok(Self {
            services: open(MAP_SERVICES)?,
            backends: open(MAP_BACKENDS)?,
            ipcache: open(MAP_IPCACHE)?,
        })
    }
}

// === impl LbMaps ===

impl LbMaps {
    /// Every entry of the service, backend and ipcache maps (batched lookups
    /// where the kernel offers them, else one entry at a time), in that
    /// order: a dump that overlaps an update can see a slot whose backend was
    /// just removed.
    pub fn dump(&self) -> Result<DatapathDump> {
        let mut dump = self.dump_services()?;
        let ipcache = read_all(&self.raw.ipcache, || {
            self.ipcache
                .iter()
                .map(|r| {
                    r.map(|(k, v)| {
                        (
                            layout::IpcacheKey {
                                prefixlen: k.prefix_len(),
                                ip4: k.data(),
                            },
                            v,
                        )
                    })
                })
                .collect()
        })?;
        for (k, v) in ipcache {
            let net = u8::try_from(k.prefixlen)
                .ok()
                .and_then(|len| Ipv4Net::new(ip_from_raw(k.ip4), len).ok())
                .ok_or_else(|| Error::InvalidEntry {
                    map: MAP_IPCACHE,
                    detail: format!("prefix length {} of {:?}", k.prefixlen, k.ip4),
                })?;
            dump.ipcache.insert(IpNet::V4(net), v.into());
        }
        Ok(dump)
    }
}

impl LbMaps {
    /// The service and backend maps only (the ipcache left empty): what a reader of
    /// services needs, without reading a large ipcache.
    pub fn dump_services(&self) -> Result<DatapathDump> {
        let mut dump = DatapathDump::default();
        let services = read_all(&self.raw.services, || self.services.iter().collect())?;
        for (k, v) in services {
            dump.services.insert(k.into(), v.into());
        }
        let backends = read_all(&self.raw.backends, || self.backends.iter().collect())?;
        for (k, v) in backends {
            dump.backends.insert(k, v.into());
        }
        Ok(dump)
    }

    /// One entry of the service map (a frontend's master or one of its slots), read
    /// with a single lookup: for readers that follow a few frontends, where a dump
    /// walks every bucket of the map.
    pub fn service(&self, key: ServiceEntryKey) -> Result<Option<ServiceEntryValue>> {
        match self.services.get(&key.into(), 0) {
            Ok(v) => Ok(Some(v.into())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_SERVICES)(e)),
        }
    }

    /// One entry of the backend map, read with a single lookup.
    pub fn backend(&self, id: u32) -> Result<Option<BackendValue>> {
        match self.backends.get(&id, 0) {
            Ok(v) => Ok(Some(v.into())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_BACKENDS)(e)),
        }
    }
}

/// Flow counters per identity pair, summed over CPUs.
pub fn sum_flows(
    flows: &PerCpuHashMap<MapData, layout::FlowKey, layout::FlowValue>,
) -> Result<BTreeMap<IdentityPair, FlowCounters>> {
    let mut out = BTreeMap::new();
    for entry in flows.iter() {
        let (k, per_cpu) = entry.map_err(map_err(MAP_FLOWS))?;
        let sum = per_cpu
            .iter()
            .fold(FlowCounters::default(), |acc, v| FlowCounters {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            });
        out.insert(
            IdentityPair {
                src: k.src_identity,
                dst: k.dst_identity,
            },
            sum,
        );
    }
    Ok(out)
}

/// Reads a whole map with batched lookups, or with `iterate` when the kernel
/// does not offer them for this map type.
fn read_all<K: aya::Pod + Default, V: aya::Pod + Default>(
    raw: &RawMap,
    iterate: impl FnOnce() -> Result<Vec<(K, V)>, MapError>,
) -> Result<Vec<(K, V)>> {
    match raw.lookup_all(BATCH_CHUNK) {
        Ok(entries) => Ok(entries),
        Err(e) if e.is_unsupported() => {
            tracing::debug!(map = raw.name(), error = %e, "no batch lookups; iterating");
            iterate().map_err(map_err(raw.name()))
        }
        Err(e) => Err(e.into()),
    }
}

/// `MapError` of `map` as an [`Error`].
pub(crate) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        map,
        source: Box::new(source),
    }
}

/// Read-only handles on a node's pinned maps (`meshctl bpf`, `meshctl flows`, the
/// benchmarks): every fd is opened with `BPF_F_RDONLY`, so the kernel refuses any
/// write through them; no program is loaded and nothing is attached.
pub struct PinnedMaps {
    pub(crate) lb: LbMaps,
    pub(crate) flows: PerCpuHashMap<MapData, layout::FlowKey, layout::FlowValue>,
    /// `None` when the node's agent predates passive health.
    pub(crate) quarantine:
        Option<aya::maps::HashMap<MapData, layout::HealthKey, layout::QuarantineValue>>,
}

/// A backend the node's agent quarantined (passive health).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QuarantinedBackend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub until_unix_ms: u64,
    pub failures: u32,
    pub level: u32,
}

/// The quarantines of a `mesh_quarantine` map, by address.
pub fn read_quarantines(
    map: &aya::maps::HashMap<MapData, layout::HealthKey, layout::QuarantineValue>,
) -> Result<Vec<QuarantinedBackend>> {
    let mut out = map
        .iter()
        .map(|r| {
            r.map(|(k, v)| QuarantinedBackend {
                ip: crate::types::ip_from_raw(k.ip),
                port: u16::from_be(k.port),
                proto: k.proto,
                until_unix_ms: v.until_unix_ms,
                failures: v.failures,
                level: v.level,
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(map_err(crate::MAP_QUARANTINE))?;
    out.sort();
    Ok(out)
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps").finish_non_exhaustive()
    }
}

/// Opens the map `map` pinned under `maps_dir`, naming the path when it is missing.
pub(crate) fn open_raw(maps_dir: &Path, map: &'static str, access: Access) -> Result<RawMap> {
    let path = maps_dir.join(map);
    if !path.exists() {
        return Err(Error::PinDir {
            path,
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no pinned map (is an agent running on this node?)",
            ),
        });
    }
    RawMap::open_pinned(&path, map, access).map_err(|source| Error::PinDir { path, source })
}

/// aya's typed handle on a duplicate of `raw`'s fd (aya checks the key and value sizes
/// against the map's info).
pub(crate) fn typed<M>(raw: &RawMap) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = raw.name();
    let fd = raw
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(map)(MapError::IoError(e)))?;
    let data = MapData::from_fd(fd).map_err(map_err(map))?;
    let any = aya::maps::Map::from_map_data(data).map_err(map_err(map))?;
    M::try_from(any).map_err(map_err(map))
}

/// Opens the maps pinned under `<pin_dir>/maps` by an agent, read-only.
pub fn open_pinned_readonly(pin_dir: &Path) -> Result<PinnedMaps> {
    let maps_dir = pin_dir.join("maps");
    let open = |map| open_raw(&maps_dir, map, Access::ReadOnly);
    let raw = LbRawMaps {
        services: open(MAP_SERVICES)?,
        backends: open(MAP_BACKENDS)?,
        ipcache: open(MAP_IPCACHE)?,
    };
    let flows_raw = open(MAP_FLOWS)?;
    let quarantine = match open(crate::MAP_QUARANTINE) {
        Ok(raw) => Some(typed(&raw)?),
        Err(Error::PinDir { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(PinnedMaps {
        quarantine,
        lb: LbMaps {
            services: typed(&raw.services)?,
            backends: typed(&raw.backends)?,
            ipcache: typed(&raw.ipcache)?,
            raw,
        },
        flows: typed(&flows_raw)?,
    })
}

// === impl PinnedMaps ===

impl PinnedMaps {
    /// Every entry of the service, backend and ipcache maps.
    pub fn dump(&self) -> Result<DatapathDump> {
        self.lb.dump()
    }

    /// The service and backend maps (service map first), the ipcache left empty.
    pub fn dump_services(&self) -> Result<DatapathDump> {
        self.lb.dump_services()
    }

    /// One entry of the service map (see [`LbMaps::service`]).
    pub fn service(&self, key: ServiceEntryKey) -> Result<Option<ServiceEntryValue>> {
        self.lb.service(key)
    }

    /// One entry of the backend map.
    pub fn backend(&self, id: u32) -> Result<Option<BackendValue>> {
        self.lb.backend(id)
    }

    /// The ipcache entry the datapath finds for `ip` (one longest-prefix-match lookup, so
    /// a covering prefix answers when there is no /32 entry): for readers that watch a
    /// few addresses of a large map without dumping it. `None` when nothing covers `ip`.
    pub fn ipcache_lookup(&self, ip: Ipv4Addr) -> Result<Option<IpcacheValue>> {
        let key = aya::maps::lpm_trie::Key::new(32, crate::ip_to_raw(ip));
        match self.lb.ipcache.get(&key, 0) {
            Ok(v) => Ok(Some(v.into())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_IPCACHE)(e)),
        }
    }

    /// Flow counters per identity pair, summed over CPUs.
    pub fn flows(&self) -> Result<BTreeMap<IdentityPair, FlowCounters>> {
        sum_flows(&self.flows)
    }

    /// The backends the node's agent quarantined (empty for an agent without passive
    /// health).
    pub fn quarantines(&self) -> Result<Vec<QuarantinedBackend>> {
        match &self.quarantine {
            Some(m) => read_quarantines(m),
            None => Ok(Vec::new()),
        }
    }
}
