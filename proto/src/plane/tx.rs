//! The TX plane: units read from the device in, datagrams (and frames for the
//! device) out.
//!
//! Per batch of units, [`TxPlane::handle`]:
//! 1. learns each unit's source MAC as local;
//! 2. classifies it: unicast to the peer that owns the destination MAC (via
//!    that peer's next hop), dropped (the destination is local), too big for
//!    the destination's overlay (an ICMP "fragmentation needed" frame for the
//!    device, if the packet asks for one), or flooded (broadcast, multicast,
//!    unknown destination, or no route to the owner);
//! 3. seals, direct peer by direct peer, one inner header per final
//!    destination, the flood under a broadcast header to this peer's children
//!    in its own spanning tree; a next hop without superframes gets plain
//!    frames (segmented here);
//! 4. records per direct peer which datagrams go to its address ([`TxOut`]).
//!
//! [`TxPlane::seal_heartbeats`] seals the heartbeats liveness asks for, one
//! datagram per message. Nothing here performs I/O, reads the clock or
//! allocates per unit once the output buffers have grown.

use std::net::SocketAddr;
use std::sync::Arc;

use super::icmp;
use super::stats::{add, Stats};
use super::traffic::{PeerTraffic, ThreadCounters};
use super::{Datagrams, Peer, PeerPath, PeerSet, QueueSealing, Routes, Segmenter, Transmit, DEFAULT_TTL, MIN_UNIT};
use crate::datapath::{seal_heartbeat, Encoder, MIN_HEARTBEAT};
use crate::gso::{GSO_NONE, VNET_HDR_LEN};
use crate::mac_table::{Learned, MacOwner, MacTable};
use crate::wire::datagram::{Heartbeat, InnerHeader};
use crate::{Mac, PeerName};

/// MAC ageing (Weave uses ten minutes).
pub const MAC_AGEING_MS: u64 = 10 * 60 * 1000;
/// How often the MAC table is swept for aged entries.
const MAC_EXPIRE_EVERY_MS: u64 = 10_000;

/// What one batch of units became.
#[derive(Debug, Default)]
pub struct TxOut {
    /// Sealed datagrams and, per direct peer, the range of them to send it.
    pub datagrams: Datagrams,
    /// Frames to write back into the device (ICMP errors), as ranges of `device_bytes`.
    device: Vec<(usize, usize)>,
    device_bytes: Vec<u8>,
    /// Source MACs last seen behind a peer that now come from the device (a
    /// container moved here): for whoever mirrors MAC owners elsewhere.
    pub moved_local: Vec<Mac>,
}

impl TxOut {
    pub fn clear(&mut self) {
        self.datagrams.clear();
        self.device.clear();
        self.device_bytes.clear();
        self.moved_local.clear();
    }

    /// The frames for the device, each as the device takes it (with a zeroed
    /// virtio header when the device has one).
    pub fn device_frames(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.device.iter().map(|&(a, b)| &self.device_bytes[a..b])
    }
}

/// The sending side's forwarding state: owned by one thread.
pub struct TxPlane {
    me: PeerName,
    max_datagram: usize,
    /// The device's units carry a virtio header (else it is zeroed by the reader
    /// and frames for the device go without it).
    vnet: bool,
    peers: PeerSet,
    routes: Arc<Routes>,
    macs: MacTable,
    encoder: Encoder,
    seg: Segmenter,
    stats: Arc<Stats>,
    counters: Arc<ThreadCounters>,
    /// The queue this plane seals on.
    sealing: QueueSealing,
    last_expire: u64,
    // Reused per batch.
    flood: Vec<u16>,
    /// (direct peer index, final destination, unit index), sorted to group datagrams.
    unicast: Vec<(u16, u64, u16)>,
    flood_to: Vec<u16>,
}

impl TxPlane {
    /// # Panics
    /// If `max_datagram` is outside the datagram sizes the encoder supports.
    pub fn new(me: PeerName, max_datagram: usize, vnet: bool, stats: Arc<Stats>, counters: Arc<ThreadCounters>) -> TxPlane {
        TxPlane {
            me,
            max_datagram,
            vnet,
            peers: PeerSet::default(),
            routes: Arc::default(),
            macs: MacTable::new(MAC_AGEING_MS),
            encoder: Encoder::new(max_datagram),
            seg: Segmenter::new(),
            stats,
            counters,
            sealing: QueueSealing::default(),
            last_expire: 0,
            flood: Vec::new(),
            unicast: Vec::new(),
            flood_to: Vec::new(),
        }
    }

    /// Makes this plane queue `sealing.queue` of `sealing.queues` (before any peer is added).
    pub fn set_queue(&mut self, sealing: QueueSealing) {
        self.sealing = sealing;
    }

    /// Adds (or replaces) a direct peer, sealing under `send_index`/`send_key`.
    pub fn add_peer(&mut self, path: PeerPath, send_index: u32, send_key: &[u8; 32], traffic: Arc<PeerTraffic>) {
        let session = self.sealing.session(send_index, send_key, path.multiqueue);
        let max_datagram = self.max_datagram;
        self.peers.insert(Peer { path, session, traffic, max_datagram, unsealed: false });
    }

    /// Sends units for `peer` itself unsealed (`trusted (userspace)`: the
    /// connection is trusted both ways and the peer has
    /// `CAP_TRUSTED_USERSPACE`), or sealed again. Broadcasts and units
    /// relayed through `peer` stay sealed. A peer added again starts sealed.
    pub fn set_unsealed(&mut self, peer: PeerName, unsealed: bool) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.unsealed = unsealed;
        }
    }

    /// Forgets a direct peer and the MACs learned behind it.
    pub fn remove_peer(&mut self, peer: PeerName) {
        if self.peers.remove(peer) {
            self.macs.remove_peer(peer);
        }
    }

    /// Seals for `peer` under a new key from now on, if it still seals under
    /// `from` (the connection was not replaced meanwhile).
    pub fn switch(&mut self, peer: PeerName, from: u32, index: u32, key: &[u8; 32]) {
        let session = self.sealing.session(index, key, self.peers.multiqueue(peer));
        self.peers.switch(peer, from, session);
    }

    /// A remote MAC seen behind `peer` (by the RX plane).
    pub fn learn(&mut self, mac: Mac, peer: PeerName, now: u64) {
        self.macs.learn(mac, MacOwner::Peer(peer), now);
    }

    pub fn set_routes(&mut self, routes: Arc<Routes>) {
        self.routes = routes;
    }

    /// Where `peer`'s datagrams go, and the largest that reaches it (None: unmeasured).
    pub fn set_path(&mut self, peer: PeerName, addr: SocketAddr, path_mtu: Option<usize>) {
        self.peers.set_path(peer, addr, path_mtu, self.max_datagram);
    }

    /// (receiver index, datagrams sealed so far) of the session sealing for `peer`.
    pub fn sealed(&self, peer: PeerName) -> Option<(u32, u64)> {
        self.peers.sealed(peer)
    }

    pub fn peer_names(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.peers.peers.iter().map(|p| p.path.peer)
    }

    /// Entries in the MAC table (local and remote).
    pub fn mac_entries(&self) -> usize {
        self.macs.len()
    }

    /// Who owns `mac` now, as the plane would forward to it.
    pub fn mac_owner(&self, mac: &Mac, now: u64) -> Option<MacOwner> {
        self.macs.lookup(mac, now)
    }

    /// Seals one heartbeat datagram for `peer` per size in `sizes` (0 is the
    /// smallest heartbeat) into `out`, one datagram per message.
    pub fn seal_heartbeats(&mut self, peer: PeerName, hb: Heartbeat, sizes: &[u16], out: &mut Datagrams) {
        let max_datagram = self.max_datagram;
        let Some(p) = self.peers.get_mut(peer) else { return };
        let (first, bytes) = (out.batch.datagram_count(), out.batch.len_bytes());
        for &size in sizes {
            let size = (size as usize).clamp(MIN_HEARTBEAT, max_datagram);
            if seal_heartbeat(&mut p.session, hb, size, &mut out.batch).is_err() {
                self.stats.encode_error();
                p.traffic.tx.encode_errors.add(1);
            }
        }
        let n = (out.batch.datagram_count() - first) as u64;
        add(&self.stats.heartbeats_out, n);
        p.traffic.tx.datagrams.add(n);
        p.traffic.tx.bytes.add((out.batch.len_bytes() - bytes) as u64);
        out.close(first, p.path.addr, false);
    }

    /// Decides and seals what a batch of units read from the device becomes:
    /// `units[i][..lens[i]]` is one unit (virtio header, zeroed if the device
    /// has none, then the Ethernet frame). `out` is cleared first.
    pub fn handle<U: AsRef<[u8]>>(&mut self, now: u64, units: &[U], lens: &[usize], out: &mut TxOut) {
        out.clear();
        let n = units.len().min(lens.len()).min(u16::MAX as usize);
        if now.saturating_sub(self.last_expire) > MAC_EXPIRE_EVERY_MS {
            self.macs.expire(now);
            self.last_expire = now;
        }
        let routes = self.routes.clone();

        // Classify: unicast to a known peer, dropped (local), or flooded.
        self.flood.clear();
        self.unicast.clear();
        for i in 0..n {
            let unit = units[i].as_ref();
            let len = lens[i].min(unit.len());
            let unit = &unit[..len];
            add(&self.stats.tap_units_in, 1);
            add(&self.stats.tap_bytes_in, len as u64);
            if len < MIN_UNIT {
                continue;
            }
            if unit[1] != GSO_NONE {
                // virtio gso_type: a superframe the kernel left whole.
                self.counters.tx_superframes.add(1);
            }
            let frame = &unit[VNET_HDR_LEN..];
            let dst: Mac = frame[0..6].try_into().expect("14 bytes checked");
            let src: Mac = frame[6..12].try_into().expect("14 bytes checked");
            if let Learned::Moved { from: MacOwner::Peer(_) } = self.macs.learn(src, MacOwner::Local, now) {
                out.moved_local.push(src);
            }
            if dst[0] & 1 != 0 {
                self.flood.push(i as u16);
                continue;
            }
            match self.macs.lookup(&dst, now) {
                Some(MacOwner::Peer(p)) if !routes.mtu.is_empty() && self.too_big(unit, p, &routes, out) => {}
                Some(MacOwner::Peer(p)) => match self.peers.hop_to(p, &routes) {
                    Some(hop) => self.unicast.push((hop as u16, p.0, i as u16)),
                    None => self.flood.push(i as u16),
                },
                Some(MacOwner::Local) => {}
                None => self.flood.push(i as u16),
            }
        }
        if self.peers.peers.is_empty() {
            add(&self.stats.dropped_no_peer, n as u64);
            return;
        }

        // Broadcasts go down this peer's own spanning tree.
        self.flood_to.clear();
        if let (false, Some(children)) = (self.flood.is_empty(), routes.children.get(&self.me)) {
            let index = &self.peers.index;
            self.flood_to.extend(children.iter().filter_map(|c| index.get(c)).map(|&i| i as u16));
        }

        // Seal, direct peer by direct peer, one header per final destination.
        self.unicast.sort_unstable();
        let TxPlane { me, max_datagram, peers, encoder, seg, stats, unicast, flood, flood_to, .. } = self;
        let batch = &mut out.datagrams.batch;
        let mut u = 0;
        for (pi, p) in peers.peers.iter_mut().enumerate() {
            let (first, bytes) = (batch.datagram_count(), batch.len_bytes());
            encoder.set_max_datagram(p.max_datagram);
            while u < unicast.len() && unicast[u].0 as usize == pi {
                let dst = unicast[u].1;
                let start = u;
                while u < unicast.len() && unicast[u].0 as usize == pi && unicast[u].1 == dst {
                    u += 1;
                }
                let hdr = InnerHeader { ttl: DEFAULT_TTL, broadcast: false, src: *me, dst: PeerName(dst) };
                p.traffic.tx.units.add((u - start) as u64);
                let which = unicast[start..u].iter().map(|x| x.2);
                encode(encoder, seg, p, hdr, which, units, lens, batch, stats);
            }
            if flood_to.contains(&(pi as u16)) {
                let hdr = InnerHeader { ttl: DEFAULT_TTL, broadcast: true, src: *me, dst: PeerName::BROADCAST };
                p.traffic.tx.units.add(flood.len() as u64);
                encode(encoder, seg, p, hdr, flood.iter().copied(), units, lens, batch, stats);
            }
            let made = batch.datagram_count() - first;
            if made > 0 {
                p.traffic.tx.datagrams.add(made as u64);
                p.traffic.tx.bytes.add((batch.len_bytes() - bytes) as u64);
                // A path whose probing found a black hole below our largest
                // datagram gets its datagrams one per message.
                let gso = p.max_datagram >= *max_datagram;
                out.datagrams.sends.push(Transmit { addr: p.path.addr, datagrams: first..first + made, gso });
            }
        }
    }

    /// Whether `unit` (a plain frame, not a superframe) is too big for the
    /// destination peer's overlay; if so, answers an IPv4 DF packet with ICMP
    /// "fragmentation needed", and an IPv6 packet with ICMPv6 "packet too big",
    /// for the device (both counted in `frag_needed_sent`).
    #[cold]
    fn too_big(&self, unit: &[u8], dst: PeerName, routes: &Routes, out: &mut TxOut) -> bool {
        let Some(&mtu) = routes.mtu.get(&dst) else { return false };
        if unit[1] != GSO_NONE || unit.len() <= MIN_UNIT + mtu as usize {
            return false;
        }
        let mtu16 = mtu.min(u16::MAX as u32) as u16;
        let frame = &unit[VNET_HDR_LEN..];
        let mut reply = [0u8; icmp::MAX_REPLY_V6];
        let n = match frame.get(12..14) {
            Some([0x86, 0xdd]) => icmp::packet_too_big(frame, mtu16, &mut reply),
            _ => {
                let mut r4 = [0u8; icmp::MAX_REPLY];
                icmp::frag_needed(frame, mtu16, &mut r4).inspect(|&n| reply[..n].copy_from_slice(&r4[..n]))
            }
        };
        if let Some(n) = n {
            let start = out.device_bytes.len();
            if self.vnet {
                out.device_bytes.extend_from_slice(&[0u8; VNET_HDR_LEN]);
            }
            out.device_bytes.extend_from_slice(&reply[..n]);
            out.device.push((start, out.device_bytes.len()));
            add(&self.stats.frag_needed_sent, 1);
        }
        // Too big either way: the destination's bridge would drop it.
        add(&self.stats.dropped_too_big, 1);
        true
    }
}

/// Seals units `which` for direct peer `p` under `hdr` into `batch`. A unit
/// that cannot be sealed, and a last datagram that cannot, are counted in
/// `encode_errors` and dropped; the others still go.
#[allow(clippy::too_many_arguments)]
fn encode<U: AsRef<[u8]>>(
    encoder: &mut Encoder,
    seg: &mut Segmenter,
    p: &mut Peer,
    hdr: InnerHeader,
    which: impl Iterator<Item = u16>,
    units: &[U],
    lens: &[usize],
    batch: &mut crate::datapath::TxBatch,
    stats: &Stats,
) {
    let unsealed = p.unsealed && hdr.dst == p.path.peer;
    let first = batch.datagram_count();
    encoder.begin_as(&mut p.session, hdr, batch, unsealed);
    for i in which {
        let i = i as usize;
        let unit = units[i].as_ref();
        let unit = &unit[..lens[i].min(unit.len())];
        if seg.push(p.path.superframes, encoder, &mut p.session, unit, batch, stats).is_err() {
            stats.encode_error();
            p.traffic.tx.encode_errors.add(1);
        }
    }
    if encoder.finish(&mut p.session, batch).is_err() {
        stats.encode_error();
        p.traffic.tx.encode_errors.add(1);
    }
    if unsealed {
        add(&stats.udp_unsealed_out, (batch.datagram_count() - first) as u64);
    }
}
