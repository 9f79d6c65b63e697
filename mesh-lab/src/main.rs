//! mesh-lab: whole meshes on one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use mesh_lab::kube_api::{KubeApi, KubeApiConfig};
use mesh_lab::lab;

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
    /// Build a lab: clusters of nodes (network namespaces) with etcd, mesh-apiserver and agents.
    Up(lab::cli::UpArgs),
    /// Remove everything a lab made (also after a crash). Idempotent.
    Down(lab::cli::NameArg),
    /// What runs in a lab.
    Status(lab::cli::StatusArgs),
    /// Print the path of the lab's kubeconfig (one context per cluster: <lab>-<cluster>).
    Kubeconfig(lab::cli::NameArg),
    /// Print shell exports pointing kubectl and meshctl at one cluster of the lab.
    Env(lab::cli::EnvArgs),
    /// Run a command inside a pod (its network namespace, cgroup and resolv.conf).
    Exec(lab::cli::ExecArgs),
    /// Kill a component: apiserver, etcd or agent/NODE (it stays down until `start`).
    Kill(lab::cli::ComponentArgs),
    /// Start a killed component again.
    Start(lab::cli::ComponentArgs),
    /// Cut traffic (control plane and pods) between two clusters.
    Partition(lab::cli::PartitionArgs),
    /// Remove every partition.
    Heal(lab::cli::NameArg),
    /// The lab's supervisor (started by `up`).
    #[command(hide = true)]
    Supervise(lab::cli::NameArg),
    /// Join a netns/cgroup/mount namespace and exec a command (used by the supervisor).
    #[command(hide = true)]
    Enter(lab::cli::EnterArgs),
    /// The HTTP workload every lab pod runs (answers with JSON naming the pod).
    #[command(hide = true)]
    Workload(WorkloadArgs),
}

#[derive(Args, Debug)]
struct WorkloadArgs {
    /// Address to serve on (repeat for every container port).
    #[arg(long, default_value = "0.0.0.0:80")]
    listen: Vec<SocketAddr>,
    /// Directory of the pod's container logs: one request log per container
    /// (`<dir>/<container>.log`, CRI format); no request log without it.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// A container and its ports, `NAME=PORT[,PORT...]` (repeat per container): a request is
    /// logged to the container whose port it arrived on, else to the first container.
    #[arg(long = "container", value_parser = mesh_lab::pod_logs::parse_container_arg)]
    containers: Vec<(String, Vec<u16>)>,
    /// The reply (JSON when it parses, else a string); MESH_LAB_REPLY when absent.
    #[arg(last = true)]
    reply: Vec<String>,
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

async fn run_workload(args: WorkloadArgs) -> anyhow::Result<()> {
    let id = mesh_lab::workload::Identity::from_env(&args.reply);
    let stop = async {
        if let Err(error) = wait_for_signal().await {
            tracing::warn!(%error, "signal handling failed");
            std::future::pending::<()>().await;
        }
    };
    let log = match &args.log_dir {
        Some(dir) => {
            let mut containers = args.containers.clone();
            if containers.is_empty() {
                let ports = args.listen.iter().map(|a| a.port()).collect();
                containers.push(("workload".to_string(), ports));
            }
            mesh_lab::workload::RequestLog::open(dir, &containers)
                .with_context(|| format!("opening the container logs in {}", dir.display()))?
        }
        None => mesh_lab::workload::RequestLog::disabled(),
    };
    mesh_lab::workload::serve(&args.listen, id, log, stop)
        .await
        .context("workload")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `enter` execs another program: no runtime, no threads (unshare needs a lone thread).
    if let Command::Enter(args) = cli.command {
        return lab::cli::enter(args);
    }
    init_logging(&cli.log);
    match cli.command {
        Command::KubeApi(args) => runtime()?.block_on(run_kube_api(args)),
        Command::Up(a) => lab::cli::up(a),
        Command::Down(a) => lab::cli::down(a),
        Command::Status(a) => lab::cli::status(a),
        Command::Kubeconfig(a) => lab::cli::kubeconfig(a),
        Command::Env(a) => lab::cli::env(a),
        Command::Exec(a) => {
            let code = lab::cli::exec(a)?;
            std::process::exit(code)
        }
        Command::Kill(a) => lab::cli::kill(a),
        Command::Start(a) => lab::cli::start(a),
        Command::Partition(a) => lab::cli::partition(a),
        Command::Heal(a) => lab::cli::heal(a),
        Command::Supervise(a) => runtime()?.block_on(lab::supervisor::run(&a.name)),
        Command::Enter(_) => unreachable!("handled above"),
        Command::Workload(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run_workload(a)),
    }
}
