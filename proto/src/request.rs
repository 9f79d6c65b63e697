//! Validation of the requests a mesh-apiserver receives, as pure functions: the gRPC edge
//! (mesh-apiserver's `grpc`) calls them with the caller it authenticated, and the fuzz
//! targets call them with arbitrary messages.

use std::collections::BTreeSet;

use mesh_core::ClusterName;
use mesh_core::select::Reader;

use crate::pb::{self, Kind};

/// Why a request is refused. Each names the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid cluster name in request: {0}")]
    InvalidCluster(#[source] mesh_core::Error),
    #[error(
        "unknown kind {0} in request: expected one of config, node, identity, endpoint, service, policy, link"
    )]
    InvalidKind(i32),
    #[error(
        "invalid resume_revision {0}: must be 0 (snapshot) or a revision received from this server"
    )]
    InvalidRevision(i64),
    /// A peer asked for another cluster than the serving one.
    #[error("a peer may only read the data of cluster {serving}, not of cluster {requested}")]
    ForeignCluster { serving: String, requested: String },
    #[error("invalid node name {0:?} in status report")]
    InvalidNode(String),
    /// An agent reported the status of another node than its certificate's.
    #[error("a node reports only its own status: certificate of node {cert:?}, report of {node:?}")]
    NodeMismatch { cert: String, node: String },
}

/// What one watch stream reads, from a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchScope {
    /// `None` = every cluster.
    pub clusters: Option<BTreeSet<String>>,
    /// Empty = every kind; never `Unspecified` or an unknown number.
    pub kinds: BTreeSet<i32>,
    pub reader: Reader,
}

/// Validates a `WatchRequest` of `reader` to the apiserver of cluster `local`: a peer reads
/// only `local`, whatever it asks (asking for another cluster is refused); clusters must be
/// valid names, kinds known, the resume revision not negative.
pub fn watch_scope(
    local: &str,
    reader: Reader,
    req: &pb::WatchRequest,
) -> Result<WatchScope, RequestError> {
    if req.resume_revision < 0 {
        return Err(RequestError::InvalidRevision(req.resume_revision));
    }
    let mut clusters = BTreeSet::new();
    for c in &req.clusters {
        let name = ClusterName::new(c.clone()).map_err(RequestError::InvalidCluster)?;
        clusters.insert(name.to_string());
    }
    let mut kinds = BTreeSet::new();
    for k in &req.kinds {
        match Kind::try_from(*k) {
            Ok(Kind::Unspecified) | Err(_) => return Err(RequestError::InvalidKind(*k)),
            Ok(kind) => {
                kinds.insert(kind as i32);
            }
        }
    }
    let clusters = match reader {
        Reader::OwnCluster => (!clusters.is_empty()).then_some(clusters),
        Reader::Peer => {
            if let Some(other) = clusters.iter().find(|c| c.as_str() != local) {
                return Err(RequestError::ForeignCluster {
                    serving: local.to_owned(),
                    requested: other.clone(),
                });
            }
            Some(BTreeSet::from([local.to_owned()]))
        }
    };
    Ok(WatchScope {
        clusters,
        kinds,
        reader,
    })
}

/// Validates an agent's status report: `cert_node` is the node named by the caller's
/// certificate (`None` for an insecure loopback caller, which may report any node).
pub fn check_report(cert_node: Option<&str>, report: &pb::AgentStatus) -> Result<(), RequestError> {
    let node = &report.node;
    if let Some(cert) = cert_node
        && cert != node
    {
        return Err(RequestError::NodeMismatch {
            cert: cert.to_owned(),
            node: node.clone(),
        });
    }
    if node.is_empty() || node.contains('/') || node.len() > 253 {
        return Err(RequestError::InvalidNode(node.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(clusters: &[&str], kinds: &[i32], resume: i64) -> pb::WatchRequest {
        pb::WatchRequest {
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            kinds: kinds.to_vec(),
            resume_revision: resume,
            ..Default::default()
        }
    }

    #[test]
    fn peers_read_only_the_serving_cluster() {
        let s = watch_scope("west", Reader::Peer, &req(&[], &[], 0)).unwrap();
        assert_eq!(s.clusters, Some(BTreeSet::from(["west".to_owned()])));
        let e = watch_scope("west", Reader::Peer, &req(&["east"], &[], 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a peer may only read the data of cluster west, not of cluster east"
        );
        let s = watch_scope("west", Reader::OwnCluster, &req(&[], &[], 0)).unwrap();
        assert_eq!(s.clusters, None);
    }

    #[test]
    fn malformed_requests_name_the_value() {
        let e = watch_scope("west", Reader::OwnCluster, &req(&[], &[0], 0)).unwrap_err();
        assert_eq!(e, RequestError::InvalidKind(0));
        let e = watch_scope("west", Reader::OwnCluster, &req(&[], &[99], 0)).unwrap_err();
        assert!(e.to_string().contains("99"), "{e}");
        let e = watch_scope("west", Reader::OwnCluster, &req(&["East!"], &[], 0)).unwrap_err();
        assert!(e.to_string().contains("East!"), "{e}");
        let e = watch_scope("west", Reader::OwnCluster, &req(&[], &[], -1)).unwrap_err();
        assert_eq!(e, RequestError::InvalidRevision(-1));
    }

    #[test]
    fn reports_are_for_the_callers_node() {
        let report = |node: &str| pb::AgentStatus {
            node: node.into(),
            ..Default::default()
        };
        assert!(check_report(Some("n1"), &report("n1")).is_ok());
        assert!(check_report(None, &report("n2")).is_ok());
        assert!(matches!(
            check_report(Some("n1"), &report("n2")),
            Err(RequestError::NodeMismatch { .. })
        ));
        for bad in ["", "a/b", &"x".repeat(254)] {
            assert_eq!(
                check_report(None, &report(bad)),
                Err(RequestError::InvalidNode(bad.to_owned()))
            );
        }
    }
}
