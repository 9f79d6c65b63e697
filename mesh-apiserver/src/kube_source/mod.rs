//! The Kubernetes side of the publisher: watchers for Services, EndpointSlices, Pods, Nodes,
//! Namespaces and network policies (NetworkPolicy, CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy), the slim objects they produce, the synchronous cluster model they feed,
//! and the pure functions that build mesh-core objects out of that model.
//!
//! Objects are watched as [`DynamicObject`]s and decoded one by one into the typed
//! k8s-openapi structs, then slimmed to what the mesh needs: one undecodable object is
//! logged with its kind and name, counted, and skipped; it never fails a list or a watch.
//!
//! The model has one writer (the publisher task). It applies watcher events, buffers a
//! relist (`Init` .. `InitDone`) and replaces a kind's contents at once on `InitDone`, and
//! records which mesh objects each change may have touched (the dirty sets).
//!
//! A policy resource type the API does not serve (a CRD not installed, or an API without
//! NetworkPolicy) is an empty list, not a failure: the watcher logs it once, reports the
//! kind listed (so the policy kind still gets its Synced marker and agents are not held
//! back), and keeps retrying with backoff, so objects are published once the type appears.

mod decode;
mod model;
#[cfg(test)]
mod tests;
mod watch;

pub use decode::*;
pub use model::*;
pub use watch::*;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Errors decoding a Kubernetes object into its slim form.
#[derive(Debug, thiserror::Error)]
pub enum KubeDecodeError {
    #[error("{kind} {name}: cannot decode: {source}")]
    Json {
        kind: ResourceKind,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{kind} {name}: {reason}")]
    Invalid {
        kind: ResourceKind,
        name: String,
        reason: String,
    },
}
