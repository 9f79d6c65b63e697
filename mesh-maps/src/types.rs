//! Plain Rust views of the map entries, in host types (`Ipv4Addr`, host-order
//! ports). This is what the agent's desired-state planner produces and what a
//! dump returns, so the two can be diffed directly.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::IpNet;

use crate::layout;

/// IP protocol numbers used in service keys.
pub const PROTO_TCP: u8 = 6;
/// IP protocol numbers used in service keys.
pub const PROTO_UDP: u8 = 17;

/// Key of `mesh_services`: one frontend `(vip, port, proto)` and a slot.
/// Slot 0 is the master entry (its value's `count` is the number of backend
/// slots); slots `1..=count` point to backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceEntryKey {
    pub vip: Ipv4Addr,
    /// Host order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub slot: u16,
}

impl ServiceEntryKey {
    /// The master entry (slot 0) of a frontend.
    pub fn master(vip: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            vip,
            port,
            proto,
            slot: 0,
        }
    }

    /// Backend slot `slot` (1-based) of the same frontend.
    pub fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Value of `mesh_services`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceEntryValue {
    /// Slot > 0: the backend (key of `mesh_backends`). Slot 0: unused (0).
    pub backend_id: u32,
    /// Slot 0: number of backend slots; 0 means "refuse connections".
    /// Slot > 0: unused (0).
    pub count: u16,
    pub flags: u32,
    /// Slot > 0: the copy of the backend's `mesh_backends` entry the datapath reads (the
    /// agent keeps it equal to that entry). Slot 0: `None`.
    pub backend: Option<BackendValue>,
}

impl ServiceEntryValue {
    /// A master entry with `count` backend slots.
    pub fn master(count: u16) -> Self {
        Self {
            count,
            ..Self::default()
        }
    }

    /// A slot entry pointing at `backend_id`, whose `mesh_backends` entry is `backend`.
    pub fn backend(backend_id: u32, backend: BackendValue) -> Self {
        Self {
            backend_id,
            backend: Some(backend),
            ..Self::default()
        }
    }
}

/// Value of `mesh_backends` (keyed by a non-zero backend id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub ip: Ipv4Addr,
    /// Host order.
    pub port: u16,
    pub proto: u8,
    pub cluster_id: u16,
    pub flags: u32,
}

/// Value of `mesh_ipcache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    /// The node hosting the endpoint, if known.
    pub tunnel_endpoint: Option<Ipv4Addr>,
    pub cluster_id: u16,
    pub flags: u32,
}

/// A (source identity, destination identity) pair of the flow counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityPair {
    pub src: u32,
    pub dst: u32,
}

/// Flow counters of one identity pair, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// The full content of the service, backend and ipcache maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathDump {
    pub services: BTreeMap<ServiceEntryKey, ServiceEntryValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
}

// === conversions to and from the raw layouts ===

/// Network-order `u32` (as stored in the maps) of an address.
pub fn ip_to_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address of a network-order `u32` read from a map.
pub fn ip_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

impl From<ServiceEntryKey> for layout::ServiceKey {
    fn from(k: ServiceEntryKey) -> Self {
        Self {
            vip: ip_to_raw(k.vip),
            port: k.port.to_be(),
            slot: k.slot,
            proto: k.proto,
            pad: [0; 3],
        }
    }
}

impl From<layout::ServiceKey> for ServiceEntryKey {
    fn from(k: layout::ServiceKey) -> Self {
        Self {
            vip: ip_from_raw(k.vip),
            port: u16::from_be(k.port),
            proto: k.proto,
            slot: k.slot,
        }
    }
}

impl From<ServiceEntryValue> for layout::ServiceValue {
    fn from(v: ServiceEntryValue) -> Self {
        Self {
            backend_id: v.backend_id,
            count: v.count,
            pad: 0,
            flags: v.flags,
            backend: v.backend.map(Into::into).unwrap_or_default(),
        }
    }
}

impl From<layout::ServiceValue> for ServiceEntryValue {
    fn from(v: layout::ServiceValue) -> Self {
        Self {
            backend_id: v.backend_id,
            count: v.count,
            flags: v.flags,
            // Backend ids are never 0: a slot entry carries the copy, a master entry none.
            backend: (v.backend_id != 0).then(|| v.backend.into()),
        }
    }
}

impl From<BackendValue> for layout::BackendValue {
    fn from(v: BackendValue) -> Self {
        Self {
            ip: ip_to_raw(v.ip),
            port: v.port.to_be(),
            proto: v.proto,
            pad: 0,
            cluster_id: v.cluster_id,
            pad2: 0,
            flags: v.flags,
        }
    }
}

impl From<layout::BackendValue> for BackendValue {
    fn from(v: layout::BackendValue) -> Self {
        Self {
            ip: ip_from_raw(v.ip),
            port: u16::from_be(v.port),
            proto: v.proto,
            cluster_id: v.cluster_id,
            flags: v.flags,
        }
    }
}

impl From<IpcacheValue> for layout::IpcacheValue {
    fn from(v: IpcacheValue) -> Self {
        Self {
            identity: v.identity,
            tunnel_endpoint: v.tunnel_endpoint.map(ip_to_raw).unwrap_or(0),
            cluster_id: v.cluster_id,
            pad: 0,
            flags: v.flags,
        }
    }
}

impl From<layout::IpcacheValue> for IpcacheValue {
    fn from(v: layout::IpcacheValue) -> Self {
        Self {
            identity: v.identity,
            tunnel_endpoint: (v.tunnel_endpoint != 0).then(|| ip_from_raw(v.tunnel_endpoint)),
            cluster_id: v.cluster_id,
            flags: v.flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_is_network_order_in_memory() {
        let key = ServiceEntryKey {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: PROTO_TCP,
            slot: 3,
        };
        let raw = layout::ServiceKey::from(key);
        assert_eq!(raw.vip.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(raw.port.to_ne_bytes(), [0, 80]);
        assert_eq!(raw.slot, 3);
        assert_eq!(raw.pad, [0; 3]);
        assert_eq!(ServiceEntryKey::from(raw), key);
    }

    #[test]
    fn backend_and_ipcache_round_trip() {
        let backend = BackendValue {
            ip: Ipv4Addr::new(10, 0, 1, 5),
            port: 8080,
            proto: PROTO_UDP,
            cluster_id: 7,
            flags: 1,
        };
        let raw = layout::BackendValue::from(backend);
        assert_eq!(raw.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(BackendValue::from(raw), backend);

        for tunnel_endpoint in [None, Some(Ipv4Addr::new(192, 168, 0, 2))] {
            let v = IpcacheValue {
                identity: (3 << 16) | 300,
                tunnel_endpoint,
                cluster_id: 3,
                flags: 2,
            };
            assert_eq!(IpcacheValue::from(layout::IpcacheValue::from(v)), v);
        }
    }
}
