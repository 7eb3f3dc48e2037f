//! One TCP control connection — handshake, then messages and heartbeats — plus the
//! accept loop and the connection maker that dials targets and discovered peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnet_proto::handshake::{Established, Handshake, HandshakeConfig, HandshakeError, Hello, Role, CAP_SUPERFRAMES};
use meshnet_proto::identity::Identity;
use meshnet_proto::wire::control::ControlMsg;
use meshnet_router::dataplane::PeerLink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::mesh::{Direction, Mesh};

pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A connection that hears nothing for this long is torn down.
pub const DEAD_AFTER: Duration = Duration::from_secs(35);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const GOSSIP_EVERY: Duration = Duration::from_secs(30);
/// Reasons a connection ends that are not failures: the pair already has one.
pub const REPLACED: &str = "replaced by a newer connection";
pub const ALREADY_CONNECTED: &str = "already connected to";
pub const SELF_CONNECTION: &str = "connected to ourselves";

/// Whether a connection ended only because the pair already has one (or it looped back to us).
fn is_duplicate(reason: &str) -> bool {
    [REPLACED, ALREADY_CONNECTED, SELF_CONNECTION].iter().any(|r| reason.contains(r))
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

/// Accepts inbound control connections until shutdown.
pub async fn accept_loop(mesh: Arc<Mesh>, local: Arc<Local>, listener: TcpListener) {
    let mut recent: Vec<Instant> = Vec::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Accept rate limit: at most 20 new connections a second.
        let now = Instant::now();
        recent.retain(|t| now.duration_since(*t) < Duration::from_secs(1));
        if recent.len() >= 20 {
            log::warn!("refusing connection from {remote}: too many connection attempts");
            continue;
        }
        recent.push(now);
        let (mesh, local) = (mesh.clone(), local.clone());
        tokio::spawn(async move {
            if let Err(e) = run_connection(mesh, local, stream, remote, Direction::Inbound, None).await {
                log::info!("connection from {remote} refused: {e}");
            }
        });
    }
}

/// Dials due targets and discovered peers, forever.
pub async fn maker_loop(mesh: Arc<Mesh>, local: Arc<Local>) {
    let mut gossip_timer = tokio::time::interval(GOSSIP_EVERY);
    gossip_timer.tick().await;
    loop {
        for key in mesh.due_dials() {
            let (mesh, local) = (mesh.clone(), local.clone());
            tokio::spawn(async move { dial(mesh, local, key).await });
        }
        tokio::select! {
            _ = mesh.maker.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = gossip_timer.tick() => mesh.gossip_everything(),
        }
        mesh.refresh_links();
        mesh.ipam_tick();
    }
}

async fn dial(mesh: Arc<Mesh>, local: Arc<Local>, key: String) {
    let addr = match resolve(&key).await {
        Ok(a) => a,
        Err(e) => {
            log::info!("connect to {key}: {e}");
            mesh.dial_result(&key, Err(e));
            return;
        }
    };
    let stream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            mesh.dial_result(&key, Err(format!("cannot reach {addr}: {e}")));
            return;
        }
        Err(_) => {
            mesh.dial_result(&key, Err(format!("cannot reach {addr}: timed out")));
            return;
        }
    };
    let started = Instant::now();
    let result = run_connection(mesh.clone(), local, stream, addr, Direction::Outbound, Some(&key)).await;
    match result {
        Ok(why) if is_duplicate(&why) => mesh.dial_satisfied(&key),
        Ok(why) => mesh.dial_closed(&key, &why, started.elapsed()),
        Err(e) if is_duplicate(&e) => mesh.dial_satisfied(&key),
        Err(e) => {
            log::warn!("connection to {key} failed: {e}");
            mesh.dial_result(&key, Err(e));
        }
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

/// Runs one connection to its end. Err = it never got established (the reason);
/// Ok = it was established and later closed (the reason).
async fn run_connection(
    mesh: Arc<Mesh>,
    local: Arc<Local>,
    mut stream: TcpStream,
    remote: SocketAddr,
    direction: Direction,
    dial_key: Option<&str>,
) -> Result<String, String> {
    let _ = stream.set_nodelay(true);
    let (queue_tx, mut queue) = mpsc::unbounded_channel();
    let recv_index = mesh.fresh_recv_index();
    let Some(id) = mesh.register(direction, remote, queue_tx, recv_index) else {
        return Err(format!("connection limit ({}) reached", mesh.settings.conn_limit));
    };
    if let Some(key) = dial_key {
        mesh.dial_result(key, Ok(id));
    }
    let hello = Hello {
        name: mesh.settings.me,
        nickname: mesh.settings.nickname.clone(),
        uid: mesh.settings.uid,
        software: env!("CARGO_PKG_VERSION").to_string(),
        tcp_port: mesh.settings.port,
        udp_port: local.udp_port,
        receiver_index: recv_index,
        capabilities: local.capabilities,
        binding: mesh.settings.binding.clone(),
    };
    let role = if direction == Direction::Outbound { Role::Initiator } else { Role::Responder };
    let cfg = HandshakeConfig { identity: local.identity.clone(), psk: local.psk, hello };
    let est = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, role, cfg)).await {
        Ok(Ok(est)) => est,
        Ok(Err(e)) => {
            mesh.unregister(id, &e);
            return Err(e);
        }
        Err(_) => {
            mesh.unregister(id, "handshake timed out");
            return Err("handshake timed out".into());
        }
    };
    let Established { mut channel, remote: hello, data_keys, remote_static, .. } = est;
    // The name is believed only if it is bound to the key the handshake authenticated.
    if let Err(why) = mesh.admit_identity(&hello, &remote_static, remote) {
        let mut out = Vec::new();
        if channel.send(&ControlMsg::Goodbye(why.clone()), &mut out).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
        }
        mesh.unregister(id, &why);
        return Err(why);
    }
    let listen = SocketAddr::new(remote.ip(), hello.tcp_port);
    let link = PeerLink {
        peer: hello.name,
        addr: SocketAddr::new(remote.ip(), hello.udp_port),
        send_index: hello.receiver_index,
        send_key: data_keys.send,
        recv_index,
        recv_key: data_keys.recv,
        superframes: hello.capabilities & CAP_SUPERFRAMES != 0,
    };
    if !link.superframes {
        log::info!("{} takes no superframes: frames go to it one by one (segmented here)", hello.name);
    }
    if let Err(why) = mesh.establish(id, hello.name, hello.nickname.clone(), listen, link) {
        let mut out = Vec::new();
        let _ = channel.send(&ControlMsg::Goodbye(why.clone()), &mut out);
        let _ = stream.write_all(&out).await;
        mesh.unregister(id, &why);
        return Err(why);
    }

    // The handshake's last read may have carried messages already.
    if let Err(why) = drain(&mesh, id, hello.name, remote, &mut channel, &mut stream).await {
        mesh.unregister(id, &why);
        return Ok(why);
    }
    let mut shutdown = mesh.shutdown.subscribe();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut last_heard = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    let why: String = 'conn: loop {
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = match r {
                    Ok(0) => break 'conn "peer closed the connection".into(),
                    Ok(n) => n,
                    Err(e) => break 'conn format!("read: {e}"),
                };
                last_heard = Instant::now();
                if let Err(e) = channel.feed(&buf[..n]) {
                    break 'conn format!("bad data from peer: {e}");
                }
                if let Err(why) = drain(&mesh, id, hello.name, remote, &mut channel, &mut stream).await {
                    break 'conn why;
                }
            }
            msg = queue.recv() => {
                let Some(msg) = msg else { break 'conn "closed".into() };
                let bye = match &msg {
                    ControlMsg::Goodbye(why) => Some(why.clone()),
                    _ => None,
                };
                out.clear();
                if let Err(e) = channel.send(&msg, &mut out) {
                    break 'conn format!("encode: {e}");
                }
                if let Err(e) = stream.write_all(&out).await {
                    break 'conn format!("write: {e}");
                }
                if let Some(why) = bye {
                    break 'conn why;
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > DEAD_AFTER {
                    break 'conn format!("no heartbeat for {}s", DEAD_AFTER.as_secs());
                }
                out.clear();
                let _ = channel.send(&ControlMsg::Heartbeat, &mut out);
                if let Err(e) = stream.write_all(&out).await {
                    break 'conn format!("write: {e}");
                }
            }
            _ = shutdown.changed() => {
                out.clear();
                let _ = channel.send(&ControlMsg::Goodbye("router stopping".into()), &mut out);
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
                break 'conn "router stopping".into();
            }
        }
    };
    mesh.unregister(id, &why);
    Ok(why)
}

/// Handles every complete message buffered in `channel`. Err: close, with the reason.
async fn drain(
    mesh: &Mesh,
    id: u64,
    peer: meshnet_proto::PeerName,
    remote: SocketAddr,
    channel: &mut meshnet_proto::wire::control::ControlChannel,
    stream: &mut TcpStream,
) -> Result<(), String> {
    loop {
        match channel.poll_message() {
            Ok(None) => return Ok(()),
            Ok(Some(ControlMsg::Heartbeat)) => {}
            Ok(Some(ControlMsg::Gossip(infos))) => {
                if let Err(e) = mesh.on_gossip(id, infos) {
                    log::warn!("from {peer}: {e}");
                }
            }
            Ok(Some(ControlMsg::Ipam(bytes))) => {
                if let Err(why) = mesh.on_ipam(peer, &bytes) {
                    log::warn!("{why}");
                    let mut out = Vec::new();
                    let _ = channel.send(&ControlMsg::Goodbye(why.clone()), &mut out);
                    let _ = stream.write_all(&out).await;
                    return Err(why);
                }
            }
            Ok(Some(ControlMsg::Goodbye(reason))) => {
                if reason.starts_with(crate::mesh::IDENTITY_REFUSED) {
                    mesh.refused_by_peer(peer, remote, &reason);
                }
                return Err(format!("peer said goodbye: {reason}"));
            }
            Err(e) => return Err(format!("bad message from peer: {e}")),
        }
    }
}

async fn handshake(stream: &mut TcpStream, role: Role, cfg: HandshakeConfig) -> Result<Established, String> {
    let mut hs = Handshake::new(role, cfg).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
        }
        if hs.is_complete() {
            return hs.finish().map_err(|e| describe(&e));
        }
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("peer closed the connection during the handshake".into());
        }
        if let Err(e) = hs.feed(&buf[..n]) {
            // Send what the handshake has to say (a refusal) before closing.
            let out = hs.take_output();
            if !out.is_empty() {
                let _ = stream.write_all(&out).await;
            }
            return Err(describe(&e));
        }
    }
}

fn describe(e: &HandshakeError) -> String {
    e.to_string()
}
