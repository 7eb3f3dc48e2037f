//! End-to-end scenarios: real `meshnet` routers in network namespaces.
//!
//! Each test builds its own [`Lab`] (see `meshnet_tests::lab`): hosts `h<i>` on an
//! underlay `10.250.<k>.0/24`, containers `c<j>` attached as `10.40.0.<j>/16`.
//! They need root and skip otherwise. `MESHNET_BIN=...` picks the binary,
//! `MESHNET_LAB_KEEP=1` keeps a failed lab, `MESHNET_E2E=0` skips them all.
//!
//! 1. three hosts, discovery by gossip, attach/ps/attach twice, full-MTU frames
//! 2. wrong or missing password is refused, both sides say why
//! 3. no plaintext on the underlay (pcap), with a control capture inside
//! 4. stop/launch keeps name, targets and attachments; a forgotten target
//!    stays forgotten across a restart with the same command line
//! 5. reset leaves the host clean; launch works again
//! 6. bad input fails clearly and changes nothing; network garbage is survived
//! 7. detach, forget, connect --replace, targets persisted
//! 8. a mesh of five settles to one established connection per pair
//! 9. `launch --resume`: refused, starting nothing, without an earlier launch,
//!    with other options, or without the password; with it, the same options
//! 10. an address moved to another namespace is announced by `attach`: a peer's
//!     neighbour entry holds the new MAC at once (IPv4 and IPv6)
//! 11. a target re-made while its router was down is announced again once the
//!     router is back in the mesh: a remote neighbour entry holds the new MAC
//! 12. two connect targets that reach one peer (its two addresses) give one
//!     connection that lasts: the redial of the other target does not replace it
//! 13. a launch with another `--mtu` gives it to the bridge and to the
//!     interfaces attached before, so old and new containers talk at full size

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// `10.40.0.<j>`
fn overlay(j: u8) -> String {
    format!("10.40.0.{j}")
}

#[track_caller]
fn attach(h: &Host, c: &Container) {
    let cidr = format!("{}/16", overlay(c.j));
    h.meshnet(&["attach", &cidr, &c.ns])
        .expect_ok(&format!("attach {cidr} {} on {}", c.ns, h.ns));
}

#[track_caller]
fn assert_pings(from: &Container, to: u8, timeout: Duration) {
    let ip = overlay(to);
    let start = Instant::now();
    assert!(
        ping_until(&from.ns, &ip, timeout),
        "{} cannot ping {ip} within {timeout:?}",
        from.ns
    );
    // Once it works it must keep working.
    assert!(
        ping(&from.ns, &ip, 3),
        "{} reached {ip} once, then lost it",
        from.ns
    );
    eprintln!(
        "{} -> {ip}: ok after {:.1}s",
        from.ns,
        start.elapsed().as_secs_f64()
    );
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn mentions_password(text: &str) -> bool {
    let t = lower(text);
    t.contains("password") || t.contains("authenticat")
}

/// Scenario 1: h3 is only told about h2, finds h1 by gossip; containers on all
/// three hosts reach each other; `ps` and a repeated attach behave.
#[test]
fn three_hosts_find_each_other_by_gossip() {
    let Some(lab) = Lab::new("gossip") else {
        return;
    };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c2, c3) = (
        lab.add_container(&h1, 1),
        lab.add_container(&h2, 2),
        lab.add_container(&h3, 3),
    );

    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    let n3 = h3.launch(&[]);
    h3.meshnet(&["connect", &h2.ip]).expect_ok("connect on h3");
    assert!(
        n1 != n2 && n2 != n3 && n1 != n3,
        "peer names must differ: {n1} {n2} {n3}"
    );
    attach(&h1, &c1);
    attach(&h2, &c2);
    attach(&h3, &c3);

    assert_pings(&c1, 3, SECS(30));
    assert_pings(&c3, 1, SECS(10));
    assert_pings(&c2, 1, SECS(10));
    assert_pings(&c2, 3, SECS(10));

    // Discovery: h3 knows h1 and holds an established connection to it although
    // only h2 was ever named to it.
    let found = wait_until(SECS(20), || {
        let s = h3.status_json();
        peer_names(&s).contains(&n1) && established_with(&s, &n1)
    });
    let s3 = h3.status_json();
    assert!(found, "h3 did not discover h1 ({n1}) by gossip: {s3:#}");
    assert_eq!(
        s3["name"],
        n3.as_str(),
        "status name is not the launched name: {s3:#}"
    );
    assert_eq!(s3["port"], 6783, "{s3:#}");
    assert_eq!(s3["password"], false, "{s3:#}");
    assert!(
        s3["version"].as_str().is_some_and(|v| !v.is_empty()),
        "no version: {s3:#}"
    );
    let names = peer_names(&s3);
    for n in [&n1, &n2, &n3] {
        assert!(
            names.contains(n),
            "h3's peers lack {n} (self included): {s3:#}"
        );
    }
    assert_eq!(h3.targets(), vec![h2.addr()], "h3 was only told about h2");

    // The container side: ethwe up, our address, an MTU that full frames fit.
    let ethwe = link(&c1.ns, "ethwe")
        .unwrap_or_else(|| panic!("no ethwe in {}: {:#?}", c1.ns, links(&c1.ns)));
    assert!(
        ethwe["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        "ethwe not up: {ethwe:#}"
    );
    assert_eq!(
        ipv4_of(&ethwe),
        vec!["10.40.0.1/16".to_string()],
        "{ethwe:#}"
    );
    let mac = ethwe["address"].as_str().unwrap_or_default().to_string();
    let mtu = ethwe["mtu"].as_u64().unwrap_or(0);
    eprintln!("ethwe in c1: mac {mac}, mtu {mtu}");
    assert!(
        (576..1500).contains(&mtu),
        "overlay MTU {mtu} cannot be carried over a 1500 underlay unfragmented"
    );
    let size = (mtu - 28).to_string();
    let big = exec_in(
        &c1.ns,
        &[
            "ping",
            "-n",
            "-q",
            "-M",
            "do",
            "-s",
            &size,
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            "6",
            &overlay(3),
        ],
    );
    assert!(
        big.ok(),
        "full-MTU ({mtu}) frames do not cross the overlay: {big}"
    );

    // ps, as JSON and as text.
    let ps = h1.ps_json();
    let mine: Vec<&Value> = ps
        .iter()
        .filter(|e| e["target"] == c1.ns.as_str())
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "ps on h1 should list {} once: {ps:#?}",
        c1.ns
    );
    assert_eq!(
        mine[0]["mac"],
        mac.as_str(),
        "ps MAC is not ethwe's: {ps:#?}"
    );
    assert_eq!(
        mine[0]["addresses"],
        serde_json::json!(["10.40.0.1/16"]),
        "{ps:#?}"
    );
    let text = h1.meshnet(&["ps"]).expect_ok("ps on h1");
    let line = text
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(c1.ns.as_str()));
    let line = line.unwrap_or_else(|| panic!("ps text has no line for {}: {text}", c1.ns));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert!(
        cols.len() >= 3 && cols[1] == mac && cols[2..].contains(&"10.40.0.1/16"),
        "ps line `{line}` is not `TARGET MAC ADDR/PREFIX`"
    );

    // Attaching the same thing twice is harmless.
    attach(&h1, &c1);
    let ethwes: Vec<Value> = links(&c1.ns)
        .into_iter()
        .filter(|l| l["ifname"] == "ethwe")
        .collect();
    assert_eq!(ethwes.len(), 1, "{:#?}", links(&c1.ns));
    assert_eq!(
        ipv4_of(&ethwes[0]),
        vec!["10.40.0.1/16".to_string()],
        "address doubled? {:#}",
        ethwes[0]
    );
    assert_eq!(
        ethwes[0]["address"],
        mac.as_str(),
        "second attach changed the MAC"
    );
    let n_links = links(&c1.ns).len();
    assert_eq!(
        n_links,
        2,
        "c1 should hold lo and ethwe only: {:#?}",
        links(&c1.ns)
    );
    let ps = h1.ps_json();
    assert_eq!(
        ps.iter().filter(|e| e["target"] == c1.ns.as_str()).count(),
        1,
        "{ps:#?}"
    );
    assert_pings(&c1, 3, SECS(10));
    assert_pings(&c3, 1, SECS(10));

    let v = h1.meshnet(&["--version"]).expect_ok("--version");
    assert!(!v.stdout.trim().is_empty(), "--version prints nothing");
}

/// Scenario 2: a router with the wrong password, or none, is kept out, and both
/// sides say why.
#[test]
fn wrong_or_missing_password_is_refused() {
    let Some(lab) = Lab::new("password") else {
        return;
    };
    let hs: Vec<Host> = (1..=5).map(|i| lab.add_host(i)).collect();
    let (h1, h2, h3, h4, h5) = (&hs[0], &hs[1], &hs[2], &hs[3], &hs[4]);
    let c1 = lab.add_container(h1, 1);
    let c3 = lab.add_container(h3, 3);
    let c4 = lab.add_container(h4, 4);
    let c5 = lab.add_container(h5, 5);
    // As a person would write it: `echo s3cret > file`.
    let pwfile = lab.dir.join("password");
    std::fs::write(&pwfile, "s3cret\n").unwrap();
    let pwfile = pwfile.to_string_lossy().into_owned();

    let n1 = h1.launch(&["--password", "s3cret"]);
    let _n2 = h2.launch(&["--password-file", &pwfile, &h1.ip]);
    let _n3 = h3.launch_env(&[&h2.ip], &[("MESHNET_PASSWORD", "s3cret")]);
    attach(h1, &c1);
    attach(h3, &c3);
    assert!(
        ping_until(&c1.ns, &overlay(3), SECS(30)),
        "c1 cannot ping c3 with one password given three ways (flag, file with trailing newline, env)"
    );
    assert_pings(&c3, 1, SECS(10));
    assert_eq!(h1.status_json()["password"], true);

    // h4: wrong password.
    let _n4 = h4.launch(&["--password", "wrong", &h1.ip]);
    attach(h4, &c4);
    let mut ever = false;
    let mut last = Value::Null;
    let refused = wait_until(SECS(20), || {
        last = h4.status_json();
        let to_h1 = connections_to(&last, &h1.ip);
        ever |= to_h1.iter().any(|c| c["state"] == "established") || established_with(&last, &n1);
        to_h1.iter().any(|c| {
            c["state"] != "established" && mentions_password(c["info"].as_str().unwrap_or(""))
        })
    });
    assert!(refused, "h4 (wrong password) shows no refused connection to h1 naming password/authentication: {last:#}");
    for c in connections_to(&last, &h1.ip) {
        eprintln!("h4 -> h1: {} {}: {}", c["direction"], c["state"], c["info"]);
    }
    assert!(
        !ever,
        "h4 with the wrong password got an established connection: {last:#}"
    );
    let why = wait_until(SECS(10), || h1.log().lines().any(mentions_password));
    assert!(
        why,
        "h1's meshnet.log says nothing about password/authentication:\n{}",
        h1.log()
    );
    assert!(
        !ping(&c4.ns, &overlay(1), 3),
        "c4 (wrong password) reaches c1"
    );
    let s4 = h4.status_json();
    assert!(
        !peer_names(&s4).contains(&n1),
        "h4 learnt h1 by gossip despite the wrong password: {s4:#}"
    );
    assert!(
        !connections(&s4).iter().any(|c| c["state"] == "established"),
        "{s4:#}"
    );

    // h5: no password at all; launch says the mesh is open.
    let out = h5
        .meshnet(&["launch", &h1.ip])
        .expect_ok("launch h5 without password");
    assert!(
        lower(&out.all()).contains("password"),
        "launch without a password should say so: {out}"
    );
    attach(h5, &c5);
    let s5 = h5.status_json();
    assert_eq!(s5["password"], false, "{s5:#}");
    let text = h5.meshnet(&["status"]).expect_ok("status h5");
    assert!(
        lower(&text.stdout).contains("password"),
        "status without a password should say so: {text}"
    );
    let mut ever = false;
    let refused = wait_until(SECS(20), || {
        last = h5.status_json();
        let to_h1 = connections_to(&last, &h1.ip);
        ever |= to_h1.iter().any(|c| c["state"] == "established") || established_with(&last, &n1);
        to_h1.iter().any(|c| {
            c["state"] != "established"
                && lower(c["info"].as_str().unwrap_or("")).contains("password")
        })
    });
    assert!(refused, "h5 (no password) shows no refused connection to h1 saying a password is required: {last:#}");
    for c in connections_to(&last, &h1.ip) {
        eprintln!("h5 -> h1: {} {}: {}", c["direction"], c["state"], c["info"]);
    }
    for l in h1.log().lines().filter(|l| mentions_password(l)).take(4) {
        eprintln!("h1 log: {l}");
    }
    assert!(
        !ever,
        "h5 without a password got an established connection: {last:#}"
    );
    assert!(!ping(&c5.ns, &overlay(1), 3), "c5 (no password) reaches c1");

    // The members are unharmed.
    assert_pings(&c1, 3, SECS(10));
}

const MARKER: &[u8] = b"meshnet-marker";

const TCP_SINK: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(20)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(10); n = 0
while True:
    d = c.recv(65536)
    if not d: break
    n += len(d)
print("got", n, flush=True)
"#;

const MARKER_SEND: &str = r#"
import socket, sys
dst, m = sys.argv[1], b"meshnet-marker" * 40
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5): u.sendto(m, (dst, 9999))
t = socket.create_connection((dst, 9998), timeout=10)
t.sendall(m * 20); t.close()
print("sent", flush=True)
"#;

/// Scenario 3: what containers say never crosses the underlay in the clear.
#[test]
fn no_plaintext_on_the_wire() {
    let Some(lab) = Lab::new("wire") else { return };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c3) = (lab.add_container(&h1, 1), lab.add_container(&h3, 3));
    h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    h3.launch(&[&h2.ip]);
    attach(&h1, &c1);
    attach(&h3, &c3);
    assert_pings(&c1, 3, SECS(30));

    let wire = lab.capture(&h1.ns, UNDERLAY_IF);
    let inside = lab.capture(&c1.ns, "ethwe");
    let mut sink = lab.spawn_in(&c3.ns, &["python3", "-c", TCP_SINK, "9998"]);
    assert!(
        wait_until(SECS(10), || sink.stdout().contains("ready")),
        "tcp sink in c3 did not start: {}",
        sink.stderr()
    );

    let p = exec_in(
        &c1.ns,
        &[
            "ping",
            "-n",
            "-q",
            "-p",
            "6d6573686e65742d6d61726b6572",
            "-s",
            "200",
            "-c",
            "5",
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            "8",
            &overlay(3),
        ],
    );
    assert!(p.ok(), "marker ping c1 -> c3 failed: {p}");
    let s = exec_in(&c1.ns, &["python3", "-c", MARKER_SEND, &overlay(3)]);
    assert!(s.ok(), "marker UDP/TCP send c1 -> c3 failed: {s}");
    assert!(sink.wait(SECS(10)), "tcp sink in c3 did not finish");
    assert!(
        sink.stdout()
            .contains(&format!("got {}", MARKER.len() * 40 * 20)),
        "c3 did not receive the TCP stream: {} {}",
        sink.stdout(),
        sink.stderr()
    );
    std::thread::sleep(Duration::from_millis(500));

    let wire = wire.stop();
    let inside = inside.stop();
    let udp = wire.count(17, 6783);
    let tcp = wire.count(6, 6783);
    eprintln!(
        "underlay capture: {} frames, {udp} UDP/6783, {tcp} TCP/6783; ethwe capture: {} frames",
        wire.frames.len(),
        inside.frames.len()
    );
    assert!(
        inside.contains(MARKER),
        "control failed: the marker is not even on c1's ethwe"
    );
    assert!(
        udp >= 10,
        "only {udp} UDP 6783 datagrams on h1's underlay: did the traffic cross as UDP?"
    );
    assert!(
        !wire.contains(MARKER),
        "PLAINTEXT: the marker crossed h1's underlay in the clear ({})",
        wire_offender(&wire)
    );
    assert!(
        !wire.contains(&MARKER[4..12]),
        "PLAINTEXT: part of the marker crossed h1's underlay ({})",
        wire_offender(&wire)
    );
}

/// Which frame carries the marker, for the failure message.
fn wire_offender(p: &Pcap) -> String {
    p.frames
        .iter()
        .enumerate()
        .find(|(_, f)| f.windows(8).any(|w| w == &MARKER[4..12]))
        .map(|(i, f)| format!("frame {i}, {} bytes, {:?}", f.len(), p.flows().get(i)))
        .unwrap_or_default()
}

/// Scenario 4: stop and launch again keeps the name, the targets and the
/// attachments.
#[test]
fn restart_keeps_name_targets_and_attachments() {
    let Some(lab) = Lab::new("restart") else {
        return;
    };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c2, c3) = (
        lab.add_container(&h1, 1),
        lab.add_container(&h2, 2),
        lab.add_container(&h3, 3),
    );
    let n1 = h1.launch(&[]);
    let n2 = h2.launch(&[&h1.ip]);
    h3.launch(&[&h1.ip]);
    attach(&h1, &c1);
    attach(&h2, &c2);
    attach(&h3, &c3);
    assert_pings(&c2, 1, SECS(30));
    assert_pings(&c2, 3, SECS(10));

    let t = Instant::now();
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert!(
        wait_until(SECS(10), || h2.pids().is_empty()),
        "processes left in {} after stop: {:?}",
        h2.ns,
        h2.pids()
    );
    eprintln!("stop took {:.1}s", t.elapsed().as_secs_f64());
    let st = h2.meshnet(&["status"]);
    eprintln!("status while stopped: {st}");

    let again = h2.launch(&[]);
    assert_eq!(again, n2, "h2 changed its peer name across a restart");
    assert!(
        h2.targets().contains(&h1.addr()),
        "h2 forgot its connect target {}: {:?}",
        h1.addr(),
        h2.targets()
    );
    let back = wait_until(SECS(20), || established_with(&h2.status_json(), &n1));
    assert!(back, "h2 did not reconnect to h1: {:#}", h2.status_json());

    let ethwe = link(&c2.ns, "ethwe")
        .unwrap_or_else(|| panic!("ethwe gone from c2 after restart: {:#?}", links(&c2.ns)));
    assert_eq!(ipv4_of(&ethwe), vec!["10.40.0.2/16".to_string()]);
    let ps = h2.ps_json();
    assert!(
        ps.iter().any(|e| e["target"] == c2.ns.as_str()),
        "ps on h2 forgot c2 after restart: {ps:#?}"
    );
    assert_pings(&c2, 1, SECS(30));
    assert_pings(&c2, 3, SECS(10));
    assert_pings(&c1, 2, SECS(10));
}

/// Scenario 4b (Weave's 175_target_peer_persistence): a target forgotten
/// after launch stays forgotten when the router is started again with the
/// same command line (after `kill -9`, as a restart policy does), and so does
/// one replaced away by `connect --replace`; `launch --resume` keeps the
/// targets as they were left; after `meshnet stop` a launch adds the peers it
/// names again. The targets are addresses nobody answers: only the lists count.
#[test]
fn a_forgotten_target_stays_forgotten_across_a_restart() {
    let Some(lab) = Lab::new("forgotten") else {
        return;
    };
    let h1 = lab.add_host(1);
    let (me, two, three) = (h1.addr(), format!("{}:6783", lab.host_ip(2)), format!("{}:6783", lab.host_ip(3)));
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let named = [h1.ip.clone(), lab.host_ip(2)];
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    h1.launch(&named);
    h1.meshnet(&["forget", &h1.ip]).expect_ok("forget h1");
    h1.meshnet(&["connect", &lab.host_ip(3)]).expect_ok("connect h3");
    assert_eq!(sorted(h1.targets()), vec![two.clone(), three.clone()]);

    kill9(&h1);
    h1.launch(&named);
    assert_eq!(sorted(h1.targets()), vec![two.clone(), three.clone()], "after kill -9 and the same launch");
    assert!(h1.log().contains(&format!("not adding {me} named at launch")), "{}", h1.log());

    h1.meshnet(&["stop"]).expect_ok("stop");
    h1.launch(&["--resume"]);
    assert_eq!(sorted(h1.targets()), vec![two.clone(), three.clone()], "after stop and launch --resume");

    h1.meshnet(&["stop"]).expect_ok("stop");
    h1.launch(&named);
    assert_eq!(sorted(h1.targets()), vec![me.clone(), two.clone(), three.clone()], "after stop and a launch naming h1 again");

    h1.meshnet(&["connect", "--replace", &lab.host_ip(2)]).expect_ok("connect --replace");
    kill9(&h1);
    h1.launch(&named);
    assert_eq!(h1.targets(), vec![two.clone()], "after connect --replace, kill -9 and the same launch");
    h1.meshnet(&["connect", &h1.ip]).expect_ok("connect h1 again");
    kill9(&h1);
    h1.launch(&named);
    assert_eq!(sorted(h1.targets()), vec![me, two], "connected again, then kill -9 and the same launch");
}

/// Scenario 5: reset leaves the host as it found it; launch works again.
#[test]
fn reset_removes_everything() {
    let Some(lab) = Lab::new("reset") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    attach(&h1, &c1);
    attach(&h2, &c2);
    assert_pings(&c1, 2, SECS(30));
    let before: Vec<String> = links(&h1.ns)
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect();
    eprintln!("links in h1 before reset: {before:?}");

    h1.meshnet(&["reset"]).expect_ok("reset h1");
    let gone = wait_until(SECS(10), || h1.pids().is_empty());
    let cmdlines: Vec<String> = h1
        .pids()
        .iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
        })
        .collect();
    assert!(gone, "processes left in h1 after reset: {cmdlines:?}");
    let mut names: Vec<String> = links(&h1.ns)
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![UNDERLAY_IF.to_string(), "lo".to_string()],
        "links left in h1 after reset: {:#?}",
        links(&h1.ns)
    );
    let eth0 = link(&h1.ns, UNDERLAY_IF).expect("underlay link");
    assert_eq!(
        ipv4_of(&eth0),
        vec![format!("{}/24", h1.ip)],
        "reset touched the underlay address"
    );
    let c1_links: Vec<String> = links(&c1.ns)
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect();
    assert_eq!(
        c1_links,
        vec!["lo".to_string()],
        "reset left interfaces in c1"
    );
    let ss = exec_in(&h1.ns, &["ss", "-ltnuH"]);
    assert!(
        !ss.stdout.contains(":6783"),
        "still listening on 6783 after reset: {ss}"
    );
    assert!(
        !h1.state_dir.exists(),
        "state dir {} still there after reset",
        h1.state_dir.display()
    );

    let name = h1.launch(&[&h2.ip]);
    eprintln!("relaunched h1 as {name}");
    attach(&h1, &c1);
    assert_pings(&c1, 2, SECS(30));
}

const GARBAGE: &str = r#"
import os, random, socket, sys
host, port = sys.argv[1], 6783
rnd = random.Random(6783)
for i in range(20):
    s = socket.socket(); s.settimeout(0.3)
    try:
        s.connect((host, port))
        n = rnd.choice([1, 7, 64, 1000, 70000])
        s.sendall(rnd.choice([os.urandom(n), b"\xff" * n, b"\x00" * n]))
        try: s.recv(4096)
        except Exception: pass
    except Exception as e: print("tcp", i, e)
    finally: s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(500):
    n = rnd.choice([0, 1, 20, 100, 1400, 1472])
    u.sendto(rnd.choice([os.urandom(n), b"\xff" * n, b"\x00" * n]), (host, port))
print("sent", flush=True)
"#;

/// Scenario 6: invalid commands fail clearly and change nothing; garbage from
/// the network does not bring the router down.
#[test]
fn bad_input_changes_nothing() {
    let Some(lab) = Lab::new("badinput") else {
        return;
    };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    let n1 = h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    attach(&h1, &c1);
    attach(&h2, &c2);
    assert_pings(&c1, 2, SECS(30));
    let pids = h1.pids();
    let ps_before = h1.ps_json();
    let targets_before = h1.targets();
    let c1_before = links(&c1.ns);

    let bad = |args: &[&str], names: &[&str]| {
        let out = h1.meshnet(args);
        assert!(
            !out.ok() && !out.timed_out,
            "`meshnet {}` should fail quickly: {out}",
            args.join(" ")
        );
        assert!(
            names.iter().any(|n| out.stderr.contains(n)),
            "the error of `meshnet {}` should name {names:?}: {out}",
            args.join(" ")
        );
        eprintln!("`meshnet {}` -> {}", args.join(" "), out.stderr.trim());
    };
    bad(&["attach", "10.40.0.999/16", &c1.ns], &["10.40.0.999"]);
    let ghost = format!("{}nosuch", lab.prefix);
    bad(&["attach", "10.40.0.1/16", &ghost], &[&ghost]);
    bad(&["attach", "10.40.0.9/16", "99999999"], &["99999999"]);
    bad(&["connect", "not a host:99999"], &["not a host", "99999"]);
    let bad_port = format!("{}:99999", h3.ip);
    bad(&["connect", &bad_port], &["99999"]);
    assert_eq!(h1.ps_json(), ps_before, "bad input changed ps");
    assert_eq!(
        h1.targets(),
        targets_before,
        "bad input changed the targets"
    );
    assert_eq!(links(&c1.ns), c1_before, "bad input changed c1's links");

    // A second launch on the same state dir refuses; the first keeps serving.
    let second = h1.meshnet(&["launch"]);
    assert!(
        !second.ok() && !second.timed_out,
        "a second launch should fail: {second}"
    );
    assert!(
        lower(&second.all()).contains("already"),
        "a second launch should say the router already runs: {second}"
    );
    assert_eq!(h1.status_json()["name"], n1.as_str());
    assert_pings(&c1, 2, SECS(10));

    // Garbage from the network (another namespace) and on the control socket.
    let g = exec_in(&h3.ns, &["python3", "-c", GARBAGE, &h1.ip]);
    assert!(g.ok(), "garbage sender failed: {g}");
    if let Ok(mut s) = UnixStream::connect(h1.state_dir.join("meshnet.sock")) {
        let _ = s.set_write_timeout(Some(SECS(2)));
        let _ = s.write_all(b"\xff\xfe{{{not json\n\0\0\0\0garbage\n");
    }
    std::thread::sleep(SECS(1));
    let now = h1.pids();
    assert!(
        pids.iter().all(|p| now.contains(p)),
        "a router process died after garbage: before {pids:?}, now {now:?}"
    );
    assert_eq!(h1.status_json()["name"], n1.as_str());
    assert_pings(&c1, 2, SECS(15));
    assert!(
        wait_until(SECS(10), || established_with(&h2.status_json(), &n1)),
        "h2 lost h1 after the garbage: {:#}",
        h2.status_json()
    );
}

/// Scenario 7: detach takes addresses (then the interface) away; forget and
/// `connect --replace` edit the persisted targets, which survive a restart.
#[test]
fn detach_and_forget() {
    let Some(lab) = Lab::new("detach") else {
        return;
    };
    let (h1, h2, h3) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    h1.meshnet(&["attach", "10.40.0.1/16", "10.40.1.1/16", &c1.ns])
        .expect_ok("attach two addresses");
    attach(&h2, &c2);
    assert_pings(&c2, 1, SECS(30));
    assert!(
        ping(&c2.ns, "10.40.1.1", 2),
        "c2 cannot reach c1's second address"
    );
    let ps = h1.ps_json();
    let mut addrs = ps[0]["addresses"].clone();
    if let Value::Array(a) = &mut addrs {
        a.sort_by_key(|v| v.to_string());
    }
    assert_eq!(
        addrs,
        serde_json::json!(["10.40.0.1/16", "10.40.1.1/16"]),
        "{ps:#?}"
    );

    h1.meshnet(&["detach", "10.40.1.1/16", &c1.ns])
        .expect_ok("detach one address");
    let ethwe = link(&c1.ns, "ethwe").expect("ethwe stays while it has addresses");
    assert_eq!(ipv4_of(&ethwe), vec!["10.40.0.1/16".to_string()]);
    assert_eq!(
        h1.ps_json()[0]["addresses"],
        serde_json::json!(["10.40.0.1/16"])
    );
    assert!(
        ping(&c2.ns, &overlay(1), 2),
        "c1's remaining address stopped working"
    );
    assert!(
        !ping(&c2.ns, "10.40.1.1", 2),
        "the detached address still answers"
    );

    h1.meshnet(&["detach", &c1.ns])
        .expect_ok("detach everything");
    assert!(
        link(&c1.ns, "ethwe").is_none(),
        "ethwe left after a full detach: {:#?}",
        links(&c1.ns)
    );
    let ps = h1.ps_json();
    assert!(
        !ps.iter().any(|e| e["target"] == c1.ns.as_str()),
        "ps still lists c1: {ps:#?}"
    );
    assert!(
        !ping(&c2.ns, &overlay(1), 2),
        "c1 still answers after detach"
    );

    // Targets: forget, connect --replace, persisted across stop/launch.
    assert_eq!(h2.targets(), vec![h1.addr()]);
    h2.meshnet(&["forget", &h1.ip]).expect_ok("forget h1");
    assert!(h2.targets().is_empty(), "forget left {:?}", h2.targets());
    h2.meshnet(&["connect", &h1.ip, &h3.addr()])
        .expect_ok("connect two");
    assert_eq!(h2.targets().len(), 2, "{:?}", h2.targets());
    h2.meshnet(&["connect", "--replace", &h3.ip])
        .expect_ok("connect --replace");
    assert_eq!(h2.targets(), vec![h3.addr()], "--replace did not replace");
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert!(
        wait_until(SECS(10), || h2.pids().is_empty()),
        "h2 did not stop"
    );
    h2.launch(&[]);
    assert_eq!(
        h2.targets(),
        vec![h3.addr()],
        "targets not persisted across a restart"
    );
}

/// Scenario 8: a full mesh of five settles. h2..h5 are only told about h1, so
/// they find each other by gossip at the same moment and dial each other
/// simultaneously; afterwards every host must show exactly one established
/// connection per other peer and nothing stale (connecting/retrying/failed).
#[test]
fn five_hosts_settle_to_one_connection_per_pair() {
    let Some(lab) = Lab::new("five") else { return };
    let hs: Vec<Host> = (1..=5).map(|i| lab.add_host(i)).collect();
    let c2 = lab.add_container(&hs[1], 2);
    let c5 = lab.add_container(&hs[4], 5);
    let mut names = vec![hs[0].launch(&[])];
    for h in &hs[1..] {
        names.push(h.launch(&[&hs[0].ip]));
    }
    attach(&hs[1], &c2);
    attach(&hs[4], &c5);
    assert_pings(&c2, 5, SECS(30));

    let settled = |h: &Host| {
        let s = h.status_json();
        let conns = connections(&s);
        conns.len() == 4
            && conns.iter().all(|c| c["state"] == "established")
            && names.iter().filter(|n| established_with(&s, n)).count() == 4
    };
    let ok = wait_until(SECS(20), || hs.iter().all(settled));
    if !ok {
        let views: Vec<String> = hs
            .iter()
            .map(|h| {
                let conns = connections(&h.status_json());
                let lines: Vec<String> = conns
                    .iter()
                    .map(|c| {
                        format!(
                            "    {} {} {} peer={} info={}",
                            c["direction"], c["address"], c["state"], c["peer"], c["info"]
                        )
                    })
                    .collect();
                format!("  {} ({}):\n{}", h.ns, h.ip, lines.join("\n"))
            })
            .collect();
        panic!(
            "the mesh of five did not settle to one established connection per pair within 20 s:\n{}",
            views.join("\n")
        );
    }
    for h in &hs {
        let s = h.status_json();
        assert_eq!(
            peer_names(&s).len(),
            5,
            "{} does not know all five peers: {s:#}",
            h.ns
        );
    }
    // How many duplicate connections the tie-break closed (0 when the dials
    // happened not to cross this time).
    let duplicates: usize = hs
        .iter()
        .map(|h| {
            h.log()
                .lines()
                .filter(|l| l.contains("replaced by a newer connection") || l.contains("already connected to"))
                .count()
        })
        .sum();
    eprintln!("five hosts settled; log lines about duplicate connections: {duplicates}");
    // A router with four connections stops once each has said goodbye.
    let started = Instant::now();
    hs[4].meshnet(&["stop"]).expect_ok("stop h5");
    assert!(wait_until(SECS(10), || hs[4].pids().is_empty()), "h5 did not stop");
    let log = hs[4].log();
    let closed = log.lines().filter(|l| l.contains("connections closed in") || l.contains("still closing")).last();
    eprintln!("h5 stopped in {} ms: {}", started.elapsed().as_millis(), closed.unwrap_or("(no line)"));
}

/// Scenario 9: `launch --resume` takes the last launch's options. Without an
/// earlier launch, with another option, or without the password the last launch
/// used, it is refused and starts nothing.
#[test]
fn resume_relaunches_with_the_last_options() {
    let Some(lab) = Lab::new("resume") else { return };
    let h = lab.add_host(1);
    let out = h.meshnet(&["launch", "--resume"]);
    assert!(!out.ok() && out.all().contains("no earlier launch"), "{out}");
    assert!(h.pids().is_empty() && !h.state_dir.exists(), "a refused resume started or created something");

    let pw = [("MESHNET_PASSWORD", "resume-secret")];
    let name = h.launch_env(&["--mtu", "1300", "--nickname", "alpha"], &pw);
    h.meshnet(&["stop"]).expect_ok("stop");
    // Every option of the recorded launch is refused with --resume, not silently dropped.
    for other in [&["--mtu", "1400"][..], &["--datapath", "pcap"], &["--datapath-threads", "2"], &["--no-docker-plugin"]] {
        let mut args = vec!["launch", "--resume"];
        args.extend_from_slice(other);
        let out = h.meshnet(&args);
        assert!(!out.ok() && out.all().contains("cannot be used with"), "{out}");
    }
    assert!(h.pids().is_empty(), "a refused resume started a router");
    let out = h.meshnet(&["launch", "--resume"]);
    assert!(!out.ok() && out.all().contains("used a password"), "{out}");
    assert!(h.pids().is_empty(), "a refused resume started a router");

    let out = h.meshnet_env(&["launch", "--resume"], &pw).expect_ok("resume");
    assert_eq!(out.last_line(), Some(name.as_str()));
    let s = h.status_json();
    assert_eq!((s["mtu"].as_u64(), s["nickname"].as_str(), s["password"].as_bool()), (Some(1300), Some("alpha"), Some(true)));

    // A launch that fails once started (its bridge name is the underlay's link)
    // does not replace the options --resume takes: those of the last launch that ran.
    h.meshnet(&["stop"]).expect_ok("stop");
    let out = h.meshnet_env(&["launch", "--bridge", UNDERLAY_IF, "--mtu", "1400"], &pw);
    assert!(!out.ok() && out.all().contains("not a bridge"), "{out}");
    assert!(wait_until(SECS(5), || h.pids().is_empty()), "a failed launch left a router");
    h.meshnet_env(&["launch", "--resume"], &pw).expect_ok("resume after a failed launch");
    let s = h.status_json();
    assert_eq!((s["mtu"].as_u64(), s["bridge"].as_str()), (Some(1300), Some("meshnet")), "resumed the failed launch");
    // --foreground (systemd, containers) records its launch too, once it serves.
    h.meshnet(&["stop"]).expect_ok("stop");
    let fg = h.meshnet_full(&["launch", "--foreground", "--mtu", "1320"], &pw, SECS(4));
    assert!(fg.timed_out, "launch --foreground returned: {fg}");
    assert!(wait_until(SECS(10), || h.pids().is_empty()), "the foreground router did not end");
    std::thread::sleep(SECS(1)); // (killed: its last threads may still hold the port a moment)
    h.meshnet_env(&["launch", "--resume"], &pw).expect_ok("resume after --foreground");
    assert_eq!(h.status_json()["mtu"].as_u64(), Some(1320), "--foreground's launch not recorded");
}

/// The MAC `ip neigh` in `ns` holds for `ip`, if any.
fn neighbour_mac(ns: &str, ip: &str) -> Option<String> {
    let out = exec_in(ns, &["ip", "neigh", "show", "to", ip]).stdout;
    let words: Vec<&str> = out.split_whitespace().collect();
    words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).map(|m| lower(m))
}

/// Two routers, c1 on h1 (10.40.0.1, fd40::1) and c2 on h2 (10.40.0.2,
/// fd40::2) reaching each other over both families; h1's peer name last.
fn dual_stack_pair(lab: &Lab) -> (Host, Host, Container, Container, String) {
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    let n1 = h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    h1.meshnet(&["attach", "10.40.0.1/16", "fd40::1/64", &c1.ns]).expect_ok("attach c1");
    h2.meshnet(&["attach", "10.40.0.2/16", "fd40::2/64", &c2.ns]).expect_ok("attach c2");
    assert_pings(&c1, 2, SECS(30));
    assert!(ping_until(&c1.ns, "fd40::2", SECS(10)), "c1 cannot ping fd40::2");
    (h1, h2, c1, c2, n1)
}

/// The MAC of `c`'s `ethwe`, lower case.
fn ethwe_mac(c: &Container) -> String {
    let ethwe = link(&c.ns, "ethwe").unwrap_or_else(|| panic!("no ethwe in {}: {:#?}", c.ns, links(&c.ns)));
    lower(ethwe["address"].as_str().unwrap_or_default())
}

/// Scenario 10: an address that moves to another namespace (or comes back in a
/// restarted one, with a new MAC) is announced by `attach`: a peer that knew it
/// at the old MAC holds the new one at once (gratuitous ARP for IPv4, unsolicited
/// neighbour advertisement for IPv6), without sending anything or waiting for
/// its entry to time out.
#[test]
fn a_moved_address_is_announced() {
    let Some(lab) = Lab::new("announce") else {
        return;
    };
    let (_h1, h2, c1, c2, _) = dual_stack_pair(&lab);
    let c3 = lab.add_container(&h2, 3);
    let old = ethwe_mac(&c2);
    for ip in ["10.40.0.2", "fd40::2"] {
        assert_eq!(neighbour_mac(&c1.ns, ip).as_deref(), Some(old.as_str()), "c1's neighbour entry for {ip}");
    }

    h2.meshnet(&["detach", &c2.ns]).expect_ok("detach c2");
    h2.meshnet(&["attach", "10.40.0.2/16", "fd40::2/64", &c3.ns]).expect_ok("attach c2's addresses to c3");
    let new = ethwe_mac(&c3);
    assert_ne!(old, new);
    for ip in ["10.40.0.2", "fd40::2"] {
        let mut seen = None;
        let moved = wait_until(SECS(2), || {
            seen = neighbour_mac(&c1.ns, ip);
            seen.as_deref() == Some(new.as_str())
        });
        assert!(moved, "c1 still maps {ip} to {seen:?}, not to c3's {new}: the move was not announced");
    }
    // And the address works at once (c1's old entry would have sent to c2's MAC).
    assert!(ping(&c1.ns, "10.40.0.2", 1), "c1 cannot ping 10.40.0.2 in c3 right after the move");
    assert!(ping_until(&c1.ns, "fd40::2", SECS(3)), "c1 cannot ping fd40::2 in c3 right after the move");
}

/// Scenario 11: a target whose interface was re-made while its router was down
/// (a container restarted meanwhile: a new veth, a new MAC) is announced again
/// once the router is back in the mesh, not only at the re-attach on launch,
/// which comes before any connection: a remote peer holds the new MAC at once.
#[test]
fn a_reattached_target_is_announced_to_the_mesh() {
    let Some(lab) = Lab::new("reannounce") else {
        return;
    };
    let (_h1, h2, c1, c2, n1) = dual_stack_pair(&lab);
    let old = ethwe_mac(&c2);

    h2.meshnet(&["stop"]).expect_ok("stop h2");
    assert!(wait_until(SECS(10), || h2.pids().is_empty()), "h2 did not stop");
    exec_in(&c2.ns, &["ip", "link", "del", "ethwe"]).expect_ok("delete c2's ethwe while h2 is down");
    h2.launch(&[]);
    assert!(wait_until(SECS(20), || established_with(&h2.status_json(), &n1)), "h2 did not reconnect to h1");
    let new = ethwe_mac(&c2);
    assert_ne!(old, new, "the re-attach kept the old MAC");
    for ip in ["10.40.0.2", "fd40::2"] {
        let mut seen = None;
        let moved = wait_until(SECS(3), || {
            seen = neighbour_mac(&c1.ns, ip);
            seen.as_deref() == Some(new.as_str())
        });
        assert!(moved, "c1 still maps {ip} to {seen:?}, not to c2's new {new}: not announced once h2 was back");
    }
}

/// Scenario 12: a peer named by two connect targets (a host with two addresses;
/// likewise its IPv4 and IPv6 addresses, or a host name and its IP). The dial of
/// the second reaches a peer already connected: it is the duplicate, at once and
/// at every later redial (about a minute apart), and the live connection stays.
/// It used to be replaced at each redial, the peer dropping out of the topology
/// and its data waiting for fresh UDP heartbeats every time.
#[test]
fn two_targets_for_one_peer_keep_one_connection() {
    let Some(lab) = Lab::new("twotargets") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let second = format!("{}.102", h2.ip.rsplit_once('.').expect("an IPv4 address").0);
    ip(&["-n", &h2.ns, "addr", "add", &format!("{second}/24"), "dev", UNDERLAY_IF]).expect_ok("second address on h2");
    let n2 = h2.launch(&[]);
    h1.launch(&[&h2.ip, &second]);
    assert_eq!(h1.targets().len(), 2, "{:?}", h1.targets());
    assert!(wait_until(SECS(20), || established_with(&h1.status_json(), &n2)), "h1 did not connect to h2");
    // Past the longest wait before a satisfied target is dialled again (60 s + 25 %).
    std::thread::sleep(SECS(80));
    let replaced = |h: &Host| h.log().lines().filter(|l| l.contains("replaced by a newer connection")).count();
    // Both targets are dialled at launch: the second handshake may complete too
    // and be closed at once by h2 as a duplicate ("already connected").
    let made = h1.log().lines().filter(|l| l.contains("established, outbound")).count()
        - h1.log().lines().filter(|l| l.contains("closed: peer said goodbye: already connected")).count();
    assert!(
        replaced(&h1) == 0 && replaced(&h2) == 0 && made == 1,
        "the connection to h2 was replaced ({} times at h1, {} at h2; {made} made by h1):\n{}",
        replaced(&h1),
        replaced(&h2),
        h1.log()
    );
    let s = h1.status_json();
    assert!(established_with(&s, &n2), "{s:#}");
    assert_eq!(connections(&s).len(), 1, "{:?}", connections(&s));
    assert_eq!(h1.targets().len(), 2, "{:?}", h1.targets());
}

/// The MTU of every port of `bridge` in `ns`, and of the bridge itself.
fn bridge_mtus(ns: &str, bridge: &str) -> Vec<(String, u64)> {
    let out = exec_in(ns, &["ip", "-j", "link", "show"]).expect_ok("ip link");
    let all: Vec<Value> = serde_json::from_str(&out.stdout).unwrap_or_default();
    all.iter()
        .filter(|l| l["ifname"] == bridge || l["master"] == bridge)
        .map(|l| (l["ifname"].as_str().unwrap_or("?").to_string(), l["mtu"].as_u64().unwrap_or(0)))
        .collect()
}

/// Scenario 13: a router stopped and launched again with another `--mtu` on its own bridge:
/// the bridge and the interfaces attached before take the new MTU, as new ones
/// do, so a full-size frame between an old and a new container is not dropped
/// by the bridge.
#[test]
fn a_launch_with_another_mtu_applies_it_to_what_is_attached() {
    let Some(lab) = Lab::new("mtuagain") else { return };
    let h1 = lab.add_host(1);
    let c1 = lab.add_container(&h1, 1);
    h1.launch(&["--mtu", "1300"]);
    attach(&h1, &c1);
    assert_eq!(link(&c1.ns, "ethwe").and_then(|l| l["mtu"].as_u64()), Some(1300));
    h1.meshnet(&["stop"]).expect_ok("stop");
    h1.launch(&["--mtu", "1400"]);
    assert_eq!(h1.status_json()["mtu"].as_u64(), Some(1400));
    let c2 = lab.add_container(&h1, 2);
    attach(&h1, &c2);
    for c in [&c1, &c2] {
        assert_eq!(link(&c.ns, "ethwe").and_then(|l| l["mtu"].as_u64()), Some(1400), "ethwe in {}", c.ns);
    }
    let mtus = bridge_mtus(&h1.ns, "meshnet");
    assert!(mtus.len() >= 4 && mtus.iter().all(|(_, m)| *m == 1400), "bridge and its ports: {mtus:?}");
    // A full-size datagram (DF set) between the container attached before and the new one.
    for (from, to) in [(&c2, 1), (&c1, 2)] {
        let ok = exec_in(&from.ns, &["ping", "-n", "-q", "-M", "do", "-s", "1372", "-c", "3", "-i", "0.2", "-W", "1", &overlay(to)]);
        assert!(ok.ok(), "1400-byte ping from {} to {} lost: {ok}", from.ns, overlay(to));
    }
    // Back to a smaller MTU: nothing keeps the larger one.
    h1.meshnet(&["stop"]).expect_ok("stop");
    h1.launch(&["--mtu", "1280"]);
    let mtus = bridge_mtus(&h1.ns, "meshnet");
    assert!(mtus.iter().all(|(_, m)| *m == 1280), "bridge and its ports: {mtus:?}");
    assert_eq!(link(&c1.ns, "ethwe").and_then(|l| l["mtu"].as_u64()), Some(1280));
}
