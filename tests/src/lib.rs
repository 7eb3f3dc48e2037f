//! Shared test harness.
//!
//! - [`lab`]: network namespaces running the real `meshnet` binary (needs root);
//!   the scenarios using it live in `tests/mesh.rs`.
//! - [`stranger`]: clients that treat a router badly (a connection flood,
//!   password guessing, a member that stops reading) for `tests/stranger.rs`.
//! - [`hostile`]: a mesh member that forges protocol fields (`tests/hostile.rs`).

pub mod hostile;
pub mod lab;
pub mod sim;
pub mod stranger;
