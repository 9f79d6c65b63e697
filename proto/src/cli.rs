//! Flag groups shared by the binaries (`#[command(flatten)]`), defined once: TLS material and
//! log output. Every flag has a `MESH_*` environment fallback.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// The TLS material of a mesh component, client or server: its own certificate and key, and
/// the CA of its cluster that verifies the other side. Used by mesh-apiserver (serving and
/// dialing peers), mesh-agent and meshctl.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// CA bundle (PEM) of the own cluster: verifies the other side's certificate.
    #[arg(long, env = "MESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Certificate chain (PEM) this component presents; its SPIFFE ID
    /// (`spiffe://<cluster>.mesh/...`) is its identity.
    #[arg(long, env = "MESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert. Never logged.
    #[arg(long, env = "MESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Plaintext instead of TLS; refused unless the address (listened on or dialed) is
    /// loopback.
    #[arg(long, env = "MESH_INSECURE", default_value_t = false)]
    pub insecure: bool,
}

/// The three files of [`TlsArgs`], all given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

// === impl TlsArgs ===

impl TlsArgs {
    /// The files, when all three are given; otherwise the flags that are missing, in the
    /// order `--tls-cert, --tls-key, --tls-ca` (each binary words its own error around them:
    /// what `--insecure` means differs between a listener and a client).
    pub fn files(&self) -> Result<TlsFiles, Vec<&'static str>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (cert, key, ca) => Err([
                (cert.is_none(), "--tls-cert"),
                (key.is_none(), "--tls-key"),
                (ca.is_none(), "--tls-ca"),
            ]
            .into_iter()
            .filter_map(|(missing, flag)| missing.then_some(flag))
            .collect()),
        }
    }
}

/// Log output. The level comes from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Default, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn missing_files_are_named() {
        let cli = Cli::try_parse_from(["x", "--tls-ca", "/ca.crt"]).unwrap();
        assert_eq!(cli.tls.files(), Err(vec!["--tls-cert", "--tls-key"]));
        let cli = Cli::try_parse_from(["x", "--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c"])
            .unwrap();
        assert_eq!(
            cli.tls.files(),
            Ok(TlsFiles {
                ca: "a".into(),
                cert: "b".into(),
                key: "c".into()
            })
        );
        assert_eq!(cli.log.log_format, LogFormat::Text);
    }

    #[test]
    fn every_flag_has_an_env_fallback() {
        let cmd = <Cli as clap::CommandFactory>::command();
        for arg in cmd.get_arguments() {
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("MESH_")),
                "--{} has no MESH_* env fallback",
                arg.get_id()
            );
        }
    }
}
