//! The kernel devices for real, in network namespaces. Needs root (a test that is
//! not root says so and passes).
//!
//! Every test makes its own scratch namespaces, named from the pid and a counter
//! so tests can run side by side, and runs its whole body inside a scratch "host"
//! namespace through `netns::run_in`, so the machine's own namespace is never
//! touched. Drop guards delete the namespaces (and with them every device in
//! them) even when a test fails. `ip` is used here only to set up and to look;
//! the code under test never runs it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnet_router::netlink::{self, AttachSpec, NetlinkError};
use meshnet_router::netns::{self, Netns, NetnsError};
use meshnet_router::tap::{Tap, MAX_UNIT_LEN, VNET_HDR_LEN};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("devices: skipped: needs root (network namespaces, bridges, TAP)");
            return;
        }
    };
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique token: pid (base 36) and a per-process counter.
fn unique() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", base36(std::process::id()))
}

fn base36(mut v: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

/// An `ip netns` namespace, deleted on drop.
struct ScratchNs(Ns);

impl ScratchNs {
    fn new(tag: &str) -> ScratchNs {
        let name = format!("mnd-{}-{tag}", unique());
        run("ip", &["netns", "add", &name]);
        let ns = ScratchNs(Ns { name });
        ns.0.ip(&["link", "set", "lo", "up"]);
        ns
    }
}

impl std::ops::Deref for ScratchNs {
    type Target = Ns;
    fn deref(&self) -> &Ns {
        &self.0
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0.name])
            .status();
    }
}

/// A handle on a scratch namespace for looking and poking with `ip`; cheap to
/// clone into the closures that run inside the host namespace.
#[derive(Clone)]
struct Ns {
    name: String,
}

impl Ns {
    fn netns(&self) -> Netns {
        Netns::named(&self.name).expect("scratch namespace exists")
    }

    /// `ip -n NAME ARGS...`, stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n NAME -j ARGS...`, parsed.
    fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.ip(&all);
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap()
    }

    /// The one link named `dev`, or None.
    fn link(&self, dev: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-j", "-d", "link", "show", "dev", dev])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().and_then(|a| a.first().cloned())
    }

    fn link_names(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// Addresses on `dev` as "a.b.c.d/len".
    fn addrs(&self, dev: &str) -> Vec<String> {
        let v = self.ip_json(&["addr", "show", "dev", dev]);
        v[0]["addr_info"]
            .as_array()
            .map(|infos| {
                infos
                    .iter()
                    .filter(|i| i["scope"] != "link")
                    .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sysctl(&self, path: &str) -> String {
        run("ip", &["netns", "exec", &self.name, "cat", path])
            .trim()
            .to_string()
    }

    fn exec_ok(&self, cmd: &[&str]) -> bool {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        Command::new("ip")
            .args(&all)
            .output()
            .unwrap()
            .status
            .success()
    }
}

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run `body` inside `host` (the scratch stand-in for the machine's namespace).
fn in_host(host: &ScratchNs, body: impl FnOnce() + Send + 'static) {
    netns::run_in(&host.netns(), body).unwrap();
}

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn flags(link: &Value) -> Vec<String> {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

fn spec(target: Netns, bridge: &str, host_if: &str, mtu: u32, addrs: &[(&str, u8)]) -> AttachSpec {
    AttachSpec {
        target,
        bridge: bridge.to_string(),
        host_if: host_if.to_string(),
        container_if: "ethwe".to_string(),
        mtu,
        addrs: addrs.iter().map(|(a, p)| (v4(a), *p)).collect(),
        multicast_route: false,
    }
}

/// A fresh namespace set for one test: a host plus `n` containers.
fn scratch(n: usize) -> (ScratchNs, Vec<ScratchNs>) {
    let host = ScratchNs::new("h");
    let containers = (0..n).map(|i| ScratchNs::new(&format!("c{i}"))).collect();
    (host, containers)
}

// ---------------------------------------------------------------------------
// Bridge
// ---------------------------------------------------------------------------

/// A pinned bridge keeps its MAC when a port with a lower MAC joins and when
/// its ports go (a router's TAP is made anew at every launch); an unpinned
/// one follows its ports (which is why meshnet pins the bridges it makes).
#[test]
fn a_pinned_bridge_keeps_its_mac_while_ports_come_and_go() {
    require_root!();
    let (host, _) = scratch(0);
    let probe = host.0.clone();
    in_host(&host, move || {
        let mac = |dev: &str| probe.link(dev).expect("link exists")["address"].as_str().unwrap().to_string();
        let port = |br: &str, p: &str, addr: &str| {
            probe.ip(&["link", "add", p, "address", addr, "type", "veth", "peer", "name", &format!("{p}x")]);
            probe.ip(&["link", "set", p, "master", br, "up"]);
        };
        // Unpinned: a port with a lower MAC gives the bridge that MAC.
        let loose = format!("mnb{}", unique());
        netlink::ensure_bridge(&loose, 1400).unwrap();
        let lp = format!("mnv{}", unique());
        port(&loose, &lp, "02:00:00:00:00:01");
        assert_eq!(mac(&loose), "02:00:00:00:00:01", "the kernel no longer derives an unpinned bridge's MAC from its ports");

        let br = format!("mnb{}", unique());
        netlink::ensure_bridge(&br, 1400).unwrap();
        let pinned = netlink::pin_bridge_mac(&br).unwrap();
        let text = pinned.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        assert_eq!(mac(&br), text);
        let p1 = format!("mnv{}", unique());
        port(&br, &p1, "02:00:00:00:00:02");
        assert_eq!(mac(&br), text, "a pinned bridge took its new port's MAC");
        probe.ip(&["link", "del", &p1]);
        assert_eq!(mac(&br), text, "a pinned bridge changed its MAC when its port went");
        // Pinning again (a relaunch) changes nothing; a non-bridge is refused.
        assert_eq!(netlink::pin_bridge_mac(&br).unwrap(), pinned);
        assert!(matches!(netlink::pin_bridge_mac(&lp).unwrap_err(), NetlinkError::Conflict { .. }));
        assert!(matches!(netlink::pin_bridge_mac("mnnosuchbr0").unwrap_err(), NetlinkError::NotFound { .. }));
        for l in [&loose, &br, &lp] {
            netlink::delete_link(l).unwrap();
        }
    });
}

#[test]
fn bridge_create_reuse_delete() {
    require_root!();
    let (host, _) = scratch(0);
    let br = format!("mnb{}", unique());
    let probe = host.0.clone();
    in_host(&host, move || {
        let index = netlink::ensure_bridge(&br, 1400).unwrap();
        assert_eq!(netlink::link_index(&br).unwrap(), Some(index));
        let link = probe.link(&br).expect("bridge exists");
        assert_eq!(link["mtu"], 1400);
        assert_eq!(link["linkinfo"]["info_kind"], "bridge");
        assert!(flags(&link).contains(&"UP".to_string()), "{link}");
        // IPv6 off, and quiet for when it is switched on: nothing generated, no RA/RS, no DAD.
        assert_eq!(probe.sysctl(&format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6")), "1");
        for (knob, want) in netlink::BRIDGE_IPV6_SYSCTLS {
            assert_eq!(probe.sysctl(&format!("/proc/sys/net/ipv6/conf/{br}/{knob}")), want, "{knob}");
        }
        // On: still no address of its own; an address put on it is the only one,
        // and it stays when the bridge is ensured again (a restart).
        netlink::set_bridge_ipv6(&br, true).unwrap();
        assert_eq!(probe.sysctl(&format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6")), "0");
        let v6 = probe.ip(&["-6", "addr", "show", "dev", &br]);
        assert!(!v6.contains("inet6"), "the bridge has an IPv6 address of its own: {v6}");
        probe.ip(&["addr", "add", "fd77::1/64", "dev", &br]);
        netlink::ensure_bridge(&br, 1400).unwrap();
        let v6 = probe.ip(&["-6", "addr", "show", "dev", &br]);
        assert!(v6.contains("fd77::1/64") && !v6.contains("fe80"), "{v6}");
        // Off again drops it.
        netlink::set_bridge_ipv6(&br, false).unwrap();
        assert!(!probe.ip(&["-6", "addr", "show", "dev", &br]).contains("inet6"));
        // A bridge that generates addresses and has a link-local one loses it.
        let gen_mode = format!("/proc/sys/net/ipv6/conf/{br}/addr_gen_mode");
        assert!(probe.exec_ok(&["sh", "-c", &format!("echo 0 > /proc/sys/net/ipv6/conf/{br}/disable_ipv6; echo 0 > {gen_mode}")]));
        probe.ip(&["addr", "add", "fe80::1/64", "dev", &br]);
        assert!(probe.ip(&["-6", "addr", "show", "dev", &br]).contains("fe80::1"), "no link-local to begin with");
        netlink::ensure_bridge(&br, 1400).unwrap();
        let v6 = probe.ip(&["-6", "addr", "show", "dev", &br]);
        assert!(!v6.contains("inet6"), "the generated link-local address stayed: {v6}");
        assert_eq!(probe.sysctl(&gen_mode), "1");

        // Reuse: same index, MTU untouched.
        assert_eq!(netlink::ensure_bridge(&br, 9000).unwrap(), index);
        assert_eq!(probe.link(&br).unwrap()["mtu"], 1400);

        // Something else under that name is refused.
        let (veth, peer) = (format!("mnv{}", unique()), format!("mnv{}", unique()));
        probe.ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        let err = netlink::ensure_bridge(&veth, 1400).unwrap_err();
        assert!(matches!(err, NetlinkError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("is not a bridge"), "{err}");

        assert!(netlink::delete_link(&br).unwrap());
        assert_eq!(netlink::link_index(&br).unwrap(), None);
        assert!(!netlink::delete_link(&br).unwrap());
    });
}

// ---------------------------------------------------------------------------
// attach / detach / inspect
// ---------------------------------------------------------------------------

#[test]
fn attach_into_named_namespace() {
    require_root!();
    let (host, cs) = scratch(1);
    let (h, c) = (host.0.clone(), cs[0].0.clone());
    let target = cs[0].netns();
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        let host_if = format!("mnv{}", unique());
        let bridge_index = netlink::ensure_bridge(&br, 1376).unwrap();

        let s = spec(target.clone(), &br, &host_if, 1376, &[("10.40.1.2", 24)]);
        let att = netlink::attach(&s).unwrap();
        assert_eq!(att.container_if, "ethwe");
        assert_eq!(att.host_if, host_if);
        assert_eq!(att.addrs, vec![(v4("10.40.1.2"), 24)]);
        assert_ne!(att.mac, [0; 6]);

        // Inside: address, MTU, up, MAC as reported, IPv6 off.
        let ethwe = c.link("ethwe").expect("ethwe in the container");
        assert_eq!(ethwe["mtu"], 1376);
        assert!(flags(&ethwe).contains(&"UP".to_string()), "{ethwe}");
        assert_eq!(ethwe["address"], mac_str(att.mac));
        assert_eq!(c.addrs("ethwe"), vec!["10.40.1.2/24"]);
        assert_eq!(c.sysctl("/proc/sys/net/ipv6/conf/ethwe/disable_ipv6"), "1");

        // Host end: on the bridge, up, same MTU, IPv6 off.
        let hl = h.link(&host_if).expect("host end");
        assert_eq!(hl["master"], br.as_str());
        assert!(flags(&hl).contains(&"UP".to_string()), "{hl}");
        assert_eq!(hl["mtu"], 1376);
        assert_eq!(
            h.sysctl(&format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6")),
            "1"
        );
        // Nothing else was left in the host (no temporary peer name).
        let mut names = h.link_names();
        names.sort();
        let mut want = vec!["lo".to_string(), br.clone(), host_if.clone()];
        want.sort();
        assert_eq!(names, want);

        // inspect sees the same.
        let seen = netlink::inspect(&target, "ethwe").unwrap().unwrap();
        assert_eq!(seen, att);
        assert_eq!(netlink::inspect(&target, "nothere").unwrap(), None);

        // Attach twice is harmless, and a new address is added.
        let again = netlink::attach(&s).unwrap();
        assert_eq!(again, att);
        let more = spec(
            target.clone(),
            &br,
            &host_if,
            1376,
            &[("10.40.1.2", 24), ("10.40.2.2", 24)],
        );
        let again = netlink::attach(&more).unwrap();
        assert_eq!(again.mac, att.mac);
        let mut got = c.addrs("ethwe");
        got.sort();
        assert_eq!(got, vec!["10.40.1.2/24", "10.40.2.2/24"]);
        assert_eq!(c.link_names().iter().filter(|n| *n == "ethwe").count(), 1);
        assert_eq!(h.link(&host_if).unwrap()["master"], br.as_str());
        let _ = bridge_index;

        // Attached again with another MTU (a launch with another --mtu): both ends take it.
        netlink::attach(&spec(target.clone(), &br, &host_if, 1400, &[("10.40.1.2", 24)])).unwrap();
        assert_eq!(c.link("ethwe").unwrap()["mtu"], 1400);
        assert_eq!(h.link(&host_if).unwrap()["mtu"], 1400);

        // Another bridge's ethwe is not ours.
        let other = format!("mnb{}", unique());
        netlink::ensure_bridge(&other, 1376).unwrap();
        let err = netlink::attach(&spec(target.clone(), &other, &host_if, 1376, &[])).unwrap_err();
        assert!(matches!(err, NetlinkError::Conflict { .. }), "{err}");
    });
}

#[test]
fn attach_by_pid() {
    require_root!();
    let (host, _) = scratch(0);
    let h = host.0.clone();
    in_host(&host, move || {
        // A process with a namespace of its own and no /run/netns entry.
        let child = ChildGuard(
            Command::new("unshare")
                .args(["-n", "sleep", "30"])
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        let mine = Netns {
            path: "/proc/thread-self/ns/net".into(),
            label: "self".into(),
        }
        .inode()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let target = loop {
            let t = Netns::of_pid(pid).unwrap();
            if t.inode().unwrap() != mine {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "unshare never switched namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(target.label, format!("pid {pid}"));

        let br = format!("mnb{}", unique());
        netlink::ensure_bridge(&br, 1500).unwrap();
        let host_if = format!("mnv{}", unique());
        let att = netlink::attach(&spec(
            target.clone(),
            &br,
            &host_if,
            1500,
            &[("10.40.3.9", 16)],
        ))
        .unwrap();
        let pid_s = pid.to_string();
        let out = run(
            "nsenter",
            &[
                "-t", &pid_s, "-n", "ip", "-j", "addr", "show", "dev", "ethwe",
            ],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["address"], mac_str(att.mac));
        assert_eq!(v[0]["addr_info"][0]["local"], "10.40.3.9");
        assert_eq!(v[0]["addr_info"][0]["prefixlen"], 16);
        assert_eq!(h.link(&host_if).unwrap()["master"], br.as_str());
        drop(child);
    });
}

#[test]
fn detach_addresses_then_interface() {
    require_root!();
    let (host, cs) = scratch(2);
    let (h, c) = (host.0.clone(), cs[0].0.clone());
    let (t0, t1) = (cs[0].netns(), cs[1].netns());
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        netlink::ensure_bridge(&br, 1500).unwrap();
        let host_if = format!("mnv{}", unique());
        netlink::attach(&spec(
            t0.clone(),
            &br,
            &host_if,
            1500,
            &[("10.40.4.2", 24), ("10.40.5.2", 24)],
        ))
        .unwrap();

        // One of two: the other stays, and so does the interface.
        assert!(netlink::detach(&t0, "ethwe", &[(v4("10.40.4.2"), 24)]).unwrap());
        assert_eq!(c.addrs("ethwe"), vec!["10.40.5.2/24"]);
        // Again: nothing to do.
        assert!(!netlink::detach(&t0, "ethwe", &[(v4("10.40.4.2"), 24)]).unwrap());
        // The last one: the interface goes, host end with it.
        assert!(netlink::detach(&t0, "ethwe", &[(v4("10.40.5.2"), 24)]).unwrap());
        assert!(c.link("ethwe").is_none());
        assert!(h.link(&host_if).is_none());
        assert!(!netlink::detach(&t0, "ethwe", &[]).unwrap());
        assert_eq!(netlink::inspect(&t0, "ethwe").unwrap(), None);

        // With no addresses given, the interface goes at once.
        let host_if1 = format!("mnv{}", unique());
        netlink::attach(&spec(
            t1.clone(),
            &br,
            &host_if1,
            1500,
            &[("10.40.6.2", 24)],
        ))
        .unwrap();
        assert!(netlink::detach(&t1, "ethwe", &[]).unwrap());
        assert!(h.link(&host_if1).is_none());
        assert!(!netlink::detach(&t1, "ethwe", &[]).unwrap());
    });
}

#[test]
fn attach_to_missing_namespace_fails_cleanly() {
    require_root!();
    let (host, cs) = scratch(1);
    let (h, c) = (host.0.clone(), cs[0].0.clone());
    let target = cs[0].netns();
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        netlink::ensure_bridge(&br, 1500).unwrap();

        let absent = format!("mnd-absent-{}", unique());
        let err = Netns::named(&absent).unwrap_err();
        assert!(matches!(err, NetnsError::NotFound { .. }));
        assert!(
            err.to_string()
                .starts_with(&format!("netns {absent}: no such namespace")),
            "{err}"
        );

        // A Netns whose file is gone by the time attach runs.
        let gone = Netns {
            path: format!("/run/netns/{absent}").into(),
            label: format!("netns {absent}"),
        };
        let host_if = format!("mnv{}", unique());
        let err =
            netlink::attach(&spec(gone, &br, &host_if, 1500, &[("10.40.7.2", 24)])).unwrap_err();
        assert!(matches!(err, NetlinkError::Netns { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("attach ethwe to netns {absent}: ")),
            "{msg}"
        );
        assert!(msg.contains("no such namespace"), "{msg}");
        let mut names = h.link_names();
        names.sort();
        let mut want = vec!["lo".to_string(), br.clone()];
        want.sort();
        assert_eq!(names, want, "no veth left behind");

        // A failure after the veth has crossed over is undone too: the kernel
        // refuses a multicast address as an interface address.
        let err = netlink::attach(&spec(
            target.clone(),
            &br,
            &host_if,
            1500,
            &[("10.40.7.2", 24), ("224.0.0.9", 24)],
        ))
        .unwrap_err();
        assert!(err.to_string().contains("224.0.0.9"), "{err}");
        let mut names = h.link_names();
        names.sort();
        assert_eq!(names, want, "host end removed");
        assert_eq!(
            c.link_names(),
            vec!["lo".to_string()],
            "container end removed"
        );

        // A missing bridge is named.
        let err = netlink::attach(&spec(target.clone(), "mnb-nobridge", &host_if, 1500, &[]))
            .unwrap_err();
        assert!(matches!(err, NetlinkError::NotFound { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("bridge mnb-nobridge does not exist"),
            "{err}"
        );
    });
}

#[test]
fn containers_on_one_bridge_can_ping() {
    require_root!();
    let (host, cs) = scratch(2);
    let (a, b) = (cs[0].0.clone(), cs[1].0.clone());
    let (t0, t1) = (cs[0].netns(), cs[1].netns());
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        netlink::ensure_bridge(&br, 1500).unwrap();
        netlink::attach(&spec(
            t0,
            &br,
            &format!("mnv{}", unique()),
            1500,
            &[("10.41.0.2", 24)],
        ))
        .unwrap();
        netlink::attach(&spec(
            t1,
            &br,
            &format!("mnv{}", unique()),
            1500,
            &[("10.41.0.3", 24)],
        ))
        .unwrap();
        assert!(
            a.exec_ok(&["ping", "-c", "2", "-W", "2", "-q", "10.41.0.3"]),
            "c0 -> c1"
        );
        assert!(
            b.exec_ok(&["ping", "-c", "2", "-W", "2", "-q", "10.41.0.2"]),
            "c1 -> c0"
        );
    });
}

// ---------------------------------------------------------------------------
// TAP
// ---------------------------------------------------------------------------

const GSO_TCPV4: u8 = 1;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// What one unit read from the TAP is.
#[derive(Debug)]
struct Unit {
    len: usize,
    gso_type: u8,
    ethertype: u16,
    frame: Vec<u8>,
}

fn parse_unit(buf: &[u8], n: usize) -> Unit {
    assert!(n >= VNET_HDR_LEN + 14, "unit too short: {n}");
    let frame = buf[VNET_HDR_LEN..n].to_vec();
    Unit {
        len: n,
        gso_type: buf[1] & !GSO_ECN,
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        frame,
    }
}

/// Read units from `tap` until `want` matches one or `limit` passes.
fn read_until(tap: &Tap, limit: Duration, mut want: impl FnMut(&Unit) -> bool) -> Option<Unit> {
    let mut buf = vec![0u8; MAX_UNIT_LEN];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match tap.read_unit(&mut buf).unwrap() {
            Some(n) => {
                let unit = parse_unit(&buf, n);
                if want(&unit) {
                    return Some(unit);
                }
            }
            None => {
                let mut pfd = libc::pollfd {
                    fd: tap.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
        }
    }
    None
}

fn is_arp(u: &Unit, op: u16, sender_ip: [u8; 4], target_ip: [u8; 4]) -> bool {
    u.ethertype == 0x0806
        && u.frame.len() >= 42
        && u16::from_be_bytes([u.frame[20], u.frame[21]]) == op
        && u.frame[28..32] == sender_ip
        && u.frame[38..42] == target_ip
}

#[test]
fn tap_carries_superframes_with_virtio_header() {
    require_root!();
    let (host, cs) = scratch(2);
    let (h, a) = (host.0.clone(), cs[0].0.clone());
    let (t0, t1) = (cs[0].netns(), cs[1].netns());
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        let bridge_index = netlink::ensure_bridge(&br, 1500).unwrap();
        let tap_name = format!("mnt{}", unique());
        let tap = Tap::create(&tap_name, bridge_index, 1500).unwrap();
        assert!(tap.vnet_hdr(), "IFF_VNET_HDR");
        assert_eq!(tap.name(), tap_name);

        // Flags as promised.
        let tl = h.link(&tap_name).expect("tap exists");
        assert_eq!(tl["master"], br.as_str());
        assert_eq!(tl["mtu"], 1500);
        assert_eq!(tl["txqlen"], 10000);
        let fl = flags(&tl);
        assert!(
            fl.contains(&"UP".to_string()) && fl.contains(&"PROMISC".to_string()),
            "{tl}"
        );
        assert_eq!(
            h.sysctl(&format!("/proc/sys/net/ipv6/conf/{tap_name}/disable_ipv6")),
            "1"
        );
        // SAFETY: F_GETFL on a descriptor we hold.
        let fl = unsafe { libc::fcntl(tap.raw_fd(), libc::F_GETFL) };
        assert!(fl & libc::O_NONBLOCK != 0, "non-blocking");
        let mut buf = vec![0u8; MAX_UNIT_LEN];
        // The bridge may already have sent its own IGMP report through the
        // ports; drain, and an empty queue then reads as None (EAGAIN).
        while let Some(n) = tap.read_unit(&mut buf).unwrap() {
            let u = parse_unit(&buf, n);
            assert_eq!(u.gso_type, 0, "small control frames only so far: {u:?}");
        }
        assert_eq!(tap.read_unit(&mut buf).unwrap(), None);

        // The gratuitous ARP from attach reaches the TAP.
        let ip_a = [10, 42, 0, 1];
        let att = netlink::attach(&spec(
            t0,
            &br,
            &format!("mnv{}", unique()),
            1500,
            &[("10.42.0.1", 24)],
        ))
        .unwrap();
        let garp = read_until(&tap, Duration::from_secs(3), |u| is_arp(u, 1, ip_a, ip_a));
        let garp = garp.expect("gratuitous ARP from the container seen on the TAP");
        assert_eq!(garp.frame[6..12], att.mac);
        assert_eq!(garp.gso_type, 0);
        netlink::attach(&spec(
            t1.clone(),
            &br,
            &format!("mnv{}", unique()),
            1500,
            &[("10.42.0.2", 24)],
        ))
        .unwrap();

        // write_unit: an ARP request injected through the TAP gets an answer back.
        let tap_mac = [0x02, 0, 0, 0, 0x42, 0x50];
        let mut unit = vec![0u8; VNET_HDR_LEN];
        unit.extend_from_slice(&[0xff; 6]);
        unit.extend_from_slice(&tap_mac);
        unit.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        unit.extend_from_slice(&tap_mac);
        unit.extend_from_slice(&[10, 42, 0, 50]);
        unit.extend_from_slice(&[0; 6]);
        unit.extend_from_slice(&ip_a);
        assert_eq!(tap.write_unit(&unit).unwrap(), unit.len());
        let reply = read_until(&tap, Duration::from_secs(3), |u| {
            is_arp(u, 2, ip_a, [10, 42, 0, 50])
        });
        assert!(reply.is_some(), "ARP reply to a frame written into the TAP");

        // TCP bulk from c0 to c1. With ageing 0 the bridge learns nothing and
        // floods every frame, so the TAP sees the stream as the sender built it:
        // TSO superframes.
        h.ip(&["link", "set", &br, "type", "bridge", "ageing_time", "0"]);
        let listener = netns::run_in(&t1, || TcpListener::bind("10.42.0.2:5201"))
            .unwrap()
            .unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut sink = vec![0u8; 1 << 16];
            while s.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        });
        let dst: SocketAddr = "10.42.0.2:5201".parse().unwrap();
        let mut client = netns::run_in(&a.netns(), move || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(3))
        })
        .unwrap()
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 1 << 16];
                let deadline = Instant::now() + Duration::from_secs(10);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if client.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        };
        let tso = read_until(&tap, Duration::from_secs(8), |u| {
            u.gso_type == GSO_TCPV4 && u.len > VNET_HDR_LEN + 1514
        });
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        server.join().unwrap();
        let tso = tso.expect("a TCPv4 superframe on the TAP");
        assert_eq!(tso.ethertype, 0x0800);
        eprintln!("devices: TSO unit of {} bytes seen on the TAP", tso.len);

        // UDP GSO (UDP_SEGMENT) to an unknown MAC: flooded to the TAP as one unit
        // when the kernel took USO.
        if tap.udp_gso() {
            a.ip(&[
                "neigh",
                "replace",
                "10.42.0.99",
                "lladdr",
                "02:00:00:00:42:99",
                "dev",
                "ethwe",
            ]);
            let sock = netns::run_in(&a.netns(), || UdpSocket::bind("10.42.0.1:0"))
                .unwrap()
                .unwrap();
            let seg: libc::c_int = 1400;
            // SAFETY: valid socket, option value of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    &seg as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "UDP_SEGMENT");
            sock.send_to(&vec![0x33u8; 14_000], "10.42.0.99:9").unwrap();
            let uso = read_until(&tap, Duration::from_secs(3), |u| {
                u.gso_type == GSO_UDP_L4 && u.len > VNET_HDR_LEN + 1514
            });
            let uso = uso.expect("a UDP superframe on the TAP");
            eprintln!("devices: USO unit of {} bytes seen on the TAP", uso.len);
        } else {
            eprintln!("devices: kernel refused USO4/6 on the TAP; UDP superframe check skipped");
        }
    });
}

#[test]
fn tap_reuses_a_persistent_device_and_names_failures() {
    require_root!();
    let (host, _) = scratch(0);
    let h = host.0.clone();
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        let bridge_index = netlink::ensure_bridge(&br, 1500).unwrap();

        // A persistent TAP made by someone else is attached to, not recreated.
        let name = format!("mnt{}", unique());
        h.ip(&["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]);
        let before = h.link(&name).unwrap()["ifindex"].clone();
        let tap = Tap::create(&name, bridge_index, 1400).unwrap();
        assert!(tap.vnet_hdr());
        let link = h.link(&name).unwrap();
        assert_eq!(link["ifindex"], before);
        assert_eq!(link["master"], br.as_str());
        assert_eq!(link["mtu"], 1400);
        drop(tap);
        assert!(
            h.link(&name).is_some(),
            "persistent: still there after close"
        );
        h.ip(&["tuntap", "del", "dev", &name, "mode", "tap"]);

        // A non-TUN link of that name: the error names the TAP.
        let (veth, peer) = (format!("mnv{}", unique()), format!("mnv{}", unique()));
        h.ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        let err = Tap::create(&veth, bridge_index, 1500).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("open TAP {veth}: ")),
            "{err}"
        );

        // A missing bridge: the TAP is closed again (and, not persistent, gone).
        let gone = format!("mnt{}", unique());
        let err = Tap::create(&gone, 999_999, 1500).unwrap_err();
        assert!(err.to_string().contains(&gone), "{err}");
        assert!(h.link(&gone).is_none(), "no TAP left behind");
    });
}

#[test]
fn attach_with_ipv6_address_keeps_ipv6_on_inside_only() {
    require_root!();
    let (host, cs) = scratch(1);
    let (h, c) = (host.0.clone(), cs[0].0.clone());
    let target = cs[0].netns();
    in_host(&host, move || {
        let br = format!("mnb{}", unique());
        netlink::ensure_bridge(&br, 1500).unwrap();
        let host_if = format!("mnv{}", unique());
        let mut s = spec(target.clone(), &br, &host_if, 1500, &[("10.40.8.2", 24)]);
        s.addrs.push(("fd00:40::2".parse().unwrap(), 64));
        let att = netlink::attach(&s).unwrap();
        assert!(
            att.addrs.contains(&("fd00:40::2".parse().unwrap(), 64)),
            "{att:?}"
        );
        assert_eq!(c.sysctl("/proc/sys/net/ipv6/conf/ethwe/disable_ipv6"), "0");
        assert_eq!(
            h.sysctl(&format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6")),
            "1"
        );
        assert!(netlink::detach(&target, "ethwe", &[("fd00:40::2".parse().unwrap(), 64)]).unwrap());
        assert_eq!(c.addrs("ethwe"), vec!["10.40.8.2/24"]);
    });
}
