//! The forwarding loop: two threads, one per direction, each owning its state.
//!
//! * **TAP → UDP** reads units (virtio header + Ethernet frame, up to ~64 KiB with
//!   TSO) from the TAP in batches, learns local source MACs, picks the owning peer
//!   of each destination MAC and the next hop towards it, packs and seals the
//!   units per (next hop, destination) with [`meshnet_proto::datapath::Encoder`]
//!   and sends each run of equal-sized datagrams with one UDP GSO `sendmsg`.
//!   Broadcast and unknown destinations go to this peer's children in its own
//!   spanning tree (every direct peer, in a full mesh).
//! * **UDP → TAP** receives batches with `recvmmsg` + GRO, opens each datagram with
//!   [`meshnet_proto::datapath::Receiver`] and writes each unit whole into the TAP
//!   (the kernel segments superframes on the far side). Units for another peer
//!   are relayed towards it, and broadcasts passed on to this peer's children in
//!   the source's tree, whole, through *relay sessions* this thread owns (keys
//!   from [`meshnet_proto::session::relay_key`]), so no session is ever shared
//!   between threads. It tells the TX thread which MACs live behind which peer.
//!
//! * **Heartbeats**: the TX thread sends each direct peer sealed UDP heartbeats
//!   of several sizes ([`meshnet_proto::liveness`]); the RX thread records what
//!   arrives, learns the peer's address from it (NAT-friendly), and so both know
//!   whether UDP works both ways and the largest datagram the path carries. The
//!   control plane reads that ([`DataPlane::links`]) and lists a connection as
//!   established, and so routes data over it, only while UDP works both ways.
//!
//! Neither thread takes a lock or allocates per frame: they own their tables, and
//! the control plane (and the other thread) reach them through channels drained
//! once per batch, with an eventfd to wake a thread blocked in `poll`. The one
//! shared table, the peers' heartbeat state, is locked per heartbeat round and
//! per heartbeat received, never per frame.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver as ChanRx, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use meshnet_proto::datapath::{seal_heartbeat, DatapathError, Encoder, Receiver, TxBatch, TxSession, MIN_DATAGRAM, SALVAGE_AGE_MS};
use meshnet_proto::ingress::{self, Refused, UpstreamMap};
use meshnet_proto::liveness::Liveness;
use meshnet_proto::wire::datagram::Heartbeat;
use meshnet_proto::rekey::{erase, Key};
use meshnet_proto::session::{relay_key, COUNTER_LIMIT, RELAY_INDEX_BIT};
use meshnet_proto::mac_table::{Learned, MacOwner, MacTable};
use crate::mac_owners::{MacOwners, Owner};
use meshnet_proto::wire::datagram::InnerHeader;
use meshnet_proto::{Mac, PeerName};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use crate::device::Device;
use crate::perframe::PerFrame;
use crate::traffic::{PeerTraffic, ThreadCounters, TrafficBook};

/// Units read from the TAP per batch.
const TX_BATCH: usize = 64;
/// Receive buffers per `recvmmsg`; each holds a GRO aggregate of up to 64 KiB.
const RX_BATCH: usize = 16;
const UNIT_BUF: usize = 65536 + 64;
const VNET_HDR_LEN: usize = 10;
/// MAC ageing (Weave uses ten minutes).
const MAC_AGEING_MS: u64 = 10 * 60 * 1000;
/// How often the RX thread re-announces a known remote MAC to the TX thread, so
/// the TX table does not age out a MAC that is still talking.
const MAC_REANNOUNCE_MS: u64 = 60 * 1000;
/// Hop budget put in every datagram.
const DEFAULT_TTL: u8 = ingress::MAX_TTL;
const SOCKET_BUFFER: usize = 8 << 20;
/// How often the TX thread looks for due heartbeats (and the RX thread picks up
/// learned addresses and path MTUs for its relay sessions).
const TICK_MS: u64 = 100;

/// One direct peer as the data plane needs it: where to send, and the two
/// directions' keys from the handshake.
#[derive(Clone)]
pub struct PeerLink {
    pub peer: PeerName,
    pub addr: SocketAddr,
    /// The receiver index the *peer* chose: goes in the header of what we send.
    pub send_index: u32,
    pub send_key: [u8; 32],
    /// The receiver index we chose: identifies what the peer sends us.
    pub recv_index: u32,
    pub recv_key: [u8; 32],
    /// The peer advertised `CAP_SUPERFRAMES`: it takes units whole. Without
    /// it, units go to it through the per-frame path ([`crate::perframe`]).
    pub superframes: bool,
}

impl Drop for PeerLink {
    /// Copies of the handshake's keys do not outlive their link.
    fn drop(&mut self) {
        erase(&mut self.send_key);
        erase(&mut self.recv_key);
    }
}

impl PeerLink {
    /// Erases the keys once the sessions are made from them.
    fn forget_keys(&mut self) {
        erase(&mut self.send_key);
        erase(&mut self.recv_key);
    }
}

/// Counters shared with the control plane (`meshnet status`).
#[derive(Default, Debug)]
pub struct Stats {
    pub tap_units_in: AtomicU64,
    pub tap_bytes_in: AtomicU64,
    pub udp_datagrams_out: AtomicU64,
    pub udp_bytes_out: AtomicU64,
    pub udp_send_errors: AtomicU64,
    pub udp_datagrams_in: AtomicU64,
    pub udp_bytes_in: AtomicU64,
    /// Datagrams that failed authentication, were replays or malformed.
    pub udp_rejected: AtomicU64,
    /// Datagrams for a session we do not (yet, or any more) have: a peer's first
    /// heartbeats can arrive before our end of the handshake installed it.
    pub udp_unknown_session: AtomicU64,
    pub tap_units_out: AtomicU64,
    pub tap_write_errors: AtomicU64,
    pub dropped_no_peer: AtomicU64,
    pub relayed_units: AtomicU64,
    pub dropped_no_route: AtomicU64,
    pub heartbeats_out: AtomicU64,
    pub heartbeats_in: AtomicU64,
    pub frag_needed_sent: AtomicU64,
    pub dropped_too_big: AtomicU64,
    /// Superframes that lost a chunk, and the whole segments salvaged from them.
    pub salvaged_units: AtomicU64,
    pub salvaged_frames: AtomicU64,
    /// Units (or datagrams holding them) that could not be sealed: counter
    /// exhausted, empty or oversized unit. Rate-limit logged.
    pub encode_errors: AtomicU64,
    /// Received frames refused because their claimed origin does not fit the
    /// peer they came from, by [`Refused::index`] (see [`ingress::admit`]).
    pub refused: [AtomicU64; Refused::ALL.len()],
    /// Received frames whose TTL was higher than their sender could use, cut.
    pub ttl_clamped: AtomicU64,
    // New counters go last: the ones above are updated per datagram by both
    // threads, and moving them changes which share a cache line.
    /// Of `udp_rejected`, datagrams whose tag did not verify under the session's key.
    pub udp_auth_failed: AtomicU64,
    /// Data-key rekeys completed (our sending key replaced), all connections.
    pub rekeys: AtomicU64,
    pub per_frame: crate::perframe::Counters,
}

impl Stats {
    /// Counts a unit (or datagram) that could not be sealed; logs the first
    /// and every 1000th.
    pub(crate) fn encode_error(&self, peer: PeerName, e: &DatapathError) {
        let n = self.encode_errors.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            log::warn!("dropping data for {peer} that could not be sealed: {e} ({} so far)", n + 1);
        }
    }

    /// Performs [`ingress::admit`] for a frame from direct peer `sender`:
    /// counts a refusal (logging the first and every 1000th of each reason)
    /// or a clamped TTL, and returns the header to handle the frame with.
    fn admit(
        &self,
        me: PeerName,
        sender: PeerName,
        hdr: &InnerHeader,
        upstream: &UpstreamMap,
        traffic: &HashMap<PeerName, Arc<PeerTraffic>>,
    ) -> Option<InnerHeader> {
        match ingress::admit(me, sender, hdr, |origin| upstream.get(&origin)) {
            Ok(a) => {
                if a.clamped {
                    self.ttl_clamped.fetch_add(1, Ordering::Relaxed);
                }
                Some(a.hdr)
            }
            Err(why) => {
                let n = self.refused[why.index()].fetch_add(1, Ordering::Relaxed);
                // Only the RX thread admits frames: it is these counters' one writer.
                if let Some(t) = traffic.get(&sender) {
                    t.rx.refused[why.index()].add(1);
                }
                if n.is_multiple_of(1000) {
                    log::warn!(
                        "refusing a frame from {sender} that claims origin {}{}: {why} ({} so far)",
                        hdr.src,
                        if hdr.broadcast { " (broadcast)" } else { "" },
                        n + 1
                    );
                }
                None
            }
        }
    }

    pub fn to_json(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("tap_units_in", g(&self.tap_units_in)),
            ("tap_bytes_in", g(&self.tap_bytes_in)),
            ("udp_datagrams_out", g(&self.udp_datagrams_out)),
            ("udp_bytes_out", g(&self.udp_bytes_out)),
            ("udp_send_errors", g(&self.udp_send_errors)),
            ("udp_datagrams_in", g(&self.udp_datagrams_in)),
            ("udp_bytes_in", g(&self.udp_bytes_in)),
            ("udp_rejected", g(&self.udp_rejected)),
            ("udp_auth_failed", g(&self.udp_auth_failed)),
            ("udp_unknown_session", g(&self.udp_unknown_session)),
            ("tap_units_out", g(&self.tap_units_out)),
            ("tap_write_errors", g(&self.tap_write_errors)),
            ("dropped_no_peer", g(&self.dropped_no_peer)),
            ("relayed_units", g(&self.relayed_units)),
            ("dropped_no_route", g(&self.dropped_no_route)),
            ("heartbeats_out", g(&self.heartbeats_out)),
            ("heartbeats_in", g(&self.heartbeats_in)),
            ("frag_needed_sent", g(&self.frag_needed_sent)),
            ("dropped_too_big", g(&self.dropped_too_big)),
            ("salvaged_units", g(&self.salvaged_units)),
            ("salvaged_frames", g(&self.salvaged_frames)),
            ("encode_errors", g(&self.encode_errors)),
            ("ttl_clamped", g(&self.ttl_clamped)),
            ("rekeys", g(&self.rekeys)),
        ]
        .into_iter()
        .chain(Refused::ALL.into_iter().map(|r| (r.counter_name(), g(&self.refused[r.index()]))))
        .chain(self.per_frame.to_json())
        .collect()
    }
}

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

/// One direct peer's UDP state, as the control plane sees it.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    /// UDP heartbeats work both ways: the connection may carry data.
    pub udp_ok: bool,
    /// The largest datagram (UDP payload bytes) known to reach the peer.
    pub path_mtu: Option<usize>,
    /// Milliseconds since the peer's last heartbeat arrived.
    pub heard_ms_ago: Option<u64>,
    /// Where datagrams to the peer go (learned from its heartbeats).
    pub addr: SocketAddr,
}

fn sealed_under(sealed: &[(u32, u64); 2], index: u32) -> u64 {
    sealed.iter().filter(|(i, _)| i & !RELAY_INDEX_BIT == index).map(|s| s.1).max().unwrap_or(0)
}

/// The heartbeat state of every direct peer, shared by both threads and the
/// control plane (locked per heartbeat, never per frame).
struct Link {
    liveness: Liveness,
    addr: SocketAddr,
    /// (receiver index, datagrams sealed) of the direct and the relay session.
    sealed: [(u32, u64); 2],
}

type Links = Arc<Mutex<HashMap<PeerName, Link>>>;

fn lock(links: &Links) -> MutexGuard<'_, HashMap<PeerName, Link>> {
    links.lock().unwrap_or_else(|e| e.into_inner())
}

enum TxCmd {
    AddPeer(PeerLink, Arc<PeerTraffic>),
    RemovePeer(PeerName),
    /// Seal for `peer` under a new key from now on, if it still seals under `from`.
    Switch { peer: PeerName, from: u32, index: u32, key: Key },
    Learn(Mac, PeerName),
    Routes(Arc<Routes>),
    Stop,
}

enum RxCmd {
    AddPeer(PeerLink, Arc<PeerTraffic>),
    RemovePeer(PeerName, Vec<u32>),
    /// A receiving key (and its relay key) of a new epoch; `done` runs once installed.
    AddRecv { peer: PeerName, index: u32, key: Key, done: Box<dyn FnOnce() + Send> },
    RemoveRecv(u32),
    /// As [`TxCmd::Switch`], for the relay session.
    SwitchRelay { peer: PeerName, from: u32, index: u32, key: Key },
    Routes(Arc<Routes>),
    Stop,
}

/// A thread's wake-up: a channel plus an eventfd it polls beside its data fd.
struct Mailbox<T> {
    tx: Sender<T>,
    efd: Arc<EventFd>,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox { tx: self.tx.clone(), efd: self.efd.clone() }
    }
}

impl<T> Mailbox<T> {
    fn post(&self, cmd: T) {
        if self.tx.send(cmd).is_ok() {
            self.efd.signal();
        }
    }
}

struct EventFd(RawFd);

impl EventFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
        unsafe { libc::write(self.0, &one as *const u64 as *const libc::c_void, 8) };
    }
    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        unsafe { libc::read(self.0, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// Waits until `fd` is readable (or writable with `POLLOUT`) or the eventfd fires.
/// Returns (fd ready, woken).
fn wait(fd: RawFd, events: i16, efd: &EventFd, timeout_ms: i32) -> (bool, bool) {
    let mut fds = [
        libc::pollfd { fd, events, revents: 0 },
        libc::pollfd { fd: efd.0, events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: fds is a valid array of two pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if n <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// Waits until `fd` has work (or `timeout_ms` has passed), then hands every
/// queued command to `handle`. Returns false when `handle` says to stop the thread.
fn wait_for_work<T>(
    fd: RawFd,
    efd: &EventFd,
    cmds: &ChanRx<T>,
    timeout_ms: i32,
    mut handle: impl FnMut(T) -> bool,
) -> bool {
    let (_, woken) = wait(fd, libc::POLLIN, efd, timeout_ms);
    if woken {
        efd.drain();
        while let Ok(cmd) = cmds.try_recv() {
            if !handle(cmd) {
                return false;
            }
        }
    }
    true
}

/// The running data plane.
pub struct DataPlane {
    tx: Mailbox<TxCmd>,
    rx: Mailbox<RxCmd>,
    threads: Vec<JoinHandle<()>>,
    links: Links,
    clock: Instant,
    max_datagram: usize,
    pub stats: Arc<Stats>,
    /// Per-peer counters (each written by one thread, see [`crate::traffic`]).
    pub traffic: Arc<TrafficBook>,
    pub counters: Arc<ThreadCounters>,
    /// Which peer owns which MAC, for the trusted-subnet sync (see [`crate::mac_owners`]).
    pub mac_owners: Arc<MacOwners>,
}

impl DataPlane {
    /// Starts both forwarding threads on `tap` (a TAP or a capture device) and
    /// `socket` (already bound).
    pub fn start(
        tap: impl Into<Device>,
        socket: UdpSocket,
        me: PeerName,
        max_datagram: usize,
    ) -> io::Result<DataPlane> {
        socket.set_nonblocking(true)?;
        let state = Arc::new(UdpSocketState::new(UdpSockRef::from(&socket))?);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        let tap = Arc::new(tap.into());
        let socket = Arc::new(socket);
        let stats = Arc::new(Stats::default());
        let counters = Arc::new(ThreadCounters::default());
        let clock = Instant::now();
        let links: Links = Arc::default();
        let mac_owners: Arc<MacOwners> = Arc::default();

        let (ttx, trx) = channel();
        let tx_box = Mailbox { tx: ttx, efd: Arc::new(EventFd::new()?) };
        let (rtx, rrx) = channel();
        let rx_box = Mailbox { tx: rtx, efd: Arc::new(EventFd::new()?) };

        let tx_thread = TxLoop {
            tap: tap.clone(),
            socket: socket.clone(),
            udp: state.clone(),
            cmds: trx,
            efd: tx_box.efd.clone(),
            stats: stats.clone(),
            counters: counters.clone(),
            me,
            encoder: Encoder::new(max_datagram),
            clock,
            links: links.clone(),
            max_datagram,
            mac_owners: mac_owners.clone(),
        };
        let rx_thread = RxLoop {
            tap,
            socket,
            udp: state,
            cmds: rrx,
            efd: rx_box.efd.clone(),
            learn: tx_box.clone(),
            stats: stats.clone(),
            counters: counters.clone(),
            clock,
            me,
            max_datagram,
            links: links.clone(),
            mac_owners: mac_owners.clone(),
        };
        let threads = vec![
            std::thread::Builder::new().name("tap-to-udp".into()).spawn(move || tx_thread.run())?,
            std::thread::Builder::new().name("udp-to-tap".into()).spawn(move || rx_thread.run())?,
        ];
        let traffic = Arc::new(TrafficBook::default());
        Ok(DataPlane { tx: tx_box, rx: rx_box, threads, links, clock, max_datagram, stats, traffic, counters, mac_owners })
    }

    /// Starts heartbeats with `link.peer` and accepts its datagrams; data goes
    /// to it once routes say so. Receiver indexes must leave
    /// [`RELAY_INDEX_BIT`] clear: the relay sessions use it.
    pub fn add_peer(&self, link: PeerLink) {
        debug_assert_eq!(link.recv_index & RELAY_INDEX_BIT, 0);
        let now = self.clock.elapsed().as_millis() as u64;
        let link_state = Link { liveness: Liveness::new(self.max_datagram, now), addr: link.addr, sealed: [(0, 0); 2] };
        lock(&self.links).insert(link.peer, link_state);
        let traffic = self.traffic.of(link.peer);
        self.rx.post(RxCmd::AddPeer(link.clone(), traffic.clone()));
        self.tx.post(TxCmd::AddPeer(link, traffic));
    }

    /// Stops carrying frames for `peer` (whose sessions we knew by `recv_indexes`).
    pub fn remove_peer(&self, peer: PeerName, recv_indexes: Vec<u32>) {
        lock(&self.links).remove(&peer);
        self.tx.post(TxCmd::RemovePeer(peer));
        self.rx.post(RxCmd::RemovePeer(peer, recv_indexes));
    }

    /// Rekeying: accepts `peer`'s datagrams under `index` (and its relay index)
    /// opened with `key`, beside the sessions already there. `done` runs on the
    /// receive thread once datagrams under `index` open.
    pub fn install_recv(&self, peer: PeerName, index: u32, key: Key, done: Box<dyn FnOnce() + Send>) {
        debug_assert_eq!(index & RELAY_INDEX_BIT, 0);
        self.rx.post(RxCmd::AddRecv { peer, index, key, done });
    }

    /// Rekeying: seals what goes to `peer` (directly and relayed) under
    /// `index`/`key` from now on, unless its sessions no longer seal under
    /// `from` (the connection was replaced meanwhile).
    pub fn switch_send(&self, peer: PeerName, from: u32, index: u32, key: Key) {
        self.rx.post(RxCmd::SwitchRelay { peer, from, index, key: key.clone() });
        self.tx.post(TxCmd::Switch { peer, from, index, key });
    }

    /// Rekeying: stops accepting datagrams under `index` (and its relay index);
    /// the receive thread erases their keys.
    pub fn remove_recv(&self, index: u32) {
        self.rx.post(RxCmd::RemoveRecv(index));
    }

    /// Every direct peer's UDP state.
    pub fn links(&self) -> HashMap<PeerName, LinkStatus> {
        let now = self.clock.elapsed().as_millis() as u64;
        lock(&self.links)
            .iter()
            .map(|(p, l)| {
                let status = LinkStatus {
                    udp_ok: l.liveness.udp_ok(now),
                    path_mtu: l.liveness.path_mtu(now),
                    heard_ms_ago: l.liveness.last_heard().map(|t| now.saturating_sub(t)),
                    addr: l.addr,
                };
                (*p, status)
            })
            .collect()
    }

    /// Datagrams sealed to `peer` under the sending key whose receiver index is
    /// `index` (its direct and its relay session, whichever sealed more; refreshed
    /// every 100–250 ms); 0 for a peer with no link.
    /// One lookup: each connection asks this every 250 ms, so it must not cost
    /// as much as [`links`](Self::links) (all links) does at hundreds of peers.
    pub fn sealed_under(&self, peer: PeerName, index: u32) -> u64 {
        lock(&self.links).get(&peer).map_or(0, |l| sealed_under(&l.sealed, index))
    }

    /// Replaces the routes (after every topology change).
    pub fn set_routes(&self, routes: Routes) {
        let routes = Arc::new(routes);
        self.tx.post(TxCmd::Routes(routes.clone()));
        self.rx.post(RxCmd::Routes(routes));
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) {
        self.tx.post(TxCmd::Stop);
        self.rx.post(RxCmd::Stop);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct TxPeer {
    link: PeerLink,
    /// The peer's counters: the TX thread writes `tx`, the RX thread `rx`.
    traffic: Arc<PeerTraffic>,
    session: TxSession,
    /// The largest datagram the path to the peer carries (its path MTU).
    max_datagram: usize,
}

/// Direct peers by name, each with its sealing session.
#[derive(Default)]
struct PeerSet {
    peers: Vec<TxPeer>,
    index: HashMap<PeerName, usize>,
}

impl PeerSet {
    fn insert(&mut self, entry: TxPeer) {
        match self.index.get(&entry.link.peer) {
            Some(&i) => self.peers[i] = entry,
            None => {
                self.index.insert(entry.link.peer, self.peers.len());
                self.peers.push(entry);
            }
        }
    }

    fn remove(&mut self, peer: PeerName) -> bool {
        let Some(i) = self.index.remove(&peer) else { return false };
        self.peers.swap_remove(i);
        if i < self.peers.len() {
            self.index.insert(self.peers[i].link.peer, i);
        }
        true
    }

    /// The direct peer to hand a unit for `dst` to: its next hop, which is the
    /// peer itself only while the connection to it carries data.
    fn hop_to(&self, dst: PeerName, routes: &Routes) -> Option<usize> {
        routes.next_hop.get(&dst).and_then(|h| self.index.get(h)).copied()
    }

    /// Takes each peer's address and path MTU from the heartbeat state.
    fn refresh(&mut self, links: &HashMap<PeerName, Link>, now: u64, max_datagram: usize) {
        for p in &mut self.peers {
            if let Some(l) = links.get(&p.link.peer) {
                p.link.addr = l.addr;
                p.max_datagram = l.liveness.path_mtu(now).unwrap_or(max_datagram).clamp(MIN_DATAGRAM, max_datagram);
            }
        }
    }
}

struct TxLoop {
    tap: Arc<Device>,
    socket: Arc<UdpSocket>,
    udp: Arc<UdpSocketState>,
    cmds: ChanRx<TxCmd>,
    efd: Arc<EventFd>,
    stats: Arc<Stats>,
    counters: Arc<ThreadCounters>,
    me: PeerName,
    encoder: Encoder,
    clock: Instant,
    links: Links,
    max_datagram: usize,
    mac_owners: Arc<MacOwners>,
}

impl TxLoop {
    /// Sends the heartbeats that are due, and takes the peers' learned
    /// addresses and path MTUs.
    fn heartbeats(&self, set: &mut PeerSet, batch: &mut TxBatch, sizes: &mut Vec<u16>) {
        let now = self.now();
        let mut links = lock(&self.links);
        set.refresh(&links, now, self.max_datagram);
        for p in &mut set.peers {
            let Some(l) = links.get_mut(&p.link.peer) else { continue };
            l.sealed[0] = (p.session.receiver_index(), COUNTER_LIMIT - p.session.remaining());
            let Some(hb) = l.liveness.poll(now, sizes) else { continue };
            batch.clear();
            for &size in sizes.iter() {
                // `liveness::BEAT` (0) becomes the smallest heartbeat.
                let size = (size as usize).clamp(meshnet_proto::datapath::MIN_HEARTBEAT, self.max_datagram);
                if let Err(e) = seal_heartbeat(&mut p.session, hb, size, batch) {
                    self.stats.encode_error(p.link.peer, &e);
                }
            }
            self.stats.heartbeats_out.fetch_add(batch.datagram_count() as u64, Ordering::Relaxed);
            p.traffic.tx.datagrams.add(batch.datagram_count() as u64);
            p.traffic.tx.bytes.add(batch.len_bytes() as u64);
            for d in batch.datagrams() {
                // One datagram per send: each probes its own size.
                let t = Transmit { destination: p.link.addr, ecn: None, contents: d, segment_size: None, src_ip: None };
                send_one(&self.udp, &self.socket, &self.efd, &self.stats, &t, 1);
            }
        }
    }

    fn run(mut self) {
        let mut units: Vec<Vec<u8>> = (0..TX_BATCH).map(|_| vec![0u8; UNIT_BUF]).collect();
        let mut lens = [0usize; TX_BATCH];
        let mut flood: Vec<u16> = Vec::with_capacity(TX_BATCH);
        // (direct peer index, final destination, unit index), sorted to group datagrams.
        let mut unicast: Vec<(u16, u64, u16)> = Vec::with_capacity(TX_BATCH);
        let mut flood_to: Vec<u16> = Vec::new();
        let mut set = PeerSet::default();
        let mut routes = Arc::new(Routes::default());
        let mut macs = MacTable::new(MAC_AGEING_MS);
        let mut batch = TxBatch::new();
        let mut per_frame = PerFrame::new(self.stats.clone());
        let vnet = self.tap.vnet_hdr();
        let hdr_room = if vnet { 0 } else { VNET_HDR_LEN };
        let fd = self.tap.raw_fd();
        let mut last_expire = 0u64;
        let mut last_tick = 0u64;
        let mut hb_batch = TxBatch::new();
        let mut sizes = Vec::new();
        let max_datagram = self.max_datagram;
        let mut icmp = [0u8; VNET_HDR_LEN + crate::icmp::MAX_REPLY];

        loop {
            let clock = self.clock;
            let running = wait_for_work(fd, &self.efd, &self.cmds, TICK_MS as i32, |cmd| {
                match cmd {
                    TxCmd::Stop => return false,
                    TxCmd::AddPeer(mut link, traffic) => {
                        let session = TxSession::new(link.send_index, &link.send_key);
                        link.forget_keys();
                        set.insert(TxPeer { link, traffic, session, max_datagram });
                    }
                    TxCmd::Switch { peer, from, index, key } => {
                        if let Some(p) = set.index.get(&peer).map(|&i| &mut set.peers[i]) {
                            if p.session.receiver_index() == from {
                                // The old session (and its key) is dropped, erased, here.
                                p.session = TxSession::new(index, &key.0);
                                p.link.send_index = index;
                            }
                        }
                    }
                    TxCmd::RemovePeer(peer) => {
                        if set.remove(peer) {
                            macs.remove_peer(peer);
                        }
                    }
                    TxCmd::Learn(mac, peer) => {
                        macs.learn(mac, MacOwner::Peer(peer), clock.elapsed().as_millis() as u64);
                    }
                    TxCmd::Routes(r) => routes = r,
                }
                true
            });
            if !running {
                return;
            }
            let now = self.now();
            if now.saturating_sub(last_tick) >= TICK_MS {
                last_tick = now;
                self.heartbeats(&mut set, &mut hb_batch, &mut sizes);
                self.counters.tx_mac_entries.store(macs.len() as u64, Ordering::Relaxed);
            }

            // Read a batch of units.
            let mut n = 0;
            while n < TX_BATCH {
                let buf = &mut units[n];
                match self.tap.read_unit(&mut buf[hdr_room..]) {
                    Ok(Some(len)) => {
                        if hdr_room > 0 {
                            buf[..VNET_HDR_LEN].fill(0);
                        }
                        lens[n] = len + hdr_room;
                        n += 1;
                    }
                    Ok(None) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("reading the TAP: {e}");
                        break;
                    }
                }
            }
            if n == 0 {
                continue;
            }
            let now = self.now();
            if now.saturating_sub(last_expire) > 10_000 {
                macs.expire(now);
                last_expire = now;
            }

            // Classify: unicast to a known peer, dropped (local), or flooded.
            flood.clear();
            unicast.clear();
            for (i, unit) in units.iter().enumerate().take(n) {
                let len = lens[i];
                self.stats.tap_units_in.fetch_add(1, Ordering::Relaxed);
                self.stats.tap_bytes_in.fetch_add(len as u64, Ordering::Relaxed);
                if len < VNET_HDR_LEN + 14 {
                    continue;
                }
                if unit[1] != 0 {
                    // virtio gso_type: a superframe the kernel left whole.
                    self.counters.tx_superframes.add(1);
                }
                let frame = &unit[VNET_HDR_LEN..len];
                let dst: Mac = frame[0..6].try_into().expect("14 bytes checked");
                let src: Mac = frame[6..12].try_into().expect("14 bytes checked");
                if let Learned::Moved { from: MacOwner::Peer(_) } = macs.learn(src, MacOwner::Local, now) {
                    self.mac_owners.note(src, Owner::Local, now);
                }
                if dst[0] & 1 != 0 {
                    flood.push(i as u16);
                    continue;
                }
                match macs.lookup(&dst, now) {
                    Some(MacOwner::Peer(p)) if !routes.mtu.is_empty() && self.too_big(unit, len, p, &routes, &mut icmp) => {}
                    Some(MacOwner::Peer(p)) => match set.hop_to(p, &routes) {
                        Some(hop) => unicast.push((hop as u16, p.0, i as u16)),
                        None => flood.push(i as u16),
                    },
                    Some(MacOwner::Local) => {}
                    None => flood.push(i as u16),
                }
            }
            if set.peers.is_empty() {
                self.stats.dropped_no_peer.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }

            // Broadcasts go down this peer's own spanning tree.
            flood_to.clear();
            if let (false, Some(children)) = (flood.is_empty(), routes.children.get(&self.me)) {
                flood_to.extend(children.iter().filter_map(|c| set.index.get(c)).map(|&i| i as u16));
            }

            // Encode and send, direct peer by direct peer, one header per final destination.
            unicast.sort_unstable();
            let mut u = 0;
            for (pi, p) in set.peers.iter_mut().enumerate() {
                batch.clear();
                self.encoder.set_max_datagram(p.max_datagram);
                while u < unicast.len() && unicast[u].0 as usize == pi {
                    let dst = unicast[u].1;
                    let start = u;
                    while u < unicast.len() && unicast[u].0 as usize == pi && unicast[u].1 == dst {
                        u += 1;
                    }
                    let hdr = InnerHeader { ttl: DEFAULT_TTL, broadcast: false, src: self.me, dst: PeerName(dst) };
                    let which = unicast[start..u].iter().map(|x| x.2);
                    let pf = (!p.link.superframes).then_some(&mut per_frame);
                    p.traffic.tx.units.add((u - start) as u64);
                    encode(&mut self.encoder, &mut p.session, hdr, which, &units, &lens, &mut batch, pf, &self.stats, p.link.peer, &p.traffic);
                }
                if flood_to.contains(&(pi as u16)) {
                    let hdr = InnerHeader { ttl: DEFAULT_TTL, broadcast: true, src: self.me, dst: PeerName::BROADCAST };
                    let pf = (!p.link.superframes).then_some(&mut per_frame);
                    p.traffic.tx.units.add(flood.len() as u64);
                    encode(&mut self.encoder, &mut p.session, hdr, flood.iter().copied(), &units, &lens, &mut batch, pf, &self.stats, p.link.peer, &p.traffic);
                }
                if !batch.is_empty() {
                    p.traffic.tx.datagrams.add(batch.datagram_count() as u64);
                    p.traffic.tx.bytes.add(batch.len_bytes() as u64);
                }
                // A path whose probing found a black hole below our largest
                // datagram gets its datagrams one per message (see PerFrame::send).
                let gso = p.max_datagram >= self.max_datagram;
                if !batch.is_empty() && p.link.superframes && gso {
                    send(&self.udp, &self.socket, &self.efd, &self.stats, &batch, p.link.addr);
                } else if !batch.is_empty() {
                    per_frame.send(&self.udp, &self.socket, &batch, p.link.addr, gso);
                }
            }
        }
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Whether `unit` (a plain frame, not a superframe) is too big for the
    /// destination peer's overlay; if so, answers an IPv4 DF packet with ICMP
    /// "fragmentation needed" through the TAP.
    #[cold]
    fn too_big(&self, unit: &[u8], len: usize, dst: PeerName, routes: &Routes, icmp: &mut [u8]) -> bool {
        const GSO_NONE: u8 = 0;
        let Some(&mtu) = routes.mtu.get(&dst) else { return false };
        if unit[1] != GSO_NONE || len <= VNET_HDR_LEN + 14 + mtu as usize {
            return false;
        }
        let (hdr, reply) = icmp.split_at_mut(VNET_HDR_LEN);
        let reply: &mut [u8; crate::icmp::MAX_REPLY] = reply.try_into().expect("sized for it");
        if let Some(n) = crate::icmp::frag_needed(&unit[VNET_HDR_LEN..len], mtu.min(u16::MAX as u32) as u16, reply) {
            hdr.fill(0);
            let out = if self.tap.vnet_hdr() { &icmp[..VNET_HDR_LEN + n] } else { &icmp[VNET_HDR_LEN..VNET_HDR_LEN + n] };
            match self.tap.write_unit(out) {
                Ok(_) => self.stats.frag_needed_sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.tap_write_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
        // Too big either way: the destination's bridge would drop it.
        self.stats.dropped_too_big.fetch_add(1, Ordering::Relaxed);
        true
    }

}

/// Sends a batch of sealed datagrams to `dest`: each run of equal-sized
/// datagrams in one UDP GSO `sendmsg` (under 64 KiB each, as the kernel wants).
fn send(udp: &UdpSocketState, socket: &UdpSocket, efd: &EventFd, stats: &Stats, batch: &TxBatch, dest: SocketAddr) {
    let max_segments = udp.max_gso_segments().max(1);
    for (bytes, seg) in batch.runs_within(max_segments.min(64), 65000) {
        let transmit = Transmit {
            destination: dest,
            ecn: None,
            contents: bytes,
            segment_size: if bytes.len() > seg { Some(seg) } else { None },
            src_ip: None,
        };
        send_one(udp, socket, efd, stats, &transmit, bytes.len().div_ceil(seg) as u64);
    }
}

fn send_one(udp: &UdpSocketState, socket: &UdpSocket, efd: &EventFd, stats: &Stats, transmit: &Transmit<'_>, datagrams: u64) {
    for _attempt in 0..50 {
        match udp.try_send(UdpSockRef::from(socket), transmit) {
            Ok(()) => {
                stats.udp_datagrams_out.fetch_add(datagrams, Ordering::Relaxed);
                stats.udp_bytes_out.fetch_add(transmit.contents.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Socket buffer full: wait for room rather than drop.
                wait(socket.as_raw_fd(), libc::POLLOUT, efd, 10);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let errors = stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                if errors % 1000 == 0 {
                    log::warn!("sending to {}: {e}", transmit.destination);
                }
                return;
            }
        }
    }
    stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
}

/// Accepts `peer`'s datagrams under `index` opened with `key`, and relayed
/// ones under `index | RELAY_INDEX_BIT` with its relay key.
fn add_recv(receiver: &mut Receiver, peer: PeerName, index: u32, key: &[u8; 32]) {
    receiver.add_session(index, peer, key);
    let mut relay = relay_key(key);
    receiver.add_session(index | RELAY_INDEX_BIT, peer, &relay);
    erase(&mut relay);
}

/// The relay sending session beside the direct one sealing under `index`/`key`.
fn relay_session(index: u32, key: &[u8; 32]) -> TxSession {
    let mut relay = relay_key(key);
    let session = TxSession::new(index | RELAY_INDEX_BIT, &relay);
    erase(&mut relay);
    session
}

/// Seals units `which` for direct peer `peer` under `hdr` into `batch`.
/// `per_frame`: Some when the next hop takes no superframes. A unit that
/// cannot be sealed, and a last datagram that cannot, are counted in
/// `encode_errors` and dropped; the others still go.
#[allow(clippy::too_many_arguments)]
fn encode(
    encoder: &mut Encoder,
    session: &mut TxSession,
    hdr: InnerHeader,
    which: impl Iterator<Item = u16>,
    units: &[Vec<u8>],
    lens: &[usize],
    batch: &mut TxBatch,
    mut per_frame: Option<&mut PerFrame>,
    stats: &Stats,
    peer: PeerName,
    traffic: &PeerTraffic,
) {
    encoder.begin(session, hdr, batch);
    for i in which {
        let i = i as usize;
        let unit = &units[i][..lens[i]];
        let pushed = match per_frame.as_deref_mut() {
            None => encoder.push(session, unit, batch),
            Some(pf) => pf.push(encoder, session, unit, batch),
        };
        if let Err(e) = pushed {
            stats.encode_error(peer, &e);
            traffic.tx.encode_errors.add(1);
        }
    }
    if let Err(e) = encoder.finish(session, batch) {
        stats.encode_error(peer, &e);
        traffic.tx.encode_errors.add(1);
    }
}

struct RxLoop {
    tap: Arc<Device>,
    socket: Arc<UdpSocket>,
    udp: Arc<UdpSocketState>,
    cmds: ChanRx<RxCmd>,
    efd: Arc<EventFd>,
    learn: Mailbox<TxCmd>,
    stats: Arc<Stats>,
    counters: Arc<ThreadCounters>,
    clock: Instant,
    me: PeerName,
    max_datagram: usize,
    links: Links,
    mac_owners: Arc<MacOwners>,
}

/// The segments salvaged from superframes that lost a chunk, as plain units
/// (zeroed virtio header + frame) back to back, delivered after the datagram
/// that gave them up. Buffers are kept and reused.
#[derive(Default)]
struct Salvage {
    arena: Vec<u8>,
    frames: Vec<(PeerName, usize, usize)>,
    scratch: Vec<u8>,
    units: u64,
}

impl Salvage {
    fn take(&mut self, origin: PeerName, unit: &[u8], have: &dyn Fn(usize, usize) -> bool) {
        self.units += 1;
        if self.scratch.len() < UNIT_BUF {
            self.scratch.resize(UNIT_BUF, 0);
        }
        let Salvage { arena, frames, scratch, .. } = self;
        let emitted = meshnet_proto::gso::to_plain_frames_where(unit, scratch, VNET_HDR_LEN, have, |f| {
            let start = arena.len();
            arena.extend_from_slice(f);
            frames.push((origin, start, arena.len()));
        });
        if let Err(e) = emitted {
            log::debug!("salvaging a partial unit from {origin}: {e}");
        }
    }

    fn clear(&mut self) {
        self.arena.clear();
        self.frames.clear();
        self.units = 0;
    }
}

/// What the receive thread needs to pass units on: its own relay sessions.
struct Relay {
    set: PeerSet,
    encoder: Encoder,
    batch: TxBatch,
    routes: Arc<Routes>,
    per_frame: PerFrame,
}

impl RxLoop {
    /// Seals `unit` for the direct peer `hop` under `hdr` and sends it at once.
    fn forward(&self, relay: &mut Relay, hop: usize, hdr: InnerHeader, unit: &[u8]) {
        let Relay { set, encoder, batch, per_frame, .. } = relay;
        let p = &mut set.peers[hop];
        batch.clear();
        encoder.set_max_datagram(p.max_datagram);
        encoder.begin(&mut p.session, hdr, batch);
        let pushed = match p.link.superframes {
            true => encoder.push(&mut p.session, unit, batch),
            false => per_frame.push(encoder, &mut p.session, unit, batch),
        };
        if let Err(e) = pushed.and_then(|()| encoder.finish(&mut p.session, batch)) {
            self.stats.encode_error(p.link.peer, &e);
            return;
        }
        self.stats.relayed_units.fetch_add(1, Ordering::Relaxed);
        let rx = &p.traffic.rx;
        rx.relayed_units.add(1);
        rx.relayed_datagrams.add(batch.datagram_count() as u64);
        rx.relayed_bytes.add(batch.len_bytes() as u64);
        let gso = p.max_datagram >= self.max_datagram;
        match p.link.superframes && gso {
            true => send(&self.udp, &self.socket, &self.efd, &self.stats, batch, p.link.addr),
            false => per_frame.send(&self.udp, &self.socket, batch, p.link.addr, gso),
        }
    }

    fn run(self) {
        let mut bufs: Vec<Vec<u8>> = (0..RX_BATCH).map(|_| vec![0u8; 65536]).collect();
        let mut metas = [RecvMeta::default(); RX_BATCH];
        let mut receiver = Receiver::new();
        let mut relay = Relay {
            set: PeerSet::default(),
            encoder: Encoder::new(self.max_datagram),
            batch: TxBatch::new(),
            routes: Arc::new(Routes::default()),
            per_frame: PerFrame::new(self.stats.clone()),
        };
        // MACs we told the TX thread about, and when.
        let mut announced: HashMap<Mac, (PeerName, u64)> = HashMap::new();
        let vnet = self.tap.vnet_hdr();
        let fd = self.socket.as_raw_fd();
        let mut last_expire = 0u64;
        let mut heard: Vec<(PeerName, Heartbeat, usize, SocketAddr)> = Vec::new();
        let mut salvage = Salvage::default();
        let max_datagram = self.max_datagram;
        // Every peer's counters (kept after a peer goes: a datagram of its may still be queued),
        // and the last peer a datagram came from (most come in runs from one peer).
        let mut traffic: HashMap<PeerName, Arc<PeerTraffic>> = HashMap::new();
        let mut last_from: Option<(PeerName, Arc<PeerTraffic>)> = None;

        loop {
            // Partial superframes waiting: wake up in time to salvage them.
            let timeout = if receiver.partial_units() > 0 { SALVAGE_AGE_MS as i32 } else { 1000 };
            let running = wait_for_work(fd, &self.efd, &self.cmds, timeout, |cmd| {
                match cmd {
                    RxCmd::Stop => return false,
                    RxCmd::AddPeer(mut link, t) => {
                        add_recv(&mut receiver, link.peer, link.recv_index, &link.recv_key);
                        let session = relay_session(link.send_index, &link.send_key);
                        link.forget_keys();
                        announced.retain(|_, (p, _)| *p != link.peer);
                        traffic.insert(link.peer, t.clone());
                        relay.set.insert(TxPeer { link, traffic: t, session, max_datagram });
                    }
                    RxCmd::RemovePeer(peer, indexes) => {
                        for index in indexes {
                            receiver.remove_session(index);
                            receiver.remove_session(index | RELAY_INDEX_BIT);
                        }
                        relay.set.remove(peer);
                    }
                    RxCmd::AddRecv { peer, index, key, done } => {
                        add_recv(&mut receiver, peer, index, &key.0);
                        done();
                    }
                    RxCmd::RemoveRecv(index) => {
                        receiver.remove_session(index);
                        receiver.remove_session(index | RELAY_INDEX_BIT);
                    }
                    RxCmd::SwitchRelay { peer, from, index, key } => {
                        if let Some(p) = relay.set.index.get(&peer).map(|&i| &mut relay.set.peers[i]) {
                            if p.session.receiver_index() == from | RELAY_INDEX_BIT {
                                p.session = relay_session(index, &key.0);
                                p.link.send_index = index;
                            }
                        }
                    }
                    RxCmd::Routes(r) => relay.routes = r,
                }
                true
            });
            if !running {
                return;
            }
            let now = self.clock.elapsed().as_millis() as u64;
            if now.saturating_sub(last_expire) > 250 {
                receiver.expire(now);
                last_expire = now;
                let mut links = lock(&self.links);
                relay.set.refresh(&links, now, self.max_datagram);
                for p in &relay.set.peers {
                    if let Some(l) = links.get_mut(&p.link.peer) {
                        l.sealed[1] = (p.session.receiver_index(), COUNTER_LIMIT - p.session.remaining());
                    }
                }
                drop(links);
                if announced.len() > 65536 {
                    announced.clear();
                }
            }
            let n = {
                let mut iovs: [IoSliceMut<'_>; RX_BATCH] = {
                    let mut it = bufs.iter_mut();
                    std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RX_BATCH buffers")))
                };
                match self.udp.recv(UdpSockRef::from(&*self.socket), &mut iovs, &mut metas) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("receiving: {e}");
                        continue;
                    }
                }
            };
            // Routes change only between batches (commands are handled above).
            let routes = relay.routes.clone();
            for (buf, meta) in bufs.iter_mut().zip(metas.iter()).take(n) {
                let stride = meta.stride.max(1);
                for dgram in buf[..meta.len].chunks_mut(stride) {
                    self.stats.udp_datagrams_in.fetch_add(1, Ordering::Relaxed);
                    self.stats.udp_bytes_in.fetch_add(dgram.len() as u64, Ordering::Relaxed);
                    let relay = &mut relay;
                    let announced = &mut announced;
                    let heard = &mut heard;
                    let from = meta.addr;
                    let on_heartbeat = |peer, hb, len| heard.push((peer, hb, len, from));
                    let salvage = &mut salvage;
                    let me = self.me;
                    let stats = &*self.stats;
                    let routes = &*routes;
                    let traffic = &traffic;
                    let on_partial = |sender: PeerName, hdr: &InnerHeader, unit: &[u8], have: &dyn Fn(usize, usize) -> bool| {
                        // Only what is for us: a relay passes whole units on or nothing.
                        if (hdr.broadcast || hdr.dst == me) && stats.admit(me, sender, hdr, &routes.upstream, traffic).is_some() {
                            salvage.take(hdr.src, unit, have);
                        }
                    };
                    let result = receiver.receive_salvaging(now, dgram, |sender, hdr, unit| {
                        if unit.len() < VNET_HDR_LEN + 14 {
                            return;
                        }
                        // The claimed origin must fit the peer it came from; nothing of a
                        // refused frame is learned, relayed or delivered.
                        let Some(hdr) = stats.admit(me, sender, hdr, &routes.upstream, traffic) else { return };
                        let onward = InnerHeader { ttl: hdr.ttl.saturating_sub(1), ..hdr };
                        if hdr.broadcast {
                            // Pass it down the source's tree, then take it ourselves.
                            if onward.ttl > 0 {
                                for child in routes.children.get(&hdr.src).into_iter().flatten() {
                                    if let Some(&hop) = relay.set.index.get(child) {
                                        self.forward(relay, hop, onward, unit);
                                    }
                                }
                            }
                        } else if hdr.dst != self.me {
                            // Not ours: relay towards its destination, whole.
                            match relay.set.hop_to(hdr.dst, routes) {
                                Some(hop) if onward.ttl > 0 => self.forward(relay, hop, onward, unit),
                                _ => {
                                    self.stats.dropped_no_route.fetch_add(1, Ordering::Relaxed);
                                    if let Some(t) = traffic.get(&sender) {
                                        t.rx.dropped_no_route.add(1);
                                    }
                                }
                            }
                            return;
                        }
                        self.deliver(hdr.src, unit, now, announced, vnet, &mut relay.per_frame);
                    }, on_heartbeat, on_partial);
                    match result {
                        Ok(_) => {
                            if let Some(peer) = receiver.last_sender() {
                                if last_from.as_ref().map_or(true, |(p, _)| *p != peer) {
                                    last_from = traffic.get(&peer).map(|t| (peer, t.clone()));
                                }
                                if let Some((_, t)) = &last_from {
                                    t.rx.datagrams.add(1);
                                    t.rx.bytes.add(dgram.len() as u64);
                                }
                            }
                        }
                        Err(DatapathError::UnknownSession(_)) => {
                            self.stats.udp_unknown_session.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(DatapathError::Session(meshnet_proto::session::SessionError::AuthFailed)) => {
                            self.stats.udp_auth_failed.fetch_add(1, Ordering::Relaxed);
                            self.stats.udp_rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            self.stats.udp_rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.flush_salvage(salvage, now, announced, vnet, &mut relay.per_frame);
                }
            }
            // A superframe still missing chunks after SALVAGE_AGE_MS has lost
            // one: deliver what arrived rather than stall the flow.
            if receiver.partial_units() > 0 {
                let me = self.me;
                let s = &mut salvage;
                let (stats, upstream) = (&*self.stats, &relay.routes.upstream);
                let traffic = &traffic;
                receiver.salvage_older_than(now, SALVAGE_AGE_MS, |sender, hdr, unit, have| {
                    if (hdr.broadcast || hdr.dst == me) && stats.admit(me, sender, hdr, upstream, traffic).is_some() {
                        s.take(hdr.src, unit, have);
                    }
                });
                self.flush_salvage(&mut salvage, now, &mut announced, vnet, &mut relay.per_frame);
            }
            if !heard.is_empty() {
                self.heard(&mut heard, now);
            }
        }
    }

    /// Delivers what [`Salvage`] collected, and empties it.
    fn flush_salvage(
        &self,
        salvage: &mut Salvage,
        now: u64,
        announced: &mut HashMap<Mac, (PeerName, u64)>,
        vnet: bool,
        per_frame: &mut PerFrame,
    ) {
        if salvage.units > 0 {
            self.stats.salvaged_units.fetch_add(salvage.units, Ordering::Relaxed);
            self.stats.salvaged_frames.fetch_add(salvage.frames.len() as u64, Ordering::Relaxed);
            for &(origin, a, b) in &salvage.frames {
                self.deliver(origin, &salvage.arena[a..b], now, announced, vnet, per_frame);
            }
        }
        salvage.clear();
    }

    /// Records heartbeats that arrived, and where they came from: a peer's
    /// datagrams go where its authenticated heartbeats come from (NAT-friendly).
    fn heard(&self, heard: &mut Vec<(PeerName, Heartbeat, usize, SocketAddr)>, now: u64) {
        self.stats.heartbeats_in.fetch_add(heard.len() as u64, Ordering::Relaxed);
        let mut links = lock(&self.links);
        for (peer, hb, len, from) in heard.drain(..) {
            let Some(l) = links.get_mut(&peer) else { continue };
            l.liveness.on_heartbeat(now, hb, len);
            if l.addr != from {
                log::info!("peer {peer} now sends from {from} (was {}); sending there", l.addr);
                l.addr = from;
            }
        }
    }

    /// Writes a unit from peer `origin` into the TAP and learns where its source MAC lives.
    fn deliver(&self, origin: PeerName, unit: &[u8], now: u64, announced: &mut HashMap<Mac, (PeerName, u64)>, vnet: bool, per_frame: &mut PerFrame) {
        let src: Mac = unit[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].try_into().expect("length checked by the caller");
        if src[0] & 1 == 0 {
            let fresh = match announced.get(&src) {
                Some(&(p, at)) => p != origin || now.saturating_sub(at) > MAC_REANNOUNCE_MS,
                None => true,
            };
            if fresh {
                announced.insert(src, (origin, now));
                self.learn.post(TxCmd::Learn(src, origin));
                self.mac_owners.note(src, Owner::Peer(origin), now);
            }
        }
        let out = if vnet {
            unit
        } else {
            // No virtio header on this device: only plain frames go in.
            return per_frame.deliver(&self.tap, unit);
        };
        if out[1] != 0 {
            self.counters.rx.superframes.add(1);
        }
        match self.tap.write_unit(out) {
            Ok(_) => self.stats.tap_units_out.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.tap_write_errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}
