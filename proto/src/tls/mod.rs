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

mod auth;
mod client;
mod incoming;
mod pem;
mod server;
mod spiffe;
#[cfg(test)]
mod tests;
mod trust;

pub use auth::*;
pub use client::*;
pub use incoming::*;
pub use pem::*;
pub use server::*;
pub use spiffe::*;
pub use trust::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

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
