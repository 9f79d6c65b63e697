//! The kind path of issue 15, checked without kind or a container engine: each test reads
//! the real files (or runs the real shell functions of multicluster-kind/lib.sh, or the
//! bpffs init container's script in a mount namespace of the real kernel) and would fail on
//! the files as they were before the fix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deploy_check::checks::{self, Workload};
use deploy_check::load::{self, ManifestObject};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Container;

const CLUSTERS: &[&str] = &["cluster1", "cluster2"];

fn root() -> PathBuf {
    load::repo_root()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Runs `body` in bash after sourcing multicluster-kind/lib.sh, as the scripts do.
fn lib_sh(body: &str, env: &[(&str, &str)]) -> Output {
    let lib = root().join("multicluster-kind/lib.sh");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -euo pipefail; source \"$1\"\n{body}"))
        .arg("bash")
        .arg(&lib)
        .env_remove("MESH_IMAGE_TAG")
        .env_remove("KIND_NODE_IMAGE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("bash runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn agent_workload(objs: &[ManifestObject]) -> Workload<'_> {
    checks::workloads(objs)
        .into_iter()
        .find(|w| w.object.kind() == "DaemonSet" && w.object.name() == "mesh-agent")
        .expect("the mesh-agent DaemonSet")
}

fn container<'a>(w: &Workload<'a>, name: &str) -> &'a Container {
    let spec = w.template.spec.as_ref().expect("pod spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{}: no container {name}", w.object))
}

fn rendered(cluster: &str) -> Vec<ManifestObject> {
    load::load_kustomization(&root().join("multicluster-kind/clusters").join(cluster))
        .unwrap_or_else(|e| panic!("{e}"))
}

// === images/Dockerfile and scripts/setup.sh ===

/// The packages of the `apt-get install` in the Dockerfile stage named `stage`.
fn dockerfile_apt_packages(dockerfile: &str, stage: &str) -> BTreeSet<String> {
    // Join continuation lines, then find the stage's RUN lines.
    let joined = dockerfile.replace("\\\n", " ");
    let mut in_stage = false;
    let mut out = BTreeSet::new();
    for line in joined.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("FROM ") {
            in_stage = rest.split(" AS ").nth(1).map(str::trim) == Some(stage);
            continue;
        }
        if !in_stage || !line.starts_with("RUN ") {
            continue;
        }
        for cmd in line.split("&&") {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "install")
                && words[..i].contains(&"apt-get")
            {
                out.extend(
                    words[i + 1..]
                        .iter()
                        .filter(|w| !w.starts_with('-'))
                        .map(|w| w.to_string()),
                );
            }
        }
    }
    out
}

/// setup.sh's `packages=( ... )` array, comments stripped.
fn setup_packages(text: &str) -> BTreeSet<String> {
    let start = text
        .find("\npackages=(")
        .expect("setup.sh packages=( ... )")
        + 1;
    let body = &text[start + "packages=(".len()..];
    let end = body.find("\n)").expect("packages array ends with )");
    body[..end]
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

#[test]
fn dockerfile_installs_exactly_setups_build_packages() {
    let out = Command::new("bash")
        .arg(root().join("scripts/setup.sh"))
        .arg("--build-packages")
        .output()
        .unwrap();
    let build: BTreeSet<String> = ok("setup.sh --build-packages", out)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    for p in [
        "clang",
        "libbpf-dev",
        "protobuf-compiler",
        "libprotobuf-dev",
    ] {
        assert!(
            build.contains(p),
            "setup.sh's build_packages lack {p}: {build:?}"
        );
    }
    let all = setup_packages(&read("scripts/setup.sh"));
    assert!(
        build.is_subset(&all),
        "build_packages not installed by setup.sh: {:?}",
        build.difference(&all).collect::<Vec<_>>()
    );
    let docker = dockerfile_apt_packages(&read("images/Dockerfile"), "toolchain");
    assert_eq!(
        docker, build,
        "images/Dockerfile's toolchain stage installs {docker:?}, setup.sh's build_packages are {build:?}"
    );
}

#[test]
fn meshctl_is_an_image_target_up_sh_copies_out() {
    let dockerfile = read("images/Dockerfile");
    let joined = dockerfile.replace("\\\n", " ");
    assert!(
        joined.contains("FROM toolchain AS meshctl-build"),
        "meshctl builds on the toolchain stage"
    );
    // The meshctl-build stage's one RUN: a static musl build for the engine's architecture,
    // refused when the result still asks for a dynamic loader.
    let stage_run: Vec<&str> = joined
        .split("FROM toolchain AS meshctl-build\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| !l.starts_with("FROM "))
        .filter(|l| l.starts_with("RUN "))
        .collect();
    assert_eq!(stage_run.len(), 1, "{stage_run:?}");
    let steps: Vec<&str> = stage_run[0].split("&&").map(str::trim).collect();
    assert!(
        steps[0].ends_with("musl=\"$(uname -m)-unknown-linux-musl\""),
        "the musl target of the engine's architecture: {steps:?}"
    );
    assert_eq!(
        steps[1..4],
        [
            "rustup target add \"$musl\"",
            "TARGET_CC=gcc cargo build --locked --release --target \"$musl\" --bin meshctl",
            "install -D -m 0755 \"target/$musl/release/meshctl\" /out/meshctl",
        ],
        "the meshctl stage builds only meshctl, statically"
    );
    assert!(
        steps[4].starts_with("if readelf --program-headers /out/meshctl | grep -q INTERP; then")
            && steps[4].contains("exit 1"),
        "the stage fails on a dynamically linked meshctl: {steps:?}"
    );
    let stage: Vec<&str> = joined
        .split("FROM scratch AS meshctl\n")
        .nth(1)
        .expect("a `meshctl` target FROM scratch")
        .lines()
        .take_while(|l| !l.starts_with("FROM "))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        stage,
        [
            "COPY --from=meshctl-build /out/meshctl /meshctl",
            // docker create refuses an image with no command; nothing ever runs it.
            "ENTRYPOINT [\"/meshctl\"]"
        ]
    );
    let lib = read("multicluster-kind/lib.sh");
    for needle in [
        "--target meshctl",
        "cid=$(docker create \"$image\")",
        "docker cp \"$cid:/meshctl\" \"$dir/meshctl\"",
        "docker rm \"$cid\"",
    ] {
        assert!(lib.contains(needle), "lib.sh does not run {needle}");
    }
    // Docker is the default; cargo only when asked for.
    assert!(lib.contains("elif [ \"${MESHCTL_FROM:-docker}\" = cargo ]; then"));
    let up = read("multicluster-kind/up.sh");
    let require = up
        .lines()
        .find(|l| l.starts_with("require "))
        .expect("up.sh requires its tools");
    assert!(
        !require.contains("cargo") && !require.contains("meshctl"),
        "up.sh must not require cargo or meshctl up front: {require}"
    );
    // meshctl's own dependencies stay free of the crates that need clang and etcd.
    let manifest = read("meshctl/Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    for heavy in ["mesh-agent", "mesh-apiserver", "etcd-client", "aya"] {
        assert!(
            !deps.lines().any(|l| l.trim_start().starts_with(heavy)),
            "meshctl depends on {heavy}"
        );
    }
}

/// Runs find_meshctl, then `meshctl`, with a stand-in docker whose `meshctl` image holds a
/// script printing VERSION, the state directory STATE and no other meshctl on PATH.
fn find_meshctl_with(state: &Path, version: &str) -> (Output, Vec<String>) {
    let bin = state.join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let docker = bin.join("docker");
    std::fs::write(
        &docker,
        format!(
            r#"#!/usr/bin/env bash
set -euo pipefail
echo "docker $*" >>"$MESH_KIND_STATE/calls"
case $1 in
  info | build | rm) ;;
  create) echo cid1 ;;
  cp) printf '#!/bin/sh\necho {version}\n' >"$3" ;;
  *) exit 2 ;;
esac
"#
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&docker)
        .status()
        .unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let out = lib_sh(
        "find_meshctl; meshctl",
        &[
            ("PATH", path.as_str()),
            ("MESH_KIND_STATE", state.to_str().unwrap()),
            ("MESH_IMAGE_TAG", "t2"),
        ],
    );
    let calls = std::fs::read_to_string(state.join("calls")).unwrap_or_default();
    std::fs::remove_file(state.join("calls")).ok();
    (out, calls.lines().map(str::to_owned).collect())
}

#[test]
fn meshctl_copied_from_older_sources_is_rebuilt() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    // A copy left by an earlier up.sh, from other sources (tag t1).
    std::fs::write(dir.join("meshctl"), "#!/bin/sh\necho old\n").unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(dir.join("meshctl"))
        .status()
        .unwrap();
    std::fs::write(dir.join("meshctl.tag"), "t1\n").unwrap();

    let (out, calls) = find_meshctl_with(state.path(), "new");
    let text = ok("find_meshctl", out);
    assert_eq!(text.lines().last(), Some("new"), "{text}");
    assert!(
        calls.iter().any(|c| c.starts_with("docker build ")
            && c.contains("--target meshctl --tag localhost/mesh-meshctl:t2 ")),
        "{calls:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("meshctl.tag")).unwrap(),
        "t2\n"
    );
    // Same sources again: the copy is used, nothing is built.
    let (out, calls) = find_meshctl_with(state.path(), "newer");
    assert_eq!(ok("find_meshctl", out).lines().last(), Some("new"));
    assert!(
        !calls.iter().any(|c| c.starts_with("docker build ")),
        "{calls:#?}"
    );
}

#[test]
fn builds_do_not_assume_x86_64() {
    // bpf/ is compiled with the target's multiarch headers, not x86_64's.
    let build_rs = read("mesh-agent/build.rs");
    assert!(
        !build_rs.contains("x86_64-linux-gnu"),
        "mesh-agent/build.rs names x86_64's include directory"
    );
    assert!(build_rs.contains("env::var(\"CARGO_CFG_TARGET_ARCH\")"));
    assert!(build_rs.contains("format!(\"/usr/include/{arch}-linux-gnu\")"));
    // The header that include directory is for exists here (the x86_64 build ran with it).
    assert!(Path::new("/usr/include/x86_64-linux-gnu/asm/types.h").is_file());
    // Nothing the Dockerfile runs or pulls names an architecture.
    let dockerfile = read("images/Dockerfile");
    for line in dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        for arch in ["x86_64", "amd64", "aarch64", "arm64", "--platform"] {
            assert!(!line.contains(arch), "images/Dockerfile: {line}");
        }
    }
    // Images are saved for the engine's platform, not a fixed one.
    let lib = read("multicluster-kind/lib.sh");
    assert!(!lib.contains("--platform linux/"), "lib.sh pins a platform");
    assert!(lib.contains("docker image save --platform \"$DOCKER_PLATFORM\""));
    assert!(lib.contains("DOCKER_PLATFORM=$(arch_platform \"$arch\") || die \"$DOCKER_PLATFORM\""));
}

// === bpffs ===

#[test]
fn bpffs_mounts_propagate_from_the_init_container_to_the_node_and_agent() {
    let objs = rendered("cluster1");
    let w = agent_workload(&objs);
    let propagation = |c: &str| {
        container(&w, c)
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "bpffs")
            .unwrap_or_else(|| panic!("{c} does not mount bpffs"))
            .mount_propagation
            .clone()
    };
    assert_eq!(propagation("mount-bpffs").as_deref(), Some("Bidirectional"));
    assert_eq!(propagation("agent").as_deref(), Some("HostToContainer"));
}

/// Runs the init container's own command in a private mount namespace, after `setup`
/// (shell) has put something at /sys/fs/bpf; prints `stat -f -c %T /sys/fs/bpf` and the
/// number of mounts at /sys/fs/bpf, before and after.
fn run_init_script(setup: &str) -> String {
    let objs = rendered("cluster1");
    let w = agent_workload(&objs);
    let command = container(&w, "mount-bpffs").command.clone().unwrap();
    assert_eq!(command[..2], ["/bin/sh", "-ec"], "{command:?}");
    let count = "grep -c ' /sys/fs/bpf ' /proc/self/mountinfo";
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(format!(
            "{setup}\nbefore=$({count})\n\"$@\" >&2\necho \"$(stat -f -c %T /sys/fs/bpf) $before $({count})\""
        ))
        .arg("sh")
        .args(&command)
        .output()
        .expect("unshare (util-linux) runs; this test needs root");
    ok("the bpffs init script", out)
}

#[test]
fn bpffs_init_container_mounts_bpffs_over_anything_else() {
    // The node's /sys/fs/bpf without bpffs, as on kind: a mount point of another type
    // (here tmpfs; on a node, the hostPath bind of sysfs). `mountpoint -q` said yes and
    // mounted nothing; the type check mounts bpffs.
    let out = run_init_script("mount -t tmpfs tmpfs /sys/fs/bpf");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[0], "bpf_fs", "after the init script: {out}");
    let (before, after): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    assert_eq!(after, before + 1, "one bpffs mounted on top: {out}");
}

#[test]
fn bpffs_init_container_leaves_a_mounted_bpffs_alone() {
    // Restarts of the pod must not stack a new (empty) bpffs over the pinned maps.
    let out = run_init_script("mount -t bpf bpf /sys/fs/bpf");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields[0], "bpf_fs", "{out}");
    assert_eq!(fields[1], fields[2], "no second mount: {out}");
}

// === kindnet masquerade ===

fn kind_pod_cidr(cluster: &str) -> IpNet {
    let text = read(&format!("multicluster-kind/kind-{cluster}.yaml"));
    let doc = &load::documents(&text, cluster).unwrap()[0];
    doc["networking"]["podSubnet"]
        .as_str()
        .unwrap_or_else(|| panic!("kind-{cluster}.yaml: no podSubnet"))
        .parse()
        .unwrap()
}

fn all_pod_cidrs() -> Vec<IpNet> {
    CLUSTERS.iter().map(|c| kind_pod_cidr(c)).collect()
}

#[test]
fn kindnet_pod_subnet_covers_every_clusters_pod_cidr() {
    let out = ok("all_pod_cidrs", lib_sh("all_pod_cidrs", &[]));
    let got: Vec<IpNet> = out
        .trim()
        .split(',')
        .map(|c| c.parse().unwrap_or_else(|e| panic!("{c:?}: {e}")))
        .collect();
    assert_eq!(got, all_pod_cidrs(), "POD_SUBNET vs the kind configs");
    for cidr in &got {
        // iptables -S prints the network address; the chain check compares text.
        assert_eq!(*cidr, cidr.trunc(), "{cidr} is not a network address");
    }
    // The value is set on kind's kindnet container and read back with a jsonpath: both run
    // here with the real kubectl on a DaemonSet shaped as kind's (kube-system/kindnet,
    // container kindnet-cni, env POD_SUBNET), offline (--local).
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("kindnet.yaml");
    std::fs::write(
        &ds,
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: kindnet, namespace: kube-system}\n\
         spec:\n  selector: {matchLabels: {app: kindnet}}\n  template:\n    metadata: {labels: {app: kindnet}}\n\
         \x20   spec:\n      containers:\n      - name: kindnet-cni\n        image: kindnetd\n        env:\n\
         \x20       - {name: HOST_IP, value: x}\n        - {name: POD_SUBNET, value: 10.1.0.0/16}\n",
    )
    .unwrap();
    let body = format!(
        "kubectl set env --local -f {} -c kindnet-cni \"POD_SUBNET=$(all_pod_cidrs)\" -o \"jsonpath=$KINDNET_POD_SUBNET_JSONPATH\"",
        ds.display()
    );
    let out = ok("kubectl set env --local", lib_sh(&body, &[]));
    assert_eq!(
        out.trim(),
        got.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
}

/// `iptables -t nat -S KIND-MASQ-AGENT` as kind's kindnetd leaves it: a RETURN per
/// POD_SUBNET entry, "appended unless present", then MASQUERADE (kind's masq.go).
fn kindnet_chain(returns_before: &[&str], returns_after: &[&str]) -> String {
    let ret = |c: &str| {
        format!(
            "-A KIND-MASQ-AGENT -d {c} -m comment --comment \"kind-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN\n"
        )
    };
    let mut out = "-N KIND-MASQ-AGENT\n".to_owned();
    returns_before.iter().for_each(|c| out += &ret(c));
    out += "-A KIND-MASQ-AGENT -m comment --comment \"kind-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE\n";
    returns_after.iter().for_each(|c| out += &ret(c));
    out
}

#[test]
fn masq_chain_problem_finds_cidrs_masqueraded() {
    let run = |cidrs: &str, chain: &str| {
        lib_sh(
            "masq_chain_problem \"$CIDRS\" \"$CHAIN\"",
            &[("CIDRS", cidrs), ("CHAIN", chain)],
        )
    };
    let both = "10.1.0.0/16,10.2.0.0/16";
    // Built from the full POD_SUBNET: both RETURNs first.
    let out = run(both, &kindnet_chain(&["10.1.0.0/16", "10.2.0.0/16"], &[]));
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(stdout(&out), "");
    // Built from the cluster's own CIDR, then the peer appended by a restarted kindnet:
    // after MASQUERADE, so never reached.
    let out = run(both, &kindnet_chain(&["10.1.0.0/16"], &["10.2.0.0/16"]));
    assert!(!out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        "kindnet masquerades traffic to 10.2.0.0/16 (no RETURN before its MASQUERADE rule)"
    );
    // Own CIDR only.
    let out = run(both, &kindnet_chain(&["10.1.0.0/16"], &[]));
    assert!(!out.status.success() && stdout(&out).contains("to 10.2.0.0/16 "));
    // A chain kindnet has not written yet.
    let out = run(both, "-N KIND-MASQ-AGENT\n");
    assert!(!out.status.success() && stdout(&out).contains("no MASQUERADE rule"));
    let out = run(both, "");
    assert!(!out.status.success());
}

/// Stand-ins for kind, kubectl and docker that play a kind cluster's kindnet as kind's
/// kindnetd does it (images/kindnetd/cmd/kindnetd/masq.go at the pinned release: POD_SUBNET
/// split on commas, rules appended unless present, chain never flushed; a pod restart
/// re-syncs). Every call is logged to $FAKE/calls. Only kind itself can show that the real
/// kindnetd behaves so; these check keep_pod_sources' own logic and its shell.
fn fake_kind(dir: &Path, kindnet_ignores_extra_cidrs: bool) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let write = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(
            &path,
            format!("#!/usr/bin/env bash\nset -euo pipefail\n{body}"),
        )
        .unwrap();
        Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    };
    let first_only = if kindnet_ignores_extra_cidrs {
        "cidrs=(\"${cidrs[0]}\")"
    } else {
        ""
    };
    write(
        "kindnet-sync",
        &format!(
            r#"node=$1 c=${{1%%-*}}
chain=$FAKE/chain-$node
[ -f "$chain" ] || echo "-N KIND-MASQ-AGENT" >"$chain"
append() {{ grep -qxF -- "$1" "$chain" || echo "$1" >>"$chain"; }}
IFS=, read -ra cidrs <"$FAKE/podsubnet-$c"
{first_only}
for cidr in "${{cidrs[@]}}"; do
  append "-A KIND-MASQ-AGENT -d $cidr -m comment --comment \"kind-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN"
done
append "-A KIND-MASQ-AGENT -m comment --comment \"kind-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE"
"#
        ),
    );
    write(
        "kind",
        r#"echo "kind $*" >>"$FAKE/calls"
[ "$1 $2 $3" = "get nodes --name" ] || exit 2
printf '%s\n' "$4-control-plane" "$4-worker"
"#,
    );
    write(
        "docker",
        r#"echo "docker $*" >>"$FAKE/calls"
[ "$1" = exec ] || exit 2
node=$2; shift 2
case "$*" in
  "sh -c "*) exit 1 ;; # no nftables table
  "iptables -t nat -S KIND-MASQ-AGENT")
    [ -f "$FAKE/chain-$node" ] || { echo "iptables: No chain/target/match by that name." >&2; exit 1; }
    cat "$FAKE/chain-$node" ;;
  "iptables -t nat -F KIND-MASQ-AGENT") echo "-N KIND-MASQ-AGENT" >"$FAKE/chain-$node" ;;
  *) echo "docker: unexpected $*" >&2; exit 2 ;;
esac
"#,
    );
    write(
        "kubectl",
        r#"echo "kubectl $*" >>"$FAKE/calls"
[ "$1 $3 $4" = "--context -n kube-system" ] || exit 2
c=${2#kind-}; shift 4
case "$1 $2" in
  "get daemonset")
    [ "$3 $4" = "kindnet -o" ] && [[ $5 == jsonpath=* ]] || exit 2
    cat "$FAKE/podsubnet-$c" ;;
  "set env")
    [ "$3 $4 $5" = "daemonset/kindnet -c kindnet-cni" ] && [[ $6 == POD_SUBNET=* ]] || exit 2
    echo "${6#POD_SUBNET=}" >"$FAKE/podsubnet-$c"
    # The rollout restarts kindnet on every node.
    for n in "$c-control-plane" "$c-worker"; do kindnet-sync "$n"; done ;;
  "rollout status") ;;
  "get pods")
    [ "$3 $4 $5" = "-l app=kindnet --field-selector" ] || exit 2
    echo "pod/kindnet-${6#spec.nodeName=}" ;;
  "delete pod/kindnet-"*) kindnet-sync "${2#pod/kindnet-}" ;;
  *) echo "kubectl: unexpected $*" >&2; exit 2 ;;
esac
"#,
    );
    // Clusters as kind creates them: kindnet configured with the cluster's own CIDR only.
    for c in CLUSTERS {
        std::fs::write(
            dir.join(format!("podsubnet-{c}")),
            format!("{}\n", kind_pod_cidr(c)),
        )
        .unwrap();
        for node in ["control-plane", "worker"] {
            let out = Command::new(bin.join("kindnet-sync"))
                .arg(format!("{c}-{node}"))
                .env("FAKE", dir)
                .output()
                .unwrap();
            ok("kindnet-sync", out);
        }
    }
}

fn keep_pod_sources(dir: &Path, extra_env: &[(&str, &str)]) -> Output {
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    let fake = dir.to_str().unwrap();
    let mut env = vec![("PATH", path.as_str()), ("FAKE", fake)];
    env.extend_from_slice(extra_env);
    lib_sh(
        "for c in \"${CLUSTERS[@]}\"; do keep_pod_sources \"$c\"; done",
        &env,
    )
}

fn calls(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
    std::fs::remove_file(dir.join("calls")).ok();
    text.lines().map(str::to_owned).collect()
}

#[test]
fn keep_pod_sources_configures_kindnet_and_rebuilds_stale_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fake_kind(d, false);
    let cidrs = all_pod_cidrs();
    let want_env = format!(
        "POD_SUBNET={}",
        cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let chain_ok = |node: &str| {
        let chain = std::fs::read_to_string(d.join(format!("chain-{node}"))).unwrap();
        let lines: Vec<&str> = chain.lines().collect();
        let masq = lines
            .iter()
            .position(|l| l.ends_with("-j MASQUERADE"))
            .unwrap_or_else(|| panic!("{node}: no MASQUERADE: {chain}"));
        for cidr in &cidrs {
            let ret = lines
                .iter()
                .position(|l| l.starts_with(&format!("-A KIND-MASQ-AGENT -d {cidr} ")))
                .unwrap_or_else(|| panic!("{node}: no RETURN for {cidr}: {chain}"));
            assert!(ret < masq, "{node}: {cidr} after MASQUERADE:\n{chain}");
        }
    };

    // First run on fresh clusters: POD_SUBNET set in each; the rollout's kindnet appended the
    // peer after MASQUERADE, so every node's chain is flushed and its kindnet restarted.
    let out = keep_pod_sources(d, &[]);
    ok("keep_pod_sources", out);
    let log = calls(d);
    for c in CLUSTERS {
        assert!(
            log.contains(&format!(
                "kubectl --context kind-{c} -n kube-system set env daemonset/kindnet -c kindnet-cni {want_env}"
            )),
            "{c}: {log:#?}"
        );
        for node in ["control-plane", "worker"] {
            let node = format!("{c}-{node}");
            assert!(
                log.contains(&format!(
                    "docker exec {node} iptables -t nat -F KIND-MASQ-AGENT"
                )),
                "{node} not flushed: {log:#?}"
            );
            chain_ok(&node);
        }
    }

    // Again: nothing to change.
    ok("keep_pod_sources again", keep_pod_sources(d, &[]));
    let log = calls(d);
    assert!(
        !log.iter()
            .any(|l| l.contains(" set env ") || l.contains(" -F ") || l.contains(" delete ")),
        "a rerun changed something: {log:#?}"
    );

    // A node container restart loses its iptables; kindnet rebuilds the chain from the
    // DaemonSet's POD_SUBNET, in order, without up.sh.
    for c in CLUSTERS {
        let node = format!("{c}-worker");
        std::fs::remove_file(d.join(format!("chain-{node}"))).unwrap();
        let out = Command::new(d.join("bin/kindnet-sync"))
            .arg(&node)
            .env("FAKE", d)
            .output()
            .unwrap();
        ok("kindnet-sync", out);
        chain_ok(&node);
    }
}

#[test]
fn keep_pod_sources_stops_when_kindnet_keeps_masquerading() {
    // A kindnet that takes only the first POD_SUBNET entry: up.sh must stop and say what
    // is wrong and where to look, not go on with masqueraded cross-cluster traffic.
    let dir = tempfile::tempdir().unwrap();
    fake_kind(dir.path(), true);
    let out = keep_pod_sources(dir.path(), &[("KINDNET_SYNC_TIMEOUT", "1")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let peer = kind_pod_cidr(CLUSTERS[1]);
    assert!(
        err.contains(&format!(
            "cluster1-control-plane: kindnet masquerades traffic to {peer} (no RETURN before its MASQUERADE rule) after 1s"
        )) && err.contains("docker exec cluster1-control-plane iptables -t nat -S KIND-MASQ-AGENT"),
        "{err}"
    );
    let up = read("multicluster-kind/up.sh");
    assert!(up.contains("for c in \"${CLUSTERS[@]}\"; do\n  keep_pod_sources \"$c\"\ndone"));
}

#[test]
fn pod_cidr_reads_the_kind_config_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kind-quoted.yaml"),
        "networking:\n  podSubnet: \"10.9.0.0/16\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("kind-none.yaml"), "networking: {}\n").unwrap();
    let mk = dir.path().to_str().unwrap();
    let out = ok(
        "pod_cidr",
        lib_sh(&format!("MK_DIR={mk}; pod_cidr quoted"), &[]),
    );
    assert_eq!(out.trim(), "10.9.0.0/16");
    let out = lib_sh(&format!("MK_DIR={mk}; pod_cidr none"), &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("kind-none.yaml has no networking.podSubnet"),
        "{}",
        stderr(&out)
    );
}

// === image tags ===

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    ok(&format!("git {args:?}"), out).trim().to_owned()
}

fn image_tag(dir: &Path, env: &[(&str, &str)]) -> Output {
    lib_sh(&format!("image_tag {}", dir.display()), env)
}

#[test]
fn image_tags_follow_the_content_and_are_never_dev() {
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    std::fs::write(repo.path().join("a.rs"), "fn a() {}\n").unwrap();
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-qm", "a"]);
    let head = git(repo.path(), &["rev-parse", "--short", "HEAD"]);
    let clean = ok("image_tag", image_tag(repo.path(), &[]))
        .trim()
        .to_owned();
    assert_eq!(clean, head, "a clean tree is tagged with its commit");

    std::fs::write(repo.path().join("a.rs"), "fn a() { 1; }\n").unwrap();
    let dirty1 = ok("image_tag", image_tag(repo.path(), &[]))
        .trim()
        .to_owned();
    std::fs::write(repo.path().join("a.rs"), "fn a() { 2; }\n").unwrap();
    let dirty2 = ok("image_tag", image_tag(repo.path(), &[]))
        .trim()
        .to_owned();
    std::fs::write(repo.path().join("new.rs"), "fn b() {}\n").unwrap();
    let dirty3 = ok("image_tag", image_tag(repo.path(), &[]))
        .trim()
        .to_owned();
    for t in [&dirty1, &dirty2, &dirty3] {
        assert!(t.starts_with(&format!("{head}-dirty-")), "{t}");
        // A valid image tag: [A-Za-z0-9_.-], at most 128 characters.
        assert!(
            t.len() <= 128
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "{t}"
        );
    }
    let distinct: BTreeSet<&String> = [&clean, &dirty1, &dirty2, &dirty3].into_iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "each change gets its own tag: {distinct:?}"
    );
    // Same content, same tag (a rerun reuses the built images).
    assert_eq!(
        ok("image_tag", image_tag(repo.path(), &[])).trim(),
        dirty3.as_str()
    );

    // `dev` is refused even when asked for; a chosen tag is kept.
    let out = image_tag(repo.path(), &[("MESH_IMAGE_TAG", "dev")]);
    assert!(
        !out.status.success() && stderr(&out).contains("MESH_IMAGE_TAG=dev"),
        "{}",
        stderr(&out)
    );
    let out = image_tag(repo.path(), &[("MESH_IMAGE_TAG", "v1.2.3")]);
    assert_eq!(ok("image_tag", out).trim(), "v1.2.3");
    // Outside a checkout: a clear error, not a silent `dev`.
    let plain = tempfile::tempdir().unwrap();
    let out = image_tag(plain.path(), &[]);
    assert!(
        !out.status.success() && stderr(&out).contains("set MESH_IMAGE_TAG"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn up_sh_applies_an_overlay_with_the_content_tag() {
    let state = tempfile::tempdir().unwrap();
    for c in CLUSTERS {
        let dir = state.path().join("overlays").join(c);
        ok(
            "write_overlay",
            lib_sh(
                &format!(
                    "write_overlay {c} 0abc123-dirty-00ff00ff00ff {}",
                    dir.display()
                ),
                &[],
            ),
        );
        let objs = load::load_kustomization(&dir).unwrap_or_else(|e| panic!("{e}"));
        let base = rendered(c);
        assert_eq!(
            objs.len(),
            base.len(),
            "{c}: the overlay renders the same objects"
        );
        let mut mesh_images = 0;
        for w in checks::workloads(&objs) {
            for (c, _) in w.containers() {
                let image = c.image.as_deref().unwrap();
                if image.starts_with("localhost/mesh-") {
                    mesh_images += 1;
                    assert!(
                        image.ends_with(":0abc123-dirty-00ff00ff00ff"),
                        "{}: {} runs {image}",
                        w.object,
                        c.name
                    );
                }
            }
        }
        assert!(mesh_images >= 3, "{c}: {mesh_images} mesh containers");
    }
    let out = lib_sh(
        &format!("write_overlay cluster1 dev {}/x", state.path().display()),
        &[],
    );
    assert!(!out.status.success(), "write_overlay accepted dev");

    // up.sh applies only the generated overlay, with the tag image_tag computed.
    let up = read("multicluster-kind/up.sh");
    assert!(up.contains("tag=$(image_tag \"$ROOT\") || exit 1"));
    assert!(up.contains("write_overlay \"$c\" \"$tag\" \"$STATE/overlays/$c\""));
    assert!(up.contains("run kc \"$c\" apply -k \"$STATE/overlays/$c\""));
    assert!(up.contains("run bash \"$ROOT/scripts/build-images.sh\" \"$tag\""));
    let applies: Vec<&str> = up.lines().filter(|l| l.contains("apply -k")).collect();
    assert_eq!(applies.len(), 1, "{applies:?}");
    assert!(
        !up.contains(":dev") && !up.contains(" dev\n"),
        "up.sh names the dev tag"
    );
}

// === host checks ===

#[test]
fn host_checks_name_the_problem_and_what_to_do() {
    let check = |call: &str| lib_sh(call, &[]);
    for (arch, platform) in [
        ("x86_64", "linux/amd64"),
        ("amd64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("arm64", "linux/arm64"),
    ] {
        let out = ok("arch_platform", check(&format!("arch_platform {arch}")));
        assert_eq!(out.trim(), platform, "{arch}");
    }
    let out = check("arch_platform riscv64");
    assert!(!out.status.success());
    let msg = stdout(&out);
    assert!(
        msg.contains("architecture riscv64 is not supported") && msg.contains("amd64 or arm64"),
        "{msg}"
    );
    assert!(check("os_problem Linux").status.success());
    let out = check("os_problem Darwin");
    assert!(
        !out.status.success()
            && stdout(&out).contains("this host runs Darwin, not Linux")
            && stdout(&out).contains("Docker Desktop"),
        "{}",
        stdout(&out)
    );

    assert!(check("cgroup_problem cgroup2fs").status.success());
    let out = check("cgroup_problem tmpfs");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("tmpfs, not cgroup2fs")
            && stdout(&out).contains("systemd.unified_cgroup_hierarchy=1"),
        "{}",
        stdout(&out)
    );

    let pinned = "kind_version_problem \"kind $KIND_VERSION_PINNED go1.24.2 linux/amd64\" \"$KIND_NODE_IMAGE_PINNED\"";
    assert!(check(pinned).status.success(), "{}", stdout(&check(pinned)));
    let out = check(
        "kind_version_problem 'kind v0.20.0 go1.20.4 linux/amd64' \"$KIND_NODE_IMAGE_PINNED\"",
    );
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("kind v0.20.0 is not the release")
            && stdout(&out).contains("KIND_NODE_IMAGE"),
        "{}",
        stdout(&out)
    );
    // An image the user chose is theirs to match.
    assert!(
        check("kind_version_problem 'kind v0.20.0' kindest/node:v1.27.3")
            .status
            .success()
    );
    // The pinned pair is the one lib.sh uses by default.
    let out = ok(
        "defaults",
        check("echo \"$KIND_NODE_IMAGE $KIND_NODE_IMAGE_PINNED\""),
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f[0], f[1]);

    let out = ok(
        "socket",
        check("docker_socket_of unix:///run/user/1000/docker.sock"),
    );
    assert_eq!(
        out.trim(),
        "/run/user/1000/docker.sock",
        "rootless Docker's socket"
    );
    let out = check("docker_socket_of tcp://10.0.0.1:2376");
    assert!(!out.status.success() && stderr(&out).contains("not a local unix socket"));
    let lib = read("multicluster-kind/lib.sh");
    assert!(lib.contains(
        "endpoint=${DOCKER_HOST:-$(docker context inspect --format '{{.Endpoints.docker.Host}}'"
    ));
    let up = read("multicluster-kind/up.sh");
    assert!(up.contains("-v \"$DOCKER_SOCKET:/var/run/docker.sock\""));
    assert!(!up.contains("-v /var/run/docker.sock:"));

    assert!(
        check("uses_containerd_store '[[driver-type io.containerd.snapshotter.v1]]'")
            .status
            .success()
    );
    assert!(
        !check("uses_containerd_store '[[Backing Filesystem extfs] [Supports d_type true]]'")
            .status
            .success()
    );
    // The workaround for the containerd store needs `docker image save --platform`.
    assert!(
        check("save_platform_problem '      --platform string   Save only the given platform'")
            .status
            .success()
    );
    let out = check("save_platform_problem 'Usage:  docker image save [OPTIONS] IMAGE [IMAGE...]'");
    assert!(
        !out.status.success()
            && stdout(&out).contains("Docker 28")
            && stdout(&out).contains("containerd-snapshotter"),
        "{}",
        stdout(&out)
    );
    let host = lib
        .split("check_host() {")
        .nth(1)
        .expect("check_host")
        .split("\n}\n")
        .next()
        .unwrap();
    for call in [
        "problem=$(os_problem \"$(uname -s)\") || die \"$problem\"",
        "problem=$(save_platform_problem \"$(docker image save --help 2>&1)\") || die \"$problem\"",
    ] {
        assert!(host.contains(call), "check_host does not run {call}");
    }

    // MESHCTL_FROM=cargo: protoc and its well-known protos are checked before building.
    assert!(
        check("protoc_problem protoc").status.success(),
        "protoc and libprotobuf-dev are installed here (scripts/setup.sh): {}",
        stdout(&check("protoc_problem protoc"))
    );
    let out = check("protoc_problem /nonexistent/protoc");
    assert!(
        !out.status.success()
            && stdout(&out).contains("/nonexistent/protoc not found")
            && stdout(&out).contains("protobuf-compiler and libprotobuf-dev"),
        "{}",
        stdout(&out)
    );
    assert!(lib.contains("problem=$(protoc_problem \"${PROTOC:-protoc}\") || die \"$problem\""));

    let load = lib
        .split("load_image() {")
        .nth(1)
        .expect("load_image")
        .split("\n}\n")
        .next()
        .unwrap();
    assert!(
        load.contains("docker image save --platform") && load.contains("kind load image-archive")
    );
    assert!(up.contains("load_image \"$image\" \"$c\""));
    assert!(
        !up.contains("kind load docker-image"),
        "up.sh loads only through load_image"
    );
    assert!(up.contains("\ncheck_host\n"), "up.sh runs the host checks");
}
