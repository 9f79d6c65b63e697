//! The CustomResourceDefinitions mesh ships in `deploy/crds/` (CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy), embedded so that every lab cluster has them from the
//! start, as a cluster with mesh deployed has.

use serde::Deserialize;
use serde_json::Value;

use crate::kube_api::resources as r;
use crate::kube_api::{ApiError, Store};

/// The manifests, by file name under `deploy/crds/`.
pub const FILES: &[(&str, &str)] = &[
    (
        "ciliumnetworkpolicies.yaml",
        include_str!("../../deploy/crds/ciliumnetworkpolicies.yaml"),
    ),
    (
        "ciliumclusterwidenetworkpolicies.yaml",
        include_str!("../../deploy/crds/ciliumclusterwidenetworkpolicies.yaml"),
    ),
];

/// Why the embedded CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("deploy/crds/{file}: not YAML: {source}")]
    Yaml {
        file: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("deploy/crds/{file}: creating CustomResourceDefinition {name}: {source}")]
    Create {
        file: &'static str,
        name: String,
        #[source]
        source: Box<ApiError>,
    },
}

/// The CRD objects of [`FILES`].
pub fn objects() -> Result<Vec<(&'static str, Value)>, InstallError> {
    let mut out = Vec::new();
    for (file, text) in FILES {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v =
                Value::deserialize(doc).map_err(|source| InstallError::Yaml { file, source })?;
            if !v.is_null() {
                out.push((*file, v));
            }
        }
    }
    Ok(out)
}

/// Creates the CRDs in `store` (kept as they are when they exist already, as after a
/// supervisor restart on a lab whose API state survived).
pub fn install(store: &Store) -> Result<(), InstallError> {
    for (file, crd) in objects()? {
        let name = crd["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match store.create(&r::CRDS, None, crd) {
            Ok(_) => tracing::debug!(crd = %name, "mesh CRD installed"),
            Err(e) if e.code == 409 => {}
            Err(e) => {
                return Err(InstallError::Create {
                    file,
                    name,
                    source: Box::new(e),
                });
            }
        }
    }
    Ok(())
}
