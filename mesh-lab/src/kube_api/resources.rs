//! The resource types served, with what discovery, validation and tables need to know.

/// A subresource served under `<resource>/<name>/<subresource>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Status,
    Scale,
}

impl Subresource {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "status" => Some(Subresource::Status),
            "scale" => Some(Subresource::Scale),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
        }
    }
}

/// One served resource type (group, version, plural) and its properties.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// Empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case: `services`.
    pub resource: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// Whether `metadata.generation` is maintained (bumped on spec changes).
    pub generation: bool,
}

const ALL_CAT: &[&str] = &["all"];
const NONE: &[&str] = &[];

macro_rules! rt {
    ($name:ident, $g:expr, $v:expr, $r:expr, $s:expr, $k:expr, $ns:expr, $short:expr, $cat:expr, $sub:expr, $gen:expr) => {
        pub static $name: ResourceType = ResourceType {
            group: $g,
            version: $v,
            resource: $r,
            singular: $s,
            kind: $k,
            namespaced: $ns,
            short_names: $short,
            categories: $cat,
            subresources: $sub,
            generation: $gen,
        };
    };
}

rt!(
    NAMESPACES,
    "",
    "v1",
    "namespaces",
    "namespace",
    "Namespace",
    false,
    &["ns"],
    NONE,
    &[Subresource::Status],
    false
);
rt!(
    PODS,
    "",
    "v1",
    "pods",
    "pod",
    "Pod",
    true,
    &["po"],
    ALL_CAT,
    &[Subresource::Status],
    true
);
rt!(
    SERVICES,
    "",
    "v1",
    "services",
    "service",
    "Service",
    true,
    &["svc"],
    ALL_CAT,
    &[Subresource::Status],
    true
);
rt!(
    NODES,
    "",
    "v1",
    "nodes",
    "node",
    "Node",
    false,
    &["no"],
    NONE,
    &[Subresource::Status],
    false
);
rt!(
    SECRETS,
    "",
    "v1",
    "secrets",
    "secret",
    "Secret",
    true,
    NONE,
    NONE,
    &[],
    false
);
rt!(
    CONFIGMAPS,
    "",
    "v1",
    "configmaps",
    "configmap",
    "ConfigMap",
    true,
    &["cm"],
    NONE,
    &[],
    false
);
rt!(
    EVENTS,
    "",
    "v1",
    "events",
    "event",
    "Event",
    true,
    &["ev"],
    NONE,
    &[],
    false
);
// Served over HTTP as a view of the core EVENTS objects (see `events_view`); in-process
// users read and write core Events through the store.
rt!(
    EVENTS_V1,
    "events.k8s.io",
    "v1",
    "events",
    "event",
    "Event",
    true,
    &["ev"],
    NONE,
    &[],
    false
);
rt!(
    ENDPOINTSLICES,
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    "endpointslice",
    "EndpointSlice",
    true,
    NONE,
    NONE,
    &[],
    false
);
rt!(
    DEPLOYMENTS,
    "apps",
    "v1",
    "deployments",
    "deployment",
    "Deployment",
    true,
    &["deploy"],
    ALL_CAT,
    &[Subresource::Status, Subresource::Scale],
    true
);
rt!(
    REPLICASETS,
    "apps",
    "v1",
    "replicasets",
    "replicaset",
    "ReplicaSet",
    true,
    &["rs"],
    ALL_CAT,
    &[Subresource::Status, Subresource::Scale],
    true
);
rt!(
    ENDPOINTS,
    "",
    "v1",
    "endpoints",
    "endpoints",
    "Endpoints",
    true,
    &["ep"],
    NONE,
    &[],
    false
);
rt!(
    SERVICEACCOUNTS,
    "",
    "v1",
    "serviceaccounts",
    "serviceaccount",
    "ServiceAccount",
    true,
    &["sa"],
    NONE,
    &[],
    false
);
rt!(
    LEASES,
    "coordination.k8s.io",
    "v1",
    "leases",
    "lease",
    "Lease",
    true,
    NONE,
    NONE,
    &[],
    false
);

/// Every served type, in discovery order. The index in this slice is the type's storage id.
pub static ALL: &[&ResourceType] = &[
    &NAMESPACES,
    &PODS,
    &SERVICES,
    &NODES,
    &SECRETS,
    &CONFIGMAPS,
    &EVENTS,
    &EVENTS_V1,
    &ENDPOINTSLICES,
    &ENDPOINTS,
    &SERVICEACCOUNTS,
    &DEPLOYMENTS,
    &REPLICASETS,
    &LEASES,
];

/// The served type for a group, version and plural resource name.
pub fn lookup(group: &str, version: &str, resource: &str) -> Option<&'static ResourceType> {
    ALL.iter()
        .copied()
        .find(|r| r.group == group && r.version == version && r.resource == resource)
}

/// The served type for an `apiVersion` and `kind`, e.g. `("apps/v1", "Deployment")`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    ALL.iter()
        .copied()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// The groups served, in order, each with its single version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in ALL {
        if !out.iter().any(|(g, v)| *g == r.group && *v == r.version) {
            out.push((r.group, r.version));
        }
    }
    out
}

// === impl ResourceType ===

impl ResourceType {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `services` or `deployments.apps`, as in the real server's messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// Storage id: the index in [`ALL`].
    pub(crate) fn id(&'static self) -> usize {
        ALL.iter()
            .position(|r| std::ptr::eq(*r, self))
            .expect("every ResourceType is listed in ALL")
    }

    pub fn has_subresource(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    /// URL path of the collection, with the namespace when namespaced.
    pub fn collection_path(&self, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{base}/namespaces/{ns}/{}", self.resource),
            _ => format!("{base}/{}", self.resource),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_ids_agree() {
        for (i, r) in ALL.iter().enumerate() {
            assert_eq!(r.id(), i);
            assert!(std::ptr::eq(
                lookup(r.group, r.version, r.resource).unwrap(),
                *r
            ));
            assert!(std::ptr::eq(by_kind(&r.api_version(), r.kind).unwrap(), *r));
        }
        assert_eq!(DEPLOYMENTS.qualified(), "deployments.apps");
        assert_eq!(
            SERVICES.collection_path(Some("a")),
            "/api/v1/namespaces/a/services"
        );
        assert_eq!(NODES.collection_path(Some("a")), "/api/v1/nodes");
        assert!(lookup("apps", "v1", "pods").is_none());
    }
}
