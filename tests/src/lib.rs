//! Shared test harness.
//!
//! - [`lab`]: network namespaces running the real `meshnet` binary (needs root);
//!   the scenarios using it live in `tests/mesh.rs`.

pub mod lab;
pub mod sim;
