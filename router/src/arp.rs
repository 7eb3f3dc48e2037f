//! Gratuitous ARP: tell the segment "IP is at MAC" after an address appears, so
//! peers and bridges update their caches without waiting for a timeout.
//!
//! The frame goes out through an `AF_PACKET` socket bound to the interface, so
//! call this on a thread that is in the interface's namespace (see
//! [`crate::netns::run_in`]). This module sends one frame and keeps nothing open.

use std::io;
use std::net::Ipv4Addr;
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

/// Broadcast one gratuitous ARP for `ip` at `mac` out of `ifname`, which must be
/// up and in this thread's namespace. Errors name the interface.
pub fn gratuitous_arp(ifname: &str, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let named = |e: io::Error, what: &str| {
        io::Error::new(
            e.kind(),
            format!("gratuitous ARP for {ip} on {ifname}: {what}: {e}"),
        )
    };
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
            i32::from(ETH_P_ARP.to_be()),
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
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&BROADCAST);
    let addr_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    let addr_ptr = &addr as *const libc::sockaddr_ll as *const libc::sockaddr;

    // SAFETY: addr is a valid sockaddr_ll of addr_len bytes.
    if unsafe { libc::bind(sock.as_raw_fd(), addr_ptr, addr_len) } != 0 {
        return Err(named(io::Error::last_os_error(), "bind packet socket"));
    }
    let f = frame(mac, ip);
    // SAFETY: f is FRAME_LEN readable bytes; addr as above.
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
            format!(
                "gratuitous ARP for {ip} on {ifname}: short send ({sent} of {FRAME_LEN} bytes)"
            ),
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
    }
}
