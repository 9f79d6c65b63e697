//! Deployment controller: Deployments own their Pods directly (no ReplicaSets in the lab).
//!
//! - Pods are named `<deploy>-<10 hex of the template hash>-<5 random>`, carry the template's
//!   labels plus `pod-template-hash`, and an ownerReference (controller) to the Deployment.
//! - A template change recreates: every pod of an older template is deleted at once and new
//!   ones are created (no rolling update: the lab favours obvious states over availability).
//! - Scaling down deletes not-ready pods first, then the newest.
//! - Pods whose owning Deployment is gone are deleted (the lab plays the garbage collector).
//! - Status: replicas, updatedReplicas, readyReplicas, availableReplicas, observedGeneration
//!   and the Available/Progressing conditions, as `kubectl rollout status` reads them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    Trigger, arr_at, is_terminating, list_all, modify, name_of, ns_of, pod_finished, pod_ready,
    record_event, set_condition, str_at, uid_of,
};
use crate::kube_api::resources as r;
use crate::kube_api::selector::LabelSelector;
use crate::kube_api::store::Store;
use crate::kube_api::util;

const COMPONENT: &str = "deployment-controller";
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

pub(crate) async fn run(store: Arc<Store>) {
    let trigger = Trigger::new(&store, &[&r::DEPLOYMENTS, &r::PODS]);
    loop {
        trigger.changed().await;
        if !reconcile_all(&store) {
            trigger.poke();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// One pass over every Deployment; `false` when a write failed and a retry is due.
fn reconcile_all(store: &Store) -> bool {
    let deployments = list_all(store, &r::DEPLOYMENTS);
    let pods = list_all(store, &r::PODS);
    let mut ok = true;
    let live: BTreeSet<&str> = deployments.iter().map(uid_of).collect();
    for d in &deployments {
        let owned: Vec<&Value> = pods
            .iter()
            .filter(|p| ns_of(p) == ns_of(d) && owner_uid(p) == Some(uid_of(d)))
            .collect();
        if let Err(error) = reconcile(store, d, &owned) {
            tracing::warn!(namespace = ns_of(d), name = name_of(d), %error, "reconcile failed");
            ok = false;
        }
    }
    // Orphans: pods owned by a Deployment that no longer exists.
    for p in &pods {
        if let Some(uid) = owner_uid(p)
            && !live.contains(uid)
            && !is_terminating(p)
        {
            tracing::info!(
                namespace = ns_of(p),
                pod = name_of(p),
                "deleting pod of a deleted Deployment"
            );
            match store.delete(&r::PODS, Some(ns_of(p)), name_of(p), None) {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(error) => {
                    tracing::warn!(pod = name_of(p), %error, "deleting orphan failed");
                    ok = false;
                }
            }
        }
    }
    ok
}

/// The uid of the Deployment controlling a pod, if any.
fn owner_uid(pod: &Value) -> Option<&str> {
    arr_at(pod, "/metadata/ownerReferences")
        .find(|o| o["kind"] == "Deployment" && o["controller"] == true)
        .and_then(|o| o["uid"].as_str())
}

/// Keys sorted recursively, so the hash does not depend on how the map was built.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let mut out = serde_json::Map::new();
            for (k, v) in sorted {
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        _ => v.clone(),
    }
}

/// 10 hex characters of a 64-bit FNV-1a hash of the canonical pod template.
pub fn template_hash(template: &Value) -> String {
    let text = canonical(template).to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")[..10].to_string()
}

fn reconcile(store: &Store, d: &Value, owned: &[&Value]) -> Result<(), crate::kube_api::ApiError> {
    let ns = ns_of(d);
    let name = name_of(d);
    let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let hash = template_hash(&template);
    let want = d
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;

    let alive: Vec<&Value> = owned
        .iter()
        .copied()
        .filter(|p| !is_terminating(p) && !pod_finished(p))
        .collect();
    let (current, old): (Vec<&Value>, Vec<&Value>) = alive
        .iter()
        .partition(|p| str_at(p, &format!("/metadata/labels/{TEMPLATE_HASH_LABEL}")) == hash);

    // Recreate: pods of an older template go first.
    for p in &old {
        tracing::info!(
            namespace = ns,
            deployment = name,
            pod = name_of(p),
            "template changed; deleting old pod"
        );
        delete_pod(store, p)?;
    }
    // Finished pods (restartPolicy Never/OnFailure) are replaced.
    for p in owned
        .iter()
        .filter(|p| pod_finished(p) && !is_terminating(p))
    {
        delete_pod(store, p)?;
    }

    let mut current = current;
    if current.len() > want {
        // Not ready first, then newest first.
        current.sort_by(|a, b| {
            pod_ready(a)
                .cmp(&pod_ready(b))
                .then_with(|| {
                    str_at(b, "/metadata/creationTimestamp")
                        .cmp(str_at(a, "/metadata/creationTimestamp"))
                })
                .then_with(|| name_of(b).cmp(name_of(a)))
        });
        let extra = current.len() - want;
        for p in current.drain(..extra) {
            tracing::info!(
                namespace = ns,
                deployment = name,
                pod = name_of(p),
                "scaling down"
            );
            delete_pod(store, p)?;
        }
        record_event(
            store,
            d,
            false,
            "ScalingReplicaSet",
            &format!("Scaled down {name} to {want}"),
            COMPONENT,
        );
    } else if current.len() < want {
        let missing = want - current.len();
        for _ in 0..missing {
            create_pod(store, d, &template, &hash)?;
        }
        record_event(
            store,
            d,
            false,
            "ScalingReplicaSet",
            &format!("Scaled up {name} to {want}"),
            COMPONENT,
        );
    }

    // Status from what exists now (a fresh read: the writes above changed it).
    let sel = LabelSelector::from_object(d.pointer("/spec/selector").unwrap_or(&Value::Null));
    let (pods, _) = store.list(&r::PODS, Some(ns), &sel, &Default::default());
    let mine: Vec<&Value> = pods
        .iter()
        .filter(|p| owner_uid(p) == Some(uid_of(d)) && !is_terminating(p) && !pod_finished(p))
        .collect();
    let replicas = mine.len() as i64;
    let updated = mine
        .iter()
        .filter(|p| str_at(p, &format!("/metadata/labels/{TEMPLATE_HASH_LABEL}")) == hash)
        .count() as i64;
    let ready = mine.iter().filter(|p| pod_ready(p)).count() as i64;
    let generation = d
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let want = want as i64;
    modify(store, &r::DEPLOYMENTS, Some(ns), name, true, |obj| {
        let mut st = obj.get("status").cloned().unwrap_or(json!({}));
        if !st.is_object() {
            st = json!({});
        }
        st["observedGeneration"] = json!(generation);
        st["replicas"] = json!(replicas);
        st["updatedReplicas"] = json!(updated);
        st["readyReplicas"] = json!(ready);
        st["availableReplicas"] = json!(ready);
        st["unavailableReplicas"] = json!((want - ready).max(0));
        let mut conds: Vec<Value> = arr_at(&st, "/conditions").cloned().collect();
        let available = ready >= want;
        set_condition(
            &mut conds,
            "Available",
            available,
            Some(if available {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            }),
            Some(if available {
                "Deployment has minimum availability."
            } else {
                "Deployment does not have minimum availability."
            }),
        );
        let complete = updated == want && replicas == want && ready == want;
        set_condition(
            &mut conds,
            "Progressing",
            true,
            Some(if complete {
                "NewReplicaSetAvailable"
            } else {
                "ReplicaSetUpdated"
            }),
            Some(&if complete {
                format!("Deployment \"{name}\" has successfully progressed.")
            } else {
                format!("Deployment \"{name}\" is progressing.")
            }),
        );
        // lastUpdateTime as the real controller writes it.
        for c in &mut conds {
            if c.get("lastUpdateTime").is_none() {
                c["lastUpdateTime"] = c["lastTransitionTime"].clone();
            }
            if let Some(m) = c.as_object_mut() {
                m.remove("lastProbeTime");
            }
        }
        st["conditions"] = json!(conds);
        for k in [
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
            "updatedReplicas",
            "replicas",
        ] {
            if st[k] == 0 {
                st.as_object_mut().expect("object").remove(k);
            }
        }
        if obj.get("status") == Some(&st) {
            return false;
        }
        obj["status"] = st;
        true
    })?;
    Ok(())
}

fn delete_pod(store: &Store, p: &Value) -> Result<(), crate::kube_api::ApiError> {
    match store.delete(
        &r::PODS,
        Some(ns_of(p)),
        name_of(p),
        Some(&json!({"uid": uid_of(p)})),
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

fn create_pod(
    store: &Store,
    d: &Value,
    template: &Value,
    hash: &str,
) -> Result<(), crate::kube_api::ApiError> {
    let ns = ns_of(d);
    let dname = name_of(d);
    let mut meta = template.get("metadata").cloned().unwrap_or(json!({}));
    if !meta.is_object() {
        meta = json!({});
    }
    meta["labels"][TEMPLATE_HASH_LABEL] = json!(hash);
    meta["ownerReferences"] = json!([{
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dname,
        "uid": uid_of(d),
        "controller": true,
        "blockOwnerDeletion": true,
    }]);
    meta["namespace"] = json!(ns);
    let spec = template.get("spec").cloned().unwrap_or(json!({}));
    for _ in 0..8 {
        let pod_name = format!("{dname}-{hash}-{}", util::name_suffix());
        meta["name"] = json!(pod_name);
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec});
        match store.create(&r::PODS, Some(ns), pod) {
            Ok(p) => {
                tracing::info!(
                    namespace = ns,
                    deployment = dname,
                    pod = name_of(&p),
                    "created pod"
                );
                return Ok(());
            }
            Err(e) if e.code == 409 => continue,
            Err(e) => {
                record_event(
                    store,
                    d,
                    true,
                    "FailedCreate",
                    &format!("Error creating: {}", e.message),
                    COMPONENT,
                );
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_sensitive() {
        let a = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "x"}]}});
        let b = json!({"spec": {"containers": [{"name": "x"}]}, "metadata": {"labels": {"b": "2", "a": "1"}}});
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
        let c = json!({"metadata": {"labels": {"a": "1", "b": "3"}}, "spec": {"containers": [{"name": "x"}]}});
        assert_ne!(template_hash(&a), template_hash(&c));
    }
}
