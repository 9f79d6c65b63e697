//! meshctl: the operator's CLI. One module per subcommand; `main` only parses and dispatches.

mod bpf;
mod cert;
mod conn;
mod connect;
mod inspect;
mod observe;
mod output;
mod policy;
mod service;
mod status;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Operate a mesh of Kubernetes clusters"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authorities (one per cluster).
    #[command(subcommand)]
    Ca(cert::CaCommand),
    /// Certificates for apiservers, agents and operators, signed by a cluster's CA.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// The mesh as an apiserver sees it: clusters, peers, agents.
    Status(status::StatusArgs),
    /// What an apiserver publishes: clusters, nodes, identities, endpoints, services.
    Inspect(inspect::InspectArgs),
    /// Connect two clusters: exchange their apiservers' addresses and CAs (peer Secrets).
    Connect(connect::ConnectArgs),
    /// Disconnect two clusters: remove each one's entry from the other's peer Secret.
    Disconnect(connect::DisconnectArgs),
    /// Global services per cluster, and why a node selects (or leaves out) each backend.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Network policies: what each selects in every cluster, and the verdict for one flow.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// What is in this node's eBPF maps (read-only, run as root on the node).
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
    /// Flow counters per (source, destination) identity pair from this node's maps.
    Flows(bpf::PinArgs),
    /// Flows from the apiserver's relay (Hubble's Observer API), with Hubble's flags.
    Observe(Box<observe::ObserveArgs>),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Ca(cmd) => cert::run_ca(cmd),
        Command::Cert(cmd) => cert::run_cert(cmd),
        Command::Status(a) => runtime()?.block_on(status::run(a)),
        Command::Inspect(a) => runtime()?.block_on(inspect::run(a)),
        Command::Connect(a) => runtime()?.block_on(connect::run_connect(a)),
        Command::Disconnect(a) => runtime()?.block_on(connect::run_disconnect(a)),
        Command::Service(c) => runtime()?.block_on(service::run(c)),
        Command::Policy(c) => {
            let code = runtime()?.block_on(policy::run(c))?;
            if code != 0 {
                use std::io::Write;
                std::io::stdout().flush()?;
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Bpf(c) => bpf::run(c),
        Command::Flows(a) => bpf::run_flows(a),
        Command::Observe(a) => runtime()?.block_on(observe::run(*a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
