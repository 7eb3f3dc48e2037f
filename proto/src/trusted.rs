//! Trusted subnets (`--trusted-subnets`, Weave's option): which underlay
//! addresses a router trusts, the signed record that tells a direct peer, and
//! the decision whether data to that peer may go unencrypted.
//!
//! Owns: the subnet type and its parsing, the [`SignedTrustedSubnets`] record
//! (signed by its owner in [`DOMAIN_TRUSTED`], checked against the key the
//! connection's handshake authenticated before it is used), and [`decide`]:
//! data between two peers goes unencrypted only when *each* side's underlay
//! address is in a subnet the *other* side trusts. Never does I/O; the control
//! crate sends the record on every connection to a peer with
//! [`crate::handshake::CAP_TRUSTED`] and programs the kernel's VXLAN device
//! from the decisions.
//!
//! Where trust is mutual but the kernel path is not available (an IPv6
//! underlay, no VXLAN device on either side), data to a peer that advertised
//! [`crate::handshake::CAP_TRUSTED_USERSPACE`] goes over meshnet's own UDP
//! path unsealed ([`DataMode::TrustedUserspace`], see
//! [`crate::wire::datagram`]); to an older peer it stays encrypted.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::peer::PeerName;
use crate::trust::{self, Signature, Signer};

/// Domain of trusted-subnet record signatures.
pub const DOMAIN_TRUSTED: &[u8] = b"meshnet trusted subnets v1";
/// Most subnets one record may carry (and `--trusted-subnets` accepts).
pub const MAX_SUBNETS: usize = 64;

/// One CIDR block: an address with its host bits zero and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Subnet {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Why a subnet could not be parsed or is not well formed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubnetError {
    #[error("{0:?} is not a CIDR (ADDRESS/PREFIX, e.g. 10.0.0.0/8)")]
    NotCidr(String),
    #[error("{0:?}: bad address")]
    BadAddress(String),
    #[error("{0:?}: bad prefix length (0-32 for IPv4, 0-128 for IPv6)")]
    BadPrefix(String),
    #[error("{given}: host bits are set (did you mean {suggest}?)")]
    HostBits { given: String, suggest: Subnet },
    #[error("more than {MAX_SUBNETS} trusted subnets")]
    TooMany,
    #[error("an empty item in the list (a stray comma?); give CIDRs separated by commas, e.g. 10.0.0.0/8,192.168.1.0/24")]
    EmptyItem,
}

impl Subnet {
    fn bits(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// The address with every bit past `prefix` cleared.
    fn network_of(addr: IpAddr, prefix: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether the subnet is well formed: prefix in range, host bits zero.
    pub fn is_valid(&self) -> bool {
        self.prefix <= self.bits() && Subnet::network_of(self.addr, self.prefix) == self.addr
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && self.is_valid() && Subnet::network_of(ip, self.prefix) == self.addr
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let t = s.trim();
        let (a, p) = t.split_once('/').ok_or_else(|| SubnetError::NotCidr(t.to_string()))?;
        let addr: IpAddr = a.parse().map_err(|_| SubnetError::BadAddress(t.to_string()))?;
        let prefix: u8 = p.parse().map_err(|_| SubnetError::BadPrefix(t.to_string()))?;
        let sub = Subnet { addr, prefix };
        if prefix > sub.bits() {
            return Err(SubnetError::BadPrefix(t.to_string()));
        }
        let net = Subnet::network_of(addr, prefix);
        if net != addr {
            return Err(SubnetError::HostBits { given: t.to_string(), suggest: Subnet { addr: net, prefix } });
        }
        Ok(sub)
    }
}

/// Parses `--trusted-subnets`: CIDRs separated by commas, duplicates dropped,
/// at most [`MAX_SUBNETS`]. An empty item (`10.0.0.0/8,,`) is refused, as Weave
/// refused it: a stray comma usually stands for a subnet that went missing. A
/// blank list is empty.
pub fn parse_list(s: &str) -> Result<Vec<Subnet>, SubnetError> {
    let mut out: Vec<Subnet> = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(SubnetError::EmptyItem);
        }
        let sub: Subnet = item.parse()?;
        if !out.contains(&sub) {
            out.push(sub);
        }
    }
    if out.len() > MAX_SUBNETS {
        return Err(SubnetError::TooMany);
    }
    Ok(out)
}

/// Whether any of `subnets` holds `ip`.
pub fn trusts(subnets: &[Subnet], ip: IpAddr) -> bool {
    subnets.iter().any(|s| s.contains(ip))
}

/// What a router tells each direct peer: the subnets it trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedSubnets {
    /// The owner (checked against the connection's peer).
    pub name: PeerName,
    /// The owner's incarnation (its topology entry's `uid`).
    pub uid: u64,
    /// Empty: it trusts nobody (everything to it stays encrypted).
    pub subnets: Vec<Subnet>,
    /// Whether the owner has a working kernel VXLAN device, so a peer may send
    /// to it through one.
    pub kernel: bool,
}

impl TrustedSubnets {
    /// The canonical encoding the owner signs (bincode, standard configuration).
    pub fn signed_bytes(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }
}

/// A [`TrustedSubnets`] and its owner's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTrustedSubnets {
    pub record: TrustedSubnets,
    pub sig: Signature,
}

/// Why a record from a peer was refused (and ignored: data stays encrypted).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    #[error("trusted-subnets record names {claimed}, but the connection is to {peer}")]
    WrongPeer { claimed: PeerName, peer: PeerName },
    #[error("trusted-subnets record of {0} carries more than {MAX_SUBNETS} subnets")]
    TooMany(PeerName),
    #[error("trusted-subnets record of {0} carries a malformed subnet")]
    Malformed(PeerName),
    #[error("trusted-subnets record of {0} has a bad signature")]
    BadSignature(PeerName),
}

impl SignedTrustedSubnets {
    pub fn sign(record: TrustedSubnets, signer: &Signer) -> SignedTrustedSubnets {
        let sig = signer.sign(DOMAIN_TRUSTED, &record.signed_bytes());
        SignedTrustedSubnets { record, sig }
    }

    /// The record, if it is `peer`'s, within bounds and signed by `signing_key`
    /// (the key the connection's handshake bound to `peer`).
    pub fn verify(&self, peer: PeerName, signing_key: &[u8; 32]) -> Result<&TrustedSubnets, RecordError> {
        let r = &self.record;
        if r.name != peer {
            return Err(RecordError::WrongPeer { claimed: r.name, peer });
        }
        if r.subnets.len() > MAX_SUBNETS {
            return Err(RecordError::TooMany(peer));
        }
        if !r.subnets.iter().all(Subnet::is_valid) {
            return Err(RecordError::Malformed(peer));
        }
        if !trust::verify(signing_key, DOMAIN_TRUSTED, &r.signed_bytes(), &self.sig) {
            return Err(RecordError::BadSignature(peer));
        }
        Ok(r)
    }

    /// Checks the bounds bincode cannot express (before the signature).
    pub fn check(&self) -> Result<(), RecordError> {
        if self.record.subnets.len() > MAX_SUBNETS {
            return Err(RecordError::TooMany(self.record.name));
        }
        Ok(())
    }
}

/// How data to one direct peer travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataMode {
    /// Sealed by meshnet (the default, and always for the control plane).
    Encrypted(Why),
    /// Unencrypted, through the kernel's VXLAN device on the bridge.
    TrustedKernel,
    /// Unencrypted, over meshnet's own UDP path (unsealed datagrams): trust is
    /// mutual and both sides take them, but the kernel path is unavailable
    /// for the reason given (`NotIpv4`, `NoLocalDevice` or `NoPeerDevice`).
    TrustedUserspace(Why),
}

/// Why a connection stays encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Why {
    /// This router trusts no subnet.
    NoTrustedSubnets,
    /// The peer's address is in no subnet we trust.
    WeDoNotTrustPeer,
    /// The peer has not told us (older router, or its record has not arrived).
    PeerSaidNothing,
    /// Our address is in no subnet the peer trusts.
    PeerDoesNotTrustUs,
    /// Mutual trust, but our kernel VXLAN device could not be made.
    NoLocalDevice,
    /// Mutual trust, but the peer has no kernel VXLAN device.
    NoPeerDevice,
    /// Mutual trust, but the kernel path is IPv4 only.
    NotIpv4,
}

impl Why {
    pub fn text(self) -> &'static str {
        match self {
            Why::NoTrustedSubnets => "no trusted subnets here",
            Why::WeDoNotTrustPeer => "peer's address not in our trusted subnets",
            Why::PeerSaidNothing => "peer sent no trusted-subnets record",
            Why::PeerDoesNotTrustUs => "peer does not trust our address",
            Why::NoLocalDevice => "mutual trust, but our kernel VXLAN device is unavailable",
            Why::NoPeerDevice => "mutual trust, but the peer's kernel VXLAN device is unavailable",
            Why::NotIpv4 => "mutual trust, but the kernel path carries IPv4 underlays only",
        }
    }
}

impl DataMode {
    /// `encrypted`, `trusted (kernel)` or `trusted (userspace)`, as `status
    /// connections` shows it.
    pub fn label(self) -> &'static str {
        match self {
            DataMode::Encrypted(_) => "encrypted",
            DataMode::TrustedKernel => "trusted (kernel)",
            DataMode::TrustedUserspace(_) => "trusted (userspace)",
        }
    }

    /// Whether data frames to the peer go over the userspace path unsealed.
    pub fn unsealed(self) -> bool {
        matches!(self, DataMode::TrustedUserspace(_))
    }
}

/// What each side knows when it decides about one connection.
#[derive(Clone, Copy, Debug)]
pub struct Sides<'a> {
    /// Our subnets.
    pub ours: &'a [Subnet],
    /// Whether our VXLAN device is up.
    pub our_kernel: bool,
    /// Our underlay address on this connection (the TCP socket's local address).
    pub local: IpAddr,
    /// The peer's underlay address (where its datagrams come from).
    pub remote: IpAddr,
    /// The peer's verified record, if one arrived.
    pub theirs: Option<&'a TrustedSubnets>,
    /// The peer advertised `CAP_TRUSTED_USERSPACE` (takes unsealed datagrams).
    pub their_userspace: bool,
}

/// How data to the peer travels: unencrypted through the kernel only when each
/// side's address is in a subnet the other trusts, both have a VXLAN device
/// and the underlay is IPv4; unencrypted over the userspace path when trust is
/// mutual, the kernel path is not available and the peer takes unsealed
/// datagrams (this build always does); encrypted otherwise. Both sides compute the same answer from the same
/// two addresses (no NAT between them: a NATed peer's addresses differ on the
/// two sides and at worst one direction stays encrypted).
pub fn decide(s: Sides<'_>) -> DataMode {
    if s.ours.is_empty() {
        return DataMode::Encrypted(Why::NoTrustedSubnets);
    }
    if !trusts(s.ours, s.remote) {
        return DataMode::Encrypted(Why::WeDoNotTrustPeer);
    }
    let Some(theirs) = s.theirs else { return DataMode::Encrypted(Why::PeerSaidNothing) };
    if !trusts(&theirs.subnets, s.local) {
        return DataMode::Encrypted(Why::PeerDoesNotTrustUs);
    }
    let no_kernel = if !unmapped(s.local).is_ipv4() || !unmapped(s.remote).is_ipv4() {
        Why::NotIpv4
    } else if !s.our_kernel {
        Why::NoLocalDevice
    } else if !theirs.kernel {
        Why::NoPeerDevice
    } else {
        return DataMode::TrustedKernel;
    };
    if s.their_userspace {
        DataMode::TrustedUserspace(no_kernel)
    } else {
        DataMode::Encrypted(no_kernel)
    }
}

/// `ip` with an IPv4-mapped IPv6 address turned into IPv4.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(parse_list("10.0.0.0/8, 192.168.1.0/24, 10.0.0.0/8").unwrap().len(), 2);
        assert_eq!(parse_list("fd00::/8").unwrap()[0].prefix, 8);
        assert!(matches!(parse_list("10.0.0.0"), Err(SubnetError::NotCidr(_))));
        assert!(matches!(parse_list("10.0.0.300/8"), Err(SubnetError::BadAddress(_))));
        assert!(matches!(parse_list("10.0.0.0/33"), Err(SubnetError::BadPrefix(_))));
        assert!(matches!(parse_list("10.0.0.0/x"), Err(SubnetError::BadPrefix(_))));
        let e = parse_list("10.1.2.3/8").unwrap_err();
        assert_eq!(e.to_string(), "10.1.2.3/8: host bits are set (did you mean 10.0.0.0/8?)");
        let many: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
        assert_eq!(parse_list(&many.join(",")), Err(SubnetError::TooMany));
        assert!(parse_list("").unwrap().is_empty());
        assert!(parse_list(" ").unwrap().is_empty());
    }

    #[test]
    fn an_empty_item_is_not_a_cidr() {
        // A stray comma (`$A,$B` with B unset) hides a subnet meant to be trusted.
        for s in ["10.0.0.0/8,,", "10.0.0.0/8,", ",10.0.0.0/8", "10.0.0.0/8,,192.168.1.0/24", "10.0.0.0/8, ,fd00::/8", ","] {
            let e = parse_list(s).expect_err(s);
            assert_eq!(e, SubnetError::EmptyItem, "{s:?}");
            assert_eq!(e.to_string(), "an empty item in the list (a stray comma?); give CIDRs separated by commas, e.g. 10.0.0.0/8,192.168.1.0/24");
        }
    }

    #[test]
    fn containment() {
        let s: Subnet = "10.250.3.0/24".parse().unwrap();
        assert!(s.contains(ip("10.250.3.7")));
        assert!(s.contains(ip("::ffff:10.250.3.7")));
        assert!(!s.contains(ip("10.250.4.7")));
        assert!(!s.contains(ip("fd00::1")));
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let bad = Subnet { addr: ip("10.1.0.0"), prefix: 8 };
        assert!(!bad.is_valid() && !bad.contains(ip("10.1.0.1")));
    }

    fn record(name: PeerName, subnets: &str, kernel: bool) -> TrustedSubnets {
        TrustedSubnets { name, uid: 7, subnets: parse_list(subnets).unwrap(), kernel }
    }

    #[test]
    fn records_verify_only_for_their_owner_and_key() {
        let id = Identity::generate();
        let other = Identity::generate();
        let signer = Signer::from_identity(&id);
        let key = signer.public();
        let name = PeerName(0x0200_0000_0001);
        let signed = SignedTrustedSubnets::sign(record(name, "10.0.0.0/8", true), &signer);
        assert!(signed.verify(name, &key).is_ok());
        assert_eq!(signed.verify(PeerName(9), &key), Err(RecordError::WrongPeer { claimed: name, peer: PeerName(9) }));
        let other_key = Signer::from_identity(&other).public();
        assert_eq!(signed.verify(name, &other_key), Err(RecordError::BadSignature(name)));
        let mut forged = signed.clone();
        forged.record.subnets = parse_list("0.0.0.0/0").unwrap();
        assert_eq!(forged.verify(name, &key), Err(RecordError::BadSignature(name)));
        let mut bad = signed.clone();
        bad.record.subnets.push(Subnet { addr: ip("10.1.0.0"), prefix: 8 });
        assert_eq!(bad.verify(name, &key), Err(RecordError::Malformed(name)));
    }

    #[test]
    fn only_mutual_trust_with_devices_goes_to_the_kernel() {
        let ours = parse_list("10.250.0.0/16").unwrap();
        let name = PeerName(1);
        let theirs = record(name, "10.250.0.0/16", true);
        let base = Sides { ours: &ours, our_kernel: true, local: ip("10.250.1.1"), remote: ip("10.250.1.2"), theirs: Some(&theirs), their_userspace: false };
        assert_eq!(decide(base), DataMode::TrustedKernel);
        assert_eq!(decide(Sides { ours: &[], ..base }), DataMode::Encrypted(Why::NoTrustedSubnets));
        assert_eq!(decide(Sides { remote: ip("10.9.0.2"), ..base }), DataMode::Encrypted(Why::WeDoNotTrustPeer));
        assert_eq!(decide(Sides { theirs: None, ..base }), DataMode::Encrypted(Why::PeerSaidNothing));
        let one_sided = record(name, "192.168.0.0/16", true);
        assert_eq!(decide(Sides { theirs: Some(&one_sided), ..base }), DataMode::Encrypted(Why::PeerDoesNotTrustUs));
        assert_eq!(decide(Sides { our_kernel: false, ..base }), DataMode::Encrypted(Why::NoLocalDevice));
        let no_dev = record(name, "10.250.0.0/16", false);
        assert_eq!(decide(Sides { theirs: Some(&no_dev), ..base }), DataMode::Encrypted(Why::NoPeerDevice));
        let v6 = parse_list("fd00::/8").unwrap();
        let theirs6 = record(name, "fd00::/8", true);
        let six = Sides { ours: &v6, our_kernel: true, local: ip("fd00::1"), remote: ip("fd00::2"), theirs: Some(&theirs6), their_userspace: false };
        assert_eq!(decide(six), DataMode::Encrypted(Why::NotIpv4));
    }

    #[test]
    fn mutual_trust_without_the_kernel_path_goes_unsealed_to_peers_that_take_it() {
        let ours = parse_list("10.250.0.0/16,fd00::/8").unwrap();
        let name = PeerName(1);
        let theirs = record(name, "10.250.0.0/16,fd00::/8", true);
        let base = Sides { ours: &ours, our_kernel: true, local: ip("10.250.1.1"), remote: ip("10.250.1.2"), theirs: Some(&theirs), their_userspace: true };
        // The kernel path wins where it works.
        assert_eq!(decide(base), DataMode::TrustedKernel);
        assert_eq!(decide(Sides { our_kernel: false, ..base }), DataMode::TrustedUserspace(Why::NoLocalDevice));
        let no_dev = record(name, "10.250.0.0/16", false);
        assert_eq!(decide(Sides { theirs: Some(&no_dev), ..base }), DataMode::TrustedUserspace(Why::NoPeerDevice));
        let six = Sides { local: ip("fd00::1"), remote: ip("fd00::2"), ..base };
        assert_eq!(decide(six), DataMode::TrustedUserspace(Why::NotIpv4));
        assert_eq!(DataMode::TrustedUserspace(Why::NotIpv4).label(), "trusted (userspace)");
        assert!(DataMode::TrustedUserspace(Why::NotIpv4).unsealed() && !DataMode::TrustedKernel.unsealed());
        // An older peer (no CAP_TRUSTED_USERSPACE): still encrypted.
        assert_eq!(decide(Sides { their_userspace: false, ..six }), DataMode::Encrypted(Why::NotIpv4));
        // One-sided trust never goes unsealed, either way round.
        let one_sided = record(name, "192.168.0.0/16", false);
        assert_eq!(decide(Sides { theirs: Some(&one_sided), ..six }), DataMode::Encrypted(Why::PeerDoesNotTrustUs));
        let v4_only = parse_list("10.250.0.0/16").unwrap();
        assert_eq!(decide(Sides { ours: &v4_only, ..six }), DataMode::Encrypted(Why::WeDoNotTrustPeer));
        assert_eq!(decide(Sides { theirs: None, ..six }), DataMode::Encrypted(Why::PeerSaidNothing));
        assert_eq!(decide(Sides { ours: &[], ..six }), DataMode::Encrypted(Why::NoTrustedSubnets));
    }
}
