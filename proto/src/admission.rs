//! Who may open a control connection to us now: the decisions that keep strangers
//! from starving the router.
//!
//! An inbound TCP connection is judged here before any handshake work, by its
//! source (an IPv4 address, or an IPv6 /64):
//! - **accept rate**: a token bucket per source ([`AdmissionConfig::source_rate`]
//!   a second, bursts of [`AdmissionConfig::source_burst`]);
//! - **failed passwords**: after each wrong password from a source, it waits
//!   `fail_backoff_start × 2^(failures-1)` (capped) before it may try again; a
//!   handshake that completes clears it;
//! - **half-open connections** (accepted, handshake not finished) have their own
//!   small cap, overall and per source, apart from the `--conn-limit` slots for
//!   established connections, which they can never take;
//! - **established slots**: when `--conn-limit` is reached nothing new is let in.
//!
//! Every refusal is counted by reason ([`AdmissionStats`]), never logged per
//! connection. The table of sources is bounded ([`AdmissionConfig::max_sources`]).
//!
//! Never does: I/O or timing (the caller accepts, closes, bounds the handshake's
//! duration and passes `now` in milliseconds). Outbound dials never come here.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The limits of a [`Gate`].
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// Most inbound connections still handshaking, from all sources together.
    pub pending_limit: usize,
    /// Most inbound connections still handshaking from one source.
    pub source_pending_limit: u32,
    /// Accepts a second one source may make, sustained.
    pub source_rate: u32,
    /// Accepts one source may make at once.
    pub source_burst: u32,
    /// Wait after a source's first wrong password; doubles with each further one.
    pub fail_backoff_start_ms: u64,
    pub fail_backoff_cap_ms: u64,
    /// A source idle this long (nothing pending, not backing off) is forgotten.
    pub forget_after_ms: u64,
    /// Most sources remembered; the longest idle is forgotten first.
    pub max_sources: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            pending_limit: 32,
            source_pending_limit: 4,
            source_rate: 5,
            source_burst: 10,
            fail_backoff_start_ms: 1_000,
            fail_backoff_cap_ms: 300_000,
            forget_after_ms: 600_000,
            max_sources: 4096,
        }
    }
}

/// Why an inbound connection was turned away before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source opens connections faster than its rate.
    RateLimited,
    /// The source recently failed the password; it may try again in `retry_in_ms`.
    PasswordBackoff { retry_in_ms: u64 },
    /// Too many connections are handshaking at once.
    PendingFull,
    /// Too many connections from this source are handshaking at once.
    SourcePendingFull,
    /// Every `--conn-limit` slot holds an established connection.
    ConnLimit,
}

impl Refusal {
    /// Whether the peer should be told why (a legitimate peer can act on it).
    /// Floods are closed without a word: that costs least.
    pub fn worth_telling(self) -> bool {
        matches!(self, Refusal::PasswordBackoff { .. } | Refusal::ConnLimit)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::RateLimited => f.write_str("too many connection attempts"),
            Refusal::PasswordBackoff { retry_in_ms } => write!(
                f,
                "authentication refused: too many failed password attempts from this address, the password was not checked (retry in {}s)",
                retry_in_ms.div_ceil(1000)
            ),
            Refusal::PendingFull => f.write_str("too many connections handshaking"),
            Refusal::SourcePendingFull => f.write_str("too many connections handshaking from this address"),
            Refusal::ConnLimit => f.write_str("too many connections"),
        }
    }
}

/// How an admitted connection's handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Established,
    WrongPassword,
    TimedOut,
    /// Any other failure (bad preamble, version or password-use mismatch, I/O).
    Failed,
}

/// Counters for `status --json` (`limits`). Refusals are by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionStats {
    /// Inbound connections handshaking now.
    pub pending: usize,
    pub pending_limit: usize,
    /// Sources remembered now.
    pub sources: usize,
    pub admitted: u64,
    pub refused_rate_limited: u64,
    pub refused_password_backoff: u64,
    pub refused_pending_full: u64,
    pub refused_source_pending_full: u64,
    pub refused_conn_limit: u64,
    pub handshakes_established: u64,
    pub handshakes_wrong_password: u64,
    pub handshakes_timed_out: u64,
    pub handshakes_failed: u64,
}

/// An admitted connection; hand it back to [`Gate::finished`] exactly once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket holds a pending slot until given back to Gate::finished"]
pub struct Ticket {
    source: Source,
}

/// The unit limits apply to: an IPv4 address or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

#[derive(Clone, Debug)]
struct SourceState {
    /// Tokens × 1000, so refills need no floats.
    milli_tokens: u64,
    refilled_ms: u64,
    pending: u32,
    failures: u32,
    blocked_until_ms: u64,
    last_seen_ms: u64,
}

/// The admission state (see the module docs).
#[derive(Debug)]
pub struct Gate {
    cfg: AdmissionConfig,
    sources: HashMap<Source, SourceState>,
    pending: usize,
    stats: AdmissionStats,
}

impl Gate {
    pub fn new(cfg: AdmissionConfig) -> Gate {
        let stats = AdmissionStats { pending_limit: cfg.pending_limit, ..Default::default() };
        Gate { cfg, sources: HashMap::new(), pending: 0, stats }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Judges a connection just accepted from `ip`. `conn_slots_full`: every
    /// `--conn-limit` slot holds an established connection.
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64, conn_slots_full: bool) -> Result<Ticket, Refusal> {
        let source = Source::of(ip);
        let refusal = self.judge(source, now_ms, conn_slots_full);
        match refusal {
            Err(r) => {
                let counter = match r {
                    Refusal::RateLimited => &mut self.stats.refused_rate_limited,
                    Refusal::PasswordBackoff { .. } => &mut self.stats.refused_password_backoff,
                    Refusal::PendingFull => &mut self.stats.refused_pending_full,
                    Refusal::SourcePendingFull => &mut self.stats.refused_source_pending_full,
                    Refusal::ConnLimit => &mut self.stats.refused_conn_limit,
                };
                *counter += 1;
                Err(r)
            }
            Ok(()) => {
                self.stats.admitted += 1;
                self.pending += 1;
                Ok(Ticket { source })
            }
        }
    }

    fn judge(&mut self, source: Source, now_ms: u64, conn_slots_full: bool) -> Result<(), Refusal> {
        if !self.sources.contains_key(&source) && self.sources.len() >= self.cfg.max_sources {
            self.evict(now_ms);
        }
        let burst = u64::from(self.cfg.source_burst.max(1)) * 1000;
        let rate = u64::from(self.cfg.source_rate.max(1));
        let s = self.sources.entry(source).or_insert(SourceState {
            milli_tokens: burst,
            refilled_ms: now_ms,
            pending: 0,
            failures: 0,
            blocked_until_ms: 0,
            last_seen_ms: now_ms,
        });
        s.last_seen_ms = s.last_seen_ms.max(now_ms);
        let elapsed = now_ms.saturating_sub(s.refilled_ms);
        s.milli_tokens = s.milli_tokens.saturating_add(elapsed.saturating_mul(rate)).min(burst);
        s.refilled_ms = s.refilled_ms.max(now_ms);
        // Every attempt spends a token, so a source cannot probe the other limits
        // faster than its rate.
        if s.milli_tokens < 1000 {
            return Err(Refusal::RateLimited);
        }
        s.milli_tokens -= 1000;
        if now_ms < s.blocked_until_ms {
            return Err(Refusal::PasswordBackoff { retry_in_ms: s.blocked_until_ms - now_ms });
        }
        if s.pending >= self.cfg.source_pending_limit {
            return Err(Refusal::SourcePendingFull);
        }
        if self.pending >= self.cfg.pending_limit {
            return Err(Refusal::PendingFull);
        }
        if conn_slots_full {
            return Err(Refusal::ConnLimit);
        }
        s.pending += 1;
        Ok(())
    }

    /// Gives back a ticket: how its handshake ended.
    pub fn finished(&mut self, ticket: Ticket, outcome: Outcome, now_ms: u64) {
        self.pending = self.pending.saturating_sub(1);
        let counter = match outcome {
            Outcome::Established => &mut self.stats.handshakes_established,
            Outcome::WrongPassword => &mut self.stats.handshakes_wrong_password,
            Outcome::TimedOut => &mut self.stats.handshakes_timed_out,
            Outcome::Failed => &mut self.stats.handshakes_failed,
        };
        *counter += 1;
        let Some(s) = self.sources.get_mut(&ticket.source) else { return };
        s.pending = s.pending.saturating_sub(1);
        s.last_seen_ms = s.last_seen_ms.max(now_ms);
        match outcome {
            Outcome::Established => {
                s.failures = 0;
                s.blocked_until_ms = 0;
            }
            Outcome::WrongPassword => {
                s.failures = s.failures.saturating_add(1);
                let shift = (s.failures - 1).min(32);
                let wait = self.cfg.fail_backoff_start_ms.saturating_mul(1u64 << shift).min(self.cfg.fail_backoff_cap_ms);
                s.blocked_until_ms = now_ms.saturating_add(wait);
            }
            Outcome::TimedOut | Outcome::Failed => {}
        }
    }

    /// Forgets sources idle for `forget_after_ms`; if still full, the longest idle
    /// one with nothing pending, sources backing off from wrong passwords last (a
    /// guesser cannot clear its backoff by opening connections from elsewhere
    /// unless every remembered source is backing off).
    fn evict(&mut self, now_ms: u64) {
        let forget = self.cfg.forget_after_ms;
        self.sources.retain(|_, s| {
            s.pending > 0 || now_ms < s.blocked_until_ms || now_ms.saturating_sub(s.last_seen_ms) < forget
        });
        while self.sources.len() >= self.cfg.max_sources {
            let oldest = self
                .sources
                .iter()
                .filter(|(_, s)| s.pending == 0)
                .min_by_key(|(_, s)| (now_ms < s.blocked_until_ms, s.last_seen_ms));
            match oldest.map(|(k, _)| *k) {
                Some(k) => {
                    self.sources.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Drops sources idle for `forget_after_ms`; call now and then.
    pub fn tick(&mut self, now_ms: u64) {
        // (Same sweep as the first step of `evict`.)
        let forget = self.cfg.forget_after_ms;
        self.sources.retain(|_, s| {
            s.pending > 0 || now_ms < s.blocked_until_ms || now_ms.saturating_sub(s.last_seen_ms) < forget
        });
    }

    pub fn stats(&self) -> AdmissionStats {
        AdmissionStats { pending: self.pending, sources: self.sources.len(), ..self.stats.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn small() -> AdmissionConfig {
        AdmissionConfig { pending_limit: 6, source_pending_limit: 2, source_rate: 5, source_burst: 10, ..Default::default() }
    }

    #[test]
    fn rate_limit_is_per_source_and_refills() {
        let mut g = Gate::new(AdmissionConfig { source_pending_limit: 100, pending_limit: 100, ..small() });
        let a = ip("10.0.0.1");
        let mut tickets = Vec::new();
        for _ in 0..10 {
            tickets.push(g.admit(a, 0, false).unwrap());
        }
        assert_eq!(g.admit(a, 0, false), Err(Refusal::RateLimited));
        // Another source is not affected.
        tickets.push(g.admit(ip("10.0.0.2"), 0, false).unwrap());
        // 5 a second: after 200 ms one more token.
        assert_eq!(g.admit(a, 199, false), Err(Refusal::RateLimited));
        tickets.push(g.admit(a, 200, false).unwrap());
        assert_eq!(g.admit(a, 200, false), Err(Refusal::RateLimited));
        let st = g.stats();
        assert_eq!((st.admitted, st.refused_rate_limited, st.pending), (12, 3, 12));
        for t in tickets {
            g.finished(t, Outcome::Established, 500);
        }
        assert_eq!(g.stats().pending, 0);
    }

    #[test]
    fn half_open_caps_overall_and_per_source() {
        let mut g = Gate::new(small());
        let a = ip("10.0.0.1");
        let t1 = g.admit(a, 0, false).unwrap();
        let _t2 = g.admit(a, 0, false).unwrap();
        assert_eq!(g.admit(a, 0, false), Err(Refusal::SourcePendingFull));
        g.finished(t1, Outcome::TimedOut, 10);
        let _t3 = g.admit(a, 10, false).unwrap();
        let mut others = Vec::new();
        for n in 2..6 {
            others.push(g.admit(ip(&format!("10.0.0.{n}")), 10, false).unwrap());
        }
        // 6 pending: nobody else gets in, whatever the source.
        assert_eq!(g.admit(ip("10.0.0.9"), 10, false), Err(Refusal::PendingFull));
        g.finished(others.pop().unwrap(), Outcome::Failed, 20);
        let t = g.admit(ip("10.0.0.9"), 20, false).unwrap();
        let st = g.stats();
        assert_eq!((st.refused_source_pending_full, st.refused_pending_full, st.handshakes_timed_out), (1, 1, 1));
        assert_eq!(st.pending, 6);
        g.finished(t, Outcome::Established, 30);
        // Established slots full: refused, and the pending slot is not taken.
        assert_eq!(g.admit(ip("10.0.0.10"), 30, true), Err(Refusal::ConnLimit));
        assert_eq!(g.stats().pending, 5);
    }

    #[test]
    fn wrong_passwords_back_off_exponentially_and_success_clears() {
        let cfg = AdmissionConfig { fail_backoff_start_ms: 1000, fail_backoff_cap_ms: 8000, source_burst: 100, ..small() };
        let mut g = Gate::new(cfg);
        let a = ip("10.0.0.1");
        let mut now = 0;
        for wait in [1000u64, 2000, 4000, 8000, 8000] {
            let t = g.admit(a, now, false).unwrap();
            g.finished(t, Outcome::WrongPassword, now);
            assert_eq!(g.admit(a, now + wait - 1, false), Err(Refusal::PasswordBackoff { retry_in_ms: 1 }));
            // Others are not held back.
            let o = g.admit(ip("10.0.0.2"), now, false).unwrap();
            g.finished(o, Outcome::Established, now);
            now += wait;
        }
        assert_eq!(g.stats().handshakes_wrong_password, 5);
        assert_eq!(g.stats().refused_password_backoff, 5);
        let t = g.admit(a, now, false).unwrap();
        g.finished(t, Outcome::Established, now);
        let t = g.admit(a, now, false).unwrap();
        g.finished(t, Outcome::WrongPassword, now);
        assert!(matches!(g.admit(a, now + 999, false), Err(Refusal::PasswordBackoff { .. })), "back to 1 s");
        assert!(g.admit(a, now + 1000, false).is_ok());
        let shown = Refusal::PasswordBackoff { retry_in_ms: 1500 }.to_string();
        // Refused before any password is checked: it must not say the (maybe
        // now right) password differs, as it did.
        assert!(shown.contains("too many failed password attempts") && shown.contains("retry in 2s"), "{shown}");
        assert!(!shown.contains("passwords differ"), "{shown}");
    }

    #[test]
    fn ipv6_sources_are_their_slash_64() {
        let mut g = Gate::new(small());
        let _a = g.admit(ip("2001:db8::1"), 0, false).unwrap();
        let _b = g.admit(ip("2001:db8::ffff:2"), 0, false).unwrap();
        assert_eq!(g.admit(ip("2001:db8:0:0:1234::3"), 0, false), Err(Refusal::SourcePendingFull));
        assert!(g.admit(ip("2001:db8:0:1::1"), 0, false).is_ok());
        let _m = g.admit(ip("::ffff:10.0.0.1"), 0, false).unwrap();
        let _n = g.admit(ip("10.0.0.1"), 0, false).unwrap();
        assert_eq!(g.admit(ip("10.0.0.1"), 0, false), Err(Refusal::SourcePendingFull), "v4-mapped is the v4 source");
    }

    #[test]
    fn the_source_table_is_bounded_and_keeps_backoffs() {
        let cfg = AdmissionConfig { max_sources: 50, forget_after_ms: 1000, ..small() };
        let mut g = Gate::new(cfg);
        let guesser = ip("10.9.9.9");
        let t = g.admit(guesser, 0, false).unwrap();
        g.finished(t, Outcome::WrongPassword, 0);
        for n in 0..10_000u32 {
            let a = IpAddr::from((0x0a00_0000u32 | n).to_be_bytes());
            if let Ok(t) = g.admit(a, 100 + u64::from(n) / 100, false) {
                g.finished(t, Outcome::Failed, 100);
            }
            assert!(g.stats().sources <= 50);
        }
        // The guesser is the longest idle, but backing off: it was kept.
        assert!(matches!(g.admit(guesser, 200, false), Err(Refusal::PasswordBackoff { .. })));
        g.tick(5000);
        assert_eq!(g.stats().sources, 0, "all idle past forget_after_ms");
    }

    #[test]
    fn refusals_worth_telling() {
        assert!(Refusal::ConnLimit.worth_telling());
        assert!(Refusal::PasswordBackoff { retry_in_ms: 1 }.worth_telling());
        assert!(!Refusal::RateLimited.worth_telling());
        assert!(!Refusal::PendingFull.worth_telling());
    }
}
