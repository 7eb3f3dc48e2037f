//! meshnet's data plane: the kernel devices (bridge, TAP, veth) and the
//! forwarding loop between the TAP and the UDP socket.
//!
//! This crate performs what `meshnet-proto` decides. It owns file descriptors and
//! threads; it never makes a protocol decision of its own.

pub mod arp;
pub mod netlink;
pub mod netns;
pub mod tap;
pub mod dataplane;
pub mod icmp;
pub mod mac_owners;
pub mod vxlan;
pub mod device;
pub mod capture;
pub mod ethtool;
pub mod udp;
pub mod traffic;
