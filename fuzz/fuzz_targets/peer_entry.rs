//! The peer Secret / directory entries (`mesh_proto::peer_entry`): the first line is the
//! entry's key (Secret data key or file name), the rest its content. An accepted entry
//! renders (as `meshctl connect` writes it) and parses back to itself; a refused one names
//! its key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_proto::peer_entry::{parse_entry, render_entry, split_address};

fuzz_target!(|data: &[u8]| {
    let (key, content) = mesh_fuzz::split(data, b'\n');
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    match parse_entry(key, content) {
        Ok(Some(spec)) => {
            assert!(split_address(&spec.address).is_ok());
            let rendered = render_entry(&spec);
            let again = parse_entry(key, rendered.as_bytes())
                .unwrap_or_else(|e| panic!("rendered entry {rendered:?} refused: {e}"))
                .expect("still an entry");
            assert_eq!(again, spec, "{rendered}");
        }
        Ok(None) => {}
        Err(e) => assert!(e.to_string().contains(&format!("{key:?}")), "{e}"),
    }
    if let Ok(address) = std::str::from_utf8(content)
        && let Ok((host, port)) = split_address(address)
    {
        assert!(!host.is_empty() && port != 0);
    }
});
