//! The workload of the policy benchmarks (DESIGN.md section 14's scale), shared by
//! `mesh-core/examples/policy_compile.rs` (compile) and `mesh-agent/examples/policy_program.rs`
//! (compile and program the maps) through `#[path]`, so both measure the same policies.

use std::time::{Duration, Instant};

use mesh_core::policy::{CidrIdentities, IdentityTable, NamedPort, PolicySet, parse_policy};
use mesh_core::{ClusterId, ClusterName, IdentityId, IdentityLabels, Protocol};
use serde_json::json;

/// Identities and policies of the benchmark.
pub struct Workload {
    pub local: ClusterName,
    pub clusters: usize,
    pub table: IdentityTable,
    pub policies: PolicySet,
    pub rule_count: usize,
    /// The kube-dns identity the default deny allows.
    pub dns: IdentityId,
    /// Time to parse every policy object.
    pub parse: Duration,
}

/// `identities` identities in 4 clusters and about `rules` rules (see the compile example's
/// documentation); `broad` adds an allow from the whole cluster to every endpoint.
pub fn workload(identities: usize, rules: usize, broad: bool) -> Workload {
    let local = ClusterName::new("c1").unwrap();

    // Identities: 4 clusters, 50 apps per namespace.
    let clusters = 4;
    let apps = 50;
    let namespaces = (identities / clusters / apps).max(1);
    let mut table = IdentityTable::new();
    let mut n = 0;
    'fill: for c in 0..clusters {
        let cname = ClusterName::new(format!("c{}", c + 1)).unwrap();
        let cid = ClusterId::new(c as u32 + 1).unwrap();
        for ns in 0..namespaces {
            for app in 0..apps {
                if n == identities {
                    break 'fill;
                }
                let nsname = format!("ns-{ns}");
                let appname = format!("app-{app}");
                let mut labels: Vec<String> =
                    IdentityLabels::for_pod(&cname, &nsname, [("app", appname.as_str())])
                        .iter()
                        .map(String::from)
                        .collect();
                labels.push(format!(
                    "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={nsname}"
                ));
                labels.push(format!(
                    "k8s:io.cilium.k8s.namespace.labels.team=team-{}",
                    ns % 5
                ));
                let id = IdentityId::new(cid, 256 + (ns * apps + app) as u32).unwrap();
                table.insert(id, IdentityLabels::from_strings(labels).unwrap());
                table.set_named_ports(
                    id,
                    vec![NamedPort {
                        name: "http".into(),
                        protocol: Protocol::Tcp,
                        port: 8080,
                    }],
                );
                n += 1;
            }
        }
    }
    // The DNS endpoints the default deny allows.
    let dns = IdentityId::new(ClusterId::new(1).unwrap(), 65000).unwrap();
    table.insert(
        dns,
        IdentityLabels::for_pod(&local, "kube-system", [("k8s-app", "kube-dns")]),
    );

    // Policies, as JSON objects users apply.
    // --broad: the default deny also allows every endpoint of the cluster on one port, so
    // every table holds an entry per local identity (the worst case for table size).
    let default_ingress = if broad {
        json!([{"fromEntities": ["cluster"], "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}]}]}])
    } else {
        json!([{}])
    };
    let mut objects = vec![json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "default-deny"},
        "spec": {
            "endpointSelector": {"matchExpressions": [
                {"key": "io.kubernetes.pod.namespace", "operator": "NotIn", "values": ["kube-system"]}]},
            "ingress": default_ingress,
            "egress": [{"toEndpoints": [{"matchLabels": {
                "io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
                "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}]}]}],
        },
    })];
    let mut rule_count = 2;
    let mut i = 0;
    while rule_count < rules {
        let ns = format!("ns-{}", i % namespaces);
        // Spread policies over (namespace, app) pairs rather than the diagonal.
        let a = (i * 7 + i / namespaces) % apps;
        let app = format!("app-{a}");
        let peer = format!("app-{}", (a + 1) % apps);
        let obj = match i % 10 {
            // Same namespace, named and numbered ports.
            0..=4 => json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": ns},
                "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer}}],
                        "toPorts": [{"ports": [{"port": "http"}, {"port": "9000", "endPort": 9100, "protocol": "TCP"}]}]}]},
            }),
            // Any namespace of the local cluster.
            5 | 6 => json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": ns},
                "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                    "egress": [{"toEndpoints": [{"matchLabels": {"app": peer},
                        "matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}],
                        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
            }),
            // Every cluster.
            7 => json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": ns},
                "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                    "egress": [{"toEndpoints": [{"matchLabels": {"app": peer, "io.kubernetes.pod.namespace": ns},
                        "matchExpressions": [{"key": "io.cilium.k8s.policy.cluster", "operator": "Exists"}]}]}],
                    "egressDeny": [{"toCIDRSet": [{"cidr": format!("10.{}.0.0/16", i % 256), "except": [format!("10.{}.1.0/24", i % 256)]}]}]},
            }),
            // NetworkPolicy with a namespaceSelector.
            8 => json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": ns},
                "spec": {"podSelector": {"matchLabels": {"app": app}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 5)}}}],
                        "ports": [{"port": 443}]}]},
            }),
            // A deny beside the allows.
            _ => json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": ns},
                "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                    "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": peer}}],
                        "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}]},
            }),
        };
        rule_count += if i % 10 == 7 { 2 } else { 1 };
        objects.push(obj);
        i += 1;
    }

    let t = Instant::now();
    let policies: PolicySet = objects
        .iter()
        .map(|o| parse_policy(o, &local).expect("benchmark policies are valid"))
        .collect();
    let parse = t.elapsed();

    let mut alloc = CidrIdentities::new();
    let changes = alloc.sync(&policies.cidr_prefixes(&local)).unwrap();
    CidrIdentities::apply_to(&changes, &mut table);

    Workload {
        local,
        clusters,
        table,
        policies,
        rule_count,
        dns,
        parse,
    }
}
