//! ICMP "fragmentation needed" (IPv4) and ICMPv6 "packet too big" for frames
//! too big for the destination's overlay.
//!
//! Hosts on one overlay may run different MTUs. A frame bigger than the
//! destination host's bridge MTU would be dropped silently there, so the
//! sending router answers an IPv4 packet with DF set with an ICMP destination
//! unreachable / fragmentation needed (type 3, code 4, RFC 1191) carrying the
//! destination's MTU, from the packet's destination address, as a router on the
//! path would. The sender's kernel lowers its path MTU and retries smaller.
//! An IPv6 packet (which routers never fragment) gets an ICMPv6 packet too big
//! (type 2, code 0, RFC 4443 3.2) the same way ([`packet_too_big`]).

/// Ethernet + IPv4 header + ICMP header + the original IP header (up to 60
/// bytes) and 8 bytes of its payload.
pub const MAX_REPLY: usize = 14 + 20 + 8 + 60 + 8;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IP_DF: u8 = 0x40;

/// If `frame` (Ethernet) is an IPv4 packet with DF set whose IP length
/// exceeds `mtu`, writes the ICMP reply frame into `out` and returns its
/// length. Anything else (not IPv4, no DF, fits, malformed, a fragment that
/// is not the first, or itself ICMP error) gives None.
pub fn frag_needed(frame: &[u8], mtu: u16, out: &mut [u8; MAX_REPLY]) -> Option<usize> {
    if frame.len() < ETH_LEN + 20 || frame[12..14] != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 || total <= usize::from(mtu) || ip[6] & IP_DF == 0 {
        return None;
    }
    let frag_offset = u16::from_be_bytes([ip[6] & 0x1f, ip[7]]);
    let proto = ip[9];
    // Never answer an ICMP error with one (RFC 1122 3.2.2), nor a later fragment.
    if frag_offset != 0 || (proto == 1 && !matches!(ip[ihl], 0 | 8 | 13 | 15 | 17)) {
        return None;
    }
    let quoted = ihl + 8;
    let icmp_len = 8 + quoted;
    let ip_len = 20 + icmp_len;
    let len = ETH_LEN + ip_len;

    out[..len].fill(0);
    // Ethernet: back to the sender, from the MAC it sent to.
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[0..6]);
    out[12..14].copy_from_slice(&ETHERTYPE_IPV4);
    // IPv4: from the original destination to the original source.
    let h = &mut out[ETH_LEN..ETH_LEN + 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 1;
    h[12..16].copy_from_slice(&ip[16..20]);
    h[16..20].copy_from_slice(&ip[12..16]);
    let c = checksum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    // ICMP: type 3 code 4, next-hop MTU, the original header and 8 bytes.
    let m = &mut out[ETH_LEN + 20..len];
    m[0] = 3;
    m[1] = 4;
    m[6..8].copy_from_slice(&mtu.to_be_bytes());
    m[8..].copy_from_slice(&ip[..quoted]);
    let c = checksum(m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// Ethernet + the largest ICMPv6 error: RFC 4443 quotes as much of the packet
/// as fits in the IPv6 minimum MTU (1280).
pub const MAX_REPLY_V6: usize = ETH_LEN + 1280;

const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const IPV6_HDR: usize = 40;
const NEXT_ICMPV6: u8 = 58;

/// If `frame` (Ethernet) is an IPv6 packet longer than `mtu`, writes an
/// ICMPv6 packet too big (type 2, code 0) carrying `mtu` into `out`, from the
/// packet's destination to its source, and returns its length. Anything else
/// (not IPv6, fits, malformed, an ICMPv6 error, from the unspecified or a
/// multicast address, or to a multicast address, which cannot be the reply's
/// source) gives None.
pub fn packet_too_big(frame: &[u8], mtu: u16, out: &mut [u8; MAX_REPLY_V6]) -> Option<usize> {
    if frame.len() < ETH_LEN + IPV6_HDR || frame[12..14] != ETHERTYPE_IPV6 {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    if ip[0] >> 4 != 6 {
        return None;
    }
    let total = IPV6_HDR + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if total <= usize::from(mtu) || ip.len() < total.min(IPV6_HDR + 8) {
        return None;
    }
    let (src, dst) = (&ip[8..24], &ip[24..40]);
    if src[0] == 0xff || src.iter().all(|b| *b == 0) || dst[0] == 0xff {
        return None;
    }
    // Never answer an ICMPv6 error (types below 128) with one (RFC 4443 2.4):
    // follow the usual extension headers to the upper layer.
    let (mut next, mut at) = (ip[6], IPV6_HDR);
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let h = ip.get(at..at + 2)?;
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                next = *ip.get(at)?;
                at += 8;
            }
            _ => break,
        }
    }
    if next == NEXT_ICMPV6 && *ip.get(at)? < 128 {
        return None;
    }
    let quoted = ip.len().min(total).min(1280 - IPV6_HDR - 8);
    let icmp_len = 8 + quoted;
    let len = ETH_LEN + IPV6_HDR + icmp_len;
    out[..len].fill(0);
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[0..6]);
    out[12..14].copy_from_slice(&ETHERTYPE_IPV6);
    let h = &mut out[ETH_LEN..ETH_LEN + IPV6_HDR];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    h[6] = NEXT_ICMPV6;
    h[7] = 64;
    h[8..24].copy_from_slice(dst);
    h[24..40].copy_from_slice(src);
    let m = &mut out[ETH_LEN + IPV6_HDR..len];
    m[0] = 2;
    m[1] = 0;
    m[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
    m[8..].copy_from_slice(&ip[..quoted]);
    let c = icmpv6_checksum(dst, src, m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// The ICMPv6 checksum of `msg` from `src` to `dst` (RFC 4443 2.3: over the
/// pseudo-header of RFC 8200 8.1 and the message).
fn icmpv6_checksum(src: &[u8], dst: &[u8], msg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + msg.len());
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, NEXT_ICMPV6]);
    pseudo.extend_from_slice(msg);
    checksum(&pseudo)
}

/// The Internet checksum (RFC 1071) of `b`.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with an IPv4/UDP packet of `total` IP bytes.
    fn frame(total: u16, df: bool, proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + usize::from(total)];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6] = if df { IP_DF } else { 0 };
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        ip[20..28].copy_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 0, 0, 0]);
        f
    }

    #[test]
    fn an_oversized_df_packet_gets_a_valid_reply() {
        let f = frame(2000, true, 17);
        let mut out = [0u8; MAX_REPLY];
        let n = frag_needed(&f, 1376, &mut out).expect("a reply");
        let r = &out[..n];
        assert_eq!(n, 14 + 20 + 8 + 28);
        assert_eq!(&r[0..6], &f[6..12], "to the sender's MAC");
        assert_eq!(&r[6..12], &f[0..6]);
        let ip = &r[14..34];
        assert_eq!(checksum(ip), 0, "IP header checksum verifies");
        assert_eq!(&ip[12..16], &[10, 0, 0, 2], "from the original destination");
        assert_eq!(&ip[16..20], &[10, 0, 0, 1], "to the original source");
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), n - 14);
        let icmp = &r[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1376);
        assert_eq!(&icmp[8..], &f[14..14 + 28], "quotes the header and 8 bytes");
        assert_eq!(checksum(icmp), 0, "ICMP checksum verifies");
    }

    /// An Ethernet frame with an IPv6 packet of `payload` bytes after the header.
    fn frame6(payload: u16, next: u8, first: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 40 + usize::from(payload)];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6);
        let ip = &mut f[14..];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&payload.to_be_bytes());
        ip[6] = next;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&"fd32::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip[24..40].copy_from_slice(&"fd32::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip[40] = first;
        for (i, b) in ip[41..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    #[test]
    fn an_oversized_ipv6_packet_gets_a_packet_too_big() {
        let f = frame6(8008, NEXT_ICMPV6, 128); // ping -6 -s 8000: an echo request
        let mut out = [0u8; MAX_REPLY_V6];
        let n = packet_too_big(&f, 1376, &mut out).expect("a reply");
        assert_eq!(n, 14 + 1280, "quotes as much as fits in 1280 bytes");
        let r = &out[..n];
        assert_eq!(&r[0..6], &f[6..12], "to the sender's MAC");
        assert_eq!(&r[6..12], &f[0..6]);
        assert_eq!(&r[12..14], &ETHERTYPE_IPV6);
        let ip = &r[14..54];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), n - 54, "payload length");
        assert_eq!(ip[6], NEXT_ICMPV6);
        assert_eq!(&ip[8..24], &f[14 + 24..14 + 40], "from the original destination");
        assert_eq!(&ip[24..40], &f[14 + 8..14 + 24], "to the original source");
        let icmp = &r[54..];
        assert_eq!((icmp[0], icmp[1]), (2, 0));
        assert_eq!(u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]), 1376);
        assert_eq!(&icmp[8..], &f[14..14 + 1232], "quotes the start of the packet");
        assert_eq!(icmpv6_checksum(&ip[8..24], &ip[24..40], icmp), 0, "ICMPv6 checksum verifies");
        // A packet shorter than 1280 bytes is quoted whole.
        let small = frame6(1000, 17, 0);
        let n = packet_too_big(&small, 1000, &mut out).expect("a reply");
        assert_eq!(n, 14 + 40 + 8 + 1040);
        assert_eq!(&out[62..n], &small[14..]);
    }

    #[test]
    fn no_packet_too_big_when_it_fits_is_an_icmpv6_error_or_is_garbage() {
        let mut out = [0u8; MAX_REPLY_V6];
        assert_eq!(packet_too_big(&frame6(1336, 17, 0), 1376, &mut out), None, "fits");
        assert!(packet_too_big(&frame6(1337, 17, 0), 1376, &mut out).is_some(), "one byte over");
        assert_eq!(packet_too_big(&frame6(2000, NEXT_ICMPV6, 2), 1376, &mut out), None, "an ICMPv6 error");
        assert_eq!(packet_too_big(&frame6(2000, NEXT_ICMPV6, 1), 1376, &mut out), None, "an ICMPv6 error");
        // An ICMPv6 error behind a hop-by-hop header is still one.
        let mut hbh = frame6(2000, 0, NEXT_ICMPV6);
        hbh[14 + 41] = 0; // 8 bytes of options
        hbh[14 + 48] = 1;
        assert_eq!(packet_too_big(&hbh, 1376, &mut out), None, "an ICMPv6 error behind options");
        hbh[14 + 48] = 128;
        assert!(packet_too_big(&hbh, 1376, &mut out).is_some(), "an echo request behind options");
        let mut mcast_dst = frame6(2000, 17, 0);
        mcast_dst[14 + 24] = 0xff;
        assert_eq!(packet_too_big(&mcast_dst, 1376, &mut out), None, "multicast destination");
        let mut unspec = frame6(2000, 17, 0);
        unspec[14 + 8..14 + 24].fill(0);
        assert_eq!(packet_too_big(&unspec, 1376, &mut out), None, "unspecified source");
        assert_eq!(packet_too_big(&frame(2000, true, 17), 1376, &mut out), None, "IPv4");
        let mut v4in6 = frame6(2000, 17, 0);
        v4in6[14] = 0x45;
        assert_eq!(packet_too_big(&v4in6, 1376, &mut out), None, "not version 6");
        let big = frame6(3000, 17, 0);
        for n in 0..120 {
            let _ = packet_too_big(&big[..n], 1376, &mut out);
        }
        // Truncated frames never panic; a chain of headers that runs off the end gives None.
        let mut chain = frame6(2000, 60, 60);
        chain[14 + 41] = 255;
        let _ = packet_too_big(&chain[..200], 1376, &mut out);
    }

    #[test]
    fn no_reply_when_it_fits_lacks_df_is_an_icmp_error_or_is_garbage() {
        let mut out = [0u8; MAX_REPLY];
        assert_eq!(frag_needed(&frame(1376, true, 17), 1376, &mut out), None, "fits");
        assert_eq!(frag_needed(&frame(2000, false, 17), 1376, &mut out), None, "no DF");
        let mut err = frame(2000, true, 1);
        err[14 + 20] = 3;
        assert_eq!(frag_needed(&err, 1376, &mut out), None, "an ICMP error");
        let mut echo = frame(2000, true, 1);
        echo[14 + 20] = 8;
        assert!(frag_needed(&echo, 1376, &mut out).is_some(), "an echo request is answered");
        let mut later = frame(2000, true, 17);
        later[14 + 7] = 0x10;
        assert_eq!(frag_needed(&later, 1376, &mut out), None, "not the first fragment");
        let mut v6 = frame(2000, true, 17);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(frag_needed(&v6, 1376, &mut out), None);
        for n in 0..40 {
            let _ = frag_needed(&frame(2000, true, 17)[..n], 1376, &mut out);
        }
        let mut bad_ihl = frame(2000, true, 17);
        bad_ihl[14] = 0x4f;
        assert_eq!(frag_needed(&bad_ihl[..60], 1376, &mut out), None, "header longer than the frame");
    }
}
