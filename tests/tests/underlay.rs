//! The underlay beyond one IPv4 LAN: an IPv6-only underlay, a mesh mixing
//! IPv4-only, IPv6-only and dual-stack hosts (relaying where two hosts share
//! no address family), and direct paths between peers behind NATs.

use std::time::Duration;

use meshnet_tests::lab::*;
use serde_json::Value;

/// Host `i`'s IPv6 underlay address in this lab (a /64 of its own per lab).
fn ip6(lab: &Lab, i: u8) -> String {
    let k: u8 = lab.host_ip(1).split('.').nth(2).and_then(|o| o.parse().ok()).expect("lab octet");
    format!("fd00:250:{k:x}::{i}")
}

/// Gives `h` its IPv6 address (no duplicate detection: usable at once) and,
/// with `v4: false`, takes its IPv4 address away.
fn family(lab: &Lab, h: &Host, v4: bool, v6: bool) {
    if v6 {
        exec_in(&h.ns, &["ip", "-6", "addr", "add", &format!("{}/64", ip6(lab, h.i)), "dev", "eth0", "nodad"]).expect_ok("add IPv6");
    }
    if !v4 {
        exec_in(&h.ns, &["ip", "-4", "addr", "flush", "dev", "eth0"]).expect_ok("remove IPv4");
    }
}

fn name(h: &Host) -> String {
    h.status_json()["name"].as_str().unwrap_or_default().to_string()
}

fn connections(h: &Host) -> Vec<Value> {
    h.status_json()["connections"].as_array().cloned().unwrap_or_default()
}

/// The established connection of `h` to `peer`, if any.
fn conn_to(h: &Host, peer: &str) -> Option<Value> {
    connections(h).into_iter().find(|c| c["peer"] == peer && c["state"] == "established")
}

fn relayed_units(h: &Host) -> u64 {
    h.status_json()["dataplane"]["relayed_units"].as_u64().unwrap_or(0)
}

#[test]
fn an_ipv6_only_underlay_of_three_hosts_forms_a_mesh() {
    let Some(lab) = Lab::new("v6only") else { return };
    let hosts: Vec<Host> = (1..=3).map(|i| lab.add_host(i)).collect();
    for h in &hosts {
        family(&lab, h, false, true);
    }
    // h3 carries at most 1300-byte packets both ways: its path MTU must be
    // the IPv6 floor (1280 bytes of IPv6, 1232 of UDP payload), not a
    // smaller IPv4 ladder step.
    exec_in(&hosts[2].ns, &["ip", "link", "set", "eth0", "mtu", "1300"]).expect_ok("mtu");
    let (a1, a2, a3) = (ip6(&lab, 1), ip6(&lab, 2), ip6(&lab, 3));
    // The forms: `--host ::` (dual-stack), `[v6]:port`, `--host <v6>` and a bracketed literal without a port.
    // Both families on the overlay too: IPv6 and IPv4 containers over an IPv6-only underlay.
    let v6 = ["--ipalloc-range", "10.32.0.0/12", "--ipalloc-range", "fd42::/64"];
    hosts[0].launch(&[&v6[..], &["--host", "::"]].concat());
    hosts[1].launch(&[&v6[..], &["--host", "::", &format!("[{a1}]:6783")]].concat());
    hosts[2].launch(&[&v6[..], &["--host", &a3, &format!("[{a2}]")]].concat());
    let names: Vec<String> = hosts.iter().map(name).collect();
    // h1 and h3 meet through discovery: gossip carries IPv6 addresses.
    let full = wait_until(Duration::from_secs(40), || {
        hosts.iter().enumerate().all(|(i, h)| (0..3).filter(|&j| j != i).all(|j| conn_to(h, &names[j]).is_some()))
    });
    assert!(full, "no full mesh over IPv6: {:#?}", hosts.iter().map(connections).collect::<Vec<_>>());
    for (i, h) in hosts.iter().enumerate() {
        for (j, peer) in names.iter().enumerate().filter(|(j, _)| *j != i) {
            let c = conn_to(h, peer).expect("established");
            let udp = c["udp_addr"].as_str().unwrap_or_default();
            assert!(udp.starts_with(&format!("[{}]", ip6(&lab, j as u8 + 1))), "h{} sends to h{} at {udp}: {c:#}", i + 1, j + 1);
            let mtu = c["path_mtu"].as_u64().unwrap_or(0);
            let want = if i == 2 || j == 2 { 1232 } else { 1452 };
            assert_eq!(mtu, want, "path MTU h{} → h{} (1500-byte links give 1452, h3's 1300-byte one the IPv6 floor): {c:#}", i + 1, j + 1);
        }
    }
    let cs: Vec<Container> = hosts.iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in hosts.iter().zip(&cs) {
        h.meshnet(&["attach", &format!("10.42.0.{}/16", c.j), &format!("fd42::{}/64", c.j), &c.ns]).expect_ok("attach");
    }
    for a in &cs {
        for b in cs.iter().filter(|b| b.j != a.j) {
            assert!(ping_until(&a.ns, &format!("10.42.0.{}", b.j), Duration::from_secs(20)), "{} cannot reach 10.42.0.{}", a.ns, b.j);
            let v6 = format!("fd42::{}", b.j);
            assert!(ping_until(&a.ns, &v6, Duration::from_secs(20)), "{} cannot reach {v6} (IPv6 overlay over the IPv6 underlay)", a.ns);
        }
    }
    let big6 = exec_in(&cs[0].ns, &["ping", "-6", "-c", "3", "-W", "2", "-s", "8000", "fd42::3"]);
    // The first may be answered by a Packet Too Big (h3's path is at the IPv6 floor); the next cross.
    assert!(big6.stdout.contains("bytes from fd42::3"), "ping -6 -s 8000 over the IPv6 underlay: {big6}");
    // Frames larger than a datagram cross, cut to each path's MTU.
    for to in ["10.42.0.2", "10.42.0.3"] {
        let big = exec_in(&cs[0].ns, &["ping", "-c", "3", "-W", "2", "-s", "8000", to]);
        assert!(big.ok(), "ping -s 8000 to {to} over IPv6: {big}");
    }
    // A TCP transfer over the IPv6 underlay, checked end to end.
    checked_transfer(&lab, &cs[0].ns, &cs[1].ns, "10.42.0.2", 50 << 20, Duration::from_secs(90));
    checked_transfer(&lab, &cs[1].ns, &cs[2].ns, "10.42.0.3", 20 << 20, Duration::from_secs(90));
}

#[test]
fn ipv4_only_and_ipv6_only_hosts_talk_through_a_dual_stack_host() {
    let Some(lab) = Lab::new("mixed") else { return };
    let h1 = lab.add_host(1); // IPv4 only
    let h2 = lab.add_host(2); // IPv6 only
    let h3 = lab.add_host(3); // both
    family(&lab, &h2, false, true);
    family(&lab, &h3, true, true);
    let a2 = ip6(&lab, 2);
    let a3 = ip6(&lab, 3);
    h3.launch(&["--host", "::"]);
    h1.launch(&[&h3.ip]);
    h2.launch(&["--host", &a2, &format!("[{a3}]:6783")]);
    let (n1, n2, n3) = (name(&h1), name(&h2), name(&h3));
    assert!(
        wait_until(Duration::from_secs(30), || conn_to(&h3, &n1).is_some() && conn_to(&h3, &n2).is_some()),
        "the dual-stack host has not both: {:#?}",
        connections(&h3)
    );
    // h3 knows h1 by its IPv4 address (not as mapped IPv6) and h2 by its IPv6 one.
    let c31 = conn_to(&h3, &n1).expect("h3 → h1");
    assert_eq!(c31["udp_addr"].as_str(), Some(format!("{}:6783", h1.ip).as_str()), "{c31:#}");
    let c32 = conn_to(&h3, &n2).expect("h3 → h2");
    assert_eq!(c32["udp_addr"].as_str(), Some(format!("[{a2}]:6783").as_str()), "{c32:#}");
    let cs: Vec<Container> = [&h1, &h2, &h3].iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in [&h1, &h2, &h3].iter().zip(&cs) {
        h.meshnet(&["attach", &format!("10.42.0.{}/16", c.j), &c.ns]).expect_ok("attach");
    }
    let before = relayed_units(&h3);
    assert!(ping_until(&cs[0].ns, "10.42.0.2", Duration::from_secs(30)), "c1 (IPv4 host) cannot reach c2 (IPv6 host)");
    assert!(ping(&cs[1].ns, "10.42.0.1", 3), "c2 cannot reach c1");
    let big = exec_in(&cs[0].ns, &["ping", "-c", "3", "-W", "2", "-s", "8000", "10.42.0.2"]);
    assert!(big.ok(), "ping -s 8000 across families: {big}");
    for c in &cs[..2] {
        assert!(ping(&c.ns, "10.42.0.3", 2), "{} cannot reach the dual-stack host's container", c.ns);
    }
    assert!(relayed_units(&h3) >= before + 6, "the dual-stack host relayed nothing: {:#}", h3.status_json());
    // h1 and h2 share no family: no connection between them, and discovery
    // never tried one (no failed dial in either's status).
    for (h, other, other_addr) in [(&h1, &n2, a2.clone()), (&h2, &n1, h1.ip.clone())] {
        let conns = connections(h);
        assert!(!conns.iter().any(|c| c["peer"] == other.as_str()), "{} connected to {other}: {conns:#?}", h.ns);
        assert!(!conns.iter().any(|c| c["address"].as_str().unwrap_or_default().contains(&other_addr)), "{} dialled {other_addr}: {conns:#?}", h.ns);
        let peers = h.meshnet(&["status", "peers"]).expect_ok("status peers");
        assert!(peers.stdout.contains(other.as_str()), "{} does not know {other}: {peers}", h.ns);
    }
    // A connect target of a family this router's socket cannot reach is
    // refused with a reason, not left pending for ever.
    h1.meshnet(&["connect", &format!("[{a2}]:6783")]).expect_ok("connect");
    let said = wait_until(Duration::from_secs(10), || {
        connections(&h1).iter().any(|c| c["info"].as_str().unwrap_or_default().contains("listens on IPv4 only"))
    });
    assert!(said, "no reason for the IPv6 target on an IPv4 socket: {:#?}", connections(&h1));
    let _ = (n3,);
}

/// `h`'s connection to `peer` in any state.
fn any_conn_to(h: &Host, peer: &str) -> Option<Value> {
    connections(h).into_iter().find(|c| c["peer"] == peer)
}

/// One public host and two hosts each behind its own NAT box doing `nat`;
/// the NATed hosts connect to the public one only. Containers 10.42.0.<i>.
fn nat_lab(lab: &Lab, nat: &[&str]) -> (Host, Host, Host, Vec<Container>) {
    let public = lab.add_host(1);
    let (h2, _n2) = lab.add_host_behind_nat(2, nat);
    let (h3, _n3) = lab.add_host_behind_nat(3, nat);
    public.launch(&[]);
    h2.launch(&[&public.ip]);
    h3.launch(&[&public.ip]);
    let cs: Vec<Container> = [&public, &h2, &h3].iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in [&public, &h2, &h3].iter().zip(&cs) {
        h.meshnet(&["attach", &format!("10.42.0.{}/16", c.j), &c.ns]).expect_ok("attach");
    }
    (public, h2, h3, cs)
}

#[test]
fn two_peers_behind_nats_get_a_direct_path() {
    let Some(lab) = Lab::new("natdirect") else { return };
    let (public, h2, h3, cs) = nat_lab(&lab, &["-j", "MASQUERADE"]);
    let (n2, n3) = (name(&h2), name(&h3));
    // The NATed hosts cannot dial each other: h2 cannot even reach h3's address.
    assert!(!ping(&h2.ns, &h3.ip, 1), "h2 reaches h3 behind its NAT: the lab is wrong");
    let t = std::time::Instant::now();
    let direct = wait_until(Duration::from_secs(30), || {
        [(&h2, &n3), (&h3, &n2)].iter().all(|(h, p)| conn_to(h, p).is_some_and(|c| c["route"] == "direct"))
    });
    assert!(direct, "no direct path between the NATed hosts within 30 s: {:#?} {:#?}", connections(&h2), connections(&h3));
    eprintln!("NATed pair direct after {:.1}s", t.elapsed().as_secs_f64());
    let c = conn_to(&h2, &n3).expect("direct");
    assert!(c["info"].as_str().unwrap_or_default().contains("spliced through"), "{c:#}");
    // h2 sends to h3's NAT box, at the port the public host saw.
    let udp = c["udp_addr"].as_str().unwrap_or_default().to_string();
    assert!(udp.starts_with(&format!("{}:", lab.host_ip(3))), "h2 sends to h3 at {udp}");
    assert!(ping_until(&cs[1].ns, "10.42.0.3", Duration::from_secs(10)), "c2 cannot reach c3");
    let before = relayed_units(&public);
    checked_transfer(&lab, &cs[1].ns, &cs[2].ns, "10.42.0.3", 30 << 20, Duration::from_secs(60));
    checked_transfer(&lab, &cs[2].ns, &cs[1].ns, "10.42.0.2", 10 << 20, Duration::from_secs(60));
    let after = relayed_units(&public);
    assert_eq!(after, before, "the public host relayed during a transfer between the NATed hosts");
    // Both still reach the public host's container.
    assert!(ping(&cs[1].ns, "10.42.0.1", 2) && ping(&cs[2].ns, "10.42.0.1", 2));
}

#[test]
fn peers_behind_per_destination_nats_stay_relayed_and_say_why() {
    let Some(lab) = Lab::new("natsym") else { return };
    let (public, h2, h3, cs) = nat_lab(&lab, &["-j", "MASQUERADE", "--random"]);
    let n3 = name(&h3);
    let said = wait_until(Duration::from_secs(40), || {
        any_conn_to(&h2, &n3).is_some_and(|c| c["info"].as_str().unwrap_or_default().contains("hole punching failed"))
    });
    assert!(said, "h2 does not say why it has no direct path to h3: {:#?}", connections(&h2));
    let c = any_conn_to(&h2, &n3).expect("spliced");
    assert_eq!(c["route"], "relayed", "{c:#}");
    assert_ne!(c["state"], "established", "{c:#}");
    let before = relayed_units(&public);
    assert!(ping_until(&cs[1].ns, "10.42.0.3", Duration::from_secs(10)), "c2 cannot reach c3 through the public host");
    checked_transfer(&lab, &cs[1].ns, &cs[2].ns, "10.42.0.3", 5 << 20, Duration::from_secs(60));
    assert!(relayed_units(&public) > before + 100, "the public host relayed nothing: {:#}", public.status_json());
    let out = h2.meshnet(&["status", "connections"]).expect_ok("status connections");
    assert!(out.stdout.contains("hole punching failed"), "{out}");
}
