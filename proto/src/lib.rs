//! meshnet's sans-I/O core.
//!
//! This crate owns every decision that can be made without touching a socket, a
//! device or a clock: wire formats, the Noise handshake, AEAD sessions with their
//! replay windows, the MAC table, topology gossip and routes, and the IPAM ring.
//! Time is always passed in (milliseconds on a monotonic clock chosen by the
//! caller). Nothing here spawns threads, performs I/O or reads the clock, which is
//! what makes the simulator in `tests/` and the fuzz targets in `fuzz/` cheap.
//!
//! Untrusted bytes are parsed in two steps (smoltcp style): a checked view first,
//! after which accessors cannot panic, then a plain `Repr` the rest uses.

pub mod admission;
pub mod datapath;
pub mod plane;
pub mod dialer;
pub mod discovery;
pub mod dns;
pub mod dns_server;
pub mod gossip;
pub mod gso;
pub mod handshake;
pub mod identity;
pub mod ingress;
pub mod ipam;
pub mod liveness;
pub mod mac_table;
pub mod peer;
pub mod rekey;
pub mod replay;
pub mod sendqueue;
pub mod session;
pub mod slots;
pub mod topology;
pub mod trust;
pub mod trusted;
pub mod wire;
pub use peer::{Mac, PeerName};
