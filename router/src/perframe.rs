//! The per-frame path: for a next hop that did not advertise
//! [`CAP_SUPERFRAMES`](meshnet_proto::handshake::CAP_SUPERFRAMES) in its
//! handshake (a router on the capture datapath, whose device takes plain frames
//! only), and for writing into such a device.
//!
//! - [`PerFrame::push`] gives the [`Encoder`] a unit as it is when it is already
//!   plain, else the plain frames [`gso::to_plain_frames`] cuts it into, each
//!   behind a zeroed virtio header; the Encoder packs them several to a datagram.
//! - [`PerFrame::send`] sends a batch of datagrams with one `sendmmsg` per 64
//!   runs, each run of equal-sized datagrams a UDP GSO message: small frames of
//!   mixed sizes cost one system call per batch, not one per datagram.
//! - [`PerFrame::deliver`] writes a unit into a device without a virtio header:
//!   a plain one at once, anything else (which a peer should not send us)
//!   segmented first.
//!
//! Each forwarding thread owns one `PerFrame`: a scratch buffer for one frame,
//! allocated once. Nothing is allocated or locked per frame.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meshnet_proto::datapath::{DatapathError, Encoder, TxBatch, TxSession};
use meshnet_proto::gso::{self, VNET_HDR_LEN};
use meshnet_proto::wire::datagram::MAX_UNIT;
use quinn_udp::UdpSocketState;

use crate::dataplane::Stats;
use crate::device::Device;

/// Messages per `sendmmsg`.
const MMSG: usize = 64;
/// Largest GSO send Linux takes.
const MAX_GSO_BYTES: usize = 65000;

/// Counters of the per-frame path (in `meshnet status --json`, data plane).
#[derive(Debug, Default)]
pub struct Counters {
    /// Units (superframes, partial checksums) turned into plain frames in software.
    pub sw_segmented_units: AtomicU64,
    /// Plain frames those units became.
    pub sw_frames_out: AtomicU64,
    /// Units dropped because they could not be segmented (malformed, unsupported).
    pub sw_malformed_units: AtomicU64,
}

impl Counters {
    pub fn to_json(&self) -> [(&'static str, u64); 3] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("sw_segmented_units", g(&self.sw_segmented_units)),
            ("sw_frames_out", g(&self.sw_frames_out)),
            ("sw_malformed_units", g(&self.sw_malformed_units)),
        ]
    }
}

/// One thread's per-frame state.
pub(crate) struct PerFrame {
    scratch: Vec<u8>,
    stats: Arc<Stats>,
    /// Whether the socket is IPv6 (v4 destinations are then mapped), learned on first send.
    v6_socket: Option<bool>,
    /// Set when the kernel refused a GSO message: send datagrams one by one since.
    no_gso: bool,
}

impl PerFrame {
    pub(crate) fn new(stats: Arc<Stats>) -> PerFrame {
        PerFrame { scratch: vec![0u8; MAX_UNIT + 64], stats, v6_socket: None, no_gso: false }
    }

    /// Adds `unit` for a next hop without superframes: whole when plain, else as
    /// plain frames behind zeroed virtio headers. A unit that cannot be
    /// segmented is counted and dropped.
    pub(crate) fn push(&mut self, encoder: &mut Encoder, session: &mut TxSession, unit: &[u8], batch: &mut TxBatch) -> Result<(), DatapathError> {
        if gso::is_plain(unit) {
            return encoder.push(session, unit, batch);
        }
        let mut pushed = Ok(());
        let made = gso::to_plain_frames(unit, &mut self.scratch, VNET_HDR_LEN, |u| {
            if let Err(e) = encoder.push(session, u, batch) {
                pushed = Err(e);
            }
        });
        self.count(made);
        pushed
    }

    /// Writes `unit` into `dev`, which has no virtio header: its frame when plain,
    /// else the frames it segments into.
    pub(crate) fn deliver(&mut self, dev: &Device, unit: &[u8]) {
        let stats = &*self.stats;
        let write = |frame: &[u8]| {
            match dev.write_unit(frame) {
                Ok(_) => stats.tap_units_out.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.tap_write_errors.fetch_add(1, Ordering::Relaxed),
            };
        };
        if gso::is_plain(unit) {
            write(unit.get(VNET_HDR_LEN..).unwrap_or_default());
            return;
        }
        let made = gso::to_plain_frames(unit, &mut self.scratch, 0, write);
        if made.is_err() {
            self.stats.tap_write_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.count(made);
    }

    fn count(&self, made: Result<usize, gso::GsoError>) {
        let c = &self.stats.per_frame;
        match made {
            Ok(n) => {
                c.sw_segmented_units.fetch_add(1, Ordering::Relaxed);
                c.sw_frames_out.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if c.sw_malformed_units.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                    log::warn!("dropping a unit that cannot be made into plain frames: {e}");
                }
            }
        }
    }

    /// Sends `batch` to `dest`: runs of equal-sized datagrams as UDP GSO
    /// messages, up to [`MMSG`] messages per `sendmmsg`.
    ///
    /// `gso: false` sends every datagram as a message of its own (still many per
    /// `sendmmsg`): for a path where probing found that large datagrams vanish,
    /// so that no filter or middlebox on the way ever sees a GSO send whole.
    pub(crate) fn send(&mut self, udp: &UdpSocketState, socket: &UdpSocket, batch: &TxBatch, dest: SocketAddr, gso: bool) {
        let v6 = *self.v6_socket.get_or_insert_with(|| socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false));
        let Some((addr, addr_len)) = sockaddr(dest, v6) else {
            self.stats.udp_send_errors.fetch_add(batch.datagram_count() as u64, Ordering::Relaxed);
            return;
        };
        let max_segments = if self.no_gso || !gso { 1 } else { udp.max_gso_segments().clamp(1, MMSG) };
        let mut runs = batch.runs_within(max_segments, MAX_GSO_BYTES);
        // SAFETY (all zeroed): plain C structs for which all-zero is a valid value.
        let mut iovs: [libc::iovec; MMSG] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; MMSG] = unsafe { zeroed() };
        let mut cmsgs = [[0u64; 4]; MMSG];
        let mut counts = [0u64; MMSG];
        loop {
            let mut n = 0;
            for (bytes, seg) in runs.by_ref() {
                let datagrams = bytes.len().div_ceil(seg);
                iovs[n] = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
                let m = &mut msgs[n].msg_hdr;
                m.msg_name = &addr as *const libc::sockaddr_storage as *mut libc::c_void;
                m.msg_namelen = addr_len;
                m.msg_iov = &mut iovs[n];
                m.msg_iovlen = 1;
                if datagrams > 1 {
                    set_segment_size(m, &mut cmsgs[n], seg as u16);
                } else {
                    m.msg_control = std::ptr::null_mut();
                    m.msg_controllen = 0;
                }
                counts[n] = datagrams as u64;
                n += 1;
                if n == MMSG {
                    break;
                }
            }
            if n == 0 {
                return;
            }
            self.send_messages(socket, &mut msgs[..n], &counts[..n]);
        }
    }

    /// `sendmmsg` until every message went out or failed; a full socket buffer is waited for.
    fn send_messages(&mut self, socket: &UdpSocket, msgs: &mut [libc::mmsghdr], counts: &[u64]) {
        let stats = &*self.stats;
        let fd = socket.as_raw_fd();
        let mut done = 0;
        let mut waits = 0;
        while done < msgs.len() {
            let rest = &mut msgs[done..];
            // SAFETY: every header points at live buffers (iovecs, address,
            // control) owned by our caller for the duration of the call.
            let rc = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
            if rc > 0 {
                for (m, &c) in msgs[done..done + rc as usize].iter().zip(&counts[done..]) {
                    stats.udp_datagrams_out.fetch_add(c, Ordering::Relaxed);
                    stats.udp_bytes_out.fetch_add(m.msg_len as u64, Ordering::Relaxed);
                }
                done += rc as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) if waits < 50 => {
                    // Socket buffer full: wait for room rather than drop.
                    waits += 1;
                    let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 10) };
                }
                errno => {
                    // The first message failed: count it and go on with the next.
                    if errno == Some(libc::EIO) && !msgs[done].msg_hdr.msg_control.is_null() {
                        // GSO refused (no checksum offload on the route's device): stop using it.
                        self.no_gso = true;
                    }
                    let errors = stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                    if errors % 1000 == 0 {
                        log::warn!("sending {} datagrams: {e}", counts[done]);
                    }
                    done += 1;
                }
            }
        }
    }
}

/// Puts a `UDP_SEGMENT` control message with `seg` into `buf` and points `m` at it.
fn set_segment_size(m: &mut libc::msghdr, buf: &mut [u64; 4], seg: u16) {
    // SAFETY: CMSG_SPACE(2) (24 bytes) fits the 32-byte, 8-aligned buffer;
    // CMSG_FIRSTHDR of a msghdr whose control buffer is that big is non-null.
    unsafe {
        m.msg_control = buf.as_mut_ptr() as *mut libc::c_void;
        m.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(m);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
    }
}

/// `dest` as a C socket address for a socket of the given family (an IPv4
/// address is mapped for an IPv6 socket); None for IPv6 on an IPv4 socket.
fn sockaddr(dest: SocketAddr, v6_socket: bool) -> Option<(libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let (ip6, scope) = match (dest, v6_socket) {
        (SocketAddr::V4(a), false) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            return Some((ss, size_of::<libc::sockaddr_in>() as libc::socklen_t));
        }
        (SocketAddr::V4(a), true) => (a.ip().to_ipv6_mapped(), 0),
        (SocketAddr::V6(a), true) => (*a.ip(), a.scope_id()),
        (SocketAddr::V6(_), false) => return None,
    };
    let sin6 = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: dest.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: ip6.octets() },
        sin6_scope_id: scope,
    };
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
    unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
    Some((ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshnet_proto::datapath::Receiver;
    use meshnet_proto::wire::datagram::InnerHeader;
    use meshnet_proto::PeerName;
    use quinn_udp::UdpSockRef;

    const KEY: [u8; 32] = [7; 32];

    /// A TCPv4 superframe unit of `payload` bytes cut at `mss`.
    fn superframe(payload: usize, mss: u16) -> Vec<u8> {
        let mut u = vec![1, gso::GSO_TCPV4, 0, 0];
        u.extend_from_slice(&mss.to_le_bytes());
        u.extend_from_slice(&34u16.to_le_bytes());
        u.extend_from_slice(&16u16.to_le_bytes());
        u.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0]);
        u.extend_from_slice(&[0x45, 0]);
        u.extend_from_slice(&((40 + payload) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        u.extend_from_slice(&[0, 80, 0, 81, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 1, 0, 0, 0, 0, 0]);
        u.extend((0..payload).map(|i| i as u8));
        u
    }

    #[test]
    fn superframes_go_out_as_plain_frames_and_plain_units_whole() {
        let stats = Arc::new(Stats::default());
        let mut pf = PerFrame::new(stats.clone());
        let mut enc = Encoder::new(1472);
        let mut tx = TxSession::new(1, &KEY);
        let mut batch = TxBatch::new();
        let hdr = InnerHeader { ttl: 4, broadcast: false, src: PeerName(2), dst: PeerName(3) };
        enc.begin(&mut tx, hdr, &mut batch);
        pf.push(&mut enc, &mut tx, &superframe(10_000, 1000), &mut batch).unwrap();
        let mut plain = superframe(100, 1000);
        plain[..2].fill(0);
        pf.push(&mut enc, &mut tx, &plain, &mut batch).unwrap();
        let mut bad = superframe(100, 1000);
        bad[1] = 0x81;
        pf.push(&mut enc, &mut tx, &bad, &mut batch).unwrap();
        enc.finish(&mut tx, &mut batch).unwrap();

        let mut rx = Receiver::new();
        rx.add_session(1, PeerName(2), &KEY);
        let mut units = Vec::new();
        for d in batch.datagrams() {
            rx.receive(0, &mut d.to_vec(), |_, _, u| units.push(u.to_vec())).unwrap();
        }
        assert_eq!(units.len(), 11);
        for u in &units[..10] {
            assert_eq!(u[..VNET_HDR_LEN], [0; VNET_HDR_LEN], "zeroed virtio header");
            assert_eq!(u.len(), VNET_HDR_LEN + 54 + 1000);
            assert!(gso::is_plain(u));
        }
        assert_eq!(units[10], plain);
        let c = stats.per_frame.to_json();
        assert_eq!(c, [("sw_segmented_units", 1), ("sw_frames_out", 10), ("sw_malformed_units", 1)]);
    }

    /// Runs `f` on a thread inside a new network namespace of its own with
    /// loopback up (the test's datagrams stay there); false when not allowed.
    fn in_own_netns(f: impl FnOnce() + Send + 'static) -> bool {
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread, which ends with the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return false;
            }
            // A child forked from this thread inherits its namespace.
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
            if !up.is_ok_and(|s| s.success()) {
                return false;
            }
            f();
            true
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    #[test]
    fn sendmmsg_sends_every_run() {
        if !in_own_netns(sendmmsg_sends_every_run_here) {
            eprintln!("skipping: no network namespace of our own (needs root and `ip`)");
        }
    }

    fn sendmmsg_sends_every_run_here() {
        let rx_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx_sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let tx_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = UdpSocketState::new(UdpSockRef::from(&tx_sock)).unwrap();
        let stats = Arc::new(Stats::default());
        let mut pf = PerFrame::new(stats.clone());
        let mut enc = Encoder::new(1472);
        let mut tx = TxSession::new(1, &KEY);
        let mut batch = TxBatch::new();
        enc.begin(&mut tx, InnerHeader { ttl: 4, broadcast: false, src: PeerName(2), dst: PeerName(3) }, &mut batch);
        // Mixed sizes: several runs, some of one datagram, one of many (a chunked unit).
        for n in [100usize, 1400, 1400, 1400, 60, 5000, 1300, 70] {
            enc.push(&mut tx, &vec![n as u8; n], &mut batch).unwrap();
        }
        enc.finish(&mut tx, &mut batch).unwrap();
        // With GSO runs, and one datagram per message (a black-holed path): the
        // same datagrams arrive, in order.
        for gso in [true, false] {
            pf.send(&state, &tx_sock, &batch, rx_sock.local_addr().unwrap(), gso);
            let mut buf = [0u8; 2000];
            for want in batch.datagrams() {
                let n = rx_sock.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], want, "gso {gso}");
            }
        }
        assert_eq!(stats.udp_datagrams_out.load(Ordering::Relaxed), 2 * batch.datagram_count() as u64);
        assert_eq!(stats.udp_bytes_out.load(Ordering::Relaxed), 2 * batch.len_bytes() as u64);
        assert_eq!(stats.udp_send_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn socket_addresses() {
        let v4: SocketAddr = "10.1.2.3:6783".parse().unwrap();
        let (ss, len) = sockaddr(v4, false).unwrap();
        assert_eq!(len as usize, size_of::<libc::sockaddr_in>());
        assert_eq!(ss.ss_family as i32, libc::AF_INET);
        let (ss, len) = sockaddr(v4, true).unwrap();
        assert_eq!(len as usize, size_of::<libc::sockaddr_in6>());
        assert_eq!(ss.ss_family as i32, libc::AF_INET6);
        assert!(sockaddr("[fd00::1]:1".parse().unwrap(), false).is_none());
    }
}
