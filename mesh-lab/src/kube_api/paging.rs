//! List paging as kube-apiserver does it: `limit` and `continue`.
//!
//! The continue token has the real server's format (`k8s.io/apiserver/pkg/storage`
//! `EncodeContinue`): unpadded URL-safe base64 of `{"v":"meta.k8s.io/v1","rv":R,"start":K}`,
//! where `R` is the resourceVersion of the list's first page and `K` the key to start from,
//! relative to the list's scope: `<namespace>/<name>\0` for a list over all namespaces,
//! `<name>\0` for a list in one namespace or of a cluster-scoped type (the `\0` makes it the
//! first key after the last one returned). `rv: -1` is the real server's "continue at the
//! latest resourceVersion", handed out with a 410 when `R` can no longer be served.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::util;

const TOKEN_VERSION: &str = "meta.k8s.io/v1";

/// The real server's message for a token whose resourceVersion has been compacted away
/// (it comes with a fresh token that continues, inconsistently, at the latest version).
pub const INCONSISTENT_CONTINUE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

#[derive(Serialize, Deserialize)]
struct Wire {
    v: String,
    rv: i64,
    start: String,
}

/// A decoded continue token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContinueToken {
    /// The first page's resourceVersion; `None`: the latest (`rv: -1`).
    pub rv: Option<u64>,
    /// The last key returned: `(namespace, name)`, namespace empty for cluster-scoped types.
    pub after: (String, String),
}

/// Whether a list's keys carry the namespace (a list over all namespaces of a namespaced
/// type) or only the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    AllNamespaces,
    /// One namespace, or `""` for a cluster-scoped type.
    Namespace(&'a str),
}

impl ContinueToken {
    /// The token that continues after `after` (the last item returned).
    pub fn encode(rv: Option<u64>, after: &(String, String), scope: Scope<'_>) -> String {
        let start = match scope {
            Scope::AllNamespaces => format!("{}/{}\0", after.0, after.1),
            Scope::Namespace(_) => format!("{}\0", after.1),
        };
        let wire = Wire {
            v: TOKEN_VERSION.into(),
            rv: rv.map_or(-1, |r| r as i64),
            start,
        };
        util::base64url_encode(&serde_json::to_vec(&wire).expect("token serializes"))
    }

    /// Decodes a token for a list of `scope`; a malformed token is a 400 naming the
    /// `continue` parameter and what is wrong with it.
    pub fn decode(token: &str, scope: Scope<'_>) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::bad_request(format!("invalid continue token: {why}"));
        let raw = util::base64url_decode(token)
            .ok_or_else(|| bad("continue key is not valid: not URL-safe base64"))?;
        let wire: Wire = serde_json::from_slice(&raw)
            .map_err(|e| bad(&format!("continue key is not valid: {e}")))?;
        if wire.v != TOKEN_VERSION {
            return Err(bad(&format!(
                "continue key is not valid: server does not recognize this encoded version {:?}",
                wire.v
            )));
        }
        let rv = match wire.rv {
            0 => {
                return Err(bad(
                    "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
                ));
            }
            r if r < 0 => None,
            r => Some(r as u64),
        };
        let Some(key) = wire.start.strip_suffix('\0') else {
            return Err(bad(if wire.start.is_empty() {
                "continue key is not valid: encoded start key empty (version meta.k8s.io/v1)"
            } else {
                "continue key is not valid: the start key does not follow a returned key"
            }));
        };
        let after = match scope {
            Scope::AllNamespaces => match key.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    (ns.to_string(), name.to_string())
                }
                _ => {
                    return Err(bad(&format!(
                        "continue key is not valid: start key {key:?} is not <namespace>/<name> (a token of another list?)"
                    )));
                }
            },
            Scope::Namespace(ns) => {
                if key.is_empty() || key.contains('/') {
                    return Err(bad(&format!(
                        "continue key is not valid: start key {key:?} is not a name (a token of another list?)"
                    )));
                }
                (ns.to_string(), key.to_string())
            }
        };
        Ok(ContinueToken { rv, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.into(), name.into())
    }

    #[test]
    fn tokens_round_trip_in_the_real_servers_format() {
        let t = ContinueToken::encode(Some(42), &key("a", "web-1"), Scope::AllNamespaces);
        let raw = util::base64url_decode(&t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v": "meta.k8s.io/v1", "rv": 42, "start": "a/web-1\u{0}"})
        );
        assert!(!t.contains(['=', '+', '/']), "unpadded URL-safe: {t}");
        assert_eq!(
            ContinueToken::decode(&t, Scope::AllNamespaces).unwrap(),
            ContinueToken {
                rv: Some(42),
                after: key("a", "web-1")
            }
        );
        let t = ContinueToken::encode(None, &key("b", "x"), Scope::Namespace("b"));
        assert_eq!(
            ContinueToken::decode(&t, Scope::Namespace("b")).unwrap(),
            ContinueToken {
                rv: None,
                after: key("b", "x")
            }
        );
    }

    #[test]
    fn malformed_tokens_name_the_parameter_and_the_problem() {
        let enc = |json: &str| util::base64url_encode(json.as_bytes());
        for (token, scope, want) in [
            ("%%%".to_string(), Scope::AllNamespaces, "base64"),
            (
                enc("not json"),
                Scope::AllNamespaces,
                "continue key is not valid",
            ),
            (
                enc(r#"{"v":"meta.k8s.io/v2","rv":3,"start":"a/b\u0000"}"#),
                Scope::AllNamespaces,
                "encoded version",
            ),
            (
                enc(r#"{"v":"meta.k8s.io/v1","rv":0,"start":"a/b\u0000"}"#),
                Scope::AllNamespaces,
                "start resourceVersion",
            ),
            (
                enc(r#"{"v":"meta.k8s.io/v1","rv":3,"start":""}"#),
                Scope::AllNamespaces,
                "start key empty",
            ),
            (
                enc(r#"{"v":"meta.k8s.io/v1","rv":3,"start":"b\u0000"}"#),
                Scope::AllNamespaces,
                "not <namespace>/<name>",
            ),
            (
                enc(r#"{"v":"meta.k8s.io/v1","rv":3,"start":"a/b\u0000"}"#),
                Scope::Namespace("a"),
                "not a name",
            ),
        ] {
            let e = ContinueToken::decode(&token, scope).unwrap_err();
            assert_eq!((e.code, e.reason), (400, "BadRequest"), "{token}");
            assert!(
                e.message.starts_with("invalid continue token: ") && e.message.contains(want),
                "{token}: {}",
                e.message
            );
        }
    }
}
