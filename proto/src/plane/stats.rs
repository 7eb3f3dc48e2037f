//! The data plane's counters (`meshnet status --json`, `dataplane`).
//!
//! Every forwarding thread counts into a [`Stats`] of its own (its plane, its
//! UDP sender and its device writes), made by [`StatsSet::thread`]: each
//! counter has exactly one writer, which adds with a plain load and store
//! ([`Counter`]: no `lock` prefix, no cache line shared with another thread,
//! the table is cache-line aligned). The control plane reads the set, summed
//! over the threads, when `status`, `/metrics` or `report` ask. Nothing here
//! logs (the router reports growth of the error counters, see its data plane
//! module). Counters the control plane bumps (`rekeys`) live in the set, not
//! in any thread's table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::traffic::Counter;
use crate::ingress::Refused;

/// One forwarding thread's counters: only that thread writes them.
#[derive(Default, Debug)]
#[repr(align(64))]
pub struct Stats {
    pub tap_units_in: Counter,
    pub tap_bytes_in: Counter,
    pub udp_datagrams_out: Counter,
    pub udp_bytes_out: Counter,
    pub udp_send_errors: Counter,
    pub udp_datagrams_in: Counter,
    pub udp_bytes_in: Counter,
    /// Datagrams that failed authentication, were replays or malformed.
    pub udp_rejected: Counter,
    /// Datagrams for a session we do not (yet, or any more) have: a peer's first
    /// heartbeats can arrive before our end of the handshake installed it.
    pub udp_unknown_session: Counter,
    pub tap_units_out: Counter,
    pub tap_write_errors: Counter,
    pub dropped_no_peer: Counter,
    pub relayed_units: Counter,
    pub dropped_no_route: Counter,
    pub heartbeats_out: Counter,
    pub heartbeats_in: Counter,
    pub frag_needed_sent: Counter,
    pub dropped_too_big: Counter,
    /// Superframes that lost a chunk, and the whole segments salvaged from them.
    pub salvaged_units: Counter,
    pub salvaged_frames: Counter,
    /// Units (or datagrams holding them) that could not be sealed: counter
    /// exhausted, empty or oversized unit. Rate-limit logged by the router.
    pub encode_errors: Counter,
    /// Received frames refused because their claimed origin does not fit the
    /// peer they came from, by [`Refused::index`] (see [`crate::ingress::admit`]).
    pub refused: [Counter; Refused::ALL.len()],
    /// Received frames whose TTL was higher than their sender could use, cut.
    pub ttl_clamped: Counter,
    /// Of `udp_rejected`, datagrams whose tag did not verify under the session's key.
    pub udp_auth_failed: Counter,
    /// Data datagrams sent unsealed to peers trusted both ways (`trusted (userspace)`).
    pub udp_unsealed_out: Counter,
    /// Unsealed data datagrams taken from such peers (counted in `udp_datagrams_in` too).
    pub udp_unsealed_in: Counter,
    /// Of `udp_rejected`, unsealed datagrams dropped: the sender is not trusted
    /// both ways from that address, or a relay session, broadcast, another
    /// origin, a nonzero tag (see [`crate::datapath::Receiver::set_unsealed_from`]).
    pub udp_unsealed_refused: Counter,
    /// Datagrams a queue's socket received for another queue (a receive
    /// batch the kernel's GRO merged across queues), handed to that queue.
    pub udp_other_queue: Counter,
    pub per_frame: PerFrameCounters,
}

/// Counters of the per-frame path: units cut into plain frames in software,
/// for a next hop without superframes or a device without a virtio header.
#[derive(Debug, Default)]
pub struct PerFrameCounters {
    /// Units (superframes, partial checksums) turned into plain frames in software.
    pub sw_segmented_units: Counter,
    /// Plain frames those units became.
    pub sw_frames_out: Counter,
    /// Units dropped because they could not be segmented (malformed, unsupported).
    pub sw_malformed_units: Counter,
}

impl PerFrameCounters {
    pub fn to_json(&self) -> [(&'static str, u64); 3] {
        [
            ("sw_segmented_units", self.sw_segmented_units.get()),
            ("sw_frames_out", self.sw_frames_out.get()),
            ("sw_malformed_units", self.sw_malformed_units.get()),
        ]
    }

    /// Counts what one software segmentation made (or why it failed).
    pub(crate) fn count(&self, made: Result<usize, crate::gso::GsoError>) {
        match made {
            Ok(n) => {
                add(&self.sw_segmented_units, 1);
                add(&self.sw_frames_out, n as u64);
            }
            Err(_) => add(&self.sw_malformed_units, 1),
        }
    }
}

/// Adds `n` to a counter of the calling thread's own [`Stats`].
#[inline]
pub(crate) fn add(c: &Counter, n: u64) {
    c.add(n);
}

impl Stats {
    /// This thread's counters by name, in the order of `status --json` (without `rekeys`).
    fn values(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("tap_units_in", self.tap_units_in.get()),
            ("tap_bytes_in", self.tap_bytes_in.get()),
            ("udp_datagrams_out", self.udp_datagrams_out.get()),
            ("udp_bytes_out", self.udp_bytes_out.get()),
            ("udp_send_errors", self.udp_send_errors.get()),
            ("udp_datagrams_in", self.udp_datagrams_in.get()),
            ("udp_bytes_in", self.udp_bytes_in.get()),
            ("udp_rejected", self.udp_rejected.get()),
            ("udp_auth_failed", self.udp_auth_failed.get()),
            ("udp_unknown_session", self.udp_unknown_session.get()),
            ("tap_units_out", self.tap_units_out.get()),
            ("tap_write_errors", self.tap_write_errors.get()),
            ("dropped_no_peer", self.dropped_no_peer.get()),
            ("relayed_units", self.relayed_units.get()),
            ("dropped_no_route", self.dropped_no_route.get()),
            ("heartbeats_out", self.heartbeats_out.get()),
            ("heartbeats_in", self.heartbeats_in.get()),
            ("frag_needed_sent", self.frag_needed_sent.get()),
            ("dropped_too_big", self.dropped_too_big.get()),
            ("salvaged_units", self.salvaged_units.get()),
            ("salvaged_frames", self.salvaged_frames.get()),
            ("encode_errors", self.encode_errors.get()),
            ("ttl_clamped", self.ttl_clamped.get()),
        ]
        .into_iter()
        .chain(Refused::ALL.into_iter().map(|r| (r.counter_name(), self.refused[r.index()].get())))
        .chain(self.per_frame.to_json())
        .chain([("udp_other_queue", self.udp_other_queue.get())])
        .chain([
            ("udp_unsealed_out", self.udp_unsealed_out.get()),
            ("udp_unsealed_in", self.udp_unsealed_in.get()),
            ("udp_unsealed_refused", self.udp_unsealed_refused.get()),
        ])
        .collect()
    }

    /// Counts a unit (or datagram) that could not be sealed.
    pub(crate) fn encode_error(&self) {
        add(&self.encode_errors, 1);
    }
}

/// Every forwarding thread's [`Stats`], read summed; and the counters the
/// control plane bumps. Locked when a thread is added and when read, never
/// per frame.
#[derive(Default, Debug)]
pub struct StatsSet {
    threads: Mutex<Vec<Arc<Stats>>>,
    /// Data-key rekeys completed (our sending key replaced), all connections:
    /// counted by the control plane.
    pub rekeys: AtomicU64,
}

impl StatsSet {
    /// A new table for one forwarding thread, which must be its only writer.
    pub fn thread(&self) -> Arc<Stats> {
        let s = Arc::new(Stats::default());
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(s.clone());
        s
    }

    /// One counter summed over the threads, e.g. `set.total(|s| &s.encode_errors)`.
    pub fn total(&self, f: impl Fn(&Stats) -> &Counter) -> u64 {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().map(|s| f(s).get()).fold(0, u64::wrapping_add)
    }

    /// Every counter by name, summed over the threads (`status --json`, `dataplane`).
    pub fn to_json(&self) -> Vec<(&'static str, u64)> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = Stats::default().values();
        for s in threads.iter() {
            for (total, (_, v)) in sum.iter_mut().zip(s.values()) {
                total.1 = total.1.wrapping_add(v);
            }
        }
        drop(threads);
        // `rekeys` where it always was: after `ttl_clamped`, before the refusals.
        let at = sum.iter().position(|(k, _)| *k == "ttl_clamped").map_or(sum.len(), |i| i + 1);
        sum.insert(at, ("rekeys", self.rekeys.load(Ordering::Relaxed)));
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_threads_each_count_their_own_and_the_sum_is_exact() {
        let set = Arc::new(StatsSet::default());
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let mine = set.thread();
                std::thread::spawn(move || {
                    for _ in 0..200_000 {
                        mine.udp_datagrams_in.add(1);
                        mine.udp_bytes_in.add(t + 1);
                        mine.per_frame.sw_frames_out.add(2);
                    }
                })
            })
            .collect();
        // Read while they write: totals never go back.
        let mut last = 0;
        while writers.iter().any(|w| !w.is_finished()) {
            let now = set.total(|s| &s.udp_datagrams_in);
            assert!(now >= last);
            last = now;
        }
        for w in writers {
            w.join().unwrap();
        }
        set.rekeys.fetch_add(3, Ordering::Relaxed);
        let json: std::collections::HashMap<_, _> = set.to_json().into_iter().collect();
        assert_eq!(json["udp_datagrams_in"], 400_000);
        assert_eq!(json["udp_bytes_in"], 200_000 * (1 + 2));
        assert_eq!(json["sw_frames_out"], 800_000);
        assert_eq!(json["rekeys"], 3);
        assert_eq!(set.total(|s| &s.udp_datagrams_in), 400_000);
    }

    #[test]
    fn the_json_keeps_its_names_and_order() {
        let set = StatsSet::default();
        set.thread();
        let names: Vec<_> = set.to_json().into_iter().map(|(k, _)| k).collect();
        let i = |n: &str| names.iter().position(|k| *k == n).unwrap();
        assert_eq!(i("rekeys"), i("ttl_clamped") + 1);
        assert_eq!(names[0], "tap_units_in");
        assert_eq!(names[names.len() - 5], "sw_malformed_units");
        assert_eq!(names[names.len() - 4], "udp_other_queue");
        // Added after: `trusted (userspace)`.
        assert_eq!(names[names.len() - 3..], ["udp_unsealed_out", "udp_unsealed_in", "udp_unsealed_refused"]);
        assert_eq!(names.len(), 24 + Refused::ALL.len() + 3 + 1 + 3);
    }
}
