//! meshnet DNS in the namespace lab (needs root; the lab skips otherwise).
//!
//! `names_across_routers`: two routers, each with a container namespace; host
//! 1 exposes an address on its bridge, where its DNS server listens (port 53).
//! A name registered on router 2 (`dns-add`, address taken from the
//! attachment) is answered by router 1 (`dig`), and the container on host 1
//! pings it by name (its resolv.conf names router 1's server only). A name
//! outside the domain is forwarded to a resolver the test runs in a namespace
//! of its own (named by the routers' resolv.conf); one that resolver never
//! answers gets SERVFAIL, not a hang. PTR, AAAA (empty NOERROR), NXDOMAIN,
//! several addresses in rotating order, a single label without the search
//! domain, names of no target (`dns-add ADDR... -h NAME`) and of an exposed
//! address (`expose -h NAME`, gone with `hide`), `dns-args` of a router
//! launched `--no-dns` (nothing, exit 0). Bad input (`dns-add` of an unknown
//! target, a name outside the domain, a malformed name) is a clear error and
//! changes nothing. A removal on router 2 is seen by router 1 within seconds,
//! also one made while the two are partitioned, once the partition heals.
//! Router 2's records survive kill -9 and `launch --resume`. A flood of 10 000
//! queries from the container is answered, garbage is dropped and counted, and
//! the router's API answers meanwhile.
//!
//! `ipv6_names_across_routers`: dual-stack routers; a dual-stack container's
//! name registered on router 2 answers A and AAAA on router 1, `dig -x` of its
//! IPv6 address gives the name, mixed lists, rotation, NOERROR/no data for the
//! family a name lacks, removals within seconds, kill -9 and `--resume`.
//! `ipv6_names_with_a_router_of_the_previous_build`: the same next to a router
//! running `$MESHNET_OLD_BIN` (skipped without it), with or without `CAP_DNS6`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshnet_tests::hostile::in_netns;
use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const OPTS: [&str; 4] = ["--ipalloc-range", "10.2.0.0/16", "--ipalloc-default-subnet", "10.2.1.0/24"];
/// What the test's upstream resolver answers for [`EXTERNAL`].
const EXTERNAL: &str = "ext.example.org.";
const EXTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

/// A tiny upstream resolver on `ip:53` in namespace `ns`: answers [`EXTERNAL`]
/// with [`EXTERNAL_ADDR`], ignores every other question (so forwarding them
/// must time out into SERVFAIL). Runs until `stop`.
fn upstream_resolver(ns: &str, ip: Ipv4Addr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let ns = ns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let sock = UdpSocket::bind((ip, 53)).expect("bind the upstream resolver");
            sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            tx.send(()).unwrap();
            let mut answered = 0;
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, src)) = sock.recv_from(&mut buf) else { continue };
                let Ok(req) = Message::from_vec(&buf[..n]) else { continue };
                let Some(q) = req.queries.first() else { continue };
                if q.name().to_lowercase().to_ascii() != EXTERNAL {
                    continue;
                }
                let mut resp = Message::response(req.metadata.id, OpCode::Query);
                resp.metadata.recursion_desired = req.metadata.recursion_desired;
                resp.add_query(q.clone());
                resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(EXTERNAL_ADDR))));
                let _ = sock.send_to(&resp.to_vec().unwrap(), src);
                answered += 1;
            }
            answered
        })
    });
    rx.recv_timeout(SECS(10)).expect("the upstream resolver started");
    handle
}

fn dig(ns: &str, server: &str, args: &[&str]) -> Out {
    let at = format!("@{server}");
    let mut a = vec!["dig", &at, "+time=4", "+tries=1"];
    a.extend_from_slice(args);
    exec_in_timeout(ns, &a, SECS(20))
}

/// `dig +short` answers, one a line.
fn short(ns: &str, server: &str, name: &str, qtype: &str) -> Vec<String> {
    dig(ns, server, &["+short", name, qtype]).stdout.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// The status line of a full `dig` answer (`NOERROR`, `NXDOMAIN`, `SERVFAIL`).
fn rcode(ns: &str, server: &str, name: &str, qtype: &str) -> String {
    let out = dig(ns, server, &[name, qtype]);
    out.stdout
        .lines()
        .find_map(|l| l.split("status: ").nth(1).map(|s| s.split(',').next().unwrap_or("").to_string()))
        .unwrap_or_else(|| format!("no answer: {out}"))
}

fn dns_status(h: &Host) -> Value {
    h.meshnet(&["status", "dns", "--json"]).expect_ok("status dns").json()
}

fn own_records(h: &Host, owner: &str) -> Vec<(String, String)> {
    dns_status(h)["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["owner"] == owner)
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["address"].as_str().unwrap().to_string()))
        .collect()
}

fn established(h: &Host) -> usize {
    connections(&h.status_json()).iter().filter(|c| c["state"] == "established").count()
}

fn ip_of(cidr: &str) -> String {
    cidr.split('/').next().unwrap_or_default().to_string()
}

/// `expose` on a router with an IPv4 and an IPv6 range: one address of each
/// family, a line each. Returns the IPv4 one (where the DNS server listens).
fn expose_dual_stack(h: &Host) -> String {
    let out = h.meshnet(&["expose"]).expect_ok("expose");
    let v4 = out.stdout.lines().map(ip_of).find(|a| a.parse::<Ipv4Addr>().is_ok());
    assert!(out.stdout.lines().any(|l| ip_of(l).parse::<std::net::Ipv6Addr>().is_ok()), "expose gave no IPv6 address: {out}");
    v4.unwrap_or_else(|| panic!("expose gave no IPv4 address: {out}"))
}

/// `attach` with no address on a router with both ranges: the container's
/// IPv4 and IPv6 addresses.
fn attach_dual_stack(h: &Host, c: &Container) -> (String, String) {
    let out = h.meshnet(&["attach", &c.ns]).expect_ok(&format!("attach {}", c.ns));
    let addrs: Vec<String> = out.last_line().unwrap_or_default().split_whitespace().map(ip_of).collect();
    let ip4 = addrs.iter().find(|a| a.parse::<Ipv4Addr>().is_ok()).cloned().unwrap_or_else(|| panic!("no IPv4 address: {out}"));
    let ip6 = addrs.iter().find(|a| a.parse::<std::net::Ipv6Addr>().is_ok()).cloned().unwrap_or_else(|| panic!("no IPv6 address: {out}"));
    (ip4, ip6)
}

#[test]
fn names_across_routers() {
    let Some(lab) = Lab::new("names_across_routers") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let up = lab.add_host(9);
    let upstream_ip: Ipv4Addr = up.ip.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let resolver = upstream_resolver(&up.ns, upstream_ip, stop.clone());
    let mut conf = NetnsEtc::default();
    // The routers' "host resolvers": the test's upstream.
    conf.set(&h1.ns, "resolv.conf", &format!("nameserver {upstream_ip}\n"));
    conf.set(&h2.ns, "resolv.conf", &format!("nameserver {upstream_ip}\n"));

    h1.launch(&OPTS);
    let n2 = h2.launch(&[&OPTS[..], &[h1.ip.as_str()]].concat());
    assert!(wait_until(SECS(30), || established(&h1) >= 1 && established(&h2) >= 1), "h1 and h2 did not connect");
    h1.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h1");
    h2.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h2");

    // A router without DNS: `dns-args` prints nothing and succeeds, as
    // `weave dns-args` did (`docker run $(meshnet dns-args) ...` still works).
    let h3 = lab.add_host(3);
    h3.launch(&["--no-dns"]);
    let out = h3.meshnet(&["dns-args"]);
    assert!(out.ok() && out.stdout.trim().is_empty() && out.stderr.contains("--no-dns"), "{out}");
    h3.meshnet(&["stop"]).expect_ok("stop h3");

    // Before anything is exposed, no server listens; `dns-args` says why.
    assert!(dns_status(&h1)["listen"].is_null(), "{}", dns_status(&h1));
    let out = h1.meshnet(&["dns-args"]);
    assert!(!out.ok() && out.stderr.contains("meshnet expose"), "{out}");
    let exposed = h1.meshnet(&["expose"]).expect_ok("expose h1").last_line().unwrap_or_default().to_string();
    let server = ip_of(&exposed);
    assert!(wait_until(SECS(5), || dns_status(&h1)["listen"] == format!("{server}:53")), "{}", dns_status(&h1));
    let args = h1.meshnet(&["dns-args"]).expect_ok("dns-args");
    assert_eq!(args.stdout.trim(), format!("--dns {server} --dns-search meshnet.local"));

    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    let a1 = h1.meshnet(&["attach", &c1.ns]).expect_ok("attach c1").last_line().unwrap_or_default().to_string();
    let a2 = h2.meshnet(&["attach", &c2.ns]).expect_ok("attach c2").last_line().unwrap_or_default().to_string();
    let ip2 = ip_of(&a2);
    assert!(ip_of(&a1).parse::<Ipv4Addr>().is_ok(), "{a1}");
    conf.set(&c1.ns, "resolv.conf", &format!("nameserver {server}\nsearch meshnet.local\n"));
    assert!(ping_until(&c1.ns, &server, SECS(20)), "c1 does not reach h1's exposed {server}");

    // Bad input: each a clear error, and the table unchanged.
    let before = dns_status(&h2)["records"].clone();
    for (args, want) in [
        (vec!["dns-add", "no-such-target-xyz", "-h", "db"], "unknown target"),
        (vec!["dns-add", &c2.ns, "-h", "db.example.com"], "outside the domain"),
        (vec!["dns-add", &c2.ns, "-h", "bad name!"], "only letters"),
        (vec!["dns-add", "10.2.1.300", &c2.ns, "-h", "db"], "not an IPv4 address"),
        (vec!["dns-remove", "no-such-target-xyz"], "unknown target"),
        (vec!["dns-lookup", "nobody"], "no such name"),
    ] {
        let out = h2.meshnet(&args);
        assert!(!out.ok() && out.stderr.contains(want), "{args:?}: expected an error with {want:?}: {out}");
    }
    assert_eq!(dns_status(&h2)["records"], before, "bad input changed the table");

    // A name registered on router 2 resolves on router 1, and c1 pings it by name.
    let out = h2.meshnet(&["dns-add", &c2.ns, "-h", "db"]).expect_ok("dns-add db");
    assert_eq!(out.stdout.trim(), format!("db.meshnet.local. {ip2}"));
    let started = Instant::now();
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "db.meshnet.local", "A") == [ip2.clone()]), "router 1 does not answer db");
    eprintln!("db registered on router 2 resolved on router 1 after {} ms", started.elapsed().as_millis());
    assert_eq!(h1.meshnet(&["dns-lookup", "db"]).expect_ok("dns-lookup").stdout.trim(), ip2);
    // The metrics port and `report` show the table.
    let metrics = exec_in_timeout(&h1.ns, &["curl", "-s", "--max-time", "10", "http://127.0.0.1:6782/metrics"], SECS(15));
    assert!(metrics.stdout.lines().any(|l| l == "meshnet_dns_records 1"), "h1 metrics: {}", metrics.stdout.lines().filter(|l| l.contains("dns")).collect::<Vec<_>>().join("\n"));
    assert!(metrics.stdout.lines().any(|l| l == "meshnet_dns_listening 1"));
    let report = h1.meshnet(&["report", "--json"]).expect_ok("report").json();
    assert_eq!(report["dns"]["records"][0]["address"], ip2.as_str(), "{}", report["dns"]);
    let ping = exec_in_timeout(&c1.ns, &["ping", "-c", "2", "-i", "0.3", "-W", "2", "db"], SECS(20));
    assert!(ping.ok() && ping.stdout.contains(&ip2), "c1 cannot ping db by name: {ping}");
    // Reverse, AAAA, unknown names, the domain's own case and the TTL.
    let ptr = dig(&c1.ns, &server, &["+short", "-x", &ip2]);
    assert_eq!(ptr.stdout.trim(), "db.meshnet.local.", "{ptr}");
    assert_eq!(rcode(&c1.ns, &server, "db.meshnet.local", "AAAA"), "NOERROR");
    assert!(short(&c1.ns, &server, "db.meshnet.local", "AAAA").is_empty());
    assert_eq!(rcode(&c1.ns, &server, "nobody.meshnet.local", "A"), "NXDOMAIN");
    assert_eq!(short(&c1.ns, &server, "DB.MeshNet.Local", "A"), [ip2.clone()]);
    let full = dig(&c1.ns, &server, &["+noall", "+answer", "db.meshnet.local", "A"]);
    assert!(full.stdout.split_whitespace().nth(1) == Some("1"), "TTL 1 expected: {full}");
    // Over TCP too.
    let tcp = dig(&c1.ns, &server, &["+tcp", "+short", "db.meshnet.local"]);
    assert_eq!(tcp.stdout.trim(), ip2, "{tcp}");

    // A single label without the search domain (`dig db`: what a resolver
    // without `search` asks) is the domain's name when the table holds it, as
    // in Weave; another single label is forwarded (the test's resolver ignores it).
    assert_eq!(short(&c1.ns, &server, "db", "A"), [ip2.clone()]);
    assert_eq!(rcode(&c1.ns, &server, "nobody", "A"), "SERVFAIL");

    // Addresses of no target (`dns-add ADDR... -h NAME`, Weave's form), and their removal.
    let out = h2.meshnet(&["dns-add", "10.2.1.250", "-h", "outside"]).expect_ok("dns-add without a target");
    assert_eq!(out.stdout.trim(), "outside.meshnet.local. 10.2.1.250");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "outside.meshnet.local", "A") == ["10.2.1.250"]), "{}", dns_status(&h1));
    h2.meshnet(&["dns-remove", "10.2.1.250", "-h", "outside"]).expect_ok("dns-remove without a target");
    assert!(wait_until(SECS(5), || rcode(&c1.ns, &server, "outside.meshnet.local", "A") == "NXDOMAIN"), "{}", dns_status(&h1));

    // `expose -h NAME` names the exposed address (a bad name exposes nothing);
    // `hide` takes the name away with the address.
    let out = h2.meshnet(&["expose", "-h", "bad name!"]);
    assert!(!out.ok() && out.stderr.contains("only letters"), "{out}");
    assert!(h2.status_json()["exposed"].as_array().is_none_or(|e| e.is_empty()), "{}", h2.status_json()["exposed"]);
    let gw2 = ip_of(h2.meshnet(&["expose", "-h", "gw2"]).expect_ok("expose -h").last_line().unwrap_or_default());
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "gw2.meshnet.local", "A") == [gw2.clone()]), "{}", dns_status(&h1));
    h2.meshnet(&["hide"]).expect_ok("hide");
    assert!(wait_until(SECS(5), || rcode(&c1.ns, &server, "gw2.meshnet.local", "A") == "NXDOMAIN"), "{}", dns_status(&h1));

    // Forwarding: the test's resolver answers; what it ignores is SERVFAIL, quickly.
    assert_eq!(short(&c1.ns, &server, EXTERNAL, "A"), [EXTERNAL_ADDR.to_string()]);
    let t = Instant::now();
    assert_eq!(rcode(&c1.ns, &server, "silent.example.org", "A"), "SERVFAIL");
    assert!(t.elapsed() < SECS(6), "SERVFAIL took {:?}", t.elapsed());

    // Several addresses: all answered, each first in turn.
    h2.meshnet(&["dns-add", "10.2.1.201", "10.2.1.202", "10.2.1.203", &c2.ns, "-h", "multi"]).expect_ok("dns-add multi");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "multi.meshnet.local", "A").len() == 3));
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let v = short(&c1.ns, &server, "multi.meshnet.local", "A");
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, ["10.2.1.201", "10.2.1.202", "10.2.1.203"]);
        firsts.insert(v[0].clone());
    }
    assert_eq!(firsts.len(), 3, "rotation: {firsts:?}");

    // Removal reaches router 1 within seconds.
    h2.meshnet(&["dns-remove", &c2.ns, "-h", "multi"]).expect_ok("dns-remove multi");
    let t = Instant::now();
    assert!(wait_until(SECS(5), || rcode(&c1.ns, &server, "multi.meshnet.local", "A") == "NXDOMAIN"), "removal not seen");
    eprintln!("removal seen on router 1 after {} ms", t.elapsed().as_millis());
    assert_eq!(short(&c1.ns, &server, "db.meshnet.local", "A"), [ip2.clone()], "the other name stays");

    // Records survive kill -9 and a relaunch.
    kill9(&h2);
    h2.launch(&["--resume"]);
    let own = own_records(&h2, &n2);
    assert_eq!(own, [("db.meshnet.local.".to_string(), ip2.clone())], "after kill -9: {}", dns_status(&h2));
    assert!(wait_until(SECS(30), || established(&h1) >= 1), "h2 did not reconnect");

    // A partition: router 2 removes db while cut off; router 1 still answers
    // the old record, and learns of the removal once the partition heals.
    ip(&["-n", &h2.ns, "link", "set", "eth0", "down"]);
    // Until router 1 closed the connection (UDP lost for 30 s): nothing queued on it survives.
    let connected_to_2 = |h: &Host| connections(&h.status_json()).iter().any(|c| c["peer"] == n2.as_str());
    assert!(wait_until(SECS(60), || !connected_to_2(&h1)), "the partition did not close the connection");
    h2.meshnet(&["dns-remove", &c2.ns]).expect_ok("dns-remove during the partition");
    assert!(own_records(&h2, &n2).is_empty());
    assert_eq!(short(&c1.ns, &server, "db.meshnet.local", "A"), [ip2.clone()], "router 1 cannot know yet");
    ip(&["-n", &h2.ns, "link", "set", "eth0", "up"]);
    let t = Instant::now();
    assert!(
        wait_until(SECS(90), || rcode(&c1.ns, &server, "db.meshnet.local", "A") == "NXDOMAIN"),
        "the removal did not reach router 1 after the partition healed: {}",
        dns_status(&h1)
    );
    eprintln!("after the partition healed, the removal reached router 1 in {} ms", t.elapsed().as_millis());
    h2.meshnet(&["dns-add", &c2.ns, "-h", "db"]).expect_ok("dns-add db again");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "db.meshnet.local", "A") == [ip2.clone()]));

    // A flood of 10 000 queries from c1, plus garbage: answered, counted, and
    // the router's API answers meanwhile.
    let before = dns_status(&h1)["counters"].clone();
    let server_addr: SocketAddr = format!("{server}:53").parse().unwrap();
    let flooding = Arc::new(AtomicBool::new(true));
    let api_ms = {
        let (h1c, flooding) = (h1.clone(), flooding.clone());
        std::thread::spawn(move || {
            let mut worst = 0u128;
            while flooding.load(Ordering::Relaxed) {
                let t = Instant::now();
                h1c.meshnet(&["status"]).expect_ok("status during the flood");
                worst = worst.max(t.elapsed().as_millis());
                std::thread::sleep(Duration::from_millis(100));
            }
            worst
        })
    };
    let t = Instant::now();
    let (sent, answered) = in_netns(&c1.ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        sock.send_to(b"\x00\x01garbage that is not DNS", server_addr).unwrap();
        let (mut sent, mut answered) = (0u32, 0u32);
        let mut buf = [0u8; 1500];
        for batch in 0..100u16 {
            for i in 0..100u16 {
                let mut q = Message::query();
                q.metadata.id = batch * 100 + i;
                q.metadata.message_type = MessageType::Query;
                q.add_query(Query::query(Name::from_ascii("db.meshnet.local.").unwrap(), RecordType::A));
                sock.send_to(&q.to_vec().unwrap(), server_addr).unwrap();
                sent += 1;
            }
            let mut got = 0;
            while got < 100 {
                let Ok((n, _)) = sock.recv_from(&mut buf) else { break };
                if Message::from_vec(&buf[..n]).is_ok_and(|m| m.answers.len() == 1) {
                    got += 1;
                }
            }
            answered += got;
        }
        (sent, answered)
    });
    let flood_ms = t.elapsed().as_millis();
    flooding.store(false, Ordering::Relaxed);
    let worst_api = api_ms.join().unwrap();
    eprintln!("flood: {answered}/{sent} answered in {flood_ms} ms; slowest `status` meanwhile {worst_api} ms");
    assert!(answered >= sent * 99 / 100, "{answered}/{sent} answered");
    assert!(worst_api < 2000, "the API took {worst_api} ms during the flood");
    let after = dns_status(&h1)["counters"].clone();
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("dropped_garbage"), 1, "{after}");
    assert!(delta("answered") >= u64::from(answered), "{after}");
    // The plain form shows the counters too.
    let text = h1.meshnet(&["status", "dns"]).expect_ok("status dns").stdout;
    let queries = format!("Queries: {} ({} answered,", after["queries"], after["answered"]);
    assert!(text.contains(&queries) && text.contains("garbage dropped") && text.contains("Record sets: IPv4"), "{text}");

    // `reset` of router 2 takes its records off router 1 too (its targets are
    // gone and their addresses back in IPAM, for others to get).
    h2.meshnet(&["reset"]).expect_ok("reset h2");
    assert!(
        wait_until(SECS(10), || rcode(&c1.ns, &server, "db.meshnet.local", "A") == "NXDOMAIN"),
        "router 1 still answers db after router 2's reset: {}",
        dns_status(&h1)
    );
    assert!(own_records(&h1, &n2).is_empty(), "{}", dns_status(&h1));

    stop.store(true, Ordering::Relaxed);
    let forwarded = resolver.join().unwrap();
    assert!(forwarded >= 1);
}

/// IPv6 in meshnet DNS: dual-stack routers (an IPv4 and an IPv6
/// `--ipalloc-range`); a name registered on router 2 for a dual-stack
/// container gets an A and an AAAA record; router 1's server (asked from a
/// container on host 1) answers both, `dig -x` of the IPv6 address gives the
/// name, an explicit mixed list (`dns-add fd.. 10.. TARGET`) registers both,
/// a name with one family answers NOERROR with no data for the other, and a
/// removal of the IPv6 address (then of the name) reaches router 1 within
/// seconds. `dns-lookup` and `status dns --json` show both families.
#[test]
fn ipv6_names_across_routers() {
    const RANGE4: &str = "10.46.0.0/16";
    const RANGE6: &str = "fd46::/64";
    let opts = ["--no-discovery", "--ipalloc-range", RANGE4, "--ipalloc-range", RANGE6];
    let Some(lab) = Lab::new("ipv6_names_across_routers") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    h1.launch(&opts);
    let n2 = h2.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    assert!(wait_until(SECS(30), || established(&h1) >= 1 && established(&h2) >= 1), "h1 and h2 did not connect");
    h1.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h1");
    h2.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h2");
    let server = expose_dual_stack(&h1);
    assert!(wait_until(SECS(5), || dns_status(&h1)["listen"] == format!("{server}:53")), "{}", dns_status(&h1));

    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    h1.meshnet(&["attach", &c1.ns]).expect_ok("attach c1");
    let (ip4, ip6) = attach_dual_stack(&h2, &c2);
    assert!(ping_until(&c1.ns, &server, SECS(20)), "c1 does not reach h1's exposed {server}");

    // Both of c2's addresses, registered on router 2, resolve on router 1.
    let out = h2.meshnet(&["dns-add", &c2.ns, "-h", "db"]).expect_ok("dns-add db");
    assert_eq!(out.stdout.trim(), format!("db.meshnet.local. {ip4} {ip6}"));
    let t = Instant::now();
    assert!(
        wait_until(SECS(10), || short(&c1.ns, &server, "db.meshnet.local", "AAAA") == [ip6.clone()]),
        "router 1 does not answer AAAA db: {}",
        dns_status(&h1)
    );
    eprintln!("AAAA of db registered on router 2 answered by router 1 after {} ms", t.elapsed().as_millis());
    assert_eq!(short(&c1.ns, &server, "db.meshnet.local", "A"), [ip4.clone()]);
    let ptr = dig(&c1.ns, &server, &["+short", "-x", &ip6]);
    assert_eq!(ptr.stdout.trim(), "db.meshnet.local.", "{ptr}");
    let ptr4 = dig(&c1.ns, &server, &["+short", "-x", &ip4]);
    assert_eq!(ptr4.stdout.trim(), "db.meshnet.local.", "{ptr4}");
    let full = dig(&c1.ns, &server, &["+noall", "+answer", "db.meshnet.local", "AAAA"]);
    assert!(full.stdout.split_whitespace().nth(1) == Some("1") && full.stdout.contains("AAAA"), "TTL 1 expected: {full}");
    let lookup = h1.meshnet(&["dns-lookup", "db"]).expect_ok("dns-lookup");
    assert_eq!(lookup.stdout.lines().collect::<Vec<_>>(), [ip4.as_str(), ip6.as_str()]);
    let mut own = own_records(&h1, &n2);
    own.sort();
    let mut want = vec![("db.meshnet.local.".to_string(), ip4.clone()), ("db.meshnet.local.".to_string(), ip6.clone())];
    want.sort();
    assert_eq!(own, want, "{}", dns_status(&h1));
    assert!(dns_status(&h2)["own_version6"].as_u64().unwrap_or(0) > 0, "{}", dns_status(&h2));

    // An explicit mixed list; several IPv6 addresses rotate; a family a name
    // lacks is NOERROR with no answers.
    h2.meshnet(&["dns-add", "fd46::aa", "fd46::bb", "10.46.9.9", &c2.ns, "-h", "mixed"]).expect_ok("dns-add mixed");
    h2.meshnet(&["dns-add", "fd46::cc", &c2.ns, "-h", "only6"]).expect_ok("dns-add only6");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "only6.meshnet.local", "AAAA") == ["fd46::cc"]));
    assert_eq!(short(&c1.ns, &server, "mixed.meshnet.local", "A"), ["10.46.9.9"]);
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let v = short(&c1.ns, &server, "mixed.meshnet.local", "AAAA");
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, ["fd46::aa", "fd46::bb"]);
        firsts.insert(v[0].clone());
    }
    assert_eq!(firsts.len(), 2, "rotation: {firsts:?}");
    assert_eq!(rcode(&c1.ns, &server, "only6.meshnet.local", "A"), "NOERROR");
    assert!(short(&c1.ns, &server, "only6.meshnet.local", "A").is_empty());
    assert_eq!(rcode(&c1.ns, &server, "nobody.meshnet.local", "AAAA"), "NXDOMAIN");
    let bad = h2.meshnet(&["dns-add", "fd46::zz", &c2.ns, "-h", "x"]);
    assert!(!bad.ok() && bad.stderr.contains("not an IPv4 address"), "{bad}");
    let bad = h2.meshnet(&["dns-add", "ff02::1", &c2.ns, "-h", "x"]);
    assert!(!bad.ok() && bad.stderr.contains("not a unicast address"), "{bad}");

    // Removing the IPv6 address only: AAAA goes within seconds, A stays.
    h2.meshnet(&["dns-remove", &ip6, &c2.ns, "-h", "db"]).expect_ok("dns-remove the IPv6 address");
    let t = Instant::now();
    assert!(
        wait_until(SECS(5), || rcode(&c1.ns, &server, "db.meshnet.local", "AAAA") == "NOERROR"
            && short(&c1.ns, &server, "db.meshnet.local", "AAAA").is_empty()),
        "the AAAA removal did not reach router 1"
    );
    eprintln!("AAAA removal seen on router 1 after {} ms", t.elapsed().as_millis());
    assert_eq!(short(&c1.ns, &server, "db.meshnet.local", "A"), [ip4.clone()]);
    let ptr = dig(&c1.ns, &server, &["+short", "-x", &ip6]);
    assert!(!ptr.stdout.contains("db.meshnet.local"), "{ptr}");
    // Removing the target: every name of both families goes.
    h2.meshnet(&["dns-remove", &c2.ns]).expect_ok("dns-remove c2");
    assert!(
        wait_until(SECS(5), || rcode(&c1.ns, &server, "mixed.meshnet.local", "AAAA") == "NXDOMAIN"
            && rcode(&c1.ns, &server, "only6.meshnet.local", "AAAA") == "NXDOMAIN"
            && rcode(&c1.ns, &server, "db.meshnet.local", "A") == "NXDOMAIN"),
        "the removal of c2's names did not reach router 1: {}",
        dns_status(&h1)
    );
    assert!(own_records(&h1, &n2).is_empty(), "{}", dns_status(&h1));

    // Records of both families survive kill -9 and a relaunch.
    h2.meshnet(&["dns-add", &c2.ns, "-h", "db"]).expect_ok("dns-add db again");
    kill9(&h2);
    h2.launch(&["--resume"]);
    let mut own = own_records(&h2, &n2);
    own.sort();
    assert_eq!(own, want, "after kill -9: {}", dns_status(&h2));
    assert!(wait_until(SECS(30), || established(&h1) >= 1), "h2 did not reconnect");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "db.meshnet.local", "AAAA") == [ip6.clone()]));
}

/// Mixed versions: routers 1 and 2 of this build, router 3 of an earlier one
/// (`MESHNET_OLD_BIN`; the test is skipped without it). Router 2's dual-stack
/// name resolves A and AAAA on router 1; router 3 gets both records if its
/// build has `CAP_DNS6` (since 2026-12-06: its `status dns` counts `sets6_*`),
/// else its IPv4 record only (it is never sent IPv6 gossip, so it rejects
/// nothing and keeps its connections); router 3's own IPv4 record resolves on
/// router 1 (AAAA: no data); removals reach both.
#[test]
fn ipv6_names_with_a_router_of_the_previous_build() {
    let Some(old_bin) = std::env::var_os("MESHNET_OLD_BIN") else {
        eprintln!("skipped: set MESHNET_OLD_BIN to a meshnet binary of the previous build");
        return;
    };
    const RANGE4: &str = "10.47.0.0/16";
    const RANGE6: &str = "fd47::/64";
    let opts = ["--ipalloc-range", RANGE4, "--ipalloc-range", RANGE6];
    let Some(lab) = Lab::new("ipv6_names_mixed_versions") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    eprintln!("router 3 runs {}", std::path::Path::new(&old_bin).display());
    let h3 = lab.add_host(3).with_bin(old_bin);
    h1.launch(&opts);
    h2.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    h3.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    assert!(
        wait_until(SECS(40), || established(&h1) == 2 && established(&h2) == 2 && established(&h3) == 2),
        "no full mesh: {} {} {}",
        established(&h1),
        established(&h2),
        established(&h3)
    );
    for h in [&h1, &h2, &h3] {
        h.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime");
    }
    let server = expose_dual_stack(&h1);
    assert!(wait_until(SECS(5), || dns_status(&h1)["listen"] == format!("{server}:53")), "{}", dns_status(&h1));
    let (c1, c2, c3) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2), lab.add_container(&h3, 3));
    h1.meshnet(&["attach", &c1.ns]).expect_ok("attach c1");
    let (ip4, ip6) = attach_dual_stack(&h2, &c2);
    assert!(ping_until(&c1.ns, &server, SECS(20)), "c1 does not reach h1's exposed {server}");

    h2.meshnet(&["dns-add", &c2.ns, "-h", "db"]).expect_ok("dns-add db");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "db.meshnet.local", "AAAA") == [ip6.clone()]), "AAAA db on router 1");
    assert_eq!(short(&c1.ns, &server, "db.meshnet.local", "A"), [ip4.clone()]);
    // The old router holds the IPv4 record, and the IPv6 one only if its
    // build has IPv6 records (a build before CAP_DNS6 has no `sets6_*`).
    let dns6 = dns_status(&h3)["counters"].get("sets6_rejected").is_some();
    eprintln!("router 3's build {} CAP_DNS6", if dns6 { "has" } else { "predates" });
    let want3 = if dns6 { format!("{ip4}\n{ip6}") } else { ip4.clone() };
    assert!(
        wait_until(SECS(10), || h3.meshnet(&["dns-lookup", "db"]).stdout.trim() == want3),
        "router 3 (want {want3:?}): {}",
        h3.meshnet(&["dns-lookup", "db"])
    );
    // Its own (IPv4) record reaches router 1, which has no IPv6 data for it.
    h3.meshnet(&["dns-add", "10.47.9.7", &c3.ns, "-h", "old"]).expect_ok("dns-add on the old router");
    assert!(wait_until(SECS(10), || short(&c1.ns, &server, "old.meshnet.local", "A") == ["10.47.9.7"]), "old on router 1");
    assert_eq!(rcode(&c1.ns, &server, "old.meshnet.local", "AAAA"), "NOERROR");
    assert!(short(&c1.ns, &server, "old.meshnet.local", "AAAA").is_empty());
    // Removals reach both kinds of router.
    h2.meshnet(&["dns-remove", &c2.ns]).expect_ok("dns-remove c2");
    assert!(wait_until(SECS(5), || rcode(&c1.ns, &server, "db.meshnet.local", "AAAA") == "NXDOMAIN"), "removal on router 1");
    assert!(wait_until(SECS(5), || !h3.meshnet(&["dns-lookup", "db"]).ok()), "removal on router 3");
    // Nobody refused anything (but its own set relayed back), and nobody
    // dropped a connection.
    let keys3: &[&str] = if dns6 { &["sets_rejected", "sets6_rejected"] } else { &["sets_rejected"] };
    for (h, keys) in [(&h1, &["sets_rejected", "sets6_rejected"][..]), (&h2, &["sets_rejected", "sets6_rejected"][..]), (&h3, keys3)] {
        let st = dns_status(h);
        for k in keys {
            let why = st["counters"][k].as_object().unwrap_or_else(|| panic!("{}: no {k}: {st}", h.ns));
            assert!(why.iter().all(|(w, n)| w == "own" || n.as_u64() == Some(0)), "{}: {k}: {st}", h.ns);
        }
    }
    if !dns6 {
        assert!(dns_status(&h3)["records"].as_array().unwrap().iter().all(|r| r["address"].as_str().unwrap().parse::<Ipv4Addr>().is_ok()));
    }
    assert_eq!((established(&h1), established(&h2), established(&h3)), (2, 2, 2));
    let conns3 = connections(&h3.status_json());
    assert!(conns3.iter().all(|c| c["state"] == "established"), "{conns3:?}");
}
