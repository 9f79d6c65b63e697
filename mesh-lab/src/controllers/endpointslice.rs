//! EndpointSlice controller: one slice `<svc>-<5 random>` per Service with a selector,
//! labelled `kubernetes.io/service-name` and managed-by `endpointslice-controller.k8s.io`,
//! addressType IPv4, owned by the Service. Endpoints are the matching pods with a podIP
//! (conditions ready/serving/terminating, nodeName, zone from the node's
//! `topology.kubernetes.io/zone`, targetRef); ports come from each Service port's targetPort
//! (a number, or the name of a containerPort; pods lacking a named port are left out).
//! Slices of deleted Services, or of Services that lost their selector, are deleted;
//! Services without a selector are left alone (their slices are someone else's).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    Trigger, arr_at, is_terminating, list_all, name_of, ns_of, pod_finished, pod_ready, str_at,
    uid_of,
};
use crate::kube_api::ApiError;
use crate::kube_api::resources as r;
use crate::kube_api::selector::LabelSelector;
use crate::kube_api::store::Store;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

pub(crate) async fn run(store: Arc<Store>) {
    let trigger = Trigger::new(
        &store,
        &[&r::SERVICES, &r::PODS, &r::ENDPOINTSLICES, &r::NODES],
    );
    loop {
        trigger.changed().await;
        if !reconcile_all(&store) {
            trigger.poke();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

fn selector_of(svc: &Value) -> Option<BTreeMap<String, String>> {
    let sel: BTreeMap<String, String> = svc
        .pointer("/spec/selector")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default();
    (!sel.is_empty()).then_some(sel)
}

fn reconcile_all(store: &Store) -> bool {
    let services = list_all(store, &r::SERVICES);
    let pods = list_all(store, &r::PODS);
    let zones: BTreeMap<String, String> = list_all(store, &r::NODES)
        .iter()
        .filter_map(|n| {
            let z = str_at(
                n,
                &format!("/metadata/labels/{}", ZONE_LABEL.replace('/', "~1")),
            );
            (!z.is_empty()).then(|| (name_of(n).to_string(), z.to_string()))
        })
        .collect();
    let managed =
        LabelSelector::parse(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")).expect("valid selector");
    let (slices, _) = store.list(&r::ENDPOINTSLICES, None, &managed, &Default::default());
    let mut ok = true;
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for svc in &services {
        let Some(sel) = selector_of(svc) else {
            continue;
        };
        if str_at(svc, "/spec/type") == "ExternalName" {
            continue;
        }
        wanted.insert((ns_of(svc).to_string(), name_of(svc).to_string()));
        let matching: Vec<&Value> = pods
            .iter()
            .filter(|p| ns_of(p) == ns_of(svc))
            .filter(|p| {
                sel.iter().all(|(k, v)| {
                    p.pointer("/metadata/labels").and_then(|l| l.get(k)) == Some(&json!(v))
                })
            })
            .collect();
        let desired = desired_slice(svc, &matching, &zones);
        let mine: Vec<&Value> = slices
            .iter()
            .filter(|s| ns_of(s) == ns_of(svc) && slice_service(s) == name_of(svc))
            .collect();
        if let Err(error) = apply(store, svc, desired, &mine) {
            tracing::warn!(namespace = ns_of(svc), service = name_of(svc), %error, "updating the EndpointSlice failed");
            ok = false;
        }
    }
    for s in &slices {
        if !wanted.contains(&(ns_of(s).to_string(), slice_service(s).to_string())) {
            tracing::info!(
                namespace = ns_of(s),
                slice = name_of(s),
                "deleting the slice of a deleted or selector-less Service"
            );
            match store.delete(&r::ENDPOINTSLICES, Some(ns_of(s)), name_of(s), None) {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(error) => {
                    tracing::warn!(slice = name_of(s), %error, "deleting the slice failed");
                    ok = false;
                }
            }
        }
    }
    ok
}

fn slice_service(s: &Value) -> &str {
    s.pointer("/metadata/labels")
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The target port of one Service port on one pod.
fn target_port(svc_port: &Value, pod: &Value) -> Option<u16> {
    let tp = svc_port
        .get("targetPort")
        .filter(|v| !v.is_null())
        .or_else(|| svc_port.get("port"))?;
    if let Some(n) = tp.as_u64() {
        return u16::try_from(n).ok();
    }
    let name = tp.as_str()?;
    if let Ok(n) = name.parse::<u16>() {
        return Some(n);
    }
    let proto = svc_port
        .get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP");
    arr_at(pod, "/spec/containers")
        .flat_map(|c| arr_at(c, "/ports"))
        .find(|p| {
            p["name"] == name && p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == proto
        })
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
}

/// The slice a Service should have: `(endpoints, ports)`, in a stable order.
pub fn desired_slice(
    svc: &Value,
    pods: &[&Value],
    zones: &BTreeMap<String, String>,
) -> (Vec<Value>, Vec<Value>) {
    let svc_ports: Vec<&Value> = arr_at(svc, "/spec/ports").collect();
    let publish_not_ready = svc.pointer("/spec/publishNotReadyAddresses") == Some(&json!(true));
    let mut ports: Option<Vec<Value>> = None;
    let mut endpoints = Vec::new();
    let mut pods: Vec<&&Value> = pods.iter().collect();
    pods.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    for p in pods {
        let ip = str_at(p, "/status/podIP");
        if ip.is_empty() || pod_finished(p) || ip.parse::<std::net::Ipv4Addr>().is_err() {
            continue;
        }
        let resolved: Option<Vec<u16>> = svc_ports.iter().map(|sp| target_port(sp, p)).collect();
        let Some(resolved) = resolved else {
            tracing::debug!(
                pod = name_of(p),
                service = name_of(svc),
                "pod lacks a named target port; left out"
            );
            continue;
        };
        if ports.is_none() {
            ports = Some(
                svc_ports
                    .iter()
                    .zip(&resolved)
                    .map(|(sp, port)| {
                        let mut o = json!({
                            "name": sp.get("name").and_then(Value::as_str).unwrap_or(""),
                            "port": port,
                            "protocol": sp.get("protocol").and_then(Value::as_str).unwrap_or("TCP"),
                        });
                        if let Some(ap) = sp.get("appProtocol") {
                            o["appProtocol"] = ap.clone();
                        }
                        o
                    })
                    .collect(),
            );
        }
        let terminating = is_terminating(p);
        let serving = pod_ready(p) || publish_not_ready;
        let node = str_at(p, "/spec/nodeName");
        let mut ep = json!({
            "addresses": [ip],
            "conditions": {"ready": serving && !terminating, "serving": serving, "terminating": terminating},
            "targetRef": {"kind": "Pod", "namespace": ns_of(p), "name": name_of(p), "uid": uid_of(p)},
        });
        if !node.is_empty() {
            ep["nodeName"] = json!(node);
            if let Some(z) = zones.get(node) {
                ep["zone"] = json!(z);
            }
        }
        endpoints.push(ep);
    }
    // Without endpoints, ports that need no pod to resolve are still published.
    let ports = ports.unwrap_or_else(|| {
        svc_ports
            .iter()
            .filter_map(|sp| {
                let tp = sp
                    .get("targetPort")
                    .filter(|v| !v.is_null())
                    .or_else(|| sp.get("port"))?;
                let port = tp.as_u64()?;
                Some(json!({
                    "name": sp.get("name").and_then(Value::as_str).unwrap_or(""),
                    "port": port,
                    "protocol": sp.get("protocol").and_then(Value::as_str).unwrap_or("TCP"),
                }))
            })
            .collect()
    });
    (endpoints, ports)
}

fn apply(
    store: &Store,
    svc: &Value,
    (endpoints, ports): (Vec<Value>, Vec<Value>),
    existing: &[&Value],
) -> Result<(), ApiError> {
    let ns = ns_of(svc);
    let name = name_of(svc);
    let labels = json!({SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY});
    let owner = json!([{
        "apiVersion": "v1", "kind": "Service", "name": name, "uid": uid_of(svc),
        "controller": true, "blockOwnerDeletion": true,
    }]);
    let mut existing: Vec<&&Value> = existing.iter().collect();
    existing.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    // Extra slices (another pass raced, or an owner changed): keep the first.
    for extra in existing.iter().skip(1) {
        let _ = store.delete(&r::ENDPOINTSLICES, Some(ns), name_of(extra), None);
    }
    match existing.first() {
        None => {
            let slice = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"generateName": format!("{name}-"), "namespace": ns, "labels": labels, "ownerReferences": owner},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            });
            let s = store.create(&r::ENDPOINTSLICES, Some(ns), slice)?;
            tracing::info!(
                namespace = ns,
                service = name,
                slice = name_of(&s),
                "created EndpointSlice"
            );
        }
        Some(cur) => {
            let mut new = (**cur).clone();
            let mut l = new
                .pointer("/metadata/labels")
                .cloned()
                .filter(Value::is_object)
                .unwrap_or(json!({}));
            l[SERVICE_NAME_LABEL] = json!(name);
            l[MANAGED_BY_LABEL] = json!(MANAGED_BY);
            new["metadata"]["labels"] = l;
            new["metadata"]["ownerReferences"] = owner;
            new["addressType"] = json!("IPv4");
            new["endpoints"] = json!(endpoints);
            new["ports"] = json!(ports);
            if new != ***cur {
                // The resourceVersion of `cur` makes a concurrent change a conflict, retried
                // on the next pass.
                store.update(&r::ENDPOINTSLICES, Some(ns), name_of(cur), new)?;
                tracing::debug!(
                    namespace = ns,
                    service = name,
                    endpoints = endpoints.len(),
                    "updated EndpointSlice"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, node: &str) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "n", "uid": format!("uid-{name}"), "labels": {"app": "x"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        })
    }

    #[test]
    fn endpoints_conditions_ports_and_zones() {
        let svc = json!({"metadata": {"name": "s", "namespace": "n"}, "spec": {"selector": {"app": "x"}, "ports": [
            {"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "raw", "port": 81, "targetPort": 9000, "protocol": "TCP"},
        ]}});
        let mut term = pod("c", "10.0.0.3", true, "n2");
        term["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        let no_ip = pod("d", "", true, "n1");
        let mut no_port = pod("e", "10.0.0.5", true, "n1");
        no_port["spec"]["containers"][0]["ports"] = json!([]);
        let pods = [
            pod("b", "10.0.0.2", false, "n1"),
            pod("a", "10.0.0.1", true, "n1"),
            term,
            no_ip,
            no_port,
        ];
        let refs: Vec<&Value> = pods.iter().collect();
        let zones = BTreeMap::from([("n1".to_string(), "z1".to_string())]);
        let (eps, ports) = desired_slice(&svc, &refs, &zones);
        assert_eq!(
            ports,
            vec![
                json!({"name": "web", "port": 8080, "protocol": "TCP"}),
                json!({"name": "raw", "port": 9000, "protocol": "TCP"}),
            ]
        );
        let summary: Vec<(String, bool, bool, bool, String)> = eps
            .iter()
            .map(|e| {
                (
                    e["addresses"][0].as_str().unwrap().to_string(),
                    e["conditions"]["ready"].as_bool().unwrap(),
                    e["conditions"]["serving"].as_bool().unwrap(),
                    e["conditions"]["terminating"].as_bool().unwrap(),
                    e["zone"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("10.0.0.1".into(), true, true, false, "z1".into()),
                ("10.0.0.2".into(), false, false, false, "z1".into()),
                ("10.0.0.3".into(), false, true, true, "".into()),
            ]
        );
        assert_eq!(
            eps[0]["targetRef"],
            json!({"kind": "Pod", "namespace": "n", "name": "a", "uid": "uid-a"})
        );
        assert_eq!(eps[0]["nodeName"], "n1");
        // No pods: only numeric target ports can be published.
        let (eps, ports) = desired_slice(&svc, &[], &zones);
        assert!(eps.is_empty());
        assert_eq!(
            ports,
            vec![json!({"name": "raw", "port": 9000, "protocol": "TCP"})]
        );
    }
}
