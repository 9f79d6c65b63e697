//! Hubble flow filters (`flow.FlowFilter`), shared by every Observer server mesh runs (the
//! agents and the apiserver's relay) and by `meshctl observe`: one definition of which flow
//! a request selects.
//!
//! A request selects a flow when it matches at least one whitelist filter (or there are
//! none) and no blacklist filter. A filter matches when every field it sets matches; a
//! repeated field matches when any of its entries does. Fields about data mesh flows never
//! carry (FQDNs, L7 HTTP/DNS, workloads, trace ids) match no mesh flow when set, as in
//! Hubble for a flow without that data.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::policy::{Selector, parse_selector};

use crate::hubble::flow::{Endpoint, Flow, FlowFilter, Service, TcpFlags, layer4};

/// Cilium monitor message types, as in `Flow.event_type.type` and `--type`.
pub mod event_type {
    pub const DROP: i32 = 1;
    pub const DEBUG: i32 = 2;
    pub const CAPTURE: i32 = 3;
    pub const TRACE: i32 = 4;
    pub const POLICY_VERDICT: i32 = 5;
    pub const TRACE_SOCK: i32 = 7;
    pub const L7: i32 = 129;
    pub const AGENT: i32 = 130;

    /// The type named by Hubble's `--type` names.
    pub fn by_name(name: &str) -> Option<i32> {
        Some(match name {
            "drop" => DROP,
            "debug" => DEBUG,
            "capture" => CAPTURE,
            "trace" => TRACE,
            "policy-verdict" => POLICY_VERDICT,
            "trace-sock" => TRACE_SOCK,
            "l7" => L7,
            "agent" => AGENT,
            _ => return None,
        })
    }

    /// The name of a type, for tables.
    pub fn name(t: i32) -> &'static str {
        match t {
            DROP => "drop",
            DEBUG => "debug",
            CAPTURE => "capture",
            TRACE => "trace",
            POLICY_VERDICT => "policy-verdict",
            TRACE_SOCK => "trace-sock",
            L7 => "l7",
            AGENT => "agent",
            _ => "unknown",
        }
    }
}

/// The label Cilium puts on every identity to name its cluster; `--from-cluster` filters on it.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// A filter that cannot be compiled: which filter, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{list} filter #{index}: {field}: {reason}")]
pub struct FilterError {
    pub list: &'static str,
    pub index: usize,
    pub field: &'static str,
    pub reason: String,
}

impl From<FilterError> for tonic::Status {
    fn from(e: FilterError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

#[derive(Debug, Clone)]
struct NamePattern {
    namespace: Option<String>,
    prefix: String,
}

impl NamePattern {
    /// `ns/prefix`, `ns/` (whole namespace) or `prefix` (any namespace).
    fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, prefix)) => Self {
                namespace: Some(ns.to_owned()),
                prefix: prefix.to_owned(),
            },
            None => Self {
                namespace: None,
                prefix: s.to_owned(),
            },
        }
    }

    fn matches(&self, namespace: &str, name: &str) -> bool {
        if name.is_empty() && !self.prefix.is_empty() {
            return false;
        }
        self.namespace.as_deref().is_none_or(|ns| ns == namespace) && name.starts_with(&self.prefix)
    }
}

/// A node name pattern: `cluster/node` or `node`, `*` matching any run of characters.
#[derive(Debug, Clone)]
struct NodePattern(String);

impl NodePattern {
    fn matches(&self, node_name: &str) -> bool {
        let pattern = &self.0;
        // `cluster/` matches every node of the cluster; a bare name matches any cluster.
        if let Some(cluster) = pattern.strip_suffix('/') {
            return node_name
                .split_once('/')
                .is_some_and(|(c, _)| glob(cluster, c));
        }
        if pattern.contains('/') {
            return glob(pattern, node_name);
        }
        let node = node_name.rsplit_once('/').map_or(node_name, |(_, n)| n);
        glob(pattern, node)
    }
}

/// `*` matches any run of characters; everything else is literal.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || !s[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[derive(Debug, Clone, Default)]
struct Compiled {
    raw: FlowFilter,
    source_ip: Vec<IpNet>,
    destination_ip: Vec<IpNet>,
    source_pod: Vec<NamePattern>,
    destination_pod: Vec<NamePattern>,
    source_service: Vec<NamePattern>,
    destination_service: Vec<NamePattern>,
    source_label: Vec<Selector>,
    destination_label: Vec<Selector>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    node_name: Vec<NodePattern>,
    protocol: Vec<String>,
}

fn parse_ip(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("{s:?} is not a port number (0-65535)"))
}

const PROTOCOLS: &[&str] = &[
    "tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "http", "dns", "kafka",
];

impl Compiled {
    fn new(raw: &FlowFilter, list: &'static str, index: usize) -> Result<Self, FilterError> {
        let err = |field: &'static str| {
            move |reason: String| FilterError {
                list,
                index,
                field,
                reason,
            }
        };
        let ips = |v: &[String], field| {
            v.iter()
                .map(|s| parse_ip(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err(field))
        };
        let ports = |v: &[String], field| {
            v.iter()
                .map(|s| parse_port(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err(field))
        };
        let labels = |v: &[String], field| {
            v.iter()
                .map(|s| parse_selector(s).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err(field))
        };
        let protocol = raw
            .protocol
            .iter()
            .map(|p| {
                let p = p.to_ascii_lowercase();
                if PROTOCOLS.contains(&p.as_str()) {
                    Ok(p)
                } else {
                    Err(format!(
                        "unknown protocol {p:?} (one of {})",
                        PROTOCOLS.join(", ")
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err("protocol"))?;
        Ok(Self {
            source_ip: ips(&raw.source_ip, "source_ip")?,
            destination_ip: ips(&raw.destination_ip, "destination_ip")?,
            source_pod: raw
                .source_pod
                .iter()
                .map(|s| NamePattern::parse(s))
                .collect(),
            destination_pod: raw
                .destination_pod
                .iter()
                .map(|s| NamePattern::parse(s))
                .collect(),
            source_service: raw
                .source_service
                .iter()
                .map(|s| NamePattern::parse(s))
                .collect(),
            destination_service: raw
                .destination_service
                .iter()
                .map(|s| NamePattern::parse(s))
                .collect(),
            source_label: labels(&raw.source_label, "source_label")?,
            destination_label: labels(&raw.destination_label, "destination_label")?,
            source_port: ports(&raw.source_port, "source_port")?,
            destination_port: ports(&raw.destination_port, "destination_port")?,
            node_name: raw
                .node_name
                .iter()
                .map(|s| NodePattern(s.clone()))
                .collect(),
            protocol,
            raw: raw.clone(),
        })
    }

    fn matches(&self, f: &Flow) -> bool {
        let r = &self.raw;
        let ip = f.ip.as_ref();
        let src_ip = ip.and_then(|i| i.source.parse::<IpAddr>().ok());
        let dst_ip = ip.and_then(|i| i.destination.parse::<IpAddr>().ok());
        let (src_port, dst_port) = ports_of(f);
        let in_nets = |nets: &[IpNet], ip: Option<IpAddr>| {
            nets.is_empty() || ip.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
        };
        let any = |empty: bool, hit: bool| empty || hit;
        let src = f.source.as_ref();
        let dst = f.destination.as_ref();
        in_nets(&self.source_ip, src_ip)
            && in_nets(&self.destination_ip, dst_ip)
            && any(self.source_pod.is_empty(), pod_matches(&self.source_pod, src))
            && any(self.destination_pod.is_empty(), pod_matches(&self.destination_pod, dst))
            && any(
                self.source_service.is_empty(),
                service_matches(&self.source_service, f.source_service.as_ref()),
            )
            && any(
                self.destination_service.is_empty(),
                service_matches(&self.destination_service, f.destination_service.as_ref()),
            )
            && any(self.source_label.is_empty(), labels_match(&self.source_label, src))
            && any(self.destination_label.is_empty(), labels_match(&self.destination_label, dst))
            && any(
                self.source_port.is_empty(),
                src_port.is_some_and(|p| self.source_port.contains(&p)),
            )
            && any(
                self.destination_port.is_empty(),
                dst_port.is_some_and(|p| self.destination_port.contains(&p)),
            )
            && any(
                r.source_identity.is_empty(),
                src.is_some_and(|e| r.source_identity.contains(&e.identity)),
            )
            && any(
                r.destination_identity.is_empty(),
                dst.is_some_and(|e| r.destination_identity.contains(&e.identity)),
            )
            && any(r.verdict.is_empty(), r.verdict.contains(&f.verdict))
            && any(
                r.traffic_direction.is_empty(),
                r.traffic_direction.contains(&f.traffic_direction),
            )
            && any(
                r.ip_version.is_empty(),
                ip.is_some_and(|i| r.ip_version.contains(&i.ip_version)),
            )
            && any(
                r.reply.is_empty(),
                f.is_reply.is_some_and(|b| r.reply.contains(&b)),
            )
            && any(r.event_type.is_empty(), {
                let t = f.event_type.as_ref();
                r.event_type.iter().any(|e| {
                    t.is_some_and(|t| t.r#type == e.r#type && (!e.match_sub_type || t.sub_type == e.sub_type))
                })
            })
            && any(self.protocol.is_empty(), {
                let p = protocol_of(f);
                p.is_some_and(|p| {
                    self.protocol
                        .iter()
                        .any(|want| want == p || (want == "icmp" && p.starts_with("icmp")))
                })
            })
            && any(r.tcp_flags.is_empty(), {
                let flags = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                    Some(layer4::Protocol::Tcp(t)) => t.flags,
                    _ => None,
                };
                flags.is_some_and(|have| r.tcp_flags.iter().any(|want| flags_subset(want, &have)))
            })
            && any(
                self.node_name.is_empty(),
                self.node_name.iter().any(|p| p.matches(&f.node_name)),
            )
            && any(r.uuid.is_empty(), r.uuid.contains(&f.uuid))
            // Data mesh flows do not carry: a filter on it selects nothing.
            && r.source_fqdn.is_empty()
            && r.destination_fqdn.is_empty()
            && r.source_workload.is_empty()
            && r.destination_workload.is_empty()
            && r.http_status_code.is_empty()
            && r.http_method.is_empty()
            && r.http_path.is_empty()
            && r.dns_query.is_empty()
            && r.trace_id.is_empty()
    }
}

fn flags_subset(want: &TcpFlags, have: &TcpFlags) -> bool {
    let w = [
        want.fin, want.syn, want.rst, want.psh, want.ack, want.urg, want.ece, want.cwr, want.ns,
    ];
    let h = [
        have.fin, have.syn, have.rst, have.psh, have.ack, have.urg, have.ece, have.cwr, have.ns,
    ];
    w.iter().zip(h).all(|(w, h)| !*w || h)
}

fn pod_matches(patterns: &[NamePattern], ep: Option<&Endpoint>) -> bool {
    ep.is_some_and(|e| {
        patterns
            .iter()
            .any(|p| p.matches(&e.namespace, &e.pod_name))
    })
}

fn service_matches(patterns: &[NamePattern], svc: Option<&Service>) -> bool {
    svc.is_some_and(|s| patterns.iter().any(|p| p.matches(&s.namespace, &s.name)))
}

fn labels_match(selectors: &[Selector], ep: Option<&Endpoint>) -> bool {
    let Some(ep) = ep else { return false };
    let get = |key: &str| -> Option<&str> {
        ep.labels.iter().find_map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
            let k = k.split_once(':').map_or(k, |(_, k)| k);
            (k == key).then_some(v)
        })
    };
    selectors.iter().any(|s| s.matches_with(get))
}

/// The flow's L4 ports, when it has some.
pub fn ports_of(f: &Flow) -> (Option<u16>, Option<u16>) {
    let port = |p: u32| u16::try_from(p).ok();
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => (port(t.source_port), port(t.destination_port)),
        Some(layer4::Protocol::Udp(u)) => (port(u.source_port), port(u.destination_port)),
        Some(layer4::Protocol::Sctp(s)) => (port(s.source_port), port(s.destination_port)),
        _ => (None, None),
    }
}

/// The flow's protocol name as Hubble's `--protocol` spells it.
pub fn protocol_of(f: &Flow) -> Option<&'static str> {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(_)) => Some("tcp"),
        Some(layer4::Protocol::Udp(_)) => Some("udp"),
        Some(layer4::Protocol::Sctp(_)) => Some("sctp"),
        Some(layer4::Protocol::IcmPv4(_)) => Some("icmpv4"),
        Some(layer4::Protocol::IcmPv6(_)) => Some("icmpv6"),
        None => None,
    }
}

/// A request's whitelist and blacklist, compiled once per request.
#[derive(Debug, Clone, Default)]
pub struct FlowFilters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl FlowFilters {
    /// Compiles the filters; an invalid one is an error naming the list, index and field.
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist
                .iter()
                .enumerate()
                .map(|(i, f)| Compiled::new(f, "whitelist", i))
                .collect::<Result<_, _>>()?,
            blacklist: blacklist
                .iter()
                .enumerate()
                .map(|(i, f)| Compiled::new(f, "blacklist", i))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether the request selects `flow`.
    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|c| c.matches(flow)))
            && !self.blacklist.iter().any(|c| c.matches(flow))
    }
}

#[cfg(test)]
mod tests;
