//! The watch-history checker (issue 16 part 2): checks what a watch client recorded
//! (`mesh_proto::record`, through the client's own recording hook) against etcd's own
//! history, as etcd's robustness suite checks its watch streams.
//!
//! [`History::read`] reads etcd's history with a watch from revision 1 (or, once compacted,
//! the state at the compaction point and the events after it). [`check`] replays a recording
//! against it and reports, per [`Property`]:
//!
//! - **ordered**: message revisions never go back (events strictly forward), an event's
//!   revision is never above its message's, revision-0 chunks only inside a snapshot;
//! - **unique**: no live event (key, revision) is delivered twice;
//! - **atomic**: after every message at revision M, what the stream has told equals etcd at M
//!   (the view of the stream's reader); a difference on a revision whose other events were
//!   delivered is a split revision;
//! - **complete**: the same check, where the difference is a missed event (or a progress
//!   heartbeat at P while etcd changed before P), and every delivered value is etcd's at its
//!   revision;
//! - **resume**: a stream opened at R starts from etcd's state at R (the consumer held exactly
//!   that state) and yields exactly what changed after R, or a `Reset` then a snapshot;
//! - **converged**: at the end, what the consumer was handed (upserts and deletes applied
//!   in order, the sweep after a reset included) equals etcd's current state key for key:
//!   no missed delete, no stale entry, no old value.
//!
//! The checker has its own, much simpler, model of the protocol (a map per stream); it never
//! runs the client's `StreamState`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use mesh_proto::client::WatchUpdate;
use mesh_proto::convert::decode_value;
use mesh_proto::keys::{ClusterKey, Keys, own_readers_only};
use mesh_proto::pb::{self, Kind, watch_response::Payload};
use mesh_proto::record::Record;

/// An object as a watch names it: `(cluster, kind, name)`.
pub type ObjKey = (String, Kind, String);
/// A reader's view of the published state.
pub type ViewState = BTreeMap<ObjKey, pb::event::Value>;

/// Whose view a stream has (DESIGN.md section 8 roles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// An agent (or operator) of the serving cluster: every object under `clusters/`.
    Own,
    /// A peer importing `cluster` (the serving cluster): its own objects only, no
    /// own-readers-only kinds (policies, link), services only when global and shared.
    Peer { cluster: String },
}

impl View {
    fn presents(&self, key: &ObjKey, value: &pb::event::Value) -> bool {
        match self {
            View::Own => true,
            View::Peer { cluster } => {
                key.0 == *cluster
                    && !own_readers_only(key.1)
                    && match value {
                        pb::event::Value::Service(s) => !s.local_only && s.shared,
                        _ => true,
                    }
            }
        }
    }
}

// ================================================================ etcd's history

/// The versions of one key, in revision order (`None`: deleted).
type Versions = Vec<(i64, Option<Vec<u8>>)>;

/// Every version of every key from a base revision to `current`.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The state at `base` is known; versions at or before it collapse into one.
    base: i64,
    current: i64,
    /// Per key, its versions in revision order (`None`: deleted).
    versions: BTreeMap<String, Versions>,
}

/// One change of etcd's history (for [`History::from_parts`]).
#[derive(Debug, Clone)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    /// `None`: a delete.
    pub value: Option<Vec<u8>>,
}

impl History {
    /// A history built by hand: the state at `base`, then `changes` (revision order).
    pub fn from_parts(
        base: i64,
        state: impl IntoIterator<Item = (String, Vec<u8>)>,
        changes: impl IntoIterator<Item = Change>,
    ) -> Self {
        let mut h = History {
            base,
            current: base,
            versions: BTreeMap::new(),
        };
        for (key, value) in state {
            h.versions.entry(key).or_default().push((base, Some(value)));
        }
        for c in changes {
            h.push(c);
        }
        h
    }

    fn push(&mut self, c: Change) {
        assert!(
            c.revision > self.base && c.revision >= self.current,
            "changes in revision order"
        );
        self.current = c.revision;
        self.versions
            .entry(c.key)
            .or_default()
            .push((c.revision, c.value));
    }

    /// Reads etcd's whole history (every key), from revision 1 or the compaction point, up
    /// to its current revision.
    pub async fn read(client: &mut etcd_client::Client) -> Result<Self, String> {
        let head = client
            .get("", Some(GetOptions::new().with_all_keys().with_keys_only()))
            .await
            .map_err(|e| format!("reading etcd's revision: {e}"))?;
        let current = head.header().map_or(0, |h| h.revision());
        let mut from = 1;
        let mut history = History::default();
        loop {
            match Self::watch_range(client, from, current, &mut history).await? {
                None => return Ok(history),
                Some(compacted) => {
                    // The state at the compaction point, then the events after it.
                    let got = client
                        .get(
                            "",
                            Some(GetOptions::new().with_all_keys().with_revision(compacted)),
                        )
                        .await
                        .map_err(|e| format!("reading etcd at revision {compacted}: {e}"))?;
                    let state = got
                        .kvs()
                        .iter()
                        .map(|kv| {
                            (
                                String::from_utf8_lossy(kv.key()).into_owned(),
                                kv.value().to_vec(),
                            )
                        })
                        .collect::<Vec<_>>();
                    history = History::from_parts(compacted, state, []);
                    from = compacted + 1;
                }
            }
        }
    }

    /// Appends the events in `from..=current`; `Some(rev)` when `from` is compacted.
    async fn watch_range(
        client: &mut etcd_client::Client,
        from: i64,
        current: i64,
        history: &mut History,
    ) -> Result<Option<i64>, String> {
        if from > current {
            history.current = history.current.max(current);
            return Ok(None);
        }
        let opts = WatchOptions::new()
            .with_all_keys()
            .with_start_revision(from);
        let mut stream = client
            .watch("", Some(opts))
            .await
            .map_err(|e| format!("watching etcd from {from}: {e}"))?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .map_err(|_| format!("etcd's history: no event up to {current} within 10 s"))?
                .map_err(|e| format!("etcd watch: {e}"))?
                .ok_or("etcd watch ended")?;
            if msg.compact_revision() > 0 {
                return Ok(Some(msg.compact_revision()));
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                if kv.mod_revision() > current {
                    history.current = current;
                    return Ok(None);
                }
                history.push(Change {
                    revision: kv.mod_revision(),
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: (ev.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                });
            }
            if history.current >= current {
                return Ok(None);
            }
        }
    }

    /// Adds what `later` (read after this one, e.g. after a compaction) knows beyond
    /// this history's current revision.
    pub fn extend(&mut self, later: History) {
        assert!(
            later.base <= self.current,
            "the later history starts after this one ends"
        );
        let mut changes: Vec<Change> = Vec::new();
        for (key, versions) in later.versions {
            for (revision, value) in versions {
                if revision > self.current {
                    changes.push(Change {
                        revision,
                        key: key.clone(),
                        value,
                    });
                }
            }
        }
        changes.sort_by_key(|c| c.revision);
        let current = later.current;
        for c in changes {
            self.push(c);
        }
        self.current = self.current.max(current);
    }

    /// The revision the history reaches.
    pub fn current(&self) -> i64 {
        self.current
    }

    /// The oldest revision whose state is known.
    pub fn base(&self) -> i64 {
        self.base
    }

    fn value_at(versions: &Versions, rev: i64) -> Option<(i64, &[u8])> {
        let i = versions.partition_point(|(r, _)| *r <= rev);
        let (r, v) = versions.get(i.checked_sub(1)?)?;
        v.as_deref().map(|v| (*r, v))
    }

    /// The view of `view` at `rev`; `None` if `rev` is before the known history.
    pub fn view_at(&self, keys: &Keys, view: &View, rev: i64) -> Option<ViewState> {
        if rev < self.base {
            return None;
        }
        let mut out = ViewState::new();
        for (key, versions) in &self.versions {
            let Some((_, bytes)) = Self::value_at(versions, rev) else {
                continue;
            };
            let Some(ClusterKey::Object {
                cluster,
                kind,
                name,
            }) = keys.parse(key)
            else {
                continue;
            };
            // A value the index cannot decode is skipped by the server (and counted).
            let Ok(value) = decode_value(kind, bytes) else {
                continue;
            };
            let k = (cluster, kind, name);
            if view.presents(&k, &value) {
                out.insert(k, value);
            }
        }
        Some(out)
    }

    /// The revision of the version of `key` in force at `rev` (its last change at or before).
    fn changed_at(&self, keys: &Keys, key: &ObjKey, rev: i64) -> Option<i64> {
        let raw = keys.object(&key.0, key.1, &key.2);
        let versions = self.versions.get(&raw)?;
        let i = versions.partition_point(|(r, _)| *r <= rev);
        Some(versions.get(i.checked_sub(1)?)?.0)
    }
}

// ================================================================ the verdict

/// A property of a watch stream (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Property {
    Ordered,
    Unique,
    Atomic,
    Complete,
    Resume,
    Converged,
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Property::Ordered => "ordered",
            Property::Unique => "unique",
            Property::Atomic => "atomic",
            Property::Complete => "complete",
            Property::Resume => "resume",
            Property::Converged => "converged",
        })
    }
}

/// One broken property, at a record of the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub property: Property,
    /// Index of the record where it was found.
    pub record: usize,
    pub detail: String,
}

/// The checker's verdict on one recorded stream.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub stream: String,
    pub clients: usize,
    pub sessions: usize,
    pub resumes: usize,
    pub resets: usize,
    pub snapshots: usize,
    pub messages: usize,
    pub live_events: usize,
    /// Messages at revisions before the known history (not checked).
    pub unchecked: usize,
    pub violations: Vec<Violation>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The broken properties.
    pub fn broken(&self) -> BTreeSet<Property> {
        self.violations.iter().map(|v| v.property).collect()
    }

    /// Panics with the verdict unless every property holds.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.ok(), "{self}");
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "watch-history checker: stream {}: {} ({} client starts, {} streams, {} resumes, \
             {} resets, {} snapshots, {} messages, {} live events, {} unchecked)",
            self.stream,
            if self.ok() {
                "OK: ordered, unique, atomic, complete, resume, converged".to_owned()
            } else {
                format!("{} VIOLATIONS", self.violations.len())
            },
            self.clients,
            self.sessions,
            self.resumes,
            self.resets,
            self.snapshots,
            self.messages,
            self.live_events,
            self.unchecked,
        )?;
        for v in self.violations.iter().take(20) {
            write!(f, "\n  [{}] record {}: {}", v.property, v.record, v.detail)?;
        }
        if self.violations.len() > 20 {
            write!(f, "\n  ... and {} more", self.violations.len() - 20)?;
        }
        Ok(())
    }
}

/// How two views differ, for messages (at most a few keys).
pub fn diff(got: &ViewState, want: &ViewState) -> String {
    let mut parts = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => parts.push(format!("missing {}", show(k))),
            Some(g) if g != v => parts.push(format!("old value of {}", show(k))),
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        parts.push(format!("stale {}", show(k)));
    }
    let n = parts.len();
    parts.truncate(5);
    if n > 5 {
        parts.push(format!("and {} more", n - 5));
    }
    parts.join(", ")
}

fn show(k: &ObjKey) -> String {
    format!("{}/{:?}/{}", k.0, k.1, k.2)
}

fn differing(got: &ViewState, want: &ViewState) -> Vec<ObjKey> {
    let mut out: Vec<ObjKey> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    out.extend(got.keys().filter(|k| !want.contains_key(*k)).cloned());
    out
}

// ================================================================ the check

enum Phase {
    /// Outside a stream.
    Closed,
    /// Receiving a snapshot (after an open at 0 or a `Reset`).
    Snapshot(ViewState),
    /// Live; `None` when the state is unknown (before the known history).
    Live(Option<ViewState>),
}

struct Checker<'a> {
    history: &'a History,
    keys: &'a Keys,
    view: &'a View,
    verdict: Verdict,
    /// What the consumer was handed, applied in order; `None` when unknown.
    consumer: Option<ViewState>,
    phase: Phase,
    /// The stream's resume revision and the last message revision of the session.
    resumed_at: i64,
    last_rev: i64,
    last_events_rev: i64,
    first_after_open: bool,
    /// Revisions of the events of the previous message (to tell a split revision).
    prev_revisions: BTreeSet<i64>,
    live_seen: HashSet<(ObjKey, i64)>,
    record: usize,
}

/// Checks one recording against etcd's history; `stream` names it in the verdict.
pub fn check(
    stream: &str,
    records: &[Record],
    history: &History,
    keys: &Keys,
    view: &View,
) -> Verdict {
    let mut c = Checker {
        history,
        keys,
        view,
        verdict: Verdict {
            stream: stream.to_owned(),
            ..Verdict::default()
        },
        consumer: Some(ViewState::new()),
        phase: Phase::Closed,
        resumed_at: 0,
        last_rev: 0,
        last_events_rev: 0,
        first_after_open: false,
        prev_revisions: BTreeSet::new(),
        live_seen: HashSet::new(),
        record: 0,
    };
    for (i, r) in records.iter().enumerate() {
        c.record = i;
        c.step(r);
    }
    c.record = records.len();
    c.finish();
    c.verdict
}

impl Checker<'_> {
    fn violation(&mut self, property: Property, detail: String) {
        self.verdict.violations.push(Violation {
            property,
            record: self.record,
            detail,
        });
    }

    fn view_at(&self, rev: i64) -> Option<ViewState> {
        self.history.view_at(self.keys, self.view, rev)
    }

    fn step(&mut self, r: &Record) {
        match r {
            Record::Started(rev) => {
                self.verdict.clients += 1;
                self.consumer = if *rev > 0 {
                    self.view_at(*rev)
                } else {
                    Some(ViewState::new())
                };
                self.phase = Phase::Closed;
            }
            Record::Opened(req) => self.open(req.resume_revision),
            Record::Message(m) => self.message(m),
            Record::Lost(_) => self.phase = Phase::Closed,
            Record::Delivered(u) => self.delivered(u),
        }
    }

    fn open(&mut self, resume: i64) {
        self.verdict.sessions += 1;
        self.resumed_at = resume;
        self.last_rev = resume;
        self.last_events_rev = resume;
        self.first_after_open = true;
        self.prev_revisions.clear();
        if resume > 0 {
            self.verdict.resumes += 1;
            self.phase = Phase::Live(self.view_at(resume));
        } else {
            self.verdict.snapshots += 1;
            self.phase = Phase::Snapshot(ViewState::new());
        }
    }

    fn message(&mut self, m: &pb::WatchResponse) {
        self.verdict.messages += 1;
        let rev = m.revision;
        let first = std::mem::replace(&mut self.first_after_open, false);
        match &m.payload {
            None => {}
            Some(Payload::Reset(_)) => {
                self.verdict.resets += 1;
                self.verdict.snapshots += 1;
                self.phase = Phase::Snapshot(ViewState::new());
                self.prev_revisions.clear();
            }
            Some(Payload::Synced(_)) => self.check_order(rev, false),
            Some(Payload::Progress(_)) => {
                self.check_order(rev, false);
                if let Phase::Live(Some(state)) = &self.phase
                    && let Some(want) = self.view_at(rev)
                    && *state != want
                {
                    let detail = format!(
                        "progress at {rev}, but the stream's state is not etcd's at {rev}: {}",
                        diff(state, &want)
                    );
                    self.violation(Property::Complete, detail);
                    self.phase = Phase::Live(Some(want));
                }
            }
            Some(Payload::Events(events)) => self.events(rev, &events.events, first),
        }
    }

    fn check_order(&mut self, rev: i64, events: bool) {
        if rev < self.last_rev || (events && rev <= self.last_events_rev && rev != 0) {
            let detail = format!(
                "message at revision {rev} after one at {} (events: {})",
                self.last_rev, self.last_events_rev
            );
            self.violation(Property::Ordered, detail);
        }
        self.last_rev = self.last_rev.max(rev);
        if events {
            self.last_events_rev = self.last_events_rev.max(rev);
        }
    }

    fn events(&mut self, rev: i64, events: &[pb::Event], first: bool) {
        if rev == 0 {
            // A snapshot chunk.
            match &mut self.phase {
                Phase::Snapshot(state) => {
                    for e in events {
                        if let Some(k) = obj_key(e) {
                            match &e.value {
                                Some(v) => state.insert(k, v.clone()),
                                None => state.remove(&k),
                            };
                        }
                    }
                }
                _ => self.violation(
                    Property::Ordered,
                    "a revision-0 (snapshot) message outside a snapshot".into(),
                ),
            }
            return;
        }
        if rev < self.history.base() {
            self.verdict.unchecked += 1;
            self.check_order(rev, true);
            if let Phase::Snapshot(_) = self.phase {
                self.phase = Phase::Live(None);
            } else {
                self.phase = Phase::Live(None);
            }
            return;
        }
        self.check_order(rev, true);
        let mut order_ok = true;
        let mut prev = 0;
        let mut revisions = BTreeSet::new();
        let phase = std::mem::replace(&mut self.phase, Phase::Closed);
        let (mut state, snapshot) = match phase {
            Phase::Snapshot(s) => (Some(s), true),
            Phase::Live(s) => (s, false),
            Phase::Closed => {
                self.violation(Property::Ordered, "a message outside a stream".into());
                return;
            }
        };
        for e in events {
            let Some(k) = obj_key(e) else { continue };
            if !snapshot {
                self.verdict.live_events += 1;
                if e.revision > rev || e.revision < prev {
                    order_ok = false;
                }
                prev = e.revision;
                revisions.insert(e.revision);
                if e.revision <= self.resumed_at {
                    let detail = format!(
                        "event {} at {} is not after the resume revision {}",
                        show(&k),
                        e.revision,
                        self.resumed_at
                    );
                    self.violation(Property::Resume, detail);
                }
                if !self.live_seen.insert((k.clone(), e.revision)) {
                    let detail = format!("event {} at {} delivered twice", show(&k), e.revision);
                    self.violation(Property::Unique, detail);
                }
                self.check_value(&k, e);
            }
            if let Some(state) = state.as_mut() {
                match &e.value {
                    Some(v) => state.insert(k, v.clone()),
                    None => state.remove(&k),
                };
            }
        }
        if !order_ok {
            let revs: Vec<String> = events
                .iter()
                .map(|e| {
                    let op = if e.value.is_some() { "" } else { "-" };
                    format!("{op}{}", e.revision)
                })
                .collect();
            self.violation(
                Property::Ordered,
                format!(
                    "event revisions out of order or above the message's {rev}: [{}]{}",
                    revs.iter().take(30).cloned().collect::<Vec<_>>().join(" "),
                    if revs.len() > 30 { " ..." } else { "" }
                ),
            );
        }
        if let (Some(got), Some(want)) = (&state, self.view_at(rev)) {
            if *got != want {
                let property = self.classify(got, &want, rev, &revisions, first, snapshot);
                let what = if snapshot { "snapshot" } else { "message" };
                let detail = format!(
                    "after the {what} at {rev} the stream's state is not etcd's at {rev}: {}",
                    diff(got, &want)
                );
                self.violation(property, detail);
            }
            // Go on from etcd's state, so one fault is reported once.
            state = Some(want);
        }
        self.prev_revisions = revisions;
        self.phase = Phase::Live(state);
    }

    /// Which property a state difference after a message breaks.
    fn classify(
        &self,
        got: &ViewState,
        want: &ViewState,
        rev: i64,
        revisions: &BTreeSet<i64>,
        first: bool,
        snapshot: bool,
    ) -> Property {
        if snapshot {
            return Property::Complete;
        }
        let split = differing(got, want).iter().any(|k| {
            self.history
                .changed_at(self.keys, k, rev)
                .is_some_and(|r| revisions.contains(&r) || self.prev_revisions.contains(&r))
        });
        if split {
            Property::Atomic
        } else if first && self.resumed_at > 0 {
            Property::Resume
        } else {
            Property::Complete
        }
    }

    /// A live event's value is etcd's at its revision (a delete: absent from the view).
    fn check_value(&mut self, k: &ObjKey, e: &pb::Event) {
        let Some(want) = self.view_at(e.revision) else {
            return;
        };
        let ok = match &e.value {
            Some(v) => want.get(k) == Some(v),
            None => !want.contains_key(k),
        };
        if !ok {
            let detail = format!(
                "event {} at {} ({}) is not etcd's at that revision",
                show(k),
                e.revision,
                if e.value.is_some() {
                    "upsert"
                } else {
                    "delete"
                }
            );
            self.violation(Property::Complete, detail);
        }
    }

    fn delivered(&mut self, u: &WatchUpdate) {
        match u {
            WatchUpdate::Upsert {
                cluster,
                kind,
                name,
                value,
                ..
            } => {
                if let Some(c) = self.consumer.as_mut() {
                    c.insert((cluster.to_string(), *kind, name.clone()), value.clone());
                }
            }
            WatchUpdate::Delete {
                cluster,
                kind,
                name,
                ..
            } => {
                if let Some(c) = self.consumer.as_mut() {
                    c.remove(&(cluster.to_string(), *kind, name.clone()));
                }
            }
            WatchUpdate::Connected {
                resumed: true,
                revision,
            } => {
                let want = self.view_at(*revision);
                if let (Some(got), Some(want)) = (&self.consumer, &want)
                    && got != want
                {
                    let detail = format!(
                        "resuming at {revision}, the consumer holds a state that is not etcd's \
                         at {revision}: {}",
                        diff(got, want)
                    );
                    self.violation(Property::Resume, detail);
                }
                self.consumer = want;
            }
            WatchUpdate::Connected { resumed: false, .. }
            | WatchUpdate::Disconnected { .. }
            | WatchUpdate::Reset { .. }
            | WatchUpdate::Synced { .. } => {}
        }
    }

    fn finish(&mut self) {
        let current = self.history.current();
        let want = self.view_at(current);
        match (&self.consumer, &want) {
            (Some(got), Some(want)) if got != want => {
                let detail = format!(
                    "at the end the consumer's state is not etcd's at {current}: {}",
                    diff(got, want)
                );
                self.violation(Property::Converged, detail);
            }
            (None, _) | (_, None) => self.violation(
                Property::Converged,
                "the consumer's state is unknown (no snapshot since the known history began)"
                    .into(),
            ),
            _ => {}
        }
    }
}

fn obj_key(e: &pb::Event) -> Option<ObjKey> {
    let kind = Kind::try_from(e.kind).ok()?;
    Some((e.cluster.clone(), kind, e.name.clone()))
}

/// Whether the consumer of `records` holds etcd's current state (for waiting until a
/// stream converged before [`check`]ing it).
pub fn converged(records: &[Record], history: &History, keys: &Keys, view: &View) -> bool {
    let v = check("", records, history, keys, view);
    !v.violations
        .iter()
        .any(|v| v.property == Property::Converged)
}

pub mod churn;

#[cfg(test)]
mod tests;
