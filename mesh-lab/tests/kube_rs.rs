//! kube-rs against the lab's kube-api: typed APIs, subresources, watchers (list-watch and
//! streaming lists, including a 410 relist), and the raw watch protocol.

mod common;

use std::time::Duration;

use common::Lab;
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use mesh_lab::kube_api::resources as r;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
    }))
    .unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "img:1"}]}},
        },
    }))
    .unwrap()
}

fn api_err(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_crud_with_optimistic_concurrency() {
    let lab = Lab::start().await;
    lab.namespace("crud");
    let client = lab.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "crud");
    let pp = PostParams::default();

    let created = svcs.create(&pp, &service("web")).await.unwrap();
    let meta = &created.metadata;
    assert!(
        meta.uid.is_some() && meta.creation_timestamp.is_some() && meta.resource_version.is_some()
    );
    let spec = created.spec.as_ref().unwrap();
    assert!(spec.cluster_ip.as_deref().unwrap().starts_with("10.96."));
    assert_eq!(
        spec.ports.as_ref().unwrap()[0].protocol.as_deref(),
        Some("TCP")
    );

    let e = api_err(svcs.create(&pp, &service("web")).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(e.message, "services \"web\" already exists");

    // Update with the current resourceVersion works; with the stale one it conflicts.
    let mut v1 = created.clone();
    v1.metadata
        .labels
        .get_or_insert_default()
        .insert("v".into(), "1".into());
    let updated = svcs.replace("web", &pp, &v1).await.unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(
        updated.spec.as_ref().unwrap().cluster_ip,
        spec.cluster_ip,
        "ClusterIP kept"
    );
    let e = api_err(svcs.replace("web", &pp, &v1).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );

    // A no-op patch keeps the resourceVersion.
    let same = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"v": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        updated.metadata.resource_version
    );
    // A merge patch carrying a stale resourceVersion is a conflict.
    let stale = json!({"metadata": {"resourceVersion": created.metadata.resource_version, "labels": {"v": "2"}}});
    let e = api_err(
        svcs.patch("web", &PatchParams::default(), &Patch::Merge(stale))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 409);

    let gen_named = svcs
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"generateName": "gen-"}, "spec": {"ports": [{"port": 1}]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let name = gen_named.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let deleted = svcs.delete("web", &DeleteParams::default()).await.unwrap();
    let deleted = deleted.left().expect("delete returns the object");
    assert_eq!(deleted.metadata.name.as_deref(), Some("web"));
    let e = api_err(svcs.get("web").await.unwrap_err());
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (404, "NotFound", "services \"web\" not found")
    );

    let elsewhere: Api<Service> = Api::namespaced(client, "does-not-exist");
    let e = api_err(elsewhere.create(&pp, &service("x")).await.unwrap_err());
    assert_eq!(
        (e.code, e.message.as_str()),
        (404, "namespaces \"does-not-exist\" not found")
    );
}

#[tokio::test]
async fn deployment_scale_and_status_subresources() {
    let lab = Lab::start().await;
    lab.namespace("sub");
    let deploys: Api<Deployment> = Api::namespaced(lab.client().await, "sub");
    let pp = PostParams::default();
    let d = deploys.create(&pp, &deployment("web", 2)).await.unwrap();
    assert_eq!(d.metadata.generation, Some(1));

    let scale = deploys.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(
        scale.status.as_ref().unwrap().selector.as_deref(),
        Some("app=web")
    );

    let scaled = deploys
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(5));
    let d = deploys.get("web").await.unwrap();
    assert_eq!(d.spec.replicas, Some(5));
    assert_eq!(d.metadata.generation, Some(2));
    let e = api_err(deploys.replace_scale("web", &pp, &scale).await.unwrap_err());
    assert_eq!(
        e.code, 409,
        "a Scale with a stale resourceVersion conflicts"
    );

    // Status goes through /status only, and does not bump the generation.
    let with_status = deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyReplicas": 3, "observedGeneration": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(with_status.status.as_ref().unwrap().ready_replicas, Some(3));
    assert_eq!(with_status.metadata.generation, Some(2));
    let ignored = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyReplicas": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(
        ignored.status.unwrap().ready_replicas,
        Some(3),
        "status is ignored on the main resource"
    );
    assert_eq!(
        ignored.metadata.resource_version,
        with_status.metadata.resource_version
    );

    let e = api_err(
        deploys
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"selector": {"matchLabels": {"app": "other"}}}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
}

/// Runs a watcher on Services in `ns` and checks it sees the initial object, then an add, a
/// change and a delete.
async fn watcher_sees_changes(lab: &Lab, ns: &str, config: watcher::Config) {
    lab.namespace(ns);
    let svcs: Api<Service> = Api::namespaced(lab.client().await, ns);
    let pp = PostParams::default();
    svcs.create(&pp, &service("before")).await.unwrap();
    let mut events = watcher(svcs.clone(), config).boxed();

    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Init => {}
            watcher::Event::InitApply(s) => initial.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected event during init: {other:?}"),
        }
    }
    assert_eq!(initial, ["before"]);

    svcs.create(&pp, &service("after")).await.unwrap();
    svcs.patch(
        "after",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    svcs.delete("after", &DeleteParams::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(s) => {
                let labelled = s
                    .metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key("x"));
                seen.push(if labelled { "modified" } else { "added" });
            }
            watcher::Event::Delete(s) => {
                assert_eq!(s.metadata.name.as_deref(), Some("after"));
                seen.push("deleted");
            }
            other => panic!("unexpected event: {other:?}"),
        }
    }
    assert_eq!(seen, ["added", "modified", "deleted"]);
}

#[tokio::test]
async fn list_watch_watcher_sees_changes() {
    let lab = Lab::start().await;
    watcher_sees_changes(&lab, "lw", watcher::Config::default()).await;
}

#[tokio::test]
async fn streaming_list_watcher_sees_changes() {
    let lab = Lab::start().await;
    watcher_sees_changes(&lab, "sl", watcher::Config::default().streaming_lists()).await;
}

/// A watcher whose resourceVersion was compacted away gets 410 inside the stream, relists,
/// and sees what changed while it was disconnected.
async fn watcher_relists_after_410(streaming: bool) {
    let lab = Lab::start().await;
    lab.namespace("gone");
    let client = lab.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "gone");
    let cms: Api<ConfigMap> = Api::namespaced(client, "gone");
    let pp = PostParams::default();
    svcs.create(&pp, &service("first")).await.unwrap();
    let config = if streaming {
        watcher::Config::default().streaming_lists()
    } else {
        watcher::Config::default()
    };
    let mut events = watcher(svcs.clone(), config).boxed();
    loop {
        if let watcher::Event::InitDone = tokio::time::timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            break;
        }
    }
    // The watcher has seen nothing after its initial resourceVersion. Move the
    // resourceVersion on with other objects, compact, and change a service while no watch
    // is open (the store's writes are ordered, so the watch is closed before "second").
    for i in 0..3 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm{i}")}})).unwrap();
        cms.create(&pp, &cm).await.unwrap();
    }
    lab.api.store().compact();
    lab.api.store().close_watches();
    lab.api
        .store()
        .create(
            &r::SERVICES,
            Some("gone"),
            json!({"metadata": {"name": "second"}, "spec": {"ports": [{"port": 1}]}}),
        )
        .unwrap();

    let mut saw_410 = false;
    let mut relisted = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
        {
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                assert_eq!(s.reason, "Expired");
                saw_410 = true;
            }
            Err(e) => panic!("unexpected watcher error: {e:?}"),
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(s)) => relisted.push(s.metadata.name.unwrap()),
            Ok(watcher::Event::InitDone) => break,
            Ok(watcher::Event::Apply(s)) => panic!(
                "{:?} arrived as a watch event, not through a relist",
                s.metadata.name
            ),
            Ok(other) => panic!("unexpected event {other:?}"),
        }
    }
    assert!(saw_410, "the re-watch got 410 Expired");
    relisted.sort();
    assert_eq!(relisted, ["first", "second"]);
}

#[tokio::test]
async fn list_watch_watcher_relists_after_410() {
    watcher_relists_after_410(false).await;
}

#[tokio::test]
async fn streaming_list_watcher_relists_after_410() {
    watcher_relists_after_410(true).await;
}

fn get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path).body(Vec::new()).unwrap()
}

fn lines(text: &str) -> Vec<Value> {
    assert!(
        text.ends_with('\n') || text.is_empty(),
        "every event ends with a newline: {text:?}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

#[tokio::test]
async fn raw_watch_protocol() {
    let lab = Lab::start_with(|c| {
        c.watch_history = 4;
        c.bookmark_interval = Duration::from_millis(100);
    })
    .await;
    lab.namespace("raw");
    let client = lab.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "raw");
    let pp = PostParams::default();
    let a = svcs.create(&pp, &service("a")).await.unwrap();
    let rv_a: u64 = a.metadata.resource_version.unwrap().parse().unwrap();
    svcs.create(&pp, &service("b")).await.unwrap();

    // Resuming from a retained resourceVersion replays only what came after it, and the
    // stream ends after timeoutSeconds.
    let text = client
        .request_text(get(&format!(
            "/api/v1/namespaces/raw/services?watch=true&resourceVersion={rv_a}&timeoutSeconds=1"
        )))
        .await
        .unwrap();
    let evs = lines(&text);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(
        (
            evs[0]["type"].as_str(),
            evs[0]["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );

    // After more changes than the history holds, the old resourceVersion is gone: a 200
    // stream with one ERROR event carrying a 410 Status.
    for i in 0..5 {
        svcs.patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"i": i.to_string()}}})),
        )
        .await
        .unwrap();
    }
    let text = client
        .request_text(get(&format!(
            "/api/v1/namespaces/raw/services?watch=true&resourceVersion={rv_a}"
        )))
        .await
        .unwrap();
    let evs = lines(&text);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["kind"], "Status");
    assert_eq!(evs[0]["object"]["code"], 410);
    assert_eq!(evs[0]["object"]["reason"], "Expired");

    // Streaming list: every object as ADDED, then the initial-events-end bookmark; then
    // periodic bookmarks with kind and apiVersion.
    let stream = client
        .request_stream(get(
            "/api/v1/namespaces/raw/services?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0&allowWatchBookmarks=true&labelSelector=app%20in%20(a%2Cb)",
        ))
        .await
        .unwrap();
    let mut stream = stream.lines();
    let mut next = async || -> Value {
        let l = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_str(&l).unwrap()
    };
    let (e1, e2, e3) = (next().await, next().await, next().await);
    assert_eq!(
        (
            e1["type"].as_str(),
            e1["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("a"))
    );
    assert_eq!(
        (
            e2["type"].as_str(),
            e2["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    assert_eq!(e3["type"], "BOOKMARK");
    assert_eq!(e3["object"]["kind"], "Service");
    assert_eq!(e3["object"]["apiVersion"], "v1");
    assert_eq!(
        e3["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let bookmark = next().await;
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Service");
    assert!(bookmark["object"]["metadata"].get("annotations").is_none());

    // An object leaving the label selection is DELETED for this watch.
    svcs.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "zzz"}}})),
    )
    .await
    .unwrap();
    let left = loop {
        let e = next().await;
        if e["type"] != "BOOKMARK" {
            break e;
        }
    };
    assert_eq!(
        (
            left["type"].as_str(),
            left["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("a"))
    );
}

#[tokio::test]
async fn http_errors_are_status_objects() {
    let lab = Lab::start().await;
    lab.namespace("errs");
    let client = lab.client().await;
    let post = |path: &str, ct: &str, body: &[u8]| {
        http::Request::post(path)
            .header("content-type", ct)
            .body(body.to_vec())
            .unwrap()
    };
    let status = |r: Result<String, kube::Error>| api_err(r.unwrap_err());

    let e = status(
        client
            .request_text(post(
                "/api/v1/namespaces/errs/configmaps",
                "application/json",
                b"{\"metadata\": ",
            ))
            .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (400, "BadRequest"));
    assert!(e.message.contains("invalid JSON"), "{}", e.message);
    let e = status(
        client
            .request_text(post(
                "/api/v1/namespaces/errs/configmaps",
                "application/vnd.kubernetes.protobuf",
                b"k8s\0xx",
            ))
            .await,
    );
    assert_eq!(e.code, 415);
    let e = status(
        client
            .request_text(post(
                "/api/v1/namespaces/errs/configmaps",
                "application/json",
                br#"{"kind":"Secret","metadata":{"name":"x"}}"#,
            ))
            .await,
    );
    assert_eq!(e.code, 400);
    assert!(e.message.contains("kind"), "{}", e.message);
    let e = status(client.request_text(get("/api/v1/widgets")).await);
    assert_eq!(e.code, 404);
    let e = status(
        client
            .request_text(get(
                "/api/v1/namespaces/errs/services?labelSelector=a%20b%20c",
            ))
            .await,
    );
    assert_eq!(e.code, 400);

    // Without the token: 401, but health and version stay public.
    let kc = kube::config::Kubeconfig::read_from(lab.api.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    config.auth_info.token = None;
    let anon = kube::Client::try_from(config).unwrap();
    let e = status(anon.request_text(get("/api/v1/namespaces")).await);
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    assert_eq!(anon.request_text(get("/readyz")).await.unwrap(), "ok");
    let v = anon.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
}

// kubectl blocks a worker thread while the server runs on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_watch_for_in_process_controllers() {
    let lab = Lab::start().await;
    let store = lab.api.store();
    store
        .create(&r::NAMESPACES, None, json!({"metadata": {"name": "ctl"}}))
        .unwrap();
    let rv = store.resource_version();
    let mut w = store
        .watch(
            &r::PODS,
            mesh_lab::kube_api::WatchOptions {
                namespace: Some("ctl".into()),
                resource_version: Some(rv),
                ..Default::default()
            },
        )
        .unwrap();
    let pod = store
        .create(
            &r::PODS,
            None,
            json!({"metadata": {"name": "p", "namespace": "ctl"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        )
        .unwrap();
    assert_eq!(pod["status"]["phase"], "Pending");
    let mut running = pod.clone();
    running["status"] = json!({"phase": "Running", "podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]});
    store
        .update_status(&r::PODS, Some("ctl"), "p", running)
        .unwrap();
    use mesh_lab::kube_api::WatchEvent;
    match tokio::time::timeout(WAIT, w.next()).await.unwrap().unwrap() {
        WatchEvent::Added(o) => assert_eq!(o["metadata"]["name"], "p"),
        other => panic!("{other:?}"),
    }
    match tokio::time::timeout(WAIT, w.next()).await.unwrap().unwrap() {
        WatchEvent::Modified(o) => assert_eq!(o["status"]["podIP"], "10.0.0.5"),
        other => panic!("{other:?}"),
    }
    // kubectl sees the status the "kubelet" wrote.
    let out = lab.ok(&["get", "pods", "-n", "ctl", "-o", "wide"]);
    let row = common::row(&out, "p");
    assert_eq!(row[..3], ["p", "0/1", "Running"]);
    assert!(row.contains(&"10.0.0.5".to_string()), "{out}");

    store.compact();
    let e = store
        .watch(
            &r::PODS,
            mesh_lab::kube_api::WatchOptions {
                resource_version: Some(rv),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!((e.code, e.reason), (410, "Expired"));
}

#[tokio::test]
async fn restart_keeps_credentials_and_shutdown_stops_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = mesh_lab::kube_api::KubeApiConfig::new(dir.path(), "restart");
    let first = mesh_lab::kube_api::KubeApi::start(config.clone())
        .await
        .unwrap();
    let creds = first.credentials();
    assert_eq!(first.context(), "restart");
    assert!(creds.url.starts_with("https://127.0.0.1:"));
    let kubeconfig = std::fs::read_to_string(first.kubeconfig_path()).unwrap();
    assert!(kubeconfig.contains(&creds.token) && kubeconfig.contains("current-context: restart"));
    first.shutdown().await;

    let second = mesh_lab::kube_api::KubeApi::start(config).await.unwrap();
    assert_eq!(second.ca_pem(), creds.ca_pem, "the CA is reused");
    assert_eq!(second.token(), creds.token, "the token is reused");
    let kc = kube::config::Kubeconfig::read_from(second.kubeconfig_path()).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    assert!(ns.get("default").await.is_ok());
    let addr = second.addr();
    second.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}

/// kube-rs' event Recorder writes events.k8s.io/v1 Events; they are the same objects as the
/// core v1 Events kubectl shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_events_are_core_events() {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let lab = Lab::start().await;
    lab.namespace("ev");
    let client = lab.client().await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "ev");
    let svc = svcs
        .create(&PostParams::default(), &service("web"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "mesh-apiserver".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidAnnotation".into(),
        note: Some("service.cilium.io/affinity: \"sideways\" is not local, remote or none".into()),
        action: "Validate".into(),
        secondary: None,
    };
    let reference = svc.object_ref(&());
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();

    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "ev");
    let list = v1.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 1, "the second publish patches the series");
    assert_eq!(list.items[0].series.as_ref().map(|s| s.count), Some(2));
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "ev");
    let list = core.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let e = &list.items[0];
    assert_eq!(e.involved_object.name.as_deref(), Some("web"));
    assert_eq!(e.reporting_component.as_deref(), Some("mesh-apiserver"));
    assert!(e.message.as_deref().unwrap().contains("sideways"));

    let out = lab.ok(&["describe", "service", "web", "-n", "ev"]);
    assert!(
        out.contains("InvalidAnnotation") && out.contains("sideways"),
        "{out}"
    );
}

/// Go's `base64.RawURLEncoding` decode, written here independently of the server's.
fn base64url_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in s.bytes() {
        let v = A
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("{c:?} in {s}"));
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test]
async fn lists_page_with_limit_and_continue() {
    let lab = Lab::start_with(|c| c.watch_history = 8).await;
    lab.namespace("pages");
    let client = lab.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "pages");
    let cm = |name: &str, tier: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"tier": tier}}}))
            .unwrap()
    };
    for (name, tier) in [
        ("a", "web"),
        ("b", "db"),
        ("c", "web"),
        ("d", "web"),
        ("e", "db"),
    ] {
        cms.create(&PostParams::default(), &cm(name, tier))
            .await
            .unwrap();
    }
    let names = |l: &kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        l.items
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect()
    };

    // The official Kubernetes Python client's case: asked for 2, gets 2 and a token.
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(names(&first), ["a", "b"]);
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let rv = first.metadata.resource_version.clone().unwrap();
    // The token is kube-apiserver's: base64 (URL-safe, unpadded) JSON of rv and start key.
    let decoded: Value = serde_json::from_slice(&base64url_decode(&token)).unwrap();
    assert_eq!(
        decoded,
        json!({"v": "meta.k8s.io/v1", "rv": rv.parse::<i64>().unwrap(), "start": "b\u{0}"})
    );

    // Changes after the first page do not show in the rest of the list.
    cms.delete("c", &DeleteParams::default()).await.unwrap();
    cms.create(&PostParams::default(), &cm("bb", "web"))
        .await
        .unwrap();
    let second = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(&second), ["c", "d"], "the snapshot of the first page");
    assert_eq!(
        second.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    assert_eq!(second.metadata.remaining_item_count, Some(1));
    let third = cms
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(&third), ["e"]);
    assert_eq!(third.metadata.continue_, None, "the last page has no token");
    assert_eq!(third.metadata.remaining_item_count, None);

    // Selectors apply before the limit; a filtered list does not count what remains.
    let web = cms
        .list(&ListParams::default().labels("tier=web").limit(2))
        .await
        .unwrap();
    assert_eq!(names(&web), ["a", "bb"]);
    assert_eq!(web.metadata.remaining_item_count, None);
    let web2 = cms
        .list(
            &ListParams::default()
                .labels("tier=web")
                .limit(2)
                .continue_token(web.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(&web2), ["d"]);

    // No limit: everything, no token.
    let all = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(&all), ["a", "b", "bb", "d", "e"]);
    assert_eq!(all.metadata.continue_, None);

    // A malformed token: 400 naming the parameter.
    let e = api_err(
        cms.list(&ListParams::default().limit(2).continue_token("not-a-token"))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (400, "BadRequest"));
    assert!(
        e.message.starts_with("invalid continue token:"),
        "{}",
        e.message
    );
    let e = api_err(
        client
            .request_text(get(&format!(
                "/api/v1/namespaces/pages/configmaps?limit=2&continue={token}&resourceVersion={rv}"
            )))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
    assert!(e.message.contains("resource version"), "{}", e.message);

    // More changes than the history keeps: the first page's version cannot be served any
    // more. 410 Expired, with a token that continues (inconsistently) at the latest version.
    for i in 0..10 {
        cms.create(&PostParams::default(), &cm(&format!("z{i}"), "db"))
            .await
            .unwrap();
    }
    let e = api_err(
        cms.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
    assert!(
        e.message.contains("too old to display a consistent list"),
        "{}",
        e.message
    );
    let fresh = e
        .metadata
        .and_then(|m| m.continue_)
        .expect("a continue-at-latest token in the Status");
    let latest = cms
        .list(&ListParams::default().limit(2).continue_token(&fresh))
        .await
        .unwrap();
    assert_eq!(
        names(&latest),
        ["bb", "d"],
        "continues after b, at the latest version"
    );
    assert_ne!(
        latest.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
}
