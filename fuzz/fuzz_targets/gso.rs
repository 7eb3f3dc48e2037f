//! Feeds units (virtio_net_hdr + Ethernet frame) to `gso::to_plain_frames`, two
//! ways, chosen by the first byte:
//! - the bytes as they are (almost always an error early on);
//! - a skeleton the fuzzer shapes: Ethernet + IPv4 (with options) or IPv6 +
//!   TCP (with options) or UDP, with the IP length and checksum position made
//!   consistent, so the segmentation itself sees attacker-chosen gso_size,
//!   flags, sequence numbers and payload lengths.
//!
//! Nothing may panic. Whatever comes out is checked independently: a superframe
//! gives frames whose IPv4 header and L4 checksums verify, whose payloads put
//! back together are the original payload, with TCP sequence numbers following
//! on; a partial checksum completed changes only its two bytes and verifies
//! when it is TCP or UDP at the L4 header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::gso::{self, VirtioNetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN};

const HEADROOM: usize = 10;

fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for p in parts {
        for &b in *p {
            match odd.take() {
                None => odd = Some(b),
                Some(hi) => {
                    sum += u16::from_be_bytes([hi, b]) as u32;
                    sum = (sum & 0xffff) + (sum >> 16);
                }
            }
        }
    }
    if let Some(hi) = odd {
        sum += (hi as u32) << 8;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// (is IPv4, offset of L4, L4 protocol) of a frame built by `skeleton` or segmented from one.
fn l3(frame: &[u8]) -> (bool, usize, u8) {
    if frame[12..14] == [0x08, 0x00] {
        (true, 14 + (frame[14] & 15) as usize * 4, frame[23])
    } else {
        (false, 54, frame[20])
    }
}

fn l4_verifies(frame: &[u8]) -> bool {
    let (v4, l4, proto) = l3(frame);
    let len = frame.len() - l4;
    let mut pseudo = Vec::new();
    if v4 {
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&frame[22..54]);
        pseudo.extend_from_slice(&(len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
    }
    csum(&[&pseudo, &frame[l4..]]) == 0xffff
}

/// A unit with consistent lengths from fuzzer bytes.
fn skeleton(d: &[u8]) -> Option<Vec<u8>> {
    let (&sel, d) = d.split_first()?;
    let (&gso_lo, d) = d.split_first()?;
    let (&gso_hi, d) = d.split_first()?;
    let (&opt_words, d) = d.split_first()?;
    let v4 = sel & 1 == 0;
    let tcp = sel & 2 == 0;
    let ip_opts = if v4 { (opt_words & 3) as usize * 4 } else { 0 };
    let tcp_opts = if tcp { (opt_words >> 2 & 7) as usize * 4 } else { 0 };
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    f.extend_from_slice(if v4 { &[0x08, 0x00] } else { &[0x86, 0xdd] });
    let ip_len = if v4 { 20 + ip_opts } else { 40 };
    let l4_hlen = if tcp { 20 + tcp_opts } else { 8 };
    // Header bytes come from the input; fixed fields are set below.
    let need = ip_len + l4_hlen;
    if d.len() < need {
        return None;
    }
    f.extend_from_slice(&d[..need]);
    f.extend_from_slice(&d[need..]);
    let l4 = 14 + ip_len;
    let total = f.len() - 14;
    let proto = if tcp { 6 } else { 17 };
    if v4 {
        f[14] = 0x40 | (ip_len / 4) as u8;
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        f[20] &= 0x40; // DF may stay; no MF, no offset
        f[21] = 0;
        f[23] = proto;
    } else {
        f[14] = 0x60 | (f[14] & 0x0f);
        f[18..20].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        f[20] = proto;
    }
    if tcp {
        f[l4 + 12] = ((l4_hlen / 4) << 4) as u8 | (f[l4 + 12] & 0x0f);
    }
    if total > 65535 {
        return None;
    }
    let gso_type = match (sel >> 2 & 3, tcp, v4) {
        (0, _, _) => GSO_NONE,
        (_, true, true) => GSO_TCPV4,
        (_, true, false) => GSO_TCPV6,
        (_, false, _) => GSO_UDP_L4,
    };
    let hdr = VirtioNetHdr {
        flags: if sel & 0x10 == 0 { F_NEEDS_CSUM } else { 0 },
        gso_type,
        hdr_len: 0,
        gso_size: u16::from_le_bytes([gso_lo, gso_hi]),
        csum_start: l4 as u16,
        csum_offset: if tcp { 16 } else { 6 },
    };
    let mut unit = vec![0u8; VNET_HDR_LEN];
    hdr.emit(&mut unit);
    unit.extend_from_slice(&f);
    Some(unit)
}

fn check(unit: &[u8]) {
    let mut out = vec![0u8; 65536 + 64];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let r = gso::to_plain_frames(unit, &mut out, HEADROOM, |s| {
        assert!(s.len() > HEADROOM && s[..HEADROOM].iter().all(|&b| b == 0));
        frames.push(s[HEADROOM..].to_vec());
    });
    let Ok(n) = r else {
        assert!(frames.is_empty());
        return;
    };
    assert_eq!(n, frames.len());
    assert_eq!(gso::max_output_len(unit, HEADROOM).ok(), frames.iter().map(|f| f.len() + HEADROOM).max());
    let hdr = VirtioNetHdr::parse(unit).expect("parsed once already");
    let original = &unit[VNET_HDR_LEN..];
    if hdr.gso_type == GSO_NONE {
        assert_eq!(n, 1);
        let f = &frames[0];
        assert_eq!(f.len(), original.len());
        let field = hdr.csum_start as usize + hdr.csum_offset as usize;
        for (i, (a, b)) in f.iter().zip(original).enumerate() {
            let in_field = hdr.flags & F_NEEDS_CSUM != 0 && (i == field || i == field + 1);
            assert!(a == b || in_field, "byte {i} changed");
        }
        return;
    }
    let (_, l4, proto) = l3(original);
    let hlen = l4 + if proto == 6 { (original[l4 + 12] >> 4) as usize * 4 } else { 8 };
    let gso = hdr.gso_size as usize;
    let mut payload = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let (v4, l4f, _) = l3(f);
        assert_eq!(l4f, l4);
        if v4 {
            assert_eq!(csum(&[&f[14..l4]]), 0xffff, "IPv4 header checksum");
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
        } else {
            assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, f.len() - 54);
        }
        assert!(l4_verifies(f), "L4 checksum of segment {i}");
        let chunk = &f[hlen..];
        assert!(chunk.len() <= gso && (chunk.len() == gso || i + 1 == frames.len()));
        if proto == 6 {
            let seq0 = u32::from_be_bytes([original[l4 + 4], original[l4 + 5], original[l4 + 6], original[l4 + 7]]);
            let seq = u32::from_be_bytes([f[l4 + 4], f[l4 + 5], f[l4 + 6], f[l4 + 7]]);
            assert_eq!(seq, seq0.wrapping_add(payload.len() as u32));
        }
        payload.extend_from_slice(chunk);
    }
    assert_eq!(payload, original[hlen..]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        check(rest);
    } else if let Some(unit) = skeleton(rest) {
        check(&unit);
    }
});
