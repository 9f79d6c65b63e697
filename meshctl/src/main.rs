//! meshctl: the operator's CLI. One module per subcommand; `main` only parses and dispatches.

mod cert;
mod conn;
mod inspect;
mod output;
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Ca(cmd) => cert::run_ca(cmd),
        Command::Cert(cmd) => cert::run_cert(cmd),
        Command::Status(a) => runtime()?.block_on(status::run(a)),
        Command::Inspect(a) => runtime()?.block_on(inspect::run(a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
