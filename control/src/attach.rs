//! Attaching targets (network namespaces, PIDs; Docker containers later) to the
//! router's bridge, and remembering them in the state directory.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use meshnet_router::netlink::{self, AttachSpec, Attached};
use meshnet_router::netns::Netns;

use crate::state::{Attachment, StateDir};

/// Interface name inside every attached target.
pub const CONTAINER_IF: &str = "ethwe";

/// Parses `ip/prefix` (IPv4 or IPv6).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = s
        .split_once('/')
        .with_context(|| format!("invalid address {s:?}: expected ip/prefix like 10.40.0.1/16"))?;
    let ip: IpAddr = ip.parse().with_context(|| format!("invalid address {s:?}: {ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .with_context(|| format!("invalid address {s:?}: prefix must be 0 to {max}"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        bail!("invalid address {s:?}: not a unicast host address");
    }
    Ok((ip, prefix))
}

pub fn format_cidr(a: &(IpAddr, u8)) -> String {
    format!("{}/{}", a.0, a.1)
}

/// A resolved target: how to enter it and what kind it is.
pub struct Target {
    pub netns: Netns,
    pub kind: &'static str,
}

/// Resolves TARGET: an `ip netns` name, then a PID. (Docker containers come later.)
pub fn resolve(target: &str) -> Result<Target> {
    let valid_name = !target.is_empty()
        && target != "."
        && target != ".."
        && !target.contains('/')
        && !target.contains('\0');
    if valid_name && Path::new("/run/netns").join(target).exists() {
        let netns = Netns::named(target).with_context(|| format!("target {target}"))?;
        return Ok(Target { netns, kind: "netns" });
    }
    if let Ok(pid) = target.parse::<u32>() {
        if pid > 0 && Path::new(&format!("/proc/{pid}/ns/net")).exists() {
            let netns = Netns::of_pid(pid).with_context(|| format!("target {target}"))?;
            return Ok(Target { netns, kind: "pid" });
        }
    }
    bail!(
        "unknown target {target:?}: tried network namespace /run/netns/{target}, process id{}; \
         Docker containers are not supported yet",
        if target.parse::<u32>().is_ok() { "" } else { " (not a number)" }
    )
}

/// Host-side veth name for a namespace, stable across restarts.
pub fn host_if_name(ns_inode: u64) -> String {
    format!("vmn{:08x}", (ns_inode ^ (ns_inode >> 32)) as u32)
}

/// Attaches `addrs` to `target` and updates the remembered attachments.
pub fn attach(
    state: &StateDir,
    attachments: &mut Vec<Attachment>,
    bridge: &str,
    mtu: u32,
    target: &str,
    addrs: &[(IpAddr, u8)],
) -> Result<Attached> {
    let t = resolve(target)?;
    let inode = t.netns.inode().with_context(|| format!("target {target}"))?;
    // An address may belong to one target only.
    for a in addrs {
        let text = format_cidr(a);
        if let Some(other) = attachments
            .iter()
            .find(|x| x.ns_inode != inode && x.addrs.iter().any(|y| same_ip(y, &a.0)))
        {
            bail!("address {text} is already attached to {}", other.target);
        }
    }
    let host_if = host_if_name(inode);
    let spec = AttachSpec {
        target: t.netns.clone(),
        bridge: bridge.to_string(),
        host_if: host_if.clone(),
        container_if: CONTAINER_IF.to_string(),
        mtu,
        addrs: addrs.to_vec(),
    };
    let attached = netlink::attach(&spec).with_context(|| format!("attach to {target}"))?;
    let entry = match attachments.iter_mut().find(|x| x.ns_inode == inode) {
        Some(e) => e,
        None => {
            attachments.push(Attachment {
                target: target.to_string(),
                kind: t.kind.to_string(),
                ns_path: t.netns.path.clone(),
                ns_inode: inode,
                host_if,
                addrs: Vec::new(),
            });
            attachments.last_mut().expect("just pushed")
        }
    };
    for a in addrs {
        let text = format_cidr(a);
        if !entry.addrs.contains(&text) {
            entry.addrs.push(text);
        }
    }
    state.save_attachments(attachments)?;
    Ok(attached)
}

/// Detaches `addrs` (all when empty) from `target`.
pub fn detach(
    state: &StateDir,
    attachments: &mut Vec<Attachment>,
    target: &str,
    addrs: &[(IpAddr, u8)],
) -> Result<bool> {
    let t = resolve(target)?;
    let inode = t.netns.inode().with_context(|| format!("target {target}"))?;
    let removed = netlink::detach(&t.netns, CONTAINER_IF, addrs).with_context(|| format!("detach from {target}"))?;
    if let Some(i) = attachments.iter().position(|x| x.ns_inode == inode) {
        if addrs.is_empty() {
            attachments.remove(i);
        } else {
            attachments[i].addrs.retain(|y| !addrs.iter().any(|a| same_ip(y, &a.0)));
            if attachments[i].addrs.is_empty() {
                attachments.remove(i);
            }
        }
        state.save_attachments(attachments)?;
    }
    Ok(removed)
}

fn same_ip(cidr: &str, ip: &IpAddr) -> bool {
    cidr.split('/').next().and_then(|s| s.parse::<IpAddr>().ok()) == Some(*ip)
}

/// The namespace of a remembered attachment, if it is still the same one.
pub fn still_there(a: &Attachment) -> Option<Netns> {
    let ns = Netns { path: a.ns_path.clone(), label: a.target.clone() };
    match ns.inode() {
        Ok(i) if i == a.ns_inode => Some(ns),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_reject() {
        assert_eq!(parse_cidr("10.40.0.1/16").unwrap(), ("10.40.0.1".parse().unwrap(), 16));
        assert_eq!(parse_cidr("fd00::5/64").unwrap().1, 64);
        for bad in ["10.40.0.999/16", "10.40.0.1", "10.40.0.1/33", "x/8", "0.0.0.0/0", "127.0.0.1/8", "224.0.0.1/4", "fd00::1/129", "10.0.0.1/-1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_targets_are_clear_errors() {
        let e = resolve("definitely-not-a-namespace-xyz").err().unwrap().to_string();
        assert!(e.contains("unknown target") && e.contains("/run/netns/"), "{e}");
        assert!(resolve("../etc").is_err());
        assert!(resolve("").is_err());
        assert!(resolve("4294967295").is_err());
    }

    #[test]
    fn host_names_fit_ifnamsiz() {
        assert!(host_if_name(u64::MAX).len() <= 15);
        assert_ne!(host_if_name(1), host_if_name(2));
    }
}
