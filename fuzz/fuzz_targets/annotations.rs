//! The Cilium service annotations (`mesh_core::parse_service_annotations`): lines of
//! `key=value`; a line's first byte, if it is a digit, stands for one of the six keys
//! (current and legacy). Every problem names an annotation that was given, and an
//! annotation with a problem has its default effect: parsing without the bad annotations
//! gives the same result.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::annotations::parse_service_annotations;

const KEYS: [&str; 6] = [
    "service.cilium.io/global",
    "io.cilium/global-service",
    "service.cilium.io/shared",
    "io.cilium/shared-service",
    "service.cilium.io/affinity",
    "io.cilium/service-affinity",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .map(|line| {
            let (k, v) = line.split_once('=').unwrap_or((line, ""));
            match k.as_bytes() {
                [d] if d.is_ascii_digit() => (KEYS[usize::from(d - b'0') % KEYS.len()], v),
                _ => (k, v),
            }
        })
        .collect();
    let (parsed, problems) = parse_service_annotations(pairs.iter().copied());
    for p in &problems {
        assert!(pairs.iter().any(|(k, _)| *k == p.key), "{p}");
        assert!(p.to_string().contains(&p.key), "{p}");
    }
    // The last value of a key wins (a map would hold only it).
    let last: std::collections::BTreeMap<&str, &str> = pairs.iter().copied().collect();
    let (from_map, map_problems) = parse_service_annotations(last.iter().map(|(k, v)| (*k, *v)));
    assert_eq!(from_map, parsed);
    assert_eq!(map_problems.len(), problems.len());
});
