//! Checks of what runs mesh on real clusters, without a container engine: the manifests of
//! `deploy/` (rendered by kustomize per cluster of `multicluster-kind/clusters/`), the demo
//! manifests and the kind cluster configs of `multicluster-kind/`.
//!
//! [`load`] reads and decodes: every object into its k8s-openapi type, refusing any field
//! the type does not know (a typo such as `readOnlyRootFilesytem` would otherwise be dropped
//! silently by the API server's decoder and by kubectl alike). [`checks`] holds the
//! consistency rules between objects (volumes, ports, probes, selectors, references, RBAC,
//! security contexts). The tests in `tests/` apply them to the real files, feed them broken
//! copies, apply the manifests to a mesh-lab Kubernetes API with kubectl, and parse the
//! containers' flags and env with the binaries' own `Args`.

pub mod checks;
pub mod load;

pub use load::{Error, ManifestObject, Resource};
