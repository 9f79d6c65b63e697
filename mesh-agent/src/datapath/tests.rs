use super::*;

#[test]
fn datapath_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Datapath>();
}

#[test]
fn ipv6_prefixes_are_refused_with_the_prefix_named() {
    let net: IpNet = "fd00::/64".parse().unwrap();
    let Err(err) = ipcache_key(net) else {
        panic!("an IPv6 prefix must be refused");
    };
    assert!(err.to_string().contains("fd00::/64"), "{err}");
    let key = ipcache_key("10.1.2.0/24".parse().unwrap()).unwrap();
    assert_eq!(key.prefix_len(), 24);
    assert_eq!(key.data().to_ne_bytes(), [10, 1, 2, 0]);
}
