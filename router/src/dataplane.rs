//! The forwarding threads: read → plane → perform. Two threads, one per
//! direction, each owning its plane ([`meshnet_proto::plane`]), which makes
//! every forwarding decision; the threads only move bytes between the device,
//! the planes and the one UDP sender ([`crate::udp`]).
//!
//! * **TAP → UDP** reads units (virtio header + Ethernet frame, up to ~64 KiB
//!   with TSO) from the device in batches, hands each batch to the
//!   [`TxPlane`], writes the frames it returns for the device (ICMP
//!   "fragmentation needed") and sends its datagrams. Every tick it also takes
//!   the peers' learned addresses and path MTUs into the plane and has it seal
//!   the heartbeats that liveness ([`meshnet_proto::liveness`]) asks for.
//! * **UDP → TAP** receives batches with `recvmmsg` + GRO, hands each datagram
//!   to the [`RxPlane`], sends the relayed datagrams it returns and writes the
//!   units it delivers into the device (the kernel segments superframes on the
//!   far side). MACs the plane learned go to the TX thread; heartbeats heard
//!   are recorded in the shared heartbeat state, whose address a peer's
//!   datagrams then go to (NAT-friendly). Partial superframes are salvaged when
//!   the plane's timeout says.
//!
//! The control plane reads the heartbeat state ([`DataPlane::links`]) and lists
//! a connection as established, and so routes data over it, only while UDP
//! works both ways.
//!
//! Neither thread takes a lock or allocates per frame: they own their planes,
//! and the control plane (and the other thread) reach them through channels
//! drained once per batch, with an eventfd to wake a thread blocked in `poll`.
//! The one shared table, the peers' heartbeat state, is locked per heartbeat
//! round and per batch of heartbeats received, never per frame.

use crate::mac_owners::{MacOwners, Owner};
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver as ChanRx, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use meshnet_proto::ingress::Refused;
use meshnet_proto::liveness::Liveness;
use meshnet_proto::plane::rx::{RxOut, RxPlane};
use meshnet_proto::plane::tx::{TxOut, TxPlane};
use meshnet_proto::plane::{Datagrams, PeerPath};
use meshnet_proto::rekey::{erase, Key};
use meshnet_proto::session::RELAY_INDEX_BIT;
use meshnet_proto::{Mac, PeerName};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};

use crate::device::Device;
use crate::traffic::{PeerTraffic, ThreadCounters, TrafficBook};
use crate::udp::UdpSender;

pub use meshnet_proto::plane::{Routes, Stats};

/// Units read from the TAP per batch.
const TX_BATCH: usize = 64;
/// Receive buffers per `recvmmsg`; each holds a GRO aggregate of up to 64 KiB.
const RX_BATCH: usize = 16;
const UNIT_BUF: usize = 65536 + 64;
const VNET_HDR_LEN: usize = meshnet_proto::gso::VNET_HDR_LEN;
const SOCKET_BUFFER: usize = 8 << 20;
/// How often the TX thread looks for due heartbeats (and the RX thread picks up
/// learned addresses and path MTUs for its relay sessions).
const TICK_MS: u64 = 100;
/// How often the RX thread refreshes its relay paths and reports errors.
const RX_TICK_MS: u64 = 250;

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
    /// it, the planes send it plain frames (segmented in software).
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
    fn path(&self) -> PeerPath {
        PeerPath { peer: self.peer, addr: self.addr, superframes: self.superframes }
    }
}

/// Logs growth of the error counters the planes keep (they do not log): the
/// first of each and then every 1000th, as before the planes counted them.
#[derive(Default)]
struct ErrorLog {
    encode_errors: u64,
    refused: [u64; Refused::ALL.len()],
}

impl ErrorLog {
    fn report(&mut self, stats: &Stats) {
        let grew = |last: &mut u64, now: u64| {
            let logged = now > *last && (*last == 0 || now / 1000 > *last / 1000);
            if logged {
                *last = now;
            }
            logged
        };
        let n = stats.encode_errors.load(Ordering::Relaxed);
        if grew(&mut self.encode_errors, n) {
            log::warn!("dropped data that could not be sealed ({n} so far)");
        }
        for r in Refused::ALL {
            let n = stats.refused[r.index()].load(Ordering::Relaxed);
            if grew(&mut self.refused[r.index()], n) {
                log::warn!("refused frames whose claimed origin does not fit the peer they came from: {r} ({n} so far)");
            }
        }
    }
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

/// `addr` with an IPv4-mapped IPv6 address (what a dual-stack socket reports
/// for an IPv4 sender) as the IPv4 address it maps: one peer, one address,
/// whichever socket saw it.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The path to `addr` is IPv6 (not IPv4, mapped or not).
fn is_ipv6(addr: SocketAddr) -> bool {
    canonical(addr).is_ipv6()
}

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

        let vnet = tap.vnet_hdr();
        let tx_thread = TxLoop {
            tap: tap.clone(),
            socket: socket.clone(),
            sender: UdpSender::new(stats.clone(), &state, &socket),
            cmds: trx,
            efd: tx_box.efd.clone(),
            counters: counters.clone(),
            plane: TxPlane::new(me, max_datagram, vnet, stats.clone(), counters.clone()),
            stats: stats.clone(),
            clock,
            links: links.clone(),
            mac_owners: mac_owners.clone(),
        };
        let rx_thread = RxLoop {
            tap,
            sender: UdpSender::new(stats.clone(), &state, &socket),
            socket,
            udp: state,
            cmds: rrx,
            efd: rx_box.efd.clone(),
            learn: tx_box.clone(),
            plane: RxPlane::new(me, max_datagram, vnet, stats.clone(), counters.clone()),
            stats: stats.clone(),
            clock,
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
        let liveness = Liveness::for_family(self.max_datagram, is_ipv6(link.addr), now);
        let link_state = Link { liveness, addr: link.addr, sealed: [(0, 0); 2] };
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

/// The TAP → UDP thread.
struct TxLoop {
    tap: Arc<Device>,
    socket: Arc<UdpSocket>,
    sender: UdpSender,
    cmds: ChanRx<TxCmd>,
    efd: Arc<EventFd>,
    stats: Arc<Stats>,
    counters: Arc<ThreadCounters>,
    plane: TxPlane,
    clock: Instant,
    links: Links,
    mac_owners: Arc<MacOwners>,
}

impl TxLoop {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Takes the peers' learned addresses and path MTUs into the plane, has it
    /// seal the heartbeats that are due, and sends them.
    fn heartbeats(&mut self, out: &mut Datagrams, sizes: &mut Vec<u16>) {
        let now = self.now();
        out.clear();
        let mut links = lock(&self.links);
        let peers: Vec<PeerName> = self.plane.peer_names().collect();
        for peer in peers {
            let Some(l) = links.get_mut(&peer) else { continue };
            self.plane.set_path(peer, l.addr, l.liveness.path_mtu(now));
            if let Some(sealed) = self.plane.sealed(peer) {
                l.sealed[0] = sealed;
            }
            let Some(hb) = l.liveness.poll(now, sizes) else { continue };
            self.plane.seal_heartbeats(peer, hb, sizes, out);
        }
        drop(links);
        if !out.is_empty() {
            self.sender.send(&self.socket, out);
        }
    }

    fn handle(&mut self, cmd: TxCmd) -> bool {
        match cmd {
            TxCmd::Stop => return false,
            TxCmd::AddPeer(link, traffic) => self.plane.add_peer(link.path(), link.send_index, &link.send_key, traffic),
            // The old session (and its key) is dropped, erased, in the plane.
            TxCmd::Switch { peer, from, index, key } => self.plane.switch(peer, from, index, &key.0),
            TxCmd::RemovePeer(peer) => self.plane.remove_peer(peer),
            TxCmd::Learn(mac, peer) => {
                let now = self.now();
                self.plane.learn(mac, peer, now);
            }
            TxCmd::Routes(r) => self.plane.set_routes(r),
        }
        true
    }

    fn run(mut self) {
        let mut units: Vec<Vec<u8>> = (0..TX_BATCH).map(|_| vec![0u8; UNIT_BUF]).collect();
        let mut lens = [0usize; TX_BATCH];
        let mut out = TxOut::default();
        let mut hb_out = Datagrams::default();
        let mut sizes = Vec::new();
        let hdr_room = if self.tap.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        let fd = self.tap.raw_fd();
        let mut last_tick = 0u64;

        loop {
            let (_, woken) = wait(fd, libc::POLLIN, &self.efd, TICK_MS as i32);
            if woken {
                self.efd.drain();
                while let Ok(cmd) = self.cmds.try_recv() {
                    if !self.handle(cmd) {
                        return;
                    }
                }
            }
            let now = self.now();
            if now.saturating_sub(last_tick) >= TICK_MS {
                last_tick = now;
                self.heartbeats(&mut hb_out, &mut sizes);
                self.counters.tx_mac_entries.store(self.plane.mac_entries() as u64, Ordering::Relaxed);
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
            self.plane.handle(now, &units[..n], &lens[..n], &mut out);
            for &mac in &out.moved_local {
                self.mac_owners.note(mac, Owner::Local, now);
            }
            for frame in out.device_frames() {
                write_device(&self.tap, &self.stats, frame);
            }
            if !out.datagrams.is_empty() {
                self.sender.send(&self.socket, &out.datagrams);
            }
        }
    }
}

/// Writes one unit (or plain frame) into the device, counting it.
fn write_device(dev: &Device, stats: &Stats, unit: &[u8]) {
    match dev.write_unit(unit) {
        Ok(_) => stats.tap_units_out.fetch_add(1, Ordering::Relaxed),
        Err(_) => stats.tap_write_errors.fetch_add(1, Ordering::Relaxed),
    };
}

/// The UDP → TAP thread.
struct RxLoop {
    tap: Arc<Device>,
    socket: Arc<UdpSocket>,
    udp: Arc<UdpSocketState>,
    sender: UdpSender,
    cmds: ChanRx<RxCmd>,
    efd: Arc<EventFd>,
    learn: Mailbox<TxCmd>,
    stats: Arc<Stats>,
    plane: RxPlane,
    clock: Instant,
    links: Links,
    mac_owners: Arc<MacOwners>,
}

impl RxLoop {
    fn handle(&mut self, cmd: RxCmd) -> bool {
        match cmd {
            RxCmd::Stop => return false,
            RxCmd::AddPeer(link, t) => {
                self.plane.add_peer(link.path(), link.recv_index, &link.recv_key, link.send_index, &link.send_key, t)
            }
            RxCmd::RemovePeer(peer, indexes) => self.plane.remove_peer(peer, &indexes),
            RxCmd::AddRecv { peer, index, key, done } => {
                self.plane.add_recv(peer, index, &key.0);
                done();
            }
            RxCmd::RemoveRecv(index) => self.plane.remove_recv(index),
            RxCmd::SwitchRelay { peer, from, index, key } => self.plane.switch_relay(peer, from, index, &key.0),
            RxCmd::Routes(r) => self.plane.set_routes(r),
        }
        true
    }

    /// Every [`RX_TICK_MS`]: the relay paths from the heartbeat state, what the
    /// relay sessions sealed into it, and the error counters into the log.
    fn tick(&mut self, now: u64, errors: &mut ErrorLog) {
        let mut links = lock(&self.links);
        let peers: Vec<PeerName> = self.plane.peer_names().collect();
        for peer in peers {
            let Some(l) = links.get_mut(&peer) else { continue };
            self.plane.set_path(peer, l.addr, l.liveness.path_mtu(now));
            if let Some(sealed) = self.plane.sealed(peer) {
                l.sealed[1] = sealed;
            }
        }
        drop(links);
        errors.report(&self.stats);
    }

    /// Performs what the plane decided for one datagram (or poll).
    fn perform(&mut self, out: &mut RxOut, dgram: &[u8], now: u64) {
        if !out.relays.is_empty() {
            self.sender.send(&self.socket, &out.relays);
        }
        if out.deliveries() > 0 {
            for unit in self.plane.deliveries(out, dgram) {
                write_device(&self.tap, &self.stats, unit);
            }
        }
        for (mac, peer) in out.learned.drain(..) {
            self.mac_owners.note(mac, Owner::Peer(peer), now);
            self.learn.post(TxCmd::Learn(mac, peer));
        }
    }

    fn run(mut self) {
        let mut bufs: Vec<Vec<u8>> = (0..RX_BATCH).map(|_| vec![0u8; 65536]).collect();
        let mut metas = [RecvMeta::default(); RX_BATCH];
        let mut out = RxOut::default();
        let mut errors = ErrorLog::default();
        let fd = self.socket.as_raw_fd();
        let mut last_tick = 0u64;

        loop {
            // Partial superframes waiting: wake up in time to salvage them.
            let timeout = self.plane.timeout_ms().map_or(1000, |t| t as i32);
            let (_, woken) = wait(fd, libc::POLLIN, &self.efd, timeout);
            if woken {
                self.efd.drain();
                while let Ok(cmd) = self.cmds.try_recv() {
                    if !self.handle(cmd) {
                        return;
                    }
                }
            }
            let now = self.clock.elapsed().as_millis() as u64;
            if now.saturating_sub(last_tick) > RX_TICK_MS {
                last_tick = now;
                self.tick(now, &mut errors);
            }
            let n = {
                let mut iovs: [IoSliceMut<'_>; RX_BATCH] = {
                    let mut it = bufs.iter_mut();
                    std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RX_BATCH buffers")))
                };
                match self.udp.recv(UdpSockRef::from(&*self.socket), &mut iovs, &mut metas) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(e) => {
                        log::debug!("receiving: {e}");
                        0
                    }
                }
            };
            for (buf, meta) in bufs.iter_mut().zip(metas.iter()).take(n) {
                let stride = meta.stride.max(1);
                for dgram in buf[..meta.len].chunks_mut(stride) {
                    // Errors are counted by the plane.
                    let _ = self.plane.receive(now, dgram, canonical(meta.addr), &mut out);
                    self.perform(&mut out, dgram, now);
                }
            }
            // A superframe still missing chunks after SALVAGE_AGE_MS has lost
            // one: deliver what arrived rather than stall the flow.
            self.plane.poll(now, &mut out);
            self.perform(&mut out, &[], now);
            if !out.heard.is_empty() {
                self.heard(&mut out, now);
            }
        }
    }

    /// Records heartbeats that arrived, and where they came from: a peer's
    /// datagrams go where its authenticated heartbeats come from (NAT-friendly).
    fn heard(&self, out: &mut RxOut, now: u64) {
        self.stats.heartbeats_in.fetch_add(out.heard.len() as u64, Ordering::Relaxed);
        let mut links = lock(&self.links);
        for h in out.heard.drain(..) {
            let Some(l) = links.get_mut(&h.peer) else { continue };
            l.liveness.on_heartbeat(now, h.heartbeat, h.len);
            if l.addr != h.from {
                log::info!("peer {} now sends from {} (was {}); sending there", h.peer, h.from, l.addr);
                if is_ipv6(l.addr) != is_ipv6(h.from) {
                    l.liveness.set_family(is_ipv6(h.from));
                }
                l.addr = h.from;
            }
        }
    }
}
