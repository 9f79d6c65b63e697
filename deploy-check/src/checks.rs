//! Consistency rules between the objects of one install. Each check returns the problems it
//! found, one sentence each naming the object and the field; empty means the rule holds.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::load::{ManifestObject, Resource};

/// A Deployment or DaemonSet: its selector and pod template.
pub struct Workload<'a> {
    pub object: &'a ManifestObject,
    pub selector: &'a LabelSelector,
    pub template: &'a PodTemplateSpec,
}

impl Workload<'_> {
    fn labels(&self) -> BTreeMap<String, String> {
        self.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default()
    }

    /// Init containers then containers, each with whether it is an init container that
    /// runs to completion (not a sidecar).
    pub fn containers(&self) -> Vec<(&Container, bool)> {
        let Some(spec) = self.template.spec.as_ref() else {
            return Vec::new();
        };
        let init = spec.init_containers.iter().flatten().map(|c| {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            (c, !sidecar)
        });
        init.chain(spec.containers.iter().map(|c| (c, false)))
            .collect()
    }
}

/// The workloads of `objs`.
pub fn workloads(objs: &[ManifestObject]) -> Vec<Workload<'_>> {
    objs.iter()
        .filter_map(|o| match &o.resource {
            Resource::Deployment(d) => Some(Workload {
                object: o,
                selector: &d.spec.selector,
                template: &d.spec.template,
            }),
            Resource::DaemonSet(d) => Some(Workload {
                object: o,
                selector: &d.spec.selector,
                template: &d.spec.template,
            }),
            _ => None,
        })
        .collect()
}

/// Every check.
pub fn check_all(objs: &[ManifestObject], external_secrets: &[&str]) -> Vec<String> {
    let mut out = check_references(objs, external_secrets);
    out.extend(check_services(objs));
    out.extend(check_rbac(objs));
    out.extend(check_containers(objs));
    out
}

fn find<'a>(
    objs: &'a [ManifestObject],
    kind: &str,
    ns: Option<&str>,
    name: &str,
) -> Option<&'a ManifestObject> {
    objs.iter()
        .find(|o| o.kind() == kind && o.name() == name && (ns.is_none() || o.namespace() == ns))
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `$(NAME)` references in a string.
pub fn var_refs(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("$(") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                out.push(&after[..j]);
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    out
}

/// Volumes, ConfigMaps, Secrets, service accounts, env references, probe ports and
/// selectors of every workload resolve within `objs` (Secrets also among
/// `external_secrets`, which the install scripts create).
pub fn check_references(objs: &[ManifestObject], external_secrets: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for w in workloads(objs) {
        let o = w.object;
        let ns = o.namespace();
        let labels = w.labels();
        let sel = w.selector.match_labels.clone().unwrap_or_default();
        if !selects(&sel, &labels) {
            out.push(format!(
                "{o}: spec.selector {sel:?} does not select its own pod labels {labels:?}"
            ));
        }
        let Some(spec) = w.template.spec.as_ref() else {
            out.push(format!("{o}: no pod spec"));
            continue;
        };
        if let Some(sa) = &spec.service_account_name
            && find(objs, "ServiceAccount", ns, sa).is_none()
        {
            out.push(format!("{o}: serviceAccountName {sa} does not exist"));
        }
        let secret_exists = |name: &str| {
            external_secrets.contains(&name) || find(objs, "Secret", ns, name).is_some()
        };
        let config_map = |name: &str| {
            find(objs, "ConfigMap", ns, name).and_then(|cm| match &cm.resource {
                Resource::ConfigMap(c) => Some(c.data.clone().unwrap_or_default()),
                _ => None,
            })
        };
        let volumes: BTreeSet<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        for v in spec.volumes.iter().flatten() {
            if let Some(s) = &v.secret {
                let name = s.secret_name.as_deref().unwrap_or_default();
                if s.optional != Some(true) && !secret_exists(name) {
                    out.push(format!(
                        "{o}: volume {} uses Secret {name}, which nothing creates",
                        v.name
                    ));
                }
            }
            if let Some(c) = &v.config_map
                && c.optional != Some(true)
                && config_map(&c.name).is_none()
            {
                out.push(format!(
                    "{o}: volume {} uses ConfigMap {}, which does not exist",
                    v.name, c.name
                ));
            }
        }
        let mut used_volumes = BTreeSet::new();
        let pod_ports: BTreeSet<i32> = w
            .containers()
            .iter()
            .flat_map(|(c, _)| c.ports.iter().flatten().map(|p| p.container_port))
            .collect();
        for (c, _) in w.containers() {
            let who = format!("{o}: container {}", c.name);
            for m in c.volume_mounts.iter().flatten() {
                used_volumes.insert(m.name.as_str());
                if !volumes.contains(m.name.as_str()) {
                    out.push(format!(
                        "{who}: volumeMount {} names no volume of the pod",
                        m.name
                    ));
                }
            }
            let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            for e in c.env.iter().flatten() {
                let Some(from) = &e.value_from else { continue };
                if let Some(r) = &from.config_map_key_ref {
                    match config_map(&r.name) {
                        None => out.push(format!(
                            "{who}: env {} uses ConfigMap {}, which does not exist",
                            e.name, r.name
                        )),
                        Some(data) if !data.contains_key(&r.key) => out.push(format!(
                            "{who}: env {} uses key {} of ConfigMap {}, which it does not have",
                            e.name, r.key, r.name
                        )),
                        Some(_) => {}
                    }
                }
                if let Some(r) = &from.secret_key_ref
                    && !secret_exists(&r.name)
                {
                    out.push(format!(
                        "{who}: env {} uses Secret {}, which nothing creates",
                        e.name, r.name
                    ));
                }
                if let Some(f) = &from.field_ref {
                    const FIELDS: &[&str] = &[
                        "metadata.name",
                        "metadata.namespace",
                        "metadata.uid",
                        "spec.nodeName",
                        "spec.serviceAccountName",
                        "status.hostIP",
                        "status.podIP",
                    ];
                    if !FIELDS.contains(&f.field_path.as_str()) {
                        out.push(format!("{who}: env {} uses fieldPath {}, which the downward API does not offer", e.name, f.field_path));
                    }
                }
            }
            for arg in c.command.iter().flatten().chain(c.args.iter().flatten()) {
                for var in var_refs(arg) {
                    if !env.contains(&var) {
                        out.push(format!(
                            "{who}: {arg:?} refers to $({var}), which is not in the container's env (Kubernetes would pass it unexpanded)"
                        ));
                    }
                }
            }
            for (probe_name, probe) in [
                ("startupProbe", &c.startup_probe),
                ("livenessProbe", &c.liveness_probe),
                ("readinessProbe", &c.readiness_probe),
            ] {
                if let Some(p) = probe {
                    out.extend(check_probe_port(&who, probe_name, p, c));
                }
            }
        }
        for v in &volumes {
            if !used_volumes.contains(v) {
                out.push(format!("{o}: volume {v} is mounted by no container"));
            }
        }
        let annotations = w
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        if let Some(port) = annotations.get("prometheus.io/port") {
            match port.parse::<i32>() {
                Ok(p) if pod_ports.contains(&p) => {}
                _ => out.push(format!(
                    "{o}: annotation prometheus.io/port={port} is no container port of the pod"
                )),
            }
        }
    }
    out
}

fn check_probe_port(who: &str, name: &str, p: &Probe, c: &Container) -> Vec<String> {
    let port = p
        .http_get
        .as_ref()
        .map(|h| &h.port)
        .or(p.tcp_socket.as_ref().map(|t| &t.port));
    let Some(port) = port else {
        return Vec::new();
    };
    let ports = c.ports.iter().flatten();
    let ok = match port {
        IntOrString::String(n) => ports
            .clone()
            .any(|cp| cp.name.as_deref() == Some(n.as_str())),
        IntOrString::Int(n) => ports.clone().any(|cp| cp.container_port == *n),
    };
    if ok {
        Vec::new()
    } else {
        vec![format!(
            "{who}: {name} port {port:?} is none of the container's ports"
        )]
    }
}

/// Services, PodDisruptionBudgets and role bindings point at things that exist: selectors
/// select a workload's pods, target ports are ports of those pods, roleRefs and subjects
/// exist.
pub fn check_services(objs: &[ManifestObject]) -> Vec<String> {
    let mut out = Vec::new();
    let ws = workloads(objs);
    for o in objs {
        match &o.resource {
            Resource::Service(s) => {
                let spec = s.spec.clone().unwrap_or_default();
                let sel = spec.selector.clone().unwrap_or_default();
                let matching: Vec<&Workload> = ws
                    .iter()
                    .filter(|w| w.object.namespace() == o.namespace() && selects(&sel, &w.labels()))
                    .collect();
                if matching.is_empty() {
                    out.push(format!(
                        "{o}: selector {sel:?} selects the pods of no workload"
                    ));
                    continue;
                }
                for port in spec.ports.iter().flatten() {
                    let target = port
                        .target_port
                        .clone()
                        .unwrap_or(IntOrString::Int(port.port));
                    let found = matching.iter().any(|w| {
                        w.containers().iter().any(|(c, _)| {
                            c.ports.iter().flatten().any(|cp| match &target {
                                IntOrString::String(n) => cp.name.as_deref() == Some(n.as_str()),
                                IntOrString::Int(n) => cp.container_port == *n,
                            })
                        })
                    });
                    if !found {
                        out.push(format!(
                            "{o}: port {} targets {target:?}, which no selected container exposes",
                            port.name.as_deref().unwrap_or("<unnamed>")
                        ));
                    }
                }
            }
            Resource::PodDisruptionBudget(p) => {
                let sel = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .and_then(|s| s.match_labels.clone())
                    .unwrap_or_default();
                if !ws
                    .iter()
                    .any(|w| w.object.namespace() == o.namespace() && selects(&sel, &w.labels()))
                {
                    out.push(format!(
                        "{o}: selector {sel:?} selects the pods of no workload"
                    ));
                }
            }
            Resource::ClusterRoleBinding(b) => {
                if find(objs, &b.role_ref.kind, None, &b.role_ref.name).is_none() {
                    out.push(format!(
                        "{o}: roleRef {} {} does not exist",
                        b.role_ref.kind, b.role_ref.name
                    ));
                }
                out.extend(check_subjects(objs, o, b.subjects.iter().flatten()));
            }
            Resource::RoleBinding(b) => {
                if find(objs, &b.role_ref.kind, o.namespace(), &b.role_ref.name).is_none() {
                    out.push(format!(
                        "{o}: roleRef {} {} does not exist",
                        b.role_ref.kind, b.role_ref.name
                    ));
                }
                out.extend(check_subjects(objs, o, b.subjects.iter().flatten()));
            }
            _ => {}
        }
    }
    out
}

fn check_subjects<'a>(
    objs: &[ManifestObject],
    o: &ManifestObject,
    subjects: impl Iterator<Item = &'a k8s_openapi::api::rbac::v1::Subject>,
) -> Vec<String> {
    subjects
        .filter(|s| s.kind == "ServiceAccount")
        .filter(|s| find(objs, "ServiceAccount", s.namespace.as_deref(), &s.name).is_none())
        .map(|s| {
            format!(
                "{o}: subject ServiceAccount {}/{} does not exist",
                s.namespace.as_deref().unwrap_or("?"),
                s.name
            )
        })
        .collect()
}

/// RBAC is read-only and minimal: no wildcards, no non-resource URLs, reads with get / list /
/// watch only, the only writes are create / patch of Events, and Secrets only in a
/// namespaced Role, by name.
pub fn check_rbac(objs: &[ManifestObject]) -> Vec<String> {
    let mut out = Vec::new();
    for o in objs {
        let (rules, namespaced) = match &o.resource {
            Resource::ClusterRole(r) => (r.rules.clone().unwrap_or_default(), false),
            Resource::Role(r) => (r.rules.clone().unwrap_or_default(), true),
            _ => continue,
        };
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("{o}: rules[{i}]");
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            let names = rule.resource_names.clone().unwrap_or_default();
            if groups
                .iter()
                .chain(&resources)
                .chain(&rule.verbs)
                .chain(&names)
                .any(|s| s.contains('*'))
            {
                out.push(format!(
                    "{at}: wildcards grant more than the apiserver reads"
                ));
            }
            if rule.non_resource_urls.is_some() {
                out.push(format!("{at}: nonResourceURLs are not needed"));
            }
            for res in &resources {
                let allowed: &[&str] = if res == "events" {
                    &["create", "patch"]
                } else {
                    &["get", "list", "watch"]
                };
                for v in &rule.verbs {
                    if !allowed.contains(&v.as_str()) {
                        out.push(format!(
                            "{at}: verb {v} on {res} (allowed: {})",
                            allowed.join(", ")
                        ));
                    }
                }
                if res == "secrets" && (!namespaced || names.is_empty()) {
                    out.push(format!(
                        "{at}: Secrets must be granted in a namespaced Role with resourceNames"
                    ));
                }
            }
        }
    }
    out
}

/// Every container has resources and an image tag; long-running containers have liveness
/// and readiness probes; no privilege escalation, read-only root filesystems, all
/// capabilities dropped; only run-to-completion init containers are privileged; pods off
/// the host network run as non-root and add no capability.
pub fn check_containers(objs: &[ManifestObject]) -> Vec<String> {
    let mut out = Vec::new();
    for w in workloads(objs) {
        let o = w.object;
        let spec = w.template.spec.clone().unwrap_or_default();
        let host = spec.host_network == Some(true);
        let pod_non_root = spec
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root)
            == Some(true);
        for (c, one_shot) in w.containers() {
            let who = format!("{o}: container {}", c.name);
            let image = c.image.as_deref().unwrap_or_default();
            let last = image.rsplit('/').next().unwrap_or_default();
            if !(last.contains(':') || image.contains('@')) || image.ends_with(":latest") {
                out.push(format!(
                    "{who}: image {image:?} is not pinned to a tag or digest"
                ));
            }
            let res = c.resources.clone().unwrap_or_default();
            let requests = res.requests.unwrap_or_default();
            let limits = res.limits.unwrap_or_default();
            if !requests.contains_key("cpu") || !requests.contains_key("memory") {
                out.push(format!("{who}: resources.requests needs cpu and memory"));
            }
            if !limits.contains_key("memory") {
                out.push(format!("{who}: resources.limits needs memory"));
            }
            if !one_shot && (c.liveness_probe.is_none() || c.readiness_probe.is_none()) {
                out.push(format!("{who}: needs a livenessProbe and a readinessProbe"));
            }
            let sc = c.security_context.clone().unwrap_or_default();
            let privileged = sc.privileged == Some(true);
            if privileged && !one_shot {
                out.push(format!(
                    "{who}: privileged, but only a run-to-completion init container may be (grant capabilities instead)"
                ));
            }
            if !privileged && sc.allow_privilege_escalation != Some(false) {
                out.push(format!(
                    "{who}: securityContext.allowPrivilegeEscalation must be false"
                ));
            }
            if sc.read_only_root_filesystem != Some(true) {
                out.push(format!(
                    "{who}: securityContext.readOnlyRootFilesystem must be true"
                ));
            }
            let caps = sc.capabilities.clone().unwrap_or_default();
            if !privileged && !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
                out.push(format!(
                    "{who}: securityContext.capabilities.drop must hold ALL"
                ));
            }
            if !host {
                if !caps.add.unwrap_or_default().is_empty() {
                    out.push(format!(
                        "{who}: adds capabilities, but only the node agent may"
                    ));
                }
                if !pod_non_root && sc.run_as_non_root != Some(true) {
                    out.push(format!("{who}: must run as non-root (runAsNonRoot)"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_refs_finds_each_reference() {
        assert_eq!(var_refs("--x=/a/$(A).crt"), vec!["A"]);
        assert_eq!(var_refs("$(A)-$(B)"), vec!["A", "B"]);
        assert!(var_refs("plain $HOME").is_empty());
        assert!(var_refs("$(unterminated").is_empty());
    }
}
