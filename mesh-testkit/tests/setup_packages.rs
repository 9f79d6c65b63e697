//! `scripts/setup.sh` installs every Debian package whose files the build, the tests, the
//! demo and the benchmarks read from the system.
//!
//! A green CI on a machine where someone once installed a package by hand hides a missing
//! install step (it did: protoc's well-known `.proto` files come with `libprotobuf-dev`, only
//! a Recommends of `protobuf-compiler`, which `--no-install-recommends` drops). So for each
//! system file the project uses, the owning package (`dpkg -S`) must be named in setup.sh,
//! be a hard dependency (Depends/PreDepends, recursively) of a package it names, or be part
//! of every Debian system (Essential or Priority required).
//!
//! kubectl is left out: Debian ships no usable version, so setup.sh says what to install.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The package names of setup.sh's `packages=( ... )` array (comments stripped).
fn setup_packages() -> BTreeSet<String> {
    let path = repo().join("scripts/setup.sh");
    let text = std::fs::read_to_string(&path).expect("reading scripts/setup.sh");
    let start = text
        .find("packages=(")
        .expect("setup.sh has a packages=( ... ) array");
    let body = &text[start + "packages=(".len()..];
    let end = body
        .find("\n)")
        .expect("the packages array ends with `)` on its own line");
    body[..end]
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split_whitespace())
        .map(str::to_owned)
        .collect()
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("running {cmd} {args:?}: {e} (this check needs Debian's dpkg and apt)")
    })
}

/// Every package apt installs for `names` with `--no-install-recommends`.
fn hard_closure(names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut args = vec![
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ];
    args.extend(names.iter().map(String::as_str));
    let out = run("apt-cache", &args);
    assert!(
        out.status.success(),
        "apt-cache depends failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // Package lines start in column 0; dependency lines are indented; virtual
        // packages are <in brackets> (a real package providing them is listed too).
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(|l| l.trim().split(':').next().unwrap_or("").to_owned())
        .chain(names.iter().cloned())
        .collect()
}

/// The package owning `path`, trying the /usr-merged twin (/bin/x vs /usr/bin/x) too.
fn owner(path: &Path) -> Option<String> {
    let s = path.to_string_lossy().into_owned();
    let twin = match s.strip_prefix("/usr") {
        Some(rest) => rest.to_owned(),
        None => format!("/usr{s}"),
    };
    for p in [s, twin] {
        let out = run("dpkg", &["-S", &p]);
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let first = text.lines().next().unwrap_or("");
            let pkg = first.split(':').next().unwrap_or("").trim();
            // "diversion by ..." lines have no package of their own.
            if !pkg.is_empty() && !pkg.contains(' ') {
                return Some(pkg.to_owned());
            }
        }
    }
    None
}

fn always_present(pkg: &str) -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Essential} ${Priority}", pkg]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.starts_with("yes") || text.ends_with("required")
}

fn command_path(name: &str) -> Option<PathBuf> {
    let out = run("sh", &["-c", &format!("command -v {name}")]);
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !p.is_empty())
        .then(|| std::fs::canonicalize(&p).unwrap_or_else(|_| PathBuf::from(p)))
}

/// The system headers the eBPF programs include (`#include <...>` in bpf/), found where
/// mesh-agent's build.rs points clang: /usr/include and the multiarch directory.
fn bpf_headers() -> Vec<PathBuf> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("bpf")).expect("reading bpf/") {
        let path = entry.expect("bpf/ entry").path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("#include <") {
                found.insert(rest.trim_end_matches('>').to_owned());
            }
        }
    }
    assert!(!found.is_empty(), "no system #include found in bpf/");
    // linux/types.h pulls in asm/types.h from the multiarch directory.
    found.insert("asm/types.h".into());
    found
        .into_iter()
        .map(|h| {
            ["/usr/include", "/usr/include/x86_64-linux-gnu"]
                .iter()
                .map(|d| Path::new(d).join(&h))
                .find(|p| p.exists())
                .unwrap_or_else(|| {
                    panic!("bpf/ includes <{h}>, which is not installed: scripts/setup.sh must install its package")
                })
        })
        .collect()
}

#[test]
fn setup_sh_names_every_package_the_project_reads_from_the_system() {
    let named = setup_packages();
    assert!(named.contains("etcd-server"), "parsed {named:?}");
    let closure = hard_closure(&named);

    // Programs the build, tests, demo, benchmarks and lint run (kubectl: see the top).
    let commands = [
        "etcd",       // tests, lab, benchmarks
        "etcdctl",    // operators' and the demo's inspection
        "clang",      // mesh-agent's build.rs compiles bpf/
        "bpftool",    // datapath tests inspect programs
        "protoc",     // mesh-proto and etcd-client build scripts
        "ip",         // netns, veth, routes
        "ping",       // lab probes
        "curl",       // demo and e2e requests
        "nft",        // lab kube-proxy rules
        "jq",         // demo
        "shellcheck", // lint in scripts/test.sh
        "nsenter",    // tests enter namespaces
        "mount",
        "umount",
    ];
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut problems = Vec::new();
    for c in commands {
        match command_path(c) {
            Some(p) => files.push((format!("command {c}"), p)),
            None => problems.push(format!(
                "command {c} is not installed: scripts/setup.sh must install its package"
            )),
        }
    }
    // protoc's well-known types, which etcd-client's protos import.
    files.push((
        "protoc include google/protobuf/descriptor.proto".into(),
        PathBuf::from("/usr/include/google/protobuf/descriptor.proto"),
    ));
    // The independent Observer client (mesh-apiserver/tests/observer_client.rs): Debian's
    // python3 with grpcio and protobuf, and the gRPC Python code generator.
    for (what, path) in [
        ("observer client: python3", "/usr/bin/python3"),
        (
            "observer client: grpc_python_plugin",
            "/usr/bin/grpc_python_plugin",
        ),
        (
            "observer client: grpcio",
            "/usr/lib/python3/dist-packages/grpc/__init__.py",
        ),
        (
            "observer client: protobuf",
            "/usr/lib/python3/dist-packages/google/protobuf/__init__.py",
        ),
    ] {
        files.push((what.into(), PathBuf::from(path)));
    }
    for h in bpf_headers() {
        files.push((format!("bpf/ header {}", h.display()), h));
    }

    for (what, path) in &files {
        if !path.exists() {
            problems.push(format!(
                "{what} ({}) is missing: scripts/setup.sh must install its package",
                path.display()
            ));
            continue;
        }
        let Some(pkg) = owner(path) else {
            problems.push(format!(
                "{what} ({}) belongs to no Debian package (installed by hand?): \
                 install it with scripts/setup.sh instead",
                path.display()
            ));
            continue;
        };
        if !closure.contains(&pkg) && !always_present(&pkg) {
            problems.push(format!(
                "{what} ({}) comes from Debian package {pkg}, which scripts/setup.sh \
                 neither names nor installs as a dependency: add {pkg} to its packages",
                path.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_package_list_parser_reads_setup_sh() {
    let named = setup_packages();
    for p in [
        "etcd-server",
        "clang",
        "libbpf-dev",
        "protobuf-compiler",
        "libprotobuf-dev",
    ] {
        assert!(named.contains(p), "{p} not parsed from setup.sh: {named:?}");
    }
    assert!(named.iter().all(|p| !p.contains('#')), "{named:?}");
}
