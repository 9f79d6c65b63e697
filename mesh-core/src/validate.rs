//! Mesh-level checks of cluster configurations (DESIGN.md section 10): used by the peer
//! importer before it imports a peer's data, and by `meshctl connect` before it writes
//! anything.
//!
//! [`validate_cluster_config`] checks one configuration on its own; [`check_compatible`] and
//! [`check_joins`] check that two clusters can be in the same mesh. Every message names both
//! clusters and the values involved, so an operator can tell which side to change.

use std::fmt;

use ipnet::IpNet;

use crate::cidr::{first_overlap, overlaps};
use crate::{ClusterConfig, ClusterId, ClusterName, Error};

/// Checks one cluster's configuration: at least one pod CIDR, every CIDR without host bits,
/// no two pod CIDRs overlapping, the service CIDR (if any) not overlapping a pod CIDR,
/// capability names well formed.
pub fn validate_cluster_config(c: &ClusterConfig) -> crate::Result<()> {
    let invalid = |reason: String| Error::Invalid {
        what: format!("cluster config of {:?} (id {})", c.name.as_str(), c.id),
        reason,
    };
    if c.pod_cidrs.is_empty() {
        return Err(invalid("no pod CIDR: a cluster needs at least one".into()));
    }
    let all = c
        .pod_cidrs
        .iter()
        .map(|n| ("pod", n))
        .chain(c.service_cidr.iter().map(|n| ("service", n)));
    for (kind, net) in all {
        if net.trunc() != *net {
            return Err(invalid(format!(
                "{kind} CIDR {net} has host bits set (did you mean {}?)",
                net.trunc()
            )));
        }
    }
    for (i, a) in c.pod_cidrs.iter().enumerate() {
        if let Some(b) = c.pod_cidrs[i + 1..].iter().find(|b| overlaps(a, b)) {
            return Err(invalid(format!("pod CIDRs {a} and {b} overlap")));
        }
    }
    if let Some(svc) = &c.service_cidr
        && let Some(pod) = c.pod_cidrs.iter().find(|p| overlaps(p, svc))
    {
        return Err(invalid(format!(
            "service CIDR {svc} overlaps pod CIDR {pod}"
        )));
    }
    for cap in &c.capabilities {
        if cap.is_empty() || cap.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Err(invalid(format!(
                "capability {cap:?} must be non-empty, without whitespace"
            )));
        }
    }
    Ok(())
}

/// Why two clusters cannot be in the same mesh. `candidate` is the cluster asking to join,
/// `existing` the one already connected (possibly the local cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    DuplicateName {
        name: ClusterName,
        candidate_id: ClusterId,
        existing_id: ClusterId,
    },
    DuplicateId {
        id: ClusterId,
        candidate: ClusterName,
        existing: ClusterName,
    },
    OverlappingPodCidrs {
        candidate: ClusterName,
        candidate_cidr: IpNet,
        existing: ClusterName,
        existing_cidr: IpNet,
    },
}

// === impl Conflict ===

impl Conflict {
    /// The cluster already in the mesh that the candidate collides with.
    pub fn existing(&self) -> &ClusterName {
        match self {
            Conflict::DuplicateName { name, .. } => name,
            Conflict::DuplicateId { existing, .. } => existing,
            Conflict::OverlappingPodCidrs { existing, .. } => existing,
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::DuplicateName {
                name,
                candidate_id,
                existing_id,
            } => write!(
                f,
                "cluster {:?} (id {candidate_id}) has the same name as cluster {:?} (id {existing_id}): \
                 every cluster of a mesh needs its own name",
                name.as_str(),
                name.as_str()
            ),
            Conflict::DuplicateId {
                id,
                candidate,
                existing,
            } => write!(
                f,
                "cluster {:?} (id {id}) has the same cluster id as {:?} (id {id})",
                candidate.as_str(),
                existing.as_str()
            ),
            Conflict::OverlappingPodCidrs {
                candidate,
                candidate_cidr,
                existing,
                existing_cidr,
            } => write!(
                f,
                "pod CIDR {candidate_cidr} of cluster {:?} overlaps {existing_cidr} of cluster {:?}",
                candidate.as_str(),
                existing.as_str()
            ),
        }
    }
}

impl std::error::Error for Conflict {}

/// Checks that `candidate` can be in a mesh with `existing`: different names, different
/// ids, no overlapping pod CIDRs. Service CIDRs may overlap: ClusterIPs never leave their
/// cluster.
pub fn check_compatible(
    candidate: &ClusterConfig,
    existing: &ClusterConfig,
) -> Result<(), Conflict> {
    if candidate.name == existing.name {
        return Err(Conflict::DuplicateName {
            name: candidate.name.clone(),
            candidate_id: candidate.id,
            existing_id: existing.id,
        });
    }
    if candidate.id == existing.id {
        return Err(Conflict::DuplicateId {
            id: candidate.id,
            candidate: candidate.name.clone(),
            existing: existing.name.clone(),
        });
    }
    if let Some((a, b)) = first_overlap(&candidate.pod_cidrs, &existing.pod_cidrs) {
        return Err(Conflict::OverlappingPodCidrs {
            candidate: candidate.name.clone(),
            candidate_cidr: *a,
            existing: existing.name.clone(),
            existing_cidr: *b,
        });
    }
    Ok(())
}

/// Checks `candidate` against every cluster of the mesh (`connected`, which includes the
/// local cluster) and returns the first conflict, in the order of `connected`.
///
/// `connected` must not hold an earlier configuration of the candidate itself: to
/// re-check a peer whose configuration changed, leave its old entry out.
pub fn check_joins(candidate: &ClusterConfig, connected: &[ClusterConfig]) -> Result<(), Conflict> {
    connected
        .iter()
        .try_for_each(|c| check_compatible(candidate, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, id: u32, pods: &[&str], svc: Option<&str>) -> ClusterConfig {
        ClusterConfig {
            name: ClusterName::new(name).unwrap(),
            id: ClusterId::new(id).unwrap(),
            pod_cidrs: pods.iter().map(|p| p.parse().unwrap()).collect(),
            service_cidr: svc.map(|s| s.parse().unwrap()),
            capabilities: vec!["services".into()],
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn valid_configs() {
        for c in [
            cfg("east", 1, &["10.1.0.0/16"], Some("10.96.0.0/12")),
            cfg(
                "east",
                1,
                &["10.1.0.0/16", "10.2.0.0/16", "fd00:1::/64"],
                None,
            ),
            cfg("east", 255, &["10.1.0.0/16"], Some("fd00:96::/108")),
        ] {
            validate_cluster_config(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
    }

    #[test]
    fn invalid_configs() {
        let mut caps = cfg("east", 1, &["10.1.0.0/16"], None);
        caps.capabilities.push("two words".into());
        let mut empty_cap = cfg("east", 1, &["10.1.0.0/16"], None);
        empty_cap.capabilities.push(String::new());
        let cases = [
            (cfg("east", 1, &[], None), "no pod CIDR"),
            (
                cfg("east", 1, &["10.1.0.1/16"], None),
                "pod CIDR 10.1.0.1/16 has host bits set (did you mean 10.1.0.0/16?)",
            ),
            (
                cfg("east", 1, &["10.1.0.0/16"], Some("10.96.0.1/12")),
                "service CIDR 10.96.0.1/12 has host bits set",
            ),
            (
                cfg("east", 1, &["10.1.0.0/16", "10.1.128.0/17"], None),
                "pod CIDRs 10.1.0.0/16 and 10.1.128.0/17 overlap",
            ),
            (
                cfg("east", 1, &["10.1.0.0/16", "10.1.0.0/16"], None),
                "pod CIDRs 10.1.0.0/16 and 10.1.0.0/16 overlap",
            ),
            (
                cfg("east", 1, &["10.0.0.0/8"], Some("10.96.0.0/12")),
                "service CIDR 10.96.0.0/12 overlaps pod CIDR 10.0.0.0/8",
            ),
            (caps, "capability \"two words\""),
            (empty_cap, "capability \"\""),
        ];
        for (c, want) in cases {
            let err = validate_cluster_config(&c).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(
                err.contains("\"east\" (id 1)"),
                "{err:?} should name the cluster"
            );
        }
    }

    #[test]
    fn conflicts() {
        let east = cfg("east", 2, &["10.1.128.0/17"], Some("10.96.0.0/12"));
        let cases = [
            (
                cfg("west", 2, &["10.2.0.0/16"], None),
                r#"cluster "west" (id 2) has the same cluster id as "east" (id 2)"#,
            ),
            (
                cfg("west", 3, &["10.2.0.0/16", "10.1.0.0/16"], None),
                r#"pod CIDR 10.1.0.0/16 of cluster "west" overlaps 10.1.128.0/17 of cluster "east""#,
            ),
            (
                cfg("east", 3, &["10.2.0.0/16"], None),
                r#"cluster "east" (id 3) has the same name as cluster "east" (id 2): every cluster of a mesh needs its own name"#,
            ),
        ];
        for (candidate, want) in cases {
            let err = check_compatible(&candidate, &east).unwrap_err();
            assert_eq!(err.to_string(), want);
            assert_eq!(err.existing().as_str(), "east");
        }
        // Overlapping service CIDRs are fine: ClusterIPs stay in their cluster.
        let west = cfg("west", 3, &["10.2.0.0/16"], Some("10.96.0.0/12"));
        assert_eq!(check_compatible(&west, &east), Ok(()));
        // Different address families never overlap.
        let v6 = cfg("v6", 4, &["fd00::/8"], None);
        assert_eq!(check_compatible(&v6, &east), Ok(()));
    }

    #[test]
    fn joins_reports_the_first_conflict() {
        let local = cfg("local", 1, &["10.1.0.0/16"], None);
        let east = cfg("east", 2, &["10.2.0.0/16"], None);
        let west = cfg("west", 3, &["10.3.0.0/16"], None);
        let connected = [local.clone(), east.clone(), west.clone()];
        assert_eq!(
            check_joins(&cfg("north", 4, &["10.4.0.0/16"], None), &connected),
            Ok(())
        );
        assert_eq!(
            check_joins(&cfg("north", 4, &["10.4.0.0/16"], None), &[]),
            Ok(())
        );

        let bad = cfg("north", 3, &["10.1.5.0/24"], None);
        let err = check_joins(&bad, &connected).unwrap_err();
        // The overlap with the local cluster comes first.
        assert_eq!(
            err.to_string(),
            r#"pod CIDR 10.1.5.0/24 of cluster "north" overlaps 10.1.0.0/16 of cluster "local""#
        );
        let err = check_joins(&bad, &[east, west]).unwrap_err();
        assert!(matches!(err, Conflict::DuplicateId { .. }), "{err}");
        let err = check_joins(&cfg("local", 9, &["10.9.0.0/16"], None), &connected).unwrap_err();
        assert!(matches!(err, Conflict::DuplicateName { .. }), "{err}");
    }
}
