//! mesh-bench binary: see the library for the benchmarks.

/// The same allocator as mesh-agent and mesh-apiserver, for `--self-exec` runs of them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_bench::main()
}
