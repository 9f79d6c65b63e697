//! The objects a mesh-apiserver publishes (DESIGN.md section 4).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{ClusterId, ClusterName, Error, IdentityId, IdentityLabels};

/// A cluster's configuration, as returned by `Info` and stored at `clusters/<c>/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub name: ClusterName,
    pub id: ClusterId,
    pub pod_cidrs: Vec<IpNet>,
    pub service_cidr: Option<IpNet>,
    pub capabilities: Vec<String>,
    pub version: String,
}

/// A node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub cluster: ClusterName,
    pub name: String,
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    /// Since when the node's agent has not reported (marked by the cluster's publisher after
    /// `--node-stale-intervals` status intervals without a report); `None`: reporting, or
    /// never judged. Selection demotes the node's backends
    /// ([`SelectInput::stale_nodes`](crate::select::SelectInput::stale_nodes)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<std::time::SystemTime>,
}

/// A security identity and its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: IdentityId,
    pub labels: IdentityLabels,
}

/// An ipcache entry: a pod IP and what the datapath needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub identity: IdentityId,
    /// IP of the node hosting the pod (the tunnel endpoint / next hop).
    pub host_ip: Option<IpAddr>,
    pub node: String,
    pub namespace: String,
    pub pod: String,
    /// The pod's container ports that have a name (`name`, protocol, port), sorted: what a
    /// policy port given by name resolves to for this pod's identity.
    #[serde(default)]
    pub named_ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

// === impl Protocol ===

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// IANA protocol number, as used by the datapath.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol of an IANA protocol number, if it is one of ours.
    pub fn from_number(n: u8) -> Option<Self> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "TCP" | "tcp" => Ok(Protocol::Tcp),
            "UDP" | "udp" => Ok(Protocol::Udp),
            "SCTP" | "sctp" => Ok(Protocol::Sctp),
            _ => Err(Error::InvalidProtocol { value: s.into() }),
        }
    }
}

/// Backend preference of a global service (`service.cilium.io/affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    #[default]
    None,
    Local,
    Remote,
}

// === impl Affinity ===

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Local => "local",
            Affinity::Remote => "remote",
        }
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `spec.internalTrafficPolicy` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl fmt::Display for TrafficPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        })
    }
}

/// A port of a Service: matched across clusters by `(protocol, name)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// EndpointSlice conditions of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct BackendConditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A backend of a global service in the cluster that publishes it. `ports` holds the
/// backend's own target ports, by Service port name and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub ports: Vec<ServicePort>,
    pub node: String,
    pub zone: String,
    pub conditions: BackendConditions,
}

/// A Service as one cluster publishes it: a global one (annotated
/// `service.cilium.io/global`), or, with `global: false`, a plain Service published to the
/// cluster's own agents only, so their socket LB translates every ClusterIP (as Cilium's
/// kube-proxy replacement does) and egress policy is decided on the backend pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalService {
    pub cluster: ClusterName,
    pub namespace: String,
    pub name: String,
    /// Whether the Service is global. A non-global Service is never presented to a peer
    /// ([`crate::select::service_presented`]) and uses only local backends.
    #[serde(default = "yes")]
    pub global: bool,
    /// Whether this cluster exports its backends (`service.cilium.io/shared`).
    pub shared: bool,
    pub affinity: Affinity,
    pub internal_traffic_policy: TrafficPolicy,
    pub ports: Vec<ServicePort>,
    /// ClusterIPs of the Service in its own cluster.
    pub frontends: Vec<IpAddr>,
    pub backends: Vec<Backend>,
}

fn yes() -> bool {
    true
}

// === impl GlobalService ===

impl GlobalService {
    /// `namespace/name`
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
