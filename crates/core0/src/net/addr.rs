//! IPv4 subnets (`172.18.0.0/16`): parsing, membership and the host range.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a subnet is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The text is not `a.b.c.d/len`.
    #[error("invalid subnet {text:?}: expected a.b.c.d/len")]
    Syntax {
        /// The text given.
        text: String,
    },
    /// The prefix length is above 32.
    #[error("invalid subnet prefix length {prefix}: at most 32")]
    Prefix {
        /// The length given.
        prefix: u8,
    },
    /// The address has bits set past the prefix.
    #[error("invalid subnet {addr}/{prefix}: host bits are set (did you mean {network}/{prefix}?)")]
    HostBits {
        /// The address given.
        addr: Ipv4Addr,
        /// The prefix length given.
        prefix: u8,
        /// The network address of that prefix.
        network: Ipv4Addr,
    },
}

/// An IPv4 network: a network address and a prefix length, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network `network/prefix`; refuses host bits and prefixes above 32.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, AddrError> {
        if prefix > 32 {
            return Err(AddrError::Prefix { prefix });
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix));
        if masked != network {
            return Err(AddrError::HostBits {
                addr: network,
                prefix,
                network: masked,
            });
        }
        Ok(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The broadcast (last) address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// The first usable host address (network + 1); `None` for /31 and /32.
    pub fn first_host(&self) -> Option<Ipv4Addr> {
        (self.prefix <= 30).then(|| Ipv4Addr::from(u32::from(self.network) + 1))
    }

    /// The last usable host address (broadcast - 1); `None` for /31 and /32.
    pub fn last_host(&self) -> Option<Ipv4Addr> {
        (self.prefix <= 30).then(|| Ipv4Addr::from(u32::from(self.broadcast()) - 1))
    }
}

/// The netmask of a prefix length (at most 32) as a number.
fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || AddrError::Syntax { text: s.to_owned() };
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Self::new(addr, prefix)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test subnet is valid")
    }

    #[test]
    fn parse_and_ranges() {
        let n = net("172.18.0.0/16");
        assert_eq!(n.to_string(), "172.18.0.0/16");
        assert_eq!(n.broadcast(), Ipv4Addr::new(172, 18, 255, 255));
        assert_eq!(n.first_host(), Some(Ipv4Addr::new(172, 18, 0, 1)));
        assert_eq!(n.last_host(), Some(Ipv4Addr::new(172, 18, 255, 254)));
        assert!(n.contains(Ipv4Addr::new(172, 18, 3, 4)));
        assert!(!n.contains(Ipv4Addr::new(172, 19, 0, 1)));
        assert_eq!(net("0.0.0.0/0").broadcast(), Ipv4Addr::BROADCAST);
        assert_eq!(net("10.0.0.4/32").first_host(), None);
        assert_eq!(
            net("10.0.0.4/30").last_host(),
            Some(Ipv4Addr::new(10, 0, 0, 6))
        );
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "172.18.0.0",
            "172.18.0.0/",
            "172.18.0.0/33",
            "172.18.0/16",
            "x/1",
            "1.2.3.4/+1",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad} should not parse");
        }
        let e = "172.18.0.1/16"
            .parse::<Ipv4Net>()
            .expect_err("host bits are refused");
        assert!(e.to_string().contains("172.18.0.0/16"), "{e}");
    }

    #[test]
    fn serde_as_text() {
        let n = net("10.1.0.0/24");
        let j = serde_json::to_string(&n).expect("serializes");
        assert_eq!(j, "\"10.1.0.0/24\"");
        assert_eq!(serde_json::from_str::<Ipv4Net>(&j).expect("parses back"), n);
    }
}
