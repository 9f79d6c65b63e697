//! End-to-end harness: a whole lab (`mesh-lab up`) driven only through its users' tools,
//! the real `mesh-lab` CLI, kubectl and meshctl, as scripts/demo.sh drives it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `mesh-lab` binary of this build; meshctl, mesh-apiserver and mesh-agent sit beside it.
pub fn mesh_lab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mesh-lab"))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Skips (returns `None`) when not root: a lab needs namespaces, cgroups and eBPF.
pub fn root_or_skip(test: &str) -> Option<()> {
    if mesh_testkit::is_root() {
        Some(())
    } else {
        eprintln!("{test}: skipped, needs root (network namespaces, cgroups, eBPF)");
        None
    }
}

/// A running lab; `mesh-lab down` on drop, also when the test fails.
pub struct Lab {
    pub name: String,
    pub clusters: Vec<String>,
    kubeconfig: String,
    cache: tempfile::TempDir,
}

impl Lab {
    /// `mesh-lab up --name NAME --clusters N --nodes M` (after removing leftovers of an
    /// earlier run with the same name).
    pub fn up(name: &str, clusters: usize, nodes: usize) -> Lab {
        crate::lab_support::ensure_binaries();
        let _ = Command::new(mesh_lab())
            .args(["down", "--name", name])
            .output();
        let out = Command::new(mesh_lab())
            .args(["up", "--name", name, "--underlay", "auto"])
            .args([
                "--clusters",
                &clusters.to_string(),
                "--nodes",
                &nodes.to_string(),
            ])
            .output()
            .expect("running mesh-lab up");
        let mut lab = Lab {
            name: name.to_string(),
            clusters: Vec::new(),
            kubeconfig: String::new(),
            cache: tempfile::tempdir().expect("kubectl cache dir"),
        };
        assert!(out.status.success(), "mesh-lab up failed: {}", text(&out));
        let kc = lab.lab(&["kubeconfig"]);
        lab.kubeconfig = String::from_utf8_lossy(&kc.stdout).trim().to_string();
        let contexts = lab.kubectl_raw(&["config", "get-contexts", "-o", "name"]);
        let prefix = format!("{name}-");
        lab.clusters = String::from_utf8_lossy(&contexts.stdout)
            .lines()
            .filter_map(|c| c.strip_prefix(&prefix).map(str::to_string))
            .collect();
        assert_eq!(
            lab.clusters.len(),
            clusters,
            "contexts: {}",
            text(&contexts)
        );
        lab
    }

    /// Runs `mesh-lab <args> --name NAME`, asserting success.
    pub fn lab(&self, args: &[&str]) -> Output {
        let out = self.lab_raw(args);
        assert!(out.status.success(), "mesh-lab {args:?}: {}", text(&out));
        out
    }

    pub fn lab_raw(&self, args: &[&str]) -> Output {
        // `--name` right after the subcommand: after `--` it would belong to the command.
        Command::new(mesh_lab())
            .args(&args[..1])
            .args(["--name", &self.name])
            .args(&args[1..])
            .output()
            .expect("running mesh-lab")
    }

    fn kubectl_raw(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .expect("running kubectl")
    }

    /// kubectl against one cluster (context `<lab>-<cluster>`), asserting success.
    pub fn kubectl(&self, cluster: &str, args: &[&str]) -> String {
        let ctx = format!("--context={}-{cluster}", self.name);
        let mut all = vec![ctx.as_str()];
        all.extend_from_slice(args);
        let out = self.kubectl_raw(&all);
        assert!(out.status.success(), "kubectl {all:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies the demo manifests in `examples/lab-demo/` to a cluster.
    pub fn apply_example(&self, cluster: &str, file: &str) {
        let path = format!("{}/../examples/lab-demo/{file}", env!("CARGO_MANIFEST_DIR"));
        self.kubectl(cluster, &["apply", "-f", &path]);
    }

    pub fn rollout(&self, cluster: &str, deploy: &str) {
        self.kubectl(
            cluster,
            &[
                "-n",
                "demo",
                "rollout",
                "status",
                &format!("deployment/{deploy}"),
                "--timeout=90s",
            ],
        );
    }

    /// Sends `n` requests from x-wing in `cluster` to `http://<service>.demo/` and returns
    /// the value of `field` in each reply (`(failed)` for a request that got no reply).
    pub fn replies(&self, cluster: &str, service: &str, field: &str, n: usize) -> Vec<String> {
        let script = format!(
            "i=0; while [ $i -lt {n} ]; do i=$((i+1)); \
             curl -s --max-time 2 http://{service}.demo/ || printf '{{\"failed\":true}}'; echo; done"
        );
        let out = self.lab(&[
            "exec",
            cluster,
            "-n",
            "demo",
            "deploy/x-wing",
            "--",
            "sh",
            "-c",
            &script,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let values: Vec<String> = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(v) if v.get("failed").is_none() => {
                    v[field].as_str().unwrap_or("(none)").to_string()
                }
                _ => "(failed)".to_string(),
            })
            .collect();
        assert_eq!(values.len(), n, "one line per request: {stdout}");
        values
    }

    /// Repeats rounds of `n` requests until the replies come from exactly `want` (every
    /// reply from one of them, each of them at least once, no failure), or panics with the
    /// counts of the last round after `timeout`. Returns the counts of the matching round.
    pub fn converge(
        &self,
        cluster: &str,
        service: &str,
        field: &str,
        want: &[&str],
        timeout: Duration,
    ) -> BTreeMap<String, usize> {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let counts = counts(&self.replies(cluster, service, field, 20));
            let got: BTreeSet<String> = counts.keys().cloned().collect();
            if got == want {
                eprintln!("{cluster} -> {service}: {counts:?}");
                return counts;
            }
            assert!(
                Instant::now() < deadline,
                "x-wing in {cluster} -> {service}: replies by {field} {counts:?}, want exactly {want:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Names of a deployment's pods' nodes in a cluster.
    pub fn pod_nodes(&self, cluster: &str, app: &str) -> BTreeSet<String> {
        self.kubectl(
            cluster,
            &[
                "-n",
                "demo",
                "get",
                "pods",
                "-l",
                &format!("app={app}"),
                "-o",
                "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
            ],
        )
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// Names of a deployment's pods in a cluster.
    pub fn pods(&self, cluster: &str, app: &str) -> BTreeSet<String> {
        self.kubectl(
            cluster,
            &[
                "-n",
                "demo",
                "get",
                "pods",
                "-l",
                &format!("app={app}"),
                "-o",
                "name",
            ],
        )
        .lines()
        .map(|l| l.trim_start_matches("pod/").to_string())
        .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new(mesh_lab())
            .args(["down", "--name", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("mesh-lab down {}: {}", self.name, text(&o)),
            Err(e) => eprintln!("mesh-lab down {}: {e}", self.name),
        }
    }
}

pub fn counts(values: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in values {
        *m.entry(v.clone()).or_insert(0) += 1;
    }
    m
}
