//! SPIFFE identities: the IDs carried by mesh certificates.

use std::fmt;

use mesh_core::ClusterName;
use rustls_pki_types::CertificateDer;

use super::*;

/// What a mesh certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpiffeRole {
    /// `spiffe://<cluster>.mesh/apiserver`
    Apiserver,
    /// `spiffe://<cluster>.mesh/agent/<node>`
    Agent { node: String },
    /// `spiffe://<cluster>.mesh/operator/<name>`: a person or tool (meshctl) that reads.
    Operator { name: String },
}

/// A parsed mesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub cluster: ClusterName,
    pub role: SpiffeRole,
}

// === impl SpiffeId ===

impl SpiffeId {
    /// `spiffe://<cluster>.mesh/apiserver`
    pub fn apiserver(cluster: ClusterName) -> Self {
        Self {
            cluster,
            role: SpiffeRole::Apiserver,
        }
    }

    /// `spiffe://<cluster>.mesh/agent/<node>`
    pub fn agent(cluster: ClusterName, node: impl Into<String>) -> Self {
        Self {
            cluster,
            role: SpiffeRole::Agent { node: node.into() },
        }
    }

    /// Parses `spiffe://<cluster>.mesh/apiserver` or `spiffe://<cluster>.mesh/agent/<node>`.
    pub fn parse(uri: &str) -> Result<Self, AuthError> {
        let invalid = |reason: String| AuthError::InvalidSpiffeId {
            uri: uri.into(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("must start with spiffe://".into()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("has no path (expected /apiserver or /agent/<node>)".into()))?;
        let cluster = domain.strip_suffix(TRUST_DOMAIN_SUFFIX).ok_or_else(|| {
            invalid(format!(
                "trust domain {domain:?} does not end with {TRUST_DOMAIN_SUFFIX:?}"
            ))
        })?;
        let cluster = ClusterName::new(cluster).map_err(|e| invalid(e.to_string()))?;
        let role = match path.split_once('/') {
            None if path == "apiserver" => SpiffeRole::Apiserver,
            Some(("agent", node)) => {
                check_node_name(node).map_err(|r| invalid(format!("node name {node:?} {r}")))?;
                SpiffeRole::Agent { node: node.into() }
            }
            Some(("operator", name)) => {
                check_node_name(name)
                    .map_err(|r| invalid(format!("operator name {name:?} {r}")))?;
                SpiffeRole::Operator { name: name.into() }
            }
            _ => {
                return Err(invalid(format!(
                    "path {path:?} is none of \"apiserver\", \"agent/<node>\", \"operator/<name>\""
                )));
            }
        };
        Ok(Self { cluster, role })
    }

    /// The URI form, as written into a certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.role {
            SpiffeRole::Apiserver => {
                write!(
                    f,
                    "spiffe://{}{TRUST_DOMAIN_SUFFIX}/apiserver",
                    self.cluster
                )
            }
            SpiffeRole::Agent { node } => {
                write!(
                    f,
                    "spiffe://{}{TRUST_DOMAIN_SUFFIX}/agent/{node}",
                    self.cluster
                )
            }
            SpiffeRole::Operator { name } => {
                write!(
                    f,
                    "spiffe://{}{TRUST_DOMAIN_SUFFIX}/operator/{name}",
                    self.cluster
                )
            }
        }
    }
}

/// Kubernetes node names are DNS subdomains (RFC 1123).
fn check_node_name(node: &str) -> Result<(), &'static str> {
    if node.is_empty() {
        return Err("is empty");
    }
    if node.len() > 253 {
        return Err("is longer than 253 characters");
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err("may contain only lowercase letters, digits, '-' and '.'");
    }
    Ok(())
}

/// The SPIFFE ID in the URI SAN of a certificate (exactly one `spiffe://` URI is expected).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, AuthError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        AuthError::BadCertificate {
            reason: format!("cannot parse the certificate: {e}"),
        }
    })?;
    let subject = parsed.subject().to_string();
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| AuthError::BadCertificate {
            reason: format!("certificate {subject:?} has an invalid subjectAltName: {e}"),
        })?;
    let uris: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .filter(|u| u.starts_with("spiffe://"))
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri),
        [] => Err(AuthError::NoSpiffeId { subject }),
        many => Err(AuthError::BadCertificate {
            reason: format!(
                "certificate {subject:?} carries {} SPIFFE IDs ({}); exactly one is allowed",
                many.len(),
                many.join(", ")
            ),
        }),
    }
}
