//! CustomResourceDefinitions: a CRD object is data that becomes served resource types.
//!
//! On every write of a CRD the store checks it as kube-apiserver does, defaults it, sets its
//! status (`acceptedNames`, the `NamesAccepted` and `Established` conditions,
//! `storedVersions`) and rebuilds the [`Registry`] entry of the CRD: one [`ResourceType`]
//! per served version, all sharing one storage id, so an object written through one version
//! is read through any other (conversion strategy `None`: only `apiVersion` changes).
//! Custom objects are pruned and validated against the version's `openAPIV3Schema`
//! ([`super::schema`]); tables use the version's `additionalPrinterColumns`.
//!
//! Types made from a CRD live as long as the process: their names are leaked `&'static str`
//! so that custom and built-in types are handled by the same code. A new type is made only
//! when a CRD's `spec` changes (status writes reuse the types), which bounds the leak by the
//! number of CRD spec changes in a lab's life.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::error::{ApiError, FieldError, Result};
use super::resources::{ResourceType, Subresource};
use super::schema;
use super::util;

/// One `additionalPrinterColumns` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub ty: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// What a CRD says about one version of its type.
#[derive(Debug, PartialEq)]
pub struct CustomType {
    /// Shared by every version of the type.
    pub storage_id: usize,
    /// The version objects are stored in.
    pub storage_version: String,
    /// Name of the CRD (`<plural>.<group>`).
    pub crd: String,
    /// The version's `openAPIV3Schema`.
    pub schema: Option<Value>,
    /// The version's `additionalPrinterColumns`; empty: Name and Age.
    pub columns: Vec<PrinterColumn>,
}

/// Storage ids of custom types start here, far above the built-in ones (indices in
/// `resources::ALL`), and are unique in the process.
static NEXT_STORAGE_ID: AtomicUsize = AtomicUsize::new(1 << 16);

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// The custom types of one store, by CRD.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registry {
    /// CRD name -> (the spec the types were made from, the types of its served versions).
    crds: BTreeMap<String, (Value, Vec<&'static ResourceType>)>,
}

// === impl Registry ===

impl Registry {
    /// Every served custom type (each served version of each CRD).
    pub(crate) fn types(&self) -> impl Iterator<Item = &'static ResourceType> + '_ {
        self.crds.values().flat_map(|(_, t)| t.iter().copied())
    }

    /// The type objects of storage id `id` are stored as (the storage version's).
    pub(crate) fn by_storage_id(&self, id: usize) -> Option<&'static ResourceType> {
        self.types().find(|t| {
            t.custom
                .is_some_and(|c| c.storage_id == id && c.storage_version == t.version)
        })
    }

    /// The storage version's type of a CRD, if it has served versions.
    pub(crate) fn storage_type_of(&self, crd: &str) -> Option<&'static ResourceType> {
        let (_, types) = self.crds.get(crd)?;
        let id = types.first()?.custom?.storage_id;
        self.by_storage_id(id)
    }

    /// Brings the CRD's types in line with the stored CRD (`None`: the CRD is gone).
    pub(crate) fn sync(&mut self, name: &str, crd: Option<&Value>) {
        let Some(crd) = crd else {
            if self.crds.remove(name).is_some() {
                tracing::info!(crd = name, "custom resource type removed");
            }
            return;
        };
        let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
        let old_id = match self.crds.get(name) {
            Some((s, _)) if *s == spec => return,
            Some((_, types)) => types.first().and_then(|t| t.custom).map(|c| c.storage_id),
            None => None,
        };
        let id = old_id.unwrap_or_else(|| NEXT_STORAGE_ID.fetch_add(1, Ordering::Relaxed));
        let types = build_types(name, &spec, id);
        tracing::info!(
            crd = name,
            versions = types.len(),
            "custom resource type served"
        );
        self.crds.insert(name.to_string(), (spec, types));
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn strs(v: &Value, ptr: &str) -> &'static [&'static str] {
    let list: Vec<&'static str> = v
        .pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(leak)
        .collect();
    Box::leak(list.into_boxed_slice())
}

fn columns(v: &Value) -> Vec<PrinterColumn> {
    v.get("additionalPrinterColumns")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| PrinterColumn {
            name: s(c, "/name").to_string(),
            ty: s(c, "/type").to_string(),
            format: s(c, "/format").to_string(),
            description: s(c, "/description").to_string(),
            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
            json_path: s(c, "/jsonPath").to_string(),
        })
        .collect()
}

/// One leaked type per served version of a (validated, defaulted) CRD spec.
fn build_types(name: &str, spec: &Value, storage_id: usize) -> Vec<&'static ResourceType> {
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let storage_version = versions
        .iter()
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .map(|v| s(v, "/name").to_string())
        .unwrap_or_default();
    let group = leak(s(spec, "/group"));
    let plural = leak(s(spec, "/names/plural"));
    let singular = leak(s(spec, "/names/singular"));
    let kind = leak(s(spec, "/names/kind"));
    let short_names = strs(spec, "/names/shortNames");
    let categories = strs(spec, "/names/categories");
    let namespaced = s(spec, "/scope") != "Cluster";
    versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool) == Some(true))
        .map(|v| {
            let subresources: &'static [Subresource] =
                if v.pointer("/subresources/status").is_some() {
                    &[Subresource::Status]
                } else {
                    &[]
                };
            let custom: &'static CustomType = Box::leak(Box::new(CustomType {
                storage_id,
                storage_version: storage_version.clone(),
                crd: name.to_string(),
                schema: v.pointer("/schema/openAPIV3Schema").cloned(),
                columns: columns(v),
            }));
            let t: &'static ResourceType = Box::leak(Box::new(ResourceType {
                group,
                version: leak(s(v, "/name")),
                resource: plural,
                singular,
                kind,
                namespaced,
                short_names,
                categories,
                subresources,
                generation: true,
                custom: Some(custom),
            }));
            t
        })
        .collect()
}

/// The status a stored CRD gets: its names accepted and the type established at once (the
/// lab serves the type in the same write that stores the CRD).
fn status(crd: &Value, old: Option<&Value>) -> Value {
    let spec = &crd["spec"];
    let now = util::now_rfc3339();
    let since = |ty: &str| -> String {
        old.and_then(|o| o.pointer("/status/conditions"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|c| c["type"] == ty && c["status"] == "True")
            .and_then(|c| c["lastTransitionTime"].as_str())
            .map(String::from)
            .unwrap_or_else(|| now.clone())
    };
    let mut stored: Vec<Value> = old
        .and_then(|o| o.pointer("/status/storedVersions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["storage"] == true && !stored.contains(&v["name"]) {
            stored.push(v["name"].clone());
        }
    }
    json!({
        "acceptedNames": spec["names"].clone(),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": since("NamesAccepted")},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": since("Established")},
        ],
        "storedVersions": stored,
    })
}

/// Defaults, validates and sets the status of a CRD being written (`old`: the stored one).
pub(crate) fn prepare_crd(rt: &ResourceType, crd: &mut Value, old: Option<&Value>) -> Result<()> {
    let name = s(crd, "/metadata/name").to_string();
    default_crd(crd);
    let errs = validate_crd(crd, old);
    if !errs.is_empty() {
        return Err(ApiError::invalid(rt, &name, errs));
    }
    crd["status"] = status(crd, old);
    Ok(())
}

fn default_crd(crd: &mut Value) {
    let Some(spec) = crd.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    if let Some(names) = spec.get_mut("names").and_then(Value::as_object_mut) {
        let kind = names
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if names
            .get("singular")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            names.insert("singular".into(), json!(kind.to_lowercase()));
        }
        if names
            .get("listKind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            && !kind.is_empty()
        {
            names.insert("listKind".into(), json!(format!("{kind}List")));
        }
    }
    if spec.get("conversion").is_none() {
        spec["conversion"] = json!({"strategy": "None"});
    }
}

fn validate_crd(crd: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &crd["spec"];
    let name = s(crd, "/metadata/name");
    let group = s(spec, "/group");
    let plural = s(spec, "/names/plural");
    if group.is_empty() {
        errs.push(FieldError::required("spec.group", ""));
    } else if !group.contains('.') {
        errs.push(FieldError::invalid(
            "spec.group",
            group,
            "should be a domain with at least one dot",
        ));
    }
    if name != format!("{plural}.{group}") {
        errs.push(FieldError::invalid(
            "metadata.name",
            name,
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match s(spec, "/scope") {
        "" => errs.push(FieldError::required("spec.scope", "")),
        "Cluster" | "Namespaced" => {}
        other => errs.push(FieldError::not_supported(
            "spec.scope",
            &json!(other),
            &[json!("Cluster"), json!("Namespaced")],
        )),
    }
    if let Some(o) = old
        && !s(o, "/spec/scope").is_empty()
        && s(o, "/spec/scope") != s(spec, "/scope")
    {
        errs.push(FieldError::invalid(
            "spec.scope",
            s(spec, "/scope"),
            "field is immutable",
        ));
    }
    for (field, v) in [("plural", plural), ("kind", s(spec, "/names/kind"))] {
        if v.is_empty() {
            errs.push(FieldError::required(format!("spec.names.{field}"), ""));
        }
    }
    if !plural.is_empty() && !super::validate::is_dns_label(plural) {
        errs.push(FieldError::invalid(
            "spec.names.plural",
            plural,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(FieldError::invalid(
            "spec.versions",
            "",
            "must have exactly one version marked as storage version",
        ));
        return errs;
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if storage != 1 {
        errs.push(FieldError::invalid_json(
            "spec.versions",
            &Value::from(storage),
            "must have exactly one version marked as storage version",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, v) in versions.iter().enumerate() {
        let vname = s(v, "/name");
        let path = format!("spec.versions[{i}]");
        if vname.is_empty() {
            errs.push(FieldError::required(format!("{path}.name"), ""));
        } else if !seen.insert(vname) {
            errs.push(FieldError::duplicate(format!("{path}.name"), &json!(vname)));
        }
        match v.pointer("/schema/openAPIV3Schema") {
            None => errs.push(FieldError::required(
                format!("{path}.schema.openAPIV3Schema"),
                "schemas are required",
            )),
            Some(sch) => errs.extend(schema::structural_errors(
                sch,
                &format!("{path}.schema.openAPIV3Schema"),
            )),
        }
        for (j, c) in v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cp = format!("{path}.additionalPrinterColumns[{j}]");
            if s(c, "/name").is_empty() {
                errs.push(FieldError::required(format!("{cp}.name"), ""));
            }
            if s(c, "/jsonPath").is_empty() {
                errs.push(FieldError::required(format!("{cp}.JSONPath"), ""));
            }
            let ty = s(c, "/type");
            if !matches!(ty, "string" | "integer" | "number" | "boolean" | "date") {
                errs.push(FieldError::not_supported(
                    format!("{cp}.type"),
                    &json!(ty),
                    &["boolean", "date", "integer", "number", "string"].map(Value::from),
                ));
            }
        }
    }
    if let Some(sv) = old
        .and_then(|o| o.pointer("/status/storedVersions"))
        .and_then(Value::as_array)
    {
        for (i, stored) in sv.iter().enumerate() {
            if !versions.iter().any(|v| &v["name"] == stored) {
                errs.push(FieldError::invalid(
                    format!("status.storedVersions[{i}]"),
                    stored.as_str().unwrap_or_default(),
                    "must appear in spec.versions",
                ));
            }
        }
    }
    errs
}

/// Prunes and validates a custom object written to the main resource (`create`: a new
/// object, whose status is dropped when the status subresource is enabled, as the real
/// server does).
pub(crate) fn prepare_custom(rt: &ResourceType, obj: &mut Value, create: bool) -> Result<()> {
    if create
        && rt.has_subresource(Subresource::Status)
        && let Some(m) = obj.as_object_mut()
    {
        m.remove("status");
    }
    check_custom(rt, obj)
}

/// Prunes and validates a custom object against its version's schema.
pub(crate) fn check_custom(rt: &ResourceType, obj: &mut Value) -> Result<()> {
    let Some(schema) = rt.custom.and_then(|c| c.schema.as_ref()) else {
        return Ok(());
    };
    schema::prune(schema, obj);
    let errs = schema::validate(schema, obj);
    if errs.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(rt, s(obj, "/metadata/name"), errs))
}

/// The fields of a request body the type's schema does not declare, for
/// `fieldValidation=Strict` (an error) and `Warn` (warnings).
pub(crate) fn unknown_fields(rt: &ResourceType, body: &Value) -> Vec<String> {
    let Some(schema) = rt.custom.and_then(|c| c.schema.as_ref()) else {
        return Vec::new();
    };
    let mut copy = body.clone();
    schema::prune(schema, &mut copy)
}

/// Evaluates the JSONPath of a printer column (`.spec.x`, `.a[0].b`,
/// `.status.conditions[?(@.type=="Ready")].status`): the values found.
pub(crate) fn json_path<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut cur: Vec<&Value> = vec![obj];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            cur = cur.into_iter().filter_map(|v| v.get(key)).collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Vec::new();
            };
            let sel = &r[..end];
            rest = &r[end + 1..];
            cur = cur.into_iter().flat_map(|v| select(v, sel)).collect();
        } else {
            return Vec::new();
        }
    }
    cur
}

fn select<'a>(v: &'a Value, sel: &str) -> Vec<&'a Value> {
    let Some(items) = v.as_array() else {
        return Vec::new();
    };
    if sel == "*" {
        return items.iter().collect();
    }
    if let Ok(i) = sel.parse::<i64>() {
        let idx = if i < 0 { items.len() as i64 + i } else { i };
        return usize::try_from(idx)
            .ok()
            .and_then(|i| items.get(i))
            .into_iter()
            .collect();
    }
    // ?(@.key=="value") or ?(@.key=='value')
    let Some(f) = sel.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) else {
        return Vec::new();
    };
    let Some((key, want)) = f.split_once("==") else {
        return items.iter().filter(|it| it.get(f).is_some()).collect();
    };
    let want = want.trim().trim_matches(['"', '\'']);
    items
        .iter()
        .filter(|it| match it.get(key.trim()) {
            Some(Value::String(s)) => s == want,
            // Numbers and booleans compare by their JSON text (`@.port==80`).
            Some(other) => serde_json::to_string(other).is_ok_and(|t| t == want),
            None => false,
        })
        .collect()
}

/// A table cell of a printer column, as kube-apiserver renders it (dates as ages).
pub(crate) fn cell(col: &PrinterColumn, obj: &Value) -> Value {
    let found = json_path(obj, &col.json_path);
    let Some(first) = found.first() else {
        return Value::Null;
    };
    match (col.ty.as_str(), first) {
        ("date", Value::String(t)) => json!(util::age(Some(t))),
        (_, Value::String(_) | Value::Number(_) | Value::Bool(_)) if found.len() == 1 => {
            (*first).clone()
        }
        _ => {
            let parts: Vec<String> = found
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            json!(parts.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        let o = json!({"spec": {"a": [{"b": 1}, {"b": 2}]},
            "status": {"conditions": [{"type": "Valid", "status": "True"}, {"type": "X", "status": "False"}]}});
        assert_eq!(json_path(&o, ".spec.a[1].b"), [&json!(2)]);
        assert_eq!(json_path(&o, ".spec.a[*].b").len(), 2);
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type=='Valid')].status"),
            [&json!("True")]
        );
        assert_eq!(
            json_path(&o, "{.status.conditions[?(@.type==\"X\")].status}"),
            [&json!("False")]
        );
        assert!(json_path(&o, ".spec.nope").is_empty());
    }

    #[test]
    fn crd_validation_names_the_fields() {
        let rt = &super::super::resources::CRDS;
        let mut bad = json!({"metadata": {"name": "widgets.example"},
            "spec": {"group": "example", "scope": "Galaxy", "names": {"plural": "widgets"},
                     "versions": [{"name": "v1", "served": true, "storage": false}]}});
        let e = prepare_crd(rt, &mut bad, None).unwrap_err();
        assert_eq!(e.code, 422);
        for want in [
            "spec.group: Invalid value: \"example\": should be a domain with at least one dot",
            "spec.scope: Unsupported value: \"Galaxy\": supported values: \"Cluster\", \"Namespaced\"",
            "spec.names.kind: Required value",
            "spec.versions: Invalid value: 0: must have exactly one version marked as storage version",
            "spec.versions[0].schema.openAPIV3Schema: Required value: schemas are required",
        ] {
            assert!(e.message.contains(want), "{want} not in {}", e.message);
        }
        let mut good = json!({"metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced", "names": {"plural": "widgets", "kind": "Widget"},
                     "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
        prepare_crd(rt, &mut good, None).unwrap();
        assert_eq!(good["spec"]["names"]["singular"], "widget");
        assert_eq!(good["status"]["acceptedNames"]["listKind"], "WidgetList");
        assert_eq!(good["status"]["conditions"][1]["type"], "Established");
        assert_eq!(good["status"]["storedVersions"], json!(["v1"]));
        let mut reg = Registry::default();
        reg.sync("widgets.example.com", Some(&good));
        let t: Vec<_> = reg.types().collect();
        assert_eq!((t.len(), t[0].kind, t[0].namespaced), (1, "Widget", true));
        let id = t[0].custom.unwrap().storage_id;
        reg.sync("widgets.example.com", Some(&good));
        assert!(
            std::ptr::eq(reg.types().next().unwrap(), t[0]),
            "same spec: same type"
        );
        assert!(std::ptr::eq(reg.by_storage_id(id).unwrap(), t[0]));
        reg.sync("widgets.example.com", None);
        assert_eq!(reg.types().count(), 0);
    }
}
