//! The size of the apiserver's etcd transactions against real etcds started with different
//! `--max-txn-ops`: the probe finds what etcd accepts, and a write that etcd refuses for its
//! size (etcd restarted with a lower limit) loses nothing, lowers the shared limit, and its
//! retry commits every key, through the direct sink (publisher) and the group writer
//! (importer) alike.

use etcd_client::{Client, GetOptions};
use mesh_apiserver::etcd_write::{GroupWriter, Sink, Staged, TxnOps, WriteError, write_batched};
use mesh_testkit::etcd::Etcd;
use prometheus_client::metrics::counter::Counter;

async fn connect(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connecting to etcd")
}

fn staged(prefix: &str, n: usize) -> Staged {
    (0..n)
        .map(|i| (format!("{prefix}{i:04}"), Some(i.to_string().into_bytes())))
        .collect()
}

async fn count_under(client: &mut Client, prefix: &str) -> i64 {
    client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count()
}

#[tokio::test]
async fn the_probe_keeps_what_etcd_accepts() {
    // (etcd's --max-txn-ops, asked, expected): the tests' etcd accepts 1024; etcd's own
    // default is 128; a limit between two halvings gives the lower one.
    for (flag, asked, expected) in [
        (None, 1024, 1024),
        (Some(128), 1024, 128),
        (Some(300), 1024, 256),
    ] {
        let etcd = match flag {
            None => Etcd::start(),
            Some(n) => Etcd::start_with(&[&format!("--max-txn-ops={n}")]),
        };
        let client = connect(&etcd).await;
        let ops = TxnOps::new(asked);
        let found = ops.probe(&client.kv_client(), "mesh/v1/").await.unwrap();
        assert_eq!(
            (found, ops.get()),
            (expected, expected),
            "etcd --max-txn-ops={flag:?}"
        );
        // A clone is the same limit.
        assert_eq!(ops.clone().get(), expected);
    }
}

#[tokio::test]
async fn a_write_refused_for_its_size_lowers_the_limit_and_the_retry_commits_everything() {
    let etcd = Etcd::start_with(&["--max-txn-ops=128"]);
    let mut client = connect(&etcd).await;
    let kv = client.kv_client();

    for (name, prefix) in [("direct", "d/"), ("group", "g/")] {
        // Unprobed: asks for 1024 where etcd accepts 128; shared with the group writer, as
        // the apiserver shares it between its publisher and importer.
        let ops = TxnOps::new(1024);
        let group = GroupWriter::spawn(kv.clone(), ops.clone(), 2, Counter::default());
        let sink = match name {
            "direct" => Sink::Etcd {
                kv: &kv,
                fence: None,
            },
            _ => Sink::Group(&group),
        };
        let mut pending = staged(prefix, 1000);
        let mut committed = 0;
        let err = write_batched(sink, &mut pending, &ops, 2, None, |b| committed += b.len())
            .await
            .expect_err("etcd refuses 1000 operations in one transaction");
        assert!(
            matches!(&err, WriteError::Etcd(e) if e.to_string().contains("too many operations")),
            "{name}: {err}"
        );
        assert_eq!(committed, 0, "{name}");
        assert_eq!(pending.len(), 1000, "{name}: nothing is lost");
        assert_eq!(ops.get(), 128, "{name}: the refusal probed the limit");

        let txns = write_batched(sink, &mut pending, &ops, 2, None, |b| committed += b.len())
            .await
            .unwrap_or_else(|e| panic!("{name}: the retry: {e}"));
        assert_eq!((txns, committed), (8, 1000), "{name}: 7 x 128 + 104");
        assert!(pending.is_empty(), "{name}");
        assert_eq!(count_under(&mut client, prefix).await, 1000, "{name}");
    }
}
