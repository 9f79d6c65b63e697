//! The one batched etcd writer, used by the publisher's store ([`crate::store`]) and the peer
//! importer ([`crate::peer`]): staged puts and deletes are written in key order, in
//! transactions bounded by operation count and payload bytes, each guarded by the leader
//! fence when one is given.

use std::collections::BTreeMap;

use etcd_client::{KvClient, Txn, TxnOp};

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

/// Writes `pending` in key order, in transactions of at most `max_ops` operations (clamped to
/// `1..=DEFAULT_MAX_TXN_OPS`) and [`MAX_TXN_BYTES`], each conditional on `fence`. After each
/// commit, its entries leave `pending` and are handed to `on_commit`; on error, what was not
/// committed stays in `pending`, so the call can be retried. Returns the transactions
/// committed.
pub async fn write_batched(
    kv: &mut KvClient,
    pending: &mut Staged,
    max_ops: usize,
    fence: Option<&Fence>,
    mut on_commit: impl FnMut(Committed),
) -> Result<usize, WriteError> {
    let max_ops = max_ops.clamp(1, DEFAULT_MAX_TXN_OPS);
    let mut txns = 0;
    while !pending.is_empty() {
        let batch = next_batch(pending, max_ops);
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
        let resp = kv.txn(txn.and_then(ops)).await.map_err(WriteError::Etcd)?;
        if !resp.succeeded() {
            // Only the fence's comparison can fail.
            return Err(WriteError::Fenced {
                key: fence.map(|f| f.key.clone()).unwrap_or_default(),
                revision: fence.map_or(0, |f| f.create_revision),
            });
        }
        txns += 1;
        for (k, _) in &batch {
            pending.remove(k);
        }
        on_commit(batch);
    }
    Ok(txns)
}

/// The first entries of `pending` that fit one transaction: at most `max_ops`, and at most
/// [`MAX_TXN_BYTES`] of keys and values unless the first alone is larger.
fn next_batch(pending: &Staged, max_ops: usize) -> Committed {
    let mut bytes = 0;
    pending
        .iter()
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
        let b = next_batch(&many, 128);
        assert_eq!(b.len(), 128);
        assert_eq!(b[0].0, "k000");

        let big = staged(&[("a", MAX_TXN_BYTES / 2), ("b", MAX_TXN_BYTES / 2), ("c", 1)]);
        let b = next_batch(&big, 128);
        assert_eq!(b.len(), 1, "two halves plus keys exceed the byte bound");

        // A value larger than the bound still goes, alone.
        let huge = staged(&[("a", MAX_TXN_BYTES * 2), ("b", 1)]);
        assert_eq!(next_batch(&huge, 128).len(), 1);
    }
}
