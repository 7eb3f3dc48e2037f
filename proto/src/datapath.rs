//! The data plane: units in, sealed datagrams out, and back.
//!
//! A *unit* is what the router reads from its TAP (a `virtio_net_hdr` and an
//! Ethernet frame, up to [`MAX_UNIT`] bytes with TSO). The sending side is an
//! [`Encoder`] writing into a reused [`TxBatch`] under a [`TxSession`]; the
//! receiving side is a [`Receiver`] holding the sessions peers opened towards us.
//! The wire format is described in [`crate::wire::datagram`].
//!
//! Sending, per next hop and inner header: [`Encoder::begin`], then
//! [`Encoder::push`] each unit, then [`Encoder::finish`].
//! - Units that fit are packed whole, several to a datagram, in order.
//! - A unit too big for one datagram is cut into chunk records, one per
//!   datagram, every datagram of it exactly `max_datagram` bytes except the
//!   last, so [`TxBatch::runs`] hands the whole unit to one UDP GSO send.
//! - Each datagram is sealed in place: the unit is copied once, into the batch.
//!
//! Receiving: [`Receiver::receive`] authenticates and decrypts a datagram in
//! place and hands out units: whole records straight from the datagram, chunked
//! units once every byte arrived, from a per-session reassembly slot.
//! - A datagram is delivered all or nothing: its records are validated before
//!   any is delivered.
//! - Each session has [`REASSEMBLY_SLOTS`] slots whose buffers are allocated on
//!   first use and then reused. A chunk of a new unit takes a free slot or
//!   evicts the oldest partial unit (that unit is lost, not the stream).
//! - Received bytes are counted with a per-slot bitmap, so duplicate or
//!   overlapping chunks can never complete a unit that still has holes.
//! - Partial units older than [`REASSEMBLY_TIMEOUT_MS`] are dropped by
//!   [`Receiver::expire`].
//!
//! Nothing here allocates per datagram once buffers have grown to their
//! working size, takes a lock, or performs I/O; time is passed in.

use std::collections::HashMap;

use crate::peer::PeerName;
use crate::session::{OpenKey, SealKey, SessionError, KEY_LEN};
use crate::wire::datagram::{
    parse_plaintext, Heartbeat, InnerHeader, OuterHeader, OuterPacket, Record, RecordHeader, WireError, CHUNK_HDR_LEN,
    HEARTBEAT_LEN, INNER_LEN, KIND_HEARTBEAT, MAX_UNIT, OUTER_LEN, OVERHEAD, RECORD_HDR_LEN,
};

/// Smallest `max_datagram` an [`Encoder`] accepts.
pub const MIN_DATAGRAM: usize = 128;
/// Largest `max_datagram`: the largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// Partial chunked units kept per session.
pub const REASSEMBLY_SLOTS: usize = 8;
/// Partial units older than this are dropped by [`Receiver::expire`].
pub const REASSEMBLY_TIMEOUT_MS: u64 = 500;
/// A partial unit this old is given up by [`Receiver::salvage_older_than`]'s
/// usual caller: its chunks travel together, so one this late is lost, and
/// waiting longer only stalls the flow (the sender may have nothing more to send
/// until the segments in it are acknowledged).
pub const SALVAGE_AGE_MS: u64 = 10;
/// A partial unit overtaken by this many newer units of its session that
/// completed is given up (and offered for salvage): chunks of one unit travel
/// together and in order, so it has almost surely lost one. Fewer overtakings
/// are tolerated as reordering.
pub const SALVAGE_AFTER: u8 = 3;
/// Unit ids of recently finished or dropped units remembered per session, so
/// their late chunks do not start (and evict for) a unit that cannot complete.
const RETIRED_IDS: usize = 32;

/// Why encoding or receiving failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatapathError {
    #[error("datagram shorter than its headers and tag")]
    TooShort,
    #[error("not a data datagram")]
    BadKind,
    #[error("no session with receiver index {0}")]
    UnknownSession(u32),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("unit of {0} bytes exceeds the maximum of {MAX_UNIT}")]
    UnitTooLarge(usize),
    #[error("empty unit")]
    EmptyUnit,
    #[error("push or finish without begin")]
    NotBegun,
    #[error("unsealed datagram not taken (sender not trusted both ways from this address, relay session, or broadcast)")]
    UnsealedRefused,
}

// ---------------------------------------------------------------------------
// Sending

/// Sealed datagrams back to back in one reused buffer.
#[derive(Debug, Default)]
pub struct TxBatch {
    buf: Vec<u8>,
    /// End offset in `buf` of each sealed datagram.
    ends: Vec<usize>,
    /// Start of the datagram being filled, not yet sealed. Its bytes sit in
    /// `buf` after the last end and are never handed out.
    open: Option<usize>,
}

impl TxBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch that holds `bytes` of datagrams, `datagrams` of them, before growing.
    pub fn with_capacity(bytes: usize, datagrams: usize) -> Self {
        TxBatch { buf: Vec::with_capacity(bytes), ends: Vec::with_capacity(datagrams), open: None }
    }

    /// Empties the batch, keeping its memory. Discards a datagram still open.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
        self.open = None;
    }

    /// Keeps the first `n` sealed datagrams, dropping the later ones and a
    /// datagram still open.
    pub fn truncate(&mut self, n: usize) {
        if n < self.ends.len() {
            self.ends.truncate(n);
        }
        self.buf.truncate(self.ends.last().copied().unwrap_or(0));
        self.open = None;
    }

    /// Whether no sealed datagram is in the batch.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn datagram_count(&self) -> usize {
        self.ends.len()
    }

    /// Bytes of sealed datagrams.
    pub fn len_bytes(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn bounds(&self, i: usize) -> (usize, usize) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (start, self.ends[i])
    }

    /// The `i`th sealed datagram.
    pub fn datagram(&self, i: usize) -> Option<&[u8]> {
        (i < self.ends.len()).then(|| {
            let (s, e) = self.bounds(i);
            &self.buf[s..e]
        })
    }

    /// Every sealed datagram, in order (for senders without GSO).
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.ends.len()).map(|i| {
            let (s, e) = self.bounds(i);
            &self.buf[s..e]
        })
    }

    /// Runs of consecutive datagrams of equal size (the last of a run may be
    /// shorter), at most `max_segments` per run: (bytes of the run, segment
    /// size). Feed each to one GSO send.
    pub fn runs(&self, max_segments: usize) -> impl Iterator<Item = (&[u8], usize)> + '_ {
        self.runs_within(max_segments, usize::MAX)
    }

    /// Like [`runs`](Self::runs), also keeping each run within `max_bytes`
    /// (Linux refuses a GSO send over 64 KiB; a single datagram is always a run).
    pub fn runs_within(&self, max_segments: usize, max_bytes: usize) -> Runs<'_> {
        self.runs_in(0..self.ends.len(), max_segments, max_bytes)
    }

    /// Like [`runs_within`](Self::runs_within), over the datagrams numbered
    /// `range` only (one destination's share of a batch holding several).
    pub fn runs_in(&self, range: std::ops::Range<usize>, max_segments: usize, max_bytes: usize) -> Runs<'_> {
        let end = range.end.min(self.ends.len());
        Runs { batch: self, next: range.start, end, max_segments: max_segments.max(1), max_bytes }
    }
}

/// Iterator returned by [`TxBatch::runs_within`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    batch: &'a TxBatch,
    next: usize,
    end: usize,
    max_segments: usize,
    max_bytes: usize,
}

impl<'a> Iterator for Runs<'a> {
    type Item = (&'a [u8], usize);

    fn next(&mut self) -> Option<Self::Item> {
        let ends = &self.batch.ends[..self.end];
        if self.next >= ends.len() {
            return None;
        }
        let (start, mut end) = self.batch.bounds(self.next);
        let seg = end - start;
        let mut i = self.next + 1;
        while i < ends.len() && i - self.next < self.max_segments {
            let size = ends[i] - ends[i - 1];
            if size > seg || ends[i] - start > self.max_bytes {
                break;
            }
            end = ends[i];
            i += 1;
            if size < seg {
                break;
            }
        }
        self.next = i;
        Some((&self.batch.buf[start..end], seg))
    }
}

/// The sending side of one session: the peer's receiver index, our seal key,
/// and the ids given to chunked units.
#[derive(Debug)]
pub struct TxSession {
    receiver_index: u32,
    key: SealKey,
    next_unit_id: u32,
    /// The queue field of every datagram sealed (0: a single-queue sender).
    queue: u16,
}

impl TxSession {
    pub fn new(receiver_index: u32, key: &[u8; KEY_LEN]) -> Self {
        TxSession { receiver_index, key: SealKey::new(key), next_unit_id: 0, queue: 0 }
    }

    /// Queue `queue`'s session of a multi-queue sender towards a peer that
    /// takes queues: its own key ([`crate::session::queue_key`]) and so its
    /// own counter space, and the queue in every datagram's outer header.
    pub fn on_queue(receiver_index: u32, key: &[u8; KEY_LEN], queue: u16) -> Self {
        let mut k = crate::session::queue_key(key, queue);
        let s = TxSession { receiver_index, key: SealKey::new(&k), next_unit_id: 0, queue };
        crate::rekey::erase(&mut k);
        s
    }

    /// Queue `queue`'s session of a multi-queue sender towards a peer that
    /// opens one counter space only (no `CAP_MULTIQUEUE`): queue field 0, the
    /// key itself, counters from `counter`, shared by every queue's copy, and
    /// chunked units numbered apart per queue (top byte).
    pub fn shared(receiver_index: u32, key: &[u8; KEY_LEN], counter: std::sync::Arc<std::sync::atomic::AtomicU64>, queue: u16) -> Self {
        TxSession { receiver_index, key: SealKey::shared(key, counter), next_unit_id: (queue as u32) << 24, queue: 0 }
    }

    /// The queue field this session writes.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    #[cfg(test)]
    fn with_seal_key(receiver_index: u32, key: SealKey) -> Self {
        TxSession { receiver_index, key, next_unit_id: 0, queue: 0 }
    }

    /// The index the receiving peer chose for this session.
    pub fn receiver_index(&self) -> u32 {
        self.receiver_index
    }

    /// How many more datagrams this session may seal before it must be rekeyed.
    pub fn remaining(&self) -> u64 {
        self.key.remaining()
    }
}

/// Packs units into sealed datagrams of at most `max_datagram` bytes.
#[derive(Debug)]
pub struct Encoder {
    max_datagram: usize,
    /// The inner header of the current `begin`, already encoded.
    inner: Option<[u8; INNER_LEN]>,
    /// The current `begin`'s datagrams go unsealed ([`Encoder::begin_as`]).
    unsealed: bool,
}

impl Encoder {
    /// # Panics
    /// If `max_datagram` is outside [`MIN_DATAGRAM`]..=[`MAX_DATAGRAM`].
    pub fn new(max_datagram: usize) -> Self {
        assert_datagram_size(max_datagram);
        Encoder { max_datagram, inner: None, unsealed: false }
    }

    pub fn max_datagram(&self) -> usize {
        self.max_datagram
    }

    /// Changes the datagram size for datagrams opened from now on; call it
    /// between `finish` and `begin`.
    ///
    /// # Panics
    /// If `n` is outside [`MIN_DATAGRAM`]..=[`MAX_DATAGRAM`].
    pub fn set_max_datagram(&mut self, n: usize) {
        assert_datagram_size(n);
        self.max_datagram = n;
    }

    /// The largest unit that travels whole (unchunked) in one datagram.
    pub fn max_whole_unit(&self) -> usize {
        self.max_datagram - OVERHEAD - RECORD_HDR_LEN
    }

    /// Payload bytes of each chunk of a unit too big to travel whole.
    pub fn chunk_payload(&self) -> usize {
        self.max_datagram - OVERHEAD - CHUNK_HDR_LEN
    }

    /// Starts datagrams for one next hop with this inner header. A datagram left
    /// open by an earlier `begin` without `finish` is discarded, unsent.
    pub fn begin(&mut self, session: &mut TxSession, hdr: InnerHeader, batch: &mut TxBatch) {
        self.begin_as(session, hdr, batch, false);
    }

    /// [`begin`](Self::begin), with this `begin`'s datagrams left unsealed
    /// (flag [`OUTER_FLAG_UNSEALED`](crate::wire::datagram::OUTER_FLAG_UNSEALED),
    /// zero tag; counters still taken from the session) when `unsealed`: for a
    /// direct peer trusted both ways (`trusted (userspace)`), never broadcast
    /// or relayed units (the receiver refuses those).
    pub fn begin_as(&mut self, session: &mut TxSession, hdr: InnerHeader, batch: &mut TxBatch, unsealed: bool) {
        let _ = session;
        debug_assert!(hdr.is_consistent(), "receivers reject this inner header: {hdr:?}");
        if let Some(start) = batch.open.take() {
            batch.buf.truncate(start);
        }
        self.inner = Some(hdr.to_bytes());
        self.unsealed = unsealed && !hdr.broadcast;
    }

    /// Adds one unit: packed whole into the open datagram (sealing it first if
    /// the unit does not fit), or, if too big for any datagram, chunked into
    /// datagrams of their own. On error the open datagram is discarded, and a
    /// chunked unit is either sent whole or not at all.
    pub fn push(&mut self, session: &mut TxSession, unit: &[u8], batch: &mut TxBatch) -> Result<(), DatapathError> {
        let inner = self.inner.ok_or(DatapathError::NotBegun)?;
        if unit.is_empty() {
            return Err(DatapathError::EmptyUnit);
        }
        if unit.len() > MAX_UNIT {
            return Err(DatapathError::UnitTooLarge(unit.len()));
        }
        if unit.len() <= self.max_whole_unit() {
            if let Some(start) = batch.open {
                let used = batch.buf.len() - start;
                if used + RECORD_HDR_LEN + unit.len() + crate::session::TAG_LEN > self.max_datagram {
                    seal_open(session, batch, self.unsealed)?;
                }
            }
            if batch.open.is_none() {
                open_datagram(batch, &inner);
            }
            let mut rh = [0u8; RECORD_HDR_LEN];
            RecordHeader::Whole { len: unit.len() as u16 }.emit(&mut rh);
            batch.buf.extend_from_slice(&rh);
            batch.buf.extend_from_slice(unit);
            return Ok(());
        }

        if batch.open.is_some() {
            seal_open(session, batch, self.unsealed)?;
        }
        let chunk = self.chunk_payload();
        let pieces = unit.len().div_ceil(chunk);
        if session.key.remaining() < pieces as u64 {
            return Err(SessionError::CounterExhausted.into());
        }
        let unit_id = session.next_unit_id;
        session.next_unit_id = unit_id.wrapping_add(1);
        for (i, piece) in unit.chunks(chunk).enumerate() {
            open_datagram(batch, &inner);
            let mut rh = [0u8; CHUNK_HDR_LEN];
            RecordHeader::Chunk {
                len: piece.len() as u16,
                unit_id,
                offset: (i * chunk) as u32,
                total: unit.len() as u32,
            }
            .emit(&mut rh);
            batch.buf.extend_from_slice(&rh);
            batch.buf.extend_from_slice(piece);
            seal_open(session, batch, self.unsealed)?;
        }
        Ok(())
    }

    /// Seals the open datagram, if any, and ends this `begin`.
    pub fn finish(&mut self, session: &mut TxSession, batch: &mut TxBatch) -> Result<(), DatapathError> {
        self.inner.take().ok_or(DatapathError::NotBegun)?;
        if batch.open.is_some() {
            seal_open(session, batch, self.unsealed)?;
        }
        Ok(())
    }
}

/// Smallest heartbeat datagram.
pub const MIN_HEARTBEAT: usize = OUTER_LEN + HEARTBEAT_LEN + crate::session::TAG_LEN;

/// Appends one sealed heartbeat datagram of exactly `size` bytes (padded with
/// zeros) to `batch`. Call it outside an [`Encoder`]'s `begin`..`finish`.
pub fn seal_heartbeat(
    session: &mut TxSession,
    hb: Heartbeat,
    size: usize,
    batch: &mut TxBatch,
) -> Result<(), DatapathError> {
    assert!((MIN_HEARTBEAT..=MAX_DATAGRAM).contains(&size), "heartbeat of {size} bytes");
    if let Some(start) = batch.open.take() {
        batch.buf.truncate(start);
    }
    let start = batch.buf.len();
    batch.buf.resize(start + size - crate::session::TAG_LEN, 0);
    batch.buf[start + OUTER_LEN..start + OUTER_LEN + HEARTBEAT_LEN].copy_from_slice(&hb.to_bytes());
    seal_at(session, batch, start, KIND_HEARTBEAT)
}

fn assert_datagram_size(n: usize) {
    assert!(
        (MIN_DATAGRAM..=MAX_DATAGRAM).contains(&n),
        "max_datagram {n} outside {MIN_DATAGRAM}..={MAX_DATAGRAM}"
    );
}

/// Appends a datagram's outer header (filled at sealing) and inner header.
fn open_datagram(batch: &mut TxBatch, inner: &[u8; INNER_LEN]) {
    batch.open = Some(batch.buf.len());
    batch.buf.extend_from_slice(&[0u8; OUTER_LEN]);
    batch.buf.extend_from_slice(inner);
}

/// Seals the open datagram in place and appends its tag. On error the open
/// datagram is discarded.
fn seal_open(session: &mut TxSession, batch: &mut TxBatch, unsealed: bool) -> Result<(), DatapathError> {
    let Some(start) = batch.open.take() else {
        return Ok(());
    };
    if unsealed {
        return unsealed_at(session, batch, start);
    }
    seal_at(session, batch, start, crate::wire::datagram::KIND_DATA)
}

/// Finishes the open data datagram at `start` unsealed: outer header with
/// [`OUTER_FLAG_UNSEALED`](crate::wire::datagram::OUTER_FLAG_UNSEALED) and the
/// session's next counter, plaintext as it is, a zero tag (so sizes and GSO
/// runs are those of sealed datagrams). On error the datagram is discarded.
#[cold]
fn unsealed_at(session: &mut TxSession, batch: &mut TxBatch, start: usize) -> Result<(), DatapathError> {
    let counter = match session.key.take_counter() {
        Ok(c) => c,
        Err(e) => {
            batch.buf.truncate(start);
            return Err(e.into());
        }
    };
    let mut packet = OuterPacket::new_unchecked(&mut batch.buf[start..start + OUTER_LEN]);
    OuterHeader { receiver_index: session.receiver_index, counter }.emit_kind(crate::wire::datagram::KIND_DATA, &mut packet);
    packet.set_flags(crate::wire::datagram::OUTER_FLAG_UNSEALED);
    packet.set_queue(session.queue);
    batch.buf.extend_from_slice(&[0u8; crate::session::TAG_LEN]);
    batch.ends.push(batch.buf.len());
    Ok(())
}

/// Seals the datagram of `kind` whose outer header (left to fill) and
/// plaintext run from `start` to the end of the batch, and appends its tag.
/// On error the datagram is discarded.
fn seal_at(session: &mut TxSession, batch: &mut TxBatch, start: usize, kind: u8) -> Result<(), DatapathError> {
    let counter = match session.key.reserve_counter() {
        Ok(c) => c,
        Err(e) => {
            batch.buf.truncate(start);
            return Err(e.into());
        }
    };
    let (outer, plain) = batch.buf[start..].split_at_mut(OUTER_LEN);
    let mut packet = OuterPacket::new_unchecked(&mut *outer);
    OuterHeader { receiver_index: session.receiver_index, counter }.emit_kind(kind, &mut packet);
    packet.set_queue(session.queue);
    match session.key.seal_in_place(outer, plain) {
        Ok((_, tag)) => {
            batch.buf.extend_from_slice(&tag);
            batch.ends.push(batch.buf.len());
            Ok(())
        }
        Err(e) => {
            batch.buf.truncate(start);
            Err(e.into())
        }
    }
}

// ---------------------------------------------------------------------------
// Receiving

/// What a [`Receiver`] has seen, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RxStats {
    /// Datagrams authenticated and fully processed.
    pub datagrams_ok: u64,
    /// Units handed to the caller.
    pub units_delivered: u64,
    /// Datagrams whose counter was replayed or too old.
    pub replays: u64,
    /// Datagrams whose tag did not verify.
    pub auth_failures: u64,
    /// Datagrams too short, of another kind, with reserved bits set, or whose
    /// (authenticated) plaintext did not parse.
    pub malformed: u64,
    /// Datagrams for a receiver index we do not know.
    pub unknown_session: u64,
    /// Partial units given up: evicted by a newer unit, timed out, or whose
    /// chunks disagreed on the total.
    pub reassembly_drops: u64,
    /// Chunks of a unit already delivered or dropped, ignored.
    pub stale_chunks: u64,
    /// Heartbeats authenticated (counted in `datagrams_ok` too).
    pub heartbeats: u64,
    /// Partial units handed to the caller to salvage (counted in `reassembly_drops` too).
    pub salvaged: u64,
    /// Unsealed datagrams taken (`trusted (userspace)`; counted in `datagrams_ok` too).
    pub unsealed_ok: u64,
    /// Unsealed datagrams dropped: from a peer not trusted both ways, from
    /// another address than the one agreed, on a relay session, broadcast or
    /// from another origin, or with a nonzero tag.
    pub unsealed_refused: u64,
}

/// One partially received chunked unit.
#[derive(Debug, Default)]
struct Slot {
    active: bool,
    unit_id: u32,
    total: u32,
    received: u32,
    started_ms: u64,
    /// The receive call (see `Receiver::gen`) that completed the unit: until the
    /// next call, the slot is not reused, so the caller may still read it.
    held: u64,
    /// Order of creation, to find the oldest.
    seq: u64,
    /// The inner header of the datagram that started the unit.
    hdr: Option<InnerHeader>,
    /// Newer units of the session completed since this one started.
    overtaken: u8,
    /// MAX_UNIT bytes once first used.
    buf: Vec<u8>,
    /// One bit per byte of the unit already received.
    have: Vec<u64>,
}

const HAVE_WORDS: usize = MAX_UNIT.div_ceil(64);

impl Slot {
    /// Whether every byte of `start..end` has arrived.
    fn covers(&self, start: usize, end: usize) -> bool {
        if end > self.total as usize || start > end {
            return false;
        }
        if start == end {
            return true;
        }
        // Word by word, as `fill` marks them (salvage asks this per segment
        // of every superframe that lost a chunk).
        let (first, last, head, tail) = span(start, end);
        let has = |w: usize, mask: u64| self.have.get(w).is_some_and(|word| word & mask == mask);
        if first == last {
            return has(first, head & tail);
        }
        has(first, head) && has(last, tail) && self.have[first + 1..last].iter().all(|w| *w == u64::MAX)
    }

    fn start(&mut self, unit_id: u32, total: u32, now_ms: u64, seq: u64, hdr: InnerHeader) {
        if self.buf.len() < MAX_UNIT {
            // Allocated once per slot, reused for every later unit.
            self.buf.resize(MAX_UNIT, 0);
            self.have.resize(HAVE_WORDS, 0);
        }
        let words = (total as usize).div_ceil(64).min(HAVE_WORDS);
        self.have[..words].fill(0);
        self.active = true;
        self.unit_id = unit_id;
        self.total = total;
        self.received = 0;
        self.started_ms = now_ms;
        self.seq = seq;
        self.hdr = Some(hdr);
        self.overtaken = 0;
    }

    /// Copies `data` at `offset` and counts the bytes not received before.
    /// Bounds were checked by the parser: offset + len <= total <= MAX_UNIT.
    fn fill(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if let Some(dst) = self.buf.get_mut(offset..end) {
            dst.copy_from_slice(data);
        } else {
            return;
        }
        if end == offset {
            return;
        }
        // The bitmap words the range touches: a partial first and last word,
        // whole words between (a chunk of ~1400 bytes is ~20 of them).
        let (first, last, head, tail) = span(offset, end);
        if first == last {
            self.mark(first, head & tail);
            return;
        }
        self.mark(first, head);
        self.mark(last, tail);
        if let Some(mid) = self.have.get_mut(first + 1..last) {
            // Bytes arrive once in the normal case: then every bit is new and
            // the count is the width, without a popcount per word (a dozen
            // instructions each, built for baseline x86-64; with a loop over
            // the words, 6 % of the receiving thread in a profile).
            let new = if mid.iter().all(|w| *w == 0) {
                64 * mid.len() as u32
            } else {
                mid.iter().map(|w| w.count_zeros()).sum()
            };
            mid.fill(u64::MAX);
            self.received += new;
        }
    }

    /// Sets `mask`'s bits in bitmap word `w`, counting those not set before.
    fn mark(&mut self, w: usize, mask: u64) {
        if let Some(word) = self.have.get_mut(w) {
            self.received += (mask & !*word).count_ones();
            *word |= mask;
        }
    }
}

/// The bitmap words a non-empty byte range `start..end` touches: the first's
/// and the last's index, and the range's bits in each of them (whole words
/// lie between).
fn span(start: usize, end: usize) -> (usize, usize, u64, u64) {
    (start / 64, (end - 1) / 64, u64::MAX << (start % 64), u64::MAX >> (63 - (end - 1) % 64))
}

/// Reassembly state of one session.
#[derive(Debug, Default)]
struct Reassembly {
    slots: [Slot; REASSEMBLY_SLOTS],
    /// Slots active now (kept, so the receive loop need not look at every slot
    /// of every session on every wake-up).
    active: usize,
    next_seq: u64,
    retired: [Option<u32>; RETIRED_IDS],
    retired_pos: usize,
}

impl Reassembly {
    fn retire(&mut self, unit_id: u32) {
        self.retired[self.retired_pos] = Some(unit_id);
        self.retired_pos = (self.retired_pos + 1) % RETIRED_IDS;
    }

    fn drop_slot(&mut self, i: usize, stats: &mut RxStats) {
        if self.slots[i].active {
            self.active -= 1;
        }
        self.slots[i].active = false;
        stats.reassembly_drops += 1;
        let id = self.slots[i].unit_id;
        self.retire(id);
    }

    /// Adds one chunk; returns the slot holding the unit if it is now complete,
    /// and (bit per slot) the older incomplete units this completion made
    /// [`SALVAGE_AFTER`] times overtaken.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        gen: u64,
        now_ms: u64,
        hdr: &InnerHeader,
        unit_id: u32,
        offset: u32,
        total: u32,
        data: &[u8],
        stats: &mut RxStats,
    ) -> (Option<usize>, u32) {
        let i = match self.slots.iter().position(|s| s.active && s.unit_id == unit_id) {
            Some(i) => {
                if self.slots[i].total != total {
                    self.drop_slot(i, stats);
                    return (None, 0);
                }
                i
            }
            None => {
                if self.retired.contains(&Some(unit_id)) {
                    stats.stale_chunks += 1;
                    return (None, 0);
                }
                let i = match self.slots.iter().position(|s| !s.active && s.held != gen) {
                    Some(free) => free,
                    None => {
                        // Only an active slot is evicted: one completed in this
                        // receive call is still the caller's to read.
                        let active = (0..REASSEMBLY_SLOTS).filter(|&j| self.slots[j].active);
                        let Some(oldest) = active.min_by_key(|&j| self.slots[j].seq) else {
                            stats.reassembly_drops += 1;
                            return (None, 0);
                        };
                        self.drop_slot(oldest, stats);
                        oldest
                    }
                };
                let seq = self.next_seq;
                self.next_seq += 1;
                self.slots[i].start(unit_id, total, now_ms, seq, *hdr);
                self.active += 1;
                i
            }
        };
        let slot = &mut self.slots[i];
        slot.fill(offset as usize, data);
        if slot.received >= slot.total {
            slot.active = false;
            slot.held = gen;
            self.active -= 1;
            let seq = slot.seq;
            self.retire(unit_id);
            let mut older = 0u32;
            for (j, other) in self.slots.iter_mut().enumerate() {
                if other.active && other.seq < seq {
                    other.overtaken = other.overtaken.saturating_add(1);
                    if other.overtaken >= SALVAGE_AFTER {
                        older |= 1 << j;
                    }
                }
            }
            (Some(i), older)
        } else {
            (None, 0)
        }
    }

    fn expire(&mut self, now_ms: u64, stats: &mut RxStats) {
        for i in 0..REASSEMBLY_SLOTS {
            let s = &self.slots[i];
            if s.active && now_ms.saturating_sub(s.started_ms) >= REASSEMBLY_TIMEOUT_MS {
                self.drop_slot(i, stats);
            }
        }
    }
}

#[derive(Debug)]
struct RxSession {
    peer: PeerName,
    key: OpenKey,
    reassembly: Box<Reassembly>,
}

/// A session's key, kept to derive its queues' keys when their first
/// datagram arrives; erased when dropped.
struct BaseKey {
    peer: PeerName,
    key: [u8; KEY_LEN],
    /// Queue keys derived so far (bit q of `derived`: `queues[q]` holds
    /// queue q's key), so that datagrams naming a queue whose first datagram
    /// has not authenticated yet (a forger's, say) cost one HKDF per queue and
    /// session, not one each.
    derived: u64,
    queues: Box<[[u8; KEY_LEN]; crate::session::MAX_QUEUES as usize]>,
}

const _: () = assert!(crate::session::MAX_QUEUES <= 64, "BaseKey::derived has a bit per queue");

impl BaseKey {
    fn new(peer: PeerName, key: &[u8; KEY_LEN]) -> Self {
        BaseKey { peer, key: *key, derived: 0, queues: Box::new([[0; KEY_LEN]; crate::session::MAX_QUEUES as usize]) }
    }

    /// Queue `queue`'s key (below `MAX_QUEUES`: the outer header refuses others).
    fn queue_key(&mut self, queue: u16) -> &[u8; KEY_LEN] {
        let q = usize::from(queue);
        if self.derived & (1 << q) == 0 {
            self.queues[q] = crate::session::queue_key(&self.key, queue);
            self.derived |= 1 << q;
        }
        &self.queues[q]
    }
}

impl Drop for BaseKey {
    fn drop(&mut self) {
        crate::rekey::erase(&mut self.key);
        for k in self.queues.iter_mut() {
            crate::rekey::erase(k);
        }
    }
}

impl std::fmt::Debug for BaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseKey").field("peer", &self.peer).finish_non_exhaustive()
    }
}

/// Hashes the receiver's keys (receiver indexes we chose, and a queue below
/// [`crate::session::MAX_QUEUES`]) with one multiply: they are looked up for
/// every datagram, where SipHash cost ~3 % of the receiving thread. A peer
/// cannot choose where its entries land: only indexes we handed out are ever
/// inserted, so there is nothing to flood.
#[derive(Default, Clone, Copy)]
struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits (hashbrown's control bytes) and the
        // low bits (its bucket) both depend on every bit of the key.
        let h = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}

type IndexMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IndexHasher>>;

/// The plaintext of an unsealed data datagram (`body` = plaintext ‖ zero
/// tag) for `session`, if it may be taken: the session is a direct one (not a
/// relay session), its peer may send unsealed from exactly `from`, the tag is
/// zero, the units come from that peer's own TAP and are not broadcast, and
/// the counter passes the replay window (marked only then). Anything else is
/// [`DatapathError::UnsealedRefused`] (or a replay) and changes nothing.
#[cold]
fn take_unsealed<'a>(
    session: &mut RxSession,
    unsealed_from: &HashMap<PeerName, std::net::IpAddr>,
    from: Option<std::net::IpAddr>,
    outer: &OuterHeader,
    body: &'a mut [u8],
) -> Result<&'a mut [u8], DatapathError> {
    let agreed = unsealed_from.get(&session.peer);
    let from_ok = matches!((from, agreed), (Some(f), Some(a)) if f.to_canonical() == *a);
    if !from_ok || outer.receiver_index & crate::session::RELAY_INDEX_BIT != 0 {
        return Err(DatapathError::UnsealedRefused);
    }
    let Some(plain_len) = body.len().checked_sub(crate::session::TAG_LEN) else { return Err(DatapathError::TooShort) };
    let (plain, tag) = body.split_at_mut(plain_len);
    if tag.iter().any(|&b| b != 0) {
        return Err(DatapathError::UnsealedRefused);
    }
    let (inner, _) = parse_plaintext(plain)?;
    if inner.broadcast || inner.src != session.peer {
        return Err(DatapathError::UnsealedRefused);
    }
    session.key.accept_unsealed(outer.counter)?;
    Ok(plain)
}

/// Where a (receiver index, queue) session lives in [`Receiver`]'s table.
#[inline]
fn session_id(receiver_index: u32, queue: u16) -> u64 {
    (queue as u64) << 32 | receiver_index as u64
}

/// The sessions peers opened towards us, keyed by the receiver index we chose
/// and the sender's queue (outer header): each (index, queue) has its own key
/// (queue 0 the session's key, queue q [`crate::session::queue_key`]), replay
/// window and reassembly. A queue's session is made when its first datagram
/// arrives (at most [`crate::session::MAX_QUEUES`] per index).
#[derive(Debug, Default)]
pub struct Receiver {
    sessions: IndexMap<u64, RxSession>,
    bases: IndexMap<u32, BaseKey>,
    stats: RxStats,
    /// Active reassembly slots across sessions (see [`partial_units`](Self::partial_units)).
    partial: usize,
    /// The peer whose session the last datagram authenticated under.
    last_sender: Option<PeerName>,
    /// Counts `receive*` calls: a unit completed in a slot stays readable
    /// ([`held_unit`](Self::held_unit)) until the next call.
    gen: u64,
    /// Peers that may send us unsealed data, and the only underlay address
    /// such datagrams are taken from ([`set_unsealed_from`](Self::set_unsealed_from)).
    unsealed_from: HashMap<PeerName, std::net::IpAddr>,
}

/// Where a unit handed out by [`Receiver::receive_placed`] lives until the
/// next `receive*` call: in the datagram (decrypted in place) or in a
/// reassembly slot of the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Datagram,
    /// `session` as [`Receiver::held_unit`] takes it (receiver index and queue).
    Slot { session: u64, slot: u8 },
}

impl Receiver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs (or replaces, with a fresh replay window) the session that
    /// `peer` seals towards us under `receiver_index`.
    pub fn add_session(&mut self, receiver_index: u32, peer: PeerName, key: &[u8; KEY_LEN]) {
        // Replacing: every queue's session goes, with its window.
        self.remove_session(receiver_index);
        self.sessions.insert(
            session_id(receiver_index, 0),
            RxSession { peer, key: OpenKey::new(key), reassembly: Box::default() },
        );
        self.bases.insert(receiver_index, BaseKey::new(peer, key));
    }

    pub fn remove_session(&mut self, receiver_index: u32) {
        if self.bases.remove(&receiver_index).is_none() {
            return;
        }
        let mut partial = 0;
        self.sessions.retain(|&id, s| {
            let keep = id as u32 != receiver_index;
            if !keep {
                partial += s.reassembly.active;
            }
            keep
        });
        self.partial -= partial;
    }

    /// The peer whose session the datagram of the last `receive*` call
    /// authenticated under (None if it did not authenticate): lets a caller
    /// count datagrams per peer without a second lookup.
    pub fn last_sender(&self) -> Option<PeerName> {
        self.last_sender
    }

    /// Takes unsealed data datagrams from `peer` (on its direct sessions, from
    /// `addr` only) when `addr` is Some, none when None. Survives rekeying;
    /// the caller sets it only for a peer trusted both ways (see
    /// [`crate::trusted::DataMode::TrustedUserspace`]).
    pub fn set_unsealed_from(&mut self, peer: PeerName, addr: Option<std::net::IpAddr>) {
        match addr {
            Some(a) => {
                self.unsealed_from.insert(peer, a.to_canonical());
            }
            None => {
                self.unsealed_from.remove(&peer);
            }
        }
    }

    /// The peer behind a receiver index.
    pub fn session_peer(&self, receiver_index: u32) -> Option<PeerName> {
        self.bases.get(&receiver_index).map(|s| s.peer)
    }

    /// Sessions installed (not counting their queues).
    pub fn session_count(&self) -> usize {
        self.bases.len()
    }

    /// Authenticate and decrypt `dgram` in place; call `on_unit(session_peer,
    /// &inner, unit)` for every complete unit (whole records, and chunked units
    /// once all their bytes arrived). Returns units delivered. Heartbeats are
    /// authenticated and then ignored (see [`receive_any`](Self::receive_any)).
    ///
    /// A datagram whose plaintext does not parse delivers nothing.
    pub fn receive(
        &mut self,
        now_ms: u64,
        dgram: &mut [u8],
        on_unit: impl FnMut(PeerName, &InnerHeader, &[u8]),
    ) -> Result<usize, DatapathError> {
        self.receive_any(now_ms, dgram, on_unit, |_, _, _| {})
    }

    /// [`receive`](Self::receive), and for an authenticated heartbeat, call
    /// `on_heartbeat(session_peer, heartbeat, datagram_len)` (it delivers no unit).
    pub fn receive_any(
        &mut self,
        now_ms: u64,
        dgram: &mut [u8],
        on_unit: impl FnMut(PeerName, &InnerHeader, &[u8]),
        on_heartbeat: impl FnMut(PeerName, Heartbeat, usize),
    ) -> Result<usize, DatapathError> {
        self.receive_salvaging(now_ms, dgram, on_unit, on_heartbeat, |_, _, _, _| {})
    }

    /// [`receive_any`](Self::receive_any), and when a chunked unit completes
    /// and so has overtaken an older, incomplete unit of the same session
    /// [`SALVAGE_AFTER`] times (a chunk of it was lost), first
    /// `on_partial(peer, &inner, unit, have)` for each such unit, where `unit`
    /// is the unit's full length with holes and `have(start, end)` says whether
    /// those bytes arrived; the partial unit is then dropped. A caller can
    /// salvage the segments of a superframe that did arrive.
    pub fn receive_salvaging(
        &mut self,
        now_ms: u64,
        dgram: &mut [u8],
        mut on_unit: impl FnMut(PeerName, &InnerHeader, &[u8]),
        on_heartbeat: impl FnMut(PeerName, Heartbeat, usize),
        on_partial: impl FnMut(PeerName, &InnerHeader, &[u8], &dyn Fn(usize, usize) -> bool),
    ) -> Result<usize, DatapathError> {
        self.receive_placed(now_ms, dgram, |p, h, u, _| on_unit(p, h, u), on_heartbeat, on_partial)
    }

    /// [`receive_salvaging`](Self::receive_salvaging), also saying where each
    /// unit lives, so that a caller can note it and read it after the call
    /// (from the datagram, or with [`held_unit`](Self::held_unit)).
    pub fn receive_placed(
        &mut self,
        now_ms: u64,
        dgram: &mut [u8],
        on_unit: impl FnMut(PeerName, &InnerHeader, &[u8], Place),
        on_heartbeat: impl FnMut(PeerName, Heartbeat, usize),
        on_partial: impl FnMut(PeerName, &InnerHeader, &[u8], &dyn Fn(usize, usize) -> bool),
    ) -> Result<usize, DatapathError> {
        self.receive_placed_from(now_ms, dgram, None, on_unit, on_heartbeat, on_partial)
    }

    /// [`receive_placed`](Self::receive_placed) of a datagram that came from
    /// underlay address `from` (None: unknown, so no unsealed datagram is taken).
    #[allow(clippy::too_many_arguments)]
    pub fn receive_placed_from(
        &mut self,
        now_ms: u64,
        dgram: &mut [u8],
        from: Option<std::net::IpAddr>,
        mut on_unit: impl FnMut(PeerName, &InnerHeader, &[u8], Place),
        mut on_heartbeat: impl FnMut(PeerName, Heartbeat, usize),
        mut on_partial: impl FnMut(PeerName, &InnerHeader, &[u8], &dyn Fn(usize, usize) -> bool),
    ) -> Result<usize, DatapathError> {
        self.last_sender = None;
        self.gen += 1;
        let res = self.receive_inner(now_ms, dgram, from, &mut on_unit, &mut on_heartbeat, &mut on_partial);
        let s = &mut self.stats;
        match res {
            Ok(n) => {
                s.datagrams_ok += 1;
                s.units_delivered += n as u64;
            }
            Err(DatapathError::UnknownSession(_)) => s.unknown_session += 1,
            Err(DatapathError::UnsealedRefused) => s.unsealed_refused += 1,
            Err(DatapathError::Session(SessionError::Replay)) => s.replays += 1,
            Err(DatapathError::Session(_)) => s.auth_failures += 1,
            Err(_) => s.malformed += 1,
        }
        res
    }

    fn receive_inner(
        &mut self,
        now_ms: u64,
        dgram: &mut [u8],
        from: Option<std::net::IpAddr>,
        on_unit: &mut impl FnMut(PeerName, &InnerHeader, &[u8], Place),
        on_heartbeat: &mut impl FnMut(PeerName, Heartbeat, usize),
        on_partial: &mut impl FnMut(PeerName, &InnerHeader, &[u8], &dyn Fn(usize, usize) -> bool),
    ) -> Result<usize, DatapathError> {
        let len = dgram.len();
        if len < OUTER_LEN + crate::session::TAG_LEN {
            return Err(DatapathError::TooShort);
        }
        let mut packet = OuterPacket::new_checked(dgram)?;
        let kind = packet.kind();
        if kind == KIND_HEARTBEAT {
            if len < MIN_HEARTBEAT {
                return Err(DatapathError::TooShort);
            }
        } else if kind != crate::wire::datagram::KIND_DATA {
            return Err(DatapathError::BadKind);
        } else if len < OVERHEAD {
            return Err(DatapathError::TooShort);
        }
        let (_, outer) = OuterHeader::parse_any(&packet)?;
        let unsealed = packet.unsealed();
        let id = session_id(outer.receiver_index, packet.queue());
        let fresh = !self.sessions.contains_key(&id);
        if fresh {
            // A queue's first datagram: its key derives from the session's.
            let base = self.bases.get_mut(&outer.receiver_index).ok_or(DatapathError::UnknownSession(outer.receiver_index))?;
            let s = RxSession { peer: base.peer, key: OpenKey::new(base.queue_key(packet.queue())), reassembly: Box::default() };
            self.sessions.insert(id, s);
        }
        let (aad, body) = packet.split_mut();
        let opened = match self.sessions.get_mut(&id) {
            Some(session) if unsealed => take_unsealed(session, &self.unsealed_from, from, &outer, body),
            Some(session) => session.key.open_in_place(outer.counter, aad, body).map_err(DatapathError::from),
            None => return Err(DatapathError::UnknownSession(outer.receiver_index)),
        };
        if opened.is_err() && fresh {
            // Kept only once a datagram of the queue authenticated.
            self.sessions.remove(&id);
        }
        let plain = opened?;
        if unsealed {
            self.stats.unsealed_ok += 1;
        }
        let session = self.sessions.get_mut(&id).ok_or(DatapathError::UnknownSession(outer.receiver_index))?;
        self.last_sender = Some(session.peer);
        if kind == KIND_HEARTBEAT {
            let hb = Heartbeat::parse(plain)?;
            self.stats.heartbeats += 1;
            on_heartbeat(session.peer, hb, len);
            return Ok(0);
        }

        let (inner, records) = parse_plaintext(plain)?;
        records.validate()?;
        let peer = session.peer;
        let mut delivered = 0;
        for rec in records.flatten() {
            match rec {
                Record::Whole(unit) => {
                    on_unit(peer, &inner, unit, Place::Datagram);
                    delivered += 1;
                }
                Record::Chunk { unit_id, offset, total, data } => {
                    let r = &mut session.reassembly;
                    let before = r.active;
                    let (done, older) = r.add(self.gen, now_ms, &inner, unit_id, offset, total, data, &mut self.stats);
                    if older != 0 {
                        let mut by_age: Vec<usize> = (0..REASSEMBLY_SLOTS).filter(|j| older & (1 << j) != 0).collect();
                        by_age.sort_by_key(|&j| r.slots[j].seq);
                        for j in by_age {
                            let slot = &r.slots[j];
                            if let Some(h) = slot.hdr {
                                on_partial(peer, &h, &slot.buf[..slot.total as usize], &|a, b| slot.covers(a, b));
                            }
                            self.stats.salvaged += 1;
                            r.drop_slot(j, &mut self.stats);
                        }
                    }
                    self.partial = self.partial + r.active - before;
                    if let Some(i) = done {
                        let slot = &r.slots[i];
                        let place = Place::Slot { session: id, slot: i as u8 };
                        on_unit(peer, &inner, &slot.buf[..slot.total as usize], place);
                        delivered += 1;
                    }
                }
            }
        }
        Ok(delivered)
    }

    /// A unit the last `receive*` call completed in a reassembly slot
    /// ([`Place::Slot`]); None once a later call may have reused the slot.
    pub fn held_unit(&self, session: u64, slot: u8) -> Option<&[u8]> {
        let s = self.sessions.get(&session)?.reassembly.slots.get(slot as usize)?;
        (s.held == self.gen && !s.active).then(|| &s.buf[..s.total as usize])
    }

    /// Partial units waiting for chunks, across sessions.
    pub fn partial_units(&self) -> usize {
        debug_assert_eq!(
            self.partial,
            self.sessions.values().map(|s| s.reassembly.slots.iter().filter(|x| x.active).count()).sum::<usize>()
        );
        self.partial
    }

    /// Gives up partial units started `age_ms` or longer ago, offering each to
    /// `on_partial` as [`receive_salvaging`](Self::receive_salvaging) does.
    pub fn salvage_older_than(
        &mut self,
        now_ms: u64,
        age_ms: u64,
        mut on_partial: impl FnMut(PeerName, &InnerHeader, &[u8], &dyn Fn(usize, usize) -> bool),
    ) {
        if self.partial == 0 {
            return;
        }
        for s in self.sessions.values_mut() {
            let r = &mut s.reassembly;
            if r.active == 0 {
                continue;
            }
            let before = r.active;
            for j in 0..REASSEMBLY_SLOTS {
                let slot = &r.slots[j];
                if !slot.active || now_ms.saturating_sub(slot.started_ms) < age_ms {
                    continue;
                }
                if let Some(h) = slot.hdr {
                    on_partial(s.peer, &h, &slot.buf[..slot.total as usize], &|a, b| slot.covers(a, b));
                }
                self.stats.salvaged += 1;
                r.drop_slot(j, &mut self.stats);
            }
            self.partial -= before - r.active;
        }
    }

    /// Drop partial reassemblies older than [`REASSEMBLY_TIMEOUT_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        if self.partial == 0 {
            return;
        }
        for s in self.sessions.values_mut() {
            let before = s.reassembly.active;
            if before > 0 {
                s.reassembly.expire(now_ms, &mut self.stats);
                self.partial -= before - s.reassembly.active;
            }
        }
    }

    pub fn stats(&self) -> RxStats {
        self.stats
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::TAG_LEN;
    use crate::wire::datagram::{InnerPacket, CHUNK_HDR_LEN};

    const KEY: [u8; KEY_LEN] = [0x42; KEY_LEN];
    const IDX: u32 = 1;
    const PEER: PeerName = PeerName(0x0211_1111_1111);

    fn hdr() -> InnerHeader {
        InnerHeader { ttl: 4, broadcast: false, src: PEER, dst: PeerName(0x0222_2222_2222) }
    }

    fn pair(max_datagram: usize) -> (Encoder, TxSession, Receiver) {
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        (Encoder::new(max_datagram), TxSession::new(IDX, &KEY), rx)
    }

    /// A recognisable unit: every byte depends on its position and `seed`.
    fn unit(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed ^ (i >> 8) as u8)).collect()
    }

    fn encode(enc: &mut Encoder, tx: &mut TxSession, units: &[Vec<u8>]) -> TxBatch {
        let mut batch = TxBatch::new();
        enc.begin(tx, hdr(), &mut batch);
        for u in units {
            enc.push(tx, u, &mut batch).unwrap();
        }
        enc.finish(tx, &mut batch).unwrap();
        batch
    }

    fn encode_as(enc: &mut Encoder, tx: &mut TxSession, h: InnerHeader, units: &[Vec<u8>], unsealed: bool) -> TxBatch {
        let mut batch = TxBatch::new();
        enc.begin_as(tx, h, &mut batch, unsealed);
        for u in units {
            enc.push(tx, u, &mut batch).unwrap();
        }
        enc.finish(tx, &mut batch).unwrap();
        batch
    }

    fn receive_from(rx: &mut Receiver, d: &[u8], from: Option<std::net::IpAddr>) -> Result<Vec<Vec<u8>>, DatapathError> {
        let mut d = d.to_vec();
        let mut got = Vec::new();
        let mut slots = Vec::new();
        rx.receive_placed_from(
            0,
            &mut d,
            from,
            |_, _, u, place| match place {
                Place::Datagram => got.push(u.to_vec()),
                Place::Slot { .. } => slots.push(u.to_vec()),
            },
            |_, _, _| {},
            |_, _, _, _| {},
        )?;
        got.extend(slots);
        Ok(got)
    }

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    /// `trusted (userspace)`: unsealed datagrams carry the plaintext where the
    /// ciphertext was, a zero tag, the same sizes and the session's counters
    /// (one space with the sealed ones), and are taken from the agreed address
    /// only; a broadcast stays sealed even when asked.
    #[test]
    fn unsealed_datagrams_round_trip_from_the_agreed_address() {
        let (mut enc, mut tx, mut rx) = pair(1400);
        rx.set_unsealed_from(PEER, Some(ip("fd00::2")));
        let marker = b"PLAINTEXT-MARKER".repeat(8);
        let small = [marker.clone(), unit(300, 7)];
        let sealed = encode(&mut enc, &mut tx, &small);
        let plain = encode_as(&mut enc, &mut tx, hdr(), &small, true);
        let big = encode_as(&mut enc, &mut tx, hdr(), &[unit(20000, 3)], true);
        let d = plain.datagrams().next().unwrap();
        assert_eq!(d.len(), sealed.datagrams().next().unwrap().len(), "same framing and size");
        assert_eq!(d[1], crate::wire::datagram::OUTER_FLAG_UNSEALED);
        assert!(d.windows(marker.len()).any(|w| w == &marker[..]), "the marker is on the wire");
        assert!(d[d.len() - TAG_LEN..].iter().all(|&b| b == 0));
        let counter = |d: &[u8]| OuterHeader::parse(&OuterPacket::new_checked(d).unwrap()).unwrap().counter;
        assert_eq!(counter(d), counter(sealed.datagrams().next().unwrap()) + 1, "one counter space");
        assert_eq!(receive_from(&mut rx, sealed.datagrams().next().unwrap(), Some(ip("fd00::2"))).unwrap(), small.to_vec());
        // From the dual-stack socket's mapped form of an IPv4 address too.
        let mut rx4 = Receiver::new();
        rx4.add_session(IDX, PEER, &KEY);
        rx4.set_unsealed_from(PEER, Some(ip("10.0.0.2")));
        assert_eq!(receive_from(&mut rx4, d, Some(ip("::ffff:10.0.0.2"))).unwrap(), small.to_vec());
        assert_eq!(receive_from(&mut rx, d, Some(ip("fd00::2"))).unwrap(), small.to_vec());
        let mut whole = Vec::new();
        for d in big.datagrams() {
            assert_eq!(d[1], crate::wire::datagram::OUTER_FLAG_UNSEALED);
            whole.extend(receive_from(&mut rx, d, Some(ip("fd00::2"))).unwrap());
        }
        assert_eq!(whole, vec![unit(20000, 3)], "chunked units reassemble");
        assert_eq!(rx.stats().unsealed_ok, 1 + big.datagram_count() as u64);
        // Replayed: refused by the window like a sealed datagram.
        assert_eq!(receive_from(&mut rx, d, Some(ip("fd00::2"))), Err(DatapathError::Session(SessionError::Replay)));
        // A broadcast is never sent unsealed.
        let b = InnerHeader { ttl: 4, broadcast: true, src: PEER, dst: PeerName::BROADCAST };
        let bc = encode_as(&mut enc, &mut tx, b, &small, true);
        assert_eq!(bc.datagrams().next().unwrap()[1], 0);
    }

    /// An unsealed datagram is dropped and counted, and moves no replay
    /// window, unless its sender was agreed as trusted both ways from exactly
    /// the address it came from, on a direct session, from its own TAP,
    /// unicast, with a zero tag.
    #[test]
    fn unsealed_datagrams_are_refused_unless_agreed_from_that_address() {
        let (mut enc, mut tx, mut rx) = pair(1400);
        let batch = encode_as(&mut enc, &mut tx, hdr(), &[unit(200, 1)], true);
        let d = batch.datagrams().next().unwrap().to_vec();
        let refused = |rx: &mut Receiver, d: &[u8], from: Option<std::net::IpAddr>| {
            let before = rx.stats();
            assert_eq!(receive_from(rx, d, from), Err(DatapathError::UnsealedRefused), "from {from:?}");
            assert_eq!(rx.stats().unsealed_refused, before.unsealed_refused + 1);
            assert_eq!(rx.stats().units_delivered, before.units_delivered);
        };
        // Not agreed (an older configuration, one-sided trust, no record).
        refused(&mut rx, &d, Some(ip("fd00::2")));
        // Through the plain receive (no source address): never.
        rx.set_unsealed_from(PEER, Some(ip("fd00::2")));
        let mut copy = d.clone();
        assert_eq!(rx.receive(0, &mut copy, |_, _, _| {}), Err(DatapathError::UnsealedRefused));
        // Agreed, but from a stranger's address, or none.
        refused(&mut rx, &d, Some(ip("fd00::66")));
        refused(&mut rx, &d, Some(ip("10.0.0.2")));
        refused(&mut rx, &d, None);
        // Another origin claimed, or a broadcast.
        let mut other = d.clone();
        other[OUTER_LEN + 2..OUTER_LEN + 8].copy_from_slice(&[2, 0x33, 0x33, 0x33, 0x33, 0x33]);
        refused(&mut rx, &other, Some(ip("fd00::2")));
        let mut bc = d.clone();
        bc[OUTER_LEN + 1] = crate::wire::datagram::INNER_FLAG_BROADCAST;
        bc[OUTER_LEN + 8..OUTER_LEN + 14].fill(0);
        refused(&mut rx, &bc, Some(ip("fd00::2")));
        // A nonzero tag; a sealed datagram with the flag flipped.
        let mut tagged = d.clone();
        let last = tagged.len() - 1;
        tagged[last] = 1;
        refused(&mut rx, &tagged, Some(ip("fd00::2")));
        let sealed = encode(&mut enc, &mut tx, &[unit(200, 2)]);
        let mut flipped = sealed.datagrams().next().unwrap().to_vec();
        flipped[1] = crate::wire::datagram::OUTER_FLAG_UNSEALED;
        refused(&mut rx, &flipped, Some(ip("fd00::2")));
        // On a relay session (relayed units stay sealed).
        rx.add_session(IDX | crate::session::RELAY_INDEX_BIT, PEER, &KEY);
        let mut relay_tx = TxSession::new(IDX | crate::session::RELAY_INDEX_BIT, &KEY);
        let relayed = encode_as(&mut enc, &mut relay_tx, hdr(), &[unit(200, 3)], true);
        refused(&mut rx, relayed.datagrams().next().unwrap(), Some(ip("fd00::2")));
        // Unknown session: counted as such.
        let mut unknown = d.clone();
        unknown[4..8].copy_from_slice(&77u32.to_be_bytes());
        assert_eq!(receive_from(&mut rx, &unknown, Some(ip("fd00::2"))), Err(DatapathError::UnknownSession(77)));
        // None of that moved the window: the genuine datagram is still taken.
        assert_eq!(receive_from(&mut rx, &d, Some(ip("fd00::2"))).unwrap(), vec![unit(200, 1)]);
        // And taken no more once the agreement ends.
        rx.set_unsealed_from(PEER, None);
        let next = encode_as(&mut enc, &mut tx, hdr(), &[unit(200, 4)], true);
        refused(&mut rx, next.datagrams().next().unwrap(), Some(ip("fd00::2")));
        assert_eq!(rx.stats().unsealed_ok, 1);
    }

    /// Each queue of a multi-queue sender seals under its own key and counter
    /// space with its queue in the header; one receiver session opens them all
    /// (a window per queue: the same counters on two queues are no replay),
    /// still refuses a replay within a queue, and a queue's datagram under a
    /// wrong key makes no session.
    #[test]
    fn queues_have_their_own_counter_spaces() {
        let mut enc = Encoder::new(1400);
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        let mut txs: Vec<TxSession> = (0..4).map(|q| TxSession::on_queue(IDX, &KEY, q)).collect();
        let mut sent = Vec::new();
        for round in 0..3u8 {
            for (q, tx) in txs.iter_mut().enumerate() {
                let u = unit(100 + q, round * 4 + q as u8);
                let b = encode(&mut enc, tx, std::slice::from_ref(&u));
                let d = b.datagrams().next().unwrap().to_vec();
                assert_eq!(OuterPacket::new_checked(&d[..]).unwrap().queue(), q as u16);
                assert_eq!(OuterPacket::new_checked(&d[..]).unwrap().counter(), round as u64);
                sent.push((d, u));
            }
        }
        for (d, u) in &sent {
            assert_eq!(receive_all(&mut rx, 0, [&d[..]]), vec![u.clone()]);
        }
        // A replay on queue 2 is refused.
        let mut again = sent[2].0.clone();
        assert!(matches!(rx.receive(0, &mut again, |_, _, _| {}), Err(DatapathError::Session(SessionError::Replay))));
        // Queue 0 is the plain session: a single-queue sender's datagrams open.
        let mut plain = TxSession::new(IDX, &KEY);
        let _ = encode(&mut enc, &mut plain, &[unit(50, 1)]); // counters 0..: replays of queue 0's
        let b = encode(&mut enc, &mut plain, &[unit(50, 2), unit(50, 3), unit(50, 4)]);
        assert!(rx.receive(0, &mut b.datagrams().next().unwrap().to_vec(), |_, _, _| {}).is_err(), "counter 1 was seen");
        // Forged on queue 9 (wrong key): refused, and no session is kept.
        let mut forged = TxSession::on_queue(IDX, &[1; KEY_LEN], 9);
        let b = encode(&mut enc, &mut forged, &[unit(60, 9)]);
        assert!(rx.receive(0, &mut b.datagrams().next().unwrap().to_vec(), |_, _, _| {}).is_err());
        assert_eq!(rx.sessions.len(), 4);
        assert_eq!(rx.session_count(), 1);
        // Its key was derived once and is kept: more forgeries on queue 9 do
        // not derive it again, and the real sender's queue 9 then opens.
        assert_eq!(rx.bases[&IDX].derived, 0b10_0000_1110, "queues 1 to 3 and 9 (queue 0 is the session key)");
        let mut forged = TxSession::on_queue(IDX, &[1; KEY_LEN], 9);
        for i in 0..3 {
            let b = encode(&mut enc, &mut forged, &[unit(61, i)]);
            assert!(rx.receive(0, &mut b.datagrams().next().unwrap().to_vec(), |_, _, _| {}).is_err());
        }
        assert_eq!(rx.bases[&IDX].derived.count_ones(), 4);
        let mut real = TxSession::on_queue(IDX, &KEY, 9);
        let u = unit(62, 7);
        assert_eq!(receive_all(&mut rx, 0, [&encode(&mut enc, &mut real, std::slice::from_ref(&u)).datagrams().next().unwrap().to_vec()[..]]), vec![u]);
        assert_eq!(rx.sessions.len(), 5);
        // Removing the session removes its queues.
        rx.remove_session(IDX);
        assert!(rx.sessions.is_empty());
    }

    /// Queues sharing one counter space (a peer without queues) interleave
    /// under queue field 0 and all open; chunked units of two queues do not
    /// mix (their ids differ).
    #[test]
    fn shared_sessions_of_two_queues_open_on_one_window() {
        let mut enc = Encoder::new(600);
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut a = TxSession::shared(IDX, &KEY, counter.clone(), 0);
        let mut b = TxSession::shared(IDX, &KEY, counter, 1);
        let (ua, ub) = (unit(2000, 1), unit(2000, 2));
        let ba = encode(&mut enc, &mut a, std::slice::from_ref(&ua));
        let bb = encode(&mut enc, &mut b, std::slice::from_ref(&ub));
        let mut got = Vec::new();
        // Chunks interleaved on the wire.
        for (x, y) in ba.datagrams().zip(bb.datagrams()) {
            assert_eq!(OuterPacket::new_checked(x).unwrap().queue(), 0);
            got.extend(receive_all(&mut rx, 0, [x, y]));
        }
        got.sort();
        let mut want = vec![ua, ub];
        want.sort();
        assert_eq!(got, want);
    }

    /// Receives copies of `dgrams` in order; returns the units delivered.
    fn receive_all<'a>(rx: &mut Receiver, now: u64, dgrams: impl IntoIterator<Item = &'a [u8]>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for d in dgrams {
            let mut d = d.to_vec();
            rx.receive(now, &mut d, |peer, inner, u| {
                assert_eq!(peer, PEER);
                assert_eq!(*inner, hdr());
                out.push(u.to_vec());
            })
            .unwrap();
        }
        out
    }

    /// An authentic datagram around an arbitrary plaintext.
    fn seal_plain(key: &mut SealKey, plain: &[u8]) -> Vec<u8> {
        let counter = key.next_counter().unwrap();
        let mut d = OuterHeader { receiver_index: IDX, counter }.to_bytes().to_vec();
        d.extend_from_slice(plain);
        let (aad, body) = d.split_at_mut(OUTER_LEN);
        let (_, tag) = key.seal_in_place(aad, body).unwrap();
        d.extend_from_slice(&tag);
        d
    }

    fn plain(recs: &[Record<'_>]) -> Vec<u8> {
        let mut v = hdr().to_bytes().to_vec();
        for r in recs {
            let mut rh = [0u8; CHUNK_HDR_LEN];
            let n = r.header().emit(&mut rh);
            v.extend_from_slice(&rh[..n]);
            v.extend_from_slice(r.data());
        }
        v
    }

    #[test]
    fn a_unit_completed_in_a_slot_stays_readable_until_the_next_receive() {
        let (_, _, mut rx) = pair(1472);
        let mut key = SealKey::new(&KEY);
        let whole = unit(100, 9);
        // Every slot holds half a unit.
        for id in 0..REASSEMBLY_SLOTS as u32 {
            let data = if id == 0 { &whole[..50] } else { &whole[50..] };
            let mut d = seal_plain(&mut key, &plain(&[Record::Chunk { unit_id: id, offset: 0, total: 100, data }]));
            rx.receive(0, &mut d, |_, _, _| panic!("incomplete")).unwrap();
        }
        // One datagram completes unit 0, then starts as many new units as
        // there are slots (a hostile peer may pack records so).
        let mut recs = vec![Record::Chunk { unit_id: 0, offset: 50, total: 100, data: &whole[50..] }];
        let junk = [0xeeu8; 60];
        recs.extend((100..100 + REASSEMBLY_SLOTS as u32).map(|id| Record::Chunk { unit_id: id, offset: 0, total: 100, data: &junk }));
        let mut d = seal_plain(&mut key, &plain(&recs));
        let mut places = Vec::new();
        rx.receive_placed(1, &mut d, |_, _, u, place| places.push((u.to_vec(), place)), |_, _, _| {}, |_, _, _, _| {}).unwrap();
        assert_eq!(places.len(), 1);
        assert_eq!(places[0].0, whole);
        let Place::Slot { session, slot } = places[0].1 else { panic!("a chunked unit lives in a slot") };
        assert_eq!(rx.held_unit(session, slot), Some(&whole[..]), "not overwritten by the chunks after it");
        // The next receive may reuse the slot: it is no longer handed out.
        let mut d = seal_plain(&mut key, &plain(&[Record::Whole(&whole)]));
        rx.receive(2, &mut d, |_, _, _| {}).unwrap();
        assert_eq!(rx.held_unit(session, slot), None);
    }

    #[test]
    fn small_units_are_packed_several_per_datagram() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let units: Vec<_> = (0..200).map(|i| unit(60 + (i * 7) % 140, i as u8)).collect();
        let batch = encode(&mut enc, &mut tx, &units);
        let n = batch.datagram_count();
        assert!(n * 5 < units.len(), "{n} datagrams for {} small units", units.len());
        for d in batch.datagrams() {
            assert!(d.len() <= 1472);
            let p = OuterPacket::new_checked(d).unwrap();
            assert_eq!(OuterHeader::parse(&p).unwrap().receiver_index, IDX);
        }
        // Every datagram but the last was closed because the next unit did not fit.
        for d in batch.datagrams().take(n - 1) {
            assert!(d.len() + RECORD_HDR_LEN + 200 > 1472, "{}", d.len());
        }
        assert_eq!(receive_all(&mut rx, 0, batch.datagrams()), units);
        let st = rx.stats();
        assert_eq!((st.datagrams_ok, st.units_delivered), (n as u64, 200));
    }

    #[test]
    fn last_sender_names_the_peer_of_an_authentic_datagram_only() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        assert_eq!(rx.last_sender(), None);
        let batch = encode(&mut enc, &mut tx, &[unit(100, 1)]);
        let mut d = batch.datagrams().next().unwrap().to_vec();
        let mut forged = d.clone();
        rx.receive(0, &mut d, |_, _, _| {}).unwrap();
        assert_eq!(rx.last_sender(), Some(PEER));
        // A datagram that does not authenticate names nobody.
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(rx.receive(0, &mut forged, |_, _, _| {}).is_err());
        assert_eq!(rx.last_sender(), None);
    }

    /// Issue 10: whatever the path MTU the probing found (the smallest ladder
    /// rungs included), every datagram of every unit, from a small frame to a
    /// 64 KiB superframe, is at most that size; runs handed to GSO never have a
    /// segment larger either; and the receiver puts every unit back together.
    #[test]
    fn every_datagram_fits_the_path_mtu_and_reassembles() {
        let sizes = [60usize, 100, 500, 523, 524, 525, 552, 575, 576, 577, 600, 700, 848, 852, 900, 1052, 1376, 1400, 1500, 9000, 10_042, 40_000, 65_536, MAX_UNIT];
        for pmtu in [576usize, 700, 900] {
            // One encoder used for a bigger path first, then shrunk, as the TX thread does.
            let (mut enc, mut tx, mut rx) = pair(1472);
            encode(&mut enc, &mut tx, &[unit(3000, 1)]);
            enc.set_max_datagram(pmtu);
            let units: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| unit(n, i as u8)).collect();
            // All in one batch (packed and chunked mixed), and each alone.
            let mut batches = vec![encode(&mut enc, &mut tx, &units)];
            batches.extend(units.iter().map(|u| encode(&mut enc, &mut tx, std::slice::from_ref(u))));
            let mut got = Vec::new();
            for b in &batches {
                for d in b.datagrams() {
                    assert!(d.len() <= pmtu, "a {}-byte datagram for a path MTU of {pmtu}", d.len());
                }
                for (bytes, seg) in b.runs_within(64, 65_000) {
                    assert!(seg <= pmtu && bytes.len().div_ceil(seg) <= 64);
                }
                got.extend(receive_all(&mut rx, 0, b.datagrams()));
            }
            let mut want = units.clone();
            want.extend(units.iter().cloned());
            assert_eq!(got.len(), want.len(), "path MTU {pmtu}");
            assert!(got == want, "path MTU {pmtu}: units differ after reassembly");
            assert_eq!(rx.stats().reassembly_drops, 0);
        }
    }

    #[test]
    fn a_64k_unit_is_chunked_into_full_datagrams() {
        for max in [1472usize, 1280, 8972, MIN_DATAGRAM] {
            let (mut enc, mut tx, mut rx) = pair(max);
            let u = unit(65536 + 10 + 14, 9);
            let batch = encode(&mut enc, &mut tx, std::slice::from_ref(&u));
            let n = batch.datagram_count();
            assert_eq!(n, u.len().div_ceil(max - OVERHEAD - CHUNK_HDR_LEN));
            for (i, d) in batch.datagrams().enumerate() {
                if i + 1 < n {
                    assert_eq!(d.len(), max, "datagram {i}");
                } else {
                    assert!(d.len() <= max && d.len() > OVERHEAD + CHUNK_HDR_LEN);
                }
            }
            // One run when the segment limit allows, split by it otherwise.
            let runs: Vec<_> = batch.runs(usize::MAX).collect();
            assert_eq!(runs.len(), 1);
            assert_eq!(runs[0].1, max);
            assert_eq!(runs[0].0.len(), batch.len_bytes());
            let runs: Vec<_> = batch.runs(10).collect();
            assert_eq!(runs.len(), n.div_ceil(10));
            assert!(runs.iter().all(|(b, seg)| *seg == max && b.len() <= 10 * max));
            assert_eq!(runs.iter().map(|r| r.0.len()).sum::<usize>(), batch.len_bytes());
            // And by bytes, for the kernel's 64 KiB GSO limit.
            for (b, seg) in batch.runs_within(64, 65_000) {
                assert!(b.len() <= 65_000.max(seg));
            }
            assert_eq!(receive_all(&mut rx, 0, batch.datagrams()), vec![u]);
        }
    }

    #[test]
    fn largest_unit_and_size_limits() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let mut batch = TxBatch::new();
        assert_eq!(enc.push(&mut tx, b"x", &mut batch), Err(DatapathError::NotBegun));
        assert_eq!(enc.finish(&mut tx, &mut batch), Err(DatapathError::NotBegun));
        enc.begin(&mut tx, hdr(), &mut batch);
        assert_eq!(enc.push(&mut tx, &[], &mut batch), Err(DatapathError::EmptyUnit));
        let too_big = vec![0u8; MAX_UNIT + 1];
        assert_eq!(enc.push(&mut tx, &too_big, &mut batch), Err(DatapathError::UnitTooLarge(MAX_UNIT + 1)));
        let max = unit(MAX_UNIT, 3);
        let fits = unit(enc.max_whole_unit(), 4);
        let chunked = unit(enc.max_whole_unit() + 1, 5);
        for u in [&max, &fits, &chunked] {
            enc.push(&mut tx, u, &mut batch).unwrap();
        }
        enc.finish(&mut tx, &mut batch).unwrap();
        let dgrams: Vec<_> = batch.datagrams().collect();
        // `fits` fills exactly one datagram; `chunked` takes two.
        let k = MAX_UNIT.div_ceil(enc.chunk_payload());
        assert_eq!(dgrams.len(), k + 1 + 2);
        assert_eq!(dgrams[k].len(), 1472);
        assert_eq!(receive_all(&mut rx, 0, dgrams), vec![max, fits, chunked]);
    }

    #[test]
    fn mixed_sizes_keep_their_order() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let sizes = [64, 1524, 100, 65_000, 1420, 1421, 9000, 60, 60, 70_000, 1, 5000];
        let units: Vec<_> = sizes.iter().enumerate().map(|(i, &n)| unit(n.min(MAX_UNIT), i as u8)).collect();
        let batch = encode(&mut enc, &mut tx, &units);
        for d in batch.datagrams() {
            assert!(d.len() <= 1472);
        }
        // Runs never mix segment sizes except for a shorter last one.
        let mut covered = 0;
        for (bytes, seg) in batch.runs(64) {
            let segs = bytes.len().div_ceil(seg);
            assert!(bytes.len() > (segs - 1) * seg);
            covered += bytes.len();
        }
        assert_eq!(covered, batch.len_bytes());
        assert_eq!(receive_all(&mut rx, 0, batch.datagrams()), units);
    }

    #[test]
    fn runs_group_equal_sizes() {
        let mut b = TxBatch::new();
        let mut push = |len: usize| {
            b.buf.extend(std::iter::repeat_n(0u8, len));
            b.ends.push(b.buf.len());
        };
        for len in [100, 100, 100, 40, 100, 50, 50, 60, 70, 70, 70] {
            push(len);
        }
        let sizes = |max: usize| b.runs(max).map(|(bytes, seg)| (bytes.len(), seg)).collect::<Vec<_>>();
        assert_eq!(sizes(64), vec![(340, 100), (150, 100), (50, 50), (60, 60), (210, 70)]);
        assert_eq!(sizes(2), vec![(200, 100), (140, 100), (150, 100), (50, 50), (60, 60), (140, 70), (70, 70)]);
        assert_eq!(sizes(0), sizes(1));
        assert_eq!(sizes(1).len(), b.datagram_count());
        let within: Vec<_> = b.runs_within(64, 250).map(|(bytes, seg)| (bytes.len(), seg)).collect();
        assert_eq!(within, vec![(200, 100), (140, 100), (150, 100), (50, 50), (60, 60), (210, 70)]);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.runs(8).count(), 0);
    }

    #[test]
    fn a_lost_chunk_drops_that_unit_only() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let a = unit(20_000, 1);
        let b = unit(30_000, 2);
        let small = unit(100, 3);
        let batch = encode(&mut enc, &mut tx, &[a, b.clone(), small.clone()]);
        let mut dgrams: Vec<_> = batch.datagrams().collect();
        dgrams.remove(5); // a chunk of `a`
        assert_eq!(receive_all(&mut rx, 0, dgrams), vec![b, small]);
        assert_eq!(rx.stats().reassembly_drops, 0);
        rx.expire(REASSEMBLY_TIMEOUT_MS - 1);
        assert_eq!(rx.stats().reassembly_drops, 0);
        rx.expire(REASSEMBLY_TIMEOUT_MS);
        assert_eq!(rx.stats().reassembly_drops, 1);
        // The stream goes on.
        let c = unit(40_000, 4);
        let batch = encode(&mut enc, &mut tx, std::slice::from_ref(&c));
        assert_eq!(receive_all(&mut rx, 600, batch.datagrams()), vec![c]);
    }

    #[test]
    fn a_unit_overtaken_often_enough_is_offered_for_salvage_with_its_holes() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let units: Vec<Vec<u8>> = (0..5).map(|i| unit(10_000, i)).collect();
        let batch = encode(&mut enc, &mut tx, &units);
        let per = 10_000usize.div_ceil(enc.chunk_payload());
        let lost = 3; // the fourth chunk of unit 0
        let delivered = std::cell::RefCell::new(Vec::new());
        let mut partial = Vec::new();
        for (i, d) in batch.datagrams().enumerate() {
            if i == lost {
                continue;
            }
            rx.receive_salvaging(
                0,
                &mut d.to_vec(),
                |_, _, u| delivered.borrow_mut().push(u.to_vec()),
                |_, _, _| {},
                |p, h, u, have| {
                    let c = enc.chunk_payload();
                    let holes: Vec<usize> = (0..per).filter(|&k| !have(k * c, ((k + 1) * c).min(u.len()))).collect();
                    assert_eq!(p, PEER);
                    assert_eq!(h.src, PEER);
                    assert_eq!(&u[..lost * c], &units[0][..lost * c], "bytes before the hole are the unit's");
                    partial.push((u.len(), holes, delivered.borrow().len()));
                },
            )
            .unwrap();
        }
        // Offered once, after SALVAGE_AFTER newer units completed and before the
        // one that made it so is delivered; the rest arrive whole.
        assert_eq!(partial, vec![(10_000, vec![lost], SALVAGE_AFTER as usize - 1)]);
        assert_eq!(delivered.into_inner(), units[1..].to_vec());
        assert_eq!(rx.stats().salvaged, 1);
        assert_eq!(rx.stats().reassembly_drops, 1);
    }

    #[test]
    fn the_last_unit_of_a_burst_is_salvaged_by_age() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let u = unit(6_000, 9);
        let batch = encode(&mut enc, &mut tx, std::slice::from_ref(&u));
        let mut dgrams: Vec<_> = batch.datagrams().collect();
        dgrams.pop();
        assert!(receive_all(&mut rx, 100, dgrams).is_empty());
        assert_eq!(rx.partial_units(), 1);
        let mut offered = 0;
        rx.salvage_older_than(100 + SALVAGE_AGE_MS - 1, SALVAGE_AGE_MS, |_, _, _, _| offered += 1);
        assert_eq!((offered, rx.partial_units()), (0, 1), "too young");
        rx.salvage_older_than(100 + SALVAGE_AGE_MS, SALVAGE_AGE_MS, |_, _, x, have| {
            offered += 1;
            assert_eq!(x.len(), 6_000);
            assert!(have(0, 1000) && !have(0, 6_000));
        });
        assert_eq!((offered, rx.partial_units()), (1, 0));
        assert_eq!(rx.stats().salvaged, 1);
    }

    #[test]
    fn a_chunk_late_by_fewer_overtakings_still_completes_its_unit() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let units: Vec<Vec<u8>> = (0..4).map(|i| unit(5_000, i)).collect();
        let batch = encode(&mut enc, &mut tx, &units);
        let per = 5_000usize.div_ceil(enc.chunk_payload());
        let mut order: Vec<&[u8]> = batch.datagrams().collect();
        // Unit 0's first chunk arrives after units 1 and 2 (SALVAGE_AFTER - 1 overtakings).
        let late = order.remove(0);
        order.insert(3 * per - 1, late);
        let got = receive_all(&mut rx, 0, order);
        assert_eq!(got, vec![units[1].clone(), units[2].clone(), units[0].clone(), units[3].clone()]);
        assert_eq!(rx.stats().salvaged, 0);
    }

    #[test]
    fn reordered_chunks_are_reassembled() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let a = unit(65_000, 7);
        let b = unit(3_000, 8);
        let batch = encode(&mut enc, &mut tx, &[a.clone(), b.clone()]);
        let mut dgrams: Vec<_> = batch.datagrams().collect();
        // Interleave: reverse `a`'s chunks and put `b`'s in the middle.
        let (da, db) = dgrams.split_at_mut(a.len().div_ceil(enc.chunk_payload()));
        da.reverse();
        let mut order: Vec<&[u8]> = da[..20].to_vec();
        order.extend_from_slice(db);
        order.extend_from_slice(&da[20..]);
        assert_eq!(receive_all(&mut rx, 0, order), vec![b, a]);
    }

    #[test]
    fn replayed_datagram_is_rejected() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let batch = encode(&mut enc, &mut tx, &[unit(10, 1)]);
        let d = batch.datagram(0).unwrap();
        assert_eq!(rx.receive(0, &mut d.to_vec(), |_, _, _| {}), Ok(1));
        assert_eq!(rx.receive(0, &mut d.to_vec(), |_, _, _| panic!("replay delivered")), Err(SessionError::Replay.into()));
        assert_eq!(rx.stats().replays, 1);
    }

    #[test]
    fn tampered_datagrams_fail_authentication() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let batch = encode(&mut enc, &mut tx, &[unit(50, 1), unit(60, 2)]);
        let d = batch.datagram(0).unwrap().to_vec();
        // Outer header bytes that still parse (receiver index and counter
        // excepted, which select another session or window position), the
        // ciphertext and the tag.
        let positions = [12, 15, OUTER_LEN, OUTER_LEN + INNER_LEN + 2, d.len() - TAG_LEN - 1, d.len() - TAG_LEN, d.len() - 1];
        for &i in &positions {
            let mut bad = d.clone();
            bad[i] ^= 0x01;
            assert_eq!(rx.receive(0, &mut bad, |_, _, _| panic!("forgery delivered")), Err(SessionError::AuthFailed.into()), "byte {i}");
        }
        assert_eq!(rx.stats().auth_failures, positions.len() as u64);
        // Forgeries did not consume the counter.
        assert_eq!(rx.receive(0, &mut d.clone(), |_, _, _| {}), Ok(2));
    }

    #[test]
    fn heartbeats_seal_to_the_asked_size_and_reach_only_the_heartbeat_callback() {
        let (_, mut tx, mut rx) = pair(1472);
        let mut batch = TxBatch::new();
        for size in [MIN_HEARTBEAT, 512, 1472] {
            seal_heartbeat(&mut tx, Heartbeat { heard: 1000, seq: size as u32 }, size, &mut batch).unwrap();
        }
        assert_eq!(batch.datagram_count(), 3);
        let mut seen = Vec::new();
        for (i, size) in [MIN_HEARTBEAT, 512, 1472].into_iter().enumerate() {
            let mut d = batch.datagram(i).unwrap().to_vec();
            assert_eq!(d.len(), size);
            let n = rx
                .receive_any(0, &mut d, |_, _, _| panic!("a heartbeat is not a unit"), |p, hb, len| seen.push((p, hb, len)))
                .unwrap();
            assert_eq!(n, 0);
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|(p, hb, _)| *p == PEER && hb.heard == 1000));
        assert_eq!(seen.iter().map(|s| s.2).collect::<Vec<_>>(), vec![MIN_HEARTBEAT, 512, 1472]);
        assert_eq!(rx.stats().heartbeats, 3);
        // Replayed, or one byte short: rejected.
        let mut again = batch.datagram(1).unwrap().to_vec();
        assert!(rx.receive_any(0, &mut again, |_, _, _| {}, |_, _, _| panic!("replay accepted")).is_err());
        let mut short = batch.datagram(2).unwrap().to_vec();
        short.truncate(MIN_HEARTBEAT - 1);
        assert_eq!(rx.receive(0, &mut short, |_, _, _| {}), Err(DatapathError::TooShort));
    }

    #[test]
    fn outer_header_problems_are_reported() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let batch = encode(&mut enc, &mut tx, &[unit(50, 1)]);
        let d = batch.datagram(0).unwrap().to_vec();
        for n in 0..OVERHEAD {
            assert_eq!(rx.receive(0, &mut d[..n].to_vec(), |_, _, _| {}), Err(DatapathError::TooShort));
        }
        let mut bad = d.clone();
        bad[0] = 3;
        assert_eq!(rx.receive(0, &mut bad, |_, _, _| {}), Err(DatapathError::BadKind));
        // A data datagram relabelled as a heartbeat fails authentication (the kind is associated data).
        let mut bad = d.clone();
        bad[0] = KIND_HEARTBEAT;
        assert_eq!(
            rx.receive(0, &mut bad, |_, _, _| {}),
            Err(DatapathError::Session(crate::session::SessionError::AuthFailed))
        );
        let mut bad = d.clone();
        bad[1] = 2;
        assert_eq!(rx.receive(0, &mut bad, |_, _, _| {}), Err(WireError::Reserved.into()));
        // UNSEALED on a sealed datagram from a peer never agreed: refused.
        let mut bad = d.clone();
        bad[1] = crate::wire::datagram::OUTER_FLAG_UNSEALED;
        assert_eq!(rx.receive(0, &mut bad, |_, _, _| {}), Err(DatapathError::UnsealedRefused));
        let mut bad = d.clone();
        bad[7] = 9;
        assert_eq!(rx.receive(0, &mut bad, |_, _, _| {}), Err(DatapathError::UnknownSession(9)));
        rx.remove_session(IDX);
        assert_eq!(rx.receive(0, &mut d.clone(), |_, _, _| {}), Err(DatapathError::UnknownSession(IDX)));
        let st = rx.stats();
        assert_eq!((st.malformed, st.unknown_session, st.unsealed_refused), (OVERHEAD as u64 + 2, 2, 1));
    }

    #[test]
    fn malformed_authentic_plaintext_delivers_nothing() {
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        let mut key = SealKey::new(&KEY);
        let mut p = plain(&[Record::Whole(b"good")]);
        p.extend_from_slice(&[0, 9, 0, 0, 1]); // len past end
        let mut d = seal_plain(&mut key, &p);
        assert_eq!(rx.receive(0, &mut d, |_, _, _| panic!("partial delivery")), Err(WireError::RecordPastEnd.into()));
        // A header-only plaintext is valid and empty.
        let mut d = seal_plain(&mut key, &hdr().to_bytes());
        assert_eq!(rx.receive(0, &mut d, |_, _, _| {}), Ok(0));
        let mut bad = hdr().to_bytes();
        InnerPacket::new_unchecked(&mut bad[..]).set_flags(0x80);
        let mut d = seal_plain(&mut key, &bad);
        assert_eq!(rx.receive(0, &mut d, |_, _, _| {}), Err(WireError::Reserved.into()));
        assert_eq!(rx.stats().malformed, 2);
        assert_eq!(rx.stats().datagrams_ok, 1);
    }

    /// The bitmap counts every byte once, for any mix of ranges: fresh,
    /// duplicate, overlapping, within one word, across many.
    #[test]
    fn a_slot_counts_each_byte_once_whatever_the_ranges() {
        const TOTAL: usize = 5000;
        let mut slot = Slot::default();
        slot.start(1, TOTAL as u32, 0, 0, hdr());
        let mut model = vec![false; TOTAL];
        let data = [7u8; TOTAL];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for i in 0..3000 {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let start = (rng >> 33) as usize % TOTAL;
            // Mostly short ranges, some chunk-sized ones.
            let max = if i % 7 == 0 { 1500 } else { 150 };
            let len = ((rng >> 11) as usize % max).min(TOTAL - start);
            slot.fill(start, &data[..len]);
            model[start..start + len].iter_mut().for_each(|b| *b = true);
            assert_eq!(slot.received as usize, model.iter().filter(|b| **b).count(), "after {start}..{}", start + len);
            let (a, b) = (start.saturating_sub(70), (start + len + 70).min(TOTAL));
            assert_eq!(slot.covers(a, b), model[a..b].iter().all(|x| *x));
            // And a range anywhere, of up to five words (empty ones cover).
            let c = (rng >> 20) as usize % TOTAL;
            let d = (c + (rng >> 40) as usize % 320).min(TOTAL);
            assert_eq!(slot.covers(c, d), model[c..d].iter().all(|x| *x), "covers({c}, {d})");
        }
        assert!(slot.covers(0, TOTAL));
        assert!(!slot.covers(0, TOTAL + 1) && !slot.covers(10, 5));
    }

    /// Duplicate and overlapping chunks must never complete a unit with holes.
    #[test]
    fn overlapping_chunks_cannot_fake_completion() {
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        let mut key = SealKey::new(&KEY);
        let u = unit(100, 77);
        let chunk = |off: usize, end: usize| Record::Chunk { unit_id: 5, offset: off as u32, total: 100, data: &u[off..end] };
        let mut delivered = Vec::new();
        fn send(rx: &mut Receiver, key: &mut SealKey, recs: &[Record<'_>], delivered: &mut Vec<Vec<u8>>) -> usize {
            let mut d = seal_plain(key, &plain(recs));
            rx.receive(0, &mut d, |_, _, x| delivered.push(x.to_vec())).unwrap()
        }
        let (r, k) = (&mut rx, &mut key);
        // 50 + 50 + 50 bytes arrive, but only 0..75 is covered.
        assert_eq!(send(r, k, &[chunk(0, 50)], &mut delivered), 0);
        assert_eq!(send(r, k, &[chunk(0, 50)], &mut delivered), 0);
        assert_eq!(send(r, k, &[chunk(25, 75), chunk(10, 20)], &mut delivered), 0);
        assert_eq!(send(r, k, &[chunk(74, 75), chunk(0, 1)], &mut delivered), 0);
        assert!(delivered.is_empty());
        // The last hole, overlapping what we have, completes it.
        assert_eq!(send(r, k, &[chunk(70, 100)], &mut delivered), 1);
        assert_eq!(delivered, vec![u.clone()]);
        // Chunks disagreeing on the total drop the partial unit.
        let bad = Record::Chunk { unit_id: 6, offset: 0, total: 99, data: &u[..10] };
        let good = Record::Chunk { unit_id: 6, offset: 0, total: 100, data: &u[..10] };
        assert_eq!(send(r, k, &[good], &mut delivered), 0);
        assert_eq!(send(r, k, &[bad], &mut delivered), 0);
        assert_eq!(r.stats().reassembly_drops, 1);
        // Late chunks of a finished or dropped unit do not start a new one.
        assert_eq!(send(r, k, &[chunk(0, 100)], &mut delivered), 0);
        assert_eq!(r.stats().stale_chunks, 1);
        assert_eq!(delivered.len(), 1);
    }

    #[test]
    fn a_new_unit_evicts_the_oldest_partial() {
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        let mut key = SealKey::new(&KEY);
        let u = unit(200, 1);
        let half = |id: u32, second: bool| {
            let (off, end) = if second { (100, 200) } else { (0, 100) };
            plain(&[Record::Chunk { unit_id: id, offset: off, total: 200, data: &u[off as usize..end] }])
        };
        let mut got = Vec::new();
        for id in 0..=REASSEMBLY_SLOTS as u32 {
            let mut d = seal_plain(&mut key, &half(id, false));
            rx.receive(id as u64, &mut d, |_, _, _| got.push(id)).unwrap();
        }
        assert_eq!(rx.stats().reassembly_drops, 1);
        for id in 0..=REASSEMBLY_SLOTS as u32 {
            let mut d = seal_plain(&mut key, &half(id, true));
            rx.receive(100, &mut d, |_, _, x| {
                assert_eq!(x, &u[..]);
                got.push(id)
            })
            .unwrap();
        }
        // Unit 0 was evicted; its late half is stale and evicts nobody.
        assert_eq!(got, (1..=REASSEMBLY_SLOTS as u32).collect::<Vec<_>>());
        assert_eq!(rx.stats().stale_chunks, 1);
        assert_eq!(rx.stats().reassembly_drops, 1);
    }

    #[test]
    fn counter_exhaustion_is_reported_and_nothing_unsealed_escapes() {
        let mut enc = Encoder::new(1472);
        let mut tx = TxSession::with_seal_key(IDX, SealKey::starting_at(&KEY, crate::session::COUNTER_LIMIT - 2));
        let mut batch = TxBatch::new();
        enc.begin(&mut tx, hdr(), &mut batch);
        enc.push(&mut tx, &unit(1000, 1), &mut batch).unwrap();
        enc.push(&mut tx, &unit(1000, 2), &mut batch).unwrap(); // seals the first
        // A chunked unit needing 3 counters when 1 remains, which the open datagram takes.
        assert_eq!(enc.push(&mut tx, &unit(3000, 3), &mut batch), Err(SessionError::CounterExhausted.into()));
        assert_eq!(batch.datagram_count(), 2);
        enc.push(&mut tx, &unit(1000, 4), &mut batch).unwrap();
        assert_eq!(enc.finish(&mut tx, &mut batch), Err(SessionError::CounterExhausted.into()));
        assert_eq!(batch.datagram_count(), 2);
        assert_eq!(batch.len_bytes(), batch.buf.len(), "unsealed bytes left in the batch");
        assert_eq!(tx.remaining(), 0);
    }

    #[test]
    fn begin_without_finish_discards_the_open_datagram() {
        let (mut enc, mut tx, mut rx) = pair(1472);
        let mut batch = TxBatch::new();
        enc.begin(&mut tx, hdr(), &mut batch);
        enc.push(&mut tx, b"lost", &mut batch).unwrap();
        enc.begin(&mut tx, hdr(), &mut batch);
        enc.push(&mut tx, b"kept", &mut batch).unwrap();
        enc.finish(&mut tx, &mut batch).unwrap();
        assert_eq!(receive_all(&mut rx, 0, batch.datagrams()), vec![b"kept".to_vec()]);
    }

    #[test]
    fn broadcast_and_several_sessions() {
        let mut rx = Receiver::new();
        let other = PeerName(0x0233_3333_3333);
        rx.add_session(1, PEER, &KEY);
        rx.add_session(2, other, &[9; KEY_LEN]);
        assert_eq!(rx.session_peer(2), Some(other));
        let mut enc = Encoder::new(1472);
        let mut tx = TxSession::new(2, &[9; KEY_LEN]);
        let bc = InnerHeader { ttl: 1, broadcast: true, src: other, dst: PeerName::BROADCAST };
        let mut batch = TxBatch::new();
        enc.begin(&mut tx, bc, &mut batch);
        enc.push(&mut tx, &unit(5000, 1), &mut batch).unwrap();
        enc.finish(&mut tx, &mut batch).unwrap();
        let mut n = 0;
        for d in batch.datagrams() {
            n += rx
                .receive(0, &mut d.to_vec(), |peer, inner, u| {
                    assert_eq!((peer, *inner), (other, bc));
                    assert_eq!(u, &unit(5000, 1)[..]);
                })
                .unwrap();
        }
        assert_eq!(n, 1);
    }

    /// A tiny deterministic PRNG (xorshift64).
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
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn mutate(rng: &mut XorShift, buf: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(4) {
            if buf.is_empty() {
                return;
            }
            let at = rng.below(buf.len());
            match rng.below(4) {
                0 => buf[at] ^= 1 << rng.below(8),
                1 => buf[at] = rng.next() as u8,
                2 => buf.truncate(at),
                _ => buf.insert(at, rng.next() as u8),
            }
        }
    }

    /// Deterministic fuzzing of `receive`: random bytes, mutated sealed
    /// datagrams, and authentic datagrams around random or mutated plaintexts
    /// (which reach the record parser and reassembly). Nothing panics, and
    /// every outcome is counted.
    #[test]
    fn random_datagrams_never_panic() {
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        let mut rx = Receiver::new();
        rx.add_session(IDX, PEER, &KEY);
        let mut key = SealKey::new(&KEY);
        let (mut enc, mut tx, _) = pair(256);
        let sealed: Vec<Vec<u8>> = encode(&mut enc, &mut tx, &[unit(30, 1), unit(100, 2), unit(700, 3), unit(40, 4)])
            .datagrams()
            .map(<[u8]>::to_vec)
            .collect();
        let u = unit(300, 5);
        let plains = [
            plain(&[Record::Whole(b"abc"), Record::Whole(&u[..40])]),
            plain(&[Record::Chunk { unit_id: 1, offset: 0, total: 300, data: &u[..150] }]),
            plain(&[
                Record::Chunk { unit_id: 1, offset: 150, total: 300, data: &u[150..] },
                Record::Whole(b"z"),
                Record::Chunk { unit_id: 2, offset: 100, total: 101, data: b"q" },
            ]),
        ];
        let mut now = 0;
        let mut buf = Vec::new();
        const N: u64 = 100_000;
        for i in 0..N {
            buf.clear();
            match i % 4 {
                0 => {
                    let n = rng.below(120);
                    buf.extend((0..n).map(|_| rng.next() as u8));
                    if i % 8 == 0 && buf.len() >= OUTER_LEN {
                        let c = rng.next() % 10_000;
                        buf[..OUTER_LEN].copy_from_slice(&OuterHeader { receiver_index: IDX, counter: c }.to_bytes());
                    }
                }
                1 => {
                    buf.extend_from_slice(&sealed[rng.below(sealed.len())]);
                    mutate(&mut rng, &mut buf);
                }
                2 => {
                    let mut p = plains[rng.below(plains.len())].clone();
                    mutate(&mut rng, &mut p);
                    buf = seal_plain(&mut key, &p);
                }
                _ => {
                    let mut p = hdr().to_bytes().to_vec();
                    let n = rng.below(80);
                    p.extend((0..n).map(|_| (rng.next() % 4) as u8));
                    buf = seal_plain(&mut key, &p);
                }
            }
            let _ = rx.receive(now, &mut buf, |_, _, x| assert!(!x.is_empty() && x.len() <= MAX_UNIT));
            if i % 1000 == 0 {
                now += 100;
                rx.expire(now);
            }
        }
        let s = rx.stats();
        assert_eq!(s.datagrams_ok + s.replays + s.auth_failures + s.malformed + s.unknown_session + s.unsealed_refused, N);
        assert_eq!(s.unsealed_ok, 0, "nothing unsealed is taken from a peer never agreed");
        assert!(s.datagrams_ok > N / 50 && s.units_delivered > 0, "{s:?}");
        assert!(s.malformed > 0 && s.auth_failures > 0 && s.replays > 0 && s.reassembly_drops > 0, "{s:?}");
    }

    /// `cargo test -p meshnet-proto --release -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_encode_receive_1gib() {
        use std::time::{Duration, Instant};
        const UNIT: usize = 64 * 1024;
        const TOTAL: usize = 1 << 30;
        const PER_BATCH: usize = 8;
        let u = unit(UNIT, 1);
        for max in [1472usize, 8972, MAX_DATAGRAM] {
            let (mut enc, mut tx, mut rx) = pair(max);
            let mut batch = TxBatch::with_capacity(PER_BATCH * (UNIT + UNIT / 16), 1024);
            let (mut t_enc, mut t_rx) = (Duration::ZERO, Duration::ZERO);
            let mut got = 0usize;
            for _ in 0..TOTAL / UNIT / PER_BATCH {
                let t = Instant::now();
                batch.clear();
                enc.begin(&mut tx, hdr(), &mut batch);
                for _ in 0..PER_BATCH {
                    enc.push(&mut tx, &u, &mut batch).unwrap();
                }
                enc.finish(&mut tx, &mut batch).unwrap();
                t_enc += t.elapsed();
                let t = Instant::now();
                for i in 0..batch.datagram_count() {
                    let (s, e) = batch.bounds(i);
                    rx.receive(0, &mut batch.buf[s..e], |_, _, x| got += x.len()).unwrap();
                }
                t_rx += t.elapsed();
            }
            assert_eq!(got, TOTAL);
            let gbs = |d: Duration| TOTAL as f64 / d.as_secs_f64() / 1e9;
            println!(
                "max_datagram {max:>5}: encode {:.2} GB/s, receive {:.2} GB/s, encode+receive on one core {:.2} GB/s ({:.1} Gbit/s)",
                gbs(t_enc),
                gbs(t_rx),
                gbs(t_enc + t_rx),
                gbs(t_enc + t_rx) * 8.0
            );
        }
    }
}
