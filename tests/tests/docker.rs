//! meshnet the way users run Weave: routers in containers, app containers
//! attached by name.
//!
//! Builds the image from `deploy/Dockerfile` (target `prebuilt`, on a base image
//! that `deploy/base-image.sh` debootstraps and imports once, cached), makes a
//! user-defined Docker network as the underlay, and runs two router containers
//! on it, each in its own network namespace standing for a host. App containers
//! run with `--network none`; `docker exec ROUTER meshnet attach CIDR NAME`
//! gives them `ethwe`, and they ping each other across the routers. A removed
//! container loses its attachment (the router watches Docker's events).
//! `meshnet expose` works inside the image (it ships nftables): a container
//! reaches the router's exposed address, and `hide` removes meshnet's table.
//!
//! Needs a Docker Engine (skips with a line saying so otherwise) and root for
//! the first debootstrap. Everything it makes has a unique name and is removed
//! at the end, also on failure, except the cached base image.
//! `MESHNET_DOCKER_KEEP=1` keeps a failed run's containers for poking around.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use meshnet_tests::lab::{cni_bin, meshnet_bin, run, wait_until, workspace_root, Out};
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn docker(args: &[&str]) -> Out {
    docker_t(args, SECS(60))
}

fn docker_t(args: &[&str], timeout: Duration) -> Out {
    run(Command::new("docker").args(args), timeout)
}

/// Why Docker cannot be used here, if it cannot.
fn no_docker() -> Option<String> {
    if !Path::new("/var/run/docker.sock").exists() && std::env::var_os("DOCKER_HOST").is_none() {
        return Some("no Docker Engine (/var/run/docker.sock does not exist)".into());
    }
    let info = docker_t(&["info", "--format", "{{.ServerVersion}}"], SECS(20));
    if !info.ok() || info.stdout.trim().is_empty() {
        return Some(format!("no Docker Engine answers (`docker info`: {})", info.all().trim()));
    }
    None
}


/// Everything one test made, removed on drop.
struct World {
    tag: String,
    containers: Vec<String>,
    networks: Vec<String>,
    images: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl World {
    fn new() -> World {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos();
        World {
            tag: format!("{}{:04x}", std::process::id(), nanos & 0xffff),
            containers: vec![],
            networks: vec![],
            images: vec![],
            dirs: vec![],
        }
    }

    fn name(&self, what: &str) -> String {
        format!("{what}_{}", self.tag)
    }

    #[track_caller]
    fn run_container(&mut self, name: &str, args: &[&str]) {
        self.containers.push(name.to_string());
        let mut a = vec!["run", "-d", "--pull=never", "--name", name];
        a.extend_from_slice(args);
        docker(&a).expect_ok(&format!("docker run {name}"));
    }

    fn logs(&self, name: &str) -> String {
        docker(&["logs", name]).all()
    }

    fn dump(&self) {
        for c in &self.containers {
            eprintln!("==== docker logs {c} ====\n{}", self.logs(c).trim_end());
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
            if std::env::var("MESHNET_DOCKER_KEEP").is_ok_and(|v| !v.is_empty() && v != "0") {
                eprintln!("MESHNET_DOCKER_KEEP: keeping containers {:?}, networks {:?}", self.containers, self.networks);
                return;
            }
        }
        for c in self.containers.iter().rev() {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        for i in &self.images {
            let _ = docker(&["image", "rm", "-f", i]);
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The base image (made once by deploy/base-image.sh, then cached).
fn base_image() -> String {
    let out = run(
        &mut Command::new(workspace_root().join("deploy/base-image.sh")),
        SECS(1200),
    )
    .expect_ok("deploy/base-image.sh");
    out.last_line().expect("base-image.sh prints the image").to_string()
}

/// Builds deploy/Dockerfile (`--target prebuilt`) with the binaries under test.
fn build_image(w: &mut World, base: &str) -> String {
    let ctx = std::env::temp_dir().join(format!("meshnet-docker-ctx-{}", w.tag));
    w.dirs.push(ctx.clone());
    let deploy = ctx.join("deploy");
    std::fs::create_dir_all(deploy.join("prebuilt")).unwrap();
    for f in ["Dockerfile", "docker-entrypoint.sh", "meshnet-k8s-peers"] {
        std::fs::copy(workspace_root().join("deploy").join(f), deploy.join(f)).unwrap();
    }
    for (bin, name) in [(meshnet_bin().to_path_buf(), "meshnet"), (cni_bin(), "meshnet-cni")] {
        let dst = deploy.join("prebuilt").join(name);
        // Without debug info the context is ~8 MB instead of ~60.
        let stripped = run(Command::new("strip").arg("-o").arg(&dst).arg(&bin), SECS(60)).ok();
        if !stripped {
            std::fs::copy(&bin, &dst).unwrap();
        }
    }
    let image = format!("meshnet-test:{}", w.tag);
    w.images.push(image.clone());
    let ctx_s = ctx.to_string_lossy().into_owned();
    let dockerfile = deploy.join("Dockerfile").to_string_lossy().into_owned();
    docker_t(
        &[
            "build", "-q", "-f", &dockerfile, "--target", "prebuilt",
            "--build-arg", &format!("RUNTIME_IMAGE={base}"), "-t", &image, &ctx_s,
        ],
        SECS(300),
    )
    .expect_ok("docker build deploy/Dockerfile");
    image
}

/// What a test of routers in containers starts with: the things it makes (a
/// [`World`]), the base image, the meshnet image built on it and the `docker
/// run` flags a router container needs. `None` (said why): no Docker Engine,
/// skip the test.
struct Setup {
    w: World,
    base: String,
    image: String,
    privileges: Vec<String>,
}

fn setup() -> Option<Setup> {
    if let Some(why) = no_docker() {
        eprintln!("skipping: {why}");
        return None;
    }
    let mut w = World::new();
    let base = base_image();
    let image = build_image(&mut w, &base);
    let privileges = router_privileges(&base);
    Some(Setup { w, base, image, privileges })
}

/// `--privileged`, or what the router needs of it where the engine cannot
/// grant every capability (some sandboxes lack CAP_SYS_RESOURCE).
fn router_privileges(base: &str) -> Vec<String> {
    let p = docker(&["run", "--rm", "--pull=never", "--privileged", "--network", "none", base, "true"]);
    if p.ok() {
        return vec!["--privileged".into()];
    }
    eprintln!(
        "note: `docker run --privileged` fails here ({}); giving the routers NET_ADMIN, SYS_ADMIN, SYS_PTRACE, /dev/net/tun and unconfined system paths instead",
        p.stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim()
    );
    [
        "--cap-add=NET_ADMIN", "--cap-add=SYS_ADMIN", "--cap-add=SYS_PTRACE", "--device=/dev/net/tun",
        "--security-opt=seccomp=unconfined", "--security-opt=apparmor=unconfined",
        "--security-opt=systempaths=unconfined",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ip_of(container: &str) -> String {
    let out = docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container])
        .expect_ok("docker inspect");
    out.stdout.trim().to_string()
}

fn full_id(container: &str) -> String {
    docker(&["inspect", "-f", "{{.Id}}", container]).expect_ok("docker inspect").stdout.trim().to_string()
}

fn meshnet_in(router: &str, args: &[&str]) -> Out {
    let mut a = vec!["exec", router, "meshnet"];
    a.extend_from_slice(args);
    docker(&a)
}

#[track_caller]
fn json_of(router: &str, args: &[&str]) -> Value {
    meshnet_in(router, args).expect_ok(&format!("meshnet {args:?} in {router}")).json()
}

fn pings(from: &str, ip: &str, count: u32) -> bool {
    let c = count.to_string();
    let deadline = (count + 2).to_string();
    docker_t(&["exec", from, "ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1", "-w", &deadline, ip], SECS(u64::from(count) + 10)).ok()
}

#[test]
fn routers_in_containers_attach_containers_by_name() {
    let Some(Setup { mut w, base, image, privileges }) = setup() else { return };

    let net = w.name("meshnet_underlay");
    docker(&["network", "create", &net]).expect_ok("docker network create");
    w.networks.push(net.clone());

    // Two routers, each in its own network namespace on the underlay.
    let (r1, r2) = (w.name("meshnet_r1"), w.name("meshnet_r2"));
    let router_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = privileges.clone();
        a.extend(
            ["--pid=host", "--network", &net, "-v", "/var/run/docker.sock:/var/run/docker.sock", "-e", "MESHNET_PASSWORD=docker-test-secret", &image]
                .iter()
                .map(|s| s.to_string()),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a1 = router_args(&["launch"]);
    w.run_container(&r1, &a1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        wait_until(SECS(30), || meshnet_in(&r1, &["status"]).ok()),
        "router 1 does not answer: {}",
        w.logs(&r1)
    );
    let ip1 = ip_of(&r1);
    let a2 = router_args(&["launch", &ip1]);
    w.run_container(&r2, &a2.iter().map(String::as_str).collect::<Vec<_>>());
    let n2 = {
        assert!(wait_until(SECS(30), || meshnet_in(&r2, &["status"]).ok()), "router 2 does not answer: {}", w.logs(&r2));
        json_of(&r2, &["status", "--json"])["name"].as_str().unwrap().to_string()
    };
    assert!(
        wait_until(SECS(30), || {
            json_of(&r1, &["status", "connections", "--json"])
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["peer"] == n2.as_str() && c["state"] == "established"))
        }),
        "the routers did not connect: {}",
        meshnet_in(&r1, &["status", "connections"])
    );

    // App containers with no network of their own.
    let (app1, app2) = (w.name("weave_test"), w.name("another"));
    w.run_container(&app1, &["--network", "none", &base, "sleep", "3600"]);
    w.run_container(&app2, &["--network", "none", &base, "sleep", "3600"]);

    let out = meshnet_in(&r1, &["attach", "172.25.11.23/24", &app1]).expect_ok("attach by name on router 1");
    assert_eq!(out.stdout.trim(), "172.25.11.23/24", "{out}");
    meshnet_in(&r2, &["attach", "172.25.11.24/24", &app2]).expect_ok("attach by name on router 2");
    assert!(
        wait_until(SECS(20), || pings(&app1, "172.25.11.24", 1)),
        "{app1} cannot ping {app2} (172.25.11.24)"
    );
    assert!(pings(&app1, "172.25.11.24", 3), "ping worked once, then not");
    assert!(pings(&app2, "172.25.11.23", 3), "{app2} cannot ping {app1}");
    eprintln!("{app1} <-> {app2}: ping ok across two router containers");

    // The router container restarts (as `docker restart` or a restart policy
    // does): the same peer name from its state volume, the container still
    // attached with its address, the routers connected again, pings across.
    let n1 = json_of(&r1, &["status", "--json"])["name"].as_str().unwrap().to_string();
    docker(&["restart", "-t", "5", &r1]).expect_ok("docker restart router 1");
    assert!(wait_until(SECS(30), || meshnet_in(&r1, &["status"]).ok()), "router 1 is not back: {}", w.logs(&r1));
    assert_eq!(json_of(&r1, &["status", "--json"])["name"], n1.as_str(), "router 1 has another name after its restart");
    let ps = json_of(&r1, &["ps", "--json"]);
    assert!(
        ps.as_array().unwrap().iter().any(|e| e["target"] == app1.as_str() && e["addresses"] == serde_json::json!(["172.25.11.23/24"])),
        "{app1} is not attached after router 1's restart: {ps:#}"
    );
    assert!(
        wait_until(SECS(30), || pings(&app1, "172.25.11.24", 1) && pings(&app2, "172.25.11.23", 1)),
        "{app1} and {app2} do not reach each other after router 1's restart: {}",
        meshnet_in(&r1, &["status", "connections"])
    );
    eprintln!("router 1 restarted: {app1} still attached, pings across");

    // `ps` names the container and its short ID; attaching again by ID is the same attachment.
    let id1 = full_id(&app1);
    let ps = json_of(&r1, &["ps", "--json"]);
    let entries = ps.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{ps:#}");
    assert_eq!(entries[0]["target"], app1.as_str(), "{ps:#}");
    assert_eq!(entries[0]["kind"], "docker", "{ps:#}");
    assert_eq!(entries[0]["container_id"], &id1[..12], "{ps:#}");
    assert_eq!(entries[0]["addresses"], serde_json::json!(["172.25.11.23/24"]), "{ps:#}");
    let text = meshnet_in(&r1, &["ps"]).expect_ok("ps");
    assert!(text.stdout.contains(&format!("{app1}[{}]", &id1[..12])), "{text}");
    meshnet_in(&r1, &["attach", "172.25.11.23/24", &id1[..12]]).expect_ok("attach again by short ID");
    assert_eq!(json_of(&r1, &["ps", "--json"]).as_array().unwrap().len(), 1);

    // An unknown name says what was tried.
    let ghost = w.name("no_such_container");
    let out = meshnet_in(&r1, &["attach", "172.25.11.99/24", &ghost]);
    assert!(!out.ok(), "attaching {ghost} must fail: {out}");
    let e = out.stderr.clone();
    for want in ["unknown target", "network namespace", "process id", "Docker container", "no Docker container named"] {
        assert!(e.contains(want), "error should mention {want:?}: {e}");
    }
    eprintln!("unknown container: {}", e.trim());

    // A router without the Docker socket says so.
    let r3 = w.name("meshnet_r3");
    let mut a3: Vec<String> = privileges.clone();
    a3.extend(["--network", &net, &image, "launch", "--no-discovery"].iter().map(|s| s.to_string()));
    w.run_container(&r3, &a3.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(wait_until(SECS(30), || meshnet_in(&r3, &["status"]).ok()), "router 3: {}", w.logs(&r3));
    let out = meshnet_in(&r3, &["attach", "172.25.11.98/24", &app2]);
    assert!(!out.ok() && out.stderr.contains("no Docker Engine at /var/run/docker.sock"), "{out}");
    assert!(w.logs(&r3).contains("no Docker Engine at /var/run/docker.sock"), "{}", w.logs(&r3));
    let _ = docker(&["rm", "-f", "-v", &r3]);

    // Without an address, meshnet IPAM picks one for the container.
    let app_ipam = w.name("ipam_test");
    w.run_container(&app_ipam, &["--network", "none", &base, "sleep", "3600"]);
    let out = meshnet_in(&r1, &["attach", &app_ipam]).expect_ok("attach with an IPAM address");
    let ipam_addr = out.last_line().unwrap_or_default().to_string();
    let ipam_ip = ipam_addr.split('/').next().unwrap_or_default().to_string();
    assert!(ipam_ip.parse::<std::net::Ipv4Addr>().is_ok(), "attach printed no address: {out}");
    let ipam_key = format!("docker:{}", full_id(&app_ipam));
    let allocated = |ip: &str| -> Option<String> {
        json_of(&r1, &["status", "ipam", "--json"])["allocations"]
            .as_array()?
            .iter()
            .find(|a| a["ip"] == ip)
            .map(|a| a["target"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(allocated(&ipam_ip), Some(ipam_key.clone()), "IPAM allocations");
    eprintln!("{app_ipam}: IPAM address {ipam_addr}");

    // The image ships what `expose` needs (nftables): the router's host gets an
    // address on the overlay and meshnet's table, the container reaches it, and
    // `hide` takes both away.
    let exposed = meshnet_in(&r1, &["expose"]).expect_ok("expose in router 1").last_line().unwrap_or_default().to_string();
    let exposed_ip = exposed.split('/').next().unwrap_or_default().to_string();
    assert!(exposed_ip.parse::<std::net::Ipv4Addr>().is_ok(), "expose printed no address: {exposed:?}");
    docker(&["exec", &r1, "nft", "list", "table", "ip", "meshnet"]).expect_ok("meshnet's nftables table in router 1");
    let reached = wait_until(Duration::from_secs(10), || {
        docker(&["exec", &app_ipam, "ping", "-c", "1", "-W", "1", &exposed_ip]).ok()
    });
    assert!(reached, "{app_ipam} does not reach router 1's exposed {exposed}");
    meshnet_in(&r1, &["hide"]).expect_ok("hide in router 1");
    assert!(!docker(&["exec", &r1, "nft", "list", "table", "ip", "meshnet"]).ok(), "hide left meshnet's table");

    // The containers go away: their attachments, and the IPAM address, go with them.
    docker(&["rm", "-f", &app1, &app_ipam]).expect_ok("docker rm -f");
    assert!(
        wait_until(SECS(15), || json_of(&r1, &["ps", "--json"]).as_array().is_some_and(|a| a.is_empty())),
        "{app1} and {app_ipam} are still attached after docker rm -f: {}",
        meshnet_in(&r1, &["ps", "--json"])
    );
    assert!(
        wait_until(SECS(10), || allocated(&ipam_ip).is_none()),
        "{ipam_ip} is still allocated after docker rm -f: {}",
        meshnet_in(&r1, &["status", "ipam", "--json"])
    );
    let links = docker(&["exec", &r1, "ip", "-br", "link"]).expect_ok("ip link in router 1");
    assert!(!links.stdout.contains("vmn"), "host end of the veth left behind: {links}");
    assert!(w.logs(&r1).contains("is gone: detaching it"), "{}", w.logs(&r1));
    // Its address is free again: a new container can have it.
    let app3 = w.name("weave_test_again");
    w.run_container(&app3, &["--network", "none", &base, "sleep", "3600"]);
    meshnet_in(&r1, &["attach", "172.25.11.23/24", &app3]).expect_ok("re-use the address of the removed container");
    assert!(wait_until(SECS(20), || pings(&app2, "172.25.11.23", 1)), "{app2} cannot ping the new {app3}");

    // Detach by name.
    meshnet_in(&r1, &["detach", &app3]).expect_ok("detach by name");
    assert!(json_of(&r1, &["ps", "--json"]).as_array().unwrap().is_empty());
    eprintln!("docker scenario done");
}

/// `deploy/validate.sh`: the Kubernetes manifests against the Kubernetes JSON
/// schemas (PyPI `kubernetes-validate`, strict), the compose file, the systemd
/// unit and the shell scripts.
#[test]
fn deploy_files_validate() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipping: no python3 for the Kubernetes schema validation");
        return;
    }
    let mut cmd = Command::new(workspace_root().join("deploy/validate.sh"));
    cmd.env("MESHNET_BIN", meshnet_bin());
    let out = run(&mut cmd, SECS(600));
    eprintln!("{}", out.stdout.trim_end());
    assert!(out.ok(), "deploy/validate.sh: {out}");
}

/// The image's entrypoint hands every `meshnet` subcommand to meshnet (README,
/// "Running in Docker": "any other `meshnet` command runs that command"), so
/// `docker run --rm ... meshnet dns-args` works like `weave dns-args`. Runs the
/// script with the binary under test on PATH; no Docker needed.
#[test]
fn entrypoint_runs_every_meshnet_command() {
    let help = run(Command::new(meshnet_bin()).arg("--help"), SECS(10)).expect_ok("meshnet --help");
    let commands: Vec<String> = help
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "launch")
        .collect();
    assert!(commands.len() >= 10 && commands.iter().any(|c| c == "status"), "{help}");
    let bin_dir = std::env::temp_dir().join(format!("meshnet-entrypoint-{}", std::process::id()));
    std::fs::create_dir_all(&bin_dir).unwrap();
    let link = bin_dir.join("meshnet");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(meshnet_bin(), &link).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let entrypoint = workspace_root().join("deploy/docker-entrypoint.sh");
    let mut failed = vec![];
    for c in &commands {
        // `help --help` is refused by meshnet itself; `help status` is the same check.
        let arg = if c == "help" { "status" } else { "--help" };
        let out = run(Command::new("sh").arg(&entrypoint).args([c.as_str(), arg]).env("PATH", &path), SECS(10));
        if !out.ok() || !out.stdout.contains("Usage: meshnet") {
            failed.push(format!("{c}: {}", out.all().trim()));
        }
    }
    let _ = std::fs::remove_dir_all(&bin_dir);
    assert!(failed.is_empty(), "docker-entrypoint.sh does not run these as meshnet commands:\n{}", failed.join("\n"));
}

/// The entrypoint honours a leading `--state-dir DIR` (meshnet's global option,
/// before the command; before, it ran "--state-dir" as a program) and refuses one
/// without a directory; `launch --metrics-addr` with an unbracketed IPv6 address
/// (the DaemonSet's `$(NODE_IP):6782` on an IPv6 node) gets brackets, anything
/// else stays as given. A stand-in `meshnet` on PATH prints what it was given.
#[test]
fn entrypoint_takes_a_leading_state_dir_and_brackets_ipv6_metrics() {
    let bin_dir = std::env::temp_dir().join(format!("meshnet-entrypoint-args-{}", std::process::id()));
    std::fs::create_dir_all(&bin_dir).unwrap();
    let fake = bin_dir.join("meshnet");
    std::fs::write(&fake, "#!/bin/sh\nprintf 'dir=%s' \"${MESHNET_STATE_DIR:-}\"; for a; do printf ' <%s>' \"$a\"; done; echo\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let entrypoint = workspace_root().join("deploy/docker-entrypoint.sh");
    let run_it = |args: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.arg(&entrypoint).args(args).env("PATH", &path).env_remove("MESHNET_STATE_DIR");
        run(&mut cmd, SECS(10))
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--state-dir", "/srv/mn", "status", "--json"], "dir=/srv/mn <status> <--json>"),
        (&["--state-dir=/srv/mn", "ps"], "dir=/srv/mn <ps>"),
        (&["--state-dir", "/srv/mn"], "dir=/srv/mn <launch> <--foreground>"),
        (&["--state-dir", "/srv/mn", "launch", "10.0.0.9"], "dir=/srv/mn <launch> <--foreground> <10.0.0.9>"),
        (&["launch", "--metrics-addr", "fd00::5:6782"], "dir= <launch> <--foreground> <--metrics-addr> <[fd00::5]:6782>"),
        (&["launch", "--metrics-addr=fd00::5:6782", "--foreground"], "dir= <launch> <--metrics-addr=[fd00::5]:6782> <--foreground>"),
        (&["launch", "--metrics-addr", "10.0.0.5:6782", "fd00::9"], "dir= <launch> <--foreground> <--metrics-addr> <10.0.0.5:6782> <fd00::9>"),
        (&["launch", "--metrics-addr=[::1]:6782", "--metrics-addr="], "dir= <launch> <--foreground> <--metrics-addr=[::1]:6782> <--metrics-addr=>"),
    ];
    let mut wrong = vec![];
    for (args, want) in cases {
        let out = run_it(args);
        if !out.ok() || out.stdout.trim() != *want {
            wrong.push(format!("{args:?}: want {want:?}, got {}", out.all().trim()));
        }
    }
    for args in [&["--state-dir"][..], &["--state-dir", "", "status"], &["--state-dir=", "status"]] {
        let out = run_it(args);
        if out.ok() || !out.stderr.contains("--state-dir needs a directory") || out.stdout.contains("dir=") {
            wrong.push(format!("{args:?}: want a refusal naming --state-dir, got {}", out.all().trim()));
        }
    }
    let _ = std::fs::remove_dir_all(&bin_dir);
    assert!(wrong.is_empty(), "docker-entrypoint.sh:\n{}", wrong.join("\n"));
}

/// `docker exec ROUTER meshnet reset` (README: drive the router with `docker
/// exec`) leaves the state volume empty: the CLI run in the container dies with
/// the router, so the router removes its state itself. Before, the identity,
/// IPAM ring and targets stayed, and a restart policy brought the same router
/// back.
#[test]
fn reset_in_a_router_container_empties_its_state() {
    let Some(Setup { mut w, image, privileges, .. }) = setup() else { return };
    let state = std::env::temp_dir().join(format!("meshnet-docker-state-{}", w.tag));
    std::fs::create_dir_all(&state).unwrap();
    w.dirs.push(state.clone());
    let r = w.name("meshnet_reset");
    let volume = format!("{}:/var/lib/meshnet", state.display());
    let mut args: Vec<String> = privileges;
    args.extend(["--network", "none", "-v", &volume, &image, "launch"].iter().map(|s| s.to_string()));
    w.run_container(&r, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(wait_until(SECS(30), || meshnet_in(&r, &["status"]).ok()), "the router does not answer: {}", w.logs(&r));
    assert!(state.join("identity").exists(), "no identity in the state volume");

    // docker exec may not return once the container's main process is gone
    // (Docker 20.10): only the outcome counts.
    let _ = docker_t(&["exec", &r, "meshnet", "reset"], SECS(20));
    let exited = wait_until(SECS(20), || {
        docker(&["inspect", "-f", "{{.State.Status}}", &r]).stdout.trim() == "exited"
    });
    assert!(exited, "the router container did not exit after reset: {}", w.logs(&r));
    let left: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "reset left {left:?} in the state volume: {}", w.logs(&r));
}
