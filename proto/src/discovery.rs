//! How fast a router may dial addresses it learnt from gossip.
//!
//! Connection addresses in gossip are only as true as the member that sent them:
//! forged ones would otherwise turn every router into a dialler of
//! attacker-chosen addresses. [`DialBudget`] caps discovery dials at a number
//! in flight at once and a rate (a token bucket); connect targets the operator
//! gave are not counted. Time is passed in (milliseconds on any monotonic clock).

/// Most discovery dials (connect plus handshake) under way at once.
pub const MAX_IN_FLIGHT: usize = 8;
/// New discovery dials per second, on average.
pub const PER_SECOND: u32 = 4;
/// How many may start at once after a quiet spell.
pub const BURST: u32 = 8;

/// A token bucket plus an in-flight cap.
#[derive(Clone, Debug)]
pub struct DialBudget {
    max_in_flight: usize,
    per_second: u32,
    burst: u32,
    /// Tokens, in thousandths.
    milli_tokens: u64,
    last_ms: Option<u64>,
}

impl Default for DialBudget {
    fn default() -> Self {
        DialBudget::new(MAX_IN_FLIGHT, PER_SECOND, BURST)
    }
}

impl DialBudget {
    pub fn new(max_in_flight: usize, per_second: u32, burst: u32) -> Self {
        DialBudget { max_in_flight, per_second, burst, milli_tokens: burst as u64 * 1000, last_ms: None }
    }

    /// May one more discovery dial start now, with `in_flight` under way? Takes a
    /// token if so.
    pub fn take(&mut self, now_ms: u64, in_flight: usize) -> bool {
        let elapsed = self.last_ms.map_or(0, |last| now_ms.saturating_sub(last));
        self.last_ms = Some(self.last_ms.map_or(now_ms, |last| last.max(now_ms)));
        let cap = self.burst as u64 * 1000;
        self.milli_tokens = (self.milli_tokens + elapsed.saturating_mul(self.per_second as u64)).min(cap);
        if in_flight >= self.max_in_flight || self.milli_tokens < 1000 {
            return false;
        }
        self.milli_tokens -= 1000;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_and_in_flight_cap() {
        let mut b = DialBudget::new(3, 4, 5);
        // In-flight cap: the fourth waits even with tokens left.
        assert!((0..3).all(|i| b.take(0, i)));
        assert!(!b.take(0, 3));
        // Burst of 5: two more tokens, then none.
        assert!(b.take(0, 0) && b.take(0, 0));
        assert!(!b.take(0, 0));
        // 4 per second: one every 250 ms.
        assert!(!b.take(200, 0));
        assert!(b.take(250, 0));
        assert!(!b.take(400, 0));
        // A long pause refills only up to the burst.
        let allowed = (0..20).filter(|_| b.take(60_000, 0)).count();
        assert_eq!(allowed, 5);
        // Over ten seconds, steady asking gets about 40.
        let mut n = 0;
        for t in (60_000..70_000).step_by(10) {
            n += b.take(t, 0) as u32;
        }
        assert!((39..=41).contains(&n), "{n}");
        // A clock that goes back gives nothing for free.
        assert!(!b.take(10, 0));
    }
}
