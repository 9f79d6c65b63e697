//! The `mesh-lab kube-api` command: flags with env fallbacks, the kubeconfig it writes, and
//! a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kube_api_command_serves_kubectl_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_mesh-lab"))
            .args(["kube-api", "--listen", "127.0.0.1:0"])
            .arg("--dir")
            .arg(dir.path())
            .env("MESH_CLUSTER", "east")
            .env("MESH_KUBE_CONTEXT", "lab-east")
            .env("MESH_SERVICE_CIDR", "10.55.0.0/16")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mesh-lab kube-api"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let kubeconfig = first
        .trim()
        .strip_prefix("kubeconfig: ")
        .unwrap_or_else(|| panic!("first line names the kubeconfig: {first:?}"))
        .to_string();

    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(text.contains("current-context: lab-east"), "{text}");
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "--cache-dir"])
        .arg(cache.path())
        .args([
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "10.55.0.1");

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exits cleanly on SIGTERM: {status}");
}

/// `mesh-lab env CLUSTER` from a lab's `lab.json`: where meshctl's apiserver, certificates
/// and `bpf` pin directories are, and the kubeconfig.
#[test]
fn env_points_meshctl_and_kubectl_at_a_cluster() {
    let state = tempfile::tempdir().unwrap();
    let spec =
        mesh_lab::lab::topology::LabSpec::new("envt", 2, 2, "172.30.0.0/16".parse().unwrap())
            .unwrap();
    let dir = state.path().join("envt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lab.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let env = |cluster: &str| {
        Command::new(env!("CARGO_BIN_EXE_mesh-lab"))
            .args(["env", "--name", "envt", cluster])
            .env("MESH_LAB_STATE_DIR", state.path())
            .output()
            .unwrap()
    };
    let out = env("west");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let vars: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .map(|l| {
            let (k, v) = l.strip_prefix("export ").unwrap().split_once('=').unwrap();
            (k, v.trim_matches('\''))
        })
        .collect();
    assert_eq!(
        vars["MESH_BPFFS_ROOT"], "/sys/fs/bpf/mesh-lab/envt/west",
        "{text}"
    );
    assert_eq!(vars["MESH_SERVER"], "172.30.2.2:7443", "{text}");
    assert_eq!(vars["MESH_CLUSTER_NAME"], "west");
    assert_eq!(
        vars["KUBECONFIG"],
        dir.join("kubeconfig").display().to_string()
    );
    // An unknown cluster is named, with the ones that exist.
    let out = env("nowhere");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"nowhere\"") && err.contains("east, west"),
        "{err}"
    );
}
