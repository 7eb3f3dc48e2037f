//! Multi-queue data planes (`--datapath-threads N`), end to end in namespaces:
//! two routers with two queues each carry eight parallel TCP streams, each
//! stream's bytes checked (SHA-256 and length) at the far end; no flow is
//! reordered (sequence-numbered UDP flows never go backwards, and the
//! receiving container's TCP saw no out-of-order segment unless it also saw a
//! retransmission); the queues all forwarded (their threads used the CPU).
//! Routers with different queue counts (4 and 1), thread layouts (a TX and
//! an RX thread per queue, and one thread for both) and busy polling (on and
//! off) interoperate both ways.

use std::collections::HashMap;
use std::time::Duration;

use meshnet_tests::lab::*;

const MB: u64 = 1 << 20;

/// Receives `argv[1]` TCP connections on port 5002, hashing each; prints one
/// `sha256hex bytes` line per stream, keyed by the 8-byte stream id the
/// sender puts first.
const MULTI_SINK: &str = r#"
import hashlib, socket, sys, threading
n = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5002)); s.listen(n)
print("listening", flush=True)
out = {}
def serve(c):
    h = hashlib.sha256(); got = 0; sid = b""
    while len(sid) < 8:
        b = c.recv(8 - len(sid))
        if not b: break
        sid += b
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); got += len(b)
    out[int(sid or b"0")] = (h.hexdigest(), got)
    c.close()
ts = []
for _ in range(n):
    c, _ = s.accept()
    t = threading.Thread(target=serve, args=(c,)); t.start(); ts.append(t)
for t in ts: t.join()
for k in sorted(out): print("stream", k, out[k][0], out[k][1], flush=True)
"#;

/// Sends `argv[3]` random bytes on each of `argv[2]` parallel connections to
/// `argv[1]`:5002; prints `stream id sha256hex bytes` per stream.
const MULTI_SOURCE: &str = r#"
import hashlib, os, socket, sys, threading
ip, n, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
def send(k):
    c = socket.create_connection((ip, 5002), timeout=120)
    c.sendall(b"%08d" % k)
    h = hashlib.sha256(); sent = 0
    while sent < total:
        b = os.urandom(min(1 << 18, total - sent))
        c.sendall(b); h.update(b); sent += len(b)
    c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
    out[k] = (h.hexdigest(), sent)
ts = [threading.Thread(target=send, args=(k,)) for k in range(n)]
for t in ts: t.start()
for t in ts: t.join()
for k in sorted(out): print("stream", k, out[k][0], out[k][1], flush=True)
"#;

/// Receives UDP on port 5003 for `argv[1]` seconds; a datagram is
/// `flow:seq`. Prints per flow `flow received backwards` (a sequence number
/// lower than one seen before on the flow: reordering).
const UDP_SINK: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5003)); s.settimeout(0.5)
# SO_RCVBUFFORCE (root): a burst of 400 datagrams fits even when this process
# is not scheduled for a while on a loaded machine, so losses are the mesh's.
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
print("listening", flush=True)
end = time.time() + float(sys.argv[1]); last = {}; got = {}; back = {}
while time.time() < end:
    try: b, a = s.recvfrom(2048)
    except socket.timeout: continue
    f, q = b.split(b":")[:2]; f = int(f); q = int(q)
    got[f] = got.get(f, 0) + 1
    if q < last.get(f, -1): back[f] = back.get(f, 0) + 1
    last[f] = max(q, last.get(f, -1))
for f in sorted(got): print("flow", f, got[f], back.get(f, 0), flush=True)
"#;

/// Sends `argv[3]` numbered datagrams on each of `argv[2]` flows (each its own
/// source port) to `argv[1]`:5003, round robin, in bursts.
const UDP_SOURCE: &str = r#"
import socket, sys, time
ip, n, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
pad = b"x" * 900
for q in range(count):
    for f, s in enumerate(socks):
        s.sendto(b"%d:%d:" % (f, q) + pad, (ip, 5003))
    if q % 50 == 49: time.sleep(0.002)
print("sent", flush=True)
"#;

/// Hosts h1, h2 launched with `--datapath-threads threads[i]`, h2 joining h1,
/// and container j on host j as 10.44.0.j/24.
/// Hosts launched with (`--datapath-threads`, `--datapath-threads-per-queue`,
/// `--datapath-busy-poll` if given) each.
fn hosts(lab: &Lab, threads: &[(u32, u32, Option<u32>)]) -> (Vec<Host>, Vec<Container>) {
    let mut hs: Vec<Host> = Vec::new();
    for (i, (t, per, poll)) in threads.iter().enumerate() {
        let h = lab.add_host(i as u8 + 1);
        let (t, per, poll) = (t.to_string(), per.to_string(), poll.map(|p| p.to_string()));
        let mut args = vec!["--password", "queues", "--datapath-threads", &t, "--datapath-threads-per-queue", &per];
        if let Some(p) = &poll {
            args.extend(["--datapath-busy-poll", p]);
        }
        let prev = hs.last().map(|p: &Host| p.ip.clone());
        if let Some(p) = &prev {
            args.push(p);
        }
        h.launch(&args);
        hs.push(h);
    }
    let cs: Vec<Container> = hs.iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in hs.iter().zip(&cs) {
        h.meshnet(&["attach", &format!("10.44.0.{}/24", c.j), &c.ns]).expect_ok("attach");
    }
    (hs, cs)
}

fn ip_of(c: &Container) -> String {
    format!("10.44.0.{}", c.j)
}

fn counter(h: &Host, key: &str) -> u64 {
    h.status_json()["dataplane"][key].as_u64().unwrap_or(0)
}

/// `streams` parallel TCP streams of `bytes` each from `from` to `to`, each checked.
#[track_caller]
fn parallel_transfer(lab: &Lab, from: &Container, to: &Container, streams: u32, bytes: u64) {
    let n = streams.to_string();
    let mut rx = lab.spawn_in(&to.ns, &["python3", "-c", MULTI_SINK, &n]);
    assert!(wait_until(Duration::from_secs(10), || rx.stdout().contains("listening")), "sink: {}", rx.stderr());
    let t = std::time::Instant::now();
    let sent = exec_in_timeout(&from.ns, &["python3", "-c", MULTI_SOURCE, &ip_of(to), &n, &bytes.to_string()], Duration::from_secs(300));
    if !sent.ok() {
        lab.dump();
    }
    assert!(sent.ok(), "{streams} streams {} -> {} failed: {sent}", from.ns, to.ns);
    assert!(rx.wait(Duration::from_secs(60)), "sink did not finish: {}", rx.stderr());
    let streams_of = |out: &str| -> Vec<String> { out.lines().filter(|l| l.starts_with("stream ")).map(str::to_string).collect() };
    let (got, want) = (streams_of(&rx.stdout()), streams_of(&sent.stdout));
    assert_eq!(want.len(), streams as usize, "sender: {}", sent.stdout);
    for w in &want {
        assert!(w.ends_with(&format!(" {bytes}")), "sender: {w}");
    }
    assert_eq!(got, want, "a stream's bytes differ from what was sent");
    let took = t.elapsed().as_secs_f64();
    eprintln!(
        "{streams} x {} MB {} -> {} intact in {took:.1}s ({:.0} Mbit/s)",
        bytes >> 20,
        from.ns,
        to.ns,
        (streams as u64 * bytes) as f64 * 8.0 / took / 1e6
    );
}

/// `nstat` counters of a namespace (absolute, history untouched).
fn nstat(ns: &str) -> HashMap<String, u64> {
    let out = exec_in(ns, &["nstat", "-saz"]).expect_ok("nstat");
    out.stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// CPU ticks (user + system) of each of the router's threads, by name.
fn thread_ticks(h: &Host) -> HashMap<String, u64> {
    let pid = router_pid(h);
    let mut m = HashMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_string();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is 3rd, utime 14th, stime 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        *m.entry(comm).or_default() += ticks;
    }
    m
}

#[test]
fn two_queues_carry_parallel_streams_in_order() {
    let Some(lab) = Lab::new("mq2") else { return };
    let (hs, cs) = hosts(&lab, &[(2, 1, None), (2, 1, None)]);
    assert!(ping_until(&cs[0].ns, &ip_of(&cs[1]), Duration::from_secs(30)), "c1 cannot reach c2");
    for h in &hs {
        let t = thread_ticks(h);
        for name in ["forward-0", "forward-1"] {
            assert!(t.contains_key(name), "no thread {name} in {}: {t:?}", h.ns);
        }
        let f = &h.status_json()["forwarding"];
        assert_eq!((f["queues"].as_u64(), f["threads_per_queue"].as_u64()), (Some(2), Some(1)), "{f}");
        assert_eq!(f["busy_poll_us"].as_u64(), Some(100), "the default busy poll: {f}");
    }
    let before = thread_ticks(&hs[1]);

    // Eight streams one way, checked; then UDP flows with sequence numbers.
    parallel_transfer(&lab, &cs[0], &cs[1], 8, 48 * MB);
    let mut sink = lab.spawn_in(&cs[1].ns, &["python3", "-c", UDP_SINK, "8"]);
    assert!(wait_until(Duration::from_secs(10), || sink.stdout().contains("listening")), "udp sink: {}", sink.stderr());
    exec_in_timeout(&cs[0].ns, &["python3", "-c", UDP_SOURCE, &ip_of(&cs[1]), "8", "3000"], Duration::from_secs(60)).expect_ok("udp source");
    assert!(sink.wait(Duration::from_secs(20)), "udp sink did not finish");
    let flows: Vec<(u64, u64)> = sink
        .stdout()
        .lines()
        .filter(|l| l.starts_with("flow "))
        .map(|l| {
            let w: Vec<u64> = l.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
            (w[1], w[2])
        })
        .collect();
    eprintln!("udp flows (received, backwards): {flows:?}");
    assert_eq!(flows.len(), 8, "{}", sink.stdout());
    for (got, backwards) in &flows {
        assert!(*got > 1500, "a flow lost more than half its datagrams: {flows:?}");
        assert_eq!(*backwards, 0, "a UDP flow was reordered: {flows:?}");
    }

    // TCP: no segment arrived out of order unless one was lost and resent.
    let rx = nstat(&cs[1].ns);
    let tx = nstat(&cs[0].ns);
    let ofo = rx.get("TcpExtTCPOFOQueue").copied().unwrap_or(0);
    let retrans = tx.get("TcpRetransSegs").copied().unwrap_or(0);
    eprintln!("receiver TcpExtTCPOFOQueue {ofo}, sender TcpRetransSegs {retrans}");
    if retrans == 0 {
        assert_eq!(ofo, 0, "segments arrived out of order with nothing lost");
    }

    // Both queues forwarded: each receive thread of h2 used CPU for it.
    let after = thread_ticks(&hs[1]);
    let used = |n: &str| after.get(n).copied().unwrap_or(0) - before.get(n).copied().unwrap_or(0);
    eprintln!("h2 ticks: queue 0 {}, queue 1 {}; handed over {}", used("forward-0"), used("forward-1"), counter(&hs[1], "udp_other_queue"));
    assert!(used("forward-0") > 5 && used("forward-1") > 5, "a queue carried nothing: {after:?}");
    for h in &hs {
        eprintln!("{} data plane: {}", h.ns, h.status_json()["dataplane"]);
        assert_eq!(counter(h, "udp_rejected"), 0, "on {}", h.ns);
        assert_eq!(counter(h, "udp_unknown_session"), 0, "on {}", h.ns);
    }
}

#[test]
fn different_thread_counts_interoperate() {
    let Some(lab) = Lab::new("mqmix") else { return };
    // h1 polls after traffic (the default), h2 sleeps at once.
    let (hs, cs) = hosts(&lab, &[(4, 2, None), (1, 1, Some(0))]);
    assert!(ping_until(&cs[0].ns, &ip_of(&cs[1]), Duration::from_secs(30)), "c1 (4 queues) cannot reach c2 (1)");
    assert!(ping(&cs[1].ns, &ip_of(&cs[0]), 3), "c2 (1 queue) cannot reach c1 (4)");
    parallel_transfer(&lab, &cs[0], &cs[1], 8, 16 * MB);
    parallel_transfer(&lab, &cs[1], &cs[0], 8, 16 * MB);
    checked_transfer(&lab, &cs[0].ns, &cs[1].ns, &ip_of(&cs[1]), 64 * MB, Duration::from_secs(180));
    let (t1, t2) = (thread_ticks(&hs[0]), thread_ticks(&hs[1]));
    assert!(t1.contains_key("udp-to-tap-3") && t1.contains_key("tap-to-udp-3") && !t1.contains_key("forward-0"), "{t1:?}");
    assert!(t2.contains_key("forward") && !t2.contains_key("udp-to-tap"), "{t2:?}");
    assert_eq!(hs[0].status_json()["forwarding"]["threads_per_queue"].as_u64(), Some(2));
    assert_eq!(hs[1].status_json()["forwarding"]["busy_poll_us"].as_u64(), Some(0));
    for h in &hs {
        eprintln!("{} data plane: {}", h.ns, h.status_json()["dataplane"]);
        assert_eq!(counter(h, "udp_rejected"), 0, "on {}", h.ns);
    }
    // A bad thread count is refused with a clear error, and nothing starts.
    let h3 = lab.add_host(3);
    for bad in ["0", "65", "x"] {
        let out = h3.meshnet(&["launch", "--datapath-threads", bad]);
        assert!(!out.ok(), "--datapath-threads {bad} accepted");
        assert!(out.all().contains("--datapath-threads"), "{out}");
    }
    let out = h3.meshnet(&["launch", "--datapath-threads", "2", "--datapath", "pcap"]);
    assert!(!out.ok() && out.all().contains("needs --datapath tap"), "{out}");
    for bad in ["0", "3", "x"] {
        let out = h3.meshnet(&["launch", "--datapath-threads-per-queue", bad]);
        assert!(!out.ok(), "--datapath-threads-per-queue {bad} accepted");
        assert!(out.all().contains("--datapath-threads-per-queue"), "{out}");
    }
    for bad in ["1001", "-1", "x"] {
        let out = h3.meshnet(&["launch", &format!("--datapath-busy-poll={bad}")]);
        assert!(!out.ok(), "--datapath-busy-poll {bad} accepted");
        assert!(out.all().contains("--datapath-busy-poll"), "{out}");
    }
}
