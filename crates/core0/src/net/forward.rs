//! Host port forwards to containers: DNAT rules in the `prerouting` chain (traffic from other
//! hosts and from containers) and the `output` chain (traffic of the node itself) of Grid's
//! table, for destinations that are the node's own addresses (`fib daddr type local`). Each rule
//! carries the comment `grid:<container name>`, which is how a container's rules are found again.
//! Loopback (`127.0.0.1`) is not forwarded: that would need `route_localnet`.
//!
//! Also here: [`check_forward_policy`], which finds another table whose forward hook drops
//! traffic (Docker's `FORWARD DROP`) and says so, never touching it.

use super::bridge::NatBridge;
use super::nft::{NftError, NftRule, parse_listing};
use super::ops::{NetOps, OpsError};
use serde_json::Value;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a port forward could not be parsed, added or removed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A forward's text is not `host:container[/tcp|/udp]`.
    #[error("invalid port forward {spec:?}: {reason}")]
    Parse {
        /// The text given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The container name cannot go into a rule comment.
    #[error("invalid container name {name:?}: use 1 to 100 of a-z A-Z 0-9 _ . -")]
    Name {
        /// The name given.
        name: String,
    },
    /// The host port is already forwarded.
    #[error("host port {port}/{proto} is already forwarded to container {holder}")]
    PortTaken {
        /// The host port.
        port: u16,
        /// Its protocol.
        proto: Proto,
        /// The container holding it.
        holder: String,
    },
    /// A host effect failed.
    #[error("{step} in table inet {table}: {source}")]
    Ops {
        /// What was being done.
        step: &'static str,
        /// The table.
        table: String,
        /// The failure.
        source: OpsError,
    },
    /// The table's listing could not be read.
    #[error(transparent)]
    Nft(#[from] NftError),
}

/// A transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Its nftables name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host port forwarded to a container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortForward {
    /// The port on the node's addresses.
    pub host_port: u16,
    /// The port in the container.
    pub container_port: u16,
    /// The protocol.
    pub proto: Proto,
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

/// Parses one port of a forward: 1 to 65535, digits only.
fn parse_port(spec: &str, which: &str, text: &str) -> Result<u16, ForwardError> {
    let err = |reason: String| ForwardError::Parse {
        spec: spec.to_owned(),
        reason,
    };
    if text.is_empty() {
        return Err(err(format!("the {which} port is missing")));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("the {which} port {text:?} is not a number")));
    }
    match text.parse::<u32>() {
        Ok(0) => Err(err(format!("the {which} port is 0"))),
        Ok(n) => u16::try_from(n).map_err(|_| err(format!("the {which} port {n} is above 65535"))),
        Err(_) => Err(err(format!("the {which} port {text} is above 65535"))),
    }
}

impl FromStr for PortForward {
    type Err = ForwardError;

    /// `"8080:80"`, `"8080:80/tcp"` or `"53:53/udp"`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ForwardError::Parse {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (ports, proto) = match spec.split_once('/') {
            None => (spec, Proto::Tcp),
            Some((ports, "tcp")) => (ports, Proto::Tcp),
            Some((ports, "udp")) => (ports, Proto::Udp),
            Some(_) => return Err(err("the protocol must be tcp or udp")),
        };
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| err("expected host_port:container_port"))?;
        Ok(Self {
            host_port: parse_port(spec, "host", host)?,
            container_port: parse_port(spec, "container", container)?,
            proto,
        })
    }
}

/// A forward found in Grid's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRule {
    /// The container it belongs to (from the comment `grid:<name>`).
    pub container: String,
    /// The container's address it goes to.
    pub container_ip: Ipv4Addr,
    /// The ports.
    pub forward: PortForward,
}

/// The comment prefix of a container's rules.
pub const CONTAINER_COMMENT: &str = "grid:";

/// The chains holding the forwards.
const CHAINS: [&str; 2] = ["prerouting", "output"];

fn check_name(name: &str) -> Result<(), ForwardError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ForwardError::Name {
            name: name.to_owned(),
        })
    }
}

/// The rule body (after `add rule inet <table> <chain>`) of a forward.
fn rule_body(container: &str, ip: Ipv4Addr, f: &PortForward) -> String {
    format!(
        "fib daddr type local meta nfproto ipv4 {proto} dport {hp} dnat ip to {ip}:{cp} comment \"{CONTAINER_COMMENT}{container}\"",
        proto = f.proto,
        hp = f.host_port,
        cp = f.container_port,
    )
}

/// The forward a rule of Grid's table describes, if it is one.
fn rule_forward(rule: &NftRule) -> Option<ForwardRule> {
    let container = rule.comment.as_deref()?.strip_prefix(CONTAINER_COMMENT)?;
    let mut dport = None;
    let mut dnat = None;
    for e in &rule.expr {
        if let Some(m) = e.get("match") {
            let payload = m.pointer("/left/payload");
            if let Some(p) = payload
                && p.get("field").and_then(Value::as_str) == Some("dport")
            {
                let proto = match p.get("protocol").and_then(Value::as_str) {
                    Some("tcp") => Proto::Tcp,
                    Some("udp") => Proto::Udp,
                    _ => continue,
                };
                let port = m.get("right").and_then(Value::as_u64)?;
                dport = Some((proto, u16::try_from(port).ok()?));
            }
        } else if let Some(d) = e.get("dnat") {
            let ip: Ipv4Addr = d.get("addr").and_then(Value::as_str)?.parse().ok()?;
            let port = u16::try_from(d.get("port").and_then(Value::as_u64)?).ok()?;
            dnat = Some((ip, port));
        }
    }
    let ((proto, host_port), (container_ip, container_port)) = (dport?, dnat?);
    Some(ForwardRule {
        container: container.to_owned(),
        container_ip,
        forward: PortForward {
            host_port,
            container_port,
            proto,
        },
    })
}

/// The rules of Grid's forward chains (`None` when the table does not exist).
fn forward_rules(ops: &dyn NetOps, table: &str) -> Result<Option<Vec<NftRule>>, ForwardError> {
    let out = match ops.nft(&["-a", "-j", "list", "table", "inet", table]) {
        Ok(out) => out,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(source) => {
            return Err(ForwardError::Ops {
                step: "listing the rules",
                table: table.to_owned(),
                source,
            });
        }
    };
    let listing = parse_listing(&format!("table inet {table}"), &out)?;
    Ok(Some(
        listing
            .rules
            .into_iter()
            .filter(|r| CHAINS.contains(&r.chain.as_str()))
            .collect(),
    ))
}

/// Every forward in the bridge's table (read from the `prerouting` chain).
pub fn list_forwards(
    ops: &dyn NetOps,
    bridge: &NatBridge,
) -> Result<Vec<ForwardRule>, ForwardError> {
    let rules = forward_rules(ops, &bridge.table())?.unwrap_or_default();
    Ok(rules
        .iter()
        .filter(|r| r.chain == "prerouting")
        .filter_map(rule_forward)
        .collect())
}

/// Adds the forwards of container `container` (address `container_ip`) in one transaction. A
/// host port (and protocol) that another container, or this one to another target, already
/// forwards is refused, naming that container; a forward this container already has is kept
/// as is.
pub fn add_forwards(
    ops: &dyn NetOps,
    bridge: &NatBridge,
    container: &str,
    container_ip: Ipv4Addr,
    forwards: &[PortForward],
) -> Result<(), ForwardError> {
    check_name(container)?;
    if forwards.is_empty() {
        return Ok(());
    }
    let table = bridge.table();
    let existing = list_forwards(ops, bridge)?;
    let mut script = String::new();
    let mut seen: Vec<(Proto, u16)> = Vec::new();
    for f in forwards {
        let key = (f.proto, f.host_port);
        if seen.contains(&key) {
            return Err(ForwardError::PortTaken {
                port: f.host_port,
                proto: f.proto,
                holder: container.to_owned(),
            });
        }
        seen.push(key);
        if let Some(held) = existing
            .iter()
            .find(|r| (r.forward.proto, r.forward.host_port) == key)
        {
            if held.container == container
                && held.container_ip == container_ip
                && held.forward == *f
            {
                continue;
            }
            return Err(ForwardError::PortTaken {
                port: f.host_port,
                proto: f.proto,
                holder: held.container.clone(),
            });
        }
        for chain in CHAINS {
            script.push_str(&format!(
                "add rule inet {table} {chain} {}\n",
                rule_body(container, container_ip, f)
            ));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    ops.nft_script(&script)
        .map_err(|source| ForwardError::Ops {
            step: "adding port forwards",
            table: table.clone(),
            source,
        })?;
    tracing::info!(%container, %container_ip, forwards = ?forwards.iter().map(ToString::to_string).collect::<Vec<_>>(), "added port forwards");
    Ok(())
}

/// Deletes every rule of Grid's forward chains whose comment is `grid:<container>`, in one
/// transaction; returns how many there were (0 when the table is gone).
pub fn remove_forwards(
    ops: &dyn NetOps,
    bridge: &NatBridge,
    container: &str,
) -> Result<usize, ForwardError> {
    check_name(container)?;
    let table = bridge.table();
    let comment = format!("{CONTAINER_COMMENT}{container}");
    let Some(rules) = forward_rules(ops, &table)? else {
        return Ok(0);
    };
    let script: String = rules
        .iter()
        .filter(|r| r.comment.as_deref() == Some(comment.as_str()))
        .map(|r| format!("delete rule inet {table} {} handle {}\n", r.chain, r.handle))
        .collect();
    let count = script.lines().count();
    if count > 0 {
        ops.nft_script(&script)
            .map_err(|source| ForwardError::Ops {
                step: "deleting port forwards",
                table: table.clone(),
                source,
            })?;
        tracing::info!(%container, rules = count, "removed port forwards");
    }
    Ok(count)
}

/// Looks for another table whose forward hook has policy drop (Docker sets one): forwarded
/// container traffic would be dropped there whatever Grid's table says. Returns a warning
/// naming each such table and chain, `None` when there is none. Grid never edits them. When the
/// ruleset cannot be listed the failure is logged and `None` returned. Rules of the legacy
/// (non-nft) iptables are not visible here.
pub fn check_forward_policy(ops: &dyn NetOps) -> Option<String> {
    let listing = match ops
        .nft(&["-j", "list", "chains"])
        .map_err(|e| e.to_string())
        .and_then(|out| parse_listing("chains", &out).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the forward policy of other nftables tables");
            return None;
        }
    };
    let culprits: Vec<String> = listing
        .chains
        .iter()
        .filter(|c| c.hook.as_deref() == Some("forward") && c.policy.as_deref() == Some("drop"))
        .filter(|c| !(c.family == "inet" && is_grid_table(&c.table)))
        .map(|c| format!("table {} {} chain {}", c.family, c.table, c.name))
        .collect();
    if culprits.is_empty() {
        return None;
    }
    Some(format!(
        "{} has a forward hook with policy drop: it may drop the traffic of grid's containers \
         unless it accepts it (grid never edits rules it did not make)",
        culprits.join(", ")
    ))
}

/// Whether `table` (family inet) is one of Grid's: `grid<digits>`.
fn is_grid_table(table: &str) -> bool {
    table
        .strip_prefix("grid")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::bridge::BridgeConfig;
    use crate::net::ops::fake::FakeOps;

    fn fwd(s: &str) -> PortForward {
        s.parse().expect("test forward parses")
    }

    #[test]
    fn parses_forwards() {
        assert_eq!(
            fwd("8080:80"),
            PortForward {
                host_port: 8080,
                container_port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!(fwd("8080:80/tcp"), fwd("8080:80"));
        assert_eq!(fwd("53:53/udp").proto, Proto::Udp);
        assert_eq!(fwd("65535:1").host_port, 65535);
        assert_eq!(fwd("53:53/udp").to_string(), "53:53/udp");
    }

    #[test]
    fn parse_errors_are_clear() {
        for (spec, needle) in [
            ("0:80", "host port is 0"),
            ("80:0", "container port is 0"),
            ("65536:80", "above 65535"),
            ("80:99999999999999999999", "above 65535"),
            ("abc:80", "not a number"),
            ("80:-1", "not a number"),
            ("8080", "expected host_port:container_port"),
            (":80", "host port is missing"),
            ("80:", "container port is missing"),
            ("80:80/sctp", "tcp or udp"),
            ("80:80/", "tcp or udp"),
            ("", "expected"),
            ("1:2:3", "not a number"),
            (" 80:80", "not a number"),
        ] {
            let e = spec.parse::<PortForward>().expect_err(spec).to_string();
            assert!(e.contains(needle), "{spec:?}: {e}");
            assert!(e.contains(&format!("{spec:?}")), "{e} names the spec");
        }
    }

    fn bridge(ops: &FakeOps) -> NatBridge {
        ops.reply(
            "ip -j -d link show dev gridbr0",
            r#"[{"flags":["UP"],"linkinfo":{"info_kind":"bridge"}}]"#,
        );
        ops.reply("ip -j addr show dev gridbr0", "[{}]");
        ops.fail("nft -j list table inet grid0", "No such file or directory");
        let b = NatBridge::ensure(ops, BridgeConfig::for_index(0)).expect("fake ensure works");
        ops.calls.borrow_mut().clear();
        b
    }

    /// A listing in `nft -a -j` form with forwards (container, ip, forward) in both chains.
    fn listing(forwards: &[(&str, &str, &str)]) -> String {
        let mut items = vec![];
        let mut handle = 20;
        for (name, ip, f) in forwards {
            let f = fwd(f);
            for chain in CHAINS {
                handle += 1;
                items.push(serde_json::json!({"rule": {"family": "inet", "table": "grid0", "chain": chain,
                    "handle": handle, "comment": format!("grid:{name}"), "expr": [
                    {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                    {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
                    {"match": {"op": "==", "left": {"payload": {"protocol": f.proto.as_str(), "field": "dport"}}, "right": f.host_port}},
                    {"dnat": {"family": "ip", "addr": ip, "port": f.container_port}}]}}));
            }
        }
        items.push(
            serde_json::json!({"rule": {"family": "inet", "table": "grid0", "chain": "postrouting",
            "handle": 3, "comment": "grid:web", "expr": []}}),
        );
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn add_writes_both_chains() {
        let ops = FakeOps::default();
        let b = bridge(&ops);
        ops.reply("nft -a -j list table inet grid0", &listing(&[]));
        let ip = Ipv4Addr::new(172, 18, 0, 2);
        add_forwards(&ops, &b, "web", ip, &[fwd("8080:80"), fwd("53:53/udp")]).expect("adds");
        let changes = ops.changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0],
            "nft -f -\n\
             add rule inet grid0 prerouting fib daddr type local meta nfproto ipv4 tcp dport 8080 dnat ip to 172.18.0.2:80 comment \"grid:web\"\n\
             add rule inet grid0 output fib daddr type local meta nfproto ipv4 tcp dport 8080 dnat ip to 172.18.0.2:80 comment \"grid:web\"\n\
             add rule inet grid0 prerouting fib daddr type local meta nfproto ipv4 udp dport 53 dnat ip to 172.18.0.2:53 comment \"grid:web\"\n\
             add rule inet grid0 output fib daddr type local meta nfproto ipv4 udp dport 53 dnat ip to 172.18.0.2:53 comment \"grid:web\"\n"
        );
    }

    #[test]
    fn taken_ports_name_the_holder() {
        let ops = FakeOps::default();
        let b = bridge(&ops);
        ops.reply(
            "nft -a -j list table inet grid0",
            &listing(&[
                ("db", "172.18.0.3", "5432:5432"),
                ("web", "172.18.0.2", "8080:80"),
            ]),
        );
        let listed = list_forwards(&ops, &b).expect("lists");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].container, "db");
        assert_eq!(listed[0].container_ip, Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(listed[0].forward, fwd("5432:5432"));

        let ip = Ipv4Addr::new(172, 18, 0, 2);
        let e = add_forwards(&ops, &b, "web", ip, &[fwd("5432:80")]).expect_err("taken by db");
        assert_eq!(
            e.to_string(),
            "host port 5432/tcp is already forwarded to container db"
        );
        // The same port over udp is free.
        add_forwards(&ops, &b, "web", ip, &[fwd("5432:80/udp")]).expect("udp is free");
        // What web already has is kept, not added twice.
        ops.calls.borrow_mut().clear();
        add_forwards(&ops, &b, "web", ip, &[fwd("8080:80")]).expect("already there");
        assert!(ops.changes().is_empty());
        // Twice in one request.
        let e =
            add_forwards(&ops, &b, "api", ip, &[fwd("9000:1"), fwd("9000:2")]).expect_err("dup");
        assert!(e.to_string().contains("9000/tcp"), "{e}");
        assert!(matches!(
            add_forwards(&ops, &b, "bad\"name", ip, &[]),
            Err(ForwardError::Name { .. })
        ));
    }

    #[test]
    fn remove_deletes_exactly_the_containers_rules() {
        let ops = FakeOps::default();
        let b = bridge(&ops);
        ops.reply(
            "nft -a -j list table inet grid0",
            &listing(&[
                ("web", "172.18.0.2", "8080:80"),
                ("web2", "172.18.0.4", "81:80"),
                ("web", "172.18.0.2", "53:53/udp"),
            ]),
        );
        assert_eq!(remove_forwards(&ops, &b, "web").expect("removes"), 4);
        assert_eq!(
            ops.changes(),
            vec![
                "nft -f -\n\
                 delete rule inet grid0 prerouting handle 21\n\
                 delete rule inet grid0 output handle 22\n\
                 delete rule inet grid0 prerouting handle 25\n\
                 delete rule inet grid0 output handle 26\n"
            ]
        );
        ops.calls.borrow_mut().clear();
        assert_eq!(
            remove_forwards(&ops, &b, "nobody").expect("nothing to do"),
            0
        );
        assert!(ops.changes().is_empty());
        ops.fail(
            "nft -a -j list table inet grid0",
            "Error: No such file or directory",
        );
        assert_eq!(remove_forwards(&ops, &b, "web").expect("no table"), 0);
    }

    #[test]
    fn forward_policy_detection() {
        let ops = FakeOps::default();
        ops.reply(
            "nft -j list chains",
            r#"{"nftables":[
              {"chain":{"family":"ip","table":"filter","name":"FORWARD","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
              {"chain":{"family":"ip","table":"filter","name":"INPUT","type":"filter","hook":"input","prio":0,"policy":"drop"}},
              {"chain":{"family":"inet","table":"grid0","name":"forward","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
              {"chain":{"family":"inet","table":"other","name":"fw","type":"filter","hook":"forward","prio":0,"policy":"accept"}}]}"#,
        );
        let w = check_forward_policy(&ops).expect("docker-like drop found");
        assert!(
            w.starts_with("table ip filter chain FORWARD has a forward hook with policy drop"),
            "{w}"
        );
        assert!(!w.contains("INPUT") && !w.contains("grid0"), "{w}");

        let ops = FakeOps::default();
        ops.reply("nft -j list chains", r#"{"nftables":[]}"#);
        assert_eq!(check_forward_policy(&ops), None);
        ops.fail("nft -j list chains", "Operation not permitted");
        assert_eq!(check_forward_policy(&ops), None);
        assert!(is_grid_table("grid12") && !is_grid_table("grid") && !is_grid_table("gridx"));
    }
}
