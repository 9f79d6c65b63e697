//! Test certificates: a CA per cluster and leaf certificates with the SPIFFE identities of
//! DESIGN.md section 8. Production certificates come from `meshctl ca create` / `cert issue`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A test CA.
pub struct TestCa {
    pub cluster: String,
    pub cert_pem: String,
    key: KeyPair,
    params: CertificateParams,
}

/// A PEM certificate and key.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Validity of a leaf certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Expired,
}

// === impl TestCa ===

impl TestCa {
    pub fn new(cluster: &str) -> Self {
        let key = KeyPair::generate().expect("generating CA key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("mesh CA {cluster}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signing CA");
        TestCa {
            cluster: cluster.into(),
            cert_pem: cert.pem(),
            key,
            params,
        }
    }

    /// A leaf with `spiffe_path` (e.g. `apiserver`, `agent/node-1`) under this CA's cluster,
    /// usable as client and server, with DNS SAN `localhost` and IP SAN 127.0.0.1.
    pub fn issue(&self, spiffe_path: &str) -> TestCert {
        self.issue_for(&self.cluster, spiffe_path, Validity::Valid)
    }

    /// A leaf claiming `spiffe://<claimed_cluster>.mesh/<spiffe_path>`, signed by this CA.
    pub fn issue_for(
        &self,
        claimed_cluster: &str,
        spiffe_path: &str,
        validity: Validity,
    ) -> TestCert {
        let key = KeyPair::generate().expect("generating leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("{claimed_cluster}/{spiffe_path}"),
        );
        params.subject_alt_names = vec![
            SanType::URI(
                format!("spiffe://{claimed_cluster}.mesh/{spiffe_path}")
                    .try_into()
                    .expect("URI SAN"),
            ),
            SanType::DnsName("localhost".try_into().expect("DNS SAN")),
            SanType::IpAddress("127.0.0.1".parse().expect("IP")),
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        match validity {
            Validity::Valid => {
                params.not_before = now - time::Duration::hours(1);
                params.not_after = now + time::Duration::days(1);
            }
            Validity::Expired => {
                params.not_before = now - time::Duration::days(2);
                params.not_after = now - time::Duration::days(1);
            }
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("signing leaf");
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `ca.crt` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("{}-ca.crt", self.cluster));
        std::fs::write(&p, &self.cert_pem).expect("writing CA");
        p
    }
}

// === impl TestCert ===

impl TestCert {
    /// Writes `<name>.crt` and `<name>.key` into `dir`; returns (cert, key) paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert_pem).expect("writing cert");
        std::fs::write(&k, &self.key_pem).expect("writing key");
        (c, k)
    }
}
