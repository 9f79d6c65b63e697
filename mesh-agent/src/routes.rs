//! Native routing (DESIGN.md section 9): a route to each pod CIDR of every remote node via
//! that node's IP, in the agent's network namespace.
//!
//! The agent owns exactly the routes of its routing protocol number ([`ROUTE_PROTO`]) in the
//! main table, and never touches another route. Like the maps, routes are reconciled by
//! difference: on start the agent reads the routes it installed before (they keep routing
//! while it is down) and changes them only once the desired state is known.
//!
//! Routes are programmed over rtnetlink (the `rtnetlink` crate) on a socket opened in the
//! agent's network namespace; each error names the route and the kernel's answer.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use mesh_core::ClusterName;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use tracing::{debug, info, warn};

use crate::desired::ClusterState;

/// The routing protocol number marking the agent's routes (`ip route ... proto 77`).
pub const ROUTE_PROTO: u8 = 77;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("listing the routes: {0}")]
    List(#[source] rtnetlink::Error),
    #[error("installing route {dst} via {via}: {source}")]
    Install {
        dst: IpNet,
        via: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("withdrawing route {dst}: {source}")]
    Withdraw {
        dst: IpNet,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("route {dst} via {via}: the next hop is of another address family")]
    Family { dst: IpNet, via: IpAddr },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Routes by destination: pod CIDR -> next hop (the node IP).
pub type Routes = BTreeMap<IpNet, IpAddr>;

/// The routes node `node` of `local_cluster` needs: every pod CIDR of every other node (of
/// any cluster), via that node's first internal IP of the CIDR's family. A CIDR claimed by
/// two nodes keeps the first (local cluster first, then by cluster and node name).
pub fn desired_routes<S: std::borrow::Borrow<ClusterState>>(
    clusters: &BTreeMap<ClusterName, S>,
    local_cluster: &ClusterName,
    node: &str,
) -> Routes {
    let mut routes = Routes::new();
    let order = clusters
        .get_key_value(local_cluster)
        .into_iter()
        .chain(clusters.iter().filter(|(n, _)| *n != local_cluster));
    for (cluster, state) in order {
        for n in state.borrow().nodes.values() {
            if cluster == local_cluster && n.name == node {
                continue;
            }
            for cidr in &n.pod_cidrs {
                let via = n
                    .internal_ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == matches!(cidr, IpNet::V4(_)));
                let Some(&via) = via else {
                    debug!(%cluster, node = %n.name, %cidr, "no node IP of the CIDR's family");
                    continue;
                };
                if let Some(prev) = routes.get(cidr) {
                    warn!(%cluster, node = %n.name, %cidr, kept = %prev,
                        "pod CIDR claimed by two nodes; keeping the first");
                    continue;
                }
                routes.insert(*cidr, via);
            }
        }
    }
    routes
}

/// The agent's routes in the network namespace it was created in.
#[derive(Debug)]
pub struct RouteTable {
    handle: rtnetlink::Handle,
    /// What the kernel holds (as last read or written).
    current: Option<Routes>,
}

/// Result of a route reconcile.
#[derive(Debug, Default)]
pub struct RouteChanges {
    pub added: usize,
    pub removed: usize,
    /// Routes that could not be installed or removed (the others were applied).
    pub errors: Vec<Error>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Opens a netlink socket in the current network namespace. Must be called within a
    /// tokio runtime (the socket is driven by a spawned task).
    pub fn new() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            current: None,
        })
    }

    /// The routes of [`ROUTE_PROTO`] in the main table, read from the kernel.
    pub async fn read(&self) -> Result<Routes> {
        let mut routes = Routes::new();
        let requests = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for request in requests {
            let mut stream = self.handle.route().get(request).execute();
            while let Some(route) = stream.try_next().await.map_err(Error::List)? {
                if let Some((dst, via)) = owned_route(&route) {
                    routes.insert(dst, via);
                }
            }
        }
        Ok(routes)
    }

    /// The routes as last read or written.
    pub fn current(&self) -> Option<&Routes> {
        self.current.as_ref()
    }

    /// Forgets what the kernel holds: the next reconcile reads it again.
    pub fn invalidate(&mut self) {
        self.current = None;
    }

    /// Brings the agent's routes to `desired`. Each route is applied on its own: one that
    /// fails (e.g. a next hop that is not on a connected network) is reported and retried on
    /// the next call, the others are applied.
    pub async fn reconcile(&mut self, desired: &Routes) -> Result<RouteChanges> {
        let mut current = match self.current.take() {
            Some(c) => c,
            None => self.read().await?,
        };
        let mut changes = RouteChanges::default();
        for (&dst, &via) in desired {
            if current.get(&dst) == Some(&via) {
                continue;
            }
            match self.install(dst, via).await {
                Ok(()) => {
                    info!(%dst, %via, "route installed");
                    current.insert(dst, via);
                    changes.added += 1;
                }
                Err(e) => {
                    warn!(error = %e, "route not installed");
                    changes.errors.push(e);
                }
            }
        }
        let stale: Vec<IpNet> = current
            .keys()
            .filter(|d| !desired.contains_key(d))
            .copied()
            .collect();
        for dst in stale {
            match self.withdraw(dst).await {
                Ok(()) => {
                    info!(%dst, "route withdrawn");
                    current.remove(&dst);
                    changes.removed += 1;
                }
                Err(e) => {
                    warn!(error = %e, "route not withdrawn");
                    changes.errors.push(e);
                }
            }
        }
        // After a failure, read the kernel again next time rather than trust the mirror.
        if changes.errors.is_empty() {
            self.current = Some(current);
        }
        Ok(changes)
    }

    async fn install(&self, dst: IpNet, via: IpAddr) -> Result<()> {
        let message = match (dst, via) {
            (IpNet::V4(d), IpAddr::V4(v)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(v)
                .protocol(RouteProtocol::from(ROUTE_PROTO))
                .build(),
            (IpNet::V6(d), IpAddr::V6(v)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(v)
                .protocol(RouteProtocol::from(ROUTE_PROTO))
                .build(),
            _ => return Err(Error::Family { dst, via }),
        };
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|source| Error::Install { dst, via, source })
    }

    async fn withdraw(&self, dst: IpNet) -> Result<()> {
        // The kernel deletes only a route of our protocol: never another one to `dst`.
        let message = match dst {
            IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .protocol(RouteProtocol::from(ROUTE_PROTO))
                .build(),
            IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .protocol(RouteProtocol::from(ROUTE_PROTO))
                .build(),
        };
        self.handle
            .route()
            .del(message)
            .execute()
            .await
            .map_err(|source| Error::Withdraw { dst, source })
    }
}

/// `(destination, gateway)` of a route the agent owns: main table, [`ROUTE_PROTO`].
fn owned_route(route: &RouteMessage) -> Option<(IpNet, IpAddr)> {
    let h = &route.header;
    if h.protocol != RouteProtocol::from(ROUTE_PROTO) || h.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    };
    let mut dst = None;
    let mut via = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = addr(a),
            RouteAttribute::Gateway(a) => via = addr(a),
            _ => {}
        }
    }
    let dst = IpNet::new(dst?, h.destination_prefix_length).ok()?;
    Some((dst, via?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::Node;

    fn node(cluster: &str, name: &str, ips: &[&str], cidrs: &[&str]) -> Node {
        Node {
            cluster: cluster.parse().unwrap(),
            name: name.into(),
            internal_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            stale_since: None,
        }
    }

    #[test]
    fn every_other_node_of_every_cluster_gets_routes_by_family() {
        let mut clusters = BTreeMap::new();
        let mut east = ClusterState::default();
        for n in [
            node("east", "n1", &["192.168.0.1"], &["10.1.1.0/24"]),
            node(
                "east",
                "n2",
                &["192.168.0.2", "fd00::2"],
                &["10.1.2.0/24", "fd01:2::/64"],
            ),
        ] {
            east.nodes.insert(n.name.clone(), n);
        }
        let mut west = ClusterState::default();
        for n in [
            node(
                "west",
                "w1",
                &["192.168.1.1"],
                &["10.2.1.0/24", "fd02:1::/64"],
            ),
            // Claims a CIDR of the local cluster: the local node keeps it.
            node("west", "w2", &["192.168.1.2"], &["10.1.2.0/24"]),
        ] {
            west.nodes.insert(n.name.clone(), n);
        }
        clusters.insert("east".parse().unwrap(), east);
        clusters.insert("west".parse().unwrap(), west);
        let routes = desired_routes(&clusters, &"east".parse().unwrap(), "n1");
        let want: Routes = [
            ("10.1.2.0/24", "192.168.0.2"),
            ("fd01:2::/64", "fd00::2"),
            ("10.2.1.0/24", "192.168.1.1"),
        ]
        .into_iter()
        .map(|(d, v)| (d.parse().unwrap(), v.parse().unwrap()))
        .collect();
        // fd02:1::/64 has no IPv6 node IP: no route.
        assert_eq!(routes, want);
    }
}
