//! Server TLS state and its reload from files.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mesh_core::ClusterName;
use rustls_pki_types::CertificateDer;
use tracing::{info, warn};

use super::*;

/// One immutable generation of the server's TLS configuration.
pub struct ServerTlsState {
    pub config: Arc<rustls::ServerConfig>,
    pub trust: Arc<TrustStore>,
    pub identity: Arc<TlsIdentity>,
}

/// The server's TLS configuration, swappable at runtime: new connections use the newest
/// generation; [`authenticate`] checks against the newest trust store.
pub struct ServerTls {
    state: RwLock<Arc<ServerTlsState>>,
    /// Modification stamps of the files of the last successful load from files, taken
    /// before reading them (a write during the read triggers another reload).
    loaded_stamps: std::sync::Mutex<Option<FileStamps>>,
}

type FileStamps = Vec<Option<(SystemTime, u64)>>;

/// The files a server's TLS configuration is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The serving certificate chain (PEM).
    pub cert: PathBuf,
    /// The serving key (PEM).
    pub key: PathBuf,
    /// The local cluster's CA bundle (PEM).
    pub ca: PathBuf,
}

// === impl ServerTls ===

impl ServerTls {
    /// Builds the server configuration: `identity` serves, client certificates are required
    /// and must chain to a CA of `trust`.
    pub fn new(identity: TlsIdentity, trust: TrustStore) -> Result<Arc<Self>> {
        let state = build_state(Arc::new(identity), Arc::new(trust))?;
        Ok(Arc::new(Self {
            state: RwLock::new(Arc::new(state)),
            loaded_stamps: std::sync::Mutex::new(None),
        }))
    }

    /// Loads the serving cert, key and the local CA from files.
    pub fn from_files(local: ClusterName, files: &ServerTlsFiles) -> Result<Arc<Self>> {
        let stamps = file_stamps(files);
        let identity = TlsIdentity::load(&files.cert, &files.key)?;
        let trust = TrustStore::new(local, load_certs(&files.ca)?)?;
        let this = Self::new(identity, trust)?;
        *this.loaded_stamps.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamps);
        Ok(this)
    }

    /// The current generation.
    pub fn current(&self) -> Arc<ServerTlsState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current trust store.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.current().trust.clone()
    }

    /// Replaces the serving certificate and key.
    pub fn set_identity(&self, identity: TlsIdentity) -> Result<()> {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let next = build_state(Arc::new(identity), guard.trust.clone())?;
        *guard = Arc::new(next);
        Ok(())
    }

    /// Changes the trust store with `f`; nothing changes when `f` or the rebuild fails.
    pub fn update_trust(&self, f: impl FnOnce(&mut TrustStore) -> Result<()>) -> Result<()> {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut trust = (*guard.trust).clone();
        f(&mut trust)?;
        let next = build_state(guard.identity.clone(), Arc::new(trust))?;
        *guard = Arc::new(next);
        Ok(())
    }

    /// Registers (or replaces) the CA bundle of a peer cluster.
    pub fn add_peer_ca(
        &self,
        cluster: ClusterName,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<()> {
        info!(cluster = %cluster, certs = ca.len(), "trusting CA of cluster");
        self.update_trust(|t| t.insert(cluster, ca))
    }

    /// Forgets the CA of a peer cluster; returns whether it was registered.
    pub fn remove_peer_ca(&self, cluster: &ClusterName) -> Result<bool> {
        let mut removed = false;
        self.update_trust(|t| {
            removed = t.remove(cluster)?;
            Ok(())
        })?;
        if removed {
            info!(cluster = %cluster, "no longer trusting CA of cluster");
        }
        Ok(removed)
    }

    /// Authenticates the caller of a request served through [`tls_incoming`].
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Caller, AuthError> {
        let conn = ConnInfo::of(request).ok_or(AuthError::NoCertificate { remote: None })?;
        authenticate(conn, &self.trust())
    }

    /// Reloads the serving cert, key and the local CA from `files`, keeping the peer CAs.
    pub fn reload_from_files(&self, files: &ServerTlsFiles) -> Result<()> {
        let stamps = file_stamps(files);
        let identity = TlsIdentity::load(&files.cert, &files.key)?;
        let ca = load_certs(&files.ca)?;
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut trust = (*guard.trust).clone();
        let local = trust.local_cluster().clone();
        trust.insert(local, ca)?;
        let next = build_state(Arc::new(identity), Arc::new(trust))?;
        *guard = Arc::new(next);
        *self.loaded_stamps.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamps);
        Ok(())
    }

    /// Polls `files` every `every` and reloads them when their modification time or size
    /// differs from the last successful load ([`ServerTls::from_files`] or
    /// [`ServerTls::reload_from_files`]; when the state was not built from files, the first
    /// poll loads them). A failed reload (e.g. cert written, key not yet) keeps the previous
    /// configuration and is retried at the next poll. Runs until dropped.
    pub async fn watch_files(self: Arc<Self>, files: ServerTlsFiles, every: Duration) {
        let mut last_failed: Option<FileStamps> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = file_stamps(&files);
            let loaded = self
                .loaded_stamps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if loaded.as_ref() == Some(&now) {
                continue;
            }
            match self.reload_from_files(&files) {
                Ok(()) => {
                    info!(cert = %files.cert.display(), ca = %files.ca.display(), "reloaded TLS files");
                    last_failed = None;
                }
                Err(error) => {
                    if last_failed.as_ref() != Some(&now) {
                        warn!(%error, "reloading TLS files failed; keeping the previous configuration");
                    }
                    last_failed = Some(now);
                }
            }
        }
    }
}

fn file_stamps(files: &ServerTlsFiles) -> FileStamps {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn build_state(identity: Arc<TlsIdentity>, trust: Arc<TrustStore>) -> Result<ServerTlsState> {
    let mut config = rustls::ServerConfig::builder_with_provider(trust.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(trust.client_verifier())
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(ServerTlsState {
        config: Arc::new(config),
        trust,
        identity,
    })
}
