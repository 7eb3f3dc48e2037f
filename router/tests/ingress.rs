//! The receive thread checks the origin a frame claims against the peer it
//! came over (issue 11, data plane), for real: a bridge and a TAP in a network
//! namespace of the test's own, the data plane's UDP socket on its loopback,
//! and a "peer" socket that seals datagrams with the peer's real session key
//! through `meshnet_proto::datapath`. Needs root (says so and passes without).
//!
//! For each forged origin the matching `refused_*` counter moves and nothing
//! reaches the TAP; a refused frame's source MAC is not learned (a frame for
//! that MAC sent into the bridge afterwards is not sent to the peer), while an
//! accepted frame's is (the same check then sees a data datagram).

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use meshnet_proto::datapath::{Encoder, TxBatch, TxSession};
use meshnet_proto::ingress::{Upstream, MAX_TTL};
use meshnet_proto::wire::datagram::InnerHeader;
use meshnet_proto::PeerName;
use meshnet_router::dataplane::{DataPlane, PeerLink, Routes, StatsSet};
use meshnet_router::netlink;
use meshnet_router::tap::Tap;

const ME: PeerName = PeerName(0x02aa_0000_0001);
/// The direct peer.
const P: PeerName = PeerName(0x02aa_0000_0002);
/// A peer two hops away, behind R (not behind P).
const Q: PeerName = PeerName(0x02aa_0000_0003);
const R: PeerName = PeerName(0x02aa_0000_0004);
/// A peer the topology does not know.
const STRANGER: PeerName = PeerName(0x02aa_0000_0009);
const RECV_INDEX: u32 = 9;
const RECV_KEY: [u8; 32] = [0x21; 32];
const SEND_KEY: [u8; 32] = [0x43; 32];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// Runs `f` on a thread inside a new network namespace (gone with the thread).
fn in_own_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which ends with the test.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        f();
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p));
}

/// A unit: zeroed virtio header and an Ethernet frame from `src` to `dst`
/// of the local experimental EtherType (not IP, which a bridge with
/// br_netfilter would check and drop).
fn unit(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut u = vec![0u8; 10];
    u.extend_from_slice(&dst);
    u.extend_from_slice(&src);
    u.extend_from_slice(&[0x88, 0xb5]);
    u.extend(std::iter::repeat_n(0x5a, 46));
    u
}

struct Peer {
    sock: UdpSocket,
    to: std::net::SocketAddr,
    session: TxSession,
    encoder: Encoder,
    batch: TxBatch,
}

impl Peer {
    /// Seals one unit as P under `hdr` and sends it to the data plane.
    fn send(&mut self, hdr: InnerHeader, u: &[u8]) {
        self.batch.clear();
        self.encoder.begin(&mut self.session, hdr, &mut self.batch);
        self.encoder.push(&mut self.session, u, &mut self.batch).unwrap();
        self.encoder.finish(&mut self.session, &mut self.batch).unwrap();
        for d in self.batch.datagrams() {
            self.sock.send_to(d, self.to).unwrap();
        }
    }

    /// Data datagrams (outer kind 1) the data plane sent us within `wait`.
    fn data_received(&self, wait: Duration) -> usize {
        let end = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while let Some(left) = end.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(len) if len > 0 && buf[0] == 1 => n += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        n
    }
}

/// (tap_units_out, refused by reason, ttl_clamped), summed over the threads.
fn snapshot(s: &StatsSet) -> (u64, [u64; 4], u64) {
    (s.total(|s| &s.tap_units_out), std::array::from_fn(|i| s.total(|s| &s.refused[i])), s.total(|s| &s.ttl_clamped))
}

/// Waits until the counters move from `before` (or 2 s pass), then returns them.
fn after(s: &StatsSet, before: (u64, [u64; 4], u64)) -> (u64, [u64; 4], u64) {
    let end = Instant::now() + Duration::from_secs(2);
    while snapshot(s) == before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Anything else that would arrive with it.
    std::thread::sleep(Duration::from_millis(50));
    snapshot(s)
}

/// Sends a frame into the bridge from a veth port (AF_PACKET on its peer end).
fn inject(ifindex: i32, frame: &[u8]) {
    // SAFETY: plain socket calls on a socket we own and close; `sll` is a
    // fully initialised sockaddr_ll and `frame` outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket");
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        let n = libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(n, frame.len() as isize, "inject a frame");
    }
}

#[test]
fn forged_origins_are_refused_counted_and_not_learned() {
    if !is_root() {
        eprintln!("ingress: skipped: needs root (network namespace, bridge, TAP)");
        return;
    }
    in_own_netns(forged_origins_here);
}

fn forged_origins_here() {
    ip(&["link", "set", "lo", "up"]);
    let bridge = netlink::ensure_bridge("mbr0", 1500).unwrap();
    let tap = Tap::create("mtap0", bridge, 1500).unwrap();
    // A port to send frames into the bridge from: vin0 on the bridge, vout0 ours.
    ip(&["link", "add", "vin0", "type", "veth", "peer", "name", "vout0"]);
    ip(&["link", "set", "vin0", "master", "mbr0", "up"]);
    ip(&["link", "set", "vout0", "up"]);
    let vout = netlink::link_index("vout0").unwrap().expect("vout0") as i32;

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dp_addr = sock.local_addr().unwrap();
    let peer_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dp = DataPlane::start(tap, sock, ME, 1472).unwrap();
    dp.add_peer(PeerLink {
        peer: P,
        addr: peer_sock.local_addr().unwrap(),
        send_index: 5,
        send_key: SEND_KEY,
        recv_index: RECV_INDEX,
        recv_key: RECV_KEY,
        superframes: true,
        multiqueue: true,
    });
    // Every peer's frames go out through P (so a MAC learned behind any of
    // them would show as a datagram to P), but only P is one hop closer to
    // P, R to R, and `q_via` to Q: as with equal paths, where my next hop
    // towards Q need not be the neighbour Q's frames reach me from.
    let routes = |q_via: PeerName| Routes {
        next_hop: HashMap::from([(P, P), (Q, P), (R, P), (STRANGER, P)]),
        children: HashMap::new(),
        mtu: HashMap::new(),
        upstream: HashMap::from([
            (P, Upstream { hops: 1, via: vec![P] }),
            (R, Upstream { hops: 1, via: vec![R] }),
            (Q, Upstream { hops: 2, via: vec![q_via] }),
        ]),
    };
    dp.set_routes(routes(R));
    std::thread::sleep(Duration::from_millis(200));
    let stats = dp.stats.clone();
    let mut peer = Peer {
        sock: peer_sock,
        to: dp_addr,
        session: TxSession::new(RECV_INDEX, &RECV_KEY),
        encoder: Encoder::new(1472),
        batch: TxBatch::new(),
    };
    let mac = |n: u8| [0x02, 0xbb, 0, 0, 0, n];
    let local = mac(0xee);
    let uni = |src, ttl| InnerHeader { ttl, broadcast: false, src, dst: ME };
    let bc = |src, ttl| InnerHeader { ttl, broadcast: true, src, dst: PeerName::BROADCAST };

    // Forged: each refused for its reason, nothing written into the TAP.
    let cases = [
        (uni(Q, MAX_TTL - 1), mac(1), 2, "Q's frame from P, who is not on Q's path"),
        (uni(ME, MAX_TTL), mac(2), 0, "a frame claiming to be from me"),
        (uni(STRANGER, MAX_TTL - 1), mac(3), 1, "a relayed frame from an unknown origin"),
        (bc(Q, MAX_TTL - 1), mac(4), 3, "Q's broadcast from P, not my parent in Q's tree"),
        (bc(R, MAX_TTL), mac(5), 3, "R's broadcast from P"),
    ];
    for (hdr, src_mac, reason, what) in cases {
        let before = snapshot(&stats);
        peer.send(hdr, &unit(local, src_mac));
        let now = after(&stats, before);
        let mut want = before;
        want.1[reason] += 1;
        assert_eq!(now, want, "{what}: (tap_units_out, refused, ttl_clamped)");
    }
    // No refused frame's source MAC was learned: frames for them from the
    // bridge are not sent to P (unknown MACs are flooded, and the flood tree
    // is empty), although every claimed origin is routed through P.
    for n in 1..=5 {
        inject(vout, &unit(mac(n), local)[10..]);
    }
    assert_eq!(peer.data_received(Duration::from_millis(500)), 0, "a frame for a MAC only a refused frame claimed went to P");

    // Genuine: P's own unicast and broadcast are delivered; a TTL above what
    // P can use is cut and counted.
    let before = snapshot(&stats);
    peer.send(uni(P, MAX_TTL), &unit(local, mac(10)));
    assert_eq!(after(&stats, before), (before.0 + 1, before.1, before.2), "P's own frame");
    let before = snapshot(&stats);
    peer.send(bc(P, 200), &unit([0xff; 6], mac(11)));
    assert_eq!(after(&stats, before), (before.0 + 1, before.1, before.2 + 1), "P's broadcast with TTL 200");
    // P's MAC was learned: a frame for it from the bridge goes to P.
    inject(vout, &unit(mac(10), local)[10..]);
    let got = peer.data_received(Duration::from_millis(1000));
    assert_eq!(got, 1, "a frame for P's learned MAC: {:?}", stats.to_json());

    // Once the topology puts P on Q's path, Q's frames from P are taken.
    dp.set_routes(routes(P));
    std::thread::sleep(Duration::from_millis(200));
    let before = snapshot(&stats);
    peer.send(uni(Q, MAX_TTL), &unit(local, mac(12)));
    assert_eq!(after(&stats, before), (before.0 + 1, before.1, before.2 + 1), "Q's frame via P, TTL cut to {}", MAX_TTL - 1);
    let before = snapshot(&stats);
    peer.send(bc(Q, MAX_TTL - 1), &unit([0xff; 6], mac(13)));
    assert_eq!(after(&stats, before), (before.0 + 1, before.1, before.2), "Q's broadcast from its tree parent P");
    let json: HashMap<&str, u64> = stats.to_json().into_iter().collect();
    assert_eq!(
        [json["refused_origin_is_me"], json["refused_unknown_origin"], json["refused_not_on_path"], json["refused_broadcast_not_parent"]],
        [1, 1, 1, 2],
        "{json:?}"
    );
    dp.stop();
}
