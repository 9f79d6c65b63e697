//! Cluster names and IDs (DESIGN.md section 4).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Longest accepted cluster name, as Cilium (32 characters).
pub const MAX_CLUSTER_NAME_LEN: usize = 32;

/// A validated cluster name: `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 32 characters,
/// never `default`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

// === impl ClusterName ===

impl ClusterName {
    pub fn new(name: impl Into<String>) -> crate::Result<Self> {
        let name = name.into();
        let invalid = |reason| Error::InvalidClusterName {
            name: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if name.len() > MAX_CLUSTER_NAME_LEN {
            return Err(invalid("must be at most 32 characters"));
        }
        if name == "default" {
            return Err(invalid(
                "\"default\" is reserved: give every cluster of a mesh its own name",
            ));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "may contain only lowercase letters, digits and '-'",
            ));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(invalid(
                "must start and end with a lowercase letter or digit",
            ));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = Error;
    fn try_from(s: String) -> crate::Result<Self> {
        Self::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> String {
        n.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A cluster ID, 1..=255. Unique within a mesh; it forms the upper bits of identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ClusterId(u8);

// === impl ClusterId ===

impl ClusterId {
    pub fn new(id: u32) -> crate::Result<Self> {
        match u8::try_from(id) {
            Ok(v) if v != 0 => Ok(Self(v)),
            _ => Err(Error::InvalidClusterId { id }),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ClusterId {
    type Err = Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        let id = s
            .parse::<u32>()
            .map_err(|_| Error::InvalidClusterId { id: 0 })?;
        Self::new(id)
    }
}

impl TryFrom<u32> for ClusterId {
    type Error = Error;
    fn try_from(id: u32) -> crate::Result<Self> {
        Self::new(id)
    }
}

impl From<ClusterId> for u32 {
    fn from(id: ClusterId) -> u32 {
        id.0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        for ok in ["a", "c1", "east-1", "a-b-c", &"x".repeat(32)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "default",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            &"x".repeat(33),
        ] {
            let err = ClusterName::new(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn cluster_ids() {
        assert!(ClusterId::new(0).is_err());
        assert!(ClusterId::new(256).is_err());
        assert_eq!(ClusterId::new(255).unwrap().get(), 255);
        assert_eq!(ClusterId::new(1).unwrap().get(), 1);
    }
}
