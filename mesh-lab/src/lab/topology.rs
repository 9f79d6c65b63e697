//! Names and addresses of a lab, as pure functions of its name, size and underlay
//! (ARCHITECTURE.md, "mesh-lab": lab runtime). Everything `down` removes is derived from
//! these names, so a lab can be cleaned up without its state file.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Cluster names in order; past the list, `c<N>`.
pub const CLUSTER_NAMES: [&str; 5] = ["east", "west", "north", "south", "central"];
pub const MAX_CLUSTERS: usize = 50;
pub const MAX_NODES: usize = 100;
pub const DEFAULT_UNDERLAY: &str = "172.31.0.0/16";
/// Port of each cluster's Kubernetes API (on its host-services IP).
pub const KUBE_API_PORT: u16 = 6443;
/// gRPC port of each mesh-apiserver (on its control-plane IP).
pub const APISERVER_PORT: u16 = 7443;
pub const APISERVER_METRICS_PORT: u16 = 9962;
/// Port of each agent's Observer API (Hubble's default 4244), on its node IP.
pub const HUBBLE_PORT: u16 = 4244;
/// The next hop every pod routes through (on the node side of each pod's veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("lab name {0:?}: must be 1 to 8 characters of [a-z0-9]")]
    Name(String),
    #[error("--clusters {0}: must be between 1 and {MAX_CLUSTERS}")]
    Clusters(usize),
    #[error("--nodes {0}: must be between 1 and {MAX_NODES}")]
    Nodes(usize),
    #[error("--underlay {0}: must be an IPv4 /16 network such as {DEFAULT_UNDERLAY}")]
    Underlay(String),
}

/// A whole lab: what `mesh-lab up` builds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabSpec {
    pub name: String,
    pub underlay: Ipv4Net,
    pub clusters: Vec<ClusterSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterSpec {
    pub name: String,
    /// Cluster ID, also the 1-based index used in addresses.
    pub id: u8,
    pub pod_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    /// Control-plane netns address: etcd, mesh-apiserver, the LoadBalancer ingress IP.
    pub cp_ip: Ipv4Addr,
    /// On the root side of the bridge: the cluster's Kubernetes API listens here.
    pub host_ip: Ipv4Addr,
    pub nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
}

impl ClusterSpec {
    /// The ClusterIP of the `kube-system/kube-dns` Service: the tenth address of the
    /// service CIDR, as kubeadm picks it; kubelet writes it into every pod's resolv.conf.
    pub fn dns_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.service_cidr.network()) + 10)
    }
}

/// Checks a lab name: 1 to 8 characters of `[a-z0-9]` (it is part of interface names).
pub fn check_name(name: &str) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= 8
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(TopologyError::Name(name.to_owned()))
    }
}

pub fn cluster_name(index: usize) -> String {
    CLUSTER_NAMES
        .get(index - 1)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("c{index}"))
}

pub fn parse_underlay(s: &str) -> Result<Ipv4Net, TopologyError> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| TopologyError::Underlay(s.to_owned()))?;
    if net.prefix_len() != 16 || net.network() != net.addr() {
        return Err(TopologyError::Underlay(s.to_owned()));
    }
    Ok(net)
}

impl LabSpec {
    pub fn new(
        name: &str,
        clusters: usize,
        nodes: usize,
        underlay: Ipv4Net,
    ) -> Result<Self, TopologyError> {
        check_name(name)?;
        if !(1..=MAX_CLUSTERS).contains(&clusters) {
            return Err(TopologyError::Clusters(clusters));
        }
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(TopologyError::Nodes(nodes));
        }
        let [a, b, _, _] = underlay.network().octets();
        let clusters = (1..=clusters)
            .map(|c| {
                let cn = cluster_name(c);
                let c8 = c as u8;
                ClusterSpec {
                    id: c8,
                    pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, c8, 0, 0), 16).expect("prefix 16"),
                    service_cidr: Ipv4Net::new(Ipv4Addr::new(10, 100 + c8, 0, 0), 16)
                        .expect("prefix 16"),
                    cp_ip: Ipv4Addr::new(a, b, c8, 2),
                    host_ip: Ipv4Addr::new(a, b, 0, 10 + c8),
                    nodes: (1..=nodes)
                        .map(|n| {
                            let n8 = n as u8;
                            NodeSpec {
                                name: format!("{cn}-node{n}"),
                                index: n8,
                                ip: Ipv4Addr::new(a, b, c8, 10 + n8),
                                pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, c8, n8, 0), 24)
                                    .expect("prefix 24"),
                            }
                        })
                        .collect(),
                    name: cn,
                }
            })
            .collect();
        Ok(LabSpec {
            name: name.to_owned(),
            underlay,
            clusters,
        })
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The gateway of the underlay: the bridge's own address.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        let [a, b, _, _] = self.underlay.network().octets();
        Ipv4Addr::new(a, b, 0, 1)
    }

    pub fn bridge(&self) -> String {
        bridge_name(&self.name)
    }

    /// `<LAB>-<cluster>`: kubeconfig context of a cluster.
    pub fn context(&self, cluster: &str) -> String {
        format!("{}-{cluster}", self.name)
    }

    pub fn cp_netns(&self, cluster: &str) -> String {
        format!("{}{cluster}-cp", netns_prefix(&self.name))
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("{}{node}", netns_prefix(&self.name))
    }

    /// Pod netns: `mlab-<LAB>-<cluster>-<ns>.<pod>` (a namespace has no dot, so names of
    /// pods in different namespaces never collide, nor with `cp` / `nodeN`).
    pub fn pod_netns(&self, cluster: &str, namespace: &str, pod: &str) -> String {
        format!("{}{cluster}-{namespace}.{pod}", netns_prefix(&self.name))
    }

    pub fn cgroup_root(&self, cgroup2: &Path) -> PathBuf {
        lab_cgroup(cgroup2, &self.name)
    }

    pub fn control_cgroup(&self, cgroup2: &Path, cluster: &str) -> PathBuf {
        self.cgroup_root(cgroup2).join(cluster).join("control")
    }

    pub fn node_cgroup(&self, cgroup2: &Path, cluster: &str, node: &str) -> PathBuf {
        self.cgroup_root(cgroup2).join(cluster).join(node)
    }

    pub fn pin_dir(&self, cluster: &str, node: &str) -> PathBuf {
        lab_bpffs(&self.name).join(cluster).join(node)
    }

    pub fn node(&self, node: &str) -> Option<(&ClusterSpec, &NodeSpec)> {
        self.clusters
            .iter()
            .find_map(|c| c.nodes.iter().find(|n| n.name == node).map(|n| (c, n)))
    }
}

pub fn bridge_name(lab: &str) -> String {
    format!("mlab-{lab}")
}

/// Every netns of lab `lab` starts with this.
pub fn netns_prefix(lab: &str) -> String {
    format!("mlab-{lab}-")
}

pub fn lab_cgroup(cgroup2: &Path, lab: &str) -> PathBuf {
    cgroup2.join("mesh-lab").join(lab)
}

pub const BPFFS: &str = "/sys/fs/bpf";

pub fn lab_bpffs(lab: &str) -> PathBuf {
    Path::new(BPFFS).join("mesh-lab").join(lab)
}

/// Host-side name of a pod's veth in its node netns: `mlv` + 8 hex digits of a hash of
/// `cluster/namespace/pod` (interface names are limited to 15 characters).
pub fn pod_veth(cluster: &str, namespace: &str, pod: &str) -> String {
    format!("mlv{:08x}", fnv1a(&format!("{cluster}/{namespace}/{pod}")))
}

/// Root-side name of a netns's underlay veth: `mlu` + 8 hex digits.
pub fn underlay_veth(netns: &str) -> String {
    format!("mlu{:08x}", fnv1a(netns))
}

fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// State directory of a lab: `$MESH_LAB_STATE_DIR/<LAB>` (default `/run/mesh-lab/<LAB>`).
pub fn state_dir(lab: &str) -> PathBuf {
    state_parent().join(lab)
}

pub fn state_parent() -> PathBuf {
    std::env::var_os("MESH_LAB_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/mesh-lab"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        let spec = LabSpec::new("mesh", 2, 2, parse_underlay("172.31.0.0/16").unwrap()).unwrap();
        let west = spec.cluster("west").unwrap();
        assert_eq!(west.id, 2);
        assert_eq!(west.cp_ip, Ipv4Addr::new(172, 31, 2, 2));
        assert_eq!(west.host_ip, Ipv4Addr::new(172, 31, 0, 12));
        assert_eq!(west.pod_cidr.to_string(), "10.2.0.0/16");
        assert_eq!(west.service_cidr.to_string(), "10.102.0.0/16");
        let n2 = &west.nodes[1];
        assert_eq!(n2.name, "west-node2");
        assert_eq!(n2.ip, Ipv4Addr::new(172, 31, 2, 12));
        assert_eq!(n2.pod_cidr.to_string(), "10.2.2.0/24");
        assert_eq!(spec.cp_netns("west"), "mlab-mesh-west-cp");
        assert_eq!(spec.node_netns("west-node2"), "mlab-mesh-west-node2");
        assert_eq!(
            spec.pod_netns("west", "default", "x"),
            "mlab-mesh-west-default.x"
        );
        assert_eq!(spec.context("west"), "mesh-west");
        assert_eq!(spec.bridge(), "mlab-mesh");
        assert_eq!(cluster_name(6), "c6");
    }

    #[test]
    fn bad_input_is_named() {
        assert!(matches!(check_name("Mesh"), Err(TopologyError::Name(_))));
        assert!(matches!(
            check_name("toolongname"),
            Err(TopologyError::Name(_))
        ));
        assert!(check_name("lab1").is_ok());
        let u = parse_underlay(DEFAULT_UNDERLAY).unwrap();
        assert!(matches!(
            LabSpec::new("a", 0, 1, u),
            Err(TopologyError::Clusters(0))
        ));
        assert!(matches!(
            LabSpec::new("a", 1, 0, u),
            Err(TopologyError::Nodes(0))
        ));
        assert!(parse_underlay("172.31.0.0/24").is_err());
        assert!(parse_underlay("172.31.1.0/16").is_err());
    }

    #[test]
    fn interface_names_fit() {
        let v = pod_veth("east", "default", "a-very-long-pod-name-0123456789");
        assert_eq!(v.len(), 11);
        assert_ne!(
            v,
            pod_veth("east", "other", "a-very-long-pod-name-0123456789")
        );
        assert!(bridge_name("abcdefgh").len() <= 15);
    }
}
