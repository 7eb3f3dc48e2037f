//! Crash consistency of the state-changing commands: the router is killed
//! (`kill -9`) in the middle of a command, at each of its state writes in turn,
//! then `launch --resume`d; what the CLI says must then agree with the kernel.
//!
//! `strace` holds every `rename` of the router (each state file is written
//! to a temporary file, then renamed over the old one) for a moment, and the
//! router is killed while the n-th is held: before its n-th write, for n = 1,
//! 2, ... until the command makes no n-th one. After each crash:
//! - `ps` lists exactly the addresses on `ethwe` in each target, and the bridge
//!   has one `vm*` port per target with an interface (no orphan port);
//! - IPAM holds exactly the addresses `ps` and `status` (`exposed`) show, each
//!   once, and the exposed ones are on the bridge;
//! - a DNS name is there when its target or address is, and gone when it is
//!   not (never left pointing at an address that went back to the pool);
//! - the command run again completes, and undoing it gives the free count back.
//!
//! Commands: `attach` adding an address to an attached target, an IPAM dual-stack
//! `attach`, `detach` of some addresses, `detach` of a named target, `expose`
//! beside an exposed address, `hide` of a named exposure, and (with a Docker
//! Engine) a container attached and detached by name; `rmpeer` of a dead peer,
//! whose answer must hold after the restart. And the CLI, not the router, is
//! killed mid-`attach`. Skips the router kills without `strace`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const NAME: &str = "02:00:00:00:c4:01";

/// The namespace of a target: a lab namespace, or a Docker container's PID.
#[derive(Clone)]
enum Ns {
    Named(String),
    Container(String),
}

/// Global addresses of `dev` in `ns` (`None`: no such interface).
fn addrs_in(ns: &Ns, dev: &str) -> Option<Vec<String>> {
    let out = match ns {
        Ns::Named(n) => ip(&["-j", "-n", n, "addr", "show", "dev", dev]),
        Ns::Container(c) => {
            let pid = docker(&["inspect", "-f", "{{.State.Pid}}", c]).expect_ok("docker inspect").stdout.trim().to_string();
            run(Command::new("nsenter").args(["-t", &pid, "-n", "ip", "-j", "addr", "show", "dev", dev]), SECS(10))
        }
    };
    if !out.ok() {
        return None;
    }
    let v: Value = serde_json::from_str(&out.stdout).ok()?;
    let mut a: Vec<String> = v[0]["addr_info"]
        .as_array()?
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect();
    a.sort();
    Some(a)
}

fn docker(args: &[&str]) -> Out {
    run(Command::new("docker").args(args), SECS(60))
}

/// What one router says, and what its kernel has.
struct View {
    /// `ps`: target → addresses.
    ps: Vec<(String, Vec<String>)>,
    exposed: Vec<String>,
    /// IPAM's allocations (both rings) and the IPv4 free count.
    allocated: Vec<String>,
    free: u64,
}

struct Rig<'a> {
    h: &'a Host,
    /// Every target a command may attach: its `ps` name and namespace.
    targets: Vec<(String, Ns)>,
    trace: PathBuf,
}

impl Rig<'_> {
    fn view(&self) -> View {
        let mut ps: Vec<(String, Vec<String>)> = self
            .h
            .ps_json()
            .iter()
            .map(|e| {
                let mut a: Vec<String> = e["addresses"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
                a.sort();
                (e["target"].as_str().unwrap().to_string(), a)
            })
            .collect();
        ps.sort();
        let mut exposed: Vec<String> =
            self.h.status_json()["exposed"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        exposed.sort();
        let ipam = self.h.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
        let mut allocated: Vec<String> = [&ipam["allocations"], &ipam["ipv6"]["allocations"]]
            .iter()
            .flat_map(|l| l.as_array().cloned().unwrap_or_default())
            .map(|a| a["ip"].as_str().unwrap().to_string())
            .collect();
        allocated.sort();
        let free = ipam["owners"][0]["free"].as_u64().unwrap();
        View { ps, exposed, allocated, free }
    }

    /// The invariants every state must keep (`when`: for the message).
    #[track_caller]
    fn check(&self, when: &str) -> View {
        let v = self.view();
        let mut with_if = 0;
        for (name, ns) in &self.targets {
            let kernel = addrs_in(ns, "ethwe");
            with_if += usize::from(kernel.is_some());
            let listed = v.ps.iter().find(|(t, _)| t == name).map(|(_, a)| a.clone());
            assert_eq!(listed, kernel, "{when}: `ps` of {name} against its ethwe (ps: {:?})", v.ps);
        }
        let ports = ip(&["-j", "-n", &self.h.ns, "link", "show", "master", "meshnet"]).expect_ok("bridge ports");
        let ports: Vec<String> = serde_json::from_str::<Value>(&ports.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .filter(|n| n.starts_with("vm"))
            .collect();
        assert_eq!(ports.len(), with_if, "{when}: bridge ports {ports:?} for {with_if} targets with an interface");
        assert_eq!(addrs_in(&Ns::Named(self.h.ns.clone()), "meshnet").unwrap_or_default(), v.exposed, "{when}: exposed against the bridge");
        let held: Vec<String> = v.ps.iter().flat_map(|(_, a)| a.iter()).chain(&v.exposed).map(|a| a.split('/').next().unwrap().to_string()).collect();
        let unique: BTreeSet<&String> = v.allocated.iter().collect();
        assert_eq!(unique.len(), v.allocated.len(), "{when}: an address allocated twice: {:?}", v.allocated);
        let held: BTreeSet<&String> = held.iter().collect();
        assert_eq!(unique, held, "{when}: IPAM holds {:?}, targets and exposed hold {held:?}", v.allocated);
        v
    }

    /// Runs `meshnet ARGS` while `strace` holds each rename of the router for
    /// a moment, and kills the router while the `n`-th is held (before it
    /// happens); `launch --resume` then. Returns what the command said, or
    /// `None`, with nothing killed, when it finished with fewer than `n` renames.
    fn crash_before_write(&self, args: &[&str], n: usize) -> Option<Out> {
        let pid = router_pid(self.h);
        let _ = std::fs::remove_file(&self.trace);
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-p", &pid.to_string(), "-e", "trace=rename", "-e", "inject=rename:delay_enter=400000", "-o"])
            .arg(&self.trace)
            .spawn()
            .expect("strace");
        // Attached to every thread (it prints nothing until a rename).
        std::thread::sleep(Duration::from_millis(700));
        let (h, a) = (self.h.clone(), args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let cli = std::thread::spawn(move || h.meshnet(&a.iter().map(String::as_str).collect::<Vec<_>>()));
        let held = |text: &str| {
            let renames: Vec<&str> = text.split("rename(").skip(1).collect();
            renames.len() >= n && !renames[n - 1].contains(" = ")
        };
        let start = Instant::now();
        let mut killed = false;
        while start.elapsed() < SECS(30) {
            if held(&std::fs::read_to_string(&self.trace).unwrap_or_default()) {
                kill9(self.h);
                killed = true;
                break;
            }
            if cli.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = strace.kill();
        let _ = strace.wait();
        let out = cli.join().unwrap();
        if !killed {
            assert!(out.ok(), "`meshnet {}` under strace: {out}", args.join(" "));
            return None;
        }
        eprintln!("killed before write {n} of `meshnet {}`: {}", args.join(" "), out.stderr.trim());
        self.h.meshnet(&["launch", "--resume"]).expect_ok("launch --resume");
        Some(out)
    }

    /// For n = 1, 2, ...: `prepare`, then `args` with the router killed before
    /// its n-th write, then the invariants and `after` on what is left, then
    /// `args` again (which must complete), `undo`, and the free count as before.
    fn sweep(&self, what: &str, prepare: &dyn Fn(), args: &[&str], after: &dyn Fn(&View, &str), undo: &dyn Fn()) {
        let free = self.view().free;
        for n in 1.. {
            prepare();
            let crashed = self.crash_before_write(args, n).is_some();
            let when = format!("{what}, killed before write {n}");
            if crashed {
                let v = self.check(&when);
                after(&v, &when);
                self.h.meshnet(args).expect_ok(&format!("{when}: the command again"));
                let v = self.check(&format!("{when}, then again"));
                after(&v, &format!("{when}, then again"));
            }
            undo();
            let v = self.check(&format!("{when}, undone"));
            assert!(v.ps.is_empty() && v.exposed.is_empty() && v.allocated.is_empty(), "{when}, undone: {:?} {:?} {:?}", v.ps, v.exposed, v.allocated);
            assert_eq!(v.free, free, "{when}, undone: free addresses");
            if !crashed {
                eprintln!("{what}: {} crash points", n - 1);
                assert!(n > 1, "{what}: no state write to crash before");
                return;
            }
        }
    }
}

/// A tiny image of this host's `sleep` and its libraries (`docker import`, no registry).
fn sleep_image(dir: &Path, tag: &str) -> String {
    let root = dir.join("rootfs");
    let which = run(Command::new("sh").args(["-c", "command -v sleep"]), SECS(5)).expect_ok("sleep");
    let bin = PathBuf::from(which.stdout.trim());
    let mut files = vec![bin.clone()];
    for line in run(Command::new("ldd").arg(&bin), SECS(10)).stdout.lines() {
        files.extend(line.split_whitespace().find(|t| t.starts_with('/')).map(PathBuf::from));
    }
    for f in files {
        let dst = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(&f).unwrap(), &dst).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."), SECS(60)).expect_ok("tar");
    let image = format!("meshnet-crashpoints:{tag}");
    docker(&["import", &tar.to_string_lossy(), &image]).expect_ok("docker import");
    image
}

/// Removes the test's container and image, also on failure.
struct DockerBits(Vec<String>, Option<String>);

impl Drop for DockerBits {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = docker(&["rm", "-f", c]);
        }
        if let Some(i) = &self.1 {
            let _ = docker(&["image", "rm", "-f", i]);
        }
    }
}

/// A lab with one router (a seeded dual-stack ring) and two namespaces.
fn one_router(test: &str) -> Option<(Lab, Host, Container, Container)> {
    let lab = Lab::new(test)?;
    let h = lab.add_host(1);
    h.launch(&[
        "--name", NAME, "--ipalloc-init", &format!("seed={NAME}"), "--ipalloc-range", "10.44.0.0/16",
        "--ipalloc-range", "fd44::/64", "--no-docker-plugin", "--metrics-addr=",
    ]);
    let (c1, c2) = (lab.add_container(&h, 1), lab.add_container(&h, 2));
    Some((lab, h, c1, c2))
}

fn rig<'a>(lab: &Lab, h: &'a Host, cs: &[&Container]) -> Rig<'a> {
    Rig { h, targets: cs.iter().map(|c| (c.ns.clone(), Ns::Named(c.ns.clone()))).collect(), trace: lab.dir.join("strace.out") }
}

fn have_strace() -> bool {
    let ok = run(Command::new("strace").arg("-V"), SECS(10)).ok();
    if !ok {
        eprintln!("skipping: no strace to hold the router in the middle of a command");
    }
    ok
}

#[track_caller]
fn m(h: &Host, args: &[&str]) {
    h.meshnet(args).expect_ok(&format!("meshnet {}", args.join(" ")));
}

const NOTHING: &dyn Fn(&View, &str) = &|_, _| {};

/// The CLI killed, not the router: the router finishes (or never began) what
/// it was asked, and nothing is left half done.
#[test]
fn a_cli_killed_mid_attach_leaves_it_done_or_not() {
    let Some((lab, h, c1, c2)) = one_router("crashcli") else { return };
    let rig = rig(&lab, &h, &[&c1, &c2]);
    let bin = lab.bin.to_string_lossy().into_owned();
    let state = h.state_dir.to_string_lossy().into_owned();
    for delay in [0, 5, 10, 20, 40, 80] {
        let mut cli = lab.spawn_in(&h.ns, &[&bin, "--state-dir", &state, "attach", &c1.ns]);
        std::thread::sleep(Duration::from_millis(delay));
        cli.stop(libc::SIGKILL);
        // The router may still be at it.
        std::thread::sleep(Duration::from_millis(300));
        rig.check(&format!("CLI killed {delay} ms into attach"));
        m(&h, &["attach", &c1.ns]);
        m(&h, &["detach", &c1.ns]);
        assert!(rig.view().allocated.is_empty(), "CLI killed {delay} ms into attach: left allocated");
    }
}

/// An address added to an attached target (or exposed beside another), or
/// detached of two: IPAM must not keep one the record does not (it did, for
/// good, until the whole target was detached).
#[test]
fn addresses_stay_with_their_records_across_a_crash() {
    let Some((lab, h, c1, c2)) = one_router("crashaddr") else { return };
    if !have_strace() {
        return;
    }
    let rig = rig(&lab, &h, &[&c1, &c2]);
    rig.sweep("attach of a second address", &|| m(&h, &["attach", "10.44.1.5/16", &c1.ns]), &["attach", "10.44.1.6/16", &c1.ns], NOTHING, &|| {
        m(&h, &["detach", &c1.ns])
    });
    rig.sweep(
        "detach of one address of two",
        &|| m(&h, &["attach", "10.44.1.5/16", "10.44.1.6/16", &c1.ns]),
        &["detach", "10.44.1.6/16", &c1.ns],
        NOTHING,
        &|| m(&h, &["detach", &c1.ns]),
    );
    rig.sweep("attach from IPAM, dual-stack", &|| {}, &["attach", &c2.ns], NOTHING, &|| m(&h, &["detach", &c2.ns]));
    rig.sweep("expose beside an exposed address", &|| m(&h, &["expose", "10.44.7.1/16"]), &["expose", "10.44.7.2/16"], NOTHING, &|| {
        m(&h, &["hide"])
    });
}

/// A name never outlives its target's address: detach and hide remove names
/// first (a crash then leaves the target without its name, which the command
/// again completes; it left the name on an address back in the pool).
#[test]
fn names_never_outlive_their_addresses_across_a_crash() {
    let Some((lab, h, c1, c2)) = one_router("crashdns") else { return };
    if !have_strace() {
        return;
    }
    let rig = rig(&lab, &h, &[&c1, &c2]);
    let c1ns = c1.ns.clone();
    rig.sweep(
        "detach of a named target",
        &|| {
            m(&h, &["attach", "10.44.1.5/16", &c1.ns]);
            m(&h, &["dns-add", &c1.ns, "-h", "db"]);
        },
        &["detach", &c1.ns],
        &|v: &View, when: &str| {
            if !v.ps.iter().any(|(t, _)| *t == c1ns) {
                assert!(!rig_resolves(&h, "db"), "{when}: db resolves, and {c1ns} is detached");
            }
        },
        &|| {
            let _ = h.meshnet(&["detach", &c1.ns]);
            let _ = h.meshnet(&["dns-remove", &c1.ns]);
        },
    );
    rig.sweep(
        "hide of a named exposure",
        &|| m(&h, &["expose", "10.44.7.7/16", "-h", "gw"]),
        &["hide"],
        &|v: &View, when: &str| {
            if v.exposed.is_empty() {
                assert!(!rig_resolves(&h, "gw"), "{when}: gw resolves, and 10.44.7.7 is hidden");
            }
        },
        &|| m(&h, &["hide"]),
    );
}

/// A Docker container attached by name has its name exactly while it is
/// attached, also when the crash came between the record and the name (the
/// launch registers it, or registers it again).
#[test]
fn a_container_attached_by_name_keeps_its_name_with_its_address_across_a_crash() {
    if !Path::new("/var/run/docker.sock").exists() || !docker(&["info"]).ok() {
        eprintln!("skipping: no Docker Engine");
        return;
    }
    let Some((lab, h, c1, c2)) = one_router("crashdocker") else { return };
    if !have_strace() {
        return;
    }
    let mut rig = rig(&lab, &h, &[&c1, &c2]);
    let tag = format!("{}{}", std::process::id(), lab.prefix);
    let mut bits = DockerBits(vec![], None);
    let image = sleep_image(&lab.dir, &tag);
    bits.1 = Some(image.clone());
    let name = format!("crashpoints_{tag}");
    bits.0.push(name.clone());
    docker(&["run", "-d", "--pull=never", "--network", "none", "--name", &name, &image, "sleep", "3600"]).expect_ok("docker run");
    rig.targets.push((name.clone(), Ns::Container(name.clone())));
    let named = |v: &View, when: &str| {
        let attached = v.ps.iter().any(|(t, _)| *t == name);
        assert_eq!(rig_resolves(&h, &name), attached, "{when}: {name} attached: {attached}; its name must resolve then only");
    };
    rig.sweep("attach of a container by name", &|| {}, &["attach", "10.44.3.3/16", &name], &named, &|| m(&h, &["detach", &name]));
    rig.sweep("detach of a container by name", &|| m(&h, &["attach", "10.44.3.3/16", &name]), &["detach", &name], &named, &|| {
        let _ = h.meshnet(&["detach", &name]);
    });
}

fn rig_resolves(h: &Host, name: &str) -> bool {
    h.meshnet(&["dns-lookup", name]).ok()
}

/// `rmpeer` of a dead peer killed before each of its writes: once it said it
/// forgot the peer's key, the key stays forgotten (the key book was written
/// after the answer, and a crash then brought the key back); `rmpeer` again
/// completes it, and the ring no longer lists the peer.
#[test]
fn rmpeer_that_answered_stays_done_across_a_crash() {
    let Some(lab) = Lab::new("crashrmpeer") else { return };
    if !have_strace() {
        return;
    }
    let names = ["02:00:00:00:c5:01", "02:00:00:00:c5:02", "02:00:00:00:c5:03", "02:00:00:00:c5:04"];
    let seed = format!("seed={}", names.join(","));
    let hosts: Vec<Host> = (1..=4).map(|i| lab.add_host(i)).collect();
    for (i, h) in hosts.iter().enumerate() {
        let mut args = vec!["--name", names[i], "--ipalloc-init", &seed, "--ipalloc-range", "10.45.0.0/16", "--no-docker-plugin", "--metrics-addr="];
        if i > 0 {
            args.push(&hosts[0].ip);
        }
        h.launch(&args);
    }
    let h1 = &hosts[0];
    assert!(
        wait_until(SECS(30), || names[1..].iter().all(|n| established_with(&h1.status_json(), n))),
        "h1 did not connect to the others"
    );
    let pinned = || h1.status_json()["trust"]["pinned_keys"].as_u64().unwrap();
    let owners = || -> Vec<String> {
        let ipam = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
        ipam["owners"].as_array().unwrap().iter().map(|o| o["peer"].as_str().unwrap().to_string()).collect()
    };
    // Its own and the three others.
    assert!(wait_until(SECS(10), || pinned() == 4), "h1 pinned {} keys, not 4", pinned());
    for h in &hosts[1..] {
        h.meshnet(&["stop"]).expect_ok("stop");
    }
    let gone = wait_until(SECS(30), || {
        let ipam = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
        ipam["owners"].as_array().unwrap().iter().filter(|o| o["reachable"] == true).count() == 1
    });
    assert!(gone, "h1 still reaches a stopped peer");
    let rig = Rig { h: h1, targets: vec![], trace: lab.dir.join("strace.out") };
    for (n, peer) in (1..).zip(&names[1..]) {
        let before = pinned();
        let when = format!("rmpeer {peer}, killed before write {n}");
        let Some(out) = rig.crash_before_write(&["rmpeer", peer], n) else {
            eprintln!("rmpeer: {} crash points", n - 1);
            break;
        };
        if out.ok() {
            assert_eq!(pinned(), before - 1, "{when}: it answered {:?}, and its key is pinned again after the restart", out.stdout.trim());
        }
        let again = h1.meshnet(&["rmpeer", peer]);
        assert!(again.ok(), "{when}: rmpeer again: {again}");
        assert_eq!(pinned(), before - 1, "{when}, then again: keys pinned");
        assert!(!owners().iter().any(|o| o == peer), "{when}, then again: the ring still lists it: {:?}", owners());
    }
}
