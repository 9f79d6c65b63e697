//! What a cluster exports to its peers (`service.cilium.io/shared`).
//!
//! A cluster publishes every global Service with its `shared` flag, because its own agents
//! use the local backends whatever the flag says. A Service that is not shared is presented
//! to a *peer* as absent: the gRPC edge sends a peer a delete for it (so a change to
//! `shared: "false"` reaches the peer as a delete), and [`select`](super::select) ignores
//! a remote copy that says it is not shared (input that did not pass through that edge).
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

/// Whether a global service published with `shared` is presented to `reader`: `false`
/// means the reader sees the service as absent.
pub fn service_presented(shared: bool, reader: Reader) -> bool {
    match reader {
        Reader::OwnCluster => true,
        Reader::Peer => shared,
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
        assert!(service_presented(true, Reader::Peer));
        assert!(!service_presented(false, Reader::Peer));
        assert!(service_presented(true, Reader::OwnCluster));
        assert!(service_presented(false, Reader::OwnCluster));
    }

    #[test]
    fn policies_stay_in_their_cluster() {
        assert!(policy_presented(Reader::OwnCluster));
        assert!(!policy_presented(Reader::Peer));
    }
}
