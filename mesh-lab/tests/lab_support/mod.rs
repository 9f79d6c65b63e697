//! Harness for the lab tests: runs the real `mesh-lab` binary (and through it the real
//! meshctl, mesh-apiserver, mesh-agent, etcd), each test with its own lab name and
//! `--underlay auto`, and a guard that runs `mesh-lab down` on drop (also on failure).
//!
//! The other binaries must sit next to `mesh-lab` (the same cargo target dir): cargo only
//! builds this crate's binaries for its tests, so the harness runs
//! `cargo build -p meshctl -p mesh-apiserver -p mesh-agent` into that target dir when one is
//! missing or older than the workspace's newest source file: never missing, never stale.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn mesh_lab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mesh-lab"))
}

/// Makes sure meshctl, mesh-apiserver and mesh-agent are built, and up to date, next to
/// mesh-lab (`mesh_testkit::bins::ensure_built`), once per test process.
pub fn ensure_binaries() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if *built {
        return;
    }
    let exe = mesh_lab();
    mesh_testkit::bins::ensure_built(
        exe.parent().expect("bin dir"),
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap(),
        &["meshctl", "mesh-apiserver", "mesh-agent"],
    );
    *built = true;
}

/// A lab name unique to this test process and tag (at most 8 characters).
pub fn lab_name(tag: char) -> String {
    format!("{tag}{:06x}", std::process::id() & 0xff_ffff)
}

/// A running lab; `mesh-lab down` on drop.
pub struct LabGuard {
    pub name: String,
    pub cache: tempfile::TempDir,
}

impl LabGuard {
    /// `mesh-lab up --name NAME --underlay auto ARGS...`; panics with the output on failure.
    pub fn up(name: &str, args: &[&str]) -> LabGuard {
        mesh_testkit::require_root("a lab (mesh-lab up)");
        ensure_binaries();
        let guard = LabGuard {
            name: name.to_owned(),
            cache: tempfile::tempdir().expect("kubectl cache dir"),
        };
        let mut all = vec![
            "up",
            "--name",
            name,
            "--underlay",
            "auto",
            "--timeout",
            "180",
        ];
        all.extend_from_slice(args);
        let out = guard.lab(&all);
        assert!(
            out.status.success(),
            "mesh-lab up failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        guard
    }

    /// Runs `mesh-lab ARGS...` (with this lab's name where the command takes one).
    pub fn lab(&self, args: &[&str]) -> Output {
        Command::new(mesh_lab())
            .args(args)
            .env("MESH_LAB_NAME", &self.name)
            .stdin(Stdio::null())
            .output()
            .expect("running mesh-lab")
    }

    /// Runs `mesh-lab ARGS...` and returns stdout; panics with stderr on failure.
    pub fn lab_ok(&self, args: &[&str]) -> String {
        let out = self.lab(args);
        assert!(
            out.status.success(),
            "mesh-lab {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(self.lab_ok(&["kubeconfig"]).trim())
    }

    pub fn kubectl(&self, context_cluster: &str, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--context")
            .arg(format!("{}-{context_cluster}", self.name))
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .expect("running kubectl")
    }

    pub fn kubectl_ok(&self, cluster: &str, args: &[&str]) -> String {
        let out = self.kubectl(cluster, args);
        assert!(
            out.status.success(),
            "kubectl {args:?} on {cluster} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.lab_ok(&["status", "-o", "json"])).expect("status JSON")
    }

    /// The state of one component in `mesh-lab status -o json`.
    pub fn component(&self, cluster: &str, component: &str) -> serde_json::Value {
        let st = self.status_json();
        st["components"]
            .as_array()
            .expect("components")
            .iter()
            .find(|c| c["cluster"] == cluster && c["component"] == component)
            .cloned()
            .unwrap_or_else(|| panic!("no component {cluster}/{component} in {st}"))
    }

    /// `meshctl status -o json` against a cluster's apiserver, as the lab's operator.
    pub fn meshctl_status(&self, cluster: &str) -> Option<serde_json::Value> {
        let st = self.status_json();
        let state = PathBuf::from(st["kubeconfig"].as_str().expect("kubeconfig"))
            .parent()
            .expect("state dir")
            .to_path_buf();
        let addr = st["components"]
            .as_array()?
            .iter()
            .find(|c| c["cluster"] == cluster && c["component"] == "apiserver")?["address"]
            .as_str()?
            .to_owned();
        let pki = state.join(cluster).join("pki");
        let meshctl = mesh_lab().parent()?.join("meshctl");
        let out = Command::new(meshctl)
            .args([
                "status",
                "-o",
                "json",
                "--server",
                &addr,
                "--cluster",
                cluster,
            ])
            .arg("--tls-ca")
            .arg(pki.join("ca.crt"))
            .arg("--tls-cert")
            .arg(pki.join("operator-admin.crt"))
            .arg("--tls-key")
            .arg(pki.join("operator-admin.key"))
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let out = self.lab(&["down"]);
        if !out.status.success() {
            eprintln!(
                "mesh-lab down --name {} failed:\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Polls `f` until it returns `Some` (state owned by other processes or the kernel).
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything of lab `name` still on this machine, by its naming prefixes.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut v = Vec::new();
    let prefix = format!("mlab-{name}-");
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) {
            v.push(format!("netns {n}"));
        }
    }
    if Path::new("/sys/class/net")
        .join(format!("mlab-{name}"))
        .exists()
    {
        v.push(format!("bridge mlab-{name}"));
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if let Some(cg2) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    }) {
        let cg = cg2.join("mesh-lab").join(name);
        if cg.exists() {
            v.push(format!("cgroup {}", cg.display()));
        }
    }
    let pins = Path::new("/sys/fs/bpf/mesh-lab").join(name);
    if pins.exists() {
        v.push(format!("bpffs dir {}", pins.display()));
    }
    for l in mounts.lines() {
        if l.contains(&format!("/mesh-lab/{name}")) {
            v.push(format!("mount {l}"));
        }
    }
    let state = Path::new("/run/mesh-lab").join(name);
    if state.exists() {
        v.push(format!("state dir {}", state.display()));
    }
    // Processes of the lab: their command lines name the lab's state dir or netns.
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&format!("/run/mesh-lab/{name}/"))
            || cmd.contains(&prefix)
            || cmd.contains(&format!("supervise --name {name}"))
        {
            v.push(format!(
                "process {}: {cmd}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    v
}
