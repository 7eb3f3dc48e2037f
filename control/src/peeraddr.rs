//! `PEER` arguments: `host` or `host:port` (IPv6 as `[addr]:port`).

use std::fmt;

/// A connect target as the user gave it, normalised to `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadPeerAddr {
    #[error("invalid peer {0:?}: empty")]
    Empty(String),
    #[error("invalid peer {0:?}: port must be a number from 1 to 65535")]
    Port(String),
    #[error("invalid peer {0:?}: not a host name or IP address")]
    Host(String),
    #[error("invalid peer {0:?}: an unspecified, broadcast or multicast address is no peer's")]
    NotUnicast(String),
}

impl PeerAddr {
    pub fn parse(s: &str, default_port: u16) -> Result<PeerAddr, BadPeerAddr> {
        let s = s.trim();
        if s.is_empty() {
            return Err(BadPeerAddr::Empty(s.into()));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| BadPeerAddr::Host(s.into()))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(BadPeerAddr::Host(s.into()));
            }
            match after {
                "" => (h.to_string(), default_port),
                p => (h.to_string(), parse_port(s, p.strip_prefix(':').ok_or_else(|| BadPeerAddr::Port(s.into()))?)?),
            }
        } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
            (s.to_string(), default_port)
        } else if let Some((h, p)) = s.rsplit_once(':') {
            if h.contains(':') {
                // Not an IPv6 address (`fe80::1%eth0`, `fd00::1:99999`), and a port
                // after one would be bracketed: the host is wrong, not the port.
                return Err(BadPeerAddr::Host(s.into()));
            }
            (h.to_string(), parse_port(s, p)?)
        } else {
            (s.to_string(), default_port)
        };
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                    && !label.starts_with('-')
            });
        if !(valid_name || host.parse::<std::net::IpAddr>().is_ok()) {
            return Err(BadPeerAddr::Host(s.into()));
        }
        if host.parse::<std::net::Ipv4Addr>().is_err() && host.split('.').all(|l| l.bytes().all(|c| c.is_ascii_digit())) {
            // All-numeric but not a valid IPv4 address, e.g. 10.0.0.999.
            return Err(BadPeerAddr::Host(s.into()));
        }
        // One spelling per target: an address in its canonical form
        // (`FD00:0::1` is `fd00::1`, an IPv4-mapped `::ffff:10.0.0.1` is
        // `10.0.0.1`), a host name in lower case (as DNS compares).
        let host = match host.parse::<std::net::IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) if !is_unicast(ip) => return Err(BadPeerAddr::NotUnicast(s.into())),
            Ok(ip) => ip.to_string(),
            Err(_) => host.to_ascii_lowercase(),
        };
        Ok(PeerAddr { host, port })
    }
}

/// An address one host can have and be dialled at: not `0.0.0.0` or `::`
/// (which dial this host itself), not the broadcast address, not multicast.
fn is_unicast(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
        std::net::IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}

fn parse_port(whole: &str, p: &str) -> Result<u16, BadPeerAddr> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(BadPeerAddr::Port(whole.into())),
        Ok(n) => Ok(n),
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_ports() {
        assert_eq!(PeerAddr::parse("10.0.0.1", 6783).unwrap().to_string(), "10.0.0.1:6783");
        assert_eq!(PeerAddr::parse("10.0.0.1:7000", 6783).unwrap().to_string(), "10.0.0.1:7000");
        assert_eq!(PeerAddr::parse("host-a.example", 6783).unwrap().to_string(), "host-a.example:6783");
        assert_eq!(PeerAddr::parse("[fd00::1]:7000", 6783).unwrap().to_string(), "[fd00::1]:7000");
        assert_eq!(PeerAddr::parse("fd00::1", 6783).unwrap().to_string(), "[fd00::1]:6783");
    }

    #[test]
    fn one_spelling_per_target() {
        for (a, b) in [
            ("FD00::1", "[fd00::1]:6783"),
            ("[fd00:0:0::1]:7000", "[fd00::1]:7000"),
            ("fd00:0000::0001", "[fd00::1]:6783"),
            ("Host-A.Example:7000", "host-a.example:7000"),
            // IPv4-mapped: the IPv4 host it is (dialled over IPv4, forgotten as 10.0.0.1).
            ("::ffff:10.0.0.1", "10.0.0.1:6783"),
            ("[::FFFF:10.0.0.1]:7000", "10.0.0.1:7000"),
            ("::ffff:a00:1", "10.0.0.1:6783"),
        ] {
            assert_eq!(PeerAddr::parse(a, 6783).unwrap().to_string(), b, "{a}");
        }
    }

    #[test]
    fn an_address_no_peer_can_have_is_refused() {
        for bad in [
            "0.0.0.0",
            "0.0.0.0:6783",
            "255.255.255.255",
            "224.0.0.1:7000",
            "239.1.2.3",
            "::",
            "[::]:6783",
            "ff02::1",
            "[ff05::2]:7000",
            "::ffff:0.0.0.0",
            "::ffff:255.255.255.255",
            "[::ffff:224.0.0.1]:7000",
        ] {
            assert_eq!(PeerAddr::parse(bad, 6783), Err(BadPeerAddr::NotUnicast(bad.into())), "{bad}");
        }
        for good in ["127.0.0.1", "10.255.255.255", "223.255.255.254", "::1", "fe80::1", "[fd00::1]:7000"] {
            assert!(PeerAddr::parse(good, 6783).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_bad_ipv6_address_is_a_bad_host_not_a_bad_port() {
        for bad in ["fe80::1%eth0", "fd00::1:99999", "fd00::zz:6783", "10.0.0.1:6783:1"] {
            assert_eq!(PeerAddr::parse(bad, 6783), Err(BadPeerAddr::Host(bad.into())), "{bad}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "a b", "host:0", "host:99999", "host:x", "10.0.0.999", "[zz]:1", "-bad", "a..b", "not a host:99999"] {
            assert!(PeerAddr::parse(bad, 6783).is_err(), "{bad}");
        }
    }
}
