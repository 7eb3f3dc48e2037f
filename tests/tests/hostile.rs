//! A hostile member in namespaces: a host that knows the password speaks the
//! protocol through `proto` (meshnet_tests::hostile) with forged fields, and the
//! real routers must refuse it without disturbing the victim.
//!
//! Each test: two routers (h1, h2) with a container each; the attacker runs in
//! its own namespace (h9, no router). During and after the attack the victim's
//! pings and a checked transfer work, routes (and IPAM) stay as they were, and
//! the counter for the rejection moves. Where the attacker holds a connection,
//! it is an honest member in everything it does not forge (its own signed
//! entry, UDP heartbeats answered), so the router floods broadcasts to it: it
//! decrypts everything it is sent, and a broadcast from c1 must be among it
//! while nothing meant for the victim is. A capture on its host records what
//! crossed the wire.
//!
//! Scenarios: claiming a live peer's name (four ways); a name reused with
//! another key; forged topology gossip (u64::MAX, invented links, stolen or bad
//! bindings and signatures); IPAM forgeries (Paxos records and values, a round
//! jump, ring entries, space and claim requests in the victim's name, a
//! squatted binding); data-plane frames claiming another origin (h2's
//! broadcasts and unicasts, h1's own, an unknown peer's), which would poison
//! c1's ARP table and h1's MAC table if believed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshnet_proto::ingress::MAX_TTL;
use meshnet_proto::ipam::forge;
use meshnet_proto::ipam::paxos::Ballot;
use meshnet_proto::ipam::ring::Entry;
use meshnet_proto::ipam::Cidr;
use meshnet_proto::topology::{ConnInfo, SignedPeerInfo};
use meshnet_proto::wire::control::ControlMsg;
use meshnet_proto::wire::datagram::InnerHeader;
use meshnet_proto::PeerName;
use meshnet_tests::hostile::{forge_seal, in_netns, ipam_of, Member, Session};
use meshnet_tests::lab::*;
use serde_json::Value;

const PW: &str = "hostile-secret";
/// A name nobody has, forged by the attacker.
const NEWCOMER: PeerName = PeerName(0x02_00_00_00_99_01);

fn overlay(j: u8) -> String {
    format!("10.44.0.{j}")
}

struct Mesh2 {
    h1: Host,
    h2: Host,
    n1: PeerName,
    n2: PeerName,
    c1: Container,
}

/// h1 and h2 with a password, a container on each, data flowing c1 -> c2.
fn launch(lab: &Lab) -> Mesh2 {
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let n1 = h1.launch(&["--password", PW]);
    let n2 = h2.launch(&["--password", PW, &h1.ip]);
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", &format!("{}/16", overlay(1)), &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", &format!("{}/16", overlay(2)), &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c1.ns, &overlay(2), Duration::from_secs(30)), "c1 cannot reach c2 before the attack");
    let _ = c2;
    Mesh2 { h1, h2, n1: n1.parse().unwrap(), n2: n2.parse().unwrap(), c1 }
}

/// The victim's traffic still works: pings and a checked transfer c1 -> c2.
fn victim_still_works(lab: &Lab, m: &Mesh2) {
    assert!(ping(&m.c1.ns, &overlay(2), 3), "c1 -> c2 pings fail after the attack");
    let c2 = format!("{}c2", lab.prefix);
    checked_transfer(lab, &m.c1.ns, &c2, &overlay(2), 20 << 20, Duration::from_secs(60));
}

fn trust(h: &Host) -> Value {
    h.status_json()["trust"].clone()
}

fn counter(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// h1's view of h2: route and h2's entry (connections listed).
fn view_of(h: &Host, peer: PeerName) -> (String, Value) {
    let s = h.status_json();
    let route = connections(&s)
        .into_iter()
        .find(|c| c["peer"].as_str() == Some(&peer.to_string()))
        .map(|c| format!("{} {}", c["state"], c["route"]))
        .unwrap_or_default();
    let entry = s["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"].as_str() == Some(&peer.to_string()))
        .cloned()
        .unwrap_or(Value::Null);
    (route, entry)
}

fn addr(h: &Host) -> SocketAddr {
    h.addr().parse().unwrap()
}

#[test]
fn a_member_claiming_a_live_peers_name_is_refused() {
    let Some(lab) = Lab::new("hostile_name") else { return };
    let m = launch(&lab);
    let attacker = lab.add_host(9);
    let before = trust(&m.h1);
    let view_before = view_of(&m.h1, m.n2);
    let (h1, h2, n1, n2) = (addr(&m.h1), addr(&m.h2), m.n1, m.n2);
    let member = std::sync::Arc::new(Member::new(Some(PW)));

    // Learn the victim's real binding from an honest connection to it (which h2
    // accepts, and sends heartbeats to until it closes).
    let honest_member = member.clone();
    let victim_binding = in_netns(&attacker.ns, move || {
        let member = honest_member;
        let mut honest = member.connect(h2, member.hello(member.name(), member.binding(member.name()), 0)).unwrap();
        drop(honest.recv_for(Duration::from_millis(300)));
        honest.router().binding.clone()
    });
    assert_eq!(victim_binding.name, n2);
    std::thread::sleep(Duration::from_secs(1));
    // Everything that reaches the attacker's host from now to the end of the victim's transfer.
    let capture = lab.capture(&attacker.ns, UNDERLAY_IF);

    let (outcomes, datagrams) = in_netns(&attacker.ns, move || {
        let mut outcomes = Vec::new();
        let mut sessions = Vec::new();
        for (router, binding, what) in [
            // Its own key, bound (by itself) to the victim's name: the key book has the victim's key.
            (h1, member.binding(n2), "own binding for the victim's name at h1"),
            (h2, member.binding(n2), "own binding for the victim's name at the victim"),
            // The victim's own binding, replayed: the handshake proved another key.
            (h1, victim_binding.clone(), "replayed binding at h1"),
            // Its own honest binding, but the Hello claims the victim's name.
            (h1, member.binding(member.name()), "mismatched name at h1"),
        ] {
            let mut s = member.connect(router, member.hello(n2, binding, 0)).unwrap();
            let msgs = s.recv_for(Duration::from_secs(3));
            outcomes.push((what, msgs, s.closed()));
            sessions.push(s);
        }
        // Give the routers time to send anything they would (data, heartbeats) to the impostor.
        std::thread::sleep(Duration::from_secs(3));
        let datagrams: usize = sessions.iter_mut().map(|s| s.udp_datagrams()).sum();
        (outcomes, datagrams)
    });
    for (what, msgs, closed) in &outcomes {
        assert!(closed, "{what}: the router kept the connection: {msgs:?}");
        assert_eq!(msgs.len(), 1, "{what}: the router said more than goodbye: {msgs:?}");
        let ControlMsg::Goodbye(why) = &msgs[0] else { panic!("{what}: {msgs:?}") };
        assert!(why.starts_with("identity refused by"), "{what}: {why}");
        assert!(why.contains(&n2.to_string()), "{what}: the reason does not name the claimed peer: {why}");
        assert!(
            why.contains(&n1.to_string()) || why.contains(&n2.to_string()),
            "{what}: the reason does not name the refusing peer: {why}"
        );
        eprintln!("{what}: {why}");
    }
    assert_eq!(datagrams, 0, "UDP datagrams reached the impostor");

    // Counted and shown, logged naming both peers.
    let after = trust(&m.h1);
    assert!(
        counter(&after, &["refused_identities"]) >= counter(&before, &["refused_identities"]) + 3,
        "{after}"
    );
    let recent = after["recent_refusals"].as_array().cloned().unwrap_or_default();
    assert!(recent.iter().any(|r| r["address"].as_str().is_some_and(|a| a.starts_with(&attacker.ip))), "{after}");
    assert!(counter(&trust(&m.h2), &["refused_identities"]) >= 1);
    let log = m.h1.log();
    assert!(
        log.lines().any(|l| l.contains("refused the connection") && l.contains(&n1.to_string()) && l.contains(&n2.to_string())),
        "h1's log does not name both peers"
    );
    let text = m.h1.meshnet(&["status"]).expect_ok("status").stdout;
    assert!(text.contains("Identities:") && text.contains(&attacker.ip), "status does not show the refusal: {text}");

    // The victim is untouched.
    assert_eq!(view_of(&m.h1, m.n2).0, view_before.0, "h1's route to the victim changed");
    victim_still_works(&lab, &m);
    let pcap = capture.stop();
    let tcp = pcap.count(6, 6783);
    assert!(tcp > 0, "the capture saw none of the attacker's own control connections");
    assert_eq!(pcap.count(17, 6783), 0, "data-plane datagrams reached the attacker's host");
    eprintln!("attacker's capture: {tcp} control segments, no data-plane datagrams");
}

#[test]
fn a_router_reusing_a_name_with_another_key_is_refused_until_rmpeer() {
    let Some(lab) = Lab::new("hostile_rename") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let h3 = lab.add_host(3);
    let name = "02:00:00:00:aa:02";
    let n1 = h1.launch(&["--password", PW]);
    h2.launch(&["--password", PW, "--name", name, &h1.ip]);
    assert!(wait_until(Duration::from_secs(20), || established_with(&h1.status_json(), name)));
    // A second router claims the same name with its own key.
    h3.launch(&["--password", PW, "--name", name, &h1.ip]);
    assert!(
        wait_until(Duration::from_secs(20), || counter(&trust(&h3), &["refused_by_peers"]) >= 1),
        "h3 never heard it was refused: {}",
        trust(&h3)
    );
    assert!(counter(&trust(&h1), &["refused_identities"]) >= 1);
    // Both sides logged it, naming both peers.
    assert!(h1.log().lines().any(|l| l.contains("refused the connection") && l.contains(&n1) && l.contains(name)));
    assert!(h3.log().lines().any(|l| l.contains("refused our identity") && l.contains(&n1) && l.contains(name)));
    // h2 keeps its connection.
    assert!(established_with(&h1.status_json(), name));

    // h2's host is "reinstalled": it goes away, and h3 (a new key) takes the name once
    // the old identity is removed from h1.
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert!(wait_until(Duration::from_secs(20), || !established_with(&h1.status_json(), name)));
    assert!(
        wait_until(Duration::from_secs(20), || h1.meshnet(&["rmpeer", name]).ok()),
        "rmpeer failed: {}",
        h1.meshnet(&["rmpeer", name])
    );
    h3.meshnet(&["connect", &h1.ip]).expect_ok("connect");
    assert!(
        wait_until(Duration::from_secs(90), || established_with(&h1.status_json(), name)),
        "the reinstalled host did not rejoin after rmpeer"
    );
    // The new pin is persisted.
    let keys = std::fs::read_to_string(h1.state_dir.join("keys.json")).unwrap();
    assert!(keys.contains("pinned"), "{keys}");
}

#[test]
fn forged_gossip_is_dropped_and_counted() {
    let Some(lab) = Lab::new("hostile_gossip") else { return };
    let m = launch(&lab);
    let attacker = lab.add_host(9);
    let before = trust(&m.h1);
    let view_before = view_of(&m.h1, m.n2);
    let (h1, n1, n2) = (addr(&m.h1), m.n1, m.n2);

    let capture = lab.capture(&attacker.ns, UNDERLAY_IF);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let (done_tx, done) = std::sync::mpsc::channel();
    let ns = attacker.ns.clone();
    let attack = std::thread::spawn(move || in_netns(&ns, move || {
        let member = Member::new(Some(PW));
        let mut s = member.connect(h1, member.hello(member.name(), member.binding(member.name()), 0)).unwrap();
        s.gossip(vec![member.own_entry(1, n1, h1)]).unwrap();
        s.keep_link_up();
        // The router tells a new connection everything, signed.
        let gossip: Vec<SignedPeerInfo> = s
            .recv_for(Duration::from_secs(2))
            .into_iter()
            .filter_map(|m| match m {
                ControlMsg::Gossip(g) => Some(g),
                _ => None,
            })
            .flatten()
            .collect();
        let real = gossip.iter().find(|e| e.info.name == n2).expect("h1 gossiped h2's entry").clone();
        assert!(real.seal.signs(&real.info), "h2's entry as gossiped verifies");
        let invented = |mut info: meshnet_proto::topology::PeerInfo| {
            info.connections = vec![ConnInfo {
                peer: member.name(),
                addr: "10.250.0.9:6783".parse().unwrap(),
                outbound: true,
                established: true,
            }];
            info
        };
        // (b) h2's entry at version u64::MAX with invented links, re-signed by the attacker
        // under h2's binding; the same at the next version; and under the attacker's own
        // binding for h2's name.
        let mut max = invented(real.info.clone());
        max.version = u64::MAX;
        let mut next = invented(real.info.clone());
        next.version = real.info.version + 1;
        let forged = vec![
            member.seal(max, &real.seal.binding),
            member.seal(next.clone(), &real.seal.binding),
            member.seal(next, &member.binding(n2)),
        ];
        s.gossip(forged).unwrap();
        // (c) a brand-new name: a bad signature under its own (valid) binding, and a bad binding.
        let newcomer = NEWCOMER;
        let mut info = invented(real.info.clone());
        info.name = newcomer;
        info.version = 1;
        let bad_sig = forge_seal(info.clone(), &member.binding(newcomer));
        let mut bad_binding = member.seal(info, &member.binding(newcomer));
        bad_binding.seal.binding.sig.0[0] ^= 1;
        s.gossip(vec![bad_sig, bad_binding]).unwrap();
        // The connection stays up: the router keeps talking (heartbeats every 10 s).
        let heard = s.recv_for(Duration::from_secs(12));
        done_tx.send((!s.closed(), heard.len())).unwrap();
        // Listening on, while the victim's traffic flows.
        (listen_until(s, &stop2), member.name())
    }));
    let (stayed_up, heard) = done.recv_timeout(Duration::from_secs(60)).expect("the attacker stopped");
    assert!(stayed_up, "h1 closed the connection that relayed forged gossip");
    assert!(heard >= 1, "h1 went silent on the attacker's connection");

    let after = trust(&m.h1);
    let moved = |k: &str| counter(&after, &["gossip_rejected", k]) - counter(&before, &["gossip_rejected", k]);
    assert_eq!(moved("version"), 1, "{after}");
    assert!(moved("bad_signature") >= 2, "{after}");
    assert_eq!(moved("key_conflict"), 1, "{after}");
    assert_eq!(moved("bad_binding"), 1, "{after}");
    let peers = peer_names(&m.h1.status_json());
    assert!(!peers.contains(&NEWCOMER.to_string()), "{peers:?}");
    // h2's entry and the route to it are as they were.
    assert_eq!(view_of(&m.h1, m.n2), view_before, "h1's view of h2 changed");
    victim_still_works(&lab, &m);
    broadcast_ping(&m.c1.ns, "10.44.255.255");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (heard, _) = attack.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    let c2 = format!("{}c2", lab.prefix);
    check_heard(&heard, &capture.stop(), mac_of(&m.c1.ns), mac_of(&c2), overlay(2).parse().unwrap());
}

#[test]
fn a_corrupt_key_book_or_name_zero_stops_the_launch() {
    let Some(lab) = Lab::new("hostile_keys") else { return };
    let h1 = lab.add_host(1);
    let zero = h1.meshnet(&["launch", "--name", "00:00:00:00:00:00"]);
    assert!(!zero.ok(), "launch with name 0 succeeded: {zero}");
    assert!(zero.all().contains("--name"), "{zero}");
    h1.launch(&[]);
    h1.meshnet(&["stop"]).expect_ok("stop");
    assert!(wait_until(Duration::from_secs(10), || h1.pids().is_empty()));
    let keys = h1.state_dir.join("keys.json");
    let saved = std::fs::read_to_string(&keys).expect("keys.json written");
    assert!(saved.contains("pinned"), "{saved}");
    std::fs::write(&keys, "{ truncated").unwrap();
    let out = h1.meshnet(&["launch"]);
    assert!(!out.ok(), "launch with a corrupt key book succeeded: {out}");
    assert!(out.all().contains("keys.json is corrupt"), "{out}");
    assert_eq!(std::fs::read_to_string(&keys).unwrap(), "{ truncated", "the corrupt file was replaced");
    assert!(wait_until(Duration::from_secs(5), || h1.pids().is_empty()), "a router runs after the failed launch");
}

/// The MAC address of `ethwe` in a container.
fn mac_of(ns: &str) -> [u8; 6] {
    let l = link(ns, "ethwe").unwrap_or_else(|| panic!("no ethwe in {ns}"));
    let s = l["address"].as_str().unwrap_or_default().to_string();
    let b: Vec<u8> = s.split(':').map(|x| u8::from_str_radix(x, 16).unwrap()).collect();
    b.try_into().unwrap_or_else(|_| panic!("bad MAC {s}"))
}

/// An ARP reply frame from `src` to `dst`: "`ip` is at `at`".
fn arp_reply(dst: [u8; 6], src: [u8; 6], at: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&at);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// Frames the router sealed to the attacker that were meant for the victim: unicast
/// to its MAC, or IPv4 to its address.
fn meant_for(frames: &[(InnerHeader, Vec<u8>)], mac: [u8; 6], ip: Ipv4Addr) -> usize {
    frames
        .iter()
        .filter(|(_, f)| f.len() >= 34 && (f[..6] == mac || (f[12..14] == [8, 0] && f[30..34] == ip.octets())))
        .count()
}

/// Broadcast frames from `mac` among `frames`.
fn broadcasts_from(frames: &[(InnerHeader, Vec<u8>)], mac: [u8; 6]) -> usize {
    frames.iter().filter(|(_, f)| f.len() >= 14 && f[..6] == [0xff; 6] && f[6..12] == mac).count()
}

/// Pings the broadcast address `bcast` from `ns` (Ethernet broadcasts that every
/// member of the overlay receives; replies are not needed).
fn broadcast_ping(ns: &str, bcast: &str) {
    let _ = exec_in(ns, &["ping", "-b", "-c", "3", "-i", "0.2", "-W", "1", bcast]);
}

/// What the attacker heard while it listened, checked: c1's broadcast among it
/// (so its view of the data plane is real) and nothing meant for the victim
/// (`mac`, `ip`); printed with the capture's count.
fn check_heard(heard: &Heard, pcap: &Pcap, c1_mac: [u8; 6], mac: [u8; 6], ip: Ipv4Addr) {
    let broadcasts = broadcasts_from(&heard.frames, c1_mac);
    assert!(broadcasts >= 1, "c1's broadcast did not reach the attacker: {} frames", heard.frames.len());
    assert_eq!(meant_for(&heard.frames, mac, ip), 0, "frames meant for the victim ({ip}) reached the attacker");
    eprintln!(
        "attacker: {} datagrams on its port ({} UDP packets from or to 6783 in the capture), {} authenticated heartbeats, \
         {} frames decrypted ({broadcasts} broadcasts from c1), none for {ip}",
        heard.datagrams,
        pcap.count(17, 6783),
        heard.heartbeats,
        heard.frames.len(),
    );
}

/// Counters of h's data plane (`status --json`, "dataplane").
fn dataplane(h: &Host) -> Value {
    h.status_json()["dataplane"].clone()
}

/// What the attacker saw on its data-plane port while it ran.
struct Heard {
    datagrams: usize,
    heartbeats: u64,
    frames: Vec<(InnerHeader, Vec<u8>)>,
    closed: bool,
}

/// Keeps `s` reading (answering heartbeats, decrypting datagrams) until `stop`.
fn listen_until(mut s: Session, stop: &AtomicBool) -> Heard {
    let mut datagrams = 0;
    while !stop.load(Ordering::Relaxed) && !s.closed() {
        s.recv_for(Duration::from_millis(200));
        datagrams += s.udp_datagrams();
    }
    datagrams += s.udp_datagrams();
    Heard { datagrams, heartbeats: s.heartbeats(), frames: std::mem::take(&mut s.frames), closed: s.closed() }
}

#[test]
fn frames_with_a_forged_origin_are_refused() {
    let Some(lab) = Lab::new("hostile_origin") else { return };
    let m = launch(&lab);
    let attacker = lab.add_host(9);
    let c2_ns = format!("{}c2", lab.prefix);
    let (c1_mac, c2_mac) = (mac_of(&m.c1.ns), mac_of(&c2_ns));
    let (c1_ip, c2_ip): (Ipv4Addr, Ipv4Addr) = (overlay(1).parse().unwrap(), overlay(2).parse().unwrap());
    let evil_mac = [0x02, 0x66, 0x66, 0x66, 0x66, 0x09];
    let (h1, n1, n2) = (addr(&m.h1), m.n1, m.n2);
    let view_before = view_of(&m.h1, m.n2);
    let before = dataplane(&m.h1);
    let capture = lab.capture(&attacker.ns, UNDERLAY_IF);

    // An honest connection to h1 under the attacker's own name gives it real data
    // keys; every frame it then sends claims someone else's origin.
    const ROUNDS: u64 = 20;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let ns = attacker.ns.clone();
    let stop2 = stop.clone();
    let member = Member::new(Some(PW));
    let me = member.name();
    let go = Arc::new(AtomicBool::new(false));
    let go2 = go.clone();
    let attack = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let mut s = member.connect(h1, member.hello(me, member.binding(me), 0)).unwrap();
            // As an honest member: its own signed entry, heartbeats answered, until h1
            // lists it as established (the main thread watches).
            s.gossip(vec![member.own_entry(1, n1, h1)]).unwrap();
        s.keep_link_up();
            s.keep_link_up();
            while !go2.load(Ordering::Relaxed) && !s.closed() {
                s.recv_for(Duration::from_millis(200));
            }
            let unknown = PeerName(0x02_00_00_00_99_02);
            let hdr = |src, broadcast| InnerHeader {
                ttl: MAX_TTL - 1,
                broadcast,
                src,
                dst: if broadcast { PeerName::BROADCAST } else { n1 },
            };
            let cases = [
                // h2's gratuitous ARP: "c2's address is at the attacker's MAC", to everyone.
                (hdr(n2, true), arp_reply([0xff; 6], evil_mac, evil_mac, c2_ip)),
                // From c2's MAC to c1, in h2's name: "c2's address is at the attacker's MAC".
                (hdr(n2, false), arp_reply(c1_mac, c2_mac, evil_mac, c2_ip)),
                // h1's own broadcast, coming back from outside.
                (hdr(n1, true), arp_reply([0xff; 6], c2_mac, evil_mac, c2_ip)),
                // A peer nobody knows, to c1 from c2's MAC.
                (hdr(unknown, false), arp_reply(c1_mac, c2_mac, evil_mac, c2_ip)),
            ];
            for _ in 0..ROUNDS {
                for (h, f) in &cases {
                    s.send_frame(*h, f).unwrap();
                }
                s.recv_for(Duration::from_millis(100));
            }
            sent_tx.send(()).unwrap();
            listen_until(s, &stop2)
        })
    });
    assert!(
        wait_until(Duration::from_secs(20), || established_with(&m.h1.status_json(), &me.to_string())),
        "h1 never took the attacker's connection as established"
    );
    go.store(true, Ordering::Relaxed);
    sent_rx.recv_timeout(Duration::from_secs(60)).expect("the attacker did not finish sending");
    let moved = |after: &Value, k: &str| counter(after, &[k]) - counter(&before, &[k]);
    let mut after = Value::Null;
    let all_counted = wait_until(Duration::from_secs(5), || {
        after = dataplane(&m.h1);
        ["refused_broadcast_not_parent", "refused_not_on_path", "refused_origin_is_me", "refused_unknown_origin"]
            .iter()
            .all(|k| moved(&after, k) >= ROUNDS)
    });
    assert!(all_counted, "refusals not counted ({ROUNDS} of each sent): before {before}, after {after}");
    eprintln!(
        "h1 refused: not parent {}, not on path {}, origin is me {}, unknown origin {}",
        moved(&after, "refused_broadcast_not_parent"),
        moved(&after, "refused_not_on_path"),
        moved(&after, "refused_origin_is_me"),
        moved(&after, "refused_unknown_origin")
    );
    // c1 still maps c2's address to c2's MAC (no forged ARP reached it).
    let neigh = exec_in(&m.c1.ns, &["ip", "neigh", "show", &c2_ip.to_string()]).stdout;
    let evil = "02:66:66:66:66:09";
    assert!(!neigh.contains(evil), "c1 learned the attacker's MAC for c2: {neigh}");

    // The victim's traffic flows while the attacker listens; none of it reaches the attacker.
    assert_eq!(view_of(&m.h1, m.n2).0, view_before.0, "h1's route to h2 changed");
    victim_still_works(&lab, &m);
    // A broadcast from c1 reaches the attacker, as it reaches every member: its
    // view of the data plane is real.
    broadcast_ping(&m.c1.ns, "10.44.255.255");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let heard = attack.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert_eq!(meant_for(&heard.frames, c1_mac, c1_ip), 0, "frames meant for c1 reached the attacker");
    let neigh = exec_in(&m.c1.ns, &["ip", "neigh", "show", &c2_ip.to_string()]).stdout;
    assert!(!neigh.contains(evil), "c1 learned the attacker's MAC for c2: {neigh}");
    check_heard(&heard, &capture.stop(), c1_mac, c2_mac, c2_ip);
}

/// An IPAM forgery, built and signed by the attacker (see `forge`).
enum Forgery {
    /// Paxos: a prepare of h2's ballot.
    PaxosAsH2,
    /// Paxos: an accept request for h2's ballot with a value of the attacker's making.
    PaxosOwnValue,
    /// Paxos: the attacker's own prepare jumping rounds towards the bound.
    PaxosJump,
    /// "Send me your full state" (honest: how the attacker learns the ring).
    Sync,
    /// A ring entry; its proof claims to be by `by` (signed by the attacker whoever `by` is).
    Entry { ring_id: u64, start: u128, entry: Entry, by: PeerName },
    /// A space request from h2 to h1; `squat`: carrying a binding of h2's name to the attacker's key.
    SpaceAsH2 { squat: bool },
    /// A claim of `ip` from h2 to h1.
    ClaimAsH2 { ip: u128 },
}

struct Forger {
    member: Member,
    universe: Cidr,
    n1: PeerName,
    n2: PeerName,
}

impl Forger {
    fn build(&self, f: &Forgery) -> Vec<u8> {
        let (u, me, n1, n2) = (self.universe, self.member.name(), self.n1, self.n2);
        let key = &self.member.signer;
        let own = vec![self.member.binding(me)];
        let high = Ballot { round: 1000, proposer: n2 };
        match *f {
            Forgery::PaxosAsH2 => forge::prepare(u, me, 2, high, key, own),
            Forgery::PaxosOwnValue => forge::accept(u, me, n1, high, vec![me], key, key, own),
            Forgery::PaxosJump => forge::prepare(u, me, 2, Ballot { round: 1 << 40, proposer: me }, key, own),
            Forgery::Sync => forge::sync_request(u, me, n1, key, own),
            Forgery::Entry { ring_id, start, entry, by } => forge::entries(u, me, ring_id, vec![(start, entry)], by, key, key, own),
            Forgery::SpaceAsH2 { squat } => {
                forge::space_request(u, n2, n1, u, key, if squat { vec![self.member.binding(n2)] } else { vec![] })
            }
            Forgery::ClaimAsH2 { ip } => forge::claim_request(u, n2, n1, ip, key, vec![]),
        }
    }
}

#[test]
fn forged_ipam_records_are_dropped_and_counted() {
    let Some(lab) = Lab::new("hostile_ipam") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let n1: PeerName = h1.launch(&["--password", PW, "--ipalloc-init", "consensus=2"]).parse().unwrap();
    let n2: PeerName = h2.launch(&["--password", PW, "--ipalloc-init", "consensus=2", &h1.ip]).parse().unwrap();
    assert!(wait_until(Duration::from_secs(20), || established_with(&h1.status_json(), &n2.to_string())));
    let attacker = lab.add_host(9);
    let universe: Cidr = "10.32.0.0/12".parse().unwrap();
    let drops = |h: &Host| h.status_json()["ipam"]["drops"].clone();
    let ipam = |h: &Host| h.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    let moved = |a: &Value, b: &Value, k: &str| counter(b, &[k]) - counter(a, &[k]);
    let capture = lab.capture(&attacker.ns, UNDERLAY_IF);
    let h1a = addr(&h1);
    let forger = Forger { member: Member::new(Some(PW)), universe, n1, n2 };
    let me = forger.member.name();

    // The attacker, a member with an honest connection to h1, stays connected
    // throughout: it sends what the test asks for and reports h1's IPAM messages.
    let (to_attacker, commands) = std::sync::mpsc::channel::<Vec<Forgery>>();
    let (results_tx, results) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
    let ns = attacker.ns.clone();
    let attack = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let m = &forger.member;
            let mut s = m.connect(h1a, m.hello(me, m.binding(me), 0)).unwrap();
            s.gossip(vec![m.own_entry(1, n1, h1a)]).unwrap();
            s.keep_link_up();
            let mut datagrams = 0;
            loop {
                let cmds = match commands.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) if c.is_empty() => break,
                    Ok(c) => c,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        // An honest member keeps its link alive meanwhile.
                        s.recv_for(Duration::from_millis(100));
                        continue;
                    }
                    Err(_) => break,
                };
                for f in &cmds {
                    s.send_ipam(forger.build(f)).unwrap();
                }
                let said = s.recv_for(Duration::from_secs(3));
                datagrams += s.udp_datagrams();
                results_tx.send(ipam_of(&said).into_iter().map(|b| b.to_vec()).collect()).unwrap();
            }
            let stop = AtomicBool::new(true);
            let mut heard = listen_until(s, &stop);
            heard.datagrams += datagrams;
            heard
        })
    });
    let ask = |cmds: Vec<Forgery>| -> Vec<Vec<u8>> {
        to_attacker.send(cmds).unwrap();
        results.recv_timeout(Duration::from_secs(60)).expect("the attacker stopped")
    };

    // 1. Before any allocation (consensus not started): Paxos records in h2's
    //    name, a value nobody proposed, a round jump towards the bound.
    let d0 = drops(&h1);
    ask(vec![Forgery::PaxosAsH2, Forgery::PaxosOwnValue, Forgery::PaxosJump]);
    let d1 = drops(&h1);
    eprintln!("h1's IPAM drops after the Paxos forgeries: {d1}");
    assert!(moved(&d0, &d1, "forged_paxos_records") >= 2, "before {d0}, after {d1}");
    assert!(moved(&d0, &d1, "forged_paxos_values") >= 1, "before {d0}, after {d1}");
    assert!(moved(&d0, &d1, "paxos_round_jumps") >= 1, "before {d0}, after {d1}");
    for h in [&h1, &h2] {
        let v = ipam(h);
        assert_eq!(v["state"]["agreed"], false, "{} agreed on a ring after forged Paxos: {v}", h.ns);
    }

    // The real peers then agree, on themselves only.
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    let attach = |h: &Host, c: &Container| -> Ipv4Addr {
        let out = h.meshnet_full(&["attach", &c.ns], &[], Duration::from_secs(60)).expect_ok("attach");
        let a = out.last_line().unwrap_or_default().trim().to_string();
        a.split('/').next().unwrap().parse().unwrap_or_else(|e| panic!("attach printed {a:?}: {e}"))
    };
    let c1_ip = attach(&h1, &c1);
    let c2_ip = attach(&h2, &c2);
    assert!(ping_until(&c1.ns, &c2_ip.to_string(), Duration::from_secs(30)), "c1 ({c1_ip}) cannot reach c2 ({c2_ip})");
    let mut want = vec![n1.to_string(), n2.to_string()];
    want.sort();
    assert_eq!(ipam(&h1)["state"]["seeds"], serde_json::json!(want), "the ring's seeds");

    // 2. With the ring agreed: entries taking h1's and h2's ranges (signed by
    //    the attacker, or claiming h2's signature); requests for space and for
    //    c1's address in h2's name (with no binding, and with h2's name bound to
    //    the attacker's key).
    // Who owns what, what is allocated, the ring's state (free counts of other
    // owners are as last reported, and their reports are rate-limited: not compared).
    let owners = |h: &Host| {
        let mut v = ipam(h);
        for o in v["owners"].as_array_mut().into_iter().flatten() {
            o.as_object_mut().map(|o| o.remove("free"));
        }
        (v["owners"].clone(), v["allocations"].clone(), v["state"].clone())
    };
    let (o1, o2) = (owners(&h1), owners(&h2));
    let said = ask(vec![Forgery::Sync]);
    // The full state h1 sends: the seeds (whose genesis nobody sends) and the
    // entries changed since, in one or more messages.
    let mut ring_id = 0;
    let mut view = forge::RingView::default();
    for v in said.iter().filter_map(|b| forge::read_gossip(b)).filter(|v| v.ring_id != 0) {
        ring_id = v.ring_id;
        if !v.seeds.is_empty() {
            (view.seeds, view.universe) = (v.seeds, v.universe);
        }
        view.entries.extend(v.entries);
    }
    let entries = view.ring();
    assert_ne!(ring_id, 0, "h1 did not send its ring to the attacker ({} IPAM messages)", said.len());
    let taken = |owner: PeerName, by: PeerName| {
        let (start, e) = *entries
            .iter()
            .filter(|(_, e)| e.owner == owner)
            .max_by_key(|(_, e)| e.size)
            .unwrap_or_else(|| panic!("no entry of {owner} in {entries:?}"));
        Forgery::Entry { ring_id, start, entry: Entry { owner: me, size: e.size, version: e.version + 5, free: e.size }, by }
    };
    let d2 = drops(&h1);
    ask(vec![
        taken(n1, me),
        taken(n2, me),
        taken(n2, n2),
        Forgery::SpaceAsH2 { squat: false },
        Forgery::SpaceAsH2 { squat: true },
        Forgery::ClaimAsH2 { ip: u32::from(c1_ip) as u128 },
    ]);
    let d3 = drops(&h1);
    eprintln!("h1's IPAM drops before the ring forgeries: {d2}\nafter: {d3}");
    assert!(moved(&d2, &d3, "forged_entries") >= 2, "{d3}");
    assert!(moved(&d2, &d3, "unverifiable_entries") >= 1, "{d3}");
    assert!(moved(&d2, &d3, "forged_messages") >= 3, "{d3}");
    assert!(moved(&d2, &d3, "conflicting_bindings") >= 1, "{d3}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(owners(&h1), o1, "h1's ring or allocations changed");
    assert_eq!(owners(&h2), o2, "h2's ring or allocations changed");

    // The victim's traffic still flows, and none of it reaches the attacker.
    assert!(ping(&c1.ns, &c2_ip.to_string(), 3));
    checked_transfer(&lab, &c1.ns, &c2.ns, &c2_ip.to_string(), 20 << 20, Duration::from_secs(60));
    assert!(established_with(&h1.status_json(), &me.to_string()), "h1 does not list the attacker as established");
    broadcast_ping(&c1.ns, "10.47.255.255");
    std::thread::sleep(Duration::from_secs(1));
    to_attacker.send(Vec::new()).unwrap();
    let heard = attack.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(!heard.closed, "h1 closed the member's connection over dropped IPAM records");
    check_heard(&heard, &capture.stop(), mac_of(&c1.ns), mac_of(&c2.ns), c2_ip);
}
