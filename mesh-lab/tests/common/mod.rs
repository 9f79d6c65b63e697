//! Shared test harness: an in-process kube-api server per test, with its own port, temp dir
//! and kubectl cache dir, and helpers to drive the real kubectl and kube-rs against it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mesh_lab::kube_api::{KubeApi, KubeApiConfig, KubeApiHandle};
use tempfile::TempDir;

pub struct Lab {
    pub api: KubeApiHandle,
    pub dir: TempDir,
    cache: TempDir,
}

impl Lab {
    pub async fn start() -> Lab {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut KubeApiConfig)) -> Lab {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = tempfile::tempdir().expect("cache dir");
        let mut config = KubeApiConfig::new(dir.path().join("api"), "test");
        config.context = "lab-test".into();
        f(&mut config);
        let api = KubeApi::start(config).await.expect("starting kube-api");
        Lab { api, dir, cache }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(self.api.kubeconfig_path())
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG");
        c
    }

    /// Runs kubectl to completion.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kubectl")
    }

    /// Runs kubectl with `stdin`.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().expect("waiting for kubectl")
    }

    /// Runs kubectl, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        check_ok(args, self.kubectl(args))
    }

    /// `kubectl apply -f -` (plus `extra` args) with `yaml`, asserts success.
    pub fn apply(&self, yaml: &str, extra: &[&str]) -> String {
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(extra);
        check_ok(&args, self.kubectl_stdin(&args, yaml))
    }

    /// Runs kubectl, asserts failure, returns stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `kubectl get -o json` parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("kubectl -o json prints JSON")
    }

    /// Starts a long-running kubectl whose stdout lines arrive on a channel.
    pub fn spawn_lines(&self, args: &[&str]) -> LineChild {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning kubectl");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineChild { child, rx }
    }

    /// A kube-rs client built from the written kubeconfig.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(self.api.kubeconfig_path())
            .expect("reading kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kube config from kubeconfig");
        kube::Client::try_from(config).expect("kube client")
    }

    /// Creates a namespace through the store.
    pub fn namespace(&self, name: &str) {
        self.api
            .store()
            .create(
                &mesh_lab::kube_api::resources::NAMESPACES,
                None,
                serde_json::json!({"metadata": {"name": name}}),
            )
            .expect("creating namespace");
    }
}

fn check_ok(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubectl process killed on drop.
pub struct LineChild {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl LineChild {
    /// Waits for a line satisfying `pred`; panics with everything seen after `timeout`.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(l) => seen.push(l),
                Err(_) => {
                    let _ = self.child.kill();
                    let mut err = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    panic!("no matching line within {timeout:?}; saw {seen:#?}; stderr: {err}");
                }
            }
        }
    }
}

impl LineChild {
    /// Waits for the process to close its stdout and exit; returns the lines it printed
    /// meanwhile and whether it succeeded. Panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Vec<String>, bool) {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("still running after {timeout:?}; printed {seen:#?}")
                }
            }
        }
        let status = self.child.wait().expect("waiting for the child");
        (seen, status.success())
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Column headers of a `kubectl get` table.
pub fn headers(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// The row of a `kubectl get` table whose NAME column (or second column with NAMESPACE) is
/// `name`, split on whitespace.
pub fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|cols| {
            cols.iter()
                .take(2)
                .any(|c| c == name || c.ends_with(&format!("/{name}")))
        })
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{table}"))
}
