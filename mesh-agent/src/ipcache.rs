//! The desired ipcache, kept up to date cluster by cluster (issue 17: a change under the
//! scale profile's churn must not wait for a recompute of 250k entries). Pure: no aya, no IO.
//!
//! Each cluster's entries are computed on their own ([`cluster_ipcache`]: its node IPs by
//! node name, then its endpoints by IP; within the cluster the first entry of an IP wins) and
//! kept with the cluster's `addresses` generation (`mesh_proto::state::Generations`). The
//! ipcache is their merge: for each prefix the first cluster that has it in the order local
//! cluster, then the others by name, then the policy's CIDR identities; the others' entries
//! for it are dropped as duplicates. [`IpcacheBuilder::update`] recomputes only the clusters
//! whose generation moved, diffs each one's old and new entries, and resolves only the
//! prefixes that changed, so a pod replaced costs about one cluster's entries plus one
//! lookup per cluster, not the whole mesh. The result, and what it drops, equals a
//! recompute from nothing (property test below; [`crate::desired::compute_ipcache`] *is*
//! a builder's first update).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::ClusterName;
use mesh_core::identity::{RESERVED_HOST, RESERVED_REMOTE_NODE};

use crate::desired::{ClusterState, DropReason, Dropped, IpcacheInfo};

/// One cluster's ipcache entries (sorted by prefix, one per prefix) and the entries it
/// leaves out (its own duplicates, identities out of range, IPv6, config unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterIpcache {
    pub entries: Vec<(IpNet, IpcacheInfo)>,
    pub dropped: Vec<Dropped>,
    /// The address blocks ([`block`]) its entries fall in, sorted: a cluster's pods are in
    /// its pod CIDRs, so a handful per cluster.
    pub blocks: Vec<u32>,
}

impl ClusterIpcache {
    fn get(&self, prefix: &IpNet) -> Option<&IpcacheInfo> {
        self.entries
            .binary_search_by_key(prefix, |(p, _)| *p)
            .ok()
            .map(|i| &self.entries[i].1)
    }
}

/// The entries of cluster `name` (`is_local`: the node's own cluster, whose id is
/// `local_id`) for `node`: node IPs (nodes by name) before endpoints (by IP), the first
/// entry of an IP kept.
pub fn cluster_ipcache(
    name: &ClusterName,
    cluster: &ClusterState,
    is_local: bool,
    local_id: u8,
    node: &str,
) -> ClusterIpcache {
    let mut out = ClusterIpcache::default();
    let Some(config) = &cluster.config else {
        out.dropped = cluster
            .endpoints
            .keys()
            .map(|ip| Dropped {
                cluster: name.clone(),
                ip: *ip,
                reason: DropReason::ConfigUnknown,
            })
            .collect();
        return out;
    };
    let id = config.id.get();
    // (prefix, info, position): sorted stably by prefix, the first of each prefix kept.
    let mut candidates: Vec<(IpNet, IpcacheInfo)> =
        Vec::with_capacity(cluster.endpoints.len() + cluster.nodes.len());
    let mut push = |ip: IpAddr, info: IpcacheInfo, dropped: &mut Vec<Dropped>| {
        let ipv6 = match (ip, info.host_ip) {
            (IpAddr::V6(_), _) => Some(DropReason::Ipv6),
            (_, Some(host @ IpAddr::V6(_))) => Some(DropReason::Ipv6NodeIp(host)),
            _ => None,
        };
        match ipv6 {
            Some(reason) => dropped.push(Dropped {
                cluster: name.clone(),
                ip,
                reason,
            }),
            None => candidates.push((IpNet::from(ip), info)),
        }
    };
    for n in cluster.nodes.values() {
        let this_node = is_local && n.name == node;
        for &ip in &n.internal_ips {
            let info = IpcacheInfo {
                identity: if this_node {
                    RESERVED_HOST
                } else {
                    RESERVED_REMOTE_NODE
                },
                host_ip: None,
                cluster_id: id,
                local_node: this_node,
                remote_cluster: !is_local,
            };
            push(ip, info, &mut out.dropped);
        }
    }
    for ep in cluster.endpoints.values() {
        if let Err(e) = ep.identity.check_range(name, config.id) {
            out.dropped.push(Dropped {
                cluster: name.clone(),
                ip: ep.ip,
                reason: DropReason::IdentityOutOfRange(e),
            });
            continue;
        }
        let info = IpcacheInfo {
            identity: ep.identity.0,
            host_ip: ep.host_ip,
            cluster_id: id,
            local_node: is_local && ep.node == node,
            remote_cluster: id != local_id || !is_local,
        };
        push(ep.ip, info, &mut out.dropped);
    }
    // Stable: the entries of one prefix stay in the order they were considered (the
    // endpoints come sorted, so this is mostly a merge of the nodes' few entries).
    candidates.sort_by_key(|c| c.0);
    let mut entries: Vec<(IpNet, IpcacheInfo)> = Vec::with_capacity(candidates.len());
    for (prefix, info) in candidates {
        if entries.last().is_some_and(|(p, _)| *p == prefix) {
            out.dropped.push(Dropped {
                cluster: name.clone(),
                ip: prefix.addr(),
                reason: DropReason::DuplicateIp { kept: name.clone() },
            });
            continue;
        }
        entries.push((prefix, info));
    }
    out.blocks = entries.iter().filter_map(|(p, _)| block(p)).collect();
    out.blocks.dedup();
    out.entries = entries;
    out
}

/// The /16 an IPv4 prefix's address is in (cluster entries are IPv4 host addresses): the
/// key of [`IpcacheBuilder`]'s index from addresses to the clusters that may hold them.
fn block(prefix: &IpNet) -> Option<u32> {
    match prefix {
        IpNet::V4(n) => Some(u32::from(n.addr()) >> 16),
        IpNet::V6(_) => None,
    }
}

/// What an [`IpcacheBuilder::update`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpcacheChanges {
    /// Rebuilt from nothing: any entry may have changed.
    All,
    /// Exactly these prefixes were added, removed or changed.
    Prefixes(BTreeSet<IpNet>),
}

impl IpcacheChanges {
    /// Both changes together.
    pub fn merge(self, other: IpcacheChanges) -> IpcacheChanges {
        match (self, other) {
            (IpcacheChanges::Prefixes(mut a), IpcacheChanges::Prefixes(b)) => {
                a.extend(b);
                IpcacheChanges::Prefixes(a)
            }
            _ => IpcacheChanges::All,
        }
    }

    /// The prefixes, or `None` for [`IpcacheChanges::All`].
    pub fn prefixes(&self) -> Option<&BTreeSet<IpNet>> {
        match self {
            IpcacheChanges::All => None,
            IpcacheChanges::Prefixes(p) => Some(p),
        }
    }
}

/// The inputs every entry depends on: when one changes, everything is recomputed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Basis {
    local: ClusterName,
    node: String,
    local_id: u8,
}

/// The ipcache of a node, kept up to date from its clusters (see the module's text).
#[derive(Debug, Default)]
pub struct IpcacheBuilder {
    basis: Option<Basis>,
    /// Each cluster's entries, with the generation they were computed at (`None`: unknown,
    /// recomputed on every update).
    parts: BTreeMap<ClusterName, (Option<u64>, ClusterIpcache)>,
    /// The policy's CIDR identities: the last layer, under every cluster's entries.
    cidrs: BTreeMap<IpNet, u32>,
    /// The merged ipcache.
    merged: BTreeMap<IpNet, IpcacheInfo>,
    /// Address block -> the clusters with entries in it. Resolving a prefix looks only
    /// there: a lookup in each of 250 clusters' entries costs a few cache misses each,
    /// more than the rest of a reconcile under churn.
    blocks: HashMap<u32, Vec<ClusterName>>,
    /// Entries of other clusters (or CIDRs) left out for a prefix another cluster holds.
    duplicates: BTreeMap<IpNet, Vec<Dropped>>,
}

/// A changed prefix count above this share of the ipcache (1/`FULL_MERGE_SHARE`) merges
/// every cluster's entries again instead of resolving prefix by prefix.
const FULL_MERGE_SHARE: usize = 8;

// === impl IpcacheBuilder ===

impl IpcacheBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The merged ipcache.
    pub fn ipcache(&self) -> &BTreeMap<IpNet, IpcacheInfo> {
        &self.merged
    }

    /// The entries of cluster `name` (sorted by prefix; the local cluster's are all in the
    /// ipcache, the others' where no earlier cluster holds the prefix).
    pub fn cluster_entries(&self, name: &ClusterName) -> &[(IpNet, IpcacheInfo)] {
        self.parts
            .get(name)
            .map_or(&[][..], |(_, p)| p.entries.as_slice())
    }

    /// Takes the merged ipcache out (for a caller that owns its desired state for a while);
    /// [`Self::put_back`] must return it, unchanged, before the next update.
    pub fn take(&mut self) -> BTreeMap<IpNet, IpcacheInfo> {
        std::mem::take(&mut self.merged)
    }

    /// Returns the ipcache [`Self::take`] took.
    pub fn put_back(&mut self, merged: BTreeMap<IpNet, IpcacheInfo>) {
        self.merged = merged;
    }

    /// The entries left out, in cluster order (local first, then by name; CIDRs last), by
    /// IP within a cluster.
    pub fn dropped(&self) -> Vec<Dropped> {
        let local = self.basis.as_ref().map(|b| &b.local);
        let mut out: Vec<Dropped> = self
            .parts
            .values()
            .flat_map(|(_, p)| p.dropped.iter())
            .map(|d| self.with_owner(d))
            .chain(self.duplicates.values().flatten().cloned())
            .collect();
        // Stable: a cluster's own drops of one IP keep their order.
        out.sort_by(|a, b| {
            let key = |d: &Dropped| (Some(&d.cluster) != local, d.cluster.clone(), d.ip);
            key(a).cmp(&key(b))
        });
        out
    }

    /// A cluster's own duplicate names the entry that holds the IP in the ipcache: the
    /// cluster's own, or another cluster's that won over it.
    fn with_owner(&self, d: &Dropped) -> Dropped {
        let DropReason::DuplicateIp { .. } = d.reason else {
            return d.clone();
        };
        let lost_to = self
            .duplicates
            .get(&IpNet::from(d.ip))
            .and_then(|v| v.iter().find(|x| x.cluster == d.cluster));
        match lost_to {
            Some(x) => Dropped {
                reason: x.reason.clone(),
                ..d.clone()
            },
            None => d.clone(),
        }
    }

    /// Brings the ipcache to `clusters` for `node` of `local`: recomputes the clusters whose
    /// `generation` (the cluster's `addresses` generation; `None`: unknown, always
    /// recomputed) moved, and the prefixes whose entry may have changed.
    pub fn update<S: Borrow<ClusterState>>(
        &mut self,
        clusters: &BTreeMap<ClusterName, S>,
        generation: impl Fn(&ClusterName) -> Option<u64>,
        local: &ClusterName,
        node: &str,
    ) -> IpcacheChanges {
        let local_id = clusters
            .get(local)
            .and_then(|c| c.borrow().config.as_ref())
            .map_or(0, |c| c.id.get());
        let basis = Basis {
            local: local.clone(),
            node: node.to_owned(),
            local_id,
        };
        if self.basis.as_ref() != Some(&basis) {
            // Every entry depends on these: start again.
            self.basis = Some(basis);
            self.parts = clusters
                .iter()
                .map(|(name, c)| {
                    let part = cluster_ipcache(name, c.borrow(), name == local, local_id, node);
                    (name.clone(), (generation(name), part))
                })
                .collect();
            self.blocks.clear();
            for (name, (_, part)) in &self.parts {
                for b in &part.blocks {
                    self.blocks.entry(*b).or_default().push(name.clone());
                }
            }
            self.merge_all();
            return IpcacheChanges::All;
        }
        let mut changed: BTreeSet<IpNet> = BTreeSet::new();
        let gone: Vec<ClusterName> = self
            .parts
            .keys()
            .filter(|n| !clusters.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some((_, part)) = self.parts.remove(&name) {
                changed.extend(part.entries.iter().map(|(p, _)| *p));
                self.move_blocks(&name, &part.blocks, &[]);
            }
        }
        for (name, c) in clusters {
            let generation = generation(name);
            if let Some((have, _)) = self.parts.get(name)
                && have.is_some()
                && *have == generation
            {
                continue;
            }
            let part = cluster_ipcache(name, c.borrow(), name == local, local_id, node);
            let old = self.parts.insert(name.clone(), (generation, part));
            let new = &self.parts[name].1;
            let new_blocks = new.blocks.clone();
            let old_blocks = match old {
                Some((_, old)) => {
                    diff_entries(&old.entries, &new.entries, &mut changed);
                    old.blocks
                }
                None => {
                    changed.extend(new.entries.iter().map(|(p, _)| *p));
                    Vec::new()
                }
            };
            if old_blocks != new_blocks {
                self.move_blocks(name, &old_blocks, &new_blocks);
            }
        }
        self.resolve(changed)
    }

    /// Sets the policy's CIDR identities (the last layer: a prefix any cluster holds keeps
    /// the cluster's entry).
    pub fn set_cidrs(&mut self, cidrs: BTreeMap<IpNet, u32>) -> IpcacheChanges {
        if cidrs == self.cidrs {
            return IpcacheChanges::Prefixes(BTreeSet::new());
        }
        let mut changed = BTreeSet::new();
        for (p, id) in &self.cidrs {
            if cidrs.get(p) != Some(id) {
                changed.insert(*p);
            }
        }
        for (p, id) in &cidrs {
            if self.cidrs.get(p) != Some(id) {
                changed.insert(*p);
            }
        }
        self.cidrs = cidrs;
        if self.basis.is_none() {
            self.merge_all();
            return IpcacheChanges::All;
        }
        self.resolve(changed)
    }

    /// Re-resolves `changed` prefixes (or everything, when they are many); returns the
    /// prefixes whose merged entry changed.
    fn resolve(&mut self, changed: BTreeSet<IpNet>) -> IpcacheChanges {
        if changed.len() > self.merged.len() / FULL_MERGE_SHARE + 64 {
            self.merge_all();
            return IpcacheChanges::All;
        }
        let mut out = BTreeSet::new();
        for prefix in changed {
            let (entry, duplicates) = self.resolve_one(&prefix);
            let before = match entry {
                Some(info) => self.merged.insert(prefix, info),
                None => self.merged.remove(&prefix),
            };
            if before != entry {
                out.insert(prefix);
            }
            if duplicates.is_empty() {
                self.duplicates.remove(&prefix);
            } else {
                self.duplicates.insert(prefix, duplicates);
            }
        }
        IpcacheChanges::Prefixes(out)
    }

    /// The clusters in the order their entries win: the local one, then by name.
    fn order(&self) -> impl Iterator<Item = (&ClusterName, &ClusterIpcache)> {
        let local = self.basis.as_ref().map(|b| &b.local);
        let first = local.and_then(|l| self.parts.get_key_value(l));
        first
            .into_iter()
            .chain(self.parts.iter().filter(move |(n, _)| Some(*n) != local))
            .map(|(n, (_, p))| (n, p))
    }

    /// Updates the block index for `name`'s blocks going from `old` to `new`.
    fn move_blocks(&mut self, name: &ClusterName, old: &[u32], new: &[u32]) {
        for b in old.iter().filter(|b| !new.contains(b)) {
            if let Some(v) = self.blocks.get_mut(b) {
                v.retain(|n| n != name);
                if v.is_empty() {
                    self.blocks.remove(b);
                }
            }
        }
        for b in new.iter().filter(|b| !old.contains(b)) {
            self.blocks.entry(*b).or_default().push(name.clone());
        }
    }

    /// The entry of `prefix` and the entries left out for it.
    fn resolve_one(&self, prefix: &IpNet) -> (Option<IpcacheInfo>, Vec<Dropped>) {
        let mut kept: Option<(&ClusterName, IpcacheInfo)> = None;
        let mut duplicates = Vec::new();
        // Only the clusters with entries in the prefix's block, in winning order.
        let local = self.basis.as_ref().map(|b| &b.local);
        let mut holders: Vec<(&ClusterName, &ClusterIpcache)> = block(prefix)
            .and_then(|b| self.blocks.get(&b))
            .into_iter()
            .flatten()
            .filter_map(|n| self.parts.get_key_value(n).map(|(n, (_, p))| (n, p)))
            .collect();
        holders.sort_by_key(|(n, _)| (Some(*n) != local, *n));
        for (name, part) in holders {
            let Some(info) = part.get(prefix) else {
                continue;
            };
            match &kept {
                None => kept = Some((name, *info)),
                Some((owner, _)) => duplicates.push(Dropped {
                    cluster: name.clone(),
                    ip: prefix.addr(),
                    reason: DropReason::DuplicateIp {
                        kept: (*owner).clone(),
                    },
                }),
            }
        }
        match kept {
            Some((_, info)) => (Some(info), duplicates),
            None => (self.cidrs.get(prefix).map(|id| cidr_info(*id)), duplicates),
        }
    }

    /// Merges every cluster's entries (and the CIDRs) from nothing: all candidates in one
    /// vector in winning order, sorted stably by prefix (a merge of sorted runs), the first
    /// of each prefix kept, the map built from the sorted entries at once.
    fn merge_all(&mut self) {
        let order: Vec<(&ClusterName, &ClusterIpcache)> = self.order().collect();
        let capacity = order.iter().map(|(_, p)| p.entries.len()).sum::<usize>();
        // (prefix, info, index of the cluster in `order`; CIDRs: usize::MAX).
        let mut candidates: Vec<(IpNet, IpcacheInfo, usize)> = Vec::with_capacity(capacity);
        for (index, (_, part)) in order.iter().enumerate() {
            candidates.extend(part.entries.iter().map(|(p, i)| (*p, *i, index)));
        }
        let sorted_already = order.len() <= 1;
        candidates.extend(
            self.cidrs
                .iter()
                .map(|(p, id)| (*p, cidr_info(*id), usize::MAX)),
        );
        if !(sorted_already && self.cidrs.is_empty()) {
            candidates.sort_by_key(|c| c.0);
        }
        let mut duplicates: BTreeMap<IpNet, Vec<Dropped>> = BTreeMap::new();
        let mut kept: Option<(IpNet, usize)> = None;
        let merged = candidates
            .into_iter()
            .filter_map(|(prefix, info, index)| {
                if let Some((prev, owner)) = kept
                    && prev == prefix
                {
                    // A CIDR under a cluster's entry is not an entry left out.
                    if index != usize::MAX {
                        duplicates.entry(prefix).or_default().push(Dropped {
                            cluster: order[index].0.clone(),
                            ip: prefix.addr(),
                            reason: DropReason::DuplicateIp {
                                kept: order[owner].0.clone(),
                            },
                        });
                    }
                    return None;
                }
                kept = Some((prefix, index));
                Some((prefix, info))
            })
            .collect();
        self.merged = merged;
        self.duplicates = duplicates;
    }
}

/// The entry of a policy CIDR identity.
fn cidr_info(identity: u32) -> IpcacheInfo {
    IpcacheInfo {
        identity,
        host_ip: None,
        cluster_id: 0,
        local_node: false,
        remote_cluster: false,
    }
}

/// Adds to `changed` every prefix whose entry differs between two sorted entry lists.
fn diff_entries(
    old: &[(IpNet, IpcacheInfo)],
    new: &[(IpNet, IpcacheInfo)],
    changed: &mut BTreeSet<IpNet>,
) {
    let mut o = old.iter().peekable();
    for (prefix, info) in new {
        while let Some((gone, _)) = o.next_if(|(p, _)| p < prefix) {
            changed.insert(*gone);
        }
        match o.next_if(|(p, _)| p == prefix) {
            Some((_, have)) if have == info => {}
            _ => {
                changed.insert(*prefix);
            }
        }
    }
    changed.extend(o.map(|(p, _)| *p));
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use mesh_core::{ClusterConfig, ClusterId, Endpoint, IdentityId, Node};

    use super::*;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    /// The ipcache as DESIGN.md states it, computed the plain way: clusters in the order
    /// local, then by name, then the CIDRs; in each cluster its nodes' IPs (nodes by name)
    /// then its endpoints (by IP); the first entry of an IP kept. The oracle of the
    /// builder's incremental updates.
    fn reference(
        clusters: &BTreeMap<ClusterName, ClusterState>,
        cidrs: &BTreeMap<IpNet, u32>,
        local: &ClusterName,
        node: &str,
    ) -> (BTreeMap<IpNet, IpcacheInfo>, Vec<String>) {
        let local_id = clusters
            .get(local)
            .and_then(|c| c.config.as_ref())
            .map_or(0, |c| c.id.get());
        let mut out: BTreeMap<IpNet, (ClusterName, IpcacheInfo)> = BTreeMap::new();
        let mut dropped = Vec::new();
        let order = clusters
            .get_key_value(local)
            .into_iter()
            .chain(clusters.iter().filter(|(n, _)| *n != local));
        for (cname, c) in order {
            let is_local = cname == local;
            let Some(config) = &c.config else {
                for ip in c.endpoints.keys() {
                    dropped.push(format!("{cname} {ip} config_unknown"));
                }
                continue;
            };
            let id = config.id.get();
            let mut add = |ip: IpAddr, info: IpcacheInfo, dropped: &mut Vec<String>| {
                if ip.is_ipv6() || info.host_ip.is_some_and(|h| h.is_ipv6()) {
                    dropped.push(format!("{cname} {ip} ipv6"));
                    return;
                }
                match out.get(&IpNet::from(ip)) {
                    Some((owner, _)) => dropped.push(format!("{cname} {ip} duplicate of {owner}")),
                    None => {
                        out.insert(IpNet::from(ip), (cname.clone(), info));
                    }
                }
            };
            for n in c.nodes.values() {
                let this = is_local && n.name == node;
                for ip in &n.internal_ips {
                    let info = IpcacheInfo {
                        identity: if this {
                            RESERVED_HOST
                        } else {
                            RESERVED_REMOTE_NODE
                        },
                        host_ip: None,
                        cluster_id: id,
                        local_node: this,
                        remote_cluster: !is_local,
                    };
                    add(*ip, info, &mut dropped);
                }
            }
            for ep in c.endpoints.values() {
                if ep.identity.check_range(cname, config.id).is_err() {
                    dropped.push(format!("{cname} {} identity_out_of_range", ep.ip));
                    continue;
                }
                let info = IpcacheInfo {
                    identity: ep.identity.0,
                    host_ip: ep.host_ip,
                    cluster_id: id,
                    local_node: is_local && ep.node == node,
                    remote_cluster: id != local_id || !is_local,
                };
                add(ep.ip, info, &mut dropped);
            }
        }
        let mut ipcache: BTreeMap<IpNet, IpcacheInfo> =
            out.into_iter().map(|(p, (_, i))| (p, i)).collect();
        for (p, id) in cidrs {
            ipcache.entry(*p).or_insert(cidr_info(*id));
        }
        dropped.sort();
        (ipcache, dropped)
    }

    fn label(d: &Dropped) -> String {
        match &d.reason {
            DropReason::DuplicateIp { kept } => {
                format!("{} {} duplicate of {kept}", d.cluster, d.ip)
            }
            r => format!("{} {} {}", d.cluster, d.ip, r.label()),
        }
    }

    /// A tiny deterministic generator.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    fn pool_ip(rng: &mut Rng) -> IpAddr {
        // A small pool, so that clusters, nodes and endpoints collide often; now and then
        // an IPv6 address.
        if rng.below(20) == 0 {
            return "fd00::5".parse().unwrap();
        }
        // Two blocks: clusters come to and leave a block as their entries do.
        IpAddr::V4(Ipv4Addr::new(10, rng.below(2) as u8, 0, rng.below(8) as u8))
    }

    fn config(cluster: &ClusterName, id: u32) -> ClusterConfig {
        ClusterConfig {
            name: cluster.clone(),
            id: ClusterId::new(id).unwrap(),
            pod_cidrs: vec![],
            service_cidr: None,
            capabilities: vec![],
            version: "test".into(),
        }
    }

    /// One random change to the mesh; returns the cluster it changed, if it changed one.
    fn mutate(
        rng: &mut Rng,
        clusters: &mut BTreeMap<ClusterName, ClusterState>,
        cidrs: &mut BTreeMap<IpNet, u32>,
        node: &mut String,
        names: &[ClusterName],
    ) -> Option<ClusterName> {
        let idx = rng.below(names.len() as u64) as usize;
        let cname = names[idx].clone();
        let id = idx as u32 + 1;
        match rng.below(100) {
            0..=39 => {
                let ip = pool_ip(rng);
                // Mostly in range; sometimes another cluster's identity.
                let owner = if rng.below(10) == 0 { id % 3 + 1 } else { id };
                let host = if rng.below(15) == 0 {
                    "fd00::1".parse().unwrap()
                } else {
                    IpAddr::V4(Ipv4Addr::new(192, 168, id as u8, rng.below(3) as u8))
                };
                let ep = Endpoint {
                    ip,
                    identity: IdentityId((owner << 16) | (300 + rng.below(3) as u32)),
                    host_ip: Some(host),
                    node: format!("n{}", rng.below(3)),
                    namespace: "ns".into(),
                    pod: format!("pod-{}", rng.below(5)),
                    named_ports: vec![],
                };
                clusters
                    .entry(cname.clone())
                    .or_default()
                    .endpoints
                    .insert(ip, ep);
            }
            40..=59 => {
                let ip = pool_ip(rng);
                clusters
                    .entry(cname.clone())
                    .or_default()
                    .endpoints
                    .remove(&ip);
            }
            60..=74 => {
                let n = format!("n{}", rng.below(3));
                let ips = (0..rng.below(3)).map(|_| pool_ip(rng)).collect();
                let value = Node {
                    cluster: cname.clone(),
                    name: n.clone(),
                    internal_ips: ips,
                    pod_cidrs: vec![],
                    stale_since: None,
                };
                clusters
                    .entry(cname.clone())
                    .or_default()
                    .nodes
                    .insert(n, value);
            }
            75..=82 => {
                let n = format!("n{}", rng.below(3));
                clusters.entry(cname.clone()).or_default().nodes.remove(&n);
            }
            83..=87 => {
                let c = clusters.entry(cname.clone()).or_default();
                c.config = match c.config {
                    Some(_) => None,
                    None => Some(config(&cname, id)),
                };
            }
            88..=92 => {
                // The cluster leaves the programmed set, or comes (back) with nothing.
                if clusters.remove(&cname).is_none() {
                    clusters.insert(cname.clone(), ClusterState::default());
                }
            }
            93..=97 => {
                let prefix: IpNet = if rng.below(2) == 0 {
                    IpNet::from(pool_ip(rng))
                } else {
                    "10.0.0.0/29".parse().unwrap()
                };
                if cidrs.remove(&prefix).is_none() {
                    cidrs.insert(prefix, 0x100_0000 + rng.below(4) as u32);
                }
                return None;
            }
            _ => {
                *node = format!("n{}", rng.below(3));
                return None;
            }
        }
        Some(cname)
    }

    /// Random sequences of changes across clusters (endpoints, nodes, configs, clusters
    /// leaving and coming, policy CIDRs, the node itself): after each batch the builder's
    /// ipcache and dropped entries equal the reference computed from nothing, and every
    /// prefix whose entry moved is among the changes it reports.
    #[test]
    fn incremental_updates_equal_a_recompute() {
        let names = [name("local"), name("alpha"), name("bravo"), name("zulu")];
        let local = names[0].clone();
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut clusters: BTreeMap<ClusterName, ClusterState> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let c = ClusterState {
                        config: Some(config(n, i as u32 + 1)),
                        ..Default::default()
                    };
                    (n.clone(), c)
                })
                .collect();
            let mut cidrs = BTreeMap::new();
            let mut node = "n0".to_owned();
            let mut generations: BTreeMap<ClusterName, u64> = BTreeMap::new();
            let mut next = 0u64;
            let mut builder = IpcacheBuilder::new();
            for step in 0..60 {
                let before = builder.ipcache().clone();
                for _ in 0..1 + rng.below(3) {
                    if let Some(c) = mutate(&mut rng, &mut clusters, &mut cidrs, &mut node, &names)
                    {
                        next += 1;
                        generations.insert(c, next);
                    }
                }
                let mut changes = builder.update(
                    &clusters,
                    |n| Some(generations.get(n).copied().unwrap_or(0)),
                    &local,
                    &node,
                );
                changes = changes.merge(builder.set_cidrs(cidrs.clone()));
                let (want, mut want_dropped) = reference(&clusters, &cidrs, &local, &node);
                assert_eq!(builder.ipcache(), &want, "seed {seed} step {step}");
                let mut dropped: Vec<String> = builder.dropped().iter().map(label).collect();
                dropped.sort();
                want_dropped.sort();
                assert_eq!(dropped, want_dropped, "seed {seed} step {step}");
                if let Some(prefixes) = changes.prefixes() {
                    let moved: BTreeSet<IpNet> = before
                        .keys()
                        .chain(want.keys())
                        .filter(|p| before.get(*p) != want.get(*p))
                        .copied()
                        .collect();
                    assert!(
                        moved.is_subset(prefixes),
                        "seed {seed} step {step}: moved {moved:?}, reported {prefixes:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_pod_replaced_in_a_large_mesh_changes_two_prefixes() {
        let local = name("local");
        let mut clusters: BTreeMap<ClusterName, ClusterState> = BTreeMap::new();
        for i in 0..50u32 {
            let n = if i == 0 {
                local.clone()
            } else {
                name(&format!("c{i:03}"))
            };
            let mut c = ClusterState {
                config: Some(config(&n, i + 1)),
                ..Default::default()
            };
            for p in 0..200u32 {
                let ip = IpAddr::V4(Ipv4Addr::new(10, i as u8, (p >> 8) as u8, p as u8));
                c.endpoints.insert(
                    ip,
                    Endpoint {
                        ip,
                        identity: IdentityId(((i + 1) << 16) | 300),
                        host_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 168, i as u8, 1))),
                        node: "n1".into(),
                        namespace: "ns".into(),
                        pod: format!("p{p}"),
                        named_ports: vec![],
                    },
                );
            }
            clusters.insert(n, c);
        }
        let mut generations: BTreeMap<ClusterName, u64> = BTreeMap::new();
        let mut builder = IpcacheBuilder::new();
        let gen_of =
            |g: &BTreeMap<ClusterName, u64>, n: &ClusterName| g.get(n).copied().or(Some(0));
        assert_eq!(
            builder.update(&clusters, |n| gen_of(&generations, n), &local, "n1"),
            IpcacheChanges::All
        );
        assert_eq!(builder.ipcache().len(), 50 * 200);
        // Nothing changed: nothing to do.
        assert_eq!(
            builder.update(&clusters, |n| gen_of(&generations, n), &local, "n1"),
            IpcacheChanges::Prefixes(BTreeSet::new())
        );
        // A pod of c007 replaced: a new address, the old one gone.
        let c = clusters.get_mut(&name("c007")).unwrap();
        let old = IpAddr::V4(Ipv4Addr::new(10, 7, 0, 3));
        let mut ep = c.endpoints.remove(&old).unwrap();
        ep.ip = IpAddr::V4(Ipv4Addr::new(10, 7, 9, 9));
        c.endpoints.insert(ep.ip, ep.clone());
        generations.insert(name("c007"), 1);
        let changes = builder.update(&clusters, |n| gen_of(&generations, n), &local, "n1");
        assert_eq!(
            changes,
            IpcacheChanges::Prefixes([IpNet::from(old), IpNet::from(ep.ip)].into())
        );
        assert!(!builder.ipcache().contains_key(&IpNet::from(old)));
        assert_eq!(builder.ipcache()[&IpNet::from(ep.ip)].cluster_id, 8);
    }
}
