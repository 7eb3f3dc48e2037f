//! Anti-replay window for the data plane's per-session counters.
//!
//! A sliding bitmap in the style of RFC 6479: the bitmap is a ring of 64-bit
//! blocks, and moving the window forward only clears the blocks it enters, so an
//! update costs O(1) no matter how far the counter jumps. The window remembers the
//! highest counter accepted and the [`WINDOW`] counters below it; anything older
//! is rejected as too old, anything newer is accepted and slides the window.
//!
//! This module owns only the bookkeeping. It never decides *whether* a datagram is
//! authentic: callers [`check`](ReplayWindow::check) before spending work on
//! decryption and [`update`](ReplayWindow::update) only after authentication
//! succeeded, so forged datagrams cannot move the window.

/// Bits per bitmap block.
const BLOCK_BITS: u64 = 64;
/// Number of blocks in the ring (a power of two).
const BLOCKS: usize = 64;
const BLOCK_MASK: u64 = BLOCKS as u64 - 1;

/// How many counters below the highest accepted one are still tracked.
///
/// One block of the ring is the partially-filled "current" block, so the
/// window is one block short of the bitmap.
pub const WINDOW: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;
const _: () = assert!(WINDOW >= 2048 && BLOCKS.is_power_of_two());

/// Counters at or above this are never accepted, so `highest + 1` cannot overflow.
/// [`crate::session::SealKey`] stops below it.
pub const COUNTER_LIMIT: u64 = u64::MAX;

/// Remembers which counters of one session were already accepted.
#[derive(Clone)]
pub struct ReplayWindow {
    /// One past the highest counter accepted so far; 0 when none was.
    next: u64,
    bitmap: [u64; BLOCKS],
}

impl ReplayWindow {
    /// An empty window: every counter below [`COUNTER_LIMIT`] would be accepted.
    pub fn new() -> Self {
        ReplayWindow { next: 0, bitmap: [0; BLOCKS] }
    }

    /// One past the highest counter accepted so far (0 if none was).
    pub fn next_expected(&self) -> u64 {
        self.next
    }

    /// Whether `counter` would be accepted: not seen before and at most
    /// [`WINDOW`] below the highest accepted one.
    // `>=` stays correct should the limit ever be lowered below `u64::MAX`.
    #[allow(clippy::absurd_extreme_comparisons)]
    pub fn check(&self, counter: u64) -> bool {
        if counter >= COUNTER_LIMIT {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        // Here next >= 1, so `next - 1` is the highest counter accepted.
        if (self.next - 1) - counter > WINDOW {
            return false;
        }
        let (block, bit) = Self::position(counter);
        self.bitmap[block] & bit == 0
    }

    /// Accepts `counter` and marks it seen. Returns false, changing nothing, if it
    /// is a replay or too old.
    pub fn update(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear every block the window slides into, at most the whole ring.
            let new_top = counter / BLOCK_BITS;
            let to_clear = if self.next == 0 {
                // Nothing was ever marked: the ring is still all zeros.
                0
            } else {
                let old_top = (self.next - 1) / BLOCK_BITS;
                (new_top - old_top).min(BLOCKS as u64)
            };
            for i in 1..=to_clear {
                self.bitmap[((new_top - to_clear + i) & BLOCK_MASK) as usize] = 0;
            }
            self.next = counter + 1;
        }
        let (block, bit) = Self::position(counter);
        self.bitmap[block] |= bit;
        true
    }

    fn position(counter: u64) -> (usize, u64) {
        let block = ((counter / BLOCK_BITS) & BLOCK_MASK) as usize;
        (block, 1u64 << (counter % BLOCK_BITS))
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow").field("next", &self.next).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_accepted_once() {
        let mut w = ReplayWindow::new();
        for c in 0..10_000 {
            assert!(w.check(c), "{c}");
            assert!(w.update(c), "{c}");
            assert!(!w.check(c), "{c}");
            assert!(!w.update(c), "{c}");
        }
        assert_eq!(w.next_expected(), 10_000);
    }

    #[test]
    fn first_counter_may_be_anything() {
        let mut w = ReplayWindow::new();
        assert!(w.update(123_456));
        assert!(!w.update(123_456));
        assert!(w.update(123_455));
        assert!(w.update(123_456 - WINDOW));
        assert!(!w.update(123_456 - WINDOW - 1));
        assert!(w.update(123_456 - WINDOW + 1));
    }

    #[test]
    fn out_of_order_within_window() {
        let mut w = ReplayWindow::new();
        assert!(w.update(5000));
        // Every counter in the window is accepted exactly once, in any order.
        let lo = 5000 - WINDOW;
        let mut order = Vec::new();
        // A permutation of lo..5000 by a stride coprime with the length.
        let n = 5000 - lo;
        for i in 0..n {
            order.push(lo + (i * 37) % n);
        }
        for &x in &order {
            assert!(w.update(x), "{x}");
        }
        for &x in &order {
            assert!(!w.update(x), "dup {x}");
        }
        assert!(!w.update(lo - 1), "too old");
    }

    #[test]
    fn duplicates_rejected_after_slide() {
        let mut w = ReplayWindow::new();
        assert!(w.update(10));
        assert!(w.update(100));
        assert!(w.update(70));
        assert!(!w.update(10));
        assert!(!w.update(70));
        assert!(!w.update(100));
        assert!(w.update(11));
    }

    #[test]
    fn too_old_rejected() {
        let mut w = ReplayWindow::new();
        assert!(w.update(WINDOW + 100));
        assert!(!w.check(99));
        assert!(!w.update(99));
        assert!(w.update(100));
        assert!(!w.update(100));
        assert!(!w.update(0));
    }

    #[test]
    fn far_jump_clears_the_whole_ring() {
        let mut w = ReplayWindow::new();
        for c in 0..4096 {
            assert!(w.update(c));
        }
        let far = 1_000_000_007;
        assert!(w.update(far));
        // Every counter of the new window except `far` itself is fresh, even where
        // its bit position collides with counters marked before the jump.
        for c in (far - WINDOW)..far {
            assert!(w.check(c), "{c}");
        }
        assert!(!w.check(far));
        assert!(!w.check(far - WINDOW - 1));
        // A jump of a few blocks clears exactly the blocks entered.
        let mut w = ReplayWindow::new();
        for c in 0..200 {
            assert!(w.update(c));
        }
        assert!(w.update(200 + 3 * 64));
        for c in 0..200 {
            assert!(!w.check(c), "{c}");
        }
        for c in 200..(200 + 3 * 64) {
            assert!(w.check(c), "{c}");
        }
    }

    #[test]
    fn counter_limit_never_accepted() {
        let mut w = ReplayWindow::new();
        assert!(!w.update(u64::MAX));
        assert!(w.update(u64::MAX - 1));
        assert!(!w.update(u64::MAX - 1));
        assert!(w.update(u64::MAX - 2));
    }

    /// Compares against a naive set model on a pseudo-random walk.
    #[test]
    fn matches_a_naive_model() {
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::HashSet::new();
        let mut highest: Option<u64> = None;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut base: u64 = 0;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = match x % 16 {
                0 => base + (x >> 8) % 20_000,
                1..=3 => base.saturating_sub((x >> 8) % 5_000),
                _ => base + (x >> 8) % 64,
            };
            base = base.max(c.saturating_sub(100));
            let expect = match highest {
                None => true,
                Some(h) => c > h || (h - c <= WINDOW && !seen.contains(&c)),
            };
            assert_eq!(w.update(c), expect, "counter {c}, highest {highest:?}");
            if expect {
                seen.insert(c);
                highest = Some(highest.map_or(c, |h| h.max(c)));
            }
        }
    }
}
