//! The host on the overlay: its addresses on the bridge (`meshnet expose`), and
//! meshnet's own nftables table that goes with them.
//!
//! What this module owns:
//! - the exposed addresses on the bridge (added, re-applied after a restart,
//!   removed by `hide` and `reset`); IPAM holds them under [`EXPOSE_KEY`];
//! - one nftables table, `ip meshnet` (`ip meshnet-<bridge>` for another
//!   bridge), written whole in one `nft -f` transaction each time the set of
//!   exposed addresses changes, and deleted when nothing is exposed:
//!   - `postrouting` (nat): traffic from an exposed subnet (unless exposed
//!     `--without-masquerade`) to a destination outside the IP allocation
//!     range that leaves through another interface than the bridge is
//!     masqueraded, as Weave did;
//!   - `forward` (filter): traffic routed by this host from one exposed subnet
//!     into another (in on the bridge, out on the bridge) is dropped, so
//!     `net:` subnets stay isolated from each other through the host.
//!
//! It never touches another table (iptables-legacy, iptables-nft, Docker and
//! kube-proxy keep theirs), never flushes the ruleset, and never runs without
//! an address exposed. `nft` (the nftables package) must be installed.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use meshnet_proto::ipam::Cidr;
use meshnet_router::netlink;

use crate::attach::parse_cidr;
use crate::state::Exposure;

/// The IPAM key the host's own addresses are allocated under.
pub const EXPOSE_KEY: &str = "meshnet:expose";

/// The nftables table (family `ip`) of the router on `bridge`.
pub fn table_name(bridge: &str) -> String {
    if bridge == "meshnet" {
        "meshnet".to_string()
    } else {
        format!("meshnet-{bridge}")
    }
}

/// An exposure's address and the subnet it stands for.
pub fn parse(e: &Exposure) -> Result<(Ipv4Addr, Cidr)> {
    let (ip, prefix) = parse_cidr(&e.addr)?;
    let IpAddr::V4(v4) = ip else { bail!("exposed address {} is not IPv4", e.addr) };
    let subnet = Cidr::containing(v4, prefix).map_err(|err| anyhow::anyhow!("exposed address {}: {err}", e.addr))?;
    Ok((v4, subnet))
}

/// The table for these exposures, as an `nft -f` script that replaces the
/// table whole; `None` when nothing is exposed (the table must go).
pub fn ruleset(bridge: &str, range: Cidr, exposed: &[Exposure]) -> Option<String> {
    let mut subnets: Vec<(Cidr, bool)> = Vec::new();
    for e in exposed {
        let Ok((_, subnet)) = parse(e) else { continue };
        match subnets.iter_mut().find(|(s, _)| *s == subnet) {
            Some(s) => s.1 |= e.masquerade,
            None => subnets.push((subnet, e.masquerade)),
        }
    }
    if subnets.is_empty() {
        return None;
    }
    let table = table_name(bridge);
    let br = quote(bridge);
    let mut forward = String::new();
    let mut nat = String::new();
    for (subnet, masquerade) in &subnets {
        forward += &format!(
            "    iifname {br} oifname {br} ip saddr {subnet} ip daddr != {subnet} counter drop comment \"isolate {subnet} from other overlay subnets\"\n"
        );
        if *masquerade {
            nat += &format!(
                "    oifname != {br} ip saddr {subnet} ip daddr != {range} counter masquerade comment \"egress of {subnet}\"\n"
            );
        }
    }
    // Declaring the table first makes the delete succeed when it is not there yet;
    // the whole file is one transaction.
    Some(format!(
        "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{forward}  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{nat}  }}\n}}\n"
    ))
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace(['"', '\\'], ""))
}

/// Makes the table what `exposed` needs: replaced whole, or deleted when
/// nothing is exposed.
pub fn apply_table(bridge: &str, range: Cidr, exposed: &[Exposure]) -> Result<()> {
    match ruleset(bridge, range, exposed) {
        Some(script) => nft(&script).with_context(|| format!("nftables table ip {}", table_name(bridge))),
        None => delete_table(bridge).map(|_| ()),
    }
}

/// Deletes meshnet's table; Ok(false) if it was not there.
pub fn delete_table(bridge: &str) -> Result<bool> {
    let table = table_name(bridge);
    if !table_exists(&table)? {
        return Ok(false);
    }
    nft(&format!("delete table ip {table}\n")).with_context(|| format!("delete nftables table ip {table}"))?;
    Ok(true)
}

/// Whether the table is there; without `nft` installed it cannot be (meshnet
/// only ever makes it through `nft`).
fn table_exists(table: &str) -> Result<bool> {
    let out = match Command::new("nft").args(["list", "table", "ip", table]).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(nft_missing(e)),
    };
    Ok(out.status.success())
}

/// Runs an `nft -f -` script (one transaction: all of it or nothing).
fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(nft_missing)?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).context("write to nft")?;
    let out = child.wait_with_output().context("wait for nft")?;
    if !out.status.success() {
        bail!("nft refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn nft_missing(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot run nft ({e}): meshnet expose needs nftables installed")
}

/// Exposed traffic is forwarded by this host: make sure it forwards IPv4 (as
/// Docker does, it is left on).
pub fn enable_forwarding() {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    match std::fs::write(path, "1\n") {
        Ok(()) => log::info!("enabled IPv4 forwarding ({path}) for the exposed addresses"),
        Err(e) => log::warn!("could not enable IPv4 forwarding ({path}): {e}; exposed subnets will not reach the outside"),
    }
}

/// Puts every exposed address on the bridge and writes the table (after a
/// restart, or a bridge made again).
pub fn apply(bridge: &str, range: Cidr, exposed: &[Exposure]) -> Result<()> {
    for e in exposed {
        let (ip, subnet) = parse(e)?;
        netlink::add_link_address(bridge, IpAddr::V4(ip), subnet.prefix())?;
    }
    if !exposed.is_empty() {
        enable_forwarding();
    }
    apply_table(bridge, range, exposed)
}

/// Removes what meshnet added for `exposed`: the addresses on the bridge and
/// the table (`reset`).
pub fn remove_all(bridge: &str, exposed: &[Exposure]) {
    for e in exposed {
        if let Ok((ip, subnet)) = parse(e) {
            if let Err(err) = netlink::del_link_address(bridge, IpAddr::V4(ip), subnet.prefix()) {
                log::warn!("hiding {}: {err}", e.addr);
            }
        }
    }
    if let Err(err) = delete_table(bridge) {
        log::warn!("{err:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(addr: &str, masquerade: bool) -> Exposure {
        Exposure { addr: addr.into(), masquerade }
    }

    #[test]
    fn nothing_exposed_means_no_table() {
        assert_eq!(ruleset("meshnet", "10.32.0.0/12".parse().unwrap(), &[]), None);
    }

    #[test]
    fn rules_per_subnet() {
        let range: Cidr = "10.2.0.0/16".parse().unwrap();
        let s = ruleset("br1", range, &[ex("10.2.1.3/24", true), ex("10.2.5.1/24", false)]).unwrap();
        assert!(s.starts_with("table ip meshnet-br1\ndelete table ip meshnet-br1\n"), "{s}");
        assert!(s.contains("iifname \"br1\" oifname \"br1\" ip saddr 10.2.1.0/24 ip daddr != 10.2.1.0/24 counter drop"), "{s}");
        assert!(s.contains("iifname \"br1\" oifname \"br1\" ip saddr 10.2.5.0/24 ip daddr != 10.2.5.0/24 counter drop"), "{s}");
        assert!(s.contains("oifname != \"br1\" ip saddr 10.2.1.0/24 ip daddr != 10.2.0.0/16 counter masquerade"), "{s}");
        assert!(!s.contains("ip saddr 10.2.5.0/24 ip daddr != 10.2.0.0/16"), "{s}");
        assert_eq!(table_name("meshnet"), "meshnet");
    }
}
