//! The lab plays the Kubernetes controllers, the scheduler and the kubelet of each cluster,
//! in-process, directly on the cluster's [`Store`].
//!
//! Every controller is level-triggered: a [`Trigger`] turns store watches on the types it reads
//! into a coalescing wake-up, and each wake-up reconciles everything of the cluster (the store
//! is in memory and small, so a full pass is cheaper than bookkeeping). Writes go through the
//! store's validation with optimistic concurrency; a conflict is retried on the fresh object.
//!
//! - [`deployment`]: Deployment -> Pods (no ReplicaSets), status for `kubectl rollout status`.
//! - [`scheduler`]: binds unscheduled Pods to the lab node with the fewest pods.
//! - [`kubelet`]: runs bound Pods through a [`PodRuntime`], probes readiness, restarts.
//! - [`endpointslice`]: one EndpointSlice per selecting Service.
//! - [`loadbalancer`]: ingress addresses for Services of type LoadBalancer.

pub mod deployment;
pub mod endpointslice;
pub mod kubelet;
pub mod loadbalancer;
pub mod process_runtime;
pub mod scheduler;

use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::kube_api::resources::{self as r, ResourceType};
use crate::kube_api::store::{Store, WatchEvent, WatchOptions};
use crate::kube_api::{ApiError, util};

pub use kubelet::{ContainerSpec, PodKey, PodRuntime, PodSandboxSpec, Probe, StartedPod};
pub use process_runtime::ProcessRuntime;

/// What the controllers of one cluster need.
#[derive(Clone)]
pub struct ControllersConfig {
    /// Cluster name: logs, `MESH_LAB_CLUSTER` of pods, event sources.
    pub cluster: String,
    /// The lab nodes of this cluster (the scheduler's candidates, the kubelet's nodes).
    pub nodes: Vec<String>,
    /// Addresses handed out to Services of type LoadBalancer without `spec.loadBalancerIP`.
    pub lb_pool: Vec<Ipv4Addr>,
    /// Addresses outside the pool a Service may ask for with `spec.loadBalancerIP`
    /// (the lab's control-plane address for the mesh-apiserver Service).
    pub lb_static: Vec<Ipv4Addr>,
    /// Runs the pods.
    pub runtime: Arc<dyn PodRuntime>,
}

impl ControllersConfig {
    pub fn new(cluster: impl Into<String>, runtime: Arc<dyn PodRuntime>) -> Self {
        ControllersConfig {
            cluster: cluster.into(),
            nodes: Vec::new(),
            lb_pool: Vec::new(),
            lb_static: Vec::new(),
            runtime,
        }
    }

    /// Every address from `first` to `last`, inclusive, as the LoadBalancer pool.
    pub fn with_lb_range(mut self, first: Ipv4Addr, last: Ipv4Addr) -> Self {
        self.lb_pool = (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .collect();
        self
    }
}

/// The running controllers of one cluster. Dropping the handle aborts every task (the
/// runtime's own cleanup, e.g. killing child processes on drop, still applies); [`shutdown`]
/// also stops every pod through the runtime first.
///
/// [`shutdown`]: Controllers::shutdown
pub struct Controllers {
    tasks: Vec<JoinHandle<()>>,
    kubelet: Option<kubelet::Kubelet>,
}

/// Starts the deployment controller, scheduler, kubelet, EndpointSlice and LoadBalancer
/// controllers of one cluster.
pub fn spawn_all(store: Arc<Store>, cfg: ControllersConfig) -> Controllers {
    let span = |what: &'static str| tracing::info_span!("controller", cluster = %cfg.cluster, what);
    let tasks = vec![
        tokio::spawn(deployment::run(store.clone()).instrument(span("deployment"))),
        tokio::spawn(
            scheduler::run(store.clone(), cfg.cluster.clone(), cfg.nodes.clone())
                .instrument(span("scheduler")),
        ),
        tokio::spawn(endpointslice::run(store.clone()).instrument(span("endpointslice"))),
        tokio::spawn(
            loadbalancer::run(store.clone(), cfg.lb_pool.clone(), cfg.lb_static.clone())
                .instrument(span("loadbalancer")),
        ),
    ];
    let kubelet = kubelet::Kubelet::spawn(store, &cfg);
    tracing::info!(cluster = %cfg.cluster, nodes = ?cfg.nodes, "controllers started");
    Controllers {
        tasks,
        kubelet: Some(kubelet),
    }
}

impl Controllers {
    /// Stops the controllers, then every pod through the runtime, and waits for both.
    pub async fn shutdown(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(k) = self.kubelet.take() {
            k.shutdown().await;
        }
    }
}

impl Drop for Controllers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(k) = self.kubelet.take() {
            k.abort();
        }
    }
}

// === Trigger ===

/// A coalescing wake-up fed by store watches on some resource types: any change of any of
/// them wakes the owner once, however many changes happened meanwhile. A watch that ends
/// (closed, or 410 after falling behind) is reopened and counts as a change, so nothing is
/// missed by a level-triggered reconcile.
pub(crate) struct Trigger {
    notify: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Trigger {
    pub(crate) fn new(store: &Arc<Store>, types: &[&'static ResourceType]) -> Self {
        let notify = Arc::new(Notify::new());
        // The first wake-up: reconcile what exists.
        notify.notify_one();
        let tasks = types
            .iter()
            .map(|rt| {
                let store = store.clone();
                let notify = notify.clone();
                let rt: &'static ResourceType = rt;
                tokio::spawn(
                    async move {
                        loop {
                            let opts = WatchOptions {
                                resource_version: Some(store.resource_version()),
                                ..Default::default()
                            };
                            let mut w = match store.watch(rt, opts) {
                                Ok(w) => w,
                                Err(error) => {
                                    tracing::warn!(resource = rt.resource, %error, "watch failed; retrying");
                                    tokio::time::sleep(std::time::Duration::from_millis(200))
                                        .await;
                                    continue;
                                }
                            };
                            while let Some(ev) = w.next().await {
                                notify.notify_one();
                                if matches!(ev, WatchEvent::Error(_)) {
                                    break;
                                }
                            }
                            // Changes may have been missed while reopening.
                            notify.notify_one();
                            tokio::task::yield_now().await;
                        }
                    }
                    .in_current_span(),
                )
            })
            .collect();
        Trigger { notify, tasks }
    }

    /// Waits for the next change.
    pub(crate) async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Wakes the owner (e.g. after a failed write that should be retried on the next pass).
    pub(crate) fn poke(&self) {
        self.notify.notify_one();
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// === helpers on JSON objects ===

pub(crate) fn name_of(o: &Value) -> &str {
    o.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn ns_of(o: &Value) -> &str {
    o.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn uid_of(o: &Value) -> &str {
    o.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn str_at<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

pub(crate) fn arr_at<'a>(o: &'a Value, ptr: &str) -> impl Iterator<Item = &'a Value> {
    o.pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

pub(crate) fn is_terminating(o: &Value) -> bool {
    o.pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
}

/// Whether a Pod's Ready condition is True.
pub(crate) fn pod_ready(pod: &Value) -> bool {
    arr_at(pod, "/status/conditions").any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Whether a Pod has finished for good (its phase says so).
pub(crate) fn pod_finished(pod: &Value) -> bool {
    matches!(str_at(pod, "/status/phase"), "Succeeded" | "Failed")
}

pub(crate) fn now() -> String {
    util::now_rfc3339()
}

/// Sets a condition in a `conditions` array, keeping `lastTransitionTime` when the status
/// does not change.
pub(crate) fn set_condition(
    conditions: &mut Vec<Value>,
    ty: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let status_s = if status { "True" } else { "False" };
    let existing = conditions.iter_mut().find(|c| c["type"] == ty);
    let transition = match &existing {
        Some(c) if c["status"] == status_s => c["lastTransitionTime"].clone(),
        _ => json!(now()),
    };
    let mut c = json!({
        "type": ty,
        "status": status_s,
        "lastProbeTime": null,
        "lastTransitionTime": transition,
    });
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    if let Some(m) = message {
        c["message"] = json!(m);
    }
    match existing {
        Some(e) => *e = c,
        None => conditions.push(c),
    }
}

/// Reads an object, lets `f` change it, and writes it back (the status subresource when
/// `status`), retrying on resourceVersion conflicts. `f` returning `false` means nothing to
/// write. `Ok(None)`: the object is gone (or `f` declined).
pub(crate) fn modify(
    store: &Store,
    rt: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    status: bool,
    mut f: impl FnMut(&mut Value) -> bool,
) -> Result<Option<Value>, ApiError> {
    for _ in 0..16 {
        let mut obj = match store.get(rt, ns, name) {
            Ok(o) => o,
            Err(e) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e),
        };
        let before = obj.clone();
        if !f(&mut obj) || obj == before {
            return Ok(None);
        }
        let res = if status {
            store.update_status(rt, ns, name, obj)
        } else {
            store.update(rt, ns, name, obj)
        };
        match res {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.code == 409 => {
                tracing::debug!(
                    resource = rt.resource,
                    name,
                    "conflict; retrying on the fresh object"
                );
                continue;
            }
            Err(e) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::conflict(
        rt,
        name,
        "gave up after 16 conflicting writes",
    ))
}

/// Records a core/v1 Event about `obj` (as `kubectl describe` and `kubectl get events` show).
pub(crate) fn record_event(
    store: &Store,
    obj: &Value,
    warning: bool,
    reason: &str,
    message: &str,
    component: &str,
) {
    let ns = match ns_of(obj) {
        "" => "default",
        n => n,
    };
    let t = now();
    let ev = json!({
        "metadata": {
            "name": format!("{}.{}", name_of(obj), util::random_hex(8)),
            "namespace": ns,
        },
        "involvedObject": {
            "apiVersion": obj.get("apiVersion").cloned().unwrap_or(Value::Null),
            "kind": obj.get("kind").cloned().unwrap_or(Value::Null),
            "name": name_of(obj),
            "namespace": ns_of(obj),
            "uid": uid_of(obj),
            "resourceVersion": str_at(obj, "/metadata/resourceVersion"),
        },
        "reason": reason,
        "message": message,
        "type": if warning { "Warning" } else { "Normal" },
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": t,
        "lastTimestamp": t,
        "count": 1,
    });
    if let Err(error) = store.create(&r::EVENTS, Some(ns), ev) {
        tracing::warn!(%error, reason, "recording an event failed");
    }
    if warning {
        tracing::warn!(
            kind = str_at(obj, "/kind"),
            namespace = ns_of(obj),
            name = name_of(obj),
            reason,
            message,
            "event"
        );
    } else {
        tracing::info!(
            kind = str_at(obj, "/kind"),
            namespace = ns_of(obj),
            name = name_of(obj),
            reason,
            message,
            "event"
        );
    }
}

/// Lists every object of a type in every namespace.
pub(crate) fn list_all(store: &Store, rt: &'static ResourceType) -> Vec<Value> {
    store
        .list(rt, None, &Default::default(), &Default::default())
        .0
}
