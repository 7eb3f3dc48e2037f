//! Wire formats. Each submodule pairs checked views over untrusted bytes
//! (`new_checked` once, then accessors cannot panic) with plain `Repr` structs
//! (`parse` from a view, `emit` into a buffer), smoltcp style. Nothing here
//! allocates, and no input makes a parser panic.

pub mod datagram;
pub mod control;
