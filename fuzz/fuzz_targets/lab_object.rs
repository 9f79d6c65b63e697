//! The lab API's JSON objects: the first byte picks the resource type (every built-in type,
//! CustomResourceDefinitions included), the rest is the request body (JSON or YAML), created
//! in a fresh in-memory store with namespace `default`. An object is created or refused
//! with a 4xx (never a 500); a created object reads back as stored, a second create is a
//! 409, and writing it back unchanged (PUT, empty merge patch) keeps it as it was.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_lab::kube_api::patch::parse_body;
use mesh_lab::kube_api::resources::{ALL, NAMESPACES};
use mesh_lab::kube_api::{PatchType, Store, StoreConfig};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let rt = ALL[usize::from(which) % ALL.len()];
    let Ok(obj) = parse_body(body) else {
        return;
    };
    let store = Store::new(StoreConfig::default());
    store
        .create(
            &NAMESPACES,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        )
        .expect("namespace default");
    let ns = rt.namespaced.then_some("default");
    let created = match store.create(rt, ns, obj.clone()) {
        Ok(o) => o,
        Err(e) => {
            assert!((400..500).contains(&e.code), "{} {obj}: {e:?}", rt.kind);
            return;
        }
    };
    let name = created["metadata"]["name"]
        .as_str()
        .expect("a created object has a name");
    let got = store
        .get(rt, ns, name)
        .expect("a created object reads back");
    assert_eq!(got, created);
    let again = store
        .create(rt, ns, created.clone())
        .expect_err("a second create");
    assert_eq!(again.code, 409, "{again:?}");
    let put = store
        .update(rt, ns, name, created.clone())
        .unwrap_or_else(|e| panic!("{} {name}: writing it back unchanged: {e:?}", rt.kind));
    assert_eq!(put, created, "a no-op PUT changed the object");
    let patched = store
        .patch(rt, ns, name, PatchType::Merge, b"{}")
        .unwrap_or_else(|e| panic!("{} {name}: empty merge patch: {e:?}", rt.kind));
    assert_eq!(patched, created, "an empty merge patch changed the object");
});
