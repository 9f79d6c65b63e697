//! The one batched etcd writer, used by the publisher's store ([`crate::store`]) and the peer
//! importer ([`crate::peer`]): staged puts and deletes are written in key order, in
//! transactions bounded by operation count and payload bytes, each guarded by the leader
//! fence when one is given, one at a time or several in flight.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

use etcd_client::{KvClient, Txn, TxnOp};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Semaphore;

use crate::store::Fence;

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// Payload bound of one transaction: etcd refuses requests over `--max-request-bytes`
/// (1.5 MiB by default); stay well below it. A single larger value still goes alone.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Staged changes by key: `Some` puts, `None` deletes.
pub type Staged = BTreeMap<String, Option<Vec<u8>>>;

/// One committed transaction's changes, in key order.
pub type Committed = Vec<(String, Option<Vec<u8>>)>;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("etcd txn: {0}")]
    Etcd(#[source] etcd_client::Error),
    #[error(
        "lost leadership: leader key {key:?} is no longer the one created at revision {revision}"
    )]
    Fenced { key: String, revision: i64 },
}

/// Writes `pending` in transactions of at most `max_ops` operations (clamped to
/// `1..=DEFAULT_MAX_TXN_OPS`) and [`MAX_TXN_BYTES`], each conditional on `fence`, keeping up
/// to `in_flight` of them (at least 1) in flight on the client's connection. Transactions are
/// sent in key order; with one in flight each waits for the previous commit, with more they
/// may commit in any order, so a caller whose readers need one key committed after others
/// (a synced marker after the objects it vouches for) writes it in a later call. Every key
/// appears once in `pending`, so the order never decides a key's final value.
///
/// `extra`: permits shared between writers (the peer importers) for every transaction in
/// flight beyond each writer's first: one writer alone keeps `in_flight` transactions
/// going, many writing at once (250 peers after a restart) share the permits, so the
/// transactions in flight, and the memory their copies of the values hold, stay bounded by
/// writers + permits.
///
/// After each commit, its entries leave `pending` and are handed to `on_commit` (in commit
/// order). On error no new transaction is sent, those in flight are awaited (what they
/// commit is handed over as usual), and what was not committed stays in `pending`, so the
/// call can be retried. Returns the transactions committed; when it returns, none is in
/// flight.
pub async fn write_batched(
    kv: &mut KvClient,
    pending: &mut Staged,
    max_ops: usize,
    in_flight: usize,
    extra: Option<&Arc<Semaphore>>,
    fence: Option<&Fence>,
    mut on_commit: impl FnMut(Committed),
) -> Result<usize, WriteError> {
    let max_ops = max_ops.clamp(1, DEFAULT_MAX_TXN_OPS);
    let in_flight = in_flight.max(1);
    let mut txns = 0;
    let mut error = None;
    let mut running = FuturesUnordered::new();
    // Batches are cut from `pending` past the last one sent: entries stay in `pending`
    // until their transaction commits.
    let mut next: Option<String> = None;
    loop {
        while error.is_none() && running.len() < in_flight {
            let rest = match &next {
                None => pending.range::<String, _>(..),
                Some(k) => pending.range::<String, _>((Excluded(k), Unbounded)),
            };
            // Beyond the first, a transaction needs one of the shared permits.
            let permit = match (running.is_empty(), extra) {
                (false, Some(extra)) => match extra.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                _ => None,
            };
            let batch = next_batch(rest, max_ops);
            let Some((last, _)) = batch.last() else { break };
            next = Some(last.clone());
            let txn = send(kv.clone(), batch, fence);
            running.push(async move {
                let out = txn.await;
                drop(permit);
                out
            });
        }
        let Some((batch, result)) = running.next().await else {
            break;
        };
        match result {
            Ok(()) => {
                txns += 1;
                for (k, _) in &batch {
                    pending.remove(k);
                }
                on_commit(batch);
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(txns),
    }
}

/// One transaction of `batch`, conditional on `fence`; hands the batch back with the
/// outcome.
async fn send(
    mut kv: KvClient,
    batch: Committed,
    fence: Option<&Fence>,
) -> (Committed, Result<(), WriteError>) {
    let ops: Vec<TxnOp> = batch
        .iter()
        .map(|(k, v)| match v {
            Some(v) => TxnOp::put(k.clone(), v.clone(), None),
            None => TxnOp::delete(k.clone(), None),
        })
        .collect();
    let mut txn = Txn::new();
    if let Some(f) = fence {
        txn = txn.when(vec![f.compare()]);
    }
    let result = match kv.txn(txn.and_then(ops)).await {
        Err(e) => Err(WriteError::Etcd(e)),
        // Only the fence's comparison can fail.
        Ok(resp) if !resp.succeeded() => Err(WriteError::Fenced {
            key: fence.map(|f| f.key.clone()).unwrap_or_default(),
            revision: fence.map_or(0, |f| f.create_revision),
        }),
        Ok(_) => Ok(()),
    };
    (batch, result)
}

/// The first entries of `pending` that fit one transaction: at most `max_ops`, and at most
/// [`MAX_TXN_BYTES`] of keys and values unless the first alone is larger.
fn next_batch<'a>(
    pending: impl Iterator<Item = (&'a String, &'a Option<Vec<u8>>)>,
    max_ops: usize,
) -> Committed {
    let mut bytes = 0;
    pending
        .take(max_ops)
        .take_while(|(k, v)| {
            let size = k.len() + v.as_ref().map_or(0, Vec::len);
            let fits = bytes == 0 || bytes + size <= MAX_TXN_BYTES;
            bytes += size;
            fits
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(entries: &[(&str, usize)]) -> Staged {
        entries
            .iter()
            .map(|(k, n)| (k.to_string(), Some(vec![0; *n])))
            .collect()
    }

    #[test]
    fn batches_are_bounded_by_ops_and_bytes() {
        let many: Staged = (0..300).map(|i| (format!("k{i:03}"), None)).collect();
        let b = next_batch(many.iter(), 128);
        assert_eq!(b.len(), 128);
        assert_eq!(b[0].0, "k000");

        let big = staged(&[("a", MAX_TXN_BYTES / 2), ("b", MAX_TXN_BYTES / 2), ("c", 1)]);
        let b = next_batch(big.iter(), 128);
        assert_eq!(b.len(), 1, "two halves plus keys exceed the byte bound");

        // A value larger than the bound still goes, alone.
        let huge = staged(&[("a", MAX_TXN_BYTES * 2), ("b", 1)]);
        assert_eq!(next_batch(huge.iter(), 128).len(), 1);
    }
}
