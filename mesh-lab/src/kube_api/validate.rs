//! Defaulting and validation on create and update, per type, and the allocators behind them
//! (Service ClusterIPs from the service CIDR, NodePorts).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use super::error::{ApiError, FieldError, Result};
use super::resources::{self as r, ResourceType};
use super::selector::LabelSelector;
use super::util;

const NODE_PORT_MIN: u16 = 30000;
const NODE_PORT_MAX: u16 = 32767;

/// Allocations shared by all objects of the store.
#[derive(Clone, Debug)]
pub(crate) struct Allocators {
    cidr: IpNet,
    ips: BTreeSet<IpAddr>,
    node_ports: BTreeSet<u16>,
    next_ip: u128,
}

// === impl Allocators ===

impl Allocators {
    pub(crate) fn new(cidr: IpNet) -> Self {
        Allocators {
            cidr,
            ips: BTreeSet::new(),
            node_ports: BTreeSet::new(),
            next_ip: 0,
        }
    }

    fn host_count(&self) -> u128 {
        let bits = match self.cidr {
            IpNet::V4(n) => 32 - n.prefix_len() as u32,
            IpNet::V6(n) => (128 - n.prefix_len() as u32).min(64),
        };
        1u128 << bits
    }

    fn nth(&self, i: u128) -> IpAddr {
        match self.cidr {
            IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + i as u32)),
            IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + i).into()),
        }
    }

    /// The next free address, skipping the network address, the first host (the
    /// `kubernetes` service's by convention) and the broadcast address.
    fn allocate_ip(&mut self) -> Option<IpAddr> {
        let n = self.host_count();
        if n < 4 {
            return None;
        }
        for _ in 0..n {
            let i = 2 + self.next_ip % (n - 3);
            self.next_ip += 1;
            let ip = self.nth(i);
            if self.ips.insert(ip) {
                return Some(ip);
            }
        }
        None
    }

    fn reserve_ip(&mut self, ip: IpAddr) -> std::result::Result<(), &'static str> {
        if !self.cidr.contains(&ip) {
            return Err("the provided IP is not in the valid range of the service CIDR");
        }
        if !self.ips.insert(ip) {
            return Err("provided IP is already allocated");
        }
        Ok(())
    }

    fn allocate_port(&mut self) -> Option<u16> {
        let span = (NODE_PORT_MAX - NODE_PORT_MIN + 1) as usize;
        let start = rand::random_range(0..span);
        (0..span)
            .map(|i| NODE_PORT_MIN + ((start + i) % span) as u16)
            .find(|p| self.node_ports.insert(*p))
    }

    /// Frees what a Service held.
    pub(crate) fn release_service(&mut self, svc: &Value) {
        for ip in svc
            .pointer("/spec/clusterIPs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(ip) = ip.as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                self.ips.remove(&ip);
            }
        }
        for p in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(np) = p.get("nodePort").and_then(Value::as_u64) {
                self.node_ports.remove(&(np as u16));
            }
        }
    }
}

/// DNS-1123 subdomain: lower-case alphanumerics, `-` and `.`, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        })
}

/// DNS-1123 label: a subdomain without dots, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

/// Checks the object name for its type.
pub(crate) fn check_name(rt: &ResourceType, name: &str) -> Result<()> {
    let label_names = std::ptr::eq(rt, &r::NAMESPACES) || std::ptr::eq(rt, &r::SERVICES);
    let ok = if label_names {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if ok {
        return Ok(());
    }
    let what = if label_names {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
    };
    Err(ApiError::invalid(
        rt,
        name,
        vec![FieldError::invalid("metadata.name", name, what)],
    ))
}

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("just made an object")
}

fn default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.into(), v);
    }
}

/// Defaults and validates a new object (metadata is already set), allocating what it needs.
pub(crate) fn prepare_create(
    rt: &'static ResourceType,
    obj: &mut Value,
    alloc: &mut Allocators,
) -> Result<()> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if rt.custom.is_some() {
        return super::crd::prepare_custom(rt, obj, true);
    }
    match rt.kind {
        "CustomResourceDefinition" if std::ptr::eq(rt, &r::CRDS) => {
            super::crd::prepare_crd(rt, obj, None)?;
        }
        "NetworkPolicy" if std::ptr::eq(rt, &r::NETWORKPOLICIES) => {
            super::netpol::prepare(rt, &name, obj)?;
        }
        "Namespace" if std::ptr::eq(rt, &r::NAMESPACES) => {
            obj_mut(&mut obj["metadata"], "labels")
                .insert("kubernetes.io/metadata.name".into(), json!(name));
            default(obj_mut(obj, "spec"), "finalizers", json!(["kubernetes"]));
            default(obj_mut(obj, "status"), "phase", json!("Active"));
        }
        "Pod" => {
            default_pod_spec(rt, &name, obj_mut(obj, "spec"), "spec")?;
            let status = obj_mut(obj, "status");
            default(status, "phase", json!("Pending"));
            default(status, "qosClass", json!("BestEffort"));
        }
        "Deployment" | "ReplicaSet" => default_workload(rt, &name, obj, None)?,
        "Service" => {
            prepare_service(rt, &name, obj, None, alloc)?;
        }
        "Secret" => prepare_secret(rt, &name, obj)?,
        "EndpointSlice" => {
            if obj.get("addressType").and_then(Value::as_str).is_none() {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    vec![FieldError::required("addressType", "")],
                ));
            }
            default(obj.as_object_mut().expect("object"), "endpoints", json!([]));
        }
        _ => {}
    }
    Ok(())
}

/// Defaults and validates an update of `old` to `new` on the main resource.
pub(crate) fn prepare_update(
    rt: &'static ResourceType,
    old: &Value,
    new: &mut Value,
    alloc: &mut Allocators,
) -> Result<()> {
    let name = new["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if rt.custom.is_some() {
        return super::crd::prepare_custom(rt, new, false);
    }
    match rt.kind {
        "CustomResourceDefinition" if std::ptr::eq(rt, &r::CRDS) => {
            super::crd::prepare_crd(rt, new, Some(old))?;
        }
        "NetworkPolicy" if std::ptr::eq(rt, &r::NETWORKPOLICIES) => {
            super::netpol::prepare(rt, &name, new)?;
        }
        "Namespace" if std::ptr::eq(rt, &r::NAMESPACES) => {
            obj_mut(&mut new["metadata"], "labels")
                .insert("kubernetes.io/metadata.name".into(), json!(name));
            if new.get("spec").is_none() {
                new["spec"] = old["spec"].clone();
            }
        }
        "Pod" => default_pod_spec(rt, &name, obj_mut(new, "spec"), "spec")?,
        "Deployment" | "ReplicaSet" => default_workload(rt, &name, new, Some(old))?,
        "Service" => prepare_service(rt, &name, new, Some(old), alloc)?,
        "Secret" => prepare_secret(rt, &name, new)?,
        _ => {}
    }
    Ok(())
}

fn default_pod_spec(
    rt: &ResourceType,
    name: &str,
    spec: &mut Map<String, Value>,
    path: &str,
) -> Result<()> {
    let containers = spec.get_mut("containers").and_then(Value::as_array_mut);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::required(format!("{path}.containers"), "")],
        ));
    };
    let mut errs = Vec::new();
    for (i, c) in containers.iter_mut().enumerate() {
        let Some(c) = c.as_object_mut() else {
            errs.push(FieldError::invalid(
                format!("{path}.containers[{i}]"),
                "",
                "must be an object",
            ));
            continue;
        };
        if c.get("name")
            .and_then(Value::as_str)
            .is_none_or(|n| !is_dns_label(n))
        {
            errs.push(FieldError::required(
                format!("{path}.containers[{i}].name"),
                "",
            ));
        }
        let Some(image) = c.get("image").and_then(Value::as_str).map(String::from) else {
            errs.push(FieldError::required(
                format!("{path}.containers[{i}].image"),
                "",
            ));
            continue;
        };
        let last = image.rsplit('/').next().unwrap_or_default();
        let latest = !last.contains(':') || last.ends_with(":latest");
        default(
            c,
            "imagePullPolicy",
            json!(if latest { "Always" } else { "IfNotPresent" }),
        );
        default(c, "terminationMessagePath", json!("/dev/termination-log"));
        default(c, "terminationMessagePolicy", json!("File"));
        default(c, "resources", json!({}));
        for p in c
            .get_mut("ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(p) = p.as_object_mut() {
                default(p, "protocol", json!("TCP"));
            }
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(rt, name, errs));
    }
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "securityContext", json!({}));
    Ok(())
}

/// Deployments and ReplicaSets: selector and template checks (the selector is immutable),
/// then the apps/v1 defaults.
fn default_workload(
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<()> {
    validate_deployment(rt, name, obj)?;
    if let Some(old) = old
        && old.pointer("/spec/selector") != obj.pointer("/spec/selector")
    {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::invalid(
                "spec.selector",
                obj.pointer("/spec/selector")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                "field is immutable",
            )],
        ));
    }
    let spec = obj_mut(obj, "spec");
    default(spec, "replicas", json!(1));
    if rt.kind == "Deployment" {
        default(spec, "revisionHistoryLimit", json!(10));
        default(spec, "progressDeadlineSeconds", json!(600));
        let strategy = map_entry(spec, "strategy");
        default(strategy, "type", json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            let ru = map_entry(strategy, "rollingUpdate");
            default(ru, "maxSurge", json!("25%"));
            default(ru, "maxUnavailable", json!("25%"));
        }
    }
    let tpl = spec.get_mut("template").expect("validated");
    default_pod_spec(rt, name, obj_mut(tpl, "spec"), "spec.template.spec")
}

/// The object under `key` in a map, created (or replacing a non-object) when needed.
fn map_entry<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = m.entry(key).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("just made an object")
}

fn validate_deployment(rt: &ResourceType, name: &str, obj: &Value) -> Result<()> {
    let Some(sel) = obj.pointer("/spec/selector").filter(|s| s.is_object()) else {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::required("spec.selector", "")],
        ));
    };
    let selector = LabelSelector::from_object(sel);
    if selector.is_empty() {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::invalid(
                "spec.selector",
                sel.to_string(),
                "empty selector is invalid for deployment",
            )],
        ));
    }
    let Some(tpl) = obj.pointer("/spec/template").filter(|t| t.is_object()) else {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::required("spec.template", "")],
        ));
    };
    if !selector.matches(tpl) {
        let labels = tpl
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::invalid(
                "spec.template.metadata.labels",
                labels.to_string(),
                "`selector` does not match template `labels`",
            )],
        ));
    }
    if let Some(n) = obj.pointer("/spec/replicas")
        && n.as_i64().is_none_or(|n| n < 0)
    {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::invalid(
                "spec.replicas",
                n.to_string(),
                "must be greater than or equal to 0",
            )],
        ));
    }
    Ok(())
}

fn prepare_secret(rt: &ResourceType, name: &str, obj: &mut Value) -> Result<()> {
    let m = obj.as_object_mut().expect("object");
    default(m, "type", json!("Opaque"));
    if let Some(Value::Object(sd)) = m.remove("stringData") {
        let data = obj_mut(obj, "data");
        for (k, v) in sd {
            let s = v.as_str().unwrap_or_default();
            data.insert(k, json!(util::base64_encode(s.as_bytes())));
        }
    }
    for (k, v) in obj
        .get("data")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if v.as_str().is_none_or(|s| util::base64_decode(s).is_none()) {
            return Err(ApiError::bad_request(format!(
                "Secret {name:?}: data[{k:?}] is not valid base64: {v}"
            )));
        }
    }
    let _ = rt;
    Ok(())
}

/// Service defaulting: type, ports (protocol, targetPort, names), ClusterIP and NodePorts.
/// On update the allocated ClusterIP and NodePorts carry over and are immutable.
fn prepare_service(
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
    alloc: &mut Allocators,
) -> Result<()> {
    let spec = obj_mut(obj, "spec");
    default(spec, "type", json!("ClusterIP"));
    default(spec, "sessionAffinity", json!("None"));
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if !matches!(
        ty.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(ApiError::invalid(
            rt,
            name,
            vec![FieldError::not_supported(
                "spec.type",
                &json!(ty),
                &[
                    json!("ClusterIP"),
                    json!("ExternalName"),
                    json!("LoadBalancer"),
                    json!("NodePort"),
                ],
            )],
        ));
    }
    let mut errs = Vec::new();
    let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
    let nports = ports.as_ref().map_or(0, |p| p.len());
    if nports == 0
        && ty != "ExternalName"
        && spec.get("clusterIP").and_then(Value::as_str) != Some("None")
    {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut want_node_ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(p) = p.as_object_mut() else {
            errs.push(FieldError::invalid(
                format!("spec.ports[{i}]"),
                "",
                "must be an object",
            ));
            continue;
        };
        let port = p.get("port").and_then(Value::as_u64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            errs.push(FieldError::invalid(
                format!("spec.ports[{i}].port"),
                p.get("port").map(Value::to_string).unwrap_or_default(),
                "must be between 1 and 65535, inclusive",
            ));
        }
        default(p, "protocol", json!("TCP"));
        default(p, "targetPort", json!(port));
        let pname = p
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if nports > 1 && pname.is_empty() {
            errs.push(FieldError::required(format!("spec.ports[{i}].name"), ""));
        } else if !names.insert(pname.clone()) {
            errs.push(FieldError::duplicate(
                format!("spec.ports[{i}].name"),
                &json!(pname),
            ));
        }
        if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
            if p.get("nodePort").is_none_or(Value::is_null) {
                let prev = old_ports
                    .iter()
                    .find(|o| o.get("port").and_then(Value::as_u64) == Some(port))
                    .and_then(|o| o.get("nodePort"))
                    .cloned();
                match prev {
                    Some(np) => {
                        p.insert("nodePort".into(), np);
                    }
                    None => want_node_ports.push(i),
                }
            }
        } else {
            p.remove("nodePort");
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(rt, name, errs));
    }
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from);
    let asked = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from);
    if ty == "ExternalName" {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
        if let Some(o) = old {
            alloc.release_service(o);
        }
    } else {
        let ip = match (&old_ip, asked) {
            (Some(o), None) => o.clone(),
            (Some(o), Some(a)) if *o == a => a,
            (Some(_), Some(a)) => {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    vec![FieldError::invalid(
                        "spec.clusterIPs[0]",
                        a,
                        "may not change once set",
                    )],
                ));
            }
            (None, Some(a)) if a == "None" => a,
            (None, Some(a)) => {
                let parsed: IpAddr = a.parse().map_err(|_| {
                    ApiError::invalid(
                        rt,
                        name,
                        vec![FieldError::invalid(
                            "spec.clusterIPs[0]",
                            &a,
                            "must be a valid IP address",
                        )],
                    )
                })?;
                alloc.reserve_ip(parsed).map_err(|why| {
                    ApiError::invalid(
                        rt,
                        name,
                        vec![FieldError::invalid("spec.clusterIPs[0]", &a, why)],
                    )
                })?;
                a
            }
            (None, None) => alloc
                .allocate_ip()
                .ok_or_else(|| {
                    ApiError::internal(format!(
                        "failed to allocate a serviceIP: range is full ({})",
                        alloc.cidr
                    ))
                })?
                .to_string(),
        };
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
        default(spec, "ipFamilies", json!(["IPv4"]));
        default(spec, "ipFamilyPolicy", json!("SingleStack"));
        default(spec, "internalTrafficPolicy", json!("Cluster"));
        if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
            default(spec, "externalTrafficPolicy", json!("Cluster"));
        }
    }
    for i in want_node_ports {
        let np = alloc
            .allocate_port()
            .ok_or_else(|| ApiError::internal("failed to allocate a nodePort: range is full"))?;
        spec["ports"][i]["nodePort"] = json!(np);
    }
    if old.is_none() {
        default(
            obj.as_object_mut().expect("object"),
            "status",
            json!({"loadBalancer": {}}),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("a.b"));
        assert!(is_dns_subdomain("a.b"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain(""));
    }

    #[test]
    fn services_get_a_cluster_ip_and_defaults() {
        let mut a = Allocators::new("10.96.0.0/28".parse().unwrap());
        let mut s = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}});
        prepare_create(&r::SERVICES, &mut s, &mut a).unwrap();
        let ip: IpAddr = s["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!("10.96.0.0/28".parse::<IpNet>().unwrap().contains(&ip));
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        // The range has 13 usable addresses (.2 .. .14).
        let mut seen = BTreeSet::from([ip]);
        for _ in 0..12 {
            let mut s = json!({"metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}]}});
            prepare_create(&r::SERVICES, &mut s, &mut a).unwrap();
            assert!(seen.insert(s["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()));
        }
        let mut full = json!({"metadata": {"name": "y"}, "spec": {"ports": [{"port": 80}]}});
        assert_eq!(
            prepare_create(&r::SERVICES, &mut full, &mut a)
                .unwrap_err()
                .code,
            500
        );
        a.release_service(&s);
        prepare_create(&r::SERVICES, &mut full, &mut a).unwrap();

        let mut headless = json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        prepare_create(&r::SERVICES, &mut headless, &mut a).unwrap();
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));

        let mut two =
            json!({"metadata": {"name": "t"}, "spec": {"ports": [{"port": 80}, {"port": 81}]}});
        let e = prepare_create(&r::SERVICES, &mut two, &mut a).unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("spec.ports[0].name"), "{}", e.message);
    }

    #[test]
    fn service_ip_is_immutable_and_carried_over() {
        let mut a = Allocators::new("10.96.0.0/16".parse().unwrap());
        let mut s = json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        prepare_create(&r::SERVICES, &mut s, &mut a).unwrap();
        let np = s["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=32767).contains(&np));
        let mut upd = json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        prepare_update(&r::SERVICES, &s, &mut upd, &mut a).unwrap();
        assert_eq!(upd["spec"]["clusterIP"], s["spec"]["clusterIP"]);
        assert_eq!(upd["spec"]["ports"][0]["nodePort"], np);
        let mut bad = json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "10.96.9.9", "ports": [{"port": 80}]}});
        let e = prepare_update(&r::SERVICES, &s, &mut bad, &mut a).unwrap_err();
        assert!(
            e.message.contains("may not change once set"),
            "{}",
            e.message
        );
    }

    #[test]
    fn deployments_need_a_matching_selector() {
        let mut a = Allocators::new("10.96.0.0/16".parse().unwrap());
        let mut d = json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}, "spec": {"containers": [{"name": "c", "image": "i:1"}]}}}});
        let e = prepare_create(&r::DEPLOYMENTS, &mut d, &mut a).unwrap_err();
        assert_eq!(e.code, 422);
        assert!(
            e.message.contains("spec.template.metadata.labels"),
            "{}",
            e.message
        );
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!("x");
        prepare_create(&r::DEPLOYMENTS, &mut d, &mut a).unwrap();
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
    }
}
