use mesh_core::ClusterName;
use rustls_pki_types::CertificateDer;

use super::*;

#[test]
fn spiffe_ids_roundtrip() {
    let a = ClusterName::new("east-1").unwrap();
    for id in [
        SpiffeId::apiserver(a.clone()),
        SpiffeId::agent(a.clone(), "node-1.zone"),
        SpiffeId {
            cluster: a,
            role: SpiffeRole::Operator {
                name: "admin".into(),
            },
        },
    ] {
        assert_eq!(SpiffeId::parse(&id.uri()).unwrap(), id);
    }
    assert_eq!(
        SpiffeId::agent(ClusterName::new("c").unwrap(), "n").uri(),
        "spiffe://c.mesh/agent/n"
    );
}

#[test]
fn bad_spiffe_ids_are_named() {
    for bad in [
        "https://a.mesh/apiserver",
        "spiffe://a.mesh",
        "spiffe://a.example/apiserver",
        "spiffe://A.mesh/apiserver",
        "spiffe://default.mesh/apiserver",
        "spiffe://a.mesh/agent/",
        "spiffe://a.mesh/agent/Node_1",
        "spiffe://a.mesh/controller",
        "spiffe://a.mesh/operator/",
        "spiffe://a.mesh/apiserver/x",
    ] {
        let err = SpiffeId::parse(bad).unwrap_err();
        assert!(
            matches!(err, AuthError::InvalidSpiffeId { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains(bad), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::Unauthenticated
        );
    }
}

#[test]
fn no_certificate_is_unauthenticated() {
    let ca = rcgen_ca();
    let trust = TrustStore::new(ClusterName::new("a").unwrap(), vec![ca]).unwrap();
    let conn = ConnInfo {
        remote_addr: Some("127.0.0.1:4000".parse().unwrap()),
        local_addr: None,
        peer_certs: None,
    };
    let err = authenticate(&conn, &trust).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:4000"), "{err}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::Unauthenticated
    );
}

#[test]
fn an_empty_ca_bundle_is_refused() {
    let err = TrustStore::new(ClusterName::new("a").unwrap(), vec![]).unwrap_err();
    assert!(err.to_string().contains("cluster a"), "{err}");
}

proptest::proptest! {
    /// The SPIFFE parser never panics, and whatever it accepts prints back to its input.
    #[test]
    fn spiffe_parser_is_total(uri in "(spiffe://)?[a-z0-9.-]{0,12}(/[a-z0-9/._-]{0,20})?") {
        if let Ok(id) = SpiffeId::parse(&uri) {
            proptest::prop_assert_eq!(id.uri(), uri);
        }
    }

    #[test]
    fn spiffe_ids_print_and_parse(cluster in "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", node in proptest::option::of("[a-z0-9][a-z0-9.-]{0,30}")) {
        proptest::prop_assume!(cluster != "default");
        let cluster = ClusterName::new(cluster).unwrap();
        let id = match node {
            Some(node) => SpiffeId::agent(cluster, node),
            None => SpiffeId::apiserver(cluster),
        };
        proptest::prop_assert_eq!(SpiffeId::parse(&id.uri()).unwrap(), id);
    }
}

fn rcgen_ca() -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().der().clone()
}
