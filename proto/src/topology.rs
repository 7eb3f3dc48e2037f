//! The mesh as this peer believes it to be: who exists, who is connected to whom,
//! and the next hop towards every reachable peer.
//!
//! Owns: the gossip merge rules, route computation, garbage collection of
//! unreachable peers and the list of addresses worth dialling. Never does I/O or
//! reads a clock; the control crate decides when to gossip, what to dial and when
//! to collect garbage.
//!
//! # Merge rules (per peer entry)
//! * A higher `version` wins.
//! * Same name, different `uid` (the peer restarted) at the *same* version: the
//!   higher `uid` wins. A rule where "either new uid wins" at equal versions never
//!   converges (two peers holding different incarnations would swap forever); the
//!   restarted peer soon bumps its own version past the old incarnation anyway (next rule).
//! * Entries about me never overwrite me. If one carries a version at or above mine
//!   and differs from me (typically my previous incarnation, before a restart), my
//!   version jumps above it so that my current self wins everywhere.
//! * An update is checked against the bounds ([`MAX_PEERS`], [`MAX_CONNECTIONS`],
//!   [`MAX_TEXT`], [`MAX_VERSION`]) before anything is applied.
//!
//! # Signed entries
//! On the wire every entry is a [`SignedPeerInfo`]: the entry, its owner's
//! [`Binding`] (name to keys) and the owner's signature over the entry's canonical
//! encoding ([`PeerInfo::signed_bytes`], domain [`DOMAIN_TOPOLOGY`]). The router
//! merges gossip with [`Topology::merge_signed`], which checks each entry on its
//! own and drops (and reports, per [`Rejection`]) those that fail: malformed,
//! version out of bounds, a binding that is bad or conflicts with the
//! [`KeyBook`], a bad signature. The rest of the update still applies. Only the
//! owner can sign its entry, so only the owner can raise its version; the bound
//! ([`MAX_VERSION`], 2^62) only keeps version arithmetic far from overflow (the
//! "my version jumps above" rule adds 1 to a version below the bound). A
//! topology made with [`Topology::with_signer`] re-signs my entry on every change.
//! The plain [`Topology::merge`] trusts its input (tests and tools only).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::peer::PeerName;
use crate::trust::{self, Admission, Binding, KeyBook, Signature, Signer, TrustError};

/// Most peers a topology holds (including me); a gossip update that would exceed it is refused.
pub const MAX_PEERS: usize = 10_000;
/// Most connections one peer entry may list.
pub const MAX_CONNECTIONS: usize = 1000;
/// Most connections all entries together may list (about 50 MB held): bounds the
/// memory a topology takes and the cost of recomputing routes and broadcast trees
/// (see [`Graph::tables`]). A full mesh of 1000 peers lists 999 000.
pub const MAX_TOTAL_CONNECTIONS: usize = 1 << 20;
/// Longest nickname or software string (bytes) accepted from gossip.
pub const MAX_TEXT: usize = 1024;
/// Versions at or above this are refused; my own version never goes past it.
pub const MAX_VERSION: u64 = 1 << 62;
/// Domain of topology entry signatures.
pub const DOMAIN_TOPOLOGY: &[u8] = b"meshnet topology v1";

/// One connection as its owner reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnInfo {
    /// The peer at the other end.
    pub peer: PeerName,
    /// That peer's reachable TCP listen address: its IP as seen, plus its `Hello.tcp_port`.
    pub addr: SocketAddr,
    /// Whether the owner dialled it.
    pub outbound: bool,
    /// Whether the handshake (and data-plane setup) completed.
    pub established: bool,
}

/// What the mesh knows about one peer. Only the peer itself changes its entry,
/// bumping `version` each time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: PeerName,
    pub nickname: String,
    /// Random per process start: tells incarnations of one name apart.
    pub uid: u64,
    pub version: u64,
    pub software: String,
    /// The peer's overlay MTU (its bridge's), so senders can answer frames too
    /// big for it with ICMP "fragmentation needed". 0: unknown.
    pub mtu: u32,
    pub connections: Vec<ConnInfo>,
}

impl PeerInfo {
    /// The canonical encoding the owner signs: the entry's bincode (standard
    /// configuration, the wire's), which is the same for equal entries.
    pub fn signed_bytes(&self) -> Vec<u8> {
        // Encoding a plain struct into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }
}

/// Who vouches for an entry: its owner's binding and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub binding: Binding,
    /// By `binding.keys.signing_key` over [`PeerInfo::signed_bytes`] in [`DOMAIN_TOPOLOGY`].
    pub sig: Signature,
}

impl Seal {
    /// `signer`'s seal on `info` (`binding` must be the signer's).
    pub fn sign(info: &PeerInfo, signer: &Signer, binding: &Binding) -> Seal {
        Seal { binding: binding.clone(), sig: signer.sign(DOMAIN_TOPOLOGY, &info.signed_bytes()) }
    }

    /// Whether the signature over `info` is good for the binding's signing key
    /// (the binding itself is checked separately).
    pub fn signs(&self, info: &PeerInfo) -> bool {
        trust::verify(&self.binding.keys.signing_key, DOMAIN_TOPOLOGY, &info.signed_bytes(), &self.sig)
    }
}

/// A topology entry as gossiped: the entry and its owner's seal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPeerInfo {
    pub info: PeerInfo,
    pub seal: Seal,
}

/// Why one gossiped entry was dropped by [`Topology::merge_signed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// Over a bound: connections, text, the broadcast name, or a name wider than 48 bits.
    Malformed,
    /// Version at or above [`MAX_VERSION`].
    Version,
    /// The binding names another peer, has a bad signature or a bad name.
    BadBinding,
    /// The name is bound to other keys.
    KeyConflict,
    /// The entry's signature does not verify.
    BadSignature,
    /// A new name, but the topology or the key book is full.
    Full,
}

impl Rejection {
    /// Every rejection, so counters can show each reason from the start.
    pub const ALL: [Rejection; 6] = [
        Rejection::Malformed,
        Rejection::Version,
        Rejection::BadBinding,
        Rejection::KeyConflict,
        Rejection::BadSignature,
        Rejection::Full,
    ];

    /// Stable label for counters (`status --json`).
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Version => "version",
            Rejection::BadBinding => "bad_binding",
            Rejection::KeyConflict => "key_conflict",
            Rejection::BadSignature => "bad_signature",
            Rejection::Full => "full",
        }
    }
}

/// What [`Topology::merge_signed`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Names whose entries changed, sorted (mine if my version was bumped).
    pub changed: Vec<PeerName>,
    /// Entries dropped, in update order.
    pub rejected: Vec<(PeerName, Rejection)>,
    /// Entry signatures checked (entries that would change nothing are not).
    pub verified: usize,
    /// Names newly pinned in the key book (persist it).
    pub pinned: Vec<PeerName>,
}

/// Why a gossip update was refused (nothing of it was applied).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MergeError {
    #[error("gossip would make {count} peers, more than the limit of {MAX_PEERS}")]
    TooManyPeers { count: usize },
    #[error("peer {peer} lists {count} connections, more than the limit of {MAX_CONNECTIONS}")]
    TooManyConnections { peer: PeerName, count: usize },
    #[error("gossip would make {count} connections in all, more than the limit of {MAX_TOTAL_CONNECTIONS}")]
    TooManyTotalConnections { count: usize },
    #[error("peer {peer} has a nickname or software string over {MAX_TEXT} bytes")]
    TextTooLong { peer: PeerName },
    #[error("peer {peer} has a control character in its nickname or software string")]
    ControlCharacter { peer: PeerName },
    #[error("gossip names the broadcast address 00:00:00:00:00:00 as a peer")]
    BroadcastName,
    #[error("peer {peer} has version {version}, at or above the limit of {MAX_VERSION}")]
    VersionOutOfRange { peer: PeerName, version: u64 },
}

/// The local view of the mesh.
#[derive(Clone, Debug)]
pub struct Topology {
    me: PeerInfo,
    /// Every other known peer.
    others: BTreeMap<PeerName, PeerInfo>,
    /// The seal of each entry in `others` that came signed.
    seals: BTreeMap<PeerName, Seal>,
    /// Signs my entry (with [`Topology::with_signer`]).
    signer: Option<(Arc<Signer>, Binding)>,
    /// My entry's current seal.
    my_seal: Option<Seal>,
}

impl Topology {
    /// Starts with only myself. Overlong text fields are cut to [`MAX_TEXT`] bytes, and
    /// control characters in them replaced, so that other peers never refuse my gossip;
    /// my connections are sorted and deduplicated.
    pub fn new(mut me: PeerInfo) -> Self {
        truncate_text(&mut me.nickname);
        truncate_text(&mut me.software);
        for s in [&mut me.nickname, &mut me.software] {
            if !printable(s) {
                *s = s.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
            }
        }
        me.connections = normalise(std::mem::take(&mut me.connections));
        me.version = me.version.min(MAX_VERSION);
        Topology { me, others: BTreeMap::new(), seals: BTreeMap::new(), signer: None, my_seal: None }
    }

    /// Like [`new`](Self::new), and my entry is signed by `signer` (whose binding
    /// is `binding`) now and after every change.
    pub fn with_signer(me: PeerInfo, signer: Arc<Signer>, binding: Binding) -> Self {
        let mut t = Topology::new(me);
        t.signer = Some((signer, binding));
        t.reseal();
        t
    }

    /// Signs my entry again (after any change to it).
    fn reseal(&mut self) {
        if let Some((signer, binding)) = &self.signer {
            self.my_seal = Some(Seal::sign(&self.me, signer, binding));
        }
    }

    /// My version plus one, never past [`MAX_VERSION`].
    fn bump_me(&mut self, above: u64) {
        self.me.version = above.checked_add(1).unwrap_or(MAX_VERSION).min(MAX_VERSION);
    }

    pub fn me(&self) -> &PeerInfo {
        &self.me
    }

    /// Replaces my connection list; bumps my version and returns true if it changed.
    pub fn set_local_connections(&mut self, conns: Vec<ConnInfo>) -> bool {
        let conns = normalise(conns);
        if conns == self.me.connections {
            return false;
        }
        self.me.connections = conns;
        self.bump_me(self.me.version);
        self.reseal();
        true
    }

    /// Changes my nickname; bumps my version and returns true if it changed.
    pub fn set_local_nickname(&mut self, nickname: &str) -> bool {
        let mut nickname = nickname.to_string();
        truncate_text(&mut nickname);
        if nickname == self.me.nickname {
            return false;
        }
        self.me.nickname = nickname;
        self.bump_me(self.me.version);
        self.reseal();
        true
    }

    /// Merges gossip (see the module docs for the rules). Returns the names whose
    /// entries changed, sorted; my own name is among them if my version was bumped
    /// (so the caller should gossip about me).
    pub fn merge(&mut self, update: Vec<PeerInfo>) -> Result<Vec<PeerName>, MergeError> {
        self.check(&update)?;
        let mut changed = BTreeSet::new();
        for info in update {
            let name = info.name;
            if self.apply(info, None) {
                changed.insert(name);
            }
        }
        Ok(changed.into_iter().collect())
    }

    /// Whether merging `info` (sealed with keys `keys`, if signed) would change anything.
    fn would_apply(&self, info: &PeerInfo, keys: Option<&trust::PeerKeys>) -> bool {
        if info.name == self.me.name {
            return info.version > self.me.version || (info.version == self.me.version && *info != self.me);
        }
        match self.others.get(&info.name) {
            None => true,
            Some(old) => {
                // A name whose pinned keys changed (`rmpeer`, or a derived binding
                // replacing a first-use claim) takes the new owner's entry whatever
                // the versions: the old owner's entries are no longer believed.
                let rebound = match (keys, self.seals.get(&info.name)) {
                    (Some(k), Some(seal)) => seal.binding.keys != *k,
                    _ => false,
                };
                rebound
                    || info.version > old.version
                    || (info.version == old.version && info.uid != old.uid && info.uid > old.uid)
            }
        }
    }

    /// Merges one checked entry per the rules; true if it changed the topology.
    /// The caller has checked the bounds and, for a sealed entry, the seal.
    fn apply(&mut self, info: PeerInfo, seal: Option<Seal>) -> bool {
        let keys = seal.as_ref().map(|s| s.binding.keys);
        if !self.would_apply(&info, keys.as_ref()) {
            return false;
        }
        if info.name == self.me.name {
            self.bump_me(info.version);
            self.reseal();
            return true;
        }
        match seal {
            Some(seal) => {
                self.seals.insert(info.name, seal);
            }
            None => {
                self.seals.remove(&info.name);
            }
        }
        self.others.insert(info.name, info);
        true
    }

    /// Merges signed gossip: each entry is checked on its own (bounds, version,
    /// binding against `book`, signature) and dropped if it fails; the others
    /// apply by the usual rules. New names are pinned in `book` (see
    /// [`KeyBook::admit_preferring_derived`]). An entry that would change nothing
    /// is not verified. Err only for an update longer than [`MAX_PEERS`] (nothing applied).
    pub fn merge_signed(&mut self, update: Vec<SignedPeerInfo>, book: &mut KeyBook) -> Result<MergeReport, MergeError> {
        if update.len() > MAX_PEERS {
            return Err(MergeError::TooManyPeers { count: update.len() });
        }
        let mut report = MergeReport::default();
        let mut changed = BTreeSet::new();
        for SignedPeerInfo { info, seal } in update {
            let name = info.name;
            match self.check_signed(&info, &seal, book, &mut report.verified) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(why) => {
                    report.rejected.push((name, why));
                    continue;
                }
            }
            let pinned = book.get(name) == Some(&seal.binding.keys);
            // check_signed verified the binding unless its keys were pinned already.
            match if pinned { Ok(Admission::Known) } else { book.admit_verified(&seal.binding) } {
                Ok(Admission::Known) => {}
                Ok(Admission::Pinned) => report.pinned.push(name),
                Err(TrustError::BookFull(_)) => {
                    report.rejected.push((name, Rejection::Full));
                    continue;
                }
                Err(_) => {
                    report.rejected.push((name, Rejection::KeyConflict));
                    continue;
                }
            }
            if self.apply(info, Some(seal)) {
                changed.insert(name);
            }
        }
        report.changed = changed.into_iter().collect();
        Ok(report)
    }

    /// Checks one signed entry without changing anything: Ok(true) if it is good
    /// and changes something, Ok(false) if it would change nothing (then it is
    /// left unverified: it is dropped without cost).
    fn check_signed(
        &self,
        info: &PeerInfo,
        seal: &Seal,
        book: &KeyBook,
        verified: &mut usize,
    ) -> Result<bool, Rejection> {
        if !trust::valid_name(info.name)
            || info.connections.len() > MAX_CONNECTIONS
            || info.connections.iter().any(|c| !trust::valid_name(c.peer))
            || info.nickname.len() > MAX_TEXT
            || info.software.len() > MAX_TEXT
            || !printable(&info.nickname)
            || !printable(&info.software)
        {
            return Err(Rejection::Malformed);
        }
        if info.version >= MAX_VERSION {
            return Err(Rejection::Version);
        }
        if seal.binding.name != info.name {
            return Err(Rejection::BadBinding);
        }
        if !self.would_apply(info, Some(&seal.binding.keys)) {
            return Ok(false);
        }
        let new_name = info.name != self.me.name && !self.others.contains_key(&info.name);
        if new_name && 1 + self.others.len() >= MAX_PEERS {
            return Err(Rejection::Full);
        }
        // A binding already verified and stored with this name's pinned keys
        // needs no second look; any other is checked against the book.
        let stored = if info.name == self.me.name {
            self.signer.as_ref().map(|(_, b)| b)
        } else {
            self.seals.get(&info.name).map(|s| &s.binding)
        };
        let known = book.get(info.name) == Some(&seal.binding.keys) && stored == Some(&seal.binding);
        match if known { Ok(Admission::Known) } else { book.check_preferring_derived(&seal.binding) } {
            Ok(Admission::Known | Admission::Pinned) => {}
            Err(TrustError::Conflict { .. }) => return Err(Rejection::KeyConflict),
            Err(TrustError::BookFull(_)) => return Err(Rejection::Full),
            Err(_) => return Err(Rejection::BadBinding),
        }
        *verified += 1;
        if !seal.signs(info) {
            return Err(Rejection::BadSignature);
        }
        Ok(true)
    }

    fn check(&self, update: &[PeerInfo]) -> Result<(), MergeError> {
        if update.len() > MAX_PEERS {
            return Err(MergeError::TooManyPeers { count: update.len() });
        }
        let mut new_names = BTreeSet::new();
        for info in update {
            if info.name == PeerName::BROADCAST || info.connections.iter().any(|c| c.peer == PeerName::BROADCAST) {
                return Err(MergeError::BroadcastName);
            }
            if info.connections.len() > MAX_CONNECTIONS {
                return Err(MergeError::TooManyConnections { peer: info.name, count: info.connections.len() });
            }
            if info.nickname.len() > MAX_TEXT || info.software.len() > MAX_TEXT {
                return Err(MergeError::TextTooLong { peer: info.name });
            }
            if !printable(&info.nickname) || !printable(&info.software) {
                return Err(MergeError::ControlCharacter { peer: info.name });
            }
            if info.version >= MAX_VERSION {
                return Err(MergeError::VersionOutOfRange { peer: info.name, version: info.version });
            }
            if info.name != self.me.name && !self.others.contains_key(&info.name) {
                new_names.insert(info.name);
            }
        }
        let count = 1 + self.others.len() + new_names.len();
        if count > MAX_PEERS {
            return Err(MergeError::TooManyPeers { count });
        }
        // Connections listed once the update is applied, counting every entry of
        // it as if it won (an upper bound: fine unless right at the limit).
        let mut total: usize = self.peers().map(|p| p.connections.len()).sum();
        let mut replaced = BTreeSet::new();
        for info in update.iter().filter(|i| i.name != self.me.name) {
            if replaced.insert(info.name) {
                total -= self.others.get(&info.name).map_or(0, |old| old.connections.len());
            }
            total += info.connections.len();
        }
        if total > MAX_TOTAL_CONNECTIONS {
            return Err(MergeError::TooManyTotalConnections { count: total });
        }
        Ok(())
    }

    /// Everything I know, me first, then in breadth-first order along listed
    /// connections (the peers not reachable so, last): what a new connection is
    /// told. The order matters when it is split into several messages: every peer
    /// in a prefix is reachable through the prefix, so garbage collection at the
    /// receiver between two parts removes none of them.
    pub fn gossip_all(&self) -> Vec<PeerInfo> {
        let mut seen = BTreeSet::from([self.me.name]);
        let mut out = vec![self.me.clone()];
        let mut at = 0;
        while let Some(info) = out.get(at) {
            let next: Vec<&PeerInfo> = info
                .connections
                .iter()
                .filter(|c| seen.insert(c.peer))
                .filter_map(|c| self.others.get(&c.peer))
                .collect();
            out.extend(next.into_iter().cloned());
            at += 1;
        }
        out.extend(self.others.values().filter(|p| !seen.contains(&p.name)).cloned());
        out
    }

    /// The entries for `names` that I know (unknown names are skipped).
    pub fn gossip_about(&self, names: &[PeerName]) -> Vec<PeerInfo> {
        let wanted: BTreeSet<PeerName> = names.iter().copied().collect();
        wanted.into_iter().filter_map(|n| self.get(n).cloned()).collect()
    }

    /// Every signed entry I know, me first: what a new connection is told.
    /// Entries that came unsigned (only through [`merge`](Self::merge)) are left out.
    /// In [`gossip_all`](Self::gossip_all)'s order, so that split into parts each
    /// part is reachable through the ones before it.
    pub fn gossip_all_signed(&self) -> Vec<SignedPeerInfo> {
        self.gossip_all().iter().filter_map(|p| self.signed(p.name)).collect()
    }

    /// The signed entries for `names` that I know.
    pub fn gossip_about_signed(&self, names: &[PeerName]) -> Vec<SignedPeerInfo> {
        let wanted: BTreeSet<PeerName> = names.iter().copied().collect();
        wanted.into_iter().filter_map(|n| self.signed(n)).collect()
    }

    /// `name`'s entry with its seal, if I have both.
    pub fn signed(&self, name: PeerName) -> Option<SignedPeerInfo> {
        let (info, seal) = if name == self.me.name {
            (&self.me, self.my_seal.as_ref()?)
        } else {
            (self.others.get(&name)?, self.seals.get(&name)?)
        };
        Some(SignedPeerInfo { info: info.clone(), seal: seal.clone() })
    }

    /// Drops what I know about `name` (not me): after `rmpeer` removed its keys,
    /// its old entries are no longer believed. True if there was an entry.
    pub fn forget(&mut self, name: PeerName) -> bool {
        self.seals.remove(&name);
        name != self.me.name && self.others.remove(&name).is_some()
    }

    /// Every known peer, me first, then by name.
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        std::iter::once(&self.me).chain(self.others.values())
    }

    pub fn get(&self, name: PeerName) -> Option<&PeerInfo> {
        if name == self.me.name {
            Some(&self.me)
        } else {
            self.others.get(&name)
        }
    }

    /// Next hop for every reachable peer (not me).
    ///
    /// Shortest paths (BFS) over links that both ends list as established. Among
    /// equally short paths the next hop is the smallest `PeerName` that starts one,
    /// so every run over the same topology gives the same answer. One BFS over
    /// [`graph`](Self::graph): O(L log L) for L listed connections.
    pub fn routes(&self) -> HashMap<PeerName, PeerName> {
        self.graph().routes()
    }

    /// For every source peer (me included), the peers I pass its broadcasts on
    /// to: my children in its spanning tree. The tree is the BFS tree from the
    /// source in which each node's parent is the smallest-named neighbour one
    /// layer closer, so every peer computes the same trees from the same
    /// topology, and every peer gets each broadcast exactly once.
    /// [`Graph::tables`] computes it together with the routes.
    pub fn broadcast_children(&self) -> HashMap<PeerName, Vec<PeerName>> {
        self.graph().tables().children
    }

    /// For every source peer I can reach (not me), my parent in its spanning tree
    /// (same trees as [`broadcast_children`](Self::broadcast_children)): the only
    /// neighbour its broadcasts may come from. By the tie rule it is always the next
    /// hop of [`routes`](Self::routes) towards the source.
    pub fn broadcast_parents(&self) -> HashMap<PeerName, PeerName> {
        self.graph().tables().parents
    }

    /// The links routes and broadcast trees use (established, listed by both ends),
    /// in a compact form that can be computed on away from the topology (off a lock).
    pub fn graph(&self) -> Graph {
        let mut names: Vec<PeerName> = self.peers().map(|p| p.name).collect();
        names.sort_unstable();
        let index = |n: PeerName| names.binary_search(&n).ok().map(|i| i as u32);
        // What each peer lists, row by row in name order (sorted, no duplicates).
        let n = names.len();
        let mut out: Vec<u32> = Vec::new();
        let mut starts = vec![0usize; n + 1];
        for (i, &name) in names.iter().enumerate() {
            let from = out.len();
            let info = self.get(name).expect("a known peer");
            out.extend(
                info.connections.iter().filter(|c| c.established && c.peer != name).filter_map(|c| index(c.peer)),
            );
            out[from..].sort_unstable();
            let mut kept = from;
            for k in from..out.len() {
                if k == from || out[k] != out[kept - 1] {
                    out[kept] = out[k];
                    kept += 1;
                }
            }
            out.truncate(kept);
            starts[i + 1] = out.len();
        }
        // Who lists each peer (sorted, by a counting sort), then the links both
        // ends list: each row intersected with its reverse, merging two sorted lists.
        let mut rev_starts = vec![0usize; n + 1];
        for &j in &out {
            rev_starts[j as usize + 1] += 1;
        }
        for i in 0..n {
            rev_starts[i + 1] += rev_starts[i];
        }
        let mut fill = rev_starts.clone();
        let mut rev = vec![0u32; out.len()];
        for i in 0..n {
            for &j in &out[starts[i]..starts[i + 1]] {
                rev[fill[j as usize]] = i as u32;
                fill[j as usize] += 1;
            }
        }
        let mut offsets = vec![0u32; n + 1];
        let mut adj = Vec::with_capacity(out.len());
        for i in 0..n {
            let (mut a, mut b) = (
                out[starts[i]..starts[i + 1]].iter().peekable(),
                rev[rev_starts[i]..rev_starts[i + 1]].iter().peekable(),
            );
            while let (Some(&&x), Some(&&y)) = (a.peek(), b.peek()) {
                match x.cmp(&y) {
                    std::cmp::Ordering::Less => {
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        adj.push(x);
                        a.next();
                        b.next();
                    }
                }
            }
            offsets[i + 1] = adj.len() as u32;
        }
        let me = index(self.me.name).expect("me is a peer");
        Graph { names, me, offsets, adj }
    }

    /// For every peer I reach (not me): how many hops away it is and which of
    /// my neighbours are one hop closer to it, the first being my parent in
    /// its broadcast tree (the same parent [`broadcast_children`](Self::broadcast_children)
    /// picks: the smallest neighbour one layer closer to the source). What
    /// [`crate::ingress::admit`] checks a received frame's origin against.
    /// Computed with the trees, in [`Graph::tables`].
    pub fn upstream(&self) -> HashMap<PeerName, crate::ingress::Upstream> {
        self.graph().tables().upstream
    }

    /// Removes peers I can no longer reach by following listed connections (in
    /// either state) outwards from me. Returns the removed names, sorted.
    pub fn garbage_collect(&mut self) -> Vec<PeerName> {
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([self.me.name]);
        seen.insert(self.me.name);
        while let Some(name) = queue.pop_front() {
            let Some(info) = self.get(name) else { continue };
            for c in &info.connections {
                if seen.insert(c.peer) {
                    queue.push_back(c.peer);
                }
            }
        }
        let gone: Vec<PeerName> = self.others.keys().filter(|n| !seen.contains(n)).copied().collect();
        for n in &gone {
            self.others.remove(n);
            self.seals.remove(n);
        }
        gone
    }

    /// TCP addresses others report for peers I have no direct connection to, sorted
    /// and deduplicated. Addresses with port 0 or an unspecified IP are left out.
    pub fn discovery_candidates(&self) -> Vec<(PeerName, SocketAddr)> {
        let direct: BTreeSet<PeerName> = self.me.connections.iter().map(|c| c.peer).collect();
        let mut out = BTreeSet::new();
        for info in self.others.values() {
            for c in &info.connections {
                if c.peer == self.me.name || direct.contains(&c.peer) {
                    continue;
                }
                if c.addr.port() == 0 || c.addr.ip().is_unspecified() {
                    continue;
                }
                out.insert((c.peer, c.addr));
            }
        }
        out.into_iter().collect()
    }
}

/// The links routes and broadcast trees run over, from [`Topology::graph`]: peers
/// numbered in name order (so "smallest name" is "smallest number"), each with its
/// sorted neighbours (links both ends list as established).
#[derive(Clone, Debug)]
pub struct Graph {
    names: Vec<PeerName>,
    me: u32,
    /// Neighbours of peer `i`: `adj[offsets[i]..offsets[i + 1]]`, sorted.
    offsets: Vec<u32>,
    adj: Vec<u32>,
}

/// What the data plane needs, from [`Graph::tables`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTables {
    /// As [`Topology::routes`].
    pub next_hop: HashMap<PeerName, PeerName>,
    /// As [`Topology::broadcast_children`].
    pub children: HashMap<PeerName, Vec<PeerName>>,
    /// As [`Topology::broadcast_parents`].
    pub parents: HashMap<PeerName, PeerName>,
    /// As [`Topology::upstream`]: per reachable origin, its distance and my
    /// neighbours one hop closer to it (what the receive path checks frames against).
    pub upstream: crate::ingress::UpstreamMap,
}

const UNREACHED: u32 = u32::MAX;

impl Graph {
    fn neighbours(&self, i: u32) -> &[u32] {
        &self.adj[self.offsets[i as usize] as usize..self.offsets[i as usize + 1] as usize]
    }

    /// Whether `peer` is reachable from me over links other than a direct one
    /// between us (so dropping our connection would leave it reachable). False
    /// for an unknown peer.
    pub fn reachable_avoiding_direct(&self, peer: PeerName) -> bool {
        let Ok(target) = self.names.binary_search(&peer) else { return false };
        let target = target as u32;
        let mut seen = vec![false; self.names.len()];
        seen[self.me as usize] = true;
        let mut queue = VecDeque::from([self.me]);
        while let Some(u) = queue.pop_front() {
            for &v in self.neighbours(u) {
                if u == self.me && v == target {
                    continue;
                }
                if v == target {
                    return true;
                }
                if !seen[v as usize] {
                    seen[v as usize] = true;
                    queue.push_back(v);
                }
            }
        }
        false
    }

    /// How many peers and links (each counted once) it has.
    pub fn size(&self) -> (usize, usize) {
        (self.names.len(), self.adj.len() / 2)
    }

    /// Distance from me to every peer (UNREACHED if none), and the smallest
    /// neighbour of mine that starts a shortest path to it.
    fn bfs_from_me(&self) -> (Vec<u32>, Vec<u32>) {
        let n = self.names.len();
        let (mut dist, mut hop) = (vec![UNREACHED; n], vec![UNREACHED; n]);
        dist[self.me as usize] = 0;
        let mut queue = VecDeque::from([self.me]);
        while let Some(u) = queue.pop_front() {
            for &v in self.neighbours(u) {
                let h = if u == self.me { v } else { hop[u as usize] };
                if dist[v as usize] == UNREACHED {
                    dist[v as usize] = dist[u as usize] + 1;
                    hop[v as usize] = h;
                    queue.push_back(v);
                } else if dist[v as usize] == dist[u as usize] + 1 {
                    // Every node of the layer before is dequeued before v is.
                    hop[v as usize] = hop[v as usize].min(h);
                }
            }
        }
        (dist, hop)
    }

    /// Next hop for every reachable peer (not me): one BFS, O(peers + links).
    pub fn routes(&self) -> HashMap<PeerName, PeerName> {
        let (_, hop) = self.bfs_from_me();
        hop.iter()
            .enumerate()
            .filter(|&(_, &h)| h != UNREACHED)
            .map(|(v, &h)| (self.names[v], self.names[h as usize]))
            .collect()
    }

    /// Routes, and my children and parent in every source's broadcast tree.
    ///
    /// In source s's tree, with d = dist(s, me), a neighbour v of mine is my child
    /// iff dist(s, v) = d + 1 and no neighbour u of v smaller than me has
    /// dist(s, u) = d; my parent is my smallest neighbour at d - 1 (the next hop
    /// towards s). So only distances from me, my neighbours and their neighbours
    /// smaller than me (the set X) matter, and links are undirected, so these come
    /// from BFS runs *from X* rather than from every source: 64 of them at a time,
    /// one bit each (multi-source BFS). Every peer of X is within two hops of me, so
    /// a peer is reached in at most 5 different layers of one batch: each batch
    /// costs O(peers + links), and the whole is O(|X| / 64 · (peers + links)).
    pub fn tables(&self) -> RouteTables {
        let n = self.names.len();
        let me = self.me;
        let (dme, hop) = self.bfs_from_me();
        let mine = self.neighbours(me);
        // Position of each of my neighbours in `mine`.
        let mut pos = vec![UNREACHED; n];
        for (p, &v) in mine.iter().enumerate() {
            pos[v as usize] = p as u32;
        }
        // X minus me: my neighbours, then their neighbours smaller than me.
        let mut in_x = vec![false; n];
        in_x[me as usize] = true;
        let mut xs: Vec<u32> = Vec::new();
        for &v in mine {
            in_x[v as usize] = true;
            xs.push(v);
        }
        for &v in mine {
            for &u in self.neighbours(v).iter().take_while(|&&u| u < me) {
                if !in_x[u as usize] {
                    in_x[u as usize] = true;
                    xs.push(u);
                }
            }
        }
        // Per neighbour of mine: sources for which dist(s, v) = d + 1 (a candidate
        // child), and for which a neighbour of v smaller than me is at d (then
        // that one, not me, is v's parent). Bitsets over sources.
        let words = n.div_ceil(64);
        let mut candidate = vec![0u64; mine.len() * words];
        let mut blocked = vec![0u64; mine.len() * words];
        // Per neighbour of mine: sources for which dist(s, v) = d - 1 (v is one
        // hop closer to s than me).
        let mut closer = vec![0u64; mine.len() * words];
        let mut seen = vec![0u64; n];
        let mut frontier = vec![0u64; n];
        let mut next = vec![0u64; n];
        // Per peer: lanes whose distance to it is d (eq), d + 1 (plus), d - 1 (minus).
        let mut eq = vec![0u64; n];
        let mut plus = vec![0u64; n];
        let mut minus = vec![0u64; n];
        let mut bits = vec![0u64; words];
        for batch in xs.chunks(64) {
            seen.iter_mut().for_each(|w| *w = 0);
            eq.iter_mut().for_each(|w| *w = 0);
            plus.iter_mut().for_each(|w| *w = 0);
            minus.iter_mut().for_each(|w| *w = 0);
            let mut active: Vec<u32> = Vec::new();
            for (b, &x) in batch.iter().enumerate() {
                seen[x as usize] |= 1 << b;
                if frontier[x as usize] == 0 {
                    active.push(x);
                }
                frontier[x as usize] |= 1 << b;
            }
            let record = |w: u32, lanes: u64, layer: u32, eq: &mut [u64], plus: &mut [u64], minus: &mut [u64]| {
                let d = dme[w as usize];
                if layer == d {
                    eq[w as usize] |= lanes;
                } else if d != UNREACHED && layer == d + 1 {
                    plus[w as usize] |= lanes;
                } else if d != UNREACHED && layer + 1 == d {
                    minus[w as usize] |= lanes;
                }
            };
            for &x in &active {
                record(x, frontier[x as usize], 0, &mut eq, &mut plus, &mut minus);
            }
            let mut layer = 0;
            let mut touched: Vec<u32> = Vec::new();
            while !active.is_empty() {
                layer += 1;
                for &u in &active {
                    let f = frontier[u as usize];
                    frontier[u as usize] = 0;
                    for &w in self.neighbours(u) {
                        let add = f & !seen[w as usize];
                        if add != 0 {
                            if next[w as usize] == 0 {
                                touched.push(w);
                            }
                            next[w as usize] |= add;
                        }
                    }
                }
                active.clear();
                for &w in &touched {
                    let newly = std::mem::take(&mut next[w as usize]) & !seen[w as usize];
                    seen[w as usize] |= newly;
                    frontier[w as usize] = newly;
                    active.push(w);
                    record(w, newly, layer, &mut eq, &mut plus, &mut minus);
                }
                touched.clear();
            }
            // Transpose: for each lane, the sources at d (or d + 1) from it.
            for (b, &x) in batch.iter().enumerate() {
                let near = pos[x as usize] != UNREACHED;
                let small = x < me;
                if !near && !small {
                    continue;
                }
                if near {
                    bits.iter_mut().for_each(|w| *w = 0);
                    for (s, &p) in plus.iter().enumerate() {
                        if p >> b & 1 != 0 {
                            bits[s / 64] |= 1 << (s % 64);
                        }
                    }
                    let p = pos[x as usize] as usize;
                    candidate[p * words..(p + 1) * words].copy_from_slice(&bits);
                    bits.iter_mut().for_each(|w| *w = 0);
                    for (s, &m) in minus.iter().enumerate() {
                        if m >> b & 1 != 0 {
                            bits[s / 64] |= 1 << (s % 64);
                        }
                    }
                    closer[p * words..(p + 1) * words].copy_from_slice(&bits);
                }
                if small {
                    bits.iter_mut().for_each(|w| *w = 0);
                    for (s, &e) in eq.iter().enumerate() {
                        if e >> b & 1 != 0 {
                            bits[s / 64] |= 1 << (s % 64);
                        }
                    }
                    for &v in self.neighbours(x) {
                        let p = pos[v as usize];
                        if p != UNREACHED {
                            let p = p as usize;
                            for (blk, bit) in blocked[p * words..(p + 1) * words].iter_mut().zip(bits.iter()) {
                                *blk |= bit;
                            }
                        }
                    }
                }
            }
        }
        let mut out = RouteTables::default();
        for s in 0..n {
            if dme[s] == UNREACHED {
                continue;
            }
            let name = self.names[s];
            if s as u32 != me {
                let h = self.names[hop[s] as usize];
                out.next_hop.insert(name, h);
                out.parents.insert(name, h);
            }
            let (word, bit) = (s / 64, 1u64 << (s % 64));
            let kids: Vec<PeerName> = (0..mine.len())
                .filter(|&p| candidate[p * words + word] & bit != 0 && blocked[p * words + word] & bit == 0)
                .map(|p| self.names[mine[p] as usize])
                .collect();
            if !kids.is_empty() {
                out.children.insert(name, kids);
            }
            if s as u32 != me {
                // `mine` is sorted by name, so `via` is too.
                let via: Vec<PeerName> = (0..mine.len())
                    .filter(|&p| closer[p * words + word] & bit != 0)
                    .map(|p| self.names[mine[p] as usize])
                    .collect();
                out.upstream.insert(name, crate::ingress::Upstream { hops: dme[s], via });
            }
        }
        out
    }
}

/// How many neighbours get my full topology at each periodic (anti-entropy)
/// round in a mesh of `peers` peers: about 2·log₂ n, as in Weave, never fewer
/// than 2. The same number of neighbours get each change a router passes on
/// (our own entry goes to every neighbour); a new connection is told everything.
pub fn full_gossip_fanout(peers: usize) -> usize {
    let log2 = usize::BITS - peers.max(1).leading_zeros(); // ⌈log₂(n + 1)⌉
    (2 * log2 as usize).max(2)
}

/// Which of `neighbours` (indices) get the periodic full gossip: a random
/// [`full_gossip_fanout`]-sized subset (all if there are no more), chosen with
/// the randomness `seed` passed in. Sorted.
pub fn full_gossip_targets(neighbours: usize, peers: usize, seed: u64) -> Vec<usize> {
    let k = full_gossip_fanout(peers).min(neighbours);
    let mut idx: Vec<usize> = (0..neighbours).collect();
    let mut state = seed;
    for i in 0..k {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let j = i + (z % (neighbours - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Which of my `neighbours` (their names, in the caller's order; returned as
/// sorted indices) an entry that was news to me is passed on to, heard from
/// neighbour `from`: not `from`, not the entry's owner, and none the entry lists
/// as the owner's connections (the owner sends its own entry to each of them
/// itself), then a random [`full_gossip_fanout`]-sized subset of the rest
/// (Weave's `GossipNeighbourSubset`). In a full mesh nobody passes anything on;
/// in a chain each hop passes it to the next.
pub fn relay_targets(entry: &PeerInfo, from: PeerName, neighbours: &[PeerName], peers: usize, seed: u64) -> Vec<usize> {
    let adjacent: HashSet<PeerName> = entry.connections.iter().map(|c| c.peer).collect();
    let open: Vec<usize> = (0..neighbours.len())
        .filter(|&i| {
            let n = neighbours[i];
            n != from && n != entry.name && !adjacent.contains(&n)
        })
        .collect();
    let mut chosen: Vec<usize> = full_gossip_targets(open.len(), peers, seed).into_iter().map(|i| open[i]).collect();
    chosen.sort_unstable();
    chosen
}

fn normalise(mut conns: Vec<ConnInfo>) -> Vec<ConnInfo> {
    conns.sort();
    conns.dedup();
    conns
}

/// Whether a peer's nickname or software string is free of control characters:
/// every router prints them line by line (`status`, `report`, logs), so an
/// entry with a newline or an escape sequence in them is malformed.
pub fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn truncate_text(s: &mut String) {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn news_is_passed_on_only_to_neighbours_the_owner_does_not_reach() {
        let conn = |p: u64| ConnInfo { peer: PeerName(p), addr: "10.0.0.1:6783".parse().unwrap(), outbound: true, established: true };
        let entry = |owner: u64, conns: &[u64]| PeerInfo {
            name: PeerName(owner),
            nickname: String::new(),
            uid: 1,
            version: 2,
            software: String::new(),
            mtu: 1400,
            connections: conns.iter().map(|&p| conn(p)).collect(),
        };
        // Full mesh of 1..=5, I am 1: the owner 2 reached everyone itself.
        let full = entry(2, &[1, 3, 4, 5]);
        let mine: Vec<PeerName> = [2, 3, 4, 5].map(PeerName).to_vec();
        assert!(relay_targets(&full, PeerName(2), &mine, 5, 7).is_empty());
        // Heard from 3 (relayed): still nobody, 2 reaches the others itself.
        assert!(relay_targets(&full, PeerName(3), &mine, 5, 7).is_empty());
        // Chain 2 - 1 - 3: the next hop gets it.
        let chain = entry(2, &[1]);
        let mine: Vec<PeerName> = [2, 3].map(PeerName).to_vec();
        assert_eq!(relay_targets(&chain, PeerName(2), &mine, 3, 7), vec![1]);
        // A hub with 200 neighbours the owner does not reach: about 2·log2 n of them.
        let star = entry(2, &[1]);
        let mine: Vec<PeerName> = (2..202).map(PeerName).collect();
        let chosen = relay_targets(&star, PeerName(2), &mine, 202, 7);
        assert_eq!(chosen.len(), full_gossip_fanout(202));
        assert!(chosen.iter().all(|&i| mine[i] != PeerName(2)));
        assert!(chosen.windows(2).all(|w| w[0] < w[1]));
    }

    use super::*;

    fn name(n: u64) -> PeerName {
        PeerName(0x0200_0000_0000 | n)
    }

    fn addr(n: u64) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n as u8], 6783))
    }

    fn info(n: u64, version: u64, conns: &[(u64, bool)]) -> PeerInfo {
        PeerInfo {
            name: name(n),
            nickname: format!("host{n}"),
            uid: n * 1000,
            version,
            software: "meshnet test".into(),
            mtu: 1376,
            connections: conns
                .iter()
                .map(|&(p, established)| ConnInfo { peer: name(p), addr: addr(p), outbound: n < p, established })
                .collect(),
        }
    }

    /// A topology seen from peer 1, where every listed link is established.
    fn mesh(edges: &[(u64, u64)], nodes: u64) -> Topology {
        let conns = |n: u64| -> Vec<(u64, bool)> {
            edges
                .iter()
                .filter_map(|&(a, b)| {
                    if a == n {
                        Some((b, true))
                    } else if b == n {
                        Some((a, true))
                    } else {
                        None
                    }
                })
                .collect()
        };
        let mut t = Topology::new(info(1, 1, &conns(1)));
        t.merge((2..=nodes).map(|n| info(n, 1, &conns(n))).collect()).unwrap();
        t
    }

    #[test]
    fn local_changes_bump_version_only_when_different() {
        let mut t = Topology::new(info(1, 1, &[]));
        let c = info(1, 1, &[(2, true), (3, false)]).connections;
        assert!(t.set_local_connections(c.clone()));
        assert_eq!(t.me().version, 2);
        let mut reordered = c.clone();
        reordered.reverse();
        reordered.push(c[0].clone());
        assert!(!t.set_local_connections(reordered));
        assert_eq!(t.me().version, 2);
        assert!(t.set_local_nickname("renamed"));
        assert!(!t.set_local_nickname("renamed"));
        assert_eq!(t.me().version, 3);
    }

    #[test]
    fn newer_wins_older_ignored() {
        let mut t = Topology::new(info(1, 1, &[]));
        assert_eq!(t.merge(vec![info(2, 5, &[])]).unwrap(), vec![name(2)]);
        assert_eq!(t.merge(vec![info(2, 4, &[(3, true)])]).unwrap(), vec![]);
        assert_eq!(t.get(name(2)).unwrap().version, 5);
        assert_eq!(t.merge(vec![info(2, 5, &[(3, true)])]).unwrap(), vec![], "same version, same uid: first wins");
        assert_eq!(t.merge(vec![info(2, 6, &[(3, true)])]).unwrap(), vec![name(2)]);
        assert_eq!(t.get(name(2)).unwrap().connections.len(), 1);
    }

    #[test]
    fn restarted_peer_with_new_uid_wins_at_equal_version_deterministically() {
        let mut t = Topology::new(info(1, 1, &[]));
        t.merge(vec![info(2, 3, &[])]).unwrap();
        let mut restarted = info(2, 3, &[(1, true)]);
        restarted.uid = 999_999;
        assert_eq!(t.merge(vec![restarted.clone()]).unwrap(), vec![name(2)]);
        assert_eq!(t.get(name(2)).unwrap().uid, 999_999);
        // The lower uid at the same version does not flip it back.
        assert_eq!(t.merge(vec![info(2, 3, &[])]).unwrap(), vec![]);
        // A newer version of any incarnation wins.
        let mut old_uid_newer = info(2, 4, &[]);
        old_uid_newer.uid = 1;
        assert_eq!(t.merge(vec![old_uid_newer]).unwrap(), vec![name(2)]);
    }

    #[test]
    fn gossip_about_me_never_overwrites_me_but_bumps_my_version() {
        let mut t = Topology::new(info(1, 2, &[(2, true)]));
        let me_before = t.me().clone();
        // An older copy of me: ignored.
        assert_eq!(t.merge(vec![info(1, 1, &[])]).unwrap(), vec![]);
        // An identical copy of me: ignored.
        assert_eq!(t.merge(vec![me_before.clone()]).unwrap(), vec![]);
        // My previous incarnation, far ahead: my version jumps above it, contents stay mine.
        let mut previous = info(1, 40, &[(7, true)]);
        previous.uid = 5;
        assert_eq!(t.merge(vec![previous]).unwrap(), vec![name(1)]);
        assert_eq!(t.me().version, 41);
        assert_eq!(t.me().connections, me_before.connections);
        assert_eq!(t.me().uid, me_before.uid);
        // Same version but different contents: bump again.
        let mut forged = t.me().clone();
        forged.nickname = "impostor".into();
        assert_eq!(t.merge(vec![forged]).unwrap(), vec![name(1)]);
        assert_eq!(t.me().version, 42);
        assert_eq!(t.me().nickname, "host1");
    }

    #[test]
    fn bounds_refuse_whole_update() {
        let mut t = Topology::new(info(1, 1, &[]));
        let mut too_many_conns = info(3, 1, &[]);
        too_many_conns.connections = (0..=MAX_CONNECTIONS as u64)
            .map(|i| ConnInfo { peer: name(10 + i), addr: addr(1), outbound: true, established: true })
            .collect();
        let err = t.merge(vec![info(2, 1, &[]), too_many_conns]).unwrap_err();
        assert_eq!(err, MergeError::TooManyConnections { peer: name(3), count: MAX_CONNECTIONS + 1 });
        assert!(t.get(name(2)).is_none(), "nothing applied");

        let many: Vec<PeerInfo> = (2..(MAX_PEERS as u64 + 1)).map(|n| info(n, 1, &[])).collect();
        assert_eq!(many.len(), MAX_PEERS - 1);
        t.merge(many).unwrap();
        assert_eq!(t.peers().count(), MAX_PEERS);
        // Updating known peers is fine at the limit; one more name is not.
        t.merge(vec![info(2, 2, &[])]).unwrap();
        let err = t.merge(vec![info(2, 3, &[]), info(MAX_PEERS as u64 + 5, 1, &[])]).unwrap_err();
        assert_eq!(err, MergeError::TooManyPeers { count: MAX_PEERS + 1 });
        assert_eq!(t.get(name(2)).unwrap().version, 2, "nothing applied");

        let big: Vec<PeerInfo> = (0..=MAX_PEERS as u64).map(|n| info(n + 20_000, 1, &[])).collect();
        assert!(matches!(t.merge(big), Err(MergeError::TooManyPeers { .. })));

        let mut long = info(4, 1, &[]);
        long.nickname = "x".repeat(MAX_TEXT + 1);
        let mut t = Topology::new(info(1, 1, &[]));
        assert_eq!(t.merge(vec![long]), Err(MergeError::TextTooLong { peer: name(4) }));
        let mut tab = info(4, 1, &[]);
        tab.software = "meshnet\t1.0".into();
        assert_eq!(t.merge(vec![tab]), Err(MergeError::ControlCharacter { peer: name(4) }));
        assert!(t.get(name(4)).is_none(), "nothing applied");
        // My own entry never carries one (others would refuse it).
        let mut me = info(1, 1, &[]);
        me.nickname = "two\nlines".into();
        assert_eq!(Topology::new(me).me().nickname, "two?lines");
        let mut broadcast = info(5, 1, &[]);
        broadcast.name = PeerName::BROADCAST;
        assert_eq!(t.merge(vec![broadcast]), Err(MergeError::BroadcastName));
        let mut to_broadcast = info(5, 1, &[(6, true)]);
        to_broadcast.connections[0].peer = PeerName::BROADCAST;
        assert_eq!(t.merge(vec![to_broadcast]), Err(MergeError::BroadcastName));
    }

    #[test]
    fn my_overlong_text_is_cut_on_a_char_boundary() {
        let mut me = info(1, 1, &[]);
        me.nickname = "é".repeat(MAX_TEXT);
        let t = Topology::new(me.clone());
        assert!(t.me().nickname.len() <= MAX_TEXT);
        me = t.me().clone();
        me.name = name(9);
        // Another peer accepts it.
        Topology::new(info(2, 1, &[])).merge(vec![me]).unwrap();
    }

    /// The topology as peer `me` sees it, every listed link established.
    fn view(me: u64, edges: &[(u64, u64)], nodes: u64) -> Topology {
        let conns = |n: u64| -> Vec<(u64, bool)> {
            edges
                .iter()
                .filter_map(|&(a, b)| if a == n { Some((b, true)) } else if b == n { Some((a, true)) } else { None })
                .collect()
        };
        let mut t = Topology::new(info(me, 1, &conns(me)));
        t.merge((1..=nodes).filter(|&n| n != me).map(|n| info(n, 1, &conns(n))).collect()).unwrap();
        t
    }

    #[test]
    fn broadcast_trees_reach_every_peer_exactly_once() {
        let full4: Vec<(u64, u64)> = vec![(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)];
        let chain: Vec<(u64, u64)> = vec![(1, 2), (2, 3), (3, 4), (4, 5)];
        let ring6: Vec<(u64, u64)> = vec![(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 1)];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random: Vec<(u64, u64)> = (2..=12).map(|n| (n - 1, n)).collect(); // connected
        for _ in 0..15 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let (a, b) = (seed % 12 + 1, (seed >> 20) % 12 + 1);
            if a != b && !random.contains(&(a, b)) && !random.contains(&(b, a)) {
                random.push((a, b));
            }
        }
        for (edges, nodes) in [(full4, 4u64), (chain, 5), (ring6, 6), (random, 12)] {
            let views: Vec<Topology> = (1..=nodes).map(|me| view(me, &edges, nodes)).collect();
            let children: Vec<HashMap<PeerName, Vec<PeerName>>> = views.iter().map(|v| v.broadcast_children()).collect();
            for source in 1..=nodes {
                let mut got = vec![0u32; nodes as usize + 1];
                let mut queue = VecDeque::from([source]);
                while let Some(at) = queue.pop_front() {
                    for c in children[at as usize - 1].get(&name(source)).into_iter().flatten() {
                        let n = c.0 & 0xff;
                        got[n as usize] += 1;
                        queue.push_back(n);
                    }
                }
                for n in 1..=nodes {
                    let want = if n == source { 0 } else { 1 };
                    assert_eq!(got[n as usize], want, "source {source}, peer {n}, edges {edges:?}");
                }
            }
        }
    }

    #[test]
    fn full_mesh_broadcast_goes_straight_to_everyone() {
        let t = view(1, &[(1, 2), (1, 3), (2, 3)], 3);
        let c = t.broadcast_children();
        assert_eq!(c[&name(1)], vec![name(2), name(3)]);
        assert!(!c.contains_key(&name(2)) && !c.contains_key(&name(3)), "{c:?}");
    }

    /// The implementation before [`Graph`] (per-source BFS over sorted neighbour
    /// lists, O(N²·C²)): the reference the fast one must agree with.
    mod reference {
        use super::*;

        fn symmetric_neighbours(t: &Topology, name: PeerName) -> Vec<PeerName> {
            let lists = |a: &PeerInfo, b: PeerName| a.connections.iter().any(|c| c.peer == b && c.established);
            let Some(info) = t.get(name) else { return Vec::new() };
            let mut out: Vec<PeerName> = info
                .connections
                .iter()
                .filter(|c| c.established && c.peer != name)
                .map(|c| c.peer)
                .filter(|&other| t.get(other).is_some_and(|o| lists(o, name)))
                .collect();
            out.sort();
            out.dedup();
            out
        }

        /// One BFS from me and one from each neighbour, O(degree × (peers + links)).
        pub fn upstream(t: &Topology) -> HashMap<PeerName, crate::ingress::Upstream> {
            let hop_counts = |start: PeerName| {
                let mut dist = HashMap::from([(start, 0u32)]);
                let mut queue = VecDeque::from([start]);
                while let Some(u) = queue.pop_front() {
                    let d = dist[&u];
                    for v in symmetric_neighbours(t, u) {
                        dist.entry(v).or_insert_with(|| {
                            queue.push_back(v);
                            d + 1
                        });
                    }
                }
                dist
            };
            let me = t.me.name;
            let mine = hop_counts(me);
            let neighbours: Vec<(PeerName, HashMap<PeerName, u32>)> =
                symmetric_neighbours(t, me).into_iter().map(|n| (n, hop_counts(n))).collect();
            let mut out = HashMap::new();
            for (&origin, &hops) in &mine {
                if origin == me {
                    continue;
                }
                let via: Vec<PeerName> = neighbours
                    .iter()
                    .filter(|(_, d)| d.get(&origin).is_some_and(|&k| k + 1 == hops))
                    .map(|(n, _)| *n)
                    .collect();
                out.insert(origin, crate::ingress::Upstream { hops, via });
            }
            out
        }

        pub fn routes(t: &Topology) -> HashMap<PeerName, PeerName> {
            let neighbours = |name: PeerName| symmetric_neighbours(t, name);
            let mut hops: HashMap<PeerName, PeerName> = HashMap::new();
            let mut layer: Vec<PeerName> = neighbours(t.me.name).into_iter().filter(|&n| n != t.me.name).collect();
            for &n in &layer {
                hops.insert(n, n);
            }
            while !layer.is_empty() {
                let mut next: BTreeMap<PeerName, PeerName> = BTreeMap::new();
                for &u in &layer {
                    let hop = hops[&u];
                    for v in neighbours(u) {
                        if v == t.me.name || hops.contains_key(&v) {
                            continue;
                        }
                        next.entry(v).and_modify(|h| *h = (*h).min(hop)).or_insert(hop);
                    }
                }
                layer = next.keys().copied().collect();
                hops.extend(next);
            }
            hops
        }

        /// Children and (new) parents: per source, a BFS tree with the smallest parent.
        pub fn trees(t: &Topology) -> (HashMap<PeerName, Vec<PeerName>>, HashMap<PeerName, PeerName>) {
            let me = t.me.name;
            let (mut children, mut parents) = (HashMap::new(), HashMap::new());
            for source in t.peers().map(|p| p.name) {
                let mut seen: BTreeSet<PeerName> = BTreeSet::from([source]);
                let mut layer = vec![source];
                let mut mine = Vec::new();
                while !layer.is_empty() {
                    let mut next: BTreeMap<PeerName, PeerName> = BTreeMap::new();
                    for &u in &layer {
                        for v in symmetric_neighbours(t, u) {
                            if !seen.contains(&v) {
                                next.entry(v).and_modify(|p| *p = (*p).min(u)).or_insert(u);
                            }
                        }
                    }
                    for (&v, &parent) in &next {
                        seen.insert(v);
                        if parent == me {
                            mine.push(v);
                        }
                        if v == me {
                            parents.insert(source, parent);
                        }
                    }
                    layer = next.into_keys().collect();
                }
                if !mine.is_empty() {
                    children.insert(source, mine);
                }
            }
            (children, parents)
        }
    }

    /// Random graphs with asymmetric, unestablished, duplicate and dangling links,
    /// seen from every peer: the one-pass tables equal the reference, per source.
    #[test]
    fn tables_agree_with_the_reference_on_random_graphs() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            let nodes = 2 + rnd(if round < 250 { 14 } else { 60 });
            let density = 1 + rnd(6);
            let mut conns: Vec<Vec<(u64, bool)>> = vec![Vec::new(); nodes as usize + 1];
            for a in 1..=nodes {
                for b in 1..=nodes {
                    if a < b && rnd(nodes) < density {
                        // Usually both ends, established; sometimes one end, or pending.
                        let est = rnd(10) != 0;
                        conns[a as usize].push((b, est));
                        if rnd(12) != 0 {
                            conns[b as usize].push((a, if rnd(10) != 0 { true } else { est }));
                        }
                    }
                }
                if rnd(20) == 0 {
                    conns[a as usize].push((nodes + 5, true)); // unknown peer
                }
                if rnd(20) == 0 {
                    conns[a as usize].push((a, true)); // itself
                }
                if let (0, Some(&c)) = (rnd(10), conns[a as usize].first()) {
                    conns[a as usize].push(c); // twice
                }
            }
            for me in 1..=nodes {
                let mut t = Topology::new(info(me, 1, &conns[me as usize]));
                t.merge((1..=nodes).filter(|&n| n != me).map(|n| info(n, 1, &conns[n as usize])).collect()).unwrap();
                let tables = t.graph().tables();
                let (children, parents) = reference::trees(&t);
                assert_eq!(tables.next_hop, reference::routes(&t), "round {round}, me {me}, {conns:?}");
                assert_eq!(t.routes(), tables.next_hop);
                assert_eq!(tables.children, children, "round {round}, me {me}, {conns:?}");
                assert_eq!(tables.parents, parents, "round {round}, me {me}, {conns:?}");
                assert_eq!(tables.upstream, reference::upstream(&t), "round {round}, me {me}, {conns:?}");
            }
        }
    }

    #[test]
    fn total_connections_are_bounded() {
        let mut t = Topology::new(info(1, 1, &[]));
        let per = MAX_CONNECTIONS as u64;
        let peers = (MAX_TOTAL_CONNECTIONS as u64 / per) as usize;
        let big = |n: u64, version: u64| {
            let mut p = info(n, version, &[]);
            p.connections = (0..per)
                .map(|i| ConnInfo { peer: name(100_000 + i), addr: addr(1), outbound: true, established: true })
                .collect();
            p
        };
        t.merge((0..peers as u64).map(|n| big(n + 2, 1)).collect()).unwrap();
        // Replacing entries with equally large ones is fine; adding more is not.
        t.merge(vec![big(2, 2)]).unwrap();
        let err = t.merge(vec![big(2, 3), big(peers as u64 + 10, 1)]).unwrap_err();
        assert!(matches!(err, MergeError::TooManyTotalConnections { .. }), "{err:?}");
        assert_eq!(t.get(name(2)).unwrap().version, 2, "nothing applied");
    }

    #[test]
    fn full_gossip_goes_to_about_two_log2_n_random_neighbours() {
        assert_eq!(full_gossip_fanout(1), 2);
        assert_eq!(full_gossip_fanout(3), 4);
        assert_eq!(full_gossip_fanout(100), 14);
        assert_eq!(full_gossip_fanout(1000), 20);
        // Few neighbours: all of them.
        assert_eq!(full_gossip_targets(3, 100, 42), vec![0, 1, 2]);
        assert_eq!(full_gossip_targets(0, 100, 42), Vec::<usize>::new());
        // Many: 14 distinct ones, different with different randomness, and over many
        // rounds every neighbour is picked about equally often.
        let mut counts = vec![0u32; 99];
        for seed in 0..2000u64 {
            let t = full_gossip_targets(99, 100, seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            assert_eq!(t.len(), 14);
            assert!(t.windows(2).all(|w| w[0] < w[1]) && t[13] < 99);
            for i in t {
                counts[i] += 1;
            }
        }
        assert_ne!(full_gossip_targets(99, 100, 1), full_gossip_targets(99, 100, 2));
        // Expected 2000 * 14 / 99 = 283 each.
        assert!(counts.iter().all(|&c| (200..370).contains(&c)), "{counts:?}");
    }

    #[test]
    fn routes_on_a_chain() {
        let t = mesh(&[(1, 2), (2, 3), (3, 4)], 4);
        let r = t.routes();
        assert_eq!(r.len(), 3);
        assert_eq!(r[&name(2)], name(2));
        assert_eq!(r[&name(3)], name(2));
        assert_eq!(r[&name(4)], name(2));
    }

    #[test]
    fn routes_on_a_triangle_are_direct() {
        let t = mesh(&[(1, 2), (2, 3), (1, 3)], 3);
        let r = t.routes();
        assert_eq!(r[&name(2)], name(2));
        assert_eq!(r[&name(3)], name(3));
    }

    #[test]
    fn equal_paths_pick_the_smallest_first_hop() {
        // 1 - 3 - 4 and 1 - 2 - 4: both two hops; 2 < 3.
        let t = mesh(&[(1, 3), (3, 4), (1, 2), (2, 4)], 4);
        assert_eq!(t.routes()[&name(4)], name(2));
        // Same topology, edges listed in another order: same answer.
        let t = mesh(&[(2, 4), (1, 2), (3, 4), (1, 3)], 4);
        assert_eq!(t.routes()[&name(4)], name(2));
    }

    #[test]
    fn asymmetric_or_unestablished_links_carry_no_routes() {
        // 1 lists 2; 2 lists 3 but 3 does not list 2.
        let mut t = Topology::new(info(1, 1, &[(2, true)]));
        t.merge(vec![info(2, 1, &[(1, true), (3, true)]), info(3, 1, &[])]).unwrap();
        let r = t.routes();
        assert_eq!(r.get(&name(2)), Some(&name(2)));
        assert_eq!(r.get(&name(3)), None);
        // 3 lists 2 but only as not yet established.
        t.merge(vec![info(3, 2, &[(2, false)])]).unwrap();
        assert_eq!(t.routes().get(&name(3)), None);
        t.merge(vec![info(3, 3, &[(2, true)])]).unwrap();
        assert_eq!(t.routes().get(&name(3)), Some(&name(2)));
        // A peer listing me when I do not list it gets no route.
        t.merge(vec![info(4, 1, &[(1, true)])]).unwrap();
        assert_eq!(t.routes().get(&name(4)), None);
    }

    #[test]
    fn garbage_collect_drops_unreachable_peers() {
        let mut t = Topology::new(info(1, 1, &[(2, true)]));
        t.merge(vec![
            info(2, 1, &[(1, true), (3, false)]),
            info(3, 1, &[(2, false)]),
            info(5, 1, &[(6, true)]),
            info(6, 1, &[(5, true), (1, true)]),
        ])
        .unwrap();
        assert_eq!(t.garbage_collect(), vec![name(5), name(6)]);
        assert!(t.get(name(3)).is_some(), "reachable over an unestablished link");
        // 2 drops its link to 3: 3 goes too.
        t.merge(vec![info(2, 2, &[(1, true)])]).unwrap();
        assert_eq!(t.garbage_collect(), vec![name(3)]);
        assert_eq!(t.garbage_collect(), vec![]);
        assert_eq!(t.peers().map(|p| p.name).collect::<Vec<_>>(), vec![name(1), name(2)]);
    }

    #[test]
    fn discovery_offers_peers_i_am_not_connected_to() {
        let mut t = Topology::new(info(1, 1, &[(2, true)]));
        let mut two = info(2, 1, &[(1, true), (3, true), (4, false)]);
        two.connections.push(ConnInfo {
            peer: name(5),
            addr: "0.0.0.0:6783".parse().unwrap(),
            outbound: false,
            established: true,
        });
        two.connections.push(ConnInfo {
            peer: name(6),
            addr: "10.0.0.6:0".parse().unwrap(),
            outbound: false,
            established: true,
        });
        t.merge(vec![two, info(3, 1, &[(2, true), (4, true)])]).unwrap();
        assert_eq!(t.discovery_candidates(), vec![(name(3), addr(3)), (name(4), addr(4))]);
        t.set_local_connections(info(1, 1, &[(2, true), (3, false)]).connections);
        assert_eq!(t.discovery_candidates(), vec![(name(4), addr(4))]);
    }

    struct Owner {
        id: crate::identity::Identity,
        signer: Arc<Signer>,
        binding: Binding,
    }

    fn owner(seed: u8) -> Owner {
        let id = crate::identity::Identity::from_private([seed; 32]).unwrap();
        let signer = Arc::new(Signer::from_identity(&id));
        let binding = Binding::new(id.name(), &id, &signer);
        Owner { id, signer, binding }
    }

    /// An entry of `o` (named by its key) at `version`, listing links to `links`.
    fn entry(o: &Owner, version: u64, links: &[&Owner]) -> PeerInfo {
        PeerInfo {
            name: o.id.name(),
            nickname: "n".into(),
            uid: 7,
            version,
            software: "meshnet test".into(),
            mtu: 1376,
            connections: links
                .iter()
                .map(|l| ConnInfo { peer: l.id.name(), addr: addr(1), outbound: true, established: true })
                .collect(),
        }
    }

    fn sealed(info: PeerInfo, by: &Owner) -> SignedPeerInfo {
        SignedPeerInfo { seal: Seal::sign(&info, &by.signer, &by.binding), info }
    }

    #[test]
    fn signed_merge_drops_forged_entries_and_applies_the_rest() {
        let (a, b, c, m) = (owner(1), owner(2), owner(3), owner(4));
        let mut book = KeyBook::new();
        book.admit(&a.binding).unwrap();
        let mut t = Topology::with_signer(entry(&a, 1, &[&b]), a.signer.clone(), a.binding.clone());
        let r = t.merge_signed(vec![sealed(entry(&b, 3, &[&a, &c]), &b), sealed(entry(&c, 1, &[&b]), &c)], &mut book).unwrap();
        assert_eq!(r.changed.len(), 2);
        assert!(r.rejected.is_empty());
        assert_eq!(book.get(b.id.name()), Some(&b.binding.keys), "new names are pinned");
        assert_eq!(r.pinned, vec![b.id.name(), c.id.name()]);
        let routes = t.routes();

        // The member m forges b's entry in every way it can, next to one honest entry.
        let mut max = sealed(entry(&b, u64::MAX, &[&m]), &b); // even b's own signature
        max.info.version = u64::MAX;
        let mut resigned = entry(&b, 4, &[&m]);
        resigned.nickname = "owned".into();
        let with_b_binding = SignedPeerInfo {
            seal: Seal { binding: b.binding.clone(), sig: m.signer.sign(DOMAIN_TOPOLOGY, &resigned.signed_bytes()) },
            info: resigned.clone(),
        };
        let own_binding_for_b = SignedPeerInfo {
            seal: Seal { binding: Binding::new(b.id.name(), &m.id, &m.signer), sig: m.signer.sign(DOMAIN_TOPOLOGY, &resigned.signed_bytes()) },
            info: resigned.clone(),
        };
        let mut wrong_binding = sealed(resigned.clone(), &m); // m's binding under b's entry
        wrong_binding.info = resigned.clone();
        let mut new_bad_sig = sealed(entry(&m, 1, &[&a]), &m);
        new_bad_sig.seal.sig.0[3] ^= 0x40;
        let mut zero = sealed(entry(&m, 1, &[]), &m);
        zero.info.connections.push(ConnInfo { peer: PeerName(0), addr: addr(1), outbound: true, established: true });
        // Signed by its owner, but a nickname every router would print raw.
        let mut escape = entry(&m, 1, &[]);
        escape.nickname = "m\x1b[2J\nfake line".into();
        let escape = sealed(escape, &m);
        let honest = sealed(entry(&c, 2, &[&b]), &c);
        let r = t
            .merge_signed(vec![max, with_b_binding, own_binding_for_b, wrong_binding, new_bad_sig, zero, escape, honest], &mut book)
            .unwrap();
        let reasons: Vec<Rejection> = r.rejected.iter().map(|(_, why)| *why).collect();
        assert_eq!(
            reasons,
            vec![
                Rejection::Version,
                Rejection::BadSignature,
                Rejection::KeyConflict,
                Rejection::BadBinding,
                Rejection::BadSignature,
                Rejection::Malformed,
                Rejection::Malformed
            ]
        );
        assert_eq!(r.changed, vec![c.id.name()], "the honest entry still applies");
        assert_eq!(t.get(b.id.name()).unwrap().version, 3);
        assert_eq!(t.get(b.id.name()).unwrap().nickname, "n");
        assert!(t.get(m.id.name()).is_none());
        assert!(book.get(m.id.name()).is_none(), "a name is not pinned by an entry that failed");
        assert_eq!(t.routes(), routes);

        // b's own next version still wins.
        let r = t.merge_signed(vec![sealed(entry(&b, 4, &[&a]), &b)], &mut book).unwrap();
        assert_eq!(r.changed, vec![b.id.name()]);
        // An entry identical to the stored one is not verified again.
        let again = t.gossip_all_signed();
        assert_eq!(again.len(), 3);
        let r = t.merge_signed(again, &mut book).unwrap();
        assert_eq!((r.changed.len(), r.rejected.len(), r.verified), (0, 0, 0));
    }

    #[test]
    fn my_entry_is_resealed_on_every_change_and_verifies_elsewhere() {
        let (a, b) = (owner(5), owner(6));
        let mut ta = Topology::with_signer(entry(&a, 1, &[]), a.signer.clone(), a.binding.clone());
        let mut tb = Topology::with_signer(entry(&b, 1, &[]), b.signer.clone(), b.binding.clone());
        let mut book_b = KeyBook::new();
        book_b.admit(&b.binding).unwrap();
        let mut push = |ta: &Topology, tb: &mut Topology| tb.merge_signed(ta.gossip_about_signed(&[ta.me().name]), &mut book_b).unwrap();
        assert_eq!(push(&ta, &mut tb).changed, vec![a.id.name()]);
        assert!(ta.set_local_connections(entry(&a, 1, &[&b]).connections));
        assert_eq!(push(&ta, &mut tb).changed, vec![a.id.name()]);
        assert!(ta.set_local_nickname("renamed"));
        let r = push(&ta, &mut tb);
        assert_eq!((r.changed, r.rejected), (vec![a.id.name()], vec![]));
        assert_eq!(tb.get(a.id.name()).unwrap(), ta.me());
    }

    #[test]
    fn my_version_jumps_only_above_my_own_signed_entries_and_never_overflows() {
        let (a, m) = (owner(7), owner(8));
        let mut book = KeyBook::new();
        book.admit(&a.binding).unwrap();
        let mut t = Topology::with_signer(entry(&a, 2, &[]), a.signer.clone(), a.binding.clone());
        // My previous incarnation (same key), far ahead: my version jumps above it.
        let mut previous = entry(&a, 40, &[&m]);
        previous.uid = 1;
        let r = t.merge_signed(vec![sealed(previous, &a)], &mut book).unwrap();
        assert_eq!(r.changed, vec![a.id.name()]);
        assert_eq!(t.me().version, 41);
        assert!(t.me().connections.is_empty());
        // Forgeries about me move nothing: not signed by me, or out of bounds.
        let forged = SignedPeerInfo {
            seal: Seal { binding: a.binding.clone(), sig: m.signer.sign(DOMAIN_TOPOLOGY, &entry(&a, 1000, &[]).signed_bytes()) },
            info: entry(&a, 1000, &[]),
        };
        let mut max = sealed(entry(&a, MAX_VERSION, &[]), &a);
        max.info.version = u64::MAX;
        let r = t.merge_signed(vec![forged, max, sealed(entry(&a, MAX_VERSION, &[]), &a)], &mut book).unwrap();
        assert_eq!(r.rejected.iter().map(|r| r.1).collect::<Vec<_>>(), vec![Rejection::BadSignature, Rejection::Version, Rejection::Version]);
        assert_eq!(t.me().version, 41);
        // Even my own entry just under the bound: the bump stays within it, and so do later changes.
        t.merge_signed(vec![sealed(entry(&a, MAX_VERSION - 1, &[&m]), &a)], &mut book).unwrap();
        assert_eq!(t.me().version, MAX_VERSION);
        assert!(t.set_local_nickname("x"));
        assert_eq!(t.me().version, MAX_VERSION);
        // The unsigned merge refuses out-of-bound versions too.
        let mut u = Topology::new(info(1, 1, &[]));
        assert!(matches!(u.merge(vec![info(1, u64::MAX, &[])]), Err(MergeError::VersionOutOfRange { .. })));
        assert_eq!(u.me().version, 1);
    }

    #[test]
    fn a_name_rebound_after_rmpeer_takes_the_new_owner_entry() {
        let (a, old, new) = (owner(9), owner(10), owner(11));
        let name = PeerName(0x02_00_00_00_00_77);
        let old_b = Binding::new(name, &old.id, &old.signer);
        let new_b = Binding::new(name, &new.id, &new.signer);
        let mut book = KeyBook::new();
        let mut t = Topology::with_signer(entry(&a, 1, &[]), a.signer.clone(), a.binding.clone());
        let mk = |v: u64, o: &Owner, b: &Binding| {
            let mut i = entry(o, v, &[&a]);
            i.name = name;
            SignedPeerInfo { seal: Seal::sign(&i, &o.signer, b), info: i }
        };
        t.merge_signed(vec![mk(50, &old, &old_b)], &mut book).unwrap();
        // The reinstalled host (new key, same chosen name) is refused...
        let r = t.merge_signed(vec![mk(1, &new, &new_b)], &mut book).unwrap();
        assert_eq!(r.rejected, vec![(name, Rejection::KeyConflict)]);
        // ...until the operator removes the old identity.
        book.remove(name);
        assert!(t.forget(name));
        let r = t.merge_signed(vec![mk(1, &new, &new_b)], &mut book).unwrap();
        assert_eq!(r.changed, vec![name]);
        assert_eq!(book.get(name), Some(&new_b.keys));
        // The old owner's entries are no longer believed, whatever their version.
        let r = t.merge_signed(vec![mk(51, &old, &old_b)], &mut book).unwrap();
        assert_eq!(r.rejected, vec![(name, Rejection::KeyConflict)]);
        assert_eq!(t.get(name).unwrap().version, 1);
    }

    /// Prints what signing and verifying cost for 1000 peers of degree 10 (run
    /// with `--ignored --nocapture`; release build).
    #[test]
    #[ignore]
    fn signed_merge_cost_for_1000_peers() {
        let owners: Vec<Owner> = (0..1000u32)
            .map(|i| {
                let mut seed = [7u8; 32];
                seed[1..5].copy_from_slice(&i.to_le_bytes()); // byte 0 is clamped
                let id = crate::identity::Identity::from_private(seed).unwrap();
                let signer = Arc::new(Signer::from_identity(&id));
                let binding = Binding::new(id.name(), &id, &signer);
                Owner { id, signer, binding }
            })
            .collect();
        let t0 = std::time::Instant::now();
        let update: Vec<SignedPeerInfo> = (1..1000)
            .map(|i| {
                let links: Vec<&Owner> = (1..=10).map(|d| &owners[(i + d * 97) % 1000]).collect();
                sealed(entry(&owners[i], 1, &links), &owners[i])
            })
            .collect();
        let sign = t0.elapsed();
        let bytes = bincode::serde::encode_to_vec(&update, bincode::config::standard()).unwrap().len();
        let mut book = KeyBook::new();
        book.admit(&owners[0].binding).unwrap();
        let mut t = Topology::with_signer(entry(&owners[0], 1, &[]), owners[0].signer.clone(), owners[0].binding.clone());
        let t1 = std::time::Instant::now();
        let r = t.merge_signed(update.clone(), &mut book).unwrap();
        let first = t1.elapsed();
        assert_eq!((r.changed.len(), r.rejected.len()), (999, 0), "{:?}", &r.rejected[..r.rejected.len().min(3)]);
        let t2 = std::time::Instant::now();
        let r = t.merge_signed(update, &mut book).unwrap();
        let again = t2.elapsed();
        assert_eq!(r.verified, 0);
        eprintln!(
            "1000 peers, degree 10: signing 999 entries {sign:?}; full gossip {bytes} bytes; first merge (pin + verify) {first:?}; same gossip again {again:?}"
        );
    }

    #[test]
    fn gossip_views() {
        let t = mesh(&[(1, 2), (2, 3)], 3);
        let all = t.gossip_all();
        assert_eq!(all.iter().map(|p| p.name).collect::<Vec<_>>(), vec![name(1), name(2), name(3)]);
        let some = t.gossip_about(&[name(3), name(9), name(1), name(3)]);
        assert_eq!(some.iter().map(|p| p.name).collect::<Vec<_>>(), vec![name(1), name(3)]);
    }
}
