//! The object store: every object as a `serde_json::Value`, one global, monotonically increasing
//! resourceVersion, a bounded history of changes for watches to resume from, and the
//! create/update/patch/delete semantics of the real kube-apiserver (optimistic concurrency,
//! no-op writes that keep the resourceVersion, generation bumps, subresources).
//!
//! All writes take one mutex; watchers are fed by a broadcast channel sent to under that mutex,
//! so a watch that subscribes while holding it sees exactly the events after its snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::crd::{self, Registry};
use super::error::{ApiError, Result};
use super::patch::{self, PatchType};
use super::resources::{self as r, ResourceType, Subresource};
use super::selector::{FieldSelector, LabelSelector};
use super::util;
use super::validate::{self, Allocators};

/// Kind of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change of one object, as kept in the history and broadcast to watches.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub event_type: EventType,
    pub resource: &'static ResourceType,
    pub namespace: String,
    pub name: String,
    /// The object after the change (for deletes: its last state, with the delete's rv).
    pub object: Arc<Value>,
    /// The object before the change, for modifications and deletes (paged lists read the
    /// state at an older resourceVersion by undoing the history).
    pub previous: Option<Arc<Value>>,
}

/// Store tuning.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// ClusterIPs are allocated from here.
    pub service_cidr: IpNet,
    /// Changes kept for watches to resume from; older resourceVersions get 410 Expired.
    pub history: usize,
    /// Events a watch may fall behind before it is ended with 410 Expired.
    pub watch_buffer: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            service_cidr: "10.96.0.0/16".parse().expect("valid CIDR"),
            history: 10_000,
            watch_buffer: 8192,
        }
    }
}

type Key = (usize, String, String);

/// Namespaces the real server refuses to delete.
const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

struct State {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Event>>,
    /// A watch can resume from any rv >= this one.
    compacted: u64,
    alloc: Allocators,
    /// The types CustomResourceDefinitions define, changed with the CRDs under this lock.
    crds: Registry,
}

// === impl State ===

impl State {
    /// The type objects of a storage id are stored as.
    fn type_by_id(&self, id: usize) -> Option<&'static ResourceType> {
        r::ALL
            .get(id)
            .copied()
            .or_else(|| self.crds.by_storage_id(id))
    }
}

/// The object store. Cheap to share: wrap in an `Arc`.
pub struct Store {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<Event>>,
    history: usize,
    /// Bumped to end every open watch (fault injection, shutdown).
    close: watch::Sender<u64>,
}

/// Which page of a list to read ([`Store::list_page`]).
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    /// At most this many items; `None`: all.
    pub limit: Option<usize>,
    /// Start after this `(namespace, name)` key (namespace empty for cluster-scoped types).
    pub after: Option<(String, String)>,
    /// Read the state at this resourceVersion; `None`: the latest.
    pub at: Option<u64>,
}

/// A page of a list.
#[derive(Clone, Debug)]
pub struct Page {
    pub items: Vec<Value>,
    /// The resourceVersion the page was read at.
    pub rv: u64,
    /// The last key returned, when matching items remain after it.
    pub more: Option<(String, String)>,
    /// How many matching items remain after this page.
    pub remaining: u64,
}

/// What a watch selects and where it starts.
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// `None`: all namespaces (or a cluster-scoped type).
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// `None` or `Some(0)`: start with the current state as ADDED events.
    pub resource_version: Option<u64>,
    /// Streaming list: the current state as ADDED events, then a bookmark marking their end.
    pub send_initial_events: bool,
}

/// An item of a watch stream.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    Added(Arc<Value>),
    Modified(Arc<Value>),
    Deleted(Arc<Value>),
    /// Progress: every change up to `rv` has been delivered.
    Bookmark {
        rv: u64,
        initial_events_end: bool,
    },
    /// The watch cannot continue (410 Expired); the stream ends after it.
    Error(ApiError),
}

/// An open watch on one resource type.
pub struct Watch {
    resource: &'static ResourceType,
    opts: WatchOptions,
    pending: VecDeque<WatchEvent>,
    rx: broadcast::Receiver<Arc<Event>>,
    close: watch::Receiver<u64>,
    /// Every change up to here is in `pending` or was delivered.
    head_rv: u64,
    /// Every change up to here was delivered (or did not match).
    delivered_rv: u64,
    done: bool,
}

fn ns_key(rt: &ResourceType, ns: Option<&str>) -> String {
    if rt.namespaced {
        ns.unwrap_or_default().to_string()
    } else {
        String::new()
    }
}

fn rv_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn has_finalizers(v: &Value) -> bool {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

fn is_terminating(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
}

/// Drops what is never stored: managed fields and the self link.
fn slim(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        m.remove("selfLink");
    }
}

/// Checks `apiVersion`/`kind` of a body against the URL's type and fills them in.
fn check_type(rt: &ResourceType, obj: &mut Value) -> Result<()> {
    let Some(m) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body of the request must be a {} object, not {}",
            rt.kind,
            kind_of_json(obj)
        )));
    };
    let av = rt.api_version();
    match m.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != av => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({av})"
            )));
        }
        _ => {}
    }
    match m.get("kind").and_then(Value::as_str) {
        Some(k) if k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        _ => {}
    }
    m.insert("apiVersion".into(), json!(av));
    m.insert("kind".into(), json!(rt.kind));
    if !m.get("metadata").is_some_and(Value::is_object) {
        if m.get("metadata").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        m.insert("metadata".into(), json!({}));
    }
    Ok(())
}

/// Custom objects are stored in their storage version (conversion strategy `None`: only
/// `apiVersion` differs between versions).
fn to_storage(rt: &ResourceType, obj: &mut Value) {
    if let Some(c) = rt.custom {
        obj["apiVersion"] = json!(format!("{}/{}", rt.group, c.storage_version));
    }
}

/// A stored object as the type's version shows it.
pub(crate) fn to_version(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    if rt.custom.is_some() && o.get("apiVersion").and_then(Value::as_str) != Some(&rt.api_version())
    {
        o["apiVersion"] = json!(rt.api_version());
    }
    o
}

/// Whether an update changes what `metadata.generation` counts: the spec for built-in
/// types; for custom types everything but metadata (and status, when it is a subresource),
/// as kube-apiserver counts for custom resources.
fn spec_changed(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    if rt.custom.is_none() {
        return old.get("spec") != new.get("spec");
    }
    let strip = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("apiVersion");
            if rt.has_subresource(Subresource::Status) {
                m.remove("status");
            }
        }
        v
    };
    strip(old) != strip(new)
}

fn kind_of_json(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// === impl Store ===

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        let (tx, _) = broadcast::channel(config.watch_buffer.max(16));
        let (close, _) = watch::channel(0);
        Store {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 1,
                alloc: Allocators::new(config.service_cidr),
                crds: Registry::default(),
            }),
            tx,
            history: config.history.max(1),
            close,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (writes are single inserts).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The served type for a group, version and plural resource name: a built-in one or one
    /// a CustomResourceDefinition defines.
    pub fn lookup(
        &self,
        group: &str,
        version: &str,
        resource: &str,
    ) -> Option<&'static ResourceType> {
        r::lookup(group, version, resource).or_else(|| {
            self.lock()
                .crds
                .types()
                .find(|t| t.group == group && t.version == version && t.resource == resource)
        })
    }

    /// The served type for an `apiVersion` and `kind`, built-in or custom.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&'static ResourceType> {
        r::by_kind(api_version, kind).or_else(|| {
            self.lock()
                .crds
                .types()
                .find(|t| t.api_version() == api_version && t.kind == kind)
        })
    }

    /// Every served type: the built-in ones, then those of CustomResourceDefinitions.
    pub fn resource_types(&self) -> Vec<&'static ResourceType> {
        let st = self.lock();
        r::ALL.iter().copied().chain(st.crds.types()).collect()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Records a change: new rv, history, broadcast. Returns the stored object.
    fn commit(
        &self,
        st: &mut State,
        rt: &'static ResourceType,
        event_type: EventType,
        mut obj: Value,
        previous: Option<Arc<Value>>,
    ) -> Arc<Value> {
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let obj = Arc::new(obj);
        let key = (rt.id(), ns.clone(), name.clone());
        if event_type == EventType::Deleted {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, obj.clone());
        }
        let ev = Arc::new(Event {
            rv,
            event_type,
            resource: rt,
            namespace: ns,
            name,
            object: obj.clone(),
            previous,
        });
        if std::ptr::eq(rt, &r::CRDS) {
            let live = (event_type != EventType::Deleted).then_some(&*obj);
            st.crds.sync(&ev.name, live);
        }
        st.history.push_back(ev.clone());
        while st.history.len() > self.history {
            if let Some(old) = st.history.pop_front() {
                st.compacted = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
        tracing::debug!(resource = rt.resource, namespace = %obj["metadata"]["namespace"].as_str().unwrap_or_default(),
            name = %obj["metadata"]["name"].as_str().unwrap_or_default(), rv, ?event_type, "stored");
        obj
    }

    /// Reads one object.
    pub fn get(&self, rt: &'static ResourceType, ns: Option<&str>, name: &str) -> Result<Value> {
        let st = self.lock();
        st.objects
            .get(&(rt.id(), ns_key(rt, ns), name.to_string()))
            .map(|o| (**o).clone())
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Lists objects of a type (all namespaces when `ns` is `None`), sorted by namespace and
    /// name, with the resourceVersion of the snapshot.
    pub fn list(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let st = self.lock();
        let id = rt.id();
        let lo = (
            id,
            ns.filter(|_| rt.namespaced).unwrap_or_default().to_string(),
            String::new(),
        );
        let items = st
            .objects
            .range(lo..)
            .take_while(|((i, n, _), _)| {
                *i == id && (ns.is_none() || !rt.namespaced || Some(n.as_str()) == ns)
            })
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| (**o).clone())
            .collect();
        (items, st.rv)
    }

    /// One page of a list, as kube-apiserver pages: items in key order (namespace, then
    /// name) after `req.after`, selectors applied before the limit, read at `req.at` (the
    /// first page's resourceVersion, for a consistent snapshot across pages) or at the
    /// latest version. A resourceVersion older than the history is 410 Expired; one not
    /// reached yet is 504 Timeout.
    pub fn list_page(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        req: &PageRequest,
    ) -> Result<Page> {
        let st = self.lock();
        let id = rt.id();
        let ns = ns.filter(|_| rt.namespaced);
        let in_scope = |n: &str| ns.is_none_or(|want| n == want);
        let lo = match &req.after {
            Some(k) => Bound::Excluded((id, k.0.clone(), k.1.clone())),
            None => Bound::Included((id, ns.unwrap_or_default().to_string(), String::new())),
        };
        let current = st
            .objects
            .range((lo, Bound::Unbounded))
            .take_while(|((i, n, _), _)| *i == id && in_scope(n))
            .map(|((_, n, name), o)| ((n.clone(), name.clone()), o.clone()));
        let rv = req.at.unwrap_or(st.rv);
        let snapshot: Vec<((String, String), Arc<Value>)> = if rv == st.rv {
            current.collect()
        } else {
            if rv > st.rv {
                return Err(ApiError::too_large_resource_version(rv, st.rv));
            }
            if rv < st.compacted {
                return Err(ApiError::expired(rv, st.compacted));
            }
            // The state at `rv`: every key changed after `rv` takes its state from before
            // its first change after `rv` (absent when that change created it).
            let mut at: BTreeMap<(String, String), Arc<Value>> = current.collect();
            let mut decided = std::collections::HashSet::new();
            for ev in st.history.iter().filter(|e| e.rv > rv) {
                if !ev.resource.same_storage(rt) || !in_scope(&ev.namespace) {
                    continue;
                }
                let key = (ev.namespace.clone(), ev.name.clone());
                if req.after.as_ref().is_some_and(|a| &key <= a) || !decided.insert(key.clone()) {
                    continue;
                }
                match (ev.event_type, &ev.previous) {
                    (EventType::Modified | EventType::Deleted, Some(before)) => {
                        at.insert(key, before.clone());
                    }
                    _ => {
                        at.remove(&key);
                    }
                }
            }
            at.into_iter().collect()
        };
        let mut matching = snapshot
            .into_iter()
            .filter(|(_, o)| labels.matches(o) && fields.matches(o));
        let mut items = Vec::new();
        let mut last = None;
        for (k, o) in matching.by_ref() {
            if req.limit.is_some_and(|l| items.len() >= l) {
                // One more exists: the page is full and a continue token is due.
                let rest = 1 + matching.count();
                return Ok(Page {
                    items,
                    rv,
                    more: last,
                    remaining: rest as u64,
                });
            }
            items.push((*o).clone());
            last = Some(k);
        }
        Ok(Page {
            items,
            rv,
            more: None,
            remaining: 0,
        })
    }

    /// Creates an object. For namespaced types the namespace comes from `ns`, or from the
    /// object's `metadata.namespace` when `ns` is `None`.
    pub fn create(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value> {
        check_type(rt, &mut obj)?;
        slim(&mut obj);
        to_storage(rt, &mut obj);
        let meta = obj["metadata"].as_object_mut().expect("checked");
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from);
        let namespace = if rt.namespaced {
            let ns = match (ns, body_ns) {
                (Some(u), Some(b)) if u != b => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(u), _) => u.to_string(),
                (None, Some(b)) => b,
                (None, None) => {
                    return Err(ApiError::bad_request(format!(
                        "a namespace is required to create a {}",
                        rt.kind
                    )));
                }
            };
            meta.insert("namespace".into(), json!(ns));
            Some(ns)
        } else {
            meta.remove("namespace");
            None
        };
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(g) if !g.is_empty() => name = format!("{g}{}", util::name_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        vec![super::error::FieldError::required(
                            "metadata.name",
                            "name or generateName is required",
                        )],
                    ));
                }
            }
            meta.insert("name".into(), json!(name));
        }
        validate::check_name(rt, &name)?;
        meta.insert("uid".into(), json!(util::uuid_v4()));
        meta.insert("creationTimestamp".into(), json!(util::now_rfc3339()));
        meta.remove("resourceVersion");
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if rt.generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }

        let mut st = self.lock();
        let key = (rt.id(), namespace.clone().unwrap_or_default(), name.clone());
        if st.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        if let Some(ns) = &namespace
            && !st
                .objects
                .contains_key(&(r::NAMESPACES.id(), String::new(), ns.clone()))
        {
            return Err(ApiError::not_found(&r::NAMESPACES, ns));
        }
        validate::prepare_create(rt, &mut obj, &mut st.alloc)?;
        let stored = self.commit(&mut st, rt, EventType::Added, obj, None);
        Ok((*stored).clone())
    }

    /// Replaces an object (PUT). A `metadata.resourceVersion` in `obj` must be the current one.
    pub fn update(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        obj: Value,
    ) -> Result<Value> {
        self.update_sub(rt, ns, name, obj, None)
    }

    /// Replaces an object's status (PUT .../status); everything else is kept.
    pub fn update_status(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        obj: Value,
    ) -> Result<Value> {
        self.update_sub(rt, ns, name, obj, Some(Subresource::Status))
    }

    fn update_sub(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Option<Subresource>,
    ) -> Result<Value> {
        check_type(rt, &mut obj)?;
        let mut st = self.lock();
        let old = st
            .objects
            .get(&(rt.id(), ns_key(rt, ns), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        self.update_locked(&mut st, rt, name, &old, obj, sub)
    }

    /// The common update path, on a locked state, given the current object.
    fn update_locked(
        &self,
        st: &mut State,
        rt: &'static ResourceType,
        name: &str,
        old: &Arc<Value>,
        mut new: Value,
        sub: Option<Subresource>,
    ) -> Result<Value> {
        slim(&mut new);
        to_storage(rt, &mut new);
        let meta = new["metadata"].as_object_mut().expect("checked");
        match meta.get("name").and_then(Value::as_str) {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        let old_ns = old["metadata"]["namespace"].as_str();
        match meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            Some(n) if Some(n) != old_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        let old_rv = rv_of(old).unwrap_or_default().to_string();
        if let Some(rv) = meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            && rv != old_rv
        {
            return Err(ApiError::stale(rt, name));
        }
        if let Some(uid) = meta
            .get("uid")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            && Some(uid) != old["metadata"]["uid"].as_str()
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            ));
        }

        let mut result = match sub {
            Some(Subresource::Status) => {
                let mut r = (**old).clone();
                match new.get("status") {
                    Some(s) => r["status"] = s.clone(),
                    None => {
                        if let Some(m) = r.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                if rt.custom.is_some() {
                    crd::check_custom(rt, &mut r)?;
                }
                r
            }
            _ => {
                // Immutable metadata comes from the stored object.
                for k in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ] {
                    match old["metadata"].get(k) {
                        Some(v) => new["metadata"][k] = v.clone(),
                        None => {
                            new["metadata"].as_object_mut().expect("object").remove(k);
                        }
                    }
                }
                if let Some(ns) = old_ns {
                    new["metadata"]["namespace"] = json!(ns);
                }
                new["metadata"]["name"] = json!(name);
                if rt.has_subresource(Subresource::Status) {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            new.as_object_mut().expect("object").remove("status");
                        }
                    }
                }
                validate::prepare_update(rt, old, &mut new, &mut st.alloc)?;
                if rt.generation && spec_changed(rt, old, &new) {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    new["metadata"]["generation"] = json!(g);
                }
                new
            }
        };
        result["metadata"]["resourceVersion"] = json!(old_rv);
        if result == **old {
            tracing::debug!(
                resource = rt.resource,
                name,
                "no-op update keeps the resourceVersion"
            );
            return Ok(result);
        }
        if is_terminating(&result) && !has_finalizers(&result) {
            // The last finalizer is gone: the pending delete completes.
            tracing::debug!(resource = rt.resource, name, "finalizers removed; deleting");
            return Ok((*self.delete_locked(st, rt, &Arc::new(result))).clone());
        }
        let stored = self.commit(st, rt, EventType::Modified, result, Some(old.clone()));
        Ok((*stored).clone())
    }

    /// Patches an object. Server-side apply (`PatchType::Apply`) creates it when missing.
    pub fn patch(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &[u8],
    ) -> Result<Value> {
        self.patch_sub(rt, ns, name, kind, body, None)
    }

    /// Patches an object's status.
    pub fn patch_status(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &[u8],
    ) -> Result<Value> {
        self.patch_sub(rt, ns, name, kind, body, Some(Subresource::Status))
    }

    fn patch_sub(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &[u8],
        sub: Option<Subresource>,
    ) -> Result<Value> {
        // The patch is applied under the lock, so it always applies to the latest object.
        let mut st = self.lock();
        let current = st
            .objects
            .get(&(rt.id(), ns_key(rt, ns), name.to_string()))
            .cloned();
        let Some(current) = current else {
            drop(st);
            if kind == PatchType::Apply && sub.is_none() {
                let mut obj = patch::parse_body(body)?;
                check_type(rt, &mut obj)?;
                match obj["metadata"].get("name").and_then(Value::as_str) {
                    Some(n) if n != name => {
                        return Err(ApiError::bad_request(format!(
                            "the name of the object ({n}) does not match the name on the URL ({name})"
                        )));
                    }
                    _ => obj["metadata"]["name"] = json!(name),
                }
                return self.create(rt, ns, obj);
            }
            return Err(ApiError::not_found(rt, name));
        };
        // Patches apply to the object as the URL's version shows it.
        let mut patched = patch::apply(kind, &to_version(rt, &current), body)?;
        check_type(rt, &mut patched)?;
        if rv_of(&patched) != rv_of(&current) {
            return Err(ApiError::stale(rt, name));
        }
        self.update_locked(&mut st, rt, name, &current, patched, sub)
    }

    /// Deletes an object and returns its last state. `preconditions` is the
    /// `DeleteOptions.preconditions` object (`uid`, `resourceVersion`). Deleting a namespace
    /// deletes every object in it first.
    pub fn delete(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        preconditions: Option<&Value>,
    ) -> Result<Value> {
        let mut st = self.lock();
        let key = (rt.id(), ns_key(rt, ns), name.to_string());
        let old = st
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(p) = preconditions {
            for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(want) = p.get(field).and_then(Value::as_str)
                    && Some(want) != old["metadata"][field].as_str()
                {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        &format!(
                            "Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                            old["metadata"][field].as_str().unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        if std::ptr::eq(rt, &r::NAMESPACES) {
            if PROTECTED_NAMESPACES.contains(&name) {
                return Err(ApiError::forbidden(format!(
                    "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                )));
            }
            let doomed: Vec<(usize, Arc<Value>)> = st
                .objects
                .iter()
                .filter(|((_, n, _), _)| n == name)
                .map(|((i, _, _), o)| (*i, o.clone()))
                .collect();
            for (i, o) in doomed {
                if let Some(t) = st.type_by_id(i) {
                    self.delete_locked(&mut st, t, &o);
                }
            }
        }
        if std::ptr::eq(rt, &r::CRDS)
            && let Some(t) = st.crds.storage_type_of(name)
        {
            // Deleting a CRD deletes its objects (watchers see each one go).
            let id = t.id();
            let doomed: Vec<Arc<Value>> = st
                .objects
                .iter()
                .filter(|((i, _, _), _)| *i == id)
                .map(|(_, o)| o.clone())
                .collect();
            tracing::info!(
                crd = name,
                objects = doomed.len(),
                "deleting the objects of a CRD"
            );
            for o in doomed {
                self.delete_locked(&mut st, t, &o);
            }
        }
        if has_finalizers(&old) && !std::ptr::eq(rt, &r::NAMESPACES) {
            // Finalizers hold the object: it is marked for deletion and goes away when an
            // update removes the last finalizer.
            if is_terminating(&old) {
                return Ok((*old).clone());
            }
            let mut marked = (*old).clone();
            marked["metadata"]["deletionTimestamp"] = json!(util::now_rfc3339());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let stored = self.commit(&mut st, rt, EventType::Modified, marked, Some(old));
            return Ok((*stored).clone());
        }
        let gone = self.delete_locked(&mut st, rt, &old);
        Ok((*gone).clone())
    }

    fn delete_locked(
        &self,
        st: &mut State,
        rt: &'static ResourceType,
        old: &Arc<Value>,
    ) -> Arc<Value> {
        if std::ptr::eq(rt, &r::SERVICES) {
            st.alloc.release_service(old);
        }
        self.commit(
            st,
            rt,
            EventType::Deleted,
            (**old).clone(),
            Some(old.clone()),
        )
    }

    /// Deletes every object of a type matching the selectors (`deletecollection`).
    pub fn delete_collection(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<Vec<Value>> {
        let (items, _) = self.list(rt, ns, labels, fields);
        let mut out = Vec::new();
        for o in items {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            let ons = o["metadata"]["namespace"].as_str();
            match self.delete(rt, ons, name, None) {
                Ok(v) => out.push(v),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    // --- scale subresource (autoscaling/v1 Scale of a Deployment) ---

    /// The `autoscaling/v1 Scale` of an object with a scale subresource.
    pub fn get_scale(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value> {
        if !rt.has_subresource(Subresource::Scale) {
            return Err(ApiError::path_not_found(&format!(
                "{}/{name}/scale",
                rt.collection_path(ns)
            )));
        }
        Ok(to_scale(&self.get(rt, ns, name)?))
    }

    /// Sets `spec.replicas` from a Scale; its `metadata.resourceVersion`, when set, must match.
    pub fn update_scale(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        scale: Value,
    ) -> Result<Value> {
        if !rt.has_subresource(Subresource::Scale) {
            return Err(ApiError::path_not_found(&format!(
                "{}/{name}/scale",
                rt.collection_path(ns)
            )));
        }
        let replicas = match scale.pointer("/spec/replicas") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::invalid(
                    rt,
                    name,
                    vec![super::error::FieldError::invalid(
                        "spec.replicas",
                        v.to_string(),
                        "must be greater than or equal to 0",
                    )],
                )
            })?,
        };
        let mut st = self.lock();
        let old = st
            .objects
            .get(&(rt.id(), ns_key(rt, ns), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(rv) = rv_of(&scale)
            && Some(rv) != rv_of(&old)
        {
            return Err(ApiError::stale(rt, name));
        }
        let mut new = (*old).clone();
        new["spec"]["replicas"] = json!(replicas);
        let out = self.update_locked(&mut st, rt, name, &old, new, None)?;
        Ok(to_scale(&out))
    }

    /// Patches the Scale of an object and applies its `spec.replicas`.
    pub fn patch_scale(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: &[u8],
    ) -> Result<Value> {
        let scale = self.get_scale(rt, ns, name)?;
        let patched = patch::apply(kind, &scale, body)?;
        self.update_scale(rt, ns, name, patched)
    }

    // --- watch ---

    /// Opens a watch. Fails with 410 Expired when `resource_version` is older than the history.
    pub fn watch(&self, rt: &'static ResourceType, opts: WatchOptions) -> Result<Watch> {
        let st = self.lock();
        let rx = self.tx.subscribe();
        let mut pending = VecDeque::new();
        let initial = opts.send_initial_events || matches!(opts.resource_version, None | Some(0));
        if initial {
            let id = rt.id();
            let ns = opts.namespace.as_deref().filter(|_| rt.namespaced);
            let current = st
                .objects
                .range((id, ns.unwrap_or_default().to_string(), String::new())..)
                .take_while(|((i, n, _), _)| *i == id && (ns.is_none() || Some(n.as_str()) == ns))
                .filter(|(_, o)| opts.labels.matches(o) && opts.fields.matches(o))
                .map(|(_, o)| WatchEvent::Added(o.clone()));
            pending.extend(current);
            if opts.send_initial_events {
                pending.push_back(WatchEvent::Bookmark {
                    rv: st.rv,
                    initial_events_end: true,
                });
            }
        } else if let Some(from) = opts.resource_version {
            if from < st.compacted {
                return Err(ApiError::expired(from, st.compacted));
            }
            for ev in st.history.iter().filter(|e| e.rv > from) {
                if let Some(w) = filter_event(rt, &opts, ev) {
                    pending.push_back(w);
                }
            }
        }
        let head_rv = st.rv.max(opts.resource_version.unwrap_or(0));
        drop(st);
        let delivered_rv = if pending.is_empty() {
            head_rv
        } else {
            opts.resource_version.unwrap_or(0)
        };
        Ok(Watch {
            resource: rt,
            opts,
            pending,
            rx,
            close: self.close.subscribe(),
            head_rv,
            delivered_rv,
            done: false,
        })
    }

    /// A detached copy of the current objects (without history or watchers), for dry runs:
    /// the copy validates, defaults and allocates like the real store, and nothing written
    /// to it is seen by anyone.
    pub fn scratch_copy(&self) -> Store {
        let st = self.lock();
        let (tx, _) = broadcast::channel(16);
        let (close, _) = watch::channel(0);
        Store {
            state: Mutex::new(State {
                rv: st.rv,
                objects: st.objects.clone(),
                history: VecDeque::new(),
                compacted: st.rv,
                alloc: st.alloc.clone(),
                crds: st.crds.clone(),
            }),
            tx,
            history: 1,
            close,
        }
    }

    /// Forgets the history: watches from an older resourceVersion get 410 Expired, as after
    /// an etcd compaction.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.compacted = st.rv;
        tracing::info!(rv = st.rv, "history compacted");
    }

    /// Ends every open watch stream (clients re-watch from their last resourceVersion).
    pub fn close_watches(&self) {
        self.close.send_modify(|g| *g += 1);
    }
}

/// The watch event an `Event` means for a watch, if any (objects moving in or out of the
/// selection become ADDED / DELETED).
fn filter_event(rt: &'static ResourceType, opts: &WatchOptions, ev: &Event) -> Option<WatchEvent> {
    if !ev.resource.same_storage(rt) {
        return None;
    }
    if rt.namespaced
        && let Some(ns) = &opts.namespace
        && *ns != ev.namespace
    {
        return None;
    }
    let m = |o: &Value| opts.labels.matches(o) && opts.fields.matches(o);
    match ev.event_type {
        EventType::Added => m(&ev.object).then(|| WatchEvent::Added(ev.object.clone())),
        EventType::Deleted => m(&ev.object).then(|| WatchEvent::Deleted(ev.object.clone())),
        EventType::Modified => {
            let now = m(&ev.object);
            let before = ev.previous.as_deref().is_some_and(m);
            match (before, now) {
                (true, true) => Some(WatchEvent::Modified(ev.object.clone())),
                (false, true) => Some(WatchEvent::Added(ev.object.clone())),
                (true, false) => Some(WatchEvent::Deleted(ev.object.clone())),
                (false, false) => None,
            }
        }
    }
}

/// Deployment -> `autoscaling/v1 Scale`.
pub fn to_scale(obj: &Value) -> Value {
    let md = &obj["metadata"];
    let mut meta = json!({});
    for k in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = md.get(k) {
            meta[k] = v.clone();
        }
    }
    let selector = obj
        .pointer("/spec/selector")
        .map(|s| LabelSelector::from_object(s).to_string_form())
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": meta,
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {
            "replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    })
}

// === impl Watch ===

impl Watch {
    pub fn resource(&self) -> &'static ResourceType {
        self.resource
    }

    /// The resourceVersion up to which every change has been delivered, for a progress
    /// BOOKMARK; `None` while initial or replayed events are still queued (a client resuming
    /// from a bookmark sent then would miss them).
    pub fn bookmark_rv(&self) -> Option<u64> {
        self.pending.is_empty().then_some(self.delivered_rv)
    }

    /// The next event; `None` when the watch has ended (closed, or after an `Error`).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if let Some(e) = self.pending.pop_front() {
            if self.pending.is_empty() {
                self.delivered_rv = self.head_rv;
            }
            return Some(e);
        }
        if self.done {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                _ = self.close.changed() => {
                    self.done = true;
                    return None;
                }
                r = self.rx.recv() => match r {
                    Ok(ev) => {
                        if ev.rv <= self.head_rv {
                            // Already covered by the initial snapshot or the history replay.
                            continue;
                        }
                        self.head_rv = ev.rv;
                        self.delivered_rv = ev.rv;
                        if let Some(w) = filter_event(self.resource, &self.opts, &ev) {
                            return Some(w);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(resource = self.resource.resource, missed = n, "watch fell behind; ending it with 410");
                        self.done = true;
                        return Some(WatchEvent::Error(ApiError::expired(
                            self.delivered_rv,
                            self.delivered_rv + n,
                        )));
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.done = true;
                        return None;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(history: usize, watch_buffer: usize) -> Store {
        let s = Store::new(StoreConfig {
            history,
            watch_buffer,
            ..StoreConfig::default()
        });
        s.create(&r::NAMESPACES, None, json!({"metadata": {"name": "a"}}))
            .unwrap();
        s
    }

    fn cm(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
    }

    #[test]
    fn writes_bump_rv_and_no_ops_do_not() {
        let s = store(100, 100);
        let c = s
            .create(&r::CONFIGMAPS, Some("a"), cm("x", json!({})))
            .unwrap();
        let rv = s.resource_version();
        assert_eq!(rv_of(&c), Some(rv.to_string().as_str()));
        let same = s.update(&r::CONFIGMAPS, Some("a"), "x", c.clone()).unwrap();
        assert_eq!(same, c);
        assert_eq!(s.resource_version(), rv, "a no-op update does not write");
        let mut changed = c.clone();
        changed["data"]["k"] = json!("w");
        let out = s
            .update(&r::CONFIGMAPS, Some("a"), "x", changed.clone())
            .unwrap();
        assert_eq!(s.resource_version(), rv + 1);
        assert_eq!(out["metadata"]["uid"], c["metadata"]["uid"]);
        let e = s
            .update(&r::CONFIGMAPS, Some("a"), "x", changed)
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        let e = s
            .delete(
                &r::CONFIGMAPS,
                Some("a"),
                "x",
                Some(&json!({"uid": "other"})),
            )
            .unwrap_err();
        assert_eq!(e.code, 409);
        let gone = s.delete(&r::CONFIGMAPS, Some("a"), "x", None).unwrap();
        assert_eq!(rv_of(&gone), Some((rv + 2).to_string().as_str()));
    }

    #[test]
    fn pages_read_a_consistent_snapshot() {
        let s = store(100, 100);
        s.create(&r::NAMESPACES, None, json!({"metadata": {"name": "b"}}))
            .unwrap();
        for (ns, name, app) in [("a", "c1", "x"), ("a", "c2", "y"), ("a", "c3", "x")] {
            s.create(&r::CONFIGMAPS, Some(ns), cm(name, json!({"app": app})))
                .unwrap();
        }
        s.create(&r::CONFIGMAPS, Some("b"), cm("c0", json!({"app": "x"})))
            .unwrap();
        let all = (LabelSelector::default(), FieldSelector::default());
        let names = |p: &Page| -> Vec<String> {
            p.items
                .iter()
                .map(|o| {
                    format!(
                        "{}/{}",
                        o["metadata"]["namespace"].as_str().unwrap(),
                        o["metadata"]["name"].as_str().unwrap()
                    )
                })
                .collect()
        };
        let req = |limit, after: Option<(&str, &str)>, at| PageRequest {
            limit: Some(limit),
            after: after.map(|(a, b)| (a.to_string(), b.to_string())),
            at,
        };
        let first = s
            .list_page(&r::CONFIGMAPS, None, &all.0, &all.1, &req(2, None, None))
            .unwrap();
        assert_eq!(names(&first), ["a/c1", "a/c2"]);
        assert_eq!(first.more, Some(("a".into(), "c2".into())));
        assert_eq!((first.rv, first.remaining), (s.resource_version(), 2));

        // Changes after the first page do not show in the rest of the paged list.
        s.create(&r::CONFIGMAPS, Some("a"), cm("c2a", json!({})))
            .unwrap();
        s.delete(&r::CONFIGMAPS, Some("a"), "c3", None).unwrap();
        s.patch(
            &r::CONFIGMAPS,
            Some("b"),
            "c0",
            PatchType::Merge,
            br#"{"data":{"k":"changed"}}"#,
        )
        .unwrap();
        s.delete(&r::CONFIGMAPS, Some("b"), "c0", None).unwrap();
        s.create(&r::CONFIGMAPS, Some("b"), cm("c0", json!({"app": "new"})))
            .unwrap();
        let rest = s
            .list_page(
                &r::CONFIGMAPS,
                None,
                &all.0,
                &all.1,
                &req(5, Some(("a", "c2")), Some(first.rv)),
            )
            .unwrap();
        assert_eq!(names(&rest), ["a/c3", "b/c0"]);
        assert_eq!(
            rest.items[1]["data"]["k"], "v",
            "the version as of the first page"
        );
        assert_eq!(rest.items[1]["metadata"]["labels"]["app"], "x");
        assert_eq!((rest.more, rest.rv), (None, first.rv));

        // Selectors apply before the limit: a page holds `limit` matching items.
        let x = LabelSelector::parse("app=x").unwrap();
        let p = s
            .list_page(
                &r::CONFIGMAPS,
                None,
                &x,
                &all.1,
                &req(1, None, Some(first.rv)),
            )
            .unwrap();
        assert_eq!((names(&p), p.remaining), (vec!["a/c1".to_string()], 2));
        let p = s
            .list_page(
                &r::CONFIGMAPS,
                None,
                &x,
                &all.1,
                &req(1, Some(("a", "c1")), Some(first.rv)),
            )
            .unwrap();
        assert_eq!(names(&p), ["a/c3"]);
        // One namespace only.
        let p = s
            .list_page(
                &r::CONFIGMAPS,
                Some("b"),
                &all.0,
                &all.1,
                &req(5, None, None),
            )
            .unwrap();
        assert_eq!(names(&p), ["b/c0"]);
        assert_eq!(p.items[0]["metadata"]["labels"]["app"], "new");

        // A version newer than the store, and one older than the history.
        let e = s
            .list_page(
                &r::CONFIGMAPS,
                None,
                &all.0,
                &all.1,
                &req(1, None, Some(s.resource_version() + 5)),
            )
            .unwrap_err();
        assert_eq!((e.code, e.reason), (504, "Timeout"));
        s.compact();
        let e = s
            .list_page(
                &r::CONFIGMAPS,
                None,
                &all.0,
                &all.1,
                &req(1, None, Some(first.rv)),
            )
            .unwrap_err();
        assert_eq!((e.code, e.reason), (410, "Expired"));
    }

    #[tokio::test]
    async fn watches_replay_filter_and_expire() {
        let s = store(3, 100);
        let from = s.resource_version();
        s.create(&r::CONFIGMAPS, Some("a"), cm("in", json!({"app": "x"})))
            .unwrap();
        s.create(&r::CONFIGMAPS, Some("a"), cm("out", json!({"app": "y"})))
            .unwrap();
        let opts = WatchOptions {
            labels: LabelSelector::parse("app=x").unwrap(),
            resource_version: Some(from),
            ..Default::default()
        };
        let mut w = s.watch(&r::CONFIGMAPS, opts.clone()).unwrap();
        assert_eq!(
            w.bookmark_rv(),
            None,
            "no progress bookmark before the replay is delivered"
        );
        match w.next().await.unwrap() {
            WatchEvent::Added(o) => assert_eq!(o["metadata"]["name"], "in"),
            other => panic!("{other:?}"),
        }
        assert_eq!(w.bookmark_rv(), Some(s.resource_version()));
        // Leaving the selection is a DELETED for this watch; entering it an ADDED.
        s.patch(
            &r::CONFIGMAPS,
            Some("a"),
            "in",
            PatchType::Merge,
            br#"{"metadata":{"labels":{"app":"z"}}}"#,
        )
        .unwrap();
        s.patch(
            &r::CONFIGMAPS,
            Some("a"),
            "out",
            PatchType::Merge,
            br#"{"metadata":{"labels":{"app":"x"}}}"#,
        )
        .unwrap();
        assert!(
            matches!(w.next().await.unwrap(), WatchEvent::Deleted(o) if o["metadata"]["name"] == "in")
        );
        assert!(
            matches!(w.next().await.unwrap(), WatchEvent::Added(o) if o["metadata"]["name"] == "out")
        );
        // Four more writes: `from` is now older than the 3 retained changes.
        let e = s.watch(&r::CONFIGMAPS, opts).err().unwrap();
        assert_eq!((e.code, e.reason), (410, "Expired"));
    }

    #[tokio::test]
    async fn a_watch_that_falls_behind_ends_with_410() {
        let s = store(1000, 16);
        let mut w = s
            .watch(
                &r::CONFIGMAPS,
                WatchOptions {
                    resource_version: Some(s.resource_version()),
                    ..Default::default()
                },
            )
            .unwrap();
        for i in 0..40 {
            s.create(&r::CONFIGMAPS, Some("a"), cm(&format!("c{i}"), json!({})))
                .unwrap();
        }
        match w.next().await.unwrap() {
            WatchEvent::Error(e) => assert_eq!(e.code, 410),
            other => panic!("expected 410, got {other:?}"),
        }
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn namespace_delete_cascades_and_close_ends_watches() {
        let s = store(100, 100);
        s.create(&r::CONFIGMAPS, Some("a"), cm("x", json!({})))
            .unwrap();
        let mut w = s
            .watch(
                &r::CONFIGMAPS,
                WatchOptions {
                    resource_version: Some(s.resource_version()),
                    ..Default::default()
                },
            )
            .unwrap();
        s.delete(&r::NAMESPACES, None, "a", None).unwrap();
        assert!(
            matches!(w.next().await.unwrap(), WatchEvent::Deleted(o) if o["metadata"]["name"] == "x")
        );
        assert_eq!(
            s.create(&r::CONFIGMAPS, Some("a"), cm("y", json!({})))
                .unwrap_err()
                .message,
            "namespaces \"a\" not found"
        );
        s.close_watches();
        assert!(w.next().await.is_none());
        s.create(
            &r::NAMESPACES,
            None,
            json!({"metadata": {"name": "default"}}),
        )
        .unwrap();
        let e = s.delete(&r::NAMESPACES, None, "default", None).unwrap_err();
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
    }

    #[tokio::test]
    async fn finalizers_hold_deletion_until_removed() {
        let s = store(100, 100);
        let mut obj = cm("f", json!({}));
        obj["metadata"]["finalizers"] = json!(["mesh.io/cleanup"]);
        s.create(&r::CONFIGMAPS, Some("a"), obj).unwrap();
        let mut w = s
            .watch(
                &r::CONFIGMAPS,
                WatchOptions {
                    resource_version: Some(s.resource_version()),
                    ..Default::default()
                },
            )
            .unwrap();
        let marked = s.delete(&r::CONFIGMAPS, Some("a"), "f", None).unwrap();
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(matches!(w.next().await.unwrap(), WatchEvent::Modified(_)));
        let again = s.delete(&r::CONFIGMAPS, Some("a"), "f", None).unwrap();
        assert_eq!(again, marked, "a second delete changes nothing");
        // The deletion mark cannot be removed by an update.
        let mut cleared = marked.clone();
        cleared["metadata"]["deletionTimestamp"] = Value::Null;
        cleared["data"]["k"] = json!("changed");
        let kept = s.update(&r::CONFIGMAPS, Some("a"), "f", cleared).unwrap();
        assert_eq!(
            kept["metadata"]["deletionTimestamp"],
            marked["metadata"]["deletionTimestamp"]
        );
        assert!(matches!(w.next().await.unwrap(), WatchEvent::Modified(_)));
        s.patch(
            &r::CONFIGMAPS,
            Some("a"),
            "f",
            PatchType::Merge,
            br#"{"metadata":{"finalizers":null}}"#,
        )
        .unwrap();
        assert!(matches!(w.next().await.unwrap(), WatchEvent::Deleted(_)));
        assert_eq!(s.get(&r::CONFIGMAPS, Some("a"), "f").unwrap_err().code, 404);
    }
}
