//! Authentication: from a client certificate to a [`Caller`].

use std::fmt;
use std::net::SocketAddr;

use mesh_core::ClusterName;

use super::*;

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
