//! IP address management (IPAM), like Weave Net's: every peer hands out unique
//! addresses from one shared range (the *universe*, default `10.32.0.0/12`)
//! without anyone coordinating by hand, and keeps them across restarts.
//!
//! Owns: who owns which part of the universe ([`ring`]), how the first peers agree
//! on that ([`paxos`]), which addresses this peer has handed to which target, the
//! donation and claim protocol, persistence, and every bound on what peers send.
//! Never does I/O or reads a clock: the daemon feeds messages, API calls and
//! `now_ms` (a monotonic clock in milliseconds), and carries out what
//! [`Ipam::poll_transmit`] returns.
//!
//! # How it works
//! * The universe is a **ring of ranges, each owned by one peer** ([`ring`]). Only
//!   an owner changes its entries, every change bumps a version, and peers merge
//!   entries by highest version. The ring travels as gossip.
//! * **Initial ownership** ([`InitMode`]): `Consensus(N)` — the first peers agree on
//!   the list of initial owners with single-decree Paxos ([`paxos`]): no proposal starts before all `N` participants are known, and
//!   agreement then needs a majority of them. Consensus is **lazy**, as in
//!   Weave: a peer only starts proposing once it is asked for an address (and
//!   then until the ring is agreed, even if that request is cancelled: allocating
//!   and freeing at once is how to "prime" it); until then it only answers
//!   (promises, accepts, learns) proposals that others started. `Seed(peers)` —
//!   the universe is divided among the listed peers at once, no agreement needed
//!   (every peer must be given the same list); `Observer` — never takes space at
//!   start. Until the ring is agreed, allocation answers [`Allocation::Pending`].
//! * **An agreed ring wins.** A peer whose ring is not agreed adopts the first
//!   agreed ring it hears of, whatever its `N`, its init mode or its own consensus
//!   records; then it gets space by donation. Only two *agreed* rings with
//!   different seeds refuse each other ([`IpamError::DifferentRings`]).
//! * **Allocation** is local: a peer hands out the lowest free address of the
//!   requested subnet from the ranges it owns. Without free space there, it asks a
//!   reachable peer with free space (chosen at random, weighted by the free space
//!   owners report) to **donate** part of a range; an exact claim of an address
//!   owned by another peer asks that owner for exactly that address. Owners
//!   transfer space by rewriting their own entries; that and the shutdown handoff
//!   ([`Ipam::reset`]) are the only ways ownership moves, besides
//!   [`Ipam::rmpeer`].
//! * **Safety**: an address is only ever allocated by the peer that owns it in its
//!   own view, which is exact for its own entries (single writer), and an owner
//!   only gives away addresses that are free. So no address is handed to two
//!   targets unless `rmpeer` is run on a peer that is alive, or the daemon breaks
//!   the persistence rule below (the simulator in `tests/` checks this globally).
//!
//! # Driving it (the daemon's contract)
//! ```text
//! start:    Ipam::restore(me, range, init, config, &bytes, &identity)   if a snapshot
//!           exists, else Ipam::with_config(me, range, init, config, &identity);
//!           then ipam.release_missing(&running_targets) after a restore.
//! topology: ipam.peers_changed(&reachable_peers)   whenever reachability changes
//!           (all peers with a route, not only neighbours; me excluded or not).
//! inbound:  ControlMsg::Ipam(bytes) from neighbour `from`
//!             -> ipam.handle_message(from, &bytes, now_ms, &mut key_book)
//! API:      ipam.allocate(target, request, now_ms), free, free_target, rmpeer,
//!           reset, status, ...
//! timer:    at ipam.poll_timeout() -> ipam.handle_timeout(now_ms)
//! after each of the above, in this order:
//!   1. if ipam.needs_save() { persist(ipam.snapshot())?; ipam.saved() }
//!      (fsync'd, before 2.; if the write fails, stop here: send nothing, keep
//!      the events, try again on the next step)
//!   2. while let Some((dest, bytes)) = ipam.poll_transmit() {
//!          Dest::Neighbours -> send ControlMsg::Ipam(bytes) on every established
//!                              control connection;
//!          Dest::Peer(p)    -> send it to the next hop towards p (p itself if a
//!                              neighbour); drop it if p is unreachable.
//!      }
//!   3. while let Some(event) = ipam.poll_event() { wake waiting attaches, log }
//!   4. re-arm the timer with ipam.poll_timeout().
//! ```
//! Step 1 before 2 matters: promises, donations and allocations must be on disk
//! before anyone hears of them, or a crash can make this peer reuse space it gave
//! away. Messages addressed to another peer are relayed by IPAM itself (they come
//! back out of `poll_transmit` as `Dest::Peer`), so the daemon needs no parsing.
//!
//! ## Allocation
//! `allocate(target, Request::Any(subnet) | Request::Exact { ip, prefix }, now)`:
//! * `Ok(Allocation::Ready { ip, prefix })` — configure it. Asking again for the
//!   same target and subnet returns the same address (idempotent).
//! * `Ok(Allocation::Pending(why))` — IPAM keeps working on it; when it succeeds
//!   [`Event::Allocated`] is emitted and asking again returns `Ready`; when it
//!   fails [`Event::Failed`] is emitted and asking again returns that error once.
//!   Show `why` (its `Display`, e.g. "waiting for consensus: 1 of 2 peers") and
//!   give up after a timeout with [`Ipam::free_target`] (which also cancels).
//! * `Err(e)` — refuse the attach with `e`'s message.
//!
//! A target is any string naming what holds addresses (a container id);
//! [`Ipam::free`] returns one address, [`Ipam::free_target`] all of a target's.
//!
//! An exact address a target uses before its claim completes (a bare CIDR the
//! user chose, used at once while the owner is unreachable) is noted with
//! [`Ipam::note_in_use`] after `allocate` answered `Pending`. If its claim then
//! fails (the owner gave the address to another target meanwhile), that is a
//! [`Conflict`]: [`Event::Conflict`] once, listed in [`IpamStatus::conflicts`],
//! and the claim is retried every [`CONFLICT_RETRY_MS`] until it succeeds (the
//! other holder let go) or the target frees the address. Not persisted: the
//! daemon notes its attachments again at start.
//!
//! ## Signatures
//! Every message is signed by its sender, every ring entry by its writer, every
//! Paxos value by its proposer and every acceptance in a decision by its
//! participant (see [`wire`]).
//! `handle_message` admits the bindings a message carries into the daemon's
//! [`crate::trust::KeyBook`] and checks every signature against it; what is
//! forged is dropped and counted in [`Ipam::drops`] (and [`IpamStatus::drops`]),
//! never returned as an error.
//!
//! ## Errors from `handle_message`
//! * [`IpamError::is_conflict`] true (different ranges, differently seeded or
//!   agreed rings, inconsistent entries or consensus claims, a takeover of a range
//!   holding live allocations): nothing was applied; log the message and close the
//!   control connection to `from` (Weave refuses such connections). A different
//!   `consensus=N` is not a conflict (see the setup notes).
//! * Anything else (malformed, unknown version, over a bound): the message was
//!   dropped; log it. The connection may stay.
//!
//! ## Other operations
//! * [`Ipam::rmpeer`]`(dead)` takes over every range of a dead peer. **Unsafe if the
//!   peer is only partitioned away**: both would then hand out the same
//!   addresses. Run it on one peer only, once the peer is gone for good.
//! * [`Ipam::reset`] hands all this peer's ranges to a reachable peer before a
//!   `meshnet reset`; flush `poll_transmit` afterwards, then delete the snapshot.
//! * [`Ipam::status`] for `meshnet status ipam`.
//!
//! ## Setup notes
//! * Pass a random [`Config::rng_seed`]; 0 makes the choices (and request ids)
//!   deterministic per peer name, which tests want and daemons do not.
//! * Call [`Ipam::peers_changed`] at start and on every reachability change:
//!   donors and owners are only asked while reachable, a newly reachable peer makes
//!   this peer send its full state (that is what repairs a healed partition), and
//!   `rmpeer`/`reset` use it.
//! * Consensus starts on the **first allocation**, not at start: launching peers
//!   forms no ring. A peer that just gained a reachable peer waits
//!   [`Config::paxos_retry_ms`] before proposing, to hear an agreed ring first.
//!   A proposal starts once `N` participants are known, and the quorum is
//!   `max(N, consensus peers known)/2 + 1`, `N` being the
//!   largest `consensus=N` heard of (peers gossip theirs, and a different `N` is
//!   no error: the daemon's default of 1 + peers named at launch gives `1` to
//!   `launch` and `2` to `launch h1`, and those two agree on `[h1, h2]` when one
//!   of them first allocates). With `N = 3` nothing is allocated until the
//!   third peer is there; then all three own space.
//! * A peer that joins a mesh whose ring is agreed adopts that ring whatever its
//!   `N` (e.g. `h3$ meshnet launch && meshnet connect h2` with `N = 1`), provided
//!   it did not allocate before connecting: alone, with `N = 1`, its first
//!   allocation makes it agree on a ring of its own, and two groups that agreed
//!   apart refuse each other ([`IpamError::DifferentRings`]); one side must be
//!   reset. The adopted ring is in the snapshot, so a restart keeps it.
//! * A peer that lost its snapshot must not come back under the same name while
//!   the mesh still lists ranges for it (in `seed=` mode it would re-take its
//!   genesis share at once): `rmpeer` it from another peer first, or give it a new
//!   name.
//!
//! ## Costs
//! Gossip after a change carries only the changed entries (about 20 bytes each,
//! plus 72 of proof) and a 64-bit ring id; every peer sends its whole ring to
//! its neighbours when new peers become reachable (about 90 KB for a ring of
//! 1000 signed entries), and every [`Config::full_gossip_interval_ms`] a
//! digest of it (once agreed; before, the full state): a neighbour whose ring
//! differs answers with its full state.
//! * **Bindings go to the neighbours once.** Gossip to the neighbours
//!   ([`Dest::Neighbours`]) carries the sender's own binding (136 bytes) only
//!   the first time, and again after [`Ipam::peers_changed`] reports a newly
//!   reachable peer. It carries no other peer's binding: the key book passed to
//!   `handle_message` is the daemon's, which holds the bindings of the peers it
//!   reaches (topology gossip pins them). A neighbour that lacks a binding
//!   anyway drops what needs it, counts it ([`DropStats::missing_bindings`],
//!   [`DropStats::unknown_entry_signers`]) and asks the sender for its full
//!   state, which, like every message to one peer, carries the bindings it
//!   holds of the signers inside. Known gap: a peer that joins after another
//!   died (before `rmpeer`) checks the dead peer's self-written entries only if
//!   a neighbour holds that peer's binding.
//! * **Free counts are rate-limited.** An allocation or free changes its owner's
//!   free count, but a new version of the entry (flooded to every peer) is only
//!   written when the count reaches or leaves zero or moves by an eighth; other
//!   changes wait for the next full gossip (or a "no space" answer, which
//!   carries exact counts). The count only guides donor choice;
//!   [`Ipam::status`] shows this peer's own counts exactly.
//! * **Paxos** ([`paxos`]): only the proposer's prepare is flooded (about
//!   100 bytes, forwarded once per peer); promises and acceptances go to the
//!   proposer, its accept request (the value: 8 bytes per participant) to each
//!   participant, and the decision (value + a quorum of 72-byte acceptances)
//!   is announced to the neighbours and pulled once per peer
//!   ([`Body`](wire) `Decided`, `WantDecision`, `Decision`). While it wants a
//!   ring a peer also sends its (small) full state every
//!   [`Config::paxos_retry_ms`] plus jitter, which an agreed neighbour answers
//!   with its ring.
//!
//! # Layout
//! [`space`] address arithmetic, [`ring`] the ownership CRDT, [`paxos`] agreement,
//! [`wire`] messages/snapshots and their bounds, `allocator` the [`Ipam`] state
//! machine tying them together.

use std::fmt;
use std::net::IpAddr;

use crate::peer::PeerName;

mod allocator;
#[doc(hidden)]
pub mod forge;
pub mod paxos;
pub mod ring;
pub mod space;
pub mod wire;
#[cfg(test)]
mod tests;

pub use allocator::{Ipam, CONFLICT_RETRY_MS};
pub use wire::Proof;
pub use space::{Addr, Cidr, CidrError};

/// The default allocation range, as in Weave.
pub const DEFAULT_RANGE: &str = "10.32.0.0/12";

/// How initial ownership of the universe is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMode {
    /// `consensus=N`: agreed among the first `N` peers (Paxos: proposals start once
    /// all `N` are known, a majority decides), on
    /// the first allocation. `N` should be the number of peers started initially
    /// (1 to [`paxos::MAX_PARTICIPANTS`]); peers given different values use the
    /// largest one they hear of. An agreed ring heard from a peer is adopted
    /// whatever `N`.
    Consensus(u32),
    /// `seed=PEER,...`: divided among these peers at once (identical list everywhere).
    Seed(Vec<PeerName>),
    /// `observer`: never takes space at start; gets space by asking.
    Observer,
}

/// Timers and randomness; the defaults suit a real mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Full-state gossip to neighbours at least this often (repairs lost deltas).
    pub full_gossip_interval_ms: u64,
    /// How long to wait for a donor or owner to answer before asking another.
    pub request_timeout_ms: u64,
    /// Paxos proposal retry period (a random part up to the same again is added).
    pub paxos_retry_ms: u64,
    /// Seed of the random choices (donors, jitter, request ids); 0 derives one from
    /// the peer name, which is deterministic: the daemon should pass a random value.
    pub rng_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { full_gossip_interval_ms: 30_000, request_timeout_ms: 2_000, paxos_retry_ms: 2_000, rng_seed: 0 }
    }
}

/// What a target asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Request {
    /// The lowest free address of this subnet (inside the universe, /30 or
    /// larger; /126 or larger for IPv6).
    Any(Cidr),
    /// Exactly this address, reported with `prefix` (`ip:10.32.1.5/12`, `ip:fd32::5/64`).
    Exact { ip: IpAddr, prefix: u8 },
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Any(c) => write!(f, "an address in {c}"),
            Request::Exact { ip, prefix } => write!(f, "{ip}/{prefix}"),
        }
    }
}

/// The answer to [`Ipam::allocate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allocation {
    Ready { ip: IpAddr, prefix: u8 },
    /// Not yet; IPAM is working on it (see [`Waiting`]).
    Pending(Waiting),
}

/// Why an allocation is pending; `Display` gives the user-facing text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Waiting {
    /// The ring is not agreed; `known` of the `quorum` consensus peers needed are known.
    Consensus { known: usize, quorum: usize },
    /// An observer (or a late peer) waiting to hear the agreed ring from a peer.
    Ring,
    /// Asked `donor` for free space.
    Donation { donor: PeerName },
    /// No reachable peer reports free space in the subnet; retrying.
    NoFreeSpace { subnet: Cidr },
    /// Asked `owner` for the exact address (or it is unreachable: then only
    /// `rmpeer` of a dead owner, or the owner's return, will help).
    Owner { owner: PeerName, reachable: bool },
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::Consensus { known, quorum } => write!(f, "waiting for consensus: {known} of {quorum} peers"),
            Waiting::Ring => write!(f, "waiting to hear the IP allocation ring from another peer"),
            Waiting::Donation { donor } => write!(f, "asked peer {donor} for free address space"),
            Waiting::NoFreeSpace { subnet } => write!(f, "no reachable peer has free addresses in {subnet}"),
            Waiting::Owner { owner, reachable: true } => write!(f, "asked owner {owner} for the address"),
            Waiting::Owner { owner, reachable: false } => {
                write!(f, "the address belongs to unreachable peer {owner} (rmpeer it if it is gone for good)")
            }
        }
    }
}

/// Where [`Ipam::poll_transmit`] wants bytes sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    /// Every established control connection.
    Neighbours,
    /// One peer, routed over the mesh (the next hop towards it).
    Peer(PeerName),
}

/// Things the daemon may want to act on, from [`Ipam::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A pending request completed.
    Allocated { target: String, ip: IpAddr, prefix: u8 },
    /// A pending request failed (e.g. the exact address is in use elsewhere).
    Failed { target: String, request: Request, error: IpamError },
    /// The ring became agreed here (by consensus or adopted from a peer).
    Agreed { seeds: Vec<PeerName> },
    /// The claim of an address a target here already uses failed (see
    /// [`Ipam::note_in_use`]): emitted once per conflict, not per retry.
    Conflict(Conflict),
}

/// One owner's share, as this peer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerStatus {
    pub peer: PeerName,
    /// Ranges as inclusive `(first, last)` addresses, by start.
    pub ranges: Vec<(IpAddr, IpAddr)>,
    pub size: u128,
    /// Free addresses the owner last reported (exact for me).
    pub free: u128,
    /// Me, or a peer in the last `peers_changed` list (all, before any call).
    pub reachable: bool,
}

/// Whether initial ownership is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingState {
    Agreed { seeds: Vec<PeerName> },
    AwaitingConsensus { known: usize, quorum: usize },
    AwaitingRing,
}

/// What `meshnet status ipam` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamStatus {
    pub me: PeerName,
    pub universe: Cidr,
    pub state: RingState,
    /// By peer name.
    pub owners: Vec<OwnerStatus>,
    /// Addresses allocated here.
    pub allocated: usize,
    /// Requests waiting here.
    pub pending: usize,
    /// Addresses owned by unreachable peers.
    pub unreachable_space: u128,
    pub ring_entries: usize,
    /// What was dropped from peers, by reason.
    pub drops: DropStats,
    /// Addresses targets here use whose claim failed (see [`Ipam::note_in_use`]).
    pub conflicts: Vec<Conflict>,
}

/// An address a target here uses although its claim in the ring failed (the
/// owner gave it to another target, e.g. across a partition): two targets use
/// it. The claim is retried until it succeeds or the target lets the address go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub target: String,
    pub ip: IpAddr,
    pub prefix: u8,
    /// Why the last claim failed.
    pub error: IpamError,
}

/// IPAM input dropped, by reason (shown by `meshnet status ipam --json`). Each
/// counts records (entries, Paxos records or values, bindings) or whole messages
/// as named; none of them closes a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropStats {
    /// Messages that did not decode or broke a bound.
    pub malformed_messages: u64,
    /// Messages of another IPAM protocol version.
    pub version_mismatches: u64,
    /// Messages to this peer alone whose sender has no key bound here (no
    /// binding came with them).
    pub unknown_senders: u64,
    /// Gossip from neighbours (whole messages, Paxos records or values) whose
    /// signer has no key bound here. Gossip carries only its sender's binding,
    /// once (others come with the topology), so this follows a lost message or a
    /// signer this peer never reached: the neighbour is asked for its full
    /// state, which carries the bindings of every signer inside.
    pub missing_bindings: u64,
    /// Messages whose signature is not their claimed sender's.
    pub forged_messages: u64,
    /// Bindings whose own signature or name is bad.
    pub bad_bindings: u64,
    /// Bindings for a name already bound to other keys.
    pub conflicting_bindings: u64,
    /// Ring entries with a bad signature, a writer with no right to them, or
    /// a genesis entry that is not the genesis.
    pub forged_entries: u64,
    /// Ring entries whose writer has no key bound here (from a neighbour's
    /// gossip: it is asked for its full state).
    pub unknown_entry_signers: u64,
    /// Ring entries for a live peer's range, validly signed by another peer:
    /// a forged claim, or a transfer this peer missed. Dropped; the owner this
    /// peer knows is asked for its full state (which settles a missed transfer).
    pub unverifiable_entries: u64,
    /// Paxos messages claiming another peer's ballot (a prepare or accept
    /// request not from its proposer), or acceptances with a bad signature.
    pub forged_paxos_records: u64,
    /// Paxos values not signed by their ballot's proposer.
    pub forged_paxos_values: u64,
    /// Paxos messages whose round jumps too far ahead of every round known here.
    pub paxos_round_jumps: u64,
    /// Decisions with too few acceptances, one by a peer outside the value,
    /// or a bad acceptance signature.
    pub forged_decisions: u64,
}

/// A seed list in errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Seeds(pub Vec<PeerName>);

impl fmt::Display for Seeds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().take(8).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        if self.0.len() > 8 {
            write!(f, " and {} more", self.0.len() - 8)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Seeds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    Target(String),
    Peer(PeerName),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Target(t) => write!(f, "{t}"),
            Holder::Peer(p) => write!(f, "a target on peer {p}"),
        }
    }
}

/// Everything IPAM can refuse. See the module docs for how the daemon maps them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpamError {
    // --- configuration ---
    #[error("invalid IP allocation range {0}: it must be an IPv4 network between /1 and /30, or an IPv6 network between /1 and /126 that does not hold ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")]
    BadRange(Cidr),
    #[error("invalid IPAM init: {0}")]
    BadInit(String),
    #[error("the saved IPAM state is unreadable ({0}); remove it to start afresh")]
    BadSnapshot(String),
    #[error("the saved IPAM state belongs to peer {found}, not to this peer {expected}")]
    SnapshotPeer { found: PeerName, expected: PeerName },
    #[error("the saved IPAM state is for range {found} but this peer was started with {expected}; use the same --ipalloc-range or reset this peer")]
    SnapshotRange { found: Cidr, expected: Cidr },

    // --- API calls ---
    #[error("invalid target name {0:?} (1 to 256 bytes)")]
    BadTarget(String),
    #[error("subnet {subnet} is not inside the IP allocation range {universe}")]
    SubnetOutsideRange { subnet: Cidr, universe: Cidr },
    #[error("subnet {0} is too small to allocate from (at most /30 for IPv4, /126 for IPv6)")]
    SubnetTooSmall(Cidr),
    #[error("{ip} is outside the IP allocation range {universe}")]
    AddressOutsideRange { ip: IpAddr, universe: Cidr },
    #[error("{ip} is the network or broadcast address of {net}")]
    ReservedAddress { ip: IpAddr, net: Cidr },
    #[error("invalid prefix length /{0}")]
    BadPrefix(u8),
    #[error("{ip} is already allocated to {holder}")]
    AddressInUse { ip: IpAddr, holder: Holder },
    #[error("cannot rmpeer myself; use reset")]
    RemoveSelf,
    #[error("peer {0} is reachable; rmpeer is only for peers that are gone for good")]
    PeerReachable(PeerName),
    #[error("the IP allocation ring is not agreed yet")]
    NotAgreed,
    #[error("no reachable peer to hand this peer's address space to")]
    NoLivePeer,

    // --- from peers: conflicts (refuse the connection) ---
    #[error("peer {peer} uses IP allocation range {theirs} but this peer uses {ours}")]
    RangeMismatch { peer: PeerName, ours: Cidr, theirs: Cidr },
    #[error("IP allocation rings differ: this peer's was seeded by [{ours}] but peer {peer}'s by [{theirs}] (two groups agreed or were seeded separately; reset one side)")]
    DifferentRings { peer: PeerName, ours: Seeds, theirs: Seeds },
    #[error("peer {peer} sent ring entry {start} at version {version} that differs from this peer's at the same version (was rmpeer run on two peers, or on a live one?)")]
    InconsistentEntry { peer: PeerName, start: IpAddr, version: u64 },
    #[error("peer {peer} says the range holding {ip} (allocated here to {target}) belongs to {owner} (was this peer rmpeer'd while running?)")]
    OwnershipConflict { peer: PeerName, ip: IpAddr, target: String, owner: PeerName },
    #[error("peer {by} took over this peer's range at {start} (its version {theirs}, this peer's {ours}; sent by {peer}): `meshnet rmpeer` removed this router while it was down, or it was run on two routers for the peer whose range this router took over. Both hand out the same addresses: refused. Run `meshnet reset` on this router (`reset --force` if no peer accepts it) and launch it afresh")]
    RangeTakenOver { peer: PeerName, by: PeerName, start: IpAddr, theirs: u64, ours: u64 },
    #[error("peer {peer} sent consensus claims of {participant} that contradict this peer's")]
    InconsistentClaims { peer: PeerName, participant: PeerName },

    // --- from peers: bad messages (drop the message) ---
    #[error("malformed IPAM message: {0}")]
    Malformed(String),
    #[error("unsupported IPAM message version {0}")]
    UnsupportedVersion(u8),
    #[error("IP allocation ring would exceed {} entries", ring::MAX_ENTRIES)]
    TooManyEntries,
}

impl IpamError {
    /// Whether this is a conflict with the sending peer: close that connection.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            IpamError::RangeMismatch { .. }
                | IpamError::DifferentRings { .. }
                | IpamError::InconsistentEntry { .. }
                | IpamError::OwnershipConflict { .. }
                | IpamError::RangeTakenOver { .. }
                | IpamError::InconsistentClaims { .. }
        )
    }
}

/// A small deterministic generator (splitmix64), enough for donor choice and jitter.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` over 128 bits (`n > 0`; 0 gives 0).
    pub(crate) fn below128(&mut self, n: u128) -> u128 {
        if n == 0 {
            0
        } else {
            (((self.next() as u128) << 64) | self.next() as u128) % n
        }
    }

    /// Uniform-ish in `0..n` (`n > 0`; 0 gives 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    pub(crate) use super::Rng;
}
