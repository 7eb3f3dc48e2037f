//! The forwarding threads: read → plane → perform. Each queue has two sides,
//! one per direction, each owning its plane ([`meshnet_proto::plane`]), which
//! makes every forwarding decision; the sides only move bytes between the
//! device, the planes and the one UDP sender ([`crate::udp`]). Each side is a
//! `step` (one batch, never waiting); one thread runs both steps of a queue
//! ([`run_queue`], the default), or each side gets a thread of its own
//! (`--datapath-threads-per-queue 2`).
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
//! Neither side takes a lock or allocates per frame: they own their planes,
//! and the control plane (and the other side) reach them through channels
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
use std::time::{Duration, Instant};

use meshnet_proto::ingress::Refused;
use meshnet_proto::liveness::Liveness;
use meshnet_proto::plane::rx::{RxOut, RxPlane};
use meshnet_proto::plane::tx::{TxOut, TxPlane};
use meshnet_proto::plane::{Datagrams, PeerPath, QueueSealing, SharedCounters};
use meshnet_proto::rekey::{erase, Key};
use meshnet_proto::session::RELAY_INDEX_BIT;
use meshnet_proto::{Mac, PeerName};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};

use crate::device::Device;
use crate::traffic::{PeerTraffic, ThreadCounters, TrafficBook};
use crate::udp::UdpSender;

pub use meshnet_proto::plane::stats::StatsSet;
pub use meshnet_proto::plane::{Routes, Stats};

/// Units read from the TAP per batch.
const TX_BATCH: usize = 64;
/// Bytes the units of one TX batch are read into, one after the other: 64
/// small frames, or 15 superframes (a batch ends when a whole unit might not
/// fit). Pages are touched only as units fill them, so a queue's read buffer
/// costs at most this much memory, not 64 × 64 KiB.
const TX_ARENA: usize = 1 << 20;
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
    /// The peer advertised `CAP_MULTIQUEUE` (see [`PeerPath::multiqueue`]).
    pub multiqueue: bool,
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
        PeerPath { peer: self.peer, addr: self.addr, superframes: self.superframes, multiqueue: self.multiqueue }
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
    fn report(&mut self, stats: &StatsSet) {
        let grew = |last: &mut u64, now: u64| {
            let logged = now > *last && (*last == 0 || now / 1000 > *last / 1000);
            if logged {
                *last = now;
            }
            logged
        };
        let n = stats.total(|s| &s.encode_errors);
        if grew(&mut self.encode_errors, n) {
            log::warn!("dropped data that could not be sealed ({n} so far)");
        }
        for r in Refused::ALL {
            let n = stats.total(|s| &s.refused[r.index()]);
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

fn sealed_under(sealed: &[(u32, u64)], index: u32) -> u64 {
    sealed.iter().filter(|(i, _)| i & !RELAY_INDEX_BIT == index).map(|s| s.1).max().unwrap_or(0)
}

/// The heartbeat state of every direct peer, shared by both threads and the
/// control plane (locked per heartbeat, never per frame).
struct Link {
    liveness: Liveness,
    addr: SocketAddr,
    /// (receiver index, datagrams sealed) of each queue's direct (2q) and relay (2q + 1) session.
    sealed: Vec<(u32, u64)>,
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
    /// Units for the peer itself go unsealed (`trusted (userspace)`), or sealed again.
    Unsealed(PeerName, bool),
    Stop,
}

enum RxCmd {
    AddPeer(PeerLink, Arc<PeerTraffic>),
    RemovePeer(PeerName, Vec<u32>),
    /// A receiving key (and its relay key) of a new epoch; `done` runs once installed.
    AddRecv { peer: PeerName, index: u32, key: Key, done: Arc<Countdown> },
    /// A datagram another queue's socket received for this queue (see [`RxLoop::run`]).
    Foreign(Vec<u8>, SocketAddr),
    RemoveRecv(u32),
    /// As [`TxCmd::Switch`], for the relay session.
    SwitchRelay { peer: PeerName, from: u32, index: u32, key: Key },
    Routes(Arc<Routes>),
    /// Take unsealed datagrams from the peer, from this underlay address only (None: none).
    Unsealed(PeerName, Option<std::net::IpAddr>),
    Stop,
}

/// Runs its callback once every queue's receive thread counted down.
pub(crate) struct Countdown {
    left: std::sync::atomic::AtomicUsize,
    done: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Countdown {
    fn new(n: usize, done: Box<dyn FnOnce() + Send>) -> Arc<Countdown> {
        Arc::new(Countdown { left: n.into(), done: Mutex::new(Some(done)) })
    }

    fn count_down(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(f) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                f();
            }
        }
    }
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

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

/// Waits until one of `fds` is ready or `timeout_ms` passes; which are ready.
fn wait<const N: usize>(fds: &mut [libc::pollfd; N], timeout_ms: i32) -> [bool; N] {
    // SAFETY: fds is a valid array of N pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    std::array::from_fn(|i| n > 0 && fds[i].revents != 0)
}

/// What one step of a forwarding thread moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moved {
    Nothing,
    /// Datagrams received but nothing forwarded: heartbeats, probes, dropped
    /// datagrams (or chunks of a superframe not complete yet, whose last chunk
    /// then counts as traffic).
    Control,
    /// Frames forwarded (read from the device, delivered into it or relayed):
    /// an answer may follow, so the thread busy-polls before it sleeps.
    Traffic,
}

/// How a data plane's queues are served: `--datapath-threads-per-queue` and
/// `--datapath-busy-poll`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// 1: one thread forwards both directions of a queue ([`run_queue`]); 2: a
    /// TX and an RX thread.
    pub threads_per_queue: usize,
    /// How long a forwarding thread that has just forwarded frames polls before
    /// it sleeps ([`BusyPoll`]); zero: it sleeps at once.
    pub busy_poll: Duration,
}

/// `--datapath-busy-poll`'s default, in microseconds: longer than a reply
/// takes to come back across a LAN hop and the far router, short enough that
/// the budget lasts.
pub const DEFAULT_BUSY_POLL_US: u32 = 100;
/// The longest `--datapath-busy-poll` taken, in microseconds.
pub const MAX_BUSY_POLL_US: u32 = 1000;

impl Default for Layout {
    fn default() -> Layout {
        Layout { threads_per_queue: 1, busy_poll: Duration::from_micros(DEFAULT_BUSY_POLL_US.into()) }
    }
}

/// Polling without sleeping for a while after traffic (`--datapath-busy-poll
/// USEC`), so that the answer to what was just forwarded (a ping's reply, a
/// request's response, the next burst) is picked up by a running thread rather
/// than by waking a sleeping one (on a VM, an interrupt to a halted vCPU).
/// Polling is capped at [`BUSY_BUDGET`] of each [`BUSY_PERIOD`]: sparse
/// traffic cannot keep a core spinning, and under load (where the thread
/// rarely runs out of work, and a spin would only take the CPU from the
/// programs it serves) the budget is soon spent and the thread sleeps as
/// without polling. Only forwarded frames start a poll ([`Moved::Traffic`]),
/// not heartbeats: an idle router never polls, however many peers it has.
struct BusyPoll {
    window: Duration,
    period_start: Instant,
    spent: Duration,
}

/// The period over which polling is capped.
const BUSY_PERIOD: Duration = Duration::from_secs(1);
/// Polling allowed per [`BUSY_PERIOD`]: 5 % of a core per thread.
const BUSY_BUDGET: Duration = Duration::from_millis(50);

impl BusyPoll {
    fn new(window: Duration) -> BusyPoll {
        BusyPoll { window, period_start: Instant::now(), spent: Duration::ZERO }
    }

    /// Waits for `fds` as [`wait`] does, but first polls them (see
    /// [`BusyPoll::spin`]) if the last round forwarded traffic.
    fn wait<const N: usize>(&mut self, forwarded: bool, fds: &mut [libc::pollfd; N], timeout_ms: i32) -> [bool; N] {
        match forwarded.then(|| self.spin(fds)).flatten() {
            Some(ready) => ready,
            None => wait(fds, timeout_ms),
        }
    }

    /// Polls `fds` without sleeping (yielding the CPU to anything else
    /// runnable between polls) until one is ready or the window has passed;
    /// which are ready, or `None` if the caller should sleep.
    fn spin<const N: usize>(&mut self, fds: &mut [libc::pollfd; N]) -> Option<[bool; N]> {
        if self.window.is_zero() {
            return None;
        }
        let start = Instant::now();
        if start.duration_since(self.period_start) >= BUSY_PERIOD {
            self.period_start = start;
            self.spent = Duration::ZERO;
        }
        let window = self.window.min(BUSY_BUDGET.saturating_sub(self.spent));
        loop {
            let ready = wait(fds, 0);
            let spent = start.elapsed();
            if ready.iter().any(|r| *r) {
                self.spent += spent;
                return Some(ready);
            }
            if spent >= window {
                self.spent += spent;
                return None;
            }
            // SAFETY: plain syscall without arguments.
            unsafe { libc::sched_yield() };
        }
    }
}

/// One thread forwarding both directions of a queue (the default; `--datapath-threads-per-queue 1`):
/// it waits on the device, the socket and both mailboxes, then runs each
/// direction's step until neither moved anything. Under load it never sleeps,
/// so the device and the socket need not wake it: a TCP stream's ACKs, written
/// into the device while this thread delivers the data, are read by the same
/// thread in its next step, with no wake-up of another thread between.
fn run_queue(mut tx: TxLoop, mut rx: RxLoop, mut busy: BusyPoll) {
    let mut tb = tx.buffers();
    let mut rb = rx.buffers();
    let (tap, sock) = (tx.tap.raw_fd(), rx.socket.as_raw_fd());
    let mut forwarded = false;
    loop {
        let timeout = rx.timeout_ms().min(TICK_MS as i32);
        let ready = busy.wait(forwarded, &mut [poll_in(tap), poll_in(sock), poll_in(tx.efd.0), poll_in(rx.efd.0)], timeout);
        forwarded = false;
        if ready[2] {
            tx.efd.drain();
        }
        if ready[3] {
            rx.efd.drain();
        }
        // Both steps run at least once (heartbeats, ticks, salvage are due by
        // time, not by readiness), then again while either moved anything;
        // commands are taken between rounds, so a busy queue still takes them.
        loop {
            if !tx.commands() || !rx.commands() {
                return;
            }
            let sent = tx.step(&mut tb);
            let received = rx.step(&mut rb);
            if sent == Moved::Nothing && received == Moved::Nothing {
                break;
            }
            forwarded |= sent == Moved::Traffic || received == Moved::Traffic;
        }
    }
}

/// The running data plane: one queue (a TAP queue, a UDP socket of the port's
/// `SO_REUSEPORT` group, and one forwarding thread or a TX and an RX thread)
/// per `--datapath-threads`.
pub struct DataPlane {
    tx: Vec<Mailbox<TxCmd>>,
    rx: Vec<Mailbox<RxCmd>>,
    threads: Vec<JoinHandle<()>>,
    links: Links,
    clock: Instant,
    max_datagram: usize,
    /// Every forwarding thread's counters (each writes its own), read summed.
    pub stats: Arc<StatsSet>,
    /// Per-peer counters (each written by one thread, see [`crate::traffic`]).
    pub traffic: Arc<TrafficBook>,
    /// Each queue's thread counters.
    counters: Vec<Arc<ThreadCounters>>,
    /// Which peer owns which MAC, for the trusted-subnet sync (see [`crate::mac_owners`]).
    pub mac_owners: Arc<MacOwners>,
    layout: Layout,
}

impl DataPlane {
    /// Starts forwarding on `tap` (a TAP or a capture device) and `socket`
    /// (already bound): one queue, one thread.
    pub fn start(tap: impl Into<Device>, socket: UdpSocket, me: PeerName, max_datagram: usize) -> io::Result<DataPlane> {
        Self::start_queues(vec![tap.into()], vec![socket], me, max_datagram, Layout::default())
    }

    /// Starts forwarding per queue, with one thread for both directions
    /// (`layout.threads_per_queue` 1, see [`run_queue`]) or a TX and an RX thread (2):
    /// `devices[q]` is the device's queue q, `sockets[q]` the socket its kernel
    /// steers queue q's datagrams to ([`crate::udp::bind_queues`]). Heartbeats
    /// (liveness) run on queue 0.
    pub fn start_queues(
        devices: Vec<Device>,
        sockets: Vec<UdpSocket>,
        me: PeerName,
        max_datagram: usize,
        layout: Layout,
    ) -> io::Result<DataPlane> {
        let threads_per_queue = layout.threads_per_queue;
        let n = devices.len();
        if n == 0 || n != sockets.len() || n > meshnet_proto::plane::MAX_QUEUES as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{n} device queues for {} sockets", sockets.len())));
        }
        if !(1..=2).contains(&threads_per_queue) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{threads_per_queue} threads per queue (1 or 2)")));
        }
        if layout.busy_poll > Duration::from_micros(MAX_BUSY_POLL_US.into()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("busy poll {:?} (at most {MAX_BUSY_POLL_US} µs)", layout.busy_poll)));
        }
        let stats = Arc::new(StatsSet::default());
        let clock = Instant::now();
        let links: Links = Arc::default();
        let mac_owners: Arc<MacOwners> = Arc::default();
        let shared = Arc::new(SharedCounters::default());

        let mut tx_boxes = Vec::new();
        let mut tx_chans = Vec::new();
        let mut rx_boxes = Vec::new();
        let mut rx_chans = Vec::new();
        for _ in 0..n {
            let (t, r) = channel();
            tx_boxes.push(Mailbox { tx: t, efd: Arc::new(EventFd::new()?) });
            tx_chans.push(r);
            let (t, r) = channel();
            rx_boxes.push(Mailbox { tx: t, efd: Arc::new(EventFd::new()?) });
            rx_chans.push(r);
        }
        let mut threads = Vec::new();
        let mut counters = Vec::new();
        for (q, ((tap, socket), (trx, rrx))) in devices.into_iter().zip(sockets).zip(tx_chans.into_iter().zip(rx_chans)).enumerate() {
            socket.set_nonblocking(true)?;
            let state = Arc::new(UdpSocketState::new(UdpSockRef::from(&socket))?);
            let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
            let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
            let tap = Arc::new(tap);
            let socket = Arc::new(socket);
            let (tx_stats, rx_stats) = (stats.thread(), stats.thread());
            let qc = Arc::new(ThreadCounters::default());
            counters.push(qc.clone());
            let vnet = tap.vnet_hdr();
            let sealing = QueueSealing { queue: q as u16, queues: n as u16, shared: shared.clone() };
            let mut tx_plane = TxPlane::new(me, max_datagram, vnet, tx_stats.clone(), qc.clone());
            tx_plane.set_queue(sealing.clone());
            let mut rx_plane = RxPlane::new(me, max_datagram, vnet, rx_stats.clone(), qc.clone());
            rx_plane.set_queue(sealing);
            let tx_thread = TxLoop {
                queue: q,
                tap: tap.clone(),
                socket: socket.clone(),
                sender: UdpSender::new(tx_stats.clone(), &state, &socket),
                cmds: trx,
                efd: tx_boxes[q].efd.clone(),
                counters: qc.clone(),
                plane: tx_plane,
                stats: tx_stats,
                clock,
                links: links.clone(),
                mac_owners: mac_owners.clone(),
            };
            let rx_thread = RxLoop {
                queue: q,
                tap,
                sender: UdpSender::new(rx_stats.clone(), &state, &socket),
                socket,
                udp: state,
                cmds: rrx,
                efd: rx_boxes[q].efd.clone(),
                learn: tx_boxes.clone(),
                others: rx_boxes.clone(),
                plane: rx_plane,
                stats: rx_stats,
                all_stats: stats.clone(),
                clock,
                links: links.clone(),
                mac_owners: mac_owners.clone(),
            };
            let suffix = if n > 1 { format!("-{q}") } else { String::new() };
            if threads_per_queue == 1 {
                threads.push(std::thread::Builder::new().name(format!("forward{suffix}")).spawn(move || run_queue(tx_thread, rx_thread, BusyPoll::new(layout.busy_poll)))?);
            } else {
                threads.push(std::thread::Builder::new().name(format!("tap-to-udp{suffix}")).spawn(move || tx_thread.run(BusyPoll::new(layout.busy_poll)))?);
                threads.push(std::thread::Builder::new().name(format!("udp-to-tap{suffix}")).spawn(move || rx_thread.run(BusyPoll::new(layout.busy_poll)))?);
            }
        }
        let traffic = Arc::new(TrafficBook::default());
        Ok(DataPlane { tx: tx_boxes, rx: rx_boxes, threads, links, clock, max_datagram, stats, traffic, counters, mac_owners, layout })
    }

    /// How many queues forward.
    pub fn queues(&self) -> usize {
        self.tx.len()
    }

    /// Threads per queue and busy polling, as started.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Superframes read from the device (TX) and written to it whole (RX), all queues.
    pub fn superframes(&self) -> (u64, u64) {
        self.counters.iter().fold((0, 0), |(t, r), c| (t + c.tx_superframes.get(), r + c.rx.superframes.get()))
    }

    /// Entries in the MAC table (queue 0's: every queue learns the same remote MACs).
    pub fn mac_entries(&self) -> u64 {
        self.counters.iter().map(|c| c.tx_mac_entries.load(Ordering::Relaxed)).max().unwrap_or(0)
    }

    fn post_tx(&self, cmd: impl Fn() -> TxCmd) {
        for m in &self.tx {
            m.post(cmd());
        }
    }

    fn post_rx(&self, cmd: impl Fn() -> RxCmd) {
        for m in &self.rx {
            m.post(cmd());
        }
    }

    /// Starts heartbeats with `link.peer` and accepts its datagrams; data goes
    /// to it once routes say so. Receiver indexes must leave
    /// [`RELAY_INDEX_BIT`] clear: the relay sessions use it.
    pub fn add_peer(&self, link: PeerLink) {
        debug_assert_eq!(link.recv_index & RELAY_INDEX_BIT, 0);
        let now = self.clock.elapsed().as_millis() as u64;
        let sealed = vec![(0, 0); 2 * self.queues()];
        let liveness = Liveness::for_family(self.max_datagram, is_ipv6(link.addr), now);
        let link_state = Link { liveness, addr: link.addr, sealed };
        lock(&self.links).insert(link.peer, link_state);
        for q in 0..self.queues() {
            let traffic = self.traffic.of(link.peer, q);
            self.rx[q].post(RxCmd::AddPeer(link.clone(), traffic.clone()));
            self.tx[q].post(TxCmd::AddPeer(link.clone(), traffic));
        }
    }

    /// Stops carrying frames for `peer` (whose sessions we knew by `recv_indexes`).
    pub fn remove_peer(&self, peer: PeerName, recv_indexes: Vec<u32>) {
        lock(&self.links).remove(&peer);
        self.post_tx(|| TxCmd::RemovePeer(peer));
        self.post_rx(|| RxCmd::RemovePeer(peer, recv_indexes.clone()));
    }

    /// Rekeying: accepts `peer`'s datagrams under `index` (and its relay index)
    /// opened with `key`, beside the sessions already there. `done` runs on a
    /// receive thread once datagrams under `index` open on every queue.
    pub fn install_recv(&self, peer: PeerName, index: u32, key: Key, done: Box<dyn FnOnce() + Send>) {
        debug_assert_eq!(index & RELAY_INDEX_BIT, 0);
        let done = Countdown::new(self.queues(), done);
        self.post_rx(|| RxCmd::AddRecv { peer, index, key: key.clone(), done: done.clone() });
    }

    /// Rekeying: seals what goes to `peer` (directly and relayed) under
    /// `index`/`key` from now on, unless its sessions no longer seal under
    /// `from` (the connection was replaced meanwhile).
    pub fn switch_send(&self, peer: PeerName, from: u32, index: u32, key: Key) {
        self.post_rx(|| RxCmd::SwitchRelay { peer, from, index, key: key.clone() });
        self.post_tx(|| TxCmd::Switch { peer, from, index, key: key.clone() });
    }

    /// Rekeying: stops accepting datagrams under `index` (and its relay index);
    /// the receive thread erases their keys.
    pub fn remove_recv(&self, index: u32) {
        self.post_rx(|| RxCmd::RemoveRecv(index));
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

    /// `trusted (userspace)`: data frames from our device to `peer` itself go
    /// unsealed, and unsealed ones from `peer` are taken from underlay address
    /// `addr` only, when `addr` is Some; sealed both ways again when None.
    /// The control plane sets it only for a peer trusted both ways that
    /// advertised `CAP_TRUSTED_USERSPACE`; a peer added again starts sealed.
    pub fn set_unsealed(&self, peer: PeerName, addr: Option<std::net::IpAddr>) {
        self.post_tx(|| TxCmd::Unsealed(peer, addr.is_some()));
        self.post_rx(|| RxCmd::Unsealed(peer, addr));
    }

    /// Replaces the routes (after every topology change).
    pub fn set_routes(&self, routes: Routes) {
        let routes = Arc::new(routes);
        self.post_tx(|| TxCmd::Routes(routes.clone()));
        self.post_rx(|| RxCmd::Routes(routes.clone()));
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) {
        self.post_tx(|| TxCmd::Stop);
        self.post_rx(|| RxCmd::Stop);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The TAP → UDP thread of one queue.
struct TxLoop {
    queue: usize,
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
                if let Some(s) = l.sealed.get_mut(2 * self.queue) {
                    *s = sealed;
                }
            }
            // Liveness is queue 0's alone.
            if self.queue != 0 {
                continue;
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
            TxCmd::Unsealed(peer, on) => self.plane.set_unsealed(peer, on),
        }
        true
    }

    /// Handles the commands posted; false on `Stop`. The caller drains the
    /// eventfd first when it woke on it.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.cmds.try_recv() {
            if !self.handle(cmd) {
                return false;
            }
        }
        true
    }

    fn buffers(&self) -> TxBuffers {
        TxBuffers {
            arena: vec![0u8; TX_ARENA],
            starts: [0; TX_BATCH],
            lens: [0; TX_BATCH],
            out: TxOut::default(),
            hb_out: Datagrams::default(),
            sizes: Vec::new(),
            last_tick: 0,
        }
    }

    /// One round: the heartbeats due, then one batch of units from the device
    /// (without waiting). Traffic if it read any (heartbeats, sent by time, are
    /// not).
    fn step(&mut self, b: &mut TxBuffers) -> Moved {
        let hdr_room = if self.tap.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        let now = self.now();
        if now.saturating_sub(b.last_tick) >= TICK_MS {
            b.last_tick = now;
            self.heartbeats(&mut b.hb_out, &mut b.sizes);
            self.counters.tx_mac_entries.store(self.plane.mac_entries() as u64, Ordering::Relaxed);
        }

        // Read a batch of units, each where the last one ended (64-byte aligned).
        let (mut n, mut pos) = (0, 0);
        while n < TX_BATCH && pos + UNIT_BUF <= b.arena.len() {
            let buf = &mut b.arena[pos..pos + UNIT_BUF];
            match self.tap.read_unit(&mut buf[hdr_room..]) {
                Ok(Some(len)) => {
                    if hdr_room > 0 {
                        buf[..VNET_HDR_LEN].fill(0);
                    }
                    let len = len + hdr_room;
                    b.starts[n] = pos;
                    b.lens[n] = len;
                    n += 1;
                    pos += len.next_multiple_of(64);
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
            return Moved::Nothing;
        }
        let now = self.now();
        let (arena, out) = (&b.arena, &mut b.out);
        let units: [&[u8]; TX_BATCH] = std::array::from_fn(|i| match i < n {
            true => &arena[b.starts[i]..b.starts[i] + b.lens[i]],
            false => &[],
        });
        self.plane.handle(now, &units[..n], &b.lens[..n], out);
        for &mac in &out.moved_local {
            self.mac_owners.note(mac, Owner::Local, now);
        }
        for frame in out.device_frames() {
            write_device(&self.tap, &self.stats, frame);
        }
        if !out.datagrams.is_empty() {
            self.sender.send(&self.socket, &out.datagrams);
        }
        Moved::Traffic
    }

    fn run(mut self, mut busy: BusyPoll) {
        let mut b = self.buffers();
        let fd = self.tap.raw_fd();
        let mut forwarded = false;
        loop {
            let ready = busy.wait(forwarded, &mut [poll_in(fd), poll_in(self.efd.0)], TICK_MS as i32);
            if ready[1] {
                self.efd.drain();
                if !self.commands() {
                    return;
                }
            }
            forwarded = self.step(&mut b) == Moved::Traffic;
        }
    }
}

/// The TX side's buffers, allocated once.
struct TxBuffers {
    /// Units of the batch: `arena[starts[i]..starts[i] + lens[i]]`.
    arena: Vec<u8>,
    starts: [usize; TX_BATCH],
    lens: [usize; TX_BATCH],
    out: TxOut,
    hb_out: Datagrams,
    sizes: Vec<u16>,
    last_tick: u64,
}

/// The RX side's buffers, allocated once.
struct RxBuffers {
    bufs: Vec<Vec<u8>>,
    metas: [RecvMeta; RX_BATCH],
    out: RxOut,
    errors: ErrorLog,
    last_tick: u64,
}

/// The queue field of a datagram (0 if it is too short to have one).
fn queue_of(dgram: &[u8]) -> u16 {
    match dgram.get(2..4) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

/// Writes one unit (or plain frame) into the device, counting it.
fn write_device(dev: &Device, stats: &Stats, unit: &[u8]) {
    match dev.write_unit(unit) {
        Ok(_) => stats.tap_units_out.add(1),
        Err(_) => stats.tap_write_errors.add(1),
    }
}

/// The UDP → TAP thread of one queue.
struct RxLoop {
    queue: usize,
    tap: Arc<Device>,
    socket: Arc<UdpSocket>,
    udp: Arc<UdpSocketState>,
    sender: UdpSender,
    cmds: ChanRx<RxCmd>,
    efd: Arc<EventFd>,
    /// Every queue's TX thread: MACs learned here go to all.
    learn: Vec<Mailbox<TxCmd>>,
    /// Every queue's RX thread (this one's too): datagrams for another queue go there.
    others: Vec<Mailbox<RxCmd>>,
    stats: Arc<Stats>,
    /// Every thread's counters, for the error log.
    all_stats: Arc<StatsSet>,
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
                done.count_down();
            }
            RxCmd::Foreign(mut dgram, from) => {
                let now = self.clock.elapsed().as_millis() as u64;
                let mut out = RxOut::default();
                let _ = self.plane.receive(now, &mut dgram, from, &mut out);
                self.perform(&mut out, &dgram, now);
                if !out.heard.is_empty() {
                    self.heard(&mut out, now);
                }
            }
            RxCmd::RemoveRecv(index) => self.plane.remove_recv(index),
            RxCmd::SwitchRelay { peer, from, index, key } => self.plane.switch_relay(peer, from, index, &key.0),
            RxCmd::Routes(r) => self.plane.set_routes(r),
            RxCmd::Unsealed(peer, addr) => self.plane.set_unsealed_from(peer, addr),
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
                if let Some(s) = l.sealed.get_mut(2 * self.queue + 1) {
                    *s = sealed;
                }
            }
        }
        drop(links);
        if self.queue == 0 {
            errors.report(&self.all_stats);
        }
    }

    /// Performs what the plane decided for one datagram (or poll); whether it
    /// forwarded anything (relayed, or delivered into the device).
    fn perform(&mut self, out: &mut RxOut, dgram: &[u8], now: u64) -> bool {
        let forwarded = !out.relays.is_empty() || out.deliveries() > 0;
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
            for tx in &self.learn {
                tx.post(TxCmd::Learn(mac, peer));
            }
        }
        forwarded
    }

    /// Handles the commands posted; false on `Stop`. The caller drains the
    /// eventfd first when it woke on it.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.cmds.try_recv() {
            if !self.handle(cmd) {
                return false;
            }
        }
        true
    }

    fn buffers(&self) -> RxBuffers {
        RxBuffers {
            bufs: (0..RX_BATCH).map(|_| vec![0u8; 65536]).collect(),
            metas: [RecvMeta::default(); RX_BATCH],
            out: RxOut::default(),
            errors: ErrorLog::default(),
            last_tick: 0,
        }
    }

    /// How long the thread may sleep: partial superframes waiting must be
    /// salvaged in time.
    fn timeout_ms(&self) -> i32 {
        self.plane.timeout_ms().map_or(1000, |t| t as i32)
    }

    /// One round: the tick when due, one batch of datagrams from the socket
    /// (without waiting), then salvage. What it moved.
    fn step(&mut self, b: &mut RxBuffers) -> Moved {
        let now = self.clock.elapsed().as_millis() as u64;
        if now.saturating_sub(b.last_tick) > RX_TICK_MS {
            b.last_tick = now;
            self.tick(now, &mut b.errors);
        }
        let n = {
            let mut iovs: [IoSliceMut<'_>; RX_BATCH] = {
                let mut it = b.bufs.iter_mut();
                std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RX_BATCH buffers")))
            };
            match self.udp.recv(UdpSockRef::from(&*self.socket), &mut iovs, &mut b.metas) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    log::debug!("receiving: {e}");
                    0
                }
            }
        };
        let queues = self.others.len();
        let out = &mut b.out;
        let mut forwarded = false;
        for (buf, meta) in b.bufs.iter_mut().zip(b.metas.iter()).take(n) {
            let stride = meta.stride.max(1);
            for dgram in buf[..meta.len].chunks_mut(stride) {
                if queues > 1 {
                    // The kernel steers by the queue field; a GRO batch
                    // that mixed queues lands whole on its first one's
                    // socket: hand the others over, so that every
                    // (session, queue) is opened by one thread only.
                    let q = queue_of(dgram) as usize % queues;
                    if q != self.queue {
                        self.stats.udp_other_queue.add(1);
                        self.others[q].post(RxCmd::Foreign(dgram.to_vec(), meta.addr));
                        continue;
                    }
                }
                // Errors are counted by the plane.
                let _ = self.plane.receive(now, dgram, canonical(meta.addr), out);
                forwarded |= self.perform(out, dgram, now);
            }
        }
        // A superframe still missing chunks after SALVAGE_AGE_MS has lost
        // one: deliver what arrived rather than stall the flow.
        self.plane.poll(now, out);
        forwarded |= self.perform(out, &[], now);
        if !out.heard.is_empty() {
            self.heard(out, now);
        }
        match (n, forwarded) {
            (_, true) => Moved::Traffic,
            (0, false) => Moved::Nothing,
            _ => Moved::Control,
        }
    }

    fn run(mut self, mut busy: BusyPoll) {
        let mut b = self.buffers();
        let fd = self.socket.as_raw_fd();
        let mut forwarded = false;
        loop {
            let ready = busy.wait(forwarded, &mut [poll_in(fd), poll_in(self.efd.0)], self.timeout_ms());
            if ready[1] {
                self.efd.drain();
                if !self.commands() {
                    return;
                }
            }
            forwarded = self.step(&mut b) == Moved::Traffic;
        }
    }

    /// Records heartbeats that arrived, and where they came from: a peer's
    /// datagrams go where its authenticated heartbeats come from (NAT-friendly).
    fn heard(&self, out: &mut RxOut, now: u64) {
        self.stats.heartbeats_in.add(out.heard.len() as u64);
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


#[cfg(test)]
mod tests {
    use super::*;

    fn micros(us: u64) -> Duration {
        Duration::from_micros(us)
    }

    #[test]
    fn busy_poll_off_sleeps_at_once() {
        let efd = EventFd::new().unwrap();
        efd.signal();
        let mut busy = BusyPoll::new(Duration::ZERO);
        assert_eq!(busy.spin(&mut [poll_in(efd.0)]), None, "a zero window must not poll even a ready fd");
        assert_eq!(busy.spent, Duration::ZERO);
    }

    #[test]
    fn busy_poll_finds_what_becomes_ready_while_it_polls() {
        let (quiet, late) = (EventFd::new().unwrap(), Arc::new(EventFd::new().unwrap()));
        let mut busy = BusyPoll::new(micros(MAX_BUSY_POLL_US.into()) * 200);
        let signaller = {
            let late = late.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2));
                late.signal();
            })
        };
        let start = Instant::now();
        let ready = busy.spin(&mut [poll_in(quiet.0), poll_in(late.0)]);
        signaller.join().unwrap();
        assert_eq!(ready, Some([false, true]));
        assert!(start.elapsed() >= Duration::from_millis(2), "returned before the fd was ready");
        assert!(busy.spent >= Duration::from_millis(2) && busy.spent <= start.elapsed(), "{:?}", busy.spent);
    }

    #[test]
    fn busy_poll_gives_up_after_its_window() {
        let quiet = EventFd::new().unwrap();
        let mut busy = BusyPoll::new(micros(2000));
        let start = Instant::now();
        assert_eq!(busy.spin(&mut [poll_in(quiet.0)]), None);
        assert!(start.elapsed() >= micros(2000));
        assert!(busy.spent >= micros(2000));
    }

    #[test]
    fn busy_poll_stops_when_the_periods_budget_is_spent_and_starts_again_next_period() {
        let quiet = EventFd::new().unwrap();
        let mut busy = BusyPoll::new(micros(MAX_BUSY_POLL_US.into()));
        busy.spent = BUSY_BUDGET - micros(300);
        let start = Instant::now();
        assert_eq!(busy.spin(&mut [poll_in(quiet.0)]), None);
        // Only what was left of the budget (300 µs), not the 1 ms window.
        assert!(start.elapsed() >= micros(300) && busy.spent >= BUSY_BUDGET, "{:?}", busy.spent);
        let spent = busy.spent;
        let start = Instant::now();
        assert_eq!(busy.spin(&mut [poll_in(quiet.0)]), None);
        assert!(start.elapsed() < micros(MAX_BUSY_POLL_US.into()), "polled the whole window without budget: {:?}", start.elapsed());
        assert!(busy.spent - spent < micros(MAX_BUSY_POLL_US.into()));
        // A new period: the whole window again.
        busy.period_start -= BUSY_PERIOD;
        let start = Instant::now();
        assert_eq!(busy.spin(&mut [poll_in(quiet.0)]), None);
        assert!(start.elapsed() >= micros(MAX_BUSY_POLL_US.into()));
        assert!(busy.spent >= micros(MAX_BUSY_POLL_US.into()) && busy.spent < BUSY_BUDGET, "{:?}", busy.spent);
    }
}
