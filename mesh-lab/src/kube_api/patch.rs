//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and Kubernetes strategic merge
//! patch for the fields kubectl apply/annotate/label/scale/patch touch.
//!
//! Strategic merge knows the merge keys of the built-in types by field name (containers by
//! `name`, ports by `containerPort` or `port`, conditions by `type`, ...); lists without a
//! merge key are replaced, as for the real types. Supported directives: `$patch: replace|
//! delete|merge` on maps and list elements, `$setElementOrder/<list>`,
//! `$deleteFromPrimitiveList/<list>`, `$retainKeys`, and `null` to delete a field.

use serde_json::{Map, Value};

use super::error::{ApiError, Result};

/// The patch flavours, from the request's Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    /// Server-side apply (`application/apply-patch+yaml`).
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// Parses a request body as JSON, or YAML when it is not JSON.
pub fn parse_body(body: &[u8]) -> Result<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) => {
            let text = std::str::from_utf8(body).map_err(|_| {
                ApiError::bad_request(format!("invalid JSON in request body: {json_err}"))
            })?;
            let looks_json = text.trim_start().starts_with(['{', '[']);
            if looks_json {
                return Err(ApiError::bad_request(format!(
                    "invalid JSON in request body: {json_err}"
                )));
            }
            serde_yaml::from_str::<Value>(text).map_err(|e| {
                ApiError::bad_request(format!("invalid JSON or YAML in request body: {e}"))
            })
        }
    }
}

/// Applies `patch` (raw body) to `target` and returns the patched document.
pub fn apply(kind: PatchType, target: &Value, patch: &[u8]) -> Result<Value> {
    let mut doc = target.clone();
    match kind {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &p).map_err(|e| {
                ApiError::unprocessable(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })?;
        }
        PatchType::Merge => {
            let p = parse_body(patch)?;
            if !p.is_object() {
                return Err(ApiError::bad_request("merge patch must be a JSON object"));
            }
            json_patch::merge(&mut doc, &p);
        }
        PatchType::Strategic | PatchType::Apply => {
            let p = parse_body(patch)?;
            strategic_merge(&mut doc, &p)?;
        }
    }
    Ok(doc)
}

/// Strategic merge of `patch` into `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<()> {
    let Value::Object(p) = patch else {
        return Err(ApiError::bad_request(
            "strategic merge patch must be a JSON object",
        ));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        unreachable!()
    };
    merge_map(t, p, "")
}

fn is_directive(k: &str) -> bool {
    k == "$patch"
        || k == "$retainKeys"
        || k.starts_with("$setElementOrder/")
        || k.starts_with("$deleteFromPrimitiveList/")
}

/// Merge key of a list field, when the list is merged by key.
fn merge_key(field: &str, orig: &[Value], patch: &[Value]) -> Option<&'static str> {
    // Only lists of objects merge by key: a list of strings that happens to share a name
    // with a keyed list (EndpointSlice `endpoints[].addresses` vs Node
    // `status.addresses`) is replaced, as the real apiserver does.
    if orig.iter().chain(patch).any(|e| !e.is_object()) {
        return None;
    }
    let any_has = |k: &str| orig.iter().chain(patch).any(|e| e.get(k).is_some());
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "volumeDevices" => "name",
        "ports" if any_has("containerPort") => "containerPort",
        "ports" => "port",
        "volumeMounts" => "mountPath",
        "conditions" | "addresses" => "type",
        "taints" => "key",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "readinessGates" => "conditionType",
        _ => return None,
    })
}

/// Lists of scalars merged as sets.
fn is_primitive_merge_list(field: &str) -> bool {
    matches!(field, "finalizers")
}

fn merge_map(orig: &mut Map<String, Value>, patch: &Map<String, Value>, _path: &str) -> Result<()> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut fresh = Map::new();
            let mut rest = patch.clone();
            rest.remove("$patch");
            merge_map(&mut fresh, &rest, _path)?;
            *orig = fresh;
            return Ok(());
        }
        Some("delete") => {
            orig.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch directive $patch: {other:?}"
            )));
        }
    }
    for (k, v) in patch {
        if is_directive(k) {
            continue;
        }
        if v.is_null() {
            orig.remove(k);
            continue;
        }
        match (orig.get_mut(k), v) {
            (Some(Value::Object(o)), Value::Object(p)) => {
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    orig.remove(k);
                } else {
                    merge_map(o, p, k)?;
                }
            }
            (Some(Value::Array(o)), Value::Array(p)) => merge_list(k, o, p)?,
            (_, v) => {
                if let Value::Object(p) = v
                    && p.get("$patch").and_then(Value::as_str) == Some("delete")
                {
                    orig.remove(k);
                    continue;
                }
                orig.insert(k.clone(), fresh_value(k, v)?);
            }
        }
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
            && let (Some(Value::Array(list)), Some(del)) = (orig.get_mut(field), v.as_array())
        {
            list.retain(|e| !del.contains(e));
        }
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/")
            && let (Some(Value::Array(list)), Some(order)) = (orig.get_mut(field), v.as_array())
        {
            reorder(field, list, order);
        }
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        orig.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

/// A patch value for a field the target lacks: directives are resolved against nothing.
fn fresh_value(field: &str, v: &Value) -> Result<Value> {
    Ok(match v {
        Value::Object(p) => {
            let mut m = Map::new();
            merge_map(&mut m, p, field)?;
            Value::Object(m)
        }
        Value::Array(p) => {
            let mut l = Vec::new();
            merge_list(field, &mut l, p)?;
            Value::Array(l)
        }
        other => other.clone(),
    })
}

fn merge_list(field: &str, orig: &mut Vec<Value>, patch: &[Value]) -> Result<()> {
    let replace = patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace {
        let mut out = Vec::new();
        for e in patch {
            if e.get("$patch").and_then(Value::as_str) == Some("replace") {
                continue;
            }
            out.push(fresh_value(field, e)?);
        }
        *orig = out;
        return Ok(());
    }
    if is_primitive_merge_list(field) {
        for e in patch {
            if !orig.contains(e) {
                orig.push(e.clone());
            }
        }
        return Ok(());
    }
    let Some(key) = merge_key(field, orig, patch) else {
        let mut out = Vec::with_capacity(patch.len());
        for e in patch {
            out.push(fresh_value(field, e)?);
        }
        *orig = out;
        return Ok(());
    };
    for e in patch {
        let Value::Object(p) = e else {
            return Err(ApiError::bad_request(format!(
                "strategic merge patch: list {field:?} is merged by {key:?}, but an element is not an object"
            )));
        };
        let Some(kv) = p.get(key) else {
            return Err(ApiError::bad_request(format!(
                "strategic merge patch: an element of {field:?} lacks its merge key {key:?}"
            )));
        };
        let pos = orig.iter().position(|o| o.get(key) == Some(kv));
        match (p.get("$patch").and_then(Value::as_str), pos) {
            (Some("delete"), Some(i)) => {
                orig.retain(|o| o.get(key) != Some(kv));
                let _ = i;
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => {
                if let Value::Object(o) = &mut orig[i] {
                    merge_map(o, p, field)?;
                }
            }
            (_, None) => orig.push(fresh_value(field, e)?),
        }
    }
    Ok(())
}

/// Puts the elements named in `$setElementOrder` first, in that order; others keep their
/// relative order after them.
fn reorder(field: &str, list: &mut [Value], order: &[Value]) {
    let key = merge_key(field, list, &[]);
    let rank = |e: &Value| -> usize {
        order
            .iter()
            .position(|o| match key {
                Some(k) => o.get(k).is_some() && o.get(k) == e.get(k),
                None => o == e,
            })
            .unwrap_or(usize::MAX)
    };
    list.sort_by_key(rank);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        let mut t = target;
        strategic_merge(&mut t, &patch).unwrap();
        t
    }

    #[test]
    fn containers_merge_by_name_and_nulls_delete() {
        let t = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}, "metadata": {"labels": {"x": "1", "y": "2"}}});
        let p = json!({
            "metadata": {"labels": {"x": null, "z": "3"}},
            "spec": {
                "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}],
                "containers": [
                    {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
                    {"name": "c", "image": "c:1"}
                ]
            }
        });
        let r = smp(t, p);
        assert_eq!(r["metadata"]["labels"], json!({"y": "2", "z": "3"}));
        let names: Vec<&str> = r["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(r["spec"]["containers"][1]["image"], "a:2");
        assert_eq!(
            r["spec"]["containers"][1]["env"],
            json!([{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}])
        );
    }

    #[test]
    fn lists_of_strings_are_replaced_not_merged_by_key() {
        // EndpointSlice endpoints[].addresses: strings, even though Node addresses merge by type.
        let t = json!({"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]});
        let r = smp(
            t,
            json!({"endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]}),
        );
        assert_eq!(
            r,
            json!({"endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]})
        );
        let node = json!({"status": {"addresses": [{"type": "InternalIP", "address": "1.1.1.1"}]}});
        let r = smp(
            node,
            json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}]}}),
        );
        assert_eq!(r["status"]["addresses"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn directives_delete_and_replace() {
        let t = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}],
            "selector": {"a": "1", "b": "2"}, "args": ["x", "y"]}});
        let r = smp(
            t.clone(),
            json!({"spec": {"ports": [{"port": 443, "$patch": "delete"}], "args": ["z"]}}),
        );
        assert_eq!(r["spec"]["ports"], json!([{"port": 80, "name": "http"}]));
        assert_eq!(
            r["spec"]["args"],
            json!(["z"]),
            "lists without merge key are replaced"
        );
        let r = smp(
            t.clone(),
            json!({"spec": {"selector": {"$patch": "replace", "c": "3"}}}),
        );
        assert_eq!(r["spec"]["selector"], json!({"c": "3"}));
        let r = smp(
            t.clone(),
            json!({"spec": {"ports": [{"$patch": "replace"}, {"port": 8080}]}}),
        );
        assert_eq!(r["spec"]["ports"], json!([{"port": 8080}]));
        let r = smp(
            t,
            json!({"spec": {"$retainKeys": ["ports"], "ports": [{"port": 80, "protocol": "TCP"}]}}),
        );
        assert_eq!(
            r["spec"],
            json!({"ports": [{"port": 80, "name": "http", "protocol": "TCP"}, {"port": 443, "name": "https"}]})
        );
        let r = smp(
            json!({"metadata": {"finalizers": ["a", "b"]}}),
            json!({"metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(r["metadata"]["finalizers"], json!(["b", "c"]));
    }

    #[test]
    fn merge_and_json_patches() {
        let t = json!({"metadata": {"annotations": {"a": "1"}}, "spec": {"replicas": 1}});
        let r = apply(
            PatchType::Merge,
            &t,
            br#"{"metadata":{"annotations":{"a":null,"b":"2"}}}"#,
        )
        .unwrap();
        assert_eq!(r["metadata"]["annotations"], json!({"b": "2"}));
        let r = apply(
            PatchType::Json,
            &t,
            br#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
        )
        .unwrap();
        assert_eq!(r["spec"]["replicas"], 3);
        let e = apply(
            PatchType::Json,
            &t,
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(apply(PatchType::Merge, &t, b"{nope").unwrap_err().code, 400);
        let r = apply(PatchType::Apply, &t, b"spec:\n  replicas: 5\n").unwrap();
        assert_eq!(r["spec"]["replicas"], 5);
    }
}
