//! A router under a stranger's flood and a member that stops reading (namespace
//! lab, real binaries, real handshakes through `meshnet_proto`; needs root).
//!
//! 1. From one extra namespace, 2000 TCP connections to h1's 6783 held open plus
//!    200 new ones a second; from another, password guessing with real
//!    handshakes. Meanwhile a new host joins within 10 s, and the containers of
//!    h1 and h2 ping and move a checked transfer without loss. The router's
//!    `limits` counters show what it refused.
//! 2. A member that completes a real handshake and then reads nothing, while
//!    another member gossips hard (so the router has a lot to write to it), is
//!    disconnected within the dead-peer time; the rest of the mesh carries on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use meshnet_tests::stranger::*;
use serde_json::Value;

const PW: &str = "s3cret flood";

fn overlay(j: u8) -> String {
    format!("10.43.0.{j}")
}

#[track_caller]
fn attach(h: &Host, c: &Container) {
    let cidr = format!("{}/16", overlay(c.j));
    h.meshnet(&["attach", &cidr, &c.ns]).expect_ok(&format!("attach {cidr} {} on {}", c.ns, h.ns));
}

fn limits(h: &Host) -> Value {
    h.status_json()["limits"].clone()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("limits.{key} missing: {v:#}"))
}

/// `ping` output's received count out of sent.
fn ping_counts(out: &str) -> (u32, u32) {
    let line = out.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default();
    let nums: Vec<u32> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums.first().copied().unwrap_or(0), nums.get(1).copied().unwrap_or(0))
}

/// Seconds the connection from `h` to peer `name` has been up (from `info`).
fn uptime_with(h: &Host, name: &str) -> Option<u64> {
    connections(&h.status_json()).iter().find(|c| c["peer"] == name).and_then(|c| {
        let info = c["info"].as_str()?;
        let up = info.split(", ").find_map(|p| p.strip_prefix("up "))?;
        up.trim_end_matches('s').parse().ok()
    })
}

/// Two routers with a container each, pinging; returns (h1, h2, c1, c2, n2).
fn two_hosts(lab: &Lab) -> (Host, Host, Container, Container, String) {
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    h1.launch(&["--password", PW]);
    let n2 = h2.launch(&["--password", PW, &h1.ip]);
    attach(&h1, &c1);
    attach(&h2, &c2);
    assert!(ping_until(&c1.ns, &overlay(2), Duration::from_secs(30)), "c1 cannot ping c2");
    (h1, h2, c1, c2, n2)
}

#[test]
fn a_strangers_flood_starves_nothing() {
    let Some(lab) = Lab::new("flood") else { return };
    let (h1, _h2, c1, c2, n2) = two_hosts(&lab);
    let (attacker, guesser) = (lab.add_host(3), lab.add_host(4));
    let h5 = lab.add_host(5);
    let c5 = lab.add_container(&h5, 5);
    let target: SocketAddr = h1.addr().parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(50);
    let started = Instant::now();
    let s = stop.clone();
    let flood_thread = in_netns(&attacker.ns, move || flood(target, 2000, 200, &s, deadline));
    let s = stop.clone();
    let guess_thread =
        in_netns(&guesser.ns, move || guess_passwords(target, Duration::from_millis(50), &s, deadline));
    // Let the flood reach its 2000 and the guesser its backoff.
    std::thread::sleep(Duration::from_secs(6));

    // Existing traffic, across the rest of the flood.
    let pinger = lab.spawn_in(&c1.ns, &["ping", "-c", "40", "-i", "0.5", "-W", "2", &overlay(2)]);
    let mid = limits(&h1);
    eprintln!("h1 limits 6 s into the flood: {mid}");
    assert!(num(&mid, "pending") <= num(&mid, "pending_limit"), "{mid:#}");
    assert!(num(&mid, "conn_slots_used") <= 2, "strangers took --conn-limit slots: {mid:#}");

    // A new host joins within 10 s.
    let joining = Instant::now();
    let n5 = h5.launch(&["--password", PW, &h1.ip]);
    let joined = wait_until(Duration::from_secs(10), || established_with(&h1.status_json(), &n5));
    let join_time = joining.elapsed();
    assert!(joined, "h5 did not join h1 within 10 s of launch under the flood");
    eprintln!("h5 joined h1 in {:.1}s under the flood", join_time.as_secs_f64());
    attach(&h5, &c5);
    assert!(ping_until(&c5.ns, &overlay(1), Duration::from_secs(10)), "c5 cannot ping c1 under the flood");

    checked_transfer(&lab, &c1.ns, &c2.ns, &overlay(2), 20 << 20, Duration::from_secs(60));
    let mut pinger = pinger;
    assert!(pinger.wait(Duration::from_secs(40)), "ping did not finish");
    let (sent, received) = ping_counts(&pinger.stdout());
    eprintln!("c1 -> c2 during the flood: {received}/{sent} pings answered");
    assert!(sent >= 40 && received == sent, "pings lost during the flood: {}", pinger.stdout());
    let flood_for = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let fs = flood_thread.join().expect("flood thread");
    let gs = guess_thread.join().expect("guesser thread");
    let after = limits(&h1);
    eprintln!("flood over {:.0}s: {fs:?}", flood_for.as_secs_f64());
    eprintln!("guesser: {gs:?}");
    eprintln!("h1 limits after: {after:#}");

    // The flood really was one: 2000 at once, then 200 a second.
    assert!(fs.max_open >= 2000, "{fs:?}");
    assert!(fs.connected as f64 >= 2000.0 + 150.0 * fs.steady.as_secs_f64(), "{fs:?}");
    // The router closed nearly all of them at once; few were ever half-open.
    assert!(fs.closed_by_router >= 2000, "{fs:?}");
    assert!(fs.alive_at_end <= 64, "{fs:?}");
    assert!(num(&after, "refused_rate_limited") >= 2000, "{after:#}");
    // Guessing: a handful of real checks, then backoff (1, 2, 4, 8, 16, 32 s).
    assert!(gs.other.is_empty(), "{gs:?}");
    assert!(gs.checked >= 1 && gs.checked <= 7, "{gs:?}");
    assert!(gs.backoff >= 1, "{gs:?}");
    assert!(num(&after, "handshakes_wrong_password") >= gs.checked, "{after:#}");
    assert!(num(&after, "refused_password_backoff") >= 1, "{after:#}");
    assert!(num(&after, "handshakes_timed_out") >= 1, "the half-open flood connections time out: {after:#}");

    // h1 and h2 kept their connection throughout.
    let up = uptime_with(&h1, &n2).expect("h1 still connected to h2");
    assert!(up >= flood_for.as_secs(), "h1-h2 reconnected during the flood (up {up}s, flood {flood_for:?})");
}

#[test]
fn a_slow_reader_is_cut_off_and_the_mesh_carries_on() {
    let Some(lab) = Lab::new("slowreader") else { return };
    let (h1, _h2, c1, c2, n2) = two_hosts(&lab);
    let members = lab.add_host(3);
    let target: SocketAddr = h1.addr().parse().unwrap();

    let slow = in_netns(&members.ns, move || join(target, PW, "slow-reader"))
        .join()
        .expect("join thread")
        .expect("the slow reader completes a real handshake");
    let joined = Instant::now();
    let slow_name = slow.name.to_string();
    assert!(
        wait_until(Duration::from_secs(5), || connections(&h1.status_json()).iter().any(|c| c["peer"] == slow_name)),
        "h1 does not list the slow reader"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(50);
    let s = stop.clone();
    let slow_thread = std::thread::spawn(move || slow.stall(&s, deadline));

    // Another member gives h1 a lot to write: its own entry, changed fast.
    let gossiper = in_netns(&members.ns, move || join(target, PW, "gossiper"))
        .join()
        .expect("join thread")
        .expect("the gossiper completes a real handshake");
    let gossiper_name = gossiper.name.to_string();
    let s = stop.clone();
    let gossip_thread = std::thread::spawn(move || gossiper.gossip_hard(&s, deadline));

    let pinger = lab.spawn_in(&c1.ns, &["ping", "-c", "30", "-i", "0.5", "-W", "2", &overlay(2)]);
    checked_transfer(&lab, &c1.ns, &c2.ns, &overlay(2), 20 << 20, Duration::from_secs(60));

    let cut = wait_until(Duration::from_secs(40), || {
        !connections(&h1.status_json()).iter().any(|c| c["peer"] == slow_name)
    });
    let took = joined.elapsed();
    assert!(cut, "h1 still holds the slow reader's connection {:.0}s after it stopped reading", took.as_secs_f64());
    eprintln!("slow reader cut off {:.1}s after it stopped reading", took.as_secs_f64());
    assert!(took <= Duration::from_secs(36), "not within the dead-peer time (35 s): {took:?}");
    let log = h1.log();
    let line = log.lines().find(|l| l.contains(&slow_name) && l.contains("closed:")).unwrap_or_default().to_string();
    eprintln!("h1: {line}");
    let l = limits(&h1);
    eprintln!("h1 limits: {l:#}");
    assert!(num(&l, "closed_write_timeout") + num(&l, "closed_no_heartbeat") + num(&l, "closed_queue_full") >= 1, "{l:#}");

    // The gossiper, which reads, is still there; the mesh carries on.
    assert!(connections(&h1.status_json()).iter().any(|c| c["peer"] == gossiper_name), "h1 dropped the gossiper too");
    let mut pinger = pinger;
    assert!(pinger.wait(Duration::from_secs(30)), "ping did not finish");
    let (sent, received) = ping_counts(&pinger.stdout());
    assert!(sent >= 30 && received == sent, "pings lost next to the slow reader: {}", pinger.stdout());
    stop.store(true, Ordering::Relaxed);
    let closed = slow_thread.join().expect("slow reader thread");
    assert!(closed, "the slow reader's socket was not closed by h1");
    let updates = gossip_thread.join().expect("gossip thread").expect("gossiper kept its connection");
    eprintln!("gossiper sent {updates} updates; {l}", l = num(&limits(&h1), "gossip_coalesced"));
    assert!(updates > 1000, "the gossiper sent too little to fill anything: {updates}");
    let up = uptime_with(&h1, &n2).expect("h1 still connected to h2");
    assert!(up >= joined.elapsed().as_secs(), "h1-h2 reconnected (up {up}s)");
}
