//! How meshctl reaches a mesh-apiserver: address, CA and client certificate (flags shared
//! by every subcommand that talks gRPC).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mesh_core::ClusterName;
use mesh_proto::pb::mesh_client::MeshClient;
use mesh_proto::tls::{ClientEndpoint, ClientTls, connect};
use tonic::transport::Channel;

#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// Address of the mesh-apiserver (host:port).
    #[arg(long, env = "MESH_SERVER", default_value = "127.0.0.1:7443")]
    pub server: String,
    /// CA bundle that signed the apiserver's certificate.
    #[arg(long, env = "MESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (its SPIFFE ID decides what meshctl may read).
    #[arg(long, env = "MESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key.
    #[arg(long, env = "MESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Cluster the apiserver must prove to be (its spiffe://<cluster>.mesh/apiserver).
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster: Option<ClusterName>,
    /// Plaintext, only to a loopback address (an apiserver started with --insecure).
    #[arg(long, env = "MESH_INSECURE")]
    pub insecure: bool,
    /// Time limit for connecting.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

// === impl ConnArgs ===

impl ConnArgs {
    pub fn endpoint(&self) -> anyhow::Result<ClientEndpoint> {
        let mut ep = if self.insecure {
            ClientEndpoint::plaintext(self.server.clone())
        } else {
            let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
            else {
                anyhow::bail!(
                    "--tls-ca, --tls-cert and --tls-key are required to reach {} (or --insecure for a plaintext loopback apiserver)",
                    self.server
                );
            };
            let tls = ClientTls::from_files(ca, cert, key, self.cluster.clone())
                .context("loading TLS files")?;
            ClientEndpoint::new(self.server.clone(), tls)
        };
        ep.connect_timeout = self.connect_timeout;
        Ok(ep)
    }

    pub async fn connect(&self) -> anyhow::Result<MeshClient<Channel>> {
        let ep = self.endpoint()?;
        connect(&ep)
            .await
            .with_context(|| format!("connecting to mesh-apiserver {}", self.server))
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5x").unwrap_err().contains("5x"));
        assert!(parse_duration("").is_err());
    }
}
