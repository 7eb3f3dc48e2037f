//! placeholder: filled by the netlink work
