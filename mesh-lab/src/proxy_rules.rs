//! The lab's kube-proxy for non-global Services: [`render`] turns the Services and
//! EndpointSlices of a cluster into one nftables ruleset for table `ip mesh_lab_proxy`, which
//! the lab applies with `nft -f -` in every node namespace of the cluster; [`spawn`] renders it
//! again on every change and hands each new distinct ruleset to a callback.
//!
//! - Each ClusterIP:port/protocol of a Service DNATs to its ready endpoints, picked with
//!   `numgen random mod N` over a map; a Service port without a ready endpoint is rejected
//!   (TCP reset, ICMP port unreachable otherwise), so clients fail fast as with kube-proxy.
//! - Global Services (`service.cilium.io/global` or `io.cilium/global-service` "true") are
//!   left out: the mesh-agent's socket LB serves them, rewriting connect() before any packet
//!   exists, so it is obvious which path served a request.
//! - The text starts with `table ip mesh_lab_proxy` + `delete table ip mesh_lab_proxy`, so
//!   applying it is atomic (one nft transaction) and idempotent, whether the table exists or not.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::Value;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::controllers::{Trigger, arr_at, list_all, name_of, ns_of, str_at};
use crate::kube_api::resources as r;
use crate::kube_api::store::Store;

pub const TABLE: &str = "mesh_lab_proxy";

/// Whether the Service is global (its traffic is the mesh-agent's, not the lab kube-proxy's).
pub fn is_global(svc: &Value) -> bool {
    let annotations = svc
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)));
    mesh_core::annotations::parse_service_annotations(annotations)
        .0
        .global
}

/// One Service port's rule.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Frontend {
    ip: Ipv4Addr,
    proto: String,
    port: u16,
    what: String,
    backends: Vec<(Ipv4Addr, u16)>,
}

fn frontends(services: &[Value], slices: &[Value]) -> Vec<Frontend> {
    let mut out = Vec::new();
    for svc in services {
        if is_global(svc) || str_at(svc, "/spec/type") == "ExternalName" {
            continue;
        }
        let ips: BTreeSet<Ipv4Addr> = arr_at(svc, "/spec/clusterIPs")
            .chain(svc.pointer("/spec/clusterIP"))
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        if ips.is_empty() {
            continue; // headless
        }
        let mine: Vec<&Value> = slices
            .iter()
            .filter(|s| {
                ns_of(s) == ns_of(svc)
                    && s.pointer("/metadata/labels")
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .and_then(Value::as_str)
                        == Some(name_of(svc))
                    && str_at(s, "/addressType") == "IPv4"
            })
            .collect();
        for sp in arr_at(svc, "/spec/ports") {
            let Some(port) = sp
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            let proto = sp.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            let pname = sp.get("name").and_then(Value::as_str).unwrap_or("");
            let mut backends = BTreeSet::new();
            for s in &mine {
                let Some(target) = arr_at(s, "/ports")
                    .find(|p| {
                        p.get("name").and_then(Value::as_str).unwrap_or("") == pname
                            && p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == proto
                    })
                    .and_then(|p| p.get("port")?.as_u64())
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in arr_at(s, "/endpoints") {
                    // An unset `ready` means ready (EndpointSlice API).
                    if ep.pointer("/conditions/ready") == Some(&Value::Bool(false)) {
                        continue;
                    }
                    for a in arr_at(ep, "/addresses") {
                        if let Some(ip) = a.as_str().and_then(|a| a.parse::<Ipv4Addr>().ok()) {
                            backends.insert((ip, target));
                        }
                    }
                }
            }
            let what = if pname.is_empty() {
                format!("{}/{}:{port}", ns_of(svc), name_of(svc))
            } else {
                format!("{}/{}:{pname}", ns_of(svc), name_of(svc))
            };
            for ip in &ips {
                out.push(Frontend {
                    ip: *ip,
                    proto: proto.to_ascii_lowercase(),
                    port,
                    what: what.clone(),
                    backends: backends.iter().copied().collect(),
                });
            }
        }
    }
    out.sort();
    out
}

/// The ruleset for the cluster's non-global Services (see the module docs).
pub fn render(services: &[Value], slices: &[Value]) -> String {
    let fes = frontends(services, slices);
    let mut t = String::new();
    // Declaring the table first makes the delete valid when it does not exist yet.
    let _ = writeln!(t, "table ip {TABLE}");
    let _ = writeln!(t, "delete table ip {TABLE}");
    let _ = writeln!(t, "table ip {TABLE} {{");
    t.push_str("\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n");
    t.push_str("\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n");
    t.push_str("\tchain services {\n");
    for (i, fe) in fes.iter().enumerate() {
        let _ = writeln!(
            t,
            "\t\tip daddr {} {} dport {} jump svc_{i} comment \"{}\"",
            fe.ip, fe.proto, fe.port, fe.what
        );
    }
    t.push_str("\t}\n");
    for (i, fe) in fes.iter().enumerate() {
        let _ = writeln!(t, "\tchain svc_{i} {{");
        if fe.backends.is_empty() {
            if fe.proto == "tcp" {
                t.push_str("\t\tmeta l4proto tcp reject with tcp reset\n");
            }
            t.push_str("\t\treject\n");
        } else {
            let map: Vec<String> = fe
                .backends
                .iter()
                .enumerate()
                .map(|(j, (ip, port))| format!("{j} : {ip} . {port}"))
                .collect();
            let _ = writeln!(
                t,
                "\t\tmeta l4proto {} dnat ip to numgen random mod {} map {{ {} }}",
                fe.proto,
                fe.backends.len(),
                map.join(", ")
            );
        }
        t.push_str("\t}\n");
    }
    t.push_str("}\n");
    t
}

/// Renders the rules of a store on every Service/EndpointSlice change; calls `on_change`
/// with each ruleset that differs from the previous one (the first one always). Dropping
/// the handle stops it.
pub fn spawn(store: Arc<Store>, on_change: impl Fn(String) + Send + Sync + 'static) -> ProxyRules {
    let task = tokio::spawn(
        async move {
            let trigger = Trigger::new(&store, &[&r::SERVICES, &r::ENDPOINTSLICES]);
            let mut last: Option<String> = None;
            loop {
                trigger.changed().await;
                let text = render(
                    &list_all(&store, &r::SERVICES),
                    &list_all(&store, &r::ENDPOINTSLICES),
                );
                if last.as_ref() != Some(&text) {
                    tracing::debug!(bytes = text.len(), "proxy rules changed");
                    on_change(text.clone());
                    last = Some(text);
                }
            }
        }
        .instrument(tracing::info_span!("proxy_rules")),
    );
    ProxyRules { task }
}

/// The running rule renderer; dropping it stops it.
pub struct ProxyRules {
    task: JoinHandle<()>,
}

impl Drop for ProxyRules {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, ip: &str, annotations: Value, ports: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "n", "annotations": annotations},
               "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports}})
    }

    fn slice(svc: &str, ports: Value, eps: Value) -> Value {
        json!({"metadata": {"name": format!("{svc}-abcde"), "namespace": "n",
               "labels": {"kubernetes.io/service-name": svc}},
               "addressType": "IPv4", "ports": ports, "endpoints": eps})
    }

    fn ep(ip: &str, ready: Option<bool>) -> Value {
        match ready {
            Some(r) => json!({"addresses": [ip], "conditions": {"ready": r}}),
            None => json!({"addresses": [ip], "conditions": {}}),
        }
    }

    #[test]
    fn dnat_to_ready_endpoints_reject_without_and_skip_global() {
        let services = vec![
            svc(
                "web",
                "10.101.0.10",
                json!({}),
                json!([{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
            ),
            svc(
                "empty",
                "10.101.0.11",
                json!({}),
                json!([{"port": 81, "protocol": "TCP"}]),
            ),
            svc(
                "glob",
                "10.101.0.12",
                json!({"service.cilium.io/global": "true"}),
                json!([{"port": 80}]),
            ),
            svc(
                "legacy",
                "10.101.0.13",
                json!({"io.cilium/global-service": "TRUE"}),
                json!([{"port": 80}]),
            ),
            svc("headless", "None", json!({}), json!([{"port": 80}])),
        ];
        let slices = vec![
            slice(
                "web",
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
                json!([
                    ep("10.1.1.5", Some(true)),
                    ep("10.1.2.5", None),
                    ep("10.1.3.5", Some(false))
                ]),
            ),
            slice(
                "empty",
                json!([{"name": "", "port": 9000, "protocol": "TCP"}]),
                json!([ep("10.1.1.9", Some(false))]),
            ),
            slice(
                "glob",
                json!([{"name": "", "port": 80, "protocol": "TCP"}]),
                json!([ep("10.1.1.7", Some(true))]),
            ),
        ];
        let text = render(&services, &slices);
        assert!(text.starts_with("table ip mesh_lab_proxy\ndelete table ip mesh_lab_proxy\ntable ip mesh_lab_proxy {\n"), "{text}");
        let rules: Vec<&str> = text.lines().map(str::trim).collect();
        let jump = |ip: &str, proto: &str, port: u16| {
            rules
                .iter()
                .find(|l| l.starts_with(&format!("ip daddr {ip} {proto} dport {port} jump ")))
                .and_then(|l| l.split_whitespace().nth(7))
                .unwrap_or_else(|| panic!("no rule for {ip} {proto} {port} in\n{text}"))
                .to_string()
        };
        let body = |chain: &str| -> Vec<&str> {
            let start = rules
                .iter()
                .position(|l| *l == format!("chain {chain} {{"))
                .unwrap();
            rules[start + 1..]
                .iter()
                .take_while(|l| **l != "}")
                .copied()
                .collect()
        };
        assert_eq!(
            body(&jump("10.101.0.10", "tcp", 80)),
            vec![
                "meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.1.1.5 . 8080, 1 : 10.1.2.5 . 8080 }"
            ]
        );
        assert_eq!(
            body(&jump("10.101.0.10", "udp", 53)),
            vec![
                "meta l4proto udp dnat ip to numgen random mod 2 map { 0 : 10.1.1.5 . 5353, 1 : 10.1.2.5 . 5353 }"
            ]
        );
        assert_eq!(
            body(&jump("10.101.0.11", "tcp", 81)),
            vec!["meta l4proto tcp reject with tcp reset", "reject"]
        );
        assert!(
            !text.contains("10.101.0.12")
                && !text.contains("10.101.0.13")
                && !text.contains("10.1.1.7"),
            "{text}"
        );
        assert!(text.contains("comment \"n/web:http\""), "{text}");
        assert_eq!(
            render(&services, &slices),
            text,
            "rendering is deterministic"
        );
        // No services: still a valid, empty table.
        assert!(render(&[], &[]).contains("chain services {\n\t}\n"));
    }
}
