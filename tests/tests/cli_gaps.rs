//! The last Weave CLI gaps, end to end: `rmpeer PEER...`, `ps [TARGET...]`,
//! `connect --replace` with no peers, `reset` refused while no router runs
//! (unless `--force`), `launch --log-level`, `report [--json]`, and one
//! namespace attached under two spellings being one target.

use std::time::Duration;

use meshnet_tests::lab::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn cli_gaps_and_report() {
    let Some(lab) = Lab::new("cligaps") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let n1 = h1.launch(&["--log-level", "debug", "--nickname", "one"]);
    let n2 = h2.launch(&[&h1.ip, "--nickname", "two"]);
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h1, 2));
    h1.meshnet(&["attach", "10.40.0.1/16", &c1.ns]).expect_ok("attach c1");
    h1.meshnet(&["attach", "10.40.0.2/16", &c2.ns]).expect_ok("attach c2");
    assert!(
        wait_until(SECS(30), || established_with(&h1.status_json(), &n2)),
        "h1 and h2 did not connect"
    );

    // --log-level debug: debug lines in the log (info is the default).
    assert!(wait_until(SECS(10), || h1.log().contains("DEBUG")), "no DEBUG line in h1's log at --log-level debug");
    assert!(!h2.log().contains("DEBUG"), "h2 logs DEBUG at the default level");

    // ps filters by target; no match lists nothing; no target lists all.
    let all = h1.meshnet(&["ps"]).expect_ok("ps").stdout;
    assert_eq!(all.lines().count(), 2, "{all}");
    let one = h1.meshnet(&["ps", &c2.ns]).expect_ok("ps c2").stdout;
    assert_eq!(one.lines().count(), 1, "{one}");
    assert!(one.starts_with(&c2.ns) && one.contains("10.40.0.2/16"), "{one}");
    let json = h1.meshnet(&["ps", "--json", &c1.ns, &c2.ns]).expect_ok("ps --json").json();
    assert_eq!(json.as_array().map(|a| a.len()), Some(2));
    let none = h1.meshnet(&["ps", "no-such-target"]).expect_ok("ps no-such-target").stdout;
    assert!(none.trim().is_empty(), "{none}");
    // ...under any spelling of the namespace: its path, a PID in it, /proc/PID/ns/net.
    let sleeper = lab.spawn_in(&c2.ns, &["sleep", "60"]);
    std::thread::sleep(Duration::from_millis(300));
    let pid = sleeper.pid().expect("the sleeper in c2 runs").to_string();
    for spelling in [format!("/run/netns/{}", c2.ns), pid.clone(), format!("/proc/{pid}/ns/net")] {
        let out = h1.meshnet(&["ps", &spelling]).expect_ok("ps by another spelling").stdout;
        assert!(out.lines().count() == 1 && out.starts_with(&c2.ns), "ps {spelling}: {out}");
    }
    drop(sleeper);
    // A namespace that exists but is not attached lists nothing either.
    let spare = lab.add_container(&h1, 9);
    let out = h1.meshnet(&["ps", &spare.ns]).expect_ok("ps of an unattached namespace").stdout;
    assert!(out.trim().is_empty(), "{out}");

    // report: everything in one document; text and JSON.
    // (Routes follow the connection within ~100 ms.)
    let mut report = serde_json::Value::Null;
    wait_until(SECS(10), || {
        report = h1.meshnet(&["report", "--json"]).expect_ok("report --json").json();
        report["routes"].as_array().is_some_and(|r| !r.is_empty())
    });
    assert_eq!(report["router"]["name"], n1.as_str());
    assert_eq!(report["peers"].as_array().map(|a| a.len()), Some(2), "{report:#}");
    assert_eq!(report["routes"][0]["peer"], n2.as_str());
    assert_eq!(report["routes"][0]["route"], "direct");
    assert_eq!(report["attachments"].as_array().map(|a| a.len()), Some(2));
    assert!(report["mac_table"]["entries"].as_u64().is_some());
    assert!(report["ipam"]["range"].is_string());
    assert!(report["traffic"][0]["sent_bytes"].as_u64().unwrap_or(0) > 0, "{:#}", report["traffic"]);
    assert!(report["dataplane"]["udp_datagrams_out"].as_u64().unwrap_or(0) > 0);
    let text = h1.meshnet(&["report"]).expect_ok("report").stdout;
    for part in ["Router", "Peers", "Connections", "Routes", "MAC table", "IPAM", "Attachments", "DNS", "Traffic per peer", "Data plane", "Limits", "Control", "Trust"] {
        assert!(text.contains(part), "report lacks {part}:\n{text}");
    }

    // One namespace under two spellings (its name, then its path) is one target:
    // attaching it again by path adds no address, and a detach by path frees
    // in IPAM what was allocated for it by name.
    let c3 = lab.add_container(&h1, 3);
    // c3's allocations (c1's and c2's addresses are in the lab's range too), under any key.
    let allocations = |h: &Host| -> Vec<serde_json::Value> {
        let all = h.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json()["allocations"].clone();
        all.as_array().into_iter().flatten().filter(|a| a["target"].as_str().is_some_and(|t| t.contains(&c3.ns))).cloned().collect()
    };
    let first = h1.meshnet(&["attach", &c3.ns]).expect_ok("attach c3 by name").stdout.trim().to_string();
    let path = format!("/var/run/netns/{}", c3.ns);
    let again = h1.meshnet(&["attach", &path]).expect_ok("attach c3 by path").stdout.trim().to_string();
    assert_eq!(again, first, "attaching c3 again by its path gave it another address");
    assert_eq!(allocations(&h1).len(), 1, "{:?}", allocations(&h1));
    h1.meshnet(&["detach", &path]).expect_ok("detach c3 by path");
    assert!(link(&c3.ns, "ethwe").is_none(), "ethwe left in c3");
    assert_eq!(allocations(&h1), Vec::<serde_json::Value>::new(), "detach left addresses allocated");

    // connect --replace with no peers clears the targets; without --replace a peer is needed.
    assert_eq!(h2.targets().len(), 1);
    let bad = h2.meshnet(&["connect"]);
    assert!(!bad.ok(), "connect with no peer and no --replace succeeded: {bad}");
    assert_eq!(h2.targets().len(), 1, "a refused connect changed the targets");
    h2.meshnet(&["connect", "--replace"]).expect_ok("connect --replace");
    assert!(h2.targets().is_empty(), "targets left: {:?}", h2.targets());

    // rmpeer of a live peer is refused, naming it once (not `rmpeer X: rmpeer X: ...`).
    let live = h1.meshnet(&["rmpeer", &n2]);
    assert!(!live.ok() && live.stderr.contains("reachable"), "rmpeer of a live peer: {live}");
    assert_eq!(live.stderr.matches(&format!("rmpeer {n2}:")).count(), 1, "{live}");

    // rmpeer takes several peers; an unknown one fails alone, the others are done.
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    let out = h1.meshnet(&["rmpeer", &n2, "nosuchpeer"]);
    assert!(!out.ok(), "rmpeer with an unknown peer reported success: {out}");
    assert!(out.stdout.contains(&n2), "rmpeer did not report {n2}: {out}");
    assert!(out.stderr.contains("nosuchpeer"), "rmpeer did not say which failed: {out}");

    // reset with no router: refused, saying why, and nothing is removed; --force removes.
    h1.meshnet(&["stop"]).expect_ok("stop h1");
    let refused = h1.meshnet(&["reset"]);
    assert!(!refused.ok(), "reset without a router succeeded: {refused}");
    assert!(refused.stderr.contains("address ranges") && refused.stderr.contains("--force"), "{refused}");
    assert!(h1.state_dir.exists(), "a refused reset removed the state directory");
    assert!(link(&h1.ns, "meshnet").is_some(), "a refused reset removed the bridge");
    h1.meshnet(&["reset", "--force"]).expect_ok("reset --force");
    assert!(!h1.state_dir.exists(), "reset --force left the state directory");
    assert!(link(&h1.ns, "meshnet").is_none(), "reset --force left the bridge");
}

/// The inode of a network namespace is reused by the kernel once the namespace
/// is gone. A process attached by PID that exits, and a new process whose new
/// namespace got the old one's inode, attached by its own PID, is a new target:
/// `ps` shows it (with its MAC and its address only), not the dead one, and the
/// log says the dead one's inode was reused (or that it was gone, when the
/// router's periodic check forgot it first).
#[test]
fn a_reused_namespace_inode_is_a_new_target() {
    let Some(lab) = Lab::new("inodereuse") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&[]);
    let netns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).map(|p| p.display().to_string()).unwrap_or_default();
    let spawn = || std::process::Command::new("unshare").args(["-n", "sleep", "120"]).spawn().expect("unshare -n sleep");
    for attempt in 1..=8 {
        let mut p1 = spawn();
        std::thread::sleep(Duration::from_millis(200));
        let (pid1, ns1) = (p1.id().to_string(), netns_of(p1.id()));
        h1.meshnet(&["attach", "10.99.0.1/24", &pid1]).expect_ok("attach p1 by PID");
        let _ = p1.kill();
        let _ = p1.wait();
        // The namespace is freed a moment after its last process (a kernel work queue).
        std::thread::sleep(SECS(2));
        let mut p2 = spawn();
        std::thread::sleep(Duration::from_millis(200));
        let (pid2, ns2) = (p2.id().to_string(), netns_of(p2.id()));
        if ns1 != ns2 {
            eprintln!("attempt {attempt}: {ns1} not reused ({ns2}); again");
            let _ = p2.kill();
            let _ = p2.wait();
            h1.meshnet(&["detach", &pid1]).expect_ok("detach the dead p1");
            continue;
        }
        eprintln!("attempt {attempt}: {pid2} got {pid1}'s namespace inode {ns2}");
        h1.meshnet(&["attach", "10.99.0.2/24", &pid2]).expect_ok("attach p2 by PID");
        let ps = h1.ps_json();
        let _ = p2.kill();
        let _ = p2.wait();
        assert!(!ps.iter().any(|e| e["target"] == pid1.as_str()), "ps still lists the dead {pid1}: {ps:#?}");
        let e = ps.iter().find(|e| e["target"] == pid2.as_str()).unwrap_or_else(|| panic!("ps does not list {pid2}: {ps:#?}"));
        assert!(is_mac(e["mac"].as_str().unwrap_or_default()), "{pid2} has no MAC in ps: {ps:#?}");
        assert_eq!(e["addresses"], serde_json::json!(["10.99.0.2/24"]), "{ps:#?}");
        // The log says what happened to p1's attachment, not just "gone"
        // (unless the router's check, every 10 s, forgot it before p2 came).
        let log = h1.log();
        let said = format!("forgetting {pid1} (10.99.0.1/24): its namespace is gone and the kernel reused its inode number");
        let swept = format!("forgetting {pid1} (10.99.0.1/24): its namespace is gone (/proc/{pid1}/ns/net no longer exists)");
        assert!(
            (log.contains(&said) && log.contains(&format!("for the namespace of {pid2}"))) || log.contains(&swept),
            "no {said:?} in the log:\n{log}"
        );
        return;
    }
    eprintln!("the kernel never reused a namespace inode in 8 attempts: nothing checked");
}

/// A namespace deleted without `detach` leaves nothing behind once meshnet
/// forgets it: neither its IPAM address nor its DNS records. It is forgotten
/// when a new namespace gets its inode (attached while the router runs) and at
/// a restart; both used to drop only the attachment, so the address stayed
/// allocated until a restart and the DNS name answered forever, on every router.
#[test]
fn a_deleted_namespace_leaves_no_address_or_name() {
    let Some(lab) = Lab::new("nsgone") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&[]);
    let inode = |ns: &str| std::fs::metadata(format!("/run/netns/{ns}")).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
    let allocated = |h: &Host| h.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json()["allocations"].to_string();
    let names = |h: &Host| h.meshnet(&["status", "dns", "--json"]).expect_ok("status dns").json()["records"].to_string();
    // Attached with an IPAM address and a name, then deleted without detach.
    let add_dead = |j: u8| {
        let c = lab.add_container(&h1, j);
        h1.meshnet(&["attach", &c.ns]).expect_ok("attach");
        h1.meshnet(&["dns-add", &c.ns, "-h", &format!("dead{j}")]).expect_ok("dns-add");
        let ino = inode(&c.ns);
        ip(&["netns", "del", &c.ns]).expect_ok("netns del");
        // The namespace is freed a moment later (a kernel work queue).
        std::thread::sleep(SECS(1));
        (c.ns, ino)
    };
    // While the router runs: the next namespace got the dead one's inode.
    let mut checked = false;
    for j in 1..=8u8 {
        let (dead, ino) = add_dead(2 * j);
        let c = lab.add_container(&h1, 2 * j + 1);
        if inode(&c.ns) != ino {
            eprintln!("attempt {j}: inode {ino} of {dead} not reused; again");
            h1.meshnet(&["detach", &dead]).expect_ok("detach the dead namespace");
            continue;
        }
        h1.meshnet(&["attach", &c.ns]).expect_ok("attach the namespace with the reused inode");
        let (a, n) = (allocated(&h1), names(&h1));
        assert!(!a.contains(&format!("netns:{dead}\"")), "{dead}'s address is still allocated: {a}");
        assert!(!n.contains(&format!("dead{}", 2 * j)), "{dead}'s DNS record is still there: {n}");
        assert!(a.contains(&format!("netns:{}\"", c.ns)), "{a}");
        h1.meshnet(&["detach", &c.ns]).expect_ok("detach");
        checked = true;
        break;
    }
    if !checked {
        eprintln!("the kernel never reused a namespace inode in 8 attempts: not checked while running");
    }
    // While the router runs, with nothing else attached: forgotten within
    // the router's check (10 s), and `detach` of it afterwards is no error.
    let (dead, _) = add_dead(30);
    let forgotten = wait_until(SECS(25), || {
        !allocated(&h1).contains(&format!("netns:{dead}\"")) && !names(&h1).contains("dead30") && !h1.meshnet(&["ps"]).stdout.contains(&dead)
    });
    assert!(forgotten, "{dead}, deleted without detach, still held: {} {} {}", allocated(&h1), names(&h1), h1.meshnet(&["ps"]));
    assert!(h1.log().lines().any(|l| l.contains("forgetting") && l.contains(&dead)), "{}", h1.log());
    h1.meshnet(&["detach", &dead]).expect_ok("detach a namespace forgotten already");
    // Across a restart.
    let (dead, _) = add_dead(40);
    h1.meshnet(&["stop"]).expect_ok("stop");
    h1.meshnet(&["launch", "--resume"]).expect_ok("launch --resume");
    let (a, n) = (allocated(&h1), names(&h1));
    assert!(!a.contains(&format!("netns:{dead}\"")), "{dead}'s address is still allocated after a restart: {a}");
    assert!(!n.contains("dead40"), "{dead}'s DNS record is still there after a restart: {n}");
    let lookup = h1.meshnet(&["dns-lookup", "dead40"]);
    assert!(lookup.stdout.trim().is_empty(), "{lookup}");
}

/// A command whose reader has gone (`meshnet status | head -1`) ends quietly,
/// as any Unix tool does (SIGPIPE), and does not panic in `println!`.
#[test]
fn output_into_a_closed_pipe_is_no_crash() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    let Some(lab) = Lab::new("clipipe") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&[]);
    let c1 = lab.add_container(&h1, 1);
    h1.meshnet(&["attach", "10.40.0.1/16", &c1.ns]).expect_ok("attach c1");
    for args in [&["status"][..], &["status", "--json"], &["ps"], &["report"], &["dns-add", &c1.ns, "-h", "c1"], &["dns-lookup", "c1"]] {
        // stdout: a pipe nobody reads (its read end closed before the command starts).
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { libc::close(fds[0]) };
        let write_end = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        let out = Command::new("ip")
            .args(["netns", "exec", &h1.ns])
            .arg(meshnet_bin())
            .args(args)
            .env("MESHNET_STATE_DIR", &h1.state_dir)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .expect("run meshnet");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "meshnet {args:?} into a closed pipe panicked: {stderr}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "meshnet {args:?} into a closed pipe: {:?}, stderr: {stderr}",
            out.status
        );
    }
    // The commands did their work before their output was lost.
    assert_eq!(h1.meshnet(&["dns-lookup", "c1"]).expect_ok("dns-lookup").stdout.trim(), "10.40.0.1");
}

/// `--nickname` with a control character (it would break every router's
/// line-oriented status) is refused naming it, and nothing starts; an empty
/// one is the host name.
#[test]
fn a_nickname_with_control_characters_is_refused_and_an_empty_one_is_the_host_name() {
    let Some(lab) = Lab::new("clinick") else { return };
    let h1 = lab.add_host(1);
    for bad in ["two\nlines", "tab\there"] {
        let out = h1.meshnet(&["launch", "--nickname", bad]);
        assert!(!out.ok() && out.stderr.contains("--nickname") && out.stderr.contains("control characters"), "{out}");
        assert!(h1.pids().is_empty(), "a refused launch left a router");
    }
    // An empty one (`--nickname "$NICK"`, NICK unset) is the host name, as
    // without the option: it was taken as "", and peers showed "name()".
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for blank in ["", "  "] {
        h1.launch(&["--nickname", blank]);
        assert_eq!(h1.status_json()["nickname"], host_name.as_str(), "--nickname {blank:?}");
        h1.meshnet(&["stop"]).expect_ok("stop");
    }
    h1.launch(&["--nickname", "quote\"and\\backslash are fine"]);
    assert_eq!(h1.status_json()["nickname"], "quote\"and\\backslash are fine");
}

/// `rmpeer NICKNAME` finds a dead peer: the one case it is for. The topology
/// forgets a peer as soon as it is unreachable, and with it its nickname, so
/// `rmpeer two` said "unknown peer" once `two` had gone (its name still worked).
#[test]
fn rmpeer_by_the_nickname_of_a_dead_peer() {
    let Some(lab) = Lab::new("rmpeernick") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    h1.launch(&["--nickname", "one"]);
    let n2 = h2.launch(&[&h1.ip, "--nickname", "two"]);
    let c2 = lab.add_container(&h2, 2);
    // The ring is agreed by the two (consensus=2): h2 owns part of it.
    h2.meshnet(&["attach", &c2.ns]).expect_ok("attach c2 from IPAM");
    let owners = |h: &Host| -> Vec<String> {
        let v = h.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
        v["owners"].as_array().into_iter().flatten().filter_map(|o| o["peer"].as_str().map(str::to_string)).collect()
    };
    assert!(wait_until(SECS(10), || owners(&h1).contains(&n2)), "h1's ring has no space of h2: {:?}", owners(&h1));
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    // Gone from the topology and its connection closed: rmpeer refuses a peer
    // with an established connection, which can outlive its topology entry
    // for a moment after the goodbye.
    assert!(
        wait_until(SECS(20), || {
            let s = h1.status_json();
            !peer_names(&s).contains(&n2) && !connections(&s).iter().any(|c| c["peer"] == n2.as_str())
        }),
        "h1 still has h2 in its topology or a connection to it: {:#}",
        h1.status_json()
    );
    let out = h1.meshnet(&["rmpeer", "two"]);
    assert!(out.ok() && out.stdout.contains(&n2), "rmpeer two (dead): {out}");
    assert!(!owners(&h1).contains(&n2), "h2 still owns space after rmpeer: {:?}", owners(&h1));
    // A nickname nobody had is still refused.
    let bad = h1.meshnet(&["rmpeer", "three"]);
    assert!(!bad.ok() && bad.stderr.contains("unknown peer"), "{bad}");
}

/// The state directory deleted under a running router: a new `launch` fails
/// naming the process that holds the ports, and makes no identity of its own
/// there (it would have outlived the launch and renamed this host once the old
/// router stopped).
#[test]
fn launch_over_a_router_whose_state_directory_was_deleted() {
    let Some(lab) = Lab::new("stategone") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&[]);
    let pid = router_pid(&h1);
    std::fs::remove_dir_all(&h1.state_dir).expect("remove the state directory");
    let out = h1.meshnet(&["launch"]);
    assert!(!out.ok(), "a second router launched beside the first: {out}");
    assert!(out.all().contains("Address already in use") && out.all().contains(&format!("kill {pid}")), "{out}");
    assert!(!h1.state_dir.join("identity").exists(), "the failed launch made an identity: {out}");
    assert!(h1.pids().contains(&pid), "the running router is gone");
    // Stopped as told, a launch starts (with a new identity: the old one is gone).
    std::fs::write(h1.state_dir.join("meshnet.pid"), format!("{pid}\n")).unwrap();
    kill9(&h1);
    h1.launch(&[]);
    assert!(h1.state_dir.join("identity").exists());
}

/// An explicit `--docker-plugin-dir` the plugin cannot be served in (not
/// makeable; a socket path over 107 bytes) fails the launch, changing
/// nothing, instead of starting a router without the plugin it was asked for.
#[test]
fn an_unusable_docker_plugin_dir_fails_the_launch() {
    let Some(lab) = Lab::new("plugindir") else { return };
    let h1 = lab.add_host(1);
    for dir in [
        "/proc/meshnet-no-such-dir/plugins".to_string(),
        format!("/tmp/meshnet-plugin-{}-{}", std::process::id(), "a".repeat(100)),
    ] {
        let out = h1.meshnet(&["launch", "--docker-plugin-dir", &dir]);
        if out.ok() {
            h1.meshnet(&["reset"]);
        }
        assert!(!out.ok(), "launch with an unusable --docker-plugin-dir {dir} succeeded: {out}");
        assert!(out.stderr.contains("--docker-plugin-dir"), "{out}");
        assert!(!h1.meshnet(&["status"]).ok(), "a router runs after the refused launch");
        assert!(!h1.state_dir.exists(), "the refused launch made the state directory");
        assert!(!std::path::Path::new(&dir).exists(), "the refused launch made {dir}");
    }
}

/// A `--dns-listen-address` the server cannot bind (no address of this host)
/// is named by `status dns` (text and JSON), `report` and `dns-args`, not
/// blamed on a missing `expose`.
#[test]
fn a_dns_listen_address_that_cannot_be_bound_is_named() {
    let Some(lab) = Lab::new("dnslisten") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&["--dns-listen-address", "10.9.9.9"]);
    let mut text = String::new();
    let named = wait_until(SECS(10), || {
        text = h1.meshnet(&["status", "dns"]).expect_ok("status dns").stdout;
        text.contains("cannot listen on 10.9.9.9:53")
    });
    assert!(named && !text.contains("no address exposed"), "status dns:\n{text}");
    let json = h1.meshnet(&["status", "dns", "--json"]).expect_ok("status dns --json").json();
    assert!(json["listen"].is_null(), "{json:#}");
    assert!(json["listen_error"].as_str().is_some_and(|e| e.contains("10.9.9.9:53")), "{json:#}");
    let report = h1.meshnet(&["report"]).expect_ok("report").stdout;
    assert!(report.contains("cannot listen on 10.9.9.9:53"), "{report}");
    let args = h1.meshnet(&["dns-args"]);
    assert!(!args.ok() && args.stderr.contains("cannot listen on 10.9.9.9:53"), "{args}");
    // Counters by reason list every reason from the start, at 0, so a reader
    // of the JSON finds each key before anything was refused (they were empty
    // maps until a first refusal).
    for k in ["sets_rejected", "sets6_rejected"] {
        let why = json["counters"][k].as_object().unwrap_or_else(|| panic!("no {k}: {json:#}"));
        let keys: Vec<&str> = why.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["bad_signature", "malformed", "other_domain", "own", "removed_owner", "unknown_owner"], "{k}");
        assert!(why.values().all(|n| n == 0), "{json:#}");
    }
    let trust = &h1.status_json()["trust"]["gossip_rejected"];
    for reason in ["malformed", "version", "bad_binding", "key_conflict", "bad_signature", "full", "revoked", "oversize"] {
        assert_eq!(trust[reason], 0, "trust.gossip_rejected.{reason}: {trust}");
    }
}

/// `prime --timeout` of the largest number waits rather than panicking.
#[test]
fn prime_with_the_largest_timeout() {
    let Some(lab) = Lab::new("primemax") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&[]);
    // Consensus of one: agreed at once; the timeout is never reached.
    let prime = h1.meshnet(&["prime", "--timeout", &u64::MAX.to_string()]);
    assert!(prime.ok(), "prime --timeout {}: {prime}", u64::MAX);
}

/// An IPv4-mapped `connect` target is the IPv4 host it names (so an IPv4-only
/// router dials it, and `forget` of that host removes it); a second `reset`
/// has nothing to do and succeeds, saying so.
#[test]
fn a_mapped_target_and_a_second_reset() {
    let Some(lab) = Lab::new("mappedreset") else { return };
    let h1 = lab.add_host(1);
    h1.launch(&[]);
    let mapped = format!("::ffff:{}", lab.host_ip(2));
    let plain = format!("{}:6783", lab.host_ip(2));
    let out = h1.meshnet(&["connect", &mapped]).expect_ok("connect an IPv4-mapped address");
    assert_eq!(out.stdout.trim(), plain, "{out}");
    assert_eq!(h1.targets(), vec![plain.clone()]);
    h1.meshnet(&["forget", &lab.host_ip(2)]).expect_ok("forget it by its IPv4 address");
    assert!(h1.targets().is_empty(), "{:?}", h1.targets());

    h1.meshnet(&["reset"]).expect_ok("reset");
    assert!(!h1.state_dir.exists());
    let again = h1.meshnet(&["reset"]);
    assert!(again.ok() && again.stderr.contains("nothing to reset"), "a second reset: {again}");
    assert!(!h1.state_dir.exists(), "a second reset made the state directory");
}

/// A launch with another `--bridge` than the last, while a target is attached
/// to the last one, is refused and changes nothing: it started the router on
/// the new bridge with the container cut off from the overlay (its re-attach
/// failed, in the log only) and the old bridge left behind.
#[test]
fn another_bridge_while_targets_are_attached_is_refused() {
    let Some(lab) = Lab::new("bridgemove") else { return };
    let h1 = lab.add_host(1);
    let c1 = lab.add_container(&h1, 1);
    let name = h1.launch(&[]);
    h1.meshnet(&["attach", "10.40.0.1/16", &c1.ns]).expect_ok("attach c1");
    h1.meshnet(&["stop"]).expect_ok("stop");
    let out = h1.meshnet(&["launch", "--bridge", "mnother"]);
    if out.ok() {
        h1.meshnet(&["stop"]);
    }
    assert!(!out.ok(), "launch on another bridge with c1 attached to meshnet succeeded: {out}");
    assert!(out.stderr.contains("--bridge meshnet"), "{out}");
    assert!(link(&h1.ns, "mnother").is_none(), "the refused launch made the bridge");
    // The same launch as before starts, with c1 where it was.
    assert_eq!(h1.launch(&[]), name);
    let ps = h1.ps_json();
    assert!(ps.len() == 1 && ps[0]["addresses"][0] == "10.40.0.1/16", "{ps:?}");
    let veth = links(&h1.ns).into_iter().find(|l| l["master"] == "meshnet" && l["ifname"] != "meshnet-tap");
    assert!(veth.is_some(), "c1's veth is not on meshnet: {:?}", links(&h1.ns));
}

/// `MESHNET_LOG` that names no level is refused at launch, as such a
/// `--log-level` is (it was silently `info`); `--log-level` given wins.
#[test]
fn a_meshnet_log_that_names_no_level_is_refused() {
    let Some(lab) = Lab::new("logenv") else { return };
    let h1 = lab.add_host(1);
    let out = h1.meshnet_env(&["launch"], &[("MESHNET_LOG", "loud")]);
    if out.ok() {
        h1.meshnet(&["stop"]);
    }
    assert!(!out.ok() && out.stderr.contains("MESHNET_LOG=loud"), "{out}");
    assert!(!h1.state_dir.exists(), "the refused launch made the state directory");
    h1.launch_env(&["--log-level", "info"], &[("MESHNET_LOG", "loud")]);
    h1.meshnet(&["stop"]).expect_ok("stop");
    assert!(!h1.log().contains("DEBUG"), "DEBUG lines at --log-level info");
    h1.launch_env(&[], &[("MESHNET_LOG", "DEBUG")]);
    assert!(wait_until(SECS(10), || h1.log().contains("DEBUG")), "MESHNET_LOG=DEBUG logged no DEBUG line");
}

/// A connect target that is this router's own address (`launch host1 host2
/// host3` run on every host names the host itself too) is listed as Weave did,
/// `failed`, `cannot connect to ourselves; retry: never`: it was redialled
/// every minute and never listed. A second host launched with a copy of this
/// router's state directory (same name and key, another run) is refused on
/// both sides, naming the copy: it was taken for a connection to ourselves and
/// dropped in silence, so the two hosts never met and nothing said why.
#[test]
fn our_own_address_and_a_copied_identity_are_named() {
    let Some(lab) = Lab::new("selfconn") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2);
    h1.launch(&[&h1.ip]);
    h1.meshnet(&["connect", "127.0.0.1"]).expect_ok("connect 127.0.0.1");
    let ourselves = |c: &serde_json::Value| c["state"] == "failed" && c["info"] == "cannot connect to ourselves; retry: never";
    let mut status = serde_json::Value::Null;
    let listed = wait_until(SECS(10), || {
        status = h1.status_json();
        ["127.0.0.1", h1.ip.as_str()].iter().all(|ip| connections_to(&status, ip).iter().any(ourselves))
    });
    assert!(listed, "{:#?}", connections(&status));
    let text = h1.meshnet(&["status", "connections"]).expect_ok("status connections").stdout;
    assert!(text.contains("cannot connect to ourselves; retry: never"), "{text}");
    // Asked again, it is dialled once more and found to be ourselves again.
    h1.meshnet(&["connect", &h1.ip]).expect_ok("connect again");
    assert!(wait_until(SECS(10), || connections_to(&h1.status_json(), &h1.ip).iter().any(ourselves)));

    // h2 runs with a copy of h1's state directory.
    h1.meshnet(&["forget", &h1.ip, "127.0.0.1"]).expect_ok("forget");
    h1.meshnet(&["stop"]).expect_ok("stop");
    let copy = std::process::Command::new("cp").arg("-a").arg(&h1.state_dir).arg(&h2.state_dir).status().unwrap();
    assert!(copy.success());
    h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    let mut info = String::new();
    let refused = wait_until(SECS(15), || {
        let c = connections_to(&h2.status_json(), &h1.ip);
        info = format!("{c:?}");
        c.iter().any(|c| c["state"] == "retrying" && c["info"].as_str().is_some_and(|i| i.contains("runs with this router's own identity") && i.contains("reset --force")))
    });
    assert!(refused, "h2: {info}");
    for h in [&h1, &h2] {
        assert!(h.log().contains("runs with this router's own identity"), "{}'s log says nothing of the copy", h.ns);
    }

    // Both meet a third router: it took the copy's connection as the peer's
    // restart, dropping h1's; when h1 comes back (in a minute, or asked
    // again), its incarnation is one that was replaced, so it is refused
    // instead of dropping the copy's in turn, for ever.
    h2.meshnet(&["forget", &h1.ip]).expect_ok("forget");
    let h3 = lab.add_host(3);
    h3.launch(&[]);
    h1.meshnet(&["connect", &h3.ip]).expect_ok("connect h3");
    let name = h1.status_json()["name"].as_str().unwrap().to_string();
    let from = |h: &Host| connections_to(&h3.status_json(), &h.ip).iter().any(|c| c["peer"] == name.as_str() && c["state"] == "established");
    assert!(wait_until(SECS(15), || from(&h1)), "h3 never connected to h1");
    h2.meshnet(&["connect", &h3.ip]).expect_ok("connect h3 from the copy");
    assert!(wait_until(SECS(15), || from(&h2)), "h3 never took the copy's connection");
    h1.meshnet(&["connect", &h3.ip]).expect_ok("connect h3 again");
    let mut info = String::new();
    let refused = wait_until(SECS(15), || {
        let c = connections_to(&h1.status_json(), &h3.ip);
        info = format!("{c:?}");
        c.iter().any(|c| c["state"] == "retrying" && c["info"].as_str().is_some_and(|i| i.contains("two routers run with one identity")))
    });
    assert!(refused, "h1: {info}");
    assert!(h3.log().contains("two routers run with one identity"), "h3's log says nothing");
    assert!(from(&h2) && !from(&h1), "h3 swapped the copy's connection for h1's");
}
