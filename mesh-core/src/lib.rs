//! Domain model and pure logic of mesh (DESIGN.md sections 4, 5 and 14).
//!
//! Nothing in this crate performs IO: no async runtime, no Kubernetes, gRPC, etcd or eBPF
//! types. Adapters convert their wire and storage types to and from these.

pub mod annotations;
pub mod backoff;
pub mod cidr;
pub mod duration;
pub mod health;
pub mod identity;
pub mod model;
pub mod names;
pub mod policy;
pub mod select;
pub mod validate;

pub use backoff::{Backoff, Jitter, Retries};
pub use duration::{DurationError, parse_duration};
pub use identity::{IdentityId, IdentityLabels};
pub use model::{
    Affinity, Backend, BackendConditions, ClusterConfig, Endpoint, GlobalService, Node, Protocol,
    ServicePort, TrafficPolicy,
};
pub use names::{ClusterId, ClusterName};

/// Errors raised when a value violates a domain rule. Each message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidClusterName { name: String, reason: &'static str },
    #[error("invalid cluster id {id}: must be in 1..=255 (0 means not in a mesh)")]
    InvalidClusterId { id: u32 },
    #[error("identity {id} is outside the range of cluster {cluster} (id {cluster_id}): {reason}")]
    IdentityOutOfRange {
        id: u32,
        cluster: String,
        cluster_id: u8,
        reason: &'static str,
    },
    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr { value: String, reason: String },
    #[error("invalid IP address {value:?}")]
    InvalidIp { value: String },
    #[error("invalid port {value} in {context}: must be in 1..=65535")]
    InvalidPort { value: u32, context: String },
    #[error("invalid protocol {value:?}: expected TCP, UDP or SCTP")]
    InvalidProtocol { value: String },
    #[error("invalid label {value:?}: {reason}")]
    InvalidLabel { value: String, reason: &'static str },
    #[error("invalid object {what}: {reason}")]
    Invalid { what: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
