//! The client side: [`ClientTls`], [`ClientEndpoint`] and [`connect`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_core::ClusterName;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Uri};

use super::*;
use crate::pb::mesh_client::MeshClient;

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
        Self::build(ca, identity, ExpectedServer::Apiserver(expected_server))
    }

    /// For dialing an agent's Observer API: the server's leaf must carry
    /// `spiffe://<cluster>.mesh/agent/<node>`. Agents are dialed at node addresses that
    /// their certificates need not list, so the SPIFFE ID (checked after the chain and the
    /// serverAuth usage) replaces the host name check, as SPIFFE's X.509-SVID validation does.
    pub fn for_agent(
        ca: Vec<CertificateDer<'static>>,
        identity: TlsIdentity,
        cluster: ClusterName,
        node: String,
    ) -> Result<Self> {
        Self::build(ca, identity, ExpectedServer::Agent { cluster, node })
    }

    fn build(
        ca: Vec<CertificateDer<'static>>,
        identity: TlsIdentity,
        expected: ExpectedServer,
    ) -> Result<Self> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for (i, cert) in ca.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::InvalidCa {
                cluster: match &expected {
                    ExpectedServer::Apiserver(Some(c))
                    | ExpectedServer::Agent { cluster: c, .. } => c.to_string(),
                    ExpectedServer::Apiserver(None) => "of the server".into(),
                },
                reason: format!("certificate #{i} is not a usable CA: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let inner =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let verifier = Arc::new(MeshServerVerifier {
            inner,
            roots,
            algorithms: provider.signature_verification_algorithms,
            expected,
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

/// Which server identity a client accepts.
#[derive(Debug, Clone)]
enum ExpectedServer {
    /// An apiserver (of this cluster, when set); the host name is checked too.
    Apiserver(Option<ClusterName>),
    /// The agent of `node` in `cluster`; the SPIFFE ID replaces the host name check.
    Agent { cluster: ClusterName, node: String },
}

/// WebPKI verification of the server (chain, usage, and for apiservers the name), then the
/// SPIFFE identity.
#[derive(Debug)]
struct MeshServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    expected: ExpectedServer,
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
        let refuse = |found: String, reason: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(ServerIdentityError { found, reason }),
            )))
        };
        match &self.expected {
            ExpectedServer::Apiserver(_) => {
                self.inner.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )?;
            }
            ExpectedServer::Agent { .. } => {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )?;
            }
        }
        let id = spiffe_id_of(end_entity)
            .map_err(|e| refuse("without a mesh identity".into(), e.to_string()))?;
        match (&self.expected, &id.role) {
            (ExpectedServer::Apiserver(expected), SpiffeRole::Apiserver) => {
                if let Some(expected) = expected
                    && &id.cluster != expected
                {
                    return Err(refuse(
                        id.to_string(),
                        format!("expected the apiserver of cluster {expected}"),
                    ));
                }
            }
            (ExpectedServer::Apiserver(_), _) => {
                return Err(refuse(
                    id.to_string(),
                    "is not an apiserver identity".into(),
                ));
            }
            (ExpectedServer::Agent { cluster, node }, SpiffeRole::Agent { node: got })
                if &id.cluster == cluster && got == node => {}
            (ExpectedServer::Agent { cluster, node }, _) => {
                return Err(refuse(
                    id.to_string(),
                    format!("expected the agent of node {node} in cluster {cluster}"),
                ));
            }
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
    Ok(MeshClient::new(connect_channel(endpoint).await?))
}

/// Dials `endpoint` as [`connect`] does and returns the channel, for any gRPC service (the
/// Observer API of agents and relays).
pub async fn connect_channel(endpoint: &ClientEndpoint) -> Result<Channel> {
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
    Ok(channel)
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
