//! OpenAPI v3 structural schemas of CustomResourceDefinitions: pruning of undeclared fields
//! and validation, with kube-apiserver's field paths and wording.
//!
//! Covered: `type`, `properties`, `additionalProperties`, `required`, `items`, `enum`,
//! `minimum`/`maximum` (and their `exclusive*` flags), `minLength`/`maxLength`, `pattern`,
//! `minItems`/`maxItems`, `format` `int32`/`int64`, `nullable`,
//! `x-kubernetes-preserve-unknown-fields` and `x-kubernetes-int-or-string`. Not covered
//! (accepted without checking): `allOf`/`anyOf`/`oneOf`/`not`, other formats, CEL rules.

use serde_json::{Map, Value};

use super::error::FieldError;

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Fields of every object's root that the schema does not govern.
const ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata"];

/// Removes from `obj` what the schema does not declare, as kube-apiserver prunes: unknown
/// fields (unless `x-kubernetes-preserve-unknown-fields`) and nulls of fields that are not
/// `nullable`. Returns the paths of the unknown fields removed (for `fieldValidation`).
pub fn prune(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut out = Vec::new();
    prune_at(schema, obj, "", true, &mut out);
    out
}

fn prune_at(schema: &Value, v: &mut Value, path: &str, root: bool, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => prune_object(schema, m, path, root, out),
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, it) in items.iter_mut().enumerate() {
                    prune_at(s, it, &format!("{path}[{i}]"), false, out);
                }
            }
        }
        _ => {}
    }
}

fn prune_object(
    schema: &Value,
    m: &mut Map<String, Value>,
    path: &str,
    root: bool,
    out: &mut Vec<String>,
) {
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let keys: Vec<String> = m.keys().cloned().collect();
    for k in keys {
        if root && ROOT_FIELDS.contains(&k.as_str()) {
            continue;
        }
        let sub = props
            .and_then(|p| p.get(&k))
            .or_else(|| additional.filter(|a| a.is_object()));
        match sub {
            Some(s) => {
                if m[&k].is_null() && !flag(s, "nullable") {
                    m.remove(&k);
                    continue;
                }
                prune_at(
                    s,
                    m.get_mut(&k).expect("key present"),
                    &child(path, &k),
                    false,
                    out,
                );
            }
            None if preserve || additional.is_some_and(|a| a == &Value::Bool(true)) => {}
            None => {
                m.remove(&k);
                out.push(child(path, &k));
            }
        }
    }
}

/// Validates a pruned object against its schema; an empty list means valid.
pub fn validate(schema: &Value, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    validate_at(schema, obj, "", true, &mut errs);
    errs
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(path: &str, v: &Value, want: &str) -> FieldError {
    let got = json_type(v);
    FieldError::invalid(
        path,
        got,
        format!("{path} in body must be of type {want}: {got:?}"),
    )
}

fn validate_at(schema: &Value, v: &Value, path: &str, root: bool, errs: &mut Vec<FieldError>) {
    if v.is_null() {
        if !flag(schema, "nullable") && schema.get("type").is_some() {
            errs.push(FieldError::invalid(
                path,
                "null",
                format!(
                    "{path} in body must be of type {}: \"null\"",
                    schema["type"].as_str().unwrap_or_default()
                ),
            ));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !matches!(json_type(v), "integer" | "string") {
            errs.push(type_error(path, v, "integer,string"));
            return;
        }
    } else if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let got = json_type(v);
        let ok = got == want || (want == "number" && got == "integer");
        if !ok {
            errs.push(type_error(path, v, want));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errs.push(FieldError::not_supported(path, v, allowed));
    }
    match v {
        Value::String(s) => validate_string(schema, s, v, path, errs),
        Value::Number(n) => validate_number(schema, n, v, path, errs),
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                errs.push(FieldError::invalid_json(
                    path,
                    &Value::from(n),
                    format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                errs.push(FieldError::invalid_json(
                    path,
                    &Value::from(n),
                    format!("{path} in body should have at most {max} items"),
                ));
            }
            if let Some(s) = schema.get("items") {
                for (i, it) in items.iter().enumerate() {
                    validate_at(s, it, &format!("{path}[{i}]"), false, errs);
                }
            }
        }
        Value::Object(m) => {
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !m.contains_key(req) {
                    errs.push(FieldError::required(child(path, req), ""));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, val) in m {
                if root && ROOT_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)).or(additional) {
                    validate_at(s, val, &child(path, k), false, errs);
                }
            }
        }
        _ => {}
    }
}

fn validate_string(schema: &Value, s: &str, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let len = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        errs.push(FieldError::invalid_json(
            path,
            v,
            format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        errs.push(FieldError::invalid_json(
            path,
            v,
            format!("{path} in body should be at most {max} chars long"),
        ));
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(p) {
            Ok(re) if !re.is_match(s) => errs.push(FieldError::invalid_json(
                path,
                v,
                format!("{path} in body should match '{p}'"),
            )),
            Ok(_) => {}
            // The CRD's own validation refuses bad patterns; one that slipped through
            // (written through the store) cannot match anything.
            Err(_) => errs.push(FieldError::invalid_json(
                path,
                v,
                format!("{path} in body should match '{p}'"),
            )),
        }
    }
}

fn validate_number(
    schema: &Value,
    n: &serde_json::Number,
    v: &Value,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    let x = n.as_f64().unwrap_or(0.0);
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        let excl = flag(schema, "exclusiveMinimum");
        if (excl && x <= min) || (!excl && x < min) {
            let op = if excl {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errs.push(FieldError::invalid_json(
                path,
                v,
                format!("{path} in body should be {op} {}", schema["minimum"]),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        let excl = flag(schema, "exclusiveMaximum");
        if (excl && x >= max) || (!excl && x > max) {
            let op = if excl {
                "less than"
            } else {
                "less than or equal to"
            };
            errs.push(FieldError::invalid_json(
                path,
                v,
                format!("{path} in body should be {op} {}", schema["maximum"]),
            ));
        }
    }
    let fits = match schema.get("format").and_then(Value::as_str) {
        Some("int32") => Some((
            "int32",
            n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
        )),
        Some("int64") => Some(("int64", n.as_i64().is_some())),
        _ => None,
    };
    if let Some((fmt, false)) = fits {
        errs.push(FieldError::invalid_json(
            path,
            v,
            format!("{path} in body must be of type {fmt}: \"{n}\""),
        ));
    }
}

/// Problems of a schema itself that make it non-structural (kube-apiserver refuses such
/// CRDs): every specified field needs a `type`, unless it preserves unknown fields or is
/// int-or-string. `path` is the schema's field path in the CRD.
pub fn structural_errors(schema: &Value, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    structural_at(schema, path, true, &mut errs);
    errs
}

fn structural_at(schema: &Value, path: &str, root: bool, errs: &mut Vec<FieldError>) {
    let Some(m) = schema.as_object() else {
        errs.push(FieldError::invalid(path, "", "must be an object"));
        return;
    };
    let typed = m
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    if !typed
        && !flag(schema, "x-kubernetes-preserve-unknown-fields")
        && !flag(schema, "x-kubernetes-int-or-string")
    {
        errs.push(FieldError::required(
            format!("{path}.type"),
            if root {
                "must not be empty at the root"
            } else {
                "must not be empty for specified object fields"
            },
        ));
    }
    if let Some(t) = m.get("type").and_then(Value::as_str)
        && !matches!(
            t,
            "object" | "array" | "string" | "integer" | "number" | "boolean"
        )
    {
        errs.push(FieldError::not_supported(
            format!("{path}.type"),
            &Value::from(t),
            &["array", "boolean", "integer", "number", "object", "string"].map(Value::from),
        ));
    }
    if let Some(p) = m.get("pattern").and_then(Value::as_str)
        && regex::Regex::new(p).is_err()
    {
        errs.push(FieldError::invalid(
            format!("{path}.pattern"),
            p,
            "must be a valid regular expression",
        ));
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        for (k, s) in props {
            structural_at(s, &format!("{path}.properties[{k}]"), false, errs);
        }
    }
    if let Some(s) = m.get("items") {
        structural_at(s, &format!("{path}.items"), false, errs);
    }
    if let Some(s) = m.get("additionalProperties").filter(|a| a.is_object()) {
        structural_at(s, &format!("{path}.additionalProperties"), false, errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 10, "format": "int32"},
                        "color": {"type": "string", "enum": ["red", "blue"]},
                        "name": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
                        "port": {"x-kubernetes-int-or-string": true},
                        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "maybe": {"type": "string", "nullable": true},
                        "gone": {"type": "string"},
                    },
                },
                "status": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
            },
        })
    }

    #[test]
    fn prunes_unknown_fields_and_nulls() {
        let mut o = json!({
            "apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a"},
            "spec": {"size": 1, "bogus": 1, "free": {"anything": [1]}, "labels": {"k": "v"},
                     "maybe": null, "gone": null, "tags": ["a"]},
            "extra": true,
        });
        let pruned = prune(&schema(), &mut o);
        assert_eq!(pruned, ["extra", "spec.bogus"]);
        assert_eq!(o["spec"]["free"]["anything"], json!([1]));
        assert_eq!(o["spec"]["labels"]["k"], "v");
        assert!(o["spec"]["maybe"].is_null() && o["spec"].get("maybe").is_some());
        assert!(
            o["spec"].get("gone").is_none(),
            "null of a non-nullable field is pruned"
        );
        assert_eq!(o["metadata"]["name"], "a");
        assert!(validate(&schema(), &o).is_empty());
    }

    #[test]
    fn errors_are_worded_as_kube_apiserver() {
        let o = json!({"spec": {"size": "big", "color": "pink", "name": "ABCDEFG", "port": true,
            "tags": ["a", "b", 3], "labels": {"k": 1}}});
        let msgs: Vec<String> = validate(&schema(), &o)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            msgs,
            [
                "spec.color: Unsupported value: \"pink\": supported values: \"red\", \"blue\"",
                "spec.labels.k: Invalid value: \"integer\": spec.labels.k in body must be of type string: \"integer\"",
                "spec.name: Invalid value: \"ABCDEFG\": spec.name in body should be at most 5 chars long",
                "spec.name: Invalid value: \"ABCDEFG\": spec.name in body should match '^[a-z]+$'",
                "spec.port: Invalid value: \"boolean\": spec.port in body must be of type integer,string: \"boolean\"",
                "spec.size: Invalid value: \"string\": spec.size in body must be of type integer: \"string\"",
                "spec.tags: Invalid value: 3: spec.tags in body should have at most 2 items",
                "spec.tags[2]: Invalid value: \"integer\": spec.tags[2] in body must be of type string: \"integer\"",
            ]
        );
        let msgs: Vec<String> = validate(&schema(), &json!({"spec": {"size": 0}}))
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            msgs,
            ["spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"]
        );
        let msgs: Vec<String> = validate(&schema(), &json!({"spec": {"port": 80}}))
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(msgs, ["spec.size: Required value"]);
        let e = validate(&schema(), &json!({"spec": {"size": 5_000_000_000u64}}));
        assert!(
            e.iter()
                .any(|e| e.to_string().contains("must be of type int32"))
        );
    }

    #[test]
    fn structural_schema_checks() {
        let bad = json!({"type": "object", "properties": {"spec": {"properties": {}}, "x": {"type": "strin"}}});
        let msgs: Vec<String> = structural_errors(&bad, "spec.versions[0].schema.openAPIV3Schema")
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].starts_with(
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].type: Required value"
        ));
        assert!(structural_errors(&schema(), "s").is_empty());
    }
}
