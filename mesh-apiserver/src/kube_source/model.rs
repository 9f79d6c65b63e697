//! The cluster model (one writer: the publisher task) and the pure builders of mesh-core objects out of it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use mesh_core::policy::PolicyKind;
use mesh_core::select::merge_addresses;
use mesh_core::{
    Backend, ClusterName, Endpoint, GlobalService, IdentityId, IdentityLabels, Node, ServicePort,
};
use tracing::{info, info_span};

use super::*;

/// A pod is an ipcache entry when it has an IP of its own (not the host's) and has not
/// finished.
pub fn pod_is_endpoint(pod: &PodInfo) -> bool {
    !pod.host_network && !pod.ips.is_empty() && pod.phase != "Succeeded" && pod.phase != "Failed"
}

/// The identity labels of a pod: its own, its namespace, its cluster, and its Namespace's
/// labels (`io.cilium.k8s.namespace.labels.*`; `namespace` is `None` when the Namespace is
/// not known).
pub fn pod_identity_labels(
    cluster: &ClusterName,
    pod: &PodInfo,
    namespace: Option<&NamespaceInfo>,
) -> IdentityLabels {
    IdentityLabels::for_pod_in_namespace(
        cluster,
        &pod.key.namespace,
        namespace
            .into_iter()
            .flat_map(|n| n.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        pod.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
}

pub fn build_endpoint(pod: &PodInfo, ip: IpAddr, identity: IdentityId) -> Endpoint {
    Endpoint {
        ip,
        identity,
        host_ip: pod.host_ip,
        node: pod.node.clone(),
        namespace: pod.key.namespace.clone(),
        pod: pod.key.name.clone(),
        named_ports: pod.named_ports.clone(),
    }
}

pub fn build_node(cluster: &ClusterName, node: &NodeInfo) -> Node {
    Node {
        cluster: cluster.clone(),
        name: node.name.clone(),
        internal_ips: node.internal_ips.clone(),
        pod_cidrs: node.pod_cidrs.clone(),
        // Marked by the publisher from the agents' reports, not from Kubernetes.
        stale_since: None,
    }
}

/// Builds the published service of `svc` from its EndpointSlices: a global one, or a
/// local-only one (`global: false`, never presented to peers) so the cluster's own agents
/// translate every ClusterIP in their socket LB and egress policy sees the backend pod.
/// `None` for a Service with no ClusterIP (headless, ExternalName) that is not global:
/// there is nothing to translate. A non-global Service has no affinity (it has only local
/// backends). An address listed by two slices (as happens while the slice controller
/// moves endpoints) is one backend ([`mesh_core::select::merge_addresses`]: the best
/// conditions win and the ports are merged).
pub fn build_service<'a>(
    cluster: &ClusterName,
    svc: &ServiceInfo,
    slices: impl IntoIterator<Item = &'a SliceInfo>,
) -> Option<GlobalService> {
    let global = svc.annotations.global;
    if !global && svc.cluster_ips.is_empty() {
        return None;
    }
    let copies = slices.into_iter().flat_map(|slice| {
        slice.endpoints.iter().flat_map(move |ep| {
            ep.addresses.iter().map(move |ip| {
                Cow::Owned(Backend {
                    ip: *ip,
                    ports: slice
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            name: p.name.clone(),
                            protocol: p.protocol,
                            port: p.port,
                        })
                        .collect(),
                    node: ep.node.clone(),
                    zone: ep.zone.clone(),
                    conditions: ep.conditions,
                })
            })
        })
    });
    let mut backends: Vec<Backend> = merge_addresses(copies)
        .into_iter()
        .map(Cow::into_owned)
        .collect();
    for b in &mut backends {
        b.ports.sort();
    }
    Some(GlobalService {
        cluster: cluster.clone(),
        namespace: svc.key.namespace.clone(),
        name: svc.key.name.clone(),
        global,
        shared: svc.annotations.shared,
        affinity: if global {
            svc.annotations.affinity
        } else {
            mesh_core::Affinity::None
        },
        internal_traffic_policy: svc.internal_traffic_policy,
        ports: svc.ports.clone(),
        frontends: svc.cluster_ips.clone(),
        backends,
    })
}

// ===== the model =====

/// The mesh objects a change may have touched. The publisher recomputes exactly these.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    pub services: BTreeSet<KubeObjectKey>,
    pub endpoints: BTreeSet<IpAddr>,
    pub nodes: BTreeSet<String>,
    pub policies: BTreeSet<(PolicyKind, KubeObjectKey)>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoints.is_empty()
            && self.nodes.is_empty()
            && self.policies.is_empty()
    }
}

/// The cluster as the watchers see it. One writer; every mutation records what it touched.
#[derive(Debug, Default)]
pub struct ClusterModel {
    services: BTreeMap<KubeObjectKey, ServiceInfo>,
    slices: BTreeMap<KubeObjectKey, SliceInfo>,
    /// (namespace, service name) -> slice names
    slices_by_service: HashMap<KubeObjectKey, BTreeSet<String>>,
    pods: BTreeMap<KubeObjectKey, PodInfo>,
    pods_by_ip: HashMap<IpAddr, BTreeSet<KubeObjectKey>>,
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    policies: BTreeMap<(PolicyKind, KubeObjectKey), PolicyInfo>,
    synced: HashSet<ResourceKind>,
    relists: HashMap<ResourceKind, Vec<SlimObject>>,
    dirty: Dirty,
}

impl ClusterModel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one watcher event.
    pub fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Apply(obj) => self.apply(obj),
            SourceEvent::Delete(kind, key) => self.delete(kind, &key),
            SourceEvent::Init(kind) => {
                self.relists.insert(kind, Vec::new());
            }
            SourceEvent::InitApply(obj) => match self.relists.get_mut(&obj.kind()) {
                Some(buf) => buf.push(obj),
                // An InitApply without Init: treat it as a plain apply rather than lose it.
                None => self.apply(obj),
            },
            SourceEvent::InitDone(kind) => {
                let objs = self.relists.remove(&kind).unwrap_or_default();
                self.reset(kind, objs);
            }
        }
    }

    /// Whether the kind's initial list has been applied.
    pub fn is_synced(&self, kind: ResourceKind) -> bool {
        self.synced.contains(&kind)
    }

    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Marks every object of the model dirty (a full recompute).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.services.extend(self.services.keys().cloned());
        self.dirty.endpoints.extend(self.pods_by_ip.keys().copied());
        self.dirty.nodes.extend(self.nodes.keys().cloned());
        self.dirty.policies.extend(self.policies.keys().cloned());
    }

    /// Marks the endpoints of every pod of `namespace` dirty: their identities carry the
    /// Namespace's labels.
    fn namespace_changed(&mut self, namespace: &str) {
        let from = KubeObjectKey::new(namespace, "");
        for (key, pod) in self.pods.range(from..) {
            if key.namespace != namespace {
                break;
            }
            self.dirty.endpoints.extend(pod.ips.iter().copied());
        }
    }

    pub fn apply(&mut self, obj: SlimObject) {
        let key = obj.key();
        let _span = info_span!("apply", kind = %obj.kind(), object = %key).entered();
        match obj {
            SlimObject::Service(s) => {
                self.dirty.services.insert(key.clone());
                self.services.insert(key, s);
            }
            SlimObject::EndpointSlice(s) => {
                self.remove_slice(&key);
                if let Some(svc) = &s.service {
                    let svc_key = KubeObjectKey::new(key.namespace.clone(), svc.clone());
                    self.slices_by_service
                        .entry(svc_key.clone())
                        .or_default()
                        .insert(key.name.clone());
                    self.dirty.services.insert(svc_key);
                }
                self.slices.insert(key, s);
            }
            SlimObject::Pod(p) => {
                self.remove_pod(&key);
                for ip in &p.ips {
                    self.pods_by_ip.entry(*ip).or_default().insert(key.clone());
                    self.dirty.endpoints.insert(*ip);
                }
                self.pods.insert(key, p);
            }
            SlimObject::Node(n) => {
                self.dirty.nodes.insert(n.name.clone());
                self.nodes.insert(n.name.clone(), n);
            }
            SlimObject::Namespace(n) => {
                let name = n.name.clone();
                let changed = self.namespaces.get(&name).map(|o| &o.labels) != Some(&n.labels);
                self.namespaces.insert(name.clone(), n);
                if changed {
                    self.namespace_changed(&name);
                }
            }
            SlimObject::Policy(p) => {
                let k = (p.kind, key);
                self.dirty.policies.insert(k.clone());
                self.policies.insert(k, p);
            }
        }
    }

    pub fn delete(&mut self, kind: ResourceKind, key: &KubeObjectKey) {
        let _span = info_span!("delete", %kind, object = %key).entered();
        match kind {
            ResourceKind::Service => {
                if self.services.remove(key).is_some() {
                    self.dirty.services.insert(key.clone());
                }
            }
            ResourceKind::EndpointSlice => self.remove_slice(key),
            ResourceKind::Pod => self.remove_pod(key),
            ResourceKind::Node => {
                if self.nodes.remove(&key.name).is_some() {
                    self.dirty.nodes.insert(key.name.clone());
                }
            }
            ResourceKind::Namespace => {
                if self.namespaces.remove(&key.name).is_some() {
                    self.namespace_changed(&key.name);
                }
            }
            ResourceKind::NetworkPolicy
            | ResourceKind::CiliumNetworkPolicy
            | ResourceKind::CiliumClusterwideNetworkPolicy => {
                let kind = kind.policy_kind().expect("a policy kind");
                let k = (kind, key.clone());
                if self.policies.remove(&k).is_some() {
                    self.dirty.policies.insert(k);
                }
            }
        }
    }

    /// Replaces every object of `kind` with `objs` (a relist). Objects that are gone are
    /// deleted; the rest are applied (unchanged ones produce no change downstream: the
    /// store writes only values that differ).
    pub fn reset(&mut self, kind: ResourceKind, objs: Vec<SlimObject>) {
        let _span = info_span!("reset", %kind, objects = objs.len()).entered();
        let new_keys: HashSet<KubeObjectKey> = objs.iter().map(SlimObject::key).collect();
        let old_keys: Vec<KubeObjectKey> = match kind {
            ResourceKind::Service => self.services.keys().cloned().collect(),
            ResourceKind::EndpointSlice => self.slices.keys().cloned().collect(),
            ResourceKind::Pod => self.pods.keys().cloned().collect(),
            ResourceKind::Node => self
                .nodes
                .keys()
                .map(|n| KubeObjectKey::new("", n.clone()))
                .collect(),
            ResourceKind::Namespace => self
                .namespaces
                .keys()
                .map(|n| KubeObjectKey::new("", n.clone()))
                .collect(),
            ResourceKind::NetworkPolicy
            | ResourceKind::CiliumNetworkPolicy
            | ResourceKind::CiliumClusterwideNetworkPolicy => {
                let pk = kind.policy_kind();
                self.policies
                    .keys()
                    .filter(|(k, _)| Some(*k) == pk)
                    .map(|(_, key)| key.clone())
                    .collect()
            }
        };
        for key in old_keys.iter().filter(|k| !new_keys.contains(*k)) {
            self.delete(kind, key);
        }
        for obj in objs {
            if obj.kind() == kind {
                self.apply(obj);
            }
        }
        if self.synced.insert(kind) {
            info!(%kind, "initial list applied");
        }
    }

    fn remove_slice(&mut self, key: &KubeObjectKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        if let Some(svc) = old.service {
            let svc_key = KubeObjectKey::new(key.namespace.clone(), svc);
            if let Some(set) = self.slices_by_service.get_mut(&svc_key) {
                set.remove(&key.name);
                if set.is_empty() {
                    self.slices_by_service.remove(&svc_key);
                }
            }
            self.dirty.services.insert(svc_key);
        }
    }

    fn remove_pod(&mut self, key: &KubeObjectKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        for ip in old.ips {
            if let Some(set) = self.pods_by_ip.get_mut(&ip) {
                set.remove(key);
                if set.is_empty() {
                    self.pods_by_ip.remove(&ip);
                }
            }
            self.dirty.endpoints.insert(ip);
        }
    }

    // --- queries ---

    pub fn service(&self, key: &KubeObjectKey) -> Option<&ServiceInfo> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    /// The EndpointSlices of a Service, in name order.
    pub fn slices_of(&self, svc: &KubeObjectKey) -> impl Iterator<Item = &SliceInfo> {
        self.slices_by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(move |name| {
                self.slices
                    .get(&KubeObjectKey::new(svc.namespace.clone(), name.clone()))
            })
    }

    pub fn global_service(
        &self,
        cluster: &ClusterName,
        key: &KubeObjectKey,
    ) -> Option<GlobalService> {
        let svc = self.services.get(key)?;
        build_service(cluster, svc, self.slices_of(key))
    }

    /// The pod that owns `ip` in the ipcache: among the pods listing it that are endpoints,
    /// a running one before a terminating one, then the first by namespace/name.
    pub fn endpoint_pod(&self, ip: &IpAddr) -> Option<&PodInfo> {
        self.pods_by_ip
            .get(ip)?
            .iter()
            .filter_map(|k| self.pods.get(k))
            .filter(|p| pod_is_endpoint(p))
            .min_by_key(|p| (p.terminating, &p.key))
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn endpoint_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.pods_by_ip.keys()
    }

    pub fn node_names(&self) -> impl Iterator<Item = &String> {
        self.nodes.keys()
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name)
    }

    /// The identity labels of `pod` with its Namespace's labels.
    pub fn identity_labels(&self, cluster: &ClusterName, pod: &PodInfo) -> IdentityLabels {
        pod_identity_labels(cluster, pod, self.namespace(&pod.key.namespace))
    }

    pub fn policy(&self, kind: PolicyKind, key: &KubeObjectKey) -> Option<&PolicyInfo> {
        self.policies.get(&(kind, key.clone()))
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyInfo> {
        self.policies.values()
    }

    pub fn counts(&self) -> [(ResourceKind, usize); 8] {
        let policies = |k: PolicyKind| self.policies.keys().filter(|(pk, _)| *pk == k).count();
        [
            (ResourceKind::Service, self.services.len()),
            (ResourceKind::EndpointSlice, self.slices.len()),
            (ResourceKind::Pod, self.pods.len()),
            (ResourceKind::Node, self.nodes.len()),
            (ResourceKind::Namespace, self.namespaces.len()),
            (
                ResourceKind::NetworkPolicy,
                policies(PolicyKind::NetworkPolicy),
            ),
            (
                ResourceKind::CiliumNetworkPolicy,
                policies(PolicyKind::CiliumNetworkPolicy),
            ),
            (
                ResourceKind::CiliumClusterwideNetworkPolicy,
                policies(PolicyKind::CiliumClusterwideNetworkPolicy),
            ),
        ]
    }
}
