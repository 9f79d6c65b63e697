//! The raw calls and the read-only opening against the real kernel, on maps
//! this test creates with `BPF_MAP_CREATE` (no eBPF object needed). Needs
//! root (CAP_BPF; CAP_SYS_ADMIN to mount a bpffs) and fails without it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    process::Command,
};

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use ipnet::IpNet;

use crate::sys::{self, Access, BatchError, MapShape, RawMap};
use crate::{
    BackendValue, DatapathDump, IpcacheValue, MAP_BACKENDS, MAP_IPCACHE, MAP_REV_NAT, MAP_SERVICES,
    MAP_SOCK_REV, PROTO_TCP, ServiceEntryKey, ServiceEntryValue, ip_to_raw, layout,
    open_pinned_readonly,
};

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "these tests create real eBPF maps and mount a bpffs: run them as root"
    );
}

/// The shape bpf/mesh.h gives `map`, with room for `max_entries` only.
fn small_shape(map: &str, max_entries: u32) -> MapShape {
    let (_, shape) = crate::layout::expected_shapes()
        .into_iter()
        .find(|(name, _)| *name == map)
        .unwrap();
    MapShape {
        max_entries,
        ..shape
    }
}

fn create(shape: MapShape) -> OwnedFd {
    sys::map_create(shape).unwrap_or_else(|e| panic!("BPF_MAP_CREATE {shape:?}: {e}"))
}

/// A bpffs mounted on a temporary directory, unmounted on drop.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mounted() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mesh-maps-bpffs")
            .tempdir()
            .unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount -t bpf bpf {}", dir.path().display());
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Unmounting drops the pins; the maps go with their last fd.
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn service_entries(n: u32) -> (Vec<layout::ServiceKey>, Vec<layout::ServiceValue>) {
    (0..n)
        .map(|i| {
            let key = ServiceEntryKey::master(Ipv4Addr::from(0x0a60_0000 + i), 80, PROTO_TCP);
            (
                layout::ServiceKey::from(key),
                layout::ServiceValue::from(ServiceEntryValue::master(1)),
            )
        })
        .unzip()
}

#[test]
fn batch_calls_refuse_element_types_of_another_size() {
    require_root();
    let shape = small_shape(MAP_SERVICES, 256);
    let map = RawMap::from_fd("test_services", create(shape)).unwrap();
    assert_eq!(map.shape(), shape, "the shape is the kernel's");
    let (keys, values) = service_entries(100);

    // A key type of 8 bytes for 12-byte keys: the kernel would read 8 bytes
    // past each key's slot; refused before the call, naming map and sizes.
    let wrong_keys: Vec<u64> = (0..100).collect();
    let err = map.update_batch(&wrong_keys, &values).unwrap_err();
    assert!(
        matches!(
            err,
            BatchError::SizeMismatch {
                what: "key",
                rust_size: 8,
                map_size: 12,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("test_services"), "{err}");
    // A value type of 16 bytes for 28-byte values on lookup: the kernel would
    // write past the buffer.
    let err = map
        .lookup_all::<layout::ServiceKey, [u32; 4]>(64)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BatchError::SizeMismatch {
                what: "value",
                rust_size: 16,
                map_size: 28,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        map.lookup_all::<layout::ServiceKey, layout::ServiceValue>(64)
            .unwrap()
            .is_empty(),
        "a refused update writes nothing"
    );

    // The right types: written in one call, read back in chunks of 64 (so
    // the position token is passed between calls).
    map.update_batch(&keys, &values).unwrap();
    let read: BTreeMap<ServiceEntryKey, ServiceEntryValue> = map
        .lookup_all::<layout::ServiceKey, layout::ServiceValue>(64)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let written: BTreeMap<ServiceEntryKey, ServiceEntryValue> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    assert_eq!(read.len(), 100);
    assert_eq!(read, written);
}

#[test]
fn pinned_maps_are_opened_read_only_and_dumped() {
    require_root();
    let bpffs = Bpffs::mounted();
    let maps_dir = bpffs.path().join("maps");
    std::fs::create_dir(&maps_dir).unwrap();
    // The agent's maps as bpf/mesh.h shapes them (rev_nat and sock_rev, the programs' own
    // per-socket records, are not read).
    let mut rw = BTreeMap::new();
    for (name, shape) in crate::layout::expected_shapes() {
        if name == MAP_REV_NAT || name == MAP_SOCK_REV {
            continue;
        }
        // A ring buffer's size is a power-of-2 number of pages: keep it.
        let max_entries = if shape.map_type == sys::BPF_MAP_TYPE_RINGBUF {
            shape.max_entries
        } else {
            shape.max_entries.min(1024)
        };
        let fd = create(MapShape {
            max_entries,
            ..shape
        });
        sys::obj_pin(fd.as_fd(), &maps_dir.join(name)).unwrap();
        rw.insert(name, fd);
    }

    // Programmed through read-write handles.
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let master = ServiceEntryKey::master(vip, 80, PROTO_TCP);
    let backend = BackendValue {
        ip: Ipv4Addr::new(10, 1, 0, 5),
        port: 8080,
        proto: PROTO_TCP,
        cluster_id: 1,
        flags: 0,
    };
    let services = RawMap::from_fd(MAP_SERVICES, rw.remove(MAP_SERVICES).unwrap()).unwrap();
    services
        .update_batch::<layout::ServiceKey, layout::ServiceValue>(
            &[master.into(), master.with_slot(1).into()],
            &[
                ServiceEntryValue::master(1).into(),
                ServiceEntryValue::backend(7, backend).into(),
            ],
        )
        .unwrap();
    let backends = RawMap::from_fd(MAP_BACKENDS, rw.remove(MAP_BACKENDS).unwrap()).unwrap();
    backends
        .update_batch::<u32, layout::BackendValue>(&[7], &[backend.into()])
        .unwrap();
    let net: IpNet = "10.1.0.0/24".parse().unwrap();
    let ipcache_value = IpcacheValue {
        identity: 300,
        tunnel_endpoint: Some(Ipv4Addr::new(172, 31, 1, 11)),
        cluster_id: 1,
        flags: 0,
    };
    let mut ipcache: LpmTrie<MapData, u32, layout::IpcacheValue> =
        aya::maps::Map::from_map_data(MapData::from_fd(rw.remove(MAP_IPCACHE).unwrap()).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    ipcache
        .insert(
            &Key::new(24, ip_to_raw(Ipv4Addr::new(10, 1, 0, 0))),
            layout::IpcacheValue::from(ipcache_value),
            0,
        )
        .unwrap();

    let mut ro = open_pinned_readonly(bpffs.path()).unwrap();
    let mut expected = DatapathDump::default();
    expected
        .services
        .insert(master, ServiceEntryValue::master(1));
    expected
        .services
        .insert(master.with_slot(1), ServiceEntryValue::backend(7, backend));
    expected.backends.insert(7, backend);
    expected.ipcache.insert(net, ipcache_value);
    assert_eq!(ro.dump().unwrap(), expected);
    assert!(ro.flows().unwrap().is_empty());
    // Point lookups find what the dump holds, and nothing for keys never written.
    assert_eq!(
        ro.service(master).unwrap(),
        Some(ServiceEntryValue::master(1))
    );
    assert_eq!(
        ro.service(master.with_slot(1)).unwrap(),
        Some(ServiceEntryValue::backend(7, backend))
    );
    assert_eq!(ro.service(master.with_slot(2)).unwrap(), None);
    assert_eq!(
        ro.service(ServiceEntryKey::master(vip, 81, PROTO_TCP))
            .unwrap(),
        None
    );
    assert_eq!(ro.backend(7).unwrap(), Some(backend));
    assert_eq!(ro.backend(8).unwrap(), None);

    // Every handle is read-only: the kernel refuses writes through the batch
    // fd and through aya's typed handle alike.
    let err = ro
        .lb
        .raw
        .backends
        .update_batch::<u32, layout::BackendValue>(&[8], &[backend.into()])
        .unwrap_err();
    assert!(
        matches!(&err, BatchError::Kernel { source, .. } if source.raw_os_error() == Some(libc::EPERM)),
        "{err}"
    );
    let err = ro
        .lb
        .backends
        .insert(8, layout::BackendValue::from(backend), 0);
    assert!(
        err.is_err(),
        "a write through the typed read-only handle must fail"
    );
    assert_eq!(ro.dump().unwrap(), expected, "nothing was written");

    // A read-write open of the same pin can write: the refusal came from the
    // access mode, not from the map.
    let rw_backends = RawMap::open_pinned(
        &maps_dir.join(MAP_BACKENDS),
        MAP_BACKENDS,
        Access::ReadWrite,
    )
    .unwrap();
    rw_backends
        .update_batch::<u32, layout::BackendValue>(&[8], &[backend.into()])
        .unwrap();
    assert_eq!(ro.dump().unwrap().backends.len(), 2);
}
