//! ICMP "fragmentation needed" for frames too big for the destination's overlay.
//!
//! Hosts on one overlay may run different MTUs. A frame bigger than the
//! destination host's bridge MTU would be dropped silently there, so the
//! sending router answers an IPv4 packet with DF set with an ICMP destination
//! unreachable / fragmentation needed (type 3, code 4, RFC 1191) carrying the
//! destination's MTU, from the packet's destination address, as a router on the
//! path would. The sender's kernel lowers its path MTU and retries smaller.

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
