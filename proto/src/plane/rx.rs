//! The RX plane: one received datagram in, actions out.
//!
//! [`RxPlane::receive`] opens a datagram ([`Receiver`]) and, for every unit in
//! it (whole records, and chunked units once complete):
//! 1. admits it by its claimed origin ([`ingress::admit`]): nothing of a
//!    refused frame is learned, relayed or delivered; a TTL higher than the
//!    sender could use is cut;
//! 2. a broadcast is passed down the source's spanning tree to this peer's
//!    children (TTL permitting) and then taken here; a unit for another peer
//!    is relayed, whole, towards it (or dropped and counted: no route, TTL
//!    spent); a unit for us is delivered;
//! 3. delivering learns the source MAC behind the origin (announced to the TX
//!    plane only when new, moved, or a minute old).
//!
//! Superframes that lost a chunk are salvaged: the whole segments that did
//! arrive are delivered as plain frames ([`gso::to_plain_frames_where`]),
//! when newer units overtook them and by age ([`RxPlane::poll`]).
//! Authenticated heartbeats are reported with the address they came from.
//!
//! What to do is returned in an [`RxOut`] the caller reuses: relayed
//! datagrams sealed under this plane's own *relay sessions* (never shared with
//! the TX plane), units to write into the device as places in the datagram,
//! in a reassembly slot, or in the out's arena. Nothing here performs I/O or
//! allocates per datagram once buffers have grown.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::stats::{add, Stats};
use super::traffic::{PeerTraffic, ThreadCounters};
use super::{Datagrams, Peer, PeerPath, PeerSet, QueueSealing, Routes, Segmenter, MIN_UNIT};
use crate::datapath::{DatapathError, Encoder, Place, Receiver, TxBatch, SALVAGE_AGE_MS};
use crate::gso::{self, GSO_NONE, VNET_HDR_LEN};
use crate::ingress::{self, UpstreamMap};
use crate::rekey::erase;
use crate::session::{relay_key, SessionError, RELAY_INDEX_BIT};
use crate::wire::datagram::{Heartbeat, InnerHeader, MAX_UNIT};
use crate::{Mac, PeerName};

/// How often a known remote MAC is re-announced to the TX plane, so that its
/// table does not age out a MAC that is still talking.
pub const MAC_REANNOUNCE_MS: u64 = 60 * 1000;
/// How often reassembly state is swept (and partial units timed out).
pub const EXPIRE_EVERY_MS: u64 = 250;
/// Announced MACs remembered before the memory is reset.
const MAX_ANNOUNCED: usize = 65536;

/// An authenticated heartbeat: from which peer, its size, and the address it
/// came from (a peer's datagrams go where its heartbeats come from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    pub peer: PeerName,
    pub heartbeat: Heartbeat,
    pub len: usize,
    pub from: SocketAddr,
}

#[derive(Debug, Clone, Copy)]
enum Held {
    /// Bytes of the datagram (decrypted in place).
    Datagram(usize, usize),
    /// A unit completed in a reassembly slot by the last receive.
    Slot { session: u64, slot: u8 },
    /// Bytes of the out's arena.
    Arena(usize, usize),
}

/// What the RX plane decided; reused by the caller.
///
/// `relays` and the deliveries describe the last [`RxPlane::receive`] or
/// [`RxPlane::poll`] only (both clear them). `learned` and `heard` accumulate
/// until the caller drains them.
#[derive(Debug, Default)]
pub struct RxOut {
    /// Datagrams to send to direct peers (relayed and passed-on broadcast units).
    pub relays: Datagrams,
    deliver: Vec<Held>,
    /// Frames salvaged from superframes that lost a chunk, delivered last.
    salvaged: Vec<Held>,
    arena: Vec<u8>,
    /// MACs seen behind peers, to tell the TX plane.
    pub learned: Vec<(Mac, PeerName)>,
    /// Heartbeats heard, to record in the liveness state.
    pub heard: Vec<Heard>,
}

impl RxOut {
    fn clear(&mut self) {
        self.relays.clear();
        self.deliver.clear();
        self.salvaged.clear();
        self.arena.clear();
    }

    /// Units to write into the device.
    pub fn deliveries(&self) -> usize {
        self.deliver.len() + self.salvaged.len()
    }
}

/// The receiving side's forwarding state: owned by one thread.
pub struct RxPlane {
    me: PeerName,
    max_datagram: usize,
    /// The device takes a virtio header (else units are written as plain frames).
    vnet: bool,
    receiver: Receiver,
    /// Direct peers with this plane's relay sessions to them.
    peers: PeerSet,
    routes: Arc<Routes>,
    encoder: Encoder,
    seg: Segmenter,
    salvage_scratch: Vec<u8>,
    stats: Arc<Stats>,
    counters: Arc<ThreadCounters>,
    /// Every peer's counters (kept after a peer goes: a datagram of its may
    /// still be queued), and the last peer a datagram came from.
    traffic: HashMap<PeerName, Arc<PeerTraffic>>,
    last_from: Option<(PeerName, Arc<PeerTraffic>)>,
    /// MACs told to the TX plane, and when.
    announced: HashMap<Mac, (PeerName, u64)>,
    last_expire: u64,
    /// The queue this plane's relay sessions seal on.
    sealing: QueueSealing,
}

impl RxPlane {
    /// # Panics
    /// If `max_datagram` is outside the datagram sizes the encoder supports.
    pub fn new(me: PeerName, max_datagram: usize, vnet: bool, stats: Arc<Stats>, counters: Arc<ThreadCounters>) -> RxPlane {
        RxPlane {
            me,
            max_datagram,
            vnet,
            receiver: Receiver::new(),
            peers: PeerSet::default(),
            routes: Arc::default(),
            encoder: Encoder::new(max_datagram),
            seg: Segmenter::new(),
            salvage_scratch: vec![0u8; MAX_UNIT + 64],
            stats,
            counters,
            traffic: HashMap::new(),
            last_from: None,
            announced: HashMap::new(),
            last_expire: 0,
            sealing: QueueSealing::default(),
        }
    }

    /// Makes this plane queue `sealing.queue` of `sealing.queues` (before any peer is added).
    pub fn set_queue(&mut self, sealing: QueueSealing) {
        self.sealing = sealing;
    }

    /// Accepts `path.peer`'s datagrams under `recv_index` (and relayed ones
    /// under its relay index), and relays to it under the relay session beside
    /// `send_index`/`send_key`. `recv_index` must leave [`RELAY_INDEX_BIT`] clear.
    pub fn add_peer(
        &mut self,
        path: PeerPath,
        recv_index: u32,
        recv_key: &[u8; 32],
        send_index: u32,
        send_key: &[u8; 32],
        traffic: Arc<PeerTraffic>,
    ) {
        let peer = path.peer;
        self.receiver.set_unsealed_from(peer, None);
        self.add_recv(peer, recv_index, recv_key);
        let session = self.sealing.relay(send_index, send_key, path.multiqueue);
        self.announced.retain(|_, (p, _)| *p != peer);
        self.traffic.insert(peer, traffic.clone());
        let max_datagram = self.max_datagram;
        self.peers.insert(Peer { path, session, traffic, max_datagram, unsealed: false });
    }

    /// Stops relaying to `peer` and accepting its sessions `recv_indexes`.
    pub fn remove_peer(&mut self, peer: PeerName, recv_indexes: &[u32]) {
        for &index in recv_indexes {
            self.remove_recv(index);
        }
        self.peers.remove(peer);
        self.receiver.set_unsealed_from(peer, None);
        // Its counters go back to the router's book, which forgets them once
        // the peer is gone for good (kept here, every peer ever seen stayed).
        self.traffic.remove(&peer);
        if self.last_from.as_ref().is_some_and(|(p, _)| *p == peer) {
            self.last_from = None;
        }
    }

    /// Accepts `peer`'s datagrams under `index` opened with `key`, and
    /// relayed ones under `index | RELAY_INDEX_BIT` with its relay key.
    pub fn add_recv(&mut self, peer: PeerName, index: u32, key: &[u8; 32]) {
        self.receiver.add_session(index, peer, key);
        let mut relay = relay_key(key);
        self.receiver.add_session(index | RELAY_INDEX_BIT, peer, &relay);
        erase(&mut relay);
    }

    /// Takes unsealed data datagrams from `peer`, from underlay address `addr`
    /// only (`trusted (userspace)`), or none (None; the default, also after
    /// the peer is added again).
    pub fn set_unsealed_from(&mut self, peer: PeerName, addr: Option<std::net::IpAddr>) {
        self.receiver.set_unsealed_from(peer, addr);
    }

    pub fn remove_recv(&mut self, index: u32) {
        self.receiver.remove_session(index);
        self.receiver.remove_session(index | RELAY_INDEX_BIT);
    }

    /// Relays to `peer` under the relay session of a new key, if its relay
    /// session still seals beside `from`.
    pub fn switch_relay(&mut self, peer: PeerName, from: u32, index: u32, key: &[u8; 32]) {
        let session = self.sealing.relay(index, key, self.peers.multiqueue(peer));
        self.peers.switch(peer, from, session);
    }

    pub fn set_routes(&mut self, routes: Arc<Routes>) {
        self.routes = routes;
    }

    /// Where `peer`'s datagrams go, and the largest that reaches it (None: unmeasured).
    pub fn set_path(&mut self, peer: PeerName, addr: SocketAddr, path_mtu: Option<usize>) {
        self.peers.set_path(peer, addr, path_mtu, self.max_datagram);
    }

    /// (receiver index with [`RELAY_INDEX_BIT`], datagrams sealed so far) of
    /// the relay session to `peer`.
    pub fn sealed(&self, peer: PeerName) -> Option<(u32, u64)> {
        self.peers.sealed(peer)
    }

    pub fn peer_names(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.peers.peers.iter().map(|p| p.path.peer)
    }

    /// How long the caller may sleep before [`poll`](Self::poll) has work:
    /// partial superframes waiting are salvaged after [`SALVAGE_AGE_MS`].
    pub fn timeout_ms(&self) -> Option<u64> {
        (self.receiver.partial_units() > 0).then_some(SALVAGE_AGE_MS)
    }

    /// The units to write into the device after the last `receive` (whose
    /// datagram is `dgram`) or `poll` (any `dgram`), in order.
    pub fn deliveries<'a>(&'a self, out: &'a RxOut, dgram: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        out.deliver.iter().chain(&out.salvaged).map(move |h| match *h {
            Held::Datagram(a, b) => dgram.get(a..b).unwrap_or_default(),
            Held::Slot { session, slot } => self.receiver.held_unit(session, slot).unwrap_or_default(),
            Held::Arena(a, b) => &out.arena[a..b],
        })
    }

    /// Time-driven work: sweeps timed-out reassemblies and salvages partial
    /// superframes older than [`SALVAGE_AGE_MS`]. Clears `out`'s relays and
    /// deliveries first; afterwards deliver what it lists.
    pub fn poll(&mut self, now: u64, out: &mut RxOut) {
        out.clear();
        if now.saturating_sub(self.last_expire) > EXPIRE_EVERY_MS {
            self.receiver.expire(now);
            self.last_expire = now;
            if self.announced.len() > MAX_ANNOUNCED {
                self.announced.clear();
            }
        }
        if self.receiver.partial_units() == 0 {
            return;
        }
        let (receiver, sink) = self.sink(now, 0, 0, out);
        let sink = RefCell::new(sink);
        receiver.salvage_older_than(now, SALVAGE_AGE_MS, |sender, hdr, unit, have| {
            sink.borrow_mut().partial(sender, hdr, unit, have)
        });
    }

    /// Handles one datagram that arrived from `from`: decrypts it in place
    /// and decides. Clears `out`'s relays and deliveries first; afterwards
    /// send `out.relays` and write [`deliveries`](Self::deliveries)`(out, dgram)`
    /// into the device before the next call.
    pub fn receive(&mut self, now: u64, dgram: &mut [u8], from: SocketAddr, out: &mut RxOut) -> Result<usize, DatapathError> {
        out.clear();
        add(&self.stats.udp_datagrams_in, 1);
        add(&self.stats.udp_bytes_in, dgram.len() as u64);
        let len = dgram.len();
        let unsealed = dgram.get(1).is_some_and(|&f| f & crate::wire::datagram::OUTER_FLAG_UNSEALED != 0);
        let (receiver, sink) = self.sink(now, dgram.as_ptr() as usize, len, out);
        // The three callbacks never run nested: one borrow at a time.
        let sink = RefCell::new(sink);
        let result = receiver.receive_placed_from(
            now,
            dgram,
            Some(from.ip()),
            |sender, hdr, unit, place| sink.borrow_mut().unit(sender, hdr, unit, place),
            |peer, heartbeat, len| sink.borrow_mut().out.heard.push(Heard { peer, heartbeat, len, from }),
            |sender, hdr, unit, have| sink.borrow_mut().partial(sender, hdr, unit, have),
        );
        drop(sink);
        match result {
            Ok(_) => {
                if unsealed {
                    add(&self.stats.udp_unsealed_in, 1);
                }
                if let Some(peer) = self.receiver.last_sender() {
                    if self.last_from.as_ref().is_none_or(|(p, _)| *p != peer) {
                        self.last_from = self.traffic.get(&peer).map(|t| (peer, t.clone()));
                    }
                    if let Some((_, t)) = &self.last_from {
                        t.rx.datagrams.add(1);
                        t.rx.bytes.add(len as u64);
                    }
                }
            }
            Err(DatapathError::UnknownSession(_)) => add(&self.stats.udp_unknown_session, 1),
            Err(DatapathError::UnsealedRefused) => {
                add(&self.stats.udp_unsealed_refused, 1);
                add(&self.stats.udp_rejected, 1);
            }
            Err(DatapathError::Session(SessionError::AuthFailed)) => {
                add(&self.stats.udp_auth_failed, 1);
                add(&self.stats.udp_rejected, 1);
            }
            Err(_) => add(&self.stats.udp_rejected, 1),
        }
        result
    }

    /// Splits the plane into its receiver and what the receiver's callbacks use.
    fn sink<'a>(&'a mut self, now: u64, base: usize, len: usize, out: &'a mut RxOut) -> (&'a mut Receiver, Sink<'a>) {
        let RxPlane {
            me, max_datagram, vnet, receiver, peers, routes, encoder, seg, salvage_scratch, stats, counters, traffic, announced, ..
        } = self;
        let sink = Sink {
            me: *me,
            vnet: *vnet,
            now,
            max_datagram: *max_datagram,
            base,
            len,
            routes,
            peers,
            encoder,
            seg,
            scratch: salvage_scratch,
            stats,
            counters,
            traffic,
            announced,
            out,
        };
        (receiver, sink)
    }
}

/// What the receiver's callbacks work with, for one `receive` or `poll`.
struct Sink<'a> {
    me: PeerName,
    vnet: bool,
    now: u64,
    max_datagram: usize,
    /// Address and length of the datagram being received (0 in `poll`).
    base: usize,
    len: usize,
    routes: &'a Routes,
    peers: &'a mut PeerSet,
    encoder: &'a mut Encoder,
    seg: &'a mut Segmenter,
    scratch: &'a mut Vec<u8>,
    stats: &'a Stats,
    counters: &'a ThreadCounters,
    traffic: &'a HashMap<PeerName, Arc<PeerTraffic>>,
    announced: &'a mut HashMap<Mac, (PeerName, u64)>,
    out: &'a mut RxOut,
}

impl Sink<'_> {
    /// A complete unit from direct peer `sender`.
    fn unit(&mut self, sender: PeerName, hdr: &InnerHeader, unit: &[u8], place: Place) {
        if unit.len() < MIN_UNIT {
            return;
        }
        // The claimed origin must fit the peer it came from; nothing of a
        // refused frame is learned, relayed or delivered.
        let Some(hdr) = admit(self.stats, self.me, sender, hdr, &self.routes.upstream, self.traffic) else { return };
        let onward = InnerHeader { ttl: hdr.ttl.saturating_sub(1), ..hdr };
        if hdr.broadcast {
            // Pass it down the source's tree, then take it ourselves.
            if onward.ttl > 0 {
                let routes = self.routes;
                for child in routes.children.get(&hdr.src).into_iter().flatten() {
                    if let Some(&hop) = self.peers.index.get(child) {
                        self.forward(hop, onward, unit);
                    }
                }
            }
        } else if hdr.dst != self.me {
            // Not ours: relay towards its destination, whole.
            match self.peers.hop_to(hdr.dst, self.routes) {
                Some(hop) if onward.ttl > 0 => self.forward(hop, onward, unit),
                _ => {
                    add(&self.stats.dropped_no_route, 1);
                    if let Some(t) = self.traffic.get(&sender) {
                        t.rx.dropped_no_route.add(1);
                    }
                }
            }
            return;
        }
        announce(self.announced, &mut self.out.learned, hdr.src, unit, self.now);
        let out = &mut *self.out;
        if !self.vnet {
            // No virtio header on this device: only plain frames go in.
            let deliver = &mut out.deliver;
            self.seg.plain_frames(unit, &mut out.arena, |a, b| deliver.push(Held::Arena(a, b)), self.stats);
            return;
        }
        if unit[1] != GSO_NONE {
            self.counters.rx.superframes.add(1);
        }
        let held = match place {
            Place::Datagram => {
                // A whole record: bytes of the datagram, decrypted in place.
                let start = (unit.as_ptr() as usize).wrapping_sub(self.base);
                if start > self.len || self.len - start < unit.len() {
                    debug_assert!(false, "a whole record outside its datagram");
                    return;
                }
                Held::Datagram(start, start + unit.len())
            }
            Place::Slot { session, slot } => Held::Slot { session, slot },
        };
        out.deliver.push(held);
    }

    /// Seals `unit` for the direct peer `hop` under `hdr` into the relays.
    fn forward(&mut self, hop: usize, hdr: InnerHeader, unit: &[u8]) {
        let p = &mut self.peers.peers[hop];
        let relays = &mut self.out.relays;
        let batch: &mut TxBatch = &mut relays.batch;
        let (first, bytes) = (batch.datagram_count(), batch.len_bytes());
        self.encoder.set_max_datagram(p.max_datagram);
        self.encoder.begin(&mut p.session, hdr, batch);
        let pushed = self.seg.push(p.path.superframes, self.encoder, &mut p.session, unit, batch, self.stats);
        if pushed.and_then(|()| self.encoder.finish(&mut p.session, batch)).is_err() {
            // All of the unit or none of it.
            batch.truncate(first);
            self.stats.encode_error();
            return;
        }
        add(&self.stats.relayed_units, 1);
        let rx = &p.traffic.rx;
        rx.relayed_units.add(1);
        rx.relayed_datagrams.add((batch.datagram_count() - first) as u64);
        rx.relayed_bytes.add((batch.len_bytes() - bytes) as u64);
        relays.close(first, p.path.addr, p.max_datagram >= self.max_datagram);
    }

    /// A superframe from `sender` that lost a chunk: its whole segments are
    /// delivered after the datagram's units, if it is for us and admitted.
    fn partial(&mut self, sender: PeerName, hdr: &InnerHeader, unit: &[u8], have: &dyn Fn(usize, usize) -> bool) {
        // Only what is for us: a relay passes whole units on or nothing.
        if !(hdr.broadcast || hdr.dst == self.me) {
            return;
        }
        let Some(hdr) = admit(self.stats, self.me, sender, hdr, &self.routes.upstream, self.traffic) else { return };
        if self.scratch.len() < MAX_UNIT + 64 {
            self.scratch.resize(MAX_UNIT + 64, 0);
        }
        let (vnet, now, origin) = (self.vnet, self.now, hdr.src);
        let Sink { scratch, announced, out, .. } = self;
        let RxOut { arena, salvaged, learned, .. } = &mut **out;
        let mut frames = 0u64;
        let _ = gso::to_plain_frames_where(unit, scratch, VNET_HDR_LEN, have, |f| {
            announce(announced, learned, origin, f, now);
            let f = if vnet { f } else { &f[VNET_HDR_LEN..] };
            let start = arena.len();
            arena.extend_from_slice(f);
            salvaged.push(Held::Arena(start, arena.len()));
            frames += 1;
        });
        add(&self.stats.salvaged_units, 1);
        add(&self.stats.salvaged_frames, frames);
    }
}

/// Notes that the source MAC of `unit` lives behind `origin`: told to the
/// TX plane when new, moved, or not told for [`MAC_REANNOUNCE_MS`].
fn announce(announced: &mut HashMap<Mac, (PeerName, u64)>, learned: &mut Vec<(Mac, PeerName)>, origin: PeerName, unit: &[u8], now: u64) {
    let Some(src) = unit.get(VNET_HDR_LEN + 6..VNET_HDR_LEN + 12) else { return };
    let src: Mac = src.try_into().expect("six bytes");
    if src[0] & 1 != 0 {
        return;
    }
    let fresh = match announced.get(&src) {
        Some(&(p, at)) => p != origin || now.saturating_sub(at) > MAC_REANNOUNCE_MS,
        None => true,
    };
    if fresh {
        announced.insert(src, (origin, now));
        learned.push((src, origin));
    }
}

/// [`ingress::admit`] for a frame from direct peer `sender`: counts a refusal
/// or a clamped TTL, and returns the header to handle the frame with.
fn admit(
    stats: &Stats,
    me: PeerName,
    sender: PeerName,
    hdr: &InnerHeader,
    upstream: &UpstreamMap,
    traffic: &HashMap<PeerName, Arc<PeerTraffic>>,
) -> Option<InnerHeader> {
    match ingress::admit(me, sender, hdr, |origin| upstream.get(&origin)) {
        Ok(a) => {
            if a.clamped {
                add(&stats.ttl_clamped, 1);
            }
            Some(a.hdr)
        }
        Err(why) => {
            add(&stats.refused[why.index()], 1);
            // Only the RX plane admits frames: it is these counters' one writer.
            if let Some(t) = traffic.get(&sender) {
                t.rx.refused[why.index()].add(1);
            }
            None
        }
    }
}
