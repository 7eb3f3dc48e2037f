//! meshnet DNS: the gossiped table of names, and what a query for a name gets.
//!
//! Owns: the record sets every peer publishes ([`RecordSet`], signed by its
//! owner as a [`SignedSet`]), their merge ([`Table::merge`]), the anti-entropy
//! exchange that heals partitions ([`DnsMsg::Digest`], [`DnsMsg::Summary`]),
//! name syntax ([`normalize_name`]), and the answer to a question
//! ([`Table::resolve`]). Never does: I/O, reading the clock (time is passed in),
//! DNS wire encoding (the server in `control` uses hickory-proto for that).
//!
//! # The model
//! * Each peer owns one record set: `{owner, version, records}` where a record is
//!   `(name, IPv4 address, target)`. Only the owner changes it, by publishing a
//!   new version signed with its Ed25519 key ([`DOMAIN_DNS_SET`]). A removal is a
//!   new version without the record: it is the tombstone. It reaches every
//!   router and survives partitions, because the higher version always wins.
//! * Versions only grow. The owner takes `max(last + 1, unix time in ms)`, so a
//!   router whose state was lost still publishes above its old versions.
//! * [`Table::merge`] believes a set only if its owner's key is in the
//!   [`KeyBook`] (pinned from topology gossip) and the signature verifies, and
//!   keeps it only if its version is higher than the one held.
//! * `rmpeer` of a dead peer drops its set ([`Table::remove_owner`]) and keeps a
//!   tombstone version for it, so stale copies still gossiped by others are not
//!   taken back (a reinstalled peer publishes under a newer version).
//! * IPv6 (AAAA, `ip6.arpa`) records live in a second table of the same
//!   shape ([`Table6`], [`Record6`], [`SignedSet6`], [`DnsMsg6`]): each owner
//!   publishes a separate IPv6 set, with its own versions, signed under its own
//!   domain ([`DOMAIN_DNS_SET6`]) and gossiped as `ControlMsg::Dns6` only to
//!   peers with `CAP_DNS6`. Peers of the previous build never see it (their
//!   IPv4 sets and messages are unchanged, byte for byte); IPv6 records cross
//!   only paths of peers that have the bit. [`resolve`] answers from both.
//! * Everything decoded is bounded: names are valid DNS names inside the
//!   domain, at most [`MAX_RECORDS`] per owner, [`MAX_TARGET`] bytes of target,
//!   [`MAX_OWNERS`] sets in a table or a message.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::trust::{self, KeyBook, Signature, Signer};
use crate::PeerName;

/// Domain of [`SignedSet`] signatures (IPv4 sets).
pub const DOMAIN_DNS_SET: &[u8] = b"meshnet dns set v1";
/// Domain of [`SignedSet6`] signatures (IPv6 sets): distinct, so no IPv4
/// set's signature can be passed off as an IPv6 set's or the reverse.
pub const DOMAIN_DNS_SET6: &[u8] = b"meshnet dns6 set v1";
/// The default DNS domain (`--dns-domain`).
pub const DEFAULT_DOMAIN: &str = "meshnet.local.";
/// Most records one owner may publish.
pub const MAX_RECORDS: usize = 4096;
/// Longest name, in bytes, without the final dot (RFC 1035).
pub const MAX_NAME: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL: usize = 63;
/// Longest target (what a record was registered for: a container or namespace name).
pub const MAX_TARGET: usize = 256;
/// Most owners a table holds, and most sets or versions one message carries.
pub const MAX_OWNERS: usize = crate::topology::MAX_PEERS;
/// Time between anti-entropy rounds: a digest to about 2·log₂ n random neighbours.
pub const DIGEST_EVERY_MS: u64 = 2_000;
/// At most one summary sent to a neighbour per this long (a neighbour that
/// sends digests in a loop gets at most this much of the table back).
pub const SUMMARY_EVERY_MS: u64 = 1_000;
/// Sets per [`DnsMsg::Sets`] message when the whole table is sent; a set has at
/// most [`MAX_RECORDS`] records of at most ~520 bytes, so one set fits a
/// control message (4 MiB) on its own.
pub const SETS_CHUNK_BYTES: usize = 256 << 10;

/// An address family the table holds: IPv4 ([`Record`], A records,
/// `in-addr.arpa`) or IPv6 ([`Record6`], AAAA records, `ip6.arpa`). Each family
/// is a table of its own, with its own signed sets per owner, versions and
/// gossip (IPv6 only between peers with `CAP_DNS6`, see the module docs).
pub trait Family: Copy + Ord + Hash + fmt::Debug + fmt::Display + Send + Sync + 'static {
    /// Domain of this family's set signatures.
    const SIGN_DOMAIN: &'static [u8];
    /// Appends the address's bytes to a signed message.
    fn put(&self, m: &mut Vec<u8>);
    /// The address of a reverse name of this family (`…in-addr.arpa.`, `…ip6.arpa.`).
    fn from_reverse(q: &str) -> Option<Self>;
    fn ip(&self) -> IpAddr;
}

impl Family for Ipv4Addr {
    const SIGN_DOMAIN: &'static [u8] = DOMAIN_DNS_SET;
    fn put(&self, m: &mut Vec<u8>) {
        m.extend_from_slice(&self.octets());
    }
    fn from_reverse(q: &str) -> Option<Self> {
        parse_reverse(q)
    }
    fn ip(&self) -> IpAddr {
        IpAddr::V4(*self)
    }
}

impl Family for Ipv6Addr {
    const SIGN_DOMAIN: &'static [u8] = DOMAIN_DNS_SET6;
    fn put(&self, m: &mut Vec<u8>) {
        m.extend_from_slice(&self.octets());
    }
    fn from_reverse(q: &str) -> Option<Self> {
        parse_reverse6(q)
    }
    fn ip(&self) -> IpAddr {
        IpAddr::V6(*self)
    }
}

/// One name → address mapping, registered for `target` on the owning router.
/// `Record` is IPv4 (the original wire format), [`Record6`] IPv6.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Record<A = Ipv4Addr> {
    /// Lowercase, fully qualified, with the final dot (`db.meshnet.local.`).
    pub name: String,
    pub addr: A,
    /// The container, namespace or PID it was registered for, as the owner calls it.
    pub target: String,
}

/// An IPv6 record.
pub type Record6 = Record<Ipv6Addr>;

/// Everything one peer publishes in one family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSet<A = Ipv4Addr> {
    pub owner: PeerName,
    pub version: u64,
    /// Sorted, without duplicates (checked on receipt: the signed bytes are canonical).
    pub records: Vec<Record<A>>,
}

/// A record set and its owner's signature over [`RecordSet::message`] (domain
/// [`Family::SIGN_DOMAIN`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSet<A = Ipv4Addr> {
    pub set: RecordSet<A>,
    pub sig: Signature,
}

/// An IPv6 owner's set, signed.
pub type SignedSet6 = SignedSet<Ipv6Addr>;

/// A hash over every held set's (owner, version), and how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest {
    pub owners: u32,
    pub hash: [u8; 16],
}

/// What DNS gossip carries: `ControlMsg::Dns` for IPv4 (`DnsMsg`),
/// `ControlMsg::Dns6` for IPv6 ([`DnsMsg6`], only to peers with `CAP_DNS6`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsMsg<A = Ipv4Addr> {
    /// Signed record sets: the whole table on a new connection, changed sets later.
    Sets(Vec<SignedSet<A>>),
    /// Anti-entropy: sent to about 2·log₂ n random neighbours every [`DIGEST_EVERY_MS`].
    Digest(Digest),
    /// Every held set's (owner, version), sorted by owner: the answer to a digest
    /// that differs. `answer`: the receiver should send its own summary back if
    /// it lacks something we hold (false on a summary that answers a summary).
    Summary { versions: Vec<(PeerName, u64)>, answer: bool },
}

/// Why a decoded DNS message is refused whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum DnsError {
    #[error("more than {MAX_OWNERS} sets or versions in one message")]
    TooMany,
    #[error("name {0:?}: {1}")]
    BadName(String, &'static str),
    #[error("name {name:?} is outside the domain {domain}")]
    OutsideDomain { name: String, domain: String },
    #[error("target {0:?}: {1}")]
    BadTarget(String, &'static str),
    #[error("more than {MAX_RECORDS} records")]
    TooManyRecords,
}

/// IPv6 DNS gossip (`ControlMsg::Dns6`).
pub type DnsMsg6 = DnsMsg<Ipv6Addr>;

impl<A> DnsMsg<A> {
    /// The bounds bincode cannot express (after decoding, before use). Record
    /// syntax is checked per set by [`Table::merge`] (a bad set is dropped and
    /// counted, the rest of the message still merges).
    pub fn check(&self) -> Result<(), DnsError> {
        match self {
            DnsMsg::Sets(v) if v.len() > MAX_OWNERS => Err(DnsError::TooMany),
            DnsMsg::Sets(v) if v.iter().any(|s| s.set.records.len() > MAX_RECORDS) => Err(DnsError::TooManyRecords),
            DnsMsg::Summary { versions, .. } if versions.len() > MAX_OWNERS => Err(DnsError::TooMany),
            _ => Ok(()),
        }
    }
}

/// Why a set from gossip was not taken (counted per label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// No key is pinned for the owner (its topology entry has not reached us).
    UnknownOwner,
    BadSignature,
    /// Bad syntax, unsorted or duplicate records, too many.
    Malformed,
    /// A name outside our domain: the owner was launched with another
    /// `--dns-domain` (every router of a mesh must use the same one).
    OtherDomain,
    /// `rmpeer` removed the owner and the set is not newer than that.
    Removed,
    /// Our own set, relayed back to us.
    Own,
}

impl Reject {
    /// Every reason (for counters that exist from the start).
    pub const ALL: [Reject; 6] =
        [Reject::UnknownOwner, Reject::BadSignature, Reject::Malformed, Reject::OtherDomain, Reject::Removed, Reject::Own];

    pub fn label(self) -> &'static str {
        match self {
            Reject::UnknownOwner => "unknown_owner",
            Reject::BadSignature => "bad_signature",
            Reject::Malformed => "malformed",
            Reject::OtherDomain => "other_domain",
            Reject::Removed => "removed_owner",
            Reject::Own => "own",
        }
    }
}

/// What [`Table::merge`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Owners whose set was replaced by a newer one (to relay).
    pub changed: Vec<PeerName>,
    /// Sets not newer than the one held (not an error: gossip crosses).
    pub stale: usize,
    pub rejected: Vec<(PeerName, Reject)>,
}

/// Counters for `status dns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStats {
    pub sets_merged: u64,
    pub sets_stale: u64,
    /// Every reason of [`Reject::ALL`] by its label, 0 until a set is refused
    /// for it (so a reader of `status dns --json` finds each key from the start).
    pub sets_rejected: BTreeMap<String, u64>,
}

impl Default for TableStats {
    fn default() -> Self {
        let sets_rejected = Reject::ALL.iter().map(|r| (r.label().to_string(), 0)).collect();
        TableStats { sets_merged: 0, sets_stale: 0, sets_rejected }
    }
}

/// What a question gets (see [`Table::resolve`] and [`resolve`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A records, in this (rotated) order.
    Addresses(Vec<Ipv4Addr>),
    /// AAAA records, in this (rotated) order.
    Addresses6(Vec<Ipv6Addr>),
    /// PTR records.
    Names(Vec<String>),
    /// The name exists but has no records of the type asked (AAAA, MX...): NOERROR, no answers.
    NoData,
    /// A name in the domain that nobody registered.
    NxDomain,
    /// Not ours: ask the host's resolvers.
    Forward,
}

/// The record types [`Table::resolve`] tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryType {
    A,
    Aaaa,
    Ptr,
    /// Anything else.
    Other,
}

/// Lowercases `name`, makes it fully qualified in `domain` and checks its
/// syntax. A single label (`db`) is taken as relative to the domain; any other
/// name must end in the domain (`db.meshnet.local` or `db.meshnet.local.`).
/// Labels are 1–63 bytes of `a-z`, `0-9`, `-`, `_` (Docker names may hold `_`),
/// not starting or ending with `-`; the name at most 253 bytes.
pub fn normalize_name(name: &str, domain: &str) -> Result<String, DnsError> {
    let lower = name.trim().to_ascii_lowercase();
    let domain = normalize_domain(domain)?;
    if lower.is_empty() || lower == "." {
        return Err(DnsError::BadName(name.into(), "empty"));
    }
    let fq = if !lower.trim_end_matches('.').contains('.') && !lower.ends_with('.') {
        format!("{lower}.{domain}")
    } else if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    };
    check_syntax(&fq).map_err(|why| DnsError::BadName(name.into(), why))?;
    if !in_domain(&fq, &domain) || fq == domain {
        return Err(DnsError::OutsideDomain { name: name.into(), domain });
    }
    Ok(fq)
}

/// A domain as `--dns-domain` gives it: lowercase, with the final dot.
pub fn normalize_domain(domain: &str) -> Result<String, DnsError> {
    let mut d = domain.trim().to_ascii_lowercase();
    if !d.ends_with('.') {
        d.push('.');
    }
    if d == "." {
        return Err(DnsError::BadName(domain.into(), "the root cannot be meshnet's domain"));
    }
    check_syntax(&d).map_err(|why| DnsError::BadName(domain.into(), why))?;
    Ok(d)
}

/// Whether the fully qualified `name` is `domain` or below it.
pub fn in_domain(name: &str, domain: &str) -> bool {
    name == domain || (name.len() > domain.len() && name.ends_with(domain) && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

/// Syntax of a lowercase fully qualified name with its final dot.
fn check_syntax(fq: &str) -> Result<(), &'static str> {
    let Some(body) = fq.strip_suffix('.') else { return Err("not fully qualified") };
    if body.len() > MAX_NAME {
        return Err("longer than 253 bytes");
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > MAX_LABEL {
            return Err("label longer than 63 bytes");
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            return Err("only letters, digits, '-' and '_' are allowed in a label");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label cannot start or end with '-'");
        }
    }
    Ok(())
}

/// Checks a target as the API takes it and as gossip carries it.
pub fn check_target(target: &str) -> Result<(), DnsError> {
    if target.is_empty() {
        return Err(DnsError::BadTarget(target.into(), "empty"));
    }
    if target.len() > MAX_TARGET {
        return Err(DnsError::BadTarget(target.into(), "longer than 256 bytes"));
    }
    if target.chars().any(|c| c.is_control()) {
        return Err(DnsError::BadTarget(target.into(), "control characters"));
    }
    Ok(())
}

impl<A: Family> RecordSet<A> {
    /// The bytes the owner signs: owner, version, record count, then each
    /// record as length-prefixed name, address (4 or 16 bytes), length-prefixed
    /// target. Signed under the family's own domain.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(20 + self.records.len() * 48);
        m.extend_from_slice(&self.owner.0.to_be_bytes());
        m.extend_from_slice(&self.version.to_be_bytes());
        m.extend_from_slice(&(self.records.len() as u32).to_be_bytes());
        for r in &self.records {
            m.extend_from_slice(&(r.name.len() as u16).to_be_bytes());
            m.extend_from_slice(r.name.as_bytes());
            r.addr.put(&mut m);
            m.extend_from_slice(&(r.target.len() as u16).to_be_bytes());
            m.extend_from_slice(r.target.as_bytes());
        }
        m
    }

    /// Syntax and bounds: every name valid and inside `domain`, targets valid,
    /// records sorted without duplicates, at most [`MAX_RECORDS`].
    pub fn check(&self, domain: &str) -> Result<(), DnsError> {
        if self.records.len() > MAX_RECORDS {
            return Err(DnsError::TooManyRecords);
        }
        for r in &self.records {
            check_syntax(&r.name).map_err(|why| DnsError::BadName(r.name.clone(), why))?;
            if !in_domain(&r.name, domain) || r.name == domain {
                return Err(DnsError::OutsideDomain { name: r.name.clone(), domain: domain.into() });
            }
            check_target(&r.target)?;
        }
        if self.records.windows(2).any(|w| w[0] >= w[1]) {
            return Err(DnsError::BadName(String::new(), "records not sorted or duplicated"));
        }
        Ok(())
    }
}

impl<A: Family> SignedSet<A> {
    pub fn sign(set: RecordSet<A>, signer: &Signer) -> SignedSet<A> {
        let sig = signer.sign(A::SIGN_DOMAIN, &set.message());
        SignedSet { set, sig }
    }
}

/// The table every router holds: one signed set per owner (see the module
/// docs); one table per family (`Table` IPv4, [`Table6`] IPv6).
#[derive(Debug)]
pub struct Table<A = Ipv4Addr> {
    domain: String,
    me: PeerName,
    sets: BTreeMap<PeerName, SignedSet<A>>,
    /// `rmpeer`'d owners: sets at or below this version are refused.
    removed: BTreeMap<PeerName, u64>,
    /// name → (owner, address), and address → names, rebuilt on every change.
    by_name: HashMap<String, Vec<A>>,
    by_addr: HashMap<A, Vec<String>>,
    /// Neighbour → when we last sent it a summary.
    summaries: HashMap<u64, u64>,
    pub stats: TableStats,
}

/// The IPv6 table.
pub type Table6 = Table<Ipv6Addr>;

impl<A: Family> Table<A> {
    /// An empty table for `domain` (already normalised, see [`normalize_domain`]).
    pub fn new(domain: &str, me: PeerName) -> Table<A> {
        Table {
            domain: domain.to_string(),
            me,
            sets: BTreeMap::new(),
            removed: BTreeMap::new(),
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            summaries: HashMap::new(),
            stats: TableStats::default(),
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Our own records (sorted).
    pub fn own(&self) -> &[Record<A>] {
        self.sets.get(&self.me).map_or(&[], |s| &s.set.records)
    }

    /// Our own set's version (0 before the first).
    pub fn own_version(&self) -> u64 {
        self.sets.get(&self.me).map_or(0, |s| s.set.version)
    }

    /// The version our next set must carry: above the last one, and at least
    /// `unix_ms` (the wall clock, in milliseconds) so it stays above versions of
    /// a lost state.
    pub fn next_version(&self, unix_ms: u64) -> u64 {
        (self.own_version() + 1).max(unix_ms)
    }

    /// Publishes our records (sorted and deduplicated here) under `version`
    /// (from [`next_version`](Self::next_version), or as persisted on restart).
    /// Err if a record is invalid; the table is then unchanged.
    pub fn set_own(&mut self, mut records: Vec<Record<A>>, version: u64, signer: &Signer) -> Result<SignedSet<A>, DnsError> {
        records.sort();
        records.dedup();
        let set = RecordSet { owner: self.me, version, records };
        set.check(&self.domain)?;
        let signed = SignedSet::sign(set, signer);
        self.sets.insert(self.me, signed.clone());
        self.reindex();
        Ok(signed)
    }

    /// Merges sets from gossip (see the module docs); the table changes only
    /// by whole, verified, newer sets.
    pub fn merge(&mut self, sets: Vec<SignedSet<A>>, keys: &KeyBook) -> MergeReport {
        let mut report = MergeReport::default();
        for s in sets {
            let owner = s.set.owner;
            if let Err(why) = self.judge(&s, keys) {
                report.rejected.push((owner, why));
                continue;
            }
            let held = self.sets.get(&owner).map_or(0, |h| h.set.version);
            if s.set.version <= held {
                report.stale += 1;
                continue;
            }
            if self.sets.len() >= MAX_OWNERS && !self.sets.contains_key(&owner) {
                report.rejected.push((owner, Reject::Malformed));
                continue;
            }
            self.removed.remove(&owner);
            self.sets.insert(owner, s);
            report.changed.push(owner);
        }
        report.changed.sort_unstable();
        report.changed.dedup();
        if !report.changed.is_empty() {
            self.reindex();
        }
        self.stats.sets_merged += report.changed.len() as u64;
        self.stats.sets_stale += report.stale as u64;
        for (_, why) in &report.rejected {
            *self.stats.sets_rejected.entry(why.label().to_string()).or_default() += 1;
        }
        report
    }

    fn judge(&self, s: &SignedSet<A>, keys: &KeyBook) -> Result<(), Reject> {
        let owner = s.set.owner;
        if owner == self.me {
            return Err(Reject::Own);
        }
        if !trust::valid_name(owner) {
            return Err(Reject::Malformed);
        }
        if self.removed.get(&owner).is_some_and(|&v| s.set.version <= v) {
            return Err(Reject::Removed);
        }
        s.set.check(&self.domain).map_err(|e| match e {
            DnsError::OutsideDomain { .. } => Reject::OtherDomain,
            _ => Reject::Malformed,
        })?;
        // Cheap checks first: a set no newer than ours is not worth a signature check.
        if self.sets.get(&owner).is_some_and(|h| s.set.version <= h.set.version) {
            return Ok(());
        }
        let key = keys.get(owner).ok_or(Reject::UnknownOwner)?;
        if !trust::verify(&key.signing_key, A::SIGN_DOMAIN, &s.set.message(), &s.sig) {
            return Err(Reject::BadSignature);
        }
        Ok(())
    }

    /// `rmpeer`: drops `owner`'s set and refuses its sets up to the version
    /// held, or `floor` if higher (pass the wall clock in ms: a peer reinstalled
    /// later publishes above it). True if a set was dropped.
    pub fn remove_owner(&mut self, owner: PeerName, floor: u64) -> bool {
        if owner == self.me {
            return false;
        }
        let held = self.sets.remove(&owner);
        let version = held.as_ref().map_or(0, |s| s.set.version).max(floor);
        let tomb = self.removed.entry(owner).or_insert(0);
        *tomb = (*tomb).max(version);
        if self.removed.len() > MAX_OWNERS {
            // Oldest tombstones go first (by version: the wall clock of the removal).
            if let Some((&o, _)) = self.removed.iter().min_by_key(|(_, v)| **v) {
                self.removed.remove(&o);
            }
        }
        if held.is_some() {
            self.reindex();
        }
        held.is_some()
    }

    fn reindex(&mut self) {
        self.by_name.clear();
        self.by_addr.clear();
        for s in self.sets.values() {
            for r in &s.set.records {
                let addrs = self.by_name.entry(r.name.clone()).or_default();
                if !addrs.contains(&r.addr) {
                    addrs.push(r.addr);
                }
                let names = self.by_addr.entry(r.addr).or_default();
                if !names.contains(&r.name) {
                    names.push(r.name.clone());
                }
            }
        }
        for v in self.by_name.values_mut() {
            v.sort_unstable();
        }
        for v in self.by_addr.values_mut() {
            v.sort_unstable();
        }
    }

    /// Every address of `name` (lowercase, fully qualified), sorted.
    pub fn lookup(&self, name: &str) -> &[A] {
        self.by_name.get(name).map_or(&[], |v| v.as_slice())
    }

    /// Every name of `addr`, sorted.
    pub fn reverse(&self, addr: A) -> &[String] {
        self.by_addr.get(&addr).map_or(&[], |v| v.as_slice())
    }


    /// Every (owner, record), by owner then record.
    pub fn records(&self) -> impl Iterator<Item = (PeerName, &Record<A>)> {
        self.sets.values().flat_map(|s| s.set.records.iter().map(move |r| (s.set.owner, r)))
    }

    pub fn len(&self) -> usize {
        self.sets.values().map(|s| s.set.records.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every set (for a new connection).
    pub fn all_signed(&self) -> Vec<SignedSet<A>> {
        self.sets.values().cloned().collect()
    }

    /// The sets of `owners` that we hold.
    pub fn signed_of(&self, owners: &[PeerName]) -> Vec<SignedSet<A>> {
        owners.iter().filter_map(|o| self.sets.get(o).cloned()).collect()
    }

    pub fn versions(&self) -> Vec<(PeerName, u64)> {
        self.sets.values().map(|s| (s.set.owner, s.set.version)).collect()
    }

    pub fn digest(&self) -> Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for (o, v) in self.versions() {
            ctx.update(&o.0.to_be_bytes());
            ctx.update(&v.to_be_bytes());
        }
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&ctx.finish().as_ref()[..16]);
        Digest { owners: self.sets.len() as u32, hash }
    }

    /// A neighbour's digest: our summary if ours differs (at most one per
    /// [`SUMMARY_EVERY_MS`] per neighbour).
    pub fn on_digest(&mut self, from: u64, digest: Digest, now_ms: u64) -> Option<DnsMsg<A>> {
        if digest == self.digest() || !self.summary_allowed(from, now_ms) {
            return None;
        }
        Some(DnsMsg::Summary { versions: self.versions(), answer: true })
    }

    /// A neighbour's summary: the sets it lacks or holds older, and our own
    /// summary if it holds something newer than we do and asked for an answer.
    pub fn on_summary(&mut self, from: u64, versions: &[(PeerName, u64)], answer: bool, now_ms: u64) -> Vec<DnsMsg<A>> {
        let theirs: HashMap<PeerName, u64> = versions.iter().copied().collect();
        let newer: Vec<PeerName> = self
            .sets
            .values()
            .filter(|s| theirs.get(&s.set.owner).map_or(true, |&v| v < s.set.version))
            .map(|s| s.set.owner)
            .collect();
        let mut out = split_sets(self.signed_of(&newer), SETS_CHUNK_BYTES);
        let we_lack = versions.iter().any(|(o, v)| {
            *o != self.me
                && self.sets.get(o).map_or(0, |s| s.set.version) < *v
                && self.removed.get(o).map_or(true, |r| r < v)
        });
        if answer && we_lack && self.summary_allowed(from, now_ms) {
            out.push(DnsMsg::Summary { versions: self.versions(), answer: false });
        }
        out
    }

    fn summary_allowed(&mut self, from: u64, now_ms: u64) -> bool {
        if self.summaries.len() > 4096 {
            self.summaries.retain(|_, t| now_ms.saturating_sub(*t) < SUMMARY_EVERY_MS);
        }
        match self.summaries.get(&from) {
            Some(&t) if now_ms.saturating_sub(t) < SUMMARY_EVERY_MS => false,
            _ => {
                self.summaries.insert(from, now_ms);
                true
            }
        }
    }

    /// A connection ended: forget its summary limit.
    pub fn disconnected(&mut self, from: u64) {
        self.summaries.remove(&from);
    }
}

impl Table<Ipv4Addr> {
    /// The answer from this IPv4 table alone (no IPv6 names): see [`resolve`].
    pub fn resolve(&self, name: &str, qtype: QueryType, turn: usize) -> Answer {
        resolve_in(&self.domain, Some(self), None, name, qtype, turn)
    }
}

/// The answer to a question for `name` (any case, with or without the final
/// dot) from both families' tables (of the same domain). A name exists if
/// either family holds it: A is answered from the IPv4 table, AAAA from the
/// IPv6 one, and a name with records of the other family only (or a question
/// of another type) gets [`Answer::NoData`], never NXDOMAIN. PTR questions
/// for `in-addr.arpa.` / `ip6.arpa.` names of held addresses get their names;
/// other reverse names are forwarded. `turn` rotates the addresses of a name
/// with several (pass a counter: successive queries get each address first
/// in turn).
pub fn resolve(v4: &Table, v6: &Table6, name: &str, qtype: QueryType, turn: usize) -> Answer {
    resolve_in(&v4.domain, Some(v4), Some(v6), name, qtype, turn)
}

fn resolve_in(domain: &str, v4: Option<&Table>, v6: Option<&Table6>, name: &str, qtype: QueryType, turn: usize) -> Answer {
    let mut q = name.to_ascii_lowercase();
    if !q.ends_with('.') {
        q.push('.');
    }
    if qtype == QueryType::Ptr {
        let names: &[String] = match (parse_reverse(&q), parse_reverse6(&q)) {
            (Some(a), _) => v4.map_or(&[], |t| t.reverse(a)),
            (_, Some(a)) => v6.map_or(&[], |t| t.reverse(a)),
            _ => &[],
        };
        if !names.is_empty() {
            return Answer::Names(names.to_vec());
        }
    }
    if !in_domain(&q, domain) {
        // A single label (`db.`): asked by a resolver that did not append the
        // search domain. A name of the table under the domain answers it (as
        // Weave's did); any other goes on to the forwarders.
        let qualified = format!("{q}{domain}");
        let held = |n: &str| v4.is_some_and(|t| !t.lookup(n).is_empty()) || v6.is_some_and(|t| !t.lookup(n).is_empty());
        if q.len() > 1 && q.matches('.').count() == 1 && held(&qualified) {
            q = qualified;
        } else {
            return Answer::Forward;
        }
    }
    let a4 = v4.map_or(&[][..], |t| t.lookup(&q));
    let a6 = v6.map_or(&[][..], |t| t.lookup(&q));
    if a4.is_empty() && a6.is_empty() {
        // The domain itself exists (it holds names) but has no address.
        return if q == domain { Answer::NoData } else { Answer::NxDomain };
    }
    match qtype {
        QueryType::A if !a4.is_empty() => Answer::Addresses(rotated(a4, turn)),
        QueryType::Aaaa if !a6.is_empty() => Answer::Addresses6(rotated(a6, turn)),
        _ => Answer::NoData,
    }
}

fn rotated<A: Copy>(addrs: &[A], turn: usize) -> Vec<A> {
    let mut v = addrs.to_vec();
    let n = v.len();
    v.rotate_left(turn % n);
    v
}

/// Splits sets into `Sets` messages of about `max` encoded bytes (a set larger
/// than that gets a message of its own). No sets: no messages.
pub fn split_sets<A>(sets: Vec<SignedSet<A>>, max: usize) -> Vec<DnsMsg<A>> {
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut size = 0;
    for s in sets {
        let len = 96 + s.set.records.iter().map(|r| r.name.len() + r.target.len() + std::mem::size_of::<A>() + 4).sum::<usize>();
        if !chunk.is_empty() && size + len > max {
            out.push(DnsMsg::Sets(std::mem::take(&mut chunk)));
            size = 0;
        }
        size += len;
        chunk.push(s);
    }
    if !chunk.is_empty() {
        out.push(DnsMsg::Sets(chunk));
    }
    out
}

/// `d.c.b.a.in-addr.arpa.` → `a.b.c.d`.
pub fn parse_reverse(q: &str) -> Option<Ipv4Addr> {
    let body = q.strip_suffix(".in-addr.arpa.")?;
    let parts: Vec<&str> = body.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut o = [0u8; 4];
    for (i, p) in parts.iter().rev().enumerate() {
        if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        o[i] = p.parse().ok()?;
    }
    Some(Ipv4Addr::from(o))
}

/// The reverse name of `addr` (`4.3.2.1.in-addr.arpa.`).
pub fn reverse_name(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
}

/// A lowercase `ip6.arpa.` name in nibble format (32 single hex digits, least
/// significant first, RFC 3596) → the address. Anything else (fewer nibbles: a
/// zone, not an address; upper case; two-digit labels) is None.
pub fn parse_reverse6(q: &str) -> Option<Ipv6Addr> {
    let body = q.strip_suffix(".ip6.arpa.")?;
    let mut bits: u128 = 0;
    let mut n = 0;
    for (i, p) in body.split('.').enumerate() {
        let &[c] = p.as_bytes() else { return None };
        let nibble = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        if i >= 32 {
            return None;
        }
        bits |= u128::from(nibble) << (4 * i);
        n = i + 1;
    }
    (n == 32).then(|| Ipv6Addr::from(bits))
}

/// The reverse name of `addr` (`…b.a.9.8.ip6.arpa.`, RFC 3596 nibble format).
pub fn reverse_name6(addr: Ipv6Addr) -> String {
    let bits = u128::from(addr);
    let mut s = String::with_capacity(73);
    for i in 0..32 {
        let nibble = ((bits >> (4 * i)) & 0xf) as u32;
        s.push(char::from_digit(nibble, 16).unwrap_or('0'));
        s.push('.');
    }
    s.push_str("ip6.arpa.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::trust::Binding;

    const D: &str = "meshnet.local.";

    struct Peer {
        name: PeerName,
        signer: Signer,
        binding: Binding,
    }

    fn peer(n: u64) -> Peer {
        let id = Identity::generate();
        let signer = Signer::from_identity(&id);
        let name = PeerName(n);
        let binding = Binding::new(name, &id, &signer);
        Peer { name, signer, binding }
    }

    fn book(peers: &[&Peer]) -> KeyBook {
        let mut k = KeyBook::new();
        for p in peers {
            k.admit(&p.binding).unwrap();
        }
        k
    }

    fn rec(name: &str, addr: [u8; 4]) -> Record {
        Record { name: format!("{name}.{D}"), addr: Ipv4Addr::from(addr), target: name.into() }
    }

    fn set(p: &Peer, version: u64, records: Vec<Record>) -> SignedSet {
        let mut records = records;
        records.sort();
        SignedSet::sign(RecordSet { owner: p.name, version, records }, &p.signer)
    }

    #[test]
    fn names_are_normalised_and_checked() {
        assert_eq!(normalize_name("DB", D).unwrap(), "db.meshnet.local.");
        assert_eq!(normalize_name("db.meshnet.local", D).unwrap(), "db.meshnet.local.");
        assert_eq!(normalize_name("a.b.Meshnet.Local.", D).unwrap(), "a.b.meshnet.local.");
        assert_eq!(normalize_name("my_app", D).unwrap(), "my_app.meshnet.local.");
        assert!(matches!(normalize_name("db.example.com", D), Err(DnsError::OutsideDomain { .. })));
        assert!(matches!(normalize_name("meshnet.local.", D), Err(DnsError::OutsideDomain { .. })));
        assert!(matches!(normalize_name("xmeshnet.local.", D), Err(DnsError::OutsideDomain { .. })));
        for bad in ["", "-db", "d b", "db..meshnet.local", "d\u{e9}", &"x".repeat(64), "db!"] {
            assert!(matches!(normalize_name(bad, D), Err(DnsError::BadName(..))), "{bad:?}");
        }
        let long = format!("{}.meshnet.local", vec!["a".repeat(60); 4].join("."));
        assert!(matches!(normalize_name(&long, D), Err(DnsError::BadName(..))));
        assert_eq!(normalize_domain("Weave.Local").unwrap(), "weave.local.");
        assert!(normalize_domain(".").is_err());
    }

    #[test]
    fn merge_takes_verified_newer_sets_in_any_order() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let keys = book(&[&a, &b, &c]);
        let sets = vec![
            set(&a, 5, vec![rec("db", [10, 0, 0, 1])]),
            set(&a, 7, vec![rec("db", [10, 0, 0, 2]), rec("web", [10, 0, 0, 3])]),
            set(&b, 3, vec![rec("db", [10, 0, 0, 9])]),
            set(&a, 6, vec![]),
        ];
        let mut first: Option<Vec<(PeerName, Record)>> = None;
        // Every order of the same sets gives the same table.
        for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1], [1, 3, 0, 2]] {
            let mut t = Table::new(D, c.name);
            for i in perm {
                t.merge(vec![sets[i].clone()], &keys);
            }
            let now: Vec<(PeerName, Record)> = t.records().map(|(o, r)| (o, r.clone())).collect();
            assert_eq!(t.lookup("db.meshnet.local."), [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 9)]);
            match &first {
                None => first = Some(now),
                Some(f) => assert_eq!(f, &now),
            }
        }
    }

    #[test]
    fn every_rejection_reason_is_counted_from_the_start() {
        let t = TableStats::default();
        assert_eq!(t.sets_rejected.len(), Reject::ALL.len());
        assert!(Reject::ALL.iter().all(|r| t.sets_rejected.get(r.label()) == Some(&0)));
    }

    #[test]
    fn stale_forged_unknown_and_malformed_sets_are_refused_and_counted() {
        let (a, b, c, mallory) = (peer(1), peer(2), peer(3), peer(4));
        let keys = book(&[&a, &b, &c]);
        let mut t = Table::new(D, c.name);
        let r = t.merge(vec![set(&a, 5, vec![rec("db", [10, 0, 0, 1])])], &keys);
        assert_eq!(r.changed, vec![a.name]);
        // Stale.
        let r = t.merge(vec![set(&a, 4, vec![rec("evil", [10, 0, 0, 6])])], &keys);
        assert_eq!((r.changed.len(), r.stale), (0, 1));
        // Forged: signed by b, claiming to be a; and a version bumped by a relay.
        let mut forged = set(&b, 9, vec![rec("db", [6, 6, 6, 6])]);
        forged.set.owner = a.name;
        let mut bumped = set(&a, 6, vec![rec("db", [10, 0, 0, 1])]);
        bumped.set.version = 99;
        // Unknown owner (no key pinned), unsigned (zero signature).
        let unknown = set(&mallory, 1, vec![rec("x", [1, 1, 1, 1])]);
        let mut unsigned = set(&b, 1, vec![rec("y", [1, 1, 1, 2])]);
        unsigned.sig = Signature([0; 64]);
        // Malformed: outside the domain, unsorted, bad syntax.
        let outside = set(&b, 2, vec![Record { name: "db.example.com.".into(), addr: Ipv4Addr::LOCALHOST, target: "t".into() }]);
        let mut unsorted = set(&b, 3, vec![]);
        unsorted.set.records = vec![rec("z", [1, 1, 1, 1]), rec("a", [1, 1, 1, 1])];
        unsorted = SignedSet::sign(unsorted.set, &b.signer);
        let bad_name = set(&b, 4, vec![Record { name: "a b.meshnet.local.".into(), addr: Ipv4Addr::LOCALHOST, target: "t".into() }]);
        let own = set(&c, 100, vec![rec("me", [1, 2, 3, 4])]);
        let r = t.merge(vec![forged, bumped, unknown, unsigned, outside, unsorted, bad_name, own], &keys);
        assert!(r.changed.is_empty());
        let why: Vec<Reject> = r.rejected.iter().map(|x| x.1).collect();
        assert_eq!(
            why,
            [
                Reject::BadSignature,
                Reject::BadSignature,
                Reject::UnknownOwner,
                Reject::BadSignature,
                Reject::OtherDomain,
                Reject::Malformed,
                Reject::Malformed,
                Reject::Own
            ]
        );
        assert_eq!(t.lookup("db.meshnet.local."), [Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats.sets_rejected["bad_signature"], 3);
        // A name outside the domain is counted apart: the owner's --dns-domain differs.
        assert_eq!(t.stats.sets_rejected["other_domain"], 1);
        assert_eq!(t.stats.sets_rejected["malformed"], 2);
        assert_eq!(t.stats.sets_stale, 1);
    }

    #[test]
    fn a_removal_is_a_newer_version_and_heals_after_a_partition() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let keys = book(&[&a, &b, &c]);
        let mut ta = Table::new(D, a.name);
        let mut tb = Table::new(D, b.name);
        let mut tc = Table::new(D, c.name);
        let v1 = ta.next_version(1000);
        let s1 = ta.set_own(vec![rec("db", [10, 0, 0, 1])], v1, &a.signer).unwrap();
        tb.merge(vec![s1.clone()], &keys);
        tc.merge(vec![s1], &keys);
        // Partition: only b hears the removal.
        let v2 = ta.next_version(999);
        assert_eq!(v2, 1001, "versions grow even when the clock goes back");
        let s2 = ta.set_own(vec![], v2, &a.signer).unwrap();
        tb.merge(vec![s2], &keys);
        assert_eq!(tb.resolve("db.meshnet.local", QueryType::A, 0), Answer::NxDomain);
        assert_eq!(tc.resolve("db.meshnet.local", QueryType::A, 0), Answer::Addresses(vec![Ipv4Addr::new(10, 0, 0, 1)]));
        // Healed: c's digest differs from b's; b's summary brings c the new set,
        // and c's stale copy never comes back to b.
        let d = tc.digest();
        let Some(DnsMsg::Summary { versions, answer }) = tb.on_digest(7, d, 0) else { panic!("summary expected") };
        let out = tc.on_summary(8, &versions, answer, 0);
        assert!(out.iter().all(|m| !matches!(m, DnsMsg::Sets(_))), "c holds nothing newer");
        let Some(DnsMsg::Summary { versions, answer }) = out.into_iter().next() else { panic!("c asks back") };
        assert!(!answer);
        for m in tb.on_summary(7, &versions, answer, 0) {
            if let DnsMsg::Sets(s) = m {
                tc.merge(s, &keys);
            }
        }
        assert_eq!(tc.resolve("db.meshnet.local.", QueryType::A, 0), Answer::NxDomain);
        assert_eq!(tc.digest(), tb.digest());
        let r = tb.merge(tc.all_signed(), &keys);
        assert!(r.changed.is_empty() && r.rejected.is_empty() && r.stale == 1, "{r:?}");
    }

    #[test]
    fn rmpeer_drops_a_set_and_stale_gossip_does_not_bring_it_back() {
        let (a, c) = (peer(1), peer(3));
        let keys = book(&[&a, &c]);
        let mut t = Table::new(D, c.name);
        let old = set(&a, 500, vec![rec("db", [10, 0, 0, 1])]);
        t.merge(vec![old.clone()], &keys);
        assert!(t.remove_owner(a.name, 1000));
        assert!(t.is_empty());
        let r = t.merge(vec![old, set(&a, 1000, vec![rec("db", [10, 0, 0, 2])])], &keys);
        assert_eq!(r.rejected, vec![(a.name, Reject::Removed), (a.name, Reject::Removed)]);
        assert_eq!(t.resolve("db.meshnet.local.", QueryType::A, 0), Answer::NxDomain);
        // A reinstalled peer publishes later, above the tombstone.
        let r = t.merge(vec![set(&a, 1001, vec![rec("db", [10, 0, 0, 3])])], &keys);
        assert_eq!(r.changed, vec![a.name]);
        assert!(!t.remove_owner(c.name, 0), "our own set is never removed");
    }

    #[test]
    fn answers_rotate_and_tell_nodata_nxdomain_and_forward_apart() {
        let (a, b) = (peer(1), peer(2));
        let keys = book(&[&a, &b]);
        let mut t = Table::new(D, b.name);
        t.merge(vec![set(&a, 1, vec![rec("db", [10, 0, 0, 1]), rec("db", [10, 0, 0, 2]), rec("web", [10, 0, 0, 3])])], &keys);
        t.set_own(vec![rec("db", [10, 0, 0, 4])], 1, &b.signer).unwrap();
        let all = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 4)];
        let firsts: Vec<Ipv4Addr> = (0..3)
            .map(|turn| match t.resolve("DB.meshnet.local.", QueryType::A, turn) {
                Answer::Addresses(v) => {
                    let mut s = v.clone();
                    s.sort();
                    assert_eq!(s, all);
                    v[0]
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(firsts, all, "each address comes first in turn");
        assert_eq!(t.resolve("db.meshnet.local.", QueryType::Other, 0), Answer::NoData);
        assert_eq!(t.resolve("nope.meshnet.local.", QueryType::Other, 0), Answer::NxDomain);
        assert_eq!(t.resolve("example.com.", QueryType::A, 0), Answer::Forward);
        assert_eq!(
            t.resolve("3.0.0.10.in-addr.arpa.", QueryType::Ptr, 0),
            Answer::Names(vec!["web.meshnet.local.".into()])
        );
        assert_eq!(t.resolve("9.0.0.10.in-addr.arpa.", QueryType::Ptr, 0), Answer::Forward);
        // A single label (a resolver without the search domain) is a name of
        // the domain when the table holds it; any other is forwarded.
        assert_eq!(t.resolve("WEB.", QueryType::A, 0), Answer::Addresses(vec![Ipv4Addr::new(10, 0, 0, 3)]));
        assert_eq!(t.resolve("web", QueryType::A, 0), Answer::Addresses(vec![Ipv4Addr::new(10, 0, 0, 3)]));
        assert_eq!(t.resolve("web.", QueryType::Other, 0), Answer::NoData);
        assert_eq!(t.resolve("nope.", QueryType::A, 0), Answer::Forward);
        assert_eq!(t.resolve("com.", QueryType::Other, 0), Answer::Forward);
        assert_eq!(t.resolve(".", QueryType::Other, 0), Answer::Forward);
        assert_eq!(parse_reverse(&reverse_name(Ipv4Addr::new(1, 2, 3, 4))), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(parse_reverse("01.0.0.10.in-addr.arpa."), None);
        assert!(t.set_own(vec![Record { name: "x.example.".into(), addr: Ipv4Addr::LOCALHOST, target: "t".into() }], 2, &b.signer).is_err());
        assert_eq!(t.own_version(), 1, "a refused set changes nothing");
    }

    #[test]
    fn messages_are_bounded() {
        let a = peer(1);
        let big = set(&a, 1, vec![]);
        assert!(DnsMsg::Sets(vec![big.clone(); MAX_OWNERS + 1]).check().is_err());
        assert!(DnsMsg::<Ipv4Addr>::Summary { versions: vec![(a.name, 1); MAX_OWNERS + 1], answer: true }.check().is_err());
        let mut many = big;
        many.set.records = (0..=MAX_RECORDS as u32).map(|i| rec(&format!("n{i}"), i.to_be_bytes())).collect();
        assert_eq!(DnsMsg::Sets(vec![many]).check(), Err(DnsError::TooManyRecords));
        let parts = split_sets(vec![set(&a, 1, vec![rec("a", [1, 1, 1, 1])]); 10], 300);
        assert_eq!(parts.len(), 5);
    }

    /// BENCHMARKS.md's 1000-record table: what its gossip costs on the wire
    /// and what a lookup costs (release build; the bounds are loose).
    #[test]
    fn a_thousand_records() {
        let peers: Vec<Peer> = (1..=10).map(peer).collect();
        let keys = book(&peers.iter().collect::<Vec<_>>());
        let mut t = Table::new(D, PeerName(99));
        let sets: Vec<SignedSet> = peers
            .iter()
            .enumerate()
            .map(|(p, peer)| {
                let records = (0..100u32).map(|i| rec(&format!("container-{p}-{i}"), [10, 32, p as u8, i as u8])).collect();
                set(peer, 1, records)
            })
            .collect();
        let started = std::time::Instant::now();
        let report = t.merge(sets.clone(), &keys);
        let merge_us = started.elapsed().as_micros();
        assert_eq!((report.changed.len(), t.len()), (10, 1000));
        let whole: usize = split_sets(t.all_signed(), SETS_CHUNK_BYTES)
            .into_iter()
            .map(|m| crate::wire::control::encode_message(&crate::wire::control::ControlMsg::Dns(m)).unwrap().len())
            .sum();
        let one = crate::wire::control::encode_message(&crate::wire::control::ControlMsg::Dns(DnsMsg::Sets(vec![sets[0].clone()]))).unwrap().len();
        let digest = crate::wire::control::encode_message(&crate::wire::control::ControlMsg::Dns(DnsMsg::Digest(t.digest()))).unwrap().len();
        let n = 100_000;
        let started = std::time::Instant::now();
        let mut found = 0;
        for i in 0..n {
            let name = format!("container-{}-{}.meshnet.local.", i % 10, i % 100);
            if matches!(t.resolve(&name, QueryType::A, i), Answer::Addresses(_)) {
                found += 1;
            }
        }
        let ns = started.elapsed().as_nanos() / n as u128;
        assert_eq!(found, n);
        eprintln!("1000 records: whole table {whole} bytes, one owner's change (100 records) {one} bytes, digest {digest} bytes; merge of 10 sets {merge_us} us; lookup {ns} ns");
        assert!(whole < 100_000 && digest < 40, "{whole} {digest}");
    }

    fn rec6(name: &str, addr: &str) -> Record6 {
        Record { name: format!("{name}.{D}"), addr: addr.parse().unwrap(), target: name.into() }
    }

    fn set6(p: &Peer, version: u64, records: Vec<Record6>) -> SignedSet6 {
        let mut records = records;
        records.sort();
        SignedSet::sign(RecordSet { owner: p.name, version, records }, &p.signer)
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn aaaa_answers_rotate_and_a_missing_family_is_nodata() {
        let (a, b) = (peer(1), peer(2));
        let keys = book(&[&a, &b]);
        let mut t4 = Table::new(D, b.name);
        let mut t6 = Table6::new(D, b.name);
        t4.merge(vec![set(&a, 1, vec![rec("db", [10, 0, 0, 1]), rec("only4", [10, 0, 0, 2])])], &keys);
        let r = t6.merge(vec![set6(&a, 1, vec![rec6("db", "fd32::5"), rec6("db", "fd32::6"), rec6("only6", "fd32::7")])], &keys);
        assert_eq!(r.changed, vec![a.name]);
        t6.set_own(vec![rec6("db", "fd32::1")], 1, &b.signer).unwrap();
        let all = [v6("fd32::1"), v6("fd32::5"), v6("fd32::6")];
        let firsts: Vec<Ipv6Addr> = (0..3)
            .map(|turn| match resolve(&t4, &t6, "DB.meshnet.local", QueryType::Aaaa, turn) {
                Answer::Addresses6(v) => {
                    let mut s = v.clone();
                    s.sort();
                    assert_eq!(s, all);
                    v[0]
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(firsts, all, "each address comes first in turn");
        assert_eq!(resolve(&t4, &t6, "db.meshnet.local.", QueryType::A, 0), Answer::Addresses(vec![Ipv4Addr::new(10, 0, 0, 1)]));
        // One family only: the other is NOERROR with no data, never NXDOMAIN.
        assert_eq!(resolve(&t4, &t6, "only4.meshnet.local.", QueryType::Aaaa, 0), Answer::NoData);
        assert_eq!(resolve(&t4, &t6, "only6.meshnet.local.", QueryType::A, 0), Answer::NoData);
        assert_eq!(resolve(&t4, &t6, "only6.meshnet.local.", QueryType::Other, 0), Answer::NoData);
        assert_eq!(
            resolve(&t4, &t6, "only6.meshnet.local.", QueryType::Aaaa, 5),
            Answer::Addresses6(vec![v6("fd32::7")])
        );
        assert_eq!(resolve(&t4, &t6, "nope.meshnet.local.", QueryType::Aaaa, 0), Answer::NxDomain);
        assert_eq!(resolve(&t4, &t6, "meshnet.local.", QueryType::Aaaa, 0), Answer::NoData);
        assert_eq!(resolve(&t4, &t6, "example.com.", QueryType::Aaaa, 0), Answer::Forward);
        // The IPv4 table alone does not know IPv6 names.
        assert_eq!(t4.resolve("only6.meshnet.local.", QueryType::A, 0), Answer::NxDomain);
        // PTR of both families; reverse names of other addresses are forwarded.
        assert_eq!(
            resolve(&t4, &t6, &reverse_name6(v6("fd32::7")), QueryType::Ptr, 0),
            Answer::Names(vec!["only6.meshnet.local.".into()])
        );
        assert_eq!(
            resolve(&t4, &t6, &reverse_name(Ipv4Addr::new(10, 0, 0, 2)), QueryType::Ptr, 0),
            Answer::Names(vec!["only4.meshnet.local.".into()])
        );
        assert_eq!(resolve(&t4, &t6, &reverse_name6(v6("fd32::99")), QueryType::Ptr, 0), Answer::Forward);
        // A removal is a newer set without the record.
        t6.set_own(vec![], 2, &b.signer).unwrap();
        let v = match resolve(&t4, &t6, "db.meshnet.local.", QueryType::Aaaa, 0) {
            Answer::Addresses6(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(v, [v6("fd32::5"), v6("fd32::6")]);
    }

    #[test]
    fn ip6_arpa_names_round_trip_and_malformed_ones_are_refused() {
        let a = v6("fd32:1:2:3::5");
        let name = reverse_name6(a);
        assert_eq!(name, "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.2.3.d.f.ip6.arpa.");
        for addr in ["::", "::1", "fd32::5", "2001:db8::dead:beef", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe80::1:2:3:4"] {
            assert_eq!(parse_reverse6(&reverse_name6(v6(addr))), Some(v6(addr)), "{addr}");
        }
        let body = name.strip_suffix(".ip6.arpa.").unwrap();
        for bad in [
            "ip6.arpa.".to_string(),
            "d.f.ip6.arpa.".to_string(),                        // a zone, not an address
            format!("0.{name}"),                                // 33 nibbles
            name[2..].to_string(),                              // 31 nibbles
            name.replacen('5', "05", 1),                        // two digits in a label
            name.replacen('d', "g", 1),                         // not hex
            name.replacen('5', "", 1),                          // empty label
            format!("{body}.ip6.arpa"),                         // not fully qualified
            format!("{body}.in-addr.arpa."),
        ] {
            assert_eq!(parse_reverse6(&bad), None, "{bad}");
        }
        // Questions are lowercased before parsing.
        assert_eq!(parse_reverse6(&name.to_ascii_uppercase()), None);
        assert_eq!(parse_reverse(&name), None);
    }

    #[test]
    fn forged_and_cross_family_ipv6_sets_are_refused() {
        let (a, b, c, mallory) = (peer(1), peer(2), peer(3), peer(4));
        let keys = book(&[&a, &b, &c]);
        let mut t = Table6::new(D, c.name);
        t.merge(vec![set6(&a, 5, vec![rec6("db", "fd32::1")])], &keys);
        // Signed by b, claiming a.
        let mut forged = set6(&b, 9, vec![rec6("db", "fd66::6")]);
        forged.set.owner = a.name;
        // An IPv4 set's signature replayed on an IPv6 set of the same owner and version.
        let four = set(&a, 10, vec![]);
        let replay = SignedSet { set: RecordSet { owner: a.name, version: 10, records: vec![] }, sig: four.sig };
        // A version bumped by a relay; an unknown owner; unsorted records.
        let mut bumped = set6(&a, 6, vec![rec6("db", "fd32::1")]);
        bumped.set.version = 99;
        let unknown = set6(&mallory, 1, vec![rec6("x", "fd32::9")]);
        let mut unsorted = set6(&b, 3, vec![]);
        unsorted.set.records = vec![rec6("z", "fd32::1"), rec6("a", "fd32::1")];
        let unsorted = SignedSet::sign(unsorted.set, &b.signer);
        let r = t.merge(vec![forged, replay, bumped, unknown, unsorted], &keys);
        assert!(r.changed.is_empty(), "{r:?}");
        let why: Vec<Reject> = r.rejected.iter().map(|x| x.1).collect();
        assert_eq!(why, [Reject::BadSignature, Reject::BadSignature, Reject::BadSignature, Reject::UnknownOwner, Reject::Malformed]);
        assert_eq!(t.lookup("db.meshnet.local."), [v6("fd32::1")]);
        // And the other way round: an IPv6 set's signature is no IPv4 set's.
        let six = set6(&b, 20, vec![]);
        let mut t4: Table = Table::new(D, c.name);
        let r = t4.merge(vec![SignedSet { set: RecordSet { owner: b.name, version: 20, records: vec![] }, sig: six.sig }], &keys);
        assert_eq!(r.rejected, vec![(b.name, Reject::BadSignature)]);
        // rmpeer drops the IPv6 set too, and stale copies stay out.
        let old = set6(&a, 5, vec![rec6("db", "fd32::1")]);
        assert!(t.remove_owner(a.name, 1000));
        assert_eq!(t.merge(vec![old], &keys).rejected, vec![(a.name, Reject::Removed)]);
        assert!(t.is_empty());
    }

    /// What peers of the previous build see: IPv4 sets and messages are the
    /// same bytes as before (the signed message pinned here byte for byte, and
    /// `ControlMsg::Dns` keeps its tag), and IPv6 gossip is a new tag after
    /// every old one, which an old peer is never sent (`CAP_DNS6`).
    #[test]
    fn ipv4_sets_keep_the_previous_wire_format() {
        use crate::wire::control::{decode_message, encode_message, ControlMsg};
        let set = RecordSet {
            owner: PeerName(0x0102_0304_0506),
            version: 7,
            records: vec![Record { name: "a.meshnet.local.".into(), addr: Ipv4Addr::new(10, 0, 0, 1), target: "t".into() }],
        };
        let mut want = vec![0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1, 0, 16];
        want.extend_from_slice(b"a.meshnet.local.");
        want.extend_from_slice(&[10, 0, 0, 1, 0, 1, b't']);
        assert_eq!(set.message(), want);
        let a = peer(1);
        let four = ControlMsg::Dns(DnsMsg::Sets(vec![self::set(&a, 1, vec![rec("db", [10, 0, 0, 1])])]));
        let six = ControlMsg::Dns6(DnsMsg::Sets(vec![set6(&a, 1, vec![rec6("db", "fd32::1")])]));
        let (b4, b6) = (encode_message(&four).unwrap(), encode_message(&six).unwrap());
        // A message body starts with the variant's tag.
        assert_eq!(b4[0], 7, "ControlMsg::Dns keeps its tag");
        assert_eq!(b6[0], 10, "ControlMsg::Dns6 comes after every older variant");
        assert_eq!(decode_message(&b4).unwrap(), four);
        assert_eq!(decode_message(&b6).unwrap(), six);
        // An IPv6 record has the address's 16 bytes where an IPv4 one has 4: a
        // previous build could not parse it, which is why it never gets one.
        let m6 = RecordSet { owner: set.owner, version: 7, records: vec![rec6("a", "fd32::1")] }.message();
        assert_eq!(m6.len(), want.len() + 12);
    }

    #[test]
    fn summaries_to_one_neighbour_are_rate_limited() {
        let (a, b) = (peer(1), peer(2));
        let keys = book(&[&a]);
        let mut t = Table::new(D, b.name);
        t.merge(vec![set(&a, 1, vec![rec("a", [1, 1, 1, 1])])], &keys);
        let other = Digest { owners: 0, hash: [0; 16] };
        assert!(t.on_digest(1, other, 0).is_some());
        assert!(t.on_digest(1, other, 10).is_none());
        assert!(t.on_digest(2, other, 10).is_some());
        assert!(t.on_digest(1, other, SUMMARY_EVERY_MS).is_some());
        assert!(t.on_digest(3, t.digest(), 0).is_none(), "equal digests need nothing");
    }
}
