//! End-to-end harness: a whole lab (`mesh-lab up`) driven only through its users' tools,
//! the real `mesh-lab` CLI, kubectl and meshctl, as scripts/demo.sh drives it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};

use crate::lab_support::mesh_lab;
use std::time::{Duration, Instant};

use crate::lab_support::{LabGuard, lab_name};

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

/// A running lab ([`LabGuard`]: `mesh-lab down` on drop, also when the test fails) and the
/// demo's requests and checks on top of it.
pub struct Lab {
    pub guard: LabGuard,
    pub clusters: Vec<String>,
}

impl Lab {
    /// `mesh-lab up --clusters N --nodes M` under a lab name unique to this test process.
    pub fn up(tag: char, clusters: usize, nodes: usize) -> Lab {
        let guard = LabGuard::up(
            &lab_name(tag),
            &[
                "--clusters",
                &clusters.to_string(),
                "--nodes",
                &nodes.to_string(),
            ],
        );
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(guard.kubeconfig())
            .args(["config", "get-contexts", "-o", "name"])
            .output()
            .expect("running kubectl");
        let contexts = String::from_utf8_lossy(&out.stdout).into_owned();
        let prefix = format!("{}-", guard.name);
        let clusters_found: Vec<String> = contexts
            .lines()
            .filter_map(|c| c.strip_prefix(&prefix).map(str::to_string))
            .collect();
        assert_eq!(clusters_found.len(), clusters, "contexts: {contexts}");
        Lab {
            guard,
            clusters: clusters_found,
        }
    }

    /// Runs `mesh-lab ARGS...` for this lab, asserting success; returns stdout.
    pub fn lab(&self, args: &[&str]) -> String {
        self.guard.lab_ok(args)
    }

    /// kubectl against one cluster (context `<lab>-<cluster>`), asserting success.
    pub fn kubectl(&self, cluster: &str, args: &[&str]) -> String {
        self.guard.kubectl_ok(cluster, args)
    }

    /// Runs meshctl against a cluster's apiserver with the environment `mesh-lab env`
    /// prints (`export K='V'` lines), asserting success; returns stdout.
    pub fn meshctl(&self, cluster: &str, args: &[&str]) -> String {
        let env = self.lab(&["env", cluster]);
        let mut cmd = Command::new(mesh_lab().with_file_name("meshctl"));
        for line in env.lines() {
            if let Some((k, v)) = line.trim().trim_start_matches("export ").split_once('=') {
                cmd.env(k, v.trim_matches('\''));
            }
        }
        let out = cmd.args(args).output().expect("running meshctl");
        assert!(out.status.success(), "meshctl {args:?}: {}", text(&out));
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
        let stdout = self.lab(&[
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

pub fn counts(values: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in values {
        *m.entry(v.clone()).or_insert(0) += 1;
    }
    m
}
