//! ICMP "fragmentation needed": moved into the TX plane
//! ([`meshnet_proto::plane::icmp`]), which decides when to answer.

pub use meshnet_proto::plane::icmp::*;
