//! The gRPC edge (DESIGN.md sections 7 and 8): `Info`, `Watch`, `Status`, `ReportStatus`.
//!
//! Streams are served from the [`Index`], never from etcd. Wire rules of `Watch`:
//!
//! - `WatchResponse.revision` is the revision the client has reached once it has applied
//!   the message. Snapshot chunks carry 0 except the last one, which carries the snapshot
//!   revision R (an empty `Events` message closes an empty snapshot), so a client cut off in
//!   the middle of a snapshot resumes from scratch, never from a half-applied snapshot.
//!   `Reset` carries 0.
//! - After the snapshot (or the missed events of a resume) one `Synced` per (cluster, kind)
//!   whose etcd marker exists; later markers are sent when they appear.
//! - Live events come in revision order, many per message; the events of one etcd watch
//!   response are coalesced. Within a batch events precede `Synced` markers.
//! - `Progress` with the stream's revision when nothing was sent for a heartbeat interval.
//! - A stream whose buffer fills up (the client does not read) is cut from live delivery
//!   and resumes from its own last revision when it drains: from the history without loss,
//!   or, when it fell behind the history, with the difference between etcd at its revision
//!   and the index now (see below).
//! - A resume older than the index's history (the server restarted, or the history was
//!   trimmed) reads the stream's keys from etcd at that revision (keys only) and sends one
//!   ordinary batch at the current revision: deletes for keys that are gone, upserts for
//!   objects modified after it. Only a revision etcd compacted gets `Reset` and a snapshot.
//!
//! Roles: agents and replicas of the serving cluster read every cluster; a peer reads only
//! the serving cluster's own data and sees `shared: false` services as absent.

mod access;
mod codec;
mod service;
mod stream;
#[cfg(test)]
mod tests;

pub use access::*;
pub use codec::*;
pub use service::*;
use stream::*;

/// Largest request the server decodes (an agent's status report is the biggest).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest response message the server encodes; messages are built well below it.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
