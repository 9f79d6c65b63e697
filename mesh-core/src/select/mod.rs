//! Backend selection (DESIGN.md section 5): which backends a node's agent programs, and why
//! every other backend is left out. Every decision between the watched state and the maps
//! lives here, once, so the agent and `meshctl service explain` cannot disagree:
//!
//! - [`merge_addresses`]: one backend per address (the apiserver merges EndpointSlices with
//!   it, [`select`] its inputs);
//! - [`service_presented`]: a non-shared service is absent for peers (the gRPC edge);
//! - [`sync_gate`]: which clusters are programmed (the agent's state);
//! - [`select`]: one global service's backends;
//! - [`plan_node`]: every frontend of a node, with "first Service wins a ClusterIP" and the
//!   address-family filter (the agent's `desired::compute`, `meshctl service explain`).
//!
//! [`select`] is a pure function of the local Service, the same Service as the other
//! clusters publish it, and the node it runs for. Its output is sorted, so the agent can diff
//! two selections, and it explains every left-out backend ([`Excluded`]), which is what
//! `meshctl service explain` prints.
//!
//! The rules, per frontend port:
//!
//! - Frontends (ClusterIPs and ports) come only from the local Service.
//! - A backend serves a frontend port if it has a port of the same `(protocol, name)`; its own
//!   target port is used (clusters may use different target ports).
//! - A remote cluster whose Service is not shared (or not global there) contributes nothing.
//!   The local Service's own `shared` flag only controls export: the local agents always use
//!   local backends.
//! - A local Service that is not global (published to the cluster's own agents so their
//!   socket LB translates every ClusterIP) uses only local backends: no remote copy is
//!   considered, whatever the other clusters publish (DESIGN.md section 5: "not global:
//!   nothing imported"). `internalTrafficPolicy` applies to it as to any Service.
//! - `internalTrafficPolicy: Local` (of the local Service) keeps only local backends on this
//!   node, never remote ones.
//! - Otherwise, with L the ready local and R the ready remote backends: affinity `none` takes
//!   L ∪ R, `local` takes L or else R, `remote` takes R or else L.
//! - When no candidate is ready, serving-and-terminating backends are used with the same
//!   preference. When nothing is left the port has no backend, and the datapath refuses
//!   connections to it rather than using a stale backend.
//! - *Stale demotion* (DESIGN.md section 13b): a remote cluster whose peer link is stale
//!   ([`SelectInput::stale`]) ranks below every fresh backend of the same condition class.
//!   The ranks, best first, are: fresh ready, stale ready, fresh serving-terminating, stale
//!   serving-terminating; the first rank with a candidate is used, with the affinity's
//!   preference within it. So a stale cluster's backends carry traffic only when no fresh
//!   ready backend exists for the port, and the switch in either direction is one change of
//!   the selection (one map update, never an empty set). The local cluster is never stale.
//! - *Lost nodes* (issue 14 part 4): a backend on a node whose agent stopped reporting
//!   ([`SelectInput::stale_nodes`], in any cluster, the local one included) ranks exactly as
//!   a backend of a stale cluster: stale ready, below every fresh ready backend.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::{
    Affinity, Backend, BackendConditions, ClusterName, GlobalService, ServicePort, TrafficPolicy,
};

mod export;
mod gate;
mod merge;
mod node;

pub use export::{Reader, policy_presented, service_presented};
pub use gate::{GateInput, SyncGate, Waiting, sync_gate};
pub use merge::{condition_rank, merge_addresses};
pub use node::{
    Claim, Claimant, Frontend, FrontendPlan, MeshView, NodePlan, ServicePlan, Services, plan_node,
    same_family,
};

/// What [`select`] decides from.
#[derive(Debug, Clone, Copy)]
pub struct SelectInput<'a> {
    pub local_cluster: &'a ClusterName,
    /// The node the agent runs on (for `internalTrafficPolicy: Local`).
    pub node: &'a str,
    /// The Service as the local cluster publishes it.
    pub local: &'a GlobalService,
    /// The same Service (namespace/name) as each other cluster publishes it, at most one per
    /// cluster. Order does not matter.
    pub remotes: &'a [&'a GlobalService],
    /// Remote clusters whose peer link is stale, with how long it has been (the caller's
    /// clock: the duration only names the reason, the decision is "stale or not"). An entry
    /// for the local cluster is ignored.
    pub stale: &'a Stale<'a>,
    /// Nodes, by (cluster, node name), whose agent stopped reporting, with how long they have
    /// been marked so (the publisher's `Node::stale_since`). A backend on such a node ranks
    /// as a backend of a stale cluster, whatever its cluster (the local one included).
    pub stale_nodes: &'a StaleNodes<'a>,
}

/// Stale remote clusters and for how long they have been stale (see [`SelectInput::stale`]).
pub type Stale<'a> = BTreeMap<&'a ClusterName, Duration>;

/// Nodes not reporting, by (cluster, node name), and for how long they have been marked so
/// (see [`SelectInput::stale_nodes`]).
pub type StaleNodes<'a> = BTreeMap<(&'a ClusterName, &'a str), Duration>;

/// Which class of backends a port's selection was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// No backend can be used: connections to the frontend are refused.
    None,
    /// No candidate was ready; serving-and-terminating backends are used.
    ServingTerminating,
    /// Ready backends are used.
    Ready,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::None => "none",
            Tier::ServingTerminating => "serving-terminating",
            Tier::Ready => "ready",
        })
    }
}

/// The result of [`select`]. Every list is sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// ClusterIPs of the local Service.
    pub frontends: Vec<IpAddr>,
    /// One entry per port of the local Service.
    pub ports: Vec<PortSelection>,
    /// Every backend of the inputs not selected, with the reason: once per port it was
    /// considered for, or once with `port: None` when it was not considered at all.
    pub excluded: Vec<Excluded>,
    /// The worst tier over all ports (`Tier::None` when the Service has no port).
    pub tier: Tier,
    /// Whether some port fell back from the preferred side of its affinity to the other.
    pub used_failover: bool,
    /// Whether some port uses backends of stale clusters or nodes (no fresh one of its
    /// tier).
    pub stale: bool,
}

/// The backends selected for one frontend port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSelection {
    /// The local Service's port.
    pub frontend: ServicePort,
    pub backends: Vec<SelectedBackend>,
    pub tier: Tier,
    pub used_failover: bool,
    /// The backends are of stale clusters or on nodes not reporting: no fresh backend of
    /// `tier` exists for the port.
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectedBackend {
    pub cluster: ClusterName,
    pub ip: IpAddr,
    /// The backend's own target port for this frontend port.
    pub port: u16,
    pub node: String,
    /// Whether the backend is in the local cluster.
    pub local: bool,
}

/// A backend left out, for one frontend port (`port: Some`) or for all of them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Excluded {
    pub cluster: ClusterName,
    pub ip: IpAddr,
    pub port: Option<ServicePort>,
    pub reason: Reason,
}

/// Why a backend is left out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Its cluster does not share the Service (`service.cilium.io/shared: "false"`).
    NotShared,
    /// Its cluster publishes the Service as not global (local-only: never exported).
    NotGlobal,
    /// The local Service is not global: only local backends are used.
    LocalService,
    /// Its cluster appears more than once in the input, or a remote claims the local
    /// cluster's name; the input is inconsistent, so none of those copies is trusted.
    DuplicateCluster,
    /// It has no port with the frontend port's protocol and name.
    PortMismatch { wanted: ServicePort },
    /// The local Service has `internalTrafficPolicy: Local` and the backend is on another
    /// node of the local cluster.
    InternalTrafficPolicyLocal { backend_node: String },
    /// The local Service has `internalTrafficPolicy: Local`: remote backends are never used.
    InternalTrafficPolicyLocalRemote,
    /// Not ready and not terminating.
    NotReady,
    /// Terminating and no longer serving.
    NotServing,
    /// Serving but terminating: such backends are used only when no candidate is ready.
    TerminatingNotNeeded,
    /// A remote backend left out because affinity is `local` and local backends are
    /// available.
    AffinityLocal,
    /// A local backend left out because affinity is `remote` and remote backends are
    /// available.
    AffinityRemote,
    /// Its cluster's peer link is stale and a fresh backend of the same condition class
    /// serves the port (stale demotion).
    Demoted {
        cluster: ClusterName,
        stale_for: Duration,
    },
    /// It is on a node whose agent stopped reporting and a fresh backend of the same
    /// condition class serves the port (stale demotion of a lost node).
    NodeNotReporting { node: String, stale_for: Duration },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotShared => {
                f.write_str("its cluster does not share the service (shared: false)")
            }
            Reason::NotGlobal => f.write_str("the service is not global in its cluster"),
            Reason::LocalService => {
                f.write_str("the local Service is not global: only local backends are used")
            }
            Reason::DuplicateCluster => f.write_str(
                "its cluster is given more than once (or as both local and remote); ignored",
            ),
            Reason::PortMismatch { wanted } => write!(
                f,
                "no port named {:?} with protocol {} (frontend port {})",
                wanted.name, wanted.protocol, wanted.port
            ),
            Reason::InternalTrafficPolicyLocal { backend_node } => write!(
                f,
                "internalTrafficPolicy Local: on node {backend_node:?}, not on this node"
            ),
            Reason::InternalTrafficPolicyLocalRemote => {
                f.write_str("internalTrafficPolicy Local: remote backends are never used")
            }
            Reason::NotReady => f.write_str("not ready"),
            Reason::NotServing => f.write_str("terminating and not serving"),
            Reason::TerminatingNotNeeded => {
                f.write_str("terminating: used only when no backend is ready")
            }
            Reason::AffinityLocal => f.write_str("affinity local: local backends are available"),
            Reason::AffinityRemote => f.write_str("affinity remote: remote backends are available"),
            Reason::Demoted { cluster, stale_for } => write!(
                f,
                "demoted: cluster {cluster} stale for {}s",
                stale_for.as_secs()
            ),
            Reason::NodeNotReporting { node, stale_for } => write!(
                f,
                "demoted: node {node} not reporting for {}s",
                stale_for.as_secs()
            ),
        }
    }
}

/// Selects the backends of one global service for the agent on `input.node`.
pub fn select(input: &SelectInput<'_>) -> Selection {
    let local_svc = input.local;
    let mut excluded = BTreeSet::new();

    // Candidates, one per (cluster, ip). The local service is taken from the local cluster
    // whatever its `shared` flag says.
    let mut candidates = merge_backends(input, input.local_cluster, local_svc, true, None);
    let mut seen: BTreeMap<&ClusterName, usize> = BTreeMap::new();
    for r in input.remotes {
        *seen.entry(&r.cluster).or_default() += 1;
    }
    for r in input.remotes {
        let reason = if r.cluster == *input.local_cluster || seen[&r.cluster] > 1 {
            Reason::DuplicateCluster
        } else if !local_svc.global {
            Reason::LocalService
        } else if !service_presented(r.global, r.shared, Reader::Peer) {
            if r.global {
                Reason::NotShared
            } else {
                Reason::NotGlobal
            }
        } else {
            let stale = input.stale.get(&r.cluster).copied();
            candidates.extend(merge_backends(input, &r.cluster, r, false, stale));
            continue;
        };
        for b in &r.backends {
            excluded.insert(Excluded {
                cluster: r.cluster.clone(),
                ip: b.ip,
                port: None,
                reason: reason.clone(),
            });
        }
    }

    let frontend_ports: BTreeSet<&ServicePort> = local_svc.ports.iter().collect();
    let ports: Vec<PortSelection> = frontend_ports
        .into_iter()
        .map(|fp| select_port(input, fp, &candidates, &mut excluded))
        .collect();

    let frontends: BTreeSet<IpAddr> = local_svc.frontends.iter().copied().collect();
    Selection {
        frontends: frontends.into_iter().collect(),
        tier: ports.iter().map(|p| p.tier).min().unwrap_or(Tier::None),
        used_failover: ports.iter().any(|p| p.used_failover),
        stale: ports.iter().any(|p| p.stale),
        ports,
        excluded: excluded.into_iter().collect(),
    }
}

/// A backend as selection sees it: one per (cluster, ip).
#[derive(Debug)]
struct Candidate<'a> {
    cluster: &'a ClusterName,
    backend: Cow<'a, Backend>,
    local: bool,
    /// Why and how long it has been stale; `None`: fresh.
    stale: Option<Staleness>,
}

/// Why a candidate ranks as stale.
#[derive(Debug, Clone, Copy)]
enum Staleness {
    /// Its (remote) cluster's peer link is stale.
    Cluster(Duration),
    /// Its node's agent stopped reporting.
    Node(Duration),
}

// === impl Candidate ===

impl Candidate<'_> {
    fn class(&self) -> Tier {
        class(self.backend.conditions)
    }

    /// Why a backend of class `Tier::None` is not used.
    /// Why it is left out for a fresh backend of its rank (it is stale).
    fn demoted_reason(&self, stale: Staleness) -> Reason {
        match stale {
            Staleness::Cluster(stale_for) => Reason::Demoted {
                cluster: self.cluster.clone(),
                stale_for,
            },
            Staleness::Node(stale_for) => Reason::NodeNotReporting {
                node: self.backend.node.clone(),
                stale_for,
            },
        }
    }

    fn unusable_reason(&self) -> Reason {
        let c = self.backend.conditions;
        if c.terminating && !c.serving {
            Reason::NotServing
        } else {
            Reason::NotReady
        }
    }
}

fn class(c: BackendConditions) -> Tier {
    if c.ready {
        Tier::Ready
    } else if c.serving && c.terminating {
        Tier::ServingTerminating
    } else {
        Tier::None
    }
}

/// The backends of one service, one per IP ([`merge_addresses`]: a service may list an IP
/// twice, e.g. from two EndpointSlices during a change). `stale`: how long the cluster has
/// been stale; a fresh cluster's backend on a node not reporting is stale too.
fn merge_backends<'a>(
    input: &SelectInput<'_>,
    cluster: &'a ClusterName,
    svc: &'a GlobalService,
    local: bool,
    stale: Option<Duration>,
) -> Vec<Candidate<'a>> {
    merge_addresses(svc.backends.iter().map(Cow::Borrowed))
        .into_iter()
        .map(|backend| {
            let stale = stale.map(Staleness::Cluster).or_else(|| {
                input
                    .stale_nodes
                    .get(&(cluster, backend.node.as_str()))
                    .map(|d| Staleness::Node(*d))
            });
            Candidate {
                cluster,
                backend,
                local,
                stale,
            }
        })
        .collect()
}

fn select_port(
    input: &SelectInput<'_>,
    fp: &ServicePort,
    candidates: &[Candidate<'_>],
    excluded: &mut BTreeSet<Excluded>,
) -> PortSelection {
    let policy_local = input.local.internal_traffic_policy == TrafficPolicy::Local;
    let mut exclude = |c: &Candidate<'_>, reason: Reason| {
        excluded.insert(Excluded {
            cluster: c.cluster.clone(),
            ip: c.backend.ip,
            port: Some(fp.clone()),
            reason,
        });
    };

    // Candidates that can serve this port, with their target port.
    let mut eligible = Vec::new();
    for c in candidates {
        let Some(target) = c
            .backend
            .ports
            .iter()
            .find(|p| p.name == fp.name && p.protocol == fp.protocol)
        else {
            exclude(c, Reason::PortMismatch { wanted: fp.clone() });
            continue;
        };
        if policy_local && !c.local {
            exclude(c, Reason::InternalTrafficPolicyLocalRemote);
        } else if policy_local && c.backend.node != input.node {
            exclude(
                c,
                Reason::InternalTrafficPolicyLocal {
                    backend_node: c.backend.node.clone(),
                },
            );
        } else {
            eligible.push((c, target.port));
        }
    }

    // The best rank with a candidate, then the side the affinity prefers within it. Ranks,
    // best first: fresh ready, stale ready, fresh serving-terminating, stale
    // serving-terminating (stale demotion: see the module docs).
    let affinity = if policy_local {
        Affinity::None
    } else {
        input.local.affinity
    };
    let mut tier = Tier::None;
    let mut stale_rank = false;
    let (mut use_local, mut use_remote) = (false, false);
    for (t, stale) in [
        (Tier::Ready, false),
        (Tier::Ready, true),
        (Tier::ServingTerminating, false),
        (Tier::ServingTerminating, true),
    ] {
        let in_rank = |c: &Candidate<'_>| c.class() == t && c.stale.is_some() == stale;
        let has_local = eligible.iter().any(|(c, _)| c.local && in_rank(c));
        let has_remote = eligible.iter().any(|(c, _)| !c.local && in_rank(c));
        if !has_local && !has_remote {
            continue;
        }
        (tier, stale_rank) = (t, stale);
        (use_local, use_remote) = match affinity {
            Affinity::None => (true, true),
            Affinity::Local => (has_local, !has_local),
            Affinity::Remote => (!has_remote, has_remote),
        };
        break;
    }
    let used_failover = match affinity {
        Affinity::None => false,
        Affinity::Local => use_remote,
        Affinity::Remote => use_local,
    };

    let mut backends = Vec::new();
    for (c, port) in eligible {
        let class = c.class();
        let side = if c.local { use_local } else { use_remote };
        if class == Tier::None {
            exclude(c, c.unusable_reason());
        } else if class != tier {
            // Only a serving-terminating backend can be below a Ready selection.
            exclude(c, Reason::TerminatingNotNeeded);
        } else if let (Some(stale), false) = (c.stale, stale_rank) {
            // A fresh backend of this class serves the port (the rank above a stale one).
            exclude(c, c.demoted_reason(stale));
        } else if !side {
            exclude(
                c,
                if c.local {
                    Reason::AffinityRemote
                } else {
                    Reason::AffinityLocal
                },
            );
        } else {
            backends.push(SelectedBackend {
                cluster: c.cluster.clone(),
                ip: c.backend.ip,
                port,
                node: c.backend.node.clone(),
                local: c.local,
            });
        }
    }
    backends.sort();

    PortSelection {
        frontend: fp.clone(),
        backends,
        tier,
        used_failover,
        stale: stale_rank,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, Protocol};

    const NODE: &str = "node-a";

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
        }
    }

    fn http(p: u16) -> ServicePort {
        port("http", Protocol::Tcp, p)
    }

    const READY: BackendConditions = BackendConditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    const NOT_READY: BackendConditions = BackendConditions {
        ready: false,
        serving: false,
        terminating: false,
    };
    const TERMINATING: BackendConditions = BackendConditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    const GONE: BackendConditions = BackendConditions {
        ready: false,
        serving: false,
        terminating: true,
    };

    fn backend(ip: &str, node: &str, conditions: BackendConditions) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            ports: vec![http(8080)],
            node: node.into(),
            zone: String::new(),
            conditions,
        }
    }

    fn svc(cluster: &str, backends: Vec<Backend>) -> GlobalService {
        GlobalService {
            cluster: name(cluster),
            namespace: "ns".into(),
            name: "web".into(),
            global: true,
            shared: true,
            affinity: Affinity::None,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: vec![http(80)],
            frontends: vec!["10.96.0.10".parse().unwrap()],
            backends,
        }
    }

    fn run(local: &GlobalService, remotes: &[&GlobalService]) -> Selection {
        run_stale(local, remotes, &[])
    }

    /// [`run`] with the clusters of `stale` stale for that many seconds.
    fn run_stale(
        local: &GlobalService,
        remotes: &[&GlobalService],
        stale: &[(&str, u64)],
    ) -> Selection {
        run_lost(local, remotes, stale, &[])
    }

    /// [`run_stale`] with the nodes `(cluster, node, seconds)` of `lost` not reporting.
    fn run_lost(
        local: &GlobalService,
        remotes: &[&GlobalService],
        stale: &[(&str, u64)],
        lost: &[(&str, &str, u64)],
    ) -> Selection {
        let names: Vec<(ClusterName, u64)> = stale.iter().map(|(c, s)| (name(c), *s)).collect();
        let stale: Stale<'_> = names
            .iter()
            .map(|(c, s)| (c, Duration::from_secs(*s)))
            .collect();
        let lost_names: Vec<(ClusterName, &str, u64)> =
            lost.iter().map(|(c, n, s)| (name(c), *n, *s)).collect();
        let stale_nodes: StaleNodes<'_> = lost_names
            .iter()
            .map(|(c, n, s)| ((c, *n), Duration::from_secs(*s)))
            .collect();
        select(&SelectInput {
            local_cluster: &name("local"),
            node: NODE,
            local,
            remotes,
            stale: &stale,
            stale_nodes: &stale_nodes,
        })
    }

    /// `cluster/ip:port` of the selected backends of the only port.
    fn chosen(s: &Selection) -> Vec<String> {
        assert_eq!(s.ports.len(), 1);
        s.ports[0]
            .backends
            .iter()
            .map(|b| format!("{}/{}:{}", b.cluster, b.ip, b.port))
            .collect()
    }

    fn reasons(s: &Selection) -> Vec<String> {
        s.excluded
            .iter()
            .map(|e| format!("{}/{}: {:?}", e.cluster, e.ip, e.reason))
            .collect()
    }

    fn with_affinity(mut s: GlobalService, a: Affinity) -> GlobalService {
        s.affinity = a;
        s
    }

    #[test]
    fn non_global_local_service_takes_only_local_backends() {
        // kube-dns-like: not global locally, while east publishes a global copy.
        let mut local = svc(
            "local",
            vec![
                backend("10.1.0.1", NODE, READY),
                backend("10.1.0.2", "node-b", READY),
            ],
        );
        local.global = false;
        let remote = svc("east", vec![backend("10.2.0.1", "r1", READY)]);
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080", "local/10.1.0.2:8080"]);
        assert_eq!(reasons(&s), ["east/10.2.0.1: LocalService"]);
        assert_eq!(
            Reason::LocalService.to_string(),
            "the local Service is not global: only local backends are used"
        );
        // With no ready local backend it does not fail over: nothing is selected.
        let mut down = local.clone();
        down.backends = vec![backend("10.1.0.1", NODE, NOT_READY)];
        assert!(chosen(&run(&down, &[&remote])).is_empty());
        // internalTrafficPolicy: Local applies as for any Service.
        local.internal_traffic_policy = TrafficPolicy::Local;
        assert_eq!(chosen(&run(&local, &[&remote])), ["local/10.1.0.1:8080"]);
        // A remote copy published as not global is ignored by a global local Service.
        let mut global = local.clone();
        global.global = true;
        global.internal_traffic_policy = TrafficPolicy::Cluster;
        let mut remote_local = remote.clone();
        remote_local.global = false;
        let s = run(&global, &[&remote_local]);
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080", "local/10.1.0.2:8080"]);
        assert_eq!(reasons(&s), ["east/10.2.0.1: NotGlobal"]);
    }

    #[test]
    fn affinity_table() {
        let l_ready = || {
            vec![
                backend("10.1.0.1", NODE, READY),
                backend("10.1.0.2", "node-b", NOT_READY),
            ]
        };
        let l_none = || vec![backend("10.1.0.2", "node-b", NOT_READY)];
        let r_ready = || vec![backend("10.2.0.1", "r1", READY)];
        let r_none = || vec![backend("10.2.0.1", "r1", NOT_READY)];
        struct Row {
            affinity: Affinity,
            local: Vec<Backend>,
            remote: Vec<Backend>,
            want: &'static [&'static str],
            failover: bool,
            tier: Tier,
        }
        use Affinity::*;
        let rows = [
            Row {
                affinity: None,
                local: l_ready(),
                remote: r_ready(),
                want: &["east/10.2.0.1:8080", "local/10.1.0.1:8080"],
                failover: false,
                tier: Tier::Ready,
            },
            Row {
                affinity: None,
                local: l_none(),
                remote: r_ready(),
                want: &["east/10.2.0.1:8080"],
                failover: false,
                tier: Tier::Ready,
            },
            Row {
                affinity: None,
                local: l_ready(),
                remote: r_none(),
                want: &["local/10.1.0.1:8080"],
                failover: false,
                tier: Tier::Ready,
            },
            Row {
                affinity: Local,
                local: l_ready(),
                remote: r_ready(),
                want: &["local/10.1.0.1:8080"],
                failover: false,
                tier: Tier::Ready,
            },
            Row {
                affinity: Local,
                local: l_none(),
                remote: r_ready(),
                want: &["east/10.2.0.1:8080"],
                failover: true,
                tier: Tier::Ready,
            },
            Row {
                affinity: Remote,
                local: l_ready(),
                remote: r_ready(),
                want: &["east/10.2.0.1:8080"],
                failover: false,
                tier: Tier::Ready,
            },
            Row {
                affinity: Remote,
                local: l_ready(),
                remote: r_none(),
                want: &["local/10.1.0.1:8080"],
                failover: true,
                tier: Tier::Ready,
            },
            Row {
                affinity: Remote,
                local: l_none(),
                remote: r_none(),
                want: &[],
                failover: false,
                tier: Tier::None,
            },
            Row {
                affinity: Local,
                local: vec![],
                remote: vec![],
                want: &[],
                failover: false,
                tier: Tier::None,
            },
        ];
        for (i, row) in rows.into_iter().enumerate() {
            let local = with_affinity(svc("local", row.local), row.affinity);
            let remote = svc("east", row.remote);
            let s = run(&local, &[&remote]);
            assert_eq!(chosen(&s), row.want, "row {i}: {:?}", reasons(&s));
            assert_eq!(s.used_failover, row.failover, "row {i}");
            assert_eq!(s.tier, row.tier, "row {i}");
        }
    }

    #[test]
    fn affinity_reasons() {
        let local = with_affinity(
            svc("local", vec![backend("10.1.0.1", NODE, READY)]),
            Affinity::Local,
        );
        let remote = svc("east", vec![backend("10.2.0.1", "r1", READY)]);
        let s = run(&local, &[&remote]);
        assert_eq!(reasons(&s), ["east/10.2.0.1: AffinityLocal"]);
        assert_eq!(s.excluded[0].port, Some(http(80)));

        let local = with_affinity(local, Affinity::Remote);
        let s = run(&local, &[&remote]);
        assert_eq!(reasons(&s), ["local/10.1.0.1: AffinityRemote"]);
    }

    #[test]
    fn serving_terminating_only_when_nothing_is_ready() {
        // A ready backend anywhere: terminating ones are not needed.
        let local = svc(
            "local",
            vec![
                backend("10.1.0.1", NODE, TERMINATING),
                backend("10.1.0.2", NODE, GONE),
            ],
        );
        let remote = svc(
            "east",
            vec![
                backend("10.2.0.1", "r1", READY),
                backend("10.2.0.2", "r1", TERMINATING),
            ],
        );
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["east/10.2.0.1:8080"]);
        assert_eq!(
            reasons(&s),
            [
                "east/10.2.0.2: TerminatingNotNeeded",
                "local/10.1.0.1: TerminatingNotNeeded",
                "local/10.1.0.2: NotServing",
            ]
        );

        // Nothing ready: serving-terminating backends, with the same preference order.
        let remote = svc("east", vec![backend("10.2.0.2", "r1", TERMINATING)]);
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["east/10.2.0.2:8080", "local/10.1.0.1:8080"]);
        assert_eq!(s.tier, Tier::ServingTerminating);

        let local = with_affinity(local, Affinity::Local);
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080"]);
        assert_eq!(
            reasons(&s),
            ["east/10.2.0.2: AffinityLocal", "local/10.1.0.2: NotServing"]
        );

        let local = with_affinity(local, Affinity::Remote);
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["east/10.2.0.2:8080"]);

        // Affinity local, no local candidate at all but a terminating remote one: failover.
        let local = with_affinity(
            svc("local", vec![backend("10.1.0.2", NODE, GONE)]),
            Affinity::Local,
        );
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["east/10.2.0.2:8080"]);
        assert!(s.used_failover);
        assert_eq!(s.tier, Tier::ServingTerminating);
    }

    #[test]
    fn stale_demotion_table() {
        // local: ready L1 / none; east: ready E1 (stale or not); west: ready W1 or
        // terminating W2; "T" = a terminating local backend.
        let l_ready = || vec![backend("10.1.0.1", NODE, READY)];
        let l_term = || vec![backend("10.1.0.3", NODE, TERMINATING)];
        let e_ready = || vec![backend("10.2.0.1", "e1", READY)];
        let w_ready = || vec![backend("10.3.0.1", "w1", READY)];
        let w_term = || vec![backend("10.3.0.2", "w1", TERMINATING)];
        struct Row {
            what: &'static str,
            affinity: Affinity,
            local: Vec<Backend>,
            east: Vec<Backend>,
            west: Vec<Backend>,
            stale: &'static [(&'static str, u64)],
            want: &'static [&'static str],
            tier: Tier,
            stale_used: bool,
            failover: bool,
        }
        use Affinity::*;
        let rows = [
            Row {
                what: "none: a stale cluster's ready backends give way to fresh ones",
                affinity: None,
                local: l_ready(),
                east: e_ready(),
                west: w_ready(),
                stale: &[("east", 12)],
                want: &["local/10.1.0.1:8080", "west/10.3.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: false,
            },
            Row {
                what: "none: nothing fresh and ready, so the stale ones are used",
                affinity: None,
                local: vec![],
                east: e_ready(),
                west: vec![],
                stale: &[("east", 12)],
                want: &["east/10.2.0.1:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "stale ready beats fresh serving-terminating",
                affinity: None,
                local: l_term(),
                east: e_ready(),
                west: w_term(),
                stale: &[("east", 3)],
                want: &["east/10.2.0.1:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "local: no local backend; fresh remote before stale remote",
                affinity: Local,
                local: vec![],
                east: e_ready(),
                west: w_ready(),
                stale: &[("east", 1)],
                want: &["west/10.3.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: true,
            },
            Row {
                what: "local: local ready; stale remote not needed",
                affinity: Local,
                local: l_ready(),
                east: e_ready(),
                west: vec![],
                stale: &[("east", 1)],
                want: &["local/10.1.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: false,
            },
            Row {
                what: "remote: the only remote is stale, a fresh local one wins",
                affinity: Remote,
                local: l_ready(),
                east: e_ready(),
                west: vec![],
                stale: &[("east", 1)],
                want: &["local/10.1.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: true,
            },
            Row {
                what: "remote: nothing fresh and ready, stale remote (the preferred side)",
                affinity: Remote,
                local: l_term(),
                east: e_ready(),
                west: vec![],
                stale: &[("east", 1)],
                want: &["east/10.2.0.1:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "every remote stale: both used when nothing fresh is ready",
                affinity: None,
                local: vec![],
                east: e_ready(),
                west: w_ready(),
                stale: &[("east", 1), ("west", 2)],
                want: &["east/10.2.0.1:8080", "west/10.3.0.1:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "terminating only: fresh terminating before stale terminating",
                affinity: None,
                local: l_term(),
                east: vec![backend("10.2.0.2", "e1", TERMINATING)],
                west: vec![],
                stale: &[("east", 1)],
                want: &["local/10.1.0.3:8080"],
                tier: Tier::ServingTerminating,
                stale_used: false,
                failover: false,
            },
            Row {
                what: "a stale entry for the local cluster is ignored",
                affinity: None,
                local: l_ready(),
                east: e_ready(),
                west: vec![],
                stale: &[("local", 1)],
                want: &["east/10.2.0.1:8080", "local/10.1.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: false,
            },
        ];
        for row in rows {
            let local = with_affinity(svc("local", row.local), row.affinity);
            let (east, west) = (svc("east", row.east), svc("west", row.west));
            let s = run_stale(&local, &[&east, &west], row.stale);
            assert_eq!(chosen(&s), row.want, "{}: {:?}", row.what, reasons(&s));
            assert_eq!(s.tier, row.tier, "{}", row.what);
            assert_eq!(s.stale, row.stale_used, "{}", row.what);
            assert_eq!(s.ports[0].stale, row.stale_used, "{}", row.what);
            assert_eq!(s.used_failover, row.failover, "{}", row.what);
        }
    }

    #[test]
    fn demotion_is_explained_with_the_cluster_and_how_long() {
        let local = svc("local", vec![backend("10.1.0.1", NODE, READY)]);
        let east = svc(
            "east",
            vec![
                backend("10.2.0.1", "e1", READY),
                backend("10.2.0.2", "e1", TERMINATING),
            ],
        );
        let s = run_stale(&local, &[&east], &[("east", 12)]);
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080"]);
        let demoted = s
            .excluded
            .iter()
            .find(|e| e.ip.to_string() == "10.2.0.1")
            .unwrap();
        assert_eq!(
            demoted.reason.to_string(),
            "demoted: cluster east stale for 12s"
        );
        assert_eq!(demoted.port, Some(http(80)));
        // The terminating one is left out for being terminating, as before.
        assert_eq!(
            reasons(&s),
            [
                "east/10.2.0.1: Demoted { cluster: ClusterName(\"east\"), stale_for: 12s }",
                "east/10.2.0.2: TerminatingNotNeeded",
            ]
        );
    }

    #[test]
    fn lost_node_demotion_table() {
        // local: L1 on NODE, L2 on node-b (ready or terminating); east: E1 on e1.
        let b = |ip: &str, node: &str, c| backend(ip, node, c);
        struct Row {
            what: &'static str,
            affinity: Affinity,
            local: Vec<Backend>,
            east: Vec<Backend>,
            stale: &'static [(&'static str, u64)],
            lost: &'static [(&'static str, &'static str, u64)],
            want: &'static [&'static str],
            tier: Tier,
            stale_used: bool,
            failover: bool,
        }
        use Affinity::*;
        let rows = [
            Row {
                what: "a backend on a lost local node gives way to fresh ones",
                affinity: None,
                local: vec![b("10.1.0.1", NODE, READY), b("10.1.0.2", "node-b", READY)],
                east: vec![b("10.2.0.1", "e1", READY)],
                stale: &[],
                lost: &[("local", "node-b", 12)],
                want: &["east/10.2.0.1:8080", "local/10.1.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: false,
            },
            Row {
                what: "a lost node of a remote cluster is demoted too",
                affinity: None,
                local: vec![],
                east: vec![b("10.2.0.1", "e1", READY), b("10.2.0.2", "e2", READY)],
                stale: &[],
                lost: &[("east", "e2", 5)],
                want: &["east/10.2.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: false,
            },
            Row {
                what: "the node name is per cluster: e2 of local is not e2 of east",
                affinity: None,
                local: vec![],
                east: vec![b("10.2.0.1", "e1", READY), b("10.2.0.2", "e2", READY)],
                stale: &[],
                lost: &[("local", "e2", 5)],
                want: &["east/10.2.0.1:8080", "east/10.2.0.2:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: false,
            },
            Row {
                what: "only lost nodes hold ready backends: they are used",
                affinity: None,
                local: vec![b("10.1.0.2", "node-b", READY)],
                east: vec![b("10.2.0.1", "e1", NOT_READY)],
                stale: &[],
                lost: &[("local", "node-b", 12)],
                want: &["local/10.1.0.2:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "ready on a lost node beats fresh serving-terminating",
                affinity: None,
                local: vec![
                    b("10.1.0.1", NODE, TERMINATING),
                    b("10.1.0.2", "node-b", READY),
                ],
                east: vec![],
                stale: &[],
                lost: &[("local", "node-b", 1)],
                want: &["local/10.1.0.2:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "a lost node ranks with a stale cluster: both used when nothing is fresh",
                affinity: None,
                local: vec![b("10.1.0.2", "node-b", READY)],
                east: vec![b("10.2.0.1", "e1", READY)],
                stale: &[("east", 3)],
                lost: &[("local", "node-b", 1)],
                want: &["east/10.2.0.1:8080", "local/10.1.0.2:8080"],
                tier: Tier::Ready,
                stale_used: true,
                failover: false,
            },
            Row {
                what: "affinity local: the local backends are all on a lost node, fresh remote wins",
                affinity: Local,
                local: vec![b("10.1.0.2", "node-b", READY)],
                east: vec![b("10.2.0.1", "e1", READY)],
                stale: &[],
                lost: &[("local", "node-b", 1)],
                want: &["east/10.2.0.1:8080"],
                tier: Tier::Ready,
                stale_used: false,
                failover: true,
            },
        ];
        for row in rows {
            let local = with_affinity(svc("local", row.local), row.affinity);
            let east = svc("east", row.east);
            let s = run_lost(&local, &[&east], row.stale, row.lost);
            assert_eq!(chosen(&s), row.want, "{}: {:?}", row.what, reasons(&s));
            assert_eq!(s.tier, row.tier, "{}", row.what);
            assert_eq!(s.stale, row.stale_used, "{}", row.what);
            assert_eq!(s.used_failover, row.failover, "{}", row.what);
        }
    }

    #[test]
    fn a_lost_node_is_explained_with_the_node_and_how_long() {
        let local = svc(
            "local",
            vec![
                backend("10.1.0.1", NODE, READY),
                backend("10.1.0.2", "node-b", READY),
            ],
        );
        let east = svc("east", vec![backend("10.2.0.1", "e1", READY)]);
        // A node of a stale cluster is named as the cluster (the coarser cause).
        let s = run_lost(
            &local,
            &[&east],
            &[("east", 40)],
            &[("local", "node-b", 12), ("east", "e1", 30)],
        );
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080"]);
        let text: Vec<String> = s
            .excluded
            .iter()
            .map(|e| format!("{}/{}: {}", e.cluster, e.ip, e.reason))
            .collect();
        assert_eq!(
            text,
            [
                "east/10.2.0.1: demoted: cluster east stale for 40s",
                "local/10.1.0.2: demoted: node node-b not reporting for 12s",
            ]
        );
    }

    #[test]
    fn ready_beats_preference() {
        // Affinity local with only a terminating local backend and a ready remote: ready
        // wins, the terminating local one is left out.
        let local = with_affinity(
            svc("local", vec![backend("10.1.0.1", NODE, TERMINATING)]),
            Affinity::Local,
        );
        let remote = svc("east", vec![backend("10.2.0.1", "r1", READY)]);
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["east/10.2.0.1:8080"]);
        assert!(s.used_failover);
        assert_eq!(reasons(&s), ["local/10.1.0.1: TerminatingNotNeeded"]);
    }

    #[test]
    fn nothing_left_means_no_backend() {
        let local = svc(
            "local",
            vec![
                backend("10.1.0.1", NODE, NOT_READY),
                backend("10.1.0.2", NODE, GONE),
            ],
        );
        let s = run(&local, &[]);
        assert!(chosen(&s).is_empty());
        assert_eq!(s.tier, Tier::None);
        assert_eq!(
            reasons(&s),
            ["local/10.1.0.1: NotReady", "local/10.1.0.2: NotServing"]
        );
        // The frontend is still there, so the datapath refuses connections.
        assert_eq!(s.frontends, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn internal_traffic_policy_local() {
        for affinity in [Affinity::None, Affinity::Local, Affinity::Remote] {
            let mut local = svc(
                "local",
                vec![
                    backend("10.1.0.1", NODE, READY),
                    backend("10.1.0.2", "node-b", READY),
                    backend("10.1.0.3", NODE, TERMINATING),
                ],
            );
            local.affinity = affinity;
            local.internal_traffic_policy = TrafficPolicy::Local;
            let remote = svc("east", vec![backend("10.2.0.1", NODE, READY)]);
            let s = run(&local, &[&remote]);
            assert_eq!(chosen(&s), ["local/10.1.0.1:8080"], "{affinity}");
            assert!(!s.used_failover);
            assert_eq!(
                reasons(&s),
                [
                    "east/10.2.0.1: InternalTrafficPolicyLocalRemote",
                    "local/10.1.0.2: InternalTrafficPolicyLocal { backend_node: \"node-b\" }",
                    "local/10.1.0.3: TerminatingNotNeeded",
                ]
            );
        }
        // No ready backend on this node: the terminating one on this node, never another
        // node's or a remote one.
        let mut local = svc(
            "local",
            vec![
                backend("10.1.0.2", "node-b", READY),
                backend("10.1.0.3", NODE, TERMINATING),
            ],
        );
        local.internal_traffic_policy = TrafficPolicy::Local;
        let remote = svc("east", vec![backend("10.2.0.1", NODE, READY)]);
        let s = run(&local, &[&remote]);
        assert_eq!(chosen(&s), ["local/10.1.0.3:8080"]);
        // Nothing on this node: no backend at all.
        local.backends.pop();
        let s = run(&local, &[&remote]);
        assert!(chosen(&s).is_empty());
        assert_eq!(s.tier, Tier::None);
    }

    #[test]
    fn not_shared_remote_contributes_nothing() {
        let local = svc("local", vec![]);
        let mut remote = svc("east", vec![backend("10.2.0.1", "r1", READY)]);
        remote.shared = false;
        let other = svc("west", vec![backend("10.3.0.1", "w1", READY)]);
        let s = run(&local, &[&remote, &other]);
        assert_eq!(chosen(&s), ["west/10.3.0.1:8080"]);
        assert_eq!(reasons(&s), ["east/10.2.0.1: NotShared"]);
        assert_eq!(s.excluded[0].port, None);
    }

    #[test]
    fn local_shared_flag_does_not_affect_local_agents() {
        let mut local = svc("local", vec![backend("10.1.0.1", NODE, READY)]);
        local.shared = false;
        let s = run(&local, &[]);
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080"]);
    }

    #[test]
    fn ports_match_by_protocol_and_name_and_use_own_target_port() {
        let mut local = svc("local", vec![backend("10.1.0.1", NODE, READY)]);
        local.ports = vec![http(80), port("dns", Protocol::Udp, 53)];
        local.backends[0]
            .ports
            .push(port("dns", Protocol::Udp, 5353));
        let mut remote = svc(
            "east",
            vec![
                backend("10.2.0.1", "r1", READY),
                backend("10.2.0.2", "r1", READY),
            ],
        );
        // Same name, other protocol: no match. Its own target port 9090 for http.
        remote.backends[0].ports = vec![
            port("http", Protocol::Tcp, 9090),
            port("dns", Protocol::Tcp, 53),
        ];
        // Other name: no match.
        remote.backends[1].ports = vec![port("web", Protocol::Tcp, 8080)];
        let s = run(&local, &[&remote]);
        assert_eq!(s.ports.len(), 2);
        // Ports sorted by name.
        assert_eq!(s.ports[0].frontend, port("dns", Protocol::Udp, 53));
        assert_eq!(s.ports[1].frontend, http(80));
        let b = |i: usize| -> Vec<(String, u16)> {
            s.ports[i]
                .backends
                .iter()
                .map(|b| (b.ip.to_string(), b.port))
                .collect()
        };
        assert_eq!(b(0), [("10.1.0.1".to_string(), 5353)]);
        // Sorted by cluster, then IP.
        assert_eq!(
            b(1),
            [
                ("10.2.0.1".to_string(), 9090),
                ("10.1.0.1".to_string(), 8080)
            ]
        );
        let want_dns = port("dns", Protocol::Udp, 53);
        assert_eq!(
            s.excluded,
            [
                Excluded {
                    cluster: name("east"),
                    ip: "10.2.0.1".parse().unwrap(),
                    port: Some(want_dns.clone()),
                    reason: Reason::PortMismatch {
                        wanted: want_dns.clone()
                    },
                },
                Excluded {
                    cluster: name("east"),
                    ip: "10.2.0.2".parse().unwrap(),
                    port: Some(want_dns.clone()),
                    reason: Reason::PortMismatch { wanted: want_dns },
                },
                Excluded {
                    cluster: name("east"),
                    ip: "10.2.0.2".parse().unwrap(),
                    port: Some(http(80)),
                    reason: Reason::PortMismatch { wanted: http(80) },
                },
            ]
        );
    }

    #[test]
    fn frontends_only_from_the_local_service() {
        let mut local = svc("local", vec![]);
        local.frontends = vec![
            "10.96.0.11".parse().unwrap(),
            "10.96.0.10".parse().unwrap(),
            "10.96.0.11".parse().unwrap(),
        ];
        let mut remote = svc("east", vec![backend("10.2.0.1", "r1", READY)]);
        remote.frontends = vec!["10.100.0.1".parse().unwrap()];
        let s = run(&local, &[&remote]);
        let f: Vec<String> = s.frontends.iter().map(ToString::to_string).collect();
        assert_eq!(f, ["10.96.0.10", "10.96.0.11"]);
    }

    #[test]
    fn duplicate_clusters_are_not_trusted() {
        let local = svc("local", vec![backend("10.1.0.1", NODE, READY)]);
        let imposter = svc("local", vec![backend("10.9.0.1", "x", READY)]);
        let a = svc("east", vec![backend("10.2.0.1", "r1", READY)]);
        let b = svc("east", vec![backend("10.2.0.2", "r1", READY)]);
        let s = run(&local, &[&imposter, &a, &b]);
        assert_eq!(chosen(&s), ["local/10.1.0.1:8080"]);
        assert_eq!(
            reasons(&s),
            [
                "east/10.2.0.1: DuplicateCluster",
                "east/10.2.0.2: DuplicateCluster",
                "local/10.9.0.1: DuplicateCluster",
            ]
        );
    }

    #[test]
    fn duplicate_ips_within_a_service_are_merged() {
        let mut local = svc(
            "local",
            vec![
                backend("10.1.0.1", NODE, GONE),
                backend("10.1.0.1", NODE, READY),
            ],
        );
        local.backends[1].ports = vec![port("dns", Protocol::Udp, 53)];
        local.ports.push(port("dns", Protocol::Udp, 53));
        let s = run(&local, &[]);
        assert!(s.excluded.is_empty(), "{:?}", reasons(&s));
        assert!(s.ports.iter().all(|p| p.backends.len() == 1), "{s:?}");
    }

    #[test]
    fn reasons_display() {
        let cases = [
            (
                Reason::NotShared,
                "its cluster does not share the service (shared: false)",
            ),
            (
                Reason::DuplicateCluster,
                "its cluster is given more than once (or as both local and remote); ignored",
            ),
            (
                Reason::PortMismatch { wanted: http(80) },
                "no port named \"http\" with protocol TCP (frontend port 80)",
            ),
            (
                Reason::InternalTrafficPolicyLocal {
                    backend_node: "n2".into(),
                },
                "internalTrafficPolicy Local: on node \"n2\", not on this node",
            ),
            (
                Reason::InternalTrafficPolicyLocalRemote,
                "internalTrafficPolicy Local: remote backends are never used",
            ),
            (Reason::NotReady, "not ready"),
            (Reason::NotServing, "terminating and not serving"),
            (
                Reason::TerminatingNotNeeded,
                "terminating: used only when no backend is ready",
            ),
            (
                Reason::AffinityLocal,
                "affinity local: local backends are available",
            ),
            (
                Reason::AffinityRemote,
                "affinity remote: remote backends are available",
            ),
            (
                Reason::Demoted {
                    cluster: name("east"),
                    stale_for: Duration::from_millis(12_900),
                },
                "demoted: cluster east stale for 12s",
            ),
            (
                Reason::NodeNotReporting {
                    node: "n2".into(),
                    stale_for: Duration::from_millis(12_900),
                },
                "demoted: node n2 not reporting for 12s",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(r.to_string(), want);
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const PORT_NAMES: [(&str, Protocol); 3] = [
            ("http", Protocol::Tcp),
            ("dns", Protocol::Udp),
            ("dns", Protocol::Tcp),
        ];
        const NODES: [&str; 3] = [NODE, "node-b", "node-c"];

        fn conditions() -> impl Strategy<Value = BackendConditions> {
            (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(ready, serving, terminating)| BackendConditions {
                    ready,
                    serving,
                    terminating,
                },
            )
        }

        fn ports() -> impl Strategy<Value = Vec<ServicePort>> {
            proptest::sample::subsequence(PORT_NAMES.to_vec(), 0..=3).prop_flat_map(|names| {
                names
                    .into_iter()
                    .map(|(n, p)| (1000u16..1010).prop_map(move |port| super::port(n, p, port)))
                    .collect::<Vec<_>>()
            })
        }

        /// Backends of cluster number `i`, IPs from a small pool (so duplicates happen).
        fn backends(i: u8) -> impl Strategy<Value = Vec<Backend>> {
            proptest::collection::vec(
                (
                    0u8..6,
                    proptest::sample::select(NODES.to_vec()),
                    conditions(),
                    ports(),
                ),
                0..6,
            )
            .prop_map(move |v| {
                v.into_iter()
                    .map(|(host, node, conditions, ports)| Backend {
                        ip: IpAddr::from([10, i, 0, host]),
                        ports,
                        node: node.into(),
                        zone: String::new(),
                        conditions,
                    })
                    .collect()
            })
        }

        fn service(i: u8) -> impl Strategy<Value = GlobalService> {
            let cluster = if i == 0 {
                "local".to_string()
            } else {
                format!("c{i}")
            };
            (
                any::<bool>(),
                proptest::sample::select(vec![Affinity::None, Affinity::Local, Affinity::Remote]),
                proptest::sample::select(vec![TrafficPolicy::Cluster, TrafficPolicy::Local]),
                ports(),
                backends(i),
            )
                .prop_map(move |(shared, affinity, policy, ports, backends)| {
                    GlobalService {
                        cluster: name(&cluster),
                        namespace: "ns".into(),
                        name: "web".into(),
                        global: true,
                        shared,
                        affinity,
                        internal_traffic_policy: policy,
                        ports,
                        frontends: vec!["10.96.0.10".parse().unwrap()],
                        backends,
                    }
                })
        }

        /// The local service and up to four remote ones (distinct clusters), plus the remotes
        /// in another order.
        fn inputs() -> impl Strategy<Value = (GlobalService, Vec<GlobalService>, Vec<GlobalService>)>
        {
            (
                service(0),
                service(1),
                service(2),
                service(3),
                service(4),
                0usize..=4,
            )
                .prop_flat_map(|(local, a, b, c, d, n)| {
                    let mut remotes = vec![a, b, c, d];
                    remotes.truncate(n);
                    let shuffled = Just(remotes.clone()).prop_shuffle();
                    (Just(local), Just(remotes), shuffled)
                })
        }

        fn sel(local: &GlobalService, remotes: &[GlobalService]) -> Selection {
            let refs: Vec<&GlobalService> = remotes.iter().collect();
            run(local, &refs)
        }

        /// [`sel`] with the remotes whose bit is set in `stale_mask` stale, and the nodes
        /// whose bit is set in `lost_mask` not reporting ([`lost_bit`]).
        fn sel_stale(
            local: &GlobalService,
            remotes: &[GlobalService],
            stale_mask: u8,
            lost_mask: u16,
        ) -> Selection {
            let refs: Vec<&GlobalService> = remotes.iter().collect();
            let stale: Stale<'_> = remotes
                .iter()
                .enumerate()
                .filter(|(i, _)| stale_mask & (1 << i) != 0)
                .map(|(i, r)| (&r.cluster, Duration::from_secs(i as u64)))
                .collect();
            let stale_nodes: StaleNodes<'_> = std::iter::once(local)
                .chain(remotes)
                .enumerate()
                .flat_map(|(c, svc)| {
                    NODES
                        .iter()
                        .enumerate()
                        .filter(move |(n, _)| lost_mask & lost_bit(c, *n) != 0)
                        .map(move |(n, node)| {
                            ((&svc.cluster, *node), Duration::from_secs(n as u64))
                        })
                })
                .collect();
            select(&SelectInput {
                local_cluster: &local.cluster,
                node: NODE,
                local,
                remotes: &refs,
                stale: &stale,
                stale_nodes: &stale_nodes,
            })
        }

        /// The bit of node `NODES[node]` of cluster `cluster` (0 the local one, i + 1 the
        /// remote `i`) in a lost-node mask.
        fn lost_bit(cluster: usize, node: usize) -> u16 {
            1 << (cluster * NODES.len() + node)
        }

        fn is_stale(remotes: &[GlobalService], stale_mask: u8, cluster: &ClusterName) -> bool {
            remotes
                .iter()
                .position(|r| r.cluster == *cluster)
                .is_some_and(|i| stale_mask & (1 << i) != 0)
        }

        /// Whether the node `node` of `cluster` is not reporting.
        fn is_lost(
            local: &GlobalService,
            remotes: &[GlobalService],
            lost_mask: u16,
            cluster: &ClusterName,
            node: &str,
        ) -> bool {
            let Some(c) = std::iter::once(local)
                .chain(remotes)
                .position(|s| s.cluster == *cluster)
            else {
                return false;
            };
            NODES
                .iter()
                .position(|n| *n == node)
                .is_some_and(|n| lost_mask & lost_bit(c, n) != 0)
        }

        fn has_port(b: &Backend, fp: &ServicePort) -> bool {
            b.ports
                .iter()
                .any(|p| p.name == fp.name && p.protocol == fp.protocol)
        }

        proptest! {
            #[test]
            fn failover_never_empties_while_a_backend_is_ready(
                (mut local, remotes, _) in inputs()
            ) {
                local.internal_traffic_policy = TrafficPolicy::Cluster;
                let s = sel(&local, &remotes);
                for p in &s.ports {
                    let fp = &p.frontend;
                    let ready_somewhere = local
                        .backends
                        .iter()
                        .chain(remotes.iter().filter(|r| r.shared).flat_map(|r| &r.backends))
                        .any(|b| b.conditions.ready && has_port(b, fp));
                    if ready_somewhere {
                        prop_assert!(!p.backends.is_empty(), "port {fp:?}: {s:?}");
                        prop_assert_eq!(p.tier, Tier::Ready);
                    }
                }
            }

            /// Stale clusters and lost nodes alike: while a fresh ready backend (of a fresh
            /// cluster, on a reporting node) serves a port, no stale one is selected.
            #[test]
            fn a_fresh_ready_backend_is_always_preferred_to_a_stale_one(
                (mut local, remotes, _) in inputs(),
                stale_mask in 0u8..16,
                lost_mask in 0u16..(1 << 15),
            ) {
                local.internal_traffic_policy = TrafficPolicy::Cluster;
                let s = sel_stale(&local, &remotes, stale_mask, lost_mask);
                let stale_backend = |cluster: &ClusterName, node: &str| {
                    is_stale(&remotes, stale_mask, cluster)
                        || is_lost(&local, &remotes, lost_mask, cluster, node)
                };
                for p in &s.ports {
                    let fp = &p.frontend;
                    // Over the merged backends (one per address), as selection sees them.
                    let fresh_ready = std::iter::once(&local)
                        .chain(remotes.iter().filter(|r| r.shared))
                        .any(|svc| {
                            merge_addresses(svc.backends.iter().map(Cow::Borrowed))
                                .iter()
                                .any(|b| {
                                    b.conditions.ready
                                        && has_port(b, fp)
                                        && !stale_backend(&svc.cluster, &b.node)
                                })
                        });
                    if fresh_ready {
                        prop_assert!(!p.stale, "port {fp:?}: {s:?}");
                        for b in &p.backends {
                            prop_assert!(
                                !stale_backend(&b.cluster, &b.node),
                                "port {fp:?} selected {b:?}, a stale one: {s:?}"
                            );
                        }
                    }
                    for b in &p.backends {
                        prop_assert_eq!(
                            p.stale,
                            stale_backend(&b.cluster, &b.node),
                            "port {:?}: {:?}", fp, s
                        );
                    }
                }
            }

            #[test]
            fn no_empty_set_while_any_backend_is_usable(
                (local, remotes, _) in inputs(),
                stale_mask in 0u8..16,
                lost_mask in 0u16..(1 << 15),
            ) {
                let s = sel_stale(&local, &remotes, stale_mask, lost_mask);
                let plain = sel(&local, &remotes);
                for (p, q) in s.ports.iter().zip(&plain.ports) {
                    // Demotion reorders, never removes: the port has backends exactly when it
                    // has without staleness, and in the same condition tier.
                    prop_assert_eq!(p.backends.is_empty(), q.backends.is_empty(), "{:?}", s);
                    prop_assert_eq!(p.tier, q.tier);
                }
                for e in &s.excluded {
                    if let Reason::Demoted { cluster, .. } = &e.reason {
                        prop_assert!(is_stale(&remotes, stale_mask, cluster));
                        prop_assert!(*cluster != local.cluster);
                    }
                    if let Reason::NodeNotReporting { node, .. } = &e.reason {
                        prop_assert!(is_lost(&local, &remotes, lost_mask, &e.cluster, node));
                        prop_assert!(!is_stale(&remotes, stale_mask, &e.cluster));
                    }
                }
            }

            #[test]
            fn every_backend_is_selected_or_excluded_once_with_staleness(
                (local, remotes, _) in inputs(),
                stale_mask in 0u8..16,
                lost_mask in 0u16..(1 << 15),
            ) {
                let s = sel_stale(&local, &remotes, stale_mask, lost_mask);
                for p in &s.ports {
                    for svc in std::iter::once(&local).chain(&remotes) {
                        for b in &svc.backends {
                            let selected = p.backends.iter().filter(|x| x.cluster == svc.cluster && x.ip == b.ip).count();
                            let excluded = s
                                .excluded
                                .iter()
                                .filter(|e| e.cluster == svc.cluster && e.ip == b.ip)
                                .filter(|e| e.port.is_none() || e.port.as_ref() == Some(&p.frontend))
                                .count();
                            prop_assert_eq!(selected + excluded, 1, "{}/{}: {:?}", svc.cluster, b.ip, s);
                        }
                    }
                }
            }

            #[test]
            fn policy_local_stays_on_the_node((mut local, remotes, _) in inputs()) {
                local.internal_traffic_policy = TrafficPolicy::Local;
                let s = sel(&local, &remotes);
                for b in s.ports.iter().flat_map(|p| &p.backends) {
                    prop_assert!(b.local && b.cluster == name("local") && b.node == NODE, "{b:?}");
                }
                prop_assert!(!s.used_failover);
            }

            #[test]
            fn every_backend_is_selected_or_excluded_once((local, remotes, _) in inputs()) {
                let s = sel(&local, &remotes);
                let all: BTreeSet<(ClusterName, IpAddr)> = std::iter::once(&local)
                    .chain(&remotes)
                    .flat_map(|svc| svc.backends.iter().map(|b| (svc.cluster.clone(), b.ip)))
                    .collect();
                let frontend_ports: BTreeSet<&ServicePort> = local.ports.iter().collect();
                prop_assert_eq!(s.ports.len(), frontend_ports.len());
                for p in &s.ports {
                    for (cluster, ip) in &all {
                        let selected = p.backends.iter().filter(|b| b.cluster == *cluster && b.ip == *ip).count();
                        let excluded = s
                            .excluded
                            .iter()
                            .filter(|e| e.cluster == *cluster && e.ip == *ip)
                            .filter(|e| e.port.is_none() || e.port.as_ref() == Some(&p.frontend))
                            .count();
                        prop_assert_eq!(selected + excluded, 1, "{}/{} port {:?}: {:?}", cluster, ip, p.frontend, s);
                    }
                }
                // Nothing made up: every excluded entry is a backend of the inputs.
                for e in &s.excluded {
                    prop_assert!(all.contains(&(e.cluster.clone(), e.ip)));
                }
            }

            #[test]
            fn order_of_remotes_does_not_matter((local, remotes, shuffled) in inputs()) {
                prop_assert_eq!(sel(&local, &remotes), sel(&local, &shuffled));
            }

            /// A local Service that is not global selects exactly what it selects with no
            /// remote at all: only local backends, whatever the remotes publish, with every
            /// remote backend excluded as `LocalService`.
            #[test]
            fn a_non_global_service_uses_only_local_backends(
                (mut local, remotes, _) in inputs(),
                stale_mask in 0u8..16,
            ) {
                local.global = false;
                local.affinity = Affinity::None;
                let s = sel_stale(&local, &remotes, stale_mask, 0);
                let alone = sel(&local, &[]);
                prop_assert_eq!(&s.ports, &alone.ports);
                prop_assert!(!s.stale && !s.used_failover);
                for e in &s.excluded {
                    if e.cluster != local.cluster {
                        prop_assert_eq!(&e.reason, &Reason::LocalService, "{:?}", e);
                    }
                }
            }

            /// A remote copy that is not global (from a peer that did not filter it)
            /// contributes nothing, as a non-shared one.
            #[test]
            fn a_remote_non_global_copy_contributes_nothing(
                (local, mut remotes, _) in inputs(),
            ) {
                prop_assume!(local.global);
                let before = sel(&local, &remotes);
                let Some(first) = remotes.first_mut() else { return Ok(()) };
                first.global = false;
                let gone = first.cluster.clone();
                let s = sel(&local, &remotes);
                for p in &s.ports {
                    prop_assert!(p.backends.iter().all(|b| b.cluster != gone), "{:?}", s);
                }
                // The others are not affected unless `gone` was selected before.
                let used = before.ports.iter().flat_map(|p| &p.backends).any(|b| b.cluster == gone);
                if !used {
                    prop_assert_eq!(&s.ports, &before.ports);
                }
            }
        }
    }
}
