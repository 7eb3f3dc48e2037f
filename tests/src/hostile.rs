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
//!   advertised (data the router meant for the name it claimed).
//! - [`Member::seal`] / [`forge_seal`]: topology entries signed by itself, by
//!   nobody, or carrying someone else's binding.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use meshnet_proto::handshake::{derive_psk, Established, Handshake, HandshakeConfig, Hello, Role};
use meshnet_proto::identity::Identity;
use meshnet_proto::topology::{PeerInfo, Seal, SignedPeerInfo};
use meshnet_proto::trust::{Binding, Signature, Signer};
use meshnet_proto::wire::control::ControlMsg;
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
        Ok(Session { stream, est, udp, closed: false })
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

    /// Every message the router sends within `dur` (less if it closes), answering
    /// nothing but heartbeats.
    pub fn recv_for(&mut self, dur: Duration) -> Vec<ControlMsg> {
        let deadline = Instant::now() + dur;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while !self.closed && Instant::now() < deadline {
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

    /// Datagrams that reached the advertised UDP port so far.
    pub fn udp_datagrams(&self) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 65536];
        while self.udp.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}
