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
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static ResourceType> + 'a {
    r::ALL
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

fn aggregated_group(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = in_group(group, version)
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
    let mut item = json!({
        "metadata": {},
        "versions": [{"version": version, "resources": resources, "freshness": "Current"}],
    });
    if !group.is_empty() {
        item["metadata"]["name"] = json!(group);
    }
    item
}

/// `GET /api` (core) or `GET /apis` (named groups), aggregated.
pub fn aggregated(core: bool) -> Value {
    let items: Vec<Value> = r::groups()
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(g, v)| aggregated_group(g, v))
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

fn api_group(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    })
}

/// Legacy `GET /apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = r::groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, v)| {
            let mut x = api_group(g, v);
            x.as_object_mut().expect("object").remove("kind");
            x.as_object_mut().expect("object").remove("apiVersion");
            x
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Legacy `GET /apis/<group>`, if served.
pub fn group(group: &str) -> Option<Value> {
    r::groups()
        .into_iter()
        .find(|(g, _)| *g == group)
        .map(|(g, v)| api_group(g, v))
}

/// Legacy `GET /api/v1` or `GET /apis/<group>/<version>`, if served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut out = Vec::new();
    for t in in_group(group, version) {
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
pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in r::groups() {
        let p = gv_path(g, v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
        );
    }
    json!({ "paths": paths })
}

/// `GET /openapi/v3/<gv path>`: per kind one PATCH operation carrying the GVK and the
/// `fieldValidation` parameter, which is what kubectl's validation and field-validation
/// detection look for. No schemas: kubectl then builds patches from its built-in types.
pub fn openapi_v3_doc(path: &str) -> Option<Value> {
    let (g, v) = r::groups()
        .into_iter()
        .find(|(g, v)| gv_path(g, v) == path)?;
    let mut paths = serde_json::Map::new();
    for t in in_group(g, v) {
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
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{MINOR}.0")},
        "paths": paths,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_documents() {
        let core = aggregated(true);
        assert_eq!(core["items"].as_array().unwrap().len(), 1);
        assert!(core["items"][0]["metadata"].get("name").is_none());
        let apps = aggregated(false);
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
        let legacy = resource_list("apps", "v1").unwrap();
        assert!(
            legacy["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "deployments/scale" && r["group"] == "autoscaling")
        );
        assert!(resource_list("nope", "v1").is_none());
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated("application/json"));
        assert!(openapi_v3_doc("apis/apps/v1").unwrap()["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"].is_object());
    }
}
