//! The peer entry format: how one peer apiserver is described to the importer, in
//! mesh-apiserver's peer Secret or directory (written by `meshctl connect`, read by the
//! apiserver's `peer::source`). Here, so meshctl shares it without the apiserver.
//!
//! One entry per peer, named `<cluster>.yaml` (or `.yml`, `.json`): a data key of the
//! Secret, or a file of the directory. The content is YAML or JSON:
//!
//! ```yaml
//! name: east                      # optional; must equal the entry's <cluster> when present
//! address: east.example.com:7443  # host:port of the peer's mesh-apiserver; DNS names allowed
//! ca: |                           # the peer cluster's CA bundle (PEM)
//!   -----BEGIN CERTIFICATE-----
//!   ...
//! serverName: mesh.east.example   # optional; the name its certificate is checked against
//!                                 # (default: the host of `address`)
//! ```
//!
//! Other keys (e.g. a `README`) are not entries. No private key is ever part of an entry.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use mesh_core::ClusterName;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::tls;

/// The configured peers, by name.
pub type PeerSet = BTreeMap<ClusterName, PeerSpec>;

/// One configured peer.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: ClusterName,
    /// `host:port`; the host is a DNS name or an IP literal (`[v6]:port`).
    pub address: String,
    /// The peer cluster's CA bundle (PEM).
    pub ca_pem: String,
    /// The name the server certificate is verified against (default: the host).
    pub server_name: Option<String>,
}

impl fmt::Debug for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSpec")
            .field("name", &self.name.as_str())
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a peer entry is refused. Each names the entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("peer entry {key:?}: {name:?} is not a valid cluster name: {source}")]
    InvalidName {
        key: String,
        name: String,
        #[source]
        source: mesh_core::Error,
    },
    #[error("peer entry {key:?}: cannot parse YAML/JSON: {source}")]
    Parse {
        key: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("peer entry {key:?}: names cluster {name:?}, but its key says {stem:?}")]
    NameMismatch {
        key: String,
        name: String,
        stem: String,
    },
    #[error("peer entry {key:?}: invalid address {address:?}: {reason}")]
    InvalidAddress {
        key: String,
        address: String,
        reason: String,
    },
    #[error("peer entry {key:?}: invalid CA bundle: {source}")]
    InvalidCa {
        key: String,
        #[source]
        source: tls::TlsError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerEntry {
    #[serde(default)]
    name: Option<String>,
    address: String,
    ca: String,
    #[serde(default)]
    server_name: Option<String>,
}

/// The cluster name an entry key stands for, or `None` for keys that are not peer entries.
pub fn entry_stem(key: &str) -> Option<&str> {
    [".yaml", ".yml", ".json"]
        .iter()
        .find_map(|ext| key.strip_suffix(ext))
}

/// Splits `host:port`, checking the port; IPv6 literals must be bracketed.
pub fn split_address(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_owned())?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid port {port:?}"))?;
    let host = if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| "unbalanced '[' in the host".to_owned())?;
        inner
            .parse::<IpAddr>()
            .map_err(|_| format!("{inner:?} is not an IPv6 address"))?;
        inner.to_owned()
    } else {
        if host.contains(':') {
            return Err("an IPv6 address must be written [addr]:port".into());
        }
        host.to_owned()
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    Ok((host, port))
}

/// Parses one entry. `Ok(None)`: the key is not a peer entry and is ignored.
pub fn parse_entry(key: &str, content: &[u8]) -> Result<Option<PeerSpec>, EntryError> {
    let Some(stem) = entry_stem(key) else {
        return Ok(None);
    };
    let name = ClusterName::new(stem).map_err(|source| EntryError::InvalidName {
        key: key.into(),
        name: stem.into(),
        source,
    })?;
    let entry: PeerEntry = serde_yaml::from_slice(content).map_err(|source| EntryError::Parse {
        key: key.into(),
        source,
    })?;
    if let Some(n) = &entry.name
        && n != stem
    {
        return Err(EntryError::NameMismatch {
            key: key.into(),
            name: n.clone(),
            stem: stem.into(),
        });
    }
    let address = entry.address.trim().to_owned();
    split_address(&address).map_err(|reason| EntryError::InvalidAddress {
        key: key.into(),
        address: address.clone(),
        reason,
    })?;
    tls::parse_certs(entry.ca.as_bytes(), &format!("peer entry {key}")).map_err(|source| {
        EntryError::InvalidCa {
            key: key.into(),
            source,
        }
    })?;
    Ok(Some(PeerSpec {
        name,
        address,
        ca_pem: entry.ca,
        server_name: entry.server_name.filter(|s| !s.is_empty()),
    }))
}

/// Parses every entry; bad ones are logged with their key and skipped.
pub fn parse_entries<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> PeerSet {
    let mut set = PeerSet::new();
    for (key, content) in entries {
        match parse_entry(key, content) {
            Ok(Some(spec)) => {
                set.insert(spec.name.clone(), spec);
            }
            Ok(None) => debug!(key, "ignoring a key that is not a peer entry"),
            Err(error) => warn!(%error, "skipping an invalid peer entry"),
        }
    }
    set
}

/// The serialized form of an entry, in the order people read it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RenderedEntry<'a> {
    name: &'a str,
    address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<&'a str>,
    ca: &'a str,
}

/// Renders a peer entry in the format [`parse_entry`] reads (for `meshctl connect` and tests).
/// Serialized by serde_yaml, so any value (quotes, colons, newlines, control characters)
/// reads back as written: `parse_entry(render_entry(spec)) == spec`.
pub fn render_entry(spec: &PeerSpec) -> String {
    serde_yaml::to_string(&RenderedEntry {
        name: spec.name.as_str(),
        address: &spec.address,
        server_name: spec.server_name.as_deref(),
        ca: &spec.ca_pem,
    })
    .expect("a struct of strings always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBXzCCAQWgAwIBAgIUJ2\n-----END CERTIFICATE-----\n";

    #[test]
    fn addresses() {
        assert_eq!(split_address("east:7443").unwrap(), ("east".into(), 7443));
        assert_eq!(
            split_address("[fd00::1]:7443").unwrap(),
            ("fd00::1".into(), 7443)
        );
        for bad in [
            "east",
            "east:0",
            "east:x",
            ":7443",
            "fd00::1:7443",
            "[east]:1",
        ] {
            assert!(split_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entries_are_validated_and_named() {
        assert!(parse_entry("README", b"hello").unwrap().is_none());
        let e = parse_entry("east.yaml", b"address: [").unwrap_err();
        assert!(e.to_string().contains("east.yaml"), "{e}");
        let e = parse_entry(
            "east.yaml",
            format!("name: west\naddress: a:1\nca: {CA:?}").as_bytes(),
        )
        .unwrap_err();
        assert!(matches!(e, EntryError::NameMismatch { .. }), "{e}");
        let e = parse_entry("East.yaml", b"address: a:1\nca: x").unwrap_err();
        assert!(matches!(e, EntryError::InvalidName { .. }), "{e}");
        let e = parse_entry("east.json", br#"{"address": "a", "ca": "x"}"#).unwrap_err();
        assert!(matches!(e, EntryError::InvalidAddress { .. }), "{e}");
        let e = parse_entry("east.json", br#"{"address": "a:1", "ca": "garbage"}"#).unwrap_err();
        assert!(matches!(e, EntryError::InvalidCa { .. }), "{e}");
    }

    /// Found by fuzzing (the `peer_entry` target's round trip): entries were rendered with Rust's `{:?}`
    /// escaping, which is not YAML's (a control character or a `\\u{..}` escape did not read
    /// back, and a server name could break the line). They are serialized by serde_yaml now.
    #[test]
    fn rendered_entries_read_back_as_written() {
        let ca = mesh_testkit::certs::TestCa::new("east");
        for (address, server_name) in [
            ("east.example:7443", Some("mesh.east")),
            ("\u{1}east:7443", Some("a\u{7f}b")),
            ("[fd00::1]:7443", Some("x: y\n#z")),
            ("host:1", Some("'quoted' \"and\" \\ back")),
            ("host:1", None),
        ] {
            let spec = PeerSpec {
                name: "east".parse().unwrap(),
                address: address.into(),
                ca_pem: format!("{}\n  indented trailer  ", ca.cert_pem),
                server_name: server_name.map(String::from),
            };
            let rendered = render_entry(&spec);
            let parsed = parse_entry("east.yaml", rendered.as_bytes())
                .unwrap_or_else(|e| panic!("{rendered}: {e}"))
                .unwrap();
            assert_eq!(parsed, spec, "{rendered}");
        }
    }

    #[test]
    fn bad_entries_do_not_hide_good_ones() {
        let ca = mesh_testkit::certs::TestCa::new("east");
        let spec = PeerSpec {
            name: "east".parse().unwrap(),
            address: "east.example:7443".into(),
            ca_pem: ca.cert_pem.clone(),
            server_name: Some("mesh.east".into()),
        };
        let good = render_entry(&spec);
        let set = parse_entries([
            ("east.yaml", good.as_bytes()),
            ("west.yaml", b"nonsense: [".as_slice()),
        ]);
        assert_eq!(set.len(), 1);
        assert_eq!(set[&spec.name], spec);
        let json = serde_json::json!({"address": "10.0.0.1:7443", "ca": ca.cert_pem}).to_string();
        let set = parse_entries([("south.json", json.as_bytes())]);
        assert_eq!(
            set[&"south".parse::<ClusterName>().unwrap()].address,
            "10.0.0.1:7443"
        );
    }
}
