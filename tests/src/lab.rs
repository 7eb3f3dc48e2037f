//! The namespace lab: real `meshnet` binaries on a virtual underlay, as root.
//!
//! A [`Lab`] owns everything it creates and nothing else:
//! - network namespaces named `<prefix>sw` (the underlay switch, a bridge `br0`),
//!   `<prefix>h<i>` (a host: `lo` + `eth0`, a veth to the switch, `10.250.<k>.<i>/24`)
//!   and `<prefix>c<j>` (a container: `lo` only until `meshnet attach` adds `ethwe`);
//! - a directory `/tmp/meshnet-lab-<prefix>/` holding one state dir per host, the
//!   captures, an `owner` file (our pid) and a `namespaces` file (every namespace we
//!   made, so `scripts/lab-clean.sh` can remove the leftovers of a crashed run).
//!
//! It never creates a link, route or address in the root namespace, and no traffic
//! it causes can leave its namespaces: the switch has no uplink and no host has a
//! default route. Dropping the lab tears everything down, also while panicking
//! (then it first prints each host's status and log, and keeps a copy of the logs
//! in `/tmp/meshnet-e2e-logs/`). Set `MESHNET_LAB_KEEP=1` to keep a failed lab for
//! poking around (`always`: every lab); `scripts/lab-clean.sh --all` removes them.
//!
//! The binary under test is `$MESHNET_BIN`, else the newer of
//! `<target>/{release,debug}/meshnet`, else it is built once with
//! `cargo build --release -p meshnet`.

use std::cell::RefCell;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// Directory names of labs are `/tmp/<LAB_DIR_PREFIX><prefix>`.
pub const LAB_DIR_PREFIX: &str = "meshnet-lab-";
/// Every lab prefix starts with this, so leftovers are recognisable.
pub const NS_MARK: &str = "mx";
/// The underlay interface inside each host namespace.
pub const UNDERLAY_IF: &str = "eth0";
/// Default timeout of one `meshnet` command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static IO_COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------
// Running commands

/// What a finished (or timed-out) command left behind.
#[derive(Debug, Clone)]
pub struct Out {
    pub cmd: String,
    /// Exit code; `None` if killed by a signal or not started.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// Panics with the whole output unless the command succeeded.
    #[track_caller]
    pub fn expect_ok(self, what: &str) -> Self {
        if !self.ok() {
            panic!("{what}: {self}");
        }
        self
    }

    /// stdout and stderr together, for matching messages.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// The last non-empty line of stdout, trimmed.
    pub fn last_line(&self) -> Option<&str> {
        self.stdout.lines().map(str::trim).rfind(|l| !l.is_empty())
    }

    /// stdout parsed as JSON; panics with the output if it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        match serde_json::from_str(&self.stdout) {
            Ok(v) => v,
            Err(e) => panic!("output is not JSON ({e}): {self}"),
        }
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.timed_out {
            "TIMED OUT".to_string()
        } else if let Some(c) = self.code {
            format!("exited {c}")
        } else if let Some(s) = self.signal {
            format!("killed by signal {s}")
        } else {
            "did not run".to_string()
        };
        write!(
            f,
            "`{}` {how} after {:.1}s\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmd,
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        let k = k.to_string_lossy();
        if k.starts_with("MESHNET_") {
            if let Some(v) = v {
                s.push_str(&format!("{k}={} ", v.to_string_lossy()));
            }
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion or until `timeout` (then kills it).
///
/// Output goes to files rather than pipes: a daemon that inherits stdout must not
/// keep us waiting for EOF.
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let n = IO_COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("meshnet-io-{}-{n}", std::process::id()));
    let out_path = base.with_extension("out");
    let err_path = base.with_extension("err");
    let desc = describe(cmd);
    let start = Instant::now();
    let mut result = Out {
        cmd: desc,
        code: None,
        signal: None,
        stdout: String::new(),
        stderr: String::new(),
        timed_out: false,
        elapsed: Duration::ZERO,
    };
    let (out_f, err_f) = match (File::create(&out_path), File::create(&err_path)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            result.stderr = format!("cannot create output files: {e}");
            return result;
        }
    };
    cmd.stdin(Stdio::null()).stdout(out_f).stderr(err_f);
    match cmd.spawn() {
        Err(e) => result.stderr = format!("cannot spawn: {e}"),
        Ok(mut child) => loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    result.code = st.code();
                    result.signal = st.signal();
                    break;
                }
                Ok(None) if start.elapsed() > timeout => {
                    let _ = child.kill();
                    if let Ok(st) = child.wait() {
                        result.signal = st.signal();
                    }
                    result.timed_out = true;
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    result.stderr = format!("wait failed: {e}");
                    break;
                }
            }
        },
    }
    result.elapsed = start.elapsed();
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    let spawn_err = std::mem::take(&mut result.stderr);
    result.stdout = read(&out_path);
    result.stderr = read(&err_path) + &spawn_err;
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    result
}

/// `ip ARGS...` with a 10 s timeout.
pub fn ip(args: &[&str]) -> Out {
    run(Command::new("ip").args(args), Duration::from_secs(10))
}

#[track_caller]
fn ip_ok(args: &[&str]) -> Out {
    ip(args).expect_ok("ip command failed")
}

/// Runs `args` inside namespace `ns` (`ip netns exec`), 30 s timeout.
pub fn exec_in(ns: &str, args: &[&str]) -> Out {
    exec_in_timeout(ns, args, CMD_TIMEOUT)
}

pub fn exec_in_timeout(ns: &str, args: &[&str], timeout: Duration) -> Out {
    run(
        Command::new("ip").args(["netns", "exec", ns]).args(args),
        timeout,
    )
}

/// True if `count` pings from namespace `from_ns` to `ip` all get an answer
/// (one-second wait per reply, and a deadline, so this never hangs).
pub fn ping(from_ns: &str, ip: &str, count: u32) -> bool {
    let c = count.max(1).to_string();
    let deadline = (count + 2).to_string();
    exec_in_timeout(
        from_ns,
        &[
            "ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1", "-w", &deadline, ip,
        ],
        Duration::from_secs(u64::from(count) + 5),
    )
    .ok()
}

/// Polls `cond` every 200 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until one ping from `from_ns` to `ip` succeeds.
pub fn ping_until(from_ns: &str, ip: &str, timeout: Duration) -> bool {
    wait_until(timeout, || ping(from_ns, ip, 1))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// PIDs of the processes whose network namespace is `ns`.
pub fn ns_pids(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `ip -n NS -j addr show` as JSON (an array of links with their addresses).
pub fn links(ns: &str) -> Vec<Value> {
    match ip(&["-n", ns, "-j", "addr", "show"]).stdout.trim() {
        "" => vec![],
        s => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => a,
            _ => vec![],
        },
    }
}

/// One link of `ns` by name, with its addresses.
pub fn link(ns: &str, ifname: &str) -> Option<Value> {
    links(ns).into_iter().find(|l| l["ifname"] == ifname)
}

/// The `a.b.c.d/len` IPv4 addresses of a link from [`links`].
pub fn ipv4_of(link: &Value) -> Vec<String> {
    link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["family"] == "inet")
                .map(|i| format!("{}/{}", i["local"].as_str().unwrap_or("?"), i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// `02:ab:cd:ef:01:23`-shaped.
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------
// The binary under test

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Target directories to look in: `$CARGO_TARGET_DIR` (or `<workspace>/target`),
/// and the one this test executable was built into.
fn target_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => dirs.push(workspace_root().join(d)), // join keeps absolute paths as they are
        None => dirs.push(workspace_root().join("target")),
    }
    // <target>/debug/deps/mesh-<hash>
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            dirs.push(t.to_path_buf());
        }
    }
    dirs.dedup();
    dirs
}

fn find_or_build_meshnet() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHNET_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "MESHNET_BIN={} is not a file", p.display());
        return p;
    }
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for dir in target_dirs() {
        for profile in ["release", "debug"] {
            let p = dir.join(profile).join("meshnet");
            if let Ok(t) = fs::metadata(&p).and_then(|m| m.modified()) {
                if !matches!(&best, Some((bt, _)) if *bt >= t) {
                    best = Some((t, p));
                }
            }
        }
    }
    if let Some((_, p)) = best {
        eprintln!("meshnet under test: {}", p.display());
        return p;
    }
    // Build into a target dir of our own: the outer `cargo test` may still hold
    // the lock on the default one.
    let target = target_dirs()[0].join("e2e-meshnet");
    eprintln!(
        "no meshnet binary found; building it (cargo build --release -p meshnet) into {}",
        target.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "meshnet"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(workspace_root())
        .status()
        .expect("cannot run cargo");
    assert!(st.success(), "cargo build --release -p meshnet failed");
    let p = target.join("release").join("meshnet");
    assert!(
        p.is_file(),
        "cargo build succeeded but {} is missing",
        p.display()
    );
    p
}

/// The `meshnet` binary under test (found or built once per test process).
pub fn meshnet_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_or_build_meshnet)
}

// ---------------------------------------------------------------------------
// Lab, hosts, containers

/// A host namespace running (or about to run) one meshnet router.
#[derive(Clone, Debug)]
pub struct Host {
    pub i: u8,
    /// `<prefix>h<i>`
    pub ns: String,
    /// Underlay address, `10.250.<k>.<i>`.
    pub ip: String,
    /// This host's `--state-dir` (not created by the lab: meshnet must create it).
    pub state_dir: PathBuf,
    bin: PathBuf,
}

impl Host {
    /// This host running another meshnet binary (e.g. a previous build, for
    /// mixed-version tests).
    pub fn with_bin(mut self, bin: impl Into<PathBuf>) -> Host {
        self.bin = bin.into();
        self
    }

    /// `ip netns exec <ns> meshnet ARGS...` with this host's state dir.
    pub fn meshnet(&self, args: &[&str]) -> Out {
        self.meshnet_env(args, &[])
    }

    /// Like [`Host::meshnet`] with extra environment variables.
    pub fn meshnet_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        self.meshnet_full(args, env, CMD_TIMEOUT)
    }

    pub fn meshnet_full(&self, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Out {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(args);
        // Hermetic: nothing from the caller's environment decides for us.
        cmd.env_remove("MESHNET_PASSWORD");
        cmd.env("MESHNET_STATE_DIR", &self.state_dir);
        cmd.env("RUST_BACKTRACE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd, timeout)
    }

    /// `meshnet launch ARGS...`, which must succeed; returns the peer name
    /// (stdout's last line).
    #[track_caller]
    pub fn launch(&self, args: &[&str]) -> String {
        self.launch_env(args, &[])
    }

    #[track_caller]
    pub fn launch_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut a = vec!["launch"];
        a.extend_from_slice(args);
        let out = self
            .meshnet_env(&a, env)
            .expect_ok(&format!("launch on {}", self.ns));
        let name = out.last_line().unwrap_or_default().to_string();
        assert!(
            is_mac(&name),
            "launch on {} did not print a peer name on its last line: {out}",
            self.ns
        );
        name
    }

    /// `meshnet status --json`, which must succeed and be a JSON object.
    #[track_caller]
    pub fn status_json(&self) -> Value {
        let out = self
            .meshnet(&["status", "--json"])
            .expect_ok(&format!("status on {}", self.ns));
        let v = out.json();
        assert!(
            v.is_object(),
            "status --json on {} is not an object: {out}",
            self.ns
        );
        v
    }

    /// `meshnet ps --json`, which must succeed and be an array.
    #[track_caller]
    pub fn ps_json(&self) -> Vec<Value> {
        let out = self
            .meshnet(&["ps", "--json"])
            .expect_ok(&format!("ps on {}", self.ns));
        match out.json() {
            Value::Array(a) => a,
            _ => panic!("ps --json on {} is not an array: {out}", self.ns),
        }
    }

    /// `meshnet status targets --json` as strings.
    #[track_caller]
    pub fn targets(&self) -> Vec<String> {
        let out = self
            .meshnet(&["status", "targets", "--json"])
            .expect_ok(&format!("status targets on {}", self.ns));
        match out.json() {
            Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect(),
            _ => panic!(
                "status targets --json on {} is not an array: {out}",
                self.ns
            ),
        }
    }

    /// The daemon's log (`<state dir>/meshnet.log`), empty if there is none.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.state_dir.join("meshnet.log")).unwrap_or_default())
            .into_owned()
    }

    /// Processes living in this host's namespace.
    pub fn pids(&self) -> Vec<i32> {
        ns_pids(&self.ns)
    }

    /// `host:6783`
    pub fn addr(&self) -> String {
        format!("{}:6783", self.ip)
    }
}

/// A container namespace (no link until `meshnet attach`).
#[derive(Clone, Debug)]
pub struct Container {
    pub j: u8,
    /// `<prefix>c<j>`
    pub ns: String,
    /// The host meant to attach it.
    pub host: u8,
}

/// One test's private world. See the module docs.
pub struct Lab {
    pub test: String,
    pub prefix: String,
    /// Third octet of the underlay `10.250.<k>.0/24`.
    pub k: u8,
    pub dir: PathBuf,
    pub switch: String,
    pub bin: PathBuf,
    namespaces: RefCell<Vec<String>>,
    hosts: RefCell<Vec<Host>>,
    containers: RefCell<Vec<Container>>,
    started: Instant,
}

fn base36(mut n: u32, width: usize) -> String {
    const D: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = vec![b'0'; width];
    for c in s.iter_mut().rev() {
        *c = D[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(s).expect("ascii")
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks), "?" if unknown.
fn start_time(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(19).map(String::from))
        })
        .unwrap_or_else(|| "?".into())
}

fn initial(test: &str) -> char {
    test.chars()
        .find(|c| c.is_ascii_alphanumeric())
        .map_or('x', |c| c.to_ascii_lowercase())
}

impl Lab {
    /// A new lab for `test`, or `None` (after saying why) when not root or
    /// when `MESHNET_E2E=0`.
    pub fn new(test: &str) -> Option<Lab> {
        if !is_root() {
            eprintln!("skipping: namespace tests need root");
            return None;
        }
        if std::env::var("MESHNET_E2E").is_ok_and(|v| v == "0") {
            eprintln!("skipping: MESHNET_E2E=0");
            return None;
        }
        let bin = meshnet_bin().to_path_buf();
        let pid = std::process::id();
        let tmp = PathBuf::from("/tmp");
        // Claim a prefix atomically: first the directory, then the switch namespace.
        for _ in 0..200 {
            let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
            let prefix = format!(
                "{NS_MARK}{}{}{}",
                base36(pid.wrapping_add(n / 36), 2),
                base36(n, 1),
                initial(test)
            );
            let dir = tmp.join(format!("{LAB_DIR_PREFIX}{prefix}"));
            if fs::create_dir(&dir).is_err() {
                continue;
            }
            let switch = format!("{prefix}sw");
            // "pid starttime": lab-clean.sh tells a live owner from a reused pid.
            let _ = fs::write(dir.join("owner"), format!("{pid} {}\n", start_time(pid)));
            let _ = fs::write(dir.join("test"), format!("{test}\n"));
            if !ip(&["netns", "add", &switch]).ok() {
                let _ = fs::remove_dir_all(&dir);
                continue;
            }
            let k = 1
                + (prefix
                    .bytes()
                    .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
                    % 254) as u8;
            let lab = Lab {
                test: test.to_string(),
                prefix: prefix.clone(),
                k,
                dir,
                switch: switch.clone(),
                bin,
                namespaces: RefCell::new(vec![]),
                hosts: RefCell::new(vec![]),
                containers: RefCell::new(vec![]),
                started: Instant::now(),
            };
            lab.record_ns(&switch);
            ip_ok(&["-n", &switch, "link", "set", "lo", "up"]);
            ip_ok(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
            ip_ok(&["-n", &switch, "link", "set", "br0", "up"]);
            eprintln!(
                "lab {prefix} for `{test}`: underlay 10.250.{k}.0/24 on {switch}, dir {}, meshnet {}",
                lab.dir.display(),
                lab.bin.display()
            );
            return Some(lab);
        }
        panic!("could not claim a lab prefix (leftovers? run scripts/lab-clean.sh)");
    }

    fn record_ns(&self, ns: &str) {
        self.namespaces.borrow_mut().push(ns.to_string());
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("namespaces"))
        {
            let _ = writeln!(f, "{ns}");
        }
    }

    #[track_caller]
    fn add_ns(&self, ns: &str) {
        ip_ok(&["netns", "add", ns]);
        self.record_ns(ns);
        ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// The underlay address of host `i`.
    pub fn host_ip(&self, i: u8) -> String {
        format!("10.250.{}.{i}", self.k)
    }

    /// Namespace `<prefix>h<i>` on the underlay as `10.250.<k>.<i>/24`.
    #[track_caller]
    pub fn add_host(&self, i: u8) -> Host {
        assert!((1..=250).contains(&i), "host index {i} out of range");
        let ns = format!("{}h{i}", self.prefix);
        self.add_ns(&ns);
        let port = format!("h{i}");
        ip_ok(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            UNDERLAY_IF,
            "netns",
            &ns,
        ]);
        ip_ok(&["-n", &self.switch, "link", "set", &port, "master", "br0"]);
        ip_ok(&["-n", &self.switch, "link", "set", &port, "up"]);
        let ip = self.host_ip(i);
        ip_ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            UNDERLAY_IF,
        ]);
        ip_ok(&["-n", &ns, "link", "set", UNDERLAY_IF, "up"]);
        let host = Host {
            i,
            ns,
            ip,
            state_dir: self.dir.join(format!("h{i}")),
            bin: self.bin.clone(),
        };
        self.hosts.borrow_mut().push(host.clone());
        host
    }

    /// A host behind its own NAT: namespace `<prefix>n<i>` is a router on the
    /// underlay (`10.250.<k>.<i>`, a switch port like a host's) that
    /// forwards for namespace `<prefix>h<i>` (`192.168.<i>.2/24` on its
    /// `eth0`, default route through `192.168.<i>.1`) and rewrites what
    /// leaves with `nat` (e.g. `["-j", "MASQUERADE"]`, appended to an
    /// iptables POSTROUTING rule for the underlay interface). Nothing on the
    /// underlay can open a connection to the host. Returns (the host, the
    /// NAT box as a `Host` whose router is never launched).
    #[track_caller]
    pub fn add_host_behind_nat(&self, i: u8, nat: &[&str]) -> (Host, Host) {
        let natbox = self.add_host(i);
        self.hosts.borrow_mut().retain(|h| h.ns != natbox.ns);
        let n_ns = format!("{}n{i}", self.prefix);
        ip_ok(&["-n", &natbox.ns, "link", "set", "dev", UNDERLAY_IF, "down"]);
        // The NAT box keeps the underlay address under its own name: rename the namespace.
        ip_ok(&["netns", "add", &n_ns]);
        self.record_ns(&n_ns);
        ip_ok(&["-n", &n_ns, "link", "set", "lo", "up"]);
        ip_ok(&["-n", &natbox.ns, "link", "set", UNDERLAY_IF, "netns", &n_ns]);
        ip_ok(&["-n", &n_ns, "addr", "add", &format!("{}/24", natbox.ip), "dev", UNDERLAY_IF]);
        ip_ok(&["-n", &n_ns, "link", "set", UNDERLAY_IF, "up"]);
        ip_ok(&["-n", &n_ns, "link", "add", "lan", "type", "veth", "peer", "name", UNDERLAY_IF, "netns", &natbox.ns]);
        ip_ok(&["-n", &n_ns, "addr", "add", &format!("192.168.{i}.1/24"), "dev", "lan"]);
        ip_ok(&["-n", &n_ns, "link", "set", "lan", "up"]);
        ip_ok(&["-n", &natbox.ns, "addr", "add", &format!("192.168.{i}.2/24"), "dev", UNDERLAY_IF]);
        ip_ok(&["-n", &natbox.ns, "link", "set", UNDERLAY_IF, "up"]);
        ip_ok(&["-n", &natbox.ns, "route", "add", "default", "via", &format!("192.168.{i}.1")]);
        exec_in(&n_ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]).expect_ok("ip_forward");
        let mut rule = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", UNDERLAY_IF];
        rule.extend_from_slice(nat);
        exec_in(&n_ns, &rule).expect_ok("NAT rule");
        // As a home router: nothing unsolicited from the underlay reaches the
        // box itself. (Without this, Linux conntrack records a peer's first
        // datagram to the box as a flow of the box's own, and the host's
        // later outbound mapping for that peer moves to another port.)
        exec_in(&n_ns, &["iptables", "-A", "INPUT", "-i", UNDERLAY_IF, "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"])
            .expect_ok("inbound drop rule");
        let host = Host { i, ns: natbox.ns.clone(), ip: format!("192.168.{i}.2"), state_dir: natbox.state_dir.clone(), bin: self.bin.clone() };
        self.hosts.borrow_mut().push(host.clone());
        let boxed = Host { i, ns: n_ns, ip: natbox.ip.clone(), state_dir: self.dir.join(format!("n{i}")), bin: self.bin.clone() };
        (host, boxed)
    }

    /// Namespace `<prefix>c<j>`, meant to be attached on `host`.
    #[track_caller]
    pub fn add_container(&self, host: &Host, j: u8) -> Container {
        let ns = format!("{}c{j}", self.prefix);
        self.add_ns(&ns);
        let c = Container {
            j,
            ns,
            host: host.i,
        };
        self.containers.borrow_mut().push(c.clone());
        c
    }

    /// Starts a long-running command in `ns` (killed when the handle drops).
    pub fn spawn_in(&self, ns: &str, args: &[&str]) -> Bg {
        let n = IO_COUNTER.fetch_add(1, Ordering::Relaxed);
        let out = self.dir.join(format!("bg-{n}.out"));
        let err = self.dir.join(format!("bg-{n}.err"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        let desc = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("bg stdout file"))
            .stderr(File::create(&err).expect("bg stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
        Bg {
            child: Some(child),
            cmd: desc,
            out,
            err,
        }
    }

    /// Starts `tcpdump -U -w` on `iface` in `ns` and waits until it listens.
    #[track_caller]
    pub fn capture(&self, ns: &str, iface: &str) -> Capture {
        let n = IO_COUNTER.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join(format!("cap-{n}-{ns}-{iface}.pcap"));
        let f = file.to_string_lossy().into_owned();
        let bg = self.spawn_in(
            ns,
            &[
                "tcpdump", "-i", iface, "-n", "-U", "-Z", "root", "-s", "0", "-w", &f,
            ],
        );
        let listening = wait_until(Duration::from_secs(10), || {
            bg.stderr().contains("listening on")
        });
        assert!(
            listening,
            "tcpdump on {ns}/{iface} did not start: {}",
            bg.stderr()
        );
        Capture { bg, file }
    }

    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.borrow().clone()
    }

    /// Prints what helps to understand a failure: per host the status, ps and
    /// log tail, the links of every namespace. Also copies the logs to
    /// `/tmp/meshnet-e2e-logs/<prefix>-<test>/`.
    pub fn dump(&self) {
        let keep =
            PathBuf::from("/tmp/meshnet-e2e-logs").join(format!("{}-{}", self.prefix, self.test));
        let _ = fs::create_dir_all(&keep);
        eprintln!(
            "==== lab {} (`{}`) after {:.1}s ====",
            self.prefix,
            self.test,
            self.started.elapsed().as_secs_f64()
        );
        for h in self.hosts.borrow().iter() {
            eprintln!("==== host {} ({}) ====", h.ns, h.ip);
            for args in [&["status"][..], &["status", "connections"], &["ps"]] {
                let out = h.meshnet_full(args, &[], Duration::from_secs(10));
                eprintln!("{out}");
            }
            let log = h.log();
            let _ = fs::write(keep.join(format!("h{}.log", h.i)), &log);
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(80);
            eprintln!(
                "---- {}/meshnet.log (last {} of {} lines) ----",
                h.state_dir.display(),
                lines.len() - from,
                lines.len()
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
            eprintln!("---- processes in {}: {:?}", h.ns, h.pids());
        }
        for ns in self.namespaces.borrow().iter() {
            let out = ip(&["-n", ns, "-br", "addr"]);
            eprintln!("---- links in {ns} ----\n{}", out.stdout.trim_end());
        }
        eprintln!("==== logs kept in {} ====", keep.display());
    }

    fn teardown(&self) {
        // meshnet reset everywhere, in parallel, errors ignored.
        let hosts = self.hosts.borrow().clone();
        std::thread::scope(|s| {
            for h in &hosts {
                s.spawn(move || {
                    if h.state_dir.exists() {
                        let _ = h.meshnet_full(&["reset", "--force"], &[], Duration::from_secs(20));
                    }
                });
            }
        });
        let namespaces = self.namespaces.borrow().clone();
        kill_and_delete(&namespaces);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Files in `/etc/netns/<ns>/`, which `ip netns exec` mounts over the
/// namespace's own `/etc/<file>` (`resolv.conf`, `hosts`); removed on drop.
#[derive(Default)]
pub struct NetnsEtc(Vec<String>);

impl NetnsEtc {
    pub fn set(&mut self, ns: &str, file: &str, text: &str) {
        let dir = format!("/etc/netns/{ns}");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{file}"), text).unwrap();
        if !self.0.contains(&dir) {
            self.0.push(dir);
        }
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// Kills every process living in one of `namespaces` (TERM, then KILL after 3 s),
/// then deletes the namespaces.
pub fn kill_and_delete(namespaces: &[String]) {
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let mut any = false;
        for ns in namespaces {
            for pid in ns_pids(ns) {
                any = true;
                // SAFETY: plain kill(2) on a pid that lives in our namespace.
                unsafe { libc::kill(pid, sig) };
            }
        }
        if !any {
            break;
        }
        wait_until(Duration::from_secs(3), || {
            namespaces.iter().all(|ns| ns_pids(ns).is_empty())
        });
    }
    for ns in namespaces.iter().rev() {
        let _ = ip(&["netns", "del", ns]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.dump();
        }
        let keep = std::env::var("MESHNET_LAB_KEEP").unwrap_or_default();
        if keep == "always" || (failed && !keep.is_empty() && keep != "0") {
            eprintln!(
                "MESHNET_LAB_KEEP: keeping lab {} (namespaces {}*, dir {}); remove with scripts/lab-clean.sh --all",
                self.prefix,
                self.prefix,
                self.dir.display()
            );
            return;
        }
        self.teardown();
        eprintln!(
            "lab {} done in {:.1}s",
            self.prefix,
            self.started.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------
// Background processes and captures

/// A background process; killed on drop.
pub struct Bg {
    child: Option<Child>,
    pub cmd: String,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.err).unwrap_or_default()).into_owned()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Waits up to `timeout` for the process to exit by itself; true if it did.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Sends `sig`, waits up to 5 s, then SIGKILL.
    pub fn stop(&mut self, sig: i32) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(child.id() as i32, sig) };
                let exited = wait_until(Duration::from_secs(5), || {
                    matches!(child.try_wait(), Ok(Some(_)))
                });
                if !exited {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
    }
}

/// A running tcpdump.
pub struct Capture {
    bg: Bg,
    pub file: PathBuf,
}

impl Capture {
    /// Stops tcpdump (SIGINT, so it flushes) and parses what it wrote.
    #[track_caller]
    pub fn stop(mut self) -> Pcap {
        self.bg.stop(libc::SIGINT);
        let bytes = fs::read(&self.file)
            .unwrap_or_else(|e| panic!("no capture {}: {e}", self.file.display()));
        Pcap::parse(bytes).unwrap_or_else(|e| {
            panic!(
                "capture {}: {e}; tcpdump said: {}",
                self.file.display(),
                self.bg.stderr()
            )
        })
    }
}

/// A pcap file (Ethernet link type) split into frames.
pub struct Pcap {
    pub bytes: Vec<u8>,
    pub frames: Vec<Vec<u8>>,
}

/// Transport-level facts about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// 6 = TCP, 17 = UDP, ...
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub payload_len: usize,
}

impl Pcap {
    pub fn parse(bytes: Vec<u8>) -> Result<Pcap, String> {
        if bytes.len() < 24 {
            return Err(format!("pcap too short ({} bytes)", bytes.len()));
        }
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        let le = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
            _ => return Err(format!("not a pcap file (magic {magic:02x?})")),
        };
        let u32_at = |b: &[u8], o: usize| {
            let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        };
        let linktype = u32_at(&bytes, 20);
        if linktype != 1 {
            return Err(format!("link type {linktype}, expected Ethernet (1)"));
        }
        let mut frames = vec![];
        let mut o = 24;
        while o + 16 <= bytes.len() {
            let incl = u32_at(&bytes, o + 8) as usize;
            let start = o + 16;
            let end = (start + incl).min(bytes.len());
            frames.push(bytes[start..end].to_vec());
            o = start + incl;
        }
        Ok(Pcap { bytes, frames })
    }

    /// True if the raw capture holds `needle` anywhere.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    /// TCP/UDP facts of each IPv4/IPv6 frame (others skipped).
    pub fn flows(&self) -> Vec<Flow> {
        self.frames.iter().filter_map(|f| flow_of(f)).collect()
    }

    /// Datagrams of protocol `proto` with `port` as source or destination.
    pub fn count(&self, proto: u8, port: u16) -> usize {
        self.flows()
            .iter()
            .filter(|f| f.proto == proto && (f.sport == port || f.dport == port))
            .count()
    }
}

fn flow_of(f: &[u8]) -> Option<Flow> {
    if f.len() < 14 {
        return None;
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(f.get(14)? & 0x0f) * 4;
            (*f.get(14 + 9)?, 14 + ihl)
        }
        0x86dd => (*f.get(14 + 6)?, 14 + 40),
        _ => return None,
    };
    if proto != 6 && proto != 17 {
        return Some(Flow {
            proto,
            sport: 0,
            dport: 0,
            payload_len: f.len().saturating_sub(l4),
        });
    }
    let sport = u16::from_be_bytes([*f.get(l4)?, *f.get(l4 + 1)?]);
    let dport = u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]);
    let hdr = if proto == 17 {
        8
    } else {
        usize::from(f.get(l4 + 12)? >> 4) * 4
    };
    Some(Flow {
        proto,
        sport,
        dport,
        payload_len: f.len().saturating_sub(l4 + hdr),
    })
}

// ---------------------------------------------------------------------------
// Reading `meshnet status --json`

/// Names of the peers in a status (or `status peers`) document.
pub fn peer_names(status: &Value) -> Vec<String> {
    let peers = if status.is_array() {
        status
    } else {
        &status["peers"]
    };
    peers
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The connections of a status (or `status connections`) document.
pub fn connections(status: &Value) -> Vec<Value> {
    let c = if status.is_array() {
        status
    } else {
        &status["connections"]
    };
    c.as_array().cloned().unwrap_or_default()
}

/// Is there an established connection with peer `name`?
pub fn established_with(status: &Value, name: &str) -> bool {
    connections(status)
        .iter()
        .any(|c| c["peer"] == name && c["state"] == "established")
}

/// Connections whose address is host `ip` (any port).
pub fn connections_to(status: &Value, ip: &str) -> Vec<Value> {
    connections(status)
        .into_iter()
        .filter(|c| {
            c["address"]
                .as_str()
                .is_some_and(|a| a.rsplit_once(':').map_or(a, |(h, _)| h) == ip)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Bulk data with checksums, and the router's process

/// Receives one TCP connection on port 5001 and prints `sha256hex bytes`.
pub const SINK: &str = r#"
import hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(h.hexdigest(), n, flush=True)
"#;

/// Sends `argv[2]` random bytes to `argv[1]`:5001; prints `sha256hex bytes`.
pub const SOURCE: &str = r#"
import hashlib, os, socket, sys
total = int(sys.argv[2]); h = hashlib.sha256(); sent = 0
c = socket.create_connection((sys.argv[1], 5001), timeout=60)
while sent < total:
    b = os.urandom(min(1 << 20, total - sent))
    c.sendall(b); h.update(b); sent += len(b)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(h.hexdigest(), sent, flush=True)
"#;

/// Starts [`SINK`] in namespace `ns` and waits until it listens.
#[track_caller]
pub fn start_sink(lab: &Lab, ns: &str) -> Bg {
    let s = lab.spawn_in(ns, &["python3", "-c", SINK]);
    assert!(
        wait_until(Duration::from_secs(10), || s.stdout().contains("listening")),
        "sink in {ns} did not start: {}",
        s.stderr()
    );
    s
}

/// The `sha256hex bytes` line a finished sink or source printed.
pub fn digest_line(out: &str) -> String {
    out.lines().last().unwrap_or_default().trim().to_string()
}

/// Sends `bytes` random bytes from namespace `from` to a sink in namespace `to`
/// listening on `to_ip`, and checks that the receiver got exactly what was sent
/// (SHA-256 and length). Dumps the lab if the sender fails. Returns how long it took.
#[track_caller]
pub fn checked_transfer(lab: &Lab, from: &str, to: &str, to_ip: &str, bytes: u64, timeout: Duration) -> Duration {
    let mut rx = start_sink(lab, to);
    let t = Instant::now();
    let sent = exec_in_timeout(from, &["python3", "-c", SOURCE, to_ip, &bytes.to_string()], timeout);
    if !sent.ok() {
        lab.dump();
    }
    assert!(sent.ok(), "transfer of {bytes} bytes {from} -> {to} failed: {sent}");
    assert!(rx.wait(Duration::from_secs(30)), "sink in {to} did not finish: {}", rx.stderr());
    let (got, sent) = (digest_line(&rx.stdout()), digest_line(&sent.stdout));
    assert_eq!(sent.split(' ').nth(1), Some(bytes.to_string().as_str()), "sender: {sent}");
    assert_eq!(got, sent, "received data differs from what was sent ({from} -> {to})");
    let took = t.elapsed();
    eprintln!(
        "{} MB {from} -> {to} intact in {:.1}s ({:.0} Mbit/s)",
        bytes >> 20,
        took.as_secs_f64(),
        bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    took
}

/// The router's pid from `<state dir>/meshnet.pid`, checked to run in the host.
#[track_caller]
pub fn router_pid(h: &Host) -> i32 {
    let s = fs::read_to_string(h.state_dir.join("meshnet.pid")).unwrap_or_default();
    let pid: i32 = s
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {}/meshnet.pid: {s:?}", h.state_dir.display()));
    assert!(h.pids().contains(&pid), "meshnet.pid of {} says {pid}, not running there ({:?})", h.ns, h.pids());
    pid
}

/// `kill -9` of the router of `h`; waits until it is gone. Returns its pid.
#[track_caller]
pub fn kill9(h: &Host) -> i32 {
    let pid = router_pid(h);
    // SAFETY: kill(2) on a pid that we checked lives in our own namespace.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let gone = wait_until(Duration::from_secs(10), || !h.pids().contains(&pid));
    assert!(gone, "router {pid} of {} survived SIGKILL", h.ns);
    // Out of the namespace's list is not yet dead: the group leader leaves its
    // namespace before the other threads have exited, and the last one to exit
    // closes the sockets (a relaunch at once found UDP 6783 still bound). Wait
    // until every thread left is a zombie (or the process is gone).
    let exited = wait_until(Duration::from_secs(10), || threads_exited(pid));
    assert!(exited, "router {pid} of {}: threads still running 10 s after SIGKILL", h.ns);
    eprintln!("killed router {pid} of {} with SIGKILL", h.ns);
    pid
}

/// Whether every thread of `pid` has exited (zombie or dead), so its files
/// (sockets) are closed; true when the process is gone.
fn threads_exited(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .map_or(true, |s| s.rsplit(") ").next().is_none_or(|rest| rest.starts_with('Z') || rest.starts_with('X')))
    })
}

// ---------------------------------------------------------------------------
// meshnet-cni (for the CNI and Docker tests)


/// `$MESHNET_CNI_BIN`, else `meshnet-cni` next to the `meshnet` under test when
/// it is newer than the sources it is made of, else built once (release) into
/// a target directory of our own (the outer `cargo test` may hold the lock on
/// the default one).
pub fn cni_bin() -> PathBuf {
    static CNI_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CNI_BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MESHNET_CNI_BIN") {
            return PathBuf::from(p);
        }
        let sibling = meshnet_bin().with_file_name("meshnet-cni");
        if newest_source().is_some_and(|src| mtime(&sibling).is_some_and(|t| t >= src)) {
            return sibling;
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("e2e-cni");
        eprintln!("building meshnet-cni (cargo build --release -p meshnet-cni) into {}", target.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "meshnet-cni"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace_root())
            .status()
            .expect("run cargo");
        assert!(st.success(), "cargo build -p meshnet-cni failed");
        target.join("release/meshnet-cni")
    })
    .clone()
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the sources meshnet-cni is built from.
fn newest_source() -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, newest);
            } else if let Some(t) = mtime(&p) {
                *newest = Some(newest.map_or(t, |n| n.max(t)));
            }
        }
    }
    let mut newest = None;
    for d in ["cni", "control", "router", "proto"] {
        walk(&workspace_root().join(d).join("src"), &mut newest);
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limits() {
        let p = format!(
            "{NS_MARK}{}{}{}",
            base36(u32::MAX, 2),
            base36(35, 1),
            initial("Zeta test")
        );
        assert_eq!(p.len(), 6);
        assert!(format!("{p}h250").len() <= 15);
        assert_eq!(initial("_x"), 'x');
    }

    #[test]
    fn macs() {
        assert!(is_mac("02:ab:cd:ef:01:23"));
        assert!(!is_mac("02:ab:cd:ef:01"));
        assert!(!is_mac("02:ab:cd:ef:01:2g"));
    }

    #[test]
    fn pcap_parsing() {
        let mut b = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&65535u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        // one Ethernet/IPv4/UDP frame 10.0.0.1:6783 -> 10.0.0.2:6783, payload "hi"
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[
            0x45, 0, 0, 30, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        f.extend_from_slice(&[0x1a, 0x7f, 0x1a, 0x7f, 0, 10, 0, 0, b'h', b'i']);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&f);
        let p = Pcap::parse(b).unwrap();
        assert_eq!(p.frames.len(), 1);
        assert_eq!(p.count(17, 6783), 1);
        assert_eq!(p.flows()[0].payload_len, 2);
        assert!(p.contains(b"hi"));
        assert!(!p.contains(b"ho"));
    }

    #[test]
    fn status_helpers() {
        let s: Value = serde_json::json!({
            "peers": [{"name": "02:00:00:00:00:01"}, {"name": "02:00:00:00:00:02"}],
            "connections": [
                {"peer": "02:00:00:00:00:02", "address": "10.250.1.2:6783", "state": "established"},
                {"peer": null, "address": "10.250.1.4:41000", "state": "failed"}
            ]
        });
        assert_eq!(peer_names(&s).len(), 2);
        assert!(established_with(&s, "02:00:00:00:00:02"));
        assert!(!established_with(&s, "02:00:00:00:00:01"));
        assert_eq!(connections_to(&s, "10.250.1.4").len(), 1);
        assert_eq!(connections_to(&s, "10.250.1.2").len(), 1);
        assert!(connections_to(&s, "10.250.1.24").is_empty());
    }
}
