//! The host on the overlay: its addresses on the bridge (`meshnet expose`), and
//! meshnet's own nftables table that goes with them.
//!
//! What this module owns:
//! - the exposed addresses on the bridge (added, re-applied after a restart,
//!   removed by `hide` and `reset`); IPAM holds them under [`EXPOSE_KEY`];
//! - one nftables table, `ip meshnet` (`ip meshnet-<bridge>` for another
//!   bridge), built as typed nftables JSON (the `nftables` crate; [`ruleset`]
//!   is pure) and written whole in one transaction (`nft -j -f -`) each time
//!   the set of exposed addresses changes, and deleted when nothing is exposed:
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
//! an address exposed. The `nft` binary (the nftables package) must be
//! installed: the crate drives it, it does not talk netlink itself.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context, Result};
use meshnet_proto::ipam::Cidr;
use meshnet_router::netlink;
use nftables::expr::MetaKey;
use nftables::schema::{NfListObject, Nftables};
use nftables::stmt::{Counter, Operator, Statement};
use nftables::types::{NfChainType, NfHook};

use crate::attach::parse_cidr;
use crate::nft::{self, base_chain, declare_and_delete, matches, meta, our_table, prefix, rule, text, PRIO_FILTER, PRIO_SRCNAT};
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

/// The table for these exposures, as one nftables JSON batch (one
/// transaction: all of it or nothing) that replaces the table whole: declare
/// it (so the delete succeeds when it is not there yet), delete it, define it
/// again. With nothing exposed the batch only declares and deletes it.
pub fn ruleset(bridge: &str, range: Cidr, exposed: &[Exposure]) -> Nftables<'static> {
    let mut subnets: Vec<(Cidr, bool)> = Vec::new();
    for e in exposed {
        let Ok((_, subnet)) = parse(e) else { continue };
        match subnets.iter_mut().find(|(s, _)| *s == subnet) {
            Some(s) => s.1 |= e.masquerade,
            None => subnets.push((subnet, e.masquerade)),
        }
    }
    if subnets.is_empty() {
        return deletion(bridge);
    }
    let table = table_name(bridge);
    let mut batch = declare_and_delete(&table);
    batch.add(NfListObject::Table(our_table(&table)));
    batch.add(NfListObject::Chain(base_chain(&table, FORWARD, NfChainType::Filter, NfHook::Forward, PRIO_FILTER)));
    batch.add(NfListObject::Chain(base_chain(&table, POSTROUTING, NfChainType::NAT, NfHook::Postrouting, PRIO_SRCNAT)));
    for (subnet, _) in &subnets {
        // iifname BRIDGE oifname BRIDGE ip saddr SUBNET ip daddr != SUBNET counter drop
        let expr = vec![
            matches(meta(MetaKey::Iifname), Operator::EQ, text(bridge)),
            matches(meta(MetaKey::Oifname), Operator::EQ, text(bridge)),
            matches(nft::field("ip", "saddr"), Operator::EQ, prefix(*subnet)),
            matches(nft::field("ip", "daddr"), Operator::NEQ, prefix(*subnet)),
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Drop(None),
        ];
        batch.add(NfListObject::Rule(rule(&table, FORWARD, expr, format!("isolate {subnet} from other overlay subnets"))));
    }
    for (subnet, _) in subnets.iter().filter(|(_, masquerade)| *masquerade) {
        // oifname != BRIDGE ip saddr SUBNET ip daddr != RANGE counter masquerade
        let expr = vec![
            matches(meta(MetaKey::Oifname), Operator::NEQ, text(bridge)),
            matches(nft::field("ip", "saddr"), Operator::EQ, prefix(*subnet)),
            matches(nft::field("ip", "daddr"), Operator::NEQ, prefix(range)),
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Masquerade(None),
        ];
        batch.add(NfListObject::Rule(rule(&table, POSTROUTING, expr, format!("egress of {subnet}"))));
    }
    batch.to_nftables()
}

/// The batch that deletes meshnet's table (and nothing else), whether or not
/// it is there.
pub fn deletion(bridge: &str) -> Nftables<'static> {
    declare_and_delete(&table_name(bridge)).to_nftables()
}

const FORWARD: &str = "forward";
const POSTROUTING: &str = "postrouting";

/// Makes the table what `exposed` needs: replaced whole, or deleted when
/// nothing is exposed.
pub fn apply_table(bridge: &str, range: Cidr, exposed: &[Exposure]) -> Result<()> {
    if exposed.iter().any(|e| parse(e).is_ok()) {
        nft::apply(&ruleset(bridge, range, exposed)).with_context(|| format!("nftables table ip {}", table_name(bridge)))
    } else {
        delete_table(bridge).map(|_| ())
    }
}

/// Deletes meshnet's table; Ok(false) if it was not there.
pub fn delete_table(bridge: &str) -> Result<bool> {
    let table = table_name(bridge);
    nft::delete_table(&table).with_context(|| format!("delete nftables table ip {table}"))
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
    use serde_json::{json, Value};

    fn ex(addr: &str, masquerade: bool) -> Exposure {
        Exposure { addr: addr.into(), masquerade }
    }

    fn to_json(batch: &Nftables) -> Value {
        serde_json::to_value(batch).unwrap()
    }

    fn table(name: &str) -> Value {
        json!({"table": {"family": "ip", "name": name}})
    }

    /// The commands before the rules: declare, delete, define the table and its two base chains.
    fn head(name: &str) -> Vec<Value> {
        vec![
            json!({"add": table(name)}),
            json!({"delete": table(name)}),
            json!({"add": table(name)}),
            json!({"add": {"chain": {"family": "ip", "table": name, "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
            json!({"add": {"chain": {"family": "ip", "table": name, "name": "postrouting",
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
        ]
    }

    fn ifname(key: &str, op: &str, bridge: &str) -> Value {
        json!({"match": {"left": {"meta": {"key": key}}, "right": bridge, "op": op}})
    }

    fn ip(field: &str, op: &str, addr: &str, len: u32) -> Value {
        json!({"match": {"left": {"payload": {"protocol": "ip", "field": field}},
            "right": {"prefix": {"addr": addr, "len": len}}, "op": op}})
    }

    /// iifname B oifname B ip saddr S ip daddr != S counter drop
    fn isolate(name: &str, bridge: &str, net: &str, len: u32) -> Value {
        json!({"add": {"rule": {"family": "ip", "table": name, "chain": "forward", "expr": [
            ifname("iifname", "==", bridge), ifname("oifname", "==", bridge),
            ip("saddr", "==", net, len), ip("daddr", "!=", net, len),
            {"counter": null}, {"drop": null},
        ], "comment": format!("isolate {net}/{len} from other overlay subnets")}}})
    }

    /// oifname != B ip saddr S ip daddr != RANGE counter masquerade
    fn masquerade(name: &str, bridge: &str, net: &str, len: u32, range: (&str, u32)) -> Value {
        json!({"add": {"rule": {"family": "ip", "table": name, "chain": "postrouting", "expr": [
            ifname("oifname", "!=", bridge), ip("saddr", "==", net, len), ip("daddr", "!=", range.0, range.1),
            {"counter": null}, {"masquerade": null},
        ], "comment": format!("egress of {net}/{len}")}}})
    }

    fn batch(objects: Vec<Value>) -> Value {
        json!({"nftables": objects})
    }

    #[test]
    fn nothing_exposed_deletes_only_our_table() {
        let range: Cidr = "10.32.0.0/12".parse().unwrap();
        let ours = batch(vec![json!({"add": table("meshnet")}), json!({"delete": table("meshnet")})]);
        assert_eq!(to_json(&ruleset("meshnet", range, &[])), ours);
        assert_eq!(to_json(&deletion("meshnet")), ours);
        // Exposures that do not parse count as nothing.
        assert_eq!(to_json(&ruleset("meshnet", range, &[ex("bogus", true)])), ours);
        let other = batch(vec![json!({"add": table("meshnet-br1")}), json!({"delete": table("meshnet-br1")})]);
        assert_eq!(to_json(&deletion("br1")), other);
    }

    #[test]
    fn one_subnet_with_and_without_masquerade() {
        let range: Cidr = "10.32.0.0/12".parse().unwrap();
        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12));
        want.push(masquerade("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        assert_eq!(to_json(&ruleset("meshnet", range, &[ex("10.32.0.1/12", true)])), batch(want));

        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12));
        assert_eq!(to_json(&ruleset("meshnet", range, &[ex("10.32.0.1/12", false)])), batch(want));
    }

    #[test]
    fn two_subnets_with_and_without_masquerade() {
        let range: Cidr = "10.2.0.0/16".parse().unwrap();
        let t = "meshnet-br1";
        let both = |m1: bool, m2: bool| {
            let mut want = head(t);
            want.push(isolate(t, "br1", "10.2.1.0", 24));
            want.push(isolate(t, "br1", "10.2.5.0", 24));
            if m1 {
                want.push(masquerade(t, "br1", "10.2.1.0", 24, ("10.2.0.0", 16)));
            }
            if m2 {
                want.push(masquerade(t, "br1", "10.2.5.0", 24, ("10.2.0.0", 16)));
            }
            batch(want)
        };
        for (m1, m2) in [(true, true), (true, false), (false, true), (false, false)] {
            let got = ruleset("br1", range, &[ex("10.2.1.3/24", m1), ex("10.2.5.1/24", m2)]);
            assert_eq!(to_json(&got), both(m1, m2), "masquerade {m1} {m2}");
        }
        // Two addresses in one subnet make one set of rules, masqueraded if either asks.
        let got = ruleset("br1", range, &[ex("10.2.1.3/24", false), ex("10.2.1.9/24", true), ex("10.2.5.1/24", false)]);
        assert_eq!(to_json(&got), both(true, false));
        assert_eq!(table_name("meshnet"), "meshnet");
    }
}
