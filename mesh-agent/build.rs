//! Compiles the eBPF programs in ../bpf with clang into OUT_DIR; the datapath
//! module embeds the objects with `include_bytes!`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The objects the agent loads, one per `bpf/<name>.bpf.c`.
const OBJECTS: &[&str] = &["sock_lb", "flows"];

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let bpf_dir = manifest.join("..").join("bpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    println!("cargo:rerun-if-env-changed=CLANG");
    for header in ["mesh.h", "policy.h"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(header).display());
    }

    for name in OBJECTS {
        let src = bpf_dir.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        compile(
            &clang,
            &bpf_dir,
            &src,
            &out_dir.join(format!("{name}.bpf.o")),
        )?;
    }
    Ok(())
}

fn compile(clang: &str, include: &Path, src: &Path, out: &Path) -> anyhow::Result<()> {
    let output = Command::new(clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I{}", include.display()))
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .with_context(|| {
            format!(
                "cannot run `{clang}` to build the eBPF programs: install clang/llvm and \
                 libbpf-dev with scripts/setup.sh, or point CLANG at a clang binary"
            )
        })?;
    if !output.status.success() {
        bail!(
            "`{clang}` failed to compile {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
