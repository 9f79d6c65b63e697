//! Typed and batched access to the pinned maps.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    maps::{MapError, lpm_trie::Key},
    sys::SyscallError,
};
use ipnet::IpNet;
use mesh_maps::{
    BATCH_CHUNK, LbMaps, MAP_BACKENDS, MAP_IPCACHE, MAP_SERVICES,
    sys::{BatchError, RawMap},
};

use super::*;

// === impl Datapath ===

impl Datapath {
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
        let (keys, values) = backend_keys_values(entries);
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
        let (keys, values) = service_keys_values(entries);
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
        let (keys, values) = ipcache_keys_values(entries)?;
        let LbMaps { ipcache, raw, .. } = &mut self.lb;
        batch_update(&mut self.batch.ipcache, &raw.ipcache, &keys, &values, |i| {
            ipcache
                .insert(&keys[i], values[i], 0)
                .map_err(entry_err(MAP_IPCACHE, &entries[i].0))
        })
    }

    /// A second writer of `mesh_ipcache` (its own file descriptor), for another thread to
    /// write ipcache entries while this one writes the other maps. `None` when the kernel
    /// has no batch updates for the map (the writer writes only in batches).
    pub fn ipcache_writer(&self) -> Option<IpcacheWriter> {
        if !self.batch.ipcache {
            return None;
        }
        let fd = self.lb.raw.ipcache.as_fd().try_clone_to_owned().ok()?;
        Some(IpcacheWriter {
            raw: RawMap::from_fd(MAP_IPCACHE, fd).ok()?,
        })
    }

    /// A second writer of `mesh_services` and `mesh_backends` (their own file descriptors),
    /// for another thread to write half of a large batch while this one writes the other
    /// half. `None` when the kernel has no batch updates for them.
    pub fn lb_writer(&self) -> Option<LbWriter> {
        if !(self.batch.services && self.batch.backends) {
            return None;
        }
        let dup = |raw: &RawMap, name| {
            let fd = raw.as_fd().try_clone_to_owned().ok()?;
            RawMap::from_fd(name, fd).ok()
        };
        Some(LbWriter {
            services: dup(&self.lb.raw.services, MAP_SERVICES)?,
            backends: dup(&self.lb.raw.backends, MAP_BACKENDS)?,
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

    // --- network policy ---

    /// The content of the policy maps.
    pub fn policy_dump(&self) -> Result<mesh_maps::policy::PolicyDump> {
        Ok(self.policy.dump()?)
    }

    /// One write to the policy maps.
    pub fn apply_policy(&mut self, op: &mesh_maps::policy::PolicyOp) -> Result<()> {
        Ok(self.policy.apply(op)?)
    }

    /// The policy verdict counters, summed over CPUs.
    pub fn policy_counters(
        &self,
    ) -> Result<BTreeMap<mesh_maps::policy::PolicyCounterKey, FlowCounters>> {
        Ok(self.policy.counters()?)
    }
}

/// Per map: whether the kernel took batch updates so far (cleared the first
/// time it refuses one, so later writes go entry by entry at once).
/// Writes ipcache entries in batches through its own handle on `mesh_ipcache`
/// ([`Datapath::ipcache_writer`]).
#[derive(Debug)]
pub struct IpcacheWriter {
    raw: RawMap,
}

impl IpcacheWriter {
    /// Inserts or replaces `entries`, in batches; stops at the first error (the entries
    /// before it may be written).
    pub fn upsert_entries(&mut self, entries: &[(IpNet, IpcacheValue)]) -> Result<()> {
        let (keys, values) = ipcache_keys_values(entries)?;
        update_chunks(&self.raw, &keys, &values)
    }
}

/// Writes backends and service entries in batches through its own handles on
/// `mesh_backends` and `mesh_services` ([`Datapath::lb_writer`]).
#[derive(Debug)]
pub struct LbWriter {
    services: RawMap,
    backends: RawMap,
}

impl LbWriter {
    /// Inserts or replaces `entries`, in batches; stops at the first error.
    pub fn upsert_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<()> {
        let (keys, values) = backend_keys_values(entries);
        update_chunks(&self.backends, &keys, &values)
    }

    /// Inserts or replaces `entries`, in batches; stops at the first error.
    pub fn upsert_service_slots(
        &mut self,
        entries: &[(ServiceEntryKey, ServiceEntryValue)],
    ) -> Result<()> {
        let (keys, values) = service_keys_values(entries);
        update_chunks(&self.services, &keys, &values)
    }
}

/// The backend map's keys and values of `entries`.
fn backend_keys_values(entries: &[(u32, BackendValue)]) -> (Vec<u32>, Vec<layout::BackendValue>) {
    entries
        .iter()
        .map(|(id, v)| (*id, layout::BackendValue::from(*v)))
        .unzip()
}

/// The service map's keys and values of `entries`.
fn service_keys_values(
    entries: &[(ServiceEntryKey, ServiceEntryValue)],
) -> (Vec<layout::ServiceKey>, Vec<layout::ServiceValue>) {
    entries
        .iter()
        .map(|(k, v)| (layout::ServiceKey::from(*k), layout::ServiceValue::from(*v)))
        .unzip()
}

/// `keys` and `values` in batch updates of [`BATCH_CHUNK`]; stops at the first error.
fn update_chunks<K: aya::Pod, V: aya::Pod>(raw: &RawMap, keys: &[K], values: &[V]) -> Result<()> {
    for (k, v) in keys.chunks(BATCH_CHUNK).zip(values.chunks(BATCH_CHUNK)) {
        raw.update_batch(k, v)
            .map_err(|e| Error::from(mesh_maps::Error::from(e)))?;
    }
    Ok(())
}

/// The trie's keys and values of `entries` (IPv4 only: an IPv6 prefix is an error before
/// anything is written).
fn ipcache_keys_values(
    entries: &[(IpNet, IpcacheValue)],
) -> Result<(Vec<Key<u32>>, Vec<layout::IpcacheValue>)> {
    let keys = entries
        .iter()
        .map(|(net, _)| ipcache_key(*net))
        .collect::<Result<Vec<Key<u32>>>>()?;
    let values = entries.iter().map(|(_, v)| (*v).into()).collect();
    Ok((keys, values))
}

pub(super) struct BatchSupport {
    pub(super) services: bool,
    pub(super) backends: bool,
    pub(super) ipcache: bool,
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

pub(super) fn ipcache_key(net: IpNet) -> Result<Key<u32>> {
    match net {
        IpNet::V4(v4) => Ok(Key::new(
            u32::from(v4.prefix_len()),
            mesh_maps::ip_to_raw(v4.network()),
        )),
        IpNet::V6(_) => Err(Error::NotIpv4 { net }),
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

pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
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
