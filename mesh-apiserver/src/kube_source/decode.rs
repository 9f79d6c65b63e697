//! Decoding: resource kinds and object keys, the slim objects, and decoding a `DynamicObject` into one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1 as discoveryv1;
use kube::api::{ApiResource, DynamicObject};
use mesh_core::annotations::{AnnotationProblem, ServiceAnnotations, parse_service_annotations};
use mesh_core::policy::PolicyKind;
use mesh_core::{BackendConditions, Protocol, ServicePort, TrafficPolicy};
use tracing::warn;

use super::*;

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

    pub(super) fn api_resource(self) -> ApiResource {
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
pub struct KubeObjectKey {
    pub namespace: String,
    pub name: String,
}

impl KubeObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for KubeObjectKey {
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
    pub key: KubeObjectKey,
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
    pub key: KubeObjectKey,
    /// The Service named by the `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

/// What the mesh needs of a Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub key: KubeObjectKey,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
    pub host_ip: Option<IpAddr>,
    pub phase: String,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// Container ports with a name (`spec.containers[*].ports[*]`), sorted and deduplicated:
    /// what policy ports given by name resolve to.
    pub named_ports: Vec<ServicePort>,
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
    pub key: KubeObjectKey,
    pub uid: Option<String>,
    pub object: serde_json::Value,
}

/// A slim Kubernetes object of one of the watched kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum SlimObject {
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    Pod(PodInfo),
    Node(NodeInfo),
    Namespace(NamespaceInfo),
    Policy(PolicyInfo),
}

impl SlimObject {
    pub fn kind(&self) -> ResourceKind {
        match self {
            SlimObject::Service(_) => ResourceKind::Service,
            SlimObject::EndpointSlice(_) => ResourceKind::EndpointSlice,
            SlimObject::Pod(_) => ResourceKind::Pod,
            SlimObject::Node(_) => ResourceKind::Node,
            SlimObject::Namespace(_) => ResourceKind::Namespace,
            SlimObject::Policy(p) => ResourceKind::of_policy(p.kind),
        }
    }

    pub fn key(&self) -> KubeObjectKey {
        match self {
            SlimObject::Service(s) => s.key.clone(),
            SlimObject::EndpointSlice(s) => s.key.clone(),
            SlimObject::Pod(p) => p.key.clone(),
            SlimObject::Node(n) => KubeObjectKey::new("", n.name.clone()),
            SlimObject::Namespace(n) => KubeObjectKey::new("", n.name.clone()),
            SlimObject::Policy(p) => p.key.clone(),
        }
    }
}

/// What a watcher tells the model.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    Apply(SlimObject),
    Delete(ResourceKind, KubeObjectKey),
    /// A (re)list of the kind starts: buffer until `InitDone`.
    Init(ResourceKind),
    InitApply(SlimObject),
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

pub(super) fn key_of(obj: &DynamicObject) -> KubeObjectKey {
    KubeObjectKey::new(
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
) -> Result<Protocol, KubeDecodeError> {
    match value {
        None | Some("") => Ok(Protocol::Tcp),
        Some(p) => p.parse().map_err(|_| KubeDecodeError::Invalid {
            kind,
            name: name.to_string(),
            reason: format!("unknown protocol {p:?}"),
        }),
    }
}

fn parse_port(kind: ResourceKind, name: &str, value: i32) -> Result<u16, KubeDecodeError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| KubeDecodeError::Invalid {
            kind,
            name: name.to_string(),
            reason: format!("port {value} is not in 1..=65535"),
        })
}

/// Decodes a watched object into its slim form. The object's own kind decides the type.
pub fn decode(kind: ResourceKind, obj: DynamicObject) -> Result<SlimObject, KubeDecodeError> {
    let name = obj_name(&obj);
    let json_err = |source| KubeDecodeError::Json {
        kind,
        name: name.clone(),
        source,
    };
    let value = serde_json::to_value(obj).map_err(json_err)?;
    Ok(match kind {
        ResourceKind::Service => SlimObject::Service(slim_service(
            serde_json::from_value(value).map_err(json_err)?,
        )?),
        ResourceKind::EndpointSlice => SlimObject::EndpointSlice(slim_slice(
            serde_json::from_value(value).map_err(json_err)?,
        )?),
        ResourceKind::Pod => {
            SlimObject::Pod(slim_pod(serde_json::from_value(value).map_err(json_err)?))
        }
        ResourceKind::Node => {
            SlimObject::Node(slim_node(serde_json::from_value(value).map_err(json_err)?))
        }
        ResourceKind::Namespace => {
            let ns: corev1::Namespace = serde_json::from_value(value).map_err(json_err)?;
            SlimObject::Namespace(NamespaceInfo {
                name: ns.metadata.name.unwrap_or_default(),
                labels: ns.metadata.labels.unwrap_or_default(),
            })
        }
        ResourceKind::NetworkPolicy
        | ResourceKind::CiliumNetworkPolicy
        | ResourceKind::CiliumClusterwideNetworkPolicy => {
            SlimObject::Policy(slim_policy(kind, value))
        }
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
        key: KubeObjectKey::new(
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

fn meta_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> KubeObjectKey {
    KubeObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Slims a Service. Annotation problems are kept on the object for the publisher to report.
pub fn slim_service(svc: corev1::Service) -> Result<ServiceInfo, KubeDecodeError> {
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
pub fn slim_slice(slice: discoveryv1::EndpointSlice) -> Result<SliceInfo, KubeDecodeError> {
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
    // Named container ports. A port whose protocol we do not know is skipped (a policy
    // naming it then matches nothing: fail closed).
    let mut named_ports: Vec<ServicePort> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone().filter(|n| !n.is_empty())?;
            let protocol = p.protocol.as_deref().unwrap_or("TCP").parse().ok()?;
            let port = u16::try_from(p.container_port).ok().filter(|p| *p != 0)?;
            Some(ServicePort {
                name,
                protocol,
                port,
            })
        })
        .collect();
    named_ports.sort();
    named_ports.dedup();
    PodInfo {
        named_ports,
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
