//! The serving index (DESIGN.md section 7): ONE etcd watch on `<prefix>clusters/` feeds an
//! in-memory copy of every object, the synced markers and a bounded history of recent
//! changes. Watch streams are served from it, never with an etcd watch per client.
//!
//! The index proper ([`State`]) is synchronous with one writer (the feeder task):
//! [`State::reset`] for a full list at a revision, [`State::apply`] for one etcd watch
//! response, [`State::advance`] for a progress notification. Subscribers take a snapshot
//! or the missed part of the history under the same lock as their registration, so no
//! change falls between the two, and then receive `Arc<Batch>`es through a bounded channel.
//! A subscriber whose channel is full is cut off (never waited for) and told so; it resumes
//! from its last revision, from the history if it is still there.
//!
//! A subscriber older than the history (the server restarted, or the history was trimmed)
//! is resumed with the difference between etcd at its revision (a keys-only historical
//! read, [`read_keys_at`]) and the index now ([`State::subscribe_diff`]); only when etcd
//! compacted that revision does it get a reset and a snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use mesh_core::backoff::{Backoff, Retries};
use mesh_proto::keys::{ClusterKey, Keys};
use mesh_proto::pb::{self, Kind};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::{ClusterKindLabels, Metrics};

/// Errors of the index and its feeder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing {prefix:?} from etcd: {source}")]
    List {
        prefix: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("watching {prefix:?} from revision {from}: {source}")]
    Watch {
        prefix: String,
        from: i64,
        #[source]
        source: etcd_client::Error,
    },
    #[error("the etcd watch was canceled by the server: {reason}")]
    WatchCanceled { reason: String },
    #[error("the etcd watch stream ended")]
    WatchClosed,
    #[error("the etcd watch sent nothing for {0:?} after a progress request")]
    WatchStalled(Duration),
    #[error("the index is shut down")]
    Shutdown,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a value or key under `clusters/` was skipped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("key is not UTF-8: {key:?}")]
    KeyNotUtf8 { key: String },
    #[error("key {key:?} has an unknown shape")]
    UnknownKey { key: String },
    #[error("value of {key:?} is not a valid {kind}: {source}")]
    Value {
        key: String,
        kind: &'static str,
        #[source]
        source: prost::DecodeError,
    },
}

impl DecodeError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::KeyNotUtf8 { .. } => "key_not_utf8",
            DecodeError::UnknownKey { .. } => "unknown_key",
            DecodeError::Value { .. } => "value",
        }
    }
}

/// Configuration of the index.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    pub keys: Keys,
    /// Events kept for resuming streams.
    pub history_events: usize,
    /// Batches buffered per subscriber before it is cut off as slow.
    pub subscriber_buffer: usize,
    /// Keys per page when listing etcd.
    pub list_page_size: i64,
    /// How often the feeder asks etcd for a progress notification when idle; the revision
    /// it returns feeds the streams' heartbeats. A watch silent for 3 intervals after such
    /// a request is considered broken and re-established.
    pub progress_interval: Duration,
    /// Backoff bounds for re-establishing the etcd watch.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl IndexConfig {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            history_events: 100_000,
            subscriber_buffer: 1024,
            list_page_size: 5_000,
            progress_interval: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// One object's identity in the index. Ordered by cluster, then kind in the order of
/// `pb::Kind` (config, nodes, identities, endpoints, services: the order a consumer
/// applies a snapshot in), then name. The cluster name is shared by every key and
/// object of that cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub cluster: Arc<str>,
    pub kind: i32,
    pub name: String,
}

/// One object (or its delete) as the index stores it and fans it out: what streams
/// filter on, and the `pb::Event` encoded once. Streams copy these bytes into their
/// messages; nothing is decoded, cloned or re-encoded per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obj {
    pub cluster: Arc<str>,
    pub kind: i32,
    /// etcd mod revision of this change.
    pub revision: i64,
    /// A service's `shared` flag (`None`: not a service), for the gRPC edge: a peer sees a
    /// non-shared service as absent (`mesh_core::select::service_presented`).
    pub service_shared: Option<bool>,
    /// A delete: the event has no value.
    pub deleted: bool,
    /// The encoded `pb::Event` (kind, cluster, name, revision, value).
    pub wire: Box<[u8]>,
}

impl Obj {
    /// Encodes the event of `key` at `revision` (`None`: a delete).
    pub fn new(key: &ObjKey, revision: i64, value: Option<pb::event::Value>) -> Self {
        let service_shared = match &value {
            Some(pb::event::Value::Service(s)) => Some(s.shared),
            _ => None,
        };
        let deleted = value.is_none();
        let ev = pb::Event {
            kind: key.kind,
            cluster: key.cluster.to_string(),
            name: key.name.clone(),
            revision,
            value,
        };
        Obj {
            cluster: key.cluster.clone(),
            kind: key.kind,
            revision,
            service_shared,
            deleted,
            wire: ev.encode_to_vec().into_boxed_slice(),
        }
    }

    /// The event, decoded from the stored bytes (status, tests and the rare paths that
    /// need a field; never the fan-out).
    pub fn event(&self) -> pb::Event {
        // The bytes were encoded by `Obj::new` from a valid event: decoding cannot fail
        // short of memory corruption, and an empty event is the only sane fallback.
        pb::Event::decode(&*self.wire).unwrap_or_default()
    }

    /// The object's name within (cluster, kind).
    pub fn name(&self) -> String {
        self.event().name
    }
}

/// One change as fanned out to subscribers.
#[derive(Debug, Clone)]
pub enum Change {
    /// An upsert, or a delete, encoded once.
    Object(Arc<Obj>),
    /// The synced marker of `(cluster, kind)` appeared.
    Synced { cluster: String, kind: Kind },
}

/// The changes of one etcd watch response (or of a re-list diff), at `revision`.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The highest revision the index has applied once this batch is applied.
    pub revision: i64,
    pub changes: Vec<Change>,
}

/// A raw etcd event (from a watch response or a list).
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub key: Vec<u8>,
    /// `None` for a delete.
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
}

/// Why a subscriber gets a fresh snapshot instead of resuming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The requested revision is older than the oldest one the history can resume from.
    TooOld { requested: i64, oldest: i64 },
    /// The requested revision is newer than the index (etcd was restored or replaced).
    Ahead { requested: i64, current: i64 },
    /// The requested revision is older than the history and etcd could not be read at it
    /// (compacted, or etcd failed), so the difference cannot be computed.
    Unreadable {
        requested: i64,
        oldest: i64,
        error: String,
    },
}

impl ResetReason {
    pub fn label(&self) -> &'static str {
        match self {
            ResetReason::TooOld { .. } => "too_old",
            ResetReason::Ahead { .. } => "ahead",
            ResetReason::Unreadable { .. } => "compacted",
        }
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::TooOld { requested, oldest } => write!(
                f,
                "resume revision {requested} is older than the server's history (oldest resumable revision {oldest})"
            ),
            ResetReason::Ahead { requested, current } => write!(
                f,
                "resume revision {requested} is ahead of the server's revision {current} (etcd was replaced or restored)"
            ),
            ResetReason::Unreadable {
                requested,
                oldest,
                error,
            } => write!(
                f,
                "resume revision {requested} is older than the server's history (oldest resumable revision {oldest}) and etcd cannot be read at it: {error}"
            ),
        }
    }
}

/// A consistent copy of the index at `revision`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    /// Objects in `ObjKey` order.
    pub objects: Vec<Arc<Obj>>,
    /// `(cluster, kind)` whose synced marker exists at `revision`.
    pub synced: Vec<(String, Kind)>,
}

/// How a subscription starts.
#[derive(Debug)]
pub enum Start {
    /// A full snapshot; `reset` is set when the subscriber asked to resume and could not.
    Snapshot {
        snapshot: Snapshot,
        reset: Option<ResetReason>,
    },
    /// The batches after the requested revision, then the synced markers that exist now.
    Resume {
        from: i64,
        missed: Vec<Arc<Batch>>,
        synced: Vec<(String, Kind)>,
        revision: i64,
    },
}

/// Which objects a subscriber wants in its snapshot.
pub type Filter<'a> = &'a (dyn Fn(&str, Kind) -> bool + Sync);

/// What a subscription's next update is.
#[derive(Debug)]
pub enum Update {
    Batch(Arc<Batch>),
    /// The subscriber fell behind (its buffer was full) and was cut from live delivery;
    /// it must subscribe again with its last revision.
    Lagged,
    /// The index shut down.
    Closed,
}

/// A live subscription.
#[derive(Debug)]
pub struct Subscription {
    pub start: Start,
    rx: mpsc::Receiver<Arc<Batch>>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    /// The next batch; `Lagged` once the index cut this subscriber off.
    pub async fn next(&mut self) -> Update {
        match self.rx.recv().await {
            Some(b) => Update::Batch(b),
            None if self.lagged.load(Ordering::Acquire) => Update::Lagged,
            None => Update::Closed,
        }
    }

    /// The next batch if one is already queued (to coalesce a backlog).
    pub fn try_next(&mut self) -> Option<Arc<Batch>> {
        self.rx.try_recv().ok()
    }
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Arc<Batch>>,
    lagged: Arc<AtomicBool>,
}

/// The synchronous index. One writer (the feeder), many readers (`subscribe`, `status`).
#[derive(Debug)]
pub struct State {
    keys: Keys,
    metrics: Metrics,
    history_limit: usize,
    subscriber_buffer: usize,
    loaded: bool,
    revision: i64,
    objects: BTreeMap<ObjKey, Arc<Obj>>,
    /// Every cluster name seen, shared by the keys and objects of that cluster.
    cluster_names: BTreeSet<Arc<str>>,
    synced: BTreeMap<(String, i32), i64>,
    counts: HashMap<(Arc<str>, i32), u64>,
    history: VecDeque<Arc<Batch>>,
    history_len: usize,
    /// The oldest revision a subscriber can resume from: every change after it is in
    /// `history`.
    history_start: i64,
    subscribers: Vec<Subscriber>,
}

/// Counts of one cluster, for `Status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    /// `(kind, count, synced)` for every kind.
    pub kinds: Vec<(Kind, u64, bool)>,
    /// The id from the cluster's config, if known.
    pub id: Option<u32>,
}

fn kind_name(kind: Kind) -> &'static str {
    mesh_proto::keys::kind_segment(kind).unwrap_or("unspecified")
}

fn kind_of(k: i32) -> Kind {
    Kind::try_from(k).unwrap_or(Kind::Unspecified)
}

enum Decoded {
    Object {
        cluster: String,
        kind: Kind,
        name: String,
        value: Option<pb::event::Value>,
    },
    Synced(String, Kind),
}

/// A full list of the clusters prefix, decoded page by page (the raw pages are dropped
/// as soon as they are decoded), before [`State::reset_listed`] swaps it in.
#[derive(Debug, Default)]
pub struct Listing {
    objects: BTreeMap<ObjKey, Arc<Obj>>,
    synced: BTreeMap<(String, i32), i64>,
}

fn decode_value(kind: Kind, key: &str, v: &[u8]) -> Result<pb::event::Value, DecodeError> {
    use pb::event::Value;
    let err = |kind_name: &'static str| {
        move |source| DecodeError::Value {
            key: key.to_owned(),
            kind: kind_name,
            source,
        }
    };
    Ok(match kind {
        Kind::Config => Value::Config(pb::ClusterConfig::decode(v).map_err(err("ClusterConfig"))?),
        Kind::Node => Value::Node(pb::Node::decode(v).map_err(err("Node"))?),
        Kind::Identity => Value::Identity(pb::Identity::decode(v).map_err(err("Identity"))?),
        Kind::Endpoint => Value::Endpoint(pb::Endpoint::decode(v).map_err(err("Endpoint"))?),
        Kind::Service => {
            Value::Service(pb::GlobalService::decode(v).map_err(err("GlobalService"))?)
        }
        Kind::Policy => Value::Policy(pb::Policy::decode(v).map_err(err("Policy"))?),
        Kind::Unspecified => {
            return Err(DecodeError::UnknownKey {
                key: key.to_owned(),
            });
        }
    })
}

// === impl State ===

impl State {
    pub fn new(cfg: &IndexConfig, metrics: Metrics) -> Self {
        Self {
            keys: cfg.keys.clone(),
            metrics,
            history_limit: cfg.history_events,
            subscriber_buffer: cfg.subscriber_buffer.max(1),
            loaded: false,
            revision: 0,
            objects: BTreeMap::new(),
            cluster_names: BTreeSet::new(),
            synced: BTreeMap::new(),
            counts: HashMap::new(),
            history: VecDeque::new(),
            history_len: 0,
            history_start: 0,
            subscribers: Vec::new(),
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn history_start(&self) -> i64 {
        self.history_start
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.len()
    }

    /// The current object at `(cluster, kind, name)`.
    pub fn get(&self, cluster: &str, kind: Kind, name: &str) -> Option<Arc<Obj>> {
        self.objects
            .get(&ObjKey {
                cluster: cluster.into(),
                kind: kind as i32,
                name: name.into(),
            })
            .cloned()
    }

    /// Decodes one raw event. Errors name the key; the caller logs and skips.
    fn decode(&self, raw: &RawEvent) -> Result<Decoded, DecodeError> {
        let key = std::str::from_utf8(&raw.key).map_err(|_| DecodeError::KeyNotUtf8 {
            key: String::from_utf8_lossy(&raw.key).into_owned(),
        })?;
        match self.keys.parse(key) {
            None => Err(DecodeError::UnknownKey { key: key.into() }),
            Some(ClusterKey::Synced { cluster, kind }) => Ok(Decoded::Synced(cluster, kind)),
            Some(ClusterKey::Object {
                cluster,
                kind,
                name,
            }) => {
                let value = match &raw.value {
                    None => None,
                    Some(v) => Some(decode_value(kind, key, v)?),
                };
                Ok(Decoded::Object {
                    cluster,
                    kind,
                    name,
                    value,
                })
            }
        }
    }

    /// The key of `(cluster, kind, name)`, the cluster name shared with every other key
    /// of that cluster.
    fn key(&mut self, cluster: String, kind: Kind, name: String) -> ObjKey {
        let cluster = match self.cluster_names.get(cluster.as_str()) {
            Some(c) => c.clone(),
            None => {
                let c: Arc<str> = cluster.into();
                self.cluster_names.insert(c.clone());
                c
            }
        };
        ObjKey {
            cluster,
            kind: kind as i32,
            name,
        }
    }

    fn skip(&self, err: &DecodeError) {
        warn!(error = %err, "skipping an undecodable entry under clusters/");
        Metrics::inc_reason(&self.metrics.decode_errors, err.reason());
    }

    fn count(&mut self, key: &ObjKey, delta: i64) {
        let c = self
            .counts
            .entry((key.cluster.clone(), key.kind))
            .or_default();
        *c = c.saturating_add_signed(delta);
        let v = *c;
        self.metrics
            .index_objects
            .get_or_create(&ClusterKindLabels {
                cluster: key.cluster.to_string(),
                kind: kind_name(kind_of(key.kind)).into(),
            })
            .set(v as i64);
    }

    fn event(key: &ObjKey, revision: i64, value: Option<pb::event::Value>) -> Arc<Obj> {
        Arc::new(Obj::new(key, revision, value))
    }

    /// Puts or deletes one object; returns the change when something changed.
    fn set(
        &mut self,
        key: ObjKey,
        revision: i64,
        value: Option<pb::event::Value>,
    ) -> Option<Change> {
        let span = tracing::trace_span!("apply", cluster = %key.cluster, kind = kind_name(kind_of(key.kind)), name = %key.name, revision);
        let _e = span.enter();
        match value {
            Some(value) => {
                let ev = Self::event(&key, revision, Some(value));
                if self.objects.insert(key.clone(), ev.clone()).is_none() {
                    self.count(&key, 1);
                }
                Some(Change::Object(ev))
            }
            None => {
                self.objects.remove(&key)?;
                self.count(&key, -1);
                Some(Change::Object(Self::event(&key, revision, None)))
            }
        }
    }

    /// Applies the events of one etcd watch response as one batch.
    pub fn apply(&mut self, events: Vec<RawEvent>) {
        let revision = events
            .iter()
            .map(|e| e.mod_revision)
            .max()
            .unwrap_or(self.revision)
            .max(self.revision);
        let mut changes = Vec::with_capacity(events.len());
        for raw in events {
            match self.decode(&raw) {
                Ok(Decoded::Object {
                    cluster,
                    kind,
                    name,
                    value,
                }) => {
                    let key = self.key(cluster, kind, name);
                    if let Some(c) = self.set(key, raw.mod_revision, value) {
                        changes.push(c);
                    }
                }
                Ok(Decoded::Synced(cluster, kind)) => {
                    let k = (cluster, kind as i32);
                    if raw.value.is_some() {
                        if !self.synced.contains_key(&k) {
                            self.synced.insert(k.clone(), raw.mod_revision);
                            changes.push(Change::Synced { cluster: k.0, kind });
                        }
                    } else {
                        self.synced.remove(&k);
                    }
                }
                Err(err) => {
                    self.skip(&err);
                    // A key that held a valid value and now holds garbage: the old value
                    // is no longer what etcd says, so it is withdrawn rather than kept.
                    if let DecodeError::Value { key, .. } = &err
                        && let Some(ClusterKey::Object {
                            cluster,
                            kind,
                            name,
                        }) = self.keys.parse(key)
                    {
                        let k = self.key(cluster, kind, name);
                        if let Some(c) = self.set(k, raw.mod_revision, None) {
                            changes.push(c);
                        }
                    }
                }
            }
        }
        self.publish(revision, changes);
    }

    /// A progress notification: every change up to `revision` has been applied.
    pub fn advance(&mut self, revision: i64) {
        if revision > self.revision {
            self.publish(revision, Vec::new());
        }
    }

    /// Replaces the whole state with a list taken at `revision`. The first call loads the
    /// index; later calls (after a compaction) diff the list against the index and publish
    /// the difference, deletes included, as one batch at `revision`.
    pub fn reset(&mut self, revision: i64, kvs: Vec<RawEvent>) {
        let mut listing = Listing::default();
        self.list_page(&mut listing, kvs);
        self.reset_listed(revision, listing);
    }

    /// Decodes one page of a list into `listing` (see [`State::reset_listed`]).
    pub fn list_page(&mut self, listing: &mut Listing, kvs: Vec<RawEvent>) {
        for raw in kvs {
            match self.decode(&raw) {
                Ok(Decoded::Object {
                    cluster,
                    kind,
                    name,
                    value: Some(value),
                }) => {
                    let key = self.key(cluster, kind, name);
                    let obj = Self::event(&key, raw.mod_revision, Some(value));
                    listing.objects.insert(key, obj);
                }
                Ok(Decoded::Object { value: None, .. }) => {}
                Ok(Decoded::Synced(cluster, kind)) => {
                    listing
                        .synced
                        .insert((cluster, kind as i32), raw.mod_revision);
                }
                Err(err) => self.skip(&err),
            }
        }
    }

    /// [`State::reset`] with a list decoded by [`State::list_page`].
    pub fn reset_listed(&mut self, revision: i64, listing: Listing) {
        self.metrics.etcd_relists.inc();
        let Listing { objects, synced } = listing;

        if !self.loaded || revision < self.revision {
            if self.loaded {
                // etcd went back in time (restored or replaced): nothing in the history
                // is valid any more. Every subscriber is cut off; they come back with a
                // revision ahead of ours and get a reset.
                warn!(
                    revision,
                    index_revision = self.revision,
                    "etcd revision went backwards; resetting every stream"
                );
                for s in self.subscribers.drain(..) {
                    s.lagged.store(true, Ordering::Release);
                }
                self.history.clear();
                self.history_len = 0;
            }
            for key in self.objects.keys().cloned().collect::<Vec<_>>() {
                self.count(&key, -1);
            }
            self.objects = objects;
            for key in self.objects.keys().cloned().collect::<Vec<_>>() {
                self.count(&key, 1);
            }
            self.synced = synced;
            self.revision = revision;
            self.history_start = revision;
            self.loaded = true;
            self.metrics.index_revision.set(revision);
            info!(revision, objects = self.objects.len(), "index loaded");
            return;
        }

        let mut changes = Vec::new();
        let vanished: Vec<ObjKey> = self
            .objects
            .keys()
            .filter(|k| !objects.contains_key(*k))
            .cloned()
            .collect();
        for key in vanished {
            if let Some(c) = self.set(key, revision, None) {
                changes.push(c);
            }
        }
        for (key, ev) in objects {
            let same = self
                .objects
                .get(&key)
                .is_some_and(|old| old.revision == ev.revision);
            if !same {
                if self.objects.insert(key.clone(), ev.clone()).is_none() {
                    self.count(&key, 1);
                }
                changes.push(Change::Object(ev));
            }
        }
        for (k, rev) in &synced {
            if !self.synced.contains_key(k) {
                changes.push(Change::Synced {
                    cluster: k.0.clone(),
                    kind: kind_of(k.1),
                });
            }
            let _ = rev;
        }
        self.synced = synced;
        info!(
            revision,
            changes = changes.len(),
            "index re-listed after compaction"
        );
        self.publish(revision, changes);
    }

    /// Records a batch in the history and fans it out. Never blocks: a subscriber whose
    /// buffer is full is cut off and told it lagged.
    fn publish(&mut self, revision: i64, changes: Vec<Change>) {
        self.revision = revision;
        self.metrics.index_revision.set(revision);
        let batch = Arc::new(Batch { revision, changes });
        if !batch.changes.is_empty() {
            self.history_len += batch.changes.len();
            self.history.push_back(batch.clone());
            while self.history_len > self.history_limit {
                let Some(old) = self.history.pop_front() else {
                    break;
                };
                self.history_len -= old.changes.len();
                self.history_start = old.revision;
            }
            self.metrics.history_events.set(self.history_len as i64);
        }
        let metrics = &self.metrics;
        self.subscribers
            .retain(|s| match s.tx.try_send(batch.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lagged.store(true, Ordering::Release);
                    metrics.slow_client_drops.inc();
                    debug!(revision, "subscriber fell behind; cut from live delivery");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn synced_for(&self, filter: Filter<'_>) -> Vec<(String, Kind)> {
        self.synced
            .keys()
            .map(|(c, k)| (c.clone(), kind_of(*k)))
            .filter(|(c, k)| filter(c, *k))
            .collect()
    }

    /// A snapshot of the objects `filter` accepts.
    pub fn snapshot(&self, filter: Filter<'_>) -> Snapshot {
        Snapshot {
            revision: self.revision,
            objects: self
                .objects
                .iter()
                .filter(|(k, _)| filter(&k.cluster, kind_of(k.kind)))
                .map(|(_, v)| v.clone())
                .collect(),
            synced: self.synced_for(filter),
        }
    }

    /// Starts a subscription: from `resume_revision` when the history still holds
    /// everything after it, else from a snapshot (with a reset reason when a resume was
    /// asked for). Registration and snapshot happen under the same borrow, so no change is
    /// lost or duplicated between them.
    pub fn subscribe(&mut self, resume_revision: i64, filter: Filter<'_>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let start = if resume_revision <= 0 {
            Start::Snapshot {
                snapshot: self.snapshot(filter),
                reset: None,
            }
        } else if resume_revision > self.revision {
            Start::Snapshot {
                snapshot: self.snapshot(filter),
                reset: Some(ResetReason::Ahead {
                    requested: resume_revision,
                    current: self.revision,
                }),
            }
        } else if resume_revision < self.history_start {
            Start::Snapshot {
                snapshot: self.snapshot(filter),
                reset: Some(ResetReason::TooOld {
                    requested: resume_revision,
                    oldest: self.history_start,
                }),
            }
        } else {
            // History is in revision order: skip what the subscriber has.
            let first = self
                .history
                .partition_point(|b| b.revision <= resume_revision);
            Start::Resume {
                from: resume_revision,
                missed: self.history.range(first..).cloned().collect(),
                synced: self.synced_for(filter),
                revision: self.revision,
            }
        };
        self.subscribers.push(Subscriber {
            tx,
            lagged: lagged.clone(),
        });
        Subscription { start, rx, lagged }
    }

    /// Whether a subscriber resuming at `resume_revision` needs the difference computed
    /// from etcd: it is older than the history but not ahead of the index.
    pub fn needs_diff(&self, resume_revision: i64) -> bool {
        resume_revision > 0
            && resume_revision < self.history_start
            && resume_revision <= self.revision
    }

    /// Starts a subscription for a subscriber at `from`, older than the history, given
    /// the keys (and their mod revisions) etcd held at `from` (`keys_at_from`, a historical
    /// keys-only read). The subscriber gets one ordinary batch at the current revision:
    /// a delete for every key it had that no longer exists, an upsert for every object
    /// written after `from`; then live batches. Registration and diff happen under the
    /// same borrow, like [`State::subscribe`]. Falls back to `subscribe` when the history
    /// covers `from` after all or `from` is ahead.
    pub fn subscribe_diff(
        &mut self,
        from: i64,
        keys_at_from: &[(Vec<u8>, i64)],
        filter: Filter<'_>,
    ) -> Subscription {
        if !self.needs_diff(from) {
            return self.subscribe(from, filter);
        }
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut changes = Vec::new();
        let mut before = BTreeSet::new();
        for (key, _) in keys_at_from {
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            if let Some(ClusterKey::Object {
                cluster,
                kind,
                name,
            }) = self.keys.parse(key)
                && filter(&cluster, kind)
            {
                let k = ObjKey {
                    cluster: cluster.into(),
                    kind: kind as i32,
                    name,
                };
                if !self.objects.contains_key(&k) {
                    changes.push(Change::Object(Self::event(&k, self.revision, None)));
                }
                before.insert(k);
            }
        }
        for (k, ev) in &self.objects {
            if filter(&k.cluster, kind_of(k.kind)) && ev.revision > from {
                changes.push(Change::Object(ev.clone()));
            }
        }
        info!(
            from,
            revision = self.revision,
            keys_at_from = before.len(),
            changes = changes.len(),
            "resuming from etcd's history: sending the difference"
        );
        let batch = Arc::new(Batch {
            revision: self.revision,
            changes,
        });
        let start = Start::Resume {
            from,
            missed: vec![batch],
            synced: self.synced_for(filter),
            revision: self.revision,
        };
        self.subscribers.push(Subscriber {
            tx,
            lagged: lagged.clone(),
        });
        Subscription { start, rx, lagged }
    }

    /// Whether the index holds exactly the objects (same mod revisions) and synced markers
    /// of `keys` (a keys-only listing of the clusters prefix). Keys of an unknown shape are
    /// ignored; a key whose value the index could not decode makes it a mismatch.
    pub fn matches_keys(&self, keys: &[(Vec<u8>, i64)]) -> bool {
        let mut objects = 0usize;
        let mut synced = BTreeSet::new();
        for (key, mod_revision) in keys {
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            match self.keys.parse(key) {
                None => {}
                Some(ClusterKey::Synced { cluster, kind }) => {
                    synced.insert((cluster, kind as i32));
                }
                Some(ClusterKey::Object {
                    cluster,
                    kind,
                    name,
                }) => {
                    let k = ObjKey {
                        cluster: cluster.into(),
                        kind: kind as i32,
                        name,
                    };
                    match self.objects.get(&k) {
                        Some(ev) if ev.revision == *mod_revision => objects += 1,
                        _ => return false,
                    }
                }
            }
        }
        objects == self.objects.len() && synced.iter().eq(self.synced.keys())
    }

    /// Per-cluster counts and synced flags, for `Status`.
    pub fn counts(&self) -> BTreeMap<String, ClusterCounts> {
        let mut clusters: BTreeSet<&str> = self.counts.keys().map(|(c, _)| &**c).collect();
        clusters.extend(self.synced.keys().map(|(c, _)| c.as_str()));
        clusters
            .into_iter()
            .map(|c| {
                let kinds = mesh_proto::keys::PUBLISHED_KINDS
                    .iter()
                    .map(|k| {
                        let key = (c.to_owned(), *k as i32);
                        let count = self
                            .counts
                            .get(&(Arc::from(c), *k as i32))
                            .copied()
                            .unwrap_or(0);
                        (*k, count, self.synced.contains_key(&key))
                    })
                    .collect();
                let id = self
                    .get(c, Kind::Config, "")
                    .and_then(|obj| match obj.event().value {
                        Some(pb::event::Value::Config(cfg)) => Some(cfg.id),
                        _ => None,
                    });
                (c.to_owned(), ClusterCounts { kinds, id })
            })
            .collect()
    }

    /// Drops every subscriber (shutdown).
    fn close(&mut self) {
        self.subscribers.clear();
    }
}

/// A cheap handle on the shared index.
#[derive(Debug, Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    loaded: watch::Sender<bool>,
    revision: watch::Sender<i64>,
    etcd_ok: AtomicBool,
}

// === impl Index ===

impl Index {
    /// An index not fed by etcd (tests feed it through `with_state`).
    pub fn new(cfg: &IndexConfig, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(cfg, metrics)),
                loaded: watch::channel(false).0,
                revision: watch::channel(0).0,
                etcd_ok: AtomicBool::new(false),
            }),
        }
    }

    /// Creates the index and spawns the task that feeds it from one etcd watch until
    /// `shutdown`.
    pub fn start(
        etcd: etcd_client::Client,
        cfg: IndexConfig,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let index = Self::new(&cfg, metrics.clone());
        let feeder = Feeder {
            index: index.clone(),
            etcd,
            prefix: cfg.keys.clusters_prefix(),
            cfg,
            metrics,
            shutdown,
        };
        let task = tokio::spawn(feeder.run().instrument(info_span!("index_feeder")));
        (index, task)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across an await or a panic-prone call; a poisoned lock
        // would mean a bug in the index itself, which is unrecoverable.
        self.inner.state.lock().expect("index lock poisoned")
    }

    /// Runs `f` with the state (tests, status).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let was_loaded = st.loaded;
        let r = f(&mut st);
        let rev = st.revision;
        let loaded = st.loaded;
        drop(st);
        self.inner.revision.send_if_modified(|r| {
            let changed = *r != rev;
            *r = rev;
            changed
        });
        if loaded && !was_loaded {
            self.inner.loaded.send_replace(true);
        }
        r
    }

    /// Waits until the index has applied `revision`.
    pub async fn wait_revision(&self, revision: i64) -> Result<()> {
        let mut rx = self.inner.revision.subscribe();
        rx.wait_for(|r| *r >= revision)
            .await
            .map_err(|_| Error::Shutdown)?;
        Ok(())
    }

    /// Waits until the first list has been loaded.
    pub async fn wait_loaded(&self) -> Result<()> {
        let mut rx = self.inner.loaded.subscribe();
        rx.wait_for(|l| *l).await.map_err(|_| Error::Shutdown)?;
        Ok(())
    }

    pub fn is_loaded(&self) -> bool {
        *self.inner.loaded.borrow()
    }

    /// Whether the feeder's etcd watch is currently established.
    pub fn etcd_connected(&self) -> bool {
        self.inner.etcd_ok.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Subscribes once the index is loaded. See [`State::subscribe`].
    pub async fn subscribe(
        &self,
        resume_revision: i64,
        filter: Filter<'_>,
    ) -> Result<Subscription> {
        self.wait_loaded().await?;
        Ok(self.lock().subscribe(resume_revision, filter))
    }

    pub fn counts(&self) -> BTreeMap<String, ClusterCounts> {
        self.lock().counts()
    }

    /// Subscribes like [`Index::subscribe`], except that a subscriber older than the
    /// history is resumed with the difference between etcd at its revision (a keys-only
    /// historical read of `prefixes`) and the index now, instead of a reset and a
    /// snapshot. Only when etcd cannot be read at that revision (compacted) does it get
    /// `Reset` ([`ResetReason::Unreadable`]).
    pub async fn subscribe_resuming(
        &self,
        etcd: &etcd_client::Client,
        prefixes: &[String],
        page_size: i64,
        resume_revision: i64,
        filter: Filter<'_>,
    ) -> Result<Subscription> {
        self.wait_loaded().await?;
        {
            let mut st = self.lock();
            if !st.needs_diff(resume_revision) {
                return Ok(st.subscribe(resume_revision, filter));
            }
        }
        let mut keys = Vec::new();
        let mut failure = None;
        for prefix in prefixes {
            match read_keys_at(etcd, prefix, resume_revision, page_size).await {
                Ok(mut k) => keys.append(&mut k),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let mut st = self.lock();
        Ok(match failure {
            None => st.subscribe_diff(resume_revision, &keys, filter),
            Some(error) => {
                let mut sub = st.subscribe(resume_revision, filter);
                if let Start::Snapshot {
                    reset: reset @ Some(ResetReason::TooOld { .. }),
                    ..
                } = &mut sub.start
                {
                    let oldest = st.history_start;
                    *reset = Some(ResetReason::Unreadable {
                        requested: resume_revision,
                        oldest,
                        error: error.to_string(),
                    });
                }
                sub
            }
        })
    }
}

/// The keys (with their mod revisions) under `prefix` at `revision`, read keys-only in
/// pages. Fails when etcd compacted past `revision`.
pub async fn read_keys_at(
    etcd: &etcd_client::Client,
    prefix: &str,
    revision: i64,
    page_size: i64,
) -> Result<Vec<(Vec<u8>, i64)>, etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut kv = etcd.kv_client();
    let mut start = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(page_size.max(1))
            .with_keys_only()
            .with_revision(revision);
        let resp = kv.get(start.clone(), Some(opts)).await?;
        let more = resp.more();
        out.extend(
            resp.kvs()
                .iter()
                .map(|kv| (kv.key().to_vec(), kv.mod_revision())),
        );
        match (more, out.last()) {
            (true, Some((last, _))) => {
                let mut next = last.clone();
                next.push(0);
                start = next;
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Feeds the index from etcd: list at R, watch from R+1, re-establish with backoff,
/// re-list on compaction.
struct Feeder {
    index: Index,
    etcd: etcd_client::Client,
    prefix: String,
    cfg: IndexConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
}

enum WatchEnd {
    Compacted(i64),
    Shutdown,
}

/// The first key after every key with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

// === impl Feeder ===

impl Feeder {
    async fn run(mut self) {
        // Equal jitter: the feeder retries its own etcd, keeping a floor between attempts.
        let mut backoff =
            Backoff::equal_jitter(self.cfg.backoff_min, self.cfg.backoff_max).retries();
        let mut need_list = true;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            if need_list {
                match self.list().await {
                    Ok((rev, listing)) => {
                        self.index.with_state(|st| st.reset_listed(rev, listing));
                        need_list = false;
                    }
                    Err(error) => {
                        self.inner_etcd_ok(false);
                        warn!(%error, "listing etcd failed; retrying");
                        if self.sleep(backoff.next_delay(rand::random())).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let from = self.index.revision() + 1;
            match self.watch(from, &mut backoff).await {
                Ok(WatchEnd::Shutdown) => break,
                Ok(WatchEnd::Compacted(rev)) => {
                    Metrics::inc_reason(&self.metrics.etcd_watch_restarts, "compacted");
                    warn!(
                        from,
                        compact_revision = rev,
                        "etcd compacted past the index revision; re-listing"
                    );
                    need_list = true;
                }
                Err(error) => {
                    self.inner_etcd_ok(false);
                    let reason = match error {
                        Error::WatchClosed => "closed",
                        Error::WatchCanceled { .. } => "canceled",
                        Error::WatchStalled(_) => "stalled",
                        _ => "error",
                    };
                    Metrics::inc_reason(&self.metrics.etcd_watch_restarts, reason);
                    warn!(%error, from, "etcd watch broke; re-establishing");
                    if self.sleep(backoff.next_delay(rand::random())).await {
                        break;
                    }
                }
            }
        }
        self.index.with_state(|st| st.close());
        info!("index feeder stopped");
    }

    fn inner_etcd_ok(&self, ok: bool) {
        self.index.inner.etcd_ok.store(ok, Ordering::Release);
    }

    /// Sleeps unless shut down first; returns true on shutdown.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    /// Lists the clusters prefix at one revision, in pages, each decoded as it arrives.
    async fn list(&mut self) -> Result<(i64, Listing)> {
        let end = prefix_end(self.prefix.as_bytes());
        let mut kv = self.etcd.kv_client();
        let mut start = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut listing = Listing::default();
        let mut keys = 0usize;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(self.cfg.list_page_size);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp =
                kv.get(start.clone(), Some(opts))
                    .await
                    .map_err(|source| Error::List {
                        prefix: self.prefix.clone(),
                        source,
                    })?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let last = kvs.last().map(|k| k.key().to_vec());
            keys += kvs.len();
            let page = kvs
                .into_iter()
                .map(|kv| {
                    let mod_revision = kv.mod_revision();
                    let (key, value) = kv.into_key_value();
                    RawEvent {
                        key,
                        value: Some(value),
                        mod_revision,
                    }
                })
                .collect();
            self.index.lock().list_page(&mut listing, page);
            match (more, last) {
                (true, Some(mut last)) => {
                    last.push(0);
                    start = last;
                }
                _ => break,
            }
        }
        self.inner_etcd_ok(true);
        debug!(revision, keys, "listed etcd");
        Ok((revision, listing))
    }

    /// Watches from `from` until the watch breaks (Err), etcd compacted past `from`, or
    /// shutdown.
    async fn watch(&mut self, from: i64, backoff: &mut Retries) -> Result<WatchEnd> {
        let werr = |source| Error::Watch {
            prefix: self.prefix.clone(),
            from,
            source,
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream = self
            .etcd
            .watch_client()
            .watch(self.prefix.clone(), Some(opts))
            .await
            .map_err(werr)?;
        let mut tick = tokio::time::interval(self.cfg.progress_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // Progress requests sent since the last response; 3 unanswered = stalled.
        let mut unanswered = 0u32;
        // etcd 3.4 answers a progress request with its current revision even while this
        // watch is still replaying older events (etcd-io/etcd#15220). A watch created at
        // etcd revision T that starts at or before T is replaying until an event at T or
        // later arrives, or until a keys-only read at T shows the index already holds
        // exactly etcd's state at T; until then progress answers are not applied, so the
        // index revision never runs ahead of what it holds.
        let mut replay_until: Option<i64> = None;
        // After such a check passed, replayed events at or before this revision are
        // already reflected in the index and are skipped.
        let mut skip_through = 0i64;
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(WatchEnd::Shutdown),
                _ = tick.tick() => {
                    if unanswered >= 3 {
                        return Err(Error::WatchStalled(self.cfg.progress_interval * 3));
                    }
                    unanswered += 1;
                    stream.request_progress().await.map_err(werr)?;
                    continue;
                }
                msg = stream.message() => msg.map_err(werr)?,
            };
            unanswered = 0;
            let Some(resp) = msg else {
                return Err(Error::WatchClosed);
            };
            if resp.compact_revision() > 0 {
                return Ok(WatchEnd::Compacted(resp.compact_revision()));
            }
            if resp.canceled() {
                return Err(Error::WatchCanceled {
                    reason: resp.cancel_reason().to_owned(),
                });
            }
            if resp.created() {
                self.inner_etcd_ok(true);
                backoff.reset();
                let created_at = resp.header().map(|h| h.revision()).unwrap_or(0);
                if created_at >= from {
                    replay_until = Some(created_at);
                }
                debug!(from, created_at, "etcd watch established");
                if resp.events().is_empty() {
                    continue;
                }
            }
            if resp.events().is_empty() {
                let Some(rev) = resp.header().map(|h| h.revision()) else {
                    continue;
                };
                match replay_until {
                    // A progress notification on a watch past its replay: every event up
                    // to the header revision has been delivered.
                    None => self.index.with_state(|st| st.advance(rev)),
                    Some(target) => {
                        if self.holds_state_at(target).await {
                            debug!(target, "the index holds etcd's state; replay is over");
                            self.index.with_state(|st| st.advance(target));
                            skip_through = target;
                            replay_until = None;
                        } else {
                            debug!(
                                target,
                                progress = rev,
                                "progress answer during replay not applied"
                            );
                        }
                    }
                }
                continue;
            }
            if let Some(target) = replay_until
                && resp
                    .events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .any(|kv| kv.mod_revision() >= target)
            {
                replay_until = None;
            }
            let events: Vec<RawEvent> = resp
                .events()
                .iter()
                .filter(|e| e.kv().is_some_and(|kv| kv.mod_revision() > skip_through))
                .filter_map(|e| {
                    let kv = e.kv()?;
                    Some(RawEvent {
                        key: kv.key().to_vec(),
                        value: match e.event_type() {
                            EventType::Put => Some(kv.value().to_vec()),
                            EventType::Delete => None,
                        },
                        mod_revision: kv.mod_revision(),
                    })
                })
                .collect();
            if !events.is_empty() {
                self.index.with_state(|st| st.apply(events));
            }
        }
    }

    /// Whether the index holds exactly etcd's state of the clusters prefix at `revision`
    /// (keys and mod revisions, read keys-only). A failed read counts as no.
    async fn holds_state_at(&self, revision: i64) -> bool {
        match read_keys_at(&self.etcd, &self.prefix, revision, self.cfg.list_page_size).await {
            Ok(keys) => self.index.with_state(|st| st.matches_keys(&keys)),
            Err(error) => {
                debug!(%error, revision, "cannot check the index against etcd");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(history: usize, buffer: usize) -> IndexConfig {
        let mut c = IndexConfig::new(Keys::default());
        c.history_events = history;
        c.subscriber_buffer = buffer;
        c
    }

    fn node_put(cluster: &str, name: &str, rev: i64) -> RawEvent {
        let keys = Keys::default();
        RawEvent {
            key: keys.object(cluster, Kind::Node, name).into_bytes(),
            value: Some(
                pb::Node {
                    cluster: cluster.into(),
                    name: name.into(),
                    internal_ips: vec![format!("10.0.0.{rev}")],
                    pod_cidrs: vec![],
                }
                .encode_to_vec(),
            ),
            mod_revision: rev,
        }
    }

    fn del(cluster: &str, name: &str, rev: i64) -> RawEvent {
        RawEvent {
            key: Keys::default()
                .object(cluster, Kind::Node, name)
                .into_bytes(),
            value: None,
            mod_revision: rev,
        }
    }

    fn all(_: &str, _: Kind) -> bool {
        true
    }

    fn names(objs: &[Arc<Obj>]) -> Vec<String> {
        objs.iter().map(|e| e.name()).collect()
    }

    fn batch_of(u: Update) -> Arc<Batch> {
        match u {
            Update::Batch(b) => b,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn snapshot_then_live_batches() {
        let mut st = State::new(&cfg(100, 16), Metrics::default());
        st.reset(5, vec![node_put("a", "n1", 3), node_put("a", "n2", 5)]);
        let mut sub = st.subscribe(0, &all);
        let Start::Snapshot { snapshot, reset } = &sub.start else {
            panic!("expected a snapshot")
        };
        assert_eq!(reset, &None);
        assert_eq!(snapshot.revision, 5);
        assert_eq!(names(&snapshot.objects), ["n1", "n2"]);

        st.apply(vec![node_put("a", "n3", 6), del("a", "n1", 6)]);
        let b = batch_of(sub.next().await);
        assert_eq!(b.revision, 6);
        assert_eq!(b.changes.len(), 2, "one watch response is one batch");
        let Change::Object(ev) = &b.changes[1] else {
            panic!()
        };
        assert_eq!((ev.name().as_str(), ev.deleted), ("n1", true));
    }

    #[tokio::test]
    async fn resume_from_history_and_reset_when_too_old() {
        let mut st = State::new(&cfg(3, 16), Metrics::default());
        st.reset(1, vec![]);
        for rev in 2..=6 {
            st.apply(vec![node_put("a", &format!("n{rev}"), rev)]);
        }
        // History holds revisions 4, 5, 6: resumable from 3 on.
        assert_eq!(st.history_start(), 3);
        let sub = st.subscribe(4, &all);
        let Start::Resume { missed, .. } = &sub.start else {
            panic!("expected a resume, got {:?}", sub.start)
        };
        assert_eq!(
            missed.iter().map(|b| b.revision).collect::<Vec<_>>(),
            [5, 6]
        );

        let sub = st.subscribe(2, &all);
        let Start::Snapshot { reset, snapshot } = &sub.start else {
            panic!("expected a reset")
        };
        assert_eq!(
            reset,
            &Some(ResetReason::TooOld {
                requested: 2,
                oldest: 3
            })
        );
        assert_eq!(snapshot.objects.len(), 5);

        let sub = st.subscribe(99, &all);
        assert!(matches!(
            sub.start,
            Start::Snapshot {
                reset: Some(ResetReason::Ahead { .. }),
                ..
            }
        ));
    }

    fn key_at(cluster: &str, name: &str, rev: i64) -> (Vec<u8>, i64) {
        (
            Keys::default()
                .object(cluster, Kind::Node, name)
                .into_bytes(),
            rev,
        )
    }

    #[tokio::test]
    async fn a_subscriber_older_than_the_history_gets_the_difference_as_one_batch() {
        let mut st = State::new(&cfg(100, 16), Metrics::default());
        // Loaded at 20 (a restarted server): history starts at 20.
        st.reset(
            20,
            vec![
                node_put("a", "kept", 3),
                node_put("a", "changed", 12),
                node_put("a", "added", 15),
                node_put("b", "other", 18),
            ],
        );
        // What etcd held at revision 10.
        let at_10 = [
            key_at("a", "kept", 3),
            key_at("a", "changed", 5),
            key_at("a", "gone", 7),
            key_at("b", "other-gone", 8),
        ];
        assert!(st.needs_diff(10));
        let only_a = |c: &str, _: Kind| c == "a";
        let sub = st.subscribe_diff(10, &at_10, &only_a);
        let Start::Resume {
            from,
            missed,
            revision,
            ..
        } = &sub.start
        else {
            panic!("expected a resume, got {:?}", sub.start)
        };
        assert_eq!((*from, *revision), (10, 20));
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].revision, 20);
        let mut got: Vec<String> = missed[0]
            .changes
            .iter()
            .map(|c| match c {
                Change::Object(e) => format!("{}:{}", e.name(), !e.deleted),
                Change::Synced { .. } => panic!("no synced in the diff"),
            })
            .collect();
        got.sort();
        assert_eq!(got, ["added:true", "changed:true", "gone:false"]);
        assert_eq!(st.subscribers(), 1);
        // Inside the history, or ahead: the ordinary paths.
        assert!(!st.needs_diff(20));
        assert!(!st.needs_diff(21));
        assert!(!st.needs_diff(0));
    }

    #[test]
    fn matches_keys_compares_keys_and_mod_revisions() {
        let mut st = State::new(&cfg(100, 16), Metrics::default());
        st.reset(9, vec![node_put("a", "n1", 3), node_put("a", "n2", 9)]);
        assert!(st.matches_keys(&[key_at("a", "n1", 3), key_at("a", "n2", 9)]));
        assert!(!st.matches_keys(&[key_at("a", "n1", 3), key_at("a", "n2", 10)]));
        assert!(
            !st.matches_keys(&[key_at("a", "n1", 3)]),
            "a delete not applied"
        );
        assert!(!st.matches_keys(&[
            key_at("a", "n1", 3),
            key_at("a", "n2", 9),
            key_at("a", "n3", 11)
        ]));
        let synced = (Keys::default().synced("a", Kind::Node).into_bytes(), 5);
        assert!(!st.matches_keys(&[key_at("a", "n1", 3), key_at("a", "n2", 9), synced]));
    }

    #[tokio::test]
    async fn slow_subscriber_is_cut_off_not_waited_for() {
        let mut st = State::new(&cfg(100, 2), Metrics::default());
        st.reset(1, vec![]);
        let mut slow = st.subscribe(0, &all);
        let mut fast = st.subscribe(0, &all);
        for rev in 2..=5 {
            st.apply(vec![node_put("a", &format!("n{rev}"), rev)]);
            assert_eq!(batch_of(fast.next().await).revision, rev);
        }
        assert_eq!(batch_of(slow.next().await).revision, 2);
        assert_eq!(batch_of(slow.next().await).revision, 3);
        assert!(matches!(slow.next().await, Update::Lagged));
        assert_eq!(st.subscribers(), 1);
    }

    #[tokio::test]
    async fn corrupt_value_is_skipped_and_withdraws_the_old_value() {
        let metrics = Metrics::default();
        let mut st = State::new(&cfg(100, 16), metrics.clone());
        st.reset(2, vec![node_put("a", "n1", 2)]);
        let mut sub = st.subscribe(0, &all);
        let key = Keys::default().object("a", Kind::Node, "n1").into_bytes();
        st.apply(vec![
            RawEvent {
                key,
                value: Some(vec![0xff, 0xff, 0xff]),
                mod_revision: 3,
            },
            node_put("a", "n2", 3),
        ]);
        let b = batch_of(sub.next().await);
        let got: Vec<(String, bool)> = b
            .changes
            .iter()
            .map(|c| match c {
                Change::Object(e) => (e.name(), !e.deleted),
                Change::Synced { .. } => panic!("unexpected synced"),
            })
            .collect();
        assert_eq!(got, [("n1".to_string(), false), ("n2".to_string(), true)]);
        assert_eq!(
            metrics
                .decode_errors
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: "value".into()
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn relist_diff_emits_deletes_for_vanished_keys() {
        let mut st = State::new(&cfg(100, 16), Metrics::default());
        st.reset(3, vec![node_put("a", "n1", 2), node_put("a", "n2", 3)]);
        let mut sub = st.subscribe(0, &all);
        // After a compaction: n1 vanished, n2 unchanged, n3 appeared, synced marker appeared.
        let synced = RawEvent {
            key: Keys::default().synced("a", Kind::Node).into_bytes(),
            value: Some(pb::SyncedMarker { at_unix_ms: 1 }.encode_to_vec()),
            mod_revision: 9,
        };
        st.reset(
            10,
            vec![node_put("a", "n2", 3), node_put("a", "n3", 8), synced],
        );
        let b = batch_of(sub.next().await);
        assert_eq!(b.revision, 10);
        let got: Vec<String> = b
            .changes
            .iter()
            .map(|c| match c {
                Change::Object(e) => format!("{}:{}", e.name(), !e.deleted),
                Change::Synced { cluster, kind } => format!("synced {cluster} {kind:?}"),
            })
            .collect();
        assert_eq!(got, ["n1:false", "n3:true", "synced a Node"]);
        assert_eq!(st.counts()["a"].kinds[1], (Kind::Node, 2, true));
    }
}
