//! Upgrades as a Weave user does them, with real routers in namespaces: one
//! host at a time, so a mesh mixes a router of the previous build
//! (`$MESHNET_OLD_BIN`) with routers of this one for a while, and a state
//! directory written by the previous build is resumed by this one. The tests
//! are skipped (saying so) without `MESHNET_OLD_BIN`; see README, Development.
//!
//! `a_mesh_mixing_the_previous_build_and_this_one`: a chain h1 (this build) —
//! h2 (previous) — h3 (this build) with a password and without discovery, so
//! h1 and h3 reach each other only through the old router: pings both ways
//! between every pair of containers, IPAM addresses unique across the three,
//! names registered on each router resolve on the others (and through the old
//! router's DNS server), every status sane, no connection closed meanwhile.
//!
//! `state_of_the_previous_build_resumes`: h1 and h3 run the previous build,
//! h2 this one; h1 attaches containers (IPAM and explicit addresses),
//! exposes, registers names and adds a connect target; then h1 is stopped and
//! h3 killed with SIGKILL, and both are started by this build (h1 with
//! `launch --resume`, h3 with its old command line): the same peer name,
//! targets, attachments, addresses, exposed addresses, DNS names and IPAM
//! ranges; new allocations on every host are unique; the containers ping each
//! other across.
//!
//! `rmpeer_between_builds`: routers of each build remove a dead router of the
//! other (`rmpeer`); every live router sees both takeovers, and the two left
//! hand out the whole range, each address once.
//!
//! `this_cli_with_a_router_of_the_previous_build`: the binary replaced while
//! the old router still runs. This build's CLI drives it (`attach`, `ps
//! TARGET`, `stop`), but refuses, changing nothing, the options it would
//! ignore (`attach --without-dns`, `--rewrite-hosts` of a Docker container);
//! once the router is restarted with this build they work. Needs a Docker
//! Engine (skipped otherwise, saying so).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const RANGE: &str = "10.48.0.0/16";
const RANGE6: &str = "fd48::/64";

/// `$MESHNET_OLD_BIN`, or `None` after saying the test is skipped.
fn old_bin() -> Option<PathBuf> {
    match std::env::var_os("MESHNET_OLD_BIN") {
        Some(b) => {
            eprintln!("previous build: {}", std::path::Path::new(&b).display());
            Some(b.into())
        }
        None => {
            eprintln!("skipped: set MESHNET_OLD_BIN to a meshnet binary of the previous build (see README, Development)");
            None
        }
    }
}

fn ip_of(cidr: &str) -> String {
    cidr.split('/').next().unwrap_or(cidr).to_string()
}

/// The address of the given family among `attach`'s.
#[track_caller]
fn of_family(addrs: &[String], v6: bool) -> String {
    let ip = addrs.iter().map(|a| ip_of(a)).find(|a| a.contains(':') == v6);
    ip.unwrap_or_else(|| panic!("no {} address in {addrs:?}", if v6 { "IPv6" } else { "IPv4" }))
}

fn established(h: &Host) -> usize {
    connections(&h.status_json()).iter().filter(|c| c["state"] == "established").count()
}

/// `attach ARGS... c` on `h`, which must succeed: the addresses it printed.
#[track_caller]
fn attach(h: &Host, c: &Container, args: &[&str]) -> Vec<String> {
    let mut a = vec!["attach"];
    a.extend_from_slice(args);
    a.push(&c.ns);
    let out = h.meshnet_full(&a, &[], SECS(60)).expect_ok(&format!("attach {args:?} {} on {}", c.ns, h.ns));
    let addrs: Vec<String> = out.last_line().unwrap_or_default().split_whitespace().map(str::to_string).collect();
    assert!(!addrs.is_empty(), "attach printed no address: {out}");
    eprintln!("attach {args:?} {} on {}: {addrs:?}", c.ns, h.ns);
    addrs
}

/// `(target, address)` of every address in `ps`.
#[track_caller]
fn ps(h: &Host) -> BTreeSet<(String, String)> {
    h.ps_json()
        .iter()
        .flat_map(|e| {
            let t = e["target"].as_str().unwrap_or("?").to_string();
            e["addresses"].as_array().cloned().unwrap_or_default().into_iter().map(move |a| (t.clone(), a.as_str().unwrap_or("?").to_string()))
        })
        .collect()
}

/// The host's exposed addresses (`status --json`: `exposed`).
fn exposed(h: &Host) -> Vec<String> {
    h.status_json()["exposed"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap_or("?").to_string()).collect()
}

/// Every address of every host's `ps` and exposed addresses, each once:
/// panics naming the holders of one handed out twice. Returns how many.
#[track_caller]
fn assert_unique(hosts: &[&Host]) -> usize {
    let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in hosts {
        let exposed = exposed(h).into_iter().map(|a| ("exposed".to_string(), a));
        for (t, a) in ps(h).into_iter().chain(exposed) {
            by_ip.entry(ip_of(&a)).or_default().push(format!("{t} on {}", h.ns));
        }
    }
    let dups: Vec<String> = by_ip.iter().filter(|(_, v)| v.len() > 1).map(|(ip, v)| format!("{ip}: {}", v.join(", "))).collect();
    assert!(dups.is_empty(), "DUPLICATE ADDRESSES: {dups:#?}\nall: {by_ip:#?}");
    by_ip.len()
}

fn ipam(h: &Host) -> Value {
    h.meshnet(&["status", "ipam", "--json"]).expect_ok(&format!("status ipam on {}", h.ns)).json()
}

/// This router's own ranges and its allocations (`ip -> target`) in `status
/// ipam`, of the IPv4 ring and then of the IPv6 ring (`ipv6`) if there is one.
fn ipam_own(h: &Host, name: &str) -> (Vec<Value>, BTreeMap<String, String>) {
    let v = ipam(h);
    let (mut ranges, mut allocs) = (vec![], BTreeMap::new());
    for ring in [&v, &v["ipv6"]] {
        ranges.push(ring["owners"].as_array().into_iter().flatten().find(|o| o["peer"] == name).map(|o| o["ranges"].clone()).unwrap_or(Value::Null));
        for a in ring["allocations"].as_array().into_iter().flatten() {
            allocs.insert(a["ip"].as_str().unwrap_or("?").to_string(), a["target"].as_str().unwrap_or("?").to_string());
        }
    }
    (ranges, allocs)
}

/// `(name, address)` of the DNS records `owner` holds, as `h` sees them.
fn records(h: &Host, owner: &str) -> BTreeSet<(String, String)> {
    let st = h.meshnet(&["status", "dns", "--json"]).expect_ok("status dns").json();
    st["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["owner"] == owner)
        .map(|r| (r["name"].as_str().unwrap_or("?").to_string(), r["address"].as_str().unwrap_or("?").to_string()))
        .collect()
}

/// `dns-lookup NAME` on `h`: the addresses, one a line (empty when unknown).
fn lookup(h: &Host, name: &str) -> Vec<String> {
    let out = h.meshnet(&["dns-lookup", name]);
    if !out.ok() {
        return vec![];
    }
    let mut v: Vec<String> = out.stdout.split_whitespace().map(str::to_string).collect();
    v.sort();
    v
}

fn dig_short(ns: &str, server: &str, name: &str) -> Vec<String> {
    let at = format!("@{server}");
    let out = exec_in_timeout(ns, &["dig", &at, "+time=4", "+tries=1", "+short", name, "A"], SECS(20));
    out.stdout.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[track_caller]
fn assert_pings(from: &Container, ip: &str) {
    assert!(ping_until(&from.ns, ip, SECS(30)), "{} cannot ping {ip}", from.ns);
    assert!(ping(&from.ns, ip, 3), "{} reached {ip} once, then lost it", from.ns);
}

/// What a router must keep across an upgrade: peer name, targets, `ps`,
/// exposed addresses, its own IPAM ranges and allocations, its own DNS records.
#[derive(Debug, PartialEq)]
struct Kept {
    name: String,
    targets: Vec<String>,
    ps: BTreeSet<(String, String)>,
    exposed: Vec<String>,
    ranges: Vec<Value>,
    allocations: BTreeMap<String, String>,
    records: BTreeSet<(String, String)>,
}

fn kept(h: &Host) -> Kept {
    let name = h.status_json()["name"].as_str().unwrap_or_default().to_string();
    let mut targets = h.targets();
    targets.sort();
    let (ranges, allocations) = ipam_own(h, &name);
    let records = records(h, &name);
    Kept { targets, ps: ps(h), exposed: exposed(h), ranges, allocations, records, name }
}

#[test]
fn a_mesh_mixing_the_previous_build_and_this_one() {
    let Some(old) = old_bin() else { return };
    let Some(lab) = Lab::new("upgrade_mixed") else { return };
    let h1 = lab.add_host(1);
    let h2 = lab.add_host(2).with_bin(old);
    let h3 = lab.add_host(3);
    let opts = ["--no-discovery", "--ipalloc-range", RANGE];
    let pw = [("MESHNET_PASSWORD", "upgrade one host at a time")];
    let n1 = h1.launch_env(&[&opts[..], &[h2.ip.as_str()]].concat(), &pw);
    let n2 = h2.launch_env(&opts, &pw);
    let n3 = h3.launch_env(&[&opts[..], &[h2.ip.as_str()]].concat(), &pw);
    assert!(
        wait_until(SECS(40), || established(&h1) == 1 && established(&h2) == 2 && established(&h3) == 1),
        "no chain: {} {} {}",
        established(&h1),
        established(&h2),
        established(&h3)
    );
    for h in [&h1, &h2, &h3] {
        h.meshnet(&["prime", "--timeout", "30"]).expect_ok(&format!("prime on {}", h.ns));
    }
    let server = ip_of(h2.meshnet(&["expose"]).expect_ok("expose on the old router").last_line().unwrap_or_default());

    // Two containers a host, attached at once on all three: IPAM hands out
    // every address once across both builds.
    let cs: Vec<(Host, Container)> = [&h1, &h2, &h3]
        .iter()
        .flat_map(|h| [((*h).clone(), lab.add_container(h, h.i)), ((*h).clone(), lab.add_container(h, h.i + 10))])
        .collect();
    let addrs: Vec<String> = std::thread::scope(|s| {
        let jobs: Vec<_> = cs.iter().map(|(h, c)| s.spawn(move || ip_of(&attach(h, c, &[])[0]))).collect();
        jobs.into_iter().map(|j| j.join().expect("attach")).collect()
    });
    assert_eq!(assert_unique(&[&h1, &h2, &h3]), 7, "six containers and the exposed address");

    // Data both ways between every pair, h1 <-> h3 relayed by the old router.
    for (i, (_, from)) in cs.iter().enumerate().step_by(2) {
        for (j, to) in addrs.iter().enumerate().step_by(2) {
            if i != j {
                assert_pings(from, to);
            }
        }
    }
    let route13 = connections(&h1.status_json()).into_iter().find(|c| c["peer"] == n3.as_str());
    assert!(route13.as_ref().is_none_or(|c| c["state"] != "established"), "h1 and h3 are connected directly: {route13:?}");

    // Names registered on each router resolve on the others, and through the
    // old router's DNS server.
    for ((h, c), name) in cs.iter().step_by(2).zip(["web", "db", "cache"]) {
        h.meshnet(&["dns-add", &c.ns, "-h", name]).expect_ok(&format!("dns-add {name} on {}", h.ns));
    }
    for (name, addr) in ["web", "db", "cache"].iter().zip(addrs.iter().step_by(2)) {
        for h in [&h1, &h2, &h3] {
            assert!(wait_until(SECS(10), || lookup(h, name) == [addr.clone()]), "{name} on {}: {:?}, want {addr}", h.ns, lookup(h, name));
        }
        let fqdn = format!("{name}.meshnet.local");
        assert_eq!(dig_short(&cs[0].1.ns, &server, &fqdn), [addr.clone()], "{fqdn} at the old router's server, asked from h1's container");
    }
    h3.meshnet(&["dns-remove", &cs[4].1.ns]).expect_ok("dns-remove cache");
    for h in [&h1, &h2] {
        assert!(wait_until(SECS(10), || lookup(h, "cache").is_empty()), "cache still on {}", h.ns);
    }

    // Status on each side: the chain, the others by name, IPAM agreed with
    // nothing dropped for its version, and no connection ever closed.
    for (h, peers) in [(&h1, vec![&n2, &n3]), (&h2, vec![&n1, &n3]), (&h3, vec![&n1, &n2])] {
        let st = h.status_json();
        let known = peer_names(&st);
        for p in peers {
            assert!(known.contains(p), "{} does not know {p}: {known:?}", h.ns);
        }
        let v = ipam(h);
        assert_eq!(v["state"]["agreed"], true, "{}: {v:#}", h.ns);
        let dropped = &v["drops"];
        assert!(
            dropped.as_object().into_iter().flatten().all(|(_, n)| n.as_u64() == Some(0)),
            "{} dropped IPAM input: {dropped}",
            h.ns
        );
        let closed = h.log().lines().filter(|l| l.contains("connection") && l.contains("closed")).map(str::to_string).collect::<Vec<_>>();
        assert!(closed.is_empty(), "{}: connections closed: {closed:#?}", h.ns);
    }
    assert_eq!((established(&h1), established(&h2), established(&h3)), (1, 2, 1));
}

#[test]
fn state_of_the_previous_build_resumes() {
    let Some(old) = old_bin() else { return };
    let Some(lab) = Lab::new("upgrade_state") else { return };
    let (h1new, h2, h3new) = (lab.add_host(1), lab.add_host(2), lab.add_host(3));
    let (h1, h3) = (h1new.clone().with_bin(&old), h3new.clone().with_bin(&old));
    let opts = ["--ipalloc-range", RANGE, "--ipalloc-range", RANGE6];
    h1.launch(&opts);
    h2.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    h3.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    assert!(wait_until(SECS(40), || [&h1, &h2, &h3].iter().all(|h| established(h) == 2)), "no full mesh");
    for h in [&h1, &h2, &h3] {
        h.meshnet(&["prime", "--timeout", "30"]).expect_ok(&format!("prime on {}", h.ns));
    }
    // On h1: an IPAM address, an explicit one in the range and one outside
    // it, the exposed address, names, and a connect target nobody answers.
    let (c1, c2, c3, c4) = (lab.add_container(&h1, 1), lab.add_container(&h1, 2), lab.add_container(&h3, 3), lab.add_container(&h2, 4));
    let a1s = attach(&h1, &c1, &[]);
    let (a1, a1v6) = (of_family(&a1s, false), of_family(&a1s, true));
    attach(&h1, &c2, &["10.48.250.1/16", "10.99.0.1/24"]);
    h1.meshnet(&["expose"]).expect_ok("expose");
    h1.meshnet(&["dns-add", &c1.ns, "-h", "web"]).expect_ok("dns-add web");
    h1.meshnet(&["dns-add", &c2.ns, "-h", "db"]).expect_ok("dns-add db");
    let away = lab.host_ip(77);
    h1.meshnet(&["connect", &away]).expect_ok("connect");
    // On h3: an IPAM address and its name; on h2: one more.
    let a3 = of_family(&attach(&h3, &c3, &[]), false);
    h3.meshnet(&["dns-add", &c3.ns, "-h", "cache"]).expect_ok("dns-add cache");
    let a4 = of_family(&attach(&h2, &c4, &[]), false);
    let (before1, before3) = (kept(&h1), kept(&h3));
    eprintln!("h1 before: {before1:#?}\nh3 before: {before3:#?}");
    assert_eq!((before1.ps.len(), before1.exposed.len()), (4, 2), "c1 (dual-stack), c2 (explicit, two) and exposed (dual-stack): {before1:#?}");
    assert_eq!(before1.records.len(), 4, "web and db, two addresses each: {before1:#?}");
    assert_eq!(before1.ranges.iter().filter(|r| r.is_array()).count(), 2, "both rings: {before1:#?}");

    // h1 stopped and resumed by this build; h3 killed and started by this
    // build with its old command line (a restart policy's way).
    h1.meshnet(&["stop"]).expect_ok("stop h1");
    kill9(&h3);
    assert_eq!(h1new.launch(&["--resume"]), before1.name, "h1's peer name across the upgrade");
    assert_eq!(h3new.launch(&[&opts[..], &[h1.ip.as_str()]].concat()), before3.name, "h3's peer name across the upgrade");
    assert!(wait_until(SECS(40), || [&h1new, &h2, &h3new].iter().all(|h| established(h) == 2)), "no full mesh after the upgrade");
    for (h, before) in [(&h1new, &before1), (&h3new, &before3)] {
        let after = kept(h);
        assert_eq!(&after, before, "{} changed across the upgrade; its log:\n{}", h.ns, h.log());
        let v = ipam(h);
        assert_eq!(v["state"]["agreed"], true, "{}: {v:#}", h.ns);
    }

    // New allocations everywhere are unique, the old ones still in use.
    let (c5, c6, c7) = (lab.add_container(&h1new, 5), lab.add_container(&h2, 6), lab.add_container(&h3new, 7));
    let a5 = of_family(&attach(&h1new, &c5, &[]), false);
    let a6 = of_family(&attach(&h2, &c6, &[]), false);
    let a7 = of_family(&attach(&h3new, &c7, &[]), false);
    assert_eq!(assert_unique(&[&h1new, &h2, &h3new]), 16, "seven containers and h1's exposed address, two addresses each");
    assert_pings(&c1, &a3);
    assert_pings(&c3, &a1);
    assert_pings(&c3, &a1v6);
    assert_pings(&c2, &a4);
    assert_pings(&c4, "10.48.250.1");
    assert_pings(&c5, &a7);
    assert_pings(&c7, &a6);
    assert_pings(&c6, &a5);
    // The names reach the router that never restarted.
    assert!(wait_until(SECS(10), || lookup(&h2, "web") == [a1.clone(), a1v6.clone()]), "web on h2: {:?}", lookup(&h2, "web"));
    assert!(wait_until(SECS(10), || lookup(&h2, "cache").first() == Some(&a3)), "cache on h2: {:?}", lookup(&h2, "cache"));
    assert!(wait_until(SECS(10), || lookup(&h2, "db").len() == 2), "db on h2: {:?}", lookup(&h2, "db"));
}

fn owner_of(h: &Host, peer: &str) -> Option<Value> {
    ipam(h)["owners"].as_array().into_iter().flatten().find(|o| o["peer"] == peer).cloned()
}

/// `rmpeer` across builds: in a mesh of two routers of each build, a router
/// of the previous build removes a dead one of this build, and one of this
/// build a dead one of the previous build; every live router sees each
/// takeover, and the whole range (a /27: 30 addresses) is then handed out by
/// the two left, each address once.
#[test]
fn rmpeer_between_builds() {
    let Some(old) = old_bin() else { return };
    let Some(lab) = Lab::new("upgrade_rmpeer") else { return };
    const SMALL: &str = "10.49.0.0/27";
    let (h1, h3) = (lab.add_host(1), lab.add_host(3));
    let (h2, h4) = (lab.add_host(2).with_bin(&old), lab.add_host(4).with_bin(&old));
    let opts = ["--ipalloc-range", SMALL];
    h1.launch(&opts);
    h2.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    let n3 = h3.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    let n4 = h4.launch(&[&opts[..], &[h1.ip.as_str()]].concat());
    assert!(wait_until(SECS(40), || [&h1, &h2, &h3, &h4].iter().all(|h| established(h) == 3)), "no full mesh");
    for h in [&h1, &h2, &h3, &h4] {
        h.meshnet(&["prime", "--timeout", "30"]).expect_ok(&format!("prime on {}", h.ns));
    }
    for h in [&h1, &h2, &h3, &h4] {
        attach(h, &lab.add_container(h, h.i), &[]);
    }
    for (dead, name, taker, others) in [(&h3, &n3, &h2, [&h1, &h4]), (&h4, &n4, &h1, [&h2, &h2])] {
        let live = [taker, others[0], others[1]];
        assert!(
            wait_until(SECS(10), || live.iter().all(|h| owner_of(h, name).is_some_and(|o| o["size"].as_u64().unwrap_or(0) > 0))),
            "{} owns nothing",
            dead.ns
        );
        kill9(dead);
        ip(&["-n", &dead.ns, "link", "set", UNDERLAY_IF, "down"]).expect_ok("underlay down");
        assert!(
            wait_until(SECS(40), || live.iter().all(|h| owner_of(h, name).is_some_and(|o| o["reachable"] == false))),
            "{} not unreachable everywhere",
            dead.ns
        );
        taker.meshnet(&["rmpeer", name]).expect_ok(&format!("rmpeer {} on {}", dead.ns, taker.ns));
        assert!(
            wait_until(SECS(15), || live.iter().all(|h| owner_of(h, name).is_none())),
            "{}'s takeover of {} not seen everywhere: {:#} {:#}",
            taker.ns,
            dead.ns,
            ipam(others[0]),
            ipam(others[1])
        );
    }
    // The two left hand out the rest of the range, 14 each.
    for k in 0..14 {
        for h in [&h1, &h2] {
            attach(h, &lab.add_container(h, 10 + 2 * k + h.i), &[]);
        }
    }
    assert_eq!(assert_unique(&[&h1, &h2]), 30, "the whole /27 but its network and broadcast addresses");
}

fn docker(args: &[&str]) -> Out {
    run(Command::new("docker").args(args), SECS(60))
}

/// Docker containers and an image made by a test, removed on drop.
struct DockerThings {
    containers: Vec<String>,
    image: String,
    dir: PathBuf,
}

impl DockerThings {
    /// A tiny image of this host's `sleep` and its libraries, or `None` (said
    /// why) without a Docker Engine.
    fn new(tag: &str) -> Option<DockerThings> {
        if !docker(&["info", "--format", "{{.ServerVersion}}"]).ok() {
            eprintln!("skipped: no Docker Engine answers `docker info`");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("meshnet-upgrade-{tag}"));
        let root = dir.join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let sleep = run(Command::new("sh").args(["-c", "command -v sleep"]), SECS(5)).expect_ok("sleep").stdout.trim().to_string();
        let ldd = run(Command::new("ldd").arg(&sleep), SECS(10));
        let libs = ldd.stdout.lines().filter_map(|l| l.split_whitespace().find(|t| t.starts_with('/')).map(PathBuf::from));
        for f in libs.chain([PathBuf::from(&sleep)]) {
            let dst = root.join(f.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(std::fs::canonicalize(&f).unwrap(), &dst).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
        }
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let tar = dir.join("rootfs.tar");
        run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."), SECS(60)).expect_ok("tar");
        let image = format!("meshnet-upgrade-test:{tag}");
        let t = DockerThings { containers: vec![], image, dir };
        docker(&["import", &tar.to_string_lossy(), &t.image]).expect_ok("docker import");
        eprintln!("made image {} of {sleep}", t.image);
        Some(t)
    }

    /// `docker run -d --network none --hostname HOST` of the image, sleeping.
    #[track_caller]
    fn run(&mut self, name: &str, hostname: &str) {
        self.containers.push(name.to_string());
        docker(&["run", "-d", "--pull=never", "--network", "none", "--name", name, "--hostname", hostname, &self.image, "sleep", "infinity"])
            .expect_ok(&format!("docker run {name}"));
    }
}

impl Drop for DockerThings {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["image", "rm", "-f", &self.image]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The container's `/etc/hosts` (empty if unreadable).
fn hosts_of(container: &str) -> String {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container]).stdout.trim().to_string();
    std::fs::read_to_string(format!("/proc/{pid}/root/etc/hosts")).unwrap_or_default()
}

#[test]
fn this_cli_with_a_router_of_the_previous_build() {
    let Some(old) = old_bin() else { return };
    let Some(lab) = Lab::new("upgrade_cli") else { return };
    let tag = format!("{}-{}", std::process::id(), lab.host_ip(1).replace('.', "-"));
    let Some(mut d) = DockerThings::new(&tag) else { return };
    let (quiet, plain) = (format!("upgq-{tag}"), format!("upgp-{tag}"));
    d.run(&quiet, "db.meshnet.local");
    d.run(&plain, "web.meshnet.local");
    let cli = lab.add_host(1);
    let router = cli.clone().with_bin(&old);
    let name = router.launch(&["--ipalloc-range", RANGE]);
    router.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime");

    // This build's CLI, the previous build's router.
    for opts in [&["--without-dns"][..], &["--rewrite-hosts"], &["--rewrite-hosts", "--add-host", "static:10.9.9.9"]] {
        let mut a = vec!["attach"];
        a.extend_from_slice(opts);
        a.push(&quiet);
        let out = cli.meshnet(&a);
        assert!(!out.ok() && out.stderr.contains("older build"), "attach {opts:?} by this CLI on the old router: {out}");
        eprintln!("attach {opts:?}: {}", out.stderr.trim());
    }
    assert!(ps(&router).is_empty(), "a refused attach attached: {:?}", ps(&router));
    assert!(records(&router, &name).is_empty(), "a refused attach registered names: {:?}", records(&router, &name));
    assert!(!hosts_of(&quiet).contains("10.48."), "{}", hosts_of(&quiet));
    let addr = of_family(&attach(&cli, &Container { j: 1, ns: plain.clone(), host: 1 }, &[]), false);
    let listed = cli.meshnet(&["ps", &plain]).expect_ok("ps TARGET by this CLI on the old router");
    assert!(listed.stdout.contains(&addr) && listed.stdout.lines().count() == 1, "{listed}");
    assert!(wait_until(SECS(5), || lookup(&router, &plain) == [addr.clone()]), "{plain}: {:?}", lookup(&router, &plain));

    // Restarted with this build, the options work.
    cli.meshnet(&["stop"]).expect_ok("stop by this CLI");
    assert_eq!(cli.launch(&["--resume"]), name);
    let q = of_family(&attach(&cli, &Container { j: 2, ns: quiet.clone(), host: 1 }, &["--without-dns", "--rewrite-hosts"]), false);
    assert!(hosts_of(&quiet).lines().any(|l| l.starts_with(&q) && l.contains("db.meshnet.local")), "{}", hosts_of(&quiet));
    std::thread::sleep(SECS(1));
    for n in ["db", quiet.as_str()] {
        assert!(lookup(&cli, n).is_empty(), "{n} registered although --without-dns: {:?}", lookup(&cli, n));
    }
    assert_eq!(lookup(&cli, &plain), [addr]);
}
