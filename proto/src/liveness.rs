//! UDP liveness and path-MTU discovery for one connection, sans-I/O.
//!
//! Each side sends sealed heartbeats ([`crate::wire::datagram::Heartbeat`]) to
//! the other over UDP: every [`FAST_MS`] until UDP works both ways, then every
//! [`SLOW_MS`]. A heartbeat reports the largest *probe* (a heartbeat of at
//! least [`LADDER`]'s smallest size) its sender received from the other side in
//! the last one or two [`WINDOW_MS`] windows (`heard`). UDP *works both ways*
//! when a heartbeat arrived within [`DEAD_MS`] and it reported hearing a probe
//! of ours; only then does the connection carry data (the control plane lists
//! it as established, so routes use it).
//!
//! What a round sends, cheapest first (a mesh of n hosts has n − 1 of these per
//! host, so the steady state must cost little):
//! - every round: one [`BEAT`], the smallest heartbeat the wire allows: it keeps
//!   liveness (and NAT mappings) and carries the `heard` report;
//! - every [`CONFIRM_EVERY`] rounds: also the current path MTU and the smallest
//!   ladder size, which keep the peer's report of both within its window;
//! - while UDP does not work, every [`FULL_LADDER_EVERY`] rounds after, and in
//!   the next [`REPROBE_LADDERS`] rounds when the peer reports less than
//!   before: the whole ladder, from the largest datagram we may send down to
//!   [`LADDER`]'s smallest.
//!
//! The peer's `heard` is then the largest datagram that crossed the path, and
//! that is the most we send it. On an IPv6 path the ladder stops at
//! [`IPV6_FLOOR`] (1280-byte packets, the IPv6 minimum): see
//! [`Liveness::for_family`]. A path that shrinks is noticed when the window
//! that saw the bigger size has passed (at most 2 × [`WINDOW_MS`]); one that
//! grows, at the next whole ladder.

use crate::wire::datagram::Heartbeat;

/// Heartbeat interval until UDP works both ways (for the first [`FAST_FOR_MS`]).
pub const FAST_MS: u64 = 250;
/// Heartbeat interval once UDP works both ways, or after [`FAST_FOR_MS`] without it.
pub const SLOW_MS: u64 = 1000;
/// How long fast heartbeats go on without an answer before slowing down.
pub const FAST_FOR_MS: u64 = 10_000;
/// No heartbeat for this long: UDP is down.
pub const DEAD_MS: u64 = 5000;
/// The window over which received probe sizes are reported: longer than two
/// confirmations ([`CONFIRM_EVERY`] slow rounds each, with their timer slack),
/// so the current and the previous window together always hold two of them and
/// one confirmation lost under load (a full socket buffer during a transfer)
/// lowers nothing.
pub const WINDOW_MS: u64 = 2 * CONFIRM_EVERY as u64 * SLOW_MS + 2500;
/// After the peer reports less than before, this many whole ladders, one per
/// round: a ladder is a burst, and under load a burst can lose the size that
/// does fit while a smaller one arrives; the report is the largest heard over
/// the window, so one good ladder of these restores it.
pub const REPROBE_LADDERS: u8 = 3;
/// Every this many rounds the path MTU and the smallest ladder size are sent
/// again, once UDP works.
pub const CONFIRM_EVERY: u32 = 10;
/// Every this many rounds the whole ladder is probed again (the path may have grown).
pub const FULL_LADDER_EVERY: u32 = 60;
/// In [`Liveness::poll`]'s sizes: the smallest heartbeat the wire allows (the
/// sender pads nothing). It proves liveness only, never a path size.
pub const BEAT: u16 = 0;
/// Probed datagram sizes (UDP payload bytes) below the largest we may send:
/// IPv4 and IPv6 on a 1500-byte link, common tunnel and PPPoE sizes, down to
/// what every IPv4 path carries.
pub const LADDER: [u16; 13] = [1472, 1452, 1400, 1350, 1280, 1200, 1100, 1000, 900, 800, 700, 576, 512];
/// The smallest size probed on an IPv6 path: every IPv6 link carries 1280-byte
/// packets (RFC 8200), i.e. 1280 − 40 (IPv6) − 8 (UDP) bytes of UDP payload.
/// Below it an IPv6 path is broken, not small, and probing smaller only costs.
pub const IPV6_FLOOR: u16 = 1280 - 48;

/// One connection's heartbeat and path-MTU state.
#[derive(Debug, Clone)]
pub struct Liveness {
    max: u16,
    /// The smallest probe size: [`LADDER`]'s last on IPv4, [`IPV6_FLOOR`] on IPv6.
    min: u16,
    last_heard: Option<u64>,
    /// What the peer last reported hearing from us.
    peer_heard: u16,
    /// Largest heartbeat from the peer in the current and previous window.
    cur: u16,
    prev: u16,
    window_start: u64,
    next_send: u64,
    /// Since when UDP has not worked (None while it does).
    down_since: Option<u64>,
    /// The peer reported less than before: whole ladders still to send, one
    /// per round (see [`REPROBE_LADDERS`]).
    reprobe: u8,
    seq: u32,
}

impl Liveness {
    /// `max_datagram`: the largest datagram we may send (UDP payload bytes).
    /// The first heartbeats are due at once.
    pub fn new(max_datagram: usize, now: u64) -> Self {
        Liveness {
            max: max_datagram.clamp(LADDER[LADDER.len() - 1] as usize, u16::MAX as usize) as u16,
            min: LADDER[LADDER.len() - 1],
            last_heard: None,
            peer_heard: 0,
            cur: 0,
            prev: 0,
            window_start: now,
            next_send: now,
            down_since: Some(now),
            reprobe: 0,
            seq: 0,
        }
    }

    /// As [`new`](Self::new), for a path of the given family: on IPv6 the
    /// ladder stops at [`IPV6_FLOOR`] (1280 bytes of IPv6).
    pub fn for_family(max_datagram: usize, ipv6: bool, now: u64) -> Self {
        let mut l = Liveness::new(max_datagram, now);
        l.set_family(ipv6);
        l
    }

    /// The path's address family changed (the peer now sends from an address
    /// of the other family): the ladder's bounds follow it.
    pub fn set_family(&mut self, ipv6: bool) {
        self.min = if ipv6 { IPV6_FLOOR.min(self.max) } else { LADDER[LADDER.len() - 1] };
    }

    /// The smallest size this connection probes.
    pub fn floor(&self) -> u16 {
        self.min
    }

    fn roll(&mut self, now: u64) {
        let k = now.saturating_sub(self.window_start) / WINDOW_MS;
        match k {
            0 => return,
            1 => {
                self.prev = self.cur;
                self.cur = 0;
            }
            _ => {
                self.prev = 0;
                self.cur = 0;
            }
        }
        self.window_start += k * WINDOW_MS;
    }

    /// An authenticated heartbeat of `len` bytes arrived from the peer.
    pub fn on_heartbeat(&mut self, now: u64, hb: Heartbeat, len: usize) {
        self.roll(now);
        if len >= LADDER[LADDER.len() - 1] as usize {
            self.cur = self.cur.max(len.min(u16::MAX as usize) as u16);
        }
        self.last_heard = Some(now);
        let heard = hb.heard.min(self.max);
        if heard < self.peer_heard {
            self.reprobe = REPROBE_LADDERS;
        }
        self.peer_heard = heard;
    }

    /// The largest heartbeat received from the peer recently (what we report).
    pub fn heard(&mut self, now: u64) -> u16 {
        self.roll(now);
        self.cur.max(self.prev)
    }

    /// UDP works both ways: the peer's heartbeats arrive and say ours do.
    pub fn udp_ok(&self, now: u64) -> bool {
        self.peer_heard > 0 && self.last_heard.is_some_and(|t| now.saturating_sub(t) < DEAD_MS)
    }

    /// The largest datagram known to reach the peer, once UDP works.
    pub fn path_mtu(&self, now: u64) -> Option<usize> {
        self.udp_ok(now).then_some(self.peer_heard as usize)
    }

    /// When the last heartbeat from the peer arrived.
    pub fn last_heard(&self) -> Option<u64> {
        self.last_heard
    }

    /// When [`poll`](Self::poll) next has something to send.
    pub fn next_due(&self) -> u64 {
        self.next_send
    }

    /// If a round is due: the heartbeat to send, at each size put in `sizes`
    /// (largest first). Otherwise None.
    pub fn poll(&mut self, now: u64, sizes: &mut Vec<u16>) -> Option<Heartbeat> {
        if now < self.next_send {
            return None;
        }
        let ok = self.udp_ok(now);
        match (ok, self.down_since) {
            (true, _) => self.down_since = None,
            (false, None) => self.down_since = Some(now),
            (false, Some(_)) => {}
        }
        sizes.clear();
        if !ok || self.reprobe > 0 || self.seq.is_multiple_of(FULL_LADDER_EVERY) {
            self.reprobe = self.reprobe.saturating_sub(1);
            sizes.push(self.max);
            sizes.extend(LADDER.iter().copied().filter(|&s| s < self.max && s > self.min));
            if self.min < self.max {
                sizes.push(self.min);
            }
        } else if self.seq.is_multiple_of(CONFIRM_EVERY) {
            sizes.push(self.peer_heard);
            let smallest = self.min;
            if self.peer_heard > smallest {
                sizes.push(smallest);
            }
        } else {
            sizes.push(BEAT);
        }
        let fast = self.down_since.is_some_and(|t| now.saturating_sub(t) < FAST_FOR_MS);
        self.next_send = now + if fast { FAST_MS } else { SLOW_MS };
        self.seq = self.seq.wrapping_add(1);
        Some(Heartbeat { heard: self.heard(now), seq: self.seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends exchanging heartbeats over a path that carries datagrams of at
    /// most `path` bytes (each way) when `up`, for `ms` of virtual time.
    struct Link {
        a: Liveness,
        b: Liveness,
        now: u64,
        sizes: Vec<u16>,
    }

    impl Link {
        fn new(max: usize) -> Self {
            Link { a: Liveness::new(max, 0), b: Liveness::new(max, 0), now: 0, sizes: Vec::new() }
        }

        fn run(&mut self, ms: u64, path_ab: u16, path_ba: u16) {
            self.run_lossy(ms, |a_to_b, _, len| len <= if a_to_b { path_ab } else { path_ba });
        }

        /// As [`run`](Self::run), each datagram crossing when
        /// `crosses(a_to_b, now, len)`.
        fn run_lossy(&mut self, ms: u64, mut crosses: impl FnMut(bool, u64, u16) -> bool) {
            let end = self.now + ms;
            while self.now < end {
                for a_to_b in [true, false] {
                    let (from, to) = if a_to_b { (&mut self.a, &mut self.b) } else { (&mut self.b, &mut self.a) };
                    if let Some(hb) = from.poll(self.now, &mut self.sizes) {
                        for &s in &self.sizes {
                            let len = if s == BEAT { crate::datapath::MIN_HEARTBEAT as u16 } else { s };
                            if crosses(a_to_b, self.now, len) {
                                to.on_heartbeat(self.now, hb, len as usize);
                            }
                        }
                    }
                }
                self.now += 10;
            }
        }
    }

    #[test]
    fn works_both_ways_within_two_fast_rounds_and_finds_the_path_mtu() {
        let mut l = Link::new(1472);
        l.run(2 * FAST_MS + 20, 1472, 1472);
        assert!(l.a.udp_ok(l.now) && l.b.udp_ok(l.now));
        assert_eq!(l.a.path_mtu(l.now), Some(1472));
        assert_eq!(l.b.path_mtu(l.now), Some(1472));
    }

    #[test]
    fn a_small_path_gives_the_largest_ladder_step_that_fits() {
        let mut l = Link::new(1472);
        l.run(1000, 1000, 1300);
        assert_eq!(l.a.path_mtu(l.now), Some(1000), "a → b carries up to 1000");
        assert_eq!(l.b.path_mtu(l.now), Some(1280), "b → a carries up to 1300");
    }

    #[test]
    fn one_way_udp_never_works() {
        let mut l = Link::new(1472);
        l.run(20_000, 1472, 0);
        assert!(!l.a.udp_ok(l.now), "a never hears b");
        assert!(!l.b.udp_ok(l.now), "b hears a, but a never says it hears b");
        assert_eq!(l.a.path_mtu(l.now), None);
    }

    #[test]
    fn heartbeats_slow_down_once_up_and_after_a_while_without_answer() {
        let mut up = Liveness::new(1472, 0);
        let mut sizes = Vec::new();
        assert!(up.poll(0, &mut sizes).is_some());
        assert_eq!(sizes.len(), 1 + LADDER.len() - 1, "the full ladder while down: {sizes:?}");
        assert_eq!(up.next_due(), FAST_MS);
        up.on_heartbeat(100, Heartbeat { heard: 1472, seq: 1 }, 1472);
        assert!(up.poll(FAST_MS, &mut sizes).is_some());
        assert_eq!(sizes, vec![BEAT], "once up: the smallest heartbeat");
        assert_eq!(up.next_due(), FAST_MS + SLOW_MS);
        let mut rounds = vec![sizes.clone()];
        let mut t = FAST_MS + SLOW_MS;
        for _ in 0..FULL_LADDER_EVERY {
            up.on_heartbeat(t, Heartbeat { heard: 1472, seq: 1 }, 1472);
            assert!(up.poll(t, &mut sizes).is_some());
            rounds.push(sizes.clone());
            t += SLOW_MS;
        }
        let confirms = rounds.iter().filter(|r| **r == [1472, 512]).count();
        let ladders = rounds.iter().filter(|r| r.len() == LADDER.len()).count();
        let beats = rounds.iter().filter(|r| **r == [BEAT]).count();
        assert_eq!(ladders, 1, "one whole ladder in {FULL_LADDER_EVERY} rounds: {rounds:?}");
        assert_eq!(confirms, (FULL_LADDER_EVERY / CONFIRM_EVERY) as usize - 1, "{rounds:?}");
        assert_eq!(beats + confirms + ladders, rounds.len(), "{rounds:?}");

        let mut silent = Liveness::new(1472, 0);
        let mut t = 0;
        let mut intervals = Vec::new();
        while t < FAST_FOR_MS + 3 * SLOW_MS {
            if silent.poll(t, &mut sizes).is_some() {
                intervals.push(silent.next_due() - t);
            }
            t += 10;
        }
        assert_eq!(intervals.first(), Some(&FAST_MS));
        assert_eq!(intervals.last(), Some(&SLOW_MS), "no answer for {FAST_FOR_MS} ms: slow");
    }

    #[test]
    fn missed_heartbeats_take_udp_down_and_it_comes_back() {
        let mut l = Link::new(1472);
        l.run(1000, 1472, 1472);
        assert!(l.a.udp_ok(l.now));
        l.run(DEAD_MS + 100, 0, 0);
        assert!(!l.a.udp_ok(l.now) && !l.b.udp_ok(l.now));
        l.run(2 * SLOW_MS + 20, 1472, 1472);
        assert!(l.a.udp_ok(l.now) && l.b.udp_ok(l.now));
    }

    #[test]
    fn a_shrinking_path_is_followed_and_a_growing_one_found_again() {
        let mut l = Link::new(1472);
        l.run(1000, 1472, 1472);
        assert_eq!(l.a.path_mtu(l.now), Some(1472));
        // The path shrinks to 1000: the smallest-size heartbeats keep UDP up,
        // the window that saw 1472 passes, and the next full ladder finds 1000.
        l.run(2 * WINDOW_MS + FULL_LADDER_EVERY as u64 * SLOW_MS, 1000, 1000);
        assert!(l.a.udp_ok(l.now));
        assert_eq!(l.a.path_mtu(l.now), Some(1000));
        l.run(FULL_LADDER_EVERY as u64 * SLOW_MS + 100, 1472, 1472);
        assert_eq!(l.a.path_mtu(l.now), Some(1472));
    }

    #[test]
    fn beats_alone_prove_no_path_size() {
        let mut a = Liveness::new(1472, 0);
        a.on_heartbeat(0, Heartbeat { heard: 0, seq: 1 }, crate::datapath::MIN_HEARTBEAT);
        assert_eq!(a.heard(0), 0, "a beat is not a probe");
        // Steady state over a long run: the report never falls between confirmations.
        let mut l = Link::new(1472);
        l.run(2 * FAST_MS, 1472, 1472);
        for _ in 0..(3 * FULL_LADDER_EVERY) {
            l.run(SLOW_MS, 1472, 1472);
            assert_eq!(l.a.path_mtu(l.now), Some(1472), "at {} ms", l.now);
            assert_eq!(l.b.path_mtu(l.now), Some(1472), "at {} ms", l.now);
        }
    }

    #[test]
    fn one_lost_confirmation_lowers_nothing() {
        let mut l = Link::new(1472);
        l.run(2 * FAST_MS, 1000, 1000);
        assert_eq!(l.a.path_mtu(l.now), Some(1000));
        // Every confirmation a → b in the next stretch of one confirmation
        // interval is lost, the smallest size with it (a burst of loss), at
        // every phase of the windows.
        for _ in 0..8 {
            l.run(3 * SLOW_MS, 1000, 1000);
            let lost_until = l.now + CONFIRM_EVERY as u64 * SLOW_MS;
            let mut lowest = u16::MAX;
            let mut down = false;
            let until = l.now + 2 * WINDOW_MS;
            while l.now < until {
                l.run_lossy(SLOW_MS, |a_to_b, now, len| {
                    len <= 1000 && !(a_to_b && now < lost_until && len >= LADDER[LADDER.len() - 1])
                });
                lowest = lowest.min(l.a.path_mtu(l.now).unwrap_or(0) as u16);
                down |= !l.a.udp_ok(l.now);
            }
            assert_eq!(lowest, 1000, "one lost confirmation lowered the path MTU (at {} ms)", l.now);
            assert!(!down, "one lost confirmation took UDP down");
        }
    }

    #[test]
    fn a_ladder_that_loses_the_fitting_size_is_repeated() {
        let mut l = Link::new(1472);
        l.run(2 * FAST_MS, 1472, 1472);
        // The path shrinks to 900 and the first ladder after that loses its
        // 900 probe (a burst) while 800 arrives: the next ladders find 900,
        // long before the next periodic ladder.
        let mut lost_at = None;
        while lost_at.is_none() {
            l.run_lossy(SLOW_MS, |a_to_b, now, len| {
                if a_to_b && len == 900 && lost_at.is_none() {
                    lost_at = Some(now);
                    return false;
                }
                len <= 900
            });
            assert!(l.now < 3 * WINDOW_MS, "no ladder after the path shrank");
        }
        l.run(REPROBE_LADDERS as u64 * SLOW_MS + 100, 900, 900);
        assert_eq!(l.a.path_mtu(l.now), Some(900), "{} ms after the lossy ladder", l.now - lost_at.unwrap_or(0));
    }

    #[test]
    fn an_ipv6_ladder_stops_at_1280_bytes_of_ip() {
        let mut l = Liveness::for_family(1452, true, 0);
        let mut sizes = Vec::new();
        assert!(l.poll(0, &mut sizes).is_some());
        assert_eq!(sizes.first(), Some(&1452));
        assert_eq!(sizes.last(), Some(&IPV6_FLOOR), "{sizes:?}");
        assert!(sizes.iter().all(|&s| s >= IPV6_FLOOR), "nothing below 1280 bytes of IPv6: {sizes:?}");
        assert!(sizes.windows(2).all(|w| w[0] > w[1]), "largest first, once each: {sizes:?}");
        // Once up, the confirmation carries the floor, not 512.
        let mut a = Link { a: Liveness::for_family(1452, true, 0), b: Liveness::for_family(1452, true, 0), now: 0, sizes: Vec::new() };
        a.run(2 * FAST_MS + 20, 1300, 1300);
        assert_eq!(a.a.path_mtu(a.now), Some(1280), "the largest step of the ladder that fits 1300");
        let mut confirms = Vec::new();
        let mut t = a.now;
        for _ in 0..2 * CONFIRM_EVERY {
            a.a.on_heartbeat(t, Heartbeat { heard: 1280, seq: 1 }, 1280);
            if a.a.poll(t, &mut sizes).is_some() && sizes.len() == 2 {
                confirms.push(sizes.clone());
            }
            t += SLOW_MS;
        }
        assert!(!confirms.is_empty() && confirms.iter().all(|c| *c == [1280, IPV6_FLOOR]), "{confirms:?}");
        // A path that carries less than 1280 bytes of IPv6 never works.
        let mut broken = Link { a: Liveness::for_family(1452, true, 0), b: Liveness::for_family(1452, true, 0), now: 0, sizes: Vec::new() };
        broken.run(5000, 1200, 1200);
        assert!(!broken.a.udp_ok(broken.now), "beats cross, no probe does");
        // The family may change under a connection (a dual-stack peer).
        let mut v = Liveness::for_family(1472, true, 0);
        v.set_family(false);
        assert_eq!(v.floor(), 512);
        v.set_family(true);
        assert_eq!(v.floor(), IPV6_FLOOR);
    }

    #[test]
    fn a_peer_cannot_raise_the_path_mtu_above_our_maximum() {
        let mut a = Liveness::new(1200, 0);
        a.on_heartbeat(0, Heartbeat { heard: 9000, seq: 1 }, 600);
        assert_eq!(a.path_mtu(0), Some(1200));
    }
}
