//! mesh-apiserver binary: parse flags, initialise tracing, run.

use clap::Parser;
use mesh_apiserver::Args;

/// See ARCHITECTURE, "Decision (issue 17, allocator)".
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_apiserver::init_tracing(&args.log);
    mesh_apiserver::run(args).await?;
    Ok(())
}
