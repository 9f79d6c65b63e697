//! PEM and certificate handling (`mesh_proto::tls`): the first byte picks the path.
//! 0: PEM text as a CA bundle, a key, and a cert/key pair (split at the first NUL);
//! 1: DER bytes as a peer's certificate (SPIFFE ID from its URI SAN, trust store);
//! 2: a SPIFFE URI. A SPIFFE ID read from anywhere formats back to the URI it came from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::ClusterName;
use mesh_proto::tls::{SpiffeId, TlsIdentity, TrustStore, parse_certs, parse_key, spiffe_id_of};
use rustls_pki_types::CertificateDer;

fn check_spiffe(uri: &str) {
    if let Ok(id) = SpiffeId::parse(uri) {
        assert_eq!(id.uri(), uri);
        assert_eq!(SpiffeId::parse(&id.uri()).as_ref().ok(), Some(&id));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(certs) = parse_certs(bytes, "fuzz") {
                assert!(!certs.is_empty());
                for c in &certs {
                    if let Ok(id) = spiffe_id_of(c) {
                        check_spiffe(&id.uri());
                    }
                }
            }
            let _ = parse_key(bytes, "fuzz");
            let (cert, key) = mesh_fuzz::split(bytes, 0);
            let _ = TlsIdentity::from_pem(cert, key);
        }
        1 => {
            let cert = CertificateDer::from(bytes.to_vec());
            if let Ok(id) = spiffe_id_of(&cert) {
                check_spiffe(&id.uri());
            }
            let east = ClusterName::new("east").unwrap();
            let _ = TrustStore::new(east, vec![cert]);
        }
        _ => {
            if let Ok(uri) = std::str::from_utf8(bytes) {
                check_spiffe(uri);
            }
        }
    }
});
