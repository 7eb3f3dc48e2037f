//! The forwarding brain of the data plane, as two planes that never do I/O.
//!
//! The router reads units from its device and datagrams from its UDP socket,
//! hands them to a plane with the time, and performs what comes back (in the
//! shape of boringtun's `Tunn` and quinn-proto): the planes decide, the
//! router's threads only read → plane → perform.
//!
//! * [`tx::TxPlane`] (device → UDP) takes a batch of units read from the
//!   device: learns local source MACs, picks the owning peer and the next hop
//!   of each destination, answers frames too big for the destination's overlay
//!   with ICMP "fragmentation needed" written back to the device, floods
//!   broadcasts and unknown destinations to this peer's children in its own
//!   spanning tree, and seals everything per (next hop, destination). It also
//!   seals the heartbeats the liveness state asks for.
//! * [`rx::RxPlane`] (UDP → device) takes one received datagram: opens it,
//!   admits each unit by its claimed origin ([`crate::ingress`]), relays units
//!   for other peers whole towards them and passes broadcasts down the
//!   source's tree through its own *relay sessions*, cuts TTLs, salvages the
//!   segments of superframes that lost a chunk, and says what to deliver to
//!   the device, which MACs it learned behind which peer, and which peers'
//!   heartbeats it heard from where.
//!
//! Both answer in buffers the caller owns and reuses ([`Datagrams`],
//! [`tx::TxOut`], [`rx::RxOut`]): ranges into them, nothing allocated per
//! datagram once they have grown. What goes to the network is always a
//! [`Datagrams`]: sealed datagrams back to back with, per destination, the
//! range of them to send ([`Transmit`]), so one UDP sender (GSO runs in
//! `sendmmsg` batches) carries data, relays and heartbeats alike.
//!
//! Counters are in one place, [`stats::Stats`] and the per-peer
//! [`traffic::PeerTraffic`], written here and by the router's sender.

pub mod icmp;
pub mod rx;
pub mod stats;
pub mod traffic;
pub mod tx;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::datapath::{DatapathError, Encoder, TxBatch, TxSession, MIN_DATAGRAM};
pub use crate::session::MAX_QUEUES;
use crate::gso::{self, VNET_HDR_LEN};
use crate::ingress::UpstreamMap;
use crate::rekey::erase;
use crate::session::{relay_key, RELAY_INDEX_BIT};
use crate::wire::datagram::MAX_UNIT;
use crate::PeerName;

pub use stats::Stats;
pub use traffic::PeerTraffic;

/// Hop budget put in every datagram we originate.
pub const DEFAULT_TTL: u8 = crate::ingress::MAX_TTL;
/// The smallest unit worth looking at: a virtio header and an Ethernet header.
pub const MIN_UNIT: usize = VNET_HDR_LEN + 14;

/// How to reach peers that are not direct neighbours, and where broadcasts go.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// Next hop towards every reachable peer (a neighbour is its own next hop).
    pub next_hop: HashMap<PeerName, PeerName>,
    /// For each source peer, this peer's children in the source's spanning tree.
    pub children: HashMap<PeerName, Vec<PeerName>>,
    /// Overlay MTUs of peers that run a smaller one than ours.
    pub mtu: HashMap<PeerName, u32>,
    /// For each origin peer, how far it is and which direct peers may hand us
    /// its frames (one hop closer to it; the first is our parent in its tree).
    pub upstream: UpstreamMap,
}

/// Sealed datagrams back to back, and where each share of them goes.
#[derive(Debug, Default)]
pub struct Datagrams {
    pub batch: TxBatch,
    pub sends: Vec<Transmit>,
}

impl Datagrams {
    pub fn clear(&mut self) {
        self.batch.clear();
        self.sends.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }

    /// Records that the datagrams sealed since `first` go to `addr`.
    fn close(&mut self, first: usize, addr: SocketAddr, gso: bool) {
        let end = self.batch.datagram_count();
        if end > first {
            self.sends.push(Transmit { addr, datagrams: first..end, gso });
        }
    }
}

/// One destination's share of a [`Datagrams`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub addr: SocketAddr,
    /// Indexes of the datagrams in the batch.
    pub datagrams: std::ops::Range<usize>,
    /// Runs of equal-sized datagrams may go as one UDP GSO message. False for a
    /// path whose probing found that large datagrams vanish (no filter on the
    /// way should ever see a GSO send whole) and for heartbeats, each of which
    /// probes its own size: one datagram per message.
    pub gso: bool,
}

/// What a plane needs to know of one direct peer: where to send, under which
/// session, and what it takes.
#[derive(Clone, Debug)]
pub struct PeerPath {
    pub peer: PeerName,
    pub addr: SocketAddr,
    /// The peer advertised `CAP_SUPERFRAMES`: it takes units whole; otherwise
    /// they go to it as plain frames (segmented here).
    pub superframes: bool,
    /// The peer advertised `CAP_MULTIQUEUE`: it opens a counter space per
    /// (session, queue) and steers by the queue field, so each of our queues
    /// seals for it under a key of its own. Otherwise our queues share one
    /// counter space for it (see [`QueueSealing`]).
    pub multiqueue: bool,
}

/// Which queue (forwarding thread pair) a plane belongs to, and so how it
/// makes its sending sessions.
///
/// * One queue (`queues` 1, the default): a session seals under the key the
///   handshake made, queue field 0: what a router without queues does.
/// * Several, to a peer with `CAP_MULTIQUEUE`: queue q seals under
///   [`crate::session::queue_key`] with the queue field q: no counter, key or
///   replay window is shared with another queue.
/// * Several, to a peer without it (an older router): every queue seals under
///   the handshake's key with queue field 0, taking counters from one atomic
///   per session ([`SharedCounters`]): one shared read-modify-write per
///   datagram, for such peers only.
#[derive(Clone, Debug)]
pub struct QueueSealing {
    pub queue: u16,
    pub queues: u16,
    pub shared: Arc<SharedCounters>,
}

impl Default for QueueSealing {
    fn default() -> Self {
        QueueSealing { queue: 0, queues: 1, shared: Arc::default() }
    }
}

impl QueueSealing {
    /// The session this queue seals under towards a peer whose receiver
    /// index is `index`, keyed `key`.
    pub fn session(&self, index: u32, key: &[u8; 32], multiqueue: bool) -> TxSession {
        if self.queues <= 1 {
            TxSession::new(index, key)
        } else if multiqueue {
            TxSession::on_queue(index, key, self.queue)
        } else {
            TxSession::shared(index, key, self.shared.counter(index), self.queue)
        }
    }

    /// The relay session beside the direct one sealing under `index`/`key`
    /// (see [`relay_session`]), for this queue.
    pub fn relay(&self, index: u32, key: &[u8; 32], multiqueue: bool) -> TxSession {
        let mut relay = relay_key(key);
        let session = self.session(index | RELAY_INDEX_BIT, &relay, multiqueue);
        erase(&mut relay);
        session
    }
}

/// The counter spaces the queues share for peers without `CAP_MULTIQUEUE`,
/// by receiver index (relay bit included). Locked only when a session is made.
#[derive(Debug, Default)]
pub struct SharedCounters(std::sync::Mutex<HashMap<u32, std::sync::Weak<std::sync::atomic::AtomicU64>>>);

impl SharedCounters {
    /// The counter of the sessions under `index`, shared by every queue.
    pub fn counter(&self, index: u32) -> Arc<std::sync::atomic::AtomicU64> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, w| w.strong_count() > 0);
        if let Some(c) = m.get(&index).and_then(|w| w.upgrade()) {
            return c;
        }
        let c = Arc::new(std::sync::atomic::AtomicU64::new(0));
        m.insert(index, Arc::downgrade(&c));
        c
    }
}

/// One direct peer in a plane: its path, its sealing session and counters.
pub(crate) struct Peer {
    pub(crate) path: PeerPath,
    pub(crate) session: TxSession,
    pub(crate) traffic: Arc<PeerTraffic>,
    /// The largest datagram the path to the peer carries (its path MTU).
    pub(crate) max_datagram: usize,
    /// Units from our TAP to this peer itself go unsealed (`trusted
    /// (userspace)`, set by [`tx::TxPlane::set_unsealed`]); relayed and
    /// broadcast units to it stay sealed.
    pub(crate) unsealed: bool,
}

/// Direct peers by name, each with its sealing session.
#[derive(Default)]
pub(crate) struct PeerSet {
    pub(crate) peers: Vec<Peer>,
    pub(crate) index: HashMap<PeerName, usize>,
}

impl PeerSet {
    pub(crate) fn insert(&mut self, entry: Peer) {
        match self.index.get(&entry.path.peer) {
            Some(&i) => self.peers[i] = entry,
            None => {
                self.index.insert(entry.path.peer, self.peers.len());
                self.peers.push(entry);
            }
        }
    }

    pub(crate) fn remove(&mut self, peer: PeerName) -> bool {
        let Some(i) = self.index.remove(&peer) else { return false };
        self.peers.swap_remove(i);
        if i < self.peers.len() {
            self.index.insert(self.peers[i].path.peer, i);
        }
        true
    }

    /// Whether `peer` takes queues (`CAP_MULTIQUEUE`); false for an unknown peer.
    pub(crate) fn multiqueue(&self, peer: PeerName) -> bool {
        self.index.get(&peer).is_some_and(|&i| self.peers[i].path.multiqueue)
    }

    pub(crate) fn get_mut(&mut self, peer: PeerName) -> Option<&mut Peer> {
        self.index.get(&peer).map(|&i| &mut self.peers[i])
    }

    /// The direct peer to hand a unit for `dst` to: its next hop, which is the
    /// peer itself only while the connection to it carries data.
    pub(crate) fn hop_to(&self, dst: PeerName, routes: &Routes) -> Option<usize> {
        routes.next_hop.get(&dst).and_then(|h| self.index.get(h)).copied()
    }

    /// Takes a peer's learned address and path MTU (the largest datagram known
    /// to reach it; None: not measured, our own maximum).
    pub(crate) fn set_path(&mut self, peer: PeerName, addr: SocketAddr, path_mtu: Option<usize>, max_datagram: usize) {
        if let Some(p) = self.get_mut(peer) {
            p.path.addr = addr;
            p.max_datagram = path_mtu.unwrap_or(max_datagram).clamp(MIN_DATAGRAM, max_datagram);
        }
    }

    /// (receiver index, datagrams sealed) of `peer`'s session.
    pub(crate) fn sealed(&self, peer: PeerName) -> Option<(u32, u64)> {
        let p = &self.peers[*self.index.get(&peer)?];
        Some((p.session.receiver_index(), crate::session::COUNTER_LIMIT - p.session.remaining()))
    }

    /// Seals for `peer` under a new key, if it still seals under `from`
    /// (compared without the relay bit). The old session's key is erased.
    pub(crate) fn switch(&mut self, peer: PeerName, from: u32, session: TxSession) -> bool {
        match self.get_mut(peer) {
            Some(p) if p.session.receiver_index() & !RELAY_INDEX_BIT == from => {
                p.session = session;
                true
            }
            _ => false,
        }
    }
}

/// The sending session beside the direct one sealing under `index`/`key` that
/// carries relayed units: its own key and receiver index (with
/// [`RELAY_INDEX_BIT`]), so that the RX plane never shares a counter space
/// with the TX plane.
pub fn relay_session(index: u32, key: &[u8; 32]) -> TxSession {
    let mut relay = relay_key(key);
    let session = TxSession::new(index | RELAY_INDEX_BIT, &relay);
    erase(&mut relay);
    session
}

/// Scratch for cutting units into plain frames in software, allocated once.
pub(crate) struct Segmenter {
    scratch: Vec<u8>,
}

impl Segmenter {
    pub(crate) fn new() -> Self {
        Segmenter { scratch: vec![0u8; MAX_UNIT + 64] }
    }

    /// Gives the Encoder `unit` for a next hop: whole when it takes
    /// superframes or the unit is already plain, else the plain frames it
    /// segments into, each behind a zeroed virtio header. A unit that cannot
    /// be segmented is counted and dropped.
    pub(crate) fn push(
        &mut self,
        superframes: bool,
        encoder: &mut Encoder,
        session: &mut TxSession,
        unit: &[u8],
        batch: &mut TxBatch,
        stats: &Stats,
    ) -> Result<(), DatapathError> {
        if superframes || gso::is_plain(unit) {
            return encoder.push(session, unit, batch);
        }
        let mut pushed = Ok(());
        let made = gso::to_plain_frames(unit, &mut self.scratch, VNET_HDR_LEN, |u| {
            if let Err(e) = encoder.push(session, u, batch) {
                pushed = Err(e);
            }
        });
        stats.per_frame.count(made);
        pushed
    }

    /// Appends `unit` as frames for a device without a virtio header to
    /// `arena`: its frame when plain, else the frames it segments into, calling
    /// `emit(start, end)` with each one's range. A unit that cannot be
    /// segmented is counted and dropped.
    pub(crate) fn plain_frames(&mut self, unit: &[u8], arena: &mut Vec<u8>, mut emit: impl FnMut(usize, usize), stats: &Stats) {
        if gso::is_plain(unit) {
            let start = arena.len();
            arena.extend_from_slice(unit.get(VNET_HDR_LEN..).unwrap_or_default());
            emit(start, arena.len());
            return;
        }
        let made = gso::to_plain_frames(unit, &mut self.scratch, 0, |f| {
            let start = arena.len();
            arena.extend_from_slice(f);
            emit(start, arena.len());
        });
        if made.is_err() {
            stats::add(&stats.tap_write_errors, 1);
        }
        stats.per_frame.count(made);
    }
}
