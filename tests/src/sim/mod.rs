//! In-process simulation of many peers: a virtual clock, an in-memory network
//! with seeded faults, and drivers for the sans-I/O state machines of
//! `meshnet_proto` (quinn-proto's `Pair`, scaled up to a mesh).
//!
//! - [`net`]: the network — links, partitions, loss, duplication, reordering.
//! - [`ipam`]: [`ipam::IpamSim`], IPAM peers driven as the daemon drives them
//!   (persist before send), crashes and restores, the global "no address held
//!   twice" check, and a random [`ipam::Workload`]. Scenarios: `tests/ipam_sim.rs`.
//! - [`mesh`]: [`mesh::MeshSim`], the whole control plane (connection making,
//!   topology gossip, discovery, `--conn-limit`, IPAM) of many routers over
//!   simulated connections. Scenarios: `tests/mesh_sim.rs`.
//!
//! Everything is deterministic for a given seed; a failing run prints its seed.

pub mod ipam;
pub mod mesh;
pub mod net;
