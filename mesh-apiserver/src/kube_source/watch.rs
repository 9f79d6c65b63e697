//! The watchers: one kube-rs watcher per resource kind, feeding [`SourceEvent`]s.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::*;
use crate::publisher::PublisherMetrics;

/// Starts one watcher per kind, feeding `tx`. Each runs with kube-rs's default backoff
/// until `token` is cancelled or the receiver is dropped.
pub fn spawn_watchers(
    client: kube::Client,
    tx: mpsc::Sender<SourceEvent>,
    metrics: Arc<PublisherMetrics>,
    token: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for kind in ResourceKind::ALL {
        let fut = watch_kind(client.clone(), kind, tx.clone(), metrics.clone());
        let token = token.clone();
        set.spawn(
            async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = fut => {}
                }
            }
            .instrument(info_span!("watch", %kind)),
        );
    }
    set
}

async fn watch_kind(
    client: kube::Client,
    kind: ResourceKind,
    tx: mpsc::Sender<SourceEvent>,
    metrics: Arc<PublisherMetrics>,
) {
    let ar = kind.api_resource();
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // A policy type the API does not serve is an empty list, logged once (module docs).
    let mut absent = false;
    let decode_one = |obj: DynamicObject| -> Option<SlimObject> {
        let key = key_of(&obj);
        match decode(kind, obj) {
            Ok(o) => Some(o),
            Err(error) => {
                metrics.decode_failure(kind);
                warn!(%kind, object = %key, %error, "skipping an object that cannot be decoded");
                None
            }
        }
    };
    while let Some(event) = stream.next().await {
        if event.is_ok() {
            absent = false;
        }
        let out = match event {
            Ok(Event::Apply(obj)) => decode_one(obj).map(SourceEvent::Apply),
            Ok(Event::InitApply(obj)) => decode_one(obj).map(SourceEvent::InitApply),
            Ok(Event::Delete(obj)) => Some(SourceEvent::Delete(kind, key_of(&obj))),
            Ok(Event::Init) => {
                debug!(%kind, "list started");
                Some(SourceEvent::Init(kind))
            }
            Ok(Event::InitDone) => {
                debug!(%kind, "list done");
                Some(SourceEvent::InitDone(kind))
            }
            Err(error) if kind.policy_kind().is_some() && not_served(&error) => {
                if absent {
                    debug!(%kind, "still not served");
                    None
                } else {
                    absent = true;
                    warn!(%kind, %error,
                        "the API does not serve this policy type (CRD not installed?): treating it as empty and retrying with backoff");
                    // An empty relist: removes what a vanished type held and lets the
                    // policy kind be marked synced.
                    if tx.send(SourceEvent::Init(kind)).await.is_err() {
                        return;
                    }
                    Some(SourceEvent::InitDone(kind))
                }
            }
            Err(error) => {
                metrics.watch_error(kind);
                warn!(%kind, %error, "watch failed; retrying with backoff");
                None
            }
        };
        if let Some(ev) = out
            && tx.send(ev).await.is_err()
        {
            return;
        }
    }
}

/// Whether a watcher error says the resource type is not served (HTTP 404 on list/watch).
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.is_not_found(),
        watcher::Error::WatchError(s) => s.is_not_found(),
        _ => false,
    }
}
