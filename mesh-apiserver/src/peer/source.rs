//! Where the importer learns its peers: a Kubernetes Secret (written by `meshctl connect`)
//! or a directory of files (the lab), both applied live.
//!
//! Format: one entry per peer, named `<cluster>.yaml` (or `.yml`, `.json`): a data key of the
//! Secret, or a file of the directory; the content is defined (parsed and rendered) by
//! [`mesh_proto::peer_entry`].
//!
//! Writers should set the Secret's `data` (as `meshctl connect` does through the API, or
//! `kubectl create secret generic --from-file ... --dry-run=client -o yaml | kubectl apply
//! -f -`): with `stringData` and `kubectl apply`, a removed key is not removed from `data`.
//! The apiserver needs `get`, `list` and `watch` on that one Secret (RBAC `resourceNames`
//! works: the watch uses the field selector `metadata.name=<name>`).
//!
//! Other keys (e.g. a `README`) are ignored. A malformed entry is logged with its key and
//! skipped; the other peers are still applied. No private key is ever part of a peer entry.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use mesh_proto::peer_entry::{PeerSet, entry_stem, parse_entries};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

/// Why the peer directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading the peer directory {}: {source}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the peers come from.
#[derive(Clone)]
pub enum PeerSource {
    /// `<name>.yaml` files of a directory, re-read every `interval`.
    Dir { path: PathBuf, interval: Duration },
    /// The data keys of one Secret, watched.
    Secret {
        client: kube::Client,
        namespace: String,
        name: String,
    },
    /// A set maintained by the caller (`None` until it is known).
    Fixed(watch::Receiver<Option<PeerSet>>),
}

impl fmt::Debug for PeerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerSource::Dir { path, interval } => f
                .debug_struct("Dir")
                .field("path", path)
                .field("interval", interval)
                .finish(),
            PeerSource::Secret {
                namespace, name, ..
            } => write!(f, "Secret({namespace}/{name})"),
            PeerSource::Fixed(_) => f.write_str("Fixed"),
        }
    }
}

// === impl PeerSource ===

impl PeerSource {
    /// Starts following the source. The receiver holds `None` until the source was read
    /// once (so nothing is withdrawn before the configuration is known).
    pub(crate) fn spawn(self, shutdown: CancellationToken) -> watch::Receiver<Option<PeerSet>> {
        match self {
            PeerSource::Fixed(rx) => rx,
            PeerSource::Dir { path, interval } => {
                let (tx, rx) = watch::channel(None);
                let span = info_span!("peer_source", dir = %path.display());
                tokio::spawn(
                    async move { follow_dir(&path, interval, tx, shutdown).await }.instrument(span),
                );
                rx
            }
            PeerSource::Secret {
                client,
                namespace,
                name,
            } => {
                let (tx, rx) = watch::channel(None);
                let span = info_span!("peer_source", secret = %format!("{namespace}/{name}"));
                tokio::spawn(
                    async move {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = follow_secret(client, &namespace, &name, tx) => {}
                        }
                    }
                    .instrument(span),
                );
                rx
            }
        }
    }
}

/// Reads the peer entries of a directory.
pub fn read_dir(path: &Path) -> Result<PeerSet, SourceError> {
    let err = |source| SourceError::ReadDir {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(err)? {
        let entry = entry.map_err(err)?;
        let p = entry.path();
        let Some(key) = p.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if entry_stem(&key).is_none() || !p.is_file() {
            continue;
        }
        match std::fs::read(&p) {
            Ok(content) => files.push((key, content)),
            Err(error) => warn!(path = %p.display(), %error, "cannot read a peer file; skipped"),
        }
    }
    Ok(parse_entries(
        files.iter().map(|(k, c)| (k.as_str(), c.as_slice())),
    ))
}

fn publish(tx: &watch::Sender<Option<PeerSet>>, set: PeerSet) {
    tx.send_if_modified(|cur| {
        if cur.as_ref() == Some(&set) {
            return false;
        }
        info!(peers = ?set.keys().map(|c| c.as_str()).collect::<Vec<_>>(), "peer configuration changed");
        *cur = Some(set);
        true
    });
}

async fn follow_dir(
    path: &Path,
    interval: Duration,
    tx: watch::Sender<Option<PeerSet>>,
    shutdown: CancellationToken,
) {
    loop {
        match read_dir(path) {
            Ok(set) => publish(&tx, set),
            // Keep the last known peers: a transient error must not withdraw them.
            Err(error) => warn!(%error, "cannot read the peer directory; keeping the last peers"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn secret_peers(secret: &Secret) -> PeerSet {
    let data = secret.data.as_ref();
    parse_entries(
        data.into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.0.as_slice())),
    )
}

async fn follow_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    tx: watch::Sender<Option<PeerSet>>,
) {
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    // During a (re)list: the Secret seen, if any.
    let mut listing: Option<Option<PeerSet>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(None),
            Ok(watcher::Event::InitApply(s)) => {
                if s.metadata.name.as_deref() == Some(name) {
                    listing = Some(Some(secret_peers(&s)));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let set = listing.take().flatten().unwrap_or_default();
                publish(&tx, set);
            }
            Ok(watcher::Event::Apply(s)) if s.metadata.name.as_deref() == Some(name) => {
                publish(&tx, secret_peers(&s));
            }
            Ok(watcher::Event::Delete(s)) if s.metadata.name.as_deref() == Some(name) => {
                info!("peer Secret deleted: no peers");
                publish(&tx, PeerSet::new());
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "watching the peer Secret failed; retrying with backoff"),
        }
    }
}
