//! LoadBalancer controller (the lab's "cloud"): every Service of type LoadBalancer gets
//! `status.loadBalancer.ingress[0].ip`: `spec.loadBalancerIP` when set (it must be in the
//! pool or among the static addresses the lab allows, and free), else the first free address
//! of the pool. An address is held while its Service exists with type LoadBalancer; the
//! allocation is derived from the Services' status on every pass, so there is no state to
//! lose. A Service that cannot get an address gets a Warning Event naming why, and none.
//! The lab does not forward traffic to pool addresses (ARCHITECTURE.md).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Trigger, list_all, modify, name_of, ns_of, record_event, str_at, uid_of};
use crate::kube_api::resources as r;
use crate::kube_api::store::Store;

const COMPONENT: &str = "service-controller";

pub(crate) async fn run(store: Arc<Store>, pool: Vec<Ipv4Addr>, statics: Vec<Ipv4Addr>) {
    let trigger = Trigger::new(&store, &[&r::SERVICES]);
    let mut reported: HashMap<String, String> = HashMap::new();
    loop {
        trigger.changed().await;
        if !reconcile(&store, &pool, &statics, &mut reported) {
            trigger.poke();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// `a-b` for a contiguous pool, else the addresses.
fn describe_pool(pool: &[Ipv4Addr]) -> String {
    match (pool.first(), pool.last()) {
        (None, _) | (_, None) => "(empty)".into(),
        (Some(a), Some(b))
            if u32::from(*b).wrapping_sub(u32::from(*a)) as usize + 1 == pool.len() =>
        {
            format!("{a}-{b}")
        }
        _ => pool
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The address each LoadBalancer Service gets, or why not; keyed by `(namespace, name)`.
/// `services` are all Services; earlier-created Services win conflicts; a Service keeps a
/// valid address it already has.
pub fn assign(
    services: &[Value],
    pool: &[Ipv4Addr],
    statics: &[Ipv4Addr],
) -> BTreeMap<(String, String), Result<Ipv4Addr, String>> {
    let mut lbs: Vec<&Value> = services
        .iter()
        .filter(|s| str_at(s, "/spec/type") == "LoadBalancer")
        .collect();
    lbs.sort_by(|a, b| {
        str_at(a, "/metadata/creationTimestamp")
            .cmp(str_at(b, "/metadata/creationTimestamp"))
            .then_with(|| ns_of(a).cmp(ns_of(b)))
            .then_with(|| name_of(a).cmp(name_of(b)))
    });
    let key = |s: &Value| (ns_of(s).to_string(), name_of(s).to_string());
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let allowed = |ip: &Ipv4Addr| pool.contains(ip) || statics.contains(ip);
    // Requested addresses and valid current ones are claimed first, oldest Service first.
    for s in &lbs {
        let requested = str_at(s, "/spec/loadBalancerIP");
        let current = str_at(s, "/status/loadBalancer/ingress/0/ip")
            .parse::<Ipv4Addr>()
            .ok();
        let want = if requested.is_empty() {
            match current {
                Some(ip) if pool.contains(&ip) => ip,
                _ => continue,
            }
        } else {
            match requested.parse::<Ipv4Addr>() {
                Err(_) => {
                    out.insert(
                        key(s),
                        Err(format!(
                            "spec.loadBalancerIP {requested:?} is not an IPv4 address"
                        )),
                    );
                    continue;
                }
                Ok(ip) if !allowed(&ip) => {
                    out.insert(
                        key(s),
                        Err(format!(
                            "spec.loadBalancerIP {ip} is outside the lab's LoadBalancer pool {}",
                            describe_pool(pool)
                        )),
                    );
                    continue;
                }
                Ok(ip) => ip,
            }
        };
        let me = format!("{}/{}", ns_of(s), name_of(s));
        match taken.get(&want) {
            Some(other) => {
                out.insert(
                    key(s),
                    Err(format!("address {want} is already used by Service {other}")),
                );
            }
            None => {
                taken.insert(want, me);
                out.insert(key(s), Ok(want));
            }
        }
    }
    for s in &lbs {
        if out.contains_key(&key(s)) {
            continue;
        }
        match pool.iter().find(|ip| !taken.contains_key(ip)) {
            Some(ip) => {
                taken.insert(*ip, format!("{}/{}", ns_of(s), name_of(s)));
                out.insert(key(s), Ok(*ip));
            }
            None => {
                out.insert(
                    key(s),
                    Err(format!(
                        "no free address left in the LoadBalancer pool {}",
                        describe_pool(pool)
                    )),
                );
            }
        }
    }
    out
}

fn reconcile(
    store: &Store,
    pool: &[Ipv4Addr],
    statics: &[Ipv4Addr],
    reported: &mut HashMap<String, String>,
) -> bool {
    let services = list_all(store, &r::SERVICES);
    let plan = assign(&services, pool, statics);
    let mut ok = true;
    for s in &services {
        let is_lb = str_at(s, "/spec/type") == "LoadBalancer";
        let outcome = plan.get(&(ns_of(s).to_string(), name_of(s).to_string()));
        let want = match outcome {
            Some(Ok(ip)) => json!({"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}),
            _ => json!({}),
        };
        let have = s
            .pointer("/status/loadBalancer")
            .cloned()
            .unwrap_or(json!({}));
        if have != want {
            let uid = uid_of(s).to_string();
            let res = modify(
                store,
                &r::SERVICES,
                Some(ns_of(s)),
                name_of(s),
                true,
                |obj| {
                    if uid_of(obj) != uid {
                        return false;
                    }
                    obj["status"]["loadBalancer"] = want.clone();
                    true
                },
            );
            match res {
                Ok(Some(_)) => match outcome {
                    Some(Ok(ip)) => {
                        tracing::info!(namespace = ns_of(s), service = name_of(s), %ip, "LoadBalancer address assigned");
                        record_event(
                            store,
                            s,
                            false,
                            "EnsuredLoadBalancer",
                            &format!("Ensured load balancer with address {ip}"),
                            COMPONENT,
                        );
                    }
                    _ if !is_lb => tracing::info!(
                        namespace = ns_of(s),
                        service = name_of(s),
                        "LoadBalancer address released"
                    ),
                    _ => {}
                },
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(namespace = ns_of(s), service = name_of(s), %error, "writing LoadBalancer status failed");
                    ok = false;
                }
            }
        }
        if let Some(Err(why)) = outcome
            && reported.get(uid_of(s)) != Some(why)
        {
            record_event(
                store,
                s,
                true,
                "SyncLoadBalancerFailed",
                &format!("Error syncing load balancer: {why}"),
                COMPONENT,
            );
            reported.insert(uid_of(s).to_string(), why.clone());
        }
        if !matches!(outcome, Some(Err(_))) {
            reported.remove(uid_of(s));
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, created: &str, requested: Option<&str>, current: Option<&str>) -> Value {
        let mut s = json!({"metadata": {"name": name, "namespace": "n", "creationTimestamp": created},
            "spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {}}});
        if let Some(ip) = requested {
            s["spec"]["loadBalancerIP"] = json!(ip);
        }
        if let Some(ip) = current {
            s["status"]["loadBalancer"] = json!({"ingress": [{"ip": ip}]});
        }
        s
    }

    #[test]
    fn requested_current_then_pool_and_named_errors() {
        let pool: Vec<Ipv4Addr> = (200..=202).map(|i| Ipv4Addr::new(172, 31, 1, i)).collect();
        let statics = [Ipv4Addr::new(172, 31, 1, 2)];
        let services = vec![
            svc("keep", "2024-01-01T00:00:05Z", None, Some("172.31.1.202")),
            svc("api", "2024-01-01T00:00:01Z", Some("172.31.1.2"), None),
            svc("new", "2024-01-01T00:00:02Z", None, None),
            svc("dup", "2024-01-01T00:00:03Z", Some("172.31.1.2"), None),
            svc("out", "2024-01-01T00:00:04Z", Some("10.0.0.1"), None),
            svc("bad", "2024-01-01T00:00:04Z", Some("nope"), None),
            svc("full", "2024-01-01T00:00:06Z", None, None),
            svc("fuller", "2024-01-01T00:00:07Z", None, None),
            json!({"metadata": {"name": "plain", "namespace": "n"}, "spec": {"type": "ClusterIP"}}),
        ];
        let plan = assign(&services, &pool, &statics);
        let get = |n: &str| plan.get(&("n".to_string(), n.to_string())).cloned();
        assert_eq!(get("api"), Some(Ok(Ipv4Addr::new(172, 31, 1, 2))));
        assert_eq!(get("keep"), Some(Ok(Ipv4Addr::new(172, 31, 1, 202))));
        assert_eq!(get("new"), Some(Ok(Ipv4Addr::new(172, 31, 1, 200))));
        assert_eq!(get("full"), Some(Ok(Ipv4Addr::new(172, 31, 1, 201))));
        assert_eq!(
            get("dup").unwrap().unwrap_err(),
            "address 172.31.1.2 is already used by Service n/api"
        );
        assert!(
            get("out").unwrap().unwrap_err().contains(
                "10.0.0.1 is outside the lab's LoadBalancer pool 172.31.1.200-172.31.1.202"
            )
        );
        assert!(
            get("bad")
                .unwrap()
                .unwrap_err()
                .contains("\"nope\" is not an IPv4 address")
        );
        assert!(
            get("fuller")
                .unwrap()
                .unwrap_err()
                .contains("no free address")
        );
        assert_eq!(get("plain"), None);
    }
}
