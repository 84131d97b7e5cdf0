//! Plugging a container's network namespace into the node's bridge with a veth pair: the host
//! side `gv<idx>c<container>n<nic>` joins the bridge, the peer is made directly inside the
//! container's namespace under its final name (`eth0`), so no temporary name ever appears on
//! the node. Bridge ports are in hairpin mode so that a container reaches its own port forwards
//! (the DNAT'ed packet goes back out the port it came in by when `br_netfilter` is loaded).

use super::bridge::NatBridge;
use super::ops::{NetOps, NetnsRef, OpsError};
use super::valid_ifname;
use std::net::Ipv4Addr;

/// Why a container's nic could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The nic's description cannot work.
    #[error("invalid nic {nic} of container {container_idx}: {reason}")]
    Invalid {
        /// The container's numeric id.
        container_idx: u32,
        /// The nic's index.
        nic: u8,
        /// What is wrong.
        reason: String,
    },
    /// The host side of the veth already exists.
    #[error("interface {name} already exists: the nic is already attached")]
    Exists {
        /// The host-side name.
        name: String,
    },
    /// A host effect failed.
    #[error("{step} for {veth}: {source}")]
    Ops {
        /// What was being done.
        step: &'static str,
        /// The host-side veth name.
        veth: String,
        /// The failure.
        source: OpsError,
    },
}

/// A container nic on the node's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerNic {
    /// The container's numeric id on the node (never reused).
    pub container_idx: u32,
    /// The nic's index within the container.
    pub nic_idx: u8,
    /// The container's network namespace.
    pub netns: NetnsRef,
    /// The container's address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default route's gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// The MAC address to set (`aa:bb:cc:dd:ee:ff`), if any.
    pub hwaddr: Option<String>,
    /// The interface's name inside the container, e.g. `eth0`.
    pub name_inside: String,
}

/// The host-side name of a container nic's veth: `gv<idx>c<container>n<nic>`, refused when it
/// is longer than 15 characters.
pub fn veth_name(node_idx: u16, container_idx: u32, nic_idx: u8) -> Result<String, AttachError> {
    let name = format!("gv{node_idx}c{container_idx}n{nic_idx}");
    if !valid_ifname(&name) {
        return Err(AttachError::Invalid {
            container_idx,
            nic: nic_idx,
            reason: format!("the veth name {name} is longer than 15 characters"),
        });
    }
    Ok(name)
}

/// Whether `mac` is six `:`-separated hex pairs of a unicast address.
fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// Attaches a container nic to `bridge`: makes the veth pair with the peer inside the
/// container's namespace, puts the host side on the bridge and up, then inside the container
/// sets the MAC (if given), the address, brings the nic and `lo` up and adds the default route.
/// Returns the host-side name. On failure the pair is deleted again.
pub fn attach_container(
    ops: &dyn NetOps,
    bridge: &NatBridge,
    nic: &ContainerNic,
) -> Result<String, AttachError> {
    let host = veth_name(bridge.idx(), nic.container_idx, nic.nic_idx)?;
    let invalid = |reason: String| AttachError::Invalid {
        container_idx: nic.container_idx,
        nic: nic.nic_idx,
        reason,
    };
    if !valid_ifname(&nic.name_inside) {
        return Err(invalid(format!(
            "{:?} is not an interface name",
            nic.name_inside
        )));
    }
    if nic.prefix > 32 {
        return Err(invalid(format!("prefix length {} is above 32", nic.prefix)));
    }
    if let Some(mac) = &nic.hwaddr
        && !valid_mac(mac)
    {
        return Err(invalid(format!("{mac:?} is not a unicast MAC address")));
    }
    let op = |step: &'static str| {
        let veth = host.clone();
        move |source| AttachError::Ops { step, veth, source }
    };
    let ns = nic.netns.ip_arg();
    let mut add = vec![
        "link",
        "add",
        &host,
        "type",
        "veth",
        "peer",
        "name",
        &nic.name_inside,
    ];
    if let Some(mac) = &nic.hwaddr {
        add.extend(["address", mac.as_str()]);
    }
    add.extend(["netns", ns.as_str()]);
    match ops.ip(&add) {
        Ok(_) => {}
        // The host side's name is the container's: a link with it means it is attached.
        Err(OpsError::Failed { stderr, .. }) if stderr.contains("File exists") => {
            return Err(AttachError::Exists { name: host });
        }
        Err(e) => return Err(op("creating the veth pair")(e)),
    }

    // Two `ip` processes for the rest: one on the host side, one in the container.
    let configure = || -> Result<(), AttachError> {
        // Hairpin: with br_netfilter loaded, a container reaching a port forward of its own
        // leaves and comes back through the same bridge port.
        ops.ip_batch(
            None,
            &[
                &["link", "set", &host, "master", bridge.name(), "up"],
                &[
                    "link",
                    "set",
                    &host,
                    "type",
                    "bridge_slave",
                    "hairpin",
                    "on",
                ],
            ],
        )
        .map_err(op("attaching the veth to the bridge (hairpin on)"))?;
        let cidr = format!("{}/{}", nic.ip, nic.prefix);
        let gw = nic.gateway.map(|g| g.to_string());
        let dev = nic.name_inside.as_str();
        let mut inside: Vec<Vec<&str>> = vec![
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &cidr, "dev", dev],
            vec!["link", "set", dev, "up"],
        ];
        if let Some(gw) = &gw {
            inside.push(vec!["route", "replace", "default", "via", gw, "dev", dev]);
        }
        let inside: Vec<&[&str]> = inside.iter().map(Vec::as_slice).collect();
        ops.ip_batch(Some(&nic.netns), &inside).map_err(op(
            "configuring the container's nic (lo, address, link, route)",
        ))
    };
    if let Err(e) = configure() {
        if let Err(cleanup) = ops.ip(&["link", "del", &host]) {
            tracing::warn!(veth = %host, error = %cleanup, "cannot delete the veth of a failed attach");
        }
        return Err(e);
    }
    tracing::info!(veth = %host, bridge = bridge.name(), ip = %nic.ip, "attached a container nic");
    Ok(host)
}

/// Detaches a container nic: deletes the host side of its veth, which deletes the pair. A link
/// that is already gone (the container's namespace died with it) is fine; returns whether there
/// was one.
pub fn detach_container(
    ops: &dyn NetOps,
    bridge: &NatBridge,
    container_idx: u32,
    nic_idx: u8,
) -> Result<bool, AttachError> {
    let host = veth_name(bridge.idx(), container_idx, nic_idx)?;
    match ops.ip(&["link", "del", &host]) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(source) => Err(AttachError::Ops {
            step: "deleting the veth",
            veth: host,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::bridge::BridgeConfig;
    use crate::net::ops::fake::FakeOps;

    fn bridge(ops: &FakeOps, idx: u16) -> NatBridge {
        let name = format!("gridbr{idx}");
        ops.reply(
            &format!("ip -j -d link show dev {name}"),
            r#"[{"flags":["UP"],"linkinfo":{"info_kind":"bridge"}}]"#,
        );
        ops.reply(&format!("ip -j addr show dev {name}"), "[{}]");
        ops.fail(
            &format!("nft -j list table inet grid{idx}"),
            "No such file or directory",
        );
        let b = NatBridge::ensure(ops, BridgeConfig::for_index(idx)).expect("fake ensure works");
        ops.calls.borrow_mut().clear();
        b
    }

    fn nic() -> ContainerNic {
        ContainerNic {
            container_idx: 7,
            nic_idx: 0,
            netns: NetnsRef::Pid(4242),
            ip: Ipv4Addr::new(172, 18, 0, 2),
            prefix: 16,
            gateway: Some(Ipv4Addr::new(172, 18, 0, 1)),
            hwaddr: Some("02:00:00:00:00:07".into()),
            name_inside: "eth0".into(),
        }
    }

    #[test]
    fn names_fit_in_15_characters() {
        assert_eq!(veth_name(0, 1, 0).ok().as_deref(), Some("gv0c1n0"));
        assert_eq!(
            veth_name(999, 9_999_999, 9).ok().as_deref(),
            Some("gv999c9999999n9")
        );
        assert!(veth_name(999, 10_000_000, 9).is_err());
        assert!(veth_name(999, 1_000_000, 255).is_err());
        assert!(veth_name(0, u32::MAX, 255).is_err());
    }

    #[test]
    fn attach_commands() {
        let ops = FakeOps::default();
        let b = bridge(&ops, 0);
        let name = attach_container(&ops, &b, &nic()).expect("attach works");
        assert_eq!(name, "gv0c7n0");
        assert_eq!(
            ops.changes(),
            vec![
                "ip link add gv0c7n0 type veth peer name eth0 address 02:00:00:00:00:07 netns 4242",
                "ip link set gv0c7n0 master gridbr0 up",
                "ip link set gv0c7n0 type bridge_slave hairpin on",
                "ip@4242 link set lo up",
                "ip@4242 addr add 172.18.0.2/16 dev eth0",
                "ip@4242 link set eth0 up",
                "ip@4242 route replace default via 172.18.0.1 dev eth0",
            ]
        );
    }

    #[test]
    fn attach_cleans_up_on_failure_and_refuses_bad_input() {
        let ops = FakeOps::default();
        let b = bridge(&ops, 0);
        ops.fail(
            "ip@4242 addr add 172.18.0.2/16 dev eth0",
            "RTNETLINK answers: File exists",
        );
        let e = attach_container(&ops, &b, &nic()).expect_err("address fails");
        let text = e.to_string();
        assert!(
            text.contains("configuring the container's nic") && text.contains("addr add"),
            "{e}"
        );
        assert_eq!(
            ops.changes().last().map(String::as_str),
            Some("ip link del gv0c7n0")
        );

        let ops = FakeOps::default();
        let b = bridge(&ops, 0);
        ops.fail(
            "ip link add gv0c7n0 type veth peer name eth0 address 02:00:00:00:00:07 netns 4242",
            "RTNETLINK answers: File exists",
        );
        let e = attach_container(&ops, &b, &nic()).expect_err("already attached");
        assert!(matches!(e, AttachError::Exists { .. }), "{e}");
        // The existing link is someone's: it is left alone.
        assert!(!ops.changes().iter().any(|c| c.contains("link del")));

        for bad in [
            ContainerNic {
                hwaddr: Some("01:00:00:00:00:01".into()),
                ..nic()
            },
            ContainerNic {
                hwaddr: Some("zz".into()),
                ..nic()
            },
            ContainerNic {
                name_inside: "".into(),
                ..nic()
            },
            ContainerNic {
                prefix: 33,
                ..nic()
            },
            ContainerNic {
                container_idx: u32::MAX,
                ..nic()
            },
        ] {
            let ops = FakeOps::default();
            let b = bridge(&ops, 0);
            assert!(attach_container(&ops, &b, &bad).is_err());
            assert!(ops.calls.borrow().is_empty());
        }
    }

    #[test]
    fn detach_tolerates_a_gone_link() {
        let ops = FakeOps::default();
        let b = bridge(&ops, 2);
        assert!(detach_container(&ops, &b, 7, 0).expect("detach works"));
        ops.fail("ip link del gv2c7n0", "Cannot find device \"gv2c7n0\"");
        assert!(!detach_container(&ops, &b, 7, 0).expect("gone is fine"));
        ops.fail("ip link del gv2c7n0", "Operation not permitted");
        assert!(detach_container(&ops, &b, 7, 0).is_err());
    }
}
