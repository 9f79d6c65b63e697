//! PEM loading: certificates, keys and the [`TlsIdentity`] built from them.

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::*;

/// Reads every certificate of a PEM file (a chain or a CA bundle). An empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadPem {
            what: "certificates",
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyPem {
            what: "certificate",
            source_name: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::EmptyPem {
            what: "private key",
            source_name: path.display().to_string(),
        },
        source => TlsError::ReadPem {
            what: "private key",
            path: path.to_owned(),
            source,
        },
    })
}

/// Parses every certificate of PEM text; `source_name` names it in errors (e.g. a Secret key).
pub fn parse_certs(pem: &[u8], source_name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ParsePem {
            what: "certificates",
            source_name: source_name.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyPem {
            what: "certificate",
            source_name: source_name.into(),
        });
    }
    Ok(certs)
}

/// Parses a private key from PEM text; `source_name` names it in errors.
pub fn parse_key(pem: &[u8], source_name: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::EmptyPem {
            what: "private key",
            source_name: source_name.into(),
        },
        source => TlsError::ParsePem {
            what: "private key",
            source_name: source_name.into(),
            source,
        },
    })
}

/// A certificate chain (leaf first) and its private key. `Debug` never shows the key.
pub struct TlsIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

// === impl TlsIdentity ===

impl TlsIdentity {
    /// Loads a chain and a key from PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        Ok(Self {
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// Parses a chain and a key from PEM text.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Self> {
        Ok(Self {
            chain: parse_certs(cert, "certificate PEM")?,
            key: parse_key(key, "private key PEM")?,
        })
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let leaf = self.chain.first().and_then(|c| spiffe_id_of(c).ok());
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .field("spiffe_id", &leaf.map(|id| id.to_string()))
            .field("key", &"<redacted>")
            .finish()
    }
}
