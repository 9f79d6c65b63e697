//! Scheduler: binds each unscheduled Pod (no `spec.nodeName`, default scheduler) to the lab
//! node with the fewest pods (ties: name order), among the nodes its `nodeSelector` allows.
//! A pod with a `topologySpreadConstraints` entry over `kubernetes.io/hostname` goes first to
//! the node with the fewest pods matching that constraint's `labelSelector.matchLabels` (so a
//! Deployment spreads one pod per node, as the kube-scheduler's PodTopologySpread does).
//! Node labels come from the Node object when it exists, and always include
//! `kubernetes.io/hostname=<node>`. A pod that fits no node stays Pending with
//! `PodScheduled=False` (reason Unschedulable) and a FailedScheduling Event saying why; the
//! event is recorded again only when the reason changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    Trigger, arr_at, is_terminating, list_all, modify, name_of, ns_of, pod_finished, record_event,
    set_condition, str_at, uid_of,
};
use crate::kube_api::resources as r;
use crate::kube_api::store::Store;

const COMPONENT: &str = "default-scheduler";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

pub(crate) async fn run(store: Arc<Store>, cluster: String, nodes: Vec<String>) {
    let trigger = Trigger::new(&store, &[&r::PODS, &r::NODES]);
    // Last unschedulable message per pod uid, so events are not repeated on every pass.
    let mut reported: HashMap<String, String> = HashMap::new();
    tracing::debug!(%cluster, ?nodes, "scheduler running");
    loop {
        trigger.changed().await;
        if !schedule_pass(&store, &nodes, &mut reported) {
            trigger.poke();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// The labels a lab node is known by.
fn node_labels(store: &Store, node: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = store
        .get(&r::NODES, None, node)
        .ok()
        .and_then(|n| n.pointer("/metadata/labels").cloned())
        .and_then(|l| serde_json::from_value(l).ok())
        .unwrap_or_default();
    labels.insert(HOSTNAME_LABEL.into(), node.into());
    labels
}

/// The node for a pod, or why there is none. `counts` is the number of pods per node.
pub fn choose_node(
    selector: &BTreeMap<String, String>,
    candidates: &[(String, BTreeMap<String, String>)],
    counts: &BTreeMap<String, usize>,
) -> Result<String, String> {
    choose_node_spread(selector, candidates, counts, &BTreeMap::new())
}

/// [`choose_node`], preferring the nodes with the fewest pods of the pod's spread group
/// (`spread`: matching pods per node; empty when the pod has no hostname spread constraint).
pub fn choose_node_spread(
    selector: &BTreeMap<String, String>,
    candidates: &[(String, BTreeMap<String, String>)],
    counts: &BTreeMap<String, usize>,
    spread: &BTreeMap<String, usize>,
) -> Result<String, String> {
    if candidates.is_empty() {
        return Err("0/0 nodes are available: the cluster has no lab nodes.".into());
    }
    let fit: Vec<&String> = candidates
        .iter()
        .filter(|(_, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .map(|(n, _)| n)
        .collect();
    let Some(best) = fit.iter().min_by_key(|n| {
        (
            spread.get(n.as_str()).copied().unwrap_or(0),
            counts.get(n.as_str()).copied().unwrap_or(0),
            n.as_str(),
        )
    }) else {
        let want: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(format!(
            "0/{n} nodes are available: {n} node(s) didn't match Pod's node affinity/selector ({}).",
            want.join(","),
            n = candidates.len()
        ));
    };
    Ok((*best).clone())
}

fn schedule_pass(store: &Store, nodes: &[String], reported: &mut HashMap<String, String>) -> bool {
    let pods = list_all(store, &r::PODS);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        let n = str_at(p, "/spec/nodeName");
        if !n.is_empty() && !pod_finished(p) {
            *counts.entry(n.to_string()).or_default() += 1;
        }
    }
    let candidates: Vec<(String, BTreeMap<String, String>)> = nodes
        .iter()
        .map(|n| (n.clone(), node_labels(store, n)))
        .collect();
    let mut ok = true;
    let mut pending_uids = Vec::new();
    // Pods bound during this pass (uid, node): `pods` still shows them unscheduled.
    let mut bound: Vec<(String, String)> = Vec::new();
    for p in &pods {
        if !str_at(p, "/spec/nodeName").is_empty() || is_terminating(p) || pod_finished(p) {
            continue;
        }
        match str_at(p, "/spec/schedulerName") {
            "" | "default-scheduler" => {}
            _ => continue,
        }
        pending_uids.push(uid_of(p).to_string());
        let selector: BTreeMap<String, String> = p
            .pointer("/spec/nodeSelector")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .unwrap_or_default();
        let spread = spread_counts(p, &pods, &bound);
        match choose_node_spread(&selector, &candidates, &counts, &spread) {
            Ok(node) => match bind(store, p, &node) {
                Ok(true) => {
                    *counts.entry(node.clone()).or_default() += 1;
                    bound.push((uid_of(p).to_string(), node.clone()));
                    reported.remove(uid_of(p));
                    record_event(
                        store,
                        p,
                        false,
                        "Scheduled",
                        &format!(
                            "Successfully assigned {}/{} to {node}",
                            ns_of(p),
                            name_of(p)
                        ),
                        COMPONENT,
                    );
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(namespace = ns_of(p), pod = name_of(p), %error, "binding failed");
                    ok = false;
                }
            },
            Err(why) => {
                if reported.get(uid_of(p)) != Some(&why) {
                    let res = modify(store, &r::PODS, Some(ns_of(p)), name_of(p), true, |obj| {
                        let mut conds: Vec<Value> =
                            arr_at(obj, "/status/conditions").cloned().collect();
                        set_condition(
                            &mut conds,
                            "PodScheduled",
                            false,
                            Some("Unschedulable"),
                            Some(&why),
                        );
                        obj["status"]["conditions"] = json!(conds);
                        obj["status"]["phase"] = json!("Pending");
                        true
                    });
                    match res {
                        Ok(_) => {
                            record_event(store, p, true, "FailedScheduling", &why, COMPONENT);
                            reported.insert(uid_of(p).to_string(), why);
                        }
                        Err(error) => {
                            tracing::warn!(pod = name_of(p), %error, "writing PodScheduled failed");
                            ok = false;
                        }
                    }
                }
            }
        }
    }
    reported.retain(|uid, _| pending_uids.contains(uid));
    ok
}

/// Matching pods per node for the pod's first `topologySpreadConstraints` entry over
/// `kubernetes.io/hostname` (same namespace, `labelSelector.matchLabels`); empty without one.
fn spread_counts(
    pod: &Value,
    pods: &[Value],
    bound: &[(String, String)],
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Some(c) = arr_at(pod, "/spec/topologySpreadConstraints")
        .find(|c| str_at(c, "/topologyKey") == HOSTNAME_LABEL)
    else {
        return out;
    };
    let want: BTreeMap<String, String> = c
        .pointer("/labelSelector/matchLabels")
        .cloned()
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    for other in pods {
        if ns_of(other) != ns_of(pod) || pod_finished(other) || is_terminating(other) {
            continue;
        }
        let matches = want.iter().all(|(k, v)| {
            other
                .pointer(&format!(
                    "/metadata/labels/{}",
                    k.replace('~', "~0").replace('/', "~1")
                ))
                .and_then(Value::as_str)
                == Some(v)
        });
        if !matches {
            continue;
        }
        let node = match str_at(other, "/spec/nodeName") {
            "" => bound
                .iter()
                .find(|(uid, _)| uid == uid_of(other))
                .map(|(_, n)| n.as_str())
                .unwrap_or(""),
            n => n,
        };
        if !node.is_empty() {
            *out.entry(node.to_string()).or_default() += 1;
        }
    }
    out
}

/// Sets `spec.nodeName` (the lab API has no binding subresource) and PodScheduled=True.
/// `Ok(false)`: the pod changed meanwhile (gone, or bound by someone else).
fn bind(store: &Store, pod: &Value, node: &str) -> Result<bool, crate::kube_api::ApiError> {
    let uid = uid_of(pod).to_string();
    let bound = modify(
        store,
        &r::PODS,
        Some(ns_of(pod)),
        name_of(pod),
        false,
        |obj| {
            if uid_of(obj) != uid || !str_at(obj, "/spec/nodeName").is_empty() {
                return false;
            }
            obj["spec"]["nodeName"] = json!(node);
            true
        },
    )?;
    if bound.is_none() {
        return Ok(false);
    }
    modify(
        store,
        &r::PODS,
        Some(ns_of(pod)),
        name_of(pod),
        true,
        |obj| {
            let mut conds: Vec<Value> = arr_at(obj, "/status/conditions").cloned().collect();
            set_condition(&mut conds, "PodScheduled", true, None, None);
            obj["status"]["conditions"] = json!(conds);
            true
        },
    )?;
    tracing::info!(
        namespace = ns_of(pod),
        pod = name_of(pod),
        node,
        "scheduled"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn spread_group_first_then_fewest_pods() {
        let cands = vec![
            ("a".to_string(), labels(&[])),
            ("b".to_string(), labels(&[])),
        ];
        // b has more pods in all, but none of the group: the group spreads to b.
        let counts = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 3)]);
        let spread = BTreeMap::from([("a".to_string(), 1)]);
        assert_eq!(
            choose_node_spread(&labels(&[]), &cands, &counts, &spread).unwrap(),
            "b"
        );
        assert_eq!(choose_node(&labels(&[]), &cands, &counts).unwrap(), "a");
    }

    #[test]
    fn fewest_pods_then_name_and_selectors() {
        let cands = vec![
            (
                "b".to_string(),
                labels(&[(HOSTNAME_LABEL, "b"), ("zone", "z1")]),
            ),
            ("a".to_string(), labels(&[(HOSTNAME_LABEL, "a")])),
            (
                "c".to_string(),
                labels(&[(HOSTNAME_LABEL, "c"), ("zone", "z1")]),
            ),
        ];
        let mut counts = BTreeMap::new();
        assert_eq!(choose_node(&labels(&[]), &cands, &counts).unwrap(), "a");
        counts.insert("a".to_string(), 1);
        assert_eq!(choose_node(&labels(&[]), &cands, &counts).unwrap(), "b");
        counts.insert("b".to_string(), 1);
        assert_eq!(
            choose_node(&labels(&[("zone", "z1")]), &cands, &counts).unwrap(),
            "c"
        );
        assert_eq!(
            choose_node(&labels(&[(HOSTNAME_LABEL, "b")]), &cands, &counts).unwrap(),
            "b"
        );
        let e = choose_node(&labels(&[(HOSTNAME_LABEL, "nope")]), &cands, &counts).unwrap_err();
        assert!(
            e.contains("0/3 nodes are available") && e.contains("kubernetes.io/hostname=nope"),
            "{e}"
        );
        assert!(choose_node(&labels(&[]), &[], &counts).is_err());
    }
}
