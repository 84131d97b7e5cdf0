//! The node's NAT bridge `gridbr<idx>` and Grid's own nftables table `inet grid<idx>`.
//!
//! The table holds four base chains:
//! - `postrouting` (nat, srcnat): masquerade of the subnet's traffic leaving through another
//!   interface, and hairpin masquerade of DNAT'ed traffic going back into the bridge from the
//!   bridge itself or from the node;
//! - `prerouting` (nat, dstnat) and `output` (nat, -100): the port forwards of
//!   [`crate::net::forward`], one rule per forward with the comment `grid:<container>`;
//! - `forward` (filter, policy accept): accepts established traffic and traffic from and to the
//!   bridge.
//!
//! The fixed rules of `postrouting` and `forward` carry a `grid-base:` comment naming what they
//! were made from, so that [`NatBridge::ensure`] can tell whether they are current without
//! rewriting them.

use super::nft::{NftError, NftListing, parse_listing};
use super::ops::{NetOps, OpsError};
use super::{Ipv4Net, MAX_NODE_IDX, valid_ifname};
use serde_json::Value;
use std::net::Ipv4Addr;

/// Why the bridge or its table could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The configuration cannot work.
    #[error("invalid bridge configuration for node index {idx}: {reason}")]
    Invalid {
        /// The node index.
        idx: u16,
        /// What is wrong.
        reason: String,
    },
    /// An interface with the bridge's name exists and is something else.
    #[error("interface {name} exists and is not a bridge (it is {kind:?})")]
    NotABridge {
        /// The interface.
        name: String,
        /// Its link kind, empty for a plain device.
        kind: String,
    },
    /// A chain of Grid's table exists with another type, hook or priority.
    #[error("chain {chain} of table inet {table} is not what grid makes: {found}")]
    ChainMismatch {
        /// The table.
        table: String,
        /// The chain.
        chain: String,
        /// What it is.
        found: String,
    },
    /// A host effect failed.
    #[error("{step} for bridge {bridge}: {source}")]
    Ops {
        /// What was being done.
        step: &'static str,
        /// The bridge.
        bridge: String,
        /// The failure.
        source: OpsError,
    },
    /// `ip -j` printed something unexpected.
    #[error("cannot read the `ip -j` output for {bridge}: {reason}")]
    Parse {
        /// The bridge.
        bridge: String,
        /// Why.
        reason: String,
    },
    /// The table's listing could not be read.
    #[error(transparent)]
    Nft(#[from] NftError),
}

/// What a node's NAT bridge is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The node's short index (0..=999), in every kernel name.
    pub idx: u16,
    /// The bridge's subnet; the gateway is its first host address.
    pub subnet: Ipv4Net,
    /// The bridge's interface name (at most 15 characters).
    pub name: String,
}

impl BridgeConfig {
    /// The defaults for node index `idx`: bridge `gridbr<idx>` on [`Self::default_subnet`].
    pub fn for_index(idx: u16) -> Self {
        Self {
            idx,
            subnet: Self::default_subnet(idx),
            name: format!("gridbr{idx}"),
        }
    }

    /// The default subnet of node index `idx`: `172.(18 + idx % 10).0.0/16`, so that nodes
    /// sharing a machine get different subnets unless their indexes differ by a multiple of 10.
    pub fn default_subnet(idx: u16) -> Ipv4Net {
        let second = 18 + u8::try_from(idx % 10).expect("idx % 10 is below 10");
        Ipv4Net::new(Ipv4Addr::new(172, second, 0, 0), 16).expect("a /16 network address")
    }

    /// The nftables table (family `inet`) of this node: `grid<idx>`.
    pub fn table(&self) -> String {
        table_name(self.idx)
    }

    /// The gateway address: the subnet's first host address.
    pub fn gateway(&self) -> Result<Ipv4Addr, BridgeError> {
        self.subnet
            .first_host()
            .ok_or_else(|| BridgeError::Invalid {
                idx: self.idx,
                reason: format!("subnet {} has no room for a gateway and hosts", self.subnet),
            })
    }

    fn validate(&self) -> Result<Ipv4Addr, BridgeError> {
        let invalid = |reason: String| BridgeError::Invalid {
            idx: self.idx,
            reason,
        };
        if self.idx > MAX_NODE_IDX {
            return Err(invalid(format!("the index is above {MAX_NODE_IDX}")));
        }
        if !valid_ifname(&self.name) {
            return Err(invalid(format!(
                "{:?} is not an interface name (1 to 15 characters)",
                self.name
            )));
        }
        self.gateway()
    }
}

/// The nftables table (family `inet`) of node index `idx`.
pub fn table_name(idx: u16) -> String {
    format!("grid{idx}")
}

/// The prefix of the comment of every fixed rule Grid puts in its table.
pub const BASE_COMMENT: &str = "grid-base:";

/// A base chain of Grid's table.
struct ChainSpec {
    name: &'static str,
    kind: &'static str,
    hook: &'static str,
    prio: i64,
    prio_text: &'static str,
    /// Whether the chain holds only fixed rules (rewritten when they differ).
    fixed: bool,
}

const CHAINS: [ChainSpec; 4] = [
    ChainSpec {
        name: "postrouting",
        kind: "nat",
        hook: "postrouting",
        prio: 100,
        prio_text: "srcnat",
        fixed: true,
    },
    ChainSpec {
        name: "prerouting",
        kind: "nat",
        hook: "prerouting",
        prio: -100,
        prio_text: "dstnat",
        fixed: false,
    },
    ChainSpec {
        name: "output",
        kind: "nat",
        hook: "output",
        prio: -100,
        prio_text: "-100",
        fixed: false,
    },
    ChainSpec {
        name: "forward",
        kind: "filter",
        hook: "forward",
        prio: 0,
        prio_text: "filter",
        fixed: true,
    },
];

/// One fixed rule: its chain, its comment and its body (without the comment).
struct BaseRule {
    chain: &'static str,
    comment: String,
    body: String,
}

/// The fixed rules of a bridge's table.
fn base_rules(cfg: &BridgeConfig) -> Vec<BaseRule> {
    let (br, net) = (&cfg.name, cfg.subnet);
    let rule = |chain, key: &str, body: String| BaseRule {
        chain,
        comment: format!("{BASE_COMMENT}{key} {net} {br}"),
        body,
    };
    vec![
        // The subnet reaches the outside world through the node's address.
        rule(
            "postrouting",
            "masquerade",
            format!("meta nfproto ipv4 ip saddr {net} oifname != \"{br}\" masquerade"),
        ),
        // Hairpin: a container reaching a forward of the node (maybe its own) must see the
        // reply come back through the node, so its source becomes the gateway.
        rule(
            "postrouting",
            "hairpin",
            format!("meta nfproto ipv4 ip saddr {net} oifname \"{br}\" ct status dnat masquerade"),
        ),
        // The node reaching its own forwards (output DNAT) goes out from the gateway address.
        rule(
            "postrouting",
            "hairpin-node",
            format!(
                "meta nfproto ipv4 fib saddr type local oifname \"{br}\" ct status dnat masquerade"
            ),
        ),
        rule(
            "forward",
            "established",
            "ct state established,related accept".into(),
        ),
        rule("forward", "from-bridge", format!("iifname \"{br}\" accept")),
        rule("forward", "to-bridge", format!("oifname \"{br}\" accept")),
    ]
}

/// The nft script that brings `listing` (the current table, `None` when there is none) to the
/// shape of `cfg`; empty when nothing needs to change. Rules outside the fixed chains (the port
/// forwards) are kept.
fn table_script(cfg: &BridgeConfig, listing: Option<&NftListing>) -> Result<String, BridgeError> {
    let table = cfg.table();
    let rules = base_rules(cfg);
    let mut script = String::new();
    if listing.is_none() {
        script.push_str(&format!("add table inet {table}\n"));
    }
    for spec in &CHAINS {
        let wanted: Vec<&BaseRule> = rules.iter().filter(|r| r.chain == spec.name).collect();
        let existing = listing.and_then(|l| l.chain(spec.name));
        let rewrite = match existing {
            None => {
                script.push_str(&format!(
                    "add chain inet {table} {} {{ type {} hook {} priority {}; policy accept; }}\n",
                    spec.name, spec.kind, spec.hook, spec.prio_text
                ));
                true
            }
            Some(chain) => {
                if chain.kind.as_deref() != Some(spec.kind)
                    || chain.hook.as_deref() != Some(spec.hook)
                    || chain.prio != Some(spec.prio)
                {
                    return Err(BridgeError::ChainMismatch {
                        table,
                        chain: spec.name.into(),
                        found: format!(
                            "type {:?} hook {:?} priority {:?}",
                            chain.kind, chain.hook, chain.prio
                        ),
                    });
                }
                let have: Vec<Option<&str>> = listing
                    .map(|l| {
                        l.rules_of(spec.name)
                            .map(|r| r.comment.as_deref())
                            .collect()
                    })
                    .unwrap_or_default();
                let want: Vec<Option<&str>> =
                    wanted.iter().map(|r| Some(r.comment.as_str())).collect();
                if spec.fixed && have != want {
                    script.push_str(&format!("flush chain inet {table} {}\n", spec.name));
                    true
                } else {
                    false
                }
            }
        };
        if rewrite {
            for r in wanted {
                script.push_str(&format!(
                    "add rule inet {table} {} {} comment \"{}\"\n",
                    r.chain, r.body, r.comment
                ));
            }
        }
    }
    Ok(script)
}

/// A node's NAT bridge, made (or found) by [`NatBridge::ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatBridge {
    cfg: BridgeConfig,
    gateway: Ipv4Addr,
}

impl NatBridge {
    /// Makes the bridge and its table, or checks and completes them: creates the bridge if
    /// missing, gives it the gateway address, brings it up, turns on IPv4 forwarding in the
    /// calling thread's network namespace (logged) and creates or completes Grid's table
    /// `inet grid<idx>`. Calling it again changes nothing; port forwards already in the table
    /// are kept.
    pub fn ensure(ops: &dyn NetOps, cfg: BridgeConfig) -> Result<Self, BridgeError> {
        let gateway = cfg.validate()?;
        let br = cfg.name.clone();
        let op = |step: &'static str| {
            let bridge = br.clone();
            move |source| BridgeError::Ops {
                step,
                bridge,
                source,
            }
        };
        let parse = |reason: String| BridgeError::Parse {
            bridge: br.clone(),
            reason,
        };

        // The link.
        let link = match ops.ip(&["-j", "-d", "link", "show", "dev", &br]) {
            Ok(out) => Some(first_object(&out).map_err(parse)?),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(op("listing the link")(e)),
        };
        let up = match link {
            None => {
                ops.ip(&["link", "add", &br, "type", "bridge"])
                    .map_err(op("creating the bridge"))?;
                tracing::info!(bridge = %br, "created the bridge");
                false
            }
            Some(link) => {
                let kind = link
                    .pointer("/linkinfo/info_kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if kind != "bridge" {
                    return Err(BridgeError::NotABridge {
                        name: br,
                        kind: kind.into(),
                    });
                }
                link.get("flags")
                    .and_then(Value::as_array)
                    .is_some_and(|f| f.iter().any(|f| f == "UP"))
            }
        };

        // The gateway address.
        let addrs = ops
            .ip(&["-j", "addr", "show", "dev", &br])
            .map_err(op("listing the addresses"))?;
        let has_gateway = first_object(&addrs)
            .map_err(parse)?
            .get("addr_info")
            .and_then(Value::as_array)
            .is_some_and(|list| {
                list.iter().any(|a| {
                    a.get("local").and_then(Value::as_str) == Some(&gateway.to_string())
                        && a.get("prefixlen").and_then(Value::as_u64)
                            == Some(u64::from(cfg.subnet.prefix()))
                })
            });
        if !has_gateway {
            let cidr = format!("{gateway}/{}", cfg.subnet.prefix());
            ops.ip(&["addr", "add", &cidr, "dev", &br])
                .map_err(op("adding the gateway address"))?;
        }
        if !up {
            ops.ip(&["link", "set", &br, "up"])
                .map_err(op("bringing the bridge up"))?;
        }

        // Forwarding, in this network namespace only.
        let forward = ops
            .read_sysctl("net/ipv4/ip_forward")
            .map_err(op("reading net.ipv4.ip_forward"))?;
        if forward != "1" {
            ops.write_sysctl("net/ipv4/ip_forward", "1")
                .map_err(op("enabling net.ipv4.ip_forward"))?;
            tracing::info!(bridge = %br, "enabled IPv4 forwarding (net.ipv4.ip_forward = 1) for the NAT bridge");
        }

        // The table.
        let table = cfg.table();
        let listing = match ops.nft(&["-j", "list", "table", "inet", &table]) {
            Ok(out) => Some(parse_listing(&format!("table inet {table}"), &out)?),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(op("listing the nftables table")(e)),
        };
        let script = table_script(&cfg, listing.as_ref())?;
        if !script.is_empty() {
            ops.nft_script(&script)
                .map_err(op("writing the nftables table"))?;
            tracing::info!(bridge = %br, %table, "wrote the nftables table");
        }
        Ok(Self { cfg, gateway })
    }

    /// Deletes the table `inet grid<idx>` and the bridge of `cfg`; what is already gone is
    /// fine. Veths still attached to the bridge are detached by the kernel, not deleted.
    pub fn remove(ops: &dyn NetOps, cfg: &BridgeConfig) -> Result<(), BridgeError> {
        let op = |step: &'static str| {
            move |source| BridgeError::Ops {
                step,
                bridge: cfg.name.clone(),
                source,
            }
        };
        match ops.nft(&["delete", "table", "inet", &cfg.table()]) {
            Err(e) if !e.is_not_found() => return Err(op("deleting the nftables table")(e)),
            _ => {}
        }
        match ops.ip(&["link", "del", &cfg.name]) {
            Err(e) if !e.is_not_found() => return Err(op("deleting the bridge")(e)),
            _ => {}
        }
        tracing::info!(bridge = %cfg.name, "removed the bridge and its table");
        Ok(())
    }

    /// The configuration it was made from.
    pub fn config(&self) -> &BridgeConfig {
        &self.cfg
    }

    /// The node index.
    pub fn idx(&self) -> u16 {
        self.cfg.idx
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.cfg.subnet
    }

    /// The gateway address (on the bridge).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The nftables table (family `inet`).
    pub fn table(&self) -> String {
        self.cfg.table()
    }
}

/// The first object of an `ip -j` array.
fn first_object(out: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(out).map_err(|e| e.to_string())?;
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .ok_or_else(|| "expected a non-empty array".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::ops::fake::FakeOps;

    const LINK: &str = r#"[{"ifname":"gridbr0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"linkinfo":{"info_kind":"bridge"}}]"#;
    const ADDR: &str = r#"[{"ifname":"gridbr0","addr_info":[{"family":"inet","local":"172.18.0.1","prefixlen":16}]}]"#;
    const NOT_FOUND: &str = "Device \"gridbr0\" does not exist.";

    #[test]
    fn defaults_derive_from_index() {
        let c = BridgeConfig::for_index(0);
        assert_eq!(c.name, "gridbr0");
        assert_eq!(c.subnet.to_string(), "172.18.0.0/16");
        assert_eq!(c.table(), "grid0");
        assert_eq!(c.gateway().ok(), Some(Ipv4Addr::new(172, 18, 0, 1)));
        let c = BridgeConfig::for_index(999);
        assert_eq!(c.name, "gridbr999");
        assert_eq!(c.subnet.to_string(), "172.27.0.0/16");
        assert_eq!(
            BridgeConfig::for_index(13).subnet.to_string(),
            "172.21.0.0/16"
        );
    }

    #[test]
    fn refuses_bad_configs() {
        let ops = FakeOps::default();
        let too_big = BridgeConfig::for_index(1000);
        assert!(matches!(
            NatBridge::ensure(&ops, too_big),
            Err(BridgeError::Invalid { .. })
        ));
        let mut long = BridgeConfig::for_index(1);
        long.name = "a-very-long-bridge".into();
        assert!(NatBridge::ensure(&ops, long).is_err());
        let mut tiny = BridgeConfig::for_index(1);
        tiny.subnet = "10.0.0.0/31".parse().expect("valid subnet");
        assert!(NatBridge::ensure(&ops, tiny).is_err());
        assert!(ops.calls.borrow().is_empty(), "nothing ran");
    }

    #[test]
    fn fresh_node_creates_everything() {
        let ops = FakeOps::default();
        ops.fail("ip -j -d link show dev gridbr0", NOT_FOUND);
        ops.reply(
            "ip -j addr show dev gridbr0",
            r#"[{"ifname":"gridbr0","addr_info":[]}]"#,
        );
        ops.fail(
            "nft -j list table inet grid0",
            "Error: No such file or directory\nlist table inet grid0",
        );
        let b = NatBridge::ensure(&ops, BridgeConfig::for_index(0)).expect("ensure works");
        assert_eq!(b.gateway(), Ipv4Addr::new(172, 18, 0, 1));
        let changes = ops.changes();
        assert_eq!(changes[0], "ip link add gridbr0 type bridge");
        assert_eq!(changes[1], "ip addr add 172.18.0.1/16 dev gridbr0");
        assert_eq!(changes[2], "ip link set gridbr0 up");
        assert_eq!(changes[3], "sysctl net/ipv4/ip_forward=1");
        let script = &changes[4];
        assert!(
            script.starts_with("nft -f -\nadd table inet grid0\n"),
            "{script}"
        );
        for line in [
            "add chain inet grid0 postrouting { type nat hook postrouting priority srcnat; policy accept; }",
            "add chain inet grid0 prerouting { type nat hook prerouting priority dstnat; policy accept; }",
            "add chain inet grid0 output { type nat hook output priority -100; policy accept; }",
            "add chain inet grid0 forward { type filter hook forward priority filter; policy accept; }",
            "add rule inet grid0 postrouting meta nfproto ipv4 ip saddr 172.18.0.0/16 oifname != \"gridbr0\" masquerade comment \"grid-base:masquerade 172.18.0.0/16 gridbr0\"",
            "add rule inet grid0 forward ct state established,related accept comment \"grid-base:established 172.18.0.0/16 gridbr0\"",
        ] {
            assert!(script.contains(line), "missing {line} in {script}");
        }
        assert_eq!(changes.len(), 5);
    }

    /// The listing `nft -j` gives of a table that `table_script` made for `cfg`, with `extra`
    /// rules (chain, comment) appended.
    fn listing_of(cfg: &BridgeConfig, extra: &[(&str, &str)]) -> String {
        let mut items = vec![serde_json::json!({"table": {"family": "inet", "name": cfg.table()}})];
        for c in &CHAINS {
            items.push(
                serde_json::json!({"chain": {"family": "inet", "table": cfg.table(), "name": c.name,
                "type": c.kind, "hook": c.hook, "prio": c.prio, "policy": "accept"}}),
            );
        }
        let mut handle = 10;
        for r in base_rules(cfg) {
            handle += 1;
            items.push(serde_json::json!({"rule": {"family": "inet", "table": cfg.table(), "chain": r.chain,
                "handle": handle, "comment": r.comment, "expr": []}}));
        }
        for (chain, comment) in extra {
            handle += 1;
            items.push(
                serde_json::json!({"rule": {"family": "inet", "table": cfg.table(), "chain": chain,
                "handle": handle, "comment": comment, "expr": []}}),
            );
        }
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn second_ensure_changes_nothing() {
        let ops = FakeOps::default();
        let cfg = BridgeConfig::for_index(0);
        ops.reply("ip -j -d link show dev gridbr0", LINK);
        ops.reply("ip -j addr show dev gridbr0", ADDR);
        ops.sysctls
            .borrow_mut()
            .insert("net/ipv4/ip_forward".into(), "1".into());
        ops.reply(
            "nft -j list table inet grid0",
            &listing_of(&cfg, &[("prerouting", "grid:web"), ("output", "grid:web")]),
        );
        NatBridge::ensure(&ops, cfg).expect("ensure works");
        assert_eq!(ops.changes(), Vec::<String>::new());
    }

    #[test]
    fn changed_subnet_rewrites_fixed_chains_only() {
        let ops = FakeOps::default();
        let old = BridgeConfig::for_index(0);
        let mut cfg = old.clone();
        cfg.subnet = "10.5.0.0/24".parse().expect("valid subnet");
        ops.reply("ip -j -d link show dev gridbr0", LINK);
        ops.reply("ip -j addr show dev gridbr0", ADDR);
        ops.sysctls
            .borrow_mut()
            .insert("net/ipv4/ip_forward".into(), "1".into());
        ops.reply(
            "nft -j list table inet grid0",
            &listing_of(&old, &[("prerouting", "grid:web")]),
        );
        NatBridge::ensure(&ops, cfg).expect("ensure works");
        let changes = ops.changes();
        assert_eq!(changes[0], "ip addr add 10.5.0.1/24 dev gridbr0");
        let script = &changes[1];
        assert!(script.contains("flush chain inet grid0 postrouting\n"));
        assert!(script.contains("flush chain inet grid0 forward\n"));
        assert!(!script.contains("prerouting"), "{script}");
        assert!(script.contains("ip saddr 10.5.0.0/24"));
    }

    #[test]
    fn refuses_a_non_bridge_and_a_foreign_chain() {
        let ops = FakeOps::default();
        ops.reply(
            "ip -j -d link show dev gridbr0",
            r#"[{"ifname":"gridbr0","flags":[],"linkinfo":{"info_kind":"veth"}}]"#,
        );
        let e = NatBridge::ensure(&ops, BridgeConfig::for_index(0)).expect_err("not a bridge");
        assert!(e.to_string().contains("veth"), "{e}");

        let ops = FakeOps::default();
        ops.reply("ip -j -d link show dev gridbr0", LINK);
        ops.reply("ip -j addr show dev gridbr0", ADDR);
        ops.reply(
            "nft -j list table inet grid0",
            r#"{"nftables":[{"chain":{"family":"inet","table":"grid0","name":"forward","type":"filter","hook":"input","prio":0}}]}"#,
        );
        let e = NatBridge::ensure(&ops, BridgeConfig::for_index(0)).expect_err("wrong hook");
        assert!(matches!(e, BridgeError::ChainMismatch { .. }), "{e}");
    }

    #[test]
    fn remove_tolerates_missing_objects() {
        let ops = FakeOps::default();
        ops.fail(
            "nft delete table inet grid3",
            "Error: No such file or directory",
        );
        ops.fail("ip link del gridbr3", "Cannot find device \"gridbr3\"");
        NatBridge::remove(&ops, &BridgeConfig::for_index(3)).expect("gone is fine");
        ops.fail("ip link del gridbr3", "Operation not permitted");
        assert!(NatBridge::remove(&ops, &BridgeConfig::for_index(3)).is_err());
    }
}
