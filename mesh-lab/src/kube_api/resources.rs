//! The resource types served, with what discovery, validation and tables need to know.
//!
//! Built-in types are the statics below; types defined by CustomResourceDefinitions are made
//! at run time from the CRD object (see [`super::crd`]) and carry a [`CustomType`].

pub use super::crd::CustomType;

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
#[derive(Debug, PartialEq)]
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
    /// What a CustomResourceDefinition says about this version of its type (schema, printer
    /// columns, storage); `None` for built-in types.
    pub custom: Option<&'static CustomType>,
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
            custom: None,
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

rt!(
    NETWORKPOLICIES,
    "networking.k8s.io",
    "v1",
    "networkpolicies",
    "networkpolicy",
    "NetworkPolicy",
    true,
    &["netpol"],
    NONE,
    &[],
    true
);
rt!(
    CRDS,
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    "customresourcedefinition",
    "CustomResourceDefinition",
    false,
    &["crd", "crds"],
    &["api-extensions"],
    &[Subresource::Status],
    true
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
    &NETWORKPOLICIES,
    &CRDS,
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

/// The groups among `types`, in order of first appearance, each with its versions, most
/// preferred first (kube-apiserver's version priority: GA before beta before alpha, higher
/// numbers first).
pub fn groups(types: &[&'static ResourceType]) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in types {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, vs)) => {
                if !vs.contains(&r.version) {
                    vs.push(r.version);
                }
            }
            None => out.push((r.group, vec![r.version])),
        }
    }
    for (_, vs) in &mut out {
        vs.sort_by_key(|v| version_priority(v));
    }
    out
}

/// Sort key of a version as kube-apiserver orders them: `v2`, `v1`, `v2beta1`, `v1beta2`,
/// `v1beta1`, `v1alpha1`, then anything else alphabetically.
pub fn version_priority(v: &str) -> (u8, i64, i64, String) {
    let parse = |v: &str| -> Option<(u8, i64, i64)> {
        let rest = v.strip_prefix('v')?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let major: i64 = rest[..digits].parse().ok()?;
        let rest = &rest[digits..];
        if rest.is_empty() {
            return Some((0, -major, 0));
        }
        let (level, n) = if let Some(n) = rest.strip_prefix("beta") {
            (1, n)
        } else if let Some(n) = rest.strip_prefix("alpha") {
            (2, n)
        } else {
            return None;
        };
        let minor: i64 = n.parse().ok()?;
        Some((level, -major, -minor))
    };
    match parse(v) {
        Some((l, a, b)) => (l, a, b, String::new()),
        None => (3, 0, 0, v.to_string()),
    }
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

    /// Storage id: the index in [`ALL`] for built-in types; for custom types an id shared
    /// by every version of the type (objects are stored once, in the storage version).
    pub(crate) fn id(&'static self) -> usize {
        if let Some(c) = self.custom {
            return c.storage_id;
        }
        ALL.iter()
            .position(|r| std::ptr::eq(*r, self))
            .expect("every built-in ResourceType is listed in ALL")
    }

    /// Whether two types share storage (the same built-in, or versions of one custom type).
    pub(crate) fn same_storage(&'static self, other: &'static ResourceType) -> bool {
        std::ptr::eq(self, other) || self.id() == other.id()
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
        let mut vs = vec!["v1alpha1", "v1", "v2beta1", "v1beta1", "v2", "foo"];
        vs.sort_by_key(|v| version_priority(v));
        assert_eq!(vs, ["v2", "v1", "v2beta1", "v1beta1", "v1alpha1", "foo"]);
    }
}
