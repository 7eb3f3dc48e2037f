//! Fault scenarios (issue 5), end to end: real routers in network namespaces
//! (see `meshnet_tests::lab`), faults made with iptables and tc inside the host
//! namespaces, so they go away with the lab even when a test fails. Containers
//! are `c<j>` on host `h<j>`, attached as `10.44.0.<j>/16`.
//!
//! 1. `chain_with_udp_block_relays_then_goes_direct`: h1–h2–h3 all connected by
//!    TCP (discovery), UDP between h1 and h3 dropped. c1↔c3 ping without loss
//!    (relayed by h2); h1's connection to h3 says `route: relayed`, `via: h2`,
//!    `state: pending`. Rule lifted: within 30 s `direct`/`established`, pings
//!    work, h2's `relayed_units` stops growing.
//! 2. `discovery_keeps_the_ends_talking_when_the_middle_stops`: chain, the ends
//!    only told about h2; they meet by gossip; `meshnet stop` on h2; a ping
//!    running across the stop loses nothing.
//!    `without_discovery_the_ends_lose_each_other_with_the_middle`: the same
//!    with `--no-discovery`: c1↔c3 stop working, h1 shows its target h2 as
//!    `retrying`/`failed` with "connection refused", and h3 is gone from its peers.
//! 3. `kill9_of_a_router_off_the_path_mid_transfer`: full mesh of three, a
//!    stream c1→c3, `kill -9` of h2: h1 and h3 notice, h2 relaunched comes back
//!    with a new UID, c1↔c2 pings, the stream arrives intact, nobody panicked.
//!    `kill9_of_the_senders_router_mid_transfer`: the same killing h1 (on the
//!    path): after the relaunch a new transfer c1→c3 arrives intact, and the
//!    interrupted one never arrives corrupted.
//! 4. `partition_two_and_two_then_heal`: full mesh of four, {h1,h2} cut from
//!    {h3,h4} (all IP dropped both ways): pings within each half keep working,
//!    after the 35 s heartbeat timeout every router lists exactly its half as
//!    peers; rules lifted: within 60 s all four established with each other and
//!    c1↔c4 pings.
//! 5. `black_hole_from_<N>_bytes_path_mtu_<P>` (issue 10): the underlay
//!    silently drops UDP datagrams from N bytes (IP length: 1029, 1001, 801,
//!    701), so probing must find the ladder rung P (1000, 900, 700, 576) on
//!    both sides, and within 35 s of the connection coming up pings of 56 to
//!    10 000 bytes both ways, five `ping -s 10000` in a row and a 20 MB transfer
//!    (SHA-256 checked) must cross, while a capture of each underlay shows no
//!    data datagram over P and nothing counts an encode or send error.
//!    `black_hole_from_701_bytes_relayed`: the same at 576 across the chain
//!    h1–h2–h3 without discovery, h2 relaying (and cutting to its next hop's
//!    path MTU) with no refused frame.
//! 6. `transfer_survives_loss_and_reordering`: 2 % random loss of the routers'
//!    UDP each way plus reordering (HTB priority classes, see the test's doc);
//!    a UDP probe pair proves the underlay reorders, a sniffer proves meshnet's
//!    own datagrams were reordered, and 50 MB cross intact.
//!
//! Run: `MESHNET_BIN=target/release/meshnet cargo test --release -p meshnet-tests
//! --test faults -- --test-threads=1 --nocapture` (root; skips otherwise).
//!
//! Each was seen failing where the property it checks was missing: on 54e5939
//! (no UDP heartbeats, no path-MTU probing) 1 fails (c1↔c3 is a black hole: h1
//! sends straight to h3 over the blocked UDP) and 5 fails (`ping -s 10000`
//! never crosses: datagrams stay 1472 bytes). 5 also failed, at every size,
//! while datagrams to a black-holed path still went out in GSO sends (see
//! `drop_datagrams_from`): the kernel hands iptables a whole GSO send, larger
//! than any datagram in it. 4 failed until the topology
//! collected unreachable peers after merging gossip as well as when a
//! connection of its own drops: before, a router that lost its last link to
//! the other half while its neighbour still listed it kept the other half's
//! entries and re-gossiped them, so every router listed all four peers for as
//! long as the partition lasted.

use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// `10.44.0.<j>`
fn overlay(j: u8) -> String {
    format!("10.44.0.{j}")
}

/// `n` hosts; host `b` is launched with the address of every `a` in
/// `(a, b)` of `links` (targets), plus `extra` options. Container `c<j>` on
/// host `h<j>` for each j in `containers`. Returns hosts, containers (in the
/// order of `containers`) and peer names.
fn build(
    lab: &Lab,
    n: u8,
    links: &[(u8, u8)],
    extra: &[&str],
    containers: &[u8],
) -> (Vec<Host>, Vec<Container>, Vec<String>) {
    let hosts: Vec<Host> = (1..=n).map(|i| lab.add_host(i)).collect();
    let mut names = Vec::new();
    for h in &hosts {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for &(a, b) in links {
            if b == h.i {
                args.push(hosts[a as usize - 1].ip.clone());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        names.push(h.launch(&args));
    }
    let cs: Vec<Container> = containers
        .iter()
        .map(|&j| {
            let h = &hosts[j as usize - 1];
            let c = lab.add_container(h, j);
            h.meshnet(&["attach", &format!("{}/16", overlay(j)), &c.ns])
                .expect_ok(&format!("attach c{j} on {}", h.ns));
            c
        })
        .collect();
    (hosts, cs, names)
}

/// Launches `h1`, then `h2` joining it (hosts made, and their underlay rigged,
/// before the routers start), and attaches `c1` and `c2`.
fn launch_pair(lab: &Lab, h1: &Host, h2: &Host) -> (Container, Container) {
    h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    let c1 = lab.add_container(h1, 1);
    let c2 = lab.add_container(h2, 2);
    h1.meshnet(&["attach", &format!("{}/16", overlay(1)), &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", &format!("{}/16", overlay(2)), &c2.ns]).expect_ok("attach c2");
    (c1, c2)
}

/// `iptables ARGS` in `ns`, which must succeed.
#[track_caller]
fn ipt(ns: &str, args: &[&str]) {
    let mut a = vec!["iptables", "-w"];
    a.extend_from_slice(args);
    exec_in(ns, &a).expect_ok("iptables");
}

/// `tc ARGS` in `ns`, which must succeed.
#[track_caller]
fn tc(ns: &str, args: &[&str]) {
    let mut a = vec!["tc"];
    a.extend_from_slice(args);
    exec_in(ns, &a).expect_ok("tc");
}

/// Packets counted by the rules of `table`/`chain` in `ns` whose line contains `needle`.
fn rule_packets(ns: &str, table: &str, chain: &str, needle: &str) -> u64 {
    exec_in(
        ns,
        &["iptables", "-w", "-t", table, "-L", chain, "-v", "-n", "-x"],
    )
    .stdout
    .lines()
    .filter(|l| l.contains(needle))
    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
    .sum()
}

/// veth hands a GSO send to its peer whole: make the kernel cut it into
/// datagrams on the way out (and not glue them again on the way in), so that
/// rules on INPUT see each datagram as a real wire would carry it.
#[track_caller]
fn wire_like(h: &Host) {
    exec_in(
        &h.ns,
        &[
            "ethtool",
            "-K",
            UNDERLAY_IF,
            "tx-udp-segmentation",
            "off",
            "gro",
            "off",
        ],
    )
    .expect_ok("ethtool");
}

/// `meshnet status connections --json` of `h`.
#[track_caller]
fn conns(h: &Host) -> Vec<Value> {
    match h
        .meshnet(&["status", "connections", "--json"])
        .expect_ok(&format!("status connections on {}", h.ns))
        .json()
    {
        Value::Array(a) => a,
        other => panic!(
            "status connections --json on {} is not an array: {other}",
            h.ns
        ),
    }
}

/// The connection of `h` with peer `name`, if any.
fn conn_with(h: &Host, name: &str) -> Option<Value> {
    conns(h).into_iter().find(|c| c["peer"] == name)
}

fn counter(h: &Host, key: &str) -> u64 {
    h.status_json()["dataplane"][key].as_u64().unwrap_or(0)
}

/// Each host holds an established connection with every other name.
fn full_mesh(hosts: &[Host], names: &[String]) -> bool {
    hosts.iter().zip(names).all(|(h, me)| {
        let s = h.status_json();
        names
            .iter()
            .filter(|n| *n != me)
            .all(|n| established_with(&s, n))
    })
}

/// One line per host: its established peers and all its connections.
fn describe_mesh(hosts: &[Host]) -> String {
    hosts
        .iter()
        .map(|h| {
            let s = h.status_json();
            let conns: Vec<String> = connections(&s)
                .iter()
                .map(|c| {
                    format!(
                        "{} {} {} {}",
                        c["address"], c["peer"], c["state"], c["info"]
                    )
                })
                .collect();
            format!(
                "  {}: peers {:?}\n    {}",
                h.ns,
                peer_names(&s),
                conns.join("\n    ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every router runs and no log mentions a panic.
#[track_caller]
fn nobody_crashed(hosts: &[Host]) {
    for h in hosts {
        let pid = router_pid(h);
        let log = h.log();
        let bad: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
        assert!(
            bad.is_empty(),
            "router of {} panicked:\n{}",
            h.ns,
            bad.join("\n")
        );
        eprintln!(
            "{}: router {pid} alive, no panic in {} log lines",
            h.ns,
            log.lines().count()
        );
    }
}

/// The uid gossiped for peer `name` in `h`'s view.
fn uid_of(h: &Host, name: &str) -> Option<u64> {
    let s = h.status_json();
    s["peers"].as_array()?.iter().find(|p| p["name"] == name)?["uid"].as_u64()
}

/// `count` pings (0.2 s apart) from `ns` to `ip`: how many were answered.
fn ping_received(ns: &str, ip: &str, count: u32) -> u32 {
    let c = count.to_string();
    let deadline = (count / 5 + 5).to_string();
    let out = exec_in_timeout(
        ns,
        &[
            "ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1", "-w", &deadline, ip,
        ],
        SECS(u64::from(count) / 5 + 10),
    );
    received_of(&out.stdout)
}

/// "N received" of ping's summary.
fn received_of(stdout: &str) -> u32 {
    stdout
        .split(',')
        .find(|p| p.contains("received"))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Bulk data with checksums

/// Streams random bytes to `argv[1]`:5001 for `argv[2]` seconds at about
/// `argv[3]` bytes/s; prints `sha256hex bytes`.
const STREAM: &str = r#"
import hashlib, os, socket, sys, time
dst, secs, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
h = hashlib.sha256(); sent = 0
c = socket.create_connection((dst, 5001), timeout=60)
start = time.time()
print("connected", flush=True)
while time.time() - start < secs:
    b = os.urandom(1 << 16)
    c.sendall(b); h.update(b); sent += len(b)
    ahead = sent / rate - (time.time() - start)
    if ahead > 0: time.sleep(ahead)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(h.hexdigest(), sent, flush=True)
"#;

/// A started sink in `c`.
#[track_caller]
fn sink(lab: &Lab, c: &Container) -> Bg {
    start_sink(lab, &c.ns)
}

/// Sends `bytes` from `from` to container `to` and checks the SHA-256.
#[track_caller]
fn transfer(lab: &Lab, from: &Container, to: &Container, bytes: u64, timeout: Duration) {
    checked_transfer(lab, &from.ns, &to.ns, &overlay(to.j), bytes, timeout);
}

// ---------------------------------------------------------------------------
// 1. Chain with a UDP block

/// h1, h2, h3 all connected by TCP (h2 told about h1, h3 about h2, discovery
/// joins h1 and h3); UDP between h1 and h3 is dropped in h1 from the start.
/// The overlay must notice that the direct path carries no datagrams and
/// relay through h2, and say so; when the block is lifted it must go direct.
#[test]
fn chain_with_udp_block_relays_then_goes_direct() {
    let Some(lab) = Lab::new("udpblock") else {
        return;
    };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    // Every UDP datagram between h1 and h3, both ways; TCP passes.
    let block = [
        ["OUTPUT", "-p", "udp", "-d", h3.ip.as_str(), "-j", "DROP"],
        ["INPUT", "-p", "udp", "-s", h3.ip.as_str(), "-j", "DROP"],
    ];
    for r in &block {
        let mut a = vec!["-A"];
        a.extend_from_slice(r);
        ipt(&h1.ns, &a);
    }
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    let n3 = h3.launch(&[&h2.ip]);
    let c1 = lab.add_container(&h1, 1);
    let c3 = lab.add_container(&h3, 3);
    h1.meshnet(&["attach", &format!("{}/16", overlay(1)), &c1.ns])
        .expect_ok("attach c1");
    h3.meshnet(&["attach", &format!("{}/16", overlay(3)), &c3.ns])
        .expect_ok("attach c3");
    let hosts = [h1.clone(), h2.clone(), h3.clone()];
    // Control connections: every pair, h1–h3 found by discovery. (h1–h3 may
    // be `pending`: TCP up, UDP not.)
    let tcp_up = |h: &Host, n: &str| {
        conns(h)
            .iter()
            .any(|c| c["peer"] == n && (c["state"] == "established" || c["state"] == "pending"))
    };
    assert!(
        wait_until(SECS(30), || tcp_up(&h1, &n2)
            && tcp_up(&h3, &n2)
            && tcp_up(&h1, &n3)
            && tcp_up(&h3, &n1)),
        "h1 and h3 did not meet over TCP (discovery):\n{}",
        describe_mesh(&hosts)
    );

    // Relayed: c1 and c3 talk although no datagram passes between h1 and h3.
    let reached = ping_until(&c1.ns, &overlay(3), SECS(30));
    let entry = conn_with(&h1, &n3);
    assert!(
        reached,
        "c1 cannot reach c3 while UDP between h1 and h3 is blocked (no relay through h2); \
         h1's connection to h3: {entry:#?}; h2 relayed_units {}",
        counter(&h2, "relayed_units")
    );
    let relayed_before = counter(&h2, "relayed_units");
    let got = ping_received(&c1.ns, &overlay(3), 20);
    assert_eq!(got, 20, "c1 -> c3 relayed: {got}/20 answered");
    assert!(ping(&c3.ns, &overlay(1), 5), "c3 -> c1 relayed fails");
    let relayed = counter(&h2, "relayed_units") - relayed_before;
    assert!(
        relayed >= 40,
        "h2 relayed only {relayed} units for 20 pings and 5 back: the frames did not go through h2"
    );
    let dropped = rule_packets(&h1.ns, "filter", "OUTPUT", &h3.ip)
        + rule_packets(&h1.ns, "filter", "INPUT", &h3.ip);
    assert!(
        dropped > 0,
        "the UDP block between h1 and h3 dropped nothing: is it in place?"
    );
    eprintln!("relayed by h2: {relayed} units; UDP h1<->h3 dropped: {dropped}");
    let entry = conn_with(&h1, &n3)
        .unwrap_or_else(|| panic!("h1 lists no connection with h3 ({n3}): {:#?}", conns(&h1)));
    eprintln!("h1's connection to h3 while blocked: {entry}");
    assert_eq!(
        entry["route"], "relayed",
        "h1's connection to h3: {entry:#}"
    );
    assert_eq!(
        entry["via"],
        n2.as_str(),
        "h1 -> h3 should be relayed via h2 ({n2}): {entry:#}"
    );
    assert_eq!(
        entry["state"], "pending",
        "TCP up, UDP not working: {entry:#}"
    );

    // Lift the block: direct again within 30 s.
    for r in &block {
        let mut a = vec!["-D"];
        a.extend_from_slice(r);
        ipt(&h1.ns, &a);
    }
    let t = Instant::now();
    let mut last = Value::Null;
    let direct = wait_until(SECS(30), || {
        last = conn_with(&h1, &n3).unwrap_or(Value::Null);
        last["route"] == "direct" && last["state"] == "established"
    });
    assert!(direct, "30 s after lifting the UDP block h1's connection to h3 is not direct and established: {last:#}");
    eprintln!(
        "direct again after {:.1}s: {last}",
        t.elapsed().as_secs_f64()
    );
    // h1 seeing the path direct is one router's view; h3 and h2 learn the
    // h1–h3 link by gossip a moment later, and until then h3's broadcasts may
    // still take the tree through h2. Wait until every router's topology lists
    // all three links as established by both ends and routes every peer
    // directly; from then on h2 must relay nothing.
    let mut views = Vec::new();
    let agreed = wait_until(SECS(30), || {
        views = hosts.iter().map(|h| h.meshnet(&["report", "--json"]).expect_ok("report").json()).collect();
        views.iter().all(all_direct)
    });
    assert!(agreed, "30 s after h1 went direct the routers' views still differ: {views:#?}");
    let before = counter(&h2, "relayed_units");
    let got = ping_received(&c1.ns, &overlay(3), 20);
    assert_eq!(got, 20, "c1 -> c3 direct: {got}/20 answered");
    let after = counter(&h2, "relayed_units");
    assert_eq!(
        after, before,
        "h2 still relays c1 <-> c3 traffic after the path went direct"
    );
}

/// One router's `report --json` lists every peer's links as established by
/// both ends (three peers, each with two) and routes every other peer directly.
fn all_direct(report: &Value) -> bool {
    let peers = report["peers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let routes = report["routes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    peers.len() == 3
        && peers.iter().all(|p| {
            p["connections"].as_array().is_some_and(|cs| {
                cs.iter().filter(|c| c["established"] == true).count() == 2
            })
        })
        && routes.len() == 2
        && routes.iter().all(|r| r["route"] == "direct")
}

// ---------------------------------------------------------------------------
// 2. Discovery and losing the middle

/// Chain h1–h2–h3 where the ends are told only about h2 (launched first).
fn chain(lab: &Lab, extra: &[&str]) -> (Vec<Host>, Vec<Container>, Vec<String>) {
    let hosts: Vec<Host> = (1..=3).map(|i| lab.add_host(i)).collect();
    let mut names = vec![String::new(); 3];
    let mut a: Vec<&str> = extra.to_vec();
    names[1] = hosts[1].launch(&a);
    a.push(&hosts[1].ip);
    names[0] = hosts[0].launch(&a);
    names[2] = hosts[2].launch(&a);
    let mut cs = Vec::new();
    for j in [1u8, 3] {
        let h = &hosts[j as usize - 1];
        let c = lab.add_container(h, j);
        h.meshnet(&["attach", &format!("{}/16", overlay(j)), &c.ns])
            .expect_ok("attach");
        cs.push(c);
    }
    (hosts, cs, names)
}

#[test]
fn discovery_keeps_the_ends_talking_when_the_middle_stops() {
    let Some(lab) = Lab::new("middle") else {
        return;
    };
    let (hs, cs, names) = chain(&lab, &[]);
    let (h1, h2, h3) = (&hs[0], &hs[1], &hs[2]);
    let (c1, c3) = (&cs[0], &cs[1]);
    let met = wait_until(SECS(30), || {
        established_with(&h1.status_json(), &names[2])
            && established_with(&h3.status_json(), &names[0])
    });
    assert!(
        met,
        "h1 and h3 did not meet by gossip:\n{}",
        describe_mesh(&hs)
    );
    assert_eq!(h1.targets(), vec![h2.addr()], "h1 was only told about h2");
    assert!(
        ping_until(&c1.ns, &overlay(3), SECS(30)),
        "c1 cannot reach c3"
    );

    // A ping runs across the stop of h2.
    let mut pinger = lab.spawn_in(
        &c1.ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "40",
            "-i",
            "0.2",
            "-W",
            "1",
            &overlay(3),
        ],
    );
    std::thread::sleep(SECS(2));
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert!(
        wait_until(SECS(10), || h2.pids().is_empty()),
        "h2 did not stop"
    );
    assert!(pinger.wait(SECS(20)), "ping did not finish");
    let got = received_of(&pinger.stdout());
    assert_eq!(
        got,
        40,
        "pings c1 -> c3 lost while h2 stopped: {}",
        pinger.stdout()
    );
    assert!(
        !established_with(&h1.status_json(), &names[1]),
        "h1 still connected to the stopped h2"
    );
    assert!(
        established_with(&h1.status_json(), &names[2]),
        "h1 lost h3:\n{}",
        describe_mesh(&[h1.clone(), h3.clone()])
    );
    assert!(
        ping(&c3.ns, &overlay(1), 5),
        "c3 -> c1 fails after h2 stopped"
    );
}

#[test]
fn without_discovery_the_ends_lose_each_other_with_the_middle() {
    let Some(lab) = Lab::new("nodisc") else {
        return;
    };
    let (hs, cs, names) = chain(&lab, &["--no-discovery"]);
    let (h1, h2) = (&hs[0], &hs[1]);
    let c1 = &cs[0];
    assert!(
        ping_until(&c1.ns, &overlay(3), SECS(30)),
        "c1 cannot reach c3 through h2"
    );
    let s1 = h1.status_json();
    assert!(
        peer_names(&s1).contains(&names[2]),
        "h1 does not know h3 by gossip: {s1:#}"
    );
    assert!(
        !connections(&s1)
            .iter()
            .any(|c| c["peer"] == names[2].as_str()),
        "without discovery h1 must not connect to h3: {s1:#}"
    );

    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert!(
        wait_until(SECS(10), || h2.pids().is_empty()),
        "h2 did not stop"
    );
    assert!(
        !ping(&c1.ns, &overlay(3), 3),
        "c1 still reaches c3 with h2 stopped and no discovery"
    );
    let mut last = Value::Null;
    let explained = wait_until(SECS(20), || {
        last = h1.status_json();
        connections_to(&last, &h2.ip).iter().any(|c| {
            (c["state"] == "retrying" || c["state"] == "failed")
                && c["info"]
                    .as_str()
                    .unwrap_or("")
                    .to_ascii_lowercase()
                    .contains("connection refused")
        })
    });
    assert!(
        explained,
        "h1 does not show its target h2 retrying with \"connection refused\": {last:#}"
    );
    for c in connections_to(&last, &h2.ip) {
        eprintln!("h1 -> h2: {} {}: {}", c["address"], c["state"], c["info"]);
    }
    assert!(
        !peer_names(&last).contains(&names[2]),
        "h1 still lists h3 among its peers, unreachable without h2: {last:#}"
    );
}

// ---------------------------------------------------------------------------
// 3. kill -9 mid-transfer

/// A stream c_from -> c_to running in the background: (sink, source).
#[track_caller]
fn stream(lab: &Lab, from: &Container, to: &Container, secs: u32, rate: u32) -> (Bg, Bg) {
    let rx = sink(lab, to);
    let tx = lab.spawn_in(
        &from.ns,
        &[
            "python3",
            "-c",
            STREAM,
            &overlay(to.j),
            &secs.to_string(),
            &rate.to_string(),
        ],
    );
    assert!(
        wait_until(SECS(10), || tx.stdout().contains("connected")),
        "stream did not connect: {}",
        tx.stderr()
    );
    (rx, tx)
}

/// Full mesh of three (h2 and h3 told about h1), c1..c3.
fn triangle(lab: &Lab) -> (Vec<Host>, Vec<Container>, Vec<String>) {
    let (hs, cs, names) = build(lab, 3, &[(1, 2), (1, 3)], &[], &[1, 2, 3]);
    assert!(
        wait_until(SECS(30), || full_mesh(&hs, &names)),
        "no full mesh of three:\n{}",
        describe_mesh(&hs)
    );
    for j in [2, 3] {
        assert!(
            ping_until(&cs[0].ns, &overlay(j), SECS(30)),
            "c1 cannot reach c{j}"
        );
    }
    (hs, cs, names)
}

#[test]
fn kill9_of_a_router_off_the_path_mid_transfer() {
    let Some(lab) = Lab::new("kill9") else { return };
    let (hs, cs, names) = triangle(&lab);
    let (h1, h2, h3) = (&hs[0], &hs[1], &hs[2]);
    let old_uid = uid_of(h1, &names[1]).expect("h1 knows h2's uid");
    let (mut rx, mut tx) = stream(&lab, &cs[0], &cs[2], 15, 8 << 20);
    std::thread::sleep(SECS(3));

    kill9(h2);
    let t = Instant::now();
    let noticed = wait_until(SECS(60), || {
        !established_with(&h1.status_json(), &names[1])
            && !established_with(&h3.status_json(), &names[1])
    });
    assert!(
        noticed,
        "h1 and h3 still show h2 established 60 s after its kill -9:\n{}",
        describe_mesh(&[h1.clone(), h3.clone()])
    );
    eprintln!(
        "h1 and h3 noticed h2's death after {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let again = h2.launch(&[]);
    assert_eq!(again, names[1], "h2 changed its name across kill -9");
    let back = wait_until(SECS(30), || full_mesh(&hs, &names));
    assert!(
        back,
        "h2 did not come back into the mesh:\n{}",
        describe_mesh(&hs)
    );
    let new_uid = wait_until(SECS(20), || {
        [h1, h3]
            .iter()
            .all(|h| uid_of(h, &names[1]).is_some_and(|u| u != old_uid))
    });
    assert!(
        new_uid,
        "h1/h3 still gossip h2's old uid {old_uid}: {:?} {:?}",
        uid_of(h1, &names[1]),
        uid_of(h3, &names[1])
    );
    assert!(
        ping_until(&cs[0].ns, &overlay(2), SECS(30)),
        "c1 cannot reach c2 after h2's relaunch"
    );
    assert!(
        ping(&cs[1].ns, &overlay(1), 5),
        "c2 -> c1 after h2's relaunch"
    );

    assert!(tx.wait(SECS(60)), "the stream c1 -> c3 did not finish");
    assert!(rx.wait(SECS(30)), "the sink in c3 did not finish");
    let (sent, got) = (digest_line(&tx.stdout()), digest_line(&rx.stdout()));
    assert!(!sent.is_empty(), "the stream failed: {}", tx.stderr());
    assert_eq!(
        got, sent,
        "the stream c1 -> c3 arrived different from what was sent"
    );
    eprintln!("stream across the kill: {sent}");
    nobody_crashed(&hs);
}

#[test]
fn kill9_of_the_senders_router_mid_transfer() {
    let Some(lab) = Lab::new("kill9src") else {
        return;
    };
    let (hs, cs, names) = triangle(&lab);
    let h1 = &hs[0];
    let (mut rx, mut tx) = stream(&lab, &cs[0], &cs[2], 12, 8 << 20);
    std::thread::sleep(SECS(3));

    kill9(h1);
    std::thread::sleep(SECS(2));
    let again = h1.launch(&[]);
    assert_eq!(again, names[0], "h1 changed its name across kill -9");
    let back = wait_until(SECS(30), || full_mesh(&hs, &names));
    assert!(
        back,
        "h1 did not come back into the mesh:\n{}",
        describe_mesh(&hs)
    );
    assert!(
        ping_until(&cs[0].ns, &overlay(3), SECS(30)),
        "c1 cannot reach c3 after h1's relaunch"
    );

    // The interrupted stream may or may not survive the gap; it must never
    // arrive different from what was sent.
    let finished = tx.wait(SECS(90)) && rx.wait(SECS(30));
    let (sent, got) = (digest_line(&tx.stdout()), digest_line(&rx.stdout()));
    if finished && !sent.is_empty() {
        assert_eq!(
            got, sent,
            "the stream interrupted by kill -9 arrived corrupted"
        );
        eprintln!("the interrupted stream survived: {sent}");
    } else {
        eprintln!(
            "the interrupted stream did not complete: sender {sent:?} {}, sink {got:?}",
            tx.stderr().trim()
        );
    }
    transfer(&lab, &cs[0], &cs[2], 20 << 20, SECS(60));
    nobody_crashed(&hs);
}

// ---------------------------------------------------------------------------
// 4. 2+2 partition and heal

#[test]
fn partition_two_and_two_then_heal() {
    let Some(lab) = Lab::new("partition") else {
        return;
    };
    let (hs, cs, names) = build(&lab, 4, &[(1, 2), (1, 3), (1, 4)], &[], &[1, 2, 3, 4]);
    assert!(
        wait_until(SECS(30), || full_mesh(&hs, &names)),
        "no full mesh of four:\n{}",
        describe_mesh(&hs)
    );
    assert!(
        ping_until(&cs[0].ns, &overlay(4), SECS(30)),
        "c1 cannot reach c4"
    );

    // Cut: h1 and h2 drop every IP packet from and to h3 and h4.
    let mut rules: Vec<(String, [String; 4])> = Vec::new();
    for a in &hs[..2] {
        for b in &hs[2..] {
            rules.push((
                a.ns.clone(),
                ["INPUT".into(), "-s".into(), b.ip.clone(), "DROP".into()],
            ));
            rules.push((
                a.ns.clone(),
                ["OUTPUT".into(), "-d".into(), b.ip.clone(), "DROP".into()],
            ));
        }
    }
    for (ns, r) in &rules {
        ipt(ns, &["-I", &r[0], &r[1], &r[2], "-j", &r[3]]);
    }
    let cut = Instant::now();
    assert!(
        !ping(&cs[0].ns, &overlay(3), 2),
        "c1 still reaches c3 across the cut"
    );
    assert!(
        ping(&cs[0].ns, &overlay(2), 5),
        "c1 -> c2 fails in the {{h1,h2}} half"
    );
    assert!(
        ping(&cs[2].ns, &overlay(4), 5),
        "c3 -> c4 fails in the {{h3,h4}} half"
    );

    // Each half converges to itself once the heartbeats time out (35 s).
    let halves = [&names[..2], &names[2..]];
    let view_is_half = |i: usize| {
        let mut peers = peer_names(&hs[i].status_json());
        peers.sort();
        let mut want: Vec<String> = halves[i / 2].to_vec();
        want.sort();
        peers == want
    };
    // A failure here is recorded, not raised at once, so that healing is
    // still exercised (and reported) when the views do not converge.
    let mut problems = Vec::new();
    let no_cross = |i: usize| {
        let s = hs[i].status_json();
        halves[1 - i / 2]
            .iter()
            .all(|n| !connections(&s).iter().any(|c| c["peer"] == n.as_str()))
    };
    let converged = wait_until(SECS(70), || (0..4).all(|i| no_cross(i) && view_is_half(i)));
    if converged {
        eprintln!(
            "halves converged {:.1}s after the cut",
            cut.elapsed().as_secs_f64()
        );
    } else {
        let p = format!(
            "70 s after the cut not every router lists exactly its half as peers:\n{}",
            describe_mesh(&hs)
        );
        eprintln!("{p}");
        problems.push(p);
    }
    // The heartbeats timed out: nobody holds a connection across the cut.
    for (i, h) in hs.iter().enumerate() {
        assert!(
            no_cross(i),
            "{} still has a connection across the cut 70 s after it: {:#}",
            h.ns,
            h.status_json()
        );
    }
    assert!(
        ping(&cs[0].ns, &overlay(2), 5),
        "c1 -> c2 fails in the {{h1,h2}} half after the timeouts"
    );
    assert!(
        ping(&cs[3].ns, &overlay(3), 5),
        "c4 -> c3 fails in the {{h3,h4}} half after the timeouts"
    );

    // Heal.
    for (ns, r) in &rules {
        ipt(ns, &["-D", &r[0], &r[1], &r[2], "-j", &r[3]]);
    }
    let healed_at = Instant::now();
    let healed = wait_until(SECS(60), || {
        full_mesh(&hs, &names) && hs.iter().all(|h| peer_names(&h.status_json()).len() == 4)
    });
    assert!(
        healed,
        "60 s after healing the mesh of four is not whole:\n{}",
        describe_mesh(&hs)
    );
    eprintln!(
        "healed {:.1}s after lifting the cut",
        healed_at.elapsed().as_secs_f64()
    );
    assert!(
        ping_until(&cs[0].ns, &overlay(4), SECS(10)),
        "c1 cannot reach c4 after healing"
    );
    assert!(ping(&cs[3].ns, &overlay(1), 5), "c4 -> c1 after healing");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// 5. Small-datagram underlay (a path-MTU black hole)

/// Drops, on INPUT of `h`, every router datagram whose IPv4 total length is
/// `from` or more: 20 (IP header, no options) + 8 (UDP header) + payload, so
/// `from = 1029` drops payloads over 1000 bytes. Silently: no ICMP, as a
/// middlebox black hole would.
///
/// No [`wire_like`] here, on purpose: a veth hands a UDP GSO send to the other
/// namespace whole, so iptables judges it by its total length, as a filter on
/// a host would. Issue 10 was seen just so: at a path MTU of 900 a 1000-byte
/// ping left h1 as chunks of 900 and 280 bytes in one GSO send, which iptables
/// saw as one 1180-byte datagram and dropped. So a router sends datagrams to a
/// peer whose path MTU probing found below its largest one message by message,
/// never glued, and the captures below see each datagram on its own.
#[track_caller]
fn drop_datagrams_from(h: &Host, from: u32) {
    let range = format!("{from}:65535");
    ipt(
        &h.ns,
        &[
            "-A", "INPUT", "-p", "udp", "--dport", "6783", "-m", "length", "--length", &range, "-j",
            "DROP",
        ],
    );
}

/// Within `deadline`: one `ping -s size` from `ns` to `ip` answered.
fn ping_size_until(ns: &str, ip: &str, size: u32, deadline: Instant) -> bool {
    let s = size.to_string();
    wait_until(deadline.saturating_duration_since(Instant::now()), || {
        exec_in_timeout(
            ns,
            &["ping", "-n", "-q", "-c", "1", "-W", "2", "-s", &s, ip],
            SECS(5),
        )
        .ok()
    })
}

/// The connection of `h` to `peer` once established, with the path MTU probing found.
fn established_pmtu(h: &Host, peer: &str) -> Option<u64> {
    let c = conn_with(h, peer)?;
    (c["state"] == "established").then(|| c["path_mtu"].as_u64()).flatten()
}

/// Ping sizes tried across a black hole: below, around and above every rung
/// the tests use, up to frames the container's kernel fragments.
const PING_SIZES: [u32; 9] = [56, 400, 500, 560, 600, 1000, 1300, 3000, 10_000];

/// From `c`'s namespace to `ip`, by `deadline`: every size of [`PING_SIZES`]
/// answered, then five `ping -s 10000` in a row all answered.
#[track_caller]
fn pings_cross(from: &Container, ip: &str, deadline: Instant, what: &str) {
    for size in PING_SIZES {
        assert!(
            ping_size_until(&from.ns, ip, size, deadline),
            "{what}: ping -s {size} {ip} not answered in time"
        );
    }
    let again = exec_in(
        &from.ns,
        &["ping", "-n", "-q", "-c", "5", "-i", "0.2", "-W", "2", "-s", "10000", ip],
    );
    assert_eq!(received_of(&again.stdout), 5, "{what}: ping -s 10000: {again}");
}

/// Two hosts whose underlay silently drops datagrams from `drop_from` bytes
/// (IP length). Probing must find `pmtu` (a rung of the ladder) on both
/// sides, and within 35 s of the connection coming up small and large pings,
/// `ping -s 10000` and a checked TCP transfer must all cross (Weave's test
/// 105 asks the same of `ping -s 10000` with drops above 700 bytes). Nothing
/// may be counted as an encode or send error.
fn small_datagram_underlay(test: &str, drop_from: u32, pmtu: u64) {
    let Some(lab) = Lab::new(test) else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    for h in [&h1, &h2] {
        drop_datagrams_from(h, drop_from);
    }
    let (c1, c2) = launch_pair(&lab, &h1, &h2);
    let (n1, n2) = (h1.status_json()["name"].as_str().unwrap_or_default().to_string(), h2.status_json()["name"].as_str().unwrap_or_default().to_string());
    assert!(
        wait_until(SECS(30), || established_pmtu(&h1, &n2).is_some()),
        "h1 -> h2 not established within 30 s:\n{}",
        describe_mesh(&[h1.clone(), h2.clone()])
    );
    let up = Instant::now();
    let deadline = up + SECS(35);
    let caps = [lab.capture(&h1.ns, UNDERLAY_IF), lab.capture(&h2.ns, UNDERLAY_IF)];
    pings_cross(&c1, &overlay(2), deadline, "c1 -> c2");
    pings_cross(&c2, &overlay(1), deadline, "c2 -> c1");
    let left = deadline.saturating_duration_since(Instant::now());
    let took = transfer_within(&lab, &c1, &c2, 20 << 20, left);
    let total = up.elapsed();
    assert!(total <= SECS(35), "everything crossed, but only {:.1}s after the connection came up", total.as_secs_f64());
    // On the wire, no data datagram was larger than the path MTU.
    let [cap1, cap2] = caps;
    let sent = (all_within(cap1, &h1, pmtu), all_within(cap2, &h2, pmtu));
    assert!(sent.0 > 10_000, "h1 sent only {} data datagrams for 20 MB: the capture missed them", sent.0);
    for (h, peer) in [(&h1, &n2), (&h2, &n1)] {
        assert_eq!(established_pmtu(h, peer), Some(pmtu), "{}: path MTU found towards {peer}", h.ns);
        for key in ["encode_errors", "udp_send_errors"] {
            assert_eq!(counter(h, key), 0, "{}: {key} {:#}", h.ns, h.status_json()["dataplane"]);
        }
    }
    let dropped = rule_packets(&h1.ns, "filter", "INPUT", "length") + rule_packets(&h2.ns, "filter", "INPUT", "length");
    assert!(dropped > 0, "the size rule dropped nothing: is it in place?");
    eprintln!(
        "drops from {drop_from} B: path MTU {pmtu}; pings and 20 MB ({:.1}s) crossed {:.1}s after the connection came up; data datagrams on the wire all <= {pmtu} B ({} from h1, {} from h2); {dropped} datagrams dropped (heartbeat probes above the path MTU)",
        took.as_secs_f64(),
        total.as_secs_f64(),
        sent.0,
        sent.1
    );
}

/// UDP payload sizes of the data datagrams (outer kind 1) that host `h` sent
/// to port 6783, in a capture of its underlay interface (taken after the
/// kernel segmented GSO sends, so each is a datagram as the wire carries it).
fn data_datagrams_sent(p: &Pcap, h: &Host) -> Vec<usize> {
    let ip: std::net::Ipv4Addr = h.ip.parse().expect("host IPv4");
    p.frames
        .iter()
        .filter_map(|f| {
            if f.len() < 14 + 20 + 8 + 1 || f[12..14] != [0x08, 0x00] || f[23] != 17 || f[26..30] != ip.octets() {
                return None;
            }
            let u = 14 + (f[14] & 15) as usize * 4;
            let udp = f.get(u..u + 9)?;
            let len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            (u16::from_be_bytes([udp[2], udp[3]]) == 6783 && udp[8] == 1).then(|| len - 8)
        })
        .collect()
}

/// Every data datagram `h` sent in `cap` is at most `pmtu` bytes; returns how many it sent.
#[track_caller]
fn all_within(cap: Capture, h: &Host, pmtu: u64) -> usize {
    let sizes = data_datagrams_sent(&cap.stop(), h);
    let over: Vec<&usize> = sizes.iter().filter(|&&n| n as u64 > pmtu).collect();
    assert!(over.is_empty(), "{} sent {} data datagrams over the path MTU {pmtu}: {:?}", h.ns, over.len(), &over[..over.len().min(20)]);
    sizes.len()
}

/// [`checked_transfer`] of `bytes` from `from` to `to`, which must finish within `timeout`.
#[track_caller]
fn transfer_within(lab: &Lab, from: &Container, to: &Container, bytes: u64, timeout: Duration) -> Duration {
    assert!(!timeout.is_zero(), "no time left for the transfer");
    checked_transfer(lab, &from.ns, &to.ns, &overlay(to.j), bytes, timeout)
}

#[test]
fn black_hole_from_1029_bytes_path_mtu_1000() {
    small_datagram_underlay("pmtu1000", 1029, 1000);
}

#[test]
fn black_hole_from_1001_bytes_path_mtu_900() {
    small_datagram_underlay("pmtu900", 1001, 900);
}

#[test]
fn black_hole_from_801_bytes_path_mtu_700() {
    small_datagram_underlay("pmtu700", 801, 700);
}

#[test]
fn black_hole_from_701_bytes_path_mtu_576() {
    small_datagram_underlay("pmtu576", 701, 576);
}

/// The chain h1–h2–h3 with no connection between h1 and h3
/// (`--no-discovery`), every underlay dropping datagrams from 701 bytes: c1
/// and c3 talk through h2, whose receive thread relays (and so must cut to
/// the path MTU of its next hop, as the sender did for the first hop).
#[test]
fn black_hole_from_701_bytes_relayed() {
    let Some(lab) = Lab::new("pmturelay") else {
        return;
    };
    let hosts: Vec<Host> = (1..=3).map(|i| lab.add_host(i)).collect();
    for h in &hosts {
        drop_datagrams_from(h, 701);
    }
    let (h1, h2, h3) = (&hosts[0], &hosts[1], &hosts[2]);
    let n1 = h1.launch(&["--no-discovery"]);
    let n2 = h2.launch(&["--no-discovery", &h1.ip]);
    let n3 = h3.launch(&["--no-discovery", &h2.ip]);
    let c1 = lab.add_container(h1, 1);
    let c3 = lab.add_container(h3, 3);
    h1.meshnet(&["attach", &format!("{}/16", overlay(1)), &c1.ns]).expect_ok("attach c1");
    h3.meshnet(&["attach", &format!("{}/16", overlay(3)), &c3.ns]).expect_ok("attach c3");
    assert!(
        wait_until(SECS(30), || established_pmtu(h1, &n2).is_some()
            && established_pmtu(h3, &n2).is_some()
            && established_pmtu(h2, &n1).is_some()
            && established_pmtu(h2, &n3).is_some()),
        "the chain is not established within 30 s:\n{}",
        describe_mesh(&hosts)
    );
    let up = Instant::now();
    let deadline = up + SECS(35);
    // Frames that arrived while the routers' topologies still disagreed (c3's
    // gratuitous ARP reaching h1 before h1 heard of h3, say) may have been
    // refused and counted; from here on, nothing may be.
    let refusals = ["refused_origin_is_me", "refused_unknown_origin", "refused_not_on_path", "refused_broadcast_not_parent"];
    let before: Vec<Vec<u64>> = hosts.iter().map(|h| refusals.iter().map(|k| counter(h, k)).collect()).collect();
    let caps: Vec<Capture> = hosts.iter().map(|h| lab.capture(&h.ns, UNDERLAY_IF)).collect();
    pings_cross(&c1, &overlay(3), deadline, "c1 -> c3 via h2");
    pings_cross(&c3, &overlay(1), deadline, "c3 -> c1 via h2");
    let left = deadline.saturating_duration_since(Instant::now());
    let took = transfer_within(&lab, &c1, &c3, 20 << 20, left);
    let total = up.elapsed();
    assert!(total <= SECS(35), "everything crossed, but only {:.1}s after the chain came up", total.as_secs_f64());
    assert!(conn_with(h1, &n3).is_none(), "h1 and h3 connected although discovery is off");
    let sent: Vec<usize> = caps.into_iter().zip(&hosts).map(|(c, h)| all_within(c, h, 576)).collect();
    assert!(sent[1] > 10_000, "h2 sent only {} data datagrams while relaying 20 MB", sent[1]);
    let relayed = counter(h2, "relayed_units");
    // 20 MiB in units of at most 64 KiB: 320 units at the very least.
    assert!(relayed >= 320, "h2 relayed only {relayed} units: the traffic did not go through it");
    for (h, peer) in [(h2, &n1), (h2, &n3), (h1, &n2), (h3, &n2)] {
        assert_eq!(established_pmtu(h, peer), Some(576), "{}: path MTU towards {peer}", h.ns);
    }
    for (h, before) in hosts.iter().zip(&before) {
        for key in ["encode_errors", "udp_send_errors"] {
            assert_eq!(counter(h, key), 0, "{}: {key} {:#}", h.ns, h.status_json()["dataplane"]);
        }
        for (key, was) in refusals.iter().zip(before) {
            assert_eq!(counter(h, key), *was, "{}: {key} grew after the chain was up {:#}", h.ns, h.status_json()["dataplane"]);
        }
    }
    eprintln!(
        "relayed through h2 at path MTU 576: pings and 20 MB ({:.1}s) crossed {:.1}s after the chain came up; h2 relayed {relayed} units; data datagrams on the wire all <= 576 B (sent by h1, h2, h3: {sent:?})",
        took.as_secs_f64(),
        total.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 6. Loss and reordering

/// Prints, after `argv[2]` seconds or SIGINT, how many datagrams on UDP port
/// `argv[1]` arrived and how many came after one with a higher sequence number
/// (a big-endian u64 at payload offset 8, where meshnet has its counter).
const REORDER_RX: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(2.0)
print("listening", flush=True)
n = late = 0; hi = -1
while True:
    try: b, _ = s.recvfrom(65536)
    except socket.timeout:
        if n: break
        continue
    seq = struct.unpack_from("!Q", b, 8)[0]; n += 1
    if seq < hi: late += 1
    else: hi = seq
print("received", n, "late", late, flush=True)
"#;

/// Sends `argv[3]` datagrams of `argv[4]` bytes to `argv[1]`:`argv[2]`, each
/// with its sequence number at offset 8, as fast as it can.
const REORDER_TX: &str = r#"
import socket, struct, sys
dst, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pad = b"\0" * (size - 16)
for i in range(count):
    s.sendto(struct.pack("!QQ", 0, i) + pad, (dst, port))
"#;

/// Watches `argv[1]` (AF_PACKET) for incoming meshnet data datagrams (UDP
/// 6783, kind 1) until SIGINT, and prints how many it saw and how many had a
/// lower counter than one seen before under the same receiver index.
const SNIFF: &str = r#"
import signal, socket, struct, sys
stop = False
def on_int(*_):
    global stop; stop = True
signal.signal(signal.SIGINT, on_int)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[1], 0)); s.settimeout(0.2)
print("listening", flush=True)
n = late = 0; hi = {}
while not stop:
    try: f, addr = s.recvfrom(65535)
    except (socket.timeout, InterruptedError): continue
    if addr[2] == socket.PACKET_OUTGOING or len(f) < 14 + 20 + 8 + 16: continue
    ihl = (f[14] & 15) * 4; u = 14 + ihl
    if f[23] != 17 or struct.unpack_from("!H", f, u + 2)[0] != 6783 or f[u + 8] != 1: continue
    idx, ctr = struct.unpack_from("!IQ", f, u + 8 + 4); n += 1
    if ctr < hi.get(idx, -1): late += 1
    else: hi[idx] = ctr
print("seen", n, "late", late, flush=True)
"#;

/// `"received N late M"`-style output: the numbers after `a` and `b`.
fn two_counts(out: &str, a: &str, b: &str) -> (u64, u64) {
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or(0)
    };
    (after(a), after(b))
}

/// How the underlay of `h` reorders, without netem (not in this kernel, nor
/// `prio`, `fq`, `sfq`, the `fw` classifier or u32's `mark` match; `htb`,
/// `tbf`, `u32` and iptables' `CLASSIFY` are there):
///
/// - an HTB root on `eth0` with one parent class of 60 Mbit/s (a bottleneck,
///   so a queue forms) and two leaves: 1:10 (prio 0, the default) and 1:20
///   (prio 7, guaranteed only 1 Mbit/s, may borrow up to the whole 60);
/// - `iptables -t mangle -A OUTPUT -p udp --dport 6783 -m statistic --mode
///   random --probability 0.02 -j CLASSIFY --set-class 1:20` puts 2 % of the
///   router's sends in the low-priority leaf (HTB takes `skb->priority` as the
///   class when it names one of its leaves).
///
/// While there is a queue, HTB serves 1:10 first, so the datagrams in 1:20
/// wait while later ones overtake them: reordered by up to the queue's depth
/// (bfifo, 200 KB ≈ 27 ms). A whole GSO send is one skb there, so it is
/// delayed as a block; it is cut into datagrams after the qdisc.
///
/// Loss: `INPUT -p udp --dport 6783 -m statistic --probability 0.02 -j DROP`
/// on each host, judging each datagram (see [`wire_like`]).
///
/// Slow: 50 MB take about 50 s, not because of the reordering (alone it
/// costs nothing: 51 of 52 Mbit/s) but because a lost datagram loses the
/// whole superframe it is a chunk of (~45 datagrams of a 64 KB TSO unit), so
/// 2 % datagram loss is ~60 % unit loss for the container's TCP: about 5–10
/// Mbit/s, where plain TCP over the same lossy underlay makes ~300 and meshnet
/// with TSO off in the container ~460.
fn lossy_reordering_underlay(h: &Host) {
    wire_like(h);
    let ns = h.ns.as_str();
    tc(
        ns,
        &[
            "qdisc",
            "add",
            "dev",
            UNDERLAY_IF,
            "root",
            "handle",
            "1:",
            "htb",
            "default",
            "10",
        ],
    );
    tc(
        ns,
        &[
            "class",
            "add",
            "dev",
            UNDERLAY_IF,
            "parent",
            "1:",
            "classid",
            "1:1",
            "htb",
            "rate",
            "60mbit",
            "ceil",
            "60mbit",
        ],
    );
    tc(
        ns,
        &[
            "class",
            "add",
            "dev",
            UNDERLAY_IF,
            "parent",
            "1:1",
            "classid",
            "1:10",
            "htb",
            "rate",
            "59mbit",
            "ceil",
            "60mbit",
            "prio",
            "0",
        ],
    );
    tc(
        ns,
        &[
            "class",
            "add",
            "dev",
            UNDERLAY_IF,
            "parent",
            "1:1",
            "classid",
            "1:20",
            "htb",
            "rate",
            "1mbit",
            "ceil",
            "60mbit",
            "prio",
            "7",
        ],
    );
    for leaf in ["10", "20"] {
        tc(
            ns,
            &[
                "qdisc",
                "add",
                "dev",
                UNDERLAY_IF,
                "parent",
                &format!("1:{leaf}"),
                "handle",
                &format!("{leaf}:"),
                "bfifo",
                "limit",
                "200000",
            ],
        );
    }
    ipt(
        ns,
        &[
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            "6783",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.02",
            "-j",
            "CLASSIFY",
            "--set-class",
            "1:20",
        ],
    );
    ipt(
        ns,
        &[
            "-A",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            "6783",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.02",
            "-j",
            "DROP",
        ],
    );
}

/// Sends 20 000 numbered datagrams from `from` to `to`'s UDP 6783 (before the
/// routers run) and returns (received, late).
#[track_caller]
fn probe_reordering(lab: &Lab, from: &Host, to: &Host) -> (u64, u64) {
    let mut rx = lab.spawn_in(&to.ns, &["python3", "-c", REORDER_RX, "6783"]);
    assert!(
        wait_until(SECS(10), || rx.stdout().contains("listening")),
        "probe receiver: {}",
        rx.stderr()
    );
    exec_in(
        &from.ns,
        &["python3", "-c", REORDER_TX, &to.ip, "6783", "20000", "1200"],
    )
    .expect_ok("probe sender");
    assert!(rx.wait(SECS(20)), "probe receiver did not finish");
    two_counts(&rx.stdout(), "received", "late")
}

#[test]
fn transfer_survives_loss_and_reordering() {
    let Some(lab) = Lab::new("lossreorder") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    lossy_reordering_underlay(&h1);
    lossy_reordering_underlay(&h2);
    // The underlay reorders, in both directions: checked before the routers run.
    for (a, b) in [(&h1, &h2), (&h2, &h1)] {
        let (n, late) = probe_reordering(&lab, a, b);
        eprintln!(
            "probe {} -> {}: {n} of 20000 datagrams arrived, {late} out of order",
            a.ns, b.ns
        );
        assert!(
            n > 1000,
            "the probe datagrams {} -> {} did not arrive ({n})",
            a.ns,
            b.ns
        );
        assert!(
            late > 0,
            "the underlay {} -> {} does not reorder",
            a.ns,
            b.ns
        );
    }

    let (c1, c2) = launch_pair(&lab, &h1, &h2);
    assert!(
        ping_until(&c1.ns, &overlay(2), SECS(30)),
        "c1 cannot reach c2"
    );

    let mut sniff = lab.spawn_in(&h2.ns, &["python3", "-c", SNIFF, UNDERLAY_IF]);
    assert!(
        wait_until(SECS(10), || sniff.stdout().contains("listening")),
        "sniffer: {}",
        sniff.stderr()
    );
    let lost_before = rule_packets(&h2.ns, "filter", "INPUT", "statistic");
    transfer(&lab, &c1, &c2, 50 << 20, SECS(240));
    sniff.stop(libc::SIGINT);
    let (seen, late) = two_counts(&sniff.stdout(), "seen", "late");
    let lost = rule_packets(&h2.ns, "filter", "INPUT", "statistic") - lost_before;
    let slow = rule_packets(&h1.ns, "mangle", "OUTPUT", "CLASSIFY");
    eprintln!(
        "during the transfer: h2 saw {seen} meshnet datagrams from h1, {late} out of order; \
         {lost} dropped on h2's INPUT; {slow} of h1's sends held back in the low-priority class"
    );
    assert!(lost > 50, "the loss rule dropped only {lost} datagrams");
    assert!(late > 0, "meshnet's datagrams were not reordered during the transfer ({seen} seen): the test tested nothing");
}
