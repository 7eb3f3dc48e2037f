//! One TCP control connection — handshake, then messages and heartbeats — plus the
//! accept loop and the connection maker that dials targets and discovered peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshnet_proto::admission::{Outcome, Ticket};
use meshnet_proto::dialer::{Dial, DialId, Failure};
use meshnet_proto::handshake::{
    early_refusal, Established, Handshake, HandshakeConfig, HandshakeError, Hello, Role, CAP_GOSSIP_DIGEST, CAP_SUPERFRAMES, CAP_TRUSTED,
};
use meshnet_proto::identity::Identity;
use meshnet_proto::rekey::{self, Fresh, Output, RekeyConfig, RekeyMsg, Rekeyer};
use meshnet_proto::sendqueue::{Next, Pushed, SendQueue};
use meshnet_proto::wire::control::{ControlChannel, ControlError, ControlMsg};
use meshnet_router::dataplane::PeerLink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::mesh::{Direction, Mesh};

pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A connection that hears nothing for this long is torn down.
pub const DEAD_AFTER: Duration = Duration::from_secs(35);
/// A write that makes no progress for this long closes the connection: the peer
/// does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Our dials: the whole handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections: a stranger holds a half-open slot at most this long.
pub const INBOUND_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the admission gate forgets idle sources.
const ADMISSION_TICK: Duration = Duration::from_secs(30);
/// Encrypted bytes waiting for the socket above which the send queue is left
/// alone (so gossip coalesces there instead of piling up here).
const WRITE_BACKLOG: usize = 256 * 1024;
/// A connection's read buffer, and the room its output keeps once written:
/// at rest a connection carries digests and heartbeats of a few hundred bytes,
/// and a router with a hundred connections should not hold a burst for each
/// (16 + 64 KiB each made 8 of a 100-peer router's ~25 MiB).
const READ_BUF: usize = 4 * 1024;
const KEEP_PENDING: usize = 4 * 1024;
/// A connection looks whether its data keys are due when the rekeyer's next
/// deadline comes, but at least this often for the volume of data sealed (at
/// 10 Gbit/s two seconds seal 2^27 AES blocks, far below the 2^32 that force a
/// rekey), and at most this often while a rekey is under way. A wake-up per
/// connection every 250 ms was most of an idle router's CPU in a mesh of 40.
const REKEY_VOLUME_CHECK_MS: u64 = 2_000;
const REKEY_CHECK_MIN_MS: u64 = 250;
/// How long the data plane may take to install a new receiving key.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Reasons a connection ends that are not failures: the pair already has one.
pub const REPLACED: &str = "replaced by a newer connection";
pub const ALREADY_CONNECTED: &str = "already connected to";
pub const SELF_CONNECTION: &str = "connected to ourselves";
/// Why a connection to a router with this router's own name, key and another
/// incarnation is refused (a state directory copied to a second host).
pub const CLONED_IDENTITY: &str = "the peer runs with this router's own identity (name and key)";
/// Why a third router refuses one of two routers that share a name and key.
pub const SHARED_IDENTITY: &str = "two routers run with one identity (name and key)";

/// Why a connection ended (or never got established). `Display` gives the text
/// logged and shown in `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed,
    PeerClosedDuringHandshake,
    Read(String),
    Write(String),
    /// A write made no progress for [`WRITE_TIMEOUT`].
    WriteTimeout,
    /// The send queue overflowed: the peer reads too slowly.
    QueueFull,
    BadData(String),
    BadMessage(String),
    Encode(String),
    NoHeartbeat,
    Stopping,
    /// The mesh dropped the connection's queue.
    QueueClosed,
    /// The peer's Goodbye, with its reason.
    PeerGoodbye(String),
    /// We said goodbye, with this reason (queued by the mesh).
    Goodbye(String),
    /// We closed after an IPAM conflict (the peer was told).
    Ipam(String),
    Handshake(String),
    HandshakeTimeout,
    /// No `--conn-limit` slot was free.
    ConnLimit(usize),
    /// The mesh would not take the connection (ourselves, a duplicate).
    Establish(String),
    /// Rekeying failed (the peer did not answer in time, or the data plane did
    /// not take the new key).
    Rekey(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("peer closed the connection"),
            CloseReason::PeerClosedDuringHandshake => f.write_str("peer closed the connection during the handshake"),
            CloseReason::Read(e) => write!(f, "read: {e}"),
            CloseReason::Write(e) => write!(f, "write: {e}"),
            CloseReason::WriteTimeout => {
                write!(f, "write timed out: the peer read nothing for {}s", WRITE_TIMEOUT.as_secs())
            }
            CloseReason::QueueFull => f.write_str("send queue full: the peer reads too slowly"),
            CloseReason::BadData(e) => write!(f, "bad data from peer: {e}"),
            CloseReason::BadMessage(e) => write!(f, "bad message from peer: {e}"),
            CloseReason::Encode(e) => write!(f, "encode: {e}"),
            CloseReason::NoHeartbeat => write!(f, "no heartbeat for {}s", DEAD_AFTER.as_secs()),
            CloseReason::Stopping => f.write_str("router stopping"),
            CloseReason::QueueClosed => f.write_str("closed"),
            CloseReason::PeerGoodbye(r) => write!(f, "peer said goodbye: {r}"),
            CloseReason::Goodbye(r)
            | CloseReason::Ipam(r)
            | CloseReason::Handshake(r)
            | CloseReason::Establish(r)
            | CloseReason::Rekey(r) => f.write_str(r),
            CloseReason::HandshakeTimeout => f.write_str("handshake timed out"),
            CloseReason::ConnLimit(n) => write!(f, "connection limit ({n}) reached"),
        }
    }
}

impl CloseReason {
    /// Whether the connection ended only because the pair already has one (or,
    /// as the peer tells, it looped back). Reasons from the peer arrive as
    /// text, hence `contains`.
    pub fn is_duplicate(&self) -> bool {
        match self {
            CloseReason::PeerGoodbye(s)
            | CloseReason::Goodbye(s)
            | CloseReason::Handshake(s)
            | CloseReason::Establish(s) => [REPLACED, ALREADY_CONNECTED, SELF_CONNECTION].iter().any(|r| s.contains(r)),
            _ => false,
        }
    }

    /// Whether this router itself found the connection to be to itself. Only
    /// our own verdict counts: a peer's Goodbye saying so could be anyone's
    /// words, and would stop our dials of its address for good.
    pub fn is_ourselves(&self) -> bool {
        matches!(self, CloseReason::Establish(s) if s == SELF_CONNECTION)
    }
}

/// Counters of slow or hostile peers, for `status --json` (`limits`).
#[derive(Debug, Default)]
pub struct ConnCounters {
    pub gossip_coalesced: AtomicU64,
    pub closed_queue_full: AtomicU64,
    pub closed_write_timeout: AtomicU64,
    pub closed_no_heartbeat: AtomicU64,
}

/// A connection's send queue ([`SendQueue`]: bounded, gossip coalesced, Goodbye
/// first), filled by the mesh and emptied by the connection's task.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<SendQueue>,
    wake: Notify,
    counters: Arc<ConnCounters>,
}

/// The message will never be sent: the connection is closing.
#[derive(Debug)]
pub struct Closing;

impl Outbox {
    pub fn new(counters: Arc<ConnCounters>) -> Arc<Outbox> {
        Arc::new(Outbox { queue: Mutex::new(SendQueue::default()), wake: Notify::new(), counters })
    }

    /// Queues `msg` for the peer. Err: it will never be sent (the connection is
    /// closing, or this overflowed its queue and closes it).
    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn send(&self, msg: ControlMsg) -> Result<(), Closing> {
        let pushed = self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(msg);
        match pushed {
            Pushed::Queued => {}
            Pushed::Coalesced => {
                self.counters.gossip_coalesced.fetch_add(1, Ordering::Relaxed);
            }
            Pushed::Overflow => {
                self.wake.notify_one();
                return Err(Closing);
            }
            Pushed::Closing => return Err(Closing),
        }
        self.wake.notify_one();
        Ok(())
    }

    /// [`Outbox::send`] where a message that will never be sent needs nothing
    /// more: the connection is closing, and a queue that overflowed closes it
    /// and is counted (`limits.closed_queue_full`). What the peer missed it gets
    /// again in full when it reconnects (gossip, IPAM, DNS, the trust record);
    /// a goodbye is the last word to a connection that ends anyway.
    pub fn offer(&self, msg: ControlMsg) {
        if self.send(msg).is_err() {
            log::debug!("a message to a closing connection was dropped");
        }
    }

    fn pop(&self) -> Option<Next> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }
}

/// What every connection needs to handshake.
pub struct Local {
    pub identity: Identity,
    pub psk: Option<[u8; 32]>,
    pub udp_port: u16,
    /// `CAP_*` bits we advertise: `CAP_SUPERFRAMES` only when our device has a
    /// virtio header (a capture device takes plain frames only).
    pub capabilities: u32,
}

/// An admitted inbound connection's half-open slot; given back (with how the
/// handshake ended) when dropped.
struct HalfOpen {
    mesh: Arc<Mesh>,
    ticket: Option<Ticket>,
    outcome: Outcome,
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.mesh.admission_finished(ticket, self.outcome);
        }
    }
}

/// Accepts inbound control connections until shutdown. Each is judged by the
/// admission gate first (per-source rate, password backoff, half-open caps, free
/// `--conn-limit` slots); refusals are counted, not logged one by one.
pub async fn accept_loop(mesh: Arc<Mesh>, local: Arc<Local>, listener: TcpListener) {
    loop {
        let (stream, remote) = match listener.accept().await {
            // A dual-stack listener reports IPv4 peers as mapped IPv6: one
            // peer, one address (gossip, dials, UDP), whichever socket saw it.
            Ok((s, r)) => (s, meshnet_router::dataplane::canonical(r)),
            Err(e) => {
                log::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = match mesh.admit(remote.ip()) {
            Ok(t) => t,
            Err(refusal) => {
                if refusal.worth_telling() {
                    // A legitimate peer (wrong password, full router) learns why;
                    // this costs no key work. Bounded: the source spent a token.
                    let bytes = early_refusal(local.psk.is_some(), &refusal.to_string());
                    tokio::spawn(tell_and_close(stream, bytes));
                }
                // Otherwise dropped: closed at once.
                continue;
            }
        };
        let half_open = HalfOpen { mesh: mesh.clone(), ticket: Some(ticket), outcome: Outcome::Failed };
        let (mesh, local) = (mesh.clone(), local.clone());
        tokio::spawn(async move {
            if let Err(e) = run_connection(mesh, local, stream, remote, Direction::Inbound, None, Some(half_open), None).await {
                log::info!("connection from {remote} refused: {e}");
            }
        });
    }
}

/// Writes a refusal and closes, reading (and dropping) what the peer sent so the
/// close is a FIN, not a reset that could lose the refusal. At most ~2 s.
async fn tell_and_close(mut stream: TcpStream, bytes: Vec<u8>) {
    let wrote = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
    if matches!(wrote, Ok(Ok(()))) && stream.shutdown().await.is_ok() {
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut total = 0;
            while let Ok(n @ 1..) = stream.read(&mut sink).await {
                total += n;
                if total > 8 * 1024 {
                    break;
                }
            }
        })
        .await;
    }
}

/// Dials due targets and discovered peers, forever.
pub async fn maker_loop(mesh: Arc<Mesh>, local: Arc<Local>) {
    let mut gossip_timer = tokio::time::interval(ADMISSION_TICK);
    gossip_timer.tick().await;
    loop {
        for d in mesh.due_dials() {
            let (mesh, local) = (mesh.clone(), local.clone());
            tokio::spawn(async move { dial(mesh, local, d).await });
        }
        tokio::select! {
            _ = mesh.maker.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = gossip_timer.tick() => {
                mesh.admission_tick();
            }
        }
        mesh.gossip_tick();
        mesh.refresh_links();
        mesh.shed_excess();
        mesh.ipam_tick();
    }
}

/// Dials `d.key` and runs the connection. The mesh hears how it went: here
/// when no connection came of it, from [`run_connection`] otherwise.
async fn dial(mesh: Arc<Mesh>, local: Arc<Local>, d: Dial) {
    let key = d.key;
    let addr = match resolve(&key).await {
        Ok(a) => a,
        Err(e) => {
            log::info!("connect to {key}: {e}");
            mesh.dial_failed(d.id, Failure::Resolve(e));
            return;
        }
    };
    if !mesh.settings.reaches(&addr) {
        // TCP would connect, but our UDP socket cannot send to this family:
        // the connection would stay pending for ever. Say so instead.
        let why = format!("cannot reach {addr}: --host {} listens on {} only (use --host ::)", mesh.settings.host,
            if mesh.settings.host.is_ipv4() { "IPv4" } else { "IPv6" });
        mesh.dial_failed(d.id, Failure::Connect(why));
        return;
    }
    let stream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            mesh.dial_failed(d.id, Failure::Connect(format!("cannot reach {addr}: {e}")));
            return;
        }
        Err(_) => {
            mesh.dial_failed(d.id, Failure::Connect(format!("cannot reach {addr}: timed out")));
            return;
        }
    };
    match run_connection(mesh.clone(), local, stream, addr, Direction::Outbound, Some(d.id), None, None).await {
        Err(why @ CloseReason::ConnLimit(_)) => mesh.dial_failed(d.id, Failure::ConnLimit(why.to_string())),
        Err(e) if !e.is_duplicate() => log::warn!("connection to {key} failed: {e}"),
        _ => {}
    }
}

async fn resolve(key: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = key.parse::<SocketAddr>() {
        return Ok(a);
    }
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(key)).await {
        Ok(Ok(mut it)) => it.next().ok_or_else(|| format!("{key}: name has no address")),
        Ok(Err(e)) => Err(format!("cannot resolve {key}: {e}")),
        Err(_) => Err(format!("cannot resolve {key}: timed out")),
    }
}

/// What a spliced connection (see `crate::splice`) knows beforehand.
pub struct Spliced {
    /// The neighbour carrying it.
    pub via: meshnet_proto::PeerName,
    /// The peer it must reach.
    pub peer: meshnet_proto::PeerName,
}

/// Runs a spliced connection to `peer` through `via` over `stream` (one end of
/// a loopback pair); `observed` is the peer's UDP address as `via` sees it.
/// Returns how long it was established.
pub async fn run_spliced(
    mesh: Arc<Mesh>,
    local: Arc<Local>,
    stream: TcpStream,
    observed: SocketAddr,
    opener: bool,
    via: meshnet_proto::PeerName,
    peer: meshnet_proto::PeerName,
) -> Duration {
    let t = std::time::Instant::now();
    let direction = if opener { Direction::Outbound } else { Direction::Inbound };
    match run_connection(mesh, local, stream, observed, direction, None, None, Some(Spliced { via, peer })).await {
        Ok(why) => {
            log::info!("spliced connection to {peer} through {via} closed: {why}");
            t.elapsed()
        }
        Err(why) => {
            log::info!("spliced connection to {peer} through {via} failed: {why}");
            Duration::ZERO
        }
    }
}

/// Runs one connection to its end. Err = it never got established (the reason);
/// Ok = it was established and later closed (the reason). `half_open`: an
/// accepted connection's slot, given back as soon as the handshake ends.
async fn run_connection(
    mesh: Arc<Mesh>,
    local: Arc<Local>,
    mut stream: TcpStream,
    remote: SocketAddr,
    direction: Direction,
    dial: Option<DialId>,
    mut half_open: Option<HalfOpen>,
    spliced: Option<Spliced>,
) -> Result<CloseReason, CloseReason> {
    // Shutdown waits until this task ends.
    let _alive = mesh.conn_alive();
    if let Err(e) = stream.set_nodelay(true) {
        log::debug!("TCP_NODELAY on {remote}: {e}");
    }
    let queue = Outbox::new(mesh.conn_counters.clone());
    let recv_index = mesh.fresh_recv_index();
    let Some(id) = mesh.register(direction, remote, queue.clone(), recv_index) else {
        return Err(CloseReason::ConnLimit(mesh.settings.conn_limit));
    };
    if let Some(dial) = dial {
        mesh.dial_registered(dial, id);
    }
    if let Some(sp) = &spliced {
        mesh.set_spliced(id, sp.via);
    }
    let hello = Hello {
        name: mesh.settings.me,
        nickname: mesh.settings.nickname.clone(),
        uid: mesh.settings.uid,
        software: env!("CARGO_PKG_VERSION").to_string(),
        tcp_port: mesh.settings.port,
        udp_port: local.udp_port,
        receiver_index: recv_index,
        // We understand gossip digests; and say when we have fewer than two
        // connections (a router at its --conn-limit then makes room: see
        // meshnet_proto::slots).
        capabilities: local.capabilities
            | CAP_GOSSIP_DIGEST
            | meshnet_proto::handshake::CAP_DNS
            | meshnet_proto::handshake::CAP_DNS6
            | CAP_TRUSTED
            | meshnet_proto::handshake::CAP_TRUSTED_USERSPACE
            | meshnet_proto::handshake::CAP_MULTIQUEUE
            | meshnet_proto::handshake::CAP_SPLICE
            | mesh.need_capabilities(),
        binding: mesh.settings.binding.clone(),
    };
    let role = if direction == Direction::Outbound { Role::Initiator } else { Role::Responder };
    let cfg = HandshakeConfig { identity: local.identity.clone(), psk: local.psk, hello };
    let limit = if direction == Direction::Inbound { INBOUND_HANDSHAKE_TIMEOUT } else { HANDSHAKE_TIMEOUT };
    let mut stop = mesh.shutdown.subscribe();
    let result = tokio::select! {
        r = tokio::time::timeout(limit, handshake(&mut stream, role, cfg)) => r,
        _ = stop.wait_for(|s| s.is_some()) => Ok(Err(HandshakeFailure::Io(CloseReason::Stopping))),
    };
    let (outcome, result) = match result {
        Ok(Ok(est)) => (Outcome::Established, Ok(est)),
        Ok(Err(HandshakeFailure::Protocol(e))) => {
            let outcome = if matches!(e, HandshakeError::WrongPassword) { Outcome::WrongPassword } else { Outcome::Failed };
            (outcome, Err(CloseReason::Handshake(e.to_string())))
        }
        Ok(Err(HandshakeFailure::Io(why))) => (Outcome::Failed, Err(why)),
        Err(_) => (Outcome::TimedOut, Err(CloseReason::HandshakeTimeout)),
    };
    if let Some(mut h) = half_open.take() {
        h.outcome = outcome;
    }
    let est = match result {
        Ok(est) => est,
        Err(why) => {
            mesh.unregister(id, &why);
            return Err(why);
        }
    };
    let Established { mut channel, remote: hello, data_keys, role, remote_static, .. } = est;
    // The name is believed only if it is bound to the key the handshake authenticated.
    if let Err(why) = mesh.admit_identity(&hello, &remote_static, remote) {
        let mut out = Vec::new();
        if channel.send(&ControlMsg::Goodbye(why.clone()), &mut out).is_ok() {
            if let Err(e) = write_within(&mut stream, &out, Duration::from_secs(1)).await {
                log::debug!("goodbye to {remote}: {e}");
            }
        }
        let why = CloseReason::Establish(why);
        mesh.unregister(id, &why);
        return Err(why);
    }
    let clock = Instant::now();
    let rekey_cfg = RekeyConfig { interval_ms: mesh.settings.rekey_interval.as_millis() as u64 };
    let mut rekeyer = Rekeyer::new(role, rekey_cfg, &data_keys, recv_index, hello.receiver_index, 0);
    if let Some(sp) = spliced.as_ref().filter(|sp| sp.peer != hello.name) {
        // The splice was for another peer: whoever answered is not who we meant.
        let why = CloseReason::Establish(format!("spliced connection meant for {} reached {}", sp.peer, hello.name));
        mesh.unregister(id, &why);
        return Err(why);
    }
    let listen = SocketAddr::new(remote.ip(), hello.tcp_port);
    let link = PeerLink {
        peer: hello.name,
        // Spliced: where the relay sees the peer's heartbeats come from (its
        // NAT's mapping), port included; believed once heartbeats answer.
        addr: if spliced.is_some() { remote } else { SocketAddr::new(remote.ip(), hello.udp_port) },
        send_index: hello.receiver_index,
        send_key: data_keys.send,
        recv_index,
        recv_key: data_keys.recv,
        superframes: hello.capabilities & CAP_SUPERFRAMES != 0,
        multiqueue: hello.capabilities & meshnet_proto::handshake::CAP_MULTIQUEUE != 0,
    };
    if !link.superframes {
        log::info!("{} takes no superframes: frames go to it one by one (segmented here)", hello.name);
    }
    if let Err(refused) = mesh.establish(id, hello.name, hello.uid, hello.nickname.clone(), listen, link, hello.capabilities) {
        let why = refused.reason;
        let mut out = Vec::new();
        // A refusal for --conn-limit tells our topology first: the peer's
        // discovery can dial someone else.
        for m in &refused.topology {
            if let Err(e) = send_split(&mut channel, m.clone(), &mut out) {
                log::debug!("topology to refused {remote}: {e}");
                break;
            }
        }
        if channel.send(&ControlMsg::Goodbye(why.clone()), &mut out).is_ok() {
            // Best effort: the peer learns why; we close either way.
            if let Err(e) = write_within(&mut stream, &out, WRITE_TIMEOUT).await {
                log::debug!("goodbye to {remote}: {e}");
            }
        }
        let why = CloseReason::Establish(why);
        mesh.unregister(id, &why);
        return Err(why);
    }
    drop(data_keys);
    // Trusted subnets: what the peer may believe about us, sent once; ours is
    // checked against the signing key its handshake proved.
    // A spliced connection's socket is loopback: no address to trust.
    let local_ip = match spliced {
        Some(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        None => stream.local_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
    };
    let userspace = hello.capabilities & meshnet_proto::handshake::CAP_TRUSTED_USERSPACE != 0;
    mesh.trusted.connected(id, hello.name, local_ip, remote.ip(), hello.binding.keys.signing_key, userspace);
    if hello.capabilities & CAP_TRUSTED != 0 {
        queue.offer(ControlMsg::Trusted(mesh.trusted.record()));
    }
    let rekey = RekeyCtx { mesh: &mesh, id, peer: hello.name, clock };
    let why = run_established(&mesh, id, hello.name, &queue, remote, &mut channel, &mut stream, &mut rekeyer, &rekey).await;
    mesh.trusted.disconnected(id);
    let counter = match &why {
        CloseReason::QueueFull => Some(&mesh.conn_counters.closed_queue_full),
        CloseReason::WriteTimeout => Some(&mesh.conn_counters.closed_write_timeout),
        CloseReason::NoHeartbeat => Some(&mesh.conn_counters.closed_no_heartbeat),
        _ => None,
    };
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::Relaxed);
    }
    mesh.unregister(id, &why);
    Ok(why)
}

/// The kernel's smoothed round-trip time of TCP socket `fd`, in microseconds
/// (None before it has a sample, or if the kernel will not say).
fn tcp_rtt_us(fd: std::os::fd::RawFd) -> Option<u32> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large;
    // `fd` is the connection's socket, open for this whole function's caller.
    let r = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info as *mut libc::tcp_info as *mut libc::c_void, &mut len)
    };
    (r == 0 && info.tcpi_rtt > 0).then_some(info.tcpi_rtt)
}

/// An established connection's life: reads, the send queue, heartbeats, the
/// dead-peer check and shutdown in one select loop that never waits on a write:
/// encrypted bytes wait in `pending` and go out as the socket takes them; a
/// write without progress for [`WRITE_TIMEOUT`] closes the connection, and the
/// queue is not drained while more than [`WRITE_BACKLOG`] bytes wait.
#[allow(clippy::too_many_arguments)]
async fn run_established(
    mesh: &Mesh,
    id: u64,
    peer: meshnet_proto::PeerName,
    queue: &Outbox,
    remote: SocketAddr,
    channel: &mut ControlChannel,
    stream: &mut TcpStream,
    rekeyer: &mut Rekeyer,
    rekey: &RekeyCtx<'_>,
) -> CloseReason {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*stream);
    let (mut rd, mut wr) = stream.split();
    let mut pending: Vec<u8> = Vec::new();
    let mut sent = 0usize;
    // Since when the oldest unwritten byte has waited without any progress.
    let mut write_progress = tokio::time::Instant::now();
    // Set once a Goodbye is encoded: close when it has been written.
    let mut closing: Option<CloseReason> = None;
    let mut shutdown = mesh.shutdown.subscribe();
    if shutdown.borrow().is_some() {
        // Requested before we subscribed: the select below must still see it.
        shutdown.mark_changed();
    }
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut last_heard = tokio::time::Instant::now();
    // Reads loop until the socket is drained: a small buffer costs a few more
    // calls on a burst, and a hundred connections do not hold 64 KiB each.
    let mut buf = vec![0u8; READ_BUF];
    let mut rekey_at = rekey.next_check(rekeyer);
    let mut rekey_in = Vec::new();

    // The handshake's last read may have carried messages already.
    if let Err(why) = drain(mesh, id, peer, remote, channel, &mut rekey_in) {
        return finish_with(why, channel, &mut pending, sent, &mut wr).await;
    }
    loop {
        // Take from the queue only while the socket keeps up.
        if closing.is_none() && pending.len() - sent < WRITE_BACKLOG {
            let was_idle = sent == pending.len();
            match fill(queue, channel, &mut pending) {
                Ok(None) => {}
                Ok(Some(why)) => closing = Some(why),
                Err(why) => return why,
            }
            if was_idle && sent < pending.len() {
                write_progress = tokio::time::Instant::now();
            }
        }
        let writing = sent < pending.len();
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) => return CloseReason::PeerClosed,
                    Ok(n) => n,
                    Err(e) => return CloseReason::Read(e.to_string()),
                };
                last_heard = tokio::time::Instant::now();
                if let Err(e) = channel.feed(&buf[..n]) {
                    return CloseReason::BadData(e.to_string());
                }
                if let Err(why) = drain(mesh, id, peer, remote, channel, &mut rekey_in) {
                    return finish_with(why, channel, &mut pending, sent, &mut wr).await;
                }
                let was_idle = sent == pending.len();
                for msg in rekey_in.drain(..) {
                    let outs = rekeyer.on_message(rekey.now(), msg, &mut || rekey.fresh());
                    if let Err(why) = rekey.perform(outs, channel, &mut pending).await {
                        return why;
                    }
                    rekey_at = rekey.next_check(rekeyer);
                }
                if was_idle && sent < pending.len() {
                    write_progress = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep_until(rekey_at) => {
                let sealed = mesh.dataplane.sealed_under(peer, rekeyer.send_index());
                let blocks = rekey::blocks_sealed(sealed, crate::daemon::MAX_DATAGRAM);
                let was_idle = sent == pending.len();
                let outs = rekeyer.poll(rekey.now(), blocks, &mut || rekey.fresh());
                if let Err(why) = rekey.perform(outs, channel, &mut pending).await {
                    return why;
                }
                rekey_at = rekey.next_check(rekeyer);
                if was_idle && sent < pending.len() {
                    write_progress = tokio::time::Instant::now();
                }
            }
            w = wr.write(&pending[sent..]), if writing => {
                match w {
                    Ok(0) => return CloseReason::Write("wrote zero bytes".into()),
                    Ok(n) => {
                        sent += n;
                        write_progress = tokio::time::Instant::now();
                        if sent == pending.len() {
                            pending.clear();
                            // A burst's room is given back once written.
                            pending.shrink_to(KEEP_PENDING);
                            sent = 0;
                            if let Some(why) = closing.take() {
                                return why;
                            }
                        } else if sent > WRITE_BACKLOG {
                            pending.drain(..sent);
                            sent = 0;
                        }
                    }
                    Err(e) => return CloseReason::Write(e.to_string()),
                }
            }
            _ = tokio::time::sleep_until(write_progress + WRITE_TIMEOUT), if writing => {
                return CloseReason::WriteTimeout;
            }
            _ = queue.wake.notified(), if closing.is_none() && !writing => {}
            // The dead-peer check, on its own timer: nothing above can hold it up.
            _ = tokio::time::sleep_until(last_heard + DEAD_AFTER) => {
                return CloseReason::NoHeartbeat;
            }
            _ = heartbeat.tick() => {
                if let Some(rtt) = tcp_rtt_us(fd) {
                    mesh.set_rtt(id, rtt);
                }
                // A backed-up socket needs no heartbeat on top.
                if !writing {
                    if let Err(e) = channel.send(&ControlMsg::Heartbeat, &mut pending) {
                        return CloseReason::Encode(e.to_string());
                    }
                    write_progress = tokio::time::Instant::now();
                }
            }
            _ = shutdown.changed() => {
                let mut bye = Vec::new();
                if channel.send(&ControlMsg::Goodbye(CloseReason::Stopping.to_string()), &mut bye).is_ok() {
                    pending.extend_from_slice(&bye);
                    // Best effort within a second: the router is going away.
                    if let Err(e) = write_within_split(&mut wr, &pending[sent..], Duration::from_secs(1)).await {
                        log::debug!("goodbye to {peer}: {e}");
                    }
                }
                return CloseReason::Stopping;
            }
        }
    }
}

/// Encodes what the send queue holds into `pending`, up to [`WRITE_BACKLOG`].
/// Ok(Some(reason)): a Goodbye was encoded; close once it is written.
fn fill(queue: &Outbox, channel: &mut ControlChannel, pending: &mut Vec<u8>) -> Result<Option<CloseReason>, CloseReason> {
    while pending.len() < WRITE_BACKLOG {
        match queue.pop() {
            None => return Ok(None),
            Some(Next::Overflow) => return Err(CloseReason::QueueFull),
            Some(Next::Goodbye(why)) => {
                send_split(channel, ControlMsg::Goodbye(why.clone()), pending)?;
                return Ok(Some(CloseReason::Goodbye(why)));
            }
            Some(Next::Send(msg)) => send_split(channel, msg, pending)?,
        }
    }
    Ok(None)
}

/// Encodes `msg`; gossip too large for one message (coalesced gossip can be) is
/// sent in halves.
fn send_split(channel: &mut ControlChannel, msg: ControlMsg, out: &mut Vec<u8>) -> Result<(), CloseReason> {
    match channel.send(&msg, out) {
        Ok(()) => Ok(()),
        Err(ControlError::MessageTooLarge { .. }) => match msg {
            ControlMsg::Gossip(mut infos) if infos.len() > 1 => {
                let tail = infos.split_off(infos.len() / 2);
                send_split(channel, ControlMsg::Gossip(infos), out)?;
                send_split(channel, ControlMsg::Gossip(tail), out)
            }
            _ => Err(CloseReason::Encode("message too large".into())),
        },
        Err(e) => Err(CloseReason::Encode(e.to_string())),
    }
}

/// Closes after `why`, first telling the peer when it should know (an IPAM
/// conflict), within [`WRITE_TIMEOUT`].
async fn finish_with(
    why: CloseReason,
    channel: &mut ControlChannel,
    pending: &mut Vec<u8>,
    sent: usize,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
) -> CloseReason {
    if let CloseReason::Ipam(text) = &why {
        let mut bye = Vec::new();
        if channel.send(&ControlMsg::Goodbye(text.clone()), &mut bye).is_ok() {
            pending.extend_from_slice(&bye);
            if let Err(e) = write_within_split(wr, &pending[sent..], WRITE_TIMEOUT).await {
                log::debug!("goodbye after {why}: {e}");
            }
        }
    }
    why
}

async fn write_within(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!("write timed out after {}s", limit.as_secs())),
    }
}

async fn write_within_split(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, wr.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!("write timed out after {}s", limit.as_secs())),
    }
}

/// What a connection's rekeying acts on.
struct RekeyCtx<'a> {
    mesh: &'a Mesh,
    id: u64,
    peer: meshnet_proto::PeerName,
    clock: Instant,
}

impl RekeyCtx<'_> {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// When to poll `rekeyer` next: at its deadline, within
    /// [`REKEY_CHECK_MIN_MS`]..=[`REKEY_VOLUME_CHECK_MS`] from now.
    fn next_check(&self, rekeyer: &Rekeyer) -> tokio::time::Instant {
        let now = self.now();
        let at = rekeyer.next_deadline().clamp(now + REKEY_CHECK_MIN_MS, now + REKEY_VOLUME_CHECK_MS);
        tokio::time::Instant::from_std(self.clock + Duration::from_millis(at))
    }

    /// A fresh X25519 secret and a receiver index reserved for this connection.
    fn fresh(&self) -> Fresh {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).expect("system randomness");
        Fresh { secret, recv_index: self.mesh.reserve_recv_index(self.id) }
    }

    /// Performs what [`Rekeyer`] decided, in order; rekey messages are encoded
    /// into `pending`, which the connection loop writes. Err: close, with the reason.
    async fn perform(&self, outs: Vec<Output>, channel: &mut ControlChannel, pending: &mut Vec<u8>) -> Result<(), CloseReason> {
        let dp = &self.mesh.dataplane;
        for o in outs {
            match o {
                Output::InstallRecv { index, key } => {
                    // The peer may seal under it as soon as it hears from us: wait
                    // until the receive thread really has it.
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    // Err from `send` only means we stopped waiting (timed out).
                    dp.install_recv(self.peer, index, key, Box::new(move || tx.send(()).unwrap_or_default()));
                    match tokio::time::timeout(INSTALL_TIMEOUT, rx).await {
                        Ok(Ok(())) => {}
                        _ => return Err(CloseReason::Rekey("rekey: the data plane did not install the new key".into())),
                    }
                }
                Output::SwitchSend { from_index, index, key } => dp.switch_send(self.peer, from_index, index, key),
                Output::RemoveRecv { index } => {
                    dp.remove_recv(index);
                    self.mesh.release_recv_index(self.id, index);
                }
                Output::Send(msg) => {
                    channel.send(&ControlMsg::Rekey(msg), pending).map_err(|e| CloseReason::Encode(e.to_string()))?;
                }
                Output::Rekeyed { epoch } => {
                    log::debug!("data keys with {} rekeyed: epoch {epoch}", self.peer);
                    self.mesh.rekeyed(self.id, epoch);
                }
                Output::Close(why) => return Err(CloseReason::Rekey(why)),
            }
        }
        Ok(())
    }
}

/// Handles every complete message buffered in `channel`; rekey messages are
/// left in `rekey_in` for the connection's [`Rekeyer`]. Err: close, with the reason.
fn drain(
    mesh: &Mesh,
    id: u64,
    peer: meshnet_proto::PeerName,
    remote: SocketAddr,
    channel: &mut ControlChannel,
    rekey_in: &mut Vec<RekeyMsg>,
) -> Result<(), CloseReason> {
    loop {
        match channel.poll_message() {
            Ok(None) => return Ok(()),
            Ok(Some(ControlMsg::Heartbeat)) => {}
            Ok(Some(ControlMsg::Rekey(msg))) => rekey_in.push(msg),
            Ok(Some(ControlMsg::Gossip(infos))) => {
                if let Err(e) = mesh.on_gossip(id, infos) {
                    log::warn!("from {peer}: {e}");
                }
            }
            Ok(Some(ControlMsg::GossipDigest(d))) => mesh.on_gossip_digest(id, d),
            Ok(Some(ControlMsg::GossipSummary(s))) => mesh.on_gossip_summary(id, &s),
            Ok(Some(ControlMsg::Dns(m))) => crate::dns::on_message(mesh, id, m, mesh.now_ms()),
            Ok(Some(ControlMsg::Dns6(m))) => crate::dns::on_message(mesh, id, m, mesh.now_ms()),
            Ok(Some(ControlMsg::Splice(m))) => crate::splice::on_message(mesh, peer, m),
            Ok(Some(ControlMsg::Trusted(rec))) => match mesh.trusted.on_record(id, &rec) {
                Ok(()) => {
                    // Unsealed over the userspace path only while trust is
                    // mutual and the kernel path unavailable; sealed otherwise.
                    mesh.dataplane.set_unsealed(peer, mesh.trusted.unsealed_to(id));
                    log::info!(
                        "{peer} trusts {}; data to it: {}",
                        if rec.record.subnets.is_empty() { "no subnet".to_string() } else { rec.record.subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",") },
                        mesh.trusted.describe(id).0
                    )
                }
                Err(e) => log::warn!("from {peer}: {e}; data to it stays encrypted"),
            },
            Ok(Some(ControlMsg::Ipam(bytes))) => {
                if let Err(why) = mesh.on_ipam(peer, &bytes) {
                    log::warn!("{why}");
                    return Err(CloseReason::Ipam(why));
                }
            }
            Ok(Some(ControlMsg::Goodbye(reason))) => {
                if reason.starts_with(crate::mesh::IDENTITY_REFUSED) {
                    mesh.refused_by_peer(peer, remote, &reason);
                }
                mesh.ipam_refused_by_peer(peer, &reason);
                return Err(CloseReason::PeerGoodbye(reason));
            }
            Err(e) => return Err(CloseReason::BadMessage(e.to_string())),
        }
    }
}

/// Why a handshake did not complete (the timeout is the caller's).
enum HandshakeFailure {
    Protocol(HandshakeError),
    Io(CloseReason),
}

async fn handshake(stream: &mut TcpStream, role: Role, cfg: HandshakeConfig) -> Result<Established, HandshakeFailure> {
    let mut hs = Handshake::new(role, cfg).map_err(HandshakeFailure::Protocol)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| HandshakeFailure::Io(CloseReason::Write(e.to_string())))?;
        }
        if hs.is_complete() {
            return hs.finish().map_err(HandshakeFailure::Protocol);
        }
        let n = stream.read(&mut buf).await.map_err(|e| HandshakeFailure::Io(CloseReason::Read(e.to_string())))?;
        if n == 0 {
            return Err(HandshakeFailure::Io(CloseReason::PeerClosedDuringHandshake));
        }
        if let Err(e) = hs.feed(&buf[..n]) {
            // Send what the handshake has to say (a refusal) before closing.
            let out = hs.take_output();
            if !out.is_empty() {
                if let Err(w) = stream.write_all(&out).await {
                    log::debug!("refusal not sent: {w}");
                }
            }
            return Err(HandshakeFailure::Protocol(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_read_as_before() {
        assert_eq!(CloseReason::PeerClosed.to_string(), "peer closed the connection");
        assert_eq!(CloseReason::NoHeartbeat.to_string(), "no heartbeat for 35s");
        assert_eq!(CloseReason::Stopping.to_string(), "router stopping");
        assert_eq!(CloseReason::HandshakeTimeout.to_string(), "handshake timed out");
        assert_eq!(CloseReason::ConnLimit(100).to_string(), "connection limit (100) reached");
        assert_eq!(CloseReason::PeerGoodbye("x".into()).to_string(), "peer said goodbye: x");
        assert_eq!(CloseReason::Read("boom".into()).to_string(), "read: boom");
        assert!(CloseReason::PeerGoodbye(format!("{ALREADY_CONNECTED} 02:00:00:00:00:01")).is_duplicate());
        assert!(CloseReason::Goodbye(REPLACED.into()).is_duplicate());
        assert!(CloseReason::Establish(SELF_CONNECTION.into()).is_duplicate());
        assert!(!CloseReason::NoHeartbeat.is_duplicate());
        assert!(!CloseReason::PeerGoodbye("router stopping".into()).is_duplicate());
    }
}
