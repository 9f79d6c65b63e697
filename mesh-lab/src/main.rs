//! mesh-lab: whole meshes on one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use mesh_lab::kube_api::{KubeApi, KubeApiConfig};

#[derive(Parser, Debug)]
#[command(
    name = "mesh-lab",
    version,
    about = "Whole meshes on one Linux machine"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct LogArgs {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG is used when unset.
    #[arg(long, env = "MESH_LOG", global = true)]
    log: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "MESH_LOG_JSON", global = true)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a Kubernetes-compatible API server and write its kubeconfig.
    KubeApi(KubeApiArgs),
}

#[derive(Args, Debug)]
struct KubeApiArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "MESH_KUBE_API_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Directory for the CA, token, server certificate and kubeconfig.
    #[arg(long, env = "MESH_LAB_DIR")]
    dir: PathBuf,
    /// Cluster name.
    #[arg(long, env = "MESH_CLUSTER", default_value = "lab")]
    cluster: String,
    /// Kubeconfig context name (default: the cluster name).
    #[arg(long, env = "MESH_KUBE_CONTEXT")]
    context: Option<String>,
    /// CIDR that Service ClusterIPs are allocated from.
    #[arg(long, env = "MESH_SERVICE_CIDR", default_value = "10.96.0.0/16")]
    service_cidr: IpNet,
    /// Number of changes kept for watches to resume from.
    #[arg(long, env = "MESH_WATCH_HISTORY", default_value_t = 10_000)]
    watch_history: usize,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, env = "MESH_BOOKMARK_INTERVAL", default_value_t = 60)]
    bookmark_interval: u64,
    /// Extra subject alternative names (IPs or DNS names) for the serving certificate.
    #[arg(long = "tls-san", env = "MESH_TLS_SANS", value_delimiter = ',')]
    tls_sans: Vec<String>,
}

fn init_logging(args: &LogArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = match &args.log {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run_kube_api(args: KubeApiArgs) -> anyhow::Result<()> {
    let mut config = KubeApiConfig::new(&args.dir, &args.cluster);
    config.listen = args.listen;
    if let Some(c) = args.context {
        config.context = c;
    }
    config.service_cidr = args.service_cidr;
    config.watch_history = args.watch_history;
    config.bookmark_interval = Duration::from_secs(args.bookmark_interval.max(1));
    config.extra_sans = args.tls_sans;
    let handle = KubeApi::start(config)
        .await
        .context("starting the kube-api server")?;
    println!("kubeconfig: {}", handle.kubeconfig_path().display());
    println!("server: {}", handle.url());
    wait_for_signal().await?;
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::KubeApi(args) => run_kube_api(args).await,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log);
    run(cli).await
}
