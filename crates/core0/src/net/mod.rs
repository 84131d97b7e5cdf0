//! Node networking: the NAT bridge, veth pairs, nftables table and port forwards.
//!
//! Everything here acts on the network namespace of the calling thread, through the [`NetOps`]
//! trait (the real implementation shells out to `ip` and `nft`). Every kernel object Grid makes
//! is named from the node's short index `idx` (0..=999), because interface names have at most
//! 15 characters: the bridge `gridbr<idx>`, the nftables table `inet grid<idx>` and the host side
//! of each veth pair `gv<idx>c<container>n<nic>`. Nothing else on the host is touched: no other
//! table, chain, interface or route is created, edited or deleted.
//!
//! - [`bridge`]: the NAT bridge and Grid's own nftables table ([`NatBridge::ensure`]).
//! - [`ipam`]: a persisted address per container name ([`Ipam`]).
//! - [`veth`]: plugging a container's network namespace into the bridge ([`attach_container`]).
//! - [`forward`]: host port forwards as DNAT rules ([`add_forwards`]) and the check for another
//!   table that drops forwarded traffic ([`check_forward_policy`]).

pub mod addr;
pub mod bridge;
pub mod forward;
pub mod ipam;
pub mod nft;
pub mod ops;
pub mod veth;

pub use addr::Ipv4Net;
pub use bridge::{BridgeConfig, BridgeError, NatBridge};
pub use forward::{
    ForwardError, ForwardRule, PortForward, Proto, add_forwards, check_forward_policy,
    list_forwards, remove_forwards,
};
pub use ipam::{Ipam, IpamError};
pub use ops::{HostOps, NetOps, NetnsRef, OpsError};
pub use veth::{AttachError, ContainerNic, attach_container, detach_container, veth_name};

/// Longest kernel interface name (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;

/// Highest node index: it must fit in every kernel name Grid makes.
pub const MAX_NODE_IDX: u16 = 999;

/// Whether `name` is usable as a kernel interface name: 1 to 15 characters, none of them `/`,
/// whitespace, `:` or control characters, and not `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames() {
        assert!(valid_ifname("gridbr0"));
        assert!(valid_ifname("gv999c1234567n9"));
        assert!(!valid_ifname("gv999c12345678n9"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a b"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname(".."));
    }
}
