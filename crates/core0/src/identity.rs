//! Node identity: the MAC of the NIC holding the default route.
//!
//! The node id is that MAC without colons, lowercase (`525400123456`), as the original used.

use std::path::Path;

const ROUTES: &str = "/proc/net/route";
const SYS_NET: &str = "/sys/class/net";
/// `RTF_UP` of the route flags.
const RTF_UP: u32 = 0x1;
/// `IFF_LOOPBACK` of the interface flags.
const IFF_LOOPBACK: u32 = 0x8;

/// Why no node identity could be found.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `/sys/class/net` could not be listed.
    #[error("cannot list /sys/class/net: {0}")]
    ListInterfaces(#[source] std::io::Error),
    /// Neither the default-route interface nor any other non-loopback one has a MAC.
    #[error("no network interface with a hardware address")]
    NoInterface,
}

/// One row of `/proc/net/route`.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    iface: String,
    destination: u32,
    mask: u32,
    flags: u32,
    metric: u32,
}

/// Parses `/proc/net/route` text (header line first; numbers in hex except the metric).
fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            Some(Route {
                iface: f[0].to_string(),
                destination: hex(f[1])?,
                flags: hex(f[3])?,
                metric: f[6].parse().ok()?,
                mask: hex(f[7])?,
            })
        })
        .collect()
}

/// The interface of the default route with the lowest metric.
fn default_interface(routes: &[Route]) -> Option<&str> {
    routes
        .iter()
        .filter(|r| r.destination == 0 && r.mask == 0 && r.flags & RTF_UP != 0)
        .min_by_key(|r| r.metric)
        .map(|r| r.iface.as_str())
}

/// A MAC text (`52:54:00:12:34:56`) as a node id (`525400123456`); `None` when empty or all zeros.
fn mac_to_id(mac: &str) -> Option<String> {
    let id: String = mac
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let valid = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit());
    (valid && id.chars().any(|c| c != '0')).then_some(id)
}

/// The node id from an interface's `/sys/class/net/<if>/address`.
fn interface_id(iface: &str) -> Option<String> {
    let mac = std::fs::read_to_string(Path::new(SYS_NET).join(iface).join("address")).ok()?;
    mac_to_id(&mac)
}

/// Whether `/sys/class/net/<if>/flags` says loopback.
fn is_loopback(iface: &str) -> bool {
    std::fs::read_to_string(Path::new(SYS_NET).join(iface).join("flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|f| f & IFF_LOOPBACK != 0)
}

/// The node id: the MAC of the default-route interface (lowest metric), colons removed,
/// lowercase. Without a default route (or when its interface has no MAC), the first non-loopback
/// interface (by index) with a non-zero MAC, with a warning.
pub fn default_route_mac() -> Result<String, IdentityError> {
    let routes = match std::fs::read_to_string(ROUTES) {
        Ok(text) => parse_routes(&text),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read {ROUTES}");
            Vec::new()
        }
    };
    match default_interface(&routes) {
        Some(iface) => {
            if let Some(id) = interface_id(iface) {
                return Ok(id);
            }
            tracing::warn!(
                iface,
                "default-route interface has no hardware address, using the first other interface"
            );
        }
        None => tracing::warn!("no default route, using the first non-loopback interface's MAC"),
    }
    let mut ifaces: Vec<(u32, String)> = std::fs::read_dir(SYS_NET)
        .map_err(IdentityError::ListInterfaces)?
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index = std::fs::read_to_string(Path::new(SYS_NET).join(&name).join("ifindex"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(u32::MAX);
            (index, name)
        })
        .collect();
    ifaces.sort();
    ifaces
        .iter()
        .filter(|(_, name)| !is_loopback(name))
        .find_map(|(_, name)| {
            let id = interface_id(name)?;
            tracing::warn!(iface = %name, id = %id, "node id taken from a non-default interface");
            Some(id)
        })
        .ok_or(IdentityError::NoInterface)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn parses_routes() {
        let r = parse_routes(SAMPLE);
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].iface, "eth0");
        assert_eq!(r[1].destination, 0);
        assert_eq!(r[1].metric, 100);
        assert_eq!(r[2].destination, 0x0002_00C0);
        assert_eq!(r[2].mask, 0x00FF_FFFF);
        assert_eq!(r[2].flags, RTF_UP);
    }

    #[test]
    fn default_route_has_lowest_metric() {
        assert_eq!(default_interface(&parse_routes(SAMPLE)), Some("eth0"));
        let only_subnet = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                           eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_interface(&parse_routes(only_subnet)), None);
        assert_eq!(default_interface(&parse_routes("")), None);
    }

    #[test]
    fn mac_becomes_id() {
        assert_eq!(
            mac_to_id("52:54:00:12:34:56\n").as_deref(),
            Some("525400123456")
        );
        assert_eq!(
            mac_to_id("52:54:00:AB:CD:EF").as_deref(),
            Some("525400abcdef")
        );
        assert_eq!(mac_to_id("00:00:00:00:00:00"), None);
        assert_eq!(mac_to_id(""), None);
    }

    #[test]
    fn real_host_has_an_identity() {
        let id = default_route_mac().expect("this host has a NIC with a MAC");
        assert_eq!(id.len(), 12);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let routes = parse_routes(&std::fs::read_to_string(ROUTES).unwrap_or_default());
        if let Some(iface) = default_interface(&routes).filter(|i| interface_id(i).is_some()) {
            let mac = std::fs::read_to_string(Path::new(SYS_NET).join(iface).join("address"))
                .expect("default interface has an address file");
            assert_eq!(id, mac.trim().replace(':', "").to_lowercase());
        }
    }
}
