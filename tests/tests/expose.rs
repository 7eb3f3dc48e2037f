//! The host on the overlay (`meshnet expose` / `hide`), meshnet's nftables
//! table, and what Kubernetes pods need from it, in the namespace lab (needs
//! root; the lab skips otherwise):
//!
//! - `expose_hide_isolate_reset`: before `expose` a host cannot reach a
//!   container on another host, after it can (both ways), after `hide` it
//!   cannot; exposing twice gives the same address; two `net:` subnets do not
//!   reach each other through the host (the drop rule counts them); bad input
//!   is refused and changes nothing; the exposure survives `launch --resume`;
//!   `attach` routes multicast through `ethwe` (not with
//!   `--no-multicast-route`); `reset` leaves no table, address or route.
//! - `pods_through_the_cni_chain`: pods added through the shipped conflist
//!   (`meshnet-cni`, then Debian's `portmap`, with `prevResult`, as runtimes
//!   do; DEL in reverse) on two hosts reach an "outside" namespace that only
//!   host 1 is wired to (it sees host 1's and host 2's underlay addresses),
//!   a kube-proxy-style Service (DNAT on every host to a backend pod on host 2),
//!   the backend its own Service (hairpin), a `hostPort` on host 1's underlay
//!   address; a pod keeps its address and its reach across a router restart.
//! - `podman_on_two_routers`: podman (CNI backend, meshnet's conflist) runs
//!   containers on two routers that ping each other, reach the outside and
//!   publish a port with `-p`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnet_tests::lab::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const RANGE: &str = "10.2.0.0/16";
const DEFAULT_SUBNET: &str = "10.2.1.0/24";
const OPTS: [&str; 4] = ["--ipalloc-range", RANGE, "--ipalloc-default-subnet", DEFAULT_SUBNET];

/// A TCP server that answers every connection with `NAME PEER-IP` and closes.
const WHO_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    c, a = s.accept()
    c.sendall(("%s %s\n" % (sys.argv[2], a[0])).encode())
    c.close()
"#;

/// Connects to `argv[1]:argv[2]` and prints what the server says.
const WHO_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
c.settimeout(2)
print(c.recv(200).decode().strip())
"#;

/// Starts a [`WHO_SERVER`] in `ns` and waits until it listens.
#[track_caller]
fn who_server(lab: &Lab, ns: &str, port: u16, name: &str) -> Bg {
    let bg = lab.spawn_in(ns, &["python3", "-c", WHO_SERVER, &port.to_string(), name]);
    assert!(wait_until(SECS(10), || bg.stdout().contains("listening")), "server in {ns}: {}", bg.stderr());
    bg
}

/// What a [`WHO_SERVER`] at `ip:port` answers a client in `ns`, if it does.
fn ask(ns: &str, ip: &str, port: u16) -> Option<String> {
    let out = exec_in_timeout(ns, &["python3", "-c", WHO_CLIENT, ip, &port.to_string()], SECS(5));
    out.ok().then(|| out.stdout.trim().to_string()).filter(|s| !s.is_empty())
}

/// Retries [`ask`] for a while (routes, ARP and the overlay settling).
fn ask_until(ns: &str, ip: &str, port: u16) -> Option<String> {
    let mut answer = None;
    wait_until(SECS(20), || {
        answer = ask(ns, ip, port);
        answer.is_some()
    });
    answer
}

fn established(h: &Host) -> usize {
    connections(&h.status_json()).iter().filter(|c| c["state"] == "established").count()
}

/// Two hosts with the test range, connected, the IPAM ring agreed.
fn two_routers(h1: &Host, h2: &Host) {
    h1.launch(&OPTS);
    h2.launch(&[&OPTS[..], &[h1.ip.as_str()]].concat());
    assert!(wait_until(SECS(30), || established(h1) >= 1 && established(h2) >= 1), "h1 and h2 did not connect");
    h1.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h1");
    h2.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h2");
}

fn ip_of(cidr: &str) -> String {
    cidr.split('/').next().unwrap_or_default().to_string()
}

fn exposed(h: &Host) -> Vec<String> {
    serde_json::from_value(h.status_json()["exposed"].clone()).unwrap_or_default()
}

/// `nft list table ip meshnet` in the host, or None when there is no such table.
fn meshnet_table(h: &Host) -> Option<String> {
    let out = exec_in(&h.ns, &["nft", "list", "table", "ip", "meshnet"]);
    out.ok().then(|| out.stdout)
}

/// The IPv4 addresses (`ip/prefix`) on `dev` in `ns`.
fn addrs_of(ns: &str, dev: &str) -> Vec<String> {
    link(ns, dev).map(|l| ipv4_of(&l)).unwrap_or_default()
}

fn routes(ns: &str) -> String {
    exec_in(ns, &["ip", "-4", "route", "show", "table", "all"]).stdout
}

/// The packets the table's drop rule for `subnet` counted.
fn drops(h: &Host, subnet: &str) -> u64 {
    let table = meshnet_table(h).unwrap_or_default();
    table
        .lines()
        .find(|l| l.contains(&format!("ip saddr {subnet}")) && l.contains("drop"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn expose_hide_isolate_reset() {
    let Some(lab) = Lab::new("expose") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    let c3 = lab.add_container(&h2, 3);
    let c4 = lab.add_container(&h1, 4);
    let c5 = lab.add_container(&h1, 5);
    two_routers(&h1, &h2);

    let a2 = h2.meshnet(&["attach", &c2.ns]).expect_ok("attach c2").last_line().unwrap_or_default().to_string();
    assert!(a2.starts_with("10.2.1."), "c2 got {a2}");
    let ip2 = ip_of(&a2);
    assert!(!ping(&h1.ns, &ip2, 2), "h1 reached {ip2} on h2 before expose");
    assert!(exposed(&h1).is_empty());
    assert!(meshnet_table(&h1).is_none(), "a table before anything is exposed");

    // expose: an address from the default subnet, on the bridge, printed alone.
    let out = h1.meshnet(&["expose"]).expect_ok("expose");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expose prints one address a line: {out}");
    let e1 = lines[0].to_string();
    assert!(e1.starts_with("10.2.1.") && e1.ends_with("/24"), "expose gave {e1}");
    assert_eq!(exposed(&h1), vec![e1.clone()]);
    assert!(addrs_of(&h1.ns, "meshnet").contains(&e1), "{e1} not on h1's bridge: {:?}", addrs_of(&h1.ns, "meshnet"));
    let table = meshnet_table(&h1).expect("the table once something is exposed");
    assert!(table.contains("masquerade") && table.contains("ip saddr 10.2.1.0/24"), "{table}");
    assert!(ping_until(&h1.ns, &ip2, SECS(10)), "h1 does not reach c2 ({ip2}) after expose");
    assert!(ping(&c2.ns, &ip_of(&e1), 2), "c2 does not reach h1's exposed {e1}");

    // Idempotent: the same address, nothing new allocated.
    for again in [&["expose"][..], &["expose", "net:default"], &["expose", &e1]] {
        let out = h1.meshnet(again).expect_ok("expose again");
        assert_eq!(out.stdout.trim(), e1, "{again:?} gave another address: {out}");
    }
    let ipam = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    let held: Vec<&Value> =
        ipam["allocations"].as_array().unwrap().iter().filter(|a| a["target"] == "meshnet:expose").collect();
    assert_eq!(held.len(), 1, "exposing again allocated more: {ipam:#}");

    // Bad input: a clear error, nothing changed.
    let a1 = h1.meshnet(&["attach", &c1.ns]).expect_ok("attach c1").last_line().unwrap_or_default().to_string();
    let before = (exposed(&h1), meshnet_table(&h1), addrs_of(&h1.ns, "meshnet"));
    for (args, says) in [
        (vec!["expose", a1.as_str()], "attached to"),
        (vec!["expose", "10.9.0.1/24"], "outside the IP allocation range"),
        (vec!["expose", "ip:10.9.0.1/24"], "outside the IP allocation range"),
        (vec!["expose", "net:10.9.0.0/24"], "outside the IP allocation range"),
        (vec!["hide", "10.2.1.250/24"], "is not exposed"),
        (vec!["hide", "net:10.2.7.0/24"], "is not exposed"),
        (vec!["expose", "net:nonsense"], "invalid subnet"),
    ] {
        let out = h1.meshnet(&args);
        assert!(!out.ok() && out.stderr.contains(says), "{args:?} should fail saying {says:?}: {out}");
        assert_eq!((exposed(&h1), meshnet_table(&h1), addrs_of(&h1.ns, "meshnet")), before, "{args:?} changed something");
    }

    // Multicast goes through ethwe, unless asked otherwise.
    assert!(routes(&c1.ns).contains("224.0.0.0/4 dev ethwe"), "c1: {}", routes(&c1.ns));
    h1.meshnet(&["attach", "--no-multicast-route", "10.2.1.77/24", &c5.ns]).expect_ok("attach c5");
    assert!(!routes(&c5.ns).contains("224.0.0.0/4"), "c5: {}", routes(&c5.ns));

    // Subnets: the host reaches one only while exposed there, and two exposed
    // subnets do not reach each other through it.
    let a3 = h2.meshnet(&["attach", "net:10.2.2.0/24", &c3.ns]).expect_ok("attach c3").last_line().unwrap_or_default().to_string();
    let a4 = h1.meshnet(&["attach", "net:10.2.3.0/24", &c4.ns]).expect_ok("attach c4").last_line().unwrap_or_default().to_string();
    let (ip3, ip4) = (ip_of(&a3), ip_of(&a4));
    assert!(!ping(&h1.ns, &ip3, 2), "h1 reached {ip3} in 10.2.2.0/24 without exposing it");
    let e2 = h1.meshnet(&["expose", "net:10.2.2.0/24"]).expect_ok("expose net:10.2.2.0/24").stdout.trim().to_string();
    assert!(e2.starts_with("10.2.2.") && e2.ends_with("/24"), "{e2}");
    assert!(ping_until(&h1.ns, &ip3, SECS(10)), "h1 does not reach {ip3} once exposed in its subnet");
    let e3 = h1.meshnet(&["expose", "net:10.2.3.0/24"]).expect_ok("expose net:10.2.3.0/24").stdout.trim().to_string();
    // As pods have: a default route through the host's address in their subnet.
    exec_in(&c3.ns, &["ip", "route", "add", "default", "via", &ip_of(&e2)]).expect_ok("c3 default route");
    exec_in(&c4.ns, &["ip", "route", "add", "default", "via", &ip_of(&e3)]).expect_ok("c4 default route");
    assert!(ping_until(&c4.ns, &ip_of(&e3), SECS(10)), "c4 does not reach its gateway");
    assert!(ping_until(&c3.ns, &ip_of(&e2), SECS(10)), "c3 does not reach its gateway");
    let dropped = drops(&h1, "10.2.3.0/24");
    assert!(!ping(&c4.ns, &ip3, 3), "c4 (10.2.3.0/24) reached c3 (10.2.2.0/24) through h1");
    assert!(drops(&h1, "10.2.3.0/24") >= dropped + 3, "the isolation rule did not count c4's pings:\n{}", meshnet_table(&h1).unwrap_or_default());
    assert!(!ping(&c3.ns, &ip4, 2), "c3 reached c4 through h1");
    h1.meshnet(&["hide", "net:10.2.3.0/24"]).expect_ok("hide net:10.2.3.0/24");
    h1.meshnet(&["hide", &e2]).expect_ok("hide e2");
    assert!(!ping(&h1.ns, &ip3, 2), "h1 still reaches {ip3} after hide");
    assert_eq!(exposed(&h1), vec![e1.clone()]);
    let ipam = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    let held = ipam["allocations"].as_array().unwrap().iter().filter(|a| a["target"] == "meshnet:expose").count();
    assert_eq!(held, 1, "hide did not release to IPAM: {ipam:#}");

    // A restart re-applies the exposure.
    h1.meshnet(&["stop"]).expect_ok("stop h1");
    exec_in(&h1.ns, &["nft", "delete", "table", "ip", "meshnet"]).expect_ok("drop the table while stopped");
    h1.launch(&["--resume"]);
    assert_eq!(exposed(&h1), vec![e1.clone()]);
    assert!(meshnet_table(&h1).is_some(), "the table is not back after launch --resume");
    assert!(ping_until(&h1.ns, &ip2, SECS(20)), "h1 does not reach c2 after launch --resume");
    assert!(h1.meshnet(&["status"]).expect_ok("status").stdout.contains(&format!("Exposed: {e1}")));

    // hide (all): unreachable again, table gone.
    h1.meshnet(&["hide"]).expect_ok("hide");
    assert!(exposed(&h1).is_empty());
    assert!(meshnet_table(&h1).is_none(), "hide left the table");
    assert!(!addrs_of(&h1.ns, "meshnet").contains(&e1));
    assert!(!ping(&h1.ns, &ip2, 2), "h1 still reaches c2 after hide");

    // reset leaves nothing behind.
    h1.meshnet(&["expose"]).expect_ok("expose before reset");
    h1.meshnet(&["reset"]).expect_ok("reset");
    let ruleset = exec_in(&h1.ns, &["nft", "list", "ruleset"]).expect_ok("nft list ruleset").stdout;
    assert!(!ruleset.contains("meshnet"), "reset left nftables rules:\n{ruleset}");
    assert!(!routes(&h1.ns).contains("10.2."), "reset left a route: {}", routes(&h1.ns));
    let addrs = exec_in(&h1.ns, &["ip", "-4", "addr"]).stdout;
    assert!(!addrs.contains("10.2."), "reset left an address: {addrs}");
}
