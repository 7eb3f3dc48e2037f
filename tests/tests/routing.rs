//! Routing across a partial mesh: frames for peers without a direct connection
//! are relayed, and broadcasts reach every container exactly once (per-source
//! spanning trees), in a full mesh and along a chain; a peer behind a port-rewriting
//! NAT is reached where its heartbeats come from; two hosts that cannot reach
//! each other at all are spliced and relayed, and status does not blame a NAT.

use std::time::Duration;

use meshnet_tests::lab::*;

/// Counts UDP datagrams to port 9999 carrying the marker for `argv[1]` seconds.
const COUNTER: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9999)); s.settimeout(0.2)
print("listening", flush=True)
end = time.time() + float(sys.argv[1]); n = 0
while time.time() < end:
    try:
        b, _ = s.recvfrom(2048)
        if b.startswith(b"meshnet-bcast"): n += 1
    except socket.timeout:
        pass
print("count", n, flush=True)
"#;

/// Sends `argv[2]` broadcasts to `argv[1]`:9999.
const BROADCASTER: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for i in range(int(sys.argv[2])):
    s.sendto(b"meshnet-bcast %d" % i, (sys.argv[1], 9999)); time.sleep(0.05)
"#;

/// `n` hosts; `links` are the (i, j) pairs told to connect. With `discovery`
/// off, only those connections exist. Container j sits on host j as 10.42.0.j/16.
fn mesh(lab: &Lab, n: u8, links: &[(u8, u8)], discovery: bool) -> (Vec<Host>, Vec<Container>) {
    let hosts: Vec<Host> = (1..=n).map(|i| lab.add_host(i)).collect();
    for h in &hosts {
        let mut args: Vec<String> = Vec::new();
        if !discovery {
            args.push("--no-discovery".into());
        }
        for &(a, b) in links {
            if b == h.i {
                args.push(hosts[a as usize - 1].ip.clone());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.launch(&args);
    }
    let cs: Vec<Container> = hosts.iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in hosts.iter().zip(&cs) {
        h.meshnet(&["attach", &format!("10.42.0.{}/16", c.j), &c.ns]).expect_ok("attach");
    }
    (hosts, cs)
}

fn counter(h: &Host, key: &str) -> u64 {
    h.status_json()["dataplane"][key].as_u64().unwrap_or(0)
}

#[test]
fn chain_relays_through_the_middle_host() {
    let Some(lab) = Lab::new("relay") else { return };
    let (hosts, cs) = mesh(&lab, 3, &[(1, 2), (2, 3)], false);
    assert!(ping_until(&cs[0].ns, "10.42.0.3", Duration::from_secs(30)), "c1 cannot reach c3 through h2");
    assert!(ping(&cs[2].ns, "10.42.0.1", 3), "c3 cannot reach c1 through h2");
    // A frame larger than one datagram crosses the relay too.
    let big = exec_in(&cs[0].ns, &["ping", "-c", "3", "-W", "2", "-s", "8000", "10.42.0.3"]);
    assert!(big.ok(), "ping -s 8000 through the relay: {big}");
    // h1 and h3 have no connection to each other: the frames went through h2.
    let h1 = hosts[0].status_json();
    let h3_name = hosts[2].status_json()["name"].as_str().unwrap_or_default().to_string();
    assert!(
        !h1["connections"].as_array().into_iter().flatten().any(|c| c["peer"] == h3_name.as_str()),
        "h1 is connected to h3 directly: {h1:#}"
    );
    assert!(counter(&hosts[1], "relayed_units") >= 6, "h2 relayed nothing: {:#}", hosts[1].status_json());
    assert_eq!(counter(&hosts[0], "relayed_units"), 0);
}

/// Sends 5 broadcasts from c1; every other container must count exactly 5.
fn broadcast_exactly_once(lab: &Lab, cs: &[Container]) {
    for c in &cs[1..] {
        assert!(ping_until(&cs[0].ns, &format!("10.42.0.{}", c.j), Duration::from_secs(30)), "c1 cannot reach {}", c.ns);
    }
    let mut listeners: Vec<Bg> = cs[1..].iter().map(|c| lab.spawn_in(&c.ns, &["python3", "-c", COUNTER, "4"])).collect();
    for l in &listeners {
        assert!(wait_until(Duration::from_secs(10), || l.stdout().contains("listening")), "listener: {}", l.stderr());
    }
    exec_in(&cs[0].ns, &["python3", "-c", BROADCASTER, "10.42.255.255", "5"]).expect_ok("broadcast");
    for (c, l) in cs[1..].iter().zip(listeners.iter_mut()) {
        assert!(l.wait(Duration::from_secs(15)), "listener in {} did not finish", c.ns);
        let out = l.stdout();
        assert!(out.contains("count 5\n"), "{} did not get each broadcast exactly once: {out:?}", c.ns);
    }
}

#[test]
fn broadcast_reaches_each_container_once_in_a_full_mesh() {
    let Some(lab) = Lab::new("bfull") else { return };
    let (_hosts, cs) = mesh(&lab, 4, &[(1, 2), (1, 3), (1, 4)], true);
    broadcast_exactly_once(&lab, &cs);
}

#[test]
fn broadcast_reaches_each_container_once_along_a_chain() {
    let Some(lab) = Lab::new("bchain") else { return };
    let (hosts, cs) = mesh(&lab, 4, &[(1, 2), (2, 3), (3, 4)], false);
    broadcast_exactly_once(&lab, &cs);
    assert!(counter(&hosts[1], "relayed_units") > 0 && counter(&hosts[2], "relayed_units") > 0);
}

/// h1 sits behind a port-rewriting NAT: its datagrams leave from UDP port 7000
/// instead of 6783, and unsolicited datagrams to 6783 are dropped. h2 must learn
/// the rewritten address from h1's heartbeats, send there, and the pair must
/// carry data directly.
#[test]
fn a_peer_behind_nat_is_reached_where_its_heartbeats_come_from() {
    let Some(lab) = Lab::new("nat") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let nat = [
        vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "--sport", "6783", "-j", "SNAT"],
        vec!["iptables", "-A", "INPUT", "-p", "udp", "--dport", "6783", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"],
    ];
    let to = format!("{}:7000", h1.ip);
    let mut snat = nat[0].clone();
    snat.extend(["--to-source", to.as_str()]);
    exec_in(&h1.ns, &snat).expect_ok("SNAT rule");
    exec_in(&h1.ns, &nat[1]).expect_ok("inbound drop rule");
    let n1 = h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", "10.42.0.1/16", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.42.0.2/16", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c2.ns, "10.42.0.1", Duration::from_secs(30)), "c2 cannot reach c1 behind the NAT");
    assert!(ping(&c1.ns, "10.42.0.2", 3));
    let s2 = h2.status_json();
    let to_h1 = connections(&s2).into_iter().find(|c| c["peer"] == n1.as_str()).expect("h2 has a connection to h1");
    assert_eq!(to_h1["state"], "established", "{to_h1:#}");
    assert_eq!(to_h1["route"], "direct", "{to_h1:#}");
    assert_eq!(to_h1["udp_addr"], to.as_str(), "h2 did not learn h1's translated address: {to_h1:#}");
    assert!(h2.log().contains(&format!("now sends from {to}")), "h2 did not log the address it learned");
}

/// Discovery on, h1 and h3 cannot reach each other at all (no NAT: every
/// packet between them is dropped), both reach h2: they get a connection
/// spliced through h2 and their data is relayed. `status connections` says
/// so without blaming a NAT that is not there.
#[test]
fn hosts_that_cannot_reach_each_other_are_spliced_and_relayed_and_status_says_why() {
    let Some(lab) = Lab::new("splice") else { return };
    let hosts: Vec<Host> = (1..=3).map(|i| lab.add_host(i)).collect();
    for (from, other) in [(0, 2), (2, 0)] {
        for chain in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
            exec_in(&hosts[from].ns, &["iptables", "-A", chain[0], chain[1], &hosts[other].ip, "-j", "DROP"]).expect_ok("drop rule");
        }
    }
    let n1 = hosts[0].launch(&[]);
    hosts[1].launch(&[&hosts[0].ip]);
    let n3 = hosts[2].launch(&[&hosts[1].ip]);
    let c1 = lab.add_container(&hosts[0], 1);
    let c3 = lab.add_container(&hosts[2], 3);
    hosts[0].meshnet(&["attach", "10.42.0.1/16", &c1.ns]).expect_ok("attach c1");
    hosts[2].meshnet(&["attach", "10.42.0.3/16", &c3.ns]).expect_ok("attach c3");
    assert!(ping_until(&c1.ns, "10.42.0.3", Duration::from_secs(30)), "c1 cannot reach c3 through h2");
    let info = |h: &Host, peer: &str| {
        connections(&h.status_json()).into_iter().find(|c| c["peer"] == peer).map(|c| c["info"].as_str().unwrap_or_default().to_string())
    };
    let said = wait_until(Duration::from_secs(40), || info(&hosts[0], &n3).is_some_and(|i| i.contains("hole punching failed")));
    let text = info(&hosts[0], &n3).unwrap_or_default();
    assert!(said, "h1 does not say why h3 is not direct: {text:?}");
    assert!(text.contains("spliced through") && text.contains("relayed via"), "{text}");
    assert!(text.contains("no route") && text.contains("firewall"), "only a NAT is named as the cause: {text}");
    assert!(!text.contains("either way (NAT)"), "{text}");
    assert!(info(&hosts[2], &n1).is_some(), "h3 has no connection to h1");
}

/// UDP between two established hosts stops (TCP still works): within seconds
/// the connection is `pending` and carries no data; after 30 s without UDP it
/// is closed and dialled again; once UDP works again it is established and
/// carries data.
#[test]
fn missed_udp_heartbeats_stop_data_then_close_the_connection() {
    let Some(lab) = Lab::new("udploss") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let n1 = h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", "10.42.0.1/16", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.42.0.2/16", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c2.ns, "10.42.0.1", Duration::from_secs(30)));
    let state = || {
        connections(&h2.status_json())
            .into_iter()
            .find(|c| c["peer"] == n1.as_str())
            .map(|c| c["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(state(), "established");
    let block = ["iptables", "-I", "INPUT", "-p", "udp", "--dport", "6783", "-j", "DROP"];
    exec_in(&h2.ns, &block).expect_ok("block UDP into h2");
    assert!(wait_until(Duration::from_secs(10), || state() == "pending"), "still {} after 10 s without UDP", state());
    assert!(!ping(&c2.ns, "10.42.0.1", 2), "data crossed a connection whose UDP is blocked");
    assert!(
        wait_until(Duration::from_secs(45), || h2.log().contains("UDP heartbeats missed for 30s")),
        "the connection was not closed after 30 s without UDP:\n{}",
        h2.log()
    );
    exec_in(&h2.ns, &["iptables", "-D", "INPUT", "-p", "udp", "--dport", "6783", "-j", "DROP"]).expect_ok("unblock");
    assert!(wait_until(Duration::from_secs(30), || state() == "established"), "not established again: {}", state());
    assert!(ping_until(&c2.ns, "10.42.0.1", Duration::from_secs(10)));
}
