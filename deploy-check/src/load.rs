//! Reading manifests: kustomize rendering, multi-document YAML, decoding into k8s-openapi
//! types with a check that no field was lost on the way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Errors while reading manifests. Each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running `kubectl kustomize {dir}` (is kubectl installed?): {source}")]
    KustomizeSpawn {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`kubectl kustomize {dir}` failed: {stderr}")]
    Kustomize { dir: PathBuf, stderr: String },
    #[error("{origin}: document {index}: invalid YAML: {source}")]
    Yaml {
        origin: String,
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: document {index} has no apiVersion/kind")]
    NoKind { origin: String, index: usize },
    #[error("{0}")]
    Decode(String),
}

/// One decoded object, with where it came from.
#[derive(Clone, Debug)]
pub struct ManifestObject {
    /// File or kustomization it was read from.
    pub origin: String,
    /// The object as written.
    pub raw: Value,
    pub resource: Resource,
}

/// The kinds mesh's manifests use.
#[derive(Clone, Debug)]
pub enum Resource {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ConfigMap(ConfigMap),
    Secret(Secret),
    Service(Service),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    PodDisruptionBudget(PodDisruptionBudget),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
}

impl ManifestObject {
    pub fn api_version(&self) -> &str {
        self.raw["apiVersion"].as_str().unwrap_or_default()
    }

    pub fn kind(&self) -> &str {
        self.raw["kind"].as_str().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.raw["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.raw["metadata"]["namespace"].as_str()
    }
}

impl fmt::Display for ManifestObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.namespace() {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind(), self.name()),
            None => write!(f, "{} {}", self.kind(), self.name()),
        }
    }
}

/// The repository's root (this crate lives in `<root>/deploy-check`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploy-check is inside the workspace")
        .to_path_buf()
}

/// Renders a kustomization with kubectl's built-in kustomize, as `kubectl apply -k` does.
pub fn kustomize(dir: &Path) -> Result<String, Error> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .env_remove("KUBECONFIG")
        .output()
        .map_err(|source| Error::KustomizeSpawn {
            dir: dir.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Kustomize {
            dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Renders and decodes a kustomization.
pub fn load_kustomization(dir: &Path) -> Result<Vec<ManifestObject>, Error> {
    decode_all(&kustomize(dir)?, &dir.display().to_string())
}

/// Reads and decodes a YAML file of one or more documents.
pub fn load_file(path: &Path) -> Result<Vec<ManifestObject>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode_all(&text, &path.display().to_string())
}

/// The non-empty documents of a multi-document YAML text, as JSON values.
pub fn documents(text: &str, origin: &str) -> Result<Vec<Value>, Error> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = <Value as serde::Deserialize>::deserialize(doc).map_err(|source| Error::Yaml {
            origin: origin.to_owned(),
            index,
            source,
        })?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Decodes every document of `text`; the first failure is the error.
pub fn decode_all(text: &str, origin: &str) -> Result<Vec<ManifestObject>, Error> {
    documents(text, origin)?
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            if raw["apiVersion"].as_str().is_none() || raw["kind"].as_str().is_none() {
                return Err(Error::NoKind {
                    origin: origin.to_owned(),
                    index,
                });
            }
            decode(raw, origin)
        })
        .collect()
}

/// Decodes one object into its k8s-openapi type. Fails on an unknown kind, on a value of
/// the wrong type, and on any field the type does not have (checked by encoding the typed
/// value again: every field written must come back unchanged).
pub fn decode(raw: Value, origin: &str) -> Result<ManifestObject, Error> {
    let api_version = raw["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = raw["kind"].as_str().unwrap_or_default().to_owned();
    let name = raw["metadata"]["name"]
        .as_str()
        .unwrap_or("<unnamed>")
        .to_owned();
    let what = format!("{origin}: {kind} {name}");
    let resource = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Resource::Namespace(typed(&raw, &what)?),
        ("v1", "ServiceAccount") => Resource::ServiceAccount(typed(&raw, &what)?),
        ("v1", "ConfigMap") => Resource::ConfigMap(typed(&raw, &what)?),
        ("v1", "Secret") => Resource::Secret(typed(&raw, &what)?),
        ("v1", "Service") => Resource::Service(typed(&raw, &what)?),
        ("apps/v1", "Deployment") => Resource::Deployment(typed(&raw, &what)?),
        ("apps/v1", "DaemonSet") => Resource::DaemonSet(typed(&raw, &what)?),
        ("policy/v1", "PodDisruptionBudget") => Resource::PodDisruptionBudget(typed(&raw, &what)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            Resource::ClusterRole(typed(&raw, &what)?)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Resource::ClusterRoleBinding(typed(&raw, &what)?)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Resource::Role(typed(&raw, &what)?),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            Resource::CustomResourceDefinition(Box::new(typed(&raw, &what)?))
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            Resource::RoleBinding(typed(&raw, &what)?)
        }
        _ => {
            return Err(Error::Decode(format!(
                "{what}: unsupported apiVersion/kind {api_version}/{kind}"
            )));
        }
    };
    Ok(ManifestObject {
        origin: origin.to_owned(),
        raw,
        resource,
    })
}

fn typed<T: DeserializeOwned + serde::Serialize>(raw: &Value, what: &str) -> Result<T, Error> {
    let t: T = serde_json::from_value(raw.clone())
        .map_err(|e| Error::Decode(format!("{what}: does not decode: {e}")))?;
    let again = serde_json::to_value(&t)
        .map_err(|e| Error::Decode(format!("{what}: does not encode again: {e}")))?;
    let mut lost = Vec::new();
    lost_fields(raw, &again, String::new(), &mut lost);
    if !lost.is_empty() {
        return Err(Error::Decode(format!(
            "{what}: unknown or mistyped fields (not in the Kubernetes schema): {}",
            lost.join(", ")
        )));
    }
    Ok(t)
}

/// Paths of `written` that `decoded` does not hold with the same value.
pub fn lost_fields(written: &Value, decoded: &Value, path: String, out: &mut Vec<String>) {
    match (written, decoded) {
        (Value::Null, _) => {}
        (Value::Object(w), Value::Object(d)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match d.get(k) {
                    Some(dv) => lost_fields(wv, dv, p, out),
                    // An empty map or list may be encoded as absent.
                    None if is_empty(wv) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(w), Value::Array(d)) if w.len() == d.len() => {
            for (i, (wv, dv)) in w.iter().zip(d).enumerate() {
                lost_fields(wv, dv, format!("{path}[{i}]"), out);
            }
        }
        (w, d) if w == d => {}
        // Schema bounds (`minimum: 0`) are floats in k8s-openapi: the same number.
        (Value::Number(w), Value::Number(d)) if w.as_f64() == d.as_f64() => {}
        _ => out.push(format!("{path} (written {written}, decoded {decoded})")),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_misspelt_field_is_refused() {
        let raw = json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "x"},
            "automountServiceAcountToken": false,
        });
        let e = decode(raw, "t").unwrap_err().to_string();
        assert!(e.contains(".automountServiceAcountToken"), "{e}");
    }

    #[test]
    fn a_mistyped_value_is_refused() {
        let raw = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x"},
            "spec": {"replicas": "two", "selector": {}, "template": {}},
        });
        let e = decode(raw, "t").unwrap_err().to_string();
        assert!(e.contains("does not decode"), "{e}");
    }

    #[test]
    fn unknown_kinds_and_documents_without_kind_are_refused() {
        let e = decode(json!({"apiVersion": "v1", "kind": "Pod"}), "t").unwrap_err();
        assert!(
            e.to_string().contains("unsupported apiVersion/kind v1/Pod"),
            "{e}"
        );
        let e = decode_all("metadata: {name: x}\n", "t").unwrap_err();
        assert!(matches!(e, Error::NoKind { index: 0, .. }), "{e}");
    }

    #[test]
    fn valid_objects_decode_and_empty_documents_are_skipped() {
        let text = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: Opaque\n---\n";
        let objs = decode_all(text, "t").unwrap();
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].to_string(), "Secret s");
        assert!(matches!(objs[0].resource, Resource::Secret(_)));
    }
}
