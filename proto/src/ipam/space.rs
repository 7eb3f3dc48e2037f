//! Address arithmetic for IPAM: [`Cidr`] (IPv4 or IPv6), and the searches for
//! free addresses inside ranges this peer owns.
//!
//! Owns: CIDR parsing and validation, the reserved-address rule, and pure
//! searches over an allocation map (lowest free address, free runs, counts).
//! Holds no state and knows nothing about owners or the ring.
//!
//! # Addresses
//! Addresses of both families are [`Addr`] (`u128`): an IPv4 address is its
//! `u32` value, an IPv6 address its 128-bit value; the family is the
//! universe's. Interval ends are exclusive `u128`s: an allocation range may not
//! end at `2^128` (see [`Cidr::is_allocatable`]), so no sum overflows. Nothing
//! here enumerates a range: searches walk the allocation map only.
//!
//! # Reserved addresses
//! A subnet's network and broadcast addresses are never handed out by an
//! `Any(subnet)` request, and an exact claim of one is refused. Because every
//! subnet lies inside the universe and is aligned, the universe's own first and
//! last addresses are reserved for every subnet too: they are never counted as
//! free, which is why "usable" intervals below are simply clipped at both ends.
//! IPv6 has no broadcast address, but the same rule keeps the subnet-router
//! anycast address (the first) and the last address out of use.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address inside the ring: an IPv4 address's `u32` value or an IPv6 address's `u128`.
pub type Addr = u128;

/// An IPv4 or IPv6 network: an address with its host bits clear and a prefix length.
///
/// Serialized as `(start, code)` with `code` the prefix for IPv4 and
/// `256 + prefix` for IPv6 (a `u16`): with bincode's variable-length integers an
/// IPv4 network encodes exactly as before IPv6 existed (`u32` start, `u8` prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    v6: bool,
    start: Addr,
    prefix: u8,
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let code: u16 = if self.v6 { 256 + self.prefix as u16 } else { self.prefix as u16 };
        (self.start, code).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (start, code) = <(Addr, u16)>::deserialize(d)?;
        let (v6, prefix) = match code {
            0..=32 => (false, code as u8),
            256..=384 => (true, (code - 256) as u8),
            _ => return Err(serde::de::Error::custom("bad prefix length")),
        };
        if !v6 && start > u32::MAX as u128 {
            return Err(serde::de::Error::custom("IPv4 address over 32 bits"));
        }
        Ok(Cidr { v6, start, prefix })
    }
}

/// Why a CIDR did not parse or is not a network address.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum CidrError {
    #[error("invalid CIDR {0:?}: expected a.b.c.d/n or an IPv6 address/n")]
    Syntax(String),
    #[error("prefix length /{0} is too long")]
    Prefix(u8),
    #[error("{addr}/{prefix} has host bits set (did you mean {network}/{prefix}?)")]
    HostBits { addr: IpAddr, prefix: u8, network: IpAddr },
}

/// The bits of an address of `v6`'s family.
pub(crate) fn width(v6: bool) -> u8 {
    if v6 {
        128
    } else {
        32
    }
}

/// The network mask of `prefix` in a `width`-bit family, as an [`Addr`].
pub(crate) fn mask_w(width: u8, prefix: u8) -> Addr {
    let host = width.saturating_sub(prefix.min(width));
    let all: Addr = if width >= 128 { u128::MAX } else { (1u128 << width) - 1 };
    if host >= 128 {
        0
    } else {
        all & !((1u128 << host) - 1) & all
    }
}

/// An address as an [`Addr`].
pub fn addr_value(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(a) => u32::from(a) as Addr,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// An [`Addr`] of the given family as an address (an IPv4 value is truncated to 32 bits).
pub fn addr_ip(v6: bool, a: Addr) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::from(a as u32))
    }
}

impl Cidr {
    /// A network; the host bits of `addr` must be zero.
    pub fn new(addr: impl Into<IpAddr>, prefix: u8) -> Result<Cidr, CidrError> {
        let addr = addr.into();
        let v6 = addr.is_ipv6();
        if prefix > width(v6) {
            return Err(CidrError::Prefix(prefix));
        }
        let a = addr_value(addr);
        let network = a & mask_w(width(v6), prefix);
        if network != a {
            return Err(CidrError::HostBits { addr, prefix, network: addr_ip(v6, network) });
        }
        Ok(Cidr { v6, start: a, prefix })
    }

    /// The network containing `addr` (host bits dropped).
    pub fn containing(addr: impl Into<IpAddr>, prefix: u8) -> Result<Cidr, CidrError> {
        let addr = addr.into();
        let v6 = addr.is_ipv6();
        if prefix > width(v6) {
            return Err(CidrError::Prefix(prefix));
        }
        Ok(Cidr { v6, start: addr_value(addr) & mask_w(width(v6), prefix), prefix })
    }

    /// Whether a decoded value satisfies what [`Cidr::new`] checks.
    pub(crate) fn is_valid(&self) -> bool {
        let w = width(self.v6);
        self.prefix <= w && (self.v6 || self.start <= u32::MAX as u128) && self.start & mask_w(w, self.prefix) == self.start
    }

    /// Whether this is an IPv6 network.
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    /// Whether IPAM can use this network as its allocation range: IPv4 from /1
    /// to /30, IPv6 from /1 to /126 and not holding the last IPv6 address
    /// (interval ends must stay below `2^128`).
    pub fn is_allocatable(&self) -> bool {
        if self.v6 {
            (1..=126).contains(&self.prefix) && self.start.checked_add(self.size()).is_some()
        } else {
            (1..=30).contains(&self.prefix)
        }
    }

    /// Longest prefix an `Any(subnet)` request may use (it needs more than the
    /// two reserved addresses): /30 for IPv4, /126 for IPv6.
    pub fn max_subnet_prefix(&self) -> u8 {
        width(self.v6) - 2
    }

    pub fn network(&self) -> IpAddr {
        addr_ip(self.v6, self.start)
    }

    /// The network address as an IPv4 address (`None` for IPv6).
    pub fn network_v4(&self) -> Option<Ipv4Addr> {
        (!self.v6).then(|| Ipv4Addr::from(self.start as u32))
    }

    /// An address of this network's family.
    pub fn ip(&self, a: Addr) -> IpAddr {
        addr_ip(self.v6, a)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses, `2^(width - prefix)` (`u128::MAX` for `::/0`).
    pub fn size(&self) -> u128 {
        let host = width(self.v6) - self.prefix.min(width(self.v6));
        if host >= 128 {
            u128::MAX
        } else {
            1u128 << host
        }
    }

    pub(crate) fn start(&self) -> Addr {
        self.start
    }

    /// One past the last address (saturating at `u128::MAX`, only for ranges
    /// IPAM refuses anyway).
    pub(crate) fn end(&self) -> Addr {
        self.start.saturating_add(self.size())
    }

    /// Whether `ip` (of either family) lies in this network.
    pub fn contains(&self, ip: impl Into<IpAddr>) -> bool {
        let ip = ip.into();
        ip.is_ipv6() == self.v6 && self.contains_u(addr_value(ip))
    }

    pub(crate) fn contains_u(&self, ip: Addr) -> bool {
        ip & mask_w(width(self.v6), self.prefix) == self.start && (self.v6 || ip <= u32::MAX as u128)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_net(&self, other: &Cidr) -> bool {
        other.v6 == self.v6 && other.prefix >= self.prefix && self.contains_u(other.start)
    }

    /// The addresses an `Any(self)` request may hand out: all but the first and
    /// last (for /31 and /32, or /127 and /128, which have none, everything).
    pub(crate) fn usable(&self) -> (Addr, Addr) {
        if self.prefix <= self.max_subnet_prefix() {
            (self.start + 1, self.end() - 1)
        } else {
            (self.start, self.end())
        }
    }

    /// Whether `ip` is this network's first or last address (only networks of
    /// at least four addresses have them).
    pub(crate) fn is_reserved(&self, ip: Addr) -> bool {
        self.prefix <= self.max_subnet_prefix() && (ip == self.start || ip == self.end() - 1)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    /// Parses `a.b.c.d/n` or `v6addr/n`; the address must be the network address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        let addr: IpAddr = a.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Syntax(s.to_string()));
        }
        if addr.is_ipv4() && p.len() > 2 {
            return Err(CidrError::Syntax(s.to_string()));
        }
        let prefix: u8 = p.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        Cidr::new(addr, prefix)
    }
}

/// Clips `[lo, hi)` to `[a, b)`; `None` if empty.
pub(crate) fn clip(lo: Addr, hi: Addr, a: Addr, b: Addr) -> Option<(Addr, Addr)> {
    let l = lo.max(a);
    let h = hi.min(b);
    (l < h).then_some((l, h))
}

/// Lowest address in `[lo, hi)` that is not a key of `used`.
pub(crate) fn lowest_free<T>(lo: Addr, hi: Addr, used: &BTreeMap<Addr, T>) -> Option<Addr> {
    if lo >= hi {
        return None;
    }
    let mut cand = lo;
    for (&ip, _) in used.range(lo..) {
        if ip >= hi || ip != cand {
            break;
        }
        cand += 1;
    }
    (cand < hi).then_some(cand)
}

/// How many keys of `used` lie in `[lo, hi)`.
pub(crate) fn count_used<T>(lo: Addr, hi: Addr, used: &BTreeMap<Addr, T>) -> u128 {
    if lo >= hi {
        return 0;
    }
    used.range(lo..hi).count() as u128
}

/// The maximal runs of addresses in `[lo, hi)` that are not keys of `used`, in order.
pub(crate) fn free_runs<T>(lo: Addr, hi: Addr, used: &BTreeMap<Addr, T>) -> Vec<(Addr, Addr)> {
    let mut runs = Vec::new();
    if lo >= hi {
        return runs;
    }
    let mut cur = lo;
    for (&ip, _) in used.range(lo..hi) {
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
        assert_eq!(c("10.32.5.0/24").usable(), (u32::from(Ipv4Addr::new(10, 32, 5, 1)) as Addr, u32::from(Ipv4Addr::new(10, 32, 5, 255)) as Addr));
        assert!(c("10.32.5.0/24").is_reserved(u32::from(Ipv4Addr::new(10, 32, 5, 255)) as Addr));
        assert!(!c("10.32.5.0/31").is_reserved(u32::from(Ipv4Addr::new(10, 32, 5, 0)) as Addr));
        assert_eq!(Cidr::containing(Ipv4Addr::new(10, 32, 5, 7), 24).unwrap(), c("10.32.5.0/24"));
    }

    #[test]
    fn searches() {
        let mut used = BTreeMap::new();
        for ip in [10u128, 11, 13, 20] {
            used.insert(ip, ());
        }
        assert_eq!(lowest_free(10, 30, &used), Some(12));
        assert_eq!(lowest_free(10, 12, &used), None);
        assert_eq!(lowest_free(14, 15, &used), Some(14));
        assert_eq!(count_used(10, 20, &used), 3);
        assert_eq!(free_runs(9, 22, &used), vec![(9, 10), (12, 13), (14, 20), (21, 22)]);
        assert_eq!(free_runs(10, 12, &used), vec![]);
        assert_eq!(lowest_free(u32::MAX as Addr, u32::MAX as Addr + 1, &used), Some(u32::MAX as Addr));
    }

    #[test]
    fn ipv6_cidrs() {
        let u = c("fd32::/64");
        assert!(u.is_v6() && u.is_allocatable());
        assert_eq!(u.size(), 1u128 << 64);
        assert_eq!(u.to_string(), "fd32::/64");
        assert!(u.contains("fd32::5".parse::<IpAddr>().unwrap()));
        assert!(!u.contains("fd33::5".parse::<IpAddr>().unwrap()));
        assert!(!u.contains(Ipv4Addr::new(10, 0, 0, 1)), "another family");
        assert!(u.contains_net(&c("fd32:0:0:0:1::/80")));
        assert!(!u.contains_net(&c("10.32.0.0/12")));
        assert!(!c("10.32.0.0/12").contains_net(&c("::/0")));
        assert!(matches!("fd32::1/64".parse::<Cidr>(), Err(CidrError::HostBits { .. })));
        assert!(matches!("fd32::/129".parse::<Cidr>(), Err(CidrError::Prefix(129))));
        assert!(matches!("10.0.0.0/100".parse::<Cidr>(), Err(CidrError::Syntax(_))));
        assert_eq!(c("::/0").size(), u128::MAX);
        assert!(!c("::/0").is_allocatable());
        assert!(!c("ff00::/8").is_allocatable(), "holds the last address");
        assert!(c("fe00::/8").is_allocatable());
        assert!(!c("fd32::/127").is_allocatable());
        assert_eq!(c("fd32::/126").usable(), (u.start() + 1, u.start() + 3));
        assert!(c("fd32::/126").is_reserved(u.start()));
        assert!(!c("fd32::/127").is_reserved(u.start()));
        assert_eq!(Cidr::containing("fd32::1:2:3:4".parse::<IpAddr>().unwrap(), 80).unwrap(), c("fd32:0:0:0:1::/80"));
    }

    /// An IPv4 network encodes exactly as the `{ start: u32, prefix: u8 }` of
    /// releases before IPv6 (peers and snapshots of those releases still read
    /// it); an IPv6 one does not decode as IPv4.
    #[test]
    fn serde_compatible_with_the_ipv4_only_layout() {
        #[derive(Serialize, Deserialize)]
        struct Old {
            start: u32,
            prefix: u8,
        }
        let cfg = bincode::config::standard();
        for s in ["10.32.0.0/12", "0.0.0.0/0", "255.255.255.252/30", "10.40.0.0/16"] {
            let new = c(s);
            let old = Old { start: u32::from(new.network_v4().unwrap()), prefix: new.prefix() };
            let nb = bincode::serde::encode_to_vec(new, cfg).unwrap();
            assert_eq!(nb, bincode::serde::encode_to_vec(&old, cfg).unwrap(), "{s}");
            let (back, _): (Cidr, usize) = bincode::serde::decode_from_slice(&nb, cfg).unwrap();
            assert_eq!(back, new);
        }
        let v6 = c("fd32::/64");
        let b = bincode::serde::encode_to_vec(v6, cfg).unwrap();
        let (back, _): (Cidr, usize) = bincode::serde::decode_from_slice(&b, cfg).unwrap();
        assert_eq!(back, v6);
        assert!(bincode::serde::decode_from_slice::<Old, _>(&b, cfg).is_err(), "an old peer cannot read it as IPv4");
        // Out-of-range codes and IPv4 starts over 32 bits are refused.
        for bad in [(1u128, 33u16), (1u128 << 40, 8u16), (0, 385), (0, 255)] {
            let b = bincode::serde::encode_to_vec(bad, cfg).unwrap();
            assert!(bincode::serde::decode_from_slice::<Cidr, _>(&b, cfg).is_err(), "{bad:?}");
        }
    }
}
