//! The lab's kube-proxy rules: rendered from a live store on every change, and applied with
//! the real `nft` in a network namespace the test creates (root), where a connection to a
//! ClusterIP reaches a real workload through the DNAT and a Service without ready endpoints
//! is refused.

mod common;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use mesh_lab::proxy_rules;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_calls_back_with_each_new_ruleset() {
    let lab = Lab::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _rules = proxy_rules::spawn(lab.api.store().clone(), move |text| {
        let _ = tx.send(text);
    });
    let first = rx.recv().await.unwrap();
    assert!(first.starts_with("table ip mesh_lab_proxy\n"), "{first}");
    lab.ok(&["create", "namespace", "p"]);
    lab.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: p}
spec:
  clusterIP: 10.96.7.7
  selector: {app: web}
  ports: [{name: http, port: 80}]
"#,
        &[],
    );
    let text = rx.recv().await.unwrap();
    assert!(
        text.contains("ip daddr 10.96.7.7 tcp dport 80 jump"),
        "{text}"
    );
    assert!(
        text.contains("reject with tcp reset"),
        "no endpoints yet: {text}"
    );
    lab.apply(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: p
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: ["10.1.1.5"], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#,
        &[],
    );
    let text = rx.recv().await.unwrap();
    assert!(text.contains("map { 0 : 10.1.1.5 . 8080 }"), "{text}");
    // A change that does not change the rules does not call back.
    lab.ok(&["label", "svc", "web", "-n", "p", "team=a"]);
    lab.ok(&[
        "annotate",
        "svc",
        "web",
        "-n",
        "p",
        "service.cilium.io/global=true",
    ]);
    let text = rx.recv().await.unwrap();
    assert!(
        !text.contains("10.96.7.7"),
        "a global service leaves the rules: {text}"
    );
    assert!(rx.try_recv().is_err());
}

/// A network namespace removed on drop (with the processes the test started in it).
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("mlt-proxy-{}-{}", std::process::id(), rand_suffix());
        run(&["ip", "netns", "add", &name]);
        Netns {
            name,
            children: Vec::new(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn nft_apply(&self, rules: &str) {
        let mut child = self
            .cmd(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f - failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{t:08x}")
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nft_applies_atomically_and_dnats_in_a_netns() {
    mesh_testkit::require_root("the nft DNAT test (network namespaces)");
    let mut ns = Netns::new();
    let services = vec![
        json!({"metadata": {"name": "web", "namespace": "n"},
               "spec": {"clusterIP": "10.101.0.10", "clusterIPs": ["10.101.0.10"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        json!({"metadata": {"name": "down", "namespace": "n"},
               "spec": {"clusterIP": "10.101.0.11", "clusterIPs": ["10.101.0.11"], "ports": [{"port": 80, "protocol": "TCP"}]}}),
    ];
    let slices = vec![json!({
        "metadata": {"name": "web-x", "namespace": "n", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.1.5"], "conditions": {"ready": true}},
                      {"addresses": ["10.1.1.6"], "conditions": {"ready": false}}],
    })];
    let rules = proxy_rules::render(&services, &slices);
    // Twice: the second application replaces the first (idempotent).
    ns.nft_apply(&rules);
    ns.nft_apply(&rules);
    let listed = String::from_utf8(
        ns.run(&["nft", "list", "table", "ip", "mesh_lab_proxy"])
            .stdout,
    )
    .unwrap();
    assert!(
        listed.contains("ip daddr 10.101.0.10 tcp dport 80 jump svc_"),
        "{listed}"
    );
    assert!(
        listed.contains("dnat ip to numgen random mod 1 map { 0 : 10.1.1.5 . 8080 }"),
        "{listed}"
    );
    assert!(
        !listed.contains("10.1.1.6"),
        "unready endpoints are not targets: {listed}"
    );
    assert_eq!(listed.matches("chain services").count(), 1, "{listed}");

    // Real traffic: a workload on the endpoint address, reached through the ClusterIP.
    for args in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "addr", "add", "10.1.1.5/32", "dev", "lo"],
        &["ip", "route", "add", "10.101.0.0/16", "dev", "lo"],
    ] {
        let out = ns.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let child = ns
        .cmd(&[
            env!("CARGO_BIN_EXE_mesh-lab"),
            "workload",
            "--listen",
            "10.1.1.5:8080",
        ])
        .env("MESH_LAB_POD", "web-1")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    ns.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = ns.run(&["curl", "-sS", "--max-time", "2", "http://10.101.0.10/"]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no answer through the ClusterIP: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pod"], "web-1");
    assert_eq!(v["ip"], "10.1.1.5");
    // No ready endpoint: refused at once (curl exit 7), not a timeout.
    let out = ns.run(&["curl", "-sS", "--max-time", "5", "http://10.101.0.11/"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An update replaces the whole table in one transaction.
    ns.nft_apply(&proxy_rules::render(&services[1..], &[]));
    let listed = String::from_utf8(
        ns.run(&["nft", "list", "table", "ip", "mesh_lab_proxy"])
            .stdout,
    )
    .unwrap();
    assert!(
        !listed.contains("10.101.0.10") && listed.contains("10.101.0.11"),
        "{listed}"
    );
}
