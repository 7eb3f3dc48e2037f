//! Correctness of the superframe fast path, end to end in namespaces:
//! large transfers whose checksums must match, underlay loss, hosts with
//! different overlay MTUs, and ICMP larger than one datagram.
//!
//! Two hosts, a container behind each, routers launched through the CLI. Data
//! is random bytes hashed with SHA-256 on both ends by a small Python program.

use std::time::Duration;

use meshnet_tests::lab::*;

struct Pair {
    lab: Lab,
    hosts: [Host; 2],
    c: [Container; 2],
}

/// Two routers (h2 joins h1) with `mtu[i]` each, containers c1/c2 as 10.41.0.1/2.
fn pair(test: &str, mtu: [u32; 2]) -> Option<Pair> {
    let lab = Lab::new(test)?;
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    let m1 = mtu[0].to_string();
    let m2 = mtu[1].to_string();
    h1.launch(&["--password", "fast", "--mtu", &m1]);
    h2.launch(&["--password", "fast", "--mtu", &m2, &h1.ip]);
    let c1 = lab.add_container(&h1, 1);
    let c2 = lab.add_container(&h2, 2);
    h1.meshnet(&["attach", "10.41.0.1/24", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.41.0.2/24", &c2.ns]).expect_ok("attach c2");
    assert!(
        ping_until(&c1.ns, "10.41.0.2", Duration::from_secs(30)),
        "c1 cannot reach c2"
    );
    Some(Pair { lab, hosts: [h1, h2], c: [c1, c2] })
}

/// Sends `bytes` from container `from` to container `to` and checks the digest.
#[track_caller]
fn transfer(p: &Pair, from: usize, to: usize, bytes: u64, timeout: Duration) {
    let to_ip = format!("10.41.0.{}", to + 1);
    checked_transfer(&p.lab, &p.c[from].ns, &p.c[to].ns, &to_ip, bytes, timeout);
}

fn dataplane_counter(h: &Host, key: &str) -> u64 {
    h.status_json()["dataplane"][key].as_u64().unwrap_or(0)
}

#[test]
fn one_gigabyte_arrives_intact() {
    let Some(p) = pair("gigabyte", [1376, 1376]) else { return };
    transfer(&p, 0, 1, 1 << 30, Duration::from_secs(240));
    // The fast path was used: units far larger than one frame crossed.
    let units = dataplane_counter(&p.hosts[0], "tap_units_in");
    let bytes = dataplane_counter(&p.hosts[0], "tap_bytes_in");
    assert!(units > 0 && bytes / units > 8000, "average unit {} bytes: no superframes", bytes / units.max(1));
    assert_eq!(dataplane_counter(&p.hosts[1], "udp_rejected"), 0);
}

#[test]
fn transfer_survives_one_percent_underlay_loss() {
    let Some(p) = pair("lossy", [1376, 1376]) else { return };
    // Drop 1 % of the UDP datagrams each host receives (the kernel here has no
    // netem). On INPUT each datagram is seen on its own: on OUTPUT a whole GSO
    // send would count as one packet, and the loss would cluster.
    for h in &p.hosts {
        // veth carries a GSO send whole to its peer: make the kernel cut it into
        // datagrams on the way out, so the underlay sees what a real wire does.
        exec_in(&h.ns, &["ethtool", "-K", UNDERLAY_IF, "tx-udp-segmentation", "off", "gro", "off"])
            .expect_ok("ethtool");
        exec_in(
            &h.ns,
            &[
                "iptables", "-A", "INPUT", "-p", "udp", "--dport", "6783", "-m", "statistic",
                "--mode", "random", "--probability", "0.01", "-j", "DROP",
            ],
        )
        .expect_ok("iptables loss rule");
    }
    let started = std::time::Instant::now();
    transfer(&p, 0, 1, 200 << 20, Duration::from_secs(240));
    let secs = started.elapsed().as_secs_f64();
    eprintln!("200 MB at 1 % datagram loss in {secs:.1}s ({:.0} Mbit/s)", 200.0 * 8.388608 / secs);
    // Superframes that lost a chunk gave up their other segments instead of
    // being lost whole.
    let st = p.hosts[1].status_json();
    assert!(st["dataplane"]["salvaged_frames"].as_u64().unwrap_or(0) > 0, "nothing salvaged: {:#}", st["dataplane"]);
    let dropped = exec_in(&p.hosts[1].ns, &["iptables", "-L", "INPUT", "-v", "-n", "-x"]);
    let packets: u64 = dropped
        .stdout
        .lines()
        .find(|l| l.contains("statistic"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(packets > 100, "the loss rule dropped only {packets} datagrams:\n{}", dropped.stdout);
}

#[test]
fn hosts_with_different_mtus_interoperate() {
    let Some(p) = pair("mtumix", [1376, 8000]) else { return };
    transfer(&p, 0, 1, 100 << 20, Duration::from_secs(120));
    transfer(&p, 1, 0, 100 << 20, Duration::from_secs(120));
    // ICMP that fits the smaller MTU goes both ways unfragmented.
    assert!(ping_sized(&p.c[0].ns, "10.41.0.2", 1300, true));
    assert!(ping_sized(&p.c[1].ns, "10.41.0.1", 1300, true));
    // Too big for the far side's MTU, with DF: the sender's router answers with
    // ICMP "fragmentation needed" carrying 1376, and the sender's kernel learns it.
    let out = exec_in(&p.c[1].ns, &["ping", "-c", "3", "-W", "2", "-M", "do", "-s", "3000", "10.41.0.1"]);
    let text = out.all();
    assert!(
        text.contains("mtu = 1376") || text.contains("mtu=1376"),
        "ping -M do -s 3000 from the MTU 8000 side did not learn MTU 1376:\n{text}"
    );
    assert!(p.hosts[1].status_json()["dataplane"]["frag_needed_sent"].as_u64().unwrap_or(0) >= 1);
    // Without DF the same size crosses (fragmented by the sender's kernel, now that it knows).
    assert!(ping_sized(&p.c[1].ns, "10.41.0.1", 3000, false));
}

#[test]
fn large_icmp_crosses() {
    // With the default MTU the container's kernel fragments; with a jumbo overlay
    // MTU one 8 KB frame is carried in chunks and reassembled.
    let Some(p) = pair("bigping", [1376, 1376]) else { return };
    assert!(ping_sized(&p.c[0].ns, "10.41.0.2", 8000, false), "ping -s 8000 at MTU 1376");
    drop(p);
    let Some(p) = pair("jumboping", [9000, 9000]) else { return };
    assert!(ping_sized(&p.c[0].ns, "10.41.0.2", 8000, true), "ping -s 8000 at MTU 9000");
    assert!(ping_sized(&p.c[1].ns, "10.41.0.1", 8900, true), "ping -s 8900 at MTU 9000");
}

/// Pings with `size` bytes of payload; `-M do` (don't fragment) when `whole`.
fn ping_sized(ns: &str, ip: &str, size: u32, whole: bool) -> bool {
    let size = size.to_string();
    let mut args = vec!["ping", "-c", "3", "-W", "2", "-s", &size, ip];
    if whole {
        args.extend(["-M", "do"]);
    }
    let out = exec_in(ns, &args);
    if !out.ok() {
        eprintln!("ping -s {size} {ip} from {ns} failed:\n{out}");
    }
    out.ok()
}
