//! Errors of the edge and what each caller may read: [`ServeError`], [`Authenticator`], the caller's access and the per-stream filter.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use mesh_core::select::{Reader, policy_presented, service_presented};
use mesh_proto::keys::own_readers_only;
use mesh_proto::pb::Kind;
use mesh_proto::request::RequestError;
use mesh_proto::tls::{AuthError, ServerTls};
use prost::Message;
use tonic::Status;

use crate::index::Obj;

/// Errors of the gRPC edge. Each maps to one specific `tonic::Status` code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no client identity on this connection")]
    NoConnInfo,
    #[error("{caller} may only read the data of cluster {serving}, not of cluster {requested}")]
    ForeignCluster {
        caller: String,
        serving: String,
        requested: String,
    },
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
    #[error("{caller} may not call {rpc}: only agents of this cluster may")]
    NotAnAgent { caller: String, rpc: &'static str },
    #[error(
        "{caller} may not report the status of node {node:?}: a node reports only its own status"
    )]
    NodeMismatch { caller: String, node: String },
    #[error("invalid node name {0:?} in status report")]
    InvalidNode(String),
    #[error("etcd {op} failed: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("malformed WatchRequest: {0}")]
    MalformedRequest(#[source] prost::DecodeError),
    #[error("malformed {what}: {source}")]
    MalformedMessage {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("too many watch streams: {limit} are open (--max-watch-streams); retry later")]
    TooManyStreams { limit: usize },
    #[error("re-decoding a watch message this server encoded: {0}")]
    Reencode(#[source] prost::DecodeError),
}

impl ServeError {
    /// A short label for the `auth_refusals` metric, if this is a refusal.
    pub(super) fn refusal_reason(&self) -> Option<&'static str> {
        Some(match self {
            ServeError::Auth(a) => match a {
                AuthError::NoCertificate { .. } => "no_certificate",
                AuthError::BadCertificate { .. } => "bad_certificate",
                AuthError::NoSpiffeId { .. } => "no_spiffe_id",
                AuthError::InvalidSpiffeId { .. } => "invalid_spiffe_id",
                AuthError::UnknownCluster { .. } => "unknown_cluster",
                AuthError::WrongCa { .. } => "wrong_ca",
                AuthError::ForeignAgent { .. } => "foreign_agent",
            },
            ServeError::NoConnInfo => "no_conn_info",
            ServeError::ForeignCluster { .. } => "foreign_cluster",
            ServeError::NotAnAgent { .. } => "not_an_agent",
            ServeError::NodeMismatch { .. } => "node_mismatch",
            _ => return None,
        })
    }
}

impl ServeError {
    /// A refusal of [`mesh_proto::request`]'s validation, naming the caller where it matters.
    pub(super) fn from_request(e: RequestError, access: &Access) -> Self {
        match e {
            RequestError::InvalidCluster(e) => ServeError::InvalidCluster(e),
            RequestError::InvalidKind(k) => ServeError::InvalidKind(k),
            RequestError::InvalidRevision(r) => ServeError::InvalidRevision(r),
            RequestError::ForeignCluster { serving, requested } => ServeError::ForeignCluster {
                caller: access.who().to_owned(),
                serving,
                requested,
            },
            RequestError::InvalidNode(n) => ServeError::InvalidNode(n),
            RequestError::NodeMismatch { node, .. } => ServeError::NodeMismatch {
                caller: access.who().to_owned(),
                node,
            },
        }
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Auth(a) => a.into(),
            ServeError::NoConnInfo => Status::unauthenticated(e.to_string()),
            ServeError::ForeignCluster { .. }
            | ServeError::NotAnAgent { .. }
            | ServeError::NodeMismatch { .. } => Status::permission_denied(e.to_string()),
            ServeError::InvalidCluster(_)
            | ServeError::InvalidKind(_)
            | ServeError::InvalidRevision(_)
            | ServeError::InvalidNode(_)
            | ServeError::MalformedRequest(_)
            | ServeError::MalformedMessage { .. } => Status::invalid_argument(e.to_string()),
            ServeError::TooManyStreams { .. } => Status::resource_exhausted(e.to_string()),
            // Our own bytes did not decode: a bug here, not the caller's.
            ServeError::Reencode(_) => Status::internal(e.to_string()),
            ServeError::Etcd { .. } | ServeError::ShuttingDown => {
                Status::unavailable(e.to_string())
            }
        }
    }
}

/// How callers are identified.
#[derive(Clone)]
pub enum Authenticator {
    /// Mutual TLS: the caller is read from its certificate.
    Tls(Arc<ServerTls>),
    /// `--insecure` on loopback: every caller is treated as an agent of this cluster whose
    /// node is whatever it reports.
    Insecure,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Tls(_) => f.write_str("Tls"),
            Authenticator::Insecure => f.write_str("Insecure"),
        }
    }
}

/// The caller's access, relative to the serving cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Access {
    /// An agent (node known under TLS), a replica, or an insecure caller: reads everything.
    Local {
        who: String,
        node: Option<String>,
        agent: bool,
    },
    /// The apiserver of another cluster.
    Peer { who: String },
}

impl Access {
    pub(crate) fn who(&self) -> &str {
        match self {
            Access::Local { who, .. } | Access::Peer { who } => who,
        }
    }

    pub(super) fn role_label(&self) -> &'static str {
        match self {
            Access::Local { agent: true, .. } => "agent",
            Access::Local { .. } => "replica",
            Access::Peer { .. } => "peer",
        }
    }
}

/// What one stream reads.
#[derive(Debug, Clone)]
pub(super) struct StreamFilter {
    /// `None` = every cluster.
    pub(super) clusters: Option<BTreeSet<String>>,
    /// Empty = every kind.
    pub(super) kinds: BTreeSet<i32>,
    /// Who reads: a peer sees non-global and `shared: false` services as absent
    /// ([`service_presented`]).
    pub(super) reader: Reader,
}

impl StreamFilter {
    /// Whether the stream carries objects and Synced markers of (cluster, kind). A peer
    /// never gets policies or link states, even when it asks for the kind
    /// ([`policy_presented`], [`own_readers_only`]).
    pub(super) fn accepts(&self, cluster: &str, kind: Kind) -> bool {
        self.clusters.as_ref().is_none_or(|c| c.contains(cluster))
            && (self.kinds.is_empty() || self.kinds.contains(&(kind as i32)))
            && (!own_readers_only(kind) || policy_presented(self.reader))
    }

    /// Whether the reader sees `obj` as it is (not a service the reader must see as absent).
    pub(super) fn presented(&self, obj: &Obj) -> bool {
        obj.service_flags
            .is_none_or(|(global, shared)| service_presented(global, shared, self.reader))
    }

    /// The encoded event as this stream sees it: `None` when filtered out; a delete when
    /// the reader must not see the object (the only case that encodes anything per stream).
    pub(super) fn present<'a>(&self, obj: &'a Obj) -> Option<Cow<'a, [u8]>> {
        if !self.accepts(
            &obj.cluster,
            Kind::try_from(obj.kind).unwrap_or(Kind::Unspecified),
        ) {
            return None;
        }
        if !self.presented(obj) {
            let mut ev = obj.event();
            ev.value = None;
            return Some(Cow::Owned(ev.encode_to_vec()));
        }
        Some(Cow::Borrowed(&obj.wire))
    }
}
