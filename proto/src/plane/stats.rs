//! The data plane's counters (`meshnet status --json`, `dataplane`): one
//! table, written by both planes and by the router's UDP sender, read by the
//! control plane. Counters are relaxed atomics; nothing here logs (the router
//! reports growth of the error counters, see its data plane module).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ingress::Refused;

/// Counters shared with the control plane.
#[derive(Default, Debug)]
pub struct Stats {
    pub tap_units_in: AtomicU64,
    pub tap_bytes_in: AtomicU64,
    pub udp_datagrams_out: AtomicU64,
    pub udp_bytes_out: AtomicU64,
    pub udp_send_errors: AtomicU64,
    pub udp_datagrams_in: AtomicU64,
    pub udp_bytes_in: AtomicU64,
    /// Datagrams that failed authentication, were replays or malformed.
    pub udp_rejected: AtomicU64,
    /// Datagrams for a session we do not (yet, or any more) have: a peer's first
    /// heartbeats can arrive before our end of the handshake installed it.
    pub udp_unknown_session: AtomicU64,
    pub tap_units_out: AtomicU64,
    pub tap_write_errors: AtomicU64,
    pub dropped_no_peer: AtomicU64,
    pub relayed_units: AtomicU64,
    pub dropped_no_route: AtomicU64,
    pub heartbeats_out: AtomicU64,
    pub heartbeats_in: AtomicU64,
    pub frag_needed_sent: AtomicU64,
    pub dropped_too_big: AtomicU64,
    /// Superframes that lost a chunk, and the whole segments salvaged from them.
    pub salvaged_units: AtomicU64,
    pub salvaged_frames: AtomicU64,
    /// Units (or datagrams holding them) that could not be sealed: counter
    /// exhausted, empty or oversized unit. Rate-limit logged by the router.
    pub encode_errors: AtomicU64,
    /// Received frames refused because their claimed origin does not fit the
    /// peer they came from, by [`Refused::index`] (see [`crate::ingress::admit`]).
    pub refused: [AtomicU64; Refused::ALL.len()],
    /// Received frames whose TTL was higher than their sender could use, cut.
    pub ttl_clamped: AtomicU64,
    // New counters go last: the ones above are updated per datagram by both
    // threads, and moving them changes which share a cache line.
    /// Of `udp_rejected`, datagrams whose tag did not verify under the session's key.
    pub udp_auth_failed: AtomicU64,
    /// Data-key rekeys completed (our sending key replaced), all connections.
    pub rekeys: AtomicU64,
    pub per_frame: PerFrameCounters,
}

/// Counters of the per-frame path: units cut into plain frames in software,
/// for a next hop without superframes or a device without a virtio header.
#[derive(Debug, Default)]
pub struct PerFrameCounters {
    /// Units (superframes, partial checksums) turned into plain frames in software.
    pub sw_segmented_units: AtomicU64,
    /// Plain frames those units became.
    pub sw_frames_out: AtomicU64,
    /// Units dropped because they could not be segmented (malformed, unsupported).
    pub sw_malformed_units: AtomicU64,
}

impl PerFrameCounters {
    pub fn to_json(&self) -> [(&'static str, u64); 3] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("sw_segmented_units", g(&self.sw_segmented_units)),
            ("sw_frames_out", g(&self.sw_frames_out)),
            ("sw_malformed_units", g(&self.sw_malformed_units)),
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

#[inline]
pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn to_json(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("tap_units_in", g(&self.tap_units_in)),
            ("tap_bytes_in", g(&self.tap_bytes_in)),
            ("udp_datagrams_out", g(&self.udp_datagrams_out)),
            ("udp_bytes_out", g(&self.udp_bytes_out)),
            ("udp_send_errors", g(&self.udp_send_errors)),
            ("udp_datagrams_in", g(&self.udp_datagrams_in)),
            ("udp_bytes_in", g(&self.udp_bytes_in)),
            ("udp_rejected", g(&self.udp_rejected)),
            ("udp_auth_failed", g(&self.udp_auth_failed)),
            ("udp_unknown_session", g(&self.udp_unknown_session)),
            ("tap_units_out", g(&self.tap_units_out)),
            ("tap_write_errors", g(&self.tap_write_errors)),
            ("dropped_no_peer", g(&self.dropped_no_peer)),
            ("relayed_units", g(&self.relayed_units)),
            ("dropped_no_route", g(&self.dropped_no_route)),
            ("heartbeats_out", g(&self.heartbeats_out)),
            ("heartbeats_in", g(&self.heartbeats_in)),
            ("frag_needed_sent", g(&self.frag_needed_sent)),
            ("dropped_too_big", g(&self.dropped_too_big)),
            ("salvaged_units", g(&self.salvaged_units)),
            ("salvaged_frames", g(&self.salvaged_frames)),
            ("encode_errors", g(&self.encode_errors)),
            ("ttl_clamped", g(&self.ttl_clamped)),
            ("rekeys", g(&self.rekeys)),
        ]
        .into_iter()
        .chain(Refused::ALL.into_iter().map(|r| (r.counter_name(), g(&self.refused[r.index()]))))
        .chain(self.per_frame.to_json())
        .collect()
    }

    /// Counts a unit (or datagram) that could not be sealed.
    pub(crate) fn encode_error(&self) {
        add(&self.encode_errors, 1);
    }
}
