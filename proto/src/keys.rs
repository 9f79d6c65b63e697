//! The etcd key layout of DESIGN.md section 6, in one place.
//!
//! ```text
//! <prefix>clusters/<cluster>/config
//! <prefix>clusters/<cluster>/nodes/<node>
//! <prefix>clusters/<cluster>/identities/<numeric id>
//! <prefix>clusters/<cluster>/endpoints/<ip>
//! <prefix>clusters/<cluster>/services/<namespace>/<name>
//! <prefix>clusters/<cluster>/policies/<policy kind>/<namespace>/<name>   (own readers only)
//! <prefix>clusters/<cluster>/link          (a peer's link state, own readers only)
//! <prefix>clusters/<cluster>/synced/<kind>
//! <prefix>peers/<cluster>/status
//! <prefix>identity-index/<hash of labels>
//! <prefix>agents/<node>
//! <prefix>leader
//! ```
//!
//! Values under `clusters/` are the protobuf messages of `pb` for their kind
//! (`SyncedMarker` for `synced/`).

use mesh_core::policy::PolicyKind;

use crate::pb::Kind;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "mesh/v1/";

/// The path segment of a kind under `clusters/<cluster>/`.
pub fn kind_segment(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Config => "config",
        Kind::Node => "nodes",
        Kind::Identity => "identities",
        Kind::Endpoint => "endpoints",
        Kind::Service => "services",
        Kind::Policy => "policies",
        Kind::Link => "link",
        Kind::Unspecified => return None,
    })
}

/// The kind named by a path segment (`nodes`, `services`, ...).
pub fn kind_from_segment(seg: &str) -> Option<Kind> {
    Some(match seg {
        "config" => Kind::Config,
        "nodes" => Kind::Node,
        "identities" => Kind::Identity,
        "endpoints" => Kind::Endpoint,
        "services" => Kind::Service,
        "policies" => Kind::Policy,
        "link" => Kind::Link,
        _ => return None,
    })
}

/// The kinds every cluster publishes *and its peers import*, in the order a consumer should
/// apply a snapshot (config first, services last so their backends' identities and nodes
/// are known). A peer is synced once it has sent the markers of all of them.
pub const ALL_KINDS: [Kind; 5] = [
    Kind::Config,
    Kind::Node,
    Kind::Identity,
    Kind::Endpoint,
    Kind::Service,
];

/// Kinds a cluster publishes for its own readers only (agents, operators, its apiserver
/// replicas): never served to a peer (`mesh_core::select::policy_presented`), never imported.
pub const LOCAL_ONLY_KINDS: [Kind; 1] = [Kind::Policy];

/// Whether a kind is for the serving cluster's own readers only: its policies, and the link
/// state of its peers (written by its importer under `clusters/<peer>/link`). Neither is
/// served to a peer nor imported from one.
pub fn own_readers_only(kind: Kind) -> bool {
    matches!(kind, Kind::Policy | Kind::Link)
}

/// Whether a kind is one object per cluster whose key has no name segment
/// (`clusters/<c>/config`, `clusters/<c>/link`).
pub fn is_singleton(kind: Kind) -> bool {
    matches!(kind, Kind::Config | Kind::Link)
}

/// Every kind a cluster publishes under its own `clusters/<c>/`: [`ALL_KINDS`] then
/// [`LOCAL_ONLY_KINDS`]. The publisher writes a Synced marker for each.
pub const PUBLISHED_KINDS: [Kind; 6] = [
    Kind::Config,
    Kind::Node,
    Kind::Identity,
    Kind::Endpoint,
    Kind::Service,
    Kind::Policy,
];

/// The path segment of a policy kind inside a policy's name (the plural resource name).
pub fn policy_kind_segment(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::NetworkPolicy => "networkpolicies",
        PolicyKind::CiliumNetworkPolicy => "ciliumnetworkpolicies",
        PolicyKind::CiliumClusterwideNetworkPolicy => "ciliumclusterwidenetworkpolicies",
    }
}

fn policy_kind_from_segment(seg: &str) -> Option<PolicyKind> {
    [
        PolicyKind::NetworkPolicy,
        PolicyKind::CiliumNetworkPolicy,
        PolicyKind::CiliumClusterwideNetworkPolicy,
    ]
    .into_iter()
    .find(|k| policy_kind_segment(*k) == seg)
}

/// The namespace segment of a clusterwide policy: `_` is not a valid namespace name, so it
/// cannot collide with one, and keeps every policy name three segments long.
pub const CLUSTERWIDE_NAMESPACE: &str = "_";

/// A policy's name within (cluster, `Kind::Policy`): `<policy kind>/<namespace>/<name>`.
pub fn policy_name(kind: PolicyKind, namespace: Option<&str>, name: &str) -> String {
    format!(
        "{}/{}/{name}",
        policy_kind_segment(kind),
        namespace.unwrap_or(CLUSTERWIDE_NAMESPACE)
    )
}

/// Parses a policy name made by [`policy_name`]: kind, namespace (None for clusterwide),
/// name. A namespaced kind without a namespace, or a clusterwide one with one, is `None`.
pub fn parse_policy_name(s: &str) -> Option<(PolicyKind, Option<&str>, &str)> {
    let mut parts = s.split('/');
    let (kind, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ns.is_empty() || name.is_empty() {
        return None;
    }
    let kind = policy_kind_from_segment(kind)?;
    let ns = (ns != CLUSTERWIDE_NAMESPACE).then_some(ns);
    (kind.is_namespaced() == ns.is_some()).then_some((kind, ns, name))
}

/// A parsed key under `<prefix>clusters/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterKey {
    /// An object: `clusters/<cluster>/<kind>/<name>` (`name` is empty for the config).
    Object {
        cluster: String,
        kind: Kind,
        name: String,
    },
    /// `clusters/<cluster>/synced/<kind>`
    Synced { cluster: String, kind: Kind },
}

/// Builds and parses keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

// === impl Keys ===

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        let mut prefix = prefix.into();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>clusters/`
    pub fn clusters_prefix(&self) -> String {
        format!("{}clusters/", self.prefix)
    }

    /// `<prefix>clusters/<cluster>/` (trailing slash: never matches a cluster whose name
    /// starts with this one's).
    pub fn cluster_prefix(&self, cluster: &str) -> String {
        format!("{}clusters/{cluster}/", self.prefix)
    }

    /// `<prefix>clusters/<cluster>/<kind>/` (or `.../config`, `.../link` for the singletons).
    pub fn kind_prefix(&self, cluster: &str, kind: Kind) -> String {
        let seg = kind_segment(kind).expect("a concrete kind");
        if is_singleton(kind) {
            format!("{}clusters/{cluster}/{seg}", self.prefix)
        } else {
            format!("{}clusters/{cluster}/{seg}/", self.prefix)
        }
    }

    pub fn object(&self, cluster: &str, kind: Kind, name: &str) -> String {
        if is_singleton(kind) {
            self.kind_prefix(cluster, kind)
        } else {
            format!("{}{name}", self.kind_prefix(cluster, kind))
        }
    }

    pub fn synced(&self, cluster: &str, kind: Kind) -> String {
        let seg = kind_segment(kind).expect("a concrete kind");
        format!("{}clusters/{cluster}/synced/{seg}", self.prefix)
    }

    pub fn peer_status(&self, cluster: &str) -> String {
        format!("{}peers/{cluster}/status", self.prefix)
    }

    pub fn peers_prefix(&self) -> String {
        format!("{}peers/", self.prefix)
    }

    pub fn identity_index(&self, labels_hash: &str) -> String {
        format!("{}identity-index/{labels_hash}", self.prefix)
    }

    pub fn identity_index_prefix(&self) -> String {
        format!("{}identity-index/", self.prefix)
    }

    pub fn agent(&self, node: &str) -> String {
        format!("{}agents/{node}", self.prefix)
    }

    pub fn agents_prefix(&self) -> String {
        format!("{}agents/", self.prefix)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// Parses a key under `<prefix>clusters/`. Returns `None` for keys outside it or of an
    /// unknown shape (which readers skip with a log line).
    pub fn parse(&self, key: &str) -> Option<ClusterKey> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("clusters/")?;
        let (cluster, rest) = rest.split_once('/')?;
        if cluster.is_empty() {
            return None;
        }
        if let Some(kind) = kind_from_segment(rest).filter(|k| is_singleton(*k)) {
            return Some(ClusterKey::Object {
                cluster: cluster.into(),
                kind,
                name: String::new(),
            });
        }
        let (seg, name) = rest.split_once('/')?;
        if name.is_empty() {
            return None;
        }
        if seg == "synced" {
            return Some(ClusterKey::Synced {
                cluster: cluster.into(),
                // The link state has no Synced marker.
                kind: kind_from_segment(name).filter(|k| *k != Kind::Link)?,
            });
        }
        let kind = kind_from_segment(seg)?;
        if is_singleton(kind) {
            return None;
        }
        if kind == Kind::Service && name.split('/').count() != 2 {
            return None;
        }
        if kind == Kind::Policy && parse_policy_name(name).is_none() {
            return None;
        }
        Some(ClusterKey::Object {
            cluster: cluster.into(),
            kind,
            name: name.into(),
        })
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let k = Keys::default();
        for kind in PUBLISHED_KINDS {
            let name = match kind {
                Kind::Config => "",
                Kind::Service => "ns/svc",
                Kind::Policy => "networkpolicies/ns/deny-all",
                _ => "x",
            };
            let key = k.object("east", kind, name);
            assert_eq!(
                k.parse(&key),
                Some(ClusterKey::Object {
                    cluster: "east".into(),
                    kind,
                    name: name.into()
                }),
                "{key}"
            );
            let s = k.synced("east", kind);
            assert_eq!(
                k.parse(&s),
                Some(ClusterKey::Synced {
                    cluster: "east".into(),
                    kind
                })
            );
        }
        assert_eq!(
            k.object("a", Kind::Endpoint, "10.0.0.1"),
            "mesh/v1/clusters/a/endpoints/10.0.0.1"
        );
        assert_eq!(k.object("a", Kind::Config, ""), "mesh/v1/clusters/a/config");
        assert_eq!(k.object("a", Kind::Link, ""), "mesh/v1/clusters/a/link");
        assert_eq!(
            k.parse("mesh/v1/clusters/a/link"),
            Some(ClusterKey::Object {
                cluster: "a".into(),
                kind: Kind::Link,
                name: String::new()
            })
        );
    }

    #[test]
    fn policy_names_roundtrip() {
        for (kind, ns) in [
            (PolicyKind::NetworkPolicy, Some("shop")),
            (PolicyKind::CiliumNetworkPolicy, Some("default")),
            (PolicyKind::CiliumClusterwideNetworkPolicy, None),
        ] {
            let n = policy_name(kind, ns, "p1");
            assert_eq!(parse_policy_name(&n), Some((kind, ns, "p1")), "{n}");
        }
        assert_eq!(
            Keys::default().object(
                "a",
                Kind::Policy,
                &policy_name(PolicyKind::CiliumClusterwideNetworkPolicy, None, "x")
            ),
            "mesh/v1/clusters/a/policies/ciliumclusterwidenetworkpolicies/_/x"
        );
    }

    #[test]
    fn rejects_unknown_shapes() {
        let k = Keys::default();
        for bad in [
            "other/clusters/a/config",
            "mesh/v1/clusters/a/unknown/x",
            "mesh/v1/clusters/a/services/only-one",
            "mesh/v1/clusters/a/nodes/",
            "mesh/v1/clusters//config",
            "mesh/v1/clusters/a/synced/bogus",
            "mesh/v1/clusters/a/synced/link",
            "mesh/v1/clusters/a/link/x",
            "mesh/v1/clusters/a/policies/ns/name",
            "mesh/v1/clusters/a/policies/bogus/ns/name",
            "mesh/v1/clusters/a/policies/networkpolicies/_/name",
            "mesh/v1/clusters/a/policies/ciliumclusterwidenetworkpolicies/ns/name",
            "mesh/v1/clusters/a/policies/networkpolicies/ns/name/extra",
        ] {
            assert_eq!(k.parse(bad), None, "{bad}");
        }
    }
}
