//! The server's CA and certificate (rcgen), its rustls config, the bearer token, and the
//! kubeconfig that clients use.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

use super::KubeApiError;
use super::util;

/// The material a server needs and its clients trust.
pub(crate) struct Material {
    pub ca_pem: String,
    pub token: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KubeApiError + '_ {
    move |source| KubeApiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), KubeApiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Loads `ca.crt`/`ca.key`/`token` from `dir` (so kubeconfigs survive restarts) or creates
/// them, then issues a fresh serving certificate for localhost, 127.0.0.1, the listen address
/// and `extra_sans`.
pub(crate) fn prepare(
    dir: &Path,
    cluster: &str,
    listen: SocketAddr,
    extra_sans: &[String],
) -> Result<Material, KubeApiError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (ca_crt, ca_key, token_path) = (dir.join("ca.crt"), dir.join("ca.key"), dir.join("token"));

    let (ca_pem, ca_keypair) = if ca_crt.exists() && ca_key.exists() {
        let pem = std::fs::read_to_string(&ca_crt).map_err(io_err(&ca_crt))?;
        let key_pem = std::fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        (pem, KeyPair::from_pem(&key_pem)?)
    } else {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("mesh-lab kube-api CA {cluster}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        write_private(&ca_key, &key.serialize_pem())?;
        std::fs::write(&ca_crt, cert.pem()).map_err(io_err(&ca_crt))?;
        (cert.pem(), key)
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_keypair)?;

    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = util::random_hex(24);
            write_private(&token_path, &t)?;
            t
        }
    };

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("mesh-lab kube-api {cluster}"));
    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::DnsName("kubernetes.default.svc".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        sans.push(SanType::IpAddress(listen.ip()));
    }
    for s in extra_sans {
        match s.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(s.as_str().try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    let server_crt = dir.join("server.crt");
    std::fs::write(&server_crt, cert.pem()).map_err(io_err(&server_crt))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(KubeApiError::Tls)?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(KubeApiError::Tls)?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Material {
        ca_pem,
        token,
        server_config: Arc::new(server_config),
    })
}

/// Writes a kubeconfig with one cluster, user and context named `context` and returns its path.
pub(crate) fn write_kubeconfig(
    dir: &Path,
    context: &str,
    server: &str,
    ca_pem: &str,
    token: &str,
) -> Result<PathBuf, KubeApiError> {
    let cfg = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {
            "server": server,
            "certificate-authority-data": util::base64_encode(ca_pem.as_bytes()),
        }}],
        "users": [{"name": context, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}],
        "current-context": context,
        "preferences": {},
    });
    let text = serde_yaml::to_string(&cfg).map_err(|e| KubeApiError::Io {
        path: dir.join("kubeconfig"),
        source: std::io::Error::other(e),
    })?;
    let path = dir.join("kubeconfig");
    write_private(&path, &text)?;
    Ok(path)
}
