//! Address allocation on a node's bridge subnet: one address per container name, kept in
//! `<data dir>/net/ipam.json` so that a container keeps its address across stop and start (and
//! across core0 restarts) until it is deleted.

use super::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Why an address could not be allocated, released or persisted.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every host address of the subnet is taken.
    #[error("no free address left in {subnet} ({leases} containers hold one)")]
    Exhausted {
        /// The subnet.
        subnet: Ipv4Net,
        /// How many leases there are.
        leases: usize,
    },
    /// The subnet has no host addresses besides the gateway.
    #[error("subnet {subnet} is too small for containers")]
    TooSmall {
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The state file was written for another subnet.
    #[error("{path} holds addresses of subnet {stored}, not of the configured {configured}")]
    SubnetChanged {
        /// The state file.
        path: PathBuf,
        /// The subnet in the file.
        stored: Ipv4Net,
        /// The subnet configured now.
        configured: Ipv4Net,
    },
    /// The state file holds an address outside the subnet or a duplicate.
    #[error("{path} is inconsistent: {reason}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the state file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// The state file's content.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    subnet: Ipv4Net,
    leases: BTreeMap<String, Ipv4Addr>,
}

/// The addresses handed out on one bridge subnet, persisted after every change. The gateway
/// (the subnet's first host address) is never handed out.
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    subnet: Ipv4Net,
    leases: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    /// The state file of a node: `<data dir>/net/ipam.json`.
    pub fn default_path(data_dir: &Path) -> PathBuf {
        data_dir.join("net").join("ipam.json")
    }

    /// Loads the state at `path` (none yet is an empty state) for `subnet`.
    pub fn open(path: impl Into<PathBuf>, subnet: Ipv4Net) -> Result<Self, IpamError> {
        let path = path.into();
        if subnet.first_host().is_none() {
            return Err(IpamError::TooSmall { subnet });
        }
        let leases = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| IpamError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if state.subnet != subnet {
                    return Err(IpamError::SubnetChanged {
                        path,
                        stored: state.subnet,
                        configured: subnet,
                    });
                }
                let mut seen = HashSet::new();
                for (name, ip) in &state.leases {
                    if !Self::usable(subnet, *ip) || !seen.insert(*ip) {
                        return Err(IpamError::Corrupt {
                            path,
                            reason: format!(
                                "address {ip} of {name:?} is not a free host address of {subnet}"
                            ),
                        });
                    }
                }
                state.leases
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(IpamError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        Ok(Self {
            path,
            subnet,
            leases,
        })
    }

    /// Whether `ip` may be handed out on `subnet`: a host address other than the gateway.
    fn usable(subnet: Ipv4Net, ip: Ipv4Addr) -> bool {
        match (subnet.first_host(), subnet.last_host()) {
            (Some(gw), Some(last)) => ip > gw && ip <= last,
            _ => false,
        }
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The address of container `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.leases.get(name).copied()
    }

    /// Every lease, by container name.
    pub fn leases(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.leases
    }

    /// The address of container `name`: the one it already has, else the lowest free host
    /// address above the gateway (persisted before it is returned).
    pub fn allocate(&mut self, name: &str) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.get(name) {
            return Ok(ip);
        }
        let (Some(gw), Some(last)) = (self.subnet.first_host(), self.subnet.last_host()) else {
            return Err(IpamError::TooSmall {
                subnet: self.subnet,
            });
        };
        let used: HashSet<u32> = self.leases.values().map(|ip| u32::from(*ip)).collect();
        let ip = (u32::from(gw) + 1..=u32::from(last))
            .find(|n| !used.contains(n))
            .map(Ipv4Addr::from)
            .ok_or(IpamError::Exhausted {
                subnet: self.subnet,
                leases: self.leases.len(),
            })?;
        self.leases.insert(name.to_owned(), ip);
        if let Err(e) = self.save() {
            self.leases.remove(name);
            return Err(e);
        }
        Ok(ip)
    }

    /// Frees the address of container `name` (on delete); returns it, `None` if it had none.
    pub fn release(&mut self, name: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(ip) = self.leases.remove(name) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.leases.insert(name.to_owned(), ip);
            return Err(e);
        }
        Ok(Some(ip))
    }

    /// Writes the state: a temporary file beside it, then a rename.
    fn save(&self) -> Result<(), IpamError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| IpamError::Io {
                action,
                path,
                source,
            }
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let state = State {
            subnet: self.subnet,
            leases: self.leases.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| IpamError::Io {
            action: "encoding",
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("renaming into", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test subnet is valid")
    }

    #[test]
    fn lowest_free_address_and_stable_across_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = Ipam::default_path(dir.path());
        let subnet = net("172.18.0.0/16");
        let mut ipam = Ipam::open(&path, subnet).expect("opens");
        assert_eq!(ipam.allocate("a").ok(), Some(Ipv4Addr::new(172, 18, 0, 2)));
        assert_eq!(ipam.allocate("b").ok(), Some(Ipv4Addr::new(172, 18, 0, 3)));
        assert_eq!(ipam.allocate("c").ok(), Some(Ipv4Addr::new(172, 18, 0, 4)));
        // Same name, same address (stop/start).
        assert_eq!(ipam.allocate("b").ok(), Some(Ipv4Addr::new(172, 18, 0, 3)));
        // A release frees the lowest slot for the next one.
        assert_eq!(
            ipam.release("b").ok().flatten(),
            Some(Ipv4Addr::new(172, 18, 0, 3))
        );
        assert_eq!(ipam.release("b").ok().flatten(), None);
        assert_eq!(ipam.allocate("d").ok(), Some(Ipv4Addr::new(172, 18, 0, 3)));
        drop(ipam);

        // core0 restarts: the same addresses come back.
        let mut ipam = Ipam::open(&path, subnet).expect("reopens");
        assert_eq!(ipam.get("a"), Some(Ipv4Addr::new(172, 18, 0, 2)));
        assert_eq!(ipam.get("d"), Some(Ipv4Addr::new(172, 18, 0, 3)));
        assert_eq!(ipam.allocate("c").ok(), Some(Ipv4Addr::new(172, 18, 0, 4)));
        assert_eq!(ipam.leases().len(), 3);
        assert_eq!(ipam.allocate("e").ok(), Some(Ipv4Addr::new(172, 18, 0, 5)));
    }

    #[test]
    fn exhaustion() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ipam.json");
        // /29: gateway .1, hosts .2 to .6.
        let mut ipam = Ipam::open(&path, net("10.0.0.0/29")).expect("opens");
        for i in 2..=6u8 {
            assert_eq!(
                ipam.allocate(&format!("c{i}")).ok(),
                Some(Ipv4Addr::new(10, 0, 0, i))
            );
        }
        let e = ipam.allocate("full").expect_err("exhausted");
        assert!(matches!(e, IpamError::Exhausted { leases: 5, .. }), "{e}");
        assert_eq!(ipam.get("full"), None);
        ipam.release("c4").expect("releases");
        assert_eq!(ipam.allocate("full").ok(), Some(Ipv4Addr::new(10, 0, 0, 4)));
        assert!(Ipam::open(&path, net("10.0.0.0/31")).is_err());
    }

    #[test]
    fn refuses_another_subnet_and_corrupt_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("net").join("ipam.json");
        let mut ipam = Ipam::open(&path, net("10.0.0.0/24")).expect("opens");
        ipam.allocate("a").expect("allocates");
        let e = Ipam::open(&path, net("10.0.1.0/24")).expect_err("subnet changed");
        assert!(matches!(e, IpamError::SubnetChanged { .. }), "{e}");

        std::fs::write(
            &path,
            r#"{"subnet":"10.0.0.0/24","leases":{"a":"10.0.0.1"}}"#,
        )
        .expect("writes");
        let e = Ipam::open(&path, net("10.0.0.0/24")).expect_err("gateway leased");
        assert!(matches!(e, IpamError::Corrupt { .. }), "{e}");
        std::fs::write(
            &path,
            r#"{"subnet":"10.0.0.0/24","leases":{"a":"10.0.0.5","b":"10.0.0.5"}}"#,
        )
        .expect("writes");
        assert!(Ipam::open(&path, net("10.0.0.0/24")).is_err());
        std::fs::write(&path, "garbage").expect("writes");
        assert!(Ipam::open(&path, net("10.0.0.0/24")).is_err());
    }
}
