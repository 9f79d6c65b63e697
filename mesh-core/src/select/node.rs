//! The node-level decision: what a node's agent programs for every frontend, and why.
//!
//! [`plan_node`] takes the global services of every programmed cluster (what the agent
//! holds once the [sync gate](super::sync_gate) let them in) and returns a [`NodePlan`]:
//! per local global service its [`Selection`] (with the reason for every left-out backend),
//! and per frontend (ClusterIP, port, protocol) which service holds it and which backends
//! are programmed there. Two rules apply on top of [`select`]:
//!
//! - *First Service wins a ClusterIP*: two local Services (or two ports of one) that claim
//!   the same `(ClusterIP, port, protocol)` cannot both be programmed; the first in
//!   `(namespace, name)` order, then port order, holds it and the loser is named on both
//!   sides ([`Claim`]).
//! - *Address family*: a frontend gets only the selected backends of its own address family
//!   (an IPv4 ClusterIP never forwards to an IPv6 pod address).
//!
//! The agent turns the plan into map entries and `meshctl service explain` prints it, so the
//! explanation is the agent's decision, not a second implementation of it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::select::{SelectInput, SelectedBackend, Selection, Stale, StaleNodes, select};
use crate::{ClusterName, GlobalService, Protocol, ServicePort};

/// Global services of one cluster, by `(namespace, name)` (as the agent holds them).
pub type Services = BTreeMap<(String, String), GlobalService>;

/// Every cluster's global services as a node's agent holds them.
#[derive(Debug, Clone)]
pub struct MeshView<'a> {
    pub local_cluster: &'a ClusterName,
    /// The clusters the sync gate lets in; the others are not here.
    pub clusters: BTreeMap<&'a ClusterName, &'a Services>,
    /// Remote clusters whose peer link is stale, and for how long (stale demotion:
    /// [`SelectInput::stale`]).
    pub stale: Stale<'a>,
    /// Nodes whose agent stopped reporting, by (cluster, node), and for how long they have
    /// been marked so ([`SelectInput::stale_nodes`]).
    pub stale_nodes: StaleNodes<'a>,
}

/// A frontend: one ClusterIP, port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A claim on a frontend: a local Service and one of its ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claimant {
    pub namespace: String,
    pub name: String,
    pub port: ServicePort,
}

impl fmt::Display for Claimant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} port ", self.namespace, self.name)?;
        if !self.port.name.is_empty() {
            write!(f, "{:?} ", self.port.name)?;
        }
        write!(f, "{}/{}", self.port.port, self.port.protocol)
    }
}

/// Who holds a frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This claim holds the frontend; `losers` claimed it too, later.
    Won { losers: Vec<Claimant> },
    /// An earlier claim holds it: nothing of this one is programmed there.
    Lost { winner: Claimant },
}

/// One `(ClusterIP, port)` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendPlan {
    pub frontend: Frontend,
    /// Index of the port in the service's `selection.ports`.
    pub port: usize,
    pub claim: Claim,
}

/// One global service of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub namespace: String,
    pub name: String,
    pub selection: Selection,
    /// Every `(ClusterIP, port)` of the selection, ports outer and ClusterIPs inner: the
    /// order in which the service claims them.
    pub frontends: Vec<FrontendPlan>,
}

// === impl ServicePlan ===

impl ServicePlan {
    /// The selected backends of `f`'s port that `f` may forward to (its address family),
    /// whether or not `f`'s claim won.
    pub fn backends<'s>(&'s self, f: &FrontendPlan) -> impl Iterator<Item = &'s SelectedBackend> {
        let vip = f.frontend.vip;
        self.port_backends(f)
            .filter(move |b| same_family(vip, b.ip))
    }

    /// The selected backends of `f`'s port left out of `f` for their address family.
    pub fn other_family<'s>(
        &'s self,
        f: &FrontendPlan,
    ) -> impl Iterator<Item = &'s SelectedBackend> {
        let vip = f.frontend.vip;
        self.port_backends(f)
            .filter(move |b| !same_family(vip, b.ip))
    }

    fn port_backends<'s>(&'s self, f: &FrontendPlan) -> impl Iterator<Item = &'s SelectedBackend> {
        self.selection
            .ports
            .get(f.port)
            .into_iter()
            .flat_map(|p| &p.backends)
    }

    /// The claim `f` of this service makes: this service and `f`'s port.
    pub fn claimant(&self, f: &FrontendPlan) -> Claimant {
        Claimant {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port: self.selection.ports[f.port].frontend.clone(),
        }
    }
}

/// What a node programs: see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlan {
    /// Every global service of the local cluster, by `(namespace, name)`.
    pub services: Vec<ServicePlan>,
    /// The claim holding each frontend: (index in `services`, index in its `frontends`).
    owners: BTreeMap<Frontend, (usize, usize)>,
}

// === impl NodePlan ===

impl NodePlan {
    /// The plan of the local service `namespace/name`, if it exists.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServicePlan> {
        self.services
            .binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .map(|i| &self.services[i])
    }

    /// The service and claim that hold `frontend`.
    pub fn owner(&self, frontend: &Frontend) -> Option<(&ServicePlan, &FrontendPlan)> {
        let &(s, f) = self.owners.get(frontend)?;
        let svc = &self.services[s];
        Some((svc, &svc.frontends[f]))
    }

    /// Every programmed frontend with its backends, services in `(namespace, name)` order
    /// and each in claim order: exactly what the maps hold.
    pub fn programmed(
        &self,
    ) -> impl Iterator<Item = (Frontend, impl Iterator<Item = &SelectedBackend>)> {
        self.services.iter().flat_map(|svc| {
            svc.frontends
                .iter()
                .filter(|f| matches!(f.claim, Claim::Won { .. }))
                .map(move |f| (f.frontend, svc.backends(f)))
        })
    }
}

/// Whether a frontend at `vip` may forward to `backend`.
pub fn same_family(vip: IpAddr, backend: IpAddr) -> bool {
    vip.is_ipv4() == backend.is_ipv4()
}

/// Plans every frontend of node `node` of `view.local_cluster` (see the module docs).
pub fn plan_node(view: &MeshView<'_>, node: &str) -> NodePlan {
    let local_cluster = view.local_cluster;
    // Each service's copies in the other clusters, in cluster order.
    let mut remotes: BTreeMap<(&str, &str), Vec<&GlobalService>> = BTreeMap::new();
    for (name, services) in &view.clusters {
        if *name == local_cluster {
            continue;
        }
        for svc in services.values() {
            remotes
                .entry((svc.namespace.as_str(), svc.name.as_str()))
                .or_default()
                .push(svc);
        }
    }

    let mut plan = NodePlan::default();
    let local_services = view.clusters.get(local_cluster).copied();
    for local in local_services.into_iter().flat_map(|s| s.values()) {
        let remotes = remotes
            .get(&(local.namespace.as_str(), local.name.as_str()))
            .map_or(&[][..], Vec::as_slice);
        let selection = select(&SelectInput {
            local_cluster,
            node,
            local,
            remotes,
            stale: &view.stale,
            stale_nodes: &view.stale_nodes,
        });
        let mut svc = ServicePlan {
            namespace: local.namespace.clone(),
            name: local.name.clone(),
            selection,
            frontends: Vec::new(),
        };
        let index = plan.services.len();
        for (port, p) in svc.selection.ports.iter().enumerate() {
            for &vip in &svc.selection.frontends {
                let frontend = Frontend {
                    vip,
                    port: p.frontend.port,
                    protocol: p.frontend.protocol,
                };
                let claim = match plan.owners.get(&frontend) {
                    None => {
                        plan.owners.insert(frontend, (index, svc.frontends.len()));
                        Claim::Won { losers: Vec::new() }
                    }
                    Some(&(s, f)) => {
                        let me = Claimant {
                            namespace: svc.namespace.clone(),
                            name: svc.name.clone(),
                            port: p.frontend.clone(),
                        };
                        // The winner is an earlier service, or an earlier port of this one.
                        let (owner, owner_f) = if s == index {
                            (&mut svc.frontends, f)
                        } else {
                            (&mut plan.services[s].frontends, f)
                        };
                        if let Claim::Won { losers } = &mut owner[owner_f].claim {
                            losers.push(me);
                        }
                        let winner = if s == index {
                            svc.claimant(&svc.frontends[f])
                        } else {
                            let w = &plan.services[s];
                            w.claimant(&w.frontends[f])
                        };
                        Claim::Lost { winner }
                    }
                };
                svc.frontends.push(FrontendPlan {
                    frontend,
                    port,
                    claim,
                });
            }
        }
        plan.services.push(svc);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Affinity, Backend, BackendConditions, TrafficPolicy};

    const NODE: &str = "node-a";
    const READY: BackendConditions = BackendConditions {
        ready: true,
        serving: true,
        terminating: false,
    };

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn http(port: u16) -> ServicePort {
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn backend(ip: &str) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            ports: vec![http(8080)],
            node: NODE.into(),
            zone: String::new(),
            conditions: READY,
        }
    }

    fn svc(cluster: &str, ns: &str, n: &str, vips: &[&str], backends: &[&str]) -> GlobalService {
        GlobalService {
            cluster: name(cluster),
            namespace: ns.into(),
            name: n.into(),
            global: true,
            shared: true,
            affinity: Affinity::None,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: vec![http(80)],
            frontends: vips.iter().map(|v| v.parse().unwrap()).collect(),
            backends: backends.iter().map(|b| backend(b)).collect(),
        }
    }

    fn services(v: Vec<GlobalService>) -> Services {
        v.into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s))
            .collect()
    }

    fn plan(clusters: &BTreeMap<ClusterName, Services>) -> NodePlan {
        let local = name("local");
        plan_node(
            &MeshView {
                local_cluster: &local,
                clusters: clusters.iter().collect(),
                stale: Stale::new(),
                stale_nodes: StaleNodes::new(),
            },
            NODE,
        )
    }

    /// `frontend -> [cluster/ip:port]` of every programmed frontend.
    fn programmed(p: &NodePlan) -> Vec<(String, Vec<String>)> {
        p.programmed()
            .map(|(f, bs)| {
                (
                    f.to_string(),
                    bs.map(|b| format!("{}/{}:{}", b.cluster, b.ip, b.port))
                        .collect(),
                )
            })
            .collect()
    }

    fn claimant(ns: &str, n: &str, port: ServicePort) -> Claimant {
        Claimant {
            namespace: ns.into(),
            name: n.into(),
            port,
        }
    }

    #[test]
    fn first_service_wins_a_cluster_ip_and_the_loser_is_named() {
        let clusters = BTreeMap::from([
            (
                name("local"),
                services(vec![
                    svc("local", "b", "web", &["10.96.0.10"], &["10.1.0.2"]),
                    svc(
                        "local",
                        "a",
                        "web",
                        &["10.96.0.10", "10.96.0.11"],
                        &["10.1.0.1"],
                    ),
                ]),
            ),
            (
                name("east"),
                services(vec![svc(
                    "east",
                    "b",
                    "web",
                    &["10.100.0.1"],
                    &["10.2.0.2"],
                )]),
            ),
        ]);
        let p = plan(&clusters);
        assert_eq!(
            programmed(&p),
            [
                (
                    "10.96.0.10:80/TCP".to_string(),
                    vec!["local/10.1.0.1:8080".to_string()]
                ),
                (
                    "10.96.0.11:80/TCP".to_string(),
                    vec!["local/10.1.0.1:8080".to_string()]
                ),
            ]
        );
        let a = p.service("a", "web").unwrap();
        let b = p.service("b", "web").unwrap();
        assert_eq!(
            a.frontends[0].claim,
            Claim::Won {
                losers: vec![claimant("b", "web", http(80))]
            }
        );
        assert_eq!(
            b.frontends[0].claim,
            Claim::Lost {
                winner: claimant("a", "web", http(80))
            }
        );
        assert_eq!(
            claimant("a", "web", http(80)).to_string(),
            "a/web port \"http\" 80/TCP"
        );
        // The loser's own selection is still explained (remote backend included).
        let lost: Vec<String> = b
            .backends(&b.frontends[0])
            .map(|b| b.ip.to_string())
            .collect();
        assert_eq!(lost, ["10.2.0.2", "10.1.0.2"]);
        let frontend = b.frontends[0].frontend;
        let (owner, _) = p.owner(&frontend).unwrap();
        assert_eq!(
            (owner.namespace.as_str(), owner.name.as_str()),
            ("a", "web")
        );
        assert!(p.service("c", "web").is_none());
    }

    #[test]
    fn two_ports_of_one_service_on_one_frontend() {
        let mut s = svc("local", "ns", "web", &["10.96.0.10"], &["10.1.0.1"]);
        let other = ServicePort {
            name: "alt".into(),
            ..http(80)
        };
        s.ports.push(other.clone());
        s.backends[0].ports.push(ServicePort {
            port: 9090,
            ..other.clone()
        });
        let clusters = BTreeMap::from([(name("local"), services(vec![s]))]);
        let p = plan(&clusters);
        // Ports in order: "alt" before "http".
        assert_eq!(
            programmed(&p),
            [(
                "10.96.0.10:80/TCP".to_string(),
                vec!["local/10.1.0.1:9090".to_string()]
            )]
        );
        let svc = &p.services[0];
        assert_eq!(
            svc.frontends[1].claim,
            Claim::Lost {
                winner: claimant("ns", "web", other)
            }
        );
    }

    #[test]
    fn frontends_get_backends_of_their_address_family() {
        let s = svc(
            "local",
            "ns",
            "web",
            &["10.96.0.10", "fd00:96::10"],
            &["10.1.0.5", "fd00:1::5"],
        );
        let clusters = BTreeMap::from([(name("local"), services(vec![s]))]);
        let p = plan(&clusters);
        assert_eq!(
            programmed(&p),
            [
                (
                    "10.96.0.10:80/TCP".to_string(),
                    vec!["local/10.1.0.5:8080".to_string()]
                ),
                (
                    "[fd00:96::10]:80/TCP".to_string(),
                    vec!["local/fd00:1::5:8080".to_string()]
                ),
            ]
        );
        let svc = &p.services[0];
        let other: Vec<String> = svc
            .other_family(&svc.frontends[0])
            .map(|b| b.ip.to_string())
            .collect();
        assert_eq!(other, ["fd00:1::5"]);
    }

    #[test]
    fn only_local_services_have_frontends() {
        let clusters = BTreeMap::from([
            (name("local"), Services::new()),
            (
                name("east"),
                services(vec![svc(
                    "east",
                    "ns",
                    "web",
                    &["10.100.0.1"],
                    &["10.2.0.1"],
                )]),
            ),
        ]);
        assert_eq!(plan(&clusters), NodePlan::default());
    }
}
