//! The policy model: what a NetworkPolicy, CiliumNetworkPolicy or
//! CiliumClusterwideNetworkPolicy means once parsed (DESIGN.md section 14).
//!
//! The model holds the *effective* semantics, after the translations Cilium applies when it
//! reads a policy: namespaced selectors already carry the policy's namespace, peer selectors
//! without a cluster label already carry the local cluster, a direction holding a rule that
//! cannot be enforced is already default-deny. Compile and the reference evaluator read it
//! without knowing which kind of object it came from.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{ClusterName, Protocol};

/// The three kinds of policy object users apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// `networking.k8s.io/v1 NetworkPolicy`
    NetworkPolicy,
    /// `cilium.io/v2 CiliumNetworkPolicy`
    CiliumNetworkPolicy,
    /// `cilium.io/v2 CiliumClusterwideNetworkPolicy`
    CiliumClusterwideNetworkPolicy,
}

// === impl PolicyKind ===

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }

    /// Whether objects of this kind live in a namespace (and select only in it).
    pub fn is_namespaced(self) -> bool {
        !matches!(self, PolicyKind::CiliumClusterwideNetworkPolicy)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which policy object: kind, cluster that owns it, namespace (none for clusterwide) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub cluster: ClusterName,
    pub namespace: Option<String>,
    pub name: String,
}

// === impl PolicyRef ===

impl PolicyRef {
    /// `namespace/name`, or `name` for a clusterwide policy: how kubectl names the object.
    pub fn object(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.cluster, self.object())
    }
}

/// A traffic direction, seen from the selected (local) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic the selected endpoint receives; the remote identity is the source.
    Ingress,
    /// Traffic the selected endpoint sends; the remote identity is the destination.
    Egress,
}

// === impl Direction ===

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule, or a decision, does to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// Where in the object a spec comes from: Cilium policies have `spec` and/or `specs[]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SpecSource {
    /// `spec` (the only one of a NetworkPolicy).
    Spec,
    /// `specs[i]`
    Specs(u32),
}

impl fmt::Display for SpecSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecSource::Spec => f.write_str("spec"),
            SpecSource::Specs(i) => write!(f, "specs[{i}]"),
        }
    }
}

/// The rule that produced a verdict: the policy, the spec, the section and the index in it.
/// Displays as the JSON path of the rule (`... spec.ingressDeny[0]`), so an operator finds it
/// in the YAML they applied. Ordered, so "the rule that decided" is the smallest matching one,
/// independent of the order policies arrived in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub spec: SpecSource,
    pub direction: Direction,
    /// Allow (`ingress`/`egress`) or deny (`ingressDeny`/`egressDeny`) section.
    pub section: Verdict,
    pub index: u32,
}

// === impl RuleRef ===

impl RuleRef {
    /// The JSON path of the rule inside its object, e.g. `spec.egressDeny[2]`.
    pub fn path(&self) -> String {
        let section = match (self.direction, self.section) {
            (Direction::Ingress, Verdict::Allow) => "ingress",
            (Direction::Ingress, Verdict::Deny) => "ingressDeny",
            (Direction::Egress, Verdict::Allow) => "egress",
            (Direction::Egress, Verdict::Deny) => "egressDeny",
        };
        format!("{}.{section}[{}]", self.spec, self.index)
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.policy, self.path())
    }
}

/// One requirement of a label selector, on a label key of an identity (without source prefix:
/// `k8s:app` and `any:app` are both `app`, since every identity label is a `k8s:` label).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub op: SelectorOp,
}

/// Kubernetes label selector operators (`matchLabels` entries are `In` with one value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOp {
    In(Vec<String>),
    /// Matches when the key is absent too, as in Kubernetes.
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

// === impl Requirement ===

impl Requirement {
    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: SelectorOp::In(vec![value.into()]),
        }
    }

    /// Whether an identity whose value for this key is `value` (None: key absent) matches.
    pub fn matches_value(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (SelectorOp::In(vs), Some(v)) => vs.iter().any(|x| x == v),
            (SelectorOp::In(_), None) => false,
            (SelectorOp::NotIn(vs), Some(v)) => !vs.iter().any(|x| x == v),
            (SelectorOp::NotIn(_), None) => true,
            (SelectorOp::Exists, v) => v.is_some(),
            (SelectorOp::DoesNotExist, v) => v.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.key;
        match &self.op {
            SelectorOp::In(vs) if vs.len() == 1 => write!(f, "{k}={}", vs[0]),
            SelectorOp::In(vs) => write!(f, "{k} in ({})", vs.join(",")),
            SelectorOp::NotIn(vs) => write!(f, "{k} notin ({})", vs.join(",")),
            SelectorOp::Exists => write!(f, "{k}"),
            SelectorOp::DoesNotExist => write!(f, "!{k}"),
        }
    }
}

/// A label selector over endpoint identities: every requirement must hold. An empty selector
/// matches every endpoint identity (never a reserved or CIDR identity: those are reached
/// through entities and CIDR peers).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

// === impl Selector ===

impl Selector {
    /// Whether labels (looked up by `get(key)`) satisfy every requirement.
    pub fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements
            .iter()
            .all(|r| r.matches_value(get(&r.key)))
    }

    /// Whether some requirement is on `key`; with `widening_only`, only `In` and `Exists`
    /// count (the operators that name clusters to select, for the local-cluster default).
    pub fn has_key(&self, key: &str, widening_only: bool) -> bool {
        self.requirements.iter().any(|r| {
            r.key == key
                && (!widening_only || matches!(r.op, SelectorOp::In(_) | SelectorOp::Exists))
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Cilium entities: peers named by what they are rather than by labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Entity {
    /// Addresses without a known endpoint identity: reserved identity 2 and every CIDR
    /// identity.
    World,
    /// Every endpoint of the local cluster, the host and remote nodes.
    Cluster,
    /// The local node (reserved identity 1).
    Host,
    /// Other nodes (reserved identity 6).
    RemoteNode,
    /// Everything.
    All,
}

// === impl Entity ===

impl Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::World => "world",
            Entity::Cluster => "cluster",
            Entity::Host => "host",
            Entity::RemoteNode => "remote-node",
            Entity::All => "all",
        }
    }
}

/// A CIDR peer: addresses in `cidr` but in none of `except`, that have no endpoint identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CidrPeer {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

// === impl CidrPeer ===

impl CidrPeer {
    /// Whether every address of `prefix` is in this peer (the rule for CIDR identities: the
    /// ipcache resolves an address to the longest prefix any rule names, so a prefix inside
    /// `cidr` and inside no `except` stands for addresses the peer covers, and only those).
    pub fn covers(&self, prefix: &IpNet) -> bool {
        self.cidr.contains(prefix) && !self.except.iter().any(|e| e.contains(prefix))
    }
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Peer {
    Endpoints(Selector),
    Entity(Entity),
    Cidr(CidrPeer),
}

/// The peers of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Peers {
    /// Any remote, known or not (a rule with ports but no L3 peer, NetworkPolicy's missing
    /// `from`/`to`).
    Any,
    /// Any of these (an empty list selects nothing).
    List(Vec<Peer>),
}

/// An inclusive port range; `0..=65535` is every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

// === impl PortRange ===

impl PortRange {
    pub const ALL: PortRange = PortRange {
        start: 0,
        end: u16::MAX,
    };

    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }

    /// The range as port prefixes `(value, prefix length in bits)`, the form an LPM map keyed
    /// on the 16-bit port stores: each prefix covers `value .. value + 2^(16-len) - 1`, the
    /// prefixes are disjoint and cover exactly the range, fewest first-fit.
    pub fn prefixes(&self) -> Vec<(u16, u8)> {
        let mut out = Vec::new();
        let mut start = self.start as u32;
        let end = self.end as u32;
        while start <= end {
            // Largest aligned block starting at `start` that stays inside the range.
            let mut size = if start == 0 {
                1u32 << 16
            } else {
                1u32 << start.trailing_zeros().min(16)
            };
            while start + size - 1 > end {
                size >>= 1;
            }
            out.push((start as u16, 16 - size.trailing_zeros() as u8));
            start += size;
        }
        out
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ALL {
            f.write_str("any")
        } else if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Which ports a port entry names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortMatch {
    Range(PortRange),
    /// A container port name, resolved per identity (`IdentityTable::set_named_ports`): on
    /// ingress against the selected endpoint's ports, on egress against the peer's.
    Named(String),
}

/// One port entry of a rule: protocol (None = any of TCP, UDP, SCTP) and ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Option<Protocol>,
    pub ports: PortMatch,
}

/// One rule: peers x ports. An empty `ports` list means every protocol and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Peers,
    pub ports: Vec<PortSpec>,
    /// Why the datapath cannot enforce this rule (L7 rules, FQDNs, ...), if so. Fail closed:
    /// an unenforceable allow rule allows nothing, an unenforceable deny rule denies every
    /// flow of its direction, and either makes its direction default-deny.
    pub unenforceable: Option<String>,
}

// === impl Rule ===

impl Rule {
    pub fn uses_named_ports(&self) -> bool {
        self.ports
            .iter()
            .any(|p| matches!(p.ports, PortMatch::Named(_)))
    }
}

/// The rules of one direction of a spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DirectionRules {
    /// Whether the spec puts its selected endpoints in default deny for this direction.
    pub default_deny: bool,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

/// What a spec applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Subject {
    /// Local endpoints whose identity matches (namespaced kinds carry their namespace).
    Endpoints(Selector),
    /// Nodes (`nodeSelector`, Cilium's host firewall): not enforced by mesh, reported as a
    /// problem; such a spec selects no endpoint.
    Nodes(Selector),
}

/// One rule set of a policy: a NetworkPolicy's `spec`, a Cilium policy's `spec` or
/// `specs[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicySpec {
    pub source: SpecSource,
    pub subject: Subject,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
}

// === impl PolicySpec ===

impl PolicySpec {
    pub fn direction(&self, d: Direction) -> &DirectionRules {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn direction_mut(&mut self, d: Direction) -> &mut DirectionRules {
        match d {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// Something in a policy that mesh cannot enforce, with the JSON path it is at. The policy
/// is still applied (failing closed where the problem is); the apiserver reports problems as
/// Warning Events on the object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A parsed policy object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub reference: PolicyRef,
    pub specs: Vec<PolicySpec>,
    pub problems: Vec<Problem>,
}

/// The policies of a cluster, keyed by reference: applying them in any order gives the same
/// set. One writer (the agent's or meshctl's index) calls `upsert`/`remove`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PolicySet {
    policies: BTreeMap<PolicyRef, Policy>,
}

// === impl PolicySet ===

impl PolicySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a policy; returns the previous one.
    pub fn upsert(&mut self, policy: Policy) -> Option<Policy> {
        self.policies.insert(policy.reference.clone(), policy)
    }

    pub fn remove(&mut self, reference: &PolicyRef) -> Option<Policy> {
        self.policies.remove(reference)
    }

    pub fn get(&self, reference: &PolicyRef) -> Option<&Policy> {
        self.policies.get(reference)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Every CIDR (and `except` prefix) the policies of `cluster` name: the prefixes that need
    /// a CIDR identity in the ipcache before the compiled policy can be enforced exactly
    /// (see `CidrIdentities`).
    pub fn cidr_prefixes(&self, cluster: &ClusterName) -> std::collections::BTreeSet<IpNet> {
        let mut out = std::collections::BTreeSet::new();
        for p in self.iter().filter(|p| &p.reference.cluster == cluster) {
            for s in &p.specs {
                for d in Direction::ALL {
                    let rules = s.direction(d);
                    for r in rules.allow.iter().chain(&rules.deny) {
                        if let Peers::List(peers) = &r.peers {
                            for peer in peers {
                                if let Peer::Cidr(c) = peer {
                                    out.insert(c.cidr);
                                    out.extend(c.except.iter().copied());
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl FromIterator<Policy> for PolicySet {
    fn from_iter<T: IntoIterator<Item = Policy>>(iter: T) -> Self {
        let mut set = PolicySet::new();
        for p in iter {
            set.upsert(p);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_prefixes_cover_exactly() {
        for (start, end) in [
            (0u16, 65535u16),
            (80, 80),
            (8000, 8100),
            (1, 65535),
            (0, 1023),
            (65535, 65535),
            (3, 17),
        ] {
            let r = PortRange { start, end };
            let prefixes = r.prefixes();
            let mut covered = 0u32;
            let mut next = start as u32;
            for (value, len) in &prefixes {
                let size = 1u32 << (16 - *len as u32);
                assert_eq!(*value as u32, next, "{r}: prefixes must be contiguous");
                assert_eq!(
                    *value as u32 % size,
                    0,
                    "{r}: prefix {value}/{len} misaligned"
                );
                next += size;
                covered += size;
            }
            assert_eq!(covered, end as u32 - start as u32 + 1, "{r}: {prefixes:?}");
        }
        assert_eq!(PortRange::ALL.prefixes(), vec![(0, 0)]);
        assert_eq!(PortRange::single(80).prefixes(), vec![(80, 16)]);
    }

    #[test]
    fn requirement_semantics_follow_kubernetes() {
        let not_in = Requirement {
            key: "app".into(),
            op: SelectorOp::NotIn(vec!["x".into()]),
        };
        assert!(not_in.matches_value(None), "NotIn matches an absent key");
        assert!(!not_in.matches_value(Some("x")));
        let exists = Requirement {
            key: "app".into(),
            op: SelectorOp::Exists,
        };
        assert!(exists.matches_value(Some("")));
        assert!(!exists.matches_value(None));
    }
}
