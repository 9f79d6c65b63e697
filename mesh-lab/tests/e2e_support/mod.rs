//! End-to-end harness: a whole lab (`mesh-lab up`) driven only through its users' tools,
//! the real `mesh-lab` CLI, kubectl and meshctl, as scripts/demo.sh drives it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

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

/// Fails the test unless it runs as root: a lab needs namespaces, cgroups and eBPF.
pub fn require_root(test: &str) {
    mesh_testkit::require_root(test);
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
        let out = self
            .meshctl_cmd(cluster)
            .args(args)
            .output()
            .expect("running meshctl");
        assert!(out.status.success(), "meshctl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Lab::meshctl`], but returns the exit code and output instead of asserting
    /// success (for commands whose exit code is the answer, such as `policy check`).
    pub fn meshctl_status(&self, cluster: &str, args: &[&str]) -> (i32, String) {
        let out = self
            .meshctl_cmd(cluster)
            .args(args)
            .output()
            .expect("running meshctl");
        (out.status.code().unwrap_or(-1), text(&out))
    }

    /// meshctl with the environment `mesh-lab env CLUSTER` prints (`export K='V'` lines).
    fn meshctl_cmd(&self, cluster: &str) -> Command {
        let env = self.lab(&["env", cluster]);
        let mut cmd = Command::new(mesh_lab().with_file_name("meshctl"));
        for line in env.lines() {
            if let Some((k, v)) = line.trim().trim_start_matches("export ").split_once('=') {
                cmd.env(k, v.trim_matches('\''));
            }
        }
        cmd
    }

    /// Runs `CMD...` in the first ready pod of `deploy/DEPLOY` in namespace `ns` of a cluster
    /// (`mesh-lab exec`); returns whether it exited 0, and its stdout then stderr.
    pub fn exec(&self, cluster: &str, ns: &str, deploy: &str, cmd: &[&str]) -> (bool, String) {
        let out = Command::new(mesh_lab())
            .args(["exec", cluster, "-n", ns, &format!("deploy/{deploy}"), "--"])
            .args(cmd)
            .env("MESH_LAB_NAME", &self.guard.name)
            .stdin(Stdio::null())
            .output()
            .expect("running mesh-lab exec");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Applies YAML text to a cluster with kubectl (through a temporary file).
    pub fn apply_yaml(&self, cluster: &str, yaml: &str) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("object.yaml");
        std::fs::write(&path, yaml).expect("writing the YAML");
        self.kubectl(
            cluster,
            &["apply", "-f", path.to_str().expect("utf-8 path")],
        );
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

    /// Starts `n` requests from x-wing in `cluster` to `http://<service>.demo/`, one after
    /// the other; their outcomes are read as they happen from the returned stream.
    ///
    /// `service` may also be an IP address (`http://<ip>/`, no name lookup).
    pub fn spawn_requests(&self, cluster: &str, service: &str, n: usize) -> RequestStream {
        let url = if service.parse::<std::net::IpAddr>().is_ok() {
            format!("http://{service}/")
        } else {
            format!("http://{service}.demo/")
        };
        let script = format!(
            "i=0; while [ $i -lt {n} ]; do i=$((i+1)); s=$(date +%s%3N); \
             r=$(curl -s --max-time 2 {url}) || r='{{\"failed\":true}}'; \
             printf '%s %s %s\\n' \"$r\" \"$s\" \"$(date +%s%3N)\"; done"
        );
        let mut child = Command::new(mesh_lab())
            .args([
                "exec",
                cluster,
                "-n",
                "demo",
                "deploy/x-wing",
                "--",
                "sh",
                "-c",
            ])
            .arg(&script)
            .env("MESH_LAB_NAME", &self.guard.name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mesh-lab exec");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        RequestStream {
            child,
            stdout,
            expected: n,
            read: 0,
        }
    }

    /// Sends `n` requests from x-wing in `cluster` to `http://<service>.demo/` and returns
    /// each one's outcome: the value of `field` in the reply (`None` for a request that got
    /// no reply) and when it ended, on the pod's clock (the host's).
    pub fn requests(&self, cluster: &str, service: &str, field: &str, n: usize) -> Vec<Reply> {
        self.spawn_requests(cluster, service, n).finish(field)
    }

    /// The values of `field` of `n` requests (`(failed)` for a request without a reply).
    pub fn replies(&self, cluster: &str, service: &str, field: &str, n: usize) -> Vec<String> {
        self.requests(cluster, service, field, n)
            .into_iter()
            .map(|r| r.value.unwrap_or_else(|| FAILED.to_string()))
            .collect()
    }

    /// Repeats rounds of 20 requests until the replies come from exactly `want` (every
    /// reply from one of them, each of them at least once, no failure), or panics with the
    /// counts of the last round after `timeout`.
    ///
    /// Every request of every round is counted. With [`Failures::Forbidden`] (the step
    /// claims no request fails, e.g. a failover or a change of affinity) a failed request in
    /// *any* round fails the test at once; with [`Failures::Tolerated`] (a cluster lost on
    /// purpose) failures are counted and printed, and only the final round must be clean.
    pub fn converge(
        &self,
        cluster: &str,
        service: &str,
        field: &str,
        want: &[&str],
        timeout: Duration,
        failures: Failures,
    ) -> Converged {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + timeout;
        let (mut rounds, mut requests, mut failed) = (0usize, 0usize, 0usize);
        loop {
            let round = self.replies(cluster, service, field, 20);
            rounds += 1;
            requests += round.len();
            let counts = counts(&round);
            let round_failed = counts.get(FAILED).copied().unwrap_or(0);
            failed += round_failed;
            if round_failed > 0 && failures == Failures::Forbidden {
                panic!(
                    "x-wing in {cluster} -> {service}: {round_failed} of 20 requests failed in \
                     round {rounds} where no failure is allowed (replies by {field}: {counts:?}; \
                     want {want:?})"
                );
            }
            let got: BTreeSet<String> = counts.keys().cloned().collect();
            if got == want {
                eprintln!(
                    "{cluster} -> {service}: {counts:?} ({rounds} rounds, {requests} requests, \
                     {failed} failed)"
                );
                return Converged {
                    counts,
                    rounds,
                    requests,
                    failed,
                };
            }
            assert!(
                Instant::now() < deadline,
                "x-wing in {cluster} -> {service}: replies by {field} {counts:?}, want exactly \
                 {want:?} ({rounds} rounds, {failed} of {requests} requests failed)"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Scales deployment `demo/<deploy>` of `cluster` to `replicas`.
    pub fn scale(&self, cluster: &str, deploy: &str, replicas: u32) {
        self.kubectl(
            cluster,
            &[
                "-n",
                "demo",
                "scale",
                "deployment",
                deploy,
                &format!("--replicas={replicas}"),
            ],
        );
    }

    /// `cluster`'s view of its peer `peer`, from `meshctl status -o json`.
    pub fn peer_status(&self, cluster: &str, peer: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.meshctl(cluster, &["status", "-o", "json"]))
                .expect("status JSON");
        v["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == peer).cloned())
            .unwrap_or_else(|| panic!("{cluster} has no peer {peer}: {v}"))
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

/// The value a request without a reply counts as.
pub const FAILED: &str = "(failed)";

/// One request x-wing sent.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The reply's field, `None` when the request failed.
    pub value: Option<String>,
    /// When the request ended (Unix ms).
    pub at_ms: u64,
    /// When the request started (Unix ms).
    pub started_ms: u64,
}

/// Whether a step may see failed requests on its way to the expected replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failures {
    /// The step claims no request fails (failover, affinity, restart): one fails the test.
    Forbidden,
    /// A fault the step injects on purpose may fail requests: counted, not asserted.
    Tolerated,
}

/// Requests in flight in a pod ([`Lab::spawn_requests`]), read line by line.
pub struct RequestStream {
    child: Child,
    stdout: BufReader<ChildStdout>,
    expected: usize,
    read: usize,
}

impl RequestStream {
    /// The next request's outcome, once it has ended; `None` after the last one.
    pub fn next_reply(&mut self, field: &str) -> Option<Reply> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .stdout
                .read_line(&mut line)
                .expect("reading mesh-lab exec");
            if n == 0 {
                return None;
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        self.read += 1;
        let (body, at) = line
            .trim_end()
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no timestamp on the line {line:?}"));
        let at_ms: u64 = at
            .parse()
            .unwrap_or_else(|e| panic!("bad timestamp {at:?} ({e}) on the line {line:?}"));
        let (body, started) = body
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no start timestamp on the line {line:?}"));
        let started_ms: u64 = started
            .parse()
            .unwrap_or_else(|e| panic!("bad timestamp {started:?} ({e}) on the line {line:?}"));
        let value = match serde_json::from_str::<serde_json::Value>(body) {
            Ok(v) if v.get("failed").is_none() => {
                Some(v[field].as_str().unwrap_or("(none)").to_string())
            }
            _ => None,
        };
        Some(Reply {
            value,
            at_ms,
            started_ms,
        })
    }

    /// Every remaining outcome; asserts the exec succeeded and each request printed a line.
    pub fn finish(mut self, field: &str) -> Vec<Reply> {
        let mut replies = Vec::new();
        while let Some(r) = self.next_reply(field) {
            replies.push(r);
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = self.child.wait().expect("waiting for mesh-lab exec");
        assert!(status.success(), "mesh-lab exec: {status}\n{err}");
        assert_eq!(self.read, self.expected, "one line per request\n{err}");
        replies
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // Only when a test fails half-way; finish() has already reaped the child.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What [`Lab::converge`] saw: the matching round's counts and every request on the way.
#[derive(Debug, Clone)]
pub struct Converged {
    pub counts: BTreeMap<String, usize>,
    pub rounds: usize,
    pub requests: usize,
    pub failed: usize,
}

pub fn counts(values: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in values {
        *m.entry(v.clone()).or_insert(0) += 1;
    }
    m
}
