//! Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6): tell
//! the segment "IP is at MAC" after an address appears, so peers and bridges
//! update their caches without waiting for a timeout.
//!
//! The frame goes out through an `AF_PACKET` socket bound to the interface, so
//! call this on a thread that is in the interface's namespace (see
//! [`crate::netns::run_in`]). This module sends one frame and keeps nothing open.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARP_REQUEST: u16 = 1;
const HTYPE_ETHERNET: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Ethernet header (14) + ARP for IPv4 over Ethernet (28).
pub const FRAME_LEN: usize = 42;

/// The gratuitous ARP announcing `ip` at `mac`: an ARP request, broadcast, whose
/// sender and target protocol addresses are both `ip` (what `arping -U` sends).
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[28..32].copy_from_slice(&ip.octets()); // sender protocol address
                                             // target hardware address stays zero for a request
    f[38..42].copy_from_slice(&ip.octets()); // target protocol address
    f
}

/// Ethernet header (14) + IPv6 header (40) + neighbour advertisement (24) +
/// target link-layer address option (8).
pub const NA_FRAME_LEN: usize = 86;

const ETH_P_IPV6: u16 = 0x86dd;
const ICMPV6: u8 = 58;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// ff02::1, all nodes.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// 33:33 + the low 32 bits of ff02::1.
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// The unsolicited neighbour advertisement announcing `ip` at `mac` (RFC 4861
/// 7.2.6): to all nodes, from `ip`, hop limit 255, Override set, Solicited and
/// Router clear, with a target link-layer address option. Neighbours that hold
/// an entry for `ip` take the new MAC (as stale, so they confirm it on use).
pub fn na_frame(mac: [u8; 6], ip: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let mut f = [0u8; NA_FRAME_LEN];
    f[0..6].copy_from_slice(&ALL_NODES_MAC);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let ip6 = &mut f[14..54];
    ip6[0] = 0x60; // version 6, traffic class and flow label 0
    ip6[4..6].copy_from_slice(&32u16.to_be_bytes()); // payload length
    ip6[6] = ICMPV6;
    ip6[7] = 255; // hop limit: receivers drop ND with any other
    ip6[8..24].copy_from_slice(&ip.octets());
    ip6[24..40].copy_from_slice(&ALL_NODES.octets());
    let na = &mut f[54..86];
    na[0] = NEIGHBOUR_ADVERTISEMENT;
    na[4] = 0x20; // Override
    na[8..24].copy_from_slice(&ip.octets());
    na[24] = 2; // option: target link-layer address
    na[25] = 1; // its length, in units of 8 bytes
    na[26..32].copy_from_slice(&mac);
    let sum = icmpv6_checksum(&ip, &ALL_NODES, na);
    na[2..4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field zero) between `src` and `dst`.
fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).copied().map_or(0, u32::from);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ICMPV6]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Broadcast one gratuitous ARP for `ip` at `mac` out of `ifname`, which must be
/// up and in this thread's namespace. Errors name the interface.
pub fn gratuitous_arp(ifname: &str, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let what = format!("gratuitous ARP for {ip} on {ifname}");
    send(ifname, ETH_P_ARP, BROADCAST, &frame(mac, ip), &what)
}

/// Send one unsolicited neighbour advertisement for `ip` at `mac` out of
/// `ifname` (up, in this thread's namespace). Errors name the interface.
pub fn unsolicited_na(ifname: &str, mac: [u8; 6], ip: Ipv6Addr) -> io::Result<()> {
    let what = format!("unsolicited neighbour advertisement for {ip} on {ifname}");
    send(ifname, ETH_P_IPV6, ALL_NODES_MAC, &na_frame(mac, ip), &what)
}

/// Send the Ethernet frame `f` (of EtherType `proto`, to `dst`) out of
/// `ifname` through a fresh `AF_PACKET` socket. Errors start with `what`.
fn send(ifname: &str, proto: u16, dst: [u8; 6], f: &[u8], what: &str) -> io::Result<()> {
    let named = |e: io::Error, step: &str| io::Error::new(e.kind(), format!("{what}: {step}: {e}"));
    let cname = std::ffi::CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(named(io::Error::last_os_error(), "look up interface"));
    }

    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    if raw < 0 {
        return Err(named(io::Error::last_os_error(), "open packet socket"));
    }
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    let addr_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    let addr_ptr = &addr as *const libc::sockaddr_ll as *const libc::sockaddr;

    // SAFETY: addr is a valid sockaddr_ll of addr_len bytes.
    if unsafe { libc::bind(sock.as_raw_fd(), addr_ptr, addr_len) } != 0 {
        return Err(named(io::Error::last_os_error(), "bind packet socket"));
    }
    // SAFETY: f is f.len() readable bytes; addr as above.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            f.as_ptr().cast(),
            f.len(),
            0,
            addr_ptr,
            addr_len,
        )
    };
    if sent < 0 {
        return Err(named(io::Error::last_os_error(), "send"));
    }
    if sent as usize != f.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("{what}: short send ({sent} of {} bytes)", f.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::arp::{ArpOperations, ArpPacket};
    use pnet_packet::ethernet::{EtherTypes, EthernetPacket};
    use pnet_packet::Packet;

    #[test]
    fn frame_is_a_broadcast_arp_request_for_itself() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let ip = Ipv4Addr::new(10, 32, 0, 7);
        let f = frame(mac, ip);
        let eth = EthernetPacket::new(&f).unwrap();
        assert_eq!(eth.get_destination().octets(), BROADCAST);
        assert_eq!(eth.get_source().octets(), mac);
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_protocol_type(), EtherTypes::Ipv4);
        assert_eq!(arp.get_sender_hw_addr().octets(), mac);
        assert_eq!(arp.get_sender_proto_addr(), ip);
        assert_eq!(arp.get_target_hw_addr().octets(), [0; 6]);
        assert_eq!(arp.get_target_proto_addr(), ip);
    }

    #[test]
    fn unknown_interface_is_named_in_the_error() {
        let err = gratuitous_arp(
            "mn-no-such-if",
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("mn-no-such-if"), "{err}");
        let err = unsolicited_na("mn-no-such-if", [2, 0, 0, 0, 0, 1], "fd00::1".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("mn-no-such-if") && err.to_string().contains("neighbour advertisement"), "{err}");
    }

    #[test]
    fn na_frame_is_an_unsolicited_override_advertisement_for_itself() {
        use pnet_packet::icmpv6::ndp::{NdpOptionTypes, NeighborAdvertFlags, NeighborAdvertPacket};
        use pnet_packet::icmpv6::{Icmpv6Packet, Icmpv6Types};
        use pnet_packet::ip::IpNextHeaderProtocols;
        use pnet_packet::ipv6::Ipv6Packet;
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let ip: Ipv6Addr = "fd32::7".parse().unwrap();
        let f = na_frame(mac, ip);
        let eth = EthernetPacket::new(&f).unwrap();
        assert_eq!(eth.get_destination().octets(), [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(eth.get_source().octets(), mac);
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);
        let ip6 = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip6.get_version(), 6);
        assert_eq!(ip6.get_next_header(), IpNextHeaderProtocols::Icmpv6);
        assert_eq!(ip6.get_hop_limit(), 255);
        assert_eq!(ip6.get_source(), ip);
        assert_eq!(ip6.get_destination(), ALL_NODES);
        assert_eq!(ip6.get_payload_length() as usize, ip6.payload().len());
        let icmp = Icmpv6Packet::new(ip6.payload()).unwrap();
        assert_eq!(icmp.get_icmpv6_type(), Icmpv6Types::NeighborAdvert);
        assert_eq!(icmp.get_checksum(), pnet_packet::icmpv6::checksum(&icmp, &ip, &ALL_NODES));
        let na = NeighborAdvertPacket::new(ip6.payload()).unwrap();
        assert_eq!(na.get_flags(), NeighborAdvertFlags::Override);
        assert_eq!(na.get_target_addr(), ip);
        let opts = na.get_options();
        assert_eq!(opts.len(), 1);
        assert_eq!(opts[0].option_type, NdpOptionTypes::TargetLLAddr);
        assert_eq!(opts[0].data, mac);
    }
}
