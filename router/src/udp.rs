//! The one UDP sender of the data plane: whatever a plane returns (data,
//! relayed units, heartbeats) goes out through [`UdpSender::send`].
//!
//! - Each destination's share of a [`Datagrams`] batch is cut into runs of
//!   equal-sized datagrams ([`TxBatch::runs_in`]); each run is one UDP GSO
//!   message (one datagram per message where the plane said no GSO).
//! - Messages for every destination of the batch go in `sendmmsg` calls of up
//!   to [`MMSG`]: small frames of mixed sizes and relays to several peers cost
//!   one system call per batch, not one per datagram.
//! - One EAGAIN policy: a full socket buffer is waited for (10 ms at a time,
//!   50 times) rather than dropped; any other error counts the message as lost
//!   and goes on. A GSO message the kernel refuses (`EIO`: no checksum offload
//!   on the route's device) turns GSO off for good.
//!
//! Each forwarding thread owns one sender, which counts into that thread's
//! own [`Stats`]. Nothing is allocated per datagram.
//!
//! [`TxBatch::runs_in`]: meshnet_proto::datapath::TxBatch::runs_in

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use meshnet_proto::plane::{Datagrams, Stats};
use quinn_udp::UdpSocketState;

/// Messages per `sendmmsg`.
const MMSG: usize = 64;
/// Largest GSO send Linux takes.
const MAX_GSO_BYTES: usize = 65000;

/// One thread's UDP sender.
pub(crate) struct UdpSender {
    stats: Arc<Stats>,
    /// Whether the socket is IPv6 (v4 destinations are then mapped).
    v6_socket: bool,
    /// Datagrams the kernel takes in one GSO message.
    max_segments: usize,
    /// Set when the kernel refused a GSO message: one datagram per message since.
    no_gso: bool,
}

impl UdpSender {
    pub(crate) fn new(stats: Arc<Stats>, udp: &UdpSocketState, socket: &UdpSocket) -> UdpSender {
        let v6_socket = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        UdpSender { stats, v6_socket, max_segments: udp.max_gso_segments().clamp(1, MMSG), no_gso: false }
    }

    /// Sends every destination its share of `d`.
    pub(crate) fn send(&mut self, socket: &UdpSocket, d: &Datagrams) {
        // SAFETY (all zeroed): plain C structs for which all-zero is a valid value.
        let mut iovs: [libc::iovec; MMSG] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; MMSG] = unsafe { zeroed() };
        let mut addrs: [libc::sockaddr_storage; MMSG] = unsafe { zeroed() };
        let mut cmsgs = [[0u64; 4]; MMSG];
        let mut counts = [0u64; MMSG];
        let mut segs = [0u16; MMSG];
        let mut n = 0;
        for t in &d.sends {
            let Some((addr, addr_len)) = sockaddr(t.addr, self.v6_socket) else {
                self.stats.udp_send_errors.add(t.datagrams.len() as u64);
                continue;
            };
            let max_segments = if self.no_gso || !t.gso { 1 } else { self.max_segments };
            for (bytes, seg) in d.batch.runs_in(t.datagrams.clone(), max_segments, MAX_GSO_BYTES) {
                if n == MMSG {
                    self.flush(socket, &mut msgs, &mut iovs, &addrs, &mut cmsgs, &segs, &counts, n);
                    n = 0;
                }
                let datagrams = bytes.len().div_ceil(seg);
                addrs[n] = addr;
                iovs[n] = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
                msgs[n].msg_hdr.msg_namelen = addr_len;
                segs[n] = if datagrams > 1 { seg as u16 } else { 0 };
                counts[n] = datagrams as u64;
                n += 1;
            }
        }
        if n > 0 {
            self.flush(socket, &mut msgs, &mut iovs, &addrs, &mut cmsgs, &segs, &counts, n);
        }
    }

    /// Points the first `n` headers at their buffers, with a `UDP_SEGMENT`
    /// control message where `segs` gives a size, and sends them.
    #[allow(clippy::too_many_arguments)]
    fn flush(
        &mut self,
        socket: &UdpSocket,
        msgs: &mut [libc::mmsghdr; MMSG],
        iovs: &mut [libc::iovec; MMSG],
        addrs: &[libc::sockaddr_storage; MMSG],
        cmsgs: &mut [[u64; 4]; MMSG],
        segs: &[u16; MMSG],
        counts: &[u64; MMSG],
        n: usize,
    ) {
        for i in 0..n {
            let m = &mut msgs[i].msg_hdr;
            m.msg_name = &addrs[i] as *const libc::sockaddr_storage as *mut libc::c_void;
            m.msg_iov = &mut iovs[i];
            m.msg_iovlen = 1;
            if segs[i] > 0 {
                set_segment_size(m, &mut cmsgs[i], segs[i]);
            } else {
                m.msg_control = std::ptr::null_mut();
                m.msg_controllen = 0;
            }
        }
        self.send_messages(socket, &mut msgs[..n], &counts[..n]);
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
                    stats.udp_datagrams_out.add(c);
                    stats.udp_bytes_out.add(m.msg_len as u64);
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
                    let errors = stats.udp_send_errors.get();
                    stats.udp_send_errors.add(1);
                    if errors % 1000 == 0 {
                        log::warn!("sending {} datagrams: {e}", counts[done]);
                    }
                    done += 1;
                }
            }
        }
    }
}

/// Binds `n` UDP sockets to `addr`, one per queue. One socket (`n` = 1) is a
/// plain bind. Several join one `SO_REUSEPORT` group, bound in queue order
/// (the group's socket index is the queue), and a classic BPF program on the
/// group picks the socket of every datagram by its queue field (outer header
/// bytes 2..4, see `meshnet_proto::wire::datagram`): `queue mod n`. The
/// kernel runs it on the UDP payload: a datagram too short for the field
/// goes to queue 0, as do heartbeats and everything from single-queue peers.
pub fn bind_queues(addr: SocketAddr, n: usize) -> io::Result<Vec<UdpSocket>> {
    if n <= 1 {
        return Ok(vec![UdpSocket::bind(addr)?]);
    }
    let first = reuseport_socket(addr)?;
    // Port 0: the others join the port the first was given.
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..n {
        sockets.push(reuseport_socket(addr)?);
    }
    steer_by_queue(&sockets[0], n as u32)?;
    Ok(sockets)
}

/// A UDP socket with `SO_REUSEPORT`, bound to `addr`.
fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let family = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall; the descriptor is owned by the UdpSocket below
    // (or closed on error).
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option on our socket.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, &one as *const _ as *const libc::c_void, size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if addr.is_ipv6() {
        // As the single socket: `::` takes IPv4 too (dual-stack), an IPv6
        // address only IPv6, whatever net.ipv6.bindv6only says.
        let v6only = libc::c_int::from(!addr.ip().is_unspecified());
        // SAFETY: an int option on our socket.
        let rc = unsafe {
            libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &v6only as *const _ as *const libc::c_void, size_of::<libc::c_int>() as libc::socklen_t)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (ss, len) = sockaddr(addr, addr.is_ipv6()).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address family"))?;
    // SAFETY: ss holds a valid address of length len.
    if unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// asm-generic/socket.h (x86, arm, riscv; libc defines it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches the reuseport program `A = payload[2..4]; A %= n; return A`.
fn steer_by_queue(socket: &UdpSocket, n: u32) -> io::Result<()> {
    let prog = [
        // ldh [2]: the queue field (big-endian, as the kernel loads it).
        libc::sock_filter { code: (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: 2 },
        libc::sock_filter { code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16, jt: 0, jf: 0, k: n },
        libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 },
    ];
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const _ as *const libc::c_void,
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
pub fn sockaddr(dest: SocketAddr, v6_socket: bool) -> Option<(libc::sockaddr_storage, libc::socklen_t)> {
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
    use meshnet_proto::datapath::{Encoder, TxSession};
    use meshnet_proto::plane::Transmit;
    use meshnet_proto::wire::datagram::InnerHeader;
    use meshnet_proto::PeerName;
    use quinn_udp::UdpSockRef;

    const KEY: [u8; 32] = [7; 32];

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
        let mut sender = UdpSender::new(stats.clone(), &state, &tx_sock);
        let mut enc = Encoder::new(1472);
        let mut tx = TxSession::new(1, &KEY);
        let mut d = Datagrams::default();
        let batch = &mut d.batch;
        enc.begin(&mut tx, InnerHeader { ttl: 4, broadcast: false, src: PeerName(2), dst: PeerName(3) }, batch);
        // Mixed sizes: several runs, some of one datagram, one of many (a chunked unit).
        for n in [100usize, 1400, 1400, 1400, 60, 5000, 1300, 70] {
            enc.push(&mut tx, &vec![n as u8; n], batch).unwrap();
        }
        enc.finish(&mut tx, batch).unwrap();
        // The same datagrams to a second socket, one per message.
        let n = d.batch.datagram_count();
        let half = n / 2;
        let rx2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx2.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        // With GSO runs, and one datagram per message (a black-holed path): the
        // same datagrams arrive, in order.
        for gso in [true, false] {
            // Two destinations in one batch: each gets its share, in order.
            d.sends.clear();
            d.sends.push(Transmit { addr: rx_sock.local_addr().unwrap(), datagrams: 0..n, gso });
            d.sends.push(Transmit { addr: rx2.local_addr().unwrap(), datagrams: half..n, gso });
            sender.send(&tx_sock, &d);
            let mut buf = [0u8; 2000];
            for want in d.batch.datagrams() {
                let n = rx_sock.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], want, "gso {gso}");
            }
            for want in d.batch.datagrams().skip(half) {
                let n = rx2.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], want, "gso {gso}, second destination");
            }
        }
        let (count, bytes) = (d.batch.datagram_count() as u64, d.batch.len_bytes() as u64);
        let half_bytes: u64 = d.batch.datagrams().skip(half).map(|x| x.len() as u64).sum();
        assert_eq!(stats.udp_datagrams_out.get(), 2 * (count + (n - half) as u64));
        assert_eq!(stats.udp_bytes_out.get(), 2 * (bytes + half_bytes));
        assert_eq!(stats.udp_send_errors.get(), 0);
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
