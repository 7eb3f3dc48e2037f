//! Rekeying under load, end to end in namespaces: with `--rekey-interval 2`,
//! checked TCP transfers both ways lasting well over five intervals cross at
//! least five rekeys on both routers, and not one datagram is rejected for key reasons
//! (unknown receiver index, failed authentication) meanwhile.

use std::time::{Duration, Instant};

use meshnet_tests::lab::*;

/// Sends random bytes to `argv[1]`:5001 for `argv[2]` seconds; prints `sha256hex bytes`.
const TIMED_SOURCE: &str = r#"
import hashlib, os, socket, sys, time
end = time.monotonic() + float(sys.argv[2]); h = hashlib.sha256(); sent = 0
c = socket.create_connection((sys.argv[1], 5001), timeout=60)
while time.monotonic() < end:
    b = os.urandom(1 << 18)
    c.sendall(b); h.update(b); sent += len(b)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(h.hexdigest(), sent, flush=True)
"#;

fn counter(h: &Host, key: &str) -> u64 {
    h.status_json()["dataplane"][key].as_u64().unwrap_or(0)
}

/// Counters that move when a datagram is refused for its key.
const KEY_REJECTIONS: [&str; 3] = ["udp_unknown_session", "udp_auth_failed", "udp_rejected"];

/// Key-rejection counters of each host, in [`KEY_REJECTIONS`] order, and its rekeys.
fn key_counters(hosts: &[&Host]) -> Vec<(Vec<u64>, u64)> {
    hosts.iter().map(|h| (KEY_REJECTIONS.iter().map(|k| counter(h, k)).collect(), counter(h, "rekeys"))).collect()
}

/// Two TCP transfers at once, `a` -> `b` and `b` -> `a`, each for `secs`
/// seconds, both checked (SHA-256 and length). Each router on the way both
/// seals and opens bulk data across every switch, whichever side of the rekey
/// exchange it is. Returns how long they took.
fn transfers_both_ways(lab: &Lab, a: (&str, &str), b: (&str, &str), secs: u32) -> Duration {
    let secs = secs.to_string();
    let sinks = [start_sink(lab, b.0), start_sink(lab, a.0)];
    let t = Instant::now();
    let mut back = lab.spawn_in(b.0, &["python3", "-c", TIMED_SOURCE, a.1, &secs]);
    let forth = exec_in_timeout(a.0, &["python3", "-c", TIMED_SOURCE, b.1, &secs], Duration::from_secs(120));
    let back_done = back.wait(Duration::from_secs(60));
    let took = t.elapsed();
    if !forth.ok() || !back_done {
        lab.dump();
    }
    assert!(forth.ok(), "transfer {} -> {} failed: {forth}", a.1, b.1);
    assert!(back_done, "transfer {} -> {} did not finish: {}", b.1, a.1, back.stderr());
    let [mut sink_forth, mut sink_back] = sinks;
    let ways = [(&mut sink_forth, forth.stdout.clone(), (a.1, b.1)), (&mut sink_back, back.stdout(), (b.1, a.1))];
    for (sink, sent, (from, to)) in ways {
        assert!(sink.wait(Duration::from_secs(30)), "sink of {from} -> {to} did not finish: {}", sink.stderr());
        let (got, sent) = (digest_line(&sink.stdout()), digest_line(&sent));
        assert_eq!(got, sent, "{from} -> {to}: received data differs from what was sent");
        let bytes: u64 = sent.split(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        eprintln!(
            "{from} -> {to}: {} MB intact in {:.1}s ({:.0} Mbit/s)",
            bytes >> 20,
            took.as_secs_f64(),
            bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
        );
        assert!(bytes > 10 << 20, "{from} -> {to}: too little data crossed to mean anything: {bytes} bytes");
    }
    took
}

/// Every host rekeyed at least `min` times since `before`, and no datagram was
/// refused for its key.
#[track_caller]
fn check_rekeys(hosts: &[&Host], before: &[(Vec<u64>, u64)], min: u64, took: Duration) {
    for (h, (rejected, rekeys)) in hosts.iter().zip(before) {
        let done = counter(h, "rekeys") - rekeys;
        assert!(done >= min, "{}: only {done} rekeys during {:.1}s of transfers", h.ns, took.as_secs_f64());
        for (key, was) in KEY_REJECTIONS.iter().zip(rejected) {
            let moved = counter(h, key) - was;
            assert_eq!(moved, 0, "{}: {moved} datagrams counted as {key} across the rekeys", h.ns);
        }
        eprintln!("{}: {done} rekeys during the transfers", h.ns);
    }
}

#[test]
fn transfer_crosses_five_rekeys_without_a_rejected_datagram() {
    let Some(lab) = Lab::new("rekey") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    h1.launch(&["--password", "rk", "--rekey-interval", "2"]);
    h2.launch(&["--password", "rk", "--rekey-interval", "2", &h1.ip]);
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", "10.43.0.1/24", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.43.0.2/24", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c1.ns, "10.43.0.2", Duration::from_secs(30)), "c1 cannot reach c2");

    // Datagrams that arrived before the handshake finished on our side count as
    // unknown sessions: measure from here.
    let hosts = [&h1, &h2];
    let before = key_counters(&hosts);
    // 14 s: seven intervals.
    let took = transfers_both_ways(&lab, (&c1.ns, "10.43.0.1"), (&c2.ns, "10.43.0.2"), 14);
    check_rekeys(&hosts, &before, 5, took);

    // `status connections` shows the key's epoch and age; the age stays within
    // an interval (plus a rekey's round trip and the polling step).
    for h in hosts {
        let conns = connections(&h.status_json());
        assert_eq!(conns.len(), 1, "{}: {conns:?}", h.ns);
        let epoch = conns[0]["key_epoch"].as_u64().expect("key_epoch in status --json");
        let age = conns[0]["key_age_s"].as_u64().expect("key_age_s in status --json");
        assert!(epoch >= 5 && age <= 3, "{}: key epoch {epoch}, age {age}s", h.ns);
        let text = h.meshnet(&["status", "connections"]).expect_ok("status connections");
        assert!(text.stdout.contains("key epoch"), "{}: no key age in: {text}", h.ns);
    }
    // Still working after all that.
    assert!(ping(&c2.ns, "10.43.0.1", 3), "c2 cannot reach c1 after the rekeys");
}

/// h1 - h2 - h3 in a chain: what c1 and c3 exchange is relayed by h2, under its
/// relay sessions, which are rekeyed with their connections.
#[test]
fn relayed_transfer_crosses_rekeys_of_both_hops() {
    let Some(lab) = Lab::new("rekeyrelay") else { return };
    let hosts: Vec<Host> = (1..=3).map(|i| lab.add_host(i)).collect();
    let iv = ["--no-discovery", "--rekey-interval", "2"];
    hosts[0].launch(&iv);
    hosts[1].launch(&[&iv[..], &[hosts[0].ip.as_str()]].concat());
    hosts[2].launch(&[&iv[..], &[hosts[1].ip.as_str()]].concat());
    let c1 = lab.add_container(&hosts[0], 1);
    let c3 = lab.add_container(&hosts[2], 3);
    hosts[0].meshnet(&["attach", "10.43.0.1/24", &c1.ns]).expect_ok("attach c1");
    hosts[2].meshnet(&["attach", "10.43.0.3/24", &c3.ns]).expect_ok("attach c3");
    assert!(ping_until(&c1.ns, "10.43.0.3", Duration::from_secs(30)), "c1 cannot reach c3 through h2");

    let hosts: Vec<&Host> = hosts.iter().collect();
    let before = key_counters(&hosts);
    let relayed = counter(hosts[1], "relayed_units");
    let took = transfers_both_ways(&lab, (&c1.ns, "10.43.0.1"), (&c3.ns, "10.43.0.3"), 14);
    check_rekeys(&hosts, &before, 5, took);
    // h1 and h3 only reach each other through h2: the data went through its relay sessions.
    for h in [hosts[0], hosts[2]] {
        assert_eq!(connections(&h.status_json()).len(), 1, "{} has more than its one connection", h.ns);
    }
    let relayed = counter(hosts[1], "relayed_units") - relayed;
    assert!(relayed > 10_000, "h2 relayed only {relayed} units");
}

#[test]
fn rekey_interval_is_bounded_and_resumed() {
    let Some(lab) = Lab::new("rekeyopt") else { return };
    let h1 = lab.add_host(1);
    for bad in ["0", "121"] {
        let out = h1.meshnet(&["launch", "--rekey-interval", bad]);
        assert!(!out.ok(), "--rekey-interval {bad} was accepted: {out}");
    }
    h1.launch(&["--rekey-interval", "7"]);
    h1.meshnet(&["stop"]).expect_ok("stop");
    let out = h1.meshnet(&["launch", "--resume", "--rekey-interval", "7"]);
    assert!(!out.ok(), "--resume took --rekey-interval: {out}");
    h1.launch(&["--resume"]);
    let args = std::fs::read_to_string(format!("/proc/{}/cmdline", router_pid(&h1))).unwrap_or_default();
    assert!(args.contains("--rekey-interval\x007\x00"), "resumed router runs with {args:?}");
}
