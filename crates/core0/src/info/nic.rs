//! `info.nic`: every interface of `/sys/class/net`, with its addresses from `getifaddrs`.

use super::{InfoError, NicAddr, NicInfo, read_trimmed};
use nix::sys::socket::SockaddrStorage;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

const SYS_NET: &str = "/sys/class/net";

/// `IFF_*` bits of `/sys/class/net/<if>/flags` and their names in Go's `net.Flags`.
const FLAG_NAMES: &[(u32, &str)] = &[
    (0x1, "up"),
    (0x2, "broadcast"),
    (0x8, "loopback"),
    (0x10, "pointtopoint"),
    (0x1000, "multicast"),
];

/// `info.nic`: all interfaces, ordered by interface index.
pub fn nics() -> Result<Vec<NicInfo>, InfoError> {
    list(Path::new(SYS_NET), addresses()?)
}

/// `info.nic` in the network namespace of process `pid` (a container's corex): the interfaces
/// of the `/sys` it mounted in that namespace, the addresses read from a thread that joined it.
pub fn nics_of(pid: i32) -> Result<Vec<NicInfo>, InfoError> {
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&ns_path).map_err(|source| InfoError::Read {
        path: ns_path.clone().into(),
        source,
    })?;
    let addrs = std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                InfoError::Read {
                    path: ns_path.into(),
                    source: std::io::Error::from(e),
                }
            })?;
            addresses()
        })
        .join()
        .unwrap_or(Err(InfoError::Ifaddrs(nix::errno::Errno::EIO)))
    })?;
    list(Path::new(&format!("/proc/{pid}/root{SYS_NET}")), addrs)
}

fn list(
    sys_net: &Path,
    mut addrs: HashMap<String, Vec<NicAddr>>,
) -> Result<Vec<NicInfo>, InfoError> {
    let dir = std::fs::read_dir(sys_net).map_err(|source| InfoError::Read {
        path: sys_net.into(),
        source,
    })?;
    let mut list: Vec<(u32, NicInfo)> = dir
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = sys_net.join(&name);
            let attr = |a: &str| read_trimmed(base.join(a));
            let index = attr("ifindex")
                .and_then(|s| s.parse().ok())
                .unwrap_or(u32::MAX);
            let nic = NicInfo {
                mtu: attr("mtu").and_then(|s| s.parse().ok()).unwrap_or(0),
                hardwareaddr: attr("address").map(|a| mac_text(&a)).unwrap_or_default(),
                flags: attr("flags").map(|f| flag_names(&f)).unwrap_or_default(),
                addrs: addrs.remove(&name).unwrap_or_default(),
                speed: attr("speed").map_or(0, |s| parse_speed(&s)),
                name,
            };
            (index, nic)
        })
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok(list.into_iter().map(|(_, n)| n).collect())
}

/// The `ip/prefix` addresses of each interface (IPv4 and IPv6).
fn addresses() -> Result<HashMap<String, Vec<NicAddr>>, InfoError> {
    let mut map: HashMap<String, Vec<NicAddr>> = HashMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(InfoError::Ifaddrs)? {
        let Some(ip) = ifa.address.as_ref().and_then(ip_of) else {
            continue;
        };
        let prefix = ifa
            .netmask
            .as_ref()
            .and_then(ip_of)
            .map_or(0, |m| prefix_len(&m));
        map.entry(ifa.interface_name).or_default().push(NicAddr {
            addr: format!("{ip}/{prefix}"),
        });
    }
    Ok(map)
}

/// The IP of an inet or inet6 socket address.
fn ip_of(sa: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = sa.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// The number of leading one bits of a netmask.
fn prefix_len(mask: &IpAddr) -> u32 {
    match mask {
        IpAddr::V4(m) => u32::from(*m).leading_ones(),
        IpAddr::V6(m) => u128::from(*m).leading_ones(),
    }
}

/// The MAC as Go prints it: "" when it is all zeros (loopback, tunnels).
fn mac_text(addr: &str) -> String {
    if addr.chars().all(|c| c == '0' || c == ':') {
        String::new()
    } else {
        addr.to_lowercase()
    }
}

/// Names of the set `IFF_*` bits of a `flags` file (`0x1003`).
fn flag_names(text: &str) -> Vec<String> {
    let bits = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    FLAG_NAMES
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| (*name).to_string())
        .collect()
}

/// Mb/s; unknown (`-1`, unreadable, garbage) is 0.
fn parse_speed(text: &str) -> i64 {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn flags_are_named_like_go() {
        assert_eq!(flag_names("0x9"), vec!["up", "loopback"]);
        assert_eq!(flag_names("0x1003"), vec!["up", "broadcast", "multicast"]);
        assert!(flag_names("junk").is_empty());
    }

    #[test]
    fn speed_unknown_is_zero() {
        assert_eq!(parse_speed("-1\n"), 0);
        assert_eq!(parse_speed("1000"), 1000);
        assert_eq!(parse_speed(""), 0);
    }

    #[test]
    fn prefix_and_mac() {
        assert_eq!(prefix_len(&IpAddr::V4(Ipv4Addr::new(255, 0, 0, 0))), 8);
        assert_eq!(
            prefix_len(&IpAddr::V6(Ipv6Addr::new(
                0xffff, 0xffff, 0xffff, 0xffff, 0, 0, 0, 0
            ))),
            64
        );
        assert_eq!(mac_text("00:00:00:00:00:00"), "");
        assert_eq!(mac_text("52:54:00:AB:cd:ef"), "52:54:00:ab:cd:ef");
    }

    #[test]
    fn real_nics_include_loopback() {
        let list = nics().expect("nics");
        let lo = list.iter().find(|n| n.name == "lo").expect("lo exists");
        assert!(
            lo.addrs.iter().any(|a| a.addr == "127.0.0.1/8"),
            "{:?}",
            lo.addrs
        );
        assert!(lo.flags.iter().any(|f| f == "loopback"));
        assert!(lo.mtu > 0);
        assert_eq!(lo.hardwareaddr, "");
    }
}
