//! meshnet's control plane: the router daemon's TCP connections, gossip,
//! connection maker, persistence and the local API the CLI talks to.
//!
//! Layout:
//! * [`state`] — the state directory (identity, targets, attachments) and atomic writes;
//! * [`api`] — the JSON-over-Unix-socket API and its client;
//! * [`daemon`] — `run`: devices, sockets, tasks, shutdown; `reset_offline`;
//! * [`mesh`] — shared router state: topology, connections, targets, gossip;
//! * [`conn`] — one TCP connection (handshake, messages, heartbeats) and the connection maker;
//! * [`attach`] — resolving targets and attaching them to the bridge;
//! * [`expose`] — the host's own addresses on the overlay and meshnet's nftables table;
//! * [`ipam`] — persistence, routing and timers around the IPAM ring, attach-time address requests;
//! * [`docker`] — Docker containers as targets; their start, death and removal through the engine's events;
//! * [`plugin`] — Docker's plugin API: the `meshnet` network and IPAM drivers.
//! * [`metrics`] — the observability port: Prometheus `/metrics`, `/api/mesh`, the live map;
//! * [`report`] — `meshnet report`: everything the router knows in one document.
//! * [`dns`] — meshnet DNS: our records, the table's gossip, the server on port 53.

pub mod api;
pub mod attach;
pub mod conn;
pub mod daemon;
pub mod ipam;
pub mod docker;
pub mod dns;
pub mod expose;
pub mod heap;
pub mod hosts;
pub mod logger;
pub mod mesh;
pub mod metrics;
pub mod nft;
pub mod peeraddr;
pub mod plugin;
pub mod report;
pub mod splice;
pub mod state;
pub mod trusted;
