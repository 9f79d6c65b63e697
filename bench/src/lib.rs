//! mesh-bench: the benchmarks of DESIGN.md section 12, run on the project's real
//! components (etcd, mesh-apiserver and mesh-agent processes, the lab Kubernetes API, the
//! kernel's eBPF maps). Each prints distributions and figures beside their targets; none
//! asserts a speed.
//!
//! - [`propagation`]: pod ready in cluster A -> backend in the service map of a node of B,
//!   and (`failover`) B's last local backend not ready -> remote backends in the map.
//! - [`initial_sync`]: a large synthetic peer in an apiserver's etcd -> a fresh agent's
//!   maps; RSS per endpoint of the agent and the apiserver.
//! - [`fanout`]: one apiserver feeding N watch streams vs N clients watching etcd directly.
//! - [`policy`]: in a lab, a policy applied with kubectl -> enforced in every node's maps,
//!   and connect() to a global service with an egress policy vs without.
//! - [`lose_cluster`]: in a lab, requests from west while east is partitioned away or
//!   east's pods die unseen: time to the last failed request, failures per loss, time to
//!   quarantine.
//! - [`socket_lb`]: connect() to a service VIP translated by socket LB vs a direct connect()
//!   to the backend vs nftables DNAT, with 1k and 10k services, from pod namespaces.
//! - [`scale`]: Cilium's clustermesh scale profile (250 synthetic clusters x 100 nodes served
//!   by the [`generator`] over gRPC, imported by the real importer) into one apiserver and
//!   one agent, under churn.

pub mod cluster;
pub mod env;
pub mod fanout;
pub mod generator;
pub mod hops;
pub mod import_sync;
pub mod initial_sync;
pub mod lab;
pub mod lose_cluster;
pub mod policy;
pub mod propagation;
pub mod report;
pub mod scale;
pub mod soak;
pub mod socket_lb;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::env::Components;
use crate::report::{Machine, Output, Report};

/// mesh-bench: benchmarks of the mesh on this machine (root; etcd installed).
#[derive(Debug, Parser)]
#[command(name = "mesh-bench", version, about)]
pub struct Cli {
    /// Output format of the results (progress goes to stderr).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,

    /// Directory holding the mesh-apiserver and mesh-agent binaries (default: next to
    /// mesh-bench if both are there, else mesh-bench re-executes itself per component).
    #[arg(long, env = "MESH_BENCH_BIN_DIR", global = true)]
    pub bin_dir: Option<PathBuf>,

    /// Run the components as mesh-bench re-executed (same library code as the binaries).
    #[arg(long, global = true)]
    pub self_exec: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every benchmark with its default sizes.
    All,
    /// Pod ready in cluster A -> backend in the service map of a node of cluster B.
    Propagation(propagation::Opts),
    /// B's last local backend not ready -> A's backends in the map (affinity local).
    Failover(propagation::Opts),
    /// A large peer cluster from etcd into a fresh agent's maps; memory per endpoint.
    InitialSync(initial_sync::Opts),
    /// One apiserver feeding N watch streams, vs N clients watching etcd directly.
    Fanout(fanout::Opts),
    /// In a lab: policy applied with kubectl -> enforced on every node; connect() with an
    /// egress policy vs without (needs mesh-lab, meshctl, mesh-apiserver, mesh-agent in
    /// --bin-dir or next to mesh-bench).
    Policy(policy::Opts),
    /// In a lab: east partitioned from west, and east's pods deleted while its etcd is down;
    /// west's failed requests and the time to the last one, time to quarantine (needs the
    /// lab binaries like `policy`).
    LoseCluster(lose_cluster::Opts),
    /// A cluster with an agent and N synthetic agent streams under continuous churn for
    /// --minutes: RSS and fds of every process over time, and a verdict (no unbounded
    /// growth; every stream converged to etcd key for key). Exits 1 when it fails.
    Soak(soak::Opts),
    /// connect() from a pod netns to a service VIP translated by the socket-LB programs vs
    /// directly to a backend vs nftables DNAT (kube-proxy's nftables shape), 1k and 10k
    /// services: connect rate and latency percentiles.
    SocketLb(socket_lb::Opts),
    /// Cilium's clustermesh scale profile: N synthetic clusters (mesh-bench's generator,
    /// real gRPC Watch, one CA and port each) imported by one apiserver, one agent; time to
    /// full sync, propagation under churn, CPU, RSS per endpoint, etcd size.
    Scale(scale::Opts),
    /// One socket-lb client run: joins CGROUP, times COUNT connect() calls (run by the
    /// socket-lb benchmark with nsenter in a client netns).
    #[command(hide = true)]
    SocketLbClient {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long, value_enum)]
        target: socket_lb::ClientTarget,
        #[arg(long)]
        services: usize,
        #[arg(long)]
        backends: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        start: usize,
    },
    /// The socket-lb benchmark's listener (run with nsenter in the server netns).
    #[command(hide = true)]
    SocketLbServer {
        #[arg(long)]
        port: u16,
    },
    /// Times COUNT connect() calls to ADDR (run inside a pod by the policy benchmark).
    #[command(hide = true)]
    ConnectLoop { addr: String, count: usize },
    /// HTTP GETs to ADDR for SECONDS, one line per request (run inside a pod by the
    /// lose-cluster benchmark).
    #[command(hide = true)]
    RequestLoop {
        addr: String,
        seconds: u64,
        timeout_ms: u64,
    },
    /// Runs a component (used when no binaries are next to mesh-bench).
    #[command(hide = true)]
    Component {
        role: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ConnectLoop { addr, count } = &cli.command {
        return match policy::connect_loop(addr, *count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::RequestLoop {
        addr,
        seconds,
        timeout_ms,
    } = &cli.command
    {
        return match lose_cluster::request_loop(addr, *seconds, *timeout_ms) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let helper = match &cli.command {
        Command::SocketLbClient {
            cgroup,
            target,
            services,
            backends,
            count,
            start,
        } => Some(socket_lb::client(
            cgroup, *target, *services, *backends, *count, *start,
        )),
        Command::SocketLbServer { port } => Some(socket_lb::server(*port)),
        _ => None,
    };
    if let Some(r) = helper {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Component { role, args } = &cli.command {
        return match run_component(role, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Ctrl-C or SIGTERM drops the benchmark's future: its guards stop every process
        // and remove every namespace, cgroup, pin and directory it made.
        tokio::select! {
            r = run(cli) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
            s = interrupted() => {
                eprintln!("\n{s}: stopping and cleaning up");
                ExitCode::from(130)
            }
        }
    });
    // Tasks still holding guards are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(10));
    code
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "interrupted",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

/// Runs the benchmarks named by the command line.
pub async fn run(cli: Cli) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    env::check_preconditions()?;
    let components = Components::resolve(cli.bin_dir.clone(), cli.self_exec)?;
    let machine = Machine::detect(components.describe());
    let mut reports = Vec::new();
    let mut failed = false;
    let emit = |r: &Report| {
        if cli.output == Output::Table {
            println!("{}", r.render_table());
        }
    };
    match cli.command {
        Command::All => {
            for f in [propagation::Kind::Propagation, propagation::Kind::Failover] {
                let r = propagation::run(f, &propagation::Opts::default(), &components, &machine)
                    .await?;
                emit(&r);
                reports.push(r);
            }
            let r =
                initial_sync::run(&initial_sync::Opts::default(), &components, &machine).await?;
            emit(&r);
            reports.push(r);
            // The honest variant: the peer served over gRPC and imported by the importer.
            let via = initial_sync::Opts {
                via_importer: true,
                ..initial_sync::Opts::default()
            };
            let r = initial_sync::run(&via, &components, &machine).await?;
            emit(&r);
            reports.push(r);
            let r = fanout::run(&fanout::Opts::default(), &components, &machine).await?;
            emit(&r);
            reports.push(r);
            // The honest variant: one object per etcd transaction.
            let one = fanout::Opts {
                txn_ops: 1,
                ..fanout::Opts::default()
            };
            let r = fanout::run(&one, &components, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::Propagation(o) => {
            let r =
                propagation::run(propagation::Kind::Propagation, &o, &components, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::Failover(o) => {
            let r =
                propagation::run(propagation::Kind::Failover, &o, &components, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::InitialSync(o) => {
            let r = initial_sync::run(&o, &components, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::Fanout(o) => {
            let r = fanout::run(&o, &components, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::Policy(o) => {
            let r = policy::run(&o, &lab_bin_dir(&cli.bin_dir)?, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::LoseCluster(o) => {
            let r = lose_cluster::run(&o, &lab_bin_dir(&cli.bin_dir)?, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::Soak(o) => {
            let r = soak::run(&o, &components, &machine).await?;
            emit(&r);
            failed |= !soak::passed(&r);
            reports.push(r);
        }
        Command::Scale(o) => {
            let r = scale::run(&o, &components, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::SocketLb(o) => {
            let r = socket_lb::run(&o, &machine).await?;
            emit(&r);
            reports.push(r);
        }
        Command::Component { .. }
        | Command::ConnectLoop { .. }
        | Command::RequestLoop { .. }
        | Command::SocketLbClient { .. }
        | Command::SocketLbServer { .. } => {
            unreachable!("handled in main")
        }
    }
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).context("encoding the results")?
        );
    }
    if failed {
        anyhow::bail!("the soak's verdict is FAIL (see the figures above)");
    }
    Ok(())
}

/// Where the lab binaries are: `--bin-dir`, else next to mesh-bench.
fn lab_bin_dir(bin_dir: &Option<PathBuf>) -> Result<PathBuf> {
    match bin_dir {
        Some(d) => Ok(d.clone()),
        None => Ok(std::env::current_exe()
            .context("mesh-bench's own path")?
            .parent()
            .context("mesh-bench's directory")?
            .to_owned()),
    }
}

/// `mesh-bench component apiserver|agent -- ARGS`: the component's own `main`.
fn run_component(role: &str, args: &[String]) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        "apiserver" => {
            let args = mesh_apiserver::Args::parse_from(
                std::iter::once("mesh-apiserver".to_owned()).chain(args.iter().cloned()),
            );
            mesh_apiserver::init_tracing(&args.log);
            runtime.block_on(mesh_apiserver::run(args))?;
        }
        "agent" => {
            let args = mesh_agent::Args::parse_from(
                std::iter::once("mesh-agent".to_owned()).chain(args.iter().cloned()),
            );
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_ansi(false)
                .try_init();
            let settings = args.validate().context("invalid configuration")?;
            runtime.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    interrupted().await;
                    stop.cancel();
                });
                mesh_agent::run(settings, shutdown).await
            })?;
        }
        other => anyhow::bail!("unknown component {other:?}: expected apiserver or agent"),
    }
    Ok(())
}

/// Progress on stderr: one rewritten line on a terminal, a line per tenth otherwise.
pub struct Progress {
    label: String,
    total: usize,
    tty: bool,
    last_tenth: usize,
    started: Instant,
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Self {
        let p = Progress {
            label: label.to_owned(),
            total,
            tty: std::io::stderr().is_terminal(),
            last_tenth: 0,
            started: Instant::now(),
        };
        if !p.tty {
            eprintln!("{label}: 0/{total}");
        }
        p
    }

    pub fn set(&mut self, done: usize) {
        if self.tty {
            eprint!(
                "\r{}: {done}/{} ({:.1}s)   ",
                self.label,
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        } else {
            let tenth = done * 10 / self.total.max(1);
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!("{}: {done}/{}", self.label, self.total);
            }
        }
    }

    pub fn finish(self) {
        if self.tty {
            eprintln!(
                "\r{}: {}/{} done in {:.1}s   ",
                self.label,
                self.total,
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// A step message on stderr.
pub fn step(msg: &str) {
    eprintln!("-- {msg}");
}
