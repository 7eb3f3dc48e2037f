//! Trusted subnets (`--trusted-subnets`) end to end in namespaces: mutual trust
//! puts data in plain text on the underlay through the kernel's VXLAN device
//! (whose counters move while meshnet's do not), one-sided trust stays
//! encrypted, a mesh mixes both, and `reset`/`stop`/`kill -9` handle the device.

use std::time::Duration;

use meshnet_tests::lab::*;
use serde_json::Value;

/// 16 bytes `ping -p` repeats through each echo's payload.
const MARKER: &[u8] = b"trusted-marker!!";
/// The bridge every router here uses (the default), and so its VXLAN device.
const VXLAN_DEV: &str = "vxm-meshnet";

fn marker_hex() -> String {
    MARKER.iter().map(|b| format!("{b:02x}")).collect()
}

fn underlay(lab: &Lab) -> String {
    format!("10.250.{}.0/24", lab.k)
}

/// The connection of `h` to peer `name`, from `status connections --json`.
fn conn_to(h: &Host, name: &str) -> Option<Value> {
    connections(&h.status_json()).into_iter().find(|c| c["peer"].as_str() == Some(name))
}

fn data_mode(h: &Host, name: &str) -> String {
    conn_to(h, name).and_then(|c| c["data"].as_str().map(String::from)).unwrap_or_default()
}

#[track_caller]
fn wait_mode(lab: &Lab, h: &Host, name: &str, want: &str) {
    let ok = wait_until(Duration::from_secs(30), || data_mode(h, name) == want);
    if !ok {
        lab.dump();
    }
    assert!(ok, "{}: connection to {name} is {:?}, not {want:?}: {:#}", h.ns, data_mode(h, name), conn_to(h, name).unwrap_or_default());
}

fn trusted_status(h: &Host) -> Value {
    h.status_json()["trusted"].clone()
}

fn tap_units(h: &Host) -> u64 {
    h.status_json()["dataplane"]["tap_units_in"].as_u64().unwrap_or(0)
}

fn link_exists(h: &Host, name: &str) -> bool {
    ip(&["-n", &h.ns, "link", "show", name]).ok()
}

/// tx packets of `dev` in `h`, from the kernel.
fn dev_tx_packets(h: &Host, dev: &str) -> u64 {
    let out = ip(&["-n", &h.ns, "-s", "-j", "link", "show", dev]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0)
}

/// Pings with the marker in every payload while capturing the underlay of
/// `capture_on`; returns the capture.
fn ping_marked(lab: &Lab, from: &Container, to_ip: &str, capture_on: &Host) -> Pcap {
    let cap = lab.capture(&capture_on.ns, UNDERLAY_IF);
    let out = exec_in(&from.ns, &["ping", "-c", "10", "-i", "0.2", "-W", "2", "-p", &marker_hex(), to_ip]);
    assert!(out.ok(), "marked ping {} -> {to_ip} failed: {out}", from.ns);
    cap.stop()
}

/// IPv4 ICMP echo requests in `pcap` that carry the marker.
fn echo_requests_with_marker(pcap: &Pcap) -> usize {
    pcap.frames
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [0x08, 0x00] && f[23] == 1)
        .filter(|f| f.get(14 + usize::from(f[14] & 0x0f) * 4) == Some(&8))
        .filter(|f| f.windows(MARKER.len()).any(|w| w == MARKER))
        .count()
}

struct Pair {
    lab: Lab,
    h: [Host; 2],
    names: [String; 2],
    c: [Container; 2],
}

/// Two routers with the given `--trusted-subnets` (None: the option left out),
/// containers c1/c2 as 10.43.0.1/2, reachable.
fn pair(test: &str, trust: impl Fn(&Lab) -> [Option<String>; 2]) -> Option<Pair> {
    pair_with(test, trust, &[])
}

/// [`pair`] with more launch options for both routers.
fn pair_with(test: &str, trust: impl Fn(&Lab) -> [Option<String>; 2], extra: &[&str]) -> Option<Pair> {
    let lab = Lab::new(test)?;
    let trust = trust(&lab);
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let args = |i: usize, peer: Option<&str>| {
        let mut a: Vec<String> = vec!["--password".into(), "trust".into()];
        a.extend(extra.iter().map(|x| x.to_string()));
        if let Some(t) = &trust[i] {
            a.push("--trusted-subnets".into());
            a.push(t.clone());
        }
        if let Some(p) = peer {
            a.push(p.into());
        }
        a
    };
    let a1 = args(0, None);
    let n1 = h1.launch(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    let a2 = args(1, Some(&h1.ip));
    let n2 = h2.launch(&a2.iter().map(String::as_str).collect::<Vec<_>>());
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", "10.43.0.1/24", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.43.0.2/24", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c1.ns, "10.43.0.2", Duration::from_secs(30)), "c1 cannot reach c2");
    Some(Pair { lab, h: [h1, h2], names: [n1, n2], c: [c1, c2] })
}

/// Pings c1 → c2 until both routers learned the other container's MAC and
/// pointed the bridge at the device (an entry each), for at most 20 s.
fn wait_learned(p: &Pair) {
    let [h1, h2] = &p.h;
    // Until both sides' entries are in, a reply may come the userspace way and the
    // bridge learn the far container on that port: wait for a ping that went
    // through the VXLAN device both ways.
    let learned = wait_until(Duration::from_secs(20), || {
        let before = [dev_tx_packets(h1, VXLAN_DEV), dev_tx_packets(h2, VXLAN_DEV)];
        assert!(ping(&p.c[0].ns, "10.43.0.2", 1));
        [h1, h2].iter().all(|h| trusted_status(h)["fdb_entries"].as_u64().unwrap_or(0) >= 1)
            && dev_tx_packets(h1, VXLAN_DEV) > before[0]
            && dev_tx_packets(h2, VXLAN_DEV) > before[1]
    });
    assert!(learned, "no forwarding entries: {:#} / {:#}", trusted_status(h1), trusted_status(h2));
}

#[test]
fn mutual_trust_carries_data_in_plain_text_through_the_kernel() {
    let Some(p) = pair("trustmutual", |lab| [Some(underlay(lab)), Some(underlay(lab))]) else { return };
    let [h1, h2] = &p.h;
    wait_mode(&p.lab, h1, &p.names[1], "trusted (kernel)");
    wait_mode(&p.lab, h2, &p.names[0], "trusted (kernel)");
    wait_learned(&p);
    assert!(link_exists(h1, VXLAN_DEV) && link_exists(h2, VXLAN_DEV));

    let units_before = tap_units(h1);
    let vx_before = dev_tx_packets(h1, VXLAN_DEV);
    let pcap = ping_marked(&p.lab, &p.c[0], "10.43.0.2", h1);
    let units = tap_units(h1) - units_before;
    let vx = dev_tx_packets(h1, VXLAN_DEV) - vx_before;
    assert!(pcap.contains(MARKER), "the marker is not in plain text on the underlay");
    assert!(pcap.count(17, 6784) >= 10, "fewer than 10 datagrams on UDP 6784: {}", pcap.count(17, 6784));
    assert!(vx >= 10, "the VXLAN device sent {vx} packets for 10 echoes");
    // meshnet's own path saw at most the odd ARP broadcast, not the 10 echoes.
    assert!(units < 5, "meshnet's TAP took {units} units during 10 echoes: not the kernel path");
    let out = exec_in(&p.c[0].ns, &["ping", "-c", "5", "-i", "0.2", "10.43.0.2"]);
    assert!(out.ok() && !out.stdout.contains("DUP!"), "duplicate or lost replies: {out}");
    let text = h1.meshnet(&["status", "connections"]).expect_ok("status connections");
    assert!(text.stdout.contains("trusted (kernel)"), "{text}");
    eprintln!("status connections on h1:\n{}", text.stdout);
    let st = h1.meshnet(&["status"]).expect_ok("status");
    assert!(st.stdout.contains("Trusted subnets:"), "{st}");
    eprintln!("{}", st.stdout.lines().find(|l| l.contains("Trusted subnets:")).unwrap_or_default());

    // Bulk both ways, checked, through the kernel.
    let before = tap_units(h1);
    checked_transfer(&p.lab, &p.c[0].ns, &p.c[1].ns, "10.43.0.2", 50 << 20, Duration::from_secs(120));
    checked_transfer(&p.lab, &p.c[1].ns, &p.c[0].ns, "10.43.0.1", 50 << 20, Duration::from_secs(120));
    let units = tap_units(h1) - before;
    assert!(units < 100, "meshnet's TAP took {units} units during 100 MB of trusted transfers");
    assert!(trusted_status(h1)["tx_bytes"].as_u64().unwrap_or(0) > 50 << 20, "{:#}", trusted_status(h1));
}

/// A router restarted (`stop` then `launch --resume`, and `kill -9` then
/// `launch --resume`) goes back to the kernel path for the other router's
/// containers, not only the other way round. The peer already knew the
/// restarted side's MACs, so its containers' frames all come through the
/// kernel, which teaches the restarted router nothing; their ARP refreshes are
/// unicast too. Without an announcement from the peer its data to them stayed
/// encrypted for as long as they broadcast nothing.
#[test]
fn a_restarted_router_sends_through_the_kernel_again() {
    let Some(p) = pair("trustrestart", |lab| [Some(underlay(lab)), Some(underlay(lab))]) else { return };
    let [h1, h2] = &p.h;
    wait_mode(&p.lab, h1, &p.names[1], "trusted (kernel)");
    wait_mode(&p.lab, h2, &p.names[0], "trusted (kernel)");
    wait_learned(&p);
    for how in ["stop", "kill -9"] {
        if how == "stop" {
            h2.meshnet(&["stop"]).expect_ok("stop");
        } else {
            kill9(h2);
        }
        h2.meshnet_env(&["launch", "--resume"], &[("MESHNET_PASSWORD", "trust")]).expect_ok("resume");
        wait_mode(&p.lab, h2, &p.names[0], "trusted (kernel)");
        // Traffic both ways, as a user's would be; h2 must learn c1's MAC and
        // send to it through the device.
        let learned = wait_until(Duration::from_secs(20), || {
            assert!(ping(&p.c[1].ns, "10.43.0.1", 1) && ping(&p.c[0].ns, "10.43.0.2", 1));
            trusted_status(h2)["fdb_entries"].as_u64().unwrap_or(0) >= 1
        });
        assert!(learned, "after {how}, h2 never learned c1's MAC: {:#}", trusted_status(h2));
        let vx_before = dev_tx_packets(h2, VXLAN_DEV);
        let out = exec_in(&p.c[1].ns, &["ping", "-c", "10", "-i", "0.1", "10.43.0.1"]);
        assert!(out.ok(), "{out}");
        let vx = dev_tx_packets(h2, VXLAN_DEV) - vx_before;
        assert!(vx >= 10, "after {how}, h2's VXLAN device sent {vx} packets for 10 echoes");
    }
}

#[test]
fn one_sided_trust_stays_encrypted() {
    // h1 trusts the underlay; h2 trusts only a subnet h1 is not in.
    let Some(p) = pair("trustone", |lab| [Some(underlay(lab)), Some("192.0.2.0/24".into())]) else { return };
    let [h1, h2] = &p.h;
    // Both records arrived and both sides say why they stay encrypted.
    let said = wait_until(Duration::from_secs(20), || {
        conn_to(h1, &p.names[1]).and_then(|c| c["data_reason"].as_str().map(String::from)).is_some_and(|r| r.contains("does not trust"))
            && conn_to(h2, &p.names[0]).and_then(|c| c["data_reason"].as_str().map(String::from)).is_some_and(|r| r.contains("not in our trusted"))
    });
    assert!(said, "{:#} / {:#}", conn_to(h1, &p.names[1]).unwrap_or_default(), conn_to(h2, &p.names[0]).unwrap_or_default());
    assert_eq!(data_mode(h1, &p.names[1]), "encrypted");
    assert_eq!(data_mode(h2, &p.names[0]), "encrypted");
    let units_before = tap_units(h1);
    let pcap = ping_marked(&p.lab, &p.c[0], "10.43.0.2", h1);
    assert!(!pcap.contains(MARKER), "one-sided trust put the marker in plain text on the underlay");
    assert_eq!(pcap.count(17, 6784), 0, "datagrams on the VXLAN port with one-sided trust");
    assert!(tap_units(h1) - units_before >= 10, "the echoes did not take meshnet's encrypted path");
    assert_eq!(trusted_status(h1)["fdb_entries"].as_u64(), Some(0));
}

#[test]
fn a_mesh_mixes_trusted_and_encrypted_peers() {
    let Some(lab) = Lab::new("trustmix") else { return };
    let t = underlay(&lab);
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let h3 = lab.add_host(3);
    let n1 = h1.launch(&["--password", "mix", "--trusted-subnets", &t]);
    let n2 = h2.launch(&["--password", "mix", "--trusted-subnets", &t, &h1.ip]);
    let n3 = h3.launch(&["--password", "mix", &h1.ip, &h2.ip]);
    let c: Vec<Container> = [&h1, &h2, &h3].iter().enumerate().map(|(i, h)| lab.add_container(h, i as u8 + 1)).collect();
    for (i, h) in [&h1, &h2, &h3].iter().enumerate() {
        h.meshnet(&["attach", &format!("10.44.0.{}/24", i + 1), &c[i].ns]).expect_ok("attach");
    }
    for (a, b) in [(0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1)] {
        let to = format!("10.44.0.{}", b + 1);
        assert!(ping_until(&c[a].ns, &to, Duration::from_secs(30)), "c{} cannot reach {to}", a + 1);
    }
    wait_mode(&lab, &h1, &n2, "trusted (kernel)");
    wait_mode(&lab, &h2, &n1, "trusted (kernel)");
    wait_mode(&lab, &h1, &n3, "encrypted");
    wait_mode(&lab, &h3, &n1, "encrypted");
    wait_mode(&lab, &h2, &n3, "encrypted");
    // The untrusted peer never hears plain data: capture its underlay while c1 talks to c3.
    let cap = lab.capture(&h3.ns, UNDERLAY_IF);
    let out = exec_in(&c[0].ns, &["ping", "-c", "5", "-i", "0.2", "-p", &marker_hex(), "10.44.0.3"]);
    assert!(out.ok(), "{out}");
    let pcap = cap.stop();
    assert!(!pcap.contains(MARKER), "data to the untrusted peer went in plain text");
    // Checked transfers on both kinds of link, both ways.
    checked_transfer(&lab, &c[0].ns, &c[2].ns, "10.44.0.3", 20 << 20, Duration::from_secs(120));
    checked_transfer(&lab, &c[2].ns, &c[0].ns, "10.44.0.1", 20 << 20, Duration::from_secs(120));
    checked_transfer(&lab, &c[0].ns, &c[1].ns, "10.44.0.2", 20 << 20, Duration::from_secs(120));
    checked_transfer(&lab, &c[1].ns, &c[0].ns, "10.44.0.1", 20 << 20, Duration::from_secs(120));
    // Broadcasts arrive exactly once everywhere over the mixed mesh (they take
    // the encrypted path; the VXLAN port floods nothing).
    let caps: Vec<Capture> = c[1..].iter().map(|x| lab.capture(&x.ns, "ethwe")).collect();
    let _ = exec_in(&c[0].ns, &["ping", "-b", "-c", "3", "-i", "0.3", "-W", "1", "-p", &marker_hex(), "10.44.0.255"]);
    std::thread::sleep(Duration::from_millis(500));
    for (i, cap) in caps.into_iter().enumerate() {
        let n = echo_requests_with_marker(&cap.stop());
        assert_eq!(n, 3, "c{} saw {n} of 3 broadcast echo requests", i + 2);
    }
    // The trusted pair used the kernel for its transfers, the other links did not.
    assert!(trusted_status(&h1)["tx_bytes"].as_u64().unwrap_or(0) > 20 << 20, "{:#}", trusted_status(&h1));
    assert_eq!(trusted_status(&h3)["device"], Value::Null);

    // A host on the underlay that h1 does not trust both ways (h3) sends h1's
    // VXLAN port a frame for c1: meshnet's filter drops and counts it.
    let c1_mac = exec_in(&c[0].ns, &["cat", "/sys/class/net/ethwe/address"]).stdout.trim().to_string();
    let forge = |from: &Host| {
        let cap = lab.capture(&c[0].ns, "ethwe");
        let out = exec_in(&from.ns, &["python3", "-c", FORGE_VXLAN, &h1.ip, &c1_mac, "10.44.0.1"]);
        assert!(out.ok(), "{out}");
        std::thread::sleep(Duration::from_millis(500));
        cap.stop().contains(FORGED)
    };
    let dropped = trusted_status(&h1)["foreign_dropped"].as_u64().unwrap_or(0);
    assert!(!forge(&h3), "a frame sent to h1's VXLAN port by an untrusted host reached c1");
    let now = trusted_status(&h1)["foreign_dropped"].as_u64().unwrap_or(0);
    assert!(now >= dropped + 5, "the filter counted {} of 5 forged datagrams: {:#}", now - dropped, trusted_status(&h1));
    // The filter is meshnet's own table, and names the trusted peer.
    let table = exec_in(&h1.ns, &["nft", "list", "table", "ip", "meshnet-trusted-meshnet"]).expect_ok("nft list table");
    assert!(table.stdout.contains(&h2.ip) && !table.stdout.contains(&h3.ip), "{table}");
}

/// `python3 -c FORGE_VXLAN HOST DST_MAC DST_IP`: five VXLAN datagrams (VNI
/// 28014) to HOST:6784, each an Ethernet frame to DST_MAC carrying a UDP
/// datagram to DST_IP:9 whose payload is [`FORGED`].
const FORGE_VXLAN: &str = r#"
import socket, struct, sys
host, mac, dst = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', '')), socket.inet_aton(sys.argv[3])
payload = b'forged-vxlan-frame'
udp = struct.pack('!HHHH', 4242, 9, 8 + len(payload), 0) + payload
hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton('10.44.0.99'), dst)
s = sum(struct.unpack('!10H', hdr))
s = (s & 0xffff) + (s >> 16); s = (s & 0xffff) + (s >> 16)
hdr = hdr[:10] + struct.pack('!H', ~s & 0xffff) + hdr[12:]
frame = mac + bytes.fromhex('02aabbccddee') + bytes.fromhex('0800') + hdr + udp
vxlan = struct.pack('!BBBBI', 0x08, 0, 0, 0, 28014 << 8)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    sock.sendto(vxlan + frame, (host, 6784))
"#;
const FORGED: &[u8] = b"forged-vxlan-frame";

#[test]
fn reset_removes_the_device_and_relaunches_make_it_again() {
    let Some(lab) = Lab::new("trustreset") else { return };
    let t = underlay(&lab);
    let h1 = lab.add_host(1);
    h1.launch(&["--trusted-subnets", &t]);
    assert!(link_exists(&h1, VXLAN_DEV), "no {VXLAN_DEV} after launch");
    assert_eq!(trusted_status(&h1)["port"].as_u64(), Some(6784));
    h1.meshnet(&["stop"]).expect_ok("stop");
    assert!(wait_until(Duration::from_secs(10), || !link_exists(&h1, VXLAN_DEV)), "stop left {VXLAN_DEV}");
    h1.launch(&["--trusted-subnets", &t]);
    assert!(link_exists(&h1, VXLAN_DEV), "relaunch did not make {VXLAN_DEV}");
    // kill -9 leaves it; the next launch replaces it.
    kill9(&h1);
    assert!(link_exists(&h1, VXLAN_DEV));
    h1.launch(&["--trusted-subnets", &t]);
    assert!(link_exists(&h1, VXLAN_DEV));
    assert!(trusted_status(&h1)["device"].as_str() == Some(VXLAN_DEV), "{:#}", trusted_status(&h1));
    assert!(exec_in(&h1.ns, &["nft", "list", "table", "ip", "meshnet-trusted-meshnet"]).ok(), "no filter table with the device");
    h1.meshnet(&["reset"]).expect_ok("reset");
    assert!(wait_until(Duration::from_secs(10), || !link_exists(&h1, VXLAN_DEV)), "reset left {VXLAN_DEV}");
    assert!(!exec_in(&h1.ns, &["nft", "list", "table", "ip", "meshnet-trusted-meshnet"]).ok(), "reset left the filter table");
    // kill -9 then a launch without the option removes the stale device too.
    h1.launch(&["--trusted-subnets", &t]);
    kill9(&h1);
    h1.launch(&[]);
    assert!(!link_exists(&h1, VXLAN_DEV), "a launch without --trusted-subnets kept the stale {VXLAN_DEV}");
    // A bad CIDR is a clear error and nothing starts.
    h1.meshnet(&["stop"]).expect_ok("stop");
    let out = h1.meshnet(&["launch", "--trusted-subnets", "10.0.0.1/8"]);
    assert!(!out.ok(), "a bad CIDR launched: {out}");
    assert!(out.all().contains("host bits are set"), "{out}");
    let out = h1.meshnet(&["launch", "--trusted-subnets", "banana"]);
    assert!(!out.ok() && out.all().contains("--trusted-subnets"), "{out}");
    // A stray comma too: it usually stands for a subnet that went missing.
    let out = h1.meshnet(&["launch", "--trusted-subnets", &format!("{t},,")]);
    assert!(!out.ok() && out.all().contains("empty item"), "{out}");
}

#[test]
fn mutual_trust_works_with_the_pcap_datapath() {
    let Some(p) = pair_with("trustpcap", |lab| [Some(underlay(lab)), Some(underlay(lab))], &["--datapath", "pcap"]) else { return };
    let [h1, h2] = &p.h;
    wait_mode(&p.lab, h1, &p.names[1], "trusted (kernel)");
    wait_mode(&p.lab, h2, &p.names[0], "trusted (kernel)");
    wait_learned(&p);
    let vx_before = dev_tx_packets(h1, VXLAN_DEV);
    let pcap = ping_marked(&p.lab, &p.c[0], "10.43.0.2", h1);
    assert!(pcap.contains(MARKER), "the marker is not in plain text on the underlay");
    assert!(dev_tx_packets(h1, VXLAN_DEV) - vx_before >= 10);
    checked_transfer(&p.lab, &p.c[0].ns, &p.c[1].ns, "10.43.0.2", 20 << 20, Duration::from_secs(120));
    h1.meshnet(&["stop"]).expect_ok("stop");
    assert!(wait_until(Duration::from_secs(10), || !link_exists(h1, VXLAN_DEV)), "stop left {VXLAN_DEV}");
}

/// Host `i`'s IPv6 underlay address in this lab (a /64 of its own per lab).
fn ip6(lab: &Lab, i: u8) -> String {
    format!("fd00:251:{:x}::{i}", lab.k)
}

/// Gives `h` only an IPv6 underlay address (no duplicate detection).
fn ipv6_only(lab: &Lab, h: &Host) {
    exec_in(&h.ns, &["ip", "-6", "addr", "add", &format!("{}/64", ip6(lab, h.i)), "dev", "eth0", "nodad"]).expect_ok("add IPv6");
    exec_in(&h.ns, &["ip", "-4", "addr", "flush", "dev", "eth0"]).expect_ok("remove IPv4");
}

fn dataplane_counter(h: &Host, name: &str) -> u64 {
    h.status_json()["dataplane"][name].as_u64().unwrap_or(0)
}

/// Two routers on an IPv6-only underlay (where the kernel path cannot go)
/// trusting `trust(lab)` each, c1/c2 as 10.43.0.1/2, reachable; and a third
/// host h3 on the same underlay without meshnet.
fn v6_pair(test: &str, trust: impl Fn(&Lab) -> [String; 2]) -> Option<(Pair, Host)> {
    let lab = Lab::new(test)?;
    let trust = trust(&lab);
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let h3 = lab.add_host(3);
    for h in [&h1, &h2, &h3] {
        ipv6_only(&lab, h);
    }
    let n1 = h1.launch(&["--password", "trust", "--host", "::", "--trusted-subnets", &trust[0]]);
    let n2 = h2.launch(&["--password", "trust", "--host", "::", "--trusted-subnets", &trust[1], &format!("[{}]:6783", ip6(&lab, 1))]);
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", "10.43.0.1/24", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.43.0.2/24", &c2.ns]).expect_ok("attach c2");
    assert!(ping_until(&c1.ns, "10.43.0.2", Duration::from_secs(40)), "c1 cannot reach c2 over the IPv6 underlay");
    Some((Pair { lab, h: [h1, h2], names: [n1, n2], c: [c1, c2] }, h3))
}

/// UDP payloads of IPv6 frames in `pcap` from `src` (an IPv6 address).
fn udp6_payloads_from(pcap: &Pcap, src: &str) -> Vec<Vec<u8>> {
    let src: std::net::Ipv6Addr = src.parse().unwrap();
    pcap.frames
        .iter()
        .filter(|f| f.len() > 62 && f[12..14] == [0x86, 0xdd] && f[20] == 17 && f[22..38] == src.octets())
        .map(|f| f[62..].to_vec())
        .collect()
}

/// `python3 -c SEND_UDP6 HOST PORT HEX`: sends the bytes HEX five times to [HOST]:PORT.
const SEND_UDP6: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"#;
/// What the forged unsealed datagrams carry instead of [`MARKER`] (as long).
const FORGED_MARKER: &[u8] = b"forged-unsealed!";

#[test]
fn mutual_trust_without_the_kernel_path_goes_unsealed_in_userspace() {
    // Each trusts exactly the two routers' IPv6 addresses: h3 is a stranger.
    let trust = |lab: &Lab| {
        let t = format!("{}/128,{}/128", ip6(lab, 1), ip6(lab, 2));
        [t.clone(), t]
    };
    let Some((p, h3)) = v6_pair("trustus6", trust) else { return };
    let [h1, h2] = &p.h;
    wait_mode(&p.lab, h1, &p.names[1], "trusted (userspace)");
    wait_mode(&p.lab, h2, &p.names[0], "trusted (userspace)");
    let reason = conn_to(h1, &p.names[1]).and_then(|c| c["data_reason"].as_str().map(String::from)).unwrap_or_default();
    assert!(reason.contains("IPv4"), "trusted (userspace) without why the kernel path is not used: {reason:?}");
    let text = h1.meshnet(&["status", "connections"]).expect_ok("status connections");
    assert!(text.stdout.contains("trusted (userspace)"), "{text}");
    eprintln!("status connections on h1:\n{}", text.stdout);

    // The marker in plain text on the underlay, through meshnet's TAP.
    let units_before = tap_units(h1);
    let out_before = dataplane_counter(h1, "udp_unsealed_out");
    let in_before = dataplane_counter(h2, "udp_unsealed_in");
    let pcap = ping_marked(&p.lab, &p.c[0], "10.43.0.2", h1);
    assert!(pcap.contains(MARKER), "the marker is not in plain text on the IPv6 underlay");
    assert!(tap_units(h1) - units_before >= 10, "the echoes did not take meshnet's TAP");
    assert!(dataplane_counter(h1, "udp_unsealed_out") - out_before >= 10, "h1 sent fewer than 10 unsealed datagrams");
    assert!(dataplane_counter(h2, "udp_unsealed_in") - in_before >= 10, "h2 took fewer than 10 unsealed datagrams");
    assert!(!link_exists(h1, "vxm-meshnet") || trusted_status(h1)["fdb_entries"].as_u64() == Some(0), "{:#}", trusted_status(h1));

    // A stranger on the underlay (h3, outside both routers' trusted subnets)
    // replays h2's unsealed datagrams to h1 with another marker, counters far
    // ahead: dropped, counted, never delivered to c1.
    let real: Vec<Vec<u8>> = udp6_payloads_from(&pcap, &ip6(&p.lab, 2))
        .into_iter()
        .filter(|d| d.len() > 16 && d[0] == 1 && d[1] == 1 && d.windows(MARKER.len()).any(|w| w == MARKER))
        .collect();
    assert!(!real.is_empty(), "no unsealed datagram from h2 with the marker captured");
    let mut forged = real[0].clone();
    let counter = u64::from_be_bytes(forged[8..16].try_into().unwrap()) + 100_000;
    forged[8..16].copy_from_slice(&counter.to_be_bytes());
    let at = forged.windows(MARKER.len()).position(|w| w == MARKER).unwrap();
    forged[at..at + MARKER.len()].copy_from_slice(FORGED_MARKER);
    let hex: String = forged.iter().map(|b| format!("{b:02x}")).collect();
    let refused_before = dataplane_counter(h1, "udp_unsealed_refused");
    let cap = p.lab.capture(&p.c[0].ns, "ethwe");
    exec_in(&h3.ns, &["python3", "-c", SEND_UDP6, &ip6(&p.lab, 1), "6783", &hex]).expect_ok("forge from h3");
    std::thread::sleep(Duration::from_millis(500));
    let seen = cap.stop();
    assert!(!seen.contains(FORGED_MARKER), "an unsealed datagram from a stranger reached c1");
    let refused = dataplane_counter(h1, "udp_unsealed_refused") - refused_before;
    assert!(refused >= 5, "h1 counted {refused} of 5 forged unsealed datagrams: {:#}", h1.status_json()["dataplane"]);

    // Bulk both ways, checked, unsealed.
    let before = dataplane_counter(h1, "udp_unsealed_out");
    checked_transfer(&p.lab, &p.c[0].ns, &p.c[1].ns, "10.43.0.2", 20 << 20, Duration::from_secs(120));
    checked_transfer(&p.lab, &p.c[1].ns, &p.c[0].ns, "10.43.0.1", 20 << 20, Duration::from_secs(120));
    assert!(dataplane_counter(h1, "udp_unsealed_out") - before > 10_000, "20 MB did not go unsealed");
    // Broadcasts stay sealed and still arrive.
    let cap = p.lab.capture(&h1.ns, UNDERLAY_IF);
    let _ = exec_in(&p.c[0].ns, &["ping", "-b", "-c", "3", "-i", "0.3", "-W", "1", "-p", &marker_hex(), "10.43.0.255"]);
    assert!(!cap.stop().contains(MARKER), "a broadcast went unsealed");
}

#[test]
fn one_sided_trust_without_the_kernel_path_stays_encrypted() {
    // h1 trusts h2; h2 trusts only an address h1 does not have.
    let trust = |lab: &Lab| [format!("{}/128,{}/128", ip6(lab, 1), ip6(lab, 2)), "fd00:dead::/64".to_string()];
    let Some((p, _h3)) = v6_pair("trustus6one", trust) else { return };
    let [h1, h2] = &p.h;
    let said = wait_until(Duration::from_secs(20), || {
        conn_to(h1, &p.names[1]).and_then(|c| c["data_reason"].as_str().map(String::from)).is_some_and(|r| r.contains("does not trust"))
            && conn_to(h2, &p.names[0]).and_then(|c| c["data_reason"].as_str().map(String::from)).is_some_and(|r| r.contains("not in our trusted"))
    });
    assert!(said, "{:#} / {:#}", conn_to(h1, &p.names[1]).unwrap_or_default(), conn_to(h2, &p.names[0]).unwrap_or_default());
    assert_eq!(data_mode(h1, &p.names[1]), "encrypted");
    assert_eq!(data_mode(h2, &p.names[0]), "encrypted");
    let units_before = tap_units(h1);
    let pcap = ping_marked(&p.lab, &p.c[0], "10.43.0.2", h1);
    assert!(!pcap.contains(MARKER), "one-sided trust put the marker in plain text on the underlay");
    assert!(tap_units(h1) - units_before >= 10, "the echoes did not take meshnet's path");
    assert_eq!(dataplane_counter(h1, "udp_unsealed_out") + dataplane_counter(h2, "udp_unsealed_out"), 0);
}

/// A router whose VXLAN device cannot be made (here: something else holds UDP
/// 6784) still starts, and what it logs says what its data does: trust is
/// mutual, so it goes `trusted (userspace)`, unencrypted. Before, the log said
/// "data to trusted peers stays encrypted" while the data went unsealed.
#[test]
fn without_its_vxlan_device_the_log_says_data_goes_unencrypted() {
    let Some(lab) = Lab::new("trustnodev") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let holder = lab.spawn_in(
        &h2.ns,
        &["python3", "-c", "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 6784)); print('bound', flush=True); time.sleep(600)"],
    );
    assert!(wait_until(Duration::from_secs(10), || holder.stdout().contains("bound")), "UDP 6784 not taken: {}", holder.stderr());
    let net = underlay(&lab);
    let n1 = h1.launch(&["--password", "trust", "--trusted-subnets", &net]);
    h2.launch(&["--password", "trust", "--trusted-subnets", &net, &h1.ip]);
    wait_mode(&lab, &h2, &n1, "trusted (userspace)");
    let log = h2.log();
    let line = log.lines().find(|l| l.contains("no kernel VXLAN device")).unwrap_or_else(|| panic!("h2's log does not say it has no VXLAN device:\n{log}"));
    assert!(line.contains("unencrypted") && !line.contains("stays encrypted"), "h2's log misstates where its data goes: {line}");
    eprintln!("{line}");
}
