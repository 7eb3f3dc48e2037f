//! Software segmentation and checksum completion: the per-frame path's core.
//!
//! A *unit* (see [`crate::datapath`]) is a 10-byte `virtio_net_hdr` and an
//! Ethernet frame. A TAP opened with offloads hands out units that a plain
//! Ethernet device cannot take: *superframes* (`gso_type` TCPv4, TCPv6 or UDP_L4
//! with a `gso_size`, up to 64 KiB) and frames whose L4 checksum is only partial
//! (`NEEDS_CSUM`, `csum_start`/`csum_offset`). [`to_plain_frames`] turns one unit
//! into plain, fully checksummed Ethernet frames, as the kernel's own GSO would:
//!
//! - **TCP** (TCPv4, TCPv6): headers copied into every segment; per segment the
//!   IPv4 total length, ID (+1 per segment) and header checksum, or the IPv6
//!   payload length; the TCP sequence number (+ payload bytes before it), FIN and
//!   PSH only on the last segment, CWR only on the first; the TCP checksum.
//! - **UDP_L4** (USO): per segment the IP fields as above, the UDP length and
//!   checksum (a computed 0 is sent as 0xFFFF).
//! - **NEEDS_CSUM without GSO**: the checksum over `csum_start..end` (whose field
//!   at `csum_start + csum_offset` holds the pseudo-header sum, as the kernel
//!   leaves it) is completed and stored, for any protocol.
//! - A unit that needs neither is copied as it is (check [`is_plain`] first to
//!   avoid the copy).
//!
//! Limits: no VLAN tags on superframes (the Ethernet type must be IPv4 or IPv6),
//! no IPv4 options beyond what the IHL says (they are copied), no IPv6 extension
//! headers on superframes, no UFO (`gso_type` UDP, IP fragmentation), and no ECN
//! flag in `gso_type`: all of these are errors, as are lengths that disagree with
//! the frame, headers that do not fit it, and a checksum position that does not
//! match the L4 header. The virtio header is read little-endian, as Linux's TAP
//! writes it on little-endian hosts. An error never panics and emits nothing.
//!
//! Sans-I/O and allocation-free: each frame is built in a caller-provided buffer
//! after `headroom` zero bytes (room for a zeroed virtio header, say) and handed
//! to a closure, one after the other.

/// Length of the `virtio_net_hdr` that leads every unit.
pub const VNET_HDR_LEN: usize = 10;
/// `flags`: the L4 checksum is partial (pseudo-header sum only).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified (receive side only; harmless here).
pub const F_DATA_VALID: u8 = 2;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// UFO (IP fragmentation of a UDP datagram): not supported.
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` flag: TCP with ECN (CWR) handling: not supported.
pub const GSO_ECN: u8 = 0x80;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// Where the checksum field sits in a TCP and a UDP header.
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// Why a unit could not be made into plain frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GsoError {
    #[error("unit shorter than a virtio header and an Ethernet header")]
    TooShort,
    #[error("gso_type {0:#04x} is not supported")]
    UnsupportedGsoType(u8),
    #[error("gso_type has the ECN flag, which is not supported")]
    Ecn,
    #[error("superframe with gso_size 0")]
    ZeroGsoSize,
    #[error("superframe of Ethernet type {0:#06x}: only IPv4 and IPv6 are segmented")]
    UnsupportedEthertype(u16),
    #[error("malformed IP header")]
    BadIpHeader,
    #[error("IP protocol {0} does not match the gso_type")]
    ProtocolMismatch(u8),
    #[error("header runs past the end of the frame")]
    HeaderBeyondFrame,
    #[error("IP length field disagrees with the frame's length")]
    LengthMismatch,
    #[error("checksum start or offset outside the frame or not at the L4 header")]
    BadChecksumOffsets,
    #[error("output buffer too small: {need} bytes needed")]
    OutputTooSmall { need: usize },
}

/// The fields of a `virtio_net_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads the header at the start of `unit`.
    pub fn parse(unit: &[u8]) -> Result<Self, GsoError> {
        let h = unit.get(..VNET_HDR_LEN).ok_or(GsoError::TooShort)?;
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok(VirtioNetHdr { flags: h[0], gso_type: h[1], hdr_len: le(2), gso_size: le(4), csum_start: le(6), csum_offset: le(8) })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`VNET_HDR_LEN`].
    pub fn emit(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Whether `unit` is already a plain frame a device without a virtio header
/// takes as it is: no GSO, no partial checksum. (A unit too short for a virtio
/// header counts as plain: there is nothing to do to it.)
#[inline]
pub fn is_plain(unit: &[u8]) -> bool {
    match unit {
        [flags, gso_type, ..] => flags & F_NEEDS_CSUM == 0 && *gso_type == GSO_NONE,
        _ => true,
    }
}

/// What [`to_plain_frames`] found out about a superframe before cutting it.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Offset of the L4 header in the frame.
    l4: usize,
    /// Length of every header, Ethernet to L4 included.
    hdrs: usize,
    v4: bool,
    tcp: bool,
    gso_size: usize,
}

/// Turns `unit` (virtio header + Ethernet frame) into plain, fully checksummed
/// Ethernet frames. Each is written to `out[headroom..]` after `headroom` zero
/// bytes, and `emit(&out[..headroom + frame_len])` is called with it, in order.
/// Returns how many frames were emitted.
///
/// `out` must hold `headroom` plus the largest frame: the headers plus
/// `gso_size` bytes for a superframe, the whole frame otherwise
/// ([`max_output_len`] says how much). On error nothing has been emitted.
pub fn to_plain_frames(unit: &[u8], out: &mut [u8], headroom: usize, emit: impl FnMut(&[u8])) -> Result<usize, GsoError> {
    to_plain_frames_where(unit, out, headroom, |_, _| true, emit)
}

/// [`to_plain_frames`] for a unit only partly received (a superframe that lost
/// a chunk): `have(start, end)` says whether bytes `start..end` of `unit`
/// arrived. Only frames all of whose bytes arrived are emitted: none unless
/// the virtio and packet headers did; then each segment whose payload did.
/// Returns how many frames were emitted.
pub fn to_plain_frames_where(
    unit: &[u8],
    out: &mut [u8],
    headroom: usize,
    have: impl Fn(usize, usize) -> bool,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, GsoError> {
    if !have(0, VNET_HDR_LEN.min(unit.len())) {
        return Ok(0);
    }
    let hdr = VirtioNetHdr::parse(unit)?;
    let frame = &unit[VNET_HDR_LEN..];
    if frame.len() < ETH_HLEN {
        return Err(GsoError::TooShort);
    }
    if hdr.gso_type == GSO_NONE {
        if !have(0, unit.len()) {
            return Ok(0);
        }
        let need = headroom + frame.len();
        if out.len() < need {
            return Err(GsoError::OutputTooSmall { need });
        }
        if let Some((start, field)) = partial_csum(&hdr, frame)? {
            out[..headroom].fill(0);
            let body = &mut out[headroom..need];
            body.copy_from_slice(frame);
            // The field holds the pseudo-header sum: summing over it adds that in.
            let sum = fold(sum_words(&body[start..], 0));
            let csum = match !sum {
                0 => 0xFFFF,
                c => c,
            };
            body[field..field + 2].copy_from_slice(&csum.to_be_bytes());
        } else {
            out[..headroom].fill(0);
            out[headroom..need].copy_from_slice(frame);
        }
        emit(&out[..need]);
        return Ok(1);
    }

    // Headers that did not all arrive are not read (they would be garbage).
    if !have(0, VNET_HDR_LEN + ETH_HLEN) {
        return Ok(0);
    }
    let lay = layout(&hdr, frame)?;
    if !have(0, VNET_HDR_LEN + lay.hdrs) {
        return Ok(0);
    }
    let payload = &frame[lay.hdrs..];
    let biggest = payload.len().min(lay.gso_size);
    let need = headroom + lay.hdrs + biggest;
    if out.len() < need {
        return Err(GsoError::OutputTooSmall { need });
    }
    out[..headroom].fill(0);
    let segments = payload.len().div_ceil(lay.gso_size).max(1);
    let mut emitted = 0;
    let l3 = ETH_HLEN;
    let ip_id = be16(frame, l3 + 4);
    let seq = if lay.tcp { be32(frame, lay.l4 + 4) } else { 0 };
    for i in 0..segments {
        let at = i * lay.gso_size;
        let (from, to) = (at.min(payload.len()), (at + lay.gso_size).min(payload.len()));
        let chunk = &payload[from..to];
        if !have(VNET_HDR_LEN + lay.hdrs + from, VNET_HDR_LEN + lay.hdrs + to) {
            continue;
        }
        let len = lay.hdrs + chunk.len();
        let seg = &mut out[headroom..headroom + len];
        seg[..lay.hdrs].copy_from_slice(&frame[..lay.hdrs]);
        seg[lay.hdrs..].copy_from_slice(chunk);
        let l4_len = len - lay.l4;

        if lay.v4 {
            put16(seg, l3 + 2, (len - l3) as u16);
            put16(seg, l3 + 4, ip_id.wrapping_add(i as u16));
            put16(seg, l3 + 10, 0);
            let ihl = lay.l4 - l3;
            let c = !fold(sum_words(&seg[l3..l3 + ihl], 0));
            put16(seg, l3 + 10, c);
        } else {
            put16(seg, l3 + 4, (len - l3 - 40) as u16);
        }

        let csum_at = if lay.tcp {
            put32(seg, lay.l4 + 4, seq.wrapping_add(at as u32));
            let mut flags = seg[lay.l4 + 13];
            if i != 0 {
                flags &= !TCP_CWR;
            }
            if i + 1 != segments {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            seg[lay.l4 + 13] = flags;
            lay.l4 + TCP_CSUM_OFF
        } else {
            put16(seg, lay.l4 + 4, l4_len as u16);
            lay.l4 + UDP_CSUM_OFF
        };
        put16(seg, csum_at, 0);
        let proto = if lay.tcp { IPPROTO_TCP } else { IPPROTO_UDP };
        let pseudo = pseudo_header_sum(seg, lay.v4, proto, l4_len);
        let c = match !fold(sum_words(&seg[lay.l4..], pseudo)) {
            0 if !lay.tcp => 0xFFFF,
            c => c,
        };
        put16(seg, csum_at, c);
        emit(&out[..headroom + len]);
        emitted += 1;
    }
    Ok(emitted)
}

/// The size `out` must have for [`to_plain_frames`] to take `unit` (with
/// `headroom`), or the error it would return for a malformed one.
pub fn max_output_len(unit: &[u8], headroom: usize) -> Result<usize, GsoError> {
    let hdr = VirtioNetHdr::parse(unit)?;
    let frame = &unit[VNET_HDR_LEN..];
    if frame.len() < ETH_HLEN {
        return Err(GsoError::TooShort);
    }
    if hdr.gso_type == GSO_NONE {
        partial_csum(&hdr, frame)?;
        return Ok(headroom + frame.len());
    }
    let lay = layout(&hdr, frame)?;
    Ok(headroom + lay.hdrs + (frame.len() - lay.hdrs).min(lay.gso_size))
}

/// For a unit without GSO: where the partial checksum's sum starts and where
/// its field is, if `NEEDS_CSUM` is set.
fn partial_csum(hdr: &VirtioNetHdr, frame: &[u8]) -> Result<Option<(usize, usize)>, GsoError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(None);
    }
    let start = hdr.csum_start as usize;
    let field = start + hdr.csum_offset as usize;
    if start >= frame.len() || field + 2 > frame.len() {
        return Err(GsoError::BadChecksumOffsets);
    }
    Ok(Some((start, field)))
}

/// Checks a superframe's headers against its virtio header.
fn layout(hdr: &VirtioNetHdr, frame: &[u8]) -> Result<Layout, GsoError> {
    if hdr.gso_type & GSO_ECN != 0 {
        return Err(GsoError::Ecn);
    }
    let (want_v4, tcp) = match hdr.gso_type {
        GSO_TCPV4 => (Some(true), true),
        GSO_TCPV6 => (Some(false), true),
        GSO_UDP_L4 => (None, false),
        other => return Err(GsoError::UnsupportedGsoType(other)),
    };
    if hdr.gso_size == 0 {
        return Err(GsoError::ZeroGsoSize);
    }
    let l3 = ETH_HLEN;
    let ethertype = be16(frame, 12);
    let (v4, l4, proto) = match ethertype {
        ETHERTYPE_IPV4 => {
            if frame.len() < l3 + 20 {
                return Err(GsoError::HeaderBeyondFrame);
            }
            let ihl = (frame[l3] & 0x0f) as usize * 4;
            if frame[l3] >> 4 != 4 || ihl < 20 {
                return Err(GsoError::BadIpHeader);
            }
            // A fragment (MF set or an offset) cannot be a superframe.
            if be16(frame, l3 + 6) & 0x3fff != 0 {
                return Err(GsoError::BadIpHeader);
            }
            if frame.len() < l3 + ihl {
                return Err(GsoError::HeaderBeyondFrame);
            }
            let tot = be16(frame, l3 + 2) as usize;
            if tot != 0 && tot != frame.len() - l3 {
                return Err(GsoError::LengthMismatch);
            }
            (true, l3 + ihl, frame[l3 + 9])
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < l3 + 40 {
                return Err(GsoError::HeaderBeyondFrame);
            }
            if frame[l3] >> 4 != 6 {
                return Err(GsoError::BadIpHeader);
            }
            let plen = be16(frame, l3 + 4) as usize;
            if plen != 0 && plen != frame.len() - l3 - 40 {
                return Err(GsoError::LengthMismatch);
            }
            (false, l3 + 40, frame[l3 + 6])
        }
        other => return Err(GsoError::UnsupportedEthertype(other)),
    };
    if want_v4.is_some_and(|w| w != v4) {
        return Err(GsoError::BadIpHeader);
    }
    let (want_proto, csum_off) = if tcp { (IPPROTO_TCP, TCP_CSUM_OFF) } else { (IPPROTO_UDP, UDP_CSUM_OFF) };
    if proto != want_proto {
        return Err(GsoError::ProtocolMismatch(proto));
    }
    let l4_hlen = if tcp {
        if frame.len() < l4 + 20 {
            return Err(GsoError::HeaderBeyondFrame);
        }
        let doff = (frame[l4 + 12] >> 4) as usize * 4;
        if doff < 20 {
            return Err(GsoError::BadIpHeader);
        }
        doff
    } else {
        8
    };
    if frame.len() < l4 + l4_hlen {
        return Err(GsoError::HeaderBeyondFrame);
    }
    if hdr.flags & F_NEEDS_CSUM != 0 && (hdr.csum_start as usize != l4 || hdr.csum_offset as usize != csum_off) {
        return Err(GsoError::BadChecksumOffsets);
    }
    Ok(Layout { l4, hdrs: l4 + l4_hlen, v4, tcp, gso_size: hdr.gso_size as usize })
}

/// The pseudo-header's contribution for the L4 segment of `seg` (a frame whose
/// IP header starts after the Ethernet header).
fn pseudo_header_sum(seg: &[u8], v4: bool, proto: u8, l4_len: usize) -> u64 {
    let l3 = ETH_HLEN;
    let addrs = if v4 { &seg[l3 + 12..l3 + 20] } else { &seg[l3 + 8..l3 + 40] };
    sum_words(addrs, proto as u64 + l4_len as u64)
}

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero)
/// to `acc`, unfolded. Summing 32-bit words is equivalent, as 2^16 ≡ 1 mod 0xFFFF.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
        acc += u32::from_be_bytes([c[4], c[5], c[6], c[7]]) as u64;
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = rest.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

/// Folds a one's-complement sum to 16 bits.
fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: usize = 65536 + 128;

    /// An independent checksum: 16-bit words summed in a u32, folded as it goes.
    fn naive_csum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = bytes[i] as u32;
            let lo = if i + 1 < bytes.len() { bytes[i + 1] as u32 } else { 0 };
            sum += (hi << 8) | lo;
            if sum > 0xffff {
                sum = (sum & 0xffff) + 1;
            }
            i += 2;
        }
        sum as u16
    }

    /// Whether the L4 checksum of a plain frame verifies (sum over pseudo-header
    /// and segment is all ones).
    fn l4_ok(frame: &[u8]) -> bool {
        let (v4, l4, proto) = if frame[12..14] == [0x08, 0x00] {
            (true, 14 + (frame[14] & 15) as usize * 4, frame[23])
        } else {
            (false, 54, frame[20])
        };
        let len = (frame.len() - l4) as u32;
        let mut pseudo = Vec::new();
        if v4 {
            pseudo.extend_from_slice(&frame[26..34]);
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            pseudo.extend_from_slice(&frame[22..54]);
            pseudo.extend_from_slice(&len.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        naive_csum(&[&pseudo, &frame[l4..]]) == 0xffff
    }

    fn ipv4_hdr_ok(frame: &[u8]) -> bool {
        let ihl = (frame[14] & 15) as usize * 4;
        naive_csum(&[&frame[14..14 + ihl]]) == 0xffff
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    struct Spec {
        v4: bool,
        tcp: bool,
        payload: Vec<u8>,
        gso_size: u16,
        tcp_flags: u8,
        seq: u32,
        ip_id: u16,
        /// IPv4 options (a multiple of 4 bytes).
        ip_opts: Vec<u8>,
        /// TCP options (a multiple of 4 bytes).
        tcp_opts: Vec<u8>,
    }

    impl Spec {
        fn tcp4(payload: usize, gso: u16) -> Spec {
            Spec {
                v4: true,
                tcp: true,
                payload: pattern(payload, 7),
                gso_size: gso,
                tcp_flags: 0x10 | TCP_PSH | TCP_FIN | TCP_CWR,
                seq: 0xffff_f000,
                ip_id: 0xfffe,
                ip_opts: vec![],
                tcp_opts: vec![],
            }
        }
    }

    /// A unit as the kernel's TAP hands it out: headers, payload, partial
    /// checksum (pseudo-header sum) in the L4 checksum field, IP header checksum
    /// as the stack left it (here: deliberately wrong, GSO recomputes it).
    fn superframe(s: &Spec) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        f.extend_from_slice(if s.v4 { &[0x08, 0x00] } else { &[0x86, 0xdd] });
        let l4_hlen = if s.tcp { 20 + s.tcp_opts.len() } else { 8 };
        let l4_len = l4_hlen + s.payload.len();
        let proto = if s.tcp { IPPROTO_TCP } else { IPPROTO_UDP };
        if s.v4 {
            let ihl = 20 + s.ip_opts.len();
            f.push(0x40 | (ihl / 4) as u8);
            f.push(0);
            f.extend_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&s.ip_id.to_be_bytes());
            f.extend_from_slice(&[0x40, 0, 64, proto, 0xde, 0xad]);
            f.extend_from_slice(&[10, 41, 0, 1, 10, 41, 0, 2]);
            f.extend_from_slice(&s.ip_opts);
        } else {
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        }
        let l4 = f.len();
        if s.tcp {
            f.extend_from_slice(&[0x9c, 0x40, 0x13, 0x89]);
            f.extend_from_slice(&s.seq.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 1]);
            f.push((((20 + s.tcp_opts.len()) / 4) << 4) as u8);
            f.push(s.tcp_flags);
            f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            f.extend_from_slice(&s.tcp_opts);
        } else {
            f.extend_from_slice(&[0x9c, 0x40, 0x13, 0x89]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend_from_slice(&s.payload);
        // Partial checksum: the folded pseudo-header sum, not complemented.
        let csum_off = if s.tcp { 16 } else { 6 };
        let addrs = if s.v4 { &f[26..34] } else { &f[22..54] };
        let p = fold(sum_words(addrs, proto as u64 + l4_len as u64));
        put16(&mut f, l4 + csum_off, p);
        let gso_type = match (s.tcp, s.v4) {
            (true, true) => GSO_TCPV4,
            (true, false) => GSO_TCPV6,
            (false, _) => GSO_UDP_L4,
        };
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: l4 as u16 + l4_hlen as u16,
            gso_size: s.gso_size,
            csum_start: l4 as u16,
            csum_offset: csum_off as u16,
        };
        let mut unit = vec![0u8; VNET_HDR_LEN];
        hdr.emit(&mut unit);
        unit.extend_from_slice(&f);
        unit
    }

    fn segments(unit: &[u8], headroom: usize) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut out = vec![0xaa; OUT];
        let mut segs = Vec::new();
        let n = to_plain_frames(unit, &mut out, headroom, |s| {
            assert!(s[..headroom].iter().all(|&b| b == 0), "headroom not zeroed");
            segs.push(s[headroom..].to_vec())
        })?;
        assert_eq!(n, segs.len());
        Ok(segs)
    }

    /// Checks every segment of a TCP or UDP superframe and the reassembled payload.
    fn check(s: &Spec) {
        let unit = superframe(s);
        let original = &unit[VNET_HDR_LEN..];
        let segs = segments(&unit, VNET_HDR_LEN).unwrap();
        let gso = s.gso_size as usize;
        assert_eq!(segs.len(), s.payload.len().div_ceil(gso).max(1));
        assert_eq!(max_output_len(&unit, 3).unwrap(), 3 + segs.iter().map(Vec::len).max().unwrap());
        let l3 = 14;
        let ihl = if s.v4 { 20 + s.ip_opts.len() } else { 40 };
        let l4 = l3 + ihl;
        let hdrs = l4 + if s.tcp { 20 + s.tcp_opts.len() } else { 8 };
        let mut payload = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let chunk = &seg[hdrs..];
            assert!(chunk.len() == gso || (last && chunk.len() <= gso), "segment {i}: {} bytes", chunk.len());
            // Unchanged: Ethernet header, addresses, options.
            assert_eq!(seg[..l3], original[..l3]);
            if s.v4 {
                assert_eq!(be16(seg, l3 + 2) as usize, seg.len() - l3, "IPv4 total length");
                assert_eq!(be16(seg, l3 + 4), s.ip_id.wrapping_add(i as u16), "IPv4 ID");
                assert!(ipv4_hdr_ok(seg), "IPv4 header checksum of segment {i}");
                assert_eq!(seg[l3 + 12..l4], original[l3 + 12..l4]);
            } else {
                assert_eq!(be16(seg, l3 + 4) as usize, seg.len() - l3 - 40, "IPv6 payload length");
                assert_eq!(seg[l3 + 6..l4], original[l3 + 6..l4]);
            }
            assert!(l4_ok(seg), "L4 checksum of segment {i}");
            if s.tcp {
                assert_eq!(be32(seg, l4 + 4), s.seq.wrapping_add(payload.len() as u32), "sequence of segment {i}");
                let f = seg[l4 + 13];
                assert_eq!(f & TCP_CWR != 0, i == 0 && s.tcp_flags & TCP_CWR != 0, "CWR on segment {i}");
                assert_eq!(f & TCP_FIN != 0, last && s.tcp_flags & TCP_FIN != 0, "FIN on segment {i}");
                assert_eq!(f & TCP_PSH != 0, last && s.tcp_flags & TCP_PSH != 0, "PSH on segment {i}");
                assert_eq!(f & 0x10, s.tcp_flags & 0x10, "ACK kept");
                assert_eq!(seg[l4 + 20..hdrs], original[l4 + 20..hdrs], "TCP options");
            } else {
                assert_eq!(be16(seg, l4 + 4) as usize, seg.len() - l4, "UDP length");
                assert_ne!(be16(seg, l4 + 6), 0, "UDP checksum 0 means none");
            }
            payload.extend_from_slice(chunk);
        }
        assert_eq!(payload, s.payload, "reassembled payload");
    }

    #[test]
    fn a_partly_received_superframe_gives_exactly_its_whole_segments() {
        let s = Spec::tcp4(10_000, 1000);
        let unit = superframe(&s);
        let all = segments(&unit, 0).unwrap();
        let hdrs = 14 + 20 + 20;
        // Bytes 3500..4200 of the payload are missing: segments 3 and 4 cannot be made.
        let hole = (VNET_HDR_LEN + hdrs + 3500, VNET_HDR_LEN + hdrs + 4200);
        let mut garbled = unit.clone();
        garbled[hole.0..hole.1].fill(0x5a);
        let have = |a: usize, b: usize| b <= hole.0 || a >= hole.1;
        let mut out = vec![0u8; OUT];
        let mut got = Vec::new();
        let n = to_plain_frames_where(&garbled, &mut out, 0, have, |f| got.push(f.to_vec())).unwrap();
        assert_eq!(n, 8);
        let expected: Vec<Vec<u8>> = all.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, f)| f.clone()).collect();
        assert_eq!(got, expected, "the same frames as from the whole unit, minus the two with the hole");
        // Without the headers nothing can be made.
        let no_hdr = |a: usize, _b: usize| a >= VNET_HDR_LEN + 20;
        assert_eq!(to_plain_frames_where(&garbled, &mut out, 0, no_hdr, |_| panic!("emitted without headers")), Ok(0));
        // A plain frame is all or nothing.
        let plain = { let mut u = vec![0u8; VNET_HDR_LEN]; u.extend_from_slice(&[0x02; 100]); u };
        assert_eq!(to_plain_frames_where(&plain, &mut out, 0, |_, b| b <= 50, |_| panic!("emitted a partial frame")), Ok(0));
    }

    #[test]
    fn tcpv4_superframe_is_segmented() {
        check(&Spec::tcp4(65000, 1448));
        check(&Spec::tcp4(1448 * 10, 1448)); // exact multiple
        check(&Spec::tcp4(100, 1448)); // one segment
        check(&Spec::tcp4(3, 1)); // three one-byte segments
    }

    #[test]
    fn tcpv4_with_options_and_odd_sizes() {
        let mut s = Spec::tcp4(9999, 1337);
        s.ip_opts = vec![1, 1, 1, 0]; // NOPs, EOL
        s.tcp_opts = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        check(&s);
        s.tcp_flags = 0x10; // no flags to strip
        check(&s);
    }

    #[test]
    fn tcpv6_superframe_is_segmented() {
        let mut s = Spec::tcp4(60001, 1428);
        s.v4 = false;
        check(&s);
        s.tcp_opts = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        s.payload = pattern(5, 1);
        check(&s);
    }

    #[test]
    fn udp_l4_superframes_are_segmented() {
        for v4 in [true, false] {
            let mut s = Spec::tcp4(40000, 1200);
            s.v4 = v4;
            s.tcp = false;
            check(&s);
            s.payload = pattern(1201, 3);
            check(&s);
        }
    }

    #[test]
    fn empty_payload_gives_one_segment() {
        let mut s = Spec::tcp4(0, 1448);
        check(&s);
        s.tcp = false;
        check(&s);
    }

    /// A UDP segment whose checksum computes to 0 is sent as 0xFFFF.
    #[test]
    fn udp_zero_checksum_is_sent_as_all_ones() {
        let mut s = Spec::tcp4(2, 1200);
        s.tcp = false;
        // Search the two payload bytes that make the checksum compute to zero.
        let found = (0..=u16::MAX).any(|x| {
            s.payload = x.to_be_bytes().to_vec();
            let seg = segments(&superframe(&s), 0).unwrap().remove(0);
            let mut z = seg.clone();
            put16(&mut z, 14 + 20 + 6, 0);
            let mut pseudo = z[26..34].to_vec();
            pseudo.extend_from_slice(&[0, 17, 0, (z.len() - 34) as u8]);
            if naive_csum(&[&pseudo, &z[34..]]) != 0xffff {
                return false;
            }
            assert_eq!(be16(&seg, 14 + 20 + 6), 0xffff);
            assert!(l4_ok(&seg));
            true
        });
        assert!(found);
    }

    fn partial(v4: bool, tcp: bool, n: usize) -> Vec<u8> {
        let mut s = Spec::tcp4(n, 1448);
        s.v4 = v4;
        s.tcp = tcp;
        let mut unit = superframe(&s);
        unit[1] = GSO_NONE;
        unit[4..6].fill(0);
        unit
    }

    #[test]
    fn partial_checksums_are_completed() {
        for (v4, tcp) in [(true, true), (true, false), (false, true), (false, false)] {
            for n in [0, 1, 2, 3, 100, 1401, 9000] {
                let unit = partial(v4, tcp, n);
                let segs = segments(&unit, VNET_HDR_LEN).unwrap();
                assert_eq!(segs.len(), 1);
                let f = &segs[0];
                assert_eq!(f.len(), unit.len() - VNET_HDR_LEN);
                assert!(l4_ok(f), "v4 {v4} tcp {tcp} n {n}");
                // Only the checksum field changed.
                let field = 14 + if v4 { 20 } else { 40 } + if tcp { 16 } else { 6 };
                let mut a = f.clone();
                let mut b = unit[VNET_HDR_LEN..].to_vec();
                a[field..field + 2].fill(0);
                b[field..field + 2].fill(0);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn plain_units_are_copied() {
        let mut unit = partial(true, true, 50);
        unit[0] = F_DATA_VALID;
        assert!(is_plain(&unit));
        let segs = segments(&unit, 0).unwrap();
        assert_eq!(segs, vec![unit[VNET_HDR_LEN..].to_vec()]);
        assert!(!is_plain(&superframe(&Spec::tcp4(10, 5))));
        assert!(!is_plain(&partial(true, false, 5)));
        assert!(is_plain(&[]));
    }

    #[test]
    fn malformed_units_are_errors() {
        let good = superframe(&Spec::tcp4(5000, 1000));
        let mut cases: Vec<(Vec<u8>, GsoError)> = Vec::new();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut u = good.clone();
            f(&mut u);
            u
        };
        let h = VNET_HDR_LEN;
        cases.push((good[..5].to_vec(), GsoError::TooShort));
        cases.push((good[..h + 13].to_vec(), GsoError::TooShort));
        cases.push((with(&|u| u[1] |= GSO_ECN), GsoError::Ecn));
        cases.push((with(&|u| u[1] = GSO_UDP), GsoError::UnsupportedGsoType(GSO_UDP)));
        cases.push((with(&|u| u[1] = 9), GsoError::UnsupportedGsoType(9)));
        cases.push((with(&|u| u[4..6].fill(0)), GsoError::ZeroGsoSize));
        cases.push((with(&|u| u[h + 12..h + 14].copy_from_slice(&[0x81, 0x00])), GsoError::UnsupportedEthertype(0x8100)));
        cases.push((with(&|u| u[1] = GSO_TCPV6), GsoError::BadIpHeader));
        cases.push((with(&|u| u[h + 14] = 0x44), GsoError::BadIpHeader)); // IHL 4
        cases.push((with(&|u| u[h + 14] = 0x55), GsoError::BadIpHeader)); // version 5
        cases.push((with(&|u| u[h + 14 + 6] = 0x20), GsoError::BadIpHeader)); // MF
        cases.push((with(&|u| u[h + 14 + 3] ^= 1), GsoError::LengthMismatch));
        cases.push((with(&|u| u[h + 14 + 9] = 17), GsoError::ProtocolMismatch(17)));
        cases.push((with(&|u| u[1] = GSO_UDP_L4), GsoError::ProtocolMismatch(6)));
        cases.push((with(&|u| u[h + 34 + 12] = 0x40), GsoError::BadIpHeader)); // TCP doff 4
        cases.push((with(&|u| u[6] += 1), GsoError::BadChecksumOffsets));
        cases.push((with(&|u| u[8] = 6), GsoError::BadChecksumOffsets));
        // Headers cut off: IPv4, TCP, and TCP options past the end.
        let mut cut = good[..h + 14 + 10].to_vec();
        cases.push((cut.clone(), GsoError::HeaderBeyondFrame));
        cut = good[..h + 34 + 10].to_vec();
        put16(&mut cut, h + 16, 30);
        cases.push((cut.clone(), GsoError::HeaderBeyondFrame));
        cut = good[..h + 34 + 20].to_vec();
        put16(&mut cut, h + 16, 40);
        cut[h + 34 + 12] = 0xf0;
        cases.push((cut, GsoError::HeaderBeyondFrame));
        // IPv6 cut short, and a wrong payload length.
        let mut s6 = Spec::tcp4(3000, 1000);
        s6.v4 = false;
        let good6 = superframe(&s6);
        cases.push((good6[..h + 14 + 39].to_vec(), GsoError::HeaderBeyondFrame));
        let mut bad6 = good6.clone();
        bad6[h + 14 + 5] ^= 4;
        cases.push((bad6, GsoError::LengthMismatch));
        let mut ext6 = good6.clone();
        ext6[h + 14 + 6] = 0; // hop-by-hop extension header
        cases.push((ext6, GsoError::ProtocolMismatch(0)));
        // Non-GSO partial checksum positions outside the frame.
        let mut p = partial(true, true, 10);
        let len = (p.len() - h) as u16;
        p[6..8].copy_from_slice(&len.to_le_bytes());
        p[8..10].fill(0);
        cases.push((p.clone(), GsoError::BadChecksumOffsets));
        p[6..8].copy_from_slice(&(len - 2).to_le_bytes());
        p[8..10].copy_from_slice(&1u16.to_le_bytes());
        cases.push((p, GsoError::BadChecksumOffsets));

        for (i, (unit, want)) in cases.iter().enumerate() {
            let mut out = vec![0u8; OUT];
            let got = to_plain_frames(unit, &mut out, 10, |_| panic!("case {i}: emitted despite an error"));
            assert_eq!(got, Err(*want), "case {i}");
            assert_eq!(max_output_len(unit, 10), Err(*want), "case {i}");
        }
        // The good one is fine, and a tot_len of 0 (as with BIG TCP) is taken.
        assert!(segments(&good, 0).is_ok());
        assert!(segments(&with(&|u| put16(u, h + 16, 0)), 0).is_ok());
    }

    #[test]
    fn output_too_small_is_an_error() {
        let unit = superframe(&Spec::tcp4(5000, 1000));
        let need = max_output_len(&unit, 10).unwrap();
        assert_eq!(need, 10 + 14 + 20 + 20 + 1000);
        let mut out = vec![0u8; need - 1];
        assert_eq!(to_plain_frames(&unit, &mut out, 10, |_| panic!()), Err(GsoError::OutputTooSmall { need }));
        let mut out = vec![0u8; need];
        assert_eq!(to_plain_frames(&unit, &mut out, 10, |_| {}), Ok(5));
        let p = partial(false, false, 100);
        let need = max_output_len(&p, 0).unwrap();
        let mut out = vec![0u8; need - 1];
        assert_eq!(to_plain_frames(&p, &mut out, 0, |_| panic!()), Err(GsoError::OutputTooSmall { need }));
    }

    #[test]
    fn header_roundtrip() {
        let h = VirtioNetHdr { flags: 1, gso_type: 4, hdr_len: 0x1234, gso_size: 1448, csum_start: 54, csum_offset: 16 };
        let mut b = [0u8; 10];
        h.emit(&mut b);
        assert_eq!(VirtioNetHdr::parse(&b), Ok(h));
        assert_eq!(b[4..6], [0xa8, 0x05]); // little-endian
        assert_eq!(VirtioNetHdr::parse(&b[..9]), Err(GsoError::TooShort));
    }

    /// The library's checksum against the naive one on random data and lengths.
    #[test]
    fn checksum_matches_naive() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..300 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let a = fold(sum_words(&data, 0));
            let b = naive_csum(&[&data]);
            // 0x0000 and 0xFFFF are the same number in one's complement.
            assert!(a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0), "len {len}: {a:#x} vs {b:#x}");
        }
    }

    /// Deterministic fuzzing: mutated superframes and partial-checksum units
    /// never panic, and whatever comes out has valid checksums.
    #[test]
    fn mutated_units_never_panic() {
        let mut x = 0xfeed_f00d_dead_beefu64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut six = Spec::tcp4(3000, 700);
        six.v4 = false;
        let mut udp = Spec::tcp4(2500, 600);
        udp.tcp = false;
        let seeds = [superframe(&Spec::tcp4(4000, 1000)), superframe(&six), superframe(&udp), partial(true, true, 77), partial(false, false, 9)];
        let mut out = vec![0u8; OUT];
        let (mut ok, mut err) = (0, 0);
        for i in 0..20_000 {
            let mut u = seeds[i % seeds.len()].clone();
            for _ in 0..1 + rnd() % 3 {
                let at = (rnd() as usize) % u.len().max(1);
                match rnd() % 5 {
                    0 if !u.is_empty() => u[at] ^= 1 << (rnd() % 8),
                    1 if !u.is_empty() => u[at] = rnd() as u8,
                    2 => u.truncate(at),
                    3 => u.insert(at.min(u.len()), rnd() as u8),
                    _ if u.len() > 10 => u[(rnd() as usize) % 10] = rnd() as u8,
                    _ => {}
                }
            }
            let gso = u.get(1).copied().unwrap_or(0) != GSO_NONE;
            let r = to_plain_frames(&u, &mut out, 10, |s| {
                let f = &s[10..];
                if gso {
                    // Segments of a superframe are always TCP/UDP over IPv4/IPv6.
                    assert!(l4_ok(f), "bad L4 checksum out of {u:?}");
                    if f[12..14] == [8, 0] {
                        assert!(ipv4_hdr_ok(f));
                    }
                }
            });
            match r {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        assert!(ok > 1000 && err > 1000, "ok {ok} err {err}");
    }
}
