//! `info.port`: listening sockets of `/proc/net/{tcp,tcp6,udp,udp6,unix}` and their owners.

use super::{InfoError, PortInfo, read};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// TCP `LISTEN`.
const TCP_LISTEN: &str = "0A";
/// UDP sockets are "listening" in state `07` (`TCP_CLOSE`, i.e. bound but not connected).
const UDP_LISTEN: &str = "07";
/// Unix sockets in `SS_UNCONNECTED` (listening stream sockets and bound datagram sockets).
const UNIX_LISTEN: &str = "01";

/// A listening socket before its owner is known.
#[derive(Debug, Clone, PartialEq)]
struct Listening {
    network: &'static str,
    ip: Option<IpAddr>,
    port: Option<u16>,
    unix: Option<String>,
    inode: u64,
}

/// `info.port`: listening sockets with their owning pid (0 when unknown).
pub fn ports() -> Result<Vec<PortInfo>, InfoError> {
    ports_in(Path::new("/proc/net"), None)
}

/// The listening sockets of the network namespace whose `/proc/.../net` directory is `net`. With
/// `owners`, `(host pid, pid shown)` pairs, only those processes are searched for the sockets'
/// owners and their own pids are shown (a container's view); otherwise every process, as is.
pub fn ports_in(net: &Path, owners: Option<&[(i32, i32)]>) -> Result<Vec<PortInfo>, InfoError> {
    let mut all = Vec::new();
    for (network, state) in [
        ("tcp", TCP_LISTEN),
        ("tcp6", TCP_LISTEN),
        ("udp", UDP_LISTEN),
        ("udp6", UDP_LISTEN),
    ] {
        let path = net.join(network);
        match read(&path) {
            Ok(text) => all.extend(parse_inet(&text, network, state)),
            // A kernel without IPv6 has no tcp6/udp6.
            Err(InfoError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    all.extend(parse_unix(&read(net.join("unix"))?));
    let wanted: HashSet<u64> = all.iter().map(|l| l.inode).filter(|i| *i != 0).collect();
    let owners = socket_owners(&wanted, owners);
    Ok(all
        .into_iter()
        .map(|l| PortInfo {
            network: l.network.to_string(),
            port: l.port,
            unix: l.unix,
            ip: l.ip.map(|ip| ip.to_string()),
            pid: owners.get(&l.inode).copied().unwrap_or(0),
        })
        .collect())
}

/// Sockets of `/proc/net/{tcp,udp}[6]` text in `state`.
fn parse_inet(text: &str, network: &'static str, state: &str) -> Vec<Listening> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != state {
                return None;
            }
            let (ip, port) = f[1].split_once(':')?;
            Some(Listening {
                network,
                ip: Some(parse_hex_ip(ip)?),
                port: Some(u16::from_str_radix(port, 16).ok()?),
                unix: None,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// An address as the kernel prints it: 32-bit words in host byte order, in hex.
fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Unix sockets of `/proc/net/unix` text in state `01` that have a path.
fn parse_unix(text: &str) -> Vec<Listening> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[5] != UNIX_LISTEN {
                return None;
            }
            Some(Listening {
                network: "unix",
                ip: None,
                port: None,
                unix: Some(f[7..].join(" ")),
                inode: f[6].parse().ok()?,
            })
        })
        .collect()
}

/// The pid holding each wanted socket inode, from the `/proc/<pid>/fd` links (lowest pid wins),
/// among `among` (`(host pid, pid shown)`) or every process.
fn socket_owners(wanted: &HashSet<u64>, among: Option<&[(i32, i32)]>) -> HashMap<u64, i64> {
    let mut owners = HashMap::new();
    if wanted.is_empty() {
        return owners;
    }
    let mut pids: Vec<(i64, i64)> = match among {
        Some(list) => list
            .iter()
            .map(|(h, s)| (i64::from(*h), i64::from(*s)))
            .collect(),
        None => std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .map(|p| (p, p))
                    .collect()
            })
            .unwrap_or_default(),
    };
    pids.sort_unstable_by_key(|(_, shown)| *shown);
    for (pid, shown) in pids {
        // Processes vanish and hide their fds from other users: skip what cannot be read.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(&target.to_string_lossy())
                && wanted.contains(&inode)
            {
                owners.entry(inode).or_insert(shown);
            }
        }
        if owners.len() == wanted.len() {
            break;
        }
    }
    owners
}

/// The inode of an fd link text `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1652 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2B4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1653 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
";
    const UNIX: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000024556953: 00000002 00000000 00010000 0001 01 1648 /run/redis.sock
0000000046e5e831: 00000003 00000000 00000000 0001 03 1649 /run/other.sock
0000000046e5e832: 00000002 00000000 00000000 0002 01 1650
";

    #[test]
    fn parses_tcp_listeners_only() {
        let v = parse_inet(TCP, "tcp", TCP_LISTEN);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ip, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(v[0].port, Some(8080));
        assert_eq!(v[0].inode, 1652);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_tcp6_addresses() {
        let v = parse_inet(TCP6, "tcp6", TCP_LISTEN);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ip, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(v[0].port, Some(22));
    }

    #[test]
    fn parses_unix_listeners_with_paths() {
        let v = parse_unix(UNIX);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].unix.as_deref(), Some("/run/redis.sock"));
        assert_eq!(v[0].inode, 1648);
    }

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_inode("socket:[42]"), Some(42));
        assert_eq!(socket_inode("pipe:[42]"), None);
        assert_eq!(parse_hex_ip("zz"), None);
    }

    #[test]
    fn finds_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        let list = ports().expect("ports");
        let me = i64::from(std::process::id());
        let found = list
            .iter()
            .find(|p| p.network == "tcp" && p.port == Some(port))
            .expect("listener is reported");
        assert_eq!(found.ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(found.pid, me);
    }
}
