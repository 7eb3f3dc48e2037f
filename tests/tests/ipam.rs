//! IPAM end-to-end: real `meshnet` routers in network namespaces hand out
//! addresses themselves (issue "IP address management").
//!
//! Each test builds its own [`Lab`] (see `meshnet_tests::lab`). They need root
//! and skip otherwise; `MESHNET_BIN=...` picks the binary, `MESHNET_LAB_KEEP=1`
//! keeps a failed lab. On a failure each host's `status ipam` is printed before
//! the lab's own dump.
//!
//! 1. three hosts, `attach` with no address on each: distinct addresses in the
//!    default range, everyone pings everyone (first allocations concurrent)
//! 2. `kill -9` a router right after two attaches, relaunch: same addresses, new
//!    attaches anywhere never duplicate one, pings work
//! 3. `rmpeer` of a dead host: its space is unreachable until then (an allocation
//!    needing it waits and fails), afterwards it is usable; 3b. a host removed
//!    while down comes back with its state: it refuses the takeover loudly
//! 4. `--ipalloc-init consensus=3`: alone no agreement (attach fails saying so),
//!    with a second host `prime` succeeds, a late third host gets addresses
//! 5. bad IPAM input fails clearly and changes nothing; 5b. a bare CIDR held by
//!    another container (on this host or another) is refused; 5c. one used while
//!    its owner was cut off, and given away there meanwhile, is a listed conflict
//!    until one container lets go
//! 6. two meshes with different `--ipalloc-range` refuse each other, both logs
//!    name both peers, both keep their allocations
//! 7. Weave's own tests replayed: an observer calls the election (350), a
//!    rolling `reset` hands the ranges on (330), a relaunch with another range
//!    or name starts IPAM afresh and short names work (362, 380), an address
//!    attached before agreement is not handed out again (320)

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const DEFAULT_RANGE: &str = "10.32.0.0/12";
/// `attach` waits up to 30 s for an address; give the command room beyond that.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(50);

// ---------------------------------------------------------------------------
// Helpers

/// Prints every host's `status ipam` when the test panics. Declare it after the
/// lab so that it runs first, while the routers still answer.
struct IpamDiag<'a>(&'a Lab);

impl Drop for IpamDiag<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for h in self.0.hosts() {
            let out = h.meshnet_full(&["status", "ipam", "--json"], &[], SECS(10));
            eprintln!("==== status ipam on {} ====\n{out}", h.ns);
        }
    }
}

/// `a.b.c.d/len` -> (address, prefix).
#[track_caller]
fn parse_cidr(s: &str) -> (Ipv4Addr, u8) {
    let (a, p) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("{s:?} is not a.b.c.d/len"));
    let ip: Ipv4Addr = a.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    let p: u8 = p.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    assert!(p <= 32, "{s:?}: prefix > 32");
    (ip, p)
}

/// Whether address `ip` lies inside network `cidr`.
fn inside(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, p) = parse_cidr(cidr);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// `meshnet attach ARGS... <c>` with room for its 30 s wait.
fn attach_out(h: &Host, c: &Container, args: &[&str]) -> Out {
    let mut a = vec!["attach"];
    a.extend_from_slice(args);
    a.push(&c.ns);
    h.meshnet_full(&a, &[], ATTACH_TIMEOUT)
}

/// `attach ARGS... c`, which must succeed and print exactly one address; checks
/// that `ethwe` in the container has it. Returns `a.b.c.d/len`.
#[track_caller]
fn attach_one(h: &Host, c: &Container, args: &[&str]) -> String {
    let out = attach_out(h, c, args).expect_ok(&format!("attach {args:?} {} on {}", c.ns, h.ns));
    let printed: Vec<&str> = out
        .last_line()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        printed.len(),
        1,
        "attach {args:?} {} should print one address: {out}",
        c.ns
    );
    let addr = printed[0].to_string();
    parse_cidr(&addr);
    let have = container_addrs(c);
    assert!(
        have.contains(&addr),
        "attach printed {addr} but ethwe in {} has {have:?}",
        c.ns
    );
    eprintln!(
        "attach {args:?} {} on {}: {addr} ({:.1}s)",
        c.ns,
        h.ns,
        out.elapsed.as_secs_f64()
    );
    addr
}

/// IPv4 addresses of `ethwe` in a container (empty if it has none).
fn container_addrs(c: &Container) -> Vec<String> {
    link(&c.ns, "ethwe")
        .map(|l| ipv4_of(&l))
        .unwrap_or_default()
}

/// The address part of `a.b.c.d/len`.
fn ip_of(cidr: &str) -> String {
    cidr.split('/').next().unwrap_or(cidr).to_string()
}

/// `meshnet status ipam --json` (must succeed).
#[track_caller]
fn ipam(h: &Host) -> Value {
    let out = h
        .meshnet(&["status", "ipam", "--json"])
        .expect_ok(&format!("status ipam on {}", h.ns));
    let v = out.json();
    assert!(
        v.is_object(),
        "status ipam --json on {} is not an object: {out}",
        h.ns
    );
    v
}

fn agreed(v: &Value) -> bool {
    v["state"]["agreed"] == true
}

/// `ip -> target` of a `status ipam` document.
fn ipam_allocs(v: &Value) -> BTreeMap<String, String> {
    v["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["ip"].as_str().unwrap_or("?").to_string(),
                a["target"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn owner<'a>(v: &'a Value, peer: &str) -> Option<&'a Value> {
    v["owners"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["peer"] == peer))
}

/// Sum of `free` over the reachable owners of a `status ipam` document.
fn reachable_free(v: &Value) -> u64 {
    v["owners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["reachable"] == true)
        .map(|o| o["free"].as_u64().unwrap_or(0))
        .sum()
}

/// `(host ns, target, address)` for every address in `ps` of every given host.
#[track_caller]
fn all_ps(hosts: &[&Host]) -> Vec<(String, String, String)> {
    let mut v = vec![];
    for h in hosts {
        for e in h.ps_json() {
            for a in e["addresses"].as_array().into_iter().flatten() {
                v.push((
                    h.ns.clone(),
                    e["target"].as_str().unwrap_or("?").to_string(),
                    a.as_str().unwrap_or("?").to_string(),
                ));
            }
        }
    }
    v
}

/// Panics naming the holders if any address (ignoring the prefix) appears twice.
#[track_caller]
fn assert_no_duplicates(entries: &[(String, String, String)]) {
    let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (h, t, a) in entries {
        by_ip
            .entry(ip_of(a))
            .or_default()
            .push(format!("{t} on {h}"));
    }
    let dups: Vec<String> = by_ip
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(ip, v)| format!("{ip}: {}", v.join(", ")))
        .collect();
    assert!(
        dups.is_empty(),
        "DUPLICATE ADDRESSES handed out: {dups:#?}\nall: {entries:#?}"
    );
}

/// Pings `ip` from `from` until it answers, then three more must answer.
#[track_caller]
fn assert_reaches(from: &Container, ip: &str, timeout: Duration) {
    let t = Instant::now();
    assert!(
        ping_until(&from.ns, ip, timeout),
        "{} cannot ping {ip} within {timeout:?}",
        from.ns
    );
    assert!(
        ping(&from.ns, ip, 3),
        "{} reached {ip} once, then lost it",
        from.ns
    );
    eprintln!(
        "{} -> {ip}: ok after {:.1}s",
        from.ns,
        t.elapsed().as_secs_f64()
    );
}

/// Waits until every host has an established connection with every other.
#[track_caller]
fn wait_meshed(hosts: &[(&Host, &str)], timeout: Duration) {
    let ok = wait_until(timeout, || {
        hosts.iter().all(|(h, me)| {
            let s = h.status_json();
            hosts
                .iter()
                .filter(|(_, n)| n != me)
                .all(|(_, n)| established_with(&s, n))
        })
    });
    if !ok {
        let views: Vec<String> = hosts
            .iter()
            .map(|(h, _)| {
                format!(
                    "{}: {:#}",
                    h.ns,
                    connections(&h.status_json()).into_iter().collect::<Value>()
                )
            })
            .collect();
        panic!(
            "hosts did not mesh within {timeout:?}:\n{}",
            views.join("\n")
        );
    }
}


/// Three hosts on `range`, h2 joined to h1 and h3 to h2, meshed. Their names.
fn three_in_a_line(lab: &Lab, range: &str) -> [(Host, String); 3] {
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let opts = ["--ipalloc-range", range];
    let n1 = h1.launch(&opts);
    let n2 = h2.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    let n3 = h3.launch(&[&opts[..], &[h2.ip.as_str()]].concat());
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));
    [(h1, n1), (h2, n2), (h3, n3)]
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

// ---------------------------------------------------------------------------
// Scenarios

/// Scenario 1: three hosts meshed, one container each attached with no address
/// (the three attaches run at once, so consensus starts on all three together):
/// three distinct addresses in 10.32.0.0/12, and everyone pings everyone.
#[test]
fn three_hosts_allocate_distinct_addresses() {
    let Some(lab) = Lab::new("alloc3") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let cs = [
        lab.add_container(&h1, 1),
        lab.add_container(&h2, 2),
        lab.add_container(&h3, 3),
    ];
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    let n3 = h3.launch(&[&h2.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));

    let hs = [&h1, &h2, &h3];
    let t = Instant::now();
    let addrs: Vec<String> = std::thread::scope(|s| {
        let js: Vec<_> = hs
            .iter()
            .zip(&cs)
            .map(|(h, c)| s.spawn(move || attach_out(h, c, &[])))
            .collect();
        js.into_iter()
            .zip(&cs)
            .map(|(j, c)| {
                let out = j.join().expect("attach thread");
                let out = out.expect_ok(&format!("attach (no address) {}", c.ns));
                out.last_line().unwrap_or_default().to_string()
            })
            .collect()
    });
    eprintln!(
        "three concurrent attaches without an address took {:.1}s: {addrs:?}",
        t.elapsed().as_secs_f64()
    );
    let mut ips = BTreeSet::new();
    for (a, c) in addrs.iter().zip(&cs) {
        let (ip, prefix) = parse_cidr(a);
        assert!(
            inside(ip, DEFAULT_RANGE),
            "{} got {a}, outside {DEFAULT_RANGE}",
            c.ns
        );
        assert_eq!(
            prefix, 12,
            "{} got {a}: the default subnet is the whole range /12",
            c.ns
        );
        assert_eq!(
            container_addrs(c),
            vec![a.clone()],
            "ethwe of {} does not carry {a}",
            c.ns
        );
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 3, "addresses are not distinct: {addrs:?}");
    assert_no_duplicates(&all_ps(&hs));

    // Every router agrees on the ring and knows its own allocation.
    let mut seeds = BTreeSet::new();
    for ((h, c), a) in hs.iter().zip(&cs).zip(&addrs) {
        let v = ipam(h);
        assert!(agreed(&v), "ring not agreed on {}: {v:#}", h.ns);
        assert_eq!(v["range"], DEFAULT_RANGE, "{v:#}");
        seeds.insert(v["state"]["seeds"].to_string());
        let allocs = ipam_allocs(&v);
        assert_eq!(
            allocs.len(),
            1,
            "{} should hold one allocation: {v:#}",
            h.ns
        );
        let (ip, target) = allocs.iter().next().expect("one");
        assert_eq!(*ip, ip_of(a), "{v:#}");
        assert!(
            target.contains(&c.ns),
            "allocation target {target:?} does not name {}",
            c.ns
        );
        assert_eq!(v["unreachable_space"], 0, "{v:#}");
    }
    assert_eq!(
        seeds.len(),
        1,
        "routers disagree on the ring's seeds: {seeds:?}"
    );

    for (i, from) in cs.iter().enumerate() {
        for (k, to) in addrs.iter().enumerate() {
            if i != k {
                assert_reaches(from, &ip_of(to), SECS(30));
            }
        }
    }
}

/// Scenario 2: `kill -9` of a router right after two attaches; relaunched on the
/// same state dir it keeps those addresses, and no attach anywhere afterwards
/// (nor on another host while it was down) hands out an address in use.
#[test]
fn kill9_and_relaunch_keeps_addresses() {
    let Some(lab) = Lab::new("kill9") else { return };
    let _diag = IpamDiag(&lab);
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let c1 = lab.add_container(&h1, 1);
    let (c2a, c2b) = (lab.add_container(&h2, 2), lab.add_container(&h2, 3));
    let c3 = lab.add_container(&h3, 4);
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    let n3 = h3.launch(&[&h2.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));

    let a1 = attach_one(&h1, &c1, &[]);
    let a3 = attach_one(&h3, &c3, &[]);
    let a2a = attach_one(&h2, &c2a, &[]);
    let a2b = attach_one(&h2, &c2b, &[]);
    // No pause: the allocation must be on disk before attach answered.
    let old_pid = kill9(&h2);
    let ps_before: BTreeSet<(String, String)> = [(&c2a, &a2a), (&c2b, &a2b)]
        .iter()
        .map(|(c, a)| (c.ns.clone(), a.to_string()))
        .collect();

    // While h2 is down, h1 allocates from its own space.
    let c5 = lab.add_container(&h1, 5);
    let a5 = attach_one(&h1, &c5, &[]);
    for a in [&a2a, &a2b] {
        assert_ne!(
            ip_of(&a5),
            ip_of(a),
            "h1 handed out {a5}, held by a container of dead h2"
        );
    }

    let t = Instant::now();
    let again = h2.launch(&[]);
    assert_eq!(again, n2, "h2 changed its peer name across kill -9");
    assert_ne!(router_pid(&h2), old_pid);
    eprintln!("relaunch took {:.1}s", t.elapsed().as_secs_f64());
    let ps_after: BTreeSet<(String, String)> = h2
        .ps_json()
        .iter()
        .flat_map(|e| {
            let t = e["target"].as_str().unwrap_or("?").to_string();
            e["addresses"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |a| (t.clone(), a.as_str().unwrap_or("?").to_string()))
        })
        .collect();
    assert_eq!(
        ps_after, ps_before,
        "ps on h2 changed across kill -9 + launch"
    );
    let v2 = ipam(&h2);
    let allocs = ipam_allocs(&v2);
    for (c, a) in [(&c2a, &a2a), (&c2b, &a2b)] {
        assert!(
            allocs.get(&ip_of(a)).is_some_and(|t| t.contains(&c.ns)),
            "h2's IPAM forgot {a} of {} across kill -9: {v2:#}",
            c.ns
        );
    }
    assert!(agreed(&v2), "{v2:#}");
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));

    // New attaches everywhere, h2 first (its own space, as restored).
    let (c6, c7) = (lab.add_container(&h2, 6), lab.add_container(&h2, 7));
    let (c8, c9) = (lab.add_container(&h3, 8), lab.add_container(&h1, 9));
    let a6 = attach_one(&h2, &c6, &[]);
    let a7 = attach_one(&h2, &c7, &[]);
    let a8 = attach_one(&h3, &c8, &[]);
    let a9 = attach_one(&h1, &c9, &[]);
    let all = all_ps(&[&h1, &h2, &h3]);
    eprintln!("all addresses: {all:?}");
    assert_eq!(all.len(), 9, "{all:#?}");
    assert_no_duplicates(&all);
    // And what the containers really carry.
    let carried: Vec<(String, String, String)> = [&c1, &c2a, &c2b, &c3, &c5, &c6, &c7, &c8, &c9]
        .iter()
        .flat_map(|c| {
            container_addrs(c)
                .into_iter()
                .map(|a| ("ethwe".to_string(), c.ns.clone(), a))
        })
        .collect();
    assert_eq!(carried.len(), 9, "{carried:#?}");
    assert_no_duplicates(&carried);

    // The restored containers work with old and new ones.
    assert_reaches(&c2a, &ip_of(&a1), SECS(30));
    assert_reaches(&c2b, &ip_of(&a3), SECS(10));
    assert_reaches(&c9, &ip_of(&a2a), SECS(10));
    assert_reaches(&c8, &ip_of(&a2b), SECS(10));
    assert_reaches(&c6, &ip_of(&a5), SECS(10));
    assert_reaches(&c5, &ip_of(&a7), SECS(10));
    assert_reaches(&c1, &ip_of(&a8), SECS(10));
    assert_reaches(&c3, &ip_of(&a6), SECS(10));
    assert_reaches(&c2b, &ip_of(&a9), SECS(10));
}

/// Scenario 3: a host dies for good; its space shows as unreachable, an
/// allocation that needs it waits and fails, `rmpeer` on h1 takes it over and
/// then the whole range can be allocated. A /28 range makes the space run out.
#[test]
fn rmpeer_takes_over_a_dead_hosts_space() {
    const RANGE: &str = "10.33.0.0/28";
    let Some(lab) = Lab::new("rmpeer") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let [(h1, _), (h2, n2), (h3, n3)] = three_in_a_line(&lab, RANGE);

    let mut next_c = 1u8;
    let mut new_container = |h: &Host| {
        let c = lab.add_container(h, next_c);
        next_c += 1;
        c
    };
    let c1 = new_container(&h1);
    let a1 = attach_one(&h1, &c1, &[]);
    let (c3a, c3b) = (new_container(&h3), new_container(&h3));
    let a3a = attach_one(&h3, &c3a, &[]);
    let a3b = attach_one(&h3, &c3b, &[]);
    assert_reaches(&c1, &ip_of(&a3a), SECS(30));
    for a in [&a1, &a3a, &a3b] {
        assert!(inside(parse_cidr(a).0, RANGE), "{a} outside {RANGE}");
    }
    // h3 must own space, or there is nothing to take over.
    let seen = wait_until(SECS(10), || {
        owner(&ipam(&h1), &n3).is_some_and(|o| o["size"].as_u64().unwrap_or(0) > 0)
    });
    assert!(
        seen,
        "h1 does not see h3 ({n3}) owning space: {:#}",
        ipam(&h1)
    );

    // h3 dies for good: SIGKILL, and its underlay link down so nothing revives it.
    kill9(&h3);
    ip(&["-n", &h3.ns, "link", "set", UNDERLAY_IF, "down"]).expect_ok("underlay of h3 down");
    let mut v1 = Value::Null;
    let noticed = wait_until(SECS(30), || {
        v1 = ipam(&h1);
        v1["unreachable_space"].as_u64().unwrap_or(0) > 0
            && owner(&v1, &n3).is_some_and(|o| o["reachable"] == false)
    });
    assert!(
        noticed,
        "h1 does not report h3's space as unreachable: {v1:#}"
    );
    let dead_space = v1["unreachable_space"].as_u64().unwrap_or(0);
    let h3_ranges = owner(&v1, &n3)
        .map(|o| o["ranges"].clone())
        .unwrap_or_default();
    eprintln!("h3's space, unreachable: {dead_space} addresses in {h3_ranges}");
    let text = h1
        .meshnet(&["status", "ipam"])
        .expect_ok("status ipam (text)");
    assert!(
        text.stdout.contains("unreachable"),
        "status ipam text does not show the unreachable space: {text}"
    );
    eprintln!("{}", text.stdout);
    // rmpeer of a live peer is refused.
    let live = h1.meshnet(&["rmpeer", &n2]);
    assert!(!live.ok(), "rmpeer of live h2 succeeded: {live}");
    assert!(
        lower(&live.all()).contains("reachable"),
        "rmpeer of a live peer should say it is reachable: {live}"
    );

    // Use up every reachable free address (h1's own, then h2's by donation).
    // The reachable free count has to settle first (h2's count travels by gossip).
    let mut free = 0;
    let settled = wait_until(SECS(10), || {
        let (a, b) = (reachable_free(&ipam(&h1)), reachable_free(&ipam(&h2)));
        free = a;
        a == b
    });
    assert!(
        settled,
        "h1 and h2 disagree about the reachable free space: {:#} {:#}",
        ipam(&h1),
        ipam(&h2)
    );
    eprintln!("reachable free addresses before rmpeer: {free}");
    assert!(
        free > 0 && free < 14,
        "{free} reachable free addresses in a /28 with h3 owning space"
    );
    let mut ours = vec![a1.clone()];
    for _ in 0..free {
        let c = new_container(&h1);
        ours.push(attach_one(&h1, &c, &[]));
    }
    let v1 = ipam(&h1);
    assert_eq!(reachable_free(&v1), 0, "{v1:#}");

    // Now an attach needs h3's space: it waits 30 s and fails, and so does an
    // exact claim of an address in h3's range (both at once, to wait only once).
    let dead_ip = {
        let held: BTreeSet<String> = [&a3a, &a3b].iter().map(|a| ip_of(a)).collect();
        let mut pick = None;
        for r in h3_ranges.as_array().into_iter().flatten() {
            let (s, e) = r.as_str().unwrap_or("").split_once('-').expect("a-b range");
            let (s, e): (Ipv4Addr, Ipv4Addr) = (s.parse().unwrap(), e.parse().unwrap());
            for n in u32::from(s)..=u32::from(e) {
                let ip = Ipv4Addr::from(n);
                let last = u8::try_from(n & 0xff).unwrap_or(0);
                if last != 0 && last != 15 && !held.contains(&ip.to_string()) && pick.is_none() {
                    pick = Some(ip.to_string());
                }
            }
        }
        pick
    };
    let (cx, cy) = (new_container(&h1), new_container(&h1));
    let t = Instant::now();
    let (hr, cxr, cyr) = (&h1, &cx, &cy);
    let (any_out, claim_out) = std::thread::scope(|s| {
        let a = s.spawn(move || attach_out(hr, cxr, &[]));
        let b = dead_ip
            .as_ref()
            .map(|ip| s.spawn(move || attach_out(hr, cyr, &[&format!("ip:{ip}/28")])));
        (
            a.join().expect("thread"),
            b.map(|b| b.join().expect("thread")),
        )
    });
    eprintln!(
        "attaches needing dead h3's space ended after {:.1}s:\n{any_out}\n{}",
        t.elapsed().as_secs_f64(),
        claim_out
            .as_ref()
            .map(|o| o.to_string())
            .unwrap_or_default()
    );
    assert!(
        !any_out.ok() && !any_out.timed_out,
        "attach with only unreachable space left should fail after its wait: {any_out}"
    );
    assert!(
        lower(&any_out.stderr).contains("no address") && lower(&any_out.stderr).contains("free"),
        "the failed attach should say it found no free address: {any_out}"
    );
    assert!(
        container_addrs(&cx).is_empty(),
        "failed attach left addresses in {}",
        cx.ns
    );
    if let Some(out) = &claim_out {
        assert!(
            !out.ok() && !out.timed_out,
            "claim of an address of dead h3 should fail: {out}"
        );
        assert!(
            out.stderr.contains(&n3) && lower(&out.stderr).contains("unreachable"),
            "the failed claim should name unreachable owner {n3}: {out}"
        );
    }
    let v1 = ipam(&h1);
    assert_eq!(
        v1["pending"], 0,
        "failed attaches left pending requests: {v1:#}"
    );

    // rmpeer on h1.
    let out = h1.meshnet(&["rmpeer", &n3]).expect_ok("rmpeer h3 on h1");
    eprintln!("rmpeer: {}", out.stdout.trim());
    assert!(
        out.stdout.contains(&dead_space.to_string()),
        "rmpeer should report taking over {dead_space} addresses: {out}"
    );
    let v1 = ipam(&h1);
    assert_eq!(
        v1["unreachable_space"], 0,
        "unreachable space after rmpeer: {v1:#}"
    );
    assert!(
        owner(&v1, &n3).is_none(),
        "h3 still owns ranges after rmpeer: {v1:#}"
    );
    let taken = wait_until(SECS(10), || {
        let v2 = ipam(&h2);
        v2["unreachable_space"] == 0 && owner(&v2, &n3).is_none()
    });
    assert!(taken, "h2 did not learn of the takeover: {:#}", ipam(&h2));
    let again = h1.meshnet(&["rmpeer", &n3]);
    eprintln!("second rmpeer: {again}");

    // The space is usable again: allocate all of it.
    let free_now = reachable_free(&ipam(&h1));
    assert!(
        free_now >= dead_space.saturating_sub(2),
        "only {free_now} free after taking over {dead_space}: {:#}",
        ipam(&h1)
    );
    let t = Instant::now();
    ours.push(attach_one(&h1, &cx, &[]));
    if let Some(ip) = &dead_ip {
        ours.push(attach_one(&h1, &cy, &[&format!("ip:{ip}/28")]));
    }
    while reachable_free(&ipam(&h1)) > 0 {
        let c = new_container(&h1);
        ours.push(attach_one(&h1, &c, &[]));
    }
    eprintln!(
        "{} more allocations after rmpeer in {:.1}s",
        ours.len() - 1 - free as usize,
        t.elapsed().as_secs_f64()
    );
    assert_no_duplicates(&all_ps(&[&h1, &h2]));
    let used: BTreeSet<String> = ours.iter().map(|a| ip_of(a)).collect();
    assert_eq!(used.len(), ours.len(), "{ours:?}");
    assert_eq!(
        used.len(),
        14,
        "a /28 has 14 usable addresses; h1 got {} after rmpeer: {ours:?}",
        used.len()
    );
    assert_reaches(&c1, &ip_of(ours.last().expect("one")), SECS(10));
}

/// Scenario 3b: a host removed with `rmpeer` while it was down comes back with
/// its state. Its old range is someone else's now: it must refuse the takeover
/// loudly (log, `status ipam` of both sides), never hand out that range quietly
/// alongside the taker, and the others keep the takeover.
#[test]
fn a_host_removed_while_down_refuses_the_takeover_when_back() {
    const RANGE: &str = "10.34.0.0/28";
    let Some(lab) = Lab::new("rmback") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let [(h1, n1), (h2, _), (h3, n3)] = three_in_a_line(&lab, RANGE);
    let c3 = lab.add_container(&h3, 3);
    let a3 = attach_one(&h3, &c3, &[]);
    let owns = wait_until(SECS(10), || {
        owner(&ipam(&h1), &n3).is_some_and(|o| o["size"].as_u64().unwrap_or(0) > 0)
    });
    assert!(owns, "h1 does not see h3 ({n3}) owning space: {:#}", ipam(&h1));
    let h3_size = owner(&ipam(&h3), &n3).and_then(|o| o["size"].as_u64()).unwrap_or(0);

    // h3 dies; once both others see it gone, h1 removes it.
    kill9(&h3);
    let gone = wait_until(SECS(30), || {
        [&h1, &h2]
            .iter()
            .all(|h| owner(&ipam(h), &n3).is_some_and(|o| o["reachable"] == false))
    });
    assert!(gone, "h1 and h2 do not both see h3 unreachable: {:#} {:#}", ipam(&h1), ipam(&h2));
    h1.meshnet(&["rmpeer", &n3]).expect_ok("rmpeer h3 on h1");
    let taken = wait_until(SECS(10), || owner(&ipam(&h2), &n3).is_none());
    assert!(taken, "h2 did not take h1's takeover: {:#}", ipam(&h2));

    // h3 comes back with its state (and its allocation of a3).
    let again = h3.launch(&["--ipalloc-range", RANGE]);
    assert_eq!(again, n3, "h3 changed its peer name");
    let says = |log: &str| {
        log.lines()
            .find(|l| l.contains("took over this peer's range") && l.contains(&n1))
            .map(String::from)
    };
    let refused = wait_until(SECS(30), || says(&h3.log()).is_some());
    assert!(refused, "h3's log does not refuse h1's takeover of its range: {}", h3.log());
    eprintln!("h3: {}", says(&h3.log()).unwrap_or_default());
    let v3 = ipam(&h3);
    let listed = v3["peer_conflicts"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["error"].as_str().is_some_and(|e| e.contains("rmpeer") && e.contains(&n1))));
    assert!(listed, "h3's status ipam does not list the refusal: {v3:#}");
    let text = h3.meshnet(&["status", "ipam"]).expect_ok("status ipam on h3");
    assert!(text.stdout.contains("Refused peers"), "{text}");
    // The side that sent it hears why it was refused.
    let told = wait_until(SECS(20), || {
        [&h1, &h2].iter().any(|h| {
            ipam(h)["peer_conflicts"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["peer"] == n3.as_str()))
        })
    });
    assert!(told, "neither h1 nor h2 lists h3's refusal: {:#} {:#}", ipam(&h1), ipam(&h2));
    // Nothing was taken back or given up: h3 keeps its view and its container,
    // h1 and h2 keep the takeover.
    assert!(
        owner(&ipam(&h3), &n3).is_some_and(|o| o["size"].as_u64() == Some(h3_size)),
        "h3 changed its ring: {:#}",
        ipam(&h3)
    );
    assert!(ipam_allocs(&ipam(&h3)).contains_key(&ip_of(&a3)), "h3 forgot {a3}: {:#}", ipam(&h3));
    for h in [&h1, &h2] {
        assert!(owner(&ipam(h), &n3).is_none(), "{} gave h3 its range back: {:#}", h.ns, ipam(h));
    }
}

/// Scenario 4: `--ipalloc-init consensus=3` blocks allocation until the third
/// peer joins. Alone, h1's attach fails after its wait, saying it waits for
/// consensus; with h2 `prime` still waits ("2 of 3"); once h3 joins, all three
/// agree, own space, and attach everywhere.
#[test]
fn consensus_waits_for_all_n_peers() {
    let Some(lab) = Lab::new("consensus") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c1b, c2, c3) = (
        lab.add_container(&h1, 1),
        lab.add_container(&h1, 5),
        lab.add_container(&h2, 2),
        lab.add_container(&h3, 3),
    );
    let init = ["--ipalloc-init", "consensus=3"];
    let n1 = h1.launch(&init);

    let t = Instant::now();
    let out = attach_out(&h1, &c1, &[]);
    eprintln!("lone attach: {out}");
    assert!(
        !out.ok() && !out.timed_out,
        "attach alone with consensus=3 should fail after its wait: {out}"
    );
    assert!(
        out.elapsed >= SECS(25),
        "attach gave up after {:.1}s, before its 30 s wait",
        out.elapsed.as_secs_f64()
    );
    assert!(
        lower(&out.stderr).contains("consensus"),
        "the failed attach should say it waits for consensus: {out}"
    );
    assert!(
        container_addrs(&c1).is_empty(),
        "failed attach left {:?} in c1",
        container_addrs(&c1)
    );
    assert!(
        h1.ps_json().is_empty(),
        "failed attach shows in ps: {:#?}",
        h1.ps_json()
    );
    let v = ipam(&h1);
    assert!(!agreed(&v), "h1 alone with consensus=3 agreed: {v:#}");
    assert!(
        lower(v["state"]["waiting"].as_str().unwrap_or("")).contains("consensus"),
        "status ipam should say it waits for consensus: {v:#}"
    );
    assert_eq!(v["allocations"], serde_json::json!([]), "{v:#}");
    let text = h1
        .meshnet(&["status", "ipam"])
        .expect_ok("status ipam text");
    assert!(lower(&text.stdout).contains("not agreed"), "{text}");
    let p = h1.meshnet_full(&["prime", "--timeout", "2"], &[], SECS(20));
    assert!(!p.ok(), "prime alone should time out: {p}");
    assert!(
        lower(&p.stderr).contains("consensus"),
        "prime should say what it waits for: {p}"
    );
    eprintln!("alone: {:.1}s", t.elapsed().as_secs_f64());

    // h2 joins: two of three are not enough, consensus=3 waits for the third.
    let n2 = h2.launch(&[&init[..], &[h1.ip.as_str()]].concat());
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    let p = h1.meshnet_full(&["prime", "--timeout", "3"], &[], SECS(20));
    assert!(!p.ok(), "prime with two of three consensus=3 peers should still wait: {p}");
    assert!(lower(&p.stderr).contains("2 of 3"), "prime should say it has 2 of 3 peers: {p}");
    assert!(!agreed(&ipam(&h1)) && !agreed(&ipam(&h2)));

    // h3 joins: all three agree.
    let n3 = h3.launch(&[&init[..], &[h2.ip.as_str()]].concat());
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));
    let t = Instant::now();
    let p = h1.meshnet_full(&["prime", "--timeout", "30"], &[], SECS(40));
    assert!(p.ok(), "prime with all three consensus=3 peers failed: {p}");
    eprintln!("prime with h3: {:.1}s", t.elapsed().as_secs_f64());
    let v1 = ipam(&h1);
    assert!(agreed(&v1), "{v1:#}");
    let seeds = v1["state"]["seeds"].clone();
    assert_eq!(seeds.as_array().map(Vec::len), Some(3), "all three own space: {v1:#}");
    for h in [&h2, &h3] {
        assert!(
            wait_until(SECS(10), || ipam(h)["state"]["seeds"] == seeds),
            "{} does not share h1's ring: {:#} vs {v1:#}",
            h.ns,
            ipam(h)
        );
    }
    let a1 = attach_one(&h1, &c1, &[]);
    let a2 = attach_one(&h2, &c2, &[]);
    let a3 = attach_one(&h3, &c3, &[]);
    let a1b = attach_one(&h1, &c1b, &[]);
    let all = all_ps(&[&h1, &h2, &h3]);
    assert_eq!(all.len(), 4, "{all:#?}");
    assert_no_duplicates(&all);
    for a in [&a1, &a2, &a3, &a1b] {
        assert!(inside(parse_cidr(a).0, DEFAULT_RANGE), "{a}");
    }
    assert_reaches(&c3, &ip_of(&a1), SECS(30));
    assert_reaches(&c1, &ip_of(&a2), SECS(10));
    assert_reaches(&c2, &ip_of(&a3), SECS(10));
    assert_reaches(&c1b, &ip_of(&a3), SECS(10));
}

/// The same `meshnet launch HOST1 HOST2 HOST3` on every host (Weave's way,
/// each host named in its own list too, one named twice): consensus's default
/// N counts the other hosts, not this one, so the three agree. Before, each
/// counted itself (N = 4, one more than a three-host mesh can have) and every
/// allocation waited for good ("waiting for consensus: 3 of 4 peers").
#[test]
fn the_same_launch_on_every_host_agrees() {
    let Some(lab) = Lab::new("samelaunch") else {
        return;
    };
    let hosts = [lab.add_host(1), lab.add_host(2), lab.add_host(3)];
    let twice = format!("{}:6783", hosts[1].ip);
    let all: Vec<String> = hosts.iter().map(|h| h.ip.clone()).chain([twice]).collect();
    same_launch_agrees(&lab, &hosts, &all);
}

/// The same with host names, as Weave users wrote it (`weave launch $HOST1
/// $HOST2 $HOST3`): each host resolves its own name (here to 127.0.1.1, as
/// Debian's `/etc/hosts` does) and one other host is also named by its
/// address. Names were not resolved when counting, so N was 1 + 4 and
/// nothing was ever allocated.
#[test]
fn the_same_launch_by_host_names_on_every_host_agrees() {
    let Some(lab) = Lab::new("samenames") else {
        return;
    };
    let hosts = [lab.add_host(1), lab.add_host(2), lab.add_host(3)];
    let name = |i: u8| format!("{}-node{i}", lab.prefix);
    let mut etc = NetnsEtc::default();
    for me in &hosts {
        let mut text = format!("127.0.0.1 localhost\n127.0.1.1 {}\n", name(me.i));
        for h in hosts.iter().filter(|h| h.i != me.i) {
            text += &format!("{} {}\n", h.ip, name(h.i));
        }
        etc.set(&me.ns, "hosts", &text);
    }
    let all: Vec<String> = hosts.iter().map(|h| name(h.i)).chain([hosts[2].ip.clone()]).collect();
    same_launch_agrees(&lab, &hosts, &all);
}

/// Every host launched with the same PEER list `all` (consensus, its default
/// N): the ring is agreed among the three and every host allocates.
fn same_launch_agrees(lab: &Lab, hosts: &[Host; 3], all: &[String]) {
    let _diag = IpamDiag(lab);
    let cs: Vec<Container> = hosts.iter().enumerate().map(|(i, h)| lab.add_container(h, i as u8 + 1)).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let names: Vec<String> = hosts.iter().map(|h| h.launch(&all)).collect();
    let pairs: Vec<(&Host, &str)> = hosts.iter().zip(&names).map(|(h, n)| (h, n.as_str())).collect();
    wait_meshed(&pairs, SECS(30));
    let p = hosts[0].meshnet_full(&["prime", "--timeout", "30"], &[], SECS(40));
    assert!(p.ok(), "prime on a mesh launched the same way on every host: {p}\n{:#}", ipam(&hosts[0]));
    let v = ipam(&hosts[0]);
    assert_eq!(v["state"]["seeds"].as_array().map(Vec::len), Some(3), "all three own space: {v:#}");
    let addrs: Vec<String> = hosts.iter().zip(&cs).map(|(h, c)| attach_one(h, c, &[])).collect();
    assert_no_duplicates(&all_ps(&[&hosts[0], &hosts[1], &hosts[2]]));
    assert_reaches(&cs[0], &ip_of(&addrs[2]), SECS(30));
}

/// `prime` with an IPv6 range too waits for both rings: when it returns, the
/// IPv6 ring is agreed as well (it used to return once the IPv4 one was).
#[test]
fn prime_waits_for_both_rings() {
    let Some(lab) = Lab::new("prime6") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let h1 = lab.add_host(1);
    // Alone: consensus of one, which an IPv4 allocation completes for the IPv4
    // ring; nothing has asked the IPv6 ring yet.
    h1.launch(&["--ipalloc-range", "fd32::/64"]);
    let c1 = lab.add_container(&h1, 1);
    attach_one(&h1, &c1, &["net:10.32.1.0/24"]);
    assert!(agreed(&ipam(&h1)), "an IPv4 allocation without an agreed ring: {:#}", ipam(&h1));
    let v = ipam(&h1);
    assert!(!agreed(&v["ipv6"]), "the IPv6 ring agreed before anything asked for it: {v:#}");
    let p = h1.meshnet_full(&["prime", "--timeout", "30"], &[], SECS(40));
    assert!(p.ok(), "prime failed: {p}");
    let v = ipam(&h1);
    assert!(agreed(&v["ipv6"]), "IPv6 ring not agreed after prime returned: {v:#}");
}

/// A seed peer this router has never reached owns space it cannot ask for:
/// `status ipam` shows it unreachable (it showed it reachable until a first
/// connection), and reachable once it connects.
#[test]
fn a_seed_peer_never_seen_is_unreachable() {
    let Some(lab) = Lab::new("seedgone") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (n1, n2) = ("02:00:00:00:00:01", "02:00:00:00:00:02");
    let seed = format!("seed={n1},{n2}");
    h1.launch(&["--name", n1, "--ipalloc-init", &seed]);
    let v = ipam(&h1);
    assert!(agreed(&v), "{v:#}");
    assert_eq!(owner(&v, n2).map(|o| o["reachable"].clone()), Some(Value::Bool(false)), "{v:#}");
    assert_eq!(owner(&v, n1).map(|o| o["reachable"].clone()), Some(Value::Bool(true)), "{v:#}");
    assert_eq!(v["unreachable_space"], 1u64 << 19, "half of 10.32.0.0/12 is n2's: {v:#}");
    h2.launch(&["--name", n2, "--ipalloc-init", &seed, &h1.ip]);
    wait_meshed(&[(&h1, n1), (&h2, n2)], SECS(30));
    let ok = wait_until(SECS(10), || owner(&ipam(&h1), n2).is_some_and(|o| o["reachable"] == true));
    assert!(ok, "n2 connected but not reachable: {:#}", ipam(&h1));
    assert_eq!(ipam(&h1)["unreachable_space"], 0, "{:#}", ipam(&h1));
}

/// Scenario 5: bad IPAM input fails clearly and changes nothing.
#[test]
fn bad_ipam_input_changes_nothing() {
    let Some(lab) = Lab::new("badipam") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c2, c3, c4) = (
        lab.add_container(&h1, 1),
        lab.add_container(&h1, 2),
        lab.add_container(&h1, 3),
        lab.add_container(&h2, 4),
    );
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    let a1 = attach_one(&h1, &c1, &[]);
    let a2 = attach_one(&h1, &c2, &[]);
    let a4 = attach_one(&h2, &c4, &[]);
    let pids = h1.pids();

    let snapshot = || {
        (
            h1.ps_json(),
            h2.ps_json(),
            ipam_allocs(&ipam(&h1)),
            ipam_allocs(&ipam(&h2)),
            [&c1, &c2, &c3, &c4].map(container_addrs),
        )
    };
    let before = snapshot();
    let bad = |h: &Host, args: &[&str], names: &[&str]| {
        let out = h.meshnet_full(args, &[], SECS(45));
        assert!(
            !out.ok() && !out.timed_out,
            "`meshnet {}` on {} should fail: {out}",
            args.join(" "),
            h.ns
        );
        assert!(
            out.elapsed < SECS(10),
            "`meshnet {}` should fail at once, not after {:.1}s: {out}",
            args.join(" "),
            out.elapsed.as_secs_f64()
        );
        for n in names {
            assert!(
                out.stderr.contains(n),
                "the error of `meshnet {}` should name {n:?}: {out}",
                args.join(" ")
            );
        }
        eprintln!("`meshnet {}` -> {}", args.join(" "), out.stderr.trim());
        assert_eq!(
            snapshot(),
            before,
            "`meshnet {}` changed something",
            args.join(" ")
        );
    };
    bad(
        &h1,
        &["attach", "ip:172.30.0.1/24", &c3.ns],
        &["172.30.0.1", DEFAULT_RANGE],
    );
    bad(
        &h1,
        &["attach", "net:10.32.0.0/33", &c3.ns],
        &["10.32.0.0/33"],
    );
    bad(
        &h1,
        &["attach", "net:172.30.0.0/24", &c3.ns],
        &["172.30.0.0/24", DEFAULT_RANGE],
    );
    bad(&h1, &["attach", "ip:10.32.0.5", &c3.ns], &["10.32.0.5"]);
    // Held by another container of this host: the error names it.
    let held = format!("ip:{a1}");
    bad(&h1, &["attach", &held, &c3.ns], &[&ip_of(&a1), &c1.ns]);
    // Held by a container of another host: refused too (the owner says so).
    let held2 = format!("ip:{a4}");
    let out = h1.meshnet_full(&["attach", &held2, &c3.ns], &[], SECS(45));
    eprintln!("claim of h2's {a4}: {out}");
    assert!(
        !out.ok() && !out.timed_out,
        "claiming {a4}, held on h2, succeeded: {out}"
    );
    assert!(
        out.stderr.contains(&ip_of(&a4))
            && (out.stderr.contains(&c4.ns) || out.stderr.contains(&n2)),
        "the error should name {a4} and its holder ({} or peer {n2}): {out}",
        c4.ns
    );
    assert_eq!(
        snapshot(),
        before,
        "claiming a held address changed something"
    );
    // A good address along with a bad one: nothing is attached.
    bad(
        &h1,
        &["attach", "net:default", "ip:172.30.0.1/24", &c3.ns],
        &["172.30.0.1"],
    );

    // Launch with bad IPAM options: fails at once, no router.
    for args in [
        &["launch", "--ipalloc-init", "bogus"][..],
        &["launch", "--ipalloc-init", "consensus=0"],
        &["launch", "--ipalloc-range", "10.32.0.0/33"],
        &[
            "launch",
            "--ipalloc-range",
            "10.33.0.0/16",
            "--ipalloc-default-subnet",
            "10.34.0.0/24",
        ],
    ] {
        let out = h3.meshnet(args);
        assert!(
            !out.ok() && !out.timed_out,
            "`meshnet {}` should fail: {out}",
            args.join(" ")
        );
        assert!(
            out.stderr.contains(args[2]),
            "the error of `meshnet {}` should name {:?}: {out}",
            args.join(" "),
            args[2]
        );
        if args[2] == "bogus" {
            assert!(
                out.stderr.contains("consensus"),
                "the error should list the valid modes: {out}"
            );
        }
        eprintln!("`meshnet {}` -> {}", args.join(" "), out.stderr.trim());
        assert!(
            h3.pids().is_empty(),
            "a router runs in h3 after a failed launch: {:?}",
            h3.pids()
        );
        assert!(
            !h3.meshnet(&["status"]).ok(),
            "status answers in h3 after a failed launch"
        );
        assert!(
            !h3.state_dir.join("meshnet.sock").exists(),
            "a control socket exists after a failed launch"
        );
    }
    // On the running h1 too: refused, h1 keeps serving as it was.
    let out = h1.meshnet(&["launch", "--ipalloc-init", "bogus"]);
    assert!(!out.ok() && out.stderr.contains("bogus"), "{out}");
    let now = h1.pids();
    assert!(
        pids.iter().all(|p| now.contains(p)),
        "h1's router died: {pids:?} -> {now:?}"
    );
    assert_eq!(snapshot(), before, "a bad launch on h1 changed something");
    assert_eq!(h1.status_json()["name"], n1.as_str());

    // Still fine: a good attach of c3 works and pings.
    let a3 = attach_one(&h1, &c3, &[]);
    assert_no_duplicates(&all_ps(&[&h1, &h2]));
    assert_reaches(&c3, &ip_of(&a4), SECS(30));
    assert_reaches(&c4, &ip_of(&a2), SECS(10));
    let _ = a3;
}

/// Scenario 5b: a bare CIDR (Weave's "use it now, claim it in the ring later")
/// that another container already holds is refused, whether the holder is on
/// this host or on another, reachable one: never two containers with one address.
#[test]
fn bare_cidr_held_elsewhere_is_refused() {
    let Some(lab) = Lab::new("bare") else { return };
    let _diag = IpamDiag(&lab);
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2, c3) = (
        lab.add_container(&h1, 1),
        lab.add_container(&h2, 2),
        lab.add_container(&h1, 3),
    );
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    let a1 = attach_one(&h1, &c1, &[]);
    let a2 = attach_one(&h2, &c2, &[]);

    // Held on this host: refused at once, naming the holder.
    let out = attach_out(&h1, &c3, &[&a1]);
    eprintln!("bare {a1} (held by {} on h1): {out}", c1.ns);
    assert!(
        !out.ok() && !out.timed_out,
        "bare {a1}, held by {}, was attached to {}: {out}",
        c1.ns,
        c3.ns
    );
    assert!(
        out.stderr.contains(&c1.ns),
        "the error should name the holder {}: {out}",
        c1.ns
    );
    assert!(
        container_addrs(&c3).is_empty(),
        "{:?}",
        container_addrs(&c3)
    );

    // Held on h2 (reachable): must not end up on c3 as well.
    let out = attach_out(&h1, &c3, &[&a2]);
    eprintln!("bare {a2} (held by {} on h2): {out}", c2.ns);
    std::thread::sleep(SECS(2));
    let on_c3 = container_addrs(&c3);
    let log: Vec<String> = h1
        .log()
        .lines()
        .filter(|l| l.contains(&ip_of(&a2)) || l.contains(&c3.ns))
        .map(String::from)
        .collect();
    assert!(
        !on_c3.contains(&a2),
        "DUPLICATE ADDRESS: bare {a2}, held by {} on reachable h2, was attached to {} on h1 \
         (attach said: {}); h1's log: {log:#?}; h1 ps: {:#?}; h1 status ipam allocations: {:?}",
        c2.ns,
        c3.ns,
        out.all().trim(),
        h1.ps_json(),
        ipam_allocs(&ipam(&h1))
    );
    assert!(
        !out.ok(),
        "attach of bare {a2}, held on h2, succeeded: {out}"
    );
    assert!(
        out.stderr.contains(&ip_of(&a2)),
        "the error should name {a2}: {out}"
    );
    assert_no_duplicates(&all_ps(&[&h1, &h2]));
}

/// Scenario 5c: a bare CIDR used at once while its owner was unreachable, and
/// given by the owner to one of its own containers meanwhile: once they meet,
/// the claim fails and both containers have the address. `status ipam` lists
/// the conflict (plain and `--json`) and the claim is retried; once the other
/// container lets go, the retry completes it and the conflict is gone.
#[test]
fn a_claim_failed_after_a_partition_is_a_listed_conflict() {
    let Some(lab) = Lab::new("conflict") else { return };
    let _diag = IpamDiag(&lab);
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2, c3) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2), lab.add_container(&h2, 3));
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    // An address of h2's space, free: next to the one h2 hands out first.
    let a2 = attach_one(&h2, &c2, &[]);
    let (first, prefix) = parse_cidr(&a2);
    let x = format!("{}/{prefix}", Ipv4Addr::from(u32::from(first) + 5));

    // h2 dies; h1 uses x at once (its owner cannot answer).
    kill9(&h2);
    assert!(
        wait_until(SECS(10), || owner(&ipam(&h1), &n2).is_some_and(|o| o["reachable"] == false)),
        "h1 does not see h2 unreachable: {:#}",
        ipam(&h1)
    );
    assert_eq!(attach_one(&h1, &c1, &[&x]), x);
    // h2 comes back cut off from h1 and gives x to a container of its own.
    for chain in [["INPUT", "-s"], ["OUTPUT", "-d"]] {
        exec_in(&h2.ns, &["iptables", "-w", "-I", chain[0], chain[1], &h1.ip, "-j", "DROP"]).expect_ok("iptables");
    }
    assert_eq!(h2.launch(&[]), n2);
    assert_eq!(attach_one(&h2, &c3, &[&format!("ip:{x}")]), x);
    assert!(ipam(&h1)["conflicts"].as_array().is_some_and(|c| c.is_empty()), "{:#}", ipam(&h1));

    // They meet: h1's claim fails, and that is listed, not only logged.
    exec_in(&h2.ns, &["iptables", "-w", "-F"]).expect_ok("iptables -F");
    h1.meshnet(&["connect", &h2.ip]).expect_ok("connect");
    let listed = |v: &Value| {
        v["conflicts"].as_array().is_some_and(|cs| {
            cs.len() == 1
                && cs[0]["ip"] == ip_of(&x).as_str()
                && cs[0]["target"].as_str().is_some_and(|t| t.contains(&c1.ns))
                && cs[0]["error"].as_str().is_some_and(|e| e.contains(&n2))
        })
    };
    assert!(wait_until(SECS(30), || listed(&ipam(&h1))), "h1 lists no conflict for {x}: {:#}", ipam(&h1));
    let text = h1.meshnet(&["status", "ipam"]).expect_ok("status ipam");
    assert!(
        text.stdout.contains("Conflicts: 1 ") && text.stdout.contains(&x) && text.stdout.contains(&c1.ns),
        "status ipam does not show the conflict: {text}"
    );
    assert!(container_addrs(&c1).contains(&x), "c1 lost {x}");
    assert!(ipam_allocs(&ipam(&h2)).get(&ip_of(&x)).is_some_and(|t| t.contains(&c3.ns)));

    // c3 lets go: the next retry (every 30 s) completes h1's claim.
    h2.meshnet(&["detach", &c3.ns]).expect_ok("detach c3");
    assert!(
        wait_until(SECS(45), || {
            let v = ipam(&h1);
            v["conflicts"].as_array().is_some_and(|c| c.is_empty())
                && ipam_allocs(&v).get(&ip_of(&x)).is_some_and(|t| t.contains(&c1.ns))
        }),
        "h1's claim of {x} did not complete after c3 let go: {:#}",
        ipam(&h1)
    );
    assert_no_duplicates(&all_ps(&[&h1, &h2]));
}

/// Scenario 6: two meshes that allocated from different ranges are connected:
/// the connection is refused, each side logs a line naming both peers and the
/// conflict, and both keep their allocations.
#[test]
fn different_ranges_refuse_each_other() {
    let Some(lab) = Lab::new("ranges") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&["--ipalloc-range", "10.40.0.0/16"]);
    let a1 = attach_one(&h1, &c1, &[]);
    let a2 = attach_one(&h2, &c2, &[]);
    assert!(inside(parse_cidr(&a1).0, DEFAULT_RANGE), "{a1}");
    assert!(inside(parse_cidr(&a2).0, "10.40.0.0/16"), "{a2}");
    let before = (ipam(&h1), ipam(&h2), h1.ps_json(), h2.ps_json());

    h2.meshnet(&["connect", &h1.ip])
        .expect_ok("connect h2 -> h1");
    let names_conflict = |log: &str| -> Option<String> {
        log.lines()
            .find(|l| lower(l).contains("conflict") && l.contains(&n1) && l.contains(&n2))
            .map(String::from)
    };
    let logged = wait_until(SECS(20), || {
        names_conflict(&h1.log()).is_some() && names_conflict(&h2.log()).is_some()
    });
    for (h, n) in [(&h1, 1), (&h2, 2)] {
        let lines: Vec<String> = h
            .log()
            .lines()
            .filter(|l| lower(l).contains("conflict") || lower(l).contains("range"))
            .take(6)
            .map(String::from)
            .collect();
        eprintln!("h{n} log: {lines:#?}");
    }
    assert!(
        logged,
        "both logs should have a line naming {n1}, {n2} and the conflict: h1 {:?}, h2 {:?}",
        names_conflict(&h1.log()),
        names_conflict(&h2.log())
    );
    // `status ipam` on both sides names the refused peer (the accepting side
    // showed nothing: its ring only waited for consensus).
    for (h, other) in [(&h1, &n2), (&h2, &n1)] {
        let v = ipam(h);
        let named = v["peer_conflicts"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["peer"] == other.as_str() && c["error"].as_str().is_some_and(|e| e.contains("10.40.0.0/16"))));
        assert!(named, "{}'s status ipam does not name {other} as refused: {v:#}", h.ns);
        let text = h.meshnet(&["status", "ipam"]).expect_ok("status ipam");
        assert!(text.stdout.contains("Refused peers: 1") && text.stdout.contains(other.as_str()), "{text}");
    }
    for h in [&h1, &h2] {
        let line = names_conflict(&h.log()).unwrap_or_default();
        assert!(
            line.contains(DEFAULT_RANGE) && line.contains("10.40.0.0/16"),
            "{}'s conflict line should name both ranges: {line}",
            h.ns
        );
    }

    // The connection does not stay up (it may be retried and refused again).
    let mut up = 0;
    for _ in 0..10 {
        if established_with(&h2.status_json(), &n1) || established_with(&h1.status_json(), &n2) {
            up += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let conns = connections_to(&h2.status_json(), &h1.ip);
    eprintln!("h2 -> h1 connections: {conns:#?}");
    assert!(
        up <= 2,
        "the refused connection was established in {up} of 10 samples: {conns:#?}"
    );
    assert!(
        !ping(&c1.ns, &ip_of(&a2), 3),
        "c1 reaches c2 across the refused connection"
    );

    // Both keep their allocations.
    let after = (ipam(&h1), ipam(&h2), h1.ps_json(), h2.ps_json());
    for (b, a, h) in [(&before.0, &after.0, &h1), (&before.1, &after.1, &h2)] {
        assert_eq!(a["range"], b["range"], "{}'s range changed", h.ns);
        assert_eq!(a["state"], b["state"], "{}'s ring state changed", h.ns);
        assert_eq!(
            ipam_allocs(a),
            ipam_allocs(b),
            "{}'s allocations changed",
            h.ns
        );
        assert_eq!(
            a["owners"].as_array().map(Vec::len),
            Some(1),
            "{} learnt the other's ring: {a:#}",
            h.ns
        );
    }
    assert_eq!(after.2, before.2, "ps on h1 changed");
    assert_eq!(after.3, before.3, "ps on h2 changed");
    assert_eq!(container_addrs(&c1), vec![a1.clone()]);
    assert_eq!(container_addrs(&c2), vec![a2.clone()]);
    // And each still allocates.
    let c5 = lab.add_container(&h1, 5);
    let a5 = attach_one(&h1, &c5, &[]);
    assert!(inside(parse_cidr(&a5).0, DEFAULT_RANGE) && a5 != a1, "{a5}");
    assert_reaches(&c5, &ip_of(&a1), SECS(10));
}

/// Scenario 7: an address attached on a peer that has not met the mesh yet does
/// not make it agree on a ring of its own. h3 is launched alone
/// (`consensus=1`) and attaches a bare CIDR at once, as `launch && connect &&
/// attach` may before the connection is up; only later does it connect. It
/// must adopt the mesh's ring (no IPAM conflict), and its address is claimed in
/// that ring.
#[test]
fn early_bare_cidr_does_not_split_the_ring() {
    let Some(lab) = Lab::new("early") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c3) = (lab.add_container(&h1, 1), lab.add_container(&h3, 3));
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[h1.ip.as_str()]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    let a1 = attach_one(&h1, &c1, &[]);

    let n3 = h3.launch(&[]);
    let out = attach_out(&h3, &c3, &["10.40.0.3/12"]);
    assert!(out.ok(), "a bare CIDR attach on a lone peer must succeed at once: {out}");
    // Long enough for a lone consensus=1 peer to have agreed on its own ring.
    std::thread::sleep(SECS(5));
    let v3 = ipam(&h3);
    assert!(!agreed(&v3), "h3 agreed on a ring before meeting anyone: {v3:#}");

    h3.meshnet(&["connect", &h2.ip]).expect_ok("connect");
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));
    let seeds = ipam(&h1)["state"]["seeds"].clone();
    assert!(
        wait_until(SECS(20), || ipam(&h3)["state"]["seeds"] == seeds),
        "h3 did not adopt the mesh's ring: {:#} vs {seeds}",
        ipam(&h3)
    );
    assert!(
        !lower(&h3.log()).contains("ipam conflict") && !lower(&h1.log()).contains("ipam conflict"),
        "an IPAM conflict was logged:\n{}",
        h3.log()
    );
    assert!(
        wait_until(SECS(20), || ipam_allocs(&ipam(&h3)).contains_key("10.40.0.3")),
        "h3 did not claim 10.40.0.3 in the ring: {:#}",
        ipam(&h3)
    );
    assert_reaches(&c3, &ip_of(&a1), SECS(30));
}

/// Unmounts the tmpfs under a host's state dir when the test ends (lazily: the
/// router may still hold its log open).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        // The tmpfs, and the read-only bind mount over it if the test stopped early.
        for _ in 0..2 {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[track_caller]
fn sh(args: &[&str]) -> Out {
    run(std::process::Command::new(args[0]).args(&args[1..]), SECS(20))
}

/// `(size, free)` of `peer`'s space as host `h` sees it.
#[track_caller]
fn owner_view(h: &Host, peer: &str) -> (u64, u64) {
    let v = ipam(h);
    let o = owner(&v, peer).unwrap_or_else(|| panic!("{} does not know owner {peer}: {v:#}", h.ns));
    (o["size"].as_u64().unwrap_or(0), o["free"].as_u64().unwrap_or(0))
}

/// Scenario 7: the state directory is a tiny tmpfs. Filled up, then made
/// read-only: `attach` fails naming the state file and the OS error, nothing
/// that depends on the unsaved state is sent (the other host's view of this
/// host's space does not move), and the failures are counted. Once the
/// directory is writable again, allocation works and the other host hears of it.
/// A `detach` that cannot save fails and changes nothing the router remembers.
/// The range is a /28: with a handful of free addresses every allocation moves
/// a host's free count by more than an eighth, so each one is gossiped at once
/// (in a large range small moves wait for the next full gossip).
#[test]
fn full_or_read_only_state_dir_blocks_allocation() {
    let Some(lab) = Lab::new("ipamfull") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    std::fs::create_dir_all(&h1.state_dir).expect("state dir");
    let dir = h1.state_dir.to_string_lossy().to_string();
    sh(&["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", &dir]).expect_ok("mount tmpfs");
    let _unmount = Unmount(h1.state_dir.clone());
    let _diag = IpamDiag(&lab);
    let cs: Vec<Container> = (1..=4).map(|j| lab.add_container(if j == 4 { &h2 } else { &h1 }, j)).collect();
    const RANGE: &str = "10.34.0.0/28";
    let n1 = h1.launch(&["--ipalloc-range", RANGE]);
    let n2 = h2.launch(&["--ipalloc-range", RANGE, &h1.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    attach_one(&h1, &cs[0], &[]);
    attach_one(&h2, &cs[3], &[]);
    // Both hosts agree on h1's space (size and free count).
    let settled = || wait_until(SECS(20), || owner_view(&h2, &n1) == owner_view(&h1, &n1));
    assert!(settled(), "h2 never converged on h1's space: {:?} vs {:?}", owner_view(&h2, &n1), owner_view(&h1, &n1));
    let before = owner_view(&h2, &n1);

    // 1. Full: a file takes every free block.
    let fill = h1.state_dir.join("fill");
    let _ = sh(&["dd", "if=/dev/zero", &format!("of={}", fill.display()), "bs=4k"]);
    let out = attach_out(&h1, &cs[1], &[]);
    assert!(!out.ok(), "attach succeeded on a full state dir: {out}");
    let text = out.all();
    assert!(text.contains("ipam.bin") && text.contains("No space left on device"), "attach error should name the state file and the OS error: {out}");
    eprintln!("attach on a full state dir: {}", text.trim());
    std::thread::sleep(SECS(3));
    assert_eq!(owner_view(&h2, &n1), before, "h2 heard of state h1 could not save");
    let v = ipam(&h1);
    assert!(v["save_failures"].as_u64().unwrap_or(0) >= 1 && v["unsaved"] == true, "{v:#}");
    assert!(v["save_error"].as_str().unwrap_or("").contains("No space left on device"), "{v:#}");
    assert_eq!(ipam_allocs(&v).len(), 1, "the failed attach keeps no address: {v:#}");
    assert!(container_addrs(&cs[1]).is_empty(), "the failed attach configured an address");
    // `status --json` shows the failures too (each flush retries the write).
    assert!(h1.status_json()["ipam"]["save_failures"].as_u64().unwrap_or(0) >= v["save_failures"].as_u64().unwrap_or(0));

    // 2. Read-only (with room again): the same. A read-only bind mount over the
    // directory, in the router's mount namespace (`ip netns exec` gave it its
    // own; remounting the tmpfs itself read-only is refused while the router
    // holds its log open for writing, which keeps going to the tmpfs).
    std::fs::remove_file(&fill).expect("remove fill");
    let pid = router_pid(&h1).to_string();
    let in_router = |args: &[&str]| {
        let mut a = vec!["nsenter", "-t", pid.as_str(), "-m", "--"];
        a.extend_from_slice(args);
        sh(&a)
    };
    in_router(&["mount", "--bind", &dir, &dir]).expect_ok("bind mount");
    in_router(&["mount", "-o", "remount,bind,ro", &dir]).expect_ok("remount ro");
    let out = attach_out(&h1, &cs[1], &[]);
    assert!(!out.ok(), "attach succeeded on a read-only state dir: {out}");
    assert!(out.all().contains("ipam.bin") && out.all().contains("Read-only file system"), "{out}");
    std::thread::sleep(SECS(3));
    assert_eq!(owner_view(&h2, &n1), before, "h2 heard of state h1 could not save");

    // 3. Writable again: allocation works and h2 hears of it.
    in_router(&["umount", &dir]).expect_ok("remove the read-only bind mount");
    let a = attach_one(&h1, &cs[1], &[]);
    assert!(inside(parse_cidr(&a).0, RANGE), "{a}");
    let v = ipam(&h1);
    assert_eq!(v["unsaved"], false, "{v:#}");
    assert_eq!(ipam_allocs(&v).len(), 2, "{v:#}");
    assert!(settled(), "h2 never heard of h1's state after the save worked");
    assert_eq!(owner_view(&h2, &n1).1, before.1 - 1, "h2 sees one more address taken on h1");
    assert!(h1.log().contains("IPAM state saved again"), "the recovery is logged:\n{}", h1.log());
    // The snapshot on disk holds both allocations (restart-proof).
    let snap = std::fs::read(h1.state_dir.join("ipam.bin")).expect("ipam.bin");
    assert_eq!(snap[0], 2, "snapshot version");

    // 4. A detach whose record cannot be updated fails, and what the router
    // remembers stays what is on disk and in IPAM (`ps` dropped the target
    // while the file and the ring kept it); detach again once it can be saved.
    let listed = |c: &Container| h1.ps_json().iter().any(|e| e["target"] == c.ns.as_str());
    in_router(&["mount", "--bind", &dir, &dir]).expect_ok("bind mount");
    in_router(&["mount", "-o", "remount,bind,ro", &dir]).expect_ok("remount ro");
    let out = h1.meshnet(&["detach", &cs[1].ns]);
    assert!(!out.ok() && out.all().contains("Read-only file system") && out.all().contains("detach again"), "{out}");
    assert!(listed(&cs[1]), "ps dropped {} whose record is still on disk", cs[1].ns);
    assert_eq!(ipam_allocs(&ipam(&h1)).len(), 2, "{:#}", ipam(&h1));
    in_router(&["umount", &dir]).expect_ok("remove the read-only bind mount");
    h1.meshnet(&["detach", &cs[1].ns]).expect_ok("detach again");
    assert!(!listed(&cs[1]), "{:#?}", h1.ps_json());
    assert_eq!(ipam_allocs(&ipam(&h1)).len(), 1, "{:#}", ipam(&h1));
}

/// Scenario 8: an attach whose record cannot be written (the state directory
/// is full; an address outside the range needs no IPAM save) fails and
/// configures nothing: no interface in the target, nothing in `ps`. (The
/// interface was made before the record was written: the target kept an
/// address that a restart, finding no record, forgot and IPAM could hand out
/// again; a `kill -9` between the two did the same.) With room again it works.
#[test]
fn attach_whose_record_cannot_be_saved_configures_nothing() {
    let Some(lab) = Lab::new("attfull") else {
        return;
    };
    let h1 = lab.add_host(1);
    std::fs::create_dir_all(&h1.state_dir).expect("state dir");
    let dir = h1.state_dir.to_string_lossy().to_string();
    sh(&["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", &dir]).expect_ok("mount tmpfs");
    let _unmount = Unmount(h1.state_dir.clone());
    let c1 = lab.add_container(&h1, 1);
    h1.launch(&[]);
    let fill = h1.state_dir.join("fill");
    let _ = sh(&["dd", "if=/dev/zero", &format!("of={}", fill.display()), "bs=4k"]);
    let out = attach_out(&h1, &c1, &["192.168.77.5/24"]);
    assert!(!out.ok(), "attach succeeded on a full state dir: {out}");
    assert!(out.all().contains("attachments.json") && out.all().contains("No space left on device"), "{out}");
    assert!(link(&c1.ns, "ethwe").is_none(), "the failed attach left an interface in {}", c1.ns);
    assert!(h1.ps_json().is_empty(), "the failed attach is listed: {:?}", h1.ps_json());

    std::fs::remove_file(&fill).expect("remove fill");
    assert_eq!(attach_one(&h1, &c1, &["192.168.77.5/24"]), "192.168.77.5/24");
    assert_eq!(h1.ps_json().len(), 1);
}

/// Scenario 9: a router killed in the middle of an attach leaves the veth pair
/// half made (the far end in the target under its temporary name). The next
/// attach of that target (by the relaunched router, or by the user) deletes
/// it and attaches; it failed with "create veth ...: File exists" forever.
#[test]
fn attach_after_a_half_made_pair_works() {
    use std::os::unix::fs::MetadataExt;
    let Some(lab) = Lab::new("halfmade") else {
        return;
    };
    let h1 = lab.add_host(1);
    let c1 = lab.add_container(&h1, 1);
    h1.launch(&[]);
    // What the router's attach leaves when killed after moving the far end.
    let inode = std::fs::metadata(format!("/run/netns/{}", c1.ns)).expect("netns").ino();
    let host_if = format!("vmn{:08x}", (inode ^ (inode >> 32)) as u32);
    ip(&["-n", &h1.ns, "link", "add", &host_if, "type", "veth", "peer", "name", "mnt1f-2"]).expect_ok("veth");
    ip(&["-n", &h1.ns, "link", "set", "mnt1f-2", "netns", &c1.ns]).expect_ok("move the far end");
    assert_eq!(attach_one(&h1, &c1, &["192.168.77.5/24"]), "192.168.77.5/24");
    assert!(link(&c1.ns, "mnt1f-2").is_none(), "the half-made end is still in {}", c1.ns);
    // Cut short before the far end moved: the same.
    let c2 = lab.add_container(&h1, 2);
    let inode = std::fs::metadata(format!("/run/netns/{}", c2.ns)).expect("netns").ino();
    let host_if = format!("vmn{:08x}", (inode ^ (inode >> 32)) as u32);
    ip(&["-n", &h1.ns, "link", "add", &host_if, "type", "veth", "peer", "name", "mnt1f-3"]).expect_ok("veth");
    assert_eq!(attach_one(&h1, &c2, &["192.168.77.6/24"]), "192.168.77.6/24");
    assert!(link(&h1.ns, "mnt1f-3").is_none(), "the half-made end is still in {}", h1.ns);
}

// ---------------------------------------------------------------------------
// Weave's own IPAM tests (test/3xx_*.sh), replayed

/// Weave's 350_observers_can_call_election: two `consensus=2` peers that
/// nobody asked for an address stay idle; an `attach` on an `observer` makes
/// them agree, and gets an address within 10 s. (340: with one voter only, the
/// observer cannot make a quorum: covered by `consensus_waits_for_all_n_peers`.)
#[test]
fn an_observer_calls_the_election() {
    let Some(lab) = Lab::new("observer-election") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let c3 = lab.add_container(&h3, 3);
    let n1 = h1.launch(&["--ipalloc-init", "consensus=2"]);
    let n2 = h2.launch(&["--ipalloc-init", "consensus=2", &h1.ip]);
    let n3 = h3.launch(&["--ipalloc-init", "observer", &h2.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2), (&h3, &n3)], SECS(30));
    std::thread::sleep(SECS(2));
    for h in [&h1, &h2, &h3] {
        assert!(!agreed(&ipam(h)), "no address was asked for, yet {} has a ring", h.ns);
    }
    let t = Instant::now();
    let addr = attach_one(&h3, &c3, &[]);
    assert!(t.elapsed() < SECS(10), "the observer's attach took {:?}", t.elapsed());
    assert!(inside(parse_cidr(&addr).0, DEFAULT_RANGE), "{addr}");
    let v = ipam(&h3);
    assert!(owner(&v, &n3).is_some_and(|o| o["size"].as_u64().unwrap_or(0) > 0), "the observer owns no space: {v:#}");
}

/// Weave's 330_reset_2, a rolling restart with `reset`: each host in turn is
/// reset and launched again, joined to the other, which is reset right after.
/// The second reset came before its new neighbour was reachable, and handed
/// its ranges to nobody: they stayed with a name gone, and every attach failed.
#[test]
fn a_rolling_reset_hands_the_ranges_on() {
    let Some(lab) = Lab::new("rolling-reset") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2, c3) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2), lab.add_container(&h1, 3));
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    wait_meshed(&[(&h1, &n1), (&h2, &n2)], SECS(30));
    attach_one(&h1, &c1, &[]);
    attach_one(&h2, &c2, &[]);
    h1.meshnet(&["reset"]).expect_ok("reset h1");
    let m1 = h1.launch(&[&h2.ip]);
    h2.meshnet(&["reset"]).expect_ok("reset h2");
    let m2 = h2.launch(&[&h1.ip]);
    assert_ne!(m1, n1);
    assert_ne!(m2, n2);
    let t = Instant::now();
    attach_one(&h1, &c3, &[]);
    assert!(t.elapsed() < SECS(10), "attach after the rolling reset took {:?}", t.elapsed());
    let v = ipam(&h1);
    for gone in [&n1, &n2] {
        assert!(owner(&v, gone).is_none(), "{gone} (reset) still owns space: {v:#}");
    }
}

/// Weave's 362_ipalloc_range_change and the end of 380_ipam_seed_2: a router
/// launched again with another `--ipalloc-range`, or another `--name`, starts
/// IPAM afresh (the old state kept aside) instead of refusing to start; and
/// Weave's short peer names (`--name ::1`, `seed=::1,::2`) are taken.
#[test]
fn relaunch_with_another_range_or_name_starts_ipam_afresh() {
    let Some(lab) = Lab::new("range-change") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2, c3) = (lab.add_container(&h1, 1), lab.add_container(&h1, 2), lab.add_container(&h2, 3));
    let n1 = h1.launch(&["--ipalloc-range", "10.2.0.0/16"]);
    h1.meshnet(&["prime"]).expect_ok("prime");
    h1.meshnet(&["stop"]).expect_ok("stop");
    assert_eq!(h1.launch(&["--ipalloc-range", "10.3.0.0/16"]), n1);
    let t = Instant::now();
    let a = attach_one(&h1, &c1, &[]);
    assert!(t.elapsed() < SECS(10), "attach took {:?}", t.elapsed());
    assert!(inside(parse_cidr(&a).0, "10.3.0.0/16"), "{a}");
    assert!(h1.state_dir.join("ipam.bin.old").exists(), "the old IPAM state is kept aside");
    assert!(h1.log().contains("starting afresh"), "the log says why IPAM started afresh");

    // Weave's 380: seeded by short names; then relaunched under another name.
    h1.meshnet(&["reset"]).expect_ok("reset");
    let seed = ["--ipalloc-init", "seed=::1,::2"];
    assert_eq!(h1.launch(&[&["--name", "::1"][..], &seed].concat()), "00:00:00:00:00:01");
    assert_eq!(h2.launch(&[&["--name", "::2"][..], &seed].concat()), "00:00:00:00:00:02");
    let a2 = attach_one(&h1, &c2, &[]);
    let a3 = attach_one(&h2, &c3, &[]);
    assert_ne!(a2, a3);
    h2.meshnet(&["detach", &c3.ns]).expect_ok("detach");
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert_eq!(h2.launch(&["--name", "::3"]), "00:00:00:00:00:03");
    let v = ipam(&h2);
    assert!(!agreed(&v), "the new name kept the old name's ring: {v:#}");
}

/// Weave's 320_claim_2 (the part after the IPAM state is lost): an address
/// attached before the ring was agreed is claimed once it is; the allocation
/// that started consensus was served first and took it, the claim then failed
/// unseen, and every later attach was handed that address and refused.
#[test]
fn an_address_attached_before_agreement_is_not_handed_out() {
    let Some(lab) = Lab::new("deferred-claim") else {
        return;
    };
    let _diag = IpamDiag(&lab);
    let h1 = lab.add_host(1);
    let (c1, c2, c3) = (lab.add_container(&h1, 1), lab.add_container(&h1, 2), lab.add_container(&h1, 3));
    h1.launch(&["--ipalloc-range", "10.2.0.0/16"]);
    // The lowest address IPAM would hand out, attached before any ring.
    assert_eq!(attach_one(&h1, &c1, &["10.2.0.1/16"]), "10.2.0.1/16");
    assert!(!agreed(&ipam(&h1)));
    let a2 = attach_one(&h1, &c2, &[]);
    assert_ne!(a2, "10.2.0.1/16", "the address c1 uses was handed out again");
    let a3 = attach_one(&h1, &c3, &[]);
    assert_ne!(a3, a2);
    let ok = wait_until(SECS(5), || ipam_allocs(&ipam(&h1)).contains_key("10.2.0.1"));
    assert!(ok, "c1's address was not claimed: {:#}", ipam(&h1));

    // Weave's 500/510: `detach net:SUBNET` detaches the target's addresses in
    // that subnet, and none there is nothing to do (not "all of them").
    h1.meshnet(&["detach", "net:10.9.0.0/16", &c1.ns]).expect_ok("detach net: of no address of c1");
    assert_eq!(container_addrs(&c1), vec!["10.2.0.1/16".to_string()]);
    h1.meshnet(&["detach", "net:10.2.0.0/16", &c1.ns]).expect_ok("detach net:");
    assert!(container_addrs(&c1).is_empty());
    assert!(!ipam_allocs(&ipam(&h1)).contains_key("10.2.0.1"), "detached, yet still allocated");
}
