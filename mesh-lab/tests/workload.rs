//! `mesh-lab workload`, the process every lab pod runs, as a real child process.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// curl's exit status and output.
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Waits until the workload accepts connections (another process: a bounded poll).
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "workload not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn answers_json_health_and_exits_on_sigterm() {
    let (p1, p2) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-lab"))
        .args([
            "workload",
            "--listen",
            &format!("127.0.0.1:{p1}"),
            "--listen",
            &format!("127.0.0.1:{p2}"),
            "--",
            r#"{"name":"Alderaan","galaxy":"Alderaan"}"#,
        ])
        .env("MESH_LAB_CLUSTER", "east")
        .env("MESH_LAB_NAMESPACE", "default")
        .env("MESH_LAB_POD", "rebel-base-1")
        .env("MESH_LAB_NODE", "east-node1")
        .env("MESH_LAB_POD_IP", "10.1.1.5")
        .env("MESH_LAB_REPLY", "ignored: args win")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Proc(child);
    wait_listening(p1);
    wait_listening(p2);
    for port in [p1, p2] {
        let (ok, body) = curl(&[&format!("http://127.0.0.1:{port}/any/path?x=1")]);
        assert!(ok);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"cluster": "east", "namespace": "default", "pod": "rebel-base-1", "node": "east-node1",
                   "ip": "10.1.1.5", "reply": {"name": "Alderaan", "galaxy": "Alderaan"}})
        );
    }
    let health = |port: u16| {
        let (_, code) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/healthz"),
        ]);
        code
    };
    assert_eq!(health(p1), "200");
    assert!(curl(&["-X", "POST", &format!("http://127.0.0.1:{p1}/healthz/fail")]).0);
    assert_eq!(health(p1), "503");
    assert_eq!(health(p2), "503", "one health state per process");
    assert!(curl(&["-X", "POST", &format!("http://127.0.0.1:{p2}/healthz/ok")]).0);
    assert_eq!(health(p1), "200");

    // SIGTERM: a clean exit.
    let st = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn reply_from_env_as_string_and_ip_from_the_socket() {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-lab"))
        .args(["workload", "--listen", &format!("127.0.0.1:{port}")])
        .env("MESH_LAB_REPLY", "hello from the lab")
        .env_remove("MESH_LAB_POD_IP")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Proc(child);
    wait_listening(port);
    let (ok, body) = curl(&[&format!("http://127.0.0.1:{port}/")]);
    assert!(ok);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["reply"], "hello from the lab");
    assert_eq!(v["ip"], "127.0.0.1");
}

/// The request log `kubectl logs` shows: one CRI line per request, in the log of the
/// container whose port it arrived on; readiness probes (`GET /healthz`) are left out.
#[test]
fn requests_are_logged_per_container() {
    let (web, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-lab"))
        .args([
            "workload",
            "--listen",
            &format!("127.0.0.1:{web}"),
            "--listen",
            &format!("127.0.0.1:{admin}"),
            "--log-dir",
            dir.path().to_str().unwrap(),
            "--container",
            &format!("web={web}"),
            "--container",
            &format!("admin={admin}"),
            "--",
            "hi",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Proc(child);
    wait_listening(web);
    wait_listening(admin);
    assert!(curl(&[&format!("http://127.0.0.1:{web}/a?b=c")]).0);
    assert!(curl(&[&format!("http://127.0.0.1:{web}/healthz")]).0);
    assert!(
        curl(&[
            "-X",
            "POST",
            &format!("http://127.0.0.1:{admin}/healthz/fail")
        ])
        .0
    );
    let messages = |container: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(format!("{container}.log")))
            .unwrap()
            .lines()
            .map(|l| {
                // `<RFC3339Nano> stdout F <message>`
                let f: Vec<&str> = l.splitn(4, ' ').collect();
                assert_eq!((f[0].len(), &f[1..3]), (30, &["stdout", "F"][..]), "{l}");
                f[3].to_string()
            })
            .collect()
    };
    let web_log = messages("web");
    assert_eq!(
        web_log.len(),
        2,
        "serving line and one request: {web_log:#?}"
    );
    assert!(
        web_log[0].ends_with(&format!("serving 127.0.0.1:{web}")),
        "{web_log:#?}"
    );
    let f: Vec<&str> = web_log[1].splitn(5, ' ').collect();
    assert!(
        f[1].starts_with("127.0.0.1:"),
        "client address: {}",
        web_log[1]
    );
    assert_eq!(f[2..4], ["\"GET", "/a?b=c\""], "{}", web_log[1]);
    assert!(
        f[4].starts_with("200 {") && f[4].contains(r#""reply":"hi""#),
        "{}",
        web_log[1]
    );
    let admin_log = messages("admin");
    assert_eq!(admin_log.len(), 2, "{admin_log:#?}");
    assert!(
        admin_log[1].contains("\"POST /healthz/fail\" 200 failing"),
        "{admin_log:#?}"
    );
}
