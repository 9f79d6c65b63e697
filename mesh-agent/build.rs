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
    let arch_include = arch_include()?;

    println!("cargo:rerun-if-env-changed=CLANG");
    for header in ["mesh.h", "policy.h", "events.h"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(header).display());
    }

    for name in OBJECTS {
        let src = bpf_dir.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        compile(
            &clang,
            &bpf_dir,
            &arch_include,
            &src,
            &out_dir.join(format!("{name}.bpf.o")),
        )?;
    }
    Ok(())
}

/// The multiarch include directory of the target (Debian's `/usr/include/<triplet>`), where
/// the kernel's `asm/` headers live: `-target bpf` has no architecture of its own, so
/// `linux/types.h` finds `asm/types.h` only there. The target's, not the host's: x86_64 and
/// aarch64 (amd64 and arm64 images) are the two the images are built for.
fn arch_include() -> anyhow::Result<PathBuf> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let dir = PathBuf::from(format!("/usr/include/{arch}-linux-gnu"));
    if !dir.join("asm").join("types.h").is_file() {
        bail!(
            "{}/asm/types.h not found: the eBPF programs need the kernel headers of the \
             target architecture ({arch}); install linux-libc-dev (libc6-dev and libbpf-dev \
             depend on it)",
            dir.display()
        );
    }
    Ok(dir)
}

fn compile(
    clang: &str,
    include: &Path,
    arch_include: &Path,
    src: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let output = Command::new(clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I{}", arch_include.display()))
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
