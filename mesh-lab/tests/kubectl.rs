//! The real kubectl against the lab's kube-api: each test starts its own server (own port,
//! temp dir and discovery cache) and works in its own namespace.

mod common;

use std::time::Duration;

use common::{Lab, headers, row};
use mesh_lab::kube_api::resources as r;
use serde_json::json;

const APP: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: NS
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: NS
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx:1.25
        ports:
        - containerPort: 8080
        env:
        - name: MODE
          value: one
      - name: sidecar
        image: busybox:1
"#;

fn app(ns: &str) -> String {
    APP.replace("NS", ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_namespace_and_secret_and_list_tables() {
    let lab = Lab::start().await;
    assert_eq!(
        lab.ok(&["create", "namespace", "tables"]).trim(),
        "namespace/tables created"
    );
    assert_eq!(
        lab.ok(&[
            "create",
            "secret",
            "generic",
            "creds",
            "-n",
            "tables",
            "--from-literal=user=admin",
            "--from-literal=pass=s3cret"
        ])
        .trim(),
        "secret/creds created"
    );
    let secret = lab
        .api
        .store()
        .get(&r::SECRETS, Some("tables"), "creds")
        .unwrap();
    assert_eq!(secret["data"]["user"], "YWRtaW4=");
    assert_eq!(secret["type"], "Opaque");

    let out = lab.ok(&["get", "secrets", "-n", "tables"]);
    assert_eq!(headers(&out), ["NAME", "TYPE", "DATA", "AGE"]);
    assert_eq!(row(&out, "creds")[..3], ["creds", "Opaque", "2"]);

    let out = lab.ok(&["get", "namespaces"]);
    assert_eq!(headers(&out), ["NAME", "STATUS", "AGE"]);
    assert_eq!(row(&out, "tables")[..2], ["tables", "Active"]);

    let out = lab.ok(&["get", "services", "-A"]);
    assert_eq!(
        headers(&out),
        [
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(
        row(&out, "kubernetes")[..6],
        [
            "default",
            "kubernetes",
            "ClusterIP",
            "10.96.0.1",
            "<none>",
            "443/TCP"
        ]
    );

    // Duplicate create and a missing object are Status errors that kubectl prints verbatim.
    let err = lab.fail(&["create", "namespace", "tables"]);
    assert!(
        err.contains("(AlreadyExists)") && err.contains("namespaces \"tables\" already exists"),
        "{err}"
    );
    let err = lab.fail(&["get", "secret", "nope", "-n", "tables"]);
    assert!(
        err.contains("(NotFound)") && err.contains("secrets \"nope\" not found"),
        "{err}"
    );
    let err = lab.fail(&[
        "create",
        "secret",
        "generic",
        "x",
        "-n",
        "missing-ns",
        "--from-literal=a=b",
    ]);
    assert!(err.contains("namespaces \"missing-ns\" not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_service_and_deployment_then_change_them() {
    let lab = Lab::start_with(|c| c.service_cidr = "10.77.0.0/24".parse().unwrap()).await;
    lab.ok(&["create", "namespace", "apply"]);
    let out = lab.apply(&app("apply"), &[]);
    assert!(
        out.contains("service/web created") && out.contains("deployment.apps/web created"),
        "{out}"
    );

    let svc = lab.get_json(&["service", "web", "-n", "apply"]);
    let ip = svc["spec"]["clusterIP"].as_str().unwrap();
    assert!(
        ip.starts_with("10.77.0."),
        "ClusterIP {ip} from the configured CIDR"
    );
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(svc["metadata"]["generation"], 1);
    assert!(svc["metadata"].get("managedFields").is_none());

    let out = lab.ok(&["get", "service", "web", "-n", "apply"]);
    assert_eq!(
        headers(&out),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(
        row(&out, "web")[..5],
        ["web", "ClusterIP", ip, "<none>", "80/TCP"]
    );
    let out = lab.ok(&["get", "deployments", "-n", "apply"]);
    assert_eq!(
        headers(&out),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    assert_eq!(row(&out, "web")[..4], ["web", "0/2", "0", "0"]);

    // Unchanged apply sends nothing and changes nothing.
    let rv =
        lab.get_json(&["deployment", "web", "-n", "apply"])["metadata"]["resourceVersion"].clone();
    let out = lab.apply(&app("apply"), &[]);
    assert!(out.contains("deployment.apps/web unchanged"), "{out}");
    assert_eq!(
        lab.get_json(&["deployment", "web", "-n", "apply"])["metadata"]["resourceVersion"],
        rv
    );

    // A changed image and env value: a strategic merge patch merging containers by name.
    let changed = app("apply")
        .replace("nginx:1.25", "nginx:1.27")
        .replace("value: one", "value: two");
    let out = lab.apply(&changed, &[]);
    assert!(
        out.contains("deployment.apps/web configured") && out.contains("service/web unchanged"),
        "{out}"
    );
    let d = lab.get_json(&["deployment", "web", "-n", "apply"]);
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 2, "{containers:?}");
    assert_eq!(containers[0]["name"], "web");
    assert_eq!(containers[0]["image"], "nginx:1.27");
    assert_eq!(
        containers[0]["env"],
        json!([{"name": "MODE", "value": "two"}])
    );
    assert_eq!(containers[1]["image"], "busybox:1");
    assert_eq!(
        d["metadata"]["generation"], 2,
        "spec change bumps generation"
    );

    // Removing the sidecar from the manifest removes it from the object.
    let without_sidecar = changed.replace("      - name: sidecar\n        image: busybox:1\n", "");
    lab.apply(&without_sidecar, &[]);
    let d = lab.get_json(&["deployment", "web", "-n", "apply"]);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Server-side apply creates when missing and updates when present.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: apply\ndata:\n  k: v1\n";
    let out = lab.apply(cm, &["--server-side"]);
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    lab.apply(&cm.replace("k: v1", "k: v2"), &["--server-side"]);
    assert_eq!(
        lab.get_json(&["configmap", "ssa", "-n", "apply"])["data"]["k"],
        "v2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotate_label_scale_and_patch() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "edit"]);
    lab.apply(&app("edit"), &[]);

    lab.ok(&["annotate", "service", "web", "-n", "edit", "owner=team-a"]);
    lab.ok(&["label", "deployment", "web", "-n", "edit", "tier=frontend"]);
    let svc = lab.get_json(&["service", "web", "-n", "edit"]);
    assert_eq!(svc["metadata"]["annotations"]["owner"], "team-a");
    assert_eq!(
        svc["metadata"]["generation"], 1,
        "metadata changes keep the generation"
    );
    let out = lab.ok(&[
        "get",
        "deployments",
        "-n",
        "edit",
        "-l",
        "tier=frontend",
        "-o",
        "name",
    ]);
    assert_eq!(out.trim(), "deployment.apps/web");
    assert_eq!(
        lab.ok(&[
            "get",
            "deployments",
            "-n",
            "edit",
            "-l",
            "tier=backend",
            "-o",
            "name"
        ])
        .trim(),
        ""
    );
    lab.ok(&["annotate", "service", "web", "-n", "edit", "owner-"]);
    assert!(
        lab.get_json(&["service", "web", "-n", "edit"])["metadata"]["annotations"]
            .get("owner")
            .is_none()
    );

    assert_eq!(
        lab.ok(&["scale", "deployment", "web", "-n", "edit", "--replicas=3"])
            .trim(),
        "deployment.apps/web scaled"
    );
    let d = lab.get_json(&["deployment", "web", "-n", "edit"]);
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["metadata"]["generation"], 2);
    lab.ok(&[
        "scale",
        "deployment",
        "web",
        "-n",
        "edit",
        "--current-replicas=3",
        "--replicas=4",
    ]);
    let err = lab.fail(&[
        "scale",
        "deployment",
        "web",
        "-n",
        "edit",
        "--current-replicas=3",
        "--replicas=5",
    ]);
    assert!(err.contains("Expected replicas to be 3, was 4"), "{err}");
    assert_eq!(
        lab.get_json(&["deployment", "web", "-n", "edit"])["spec"]["replicas"],
        4
    );

    lab.ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "edit",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    assert_eq!(
        lab.get_json(&["deployment", "web", "-n", "edit"])["spec"]["replicas"],
        1
    );
    lab.ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "edit",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":2}]"#,
    ]);
    assert_eq!(
        lab.get_json(&["deployment", "web", "-n", "edit"])["spec"]["replicas"],
        2
    );
    let smp =
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:2"}]}}}}"#;
    assert_eq!(
        lab.ok(&["patch", "deployment", "web", "-n", "edit", "-p", smp])
            .trim(),
        "deployment.apps/web patched"
    );
    let d = lab.get_json(&["deployment", "web", "-n", "edit"]);
    let images: Vec<&str> = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap())
        .collect();
    assert_eq!(
        images,
        ["nginx:1.25", "busybox:2"],
        "strategic merge keeps the other container"
    );
    let rv = d["metadata"]["resourceVersion"].clone();
    assert_eq!(
        lab.ok(&["patch", "deployment", "web", "-n", "edit", "-p", smp])
            .trim(),
        "deployment.apps/web patched (no change)"
    );
    assert_eq!(
        lab.get_json(&["deployment", "web", "-n", "edit"])["metadata"]["resourceVersion"],
        rv
    );

    let err = lab.fail(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "edit",
        "--type",
        "json",
        "-p",
        r#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
    ]);
    assert!(err.contains("Invalid") || err.contains("rejected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_waits_and_namespace_delete_cascades() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "del"]);
    lab.apply(&app("del"), &[]);
    let out = lab.ok(&[
        "delete",
        "deployment",
        "web",
        "-n",
        "del",
        "--wait=true",
        "--timeout=20s",
    ]);
    assert_eq!(out.trim(), "deployment.apps \"web\" deleted");
    let err = lab.fail(&["get", "deployment", "web", "-n", "del"]);
    assert!(err.contains("deployments.apps \"web\" not found"), "{err}");

    lab.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "del",
        "--from-literal=a=b",
    ]);
    let out = lab.ok(&["delete", "namespace", "del", "--timeout=20s"]);
    assert_eq!(out.trim(), "namespace \"del\" deleted");
    let store = lab.api.store();
    let (svcs, _) = store.list(
        &r::SERVICES,
        Some("del"),
        &Default::default(),
        &Default::default(),
    );
    let (secrets, _) = store.list(
        &r::SECRETS,
        Some("del"),
        &Default::default(),
        &Default::default(),
    );
    assert!(
        svcs.is_empty() && secrets.is_empty(),
        "objects of a deleted namespace are gone"
    );
    assert_eq!(
        lab.ok(&["get", "services", "-n", "del", "-o", "name"])
            .trim(),
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_watch_receives_events() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "watch"]);
    let mut w = lab.spawn_lines(&[
        "get",
        "services",
        "-n",
        "watch",
        "-w",
        "--output-watch-events",
    ]);
    // The (empty) list prints nothing; create, change and delete must each show up.
    lab.ok(&[
        "create",
        "service",
        "clusterip",
        "one",
        "-n",
        "watch",
        "--tcp=81:8081",
    ]);
    let added = w.wait_line(Duration::from_secs(20), |l| l.contains("one"));
    assert!(
        added.starts_with("ADDED") && added.contains("81/TCP"),
        "{added}"
    );
    lab.ok(&["label", "service", "one", "-n", "watch", "x=y"]);
    let modified = w.wait_line(Duration::from_secs(20), |l| l.contains("one"));
    assert!(modified.starts_with("MODIFIED"), "{modified}");
    lab.ok(&["delete", "service", "one", "-n", "watch"]);
    let deleted = w.wait_line(Duration::from_secs(20), |l| l.contains("one"));
    assert!(deleted.starts_with("DELETED"), "{deleted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_are_reported() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "bad"]);
    let err = lab.fail(&["delete", "namespace", "default"]);
    assert!(
        err.contains("(Forbidden)") && err.contains("may not be deleted"),
        "{err}"
    );
    let no_selector = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  namespace: bad\nspec:\n  template:\n    metadata:\n      labels: {app: x}\n    spec:\n      containers: [{name: c, image: i}]\n";
    let out = lab.kubectl_stdin(&["apply", "-f", "-"], no_selector);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.selector: Required value"),
        "{err}"
    );
    let bad_name =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Not_Valid\n  namespace: bad\n";
    let out = lab.kubectl_stdin(&["create", "-f", "-"], bad_name);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is invalid") && err.contains("metadata.name"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_and_events_follow_what_controllers_write() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "ctl"]);

    // Typed creates get the apps/v1 defaults, even with an empty strategy.
    lab.ok(&["create", "deployment", "dd", "-n", "ctl", "--image=nginx:1"]);
    let d = lab.get_json(&["deployment", "dd", "-n", "ctl"]);
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");

    // The lab plays kubelet through the store; kubectl wait sees the condition.
    let store = lab.api.store();
    store
        .create(
            &r::PODS,
            Some("ctl"),
            json!({"metadata": {"name": "p", "labels": {"app": "p"}},
                   "spec": {"containers": [{"name": "c", "image": "i:1"}]}}),
        )
        .unwrap();
    let mut wait = lab.spawn_lines(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=p",
        "-n",
        "ctl",
        "--timeout=30s",
    ]);
    let mut pod = store.get(&r::PODS, Some("ctl"), "p").unwrap();
    pod["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    store
        .update_status(&r::PODS, Some("ctl"), "p", pod)
        .unwrap();
    let met = wait.wait_line(Duration::from_secs(30), |l| l.contains("condition met"));
    assert_eq!(met, "pod/p condition met");

    store
        .create(
            &r::EVENTS,
            Some("ctl"),
            json!({"metadata": {"name": "p.1"}, "type": "Warning", "reason": "BadAnnotation",
                   "message": "service.cilium.io/affinity: invalid value", "lastTimestamp": "2024-01-01T00:00:00Z",
                   "involvedObject": {"kind": "Pod", "name": "p", "namespace": "ctl"}}),
        )
        .unwrap();
    let out = lab.ok(&["get", "events", "-n", "ctl"]);
    assert_eq!(
        headers(&out),
        ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    );
    let line = out.lines().nth(1).unwrap();
    assert!(
        line.contains("Warning") && line.contains("BadAnnotation") && line.contains("pod/p"),
        "{out}"
    );
    let out = lab.ok(&[
        "get",
        "events",
        "-n",
        "ctl",
        "--field-selector",
        "involvedObject.name=nope",
    ]);
    assert!(out.trim().is_empty(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dry_run_and_diff_change_nothing() {
    let lab = Lab::start().await;
    lab.ok(&["create", "namespace", "dry"]);
    let out = lab.apply(&app("dry"), &["--dry-run=server"]);
    assert!(
        out.contains("service/web created (server dry run)"),
        "{out}"
    );
    assert!(
        lab.api
            .store()
            .get(&r::SERVICES, Some("dry"), "web")
            .is_err(),
        "a dry run stores nothing"
    );

    lab.apply(&app("dry"), &[]);
    let rv = lab.api.store().resource_version();
    let changed = app("dry").replace("nginx:1.25", "nginx:1.99");
    let out = lab.kubectl_stdin(&["diff", "-f", "-"], &changed);
    let diff = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "diff exits 1 when there are differences: {diff}"
    );
    assert!(
        diff.contains("-        image: nginx:1.25") && diff.contains("+        image: nginx:1.99"),
        "{diff}"
    );
    assert_eq!(
        lab.api.store().resource_version(),
        rv,
        "diff writes nothing"
    );
    let out = lab.kubectl_stdin(&["diff", "-f", "-"], &app("dry"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "no differences: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_pages_with_chunk_size() {
    let lab = Lab::start().await;
    let store = lab.api.store();
    let mut want = Vec::new();
    for ns in ["pg-a", "pg-b"] {
        lab.namespace(ns);
        for i in 0..4 {
            let name = format!("cm{i}");
            store
                .create(
                    &r::CONFIGMAPS,
                    Some(ns),
                    json!({"metadata": {"name": name, "labels": {"even": (i % 2 == 0).to_string()}}}),
                )
                .unwrap();
            want.push(format!("{ns}/{name}"));
        }
    }
    // Every object exactly once, over one request per chunk, in the table and in -o name.
    let requests = |stderr: &str| -> Vec<String> {
        stderr
            .lines()
            .filter(|l| l.contains("GET https://") && l.contains("/configmaps?"))
            .map(String::from)
            .collect()
    };
    let out = lab.kubectl(&["get", "configmaps", "-A", "--chunk-size=1", "-v=6"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(headers(&stdout), ["NAMESPACE", "NAME", "DATA", "AGE"]);
    let mut rows: Vec<String> = stdout
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            format!("{}/{}", c[0], c[1])
        })
        .collect();
    rows.sort();
    assert_eq!(rows, want, "every object once:\n{stdout}");
    let reqs = requests(&stderr);
    assert_eq!(reqs.len(), 8, "one request per object: {reqs:#?}");
    assert_eq!(
        reqs.iter().filter(|l| l.contains("continue=")).count(),
        7,
        "{reqs:#?}"
    );

    let out = lab.kubectl(&[
        "get",
        "configmaps",
        "-n",
        "pg-b",
        "--chunk-size=3",
        "-o",
        "name",
        "-v=6",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [
            "configmap/cm0",
            "configmap/cm1",
            "configmap/cm2",
            "configmap/cm3"
        ]
    );
    assert_eq!(requests(&stderr).len(), 2, "{stderr}");

    // Selectors apply before paging: chunks of matching objects only.
    let out = lab.kubectl(&[
        "get",
        "configmaps",
        "-A",
        "-l",
        "even=true",
        "--chunk-size=1",
        "-o",
        "name",
        "-v=6",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [
            "configmap/cm0",
            "configmap/cm2",
            "configmap/cm0",
            "configmap/cm2"
        ]
    );
    assert_eq!(requests(&stderr).len(), 4, "{stderr}");

    // --chunk-size=0 turns paging off: one request.
    let out = lab.kubectl(&["get", "configmaps", "-A", "--chunk-size=0", "-v=6"]);
    assert_eq!(
        requests(&String::from_utf8_lossy(&out.stderr)).len(),
        1,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET path` on `addr` over plain HTTP/1.1; the whole response.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_lab_pods() {
    use mesh_lab::controllers::{self, ControllersConfig, ProcessRuntime};
    let lab = Lab::start().await;
    let store = lab.api.store().clone();
    store
        .create(
            &r::NODES,
            None,
            json!({"metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}}}),
        )
        .unwrap();
    let runtime = std::sync::Arc::new(ProcessRuntime::with_random_net(env!(
        "CARGO_BIN_EXE_mesh-lab"
    )));
    lab.api.set_log_source(runtime.clone());
    let mut cfg = ControllersConfig::new("test", runtime.clone());
    cfg.nodes = vec!["n1".into()];
    let _controllers = controllers::spawn_all(store.clone(), cfg);

    lab.ok(&["create", "namespace", "logs"]);
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: logs}
spec:
  containers:
  - name: web
    image: any
    args: ["hello"]
    ports: [{containerPort: 8080}]
  - name: side
    image: any
    ports: [{containerPort: 9090}]
"#,
        &[],
    );
    lab.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/p",
        "-n",
        "logs",
        "--timeout=60s",
    ]);
    let ip: std::net::IpAddr = store.get(&r::PODS, Some("logs"), "p").unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let reply = http_get((ip, 8080).into(), "/first");
    assert!(reply.contains(r#""reply":"hello""#), "{reply}");
    http_get((ip, 8080).into(), "/second");

    // One line per request: time, client address, request, status and the reply.
    let out = lab.ok(&["logs", "p", "-n", "logs", "-c", "web"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].ends_with(&format!("serving {ip}:8080")), "{out}");
    let f: Vec<&str> = lines[1].split_whitespace().collect();
    assert!(
        f[0].len() == 24 && f[0].as_bytes()[10] == b'T' && f[0].ends_with('Z'),
        "a time first (RFC 3339, milliseconds): {}",
        lines[1]
    );
    assert!(f[1].starts_with("127."), "the client address: {}", lines[1]);
    assert_eq!(f[2..5], ["\"GET", "/first\"", "200"], "{}", lines[1]);
    assert!(lines[1].contains(r#""reply":"hello""#), "{}", lines[1]);
    assert!(lines[2].contains("\"GET /second\" 200"), "{out}");

    // kubectl picks the first container itself and says so.
    let all = lab.kubectl(&["logs", "p", "-n", "logs"]);
    assert!(all.status.success());
    assert_eq!(String::from_utf8_lossy(&all.stdout), out);
    assert!(
        String::from_utf8_lossy(&all.stderr).contains("Defaulted container \"web\""),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    // --tail and --timestamps.
    let tail = lab.ok(&["logs", "p", "-n", "logs", "-c", "web", "--tail=1"]);
    assert_eq!(tail, format!("{}\n", lines[2]));
    let stamped = lab.ok(&["logs", "p", "-n", "logs", "-c", "web", "--timestamps"]);
    let first = stamped.lines().next().unwrap();
    let (ts, rest) = first.split_once(' ').unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 30, "RFC3339Nano: {first}");
    assert_eq!(rest, lines[0]);
    let limited = lab.ok(&["logs", "p", "-n", "logs", "-c", "web", "--limit-bytes=5"]);
    assert_eq!(limited, &out[..5]);
    // The other container has only its own traffic.
    assert_eq!(
        lab.ok(&["logs", "p", "-n", "logs", "-c", "side"])
            .lines()
            .count(),
        1
    );

    // Errors: an unknown pod (404 naming it), an unknown container, no container for the raw API.
    let err = lab.fail(&["logs", "nope", "-n", "logs"]);
    assert!(err.contains(r#"pods "nope" not found"#), "{err}");
    let err = lab.fail(&["logs", "p", "-n", "logs", "-c", "nope"]);
    assert!(
        err.contains("container nope is not valid for pod p"),
        "{err}"
    );
    let client = lab.client().await;
    let e = client
        .request_text(
            http::Request::get("/api/v1/namespaces/logs/pods/p/log")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap_err();
    match e {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 400);
            assert_eq!(
                s.message,
                "a container name must be specified for pod p, choose one of: [web side]"
            );
        }
        other => panic!("{other:?}"),
    }

    // -f: the existing lines, then a line written after it started, until the pod is deleted.
    let mut follow = lab.spawn_lines(&["logs", "-f", "p", "-n", "logs", "-c", "side"]);
    follow.wait_line(Duration::from_secs(30), |l| l.contains("serving"));
    http_get((ip, 9090).into(), "/while-following");
    follow.wait_line(Duration::from_secs(30), |l| {
        l.contains("\"GET /while-following\" 200")
    });
    lab.ok(&["delete", "pod", "p", "-n", "logs", "--wait=false"]);
    let (rest, ok) = follow.wait_exit(Duration::from_secs(30));
    assert!(ok, "kubectl logs -f ends cleanly when the pod is deleted");
    assert!(rest.is_empty(), "{rest:?}");
}
