//! The lab's controllers, scheduler and kubelet on a real lab API, driven with the real
//! kubectl; pods are real `mesh-lab workload` processes on loopback addresses
//! (`ProcessRuntime`), so readiness probes and HTTP answers are real too.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Lab, row};
use mesh_lab::controllers::{self, ControllersConfig, PodKey, ProcessRuntime};
use mesh_lab::kube_api::resources as r;
use mesh_lab::kube_api::{ResourceType, Store, WatchEvent, WatchOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    lab: Lab,
    runtime: Arc<ProcessRuntime>,
    controllers: Option<controllers::Controllers>,
}

impl Cluster {
    async fn start() -> Cluster {
        let lab = Lab::start().await;
        let store = lab.api.store().clone();
        for (node, zone) in [("n1", "z1"), ("n2", "z2")] {
            store
                .create(
                    &r::NODES,
                    None,
                    json!({"metadata": {"name": node, "labels": {
                        "kubernetes.io/hostname": node, "topology.kubernetes.io/zone": zone}}}),
                )
                .unwrap();
        }
        let runtime = Arc::new(ProcessRuntime::with_random_net(env!(
            "CARGO_BIN_EXE_mesh-lab"
        )));
        let mut cfg = ControllersConfig::new("test", runtime.clone()).with_lb_range(
            "172.31.9.200".parse().unwrap(),
            "172.31.9.202".parse().unwrap(),
        );
        cfg.nodes = vec!["n1".into(), "n2".into()];
        cfg.lb_static = vec!["172.31.9.2".parse().unwrap()];
        let controllers = controllers::spawn_all(store, cfg);
        Cluster {
            lab,
            runtime,
            controllers: Some(controllers),
        }
    }

    fn store(&self) -> &Arc<Store> {
        self.lab.api.store()
    }

    fn namespace(&self, ns: &str) {
        self.lab.ok(&["create", "namespace", ns]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Dropping the controllers aborts them; the runtime kills its processes when dropped.
        drop(self.controllers.take());
    }
}

/// Waits, on a store watch, until `pred` holds for the objects of a type in a namespace;
/// returns them. Panics with the last state after `WAIT`.
async fn wait_for(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut w = store
        .watch(
            rt,
            WatchOptions {
                namespace: Some(ns.into()),
                resource_version: Some(store.resource_version()),
                ..Default::default()
            },
        )
        .unwrap();
    loop {
        let (items, _) = store.list(rt, Some(ns), &Default::default(), &Default::default());
        if pred(&items) {
            return items;
        }
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("watch ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; last state:\n{}",
                serde_json::to_string_pretty(&items).unwrap()
            ),
        }
    }
}

fn slice_endpoints(slices: &[Value], svc: &str) -> Vec<Value> {
    slices
        .iter()
        .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == svc)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn ready_count(eps: &[Value]) -> usize {
    eps.iter()
        .filter(|e| e["conditions"]["ready"] == true)
        .count()
}

fn curl(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn key_of(pod: &Value) -> PodKey {
    PodKey {
        namespace: pod["metadata"]["namespace"].as_str().unwrap().into(),
        name: pod["metadata"]["name"].as_str().unwrap().into(),
        uid: pod["metadata"]["uid"].as_str().unwrap().into(),
    }
}

const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: NS
spec:
  replicas: REPLICAS
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
        image: ghcr.io/example/ignored:1
        args: ['{"planet":"Alderaan"}']
        ports:
        - name: http
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /healthz
            port: http
          periodSeconds: 1
          failureThreshold: 1
---
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
    targetPort: http
"#;

fn app(ns: &str, replicas: u32) -> String {
    APP.replace("NS", ns)
        .replace("REPLICAS", &replicas.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pods_endpoints_and_scale() {
    let c = Cluster::start().await;
    c.namespace("shop");
    c.lab.apply(&app("shop", 2), &[]);
    c.lab.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "shop",
        "--timeout=60s",
    ]);

    // kubectl get pods -o wide: Running, 1/1, a pod IP, one pod per node.
    let table = c.lab.ok(&["get", "pods", "-n", "shop", "-o", "wide"]);
    let pods = c.lab.get_json(&["pods", "-n", "shop"]);
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{table}");
    let mut nodes = Vec::new();
    for p in items {
        let name = p["metadata"]["name"].as_str().unwrap();
        let hash = p["metadata"]["labels"]["pod-template-hash"]
            .as_str()
            .unwrap();
        assert!(
            name.starts_with(&format!("web-{hash}-")) && name.len() == "web-".len() + 10 + 6,
            "{name}"
        );
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "Deployment");
        let cols = row(&table, name);
        assert_eq!(&cols[1..3], ["1/1", "Running"], "{table}");
        let ip = p["status"]["podIP"].as_str().unwrap();
        assert!(ip.starts_with("127."), "{ip}");
        assert_eq!(cols[5], ip, "{table}");
        assert_eq!(p["status"]["hostIP"], "127.0.0.1");
        let conds: Vec<(String, String)> = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap().to_string(),
                    c["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert!(
                conds.contains(&(t.to_string(), "True".to_string())),
                "{t} in {conds:?}"
            );
        }
        assert!(
            p["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].is_string(),
            "{p:#}"
        );
        nodes.push(cols[6].clone());

        // The pod answers HTTP with JSON naming it.
        let body: Value =
            serde_json::from_str(&curl(&[&format!("http://{ip}:8080/anything")])).unwrap();
        assert_eq!(
            body,
            json!({"cluster": "test", "namespace": "shop", "pod": name, "node": cols[6], "ip": ip,
                   "reply": {"planet": "Alderaan"}})
        );
    }
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"], "spread over both nodes");

    // kubectl get deploy.
    let d = c.lab.ok(&["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(&row(&d, "web")[1..4], ["2/2", "2", "2"], "{d}");

    // EndpointSlices as kubectl shows them.
    let slices = c.lab.get_json(&[
        "endpointslices",
        "-n",
        "shop",
        "-l",
        "kubernetes.io/service-name=web",
    ]);
    let slices = slices["items"].as_array().unwrap();
    assert_eq!(slices.len(), 1);
    let s = &slices[0];
    assert!(s["metadata"]["name"].as_str().unwrap().starts_with("web-"));
    assert_eq!(
        s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert_eq!(s["addressType"], "IPv4");
    assert_eq!(
        s["ports"],
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
    );
    let eps = s["endpoints"].as_array().unwrap();
    assert_eq!(ready_count(eps), 2, "{s:#}");
    for e in eps {
        let pod = items
            .iter()
            .find(|p| p["metadata"]["name"] == e["targetRef"]["name"])
            .expect("targetRef names a pod");
        assert_eq!(e["addresses"][0], pod["status"]["podIP"]);
        assert_eq!(e["nodeName"], pod["spec"]["nodeName"]);
        let zone = if e["nodeName"] == "n1" { "z1" } else { "z2" };
        assert_eq!(e["zone"], zone);
        assert_eq!(
            e["conditions"],
            json!({"ready": true, "serving": true, "terminating": false})
        );
    }
    let table = c.lab.ok(&["get", "endpointslices", "-n", "shop"]);
    assert!(table.contains("8080"), "{table}");

    // Scale to zero: the slice empties and the processes stop.
    c.lab
        .ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=0"]);
    wait_for(
        c.store(),
        &r::ENDPOINTSLICES,
        "shop",
        "an empty slice",
        |s| slice_endpoints(s, "web").is_empty(),
    )
    .await;
    wait_for(c.store(), &r::PODS, "shop", "no pods", |p| p.is_empty()).await;
    c.lab.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "shop",
        "--timeout=60s",
    ]);
    let d = c.lab.ok(&["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(&row(&d, "web")[1..4], ["0/0", "0", "0"], "{d}");
    for p in items {
        assert_eq!(
            c.runtime.pod_ip(&key_of(p)),
            None,
            "process of a deleted pod stopped"
        );
    }

    // And back to two.
    c.lab
        .ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=2"]);
    wait_for(
        c.store(),
        &r::ENDPOINTSLICES,
        "shop",
        "two ready endpoints",
        |s| ready_count(&slice_endpoints(s, "web")) == 2,
    )
    .await;
    c.lab.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "shop",
        "--timeout=60s",
    ]);

    // Deleting the Service deletes its slice; deleting the Deployment its pods.
    c.lab.ok(&["delete", "service", "web", "-n", "shop"]);
    wait_for(c.store(), &r::ENDPOINTSLICES, "shop", "no slices", |s| {
        s.is_empty()
    })
    .await;
    c.lab.ok(&["delete", "deployment", "web", "-n", "shop"]);
    wait_for(c.store(), &r::PODS, "shop", "no pods", |p| p.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probes_crashes_and_template_changes() {
    let c = Cluster::start().await;
    c.namespace("probe");
    c.lab.apply(&app("probe", 1), &[]);
    let slices = wait_for(
        c.store(),
        &r::ENDPOINTSLICES,
        "probe",
        "a ready endpoint",
        |s| ready_count(&slice_endpoints(s, "web")) == 1,
    )
    .await;
    let ip = slice_endpoints(&slices, "web")[0]["addresses"][0]
        .as_str()
        .unwrap()
        .to_string();
    let pod_name = slice_endpoints(&slices, "web")[0]["targetRef"]["name"]
        .as_str()
        .unwrap()
        .to_string();

    // The readiness probe starts failing: not ready, not serving, but still listed.
    curl(&["-X", "POST", &format!("http://{ip}:8080/healthz/fail")]);
    wait_for(
        c.store(),
        &r::ENDPOINTSLICES,
        "probe",
        "an unready endpoint",
        |s| {
            let eps = slice_endpoints(s, "web");
            eps.len() == 1
                && eps[0]["conditions"]
                    == json!({"ready": false, "serving": false, "terminating": false})
        },
    )
    .await;
    let table = c.lab.ok(&["get", "pods", "-n", "probe"]);
    assert_eq!(&row(&table, &pod_name)[1..3], ["0/1", "Running"], "{table}");
    let events = c.lab.ok(&[
        "get",
        "events",
        "-n",
        "probe",
        "--field-selector",
        &format!("involvedObject.name={pod_name}"),
    ]);
    assert!(events.contains("Unhealthy"), "{events}");
    curl(&["-X", "POST", &format!("http://{ip}:8080/healthz/ok")]);
    wait_for(c.store(), &r::ENDPOINTSLICES, "probe", "ready again", |s| {
        ready_count(&slice_endpoints(s, "web")) == 1
    })
    .await;

    // The process dies: the endpoint turns unready, the kubelet restarts it, it is ready again.
    let pod = c.store().get(&r::PODS, Some("probe"), &pod_name).unwrap();
    let mut w = c
        .store()
        .watch(
            &r::ENDPOINTSLICES,
            WatchOptions {
                namespace: Some("probe".into()),
                resource_version: Some(c.store().resource_version()),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(c.runtime.kill(&key_of(&pod)));
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, w.next())
            .await
            .unwrap_or_else(|_| panic!("slice states seen: {seen:?}"))
            .unwrap();
        if let WatchEvent::Modified(s) = ev {
            let r = ready_count(&slice_endpoints(&[(*s).clone()], "web"));
            seen.push(r);
            if seen.contains(&0) && r == 1 {
                break;
            }
        }
    }
    let p = c.lab.get_json(&["pod", &pod_name, "-n", "probe"]);
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 1);
    assert!(
        p["status"]["containerStatuses"][0]["lastState"]["terminated"].is_object(),
        "{p:#}"
    );
    let body: Value = serde_json::from_str(&curl(&[&format!("http://{ip}:8080/")])).unwrap();
    assert_eq!(
        body["pod"],
        pod_name.as_str(),
        "same pod, same address after the restart"
    );

    // A template change recreates the pod.
    c.lab
        .ok(&["set", "env", "deployment/web", "-n", "probe", "COLOR=blue"]);
    c.lab.ok(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "probe",
        "--timeout=60s",
    ]);
    let pods = wait_for(c.store(), &r::PODS, "probe", "one new pod", |p| {
        p.len() == 1 && p[0]["metadata"]["name"] != pod_name.as_str()
    })
    .await;
    assert!(
        pods[0]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "COLOR", "value": "blue"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_node_selectors_and_pod_deletion() {
    let c = Cluster::start().await;
    c.namespace("sched");
    c.lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: pinned
  namespace: sched
spec:
  nodeSelector:
    kubernetes.io/hostname: n2
  containers:
  - name: c
    image: x
    ports:
    - containerPort: 9090
---
apiVersion: v1
kind: Pod
metadata:
  name: stuck
  namespace: sched
spec:
  nodeSelector:
    kubernetes.io/hostname: nowhere
  containers:
  - name: c
    image: x
"#,
        &[],
    );
    c.lab.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/pinned",
        "-n",
        "sched",
        "--timeout=60s",
    ]);
    let p = c.lab.get_json(&["pod", "pinned", "-n", "sched"]);
    assert_eq!(p["spec"]["nodeName"], "n2");
    // No probe: ready once started.
    assert_eq!(p["status"]["containerStatuses"][0]["ready"], true);
    let ip = p["status"]["podIP"].as_str().unwrap();
    let body: Value = serde_json::from_str(&curl(&[&format!("http://{ip}:9090/")])).unwrap();
    assert_eq!(
        (body["pod"].as_str(), body["node"].as_str()),
        (Some("pinned"), Some("n2"))
    );

    c.lab.ok(&[
        "wait",
        "--for=condition=PodScheduled=false",
        "pod/stuck",
        "-n",
        "sched",
        "--timeout=60s",
    ]);
    let s = c.lab.get_json(&["pod", "stuck", "-n", "sched"]);
    assert_eq!(s["status"]["phase"], "Pending");
    assert!(s["spec"]["nodeName"].is_null());
    let cond = s["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .unwrap()
        .clone();
    assert_eq!(cond["reason"], "Unschedulable");
    let events = c.lab.ok(&[
        "get",
        "events",
        "-n",
        "sched",
        "--field-selector",
        "involvedObject.name=stuck",
    ]);
    assert!(
        events.contains("FailedScheduling") && events.contains("kubernetes.io/hostname=nowhere"),
        "{events}"
    );

    // Deleting the pod stops its process.
    let key = key_of(&p);
    assert!(c.runtime.pod_ip(&key).is_some());
    c.lab.ok(&["delete", "pod", "pinned", "-n", "sched"]);
    // The kubelet's task owns the process: poll with a deadline.
    let deadline = Instant::now() + WAIT;
    while c.runtime.pod_ip(&key).is_some() {
        assert!(
            Instant::now() < deadline,
            "the pod's process was not stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{ip}:9090/")])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nothing answers on a deleted pod's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_addresses() {
    let c = Cluster::start().await;
    c.namespace("lb");
    let svc = |name: &str, ip: Option<&str>| {
        let ip = ip
            .map(|i| format!("\n  loadBalancerIP: {i}"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: lb\nspec:\n  type: LoadBalancer{ip}\n  ports:\n  - port: 443\n"
        )
    };
    let ingress = |items: &[Value], name: &str| -> Option<String> {
        items
            .iter()
            .find(|s| s["metadata"]["name"] == name)
            .and_then(|s| s["status"]["loadBalancer"]["ingress"][0]["ip"].as_str())
            .map(String::from)
    };
    c.lab.apply(&svc("api", Some("172.31.9.2")), &[]);
    c.lab.apply(&svc("first", None), &[]);
    let items = wait_for(c.store(), &r::SERVICES, "lb", "two addresses", |s| {
        ingress(s, "api").is_some() && ingress(s, "first").is_some()
    })
    .await;
    assert_eq!(ingress(&items, "api").as_deref(), Some("172.31.9.2"));
    assert_eq!(ingress(&items, "first").as_deref(), Some("172.31.9.200"));
    let table = c.lab.ok(&["get", "svc", "-n", "lb"]);
    assert_eq!(row(&table, "first")[3], "172.31.9.200", "{table}");

    // Taken and out-of-pool addresses: an Event naming the problem, no address.
    c.lab.apply(&svc("dup", Some("172.31.9.2")), &[]);
    c.lab.apply(&svc("outside", Some("10.9.9.9")), &[]);
    let events = |name: &str| {
        let out = c.lab.ok(&[
            "get",
            "events",
            "-n",
            "lb",
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["reason"].as_str().unwrap(),
                    e["message"].as_str().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };
    let about = |evs: &[Value], name: &str, text: &str| {
        evs.iter().any(|e| {
            e["involvedObject"]["name"] == name
                && e["reason"] == "SyncLoadBalancerFailed"
                && e["message"].as_str().unwrap_or_default().contains(text)
        })
    };
    wait_for(
        c.store(),
        &r::EVENTS,
        "lb",
        "events for dup and outside",
        |evs| {
            about(evs, "dup", "already used by Service lb/api")
                && about(
                    evs,
                    "outside",
                    "10.9.9.9 is outside the lab's LoadBalancer pool 172.31.9.200-172.31.9.202",
                )
        },
    )
    .await;
    assert!(
        events("dup")
            .iter()
            .any(|e| e.contains("SyncLoadBalancerFailed")),
        "{:?}",
        events("dup")
    );
    let s = c.lab.get_json(&["svc", "-n", "lb"]);
    assert_eq!(ingress(s["items"].as_array().unwrap(), "dup"), None);
    assert_eq!(ingress(s["items"].as_array().unwrap(), "outside"), None);

    // Changing the type releases the address; the next Service gets it.
    c.lab.ok(&[
        "patch",
        "svc",
        "first",
        "-n",
        "lb",
        "-p",
        r#"{"spec":{"type":"ClusterIP"}}"#,
    ]);
    wait_for(c.store(), &r::SERVICES, "lb", "first released", |s| {
        ingress(s, "first").is_none()
    })
    .await;
    c.lab.apply(&svc("second", None), &[]);
    let items = wait_for(c.store(), &r::SERVICES, "lb", "second assigned", |s| {
        ingress(s, "second").is_some()
    })
    .await;
    assert_eq!(ingress(&items, "second").as_deref(), Some("172.31.9.200"));

    // Deleting the holder frees a requested address for the next claimant.
    c.lab.ok(&["delete", "svc", "api", "-n", "lb"]);
    let items = wait_for(c.store(), &r::SERVICES, "lb", "dup assigned", |s| {
        ingress(s, "dup").is_some()
    })
    .await;
    assert_eq!(ingress(&items, "dup").as_deref(), Some("172.31.9.2"));
}
