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

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use mesh_core::annotations::{AnnotationProblem, ServiceAnnotations, parse_service_annotations};
use mesh_core::policy::PolicyKind;
use mesh_core::select::merge_addresses;
use mesh_core::{
    Backend, BackendConditions, ClusterName, Endpoint, GlobalService, IdentityId, IdentityLabels,
    Node, Protocol, ServicePort, TrafficPolicy,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::publisher::PublisherMetrics;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Errors decoding a Kubernetes object into its slim form.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
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

// ===== kinds and keys =====

/// The Kubernetes kinds the publisher watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Service,
    EndpointSlice,
    Pod,
    Node,
    Namespace,
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 8] = [
        ResourceKind::Service,
        ResourceKind::EndpointSlice,
        ResourceKind::Pod,
        ResourceKind::Node,
        ResourceKind::Namespace,
        ResourceKind::NetworkPolicy,
        ResourceKind::CiliumNetworkPolicy,
        ResourceKind::CiliumClusterwideNetworkPolicy,
    ];

    /// The policy kinds: the inputs of the published policy kind.
    pub const POLICIES: [ResourceKind; 3] = [
        ResourceKind::NetworkPolicy,
        ResourceKind::CiliumNetworkPolicy,
        ResourceKind::CiliumClusterwideNetworkPolicy,
    ];

    pub fn policy_kind(self) -> Option<PolicyKind> {
        Some(match self {
            ResourceKind::NetworkPolicy => PolicyKind::NetworkPolicy,
            ResourceKind::CiliumNetworkPolicy => PolicyKind::CiliumNetworkPolicy,
            ResourceKind::CiliumClusterwideNetworkPolicy => {
                PolicyKind::CiliumClusterwideNetworkPolicy
            }
            _ => return None,
        })
    }

    pub fn of_policy(kind: PolicyKind) -> Self {
        match kind {
            PolicyKind::NetworkPolicy => ResourceKind::NetworkPolicy,
            PolicyKind::CiliumNetworkPolicy => ResourceKind::CiliumNetworkPolicy,
            PolicyKind::CiliumClusterwideNetworkPolicy => {
                ResourceKind::CiliumClusterwideNetworkPolicy
            }
        }
    }

    /// `apiVersion` of the kind's objects.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Pod | ResourceKind::Node => "v1",
            ResourceKind::Namespace => "v1",
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
            ResourceKind::NetworkPolicy => "networking.k8s.io/v1",
            ResourceKind::CiliumNetworkPolicy | ResourceKind::CiliumClusterwideNetworkPolicy => {
                "cilium.io/v2"
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Pod => "Pod",
            ResourceKind::Node => "Node",
            ResourceKind::Namespace => "Namespace",
            ResourceKind::NetworkPolicy => "NetworkPolicy",
            ResourceKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            ResourceKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }

    fn api_resource(self) -> ApiResource {
        match self {
            ResourceKind::Service => ApiResource::erase::<corev1::Service>(&()),
            ResourceKind::EndpointSlice => ApiResource::erase::<discoveryv1::EndpointSlice>(&()),
            ResourceKind::Pod => ApiResource::erase::<corev1::Pod>(&()),
            ResourceKind::Node => ApiResource::erase::<corev1::Node>(&()),
            ResourceKind::Namespace => ApiResource::erase::<corev1::Namespace>(&()),
            ResourceKind::NetworkPolicy => {
                ApiResource::erase::<k8s_openapi::api::networking::v1::NetworkPolicy>(&())
            }
            ResourceKind::CiliumNetworkPolicy => ApiResource {
                group: "cilium.io".into(),
                version: "v2".into(),
                api_version: "cilium.io/v2".into(),
                kind: "CiliumNetworkPolicy".into(),
                plural: "ciliumnetworkpolicies".into(),
            },
            ResourceKind::CiliumClusterwideNetworkPolicy => ApiResource {
                group: "cilium.io".into(),
                version: "v2".into(),
                api_version: "cilium.io/v2".into(),
                kind: "CiliumClusterwideNetworkPolicy".into(),
                plural: "ciliumclusterwidenetworkpolicies".into(),
            },
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a namespaced object; `name` alone (empty namespace) otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

// ===== slim objects =====

/// What the mesh needs of a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    pub key: ObjKey,
    pub uid: Option<String>,
    pub annotations: ServiceAnnotations,
    /// Problems found in the Cilium annotations (their values were treated as unset).
    pub problems: Vec<AnnotationProblem>,
    pub ports: Vec<ServicePort>,
    /// `spec.clusterIPs` without `None`.
    pub cluster_ips: Vec<IpAddr>,
    pub internal_traffic_policy: TrafficPolicy,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub conditions: BackendConditions,
    pub node: String,
    pub zone: String,
}

/// A port of an EndpointSlice: the backends' own port for the Service port of that name.
#[derive(Debug, Clone, PartialEq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// What the mesh needs of an EndpointSlice (IPv4 slices only; others are kept empty).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceInfo {
    pub key: ObjKey,
    /// The Service named by the `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

/// What the mesh needs of a Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub key: ObjKey,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
    pub host_ip: Option<IpAddr>,
    pub phase: String,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

/// What the mesh needs of a Node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

/// What the mesh needs of a Namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// What the mesh needs of a policy object: the object itself, slimmed to what
/// `mesh_core::policy::parse_policy` reads (apiVersion, kind, name, namespace, `spec`,
/// `specs`). The publisher parses it (it knows the cluster) and publishes exactly this JSON,
/// so agents re-parse what was validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInfo {
    pub kind: PolicyKind,
    pub key: ObjKey,
    pub uid: Option<String>,
    pub object: serde_json::Value,
}

/// A slim Kubernetes object of one of the watched kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    Pod(PodInfo),
    Node(NodeInfo),
    Namespace(NamespaceInfo),
    Policy(PolicyInfo),
}

impl Object {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Object::Service(_) => ResourceKind::Service,
            Object::EndpointSlice(_) => ResourceKind::EndpointSlice,
            Object::Pod(_) => ResourceKind::Pod,
            Object::Node(_) => ResourceKind::Node,
            Object::Namespace(_) => ResourceKind::Namespace,
            Object::Policy(p) => ResourceKind::of_policy(p.kind),
        }
    }

    pub fn key(&self) -> ObjKey {
        match self {
            Object::Service(s) => s.key.clone(),
            Object::EndpointSlice(s) => s.key.clone(),
            Object::Pod(p) => p.key.clone(),
            Object::Node(n) => ObjKey::new("", n.name.clone()),
            Object::Namespace(n) => ObjKey::new("", n.name.clone()),
            Object::Policy(p) => p.key.clone(),
        }
    }
}

/// What a watcher tells the model.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    Apply(Object),
    Delete(ResourceKind, ObjKey),
    /// A (re)list of the kind starts: buffer until `InitDone`.
    Init(ResourceKind),
    InitApply(Object),
    /// The (re)list is complete: replace the kind's contents with the buffer.
    InitDone(ResourceKind),
}

// ===== decoding =====

fn obj_name(obj: &DynamicObject) -> String {
    let name = obj.metadata.name.as_deref().unwrap_or("<unnamed>");
    match obj.metadata.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

fn key_of(obj: &DynamicObject) -> ObjKey {
    ObjKey::new(
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Parses the IPs of `values`, logging and skipping the ones that are not IPs.
fn parse_ips<'a>(
    kind: ResourceKind,
    name: &str,
    field: &str,
    values: impl IntoIterator<Item = &'a str>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for v in values {
        match v.parse::<IpAddr>() {
            Ok(ip) => {
                if !out.contains(&ip) {
                    out.push(ip)
                }
            }
            Err(_) => {
                warn!(%kind, object = %name, field, value = %v, "skipping a value that is not an IP address")
            }
        }
    }
    out
}

fn parse_protocol(
    kind: ResourceKind,
    name: &str,
    value: Option<&str>,
) -> Result<Protocol, DecodeError> {
    match value {
        None | Some("") => Ok(Protocol::Tcp),
        Some(p) => p.parse().map_err(|_| DecodeError::Invalid {
            kind,
            name: name.to_string(),
            reason: format!("unknown protocol {p:?}"),
        }),
    }
}

fn parse_port(kind: ResourceKind, name: &str, value: i32) -> Result<u16, DecodeError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| DecodeError::Invalid {
            kind,
            name: name.to_string(),
            reason: format!("port {value} is not in 1..=65535"),
        })
}

/// Decodes a watched object into its slim form. The object's own kind decides the type.
pub fn decode(kind: ResourceKind, obj: DynamicObject) -> Result<Object, DecodeError> {
    let name = obj_name(&obj);
    let json_err = |source| DecodeError::Json {
        kind,
        name: name.clone(),
        source,
    };
    let value = serde_json::to_value(obj).map_err(json_err)?;
    Ok(match kind {
        ResourceKind::Service => Object::Service(slim_service(
            serde_json::from_value(value).map_err(json_err)?,
        )?),
        ResourceKind::EndpointSlice => Object::EndpointSlice(slim_slice(
            serde_json::from_value(value).map_err(json_err)?,
        )?),
        ResourceKind::Pod => {
            Object::Pod(slim_pod(serde_json::from_value(value).map_err(json_err)?))
        }
        ResourceKind::Node => {
            Object::Node(slim_node(serde_json::from_value(value).map_err(json_err)?))
        }
        ResourceKind::Namespace => {
            let ns: corev1::Namespace = serde_json::from_value(value).map_err(json_err)?;
            Object::Namespace(NamespaceInfo {
                name: ns.metadata.name.unwrap_or_default(),
                labels: ns.metadata.labels.unwrap_or_default(),
            })
        }
        ResourceKind::NetworkPolicy
        | ResourceKind::CiliumNetworkPolicy
        | ResourceKind::CiliumClusterwideNetworkPolicy => Object::Policy(slim_policy(kind, value)),
    })
}

/// Slims a policy object to what `parse_policy` reads. `apiVersion` and `kind` are set
/// from the watched resource (list items may come without them).
pub fn slim_policy(kind: ResourceKind, value: serde_json::Value) -> PolicyInfo {
    let policy_kind = kind.policy_kind().expect("a policy resource kind");
    let str_at =
        |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|s| s.as_str()).map(str::to_owned);
    let name = str_at(&value, "/metadata/name").unwrap_or_default();
    let namespace = str_at(&value, "/metadata/namespace").unwrap_or_default();
    let uid = str_at(&value, "/metadata/uid");
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), name.clone().into());
    if policy_kind.is_namespaced() {
        metadata.insert("namespace".into(), namespace.clone().into());
    }
    let mut object = serde_json::Map::new();
    object.insert("apiVersion".into(), kind.api_version().into());
    object.insert("kind".into(), kind.as_str().into());
    object.insert("metadata".into(), metadata.into());
    for field in ["spec", "specs"] {
        if let Some(v) = value.get(field) {
            object.insert(field.into(), v.clone());
        }
    }
    PolicyInfo {
        kind: policy_kind,
        key: ObjKey::new(
            if policy_kind.is_namespaced() {
                namespace
            } else {
                String::new()
            },
            name,
        ),
        uid,
        object: object.into(),
    }
}

fn meta_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjKey {
    ObjKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Slims a Service. Annotation problems are kept on the object for the publisher to report.
pub fn slim_service(svc: corev1::Service) -> Result<ServiceInfo, DecodeError> {
    let kind = ResourceKind::Service;
    let key = meta_key(&svc.metadata);
    let name = key.to_string();
    let annotations = svc.metadata.annotations.unwrap_or_default();
    let (parsed, problems) =
        parse_service_annotations(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let spec = svc.spec.unwrap_or_default();
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        ports.push(ServicePort {
            name: p.name.unwrap_or_default(),
            protocol: parse_protocol(kind, &name, p.protocol.as_deref())?,
            port: parse_port(kind, &name, p.port)?,
        });
    }
    let mut ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip);
    }
    let cluster_ips = parse_ips(
        kind,
        &name,
        "spec.clusterIPs",
        ips.iter()
            .map(String::as_str)
            .filter(|ip| !ip.is_empty() && *ip != "None"),
    );
    let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    Ok(ServiceInfo {
        key,
        uid: svc.metadata.uid,
        annotations: parsed,
        problems,
        ports,
        cluster_ips,
        internal_traffic_policy,
    })
}

/// Slims an EndpointSlice. Conditions follow the EndpointSlice API: `ready` unset means
/// ready, `serving` unset means the value of `ready`, `terminating` unset means false.
pub fn slim_slice(slice: discoveryv1::EndpointSlice) -> Result<SliceInfo, DecodeError> {
    let kind = ResourceKind::EndpointSlice;
    let key = meta_key(&slice.metadata);
    let name = key.to_string();
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned();
    let mut ports = Vec::new();
    let mut endpoints = Vec::new();
    // Only IPv4 slices carry backends for the mesh; FQDN and IPv6 slices are kept empty.
    if slice.address_type == "IPv4" {
        for p in slice.ports.unwrap_or_default() {
            let Some(port) = p.port else { continue };
            ports.push(SlicePort {
                name: p.name.unwrap_or_default(),
                protocol: parse_protocol(kind, &name, p.protocol.as_deref())?,
                port: parse_port(kind, &name, port)?,
            });
        }
        for ep in slice.endpoints.unwrap_or_default() {
            let addresses = parse_ips(
                kind,
                &name,
                "endpoints[].addresses",
                ep.addresses.iter().map(String::as_str),
            )
            .into_iter()
            .filter(IpAddr::is_ipv4)
            .collect();
            let c = ep.conditions.unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            endpoints.push(SliceEndpoint {
                addresses,
                conditions: BackendConditions {
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                },
                node: ep.node_name.unwrap_or_default(),
                zone: ep.zone.unwrap_or_default(),
            });
        }
    }
    Ok(SliceInfo {
        key,
        service,
        endpoints,
        ports,
    })
}

pub fn slim_pod(pod: corev1::Pod) -> PodInfo {
    let kind = ResourceKind::Pod;
    let key = meta_key(&pod.metadata);
    let name = key.to_string();
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let mut ips: Vec<String> = status
        .pod_ips
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip);
    }
    let host_ip = status.host_ip.as_deref().and_then(|ip| {
        parse_ips(kind, &name, "status.hostIP", [ip])
            .into_iter()
            .next()
    });
    PodInfo {
        ips: parse_ips(kind, &name, "status.podIPs", ips.iter().map(String::as_str)),
        key,
        labels: pod.metadata.labels.unwrap_or_default(),
        node: spec.node_name.unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
        host_ip,
        phase: status.phase.unwrap_or_default(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }
}

pub fn slim_node(node: corev1::Node) -> NodeInfo {
    let kind = ResourceKind::Node;
    let name = node.metadata.name.unwrap_or_default();
    let spec = node.spec.unwrap_or_default();
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    let internal_ips = parse_ips(
        kind,
        &name,
        "status.addresses",
        addresses
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address.as_str()),
    );
    let mut cidrs: Vec<String> = spec.pod_cidrs.unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.pod_cidr);
    }
    let mut pod_cidrs = Vec::new();
    for c in &cidrs {
        match mesh_core::cidr::parse_cidr(c) {
            Ok(net) if !pod_cidrs.contains(&net) => pod_cidrs.push(net),
            Ok(_) => {}
            Err(error) => warn!(%kind, object = %name, %error, "skipping an invalid pod CIDR"),
        }
    }
    NodeInfo {
        name,
        internal_ips,
        pod_cidrs,
    }
}

// ===== pure builders =====

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
    }
}

pub fn build_node(cluster: &ClusterName, node: &NodeInfo) -> Node {
    Node {
        cluster: cluster.clone(),
        name: node.name.clone(),
        internal_ips: node.internal_ips.clone(),
        pod_cidrs: node.pod_cidrs.clone(),
    }
}

/// Builds the global service of `svc` from its EndpointSlices, or `None` when the Service is
/// not global. An address listed by two slices (as happens while the slice controller
/// moves endpoints) is one backend ([`mesh_core::select::merge_addresses`]: the best
/// conditions win and the ports are merged).
pub fn build_service<'a>(
    cluster: &ClusterName,
    svc: &ServiceInfo,
    slices: impl IntoIterator<Item = &'a SliceInfo>,
) -> Option<GlobalService> {
    if !svc.annotations.global {
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
        shared: svc.annotations.shared,
        affinity: svc.annotations.affinity,
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
    pub services: BTreeSet<ObjKey>,
    pub endpoints: BTreeSet<IpAddr>,
    pub nodes: BTreeSet<String>,
    pub policies: BTreeSet<(PolicyKind, ObjKey)>,
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
    services: BTreeMap<ObjKey, ServiceInfo>,
    slices: BTreeMap<ObjKey, SliceInfo>,
    /// (namespace, service name) -> slice names
    slices_by_service: HashMap<ObjKey, BTreeSet<String>>,
    pods: BTreeMap<ObjKey, PodInfo>,
    pods_by_ip: HashMap<IpAddr, BTreeSet<ObjKey>>,
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    policies: BTreeMap<(PolicyKind, ObjKey), PolicyInfo>,
    synced: HashSet<ResourceKind>,
    relists: HashMap<ResourceKind, Vec<Object>>,
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
        let from = ObjKey::new(namespace, "");
        for (key, pod) in self.pods.range(from..) {
            if key.namespace != namespace {
                break;
            }
            self.dirty.endpoints.extend(pod.ips.iter().copied());
        }
    }

    pub fn apply(&mut self, obj: Object) {
        let key = obj.key();
        let _span = info_span!("apply", kind = %obj.kind(), object = %key).entered();
        match obj {
            Object::Service(s) => {
                self.dirty.services.insert(key.clone());
                self.services.insert(key, s);
            }
            Object::EndpointSlice(s) => {
                self.remove_slice(&key);
                if let Some(svc) = &s.service {
                    let svc_key = ObjKey::new(key.namespace.clone(), svc.clone());
                    self.slices_by_service
                        .entry(svc_key.clone())
                        .or_default()
                        .insert(key.name.clone());
                    self.dirty.services.insert(svc_key);
                }
                self.slices.insert(key, s);
            }
            Object::Pod(p) => {
                self.remove_pod(&key);
                for ip in &p.ips {
                    self.pods_by_ip.entry(*ip).or_default().insert(key.clone());
                    self.dirty.endpoints.insert(*ip);
                }
                self.pods.insert(key, p);
            }
            Object::Node(n) => {
                self.dirty.nodes.insert(n.name.clone());
                self.nodes.insert(n.name.clone(), n);
            }
            Object::Namespace(n) => {
                let name = n.name.clone();
                let changed = self.namespaces.get(&name).map(|o| &o.labels) != Some(&n.labels);
                self.namespaces.insert(name.clone(), n);
                if changed {
                    self.namespace_changed(&name);
                }
            }
            Object::Policy(p) => {
                let k = (p.kind, key);
                self.dirty.policies.insert(k.clone());
                self.policies.insert(k, p);
            }
        }
    }

    pub fn delete(&mut self, kind: ResourceKind, key: &ObjKey) {
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
    pub fn reset(&mut self, kind: ResourceKind, objs: Vec<Object>) {
        let _span = info_span!("reset", %kind, objects = objs.len()).entered();
        let new_keys: HashSet<ObjKey> = objs.iter().map(Object::key).collect();
        let old_keys: Vec<ObjKey> = match kind {
            ResourceKind::Service => self.services.keys().cloned().collect(),
            ResourceKind::EndpointSlice => self.slices.keys().cloned().collect(),
            ResourceKind::Pod => self.pods.keys().cloned().collect(),
            ResourceKind::Node => self
                .nodes
                .keys()
                .map(|n| ObjKey::new("", n.clone()))
                .collect(),
            ResourceKind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjKey::new("", n.clone()))
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

    fn remove_slice(&mut self, key: &ObjKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        if let Some(svc) = old.service {
            let svc_key = ObjKey::new(key.namespace.clone(), svc);
            if let Some(set) = self.slices_by_service.get_mut(&svc_key) {
                set.remove(&key.name);
                if set.is_empty() {
                    self.slices_by_service.remove(&svc_key);
                }
            }
            self.dirty.services.insert(svc_key);
        }
    }

    fn remove_pod(&mut self, key: &ObjKey) {
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

    pub fn service(&self, key: &ObjKey) -> Option<&ServiceInfo> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    /// The EndpointSlices of a Service, in name order.
    pub fn slices_of(&self, svc: &ObjKey) -> impl Iterator<Item = &SliceInfo> {
        self.slices_by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(move |name| {
                self.slices
                    .get(&ObjKey::new(svc.namespace.clone(), name.clone()))
            })
    }

    pub fn global_service(&self, cluster: &ClusterName, key: &ObjKey) -> Option<GlobalService> {
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

    pub fn policy(&self, kind: PolicyKind, key: &ObjKey) -> Option<&PolicyInfo> {
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

// ===== watchers =====

/// Starts one watcher per kind, feeding `tx`. Each runs with kube-rs's default backoff
/// until `token` is cancelled or the receiver is dropped.
pub fn spawn_watchers(
    client: kube::Client,
    tx: mpsc::Sender<SourceEvent>,
    metrics: Arc<PublisherMetrics>,
    token: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for kind in ResourceKind::ALL {
        let fut = watch_kind(client.clone(), kind, tx.clone(), metrics.clone());
        let token = token.clone();
        set.spawn(
            async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = fut => {}
                }
            }
            .instrument(info_span!("watch", %kind)),
        );
    }
    set
}

async fn watch_kind(
    client: kube::Client,
    kind: ResourceKind,
    tx: mpsc::Sender<SourceEvent>,
    metrics: Arc<PublisherMetrics>,
) {
    let ar = kind.api_resource();
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // A policy type the API does not serve is an empty list, logged once (module docs).
    let mut absent = false;
    let decode_one = |obj: DynamicObject| -> Option<Object> {
        let key = key_of(&obj);
        match decode(kind, obj) {
            Ok(o) => Some(o),
            Err(error) => {
                metrics.decode_failure(kind);
                warn!(%kind, object = %key, %error, "skipping an object that cannot be decoded");
                None
            }
        }
    };
    while let Some(event) = stream.next().await {
        if event.is_ok() {
            absent = false;
        }
        let out = match event {
            Ok(Event::Apply(obj)) => decode_one(obj).map(SourceEvent::Apply),
            Ok(Event::InitApply(obj)) => decode_one(obj).map(SourceEvent::InitApply),
            Ok(Event::Delete(obj)) => Some(SourceEvent::Delete(kind, key_of(&obj))),
            Ok(Event::Init) => {
                debug!(%kind, "list started");
                Some(SourceEvent::Init(kind))
            }
            Ok(Event::InitDone) => {
                debug!(%kind, "list done");
                Some(SourceEvent::InitDone(kind))
            }
            Err(error) if kind.policy_kind().is_some() && not_served(&error) => {
                if absent {
                    debug!(%kind, "still not served");
                    None
                } else {
                    absent = true;
                    warn!(%kind, %error,
                        "the API does not serve this policy type (CRD not installed?): treating it as empty and retrying with backoff");
                    // An empty relist: removes what a vanished type held and lets the
                    // policy kind be marked synced.
                    if tx.send(SourceEvent::Init(kind)).await.is_err() {
                        return;
                    }
                    Some(SourceEvent::InitDone(kind))
                }
            }
            Err(error) => {
                metrics.watch_error(kind);
                warn!(%kind, %error, "watch failed; retrying with backoff");
                None
            }
        };
        if let Some(ev) = out
            && tx.send(ev).await.is_err()
        {
            return;
        }
    }
}

/// Whether a watcher error says the resource type is not served (HTTP 404 on list/watch).
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.is_not_found(),
        watcher::Error::WatchError(s) => s.is_not_found(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster() -> ClusterName {
        ClusterName::new("east").unwrap()
    }

    fn dynobj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn service(annotations: serde_json::Value) -> ServiceInfo {
        let obj = dynobj(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "ns", "name": "web", "annotations": annotations},
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
                "internalTrafficPolicy": "Local"
            }
        }));
        match decode(ResourceKind::Service, obj).unwrap() {
            Object::Service(s) => s,
            o => panic!("{o:?}"),
        }
    }

    fn slice(name: &str, endpoints: serde_json::Value, ports: serde_json::Value) -> SliceInfo {
        let obj = dynobj(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "ns", "name": name, "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }));
        match decode(ResourceKind::EndpointSlice, obj).unwrap() {
            Object::EndpointSlice(s) => s,
            o => panic!("{o:?}"),
        }
    }

    fn pod(name: &str, ip: &str, phase: &str, host_network: bool) -> PodInfo {
        let obj = dynobj(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "ns", "name": name, "labels": {"app": "web", "pod-template-hash": "x1"},
                          "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n1", "hostNetwork": host_network, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1"}
        }));
        match decode(ResourceKind::Pod, obj).unwrap() {
            Object::Pod(p) => p,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn non_global_service_is_not_published() {
        let svc = service(json!({}));
        assert_eq!(build_service(&cluster(), &svc, []), None);
    }

    #[test]
    fn global_service_with_slices() {
        let svc = service(
            json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}),
        );
        let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]);
        let a = slice(
            "web-a",
            json!([
                {"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z1"},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true}, "nodeName": "n2"},
                {"addresses": ["fd00::1"]},
            ]),
            ports.clone(),
        );
        // 10.0.0.2 also appears, ready, in a second slice: one backend, the ready state wins.
        let b = slice(
            "web-b",
            json!([{"addresses": ["10.0.0.2"], "conditions": {"ready": true}, "nodeName": "n3"}]),
            ports,
        );
        let gs = build_service(&cluster(), &svc, [&a, &b]).unwrap();
        assert_eq!(gs.affinity, mesh_core::Affinity::Local);
        assert!(gs.shared);
        assert_eq!(gs.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(gs.frontends, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(gs.ports.len(), 2);
        assert_eq!(gs.backends.len(), 2, "{:?}", gs.backends);
        let b1 = &gs.backends[0];
        assert_eq!(b1.ip.to_string(), "10.0.0.1");
        assert_eq!(
            b1.conditions,
            BackendConditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!((b1.node.as_str(), b1.zone.as_str()), ("n1", "z1"));
        let http = b1.ports.iter().find(|p| p.name == "http").unwrap();
        assert_eq!((http.port, http.protocol), (8080, Protocol::Tcp));
        let dns = b1.ports.iter().find(|p| p.name == "dns").unwrap();
        assert_eq!((dns.port, dns.protocol), (5353, Protocol::Udp));
        let b2 = &gs.backends[1];
        assert_eq!(b2.ip.to_string(), "10.0.0.2");
        assert!(b2.conditions.ready && !b2.conditions.terminating);
        assert_eq!(b2.node, "n3");
    }

    #[test]
    fn slice_conditions_defaults() {
        let s = slice(
            "s",
            json!([
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            ]),
            json!([{"port": 80}]),
        );
        let c: Vec<_> = s.endpoints.iter().map(|e| e.conditions).collect();
        assert_eq!(
            c[0],
            BackendConditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(
            c[1],
            BackendConditions {
                ready: false,
                serving: false,
                terminating: false
            }
        );
        assert_eq!(
            c[2],
            BackendConditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        assert_eq!(s.ports[0].name, "");
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn invalid_annotation_is_kept_as_problem_and_treated_as_none() {
        let svc = service(
            json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "loca"}),
        );
        assert_eq!(svc.problems.len(), 1);
        assert!(
            svc.problems[0].to_string().contains("loca"),
            "{}",
            svc.problems[0]
        );
        let gs = build_service(&cluster(), &svc, []).unwrap();
        assert_eq!(gs.affinity, mesh_core::Affinity::None);
    }

    #[test]
    fn shared_false() {
        let svc = service(
            json!({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"}),
        );
        assert!(!build_service(&cluster(), &svc, []).unwrap().shared);
    }

    /// A Namespace label change re-labels the identities of its pods (and only its pods).
    #[test]
    fn a_namespace_label_change_dirties_the_endpoints_of_its_pods() {
        let mut m = ClusterModel::new();
        m.apply(Object::Pod(pod("a", "10.0.0.1", "Running", false)));
        let mut other = pod("b", "10.0.0.2", "Running", false);
        other.key.namespace = "other".into();
        m.apply(Object::Pod(other));
        let ns = |team: &str| {
            Object::Namespace(NamespaceInfo {
                name: "ns".into(),
                labels: BTreeMap::from([("team".to_string(), team.to_string())]),
            })
        };
        m.apply(ns("blue"));
        m.take_dirty();
        m.apply(ns("blue"));
        assert!(m.take_dirty().is_empty(), "same labels: nothing to redo");
        m.apply(ns("red"));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(m.take_dirty().endpoints, BTreeSet::from([ip]));
        let pod = m.endpoint_pod(&ip).unwrap().clone();
        assert_eq!(
            m.identity_labels(&cluster(), &pod)
                .get("io.cilium.k8s.namespace.labels.team"),
            Some("red")
        );
        m.delete(ResourceKind::Namespace, &ObjKey::new("", "ns"));
        assert_eq!(m.take_dirty().endpoints, BTreeSet::from([ip]));
    }

    #[test]
    fn policies_are_slimmed_to_what_the_parser_reads() {
        let obj = dynobj(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"namespace": "shop", "name": "p", "uid": "u1",
                          "managedFields": [{"manager": "kubectl"}], "annotations": {"a": "b"}},
            "spec": {"endpointSelector": {}, "ingress": [{}]}
        }));
        let Object::Policy(p) = decode(ResourceKind::CiliumNetworkPolicy, obj).unwrap() else {
            panic!("not a policy")
        };
        assert_eq!(p.key, ObjKey::new("shop", "p"));
        assert_eq!(p.uid.as_deref(), Some("u1"));
        assert_eq!(
            p.object,
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                   "metadata": {"namespace": "shop", "name": "p"},
                   "spec": {"endpointSelector": {}, "ingress": [{}]}})
        );
        let mut m = ClusterModel::new();
        m.apply(Object::Policy(p.clone()));
        assert_eq!(
            m.take_dirty().policies,
            BTreeSet::from([(PolicyKind::CiliumNetworkPolicy, p.key.clone())])
        );
        m.reset(ResourceKind::CiliumNetworkPolicy, vec![]);
        assert!(m.policy(PolicyKind::CiliumNetworkPolicy, &p.key).is_none());
        assert!(m.is_synced(ResourceKind::CiliumNetworkPolicy));
    }

    #[test]
    fn pods_as_endpoints() {
        assert!(pod_is_endpoint(&pod("a", "10.0.0.1", "Running", false)));
        assert!(!pod_is_endpoint(&pod("a", "10.0.0.1", "Succeeded", false)));
        assert!(!pod_is_endpoint(&pod("a", "10.0.0.1", "Failed", false)));
        assert!(!pod_is_endpoint(&pod("a", "192.168.0.1", "Running", true)));
        let p = pod("a", "10.0.0.1", "Running", false);
        let labels = pod_identity_labels(&cluster(), &p, None);
        assert_eq!(
            labels.canonical(),
            "k8s:app=web;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=ns;\
             k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=ns"
        );
        let ns = NamespaceInfo {
            name: "ns".into(),
            labels: BTreeMap::from([("team".to_string(), "blue".to_string())]),
        };
        let labels = pod_identity_labels(&cluster(), &p, Some(&ns));
        assert_eq!(
            labels.get("io.cilium.k8s.namespace.labels.team"),
            Some("blue")
        );
        let ep = build_endpoint(&p, p.ips[0], IdentityId(0x10100));
        assert_eq!(ep.host_ip, Some("192.168.0.1".parse().unwrap()));
        assert_eq!(
            (ep.node.as_str(), ep.namespace.as_str(), ep.pod.as_str()),
            ("n1", "ns", "a")
        );
    }

    #[test]
    fn undecodable_pod_names_itself() {
        let obj = dynobj(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "ns", "name": "broken"},
            "spec": {"containers": "x"}
        }));
        let err = decode(ResourceKind::Pod, obj).unwrap_err();
        assert!(err.to_string().contains("Pod ns/broken"), "{err}");
    }

    #[test]
    fn node_slimming() {
        let obj = dynobj(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}, {"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "bogus"}]}
        }));
        let Object::Node(n) = decode(ResourceKind::Node, obj).unwrap() else {
            panic!()
        };
        let node = build_node(&cluster(), &n);
        assert_eq!(
            node.internal_ips,
            vec!["192.168.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(node.pod_cidrs.len(), 2);
    }

    #[test]
    fn model_relist_and_dirty() {
        let mut m = ClusterModel::new();
        let a = pod("a", "10.0.0.1", "Running", false);
        let b = pod("b", "10.0.0.2", "Running", false);
        m.handle(SourceEvent::Init(ResourceKind::Pod));
        m.handle(SourceEvent::InitApply(Object::Pod(a.clone())));
        m.handle(SourceEvent::InitApply(Object::Pod(b.clone())));
        assert!(!m.is_synced(ResourceKind::Pod));
        assert!(
            m.endpoint_pod(&a.ips[0]).is_none(),
            "buffered until InitDone"
        );
        m.handle(SourceEvent::InitDone(ResourceKind::Pod));
        assert!(m.is_synced(ResourceKind::Pod));
        assert_eq!(m.take_dirty().endpoints.len(), 2);
        // Relist without b: b's IP becomes dirty and has no pod.
        m.handle(SourceEvent::Init(ResourceKind::Pod));
        m.handle(SourceEvent::InitApply(Object::Pod(a.clone())));
        m.handle(SourceEvent::InitDone(ResourceKind::Pod));
        let d = m.take_dirty();
        assert!(d.endpoints.contains(&b.ips[0]));
        assert!(m.endpoint_pod(&b.ips[0]).is_none());
        assert!(m.endpoint_pod(&a.ips[0]).is_some());
        // A pod moving IP dirties both IPs.
        let a2 = pod("a", "10.0.0.9", "Running", false);
        m.handle(SourceEvent::Apply(Object::Pod(a2)));
        let d = m.take_dirty();
        assert_eq!(d.endpoints.len(), 2);
        assert!(m.endpoint_pod(&a.ips[0]).is_none());
    }

    #[test]
    fn model_slices_follow_services() {
        let mut m = ClusterModel::new();
        let svc = service(json!({"service.cilium.io/global": "true"}));
        m.handle(SourceEvent::Apply(Object::Service(svc.clone())));
        let s = slice(
            "web-a",
            json!([{"addresses": ["10.0.0.1"]}]),
            json!([{"name": "http", "port": 80}]),
        );
        m.handle(SourceEvent::Apply(Object::EndpointSlice(s.clone())));
        let d = m.take_dirty();
        assert_eq!(d.services.iter().collect::<Vec<_>>(), vec![&svc.key]);
        assert_eq!(
            m.global_service(&cluster(), &svc.key)
                .unwrap()
                .backends
                .len(),
            1
        );
        m.handle(SourceEvent::Delete(
            ResourceKind::EndpointSlice,
            s.key.clone(),
        ));
        assert!(m.take_dirty().services.contains(&svc.key));
        assert!(
            m.global_service(&cluster(), &svc.key)
                .unwrap()
                .backends
                .is_empty()
        );
    }

    #[test]
    fn ip_shared_by_two_pods_prefers_running() {
        let mut m = ClusterModel::new();
        let mut old = pod("old", "10.0.0.1", "Running", false);
        old.terminating = true;
        let new = pod("new", "10.0.0.1", "Running", false);
        m.apply(Object::Pod(old));
        m.apply(Object::Pod(new));
        assert_eq!(
            m.endpoint_pod(&"10.0.0.1".parse().unwrap())
                .unwrap()
                .key
                .name,
            "new"
        );
        m.delete(ResourceKind::Pod, &ObjKey::new("ns", "new"));
        assert_eq!(
            m.endpoint_pod(&"10.0.0.1".parse().unwrap())
                .unwrap()
                .key
                .name,
            "old"
        );
    }
}
