//! Label and field selectors of the lab API (`?labelSelector=`, `?fieldSelector=`): a
//! selector either parses or is a 400; a parsed label selector's canonical form
//! (`Scale.status.selector`) parses back to the same selector and matches the same objects.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_lab::kube_api::{FieldSelector, LabelSelector};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let objects = [
        json!({"metadata": {"name": "a", "labels": {"app": "web", "tier": "fe", "x": ""}}}),
        json!({"metadata": {"name": "b", "namespace": "n"}, "spec": {"nodeName": "x"}}),
    ];
    match LabelSelector::parse(text) {
        Ok(sel) => {
            let form = sel.to_string_form();
            let again = LabelSelector::parse(&form)
                .unwrap_or_else(|e| panic!("canonical form {form:?} of {text:?} refused: {e:?}"));
            assert_eq!(again, sel, "{text:?} -> {form:?}");
            for o in &objects {
                assert_eq!(again.matches(o), sel.matches(o));
            }
        }
        Err(e) => assert_eq!(e.code, 400, "{e:?}"),
    }
    match FieldSelector::parse(text) {
        Ok(sel) => {
            for o in &objects {
                let _ = sel.matches(o);
            }
            let _ = sel.name();
        }
        Err(e) => assert_eq!(e.code, 400, "{e:?}"),
    }
});
