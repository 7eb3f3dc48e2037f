//! IPv4 address arithmetic for IPAM: [`Cidr`], and the searches for free
//! addresses inside ranges this peer owns.
//!
//! Owns: CIDR parsing and validation, the reserved-address rule, and pure
//! searches over an allocation map (lowest free address, free runs, counts).
//! Holds no state and knows nothing about owners or the ring.
//!
//! # Reserved addresses
//! A subnet's network and broadcast addresses are never handed out by an
//! `Any(subnet)` request, and an exact claim of one is refused. Because every
//! subnet lies inside the universe and is aligned, the universe's own first and
//! last addresses are reserved for every subnet too: they are never counted as
//! free, which is why "usable" intervals below are simply clipped at both ends.
//! Addresses are `u32`; interval ends are `u64` (exclusive) so that no sum overflows.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 network: an address with its host bits clear and a prefix length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cidr {
    start: u32,
    prefix: u8,
}

/// Why a CIDR did not parse or is not a network address.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum CidrError {
    #[error("invalid CIDR {0:?}: expected a.b.c.d/n")]
    Syntax(String),
    #[error("prefix length /{0} is over /32")]
    Prefix(u8),
    #[error("{addr}/{prefix} has host bits set (did you mean {network}/{prefix}?)")]
    HostBits { addr: Ipv4Addr, prefix: u8, network: Ipv4Addr },
}

pub(crate) fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32))
    }
}

impl Cidr {
    /// A network; the host bits of `addr` must be zero.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, CidrError> {
        if prefix > 32 {
            return Err(CidrError::Prefix(prefix));
        }
        let a = u32::from(addr);
        let network = a & mask(prefix);
        if network != a {
            return Err(CidrError::HostBits { addr, prefix, network: Ipv4Addr::from(network) });
        }
        Ok(Cidr { start: a, prefix })
    }

    /// The network containing `addr` (host bits dropped).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, CidrError> {
        if prefix > 32 {
            return Err(CidrError::Prefix(prefix));
        }
        Ok(Cidr { start: u32::from(addr) & mask(prefix), prefix })
    }

    /// Whether a decoded value satisfies what [`Cidr::new`] checks.
    pub(crate) fn is_valid(&self) -> bool {
        self.prefix <= 32 && self.start & mask(self.prefix) == self.start
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.start)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses, `2^(32 - prefix)`.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix.min(32))
    }

    pub(crate) fn start(&self) -> u32 {
        self.start
    }

    /// One past the last address.
    pub(crate) fn end(&self) -> u64 {
        self.start as u64 + self.size()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.contains_u32(u32::from(ip))
    }

    pub(crate) fn contains_u32(&self, ip: u32) -> bool {
        ip & mask(self.prefix) == self.start
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_net(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains_u32(other.start)
    }

    /// The addresses an `Any(self)` request may hand out: all but the network and
    /// broadcast addresses (for /31 and /32, which have none, everything).
    pub(crate) fn usable(&self) -> (u64, u64) {
        if self.prefix <= 30 {
            (self.start as u64 + 1, self.end() - 1)
        } else {
            (self.start as u64, self.end())
        }
    }

    /// Whether `ip` is this network's network or broadcast address (only /30 and larger have them).
    pub(crate) fn is_reserved(&self, ip: u32) -> bool {
        self.prefix <= 30 && (ip as u64 == self.start as u64 || ip as u64 == self.end() - 1)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.start), self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    /// Parses `a.b.c.d/n`; the address must be the network address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Syntax(s.to_string()));
        }
        let prefix: u8 = p.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        Cidr::new(addr, prefix)
    }
}

/// Clips `[lo, hi)` to `[a, b)`; `None` if empty.
pub(crate) fn clip(lo: u64, hi: u64, a: u64, b: u64) -> Option<(u64, u64)> {
    let l = lo.max(a);
    let h = hi.min(b);
    (l < h).then_some((l, h))
}

/// Lowest address in `[lo, hi)` that is not a key of `used`.
pub(crate) fn lowest_free<T>(lo: u64, hi: u64, used: &BTreeMap<u32, T>) -> Option<u32> {
    if lo >= hi || lo > u32::MAX as u64 {
        return None;
    }
    let mut cand = lo;
    for (&ip, _) in used.range(lo as u32..) {
        if ip as u64 >= hi || ip as u64 != cand {
            break;
        }
        cand += 1;
    }
    (cand < hi).then_some(cand as u32)
}

/// How many keys of `used` lie in `[lo, hi)`.
pub(crate) fn count_used<T>(lo: u64, hi: u64, used: &BTreeMap<u32, T>) -> u64 {
    if lo >= hi || lo > u32::MAX as u64 {
        return 0;
    }
    used.range(lo as u32..).take_while(|(&ip, _)| (ip as u64) < hi).count() as u64
}

/// The maximal runs of addresses in `[lo, hi)` that are not keys of `used`, in order.
pub(crate) fn free_runs<T>(lo: u64, hi: u64, used: &BTreeMap<u32, T>) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    if lo >= hi || lo > u32::MAX as u64 {
        return runs;
    }
    let mut cur = lo;
    for (&ip, _) in used.range(lo as u32..) {
        let ip = ip as u64;
        if ip >= hi {
            break;
        }
        if ip > cur {
            runs.push((cur, ip));
        }
        cur = ip + 1;
    }
    if cur < hi {
        runs.push((cur, hi));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(c("10.32.0.0/12").to_string(), "10.32.0.0/12");
        assert_eq!(c("10.32.0.0/12").size(), 1 << 20);
        assert!(matches!("10.32.0.1/12".parse::<Cidr>(), Err(CidrError::HostBits { .. })));
        assert!(matches!("10.32.0.0/33".parse::<Cidr>(), Err(CidrError::Prefix(33))));
        for bad in ["", "10.0.0.0", "10.0.0.0/", "10.0.0/8", "10.0.0.0/+8", "10.0.0.0/008", "x/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(c("0.0.0.0/0").size(), 1 << 32);
        assert_eq!(c("1.2.3.4/32").size(), 1);
    }

    #[test]
    fn containment_and_reserved() {
        let u = c("10.32.0.0/12");
        assert!(u.contains_net(&c("10.32.5.0/24")));
        assert!(u.contains_net(&u));
        assert!(!u.contains_net(&c("10.0.0.0/8")));
        assert!(!u.contains_net(&c("10.48.0.0/24")));
        assert_eq!(c("10.32.5.0/24").usable(), (u32::from(Ipv4Addr::new(10, 32, 5, 1)) as u64, u32::from(Ipv4Addr::new(10, 32, 5, 255)) as u64));
        assert!(c("10.32.5.0/24").is_reserved(u32::from(Ipv4Addr::new(10, 32, 5, 255))));
        assert!(!c("10.32.5.0/31").is_reserved(u32::from(Ipv4Addr::new(10, 32, 5, 0))));
        assert_eq!(Cidr::containing(Ipv4Addr::new(10, 32, 5, 7), 24).unwrap(), c("10.32.5.0/24"));
    }

    #[test]
    fn searches() {
        let mut used = BTreeMap::new();
        for ip in [10u32, 11, 13, 20] {
            used.insert(ip, ());
        }
        assert_eq!(lowest_free(10, 30, &used), Some(12));
        assert_eq!(lowest_free(10, 12, &used), None);
        assert_eq!(lowest_free(14, 15, &used), Some(14));
        assert_eq!(count_used(10, 20, &used), 3);
        assert_eq!(free_runs(9, 22, &used), vec![(9, 10), (12, 13), (14, 20), (21, 22)]);
        assert_eq!(free_runs(10, 12, &used), vec![]);
        assert_eq!(lowest_free(u32::MAX as u64, u32::MAX as u64 + 1, &used), Some(u32::MAX));
    }
}
