//! The two datapaths, end to end in namespaces: `--datapath pcap` (libpcap on a
//! veth, plain frames) between two hosts; a TAP host (superframes) with a pcap
//! host, which only works if the TAP side segments in software for it (the
//! peers agree on that in the handshake); and a TAP relay segmenting for a pcap
//! host behind it.
//!
//! Data is random bytes hashed with SHA-256 on both ends by a small Python
//! program; every transfer checks the digest and the byte count.

use std::time::Duration;

use meshnet_tests::lab::*;

const MB: u64 = 1 << 20;

/// Hosts h1..hN launched with `datapaths[i]`, each joining the one before it
/// (with `--no-discovery` when `chain`, so only those connections exist), and
/// container j on host j as 10.43.0.j/24.
fn hosts(lab: &Lab, datapaths: &[&str], chain: bool) -> (Vec<Host>, Vec<Container>) {
    let mut hs: Vec<Host> = Vec::new();
    for (i, dp) in datapaths.iter().enumerate() {
        let h = lab.add_host(i as u8 + 1);
        let mut args = vec!["--password", "modes", "--datapath", dp];
        if chain {
            args.push("--no-discovery");
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
        h.meshnet(&["attach", &format!("10.43.0.{}/24", c.j), &c.ns]).expect_ok("attach");
    }
    (hs, cs)
}

fn ip_of(c: &Container) -> String {
    format!("10.43.0.{}", c.j)
}

/// Sends `bytes` from `from` to `to` and checks the digest.
#[track_caller]
fn transfer(lab: &Lab, from: &Container, to: &Container, bytes: u64) {
    checked_transfer(lab, &from.ns, &to.ns, &ip_of(to), bytes, Duration::from_secs(180));
}

fn counter(h: &Host, key: &str) -> u64 {
    h.status_json()["dataplane"][key].as_u64().unwrap_or(0)
}

/// Prints every host's data-plane counters (for the test log).
fn show_counters(hs: &[Host]) {
    for h in hs {
        eprintln!("{} data plane: {}", h.ns, h.status_json()["dataplane"]);
    }
}

fn has_link(h: &Host, name: &str) -> bool {
    link(&h.ns, name).is_some()
}

/// Average unit read from the device (bytes include a 10-byte virtio header).
fn average_unit(h: &Host) -> u64 {
    counter(h, "tap_bytes_in") / counter(h, "tap_units_in").max(1)
}

/// `ethtool -k IF` in `ns` shows every transmit checksum and segmentation offload off.
#[track_caller]
fn offloads_off(ns: &str, ifname: &str) {
    let k = exec_in(ns, &["ethtool", "-k", ifname]).expect_ok("ethtool -k");
    let on: Vec<&str> = k
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tx-checksum") || l.contains("segmentation"))
        .filter(|l| l.contains(": on"))
        .collect();
    assert!(on.is_empty(), "offloads still on for {ifname} in {ns}: {on:?}\n{}", k.stdout);
    assert!(k.stdout.contains("tx-checksumming: off"), "{}", k.stdout);
}

#[test]
fn two_pcap_hosts() {
    let Some(lab) = Lab::new("pcap2") else { return };
    let (hs, cs) = hosts(&lab, &["pcap", "pcap"], false);
    for h in &hs {
        let s = h.status_json();
        assert_eq!(s["datapath"], "pcap", "{s:#}");
        let text = h.meshnet(&["status"]).expect_ok("status");
        assert!(text.stdout.contains("Datapath: pcap"), "{text}");
        assert!(has_link(h, "meshnet-pcap") && has_link(h, "meshnet-pbr"), "no capture veth on {}", h.ns);
        assert!(!has_link(h, "meshnet-tap"), "a TAP on {} in pcap mode", h.ns);
    }
    // Containers send plain frames: their transmit offloads are off, and so are
    // those of the veth end on the bridge (the kernel segments before it).
    offloads_off(&cs[0].ns, "ethwe");
    offloads_off(&hs[0].ns, "meshnet-pbr");
    assert!(ping_until(&cs[0].ns, &ip_of(&cs[1]), Duration::from_secs(30)), "c1 cannot reach c2");
    assert!(ping(&cs[1].ns, &ip_of(&cs[0]), 3), "c2 cannot reach c1");
    transfer(&lab, &cs[0], &cs[1], 50 * MB);
    transfer(&lab, &cs[1], &cs[0], 50 * MB);
    show_counters(&hs);
    for h in &hs {
        // Plain frames only: nothing near a superframe was read, none needed segmenting.
        assert!(average_unit(h) <= 1400, "average unit {} bytes on {}", average_unit(h), h.ns);
        assert_eq!(counter(h, "sw_segmented_units"), 0);
        assert_eq!(counter(h, "udp_rejected"), 0);
    }
    // stop removes the capture veth; the bridge stays. reset removes everything.
    hs[0].meshnet(&["stop"]).expect_ok("stop");
    assert!(!has_link(&hs[0], "meshnet-pcap") && !has_link(&hs[0], "meshnet-pbr"), "veth left after stop");
    assert!(has_link(&hs[0], "meshnet"), "bridge gone after stop");
    hs[1].meshnet(&["reset"]).expect_ok("reset");
    assert!(!has_link(&hs[1], "meshnet-pcap") && !has_link(&hs[1], "meshnet"), "devices left after reset");
}

#[test]
fn tap_and_pcap_hosts_interoperate() {
    let Some(lab) = Lab::new("tapcap") else { return };
    let (hs, cs) = hosts(&lab, &["tap", "pcap"], false);
    assert_eq!(hs[0].status_json()["datapath"], "tap");
    assert!(has_link(&hs[0], "meshnet-tap") && !has_link(&hs[0], "meshnet-pcap"));
    assert!(ping_until(&cs[0].ns, &ip_of(&cs[1]), Duration::from_secs(30)), "c1 (tap) cannot reach c2 (pcap)");
    assert!(ping(&cs[1].ns, &ip_of(&cs[0]), 3), "c2 (pcap) cannot reach c1 (tap)");
    transfer(&lab, &cs[0], &cs[1], 50 * MB);
    transfer(&lab, &cs[1], &cs[0], 50 * MB);
    show_counters(&hs);
    // The TAP host read superframes and cut them in software for its pcap peer.
    let (h1, h2) = (&hs[0], &hs[1]);
    // Plain units from a 1376-byte TAP are at most 1400 bytes: a larger average
    // means superframes (how large depends on load; ACKs pull it down).
    assert!(average_unit(h1) > 1500, "h1 read no superframes: average unit {} bytes", average_unit(h1));
    let segmented = counter(h1, "sw_segmented_units");
    assert!(segmented > 100, "h1 segmented {segmented} units");
    // More frames than units: superframes were cut (how many segments each had
    // depends on load; units needing only a checksum give one frame each).
    assert!(counter(h1, "sw_frames_out") > segmented, "h1 cut no superframe into segments");
    assert!(h1.log().contains("takes no superframes"), "h1's log does not say h2 takes no superframes");
    for h in &hs {
        assert_eq!(counter(h, "sw_malformed_units"), 0, "on {}", h.ns);
        assert_eq!(counter(h, "udp_rejected"), 0, "on {}", h.ns);
        assert_eq!(counter(h, "tap_write_errors"), 0, "on {}", h.ns);
    }
    // The pcap host got only plain frames: it had nothing to segment.
    assert_eq!(counter(h2, "sw_segmented_units"), 0);
}

#[test]
fn tap_relay_segments_for_a_pcap_host() {
    let Some(lab) = Lab::new("capchain") else { return };
    // h1 (tap) - h2 (tap) - h3 (pcap), and no other connection.
    let (hs, cs) = hosts(&lab, &["tap", "tap", "pcap"], true);
    assert!(ping_until(&cs[0].ns, &ip_of(&cs[2]), Duration::from_secs(30)), "c1 cannot reach c3 through h2");
    transfer(&lab, &cs[0], &cs[2], 20 * MB);
    transfer(&lab, &cs[2], &cs[0], 20 * MB);
    show_counters(&hs);
    // h1 sends superframes to h2, which takes them; h2 relays them cut to h3.
    assert_eq!(counter(&hs[0], "sw_segmented_units"), 0, "h1 segmented for a peer that takes superframes");
    assert!(counter(&hs[1], "relayed_units") > 1000, "h2 relayed too little");
    assert!(counter(&hs[1], "sw_segmented_units") > 100, "h2 did not segment what it relayed to h3");
    for h in &hs {
        assert_eq!(counter(h, "sw_malformed_units"), 0, "on {}", h.ns);
        assert_eq!(counter(h, "tap_write_errors"), 0, "on {}", h.ns);
    }
}

/// A router switched between datapaths across crashes: re-attached containers
/// get their offloads turned off in pcap mode, a capture veth left by a
/// crashed router is replaced (same datapath) or removed (the other one).
#[test]
fn datapath_changes_across_restarts() {
    let Some(lab) = Lab::new("dpswitch") else { return };
    let (hs, cs) = hosts(&lab, &["tap", "pcap"], false);
    let (h1, c1, c2) = (&hs[0], &cs[0], &cs[1]);
    assert!(ping_until(&c1.ns, &ip_of(c2), Duration::from_secs(30)), "c1 cannot reach c2");
    let k = exec_in(&c1.ns, &["ethtool", "-k", "ethwe"]).expect_ok("ethtool -k");
    assert!(k.stdout.contains("tx-checksumming: on"), "tap mode left ethwe's offloads alone:\n{}", k.stdout);

    kill9(h1);
    h1.launch(&["--password", "modes", "--datapath", "pcap"]);
    offloads_off(&c1.ns, "ethwe");
    assert!(!has_link(h1, "meshnet-tap") && has_link(h1, "meshnet-pcap"));
    assert!(ping_until(&c1.ns, &ip_of(c2), Duration::from_secs(30)), "c1 cannot reach c2 with h1 on pcap");
    transfer(&lab, c1, c2, 10 * MB);

    // A crash leaves the veth behind; the next launch replaces or removes it.
    kill9(h1);
    assert!(has_link(h1, "meshnet-pcap"), "the veth did not outlive the crash (nothing to test)");
    h1.launch(&["--password", "modes", "--datapath", "pcap"]);
    assert!(ping_until(&c1.ns, &ip_of(c2), Duration::from_secs(30)), "c1 cannot reach c2 after a relaunch on pcap");
    kill9(h1);
    h1.launch(&["--password", "modes"]);
    assert_eq!(h1.status_json()["datapath"], "tap");
    assert!(!has_link(h1, "meshnet-pcap") && !has_link(h1, "meshnet-pbr"), "capture veth left on a tap router");
    assert!(has_link(h1, "meshnet-tap"));
    assert!(ping_until(&c1.ns, &ip_of(c2), Duration::from_secs(30)), "c1 cannot reach c2 back on tap");
    transfer(&lab, c2, c1, 10 * MB);
}
