//! What a cluster exports to its peers (`service.cilium.io/global`, `service.cilium.io/shared`).
//!
//! A cluster publishes every Service with its `global` and `shared` flags, because its own
//! agents translate every ClusterIP (global or not, as Cilium's kube-proxy replacement does)
//! and use the local backends whatever `shared` says. A Service that is not global, or not
//! shared, is presented to a *peer* as absent: the gRPC edge sends a peer a delete for it (so
//! a change to `shared: "false"`, or the removal of the global annotation, reaches the peer
//! as a delete), and [`select`](super::select) ignores a remote copy that says it is not
//! exported (input that did not pass through that edge).
//!
//! Network policies are never exported (DESIGN.md section 14: a policy applies in the
//! cluster it was applied to, as in Cilium): [`policy_presented`] is false for a peer, for
//! the objects and their Synced markers alike, whatever kinds the peer asks for.

/// Who reads a cluster's published objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reader {
    /// The cluster's own agents, operators and apiserver replicas.
    OwnCluster,
    /// Another cluster of the mesh (its apiserver's importer, and through it its agents).
    Peer,
}

/// Whether a service published with `global` and `shared` is presented to `reader`:
/// `false` means the reader sees the service as absent. A peer sees only services that are
/// global and shared; the cluster's own readers see every service.
pub fn service_presented(global: bool, shared: bool, reader: Reader) -> bool {
    match reader {
        Reader::OwnCluster => true,
        Reader::Peer => global && shared,
    }
}

/// Whether a network policy of the serving cluster is presented to `reader`: only to the
/// cluster's own readers. A peer neither receives policies nor learns they exist.
pub fn policy_presented(reader: Reader) -> bool {
    match reader {
        Reader::OwnCluster => true,
        Reader::Peer => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_peers_lose_non_shared_services() {
        assert!(service_presented(true, true, Reader::Peer));
        assert!(!service_presented(true, false, Reader::Peer));
        assert!(service_presented(true, true, Reader::OwnCluster));
        assert!(service_presented(true, false, Reader::OwnCluster));
    }

    #[test]
    fn local_services_stay_in_their_cluster() {
        // A non-global Service goes to the cluster's own agents (their socket LB translates
        // it) and never to a peer, whatever its `shared` flag says.
        for shared in [true, false] {
            assert!(service_presented(false, shared, Reader::OwnCluster));
            assert!(!service_presented(false, shared, Reader::Peer));
        }
    }

    #[test]
    fn policies_stay_in_their_cluster() {
        assert!(policy_presented(Reader::OwnCluster));
        assert!(!policy_presented(Reader::Peer));
    }
}
