//! A lab (`mesh-lab up`) for the benchmarks that run in one, driven as a user would: the
//! mesh-lab CLI and kubectl. `mesh-lab down` when dropped, also on Ctrl-C (the benchmark's
//! future is dropped).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// A lab; `mesh-lab down` on drop.
pub struct LabGuard {
    pub name: String,
    mesh_lab: PathBuf,
    kubeconfig: String,
}

impl LabGuard {
    /// `mesh-lab up` with `clusters` clusters (east, west, ...) of `nodes` nodes, named
    /// `<prefix><pid>`.
    pub fn up(mesh_lab: &Path, prefix: &str, clusters: usize, nodes: usize) -> Result<Self> {
        let name = format!("{prefix}{:05x}", std::process::id() & 0xf_ffff);
        let mut guard = LabGuard {
            name,
            mesh_lab: mesh_lab.to_owned(),
            kubeconfig: String::new(),
        };
        eprintln!(
            "starting lab {} ({clusters} clusters, {nodes} nodes each)",
            guard.name
        );
        let status = Command::new(mesh_lab)
            .args(["up", "--name", &guard.name, "--underlay", "auto"])
            .args(["--clusters", &clusters.to_string()])
            .args(["--nodes", &nodes.to_string()])
            .stdout(Stdio::null())
            .status()
            .context("running mesh-lab up")?;
        if !status.success() {
            bail!("mesh-lab up failed ({status})");
        }
        guard.kubeconfig = guard.lab(&["kubeconfig"])?.trim().to_owned();
        Ok(guard)
    }

    /// [`LabGuard::up`] with the lab binaries of `bin_dir` (mesh-lab, meshctl,
    /// mesh-apiserver, mesh-agent), after checking they are all there.
    pub fn up_from(bin_dir: &Path, prefix: &str, clusters: usize, nodes: usize) -> Result<Self> {
        for b in ["mesh-lab", "meshctl", "mesh-apiserver", "mesh-agent"] {
            if !bin_dir.join(b).is_file() {
                bail!(
                    "{b} is not in {}: build the lab binaries (cargo build --release -p \
                     mesh-lab -p meshctl -p mesh-apiserver -p mesh-agent) or pass --bin-dir",
                    bin_dir.display()
                );
            }
        }
        Self::up(&bin_dir.join("mesh-lab"), prefix, clusters, nodes)
    }

    /// Runs `mesh-lab ARGS --name <lab>`; its stdout.
    pub fn lab(&self, args: &[&str]) -> Result<String> {
        let out = self.lab_command(args).output()?;
        if !out.status.success() {
            bail!(
                "mesh-lab {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The command `mesh-lab ARGS --name <lab>`, to spawn.
    pub fn lab_command(&self, args: &[&str]) -> Command {
        // `--name` goes before a `--` (exec's command line), never after it.
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut cmd = Command::new(&self.mesh_lab);
        cmd.args(&args[..split])
            .arg("--name")
            .arg(&self.name)
            .args(&args[split..])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl against `cluster`; its stdout. `stdin` is piped in when given.
    pub fn kubectl(&self, cluster: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = Command::new("kubectl");
        cmd.args(["--kubeconfig", &self.kubeconfig])
            .args(["--context", &format!("{}-{cluster}", self.name)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = match stdin {
            None => cmd.stdin(Stdio::null()).output(),
            Some(text) => {
                use std::io::Write;
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .spawn()
                    .context("running kubectl")?;
                child
                    .stdin
                    .take()
                    .context("kubectl stdin")?
                    .write_all(text.as_bytes())?;
                child.wait_with_output()
            }
        }
        .context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every node of `cluster` with its agent's bpffs pin directory (maps under `maps/`).
    pub fn node_pin_dirs(&self, cluster: &str) -> Result<Vec<(String, PathBuf)>> {
        let env = self.lab(&["env", cluster])?;
        let root = env
            .lines()
            .find_map(|l| {
                l.trim()
                    .trim_start_matches("export ")
                    .strip_prefix("MESH_BPFFS_ROOT=")
            })
            .context("mesh-lab env prints no MESH_BPFFS_ROOT")?
            .trim_matches('\'')
            .to_owned();
        let nodes = self.kubectl(
            cluster,
            &["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"],
            None,
        )?;
        Ok(nodes
            .split_whitespace()
            .map(|n| (n.to_owned(), Path::new(&root).join(n)))
            .collect())
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.mesh_lab)
            .args(["down", "--name", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
