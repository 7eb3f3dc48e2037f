//! The connection maker's decisions: which addresses to dial and when, and which
//! of two connections between a pair of peers survives.
//!
//! [`Dialer`] holds one [`Entry`] per address it may dial: the connect targets the
//! operator gave and, with discovery, the addresses gossiped for peers we are not
//! connected to. Each entry's [`DialState`] says what is happening to it. The
//! caller (control's connection maker, or a simulator) drives it:
//! - [`Dialer::poll`] returns the dials to start now and when to poll again;
//! - [`Dialer::registered`], [`Dialer::established`], [`Dialer::ended`] and
//!   [`Dialer::failed`] report what became of a dial;
//! - [`Dialer::set_targets`], [`Dialer::set_candidates`] and
//!   [`Dialer::set_connected`] say what to dial and which addresses already have
//!   a connection (made by either side).
//!
//! Failed dials back off from 2 s ×1.5 per failure up to 60 s, each delay drawn
//! within ±25 % from randomness the caller passes in, so routers launched together
//! do not retry together. A dial in progress is never started again. Reports are
//! matched by dial and connection id: one about a dial that is no longer the
//! entry's current one (the target was removed, or the connection was already
//! judged a duplicate) changes nothing. An address with an established
//! connection is never dialled and shows no old error, whichever side dialled.
//! Discovery dials are capped by a [`DialBudget`]; connect targets are not.
//!
//! Never does: I/O, name resolution, reading the clock or drawing randomness
//! (time is milliseconds on the caller's monotonic clock, randomness a `u64` seed
//! per call).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use crate::discovery::{DialBudget, PER_SECOND};
use crate::PeerName;

/// First retry delay after a failure; grows ×1.5 per further failure.
pub const BACKOFF_START_MS: u64 = 2_000;
/// Longest retry delay (before jitter).
pub const BACKOFF_CAP_MS: u64 = 60_000;
/// A dial that reached a peer we already have a connection with (or ourselves)
/// is looked at again after about this long.
pub const SATISFIED_MS: u64 = 60_000;
/// A connection that lasted this long clears the failure count when it ends.
pub const STABLE_MS: u64 = 30_000;
/// When a connection the peer made ends, our own dial of its address starts
/// within this long (spread, so both sides rarely dial at the same instant).
pub const UNCOVERED_SPREAD_MS: u64 = 2_000;

/// One dial (connect and handshake), as numbered by [`Dialer::poll`].
pub type DialId = u64;
/// The caller's number for a connection.
pub type ConnId = u64;

/// Which side opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Which connection between two peers survives the tie-break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    New,
    Old,
}

/// The direction, seen from `me`, of the connection a pair keeps: the one
/// dialled by the peer with the smaller name. Both peers compute the same one.
pub fn preferred(me: PeerName, peer: PeerName) -> Direction {
    if me < peer {
        Direction::Outbound
    } else {
        Direction::Inbound
    }
}

/// A connection in direction `new` to `peer` completed its handshake while an
/// established one in direction `old` exists. Same direction: the old one is
/// stale (the peer restarted and dialled again, or we did). Otherwise the one
/// [`preferred`] by both sides is kept, whichever finished first, so the two
/// peers never drop both.
pub fn tie_break(me: PeerName, peer: PeerName, new: Direction, old: Direction) -> Keep {
    if new == old || new == preferred(me, peer) {
        Keep::New
    } else {
        Keep::Old
    }
}

/// [`tie_break`], knowing the peer's incarnation (its Hello's `uid`, new at every
/// launch) on both connections. The same direction from the same incarnation is
/// not a stale connection: the dialling side still holds the old one and
/// reached the peer again by another address (two connect targets for one
/// peer: its IPv4 and IPv6 addresses, a host name and its IP). The new one is
/// then the duplicate, so the live connection is not replaced at every redial.
/// Both ends see the same uids, so they keep the same connection.
pub fn tie_break_incarnation(me: PeerName, peer: PeerName, new: Direction, old: Direction, same_uid: bool) -> Keep {
    if new == old && same_uid {
        Keep::Old
    } else {
        tie_break(me, peer, new, old)
    }
}

/// Incarnations (Hello `uid`s, new at every launch) of each peer that a newer
/// one replaced. A restarted router never comes back under an old uid, so one
/// that does is a second live router with the same name and key (a copy of the
/// peer's state directory on another host): taking it would drop the other's
/// connection, which would come back and drop this one, for ever.
#[derive(Clone, Debug, Default)]
pub struct Replaced {
    by_peer: HashMap<PeerName, VecDeque<u64>>,
}

impl Replaced {
    /// Incarnations kept per peer.
    pub const PER_PEER: usize = 4;
    /// Peers kept; past that the table starts again (a bound, not a policy:
    /// a clone is found again at its next replacement).
    pub const PEERS: usize = 4096;

    /// `old` of `peer` was replaced by a newer incarnation.
    pub fn note(&mut self, peer: PeerName, old: u64) {
        if self.by_peer.len() >= Self::PEERS && !self.by_peer.contains_key(&peer) {
            self.by_peer.clear();
        }
        let uids = self.by_peer.entry(peer).or_default();
        if !uids.contains(&old) {
            if uids.len() == Self::PER_PEER {
                uids.pop_front();
            }
            uids.push_back(old);
        }
    }

    /// Whether `uid` of `peer` was replaced before: a second router with its identity.
    pub fn was_replaced(&self, peer: PeerName, uid: u64) -> bool {
        self.by_peer.get(&peer).is_some_and(|u| u.contains(&uid))
    }
}

/// Why a dial did not give a connection, or why the connection it gave ended.
/// The text is what `status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The target's name did not resolve.
    Resolve(String),
    /// TCP connect failed or timed out.
    Connect(String),
    /// No `--conn-limit` slot was free.
    ConnLimit(String),
    /// Connected, but the handshake (or the identity check after it) failed.
    Handshake(String),
    /// An established connection ended.
    Closed(String),
    /// The address is this router's own: the handshake met our own name, key
    /// and incarnation (Weave's "cannot connect to ourself").
    Ourselves,
}

impl Failure {
    pub fn text(&self) -> &str {
        match self {
            Failure::Resolve(s) | Failure::Connect(s) | Failure::ConnLimit(s) | Failure::Handshake(s) | Failure::Closed(s) => s,
            Failure::Ourselves => "cannot connect to ourselves",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// How a connection made by a dial ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The pair already had a connection (the tie-break dropped this one, or the
    /// peer did): nothing failed.
    Duplicate,
    /// The dial reached this router itself (one of its own addresses): never
    /// dialled again while the entry lasts ([`DialState::Ourselves`]).
    Ourselves,
    /// It failed or closed for this reason.
    Failed(Failure),
}

/// What is happening to one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialState {
    /// Due: dialled at the next [`Dialer::poll`] that has a slot (and, for a
    /// discovered address, budget).
    Idle,
    /// Backing off after a failure: not dialled before `until`.
    Backoff { until: u64 },
    /// A dial is under way (connect, then handshake on connection `conn`).
    Dialling { since: u64, dial: DialId, conn: Option<ConnId> },
    /// Our dial made established connection `conn`.
    Connected { since: u64, dial: DialId, conn: ConnId },
    /// The last dial reached a peer we already had a connection with (or a
    /// connection the peer made just ended): look again at `until`.
    Satisfied { until: u64 },
    /// The last dial reached this router itself: not dialled again until the
    /// entry is made anew (`forget` and `connect`, or a restart), as Weave's
    /// "retry: never". A target so marked is listed as failed.
    Ourselves,
    /// An established connection to this address exists that this entry did not
    /// make (the peer dialled us, or the tie-break kept its dial).
    Covered,
}

impl DialState {
    /// A dial is under way or holds a connection.
    pub fn in_progress(&self) -> bool {
        matches!(self, DialState::Dialling { .. } | DialState::Connected { .. })
    }

    fn due(&self, now: u64) -> bool {
        match *self {
            DialState::Idle => true,
            DialState::Backoff { until } | DialState::Satisfied { until } => until <= now,
            _ => false,
        }
    }
}

/// One address the dialer knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// A connect target (dialled whatever the budget says).
    pub target: bool,
    /// Gossiped for a peer we are not connected to.
    pub discovered: bool,
    pub state: DialState,
    /// Failures since the last success (a connection that lasted [`STABLE_MS`],
    /// or a duplicate).
    pub failures: u32,
    pub last_error: Option<Failure>,
}

impl Entry {
    fn new() -> Self {
        Entry { target: false, discovered: false, state: DialState::Idle, failures: 0, last_error: None }
    }

    fn wanted(&self) -> bool {
        self.target || self.discovered
    }
}

/// A dial to start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dial {
    pub key: String,
    pub id: DialId,
}

/// What [`Dialer::poll`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    pub dials: Vec<Dial>,
    /// Discovery dials held back by the budget in this poll.
    pub deferred: u64,
    /// When something becomes due next (None: only a report or a change can).
    pub wake_at: Option<u64>,
}

/// An entry `status` lists: a dial that has failed and holds no connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown<'a> {
    pub key: &'a str,
    /// A new dial is under way (connecting, no connection yet).
    pub dialling: bool,
    pub failures: u32,
    pub error: &'a Failure,
    /// Milliseconds until the next dial (0 if due or under way); `None`: never
    /// (the address is our own).
    pub retry_in_ms: Option<u64>,
}

/// The table of addresses to dial and their [`DialState`]s.
#[derive(Clone, Debug)]
pub struct Dialer {
    entries: BTreeMap<String, Entry>,
    /// Discovered addresses, sorted: dialled from a random place in the list.
    candidates: Vec<String>,
    /// Addresses with an established connection, either direction.
    connected: HashSet<String>,
    budget: DialBudget,
    next_dial: DialId,
    /// Discovery dials held back by the budget, in all.
    pub deferred: u64,
}

impl Default for Dialer {
    fn default() -> Self {
        Dialer::new(DialBudget::default())
    }
}

/// Delay before the dial after failure number `failures` (≥ 1):
/// 2 s × 1.5^(failures-1), capped at 60 s, times 0.75–1.25 from `random`.
pub fn backoff_ms(failures: u32, random: u32) -> u64 {
    let mut base = BACKOFF_START_MS;
    for _ in 1..failures.min(32) {
        base = (base * 3 / 2).min(BACKOFF_CAP_MS);
    }
    jitter(base, random)
}

/// `base` × [0.75, 1.25), by `random`.
fn jitter(base: u64, random: u32) -> u64 {
    base * (750 + ((random as u64 * 500) >> 32)) / 1000
}

/// Draws several values from one seed (splitmix64).
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 32) as u32
    }
}

impl Dialer {
    pub fn new(budget: DialBudget) -> Self {
        Dialer {
            entries: BTreeMap::new(),
            candidates: Vec::new(),
            connected: HashSet::new(),
            budget,
            next_dial: 1,
            deferred: 0,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every entry, by address.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, e)| (k.as_str(), e))
    }

    /// The connect targets are now `targets` (normalised `host:port`). A target
    /// removed while its dial is under way is forgotten when the dial reports;
    /// one added back meanwhile is not dialled twice.
    pub fn set_targets(&mut self, targets: impl IntoIterator<Item = String>) {
        for e in self.entries.values_mut() {
            e.target = false;
        }
        for t in targets {
            let covered = self.connected.contains(&t);
            let e = self.entries.entry(t).or_insert_with(Entry::new);
            e.target = true;
            if covered && e.state.due(u64::MAX) {
                e.state = DialState::Covered;
            }
        }
        self.prune();
    }

    /// Dial `key` at the next poll if it is waiting (the operator asked again;
    /// also an address that was our own, which may have moved).
    pub fn retry_now(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            if matches!(e.state, DialState::Backoff { .. } | DialState::Satisfied { .. } | DialState::Ourselves) {
                e.state = DialState::Idle;
            }
        }
    }

    /// The addresses gossiped for peers we are not connected to.
    pub fn set_candidates(&mut self, mut list: Vec<String>) {
        list.sort();
        list.dedup();
        for e in self.entries.values_mut() {
            e.discovered = false;
        }
        for a in &list {
            let covered = self.connected.contains(a);
            let e = self.entries.entry(a.clone()).or_insert_with(Entry::new);
            e.discovered = true;
            if covered && e.state.due(u64::MAX) {
                e.state = DialState::Covered;
            }
        }
        self.candidates = list;
        self.prune();
    }

    /// The addresses (`ip:port`) that have an established connection now, made
    /// by either side. They are not dialled and show no old error; when one goes
    /// away, its entry is dialled again within [`UNCOVERED_SPREAD_MS`].
    pub fn set_connected(&mut self, now: u64, random: u64, addrs: impl IntoIterator<Item = String>) {
        self.connected = addrs.into_iter().collect();
        let mut draw = Draw(random);
        for (key, e) in self.entries.iter_mut() {
            let covered = self.connected.contains(key);
            match e.state {
                DialState::Covered if !covered => {
                    e.state = DialState::Satisfied { until: now + draw.next() as u64 % UNCOVERED_SPREAD_MS };
                }
                DialState::Idle | DialState::Backoff { .. } | DialState::Satisfied { .. } if covered => {
                    e.state = DialState::Covered;
                    e.failures = 0;
                    e.last_error = None;
                }
                _ => {}
            }
        }
    }

    /// The dials to start now: due connect targets, then due discovered
    /// addresses within the budget, from a random place in the list; at most
    /// `free_slots` in all. Each dial is under way until it reports.
    pub fn poll(&mut self, now: u64, random: u64, free_slots: usize) -> Poll {
        let mut out = Poll::default();
        let mut free = free_slots;
        let mut draw = Draw(random);
        for (key, e) in self.entries.iter_mut() {
            if free == 0 {
                break;
            }
            if e.target && e.state.due(now) {
                out.dials.push(start(&mut self.next_dial, key, e, now));
                free -= 1;
            }
        }
        if !self.candidates.is_empty() && free > 0 {
            let mut in_flight = self
                .entries
                .values()
                .filter(|e| !e.target && matches!(e.state, DialState::Dialling { .. }))
                .count();
            let n = self.candidates.len();
            let first = draw.next() as usize % n;
            for i in 0..n {
                if free == 0 {
                    break;
                }
                let key = &self.candidates[(first + i) % n];
                let Some(e) = self.entries.get_mut(key) else { continue };
                if e.target || !e.state.due(now) {
                    continue;
                }
                if !self.budget.take(now, in_flight) {
                    out.deferred += 1;
                    self.deferred += 1;
                    break;
                }
                out.dials.push(start(&mut self.next_dial, key, e, now));
                in_flight += 1;
                free -= 1;
            }
        }
        // Entries due now and not dialled wait for a slot (a report frees one)
        // or for the budget (it earns a token in 1/PER_SECOND s).
        out.wake_at = self
            .entries
            .values()
            .filter(|e| e.wanted())
            .filter_map(|e| match e.state {
                DialState::Backoff { until } | DialState::Satisfied { until } if until > now => Some(until),
                _ => None,
            })
            .chain((out.deferred > 0).then_some(now + 1000 / PER_SECOND as u64))
            .min();
        out
    }

    /// Dial `dial` opened connection `conn` (now handshaking).
    pub fn registered(&mut self, dial: DialId, conn: ConnId) {
        for e in self.entries.values_mut() {
            if let DialState::Dialling { dial: d, conn: c @ None, .. } = &mut e.state {
                if *d == dial {
                    *c = Some(conn);
                    return;
                }
            }
        }
    }

    /// Connection `conn`, made by one of our dials, completed its handshake.
    pub fn established(&mut self, conn: ConnId, now: u64) {
        if let Some((_, e)) = self.by_conn(conn) {
            if let DialState::Dialling { dial, .. } = e.state {
                e.state = DialState::Connected { since: now, dial, conn };
            }
        }
    }

    /// Dial `dial` failed before it had a connection (resolving, connecting, no
    /// slot). Ignored unless it is the entry's current dial.
    pub fn failed(&mut self, dial: DialId, now: u64, random: u64, why: Failure) {
        let Some(key) = self
            .entries
            .iter()
            .find(|(_, e)| matches!(e.state, DialState::Dialling { dial: d, .. } if d == dial))
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        self.finish(&key, now, random, End::Failed(why));
    }

    /// Connection `conn` ended (it may never have been established). Ignored
    /// unless one of our entries holds it. True if one did.
    pub fn ended(&mut self, conn: ConnId, now: u64, random: u64, end: End) -> bool {
        let Some(key) = self.by_conn(conn).map(|(k, _)| k.to_string()) else { return false };
        self.finish(&key, now, random, end);
        true
    }

    fn by_conn(&mut self, conn: ConnId) -> Option<(&str, &mut Entry)> {
        self.entries.iter_mut().map(|(k, e)| (k.as_str(), e)).find(|(_, e)| match e.state {
            DialState::Dialling { conn: Some(c), .. } | DialState::Connected { conn: c, .. } => c == conn,
            _ => false,
        })
    }

    fn finish(&mut self, key: &str, now: u64, random: u64, end: End) {
        let covered = self.connected.contains(key);
        let Some(e) = self.entries.get_mut(key) else { return };
        let lasted = match e.state {
            DialState::Connected { since, .. } => Some(now.saturating_sub(since)),
            _ => None,
        };
        let r = Draw(random).next();
        match end {
            _ if covered => {
                // Another connection serves this address: nothing to retry or show.
                e.state = DialState::Covered;
                e.failures = 0;
                e.last_error = None;
            }
            End::Duplicate => {
                e.state = DialState::Satisfied { until: now + jitter(SATISFIED_MS, r) };
                e.failures = 0;
                e.last_error = None;
            }
            End::Ourselves => {
                e.state = DialState::Ourselves;
                e.failures = 0;
                e.last_error = Some(Failure::Ourselves);
            }
            End::Failed(why) => {
                if lasted.is_some_and(|ms| ms >= STABLE_MS) {
                    e.failures = 0;
                }
                e.failures = e.failures.saturating_add(1);
                e.last_error = Some(why);
                e.state = DialState::Backoff { until: now + backoff_ms(e.failures, r) };
            }
        }
        if !e.wanted() {
            self.entries.remove(key);
        }
    }

    /// Forgets entries that are neither targets nor candidates, unless a dial
    /// of theirs is under way (it is forgotten when it reports).
    fn prune(&mut self) {
        self.entries.retain(|_, e| e.wanted() || e.state.in_progress());
    }

    /// The entries `status` lists: wanted, with an error, and holding no
    /// connection (a dial's connection is listed as a connection).
    pub fn shown(&self, now: u64) -> impl Iterator<Item = Shown<'_>> {
        self.entries.iter().filter(|(_, e)| e.wanted()).filter_map(move |(k, e)| {
            let error = e.last_error.as_ref()?;
            let (dialling, retry_in_ms) = match e.state {
                DialState::Dialling { conn: None, .. } => (true, Some(0)),
                DialState::Idle => (false, Some(0)),
                DialState::Backoff { until } => (false, Some(until.saturating_sub(now))),
                // Our own address, listed where the user asked for it.
                DialState::Ourselves if e.target => (false, None),
                _ => return None,
            };
            Some(Shown { key: k, dialling, failures: e.failures, error, retry_in_ms })
        })
    }

    /// Holds back entry `key` until `until` if it is due now (the caller
    /// judged it not worth a dial yet: a full peer already in our mesh).
    pub fn hold(&mut self, key: &str, now: u64, until: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            if e.state.due(now) {
                e.state = DialState::Satisfied { until };
            }
        }
    }

    /// Connect targets due for a dial now.
    pub fn due_targets(&self, now: u64) -> impl Iterator<Item = &str> {
        self.entries.iter().filter(move |(_, e)| e.target && e.state.due(now)).map(|(k, _)| k.as_str())
    }

    /// Discovery dials under way (they count against the budget's in-flight cap).
    pub fn discovery_in_flight(&self) -> usize {
        self.entries.values().filter(|e| !e.target && matches!(e.state, DialState::Dialling { .. })).count()
    }
}

fn start(next: &mut DialId, key: &str, e: &mut Entry, now: u64) -> Dial {
    let id = *next;
    *next += 1;
    e.state = DialState::Dialling { since: now, dial: id, conn: None };
    Dial { key: key.to_string(), id }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MID: u32 = 1 << 31;

    fn targets(d: &mut Dialer, list: &[&str]) {
        d.set_targets(list.iter().map(|s| s.to_string()));
    }

    fn keys(p: &Poll) -> Vec<&str> {
        p.dials.iter().map(|d| d.key.as_str()).collect()
    }

    fn one(p: &Poll) -> DialId {
        assert_eq!(p.dials.len(), 1, "{p:?}");
        p.dials[0].id
    }

    fn refused() -> Failure {
        Failure::Connect("cannot reach 10.0.0.2:6783: Connection refused (os error 111)".into())
    }

    #[test]
    fn backoff_grows_by_half_and_is_capped() {
        let seq: Vec<u64> = (1..=12).map(|n| backoff_ms(n, MID)).collect();
        assert_eq!(&seq[..6], &[2000, 3000, 4500, 6750, 10125, 15187]);
        assert!(seq.windows(2).all(|w| w[1] >= w[0]), "{seq:?}");
        assert_eq!(seq[11], BACKOFF_CAP_MS);
        for n in [20, 100, u32::MAX] {
            assert_eq!(backoff_ms(n, MID), BACKOFF_CAP_MS);
            assert!(backoff_ms(n, u32::MAX) < BACKOFF_CAP_MS * 5 / 4);
            assert_eq!(backoff_ms(n, 0), BACKOFF_CAP_MS * 3 / 4);
        }
        assert_eq!(backoff_ms(1, 0), 1500);
        assert_eq!(backoff_ms(1, u32::MAX), 2498);
    }

    /// 64 routers launched together whose first dial of the same target fails
    /// at the same instant retry spread over the ±25 % window, not together.
    #[test]
    fn retries_of_routers_launched_together_spread_out() {
        let mut retries = Vec::new();
        let mut seeds = Draw(7);
        for _ in 0..64 {
            let mut d = Dialer::default();
            targets(&mut d, &["10.0.0.1:6783"]);
            let id = one(&d.poll(0, 0, 10));
            d.failed(id, 0, seeds.next() as u64 | (seeds.next() as u64) << 32, refused());
            let wake = d.poll(0, 0, 10).wake_at.expect("a retry is due later");
            assert!((1500..2500).contains(&wake), "{wake}");
            // Not dialled early, dialled when due.
            assert!(d.poll(wake - 1, 0, 10).dials.is_empty());
            assert_eq!(keys(&d.poll(wake, 0, 10)), ["10.0.0.1:6783"]);
            retries.push(wake);
        }
        retries.sort_unstable();
        let spread = retries[63] - retries[0];
        assert!(spread >= 800, "retries within {spread} ms of each other: {retries:?}");
        // No 100 ms bucket holds more than a quarter of them.
        let mut buckets = std::collections::HashMap::new();
        for r in &retries {
            *buckets.entry(r / 100).or_insert(0) += 1;
        }
        assert!(buckets.values().all(|&n| n <= 16), "{buckets:?}");
    }

    #[test]
    fn discovery_dials_are_budgeted_targets_are_not() {
        let mut d = Dialer::new(DialBudget::new(3, 4, 5));
        let found: Vec<String> = (1..=10).map(|i| format!("10.0.1.{i}:6783")).collect();
        d.set_candidates(found.clone());
        targets(&mut d, &["10.0.0.1:6783", "10.0.0.2:6783"]);
        let p = d.poll(0, 1, 100);
        // Both targets, then three discovered (in-flight cap), the fourth deferred.
        assert_eq!(p.dials.len(), 5, "{p:?}");
        assert_eq!(&keys(&p)[..2], ["10.0.0.1:6783", "10.0.0.2:6783"]);
        assert_eq!((p.deferred, d.deferred), (1, 1));
        assert_eq!(d.discovery_in_flight(), 3);
        assert_eq!(p.wake_at, Some(250));
        // Three fail: the in-flight cap frees, two tokens of the burst are left.
        for dial in &p.dials[2..] {
            d.failed(dial.id, 10, 9, refused());
        }
        let p = d.poll(10, 2, 100);
        assert_eq!(p.dials.len(), 2, "{p:?}");
        assert!(p.dials.iter().all(|x| found.contains(&x.key)));
        // Then one every 250 ms.
        for dial in &p.dials {
            d.failed(dial.id, 20, 3, refused());
        }
        assert!(d.poll(200, 4, 100).dials.is_empty());
        assert_eq!(d.poll(260, 5, 100).dials.len(), 1);
        // Free slots cap every dial, targets too.
        let mut d = Dialer::default();
        targets(&mut d, &["a:1", "b:1", "c:1"]);
        d.set_candidates(found);
        assert_eq!(keys(&d.poll(0, 0, 2)), ["a:1", "b:1"]);
        assert_eq!(keys(&d.poll(0, 0, 1)), ["c:1"]);
        let p = d.poll(0, 0, 0);
        assert!(p.dials.is_empty() && p.wake_at.is_none(), "{p:?}");
    }

    #[test]
    fn a_dial_in_progress_is_never_dialled_again() {
        let mut d = Dialer::default();
        targets(&mut d, &["10.0.0.2:6783"]);
        let id = one(&d.poll(0, 0, 10));
        for t in [0, 1_000, 3_600_000, 100_000_000] {
            let p = d.poll(t, t, 10);
            assert!(p.dials.is_empty() && p.wake_at.is_none(), "{p:?}");
        }
        d.retry_now("10.0.0.2:6783");
        d.set_targets(["10.0.0.2:6783".to_string()]);
        assert!(d.poll(5, 0, 10).dials.is_empty());
        d.registered(id, 7);
        assert!(d.poll(10, 0, 10).dials.is_empty());
        d.established(7, 20);
        assert_eq!(d.get("10.0.0.2:6783").unwrap().state, DialState::Connected { since: 20, dial: id, conn: 7 });
        assert!(d.poll(1_000_000, 0, 10).dials.is_empty());
        // A report about another dial or connection changes nothing.
        d.failed(id + 1, 30, 0, refused());
        assert!(!d.ended(8, 30, 0, End::Duplicate));
        assert!(matches!(d.get("10.0.0.2:6783").unwrap().state, DialState::Connected { .. }));
        assert_eq!(d.shown(30).count(), 0);
    }

    fn until(d: &Dialer, key: &str) -> u64 {
        match d.get(key).unwrap().state {
            DialState::Backoff { until } | DialState::Satisfied { until } => until,
            ref s => panic!("{s:?}"),
        }
    }

    #[test]
    fn close_retries_soon_and_shows_why() {
        let mut d = Dialer::default();
        let key = "10.0.0.2:6783";
        targets(&mut d, &[key]);
        // Two failed dials, then a connection that lasts 5 s.
        let id = one(&d.poll(0, 0, 10));
        d.failed(id, 0, 1, refused());
        assert_eq!(d.get(key).unwrap().failures, 1);
        let t = until(&d, key);
        let id = one(&d.poll(t, 0, 10));
        d.failed(id, t, 2, refused());
        assert_eq!(d.get(key).unwrap().failures, 2);
        let t2 = until(&d, key);
        assert_eq!(t2 - t, backoff_ms(2, Draw(2).next()));
        let shown: Vec<Shown> = d.shown(t).collect();
        assert_eq!(shown.len(), 1);
        assert_eq!((shown[0].dialling, shown[0].failures, shown[0].retry_in_ms), (false, 2, Some(t2 - t)));
        assert!(shown[0].error.text().contains("Connection refused"));
        let id = one(&d.poll(t2, 0, 10));
        // Dialling again: listed as connecting, with the last error.
        let s = d.shown(t2).next().unwrap();
        assert!(s.dialling && s.retry_in_ms == Some(0));
        d.registered(id, 1);
        assert_eq!(d.shown(t2).count(), 0, "the connection is listed instead");
        d.established(1, t2 + 100);
        let closed = || End::Failed(Failure::Closed("no heartbeat for 35s".into()));
        assert!(d.ended(1, t2 + 5_100, 3, closed()));
        // Short-lived: the failures keep counting.
        let e = d.get(key).unwrap();
        assert_eq!((e.failures, &e.state), (3, &DialState::Backoff { until: t2 + 5_100 + backoff_ms(3, Draw(3).next()) }));
        assert_eq!(d.shown(t2 + 5_100).next().unwrap().error.text(), "no heartbeat for 35s");
        // A connection that lasted 30 s clears them: retried in about 2 s.
        let t3 = until(&d, key);
        let id = one(&d.poll(t3, 0, 10));
        d.registered(id, 2);
        d.established(2, t3 + 100);
        let t4 = t3 + 100 + STABLE_MS;
        d.ended(2, t4, 5, closed());
        assert_eq!(d.get(key).unwrap().failures, 1);
        let wake = d.poll(t4, 0, 10).wake_at.unwrap();
        assert!((1500..2500).contains(&(wake - t4)), "{wake}");
        // A handshake failure backs off too.
        let id = one(&d.poll(wake, 0, 10));
        d.registered(id, 3);
        d.ended(3, wake, 1, End::Failed(Failure::Handshake("authentication failed: passwords differ".into())));
        assert_eq!(d.get(key).unwrap().failures, 2);
    }

    #[test]
    fn a_target_removed_while_dialling_is_forgotten_when_it_reports() {
        let mut d = Dialer::default();
        targets(&mut d, &["10.0.0.2:6783", "10.0.0.3:6783"]);
        let p = d.poll(0, 0, 10);
        assert_eq!(p.dials.len(), 2);
        targets(&mut d, &["10.0.0.3:6783"]);
        // Still under way: kept, not listed.
        assert!(d.get("10.0.0.2:6783").is_some());
        d.failed(p.dials[0].id, 5, 0, refused());
        assert!(d.get("10.0.0.2:6783").is_none(), "forgotten once it reported");
        assert_eq!(d.shown(5).count(), 0);
        // Removed and added back while dialling: not dialled twice.
        targets(&mut d, &[]);
        targets(&mut d, &["10.0.0.3:6783"]);
        assert!(d.poll(10, 0, 10).dials.is_empty());
        d.registered(p.dials[1].id, 4);
        d.established(4, 20);
        // Removed while connected: the entry goes when the connection ends.
        targets(&mut d, &[]);
        assert!(d.ended(4, 30, 0, End::Failed(Failure::Closed("peer closed the connection".into()))));
        assert!(d.entries().next().is_none());
        assert!(d.poll(100_000, 0, 10).dials.is_empty());
    }

    #[test]
    fn a_connection_the_peer_made_covers_our_target() {
        let mut d = Dialer::default();
        let key = "10.0.0.2:6783";
        targets(&mut d, &[key]);
        let id = one(&d.poll(0, 0, 10));
        d.registered(id, 1);
        // Our connection loses the tie-break after the peer's was established,
        // but its end is reported as a failure (the Goodbye lost to a reset).
        d.set_connected(100, 0, [key.to_string()]);
        assert!(d.ended(1, 100, 0, End::Failed(Failure::Closed("read: Connection reset by peer".into()))));
        assert_eq!(d.get(key).unwrap().state, DialState::Covered);
        assert_eq!(d.shown(100).count(), 0);
        assert!(d.poll(1_000_000, 0, 10).dials.is_empty());
        // Covered after a failure was listed: the error goes.
        let mut d = Dialer::default();
        targets(&mut d, &[key]);
        let id = one(&d.poll(0, 0, 10));
        d.failed(id, 0, 0, refused());
        assert_eq!(d.shown(0).count(), 1);
        d.set_connected(10, 0, [key.to_string()]);
        assert_eq!(d.shown(10).count(), 0);
        // The peer's connection ends: ours is dialled within the spread.
        d.set_connected(20, 99, []);
        let wake = d.poll(20, 0, 10).wake_at.unwrap();
        assert!((20..20 + UNCOVERED_SPREAD_MS).contains(&wake), "{wake}");
        assert_eq!(keys(&d.poll(wake, 0, 10)), [key]);
    }

    #[test]
    fn a_duplicate_is_not_a_failure() {
        let mut d = Dialer::default();
        let key = "10.0.0.1:6783";
        targets(&mut d, &[key]);
        let id = one(&d.poll(0, 0, 10));
        d.failed(id, 0, 0, refused());
        let id = one(&d.poll(5_000, 0, 10));
        d.registered(id, 3);
        // Reached a peer connected by another address (no connection covers
        // this one): look again in about a minute.
        assert!(d.ended(3, 5_000, MID as u64, End::Duplicate));
        let e = d.get(key).unwrap();
        assert_eq!((e.failures, &e.last_error), (0, &None));
        assert_eq!(d.shown(5_000).count(), 0);
        let wake = d.poll(5_000, 0, 10).wake_at.unwrap();
        assert!((5_000 + SATISFIED_MS * 3 / 4..5_000 + SATISFIED_MS * 5 / 4).contains(&wake), "{wake}");
        // The operator asks again: dialled at once.
        d.retry_now(key);
        assert_eq!(keys(&d.poll(5_001, 0, 10)), [key]);
    }

    #[test]
    fn our_own_address_is_listed_and_never_dialled_again() {
        let mut d = Dialer::default();
        let (own, other) = ("10.0.0.1:6783", "10.0.0.9:6783");
        targets(&mut d, &[own]);
        d.set_candidates(vec![other.into()]);
        let p = d.poll(0, 0, 10);
        assert_eq!(p.dials.len(), 2);
        for (i, dial) in p.dials.iter().enumerate() {
            d.registered(dial.id, i as u64);
            assert!(d.ended(i as u64, 10, 0, End::Ourselves));
        }
        // The target is listed, failed for good; the discovered address is not listed.
        let shown: Vec<Shown> = d.shown(10).collect();
        assert_eq!(shown.len(), 1);
        assert_eq!((shown[0].key, shown[0].retry_in_ms, shown[0].error), (own, None, &Failure::Ourselves));
        assert_eq!(shown[0].error.text(), "cannot connect to ourselves");
        // Nothing is due, ever, and nothing asks to be woken for it.
        let p = d.poll(u64::MAX / 2, 0, 10);
        assert!(p.dials.is_empty() && p.wake_at.is_none(), "{p:?}");
        // Naming the targets again keeps the verdict; asking again dials once more.
        targets(&mut d, &[own]);
        assert!(d.poll(u64::MAX / 2, 0, 10).dials.is_empty());
        d.retry_now(own);
        assert_eq!(keys(&d.poll(u64::MAX / 2, 0, 10)), [own]);
    }

    #[test]
    fn an_incarnation_that_was_replaced_is_a_second_router() {
        let (a, b) = (PeerName(0x0200_0000_0001), PeerName(0x0200_0000_0002));
        let mut r = Replaced::default();
        // a restarted twice: its old uids are gone for good, a new one is new.
        r.note(a, 10);
        r.note(a, 11);
        assert!(r.was_replaced(a, 10) && r.was_replaced(a, 11));
        assert!(!r.was_replaced(a, 12) && !r.was_replaced(b, 10));
        // Bounded per peer: the oldest goes first; a repeat is kept once.
        for uid in 20..20 + Replaced::PER_PEER as u64 {
            r.note(a, uid);
            r.note(a, uid);
        }
        assert!(!r.was_replaced(a, 11));
        assert!((20..20 + Replaced::PER_PEER as u64).all(|u| r.was_replaced(a, u)));
        // Bounded in peers.
        for n in 0..Replaced::PEERS as u64 {
            r.note(PeerName(0x0300_0000_0000 + n), 1);
        }
        assert!(r.by_peer.len() <= Replaced::PEERS);
    }

    #[test]
    fn discovered_addresses_come_and_go() {
        let mut d = Dialer::default();
        d.set_candidates(vec!["10.0.1.2:6783".into(), "10.0.1.1:6783".into(), "10.0.1.1:6783".into()]);
        let p = d.poll(0, 0, 10);
        assert_eq!(p.dials.len(), 2);
        d.failed(p.dials[0].id, 0, 0, refused());
        // No longer gossiped: the failed one goes, the one under way stays until it reports.
        d.set_candidates(Vec::new());
        assert_eq!(d.entries().count(), 1);
        d.registered(p.dials[1].id, 9);
        d.established(9, 10);
        d.set_connected(10, 0, [p.dials[1].key.clone()]);
        assert!(d.ended(9, 20, 0, End::Duplicate));
        assert_eq!(d.entries().count(), 0);
    }

    /// Whatever order the two connections of a simultaneous dial finish their
    /// handshakes in, at either end, both peers keep the same one.
    #[test]
    fn both_peers_keep_the_same_connection_of_a_simultaneous_dial() {
        let (a, b) = (PeerName(0x0200_0000_0001), PeerName(0x0200_0000_0002));
        // x: a dialled b; y: b dialled a. Seen from each side.
        let dir = |me: PeerName, conn: char| match (me == a, conn) {
            (true, 'x') | (false, 'y') => Direction::Outbound,
            _ => Direction::Inbound,
        };
        let survivor = |me: PeerName, peer: PeerName, first: char, second: char| {
            match tie_break(me, peer, dir(me, second), dir(me, first)) {
                Keep::New => second,
                Keep::Old => first,
            }
        };
        for (fa, sa) in [('x', 'y'), ('y', 'x')] {
            for (fb, sb) in [('x', 'y'), ('y', 'x')] {
                let at_a = survivor(a, b, fa, sa);
                let at_b = survivor(b, a, fb, sb);
                assert_eq!((at_a, at_b), ('x', 'x'), "a saw {fa} then {sa}, b saw {fb} then {sb}");
            }
        }
        // The same direction again: the old one is stale.
        assert_eq!(tie_break(a, b, Direction::Inbound, Direction::Inbound), Keep::New);
        assert_eq!(tie_break(b, a, Direction::Outbound, Direction::Outbound), Keep::New);
    }

    /// A second dial of the same peer (another connect target for it) while the
    /// first connection lives: both ends keep the first; only a restarted peer
    /// (another uid) replaces it. Across directions the usual rule holds.
    #[test]
    fn a_second_dial_of_the_same_incarnation_keeps_the_live_connection() {
        let (a, b) = (PeerName(0x0200_0000_0001), PeerName(0x0200_0000_0002));
        for (me, peer) in [(a, b), (b, a)] {
            for dir in [Direction::Outbound, Direction::Inbound] {
                assert_eq!(tie_break_incarnation(me, peer, dir, dir, true), Keep::Old, "{me} {dir:?}");
                assert_eq!(tie_break_incarnation(me, peer, dir, dir, false), Keep::New, "{me} {dir:?} restarted");
            }
            for same_uid in [true, false] {
                let (out, inb) = (Direction::Outbound, Direction::Inbound);
                assert_eq!(tie_break_incarnation(me, peer, out, inb, same_uid), tie_break(me, peer, out, inb));
                assert_eq!(tie_break_incarnation(me, peer, inb, out, same_uid), tie_break(me, peer, inb, out));
            }
        }
    }
}
