//! The desired datapath of a node, and the ordered map operations that get the pinned maps
//! there (DESIGN.md sections 5 and 9). Pure: no aya, no IO.
//!
//! - [`compute`] turns what the agent knows about every cluster into a [`DesiredState`]:
//!   the frontends and backends of mesh-core's node plan ([`mesh_core::select::plan_node`],
//!   the same function `meshctl service explain` calls) and the ipcache.
//! - [`plan`] diffs the maps as they are ([`DatapathState`]) against a desired state and
//!   returns the [`Op`]s to apply, in an order that never leaves a service slot pointing at
//!   a missing backend and never shows an empty backend set for a service that has backends
//!   before and after.
//! - [`DatapathState::apply`] applies an op to an in-memory view of the maps: the datapath
//!   keeps its mirror of the pinned maps current with it, and tests replay plans step by step.
//!
//! Backend ids ([`BackendIds`]) are derived from the maps: a backend that is already
//! programmed keeps its id, a new one gets an id no entry of the maps uses, so ids are stable
//! across recomputations and agent restarts, and an id is never reused while a slot may still
//! point at it.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_core::select::plan_node;
use mesh_core::{ClusterName, Protocol};

pub use mesh_proto::state::{ClusterState, mesh_view};

/// A frontend: one ClusterIP, port and protocol of a global service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

/// A backend as the datapath sees it: where a connection is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BackendInfo {
    /// The cluster of the backend (0 if its config is not known yet).
    pub cluster_id: u8,
}

/// An ipcache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcacheInfo {
    pub identity: u32,
    /// The node hosting the endpoint (tunnel endpoint / next hop), if known.
    pub host_ip: Option<IpAddr>,
    pub cluster_id: u8,
    /// The endpoint is on this node (`MESH_IPCACHE_F_LOCAL`).
    pub local_node: bool,
    /// The endpoint is in another cluster (`MESH_IPCACHE_F_REMOTE`).
    pub remote_cluster: bool,
}

/// The maps a node should have.
///
/// The services and backends are shared (`Arc`): the [`ServicesCache`] hands the same ones
/// to every reconcile until its inputs move, and the reconciler keeps the ones it planned
/// and compares by pointer first. Copying and comparing them whole cost 6-13 ms per
/// reconcile at 10k services and 100k backends, every reconcile, an ipcache change too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Every frontend and its backends (sorted, no duplicates). An empty list means
    /// "refuse connections": the frontend exists but nothing may serve it.
    pub services: Arc<BTreeMap<ServiceKey, Vec<BackendKey>>>,
    pub backends: Arc<BTreeMap<BackendKey, BackendInfo>>,
    pub ipcache: BTreeMap<IpNet, IpcacheInfo>,
}

/// Leaves the node's quarantined backends out of every service that has other backends
/// (`mesh_core::health::apply_quarantine`), and backends no service uses any more out of the
/// backend map. Returns how many (service, backend) pairs were left out.
pub fn apply_quarantine(
    desired: &mut DesiredState,
    quarantined: &BTreeMap<mesh_core::health::BackendAddr, mesh_core::health::Quarantine>,
) -> usize {
    if quarantined.is_empty() {
        return 0;
    }
    let addr = |b: &BackendKey| mesh_core::health::BackendAddr {
        ip: b.ip,
        port: b.port,
        protocol: b.proto,
    };
    let mut left_out = 0;
    for backends in Arc::make_mut(&mut desired.services).values_mut() {
        let (kept, out) = mesh_core::health::apply_quarantine(backends, addr, quarantined);
        left_out += out.len();
        *backends = kept;
    }
    let used: std::collections::BTreeSet<BackendKey> =
        desired.services.values().flatten().copied().collect();
    Arc::make_mut(&mut desired.backends).retain(|b, _| used.contains(b));
    left_out
}

/// An entry left out of the desired state, for the "dropped entries" metric and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub cluster: ClusterName,
    pub ip: IpAddr,
    pub reason: DropReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// The endpoint's identity is outside its cluster's range.
    IdentityOutOfRange(mesh_core::Error),
    /// The cluster's config is not known yet, so its identities cannot be checked.
    ConfigUnknown,
    /// Another entry already holds this IP (the local cluster's entries win, then clusters
    /// in name order, node IPs before endpoints).
    DuplicateIp { kept: ClusterName },
    /// IPv6 (issue 16 part 6): the maps are IPv4-only, so these are left out and counted
    /// (metric reason `ipv6`), never programmed half-way. An IPv6 endpoint or node IP.
    Ipv6,
    /// An IPv4 endpoint whose node IP (the tunnel endpoint) is IPv6.
    Ipv6NodeIp(IpAddr),
    /// A service frontend `[vip]:port/protocol` (its backends are IPv6 too: `plan_node`
    /// matches address families).
    Ipv6Frontend(String),
}

impl DropReason {
    /// The `reason` label of `mesh_agent_dropped_entries`.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::IdentityOutOfRange(_) => "identity_out_of_range",
            DropReason::ConfigUnknown => "config_unknown",
            DropReason::DuplicateIp { .. } => "duplicate_ip",
            DropReason::Ipv6 | DropReason::Ipv6NodeIp(_) | DropReason::Ipv6Frontend(_) => "ipv6",
        }
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NO_IPV6: &str = "IPv6 is not supported (mesh is IPv4-only), not programmed";
        let (ip, cluster) = (self.ip, &self.cluster);
        match &self.reason {
            DropReason::Ipv6Frontend(frontend) => {
                write!(
                    f,
                    "service frontend {frontend} of cluster {cluster}: {NO_IPV6}"
                )
            }
            reason => {
                write!(f, "ipcache entry {ip} of cluster {cluster}: ")?;
                match reason {
                    DropReason::IdentityOutOfRange(e) => write!(f, "{e}"),
                    DropReason::ConfigUnknown => {
                        f.write_str("the cluster's config is not known yet")
                    }
                    DropReason::DuplicateIp { kept } => {
                        write!(f, "the IP is already used by cluster {kept}")
                    }
                    DropReason::Ipv6 | DropReason::Ipv6Frontend(_) => f.write_str(NO_IPV6),
                    DropReason::Ipv6NodeIp(host) => {
                        write!(f, "its node IP {host} is IPv6: {NO_IPV6}")
                    }
                }
            }
        }
    }
}

/// Computes the desired maps of node `node` of `local_cluster`.
///
/// Services: exactly the programmed frontends of mesh-core's [`plan_node`] (the decision
/// `meshctl service explain` prints: selection, "first Service wins a ClusterIP", address
/// family), turned into map keys. Ipcache: node IPs (host identity for this node,
/// remote-node for every other node) and endpoints of every cluster whose config is known
/// and whose identity lies in its cluster's range.
/// The clusters are owned or borrowed (the agent passes references to its state, never
/// a copy of it).
pub fn compute<S: Borrow<ClusterState>>(
    clusters: &BTreeMap<ClusterName, S>,
    local_cluster: &ClusterName,
    node: &str,
) -> (DesiredState, Vec<Dropped>) {
    let (mut desired, mut dropped) = compute_services(clusters, local_cluster, node);
    let (ipcache, ipcache_dropped) = compute_ipcache(clusters, local_cluster, node);
    desired.ipcache = ipcache;
    dropped.extend(ipcache_dropped);
    (desired, dropped)
}

/// The services and backends of [`compute`] (its ipcache left empty), and the frontends it
/// leaves out. With [`compute_ipcache`], the two halves of [`compute`]: the agent computes
/// this one while another thread writes the ipcache.
pub fn compute_services<S: Borrow<ClusterState>>(
    clusters: &BTreeMap<ClusterName, S>,
    local_cluster: &ClusterName,
    node: &str,
) -> (DesiredState, Vec<Dropped>) {
    compute_services_in(
        &mesh_view(clusters, local_cluster),
        clusters,
        local_cluster,
        node,
    )
}

/// [`compute_services`] over a view of the mesh the caller built (the agent: with the stale
/// nodes it keeps per cluster, `mesh_proto::state::mesh_view_with`).
pub fn compute_services_in<S: Borrow<ClusterState>>(
    view: &mesh_core::select::MeshView<'_>,
    clusters: &BTreeMap<ClusterName, S>,
    local_cluster: &ClusterName,
    node: &str,
) -> (DesiredState, Vec<Dropped>) {
    let (mut services, mut all_backends) = (BTreeMap::new(), BTreeMap::new());
    let mut dropped = Vec::new();
    let cluster_id = |name: &ClusterName| -> u8 {
        clusters
            .get(name)
            .and_then(|c| c.borrow().config.as_ref())
            .map_or(0, |c| c.id.get())
    };

    // Services.
    let plan = plan_node(view, node);
    for (frontend, selected) in plan.programmed() {
        if frontend.vip.is_ipv6() {
            // Its backends are IPv6 too (`plan_node` matches address families).
            dropped.push(Dropped {
                cluster: local_cluster.clone(),
                ip: frontend.vip,
                reason: DropReason::Ipv6Frontend(frontend.to_string()),
            });
            continue;
        }
        let proto = frontend.protocol;
        let mut backends = Vec::new();
        for b in selected {
            let bk = BackendKey {
                ip: b.ip,
                port: b.port,
                proto,
            };
            all_backends.entry(bk).or_insert_with(|| BackendInfo {
                cluster_id: cluster_id(&b.cluster),
            });
            backends.push(bk);
        }
        backends.sort();
        backends.dedup();
        let key = ServiceKey {
            vip: frontend.vip,
            port: frontend.port,
            proto,
        };
        services.insert(key, backends);
    }
    let desired = DesiredState {
        services: Arc::new(services),
        backends: Arc::new(all_backends),
        ipcache: BTreeMap::new(),
    };
    (desired, dropped)
}

/// [`compute_services_in`], computed again only when its inputs moved: the programmed
/// clusters, each one's `services` and `config` generations (`config` covers its id and
/// staleness), the node and the local cluster. Selection reads nothing else of the state
/// but the view's stale clusters and nodes, which hold how long each has been stale (the
/// time is an input): while any is stale, every call computes. At 10k services and 100k
/// backends a compute is about 100 ms, which every reconcile of an agent paid while only
/// endpoints or nodes changed (an import of a large peer, ipcache churn).
#[derive(Debug, Default)]
pub struct ServicesCache {
    key: Option<ServicesKey>,
    services: Arc<BTreeMap<ServiceKey, Vec<BackendKey>>>,
    backends: Arc<BTreeMap<BackendKey, BackendInfo>>,
    dropped: Vec<Dropped>,
}

#[derive(Debug, PartialEq, Eq)]
struct ServicesKey {
    local: ClusterName,
    node: String,
    /// Each programmed cluster with its `services` and `config` generations.
    clusters: Vec<(ClusterName, u64, u64)>,
}

impl ServicesCache {
    /// The services, backends and drops of [`compute_services_in`] for `view`, whose
    /// clusters' generations `generations` gives (`None` for a cluster: computed).
    pub fn compute<S: Borrow<ClusterState>>(
        &mut self,
        view: &mesh_core::select::MeshView<'_>,
        clusters: &BTreeMap<ClusterName, S>,
        generations: impl Fn(&ClusterName) -> Option<mesh_proto::state::Generations>,
        local_cluster: &ClusterName,
        node: &str,
    ) -> (DesiredState, Vec<Dropped>) {
        let key = (view.stale.is_empty() && view.stale_nodes.is_empty())
            .then(|| {
                let clusters = clusters
                    .keys()
                    .map(|name| generations(name).map(|g| (name.clone(), g.services, g.config)))
                    .collect::<Option<Vec<_>>>()?;
                Some(ServicesKey {
                    local: local_cluster.clone(),
                    node: node.to_owned(),
                    clusters,
                })
            })
            .flatten();
        if key.is_some() && key == self.key {
            let desired = DesiredState {
                services: self.services.clone(),
                backends: self.backends.clone(),
                ipcache: BTreeMap::new(),
            };
            return (desired, self.dropped.clone());
        }
        let (desired, dropped) = compute_services_in(view, clusters, local_cluster, node);
        self.services = desired.services.clone();
        self.backends = desired.backends.clone();
        self.dropped = dropped.clone();
        self.key = key;
        (desired, dropped)
    }
}

/// The ipcache of [`compute`] and what it leaves out. The entries of each cluster are
/// considered in the order local cluster, then the others by name; in each, node IPs (nodes
/// by name), then endpoints (by IP). The first entry of an IP wins, the later ones are
/// dropped as duplicates. What is left out is listed in cluster order, by IP within a
/// cluster.
///
/// This is the first update of an [`IpcacheBuilder`](crate::ipcache::IpcacheBuilder), the
/// structure the agent keeps to update the ipcache cluster by cluster afterwards.
pub fn compute_ipcache<S: Borrow<ClusterState>>(
    clusters: &BTreeMap<ClusterName, S>,
    local_cluster: &ClusterName,
    node: &str,
) -> (BTreeMap<IpNet, IpcacheInfo>, Vec<Dropped>) {
    let mut builder = crate::ipcache::IpcacheBuilder::new();
    builder.update(clusters, |_| None, local_cluster, node);
    let dropped = builder.dropped();
    (builder.take(), dropped)
}

// === the maps as they are ===

/// The service, backend and ipcache maps as they are (or will be once `apply`d).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathState {
    pub services: BTreeMap<ServiceKey, ServiceSlots>,
    /// By backend id (never 0).
    pub backends: BTreeMap<u32, BackendEntry>,
    pub ipcache: BTreeMap<IpNet, IpcacheInfo>,
}

/// The entries of one frontend in `mesh_services`. After a crash in the middle of an update
/// these may be inconsistent (slots beyond the count, no master entry); [`plan`] repairs
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSlots {
    /// The master entry (slot 0): the number of backend slots.
    pub count: Option<u16>,
    /// Backend ids by slot (1-based).
    pub slots: BTreeMap<u16, u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    pub key: BackendKey,
    pub info: BackendInfo,
}

/// One map operation. [`plan`] returns them in the order they must be applied; consecutive
/// operations of one kind may be batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    IpcacheUpsert {
        prefix: IpNet,
        info: IpcacheInfo,
    },
    BackendUpsert {
        id: u32,
        backend: BackendEntry,
    },
    /// Slot `slot` (>= 1) of `service` points at backend `backend_id`, whose entry is
    /// `backend` (the slot carries a copy of it for the datapath).
    SlotUpsert {
        service: ServiceKey,
        slot: u16,
        backend_id: u32,
        backend: BackendEntry,
    },
    /// The master entry (slot 0) of `service` with `count` backend slots.
    MasterUpsert {
        service: ServiceKey,
        count: u16,
    },
    MasterDelete {
        service: ServiceKey,
    },
    SlotDelete {
        service: ServiceKey,
        slot: u16,
    },
    BackendDelete {
        id: u32,
    },
    IpcacheDelete {
        prefix: IpNet,
    },
}

// === impl DatapathState ===

impl DatapathState {
    /// Applies one operation to this view of the maps.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::IpcacheUpsert { prefix, info } => {
                self.ipcache.insert(prefix, info);
            }
            Op::IpcacheDelete { prefix } => {
                self.ipcache.remove(&prefix);
            }
            Op::BackendUpsert { id, backend } => {
                self.backends.insert(id, backend);
            }
            Op::BackendDelete { id } => {
                self.backends.remove(&id);
            }
            Op::SlotUpsert {
                service,
                slot,
                backend_id,
                ..
            } => {
                self.services
                    .entry(service)
                    .or_default()
                    .slots
                    .insert(slot, backend_id);
            }
            Op::MasterUpsert { service, count } => {
                self.services.entry(service).or_default().count = Some(count);
            }
            Op::SlotDelete { service, slot } => self.remove_from(service, |s| {
                s.slots.remove(&slot);
            }),
            Op::MasterDelete { service } => self.remove_from(service, |s| s.count = None),
        }
    }

    fn remove_from(&mut self, service: ServiceKey, f: impl FnOnce(&mut ServiceSlots)) {
        if let Some(s) = self.services.get_mut(&service) {
            f(s);
            if s.count.is_none() && s.slots.is_empty() {
                self.services.remove(&service);
            }
        }
    }

    /// Number of map entries: services (master and slots), backends, ipcache.
    pub fn entries(&self) -> (usize, usize, usize) {
        let services = self
            .services
            .values()
            .map(|s| s.slots.len() + usize::from(s.count.is_some()))
            .sum();
        (services, self.backends.len(), self.ipcache.len())
    }
}

/// Backend ids for a desired state, given the maps as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendIds {
    ids: BTreeMap<BackendKey, u32>,
}

// === impl BackendIds ===

impl BackendIds {
    /// Gives every backend of `desired` an id: the id it already has in `current` (the
    /// lowest, should the maps hold it twice), else the lowest id that `current` does not
    /// use. New backends therefore never take the id of a backend that is being removed,
    /// which service slots may still point at until the removal is applied.
    pub fn assign(current: &DatapathState, desired: &DesiredState) -> Self {
        let mut existing: BTreeMap<BackendKey, u32> = BTreeMap::new();
        for (&id, entry) in &current.backends {
            // Ids iterate in ascending order: keep the first.
            existing.entry(entry.key).or_insert(id);
        }
        let mut used = current.backends.keys().copied().peekable();
        let mut next = 1u32;
        let mut ids = BTreeMap::new();
        for key in desired.backends.keys() {
            let id = match existing.get(key) {
                Some(&id) => id,
                None => {
                    // Both `used` and the ids handed out here ascend: one pass over `used`.
                    loop {
                        while used.next_if(|&u| u < next).is_some() {}
                        if used.peek() == Some(&next) {
                            next += 1;
                        } else {
                            break;
                        }
                    }
                    next += 1;
                    next - 1
                }
            };
            ids.insert(*key, id);
        }
        Self { ids }
    }

    pub fn get(&self, key: &BackendKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&BackendKey, u32)> {
        self.ids.iter().map(|(k, v)| (k, *v))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The operations that turn `current` into `desired`, in the order of DESIGN.md section 9:
///
/// 1. ipcache upserts (so the classifier knows a backend before traffic reaches it);
/// 2. new and changed backends;
/// 3. service slots, each pointing at a backend that exists by now; a slot that already
///    holds a wanted backend keeps it, so a change rewrites only the slots it must;
/// 4. master entries with their new count: the switch to the new backend set happens
///    here, in one write per frontend, from one non-empty set to the other;
/// 5. master entries of frontends that are gone, then slots beyond the new count and
///    slots of frontends that are gone;
/// 6. backends no slot points at any more;
/// 7. ipcache deletes.
///
/// Applying the result to `current` gives a state for which `plan` returns nothing.
pub fn plan(current: &DatapathState, desired: &DesiredState) -> Vec<Op> {
    plan_scoped(current, desired, None)
}

/// [`plan`], with the ipcache compared only at `ipcache_changed` when given: the caller
/// knows `current.ipcache` equals `desired.ipcache` at every other prefix (the agent's
/// mirror after its last reconcile, and the prefixes its ipcache builder changed since).
pub fn plan_scoped(
    current: &DatapathState,
    desired: &DesiredState,
    ipcache_changed: Option<&BTreeSet<IpNet>>,
) -> Vec<Op> {
    let (mut ops, ipcache_deletes) = ipcache_ops(current, desired, ipcache_changed);
    ops.extend(plan_services(current, desired));
    ops.extend(ipcache_deletes);
    ops
}

/// Groups 2 to 6 of [`plan`]: the backends and services, without the ipcache (which the
/// agent may write on a second thread meanwhile: `Reconciler::reconcile_changes`).
pub fn plan_services(current: &DatapathState, desired: &DesiredState) -> Vec<Op> {
    let ids = BackendIds::assign(current, desired);
    let id_of = |key: &BackendKey| ids.get(key).expect("every desired backend has an id");

    let mut backend_upserts = Vec::new();
    // Backends whose entry changes in place: the slots pointing at them carry a copy of
    // the entry, so they are written again too.
    let mut rewritten = BTreeSet::new();
    for (key, &info) in desired.backends.iter() {
        let id = id_of(key);
        let backend = BackendEntry { key: *key, info };
        match current.backends.get(&id) {
            Some(have) if *have == backend => {}
            have => {
                if have.is_some() {
                    rewritten.insert(id);
                }
                backend_upserts.push(Op::BackendUpsert { id, backend });
            }
        }
    }
    let entry_of = |key: &BackendKey| BackendEntry {
        key: *key,
        info: desired.backends.get(key).copied().unwrap_or_default(),
    };
    let wanted_ids: BTreeSet<u32> = ids.iter().map(|(_, id)| id).collect();
    let backend_deletes: Vec<Op> = current
        .backends
        .keys()
        .filter(|id| !wanted_ids.contains(id))
        .map(|&id| Op::BackendDelete { id })
        .collect();

    let empty = ServiceSlots::default();
    let mut slot_upserts = Vec::new();
    let mut master_upserts = Vec::new();
    let mut master_deletes = Vec::new();
    let mut slot_deletes = Vec::new();
    for (&service, backends) in desired.services.iter() {
        let cur = current.services.get(&service).unwrap_or(&empty);
        let mut seen = BTreeSet::new();
        let mut want: Vec<u32> = backends
            .iter()
            .map(id_of)
            .filter(|id| seen.insert(*id))
            .collect();
        // The entries the slot writes copy, built only for a frontend with a slot to write
        // (most reconciles write none, and this runs for every frontend).
        let mut entries: Option<BTreeMap<u32, BackendEntry>> = None;
        // The count is a u16: a frontend with more backends uses the first 65535.
        want.truncate(usize::from(u16::MAX));
        let count = want.len() as u16;
        for (slot, backend_id) in assign_slots(cur, &want) {
            if cur.slots.get(&slot) != Some(&backend_id) || rewritten.contains(&backend_id) {
                slot_upserts.push(Op::SlotUpsert {
                    service,
                    slot,
                    backend_id,
                    backend: entries.get_or_insert_with(|| {
                        backends.iter().map(|k| (id_of(k), entry_of(k))).collect()
                    })[&backend_id],
                });
            }
        }
        if cur.count != Some(count) {
            master_upserts.push(Op::MasterUpsert { service, count });
        }
        slot_deletes.extend(
            cur.slots
                .range(count.saturating_add(1)..)
                .map(|(&slot, _)| Op::SlotDelete { service, slot }),
        );
    }
    for (&service, cur) in &current.services {
        if desired.services.contains_key(&service) {
            continue;
        }
        if cur.count.is_some() {
            master_deletes.push(Op::MasterDelete { service });
        }
        slot_deletes.extend(
            cur.slots
                .keys()
                .map(|&slot| Op::SlotDelete { service, slot }),
        );
    }

    let mut ops = backend_upserts;
    ops.extend(slot_upserts);
    ops.extend(master_upserts);
    ops.extend(master_deletes);
    ops.extend(slot_deletes);
    ops.extend(backend_deletes);
    ops
}

/// The ipcache upserts and deletes of [`plan_scoped`] (groups 1 and 7), each in prefix
/// order.
pub fn ipcache_ops(
    current: &DatapathState,
    desired: &DesiredState,
    ipcache_changed: Option<&BTreeSet<IpNet>>,
) -> (Vec<Op>, Vec<Op>) {
    match ipcache_changed {
        None => diff_ipcache(&current.ipcache, &desired.ipcache),
        Some(prefixes) => diff_ipcache_at(&current.ipcache, &desired.ipcache, prefixes),
    }
}

/// The ipcache upserts and deletes that turn `current` into `desired` (groups 1 and 7 of
/// [`plan`]), each in prefix order. Both maps iterate in prefix order: one merge pass, no
/// lookups.
pub fn diff_ipcache(
    current: &BTreeMap<IpNet, IpcacheInfo>,
    desired: &BTreeMap<IpNet, IpcacheInfo>,
) -> (Vec<Op>, Vec<Op>) {
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    let mut cur = current.iter().peekable();
    for (&prefix, &info) in desired {
        while let Some((&gone, _)) = cur.next_if(|(p, _)| **p < prefix) {
            deletes.push(Op::IpcacheDelete { prefix: gone });
        }
        match cur.next_if(|(p, _)| **p == prefix) {
            Some((_, have)) if *have == info => {}
            _ => upserts.push(Op::IpcacheUpsert { prefix, info }),
        }
    }
    deletes.extend(cur.map(|(&prefix, _)| Op::IpcacheDelete { prefix }));
    (upserts, deletes)
}

/// [`diff_ipcache`] at `prefixes` only (in prefix order).
pub fn diff_ipcache_at(
    current: &BTreeMap<IpNet, IpcacheInfo>,
    desired: &BTreeMap<IpNet, IpcacheInfo>,
    prefixes: &BTreeSet<IpNet>,
) -> (Vec<Op>, Vec<Op>) {
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    for &prefix in prefixes {
        match (current.get(&prefix), desired.get(&prefix)) {
            (have, Some(&info)) if have != Some(&info) => {
                upserts.push(Op::IpcacheUpsert { prefix, info });
            }
            (Some(_), None) => deletes.push(Op::IpcacheDelete { prefix }),
            _ => {}
        }
    }
    (upserts, deletes)
}

/// Slots `1..=want.len()` for the backend ids `want` (no duplicates): a slot that already
/// holds a wanted id keeps it, the other ids fill the free slots in order.
fn assign_slots(cur: &ServiceSlots, want: &[u32]) -> BTreeMap<u16, u32> {
    let count = want.len() as u16;
    let wanted: BTreeSet<u32> = want.iter().copied().collect();
    let mut slots = BTreeMap::new();
    let mut placed = BTreeSet::new();
    if count > 0 {
        for (&slot, &id) in cur.slots.range(1..=count) {
            if wanted.contains(&id) && placed.insert(id) {
                slots.insert(slot, id);
            }
        }
    }
    let mut rest = want.iter().filter(|id| !placed.contains(*id));
    for slot in 1..=count {
        slots
            .entry(slot)
            .or_insert_with(|| *rest.next().expect("as many ids as slots"));
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::identity::{RESERVED_HOST, RESERVED_REMOTE_NODE};
    use mesh_core::{
        Affinity, Backend, BackendConditions, ClusterConfig, ClusterId, Endpoint, GlobalService,
        IdentityId, Node, ServicePort, TrafficPolicy,
    };

    const NODE: &str = "node-a";

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn config(n: &str, id: u32, pod: &str) -> ClusterConfig {
        ClusterConfig {
            name: name(n),
            id: ClusterId::new(id).unwrap(),
            pod_cidrs: vec![pod.parse().unwrap()],
            service_cidr: None,
            capabilities: vec![],
            version: "test".into(),
        }
    }

    fn http() -> ServicePort {
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn backend(addr: &str, node: &str, ready: bool, target: u16) -> Backend {
        Backend {
            ip: ip(addr),
            ports: vec![ServicePort {
                port: target,
                ..http()
            }],
            node: node.into(),
            zone: String::new(),
            conditions: BackendConditions {
                ready,
                serving: ready,
                terminating: false,
            },
        }
    }

    fn service(cluster: &str, frontends: &[&str], backends: Vec<Backend>) -> GlobalService {
        GlobalService {
            cluster: name(cluster),
            namespace: "ns".into(),
            name: "web".into(),
            global: true,
            shared: true,
            affinity: Affinity::None,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: vec![http()],
            frontends: frontends.iter().map(|f| ip(f)).collect(),
            backends,
        }
    }

    fn endpoint(addr: &str, identity: u32, node: &str, host: &str) -> Endpoint {
        Endpoint {
            ip: ip(addr),
            identity: IdentityId(identity),
            host_ip: Some(ip(host)),
            node: node.into(),
            namespace: "ns".into(),
            pod: format!("pod-{addr}"),
            named_ports: Vec::new(),
        }
    }

    fn node(cluster: &str, n: &str, addr: &str) -> Node {
        Node {
            cluster: name(cluster),
            name: n.into(),
            internal_ips: vec![ip(addr)],
            pod_cidrs: vec![],
            stale_since: None,
        }
    }

    fn cluster(cfg: Option<ClusterConfig>, svcs: Vec<GlobalService>) -> ClusterState {
        ClusterState {
            config: cfg,
            services: svcs
                .into_iter()
                .map(|s| ((s.namespace.clone(), s.name.clone()), s))
                .collect(),
            ..Default::default()
        }
    }

    fn tcp(addr: &str, port: u16) -> BackendKey {
        BackendKey {
            ip: ip(addr),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn frontend(addr: &str) -> ServiceKey {
        ServiceKey {
            vip: ip(addr),
            port: 80,
            proto: Protocol::Tcp,
        }
    }

    /// Two clusters: local (id 1) and east (id 2), one global service.
    fn mesh(
        local_backends: Vec<Backend>,
        remote_backends: Vec<Backend>,
    ) -> BTreeMap<ClusterName, ClusterState> {
        let mut local = cluster(
            Some(config("local", 1, "10.1.0.0/16")),
            vec![service("local", &["10.96.0.10"], local_backends)],
        );
        local
            .nodes
            .insert(NODE.into(), node("local", NODE, "192.168.1.1"));
        local
            .nodes
            .insert("node-b".into(), node("local", "node-b", "192.168.1.2"));
        local.endpoints.insert(
            ip("10.1.0.5"),
            endpoint("10.1.0.5", (1 << 16) | 300, NODE, "192.168.1.1"),
        );
        let mut east = cluster(
            Some(config("east", 2, "10.2.0.0/16")),
            vec![service("east", &["10.100.0.10"], remote_backends)],
        );
        east.nodes
            .insert("e1".into(), node("east", "e1", "192.168.2.1"));
        east.endpoints.insert(
            ip("10.2.0.5"),
            endpoint("10.2.0.5", (2 << 16) | 300, "e1", "192.168.2.1"),
        );
        BTreeMap::from([(name("local"), local), (name("east"), east)])
    }

    fn desired_of(clusters: &BTreeMap<ClusterName, ClusterState>) -> DesiredState {
        let (d, dropped) = compute(clusters, &name("local"), NODE);
        assert!(dropped.is_empty(), "{dropped:?}");
        d
    }

    #[test]
    fn compute_services_and_ipcache() {
        let clusters = mesh(
            vec![
                backend("10.1.0.5", NODE, true, 8080),
                backend("10.1.0.6", "node-b", false, 8080),
            ],
            vec![backend("10.2.0.5", "e1", true, 9090)],
        );
        let d = desired_of(&clusters);
        // Only the local frontend; the remote backend with its own target port.
        assert_eq!(
            *d.services,
            BTreeMap::from([(
                frontend("10.96.0.10"),
                vec![tcp("10.1.0.5", 8080), tcp("10.2.0.5", 9090)]
            )])
        );
        assert_eq!(
            *d.backends,
            BTreeMap::from([
                (tcp("10.1.0.5", 8080), BackendInfo { cluster_id: 1 }),
                (tcp("10.2.0.5", 9090), BackendInfo { cluster_id: 2 }),
            ])
        );
        let entry = |s: &str| d.ipcache[&IpNet::from(ip(s))];
        assert_eq!(
            entry("192.168.1.1"),
            IpcacheInfo {
                identity: RESERVED_HOST,
                host_ip: None,
                cluster_id: 1,
                local_node: true,
                remote_cluster: false
            }
        );
        assert_eq!(entry("192.168.1.2").identity, RESERVED_REMOTE_NODE);
        assert_eq!(entry("192.168.2.1").identity, RESERVED_REMOTE_NODE);
        assert!(entry("192.168.2.1").remote_cluster);
        assert_eq!(
            entry("10.1.0.5"),
            IpcacheInfo {
                identity: (1 << 16) | 300,
                host_ip: Some(ip("192.168.1.1")),
                cluster_id: 1,
                local_node: true,
                remote_cluster: false
            }
        );
        assert_eq!(
            entry("10.2.0.5"),
            IpcacheInfo {
                identity: (2 << 16) | 300,
                host_ip: Some(ip("192.168.2.1")),
                cluster_id: 2,
                local_node: false,
                remote_cluster: true
            }
        );
        assert_eq!(d.ipcache.len(), 5);
    }

    /// The cache answers from its copy while the clusters' services and config generations
    /// stay, and computes again when one moves, when the set of clusters changes, and
    /// whenever a cluster or a node is stale (time is then an input).
    #[test]
    fn services_are_computed_again_only_when_their_inputs_moved() {
        let mut clusters = mesh(
            vec![backend("10.1.0.5", NODE, true, 8080)],
            vec![backend("10.2.0.5", "e1", true, 9090)],
        );
        let mut gens: BTreeMap<ClusterName, mesh_proto::state::Generations> = clusters
            .keys()
            .map(|n| (n.clone(), Default::default()))
            .collect();
        let mut cache = ServicesCache::default();
        let local = name("local");
        let mut compute =
            |clusters: &BTreeMap<ClusterName, ClusterState>,
             gens: &BTreeMap<ClusterName, mesh_proto::state::Generations>| {
                let view = mesh_view(clusters, &local);
                let (d, dropped) =
                    cache.compute(&view, clusters, |n| gens.get(n).copied(), &local, NODE);
                assert!(dropped.is_empty());
                d.services
            };
        let fresh = |clusters: &BTreeMap<ClusterName, ClusterState>| {
            compute_services(clusters, &local, NODE).0.services
        };
        let first = compute(&clusters, &gens);
        assert_eq!(first, fresh(&clusters));
        // A change of the services that bumps no generation of the inputs (as an
        // endpoint's change does not): cached.
        let add_backend = |clusters: &mut BTreeMap<ClusterName, ClusterState>, addr: &str| {
            let local = &mut clusters.get_mut(&name("local")).unwrap().services;
            let svc = local.values_mut().next().unwrap();
            svc.backends.push(backend(addr, NODE, true, 8080));
        };
        add_backend(&mut clusters, "10.1.0.7");
        assert_ne!(
            fresh(&clusters),
            first,
            "the change matters to a fresh compute"
        );
        let cached = compute(&clusters, &gens);
        assert_eq!(cached, first, "served from the cache");
        assert!(
            Arc::ptr_eq(&cached, &first),
            "the cached services are shared, not copied"
        );
        // The services generation moves: computed.
        gens.get_mut(&name("local")).unwrap().services = 7;
        let second = compute(&clusters, &gens);
        assert_eq!(second, fresh(&clusters));
        assert_ne!(second, first);
        // The config generation moves (ids, staleness): computed.
        add_backend(&mut clusters, "10.1.0.8");
        gens.get_mut(&name("east")).unwrap().config = 3;
        let third = compute(&clusters, &gens);
        assert_eq!(third, fresh(&clusters));
        assert_ne!(third, second);
        // A cluster leaves the programmed set: computed, and back.
        let mut fewer = clusters.clone();
        fewer.remove(&name("east"));
        assert_eq!(compute(&fewer, &gens), fresh(&fewer));
        assert_eq!(compute(&clusters, &gens), third);
        // A stale cluster: every call computes, even with the generations unchanged.
        clusters.get_mut(&name("east")).unwrap().stale_since = Some(std::time::SystemTime::now());
        assert_eq!(compute(&clusters, &gens), fresh(&clusters));
        add_backend(&mut clusters, "10.1.0.9");
        let stale = compute(&clusters, &gens);
        assert_eq!(stale, fresh(&clusters));
        assert_ne!(stale, third);
    }

    #[test]
    fn compute_uses_affinity_and_keeps_empty_frontends() {
        let mut clusters = mesh(
            vec![backend("10.1.0.5", NODE, true, 8080)],
            vec![backend("10.2.0.5", "e1", true, 8080)],
        );
        let svc = clusters
            .get_mut(&name("local"))
            .unwrap()
            .services
            .values_mut()
            .next()
            .unwrap();
        svc.affinity = Affinity::Local;
        let d = desired_of(&clusters);
        assert_eq!(d.services[&frontend("10.96.0.10")], [tcp("10.1.0.5", 8080)]);
        assert_eq!(d.backends.len(), 1);

        // Nothing ready anywhere: the frontend stays, with no backend (refuse).
        let clusters = mesh(vec![backend("10.1.0.5", NODE, false, 8080)], vec![]);
        let d = desired_of(&clusters);
        assert_eq!(d.services[&frontend("10.96.0.10")], []);
        assert!(d.backends.is_empty());

        // A service only in a remote cluster has no frontend here.
        let mut clusters = mesh(vec![], vec![backend("10.2.0.5", "e1", true, 8080)]);
        clusters.get_mut(&name("local")).unwrap().services.clear();
        assert!(desired_of(&clusters).services.is_empty());
    }

    #[test]
    fn compute_demotes_backends_on_nodes_not_reporting() {
        // node-b of the local cluster marked not reporting by its publisher (issue 14
        // part 4): its ready backend gives way to fresh ones, local or remote, and carries
        // the traffic again when nothing fresh is ready; never an empty frontend.
        let lost = |mut clusters: BTreeMap<ClusterName, ClusterState>| {
            let local = clusters.get_mut(&name("local")).unwrap();
            local.nodes.get_mut("node-b").unwrap().stale_since =
                Some(std::time::SystemTime::now() - std::time::Duration::from_secs(40));
            clusters
        };
        let clusters = lost(mesh(
            vec![
                backend("10.1.0.5", NODE, true, 8080),
                backend("10.1.0.6", "node-b", true, 8080),
            ],
            vec![backend("10.2.0.5", "e1", true, 8080)],
        ));
        assert_eq!(
            desired_of(&clusters).services[&frontend("10.96.0.10")],
            [tcp("10.1.0.5", 8080), tcp("10.2.0.5", 8080)]
        );
        // Only the lost node's backend is ready: used.
        let clusters = lost(mesh(
            vec![
                backend("10.1.0.5", NODE, false, 8080),
                backend("10.1.0.6", "node-b", true, 8080),
            ],
            vec![backend("10.2.0.5", "e1", false, 8080)],
        ));
        assert_eq!(
            desired_of(&clusters).services[&frontend("10.96.0.10")],
            [tcp("10.1.0.6", 8080)]
        );
    }

    #[test]
    fn compute_matches_address_families() {
        let mut clusters = mesh(
            vec![
                backend("10.1.0.5", NODE, true, 8080),
                backend("fd00:1::5", NODE, true, 8080),
            ],
            vec![],
        );
        let svc = clusters
            .get_mut(&name("local"))
            .unwrap()
            .services
            .values_mut()
            .next()
            .unwrap();
        svc.frontends.push(ip("fd00:96::10"));
        let (d, _) = compute(&clusters, &name("local"), NODE);
        assert_eq!(d.services[&frontend("10.96.0.10")], [tcp("10.1.0.5", 8080)]);
        // IPv6 (issue 16 part 6): left out explicitly, never programmed.
        assert!(!d.services.contains_key(&frontend("fd00:96::10")));
        assert!(d.backends.keys().all(|b| b.ip.is_ipv4()));
    }

    #[test]
    fn compute_drops_ipv6_with_a_reason() {
        let mut clusters = mesh(vec![backend("fd00:1::5", NODE, true, 8080)], vec![]);
        let local = clusters.get_mut(&name("local")).unwrap();
        local.services.values_mut().next().unwrap().frontends = vec![ip("fd00:96::10")];
        local.endpoints.insert(
            ip("fd00:1::5"),
            endpoint("fd00:1::5", (1 << 16) | 300, NODE, "192.168.1.1"),
        );
        // An IPv4 endpoint whose node IP is IPv6: no IPv4 tunnel endpoint to program.
        local.endpoints.insert(
            ip("10.1.0.9"),
            endpoint("10.1.0.9", (1 << 16) | 300, NODE, "fd00::1"),
        );
        let (d, dropped) = compute(&clusters, &name("local"), NODE);
        assert!(d.services.is_empty(), "{:?}", d.services);
        assert!(d.ipcache.keys().all(|p| matches!(p, IpNet::V4(_))));
        assert!(!d.ipcache.contains_key(&IpNet::from(ip("10.1.0.9"))));
        let ipv6: Vec<String> = dropped
            .iter()
            .filter(|d| d.reason.label() == "ipv6")
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            ipv6,
            [
                "service frontend [fd00:96::10]:80/TCP of cluster local: IPv6 is not supported (mesh is IPv4-only), not programmed",
                "ipcache entry 10.1.0.9 of cluster local: its node IP fd00::1 is IPv6: IPv6 is not supported (mesh is IPv4-only), not programmed",
                "ipcache entry fd00:1::5 of cluster local: IPv6 is not supported (mesh is IPv4-only), not programmed",
            ]
        );
    }

    #[test]
    fn compute_drops_bad_ipcache_entries() {
        let mut clusters = mesh(vec![], vec![]);
        let east = clusters.get_mut(&name("east")).unwrap();
        // Identity of cluster 3 published by cluster 2.
        east.endpoints.insert(
            ip("10.2.0.6"),
            endpoint("10.2.0.6", (3 << 16) | 300, "e1", "192.168.2.1"),
        );
        // The local cluster's endpoint IP claimed by east too.
        east.endpoints.insert(
            ip("10.1.0.5"),
            endpoint("10.1.0.5", (2 << 16) | 301, "e1", "192.168.2.1"),
        );
        let mut west = cluster(None, vec![]);
        west.endpoints.insert(
            ip("10.3.0.1"),
            endpoint("10.3.0.1", (3 << 16) | 300, "w1", "192.168.3.1"),
        );
        clusters.insert(name("west"), west);

        let (d, dropped) = compute(&clusters, &name("local"), NODE);
        let text: Vec<String> = dropped.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with(
                "ipcache entry 10.1.0.5 of cluster east: the IP is already used by cluster local"
            ),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("ipcache entry 10.2.0.6 of cluster east: identity 196908"),
            "{text:?}"
        );
        assert_eq!(
            text[2],
            "ipcache entry 10.3.0.1 of cluster west: the cluster's config is not known yet"
        );
        // The local cluster's entry was kept.
        assert_eq!(d.ipcache[&IpNet::from(ip("10.1.0.5"))].cluster_id, 1);
        assert!(!d.ipcache.contains_key(&IpNet::from(ip("10.2.0.6"))));
    }

    // === plan ===

    /// Checks that `state` has no dangling reference: every master's slots exist and point
    /// at existing backends.
    fn assert_consistent(state: &DatapathState, step: &str) {
        for (svc, s) in &state.services {
            let Some(count) = s.count else { continue };
            for slot in 1..=count {
                let id = s
                    .slots
                    .get(&slot)
                    .unwrap_or_else(|| panic!("{step}: {svc:?} slot {slot} of {count} missing"));
                assert!(
                    state.backends.contains_key(id),
                    "{step}: {svc:?} slot {slot} -> missing backend {id}"
                );
            }
        }
    }

    /// Applies `ops` one at a time, checking consistency after each, and that no frontend
    /// that has backends before and after is ever seen with none.
    fn apply_checked(state: &mut DatapathState, desired: &DesiredState, ops: &[Op]) {
        let busy: Vec<ServiceKey> = state
            .services
            .iter()
            .filter(|(k, s)| {
                s.count.unwrap_or(0) > 0 && desired.services.get(k).is_some_and(|b| !b.is_empty())
            })
            .map(|(k, _)| *k)
            .collect();
        assert_consistent(state, "before");
        for (i, op) in ops.iter().enumerate() {
            state.apply(op);
            let step = format!("after op {i} {op:?}");
            assert_consistent(state, &step);
            for k in &busy {
                let count = state.services.get(k).and_then(|s| s.count).unwrap_or(0);
                assert!(count > 0, "{step}: {k:?} has no backend for a moment");
            }
        }
        assert!(
            plan(state, desired).is_empty(),
            "not converged: {:?}",
            plan(state, desired)
        );
        assert_matches(state, desired);
    }

    /// The maps hold exactly `desired`.
    fn assert_matches(state: &DatapathState, desired: &DesiredState) {
        let backends: BTreeMap<BackendKey, BackendInfo> =
            state.backends.values().map(|b| (b.key, b.info)).collect();
        assert_eq!(backends, *desired.backends);
        assert_eq!(
            state.backends.len(),
            desired.backends.len(),
            "duplicate backends"
        );
        assert_eq!(state.ipcache, desired.ipcache);
        let services: BTreeMap<ServiceKey, Vec<BackendKey>> = state
            .services
            .iter()
            .map(|(k, s)| {
                assert_eq!(
                    s.count.map(usize::from),
                    Some(s.slots.len()),
                    "{k:?}: {s:?}"
                );
                let mut v: Vec<BackendKey> =
                    s.slots.values().map(|id| state.backends[id].key).collect();
                v.sort();
                (*k, v)
            })
            .collect();
        assert_eq!(services, *desired.services);
    }

    fn kinds(ops: &[Op]) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = ops
            .iter()
            .map(|op| match op {
                Op::IpcacheUpsert { .. } => "ipcache+",
                Op::BackendUpsert { .. } => "backend+",
                Op::SlotUpsert { .. } => "slot+",
                Op::MasterUpsert { .. } => "master+",
                Op::MasterDelete { .. } => "master-",
                Op::SlotDelete { .. } => "slot-",
                Op::BackendDelete { .. } => "backend-",
                Op::IpcacheDelete { .. } => "ipcache-",
            })
            .collect();
        k.dedup();
        k
    }

    #[test]
    fn from_empty_maps() {
        let d = desired_of(&mesh(
            vec![backend("10.1.0.5", NODE, true, 8080)],
            vec![backend("10.2.0.5", "e1", true, 8080)],
        ));
        let mut state = DatapathState::default();
        let ops = plan(&state, &d);
        assert_eq!(kinds(&ops), ["ipcache+", "backend+", "slot+", "master+"]);
        apply_checked(&mut state, &d, &ops);
        assert_eq!(state.entries(), (3, 2, 5));
        // Ids start at 1, in backend order.
        let ids: Vec<u32> = state.backends.keys().copied().collect();
        assert_eq!(ids, [1, 2]);
    }

    /// Each slot carries a copy of its backend's entry (the datapath reads the copy): a
    /// backend whose entry changes in place has every slot pointing at it written again,
    /// after the backend and with the new entry.
    #[test]
    fn slots_carry_their_backend_and_follow_its_changes() {
        let before = desired_of(&mesh(
            vec![
                backend("10.1.0.5", NODE, true, 8080),
                backend("10.1.0.6", NODE, true, 8080),
            ],
            vec![],
        ));
        let mut state = DatapathState::default();
        let ops = plan(&state, &before);
        let slot_copies = |ops: &[Op], d: &DesiredState| {
            for op in ops {
                if let Op::SlotUpsert { backend, .. } = op {
                    assert_eq!(
                        d.backends.get(&backend.key),
                        Some(&backend.info),
                        "{op:?} carries another entry than the desired backend's"
                    );
                }
            }
        };
        slot_copies(&ops, &before);
        apply_checked(&mut state, &before, &ops);

        // The cluster of 10.1.0.6 becomes known: same key and id, new entry.
        let mut after = before.clone();
        let changed = tcp("10.1.0.6", 8080);
        Arc::make_mut(&mut after.backends)
            .get_mut(&changed)
            .unwrap()
            .cluster_id = 9;
        let ops = plan(&state, &after);
        assert_eq!(kinds(&ops), ["backend+", "slot+"]);
        let [
            Op::BackendUpsert { id, backend },
            Op::SlotUpsert {
                backend_id,
                backend: copy,
                ..
            },
        ] = ops.as_slice()
        else {
            panic!("{ops:?}")
        };
        assert_eq!((id, backend), (backend_id, copy));
        assert_eq!(copy.info.cluster_id, 9);
        slot_copies(&ops, &after);
        apply_checked(&mut state, &after, &ops);
    }

    #[test]
    fn failover_switches_in_one_write() {
        // Affinity local: local backends, then the last one goes not ready -> remote ones.
        let build = |local_ready: bool| {
            let mut c = mesh(
                vec![
                    backend("10.1.0.5", NODE, local_ready, 8080),
                    backend("10.1.0.6", "node-b", local_ready, 8080),
                ],
                vec![
                    backend("10.2.0.5", "e1", true, 8080),
                    backend("10.2.0.6", "e1", true, 8080),
                    backend("10.2.0.7", "e1", true, 8080),
                ],
            );
            let svc = c
                .get_mut(&name("local"))
                .unwrap()
                .services
                .values_mut()
                .next()
                .unwrap();
            svc.affinity = Affinity::Local;
            desired_of(&c)
        };
        let before = build(true);
        let after = build(false);
        let mut state = DatapathState::default();
        apply_checked(
            &mut state,
            &before,
            &plan(&DatapathState::default(), &before),
        );

        let ops = plan(&state, &after);
        assert_eq!(kinds(&ops), ["backend+", "slot+", "master+", "backend-"]);
        let masters: Vec<&Op> = ops
            .iter()
            .filter(|op| matches!(op, Op::MasterUpsert { .. }))
            .collect();
        assert_eq!(
            masters,
            [&Op::MasterUpsert {
                service: frontend("10.96.0.10"),
                count: 3
            }]
        );
        apply_checked(&mut state, &after, &ops);

        // And back: shrink from 3 to 2 slots, slot 3 removed after the count.
        let ops = plan(&state, &before);
        assert_eq!(
            kinds(&ops),
            ["backend+", "slot+", "master+", "slot-", "backend-"]
        );
        apply_checked(&mut state, &before, &ops);
    }

    #[test]
    fn ids_are_stable_and_never_reused_while_referenced() {
        let d1 = desired_of(&mesh(
            vec![
                backend("10.1.0.5", NODE, true, 8080),
                backend("10.1.0.6", NODE, true, 8080),
                backend("10.1.0.7", NODE, true, 8080),
            ],
            vec![],
        ));
        let mut state = DatapathState::default();
        apply_checked(&mut state, &d1, &plan(&DatapathState::default(), &d1));
        let ids1 = BackendIds::assign(&state, &d1);
        assert_eq!(ids1.get(&tcp("10.1.0.6", 8080)), Some(2));

        // .5 goes, .8 comes: .6 and .7 keep 2 and 3; .8 must not take 1, which slot(s)
        // still point at until the delete is applied.
        let d2 = desired_of(&mesh(
            vec![
                backend("10.1.0.6", NODE, true, 8080),
                backend("10.1.0.7", NODE, true, 8080),
                backend("10.1.0.8", NODE, true, 8080),
            ],
            vec![],
        ));
        let ids2 = BackendIds::assign(&state, &d2);
        assert_eq!(ids2.get(&tcp("10.1.0.6", 8080)), Some(2));
        assert_eq!(ids2.get(&tcp("10.1.0.7", 8080)), Some(3));
        assert_eq!(ids2.get(&tcp("10.1.0.8", 8080)), Some(4));
        let ops = plan(&state, &d2);
        // Only the slot of the removed backend is rewritten.
        let slots: Vec<&Op> = ops
            .iter()
            .filter(|op| matches!(op, Op::SlotUpsert { .. }))
            .collect();
        assert_eq!(
            slots,
            [&Op::SlotUpsert {
                service: frontend("10.96.0.10"),
                slot: 1,
                backend_id: 4,
                backend: BackendEntry {
                    key: tcp("10.1.0.8", 8080),
                    info: d2.backends[&tcp("10.1.0.8", 8080)],
                },
            }]
        );
        apply_checked(&mut state, &d2, &ops);

        // Once 1 is gone from the maps it may be used again.
        let d3 = desired_of(&mesh(vec![backend("10.1.0.9", NODE, true, 8080)], vec![]));
        assert_eq!(
            BackendIds::assign(&state, &d3).get(&tcp("10.1.0.9", 8080)),
            Some(1)
        );
        // Recomputing the same state changes nothing.
        assert_eq!(BackendIds::assign(&state, &d2), ids2);
        assert!(plan(&state, &d2).is_empty());
    }

    #[test]
    fn removed_service_goes_master_first() {
        let d = desired_of(&mesh(vec![backend("10.1.0.5", NODE, true, 8080)], vec![]));
        let mut state = DatapathState::default();
        apply_checked(&mut state, &d, &plan(&DatapathState::default(), &d));
        let empty = DesiredState::default();
        let ops = plan(&state, &empty);
        assert_eq!(kinds(&ops), ["master-", "slot-", "backend-", "ipcache-"]);
        apply_checked(&mut state, &empty, &ops);
        assert_eq!(state, DatapathState::default());
    }

    #[test]
    fn repairs_maps_left_inconsistent() {
        // What a crash in the middle of an update can leave: slots beyond the count, a slot
        // pointing at a deleted backend, slots without a master, a backend twice.
        let d = desired_of(&mesh(
            vec![
                backend("10.1.0.5", NODE, true, 8080),
                backend("10.1.0.6", NODE, true, 8080),
            ],
            vec![],
        ));
        let be = |addr: &str| BackendEntry {
            key: tcp(addr, 8080),
            info: BackendInfo { cluster_id: 1 },
        };
        let mut state = DatapathState::default();
        state.backends.insert(3, be("10.1.0.5"));
        state.backends.insert(7, be("10.1.0.5"));
        state.backends.insert(9, be("10.1.0.99"));
        state.services.insert(
            frontend("10.96.0.10"),
            ServiceSlots {
                count: Some(1),
                slots: BTreeMap::from([(1, 42), (2, 7), (5, 3)]),
            },
        );
        state.services.insert(
            frontend("10.96.0.99"),
            ServiceSlots {
                count: None,
                slots: BTreeMap::from([(1, 9)]),
            },
        );
        let ops = plan(&state, &d);
        for op in &ops {
            state.apply(op);
        }
        assert_matches(&state, &d);
        assert!(plan(&state, &d).is_empty());
        // The lowest id of a duplicated backend is kept.
        assert!(state.backends.contains_key(&3) && !state.backends.contains_key(&7));
    }

    /// A tiny deterministic generator for the randomized tests below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_desired(rng: &mut Rng) -> DesiredState {
        let mut d = DesiredState::default();
        let pool: Vec<BackendKey> = (0..12)
            .map(|i| tcp(&format!("10.1.0.{i}"), 8000 + (i % 3) as u16))
            .collect();
        for b in &pool {
            if rng.below(3) > 0 {
                Arc::make_mut(&mut d.backends).insert(
                    *b,
                    BackendInfo {
                        cluster_id: 1 + rng.below(2) as u8,
                    },
                );
            }
        }
        let present: Vec<BackendKey> = d.backends.keys().copied().collect();
        for s in 0..rng.below(5) {
            let mut v: Vec<BackendKey> = present
                .iter()
                .filter(|_| rng.below(2) == 0)
                .copied()
                .collect();
            v.sort();
            Arc::make_mut(&mut d.services).insert(frontend(&format!("10.96.0.{s}")), v);
        }
        // Drop backends no service uses, as compute() never produces them.
        let used: BTreeSet<BackendKey> = d.services.values().flatten().copied().collect();
        Arc::make_mut(&mut d.backends).retain(|k, _| used.contains(k));
        for i in 0..rng.below(6) {
            d.ipcache.insert(
                IpNet::from(ip(&format!("10.1.1.{i}"))),
                IpcacheInfo {
                    identity: 256 + rng.below(3) as u32,
                    host_ip: None,
                    cluster_id: 1,
                    local_node: false,
                    remote_cluster: false,
                },
            );
        }
        d
    }

    #[test]
    fn random_sequences_stay_consistent() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut state = DatapathState::default();
            for _ in 0..8 {
                let d = random_desired(&mut rng);
                let ops = plan(&state, &d);
                apply_checked(&mut state, &d, &ops);
                // Another ipcache over the same services and backends: the services' part
                // of the plan is empty, so planning the ipcache alone (what the reconciler
                // does then) gives the whole plan.
                let mut next = random_desired(&mut rng);
                next.services = d.services.clone();
                next.backends = d.backends.clone();
                assert!(plan_services(&state, &next).is_empty());
                let (mut ipcache, deletes) = ipcache_ops(&state, &next, None);
                ipcache.extend(deletes);
                assert_eq!(ipcache, plan(&state, &next));
            }
        }
    }
}
