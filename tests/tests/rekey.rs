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
    let before: Vec<Vec<u64>> = hosts.iter().map(|h| KEY_REJECTIONS.iter().map(|k| counter(h, k)).collect()).collect();
    let rekeys_before: Vec<u64> = hosts.iter().map(|h| counter(h, "rekeys")).collect();

    // Two TCP transfers at once, one each way, for 14 s: seven intervals. Each
    // router both seals and opens bulk data across every switch, whichever
    // side of the rekey exchange it is.
    let sinks = [start_sink(&lab, &c2.ns), start_sink(&lab, &c1.ns)];
    let t = Instant::now();
    let mut back = lab.spawn_in(&c2.ns, &["python3", "-c", TIMED_SOURCE, "10.43.0.1", "14"]);
    let forth = exec_in_timeout(&c1.ns, &["python3", "-c", TIMED_SOURCE, "10.43.0.2", "14"], Duration::from_secs(60));
    let back_done = back.wait(Duration::from_secs(60));
    let took = t.elapsed();
    if !forth.ok() || !back_done {
        lab.dump();
    }
    assert!(forth.ok(), "transfer c1 -> c2 failed: {forth}");
    assert!(back_done, "transfer c2 -> c1 did not finish: {}", back.stderr());
    let [mut sink_forth, mut sink_back] = sinks;
    for (sink, sent, what) in [(&mut sink_forth, forth.stdout.clone(), "c1 -> c2"), (&mut sink_back, back.stdout(), "c2 -> c1")] {
        assert!(sink.wait(Duration::from_secs(30)), "sink of {what} did not finish: {}", sink.stderr());
        let (got, sent) = (digest_line(&sink.stdout()), digest_line(&sent));
        assert_eq!(got, sent, "{what}: received data differs from what was sent");
        let bytes: u64 = sent.split(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        eprintln!(
            "{what}: {} MB intact in {:.1}s ({:.0} Mbit/s)",
            bytes >> 20,
            took.as_secs_f64(),
            bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
        );
        assert!(bytes > 10 << 20, "{what}: too little data crossed to mean anything: {bytes} bytes");
    }

    for (i, h) in hosts.iter().enumerate() {
        let rekeys = counter(h, "rekeys") - rekeys_before[i];
        assert!(rekeys >= 5, "{}: only {rekeys} rekeys during a {:.1}s transfer", h.ns, took.as_secs_f64());
        for (k, key) in KEY_REJECTIONS.iter().enumerate() {
            let moved = counter(h, key) - before[i][k];
            assert_eq!(moved, 0, "{}: {moved} datagrams counted as {key} across the rekeys", h.ns);
        }
        eprintln!("{}: {rekeys} rekeys during the transfer", h.ns);
    }

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
