//! The plan of `grid dev`'s local nodes (id and Redis port each), kept in `<data>/dev.json` when
//! the grid is persistent so that the next start resumes the same nodes.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

/// What can go wrong planning the nodes.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `dev.json` could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `dev.json` is not what `grid dev` writes.
    #[error("{path} is not a grid dev state file")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// No free local port could be found.
    #[error("cannot find a free port on 127.0.0.1")]
    FreePort(#[source] std::io::Error),
}

/// One local node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    /// Node id (12 hex digits).
    pub id: String,
    /// Port of the node's Redis on 127.0.0.1.
    pub redis_port: u16,
}

/// The content of `dev.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevState {
    /// Every node ever planned in this data directory, by index (a later start with fewer nodes
    /// keeps the others for a start with more).
    pub nodes: Vec<NodePlan>,
}

/// Whether `port` can be bound on 127.0.0.1 right now.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// `n` distinct free ports on 127.0.0.1 (held together while choosing, so they differ).
pub fn free_ports(n: usize) -> Result<Vec<u16>, StateError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StateError::FreePort)?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StateError::FreePort)
}

impl DevState {
    /// Reads `dev.json` in `dir`; an absent file is an empty state.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("dev.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Writes `dev.json` in `dir` (through a temporary file, so a crash leaves the old one).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join("dev.json");
        let tmp = dir.join("dev.json.tmp");
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Io {
                action: "write",
                path,
                source,
            })
    }

    /// The first `n` nodes: saved ones first (a saved port that is now taken is replaced, with a
    /// warning), then new ones with ids `base + index` and fresh ports. Extends `self`.
    pub fn plan(
        &mut self,
        n: usize,
        base_mac: u64,
        is_free: impl Fn(u16) -> bool,
    ) -> Result<Vec<NodePlan>, StateError> {
        let mut fresh = free_ports(n)?.into_iter();
        let mut taken: Vec<u16> = Vec::new();
        for i in 0..n {
            let port_ok = |p: u16, taken: &[u16]| is_free(p) && !taken.contains(&p);
            match self.nodes.get_mut(i) {
                Some(node) => {
                    if !port_ok(node.redis_port, &taken) {
                        let port = next_port(&mut fresh, &taken)?;
                        eprintln!(
                            "grid dev: redis port {} of node {} is in use; using {port}",
                            node.redis_port, node.id
                        );
                        node.redis_port = port;
                    }
                    taken.push(node.redis_port);
                }
                None => {
                    let port = next_port(&mut fresh, &taken)?;
                    taken.push(port);
                    let index = u64::try_from(i).unwrap_or(u64::MAX);
                    self.nodes.push(NodePlan {
                        id: super::identity::node_id(base_mac, index),
                        redis_port: port,
                    });
                }
            }
        }
        Ok(self.nodes[..n].to_vec())
    }
}

fn next_port(fresh: &mut impl Iterator<Item = u16>, taken: &[u16]) -> Result<u16, StateError> {
    if let Some(p) = fresh.by_ref().find(|p| !taken.contains(p)) {
        return Ok(p);
    }
    // Every pre-chosen port went to a saved node: choose one more.
    loop {
        let p = free_ports(1)?
            .first()
            .copied()
            .ok_or_else(|| StateError::FreePort(std::io::Error::other("no port")))?;
        if !taken.contains(&p) {
            return Ok(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_plan_uses_mac_plus_index_and_distinct_ports() {
        let mut state = DevState::default();
        let plan = state.plan(3, 0x5254_0012_3456, |_| true).expect("plan");
        let ids: Vec<_> = plan.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["525400123456", "525400123457", "525400123458"]);
        let mut ports: Vec<_> = plan.iter().map(|p| p.redis_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 3);
        assert_eq!(state.nodes, plan);
    }

    #[test]
    fn saved_plan_is_reused_and_extended_and_survives_a_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = DevState {
            nodes: vec![NodePlan {
                id: "aabbccddeeff".into(),
                redis_port: 1,
            }],
        };
        let plan = state.plan(2, 0x1000, |p| p == 1 || p > 1024).expect("plan");
        assert_eq!(plan[0].id, "aabbccddeeff");
        assert_eq!(plan[0].redis_port, 1);
        assert_eq!(plan[1].id, "000000001001");
        state.save(dir.path()).expect("save");
        assert_eq!(DevState::load(dir.path()).expect("load"), state);

        // Fewer nodes next time: the plan is a prefix, the state keeps both.
        let mut again = DevState::load(dir.path()).expect("load");
        assert_eq!(again.plan(1, 0x1000, |_| true).expect("plan"), plan[..1]);
        assert_eq!(again.nodes.len(), 2);
    }

    #[test]
    fn a_taken_saved_port_is_replaced() {
        let mut state = DevState {
            nodes: vec![NodePlan {
                id: "aabbccddeeff".into(),
                redis_port: 7,
            }],
        };
        let plan = state.plan(1, 0, |p| p != 7).expect("plan");
        assert_ne!(plan[0].redis_port, 7);
        assert_eq!(plan[0].id, "aabbccddeeff");
    }

    #[test]
    fn absent_state_is_empty_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(
            DevState::load(dir.path()).expect("load"),
            DevState::default()
        );
        std::fs::write(dir.path().join("dev.json"), "nope").expect("write");
        assert!(matches!(
            DevState::load(dir.path()),
            Err(StateError::Parse { .. })
        ));
    }
}
