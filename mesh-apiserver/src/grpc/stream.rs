//! The watch stream of one client: snapshot, resume, live delivery.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mesh_proto::pb::{self, Kind};
use mesh_proto::tls::ConnInfo;
use tonic::{Request, Status};
use tracing::{debug, info, info_span, warn};

use super::*;
use crate::index::{Batch, IndexChange, Start, Subscription, Update};
use crate::metrics::{Metrics, RoleLabels};

/// The watch stream of one client.
pub(super) struct WatchStream {
    pub(super) svc: MeshService,
    pub(super) filter: StreamFilter,
    /// The revision the client has reached.
    pub(super) revision: i64,
    /// Progress is sent after this long with nothing sent ([`heartbeat_for`]).
    pub(super) heartbeat: std::time::Duration,
}

/// The bounds of a heartbeat interval a client may ask for: below 100 ms heartbeats would be
/// most of a stream's traffic; above a minute a dead link goes unnoticed for minutes. The
/// importer refuses to ask for anything outside them.
pub(super) const HEARTBEAT_BOUNDS: (std::time::Duration, std::time::Duration) =
    crate::peer::PEER_HEARTBEAT_BOUNDS;

/// The heartbeat interval of a stream: what the client asked for (it reconnects after three
/// silent intervals, so the server must pace itself to the client), clamped to
/// [`HEARTBEAT_BOUNDS`]; the server's own when the client asks nothing.
pub(super) fn heartbeat_for(asked_ms: u32, server: std::time::Duration) -> std::time::Duration {
    if asked_ms == 0 {
        return server;
    }
    std::time::Duration::from_millis(asked_ms.into()).clamp(HEARTBEAT_BOUNDS.0, HEARTBEAT_BOUNDS.1)
}

type ItemResult = Result<pb::WatchResponse, Status>;
pub(super) type WireResult = Result<WireMsg, Status>;

/// Keys per page when a resume reads etcd's past (keys only, so pages can be large).
const HISTORY_READ_PAGE: i64 = 10_000;

impl WatchStream {
    /// Messages for a snapshot: optional reset, chunks, the closing revision, Synced.
    /// Built one chunk at a time as the stream is polled ([`SnapshotMessages`]).
    fn snapshot_messages(
        &self,
        snapshot: crate::index::Snapshot,
        reset: Option<crate::index::ResetReason>,
    ) -> SnapshotMessages {
        let metrics = &self.svc.inner.metrics;
        let mut head = Vec::new();
        if let Some(reason) = reset {
            Metrics::inc_reason(&metrics.resets, reason.label());
            info!(%reason, "resetting watch stream");
            head.push(msg(
                0,
                pb::watch_response::Payload::Reset(pb::Reset {
                    reason: reason.to_string(),
                }),
            ));
        }
        metrics.snapshots.inc();
        SnapshotMessages {
            head: head.into_iter(),
            revision: snapshot.revision,
            objects: snapshot.objects.into_iter(),
            chunker: Some(Chunker::new(&self.svc.inner.cfg)),
            filter: self.filter.clone(),
            synced: self
                .synced_messages(&snapshot.synced, snapshot.revision)
                .into_iter(),
        }
    }

    fn synced_messages(&self, synced: &[(String, Kind)], revision: i64) -> Vec<WireMsg> {
        synced
            .iter()
            .filter(|(c, k)| self.filter.accepts(c, *k))
            .map(|(c, k)| {
                msg(
                    revision,
                    pb::watch_response::Payload::Synced(pb::Synced {
                        cluster: c.clone(),
                        kind: *k as i32,
                    }),
                )
            })
            .collect()
    }

    /// Messages for consecutive batches: events coalesced across batches (each message
    /// ends on a batch boundary carrying that batch's revision when possible), Synced
    /// markers after the events of their batch.
    pub(super) fn batch_messages(&mut self, batches: &[Arc<Batch>]) -> Vec<WireMsg> {
        let cfg = &self.svc.inner.cfg;
        let mut out = Vec::new();
        let mut chunker = Chunker::new(cfg);
        let mut synced = Vec::new();
        let mut pending_rev = self.revision;
        let flush = |chunker: Chunker, out: &mut Vec<WireMsg>, from: i64, to: i64| {
            let chunks = chunker.finish();
            let n = chunks.len();
            for (i, (body, events)) in chunks.into_iter().enumerate() {
                // Only the last chunk completes the batch(es): earlier chunks carry the
                // revision the client had before them.
                let rev = if i + 1 == n { to } else { from };
                out.push(WireMsg::events(rev, body, events));
            }
        };
        for b in batches {
            for c in &b.changes {
                match c {
                    IndexChange::Object(obj) => {
                        if let Some(e) = self.filter.present(obj) {
                            chunker.push(&e);
                        }
                    }
                    IndexChange::Synced { cluster, kind } => synced.push((cluster.clone(), *kind)),
                }
            }
            if !synced.is_empty() {
                flush(
                    std::mem::replace(&mut chunker, Chunker::new(cfg)),
                    &mut out,
                    pending_rev,
                    b.revision,
                );
                out.extend(self.synced_messages(&synced, b.revision));
                synced.clear();
                pending_rev = b.revision;
            }
            self.revision = b.revision;
        }
        flush(chunker, &mut out, pending_rev, self.revision);
        out
    }

    /// Subscribes (or re-subscribes after lagging) and returns the start messages.
    pub(super) async fn start(
        &mut self,
        resume: i64,
    ) -> Result<(Subscription, StartMessages), Status> {
        let filter = self.filter.clone();
        let keys = &self.svc.inner.cfg.keys;
        // Where a resume older than the history reads etcd's past: only the clusters this
        // stream may see.
        let prefixes: Vec<String> = match &filter.clusters {
            None => vec![keys.clusters_prefix()],
            Some(clusters) => clusters.iter().map(|c| keys.cluster_prefix(c)).collect(),
        };
        let accept = move |c: &str, k: Kind| filter.accepts(c, k);
        let mut sub = self
            .svc
            .inner
            .index
            .subscribe_resuming(
                &self.svc.inner.etcd,
                &prefixes,
                HISTORY_READ_PAGE,
                resume,
                &accept,
            )
            .await
            .map_err(|_| Status::from(ServeError::ShuttingDown))?;
        let start = std::mem::replace(
            &mut sub.start,
            Start::Resume {
                from: 0,
                missed: Vec::new(),
                synced: Vec::new(),
                revision: 0,
            },
        );
        let msgs = match start {
            Start::Snapshot { snapshot, reset } => {
                self.revision = snapshot.revision;
                StartMessages::Snapshot(Box::new(self.snapshot_messages(snapshot, reset)))
            }
            Start::Resume {
                from,
                missed,
                synced,
                revision,
            } => {
                self.svc.inner.metrics.resumes.inc();
                debug!(
                    from,
                    revision,
                    missed = missed.len(),
                    "resuming watch from history"
                );
                self.revision = from;
                let mut msgs = self.batch_messages(&missed);
                self.revision = revision;
                msgs.extend(self.synced_messages(&synced, revision));
                StartMessages::Resume(msgs.into_iter())
            }
        };
        Ok((sub, msgs))
    }

    fn into_stream(mut self, resume: i64) -> impl Stream<Item = WireResult> + Send + 'static {
        let metrics = self.svc.inner.metrics.clone();
        let shutdown = self.svc.inner.shutdown.clone();
        let heartbeat = self.heartbeat;
        async_stream::stream! {
            let mut resume = resume;
            'subscribe: loop {
                let (mut sub, msgs) = match self.start(resume).await {
                    Ok(x) => x,
                    Err(status) => {
                        yield Err(status);
                        return;
                    }
                };
                for m in msgs {
                    count(&metrics, &m);
                    yield Ok(m);
                }
                // A heartbeat goes out when nothing was *sent* for an interval (batches
                // that filter to nothing do not count).
                let mut next_heartbeat = tokio::time::Instant::now() + heartbeat;
                loop {
                    enum Next {
                        Update(Update),
                        Heartbeat,
                        Shutdown,
                    }
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => Next::Shutdown,
                        u = sub.next() => Next::Update(u),
                        _ = tokio::time::sleep_until(next_heartbeat) => Next::Heartbeat,
                    };
                    match next {
                        Next::Heartbeat => {
                            next_heartbeat = tokio::time::Instant::now() + heartbeat;
                            metrics.messages_sent.inc();
                            yield Ok(msg(self.revision, pb::watch_response::Payload::Progress(pb::Progress {})));
                        }
                        Next::Update(Update::Batch(first)) => {
                            // Coalesce whatever is already queued behind it.
                            let mut batches = vec![first];
                            while batches.len() < 64 {
                                match sub.try_next() {
                                    Some(b) => batches.push(b),
                                    None => break,
                                }
                            }
                            for m in self.batch_messages(&batches) {
                                next_heartbeat = tokio::time::Instant::now() + heartbeat;
                                count(&metrics, &m);
                                yield Ok(m);
                            }
                        }
                        Next::Update(Update::Lagged) => {
                            debug!(revision = self.revision, "stream fell behind; resuming from its revision");
                            resume = self.revision;
                            continue 'subscribe;
                        }
                        Next::Update(Update::Closed) | Next::Shutdown => {
                            yield Err(Status::from(ServeError::ShuttingDown));
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The first messages of a stream: a snapshot built as it is sent, or what a resume missed.
pub(super) enum StartMessages {
    Snapshot(Box<SnapshotMessages>),
    Resume(std::vec::IntoIter<WireMsg>),
}

impl Iterator for StartMessages {
    type Item = WireMsg;
    fn next(&mut self) -> Option<WireMsg> {
        match self {
            StartMessages::Snapshot(s) => s.next(),
            StartMessages::Resume(r) => r.next(),
        }
    }
}

/// A snapshot's messages, encoded one chunk at a time as the stream is polled: the first
/// chunk leaves as soon as it is full, and a stream holds one chunk rather than the whole
/// encoded snapshot (512k entries are about 50 MB; an apiserver restart reconnects every
/// agent at once). Chunks before the last carry revision 0: only the last completes the
/// snapshot at its revision. Then the `Synced` markers.
pub(super) struct SnapshotMessages {
    head: std::vec::IntoIter<WireMsg>,
    revision: i64,
    objects: std::vec::IntoIter<Arc<crate::index::Obj>>,
    /// `None` once the last chunk is out.
    chunker: Option<Chunker>,
    filter: StreamFilter,
    synced: std::vec::IntoIter<WireMsg>,
}

impl SnapshotMessages {
    /// Objects not encoded yet.
    #[cfg(test)]
    pub(super) fn objects_left(&self) -> usize {
        self.objects.len()
    }
}

impl Iterator for SnapshotMessages {
    type Item = WireMsg;
    fn next(&mut self) -> Option<WireMsg> {
        if let Some(m) = self.head.next() {
            return Some(m);
        }
        if let Some(chunker) = self.chunker.as_mut() {
            for obj in self.objects.by_ref() {
                // A peer never sees non-global or non-shared services: absent from its
                // snapshot.
                if obj.deleted || !self.filter.presented(&obj) {
                    continue;
                }
                if let Some(e) = self.filter.present(&obj) {
                    chunker.push(&e);
                }
                // Closed by an event that follows it: not the last chunk.
                if let Some((body, events)) = chunker.take_closed() {
                    return Some(WireMsg::events(0, body, events));
                }
            }
            let mut rest = self.chunker.take().map(Chunker::finish).unwrap_or_default();
            // An empty snapshot still sends its revision.
            let (body, events) = rest.pop().unwrap_or_default();
            debug_assert!(rest.is_empty(), "closed chunks are taken as they close");
            return Some(WireMsg::events(self.revision, body, events));
        }
        self.synced.next()
    }
}

fn count(metrics: &Metrics, m: &WireMsg) {
    metrics.messages_sent.inc();
    if m.events > 0 {
        metrics.events_sent.inc_by(m.events as u64);
    }
}

/// Decrements the open-streams gauge and count when a stream ends, however it ends.
pub(super) struct OpenStream {
    metrics: Metrics,
    role: &'static str,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.metrics
            .watch_streams
            .get_or_create(&RoleLabels {
                role: self.role.into(),
            })
            .dec();
    }
}

pub(super) type WatchResult = Pin<Box<dyn Stream<Item = ItemResult> + Send + 'static>>;
pub(super) type WireStream = Pin<Box<dyn Stream<Item = WireResult> + Send + 'static>>;

impl MeshService {
    /// Opens a watch stream of encoded messages (see [`WireMsg`]).
    pub(super) fn watch_wire(&self, req: Request<pb::WatchRequest>) -> Result<WireStream, Status> {
        let access = self.access(&req)?;
        let remote = ConnInfo::of(&req)
            .and_then(|c| c.remote_addr)
            .or_else(|| req.remote_addr());
        let filter = self
            .filter(&access, req.get_ref())
            .inspect_err(|e| self.refused(e, &req))?;
        // Counted before anything is allocated for the stream; released by its guard.
        let open = self.inner.open_watches.clone();
        let limit = self.inner.cfg.max_watch_streams;
        if open
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| (n < limit).then_some(n + 1),
            )
            .is_err()
        {
            self.inner.metrics.watch_streams_refused.inc();
            warn!(caller = %access.who(), ?remote, limit, "watch stream refused: too many streams");
            return Err(ServeError::TooManyStreams { limit }.into());
        }
        let body = req.into_inner();
        let span = info_span!(
            "watch",
            caller = %access.who(),
            remote = ?remote,
            clusters = ?body.clusters,
            resume = body.resume_revision,
            heartbeat_ms = body.heartbeat_interval_ms,
        );
        info!(parent: &span, "watch stream opened");
        let role = access.role_label();
        self.inner
            .metrics
            .watch_streams
            .get_or_create(&RoleLabels { role: role.into() })
            .inc();
        let guard = OpenStream {
            metrics: self.inner.metrics.clone(),
            role,
            open,
        };
        let inner = WatchStream {
            svc: self.clone(),
            filter,
            revision: 0,
            heartbeat: heartbeat_for(
                body.heartbeat_interval_ms,
                self.inner.cfg.heartbeat_interval,
            ),
        }
        .into_stream(body.resume_revision);
        Ok(Box::pin(SpannedStream {
            inner: Box::pin(inner),
            span,
            _guard: guard,
        }))
    }
}

/// A watch stream that enters its span while polled and counts itself open while alive.
struct SpannedStream {
    inner: WireStream,
    span: tracing::Span,
    _guard: OpenStream,
}

impl Stream for SpannedStream {
    type Item = WireResult;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<WireResult>> {
        let this = &mut *self;
        let _e = this.span.enter();
        this.inner.as_mut().poll_next(cx)
    }
}
