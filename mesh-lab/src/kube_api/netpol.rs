//! `networking.k8s.io/v1 NetworkPolicy`: the defaults and the validation kube-apiserver
//! applies (`SetDefaults_NetworkPolicy`, `ValidateNetworkPolicySpec`), with its field paths
//! and wording.

use ipnet::IpNet;
use serde_json::{Value, json};

use super::error::{ApiError, FieldError, Result};
use super::resources::ResourceType;

const DIRECTIONS: [(&str, &str); 2] = [("ingress", "from"), ("egress", "to")];

/// Defaults and validates a NetworkPolicy being written.
pub(crate) fn prepare(rt: &ResourceType, name: &str, obj: &mut Value) -> Result<()> {
    default(obj);
    let errs = validate(obj);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(rt, name, errs))
    }
}

fn default(obj: &mut Value) {
    if !obj.get("spec").is_some_and(Value::is_object) {
        obj["spec"] = json!({});
    }
    let spec = &mut obj["spec"];
    if spec.get("podSelector").is_none_or(Value::is_null) {
        spec["podSelector"] = json!({});
    }
    for (dir, _) in DIRECTIONS {
        for rule in spec
            .get_mut(dir)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            for port in rule
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(p) = port.as_object_mut()
                    && p.get("protocol").is_none_or(Value::is_null)
                {
                    p.insert("protocol".into(), json!("TCP"));
                }
            }
        }
    }
    // No policyTypes: Ingress always, Egress when egress rules are given.
    if spec
        .get("policyTypes")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        let mut types = vec![json!("Ingress")];
        if spec.get("egress").and_then(Value::as_array).is_some() {
            types.push(json!("Egress"));
        }
        spec["policyTypes"] = json!(types);
    }
}

fn validate(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    validate_selector(&spec["podSelector"], "spec.podSelector", &mut errs);
    for (dir, peers_key) in DIRECTIONS {
        let Some(rules) = spec.get(dir).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(rules) = rules.as_array() else {
            errs.push(type_error(&format!("spec.{dir}"), rules, "array"));
            continue;
        };
        for (i, rule) in rules.iter().enumerate() {
            let path = format!("spec.{dir}[{i}]");
            for (j, port) in arr(rule, "ports").iter().enumerate() {
                validate_port(port, &format!("{path}.ports[{j}]"), &mut errs);
            }
            for (j, peer) in arr(rule, peers_key).iter().enumerate() {
                validate_peer(peer, &format!("{path}.{peers_key}[{j}]"), &mut errs);
            }
        }
    }
    let types = arr(spec, "policyTypes");
    if types.len() > 2 {
        errs.push(FieldError::invalid_json(
            "spec.policyTypes",
            &json!(types),
            "may not specify more than two policyTypes",
        ));
        return errs;
    }
    for (i, t) in types.iter().enumerate() {
        if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
            errs.push(FieldError::not_supported(
                format!("spec.policyTypes[{i}]"),
                t,
                &[json!("Ingress"), json!("Egress")],
            ));
        }
    }
    errs
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn type_error(path: &str, v: &Value, want: &str) -> FieldError {
    FieldError::invalid_json(path, v, format!("must be of type {want}"))
}

fn valid_port_num(path: String, v: &Value, n: i64, errs: &mut Vec<FieldError>) {
    if !(1..=65535).contains(&n) {
        errs.push(FieldError::invalid_json(
            path,
            v,
            "must be between 1 and 65535, inclusive",
        ));
    }
}

/// `IsValidPortName`: an IANA service name.
fn port_name_errors(name: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    if name.is_empty() || name.len() > 15 {
        out.push("must be no more than 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        out.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        out.push("must contain at least one letter (a-z)");
    }
    if name.contains("--") {
        out.push("must not contain consecutive hyphens");
    }
    if name.starts_with('-') || name.ends_with('-') {
        out.push("must not begin or end with a hyphen");
    }
    out
}

fn validate_port(port: &Value, path: &str, errs: &mut Vec<FieldError>) {
    if let Some(proto) = port.get("protocol")
        && !matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP"))
    {
        errs.push(FieldError::not_supported(
            format!("{path}.protocol"),
            proto,
            &[json!("TCP"), json!("UDP"), json!("SCTP")],
        ));
    }
    let end = port.get("endPort").filter(|v| !v.is_null());
    match port.get("port").filter(|v| !v.is_null()) {
        Some(p @ Value::Number(n)) => {
            valid_port_num(format!("{path}.port"), p, n.as_i64().unwrap_or(0), errs);
            if let Some(e) = end {
                match e.as_i64() {
                    Some(ev) => {
                        if ev < n.as_i64().unwrap_or(0) {
                            errs.push(FieldError::invalid_json(
                                format!("{path}.endPort"),
                                p,
                                "must be greater than or equal to `port`",
                            ));
                        }
                        valid_port_num(format!("{path}.endPort"), e, ev, errs);
                    }
                    None => errs.push(type_error(&format!("{path}.endPort"), e, "integer")),
                }
            }
        }
        Some(Value::String(name)) => {
            if let Some(e) = end {
                errs.push(FieldError::invalid_json(
                    format!("{path}.endPort"),
                    e,
                    "may not be specified when `port` is non-numeric",
                ));
            }
            for msg in port_name_errors(name) {
                errs.push(FieldError::invalid(format!("{path}.port"), name, msg));
            }
        }
        Some(other) => errs.push(FieldError::invalid_json(
            format!("{path}.port"),
            other,
            "must be an integer or a string (a port number or a named port)",
        )),
        None => {
            if let Some(e) = end {
                errs.push(FieldError::invalid_json(
                    format!("{path}.endPort"),
                    e,
                    "may not be specified when `port` is not specified",
                ));
            }
        }
    }
}

fn validate_peer(peer: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let mut n = 0;
    for key in ["podSelector", "namespaceSelector"] {
        if let Some(sel) = peer.get(key).filter(|v| !v.is_null()) {
            n += 1;
            validate_selector(sel, &format!("{path}.{key}"), errs);
        }
    }
    let ip_block = peer.get("ipBlock").filter(|v| !v.is_null());
    if let Some(b) = ip_block {
        n += 1;
        validate_ip_block(b, &format!("{path}.ipBlock"), errs);
    }
    if n == 0 {
        errs.push(FieldError::required(path, "must specify a peer"));
    } else if n > 1 && ip_block.is_some() {
        errs.push(FieldError::forbidden(
            path,
            "may not specify both ipBlock and another peer",
        ));
    }
}

const CIDR_DETAIL: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";

fn validate_ip_block(b: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let cidr = b.get("cidr").and_then(Value::as_str).unwrap_or_default();
    if cidr.is_empty() {
        errs.push(FieldError::required(format!("{path}.cidr"), ""));
        return;
    }
    let Ok(net) = cidr.parse::<IpNet>() else {
        errs.push(FieldError::invalid(
            format!("{path}.cidr"),
            cidr,
            CIDR_DETAIL,
        ));
        return;
    };
    for (i, ex) in arr(b, "except").iter().enumerate() {
        let ep = format!("{path}.except[{i}]");
        let s = ex.as_str().unwrap_or_default();
        let Ok(exn) = s.parse::<IpNet>() else {
            errs.push(FieldError::invalid(ep, s, CIDR_DETAIL));
            continue;
        };
        if !net.contains(&exn.network()) || net.prefix_len() >= exn.prefix_len() {
            errs.push(FieldError::invalid(
                ep,
                s,
                "must be a strict subset of `cidr`",
            ));
        }
    }
}

/// `ValidateLabelSelector`: operators and their values.
fn validate_selector(sel: &Value, path: &str, errs: &mut Vec<FieldError>) {
    if sel.is_null() {
        return;
    }
    if !sel.is_object() {
        errs.push(type_error(path, sel, "object"));
        return;
    }
    for (i, e) in arr(sel, "matchExpressions").iter().enumerate() {
        let ep = format!("{path}.matchExpressions[{i}]");
        let values = arr(e, "values");
        match e
            .get("operator")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "In" | "NotIn" => {
                if values.is_empty() {
                    errs.push(FieldError::required(
                        format!("{ep}.values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    ));
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    errs.push(FieldError::forbidden(
                        format!("{ep}.values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    ));
                }
            }
            other => errs.push(FieldError::invalid(
                format!("{ep}.operator"),
                other,
                "not a valid selector operator",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::resources as r;

    fn msgs(spec: Value) -> String {
        let mut o = json!({"metadata": {"name": "p"}, "spec": spec});
        match prepare(&r::NETWORKPOLICIES, "p", &mut o) {
            Ok(()) => String::new(),
            Err(e) => e.message,
        }
    }

    #[test]
    fn defaults() {
        let mut o =
            json!({"metadata": {"name": "p"}, "spec": {"egress": [{"ports": [{"port": 53}]}]}});
        prepare(&r::NETWORKPOLICIES, "p", &mut o).unwrap();
        assert_eq!(o["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(o["spec"]["podSelector"], json!({}));
        assert_eq!(o["spec"]["egress"][0]["ports"][0]["protocol"], "TCP");
    }

    #[test]
    fn errors_name_the_field() {
        for (spec, want) in [
            (
                json!({"ingress": [{"ports": [{"port": true}]}]}),
                "spec.ingress[0].ports[0].port: Invalid value: true: must be an integer or a string",
            ),
            (
                json!({"ingress": [{"ports": [{"endPort": 90}]}]}),
                "spec.ingress[0].ports[0].endPort: Invalid value: 90: may not be specified when `port` is not specified",
            ),
            (
                json!({"egress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "spec.egress[0].ports[0].endPort: Invalid value: 90: must be greater than or equal to `port`",
            ),
            (
                json!({"egress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
                "spec.egress[0].ports[0].endPort: Invalid value: 80: may not be specified when `port` is non-numeric",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 70000}]}]}),
                "spec.ingress[0].ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
                "spec.ingress[0].ports[0].protocol: Unsupported value: \"ICMP\": supported values: \"TCP\", \"UDP\", \"SCTP\"",
            ),
            (
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
                "spec.egress[0].to[0].ipBlock.cidr: Invalid value: \"10.0.0.0/33\": must be a valid CIDR value",
            ),
            (
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
                "spec.egress[0].to[0].ipBlock.except[0]: Invalid value: \"11.0.0.0/16\": must be a strict subset of `cidr`",
            ),
            (
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "spec.egress[0].to[0]: Forbidden: may not specify both ipBlock and another peer",
            ),
            (
                json!({"ingress": [{"from": [{}]}]}),
                "spec.ingress[0].from[0]: Required value: must specify a peer",
            ),
            (
                json!({"policyTypes": ["Ingress", "Sideways"]}),
                "spec.policyTypes[1]: Unsupported value: \"Sideways\": supported values: \"Ingress\", \"Egress\"",
            ),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
                "spec.podSelector.matchExpressions[0].values: Required value",
            ),
        ] {
            let got = msgs(spec.clone());
            assert!(got.contains(want), "{spec}: want {want:?} in {got:?}");
            assert!(
                got.starts_with("NetworkPolicy.networking.k8s.io \"p\" is invalid: "),
                "{got}"
            );
        }
        assert_eq!(
            msgs(json!({"podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}},
                                      {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                             "ports": [{"port": 80, "endPort": 90}, {"port": "http", "protocol": "UDP"}]}]})),
            ""
        );
    }
}
