//! Reconciling the pinned maps with a desired state (DESIGN.md section 9).
//!
//! The [`Reconciler`] keeps a mirror of what the maps hold ([`DatapathState`]); the first
//! reconcile (and every one after an error or a periodic resync) reads the maps from the
//! kernel instead. Each reconcile plans the difference with [`desired::plan`] and applies
//! it op by op, in the plan's order, keeping the mirror current: a failure stops the plan
//! where it failed, and the next attempt re-reads the maps.
//!
//! The maps are IPv4 only for now: IPv6 entries are dropped from the desired state (and
//! cannot appear in the maps), so a plan never tries to write them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;
use mesh_core::Protocol;
use tracing::{debug, warn};

use crate::ipcache::IpcacheChanges;

use crate::datapath::{
    self, BackendValue, Datapath, DatapathDump, IpcacheValue, ServiceEntryKey, ServiceEntryValue,
};
use crate::desired::{
    self, BackendEntry, BackendInfo, BackendKey, DatapathState, DesiredState, IpcacheInfo, Op,
    ServiceKey,
};

/// `MESH_IPCACHE_F_LOCAL` of bpf/mesh.h: the endpoint is on this node.
pub const IPCACHE_F_LOCAL: u32 = 1 << 0;
/// `MESH_IPCACHE_F_REMOTE` of bpf/mesh.h: the endpoint is in another cluster.
pub const IPCACHE_F_REMOTE: u32 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the maps: {0}")]
    Dump(#[source] datapath::Error),
    #[error("applying {op:?}: {source}")]
    Apply {
        op: Box<Op>,
        #[source]
        source: datapath::Error,
    },
    #[error("removing entry {what} the agent cannot represent: {source}")]
    Foreign {
        what: String,
        #[source]
        source: datapath::Error,
    },
    #[error("{op:?} holds an IPv6 address: the maps are IPv4 only")]
    NotIpv4 { op: Box<Op> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A map entry that cannot be expressed as a [`DatapathState`] (e.g. an unknown protocol
/// number, left by another version): removed on the next reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    ServiceSlot(ServiceEntryKey),
    Backend(u32),
}

/// The maps as the reconciler reads and writes them; implemented by [`Datapath`], and by
/// fakes in tests.
pub trait Maps {
    fn dump(&self) -> Result<DatapathDump, datapath::Error>;
    fn apply(&mut self, op: &Op) -> Result<()>;
    /// Applies consecutive operations of one kind ([`op_kind`]), in order; on error, a
    /// prefix of them may have been applied.
    fn apply_batch(&mut self, ops: &[Op]) -> Result<()> {
        ops.iter().try_for_each(|op| self.apply(op))
    }
    fn remove_foreign(&mut self, entry: Foreign) -> Result<(), datapath::Error>;
    /// A writer of ipcache upserts that another thread may use while these maps write the
    /// others ([`Reconciler::reconcile_changes`] writes a large ipcache beside the
    /// services); `None`: everything is written here, in the plan's order.
    fn ipcache_writer(&self) -> Option<Box<dyn IpcacheWrite>> {
        None
    }
    /// A writer of backend and service-entry batches that another thread may use while
    /// these maps write the other half of a large batch ([`SPLIT_MIN`]); `None`: every
    /// batch is written here.
    fn lb_writer(&self) -> Option<Box<dyn LbWrite>> {
        None
    }
}

/// Writes ipcache upserts from another thread ([`Maps::ipcache_writer`]).
pub trait IpcacheWrite: Send {
    /// Applies `ops`, all `Op::IpcacheUpsert`.
    fn upsert(&mut self, ops: &[Op]) -> Result<()>;
}

/// Writes part of a batch from another thread ([`Maps::lb_writer`]).
pub trait LbWrite: Send {
    /// Applies `ops`, all of one kind: `BackendUpsert`, `SlotUpsert` or `MasterUpsert`.
    fn apply_batch(&mut self, ops: &[Op]) -> Result<()>;
}

/// From this many operations, a batch of backend upserts, slot upserts or master upserts
/// is written half here, half on a second thread ([`Maps::lb_writer`]): the entries of one
/// such batch never depend on each other (backends all go before any slot, slots before
/// any master), so the halves may land in any order. A large peer's arrival (100k backends
/// and 110k service entries, about 0.25 s of kernel time on one thread) then takes both
/// cores, which etcd and the apiserver have left by then.
pub const SPLIT_MIN: usize = 8192;

/// Whether a batch of `ops` (one kind) is split: at least `min` ([`SPLIT_MIN`]) of a kind
/// whose entries do not depend on each other.
fn splittable(ops: &[Op], min: usize) -> bool {
    ops.len() >= min
        && matches!(
            ops[0],
            Op::BackendUpsert { .. } | Op::SlotUpsert { .. } | Op::MasterUpsert { .. }
        )
}

/// Below this many ipcache upserts a reconcile writes everything on its own thread: a
/// second thread is worth it for a first sync or a large peer arriving, not for churn.
pub const IPCACHE_BESIDE_MIN: usize = 4096;

/// Splits a plan's ipcache upserts into those a backend of `desired` needs first (an
/// upsert of a shorter prefix than a host's, or of a backend's own address) and the rest,
/// which may be written beside the service maps: the classifier then knows every backend
/// before any connection reaches it, as in the plan's order.
pub fn split_ipcache_upserts(upserts: &[Op], desired: &DesiredState) -> (Vec<Op>, Vec<Op>) {
    // foldhash, not SipHash: 512k lookups in a first sync (the addresses are ours).
    let backend_ips: foldhash::HashSet<IpAddr> = desired.backends.keys().map(|b| b.ip).collect();
    upserts.iter().partition(|op| match op {
        Op::IpcacheUpsert { prefix, .. } => {
            prefix.prefix_len() < prefix.max_prefix_len() || backend_ips.contains(&prefix.addr())
        }
        _ => true,
    })
}

/// Number of operations of a reconcile, by kind (metric label values).
pub type OpCounts = BTreeMap<&'static str, u64>;

/// Every label value of [`op_kind`], so the metric shows each series from the start (at 0)
/// and a reader can tell "none yet" from "no such series".
pub const OP_KINDS: [&str; 8] = [
    "ipcache_upsert",
    "ipcache_delete",
    "backend_upsert",
    "backend_delete",
    "slot_upsert",
    "slot_delete",
    "master_upsert",
    "master_delete",
];

/// The label of an op kind.
pub fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::IpcacheUpsert { .. } => "ipcache_upsert",
        Op::IpcacheDelete { .. } => "ipcache_delete",
        Op::BackendUpsert { .. } => "backend_upsert",
        Op::BackendDelete { .. } => "backend_delete",
        Op::SlotUpsert { .. } => "slot_upsert",
        Op::SlotDelete { .. } => "slot_delete",
        Op::MasterUpsert { .. } => "master_upsert",
        Op::MasterDelete { .. } => "master_delete",
    }
}

/// Keeps the maps equal to the desired state.
#[derive(Debug)]
pub struct Reconciler<M> {
    maps: M,
    mirror: Option<DatapathState>,
    /// The mirror's ipcache is the desired one of the last reconcile (so a scoped
    /// comparison at the prefixes changed since is complete): false until a full
    /// comparison succeeded after the maps were read.
    mirror_matches_desired: bool,
    /// The services and backends the mirror was last brought to by a whole plan: while the
    /// desired ones equal them, a reconcile plans the ipcache only ([`desired::ipcache_ops`]).
    planned_services: Option<PlannedServices>,
    /// The last reconcile wrote part of its ipcache upserts on a second thread.
    ipcache_written_beside: bool,
    /// [`SPLIT_MIN`] (smaller in tests).
    split_min: usize,
}

/// The services and backends of the last reconcile that wrote them: shared with the
/// desired state they came from (`DesiredState`'s `Arc`s), compared by pointer first.
type PlannedServices = (
    Arc<BTreeMap<ServiceKey, Vec<BackendKey>>>,
    Arc<BTreeMap<BackendKey, BackendInfo>>,
);

/// Whether two shared maps are equal: the same allocation (the services cache handed out
/// the same maps again), else compared whole.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

// === impl Reconciler ===

impl<M: Maps> Reconciler<M> {
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            mirror: None,
            mirror_matches_desired: false,
            planned_services: None,
            ipcache_written_beside: false,
            split_min: SPLIT_MIN,
        }
    }

    /// Whether the last reconcile wrote part of its ipcache upserts on a second thread
    /// (see [`IPCACHE_BESIDE_MIN`]).
    pub fn ipcache_written_beside(&self) -> bool {
        self.ipcache_written_beside
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, for writers of other maps of the same datapath (the policy maps).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// The maps as last read or written; `None` until the first reconcile.
    pub fn mirror(&self) -> Option<&DatapathState> {
        self.mirror.as_ref()
    }

    /// Forgets the mirror: the next reconcile reads the maps from the kernel.
    pub fn invalidate(&mut self) {
        self.mirror = None;
        self.mirror_matches_desired = false;
        self.planned_services = None;
    }

    /// Brings the maps to `desired` (IPv6 entries are ignored); returns the operations
    /// applied, by kind.
    pub fn reconcile(&mut self, desired: &DesiredState) -> Result<OpCounts> {
        self.reconcile_changes(desired, &IpcacheChanges::All)
    }

    /// [`Self::reconcile`] knowing that `desired.ipcache` differs from the one of the last
    /// successful reconcile only at `changes` (the agent's ipcache builder's account): the
    /// ipcache is compared at those prefixes only, unless the maps had to be read again (a
    /// first reconcile, a resync, a failure before), when it is compared whole.
    pub fn reconcile_changes(
        &mut self,
        desired: &DesiredState,
        changes: &IpcacheChanges,
    ) -> Result<OpCounts> {
        let desired = ipv4_only(desired);
        let mut counts = OpCounts::new();
        let scope = match self.mirror.is_some() && self.mirror_matches_desired {
            true => changes.prefixes(),
            false => None,
        };
        // The services and backends as the mirror holds them: only the ipcache can differ.
        let services_unchanged = self.mirror.is_some()
            && self
                .planned_services
                .as_ref()
                .is_some_and(|(s, b)| same(s, &desired.services) && same(b, &desired.backends));
        let mut current = self.current(&mut counts)?;
        let (upserts, ipcache_deletes) = desired::ipcache_ops(&current, &desired, scope);
        // Many ipcache changes (a first reconcile: 512k): the mirror takes the desired
        // ipcache at once at the end (the whole plan applied, it is the desired one:
        // `plan`'s property) rather than op by op.
        let ipcache_ops = upserts.len() + ipcache_deletes.len();
        let bulk = ipcache_ops > 0 && ipcache_ops >= current.ipcache.len() / 4;
        // Many ipcache upserts (the first group of the plan): those the backends need are
        // written first, the others on a second thread beside the rest of the plan (512k
        // entries into the LPM trie are about 0.5 s of kernel time, the service maps of a
        // large mesh 0.25 s more). That thread starts before the services are planned
        // (about 0.1 s at 10k services): the trie's inserts are the longest part.
        let writer = (upserts.len() >= IPCACHE_BESIDE_MIN)
            .then(|| self.maps.ipcache_writer())
            .flatten();
        self.ipcache_written_beside = writer.is_some();
        let (first, beside): (Vec<Op>, Vec<Op>) = match writer {
            Some(_) => split_ipcache_upserts(&upserts, &desired),
            None => (upserts, Vec::new()),
        };
        let is_ipcache =
            |op: &Op| matches!(op, Op::IpcacheUpsert { .. } | Op::IpcacheDelete { .. });
        let mut lb_writer = None;
        let split_min = self.split_min;
        let mut apply = |maps: &mut M, current: &mut DatapathState, batch: &[Op]| {
            // On failure the mirror stays `None`: the next attempt re-reads the maps.
            let split = splittable(batch, split_min);
            if split && lb_writer.is_none() {
                lb_writer = Some(maps.lb_writer());
            }
            match lb_writer.as_mut().and_then(|w| w.as_mut()) {
                Some(w) if split => {
                    let (here, there) = batch.split_at(batch.len() / 2);
                    std::thread::scope(|s| {
                        let other = s.spawn(|| w.apply_batch(there));
                        let mine = maps.apply_batch(here);
                        let theirs = other
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                        mine.and(theirs)
                    })?;
                }
                _ => maps.apply_batch(batch)?,
            }
            if !(bulk && is_ipcache(&batch[0])) {
                for op in batch {
                    current.apply(op);
                }
            }
            *counts.entry(op_kind(&batch[0])).or_default() += batch.len() as u64;
            Ok::<_, Error>(())
        };
        let maps = &mut self.maps;
        let planned = std::thread::scope(|s| {
            let beside_done = writer.map(|mut w| {
                let beside = &beside;
                s.spawn(move || w.upsert(beside))
            });
            let applied = (|| {
                // The plan's order (see `desired::plan`): ipcache upserts, the services'
                // groups, ipcache deletes; the services planned against the maps before any
                // of this reconcile's writes.
                let services = match services_unchanged {
                    true => Vec::new(),
                    false => desired::plan_services(&current, &desired),
                };
                let planned = first.len() + beside.len() + services.len() + ipcache_deletes.len();
                for group in [&first, &services, &ipcache_deletes] {
                    // Grouped by kind, in order: each group is one batch.
                    group
                        .chunk_by(|a, b| op_kind(a) == op_kind(b))
                        .try_for_each(|batch| apply(maps, &mut current, batch))?;
                }
                Ok::<_, Error>(planned)
            })();
            if let Some(done) = beside_done {
                done.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            }
            applied
        })?;
        if !beside.is_empty() {
            if !bulk {
                for op in &beside {
                    current.apply(op);
                }
            }
            *counts.entry("ipcache_upsert").or_default() += beside.len() as u64;
        }
        if !services_unchanged {
            self.planned_services = Some((desired.services.clone(), desired.backends.clone()));
        }
        if bulk {
            current.ipcache = match desired {
                Cow::Owned(d) => d.ipcache,
                Cow::Borrowed(d) => d.ipcache.clone(),
            };
        }
        debug!(ops = planned, "reconciled");
        self.mirror = Some(current);
        self.mirror_matches_desired = true;
        Ok(counts)
    }

    /// The maps as they are: the mirror (taken; put back by the caller once its writes
    /// succeeded), or read from the kernel, removing the entries the agent cannot
    /// represent (counted in `counts`).
    fn current(&mut self, counts: &mut OpCounts) -> Result<DatapathState> {
        if let Some(m) = self.mirror.take() {
            return Ok(m);
        }
        // The maps as read may hold anything (a partial write, another version): the next
        // reconcile plans the services again.
        self.planned_services = None;
        let dump = self.maps.dump().map_err(Error::Dump)?;
        let (state, foreign) = from_dump(&dump);
        for entry in foreign {
            warn!(?entry, "removing a map entry the agent cannot represent");
            self.maps
                .remove_foreign(entry)
                .map_err(|source| Error::Foreign {
                    what: format!("{entry:?}"),
                    source,
                })?;
            *counts.entry("foreign_delete").or_default() += 1;
        }
        Ok(state)
    }
}

/// Whether every prefix of `ipcache` is IPv4: IPv4 prefixes sort before IPv6 ones, so
/// whether the last one is (one lookup, not a pass over 275k entries per reconcile).
fn all_v4<V>(ipcache: &BTreeMap<IpNet, V>) -> bool {
    ipcache
        .last_key_value()
        .is_none_or(|(k, _)| matches!(k, IpNet::V4(_)))
}

/// `desired` without IPv6 frontends, backends and prefixes (borrowed when it has none:
/// `desired::compute` leaves them out already, only policy CIDRs may add some).
pub fn ipv4_only(desired: &DesiredState) -> Cow<'_, DesiredState> {
    let v4_backend = |b: &BackendKey| b.ip.is_ipv4();
    let all_v4 = desired
        .services
        .iter()
        .all(|(k, b)| k.vip.is_ipv4() && b.iter().all(v4_backend))
        && desired.backends.keys().all(v4_backend)
        && all_v4(&desired.ipcache);
    if all_v4 {
        return Cow::Borrowed(desired);
    }
    Cow::Owned(DesiredState {
        services: Arc::new(
            desired
                .services
                .iter()
                .filter(|(k, _)| k.vip.is_ipv4())
                .map(|(k, b)| (*k, b.iter().filter(|b| b.ip.is_ipv4()).copied().collect()))
                .collect(),
        ),
        backends: Arc::new(
            desired
                .backends
                .iter()
                .filter(|(k, _)| k.ip.is_ipv4())
                .map(|(k, v)| (*k, *v))
                .collect(),
        ),
        ipcache: desired
            .ipcache
            .iter()
            .filter(|(k, _)| matches!(k, ipnet::IpNet::V4(_)))
            .map(|(k, v)| (*k, *v))
            .collect(),
    })
}

/// The maps' content as a [`DatapathState`], and the entries it cannot express.
pub fn from_dump(dump: &DatapathDump) -> (DatapathState, Vec<Foreign>) {
    let mut state = DatapathState::default();
    let mut foreign = Vec::new();
    for (k, v) in &dump.services {
        let Some(proto) = Protocol::from_number(k.proto) else {
            foreign.push(Foreign::ServiceSlot(*k));
            continue;
        };
        let key = ServiceKey {
            vip: IpAddr::V4(k.vip),
            port: k.port,
            proto,
        };
        let slots = state.services.entry(key).or_default();
        if k.slot == 0 {
            slots.count = Some(v.count);
        } else if v.backend.is_some() && v.backend == dump.backends.get(&v.backend_id).copied() {
            slots.slots.insert(k.slot, v.backend_id);
        }
        // A slot whose copy differs from its backend's entry (a crash between writing the
        // backend and its slots) reads as missing, so the plan writes it again.
    }
    for (&id, v) in &dump.backends {
        let Some(proto) = Protocol::from_number(v.proto) else {
            foreign.push(Foreign::Backend(id));
            continue;
        };
        state.backends.insert(
            id,
            BackendEntry {
                key: BackendKey {
                    ip: IpAddr::V4(v.ip),
                    port: v.port,
                    proto,
                },
                // An id the agent would never write (> 255) reads as 0, so the plan
                // rewrites it unless 0 is wanted.
                info: BackendInfo {
                    cluster_id: u8::try_from(v.cluster_id).unwrap_or(0),
                },
            },
        );
    }
    for (&net, v) in &dump.ipcache {
        state.ipcache.insert(
            net,
            IpcacheInfo {
                identity: v.identity,
                host_ip: v.tunnel_endpoint.map(IpAddr::V4),
                cluster_id: u8::try_from(v.cluster_id).unwrap_or(0),
                local_node: v.flags & IPCACHE_F_LOCAL != 0,
                remote_cluster: v.flags & IPCACHE_F_REMOTE != 0,
            },
        );
    }
    (state, foreign)
}

fn v4(ip: IpAddr, op: &Op) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Ok(v),
        IpAddr::V6(_) => Err(Error::NotIpv4 { op: Box::new(*op) }),
    }
}

fn service_key(service: &ServiceKey, slot: u16, op: &Op) -> Result<ServiceEntryKey> {
    Ok(ServiceEntryKey {
        vip: v4(service.vip, op)?,
        port: service.port,
        proto: service.proto.number(),
        slot,
    })
}

// === impl Maps for Datapath ===

impl Maps for Datapath {
    fn dump(&self) -> Result<DatapathDump, datapath::Error> {
        Datapath::dump(self)
    }

    fn apply(&mut self, op: &Op) -> Result<()> {
        let err = |source| Error::Apply {
            op: Box::new(*op),
            source,
        };
        match *op {
            Op::IpcacheUpsert { prefix, info } => self
                .upsert_ipcache(prefix, ipcache_value(&info))
                .map_err(err),
            Op::IpcacheDelete { prefix } => self.remove_ipcache(prefix).map(drop).map_err(err),
            Op::BackendUpsert { id, backend } => {
                let value = backend_value(&backend, op)?;
                self.upsert_backend(id, value).map_err(err)
            }
            Op::BackendDelete { id } => self.remove_backend(id).map(drop).map_err(err),
            Op::SlotUpsert {
                service,
                slot,
                backend_id,
                backend,
            } => {
                let key = service_key(&service, slot, op)?;
                let value = ServiceEntryValue::backend(backend_id, backend_value(&backend, op)?);
                self.upsert_service_slot(key, value).map_err(err)
            }
            Op::MasterUpsert { service, count } => {
                let key = service_key(&service, 0, op)?;
                self.upsert_service_slot(key, ServiceEntryValue::master(count))
                    .map_err(err)
            }
            Op::SlotDelete { service, slot } => {
                let key = service_key(&service, slot, op)?;
                self.remove_service_slot(key).map(drop).map_err(err)
            }
            Op::MasterDelete { service } => {
                let key = service_key(&service, 0, op)?;
                self.remove_service_slot(key).map(drop).map_err(err)
            }
        }
    }

    fn apply_batch(&mut self, ops: &[Op]) -> Result<()> {
        let Some(first) = ops.first() else {
            return Ok(());
        };
        // Batch updates where the datapath has them; deletes one by one.
        let err = |source| Error::Apply {
            op: Box::new(*first),
            source,
        };
        match first {
            Op::IpcacheUpsert { .. } => self
                .upsert_ipcache_entries(&ipcache_entries(ops))
                .map_err(err),
            _ => match upsert_lb_batch(self, ops) {
                Some(done) => done,
                None => ops.iter().try_for_each(|op| self.apply(op)),
            },
        }
    }

    fn remove_foreign(&mut self, entry: Foreign) -> Result<(), datapath::Error> {
        match entry {
            Foreign::ServiceSlot(k) => self.remove_service_slot(k).map(drop),
            Foreign::Backend(id) => self.remove_backend(id).map(drop),
        }
    }

    fn ipcache_writer(&self) -> Option<Box<dyn IpcacheWrite>> {
        Datapath::ipcache_writer(self).map(|w| Box::new(w) as Box<dyn IpcacheWrite>)
    }

    fn lb_writer(&self) -> Option<Box<dyn LbWrite>> {
        Datapath::lb_writer(self).map(|w| Box::new(w) as Box<dyn LbWrite>)
    }
}

impl LbWrite for datapath::LbWriter {
    fn apply_batch(&mut self, ops: &[Op]) -> Result<()> {
        upsert_lb_batch(self, ops).unwrap_or_else(|| {
            assert!(
                ops.is_empty(),
                "LbWrite takes backend, slot and master upserts only"
            );
            Ok(())
        })
    }
}

/// The batch writes of backends and service entries, by the maps and by their second
/// writer alike.
trait LbUpsert {
    fn upsert_backends(
        &mut self,
        entries: &[(u32, datapath::BackendValue)],
    ) -> Result<(), datapath::Error>;
    fn upsert_service_slots(
        &mut self,
        entries: &[(ServiceEntryKey, ServiceEntryValue)],
    ) -> Result<(), datapath::Error>;
}

impl LbUpsert for Datapath {
    fn upsert_backends(
        &mut self,
        entries: &[(u32, datapath::BackendValue)],
    ) -> Result<(), datapath::Error> {
        Datapath::upsert_backends(self, entries)
    }
    fn upsert_service_slots(
        &mut self,
        entries: &[(ServiceEntryKey, ServiceEntryValue)],
    ) -> Result<(), datapath::Error> {
        Datapath::upsert_service_slots(self, entries)
    }
}

impl LbUpsert for datapath::LbWriter {
    fn upsert_backends(
        &mut self,
        entries: &[(u32, datapath::BackendValue)],
    ) -> Result<(), datapath::Error> {
        datapath::LbWriter::upsert_backends(self, entries)
    }
    fn upsert_service_slots(
        &mut self,
        entries: &[(ServiceEntryKey, ServiceEntryValue)],
    ) -> Result<(), datapath::Error> {
        datapath::LbWriter::upsert_service_slots(self, entries)
    }
}

/// Writes a batch of backend upserts, or of slot and master upserts, in batches; `None` for
/// an empty batch or another kind.
fn upsert_lb_batch(w: &mut impl LbUpsert, ops: &[Op]) -> Option<Result<()>> {
    let first = ops.first()?;
    let err = |source| Error::Apply {
        op: Box::new(*first),
        source,
    };
    Some(match first {
        Op::BackendUpsert { .. } => {
            backend_entries(ops).and_then(|e| w.upsert_backends(&e).map_err(err))
        }
        Op::SlotUpsert { .. } | Op::MasterUpsert { .. } => {
            service_entries(ops).and_then(|e| w.upsert_service_slots(&e).map_err(err))
        }
        _ => return None,
    })
}

/// The backends of the `Op::BackendUpsert`s among `ops`, as the datapath writes them.
fn backend_entries(ops: &[Op]) -> Result<Vec<(u32, datapath::BackendValue)>> {
    ops.iter()
        .filter_map(|op| match op {
            Op::BackendUpsert { id, backend } => Some(backend_value(backend, op).map(|v| (*id, v))),
            _ => None,
        })
        .collect()
}

/// The service entries of the `Op::SlotUpsert`s and `Op::MasterUpsert`s among `ops`.
fn service_entries(ops: &[Op]) -> Result<Vec<(ServiceEntryKey, ServiceEntryValue)>> {
    ops.iter()
        .filter_map(|op| match *op {
            Op::SlotUpsert {
                service,
                slot,
                backend_id,
                backend,
            } => Some(service_key(&service, slot, op).and_then(|k| {
                let value = backend_value(&backend, op)?;
                Ok((k, ServiceEntryValue::backend(backend_id, value)))
            })),
            Op::MasterUpsert { service, count } => {
                Some(service_key(&service, 0, op).map(|k| (k, ServiceEntryValue::master(count))))
            }
            _ => None,
        })
        .collect()
}

impl IpcacheWrite for datapath::IpcacheWriter {
    fn upsert(&mut self, ops: &[Op]) -> Result<()> {
        let Some(first) = ops.first() else {
            return Ok(());
        };
        self.upsert_entries(&ipcache_entries(ops))
            .map_err(|source| Error::Apply {
                op: Box::new(*first),
                source,
            })
    }
}

/// The entries of the `Op::IpcacheUpsert`s among `ops`, as the datapath writes them.
fn ipcache_entries(ops: &[Op]) -> Vec<(IpNet, IpcacheValue)> {
    ops.iter()
        .filter_map(|op| match *op {
            Op::IpcacheUpsert { prefix, info } => Some((prefix, ipcache_value(&info))),
            _ => None,
        })
        .collect()
}

fn ipcache_value(info: &IpcacheInfo) -> IpcacheValue {
    let tunnel_endpoint = match info.host_ip {
        Some(IpAddr::V4(ip)) => Some(ip),
        _ => None,
    };
    let mut flags = 0;
    if info.local_node {
        flags |= IPCACHE_F_LOCAL;
    }
    if info.remote_cluster {
        flags |= IPCACHE_F_REMOTE;
    }
    IpcacheValue {
        identity: info.identity,
        tunnel_endpoint,
        cluster_id: u16::from(info.cluster_id),
        flags,
    }
}

fn backend_value(backend: &BackendEntry, op: &Op) -> Result<BackendValue> {
    Ok(BackendValue {
        ip: v4(backend.key.ip, op)?,
        port: backend.key.port,
        proto: backend.key.proto.number(),
        cluster_id: u16::from(backend.info.cluster_id),
        flags: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    /// Maps in memory, in the datapath's own types, with an optional failure injected and
    /// an optional second ipcache writer (its upserts are logged for the test to apply).
    #[derive(Default)]
    struct FakeMaps {
        dump: DatapathDump,
        fail_at: Option<usize>,
        applied: usize,
        dumps: std::cell::Cell<usize>,
        batches: Vec<(&'static str, usize)>,
        beside: Option<std::sync::Arc<std::sync::Mutex<Vec<Op>>>>,
        /// A second writer of backends and service entries: its ops, and the kinds of the
        /// batches both writers wrote, in the order their writes ended (main's: began).
        lb_beside: Option<std::sync::Arc<std::sync::Mutex<Vec<Op>>>>,
        order: std::sync::Arc<std::sync::Mutex<Vec<(&'static str, &'static str)>>>,
    }

    struct LoggedWriter(std::sync::Arc<std::sync::Mutex<Vec<Op>>>);

    struct LoggedLbWriter {
        ops: std::sync::Arc<std::sync::Mutex<Vec<Op>>>,
        order: std::sync::Arc<std::sync::Mutex<Vec<(&'static str, &'static str)>>>,
    }

    impl LbWrite for LoggedLbWriter {
        fn apply_batch(&mut self, ops: &[Op]) -> Result<()> {
            let kind = op_kind(&ops[0]);
            assert!(ops.iter().all(|op| op_kind(op) == kind), "{ops:?}");
            // Slow enough that a missing join would let the other thread's next batch
            // begin before this one is logged.
            std::thread::sleep(std::time::Duration::from_millis(20));
            self.ops.lock().unwrap().extend_from_slice(ops);
            self.order.lock().unwrap().push(("second", kind));
            Ok(())
        }
    }

    impl IpcacheWrite for LoggedWriter {
        fn upsert(&mut self, ops: &[Op]) -> Result<()> {
            assert!(ops.iter().all(|op| matches!(op, Op::IpcacheUpsert { .. })));
            self.0.lock().unwrap().extend_from_slice(ops);
            Ok(())
        }
    }

    impl FakeMaps {
        /// Writes what the second writers logged into the maps.
        fn settle(&mut self) -> usize {
            let ops: Vec<Op> = [self.beside.clone(), self.lb_beside.clone()]
                .into_iter()
                .flatten()
                .flat_map(|log| std::mem::take(&mut *log.lock().unwrap()))
                .collect();
            for op in &ops {
                self.apply(op).unwrap();
            }
            ops.len()
        }
    }

    impl Maps for FakeMaps {
        fn dump(&self) -> Result<DatapathDump, datapath::Error> {
            self.dumps.set(self.dumps.get() + 1);
            Ok(self.dump.clone())
        }
        fn apply(&mut self, op: &Op) -> Result<()> {
            if self.fail_at == Some(self.applied) {
                self.fail_at = None;
                return Err(Error::NotIpv4 { op: Box::new(*op) });
            }
            self.applied += 1;
            if let Op::IpcacheUpsert { prefix, info } = *op {
                // As the datapath converts it (and cheap: tests write thousands).
                self.dump.ipcache.insert(prefix, ipcache_value(&info));
                return Ok(());
            }
            // Mirror what the datapath writes, through the same conversion as a dump.
            let (mut state, _) = from_dump(&self.dump);
            state.apply(op);
            self.dump = to_dump(&state);
            Ok(())
        }
        fn apply_batch(&mut self, ops: &[Op]) -> Result<()> {
            // The ipcache thread's upserts may be none.
            if ops.is_empty() {
                return Ok(());
            }
            assert!(
                ops.iter().all(|op| op_kind(op) == op_kind(&ops[0])),
                "{ops:?}"
            );
            self.batches.push((op_kind(&ops[0]), ops.len()));
            self.order.lock().unwrap().push(("main", op_kind(&ops[0])));
            ops.iter().try_for_each(|op| self.apply(op))
        }
        fn ipcache_writer(&self) -> Option<Box<dyn IpcacheWrite>> {
            self.beside
                .clone()
                .map(|log| Box::new(LoggedWriter(log)) as Box<dyn IpcacheWrite>)
        }
        fn lb_writer(&self) -> Option<Box<dyn LbWrite>> {
            self.lb_beside.clone().map(|ops| {
                Box::new(LoggedLbWriter {
                    ops,
                    order: self.order.clone(),
                }) as Box<dyn LbWrite>
            })
        }
        fn remove_foreign(&mut self, entry: Foreign) -> Result<(), datapath::Error> {
            match entry {
                Foreign::ServiceSlot(k) => self.dump.services.remove(&k),
                Foreign::Backend(id) => self.dump.backends.remove(&id).map(|_| Default::default()),
            };
            Ok(())
        }
    }

    fn to_dump(s: &DatapathState) -> DatapathDump {
        let mut d = DatapathDump::default();
        for (k, slots) in &s.services {
            let IpAddr::V4(vip) = k.vip else { panic!() };
            let master = ServiceEntryKey::master(vip, k.port, k.proto.number());
            if let Some(c) = slots.count {
                d.services.insert(master, ServiceEntryValue::master(c));
            }
        }
        for (&id, b) in &s.backends {
            let IpAddr::V4(ip) = b.key.ip else { panic!() };
            d.backends.insert(
                id,
                BackendValue {
                    ip,
                    port: b.key.port,
                    proto: b.key.proto.number(),
                    cluster_id: b.info.cluster_id.into(),
                    flags: 0,
                },
            );
        }
        for (k, slots) in &s.services {
            let IpAddr::V4(vip) = k.vip else { panic!() };
            let master = ServiceEntryKey::master(vip, k.port, k.proto.number());
            for (&slot, &id) in &slots.slots {
                // A slot without its backend (a state the invariant forbids) has no copy.
                let value = match d.backends.get(&id) {
                    Some(b) => ServiceEntryValue::backend(id, *b),
                    None => ServiceEntryValue {
                        backend_id: id,
                        ..Default::default()
                    },
                };
                d.services.insert(master.with_slot(slot), value);
            }
        }
        for (&net, i) in &s.ipcache {
            d.ipcache.insert(
                net,
                IpcacheValue {
                    identity: i.identity,
                    tunnel_endpoint: i.host_ip.map(|ip| match ip {
                        IpAddr::V4(v) => v,
                        IpAddr::V6(_) => panic!(),
                    }),
                    cluster_id: i.cluster_id.into(),
                    flags: u32::from(i.local_node) | (u32::from(i.remote_cluster) << 1),
                },
            );
        }
        d
    }

    fn desired(backends: &[&str], v6: bool) -> DesiredState {
        let mut d = DesiredState::default();
        let mut vips = vec!["10.96.0.10".parse::<IpAddr>().unwrap()];
        if v6 {
            vips.push("fd00::10".parse().unwrap());
        }
        for vip in vips {
            let key = ServiceKey {
                vip,
                port: 80,
                proto: Protocol::Tcp,
            };
            let mut list = Vec::new();
            for b in backends {
                let bk = BackendKey {
                    ip: b.parse().unwrap(),
                    port: 8080,
                    proto: Protocol::Tcp,
                };
                Arc::make_mut(&mut d.backends).insert(bk, BackendInfo { cluster_id: 1 });
                list.push(bk);
            }
            Arc::make_mut(&mut d.services).insert(key, list);
        }
        for (net, id) in [("10.1.0.5/32", 65_792u32), ("fd00::5/128", 65_793)] {
            d.ipcache.insert(
                net.parse::<IpNet>().unwrap(),
                IpcacheInfo {
                    identity: id,
                    host_ip: Some("192.168.0.2".parse().unwrap()),
                    cluster_id: 1,
                    local_node: true,
                    remote_cluster: false,
                },
            );
        }
        d
    }

    #[test]
    fn converges_ignores_ipv6_and_reads_the_maps_only_when_needed() {
        let mut r = Reconciler::new(FakeMaps::default());
        let want = desired(&["10.1.0.5", "10.1.0.6", "fd00::5"], true);
        let counts = r.reconcile(&want).unwrap();
        assert_eq!(counts["backend_upsert"], 2);
        assert_eq!(counts["slot_upsert"], 2);
        assert_eq!(counts["master_upsert"], 1);
        assert_eq!(counts["ipcache_upsert"], 1);
        let (state, foreign) = from_dump(&r.maps().dump);
        assert!(foreign.is_empty());
        assert_eq!(Some(&state), r.mirror());
        assert!(desired::plan(&state, &ipv4_only(&want)).is_empty());
        // A second reconcile of the same state is a no-op, even with IPv6 in it.
        assert!(r.reconcile(&want).unwrap().is_empty());
        assert_eq!(r.maps().applied, 6);
        // One batch per kind, in the order of the plan.
        assert_eq!(
            r.maps().batches,
            [
                ("ipcache_upsert", 1),
                ("backend_upsert", 2),
                ("slot_upsert", 2),
                ("master_upsert", 1)
            ]
        );
        assert_eq!(
            r.maps().dumps.get(),
            1,
            "the mirror spares re-reading the maps"
        );
        r.invalidate();
        assert!(r.reconcile(&want).unwrap().is_empty());
        assert_eq!(r.maps().dumps.get(), 2);
    }

    /// While the services and backends stay what the mirror was last planned to, only the
    /// ipcache is planned; any change of them, a backend's entry included, is planned whole,
    /// and so is everything after the maps were read again.
    #[test]
    fn services_are_planned_again_whenever_they_or_the_maps_may_have_changed() {
        let mut r = Reconciler::new(FakeMaps::default());
        let converged = |r: &Reconciler<FakeMaps>, want: &DesiredState| {
            let (state, _) = from_dump(&r.maps().dump);
            desired::plan(&state, &ipv4_only(want)).is_empty()
        };
        let none = IpcacheChanges::Prefixes(std::collections::BTreeSet::new());
        let d1 = desired(&["10.1.0.5", "10.1.0.6"], false);
        r.reconcile(&d1).unwrap();
        // The ipcache alone changes: ipcache ops only.
        let mut d1b = d1.clone();
        let net: IpNet = "10.1.0.9/32".parse().unwrap();
        d1b.ipcache
            .insert(net, d1.ipcache.values().next().copied().unwrap());
        let counts = r
            .reconcile_changes(&d1b, &IpcacheChanges::Prefixes([net].into()))
            .unwrap();
        assert_eq!(
            counts.keys().copied().collect::<Vec<_>>(),
            ["ipcache_upsert"]
        );
        assert!(converged(&r, &d1b));
        // Only a backend's entry changes (same keys): its slots are written again.
        let mut d2 = d1b.clone();
        for info in Arc::make_mut(&mut d2.backends).values_mut() {
            info.cluster_id = 2;
        }
        let counts = r.reconcile_changes(&d2, &none).unwrap();
        assert_eq!((counts["backend_upsert"], counts["slot_upsert"]), (2, 2));
        assert!(converged(&r, &d2));
        // And back: the services planned last are d2's, not d1's.
        let counts = r.reconcile_changes(&d1b, &none).unwrap();
        assert_eq!(counts["backend_upsert"], 2);
        assert!(converged(&r, &d1b));
        // A write fails halfway to d3: the reconcile back to d1b reads the maps again and
        // repairs the services the failed write left, though they equal the ones planned
        // last.
        let d3 = desired(&["10.1.0.7", "10.1.0.8"], false);
        r.maps.fail_at = Some(r.maps.applied + 3);
        assert!(r.reconcile_changes(&d3, &none).is_err());
        assert!(!converged(&r, &d1b));
        r.reconcile_changes(&d1b, &IpcacheChanges::All).unwrap();
        assert!(converged(&r, &d1b));
    }

    /// A slot whose copy of its backend differs from the backend's entry (a crash between
    /// writing a changed backend and its slots) reads as missing: the next reconcile that
    /// reads the maps writes it again, with the backend's entry.
    #[test]
    fn a_slot_with_a_stale_copy_of_its_backend_is_written_again() {
        let mut r = Reconciler::new(FakeMaps::default());
        let want = desired(&["10.1.0.5", "10.1.0.6"], false);
        r.reconcile(&want).unwrap();
        let slot = *r
            .maps()
            .dump
            .services
            .keys()
            .find(|k| k.slot == 2)
            .expect("slot 2");
        let good = r.maps().dump.services[&slot];
        let mut stale = good;
        stale.backend.as_mut().unwrap().cluster_id = 7;
        r.maps.dump.services.insert(slot, stale);
        let (state, _) = from_dump(&r.maps().dump);
        assert!(!state.services.values().any(|s| s.slots.contains_key(&2)));

        r.invalidate();
        let counts = r.reconcile(&want).unwrap();
        assert_eq!(counts["slot_upsert"], 1, "{counts:?}");
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(r.maps().dump.services[&slot], good);
    }

    #[test]
    fn a_failed_op_leaves_a_consistent_prefix_and_the_retry_re_reads_the_maps() {
        let mut r = Reconciler::new(FakeMaps::default());
        r.reconcile(&desired(&["10.1.0.5"], false)).unwrap();
        r.maps.fail_at = Some(r.maps.applied + 1);
        let want = desired(&["10.1.0.6", "10.1.0.7"], false);
        assert!(r.reconcile(&want).is_err());
        assert!(r.mirror().is_none());
        r.reconcile(&want).unwrap();
        assert_eq!(r.maps().dumps.get(), 2, "the retry re-read the maps");
        let (state, _) = from_dump(&r.maps().dump);
        assert!(desired::plan(&state, &ipv4_only(&want)).is_empty());
        assert_eq!(
            state.backends.len(),
            2,
            "the old backend is gone: {state:?}"
        );
    }

    /// A large ipcache change: the upserts the backends need go first on the reconcile's
    /// thread, the others through the second writer beside the rest of the plan; the maps
    /// and mirror end as one plain reconcile leaves them, with the backends written only
    /// after their ipcache entries. Below the threshold everything stays on one thread.
    #[test]
    fn a_large_ipcache_is_written_beside_the_services_once_the_backends_are_in() {
        let ip = |s: &str| s.parse::<IpNet>().unwrap();
        let mut want = desired(&["10.1.0.5", "10.1.0.6"], false);
        let info = want.ipcache[&ip("10.1.0.5/32")];
        want.ipcache.insert(ip("10.1.0.6/32"), info);
        want.ipcache.insert(ip("10.9.0.0/16"), info);
        for i in 0..IPCACHE_BESIDE_MIN as u32 {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a40_0000 + i), 32).unwrap();
            want.ipcache.insert(IpNet::V4(net), info);
        }
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut beside = Reconciler::new(FakeMaps {
            beside: Some(log.clone()),
            ..FakeMaps::default()
        });
        let mut plain = Reconciler::new(FakeMaps::default());
        let counts = beside.reconcile(&want).unwrap();
        plain.reconcile(&want).unwrap();
        assert!(beside.ipcache_written_beside());
        assert!(!plain.ipcache_written_beside());
        let v4 = want
            .ipcache
            .keys()
            .filter(|k| matches!(k, IpNet::V4(_)))
            .count();
        assert_eq!(counts["ipcache_upsert"], v4 as u64);
        // The backends' two entries and the /16 first, then the backends and services; the
        // rest went through the second writer.
        assert_eq!(
            beside.maps().batches[..2],
            [("ipcache_upsert", 3), ("backend_upsert", 2)]
        );
        assert_eq!(beside.maps.settle(), IPCACHE_BESIDE_MIN);
        assert_eq!(beside.maps().dump, plain.maps().dump);
        assert_eq!(beside.mirror(), plain.mirror());
        let (state, _) = from_dump(&beside.maps().dump);
        assert_eq!(Some(&state), beside.mirror());
        // A small change: one thread.
        want.ipcache.insert(ip("10.8.0.1/32"), info);
        beside
            .reconcile_changes(&want, &IpcacheChanges::Prefixes([ip("10.8.0.1/32")].into()))
            .unwrap();
        assert!(!beside.ipcache_written_beside());
        assert_eq!(beside.maps.settle(), 0);
    }

    /// Large batches of backend, slot and master upserts are written half on a second
    /// thread, which is joined before the next batch: every backend is in before any slot,
    /// every slot before any master; the maps end as one plain reconcile leaves them.
    #[test]
    fn large_batches_are_split_between_two_threads_in_the_plans_order() {
        let backends: Vec<String> = (1..=6).map(|i| format!("10.1.0.{i}")).collect();
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        let want = desired(&backends, false);
        let mut split = Reconciler::new(FakeMaps {
            lb_beside: Some(Default::default()),
            ..FakeMaps::default()
        });
        split.split_min = 4;
        let mut plain = Reconciler::new(FakeMaps::default());
        split.reconcile(&want).unwrap();
        plain.reconcile(&want).unwrap();
        let order = split.maps().order.lock().unwrap().clone();
        assert_eq!(
            order,
            [
                ("main", "ipcache_upsert"),
                ("main", "backend_upsert"),
                ("second", "backend_upsert"),
                ("main", "slot_upsert"),
                ("second", "slot_upsert"),
                ("main", "master_upsert"),
            ],
            "one master: not split"
        );
        assert_eq!(
            split.maps().batches,
            [
                ("ipcache_upsert", 1),
                ("backend_upsert", 3),
                ("slot_upsert", 3),
                ("master_upsert", 1)
            ]
        );
        assert_eq!(split.maps.settle(), 6);
        assert_eq!(split.maps().dump, plain.maps().dump);
        assert_eq!(split.mirror(), plain.mirror());
    }

    #[test]
    fn entries_with_unknown_protocols_are_removed() {
        let mut maps = FakeMaps::default();
        let k = ServiceEntryKey::master(Ipv4Addr::new(10, 96, 0, 99), 80, 99);
        maps.dump.services.insert(k, ServiceEntryValue::master(0));
        let mut r = Reconciler::new(maps);
        let counts = r.reconcile(&DesiredState::default()).unwrap();
        assert_eq!(counts["foreign_delete"], 1);
        assert!(r.maps().dump.services.is_empty());
    }
}
