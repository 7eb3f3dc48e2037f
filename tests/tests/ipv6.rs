//! IPv6 on the overlay, end to end in namespaces: a dual-stack lab of three hosts
//! (h1 - h2 - h3, no discovery, so h1 and h3 talk only through h2) whose routers
//! have an IPv4 and an IPv6 `--ipalloc-range`. Containers get one address of
//! each family, unique across the mesh; `ping -6` crosses hosts and the relay;
//! 100 MB cross over IPv6 intact; `kill -9` and a relaunch keep the IPv6
//! addresses. A second lab of two hosts with different MTUs shows ICMPv6
//! "packet too big" and a `ping -6 -s 8000` that then crosses. A third lab
//! (`idle_multicast_into_the_mesh`) counts the broadcast and multicast frames
//! each host sends into the mesh while idle, before and after every host
//! exposes an IPv6 address, and checks the bridge itself stays quiet.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use meshnet_tests::lab::*;
use serde_json::Value;

const RANGE4: &str = "10.44.0.0/16";
const RANGE6: &str = "fd44::/64";

/// [`SINK`] listening on IPv6 (and IPv4-mapped) addresses.
const SINK6: &str = r#"
import hashlib, socket
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 5001)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(h.hexdigest(), n, flush=True)
"#;

fn launch_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--no-discovery", "--ipalloc-range", RANGE4, "--ipalloc-range", RANGE6];
    a.extend_from_slice(extra);
    a
}

/// The addresses `attach` printed (`ip/prefix ...` on its last line).
fn addrs_of(out: &Out) -> Vec<(IpAddr, u8)> {
    out.last_line()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|a| {
            let (ip, p) = a.split_once('/')?;
            Some((ip.parse().ok()?, p.parse().ok()?))
        })
        .collect()
}

fn v6_of(addrs: &[(IpAddr, u8)]) -> String {
    addrs.iter().find(|(ip, _)| ip.is_ipv6()).map(|(ip, _)| ip.to_string()).expect("an IPv6 address")
}

fn connected_to(h: &Host, name: &str) -> bool {
    h.status_json()["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["peer"] == name && c["state"] == "established")
}

fn relayed(h: &Host) -> u64 {
    h.status_json()["dataplane"]["relayed_units"].as_u64().unwrap_or(0)
}

#[test]
fn dual_stack_lab_of_three_hosts() {
    let Some(lab) = Lab::new("ip6") else { return };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let n1 = h1.launch(&launch_args(&[]));
    let n2 = h2.launch(&launch_args(&[&h1.ip]));
    let n3 = h3.launch(&launch_args(&[&h2.ip]));
    assert!(
        wait_until(Duration::from_secs(30), || connected_to(&h2, &n1) && connected_to(&h2, &n3)),
        "h2 is not connected to h1 and h3: {:#}",
        h2.status_json()
    );
    let cs: Vec<Container> = [&h1, &h2, &h3].iter().enumerate().map(|(k, h)| lab.add_container(h, k as u8 + 1)).collect();
    let hosts = [&h1, &h2, &h3];
    // attach with no address: one address of each family, from each range.
    let mut all: Vec<Vec<(IpAddr, u8)>> = Vec::new();
    for (h, c) in hosts.iter().zip(&cs) {
        let out = h.meshnet(&["attach", &c.ns]).expect_ok("attach");
        let a = addrs_of(&out);
        assert_eq!(a.len(), 2, "attach on {} gave {out}", h.ns);
        let r4: meshnet_proto::ipam::Cidr = RANGE4.parse().unwrap();
        let r6: meshnet_proto::ipam::Cidr = RANGE6.parse().unwrap();
        assert!(a.iter().any(|(ip, p)| ip.is_ipv4() && r4.contains(*ip) && *p == 16), "{a:?}");
        assert!(a.iter().any(|(ip, p)| ip.is_ipv6() && r6.contains(*ip) && *p == 64), "{a:?}");
        all.push(a);
    }
    let unique: BTreeSet<IpAddr> = all.iter().flatten().map(|(ip, _)| *ip).collect();
    assert_eq!(unique.len(), 6, "addresses not unique across the mesh: {all:?}");
    // ps shows both families.
    for (h, c) in hosts.iter().zip(&cs) {
        let ps = h.ps_json();
        let e = ps.iter().find(|e| e["target"] == c.ns.as_str()).expect("in ps");
        let shown: Vec<&str> = e["addresses"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
        assert!(shown.iter().any(|a| a.contains(':')) && shown.iter().any(|a| a.contains('.')), "ps: {shown:?}");
    }
    // status ipam shows the IPv6 ring, agreed, with its allocations.
    let st = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    assert_eq!(st["ipv6"]["range"], RANGE6, "{st:#}");
    assert_eq!(st["ipv6"]["state"]["agreed"], true, "{st:#}");
    let text = h1.meshnet(&["status", "ipam"]).expect_ok("status ipam").stdout;
    assert!(text.contains("IPv6 ring:") && text.contains(RANGE6), "{text}");

    let (v6_1, v6_2, v6_3) = (v6_of(&all[0]), v6_of(&all[1]), v6_of(&all[2]));
    assert!(ping_until(&cs[0].ns, &v6_2, Duration::from_secs(30)), "ping -6 c1 -> c2 across hosts");
    assert!(ping_until(&cs[1].ns, &v6_1, Duration::from_secs(10)), "ping -6 c2 -> c1");
    let relayed_before = relayed(&h2);
    assert!(ping_until(&cs[0].ns, &v6_3, Duration::from_secs(30)), "ping -6 c1 -> c3 through h2");
    assert!(ping_until(&cs[2].ns, &v6_1, Duration::from_secs(10)), "ping -6 c3 -> c1 through h2");
    assert!(!connected_to(&h1, &n3), "h1 is connected to h3 directly");
    assert!(relayed(&h2) > relayed_before, "h2 relayed nothing: {:#}", h2.status_json());
    // Neighbour discovery went across: c1 knows c2's and c3's MACs.
    let neigh = exec_in(&cs[0].ns, &["ip", "-6", "neigh", "show"]).stdout;
    assert!(neigh.contains(&v6_2) && neigh.contains(&v6_3), "neighbours of c1: {neigh}");

    // 100 MB over IPv6, checked end to end.
    let mut rx = lab.spawn_in(&cs[1].ns, &["python3", "-c", SINK6]);
    assert!(wait_until(Duration::from_secs(10), || rx.stdout().contains("listening")), "sink: {}", rx.stderr());
    let bytes = 100u64 << 20;
    let t = std::time::Instant::now();
    let sent = exec_in_timeout(&cs[0].ns, &["python3", "-c", SOURCE, &v6_2, &bytes.to_string()], Duration::from_secs(180));
    assert!(sent.ok(), "100 MB over IPv6: {sent}");
    assert!(rx.wait(Duration::from_secs(30)), "sink did not finish: {}", rx.stderr());
    let (got, sent) = (digest_line(&rx.stdout()), digest_line(&sent.stdout));
    assert_eq!(sent.split(' ').nth(1), Some(bytes.to_string().as_str()), "sender: {sent}");
    assert_eq!(got, sent, "received data differs from what was sent");
    eprintln!("100 MB over IPv6 in {:.1}s", t.elapsed().as_secs_f64());

    // kill -9 and relaunch: the IPv6 addresses stay (ipam6.bin), in ps and in IPAM.
    let ps_before = h2.ps_json();
    kill9(&h2);
    let again = h2.launch(&launch_args(&[&h1.ip]));
    assert_eq!(again, n2);
    let ps_after = h2.ps_json();
    let addrs = |ps: &[Value]| -> BTreeSet<String> {
        ps.iter().flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default()).filter_map(|a| a.as_str().map(String::from)).collect()
    };
    assert_eq!(addrs(&ps_after), addrs(&ps_before), "ps on h2 changed across kill -9 + launch");
    let st = h2.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    let held6: Vec<&str> = st["ipv6"]["allocations"].as_array().into_iter().flatten().filter_map(|a| a["ip"].as_str()).collect();
    assert!(held6.contains(&v6_2.as_str()), "h2's IPv6 ring forgot {v6_2} across kill -9: {st:#}");
    assert!(ping_until(&cs[0].ns, &v6_2, Duration::from_secs(30)), "ping -6 c1 -> c2 after the relaunch");
    // A new container on h2 gets fresh addresses of both families.
    let c4 = lab.add_container(&h2, 4);
    let a4 = addrs_of(&h2.meshnet(&["attach", &c4.ns]).expect_ok("attach c4"));
    assert_eq!(a4.len(), 2);
    assert!(a4.iter().all(|(ip, _)| !unique.contains(ip)), "{a4:?} reuses one of {unique:?}");
    // Exact IPv6 forms: ip:, net: and a bare CIDR; detach releases.
    let c5 = lab.add_container(&h3, 5);
    let out = h3.meshnet(&["attach", "ip:fd44::5/64", "net:fd44:0:0:0:1::/80", &c5.ns]).expect_ok("attach c5");
    let a5 = addrs_of(&out);
    assert!(a5.contains(&("fd44::5".parse().unwrap(), 64)), "{a5:?}");
    assert!(a5.iter().any(|(ip, p)| *p == 80 && ip.to_string().starts_with("fd44::1:")), "{a5:?}");
    let taken = h1.meshnet(&["attach", "ip:fd44::5/64", &lab.add_container(&h1, 6).ns]);
    assert!(!taken.ok(), "fd44::5 handed out twice: {taken}");
    h3.meshnet(&["detach", "ip:fd44::5/64", &c5.ns]).expect_ok("detach");
    let st = h3.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
    assert!(
        !st["ipv6"]["allocations"].as_array().into_iter().flatten().any(|a| a["ip"] == "fd44::5"),
        "detach did not release fd44::5: {st:#}"
    );
}

/// One host with MTU 1376, one with 8000: a `ping -6 -s 8000` from the 8000
/// side gets ICMPv6 packet too big carrying 1376 from its router, the sender's
/// kernel learns it, and the pings then cross.
#[test]
fn ipv6_packet_too_big_then_crosses() {
    let Some(lab) = Lab::new("ip6ptb") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    h1.launch(&launch_args(&["--mtu", "1376"]));
    h2.launch(&launch_args(&["--mtu", "8000", &h1.ip]));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    h1.meshnet(&["attach", "fd44::1/64", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "fd44::2/64", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c2.ns, "fd44::1", Duration::from_secs(30)), "c2 cannot reach c1 over IPv6");
    let before = h2.status_json()["dataplane"]["frag_needed_sent"].as_u64().unwrap_or(0);
    let first = exec_in_timeout(&c2.ns, &["ping", "-6", "-n", "-c", "3", "-i", "0.5", "-W", "2", "-s", "8000", "fd44::1"], Duration::from_secs(15));
    eprintln!("first ping -6 -s 8000:\n{first}");
    let after = h2.status_json()["dataplane"]["frag_needed_sent"].as_u64().unwrap_or(0);
    assert!(after > before, "no packet too big sent by h2 ({before} -> {after})");
    let route = exec_in(&c2.ns, &["ip", "-6", "route", "get", "fd44::1"]).stdout;
    assert!(route.contains("mtu 1376"), "c2 did not learn MTU 1376: {route}");
    let again = exec_in_timeout(&c2.ns, &["ping", "-6", "-n", "-c", "3", "-i", "0.5", "-W", "2", "-s", "8000", "fd44::1"], Duration::from_secs(15));
    assert!(again.ok(), "ping -6 -s 8000 after packet too big: {again}");
}

/// What kind of broadcast/multicast frame `f` is (for the idle count).
fn kind_of(f: &[u8]) -> &'static str {
    if f.len() < 14 {
        return "runt";
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0806 => "ARP",
        0x0800 => "IPv4 other",
        0x86dd if f.len() >= 54 => {
            let (mut nh, mut o) = (f[20], 54);
            if nh == 0 && f.len() >= o + 2 {
                // Hop-by-hop options (router alert, as MLD has).
                nh = f[o];
                o += 8 * (usize::from(f[o + 1]) + 1);
            }
            match (nh, f.get(o)) {
                (58, Some(133)) => "ICMPv6 router solicitation",
                (58, Some(134)) => "ICMPv6 router advertisement",
                (58, Some(135)) => "ICMPv6 neighbour solicitation",
                (58, Some(136)) => "ICMPv6 neighbour advertisement",
                (58, Some(130 | 131 | 132 | 143)) => "ICMPv6 MLD",
                _ => "IPv6 other",
            }
        }
        _ => "other",
    }
}

type Kinds = std::collections::BTreeMap<&'static str, usize>;

/// The MAC of `dev` in `ns`.
fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let l = link(ns, dev).unwrap_or_else(|| panic!("no {dev} in {ns}"));
    let mut mac = [0u8; 6];
    for (i, b) in l["address"].as_str().unwrap_or_default().split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(b, 16).unwrap_or(0);
    }
    mac
}

/// Captures, on each host's TAP (outgoing), the broadcast and multicast frames
/// its bridge hands the router to send into the mesh; [`counted`] stops them.
fn start_counting(lab: &Lab, hosts: &[&Host]) -> Vec<(Bg, std::path::PathBuf, [u8; 6])> {
    hosts
        .iter()
        .map(|h| {
            let file = std::env::temp_dir().join(format!("meshnet-idle-{}-{}.pcap", h.ns, std::process::id()));
            let f = file.to_string_lossy().into_owned();
            let bg = lab.spawn_in(&h.ns, &["tcpdump", "-i", "meshnet-tap", "-Q", "out", "-n", "-U", "-Z", "root", "-s", "0", "-w", &f, "ether multicast"]);
            assert!(wait_until(Duration::from_secs(10), || bg.stderr().contains("listening on")), "tcpdump: {}", bg.stderr());
            (bg, file, mac_of(&h.ns, "meshnet"))
        })
        .collect()
}

/// Per host: the count of each kind of frame captured, and the same for those
/// the bridge (the host's own stack) sent.
fn counted(hosts: &[&Host], caps: Vec<(Bg, std::path::PathBuf, [u8; 6])>) -> Vec<(Kinds, Kinds)> {
    let mut out = Vec::new();
    for ((mut bg, file, mac0), h) in caps.into_iter().zip(hosts) {
        bg.stop(libc::SIGINT);
        let pcap = Pcap::parse(std::fs::read(&file).expect("capture file")).expect("pcap");
        let _ = std::fs::remove_file(&file);
        let mac1 = mac_of(&h.ns, "meshnet");
        let mut kinds = Kinds::new();
        let mut own = Kinds::new();
        for f in &pcap.frames {
            *kinds.entry(kind_of(f)).or_insert(0) += 1;
            if f.len() >= 12 && (f[6..12] == mac0 || f[6..12] == mac1) {
                *own.entry(kind_of(f)).or_insert(0) += 1;
            }
        }
        out.push((kinds, own));
    }
    out
}

fn count_into_mesh(lab: &Lab, hosts: &[&Host], window: Duration) -> Vec<(Kinds, Kinds)> {
    let caps = start_counting(lab, hosts);
    std::thread::sleep(window);
    counted(hosts, caps)
}

/// Three dual-stack hosts, two dual-stack containers each, talking once, then
/// idle: the broadcast/multicast frames each host sends into the mesh over a
/// window (`MESHNET_IDLE_SECS`, 20 s unless set), with nothing exposed and
/// then with an address of each family exposed on every host. The bridge
/// itself (IPv6 on since this build, but with no address until an expose)
/// sends nothing while idle, and never a router solicitation or DAD probe.
#[test]
fn idle_multicast_into_the_mesh() {
    let Some(lab) = Lab::new("ip6idle") else { return };
    let window = Duration::from_secs(std::env::var("MESHNET_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20));
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let n1 = h1.launch(&launch_args(&[]));
    h2.launch(&launch_args(&[&h1.ip]));
    let n3 = h3.launch(&launch_args(&[&h2.ip]));
    assert!(wait_until(Duration::from_secs(30), || connected_to(&h2, &n1) && connected_to(&h2, &n3)), "h2 is not connected");
    let hosts = [&h1, &h2, &h3];
    let mut v6s = Vec::new();
    let mut cs = Vec::new();
    for (k, h) in hosts.iter().enumerate() {
        for j in 0..2u8 {
            let c = lab.add_container(h, 10 * (k as u8 + 1) + j);
            let a = addrs_of(&h.meshnet(&["attach", &c.ns]).expect_ok("attach"));
            assert_eq!(a.len(), 2, "{a:?}");
            v6s.push(v6_of(&a));
            cs.push(c);
        }
    }
    // Every container talks to the next host's first container once (ND across the mesh).
    for (i, c) in cs.iter().enumerate() {
        let to = &v6s[(i / 2 * 2 + 2) % v6s.len()];
        assert!(ping_until(&c.ns, to, Duration::from_secs(30)), "ping -6 {} -> {to}", c.ns);
    }
    std::thread::sleep(Duration::from_secs(5));
    let report = |what: &str, secs: u64, counts: &[(Kinds, Kinds)]| {
        for (h, (kinds, own)) in hosts.iter().zip(counts) {
            let total: usize = kinds.values().sum();
            eprintln!("MEASURE {what}: {} sent {total} broadcast/multicast frames into the mesh in {secs}s: {kinds:?}; from its bridge: {own:?}", h.ns);
        }
    };
    let idle = count_into_mesh(&lab, &hosts, window);
    report("idle, nothing exposed", window.as_secs(), &idle);
    for (h, (_, own)) in hosts.iter().zip(&idle) {
        assert!(own.is_empty(), "{}'s bridge sent frames into the mesh with nothing exposed", h.ns);
    }

    // Every host exposes an address of each family (the bridge gets an IPv6 one).
    let caps = start_counting(&lab, &hosts);
    std::thread::sleep(Duration::from_secs(2));
    for h in hosts {
        let out = h.meshnet(&["expose"]).expect_ok("expose");
        eprintln!("{} exposed {}", h.ns, out.stdout.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    std::thread::sleep(Duration::from_secs(6));
    let transient = counted(&hosts, caps);
    report("while exposing", 8, &transient);
    // Each host's stack reaches a container on the next host (ND across the
    // mesh, from the bridge's exposed address) while every host has its
    // exposure table: where br_netfilter is loaded, the bridged neighbour
    // solicitations pass those tables' forward hook too.
    for (k, h) in hosts.iter().enumerate() {
        let to = &v6s[(k * 2 + 2) % v6s.len()];
        let ok = ping_until(&h.ns, to, Duration::from_secs(10));
        eprintln!("MEASURE {} ping -6 {to} (a container on the next host) after expose: {}", h.ns, if ok { "answered" } else { "no answer" });
        assert!(ok, "{} cannot ping -6 {to}, a container on the next host, with every host exposed", h.ns);
    }
    std::thread::sleep(Duration::from_secs(5));
    let idle = count_into_mesh(&lab, &hosts, window);
    report("idle, v4+v6 exposed on every host", window.as_secs(), &idle);
    for (h, (_, own)) in hosts.iter().zip(&idle) {
        assert!(own.is_empty(), "{}'s bridge sent frames into the mesh while idle with IPv6 exposed", h.ns);
    }
    for (h, (_, own)) in hosts.iter().zip(&transient) {
        assert!(!own.contains_key("ICMPv6 router solicitation"), "{}'s bridge solicited routers: {own:?}", h.ns);
    }
}
