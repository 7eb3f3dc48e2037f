//! `meshnet`: the command line. Every command finds its router through the state
//! directory (`--state-dir`, env `MESHNET_STATE_DIR`, default /var/lib/meshnet).

use std::io::Read;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use meshnet_control::api::{self, ClientError, ConnectionStatus, PeerStatus, PsEntry, Request, Status};
use meshnet_control::daemon::{self, Config, Datapath, DEFAULT_MTU, DEFAULT_PORT};
use meshnet_control::peeraddr::PeerAddr;
use meshnet_control::state::{StateDir, DEFAULT_STATE_DIR};
use meshnet_proto::ipam::Cidr;
use meshnet_proto::PeerName;

#[derive(Parser)]
#[command(name = "meshnet", version, about = "An encrypted Layer-2 overlay network for containers on many hosts")]
struct Cli {
    /// Directory holding this router's identity, targets, attachments, log and control socket.
    #[arg(long, global = true, env = "MESHNET_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Cmd {
    /// Start the router (in the background unless --foreground) and connect to PEERs.
    Launch(LaunchArgs),
    /// Add PEERs (host or host:port) to the persisted connect targets.
    Connect {
        /// Replace the targets instead of adding to them (with no PEER: clear them).
        #[arg(long)]
        replace: bool,
        #[arg(required_unless_present = "replace", value_name = "PEER")]
        peers: Vec<String>,
    },
    /// Remove PEERs from the connect targets.
    Forget {
        #[arg(required = true, value_name = "PEER")]
        peers: Vec<String>,
    },
    /// Give TARGET (netns name, PID, Docker container name or ID, or namespace path) an interface
    /// `ethwe` on the overlay. ADDR: `ip:CIDR` or a bare CIDR (that address), `net:CIDR` (any free
    /// address of that subnet), `net:default`; none: an address from the default subnet.
    Attach {
        /// Leave out the route of 224.0.0.0/4 (multicast) through `ethwe`.
        #[arg(long)]
        no_multicast_route: bool,
        /// Do not register a Docker container's name and host name in meshnet DNS (also not when
        /// the router attaches it again after a restart).
        #[arg(long)]
        without_dns: bool,
        /// Rewrite a Docker container's /etc/hosts: its host name at its overlay addresses (again
        /// whenever the router attaches it again).
        #[arg(long)]
        rewrite_hosts: bool,
        /// HOST:IP: also in the rewritten /etc/hosts (with --rewrite-hosts; may be repeated).
        #[arg(long = "add-host", value_name = "HOST:IP", requires = "rewrite_hosts")]
        add_host: Vec<String>,
        /// [ADDR...] TARGET
        #[arg(required = true, num_args = 1.., value_name = "[ADDR...] TARGET")]
        args: Vec<String>,
    },
    /// Remove addresses (all, and the interface, when none are given) from TARGET.
    Detach {
        /// [CIDR...] TARGET
        #[arg(required = true, num_args = 1.., value_name = "[CIDR...] TARGET")]
        args: Vec<String>,
    },
    /// Give this host an address on the overlay (on the bridge), printed one a line. ADDR as for
    /// attach; none: one in the default subnet. Exposing again gives the same address.
    #[command(disable_help_flag = true)]
    Expose {
        /// Do not masquerade traffic from the exposed subnet to the outside.
        #[arg(long)]
        without_masquerade: bool,
        /// Also register NAME in meshnet DNS for the exposed addresses (`hide` removes it).
        #[arg(short = 'h', long = "hostname", value_name = "NAME")]
        name: Option<String>,
        #[arg(value_name = "ADDR")]
        addrs: Vec<String>,
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
    },
    /// Take this host's exposed addresses (all when none are given) off the overlay.
    Hide {
        #[arg(value_name = "ADDR")]
        addrs: Vec<String>,
    },
    /// Show the router (name, encryption, port, bridge, datapath, exposed addresses, counts), or
    /// one part: its peers, connections, connect targets, IPAM ring, or DNS table and server.
    Status {
        #[arg(value_enum)]
        what: Option<StatusPart>,
        /// Print JSON (the full form also has the data-plane, limits, control and trust counters).
        #[arg(long)]
        json: bool,
    },
    /// List attached targets with MAC and addresses (only TARGETs, by name or container ID, when given).
    Ps {
        /// Print JSON (`target`, `kind`, `mac`, `addresses`, `interface`, `container_id`).
        #[arg(long)]
        json: bool,
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Take over the address ranges of dead peers (names or nicknames). Unsafe if a peer is only
    /// partitioned away: run it on one peer, once the other is gone for good.
    Rmpeer {
        #[arg(required = true, value_name = "PEER")]
        peers: Vec<String>,
    },
    /// Everything this router knows in one document: peers, connections, routes, MAC table,
    /// IPAM ring, exposed addresses, attachments, data-plane counters.
    Report {
        /// Print JSON instead of sections.
        #[arg(long)]
        json: bool,
    },
    /// Wait until the IP allocation ring is agreed (starting consensus if needed).
    Prime {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Register NAME (in the DNS domain; a single label is taken as relative to it) for TARGET with
    /// ADDRs (IPv4 and/or IPv6); none: the addresses attached to TARGET. ADDR... -h NAME without a
    /// TARGET: those addresses, of no target.
    #[command(disable_help_flag = true)]
    DnsAdd {
        /// The name to register. Without it, TARGET must be a Docker container: its host name when
        /// that is in the domain (`docker run -h db.meshnet.local`), else its container name.
        #[arg(short = 'h', long = "hostname", value_name = "NAME")]
        name: Option<String>,
        /// [ADDR...] TARGET
        #[arg(required = true, num_args = 1.., value_name = "[ADDR...] TARGET")]
        args: Vec<String>,
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
    },
    /// Remove this router's DNS records of TARGET (only of NAME, and of ADDRs, when given).
    /// ADDR... -h NAME without a TARGET: the records `dns-add` added without one.
    #[command(disable_help_flag = true)]
    DnsRemove {
        #[arg(short = 'h', long = "hostname", value_name = "NAME")]
        name: Option<String>,
        /// [ADDR...] TARGET
        #[arg(required = true, num_args = 1.., value_name = "[ADDR...] TARGET")]
        args: Vec<String>,
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
    },
    /// Print the addresses of NAME in meshnet DNS, one a line (IPv4 ones first, then IPv6).
    DnsLookup { name: String },
    /// Print the `docker run` flags that make a container use meshnet DNS.
    DnsArgs,
    /// Stop the router; attached interfaces and the bridge stay.
    Stop,
    /// Stop the router and remove its bridge, devices, interfaces and state. Refused while the
    /// router is not running (it hands this peer's address ranges to a live peer first).
    Reset {
        /// Remove everything even though no router is running: this peer's address ranges are
        /// then not handed over (take them over with `meshnet rmpeer` on another peer).
        #[arg(long)]
        force: bool,
    },
}

/// The parts of `meshnet status` read from the router's main status.
enum Part {
    Peers,
    Connections,
    Targets,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusPart {
    /// The IP allocation ring: range, agreement, each owner's space.
    Ipam,
    /// The DNS table of every router, where the server listens, its counters.
    Dns,
    /// Every peer known by gossip, with its connection count.
    Peers,
    /// Each connection and connect target: state, route, path MTU, heartbeat, key.
    Connections,
    /// The persisted connect targets.
    Targets,
}

#[derive(clap::Args, Clone, serde::Serialize, serde::Deserialize)]
struct LaunchArgs {
    /// Stay in the foreground (for containers and systemd).
    #[arg(long)]
    #[serde(skip)]
    foreground: bool,
    /// Launch again with the options of this state directory's last launch (its
    /// connect targets, attachments and IPAM state are always kept). Takes no other
    /// option but --foreground, --log-level and the password's, and no PEER. A password
    /// given then by MESHNET_PASSWORD or --password must be given again.
    #[arg(long, conflicts_with_all = [
        "name", "nickname", "port", "host", "mtu", "bridge", "no_discovery", "conn_limit", "rekey_interval",
        "ipalloc_range", "ipalloc_default_subnet", "ipalloc_init", "peers", "metrics_addr",
        "no_dns", "dns_listen_address", "dns_domain", "dns_ttl", "trusted_subnets",
        "datapath", "datapath_threads", "datapath_threads_per_queue", "datapath_busy_poll",
        "no_docker_plugin", "docker_plugin_dir", "docker_plugin_name",
    ])]
    #[serde(skip)]
    resume: bool,
    /// Shared secret: peers must all use the same one. Prefer --password-file or MESHNET_PASSWORD.
    #[arg(long, env = "MESHNET_PASSWORD", hide_env_values = true)]
    #[serde(skip)]
    password: Option<String>,
    /// Whether the launch used a password (recorded for --resume; never the password).
    #[arg(skip)]
    #[serde(default)]
    had_password: bool,
    /// Read the password from this file (trailing newline ignored).
    #[arg(long, conflicts_with = "password")]
    password_file: Option<PathBuf>,
    /// Peer name (six hex bytes, e.g. 02:00:00:00:00:01); default: derived from the identity key.
    #[arg(long)]
    name: Option<String>,
    /// Human-friendly name shown to other peers; default: the host name.
    #[arg(long)]
    nickname: Option<String>,
    /// TCP (control) and UDP (data) port.
    #[arg(long, default_value_t = DEFAULT_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    /// Overlay MTU of attached interfaces.
    #[arg(long, default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u32).range(576..=65000))]
    mtu: u32,
    /// Bridge to use (created if missing; an existing one is used as it is).
    #[arg(long, default_value = "meshnet")]
    bridge: String,
    /// Do not dial peers learned through gossip; only the named targets.
    #[arg(long)]
    no_discovery: bool,
    /// Most connections at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10000))]
    conn_limit: u64,
    /// Fresh data keys at least every this many seconds (1-120; shorter is for tests).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=120))]
    #[serde(default = "default_rekey_interval")]
    rekey_interval: u64,
    /// Range IPAM allocates from. A default range that overlaps a route of the host is refused.
    /// Give it once per family (e.g. also `--ipalloc-range fd32::/64`): an IPv6 range adds a
    /// second, independent ring, and `attach` then gives one address of each family.
    #[arg(long, default_value = meshnet_proto::ipam::DEFAULT_RANGE)]
    #[serde(deserialize_with = "one_or_many")]
    ipalloc_range: Vec<String>,
    /// Subnet `attach` allocates from when given no address (default: the whole range); once per family.
    #[arg(long)]
    #[serde(default, deserialize_with = "one_or_many")]
    ipalloc_default_subnet: Vec<String>,
    /// How the range is first divided: consensus[=N] (default N: 1 + the other hosts named here),
    /// seed=PEER,... (those peers' names), or observer (takes no space at start).
    #[arg(long, default_value = "consensus")]
    ipalloc_init: String,
    /// How the router joins the bridge: `tap` (a TAP carrying TSO superframes whole) or `pcap`
    /// (libpcap on a veth, plain frames, as Weave's original router; slower, for where a TAP cannot be used).
    #[arg(long, default_value = "tap", value_parser = ["tap", "pcap"])]
    datapath: String,
    /// Forwarding queues, each with its own TAP queue, UDP socket and forwarding thread(s)
    /// (1 to 64; more than 1 needs --datapath tap). Default: half the cores, at least 1; 1 with
    /// --datapath pcap.
    #[arg(long, value_name = "N")]
    #[serde(default)]
    datapath_threads: Option<u32>,
    /// Threads per forwarding queue: 1 (default) forwards both directions on one thread, which
    /// under load never waits to be woken (lower latency, less CPU per byte); 2 gives each
    /// direction its own thread (TAP → UDP and UDP → TAP).
    #[arg(long, value_name = "1|2", value_parser = clap::value_parser!(u32).range(1..=2))]
    #[serde(default)]
    datapath_threads_per_queue: Option<u32>,
    /// Microseconds a forwarding thread that has just forwarded frames (not heartbeats) keeps
    /// polling before it sleeps, so that a reply is picked up without waking it (lower round
    /// trips); at most 5 % of a core per thread, never while idle. 0 turns it off; at most 1000.
    /// Default 100.
    #[arg(long, value_name = "USEC", value_parser = clap::value_parser!(u32).range(0..=daemon::MAX_BUSY_POLL_US as i64))]
    #[serde(default)]
    datapath_busy_poll: Option<u32>,
    /// Do not serve Docker's plugin API (the `meshnet` network and IPAM drivers).
    #[arg(long)]
    #[serde(default)]
    no_docker_plugin: bool,
    /// Directory of the Docker plugin's socket (default /run/docker/plugins, used when a Docker Engine is present).
    #[arg(long)]
    #[serde(default)]
    docker_plugin_dir: Option<PathBuf>,
    /// Name of the Docker plugin (its socket NAME.sock, and both drivers' name).
    #[arg(long, default_value = meshnet_control::plugin::DEFAULT_NAME)]
    #[serde(default = "default_docker_plugin_name")]
    docker_plugin_name: String,
    /// Serve Prometheus metrics (/metrics), the mesh as JSON (/api/mesh) and a live map of the mesh
    /// (/) over HTTP on ADDR:PORT; an empty value turns it off. Read-only, no authentication: keep it
    /// on loopback or a trusted network.
    #[arg(long, default_value = meshnet_control::metrics::DEFAULT_ADDR, value_name = "ADDR:PORT")]
    #[serde(default = "default_metrics_addr")]
    metrics_addr: String,
    /// Log level: error, warn, info, debug or trace (default info; MESHNET_LOG sets it too).
    #[arg(long, value_parser = ["error", "warn", "info", "debug", "trace"])]
    #[serde(default)]
    log_level: Option<String>,
    /// Do not serve DNS (records are still gossiped through this router).
    #[arg(long)]
    #[serde(default)]
    no_dns: bool,
    /// Where the DNS server listens (IP or IP:PORT; port 53 by default). Default: port 53 of the
    /// bridge's first exposed address, once there is one.
    #[arg(long)]
    #[serde(default)]
    dns_listen_address: Option<String>,
    /// The domain meshnet DNS answers for.
    #[arg(long, default_value = meshnet_proto::dns::DEFAULT_DOMAIN)]
    #[serde(default = "default_dns_domain")]
    dns_domain: String,
    /// TTL of meshnet DNS answers, in seconds (0 to 2147483647, as RFC 2181 allows).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=i32::MAX as i64))]
    #[serde(default = "default_dns_ttl")]
    dns_ttl: u32,
    /// Underlay subnets this router trusts, as Weave's option: data to a peer whose address is in one
    /// of them, and which trusts ours back, goes UNENCRYPTED through the kernel's VXLAN device
    /// (UDP --port + 1). The control plane stays encrypted.
    #[arg(long, value_name = "CIDR[,CIDR...]")]
    #[serde(default, deserialize_with = "without_empty_items")]
    trusted_subnets: Option<String>,
    /// Peers to connect to (host or host:port), persisted like `meshnet connect`.
    #[arg(value_name = "PEER")]
    #[serde(skip)]
    peers: Vec<String>,
    /// Set by a background `launch` on the router it starts: that `launch` records the
    /// options itself (with its --password-file), once the router serves.
    #[arg(long, hide = true)]
    #[serde(skip)]
    no_record_launch: bool,
}

/// `--docker-plugin-name` of a launch recorded before the option existed.
fn default_docker_plugin_name() -> String {
    meshnet_control::plugin::DEFAULT_NAME.to_string()
}

/// `--metrics-addr` of a launch recorded before the option existed.
fn default_metrics_addr() -> String {
    meshnet_control::metrics::DEFAULT_ADDR.to_string()
}

/// The forwarding queues when `--datapath-threads` is not given: one per two
/// cores (each queue is a TX and an RX thread), at least one, at most
/// `max`; one for a capture device, which has a single queue.
fn default_datapath_threads(cores: usize, datapath: Datapath, max: u32) -> u32 {
    if datapath == Datapath::Pcap {
        return 1;
    }
    ((cores / 2) as u32).clamp(1, max)
}

/// `--rekey-interval` of a launch recorded before the option existed.
fn default_rekey_interval() -> u64 {
    120
}

fn default_dns_domain() -> String {
    meshnet_proto::dns::DEFAULT_DOMAIN.to_string()
}

fn default_dns_ttl() -> u32 {
    1
}

/// The TARGET of `dns-add`/`dns-remove [ADDR...] TARGET`, taken off `args`;
/// empty when the last is an address too (`dns-add ADDR... -h NAME`: no target).
fn dns_target(args: &mut Vec<String>) -> String {
    let last = args.last().expect("clap requires one");
    let bare = last.strip_prefix("ip:").unwrap_or(last);
    if bare.split_once('/').map_or(bare, |(a, _)| a).parse::<std::net::IpAddr>().is_ok() {
        return String::new();
    }
    args.pop().expect("clap requires one")
}

/// `--dns-listen-address`: IP or IP:PORT.
fn parse_dns_listen(s: &str) -> Result<std::net::SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, meshnet_control::dns::PORT));
    }
    s.parse().map_err(|_| anyhow!("--dns-listen-address {s}: expected IP or IP:PORT"))
}

/// Where `launch` records its options for `--resume`.
fn launch_record(state: &StateDir) -> PathBuf {
    state.root.join("launch.json")
}

/// The last launch's options, with this invocation's password and `--foreground`.
fn resume_args(state: &StateDir, now: LaunchArgs) -> Result<LaunchArgs> {
    let path = launch_record(state);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow!("--resume: no earlier launch recorded in {} ({e}); launch without --resume first", state.root.display())
        }
        // There is a record, but it cannot be read: say so (a plain launch would replace it).
        _ => anyhow!("--resume: read {}: {e}", path.display()),
    })?;
    let mut args: LaunchArgs =
        serde_json::from_str(&text).with_context(|| format!("--resume: read {}", path.display()))?;
    args.foreground = now.foreground;
    args.password = now.password;
    if now.log_level.is_some() {
        args.log_level = now.log_level;
    }
    if now.password_file.is_some() {
        args.password_file = now.password_file;
    }
    if args.had_password && args.password.is_none() && args.password_file.is_none() {
        bail!("--resume: the last launch used a password; give it again (MESHNET_PASSWORD, --password or --password-file)");
    }
    Ok(args)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Launch(_)) {
        // A reader that goes away (`meshnet status | head -1`) ends a command
        // the way it ends any Unix tool (SIGPIPE), not with a panic in println!.
        // Not for launch: the router keeps SIGPIPE ignored.
        // SAFETY: setting a signal's disposition to the default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshnet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let state = StateDir::new(&cli.state_dir);
    match cli.cmd {
        Cmd::Launch(args) => launch(&state, args),
        Cmd::Connect { replace, peers } => {
            let targets = call(&state, Request::Connect { peers, replace })?;
            print_list("targets", &targets);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Forget { peers } => {
            let targets = call(&state, Request::Forget { peers })?;
            print_list("targets", &targets);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Attach { no_multicast_route, without_dns, rewrite_hosts, add_host, mut args } => {
            let target = args.pop().expect("clap requires one");
            let req = Request::Attach {
                target,
                cidrs: args,
                ifname: None,
                no_multicast_route,
                without_dns,
                rewrite_hosts,
                add_hosts: add_host,
                hairpin: false,
            };
            let v = call(&state, req)?;
            let addrs: Vec<String> = serde_json::from_value(v["addresses"].clone()).unwrap_or_default();
            println!("{}", addrs.join(" "));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Detach { mut args } => {
            let target = args.pop().expect("clap requires one");
            call(&state, Request::Detach { target, cidrs: args })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Expose { without_masquerade, name, addrs, .. } => {
            let v = call(&state, Request::Expose { cidrs: addrs, masquerade: Some(!without_masquerade), name })?;
            let addrs: Vec<String> = serde_json::from_value(v["addresses"].clone()).unwrap_or_default();
            for a in addrs {
                println!("{a}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Hide { addrs } => {
            call(&state, Request::Hide { cidrs: addrs })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { what, json } => status(&state, what, json),
        Cmd::Rmpeer { peers } => {
            // Each in turn; one that fails does not stop the others.
            let mut failed = 0;
            for peer in peers {
                let v = match call(&state, Request::Rmpeer { peer: peer.clone() }) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("meshnet: rmpeer {peer}: {e:#}");
                        failed += 1;
                        continue;
                    }
                };
                println!("{} addresses taken over from {}", v["addresses_taken_over"], v["peer"].as_str().unwrap_or("?"));
                if let Some(fp) = v["identity_removed"].as_str() {
                    println!(
                        "forgot key {fp} pinned for {}: a host with a new key may now use this name",
                        v["peer"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Report { json } => {
            let v = call(&state, Request::Report)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", meshnet_control::report::to_text(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prime { timeout } => {
            // A timeout past what the clock can count waits for good (it panicked).
            let deadline = Instant::now().checked_add(Duration::from_secs(timeout));
            loop {
                let v = call(&state, Request::Prime)?;
                // Both rings, where there is an IPv6 one (`--ipalloc-range` of each family).
                let rings = [("IP allocation ring", &v), ("IPv6 allocation ring", &v["ipv6"])];
                let waiting = rings.iter().find(|(_, r)| !r.is_null() && r["agreed"].as_bool() != Some(true));
                let Some((ring, r)) = waiting else {
                    return Ok(ExitCode::SUCCESS);
                };
                if deadline.is_some_and(|d| Instant::now() > d) {
                    bail!(
                        "the {ring} is not agreed after {timeout}s: waiting for {}",
                        r["state"]["waiting"].as_str().unwrap_or("consensus")
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Cmd::Ps { json, targets } => {
            let v = if targets.is_empty() {
                call(&state, Request::Ps)?
            } else {
                api::ps_of(&state, targets, Duration::from_secs(60)).map_err(|e| anyhow!(e))?
            };
            let entries: Vec<PsEntry> = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries {
                    let target = match &e.container_id {
                        Some(id) => format!("{}[{id}]", e.target),
                        None => e.target.clone(),
                    };
                    println!("{target} {} {}", e.mac, e.addresses.join(" "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsAdd { name, mut args, .. } => {
            let target = dns_target(&mut args);
            let v = call(&state, Request::DnsAdd { target, addrs: args, name })?;
            let addrs: Vec<String> = serde_json::from_value(v["addresses"].clone()).unwrap_or_default();
            println!("{} {}", v["name"].as_str().unwrap_or("?"), addrs.join(" "));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsRemove { name, mut args, .. } => {
            let target = dns_target(&mut args);
            call(&state, Request::DnsRemove { target, addrs: args, name })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsLookup { name } => {
            let v = call(&state, Request::DnsLookup { name })?;
            let addrs: Vec<String> = serde_json::from_value(v["addresses"].clone()).unwrap_or_default();
            for a in addrs {
                println!("{a}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsArgs => {
            let s: meshnet_control::dns::DnsStatus = serde_json::from_value(call(&state, Request::DnsStatus)?)?;
            if !s.enabled {
                // Nothing to add, as `weave dns-args` without weaveDNS: `docker
                // run $(meshnet dns-args) ...` still works, with Docker's resolver.
                eprintln!("meshnet: this router does not serve DNS (launched with --no-dns): no flags");
                return Ok(ExitCode::SUCCESS);
            }
            let Some(listen) = s.listen else {
                if let Some(e) = s.listen_error {
                    bail!("the DNS server is not listening: {e} (trying again every second)");
                }
                bail!("the DNS server is not listening yet: expose an address on the bridge (meshnet expose) or launch with --dns-listen-address");
            };
            let addr: std::net::SocketAddr = listen.parse()?;
            if addr.port() != meshnet_control::dns::PORT {
                bail!("the DNS server listens on port {}, and Docker's --dns takes port 53 only", addr.port());
            }
            println!("--dns {} --dns-search {}", addr.ip(), s.domain.trim_end_matches('.'));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stop => {
            match api::call(&state, &Request::Stop, Duration::from_secs(10)) {
                Ok(_) => wait_stopped(&state, Duration::from_secs(30))?,
                Err(ClientError::NotRunning(_)) => eprintln!("meshnet: no router is running for {}", state.root.display()),
                Err(e) => return Err(e.into()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reset { force } => {
            match api::call(&state, &Request::Reset, Duration::from_secs(10)) {
                Ok(_) => wait_stopped(&state, Duration::from_secs(30))?,
                // Reset already (or never launched): no ranges to hand over, nothing to remove.
                Err(ClientError::NotRunning(_)) if !state.root.exists() => {
                    eprintln!("meshnet: nothing to reset: {} does not exist", state.root.display());
                    return Ok(ExitCode::SUCCESS);
                }
                Err(ClientError::NotRunning(_)) if !force => bail!(
                    "no router is running for {}: reset hands this peer's address ranges to a live peer, which \
                     only a running router can do. Start it (`meshnet launch --resume`) and reset again, or \
                     `meshnet reset --force` to remove its devices and state anyway (its ranges then stay \
                     with its name until another peer runs `meshnet rmpeer` for it)",
                    state.root.display()
                ),
                Err(ClientError::NotRunning(_)) => {
                    kill_stale(&state);
                    daemon::reset_offline(&state)?;
                }
                Err(e) => return Err(e.into()),
            }
            state.remove()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn call(state: &StateDir, req: Request) -> Result<serde_json::Value> {
    api::call(state, &req, Duration::from_secs(60)).map_err(|e| anyhow!(e))
}

fn print_list(what: &str, v: &serde_json::Value) {
    let items: Vec<String> = serde_json::from_value(v.clone()).unwrap_or_default();
    if items.is_empty() {
        println!("no {what}");
    }
    for i in items {
        println!("{i}");
    }
}

fn launch(state: &StateDir, args: LaunchArgs) -> Result<ExitCode> {
    let mut args = if args.resume { resume_args(state, args)? } else { args };
    // Validate everything before starting anything.
    let password = match (&args.password, &args.password_file) {
        (Some(p), _) => Some(p.clone().into_bytes()),
        (None, Some(f)) => {
            let mut s = String::new();
            std::fs::File::open(f)
                .and_then(|mut h| h.read_to_string(&mut s))
                .with_context(|| format!("read password file {}", f.display()))?;
            Some(s.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
        }
        (None, None) => None,
    };
    if password.as_ref().is_some_and(|p| p.is_empty()) {
        bail!("the password is empty");
    }
    args.had_password = password.is_some();
    let name = args
        .name
        .as_deref()
        .map(|n| n.parse::<PeerName>())
        .transpose()
        .map_err(|e| anyhow!("--name: {e}"))?;
    if let Some(n) = name.filter(|n| !meshnet_proto::trust::valid_name(*n)) {
        bail!("--name {n}: cannot name a peer (00:00:00:00:00:00 is the broadcast name)");
    }
    let peers = args
        .peers
        .iter()
        .map(|p| PeerAddr::parse(p, args.port))
        .collect::<Result<Vec<_>, _>>()?;
    let n = &args.docker_plugin_name;
    if n.is_empty() || n.len() > 64 || n.starts_with('.') || !n.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        bail!("--docker-plugin-name {n:?}: 1 to 64 letters, digits, '.', '_' or '-'");
    }
    check_bridge_name(&args.bridge)?;
    // An empty (or blank) nickname is no nickname: the host name, as when the
    // option is left out (`--nickname "$NICK"` with NICK unset showed "name()").
    if args.nickname.as_deref().is_some_and(|n| n.trim().is_empty()) {
        args.nickname = None;
    }
    if let Some(n) = &args.nickname {
        check_nickname(n)?;
    }
    let ipam_args = parse_ipalloc(&args.ipalloc_range, &args.ipalloc_default_subnet)?;
    let (ipalloc_range, ipalloc_default_subnet) = (ipam_args.range, ipam_args.default_subnet);
    // `consensus` counts the other hosts named (resolving names once, here):
    // the router started below and the launch record get `consensus=N`.
    if args.ipalloc_init.trim() == "consensus" {
        args.ipalloc_init = format!("consensus={}", 1 + other_peers_named(&peers, args.port));
    }
    let ipalloc_init = meshnet_control::ipam::parse_init(&args.ipalloc_init, 0)?;
    let datapath: Datapath = args.datapath.parse().map_err(|e| anyhow!("--datapath: {e}"))?;
    let max_threads = meshnet_proto::session::MAX_QUEUES as u32;
    let datapath_threads = match args.datapath_threads {
        Some(n) => n,
        None => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            default_datapath_threads(cores, datapath, max_threads)
        }
    };
    if !(1..=max_threads).contains(&datapath_threads) {
        bail!("--datapath-threads {datapath_threads}: must be 1 to {max_threads}");
    }
    if datapath_threads > 1 && datapath == Datapath::Pcap {
        bail!("--datapath-threads {datapath_threads}: more than one queue needs --datapath tap (a capture device has one queue)");
    }
    let metrics_addr = meshnet_control::metrics::parse_addr(&args.metrics_addr).map_err(|e| anyhow!(e))?;
    let dns_domain = meshnet_proto::dns::normalize_domain(&args.dns_domain).map_err(|e| anyhow!("--dns-domain: {e}"))?;
    let dns_listen = args.dns_listen_address.as_deref().map(parse_dns_listen).transpose()?;
    let trusted_subnets = match args.trusted_subnets.as_deref() {
        Some(s) => {
            let v = meshnet_proto::trusted::parse_list(s).map_err(|e| anyhow!("--trusted-subnets: {e}"))?;
            if v.is_empty() {
                bail!("--trusted-subnets: no CIDR given (e.g. 10.0.0.0/8)");
            }
            v
        }
        None => Vec::new(),
    };
    if trusted_subnets.iter().any(|s| s.prefix == 0) {
        eprintln!("warning: --trusted-subnets includes a /0: data to every peer that trusts us back goes unencrypted");
    }
    if let Ok(v) = api::call(state, &Request::Status, Duration::from_secs(5)) {
        bail!(
            "a meshnet router is already running for {} (peer {})",
            state.root.display(),
            v["name"].as_str().unwrap_or("?")
        );
    }

    if args.log_level.is_none() {
        // As --log-level's value is checked: a level that does not parse was
        // silently `info`.
        meshnet_control::logger::check_env().map_err(|e| anyhow!(e))?;
    }
    check_bridge_kept(state, &args.bridge)?;
    if let Some(dir) = args.docker_plugin_dir.as_deref().filter(|_| !args.no_docker_plugin) {
        meshnet_control::plugin::Socket::check_dir(dir, &args.docker_plugin_name)
            .map_err(|e| anyhow!("--docker-plugin-dir {}: {e:#}", dir.display()))?;
    }

    if args.foreground {
        meshnet_control::logger::init(args.log_level.as_deref(), Some(&state.log()));
        // Recorded once the router serves, so that a launch that fails (a bridge
        // name taken by another link, a port in use, ...) leaves the last good
        // launch's options for `launch --resume`.
        if !args.no_record_launch {
            let (state, args) = (state.clone(), args.clone());
            std::thread::spawn(move || record_once_serving(&state, &args));
        }
        let nickname = args.nickname.clone().unwrap_or_else(hostname);
        let cfg = Config {
            state: state.clone(),
            password,
            name,
            nickname,
            port: args.port,
            host: args.host,
            mtu: args.mtu,
            bridge: args.bridge.clone(),
            discovery: !args.no_discovery,
            conn_limit: args.conn_limit as usize,
            rekey_interval: Duration::from_secs(args.rekey_interval),
            peers,
            ipalloc_range,
            ipalloc_range_given: ipam_args.range_given,
            ipalloc_default_subnet,
            ipalloc_range6: ipam_args.range6,
            ipalloc_default_subnet6: ipam_args.default_subnet6,
            ipalloc_init,
            datapath,
            datapath_threads: datapath_threads as usize,
            datapath_layout: daemon::Layout {
                threads_per_queue: args.datapath_threads_per_queue.unwrap_or(1) as usize,
                busy_poll: std::time::Duration::from_micros(
                    args.datapath_busy_poll.unwrap_or(daemon::DEFAULT_BUSY_POLL_US).into(),
                ),
            },
            docker_plugin: daemon::DockerPlugin {
                enabled: !args.no_docker_plugin,
                dir: args.docker_plugin_dir.clone(),
                name: args.docker_plugin_name.clone(),
            },
            metrics_addr,
            dns: meshnet_control::dns::DnsConfig {
                enabled: !args.no_dns,
                listen: dns_listen,
                domain: dns_domain,
                ttl: args.dns_ttl,
            },
            trusted_subnets,
        };
        daemon::run(cfg)?;
        return Ok(ExitCode::SUCCESS);
    }

    // Background: run ourselves with --foreground, detached, logging to the state dir.
    state.ensure()?;
    kill_stale(state);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(state.log())
        .with_context(|| format!("open log {}", state.log().display()))?;
    // What this launch's router logs starts here: an error shows only that.
    let log_start = log.metadata().map_or(0, |m| m.len());
    let exe = std::env::current_exe().context("find the meshnet binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir").arg(&state.root).arg("launch").arg("--foreground").arg("--no-record-launch");
    cmd.args(["--port", &args.port.to_string(), "--host", &args.host.to_string()]);
    cmd.args(["--mtu", &args.mtu.to_string(), "--bridge", &args.bridge]);
    cmd.args(["--conn-limit", &args.conn_limit.to_string(), "--datapath", datapath.as_str()]);
    if let Some(n) = args.datapath_threads {
        cmd.args(["--datapath-threads", &n.to_string()]);
    }
    if let Some(n) = args.datapath_threads_per_queue {
        cmd.args(["--datapath-threads-per-queue", &n.to_string()]);
    }
    if let Some(n) = args.datapath_busy_poll {
        cmd.args(["--datapath-busy-poll", &n.to_string()]);
    }
    cmd.args(["--rekey-interval", &args.rekey_interval.to_string()]);
    cmd.arg(format!("--metrics-addr={}", args.metrics_addr));
    if let Some(l) = &args.log_level {
        cmd.args(["--log-level", l]);
    }
    if let Some(n) = &args.name {
        cmd.args(["--name", n]);
    }
    if let Some(n) = &args.nickname {
        cmd.args(["--nickname", n]);
    }
    if args.no_discovery {
        cmd.arg("--no-discovery");
    }
    for r in &args.ipalloc_range {
        cmd.args(["--ipalloc-range", r]);
    }
    cmd.args(["--ipalloc-init", &args.ipalloc_init]);
    for d in &args.ipalloc_default_subnet {
        cmd.args(["--ipalloc-default-subnet", d]);
    }
    if args.no_docker_plugin {
        cmd.arg("--no-docker-plugin");
    }
    if let Some(d) = &args.docker_plugin_dir {
        cmd.arg("--docker-plugin-dir").arg(d);
    }
    cmd.args(["--docker-plugin-name", &args.docker_plugin_name]);
    if args.no_dns {
        cmd.arg("--no-dns");
    }
    if let Some(a) = &args.dns_listen_address {
        cmd.args(["--dns-listen-address", a]);
    }
    cmd.args(["--dns-domain", &args.dns_domain, "--dns-ttl", &args.dns_ttl.to_string()]);
    if let Some(t) = &args.trusted_subnets {
        cmd.args(["--trusted-subnets", t]);
    }
    pass_password(&mut cmd, &args, password.as_deref())?;
    cmd.args(&args.peers);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the router from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("start the router")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!("the router exited ({exit}) during startup:\n{}", log_tail(state, log_start, 15));
        }
        if let Ok(v) = api::call(state, &Request::Status, Duration::from_secs(2)) {
            let s: Status = serde_json::from_value(v)?;
            if !s.password {
                eprintln!(
                    "meshnet: warning: no password set: traffic is encrypted, but any host that reaches port {} can join",
                    s.port
                );
            }
            record_launch(state, &args)?;
            println!("{}", s.name);
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            // (It may have exited already; the error below says what it logged.)
            let _ = child.kill();
            bail!("the router did not start serving within 60s:\n{}", log_tail(state, log_start, 15));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A launch with another `--bridge` than the last one's, while containers are
/// attached to that one (their veths are on it) or the host has addresses
/// exposed on it, is refused: the router would start on the new bridge with
/// every one of them cut off from the overlay (re-attaching them fails), and
/// the old bridge would stay behind. Unreadable files are left for the router
/// to report.
fn check_bridge_kept(state: &StateDir, bridge: &str) -> Result<()> {
    let Some(old) = state.load_devices().ok().flatten().map(|d| d.bridge).filter(|b| b != bridge) else {
        return Ok(());
    };
    let attached = state.load_attachments().map_or(0, |a| a.len());
    let exposed = state.load_exposed().map_or(0, |e| e.len());
    let endpoints = meshnet_control::plugin::load(state).map_or(0, |p| p.endpoints.len());
    if attached + exposed + endpoints > 0 {
        bail!(
            "--bridge {bridge}: this state directory's router ran on bridge {old}, where {attached} attached target(s), \
             {exposed} exposed address(es) and {endpoints} Docker endpoint(s) are; launch with --bridge {old} \
             (or detach and hide them, or `meshnet reset`, first)"
        );
    }
    Ok(())
}

/// `--bridge`: a name the kernel takes for a new link as it is (it expands a
/// `%d` into a number and refuses `.`, `..`, `all`, `default` and names with
/// `/`, `:` or white space), at most 15 bytes.
fn check_bridge_name(b: &str) -> Result<()> {
    let bad = b.is_empty()
        || b.len() > 15
        || [".", "..", "all", "default"].contains(&b)
        || b.chars().any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace() || c.is_control());
    if bad {
        bail!("--bridge {b:?}: an interface name of 1 to 15 bytes without '/', ':', '%' or white space, not '.', '..', 'all' or 'default'");
    }
    Ok(())
}

/// `--nickname`: shown line by line in every router's status, report and log,
/// and sent in every handshake, whose Hello must fit its limit.
fn check_nickname(n: &str) -> Result<()> {
    if n.chars().any(char::is_control) {
        bail!("--nickname {n:?}: control characters (a newline, a tab, ...) are not allowed");
    }
    let max = meshnet_proto::topology::MAX_TEXT;
    if n.len() > max {
        bail!("--nickname: {} bytes, at most {max} (peers could not take this router's handshake)", n.len());
    }
    Ok(())
}

/// How the background router gets the password: a `--password-file` is passed
/// on as the file (read again there, byte for byte: a password that is not
/// UTF-8, holds a NUL or is larger than an environment variable can be stays
/// the same), any other password through the environment, never on a command
/// line.
fn pass_password(cmd: &mut Command, args: &LaunchArgs, password: Option<&[u8]>) -> Result<()> {
    cmd.env_remove("MESHNET_PASSWORD");
    match (&args.password, &args.password_file, password) {
        (None, Some(f), Some(_)) => {
            let f = std::fs::canonicalize(f).with_context(|| format!("read password file {}", f.display()))?;
            cmd.arg("--password-file").arg(f);
        }
        (_, _, Some(p)) => {
            let p = std::str::from_utf8(p).context("the password is not UTF-8 text")?;
            cmd.env("MESHNET_PASSWORD", p);
        }
        (_, _, None) => {}
    }
    Ok(())
}

/// Records the options of a launch for `--resume` (never the password itself).
/// `--ipalloc-range` and `--ipalloc-default-subnet`, each at most once per family.
#[derive(Debug, PartialEq)]
struct IpallocArgs {
    range: Cidr,
    /// Whether the IPv4 range was given (not the default).
    range_given: bool,
    default_subnet: Option<Cidr>,
    range6: Option<Cidr>,
    default_subnet6: Option<Cidr>,
}

fn parse_ipalloc(ranges: &[String], subnets: &[String]) -> Result<IpallocArgs> {
    let (mut v4, mut v6): (Option<Cidr>, Option<Cidr>) = (None, None);
    for r in ranges {
        let c: Cidr = r.parse().map_err(|e| anyhow!("--ipalloc-range {r}: {e}"))?;
        if !c.is_allocatable() {
            bail!(
                "--ipalloc-range {c}: {}",
                if c.is_v6() {
                    "an IPv6 range must be between /1 and /126 and not hold ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                } else {
                    "an IPv4 range must be between /1 and /30"
                }
            );
        }
        let slot = if c.is_v6() { &mut v6 } else { &mut v4 };
        if let Some(prev) = slot.replace(c) {
            bail!("--ipalloc-range given twice for one address family ({prev} and {c}): give at most one IPv4 and one IPv6 range");
        }
    }
    let range_given = v4.is_some() && ranges.iter().any(|r| r != meshnet_proto::ipam::DEFAULT_RANGE);
    let range = match v4 {
        Some(r) => r,
        None => meshnet_proto::ipam::DEFAULT_RANGE.parse().map_err(|e| anyhow!("default range: {e}"))?,
    };
    let (mut d4, mut d6): (Option<Cidr>, Option<Cidr>) = (None, None);
    for s in subnets {
        let d: Cidr = s.parse().map_err(|e| anyhow!("--ipalloc-default-subnet {s}: {e}"))?;
        let (slot, within) = if d.is_v6() { (&mut d6, v6) } else { (&mut d4, Some(range)) };
        let Some(within) = within else {
            bail!("--ipalloc-default-subnet {d}: no IPv6 --ipalloc-range was given");
        };
        if !within.contains_net(&d) {
            bail!("--ipalloc-default-subnet {d} is not inside --ipalloc-range {within}");
        }
        if d.prefix() > d.max_subnet_prefix() {
            bail!("--ipalloc-default-subnet {d} is too small to allocate from (at most /{})", d.max_subnet_prefix());
        }
        if let Some(prev) = slot.replace(d) {
            bail!("--ipalloc-default-subnet given twice for one address family ({prev} and {d})");
        }
    }
    Ok(IpallocArgs { range, range_given, default_subnet: d4, range6: v6, default_subnet6: d6 })
}

/// A launch record's option that older releases stored as one string (or null).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
        #[allow(dead_code)]
        Null(Option<()>),
    }
    Ok(match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
        OneOrMany::Null(_) => Vec::new(),
    })
}

/// A recorded `--trusted-subnets` without its empty items: releases that
/// skipped them (`10.0.0.0/8,,`) recorded such lists, and `launch --resume`
/// must still start with them now that a new launch refuses them.
fn without_empty_items<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    let s = <Option<String> as serde::Deserialize>::deserialize(d)?;
    Ok(s.map(|s| s.split(',').map(str::trim).filter(|i| !i.is_empty()).collect::<Vec<_>>().join(",")))
}

/// How many other hosts the peers named at launch are, for `consensus`'s
/// default N (1 + them). A PEER at one of this host's own addresses (or a
/// loopback one) and our port is this router (`meshnet launch $HOSTS` run on
/// every host, Weave's way: counting it, N would wait for a peer that never
/// comes), and a host named twice (by two names, or by name and by address)
/// counts once. Host names are resolved for this, waiting at most
/// [`RESOLVE_WAIT`] for all of them; one that does not resolve in time counts
/// as another host.
fn other_peers_named(peers: &[PeerAddr], port: u16) -> usize {
    count_other_hosts(peers, &resolve_peers(peers, RESOLVE_WAIT), port, &local_ips())
}

/// How long `launch` waits for the resolver when counting the hosts named.
const RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// The socket addresses of each peer (by index): itself when it is an
/// address, the resolver's answer for a host name, none for a name that does
/// not resolve within `wait` (all names are asked at once).
fn resolve_peers(peers: &[PeerAddr], wait: Duration) -> Vec<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut out = vec![Vec::new(); peers.len()];
    let (tx, rx) = std::sync::mpsc::channel();
    let mut asked = 0;
    for (i, p) in peers.iter().enumerate() {
        let host = p.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            out[i].push(std::net::SocketAddr::new(ip, p.port));
            continue;
        }
        let (tx, key) = (tx.clone(), (host.to_string(), p.port));
        // A resolver that hangs leaves its thread behind; launch goes on.
        std::thread::spawn(move || {
            let addrs: Vec<_> = key.to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
            // (Err: launch stopped waiting for it; the answer is not needed.)
            let _ = tx.send((i, addrs));
        });
        asked += 1;
    }
    let deadline = Instant::now() + wait;
    for _ in 0..asked {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, addrs)) => out[i] = addrs,
            Err(_) => break,
        }
    }
    out
}

/// [`other_peers_named`] given each peer's resolved addresses (`resolved[i]`
/// for `peers[i]`, empty when unknown) and this host's addresses.
fn count_other_hosts(peers: &[PeerAddr], resolved: &[Vec<std::net::SocketAddr>], port: u16, own: &[IpAddr]) -> usize {
    let mut seen_addrs = std::collections::HashSet::new();
    let mut seen_names = std::collections::HashSet::new();
    let mut n = 0;
    for (p, addrs) in peers.iter().zip(resolved) {
        let me = addrs.iter().any(|a| {
            let ip = a.ip().to_canonical();
            a.port() == port && (ip.is_loopback() || own.contains(&ip))
        });
        if me {
            continue;
        }
        let new = if addrs.is_empty() {
            seen_names.insert(p.to_string())
        } else {
            !addrs.iter().any(|a| seen_addrs.contains(a))
        };
        seen_addrs.extend(addrs.iter().copied());
        if new {
            n += 1;
        }
    }
    n
}

/// The addresses of this host's interfaces (in this network namespace).
fn local_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we only read, then
    // free once with freeifaddrs; each `ifa_addr` is checked for null and
    // read as the sockaddr type its family names.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

fn record_launch(state: &StateDir, args: &LaunchArgs) -> Result<()> {
    state.ensure()?;
    let mut args = args.clone();
    if let Some(f) = &args.password_file {
        args.password_file = Some(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()));
    }
    let json = serde_json::to_vec_pretty(&args)?;
    meshnet_control::state::write_atomic(&launch_record(state), &json, 0o600)
        .with_context(|| format!("record the launch options in {}", state.root.display()))
}

/// Records the launch (see [`record_launch`]) once the router of `state` answers;
/// never, if it does not within two minutes (it failed, and says why itself).
fn record_once_serving(state: &StateDir, args: &LaunchArgs) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if api::call(state, &Request::Status, Duration::from_secs(2)).is_ok() {
            if let Err(e) = record_launch(state, args) {
                eprintln!("meshnet: warning: {e:#} (launch --resume will not know this launch)");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "meshnet".into())
}

/// The last `lines` lines the log got from byte `from` on (this launch's).
fn log_tail(state: &StateDir, from: u64, lines: usize) -> String {
    let bytes = std::fs::read(state.log()).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the router of `state` has exited.
fn wait_stopped(state: &StateDir, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let pid = state.recorded_pid();
    loop {
        let alive = pid.is_some_and(process_alive);
        if !alive && !state.socket().exists() {
            return Ok(());
        }
        if !alive && api::call(state, &Request::Status, Duration::from_secs(1)).is_err() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router did not stop within {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn process_alive(pid: i32) -> bool {
    // A zombie or a reused pid of another program does not count.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next());
            state != Some('Z')
                && std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|p| p.to_string_lossy().contains("meshnet"))
                    .unwrap_or(false)
        }
        Err(_) => false,
    }
}

/// A router that crashed may leave a process that no longer answers: end it.
/// One killed a moment ago (`kill -9`, or here) holds its ports until its exit
/// completes: wait for that (at most 5 s), or the launch fails with "bind UDP
/// ...: Address already in use".
fn kill_stale(state: &StateDir) {
    let Some(pid) = state.recorded_pid() else { return };
    if pid <= 1 || pid as u32 == std::process::id() {
        return;
    }
    if process_alive(pid) {
        // SAFETY: signalling a pid we checked is a meshnet process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while (process_alive(pid) || process_exiting(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a meshnet process on its way out: its executable is gone
/// already (`process_alive` no longer sees it as meshnet), or its main thread is
/// a zombie while other threads still exit (they hold its sockets until the last
/// one is gone).
fn process_exiting(pid: i32) -> bool {
    if !std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("meshnet")) {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let zombie = matches!(stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()), Some('Z') | Some('X'));
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse::<u32>().ok())
    });
    if zombie {
        threads.is_some_and(|n| n > 1)
    } else {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_err()
    }
}

fn status(state: &StateDir, what: Option<StatusPart>, json: bool) -> Result<ExitCode> {
    let what = match what {
        Some(StatusPart::Ipam) => {
            let v = call(state, Request::IpamStatus)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_ipam(&v);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(StatusPart::Dns) => {
            let v = call(state, Request::DnsStatus)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let s: meshnet_control::dns::DnsStatus = serde_json::from_value(v)?;
                let listen = match (s.enabled, &s.listen) {
                    (false, _) => "off (--no-dns)".to_string(),
                    (true, Some(a)) => a.clone(),
                    (true, None) => meshnet_control::dns::not_listening(s.listen_error.as_deref()),
                };
                println!("         Domain: {} (TTL {}s)", s.domain, s.ttl);
                println!("         Listen: {listen}");
                let c = &s.counters;
                let n = |k: &str| c[k].as_u64().unwrap_or(0);
                println!(
                    "        Queries: {} ({} answered, {} NXDOMAIN, {} forwarded, {} forward failures, {} garbage dropped, {} refused when busy)",
                    n("queries"),
                    n("answered"),
                    n("nxdomain"),
                    n("forwarded"),
                    n("forward_failed"),
                    n("dropped_garbage"),
                    n("refused_busy")
                );
                let sets = |prefix: &str| {
                    let rejected = c[format!("{prefix}_rejected")].as_object().cloned().unwrap_or_default();
                    let by_reason: Vec<String> = rejected.iter().map(|(why, k)| format!("{why} {k}")).collect();
                    let total: u64 = rejected.values().filter_map(|v| v.as_u64()).sum();
                    format!(
                        "{} merged, {} stale, {total} rejected{}",
                        n(&format!("{prefix}_merged")),
                        n(&format!("{prefix}_stale")),
                        if by_reason.is_empty() { String::new() } else { format!(" ({})", by_reason.join(", ")) }
                    )
                };
                println!("    Record sets: IPv4 {}; IPv6 {}", sets("sets"), sets("sets6"));
                println!("        Records: {}", s.records.len());
                for r in &s.records {
                    println!("  {:<32} {:<15} {:<20} {}", r.name, r.address, r.target, r.owner);
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(StatusPart::Peers) => Some(Part::Peers),
        Some(StatusPart::Connections) => Some(Part::Connections),
        Some(StatusPart::Targets) => Some(Part::Targets),
        None => None,
    };
    let v = call(state, Request::Status)?;
    let s: Status = serde_json::from_value(v.clone())?;
    if json {
        let out = match what {
            None => v,
            Some(Part::Peers) => v["peers"].clone(),
            Some(Part::Connections) => v["connections"].clone(),
            Some(Part::Targets) => v["targets"].clone(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    match what {
        None => {
            let established = s.connections.iter().filter(|c| c.state == "established").count();
            println!("        Version: {}", s.version);
            println!("           Name: {} ({})", s.name, s.nickname);
            println!("     Encryption: on ({})", if s.password {
                "password set"
            } else {
                "no password: anyone who reaches the port can join"
            });
            println!("           Port: {} (TCP control, UDP data)", s.port);
            println!("         Bridge: {} (MTU {})", s.bridge, s.mtu);
            println!("       Datapath: {}", match s.datapath.as_str() {
                "pcap" => "pcap (libpcap on a veth: plain frames)",
                "tap" => "tap (superframes)",
                other => other,
            });
            println!("          Peers: {}", s.peers.len());
            println!("    Connections: {} ({} established)", s.connections.len(), established);
            println!("        Targets: {}", s.targets.len());
            if !s.exposed.is_empty() {
                println!("        Exposed: {}", s.exposed.join(" "));
            }
            println!("      Discovery: {}", if s.discovery { "on" } else { "off" });
            if !s.trusted.subnets.is_empty() {
                let t = &s.trusted;
                let how = match (&t.device, &t.unavailable) {
                    (Some(d), _) => format!("kernel VXLAN {d} on UDP {}, {} MACs, {} packets out, {} in", t.port.unwrap_or(0), t.fdb_entries, t.tx_packets, t.rx_packets),
                    (None, Some(e)) => format!("no kernel VXLAN device: {e}"),
                    (None, None) => "no kernel VXLAN device".to_string(),
                };
                println!("Trusted subnets: {} (unencrypted to peers that trust us back; {how})", t.subnets.join(","));
            }
            let l = &s.limits;
            let i = &l.inbound;
            let refused = i.refused_rate_limited
                + i.refused_password_backoff
                + i.refused_pending_full
                + i.refused_source_pending_full
                + i.refused_conn_limit;
            println!(
                "         Limits: {}/{} connection slots, {}/{} accepted handshaking; {refused} refused, {} wrong passwords, {} slow peers closed",
                l.conn_slots_used,
                l.conn_limit,
                i.pending,
                i.pending_limit,
                i.handshakes_wrong_password,
                l.closed_queue_full + l.closed_write_timeout
            );
            let t = &s.trust;
            let dropped: u64 = t.gossip_rejected.values().sum();
            println!(
                "     Identities: {} pinned, {} refused, {} times refused by peers; {} gossip entries dropped",
                t.pinned_keys, t.refused_identities, t.refused_by_peers, dropped
            );
            for r in &t.recent_refusals {
                let who = if r.by == "peer" { "refused us" } else { "refused" };
                println!("                 {who}: {} at {} ({}s ago): {}", r.peer, r.address, r.seconds_ago, r.reason);
            }
        }
        Some(Part::Peers) => print_peers(&s.peers),
        Some(Part::Connections) => print_connections(&s.connections),
        Some(Part::Targets) => s.targets.iter().for_each(|t| println!("{t}")),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_ipam(v: &serde_json::Value) {
    let state = &v["state"];
    let agreed = if state["agreed"].as_bool() == Some(true) {
        "agreed".to_string()
    } else {
        format!("not agreed: waiting for {}", state["waiting"].as_str().unwrap_or("?"))
    };
    println!("          Range: {} (default subnet {})", v["range"].as_str().unwrap_or("?"), v["default_subnet"].as_str().unwrap_or("?"));
    println!("           Ring: {agreed}, {} entries", v["ring_entries"]);
    println!(" Allocated here: {} ({} pending)", v["allocated_here"], v["pending"]);
    println!("    Unreachable: {} addresses owned by unreachable peers", count_text(&v["unreachable_space"]));
    for o in v["owners"].as_array().into_iter().flatten() {
        println!(
            "  {} {:>10} addresses, {:>10} free{}",
            o["peer"].as_str().unwrap_or("?"),
            count_text(&o["size"]),
            count_text(&o["free"]),
            if o["reachable"].as_bool() == Some(true) { "" } else { "  (unreachable)" }
        );
    }
    let refused = v["peer_conflicts"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !refused.is_empty() {
        println!("  Refused peers: {} whose IPAM conflicts with ours (their connection was closed)", refused.len());
        for r in refused {
            println!("  {} ({}s ago): {}", r["peer"].as_str().unwrap_or("?"), r["seconds_ago"], r["error"].as_str().unwrap_or("?"));
        }
    }
    let conflicts = v["conflicts"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !conflicts.is_empty() {
        println!("      Conflicts: {} addresses used here whose claim failed (another target has them too: detach one)", conflicts.len());
        for c in conflicts {
            println!(
                "  {}/{} of {}: {}",
                c["ip"].as_str().unwrap_or("?"),
                c["prefix"],
                c["target"].as_str().unwrap_or("?"),
                c["error"].as_str().unwrap_or("?")
            );
        }
    }
    if v["ipv6"].is_object() {
        println!();
        println!("IPv6 ring:");
        print_ipam(&v["ipv6"]);
    }
}

/// An address count of `status ipam --json`: a number, or (over 2^64 - 1) a string of digits.
fn count_text(v: &serde_json::Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn print_peers(peers: &[PeerStatus]) {
    for p in peers {
        println!("{}({}) {} connections", p.name, p.nickname, p.connections);
    }
}

fn print_connections(conns: &[ConnectionStatus]) {
    for c in conns {
        let who = c.peer.clone().map(|p| format!("{p}({})", c.nickname)).unwrap_or_default();
        println!("{:<8} {:<22} {:<12} {} {}", if c.direction == "outbound" { "->" } else { "<-" }, c.address, c.state, who, c.info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    /// `consensus`'s default N: the hosts named, resolved, without this host
    /// (by any of its addresses or a loopback one, at our port) and without
    /// a host named twice (by two names, or by name and address).
    #[test]
    fn the_other_hosts_named_are_counted_once_and_not_this_one() {
        let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let own: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let peers: Vec<PeerAddr> =
            ["host1", "host2", "host3", "10.0.0.3", "h3-alias", "debian-self", "gone1", "gone1", "gone2", "10.0.0.1:7000"]
                .iter()
                .map(|p| PeerAddr::parse(p, 6783).unwrap())
                .collect();
        let resolved = vec![
            vec![sa("10.0.0.1:6783")],                      // host1: ourselves, by name
            vec![sa("10.0.0.2:6783"), sa("[fd00::2]:6783")], // host2
            vec![sa("10.0.0.3:6783")],                      // host3
            vec![sa("10.0.0.3:6783")],                      // host3 again, by address
            vec![sa("[fd00::3]:6783"), sa("10.0.0.3:6783")], // host3 again, by another name
            vec![sa("127.0.1.1:6783")],                     // Debian maps its own name to 127.0.1.1
            vec![],                                         // did not resolve in time
            vec![],                                         // ... named twice
            vec![],                                         // another name that did not resolve
            vec![sa("10.0.0.1:7000")],                      // another router on this host
        ];
        assert_eq!(count_other_hosts(&peers, &resolved, 6783, &own), 5, "host2, host3, gone1, gone2, :7000");
        assert_eq!(count_other_hosts(&peers[..3], &resolved[..3], 6783, &[]), 3, "nothing of ours known: all count");
    }

    /// Addresses are taken as they are (no resolver); a name that resolves
    /// nowhere within the wait gives no address, and the wait is bounded.
    #[test]
    fn peers_are_resolved_within_the_wait() {
        let peers: Vec<PeerAddr> = ["10.9.9.9", "[fd00::9]:7000", "localhost", "no-such-host.invalid"]
            .iter()
            .map(|p| PeerAddr::parse(p, 6783).unwrap())
            .collect();
        let t = Instant::now();
        let r = resolve_peers(&peers, Duration::from_secs(3));
        assert!(t.elapsed() < Duration::from_secs(4));
        assert_eq!(r[0], vec!["10.9.9.9:6783".parse().unwrap()]);
        assert_eq!(r[1], vec!["[fd00::9]:7000".parse().unwrap()]);
        assert!(!r[2].is_empty() && r[2].iter().all(|a| a.ip().is_loopback() && a.port() == 6783), "{:?}", r[2]);
        assert!(r[3].is_empty(), "{:?}", r[3]);
    }

    #[test]
    fn datapath_threads_default_from_cores() {
        let tap = |cores| default_datapath_threads(cores, Datapath::Tap, 64);
        assert_eq!([tap(1), tap(2), tap(3), tap(4), tap(8), tap(16)], [1, 1, 1, 2, 4, 8]);
        assert_eq!(tap(512), 64, "capped at the most queues a session has");
        assert_eq!(default_datapath_threads(16, Datapath::Pcap, 64), 1, "a capture device has one queue");
    }

    #[test]
    fn ipalloc_once_per_family() {
        // One range given: today's behaviour.
        let one = parse_ipalloc(&v(&["10.40.0.0/16"]), &v(&["10.40.1.0/24"])).unwrap();
        assert_eq!(one.range, "10.40.0.0/16".parse().unwrap());
        assert!(one.range_given && one.range6.is_none() && one.default_subnet6.is_none());
        let dflt = parse_ipalloc(&v(&[meshnet_proto::ipam::DEFAULT_RANGE]), &[]).unwrap();
        assert!(!dflt.range_given);
        // Both families, in either order.
        let both = parse_ipalloc(&v(&["fd32::/64", "10.32.0.0/12"]), &v(&["fd32::/80", "10.32.1.0/24"])).unwrap();
        assert_eq!(both.range6, Some("fd32::/64".parse().unwrap()));
        assert_eq!(both.default_subnet6, Some("fd32::/80".parse().unwrap()));
        assert_eq!(both.default_subnet, Some("10.32.1.0/24".parse().unwrap()));
        // IPv6 alone keeps the default IPv4 range.
        let six = parse_ipalloc(&v(&["fd32::/64"]), &[]).unwrap();
        assert_eq!(six.range, meshnet_proto::ipam::DEFAULT_RANGE.parse().unwrap());
        assert!(!six.range_given);
        for (ranges, subnets, want) in [
            (v(&["10.32.0.0/12", "10.48.0.0/12"]), v(&[]), "twice"),
            (v(&["fd32::/64", "fd33::/64"]), v(&[]), "twice"),
            (v(&["fd32::1/64"]), v(&[]), "host bits"),
            (v(&["fd32::/127"]), v(&[]), "/126"),
            (v(&["ff00::/8"]), v(&[]), "ffff"),
            (v(&["10.32.0.0/31"]), v(&[]), "/30"),
            (v(&["fd32::/64"]), v(&["fd33::/80"]), "not inside"),
            (v(&["10.32.0.0/12"]), v(&["fd33::/80"]), "no IPv6"),
            (v(&["fd32::/64"]), v(&["fd32::/80", "fd32:0:0:0:1::/80"]), "twice"),
            (v(&["fd32::/64"]), v(&["fd32::/127"]), "too small"),
        ] {
            let e = parse_ipalloc(&ranges, &subnets).unwrap_err().to_string();
            assert!(e.contains(want), "{ranges:?} {subnets:?}: {e}");
        }
    }

    /// `launch --resume` takes no option of the recorded launch: each one is refused
    /// with it (not silently replaced by the record). Only what a resume takes
    /// anew (the password, the log level, the foreground) goes with it.
    #[test]
    fn resume_refuses_every_recorded_option() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let launch = cmd.find_subcommand("launch").expect("launch subcommand");
        let taken_anew =
            ["resume", "foreground", "password", "password_file", "log_level", "state_dir", "help", "no_record_launch"];
        let parse = |argv: &[&str]| Cli::try_parse_from(std::iter::once("meshnet").chain(argv.iter().copied()));
        let mut checked = 0;
        for arg in launch.get_arguments().filter(|a| !taken_anew.contains(&a.get_id().as_str())) {
            let id = arg.get_id().as_str();
            let argv: Vec<String> = match arg.get_long() {
                None => vec!["10.0.0.1".to_string()], // PEER
                Some(long) if !arg.get_action().takes_values() => vec![format!("--{long}")],
                Some(long) => {
                    // A value the option takes on its own.
                    let candidates = arg.get_possible_values().into_iter().map(|v| v.get_name().to_string()).chain(
                        ["1", "1400", "10.0.0.0/8", "0.0.0.0", "/tmp", "127.0.0.1:6782"].map(String::from),
                    );
                    let value = candidates
                        .into_iter()
                        .find(|v| parse(&["launch", &format!("--{long}"), v]).is_ok())
                        .unwrap_or_else(|| panic!("no sample value for --{long}"));
                    vec![format!("--{long}"), value]
                }
            };
            let mut with = vec!["launch", "--resume"];
            with.extend(argv.iter().map(String::as_str));
            match parse(&with) {
                Err(e) if e.kind() == clap::error::ErrorKind::ArgumentConflict => checked += 1,
                Err(e) => panic!("launch --resume {argv:?} ({id}): {e}"),
                Ok(_) => panic!("launch --resume {argv:?} is accepted, and the recorded {id} would silently win"),
            }
        }
        assert!(checked > 20, "only {checked} options checked");
        for ok in [&["launch", "--resume", "--log-level", "debug"][..], &["launch", "--resume", "--password-file", "/f"]] {
            assert!(parse(ok).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn bridge_names_the_kernel_would_change_or_refuse_are_refused() {
        for ok in ["meshnet", "weave", "br-0", "abcdefghijklmno", "a.b", "a_b"] {
            assert!(check_bridge_name(ok).is_ok(), "{ok}");
        }
        // `ab%d` would become a bridge `ab0`, left behind; the others the kernel refuses.
        for bad in ["", ".", "..", "all", "default", "ab%d", "a:b", "a b", "a\tb", "a/b", "abcdefghijklmnop"] {
            let e = check_bridge_name(bad).unwrap_err().to_string();
            assert!(e.contains("--bridge"), "{bad}: {e}");
        }
    }

    #[test]
    fn nicknames_peers_could_not_take_are_refused() {
        assert!(check_nickname("host-1").is_ok());
        assert!(check_nickname(&"é".repeat(512)).is_ok());
        // Longer ones made every handshake fail: "our hello is 3179 bytes, over the limit".
        let e = check_nickname(&"n".repeat(3000)).unwrap_err().to_string();
        assert!(e.contains("3000 bytes, at most 1024"), "{e}");
        assert!(check_nickname("two\nlines").is_err());
    }

    #[test]
    fn the_startup_error_shows_only_this_launchs_log() {
        let dir = std::env::temp_dir().join(format!("meshnet-cli-logtail-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        let old = "09:00:00.000 INFO  stopped\n";
        std::fs::write(state.log(), format!("{old}09:00:01.000 INFO  bind TCP: Address already in use\n")).unwrap();
        let from = old.len() as u64;
        assert_eq!(log_tail(&state, from, 15), "09:00:01.000 INFO  bind TCP: Address already in use");
        assert_eq!(log_tail(&state, 0, 1), "09:00:01.000 INFO  bind TCP: Address already in use");
        assert_eq!(log_tail(&state, 1 << 40, 15), "");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_password_file_reaches_the_background_router_as_the_file() {
        let dir = std::env::temp_dir().join(format!("meshnet-cli-pwfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        // Not UTF-8 and with a NUL: an environment variable cannot carry it as it is.
        std::fs::write(&file, b"a\0b\xff\n").unwrap();
        let args = |argv: &[&str]| match Cli::try_parse_from(argv).unwrap().cmd {
            Cmd::Launch(a) => a,
            _ => unreachable!(),
        };
        let a = args(&["meshnet", "launch", "--password-file", file.to_str().unwrap()]);
        let mut cmd = Command::new("meshnet");
        pass_password(&mut cmd, &a, Some(b"a\0b\xff")).unwrap();
        let argv: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(argv, ["--password-file".to_string(), file.canonicalize().unwrap().display().to_string()]);
        assert!(cmd.get_envs().all(|(k, v)| k != "MESHNET_PASSWORD" || v.is_none()), "the password is in the environment");
        let a = args(&["meshnet", "launch", "--password", "s3cret"]);
        let mut cmd = Command::new("meshnet");
        pass_password(&mut cmd, &a, Some(b"s3cret")).unwrap();
        assert_eq!(cmd.get_args().count(), 0, "the password is on the command line");
        assert!(cmd.get_envs().any(|(k, v)| k == "MESHNET_PASSWORD" && v == Some(std::ffi::OsStr::new("s3cret"))));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// `status --help` names every part `status` shows.
    #[test]
    fn status_help_names_every_part() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let status = cmd.find_subcommand_mut("status").expect("status subcommand");
        let help = status.render_long_help().to_string();
        for part in ["ipam", "dns", "peers", "connections", "targets", "--json"] {
            assert!(help.contains(part), "status --help lacks {part}:\n{help}");
        }
        assert!(help.contains("IPAM ring") && help.contains("DNS table"), "{help}");
    }

    /// `--dns-ttl` takes what a DNS TTL may be (RFC 2181: a TTL with the top bit
    /// set is read as 0), not any 32-bit number.
    #[test]
    fn dns_ttl_range() {
        let parse = |v: &str| Cli::try_parse_from(["meshnet", "launch", "--dns-ttl", v]);
        for ok in ["0", "1", "2147483647"] {
            assert!(parse(ok).is_ok(), "--dns-ttl {ok} refused");
        }
        for bad in ["2147483648", "4294967295", "-1"] {
            assert!(parse(bad).is_err(), "--dns-ttl {bad} accepted");
        }
    }

    #[test]
    fn an_unreadable_launch_record_is_named_not_missing() {
        let dir = std::env::temp_dir().join(format!("meshnet-cli-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = StateDir::new(&dir);
        let args = || match Cli::try_parse_from(["meshnet", "launch", "--resume"]).unwrap().cmd {
            Cmd::Launch(a) => a,
            _ => unreachable!(),
        };
        let err = format!("{:#}", resume_args(&state, args()).err().expect("refused"));
        assert!(err.contains("no earlier launch recorded"), "{err}");
        std::fs::write(launch_record(&state), b"\x00\xffgarbage").unwrap();
        let err = format!("{:#}", resume_args(&state, args()).err().expect("refused"));
        assert!(err.contains("launch.json") && !err.contains("no earlier launch"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn launch_record_of_an_older_release_loads() {
        let old = r#"{"ipalloc_range": "10.40.0.0/16", "ipalloc_default_subnet": null}"#;
        #[derive(serde::Deserialize)]
        struct Part {
            #[serde(deserialize_with = "one_or_many")]
            ipalloc_range: Vec<String>,
            #[serde(default, deserialize_with = "one_or_many")]
            ipalloc_default_subnet: Vec<String>,
        }
        let p: Part = serde_json::from_str(old).unwrap();
        assert_eq!(p.ipalloc_range, v(&["10.40.0.0/16"]));
        assert!(p.ipalloc_default_subnet.is_empty());
        let new: Part = serde_json::from_str(r#"{"ipalloc_range": ["10.40.0.0/16", "fd32::/64"], "ipalloc_default_subnet": ["fd32::/80"]}"#).unwrap();
        assert_eq!(new.ipalloc_range.len(), 2);
        assert_eq!(new.ipalloc_default_subnet, v(&["fd32::/80"]));
    }

    /// Releases that skipped empty `--trusted-subnets` items recorded them;
    /// `launch --resume` of such a record keeps working.
    #[test]
    fn recorded_trusted_subnets_with_stray_commas_resume() {
        #[derive(serde::Deserialize)]
        struct Part {
            #[serde(default, deserialize_with = "without_empty_items")]
            trusted_subnets: Option<String>,
        }
        let p: Part = serde_json::from_str(r#"{"trusted_subnets": "10.0.0.0/8,, 192.168.1.0/24,"}"#).unwrap();
        let t = p.trusted_subnets.unwrap();
        assert_eq!(t, "10.0.0.0/8,192.168.1.0/24");
        assert_eq!(meshnet_proto::trusted::parse_list(&t).unwrap().len(), 2);
        let p: Part = serde_json::from_str(r#"{"trusted_subnets": null}"#).unwrap();
        assert!(p.trusted_subnets.is_none());
        let p: Part = serde_json::from_str("{}").unwrap();
        assert!(p.trusted_subnets.is_none());
    }
}
