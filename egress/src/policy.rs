//! Which addresses `flower egress connect` may reach: `--allow`/`--deny` CIDRs over a
//! default that keeps node-local addresses out of reach.
//!
//! An address is first normalised: an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is
//! the IPv4 address it maps, and the unspecified addresses (`0.0.0.0`, `::`), which
//! connect to the local host, count as loopback. Then:
//!
//! 1. in a `--deny` CIDR: refused;
//! 2. in an `--allow` CIDR: allowed;
//! 3. any `--allow` given at all: refused (the allow list is then exhaustive);
//! 4. otherwise allowed unless node-local: loopback (`127.0.0.0/8`, `::1`), link-local
//!    (`169.254.0.0/16`, `fe80::/10`) or unspecified. A process given an egress must not
//!    reach services that listen only for the node unless the operator says so.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block, `ADDRESS/PREFIX` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, normalise(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_eq(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn mask_eq(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (a >> shift) == (b >> shift)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not a CIDR block such as 10.0.0.0/8 or fd00::/8");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let raw = addr.parse::<IpAddr>().map_err(|_| bad())?;
        let bits = if raw.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(bad)?,
        };
        // An IPv4-mapped block is the IPv4 block it maps (its last 32 bits).
        match raw {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                let v4 = v6.to_ipv4_mapped().expect("checked");
                let prefix = prefix.checked_sub(96).ok_or_else(bad)?;
                Ok(Cidr {
                    addr: IpAddr::V4(v4),
                    prefix,
                })
            }
            addr => Ok(Cidr { addr, prefix }),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv4-mapped IPv6 as IPv4; unspecified as loopback (that is where it connects).
pub fn normalise(ip: IpAddr) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

fn node_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The operator's `--allow`/`--deny` lists.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl Policy {
    /// Whether `ip` may be connected to (module docs for the rules).
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = normalise(ip);
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return true;
        }
        self.allow.is_empty() && !node_local(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn node_local_addresses_are_refused_by_default_in_every_spelling() {
        let policy = Policy::default();
        for local in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fe80::1",
        ] {
            assert!(!policy.permits(ip(local)), "{local}");
        }
        for remote in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "10.1.2.3"] {
            assert!(policy.permits(ip(remote)), "{remote}");
        }
    }

    #[test]
    fn deny_wins_and_allow_is_exhaustive() {
        let policy = Policy {
            allow: cidrs(&["127.0.0.0/8", "10.0.0.0/8"]),
            deny: cidrs(&["10.9.0.0/16"]),
        };
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")));
        assert!(policy.permits(ip("0.0.0.0")), "unspecified is loopback");
        assert!(policy.permits(ip("10.1.0.1")));
        assert!(!policy.permits(ip("10.9.0.1")));
        assert!(!policy.permits(ip("192.0.2.1")), "not in the allow list");
        let deny_mapped = Policy {
            allow: Vec::new(),
            deny: cidrs(&["::ffff:192.0.2.0/120"]),
        };
        assert!(!deny_mapped.permits(ip("192.0.2.7")));
        assert!(
            Policy {
                allow: cidrs(&["0.0.0.0/0"]),
                deny: vec![]
            }
            .permits(ip("8.8.8.8"))
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }
}
