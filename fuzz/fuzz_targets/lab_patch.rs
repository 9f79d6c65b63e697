//! The lab API's patches (`mesh_lab::kube_api::patch`): the first byte picks merge, JSON,
//! strategic merge or apply; the target object and the patch body follow, split at the
//! first NUL. A patch either applies or is a 4xx error; a merge patch (RFC 7386) is
//! idempotent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_lab::kube_api::PatchType;
use mesh_lab::kube_api::patch::{apply, parse_body};

const TYPES: [PatchType; 4] = [
    PatchType::Merge,
    PatchType::Json,
    PatchType::Strategic,
    PatchType::Apply,
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let kind = TYPES[usize::from(which) % TYPES.len()];
    let (target, patch) = mesh_fuzz::split(rest, 0);
    let Ok(target) = serde_json::from_slice::<serde_json::Value>(target) else {
        return;
    };
    match apply(kind, &target, patch) {
        Ok(once) => {
            if kind == PatchType::Merge {
                let twice = apply(kind, &once, patch).expect("a merge patch applies twice");
                assert_eq!(twice, once);
            }
            if matches!(kind, PatchType::Strategic | PatchType::Apply) {
                // Applying is deterministic and the body is read the same way each time.
                assert_eq!(apply(kind, &target, patch).ok(), Some(once));
            }
        }
        Err(e) => assert!((400..500).contains(&e.code), "{e:?}"),
    }
    let _ = parse_body(patch);
});
