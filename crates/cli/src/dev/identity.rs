//! Node ids for `grid dev`: the MAC of the NIC holding the default route (as core0 itself would
//! choose), and for the extra local nodes that MAC plus the node's index.

use std::path::Path;

/// The interface of the first default route (destination and mask `00000000`) in the text of
/// `/proc/net/route`.
pub fn default_route_iface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        match cols.as_slice() {
            [iface, "00000000", _, _, _, _, _, "00000000", ..] => Some((*iface).to_string()),
            _ => None,
        }
    })
}

/// A MAC address (`52:54:00:12:34:56`, any case, with or without colons) as a 48-bit number.
pub fn parse_mac(s: &str) -> Option<u64> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&hex, 16).ok()
}

/// The id of local node `index`: `base + index` within 48 bits, as 12 lowercase hex digits.
pub fn node_id(base: u64, index: u64) -> String {
    format!("{:012x}", base.wrapping_add(index) & 0xffff_ffff_ffff)
}

fn read_mac(sys_class_net: &Path, iface: &str) -> Option<u64> {
    let text = std::fs::read_to_string(sys_class_net.join(iface).join("address")).ok()?;
    parse_mac(&text).filter(|mac| *mac != 0)
}

/// The MAC of this host's default-route interface; else of the first interface (by name) other
/// than `lo` that has a non-zero MAC.
pub fn host_mac() -> Option<u64> {
    let sys = Path::new("/sys/class/net");
    if let Some(iface) = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_route_iface(&t))
        && let Some(mac) = read_mac(sys, &iface)
    {
        return Some(mac);
    }
    let mut names: Vec<String> = std::fs::read_dir(sys)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.iter().find_map(|n| read_mac(sys, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
        eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n";

    #[test]
    fn default_route_is_found() {
        assert_eq!(default_route_iface(ROUTE).as_deref(), Some("eth0"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }

    #[test]
    fn mac_arithmetic() {
        let base = parse_mac("52:54:00:12:34:56\n").expect("valid mac");
        assert_eq!(node_id(base, 0), "525400123456");
        assert_eq!(node_id(base, 1), "525400123457");
        assert_eq!(node_id(base, 0xaa), "525400123500");
        let low = parse_mac("000000000001").expect("valid mac");
        assert_eq!(node_id(low, 2), "000000000003");
        // Carries across bytes and wraps within 48 bits.
        assert_eq!(
            node_id(parse_mac("00:00:00:00:00:ff").expect("mac"), 1),
            "000000000100"
        );
        assert_eq!(
            node_id(parse_mac("FF:FF:FF:FF:FF:FF").expect("mac"), 2),
            "000000000001"
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("zz5400123456"), None);
    }

    #[test]
    fn this_host_has_a_mac_or_none() {
        // Real /proc and /sys: whatever the host has, the answer is a 48-bit value.
        if let Some(mac) = host_mac() {
            assert!(mac <= 0xffff_ffff_ffff && mac != 0);
        }
    }
}
