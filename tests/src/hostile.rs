//! A hostile mesh member: speaks meshnet's control protocol through `proto`
//! (real TCP, the real Noise handshake, the real password) and lies in any field
//! it likes. The scenarios in `tests/hostile.rs` use it from a namespace of the
//! lab ([`in_netns`]) against real routers.
//!
//! What it can do, building blocks for every forgery:
//! - [`Member::connect`]: dial a router with any [`Hello`] (any claimed name, any
//!   binding), completing the handshake with its own identity key and the mesh
//!   password; the router's verdict comes back as a [`Session`].
//! - [`Session::send`]: any [`ControlMsg`] over the authenticated channel (forged
//!   gossip, raw IPAM bytes with [`Session::send_ipam`], ...).
//! - [`Session::recv_for`]: everything the router says back, until it closes.
//! - [`Session::udp_datagrams`]: whatever reaches the UDP port the Hello
//!   advertised (data the router meant for the name it claimed), decrypted with
//!   the session's data key into [`Session::frames`] (so a test can tell what the
//!   router sent and to whom it was meant).
//! - [`Session::send_frame`]: an Ethernet frame sealed with the session's data
//!   key under any inner header (any claimed origin, broadcast or not, any TTL).
//! - IPAM forgeries are built with `meshnet_proto::ipam::forge` and sent with
//!   [`Session::send_ipam`]; [`ipam_of`] picks the router's IPAM messages out of
//!   what it said.
//! - [`Member::seal`] / [`forge_seal`]: topology entries signed by itself, by
//!   nobody, or carrying someone else's binding.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use meshnet_proto::datapath::{seal_heartbeat, Encoder, Receiver, TxBatch, TxSession};
use meshnet_proto::handshake::{derive_psk, Established, Handshake, HandshakeConfig, Hello, Role};
use meshnet_proto::identity::Identity;
use meshnet_proto::liveness::Liveness;
use meshnet_proto::topology::{ConnInfo, PeerInfo, Seal, SignedPeerInfo};
use meshnet_proto::trust::{Binding, Signature, Signer};
use meshnet_proto::wire::control::ControlMsg;
use meshnet_proto::wire::datagram::InnerHeader;
use meshnet_proto::PeerName;

/// Runs `f` on a thread that has entered the network namespace `ns` (a name
/// under `/var/run/netns`); sockets it opens live there. Needs root.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a namespace file we opened; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A member of the mesh: its own identity key and the mesh password.
pub struct Member {
    pub identity: Identity,
    pub signer: Signer,
    psk: Option<[u8; 32]>,
}

impl Member {
    /// A member with a fresh key; `password` as given to `meshnet launch`.
    pub fn new(password: Option<&str>) -> Member {
        let identity = Identity::generate();
        let signer = Signer::from_identity(&identity);
        Member { identity, signer, psk: password.map(|p| derive_psk(p.as_bytes())) }
    }

    /// Its honest name (derived from its key).
    pub fn name(&self) -> PeerName {
        self.identity.name()
    }

    /// A binding of `name` to this member's own keys, properly signed by it.
    pub fn binding(&self, name: PeerName) -> Binding {
        Binding::new(name, &self.identity, &self.signer)
    }

    /// A Hello claiming `name`, carrying `binding`, advertising `udp_port`.
    pub fn hello(&self, name: PeerName, binding: Binding, udp_port: u16) -> Hello {
        Hello {
            name,
            nickname: "hostile".into(),
            uid: 0x0bad,
            software: "meshnet-hostile".into(),
            tcp_port: 6783,
            udp_port,
            receiver_index: 0x0bad,
            capabilities: 0,
            binding,
        }
    }

    /// Its own honest topology entry (version `version`), listing an established
    /// connection to `peer` at `addr`, signed by itself.
    pub fn own_entry(&self, version: u64, peer: PeerName, addr: SocketAddr) -> SignedPeerInfo {
        let info = PeerInfo {
            name: self.name(),
            nickname: "hostile".into(),
            uid: 0x0bad,
            version,
            software: "meshnet-hostile".into(),
            mtu: 0,
            connections: vec![ConnInfo { peer, addr, outbound: true, established: true }],
        };
        self.seal(info, &self.binding(self.name()))
    }

    /// `info` sealed by this member, with `binding` (its own, or a stolen one).
    pub fn seal(&self, info: PeerInfo, binding: &Binding) -> SignedPeerInfo {
        SignedPeerInfo { seal: Seal::sign(&info, &self.signer, binding), info }
    }

    /// Dials `router` and completes the handshake presenting `hello`; the UDP
    /// socket for `hello.udp_port` is bound first (0: any port, written into the
    /// Hello) so whatever the router sends there can be counted.
    pub fn connect(&self, router: SocketAddr, mut hello: Hello) -> std::io::Result<Session> {
        let udp = UdpSocket::bind(("0.0.0.0", hello.udp_port))?;
        udp.set_nonblocking(true)?;
        hello.udp_port = udp.local_addr()?.port();
        let mut stream = TcpStream::connect_timeout(&router, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let my_index = hello.receiver_index;
        let cfg = HandshakeConfig { identity: self.identity.clone(), psk: self.psk, hello };
        let mut hs = Handshake::new(Role::Initiator, cfg).map_err(other)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let out = hs.take_output();
            stream.write_all(&out)?;
            if hs.is_complete() {
                break;
            }
            if Instant::now() > deadline {
                return Err(other("handshake timed out"));
            }
            match stream.read(&mut buf) {
                Ok(0) => return Err(other("router closed the connection during the handshake")),
                Ok(n) => {
                    if let Err(e) = hs.feed(&buf[..n]) {
                        return Err(other(e));
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        let est = hs.finish().map_err(other)?;
        let mut rx = Receiver::new();
        rx.add_session(my_index, est.remote.name, &est.data_keys.recv);
        let data = Data {
            to: SocketAddr::new(router.ip(), est.remote.udp_port),
            rx,
            tx: TxSession::new(est.remote.receiver_index, &est.data_keys.send),
            encoder: Encoder::new(1400),
            batch: TxBatch::new(),
            since: Instant::now(),
            liveness: Liveness::new(1400, 0),
            heartbeats: 0,
            answer: false,
        };
        Ok(Session { stream, est, udp, closed: false, data, pending: 0, frames: Vec::new() })
    }
}

/// A seal with `binding` whose signature is garbage (no key signed it).
pub fn forge_seal(info: PeerInfo, binding: &Binding) -> SignedPeerInfo {
    SignedPeerInfo { seal: Seal { binding: binding.clone(), sig: Signature([0x5a; 64]) }, info }
}

fn other(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// An established control connection to a router.
pub struct Session {
    stream: TcpStream,
    pub est: Established,
    udp: UdpSocket,
    closed: bool,
    data: Data,
    /// Datagrams read while waiting for control messages, not yet reported.
    pending: usize,
    /// Every unit the router sealed to this session so far (read by
    /// [`Session::udp_datagrams`]): the inner header and the Ethernet frame.
    pub frames: Vec<(InnerHeader, Vec<u8>)>,
}

/// The data-plane side of a session: the handshake's data keys, used as the
/// peer the router believes this is.
struct Data {
    to: SocketAddr,
    rx: Receiver,
    tx: TxSession,
    encoder: Encoder,
    batch: TxBatch,
    since: Instant,
    liveness: Liveness,
    /// Authenticated heartbeats received (proof the data key opens what the router sends).
    heartbeats: u64,
    /// Whether to send heartbeats (see [`Session::keep_link_up`]).
    answer: bool,
}

/// The router's IPAM messages among `msgs`.
pub fn ipam_of(msgs: &[ControlMsg]) -> Vec<&[u8]> {
    msgs.iter()
        .filter_map(|m| match m {
            ControlMsg::Ipam(b) => Some(b.as_slice()),
            _ => None,
        })
        .collect()
}

impl Session {
    /// The router's Hello (its name, binding, ...).
    pub fn router(&self) -> &Hello {
        &self.est.remote
    }

    /// Sends any control message over the authenticated channel.
    pub fn send(&mut self, msg: &ControlMsg) -> std::io::Result<()> {
        let mut out = Vec::new();
        self.est.channel.send(msg, &mut out).map_err(other)?;
        self.stream.write_all(&out)
    }

    /// Sends raw IPAM bytes (an `Ipam` message), for IPAM forgeries.
    pub fn send_ipam(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        self.send(&ControlMsg::Ipam(bytes))
    }

    /// Sends gossip.
    pub fn gossip(&mut self, entries: Vec<SignedPeerInfo>) -> std::io::Result<()> {
        self.send(&ControlMsg::Gossip(entries))
    }

    /// From now on, sends UDP heartbeats as an honest peer does, so that the
    /// router takes this session as a working data-plane link (routes over it,
    /// floods broadcasts to it). Off by default: nothing is sent over UDP.
    pub fn keep_link_up(&mut self) {
        self.data.answer = true;
    }

    /// Every message the router sends within `dur` (less if it closes), answering
    /// nothing but heartbeats (on the control channel, and on UDP after
    /// [`Session::keep_link_up`]).
    pub fn recv_for(&mut self, dur: Duration) -> Vec<ControlMsg> {
        let deadline = Instant::now() + dur;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while !self.closed && Instant::now() < deadline {
            self.pending += self.udp_datagrams_inner();
            while let Ok(Some(m)) = self.est.channel.poll_message() {
                if m == ControlMsg::Heartbeat {
                    let _ = self.send(&ControlMsg::Heartbeat);
                }
                got.push(m);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    if self.est.channel.feed(&buf[..n]).is_err() {
                        self.closed = true;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => self.closed = true,
            }
        }
        while let Ok(Some(m)) = self.est.channel.poll_message() {
            got.push(m);
        }
        got
    }

    /// Whether the router closed the connection (seen by `recv_for`).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Datagrams that reached the advertised UDP port since the last call; the
    /// units they carry (sealed for this session) are added to [`Session::frames`].
    pub fn udp_datagrams(&mut self) -> usize {
        let n = std::mem::take(&mut self.pending);
        n + self.udp_datagrams_inner()
    }

    /// Authenticated heartbeats received from the router so far.
    pub fn heartbeats(&self) -> u64 {
        self.data.heartbeats
    }

    /// Reads the UDP socket: decrypts units into `frames`, feeds heartbeats to
    /// liveness and sends the heartbeats it asks for.
    fn udp_datagrams_inner(&mut self) -> usize {
        let mut n = 0;
        let mut buf = vec![0u8; 65536];
        let d = &mut self.data;
        while let Ok((len, _)) = self.udp.recv_from(&mut buf) {
            n += 1;
            let now = d.since.elapsed().as_millis() as u64;
            let frames = &mut self.frames;
            let (liveness, heartbeats) = (&mut d.liveness, &mut d.heartbeats);
            let _ = d.rx.receive_any(
                now,
                &mut buf[..len],
                |_, hdr, unit| {
                    // A unit is a virtio-net header, then the frame.
                    frames.push((*hdr, unit.get(10..).unwrap_or_default().to_vec()));
                },
                |_, hb, len| {
                    *heartbeats += 1;
                    liveness.on_heartbeat(now, hb, len);
                },
            );
        }
        let now = d.since.elapsed().as_millis() as u64;
        let mut sizes = Vec::new();
        if d.answer && now >= d.liveness.next_due() {
            if let Some(hb) = d.liveness.poll(now, &mut sizes) {
                for size in sizes {
                    d.batch.clear();
                    // `liveness::BEAT` (0) is the smallest heartbeat.
                    let size = usize::from(size).max(meshnet_proto::datapath::MIN_HEARTBEAT);
                    if seal_heartbeat(&mut d.tx, hb, size, &mut d.batch).is_ok() {
                        for dgram in d.batch.datagrams() {
                            let _ = self.udp.send_to(dgram, d.to);
                        }
                    }
                }
            }
        }
        n
    }

    /// Seals the Ethernet `frame` under `hdr` with this session's data key and
    /// sends it to the router's data-plane port, as the peer it believes this is.
    pub fn send_frame(&mut self, hdr: InnerHeader, frame: &[u8]) -> std::io::Result<()> {
        let mut unit = vec![0u8; 10]; // a virtio-net header saying nothing
        unit.extend_from_slice(frame);
        let d = &mut self.data;
        d.batch.clear();
        d.encoder.begin(&mut d.tx, hdr, &mut d.batch);
        d.encoder.push(&mut d.tx, &unit, &mut d.batch).map_err(other)?;
        d.encoder.finish(&mut d.tx, &mut d.batch).map_err(other)?;
        for dgram in d.batch.datagrams() {
            self.udp.send_to(dgram, d.to)?;
        }
        Ok(())
    }
}
