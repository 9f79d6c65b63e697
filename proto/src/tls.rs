//! Mutual TLS for the mesh gRPC API (DESIGN.md section 8), with rustls and the ring provider.
//!
//! Server side:
//! - [`ServerTls`] holds the serving certificate and the [`TrustStore`] (one CA per cluster:
//!   the local cluster's own CA plus one per peer) behind a lock, so both can be swapped at
//!   runtime; [`ServerTls::watch_files`] reloads the files when they change.
//! - [`tls_incoming`] turns a `TcpListener` into the connection stream for
//!   `tonic::transport::Server::serve_with_incoming`. Handshakes run concurrently and a failed
//!   handshake is logged and dropped. Every connection carries a [`ConnInfo`] (remote address,
//!   client certificate chain) that handlers find in `request.extensions()`.
//! - The TLS layer requires a client certificate that chains to *some* trusted CA;
//!   [`authenticate`] then reads the SPIFFE identity from the leaf and checks that the CA
//!   registered for the *claimed* cluster signed it (a cert of cluster C claiming to be A is
//!   refused), yielding a [`Caller`].
//!
//! Client side: [`ClientTls`] (CA bundle, client cert, expected server cluster) and
//! [`connect`], which dials with tokio-rustls through tonic's custom connector.
//!
//! `--insecure` (plaintext) is only allowed on loopback: see [`check_insecure_bind`],
//! [`plain_incoming`] and [`ClientEndpoint::plaintext`].

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use hyper_util::rt::TokioIo;
use mesh_core::ClusterName;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Uri};
use tracing::{Instrument, debug, info, warn};

use crate::pb::mesh_client::MeshClient;

/// The trust domain suffix of mesh SPIFFE IDs: `spiffe://<cluster>.mesh/...`.
pub const TRUST_DOMAIN_SUFFIX: &str = ".mesh";

/// ALPN protocol spoken by the gRPC endpoints.
const ALPN_H2: &[u8] = b"h2";

/// Errors building or loading TLS material, or dialing a server. Each names the file, the
/// cluster or the address involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} from {}: {source}", path.display())]
    ReadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no {what} found in {source_name}")]
    EmptyPem {
        what: &'static str,
        source_name: String,
    },
    #[error("parsing {what} from {source_name}: {source}")]
    ParsePem {
        what: &'static str,
        source_name: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA bundle of cluster {cluster}: {reason}")]
    InvalidCa { cluster: String, reason: String },
    #[error("the CA of the local cluster {cluster} cannot be removed from the trust store")]
    RemoveLocalCa { cluster: String },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("building the certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(
        "refusing a plaintext (--insecure) listener on {addr}: plaintext is only allowed on a \
         loopback address (127.0.0.0/8 or ::1)"
    )]
    InsecureNonLoopback { addr: SocketAddr },
    #[error("invalid server name {name:?} for TLS verification")]
    InvalidServerName { name: String },
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server's certificate was refused during the handshake (wrong CA, name, SPIFFE
    /// identity, expired): a refusal of the server, not a failure to reach it.
    #[error("connecting to {address}: server certificate refused: {reason}")]
    ServerCertificate { address: String, reason: String },
}

pub type Result<T, E = TlsError> = std::result::Result<T, E>;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ================================================================ PEM loading

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

// ================================================================ SPIFFE identities

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

// ================================================================ trust store

/// The CAs a server trusts, keyed by cluster: the local cluster's CA (its agents and its own
/// apiserver replicas) and one CA bundle per peer cluster.
#[derive(Clone)]
pub struct TrustStore {
    local: ClusterName,
    cas: BTreeMap<ClusterName, TrustedCa>,
    /// Verifies against the union of every CA: used at the TLS layer.
    union: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
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
    fn verify_with(
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
    fn signer_of(&self, chain: &[CertificateDer<'static>]) -> Option<&ClusterName> {
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

// ================================================================ authentication

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    pub cluster: ClusterName,
    pub role: Role,
}

/// The role of a caller, relative to the serving cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// An agent of the serving cluster: reads everything.
    Agent { node: String },
    /// The apiserver of another cluster: reads only the serving cluster's own data.
    Peer,
    /// Another apiserver replica of the serving cluster.
    Replica,
    /// An operator of the serving cluster (meshctl): reads everything, writes nothing.
    Operator { name: String },
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.role {
            Role::Agent { node } => write!(f, "agent {node} of cluster {}", self.cluster),
            Role::Peer => write!(f, "peer apiserver of cluster {}", self.cluster),
            Role::Replica => write!(f, "apiserver replica of cluster {}", self.cluster),
            Role::Operator { name } => write!(f, "operator {name} of cluster {}", self.cluster),
        }
    }
}

/// Why a caller was refused. Converts into a `tonic::Status`: `Unauthenticated` when the
/// caller has no usable identity, `PermissionDenied` when the identity is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no client certificate from {}", remote.map(|a| a.to_string()).unwrap_or_else(|| "unknown address".into()))]
    NoCertificate { remote: Option<SocketAddr> },
    #[error("bad client certificate: {reason}")]
    BadCertificate { reason: String },
    #[error("client certificate {subject:?} carries no spiffe:// URI SAN")]
    NoSpiffeId { subject: String },
    #[error("invalid SPIFFE ID {uri:?}: {reason}")]
    InvalidSpiffeId { uri: String, reason: String },
    #[error(
        "certificate claims {claimed} but no CA is registered for cluster {cluster}{}",
        signer.as_ref().map(|s| format!(" (it is signed by the CA of cluster {s})")).unwrap_or_default()
    )]
    UnknownCluster {
        claimed: String,
        cluster: String,
        signer: Option<String>,
    },
    #[error(
        "certificate claims {claimed} but is not signed by the CA of cluster {cluster}{}: {reason}",
        signer.as_ref().map(|s| format!(" (it is signed by the CA of cluster {s})")).unwrap_or_default()
    )]
    WrongCa {
        claimed: String,
        cluster: String,
        signer: Option<String>,
        reason: String,
    },
    #[error(
        "certificate claims {claimed}: agents and operators may only connect to the apiserver of their own \
         cluster, this is cluster {serving}"
    )]
    ForeignAgent { claimed: String, serving: String },
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoCertificate { .. }
            | AuthError::BadCertificate { .. }
            | AuthError::NoSpiffeId { .. }
            | AuthError::InvalidSpiffeId { .. } => tonic::Status::unauthenticated(e.to_string()),
            AuthError::UnknownCluster { .. }
            | AuthError::WrongCa { .. }
            | AuthError::ForeignAgent { .. } => tonic::Status::permission_denied(e.to_string()),
        }
    }
}

/// Authenticates the caller of a connection against `trust`: reads the SPIFFE ID of the
/// client's leaf certificate and checks that the CA registered for the claimed cluster
/// signed it (now, so a CA removed at runtime stops working for open connections too).
pub fn authenticate(conn: &ConnInfo, trust: &TrustStore) -> Result<Caller, AuthError> {
    let chain =
        conn.peer_certs
            .as_deref()
            .filter(|c| !c.is_empty())
            .ok_or(AuthError::NoCertificate {
                remote: conn.remote_addr,
            })?;
    let id = spiffe_id_of(&chain[0])?;
    let claimed = id.to_string();
    let signer = || trust.signer_of(chain).map(|c| c.to_string());
    if !trust.contains(&id.cluster) {
        return Err(AuthError::UnknownCluster {
            claimed,
            cluster: id.cluster.to_string(),
            signer: signer(),
        });
    }
    if let Err(reason) = trust.verify_with(&id.cluster, chain) {
        return Err(AuthError::WrongCa {
            claimed,
            cluster: id.cluster.to_string(),
            signer: signer(),
            reason,
        });
    }
    let local = trust.local_cluster();
    let role = match id.role {
        SpiffeRole::Agent { node } if &id.cluster == local => Role::Agent { node },
        SpiffeRole::Agent { .. } => {
            return Err(AuthError::ForeignAgent {
                claimed,
                serving: local.to_string(),
            });
        }
        SpiffeRole::Operator { name } if &id.cluster == local => Role::Operator { name },
        SpiffeRole::Operator { .. } => {
            return Err(AuthError::ForeignAgent {
                claimed,
                serving: local.to_string(),
            });
        }
        SpiffeRole::Apiserver if &id.cluster == local => Role::Replica,
        SpiffeRole::Apiserver => Role::Peer,
    };
    Ok(Caller {
        cluster: id.cluster,
        role,
    })
}

// ================================================================ server TLS state

/// One immutable generation of the server's TLS configuration.
pub struct ServerTlsState {
    pub config: Arc<rustls::ServerConfig>,
    pub trust: Arc<TrustStore>,
    pub identity: Arc<TlsIdentity>,
}

/// The server's TLS configuration, swappable at runtime: new connections use the newest
/// generation; [`authenticate`] checks against the newest trust store.
pub struct ServerTls {
    state: RwLock<Arc<ServerTlsState>>,
    /// Modification stamps of the files of the last successful load from files, taken
    /// before reading them (a write during the read triggers another reload).
    loaded_stamps: std::sync::Mutex<Option<FileStamps>>,
}

type FileStamps = Vec<Option<(SystemTime, u64)>>;

/// The files a server's TLS configuration is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The serving certificate chain (PEM).
    pub cert: PathBuf,
    /// The serving key (PEM).
    pub key: PathBuf,
    /// The local cluster's CA bundle (PEM).
    pub ca: PathBuf,
}

// === impl ServerTls ===

impl ServerTls {
    /// Builds the server configuration: `identity` serves, client certificates are required
    /// and must chain to a CA of `trust`.
    pub fn new(identity: TlsIdentity, trust: TrustStore) -> Result<Arc<Self>> {
        let state = build_state(Arc::new(identity), Arc::new(trust))?;
        Ok(Arc::new(Self {
            state: RwLock::new(Arc::new(state)),
            loaded_stamps: std::sync::Mutex::new(None),
        }))
    }

    /// Loads the serving cert, key and the local CA from files.
    pub fn from_files(local: ClusterName, files: &ServerTlsFiles) -> Result<Arc<Self>> {
        let stamps = file_stamps(files);
        let identity = TlsIdentity::load(&files.cert, &files.key)?;
        let trust = TrustStore::new(local, load_certs(&files.ca)?)?;
        let this = Self::new(identity, trust)?;
        *this.loaded_stamps.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamps);
        Ok(this)
    }

    /// The current generation.
    pub fn current(&self) -> Arc<ServerTlsState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current trust store.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.current().trust.clone()
    }

    /// Replaces the serving certificate and key.
    pub fn set_identity(&self, identity: TlsIdentity) -> Result<()> {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let next = build_state(Arc::new(identity), guard.trust.clone())?;
        *guard = Arc::new(next);
        Ok(())
    }

    /// Changes the trust store with `f`; nothing changes when `f` or the rebuild fails.
    pub fn update_trust(&self, f: impl FnOnce(&mut TrustStore) -> Result<()>) -> Result<()> {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut trust = (*guard.trust).clone();
        f(&mut trust)?;
        let next = build_state(guard.identity.clone(), Arc::new(trust))?;
        *guard = Arc::new(next);
        Ok(())
    }

    /// Registers (or replaces) the CA bundle of a peer cluster.
    pub fn add_peer_ca(
        &self,
        cluster: ClusterName,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<()> {
        info!(cluster = %cluster, certs = ca.len(), "trusting CA of cluster");
        self.update_trust(|t| t.insert(cluster, ca))
    }

    /// Forgets the CA of a peer cluster; returns whether it was registered.
    pub fn remove_peer_ca(&self, cluster: &ClusterName) -> Result<bool> {
        let mut removed = false;
        self.update_trust(|t| {
            removed = t.remove(cluster)?;
            Ok(())
        })?;
        if removed {
            info!(cluster = %cluster, "no longer trusting CA of cluster");
        }
        Ok(removed)
    }

    /// Authenticates the caller of a request served through [`tls_incoming`].
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Caller, AuthError> {
        let conn = ConnInfo::of(request).ok_or(AuthError::NoCertificate { remote: None })?;
        authenticate(conn, &self.trust())
    }

    /// Reloads the serving cert, key and the local CA from `files`, keeping the peer CAs.
    pub fn reload_from_files(&self, files: &ServerTlsFiles) -> Result<()> {
        let stamps = file_stamps(files);
        let identity = TlsIdentity::load(&files.cert, &files.key)?;
        let ca = load_certs(&files.ca)?;
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut trust = (*guard.trust).clone();
        let local = trust.local_cluster().clone();
        trust.insert(local, ca)?;
        let next = build_state(Arc::new(identity), Arc::new(trust))?;
        *guard = Arc::new(next);
        *self.loaded_stamps.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamps);
        Ok(())
    }

    /// Polls `files` every `every` and reloads them when their modification time or size
    /// differs from the last successful load ([`ServerTls::from_files`] or
    /// [`ServerTls::reload_from_files`]; when the state was not built from files, the first
    /// poll loads them). A failed reload (e.g. cert written, key not yet) keeps the previous
    /// configuration and is retried at the next poll. Runs until dropped.
    pub async fn watch_files(self: Arc<Self>, files: ServerTlsFiles, every: Duration) {
        let mut last_failed: Option<FileStamps> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = file_stamps(&files);
            let loaded = self
                .loaded_stamps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if loaded.as_ref() == Some(&now) {
                continue;
            }
            match self.reload_from_files(&files) {
                Ok(()) => {
                    info!(cert = %files.cert.display(), ca = %files.ca.display(), "reloaded TLS files");
                    last_failed = None;
                }
                Err(error) => {
                    if last_failed.as_ref() != Some(&now) {
                        warn!(%error, "reloading TLS files failed; keeping the previous configuration");
                    }
                    last_failed = Some(now);
                }
            }
        }
    }
}

fn file_stamps(files: &ServerTlsFiles) -> FileStamps {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn build_state(identity: Arc<TlsIdentity>, trust: Arc<TrustStore>) -> Result<ServerTlsState> {
    let mut config = rustls::ServerConfig::builder_with_provider(trust.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(trust.client_verifier())
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(ServerTlsState {
        config: Arc::new(config),
        trust,
        identity,
    })
}

// ================================================================ incoming connections

/// What a handler knows about the connection of a request: find it with
/// [`ConnInfo::of`] (`request.extensions().get::<ConnInfo>()`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    /// The client's certificate chain, leaf first; `None` on a plaintext connection.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl ConnInfo {
    /// The connection info of a request served through [`tls_incoming`] or
    /// [`plain_incoming`].
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnInfo> {
        request.extensions().get::<ConnInfo>()
    }
}

/// Options of the TLS acceptor.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further accepted sockets wait.
    pub max_concurrent_handshakes: usize,
    /// Established connections waiting to be picked up by the server.
    pub backlog: usize,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: 1024,
            backlog: 128,
        }
    }
}

/// An accepted connection with its [`ConnInfo`], so handlers look the caller up the same
/// way whether the listener speaks TLS or (`--insecure`, loopback only) plaintext.
pub struct Conn<S> {
    stream: S,
    info: ConnInfo,
}

/// A server-side TLS connection.
pub type TlsConn = Conn<tokio_rustls::server::TlsStream<TcpStream>>;

/// A plaintext connection (`--insecure`, loopback only): its [`ConnInfo`] has no
/// certificates.
pub type PlainConn = Conn<TcpStream>;

impl<S> Conn<S> {
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connected for Conn<S> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The stream of established TLS connections for `Server::serve_with_incoming`. Dropping it
/// stops accepting (the listener is closed).
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsConn>,
    accept_task: tokio::task::JoinHandle<()>,
    local_addr: Option<SocketAddr>,
}

impl TlsIncoming {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Accepts TCP connections on `listener` and performs TLS handshakes with the current
/// configuration of `tls`, concurrently (a slow or garbage client never blocks others).
/// Failed handshakes are logged and dropped. Must be called within a tokio runtime.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    options: IncomingOptions,
) -> TlsIncoming {
    let local_addr = listener.local_addr().ok();
    let (tx, rx) = mpsc::channel(options.backlog.max(1));
    let accept_task = tokio::spawn(accept_loop(listener, tls, options, tx));
    TlsIncoming {
        rx,
        accept_task,
        local_addr,
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    options: IncomingOptions,
    tx: mpsc::Sender<TlsConn>,
) {
    let permits = Arc::new(Semaphore::new(options.max_concurrent_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, remote) = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(%error, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let config = tls.current().config.clone();
        let tx = tx.clone();
        let timeout = options.handshake_timeout;
        let span = tracing::info_span!("tls_accept", peer = %remote);
        tokio::spawn(async move {
            let _permit = permit;
            let local_addr = tcp.local_addr().ok();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let peer_certs = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| Arc::new(c.to_vec()));
                    let info = ConnInfo {
                        remote_addr: Some(remote),
                        local_addr,
                        peer_certs,
                    };
                    debug!(%remote, "TLS handshake done");
                    let _ = tx.send(TlsConn { stream, info }).await;
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!(%remote, %error, "client closed the connection during the TLS handshake");
                }
                Ok(Err(error)) => warn!(%remote, %error, "TLS handshake failed"),
                Err(_) => warn!(%remote, ?timeout, "TLS handshake timed out"),
            }
        }
        .instrument(span),
        );
    }
}

/// Refuses a plaintext (`--insecure`) listener on anything but a loopback address.
pub fn check_insecure_bind(addr: SocketAddr) -> Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(TlsError::InsecureNonLoopback { addr })
    }
}

/// Accepted plaintext connections of an `--insecure` loopback listener. Refuses a listener
/// bound to a non-loopback address.
pub fn plain_incoming(listener: TcpListener) -> Result<impl Stream<Item = io::Result<PlainConn>>> {
    let addr = listener
        .local_addr()
        .map_err(|e| TlsError::InvalidAddress {
            address: "listener".into(),
            reason: e.to_string(),
        })?;
    check_insecure_bind(addr)?;
    Ok(futures::stream::unfold(listener, |listener| async move {
        let item = listener.accept().await.map(|(stream, remote)| {
            let _ = stream.set_nodelay(true);
            PlainConn {
                info: ConnInfo {
                    remote_addr: Some(remote),
                    local_addr: stream.local_addr().ok(),
                    peer_certs: None,
                },
                stream,
            }
        });
        Some((item, listener))
    }))
}

// ================================================================ client

/// Client TLS settings: the CA bundle that signs the server, the client's own identity,
/// and the cluster the server must prove to be (`spiffe://<cluster>.mesh/apiserver`).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

// === impl ClientTls ===

impl ClientTls {
    /// `expected_server`: the server's leaf must carry `spiffe://<expected>.mesh/apiserver`;
    /// `None` accepts any mesh apiserver identity signed by `ca`.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        identity: TlsIdentity,
        expected_server: Option<ClusterName>,
    ) -> Result<Self> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for (i, cert) in ca.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::InvalidCa {
                cluster: expected_server
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "of the server".into()),
                reason: format!("certificate #{i} is not a usable CA: {e}"),
            })?;
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?;
        let verifier = Arc::new(MeshServerVerifier {
            inner,
            expected: expected_server,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(identity.chain, identity.key)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Loads the CA bundle, client cert and key from files.
    pub fn from_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        expected_server: Option<ClusterName>,
    ) -> Result<Self> {
        Self::new(
            load_certs(ca)?,
            TlsIdentity::load(cert, key)?,
            expected_server,
        )
    }

    /// The rustls configuration.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

/// Standard WebPKI verification of the server (chain and name), then the SPIFFE identity.
#[derive(Debug)]
struct MeshServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Option<ClusterName>,
}

#[derive(Debug, thiserror::Error)]
#[error("server certificate {found}: {reason}")]
struct ServerIdentityError {
    found: String,
    reason: String,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let refuse = |found: String, reason: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(ServerIdentityError { found, reason }),
            )))
        };
        let id = spiffe_id_of(end_entity)
            .map_err(|e| refuse("without a mesh identity".into(), e.to_string()))?;
        if id.role != SpiffeRole::Apiserver {
            return Err(refuse(
                id.to_string(),
                "is not an apiserver identity".into(),
            ));
        }
        match &self.expected {
            Some(expected) if &id.cluster != expected => {
                return Err(refuse(
                    id.to_string(),
                    format!("expected the apiserver of cluster {expected}"),
                ));
            }
            _ => {}
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Where and how to reach a mesh-apiserver.
#[derive(Debug, Clone)]
pub struct ClientEndpoint {
    /// `host:port`; the host may be a DNS name or an IP literal (`[v6]:port`).
    pub address: String,
    /// The socket address to dial, when the caller resolved `address` itself (e.g. with
    /// hickory on every reconnect); otherwise `address` is resolved by the system resolver.
    pub resolved: Option<SocketAddr>,
    /// The name the server certificate is verified against; defaults to the host of
    /// `address`.
    pub server_name: Option<String>,
    /// `None`: plaintext (`--insecure`), only to a loopback address.
    pub tls: Option<ClientTls>,
    /// Limit for TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
}

// === impl ClientEndpoint ===

impl ClientEndpoint {
    /// A TLS endpoint with a 5 s connect timeout.
    pub fn new(address: impl Into<String>, tls: ClientTls) -> Self {
        Self {
            address: address.into(),
            resolved: None,
            server_name: None,
            tls: Some(tls),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A plaintext endpoint (`--insecure`); [`connect`] refuses non-loopback addresses.
    pub fn plaintext(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            resolved: None,
            server_name: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The host part of `address`, without IPv6 brackets.
    fn host(&self) -> Result<&str> {
        let (host, port) =
            self.address
                .rsplit_once(':')
                .ok_or_else(|| TlsError::InvalidAddress {
                    address: self.address.clone(),
                    reason: "expected host:port".into(),
                })?;
        port.parse::<u16>().map_err(|_| TlsError::InvalidAddress {
            address: self.address.clone(),
            reason: format!("invalid port {port:?}"),
        })?;
        Ok(host.trim_start_matches('[').trim_end_matches(']'))
    }
}

/// Dials `endpoint` and returns a gRPC client. The TLS handshake verifies the server's chain
/// against the endpoint's CA, its name, and its SPIFFE identity. Each reconnect of the
/// returned channel dials again (re-resolving `address` unless `resolved` is set).
pub async fn connect(endpoint: &ClientEndpoint) -> Result<MeshClient<Channel>> {
    let host = endpoint.host()?.to_owned();
    let tls = match &endpoint.tls {
        Some(tls) => {
            let name = endpoint.server_name.clone().unwrap_or_else(|| host.clone());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|_| TlsError::InvalidServerName { name })?;
            Some((tokio_rustls::TlsConnector::from(tls.config()), server_name))
        }
        None => None,
    };
    let target = Target {
        address: endpoint.address.clone(),
        resolved: endpoint.resolved,
    };
    if tls.is_none() {
        let addr = target
            .resolve()
            .await
            .map_err(|e| TlsError::InvalidAddress {
                address: endpoint.address.clone(),
                reason: e.to_string(),
            })?;
        check_insecure_bind(addr)?;
    }
    // The URI only feeds HTTP/2's :authority; dialing is ours, so the scheme stays http.
    let uri = format!("http://{}", endpoint.address);
    let channel_endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| TlsError::Connect {
            address: endpoint.address.clone(),
            source: e,
        })?
        .connect_timeout(endpoint.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let timeout = endpoint.connect_timeout;
    // Set by the connector when the handshake refused the server's certificate, so the error
    // is typed here, where it happens, instead of searched for in tonic's error chain.
    let refused: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let refused_in = refused.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let target = target.clone();
        let tls = tls.clone();
        let refused = refused_in.clone();
        async move {
            let dial = async {
                let addr = target.resolve().await?;
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                Ok::<_, io::Error>(tcp)
            };
            let tcp = tokio::time::timeout(timeout, dial).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {} timed out", target.address),
                )
            })??;
            match tls {
                Some((connector, name)) => {
                    let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
                        .await
                        .map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("TLS handshake with {} timed out", target.address),
                            )
                        })?
                        .inspect_err(|e| {
                            // tokio-rustls carries the rustls error inside the io::Error.
                            if let Some(r @ rustls::Error::InvalidCertificate(_)) =
                                e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
                            {
                                *refused.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(r.to_string());
                            }
                        })?;
                    Ok::<_, io::Error>(TokioIo::new(MaybeTls::Tls(Box::new(stream))))
                }
                None => Ok(TokioIo::new(MaybeTls::Plain(tcp))),
            }
        }
    });
    let channel = channel_endpoint
        .connect_with_connector(connector)
        .await
        .map_err(
            |source| match refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(reason) => TlsError::ServerCertificate {
                    address: endpoint.address.clone(),
                    reason,
                },
                None => TlsError::Connect {
                    address: endpoint.address.clone(),
                    source,
                },
            },
        )?;
    Ok(MeshClient::new(channel))
}

#[derive(Clone)]
struct Target {
    address: String,
    resolved: Option<SocketAddr>,
}

impl Target {
    async fn resolve(&self) -> io::Result<SocketAddr> {
        if let Some(a) = self.resolved {
            return Ok(a);
        }
        tokio::net::lookup_host(self.address.as_str())
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} resolves to no address", self.address),
                )
            })
    }
}

/// A client connection, with or without TLS.
enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_roundtrip() {
        let a = ClusterName::new("east-1").unwrap();
        for id in [
            SpiffeId::apiserver(a.clone()),
            SpiffeId::agent(a.clone(), "node-1.zone"),
            SpiffeId {
                cluster: a,
                role: SpiffeRole::Operator {
                    name: "admin".into(),
                },
            },
        ] {
            assert_eq!(SpiffeId::parse(&id.uri()).unwrap(), id);
        }
        assert_eq!(
            SpiffeId::agent(ClusterName::new("c").unwrap(), "n").uri(),
            "spiffe://c.mesh/agent/n"
        );
    }

    #[test]
    fn bad_spiffe_ids_are_named() {
        for bad in [
            "https://a.mesh/apiserver",
            "spiffe://a.mesh",
            "spiffe://a.example/apiserver",
            "spiffe://A.mesh/apiserver",
            "spiffe://default.mesh/apiserver",
            "spiffe://a.mesh/agent/",
            "spiffe://a.mesh/agent/Node_1",
            "spiffe://a.mesh/controller",
            "spiffe://a.mesh/operator/",
            "spiffe://a.mesh/apiserver/x",
        ] {
            let err = SpiffeId::parse(bad).unwrap_err();
            assert!(
                matches!(err, AuthError::InvalidSpiffeId { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(bad), "{err}");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::Unauthenticated
            );
        }
    }

    #[test]
    fn no_certificate_is_unauthenticated() {
        let ca = rcgen_ca();
        let trust = TrustStore::new(ClusterName::new("a").unwrap(), vec![ca]).unwrap();
        let conn = ConnInfo {
            remote_addr: Some("127.0.0.1:4000".parse().unwrap()),
            local_addr: None,
            peer_certs: None,
        };
        let err = authenticate(&conn, &trust).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:4000"), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn an_empty_ca_bundle_is_refused() {
        let err = TrustStore::new(ClusterName::new("a").unwrap(), vec![]).unwrap_err();
        assert!(err.to_string().contains("cluster a"), "{err}");
    }

    proptest::proptest! {
        /// The SPIFFE parser never panics, and whatever it accepts prints back to its input.
        #[test]
        fn spiffe_parser_is_total(uri in "(spiffe://)?[a-z0-9.-]{0,12}(/[a-z0-9/._-]{0,20})?") {
            if let Ok(id) = SpiffeId::parse(&uri) {
                proptest::prop_assert_eq!(id.uri(), uri);
            }
        }

        #[test]
        fn spiffe_ids_print_and_parse(cluster in "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", node in proptest::option::of("[a-z0-9][a-z0-9.-]{0,30}")) {
            proptest::prop_assume!(cluster != "default");
            let cluster = ClusterName::new(cluster).unwrap();
            let id = match node {
                Some(node) => SpiffeId::agent(cluster, node),
                None => SpiffeId::apiserver(cluster),
            };
            proptest::prop_assert_eq!(SpiffeId::parse(&id.uri()).unwrap(), id);
        }
    }

    fn rcgen_ca() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().clone()
    }
}
