//! Values of iptables options: addresses and prefixes, port ranges, NAT ranges.
//!
//! Each parser takes the text as `iptables-save` prints it and says precisely what is wrong
//! otherwise; none of them panics on any input.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::PortRange;

/// `A.B.C.D`, `A.B.C.D/N` or `A.B.C.D/M.M.M.M` (a contiguous mask). Host bits are cleared, as
/// iptables itself does when it adds the rule.
pub(super) fn prefix(s: &str) -> Result<Ipv4Net, String> {
    let (addr, len) = match s.split_once('/') {
        None => (s, 32),
        Some((addr, mask)) => (addr, prefix_len(mask).map_err(|m| format!("{s:?}: {m}"))?),
    };
    let addr = address(addr).map_err(|m| format!("{s:?}: {m}"))?;
    Ipv4Net::new(addr, len)
        .map(|net| net.trunc())
        .map_err(|_| format!("{s:?}: bad prefix length"))
}

fn prefix_len(mask: &str) -> Result<u8, String> {
    if let Ok(len) = mask.parse::<u8>() {
        return if len <= 32 {
            Ok(len)
        } else {
            Err(format!("prefix length {len} is over 32"))
        };
    }
    let bits = u32::from(
        mask.parse::<Ipv4Addr>()
            .map_err(|_| format!("{mask:?} is neither a prefix length nor a netmask"))?,
    );
    // A netmask is contiguous: all its ones come before all its zeros.
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(format!("netmask {mask} is not contiguous"));
    }
    Ok(bits.leading_ones() as u8)
}

/// A dotted-quad IPv4 address.
pub(super) fn address(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>().map_err(|_| {
        if s.contains(':') {
            format!("{s:?} is not an IPv4 address (IPv6 is not supported)")
        } else {
            format!(
                "{s:?} is not an IPv4 address (iptables-save prints addresses; host names \
                 are not resolved)"
            )
        }
    })
}

/// A port number 1..=65535.
fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(0) => Err("port 0 cannot be matched or written".into()),
        _ => Err(format!(
            "{s:?} is not a port number in 1..=65535 (service names are not resolved)"
        )),
    }
}

/// `--dport` syntax: `N`, `N:M`, `N:` (to 65535) or `:M` (from 1: port 0 never appears on
/// the wire for TCP or UDP).
pub(super) fn match_ports(s: &str) -> Result<PortRange, String> {
    let (min, max) = match s.split_once(':') {
        None => {
            let p = port(s)?;
            (p, p)
        }
        Some((a, b)) => {
            let min = if a.is_empty() || a == "0" {
                1
            } else {
                port(a)?
            };
            let max = if b.is_empty() { 65535 } else { port(b)? };
            (min, max)
        }
    };
    if min > max {
        return Err(format!("{s:?}: the range is backwards"));
    }
    Ok(PortRange { min, max })
}

/// `P` or `P-Q` (`--to-ports`, and the port part of a NAT range).
pub(super) fn nat_ports(s: &str) -> Result<PortRange, String> {
    let (min, max) = match s.split_once('-') {
        None => {
            let p = port(s)?;
            (p, p)
        }
        Some((a, b)) => (port(a)?, port(b)?),
    };
    if min > max {
        return Err(format!("{s:?}: the range is backwards"));
    }
    Ok(PortRange { min, max })
}

/// `--to-destination` / `--to-source`: `[A[-B]][:P[-Q][/BASE]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NatRange {
    /// First and last address; `None` keeps the packet's address (DNAT `:PORT`).
    pub addresses: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Ports written; `None` keeps the packet's port.
    pub ports: Option<PortRange>,
    /// `/BASE`: port `BASE` maps to `ports.min`, `BASE + 1` to the next (shifted mapping).
    pub base: Option<u16>,
}

impl NatRange {
    /// Parses the range.
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with('[') {
            return Err(format!("{s:?}: IPv6 is not supported"));
        }
        let (addr_part, port_part) = match s.split_once(':') {
            None => (s, None),
            Some((a, p)) => (a, Some(p)),
        };
        let addresses = match addr_part {
            "" => None,
            a => Some(match a.split_once('-') {
                None => {
                    let one = address(a)?;
                    (one, one)
                }
                Some((first, last)) => {
                    let (first, last) = (address(first)?, address(last)?);
                    if first > last {
                        return Err(format!("{a:?}: the address range is backwards"));
                    }
                    (first, last)
                }
            }),
        };
        let (ports, base) = match port_part {
            None => (None, None),
            Some(p) => {
                let (range, base) = match p.split_once('/') {
                    None => (p, None),
                    Some((range, base)) => (range, Some(port(base)?)),
                };
                (Some(nat_ports(range)?), base)
            }
        };
        if addresses.is_none() && ports.is_none() {
            return Err(format!("{s:?} names neither an address nor a port"));
        }
        Ok(Self {
            addresses,
            ports,
            base,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            prefix("198.18.100.10/32").unwrap().to_string(),
            "198.18.100.10/32"
        );
        assert_eq!(prefix("198.18.100.10").unwrap().prefix_len(), 32);
        assert_eq!(
            prefix("198.18.0.0/255.255.255.0").unwrap().to_string(),
            "198.18.0.0/24"
        );
        // iptables clears host bits when it adds a rule; so does the import.
        assert_eq!(
            prefix("198.18.0.7/24").unwrap().to_string(),
            "198.18.0.0/24"
        );
        assert_eq!(prefix("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        for bad in [
            "",
            "x",
            "198.18.0.0/33",
            "198.18.0.0/255.0.255.0",
            "fe80::1/64",
            "example.com",
            "1.2.3.4/",
        ] {
            assert!(prefix(bad).is_err(), "{bad}");
        }
        assert!(prefix("fe80::1").unwrap_err().contains("IPv6"));
    }

    #[test]
    fn match_ports_use_colons() {
        let r = |min, max| PortRange { min, max };
        assert_eq!(match_ports("80").unwrap(), r(80, 80));
        assert_eq!(match_ports("8000:8009").unwrap(), r(8000, 8009));
        assert_eq!(match_ports("1024:").unwrap(), r(1024, 65535));
        assert_eq!(match_ports(":1023").unwrap(), r(1, 1023));
        assert_eq!(match_ports("0:1023").unwrap(), r(1, 1023));
        for bad in ["0", "9:1", "http", "80-90", "", "65536", "1:2:3"] {
            assert!(match_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nat_ranges() {
        let n = NatRange::parse("198.18.1.2:80").unwrap();
        assert_eq!(
            n.addresses,
            Some((Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 1, 2)))
        );
        assert_eq!(n.ports, Some(PortRange { min: 80, max: 80 }));
        let n = NatRange::parse("203.0.113.1-203.0.113.4:1024-2047").unwrap();
        assert_eq!(n.addresses.unwrap().1, Ipv4Addr::new(203, 0, 113, 4));
        assert_eq!(
            n.ports,
            Some(PortRange {
                min: 1024,
                max: 2047
            })
        );
        let n = NatRange::parse("198.18.1.2:5000-5009/8000").unwrap();
        assert_eq!(n.base, Some(8000));
        let n = NatRange::parse(":8080").unwrap();
        assert_eq!(n.addresses, None);
        let n = NatRange::parse("198.18.1.2").unwrap();
        assert_eq!(n.ports, None);
        for bad in [
            "",
            ":",
            "198.18.1.2:",
            "198.18.1.9-198.18.1.2",
            "198.18.1.2:90-80",
            "[fe80::1]:80",
            "198.18.1.2:80/x",
            "a.b.c.d",
        ] {
            assert!(NatRange::parse(bad).is_err(), "{bad}");
        }
    }
}
