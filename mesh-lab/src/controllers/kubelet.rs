//! The kubelet, API side: for every Pod bound to a node this cluster's lab manages, one worker
//! task starts the pod through a [`PodRuntime`], writes its status (IPs, phase, conditions,
//! containerStatuses) as `kubectl get pods -o wide` expects, probes readiness, restarts a pod
//! whose processes exited (with backoff and restartCount, like kubelet), and stops it when the
//! Pod object goes away or is marked for deletion.
//!
//! The runtime (how a pod becomes processes and an IP) is behind [`PodRuntime`]: the lab's
//! netns runtime in `mesh-lab up`, [`super::ProcessRuntime`] (plain local processes on
//! loopback addresses) in tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::Backoff;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::{
    ControllersConfig, Trigger, arr_at, is_terminating, list_all, modify, name_of, now, ns_of,
    pod_finished, record_event, set_condition, str_at, uid_of,
};
use crate::kube_api::resources as r;
use crate::kube_api::store::Store;

/// Identifies one incarnation of a pod (a pod deleted and recreated under the same name has
/// another uid).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One container as the runtime needs it. Images are ignored by the lab: every container runs
/// the built-in workload (see ARCHITECTURE.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Literal values resolved, plus `MESH_LAB_POD`, `MESH_LAB_NAMESPACE`, `MESH_LAB_NODE`,
    /// `MESH_LAB_CLUSTER` (the runtime adds `MESH_LAB_POD_IP`).
    pub env: Vec<(String, String)>,
    /// (name, containerPort, protocol)
    pub ports: Vec<(Option<String>, u16, String /*protocol*/)>,
}

impl ContainerSpec {
    /// The container's TCP ports (an empty protocol is TCP, as the API defaults it).
    pub fn tcp_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .filter(|(_, _, proto)| proto.is_empty() || proto.eq_ignore_ascii_case("TCP"))
            .map(|(_, port, _)| *port)
            .collect()
    }
}

/// What the runtime needs to start a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSandboxSpec {
    pub key: PodKey,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<ContainerSpec>,
}

/// Addresses of a started pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartedPod {
    pub pod_ip: std::net::Ipv4Addr,
    pub host_ip: std::net::Ipv4Addr,
}

/// One readiness check, with the port already resolved to a number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Http { port: u16, path: String },
    Tcp { port: u16 },
}

/// How pods become running processes with an address.
pub trait PodRuntime: Send + Sync + 'static {
    fn start(
        &self,
        pod: PodSandboxSpec,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<StartedPod>>;
    fn stop(&self, key: PodKey) -> futures::future::BoxFuture<'static, anyhow::Result<()>>;
    /// One probe attempt, made from the pod's node as kubelet does.
    fn probe(&self, key: PodKey, probe: Probe) -> futures::future::BoxFuture<'static, bool>;
    /// Whether the pod's processes are still running.
    fn running(&self, key: &PodKey) -> bool;
    /// The exit code of a pod whose processes have exited, when known (restartPolicy
    /// OnFailure/Never use it; unknown counts as a failure).
    fn exit_code(&self, _key: &PodKey) -> Option<i32> {
        None
    }
    /// The pod is gone for good (deleted, or the kubelet shuts down), after `stop`: release
    /// what a runtime keeps between a `stop` and the `start` of a restart (its address).
    fn release(&self, _key: &PodKey) {}
}

const COMPONENT: &str = "kubelet";
/// Restart backoff: doubling without jitter like kubelet's CrashLoopBackOff, with lab
/// bounds faster than kubelet's 10 s .. 5 min so tests and demos see restarts quickly.
const CRASH_LOOP_BACKOFF: Backoff = Backoff::exact(Duration::from_secs(1), Duration::from_secs(30));
/// A pod that ran this long gets its backoff reset.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How often the worker checks that the pod's processes still run.
const LIVENESS_TICK: Duration = Duration::from_millis(250);

struct Ctx {
    store: Arc<Store>,
    runtime: Arc<dyn PodRuntime>,
    cluster: String,
}

struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    key: PodKey,
}

#[derive(Default)]
struct Workers {
    /// By pod uid.
    running: HashMap<String, Worker>,
    /// Told to stop; awaited by shutdown.
    stopping: Vec<(PodKey, JoinHandle<()>)>,
}

/// The kubelet of the lab nodes of one cluster.
pub(crate) struct Kubelet {
    manager: JoinHandle<()>,
    workers: Arc<Mutex<Workers>>,
    runtime: Arc<dyn PodRuntime>,
}

impl Kubelet {
    pub(crate) fn spawn(store: Arc<Store>, cfg: &ControllersConfig) -> Kubelet {
        let workers = Arc::new(Mutex::new(Workers::default()));
        let ctx = Arc::new(Ctx {
            store,
            runtime: cfg.runtime.clone(),
            cluster: cfg.cluster.clone(),
        });
        let span = tracing::info_span!("kubelet", cluster = %cfg.cluster);
        let manager =
            tokio::spawn(manage(ctx, cfg.nodes.clone(), workers.clone()).instrument(span));
        Kubelet {
            manager,
            workers,
            runtime: cfg.runtime.clone(),
        }
    }

    /// Stops every pod through the runtime and waits for the workers.
    pub(crate) async fn shutdown(self) {
        self.manager.abort();
        let _ = (&mut { self.manager }).await;
        let all: Vec<JoinHandle<()>> = {
            let mut w = lock(&self.workers);
            let mut v: Vec<JoinHandle<()>> = Vec::new();
            for (_, worker) in w.running.drain() {
                let _ = worker.stop.send(true);
                v.push(worker.task);
            }
            v.extend(w.stopping.drain(..).map(|(_, t)| t));
            v
        };
        for t in all {
            let _ = t.await;
        }
    }

    /// Aborts everything; pods are stopped in the background when a tokio runtime is around.
    pub(crate) fn abort(self) {
        self.manager.abort();
        let mut w = lock(&self.workers);
        let mut keys = Vec::new();
        for (_, worker) in w.running.drain() {
            worker.task.abort();
            keys.push(worker.key);
        }
        for (key, t) in w.stopping.drain(..) {
            t.abort();
            keys.push(key);
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            for key in keys {
                let stop = self.runtime.stop(key);
                h.spawn(async move {
                    let _ = stop.await;
                });
            }
        }
    }
}

fn lock(w: &Mutex<Workers>) -> std::sync::MutexGuard<'_, Workers> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

fn key_of(pod: &Value) -> PodKey {
    PodKey {
        namespace: ns_of(pod).to_string(),
        name: name_of(pod).to_string(),
        uid: uid_of(pod).to_string(),
    }
}

async fn manage(ctx: Arc<Ctx>, nodes: Vec<String>, workers: Arc<Mutex<Workers>>) {
    let trigger = Trigger::new(&ctx.store, &[&r::PODS]);
    loop {
        trigger.changed().await;
        let pods = list_all(&ctx.store, &r::PODS);
        let mut wanted: HashMap<String, &Value> = HashMap::new();
        for p in &pods {
            let node = str_at(p, "/spec/nodeName");
            if nodes.iter().any(|n| n == node) && !is_terminating(p) {
                wanted.insert(uid_of(p).to_string(), p);
            }
        }
        let mut w = lock(&workers);
        w.stopping.retain(|(_, t)| !t.is_finished());
        let gone: Vec<String> = w
            .running
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(worker) = w.running.remove(&uid) {
                tracing::info!(namespace = %worker.key.namespace, pod = %worker.key.name, "pod deleted; stopping it");
                let _ = worker.stop.send(true);
                w.stopping.push((worker.key, worker.task));
            }
        }
        for (uid, p) in wanted {
            if w.running.contains_key(&uid) || pod_finished(p) {
                continue;
            }
            let key = key_of(p);
            let (stop, stop_rx) = watch::channel(false);
            let span = tracing::info_span!("pod", namespace = %key.namespace, pod = %key.name, node = str_at(p, "/spec/nodeName"));
            let task = tokio::spawn(pod_worker(ctx.clone(), p.clone(), stop_rx).instrument(span));
            w.running.insert(uid, Worker { stop, task, key });
        }
    }
}

// === pod spec translation ===

/// The readiness probe of one container, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadinessProbe {
    pub probe: Probe,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn secs(v: &Value, key: &str, default: u64) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(default)
}

/// A port given as a number or as the name of a containerPort (of `own` first, then of any
/// container of the pod).
fn resolve_port(port: &Value, own: &Value, pod_spec: &Value) -> Result<u16, String> {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).map_err(|_| format!("port {n} is out of range"));
    }
    let Some(name) = port.as_str() else {
        return Err(format!("port {port} is neither a number nor a name"));
    };
    if let Ok(n) = name.parse::<u16>() {
        return Ok(n);
    }
    std::iter::once(own)
        .chain(arr_at(pod_spec, "/containers"))
        .flat_map(|c| arr_at(c, "/ports"))
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| format!("no container port named {name:?}"))
}

/// The readiness probe of a container, if it has one (`periodSeconds` defaults to 1 in the lab).
pub fn readiness_probe(
    container: &Value,
    pod_spec: &Value,
) -> Result<Option<ReadinessProbe>, String> {
    let Some(p) = container.get("readinessProbe").filter(|p| p.is_object()) else {
        return Ok(None);
    };
    let probe = if let Some(h) = p.get("httpGet") {
        let port = resolve_port(&h["port"], container, pod_spec)?;
        let path = h.get("path").and_then(Value::as_str).unwrap_or("/");
        Probe::Http {
            port,
            path: if path.starts_with('/') {
                path.to_string()
            } else {
                format!("/{path}")
            },
        }
    } else if let Some(t) = p.get("tcpSocket") {
        Probe::Tcp {
            port: resolve_port(&t["port"], container, pod_spec)?,
        }
    } else {
        return Err("only httpGet and tcpSocket readiness probes are supported in the lab".into());
    };
    Ok(Some(ReadinessProbe {
        probe,
        initial_delay: Duration::from_secs(secs(p, "initialDelaySeconds", 0)),
        period: Duration::from_secs(secs(p, "periodSeconds", 1).max(1)),
        timeout: Duration::from_secs(secs(p, "timeoutSeconds", 1).max(1)),
        success_threshold: secs(p, "successThreshold", 1).max(1) as u32,
        failure_threshold: secs(p, "failureThreshold", 3).max(1) as u32,
    }))
}

/// The runtime's view of a pod: env literals resolved, lab variables added.
pub fn sandbox_spec(pod: &Value, cluster: &str) -> PodSandboxSpec {
    let node = str_at(pod, "/spec/nodeName").to_string();
    let strings = |c: &Value, k: &str| -> Vec<String> {
        arr_at(c, &format!("/{k}"))
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    let containers = arr_at(pod, "/spec/containers")
        .map(|c| {
            let mut env: Vec<(String, String)> = Vec::new();
            for e in arr_at(c, "/env") {
                let Some(name) = e["name"].as_str() else {
                    continue;
                };
                if let Some(v) = e.get("value").and_then(Value::as_str) {
                    env.push((name.into(), v.into()));
                } else if let Some(path) = e
                    .pointer("/valueFrom/fieldRef/fieldPath")
                    .and_then(Value::as_str)
                {
                    let v = match path {
                        "metadata.name" => name_of(pod).to_string(),
                        "metadata.namespace" => ns_of(pod).to_string(),
                        "metadata.uid" => uid_of(pod).to_string(),
                        "spec.nodeName" => node.clone(),
                        _ => {
                            tracing::warn!(
                                pod = name_of(pod),
                                var = name,
                                path,
                                "env fieldRef not supported in the lab; skipped"
                            );
                            continue;
                        }
                    };
                    env.push((name.into(), v));
                } else if e.get("valueFrom").is_some() {
                    tracing::warn!(
                        pod = name_of(pod),
                        var = name,
                        "env valueFrom not supported in the lab; skipped"
                    );
                } else {
                    env.push((name.into(), String::new()));
                }
            }
            for (k, v) in [
                ("MESH_LAB_POD", name_of(pod)),
                ("MESH_LAB_NAMESPACE", ns_of(pod)),
                ("MESH_LAB_NODE", node.as_str()),
                ("MESH_LAB_CLUSTER", cluster),
            ] {
                env.push((k.into(), v.into()));
            }
            let ports = arr_at(c, "/ports")
                .filter_map(|p| {
                    let port = u16::try_from(p["containerPort"].as_u64()?).ok()?;
                    Some((
                        p["name"].as_str().map(String::from),
                        port,
                        p["protocol"].as_str().unwrap_or("TCP").to_string(),
                    ))
                })
                .collect();
            ContainerSpec {
                name: str_at(c, "/name").to_string(),
                command: strings(c, "command"),
                args: strings(c, "args"),
                env,
                ports,
            }
        })
        .collect();
    PodSandboxSpec {
        key: key_of(pod),
        node,
        labels: pod
            .pointer("/metadata/labels")
            .cloned()
            .and_then(|l| serde_json::from_value(l).ok())
            .unwrap_or_default(),
        containers,
    }
}

// === the pod worker ===

/// What the worker knows about its pod, rendered into `status`.
#[derive(Clone, Debug)]
struct Observed {
    started: Option<StartedPod>,
    start_time: Option<String>,
    /// Per container: running since, ready.
    running_since: Option<String>,
    ready: Vec<bool>,
    restarts: u32,
    waiting: Option<(String, String)>,
    last_terminated: Option<Value>,
    phase: &'static str,
}

struct ProbeState {
    cfg: ReadinessProbe,
    next: Instant,
    successes: u32,
    failures: u32,
}

async fn pod_worker(ctx: Arc<Ctx>, pod: Value, mut stop: watch::Receiver<bool>) {
    let key = key_of(&pod);
    let spec = sandbox_spec(&pod, &ctx.cluster);
    let n = spec.containers.len();
    let containers: Vec<Value> = arr_at(&pod, "/spec/containers").cloned().collect();
    let pod_spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    let restart_policy = str_at(&pod, "/spec/restartPolicy").to_string();
    let mut obs = Observed {
        started: None,
        start_time: None,
        running_since: None,
        ready: vec![false; n],
        restarts: 0,
        waiting: Some(("ContainerCreating".into(), String::new())),
        last_terminated: None,
        phase: "Pending",
    };
    let mut probes: Vec<Option<ReadinessProbe>> = Vec::new();
    for c in &containers {
        match readiness_probe(c, &pod_spec) {
            Ok(p) => probes.push(p),
            Err(why) => {
                record_event(
                    &ctx.store,
                    &pod,
                    true,
                    "Unhealthy",
                    &format!("Readiness probe of container {}: {why}", str_at(c, "/name")),
                    COMPONENT,
                );
                // A probe that cannot run never succeeds, as in kubelet.
                probes.push(Some(ReadinessProbe {
                    probe: Probe::Tcp { port: 0 },
                    initial_delay: Duration::ZERO,
                    period: Duration::from_secs(3600),
                    timeout: Duration::from_secs(1),
                    success_threshold: 1,
                    failure_threshold: 1,
                }));
            }
        }
    }
    if !publish(&ctx, &key, &pod, &containers, &obs) {
        return;
    }
    let mut retries = CRASH_LOOP_BACKOFF.retries();
    loop {
        // --- start ---
        let start = ctx.runtime.start(spec.clone());
        let res = tokio::select! {
            r = start => r,
            _ = stop.changed() => {
                stop_pod(&ctx, &key).await;
                return;
            }
        };
        let started = match res {
            Ok(s) => s,
            Err(error) => {
                let msg = format!("{error:#}");
                tracing::warn!(error = %msg, "starting the pod failed");
                record_event(
                    &ctx.store,
                    &pod,
                    true,
                    "Failed",
                    &format!("Error: {msg}"),
                    COMPONENT,
                );
                obs.waiting = Some(("RunContainerError".into(), msg));
                let backoff = retries.next_delay(0.0);
                if !publish(&ctx, &key, &pod, &containers, &obs)
                    || !sleep_or_stop(&mut stop, backoff).await
                {
                    stop_pod(&ctx, &key).await;
                    return;
                }
                continue;
            }
        };
        let since = Instant::now();
        let t = now();
        obs.started = Some(started);
        obs.start_time.get_or_insert_with(|| t.clone());
        obs.running_since = Some(t);
        obs.waiting = None;
        obs.phase = "Running";
        let mut states: Vec<Option<ProbeState>> = probes
            .iter()
            .map(|p| {
                p.clone().map(|cfg| ProbeState {
                    next: since + cfg.initial_delay,
                    cfg,
                    successes: 0,
                    failures: 0,
                })
            })
            .collect();
        for (i, s) in states.iter().enumerate() {
            obs.ready[i] = s.is_none();
        }
        tracing::info!(pod_ip = %started.pod_ip, restarts = obs.restarts, "pod started");
        record_event(
            &ctx.store,
            &pod,
            false,
            "Started",
            &format!("Started pod on {} with IP {}", spec.node, started.pod_ip),
            COMPONENT,
        );
        if !publish(&ctx, &key, &pod, &containers, &obs) {
            stop_pod(&ctx, &key).await;
            return;
        }

        // --- run: probe while the processes live ---
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    // As kubelet: the preStop hooks run before the containers are stopped,
                    // while the pod is already Terminating (its endpoints no longer ready),
                    // so clients move to other backends before this one goes away.
                    let delay = pre_stop_sleep(&containers, &pod_spec);
                    if !delay.is_zero() {
                        tracing::info!(seconds = delay.as_secs_f64(), "preStop sleep");
                        tokio::time::sleep(delay).await;
                    }
                    stop_pod(&ctx, &key).await;
                    return;
                }
                _ = tick.tick() => {}
            }
            if !ctx.runtime.running(&key) {
                break;
            }
            let mut changed = false;
            for (i, st) in states.iter_mut().enumerate() {
                let Some(st) = st else { continue };
                if Instant::now() < st.next {
                    continue;
                }
                st.next = Instant::now() + st.cfg.period;
                let attempt = ctx.runtime.probe(key.clone(), st.cfg.probe.clone());
                let ok = tokio::time::timeout(st.cfg.timeout, attempt)
                    .await
                    .unwrap_or(false);
                if ok {
                    st.failures = 0;
                    st.successes = st.successes.saturating_add(1);
                    if !obs.ready[i] && st.successes >= st.cfg.success_threshold {
                        obs.ready[i] = true;
                        changed = true;
                    }
                } else {
                    st.successes = 0;
                    st.failures = st.failures.saturating_add(1);
                    if obs.ready[i] && st.failures >= st.cfg.failure_threshold {
                        obs.ready[i] = false;
                        changed = true;
                        record_event(
                            &ctx.store,
                            &pod,
                            true,
                            "Unhealthy",
                            &format!("Readiness probe failed: {:?}", st.cfg.probe),
                            COMPONENT,
                        );
                    }
                }
            }
            if changed {
                tracing::info!(ready = ?obs.ready, "readiness changed");
                if !publish(&ctx, &key, &pod, &containers, &obs) {
                    stop_pod(&ctx, &key).await;
                    return;
                }
            }
        }

        // --- the processes exited ---
        let code = ctx.runtime.exit_code(&key);
        tracing::warn!(?code, "pod processes exited");
        // Clean up what is left of the pod before starting it again (same key: a runtime keeps
        // the pod's address until `release`).
        if let Err(error) = ctx.runtime.stop(key.clone()).await {
            tracing::warn!(error = %format!("{error:#}"), "cleaning up the exited pod failed");
        }
        let finished_at = now();
        obs.last_terminated = Some(json!({"terminated": {
            "exitCode": code.unwrap_or(1),
            "reason": if code == Some(0) { "Completed" } else { "Error" },
            "startedAt": obs.running_since.clone(),
            "finishedAt": finished_at,
        }}));
        obs.ready.iter_mut().for_each(|r| *r = false);
        obs.running_since = None;
        let restart = match restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => code != Some(0),
            _ => true,
        };
        if !restart {
            obs.phase = if code == Some(0) {
                "Succeeded"
            } else {
                "Failed"
            };
            obs.waiting = None;
            let _ = publish(&ctx, &key, &pod, &containers, &obs);
            let _ = stop.changed().await;
            return;
        }
        if since.elapsed() >= BACKOFF_RESET_AFTER {
            retries.reset();
        }
        let backoff = retries.next_delay(0.0);
        obs.restarts += 1;
        obs.waiting = Some((
            "CrashLoopBackOff".into(),
            format!(
                "back-off {}s restarting failed container",
                backoff.as_secs()
            ),
        ));
        record_event(
            &ctx.store,
            &pod,
            true,
            "BackOff",
            "Back-off restarting failed container",
            COMPONENT,
        );
        if !publish(&ctx, &key, &pod, &containers, &obs) || !sleep_or_stop(&mut stop, backoff).await
        {
            stop_pod(&ctx, &key).await;
            return;
        }
    }
}

/// How long the containers' preStop hooks keep a deleted pod running: the longest
/// `lifecycle.preStop.sleep.seconds` (Kubernetes 1.30's sleep action), capped by the pod's
/// `terminationGracePeriodSeconds` as kubelet caps hooks. Exec and HTTP hooks are not run
/// by the lab (they would need a container runtime); they count as no delay.
fn pre_stop_sleep(containers: &[Value], pod_spec: &Value) -> Duration {
    let grace = pod_spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let longest = containers
        .iter()
        .filter_map(|c| c.pointer("/lifecycle/preStop/sleep/seconds"))
        .filter_map(Value::as_u64)
        .max()
        .unwrap_or(0);
    Duration::from_secs(longest.min(grace))
}

/// `false` when told to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn stop_pod(ctx: &Ctx, key: &PodKey) {
    match ctx.runtime.stop(key.clone()).await {
        Ok(()) => tracing::info!("pod stopped"),
        Err(error) => tracing::warn!(error = %format!("{error:#}"), "stopping the pod failed"),
    }
    ctx.runtime.release(key);
    // A pod marked for deletion (finalizers) shows its containers gone.
    let _ = modify(
        &ctx.store,
        &r::PODS,
        Some(&key.namespace),
        &key.name,
        true,
        |obj| {
            if uid_of(obj) != key.uid {
                return false;
            }
            let mut conds: Vec<Value> = arr_at(obj, "/status/conditions").cloned().collect();
            set_condition(&mut conds, "Ready", false, Some("PodCompleted"), None);
            set_condition(
                &mut conds,
                "ContainersReady",
                false,
                Some("PodCompleted"),
                None,
            );
            obj["status"]["conditions"] = json!(conds);
            let statuses: Vec<Value> = arr_at(obj, "/status/containerStatuses")
            .map(|c| {
                let mut c = c.clone();
                c["ready"] = json!(false);
                c["started"] = json!(false);
                c["state"] = json!({"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": now()}});
                c
            })
            .collect();
            obj["status"]["containerStatuses"] = json!(statuses);
            true
        },
    );
}

/// Writes the pod's status from what the worker observed. `false`: the pod is gone (or was
/// replaced by another with the same name), so the worker should stop.
fn publish(ctx: &Ctx, key: &PodKey, pod: &Value, containers: &[Value], obs: &Observed) -> bool {
    let mut gone = false;
    let res = modify(
        &ctx.store,
        &r::PODS,
        Some(&key.namespace),
        &key.name,
        true,
        |obj| {
            if uid_of(obj) != key.uid {
                gone = true;
                return false;
            }
            let mut st = obj
                .get("status")
                .cloned()
                .filter(Value::is_object)
                .unwrap_or(json!({}));
            st["phase"] = json!(obs.phase);
            if let Some(s) = &obs.started {
                st["hostIP"] = json!(s.host_ip.to_string());
                st["hostIPs"] = json!([{"ip": s.host_ip.to_string()}]);
                st["podIP"] = json!(s.pod_ip.to_string());
                st["podIPs"] = json!([{"ip": s.pod_ip.to_string()}]);
            }
            if let Some(t) = &obs.start_time {
                st["startTime"] = json!(t);
            }
            let all_ready =
                !obs.ready.is_empty() && obs.ready.iter().all(|r| *r) && obs.phase == "Running";
            let mut conds: Vec<Value> = arr_at(&st, "/conditions").cloned().collect();
            let not_ready_msg = {
                let names: Vec<&str> = containers
                    .iter()
                    .zip(&obs.ready)
                    .filter(|(_, r)| !**r)
                    .map(|(c, _)| str_at(c, "/name"))
                    .collect();
                format!("containers with unready status: [{}]", names.join(" "))
            };
            set_condition(
                &mut conds,
                "PodReadyToStartContainers",
                obs.started.is_some(),
                None,
                None,
            );
            set_condition(&mut conds, "Initialized", true, None, None);
            let (reason, msg) = if all_ready {
                (None, None)
            } else {
                (Some("ContainersNotReady"), Some(not_ready_msg.as_str()))
            };
            set_condition(&mut conds, "ContainersReady", all_ready, reason, msg);
            set_condition(&mut conds, "Ready", all_ready, reason, msg);
            if !conds
                .iter()
                .any(|c| c["type"] == "PodScheduled" && c["status"] == "True")
            {
                set_condition(&mut conds, "PodScheduled", true, None, None);
            }
            // Conditions in kubelet's order.
            let order = [
                "PodReadyToStartContainers",
                "Initialized",
                "Ready",
                "ContainersReady",
                "PodScheduled",
            ];
            conds.sort_by_key(|c| {
                order
                    .iter()
                    .position(|o| c["type"] == *o)
                    .unwrap_or(order.len())
            });
            st["conditions"] = json!(conds);
            let statuses: Vec<Value> = containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let state = match (&obs.running_since, &obs.waiting) {
                    (Some(since), None) => json!({"running": {"startedAt": since}}),
                    (_, Some((reason, message))) if message.is_empty() => json!({"waiting": {"reason": reason}}),
                    (_, Some((reason, message))) => json!({"waiting": {"reason": reason, "message": message}}),
                    (None, None) => obs
                        .last_terminated
                        .clone()
                        .unwrap_or(json!({"waiting": {"reason": "ContainerCreating"}})),
                };
                json!({
                    "name": str_at(c, "/name"),
                    "image": str_at(c, "/image"),
                    "imageID": "",
                    "containerID": format!("mesh-lab://{}/{}/{}", key.uid, str_at(c, "/name"), obs.restarts),
                    "ready": obs.ready.get(i).copied().unwrap_or(false),
                    "started": obs.running_since.is_some(),
                    "restartCount": obs.restarts,
                    "state": state,
                    "lastState": obs.last_terminated.clone().unwrap_or(json!({})),
                })
            })
            .collect();
            st["containerStatuses"] = json!(statuses);
            st.as_object_mut().expect("object").remove("reason");
            obj["status"] = st;
            true
        },
    );
    match res {
        Ok(None) if gone => false,
        Ok(_) => {
            // Ok(None) without `gone` is either "unchanged" or "404": tell them apart.
            match ctx.store.get(&r::PODS, Some(&key.namespace), &key.name) {
                Ok(p) => uid_of(&p) == key.uid,
                Err(_) => false,
            }
        }
        Err(error) => {
            tracing::warn!(pod = name_of(pod), %error, "writing pod status failed");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_stop_sleep_is_the_longest_hook_capped_by_the_grace_period() {
        let c = |secs: u64| json!({"name": "c", "lifecycle": {"preStop": {"sleep": {"seconds": secs}}}});
        let plain = json!({"name": "p"});
        let spec = json!({});
        assert_eq!(
            pre_stop_sleep(std::slice::from_ref(&plain), &spec),
            Duration::ZERO
        );
        assert_eq!(
            pre_stop_sleep(&[c(2), plain, c(5)], &spec),
            Duration::from_secs(5)
        );
        let short = json!({"terminationGracePeriodSeconds": 3});
        assert_eq!(pre_stop_sleep(&[c(10)], &short), Duration::from_secs(3));
    }

    #[test]
    fn probes_resolve_named_ports_and_defaults() {
        let pod = json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"app": "x"}},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "a", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                 "readinessProbe": {"httpGet": {"port": "http", "path": "healthz"}, "failureThreshold": 2},
                 "env": [{"name": "A", "value": "1"}, {"name": "P", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
                {"name": "b", "readinessProbe": {"tcpSocket": {"port": "http"}}},
                {"name": "c", "readinessProbe": {"tcpSocket": {"port": "nope"}}},
                {"name": "d", "readinessProbe": {"exec": {"command": ["true"]}}},
            ]}
        });
        let spec = &pod["spec"];
        let c = |i: usize| &spec["containers"][i];
        let a = readiness_probe(c(0), spec).unwrap().unwrap();
        assert_eq!(
            a.probe,
            Probe::Http {
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            (a.period, a.failure_threshold, a.success_threshold),
            (Duration::from_secs(1), 2, 1)
        );
        assert_eq!(
            readiness_probe(c(1), spec).unwrap().unwrap().probe,
            Probe::Tcp { port: 8080 }
        );
        assert!(readiness_probe(c(2), spec).unwrap_err().contains("nope"));
        assert!(readiness_probe(c(3), spec).is_err());
        let sb = sandbox_spec(&pod, "east");
        assert_eq!(
            sb.key,
            PodKey {
                namespace: "n".into(),
                name: "p".into(),
                uid: "u".into()
            }
        );
        assert_eq!(
            sb.containers[0].ports,
            vec![(Some("http".into()), 8080, "TCP".into())]
        );
        let env = &sb.containers[0].env;
        for (k, v) in [
            ("A", "1"),
            ("P", "p"),
            ("MESH_LAB_POD", "p"),
            ("MESH_LAB_NAMESPACE", "n"),
            ("MESH_LAB_NODE", "n1"),
            ("MESH_LAB_CLUSTER", "east"),
        ] {
            assert!(
                env.contains(&(k.to_string(), v.to_string())),
                "{k}={v} missing from {env:?}"
            );
        }
    }
}
