//! One backend per address.
//!
//! Kubernetes may list one address in two EndpointSlices of a Service (while the slice
//! controller moves endpoints between slices, or with hand-made slices). The mesh sees one
//! backend per address: the copy in the best condition gives the conditions, node and zone,
//! and the ports of every copy are merged. The apiserver merges the slices it publishes with
//! [`merge_addresses`]; [`select`](super::select) runs the same merge over its inputs, so a
//! value that did not come from an apiserver of this version gets the same treatment.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::{Backend, BackendConditions};

/// How good a copy's conditions are; a higher rank wins a merge, the first copy wins a tie.
///
/// Ready and not terminating, then ready and terminating, then serving and terminating (a
/// backend [`select`](super::select) may still use when nothing is ready), then serving
/// alone, then nothing. The order refines selection's tiers (ready > serving-terminating >
/// unusable), so a merge never picks an unusable copy over a usable one.
pub fn condition_rank(c: BackendConditions) -> u8 {
    match (c.ready, c.serving, c.terminating) {
        (true, _, false) => 4,
        (true, _, true) => 3,
        (false, true, true) => 2,
        (false, true, false) => 1,
        (false, false, _) => 0,
    }
}

/// Merges the copies of each address into one backend, sorted by address.
///
/// The copy with the highest [`condition_rank`] (the first on a tie) gives conditions, node
/// and zone; ports are merged by `(protocol, name)`, the first copy's target port winning,
/// in the order they are met. Copies are taken as `Cow` so a caller that only reads (the
/// selection) clones a backend only when its address really appears twice.
pub fn merge_addresses<'a>(
    copies: impl IntoIterator<Item = Cow<'a, Backend>>,
) -> Vec<Cow<'a, Backend>> {
    let mut by_ip: BTreeMap<IpAddr, Cow<'a, Backend>> = BTreeMap::new();
    for copy in copies {
        let Some(kept) = by_ip.get_mut(&copy.ip) else {
            by_ip.insert(copy.ip, copy);
            continue;
        };
        let better = condition_rank(copy.conditions) > condition_rank(kept.conditions);
        let new_ports = copy.ports.iter().any(|p| {
            !kept
                .ports
                .iter()
                .any(|q| q.name == p.name && q.protocol == p.protocol)
        });
        if !better && !new_ports {
            continue;
        }
        let kept = kept.to_mut();
        if better {
            kept.conditions = copy.conditions;
            kept.node.clone_from(&copy.node);
            kept.zone.clone_from(&copy.zone);
        }
        for p in &copy.ports {
            if !kept
                .ports
                .iter()
                .any(|q| q.name == p.name && q.protocol == p.protocol)
            {
                kept.ports.push(p.clone());
            }
        }
    }
    by_ip.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Protocol, ServicePort};

    fn cond(ready: bool, serving: bool, terminating: bool) -> BackendConditions {
        BackendConditions {
            ready,
            serving,
            terminating,
        }
    }

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
        }
    }

    fn copy(
        ip: &str,
        node: &str,
        conditions: BackendConditions,
        ports: Vec<ServicePort>,
    ) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            ports,
            node: node.into(),
            zone: format!("zone-{node}"),
            conditions,
        }
    }

    #[test]
    fn ranks_refine_selection_tiers() {
        let order = [
            cond(true, true, false),
            cond(true, true, true),
            cond(false, true, true),
            cond(false, true, false),
            cond(false, false, false),
        ];
        for w in order.windows(2) {
            assert!(
                condition_rank(w[0]) > condition_rank(w[1]),
                "{:?} must rank above {:?}",
                w[0],
                w[1]
            );
        }
        assert_eq!(condition_rank(cond(false, false, true)), 0);
        assert_eq!(condition_rank(cond(true, false, false)), 4);
    }

    #[test]
    fn best_copy_wins_and_ports_merge() {
        let http = port("http", Protocol::Tcp, 8080);
        let http2 = port("http", Protocol::Tcp, 9090);
        let dns = port("dns", Protocol::Udp, 53);
        let copies = vec![
            copy(
                "10.0.0.2",
                "n2",
                cond(false, false, true),
                vec![http.clone()],
            ),
            copy(
                "10.0.0.1",
                "n1",
                cond(true, true, false),
                vec![http.clone()],
            ),
            copy(
                "10.0.0.2",
                "n3",
                cond(true, true, false),
                vec![http2, dns.clone()],
            ),
            // A tie: the first ready copy stays.
            copy("10.0.0.2", "n4", cond(true, true, false), vec![]),
        ];
        let merged = merge_addresses(copies.into_iter().map(Cow::Owned));
        let got: Vec<(String, &str, &str, BackendConditions, &[ServicePort])> = merged
            .iter()
            .map(|b| {
                (
                    b.ip.to_string(),
                    b.node.as_str(),
                    b.zone.as_str(),
                    b.conditions,
                    b.ports.as_slice(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "10.0.0.1".to_string(),
                    "n1",
                    "zone-n1",
                    cond(true, true, false),
                    &[http.clone()][..]
                ),
                // The first copy's target port for http, dns added.
                (
                    "10.0.0.2".to_string(),
                    "n3",
                    "zone-n3",
                    cond(true, true, false),
                    &[http, dns][..]
                ),
            ]
        );
    }

    #[test]
    fn borrowed_copies_are_cloned_only_when_merged() {
        let http = port("http", Protocol::Tcp, 8080);
        let copies = [
            copy(
                "10.0.0.1",
                "n1",
                cond(true, true, false),
                vec![http.clone()],
            ),
            copy(
                "10.0.0.2",
                "n2",
                cond(false, false, false),
                vec![http.clone()],
            ),
            copy(
                "10.0.0.2",
                "n2",
                cond(false, false, false),
                vec![http.clone()],
            ),
            copy(
                "10.0.0.3",
                "n3",
                cond(false, false, false),
                vec![http.clone()],
            ),
            copy("10.0.0.3", "n4", cond(true, true, false), vec![http]),
        ];
        let merged = merge_addresses(copies.iter().map(Cow::Borrowed));
        let owned: Vec<bool> = merged.iter().map(|b| matches!(b, Cow::Owned(_))).collect();
        // An identical second copy changes nothing: still borrowed.
        assert_eq!(owned, [false, false, true]);
        assert_eq!(merged[2].node, "n4");
    }
}
