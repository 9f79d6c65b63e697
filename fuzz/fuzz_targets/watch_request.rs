//! Server side of the gRPC API: the requests a mesh-apiserver decodes and validates
//! (`WatchRequest` through `mesh_proto::request::watch_scope`, `AgentStatus` through
//! `check_report`; the edge calls the same functions). A peer never gets a scope wider than
//! the serving cluster; refusals name the offending value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::select::Reader;
use mesh_proto::pb;
use mesh_proto::request::{RequestError, check_report, watch_scope};
use prost::Message;

const LOCAL: &str = "west";

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        let Ok(req) = pb::WatchRequest::decode(bytes) else {
            return;
        };
        assert_eq!(
            pb::WatchRequest::decode(&*req.encode_to_vec()).as_ref(),
            Ok(&req)
        );
        for reader in [Reader::OwnCluster, Reader::Peer] {
            match watch_scope(LOCAL, reader, &req) {
                Ok(scope) => {
                    assert_eq!(scope.reader, reader);
                    if reader == Reader::Peer {
                        assert_eq!(scope.clusters.as_ref().map(|c| c.len()), Some(1));
                        assert!(scope.clusters.unwrap().contains(LOCAL));
                    }
                    for k in &scope.kinds {
                        assert!(
                            matches!(pb::Kind::try_from(*k), Ok(k) if k != pb::Kind::Unspecified)
                        );
                    }
                    assert!(req.resume_revision >= 0);
                }
                Err(e) => {
                    let text = e.to_string();
                    match &e {
                        RequestError::InvalidKind(k) => assert!(text.contains(&k.to_string())),
                        RequestError::InvalidRevision(r) => {
                            assert!(*r < 0 && text.contains(&r.to_string()))
                        }
                        RequestError::ForeignCluster { requested, .. } => {
                            assert_eq!(reader, Reader::Peer);
                            assert!(text.contains(requested.as_str()));
                        }
                        RequestError::InvalidCluster(_) => {
                            assert!(
                                req.clusters.iter().any(|c| text.contains(&format!("{c:?}"))
                                    || text.contains(c.as_str())),
                                "{text}"
                            );
                        }
                        other => panic!("unexpected refusal of a watch request: {other}"),
                    }
                }
            }
        }
    } else {
        let Ok(report) = pb::AgentStatus::decode(bytes) else {
            return;
        };
        assert_eq!(
            pb::AgentStatus::decode(&*report.encode_to_vec()).as_ref(),
            Ok(&report)
        );
        let own = check_report(Some(&report.node), &report);
        assert_eq!(own, check_report(None, &report));
        if own.is_ok() {
            assert!(!report.node.is_empty() && !report.node.contains('/'));
            let other = format!("{}x", report.node);
            assert!(matches!(
                check_report(Some(&other), &report),
                Err(RequestError::NodeMismatch { .. })
            ));
        }
    }
});
