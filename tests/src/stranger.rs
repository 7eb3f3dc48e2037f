//! Clients that treat a router badly, for the namespace tests: a stranger's
//! connection flood, a password guesser doing real handshakes, and members that
//! complete a real handshake (through `meshnet_proto::handshake`) and then stop
//! reading, or gossip as fast as they can.
//!
//! Each runs on its own thread inside a lab namespace ([`in_netns`]), so every
//! socket lives there; each stops when its `stop` flag is set (and by a
//! deadline of its own), and returns what it saw.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshnet_proto::handshake::{
    derive_psk, derive_psk_with_iterations, Established, Handshake, HandshakeConfig, Hello, Role, CAP_SUPERFRAMES,
};
use meshnet_proto::identity::Identity;
use meshnet_proto::topology::{PeerInfo, Seal, SignedPeerInfo};
use meshnet_proto::trust::{Binding, Signer};
use meshnet_proto::wire::control::ControlMsg;
use meshnet_proto::PeerName;

/// Runs `f` on a new thread that first enters network namespace `ns`
/// (`/var/run/netns/<ns>`); sockets it makes live there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a namespace fd we hold; it changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// What [`flood`] did.
#[derive(Clone, Debug, Default)]
pub struct FloodStats {
    /// TCP connections that completed.
    pub connected: u64,
    /// Connects that failed or timed out.
    pub failed: u64,
    /// Connections the router closed (seen as EOF or a reset).
    pub closed_by_router: u64,
    /// Most connections open at once (from our side).
    pub max_open: usize,
    /// Of those, how many the router had not closed at the end.
    pub alive_at_end: usize,
    /// How long the 200-a-second phase ran.
    pub steady: Duration,
}

/// From the calling thread's namespace: opens `hold` bare TCP connections to
/// `target` as fast as it can (within 5 s), then `per_sec` new ones a second,
/// keeping up to `hold + per_sec` open (the oldest closed first) and replacing
/// those the router closes, until `stop` or `deadline`.
pub fn flood(target: SocketAddr, hold: usize, per_sec: u32, stop: &AtomicBool, deadline: Instant) -> FloodStats {
    let mut st = FloodStats::default();
    let mut open: std::collections::VecDeque<TcpStream> = std::collections::VecDeque::new();
    let connect = |st: &mut FloodStats, open: &mut std::collections::VecDeque<TcpStream>| {
        match TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
            Ok(s) => {
                st.connected += 1;
                if s.set_nonblocking(true).is_ok() {
                    open.push_back(s);
                }
            }
            Err(_) => st.failed += 1,
        }
    };
    let fill_until = Instant::now() + Duration::from_secs(5);
    while open.len() < hold && Instant::now() < fill_until && !stop.load(Ordering::Relaxed) {
        connect(&mut st, &mut open);
        st.max_open = st.max_open.max(open.len());
    }
    let period = Duration::from_secs(1) / per_sec.max(1);
    let steady = Instant::now();
    let mut next = Instant::now();
    let mut swept = Instant::now();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        connect(&mut st, &mut open);
        while open.len() > hold + per_sec as usize {
            open.pop_front();
        }
        st.max_open = st.max_open.max(open.len());
        if swept.elapsed() > Duration::from_millis(200) {
            swept = Instant::now();
            let before = open.len();
            open.retain(alive);
            st.closed_by_router += (before - open.len()) as u64;
        }
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
    st.alive_at_end = open.iter().filter(|s| alive(s)).count();
    st.steady = steady.elapsed();
    st
}

/// A non-blocking stream the peer has not closed.
fn alive(s: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.peek(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

/// What [`guess_passwords`] saw.
#[derive(Clone, Debug, Default)]
pub struct GuessStats {
    pub attempts: u64,
    /// The router checked the guess: refused "passwords differ".
    pub checked: u64,
    /// Refused before any check: backing off after earlier failures.
    pub backoff: u64,
    /// Closed without a word (rate limit) or could not connect.
    pub dropped: u64,
    /// Anything else (a handshake that completed would be here: it must not).
    pub other: Vec<String>,
}

/// From the calling thread's namespace: real handshakes with wrong passwords
/// against `target`, one every `every`, until `stop` or `deadline`.
pub fn guess_passwords(target: SocketAddr, every: Duration, stop: &AtomicBool, deadline: Instant) -> GuessStats {
    let mut st = GuessStats::default();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        st.attempts += 1;
        let guess = format!("guess-{}", st.attempts);
        let psk = derive_psk_with_iterations(guess.as_bytes(), 1);
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Err(_) => st.dropped += 1,
            Ok(mut s) => match handshake(&mut s, Role::Initiator, config(Some(psk), "guesser")) {
                Ok(_) => st.other.push("a wrong password completed the handshake".into()),
                Err(e) if e.contains("too many failed password attempts") && e.contains("retry in") => st.backoff += 1,
                Err(e) if e.contains("passwords differ") => st.checked += 1,
                Err(e)
                    if e.contains("closed")
                        || e.contains("reset")
                        || e.starts_with("read:")
                        || e.starts_with("write:") =>
                {
                    st.dropped += 1
                }
                Err(e) => {
                    if st.other.len() < 10 {
                        st.other.push(e);
                    }
                }
            },
        }
        std::thread::sleep(every);
    }
    st
}

fn config(psk: Option<[u8; 32]>, nickname: &str) -> HandshakeConfig {
    let identity = Identity::generate();
    let hello = Hello {
        name: identity.name(),
        nickname: nickname.into(),
        uid: u64::from_le_bytes(identity.public[..8].try_into().unwrap_or_default()),
        software: "meshnet-tests".into(),
        tcp_port: 6783,
        udp_port: 6783,
        receiver_index: 7,
        capabilities: CAP_SUPERFRAMES,
        binding: Binding::new(identity.name(), &identity, &Signer::from_identity(&identity)),
    };
    HandshakeConfig { identity, psk, hello }
}

/// Drives a handshake over a blocking socket (3 s read timeout). Err: the
/// handshake's error, or what happened to the socket.
pub fn handshake(s: &mut TcpStream, role: Role, cfg: HandshakeConfig) -> Result<Established, String> {
    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let mut hs = Handshake::new(role, cfg).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            s.write_all(&out).map_err(|e| format!("write: {e}"))?;
        }
        if hs.is_complete() {
            return hs.finish().map_err(|e| e.to_string());
        }
        let n = match s.read(&mut buf) {
            Ok(0) => return Err("peer closed the connection".into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err("connection reset".into()),
            Err(e) => return Err(format!("read: {e}")),
        };
        if let Err(e) = hs.feed(&buf[..n]) {
            let out = hs.take_output();
            if !out.is_empty() {
                let _ = s.write_all(&out);
            }
            return Err(e.to_string());
        }
    }
}

/// A member that completed a real handshake with a router.
pub struct Member {
    pub stream: TcpStream,
    pub est: Established,
    pub name: PeerName,
    pub uid: u64,
    /// Signs the member's own topology entry, as a router does.
    pub signer: Signer,
    pub binding: Binding,
}

/// From the calling thread's namespace: dials `target` and completes a real
/// handshake with `password` (the real 600 000-round PSK).
pub fn join(target: SocketAddr, password: &str, nickname: &str) -> Result<Member, String> {
    let cfg = config(Some(derive_psk(password.as_bytes())), nickname);
    let (name, uid) = (cfg.hello.name, cfg.hello.uid);
    let (signer, binding) = (Signer::from_identity(&cfg.identity), cfg.hello.binding.clone());
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    let est = handshake(&mut stream, Role::Initiator, cfg)?;
    Ok(Member { stream, est, name, uid, signer, binding })
}

impl Member {
    /// Stops reading (and sending) anything until `stop` or `deadline`, then
    /// returns whether the router had closed the connection by then.
    pub fn stall(self, stop: &AtomicBool, deadline: Instant) -> bool {
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Now read what piled up, to see whether it ends in a close.
        let mut s = self.stream;
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Gossips its own entry (a 1000-byte nickname, a new version each time) as
    /// fast as the router takes it, reading and dropping whatever comes back,
    /// until `stop` or `deadline`. Returns how many updates it sent.
    pub fn gossip_hard(mut self, stop: &AtomicBool, deadline: Instant) -> Result<u64, String> {
        let mut reader = self.stream.try_clone().map_err(|e| e.to_string())?;
        let reading = Arc::new(AtomicBool::new(true));
        let r = reading.clone();
        let drain = std::thread::spawn(move || {
            let _ = reader.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = vec![0u8; 1 << 16];
            while r.load(Ordering::Relaxed) {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
        });
        let mut sent = 0u64;
        let mut out = Vec::new();
        let result = loop {
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break Ok(sent);
            }
            out.clear();
            let mut encode_err = None;
            for _ in 0..20 {
                sent += 1;
                let me = PeerInfo {
                    name: self.name,
                    nickname: "g".repeat(1000),
                    uid: self.uid,
                    version: sent,
                    software: "meshnet-tests".into(),
                    mtu: 1376,
                    connections: Vec::new(),
                };
                let me = SignedPeerInfo { seal: Seal::sign(&me, &self.signer, &self.binding), info: me };
                if let Err(e) = self.est.channel.send(&ControlMsg::Gossip(vec![me]), &mut out) {
                    encode_err = Some(format!("encode: {e}"));
                    break;
                }
            }
            if let Some(e) = encode_err {
                break Err(e);
            }
            if let Err(e) = self.stream.write_all(&out) {
                break Err(format!("write after {sent} updates: {e}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        reading.store(false, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = drain.join();
        result
    }
}
