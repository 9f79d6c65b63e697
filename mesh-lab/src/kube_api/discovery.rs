//! `/version`, API discovery (aggregated v2 and legacy) and minimal OpenAPI v3 documents.

use serde_json::{Value, json};

use super::resources::{self as r, ResourceType, Subresource};

/// Content-Type of an aggregated discovery reply; kubectl ignores the body without it.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Minor version reported. The kubectl dispatcher on these machines runs the matching
/// kubectl; 1.31 sends JSON bodies for typed commands (1.32+ send protobuf).
pub const MINOR: &str = "31";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": MINOR,
        "gitVersion": format!("v1.{MINOR}.0-mesh-lab"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T00:00:00Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn in_group<'a>(
    types: &'a [&'static ResourceType],
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static ResourceType> + 'a {
    types
        .iter()
        .copied()
        .filter(move |t| t.group == group && t.version == version)
}

fn sub_kind(rt: &ResourceType, s: Subresource) -> (&'static str, &'static str, &'static str) {
    match s {
        Subresource::Scale => ("autoscaling", "v1", "Scale"),
        Subresource::Status => (rt.group, rt.version, rt.kind),
    }
}

fn sub_verbs(s: Subresource) -> &'static [&'static str] {
    match s {
        Subresource::Scale | Subresource::Status => &["get", "patch", "update"],
    }
}

/// Whether the client asked for aggregated discovery.
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|a| {
        let a = a.replace(' ', "");
        a.contains("g=apidiscovery.k8s.io")
            && a.contains("as=APIGroupDiscoveryList")
            && a.contains("v=v2")
    })
}

fn aggregated_version(types: &[&'static ResourceType], group: &str, version: &str) -> Value {
    let resources: Vec<Value> = in_group(types, group, version)
        .map(|t| {
            let mut res = json!({
                "resource": t.resource,
                "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
                "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": t.singular,
                "verbs": VERBS,
            });
            if !t.short_names.is_empty() {
                res["shortNames"] = json!(t.short_names);
            }
            if !t.categories.is_empty() {
                res["categories"] = json!(t.categories);
            }
            if !t.subresources.is_empty() {
                res["subresources"] = t
                    .subresources
                    .iter()
                    .map(|s| {
                        let (g, v, k) = sub_kind(t, *s);
                        json!({
                            "subresource": s.as_str(),
                            "responseKind": {"group": g, "version": v, "kind": k},
                            "verbs": sub_verbs(*s),
                        })
                    })
                    .collect();
            }
            res
        })
        .collect();
    json!({"version": version, "resources": resources, "freshness": "Current"})
}

fn aggregated_group(types: &[&'static ResourceType], group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| aggregated_version(types, group, v))
        .collect();
    let mut item = json!({
        "metadata": {},
        "versions": versions,
    });
    if !group.is_empty() {
        item["metadata"]["name"] = json!(group);
    }
    item
}

/// `GET /api` (core) or `GET /apis` (named groups), aggregated, over the served `types`.
pub fn aggregated(types: &[&'static ResourceType], core: bool) -> Value {
    let items: Vec<Value> = r::groups(types)
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(g, vs)| aggregated_group(types, g, &vs))
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

/// Legacy `GET /api`.
pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn api_group(group: &str, versions: &[&str]) -> Value {
    let gvs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "preferredVersion": gvs[0].clone(),
        "versions": gvs,
    })
}

/// Legacy `GET /apis`.
pub fn api_group_list(types: &[&'static ResourceType]) -> Value {
    let groups: Vec<Value> = r::groups(types)
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| {
            let mut x = api_group(g, &vs);
            x.as_object_mut().expect("object").remove("kind");
            x.as_object_mut().expect("object").remove("apiVersion");
            x
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Legacy `GET /apis/<group>`, if served.
pub fn group(types: &[&'static ResourceType], group: &str) -> Option<Value> {
    r::groups(types)
        .into_iter()
        .find(|(g, _)| *g == group)
        .map(|(g, vs)| api_group(g, &vs))
}

/// Legacy `GET /api/v1` or `GET /apis/<group>/<version>`, if served.
pub fn resource_list(types: &[&'static ResourceType], group: &str, version: &str) -> Option<Value> {
    let mut out = Vec::new();
    for t in in_group(types, group, version) {
        let mut e = json!({
            "name": t.resource,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": VERBS,
        });
        if !t.short_names.is_empty() {
            e["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            e["categories"] = json!(t.categories);
        }
        out.push(e);
        for s in t.subresources {
            let (g, v, k) = sub_kind(t, *s);
            out.push(json!({
                "name": format!("{}/{}", t.resource, s.as_str()),
                "singularName": "",
                "namespaced": t.namespaced,
                "group": g,
                "version": v,
                "kind": k,
                "verbs": sub_verbs(*s),
            }));
        }
    }
    if out.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `GET /openapi/v3`: one document per served group-version.
pub fn openapi_v3_root(types: &[&'static ResourceType]) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, vs) in r::groups(types) {
        for v in vs {
            let p = gv_path(g, v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
            );
        }
    }
    json!({ "paths": paths })
}

/// Name of a custom type's schema in `components.schemas`, as kube-apiserver names them
/// (the group reversed: `com.example.v1.Widget`).
fn schema_name(t: &ResourceType) -> String {
    let rev: Vec<&str> = t.group.split('.').rev().collect();
    format!("{}.{}.{}", rev.join("."), t.version, t.kind)
}

/// `GET /openapi/v3/<gv path>`: per kind one PATCH operation carrying the GVK and the
/// `fieldValidation` parameter, which is what kubectl's validation and field-validation
/// detection look for. No schemas: kubectl then builds patches from its built-in types.
///
/// Custom types also get their CRD schema in `components.schemas`, tagged with
/// `x-kubernetes-group-version-kind`, where `kubectl explain` looks for it. The operations
/// still have no `requestBody`, so kubectl keeps sending JSON merge patches for them.
pub fn openapi_v3_doc(types: &[&'static ResourceType], path: &str) -> Option<Value> {
    let (g, v) = r::groups(types)
        .into_iter()
        .flat_map(|(g, vs)| vs.into_iter().map(move |v| (g, v)))
        .find(|(g, v)| gv_path(g, v) == path)?;
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for t in in_group(types, g, v) {
        if let Some(c) = t.custom {
            let mut schema = c
                .schema
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            schema["x-kubernetes-group-version-kind"] =
                json!([{"group": t.group, "version": t.version, "kind": t.kind}]);
            if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
                props.entry("apiVersion").or_insert(json!({"type": "string",
                    "description": "APIVersion defines the versioned schema of this representation of an object."}));
                props.entry("kind").or_insert(json!({"type": "string",
                    "description": "Kind is a string value representing the REST resource this object represents."}));
                props.entry("metadata").or_insert(json!({"type": "object"}));
            }
            schemas.insert(schema_name(t), schema);
        }
        let base = if g.is_empty() {
            format!("/api/{v}")
        } else {
            format!("/apis/{g}/{v}")
        };
        let item = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.resource)
        } else {
            format!("{base}/{}/{{name}}", t.resource)
        };
        paths.insert(
            item,
            json!({
                "patch": {
                    "operationId": format!("patch{}", t.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    ],
                    "responses": {"200": {"description": "OK"}},
                }
            }),
        );
    }
    let mut doc = json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{MINOR}.0")},
        "paths": paths,
    });
    if !schemas.is_empty() {
        doc["components"] = json!({ "schemas": schemas });
    }
    Some(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_documents() {
        let all = r::ALL;
        let core = aggregated(all, true);
        assert_eq!(core["items"].as_array().unwrap().len(), 1);
        assert!(core["items"][0]["metadata"].get("name").is_none());
        let apps = aggregated(all, false);
        let apps = apps["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "apps")
            .unwrap()
            .clone();
        let d = &apps["versions"][0]["resources"][0];
        assert_eq!(d["resource"], "deployments");
        assert_eq!(d["subresources"][1]["responseKind"]["kind"], "Scale");
        let legacy = resource_list(all, "apps", "v1").unwrap();
        assert!(
            legacy["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "deployments/scale" && r["group"] == "autoscaling")
        );
        assert!(resource_list(all, "nope", "v1").is_none());
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated("application/json"));
        assert!(openapi_v3_doc(all, "apis/apps/v1").unwrap()["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"].is_object());
    }
}
