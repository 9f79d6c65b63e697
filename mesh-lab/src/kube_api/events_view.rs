//! `events.k8s.io/v1 Event` is a view of the core `v1 Event`, as in the real server: both are
//! one stored object, so events published by kube-rs' `Recorder` (events.k8s.io) show up in
//! `kubectl get events` and `kubectl describe` (core), and the other way round.

use serde_json::{Map, Value, json};

use super::error::{ApiError, Result};

/// (core field, events.k8s.io field); every other field keeps its name.
const FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename(obj: &Value, api_version: &str, to_v1: bool) -> Value {
    let Some(m) = obj.as_object() else {
        return obj.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        let renamed = FIELDS.iter().find_map(|(core, v1)| {
            if to_v1 && k == core {
                Some(*v1)
            } else if !to_v1 && k == v1 {
                Some(*core)
            } else {
                None
            }
        });
        out.insert(renamed.unwrap_or(k).to_string(), v.clone());
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    Value::Object(out)
}

/// Stored core event -> `events.k8s.io/v1`.
pub fn to_v1(core: &Value) -> Value {
    rename(core, "events.k8s.io/v1", true)
}

/// `events.k8s.io/v1` body -> core event for storage.
pub fn to_core(v1: &Value) -> Result<Value> {
    if !v1.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be an Event object",
        ));
    }
    if let Some(av) = v1.get("apiVersion").and_then(Value::as_str)
        && av != "events.k8s.io/v1"
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version (events.k8s.io/v1)"
        )));
    }
    if let Some(k) = v1.get("kind").and_then(Value::as_str)
        && k != "Event"
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind (Event)"
        )));
    }
    Ok(rename(v1, "v1", false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Service", "name": "web"}, "note": "bad", "reason": "R",
            "reportingController": "mesh", "series": {"count": 2}});
        let core = to_core(&v1).unwrap();
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "web");
        assert_eq!(core["message"], "bad");
        assert_eq!(core["reportingComponent"], "mesh");
        assert!(core.get("note").is_none());
        assert_eq!(to_v1(&core), v1);
        assert_eq!(to_core(&json!({"kind": "Pod"})).unwrap_err().code, 400);
    }
}
