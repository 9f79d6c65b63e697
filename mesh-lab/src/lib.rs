//! mesh-lab: whole meshes on one Linux machine.
//!
//! [`kube_api`] is the Kubernetes-compatible API server each lab cluster runs.

pub mod kube_api;
