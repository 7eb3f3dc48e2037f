//! `meshnet report [--json]`: everything the router knows in one document, as
//! `weave report` gave: the router and its settings, peers with their gossiped
//! connections, this router's connections with their details, routes, the MAC
//! table's size, the IPAM ring, exposed addresses, attachments, per-peer
//! traffic and every counter of `status --json`.
//!
//! The document is built from what `status`, `status ipam` and `ps` answer
//! plus the topology and the data plane's counters; nothing is computed twice.

use serde_json::{json, Value};

use crate::mesh::Mesh;
use crate::state::Exposure;

/// The report (the `report` request's answer).
pub fn build(mesh: &Mesh, status: Value, ipam: Value, ps: Value, exposed: &[Exposure]) -> Value {
    let traffic: Vec<Value> = mesh
        .dataplane
        .traffic
        .snapshot()
        .into_iter()
        .map(|(p, t)| {
            json!({
                "peer": p.to_string(),
                "sent_bytes": t.tx_bytes,
                "sent_datagrams": t.tx_datagrams,
                "sent_units": t.tx_units,
                "received_bytes": t.rx_bytes,
                "received_datagrams": t.rx_datagrams,
                "relayed_units": t.relayed_units,
                "relayed_bytes": t.relayed_bytes,
                "drops": t.drops.iter().map(|(k, n)| (k.clone(), json!(n))).collect::<serde_json::Map<String, Value>>(),
            })
        })
        .collect();
    let (peers, routes) = {
        let g = mesh.lock();
        let nick = |p: meshnet_proto::PeerName| g.topology.get(p).map(|i| i.nickname.clone()).unwrap_or_default();
        let mut peers: Vec<Value> = g
            .topology
            .peers()
            .map(|p| {
                json!({
                    "name": p.name.to_string(),
                    "nickname": p.nickname,
                    "uid": p.uid,
                    "version": p.version,
                    "software": p.software,
                    "mtu": p.mtu,
                    "connections": p.connections.iter().map(|c| json!({
                        "peer": c.peer.to_string(),
                        "nickname": nick(c.peer),
                        "address": c.addr.to_string(),
                        "outbound": c.outbound,
                        "established": c.established,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        peers.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut routes: Vec<Value> = g
            .next_hop
            .iter()
            .map(|(dst, hop)| {
                json!({
                    "peer": dst.to_string(),
                    "nickname": nick(*dst),
                    "next_hop": hop.to_string(),
                    "route": if dst == hop { "direct" } else { "relayed" },
                })
            })
            .collect();
        routes.sort_by(|a, b| a["peer"].as_str().cmp(&b["peer"].as_str()));
        (peers, routes)
    };
    let s = |k: &str| status.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "router": {
            "name": s("name"),
            "nickname": s("nickname"),
            "version": s("version"),
            "port": s("port"),
            "password": s("password"),
            "discovery": s("discovery"),
            "bridge": s("bridge"),
            "mtu": s("mtu"),
            "datapath": s("datapath"),
        },
        "peers": peers,
        "connections": s("connections"),
        "targets": s("targets"),
        "routes": routes,
        "mac_table": { "entries": mesh.dataplane.mac_entries() },
        "ipam": ipam,
        "exposed": exposed.iter().map(|e| json!({ "address": e.addr, "masquerade": e.masquerade })).collect::<Vec<_>>(),
        "attachments": ps,
        "dns": serde_json::to_value(mesh.dns.status()).unwrap_or(Value::Null),
        "traffic": traffic,
        "dataplane": s("dataplane"),
        "superframes": {
            "tx": mesh.dataplane.superframes().0,
            "rx": mesh.dataplane.superframes().1,
        },
        "limits": s("limits"),
        "control": s("control"),
        "trust": s("trust"),
    })
}

/// The report as text: one section per part, the counters last.
pub fn to_text(v: &Value) -> String {
    use std::fmt::Write;
    let str_of = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut o = String::new();
    let r = &v["router"];
    let _ = writeln!(o, "Router");
    for k in ["name", "nickname", "version", "port", "password", "discovery", "bridge", "mtu", "datapath"] {
        let _ = writeln!(o, "  {k:>10}: {}", str_of(&r[k]));
    }
    let _ = writeln!(o, "\nPeers");
    for p in v["peers"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {}({}) mtu {} uid {}", str_of(&p["name"]), str_of(&p["nickname"]), p["mtu"], p["uid"]);
        for c in p["connections"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "     {} {}({}) {} {}",
                if c["outbound"].as_bool() == Some(true) { "->" } else { "<-" },
                str_of(&c["peer"]),
                str_of(&c["nickname"]),
                str_of(&c["address"]),
                if c["established"].as_bool() == Some(true) { "established" } else { "pending" }
            );
        }
    }
    let _ = writeln!(o, "\nConnections");
    for c in v["connections"].as_array().into_iter().flatten() {
        let who = match c["peer"].as_str() {
            Some(p) => format!("{p}({})", str_of(&c["nickname"])),
            None => String::new(),
        };
        let _ = writeln!(o, "  {:<22} {:<12} {} {}", str_of(&c["address"]), str_of(&c["state"]), who, str_of(&c["info"]));
    }
    let _ = writeln!(o, "\nTargets");
    for t in v["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {}", str_of(t));
    }
    let _ = writeln!(o, "\nRoutes");
    for rt in v["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {}({}) {} via {}", str_of(&rt["peer"]), str_of(&rt["nickname"]), str_of(&rt["route"]), str_of(&rt["next_hop"]));
    }
    let _ = writeln!(o, "\nMAC table: {} entries", v["mac_table"]["entries"]);
    // The IPv4 ring, and the IPv6 one (under `ipv6`) where there is one.
    for (title, ipam) in [("IPAM", &v["ipam"]), ("IPAM (IPv6 ring)", &v["ipam"]["ipv6"])] {
        if ipam.is_null() {
            continue;
        }
        let _ = writeln!(o, "\n{title}");
        let _ = writeln!(o, "  range {} (default subnet {}), {} allocated here, {} pending, {} unreachable",
            str_of(&ipam["range"]), str_of(&ipam["default_subnet"]), ipam["allocated_here"], ipam["pending"], str_of(&ipam["unreachable_space"]));
        for ow in ipam["owners"].as_array().into_iter().flatten() {
            let _ = writeln!(o, "  {} {:>10} addresses, {:>10} free{}", str_of(&ow["peer"]), str_of(&ow["size"]), str_of(&ow["free"]),
                if ow["reachable"].as_bool() == Some(true) { "" } else { " (unreachable)" });
        }
        for a in ipam["allocations"].as_array().into_iter().flatten() {
            let _ = writeln!(o, "  allocated {} to {}", str_of(&a["ip"]), str_of(&a["target"]));
        }
        for c in ipam["conflicts"].as_array().into_iter().flatten() {
            let _ = writeln!(o, "  conflict: {}/{} of {}: {}", str_of(&c["ip"]), c["prefix"], str_of(&c["target"]), str_of(&c["error"]));
        }
    }
    let _ = writeln!(o, "\nExposed");
    for e in v["exposed"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {}{}", str_of(&e["address"]), if e["masquerade"].as_bool() == Some(false) { " (no masquerade)" } else { "" });
    }
    let _ = writeln!(o, "\nAttachments");
    for a in v["attachments"].as_array().into_iter().flatten() {
        let addrs: Vec<String> = a["addresses"].as_array().into_iter().flatten().map(str_of).collect();
        let _ = writeln!(o, "  {} {} {} {}", str_of(&a["target"]), str_of(&a["kind"]), str_of(&a["mac"]), addrs.join(" "));
    }
    let dns = &v["dns"];
    let _ = writeln!(o, "\nDNS");
    let listen = match (dns["enabled"].as_bool(), dns["listen"].as_str()) {
        (Some(false), _) => "off (--no-dns)".to_string(),
        (_, Some(a)) => format!("listening on {a}"),
        _ => crate::dns::not_listening(dns["listen_error"].as_str()),
    };
    let _ = writeln!(o, "  domain {} (TTL {}s), {listen}", str_of(&dns["domain"]), str_of(&dns["ttl"]));
    for r in dns["records"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {} {} {} {}", str_of(&r["name"]), str_of(&r["address"]), str_of(&r["target"]), str_of(&r["owner"]));
    }
    let _ = writeln!(o, "\nTraffic per peer");
    for t in v["traffic"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {} sent {} B ({} datagrams), received {} B ({} datagrams), relayed to it {} B",
            str_of(&t["peer"]), t["sent_bytes"], t["sent_datagrams"], t["received_bytes"], t["received_datagrams"], t["relayed_bytes"]);
        let drops: Vec<String> = t["drops"].as_object().into_iter().flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0).map(|(k, n)| format!("{k} {n}")).collect();
        if !drops.is_empty() {
            let _ = writeln!(o, "     dropped: {}", drops.join(", "));
        }
    }
    for (title, key) in [("Data plane", "dataplane"), ("Superframes", "superframes"), ("Limits", "limits"), ("Control", "control"), ("Trust", "trust")] {
        let _ = writeln!(o, "\n{title}");
        for (k, n) in v[key].as_object().into_iter().flatten() {
            let _ = writeln!(o, "  {k:>28}: {}", str_of(n));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_every_section_and_tolerates_missing_parts() {
        let v = json!({
            "router": {"name": "02:00:00:00:00:01", "nickname": "a"},
            "peers": [{"name": "02:00:00:00:00:01", "nickname": "a", "mtu": 1376, "uid": 1,
                       "connections": [{"peer": "02:00:00:00:00:02", "nickname": "b", "address": "10.0.0.2:6783", "outbound": true, "established": true}]}],
            "routes": [{"peer": "02:00:00:00:00:02", "nickname": "b", "route": "direct", "next_hop": "02:00:00:00:00:02"}],
            "mac_table": {"entries": 3},
            "traffic": [{"peer": "02:00:00:00:00:02", "sent_bytes": 10, "drops": {"no_route": 2, "encode_error": 0}}],
            "ipam": {"allocations": [{"ip": "10.32.0.1", "target": "netns:c1"}],
                     "ipv6": {"range": "fd32::/64", "owners": [{"peer": "02:00:00:00:00:01", "size": "18446744073709551616", "free": 5, "reachable": true}],
                              "allocations": [{"ip": "fd32::1", "target": "netns:c1"}]}},
            "dns": {"enabled": true, "domain": "meshnet.local.", "ttl": 1, "listen": "10.32.0.2:53",
                    "records": [{"name": "db.meshnet.local.", "address": "10.32.0.1", "target": "c1", "owner": "02:00:00:00:00:01"}]},
            "trust": {"pinned_keys": 2},
        });
        let t = to_text(&v);
        for want in [
            "Router", "Peers", "-> 02:00:00:00:00:02(b) 10.0.0.2:6783 established", "Routes", "MAC table: 3 entries", "IPAM",
            "allocated 10.32.0.1 to netns:c1", "Exposed", "Attachments", "dropped: no_route 2", "DNS",
            "listening on 10.32.0.2:53", "db.meshnet.local. 10.32.0.1 c1 02:00:00:00:00:01", "Trust", "pinned_keys: 2",
            "IPAM (IPv6 ring)\n  range fd32::/64", "02:00:00:00:00:01 18446744073709551616 addresses", "allocated fd32::1 to netns:c1",
        ] {
            assert!(t.contains(want), "{want:?} missing from:\n{t}");
        }
        assert!(!t.contains("encode_error 0"), "zero drops are left out:\n{t}");
        let mut quiet = v.clone();
        quiet["dns"]["listen"] = serde_json::Value::Null;
        let t = to_text(&quiet);
        assert!(t.contains("(TTL 1s), not listening (no address exposed"), "{t}");
        assert!(!t.contains("listening on not"), "{t}");
    }
}
