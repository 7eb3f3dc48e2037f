//! meshnet's Docker plugin with the real Docker Engine, and containers attached
//! by name surviving `docker restart`.
//!
//! Two routers run on this machine's host network namespace (the engine's), each
//! with its own bridge, port, state directory and plugin name, connected over
//! 127.0.0.1. The machine has one Docker Engine, and the engine only moves
//! interfaces that exist in its own namespace into containers, so both routers
//! serve that engine: router A as plugin `mnpa<tag>`, router B as `mnpb<tag>`.
//! `docker network create --driver P --ipam-driver P --subnet S` on each makes
//! the same overlay subnet reachable through both routers; a container run on
//! each network gets its address from meshnet's IPAM on its router, and the two
//! ping each other across the routers (their frames cross router A's bridge, the
//! encrypted UDP between the routers, and router B's bridge).
//!
//! The image holds only `ping`, `sleep` and `ip` copied from this host with
//! their libraries (`docker import`: no registry, no download).
//!
//! `docker_names_across_routers`: meshnet DNS with real containers on two such
//! routers (issue 13's first must-show); its doc comment says what it shows.
//!
//! Everything made here (containers, networks, image, bridges, the routers'
//! exposed addresses and nftables tables, state directories) has a unique name
//! and is removed at the end, also on failure (`meshnet reset` for the routers).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use meshnet_tests::lab::{is_root, meshnet_bin, run, wait_until, Out};
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
/// The IP allocation range of the two routers: not routed on this machine.
const RANGE: &str = "10.213.0.0/16";
/// Where Docker looks for plugin sockets (the routers' default).
const PLUGIN_DIR: &str = "/run/docker/plugins";

fn docker(args: &[&str]) -> Out {
    run(Command::new("docker").args(args), SECS(60))
}

fn no_docker() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    if !Path::new("/var/run/docker.sock").exists() {
        return Some("no Docker Engine (/var/run/docker.sock does not exist)".into());
    }
    let info = run(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]), SECS(20));
    if !info.ok() || info.stdout.trim().is_empty() {
        return Some(format!("no Docker Engine answers (`docker info`: {})", info.all().trim()));
    }
    None
}

/// A short tag for the names a test makes: unique per process and moment
/// (`salt` tells apart tests of one process that start at once).
fn unique_tag(salt: u32) -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{:05x}", (std::process::id() ^ nanos.rotate_left(salt)) & 0xfffff)
}

/// One router on the host namespace.
#[derive(Clone)]
struct Router {
    state: PathBuf,
    plugin: String,
    bridge: String,
    port: u16,
}

impl Router {
    fn meshnet(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(meshnet_bin());
        cmd.arg("--state-dir").arg(&self.state).args(args);
        cmd.env_remove("MESHNET_PASSWORD");
        run(&mut cmd, SECS(45))
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        self.meshnet(args).expect_ok(&format!("meshnet {args:?}")).json()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("meshnet.log")).unwrap_or_default()
    }

    /// The IPAM key holding `ip` on this router, if any.
    fn holder(&self, ip: &str) -> Option<String> {
        self.json(&["status", "ipam", "--json"])["allocations"]
            .as_array()?
            .iter()
            .find(|a| a["ip"] == ip)
            .map(|a| a["target"].as_str().unwrap_or_default().to_string())
    }
}

/// Everything the test made, removed on drop.
struct World {
    tag: String,
    containers: Vec<String>,
    networks: Vec<String>,
    image: Option<String>,
    routers: Vec<Router>,
    /// iptables rules inserted (removed with `-D`).
    iptables: Vec<Vec<String>>,
    dir: PathBuf,
}

impl World {
    /// Nothing made yet; its files under a new temporary directory named after `label` and `tag`.
    fn new(tag: String, label: &str) -> World {
        let dir = std::env::temp_dir().join(format!("meshnet-docker-{label}-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        World { dir, tag, containers: vec![], networks: vec![], image: None, routers: vec![], iptables: vec![] }
    }

    /// A test's world, or `None` (said why) when there is no Docker Engine to test with.
    fn for_test(label: &str, salt: u32) -> Option<World> {
        if let Some(why) = no_docker() {
            eprintln!("skipping: {why}");
            return None;
        }
        Some(World::new(unique_tag(salt), label))
    }

    fn name(&self, what: &str) -> String {
        format!("{what}{}", self.tag)
    }

    /// Launches a lone router named `name` (its bridge and plugin `prefix` and
    /// the tag) with IP allocation range `range` agreed at once, and `extra`.
    #[track_caller]
    fn lone_router(&mut self, prefix: &str, name: &str, range: &str, extra: &[&str]) -> Router {
        let r = Router { state: self.dir.join("state"), plugin: self.name(prefix), bridge: self.name(prefix), port: free_port() };
        self.routers.push(r.clone());
        let (port, seed) = (r.port.to_string(), format!("seed={name}"));
        let mut args = vec![
            "launch", "--host", "127.0.0.1", "--port", &port, "--bridge", &r.bridge, "--name", name, "--no-discovery",
            "--ipalloc-range", range, "--ipalloc-init", &seed, "--docker-plugin-name", &r.plugin, "--metrics-addr=",
        ];
        args.extend_from_slice(extra);
        r.meshnet(&args).expect_ok("launch");
        r
    }

    #[track_caller]
    fn run_container(&mut self, name: &str, args: &[&str]) -> Out {
        self.containers.push(name.to_string());
        let mut a = vec!["run", "-d", "--pull=never", "--name", name];
        a.extend_from_slice(args);
        docker(&a)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for r in &self.routers {
                eprintln!("==== {} log ====\n{}", r.state.display(), r.log());
            }
        }
        for c in self.containers.iter().rev() {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        if let Some(i) = &self.image {
            let _ = docker(&["image", "rm", "-f", i]);
        }
        for r in &self.routers {
            let _ = r.meshnet(&["reset", "--force"]);
            let _ = run(Command::new("ip").args(["link", "del", &r.bridge]), SECS(10));
            let _ = std::fs::remove_file(Path::new(PLUGIN_DIR).join(format!("{}.sock", r.plugin)));
        }
        for rule in &self.iptables {
            let _ = run(Command::new("iptables").arg("-D").args(rule), SECS(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A tiny image made of this host's `ping`, `sleep` and `ip` (and `extra`) and their libraries.
fn build_image(w: &mut World, extra: &[&str]) -> String {
    let root = w.dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for bin in ["ping", "sleep", "ip"].iter().chain(extra) {
        let which = run(Command::new("sh").args(["-c", &format!("command -v {bin}")]), SECS(5)).expect_ok(bin);
        let path = PathBuf::from(which.stdout.trim());
        let ldd = run(Command::new("ldd").arg(&path), SECS(10));
        for line in ldd.stdout.lines() {
            if let Some(lib) = line.split_whitespace().find(|t| t.starts_with('/')) {
                files.push(PathBuf::from(lib));
            }
        }
        files.push(path);
    }
    for f in files {
        let real = std::fs::canonicalize(&f).unwrap_or(f.clone());
        let dst = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&real, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", real.display()));
    }
    let image = format!("meshnet-plugin-test:{}", w.tag);
    let tar = w.dir.join("rootfs.tar");
    run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."), SECS(60)).expect_ok("tar");
    w.image = Some(image.clone());
    docker(&["import", &tar.to_string_lossy(), &image]).expect_ok("docker import");
    image
}

fn free_port() -> u16 {
    // TCP and UDP on the same number: take a UDP port and check TCP.
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn ip_in(container: &str, network: &str) -> String {
    docker(&["inspect", "-f", &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"), container])
        .expect_ok("docker inspect")
        .stdout
        .trim()
        .to_string()
}

fn full_id(container: &str) -> String {
    docker(&["inspect", "-f", "{{.Id}}", container]).expect_ok("docker inspect").stdout.trim().to_string()
}

fn pings(from: &str, ip: &str, count: u32) -> bool {
    let c = count.to_string();
    let deadline = (count + 2).to_string();
    run(
        Command::new("docker").args(["exec", from, "ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1", "-w", &deadline, ip]),
        SECS(u64::from(count) + 10),
    )
    .ok()
}

#[test]
fn docker_plugin_networks_and_restarted_containers() {
    let Some(mut w) = World::for_test("plugin", 0) else { return };
    let image = build_image(&mut w, &[]);

    // Two routers on the host namespace, seeded so the ring is agreed at once.
    let names = ["02:00:5e:d0:00:0a", "02:00:5e:d0:00:0b"];
    for (i, side) in ["a", "b"].iter().enumerate() {
        w.routers.push(Router {
            state: w.dir.join(format!("state-{side}")),
            plugin: w.name(&format!("mnp{side}")),
            bridge: w.name(&format!("mnp{side}")),
            port: free_port(),
        });
        let r = &w.routers[i];
        let port = r.port.to_string();
        let seed = format!("seed={}", names.join(","));
        let mut args = vec![
            "launch", "--host", "127.0.0.1", "--port", &port, "--bridge", &r.bridge, "--name", names[i],
            "--nickname", side, "--no-discovery", "--ipalloc-range", RANGE, "--ipalloc-init", &seed,
            "--docker-plugin-name", &r.plugin,
            // Two routers in one network namespace: the metrics port's default is one.
            "--metrics-addr=",
        ];
        let peer = format!("127.0.0.1:{}", w.routers[0].port);
        if i == 1 {
            args.push(&peer);
        }
        r.meshnet(&args).expect_ok(&format!("launch router {side}"));
    }
    let (a, b) = (w.routers[0].clone(), w.routers[1].clone());
    // Docker sets the host's FORWARD policy to DROP and loads br_netfilter, so
    // frames bridged between a container and the router's TAP pass iptables'
    // FORWARD chain: allow what crosses our bridges (Docker's documented place
    // for that is DOCKER-USER; removed at the end).
    for r in [&a, &b] {
        let rule = ["DOCKER-USER", "-i", &r.bridge, "-o", &r.bridge, "-j", "ACCEPT"];
        if run(Command::new("iptables").arg("-I").args(rule), SECS(10)).ok() {
            w.iptables.push(rule.iter().map(|s| s.to_string()).collect());
        }
    }
    assert!(
        wait_until(SECS(30), || {
            a.json(&["status", "connections", "--json"])
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["peer"] == names[1] && c["state"] == "established"))
        }),
        "the routers did not connect: {}",
        a.meshnet(&["status", "connections"])
    );
    for r in [&a, &b] {
        let sock = Path::new(PLUGIN_DIR).join(format!("{}.sock", r.plugin));
        assert!(sock.exists(), "{} is not served: {}", sock.display(), r.log());
    }
    let (pa, pb) = (a.plugin.clone(), b.plugin.clone());

    // The same overlay subnet through each router's plugin.
    let subnet = "10.213.5.0/24";
    let (net_a, net_b) = (w.name("mnneta"), w.name("mnnetb"));
    for (net, p) in [(&net_a, &pa), (&net_b, &pb)] {
        w.networks.push(net.clone());
        docker(&["network", "create", "--driver", p, "--ipam-driver", p, "--subnet", subnet, net])
            .expect_ok(&format!("docker network create {net}"));
    }
    // The gateway is router A's exposed address in the subnet (Docker does not
    // list gateways an IPAM driver chose in `network inspect`).
    let exposed = a.json(&["status", "--json"])["exposed"].clone();
    let gw_a = exposed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .find(|e| e.starts_with("10.213.5."))
        .unwrap_or_else(|| panic!("router A exposed no gateway in {subnet}: {exposed}"))
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let (ca, cb) = (w.name("mnca"), w.name("mncb"));
    w.run_container(&ca, &["--network", &net_a, &image, "sleep", "3600"]).expect_ok("docker run on router A's network");
    w.run_container(&cb, &["--network", &net_b, &image, "sleep", "3600"]).expect_ok("docker run on router B's network");
    let (ip_a, ip_b) = (ip_in(&ca, &net_a), ip_in(&cb, &net_b));
    for ip in [&ip_a, &ip_b] {
        assert!(ip.starts_with("10.213.5."), "address {ip:?} is not in {subnet}");
    }
    assert_ne!(ip_a, ip_b);
    assert!(a.holder(&ip_a).is_some_and(|k| k.starts_with("docker-plugin:")), "{ip_a} not in router A's IPAM");
    assert!(b.holder(&ip_b).is_some_and(|k| k.starts_with("docker-plugin:")), "{ip_b} not in router B's IPAM");
    let link = docker(&["exec", &ca, "ip", "-o", "-4", "addr", "show", "dev", "ethwe0"]).expect_ok("ethwe0 in the container");
    assert!(link.stdout.contains(&format!("{ip_a}/24")), "{link}");
    let route = docker(&["exec", &ca, "ip", "route"]).expect_ok("routes");
    assert!(route.stdout.contains(&format!("default via {gw_a}")), "{route}");
    assert!(wait_until(SECS(20), || pings(&ca, &ip_b, 1)), "{ca} ({ip_a}) cannot ping {cb} ({ip_b})");
    assert!(pings(&ca, &ip_b, 3) && pings(&cb, &ip_a, 3), "pings across the routers stopped");
    eprintln!("plugin: {ca} {ip_a} (router A) <-> {cb} {ip_b} (router B): ping ok");
    // The router learns which container joined (the name DNS registers).
    let said = format!("container {ca} ({}) is on the overlay as {ip_a}/24", &full_id(&ca)[..12]);
    assert!(wait_until(SECS(10), || a.log().contains(&said)), "router A's log lacks {said:?}");

    // --ip is honoured (and claimed in IPAM); an address in use is Docker's error.
    let cc = w.name("mncc");
    w.run_container(&cc, &["--network", &net_a, "--ip", "10.213.5.77", &image, "sleep", "3600"]).expect_ok("docker run --ip");
    assert_eq!(ip_in(&cc, &net_a), "10.213.5.77");
    assert!(a.holder("10.213.5.77").is_some_and(|k| k.starts_with("docker-plugin:")));
    let cd = w.name("mncd");
    let out = w.run_container(&cd, &["--network", &net_b, "--ip", &ip_a, &image, "sleep", "3600"]);
    assert!(!out.ok(), "a second container got {ip_a}: {out}");
    eprintln!("address in use: {}", out.stderr.trim());

    // docker rm -f frees the address (status ipam) and the bridge port.
    let ports_before = run(Command::new("ip").args(["-br", "link", "show", "master", &a.bridge]), SECS(10)).stdout;
    assert!(ports_before.contains("vmd"), "no plugin port on {}: {ports_before}", a.bridge);
    docker(&["rm", "-f", &ca, &cc]).expect_ok("docker rm -f");
    assert!(wait_until(SECS(10), || a.holder(&ip_a).is_none() && a.holder("10.213.5.77").is_none()), "{ip_a} still allocated after docker rm -f");
    let ports_after = run(Command::new("ip").args(["-br", "link", "show", "master", &a.bridge]), SECS(10)).stdout;
    assert!(!ports_after.contains("vmd"), "plugin port left on {}: {ports_after}", a.bridge);
    assert!(a.meshnet(&["status", "ipam"]).expect_ok("status ipam").stdout.len() > 0);

    // Errors come back through Docker: a subnet outside the range, a network in use.
    let bad = w.name("mnbad");
    w.networks.push(bad.clone());
    let out = docker(&["network", "create", "--driver", &pa, "--ipam-driver", &pa, "--subnet", "192.168.213.0/24", &bad]);
    assert!(!out.ok() && out.stderr.contains("outside meshnet's IP allocation range 10.213.0.0/16"), "{out}");
    let out = docker(&["network", "rm", &net_b]);
    assert!(!out.ok(), "removing a network in use must fail: {out}");

    // docker network rm releases the pool and hides the gateway.
    docker(&["network", "rm", &net_a]).expect_ok("docker network rm");
    assert!(
        !a.json(&["status", "--json"])["exposed"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().starts_with(&format!("{gw_a}/"))),
        "the gateway is still exposed after docker network rm"
    );
    let plugin_state: Value =
        serde_json::from_slice(&std::fs::read(a.state.join("docker-plugin.json")).unwrap()).unwrap();
    assert_eq!(plugin_state["pools"], serde_json::json!({}), "{plugin_state:#}");
    assert_eq!(plugin_state["networks"], serde_json::json!({}), "{plugin_state:#}");

    // Router B restarts: its container keeps its network (no replay by Docker needed).
    b.meshnet(&["stop"]).expect_ok("stop router B");
    b.meshnet(&["launch", "--resume"]).expect_ok("relaunch router B");
    assert!(b.holder(&ip_b).is_some(), "router B lost {ip_b} across a restart");
    // ...and its network goes on: Docker does not create it again, yet a new
    // container joins it, gets an address of router B's IPAM and reaches cb.
    let ce = w.name("mnce");
    w.run_container(&ce, &["--network", &net_b, &image, "sleep", "3600"]).expect_ok("docker run on router B's network after its restart");
    let ip_e = ip_in(&ce, &net_b);
    assert!(ip_e.starts_with("10.213.5.") && ip_e != ip_b, "address {ip_e:?} after the restart");
    assert!(b.holder(&ip_e).is_some_and(|k| k.starts_with("docker-plugin:")), "{ip_e} not in router B's IPAM");
    assert!(wait_until(SECS(20), || pings(&ce, &ip_b, 1)), "{ce} ({ip_e}) cannot ping {cb} ({ip_b}) after router B's restart");
    docker(&["rm", "-f", &ce]).expect_ok("docker rm -f ce");

    // A container removed while its router is down (kill -9): Docker's Leave,
    // DeleteEndpoint and ReleaseAddress fail, and Docker does not send them
    // again. The relaunched router asks Docker which endpoints it still has and
    // forgets the others: the address is free again and the veth pair is off the
    // bridge. A network removed meanwhile likewise: its subnet can be used
    // again and its gateway is hidden. Before, all of it stayed for good
    // ("subnet ... is already used by another meshnet network").
    let net_x = w.name("mnnetx");
    let subnet_x = "10.213.7.0/24";
    w.networks.push(net_x.clone());
    docker(&["network", "create", "--driver", &pb, "--ipam-driver", &pb, "--subnet", subnet_x, &net_x]).expect_ok("docker network create on router B");
    let exposed_b = || b.json(&["status", "--json"])["exposed"].to_string();
    assert!(exposed_b().contains("10.213.7."), "no gateway of {subnet_x} on router B: {}", exposed_b());
    let cf = w.name("mncf");
    w.run_container(&cf, &["--network", &net_b, &image, "sleep", "3600"]).expect_ok("docker run cf on router B's network");
    let ip_f = ip_in(&cf, &net_b);
    let ep_f = docker(&["inspect", "-f", &format!("{{{{(index .NetworkSettings.Networks \"{net_b}\").EndpointID}}}}"), &cf])
        .expect_ok("docker inspect")
        .stdout
        .trim()
        .to_string();
    let port_f = format!("vmd{}", &ep_f[..12]);
    let ports_b = || run(Command::new("ip").args(["-br", "link", "show", "master", &b.bridge]), SECS(10)).stdout;
    assert!(b.holder(&ip_f).is_some() && ports_b().contains(&port_f), "{cf} ({ip_f}, {port_f}) is not on router B");
    let pid = std::fs::read_to_string(b.state.join("meshnet.pid")).expect("router B's pid file");
    run(Command::new("kill").args(["-9", pid.trim()]), SECS(10)).expect_ok("kill -9 router B");
    // Docker tries the dead plugin for a while before it gives up on it.
    run(Command::new("docker").args(["rm", "-f", &cf]), SECS(180)).expect_ok("docker rm -f while router B is down");
    run(Command::new("docker").args(["network", "rm", &net_x]), SECS(180)).expect_ok("docker network rm while router B is down");
    b.meshnet(&["launch", "--resume"]).expect_ok("relaunch router B after kill -9");
    assert!(
        wait_until(SECS(30), || b.holder(&ip_f).is_none() && !ports_b().contains(&port_f)),
        "{ip_f} or {port_f} of a container removed while router B was down is still held: {}\n{}",
        ports_b(),
        b.log()
    );
    assert!(b.holder(&ip_b).is_some(), "router B forgot {cb}'s {ip_b}, whose container runs");
    assert!(wait_until(SECS(10), || !exposed_b().contains("10.213.7.")), "the gateway of removed {net_x} is still exposed: {}", exposed_b());
    docker(&["network", "create", "--driver", &pb, "--ipam-driver", &pb, "--subnet", subnet_x, &net_x])
        .expect_ok("docker network create again on a subnet whose network was removed while router B was down");
    docker(&["network", "rm", &net_x]).expect_ok("docker network rm");
    eprintln!("container removed while its router was down: {ip_f} and {port_f} released at relaunch");

    // Containers attached by name survive docker restart with the same address.
    let (r1, r2) = (w.name("mnr1"), w.name("mnr2"));
    w.run_container(&r1, &["--network", "none", &image, "sleep", "3600"]).expect_ok("docker run r1");
    w.run_container(&r2, &["--network", "none", &image, "sleep", "3600"]).expect_ok("docker run r2");
    let out = a.meshnet(&["attach", &r1]).expect_ok("attach r1 by name (IPAM address)");
    let addr1 = out.last_line().unwrap().to_string();
    let ip1 = addr1.split('/').next().unwrap().to_string();
    b.meshnet(&["attach", "10.213.9.6/16", &r2]).expect_ok("attach r2 by name");
    assert!(wait_until(SECS(20), || pings(&r2, &ip1, 1)), "{r2} cannot ping {r1} ({ip1})");
    let key1 = format!("docker:{}", full_id(&r1));
    assert_eq!(a.holder(&ip1), Some(key1.clone()));

    docker(&["restart", "-t", "1", &r1]).expect_ok("docker restart");
    assert!(wait_until(SECS(20), || pings(&r2, &ip1, 1)), "{r1} is not back on {ip1} after docker restart: {}", a.log());
    let ps = a.json(&["ps", "--json"]);
    let entry = ps.as_array().unwrap().iter().find(|e| e["target"] == r1.as_str()).cloned().unwrap_or_default();
    assert_eq!(entry["addresses"], serde_json::json!([addr1]), "{ps:#}");
    assert_eq!(a.holder(&ip1), Some(key1.clone()));
    eprintln!("restart: {r1} back on {addr1}");

    // Stopped: kept (address reserved); started: back; removed: released.
    let netns_inode = |c: &str| {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", c]).expect_ok("docker inspect").stdout.trim().to_string();
        std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0)
    };
    let inode1 = netns_inode(&r1);
    docker(&["stop", "-t", "1", &r1]).expect_ok("docker stop");
    std::thread::sleep(SECS(2));
    assert!(a.json(&["ps", "--json"]).as_array().unwrap().iter().any(|e| e["target"] == r1.as_str()), "stopped container forgotten");
    assert_eq!(a.holder(&ip1), Some(key1.clone()), "the stopped container's address was released");
    // Another container attached while r1 is stopped; the kernel hands out
    // namespace inode numbers again (lowest first), so its namespace usually
    // has r1's old one. r1 keeps its record and address all the same (before,
    // attaching r3 forgot r1 and freed its address: r1 came back with none).
    let r3 = w.name("mnr3");
    w.run_container(&r3, &["--network", "none", &image, "sleep", "3600"]).expect_ok("docker run r3");
    let inode3 = netns_inode(&r3);
    eprintln!("r1's old namespace inode {inode1}, r3's {inode3}{}", if inode1 == inode3 { " (reused)" } else { "" });
    a.meshnet(&["attach", &r3]).expect_ok("attach r3 by name while r1 is stopped");
    assert!(a.json(&["ps", "--json"]).as_array().unwrap().iter().any(|e| e["target"] == r1.as_str()), "stopped r1 forgotten when r3 was attached");
    assert_eq!(a.holder(&ip1), Some(key1.clone()), "the stopped container's address was released when r3 was attached");
    docker(&["start", &r1]).expect_ok("docker start");
    assert!(wait_until(SECS(20), || pings(&r2, &ip1, 1)), "{r1} is not back on {ip1} after docker start");
    let ps = a.json(&["ps", "--json"]);
    let entry = ps.as_array().unwrap().iter().find(|e| e["target"] == r1.as_str()).cloned().unwrap_or_default();
    assert_eq!(entry["addresses"], serde_json::json!([addr1]), "{ps:#}");
    assert!(pings(&r3, &ip1, 1) || wait_until(SECS(10), || pings(&r3, &ip1, 1)), "{r3} cannot ping {r1} ({ip1})");
    docker(&["rm", "-f", &r1]).expect_ok("docker rm -f r1");
    assert!(wait_until(SECS(10), || a.holder(&ip1).is_none()), "{ip1} still allocated after docker rm -f");
    assert!(
        wait_until(SECS(10), || !a.json(&["ps", "--json"]).as_array().unwrap().iter().any(|e| e["target"] == r1.as_str())),
        "removed container still attached"
    );
    eprintln!("docker plugin scenario done");
}

/// What the test's upstream resolver answers for an outside name.
const EXTERNAL: &str = "ext.example.org.";
const EXTERNAL_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 77);

/// Network namespaces made by the DNS test (deleted on drop) and its resolver thread (stopped).
struct Netns {
    names: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for n in &self.names {
            let _ = run(Command::new("ip").args(["netns", "del", n]), SECS(10));
        }
    }
}

/// The test's upstream resolver on `ip:53` in namespace `ns`: answers
/// [`EXTERNAL`] with [`EXTERNAL_ADDR`], every other name NXDOMAIN; returns how
/// many questions it answered with an address when `stop` is set.
fn upstream_resolver(ns: &str, ip: std::net::Ipv4Addr, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    let ns = ns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        meshnet_tests::hostile::in_netns(&ns, move || {
            let sock = UdpSocket::bind((ip, 53)).expect("bind the upstream resolver");
            sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            tx.send(()).unwrap();
            let mut answered = 0;
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, src)) = sock.recv_from(&mut buf) else { continue };
                let Ok(req) = Message::from_vec(&buf[..n]) else { continue };
                let Some(q) = req.queries.first() else { continue };
                let mut resp = Message::response(req.metadata.id, OpCode::Query);
                resp.metadata.recursion_desired = req.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                resp.add_query(q.clone());
                if q.name().to_lowercase().to_ascii() == EXTERNAL && q.query_type() == hickory_proto::rr::RecordType::A {
                    resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(EXTERNAL_ADDR))));
                    answered += 1;
                } else if q.name().to_lowercase().to_ascii() != EXTERNAL {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), src);
            }
            answered
        })
    });
    rx.recv_timeout(SECS(10)).expect("the upstream resolver started");
    handle
}

/// The IPv4 address `name` resolves to in `container` (glibc's resolver), if any.
fn resolve_in(container: &str, name: &str) -> Option<String> {
    let out = run(Command::new("docker").args(["exec", container, "getent", "ahostsv4", name]), SECS(20));
    out.ok().then(|| out.stdout.split_whitespace().next().unwrap_or_default().to_string())
}

/// Two routers; containers use router 1's DNS server (`meshnet dns-args` given
/// to `docker run`): a container on router 1 resolves and pings by name a
/// container on router 2, registered by the plugin's Join (and one attached by
/// name with `meshnet attach`); an outside name is forwarded to the resolver of
/// router 1's resolv.conf (a resolver the test runs in a namespace of its own,
/// on the overlay; each router runs in its own mount namespace with its own
/// resolv.conf bind-mounted, so nothing goes to this host's resolvers). After
/// `docker rm -f` on router 2 the name stops resolving on router 1 within
/// seconds, also when it was removed during a partition between the routers
/// (iptables DROP of their ports), once that heals. A container attached by
/// name, or started through the plugin, is also found by its host name when
/// that is in the domain (`--hostname NAME.meshnet.local`), and one stopped while its router was
/// down stops resolving once the router is back (and resolves again on `docker start`).
#[test]
fn docker_names_across_routers() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Instant;
    if let Some(why) = no_docker() {
        eprintln!("skipping: {why}");
        return;
    }
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos();
    let tag = format!("{:05x}", (std::process::id() ^ nanos) & 0xfffff);
    // Made before the routers (each copies this host's mounts when it starts
    // in its own mount namespace), dropped after them.
    let upstream_ns = format!("mndnsup{tag}");
    let mut netns = Netns { names: vec![], stop: Arc::new(AtomicBool::new(false)) };
    run(Command::new("ip").args(["netns", "add", &upstream_ns]), SECS(10)).expect_ok("ip netns add");
    netns.names.push(upstream_ns.clone());
    run(Command::new("ip").args(["-n", &upstream_ns, "link", "set", "lo", "up"]), SECS(10)).expect_ok("lo up");
    let mut w = World::new(tag, "dns");
    let image = build_image(&mut w, &["getent"]);

    // The routers' resolv.conf: the test's resolver only, on an overlay address.
    let upstream_ip: std::net::Ipv4Addr = "10.214.5.53".parse().unwrap();
    let resolv = w.dir.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {upstream_ip}\n")).unwrap();
    let range = "10.214.0.0/16";
    let names = ["02:00:5e:d1:00:0a", "02:00:5e:d1:00:0b"];
    for (i, side) in ["a", "b"].iter().enumerate() {
        w.routers.push(Router {
            state: w.dir.join(format!("state-{side}")),
            plugin: w.name(&format!("mnd{side}")),
            bridge: w.name(&format!("mnd{side}")),
            port: free_port(),
        });
        let r = &w.routers[i];
        let port = r.port.to_string();
        let seed = format!("seed={}", names.join(","));
        let peer = format!("127.0.0.1:{}", w.routers[0].port);
        let mut cmd = Command::new("unshare");
        // A mount namespace of its own (slave: it still sees this host's later
        // mounts) whose /etc/resolv.conf is the test's; the daemon `launch`
        // starts inherits it.
        cmd.args(["-m", "--propagation", "slave", "--", "sh", "-c", "mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"", "sh"])
            .arg(&resolv)
            .arg(meshnet_bin())
            .arg("--state-dir")
            .arg(&r.state)
            .args([
                "launch", "--host", "127.0.0.1", "--port", &port, "--bridge", &r.bridge, "--name", names[i], "--nickname", side,
                "--no-discovery", "--ipalloc-range", range, "--ipalloc-init", &seed, "--docker-plugin-name", &r.plugin,
                "--metrics-addr=",
            ]);
        if i == 1 {
            cmd.arg(&peer);
        }
        cmd.env_remove("MESHNET_PASSWORD");
        run(&mut cmd, SECS(60)).expect_ok(&format!("launch router {side} in its own mount namespace"));
    }
    let (a, b) = (w.routers[0].clone(), w.routers[1].clone());
    // Each router daemon runs in a mount namespace of its own, where
    // /etc/resolv.conf is the test's: nothing is forwarded to this host's resolvers.
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    for r in [&a, &b] {
        let pid = std::fs::read_to_string(r.state.join("meshnet.pid")).unwrap();
        let pid = pid.trim();
        let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(mnt, own_mnt, "router {pid} shares the test's mount namespace");
        let conf = std::fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf")).unwrap();
        assert_eq!(conf, format!("nameserver {upstream_ip}\n"), "router {pid}'s resolv.conf");
    }
    for r in [&a, &b] {
        let rule = ["DOCKER-USER", "-i", &r.bridge, "-o", &r.bridge, "-j", "ACCEPT"];
        if run(Command::new("iptables").arg("-I").args(rule), SECS(10)).ok() {
            w.iptables.push(rule.iter().map(|s| s.to_string()).collect());
        }
    }
    let connected = |a: &Router| {
        a.json(&["status", "connections", "--json"])
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["peer"] == names[1] && c["state"] == "established"))
    };
    assert!(wait_until(SECS(30), || connected(&a)), "the routers did not connect: {}", a.meshnet(&["status", "connections"]));

    // The test's upstream resolver, on the overlay through router B.
    b.meshnet(&["attach", &format!("{upstream_ip}/24"), &upstream_ns]).expect_ok("attach the upstream resolver's namespace");
    let resolver = upstream_resolver(&upstream_ns, upstream_ip, netns.stop.clone());

    // The same overlay subnet through each router's plugin; router A's gateway
    // is its first exposed address, where its DNS server listens.
    let subnet = "10.214.5.0/24";
    let (net_a, net_b) = (w.name("mndneta"), w.name("mndnetb"));
    for (net, p) in [(&net_a, &a.plugin), (&net_b, &b.plugin)] {
        w.networks.push(net.clone());
        docker(&["network", "create", "--driver", p, "--ipam-driver", p, "--subnet", subnet, net])
            .expect_ok(&format!("docker network create {net}"));
    }
    assert!(wait_until(SECS(5), || a.meshnet(&["dns-args"]).ok()), "router A's DNS server does not listen: {}", a.meshnet(&["dns-args"]));
    let dns_args = a.meshnet(&["dns-args"]).expect_ok("dns-args").stdout.trim().to_string();
    let server = dns_args.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert!(server.starts_with("10.214.5.") && dns_args.ends_with("--dns-search meshnet.local"), "dns-args: {dns_args}");
    let dns: Vec<&str> = dns_args.split_whitespace().collect();

    let (ca, cb) = (w.name("mndca"), w.name("mndcb"));
    let mut args = vec!["--network", &net_a];
    args.extend(&dns);
    args.extend([&image[..], "sleep", "3600"]);
    w.run_container(&ca, &args).expect_ok("docker run on router A's network");
    // cb's host name is a name of the domain: registered too (Weave's 800 test).
    let host_b = format!("{cb}-host.meshnet.local");
    w.run_container(&cb, &["--network", &net_b, "--hostname", &host_b, &image, "sleep", "3600"]).expect_ok("docker run on router B's network");
    let ip_b = ip_in(&cb, &net_b);
    assert!(ip_b.starts_with("10.214.5."), "{ip_b}");

    // cb (registered by router B's plugin) resolves on router A, and ca pings it by its bare name.
    eprintln!("dns: {ca} resolver: {}", docker(&["inspect", "-f", "{{.HostConfig.Dns}} {{.HostConfig.DnsSearch}}", &ca]).stdout.trim());
    let answered = |r: &Router| r.json(&["status", "dns", "--json"])["counters"]["answered"].as_u64().unwrap_or(0);
    let answered_before = answered(&a);
    let fqdn_b = format!("{cb}.meshnet.local");
    let t = Instant::now();
    assert!(
        wait_until(SECS(15), || resolve_in(&ca, &fqdn_b).as_deref() == Some(&ip_b[..])),
        "{ca} does not resolve {fqdn_b} to {ip_b}: {:?}; router A: {}",
        resolve_in(&ca, &fqdn_b),
        a.meshnet(&["status", "dns"])
    );
    eprintln!("dns: {fqdn_b} -> {ip_b} resolved in {ca} (router A) after {} ms", t.elapsed().as_millis());
    assert!(answered(&a) > answered_before, "router A's server answered nothing: the name came from elsewhere");
    assert_eq!(a.meshnet(&["dns-lookup", &cb]).expect_ok("dns-lookup").stdout.trim(), ip_b);
    let ping = docker(&["exec", &ca, "ping", "-c", "2", "-i", "0.3", "-W", "2", &cb]);
    assert!(ping.ok() && ping.stdout.contains(&ip_b), "{ca} cannot ping {cb} by name: {ping}");
    eprintln!("dns: {ca} pinged {cb} by name");
    assert!(
        wait_until(SECS(15), || resolve_in(&ca, &host_b).as_deref() == Some(&ip_b[..])),
        "{ca} does not resolve {cb}'s host name {host_b}: {}",
        a.meshnet(&["status", "dns"])
    );

    // An outside name: forwarded by router A to the test's resolver.
    let before = a.json(&["status", "dns", "--json"])["counters"]["forwarded"].as_u64().unwrap_or(0);
    assert_eq!(resolve_in(&ca, EXTERNAL.trim_end_matches('.')), Some(EXTERNAL_ADDR.to_string()), "the outside name");
    let forwarded = a.json(&["status", "dns", "--json"])["counters"]["forwarded"].as_u64().unwrap_or(0);
    assert!(forwarded > before, "router A forwarded nothing ({before} -> {forwarded})");

    // docker rm -f on router B: the name is gone on router A within seconds.
    docker(&["rm", "-f", &cb]).expect_ok("docker rm -f cb");
    let t = Instant::now();
    assert!(
        wait_until(SECS(5), || resolve_in(&ca, &fqdn_b).is_none() && resolve_in(&ca, &host_b).is_none()),
        "{fqdn_b} or {host_b} still resolves after docker rm -f"
    );
    eprintln!("dns: {fqdn_b} gone on router A {} ms after docker rm -f", t.elapsed().as_millis());

    // The same with a partition: a container removed on router B while the
    // routers cannot reach each other is gone on router A once it heals.
    let cp = w.name("mndcp");
    w.run_container(&cp, &["--network", &net_b, &image, "sleep", "3600"]).expect_ok("docker run cp");
    let ip_p = ip_in(&cp, &net_b);
    let fqdn_p = format!("{cp}.meshnet.local");
    assert!(wait_until(SECS(15), || resolve_in(&ca, &fqdn_p).as_deref() == Some(&ip_p[..])), "{fqdn_p} does not resolve on router A");
    let ports = format!("{},{}", a.port, b.port);
    let rules: Vec<Vec<String>> = ["tcp", "udp"]
        .iter()
        .map(|p| ["INPUT", "-i", "lo", "-p", p, "-m", "multiport", "--ports", &ports, "-j", "DROP"].iter().map(|s| s.to_string()).collect())
        .collect();
    for rule in &rules {
        run(Command::new("iptables").arg("-I").args(rule), SECS(10)).expect_ok("partition");
        w.iptables.push(rule.clone());
    }
    // Until router A closed the connection (UDP lost for 30 s): nothing queued on it survives.
    let t = Instant::now();
    let any_conn = |r: &Router| {
        r.json(&["status", "connections", "--json"]).as_array().is_some_and(|c| c.iter().any(|c| c["peer"] == names[1]))
    };
    assert!(wait_until(SECS(60), || !any_conn(&a)), "the partition did not close the connection: {}", a.meshnet(&["status", "connections"]));
    eprintln!("partition: router A closed its connection to router B after {} ms", t.elapsed().as_millis());
    docker(&["rm", "-f", &cp]).expect_ok("docker rm -f cp during the partition");
    assert!(
        wait_until(SECS(5), || b.meshnet(&["dns-lookup", &cp]).stderr.contains("no such name")),
        "router B still has {cp}: {}",
        b.meshnet(&["status", "dns"])
    );
    assert_eq!(resolve_in(&ca, &fqdn_p), Some(ip_p.clone()), "router A cannot have learnt of the removal yet");
    for rule in &rules {
        run(Command::new("iptables").arg("-D").args(rule), SECS(10)).expect_ok("heal");
        w.iptables.retain(|r| r != rule);
    }
    let t = Instant::now();
    assert!(
        wait_until(SECS(90), || resolve_in(&ca, &fqdn_p).is_none()),
        "{fqdn_p} still resolves on router A after the partition healed: {}",
        a.meshnet(&["status", "dns"])
    );
    eprintln!("partition healed: {fqdn_p} gone on router A after {} ms", t.elapsed().as_millis());

    // Containers attached by name (`meshnet attach`) are registered too.
    let (r1, r2) = (w.name("mndr1"), w.name("mndr2"));
    let mut args = vec!["--network", "none"];
    args.extend(&dns);
    args.extend([&image[..], "sleep", "3600"]);
    w.run_container(&r1, &args).expect_ok("docker run r1");
    // r2's host name is a name of the domain: it is registered too, as `weave attach` did.
    let host_r2 = format!("{r2}-host.meshnet.local");
    w.run_container(&r2, &["--network", "none", "--hostname", &host_r2, &image, "sleep", "3600"]).expect_ok("docker run r2");
    a.meshnet(&["attach", "10.214.5.61/24", &r1]).expect_ok("attach r1 by name");
    b.meshnet(&["attach", "10.214.5.62/24", &r2]).expect_ok("attach r2 by name");
    let fqdn_r2 = format!("{r2}.meshnet.local");
    assert!(
        wait_until(SECS(15), || resolve_in(&r1, &host_r2).as_deref() == Some("10.214.5.62")),
        "{r1} does not resolve {r2}'s host name {host_r2}: {}",
        a.meshnet(&["status", "dns"])
    );
    assert!(
        wait_until(SECS(15), || resolve_in(&r1, &fqdn_r2).as_deref() == Some("10.214.5.62")),
        "{r1} does not resolve {fqdn_r2}: {:?}; router A: {}; {}; {r1} to router A's server: {}",
        resolve_in(&r1, &fqdn_r2),
        a.meshnet(&["dns-lookup", &r2]),
        a.meshnet(&["status", "connections"]),
        docker(&["exec", &r1, "ping", "-c", "2", "-W", "1", &server])
    );
    let ping = docker(&["exec", &r1, "ping", "-c", "2", "-i", "0.3", "-W", "2", &r2]);
    assert!(ping.ok() && ping.stdout.contains("10.214.5.62"), "{r1} cannot ping {r2} by name: {ping}");
    let counters = |r: &Router| r.json(&["status", "dns", "--json"])["counters"].clone();
    let before = counters(&a);
    let t = Instant::now();
    let mut tries = 0;
    assert!(
        wait_until(SECS(15), || {
            tries += 1;
            resolve_in(&r1, EXTERNAL.trim_end_matches('.')) == Some(EXTERNAL_ADDR.to_string())
        }),
        "the outside name from {r1}: router A's DNS counters {before} -> {}",
        counters(&a)
    );
    eprintln!("attach: {EXTERNAL} forwarded for {r1} in {} ms ({tries} lookups; router A's DNS counters {before} -> {})", t.elapsed().as_millis(), counters(&a));
    eprintln!("attach: {r1} (router A) resolved and pinged {r2} (router B) by name");
    // r2 stopped while router B is down: once B is back its names no longer
    // resolve (as when B sees it stop), and they do again when it starts.
    b.meshnet(&["stop"]).expect_ok("stop router B");
    docker(&["stop", "-t", "0", &r2]).expect_ok("docker stop r2");
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "slave", "--", "sh", "-c", "mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"", "sh"])
        .arg(&resolv)
        .arg(meshnet_bin())
        .arg("--state-dir")
        .arg(&b.state)
        .args(["launch", "--resume"]);
    cmd.env_remove("MESHNET_PASSWORD");
    run(&mut cmd, SECS(60)).expect_ok("launch --resume router B");
    assert!(
        wait_until(SECS(15), || resolve_in(&r1, &fqdn_r2).is_none() && resolve_in(&r1, &host_r2).is_none()),
        "{r2}, stopped while router B was down, still resolves: {}",
        a.meshnet(&["status", "dns"])
    );
    docker(&["start", &r2]).expect_ok("docker start r2");
    assert!(
        wait_until(SECS(15), || resolve_in(&r1, &host_r2).as_deref() == Some("10.214.5.62")),
        "{host_r2} does not resolve after docker start: {}",
        a.meshnet(&["status", "dns"])
    );
    docker(&["rm", "-f", &r2]).expect_ok("docker rm -f r2");
    let t = Instant::now();
    assert!(
        wait_until(SECS(5), || resolve_in(&r1, &fqdn_r2).is_none() && resolve_in(&r1, &host_r2).is_none()),
        "{fqdn_r2} still resolves after docker rm -f"
    );
    eprintln!("attach: {fqdn_r2} gone on router A {} ms after docker rm -f", t.elapsed().as_millis());

    netns.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = resolver.join().unwrap();
    assert!(answered >= 2, "the upstream resolver answered {answered} questions for {EXTERNAL}");
    eprintln!("docker dns scenario done; the upstream resolver answered {answered}");
}

/// The router killed (`kill -9`) in the middle of Docker's calls, then
/// relaunched with `launch --resume`:
/// - in the middle of a `Join` (`docker run`): Docker sends the call again
///   once the router is back, but without its request (its plugin client sends
///   the body it already read out). Before, the router answered "bad
///   NetworkDriver.Join request: EOF" and `docker run` failed with it; now it
///   answers the call that was cut short and the container runs with its
///   address. The router is held in that call by `strace` delaying the first
///   socket it opens (the netlink socket that makes the veth pair); skipped
///   without strace.
/// - a call Docker sent that the router never read (it was stopped, then
///   killed): Docker's empty resend gets an error that says what happened.
/// - a veth pair of the plugin's naming left on the bridge with no endpoint
///   (a router that stopped between saving that a container left and deleting
///   its pair): deleted at the relaunch, and logged; a port of another name on
///   the bridge and a pair of the plugin's naming on another bridge stay.
///   Before, it stayed for good.
#[test]
fn docker_plugin_across_a_crash_mid_call() {
    let Some(mut w) = World::for_test("crash", 7) else { return };
    let image = build_image(&mut w, &[]);
    let r = w.lone_router("mnk", "02:00:5e:d2:00:0a", "10.215.0.0/16", &[]);
    let net = w.name("mnknet");
    w.networks.push(net.clone());
    docker(&["network", "create", "--driver", &r.plugin, "--ipam-driver", &r.plugin, "--subnet", "10.215.5.0/24", &net])
        .expect_ok("docker network create");
    let c1 = w.name("mnk1");
    w.run_container(&c1, &["--network", &net, &image, "sleep", "3600"]).expect_ok("docker run c1");
    let ip1 = ip_in(&c1, &net);
    // Its registration is done (it opens sockets to the engine meanwhile).
    let said = format!("({}) is on the overlay as {ip1}/24", &full_id(&c1)[..12]);
    assert!(wait_until(SECS(10), || r.log().contains(&said)), "{}", r.log());
    let pid = || std::fs::read_to_string(r.state.join("meshnet.pid")).expect("pid file").trim().to_string();
    let relaunch = || r.meshnet(&["launch", "--resume"]).expect_ok("launch --resume");
    let ports = |bridge: &str| run(Command::new("ip").args(["-br", "link", "show", "master", bridge]), SECS(10)).stdout;

    // 1. Killed in the middle of a Join.
    if run(Command::new("strace").arg("-V"), SECS(10)).ok() {
        let (c2, started, _) = held_in_a_join(&mut w, &r, &image, &net, "mnk2");
        relaunch();
        let out = started.join().unwrap();
        assert!(out.ok(), "docker run whose Join was cut short by kill -9 failed: {out}\n{}", r.log());
        let ip2 = ip_in(&c2, &net);
        assert!(ip2.starts_with("10.215.5.") && ip2 != ip1, "{c2} got {ip2:?}");
        let link = docker(&["exec", &c2, "ip", "-o", "-4", "addr", "show", "dev", "ethwe0"]).expect_ok("ethwe0 in c2");
        assert!(link.stdout.contains(&format!("{ip2}/24")), "{link}");
        assert!(r.holder(&ip2).is_some_and(|k| k.starts_with("docker-plugin:")), "{ip2} is not in IPAM");
        assert!(r.log().contains("NetworkDriver.Join, cut short when the router stopped, sent again"), "{}", r.log());
        eprintln!("crash: {c2} started with {ip2} after kill -9 during its Join");
    } else {
        eprintln!("no strace: not killing the router in the middle of a Join");
    }

    // 1b. Held in a Join for longer than Docker retries it: Docker gives up
    // and undoes the command (DeleteEndpoint, then ReleaseAddress of its
    // address X, each retried for 15 s). The router is back while Docker still
    // retries the release, and another container is started at once. Before,
    // the start-up check forgot the endpoint and freed X, the new container got
    // X, and Docker's late release freed it under that container (`status
    // ipam` no longer held it). Now X stays held until Docker is done, and a
    // release of an address an endpoint has is refused.
    if run(Command::new("strace").arg("-V"), SECS(10)).ok() {
        let (cl, started, t0) = held_in_a_join(&mut w, &r, &image, &net, "mnkl");
        while t0.elapsed() < SECS(34) {
            std::thread::sleep(Duration::from_millis(200));
        }
        relaunch();
        let cn = w.name("mnkn");
        w.run_container(&cn, &["--network", &net, &image, "sleep", "3600"]).expect_ok("docker run right after the relaunch");
        let ipn = ip_in(&cn, &net);
        let out = started.join().unwrap();
        assert!(!out.ok(), "{cl} started after all: {out}");
        // Docker's last retry of the release has come.
        std::thread::sleep(SECS(12));
        assert!(r.holder(&ipn).is_some_and(|k| k.starts_with("docker-plugin:")), "{cn}'s {ipn} was freed under it by a late release\n{}", r.log());
        eprintln!("crash: {cn} kept {ipn} across Docker's late release for {cl}");
    }

    // 2. Killed with Docker's call unread: the resend gets a clear error.
    let p = pid();
    run(Command::new("kill").args(["-STOP", &p]), SECS(10)).expect_ok("kill -STOP");
    let c3 = w.name("mnk3");
    w.containers.push(c3.clone());
    let (image3, net3, c3r) = (image.clone(), net.clone(), c3.clone());
    let started = std::thread::spawn(move || {
        run(Command::new("docker").args(["run", "-d", "--pull=never", "--name", &c3r, "--network", &net3, &image3, "sleep", "3600"]), SECS(120))
    });
    std::thread::sleep(SECS(2));
    run(Command::new("kill").args(["-9", &p]), SECS(10)).expect_ok("kill -9 the router");
    std::thread::sleep(SECS(1));
    relaunch();
    let out = started.join().unwrap();
    assert!(!out.ok() && out.stderr.contains("again without its request"), "{out}");
    eprintln!("crash: a call the router never read: {}", out.stderr.trim());

    // 3. A veth pair of the plugin's naming on the bridge, of no endpoint.
    run(Command::new("kill").args(["-9", &pid()]), SECS(10)).expect_ok("kill -9 the router");
    let stray = format!("vmd{}dead000", w.tag);
    let other_bridge = w.name("mnkq");
    let keep_name = w.name("mnkx");
    let keep_other = format!("vmd{}beef000", w.tag);
    let ip = |args: &[&str]| run(Command::new("ip").args(args), SECS(10)).expect_ok(&format!("ip {args:?}"));
    ip(&["link", "add", &other_bridge, "type", "bridge"]);
    for (port, bridge) in [(&stray, &r.bridge), (&keep_name, &r.bridge), (&keep_other, &other_bridge)] {
        let peer = format!("{}p", &port[..port.len().min(13)]);
        ip(&["link", "add", port, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", port, "master", bridge, "up"]);
    }
    relaunch();
    let said = format!("deleted {stray} from the bridge");
    let gone = wait_until(SECS(20), || !ports(&r.bridge).contains(&stray) && r.log().contains(&said));
    let (ours, others) = (ports(&r.bridge), ports(&other_bridge));
    let _ = run(Command::new("ip").args(["link", "del", &keep_name]), SECS(10));
    let _ = run(Command::new("ip").args(["link", "del", &keep_other]), SECS(10));
    let _ = run(Command::new("ip").args(["link", "del", &stray]), SECS(10));
    let _ = run(Command::new("ip").args(["link", "del", &other_bridge]), SECS(10));
    assert!(gone, "the stray {stray} is still on {}: {ours}\n{}", r.bridge, r.log());
    assert!(ours.contains(&keep_name), "{keep_name} (not of the plugin's naming) was deleted: {ours}");
    assert!(others.contains(&keep_other), "{keep_other} on another bridge was deleted: {others}");
    let ep1 = docker(&["inspect", "-f", &format!("{{{{(index .NetworkSettings.Networks \"{net}\").EndpointID}}}}"), &c1])
        .expect_ok("docker inspect")
        .stdout;
    let port1 = format!("vmd{}", &ep1.trim()[..12]);
    assert!(ours.contains(&port1), "{c1}'s port {port1} was deleted: {ours}");
    eprintln!("crash: stray {stray} deleted at the relaunch; {keep_name} and {keep_other} kept");
}

/// Starts `docker run --network net` of a container named `name`+tag on router
/// `r` and kills the router (`kill -9`) while it is in that container's `Join`:
/// `strace` holds the router in the first socket it opens, which is the
/// netlink socket that makes the veth pair; another socket of the router's (a
/// timer's) spoils the try, which is let go and made again. Returns the
/// container, the `docker run` under way and when it started.
fn held_in_a_join(
    w: &mut World,
    r: &Router,
    image: &str,
    net: &str,
    name: &str,
) -> (String, std::thread::JoinHandle<Out>, std::time::Instant) {
    for attempt in 0..5 {
        let trace = w.dir.join(format!("strace-{name}{attempt}.out"));
        let p = std::fs::read_to_string(r.state.join("meshnet.pid")).expect("pid file").trim().to_string();
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-p", &p, "-e", "trace=socket", "-e", "inject=socket:delay_exit=60000000:when=1", "-o"])
            .arg(&trace)
            .spawn()
            .expect("strace");
        std::thread::sleep(SECS(1));
        let c = w.name(&format!("{name}{attempt}"));
        w.containers.push(c.clone());
        let (image, net, cr) = (image.to_string(), net.to_string(), c.clone());
        let t0 = std::time::Instant::now();
        let started = std::thread::spawn(move || {
            run(Command::new("docker").args(["run", "-d", "--pull=never", "--name", &cr, "--network", &net, &image, "sleep", "3600"]), SECS(120))
        });
        let traced = || std::fs::read_to_string(&trace).unwrap_or_default();
        let held = wait_until(SECS(20), || traced().contains("DELAYED"));
        if held && traced().contains("socket(AF_NETLINK") {
            run(Command::new("kill").args(["-9", &p]), SECS(10)).expect_ok("kill -9 the router");
            let _ = strace.kill();
            let _ = strace.wait();
            return (c, started, t0);
        }
        eprintln!("crash: try {attempt}: held elsewhere: {}", traced().trim());
        let _ = strace.kill();
        let _ = strace.wait();
        let _ = started.join();
        let _ = docker(&["rm", "-f", &c]);
    }
    panic!("the router was never held in a Join");
}

/// What the one-router tests below start with: a router on the host
/// namespace (seeded, so its ring is agreed at once; bridge and plugin named
/// `short` + tag), a network namespace `ns` to attach (deleted after the
/// World is dropped), and the test image with `extra` binaries.
struct OneRouter {
    w: World,
    r: Router,
    image: String,
    ns: String,
    _netns: Netns,
}

/// `None` (said why): no Docker Engine, skip the test.
fn one_router(label: &str, short: &str, range: &str, mac: &str, extra: &[&str]) -> Option<OneRouter> {
    let mut w = World::for_test(label, 0)?;
    let ns = format!("{short}ns{}", w.tag);
    let mut netns = Netns { names: vec![], stop: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)) };
    run(Command::new("ip").args(["netns", "add", &ns]), SECS(10)).expect_ok("ip netns add");
    netns.names.push(ns.clone());
    let image = build_image(&mut w, extra);
    let r = w.lone_router(short, mac, range, &[]);
    Some(OneRouter { w, r, image, ns, _netns: netns })
}

/// `attach --without-dns` and `dns-add` without `-h` (Weave's forms), on one
/// router on the host namespace with containers attached by name:
/// - `attach --without-dns` registers neither the container's name nor its
///   host name (a container attached without it is, as a control), with the
///   flag before or after the addresses and with `--no-multicast-route` too
///   (no `224.0.0.0/4` route, the other flag kept). Neither is registered
///   when the router attaches the container again: after `docker restart`,
///   nor after one while the router was down (`stop`, `launch --resume`).
/// - `dns-add CONTAINER` without `-h` registers its host name when that is
///   in the domain, else its container name; for a namespace target, or
///   addresses of no target, it is an error asking for `-h NAME` that changes
///   nothing. `dns-remove CONTAINER` removes its records; `detach` works.
/// - An `attach` again without the flag registers the names (the last attach
///   decides), also after a `docker restart`.
#[test]
fn containers_attached_without_dns_and_named_by_dns_add() {
    let Some(OneRouter { _netns: _netns_kept, mut w, ns, r, image }) = one_router("nodns", "mnw", "10.215.0.0/16", "02:00:5e:d1:00:2a", &[]) else { return };

    // q: --without-dns; m: --without-dns --no-multicast-route, after the
    // address (Weave's order); n: neither. q and n have host names in the domain.
    let (q, m, n) = (w.name("mnwq"), w.name("mnwm"), w.name("mnwn"));
    let (host_q, host_n) = (format!("{q}-host.meshnet.local"), format!("{n}-host.meshnet.local"));
    for (c, host) in [(&q, Some(&host_q)), (&m, None), (&n, Some(&host_n))] {
        let mut args = vec!["--network", "none"];
        if let Some(h) = host {
            args.extend(["--hostname", h.as_str()]);
        }
        args.extend([&image[..], "sleep", "3600"]);
        w.run_container(c, &args).expect_ok(&format!("docker run {c}"));
    }
    r.meshnet(&["attach", "--without-dns", "10.215.5.61/24", &q]).expect_ok("attach --without-dns q");
    r.meshnet(&["attach", "10.215.5.62/24", "--without-dns", "--no-multicast-route", &m]).expect_ok("attach --without-dns --no-multicast-route m");
    r.meshnet(&["attach", "10.215.5.63/24", &n]).expect_ok("attach n");
    let lookup = |what: &str| {
        let out = r.meshnet(&["dns-lookup", what]);
        out.ok().then(|| out.stdout.trim().to_string())
    };
    let records = || r.json(&["status", "dns", "--json"])["records"].clone();
    let has_addr = |c: &str, ip: &str| docker(&["exec", c, "ip", "-o", "addr", "show", "ethwe"]).stdout.contains(&format!("{ip}/24"));
    let multicast_route = |c: &str| docker(&["exec", c, "ip", "route"]).stdout.contains("224.0.0.0/4");
    let unnamed = |when: &str| {
        for name in [&q, &host_q, &m] {
            assert_eq!(lookup(name), None, "{when}: {name} is in DNS: {}", r.meshnet(&["status", "dns"]));
        }
    };
    assert_eq!(lookup(&n).as_deref(), Some("10.215.5.63"), "the control: n is registered: {}", r.meshnet(&["status", "dns"]));
    assert_eq!(lookup(&host_n).as_deref(), Some("10.215.5.63"));
    unnamed("after attach --without-dns");
    assert!(multicast_route(&q), "q lost its multicast route: {}", docker(&["exec", &q, "ip", "route"]));
    assert!(!multicast_route(&m), "m has a multicast route: {}", docker(&["exec", &m, "ip", "route"]));

    // docker restart: the router attaches them again, the same way.
    for c in [&q, &m] {
        docker(&["restart", "-t", "0", c]).expect_ok(&format!("docker restart {c}"));
    }
    assert!(
        wait_until(SECS(15), || has_addr(&q, "10.215.5.61") && has_addr(&m, "10.215.5.62")),
        "q and m were not attached again after docker restart: {}",
        r.log()
    );
    std::thread::sleep(SECS(1));
    unnamed("after docker restart");
    assert!(multicast_route(&q) && !multicast_route(&m), "the multicast routes after docker restart");

    // Restarted while the router was down: attached again at its launch, still without names.
    r.meshnet(&["stop"]).expect_ok("stop");
    for c in [&q, &m] {
        docker(&["restart", "-t", "0", c]).expect_ok(&format!("docker restart {c} while the router is down"));
    }
    r.meshnet(&["launch", "--resume"]).expect_ok("launch --resume");
    assert!(
        wait_until(SECS(15), || has_addr(&q, "10.215.5.61") && has_addr(&m, "10.215.5.62")),
        "q and m were not attached again after the router's restart: {}",
        r.log()
    );
    std::thread::sleep(SECS(1));
    unnamed("after the router's restart");
    assert!(!multicast_route(&m), "m has a multicast route after the router's restart");
    assert_eq!(lookup(&n).as_deref(), Some("10.215.5.63"), "n kept its name");

    // dns-add without -h: a namespace target, or addresses of no target, is
    // an error asking for -h NAME, and changes nothing.
    r.meshnet(&["attach", "10.215.5.64/24", &ns]).expect_ok("attach the namespace");
    let before = records();
    for args in [vec!["dns-add", ns.as_str()], vec!["dns-add", "10.215.5.99"]] {
        let out = r.meshnet(&args);
        assert!(!out.ok() && out.stderr.contains("-h NAME"), "{args:?}: {out}");
    }
    assert_eq!(records(), before, "a refused dns-add changed the table");
    // A container's host name in the domain; one without: its container name.
    let out = r.meshnet(&["dns-add", &q]).expect_ok("dns-add q");
    assert_eq!(out.stdout.trim(), format!("{host_q}. 10.215.5.61"));
    assert_eq!(lookup(&host_q).as_deref(), Some("10.215.5.61"));
    assert_eq!(lookup(&q), None, "dns-add without -h registers one name");
    let out = r.meshnet(&["dns-add", &m]).expect_ok("dns-add m");
    assert_eq!(out.stdout.trim(), format!("{m}.meshnet.local. 10.215.5.62"));
    assert_eq!(lookup(&m).as_deref(), Some("10.215.5.62"));
    // dns-remove without -h: all of the target's records.
    r.meshnet(&["dns-remove", &q]).expect_ok("dns-remove q");
    assert_eq!(lookup(&host_q), None);
    // detach works; attached again without the flag, m's names are
    // registered, and again after a docker restart.
    r.meshnet(&["detach", &q]).expect_ok("detach q");
    assert!(!docker(&["exec", &q, "ip", "link", "show", "ethwe"]).ok(), "q kept ethwe after detach");
    assert!(r.json(&["ps", "--json", &q]).as_array().is_some_and(|a| a.is_empty()), "ps still lists q");
    r.meshnet(&["dns-remove", &m]).expect_ok("dns-remove m");
    r.meshnet(&["attach", "10.215.5.62/24", &m]).expect_ok("attach m again without --without-dns");
    assert_eq!(lookup(&m).as_deref(), Some("10.215.5.62"));
    r.meshnet(&["dns-remove", &m]).expect_ok("dns-remove m");
    docker(&["restart", "-t", "0", &m]).expect_ok("docker restart m");
    assert!(
        wait_until(SECS(15), || lookup(&m).as_deref() == Some("10.215.5.62")),
        "m, attached last without --without-dns, is not registered after docker restart: {}",
        r.meshnet(&["status", "dns"])
    );
    r.meshnet(&["detach", &ns]).expect_ok("detach the namespace");
    eprintln!("attach --without-dns and dns-add without -h: done");
}

/// `attach --rewrite-hosts [--add-host HOST:IP ...]` (Weave's options), on one
/// router on the host namespace: the container's `/etc/hosts` maps its host
/// name (with its domain, and its first label) to its overlay address, plus
/// the extra hosts (`getent` finds them); a container with Docker's default
/// host name (its short ID) gets that. After `docker restart` (Docker writes
/// the file anew) the router's attach writes it again. `--add-host` without
/// `--rewrite-hosts`, a malformed `HOST:IP`, and `--rewrite-hosts` of a
/// namespace are errors that attach nothing.
#[test]
fn attach_rewrite_hosts() {
    let Some(OneRouter { _netns: _netns_kept, mut w, ns, r, image }) = one_router("hosts", "mnh", "10.216.0.0/16", "02:00:5e:d1:00:3a", &["getent", "cat"]) else {
        return;
    };
    let (h, d) = (w.name("mnhh"), w.name("mnhd"));
    let host_h = format!("{h}.meshnet.local");
    w.run_container(&h, &["--network", "none", "--hostname", &host_h, &image, "sleep", "3600"]).expect_ok("docker run h");
    w.run_container(&d, &["--network", "none", &image, "sleep", "3600"]).expect_ok("docker run d");
    let hosts = |c: &str| docker(&["exec", c, "cat", "/etc/hosts"]).stdout;
    let getent = |c: &str, n: &str| docker(&["exec", c, "getent", "hosts", n]).stdout.split_whitespace().next().map(str::to_string);
    let attached = |what: &str| r.json(&["ps", "--json", what]).as_array().is_some_and(|a| !a.is_empty());

    // Bad input: errors, nothing attached.
    let before = hosts(&d);
    for (args, want) in [
        (vec!["attach", "--add-host", "x:10.9.9.9", "10.216.5.70/24", d.as_str()], "--rewrite-hosts"),
        (vec!["attach", "--rewrite-hosts", "--add-host", "static.name", "10.216.5.70/24", d.as_str()], "HOST:IP"),
        (vec!["attach", "--rewrite-hosts", "--add-host", "s:10.9.9", "10.216.5.70/24", d.as_str()], "not an IP address"),
        (vec!["attach", "--rewrite-hosts", "10.216.5.71/24", ns.as_str()], "Docker container"),
    ] {
        let out = r.meshnet(&args);
        assert!(!out.ok() && out.stderr.contains(want), "{args:?}: expected an error with {want:?}: {out}");
    }
    assert!(!attached(&d) && !attached(&ns), "a refused attach attached: {}", r.meshnet(&["ps"]));
    assert_eq!(hosts(&d), before, "a refused attach changed d's /etc/hosts");

    r.meshnet(&["attach", "--rewrite-hosts", "--add-host", "static.name:10.9.9.9", "--add-host=other:10.9.9.8", "10.216.5.61/24", &h])
        .expect_ok("attach --rewrite-hosts h");
    let line = format!("10.216.5.61     {host_h} {h}");
    let text = hosts(&h);
    assert!(text.lines().any(|l| l == line), "{h}'s /etc/hosts lacks {line:?}:\n{text}");
    assert!(text.lines().any(|l| l == "10.9.9.9        static.name") && text.contains("127.0.0.1       localhost"), "{text}");
    assert_eq!(getent(&h, &host_h).as_deref(), Some("10.216.5.61"));
    assert_eq!(getent(&h, &h).as_deref(), Some("10.216.5.61"));
    assert_eq!(getent(&h, "static.name").as_deref(), Some("10.9.9.9"));
    assert_eq!(getent(&h, "other").as_deref(), Some("10.9.9.8"));
    // Docker's default host name: the short ID.
    r.meshnet(&["attach", "10.216.5.62/24", "--rewrite-hosts", &d]).expect_ok("attach --rewrite-hosts d");
    let short = full_id(&d)[..12].to_string();
    assert!(hosts(&d).lines().any(|l| l == format!("10.216.5.62     {short}")), "{}", hosts(&d));

    // docker restart: Docker writes the file anew, the router writes it again.
    docker(&["restart", "-t", "0", &h]).expect_ok("docker restart h");
    assert!(
        wait_until(SECS(15), || hosts(&h).lines().any(|l| l == line) && hosts(&h).contains("static.name")),
        "{h}'s /etc/hosts after docker restart:\n{}\n{}",
        hosts(&h),
        r.log()
    );
    assert_eq!(getent(&h, "other").as_deref(), Some("10.9.9.8"));
    r.meshnet(&["detach", &h]).expect_ok("detach h");
    eprintln!("attach --rewrite-hosts: done");
}

/// A Docker network's gateway and subnet stay its own. One router, its
/// default subnet 10.217.0.0/24 of 10.217.0.0/16:
/// - `meshnet hide` of the exposed address a network uses as its gateway is
///   refused and changes nothing (before, it was hidden and freed, and the
///   network's next container was given the gateway's address and did not
///   start: "failed to set gateway ... network is unreachable");
/// - a network whose subnet overlaps another's on this host is refused
///   (before, a /25 inside the /24 took the /24's gateway as its own);
/// - `docker network create` without `--subnet`, once `meshnet expose` put a
///   route over the default subnet on the host (Docker then asks for another
///   pool), says to give `--subnet` (before: "already used by another
///   meshnet network", of which there was none).
#[test]
fn a_docker_networks_gateway_and_subnet_stay_its_own() {
    let Some(mut w) = World::for_test("gateway", 0) else { return };
    let image = build_image(&mut w, &[]);
    let r = w.lone_router("mnpg", "02:00:5e:d0:00:1a", "10.217.0.0/16", &["--ipalloc-default-subnet", "10.217.0.0/24"]);
    let p = r.plugin.clone();
    let exposed = || r.json(&["status", "--json"])["exposed"].to_string();

    // The host's address in 10.217.9.0/24, then a network there: its gateway.
    let out = r.meshnet(&["expose", "net:10.217.9.0/24"]).expect_ok("expose");
    assert_eq!(out.stdout.trim(), "10.217.9.1/24", "{out}");
    let net9 = w.name("mnnet9");
    w.networks.push(net9.clone());
    docker(&["network", "create", "--driver", &p, "--ipam-driver", &p, "--subnet", "10.217.9.0/24", &net9]).expect_ok("network create");
    let hide = r.meshnet(&["hide", "10.217.9.1/24"]);
    assert!(!hide.ok() && hide.stderr.contains("is the gateway of Docker network"), "hiding the gateway: {hide}");
    let hide_all = r.meshnet(&["hide"]);
    assert!(!hide_all.ok() && hide_all.stderr.contains("10.217.9.1/24 is the gateway"), "hide (all): {hide_all}");
    assert!(exposed().contains("10.217.9.1/24"), "a refused hide took the gateway away: {}", exposed());
    assert_eq!(r.holder("10.217.9.1").as_deref(), Some("meshnet:expose"));
    // So the network's container gets another address and reaches its gateway.
    let c = w.name("mngw");
    w.run_container(&c, &["--network", &net9, &image, "sleep", "3600"]).expect_ok("docker run on the network");
    let ip = ip_in(&c, &net9);
    assert!(ip.starts_with("10.217.9.") && ip != "10.217.9.1", "{c} got {ip:?}");
    assert!(wait_until(SECS(15), || pings(&c, "10.217.9.1", 1)), "{c} cannot ping its gateway 10.217.9.1");

    // A subnet overlapping the network's is refused, and so nothing is made.
    let net_in = w.name("mnnetin");
    w.networks.push(net_in.clone());
    let out = docker(&["network", "create", "--driver", &p, "--ipam-driver", &p, "--subnet", "10.217.9.0/25", &net_in]);
    assert!(!out.ok() && out.stderr.contains("overlaps subnet 10.217.9.0/24"), "an overlapping subnet: {out}");

    // The default subnet under a route of the host's (expose): Docker asks
    // again, and is told to give --subnet.
    r.meshnet(&["expose"]).expect_ok("expose in the default subnet");
    let net_d = w.name("mnnetd");
    w.networks.push(net_d.clone());
    let out = docker(&["network", "create", "--driver", &p, "--ipam-driver", &p, &net_d]);
    assert!(!out.ok() && out.stderr.contains("create the network with --subnet 10.217.0.0/24"), "the default subnet: {out}");
    docker(&["network", "create", "--driver", &p, "--ipam-driver", &p, "--subnet", "10.217.0.0/24", &net_d])
        .expect_ok("the default subnet given with --subnet");

    // Once the network is gone, its gateway may be hidden.
    docker(&["rm", "-f", &c]).expect_ok("docker rm");
    docker(&["network", "rm", &net9]).expect_ok("network rm");
    assert!(exposed().contains("10.217.9.1/24"), "the network took away an address it did not expose: {}", exposed());
    r.meshnet(&["hide", "10.217.9.1/24"]).expect_ok("hide once the network is gone");
}
