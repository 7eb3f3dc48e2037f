//! A hostile member in namespaces: a host that knows the password speaks the
//! protocol through `proto` (meshnet_tests::hostile) with forged fields, and the
//! real routers must refuse it without disturbing the victim.
//!
//! Each test: two routers (h1, h2) with a container each; the attacker runs in
//! its own namespace (h9, no router). During and after the attack the victim's
//! pings and a checked transfer work, routes stay as they were, and the counter
//! for the rejection moves.

use std::net::SocketAddr;
use std::time::Duration;

use meshnet_proto::topology::{ConnInfo, SignedPeerInfo};
use meshnet_proto::wire::control::ControlMsg;
use meshnet_proto::PeerName;
use meshnet_tests::hostile::{forge_seal, in_netns, Member};
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
        let datagrams: usize = sessions.iter().map(|s| s.udp_datagrams()).sum();
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
    let (h1, n2) = (addr(&m.h1), m.n2);

    let (stayed_up, heard) = in_netns(&attacker.ns, move || {
        let member = Member::new(Some(PW));
        let mut s = member.connect(h1, member.hello(member.name(), member.binding(member.name()), 0)).unwrap();
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
        (!s.closed(), heard.len())
    });
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
