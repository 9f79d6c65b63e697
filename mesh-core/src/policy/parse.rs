//! Parsing policy objects from the JSON the Kubernetes API serves (`serde_json::Value` of a
//! whole object, as users wrote it), with Cilium's translations applied on the way
//! (DESIGN.md section 14):
//!
//! - namespaced kinds select endpoints of their namespace only;
//! - a NetworkPolicy peer's `podSelector` alone selects in the policy's namespace, a
//!   `namespaceSelector` matches namespace labels (`io.cilium.k8s.namespace.labels.<key>`),
//!   `ipBlock` is a CIDR peer;
//! - a CiliumNetworkPolicy peer selector without a namespace requirement gets the policy's
//!   namespace;
//! - a peer selector without `io.cilium.k8s.policy.cluster` in `matchLabels` or in an `In` /
//!   `Exists` expression gets the policy's (local) cluster.
//!
//! Unknown fields are ignored, as the Kubernetes API does. A known field mesh cannot enforce
//! (L7 `rules`, `toFQDNs`, `toServices`, `fromRequires`, ...) is a `Problem` on the policy and
//! makes its rule fail closed. Malformed input is a `PolicyError` naming the object, the JSON
//! path and the problem.

use std::fmt;

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::identity::{LABEL_CLUSTER, LABEL_NAMESPACE};
use crate::{ClusterName, Protocol};

use super::identities::NAMESPACE_LABELS_PREFIX;
use super::model::*;

/// One malformed field of a policy object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path, e.g. `spec.ingress[0].toPorts[0].ports[0].port`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a policy object could not be parsed. The object is not applied; the policies already
/// applied keep their effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy object is not a JSON object")]
    NotAnObject,
    #[error(
        "{object}: unsupported policy kind {api_version:?} {kind:?}: expected networking.k8s.io/v1 NetworkPolicy, cilium.io/v2 CiliumNetworkPolicy or cilium.io/v2 CiliumClusterwideNetworkPolicy"
    )]
    UnsupportedKind {
        object: String,
        api_version: String,
        kind: String,
    },
    /// Every malformed field found, in document order.
    #[error("{object}: {}", join(errors))]
    Invalid {
        kind: PolicyKind,
        object: String,
        errors: Vec<FieldError>,
    },
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses a NetworkPolicy, CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object of
/// `cluster` (the cluster whose API holds it: its peers default to that cluster).
pub fn parse_policy(object: &Value, cluster: &ClusterName) -> Result<Policy, PolicyError> {
    let root = object.as_object().ok_or(PolicyError::NotAnObject)?;
    let str_at = |m: &Map<String, Value>, k: &str| {
        m.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let metadata = root.get("metadata").and_then(Value::as_object);
    let name = metadata.map(|m| str_at(m, "name")).unwrap_or_default();
    let namespace = metadata
        .map(|m| str_at(m, "namespace"))
        .filter(|ns| !ns.is_empty());
    let api_version = str_at(root, "apiVersion");
    let kind_str = str_at(root, "kind");
    let kind = match (api_version.as_str(), kind_str.as_str()) {
        ("networking.k8s.io/v1", "NetworkPolicy") => PolicyKind::NetworkPolicy,
        ("cilium.io/v2", "CiliumNetworkPolicy") => PolicyKind::CiliumNetworkPolicy,
        ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => {
            PolicyKind::CiliumClusterwideNetworkPolicy
        }
        _ => {
            return Err(PolicyError::UnsupportedKind {
                object: object_name(namespace.as_deref(), &name),
                api_version,
                kind: kind_str,
            });
        }
    };
    // The API server fills in the namespace of a namespaced object; a manifest read from a
    // file may lack it, and kubectl would apply it to "default".
    let namespace = kind
        .is_namespaced()
        .then(|| namespace.unwrap_or_else(|| "default".to_string()));
    let mut p = Parser {
        kind,
        cluster,
        namespace: namespace.clone(),
        errors: Vec::new(),
        problems: Vec::new(),
    };
    if name.is_empty() {
        p.err("metadata.name", "missing: every policy needs a name");
    }
    let specs = match kind {
        PolicyKind::NetworkPolicy => p.network_policy(root),
        _ => p.cilium_policy(root),
    };
    let reference = PolicyRef {
        kind,
        cluster: cluster.clone(),
        namespace,
        name,
    };
    if !p.errors.is_empty() {
        return Err(PolicyError::Invalid {
            kind,
            // Not `reference.object()`: a clusterwide policy without a name would be "".
            object: object_name(reference.namespace.as_deref(), &reference.name),
            errors: p.errors,
        });
    }
    Ok(Policy {
        reference,
        specs,
        problems: p.problems,
    })
}

fn object_name(namespace: Option<&str>, name: &str) -> String {
    let name = if name.is_empty() { "<unnamed>" } else { name };
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// A selector as parsed, before translation: or the reason it cannot be enforced.
enum ParsedSelector {
    Ok(Selector),
    Unsupported(String),
}

/// Label key sources of a Cilium selector key (`k8s:app`).
enum KeySource {
    /// No prefix, `k8s:` or `any:`: matches identity labels.
    K8s,
    Other(String),
}

struct Parser<'a> {
    kind: PolicyKind,
    cluster: &'a ClusterName,
    namespace: Option<String>,
    errors: Vec<FieldError>,
    problems: Vec<Problem>,
}

// === impl Parser: JSON helpers ===

impl Parser<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// `m[key]`, with `null` read as absent (as the API server does).
    fn field<'v>(m: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
        m.get(key).filter(|v| !v.is_null())
    }

    fn object<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        let m = v.as_object();
        if m.is_none() {
            self.err(path, format!("expected an object, found {}", type_name(v)));
        }
        m
    }

    fn array<'v>(&mut self, v: Option<&'v Value>, path: &str) -> &'v [Value] {
        match v {
            None => &[],
            Some(Value::Array(a)) => a,
            Some(other) => {
                self.err(path, format!("expected a list, found {}", type_name(other)));
                &[]
            }
        }
    }

    fn string<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v str> {
        let s = v.as_str();
        if s.is_none() {
            self.err(path, format!("expected a string, found {}", type_name(v)));
        }
        s
    }

    fn boolean(&mut self, v: &Value, path: &str) -> Option<bool> {
        let b = v.as_bool();
        if b.is_none() {
            self.err(
                path,
                format!("expected true or false, found {}", type_name(v)),
            );
        }
        b
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// === impl Parser: selectors ===

impl Parser<'_> {
    /// A Kubernetes `LabelSelector` (`matchLabels`, `matchExpressions`); `key` maps each key
    /// as written to the identity label key it stands for.
    fn selector(
        &mut self,
        v: &Value,
        path: &str,
        key: &dyn Fn(&str) -> Result<String, String>,
    ) -> ParsedSelector {
        let Some(m) = self.object(v, path) else {
            return ParsedSelector::Ok(Selector::default());
        };
        let mut requirements = Vec::new();
        let mut unsupported = None;
        let mut map_key = |p: &mut Self, k: &str, kpath: &str| match key(k) {
            Ok(k) => Some(k),
            Err(reason) => {
                p.problem(kpath, reason.clone());
                unsupported.get_or_insert(reason);
                None
            }
        };
        if let Some(labels) = Self::field(m, "matchLabels") {
            let lpath = format!("{path}.matchLabels");
            if let Some(labels) = self.object(labels, &lpath) {
                for (k, v) in labels {
                    let vpath = format!("{lpath}.{k}");
                    let Some(v) = self.string(v, &vpath) else {
                        continue;
                    };
                    if let Some(k) = map_key(self, k, &vpath) {
                        requirements.push(Requirement::equals(k, v));
                    }
                }
            }
        }
        let epath = format!("{path}.matchExpressions");
        for (i, e) in self
            .array(Self::field(m, "matchExpressions"), &epath)
            .iter()
            .enumerate()
        {
            let path = format!("{epath}[{i}]");
            let Some(e) = self.object(e, &path) else {
                continue;
            };
            let k = match Self::field(e, "key") {
                Some(k) => self.string(k, &format!("{path}.key")),
                None => {
                    self.err(&format!("{path}.key"), "missing");
                    None
                }
            };
            let mut values = Vec::new();
            let vpath = format!("{path}.values");
            for (j, v) in self
                .array(Self::field(e, "values"), &vpath)
                .iter()
                .enumerate()
            {
                if let Some(v) = self.string(v, &format!("{vpath}[{j}]")) {
                    values.push(v.to_string());
                }
            }
            let opath = format!("{path}.operator");
            let op = match Self::field(e, "operator").map(|o| (o, o.as_str())) {
                Some((_, Some("In"))) => Some(SelectorOp::In(values.clone())),
                Some((_, Some("NotIn"))) => Some(SelectorOp::NotIn(values.clone())),
                Some((_, Some("Exists"))) => Some(SelectorOp::Exists),
                Some((_, Some("DoesNotExist"))) => Some(SelectorOp::DoesNotExist),
                Some((_, Some(other))) => {
                    self.err(
                        &opath,
                        format!("{other:?} is not an operator: expected In, NotIn, Exists or DoesNotExist"),
                    );
                    None
                }
                Some((o, None)) => {
                    self.err(&opath, format!("expected a string, found {}", type_name(o)));
                    None
                }
                None => {
                    self.err(&opath, "missing");
                    None
                }
            };
            match &op {
                Some(SelectorOp::In(_) | SelectorOp::NotIn(_)) if values.is_empty() => {
                    self.err(&vpath, "must not be empty for operators In and NotIn")
                }
                Some(SelectorOp::Exists | SelectorOp::DoesNotExist) if !values.is_empty() => self
                    .err(
                        &vpath,
                        "must be empty for operators Exists and DoesNotExist",
                    ),
                _ => {}
            }
            if let (Some(k), Some(op)) = (k, op)
                && let Some(k) = map_key(self, k, &format!("{path}.key"))
            {
                requirements.push(Requirement { key: k, op });
            }
        }
        match unsupported {
            Some(reason) => ParsedSelector::Unsupported(reason),
            None => ParsedSelector::Ok(Selector { requirements }),
        }
    }

    /// A Cilium selector: keys may carry a source prefix (`k8s:`, `any:`).
    fn cilium_selector(&mut self, v: &Value, path: &str) -> ParsedSelector {
        self.selector(v, path, &|k| match key_source(k) {
            (KeySource::K8s, key) => Ok(key.to_string()),
            (KeySource::Other(source), _) => Err(format!(
                "label source {source:?} in key {k:?} is not supported (identities carry only k8s labels): the selector matches nothing"
            )),
        })
    }

    /// A peer selector gets the local cluster unless it names clusters itself.
    fn local_cluster_default(&self, mut s: Selector) -> Selector {
        if !s.has_key(LABEL_CLUSTER, true) {
            s.requirements
                .push(Requirement::equals(LABEL_CLUSTER, self.cluster.as_str()));
        }
        s
    }

    fn in_namespace(&self, mut s: Selector) -> Selector {
        if let Some(ns) = &self.namespace {
            s.requirements
                .push(Requirement::equals(LABEL_NAMESPACE, ns.clone()));
        }
        s
    }
}

fn key_source(k: &str) -> (KeySource, &str) {
    match k.split_once(':') {
        None => (KeySource::K8s, k),
        Some(("k8s" | "any", key)) => (KeySource::K8s, key),
        Some((source, key)) => (KeySource::Other(source.to_string()), key),
    }
}

// === impl Parser: peers and ports shared by both dialects ===

impl Parser<'_> {
    /// A CIDR as Kubernetes reads it (Go's ParseCIDR: host bits are dropped); Cilium also
    /// takes a bare address as a host prefix.
    fn cidr(&mut self, v: &Value, path: &str, bare_ip_ok: bool) -> Option<IpNet> {
        let s = self.string(v, path)?;
        if let Ok(n) = s.parse::<IpNet>() {
            return Some(n.trunc());
        }
        if bare_ip_ok && let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Some(IpNet::from(ip));
        }
        self.err(
            path,
            format!("{s:?} is not a CIDR (expected e.g. 10.0.0.0/8)"),
        );
        None
    }

    fn cidr_peer(
        &mut self,
        cidr: Option<IpNet>,
        excepts: &[Value],
        path: &str,
        bare_ip_ok: bool,
    ) -> Option<CidrPeer> {
        let mut except = Vec::new();
        for (i, e) in excepts.iter().enumerate() {
            let epath = format!("{path}.except[{i}]");
            if let Some(e) = self.cidr(e, &epath, bare_ip_ok) {
                if let Some(c) = cidr
                    && !c.contains(&e)
                {
                    self.err(&epath, format!("{e} is not inside cidr {c}"));
                }
                except.push(e);
            }
        }
        Some(CidrPeer {
            cidr: cidr?,
            except,
        })
    }

    /// One `ports[]` entry: `protocol`, `port` (number, numeric string or name), `endPort`.
    /// `cilium` selects Cilium's protocol set (ANY default, port 0 = any port).
    fn port(&mut self, v: &Value, path: &str, cilium: bool) -> Option<Result<PortSpec, String>> {
        let m = self.object(v, path)?;
        let ppath = format!("{path}.protocol");
        let protocol = match Self::field(m, "protocol") {
            None if cilium => None,
            None => Some(Protocol::Tcp),
            Some(v) => {
                let s = self.string(v, &ppath)?;
                match s {
                    "TCP" => Some(Protocol::Tcp),
                    "UDP" => Some(Protocol::Udp),
                    "SCTP" => Some(Protocol::Sctp),
                    "ANY" if cilium => None,
                    "ICMP" | "ICMPV6" | "VRRP" | "IGMP" if cilium => {
                        let reason = format!(
                            "protocol {s} is not enforced by mesh (TCP, UDP, SCTP and ANY are): the rule fails closed"
                        );
                        self.problem(&ppath, reason.clone());
                        return Some(Err(reason));
                    }
                    other => {
                        let expected = if cilium {
                            "TCP, UDP, SCTP or ANY"
                        } else {
                            "TCP, UDP or SCTP"
                        };
                        self.err(
                            &ppath,
                            format!("{other:?} is not a protocol: expected {expected}"),
                        );
                        return None;
                    }
                }
            }
        };
        let port_path = format!("{path}.port");
        // None: every port; Some(Ok(n)) a number; Some(Err(name)) a named port.
        let port: Option<Result<u16, String>> = match Self::field(m, "port") {
            None => None,
            Some(Value::Number(n)) => match n.as_u64().filter(|n| *n <= 65535) {
                Some(0) if cilium => None,
                Some(n) if n > 0 => Some(Ok(n as u16)),
                _ => {
                    self.err(&port_path, format!("{n} is not a port number (1-65535)"));
                    return None;
                }
            },
            Some(Value::String(s)) => match s.parse::<u32>() {
                Ok(0) if cilium => None,
                Ok(n) if (1..=65535).contains(&n) => Some(Ok(n as u16)),
                Ok(n) => {
                    self.err(&port_path, format!("{n} is not a port number (1-65535)"));
                    return None;
                }
                Err(_) if is_port_name(s) => Some(Err(s.clone())),
                Err(_) => {
                    self.err(&port_path, format!("{s:?} is not a port number or name"));
                    return None;
                }
            },
            Some(other) => {
                self.err(
                    &port_path,
                    format!("expected a port number or name, found {}", type_name(other)),
                );
                return None;
            }
        };
        let end_path = format!("{path}.endPort");
        let end = match Self::field(m, "endPort") {
            None => None,
            Some(v) => match v.as_u64().filter(|n| (1..=65535).contains(n)) {
                Some(n) => Some(n as u16),
                None => {
                    self.err(&end_path, format!("{v} is not a port number (1-65535)"));
                    return None;
                }
            },
        };
        let ports = match (port, end) {
            (None, None) => PortMatch::Range(PortRange::ALL),
            (Some(Ok(p)), None) => PortMatch::Range(PortRange::single(p)),
            (Some(Ok(p)), Some(e)) if e >= p => PortMatch::Range(PortRange { start: p, end: e }),
            (Some(Ok(p)), Some(e)) => {
                self.err(&end_path, format!("{e} is below port {p}"));
                return None;
            }
            (Some(Err(name)), None) => PortMatch::Named(name),
            (Some(Err(name)), Some(_)) => {
                self.err(
                    &end_path,
                    format!(
                        "cannot be used with the named port {name:?}: endPort needs a port number"
                    ),
                );
                return None;
            }
            (None, Some(_)) => {
                self.err(&end_path, "needs a port number in port");
                return None;
            }
        };
        Some(Ok(PortSpec { protocol, ports }))
    }
}

/// Kubernetes' IANA_SVC_NAME: 1-15 lowercase letters, digits and '-', with a letter, no '-'
/// at either end, no "--".
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

// === impl Parser: NetworkPolicy ===

impl Parser<'_> {
    fn network_policy(&mut self, root: &Map<String, Value>) -> Vec<PolicySpec> {
        let Some(spec) = Self::field(root, "spec") else {
            self.err("spec", "missing");
            return Vec::new();
        };
        let Some(spec) = self.object(spec, "spec") else {
            return Vec::new();
        };
        let subject = match Self::field(spec, "podSelector") {
            // The API requires the field; `{}` (every pod of the namespace) is what omitting
            // it would mean.
            None => Selector::default(),
            Some(v) => match self.selector(v, "spec.podSelector", &|k| Ok(k.to_string())) {
                ParsedSelector::Ok(s) => s,
                ParsedSelector::Unsupported(_) => Selector::default(),
            },
        };
        let subject = self.in_namespace(subject);
        let ingress = self.array(Self::field(spec, "ingress"), "spec.ingress");
        let egress = self.array(Self::field(spec, "egress"), "spec.egress");
        // Kubernetes' defaulting: Ingress always, Egress when there are egress rules.
        let (mut has_ingress, mut has_egress) = (true, !egress.is_empty());
        if let Some(types) = Self::field(spec, "policyTypes") {
            (has_ingress, has_egress) = (false, false);
            for (i, t) in self
                .array(Some(types), "spec.policyTypes")
                .iter()
                .enumerate()
            {
                let path = format!("spec.policyTypes[{i}]");
                match self.string(t, &path) {
                    Some("Ingress") => has_ingress = true,
                    Some("Egress") => has_egress = true,
                    Some(other) => self.err(
                        &path,
                        format!("{other:?} is not a policy type: expected Ingress or Egress"),
                    ),
                    None => {}
                }
            }
        }
        let mut out = PolicySpec {
            source: SpecSource::Spec,
            subject: Subject::Endpoints(subject),
            ingress: DirectionRules::default(),
            egress: DirectionRules::default(),
        };
        // Rules of a direction the policy does not declare are ignored, as by Kubernetes.
        for (dir, rules, on, peers_key) in [
            (Direction::Ingress, ingress, has_ingress, "from"),
            (Direction::Egress, egress, has_egress, "to"),
        ] {
            if !on {
                continue;
            }
            let d = out.direction_mut(dir);
            d.default_deny = true;
            let section = dir.as_str();
            for (i, r) in rules.iter().enumerate() {
                let path = format!("spec.{section}[{i}]");
                if let Some(rule) = self.np_rule(r, &path, peers_key) {
                    out.direction_mut(dir).allow.push(rule);
                }
            }
        }
        vec![out]
    }

    fn np_rule(&mut self, v: &Value, path: &str, peers_key: &str) -> Option<Rule> {
        let m = self.object(v, path)?;
        let ppath = format!("{path}.{peers_key}");
        let raw_peers = self.array(Self::field(m, peers_key), &ppath);
        // No peers: every source/destination, known or not.
        let peers = if raw_peers.is_empty() {
            Peers::Any
        } else {
            let mut list = Vec::new();
            for (i, peer) in raw_peers.iter().enumerate() {
                let path = format!("{ppath}[{i}]");
                if let Some(p) = self.np_peer(peer, &path) {
                    list.push(p);
                }
            }
            Peers::List(list)
        };
        let mut ports = Vec::new();
        let portpath = format!("{path}.ports");
        for (i, p) in self
            .array(Self::field(m, "ports"), &portpath)
            .iter()
            .enumerate()
        {
            if let Some(Ok(p)) = self.port(p, &format!("{portpath}[{i}]"), false) {
                ports.push(p);
            }
        }
        Some(Rule {
            peers,
            ports,
            unenforceable: None,
        })
    }

    fn np_peer(&mut self, v: &Value, path: &str) -> Option<Peer> {
        let m = self.object(v, path)?;
        let pods = Self::field(m, "podSelector");
        let namespaces = Self::field(m, "namespaceSelector");
        if let Some(block) = Self::field(m, "ipBlock") {
            if pods.is_some() || namespaces.is_some() {
                self.err(
                    path,
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                );
                return None;
            }
            let bpath = format!("{path}.ipBlock");
            let b = self.object(block, &bpath)?;
            let cidr = match Self::field(b, "cidr") {
                Some(c) => self.cidr(c, &format!("{bpath}.cidr"), false),
                None => {
                    self.err(&format!("{bpath}.cidr"), "missing");
                    None
                }
            };
            let excepts = self.array(Self::field(b, "except"), &format!("{bpath}.except"));
            return self.cidr_peer(cidr, excepts, &bpath, false).map(Peer::Cidr);
        }
        if pods.is_none() && namespaces.is_none() {
            self.err(
                path,
                "a peer must set podSelector, namespaceSelector or ipBlock",
            );
            return None;
        }
        let mut sel = Selector::default();
        if let Some(v) = pods
            && let ParsedSelector::Ok(s) =
                self.selector(v, &format!("{path}.podSelector"), &|k| Ok(k.to_string()))
        {
            sel.requirements.extend(s.requirements);
        }
        match namespaces {
            // podSelector alone: pods of the policy's namespace.
            None => sel = self.in_namespace(sel),
            Some(v) => {
                if let ParsedSelector::Ok(s) =
                    self.selector(v, &format!("{path}.namespaceSelector"), &|k| {
                        Ok(format!("{NAMESPACE_LABELS_PREFIX}{k}"))
                    })
                {
                    sel.requirements.extend(s.requirements);
                }
            }
        }
        Some(Peer::Endpoints(self.local_cluster_default(sel)))
    }
}

// === impl Parser: Cilium policies ===

/// Fields of Cilium rules mesh knows but cannot enforce, with why.
const UNSUPPORTED_RULE_FIELDS: &[(&str, &str)] = &[
    ("fromRequires", "deprecated in Cilium and not supported"),
    ("toRequires", "deprecated in Cilium and not supported"),
    ("fromGroups", "cloud provider groups are not supported"),
    ("toGroups", "cloud provider groups are not supported"),
    (
        "fromNodes",
        "node selectors are not supported (use fromEntities: remote-node)",
    ),
    (
        "toNodes",
        "node selectors are not supported (use toEntities: remote-node)",
    ),
    ("toServices", "service selectors are not supported"),
    (
        "toFQDNs",
        "FQDN rules need a DNS proxy, which mesh does not run",
    ),
    ("icmps", "ICMP rules are not enforced by mesh"),
];

/// Fields of a Cilium `toPorts[]` entry mesh cannot enforce.
const UNSUPPORTED_PORT_RULE_FIELDS: &[(&str, &str)] = &[
    ("rules", "L7 rules need a proxy, which mesh does not run"),
    (
        "originatingTLS",
        "TLS interception needs a proxy, which mesh does not run",
    ),
    (
        "terminatingTLS",
        "TLS interception needs a proxy, which mesh does not run",
    ),
    (
        "serverNames",
        "TLS server names need a proxy, which mesh does not run",
    ),
    ("listener", "Envoy listeners are not supported"),
];

impl Parser<'_> {
    fn cilium_policy(&mut self, root: &Map<String, Value>) -> Vec<PolicySpec> {
        let mut out = Vec::new();
        let spec = Self::field(root, "spec");
        let specs = self.array(Self::field(root, "specs"), "specs");
        if spec.is_none() && specs.is_empty() {
            self.err("spec", "missing: a Cilium policy needs spec or specs");
        }
        if let Some(s) = spec
            && let Some(s) = self.cilium_rule(s, SpecSource::Spec)
        {
            out.push(s);
        }
        for (i, s) in specs.iter().enumerate() {
            if let Some(s) = self.cilium_rule(s, SpecSource::Specs(i as u32)) {
                out.push(s);
            }
        }
        out
    }

    /// One Cilium `Rule` (a `spec` or a `specs[]` entry).
    fn cilium_rule(&mut self, v: &Value, source: SpecSource) -> Option<PolicySpec> {
        let path = source.to_string();
        let m = self.object(v, &path)?;
        let subject = match (
            Self::field(m, "endpointSelector"),
            Self::field(m, "nodeSelector"),
        ) {
            (Some(_), Some(_)) => {
                self.err(&path, "endpointSelector and nodeSelector are exclusive");
                return None;
            }
            (None, None) => {
                self.err(&path, "needs endpointSelector or nodeSelector");
                return None;
            }
            (Some(es), None) => {
                match self.cilium_selector(es, &format!("{path}.endpointSelector")) {
                    ParsedSelector::Ok(s) => Subject::Endpoints(self.in_namespace(s)),
                    // Problem already reported; a subject mesh cannot read selects nothing.
                    ParsedSelector::Unsupported(_) => Subject::Nodes(Selector::default()),
                }
            }
            (None, Some(ns)) => {
                let npath = format!("{path}.nodeSelector");
                if self.kind != PolicyKind::CiliumClusterwideNetworkPolicy {
                    self.err(
                        &npath,
                        "only a CiliumClusterwideNetworkPolicy may select nodes",
                    );
                }
                self.problem(
                    &npath,
                    "host policies (nodeSelector) are not enforced by mesh: this spec selects no endpoint",
                );
                match self.cilium_selector(ns, &npath) {
                    ParsedSelector::Ok(s) => Subject::Nodes(s),
                    ParsedSelector::Unsupported(_) => Subject::Nodes(Selector::default()),
                }
            }
        };
        let mut spec = PolicySpec {
            source,
            subject,
            ingress: DirectionRules::default(),
            egress: DirectionRules::default(),
        };
        let mut explicit_default_deny = [None, None];
        if let Some(edd) = Self::field(m, "enableDefaultDeny") {
            let epath = format!("{path}.enableDefaultDeny");
            if let Some(e) = self.object(edd, &epath) {
                for (i, dir) in Direction::ALL.iter().enumerate() {
                    if let Some(b) = Self::field(e, dir.as_str()) {
                        explicit_default_deny[i] =
                            self.boolean(b, &format!("{epath}.{}", dir.as_str()));
                    }
                }
            }
        }
        for (i, dir) in Direction::ALL.into_iter().enumerate() {
            let (allow_key, deny_key) = match dir {
                Direction::Ingress => ("ingress", "ingressDeny"),
                Direction::Egress => ("egress", "egressDeny"),
            };
            let allow = self.array(Self::field(m, allow_key), &format!("{path}.{allow_key}"));
            let deny = self.array(Self::field(m, deny_key), &format!("{path}.{deny_key}"));
            let mut rules = DirectionRules {
                // Cilium: default deny in a direction with rules, unless the policy says.
                default_deny: explicit_default_deny[i]
                    .unwrap_or(!allow.is_empty() || !deny.is_empty()),
                ..Default::default()
            };
            for (j, r) in allow.iter().enumerate() {
                let rpath = format!("{path}.{allow_key}[{j}]");
                if let Some(r) = self.cilium_peer_rule(r, &rpath, dir) {
                    rules.allow.push(r);
                }
            }
            for (j, r) in deny.iter().enumerate() {
                let rpath = format!("{path}.{deny_key}[{j}]");
                if let Some(r) = self.cilium_peer_rule(r, &rpath, dir) {
                    rules.deny.push(r);
                }
            }
            // Fail closed: a rule mesh cannot enforce never leaves its direction open.
            if rules
                .allow
                .iter()
                .chain(&rules.deny)
                .any(|r| r.unenforceable.is_some())
            {
                rules.default_deny = true;
            }
            *spec.direction_mut(dir) = rules;
        }
        Some(spec)
    }

    /// An ingress/egress (allow or deny) rule of a Cilium policy.
    fn cilium_peer_rule(&mut self, v: &Value, path: &str, dir: Direction) -> Option<Rule> {
        let m = self.object(v, path)?;
        let mut unenforceable: Vec<String> = Vec::new();
        let (from_to, unsupported_prefix) = match dir {
            Direction::Ingress => ("from", "from"),
            Direction::Egress => ("to", "to"),
        };
        for (field, why) in UNSUPPORTED_RULE_FIELDS {
            let applies = field.starts_with(unsupported_prefix) || *field == "icmps";
            if applies && let Some(v) = Self::field(m, field) {
                if matches!(v, Value::Array(a) if a.is_empty()) {
                    continue;
                }
                let reason = format!("{field}: {why}");
                self.problem(
                    &format!("{path}.{field}"),
                    format!("{why}: the rule fails closed"),
                );
                unenforceable.push(reason);
            }
        }
        if let Some(a) = Self::field(m, "authentication") {
            let mode = a.get("mode").and_then(Value::as_str).unwrap_or_default();
            if mode != "disabled" {
                let why = "mutual authentication is not supported";
                self.problem(
                    &format!("{path}.authentication"),
                    format!("{why}: the rule fails closed"),
                );
                unenforceable.push(format!("authentication: {why}"));
            }
        }

        let mut peers = Vec::new();
        let mut has_l3 = false;

        let key = format!("{from_to}Endpoints");
        let epath = format!("{path}.{key}");
        for (i, s) in self.array(Self::field(m, &key), &epath).iter().enumerate() {
            has_l3 = true;
            let spath = format!("{epath}[{i}]");
            match self.cilium_selector(s, &spath) {
                ParsedSelector::Ok(mut sel) => {
                    // Cilium: a peer of a namespaced policy without a namespace requirement
                    // is in the policy's namespace.
                    if !sel.has_key(LABEL_NAMESPACE, false) {
                        sel = self.in_namespace(sel);
                    }
                    peers.push(Peer::Endpoints(self.local_cluster_default(sel)));
                }
                ParsedSelector::Unsupported(reason) => unenforceable.push(reason),
            }
        }

        let key = format!("{from_to}Entities");
        let epath = format!("{path}.{key}");
        for (i, e) in self.array(Self::field(m, &key), &epath).iter().enumerate() {
            has_l3 = true;
            let spath = format!("{epath}[{i}]");
            let Some(e) = self.string(e, &spath) else {
                continue;
            };
            match e {
                "world" => peers.push(Peer::Entity(Entity::World)),
                "cluster" => peers.push(Peer::Entity(Entity::Cluster)),
                "host" => peers.push(Peer::Entity(Entity::Host)),
                "remote-node" => peers.push(Peer::Entity(Entity::RemoteNode)),
                "all" => peers.push(Peer::Entity(Entity::All)),
                // Selects nothing, by definition.
                "none" => {}
                "world-ipv4" | "world-ipv6" | "kube-apiserver" | "health" | "init"
                | "ingress" | "unmanaged" => {
                    let why = format!("entity {e:?} is not supported by mesh");
                    self.problem(&spath, format!("{why}: the rule fails closed"));
                    unenforceable.push(why);
                }
                other => self.err(
                    &spath,
                    format!("{other:?} is not an entity: expected world, cluster, host, remote-node or all"),
                ),
            }
        }

        let key = format!("{from_to}CIDR");
        let cpath = format!("{path}.{key}");
        for (i, c) in self.array(Self::field(m, &key), &cpath).iter().enumerate() {
            has_l3 = true;
            if let Some(cidr) = self.cidr(c, &format!("{cpath}[{i}]"), true) {
                peers.push(Peer::Cidr(CidrPeer {
                    cidr,
                    except: Vec::new(),
                }));
            }
        }

        let key = format!("{from_to}CIDRSet");
        let cpath = format!("{path}.{key}");
        for (i, c) in self.array(Self::field(m, &key), &cpath).iter().enumerate() {
            has_l3 = true;
            let spath = format!("{cpath}[{i}]");
            let Some(c) = self.object(c, &spath) else {
                continue;
            };
            let cidr = match Self::field(c, "cidr") {
                Some(v) => self.cidr(v, &format!("{spath}.cidr"), true),
                None => {
                    if Self::field(c, "cidrGroupRef").is_some()
                        || Self::field(c, "cidrGroupSelector").is_some()
                    {
                        let why = "CiliumCIDRGroup references are not supported";
                        self.problem(&spath, format!("{why}: the rule fails closed"));
                        unenforceable.push(why.to_string());
                    } else {
                        self.err(&format!("{spath}.cidr"), "missing");
                    }
                    continue;
                }
            };
            let excepts = self.array(Self::field(c, "except"), &format!("{spath}.except"));
            if let Some(p) = self.cidr_peer(cidr, excepts, &spath, true) {
                peers.push(Peer::Cidr(p));
            }
        }

        let tpath = format!("{path}.toPorts");
        let to_ports = self.array(Self::field(m, "toPorts"), &tpath);
        let mut ports = Vec::new();
        for (i, pr) in to_ports.iter().enumerate() {
            let prpath = format!("{tpath}[{i}]");
            let Some(pr) = self.object(pr, &prpath) else {
                continue;
            };
            for (field, why) in UNSUPPORTED_PORT_RULE_FIELDS {
                if Self::field(pr, field).is_some_and(|v| !is_empty_value(v)) {
                    self.problem(
                        &format!("{prpath}.{field}"),
                        format!("{why}: the rule fails closed"),
                    );
                    unenforceable.push(format!("{field}: {why}"));
                }
            }
            let ppath = format!("{prpath}.ports");
            let list = self.array(Self::field(pr, "ports"), &ppath);
            if list.is_empty() {
                // A port rule without ports (only L7 rules, say) covers every port.
                ports.push(PortSpec {
                    protocol: None,
                    ports: PortMatch::Range(PortRange::ALL),
                });
            }
            for (j, p) in list.iter().enumerate() {
                match self.port(p, &format!("{ppath}[{j}]"), true) {
                    Some(Ok(p)) => ports.push(p),
                    Some(Err(why)) => unenforceable.push(why),
                    None => {}
                }
            }
        }

        // Cilium: a rule with ports and no L3 peer is L4-only (any peer); a rule with neither
        // (`ingress: [{}]`) allows nothing but still makes the direction default-deny.
        let peers = match (has_l3, to_ports.is_empty()) {
            (false, false) => Peers::Any,
            _ => Peers::List(peers),
        };
        Some(Rule {
            peers,
            ports,
            unenforceable: (!unenforceable.is_empty()).then(|| unenforceable.join("; ")),
        })
    }
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_iana_svc_name() {
        for ok in ["http", "http-alt", "h2c", "dns-tcp", "a"] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "http x",
            "-http",
            "http-",
            "ht--tp",
            "8080",
            "HTTP",
            "abcdefghijklmnop",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }
}
