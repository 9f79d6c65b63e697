//! What an agent knows about every cluster, fed by the watch of its local apiserver; in
//! mesh-proto (not the agent) so `meshctl service explain` runs the very same code on the
//! same watch stream: the agent's validation, its sync gate and the `MeshView` the node plan
//! takes.
//!
//! One writer ([`MeshState::apply`]), synchronous. Values arrive as wire values and are
//! converted to mesh-core types here; a value that does not convert (or whose name does not
//! match its key) is logged with its key, counted, and skipped: the last good value of that
//! key, if any, stays. A cluster is *synced* once every kind of it has its `Synced` marker
//! (for the local cluster that includes its network policies, which peers never serve);
//! which clusters are programmed is mesh-core's sync gate over these facts (see
//! [`MeshState::programmable`]).
//!
//! Network policies are kept for the local cluster only, parsed with mesh-core's
//! `parse_policy` from the object JSON the publisher validated with the same function.

use std::borrow::Borrow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;

use mesh_core::model::Identity;
use mesh_core::policy::{
    CidrIdentities, CidrIdentitiesExhausted, CompiledPolicy, IdentityTable, NamedPort, PolicyRef,
    PolicySet, compile,
};
use mesh_core::select::{GateInput, MeshView, Services, SyncGate, Waiting, sync_gate};
use mesh_core::{ClusterConfig, ClusterName, Endpoint, IdentityId, Node};

use crate::client::WatchUpdate;
use crate::convert::WatchedObject;
use crate::keys::parse_policy_name;
use crate::pb::{self, Kind};
use tracing::{debug, info, warn};

/// The kinds every cluster serves (to peers too); a remote cluster is synced when all of
/// them are.
pub const KINDS: [Kind; 5] = crate::keys::ALL_KINDS;

/// The kinds of the local cluster: [`KINDS`] and its policies. The local cluster is synced
/// when all of them are, so an agent never programs before it knows the policies (a node
/// that programmed services first would open a window where policy is not enforced).
pub const LOCAL_KINDS: [Kind; 6] = crate::keys::PUBLISHED_KINDS;

/// Why a watched value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectError {
    #[error("{key}: invalid value: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{key}: the object names {inner:?}, not its key")]
    NameMismatch { key: String, inner: String },
    #[error("{key}: the object belongs to cluster {inner}")]
    ClusterMismatch { key: String, inner: String },
    #[error("{key}: unparsable name of a {kind:?} delete")]
    BadName { key: String, kind: Kind },
    #[error("{key}: a policy of another cluster (policies are never served to peers)")]
    ForeignPolicy { key: String },
}

/// One cluster as the agent holds it.
#[derive(Debug, Clone, Default)]
pub struct ClusterData {
    pub state: ClusterState,
    pub identities: BTreeMap<u32, Identity>,
    /// Kinds whose `Synced` marker arrived.
    pub synced_kinds: BTreeSet<i32>,
    /// Set once every kind was synced; stays set across reconnects and resets (the watch
    /// client keeps the state consistent through them).
    pub ever_synced: bool,
    /// What changed in the cluster, as generations: a reader that derives something from
    /// one part (the agent's per-cluster ipcache, flow context, policy inputs) keeps the
    /// generation it derived it at and recomputes only when that part's generation moved.
    pub generations: Generations,
}

/// Per-part change counters of one cluster. Every value is drawn from one counter of the
/// [`MeshState`], so a part's generation never repeats, not even across a cluster that is
/// removed and seen again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Generations {
    /// Anything of the cluster.
    pub any: u64,
    /// What its ipcache entries derive from: config, nodes, endpoints.
    pub addresses: u64,
    /// Its identities.
    pub identities: u64,
    /// Its global services.
    pub services: u64,
    /// Its policies (the local cluster's).
    pub policies: u64,
    /// The inputs of policy compilation that are not identities or policies: endpoints
    /// that declare named container ports (before or after the change).
    pub named_ports: u64,
    /// Its config or staleness (`stale_since` of the cluster).
    pub config: u64,
}

// === impl ClusterData ===

impl ClusterData {
    /// The cluster's fact for the [sync gate](MeshState::sync_gate): synced at least once.
    fn gate_fact(&self) -> bool {
        self.ever_synced
    }

    /// Whether every kind of the cluster has its marker: [`LOCAL_KINDS`] for the local
    /// cluster, [`KINDS`] for the others.
    pub fn synced(&self, local: bool) -> bool {
        let kinds: &[Kind] = if local { &LOCAL_KINDS } else { &KINDS };
        kinds
            .iter()
            .all(|k| self.synced_kinds.contains(&(*k as i32)))
    }
}

/// The part of a cluster an update changed (see [`Generations`]).
#[derive(Debug, Clone, Copy)]
enum Part {
    Config,
    /// The cluster's staleness (`clusters/<c>/link`).
    Link,
    Addresses,
    /// An endpoint; `named`: it declares named ports (before or after the change).
    Endpoint {
        named: bool,
    },
    Services,
    Identities,
    Policies,
}

// === impl Generations ===

impl Generations {
    fn bump(&mut self, part: Part, generation: u64) {
        self.any = generation;
        match part {
            // The config holds the cluster id, which every ipcache entry carries.
            Part::Config => {
                self.config = generation;
                self.addresses = generation;
            }
            Part::Link => self.config = generation,
            Part::Addresses => self.addresses = generation,
            Part::Endpoint { named } => {
                self.addresses = generation;
                if named {
                    self.named_ports = generation;
                }
            }
            Part::Services => self.services = generation,
            Part::Identities => self.identities = generation,
            Part::Policies => self.policies = generation,
        }
    }
}

/// What an update did to the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The state changed: the desired datapath must be recomputed.
    Changed,
    /// A cluster became synced for the first time (also a change).
    ClusterSynced(ClusterName),
    Unchanged,
    Rejected {
        kind: Kind,
        error: RejectError,
    },
}

/// Every cluster's state.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    clusters: BTreeMap<ClusterName, ClusterData>,
    /// The reader's own cluster: its policies are kept and required for its sync. `None`
    /// (`Default`): a reader of services only, for which no cluster needs policies and every
    /// policy is rejected.
    local: Option<ClusterName>,
    /// The last generation handed out (see [`Generations`]).
    generation: u64,
}

// === impl MeshState ===

impl MeshState {
    /// The state of a reader (agent, meshctl) of `local`'s apiserver.
    pub fn new(local: ClusterName) -> Self {
        Self {
            clusters: BTreeMap::new(),
            local: Some(local),
            generation: 0,
        }
    }

    pub fn local_cluster(&self) -> Option<&ClusterName> {
        self.local.as_ref()
    }

    /// The local cluster's policies (empty before any arrived, or without a local cluster).
    pub fn policies(&self) -> Option<&PolicySet> {
        let local = self.local.as_ref()?;
        self.clusters.get(local).map(|c| &c.state.policies)
    }

    pub fn clusters(&self) -> &BTreeMap<ClusterName, ClusterData> {
        &self.clusters
    }

    pub fn cluster(&self, name: &ClusterName) -> Option<&ClusterData> {
        self.clusters.get(name)
    }

    /// mesh-core's [`sync_gate`] over every cluster seen (synced at least once or not).
    pub fn sync_gate(&self, input: &GateInput<'_>) -> SyncGate {
        sync_gate(input, self.clusters.iter().map(|(n, c)| (n, c.gate_fact())))
    }

    /// Whether the [sync gate](Self::sync_gate), once open, programs `cluster`'s objects:
    /// false for a cluster that has never synced (one not seen yet included), so a change
    /// to its objects changes nothing programmed (the agent skips the reconcile: a peer's
    /// first snapshot is 100k objects arriving over a few seconds).
    pub fn gate_programs(&self, cluster: &ClusterName) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(ClusterData::gate_fact)
    }

    /// The clusters to program (borrowed, not copied), or why nothing is programmed yet:
    /// the [sync gate](Self::sync_gate)'s decision.
    pub fn programmable(
        &self,
        input: &GateInput<'_>,
    ) -> Result<BTreeMap<ClusterName, &ClusterState>, Waiting> {
        match self.sync_gate(input) {
            SyncGate::Wait(waiting) => Err(waiting),
            SyncGate::Program { clusters, .. } => Ok(clusters
                .into_iter()
                .filter_map(|n| {
                    let state = &self.clusters.get(&n)?.state;
                    Some((n, state))
                })
                .collect()),
        }
    }

    /// Whether every kind of `cluster` has its marker now (policies included for the local
    /// cluster).
    pub fn is_synced(&self, cluster: &ClusterName) -> bool {
        self.clusters
            .get(cluster)
            .is_some_and(|c| c.synced(self.local.as_ref() == Some(cluster)))
    }

    /// Every cluster seen, with whether it is synced now ([`Self::is_synced`]), in name
    /// order, without looking each one up again.
    pub fn sync_states(&self) -> impl Iterator<Item = (&ClusterName, &ClusterData, bool)> {
        self.clusters
            .iter()
            .map(|(n, c)| (n, c, c.synced(self.local.as_ref() == Some(n))))
    }

    /// Whether every cluster seen so far has been synced at least once.
    pub fn all_synced(&self) -> bool {
        self.clusters.values().all(|c| c.ever_synced)
    }

    pub fn apply(&mut self, update: WatchUpdate) -> Applied {
        match update {
            WatchUpdate::Upsert {
                cluster,
                kind,
                name,
                value,
                ..
            } => match self.upsert(&cluster, kind, &name, value) {
                Ok(changed) => {
                    debug!(%cluster, kind = kind_name(kind), %name, changed, "upsert");
                    if changed {
                        Applied::Changed
                    } else {
                        Applied::Unchanged
                    }
                }
                Err(error) => {
                    warn!(%error, "skipping an object the agent cannot use");
                    Applied::Rejected { kind, error }
                }
            },
            WatchUpdate::Delete {
                cluster,
                kind,
                name,
                ..
            } => match self.delete(&cluster, kind, &name) {
                Ok(true) => {
                    debug!(%cluster, kind = kind_name(kind), %name, "delete");
                    Applied::Changed
                }
                Ok(false) => Applied::Unchanged,
                Err(error) => {
                    warn!(%error, "skipping a delete the agent cannot use");
                    Applied::Rejected { kind, error }
                }
            },
            WatchUpdate::Synced { cluster, kind } => {
                let local = self.local.as_ref() == Some(&cluster);
                let data = self.clusters.entry(cluster.clone()).or_default();
                data.synced_kinds.insert(kind as i32);
                if !data.ever_synced && data.synced(local) {
                    data.ever_synced = true;
                    info!(%cluster, nodes = data.state.nodes.len(),
                        endpoints = data.state.endpoints.len(),
                        services = data.state.services.len(),
                        policies = data.state.policies.len(), "cluster synced");
                    Applied::ClusterSynced(cluster)
                } else {
                    Applied::Unchanged
                }
            }
            WatchUpdate::Connected { .. }
            | WatchUpdate::Disconnected { .. }
            | WatchUpdate::Reset { .. } => Applied::Unchanged,
        }
    }

    fn upsert(
        &mut self,
        cluster: &ClusterName,
        kind: Kind,
        name: &str,
        value: pb::event::Value,
    ) -> Result<bool, RejectError> {
        // The key is only formatted for an error (the hot path never allocates it).
        let key = || key_of(cluster, kind, name);
        if kind == Kind::Policy && self.local.as_ref() != Some(cluster) {
            return Err(RejectError::ForeignPolicy { key: key() });
        }
        let object = WatchedObject::try_from(value).map_err(|e| RejectError::Invalid {
            key: key(),
            reason: e.to_string(),
        })?;
        if object.kind() != kind {
            return Err(RejectError::Invalid {
                key: key(),
                reason: format!("a {:?} value under a {kind:?} key", object.kind()),
            });
        }
        if !name_matches(&object, name) {
            return Err(RejectError::NameMismatch {
                key: key(),
                inner: object.name(),
            });
        }
        if let Some(inner) = object.cluster()
            && inner != cluster
        {
            return Err(RejectError::ClusterMismatch {
                key: key(),
                inner: inner.to_string(),
            });
        }
        let c = self.clusters.entry(cluster.clone()).or_default();
        let s = &mut c.state;
        let (changed, part) = match object {
            WatchedObject::Config(v) => (replace(&mut s.config, Some(v)), Part::Config),
            WatchedObject::Node(v) => (insert(&mut s.nodes, v.name.clone(), v), Part::Addresses),
            WatchedObject::Endpoint(v) => {
                let named = !v.named_ports.is_empty();
                let ip = v.ip;
                match s.endpoints.entry(ip) {
                    Entry::Occupied(o) if *o.get() == v => (false, Part::Addresses),
                    Entry::Occupied(mut o) => {
                        let was_named = !o.get().named_ports.is_empty();
                        o.insert(v);
                        (
                            true,
                            Part::Endpoint {
                                named: named || was_named,
                            },
                        )
                    }
                    Entry::Vacant(e) => {
                        e.insert(v);
                        (true, Part::Endpoint { named })
                    }
                }
            }
            WatchedObject::Service(v) => (
                insert(&mut s.services, (v.namespace.clone(), v.name.clone()), v),
                Part::Services,
            ),
            WatchedObject::Identity(v) => (insert(&mut c.identities, v.id.0, v), Part::Identities),
            WatchedObject::Link(l) => {
                (replace(&mut s.stale_since, Some(l.stale_since)), Part::Link)
            }
            WatchedObject::Policy(p) => {
                if s.policies.get(&p.policy.reference) == Some(&p.policy) {
                    (false, Part::Policies)
                } else {
                    s.policies.upsert(p.policy);
                    (true, Part::Policies)
                }
            }
        };
        if changed {
            self.generation += 1;
            c.generations.bump(part, self.generation);
        }
        Ok(changed)
    }

    fn delete(
        &mut self,
        cluster: &ClusterName,
        kind: Kind,
        name: &str,
    ) -> Result<bool, RejectError> {
        let bad = || RejectError::BadName {
            key: key_of(cluster, kind, name),
            kind,
        };
        let Some(c) = self.clusters.get_mut(cluster) else {
            return Ok(false);
        };
        let s = &mut c.state;
        let (changed, part) = match kind {
            Kind::Config => (s.config.take().is_some(), Part::Config),
            Kind::Link => (s.stale_since.take().is_some(), Part::Link),
            Kind::Node => (s.nodes.remove(name).is_some(), Part::Addresses),
            Kind::Endpoint => {
                let ip: IpAddr = name.parse().map_err(|_| bad())?;
                match s.endpoints.remove(&ip) {
                    Some(old) => (
                        true,
                        Part::Endpoint {
                            named: !old.named_ports.is_empty(),
                        },
                    ),
                    None => (false, Part::Addresses),
                }
            }
            Kind::Service => {
                let (ns, n) = name.split_once('/').ok_or_else(bad)?;
                (
                    s.services.remove(&(ns.to_owned(), n.to_owned())).is_some(),
                    Part::Services,
                )
            }
            Kind::Identity => {
                let id: u32 = name.parse().map_err(|_| bad())?;
                (c.identities.remove(&id).is_some(), Part::Identities)
            }
            Kind::Policy => {
                let (kind, namespace, name) = parse_policy_name(name).ok_or_else(bad)?;
                let removed = s
                    .policies
                    .remove(&PolicyRef {
                        kind,
                        cluster: cluster.clone(),
                        namespace: namespace.map(str::to_owned),
                        name: name.to_owned(),
                    })
                    .is_some();
                (removed, Part::Policies)
            }
            Kind::Unspecified => return Err(bad()),
        };
        if changed {
            self.generation += 1;
            c.generations.bump(part, self.generation);
        }
        Ok(changed)
    }
}

/// The inputs and output of policy compilation for the local cluster.
#[derive(Debug, Clone)]
pub struct PolicyView {
    /// Endpoint identities of the clusters compiled against, and the CIDR identities.
    pub identities: IdentityTable,
    pub compiled: CompiledPolicy,
}

// === policy ===

impl MeshState {
    /// Compiles the local cluster's policies against the identities of `clusters` (the ones
    /// the sync gate lets in) and CIDR identities for every prefix the policies name
    /// (`cidr` is synced to them: the agent keeps one allocator across compiles, meshctl a
    /// fresh one; verdicts do not depend on the numbers). Named ports resolve against the
    /// union of the named container ports of each identity's endpoints (a name no pod of an
    /// identity declares matches nothing for it: fail closed). The one path from the watched
    /// state to `mesh_core::policy::compile`: the agent programs its result, `meshctl policy
    /// list|check` print it. `None` without a local cluster.
    pub fn compile_policy<'a>(
        &self,
        clusters: impl IntoIterator<Item = &'a ClusterName>,
        cidr: &mut CidrIdentities,
    ) -> Option<Result<PolicyView, CidrIdentitiesExhausted>> {
        let local = self.local.as_ref()?;
        let empty = PolicySet::new();
        let policies = self.policies().unwrap_or(&empty);
        let mut identities = IdentityTable::new();
        // Named ports: the union of the named container ports of each identity's pods.
        let mut named: BTreeMap<IdentityId, Vec<NamedPort>> = BTreeMap::new();
        for name in clusters {
            if let Some(c) = self.clusters.get(name) {
                for identity in c.identities.values() {
                    identities.insert(identity.id, identity.labels.clone());
                }
                for ep in c.state.endpoints.values() {
                    if ep.named_ports.is_empty() {
                        continue;
                    }
                    named
                        .entry(ep.identity)
                        .or_default()
                        .extend(ep.named_ports.iter().map(|p| NamedPort {
                            name: p.name.clone(),
                            protocol: p.protocol,
                            port: p.port,
                        }));
                }
            }
        }
        for (id, ports) in named {
            identities.set_named_ports(id, ports);
        }
        let prefixes = policies.cidr_prefixes(local);
        if let Err(e) = cidr.sync(&prefixes) {
            return Some(Err(e));
        }
        // A fresh table: every allocated prefix, not only this sync's changes.
        for p in &prefixes {
            if let Some(id) = cidr.get(p) {
                identities.insert_cidr(*p, id);
            }
        }
        let compiled = compile(policies, &identities, local);
        Some(Ok(PolicyView {
            identities,
            compiled,
        }))
    }
}

/// `<cluster>/<kind>/<name>`, as errors name an object.
fn key_of(cluster: &ClusterName, kind: Kind, name: &str) -> String {
    format!("{cluster}/{}/{name}", kind_name(kind))
}

/// Whether the object's own name is `name` (its key's last segment), without formatting
/// the common cases: an IPv4 endpoint compares as an address (Rust's parser accepts only
/// the canonical dotted form, so this equals comparing `ip.to_string()`), a node by name.
fn name_matches(object: &WatchedObject, name: &str) -> bool {
    match object {
        WatchedObject::Endpoint(e) => match (e.ip, name.parse::<std::net::Ipv4Addr>()) {
            (IpAddr::V4(ip), Ok(n)) => ip == n,
            _ => object.name() == name,
        },
        WatchedObject::Node(n) => n.name == name,
        _ => object.name() == name,
    }
}

fn replace<T: PartialEq>(slot: &mut Option<T>, v: Option<T>) -> bool {
    if *slot == v {
        false
    } else {
        *slot = v;
        true
    }
}

/// Inserts or replaces; whether the map changed. One search of the map.
fn insert<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, k: K, v: V) -> bool {
    match map.entry(k) {
        Entry::Occupied(o) if *o.get() == v => false,
        Entry::Occupied(mut o) => {
            o.insert(v);
            true
        }
        Entry::Vacant(e) => {
            e.insert(v);
            true
        }
    }
}

/// The kind's key segment, for logs and metric labels.
pub fn kind_name(kind: Kind) -> &'static str {
    crate::keys::kind_segment(kind).unwrap_or("unspecified")
}

// === cluster state ===

/// What the agent knows about one cluster (its own or a remote one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// `None` until the cluster's config is known: its endpoints are then left out of the
    /// ipcache (their identities cannot be checked) and its backends carry cluster id 0.
    pub config: Option<ClusterConfig>,
    pub nodes: BTreeMap<String, Node>,
    pub endpoints: BTreeMap<IpAddr, Endpoint>,
    /// Global services by `(namespace, name)`.
    pub services: Services,
    /// Network policies (the local cluster's only: peers never serve theirs).
    pub policies: PolicySet,
    /// Since when the local apiserver's importer has lost this (remote) cluster: its data is
    /// the last known state, and selection demotes its backends (`clusters/<c>/link`).
    /// `None`: fresh.
    pub stale_since: Option<SystemTime>,
}

/// The view of the mesh that [`plan_node`] takes: the services of `clusters` (the ones the
/// sync gate lets in), which of them are stale (`ClusterState::stale_since`) and which of
/// their nodes are not reporting (`Node::stale_since`, marked by each cluster's publisher
/// and relayed by importers), each for how long as of now. The one path from the watched
/// state to the selection's staleness: the agent's `desired::compute` and
/// `meshctl service explain` both build their view with this function.
///
/// [`plan_node`]: mesh_core::select::plan_node
pub fn mesh_view<'a, S: Borrow<ClusterState>>(
    clusters: &'a BTreeMap<ClusterName, S>,
    local_cluster: &'a ClusterName,
) -> MeshView<'a> {
    mesh_view_at(clusters, local_cluster, SystemTime::now())
}

/// [`mesh_view`] as of `now` (a stale-since time after `now`, from another clock, counts as
/// stale for zero seconds: still stale).
pub fn mesh_view_at<'a, S: Borrow<ClusterState>>(
    clusters: &'a BTreeMap<ClusterName, S>,
    local_cluster: &'a ClusterName,
    now: SystemTime,
) -> MeshView<'a> {
    let stale_nodes = clusters.iter().flat_map(|(name, c)| {
        c.borrow()
            .nodes
            .values()
            .filter_map(move |n| Some((name, n.name.as_str(), n.stale_since?)))
    });
    mesh_view_with(clusters, local_cluster, now, stale_nodes)
}

/// The nodes of `cluster` marked not reporting, and since when: what [`mesh_view_at`] finds
/// by looking at every node. A reader that keeps this per cluster with the cluster's
/// `addresses` generation (the agent: 25k nodes under the scale profile, looked at on every
/// reconcile, were most of its cost) passes it to [`mesh_view_with`] instead.
pub fn stale_nodes(cluster: &ClusterState) -> Vec<(String, SystemTime)> {
    cluster
        .nodes
        .values()
        .filter_map(|n| Some((n.name.clone(), n.stale_since?)))
        .collect()
}

/// [`mesh_view_at`] with the stale nodes given, `(cluster, node, stale since)` (only those
/// of `clusters` are taken).
pub fn mesh_view_with<'a, S: Borrow<ClusterState>>(
    clusters: &'a BTreeMap<ClusterName, S>,
    local_cluster: &'a ClusterName,
    now: SystemTime,
    stale_nodes: impl IntoIterator<Item = (&'a ClusterName, &'a str, SystemTime)>,
) -> MeshView<'a> {
    MeshView {
        local_cluster,
        clusters: clusters
            .iter()
            .map(|(name, c)| (name, &c.borrow().services))
            .collect(),
        stale: clusters
            .iter()
            .filter(|(name, _)| *name != local_cluster)
            .filter_map(|(name, c)| {
                let since = c.borrow().stale_since?;
                Some((name, now.duration_since(since).unwrap_or_default()))
            })
            .collect(),
        stale_nodes: stale_nodes
            .into_iter()
            .filter(|(cluster, _, _)| clusters.contains_key(*cluster))
            .map(|(cluster, node, since)| {
                (
                    (cluster, node),
                    now.duration_since(since).unwrap_or_default(),
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn east() -> ClusterName {
        "east".parse().unwrap()
    }

    fn node(cluster: &str, name: &str) -> pb::event::Value {
        pb::event::Value::Node(pb::Node {
            cluster: cluster.into(),
            name: name.into(),
            internal_ips: vec!["192.168.0.2".into()],
            pod_cidrs: vec!["10.1.2.0/24".into()],
            ..Default::default()
        })
    }

    fn upsert(kind: Kind, name: &str, value: pb::event::Value) -> WatchUpdate {
        WatchUpdate::Upsert {
            cluster: east(),
            kind,
            name: name.into(),
            revision: 1,
            value,
        }
    }

    #[test]
    fn objects_are_converted_and_bad_ones_skipped() {
        let mut s = MeshState::default();
        assert_eq!(
            s.apply(upsert(Kind::Node, "n2", node("east", "n2"))),
            Applied::Changed
        );
        assert_eq!(
            s.apply(upsert(Kind::Node, "n2", node("east", "n2"))),
            Applied::Unchanged
        );
        // Wrong name, wrong cluster, garbage address: rejected, the good value stays.
        assert!(matches!(
            s.apply(upsert(Kind::Node, "n3", node("east", "n2"))),
            Applied::Rejected {
                error: RejectError::NameMismatch { .. },
                ..
            }
        ));
        assert!(matches!(
            s.apply(upsert(Kind::Node, "n2", node("west", "n2"))),
            Applied::Rejected {
                error: RejectError::ClusterMismatch { .. },
                ..
            }
        ));
        let mut bad = node("east", "n2");
        if let pb::event::Value::Node(n) = &mut bad {
            n.internal_ips = vec!["not-an-ip".into()];
        }
        let r = s.apply(upsert(Kind::Node, "n2", bad));
        let Applied::Rejected { error, kind } = r else {
            panic!("expected a rejection, got {r:?}")
        };
        assert_eq!(kind, Kind::Node);
        assert!(error.to_string().starts_with("east/nodes/n2"), "{error}");
        assert_eq!(s.cluster(&east()).unwrap().state.nodes.len(), 1);

        let del = WatchUpdate::Delete {
            cluster: east(),
            kind: Kind::Node,
            name: "n2".into(),
            revision: 2,
        };
        assert_eq!(s.apply(del.clone()), Applied::Changed);
        assert_eq!(s.apply(del), Applied::Unchanged);
    }

    #[test]
    fn a_cluster_is_programmable_once_every_kind_is_synced() {
        let mut s = MeshState::default();
        s.apply(upsert(Kind::Node, "n2", node("east", "n2")));
        // Seen from another cluster that is already programming (so the gate is open).
        let local = "west".parse().unwrap();
        let gate = GateInput {
            local_cluster: &local,
            deadline_passed: false,
            programming: true,
        };
        let programmable = |s: &MeshState| {
            s.programmable(&gate)
                .unwrap()
                .into_iter()
                .map(|(n, c)| (n, c.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        for (i, kind) in KINDS.iter().enumerate() {
            assert!(programmable(&s).is_empty());
            assert!(!s.all_synced());
            let r = s.apply(WatchUpdate::Synced {
                cluster: east(),
                kind: *kind,
            });
            if i + 1 == KINDS.len() {
                assert_eq!(r, Applied::ClusterSynced(east()));
            } else {
                assert_eq!(r, Applied::Unchanged);
            }
        }
        assert!(s.all_synced());
        assert_eq!(programmable(&s)[&east()].nodes.len(), 1);
        // A fresh agent of east waits for nothing more; one of west waits for west.
        assert!(
            s.programmable(&GateInput {
                local_cluster: &east(),
                deadline_passed: false,
                programming: false,
            })
            .is_ok()
        );
        assert_eq!(
            s.programmable(&GateInput {
                programming: false,
                ..gate
            })
            .unwrap_err(),
            Waiting::LocalCluster(local.clone())
        );
    }

    fn policy_value(
        cluster: &str,
        ns: &str,
        name: &str,
        object: serde_json::Value,
    ) -> pb::event::Value {
        pb::event::Value::Policy(pb::Policy {
            cluster: cluster.into(),
            kind: pb::PolicyKind::CiliumNetworkPolicy as i32,
            namespace: ns.into(),
            name: name.into(),
            object: object.to_string(),
        })
    }

    fn cnp(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"namespace": ns, "name": name},
            "spec": spec,
        })
    }

    #[test]
    fn local_policies_are_parsed_and_bad_or_foreign_ones_rejected() {
        let mut s = MeshState::new(east());
        let name = "ciliumnetworkpolicies/shop/allow-web";
        let spec = serde_json::json!({"endpointSelector": {"matchLabels": {"app": "web"}},
                                       "ingress": [{"fromEndpoints": [{}]}]});
        let good = policy_value("east", "shop", "allow-web", cnp("shop", "allow-web", spec));
        assert_eq!(
            s.apply(upsert(Kind::Policy, name, good.clone())),
            Applied::Changed
        );
        assert_eq!(
            s.apply(upsert(Kind::Policy, name, good)),
            Applied::Unchanged
        );
        let set = s.policies().unwrap();
        assert_eq!(set.len(), 1);
        let p = set.iter().next().unwrap();
        assert_eq!(p.reference.object(), "shop/allow-web");
        assert_eq!(p.reference.cluster, east());

        // Malformed: a port that is not one. Rejected; the good version stays.
        let bad = policy_value(
            "east",
            "shop",
            "allow-web",
            cnp(
                "shop",
                "allow-web",
                serde_json::json!({"endpointSelector": {},
                    "ingress": [{"toPorts": [{"ports": [{"port": "http x"}]}]}]}),
            ),
        );
        let r = s.apply(upsert(Kind::Policy, name, bad));
        let Applied::Rejected { error, .. } = r else {
            panic!("expected a rejection, got {r:?}")
        };
        assert!(
            error
                .to_string()
                .contains("spec.ingress[0].toPorts[0].ports[0].port"),
            "{error}"
        );
        // Fields that disagree with the object are rejected too.
        let renamed = policy_value(
            "east",
            "shop",
            "other",
            cnp("shop", "allow-web", serde_json::json!({})),
        );
        assert!(matches!(
            s.apply(upsert(
                Kind::Policy,
                "ciliumnetworkpolicies/shop/other",
                renamed
            )),
            Applied::Rejected { .. }
        ));
        assert_eq!(s.policies().unwrap().len(), 1);

        // Another cluster's policy: never served to peers, so never accepted.
        let foreign = WatchUpdate::Upsert {
            cluster: "west".parse().unwrap(),
            kind: Kind::Policy,
            name: name.into(),
            revision: 1,
            value: policy_value(
                "west",
                "shop",
                "allow-web",
                cnp("shop", "allow-web", serde_json::json!({})),
            ),
        };
        assert!(matches!(
            s.apply(foreign),
            Applied::Rejected {
                error: RejectError::ForeignPolicy { .. },
                ..
            }
        ));

        let del = WatchUpdate::Delete {
            cluster: east(),
            kind: Kind::Policy,
            name: name.into(),
            revision: 3,
        };
        assert_eq!(s.apply(del), Applied::Changed);
        assert!(s.policies().unwrap().is_empty());
    }

    /// Policy ports given by name resolve against the named container ports the endpoints
    /// carry: on ingress against the selected pod's, on egress against the peer's (issue
    /// #12). A name the pods of an identity do not declare matches nothing for it.
    #[test]
    fn named_ports_resolve_against_the_endpoints_container_ports() {
        use mesh_core::policy::{Direction, Verdict, decide};
        use mesh_core::{IdentityLabels, Protocol};
        let mut s = MeshState::new(east());
        let identity = |id: u32, app: &str| {
            let labels = IdentityLabels::for_pod_in_namespace(&east(), "shop", [], [("app", app)]);
            pb::event::Value::Identity(
                (&Identity {
                    id: IdentityId(id),
                    labels,
                })
                    .into(),
            )
        };
        let endpoint = |ip: &str, id: u32, ports: &[(&str, u16)]| {
            pb::event::Value::Endpoint(pb::Endpoint {
                ip: ip.into(),
                identity: id,
                pod: format!("pod-{ip}"),
                namespace: "shop".into(),
                named_ports: ports
                    .iter()
                    .map(|(name, port)| pb::ServicePort {
                        name: (*name).into(),
                        protocol: pb::Protocol::Tcp.into(),
                        port: u32::from(*port),
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let (web, web2, client) = (0x1_0100, 0x1_0101, 0x1_0102);
        s.apply(upsert(Kind::Identity, "65792", identity(web, "web")));
        s.apply(upsert(Kind::Identity, "65793", identity(web2, "web2")));
        s.apply(upsert(Kind::Identity, "65794", identity(client, "client")));
        s.apply(upsert(
            Kind::Endpoint,
            "10.1.0.1",
            endpoint("10.1.0.1", web, &[("http", 8080)]),
        ));
        // Two pods of one identity: the union of their names.
        s.apply(upsert(
            Kind::Endpoint,
            "10.1.0.2",
            endpoint("10.1.0.2", web2, &[("http", 9090)]),
        ));
        s.apply(upsert(
            Kind::Endpoint,
            "10.1.0.3",
            endpoint("10.1.0.3", web2, &[("admin", 9091)]),
        ));
        s.apply(upsert(
            Kind::Endpoint,
            "10.1.0.4",
            endpoint("10.1.0.4", client, &[]),
        ));
        let spec = serde_json::json!({
            "endpointSelector": {},
            "ingress": [{"toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}]}]}],
            "egress": [{"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "admin"}]}]}]});
        let name = "ciliumnetworkpolicies/shop/named";
        let v = policy_value("east", "shop", "named", cnp("shop", "named", spec));
        assert_eq!(s.apply(upsert(Kind::Policy, name, v)), Applied::Changed);
        let view = s
            .compile_policy([&east()], &mut CidrIdentities::new())
            .unwrap()
            .unwrap();
        let verdict = |local: u32, dir, remote: u32, port| {
            decide(
                &view.compiled,
                IdentityId(local),
                dir,
                IdentityId(remote),
                Protocol::Tcp,
                port,
            )
            .verdict
        };
        use Direction::{Egress, Ingress};
        // Ingress "http": each selected identity's own number.
        assert_eq!(verdict(web, Ingress, client, 8080), Verdict::Allow);
        assert_eq!(verdict(web, Ingress, client, 9090), Verdict::Deny);
        assert_eq!(verdict(web2, Ingress, client, 9090), Verdict::Allow);
        assert_eq!(verdict(web2, Ingress, client, 8080), Verdict::Deny);
        assert_eq!(
            verdict(client, Ingress, web, 8080),
            Verdict::Deny,
            "client names no http"
        );
        // Egress "admin": only to the identity that declares it, on its number.
        assert_eq!(verdict(client, Egress, web2, 9091), Verdict::Allow);
        assert_eq!(verdict(client, Egress, web, 9091), Verdict::Deny);
        assert_eq!(verdict(client, Egress, web2, 9090), Verdict::Deny);

        // Generations: an endpoint without named ports moves the addresses only, one with
        // them (before or after) the named ports too, an unchanged value nothing.
        let gens = |s: &MeshState| s.cluster(&east()).unwrap().generations;
        let g0 = gens(&s);
        let plain = endpoint("10.1.0.9", client, &[]);
        assert_eq!(
            s.apply(upsert(Kind::Endpoint, "10.1.0.9", plain.clone())),
            Applied::Changed
        );
        let g1 = gens(&s);
        assert!(g1.addresses > g0.addresses && g1.any == g1.addresses);
        assert_eq!(
            (g1.named_ports, g1.identities, g1.policies, g1.services),
            (g0.named_ports, g0.identities, g0.policies, g0.services)
        );
        assert_eq!(
            s.apply(upsert(Kind::Endpoint, "10.1.0.9", plain)),
            Applied::Unchanged
        );
        assert_eq!(gens(&s), g1);
        let named = endpoint("10.1.0.9", client, &[("http", 80)]);
        s.apply(upsert(Kind::Endpoint, "10.1.0.9", named));
        let g2 = gens(&s);
        assert!(g2.named_ports > g1.named_ports && g2.addresses == g2.named_ports);
        s.apply(WatchUpdate::Delete {
            cluster: east(),
            kind: Kind::Endpoint,
            name: "10.1.0.9".into(),
            revision: 0,
        });
        assert!(
            gens(&s).named_ports > g2.named_ports,
            "the deleted one had named ports"
        );
        s.apply(upsert(Kind::Identity, "65795", identity(0x1_0103, "other")));
        let g3 = gens(&s);
        assert!(g3.identities > g2.identities && g3.addresses < g3.identities);
    }

    #[test]
    fn a_link_record_makes_its_cluster_stale_in_the_view_until_deleted() {
        use std::time::{Duration, UNIX_EPOCH};
        let west: ClusterName = "west".parse().unwrap();
        let mut s = MeshState::new(west.clone());
        let since_ms = 1_700_000_000_000i64;
        let link = |cluster: &str| WatchUpdate::Upsert {
            cluster: east(),
            kind: Kind::Link,
            name: String::new(),
            revision: 1,
            value: pb::event::Value::Link(pb::PeerLink {
                cluster: cluster.into(),
                stale_since_unix_ms: since_ms,
            }),
        };
        assert_eq!(s.apply(link("east")), Applied::Changed);
        assert_eq!(s.apply(link("east")), Applied::Unchanged);
        // A record naming another cluster than its key is rejected.
        assert!(matches!(
            s.apply(link("west")),
            Applied::Rejected {
                error: RejectError::ClusterMismatch { .. },
                ..
            }
        ));
        let since = UNIX_EPOCH + Duration::from_millis(since_ms as u64);
        let mut clusters: BTreeMap<ClusterName, ClusterState> = s
            .clusters()
            .iter()
            .map(|(n, c)| (n.clone(), c.state.clone()))
            .collect();
        // The local cluster is never stale, even with a record.
        clusters.entry(west.clone()).or_default().stale_since = Some(since);
        let view = mesh_view_at(&clusters, &west, since + Duration::from_secs(12));
        assert_eq!(
            view.stale.into_iter().collect::<Vec<_>>(),
            [(&east(), Duration::from_secs(12))]
        );
        // A clock behind the record's: still stale, for zero seconds.
        let view = mesh_view_at(&clusters, &west, since - Duration::from_secs(1));
        assert_eq!(view.stale[&east()], Duration::ZERO);

        let del = WatchUpdate::Delete {
            cluster: east(),
            kind: Kind::Link,
            name: String::new(),
            revision: 2,
        };
        assert_eq!(s.apply(del), Applied::Changed);
        assert_eq!(s.cluster(&east()).unwrap().state.stale_since, None);
    }

    #[test]
    fn a_node_marked_stale_is_in_the_view_in_any_cluster() {
        use std::time::{Duration, UNIX_EPOCH};
        let west: ClusterName = "west".parse().unwrap();
        let mut s = MeshState::new(west.clone());
        let since_ms = 1_700_000_000_000i64;
        let node = |cluster: &str, name: &str, stale_since_unix_ms: i64| WatchUpdate::Upsert {
            cluster: cluster.parse().unwrap(),
            kind: Kind::Node,
            name: name.into(),
            revision: 1,
            value: pb::event::Value::Node(pb::Node {
                cluster: cluster.into(),
                name: name.into(),
                internal_ips: vec!["192.168.0.2".into()],
                stale_since_unix_ms,
                ..Default::default()
            }),
        };
        for u in [
            node("west", "w1", since_ms),
            node("west", "w2", 0),
            node("east", "e1", since_ms - 3_000),
        ] {
            assert_eq!(s.apply(u), Applied::Changed);
        }
        let clusters: BTreeMap<ClusterName, ClusterState> = s
            .clusters()
            .iter()
            .map(|(n, c)| (n.clone(), c.state.clone()))
            .collect();
        let now = UNIX_EPOCH + Duration::from_millis(since_ms as u64 + 12_000);
        let view = mesh_view_at(&clusters, &west, now);
        assert_eq!(
            view.stale_nodes
                .iter()
                .map(|((c, n), d)| (c.to_string(), n.to_string(), d.as_secs()))
                .collect::<Vec<_>>(),
            [
                ("east".into(), "e1".into(), 15),
                ("west".into(), "w1".into(), 12)
            ]
        );
        assert!(view.stale.is_empty());
        // The same view from the stale nodes kept per cluster (the agent's way).
        let kept: Vec<(ClusterName, Vec<(String, SystemTime)>)> = clusters
            .iter()
            .map(|(n, c)| (n.clone(), stale_nodes(c)))
            .collect();
        let from_kept = mesh_view_with(
            &clusters,
            &west,
            now,
            kept.iter()
                .flat_map(|(n, v)| v.iter().map(move |(node, t)| (n, node.as_str(), *t))),
        );
        assert_eq!(from_kept.stale_nodes, view.stale_nodes);
        assert_eq!(from_kept.stale, view.stale);
        // The marks are in the cluster's addresses generation: what the agent keys them by.
        let before = s.cluster(&west).unwrap().generations;
        // Reporting again: the publisher writes the node without the mark.
        assert_eq!(s.apply(node("west", "w1", 0)), Applied::Changed);
        let after = s.cluster(&west).unwrap().generations;
        assert!(after.addresses > before.addresses && after.any == after.addresses);
        assert_eq!(
            (after.identities, after.services, after.policies),
            (before.identities, before.services, before.policies)
        );
        assert_eq!(
            s.cluster(&west).unwrap().state.nodes["w1"].stale_since,
            None
        );
        // A negative time is a bad value, rejected like any other.
        assert!(matches!(
            s.apply(node("west", "w2", -5)),
            Applied::Rejected { .. }
        ));
    }

    #[test]
    fn the_local_cluster_waits_for_its_policies_and_remote_ones_do_not() {
        let mut s = MeshState::new(east());
        let west: ClusterName = "west".parse().unwrap();
        for cluster in [east(), west.clone()] {
            for kind in KINDS {
                s.apply(WatchUpdate::Synced {
                    cluster: cluster.clone(),
                    kind,
                });
            }
        }
        assert!(s.is_synced(&west), "a peer serves no policies");
        assert!(
            !s.is_synced(&east()),
            "the local cluster's policies are not synced yet"
        );
        let gate = GateInput {
            local_cluster: &east(),
            deadline_passed: false,
            programming: false,
        };
        assert_eq!(
            s.programmable(&gate).unwrap_err(),
            Waiting::LocalCluster(east())
        );
        assert_eq!(
            s.apply(WatchUpdate::Synced {
                cluster: east(),
                kind: Kind::Policy
            }),
            Applied::ClusterSynced(east())
        );
        assert_eq!(s.programmable(&gate).unwrap().len(), 2);
    }
}
