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
//! - `expose_ipv6_dual_stack`: routers with an IPv4 and an IPv6 range;
//!   `expose` with no address gives host 1 one address of each family (the
//!   bridge, IPv6 off before, gets IPv6 on with that address and no other,
//!   no link-local one); host 1
//!   pings a container on host 2 with `ping -6`; the container reaches an
//!   IPv6 "outside" namespace beyond host 1, which sees host 1's address
//!   (masqueraded by the `ip6 meshnet` table); bad IPv6 input is refused and
//!   changes nothing; `kill -9` and a relaunch keep both addresses; `hide`
//!   removes both, and both tables.
//! - `default_range_relaunch_with_an_exposed_address`: with the default range,
//!   the exposed address's route on meshnet's bridge does not make `launch`
//!   (after `stop`) or `launch --resume` (after `kill -9`) refuse the range; a
//!   route of another interface in it still does.
//! - `a_deleted_table_and_hairpin_on_the_router_port_are_put_back`: the
//!   table deleted under a running router, and hairpin mode switched on on its
//!   TAP, are put back within 15 s (Weave's iptables canary and hairpin check).
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

/// A TCP server on port `argv[1]` that answers every connection with
/// `NAME PEER-IP` (`argv[2]`) and closes; bound to `argv[3]` if given (`::`
/// for IPv6), else to every IPv4 address.
const WHO_SERVER: &str = r#"
import socket, sys
addr = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, int(sys.argv[1])))
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
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.settimeout(5)
print(c.recv(200).decode().strip())
"#;

/// Starts a [`WHO_SERVER`] in `ns` and waits until it listens.
#[track_caller]
fn who_server(lab: &Lab, ns: &str, port: u16, name: &str) -> Bg {
    let bg = lab.spawn_in(ns, &["python3", "-c", WHO_SERVER, &port.to_string(), name]);
    assert!(wait_until(SECS(30), || bg.stdout().contains("listening")), "server in {ns} did not start: {} {}", bg.stdout(), bg.stderr());
    bg
}

/// What a [`WHO_SERVER`] at `ip:port` answers a client in `ns`, if it does.
fn ask(ns: &str, ip: &str, port: u16) -> Option<String> {
    // Generous: python's start alone takes seconds on a loaded machine.
    let out = exec_in_timeout(ns, &["python3", "-c", WHO_CLIENT, ip, &port.to_string()], SECS(30));
    out.ok().then(|| out.stdout.trim().to_string()).filter(|s| !s.is_empty())
}

/// Retries [`ask`] for a while (routes, ARP and the overlay settling).
fn ask_until(ns: &str, ip: &str, port: u16) -> Option<String> {
    let mut answer = None;
    wait_until(SECS(60), || {
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
    out.ok().then_some(out.stdout)
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

    // --without-masquerade turns the subnet's masquerade off; exposing plainly again, on.
    let masq = |h: &Host| meshnet_table(h).unwrap_or_default().contains("ip saddr 10.2.1.0/24 ip daddr != 10.2.0.0/16");
    assert!(masq(&h1));
    let out = h1.meshnet(&["expose", "--without-masquerade"]).expect_ok("expose --without-masquerade");
    assert_eq!(out.stdout.trim(), e1);
    assert!(!masq(&h1), "still masqueraded:\n{}", meshnet_table(&h1).unwrap_or_default());
    h1.meshnet(&["expose"]).expect_ok("expose");
    assert!(masq(&h1), "not masqueraded again:\n{}", meshnet_table(&h1).unwrap_or_default());

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

/// With the default `--ipalloc-range` (no option), an exposed address's route
/// on meshnet's own bridge does not make the next launch refuse the range as
/// "overlapping a route of this host": `stop` and `kill -9` leave the address
/// on the bridge, and a plain `launch` and `launch --resume` put the router back
/// with it. A route of another interface in the range is still refused.
#[test]
fn default_range_relaunch_with_an_exposed_address() {
    let Some(lab) = Lab::new("exposedflt") else { return };
    let h = lab.add_host(1);
    h.launch(&[]);
    let e = h.meshnet(&["expose"]).expect_ok("expose").stdout.trim().to_string();
    assert!(e.starts_with("10."), "{e}");

    h.meshnet(&["stop"]).expect_ok("stop");
    assert!(addrs_of(&h.ns, "meshnet").contains(&e), "stop took {e} off the bridge");
    h.launch(&[]);
    assert_eq!(exposed(&h), vec![e.clone()], "exposed after stop + launch");

    kill9(&h);
    h.launch(&["--resume"]);
    assert_eq!(exposed(&h), vec![e.clone()], "exposed after kill -9 + launch --resume");
    assert!(addrs_of(&h.ns, "meshnet").contains(&e));

    // A route of another interface inside the default range is still refused.
    h.meshnet(&["stop"]).expect_ok("stop again");
    // (A veth pair: not every kernel has the dummy driver.)
    ip(&["-n", &h.ns, "link", "add", "clash0", "type", "veth", "peer", "name", "clash1"]).expect_ok("add a veth pair");
    ip(&["-n", &h.ns, "addr", "add", "10.47.0.1/24", "dev", "clash0"]).expect_ok("address it");
    ip(&["-n", &h.ns, "link", "set", "clash1", "up"]).expect_ok("clash1 up");
    ip(&["-n", &h.ns, "link", "set", "clash0", "up"]).expect_ok("clash0 up");
    let out = h.meshnet(&["launch"]);
    assert!(!out.ok() && out.all().contains("overlaps route 10.47.0.0/24 on clash0"), "{out}");
    assert!(h.pids().is_empty(), "a refused launch left a router");
}

/// Takes the immutable attribute off a file when the test ends.
struct Mutable(PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// `expose` and `hide` whose record (`exposed.json`, made immutable) cannot be
/// written fail, naming the file and the OS error, and change nothing: the
/// address is neither put on the bridge nor taken off, and a restart exposes
/// what the router said is exposed, no more, no less.
#[test]
fn expose_and_hide_whose_record_cannot_be_written_fail() {
    let Some(lab) = Lab::new("exposero") else { return };
    let h = lab.add_host(1);
    h.launch(&OPTS);
    let first = h.meshnet(&["expose", "net:10.2.3.0/24"]).expect_ok("expose").stdout.trim().to_string();
    let record = h.state_dir.join("exposed.json");
    let st = std::process::Command::new("chattr").arg("+i").arg(&record).status().expect("chattr");
    assert!(st.success(), "chattr +i {}", record.display());
    let mutable = Mutable(record.clone());

    let out = h.meshnet(&["expose", "net:10.2.4.0/24"]);
    assert!(!out.ok(), "expose succeeded with an immutable record: {out}");
    assert!(out.all().contains("exposed.json") && out.all().contains("Operation not permitted"), "{out}");
    assert_eq!(exposed(&h), vec![first.clone()], "the failed expose is listed");
    assert!(!addrs_of(&h.ns, "meshnet").iter().any(|a| a.starts_with("10.2.4.")), "the failed expose left an address on the bridge");
    let out = h.meshnet(&["hide", &first]);
    assert!(!out.ok(), "hide succeeded with an immutable record: {out}");
    assert!(out.all().contains("exposed.json") && out.all().contains("Operation not permitted"), "{out}");
    assert!(addrs_of(&h.ns, "meshnet").contains(&first), "the failed hide took {first} off the bridge");

    drop(mutable);
    kill9(&h);
    h.launch(&["--resume"]);
    assert_eq!(exposed(&h), vec![first.clone()], "exposed after a restart");
    assert!(addrs_of(&h.ns, "meshnet").contains(&first));
}

/// The bridge's MAC (that of the host's exposed addresses, and of the DNS
/// server on them) stays the same across `kill -9` + `launch --resume` and
/// `stop` + `launch`: the TAP, made anew with a random MAC at every launch,
/// must not give the bridge its MAC, or containers that cached the old one
/// lose the host (and DNS) until their neighbour entries expire.
#[test]
fn the_bridge_keeps_its_mac_across_restarts() {
    let Some(lab) = Lab::new("exposemac") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    two_routers(&h1, &h2);
    let e = h1.meshnet(&["expose"]).expect_ok("expose").stdout.trim().to_string();
    let c2 = lab.add_container(&h2, 2);
    h2.meshnet(&["attach", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c2.ns, &ip_of(&e), SECS(20)), "c2 cannot reach h1's exposed {e}");
    let mac = |h: &Host| link(&h.ns, "meshnet").expect("bridge exists")["address"].as_str().unwrap_or_default().to_string();
    let before = mac(&h1);
    assert!(is_mac(&before), "{before}");

    kill9(&h1);
    h1.launch(&["--resume"]);
    assert_eq!(mac(&h1), before, "the bridge's MAC changed across kill -9 + launch --resume");
    assert!(ping_until(&c2.ns, &ip_of(&e), SECS(20)), "c2 lost h1's exposed {e} after kill -9 + launch --resume");

    h1.meshnet(&["stop"]).expect_ok("stop");
    assert_eq!(mac(&h1), before, "stop changed the bridge's MAC");
    h1.launch(&OPTS);
    assert_eq!(mac(&h1), before, "the bridge's MAC changed across stop + launch");
    assert!(ping_until(&c2.ns, &ip_of(&e), SECS(20)), "c2 lost h1's exposed {e} after stop + launch");
    assert_eq!(exposed(&h1), vec![e]);
}

/// `nft list` output without its counters' values, for comparing rules.
fn without_counts(table: &str) -> String {
    let mut out = Vec::new();
    let mut words = table.split_whitespace();
    while let Some(w) = words.next() {
        out.push(w);
        if w == "packets" || w == "bytes" {
            words.next();
        }
    }
    out.join(" ")
}

/// Weave's 135_expose_iptables_refresh and 705_detect_hairpin: what others
/// undo under a running router is put back within seconds, and the log says
/// so: meshnet's nftables table while something is exposed (a flushed
/// ruleset, a firewall reloading its rules), and hairpin mode switched on on
/// the router's own bridge port (by a kubelet's `--hairpin-mode`, say), which
/// would send broadcasts from other hosts back to their senders.
#[test]
fn a_deleted_table_and_hairpin_on_the_router_port_are_put_back() {
    let Some(lab) = Lab::new("exposeguard") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    two_routers(&h1, &h2);
    h1.meshnet(&["expose"]).expect_ok("expose");
    let before = meshnet_table(&h1).expect("expose made the table");
    let hairpin = || exec_in(&h1.ns, &["cat", "/sys/class/net/meshnet-tap/brport/hairpin_mode"]).stdout.trim().to_string();
    assert_eq!(hairpin(), "0", "the TAP's hairpin mode at launch");

    exec_in(&h1.ns, &["nft", "delete", "table", "ip", "meshnet"]).expect_ok("delete the table");
    ip(&["-n", &h1.ns, "link", "set", "meshnet-tap", "type", "bridge_slave", "hairpin", "on"]).expect_ok("hairpin on");
    assert!(meshnet_table(&h1).is_none() && hairpin() == "1");
    assert!(
        wait_until(SECS(15), || meshnet_table(&h1).is_some() && hairpin() == "0"),
        "not put back within 15 s: table {:?}, hairpin {}",
        meshnet_table(&h1),
        hairpin()
    );
    assert_eq!(without_counts(&meshnet_table(&h1).unwrap_or_default()), without_counts(&before), "the table written again");
    let log = h1.log();
    assert!(log.contains("nftables table for meshnet was gone") && log.contains("hairpin mode was on on meshnet-tap"), "{log}");

    // Nothing exposed: no table is made.
    h1.meshnet(&["hide"]).expect_ok("hide");
    std::thread::sleep(SECS(11));
    assert!(meshnet_table(&h1).is_none(), "a table with nothing exposed");
}

// ---------------------------------------------------------------------------
// CNI chains, driven as runtimes drive them

/// The conflist shipped in `deploy/kubernetes/configmap.yaml` (`cni-conflist`).
fn shipped_conflist() -> Value {
    let path = workspace_root().join("deploy/kubernetes/configmap.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "cni-conflist: |").skip(1);
    let mut text = String::new();
    for l in lines.by_ref() {
        if !l.starts_with("    ") && !l.trim().is_empty() {
            break;
        }
        text.push_str(l);
        text.push('\n');
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cni-conflist in {} is not JSON ({e}):\n{text}", path.display()))
}

/// Where Debian's containernetworking-plugins put the standard plugins.
const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// A plugin directory for the lab: `meshnet-cni` (the one under test) and the
/// standard plugins the conflist names, from Debian's package.
fn plugin_dir(lab: &Lab, conflist: &Value) -> PathBuf {
    let dir = lab.dir.join("cni-bin");
    let _ = std::fs::create_dir_all(&dir);
    for p in conflist["plugins"].as_array().expect("plugins") {
        let ty = p["type"].as_str().expect("type");
        let from = if ty == "meshnet-cni" { cni_bin() } else { Path::new(DEBIAN_PLUGINS).join(ty) };
        assert!(from.exists(), "plugin {ty} ({}) is missing: install containernetworking-plugins", from.display());
        let _ = std::os::unix::fs::symlink(&from, dir.join(ty));
    }
    dir
}

/// One pod's sandbox, added to the network by a chain of plugins.
struct Sandbox<'a> {
    host: &'a Host,
    id: String,
    netns: String,
    conflist: &'a Value,
    plugins: &'a Path,
    runtime_config: Value,
}

impl Sandbox<'_> {
    /// The network configuration plugin `i` gets: its entry with the list's
    /// name and version, our state directory, the runtime config its
    /// capabilities ask for, and the previous result.
    fn conf(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut c = self.conflist["plugins"][i].clone();
        c["cniVersion"] = self.conflist["cniVersion"].clone();
        c["name"] = self.conflist["name"].clone();
        if c["type"] == "meshnet-cni" {
            c["stateDir"] = json!(self.host.state_dir.to_string_lossy());
        }
        let mut rc = serde_json::Map::new();
        for (cap, on) in c["capabilities"].as_object().cloned().unwrap_or_default() {
            if on == true {
                if let Some(v) = self.runtime_config.get(&cap) {
                    rc.insert(cap, v.clone());
                }
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn run(&self, i: usize, command: &str, conf: &Value) -> Result<Value, String> {
        let ty = conf["type"].as_str().unwrap_or_default().to_string();
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.host.ns]).arg(self.plugins.join(&ty));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.plugins);
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn {ty}: {e}"))?;
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().map_err(|e| format!("{ty}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "{command} through plugin {i} ({ty}) failed ({:?}): {stdout} {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|e| format!("{ty} printed no JSON ({e}): {stdout}"))
    }

    /// ADD through every plugin in order, each given the previous one's result.
    fn add(&self) -> Result<Value, String> {
        let mut prev: Option<Value> = None;
        for i in 0..self.conflist["plugins"].as_array().unwrap().len() {
            let conf = self.conf(i, prev.as_ref());
            prev = Some(self.run(i, "ADD", &conf)?);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL through the plugins in reverse, each given the final ADD result.
    fn del(&self, result: &Value) -> Result<(), String> {
        for i in (0..self.conflist["plugins"].as_array().unwrap().len()).rev() {
            let conf = self.conf(i, Some(result));
            self.run(i, "DEL", &conf)?;
        }
        Ok(())
    }
}

/// An "outside" namespace (`203.0.113.2`) wired to host 1 only, on a link
/// where host 1 speaks with its underlay address; host 2 reaches it through
/// host 1's underlay address. Runs a [`WHO_SERVER`] on port 7000 named `outside`.
fn outside(lab: &Lab, h1: &Host, h2: &Host) -> (Container, Bg) {
    let o = lab.add_container(h1, 9);
    let h1_32 = format!("{}/32", h1.ip);
    ip(&["-n", &h1.ns, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", &o.ns]).expect_ok("out0");
    ip(&["-n", &h1.ns, "addr", "add", &h1_32, "dev", "out0"]).expect_ok("h1 out0 address");
    ip(&["-n", &h1.ns, "link", "set", "out0", "up"]).expect_ok("out0 up");
    ip(&["-n", &h1.ns, "route", "add", "203.0.113.2/32", "dev", "out0", "src", &h1.ip]).expect_ok("h1 route to outside");
    ip(&["-n", &o.ns, "addr", "add", "203.0.113.2/24", "dev", "eth0"]).expect_ok("outside address");
    ip(&["-n", &o.ns, "link", "set", "eth0", "up"]).expect_ok("outside eth0 up");
    let underlay = format!("10.250.{}.0/24", lab.k);
    ip(&["-n", &o.ns, "route", "add", &underlay, "via", &h1.ip, "dev", "eth0", "onlink"]).expect_ok("outside route to the underlay");
    ip(&["-n", &h2.ns, "route", "add", "203.0.113.0/24", "via", &h1.ip]).expect_ok("h2 route to outside");
    let server = who_server(lab, &o.ns, 7000, "outside");
    (o, server)
}

/// A Service as kube-proxy makes one: DNAT from `10.96.0.10:80` to the
/// backend, for pods (prerouting) and the host itself (output), and
/// masquerade of a backend reaching itself through it (hairpin).
fn kube_proxy_service(h: &Host, backend: &str) {
    let rules = format!(
        "table ip kubeproxy {{
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.96.0.10 tcp dport 80 dnat to {backend}:8080
  }}
  chain output {{ type nat hook output priority -100; policy accept;
    ip daddr 10.96.0.10 tcp dport 80 dnat to {backend}:8080
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr {backend} ip daddr {backend} masquerade
  }}
}}
"
    );
    let file = h.state_dir.with_extension("kubeproxy.nft");
    std::fs::write(&file, rules).unwrap();
    exec_in(&h.ns, &["nft", "-f", &file.to_string_lossy()]).expect_ok("kube-proxy's Service rules");
}

#[test]
fn pods_through_the_cni_chain() {
    let Some(lab) = Lab::new("cni chain") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let pod1 = lab.add_container(&h1, 1);
    let pod2 = lab.add_container(&h2, 2);
    two_routers(&h1, &h2);
    let (_o, _outside_server) = outside(&lab, &h1, &h2);

    let conflist = shipped_conflist();
    let types: Vec<&str> = conflist["plugins"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(types, ["meshnet-cni", "portmap"], "the shipped conflist: {conflist:#}");
    assert_eq!(conflist["plugins"][1]["capabilities"]["portMappings"], true);
    let plugins = plugin_dir(&lab, &conflist);
    let sandbox = |h, id: &str, ns: &str, rc: Value| Sandbox {
        host: h,
        id: format!("{id}-{}", lab.prefix),
        netns: format!("/run/netns/{ns}"),
        conflist: &conflist,
        plugins: &plugins,
        runtime_config: rc,
    };
    let s1 = sandbox(&h1, "pod1", &pod1.ns, json!({"portMappings": [{"hostPort": 8081, "containerPort": 8080, "protocol": "tcp"}]}));
    let s2 = sandbox(&h2, "pod2", &pod2.ns, json!({}));
    let r1 = s1.add().unwrap_or_else(|e| panic!("{e}"));
    let r2 = s2.add().unwrap_or_else(|e| panic!("{e}"));
    let (a1, a2) = (r1["ips"][0]["address"].as_str().unwrap().to_string(), r2["ips"][0]["address"].as_str().unwrap().to_string());
    let (p1, p2) = (ip_of(&a1), ip_of(&a2));
    // The gateway is the node's exposed address in the pod's subnet.
    let (g1, g2) = (exposed(&h1), exposed(&h2));
    assert_eq!(g1.len(), 1, "h1 exposed {g1:?}");
    assert_eq!(g2.len(), 1, "h2 exposed {g2:?}");
    assert_eq!(r1["ips"][0]["gateway"].as_str(), Some(ip_of(&g1[0]).as_str()), "{r1:#}");
    assert!(r1["routes"].as_array().unwrap().iter().any(|r| r["dst"] == "0.0.0.0/0"), "{r1:#}");
    assert!(routes(&pod1.ns).contains(&format!("default via {}", ip_of(&g1[0]))), "{}", routes(&pod1.ns));
    // Hairpin on the pods' bridge ports.
    let ports = exec_in(&h1.ns, &["bridge", "-d", "-j", "link", "show"]).expect_ok("bridge link").json();
    assert!(
        ports.as_array().unwrap().iter().any(|p| p["ifname"].as_str().is_some_and(|n| n.starts_with("vmn")) && p["hairpin"] == true),
        "no pod port with hairpin on: {ports:#}"
    );
    assert!(ping_until(&pod1.ns, &p2, SECS(20)), "pod1 does not reach pod2");

    // Egress: the outside sees the nodes' underlay addresses.
    assert_eq!(ask_until(&pod1.ns, "203.0.113.2", 7000), Some(format!("outside {}", h1.ip)));
    assert_eq!(ask_until(&pod2.ns, "203.0.113.2", 7000), Some(format!("outside {}", h2.ip)));

    // A Service on every node pointing at pod2; pod1 reaches it, pod2 reaches itself.
    let _backend = who_server(&lab, &pod2.ns, 8080, "backend");
    kube_proxy_service(&h1, &p2);
    kube_proxy_service(&h2, &p2);
    assert_eq!(ask_until(&pod1.ns, "10.96.0.10", 80), Some(format!("backend {p1}")));
    let hairpin = ask_until(&pod2.ns, "10.96.0.10", 80).unwrap_or_default();
    assert!(hairpin.starts_with("backend "), "pod2 does not reach its own Service: {hairpin:?}");

    // hostPort through portmap: h1's underlay address, port 8081, reaches pod1.
    let _web = who_server(&lab, &pod1.ns, 8080, "pod1");
    assert_eq!(ask_until(&h2.ns, &h1.ip, 8081), Some(format!("pod1 {}", h2.ip)));

    // A router restart keeps the pod's address, route and reach.
    h1.meshnet(&["stop"]).expect_ok("stop h1");
    h1.launch(&["--resume"]);
    assert_eq!(addrs_of(&pod1.ns, "eth0"), vec![a1.clone()], "pod1's address after a router restart");
    assert!(routes(&pod1.ns).contains(&format!("default via {}", ip_of(&g1[0]))));
    assert_eq!(exposed(&h1), g1);
    assert!(ping_until(&pod1.ns, &p2, SECS(20)), "pod1 does not reach pod2 after the restart");
    assert_eq!(ask_until(&pod1.ns, "203.0.113.2", 7000), Some(format!("outside {}", h1.ip)));

    // DEL in reverse: the pod leaves the overlay and the host port goes.
    s1.del(&r1).unwrap_or_else(|e| panic!("{e}"));
    s2.del(&r2).unwrap_or_else(|e| panic!("{e}"));
    assert!(link(&pod1.ns, "eth0").is_none(), "eth0 left in pod1");
    let nat = exec_in(&h1.ns, &["iptables-save", "-t", "nat"]).stdout;
    assert!(!nat.contains("8081"), "portmap's rule for 8081 is left:\n{nat}");
    assert_eq!(ask(&h2.ns, &h1.ip, 8081), None, "the host port still answers after DEL");
}

// ---------------------------------------------------------------------------
// podman

/// A tiny image root: bash, sleep, cat, ping and perl (for a TCP server and
/// client) with the libraries they load, copied from this machine.
fn rootfs_tarball(lab: &Lab) -> PathBuf {
    let root = lab.dir.join("rootfs");
    let mut files: Vec<String> = Vec::new();
    for bin in ["/usr/bin/perl", "/usr/bin/bash", "/usr/bin/sleep", "/usr/bin/ping", "/usr/bin/cat"] {
        files.push(bin.into());
        let ldd = run(std::process::Command::new("ldd").arg(bin), SECS(10));
        files.extend(ldd.stdout.split_whitespace().filter(|w| w.starts_with('/')).map(String::from));
    }
    let perl = run(std::process::Command::new("find").args(["/usr/lib/x86_64-linux-gnu/perl-base", "-type", "f"]), SECS(10));
    files.extend(perl.stdout.lines().map(String::from));
    std::fs::create_dir_all(&root).unwrap();
    let list = lab.dir.join("rootfs.files");
    std::fs::write(&list, files.join("\n")).unwrap();
    let copy = format!(
        "tar -chf - -T {} 2>/dev/null | tar -C {r} -xf - && mkdir -p {r}/bin {r}/etc {r}/tmp {r}/proc {r}/sys {r}/dev && ln -sf /usr/bin/bash {r}/bin/sh && tar -C {r} -cf {r}.tar .",
        list.display(),
        r = root.display()
    );
    run(std::process::Command::new("sh").args(["-c", &copy]), SECS(60)).expect_ok("make the image root");
    root.with_extension("tar")
}

/// podman for one host: its own storage, run directory and containers.conf
/// (CNI backend, meshnet's conflist, the lab's plugin directory).
struct Podman {
    ns: String,
    root: PathBuf,
    conf: PathBuf,
}

impl Podman {
    fn new(lab: &Lab, h: &Host, conflist: &Value, plugins: &Path) -> Podman {
        let root = lab.dir.join(format!("podman-h{}", h.i));
        let net = root.join("net.d");
        std::fs::create_dir_all(&net).unwrap();
        let mut list = conflist.clone();
        for p in list["plugins"].as_array_mut().unwrap() {
            if p["type"] == "meshnet-cni" {
                p["stateDir"] = json!(h.state_dir.to_string_lossy());
            }
        }
        std::fs::write(net.join("10-meshnet.conflist"), serde_json::to_string_pretty(&list).unwrap()).unwrap();
        let conf = root.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\ncni_plugin_dirs = [\"{}\"]\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
                net.display(),
                plugins.display()
            ),
        )
        .unwrap();
        Podman { ns: h.ns.clone(), root, conf }
    }

    fn run(&self, args: &[&str]) -> Out {
        // Only the network namespace: `ip netns exec` would also give podman a
        // mount namespace of its own, and the routers (in theirs) would not see
        // the namespace files podman mounts under /run/netns.
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("podman")
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", &self.conf);
        run(&mut cmd, SECS(90))
    }

    fn address(&self, name: &str) -> String {
        self.run(&["inspect", name, "--format", "{{.NetworkSettings.Networks.meshnet.IPAddress}}"])
            .expect_ok("podman inspect")
            .stdout
            .trim()
            .to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all", "--time", "0"]);
    }
}

const PERL_SERVER: &str = r#"use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!"; $| = 1; print "listening\n"; while (my $c = $s->accept) { print $c "$ARGV[0] " . $c->peerhost . "\n"; close $c }"#;
const PERL_CLIENT: &str = r#"use IO::Socket::INET; my $c = IO::Socket::INET->new(PeerAddr => $ARGV[0], Timeout => 3) or die "connect: $!"; print scalar <$c>"#;

#[test]
fn podman_on_two_routers() {
    let Some(lab) = Lab::new("podman") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    two_routers(&h1, &h2);
    let (_o, _outside_server) = outside(&lab, &h1, &h2);
    let conflist = shipped_conflist();
    let plugins = plugin_dir(&lab, &conflist);
    let tarball = rootfs_tarball(&lab);
    let (pm1, pm2) = (Podman::new(&lab, &h1, &conflist, &plugins), Podman::new(&lab, &h2, &conflist, &plugins));
    for pm in [&pm1, &pm2] {
        pm.run(&["import", &tarball.to_string_lossy(), "localhost/meshnet-test-root:1"]).expect_ok("podman import");
        let nets = pm.run(&["network", "ls", "--format", "{{.Name}}"]).expect_ok("podman network ls");
        assert!(nets.stdout.lines().any(|l| l == "meshnet"), "podman does not see meshnet's conflist: {nets}");
    }
    let image = "localhost/meshnet-test-root:1";
    pm1.run(&["run", "-d", "--name", "web1", "--network", "meshnet", "--cap-add", "NET_RAW", "-p", "8082:8080", image, "perl", "-e", PERL_SERVER, "web1"])
        .expect_ok("podman run on h1");
    pm2.run(&["run", "-d", "--name", "web2", "--network", "meshnet", "--cap-add", "NET_RAW", image, "perl", "-e", PERL_SERVER, "web2"])
        .expect_ok("podman run on h2");
    let (ip1, ip2) = (pm1.address("web1"), pm2.address("web2"));
    assert!(ip1.starts_with("10.2.1.") && ip2.starts_with("10.2.1."), "addresses {ip1} {ip2}");
    let ps1 = h1.ps_json();
    assert!(ps1.iter().any(|e| e["addresses"].to_string().contains(&ip1)), "h1's router does not list {ip1}: {ps1:?}");
    let pinged = wait_until(SECS(20), || pm1.run(&["exec", "web1", "ping", "-c", "1", "-W", "1", &ip2]).ok());
    assert!(pinged, "web1 does not ping web2");
    assert!(pm2.run(&["exec", "web2", "ping", "-c", "1", "-W", "1", &ip1]).ok(), "web2 does not ping web1");
    for (pm, name, h) in [(&pm1, "web1", &h1), (&pm2, "web2", &h2)] {
        let out = pm.run(&["exec", name, "perl", "-e", PERL_CLIENT, "203.0.113.2:7000"]);
        assert_eq!(out.stdout.trim(), format!("outside {}", h.ip), "{name} to the outside: {out}");
    }
    // -p 8082:8080 on h1, through portmap: h2 reaches web1 at h1's underlay address.
    assert_eq!(ask_until(&h2.ns, &h1.ip, 8082), Some(format!("web1 {}", h2.ip)));
    pm1.run(&["rm", "--force", "--time", "0", "web1"]).expect_ok("podman rm web1");
    assert!(!h1.ps_json().iter().any(|e| e["addresses"].to_string().contains(&ip1)), "web1 still attached after rm");
    assert_eq!(ask(&h2.ns, &h1.ip, 8082), None, "the published port still answers after rm");
}

const RANGE6: &str = "fd52::/64";


/// The global IPv6 addresses (`ip/prefix`) on `dev` in `ns`, and whether it has a link-local one.
fn ipv6_of(ns: &str, dev: &str) -> (Vec<String>, bool) {
    let out = exec_in(ns, &["ip", "-6", "-j", "addr", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    let mut global = Vec::new();
    let mut link_local = false;
    for a in v[0]["addr_info"].as_array().into_iter().flatten() {
        if a["scope"] == "link" {
            link_local = true;
        } else if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
            global.push(format!("{ip}/{len}"));
        }
    }
    (global, link_local)
}

/// `nft list table ip6 meshnet` in the host, or None when there is no such table.
fn meshnet_table6(h: &Host) -> Option<String> {
    let out = exec_in(&h.ns, &["nft", "list", "table", "ip6", "meshnet"]);
    out.ok().then_some(out.stdout)
}


#[test]
fn expose_ipv6_dual_stack() {
    let Some(lab) = Lab::new("expose6") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let c2 = lab.add_container(&h2, 2);
    let opts = [&OPTS[..], &["--ipalloc-range", RANGE6]].concat();
    h1.launch(&opts);
    h2.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    assert!(wait_until(SECS(30), || established(&h1) >= 1 && established(&h2) >= 1), "h1 and h2 did not connect");
    h1.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h1");

    // The bridge has IPv6 off before an expose, and set to be quiet once on.
    let knob = |knob: &str| exec_in(&h1.ns, &["cat", &format!("/proc/sys/net/ipv6/conf/meshnet/{knob}")]).stdout.trim().to_string();
    let knobs = || (knob("disable_ipv6"), knob("addr_gen_mode"), knob("accept_ra"), knob("accept_dad"));
    let quiet = |disabled: &str| (disabled.to_string(), "1".to_string(), "0".to_string(), "0".to_string());
    assert_eq!(knobs(), quiet("1"), "h1's bridge before expose");
    assert_eq!(ipv6_of(&h1.ns, "meshnet"), (vec![], false), "h1's bridge has IPv6 addresses before expose");

    let out = h2.meshnet(&["attach", &c2.ns]).expect_ok("attach c2");
    let a2: Vec<String> = out.last_line().unwrap_or_default().split_whitespace().map(String::from).collect();
    let v6_2 = a2.iter().find(|a| a.contains(':')).map(|a| ip_of(a)).unwrap_or_else(|| panic!("c2 got no IPv6 address: {out}"));
    assert!(!ping(&h1.ns, &v6_2, 1), "h1 reached {v6_2} on h2 before expose");

    // Bad input: a clear error, nothing changed.
    let before = (exposed(&h1), meshnet_table(&h1), meshnet_table6(&h1), ipv6_of(&h1.ns, "meshnet"));
    for (args, says) in [
        (vec!["expose", "fd53::1/64"], "outside the IP allocation range"),
        (vec!["expose", "ip:fd53::1/64"], "outside the IP allocation range"),
        (vec!["expose", "net:fd53::/64"], "outside the IP allocation range"),
        (vec!["expose", "net:fd52::/48"], "outside the IP allocation range"),
        (vec!["expose", "fd52::zz/64"], "invalid"),
        (vec!["hide", "fd52::99/64"], "is not exposed"),
    ] {
        let out = h1.meshnet(&args);
        assert!(!out.ok() && out.stderr.to_lowercase().contains(&says.to_lowercase()), "{args:?} should fail saying {says:?}: {out}");
        let now = (exposed(&h1), meshnet_table(&h1), meshnet_table6(&h1), ipv6_of(&h1.ns, "meshnet"));
        assert_eq!(now, before, "{args:?} changed something");
    }

    // expose with no address: one of each family.
    let out = h1.meshnet(&["expose"]).expect_ok("expose");
    let lines: Vec<String> = out.stdout.lines().map(String::from).collect();
    assert_eq!(lines.len(), 2, "expose on a dual-stack router prints two addresses: {out}");
    let (e4, e6) = (lines[0].clone(), lines[1].clone());
    assert!(e4.starts_with("10.2.1.") && e4.ends_with("/24"), "expose gave {e4}");
    let r6: meshnet_proto::ipam::Cidr = RANGE6.parse().unwrap();
    assert!(e6.ends_with("/64") && r6.contains(ip_of(&e6).parse::<std::net::IpAddr>().unwrap()), "expose gave {e6}");
    assert_eq!(exposed(&h1), vec![e4.clone(), e6.clone()]);
    assert_eq!(ipv6_of(&h1.ns, "meshnet"), (vec![e6.clone()], false), "the bridge holds the exposed IPv6 address only");
    assert_eq!(knobs(), quiet("0"), "h1's bridge after expose");
    assert!(addrs_of(&h1.ns, "meshnet").contains(&e4));
    let out = h1.meshnet(&["expose"]).expect_ok("expose again");
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), vec![e4.as_str(), e6.as_str()], "expose again gave others");
    let table6 = meshnet_table6(&h1).expect("an ip6 table once IPv6 is exposed");
    assert!(table6.contains("masquerade") && table6.contains("ip6 saddr fd52::/64"), "{table6}");
    assert!(meshnet_table(&h1).is_some_and(|t| t.contains("ip saddr 10.2.1.0/24")), "the ip table");
    assert_eq!(exec_in(&h1.ns, &["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]).stdout.trim(), "1");

    // The host reaches the container over IPv6, and the container the host.
    assert!(ping_until(&h1.ns, &v6_2, SECS(20)), "h1 does not reach c2 ({v6_2}) with ping -6 after expose");
    assert!(ping(&c2.ns, &ip_of(&e6), 1), "c2 does not reach h1's exposed {e6}");

    // Egress over IPv6: an outside namespace beyond h1 (no route back to the
    // overlay) sees h1's own address there.
    let o = lab.add_container(&h1, 9);
    ip(&["-n", &h1.ns, "link", "add", "out6", "type", "veth", "peer", "name", "eth0", "netns", &o.ns]).expect_ok("out6");
    ip(&["-n", &h1.ns, "addr", "add", "fd99::1/64", "dev", "out6", "nodad"]).expect_ok("h1 out6 address");
    ip(&["-n", &h1.ns, "link", "set", "out6", "up"]).expect_ok("out6 up");
    ip(&["-n", &o.ns, "addr", "add", "fd99::2/64", "dev", "eth0", "nodad"]).expect_ok("outside address");
    ip(&["-n", &o.ns, "link", "set", "eth0", "up"]).expect_ok("outside eth0 up");
    let _server = {
        let bg = lab.spawn_in(&o.ns, &["python3", "-c", WHO_SERVER, "7006", "outside6", "::"]);
        assert!(wait_until(SECS(30), || bg.stdout().contains("listening")), "server6: {} {}", bg.stdout(), bg.stderr());
        bg
    };
    exec_in(&c2.ns, &["ip", "-6", "route", "add", "fd99::/64", "via", &ip_of(&e6)]).expect_ok("c2 route to the outside");
    assert_eq!(ask_until(&c2.ns, "fd99::2", 7006), Some("outside6 fd99::1".to_string()), "c2 -> outside over IPv6");
    let table6 = meshnet_table6(&h1).unwrap_or_default();
    let masqueraded = table6
        .lines()
        .find(|l| l.contains("masquerade"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(masqueraded > 0, "the ip6 masquerade rule counted nothing: {table6}");

    // kill -9 and a relaunch keep both addresses, on the bridge and in the tables.
    kill9(&h1);
    h1.launch(&opts);
    assert_eq!(exposed(&h1), vec![e4.clone(), e6.clone()], "exposed after kill -9 + launch");
    assert_eq!(ipv6_of(&h1.ns, "meshnet"), (vec![e6.clone()], false), "the bridge's IPv6 after kill -9 + launch");
    assert!(meshnet_table6(&h1).is_some_and(|t| t.contains("ip6 saddr fd52::/64")), "the ip6 table after relaunch");
    assert!(ping_until(&h1.ns, &v6_2, SECS(30)), "h1 does not reach c2 with ping -6 after relaunch");
    assert_eq!(ask_until(&c2.ns, "fd99::2", 7006), Some("outside6 fd99::1".to_string()), "c2 -> outside after relaunch");

    // hide: both gone, both tables deleted, and the host no longer reaches the container.
    h1.meshnet(&["hide"]).expect_ok("hide");
    assert!(exposed(&h1).is_empty());
    assert_eq!(ipv6_of(&h1.ns, "meshnet"), (vec![], false), "IPv6 left on the bridge after hide");
    assert_eq!(knobs(), quiet("1"), "h1's bridge after hide");
    assert!(addrs_of(&h1.ns, "meshnet").is_empty(), "IPv4 left on the bridge after hide");
    assert!(meshnet_table(&h1).is_none() && meshnet_table6(&h1).is_none(), "a table after hide");
    assert!(!ping(&h1.ns, &v6_2, 1), "h1 still reaches {v6_2} after hide");
    let ipam = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    assert!(!ipam.to_string().contains("meshnet:expose"), "the exposed addresses were not released: {ipam:#}");
}
