//! The data-plane datagram: encrypted units between two routers.
//!
//! ```text
//! UDP payload = outer header (16 B, cleartext, the AEAD associated data)
//!             ‖ ciphertext ‖ 16-byte AES-256-GCM tag
//!
//! outer header                        (all integers big-endian)
//!   0      u8   kind: 0x01 = data (anything else is rejected)
//!   1      u8   flags: bit0 UNSEALED (data only, see below); other bits
//!               reserved, nonzero is rejected
//!   2..4   u16  queue: the sender's queue (forwarding thread) that sealed it,
//!               below MAX_QUEUES; 0 to a peer without CAP_MULTIQUEUE, which
//!               rejects anything else (the field was "reserved, 0" before).
//!               Queue q > 0 seals under its own key (`session::queue_key`),
//!               so each (session, queue) is a counter space and replay
//!               window of its own; the receiver's kernel steers by it.
//!   4..8   u32  receiver index: the session id the RECEIVER chose in the handshake
//!   8..16  u64  counter: per-session send counter;
//!               nonce = 4 zero bytes ‖ counter (big-endian)
//!
//! plaintext = inner header ‖ records
//!
//! inner header (16 B)
//!   0      u8   ttl: hops left (relays decrement; 0 = do not forward)
//!   1      u8   flags: bit0 BROADCAST; other bits reserved, 0
//!   2..8   48-bit src PeerName: the peer whose TAP the units came from (never 0)
//!   8..14  48-bit dst PeerName: 0 if and only if BROADCAST
//!   14..16 u16  reserved, 0
//!
//! record, back to back to the end of the plaintext
//!   0..2   u16  len: payload bytes, at least 1
//!   2..4   u16  flags: bit0 CHUNK; other bits reserved, 0
//!   if CHUNK (12 more bytes):
//!   4..8   u32  unit_id: sender-chosen, the same for every chunk of a unit
//!   8..12  u32  offset: where this payload starts in the unit
//!   12..16 u32  total: the unit's length, at most MAX_UNIT; offset + len <= total
//!   then `len` bytes of payload
//! ```
//!
//! An UNSEALED data datagram (`trusted (userspace)`, see [`crate::trusted`])
//! has the same layout and size, but its "ciphertext" is the plaintext and its
//! tag is 16 zero bytes: nothing is encrypted or authenticated. Its counter
//! comes from the session's send counter and still passes the receiver's replay
//! window. It is sent only to a direct peer that advertised
//! `CAP_TRUSTED_USERSPACE` and with which trust was agreed both ways, only for
//! units from the sender's own TAP to that peer (never broadcast, never on a
//! relay session); a receiver drops and counts any other (see
//! [`crate::datapath::Receiver::set_unsealed_from`]). Heartbeats are always sealed.
//!
//! A *unit* is what the router reads from its TAP: a 10-byte `virtio_net_hdr`
//! followed by an Ethernet frame, up to [`MAX_UNIT`] bytes with TSO. A unit that
//! fits travels as one whole record, packed with others; a unit that does not fit
//! a datagram alone is cut into CHUNK records, one per datagram, every datagram
//! of the unit exactly `max_datagram` bytes except the last (see
//! [`crate::datapath::Encoder`]).
//!
//! This module only parses and emits; it never decrypts, reassembles or decides.
//! Parsers never panic and never allocate; the checked views' accessors cannot
//! panic once `new_checked` succeeded.

use std::iter::FusedIterator;

use crate::peer::PeerName;
pub use crate::session::TAG_LEN;

/// Outer header length.
pub const OUTER_LEN: usize = 16;
/// Inner header length.
pub const INNER_LEN: usize = 16;
/// Header of a whole record.
pub const RECORD_HDR_LEN: usize = 4;
/// Header of a chunk record.
pub const CHUNK_HDR_LEN: usize = RECORD_HDR_LEN + 12;
/// Bytes of every datagram that are not records: outer + inner header + tag.
pub const OVERHEAD: usize = OUTER_LEN + INNER_LEN + TAG_LEN;
/// Largest unit: a 64 KiB GSO payload + `virtio_net_hdr` + Ethernet + VLAN tag.
pub const MAX_UNIT: usize = 65535 + 10 + 14 + 4;

/// Outer `kind` of a data datagram.
pub const KIND_DATA: u8 = 0x01;
/// Outer `kind` of a heartbeat datagram (see [`Heartbeat`]).
pub const KIND_HEARTBEAT: u8 = 0x02;
/// Plaintext bytes of a heartbeat before its padding.
pub const HEARTBEAT_LEN: usize = 8;
/// Inner header flag: the units are for every peer.
pub const INNER_FLAG_BROADCAST: u8 = 0x01;
/// Outer header flag of a data datagram: its payload is not sealed.
pub const OUTER_FLAG_UNSEALED: u8 = 0x01;
/// Record flag: the record is one chunk of a larger unit.
pub const RECORD_FLAG_CHUNK: u16 = 0x0001;

/// Why bytes are not a valid datagram part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("truncated")]
    Truncated,
    #[error("unknown datagram kind {0:#04x}")]
    BadKind(u8),
    #[error("reserved field or flag bit is nonzero")]
    Reserved,
    #[error("inconsistent addressing: src is 0, or dst is 0 without BROADCAST (or not 0 with it)")]
    BadAddress,
    #[error("record of length 0")]
    EmptyRecord,
    #[error("record runs past the end of the datagram")]
    RecordPastEnd,
    #[error("chunk offset + length exceeds the unit's total")]
    ChunkOutOfBounds,
    #[error("unit of {0} bytes exceeds the maximum")]
    UnitTooLarge(u32),
}

mod field {
    use std::ops::Range;
    pub const KIND: usize = 0;
    pub const OUTER_FLAGS: usize = 1;
    pub const OUTER_RESERVED: Range<usize> = 2..4;
    pub const RECEIVER_INDEX: Range<usize> = 4..8;
    pub const COUNTER: Range<usize> = 8..16;

    pub const TTL: usize = 0;
    pub const INNER_FLAGS: usize = 1;
    pub const SRC: Range<usize> = 2..8;
    pub const DST: Range<usize> = 8..14;
    pub const INNER_RESERVED: Range<usize> = 14..16;

    pub const REC_LEN: Range<usize> = 0..2;
    pub const REC_FLAGS: Range<usize> = 2..4;
    pub const UNIT_ID: Range<usize> = 4..8;
    pub const OFFSET: Range<usize> = 8..12;
    pub const TOTAL: Range<usize> = 12..16;
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
fn name48(b: &[u8]) -> PeerName {
    PeerName::from_mac([b[0], b[1], b[2], b[3], b[4], b[5]])
}

// ---------------------------------------------------------------------------
// Outer header

/// A view of the outer header at the start of a datagram.
#[derive(Debug, Clone)]
pub struct OuterPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> OuterPacket<T> {
    /// Wraps without checking; accessors panic if the buffer is shorter than
    /// [`OUTER_LEN`]. Use [`new_checked`](Self::new_checked) on untrusted bytes.
    pub const fn new_unchecked(buffer: T) -> Self {
        OuterPacket { buffer }
    }

    /// Wraps after checking the buffer holds a whole outer header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() < OUTER_LEN {
            Err(WireError::Truncated)
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::KIND]
    }
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::OUTER_FLAGS]
    }
    pub fn reserved(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::OUTER_RESERVED])
    }
    /// The data datagram says it is not sealed ([`OUTER_FLAG_UNSEALED`]).
    pub fn unsealed(&self) -> bool {
        self.flags() & OUTER_FLAG_UNSEALED != 0
    }
    /// The queue field (bytes 2..4, which were reserved before queues).
    pub fn queue(&self) -> u16 {
        self.reserved()
    }
    pub fn receiver_index(&self) -> u32 {
        be32(&self.buffer.as_ref()[field::RECEIVER_INDEX])
    }
    pub fn counter(&self) -> u64 {
        be64(&self.buffer.as_ref()[field::COUNTER])
    }
    /// The header bytes: the associated data of the AEAD.
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..OUTER_LEN]
    }
    /// Ciphertext ‖ tag.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[OUTER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> OuterPacket<T> {
    pub fn set_kind(&mut self, v: u8) {
        self.buffer.as_mut()[field::KIND] = v;
    }
    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::OUTER_FLAGS] = v;
    }
    pub fn set_reserved(&mut self, v: u16) {
        self.buffer.as_mut()[field::OUTER_RESERVED].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_queue(&mut self, v: u16) {
        self.set_reserved(v);
    }
    pub fn set_receiver_index(&mut self, v: u32) {
        self.buffer.as_mut()[field::RECEIVER_INDEX].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_counter(&mut self, v: u64) {
        self.buffer.as_mut()[field::COUNTER].copy_from_slice(&v.to_be_bytes());
    }
    /// Splits into (header, ciphertext ‖ tag) for in-place opening.
    pub fn split_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        self.buffer.as_mut().split_at_mut(OUTER_LEN)
    }
}

/// The outer header of a data datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterHeader {
    pub receiver_index: u32,
    pub counter: u64,
}

impl OuterHeader {
    /// Parses a checked view: kind must be data, flags zero, the queue below
    /// [`MAX_QUEUES`](crate::session::MAX_QUEUES) (read it with [`OuterPacket::queue`]).
    pub fn parse<T: AsRef<[u8]>>(p: &OuterPacket<T>) -> Result<Self, WireError> {
        match Self::parse_any(p)? {
            (KIND_DATA, h) => Ok(h),
            (kind, _) => Err(WireError::BadKind(kind)),
        }
    }

    /// Parses a checked view of a data or heartbeat datagram; returns its kind.
    /// Flags must be zero, or [`OUTER_FLAG_UNSEALED`] on a data datagram (read
    /// it with [`OuterPacket::unsealed`]; only the receiver decides whether to
    /// take it).
    pub fn parse_any<T: AsRef<[u8]>>(p: &OuterPacket<T>) -> Result<(u8, Self), WireError> {
        p.check_len()?;
        if p.kind() != KIND_DATA && p.kind() != KIND_HEARTBEAT {
            return Err(WireError::BadKind(p.kind()));
        }
        let flags_ok = p.flags() == 0 || (p.flags() == OUTER_FLAG_UNSEALED && p.kind() == KIND_DATA);
        if !flags_ok || p.queue() >= crate::session::MAX_QUEUES {
            return Err(WireError::Reserved);
        }
        Ok((p.kind(), OuterHeader { receiver_index: p.receiver_index(), counter: p.counter() }))
    }

    /// Writes every field of a data datagram's header (kind, zero flags and reserved included).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut OuterPacket<T>) {
        self.emit_kind(KIND_DATA, p);
    }

    /// Writes every field, with the given kind.
    pub fn emit_kind<T: AsRef<[u8]> + AsMut<[u8]>>(&self, kind: u8, p: &mut OuterPacket<T>) {
        p.set_kind(kind);
        p.set_flags(0);
        p.set_reserved(0);
        p.set_receiver_index(self.receiver_index);
        p.set_counter(self.counter);
    }

    pub fn to_bytes(&self) -> [u8; OUTER_LEN] {
        let mut b = [0u8; OUTER_LEN];
        self.emit(&mut OuterPacket::new_unchecked(&mut b[..]));
        b
    }
}

// ---------------------------------------------------------------------------
// Inner header

/// A view of the inner header at the start of a plaintext.
#[derive(Debug, Clone)]
pub struct InnerPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> InnerPacket<T> {
    /// Wraps without checking; accessors panic on a buffer shorter than [`INNER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        InnerPacket { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() < INNER_LEN {
            Err(WireError::Truncated)
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::INNER_FLAGS]
    }
    pub fn src(&self) -> PeerName {
        name48(&self.buffer.as_ref()[field::SRC])
    }
    pub fn dst(&self) -> PeerName {
        name48(&self.buffer.as_ref()[field::DST])
    }
    pub fn reserved(&self) -> u16 {
        be16(&self.buffer.as_ref()[field::INNER_RESERVED])
    }
    /// The records after the header.
    pub fn records(&self) -> &[u8] {
        &self.buffer.as_ref()[INNER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> InnerPacket<T> {
    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v;
    }
    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::INNER_FLAGS] = v;
    }
    pub fn set_src(&mut self, v: PeerName) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&v.to_mac());
    }
    pub fn set_dst(&mut self, v: PeerName) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&v.to_mac());
    }
    pub fn set_reserved(&mut self, v: u16) {
        self.buffer.as_mut()[field::INNER_RESERVED].copy_from_slice(&v.to_be_bytes());
    }
}

/// Who the units of a datagram are from and for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerHeader {
    /// Hops left; a relay decrements it and does not forward at 0.
    pub ttl: u8,
    /// The units are for every peer; `dst` is then [`PeerName::BROADCAST`].
    pub broadcast: bool,
    /// The peer whose TAP the units came from.
    pub src: PeerName,
    /// The peer the units are for ([`PeerName::BROADCAST`] when broadcast).
    pub dst: PeerName,
}

impl InnerHeader {
    /// Parses a checked view. Rejects reserved bits, a zero `src`, and a `dst`
    /// that disagrees with the BROADCAST flag.
    pub fn parse<T: AsRef<[u8]>>(p: &InnerPacket<T>) -> Result<Self, WireError> {
        p.check_len()?;
        if p.flags() & !INNER_FLAG_BROADCAST != 0 || p.reserved() != 0 {
            return Err(WireError::Reserved);
        }
        let hdr = InnerHeader {
            ttl: p.ttl(),
            broadcast: p.flags() & INNER_FLAG_BROADCAST != 0,
            src: p.src(),
            dst: p.dst(),
        };
        if !hdr.is_consistent() {
            return Err(WireError::BadAddress);
        }
        Ok(hdr)
    }

    /// Whether [`parse`](Self::parse) would accept this header once emitted.
    pub fn is_consistent(&self) -> bool {
        let src = PeerName::from_mac(self.src.to_mac());
        let dst = PeerName::from_mac(self.dst.to_mac());
        src != PeerName::BROADCAST && (dst == PeerName::BROADCAST) == self.broadcast
    }

    /// Writes every field; names are truncated to their 48 bits.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut InnerPacket<T>) {
        p.set_ttl(self.ttl);
        p.set_flags(if self.broadcast { INNER_FLAG_BROADCAST } else { 0 });
        p.set_src(self.src);
        p.set_dst(self.dst);
        p.set_reserved(0);
    }

    pub fn to_bytes(&self) -> [u8; INNER_LEN] {
        let mut b = [0u8; INNER_LEN];
        self.emit(&mut InnerPacket::new_unchecked(&mut b[..]));
        b
    }
}

// ---------------------------------------------------------------------------
// Records

/// One record of a plaintext, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A whole unit.
    Whole(&'a [u8]),
    /// `data` is bytes `offset..offset + data.len()` of unit `unit_id`, `total` bytes long.
    Chunk { unit_id: u32, offset: u32, total: u32, data: &'a [u8] },
}

impl<'a> Record<'a> {
    pub fn data(&self) -> &'a [u8] {
        match *self {
            Record::Whole(d) => d,
            Record::Chunk { data, .. } => data,
        }
    }

    /// Bytes this record takes on the wire, header included.
    pub fn wire_len(&self) -> usize {
        match self {
            Record::Whole(d) => RECORD_HDR_LEN + d.len(),
            Record::Chunk { data, .. } => CHUNK_HDR_LEN + data.len(),
        }
    }

    /// The header to emit before this record's payload.
    pub fn header(&self) -> RecordHeader {
        match *self {
            Record::Whole(d) => RecordHeader::Whole { len: d.len() as u16 },
            Record::Chunk { unit_id, offset, total, data } => {
                RecordHeader::Chunk { len: data.len() as u16, unit_id, offset, total }
            }
        }
    }
}

/// A record header, for emitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordHeader {
    Whole { len: u16 },
    Chunk { len: u16, unit_id: u32, offset: u32, total: u32 },
}

impl RecordHeader {
    pub fn header_len(&self) -> usize {
        match self {
            RecordHeader::Whole { .. } => RECORD_HDR_LEN,
            RecordHeader::Chunk { .. } => CHUNK_HDR_LEN,
        }
    }

    /// Writes the header at the start of `buf` and returns its length.
    ///
    /// # Panics
    /// If `buf` is shorter than [`header_len`](Self::header_len) (a caller bug).
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        match *self {
            RecordHeader::Whole { len } => {
                buf[field::REC_LEN].copy_from_slice(&len.to_be_bytes());
                buf[field::REC_FLAGS].copy_from_slice(&0u16.to_be_bytes());
                RECORD_HDR_LEN
            }
            RecordHeader::Chunk { len, unit_id, offset, total } => {
                buf[field::REC_LEN].copy_from_slice(&len.to_be_bytes());
                buf[field::REC_FLAGS].copy_from_slice(&RECORD_FLAG_CHUNK.to_be_bytes());
                buf[field::UNIT_ID].copy_from_slice(&unit_id.to_be_bytes());
                buf[field::OFFSET].copy_from_slice(&offset.to_be_bytes());
                buf[field::TOTAL].copy_from_slice(&total.to_be_bytes());
                CHUNK_HDR_LEN
            }
        }
    }
}

/// Parses the record at the start of `buf`; returns it and the bytes after it.
pub fn parse_record(buf: &[u8]) -> Result<(Record<'_>, &[u8]), WireError> {
    if buf.len() < RECORD_HDR_LEN {
        return Err(WireError::Truncated);
    }
    let len = be16(&buf[field::REC_LEN]) as usize;
    let flags = be16(&buf[field::REC_FLAGS]);
    if flags & !RECORD_FLAG_CHUNK != 0 {
        return Err(WireError::Reserved);
    }
    if len == 0 {
        return Err(WireError::EmptyRecord);
    }
    let chunk = flags & RECORD_FLAG_CHUNK != 0;
    let hdr_len = if chunk { CHUNK_HDR_LEN } else { RECORD_HDR_LEN };
    if buf.len() < hdr_len {
        return Err(WireError::Truncated);
    }
    let end = hdr_len + len;
    if end > buf.len() {
        return Err(WireError::RecordPastEnd);
    }
    let data = &buf[hdr_len..end];
    let rec = if chunk {
        let unit_id = be32(&buf[field::UNIT_ID]);
        let offset = be32(&buf[field::OFFSET]);
        let total = be32(&buf[field::TOTAL]);
        if total as usize > MAX_UNIT {
            return Err(WireError::UnitTooLarge(total));
        }
        if offset as u64 + len as u64 > total as u64 {
            return Err(WireError::ChunkOutOfBounds);
        }
        Record::Chunk { unit_id, offset, total, data }
    } else {
        Record::Whole(data)
    };
    Ok((rec, &buf[end..]))
}

/// The records of a plaintext, in order. After the first error it yields nothing.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Records<'a> {
    /// Iterates the records laid back to back in `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Records { rest: buf }
    }

    /// The bytes not yet parsed.
    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }

    /// Checks every record without consuming `self`; returns how many there are.
    pub fn validate(&self) -> Result<usize, WireError> {
        let mut n = 0;
        for r in self.clone() {
            r?;
            n += 1;
        }
        Ok(n)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match parse_record(self.rest) {
            Ok((rec, rest)) => {
                self.rest = rest;
                Some(Ok(rec))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

impl FusedIterator for Records<'_> {}

// ---------------------------------------------------------------------------
// Heartbeat

/// The plaintext of a heartbeat datagram (outer kind [`KIND_HEARTBEAT`]),
/// sealed under the same session as data:
///
/// ```text
///   0..2  u16  heard: the largest heartbeat datagram (UDP payload bytes) the
///              sender received from the receiver recently; 0 = none
///   2..4  u16  reserved, 0
///   4..8  u32  seq: the sender's heartbeat round
///   then padding up to the probed datagram size (content ignored)
/// ```
///
/// Heartbeats of several sizes probe the path MTU: what arrives is reported
/// back in `heard`, and that is the largest datagram the receiver will be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub heard: u16,
    pub seq: u32,
}

impl Heartbeat {
    /// Parses a heartbeat plaintext (padding included).
    pub fn parse(plain: &[u8]) -> Result<Self, WireError> {
        if plain.len() < HEARTBEAT_LEN {
            return Err(WireError::Truncated);
        }
        if be16(&plain[2..4]) != 0 {
            return Err(WireError::Reserved);
        }
        Ok(Heartbeat { heard: be16(&plain[0..2]), seq: be32(&plain[4..8]) })
    }

    pub fn to_bytes(&self) -> [u8; HEARTBEAT_LEN] {
        let mut b = [0u8; HEARTBEAT_LEN];
        b[0..2].copy_from_slice(&self.heard.to_be_bytes());
        b[4..8].copy_from_slice(&self.seq.to_be_bytes());
        b
    }
}

/// Parses a decrypted plaintext: the inner header, and an iterator over its
/// records. A plaintext with no records is valid (it carries nothing).
pub fn parse_plaintext(buf: &[u8]) -> Result<(InnerHeader, Records<'_>), WireError> {
    let p = InnerPacket::new_checked(buf)?;
    let hdr = InnerHeader::parse(&p)?;
    Ok((hdr, Records::new(&buf[INNER_LEN..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> InnerHeader {
        InnerHeader { ttl: 3, broadcast: false, src: PeerName(0x0211_2233_4455), dst: PeerName(0x02aa_bbcc_ddee) }
    }

    fn plaintext(h: &InnerHeader, recs: &[Record<'_>]) -> Vec<u8> {
        let mut v = h.to_bytes().to_vec();
        for r in recs {
            let mut rh = [0u8; CHUNK_HDR_LEN];
            let n = r.header().emit(&mut rh);
            v.extend_from_slice(&rh[..n]);
            v.extend_from_slice(r.data());
        }
        v
    }

    #[test]
    fn heartbeat_round_trips_and_rejects_reserved() {
        let hb = Heartbeat { heard: 1472, seq: 0xdead_beef };
        let mut b = hb.to_bytes().to_vec();
        b.extend_from_slice(&[0xaa; 100]);
        assert_eq!(Heartbeat::parse(&b), Ok(hb));
        assert_eq!(Heartbeat::parse(&b[..HEARTBEAT_LEN - 1]), Err(WireError::Truncated));
        b[3] = 1;
        assert_eq!(Heartbeat::parse(&b), Err(WireError::Reserved));
        let mut outer = OuterHeader { receiver_index: 7, counter: 9 }.to_bytes();
        assert_eq!(OuterHeader::parse(&OuterPacket::new_unchecked(&outer[..])).map(|h| h.counter), Ok(9));
        OuterHeader { receiver_index: 7, counter: 9 }.emit_kind(KIND_HEARTBEAT, &mut OuterPacket::new_unchecked(&mut outer[..]));
        let p = OuterPacket::new_unchecked(&outer[..]);
        assert_eq!(OuterHeader::parse(&p), Err(WireError::BadKind(KIND_HEARTBEAT)));
        assert_eq!(OuterHeader::parse_any(&p).map(|(k, h)| (k, h.receiver_index)), Ok((KIND_HEARTBEAT, 7)));
    }

    #[test]
    fn outer_round_trip() {
        let h = OuterHeader { receiver_index: 0xdead_beef, counter: 0x0102_0304_0506_0708 };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8]);
        let p = OuterPacket::new_checked(&b[..]).unwrap();
        assert_eq!(OuterHeader::parse(&p).unwrap(), h);
        assert_eq!(p.header(), &b[..]);
        assert!(p.payload().is_empty());
    }

    #[test]
    fn outer_rejects_malformed() {
        let b = OuterHeader { receiver_index: 1, counter: 2 }.to_bytes();
        for n in 0..OUTER_LEN {
            assert_eq!(OuterPacket::new_checked(&b[..n]).unwrap_err(), WireError::Truncated, "{n}");
        }
        for kind in [0u8, 2, 0x81, 0xff] {
            let mut x = b;
            x[0] = kind;
            let p = OuterPacket::new_checked(&x[..]).unwrap();
            assert_eq!(OuterHeader::parse(&p), Err(WireError::BadKind(kind)));
        }
        for bit in 1..8 {
            let mut x = b;
            x[1] |= 1 << bit;
            let p = OuterPacket::new_checked(&x[..]).unwrap();
            assert_eq!(OuterHeader::parse(&p), Err(WireError::Reserved), "flags bit {bit}");
            x[1] |= OUTER_FLAG_UNSEALED;
            let p = OuterPacket::new_checked(&x[..]).unwrap();
            assert_eq!(OuterHeader::parse(&p), Err(WireError::Reserved), "flags bit {bit} with UNSEALED");
        }
        // UNSEALED parses on data (the receiver decides), never on a heartbeat.
        let mut x = b;
        x[1] = OUTER_FLAG_UNSEALED;
        let p = OuterPacket::new_checked(&x[..]).unwrap();
        assert_eq!(OuterHeader::parse(&p), Ok(OuterHeader { receiver_index: 1, counter: 2 }));
        assert!(p.unsealed());
        x[0] = KIND_HEARTBEAT;
        let p = OuterPacket::new_checked(&x[..]).unwrap();
        assert_eq!(OuterHeader::parse_any(&p), Err(WireError::Reserved));
        // The queue field: below MAX_QUEUES is taken, from it on refused.
        for q in [1u16, 63, 64, 0x100, 0xffff] {
            let mut x = b;
            x[2..4].copy_from_slice(&q.to_be_bytes());
            let p = OuterPacket::new_checked(&x[..]).unwrap();
            let want = if q < crate::session::MAX_QUEUES { Ok(OuterHeader { receiver_index: 1, counter: 2 }) } else { Err(WireError::Reserved) };
            assert_eq!(OuterHeader::parse(&p), want, "queue {q}");
            assert_eq!(p.queue(), q);
        }
    }

    #[test]
    fn inner_round_trip() {
        for h in [
            hdr(),
            InnerHeader { ttl: 0, broadcast: true, src: PeerName(0xffff_ffff_ffff), dst: PeerName::BROADCAST },
        ] {
            let b = h.to_bytes();
            let (p, mut recs) = parse_plaintext(&b).unwrap();
            assert_eq!(p, h);
            assert!(recs.next().is_none());
        }
        let b = hdr().to_bytes();
        assert_eq!(b, [3, 0, 0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0, 0]);
    }

    #[test]
    fn inner_rejects_malformed() {
        let b = hdr().to_bytes();
        for n in 0..INNER_LEN {
            assert_eq!(parse_plaintext(&b[..n]).unwrap_err(), WireError::Truncated, "{n}");
        }
        for bit in 1..8 {
            let mut x = b;
            x[1] |= 1 << bit;
            assert_eq!(parse_plaintext(&x).unwrap_err(), WireError::Reserved);
        }
        for i in 14..16 {
            let mut x = b;
            x[i] = 0x80;
            assert_eq!(parse_plaintext(&x).unwrap_err(), WireError::Reserved);
        }
        // Broadcast flag with a destination.
        let mut x = b;
        x[1] = INNER_FLAG_BROADCAST;
        assert_eq!(parse_plaintext(&x).unwrap_err(), WireError::BadAddress);
        // Unicast to nobody.
        let x = InnerHeader { dst: PeerName::BROADCAST, ..hdr() }.to_bytes();
        assert_eq!(parse_plaintext(&x).unwrap_err(), WireError::BadAddress);
        // From nobody.
        let x = InnerHeader { src: PeerName::BROADCAST, ..hdr() }.to_bytes();
        assert_eq!(parse_plaintext(&x).unwrap_err(), WireError::BadAddress);
        assert!(!InnerHeader { src: PeerName(1 << 48), ..hdr() }.is_consistent());
    }

    #[test]
    fn records_round_trip() {
        let big = vec![0xabu8; 1400];
        let recs = [
            Record::Whole(b"a"),
            Record::Chunk { unit_id: 7, offset: 0, total: 65_000, data: &big },
            Record::Whole(&big[..1000]),
            Record::Chunk { unit_id: u32::MAX, offset: MAX_UNIT as u32 - 1, total: MAX_UNIT as u32, data: b"z" },
        ];
        let pt = plaintext(&hdr(), &recs);
        let (h, it) = parse_plaintext(&pt).unwrap();
        assert_eq!(h, hdr());
        assert_eq!(it.validate(), Ok(4));
        let got: Vec<_> = it.map(|r| r.unwrap()).collect();
        assert_eq!(got, recs);
        assert_eq!(pt.len(), INNER_LEN + recs.iter().map(Record::wire_len).sum::<usize>());
    }

    #[test]
    fn record_wire_layout() {
        let pt = plaintext(&hdr(), &[Record::Chunk { unit_id: 0x0a0b0c0d, offset: 2, total: 9, data: b"xyz" }]);
        assert_eq!(&pt[INNER_LEN..], &[0, 3, 0, 1, 0xa, 0xb, 0xc, 0xd, 0, 0, 0, 2, 0, 0, 0, 9, b'x', b'y', b'z']);
        let pt = plaintext(&hdr(), &[Record::Whole(b"hi")]);
        assert_eq!(&pt[INNER_LEN..], &[0, 2, 0, 0, b'h', b'i']);
    }

    fn first_error(pt: &[u8]) -> Option<WireError> {
        let (_, recs) = parse_plaintext(pt).ok()?;
        recs.filter_map(Result::err).next()
    }

    #[test]
    fn every_truncation_of_a_record_list_is_rejected() {
        let big = vec![1u8; 300];
        let pt = plaintext(
            &hdr(),
            &[
                Record::Whole(b"abc"),
                Record::Chunk { unit_id: 1, offset: 300, total: 600, data: &big },
                Record::Whole(&big[..17]),
            ],
        );
        // Record boundaries: cutting exactly there leaves a valid shorter list.
        let boundaries = [INNER_LEN, INNER_LEN + 7, INNER_LEN + 7 + 316, pt.len()];
        for n in INNER_LEN..=pt.len() {
            let (_, recs) = parse_plaintext(&pt[..n]).unwrap();
            let res = recs.validate();
            if boundaries.contains(&n) {
                assert!(res.is_ok(), "cut at {n}: {res:?}");
            } else {
                let e = res.unwrap_err();
                assert!(matches!(e, WireError::Truncated | WireError::RecordPastEnd), "cut at {n}: {e:?}");
            }
        }
    }

    #[test]
    fn malformed_records_rejected() {
        let base = hdr().to_bytes().to_vec();
        let with = |rec: &[u8]| {
            let mut v = base.clone();
            v.extend_from_slice(rec);
            v
        };
        // len 0
        assert_eq!(first_error(&with(&[0, 0, 0, 0])), Some(WireError::EmptyRecord));
        assert_eq!(first_error(&with(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])), Some(WireError::EmptyRecord));
        // reserved record flags
        for bit in 1..16 {
            let f = (1u16 << bit).to_be_bytes();
            assert_eq!(first_error(&with(&[0, 1, f[0], f[1], b'x'])), Some(WireError::Reserved), "bit {bit}");
        }
        // len past the end
        assert_eq!(first_error(&with(&[0, 2, 0, 0, b'x'])), Some(WireError::RecordPastEnd));
        assert_eq!(first_error(&with(&[0xff, 0xff, 0, 0, b'x'])), Some(WireError::RecordPastEnd));
        // chunk header cut short
        assert_eq!(first_error(&with(&[0, 1, 0, 1, 0, 0, 0, 0, 0, 0])), Some(WireError::Truncated));
        let chunk = |offset: u32, total: u32, len: u16| {
            let mut r = vec![0u8; CHUNK_HDR_LEN];
            RecordHeader::Chunk { len, unit_id: 9, offset, total }.emit(&mut r);
            r.resize(CHUNK_HDR_LEN + len as usize, 0);
            with(&r)
        };
        assert_eq!(first_error(&chunk(0, 10, 10)), None);
        assert_eq!(first_error(&chunk(1, 10, 10)), Some(WireError::ChunkOutOfBounds));
        assert_eq!(first_error(&chunk(0, 0, 1)), Some(WireError::ChunkOutOfBounds));
        assert_eq!(first_error(&chunk(u32::MAX, 100, 1)), Some(WireError::ChunkOutOfBounds));
        assert_eq!(first_error(&chunk(MAX_UNIT as u32, MAX_UNIT as u32, 1)), Some(WireError::ChunkOutOfBounds));
        assert_eq!(first_error(&chunk(0, MAX_UNIT as u32 + 1, 1)), Some(WireError::UnitTooLarge(MAX_UNIT as u32 + 1)));
        assert_eq!(first_error(&chunk(u32::MAX - 1, u32::MAX, 1)), Some(WireError::UnitTooLarge(u32::MAX)));
        // A bad record after good ones is still reported, and ends iteration.
        let mut v = with(&[0, 1, 0, 0, b'a']);
        v.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, b'b']);
        let (_, mut it) = parse_plaintext(&v).unwrap();
        assert_eq!(it.next(), Some(Ok(Record::Whole(b"a"))));
        assert_eq!(it.next(), Some(Err(WireError::EmptyRecord)));
        assert_eq!(it.next(), None);
    }

    /// Deterministic fuzzing: random and mutated plaintexts never panic, and
    /// every record yielded lies inside the input and within its bounds.
    #[test]
    fn random_plaintexts_never_panic() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        let big = vec![9u8; 2000];
        let seed = plaintext(
            &hdr(),
            &[
                Record::Whole(b"abc"),
                Record::Chunk { unit_id: 1, offset: 5, total: 3000, data: &big[..1200] },
                Record::Whole(&big[..40]),
            ],
        );
        let mut buf = Vec::new();
        for i in 0..100_000 {
            buf.clear();
            if i % 2 == 0 {
                let n = rng.below(200);
                buf.extend((0..n).map(|_| rng.next() as u8));
                if i % 4 == 0 && buf.len() >= INNER_LEN {
                    buf[..INNER_LEN].copy_from_slice(&hdr().to_bytes());
                }
            } else {
                buf.extend_from_slice(&seed);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(buf.len());
                    match rng.below(3) {
                        0 => buf[at] ^= 1 << rng.below(8),
                        1 => buf[at] = rng.next() as u8,
                        _ => buf.truncate(at),
                    }
                    if buf.is_empty() {
                        break;
                    }
                }
            }
            if let Ok((_, recs)) = parse_plaintext(&buf) {
                for r in recs {
                    match r {
                        Ok(Record::Whole(d)) => assert!(!d.is_empty() && d.len() <= buf.len()),
                        Ok(Record::Chunk { offset, total, data, .. }) => {
                            assert!(!data.is_empty());
                            assert!(offset as usize + data.len() <= total as usize);
                            assert!(total as usize <= MAX_UNIT);
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// A tiny deterministic PRNG for tests (xorshift64).
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        /// Uniform-ish in `0..n` (n > 0).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }
}
