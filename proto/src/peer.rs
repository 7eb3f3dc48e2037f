//! Peer names and MAC addresses: the two identifiers the whole mesh uses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    PeerName::from_mac(*mac).to_string()
}

/// A peer's name on the mesh: 48 bits, shown like a MAC address (as Weave does).
///
/// Derived from the peer's static Noise public key unless given with `--name`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct PeerName(pub u64);

impl PeerName {
    /// The all-zero name, used on the wire for "every peer" (broadcast).
    pub const BROADCAST: PeerName = PeerName(0);
    const MASK: u64 = 0xffff_ffff_ffff;

    pub fn from_mac(mac: Mac) -> Self {
        let mut v = 0u64;
        for b in mac {
            v = (v << 8) | b as u64;
        }
        PeerName(v)
    }

    pub fn to_mac(self) -> Mac {
        let b = (self.0 & Self::MASK).to_be_bytes();
        [b[2], b[3], b[4], b[5], b[6], b[7]]
    }

    /// Derives a name from a public key: the first 48 bits of its SHA-256, with the
    /// locally-administered bit set and the multicast bit clear, so it never
    /// collides with [`PeerName::BROADCAST`].
    pub fn from_public_key(key: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, key);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&d.as_ref()[..6]);
        mac[0] = (mac[0] | 0x02) & !0x01;
        Self::from_mac(mac)
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.to_mac();
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a peer name did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid peer name {0:?}: expected six hex bytes like 02:ab:cd:ef:01:23 (or with zero bytes left out as in Weave: ::1)")]
pub struct BadPeerName(pub String);

impl FromStr for PeerName {
    type Err = BadPeerName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts: Vec<&str> = s.split(':').collect();
        // Weave's short forms: one `::` stands for the zero bytes left out
        // (`::1` is 00:00:00:00:00:01, `02::1` is 02:00:00:00:00:01).
        if let Some((left, right)) = s.split_once("::") {
            fn side(x: &str) -> Vec<&str> {
                if x.is_empty() { Vec::new() } else { x.split(':').collect() }
            }
            let (l, r) = (side(left), side(right));
            if right.contains("::") || l.len() + r.len() == 0 || l.len() + r.len() > 5 {
                return Err(BadPeerName(s.to_string()));
            }
            let zeros = 6 - l.len() - r.len();
            parts = l.into_iter().chain(std::iter::repeat_n("0", zeros)).chain(r).collect();
        }
        if parts.len() != 6 {
            return Err(BadPeerName(s.to_string()));
        }
        let mut mac = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() || p.len() > 2 {
                return Err(BadPeerName(s.to_string()));
            }
            mac[i] = u8::from_str_radix(p, 16).map_err(|_| BadPeerName(s.to_string()))?;
        }
        let name = PeerName::from_mac(mac);
        if name == PeerName::BROADCAST {
            return Err(BadPeerName(s.to_string()));
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weave_short_forms() {
        let n = |s: &str| s.parse::<PeerName>().map(|p| p.to_string());
        assert_eq!(n("::1").unwrap(), "00:00:00:00:00:01");
        assert_eq!(n("::2:3").unwrap(), "00:00:00:00:02:03");
        assert_eq!(n("02::1").unwrap(), "02:00:00:00:00:01");
        assert_eq!(n("a:b::").unwrap(), "0a:0b:00:00:00:00");
        assert_eq!(n("1:2:3:4::5").unwrap(), "01:02:03:04:00:05");
        for bad in ["::", ":::1", "1::2::3", "1:2:3:4:5::6", "::1:2:3:4:5:6", "::123", "::g", "1:2:3:4:5:6::"] {
            assert!(n(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trips_through_text() {
        let n: PeerName = "02:ab:cd:ef:01:23".parse().unwrap();
        assert_eq!(n.to_string(), "02:ab:cd:ef:01:23");
        assert_eq!(PeerName::from_mac(n.to_mac()), n);
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in ["", "02:ab", "02:ab:cd:ef:01:23:45", "zz:ab:cd:ef:01:23", "00:00:00:00:00:00", "002:ab:cd:ef:01:2"] {
            assert!(bad.parse::<PeerName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn key_derived_names_are_unicast_and_local() {
        let n = PeerName::from_public_key(b"some key");
        let m = n.to_mac();
        assert_eq!(m[0] & 0x01, 0);
        assert_eq!(m[0] & 0x02, 0x02);
        assert_ne!(n, PeerName::BROADCAST);
    }
}
