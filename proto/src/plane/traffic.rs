//! Per-peer traffic counters, written by one plane (and so one forwarding
//! thread) each and read by the control plane when `/metrics`, the map or
//! `report` asks.
//!
//! Counting must cost nothing measurable on the data path, so no counter here
//! is a shared atomic read-modify-write: every [`Counter`] has exactly one
//! writer thread, which adds with a plain load and store (no `lock` prefix, no
//! cache line bouncing between the two threads: the TX thread's counters and
//! the RX thread's sit on cache lines of their own). Readers load the value
//! (relaxed): a scrape sees each counter as of some moment during the scrape,
//! which is all Prometheus asks.
//!
//! A peer keeps its counters (one [`PeerTraffic`]) for as long as the data
//! plane runs, across reconnects and rekeys, so they only ever grow.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ingress::Refused;

/// A monotonic counter with a single writer thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the counter's one writer thread may call this: two
    /// writers would lose counts (a plain load and store, not `fetch_add`).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the TX (TAP → UDP) thread counts for one direct peer.
#[derive(Default, Debug)]
#[repr(align(64))]
pub struct TxTraffic {
    /// Datagrams (data and heartbeats) handed to the socket for the peer.
    pub datagrams: Counter,
    /// Their bytes (UDP payload).
    pub bytes: Counter,
    /// Units (frames or superframes) sealed for the peer.
    pub units: Counter,
    /// Units that could not be sealed for the peer (counter exhausted, oversized).
    pub encode_errors: Counter,
}

/// What the RX (UDP → TAP) thread counts for one direct peer.
#[derive(Default, Debug)]
#[repr(align(64))]
pub struct RxTraffic {
    /// Datagrams that authenticated under one of the peer's sessions.
    pub datagrams: Counter,
    /// Their bytes (UDP payload).
    pub bytes: Counter,
    /// Units relayed through this router *to* the peer (it is the next hop);
    /// the RX thread relays, so these are not in [`TxTraffic`].
    pub relayed_units: Counter,
    /// The datagrams that carried them, and their bytes (UDP payload).
    pub relayed_datagrams: Counter,
    pub relayed_bytes: Counter,
    /// Frames from the peer refused by the origin check, per [`Refused`] reason.
    pub refused: [Counter; Refused::ALL.len()],
    /// Frames from the peer for another peer with no route (or no hops left).
    pub dropped_no_route: Counter,
}

/// One direct peer's counters.
#[derive(Default, Debug)]
pub struct PeerTraffic {
    pub tx: TxTraffic,
    pub rx: RxTraffic,
}

/// Counters of the two threads that are not per peer.
#[derive(Default, Debug)]
pub struct ThreadCounters {
    /// TX thread: superframes (units the kernel did not segment, TSO/USO) read from the TAP.
    pub tx_superframes: Counter,
    /// TX thread: entries in its MAC table (local and remote MACs), refreshed every tick.
    pub tx_mac_entries: AtomicU64,
    /// RX thread on its own line: superframes written whole into the TAP.
    pub rx: RxThreadCounters,
}

#[derive(Default, Debug)]
#[repr(align(64))]
pub struct RxThreadCounters {
    pub superframes: Counter,
}

/// A copy of one peer's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficSnapshot {
    /// Sent to the peer by either thread: our own data, heartbeats and relayed units.
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    /// Our own units (not relayed ones) sealed for the peer.
    pub tx_units: u64,
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    pub relayed_units: u64,
    pub relayed_bytes: u64,
    /// Drops by reason: `encode_error`, `no_route`, and the origin check's
    /// refusals (`origin_is_me`, `unknown_origin`, `not_on_path`, `broadcast_not_parent`).
    pub drops: Vec<(String, u64)>,
}

impl PeerTraffic {
    pub fn snapshot(&self) -> TrafficSnapshot {
        let mut drops = vec![
            ("encode_error".to_string(), self.tx.encode_errors.get()),
            ("no_route".to_string(), self.rx.dropped_no_route.get()),
        ];
        for r in Refused::ALL {
            let name = r.counter_name().trim_start_matches("refused_");
            drops.push((name.to_string(), self.rx.refused[r.index()].get()));
        }
        TrafficSnapshot {
            tx_datagrams: self.tx.datagrams.get() + self.rx.relayed_datagrams.get(),
            tx_bytes: self.tx.bytes.get() + self.rx.relayed_bytes.get(),
            tx_units: self.tx.units.get(),
            rx_datagrams: self.rx.datagrams.get(),
            rx_bytes: self.rx.bytes.get(),
            relayed_units: self.rx.relayed_units.get(),
            relayed_bytes: self.rx.relayed_bytes.get(),
            drops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_single_writer_thread_counts_exactly_while_read() {
        let t = Arc::new(PeerTraffic::default());
        let w = t.clone();
        let writer = std::thread::spawn(move || {
            for _ in 0..100_000 {
                w.tx.bytes.add(3);
            }
        });
        let mut last = 0;
        while !writer.is_finished() {
            let now = t.tx.bytes.get();
            assert!(now >= last, "a counter never goes back");
            last = now;
        }
        writer.join().unwrap();
        assert_eq!(t.tx.bytes.get(), 300_000);
    }
}
