//! Typed identifiers: node ids and job ids, validated where they enter the system.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// What kind of id.
        kind: &'static str,
    },
    /// The id is too long.
    #[error("{kind} is longer than {max} characters")]
    TooLong {
        /// What kind of id.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// The id holds a character outside the allowed set.
    #[error("{kind} may only hold letters, digits, '-', '_' and '.' (got {value:?})")]
    BadChar {
        /// What kind of id.
        kind: &'static str,
        /// The offending id.
        value: String,
    },
}

fn check(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(IdError::BadChar {
            kind,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// A node id: by default the MAC of the NIC holding the default route, colons removed
/// (`525400123456`). Any short name of `[A-Za-z0-9._-]` is accepted so tests can override it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Longest node id accepted.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a node id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check("node id", &value, Self::MAX_LEN)?;
        Ok(Self(value))
    }

    /// Builds a node id from a MAC address such as `52:54:00:12:34:56`.
    pub fn from_mac(mac: &str) -> Result<Self, IdError> {
        Self::new(mac.replace(':', "").to_ascii_lowercase())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job id (the `id` of a core0 command). Clients use UUIDs; any short name of
/// `[A-Za-z0-9._-]` is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Longest job id accepted.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps a job id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check("job id", &value, Self::MAX_LEN)?;
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_from_mac_drops_colons() {
        let id = NodeId::from_mac("52:54:00:12:34:56").expect("valid mac");
        assert_eq!(id.as_str(), "525400123456");
    }

    #[test]
    fn ids_refuse_bad_input() {
        assert!(matches!(NodeId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(JobId::new("a/b"), Err(IdError::BadChar { .. })));
        assert!(matches!(
            JobId::new("x".repeat(200)),
            Err(IdError::TooLong { .. })
        ));
        assert!(JobId::new("3f2c-11.ab_c").is_ok());
    }
}
