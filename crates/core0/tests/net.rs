//! Real tests of node networking, as root: the NAT bridge, Grid's nftables table, a container
//! nic and port forwards, all inside network namespaces the test makes (`gridt-<pid>-<n>`) and
//! deletes even when it fails. The "node" runs the library in its own namespace, a "container"
//! namespace gets the veth, and a "peer" namespace plays another host. The host's interfaces,
//! routes, sysctls and rules are never touched; the test checks that `ip_forward` is unchanged.

use core0::net::{
    BridgeConfig, ContainerNic, ForwardError, HostOps, Ipam, NatBridge, NetnsRef, PortForward,
    add_forwards, attach_container, check_forward_policy, detach_container, list_forwards,
    remove_forwards,
};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const NETNS_DIR: &str = "/run/netns";
const PREFIX: &str = "gridt-";

/// Runs a command and returns its stdout; panics with its stderr on failure.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and tells whether it succeeded.
fn succeeds(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&run(args)).unwrap_or_else(|e| panic!("{args:?} is not json: {e}"))
}

/// Deletes the namespaces of earlier runs of this test whose process is gone.
fn remove_leftovers() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing leftover network namespace {name}");
            let _ = succeeds(&["ip", "netns", "del", &name]);
        }
    }
}

/// A network namespace made for this test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static CLEAN: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            nix::unistd::geteuid().is_root(),
            "the networking tests need root (they make network namespaces)"
        );
        CLEAN.call_once(remove_leftovers);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend(args);
        run(&all)
    }

    /// `ip -n <ns> -j <args>` as JSON.
    fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["ip", "-n", &self.name, "-j"];
        all.extend(args);
        json(&all)
    }

    /// `ip netns exec <ns> <args>`.
    fn exec(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec![
            "ip".to_owned(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    fn exec_ok(&self, args: &[&str]) -> bool {
        let all = self.exec(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        succeeds(&refs)
    }

    fn exec_out(&self, args: &[&str]) -> String {
        let all = self.exec(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&refs)
    }

    /// The rules of `inet grid<idx>` in this namespace, by chain, `None` without the table.
    fn grid_table(&self, idx: u16) -> Option<Value> {
        let table = format!("grid{idx}");
        let all = self.exec(&["nft", "-j", "list", "table", "inet", &table]);
        let out = Command::new(&all[0])
            .args(&all[1..])
            .output()
            .expect("runs nft");
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("nft -j prints json"))
    }

    /// Runs `f` on a thread inside this namespace (processes it spawns start there too).
    fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(format!("{NETNS_DIR}/{}", self.name))
            .expect("the namespace file exists");
        std::thread::scope(|s| {
            s.spawn(move || {
                let host = std::fs::metadata("/proc/self/ns/net")
                    .expect("own netns")
                    .ino();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the test namespace");
                let now = std::fs::metadata("/proc/thread-self/ns/net")
                    .expect("thread netns")
                    .ino();
                assert_ne!(now, host, "refusing to run outside the test namespace");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !succeeds(&["ip", "netns", "del", &self.name]) {
            eprintln!("cannot delete network namespace {}", self.name);
        }
    }
}

/// A `sleep` process inside a namespace (the container's "init"), killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn start(ns: &Netns) -> Self {
        let all = ns.exec(&["sh", "-c", "echo ready; exec sleep 600"]);
        let mut child = Command::new(&all[0])
            .args(&all[1..])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawns sleep");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        // Readiness: the shell prints once it runs inside the namespace.
        BufReader::new(stdout).read_line(&mut line).expect("reads");
        let guard = Self(child);
        assert_eq!(line.trim(), "ready");
        guard
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pids fit in i32")
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP server answering `hello\n` to each connection, on a socket of a namespace.
struct Hello {
    listener: TcpListener,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hello {
    fn start(ns: &Netns, port: u16) -> Self {
        // The socket belongs to the namespace it was made in, whichever thread serves it.
        let listener = ns.run_in(|| TcpListener::bind(("0.0.0.0", port)).expect("binds"));
        let serving = listener.try_clone().expect("clones the listener");
        let thread = std::thread::spawn(move || {
            while let Ok((mut s, _)) = serving.accept() {
                let _ = s.write_all(b"hello\n");
            }
        });
        Self {
            listener,
            thread: Some(thread),
        }
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        // Wakes the blocked accept with an error.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `addr` from inside `ns` and reads the greeting.
fn fetch(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    ns.run_in(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("reads the host sysctl")
}

/// Comments of the rules of a table listing.
fn comments(table: &Value) -> Vec<(String, String)> {
    table["nftables"]
        .as_array()
        .expect("an nftables array")
        .iter()
        .filter_map(|i| i.get("rule"))
        .map(|r| {
            (
                r["chain"].as_str().unwrap_or_default().to_owned(),
                r["comment"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Connects the node namespace to a peer namespace with a veth pair: node 10.99.<n>.1/24,
/// peer 10.99.<n>.2/24. Returns the node's address.
fn link_peer(node: &Netns, peer: &Netns, n: u8) -> Ipv4Addr {
    node.ip(&[
        "link", "add", "gtn", "type", "veth", "peer", "name", "gtp", "netns", &peer.name,
    ]);
    node.ip(&["addr", "add", &format!("10.99.{n}.1/24"), "dev", "gtn"]);
    node.ip(&["link", "set", "gtn", "up"]);
    peer.ip(&["addr", "add", &format!("10.99.{n}.2/24"), "dev", "gtp"]);
    peer.ip(&["link", "set", "gtp", "up"]);
    Ipv4Addr::new(10, 99, n, 1)
}

#[test]
fn bridge_container_and_port_forwards() {
    let host_forward = host_ip_forward();
    let node = Netns::new();
    let ctr = Netns::new();
    let peer = Netns::new();
    let node_ip = link_peer(&node, &peer, 7);
    let ops = HostOps;

    // The bridge and the table.
    let cfg = BridgeConfig::for_index(0);
    let bridge = node
        .run_in(|| NatBridge::ensure(&ops, cfg.clone()))
        .expect("ensure works");
    assert_eq!(bridge.gateway(), Ipv4Addr::new(172, 18, 0, 1));
    let addrs = node.ip_json(&["addr", "show", "dev", "gridbr0"]);
    let has_gw = addrs[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .any(|a| a["local"] == "172.18.0.1" && a["prefixlen"] == 16);
    assert!(has_gw, "gateway address on the bridge: {addrs}");
    let link = node.ip_json(&["-d", "link", "show", "dev", "gridbr0"]);
    assert_eq!(link[0]["linkinfo"]["info_kind"], "bridge");
    assert!(
        link[0]["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .any(|f| f == "UP")
    );
    assert_eq!(
        node.exec_out(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );
    assert_eq!(
        host_ip_forward(),
        host_forward,
        "the host's ip_forward is unchanged"
    );

    let table = node.grid_table(0).expect("table inet grid0 exists");
    let chains: Vec<&str> = table["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i.get("chain"))
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(chains, ["postrouting", "prerouting", "output", "forward"]);
    assert_eq!(comments(&table).len(), 6);

    // A second ensure changes nothing at all (same rules, same handles).
    let again = node
        .run_in(|| NatBridge::ensure(&ops, cfg.clone()))
        .expect("ensure again");
    assert_eq!(again, bridge);
    assert_eq!(node.grid_table(0), Some(table.clone()));
    assert_eq!(node.ip_json(&["addr", "show", "dev", "gridbr0"]), addrs);

    // A container nic with an address from the ipam.
    let data = tempfile::tempdir().expect("temp dir");
    let mut ipam = Ipam::open(Ipam::default_path(data.path()), bridge.subnet()).expect("ipam");
    let ip = ipam.allocate("web").expect("allocates");
    assert_eq!(ip, Ipv4Addr::new(172, 18, 0, 2));
    let init = Sleeper::start(&ctr);
    let nic = ContainerNic {
        container_idx: 1,
        nic_idx: 0,
        netns: NetnsRef::Pid(init.pid()),
        ip,
        prefix: bridge.subnet().prefix(),
        gateway: Some(bridge.gateway()),
        hwaddr: Some("02:42:ac:12:00:02".into()),
        name_inside: "eth0".into(),
    };
    let veth = node
        .run_in(|| attach_container(&ops, &bridge, &nic))
        .expect("attaches");
    assert_eq!(veth, "gv0c1n0");
    let host_side = node.ip_json(&["-d", "link", "show", "dev", "gv0c1n0"]);
    assert_eq!(host_side[0]["master"], "gridbr0");
    assert_eq!(host_side[0]["linkinfo"]["info_slave_data"]["hairpin"], true);
    let eth0 = ctr.ip_json(&["addr", "show", "dev", "eth0"]);
    assert_eq!(eth0[0]["address"], "02:42:ac:12:00:02");
    assert!(
        eth0[0]["addr_info"]
            .as_array()
            .expect("addr_info")
            .iter()
            .any(|a| a["local"] == "172.18.0.2" && a["prefixlen"] == 16),
        "{eth0}"
    );
    let routes = ctr.ip_json(&["route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "172.18.0.1", "{routes}");
    assert_eq!(routes[0]["dev"], "eth0");
    assert!(
        ctr.exec_ok(&["busybox", "ping", "-c", "1", "-W", "3", "172.18.0.1"]),
        "the container reaches its gateway"
    );
    // Attaching the same nic twice is refused.
    assert!(
        node.run_in(|| attach_container(&ops, &bridge, &nic))
            .is_err()
    );

    // A port forward reaches the container from another host, from the node itself and from
    // the container (hairpin).
    let _hello = Hello::start(&ctr, 80);
    let forwards: Vec<PortForward> = ["8080:80", "5353:53/udp"]
        .iter()
        .map(|s| s.parse().expect("parses"))
        .collect();
    node.run_in(|| add_forwards(&ops, &bridge, "web", ip, &forwards))
        .expect("adds");
    let target = SocketAddr::from((node_ip, 8080));
    assert_eq!(fetch(&peer, target).expect("from the peer"), "hello\n");
    assert_eq!(fetch(&node, target).expect("from the node"), "hello\n");
    assert_eq!(
        fetch(&ctr, target).expect("hairpin from the container"),
        "hello\n"
    );
    let listed = node.run_in(|| list_forwards(&ops, &bridge)).expect("lists");
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|r| r.container == "web" && r.container_ip == ip)
    );
    let with_forwards = comments(&node.grid_table(0).expect("table"));
    assert_eq!(
        with_forwards
            .iter()
            .filter(|(_, c)| c == "grid:web")
            .count(),
        4,
        "two forwards in prerouting and output: {with_forwards:?}"
    );

    // A taken host port names its holder; ensure keeps the forwards.
    let taken: PortForward = "8080:81".parse().expect("parses");
    let e = node
        .run_in(|| {
            add_forwards(
                &ops,
                &bridge,
                "other",
                Ipv4Addr::new(172, 18, 0, 3),
                &[taken],
            )
        })
        .expect_err("8080 is taken");
    assert!(
        matches!(e, ForwardError::PortTaken { port: 8080, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("web"), "{e}");
    node.run_in(|| NatBridge::ensure(&ops, cfg.clone()))
        .expect("ensure with forwards");
    assert_eq!(comments(&node.grid_table(0).expect("table")), with_forwards);

    // Removing the forwards deletes exactly those rules; the port stops answering.
    let removed = node
        .run_in(|| remove_forwards(&ops, &bridge, "web"))
        .expect("removes");
    assert_eq!(removed, 4);
    let after = comments(&node.grid_table(0).expect("table"));
    assert!(!after.iter().any(|(_, c)| c == "grid:web"), "{after:?}");
    assert_eq!(after.len(), 6);
    assert!(fetch(&peer, target).is_err(), "no forward any more");
    assert_eq!(
        node.run_in(|| remove_forwards(&ops, &bridge, "web"))
            .expect("again"),
        0
    );

    // Detach, then remove the bridge and its table.
    assert!(
        node.run_in(|| detach_container(&ops, &bridge, 1, 0))
            .expect("detaches")
    );
    assert!(!node.exec_ok(&["ip", "link", "show", "dev", "gv0c1n0"]));
    assert!(!ctr.exec_ok(&["ip", "link", "show", "dev", "eth0"]));
    assert!(
        !node
            .run_in(|| detach_container(&ops, &bridge, 1, 0))
            .expect("gone is fine")
    );
    ipam.release("web").expect("releases");

    node.run_in(|| NatBridge::remove(&ops, &cfg))
        .expect("removes");
    assert_eq!(node.grid_table(0), None, "no table left");
    assert!(
        !node.exec_ok(&["ip", "link", "show", "dev", "gridbr0"]),
        "no bridge left"
    );
    node.run_in(|| NatBridge::remove(&ops, &cfg))
        .expect("removing twice is fine");
    assert_eq!(
        host_ip_forward(),
        host_forward,
        "the host's ip_forward is unchanged"
    );
}

#[test]
fn two_nodes_in_one_namespace_keep_apart() {
    // Two node indexes side by side (as `grid dev` runs several nodes): different bridges,
    // subnets and tables; removing one leaves the other.
    let node = Netns::new();
    let ops = HostOps;
    let (a, b) = (BridgeConfig::for_index(1), BridgeConfig::for_index(2));
    node.run_in(|| NatBridge::ensure(&ops, a.clone()))
        .expect("node 1");
    node.run_in(|| NatBridge::ensure(&ops, b.clone()))
        .expect("node 2");
    assert!(node.grid_table(1).is_some() && node.grid_table(2).is_some());
    let br2 = node.ip_json(&["-4", "addr", "show", "dev", "gridbr2"]);
    assert_eq!(br2[0]["addr_info"][0]["local"], "172.20.0.1");
    // A nic given as a named namespace, on node 2's bridge.
    let ctr = Netns::new();
    let bridge2 = node
        .run_in(|| NatBridge::ensure(&ops, b.clone()))
        .expect("node 2 again");
    let nic = ContainerNic {
        container_idx: 42,
        nic_idx: 1,
        netns: NetnsRef::Named(ctr.name.clone()),
        ip: Ipv4Addr::new(172, 20, 0, 9),
        prefix: 16,
        gateway: None,
        hwaddr: None,
        name_inside: "eth1".into(),
    };
    let veth = node
        .run_in(|| attach_container(&ops, &bridge2, &nic))
        .expect("attaches");
    assert_eq!(veth, "gv2c42n1");
    let eth1 = ctr.ip_json(&["-4", "addr", "show", "dev", "eth1"]);
    assert_eq!(eth1[0]["addr_info"][0]["local"], "172.20.0.9", "{eth1}");
    assert_eq!(
        ctr.ip_json(&["route", "show", "default"]),
        serde_json::json!([])
    );
    node.run_in(|| NatBridge::remove(&ops, &a))
        .expect("remove node 1");
    assert_eq!(node.grid_table(1), None);
    assert!(node.grid_table(2).is_some());
    assert!(node.exec_ok(&["ip", "link", "show", "dev", "gridbr2"]));
    assert!(!node.exec_ok(&["ip", "link", "show", "dev", "gridbr1"]));
}

#[test]
fn forward_policy_of_another_table_is_reported() {
    let node = Netns::new();
    let ops = HostOps;
    assert_eq!(node.run_in(|| check_forward_policy(&ops)), None);
    // Grid's own table does not count.
    node.run_in(|| NatBridge::ensure(&ops, BridgeConfig::for_index(0)))
        .expect("ensure");
    assert_eq!(node.run_in(|| check_forward_policy(&ops)), None);
    // A Docker-like table, made inside the test's namespace.
    node.exec_out(&["nft", "add", "table", "ip", "dockerish"]);
    node.exec_out(&[
        "nft",
        "add chain ip dockerish FORWARD { type filter hook forward priority 0; policy drop; }",
    ]);
    let warning = node
        .run_in(|| check_forward_policy(&ops))
        .expect("a warning");
    assert!(
        warning.contains("table ip dockerish chain FORWARD"),
        "{warning}"
    );
    // It was not edited.
    let listed = node.exec_out(&["nft", "list", "table", "ip", "dockerish"]);
    assert!(listed.contains("policy drop"), "{listed}");
}

#[test]
fn forward_specs_parse_with_clear_errors() {
    let ok: PortForward = "53:53/udp".parse().expect("parses");
    assert_eq!(ok.to_string(), "53:53/udp");
    for (spec, needle) in [
        ("0:80", "host port is 0"),
        ("70000:80", "above 65535"),
        ("web:80", "not a number"),
        ("80", "expected host_port:container_port"),
        ("80:80/icmp", "tcp or udp"),
    ] {
        let e = spec.parse::<PortForward>().expect_err(spec).to_string();
        assert!(e.contains(needle) && e.contains(spec), "{spec}: {e}");
    }
}
