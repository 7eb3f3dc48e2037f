//! The host on the overlay: its addresses on the bridge (`meshnet expose`), and
//! meshnet's own nftables table that goes with them.
//!
//! What this module owns:
//! - the exposed addresses on the bridge, IPv4 and IPv6 (added, re-applied
//!   after a restart, removed by `hide` and `reset`); IPAM holds them under
//!   [`EXPOSE_KEY`] (in the ring of their family); IPv6 is on on the bridge
//!   (quiet: no address of its own) exactly while one of them is IPv6;
//! - one nftables table per family, `ip meshnet` for IPv4 and `ip6 meshnet`
//!   for IPv6 (`meshnet-<bridge>` for another bridge), built as typed nftables
//!   JSON (the `nftables` crate; [`ruleset`] is pure) and written whole in one
//!   transaction (`nft -j -f -`, both tables in one batch) each time the set of
//!   exposed addresses changes, and deleted when nothing of its family is
//!   exposed. The `ip6` table is left out of the batch altogether when there is
//!   no IPv6 range and nothing IPv6 exposed, so an IPv4-only router writes
//!   exactly what it always did. Each table holds:
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

use std::net::IpAddr;

use anyhow::{Context, Result};
use meshnet_proto::ipam::Cidr;
use meshnet_router::netlink;
use nftables::batch::Batch;
use nftables::expr::MetaKey;
use nftables::schema::{NfListObject, Nftables};
use nftables::stmt::{Counter, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use crate::attach::parse_cidr;
use crate::nft::{self, base_chain_in, declare_and_delete_in, matches, meta, our_table_in, prefix, rule_in, text, PRIO_FILTER, PRIO_SRCNAT};
use crate::state::Exposure;

/// The IPAM key the host's own addresses are allocated under.
pub const EXPOSE_KEY: &str = "meshnet:expose";

/// The nftables tables (one of family `ip`, one of family `ip6`: the same
/// name) of the router on `bridge`.
pub fn table_name(bridge: &str) -> String {
    if bridge == "meshnet" {
        "meshnet".to_string()
    } else {
        format!("meshnet-{bridge}")
    }
}

/// An exposure's address and the subnet it stands for (IPv4 or IPv6).
pub fn parse(e: &Exposure) -> Result<(IpAddr, Cidr)> {
    let (ip, prefix) = parse_cidr(&e.addr)?;
    let subnet = Cidr::containing(ip, prefix).map_err(|err| anyhow::anyhow!("exposed address {}: {err}", e.addr))?;
    Ok((ip, subnet))
}

/// The IP allocation ranges the masquerade rules keep inside the overlay: the
/// IPv4 one, and the IPv6 one when the router has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranges {
    pub v4: Cidr,
    pub v6: Option<Cidr>,
}

/// The tables for these exposures, as one nftables JSON batch (one
/// transaction: all of it or nothing) that replaces each table whole: declare
/// it (so the delete succeeds when it is not there yet), delete it, define it
/// again when something of its family is exposed. The `ip` table first, then
/// the `ip6` one, which is left out entirely when there is no IPv6 range and
/// nothing IPv6 is exposed. An IPv6 exposure without an IPv6 range (the router
/// was relaunched without one) gets no rules.
pub fn ruleset(bridge: &str, ranges: Ranges, exposed: &[Exposure]) -> Nftables<'static> {
    let table = table_name(bridge);
    let mut batch = Batch::new();
    for (family, range) in [(NfFamily::IP, Some(ranges.v4)), (NfFamily::IP6, ranges.v6)] {
        let mut subnets: Vec<(Cidr, bool)> = Vec::new();
        for e in exposed {
            let Ok((_, subnet)) = parse(e) else { continue };
            if subnet.is_v6() != (family == NfFamily::IP6) {
                continue;
            }
            match subnets.iter_mut().find(|(s, _)| *s == subnet) {
                Some(s) => s.1 |= e.masquerade,
                None => subnets.push((subnet, e.masquerade)),
            }
        }
        if family == NfFamily::IP6 && range.is_none() && subnets.is_empty() {
            continue;
        }
        declare_and_delete_in(&mut batch, family, &table);
        let Some(range) = range else { continue };
        if subnets.is_empty() {
            continue;
        }
        define(&mut batch, family, &table, bridge, range, &subnets);
    }
    batch.to_nftables()
}

/// Defines `family table` for `subnets` (each with whether it is masqueraded).
fn define(batch: &mut Batch<'static>, family: NfFamily, table: &str, bridge: &str, range: Cidr, subnets: &[(Cidr, bool)]) {
    let ip = if family == NfFamily::IP6 { "ip6" } else { "ip" };
    batch.add(NfListObject::Table(our_table_in(family, table)));
    batch.add(NfListObject::Chain(base_chain_in(family, table, FORWARD, NfChainType::Filter, NfHook::Forward, PRIO_FILTER)));
    batch.add(NfListObject::Chain(base_chain_in(family, table, POSTROUTING, NfChainType::NAT, NfHook::Postrouting, PRIO_SRCNAT)));
    for (subnet, _) in subnets {
        // iifname BRIDGE oifname BRIDGE ip saddr SUBNET ip daddr RANGE ip daddr != SUBNET counter drop
        // Only destinations inside the overlay range: where br_netfilter is
        // loaded (Docker hosts) frames merely *bridged* between the TAP and a
        // container pass this hook too, with the bridge as both interfaces,
        // and their multicast (IPv6 neighbour discovery to ff02::1:ffXX:XXXX,
        // mDNS, ...) must not be taken for routing between subnets.
        let expr = vec![
            matches(meta(MetaKey::Iifname), Operator::EQ, text(bridge)),
            matches(meta(MetaKey::Oifname), Operator::EQ, text(bridge)),
            matches(nft::field(ip, "saddr"), Operator::EQ, prefix(*subnet)),
            matches(nft::field(ip, "daddr"), Operator::EQ, prefix(range)),
            matches(nft::field(ip, "daddr"), Operator::NEQ, prefix(*subnet)),
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Drop(None),
        ];
        batch.add(NfListObject::Rule(rule_in(family, table, FORWARD, expr, format!("isolate {subnet} from other overlay subnets"))));
    }
    for (subnet, _) in subnets.iter().filter(|(_, masquerade)| *masquerade) {
        // oifname != BRIDGE ip saddr SUBNET ip daddr != RANGE counter masquerade
        let expr = vec![
            matches(meta(MetaKey::Oifname), Operator::NEQ, text(bridge)),
            matches(nft::field(ip, "saddr"), Operator::EQ, prefix(*subnet)),
            matches(nft::field(ip, "daddr"), Operator::NEQ, prefix(range)),
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Masquerade(None),
        ];
        batch.add(NfListObject::Rule(rule_in(family, table, POSTROUTING, expr, format!("egress of {subnet}"))));
    }
}

/// The batch that deletes meshnet's `ip` table (and nothing else), whether or
/// not it is there.
pub fn deletion(bridge: &str) -> Nftables<'static> {
    nft::declare_and_delete(&table_name(bridge)).to_nftables()
}

const FORWARD: &str = "forward";
const POSTROUTING: &str = "postrouting";

/// Makes the tables what `exposed` needs: replaced whole, or deleted when
/// nothing is exposed.
pub fn apply_table(bridge: &str, ranges: Ranges, exposed: &[Exposure]) -> Result<()> {
    if exposed.iter().any(|e| parse(e).is_ok()) {
        nft::apply(&ruleset(bridge, ranges, exposed)).with_context(|| format!("nftables tables ip/ip6 {}", table_name(bridge)))
    } else {
        delete_table(bridge).map(|_| ())
    }
}

/// Deletes meshnet's tables (`ip`, then `ip6`); Ok(false) if neither was there.
pub fn delete_table(bridge: &str) -> Result<bool> {
    let table = table_name(bridge);
    let v4 = nft::delete_table(&table).with_context(|| format!("delete nftables table ip {table}"))?;
    let v6 = nft::delete_table_in(NfFamily::IP6, &table).with_context(|| format!("delete nftables table ip6 {table}"))?;
    Ok(v4 || v6)
}

/// Writes the tables again if one that `exposed` needs is gone (someone ran
/// `nft flush ruleset`, a firewall reloaded its rules): Ok(true) when it did.
/// Weave checked for its iptables chains the same way, every 10 s.
pub fn restore_tables(bridge: &str, ranges: Ranges, exposed: &[Exposure]) -> Result<bool> {
    let table = table_name(bridge);
    let mut gone = false;
    for v6 in [false, true] {
        let family = if v6 { NfFamily::IP6 } else { NfFamily::IP };
        if exposed.iter().any(|e| parse(e).is_ok_and(|(ip, _)| ip.is_ipv6() == v6))
            && !nft::table_exists_in(family, &table).with_context(|| format!("list nftables tables ({table})"))?
        {
            gone = true;
        }
    }
    if gone {
        apply_table(bridge, ranges, exposed)?;
    }
    Ok(gone)
}

/// Exposed traffic is forwarded by this host: make sure it forwards that
/// family (as Docker does, it is left on). For IPv6 that is
/// `net.ipv6.conf.all.forwarding`, which also stops interfaces with
/// `accept_ra` 1 from taking router advertisements (as with Docker's IPv6).
pub fn enable_forwarding(v6: bool) {
    let (path, family) = if v6 {
        ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6")
    } else {
        ("/proc/sys/net/ipv4/ip_forward", "IPv4")
    };
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    match std::fs::write(path, "1\n") {
        Ok(()) => log::info!("enabled {family} forwarding ({path}) for the exposed addresses"),
        Err(e) => log::warn!("could not enable {family} forwarding ({path}): {e}; exposed subnets will not reach the outside"),
    }
}

/// Forwarding on for every family something of is exposed.
pub fn enable_forwarding_for(exposed: &[Exposure]) {
    for v6 in [false, true] {
        if exposed.iter().any(|e| parse(e).is_ok_and(|(ip, _)| ip.is_ipv6() == v6)) {
            enable_forwarding(v6);
        }
    }
}

/// Whether anything IPv6 is exposed.
pub fn any_v6(exposed: &[Exposure]) -> bool {
    exposed.iter().any(|e| parse(e).is_ok_and(|(ip, _)| ip.is_ipv6()))
}

/// Puts every exposed address on the bridge (IPv6 on the bridge exactly when
/// one of them is IPv6) and writes the tables (after a restart, or a bridge
/// made again).
pub fn apply(bridge: &str, ranges: Ranges, exposed: &[Exposure]) -> Result<()> {
    netlink::set_bridge_ipv6(bridge, any_v6(exposed))?;
    for e in exposed {
        let (ip, subnet) = parse(e)?;
        netlink::add_link_address(bridge, ip, subnet.prefix())?;
    }
    enable_forwarding_for(exposed);
    apply_table(bridge, ranges, exposed)
}

/// Removes what meshnet added for `exposed`: the addresses on the bridge (and
/// IPv6 on it) and the tables (`reset`).
pub fn remove_all(bridge: &str, exposed: &[Exposure]) {
    if let Err(err) = netlink::set_bridge_ipv6(bridge, false) {
        log::warn!("{err}");
    }
    for e in exposed {
        if let Ok((ip, subnet)) = parse(e) {
            if let Err(err) = netlink::del_link_address(bridge, ip, subnet.prefix()) {
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

    fn v4_only(range: Cidr) -> Ranges {
        Ranges { v4: range, v6: None }
    }

    fn to_json(batch: &Nftables) -> Value {
        serde_json::to_value(batch).unwrap()
    }

    fn table(name: &str) -> Value {
        table_of("ip", name)
    }

    fn table_of(family: &str, name: &str) -> Value {
        json!({"table": {"family": family, "name": name}})
    }

    /// The commands before the rules: declare, delete, define the table and its two base chains.
    fn head(name: &str) -> Vec<Value> {
        head_of("ip", name)
    }

    fn head_of(family: &str, name: &str) -> Vec<Value> {
        vec![
            json!({"add": table_of(family, name)}),
            json!({"delete": table_of(family, name)}),
            json!({"add": table_of(family, name)}),
            json!({"add": {"chain": {"family": family, "table": name, "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
            json!({"add": {"chain": {"family": family, "table": name, "name": "postrouting",
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

    /// iifname B oifname B ip saddr S ip daddr RANGE ip daddr != S counter drop
    fn isolate(name: &str, bridge: &str, net: &str, len: u32, range: (&str, u32)) -> Value {
        json!({"add": {"rule": {"family": "ip", "table": name, "chain": "forward", "expr": [
            ifname("iifname", "==", bridge), ifname("oifname", "==", bridge),
            ip("saddr", "==", net, len), ip("daddr", "==", range.0, range.1), ip("daddr", "!=", net, len),
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

    fn ip6(field: &str, op: &str, addr: &str, len: u32) -> Value {
        json!({"match": {"left": {"payload": {"protocol": "ip6", "field": field}},
            "right": {"prefix": {"addr": addr, "len": len}}, "op": op}})
    }

    fn batch(objects: Vec<Value>) -> Value {
        json!({"nftables": objects})
    }

    #[test]
    fn nothing_exposed_deletes_only_our_table() {
        let range: Cidr = "10.32.0.0/12".parse().unwrap();
        let ours = batch(vec![json!({"add": table("meshnet")}), json!({"delete": table("meshnet")})]);
        assert_eq!(to_json(&ruleset("meshnet", v4_only(range), &[])), ours);
        assert_eq!(to_json(&deletion("meshnet")), ours);
        // Exposures that do not parse count as nothing.
        assert_eq!(to_json(&ruleset("meshnet", v4_only(range), &[ex("bogus", true)])), ours);
        let other = batch(vec![json!({"add": table("meshnet-br1")}), json!({"delete": table("meshnet-br1")})]);
        assert_eq!(to_json(&deletion("br1")), other);
    }

    #[test]
    fn one_subnet_with_and_without_masquerade() {
        let range: Cidr = "10.32.0.0/12".parse().unwrap();
        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.push(masquerade("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        assert_eq!(to_json(&ruleset("meshnet", v4_only(range), &[ex("10.32.0.1/12", true)])), batch(want));

        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        assert_eq!(to_json(&ruleset("meshnet", v4_only(range), &[ex("10.32.0.1/12", false)])), batch(want));
    }

    #[test]
    fn two_subnets_with_and_without_masquerade() {
        let range: Cidr = "10.2.0.0/16".parse().unwrap();
        let t = "meshnet-br1";
        let both = |m1: bool, m2: bool| {
            let mut want = head(t);
            want.push(isolate(t, "br1", "10.2.1.0", 24, ("10.2.0.0", 16)));
            want.push(isolate(t, "br1", "10.2.5.0", 24, ("10.2.0.0", 16)));
            if m1 {
                want.push(masquerade(t, "br1", "10.2.1.0", 24, ("10.2.0.0", 16)));
            }
            if m2 {
                want.push(masquerade(t, "br1", "10.2.5.0", 24, ("10.2.0.0", 16)));
            }
            batch(want)
        };
        for (m1, m2) in [(true, true), (true, false), (false, true), (false, false)] {
            let got = ruleset("br1", v4_only(range), &[ex("10.2.1.3/24", m1), ex("10.2.5.1/24", m2)]);
            assert_eq!(to_json(&got), both(m1, m2), "masquerade {m1} {m2}");
        }
        // Two addresses in one subnet make one set of rules, masqueraded if either asks.
        let got = ruleset("br1", v4_only(range), &[ex("10.2.1.3/24", false), ex("10.2.1.9/24", true), ex("10.2.5.1/24", false)]);
        assert_eq!(to_json(&got), both(true, false));
        assert_eq!(table_name("meshnet"), "meshnet");
    }

    #[test]
    fn exposures_parse_in_both_families() {
        let (ip, subnet) = parse(&ex("10.32.0.1/12", true)).unwrap();
        assert_eq!((ip.to_string(), subnet.to_string()), ("10.32.0.1".to_string(), "10.32.0.0/12".to_string()));
        let (ip, subnet) = parse(&ex("fd32::5/64", true)).unwrap();
        assert_eq!((ip.to_string(), subnet.to_string()), ("fd32::5".to_string(), "fd32::/64".to_string()));
        for bad in ["bogus", "fd32::5", "fd32::5/129", "10.32.0.1/33", "fd32::zz/64"] {
            assert!(parse(&ex(bad, true)).is_err(), "{bad}");
        }
    }

    #[test]
    fn dual_stack_writes_an_ip6_table_beside_the_ip_one() {
        let ranges = Ranges { v4: "10.32.0.0/12".parse().unwrap(), v6: Some("fd32::/64".parse().unwrap()) };
        let (v4, v6) = (ex("10.32.0.1/12", true), ex("fd32::1/64", true));
        // The IPv4 table exactly as before, then the IPv6 one of the same shape.
        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.push(masquerade("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.extend(head_of("ip6", "meshnet"));
        want.push(json!({"add": {"rule": {"family": "ip6", "table": "meshnet", "chain": "forward", "expr": [
            ifname("iifname", "==", "meshnet"), ifname("oifname", "==", "meshnet"),
            ip6("saddr", "==", "fd32::", 64), ip6("daddr", "==", "fd32::", 64), ip6("daddr", "!=", "fd32::", 64),
            {"counter": null}, {"drop": null},
        ], "comment": "isolate fd32::/64 from other overlay subnets"}}}));
        want.push(json!({"add": {"rule": {"family": "ip6", "table": "meshnet", "chain": "postrouting", "expr": [
            ifname("oifname", "!=", "meshnet"), ip6("saddr", "==", "fd32::", 64), ip6("daddr", "!=", "fd32::", 64),
            {"counter": null}, {"masquerade": null},
        ], "comment": "egress of fd32::/64"}}}));
        assert_eq!(to_json(&ruleset("meshnet", ranges, &[v4.clone(), v6.clone()])), batch(want));
        // Order of exposure does not matter.
        assert_eq!(to_json(&ruleset("meshnet", ranges, &[v6.clone(), v4.clone()])), to_json(&ruleset("meshnet", ranges, &[v4.clone(), v6.clone()])));

        // Only IPv4 exposed (with an IPv6 range): the ip6 table is deleted.
        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.push(masquerade("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.push(json!({"add": table_of("ip6", "meshnet")}));
        want.push(json!({"delete": table_of("ip6", "meshnet")}));
        assert_eq!(to_json(&ruleset("meshnet", ranges, &[v4.clone()])), batch(want));

        // Only IPv6 exposed, without masquerade, on another bridge: the ip table is deleted.
        let mut want = vec![json!({"add": table("meshnet-br1")}), json!({"delete": table("meshnet-br1")})];
        want.extend(head_of("ip6", "meshnet-br1"));
        want.push(json!({"add": {"rule": {"family": "ip6", "table": "meshnet-br1", "chain": "forward", "expr": [
            ifname("iifname", "==", "br1"), ifname("oifname", "==", "br1"),
            ip6("saddr", "==", "fd32::", 64), ip6("daddr", "==", "fd32::", 64), ip6("daddr", "!=", "fd32::", 64),
            {"counter": null}, {"drop": null},
        ], "comment": "isolate fd32::/64 from other overlay subnets"}}}));
        assert_eq!(to_json(&ruleset("br1", ranges, &[ex("fd32::1/64", false)])), batch(want));

        // Nothing exposed, IPv6 range configured: both tables deleted.
        let want = batch(vec![
            json!({"add": table("meshnet")}), json!({"delete": table("meshnet")}),
            json!({"add": table_of("ip6", "meshnet")}), json!({"delete": table_of("ip6", "meshnet")}),
        ]);
        assert_eq!(to_json(&ruleset("meshnet", ranges, &[])), want);

        // An IPv6 exposure left over from a launch with an IPv6 range, now without
        // one: its table is deleted, not written with no range to keep inside.
        let mut want = head("meshnet");
        want.push(isolate("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.push(masquerade("meshnet", "meshnet", "10.32.0.0", 12, ("10.32.0.0", 12)));
        want.push(json!({"add": table_of("ip6", "meshnet")}));
        want.push(json!({"delete": table_of("ip6", "meshnet")}));
        assert_eq!(to_json(&ruleset("meshnet", v4_only(ranges.v4), &[v4, v6])), batch(want));
    }
}
