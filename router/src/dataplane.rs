//! The forwarding loop: two threads, one per direction, each owning its state.
//!
//! * **TAP → UDP** reads units (virtio header + Ethernet frame, up to ~64 KiB with
//!   TSO) from the TAP in batches, learns local source MACs, picks the owning peer
//!   of each destination MAC (unknown and broadcast destinations go to every
//!   connected peer), packs and seals the units per peer with
//!   [`meshnet_proto::datapath::Encoder`] and sends each run of equal-sized
//!   datagrams with one UDP GSO `sendmsg`.
//! * **UDP → TAP** receives batches with `recvmmsg` + GRO, opens each datagram with
//!   [`meshnet_proto::datapath::Receiver`] and writes each unit whole into the TAP
//!   (the kernel segments superframes on the far side). It tells the TX thread
//!   which MACs live behind which peer.
//!
//! Neither thread takes a lock or allocates per frame: they own their tables, and
//! the control plane (and the other thread) reach them through channels drained
//! once per batch, with an eventfd to wake a thread blocked in `poll`.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver as ChanRx, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use meshnet_proto::datapath::{Encoder, Receiver, TxBatch, TxSession};
use meshnet_proto::mac_table::{MacOwner, MacTable};
use meshnet_proto::wire::datagram::InnerHeader;
use meshnet_proto::{Mac, PeerName};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use crate::tap::Tap;

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
const DEFAULT_TTL: u8 = 16;
const SOCKET_BUFFER: usize = 8 << 20;

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
    pub udp_rejected: AtomicU64,
    pub tap_units_out: AtomicU64,
    pub tap_write_errors: AtomicU64,
    pub dropped_no_peer: AtomicU64,
}

impl Stats {
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
            ("tap_units_out", g(&self.tap_units_out)),
            ("tap_write_errors", g(&self.tap_write_errors)),
            ("dropped_no_peer", g(&self.dropped_no_peer)),
        ]
    }
}

enum TxCmd {
    AddPeer(PeerLink),
    RemovePeer(PeerName),
    Learn(Mac, PeerName),
    Stop,
}

enum RxCmd {
    AddSession { index: u32, peer: PeerName, key: [u8; 32] },
    RemoveSession(u32),
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
    pub stats: Arc<Stats>,
}

impl DataPlane {
    /// Starts both forwarding threads on `tap` and `socket` (already bound).
    pub fn start(
        tap: Tap,
        socket: UdpSocket,
        me: PeerName,
        max_datagram: usize,
    ) -> io::Result<DataPlane> {
        socket.set_nonblocking(true)?;
        let state = Arc::new(UdpSocketState::new(UdpSockRef::from(&socket))?);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        let tap = Arc::new(tap);
        let socket = Arc::new(socket);
        let stats = Arc::new(Stats::default());
        let clock = Instant::now();

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
            me,
            encoder: Encoder::new(max_datagram),
            clock,
        };
        let rx_thread = RxLoop {
            tap,
            socket,
            udp: state,
            cmds: rrx,
            efd: rx_box.efd.clone(),
            learn: tx_box.clone(),
            stats: stats.clone(),
            clock,
        };
        let threads = vec![
            std::thread::Builder::new().name("tap-to-udp".into()).spawn(move || tx_thread.run())?,
            std::thread::Builder::new().name("udp-to-tap".into()).spawn(move || rx_thread.run())?,
        ];
        Ok(DataPlane { tx: tx_box, rx: rx_box, threads, stats })
    }

    /// Starts carrying frames to and from `link.peer`.
    pub fn add_peer(&self, link: PeerLink) {
        self.rx.post(RxCmd::AddSession { index: link.recv_index, peer: link.peer, key: link.recv_key });
        self.tx.post(TxCmd::AddPeer(link));
    }

    /// Stops carrying frames for `peer` (whose session we knew by `recv_index`).
    pub fn remove_peer(&self, peer: PeerName, recv_index: u32) {
        self.tx.post(TxCmd::RemovePeer(peer));
        self.rx.post(RxCmd::RemoveSession(recv_index));
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
    session: TxSession,
    /// Indices into the batch of units going to this peer as unicast.
    pending: Vec<u16>,
}

struct TxLoop {
    tap: Arc<Tap>,
    socket: Arc<UdpSocket>,
    udp: Arc<UdpSocketState>,
    cmds: ChanRx<TxCmd>,
    efd: Arc<EventFd>,
    stats: Arc<Stats>,
    me: PeerName,
    encoder: Encoder,
    clock: Instant,
}

impl TxLoop {
    fn run(mut self) {
        let mut units: Vec<Vec<u8>> = (0..TX_BATCH).map(|_| vec![0u8; UNIT_BUF]).collect();
        let mut lens = [0usize; TX_BATCH];
        let mut flood: Vec<u16> = Vec::with_capacity(TX_BATCH);
        let mut peers: Vec<TxPeer> = Vec::new();
        let mut index: HashMap<PeerName, usize> = HashMap::new();
        let mut macs = MacTable::new(MAC_AGEING_MS);
        let mut batch = TxBatch::new();
        let vnet = self.tap.vnet_hdr();
        let hdr_room = if vnet { 0 } else { VNET_HDR_LEN };
        let fd = self.tap.raw_fd();
        let mut last_expire = 0u64;

        loop {
            let (_, woken) = wait(fd, libc::POLLIN, &self.efd, 1000);
            if woken {
                self.efd.drain();
                while let Ok(cmd) = self.cmds.try_recv() {
                    match cmd {
                        TxCmd::Stop => return,
                        TxCmd::AddPeer(link) => {
                            let session = TxSession::new(link.send_index, &link.send_key);
                            let entry = TxPeer { link, session, pending: Vec::with_capacity(TX_BATCH) };
                            match index.get(&entry.link.peer) {
                                Some(&i) => peers[i] = entry,
                                None => {
                                    index.insert(entry.link.peer, peers.len());
                                    peers.push(entry);
                                }
                            }
                        }
                        TxCmd::RemovePeer(peer) => {
                            if let Some(i) = index.remove(&peer) {
                                peers.swap_remove(i);
                                if i < peers.len() {
                                    index.insert(peers[i].link.peer, i);
                                }
                                macs.remove_peer(peer);
                            }
                        }
                        TxCmd::Learn(mac, peer) => {
                            macs.learn(mac, MacOwner::Peer(peer), self.now());
                        }
                    }
                }
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
            for (i, unit) in units.iter().enumerate().take(n) {
                let len = lens[i];
                self.stats.tap_units_in.fetch_add(1, Ordering::Relaxed);
                self.stats.tap_bytes_in.fetch_add(len as u64, Ordering::Relaxed);
                if len < VNET_HDR_LEN + 14 {
                    continue;
                }
                let frame = &unit[VNET_HDR_LEN..len];
                let dst: Mac = frame[0..6].try_into().expect("14 bytes checked");
                let src: Mac = frame[6..12].try_into().expect("14 bytes checked");
                macs.learn(src, MacOwner::Local, now);
                if dst[0] & 1 != 0 {
                    flood.push(i as u16);
                    continue;
                }
                match macs.lookup(&dst, now) {
                    Some(MacOwner::Peer(p)) => match index.get(&p) {
                        Some(&pi) => peers[pi].pending.push(i as u16),
                        None => flood.push(i as u16),
                    },
                    Some(MacOwner::Local) => {}
                    None => flood.push(i as u16),
                }
            }
            if peers.is_empty() {
                self.stats.dropped_no_peer.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }

            // Encode and send, peer by peer.
            for p in peers.iter_mut() {
                batch.clear();
                if !p.pending.is_empty() {
                    let hdr = InnerHeader { ttl: DEFAULT_TTL, broadcast: false, src: self.me, dst: p.link.peer };
                    let _ = encode(&mut self.encoder, &mut p.session, hdr, &p.pending, &units, &lens, &mut batch);
                    p.pending.clear();
                }
                if !flood.is_empty() {
                    let hdr = InnerHeader { ttl: DEFAULT_TTL, broadcast: true, src: self.me, dst: PeerName::BROADCAST };
                    let _ = encode(&mut self.encoder, &mut p.session, hdr, &flood, &units, &lens, &mut batch);
                }
                if !batch.is_empty() {
                    self.send(&batch, p.link.addr);
                }
            }
        }
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn send(&self, batch: &TxBatch, dest: SocketAddr) {
        let max_segments = self.udp.max_gso_segments().max(1);
        for (bytes, seg) in batch.runs(max_segments.min(64)) {
            let count = bytes.len().div_ceil(seg);
            // The kernel wants a GSO send to stay under 64 KiB in all.
            let per_send = (65000 / seg).clamp(1, max_segments);
            for part in bytes.chunks(per_send * seg) {
                let transmit = Transmit {
                    destination: dest,
                    ecn: None,
                    contents: part,
                    segment_size: if part.len() > seg { Some(seg) } else { None },
                    src_ip: None,
                };
                self.send_one(&transmit, part.len().div_ceil(seg) as u64);
            }
            let _ = count;
        }
    }

    fn send_one(&self, transmit: &Transmit<'_>, datagrams: u64) {
        for _attempt in 0..50 {
            match self.udp.try_send(UdpSockRef::from(&*self.socket), transmit) {
                Ok(()) => {
                    self.stats.udp_datagrams_out.fetch_add(datagrams, Ordering::Relaxed);
                    self.stats.udp_bytes_out.fetch_add(transmit.contents.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Socket buffer full: wait for room rather than drop.
                    wait(self.socket.as_raw_fd(), libc::POLLOUT, &self.efd, 10);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let errors = self.stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                    if errors % 1000 == 0 {
                        log::warn!("sending to {}: {e}", transmit.destination);
                    }
                    return;
                }
            }
        }
        self.stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn encode(
    encoder: &mut Encoder,
    session: &mut TxSession,
    hdr: InnerHeader,
    which: &[u16],
    units: &[Vec<u8>],
    lens: &[usize],
    batch: &mut TxBatch,
) -> Result<(), meshnet_proto::datapath::DatapathError> {
    encoder.begin(session, hdr, batch);
    for &i in which {
        let i = i as usize;
        if let Err(e) = encoder.push(session, &units[i][..lens[i]], batch) {
            log::debug!("dropping a unit: {e}");
        }
    }
    encoder.finish(session, batch)
}

struct RxLoop {
    tap: Arc<Tap>,
    socket: Arc<UdpSocket>,
    udp: Arc<UdpSocketState>,
    cmds: ChanRx<RxCmd>,
    efd: Arc<EventFd>,
    learn: Mailbox<TxCmd>,
    stats: Arc<Stats>,
    clock: Instant,
}

impl RxLoop {
    fn run(self) {
        let mut bufs: Vec<Vec<u8>> = (0..RX_BATCH).map(|_| vec![0u8; 65536]).collect();
        let mut metas = [RecvMeta::default(); RX_BATCH];
        let mut receiver = Receiver::new();
        // MACs we told the TX thread about, and when.
        let mut announced: HashMap<Mac, (PeerName, u64)> = HashMap::new();
        let vnet = self.tap.vnet_hdr();
        let fd = self.socket.as_raw_fd();
        let mut last_expire = 0u64;

        loop {
            let (_, woken) = wait(fd, libc::POLLIN, &self.efd, 1000);
            if woken {
                self.efd.drain();
                while let Ok(cmd) = self.cmds.try_recv() {
                    match cmd {
                        RxCmd::Stop => return,
                        RxCmd::AddSession { index, peer, key } => {
                            receiver.add_session(index, peer, &key);
                            announced.retain(|_, (p, _)| *p != peer);
                        }
                        RxCmd::RemoveSession(index) => receiver.remove_session(index),
                    }
                }
            }
            let now = self.clock.elapsed().as_millis() as u64;
            if now.saturating_sub(last_expire) > 250 {
                receiver.expire(now);
                last_expire = now;
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
            for (buf, meta) in bufs.iter_mut().zip(metas.iter()).take(n) {
                let stride = meta.stride.max(1);
                for dgram in buf[..meta.len].chunks_mut(stride) {
                    self.stats.udp_datagrams_in.fetch_add(1, Ordering::Relaxed);
                    self.stats.udp_bytes_in.fetch_add(dgram.len() as u64, Ordering::Relaxed);
                    let tap = &self.tap;
                    let stats = &self.stats;
                    let learn = &self.learn;
                    let announced = &mut announced;
                    let result = receiver.receive(now, dgram, |peer, _hdr, unit| {
                        if unit.len() < VNET_HDR_LEN + 14 {
                            return;
                        }
                        let src: Mac = unit[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12]
                            .try_into()
                            .expect("length checked");
                        if src[0] & 1 == 0 {
                            let fresh = match announced.get(&src) {
                                Some(&(p, at)) => p != peer || now.saturating_sub(at) > MAC_REANNOUNCE_MS,
                                None => true,
                            };
                            if fresh {
                                announced.insert(src, (peer, now));
                                learn.post(TxCmd::Learn(src, peer));
                            }
                        }
                        let out = if vnet {
                            unit
                        } else if unit[1] == 0 && unit[0] & 1 == 0 {
                            // No virtio header on this TAP: only plain frames can go in.
                            &unit[VNET_HDR_LEN..]
                        } else {
                            stats.tap_write_errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        };
                        match tap.write_unit(out) {
                            Ok(_) => {
                                stats.tap_units_out.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                stats.tap_write_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                    if result.is_err() {
                        self.stats.udp_rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}
