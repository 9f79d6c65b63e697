//! Compiling policies + identities into each local identity's verdict table, and `decide`,
//! the lookup the datapath reproduces.
//!
//! # The compiled form
//!
//! For each local identity selected by some policy, and each direction: whether the direction
//! is enforced (default deny), which policies enforce it, and a list of `PolicyEntry`s
//! `(remote identity | any, protocol | any, port range, Allow | Deny, rule)`, sorted by
//! `(remote, protocol, port)`. Within one `(remote, protocol)` pair the port ranges are
//! disjoint and deny has already been carved out of allow, so each range splits into port
//! prefixes (`PortRange::prefixes`) for an LPM map keyed on
//! `(local identity, direction, remote identity, protocol, port prefix)` without overlap.
//! A direction that is not enforced keeps only its deny entries (allows would change nothing).
//! Identities sharing the same selecting policies share one table (`Arc`).
//!
//! # Lookup (`decide`)
//!
//! Four lookups, in the pairs `(remote, proto)`, `(remote, any)`, `(any, proto)`,
//! `(any, any)`, each the longest port prefix containing the port. If any finds a Deny, the
//! flow is denied (deny beats allow); else if the direction is not enforced it is allowed;
//! else if any finds an Allow it is allowed; else it is denied by default. The rule reported
//! is the smallest `RuleRef` among the entries of the winning verdict. Ingress from the
//! reserved host identity is always allowed (kubelet probes come from the node), before any
//! lookup.
//!
//! # CIDR identities
//!
//! CIDR peers match CIDR identities: the agent gives every prefix `PolicySet::cidr_prefixes`
//! names an identity (`CidrIdentities`) and an ipcache LPM entry, so an address without an
//! endpoint identity resolves to the longest policy prefix containing it. A CIDR peer
//! `cidr except [e..]` matches the identity of prefix P iff P is inside `cidr` and inside no
//! `e`: since every `cidr` and `e` is itself a prefix in the ipcache, that is exactly "the
//! address is in cidr and in no except". The `world` entity is reserved world (2) plus every
//! CIDR identity. A prefix without an identity is listed in
//! `CompiledPolicy::missing_cidr_identities`: until the agent allocates it, addresses in it
//! resolve to a shorter prefix or to world, so the agent allocates before it programs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::{LABEL_CLUSTER, RESERVED_HOST, RESERVED_REMOTE_NODE, RESERVED_WORLD};
use crate::{ClusterName, IdentityId, Protocol};

use super::identities::{IdentityKind, IdentityTable, NamedPort};
use super::model::*;

/// Why a flow got its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Reason {
    /// This rule matched (the smallest matching rule of the winning verdict).
    Rule(RuleRef),
    /// Policies put the direction in default deny and no rule allowed the flow.
    DefaultDeny { enforced_by: Vec<PolicyRef> },
    /// No policy enforces this direction for the local endpoint: everything is allowed.
    NotEnforced,
    /// Ingress from the local host (kubelet probes) is always allowed, as Cilium's default
    /// `allow-localhost` does.
    LocalHost,
}

/// A verdict and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Rule(r) => write!(f, "{r}"),
            Reason::DefaultDeny { enforced_by } => {
                f.write_str("default deny, enforced by ")?;
                for (i, p) in enforced_by.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
            Reason::NotEnforced => f.write_str("no policy enforces this direction"),
            Reason::LocalHost => f.write_str("ingress from the local host is always allowed"),
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.verdict, self.reason)
    }
}

/// One entry of a verdict table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyEntry {
    /// The other end; None matches every identity (known or not).
    pub remote: Option<IdentityId>,
    /// None matches TCP, UDP and SCTP alike.
    pub protocol: Option<Protocol>,
    pub ports: PortRange,
    pub verdict: Verdict,
    /// Index into `CompiledPolicy::rules`: the rule that produced the entry (a BPF map value
    /// can carry it, so counters are kept per rule).
    pub rule: u32,
}

/// The verdict table of one local identity in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DirectionPolicy {
    /// Default deny: only what an Allow entry matches passes.
    pub enforced: bool,
    /// The policies that make the direction default-deny, sorted.
    pub enforced_by: Vec<PolicyRef>,
    /// Sorted by `(remote, protocol, ports.start)`; disjoint ports within a
    /// `(remote, protocol)` pair.
    pub entries: Vec<PolicyEntry>,
}

/// Both directions of a local identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPolicy {
    pub ingress: Arc<DirectionPolicy>,
    pub egress: Arc<DirectionPolicy>,
}

// === impl IdentityPolicy ===

impl IdentityPolicy {
    pub fn direction(&self, d: Direction) -> &DirectionPolicy {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// The result of `compile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub local_cluster: ClusterName,
    /// Every rule of the compiled policies, sorted; `PolicyEntry::rule` indexes it.
    pub rules: Vec<RuleRef>,
    /// Local identities selected by at least one policy. An identity not here is enforced in
    /// neither direction and no deny applies to it.
    pub identities: BTreeMap<IdentityId, IdentityPolicy>,
    /// Every prefix the policies name: each needs a CIDR identity in the ipcache.
    pub cidr_prefixes: BTreeSet<IpNet>,
    /// Prefixes of `cidr_prefixes` the identity table has no CIDR identity for.
    pub missing_cidr_identities: Vec<IpNet>,
}

// === impl CompiledPolicy ===

impl CompiledPolicy {
    pub fn direction(&self, local: IdentityId, d: Direction) -> Option<&DirectionPolicy> {
        self.identities.get(&local).map(|p| p.direction(d))
    }

    /// Total entries over every identity and direction (what the datapath map holds, before
    /// splitting ranges into port prefixes).
    pub fn entry_count(&self) -> usize {
        self.identities
            .values()
            .map(|p| p.ingress.entries.len() + p.egress.entries.len())
            .sum()
    }
}

/// The verdict for one flow, from the compiled form: the function the agent's map layout
/// reproduces and `meshctl policy check` prints. `local` is the endpoint whose policy applies
/// (destination on ingress, source on egress), `remote` the other end as the ipcache resolves
/// it (unknown addresses: world), `port` the destination port.
pub fn decide(
    compiled: &CompiledPolicy,
    local: IdentityId,
    direction: Direction,
    remote: IdentityId,
    protocol: Protocol,
    port: u16,
) -> Decision {
    let not_enforced = Decision {
        verdict: Verdict::Allow,
        reason: Reason::NotEnforced,
    };
    if direction == Direction::Ingress && remote.0 == RESERVED_HOST {
        return Decision {
            verdict: Verdict::Allow,
            reason: Reason::LocalHost,
        };
    }
    let Some(table) = compiled.direction(local, direction) else {
        return not_enforced;
    };
    let mut deny: Option<u32> = None;
    let mut allow: Option<u32> = None;
    for (r, p) in [
        (Some(remote), Some(protocol)),
        (Some(remote), None),
        (None, Some(protocol)),
        (None, None),
    ] {
        if let Some(e) = lookup(&table.entries, r, p, port) {
            let best = match e.verdict {
                Verdict::Deny => &mut deny,
                Verdict::Allow => &mut allow,
            };
            *best = Some(best.map_or(e.rule, |b| b.min(e.rule)));
        }
    }
    let rule = |i: u32| Reason::Rule(compiled.rules[i as usize].clone());
    if let Some(i) = deny {
        return Decision {
            verdict: Verdict::Deny,
            reason: rule(i),
        };
    }
    if !table.enforced {
        return not_enforced;
    }
    match allow {
        Some(i) => Decision {
            verdict: Verdict::Allow,
            reason: rule(i),
        },
        None => Decision {
            verdict: Verdict::Deny,
            reason: Reason::DefaultDeny {
                enforced_by: table.enforced_by.clone(),
            },
        },
    }
}

/// The entry of `(remote, protocol)` whose range holds `port` (ranges are disjoint).
fn lookup(
    entries: &[PolicyEntry],
    remote: Option<IdentityId>,
    protocol: Option<Protocol>,
    port: u16,
) -> Option<&PolicyEntry> {
    let key = (remote, protocol);
    let lo = entries.partition_point(|e| (e.remote, e.protocol) < key);
    let hi = lo + entries[lo..].partition_point(|e| (e.remote, e.protocol) == key);
    let group = &entries[lo..hi];
    let i = group.partition_point(|e| e.ports.start <= port);
    let e = group.get(i.checked_sub(1)?)?;
    e.ports.contains(port).then_some(e)
}

/// Compiles the policies of `local_cluster` against every identity known: the verdict table
/// of each local identity some policy selects. Policies of other clusters are ignored (a
/// policy applies only in the cluster it was applied to). Pure and deterministic: the same
/// inputs, in any order, give the same output.
pub fn compile(
    policies: &PolicySet,
    identities: &IdentityTable,
    local_cluster: &ClusterName,
) -> CompiledPolicy {
    Compiler::new(policies, identities, local_cluster).run()
}

// === Compiler ===

/// A fixed-size set of identity positions in the compiler's universe.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn empty(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn and(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a &= b);
    }
    fn and_not(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a &= !b);
    }
    fn or(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a |= b);
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let b = word.trailing_zeros() as usize;
                word &= word - 1;
                Some(w * 64 + b)
            })
        })
    }
}

/// The remote identities a rule's peers stand for.
enum RemoteSet {
    Any,
    Set(Bits),
}

/// One spec of a local-cluster policy, with the indices of its rules in the sorted rule list.
struct SpecInfo<'a> {
    policy: &'a PolicyRef,
    spec: &'a PolicySpec,
    /// `[direction][section][rule index] -> global rule id` (Ingress, Egress x Allow, Deny).
    rule_ids: [[Vec<u32>; 2]; 2],
    /// Whether an ingress rule names a port (its table then depends on the local identity's
    /// ports).
    uses_named_ingress: bool,
}

struct Compiler<'a> {
    identities: &'a IdentityTable,
    local_cluster: &'a ClusterName,
    specs: Vec<SpecInfo<'a>>,
    rules: Vec<RuleRef>,
    /// Universe: every identity, sorted; `pos` is its inverse.
    ids: Vec<IdentityId>,
    pos: HashMap<IdentityId, usize>,
    endpoints: Bits,
    local_endpoints: Bits,
    cidrs: Vec<(usize, IpNet)>,
    /// label key -> (positions having the key, value -> positions)
    labels: HashMap<&'a str, (Bits, HashMap<&'a str, Bits>)>,
    selector_cache: HashMap<&'a Selector, Arc<Bits>>,
    remote_cache: HashMap<u32, Arc<RemoteSet>>,
    cidr_prefixes: BTreeSet<IpNet>,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn section_index(v: Verdict) -> usize {
    match v {
        Verdict::Allow => 0,
        Verdict::Deny => 1,
    }
}

// === impl Compiler ===

impl<'a> Compiler<'a> {
    fn new(
        policies: &'a PolicySet,
        identities: &'a IdentityTable,
        local_cluster: &'a ClusterName,
    ) -> Self {
        // Rules first, so their ids follow the RuleRef order whatever order specs are in.
        let mut all_rules = Vec::new();
        let mut specs = Vec::new();
        for policy in policies
            .iter()
            .filter(|p| &p.reference.cluster == local_cluster)
        {
            for spec in &policy.specs {
                for d in Direction::ALL {
                    let rules = spec.direction(d);
                    for (section, list) in
                        [(Verdict::Allow, &rules.allow), (Verdict::Deny, &rules.deny)]
                    {
                        for i in 0..list.len() {
                            all_rules.push(RuleRef {
                                policy: policy.reference.clone(),
                                spec: spec.source,
                                direction: d,
                                section,
                                index: i as u32,
                            });
                        }
                    }
                }
                specs.push((&policy.reference, spec));
            }
        }
        all_rules.sort();
        all_rules.dedup();
        let specs = specs
            .into_iter()
            .map(|(policy, spec)| {
                let ids = |d: Direction, section: Verdict, n: usize| -> Vec<u32> {
                    (0..n)
                        .map(|i| {
                            let r = RuleRef {
                                policy: policy.clone(),
                                spec: spec.source,
                                direction: d,
                                section,
                                index: i as u32,
                            };
                            all_rules.binary_search(&r).expect("rule was collected") as u32
                        })
                        .collect()
                };
                let rule_ids = Direction::ALL.map(|d| {
                    let r = spec.direction(d);
                    [
                        ids(d, Verdict::Allow, r.allow.len()),
                        ids(d, Verdict::Deny, r.deny.len()),
                    ]
                });
                SpecInfo {
                    policy,
                    spec,
                    rule_ids,
                    uses_named_ingress: spec
                        .ingress
                        .allow
                        .iter()
                        .chain(&spec.ingress.deny)
                        .any(Rule::uses_named_ports),
                }
            })
            .collect();

        let ids = identities.all_ids();
        let pos: HashMap<IdentityId, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let n = ids.len();
        let mut endpoints = Bits::empty(n);
        let mut local_endpoints = Bits::empty(n);
        let mut labels: HashMap<&str, (Bits, HashMap<&str, Bits>)> = HashMap::new();
        for (id, l) in identities.endpoints() {
            let i = pos[&id];
            endpoints.set(i);
            if l.get(LABEL_CLUSTER) == Some(local_cluster.as_str()) {
                local_endpoints.set(i);
            }
            for label in l.iter() {
                let Some((k, v)) = label.strip_prefix("k8s:").and_then(|r| r.split_once('='))
                else {
                    continue;
                };
                let entry = labels
                    .entry(k)
                    .or_insert_with(|| (Bits::empty(n), HashMap::new()));
                entry.0.set(i);
                entry.1.entry(v).or_insert_with(|| Bits::empty(n)).set(i);
            }
        }
        let cidrs = identities.cidrs().map(|(id, p)| (pos[&id], p)).collect();
        Compiler {
            identities,
            local_cluster,
            specs,
            rules: all_rules,
            ids,
            pos,
            endpoints,
            local_endpoints,
            cidrs,
            labels,
            selector_cache: HashMap::new(),
            remote_cache: HashMap::new(),
            cidr_prefixes: BTreeSet::new(),
        }
    }

    fn run(mut self) -> CompiledPolicy {
        let n = self.ids.len();
        // Which specs select each local identity.
        let mut selecting: Vec<Vec<u32>> = vec![Vec::new(); n];
        for s in 0..self.specs.len() {
            let Subject::Endpoints(sel) = &self.specs[s].spec.subject else {
                continue;
            };
            let mut set = (*self.selector(sel)).clone();
            set.and(&self.local_endpoints);
            for i in set.iter() {
                selecting[i].push(s as u32);
            }
        }
        let empty = Arc::new(DirectionPolicy::default());
        type GroupKey<'k> = (Direction, Vec<u32>, Option<&'k [NamedPort]>);
        let mut groups: HashMap<GroupKey<'a>, Arc<DirectionPolicy>> = HashMap::new();
        let mut out = BTreeMap::new();
        for (i, specs) in selecting.iter().enumerate() {
            if specs.is_empty() {
                continue;
            }
            let local = self.ids[i];
            let mut both = [empty.clone(), empty.clone()];
            for d in Direction::ALL {
                let relevant: Vec<u32> = specs
                    .iter()
                    .copied()
                    .filter(|s| {
                        let r = self.specs[*s as usize].spec.direction(d);
                        r.default_deny || !r.deny.is_empty() || !r.allow.is_empty()
                    })
                    .collect();
                if relevant.is_empty() {
                    continue;
                }
                // Named ports on ingress resolve against the local identity's own ports, so
                // identities with different ports cannot share the table.
                let named = (d == Direction::Ingress
                    && relevant
                        .iter()
                        .any(|s| self.specs[*s as usize].uses_named_ingress))
                .then(|| self.identities.named_ports(local));
                let key = (d, relevant, named);
                let table = match groups.get(&key) {
                    Some(t) => t.clone(),
                    None => {
                        let t = Arc::new(self.direction_table(d, &key.1, named.unwrap_or(&[])));
                        groups.insert(key, t.clone());
                        t
                    }
                };
                both[dir_index(d)] = table;
            }
            let [ingress, egress] = both;
            out.insert(local, IdentityPolicy { ingress, egress });
        }
        for s in &self.specs {
            for d in Direction::ALL {
                let r = s.spec.direction(d);
                for rule in r.allow.iter().chain(&r.deny) {
                    if let Peers::List(peers) = &rule.peers {
                        for p in peers {
                            if let Peer::Cidr(c) = p {
                                self.cidr_prefixes.insert(c.cidr);
                                self.cidr_prefixes.extend(c.except.iter().copied());
                            }
                        }
                    }
                }
            }
        }
        let missing = self
            .cidr_prefixes
            .iter()
            .filter(|p| self.identities.cidr_identity(p).is_none())
            .copied()
            .collect();
        CompiledPolicy {
            local_cluster: self.local_cluster.clone(),
            rules: self.rules,
            identities: out,
            cidr_prefixes: self.cidr_prefixes,
            missing_cidr_identities: missing,
        }
    }

    /// The endpoint identities a selector matches (every cluster), cached per selector.
    fn selector(&mut self, sel: &'a Selector) -> Arc<Bits> {
        if let Some(b) = self.selector_cache.get(sel) {
            return b.clone();
        }
        let n = self.ids.len();
        let mut set = self.endpoints.clone();
        let none = Bits::empty(n);
        for r in &sel.requirements {
            let entry = self.labels.get(r.key.as_str());
            let has_key = entry.map_or(&none, |e| &e.0);
            let union = |vs: &[String]| {
                let mut u = Bits::empty(n);
                if let Some((_, values)) = entry {
                    for v in vs {
                        if let Some(b) = values.get(v.as_str()) {
                            u.or(b);
                        }
                    }
                }
                u
            };
            match &r.op {
                SelectorOp::In(vs) => set.and(&union(vs)),
                SelectorOp::NotIn(vs) => set.and_not(&union(vs)),
                SelectorOp::Exists => set.and(has_key),
                SelectorOp::DoesNotExist => set.and_not(has_key),
            }
        }
        let set = Arc::new(set);
        self.selector_cache.insert(sel, set.clone());
        set
    }

    /// The remote identities of a rule, cached per rule.
    fn remotes(&mut self, rule_id: u32, rule: &'a Rule) -> Arc<RemoteSet> {
        if let Some(r) = self.remote_cache.get(&rule_id) {
            return r.clone();
        }
        let n = self.ids.len();
        let set = match &rule.peers {
            Peers::Any => RemoteSet::Any,
            Peers::List(peers) if peers.contains(&Peer::Entity(Entity::All)) => RemoteSet::Any,
            Peers::List(peers) => {
                let mut set = Bits::empty(n);
                for p in peers {
                    match p {
                        Peer::Endpoints(sel) => {
                            let b = self.selector(sel);
                            set.or(&b);
                        }
                        Peer::Entity(Entity::All) => unreachable!("handled above"),
                        Peer::Entity(Entity::World) => {
                            set.set(self.pos[&IdentityId(RESERVED_WORLD)]);
                            for (i, _) in &self.cidrs {
                                set.set(*i);
                            }
                        }
                        Peer::Entity(Entity::Cluster) => {
                            set.or(&self.local_endpoints);
                            set.set(self.pos[&IdentityId(RESERVED_HOST)]);
                            set.set(self.pos[&IdentityId(RESERVED_REMOTE_NODE)]);
                        }
                        Peer::Entity(Entity::Host) => set.set(self.pos[&IdentityId(RESERVED_HOST)]),
                        Peer::Entity(Entity::RemoteNode) => {
                            set.set(self.pos[&IdentityId(RESERVED_REMOTE_NODE)])
                        }
                        Peer::Cidr(c) => {
                            for (i, prefix) in &self.cidrs {
                                if c.covers(prefix) {
                                    set.set(*i);
                                }
                            }
                        }
                    }
                }
                RemoteSet::Set(set)
            }
        };
        let set = Arc::new(set);
        self.remote_cache.insert(rule_id, set.clone());
        set
    }

    /// The table of one direction for identities selected by exactly `specs` (and, on
    /// ingress with named ports, having `local_ports`).
    fn direction_table(
        &mut self,
        d: Direction,
        specs: &[u32],
        local_ports: &[NamedPort],
    ) -> DirectionPolicy {
        let mut enforced_by: Vec<PolicyRef> = specs
            .iter()
            .map(|s| &self.specs[*s as usize])
            .filter(|s| s.spec.direction(d).default_deny)
            .map(|s| s.policy.clone())
            .collect();
        enforced_by.sort();
        enforced_by.dedup();
        let enforced = !enforced_by.is_empty();
        let mut raw: Vec<RawEntry> = Vec::new();
        for &s in specs {
            let spec: &'a PolicySpec = self.specs[s as usize].spec;
            let rules = spec.direction(d);
            for (section, list) in [(Verdict::Allow, &rules.allow), (Verdict::Deny, &rules.deny)] {
                // Allows change nothing where nothing is enforced.
                if section == Verdict::Allow && !enforced {
                    continue;
                }
                let ids =
                    self.specs[s as usize].rule_ids[dir_index(d)][section_index(section)].clone();
                for (rule, rid) in list.iter().zip(ids) {
                    self.rule_entries(d, rule, section, rid, local_ports, &mut raw);
                }
            }
        }
        // Group by (remote, protocol) with one sort rather than a map of vectors: tables of
        // broad rules hold an entry per identity.
        raw.sort_unstable_by_key(|e| (e.0, e.1));
        let mut entries = Vec::with_capacity(raw.len());
        for group in raw.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (remote, protocol) = (group[0].0, group[0].1);
            let intervals = group.iter().map(|e| (e.2, e.3, e.4)).collect();
            for (ports, verdict, rule) in normalize(intervals) {
                entries.push(PolicyEntry {
                    remote,
                    protocol,
                    ports,
                    verdict,
                    rule,
                });
            }
        }
        debug_assert!(entries.is_sorted_by_key(|e| (e.remote, e.protocol, e.ports.start)));
        DirectionPolicy {
            enforced,
            enforced_by,
            entries,
        }
    }

    fn rule_entries(
        &mut self,
        d: Direction,
        rule: &'a Rule,
        section: Verdict,
        rid: u32,
        local_ports: &[NamedPort],
        raw: &mut Vec<RawEntry>,
    ) {
        if rule.unenforceable.is_some() {
            // Fail closed: an unenforceable allow allows nothing, an unenforceable deny
            // denies everything.
            if section == Verdict::Deny {
                raw.push((None, None, PortRange::ALL, section, rid));
            }
            return;
        }
        let remotes = self.remotes(rid, rule);
        let remote_ids: Vec<Option<IdentityId>> = match &*remotes {
            RemoteSet::Any => vec![None],
            RemoteSet::Set(b) => b.iter().map(|i| Some(self.ids[i])).collect(),
        };
        let mut push = |r: Option<IdentityId>, p: Option<Protocol>, range: PortRange| {
            raw.push((r, p, range, section, rid));
        };
        if rule.ports.is_empty() {
            for r in &remote_ids {
                push(*r, None, PortRange::ALL);
            }
            return;
        }
        for spec in &rule.ports {
            match &spec.ports {
                PortMatch::Range(range) => {
                    for r in &remote_ids {
                        push(*r, spec.protocol, *range);
                    }
                }
                PortMatch::Named(name) => {
                    let fits = |np: &NamedPort| {
                        &np.name == name && spec.protocol.is_none_or(|p| p == np.protocol)
                    };
                    match d {
                        Direction::Ingress => {
                            for np in local_ports.iter().filter(|np| fits(np)) {
                                for r in &remote_ids {
                                    push(*r, Some(np.protocol), PortRange::single(np.port));
                                }
                            }
                        }
                        Direction::Egress => {
                            // The port belongs to the peer: resolve per peer identity. A
                            // wildcard peer becomes every identity declaring the name (no
                            // other identity has the port).
                            let owners: Vec<IdentityId> = match &*remotes {
                                RemoteSet::Any => {
                                    self.identities.endpoints().map(|(id, _)| id).collect()
                                }
                                RemoteSet::Set(_) => remote_ids.iter().flatten().copied().collect(),
                            };
                            for owner in owners {
                                if !matches!(self.identities.kind(owner), IdentityKind::Endpoint(_))
                                {
                                    continue;
                                }
                                for np in self
                                    .identities
                                    .named_ports(owner)
                                    .iter()
                                    .filter(|np| fits(np))
                                {
                                    push(
                                        Some(owner),
                                        Some(np.protocol),
                                        PortRange::single(np.port),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An entry before normalization: remote, protocol, ports, verdict, rule id.
type RawEntry = (
    Option<IdentityId>,
    Option<Protocol>,
    PortRange,
    Verdict,
    u32,
);

/// Makes one `(remote, protocol)` group's ranges disjoint: on each stretch of ports, Deny if
/// any deny covers it, else Allow; the rule is the smallest among those of that verdict that
/// cover it. Adjacent stretches with the same verdict and rule are merged.
fn normalize(mut intervals: Vec<(PortRange, Verdict, u32)>) -> Vec<(PortRange, Verdict, u32)> {
    if intervals.len() <= 1 {
        return intervals;
    }
    intervals.sort_unstable_by_key(|(r, v, id)| (r.start, r.end, std::cmp::Reverse(*v), *id));
    intervals.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    if intervals.len() == 1 {
        return intervals;
    }
    let mut bounds: Vec<u32> = intervals
        .iter()
        .flat_map(|(r, _, _)| [r.start as u32, r.end as u32 + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<(PortRange, Verdict, u32)> = Vec::new();
    for w in bounds.windows(2) {
        let (start, end) = (w[0], w[1] - 1);
        let mut best: Option<(Verdict, u32)> = None;
        for (r, v, id) in &intervals {
            if (r.start as u32) <= start && end <= r.end as u32 {
                best = Some(match best {
                    None => (*v, *id),
                    Some((bv, bid)) if *v == bv => (bv, bid.min(*id)),
                    Some((Verdict::Allow, _)) => (*v, *id), // Deny wins.
                    Some(b) => b,
                });
            }
        }
        let Some((v, id)) = best else { continue };
        if let Some(last) = out.last_mut()
            && last.1 == v
            && last.2 == id
            && last.0.end as u32 + 1 == start
        {
            last.0.end = end as u16;
            continue;
        }
        out.push((
            PortRange {
                start: start as u16,
                end: end as u16,
            },
            v,
            id,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_carves_deny_out_of_allow() {
        let r = |s, e| PortRange { start: s, end: e };
        let out = normalize(vec![
            (PortRange::ALL, Verdict::Allow, 3),
            (r(80, 90), Verdict::Deny, 7),
            (r(85, 100), Verdict::Allow, 1),
        ]);
        assert_eq!(
            out,
            vec![
                (r(0, 79), Verdict::Allow, 3),
                (r(80, 90), Verdict::Deny, 7),
                (r(91, 100), Verdict::Allow, 1),
                (r(101, 65535), Verdict::Allow, 3),
            ]
        );
    }
}
