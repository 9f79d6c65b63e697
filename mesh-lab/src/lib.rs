//! mesh-lab: whole meshes on one Linux machine.
//!
//! [`kube_api`] is the Kubernetes-compatible API server each lab cluster runs;
//! [`controllers`] play the Deployment/EndpointSlice/LoadBalancer controllers, the scheduler
//! and the kubelet on its store; [`proxy_rules`] is the lab's kube-proxy (nftables), [`dns`]
//! the cluster DNS, and [`workload`] the HTTP server every lab pod runs (its request log, in
//! [`pod_logs`], is what `kubectl logs` shows); [`lab`] is the lab runtime (netns,
//! cgroups, the supervisor and the `up`/`down`/fault commands); [`mesh_crds`] the CRDs mesh
//! ships (deploy/crds), installed in every lab cluster.

pub mod controllers;
pub mod dns;
pub mod kube_api;
pub mod lab;
pub mod mesh_crds;
pub mod pod_logs;
pub mod proxy_rules;
pub mod workload;
