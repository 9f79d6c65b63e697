//! How meshctl reaches a mesh-apiserver: address, CA and client certificate (flags shared
//! by every subcommand that talks gRPC).

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mesh_core::{ClusterName, parse_duration};
use mesh_proto::cli::TlsArgs;
use mesh_proto::pb::mesh_client::MeshClient;
use mesh_proto::tls::{ClientEndpoint, ClientTls, connect};
use tonic::transport::Channel;

#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// Address of the mesh-apiserver (host:port).
    #[arg(long, env = "MESH_SERVER", default_value = "127.0.0.1:7443")]
    pub server: String,
    /// The client certificate's SPIFFE ID decides what meshctl may read; `--insecure` talks
    /// plaintext to an apiserver started with --insecure on a loopback address.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Cluster the apiserver must prove to be (its spiffe://<cluster>.mesh/apiserver).
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster: Option<ClusterName>,
    /// Time limit for connecting.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

// === impl ConnArgs ===

impl ConnArgs {
    pub fn endpoint(&self) -> anyhow::Result<ClientEndpoint> {
        let mut ep = if self.tls.insecure {
            ClientEndpoint::plaintext(self.server.clone())
        } else {
            let files = self.tls.files().map_err(|missing| {
                anyhow::anyhow!(
                    "--tls-ca, --tls-cert and --tls-key are required to reach {} (missing: {}), or --insecure for a plaintext loopback apiserver",
                    self.server,
                    missing.join(", ")
                )
            })?;
            let tls =
                ClientTls::from_files(&files.ca, &files.cert, &files.key, self.cluster.clone())
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
