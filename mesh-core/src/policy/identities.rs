//! The identities policy is compiled against: endpoint identities of every cluster, the
//! reserved ones, CIDR identities the agent allocates for the prefixes policies name, and the
//! named container ports of each identity.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::{LABEL_CLUSTER, RESERVED_HOST, RESERVED_REMOTE_NODE, RESERVED_WORLD};
use crate::{IdentityId, IdentityLabels, Protocol};

use super::model::Selector;

/// Prefix of the identity labels that carry the labels of the endpoint's namespace:
/// `k8s:io.cilium.k8s.namespace.labels.<key>=<value>`. Whoever builds identities (the
/// apiserver) adds one per namespace label, including `kubernetes.io/metadata.name`, which
/// Kubernetes sets on every namespace, so NetworkPolicy namespaceSelectors match by name.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// First CIDR identity. Like Cilium's node-local identity scope (bit 24), it lies above every
/// cluster's range (`cluster_id << 16 | local` <= 0xFFFFFF), so CIDR identities never collide
/// with an endpoint identity of any cluster. They are local to one node's agent.
pub const CIDR_IDENTITY_BASE: u32 = 1 << 24;
/// Last CIDR identity.
pub const CIDR_IDENTITY_MAX: u32 = (1 << 25) - 1;
// The highest identity of any cluster is (255 << 16) | 65535.
const _: () = assert!(CIDR_IDENTITY_BASE > (255 << 16 | crate::identity::LOCAL_MAX));

/// A named container port of an identity (`containers[].ports[]` of its pods).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// What an identity stands for, as far as policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind<'a> {
    Host,
    World,
    RemoteNode,
    /// Another reserved identity (below 256): matched only by `all` and wildcards.
    OtherReserved,
    /// A CIDR identity: addresses whose longest policy prefix is this one.
    Cidr(IpNet),
    /// A pod identity of some cluster, with its labels.
    Endpoint(&'a IdentityLabels),
    /// An identity the table does not know: treated like an endpoint with no labels (matched
    /// only by wildcards and `all`).
    Unknown,
}

/// Identities of every cluster as the agent knows them, the CIDR identities it allocated, and
/// named ports. Reserved host (1), world (2) and remote-node (6) are always present.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityTable {
    endpoints: BTreeMap<IdentityId, IdentityLabels>,
    cidrs: BTreeMap<IdentityId, IpNet>,
    cidr_ids: BTreeMap<IpNet, IdentityId>,
    named_ports: BTreeMap<IdentityId, Vec<NamedPort>>,
}

// === impl IdentityTable ===

impl IdentityTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an endpoint identity (of any cluster).
    pub fn insert(&mut self, id: IdentityId, labels: IdentityLabels) {
        self.endpoints.insert(id, labels);
    }

    pub fn remove(&mut self, id: IdentityId) {
        self.endpoints.remove(&id);
        self.named_ports.remove(&id);
        if let Some(p) = self.cidrs.remove(&id) {
            self.cidr_ids.remove(&p);
        }
    }

    /// Records the CIDR identity the agent allocated for `prefix`.
    pub fn insert_cidr(&mut self, prefix: IpNet, id: IdentityId) {
        if let Some(old) = self.cidr_ids.insert(prefix, id) {
            self.cidrs.remove(&old);
        }
        self.cidrs.insert(id, prefix);
    }

    /// Sets the named container ports of an identity: the union over its pods. Named ports in
    /// rules resolve through this map only; a name no pod of the identity declares matches
    /// nothing.
    pub fn set_named_ports(&mut self, id: IdentityId, mut ports: Vec<NamedPort>) {
        ports.sort();
        ports.dedup();
        if ports.is_empty() {
            self.named_ports.remove(&id);
        } else {
            self.named_ports.insert(id, ports);
        }
    }

    pub fn named_ports(&self, id: IdentityId) -> &[NamedPort] {
        self.named_ports.get(&id).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn labels(&self, id: IdentityId) -> Option<&IdentityLabels> {
        self.endpoints.get(&id)
    }

    pub fn cidr_identity(&self, prefix: &IpNet) -> Option<IdentityId> {
        self.cidr_ids.get(prefix).copied()
    }

    pub fn kind(&self, id: IdentityId) -> IdentityKind<'_> {
        match id.0 {
            RESERVED_HOST => IdentityKind::Host,
            RESERVED_WORLD => IdentityKind::World,
            RESERVED_REMOTE_NODE => IdentityKind::RemoteNode,
            n if n < crate::identity::LOCAL_MIN => IdentityKind::OtherReserved,
            _ => {
                if let Some(p) = self.cidrs.get(&id) {
                    IdentityKind::Cidr(*p)
                } else if let Some(l) = self.endpoints.get(&id) {
                    IdentityKind::Endpoint(l)
                } else {
                    IdentityKind::Unknown
                }
            }
        }
    }

    /// The cluster label of an endpoint identity.
    pub fn cluster_of(&self, id: IdentityId) -> Option<&str> {
        self.endpoints.get(&id)?.get(LABEL_CLUSTER)
    }

    /// Endpoint identities, sorted.
    pub fn endpoints(&self) -> impl Iterator<Item = (IdentityId, &IdentityLabels)> {
        self.endpoints.iter().map(|(id, l)| (*id, l))
    }

    /// CIDR identities, sorted by identity.
    pub fn cidrs(&self) -> impl Iterator<Item = (IdentityId, IpNet)> + '_ {
        self.cidrs.iter().map(|(id, p)| (*id, *p))
    }

    /// Every identity a flow can carry: reserved host, world, remote-node, then endpoints and
    /// CIDR identities, sorted.
    pub fn all_ids(&self) -> Vec<IdentityId> {
        let mut ids: Vec<IdentityId> = [RESERVED_HOST, RESERVED_WORLD, RESERVED_REMOTE_NODE]
            .into_iter()
            .map(IdentityId)
            .chain(self.endpoints.keys().copied())
            .chain(self.cidrs.keys().copied())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The endpoint identities `selector` matches, in every cluster (what `meshctl policy
    /// list` shows beside a selector).
    pub fn matching(&self, selector: &Selector) -> Vec<IdentityId> {
        self.endpoints
            .iter()
            .filter(|(_, l)| selector.matches_with(|k| l.get(k)))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Allocates CIDR identities for the prefixes policies name, keeping every prefix's identity
/// stable while it stays in use (so ipcache entries are not rewritten on each compile). Pure:
/// the agent owns one, feeds it `PolicySet::cidr_prefixes`, writes the returned changes to
/// the ipcache (an LPM entry `prefix -> identity`, never overriding an endpoint's own /32)
/// and mirrors them into its `IdentityTable` with `apply_to`.
#[derive(Debug, Clone, Default)]
pub struct CidrIdentities {
    by_prefix: BTreeMap<IpNet, IdentityId>,
    free: Vec<u32>,
    next: u32,
}

/// What a `CidrIdentities::sync` changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CidrChanges {
    pub added: Vec<(IpNet, IdentityId)>,
    pub removed: Vec<(IpNet, IdentityId)>,
}

/// No CIDR identity is left (more than 2^24 prefixes at once).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no CIDR identity left for prefix {prefix}: {in_use} prefixes already hold one")]
pub struct CidrIdentitiesExhausted {
    pub prefix: IpNet,
    pub in_use: usize,
}

// === impl CidrIdentities ===

impl CidrIdentities {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the allocated set exactly `prefixes`: new prefixes get an identity, prefixes no
    /// longer named release theirs (reused later, after every current one).
    pub fn sync(
        &mut self,
        prefixes: &BTreeSet<IpNet>,
    ) -> Result<CidrChanges, CidrIdentitiesExhausted> {
        let mut changes = CidrChanges::default();
        let gone: Vec<IpNet> = self
            .by_prefix
            .keys()
            .filter(|p| !prefixes.contains(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(id) = self.by_prefix.remove(&p) {
                changes.removed.push((p, id));
            }
        }
        for p in prefixes {
            if self.by_prefix.contains_key(p) {
                continue;
            }
            let n = if self.next <= CIDR_IDENTITY_MAX - CIDR_IDENTITY_BASE {
                self.next += 1;
                CIDR_IDENTITY_BASE + self.next - 1
            } else if let Some(n) = self.free.pop() {
                n
            } else {
                return Err(CidrIdentitiesExhausted {
                    prefix: *p,
                    in_use: self.by_prefix.len(),
                });
            };
            self.by_prefix.insert(*p, IdentityId(n));
            changes.added.push((*p, IdentityId(n)));
        }
        // Released numbers are reused only once fresh ones run out, so an identity a packet
        // in flight still carries is not given to another prefix right away.
        self.free.extend(changes.removed.iter().map(|(_, id)| id.0));
        Ok(changes)
    }

    pub fn get(&self, prefix: &IpNet) -> Option<IdentityId> {
        self.by_prefix.get(prefix).copied()
    }

    /// Mirrors changes into an identity table.
    pub fn apply_to(changes: &CidrChanges, table: &mut IdentityTable) {
        for (_, id) in &changes.removed {
            table.remove(*id);
        }
        for (p, id) in &changes.added {
            table.insert_cidr(*p, *id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_identities_are_stable_and_outside_cluster_ranges() {
        let p = |s: &str| s.parse::<IpNet>().unwrap();
        let mut alloc = CidrIdentities::new();
        let mut table = IdentityTable::new();
        let first = alloc
            .sync(&[p("10.0.0.0/8"), p("10.1.0.0/16")].into())
            .unwrap();
        CidrIdentities::apply_to(&first, &mut table);
        assert_eq!(first.added.len(), 2);
        let id8 = alloc.get(&p("10.0.0.0/8")).unwrap();
        assert!((CIDR_IDENTITY_BASE..=CIDR_IDENTITY_MAX).contains(&id8.0));
        let second = alloc
            .sync(&[p("10.0.0.0/8"), p("192.168.0.0/16")].into())
            .unwrap();
        CidrIdentities::apply_to(&second, &mut table);
        assert_eq!(
            alloc.get(&p("10.0.0.0/8")),
            Some(id8),
            "kept prefix keeps its id"
        );
        assert_eq!(second.removed.len(), 1);
        assert_eq!(second.added.len(), 1);
        assert_ne!(second.added[0].1, second.removed[0].1, "fresh ids first");
        assert_eq!(table.kind(id8), IdentityKind::Cidr(p("10.0.0.0/8")));
        assert_eq!(table.cidr_identity(&p("10.1.0.0/16")), None);
    }
}
