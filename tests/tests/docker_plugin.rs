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
    fn name(&self, what: &str) -> String {
        format!("{what}{}", self.tag)
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

/// A tiny image made of this host's `ping`, `sleep` and `ip` and their libraries.
fn build_image(w: &mut World) -> String {
    let root = w.dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for bin in ["ping", "sleep", "ip"] {
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
    if let Some(why) = no_docker() {
        eprintln!("skipping: {why}");
        return;
    }
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos();
    let tag = format!("{:05x}", (std::process::id() ^ nanos) & 0xfffff);
    let mut w = World {
        dir: std::env::temp_dir().join(format!("meshnet-docker-plugin-{tag}")),
        tag,
        containers: vec![],
        networks: vec![],
        image: None,
        routers: vec![],
        iptables: vec![],
    };
    std::fs::create_dir_all(&w.dir).unwrap();
    let image = build_image(&mut w);

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
    docker(&["stop", "-t", "1", &r1]).expect_ok("docker stop");
    std::thread::sleep(SECS(2));
    assert!(a.json(&["ps", "--json"]).as_array().unwrap().iter().any(|e| e["target"] == r1.as_str()), "stopped container forgotten");
    assert_eq!(a.holder(&ip1), Some(key1.clone()), "the stopped container's address was released");
    docker(&["start", &r1]).expect_ok("docker start");
    assert!(wait_until(SECS(20), || pings(&r2, &ip1, 1)), "{r1} is not back on {ip1} after docker start");
    docker(&["rm", "-f", &r1]).expect_ok("docker rm -f r1");
    assert!(wait_until(SECS(10), || a.holder(&ip1).is_none()), "{ip1} still allocated after docker rm -f");
    assert!(
        wait_until(SECS(10), || !a.json(&["ps", "--json"]).as_array().unwrap().iter().any(|e| e["target"] == r1.as_str())),
        "removed container still attached"
    );
    eprintln!("docker plugin scenario done");
}
