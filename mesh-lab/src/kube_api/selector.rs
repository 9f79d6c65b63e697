//! Label and field selectors, as in `?labelSelector=` and `?fieldSelector=`.

use std::collections::BTreeSet;

use serde_json::Value;

use super::error::{ApiError, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

/// A parsed field selector: `path=value` / `path!=value` terms on the object's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// A label value as Kubernetes validates it (`IsValidLabelValue`): empty, or at most 63
/// characters, alphanumeric at both ends, `-`, `_`, `.` inside. kube-apiserver refuses a
/// selector with any other value, and so the canonical form
/// ([`LabelSelector::to_string_form`]) always parses back to the same selector.
fn valid_value(v: &str) -> bool {
    let inner_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    v.is_empty()
        || (v.len() <= 63
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars().all(inner_ok))
}

fn bad_label(s: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: invalid label selector {s:?}: {why}"
    ))
}

// === impl LabelSelector ===

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            reqs.push(Self::parse_term(term).map_err(|why| bad_label(s, &why))?);
        }
        Ok(LabelSelector(reqs))
    }

    fn parse_term(t: &str) -> std::result::Result<LabelReq, String> {
        let set = |rest: &str| -> std::result::Result<BTreeSet<String>, String> {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("expected a parenthesised set in {t:?}"))?;
            let values: BTreeSet<String> = inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if values.is_empty() {
                return Err(format!(
                    "for 'in', 'notin' operators, values set can't be empty in {t:?}"
                ));
            }
            if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
                return Err(format!("invalid label value {bad:?}"));
            }
            Ok(values)
        };
        let value_of = |v: &str| -> std::result::Result<String, String> {
            let v = v.trim();
            if valid_value(v) {
                Ok(v.into())
            } else {
                Err(format!("invalid label value {v:?}"))
            }
        };
        if let Some(k) = t.strip_prefix('!') {
            let k = k.trim();
            return if valid_key(k) {
                Ok(LabelReq::NotExists(k.into()))
            } else {
                Err(format!("invalid key {k:?}"))
            };
        }
        let key_of = |k: &str| -> std::result::Result<String, String> {
            let k = k.trim();
            if valid_key(k) {
                Ok(k.into())
            } else {
                Err(format!("invalid key {k:?}"))
            }
        };
        if let Some((k, v)) = t.split_once("!=") {
            return Ok(LabelReq::NotEq(key_of(k)?, value_of(v)?));
        }
        if let Some((k, v)) = t.split_once("==") {
            return Ok(LabelReq::Eq(key_of(k)?, value_of(v)?));
        }
        if let Some((k, v)) = t.split_once('=') {
            return Ok(LabelReq::Eq(key_of(k)?, value_of(v)?));
        }
        if let Some((k, rest)) = t.split_once(" notin ") {
            return Ok(LabelReq::NotIn(key_of(k)?, set(rest)?));
        }
        if let Some((k, rest)) = t.split_once(" in ") {
            return Ok(LabelReq::In(key_of(k)?, set(rest)?));
        }
        Ok(LabelReq::Exists(key_of(t)?))
    }

    /// `matchLabels` / `matchExpressions` of a `metav1.LabelSelector` object.
    pub fn from_object(sel: &Value) -> Self {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(LabelReq::Eq(
                    k.clone(),
                    v.as_str().unwrap_or_default().into(),
                ));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or_default().to_string();
                let values: BTreeSet<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                reqs.push(match e["operator"].as_str().unwrap_or_default() {
                    "In" => LabelReq::In(key, values),
                    "NotIn" => LabelReq::NotIn(key, values),
                    "DoesNotExist" => LabelReq::NotExists(key),
                    _ => LabelReq::Exists(key),
                });
            }
        }
        LabelSelector(reqs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` match.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.contains(x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }

    /// The canonical string form (`a=b,c in (d,e)`), as `Scale.status.selector` carries it.
    pub fn to_string_form(&self) -> String {
        self.0
            .iter()
            .map(|r| match r {
                LabelReq::Eq(k, v) => format!("{k}={v}"),
                LabelReq::NotEq(k, v) => format!("{k}!={v}"),
                LabelReq::In(k, vs) => format!(
                    "{k} in ({})",
                    vs.iter().cloned().collect::<Vec<_>>().join(",")
                ),
                LabelReq::NotIn(k, vs) => {
                    format!(
                        "{k} notin ({})",
                        vs.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                }
                LabelReq::Exists(k) => k.clone(),
                LabelReq::NotExists(k) => format!("!{k}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

// === impl FieldSelector ===

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self> {
        let mut terms = Vec::new();
        for t in split_terms(s) {
            let (path, neg, value) = if let Some((p, v)) = t.split_once("!=") {
                (p, true, v)
            } else if let Some((p, v)) = t.split_once("==") {
                (p, false, v)
            } else if let Some((p, v)) = t.split_once('=') {
                (p, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {s:?}: {t:?} is not of the form field=value"
                )));
            };
            let path = path.trim();
            if path.is_empty() || !path.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {s:?}: bad field {path:?}"
                )));
            }
            terms.push((path.to_string(), neg, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares the field at each dotted path as a string; a missing field is `""`.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, neg, want)| {
            let mut v = obj;
            let mut found = true;
            for seg in path.split('.') {
                match v.get(seg) {
                    Some(x) => v = x,
                    None => {
                        found = false;
                        break;
                    }
                }
            }
            let have = if !found {
                String::new()
            } else {
                match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                }
            };
            (have == *want) != *neg
        })
    }

    /// The value required for `metadata.name` by an `=` term, if any.
    pub fn name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(p, neg, _)| p == "metadata.name" && !neg)
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_match() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}});
        let yes = [
            "",
            "app=web",
            "app==web",
            "app",
            "!missing",
            "tier in (fe,be)",
            "app=web,tier notin (be)",
            "app!=db",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        let no = [
            "app=db",
            "missing",
            "!app",
            "tier in (be)",
            "tier notin (fe, be)",
            "app!=web",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        assert_eq!(LabelSelector::parse("a b c").unwrap_err().code, 400);
        let sel = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"}}));
        assert!(sel.matches(&o));
        assert_eq!(sel.to_string_form(), "app=web");
    }

    /// Found by fuzzing (the `lab_selector` target's round trip through
    /// `to_string_form`): values were not validated, so `a=(x,b` or `a in ((x),y)` were
    /// accepted with values Kubernetes refuses, and some did not read back the same.
    #[test]
    fn label_values_are_validated_as_kubernetes_does() {
        for bad in [
            "a=(x,b",
            "a in ((x),y)",
            "a=b c",
            "a!=-x",
            "a in ()",
            "a notin ( , )",
            "a=x.",
            &format!("a={}", "x".repeat(64)),
        ] {
            let e = LabelSelector::parse(bad).unwrap_err();
            assert_eq!(e.code, 400, "{bad}");
        }
        for good in [
            "a=",
            "a=x",
            "a==x-y_z.0",
            "a in (x, y.z)",
            &format!("a={}", "x".repeat(63)),
        ] {
            let sel = LabelSelector::parse(good).unwrap();
            assert_eq!(
                LabelSelector::parse(&sel.to_string_form()).unwrap(),
                sel,
                "{good}"
            );
        }
    }

    #[test]
    fn field_selectors_match() {
        let o = json!({"metadata": {"name": "a", "namespace": "n"}, "spec": {"nodeName": "x", "replicas": 2}});
        for s in [
            "metadata.name=a",
            "metadata.namespace==n,spec.nodeName=x",
            "metadata.name!=b",
            "spec.replicas=2",
            "status.phase=",
        ] {
            assert!(FieldSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        for s in ["metadata.name=b", "spec.nodeName!=x"] {
            assert!(!FieldSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        assert_eq!(
            FieldSelector::parse("metadata.name=a").unwrap().name(),
            Some("a")
        );
        assert_eq!(FieldSelector::parse("nonsense").unwrap_err().code, 400);
    }
}
