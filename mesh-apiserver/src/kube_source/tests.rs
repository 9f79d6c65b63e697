use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kube::api::DynamicObject;
use mesh_core::policy::PolicyKind;
use mesh_core::{BackendConditions, ClusterName, IdentityId, Protocol, TrafficPolicy};
use serde_json::json;

use super::*;

fn cluster() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn dynobj(v: serde_json::Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

fn service(annotations: serde_json::Value) -> ServiceInfo {
    let obj = dynobj(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ns", "name": "web", "annotations": annotations},
        "spec": {
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "internalTrafficPolicy": "Local"
        }
    }));
    match decode(ResourceKind::Service, obj).unwrap() {
        SlimObject::Service(s) => s,
        o => panic!("{o:?}"),
    }
}

fn slice(name: &str, endpoints: serde_json::Value, ports: serde_json::Value) -> SliceInfo {
    let obj = dynobj(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": name, "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }));
    match decode(ResourceKind::EndpointSlice, obj).unwrap() {
        SlimObject::EndpointSlice(s) => s,
        o => panic!("{o:?}"),
    }
}

fn pod(name: &str, ip: &str, phase: &str, host_network: bool) -> PodInfo {
    let obj = dynobj(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ns", "name": name, "labels": {"app": "web", "pod-template-hash": "x1"},
                      "managedFields": [{"manager": "kubectl"}]},
        "spec": {"nodeName": "n1", "hostNetwork": host_network, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1"}
    }));
    match decode(ResourceKind::Pod, obj).unwrap() {
        SlimObject::Pod(p) => p,
        o => panic!("{o:?}"),
    }
}

#[test]
fn named_container_ports_reach_the_endpoint() {
    // Policy ports given by name resolve against these (issue #12): named ports of every
    // container, protocol TCP by default, sorted and deduplicated; unnamed ones are left out.
    let obj = dynobj(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ns", "name": "web-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [
            {"name": "a", "image": "i", "ports": [
                {"name": "http", "containerPort": 8080},
                {"containerPort": 9000},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            {"name": "b", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}]}
    }));
    let SlimObject::Pod(pod) = decode(ResourceKind::Pod, obj).unwrap() else {
        panic!()
    };
    let ep = build_endpoint(&pod, "10.0.0.9".parse().unwrap(), IdentityId(300));
    let named: Vec<String> = ep
        .named_ports
        .iter()
        .map(|p| format!("{}={}/{}", p.name, p.port, p.protocol))
        .collect();
    assert_eq!(named, ["dns=53/UDP", "http=8080/TCP"]);
}

#[test]
fn non_global_service_is_published_local_only() {
    // Published for the cluster's own agents (their socket LB translates every ClusterIP),
    // marked not global: the gRPC edge never presents it to a peer. Affinity means nothing
    // without remote backends.
    let svc = service(json!({"service.cilium.io/affinity": "remote"}));
    let gs = build_service(&cluster(), &svc, []).unwrap();
    assert!(!gs.global);
    assert_eq!(gs.affinity, mesh_core::Affinity::None);
    assert!(!mesh_core::select::service_presented(
        gs.global,
        gs.shared,
        mesh_core::select::Reader::Peer
    ));
    // Without a ClusterIP (headless) there is nothing to translate.
    let mut headless = svc.clone();
    headless.cluster_ips.clear();
    assert_eq!(build_service(&cluster(), &headless, []), None);
    // A global one is global.
    let g = service(json!({"service.cilium.io/global": "true"}));
    assert!(build_service(&cluster(), &g, []).unwrap().global);
}

#[test]
fn global_service_with_slices() {
    let svc =
        service(json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}));
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]);
    let a = slice(
        "web-a",
        json!([
            {"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z1"},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true}, "nodeName": "n2"},
            {"addresses": ["fd00::1"]},
        ]),
        ports.clone(),
    );
    // 10.0.0.2 also appears, ready, in a second slice: one backend, the ready state wins.
    let b = slice(
        "web-b",
        json!([{"addresses": ["10.0.0.2"], "conditions": {"ready": true}, "nodeName": "n3"}]),
        ports,
    );
    let gs = build_service(&cluster(), &svc, [&a, &b]).unwrap();
    assert_eq!(gs.affinity, mesh_core::Affinity::Local);
    assert!(gs.shared);
    assert_eq!(gs.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(gs.frontends, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(gs.ports.len(), 2);
    assert_eq!(gs.backends.len(), 2, "{:?}", gs.backends);
    let b1 = &gs.backends[0];
    assert_eq!(b1.ip.to_string(), "10.0.0.1");
    assert_eq!(
        b1.conditions,
        BackendConditions {
            ready: true,
            serving: true,
            terminating: false
        }
    );
    assert_eq!((b1.node.as_str(), b1.zone.as_str()), ("n1", "z1"));
    let http = b1.ports.iter().find(|p| p.name == "http").unwrap();
    assert_eq!((http.port, http.protocol), (8080, Protocol::Tcp));
    let dns = b1.ports.iter().find(|p| p.name == "dns").unwrap();
    assert_eq!((dns.port, dns.protocol), (5353, Protocol::Udp));
    let b2 = &gs.backends[1];
    assert_eq!(b2.ip.to_string(), "10.0.0.2");
    assert!(b2.conditions.ready && !b2.conditions.terminating);
    assert_eq!(b2.node, "n3");
}

#[test]
fn slice_conditions_defaults() {
    let s = slice(
        "s",
        json!([
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]),
        json!([{"port": 80}]),
    );
    let c: Vec<_> = s.endpoints.iter().map(|e| e.conditions).collect();
    assert_eq!(
        c[0],
        BackendConditions {
            ready: true,
            serving: true,
            terminating: false
        }
    );
    assert_eq!(
        c[1],
        BackendConditions {
            ready: false,
            serving: false,
            terminating: false
        }
    );
    assert_eq!(
        c[2],
        BackendConditions {
            ready: false,
            serving: true,
            terminating: true
        }
    );
    assert_eq!(s.ports[0].name, "");
    assert_eq!(s.ports[0].protocol, Protocol::Tcp);
}

#[test]
fn invalid_annotation_is_kept_as_problem_and_treated_as_none() {
    let svc =
        service(json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "loca"}));
    assert_eq!(svc.problems.len(), 1);
    assert!(
        svc.problems[0].to_string().contains("loca"),
        "{}",
        svc.problems[0]
    );
    let gs = build_service(&cluster(), &svc, []).unwrap();
    assert_eq!(gs.affinity, mesh_core::Affinity::None);
}

#[test]
fn shared_false() {
    let svc =
        service(json!({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"}));
    assert!(!build_service(&cluster(), &svc, []).unwrap().shared);
}

/// A Namespace label change re-labels the identities of its pods (and only its pods).
#[test]
fn a_namespace_label_change_dirties_the_endpoints_of_its_pods() {
    let mut m = ClusterModel::new();
    m.apply(SlimObject::Pod(pod("a", "10.0.0.1", "Running", false)));
    let mut other = pod("b", "10.0.0.2", "Running", false);
    other.key.namespace = "other".into();
    m.apply(SlimObject::Pod(other));
    let ns = |team: &str| {
        SlimObject::Namespace(NamespaceInfo {
            name: "ns".into(),
            labels: BTreeMap::from([("team".to_string(), team.to_string())]),
        })
    };
    m.apply(ns("blue"));
    m.take_dirty();
    m.apply(ns("blue"));
    assert!(m.take_dirty().is_empty(), "same labels: nothing to redo");
    m.apply(ns("red"));
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    assert_eq!(m.take_dirty().endpoints, BTreeSet::from([ip]));
    let pod = m.endpoint_pod(&ip).unwrap().clone();
    assert_eq!(
        m.identity_labels(&cluster(), &pod)
            .get("io.cilium.k8s.namespace.labels.team"),
        Some("red")
    );
    m.delete(ResourceKind::Namespace, &KubeObjectKey::new("", "ns"));
    assert_eq!(m.take_dirty().endpoints, BTreeSet::from([ip]));
}

#[test]
fn policies_are_slimmed_to_what_the_parser_reads() {
    let obj = dynobj(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"namespace": "shop", "name": "p", "uid": "u1",
                      "managedFields": [{"manager": "kubectl"}], "annotations": {"a": "b"}},
        "spec": {"endpointSelector": {}, "ingress": [{}]}
    }));
    let SlimObject::Policy(p) = decode(ResourceKind::CiliumNetworkPolicy, obj).unwrap() else {
        panic!("not a policy")
    };
    assert_eq!(p.key, KubeObjectKey::new("shop", "p"));
    assert_eq!(p.uid.as_deref(), Some("u1"));
    assert_eq!(
        p.object,
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
               "metadata": {"namespace": "shop", "name": "p"},
               "spec": {"endpointSelector": {}, "ingress": [{}]}})
    );
    let mut m = ClusterModel::new();
    m.apply(SlimObject::Policy(p.clone()));
    assert_eq!(
        m.take_dirty().policies,
        BTreeSet::from([(PolicyKind::CiliumNetworkPolicy, p.key.clone())])
    );
    m.reset(ResourceKind::CiliumNetworkPolicy, vec![]);
    assert!(m.policy(PolicyKind::CiliumNetworkPolicy, &p.key).is_none());
    assert!(m.is_synced(ResourceKind::CiliumNetworkPolicy));
}

#[test]
fn pods_as_endpoints() {
    assert!(pod_is_endpoint(&pod("a", "10.0.0.1", "Running", false)));
    assert!(!pod_is_endpoint(&pod("a", "10.0.0.1", "Succeeded", false)));
    assert!(!pod_is_endpoint(&pod("a", "10.0.0.1", "Failed", false)));
    assert!(!pod_is_endpoint(&pod("a", "192.168.0.1", "Running", true)));
    let p = pod("a", "10.0.0.1", "Running", false);
    let labels = pod_identity_labels(&cluster(), &p, None);
    assert_eq!(
        labels.canonical(),
        "k8s:app=web;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=ns;\
         k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=ns"
    );
    let ns = NamespaceInfo {
        name: "ns".into(),
        labels: BTreeMap::from([("team".to_string(), "blue".to_string())]),
    };
    let labels = pod_identity_labels(&cluster(), &p, Some(&ns));
    assert_eq!(
        labels.get("io.cilium.k8s.namespace.labels.team"),
        Some("blue")
    );
    let ep = build_endpoint(&p, p.ips[0], IdentityId(0x10100));
    assert_eq!(ep.host_ip, Some("192.168.0.1".parse().unwrap()));
    assert_eq!(
        (ep.node.as_str(), ep.namespace.as_str(), ep.pod.as_str()),
        ("n1", "ns", "a")
    );
}

#[test]
fn undecodable_pod_names_itself() {
    let obj = dynobj(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ns", "name": "broken"},
        "spec": {"containers": "x"}
    }));
    let err = decode(ResourceKind::Pod, obj).unwrap_err();
    assert!(err.to_string().contains("Pod ns/broken"), "{err}");
}

#[test]
fn node_slimming() {
    let obj = dynobj(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1"},
        "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}, {"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "bogus"}]}
    }));
    let SlimObject::Node(n) = decode(ResourceKind::Node, obj).unwrap() else {
        panic!()
    };
    let node = build_node(&cluster(), &n);
    assert_eq!(
        node.internal_ips,
        vec!["192.168.0.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(node.pod_cidrs.len(), 2);
}

#[test]
fn model_relist_and_dirty() {
    let mut m = ClusterModel::new();
    let a = pod("a", "10.0.0.1", "Running", false);
    let b = pod("b", "10.0.0.2", "Running", false);
    m.handle(SourceEvent::Init(ResourceKind::Pod));
    m.handle(SourceEvent::InitApply(SlimObject::Pod(a.clone())));
    m.handle(SourceEvent::InitApply(SlimObject::Pod(b.clone())));
    assert!(!m.is_synced(ResourceKind::Pod));
    assert!(
        m.endpoint_pod(&a.ips[0]).is_none(),
        "buffered until InitDone"
    );
    m.handle(SourceEvent::InitDone(ResourceKind::Pod));
    assert!(m.is_synced(ResourceKind::Pod));
    assert_eq!(m.take_dirty().endpoints.len(), 2);
    // Relist without b: b's IP becomes dirty and has no pod.
    m.handle(SourceEvent::Init(ResourceKind::Pod));
    m.handle(SourceEvent::InitApply(SlimObject::Pod(a.clone())));
    m.handle(SourceEvent::InitDone(ResourceKind::Pod));
    let d = m.take_dirty();
    assert!(d.endpoints.contains(&b.ips[0]));
    assert!(m.endpoint_pod(&b.ips[0]).is_none());
    assert!(m.endpoint_pod(&a.ips[0]).is_some());
    // A pod moving IP dirties both IPs.
    let a2 = pod("a", "10.0.0.9", "Running", false);
    m.handle(SourceEvent::Apply(SlimObject::Pod(a2)));
    let d = m.take_dirty();
    assert_eq!(d.endpoints.len(), 2);
    assert!(m.endpoint_pod(&a.ips[0]).is_none());
}

#[test]
fn model_slices_follow_services() {
    let mut m = ClusterModel::new();
    let svc = service(json!({"service.cilium.io/global": "true"}));
    m.handle(SourceEvent::Apply(SlimObject::Service(svc.clone())));
    let s = slice(
        "web-a",
        json!([{"addresses": ["10.0.0.1"]}]),
        json!([{"name": "http", "port": 80}]),
    );
    m.handle(SourceEvent::Apply(SlimObject::EndpointSlice(s.clone())));
    let d = m.take_dirty();
    assert_eq!(d.services.iter().collect::<Vec<_>>(), vec![&svc.key]);
    assert_eq!(
        m.global_service(&cluster(), &svc.key)
            .unwrap()
            .backends
            .len(),
        1
    );
    m.handle(SourceEvent::Delete(
        ResourceKind::EndpointSlice,
        s.key.clone(),
    ));
    assert!(m.take_dirty().services.contains(&svc.key));
    assert!(
        m.global_service(&cluster(), &svc.key)
            .unwrap()
            .backends
            .is_empty()
    );
}

#[test]
fn ip_shared_by_two_pods_prefers_running() {
    let mut m = ClusterModel::new();
    let mut old = pod("old", "10.0.0.1", "Running", false);
    old.terminating = true;
    let new = pod("new", "10.0.0.1", "Running", false);
    m.apply(SlimObject::Pod(old));
    m.apply(SlimObject::Pod(new));
    assert_eq!(
        m.endpoint_pod(&"10.0.0.1".parse().unwrap())
            .unwrap()
            .key
            .name,
        "new"
    );
    m.delete(ResourceKind::Pod, &KubeObjectKey::new("ns", "new"));
    assert_eq!(
        m.endpoint_pod(&"10.0.0.1".parse().unwrap())
            .unwrap()
            .key
            .name,
        "old"
    );
}
