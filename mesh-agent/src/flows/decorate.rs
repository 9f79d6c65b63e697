//! From a datapath record to a Hubble flow: identities resolved to labels, addresses to pods,
//! nodes and clusters, service frontends to names, rule ids to policies. Pure: the agent
//! builds a [`FlowContext`] after each reconcile and decorates every record with it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use mesh_core::ClusterName;
use mesh_core::policy::{Direction, PolicyKind, RuleRef, Verdict as RuleVerdict};
use mesh_maps::layout::{self, FlowEvent};
use mesh_proto::flows::event_type;
use mesh_proto::hubble::flow::{
    self as hf, CiliumEventType, DropReason, Flow, FlowType, IpVersion, Layer4, Policy,
    SocketTranslationPoint, TraceObservationPoint, TrafficDirection, Verdict, layer4,
};

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Where an address lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    pub cluster: ClusterName,
    pub namespace: String,
    pub pod: String,
    pub node: String,
}

/// A pod address of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub pod: String,
    pub node: String,
}

/// What flows are decorated with from one cluster: its identities' labels and its pod and
/// node addresses. Built from the cluster's state when its addresses or identities changed
/// (`generation`), shared by reference between contexts otherwise, so that a context
/// after a reconcile under churn costs the clusters that changed, not a copy of every
/// endpoint's names.
#[derive(Debug, Clone, Default)]
pub struct ClusterFlowInfo {
    /// The cluster's `(addresses, identities)` generations it was built at (`None`: not
    /// from a watched state, e.g. built by hand).
    pub generation: Option<(u64, u64)>,
    /// Identity -> labels (`k8s:key=value`).
    pub identities: HashMap<u32, Arc<[String]>>,
    pub pods: HashMap<Ipv4Addr, PodInfo>,
    /// Node addresses -> node name.
    pub nodes: HashMap<Ipv4Addr, String>,
}

impl ClusterFlowInfo {
    /// The part of cluster `data` (whose generations it records).
    pub fn build(data: &mesh_proto::state::ClusterData) -> Self {
        let g = data.generations;
        let state = &data.state;
        let mut part = ClusterFlowInfo {
            generation: Some((g.addresses, g.identities)),
            ..Default::default()
        };
        part.identities = data
            .identities
            .iter()
            .map(|(id, identity)| (*id, identity.labels.iter().map(str::to_owned).collect()))
            .collect();
        // Sized up front: growing a map of ~1000 pods rehashed and moved it several times.
        part.pods.reserve(state.endpoints.len());
        for (ip, ep) in &state.endpoints {
            if let IpAddr::V4(ip) = ip {
                let pod = PodInfo {
                    namespace: ep.namespace.clone(),
                    pod: ep.pod.clone(),
                    node: ep.node.clone(),
                };
                part.pods.insert(*ip, pod);
            }
        }
        for n in state.nodes.values() {
            for ip in &n.internal_ips {
                if let IpAddr::V4(ip) = ip {
                    part.nodes.insert(*ip, n.name.clone());
                }
            }
        }
        part
    }
}

/// What the agent knows to decorate records: replaced after each reconcile (built from the
/// previous one, see [`ClusterFlowInfo`]), shared by reference with the flow reader.
#[derive(Debug, Clone)]
pub struct FlowContext {
    pub cluster: ClusterName,
    pub node: String,
    /// Cluster id -> name (the upper 16 bits of an identity, a backend's cluster id).
    pub clusters: HashMap<u16, ClusterName>,
    /// Each synced cluster's identities and addresses.
    pub parts: BTreeMap<ClusterName, Arc<ClusterFlowInfo>>,
    /// Service frontend (vip, port, protocol number) -> (namespace, name).
    pub services: HashMap<(Ipv4Addr, u16, u8), (String, String)>,
    /// Policy rule id (as in the policy maps) -> rule.
    pub rules: HashMap<u32, RuleRef>,
    /// Set by the agent when a reconcile changed what this context was built from, until
    /// the next one replaces it: the reader then asks for a new one ([`Self::want_fresh`])
    /// and holds new records back meanwhile (at most [`super::MAX_HOLD`]), so a flow is
    /// decorated with a context at least as new as the maps were when its record was read,
    /// and the agent builds contexts only when records need them (under churn without
    /// traffic, never).
    pub superseded: Arc<AtomicBool>,
    /// Where the reader asks for a fresh context: one for every context of an agent.
    pub wanted: Arc<tokio::sync::Notify>,
}

impl FlowContext {
    /// Marks the context as out of date (see [`FlowContext::superseded`]).
    pub fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// Asks the agent for a context as new as its maps.
    pub fn want_fresh(&self) {
        self.wanted.notify_one();
    }

    /// An empty context for `node` of `cluster` (records decorate with addresses only).
    pub fn new(cluster: ClusterName, node: String) -> Self {
        Self {
            cluster,
            node,
            clusters: HashMap::new(),
            parts: BTreeMap::new(),
            services: HashMap::new(),
            rules: HashMap::new(),
            superseded: Arc::new(AtomicBool::new(false)),
            wanted: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Builds the context from the clusters the agent programs and the policy tables'
    /// rules, taking from `previous` the parts of clusters whose addresses and identities
    /// did not change since it was built.
    pub fn build<'a>(
        cluster: &ClusterName,
        node: &str,
        clusters: impl IntoIterator<Item = (&'a ClusterName, &'a mesh_proto::state::ClusterData)>,
        rules: Option<&BTreeMap<u32, RuleRef>>,
        previous: Option<&FlowContext>,
    ) -> Self {
        let mut ctx = Self::new(cluster.clone(), node.to_owned());
        if let Some(p) = previous {
            ctx.wanted = p.wanted.clone();
        }
        for (name, data) in clusters {
            let state = &data.state;
            if let Some(config) = &state.config {
                ctx.clusters
                    .insert(u16::from(config.id.get()), name.clone());
            }
            let g = data.generations;
            let kept = previous
                .and_then(|p| p.parts.get(name))
                .filter(|p| p.generation == Some((g.addresses, g.identities)));
            let part = match kept {
                Some(p) => p.clone(),
                None => Arc::new(ClusterFlowInfo::build(data)),
            };
            ctx.parts.insert(name.clone(), part);
            // Frontends of the local cluster's services are what this node's clients dial.
            if name == cluster {
                for svc in state.services.values() {
                    for vip in &svc.frontends {
                        let IpAddr::V4(vip) = vip else { continue };
                        for p in &svc.ports {
                            let proto = match p.protocol {
                                mesh_core::Protocol::Tcp => PROTO_TCP,
                                mesh_core::Protocol::Udp => PROTO_UDP,
                                mesh_core::Protocol::Sctp => continue,
                            };
                            ctx.services.insert(
                                (*vip, p.port, proto),
                                (svc.namespace.clone(), svc.name.clone()),
                            );
                        }
                    }
                }
            }
        }
        if let Some(rules) = rules {
            ctx.rules = rules.iter().map(|(id, r)| (*id, r.clone())).collect();
        }
        ctx
    }

    /// Adds `labels` of `identity` to `cluster`'s part (contexts built by hand).
    pub fn insert_identity(&mut self, cluster: &ClusterName, identity: u32, labels: Arc<[String]>) {
        let part = self.parts.entry(cluster.clone()).or_default();
        Arc::make_mut(part).identities.insert(identity, labels);
    }

    /// Adds a pod address to its cluster's part (contexts built by hand).
    pub fn insert_pod(&mut self, ip: Ipv4Addr, info: AddressInfo) {
        let part = self.parts.entry(info.cluster.clone()).or_default();
        Arc::make_mut(part).pods.insert(
            ip,
            PodInfo {
                namespace: info.namespace,
                pod: info.pod,
                node: info.node,
            },
        );
    }

    /// The pod at `ip`, with its cluster.
    pub fn pod(&self, ip: Ipv4Addr, identity: u32) -> Option<AddressInfo> {
        let (cluster, pod) = self.find(identity, |p| p.pods.get(&ip))?;
        Some(AddressInfo {
            cluster: cluster.clone(),
            namespace: pod.namespace.clone(),
            pod: pod.pod.clone(),
            node: pod.node.clone(),
        })
    }

    /// The labels of `identity`, from the part of the cluster its upper bits name.
    pub fn labels(&self, identity: u32) -> Option<&Arc<[String]>> {
        let cluster = self.cluster_of_identity(identity)?;
        self.parts.get(cluster)?.identities.get(&identity)
    }

    /// What `get` finds in the part of `identity`'s cluster, else in the first part that
    /// has it: the local cluster's, then the others by name (the ipcache's order).
    fn find<'s, T>(
        &'s self,
        identity: u32,
        get: impl Fn(&'s ClusterFlowInfo) -> Option<&'s T>,
    ) -> Option<(&'s ClusterName, &'s T)> {
        if let Some(c) = self.cluster_of_identity(identity)
            && let Some((name, part)) = self.parts.get_key_value(c)
            && let Some(v) = get(part)
        {
            return Some((name, v));
        }
        let local = self.parts.get_key_value(&self.cluster);
        local
            .into_iter()
            .chain(self.parts.iter().filter(|(n, _)| **n != self.cluster))
            .find_map(|(name, part)| get(part).map(|v| (name, v)))
    }

    fn cluster_of_identity(&self, identity: u32) -> Option<&ClusterName> {
        let id = (identity >> 16) as u16;
        if id == 0 {
            return None;
        }
        self.clusters.get(&id)
    }

    /// The Hubble endpoint of `ip` with `identity` (0: a process of this node's host).
    fn endpoint(&self, ip: Ipv4Addr, identity: u32) -> hf::Endpoint {
        let identity = if identity == 0 {
            layout::IDENTITY_HOST
        } else {
            identity
        };
        let mut ep = hf::Endpoint {
            identity,
            ..Default::default()
        };
        if let Some(info) = self.pod(ip, identity) {
            ep.cluster_name = info.cluster.to_string();
            ep.namespace = info.namespace;
            ep.pod_name = info.pod;
        } else if let Some(c) = self.cluster_of_identity(identity) {
            ep.cluster_name = c.to_string();
        } else if identity == layout::IDENTITY_HOST {
            ep.cluster_name = self.cluster.to_string();
        } else if let Some((c, _)) = self.find(identity, |p| p.nodes.get(&ip)) {
            ep.cluster_name = c.to_string();
        }
        ep.labels = match self.labels(identity) {
            Some(labels) => labels.to_vec(),
            None => reserved_labels(identity, ip),
        };
        ep
    }
}

/// Labels of identities that are not endpoint identities, as Cilium names them.
fn reserved_labels(identity: u32, ip: Ipv4Addr) -> Vec<String> {
    match identity {
        layout::IDENTITY_HOST => vec!["reserved:host".into()],
        layout::IDENTITY_WORLD => vec!["reserved:world".into()],
        6 => vec!["reserved:remote-node".into()],
        id if (mesh_core::policy::CIDR_IDENTITY_BASE..=mesh_core::policy::CIDR_IDENTITY_MAX)
            .contains(&id) =>
        {
            vec![format!("cidr:{ip}/32"), "reserved:world".into()]
        }
        _ => vec![],
    }
}

fn policy_of(rule: &RuleRef) -> Policy {
    Policy {
        name: rule.policy.name.clone(),
        namespace: rule.policy.namespace.clone().unwrap_or_default(),
        labels: vec![
            format!(
                "k8s:io.cilium.k8s.policy.derived-from={}",
                kind_name(rule.policy.kind)
            ),
            format!("k8s:io.cilium.k8s.policy.name={}", rule.policy.name),
            format!(
                "k8s:io.cilium.k8s.policy.namespace={}",
                rule.policy.namespace.as_deref().unwrap_or("")
            ),
            format!("k8s:io.cilium.k8s.policy.cluster={}", rule.policy.cluster),
            format!("mesh:rule={}", rule.path()),
        ],
        revision: 0,
        kind: kind_name(rule.policy.kind).into(),
    }
}

fn kind_name(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::NetworkPolicy => "NetworkPolicy",
        PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
    }
}

fn drop_reason(reason: u8) -> DropReason {
    match reason {
        layout::DROP_POLICY_DEFAULT => DropReason::PolicyDenied,
        layout::DROP_POLICY_RULE => DropReason::PolicyDeny,
        layout::DROP_NO_BACKEND => DropReason::ServiceBackendNotFound,
        _ => DropReason::Unknown,
    }
}

fn ip4(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

fn port(be: u16) -> u16 {
    u16::from_be(be)
}

/// The Hubble flow of `ev`, observed at `time`, with `uuid`.
pub fn decorate(ev: &FlowEvent, ctx: &FlowContext, time: SystemTime, uuid: String) -> Flow {
    let src_ip = ip4(ev.src_ip);
    let dst_ip = ip4(ev.dst_ip);
    let (src_port, dst_port) = (port(ev.src_port), port(ev.dst_port));
    let egress = ev.direction == layout::DIRECTION_EGRESS;
    let dropped = ev.verdict == layout::EVENT_DROPPED;
    let translated = ev.flags & layout::EVENT_F_TRANSLATED != 0;
    let policy = ev.flags & layout::EVENT_F_POLICY != 0;

    let l4 = match ev.proto {
        PROTO_TCP => Some(layer4::Protocol::Tcp(hf::Tcp {
            source_port: src_port.into(),
            destination_port: dst_port.into(),
            flags: Some(hf::TcpFlags {
                syn: true,
                ..Default::default()
            }),
        })),
        PROTO_UDP => Some(layer4::Protocol::Udp(hf::Udp {
            source_port: src_port.into(),
            destination_port: dst_port.into(),
        })),
        _ => None,
    };
    let service = translated
        .then(|| {
            ctx.services
                .get(&(ip4(ev.orig_ip), port(ev.orig_port), ev.proto))
                .map(|(ns, name)| hf::Service {
                    name: name.clone(),
                    namespace: ns.clone(),
                })
        })
        .flatten();
    // A refusal before translation (no backend, every backend denied) names the frontend:
    // look it up there too.
    let service = service.or_else(|| {
        dropped
            .then(|| {
                ctx.services
                    .get(&(dst_ip, dst_port, ev.proto))
                    .map(|(ns, name)| hf::Service {
                        name: name.clone(),
                        namespace: ns.clone(),
                    })
            })
            .flatten()
    });

    let reason = if dropped {
        drop_reason(ev.reason)
    } else {
        DropReason::Unknown
    };
    let event = if dropped {
        CiliumEventType {
            r#type: event_type::DROP,
            sub_type: reason as i32,
        }
    } else if policy {
        CiliumEventType {
            r#type: event_type::POLICY_VERDICT,
            sub_type: 0,
        }
    } else if translated {
        CiliumEventType {
            r#type: event_type::TRACE_SOCK,
            sub_type: 0,
        }
    } else {
        CiliumEventType {
            r#type: event_type::TRACE,
            sub_type: 0,
        }
    };

    let rule = (ev.rule != layout::RULE_NONE)
        .then(|| ctx.rules.get(&ev.rule))
        .flatten();
    let mut flow = Flow {
        time: Some(prost_types::Timestamp::from(time)),
        uuid,
        verdict: if dropped {
            Verdict::Dropped
        } else {
            Verdict::Forwarded
        } as i32,
        drop_reason: reason as u32,
        drop_reason_desc: reason as i32,
        ip: Some(hf::Ip {
            source: src_ip.to_string(),
            destination: dst_ip.to_string(),
            ip_version: IpVersion::IPv4 as i32,
            encrypted: false,
        }),
        l4: Some(Layer4 { protocol: l4 }),
        source: Some(ctx.endpoint(src_ip, ev.src_identity)),
        destination: Some(ctx.endpoint(dst_ip, ev.dst_identity)),
        r#type: if translated && !dropped && !policy {
            FlowType::Sock
        } else {
            FlowType::L3L4
        } as i32,
        node_name: format!("{}/{}", ctx.cluster, ctx.node),
        event_type: Some(event),
        destination_service: service,
        traffic_direction: if egress {
            TrafficDirection::Egress
        } else {
            TrafficDirection::Ingress
        } as i32,
        trace_observation_point: if egress {
            TraceObservationPoint::FromEndpoint
        } else {
            TraceObservationPoint::ToEndpoint
        } as i32,
        is_reply: Some(false),
        reply: false,
        sock_xlate_point: if translated {
            SocketTranslationPoint::SockXlatePointPostDirectionFwd
        } else {
            SocketTranslationPoint::SockXlatePointUnknown
        } as i32,
        socket_cookie: ev.cookie,
        ..Default::default()
    };
    if let Some(rule) = rule {
        let p = vec![policy_of(rule)];
        match (rule.direction, rule.section, dropped) {
            (Direction::Egress, RuleVerdict::Deny, _) | (Direction::Egress, _, true) => {
                flow.egress_denied_by = p
            }
            (Direction::Egress, RuleVerdict::Allow, false) => flow.egress_allowed_by = p,
            (Direction::Ingress, RuleVerdict::Deny, _) | (Direction::Ingress, _, true) => {
                flow.ingress_denied_by = p
            }
            (Direction::Ingress, RuleVerdict::Allow, false) => flow.ingress_allowed_by = p,
        }
    }
    flow.summary = summary(ev, ctx, &flow, rule);
    flow
}

/// A one-line account of the record, for `-o compact` and Hubble's UI.
fn summary(ev: &FlowEvent, ctx: &FlowContext, flow: &Flow, rule: Option<&RuleRef>) -> String {
    let proto = match ev.proto {
        PROTO_TCP => "TCP Flags: SYN",
        PROTO_UDP => "UDP",
        _ => "",
    };
    let dir = if ev.direction == layout::DIRECTION_EGRESS {
        "egress"
    } else {
        "ingress"
    };
    if ev.verdict == layout::EVENT_DROPPED {
        return match ev.reason {
            layout::DROP_NO_BACKEND => "no backend for the service".into(),
            layout::DROP_POLICY_RULE => match rule {
                Some(r) => format!("{dir} denied by {}", r),
                None => format!("{dir} denied by a deny rule"),
            },
            _ => format!("{dir} denied: default deny (no rule allows it)"),
        };
    }
    let mut s = proto.to_owned();
    if ev.flags & layout::EVENT_F_TRANSLATED != 0 {
        let cluster = ctx
            .clusters
            .get(&ev.backend_cluster)
            .map(|c| format!(" in cluster {c}"))
            .unwrap_or_default();
        let svc = flow
            .destination_service
            .as_ref()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .unwrap_or_else(|| format!("{}:{}", ip4(ev.orig_ip), port(ev.orig_port)));
        s = format!(
            "{s}; service {svc} -> {}:{}{cluster}",
            ip4(ev.dst_ip),
            port(ev.dst_port)
        );
    }
    if let Some(r) = rule {
        s = format!("{s}; {dir} allowed by {r}");
    }
    s
}

/// Wall-clock time of a record stamped with CLOCK_BOOTTIME `boot_ns`, given the current
/// readings of both clocks.
pub fn wall_time(boot_ns: u64, now_boot_ns: u64, now_wall: SystemTime) -> SystemTime {
    if boot_ns <= now_boot_ns {
        now_wall - Duration::from_nanos(now_boot_ns - boot_ns)
    } else {
        now_wall + Duration::from_nanos(boot_ns - now_boot_ns)
    }
}
