//! `meta.k8s.io/v1 Table` rendering for `kubectl get`, with the columns the real server prints.

use serde_json::{Value, json};

use super::crd::{self, CustomType};
use super::resources::ResourceType;
use super::selector::LabelSelector;
use super::util;

/// How rows carry their object (`?includeObject=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

struct Col {
    name: &'static str,
    ty: &'static str,
    priority: u8,
    description: &'static str,
}

/// A column definition as the Table carries it.
fn col_def(name: &str, ty: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({
        "name": name,
        "type": ty,
        "format": format,
        "description": description,
        "priority": priority,
    })
}

const fn col(name: &'static str, ty: &'static str, priority: u8, description: &'static str) -> Col {
    Col {
        name,
        ty,
        priority,
        description,
    }
}

const NAME: Col = col(
    "Name",
    "string",
    0,
    "Name must be unique within a namespace.",
);
const AGE: Col = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

fn columns(rt: &ResourceType) -> Vec<Col> {
    match rt.kind {
        "Namespace" => vec![
            NAME,
            col("Status", "string", 0, "The status of the namespace"),
            AGE,
        ],
        "Pod" => vec![
            NAME,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted.",
            ),
            AGE,
            col("IP", "string", 1, "IP address allocated to the pod."),
            col(
                "Node",
                "string",
                1,
                "Name of the Node this pod is assigned to.",
            ),
        ],
        "Service" => vec![
            NAME,
            col("Type", "string", 0, "The type of the service."),
            col("Cluster-IP", "string", 0, "The cluster IP of the service."),
            col(
                "External-IP",
                "string",
                0,
                "The external IPs of the service.",
            ),
            col("Port(s)", "string", 0, "The ports of the service."),
            AGE,
            col("Selector", "string", 1, "The selector of the service."),
        ],
        "Node" => vec![
            NAME,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            AGE,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col("Internal-IP", "string", 1, "The internal IP of the node."),
        ],
        "Secret" => vec![
            NAME,
            col("Type", "string", 0, "The type of the secret"),
            col("Data", "string", 0, "The number of entries in the data map"),
            AGE,
        ],
        "ConfigMap" => vec![
            NAME,
            col("Data", "string", 0, "The number of entries in the data map"),
            AGE,
        ],
        "Event" => vec![
            col("Last Seen", "string", 0, "Time of the last occurrence."),
            col("Type", "string", 0, "Type of this event."),
            col("Reason", "string", 0, "Why the action was taken."),
            col("Object", "string", 0, "The object this event is about."),
            col(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
            col(
                "Name",
                "string",
                1,
                "Name must be unique within a namespace.",
            ),
        ],
        "EndpointSlice" => vec![
            NAME,
            col(
                "AddressType",
                "string",
                0,
                "The IP protocol family of the addresses.",
            ),
            col("Ports", "string", 0, "The ports of the endpoints."),
            col("Endpoints", "string", 0, "The addresses of the endpoints."),
            AGE,
        ],
        "Deployment" => vec![
            NAME,
            col("Ready", "string", 0, "Number of the pod with ready state"),
            col(
                "Up-to-date",
                "string",
                0,
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            col(
                "Available",
                "string",
                0,
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            AGE,
            col(
                "Containers",
                "string",
                1,
                "Names of each container in the template.",
            ),
            col(
                "Images",
                "string",
                1,
                "Images referenced by each container in the template.",
            ),
            col("Selector", "string", 1, "Label selector for pods."),
        ],
        "ReplicaSet" => vec![
            NAME,
            col("Desired", "integer", 0, "Number of desired pods."),
            col("Current", "integer", 0, "Number of actual replicas."),
            col("Ready", "integer", 0, "Number of ready replicas."),
            AGE,
        ],
        "Endpoints" => vec![
            NAME,
            col("Endpoints", "string", 0, "Endpoints of the service."),
            AGE,
        ],
        "ServiceAccount" => vec![
            NAME,
            col(
                "Secrets",
                "integer",
                0,
                "Number of secrets of the service account.",
            ),
            AGE,
        ],
        "Lease" => vec![
            NAME,
            col("Holder", "string", 0, "The holder of the lease."),
            AGE,
        ],
        "NetworkPolicy" => vec![
            NAME,
            col(
                "Pod-Selector",
                "string",
                0,
                "Label selector for pods. Selects the pods to which this NetworkPolicy object applies.",
            ),
            AGE,
        ],
        "CustomResourceDefinition" => vec![
            NAME,
            col(
                "Created At",
                "date",
                0,
                "CreationTimestamp of the CustomResourceDefinition.",
            ),
        ],
        _ => vec![NAME, AGE],
    }
}

fn s(v: &Value, ptr: &str) -> String {
    match v.pointer(ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn i(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn join<'a>(items: impl Iterator<Item = &'a Value>, f: impl Fn(&Value) -> String) -> String {
    items.map(f).collect::<Vec<_>>().join(",")
}

fn arr<'a>(v: &'a Value, ptr: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn selector_string(v: Option<&Value>) -> String {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(util::age(
        o.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
    ));
    match rt.kind {
        "Namespace" => vec![name, json!(s(o, "/status/phase")), age],
        "Pod" => {
            let total = arr(o, "/spec/containers").count();
            let ready = arr(o, "/status/containerStatuses")
                .filter(|c| c["ready"].as_bool() == Some(true))
                .count();
            let restarts: i64 = arr(o, "/status/containerStatuses")
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            let mut status = s(o, "/status/reason");
            if status.is_empty() {
                status = s(o, "/status/phase");
            }
            if o.pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null())
            {
                status = "Terminating".into();
            }
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                age,
                json!(or_none(s(o, "/status/podIP"))),
                json!(or_none(s(o, "/spec/nodeName"))),
            ]
        }
        "Service" => {
            let ty = s(o, "/spec/type");
            let mut ext: Vec<String> = arr(o, "/status/loadBalancer/ingress")
                .map(|i| {
                    let ip = s(i, "/ip");
                    if ip.is_empty() { s(i, "/hostname") } else { ip }
                })
                .collect();
            ext.extend(arr(o, "/spec/externalIPs").filter_map(|v| v.as_str().map(String::from)));
            let external = match (ty.as_str(), ext.is_empty()) {
                ("ExternalName", _) => s(o, "/spec/externalName"),
                ("LoadBalancer", true) => "<pending>".into(),
                (_, true) => "<none>".into(),
                _ => ext.join(","),
            };
            let ports = join(arr(o, "/spec/ports"), |p| {
                let np = p.get("nodePort").and_then(Value::as_i64);
                match np {
                    Some(np) => format!("{}:{np}/{}", p["port"], s(p, "/protocol")),
                    None => format!("{}/{}", p["port"], s(p, "/protocol")),
                }
            });
            vec![
                name,
                json!(ty),
                json!(or_none(s(o, "/spec/clusterIP"))),
                json!(external),
                json!(or_none(ports)),
                age,
                json!(or_none(selector_string(o.pointer("/spec/selector")))),
            ]
        }
        "Node" => {
            let ready = arr(o, "/status/conditions").find(|c| c["type"] == "Ready");
            let mut status = match ready.map(|c| s(c, "/status")) {
                Some(st) if st == "True" => "Ready".to_string(),
                Some(st) if st == "False" => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<&str> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            let internal = arr(o, "/status/addresses")
                .find(|a| a["type"] == "InternalIP")
                .map(|a| s(a, "/address"))
                .unwrap_or_default();
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".to_string()
                } else {
                    roles.join(",")
                }),
                age,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(or_none(internal)),
            ]
        }
        "Secret" => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![name, json!(s(o, "/type")), json!(n.to_string()), age]
        }
        "ConfigMap" => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, json!(n.to_string()), age]
        }
        "Event" => {
            let last = [
                "/lastTimestamp",
                "/eventTime",
                "/series/lastObservedTime",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .find_map(|p| {
                o.pointer(p)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            });
            let regarding = if o.get("regarding").is_some() {
                "/regarding"
            } else {
                "/involvedObject"
            };
            let object = format!(
                "{}/{}",
                s(o, &format!("{regarding}/kind")).to_lowercase(),
                s(o, &format!("{regarding}/name"))
            );
            let message = if o.get("note").is_some() {
                s(o, "/note")
            } else {
                s(o, "/message")
            };
            vec![
                json!(util::age(last)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(message),
                name,
            ]
        }
        "EndpointSlice" => {
            let ports = join(arr(o, "/ports"), |p| s(p, "/port"));
            let eps: Vec<String> = arr(o, "/endpoints")
                .flat_map(|e| arr(e, "/addresses").filter_map(|a| a.as_str().map(String::from)))
                .collect();
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(or_none(ports)),
                json!(or_none(shown)),
                age,
            ]
        }
        "Deployment" => {
            let want = i(o, "/spec/replicas");
            vec![
                name,
                json!(format!("{}/{want}", i(o, "/status/readyReplicas"))),
                json!(i(o, "/status/updatedReplicas")),
                json!(i(o, "/status/availableReplicas")),
                age,
                json!(join(arr(o, "/spec/template/spec/containers"), |c| s(
                    c, "/name"
                ))),
                json!(join(arr(o, "/spec/template/spec/containers"), |c| s(
                    c, "/image"
                ))),
                json!(or_none(selector_string(
                    o.pointer("/spec/selector/matchLabels")
                ))),
            ]
        }
        "ReplicaSet" => vec![
            name,
            json!(i(o, "/spec/replicas")),
            json!(i(o, "/status/replicas")),
            json!(i(o, "/status/readyReplicas")),
            age,
        ],
        "Endpoints" => {
            let eps: Vec<String> = arr(o, "/subsets")
                .flat_map(|sub| {
                    let ports: Vec<String> = arr(sub, "/ports").map(|p| s(p, "/port")).collect();
                    arr(sub, "/addresses")
                        .flat_map(move |a| {
                            let ip = s(a, "/ip");
                            if ports.is_empty() {
                                vec![ip]
                            } else {
                                ports.iter().map(|p| format!("{ip}:{p}")).collect()
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            vec![name, json!(or_none(eps.join(","))), age]
        }
        "ServiceAccount" => vec![name, json!(arr(o, "/secrets").count()), age],
        "Lease" => vec![name, json!(or_none(s(o, "/spec/holderIdentity"))), age],
        "NetworkPolicy" => {
            let sel = o
                .pointer("/spec/podSelector")
                .map(|s| LabelSelector::from_object(s).to_string_form())
                .unwrap_or_default();
            vec![name, json!(or_none(sel)), age]
        }
        "CustomResourceDefinition" => vec![name, json!(s(o, "/metadata/creationTimestamp"))],
        _ => vec![name, age],
    }
}

/// Columns of a custom type: Name and the CRD's printer columns, or Name and Age when it
/// declares none (kube-apiserver's defaults for CRDs).
fn custom_columns(c: &CustomType) -> Vec<Value> {
    let mut defs = vec![col_def("Name", "string", "name", NAME.description, 0)];
    if c.columns.is_empty() {
        defs.push(col_def("Age", "date", "", AGE.description, 0));
    }
    for p in &c.columns {
        defs.push(col_def(
            &p.name,
            &p.ty,
            &p.format,
            &p.description,
            p.priority,
        ));
    }
    defs
}

fn custom_cells(c: &CustomType, o: &Value) -> Vec<Value> {
    let mut cells = vec![json!(s(o, "/metadata/name"))];
    if c.columns.is_empty() {
        cells.push(json!(util::age(
            o.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
        )));
    }
    cells.extend(c.columns.iter().map(|p| crd::cell(p, o)));
    cells
}

fn row(rt: &ResourceType, o: &Value, include: IncludeObject) -> Value {
    let cells = match rt.custom {
        Some(c) => custom_cells(c, o),
        None => cells(rt, o),
    };
    let mut r = json!({ "cells": cells });
    match include {
        IncludeObject::None => {}
        IncludeObject::Object => r["object"] = o.clone(),
        IncludeObject::Metadata => {
            let mut meta = o.get("metadata").cloned().unwrap_or(json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.remove("managedFields");
            }
            r["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": meta,
            });
        }
    }
    r
}

/// A Table of `items`.
pub fn table(rt: &ResourceType, items: &[Value], rv: Option<u64>, include: IncludeObject) -> Value {
    let defs: Vec<Value> = match rt.custom {
        Some(c) => custom_columns(c),
        None => columns(rt)
            .iter()
            .map(|c| {
                let format = if c.name == "Name" { "name" } else { "" };
                col_def(c.name, c.ty, format, c.description, i64::from(c.priority))
            })
            .collect(),
    };
    let mut meta = json!({});
    if let Some(rv) = rv {
        meta["resourceVersion"] = json!(rv.to_string());
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": defs,
        "rows": items.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::resources as r;

    #[test]
    fn service_and_deployment_rows() {
        let svc = json!({"metadata": {"name": "web", "namespace": "a", "creationTimestamp": util::now_rfc3339()},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.5", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}});
        let t = table(
            &r::SERVICES,
            std::slice::from_ref(&svc),
            Some(7),
            IncludeObject::Metadata,
        );
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Type",
                "Cluster-IP",
                "External-IP",
                "Port(s)",
                "Age",
                "Selector"
            ]
        );
        assert_eq!(t["rows"][0]["cells"][4], "80:30080/TCP");
        assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "a");
        assert_eq!(t["metadata"]["resourceVersion"], "7");

        let d = json!({"metadata": {"name": "d"}, "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}});
        let t = table(&r::DEPLOYMENTS, &[d], None, IncludeObject::None);
        assert_eq!(t["rows"][0]["cells"][1], "2/3");
        assert_eq!(t["rows"][0]["cells"][2], 3);
        assert!(t["rows"][0].get("object").is_none());
    }
}
