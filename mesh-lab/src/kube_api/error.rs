//! Errors of the Kubernetes-compatible API, each one a `Status` as the real kube-apiserver
//! returns it (code, reason, message naming the object, details).

use serde_json::{Value, json};

use super::resources::ResourceType;

/// Result alias of this module.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// A failed API call: maps one to one onto a `meta.k8s.io/v1 Status`.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// `metadata.continue` of the Status: the token a client may continue an expired paged
    /// list with (410 for a compacted continue token, as kube-apiserver answers).
    pub continue_token: Option<String>,
}

// === impl ApiError ===

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            continue_token: None,
        }
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        let mut d = json!({ "name": name, "kind": rt.resource });
        if !rt.group.is_empty() {
            d["group"] = json!(rt.group);
        }
        self.details = Some(d);
        self
    }

    /// `services "web" not found`.
    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified()),
        )
        .with_details(rt, name)
    }

    /// `services "web" already exists`.
    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.qualified()),
        )
        .with_details(rt, name)
    }

    /// Optimistic concurrency failure.
    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                rt.qualified()
            ),
        )
        .with_details(rt, name)
    }

    /// Stale `resourceVersion` on update.
    pub fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 with one cause per invalid field: `Service "web" is invalid: spec.ports[0].port: ...`.
    pub fn invalid(rt: &ResourceType, name: &str, causes: Vec<FieldError>) -> Self {
        let text: Vec<String> = causes.iter().map(|c| c.to_string()).collect();
        let joined = if text.len() == 1 {
            text[0].clone()
        } else {
            format!("[{}]", text.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            // kube-apiserver qualifies the kind with its group: `Deployment.apps "x"`.
            if rt.group.is_empty() {
                format!("{} \"{name}\" is invalid: {joined}", rt.kind)
            } else {
                format!("{}.{} \"{name}\" is invalid: {joined}", rt.kind, rt.group)
            },
        );
        let mut d = json!({ "name": name, "kind": rt.kind, "causes": causes.iter().map(|c| json!({
            "reason": c.reason, "message": c.message_only(), "field": c.field,
        })).collect::<Vec<_>>() });
        if !rt.group.is_empty() {
            d["group"] = json!(rt.group);
        }
        e.details = Some(d);
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn path_not_found(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource (path {path})"),
        )
    }

    pub fn method_not_allowed(method: &str, what: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {what}"),
        )
    }

    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::new(406, "NotAcceptable", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml; got {content_type:?}"
            ),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// The watch's resourceVersion is older than the retained history.
    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// A paged list's continue token whose resourceVersion is no longer kept: 410 Expired
    /// with a token that continues at the latest version (kube-apiserver's answer).
    pub fn continue_expired(fresh_token: String) -> Self {
        let mut e = Self::new(410, "Expired", super::paging::INCONSISTENT_CONTINUE);
        e.continue_token = Some(fresh_token);
        e
    }

    /// A resourceVersion the server has not reached yet (kube-apiserver's 504 `Timeout`
    /// "Too large resource version", with a retry hint).
    pub fn too_large_resource_version(requested: u64, current: u64) -> Self {
        let mut e = Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        );
        e.details = Some(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        }));
        e
    }

    /// 422 without field causes (e.g. a JSON patch whose `test` fails).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `meta.k8s.io/v1 Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        if let Some(t) = &self.continue_token {
            s["metadata"]["continue"] = json!(t);
        }
        s
    }
}

/// One invalid field, worded as k8s.io/apimachinery's `field.Error`.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: String,
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`,
    /// `FieldValueDuplicate`, `FieldValueForbidden`.
    pub reason: &'static str,
    /// The offending value as the real server prints it (strings quoted, numbers bare).
    pub value: Option<String>,
    pub detail: String,
}

/// A JSON value printed as Go's `%#v` prints the decoded value in field errors: strings
/// quoted, numbers and booleans bare.
pub fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueRequired",
            value: None,
            detail: detail.into(),
        }
    }

    /// An invalid string value (printed quoted).
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        let value: String = value.into();
        FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            value: Some(format!("{value:?}")),
            detail: detail.into(),
        }
    }

    /// An invalid value of any JSON type (numbers printed bare).
    pub fn invalid_json(
        field: impl Into<String>,
        value: &Value,
        detail: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            value: Some(render_value(value)),
            detail: detail.into(),
        }
    }

    /// `Unsupported value: "x": supported values: "a", "b"`.
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[Value]) -> Self {
        let list: Vec<String> = supported.iter().map(render_value).collect();
        FieldError {
            field: field.into(),
            reason: "FieldValueNotSupported",
            value: Some(render_value(value)),
            detail: format!("supported values: {}", list.join(", ")),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueDuplicate",
            value: Some(render_value(value)),
            detail: String::new(),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueForbidden",
            value: None,
            detail: detail.into(),
        }
    }

    fn message_only(&self) -> String {
        let head = match (self.reason, &self.value) {
            ("FieldValueRequired", _) => "Required value".to_string(),
            ("FieldValueForbidden", _) => "Forbidden".to_string(),
            ("FieldValueNotSupported", Some(v)) => format!("Unsupported value: {v}"),
            ("FieldValueDuplicate", Some(v)) => format!("Duplicate value: {v}"),
            (_, Some(v)) => format!("Invalid value: {v}"),
            (_, None) => "Invalid value".to_string(),
        };
        if self.detail.is_empty() {
            head
        } else {
            format!("{head}: {}", self.detail)
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message_only())
    }
}
