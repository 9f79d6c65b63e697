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
    assert!(
        joined
            .lines()
            .any(|l| l.contains("cargo build --locked --release --bin meshctl")),
        "the meshctl stage builds only meshctl"
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

#[test]
fn every_pair_of_cluster_pod_cidrs_keeps_its_source_addresses() {
    let out = ok("nomasq_pairs", lib_sh("nomasq_pairs", &[]));
    let got: BTreeSet<(String, IpNet, IpNet)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{l:?}");
            (
                f[0].to_owned(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let mut want = BTreeSet::new();
    for a in CLUSTERS {
        for b in CLUSTERS.iter().filter(|b| *b != a) {
            want.insert((a.to_string(), kind_pod_cidr(a), kind_pod_cidr(b)));
        }
    }
    assert_eq!(got, want, "lib.sh's pairs differ from the kind configs");
    // And up.sh applies them on every cluster's nodes, idempotently (-C before -I), first in
    // POSTROUTING so kindnet's KIND-MASQ-AGENT jump (appended) comes after.
    let lib = read("multicluster-kind/lib.sh");
    let body = lib
        .split("keep_pod_sources() {")
        .nth(1)
        .expect("lib.sh keep_pod_sources")
        .split("\n}\n")
        .next()
        .unwrap();
    assert!(body.contains("for node in $(kind get nodes --name \"$c\"); do"));
    assert!(body.contains("-s \"$own\" -d \"$peer\""));
    assert!(body.contains("-j RETURN"));
    let check = body.find("iptables -t nat -C").expect("-C check");
    let insert = body
        .find("iptables -t nat -I \"${rule[0]}\" 1")
        .expect("-I at 1");
    assert!(check < insert, "the rule is checked before it is inserted");
    assert!(body.contains("nomasq_pairs | grep \"^$c \""));
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
    for arch in ["x86_64", "amd64"] {
        assert!(check(&format!("arch_problem {arch}")).status.success());
    }
    let out = check("arch_problem aarch64");
    assert!(!out.status.success());
    let msg = stdout(&out);
    assert!(
        msg.contains("arm64") && msg.contains("build.rs") && msg.contains("x86_64"),
        "{msg}"
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
    let load = lib
        .split("load_image() {")
        .nth(1)
        .expect("load_image")
        .split("\n}\n")
        .next()
        .unwrap();
    assert!(load.contains("docker save") && load.contains("kind load image-archive"));
    assert!(up.contains("load_image \"$image\" \"$c\""));
    assert!(
        !up.contains("kind load docker-image"),
        "up.sh loads only through load_image"
    );
    assert!(up.contains("\ncheck_host\n"), "up.sh runs the host checks");
}
