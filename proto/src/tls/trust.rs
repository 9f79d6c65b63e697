//! The trust store: one CA per cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use mesh_core::ClusterName;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;

/// The CAs a server trusts, keyed by cluster: the local cluster's CA (its agents and its own
/// apiserver replicas) and one CA bundle per peer cluster.
#[derive(Clone)]
pub struct TrustStore {
    local: ClusterName,
    cas: BTreeMap<ClusterName, TrustedCa>,
    /// Verifies against the union of every CA: used at the TLS layer.
    union: Arc<dyn ClientCertVerifier>,
    pub(super) provider: Arc<CryptoProvider>,
}

#[derive(Clone)]
struct TrustedCa {
    certs: Vec<CertificateDer<'static>>,
    /// Verifies against this cluster's CA only.
    verifier: Arc<dyn ClientCertVerifier>,
}

// === impl TrustStore ===

impl TrustStore {
    /// A trust store holding the local cluster's CA bundle.
    pub fn new(local: ClusterName, local_ca: Vec<CertificateDer<'static>>) -> Result<Self> {
        let provider = provider();
        let ca = build_ca(&local, local_ca, &provider)?;
        let mut cas = BTreeMap::new();
        cas.insert(local.clone(), ca);
        let union = build_union(&cas, &provider)?;
        Ok(Self {
            local,
            cas,
            union,
            provider,
        })
    }

    /// The serving (local) cluster.
    pub fn local_cluster(&self) -> &ClusterName {
        &self.local
    }

    /// Adds or replaces the CA bundle of `cluster` (the local cluster's too).
    pub fn insert(&mut self, cluster: ClusterName, ca: Vec<CertificateDer<'static>>) -> Result<()> {
        let ca = build_ca(&cluster, ca, &self.provider)?;
        let mut cas = self.cas.clone();
        cas.insert(cluster, ca);
        self.union = build_union(&cas, &self.provider)?;
        self.cas = cas;
        Ok(())
    }

    /// Removes the CA of a peer cluster; returns whether it was present. The local CA cannot
    /// be removed.
    pub fn remove(&mut self, cluster: &ClusterName) -> Result<bool> {
        if cluster == &self.local {
            return Err(TlsError::RemoveLocalCa {
                cluster: cluster.to_string(),
            });
        }
        if !self.cas.contains_key(cluster) {
            return Ok(false);
        }
        let mut cas = self.cas.clone();
        cas.remove(cluster);
        self.union = build_union(&cas, &self.provider)?;
        self.cas = cas;
        Ok(true)
    }

    /// Whether a CA is registered for `cluster`.
    pub fn contains(&self, cluster: &ClusterName) -> bool {
        self.cas.contains_key(cluster)
    }

    /// The clusters with a registered CA, local included.
    pub fn clusters(&self) -> impl Iterator<Item = &ClusterName> {
        self.cas.keys()
    }

    /// The CA bundle registered for `cluster`.
    pub fn ca_of(&self, cluster: &ClusterName) -> Option<&[CertificateDer<'static>]> {
        self.cas.get(cluster).map(|c| c.certs.as_slice())
    }

    /// The verifier of the TLS layer: a client chain must verify against one of the CAs.
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.union.clone()
    }

    /// Whether `chain` (leaf first) verifies against the CA of `cluster` alone, now.
    pub(super) fn verify_with(
        &self,
        cluster: &ClusterName,
        chain: &[CertificateDer<'static>],
    ) -> Result<(), String> {
        let Some(ca) = self.cas.get(cluster) else {
            return Err(format!("no CA is registered for cluster {cluster}"));
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err("empty certificate chain".into());
        };
        ca.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The first cluster whose CA verifies `chain`, for error messages.
    pub(super) fn signer_of(&self, chain: &[CertificateDer<'static>]) -> Option<&ClusterName> {
        self.cas
            .keys()
            .find(|cluster| self.verify_with(cluster, chain).is_ok())
    }
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("local", &self.local.as_str())
            .field(
                "clusters",
                &self
                    .cas
                    .iter()
                    .map(|(c, ca)| (c.as_str(), ca.certs.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn build_ca(
    cluster: &ClusterName,
    certs: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Result<TrustedCa> {
    let invalid = |reason: String| TlsError::InvalidCa {
        cluster: cluster.to_string(),
        reason,
    };
    if certs.is_empty() {
        return Err(invalid("the bundle holds no certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|e| invalid(format!("certificate #{i} is not a usable CA: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(TrustedCa { certs, verifier })
}

fn build_union(
    cas: &BTreeMap<ClusterName, TrustedCa>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for cert in cas.values().flat_map(|ca| ca.certs.iter()) {
        // Every certificate was added to a per-cluster store in `build_ca` already.
        roots.add(cert.clone())?;
    }
    Ok(WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?)
}
