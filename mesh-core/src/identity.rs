//! Security identities (DESIGN.md section 4).
//!
//! An identity is `(cluster_id << 16) | local` with `local` in 256..=65535; values below 256
//! are reserved and shared by every cluster.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{ClusterId, ClusterName, Error};

pub const RESERVED_HOST: u32 = 1;
pub const RESERVED_WORLD: u32 = 2;
pub const RESERVED_REMOTE_NODE: u32 = 6;
/// First cluster-local identity value (values below are reserved).
pub const LOCAL_MIN: u32 = 256;
/// Last cluster-local identity value.
pub const LOCAL_MAX: u32 = 65535;

/// Label key carrying the namespace of a pod.
pub const LABEL_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Label key carrying the cluster of a pod.
pub const LABEL_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// The label Kubernetes puts on every Namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdentityId(pub u32);

// === impl IdentityId ===

impl IdentityId {
    /// Builds the identity `local` of `cluster`.
    pub fn new(cluster: ClusterId, local: u32) -> crate::Result<Self> {
        if !(LOCAL_MIN..=LOCAL_MAX).contains(&local) {
            return Err(Error::Invalid {
                what: format!("identity local value {local}"),
                reason: format!("must be in {LOCAL_MIN}..={LOCAL_MAX}"),
            });
        }
        Ok(Self(((cluster.get() as u32) << 16) | local))
    }

    pub fn is_reserved(self) -> bool {
        self.0 < LOCAL_MIN
    }

    /// The cluster ID encoded in the identity (0 for reserved identities).
    pub fn cluster_id(self) -> u32 {
        self.0 >> 16
    }

    pub fn local(self) -> u32 {
        self.0 & 0xffff
    }

    /// Checks that an identity published by `cluster` lies in that cluster's range.
    /// Reserved identities are accepted from any cluster.
    pub fn check_range(self, name: &ClusterName, cluster: ClusterId) -> crate::Result<()> {
        if self.is_reserved() {
            return Ok(());
        }
        let err = |reason| Error::IdentityOutOfRange {
            id: self.0,
            cluster: name.to_string(),
            cluster_id: cluster.get(),
            reason,
        };
        if self.cluster_id() != cluster.get() as u32 {
            return Err(err("its cluster bits name another cluster"));
        }
        if self.local() < LOCAL_MIN {
            return Err(err("its local part is in the reserved range"));
        }
        Ok(())
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The sorted label set of an identity, each `k8s:<key>=<value>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdentityLabels(BTreeSet<String>);

// === impl IdentityLabels ===

impl IdentityLabels {
    /// Builds the labels of a pod: its own labels plus namespace and cluster.
    pub fn for_pod<'a>(
        cluster: &ClusterName,
        namespace: &str,
        pod_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut set: BTreeSet<String> = pod_labels
            .into_iter()
            // Labels that change per pod instance would give every pod its own identity.
            .filter(|(k, _)| *k != "pod-template-hash" && *k != "controller-revision-hash")
            .map(|(k, v)| format!("k8s:{k}={v}"))
            .collect();
        set.insert(format!("k8s:{LABEL_NAMESPACE}={namespace}"));
        set.insert(format!("k8s:{LABEL_CLUSTER}={cluster}"));
        Self(set)
    }

    /// [`for_pod`](Self::for_pod) plus the labels of the pod's Namespace as
    /// `k8s:io.cilium.k8s.namespace.labels.<key>=<value>` (DESIGN.md section 14), so a
    /// namespaceSelector is a selector over identities in every cluster.
    /// `kubernetes.io/metadata.name=<namespace>` is always among them: Kubernetes sets it on
    /// every Namespace, and a pod seen before its Namespace still gets it.
    pub fn for_pod_in_namespace<'a>(
        cluster: &ClusterName,
        namespace: &str,
        namespace_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        pod_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut ids = Self::for_pod(cluster, namespace, pod_labels);
        let prefix = crate::policy::NAMESPACE_LABELS_PREFIX;
        ids.0
            .insert(format!("k8s:{prefix}{NAMESPACE_NAME_LABEL}={namespace}"));
        for (k, v) in namespace_labels {
            if k != NAMESPACE_NAME_LABEL {
                ids.0.insert(format!("k8s:{prefix}{k}={v}"));
            }
        }
        ids
    }

    /// Parses labels as stored (`k8s:key=value`), checking their form.
    pub fn from_strings(labels: impl IntoIterator<Item = String>) -> crate::Result<Self> {
        let mut set = BTreeSet::new();
        for l in labels {
            let Some(rest) = l.strip_prefix("k8s:") else {
                return Err(Error::InvalidLabel {
                    value: l,
                    reason: "must start with \"k8s:\"",
                });
            };
            if !rest.contains('=') {
                return Err(Error::InvalidLabel {
                    value: l,
                    reason: "must have the form k8s:<key>=<value>",
                });
            }
            set.insert(l);
        }
        Ok(Self(set))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of label `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find_map(|l| {
            let rest = l.strip_prefix("k8s:")?;
            let (k, v) = rest.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// A canonical string of the labels (sorted, `;`-joined): the input of the allocation
    /// index hash.
    pub fn canonical(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join(";")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_bits() {
        let c = ClusterId::new(3).unwrap();
        let id = IdentityId::new(c, 300).unwrap();
        assert_eq!(id.0, (3 << 16) | 300);
        assert_eq!(id.cluster_id(), 3);
        assert_eq!(id.local(), 300);
        assert!(IdentityId::new(c, 255).is_err());
        assert!(IdentityId::new(c, 65536).is_err());
    }

    #[test]
    fn identity_range_check() {
        let name = ClusterName::new("east").unwrap();
        let c = ClusterId::new(3).unwrap();
        assert!(IdentityId((3 << 16) | 256).check_range(&name, c).is_ok());
        assert!(IdentityId(RESERVED_WORLD).check_range(&name, c).is_ok());
        let err = IdentityId((4 << 16) | 256)
            .check_range(&name, c)
            .unwrap_err();
        assert!(err.to_string().contains("east"), "{err}");
        assert!(IdentityId((3 << 16) | 7).check_range(&name, c).is_err());
    }

    #[test]
    fn pod_labels_are_canonical() {
        let c = ClusterName::new("east").unwrap();
        let a = IdentityLabels::for_pod(&c, "ns", [("app", "x"), ("pod-template-hash", "abc")]);
        let b = IdentityLabels::for_pod(&c, "ns", [("app", "x"), ("pod-template-hash", "def")]);
        assert_eq!(a, b);
        assert_eq!(a.get(LABEL_NAMESPACE), Some("ns"));
        let n = IdentityLabels::for_pod_in_namespace(
            &c,
            "ns",
            [("team", "blue"), (NAMESPACE_NAME_LABEL, "ns")],
            [("app", "web")],
        );
        assert_eq!(
            n.get("io.cilium.k8s.namespace.labels.team"),
            Some("blue"),
            "{n:?}"
        );
        assert_eq!(
            n.get("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"),
            Some("ns")
        );
        assert_eq!(n.get("app"), Some("web"));
        // Without a known Namespace the name label is still there.
        let bare = IdentityLabels::for_pod_in_namespace(&c, "ns", [], [("app", "web")]);
        assert_eq!(
            bare.get("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"),
            Some("ns")
        );
        assert_eq!(a.get(LABEL_CLUSTER), Some("east"));
        assert_eq!(
            a.canonical(),
            "k8s:app=x;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=ns"
        );
    }
}
