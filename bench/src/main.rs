//! mesh-bench binary: see the library for the benchmarks.

fn main() -> std::process::ExitCode {
    mesh_bench::main()
}
