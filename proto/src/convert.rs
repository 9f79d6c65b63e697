//! Conversions between the wire/storage types of [`crate::pb`] and the domain types of
//! mesh-core, and the etcd value encoding (DESIGN.md sections 6 and 7).
//!
//! Decoding is strict: every field is validated and an error names the object and the field
//! (`endpoint 10.0.0.x: invalid ip "10.0.0.x": ...`). Encoding cannot fail.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::cidr::parse_cidr;
use mesh_core::policy::{Policy, PolicyError, PolicyKind, parse_policy};
use mesh_core::{
    Affinity, Backend, BackendConditions, ClusterConfig, ClusterId, ClusterName, Endpoint,
    GlobalService, IdentityId, IdentityLabels, Node, Protocol, ServicePort, TrafficPolicy,
};
use prost::Message;

use crate::pb;

/// A wire or storage object that violates a domain rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: invalid {field} {value:?}: {reason}")]
pub struct ConvertError {
    /// The object, e.g. `endpoint 10.0.0.1` or `service east/default/web`.
    pub object: String,
    /// The field path, e.g. `backends[2].ports[0].port`.
    pub field: String,
    /// The offending value as received.
    pub value: String,
    pub reason: String,
}

/// An etcd value that cannot be decoded as the message of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueDecodeError {
    #[error("cannot decode a value of kind {kind:?}: the kind is unspecified")]
    UnspecifiedKind { kind: pb::Kind },
    #[error("corrupt {kind:?} value ({len} bytes): {source}")]
    Corrupt {
        kind: pb::Kind,
        len: usize,
        #[source]
        source: prost::DecodeError,
    },
}

/// A field's path in an error (`backends[2].ports[0].port`): a string, or a closure that
/// formats it, so that a valid object never formats its field paths.
trait Field {
    fn path(self) -> String;
}

impl Field for &str {
    fn path(self) -> String {
        self.to_owned()
    }
}

impl Field for String {
    fn path(self) -> String {
        self
    }
}

impl<F: FnOnce() -> String> Field for F {
    fn path(self) -> String {
        self()
    }
}

/// Error context for one object: `F` describes it (`endpoint 10.0.0.1`) and runs only for
/// an error. A snapshot converts hundreds of thousands of objects: formatting each one's
/// description up front was a quarter of the conversion's time.
struct Ctx<F: Fn() -> String>(F);

impl<F: Fn() -> String> Ctx<F> {
    fn err(&self, field: impl Field, value: impl ToString, reason: impl ToString) -> ConvertError {
        ConvertError {
            object: (self.0)(),
            field: field.path(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    fn cluster(&self, field: &str, v: &str) -> Result<ClusterName, ConvertError> {
        ClusterName::new(v).map_err(|e| self.err(field, v, e))
    }

    fn ip(&self, field: impl Field, v: &str) -> Result<IpAddr, ConvertError> {
        v.parse().map_err(|e| self.err(field, v, e))
    }

    fn ips(&self, field: &str, vs: &[String]) -> Result<Vec<IpAddr>, ConvertError> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| self.ip(|| format!("{field}[{i}]"), v))
            .collect()
    }

    fn cidrs(&self, field: &str, vs: &[String]) -> Result<Vec<ipnet::IpNet>, ConvertError> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| parse_cidr(v).map_err(|e| self.err(format!("{field}[{i}]"), v, e)))
            .collect()
    }

    fn non_empty(&self, field: &str, v: &str) -> Result<String, ConvertError> {
        if v.is_empty() {
            return Err(self.err(field, v, "must not be empty"));
        }
        Ok(v.to_owned())
    }

    /// A name that is one segment of an object's key (`<namespace>/<name>` for services):
    /// with a `/` it would be another object's key, and a delete could not find it.
    fn key_segment(&self, field: &str, v: &str) -> Result<String, ConvertError> {
        if v.contains('/') {
            return Err(self.err(field, v, "must not contain '/'"));
        }
        self.non_empty(field, v)
    }

    fn protocol(&self, field: impl Field, v: i32) -> Result<Protocol, ConvertError> {
        match pb::Protocol::try_from(v) {
            Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
            Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
            Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
            Ok(pb::Protocol::Unspecified) => Err(self.err(field, v, "protocol is unspecified")),
            Err(_) => Err(self.err(field, v, "unknown protocol")),
        }
    }

    fn port(&self, field: impl Field, v: u32) -> Result<u16, ConvertError> {
        match u16::try_from(v) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.err(field, v, "must be in 1..=65535")),
        }
    }

    /// `field` is the list's path (formatted only for an error).
    fn ports(
        &self,
        field: impl Fn() -> String,
        vs: &[pb::ServicePort],
    ) -> Result<Vec<ServicePort>, ConvertError> {
        vs.iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(ServicePort {
                    name: p.name.clone(),
                    protocol: self.protocol(|| format!("{}[{i}].protocol", field()), p.protocol)?,
                    port: self.port(|| format!("{}[{i}].port", field()), p.port)?,
                })
            })
            .collect()
    }
}

// === ClusterConfig ===

impl TryFrom<pb::ClusterConfig> for ClusterConfig {
    type Error = ConvertError;
    fn try_from(c: pb::ClusterConfig) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| format!("cluster config {:?}", c.name));
        Ok(ClusterConfig {
            name: ctx.cluster("name", &c.name)?,
            id: ClusterId::new(c.id).map_err(|e| ctx.err("id", c.id, e))?,
            pod_cidrs: ctx.cidrs("pod_cidrs", &c.pod_cidrs)?,
            service_cidr: c
                .service_cidr
                .as_deref()
                .map(|v| parse_cidr(v).map_err(|e| ctx.err("service_cidr", v, e)))
                .transpose()?,
            capabilities: c.capabilities,
            version: c.version,
        })
    }
}

impl From<&ClusterConfig> for pb::ClusterConfig {
    fn from(c: &ClusterConfig) -> Self {
        pb::ClusterConfig {
            name: c.name.to_string(),
            id: c.id.into(),
            pod_cidrs: c.pod_cidrs.iter().map(|n| n.to_string()).collect(),
            service_cidr: c.service_cidr.map(|n| n.to_string()),
            capabilities: c.capabilities.clone(),
            version: c.version.clone(),
        }
    }
}

// === Node ===

impl TryFrom<pb::Node> for Node {
    type Error = ConvertError;
    fn try_from(n: pb::Node) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| format!("node {}/{}", n.cluster, n.name));
        Ok(Node {
            cluster: ctx.cluster("cluster", &n.cluster)?,
            name: ctx.non_empty("name", &n.name)?,
            internal_ips: ctx.ips("internal_ips", &n.internal_ips)?,
            pod_cidrs: ctx.cidrs("pod_cidrs", &n.pod_cidrs)?,
            stale_since: match n.stale_since_unix_ms {
                0 => None,
                ms => Some(unix_ms_time(&ctx, "stale_since_unix_ms", ms)?),
            },
        })
    }
}

/// A positive Unix time in milliseconds as a `SystemTime`.
fn unix_ms_time(
    ctx: &Ctx<impl Fn() -> String>,
    field: &str,
    ms: i64,
) -> Result<SystemTime, ConvertError> {
    let ms = u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| ctx.err(field, ms, "must be a positive Unix time in milliseconds"))?;
    Ok(UNIX_EPOCH + Duration::from_millis(ms))
}

/// A `SystemTime` as Unix milliseconds (0 before the epoch).
fn time_unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl From<&Node> for pb::Node {
    fn from(n: &Node) -> Self {
        pb::Node {
            cluster: n.cluster.to_string(),
            name: n.name.clone(),
            internal_ips: n.internal_ips.iter().map(|i| i.to_string()).collect(),
            pod_cidrs: n.pod_cidrs.iter().map(|c| c.to_string()).collect(),
            stale_since_unix_ms: n.stale_since.map_or(0, time_unix_ms),
        }
    }
}

// === Identity ===

impl TryFrom<pb::Identity> for mesh_core::model::Identity {
    type Error = ConvertError;
    fn try_from(i: pb::Identity) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| format!("identity {}", i.id));
        if i.id == 0 {
            return Err(ctx.err("id", 0, "identity 0 is not a valid identity"));
        }
        let labels = IdentityLabels::from_strings(i.labels.iter().cloned())
            .map_err(|e| ctx.err("labels", i.labels.join(","), e))?;
        Ok(mesh_core::model::Identity {
            id: IdentityId(i.id),
            labels,
        })
    }
}

impl From<&mesh_core::model::Identity> for pb::Identity {
    fn from(i: &mesh_core::model::Identity) -> Self {
        pb::Identity {
            id: i.id.0,
            labels: i.labels.iter().map(str::to_owned).collect(),
        }
    }
}

// === Endpoint ===

impl TryFrom<pb::Endpoint> for Endpoint {
    type Error = ConvertError;
    fn try_from(e: pb::Endpoint) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| format!("endpoint {}", e.ip));
        Ok(Endpoint {
            ip: ctx.ip("ip", &e.ip)?,
            identity: match e.identity {
                0 => return Err(ctx.err("identity", 0, "identity 0 is not a valid identity")),
                id => IdentityId(id),
            },
            host_ip: e
                .host_ip
                .as_deref()
                .map(|h| ctx.ip("host_ip", h))
                .transpose()?,
            named_ports: ctx.ports(|| "named_ports".to_owned(), &e.named_ports)?,
            node: e.node,
            namespace: e.namespace,
            pod: e.pod,
        })
    }
}

impl From<&Endpoint> for pb::Endpoint {
    fn from(e: &Endpoint) -> Self {
        pb::Endpoint {
            ip: e.ip.to_string(),
            identity: e.identity.0,
            host_ip: e.host_ip.map(|h| h.to_string()),
            node: e.node.clone(),
            namespace: e.namespace.clone(),
            pod: e.pod.clone(),
            named_ports: e.named_ports.iter().map(Into::into).collect(),
        }
    }
}

// === enums ===

impl From<Protocol> for pb::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
            Protocol::Sctp => pb::Protocol::Sctp,
        }
    }
}

impl From<Affinity> for pb::Affinity {
    fn from(a: Affinity) -> Self {
        match a {
            Affinity::None => pb::Affinity::None,
            Affinity::Local => pb::Affinity::Local,
            Affinity::Remote => pb::Affinity::Remote,
        }
    }
}

impl From<pb::Affinity> for Affinity {
    fn from(a: pb::Affinity) -> Self {
        match a {
            pb::Affinity::None => Affinity::None,
            pb::Affinity::Local => Affinity::Local,
            pb::Affinity::Remote => Affinity::Remote,
        }
    }
}

impl From<TrafficPolicy> for pb::TrafficPolicy {
    fn from(t: TrafficPolicy) -> Self {
        match t {
            TrafficPolicy::Cluster => pb::TrafficPolicy::Cluster,
            TrafficPolicy::Local => pb::TrafficPolicy::Local,
        }
    }
}

impl From<pb::TrafficPolicy> for TrafficPolicy {
    fn from(t: pb::TrafficPolicy) -> Self {
        match t {
            pb::TrafficPolicy::Cluster => TrafficPolicy::Cluster,
            pb::TrafficPolicy::Local => TrafficPolicy::Local,
        }
    }
}

impl From<&ServicePort> for pb::ServicePort {
    fn from(p: &ServicePort) -> Self {
        pb::ServicePort {
            name: p.name.clone(),
            protocol: pb::Protocol::from(p.protocol).into(),
            port: p.port.into(),
        }
    }
}

// === GlobalService ===

impl TryFrom<pb::GlobalService> for GlobalService {
    type Error = ConvertError;
    fn try_from(s: pb::GlobalService) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| format!("service {}/{}/{}", s.cluster, s.namespace, s.name));
        let affinity = pb::Affinity::try_from(s.affinity)
            .map_err(|_| ctx.err("affinity", s.affinity, "unknown affinity"))?;
        let itp = pb::TrafficPolicy::try_from(s.internal_traffic_policy).map_err(|_| {
            ctx.err(
                "internal_traffic_policy",
                s.internal_traffic_policy,
                "unknown traffic policy",
            )
        })?;
        let backends = s
            .backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(Backend {
                    ip: ctx.ip(|| format!("backends[{i}].ip"), &b.ip)?,
                    ports: ctx.ports(|| format!("backends[{i}].ports"), &b.ports)?,
                    node: b.node,
                    zone: b.zone,
                    conditions: BackendConditions {
                        ready: b.ready,
                        serving: b.serving,
                        terminating: b.terminating,
                    },
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(GlobalService {
            cluster: ctx.cluster("cluster", &s.cluster)?,
            namespace: ctx.key_segment("namespace", &s.namespace)?,
            name: ctx.key_segment("name", &s.name)?,
            global: !s.local_only,
            shared: s.shared,
            affinity: affinity.into(),
            internal_traffic_policy: itp.into(),
            ports: ctx.ports(|| "ports".to_owned(), &s.ports)?,
            frontends: ctx.ips("frontends", &s.frontends)?,
            backends,
        })
    }
}

impl From<&GlobalService> for pb::GlobalService {
    fn from(s: &GlobalService) -> Self {
        pb::GlobalService {
            cluster: s.cluster.to_string(),
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            shared: s.shared,
            local_only: !s.global,
            affinity: pb::Affinity::from(s.affinity).into(),
            internal_traffic_policy: pb::TrafficPolicy::from(s.internal_traffic_policy).into(),
            ports: s.ports.iter().map(Into::into).collect(),
            frontends: s.frontends.iter().map(|f| f.to_string()).collect(),
            backends: s
                .backends
                .iter()
                .map(|b| pb::Backend {
                    ip: b.ip.to_string(),
                    ports: b.ports.iter().map(Into::into).collect(),
                    node: b.node.clone(),
                    zone: b.zone.clone(),
                    ready: b.conditions.ready,
                    serving: b.conditions.serving,
                    terminating: b.conditions.terminating,
                })
                .collect(),
        }
    }
}

// === Policy ===

/// A published network policy: the object as applied (JSON, what the publisher validated)
/// and what [`parse_policy`] makes of it. Readers re-parse the JSON with the same function
/// instead of receiving a second encoding of the model, so the publisher, the agent and
/// meshctl cannot disagree on what a policy means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyObject {
    /// The Kubernetes object, compact JSON.
    pub object: String,
    pub policy: Policy,
}

// === impl PolicyObject ===

impl PolicyObject {
    /// Parses `object` as a policy of `cluster`.
    pub fn parse(object: String, cluster: &ClusterName) -> Result<Self, PolicyObjectError> {
        let json: serde_json::Value =
            serde_json::from_str(&object).map_err(|e| PolicyObjectError::Json(e.to_string()))?;
        let policy = parse_policy(&json, cluster).map_err(PolicyObjectError::Policy)?;
        Ok(Self { object, policy })
    }

    /// The name within (cluster, `Kind::Policy`): `<policy kind>/<namespace>/<name>`.
    pub fn name(&self) -> String {
        let r = &self.policy.reference;
        crate::keys::policy_name(r.kind, r.namespace.as_deref(), &r.name)
    }
}

/// Why a policy object does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyObjectError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error(transparent)]
    Policy(PolicyError),
}

fn policy_kind_to_pb(k: PolicyKind) -> pb::PolicyKind {
    match k {
        PolicyKind::NetworkPolicy => pb::PolicyKind::NetworkPolicy,
        PolicyKind::CiliumNetworkPolicy => pb::PolicyKind::CiliumNetworkPolicy,
        PolicyKind::CiliumClusterwideNetworkPolicy => {
            pb::PolicyKind::CiliumClusterwideNetworkPolicy
        }
    }
}

impl TryFrom<pb::Policy> for PolicyObject {
    type Error = ConvertError;
    fn try_from(p: pb::Policy) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| {
            format!(
                "policy {}/{}/{}",
                p.cluster,
                if p.namespace.is_empty() {
                    "_"
                } else {
                    &p.namespace
                },
                p.name
            )
        });
        let cluster = ctx.cluster("cluster", &p.cluster)?;
        let parsed = PolicyObject::parse(p.object, &cluster)
            .map_err(|e| ctx.err("object", "<the policy object>", e))?;
        let r = &parsed.policy.reference;
        // The fields readers filter and delete by must say what the object says.
        if p.kind != policy_kind_to_pb(r.kind) as i32 {
            return Err(ctx.err("kind", p.kind, format!("the object is a {}", r.kind)));
        }
        if p.namespace != r.namespace.as_deref().unwrap_or_default() {
            return Err(ctx.err(
                "namespace",
                &p.namespace,
                format!(
                    "the object's namespace is {:?}",
                    r.namespace.as_deref().unwrap_or("")
                ),
            ));
        }
        if p.name != r.name {
            return Err(ctx.err("name", &p.name, format!("the object is named {:?}", r.name)));
        }
        Ok(parsed)
    }
}

impl From<&PolicyObject> for pb::Policy {
    fn from(p: &PolicyObject) -> Self {
        let r = &p.policy.reference;
        pb::Policy {
            cluster: r.cluster.to_string(),
            kind: policy_kind_to_pb(r.kind) as i32,
            namespace: r.namespace.clone().unwrap_or_default(),
            name: r.name.clone(),
            object: p.object.clone(),
        }
    }
}

// === PeerLink ===

/// A peer's link state as the serving cluster's importer sees it: stale since `stale_since`
/// (the key exists only while the peer is stale).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    pub cluster: ClusterName,
    pub stale_since: SystemTime,
}

impl TryFrom<pb::PeerLink> for PeerLink {
    type Error = ConvertError;
    fn try_from(l: pb::PeerLink) -> Result<Self, ConvertError> {
        let ctx = Ctx(|| format!("link {}", l.cluster));
        let cluster = ctx.cluster("cluster", &l.cluster)?;
        Ok(PeerLink {
            cluster,
            stale_since: unix_ms_time(&ctx, "stale_since_unix_ms", l.stale_since_unix_ms)?,
        })
    }
}

impl From<&PeerLink> for pb::PeerLink {
    fn from(l: &PeerLink) -> Self {
        pb::PeerLink {
            cluster: l.cluster.to_string(),
            stale_since_unix_ms: time_unix_ms(l.stale_since),
        }
    }
}

// ================================================================ typed objects

/// A published object of any kind, as a mesh-core type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchedObject {
    Config(ClusterConfig),
    Node(Node),
    Identity(mesh_core::model::Identity),
    Endpoint(Endpoint),
    Service(GlobalService),
    Policy(PolicyObject),
    Link(PeerLink),
}

// === impl WatchedObject ===

impl WatchedObject {
    /// The kind of the object.
    pub fn kind(&self) -> pb::Kind {
        match self {
            WatchedObject::Config(_) => pb::Kind::Config,
            WatchedObject::Node(_) => pb::Kind::Node,
            WatchedObject::Identity(_) => pb::Kind::Identity,
            WatchedObject::Endpoint(_) => pb::Kind::Endpoint,
            WatchedObject::Service(_) => pb::Kind::Service,
            WatchedObject::Policy(_) => pb::Kind::Policy,
            WatchedObject::Link(_) => pb::Kind::Link,
        }
    }

    /// The object's name within (cluster, kind), as in etcd keys and `Event.name`: node
    /// name, identity number, endpoint IP, `<namespace>/<name>`, `""` for the config.
    pub fn name(&self) -> String {
        match self {
            WatchedObject::Config(_) | WatchedObject::Link(_) => String::new(),
            WatchedObject::Node(n) => n.name.clone(),
            WatchedObject::Identity(i) => i.id.0.to_string(),
            WatchedObject::Endpoint(e) => e.ip.to_string(),
            WatchedObject::Service(s) => s.key(),
            WatchedObject::Policy(p) => p.name(),
        }
    }

    /// The cluster named inside the object, for kinds that carry one.
    pub fn cluster(&self) -> Option<&ClusterName> {
        match self {
            WatchedObject::Config(c) => Some(&c.name),
            WatchedObject::Node(n) => Some(&n.cluster),
            WatchedObject::Service(s) => Some(&s.cluster),
            WatchedObject::Policy(p) => Some(&p.policy.reference.cluster),
            WatchedObject::Link(l) => Some(&l.cluster),
            WatchedObject::Identity(_) | WatchedObject::Endpoint(_) => None,
        }
    }
}

impl TryFrom<pb::event::Value> for WatchedObject {
    type Error = ConvertError;
    fn try_from(v: pb::event::Value) -> Result<Self, ConvertError> {
        Ok(match v {
            pb::event::Value::Config(c) => WatchedObject::Config(c.try_into()?),
            pb::event::Value::Node(n) => WatchedObject::Node(n.try_into()?),
            pb::event::Value::Identity(i) => WatchedObject::Identity(i.try_into()?),
            pb::event::Value::Endpoint(e) => WatchedObject::Endpoint(e.try_into()?),
            pb::event::Value::Service(s) => WatchedObject::Service(s.try_into()?),
            pb::event::Value::Policy(p) => WatchedObject::Policy(p.try_into()?),
            pb::event::Value::Link(l) => WatchedObject::Link(l.try_into()?),
        })
    }
}

impl From<&WatchedObject> for pb::event::Value {
    fn from(o: &WatchedObject) -> Self {
        match o {
            WatchedObject::Config(c) => pb::event::Value::Config(c.into()),
            WatchedObject::Node(n) => pb::event::Value::Node(n.into()),
            WatchedObject::Identity(i) => pb::event::Value::Identity(i.into()),
            WatchedObject::Endpoint(e) => pb::event::Value::Endpoint(e.into()),
            WatchedObject::Service(s) => pb::event::Value::Service(s.into()),
            WatchedObject::Policy(p) => pb::event::Value::Policy(p.into()),
            WatchedObject::Link(l) => pb::event::Value::Link(l.into()),
        }
    }
}

/// The kind of a wire value.
pub fn value_kind(v: &pb::event::Value) -> pb::Kind {
    match v {
        pb::event::Value::Config(_) => pb::Kind::Config,
        pb::event::Value::Node(_) => pb::Kind::Node,
        pb::event::Value::Identity(_) => pb::Kind::Identity,
        pb::event::Value::Endpoint(_) => pb::Kind::Endpoint,
        pb::event::Value::Service(_) => pb::Kind::Service,
        pb::event::Value::Policy(_) => pb::Kind::Policy,
        pb::event::Value::Link(_) => pb::Kind::Link,
    }
}

// ================================================================ etcd values

/// Decodes an etcd value under `clusters/<c>/<kind>/...`: the protobuf message of `kind`.
pub fn decode_value(kind: pb::Kind, bytes: &[u8]) -> Result<pb::event::Value, ValueDecodeError> {
    let corrupt = |source| ValueDecodeError::Corrupt {
        kind,
        len: bytes.len(),
        source,
    };
    Ok(match kind {
        pb::Kind::Config => {
            pb::event::Value::Config(pb::ClusterConfig::decode(bytes).map_err(corrupt)?)
        }
        pb::Kind::Node => pb::event::Value::Node(pb::Node::decode(bytes).map_err(corrupt)?),
        pb::Kind::Identity => {
            pb::event::Value::Identity(pb::Identity::decode(bytes).map_err(corrupt)?)
        }
        pb::Kind::Endpoint => {
            pb::event::Value::Endpoint(pb::Endpoint::decode(bytes).map_err(corrupt)?)
        }
        pb::Kind::Service => {
            pb::event::Value::Service(pb::GlobalService::decode(bytes).map_err(corrupt)?)
        }
        pb::Kind::Policy => pb::event::Value::Policy(pb::Policy::decode(bytes).map_err(corrupt)?),
        pb::Kind::Link => pb::event::Value::Link(pb::PeerLink::decode(bytes).map_err(corrupt)?),
        pb::Kind::Unspecified => return Err(ValueDecodeError::UnspecifiedKind { kind }),
    })
}

/// Encodes a value for etcd (its kind is implied by the key).
pub fn encode_value(value: &pb::event::Value) -> Vec<u8> {
    match value {
        pb::event::Value::Config(m) => m.encode_to_vec(),
        pb::event::Value::Node(m) => m.encode_to_vec(),
        pb::event::Value::Identity(m) => m.encode_to_vec(),
        pb::event::Value::Endpoint(m) => m.encode_to_vec(),
        pb::event::Value::Service(m) => m.encode_to_vec(),
        pb::event::Value::Policy(m) => m.encode_to_vec(),
        pb::event::Value::Link(m) => m.encode_to_vec(),
    }
}

/// Encodes a domain object for etcd.
pub fn encode_object(object: &WatchedObject) -> Vec<u8> {
    encode_value(&object.into())
}

/// Errors of [`decode_object`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error(transparent)]
    Decode(#[from] ValueDecodeError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// Decodes and validates an etcd value of `kind` into a domain object.
pub fn decode_object(kind: pb::Kind, bytes: &[u8]) -> Result<WatchedObject, ObjectError> {
    Ok(decode_value(kind, bytes)?.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> pb::GlobalService {
        pb::GlobalService {
            cluster: "east".into(),
            namespace: "default".into(),
            name: "web".into(),
            local_only: false,
            shared: true,
            affinity: pb::Affinity::Local.into(),
            internal_traffic_policy: pb::TrafficPolicy::Cluster.into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                protocol: pb::Protocol::Tcp.into(),
                port: 80,
            }],
            frontends: vec!["10.96.0.10".into()],
            backends: vec![pb::Backend {
                ip: "10.1.0.5".into(),
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    protocol: pb::Protocol::Tcp.into(),
                    port: 8080,
                }],
                node: "n1".into(),
                zone: "z".into(),
                ready: true,
                serving: true,
                terminating: false,
            }],
        }
    }

    #[test]
    fn errors_name_object_and_field() {
        let e = Endpoint::try_from(pb::Endpoint {
            ip: "10.0.0.x".into(),
            identity: 300,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.object, "endpoint 10.0.0.x");
        assert!(
            e.to_string()
                .starts_with("endpoint 10.0.0.x: invalid ip \"10.0.0.x\""),
            "{e}"
        );

        let mut s = svc();
        s.backends[0].ports[0].port = 70000;
        let e = GlobalService::try_from(s).unwrap_err();
        assert_eq!(e.object, "service east/default/web");
        assert_eq!(e.field, "backends[0].ports[0].port");
        assert!(e.to_string().contains("70000"), "{e}");

        let mut s = svc();
        s.ports[0].protocol = 0;
        let e = GlobalService::try_from(s).unwrap_err();
        assert_eq!(e.field, "ports[0].protocol");

        let mut s = svc();
        s.affinity = 9;
        assert_eq!(GlobalService::try_from(s).unwrap_err().field, "affinity");

        let mut s = svc();
        s.cluster = "Bad_Name".into();
        assert_eq!(GlobalService::try_from(s).unwrap_err().field, "cluster");

        let e = ClusterConfig::try_from(pb::ClusterConfig {
            name: "east".into(),
            id: 3,
            pod_cidrs: vec!["10.1.0.1/16".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "pod_cidrs[0]");
        assert!(e.to_string().contains("host bits"), "{e}");

        let e = ClusterConfig::try_from(pb::ClusterConfig {
            name: "east".into(),
            id: 0,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "id");

        let e = mesh_core::model::Identity::try_from(pb::Identity {
            id: 70000,
            labels: vec!["app=x".into()],
        })
        .unwrap_err();
        assert_eq!(e.object, "identity 70000");
        assert_eq!(e.field, "labels");
    }

    #[test]
    fn service_roundtrip_and_name() {
        let core = GlobalService::try_from(svc()).unwrap();
        assert_eq!(core.affinity, Affinity::Local);
        assert_eq!(core.backends[0].ports[0].port, 8080);
        assert!(core.backends[0].conditions.ready);
        assert_eq!(pb::GlobalService::from(&core), svc());
        let obj = WatchedObject::Service(core);
        assert_eq!(obj.name(), "default/web");
        assert_eq!(obj.kind(), pb::Kind::Service);
        let bytes = encode_object(&obj);
        assert_eq!(decode_object(pb::Kind::Service, &bytes).unwrap(), obj);
    }

    /// Found by the `etcd_value` fuzz target: a service whose namespace held a `/`
    /// (`defaul/` + `web`) was accepted under the key `defaul//web`, and its delete, split
    /// at the first `/`, missed it: a stale service forever.
    #[test]
    fn service_names_cannot_hold_the_key_separator() {
        for (ns, name) in [("defaul/", "web"), ("default", "a/b"), ("", "web")] {
            let mut s = svc();
            s.namespace = ns.into();
            s.name = name.into();
            let e = GlobalService::try_from(s).unwrap_err();
            let field = if ns == "default" { "name" } else { "namespace" };
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn corrupt_values_are_reported() {
        let err = decode_value(pb::Kind::Node, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(
            matches!(
                err,
                ValueDecodeError::Corrupt {
                    kind: pb::Kind::Node,
                    len: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("Node"), "{err}");
        assert!(matches!(
            decode_value(pb::Kind::Unspecified, &[]),
            Err(ValueDecodeError::UnspecifiedKind { .. })
        ));
    }
}
