//! Splices: control connections between two peers that cannot dial each other
//! (each behind its own NAT), carried through a neighbour of both, so that the
//! pair gets a handshake, data keys and heartbeats, and so a direct UDP path
//! once hole punching works (see ARCHITECTURE.md, "Direct paths through NAT").
//!
//! Each end joins the connection's byte stream to one end of a loopback TCP
//! pair; the other end of the pair is an ordinary connection
//! ([`crate::conn::run_spliced`]) whose UDP address is the one the relay saw
//! the peer's heartbeats come from. The relay forwards
//! [`ControlMsg::Splice`] messages and reads nothing in them. Each direction
//! has a window of [`SPLICE_WINDOW`] unacknowledged chunks, so a splice never
//! fills the relay's send queues.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshnet_proto::wire::control::{ControlMsg, SpliceBody, SpliceMsg, MAX_SPLICE_CHUNK, SPLICE_WINDOW};
use meshnet_proto::PeerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

use crate::mesh::Mesh;

/// A peer not connected for this long (discovery had its chance) gets a splice.
pub const SPLICE_AFTER: Duration = Duration::from_secs(4);
/// An `Open` not answered within this time is given up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most splice ends at once.
const MAX_ENDS: usize = 32;
/// Backoff after a splice failed or ended: doubling from this, at most [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(15);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A relay passes a chunk on only while the next hop's queue is shorter than this.
const RELAY_QUEUE_ROOM: usize = 128;

/// One end of a splice, as the mesh sees it.
struct End {
    via: PeerName,
    opened: Instant,
    /// Set once the other side accepted (or we accepted): bytes flow.
    pump: Option<mpsc::UnboundedSender<Vec<u8>>>,
    credits: Arc<Semaphore>,
    /// Chunks received and not yet written out (bounded by the window).
    unwritten: Arc<AtomicU32>,
}

#[derive(Default)]
struct Inner {
    /// By (other peer, id).
    ends: HashMap<(PeerName, u64), End>,
    backoff: HashMap<PeerName, (Instant, u32)>,
    unconnected_since: HashMap<PeerName, Instant>,
}

/// An end to start (the connection and its pump), handed to [`open_loop`],
/// which holds what a connection needs.
struct Start {
    key: (PeerName, u64),
    via: PeerName,
    observed: SocketAddr,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    credits: Arc<Semaphore>,
    unwritten: Arc<AtomicU32>,
    opener: bool,
}

/// The splice ends of this router and its counters as a relay.
pub struct Splices {
    inner: Mutex<Inner>,
    starts: mpsc::UnboundedSender<Start>,
    started: Mutex<Option<mpsc::UnboundedReceiver<Start>>>,
    pub relayed_messages: AtomicU64,
    pub relay_refused: AtomicU64,
    pub opened: AtomicU64,
    pub accepted: AtomicU64,
}

impl Default for Splices {
    fn default() -> Self {
        let (starts, started) = mpsc::unbounded_channel();
        Splices {
            inner: Mutex::default(),
            starts,
            started: Mutex::new(Some(started)),
            relayed_messages: AtomicU64::new(0),
            relay_refused: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        }
    }
}

impl Splices {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `status --json` `splice`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "ends": self.lock().ends.len(),
            "opened": self.opened.load(Ordering::Relaxed),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "relayed_messages": self.relayed_messages.load(Ordering::Relaxed),
            "relay_refused": self.relay_refused.load(Ordering::Relaxed),
        })
    }

    fn failed(&self, peer: PeerName) {
        let mut g = self.lock();
        let e = g.backoff.entry(peer).or_insert((Instant::now(), 0));
        let wait = BACKOFF_MIN.saturating_mul(1 << e.1.min(5)).min(BACKOFF_MAX);
        *e = (Instant::now() + wait, e.1 + 1);
    }

    /// The spliced connection to `peer` was established and lasted: no backoff.
    pub fn succeeded(&self, peer: PeerName) {
        self.lock().backoff.remove(&peer);
    }
}

/// A loopback TCP pair: (the connection's end, the splice's end).
async fn loopback_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = TcpStream::connect(l.local_addr()?).await?;
    let (b, from) = tokio::time::timeout(Duration::from_secs(2), l.accept()).await.map_err(|_| std::io::Error::other("loopback accept timed out"))??;
    if from != a.local_addr()? {
        // Another local process raced us to the port.
        return Err(std::io::Error::other("loopback pair: a stranger connected first"));
    }
    Ok((a, b))
}

fn msg(me: PeerName, to: PeerName, id: u64, body: SpliceBody) -> ControlMsg {
    ControlMsg::Splice(SpliceMsg { from: me, to, id, observed: None, body })
}

/// Sends `m` through our connection to `via`; false: there is none, or it is
/// closing. Where a caller ignores that, the other end gives up by itself: an
/// open nobody answers times out (`OPEN_TIMEOUT`), and a splice whose relay is
/// gone ends with its data.
fn send_via(mesh: &Mesh, via: PeerName, m: ControlMsg) -> bool {
    match mesh.splice_queue(via) {
        Some(q) => q.send(m).is_ok(),
        None => false,
    }
}

/// Every 2 s: opens splices to peers we should reach directly but cannot dial.
pub async fn open_loop(mesh: Arc<Mesh>, local: Arc<crate::conn::Local>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut shutdown = mesh.shutdown.subscribe();
    let Some(mut started) = mesh.splices.started.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            s = started.recv() => {
                if let Some(s) = s {
                    tokio::spawn(run_end(mesh.clone(), local.clone(), s));
                }
                continue;
            }
            _ = shutdown.wait_for(|s| s.is_some()) => return,
        }
        let me = mesh.settings.me;
        let now = Instant::now();
        // Give up opens nobody answered.
        {
            let mut g = mesh.splices.lock();
            let stale: Vec<(PeerName, u64)> = g
                .ends
                .iter()
                .filter(|(_, e)| e.pump.is_none() && now.duration_since(e.opened) > OPEN_TIMEOUT)
                .map(|(k, _)| *k)
                .collect();
            for k in &stale {
                g.ends.remove(k);
            }
            drop(g);
            for (peer, _) in stale {
                log::info!("splice to {peer}: no answer; trying again later");
                mesh.splices.failed(peer);
            }
        }
        let (unconnected, candidates) = mesh.splice_candidates();
        let mut opens = Vec::new();
        {
            let mut g = mesh.splices.lock();
            g.unconnected_since.retain(|p, _| unconnected.contains(p));
            for p in &unconnected {
                g.unconnected_since.entry(*p).or_insert(now);
            }
            for (to, via) in candidates {
                if opens.len() >= 2 || g.ends.len() >= MAX_ENDS {
                    break;
                }
                let waited = g.unconnected_since.get(&to).is_some_and(|t| now.duration_since(*t) >= SPLICE_AFTER);
                let due = g.backoff.get(&to).is_none_or(|(until, _)| now >= *until);
                if !waited || !due || g.ends.keys().any(|(p, _)| *p == to) {
                    continue;
                }
                let id = crate::mesh::random_u64();
                g.ends.insert(
                    (to, id),
                    End { via, opened: now, pump: None, credits: Arc::new(Semaphore::new(SPLICE_WINDOW as usize)), unwritten: Arc::default() },
                );
                opens.push((to, via, id));
            }
        }
        for (to, via, id) in opens {
            log::info!("splice to {to} through {via}: neither can dial the other; asking for a direct path");
            mesh.splices.opened.fetch_add(1, Ordering::Relaxed);
            if !send_via(&mesh, via, msg(me, to, id, SpliceBody::Open)) {
                mesh.splices.lock().ends.remove(&(to, id));
            }
        }
    }
}

/// A `Splice` message arrived on connection `conn` from its peer `sender`.
pub fn on_message(mesh: &Mesh, sender: PeerName, m: SpliceMsg) {
    let me = mesh.settings.me;
    if m.to != me {
        relay(mesh, sender, m);
        return;
    }
    // For us: it came through `sender`, the relay.
    let other = m.from;
    if other == sender {
        // A neighbour needs no splice to us (and its `observed` would be its own word).
        return;
    }
    let key = (other, m.id);
    match m.body {
        SpliceBody::Open => {
            let refuse = |why: &str| {
                // (Undelivered: the opener's open times out.)
                send_via(mesh, sender, msg(me, other, m.id, SpliceBody::Close(why.into())));
            };
            let Some(observed) = m.observed else { return refuse("no observed address") };
            if !mesh.settings.reaches(&observed) {
                return refuse("no address family in common");
            }
            if other >= me {
                return refuse("the peer with the smaller name opens");
            }
            if mesh.connected_to(other) {
                return refuse("already connected");
            }
            let mut g = mesh.splices.lock();
            if g.ends.len() >= MAX_ENDS || g.ends.keys().any(|(p, _)| *p == other) {
                drop(g);
                return refuse("a splice is under way");
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let end = End {
                via: sender,
                opened: Instant::now(),
                pump: Some(tx),
                credits: Arc::new(Semaphore::new(SPLICE_WINDOW as usize)),
                unwritten: Arc::default(),
            };
            let (credits, unwritten) = (end.credits.clone(), end.unwritten.clone());
            g.ends.insert(key, end);
            drop(g);
            mesh.splices.accepted.fetch_add(1, Ordering::Relaxed);
            log::info!("splice from {other} through {sender}: taken; its UDP address as {sender} sees it: {observed}");
            // (Undelivered: the opener's open times out, and this end's data with it.)
            send_via(mesh, sender, msg(me, other, m.id, SpliceBody::Accept));
            // (Fails only once the open loop has returned: the router is stopping.)
            let _ = mesh.splices.starts.send(Start { key, via: sender, observed, rx, credits, unwritten, opener: false });
        }
        SpliceBody::Accept => {
            let Some(observed) = m.observed else { return };
            let mut g = mesh.splices.lock();
            let Some(end) = g.ends.get_mut(&key) else { return };
            if end.pump.is_some() || end.via != sender {
                return;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            end.pump = Some(tx);
            let (credits, unwritten) = (end.credits.clone(), end.unwritten.clone());
            drop(g);
            log::info!("splice to {other} through {sender}: accepted; its UDP address as {sender} sees it: {observed}");
            // (Fails only once the open loop has returned: the router is stopping.)
            let _ = mesh.splices.starts.send(Start { key, via: sender, observed, rx, credits, unwritten, opener: true });
        }
        SpliceBody::Data(bytes) => {
            let g = mesh.splices.lock();
            let Some(end) = g.ends.get(&key).filter(|e| e.via == sender) else { return };
            let Some(pump) = &end.pump else { return };
            if end.unwritten.fetch_add(1, Ordering::Relaxed) >= SPLICE_WINDOW {
                // The other end ignores the window: end the splice.
                drop(g);
                close_end(mesh, key, "window exceeded");
                return;
            }
            // (Fails only once the end's pump has ended: the splice is closing.)
            let _ = pump.send(bytes);
        }
        SpliceBody::Ack(n) => {
            let g = mesh.splices.lock();
            if let Some(end) = g.ends.get(&key).filter(|e| e.via == sender) {
                if end.credits.available_permits() + n as usize <= SPLICE_WINDOW as usize {
                    end.credits.add_permits(n as usize);
                }
            }
        }
        SpliceBody::Close(why) => {
            let removed = mesh.splices.lock().ends.remove(&key);
            if let Some(end) = removed {
                log::info!("splice with {other} closed by it: {why}");
                if end.pump.is_none() {
                    mesh.splices.failed(other);
                }
            }
        }
    }
}

fn close_end(mesh: &Mesh, key: (PeerName, u64), why: &str) {
    let removed = mesh.splices.lock().ends.remove(&key);
    if let Some(end) = removed {
        // (Undelivered: the other end's data stops, and it ends too.)
        send_via(mesh, end.via, msg(mesh.settings.me, key.0, key.1, SpliceBody::Close(why.into())));
        mesh.splices.failed(key.0);
    }
}

/// As a relay: passes `m` on to its `to`, only from the peer it names as
/// `from`, stamping `observed` on `Open`/`Accept` with the UDP address our
/// link to `from` uses (where its authenticated heartbeats come from).
fn relay(mesh: &Mesh, sender: PeerName, mut m: SpliceMsg) {
    if m.from != sender {
        mesh.splices.relay_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let refuse = |why: &str| {
        mesh.splices.relay_refused.fetch_add(1, Ordering::Relaxed);
        if !matches!(m.body, SpliceBody::Close(_)) {
            let back = ControlMsg::Splice(SpliceMsg { from: m.to, to: m.from, id: m.id, observed: None, body: SpliceBody::Close(why.into()) });
            if let Some(q) = mesh.splice_queue(sender) {
                q.offer(back);
            }
        }
    };
    let Some(q) = mesh.splice_queue(m.to) else {
        return refuse(&format!("{} has no connection to {} that carries splices", mesh.settings.me, m.to));
    };
    m.observed = match m.body {
        SpliceBody::Open | SpliceBody::Accept => match mesh.udp_addr_of(sender) {
            Some(a) => Some(a),
            None => return refuse("no UDP address heard"),
        },
        _ => None,
    };
    if matches!(m.body, SpliceBody::Data(_)) && q.len() >= RELAY_QUEUE_ROOM {
        return refuse("relay busy");
    }
    if q.send(ControlMsg::Splice(m)).is_ok() {
        mesh.splices.relayed_messages.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs one splice end: the loopback pair, the connection on one end of it,
/// and the pump between the other end and the relay.
async fn run_end(mesh: Arc<Mesh>, local: Arc<crate::conn::Local>, start: Start) {
    let Start { key, via, observed, mut rx, credits, unwritten, opener } = start;
    let me = mesh.settings.me;
    let (other, id) = key;
    let (near, far) = match loopback_pair().await {
        Ok(p) => p,
        Err(e) => {
            log::warn!("splice with {other}: {e}");
            close_end(&mesh, key, "no loopback pair");
            return;
        }
    };
    let conn = tokio::spawn(crate::conn::run_spliced(mesh.clone(), local, near, observed, opener, via, other));
    let (mut rd, mut wr) = far.into_split();
    let mut buf = vec![0u8; MAX_SPLICE_CHUNK];
    let why = loop {
        tokio::select! {
            r = async {
                let permit = credits.acquire().await;
                let r = rd.read(&mut buf).await;
                if let Ok(p) = permit {
                    p.forget();
                }
                r
            } => match r {
                Ok(0) => break "connection ended".to_string(),
                Err(e) => break format!("read: {e}"),
                Ok(n) => {
                    if !send_via(&mesh, via, msg(me, other, id, SpliceBody::Data(buf[..n].to_vec()))) {
                        break format!("lost the connection to {via}");
                    }
                }
            },
            b = rx.recv() => match b {
                None => break "closed".to_string(),
                Some(bytes) => {
                    if let Err(e) = wr.write_all(&bytes).await {
                        break format!("write: {e}");
                    }
                    unwritten.fetch_sub(1, Ordering::Relaxed);
                    if !send_via(&mesh, via, msg(me, other, id, SpliceBody::Ack(1))) {
                        break format!("lost the connection to {via}");
                    }
                }
            },
        }
    };
    log::info!("splice with {other} through {via} ends: {why}");
    drop(wr);
    drop(rd);
    let lasted = conn.await.unwrap_or_default();
    close_end(&mesh, key, &why);
    if lasted >= Duration::from_secs(60) {
        mesh.splices.succeeded(other);
    }
}
