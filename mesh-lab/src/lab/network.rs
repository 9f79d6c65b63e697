//! The lab's network: the underlay bridge, the control-plane and node namespaces, the routes
//! between nodes of a cluster (the lab plays the CNI), each pod's veth, and partitions.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::sys::{self, Result, ip, ip_batch, netns_add};
use super::topology::{LabSpec, POD_GATEWAY, underlay_veth};

/// Priority of the partition rules (`ip rule ... blackhole`).
pub const PARTITION_PRIORITY: u32 = 90;

/// Every route of the host that overlaps `net`, as `ip route` prints it.
pub fn host_routes_overlapping(net: Ipv4Net) -> Result<Vec<String>> {
    let out = ip(None, &["-4", "route", "show", "table", "all"])?;
    Ok(out
        .lines()
        .filter(|l| {
            let dst = l.split_whitespace().next().unwrap_or("");
            let dst = match dst {
                "default" => return false,
                "broadcast" | "local" | "unreachable" | "blackhole" | "prohibit" | "multicast"
                | "throw" => l.split_whitespace().nth(1).unwrap_or(""),
                d => d,
            };
            let parsed: Option<Ipv4Net> = dst
                .parse()
                .ok()
                .or_else(|| dst.parse::<Ipv4Addr>().ok().map(Ipv4Net::from));
            parsed.is_some_and(|d| d.contains(&net.network()) || net.contains(&d.network()))
        })
        .map(|l| l.trim().to_owned())
        .collect())
}

/// The bridge in the root netns with the underlay gateway and the host-services IPs.
pub fn create_bridge(spec: &LabSpec) -> Result<()> {
    let br = spec.bridge();
    let mut lines = vec![
        format!("link add {br} type bridge"),
        format!(
            "addr add {}/{} dev {br}",
            spec.bridge_ip(),
            spec.underlay.prefix_len()
        ),
    ];
    for c in &spec.clusters {
        lines.push(format!("addr add {}/32 dev {br}", c.host_ip));
    }
    lines.push(format!("link set {br} up"));
    ip_batch(None, &lines)
}

/// A namespace on the underlay: netns, veth to the bridge (`eth0` inside), address, sysctls.
pub fn create_underlay_netns(spec: &LabSpec, netns: &str, addr: Ipv4Addr) -> Result<()> {
    netns_add(netns)?;
    let host = underlay_veth(netns);
    let br = spec.bridge();
    ip_batch(
        None,
        &[
            format!("link add {host} type veth peer name eth0 netns {netns}"),
            format!("link set {host} master {br} up"),
        ],
    )?;
    ip_batch(
        Some(netns),
        &[
            format!("addr add {addr}/{} dev eth0", spec.underlay.prefix_len()),
            "link set eth0 up".to_string(),
        ],
    )?;
    sys::sysctls(
        netns,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ],
    )
}

/// Routes from every node of each cluster to the other nodes' pod CIDRs of that cluster.
pub fn add_intra_cluster_routes(spec: &LabSpec) -> Result<()> {
    for c in &spec.clusters {
        for n in &c.nodes {
            let lines: Vec<String> = c
                .nodes
                .iter()
                .filter(|o| o.name != n.name)
                .map(|o| format!("route replace {} via {} dev eth0", o.pod_cidr, o.ip))
                .collect();
            ip_batch(Some(&spec.node_netns(&n.name)), &lines)?;
        }
    }
    Ok(())
}

/// The node's own nftables table (`ip mesh_lab_node`, next to kube-proxy's
/// `ip mesh_lab_proxy`):
/// - hairpin: a local pod reaching a Service DNATed to a local pod (itself included) is
///   masqueraded to the node IP, so the reply comes back through the node and is un-NATed;
/// - pods reaching the host-services IPs (cluster DNS, Kubernetes API) in the root netns
///   are masqueraded to the node IP, which the root netns reaches on the bridge (it has no
///   routes to pod CIDRs: two labs may use the same ones).
pub fn node_nat_rules(spec: &LabSpec, pod_cidr: Ipv4Net) -> String {
    let [a, b, _, _] = spec.underlay.network().octets();
    format!(
        "table ip mesh_lab_node\ndelete table ip mesh_lab_node\n\
         table ip mesh_lab_node {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tct status dnat iifname \"mlv*\" oifname \"mlv*\" masquerade\n\
         \t\tip saddr {pod_cidr} ip daddr {a}.{b}.0.0/24 oifname \"eth0\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Builds the underlay: bridge, control-plane and node namespaces, intra-cluster routes.
pub fn build(spec: &LabSpec) -> Result<()> {
    create_bridge(spec)?;
    for c in &spec.clusters {
        create_underlay_netns(spec, &spec.cp_netns(&c.name), c.cp_ip)?;
        for n in &c.nodes {
            let ns = spec.node_netns(&n.name);
            create_underlay_netns(spec, &ns, n.ip)?;
            sys::run(
                "ip",
                &["netns", "exec", &ns, "nft", "-f", "-"],
                Some(&node_nat_rules(spec, n.pod_cidr)),
            )?;
        }
    }
    add_intra_cluster_routes(spec)
}

/// Plugs a pod netns into its node: veth `host_veth` (node side, 169.254.1.1/32 and a /32
/// route to the pod) and `eth0` in the pod (pod IP/32, default route via 169.254.1.1).
pub fn plug_pod(
    node_netns: &str,
    node_ip: Ipv4Addr,
    pod_netns: &str,
    host_veth: &str,
    pod_ip: Ipv4Addr,
) -> Result<()> {
    // A veth left by a pod of the same name that was not cleaned up would block the add.
    let _ = ip(Some(node_netns), &["link", "del", host_veth]);
    ip_batch(
        Some(node_netns),
        &[
            format!("link add {host_veth} type veth peer name eth0 netns {pod_netns}"),
            format!("addr add {POD_GATEWAY}/32 dev {host_veth}"),
            format!("link set {host_veth} up"),
            format!("route replace {pod_ip}/32 dev {host_veth} src {node_ip}"),
        ],
    )?;
    ip_batch(
        Some(pod_netns),
        &[
            format!("addr add {pod_ip}/32 dev eth0"),
            "link set eth0 up".to_string(),
            format!("route add {POD_GATEWAY} dev eth0 scope link"),
            format!("route add default via {POD_GATEWAY} dev eth0"),
        ],
    )
}

/// The networks of cluster `to` that `from`'s namespaces must not reach in a partition:
/// its underlay /24 and its pod CIDR.
fn partition_targets(spec: &LabSpec, to: &str) -> Vec<String> {
    let Some(c) = spec.cluster(to) else {
        return Vec::new();
    };
    let [a, b, _, _] = spec.underlay.network().octets();
    vec![format!("{a}.{b}.{}.0/24", c.id), c.pod_cidr.to_string()]
}

fn cluster_netns(spec: &LabSpec, cluster: &str) -> Vec<String> {
    let Some(c) = spec.cluster(cluster) else {
        return Vec::new();
    };
    std::iter::once(spec.cp_netns(&c.name))
        .chain(c.nodes.iter().map(|n| spec.node_netns(&n.name)))
        .collect()
}

/// Cuts traffic between two clusters in both directions: blackhole rules in every
/// control-plane and node netns of each side for the other side's networks.
pub fn partition(spec: &LabSpec, a: &str, b: &str) -> Result<()> {
    for (from, to) in [(a, b), (b, a)] {
        let lines: Vec<String> = partition_targets(spec, to)
            .into_iter()
            .map(|net| format!("rule add to {net} blackhole priority {PARTITION_PRIORITY}"))
            .collect();
        for ns in cluster_netns(spec, from) {
            ip_batch(Some(&ns), &lines)?;
        }
    }
    Ok(())
}

/// Removes every partition rule of the lab.
pub fn heal(spec: &LabSpec) -> Result<()> {
    for c in &spec.clusters {
        for ns in cluster_netns(spec, &c.name) {
            // `ip rule del priority N` removes one rule per call: repeat until none is left.
            while ip(
                Some(&ns),
                &["rule", "del", "priority", &PARTITION_PRIORITY.to_string()],
            )
            .is_ok()
            {}
        }
    }
    Ok(())
}
