//! The router process: devices, sockets, tasks, the local API, and shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshnet_proto::PeerName;
use meshnet_router::dataplane::DataPlane;
use meshnet_router::netlink;
use meshnet_router::capture::{self, CaptureDevice};
use meshnet_router::device::Device;
pub use meshnet_router::device::Datapath;
pub use meshnet_router::dataplane::{Layout, DEFAULT_BUSY_POLL_US, MAX_BUSY_POLL_US};
use meshnet_router::tap::Tap;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::api::{self, Request, Response, Status};
use crate::attach::{self, parse_cidr};
use crate::conn::{self, Local};
use crate::mesh::{self, Mesh, Settings, Shutdown};
use crate::ipam::{self as ipamd, AddrSpec, IpamHost};
use crate::peeraddr::PeerAddr;
use meshnet_proto::ipam::{Cidr, InitMode, Waiting};
use crate::expose::{self, EXPOSE_KEY};
use crate::state::{Attachment, Devices, Exposure, StateDir};

pub const DEFAULT_PORT: u16 = 6783;
/// Default overlay MTU, as Weave's: leaves room for our headers in a 1500-byte underlay.
pub const DEFAULT_MTU: u32 = 1376;
/// Largest UDP payload we send on a 1500-byte underlay (IPv4 20 + UDP 8).
pub const MAX_DATAGRAM: usize = 1472;

/// Everything `meshnet launch` decided.
pub struct Config {
    pub state: StateDir,
    pub password: Option<Vec<u8>>,
    pub name: Option<PeerName>,
    pub nickname: String,
    pub port: u16,
    pub host: IpAddr,
    pub mtu: u32,
    pub bridge: String,
    pub discovery: bool,
    pub conn_limit: usize,
    /// `--rekey-interval`: fresh data keys at least this often.
    pub rekey_interval: Duration,
    pub peers: Vec<PeerAddr>,
    /// `--ipalloc-range`, and whether it was given (a default one must not overlap a host route).
    pub ipalloc_range: Cidr,
    pub ipalloc_range_given: bool,
    /// `--ipalloc-default-subnet` (default: the range).
    pub ipalloc_default_subnet: Option<Cidr>,
    /// The IPv6 `--ipalloc-range` (a second ring), if given, and its default subnet.
    pub ipalloc_range6: Option<Cidr>,
    pub ipalloc_default_subnet6: Option<Cidr>,
    pub ipalloc_init: InitMode,
    /// `--datapath`: how the router joins the bridge.
    pub datapath: Datapath,
    /// `--datapath-threads`: forwarding queues.
    pub datapath_threads: usize,
    /// `--datapath-threads-per-queue` (1: one thread forwards both directions, 2: a TX and an RX
    /// thread) and `--datapath-busy-poll`.
    pub datapath_layout: Layout,
    /// Docker's plugin API (`--no-docker-plugin` turns it off).
    pub docker_plugin: DockerPlugin,
    /// `--metrics-addr`: where `/metrics`, `/api/mesh` and the map are served (None: off).
    pub metrics_addr: Option<SocketAddr>,
    /// `--no-dns`, `--dns-listen-address`, `--dns-domain`, `--dns-ttl`.
    pub dns: crate::dns::DnsConfig,
    /// `--trusted-subnets`: data to peers that trust us back goes unencrypted
    /// through the kernel's VXLAN device (see `crate::trusted`).
    pub trusted_subnets: Vec<meshnet_proto::trusted::Subnet>,
}

/// Where and whether the Docker network and IPAM plugin is served.
#[derive(Clone, Debug)]
pub struct DockerPlugin {
    /// Off with `--no-docker-plugin`.
    pub enabled: bool,
    /// `--docker-plugin-dir`; `None`: [`crate::plugin::DEFAULT_DIR`], and only
    /// when a Docker Engine is present.
    pub dir: Option<std::path::PathBuf>,
    /// `--docker-plugin-name`: the socket's name and so both drivers' name.
    pub name: String,
}

impl Default for DockerPlugin {
    fn default() -> Self {
        DockerPlugin { enabled: true, dir: None, name: crate::plugin::DEFAULT_NAME.to_string() }
    }
}

/// The error of binding `proto` port `listen`; for a port in use, which
/// process holds it, when this namespace's `/proc` says (a router still
/// running whose state directory was deleted, say).
fn in_use(proto: &str, listen: SocketAddr, e: std::io::Error) -> anyhow::Error {
    let what = format!("bind {proto} {listen}: {e}");
    if e.kind() != std::io::ErrorKind::AddrInUse {
        return anyhow::anyhow!(what);
    }
    let table = if proto == "TCP" { ["tcp", "tcp6"] } else { ["udp", "udp6"] };
    match port_holder(&table, listen.port()) {
        Some((pid, comm)) => anyhow::anyhow!(
            "{what}: process {pid} ({comm}) holds it (a meshnet router of another state directory, or one whose state directory was deleted: stop it with `kill {pid}`), or launch with --port"
        ),
        None => anyhow::anyhow!("{what}: another program holds it; stop it, or launch with --port"),
    }
}

/// The process (PID, command name) with a socket bound to local `port` in
/// `/proc/net/<table>` (a TCP listener, a UDP socket), if one is visible.
fn port_holder(tables: &[&str], port: u16) -> Option<(u32, String)> {
    let mut inodes = std::collections::HashSet::new();
    for t in tables {
        let text = std::fs::read_to_string(format!("/proc/net/{t}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode (the 10th field).
            let bound = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            // TCP: listening (0A); UDP: any.
            if bound == Some(port) && (t.starts_with("udp") || f.get(3) == Some(&"0A")) {
                if let Some(i) = f.get(9).filter(|i| **i != "0") {
                    inodes.insert(format!("socket:[{i}]"));
                }
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref())) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some((pid, comm.trim().to_string()));
            }
        }
    }
    None
}

/// A socket of `ty` (`SOCK_DGRAM` or `SOCK_STREAM`, then listening) bound to
/// `addr`. `::` is dual-stack whatever `net.ipv6.bindv6only` says: IPv4 peers
/// arrive as mapped addresses (made canonical where they are read), and IPv4
/// destinations are mapped by the sender.
fn bind_listen(addr: SocketAddr, ty: libc::c_int) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd, AsRawFd};
    let family = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| -> std::io::Result<()> {
        // SAFETY: a c_int option value of the right size on our descriptor.
        let r = unsafe {
            libc::setsockopt(fd.as_raw_fd(), level, name, &v as *const libc::c_int as *const libc::c_void, size_of::<libc::c_int>() as libc::socklen_t)
        };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    };
    if addr.is_ipv6() {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, i32::from(!addr.ip().is_unspecified()))?;
    }
    if ty == libc::SOCK_STREAM {
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let (ss, len) = meshnet_router::udp::sockaddr(addr, addr.is_ipv6()).expect("a socket of the address's own family");
    // SAFETY: ss holds a valid address of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len as libc::socklen_t) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our bound stream socket.
    if ty == libc::SOCK_STREAM && unsafe { libc::listen(fd.as_raw_fd(), 1024) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

pub fn tap_name(bridge: &str) -> String {
    let stem: String = bridge.chars().take(11).collect();
    format!("{stem}-tap")
}

/// Runs the router in this process until `stop` or `reset`.
pub fn run(cfg: Config) -> Result<()> {
    crate::heap::tune();
    cfg.state.ensure()?;
    if api::call(&cfg.state, &Request::Status, Duration::from_secs(2)).is_ok() {
        bail!("a meshnet router is already running for state directory {}", cfg.state.root.display());
    }
    let stale = cfg.state.remove_stale_temporaries();
    if stale > 0 {
        log::info!("removed {stale} temporary file(s) left in {} by a write cut short", cfg.state.root.display());
    }
    // Sockets first: a port in use is the most common launch failure, and
    // before the identity is made: a router still running whose state directory
    // was deleted holds the ports, and a new identity here would outlive it.
    let threads = cfg.datapath_threads.max(1);
    if threads > 1 && cfg.datapath == Datapath::Pcap {
        anyhow::bail!("--datapath-threads {threads} needs --datapath tap (a capture device has one queue)");
    }
    let listen = SocketAddr::new(cfg.host, cfg.port);
    let mut udps = if threads > 1 {
        meshnet_router::udp::bind_queues(listen, threads).map_err(|e| in_use("UDP", listen, e))?
    } else {
        vec![std::net::UdpSocket::from(bind_listen(listen, libc::SOCK_DGRAM).map_err(|e| in_use("UDP", listen, e))?)]
    };
    let udp = udps.remove(0);
    let std_tcp = std::net::TcpListener::from(bind_listen(listen, libc::SOCK_STREAM).map_err(|e| in_use("TCP", listen, e))?);
    if cfg.host.is_ipv6() && cfg.host.is_unspecified() {
        log::info!("listening on {listen}: IPv6 and IPv4 (dual-stack)");
    }
    std_tcp.set_nonblocking(true)?;
    let metrics_listener = match cfg.metrics_addr {
        Some(a) => {
            let l = std::net::TcpListener::bind(a).with_context(|| format!("bind the metrics port {a} (--metrics-addr)"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };

    let identity = cfg.state.identity()?;
    let me = cfg.name.unwrap_or_else(|| identity.name());
    if !meshnet_proto::trust::valid_name(me) {
        bail!("peer name {me} cannot name a peer (00:00:00:00:00:00 is the broadcast name)");
    }
    // Names pinned to keys: a corrupt file stops the launch rather than unpinning everything.
    let keys = cfg.state.load_keys()?;
    let signer = Arc::new(meshnet_proto::trust::Signer::from_identity(&identity));
    let binding = meshnet_proto::trust::Binding::new(me, &identity, &signer);
    if !cfg.ipalloc_range_given {
        ipamd::check_default_range(&cfg.ipalloc_range, &cfg.bridge)?;
    }
    let mut ipam = IpamHost::open(
        &cfg.state,
        me,
        cfg.ipalloc_range,
        cfg.ipalloc_default_subnet.unwrap_or(cfg.ipalloc_range),
        cfg.ipalloc_init.clone(),
        &identity,
    )?;
    let ipam6 = match cfg.ipalloc_range6 {
        Some(r6) => Some(IpamHost::open(
            &cfg.state,
            me,
            r6,
            cfg.ipalloc_default_subnet6.unwrap_or(r6),
            cfg.ipalloc_init.clone(),
            &identity,
        )?),
        None => None,
    };
    let psk = cfg.password.as_deref().map(meshnet_proto::handshake::derive_psk);

    // Devices.
    let existed = netlink::link_index(&cfg.bridge).context("look up bridge")?.is_some();
    let previous = cfg.state.load_devices()?;
    let bridge_created = !existed || previous.as_ref().is_some_and(|d| d.bridge == cfg.bridge && d.bridge_created);
    let bridge_index = netlink::ensure_bridge(&cfg.bridge, cfg.mtu).with_context(|| format!("bridge {}", cfg.bridge))?;
    if existed && bridge_created {
        // Our bridge, left by an earlier launch perhaps with another --mtu: it
        // takes this one's, as the TAP and the re-attached interfaces do below.
        if let Err(e) = netlink::set_mtu(&cfg.bridge, cfg.mtu) {
            log::warn!("bridge {}: {e}", cfg.bridge);
        }
    }
    if bridge_created {
        // Before the TAP joins it: the bridge's MAC (that of its exposed
        // addresses) must not follow the TAP's, which is new at every launch.
        netlink::pin_bridge_mac(&cfg.bridge).with_context(|| format!("bridge {}", cfg.bridge))?;
    }
    let tap_if = port_name(&cfg.bridge, cfg.datapath);
    if let Some(old) = previous.as_ref().filter(|d| d.tap != tap_if) {
        // The port of a run with the other datapath (a capture veth outlives a crash).
        netlink::clean_up_link(&old.tap, "the port of the other datapath");
    }
    cfg.state.save_devices(&Devices { bridge: cfg.bridge.clone(), bridge_created, tap: tap_if.clone() })?;
    let mut queues: Vec<Device> = match cfg.datapath {
        Datapath::Tap => Tap::create_queues(&tap_if, bridge_index, cfg.mtu, threads)
            .with_context(|| format!("TAP {tap_if}"))?
            .into_iter()
            .map(Device::from)
            .collect(),
        Datapath::Pcap => vec![CaptureDevice::create(&cfg.bridge, bridge_index, cfg.mtu)
            .with_context(|| format!("capture device {tap_if}"))?
            .into()],
    };
    let tap = queues.remove(0);
    log::info!(
        "meshnet {} peer {me} ({}) on bridge {} (datapath {}, port {}, virtio header {}), port {}",
        env!("CARGO_PKG_VERSION"),
        cfg.nickname,
        cfg.bridge,
        cfg.datapath,
        tap.name(),
        if tap.vnet_hdr() { "on" } else { "off" },
        cfg.port
    );
    let capabilities = if tap.vnet_hdr() { meshnet_proto::handshake::CAP_SUPERFRAMES } else { 0 };
    if psk.is_none() {
        log::warn!("no password set: traffic is encrypted, but any host that reaches port {} can join", cfg.port);
    }
    let udp_port = udp.local_addr()?.port();
    let trusted_device = trusted_device(&cfg, bridge_index);
    let dataplane = DataPlane::start_queues([tap].into_iter().chain(queues).collect(), [udp].into_iter().chain(udps).collect(), me, MAX_DATAGRAM, cfg.datapath_layout)
        .context("start the data plane")?;
    let layout = cfg.datapath_layout;
    let each = if layout.threads_per_queue > 1 { "a TX and an RX thread" } else { "one thread" };
    log::info!("data plane: {threads} queue(s), {each} each, busy polling {} µs after traffic", layout.busy_poll.as_micros());

    // Re-attach what was attached before a restart; forget targets that are gone.
    let mut attachments = cfg.state.load_attachments()?;
    let before = attachments.len();
    // Targets forgotten here lose their DNS records too, once the mesh is up.
    let mut forgotten: Vec<String> = Vec::new();
    attachments.retain(|a| {
        let Some(_) = attach::still_there(a) else {
            if a.container_id.is_some() {
                // A stopped container keeps its attachment until it is removed:
                // the engine's events (and the resync when they connect) decide.
                log::info!("container {} is not running; keeping its attachment until it is removed", a.target);
                return true;
            }
            log::info!("forgetting target {}: {}", a.target, attach::gone_reason(a));
            forgotten.push(a.target.clone());
            return false;
        };
        let addrs: Vec<_> = a.addrs.iter().filter_map(|s| parse_cidr(s).ok()).collect();
        if let Err(e) = reattach(&cfg, a, &addrs) {
            log::warn!("re-attaching {}: {e:#}", a.target);
        }
        true
    });
    if attachments.len() != before {
        cfg.state.save_attachments(&attachments)?;
    }
    // The host's own addresses on the overlay, and meshnet's nftables table.
    let exposed = cfg.state.load_exposed()?;
    let ranges = expose::Ranges { v4: ipam.ipam.universe(), v6: ipam6.as_ref().map(|h| h.ipam.universe()) };
    if let Err(e) = expose::apply(&cfg.bridge, ranges, &exposed) {
        log::warn!("re-exposing {}: {e:#}", exposed.iter().map(|e| e.addr.as_str()).collect::<Vec<_>>().join(" "));
    }
    // Addresses of targets that vanished while we were down go back to the pool.
    let mut live: Vec<String> = attachments.iter().map(attachment_key).collect();
    if !exposed.is_empty() {
        live.push(EXPOSE_KEY.to_string());
    }
    // The Docker plugin's addresses live as long as Docker's endpoints (persisted).
    let plugin_state = crate::plugin::load(&cfg.state)?;
    live.extend(plugin_state.ipam_keys());
    let mut ipam6 = ipam6;
    for h in std::iter::once(&mut ipam).chain(ipam6.as_mut()) {
        // No peer is reachable before a connection is: until routes say
        // otherwise, other owners' space is unreachable (`status ipam` showed a
        // seed peer never seen as reachable, and claims were sent to nobody).
        h.ipam.peers_changed(&[]);
        for (target, ip) in h.ipam.release_missing(&live) {
            log::info!("IPAM: released {ip} of {target}, which is gone");
        }
        release_unrecorded(h, &attachments, &exposed);
        // Addresses attached before a ring was agreed and never claimed: claim them
        // once it is (at once, if it already is).
        for a in &attachments {
            let key = attachment_key(a);
            let held = h.ipam.addresses_of(&key);
            for (ip, prefix) in a.addrs.iter().filter_map(|s| parse_cidr(s).ok()) {
                if h.ipam.universe().contains(ip) && !held.contains(&ip) {
                    h.deferred.push((key.clone(), ip, prefix));
                    // Never handed out to another target meanwhile.
                    let now = h.now_ms();
                    if let Err(e) = h.ipam.note_in_use(&key, ip, prefix, now) {
                        log::warn!("IPAM: {ip}/{prefix} of {key} is not noted as in use ({e}): until its claim completes it may be handed out to another target");
                    }
                }
            }
        }
        {
            let held = h.ipam.addresses_of(EXPOSE_KEY);
            for e in &exposed {
                if let Ok((ip, subnet)) = expose::parse(e) {
                    if h.ipam.universe().contains(ip) && !held.contains(&ip) {
                        h.deferred.push((EXPOSE_KEY.to_string(), ip, subnet.prefix()));
                        let now = h.now_ms();
                        if let Err(err) = h.ipam.note_in_use(EXPOSE_KEY, ip, subnet.prefix(), now) {
                            log::warn!("IPAM: exposed {} is not noted as in use ({err}): until its claim completes it may be handed out to a target", e.addr);
                        }
                    }
                }
            }
        }
        if h.ipam.is_agreed() {
            h.claim_deferred();
        }
        // No peer is connected yet (none is live to IPAM either): what IPAM
        // would send now goes to nobody, as the mesh drops a message for a peer
        // it has no connection to; each peer that connects gets its state in
        // full. What happened (claims, conflicts) is logged.
        let (_to_nobody, events) = h.flush();
        for e in &events {
            ipamd::log_event(e);
        }
    }

    // Targets saved by an earlier build may be spelled otherwise (`[FD00::1]:6783`):
    // they take the form `connect` gives, so `forget` finds them. One it took
    // that is no peer's address (`0.0.0.0`, broadcast, multicast; refused now)
    // is dropped: it could be neither dialled nor forgotten.
    let mut targets: Vec<String> = Vec::new();
    let saved = cfg.state.load_targets()?.into_iter().filter_map(|t| match PeerAddr::parse(&t, cfg.port) {
        Ok(p) => Some(p.to_string()),
        Err(e @ crate::peeraddr::BadPeerAddr::NotUnicast(_)) => {
            log::warn!("connect target dropped: {e}");
            None
        }
        Err(_) => Some(t),
    });
    // A peer named again by a restart (same command line: Docker, systemd)
    // after it was forgotten stays forgotten, until `meshnet stop`.
    let removed_targets = cfg.state.load_forgotten();
    let named = cfg.peers.iter().map(|p| p.to_string()).filter(|t| {
        let keep = !removed_targets.contains(t);
        if !keep {
            log::info!("not adding {t} named at launch: forgotten since the last meshnet stop (meshnet connect it)");
        }
        keep
    });
    for t in saved.chain(named) {
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    cfg.state.save_targets(&targets)?;

    let settings = Settings {
        me,
        nickname: cfg.nickname.clone(),
        uid: mesh::random_u64(),
        port: cfg.port,
        password: psk.is_some(),
        discovery: cfg.discovery,
        conn_limit: cfg.conn_limit,
        bridge: cfg.bridge.clone(),
        mtu: cfg.mtu,
        rekey_interval: cfg.rekey_interval,
        signer,
        binding,
        host: cfg.host,
    };
    let dns = Arc::new(crate::dns::Dns::open(&cfg.state, cfg.dns.clone(), me, settings.signer.clone())?);
    let local = Arc::new(Local { identity, psk, udp_port, capabilities });
    let trusted = Arc::new(crate::trusted::Trusted::new(
        cfg.trusted_subnets.clone(),
        trusted_device,
        me,
        settings.uid,
        &settings.signer,
    ));
    let vxlan_made = trusted.device.as_ref().ok().and_then(|d| d.as_ref()).map(|d| d.name.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("control")
        .build()?;
    let state = cfg.state.clone();
    let how = rt.block_on(async move {
        let mesh = Mesh::new(settings, state.clone(), dataplane, targets, ipam, keys, dns.clone(), trusted);
        if let Some(h) = ipam6 {
            mesh.set_ipam6(h);
        }
        for target in forgotten.iter().filter(|t| !attachments.iter().any(|a| &a.target == *t)) {
            unregister_logged(&mesh, target, &[]);
        }
        register_pending_dns(&mesh, &mut attachments);
        let listener = TcpListener::from_std(std_tcp)?;
        let sock_path = state.socket();
        // A socket left by a router that died (the launch checked none serves).
        let _ = std::fs::remove_file(&sock_path);
        let api_listener = UnixListener::bind(&sock_path).with_context(|| format!("bind {}", sock_path.display()))?;
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(state.pid(), format!("{}\n", std::process::id()))?;

        let ctx = Arc::new(ApiCtx {
            mesh: mesh.clone(),
            expose_op: Mutex::new(()),
            exposed: Mutex::new(exposed),
            attachments: Mutex::new(attachments),
            attaching: std::sync::RwLock::new(()),
            swept: Mutex::new(std::collections::VecDeque::new()),
            datapath: cfg.datapath,
        });
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(conn::accept_loop(mesh.clone(), local.clone(), listener));
        tasks.spawn(conn::maker_loop(mesh.clone(), local.clone()));
        tasks.spawn(mesh::route_loop(mesh.clone()));
        tasks.spawn(crate::splice::open_loop(mesh.clone(), local.clone()));
        tasks.spawn(api_loop(ctx.clone(), api_listener));
        tasks.spawn(keys_saver(mesh.clone()));
        tasks.spawn(crate::heap::trim_loop());
        tasks.spawn(crate::trusted::sync_loop(mesh.clone()));
        tasks.spawn(announce_once_connected(ctx.clone()));
        tasks.spawn(announce_to_new_trusted_peers(ctx.clone()));
        tasks.spawn(forget_gone_loop(ctx.clone()));
        tasks.spawn(guard_loop(ctx.clone()));
        if let Some(l) = metrics_listener {
            log::info!("serving metrics and the map on http://{}", l.local_addr()?);
            let exposed_ctx = ctx.clone();
            let sources = Arc::new(crate::metrics::Sources {
                mesh: mesh.clone(),
                exposed: Box::new(move || {
                    exposed_ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|e| e.addr.clone()).collect()
                }),
            });
            tasks.spawn(crate::metrics::serve(sources, TcpListener::from_std(l)?));
        }
        // DNS gossip runs with or without --no-dns (records pass through); the server only without it.
        tasks.spawn(crate::dns::digest_loop(mesh.clone()));
        if cfg.dns.enabled {
            let exposed_ctx = ctx.clone();
            tasks.spawn(crate::dns::serve(dns.clone(), move || {
                // The first exposed IPv4 address (the records are IPv4 ones).
                let e = exposed_ctx.exposed.lock().unwrap_or_else(|p| p.into_inner());
                e.iter().find_map(|x| expose::parse(x).ok().map(|(ip, _)| ip).filter(IpAddr::is_ipv4))
            }));
        }
        // Docker containers attached by name: attached again when they start,
        // released when they are removed.
        let events_ctx = ctx.clone();
        tasks.spawn(crate::docker::watch_events(move |ev| {
            let ctx = events_ctx.clone();
            tokio::task::spawn_blocking(move || engine_event(&ctx, ev));
        }));
        let plugin_socket = match start_docker_plugin(&cfg.docker_plugin, &ctx, plugin_state) {
            Ok(Some((socket, plugin, listener))) => {
                tasks.spawn(crate::plugin::serve(plugin, listener));
                Some(socket)
            }
            Ok(None) => None,
            Err(e) => {
                log::error!("Docker plugin not served: {e:#}");
                None
            }
        };

        let mut sig_term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sig_int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut stop = mesh.shutdown.subscribe();
        let how = tokio::select! {
            _ = sig_term.recv() => Shutdown::Stop,
            _ = sig_int.recv() => Shutdown::Stop,
            _ = stop.wait_for(|s| s.is_some()) => mesh.shutdown.borrow().unwrap_or(Shutdown::Stop),
        };
        log::info!("stopping ({how:?})");
        mesh.request_shutdown(how);
        // Let connections say goodbye: each task has a second to write it.
        let started = std::time::Instant::now();
        match mesh.connections_ended(Duration::from_millis(1500)).await {
            0 => log::info!("connections closed in {} ms", started.elapsed().as_millis()),
            n => log::warn!("{n} connections still closing after 1.5 s; stopping anyway"),
        }
        tasks.abort_all();
        if let Err(e) = mesh.save_keys() {
            log::error!("saving the key book: {e:#}");
        }
        let _ = std::fs::remove_file(&sock_path);
        if let Some(s) = &plugin_socket {
            s.remove();
        }
        let attachments = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner()).clone();
        anyhow::Ok((how, attachments, mesh))
    })?;
    let (how, attachments, mesh) = how;
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Ok(mesh) = Arc::try_unwrap(mesh) {
        mesh.dataplane.stop();
    }
    if cfg.datapath == Datapath::Pcap {
        // Dropping the device removes its veth; this covers a data plane still referenced.
        netlink::clean_up_link(&tap_if, "the router stopped");
    }
    // The VXLAN device goes with the router (stop and reset); a launch makes it again.
    if let Some(name) = &vxlan_made {
        if let Err(e) = meshnet_router::vxlan::remove(name) {
            log::warn!("removing {name}: {e}");
        }
        crate::trusted::remove_filter(&cfg.bridge);
    }
    if how == Shutdown::Reset {
        remove_devices(&cfg.state, &attachments);
        // The state goes here, not only in the CLI that asked: a CLI run with
        // `docker exec` in the router's container dies with the router.
        if let Err(e) = cfg.state.remove() {
            log::warn!("reset: {e:#}");
        }
    }
    // (Gone already after a reset, which removed the state directory.)
    let _ = std::fs::remove_file(cfg.state.pid());
    log::info!("stopped");
    Ok(())
}

/// Persists the key book after it changes (debounced, written off the mesh lock
/// and off the async workers); a failed write is retried.
async fn keys_saver(mesh: Arc<Mesh>) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = mesh.keys_saver.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m = mesh.clone();
        match tokio::task::spawn_blocking(move || m.save_keys()).await {
            Ok(Ok(_)) => {
                if failing {
                    log::info!("key book saved again");
                }
                failing = false;
            }
            Ok(Err(e)) => {
                if !failing {
                    log::error!("saving the key book failed (retrying every 10 s): {e:#}");
                }
                failing = true;
            }
            Err(e) => log::error!("key book saver: {e}"),
        }
    }
}

/// Re-attaching at launch (and a Docker resync soon after) announces each
/// address (gratuitous ARP, neighbour advertisement) before any peer is
/// connected, so only this host hears it: a target re-made while the router was
/// down (a restarted container, a new MAC) stayed unknown to remote neighbours
/// until their entries timed out. Once the first connection is established,
/// every attachment is announced again, twice, a moment apart (the first
/// broadcasts may still find no route), however long that takes (a lone router
/// whose first peer comes an hour later).
async fn announce_once_connected(ctx: Arc<ApiCtx>) {
    let started = std::time::Instant::now();
    while !ctx.mesh.has_established() {
        tokio::time::sleep(connection_poll(started.elapsed())).await;
    }
    announce_attachments(&ctx).await;
}

/// Every attachment announced again, twice, a moment apart (the first
/// broadcasts may still find no route).
async fn announce_attachments(ctx: &ApiCtx) {
    for pause in [Duration::from_millis(500), Duration::from_secs(2)] {
        tokio::time::sleep(pause).await;
        let attachments = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // (Err: the closure panicked, which the panic message said.)
        let _ = tokio::task::spawn_blocking(move || {
            for a in &attachments {
                let Some(ns) = attach::still_there(a) else { continue };
                let addrs: Vec<_> = a.addrs.iter().filter_map(|s| parse_cidr(s).ok()).collect();
                if let Err(e) = netlink::reannounce(&ns, attach::ifname_of(a), &addrs) {
                    log::debug!("announcing {} again: {e}", a.target);
                }
            }
        })
        .await;
    }
}

/// How often [`forget_gone_loop`] looks for namespaces that are gone.
const GONE_CHECK: Duration = Duration::from_secs(10);

/// A namespace deleted without `detach` (or whose process exited) is forgotten
/// within [`GONE_CHECK`]: its host interface removed, its addresses returned to
/// IPAM and its DNS records removed, as a restart would. A failed save is
/// retried at the next check, with nothing forgotten meanwhile.
async fn forget_gone_loop(ctx: Arc<ApiCtx>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(GONE_CHECK).await;
        let c = ctx.clone();
        let result = tokio::task::spawn_blocking(move || {
            // An attach under way (one may wait for IPAM up to 30 s): next time.
            let _alone = match c.attaching.try_write() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return anyhow::Ok(()),
            };
            let mut a = c.attachments.lock().unwrap_or_else(|p| p.into_inner());
            let gone = attach::forget_gone_namespaces(&c.mesh.state, &mut a)?;
            drop(a);
            if gone.is_empty() {
                return anyhow::Ok(());
            }
            release_forgotten(&c.mesh, &gone, "", "");
            let mut swept = c.swept.lock().unwrap_or_else(|p| p.into_inner());
            for g in &gone {
                for name in [g.target.clone(), g.ns_path.to_string_lossy().into_owned()] {
                    if swept.len() >= SWEPT_KEPT {
                        swept.pop_front();
                    }
                    swept.push_back(name);
                }
            }
            anyhow::Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) => {
                if !failing {
                    log::error!("forgetting attachments whose namespace is gone (retrying every {}s): {e:#}", GONE_CHECK.as_secs());
                }
                failing = true;
            }
            Err(e) => log::error!("checking for namespaces that are gone: {e}"),
        }
    }
}

/// How often [`guard_loop`] checks what others may undo under the router.
const GUARD_CHECK: Duration = Duration::from_secs(10);

/// Puts back what someone else undid under the running router, saying so in
/// the log: meshnet's nftables tables while something is exposed (a flushed
/// ruleset: Weave's iptables "canary"), and hairpin mode on the router's own
/// bridge port (a kubelet with `--hairpin-mode=hairpin-veth`, say), which
/// would send every broadcast from another host back to its sender.
async fn guard_loop(ctx: Arc<ApiCtx>) {
    let port = match ctx.datapath {
        Datapath::Tap => tap_name(&ctx.mesh.settings.bridge),
        Datapath::Pcap => capture::veth_names(&ctx.mesh.settings.bridge).1,
    };
    loop {
        let c = ctx.clone();
        let port = port.clone();
        // (Err: the closure panicked, which the panic message said.)
        let _ = tokio::task::spawn_blocking(move || {
            let hairpin = format!("/sys/class/net/{port}/brport/hairpin_mode");
            if std::fs::read_to_string(&hairpin).is_ok_and(|v| v.trim() == "1") {
                match netlink::set_hairpin(&port, false) {
                    Ok(()) => log::warn!("hairpin mode was on on {port}, the router's bridge port (broadcasts from other hosts would come back to their senders): turned it off"),
                    Err(e) => log::warn!("hairpin mode is on on {port}, the router's bridge port: {e}"),
                }
            }
            // An expose or hide under way writes the tables itself.
            let Ok(_one_at_a_time) = c.expose_op.try_lock() else { return };
            let exposed = c.exposed.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if exposed.is_empty() {
                return;
            }
            let bridge = &c.mesh.settings.bridge;
            let ranges = expose::Ranges {
                v4: c.mesh.with_ipam(|h| h.ipam.universe()),
                v6: c.mesh.with_ipam_for(true, |h| h.ipam.universe()),
            };
            match expose::restore_tables(bridge, ranges, &exposed) {
                Ok(true) => log::warn!("meshnet's nftables table for {bridge} was gone (flushed ruleset?): written again"),
                Ok(false) => {}
                Err(e) => log::warn!("checking meshnet's nftables tables: {e:#}"),
            }
        })
        .await;
        tokio::time::sleep(GUARD_CHECK).await;
    }
}

/// How often [`announce_once_connected`] looks for the first connection:
/// often while one is likely soon (peers named at launch connect within
/// seconds), then at a pace that costs an idle router nothing.
fn connection_poll(waited: Duration) -> Duration {
    if waited < Duration::from_secs(300) {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(2)
    }
}

/// Data to a peer trusted both ways goes through the kernel only to the MACs
/// this router learned behind it, from frames that came the encrypted way.
/// Once the peer knows our containers' MACs, its containers' frames to ours
/// all take the kernel path and teach us nothing (their ARP refreshes are
/// unicast too), so after a restart of either router one side sent encrypted
/// for as long as the other's containers broadcast nothing. Each time a
/// connection turns `trusted (kernel)`, our attachments are announced again
/// (broadcasts, which go the encrypted way), so the peer learns them.
async fn announce_to_new_trusted_peers(ctx: Arc<ApiCtx>) {
    // Without the kernel's VXLAN device no connection is ever `trusted (kernel)`.
    if ctx.mesh.trusted.device_ok().is_none() {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ok = {
            let g = ctx.mesh.lock();
            g.conns.iter().filter(|(_, c)| c.established && c.udp_ok).map(|(id, _)| *id).collect()
        };
        let now = ctx.mesh.trusted.kernel_connections(&ok);
        let new = !now.is_subset(&seen);
        seen = now;
        if new {
            announce_attachments(&ctx).await;
        }
    }
}

fn reattach(cfg: &Config, a: &Attachment, addrs: &[(IpAddr, u8)]) -> Result<()> {
    let ns = attach::still_there(a).with_context(|| attach::gone_reason(a))?;
    netlink::attach(&netlink::AttachSpec {
        target: ns.clone(),
        bridge: cfg.bridge.clone(),
        host_if: a.host_if.clone(),
        container_if: attach::ifname_of(a).into(),
        mtu: cfg.mtu,
        addrs: addrs.to_vec(),
        multicast_route: !a.no_multicast_route,
    })?;
    plain_frames_if_capturing(cfg.datapath, &ns, attach::ifname_of(a));
    Ok(())
}

/// In the capture datapath a container must send plain frames: its interface's
/// transmit offloads go off (as Weave's `ethtool -K ethwe tx off`).
fn plain_frames_if_capturing(datapath: Datapath, ns: &meshnet_router::netns::Netns, ifname: &str) {
    if datapath == Datapath::Pcap {
        if let Err(e) = capture::plain_frames_only(ns, ifname) {
            log::warn!("{e}");
        }
    }
}

/// The router's port on the bridge: the TAP, or the capture veth's far end
/// (deleting it deletes the pair).
pub fn port_name(bridge: &str, datapath: Datapath) -> String {
    match datapath {
        Datapath::Tap => tap_name(bridge),
        Datapath::Pcap => capture::veth_names(bridge).0,
    }
}

/// What the log says of data when the kernel VXLAN device is missing.
const USERSPACE_INSTEAD: &str =
    "data to peers trusted both ways goes unencrypted through meshnet's own UDP path instead (trusted (userspace))";

/// The kernel VXLAN device for `--trusted-subnets` (UDP `--port` + 1), made
/// afresh (one left by a router killed with -9 is deleted first); without
/// trusted subnets a left-over one is only deleted. Err: why there is none
/// (data to peers trusted both ways then goes `trusted (userspace)`,
/// unencrypted through meshnet's own UDP path; the launch goes on).
fn trusted_device(cfg: &Config, bridge_index: u32) -> Result<Option<crate::trusted::Device>, String> {
    use meshnet_router::vxlan;
    let name = vxlan::device_name(&cfg.bridge);
    if cfg.trusted_subnets.is_empty() {
        if let Ok(true) = vxlan::remove(&name) {
            log::info!("removed {name}, left by an earlier run");
        }
        crate::trusted::remove_filter(&cfg.bridge);
        return Ok(None);
    }
    let Some(port) = cfg.port.checked_add(1) else {
        return Err(format!("no UDP port after {} for VXLAN", cfg.port));
    };
    let router_port = match cfg.datapath {
        Datapath::Tap => tap_name(&cfg.bridge),
        Datapath::Pcap => capture::veth_names(&cfg.bridge).1,
    };
    let local = match cfg.host {
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => None,
    };
    let spec = vxlan::VxlanSpec { name: name.clone(), bridge_index, router_port, port, mtu: cfg.mtu, local };
    match vxlan::create(&spec) {
        Ok(index) => {
            // Nobody may send to the port until a peer is trusted both ways
            // (the sync loop lets peers' addresses in); no filter, no device.
            if let Err(e) = crate::trusted::apply_filter(&cfg.bridge, port, &[]) {
                if let Err(undo) = vxlan::remove(&name) {
                    log::warn!("{name} is left behind: {undo}");
                }
                log::warn!("trusted subnets: no nftables filter for UDP {port} ({e:#}), so no kernel VXLAN device; {USERSPACE_INSTEAD}");
                return Err(format!("no nftables filter for UDP {port}: {e:#}"));
            }
            log::info!(
                "trusted subnets {}: kernel VXLAN device {name} on UDP {port}; data to peers that trust us back goes there unencrypted",
                cfg.trusted_subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
            );
            Ok(Some(crate::trusted::Device { name, index, port, bridge: cfg.bridge.clone() }))
        }
        Err(e) => {
            log::warn!("trusted subnets: no kernel VXLAN device ({e}); {USERSPACE_INSTEAD}");
            Err(e.to_string())
        }
    }
}

/// What `ps` shows of one attachment: the MAC and addresses its interface has
/// now (the remembered addresses, and MAC "-", when the namespace is gone).
fn ps_entry(at: &Attachment) -> api::PsEntry {
    let seen = attach::still_there(at).and_then(|ns| netlink::inspect(&ns, attach::ifname_of(at)).ok().flatten());
    api::PsEntry {
        target: at.target.clone(),
        kind: at.kind.clone(),
        mac: seen.as_ref().map(|s| meshnet_proto::peer::format_mac(&s.mac)).unwrap_or_else(|| "-".into()),
        addresses: seen.map(|s| s.addrs.iter().map(attach::format_cidr).collect()).unwrap_or_else(|| at.addrs.clone()),
        interface: attach::ifname_of(at).to_string(),
        container_id: at.container_id.as_ref().map(|id| id[..id.len().min(12)].to_string()),
    }
}

/// Removes every interface and device this router made: container interfaces,
/// the TAP, the exposed addresses and meshnet's nftables table, and the bridge
/// if we created it.
pub fn remove_devices(state: &StateDir, attachments: &[Attachment]) {
    for a in attachments {
        if let Some(ns) = attach::still_there(a) {
            if let Err(e) = netlink::detach(&ns, attach::ifname_of(a), &[]) {
                log::warn!("detaching {}: {e}", a.target);
            }
        }
        netlink::clean_up_link(&a.host_if, &format!("{}'s interface, at reset", a.target));
    }
    if let Ok(Some(d)) = state.load_devices() {
        expose::remove_all(&d.bridge, &state.load_exposed().unwrap_or_default());
        netlink::clean_up_link(&d.tap, "the router's port, at reset");
        let vxlan = meshnet_router::vxlan::device_name(&d.bridge);
        if let Err(e) = meshnet_router::vxlan::remove(&vxlan) {
            log::warn!("{vxlan} is left behind: {e}");
        }
        crate::trusted::remove_filter(&d.bridge);
        if d.bridge_created {
            if let Err(e) = netlink::delete_link(&d.bridge) {
                log::warn!("deleting bridge {}: {e}", d.bridge);
            }
        }
    }
}

/// `meshnet reset` with no router running: remove what the state directory says we made.
pub fn reset_offline(state: &StateDir) -> Result<()> {
    let attachments = state.load_attachments().unwrap_or_default();
    remove_devices(state, &attachments);
    Ok(())
}

/// What the API handlers share. Lock order: `expose_op`, then `exposed` or
/// `attachments` (never both held at once).
struct ApiCtx {
    mesh: Arc<Mesh>,
    /// Held for a whole `expose` or `hide`.
    expose_op: Mutex<()>,
    /// The host's addresses on the overlay (persisted in `exposed.json`).
    exposed: Mutex<Vec<Exposure>>,
    attachments: Mutex<Vec<Attachment>>,
    /// Held (shared) for a whole `attach`, which takes its addresses before it
    /// records the target; [`forget_gone_loop`] runs only when it can take it
    /// alone, so it never frees what an `attach` of a namespace with the same
    /// name just took (and never holds attaches up).
    attaching: std::sync::RwLock<()>,
    /// Targets [`forget_gone_loop`] forgot (their names and namespace paths,
    /// the last [`SWEPT_KEPT`]): `detach` of one is done, not an unknown target.
    swept: Mutex<std::collections::VecDeque<String>>,
    datapath: Datapath,
}

/// How long `reset` waits for a connection coming up to hand its ranges over.
const RESET_WAIT_FOR_PEER: Duration = Duration::from_secs(10);

/// How many forgotten targets [`ApiCtx::swept`] keeps.
const SWEPT_KEPT: usize = 256;

async fn api_loop(ctx: Arc<ApiCtx>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Err: the client went away (or sent no request); nobody to tell.
            let _ = serve_api(ctx, stream).await;
        });
    }
}

async fn serve_api(ctx: Arc<ApiCtx>, stream: UnixStream) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, api::MAX_LINE as u64));
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error(format!("bad request: {e}")),
        Ok(req) => {
            let ctx2 = ctx.clone();
            let shutdown = match &req {
                Request::Stop => Some(Shutdown::Stop),
                Request::Reset => Some(Shutdown::Reset),
                _ => None,
            };
            // Netlink work blocks: keep it off the async workers.
            let result = tokio::task::spawn_blocking(move || handle(&ctx2, req)).await;
            let response = match result {
                Ok(Ok(v)) => Response::Ok(v),
                Ok(Err(e)) => Response::Error(format!("{e:#}")),
                Err(e) => Response::Error(format!("internal error: {e}")),
            };
            if let (Some(how), Response::Ok(_)) = (shutdown, &response) {
                let mut bytes = serde_json::to_vec(&response)?;
                bytes.push(b'\n');
                w.write_all(&bytes).await?;
                ctx.mesh.request_shutdown(how);
                return Ok(());
            }
            response
        }
    };
    let mut bytes = serde_json::to_vec(&response)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await?;
    Ok(())
}

fn handle(ctx: &ApiCtx, req: Request) -> Result<serde_json::Value> {
    let mesh = &ctx.mesh;
    let s = &mesh.settings;
    match req {
        Request::Status => {
            let stats: serde_json::Map<String, serde_json::Value> =
                mesh.dataplane.stats.to_json().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            let status = Status {
                name: s.me.to_string(),
                nickname: s.nickname.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                port: s.port,
                password: s.password,
                discovery: s.discovery,
                bridge: s.bridge.clone(),
                mtu: s.mtu,
                datapath: ctx.datapath.to_string(),
                peers: mesh.peer_status(),
                connections: mesh.connection_status(),
                targets: mesh.targets(),
                dataplane: serde_json::Value::Object(stats),
                limits: mesh.limits_status(),
                control: mesh.control_stats(),
                trust: mesh.trust_status(),
                exposed: ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|e| e.addr.clone()).collect(),
                trusted: mesh.trusted.status(),
                features: crate::api::FEATURES.iter().map(|f| f.to_string()).collect(),
            };
            let mut v = serde_json::to_value(status)?;
            v["forwarding"] = json!({
                "queues": mesh.dataplane.queues(),
                "threads_per_queue": mesh.dataplane.layout().threads_per_queue,
                "busy_poll_us": mesh.dataplane.layout().busy_poll.as_micros() as u64,
            });
            // IPAM's drop counters and save health (the full IPAM view is `status ipam`).
            v["ipam"] = mesh.with_ipam(|h| {
                json!({ "drops": h.ipam.drops(), "save_failures": h.save_failures, "unsaved": h.ipam.needs_save() })
            });
            Ok(v)
        }
        // `connect --replace` with no peers clears the targets.
        Request::Connect { peers, replace: true } if peers.is_empty() => Ok(json!(mesh.set_targets(&[], true)?)),
        Request::Connect { peers, replace } => {
            let parsed = parse_peers(&peers, s.port)?;
            Ok(json!(mesh.set_targets(&parsed, replace)?))
        }
        Request::Forget { peers } => {
            let parsed = parse_peers(&peers, s.port)?;
            Ok(json!(mesh.forget_targets(&parsed)?))
        }
        Request::Expose { cidrs, masquerade, name } => {
            // The name is checked before anything is exposed.
            if let Some(n) = &name {
                meshnet_proto::dns::normalize_name(n, &ctx.mesh.dns.config.domain).context("expose -h")?;
            }
            let v = expose_addrs(ctx, &cidrs, masquerade)?;
            if let Some(n) = &name {
                let ips = ips_of(&v["addresses"]);
                crate::dns::register(&ctx.mesh, EXPOSE_DNS_TARGET, n, &ips).context("expose -h")?;
            }
            Ok(v)
        }
        // Names given with `expose -h` go with their addresses (in hide_addrs).
        Request::Hide { cidrs } => hide_addrs(ctx, &cidrs, true),
        Request::Attach { target, cidrs, ifname, no_multicast_route, without_dns, rewrite_hosts, add_hosts, hairpin } => {
            if !add_hosts.is_empty() && !rewrite_hosts {
                bail!("attach: --add-host goes with --rewrite-hosts");
            }
            let extra_hosts = add_hosts.iter().map(|h| crate::hosts::parse_add_host(h)).collect::<Result<Vec<_>>>()?;
            let _attaching = ctx.attaching.read().unwrap_or_else(|p| p.into_inner());
            // Check everything before anything changes.
            let specs: Vec<AddrSpec> = if cidrs.is_empty() {
                // One address of each configured family, from its default subnet.
                let mut v = vec![AddrSpec::Any(None)];
                v.extend(mesh.with_ipam_for(true, |h| AddrSpec::Any(Some(h.default_subnet))));
                v
            } else {
                cidrs.iter().map(|c| ipamd::parse_addr(c)).collect::<Result<_>>()?
            };
            let t = attach::resolve(&target)?;
            if rewrite_hosts && t.hosts_file.is_none() {
                bail!("attach {target}: --rewrite-hosts takes a Docker container, and {target} is a {}", t.kind);
            }
            // A namespace attached already, under whatever spelling (its netns name or
            // path, a PID or /proc/PID/ns/net, a container's name or PID), is the same
            // target: its addresses stay under the IPAM key it was first attached with,
            // so attaching it again adds nothing new and `detach` frees them all.
            let inode = t.netns.inode().ok();
            let known = inode.and_then(|i| {
                let a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
                a.iter().find(|x| attach::is_attachment_of(x, &t, i)).map(attachment_key)
            });
            let key = known.unwrap_or_else(|| ipamd::key(t.kind, &t.name, t.container.as_ref().map(|c| c.id.as_str())));
            let requests = mesh.with_ipams(|h, h6| specs.iter().map(|sp| ipamd::request_for(sp, h, h6.as_deref())).collect::<Result<Vec<_>>>())?;
            let held_before = held(mesh, &key);
            let addrs = match allocate_all(mesh, &key, &specs, requests) {
                Ok(a) => a,
                Err(e) => {
                    release_new(mesh, &key, &held_before);
                    return Err(e.context(format!("attach {target}")));
                }
            };
            let exposed = ctx.exposed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = exposed.iter().find(|e| addrs.iter().any(|(ip, _)| attach::same_ip(&e.addr, ip))) {
                release_new(mesh, &key, &held_before);
                bail!("address {} is exposed on this host (meshnet hide it first)", e.addr);
            }
            drop(exposed);
            let mut a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
            // What attach forgot on the way (gone namespaces) is released
            // whether or not it succeeds.
            let mut forgotten = Vec::new();
            let done = match attach::attach(
                &mesh.state,
                &mut a,
                &s.bridge,
                s.mtu,
                &target,
                &addrs,
                attach::Inside {
                    ifname: ifname.as_deref(),
                    multicast_route: !no_multicast_route,
                    without_dns,
                    rewrite_hosts: rewrite_hosts.then_some(&add_hosts[..]),
                },
                &mut forgotten,
            ) {
                Ok(d) => d,
                Err(e) => {
                    drop(a);
                    release_forgotten(mesh, &forgotten, &key, &t.name);
                    release_new(mesh, &key, &held_before);
                    return Err(e);
                }
            };
            let hairpin_set = if hairpin {
                t.netns.inode().with_context(|| format!("attach {target}")).and_then(|inode| match a.iter().find(|x| x.ns_inode == inode) {
                    Some(x) => netlink::set_hairpin(&x.host_if, true).with_context(|| format!("attach {target}")),
                    None => Ok(()),
                })
            } else {
                Ok(())
            };
            plain_frames_if_capturing(ctx.datapath, &t.netns, &done.container_if);
            // All its addresses (an attach again may have added some), for /etc/hosts.
            let all_ips: Vec<IpAddr> = a
                .iter()
                .find(|x| Some(x.ns_inode) == inode)
                .map(|x| x.addrs.iter().filter_map(|c| parse_cidr(c).ok().map(|(ip, _)| ip)).collect())
                .unwrap_or_default();
            drop(a);
            release_forgotten(mesh, &forgotten, &key, &t.name);
            hairpin_set?;
            if t.kind == "docker" && !without_dns {
                // Containers attached by name are found by it: <name>.<domain>
                // (A for its IPv4 addresses, AAAA for its IPv6 ones), and by
                // their host name when it is a name in the domain
                // (`docker run -h db.meshnet.local`), as `weave attach` did;
                // not when attached `--without-dns` (kept with the attachment,
                // so the router's own attach at its `start` leaves them out too).
                let ips: Vec<IpAddr> = done.addrs.iter().map(|(ip, _)| *ip).collect();
                register_container(mesh, &t.name, &t.name, t.fqdn.as_deref(), &ips);
                dns_registered(ctx, inode);
            }
            if let (true, Some(file)) = (rewrite_hosts, &t.hosts_file) {
                // As `weave attach --rewrite-hosts`: the container's host name at
                // its overlay addresses, and the --add-host entries.
                crate::hosts::rewrite(file, &all_ips, &extra_hosts).with_context(|| {
                    format!("attach {target}: attached ({}), but its /etc/hosts was not rewritten", done.addrs.iter().map(attach::format_cidr).collect::<Vec<_>>().join(" "))
                })?;
            }
            Ok(json!({
                "target": target,
                "interface": done.container_if,
                "mac": meshnet_proto::peer::format_mac(&done.mac),
                "addresses": done.addrs.iter().map(attach::format_cidr).collect::<Vec<_>>(),
            }))
        }
        Request::Detach { target, cidrs } => {
            // `net:CIDR` (`net:default`) stands for each of the target's
            // addresses in that subnet, as in Weave (`hide` takes it too).
            let mut nets = Vec::new();
            let mut addrs = Vec::new();
            for c in &cidrs {
                if c.starts_with("net:") {
                    nets.push(match ipamd::parse_addr(c)? {
                        AddrSpec::Any(Some(net)) => net,
                        _ => mesh.with_ipam(|h| h.default_subnet),
                    });
                } else {
                    addrs.push(parse_cidr(c.strip_prefix("ip:").unwrap_or(c))?);
                }
            }
            let mut a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
            if !nets.is_empty() {
                if let Some(i) = attach::find_remembered(&a, &target) {
                    for (ip, prefix) in a[i].addrs.iter().filter_map(|s| parse_cidr(s).ok()) {
                        if nets.iter().any(|n| n.contains(ip)) && !addrs.iter().any(|(x, _)| *x == ip) {
                            addrs.push((ip, prefix));
                        }
                    }
                }
                if addrs.is_empty() {
                    // None of its addresses is there: nothing to do (not "all of them").
                    return Ok(json!({ "target": target, "detached": false }));
                }
            }
            let remembered = attach::find_remembered(&a, &target).map(|i| a[i].target.clone());
            let key = attach::find_remembered(&a, &target).map(|i| attachment_key(&a[i]));
            // Its DNS records go with its addresses (all of them, of both
            // families, with the interface), and before them: the other way
            // round, a crash in between left names pointing at addresses back
            // in the pool, and nothing removed them. A crash in between now
            // leaves it attached without those names, which `detach` again
            // completes; a container attached by name has them back at the
            // next launch (its record says so first).
            let marked = mark_names_pending(&mesh.state, &mut a, &target)?;
            let ips: Vec<IpAddr> = addrs.iter().map(|(ip, _)| *ip).collect();
            let unnamed = match &remembered {
                Some(name) => unregister_returning(mesh, name, &ips),
                None => Vec::new(),
            };
            let removed = match attach::detach(&mesh.state, &mut a, &target, &addrs) {
                Ok(r) => r,
                // Its namespace went without `detach`, and it was forgotten since.
                Err(_)
                    if attach::resolve(&target).is_err()
                        && ctx.swept.lock().unwrap_or_else(|p| p.into_inner()).contains(&target) =>
                {
                    false
                }
                Err(e) => {
                    if let Some(name) = &remembered {
                        register_again(mesh, name, &unnamed);
                    }
                    unmark_names_pending(&mesh.state, &mut a, marked);
                    return Err(e);
                }
            };
            // Some of its addresses detached: the names of the others stay.
            unmark_names_pending(&mesh.state, &mut a, marked);
            drop(a);
            if let Some(key) = key {
                mesh.with_ipams(|h4, h6| {
                    for h in std::iter::once(h4).chain(h6) {
                        h.deferred.retain(|(k, ip, _)| {
                            k != &key || !(addrs.is_empty() || addrs.iter().any(|(a, _)| a == ip))
                        });
                        if addrs.is_empty() {
                            h.ipam.free_target(&key);
                        } else {
                            for (ip, _) in &addrs {
                                h.ipam.free(&key, *ip);
                            }
                        }
                    }
                });
            }
            Ok(json!({ "target": target, "detached": removed }))
        }
        Request::Ps => {
            let a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(serde_json::to_value(a.iter().map(ps_entry).collect::<Vec<_>>())?)
        }
        Request::PsOf { targets } => {
            let a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut chosen = Vec::new();
            for t in &targets {
                // A target attached to nothing lists nothing (not an error).
                chosen.extend(attach::ps_matches(&a, t));
            }
            chosen.sort_unstable();
            chosen.dedup();
            Ok(serde_json::to_value(chosen.into_iter().map(|i| ps_entry(&a[i])).collect::<Vec<_>>())?)
        }
        Request::IpamStatus => Ok(ipam_status_json(mesh)),
        Request::Rmpeer { peer } => {
            let name = resolve_peer_name(mesh, &peer)?;
            // The rings judge reachability on the topology's view, as forget_identity does.
            mesh.ipam_sees_topology();
            // Its pinned keys go too, so a host reinstalled with a new key can take the name.
            let identity = mesh.forget_identity(name).map_err(|e| anyhow::anyhow!(e))?;
            // Off the disk before the answer (the key saver writes later): a
            // crash right after a success brought the key back.
            mesh.save_keys().with_context(|| format!("rmpeer {name}: its key is forgotten, but the key book could not be saved (the router retries every 10 s)"))?;
            let taken = match mesh.with_ipam(|h| h.ipam.rmpeer(name)) {
                Ok(n) => n,
                // The identity is gone already; a mesh without an agreed ring has no ranges to take.
                Err(meshnet_proto::ipam::IpamError::NotAgreed) => 0,
                Err(e) => return Err(anyhow::anyhow!(e)),
            };
            let mut out = json!({ "peer": name.to_string(), "addresses_taken_over": ipamd::count(taken), "identity_removed": identity });
            if let Some(r) = mesh.with_ipam_for(true, |h| h.ipam.rmpeer(name)) {
                let taken6 = match r {
                    Ok(n) => n,
                    Err(meshnet_proto::ipam::IpamError::NotAgreed) => 0,
                    Err(e) => return Err(anyhow::anyhow!("IPv6 ring: {e}")),
                };
                out["ipv6_addresses_taken_over"] = ipamd::count(taken6);
            }
            Ok(out)
        }
        Request::Prime => Ok(mesh.with_ipams(|h4, h6| {
            // Consensus starts when an allocation waits for it (as in Weave): ask
            // for one under a reserved key, released as soon as it is granted.
            let prime = |h: &mut ipamd::IpamHost| {
                if !h.ipam.is_agreed() {
                    let now = h.now_ms();
                    // Only to start consensus: what it achieved is `agreed` and
                    // `state` below (an error, as a Pending, leaves it unagreed).
                    let _ = h.ipam.allocate(ipamd::PRIME_KEY, meshnet_proto::ipam::Request::Any(h.default_subnet), now);
                }
                h.ipam.free_target(ipamd::PRIME_KEY);
            };
            prime(h4);
            let mut out = json!({ "agreed": h4.ipam.is_agreed(), "state": h4.status_json()["state"].clone() });
            if let Some(h6) = h6 {
                prime(h6);
                out["ipv6"] = json!({ "agreed": h6.ipam.is_agreed(), "state": h6.status_json()["state"].clone() });
            }
            out
        })),
        Request::Report => {
            let mut status = handle(ctx, Request::Status)?;
            let exposed = ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let ps = handle(ctx, Request::Ps)?;
            let ipam = ipam_status_json(mesh);
            if let Some(o) = status.as_object_mut() {
                o.remove("ipam");
            }
            Ok(crate::report::build(mesh, status, ipam, ps, &exposed))
        }
        Request::DnsAdd { target, addrs, name } => dns_add(ctx, &target, &addrs, name.as_deref()),
        Request::DnsRemove { target, addrs, name } => dns_remove(ctx, &target, &addrs, name.as_deref()),
        Request::DnsLookup { name } => {
            let dns = &mesh.dns;
            let fq = meshnet_proto::dns::normalize_name(&name, &dns.config.domain)?;
            // IPv4 addresses first, then IPv6 ones.
            let addrs: Vec<String> = dns.table().lookup(&fq).iter().map(|a| a.to_string()).collect();
            if addrs.is_empty() {
                bail!("{fq}: no such name in the table");
            }
            Ok(json!({ "name": fq, "addresses": addrs }))
        }
        Request::DnsStatus => Ok(serde_json::to_value(mesh.dns.status())?),
        Request::Stop => {
            // A launch after a stop adds every peer it names again.
            if let Err(e) = mesh.state.save_forgotten(&[]) {
                log::warn!("clearing the forgotten targets: {e:#}");
            }
            Ok(json!({ "stopping": true }))
        }
        Request::Reset => {
            // Our targets go, and their addresses back to IPAM: so do our DNS
            // records, on every router (queued before the goodbye).
            match crate::dns::unregister_all(mesh) {
                Ok(gone) if !gone.is_empty() => log::info!("DNS: removed this router's {} records", gone.len()),
                Ok(_) => {}
                Err(e) => log::warn!("DNS: could not remove this router's records: {e:#}"),
            }
            // Hand our address ranges to a live peer before we go. A connected
            // peer not reachable yet (it was launched a moment ago, as in a
            // rolling `reset` and `launch` of every host) is waited for, a
            // little, rather than leaving the ranges to a name that is gone.
            let deadline = std::time::Instant::now() + RESET_WAIT_FOR_PEER;
            let reset = |v6: bool| loop {
                let r = if v6 { mesh.with_ipam_for(true, |h| h.ipam.reset()) } else { Some(mesh.with_ipam(|h| h.ipam.reset())) };
                // A connection up, or coming up, whose peer IPAM does not see
                // as reachable yet (routes follow the topology's gossip).
                let coming_up = || {
                    mesh.connection_status().iter().any(|c| matches!(c.state.as_str(), "connecting" | "pending" | "established"))
                };
                if matches!(r, Some(Err(meshnet_proto::ipam::IpamError::NoLivePeer)))
                    && std::time::Instant::now() < deadline
                    && coming_up()
                {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                break r;
            };
            for r in reset(false).into_iter().chain(reset(true)) {
                match r {
                    Ok(Some(p)) => log::info!("IPAM: handed this peer's ranges to {p}"),
                    Ok(None) => {}
                    Err(e) => log::warn!("IPAM: could not hand over ranges: {e}"),
                }
            }
            Ok(json!({ "stopping": true }))
        }
    }
}

/// Parses `dns-add`/`dns-remove` addresses: IPv4 or IPv6, optionally as
/// `ip:ADDR` or with a `/prefix`.
fn parse_dns_addrs(addrs: &[String]) -> Result<Vec<IpAddr>> {
    addrs
        .iter()
        .map(|s| {
            let bare = s.strip_prefix("ip:").unwrap_or(s);
            let (bare, prefix) = bare.split_once('/').map_or((bare, None), |(a, p)| (a, Some(p)));
            let ip = match bare.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => bail!("{s}: not an IPv4 address, nor an IPv6 one"),
            };
            // A prefix (`10.32.1.5/12`, as `attach` prints it) is allowed, but it must be one.
            if let Some(p) = prefix {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                if p.parse::<u8>().ok().filter(|p| *p <= max).is_none() {
                    bail!("{s}: the prefix length must be 0 to {max}");
                }
            }
            Ok(ip)
        })
        .collect()
}

/// The addresses of a JSON list of `ip/prefix` strings (an expose's or hide's answer).
fn ips_of(list: &serde_json::Value) -> Vec<IpAddr> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().and_then(|a| parse_cidr(a).ok()).map(|(ip, _)| ip))
        .collect()
}

/// The target of DNS records added with no target (`dns-add ADDR... -h NAME`; Weave's `weave:extern`).
const EXTERN_DNS_TARGET: &str = "meshnet:extern";
/// The target of the names of exposed addresses (`expose -h NAME`; Weave's `weave:expose`).
const EXPOSE_DNS_TARGET: &str = "meshnet:expose";

/// `meshnet dns-add [ADDR...] TARGET [-h NAME]`: checked whole before anything changes.
fn dns_add(ctx: &ApiCtx, target: &str, addrs: &[String], name: Option<&str>) -> Result<serde_json::Value> {
    let mesh = &ctx.mesh;
    let given = parse_dns_addrs(addrs)?;
    let name = match name {
        Some(n) => n.to_string(),
        None if target.is_empty() => bail!("dns-add: give -h NAME to register addresses of no target"),
        None => container_dns_name(ctx, target)?,
    };
    let name = name.as_str();
    meshnet_proto::dns::normalize_name(name, &mesh.dns.config.domain)?;
    if target.is_empty() {
        // Addresses of no target (a host or service outside the overlay's targets).
        if given.is_empty() {
            bail!("dns-add: give a TARGET, or the addresses to register");
        }
        let added = crate::dns::register(mesh, EXTERN_DNS_TARGET, name, &given).context("dns-add")?;
        let fq = meshnet_proto::dns::normalize_name(name, &mesh.dns.config.domain)?;
        return Ok(json!({ "name": fq, "target": EXTERN_DNS_TARGET, "addresses": given.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "added": added.len() }));
    }
    let remembered = {
        let a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
        attach::find_remembered(&a, target).map(|i| a[i].clone())
    };
    let (record_target, addrs) = match remembered {
        Some(at) => {
            let attached: Vec<IpAddr> = at.addrs.iter().filter_map(|c| parse_cidr(c).ok().map(|(ip, _)| ip)).collect();
            (at.target.clone(), if given.is_empty() { attached } else { given })
        }
        None => {
            let t = attach::resolve(target).with_context(|| format!("dns-add {target}"))?;
            if given.is_empty() {
                bail!("dns-add {target}: it is not attached, so it has no addresses to register: give them");
            }
            (t.name, given)
        }
    };
    if addrs.is_empty() {
        bail!("dns-add {target}: it has no address attached");
    }
    let added = crate::dns::register(mesh, &record_target, name, &addrs).with_context(|| format!("dns-add {target}"))?;
    let fq = meshnet_proto::dns::normalize_name(name, &mesh.dns.config.domain)?;
    Ok(json!({ "name": fq, "target": record_target, "addresses": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "added": added.len() }))
}

/// The name `dns-add TARGET` without `-h` registers, as `weave dns-add` took
/// the container's host name: a Docker container's host name when that is a
/// name of the domain (`docker run -h db.meshnet.local`), else its container
/// name in the domain. Any other target has no such name: an error asking for one.
fn container_dns_name(ctx: &ApiCtx, target: &str) -> Result<String> {
    let t = attach::resolve(target).with_context(|| format!("dns-add {target}"))?;
    if t.kind != "docker" {
        bail!("dns-add {target}: give -h NAME (only a Docker container has a name of its own to register)");
    }
    Ok(host_name_in_domain(&ctx.mesh, t.fqdn.as_deref()).unwrap_or(&t.name).to_string())
}

/// `meshnet dns-remove [ADDR...] TARGET [-h NAME]`.
fn dns_remove(ctx: &ApiCtx, target: &str, addrs: &[String], name: Option<&str>) -> Result<serde_json::Value> {
    let mesh = &ctx.mesh;
    let addrs = parse_dns_addrs(addrs)?;
    if let Some(n) = name {
        meshnet_proto::dns::normalize_name(n, &mesh.dns.config.domain)?;
    }
    if target.is_empty() {
        // The records `dns-add ADDR... -h NAME` added (of NAME, of ADDRs).
        if addrs.is_empty() || name.is_none() {
            bail!("dns-remove: give a TARGET, or the addresses and -h NAME");
        }
        let removed = crate::dns::unregister(mesh, EXTERN_DNS_TARGET, name, &addrs).context("dns-remove")?;
        return Ok(json!({ "target": EXTERN_DNS_TARGET, "removed": removed.len() }));
    }
    let remembered = {
        let a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
        attach::find_remembered(&a, target).map(|i| a[i].target.clone())
    };
    // A target that is gone (a removed container) can still lose its records by the name they carry.
    let known = remembered.is_some();
    let record_target = match remembered {
        Some(t) => t,
        None => attach::resolve(target).map(|t| t.name).unwrap_or_else(|_| target.to_string()),
    };
    let owns = mesh.dns.table().own_target(&record_target);
    if !known && !owns {
        bail!("dns-remove {target}: unknown target: no records are registered for it here");
    }
    let removed = crate::dns::unregister(mesh, &record_target, name, &addrs).with_context(|| format!("dns-remove {target}"))?;
    Ok(json!({ "target": record_target, "removed": removed.len() }))
}

/// `meshnet expose`: an address on the bridge for every spec (an exposed one
/// that fits is reused), persisted, then the nftables table.
fn expose_addrs(ctx: &ApiCtx, cidrs: &[String], masquerade: Option<bool>) -> Result<serde_json::Value> {
    let mesh = &ctx.mesh;
    let bridge = &mesh.settings.bridge;
    let specs: Vec<AddrSpec> = if cidrs.is_empty() {
        // One address of each configured family, from its default subnet (as `attach`).
        let mut v = vec![AddrSpec::Any(None)];
        v.extend(mesh.with_ipam_for(true, |h| AddrSpec::Any(Some(h.default_subnet))));
        v
    } else {
        cidrs.iter().map(|c| ipamd::parse_addr(c)).collect::<Result<_>>()?
    };
    let (range, default_subnet) = mesh.with_ipam(|h| (h.ipam.universe(), h.default_subnet));
    let range6 = mesh.with_ipam_for(true, |h| h.ipam.universe());
    let ranges = expose::Ranges { v4: range, v6: range6 };
    // The range of an address's (or subnet's) family, or why there is none.
    let range_of = |v6: bool, what: &str| -> Result<Cidr> {
        match (v6, range6) {
            (false, _) => Ok(range),
            (true, Some(r6)) => Ok(r6),
            (true, None) => bail!("cannot expose {what}: no IPv6 --ipalloc-range was given at launch"),
        }
    };
    // One expose or hide at a time (concurrent CNI ADDs must not expose two
    // addresses in one subnet); `exposed` itself is only locked briefly, so
    // `status` never waits for an allocation.
    let _one_at_a_time = ctx.expose_op.lock().unwrap_or_else(|p| p.into_inner());
    let exposed = ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Check everything before anything changes.
    let mut answer: Vec<Option<String>> = Vec::new();
    let mut new_specs = Vec::new();
    {
        let attachments = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
        for spec in &specs {
            let found = exposed.iter().find(|e| {
                let Ok((ip, _)) = expose::parse(e) else { return false };
                match spec {
                    AddrSpec::Any(None) => default_subnet.contains(ip),
                    AddrSpec::Any(Some(c)) => c.contains(ip),
                    AddrSpec::Exact { ip: want, .. } => *want == ip,
                }
            });
            if let Some(e) = found {
                answer.push(Some(e.addr.clone()));
                continue;
            }
            match spec {
                AddrSpec::Exact { ip, prefix, .. } => {
                    let range = range_of(ip.is_ipv6(), &format!("{ip}/{prefix}"))?;
                    if !range.contains(*ip) {
                        bail!("cannot expose {ip}/{prefix}: it is outside the IP allocation range {range}");
                    }
                    if let Some(holder) = attachments.iter().find(|a| a.addrs.iter().any(|x| attach::same_ip(x, ip))) {
                        bail!("cannot expose {ip}/{prefix}: the address is attached to {}", holder.target);
                    }
                }
                AddrSpec::Any(Some(c)) => {
                    let range = range_of(c.is_v6(), &format!("an address of {c}"))?;
                    if !range.contains_net(c) {
                        bail!("cannot expose an address of {c}: it is outside the IP allocation range {range}")
                    }
                }
                AddrSpec::Any(None) => {}
            }
            answer.push(None);
            new_specs.push(match spec {
                // An exposed address is always claimed in the ring (it is inside the range).
                AddrSpec::Exact { ip, prefix, .. } => AddrSpec::Exact { ip: *ip, prefix: *prefix, strict: true },
                other => other.clone(),
            });
        }
    }
    let held_before = held(mesh, EXPOSE_KEY);
    let requests = mesh
        .with_ipams(|h, h6| new_specs.iter().map(|sp| ipamd::request_for(sp, h, h6.as_deref())).collect::<Result<Vec<_>>>())?;
    let allocated = allocate_all(mesh, EXPOSE_KEY, &new_specs, requests).map_err(|e| {
        release_new(mesh, EXPOSE_KEY, &held_before);
        e.context("expose")
    })?;
    let mut next = exposed.clone();
    let mut fresh = allocated.iter();
    for a in answer.iter_mut() {
        if a.is_none() {
            let text = attach::format_cidr(fresh.next().expect("one per new spec"));
            if !next.iter().any(|e| e.addr == text) {
                next.push(Exposure { addr: text.clone(), masquerade: masquerade.unwrap_or(true) });
            }
            *a = Some(text);
        }
    }
    // Exposing again with (or without) --without-masquerade changes that.
    if let Some(m) = masquerade {
        for e in next.iter_mut() {
            if answer.iter().flatten().any(|a| *a == e.addr) {
                e.masquerade = m;
            }
        }
    }
    // The record goes to disk before the addresses go on the bridge: a crash in
    // between must not leave an address there that no record holds (the next
    // launch would free it in IPAM while the bridge still has it).
    if let Err(e) = mesh.state.save_exposed(&next) {
        release_new(mesh, EXPOSE_KEY, &held_before);
        return Err(e.context("expose"));
    }
    let mut added = Vec::new();
    // IPv6 on the bridge (quiet) once an IPv6 address is exposed on it; back
    // off if nothing IPv6 ends up exposed.
    let v6_before = expose::any_v6(&exposed);
    let undo_v6 = || {
        if !v6_before {
            if let Err(e) = netlink::set_bridge_ipv6(bridge, false) {
                log::warn!("{e}");
            }
        }
    };
    // Undoes what this expose did so far, saying what could not be undone.
    let undo = |added: &[(IpAddr, u8)], table: bool| {
        let mut rollback = Rollback::default();
        for (ip, prefix) in added {
            rollback.step(netlink::del_link_address(bridge, *ip, *prefix), || format!("{ip}/{prefix} stays on {bridge}"));
        }
        undo_v6();
        release_new(mesh, EXPOSE_KEY, &held_before);
        rollback.step(mesh.state.save_exposed(&exposed).map_err(|e| format!("{e:#}")), || {
            format!(
                "the record of exposed addresses could not be put back, so the next launch exposes {} (meshnet hide it then)",
                allocated.iter().map(|(ip, prefix)| format!("{ip}/{prefix}")).collect::<Vec<_>>().join(" ")
            )
        });
        if table {
            rollback.step(expose::apply_table(bridge, ranges, &exposed).map_err(|e| format!("{e:#}")), || {
                "meshnet's nftables table could not be put back".to_string()
            });
        }
        rollback
    };
    for (ip, prefix) in &allocated {
        let on = if ip.is_ipv6() { netlink::set_bridge_ipv6(bridge, true) } else { Ok(()) };
        if let Err(e) = on.and_then(|_| netlink::add_link_address(bridge, *ip, *prefix).map(|_| ())) {
            return Err(undo(&added, false).error(anyhow::Error::from(e).context("expose")));
        }
        added.push((*ip, *prefix));
    }
    let applied = {
        expose::enable_forwarding_for(&next);
        expose::apply_table(bridge, ranges, &next)
    };
    if let Err(e) = applied {
        return Err(undo(&added, true).error(e.context("expose")));
    }
    *ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()) = next;
    for (ip, prefix) in &added {
        log::info!("exposed {ip}/{prefix} on {bridge}");
    }
    Ok(json!({ "addresses": answer.into_iter().flatten().collect::<Vec<_>>() }))
}

/// `meshnet hide`: removes the exposed addresses `cidrs` name (all when none)
/// and the names `expose -h` gave them, releases them to IPAM, and rewrites
/// (or deletes) the nftables table.
/// `by_user`: asked by `meshnet hide` (which may not hide a Docker network's
/// gateway), not by the Docker plugin releasing one.
fn hide_addrs(ctx: &ApiCtx, cidrs: &[String], by_user: bool) -> Result<serde_json::Value> {
    let mesh = &ctx.mesh;
    let bridge = &mesh.settings.bridge;
    let (range, default_subnet) = mesh.with_ipam(|h| (h.ipam.universe(), h.default_subnet));
    let ranges = expose::Ranges { v4: range, v6: mesh.with_ipam_for(true, |h| h.ipam.universe()) };
    let _one_at_a_time = ctx.expose_op.lock().unwrap_or_else(|p| p.into_inner());
    let exposed = ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut chosen: Vec<usize> = Vec::new();
    if cidrs.is_empty() {
        chosen = (0..exposed.len()).collect();
    }
    for c in cidrs {
        let spec = ipamd::parse_addr(c)?;
        let matching: Vec<usize> = exposed
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                let Ok((ip, _)) = expose::parse(e) else { return false };
                match &spec {
                    AddrSpec::Any(None) => default_subnet.contains(ip),
                    AddrSpec::Any(Some(n)) => n.contains(ip),
                    AddrSpec::Exact { ip: want, .. } => *want == ip,
                }
            })
            .map(|(i, _)| i)
            .collect();
        if matching.is_empty() {
            let now: Vec<&str> = exposed.iter().map(|e| e.addr.as_str()).collect();
            bail!(
                "{c} is not exposed (exposed: {})",
                if now.is_empty() { "nothing".to_string() } else { now.join(" ") }
            );
        }
        chosen.extend(matching);
    }
    chosen.sort_unstable();
    chosen.dedup();
    let next: Vec<Exposure> =
        exposed.iter().enumerate().filter(|(i, _)| !chosen.contains(i)).map(|(_, e)| e.clone()).collect();
    let gone: Vec<Exposure> = chosen.iter().map(|i| exposed[*i].clone()).collect();
    if by_user {
        let docker = crate::plugin::load(&mesh.state).unwrap_or_default();
        for e in &gone {
            if let (std::net::IpAddr::V4(ip), _) = expose::parse(e)? {
                if let Some(why) = crate::plugin::gateway_of(&docker, ip) {
                    bail!("{} is {why}", e.addr);
                }
            }
        }
    }
    // Puts back what this hide took off the bridge, saying what it could not.
    let put_back = |removed: &[(IpAddr, u8)]| {
        let mut rollback = Rollback::default();
        for (ip, prefix) in removed {
            rollback.step(netlink::add_link_address(bridge, *ip, *prefix), || {
                format!("{ip}/{prefix} is still exposed but off {bridge} (the next launch puts it back)")
            });
        }
        rollback
    };
    // The names given with `expose -h` go first: a crash before the record
    // changes leaves the address exposed without its name (`hide` again
    // completes it); the other way round left a name pointing at an address
    // back in the pool. Put back if the hide fails.
    let mut ips = Vec::new();
    for e in &gone {
        ips.push(expose::parse(e)?.0);
    }
    let unnamed = if !ips.is_empty() && mesh.dns.table().own_target(EXPOSE_DNS_TARGET) {
        unregister_returning(mesh, EXPOSE_DNS_TARGET, &ips)
    } else {
        Vec::new()
    };
    // Off the bridge before the record goes: a crash in between must not leave
    // an address there that no record holds (the next launch would free it in
    // IPAM while the bridge still has it). Put back if the record cannot be written.
    let mut removed = Vec::new();
    for e in &gone {
        let (ip, subnet) = expose::parse(e)?;
        if let Err(err) = netlink::del_link_address(bridge, ip, subnet.prefix()) {
            register_again(mesh, EXPOSE_DNS_TARGET, &unnamed);
            return Err(put_back(&removed).error(anyhow::Error::from(err).context("hide")));
        }
        removed.push((ip, subnet.prefix()));
    }
    if let Err(err) = mesh.state.save_exposed(&next) {
        register_again(mesh, EXPOSE_DNS_TARGET, &unnamed);
        return Err(put_back(&removed).error(err.context("hide")));
    }
    for e in &gone {
        let (ip, _) = expose::parse(e)?;
        // The ring of its family (none: exposed under an IPv6 range no longer given).
        mesh.with_ipam_for(ip.is_ipv6(), |h| {
            h.deferred.retain(|(k, d, _)| !(k == EXPOSE_KEY && *d == ip));
            h.ipam.free(EXPOSE_KEY, ip);
        });
        log::info!("hid {} from {bridge}", e.addr);
    }
    if !expose::any_v6(&next) {
        netlink::set_bridge_ipv6(bridge, false).context("hide")?;
    }
    expose::apply_table(bridge, ranges, &next).context("hide")?;
    *ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()) = next;
    Ok(json!({ "hidden": gone.iter().map(|e| e.addr.clone()).collect::<Vec<_>>() }))
}

/// What the engine's event stream says, applied to the attached containers.
fn engine_event(ctx: &ApiCtx, ev: crate::docker::EngineEvent) {
    use crate::docker::EngineEvent;
    match ev {
        EngineEvent::Connected => resync_containers(ctx),
        EngineEvent::Started(c) => container_started(ctx, &c),
        EngineEvent::Died(c) => {
            if let Some(a) = attached_container(ctx, &c) {
                log::info!(
                    "container {} ({}) stopped: keeping its attachment ({}) until it is removed or detached",
                    c.name,
                    c.short(),
                    a.addrs.join(" ")
                );
                // Its name stops resolving while it is stopped; `start` registers it again.
                unregister_logged(&ctx.mesh, &a.target, &[]);
            }
        }
        EngineEvent::Destroyed(c) => container_gone(ctx, c),
    }
}

fn attached_container(ctx: &ApiCtx, c: &crate::docker::ContainerId) -> Option<Attachment> {
    ctx.attachments.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|a| attach::is_container(a, c)).cloned()
}

/// A container attached by name (re)started: attach it again, with the same
/// addresses and interface, the way `meshnet attach` does. Nothing to do when
/// its attachment is still in place (an event seen twice).
fn container_started(ctx: &ApiCtx, c: &crate::docker::ContainerId) {
    let Some(a) = attached_container(ctx, c) else { return };
    if attach::still_there(&a).is_some() {
        return;
    }
    log::info!("container {} ({}) started: attaching it again ({})", c.name, c.short(), a.addrs.join(" "));
    let req = Request::Attach {
        target: c.id.clone(),
        cidrs: a.addrs.clone(),
        ifname: a.ifname.clone(),
        no_multicast_route: a.no_multicast_route,
        without_dns: a.without_dns,
        rewrite_hosts: a.rewrite_hosts.is_some(),
        add_hosts: a.rewrite_hosts.clone().unwrap_or_default(),
        hairpin: false,
    };
    if let Err(e) = handle(ctx, req) {
        log::warn!("attaching container {} ({}) again: {e:#}", c.name, c.short());
    }
}

/// After (re)connecting to the engine: containers that were removed while we
/// did not watch are released, those restarted meanwhile attached again.
fn resync_containers(ctx: &ApiCtx) {
    let stale: Vec<Attachment> = ctx
        .attachments
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|a| a.container_id.is_some() && attach::still_there(a).is_none())
        .cloned()
        .collect();
    for a in stale {
        let id = a.container_id.clone().expect("filtered");
        let c = crate::docker::ContainerId { id: id.clone(), name: a.target.clone() };
        match crate::docker::inspect_blocking(&id) {
            Ok(found) if found.pid.is_some() => container_started(ctx, &c),
            // It stopped while we did not watch: its name stops resolving, as on `Died`.
            Ok(_) => {
                unregister_logged(&ctx.mesh, &a.target, &[]);
            }
            Err(crate::docker::DockerError::NoSuchContainer(_)) => container_gone(ctx, c),
            Err(e) => log::debug!("resync of container {}: {e}", a.target),
        }
    }
}

/// A Docker container was removed: if it is attached, detach it the way
/// `meshnet detach` does (so whatever that releases is released).
fn container_gone(ctx: &ApiCtx, c: crate::docker::ContainerId) {
    let attached = ctx
        .attachments
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|a| attach::is_container(a, &c));
    if !attached {
        return;
    }
    log::info!("container {} ({}) is gone: detaching it", c.name, c.short());
    if let Err(e) = handle(ctx, Request::Detach { target: c.id.clone(), cidrs: vec![] }) {
        log::warn!("detaching container {} ({}): {e:#}", c.name, c.short());
    }
}

/// Serves Docker's plugin API if asked to and a Docker Engine is present (or
/// `--docker-plugin-dir` is given). `Ok(None)`: not served (said in the log).
#[allow(clippy::type_complexity)]
fn start_docker_plugin(
    opts: &DockerPlugin,
    ctx: &Arc<ApiCtx>,
    state: crate::plugin::PluginState,
) -> Result<Option<(crate::plugin::Socket, Arc<crate::plugin::Plugin>, tokio::net::UnixListener)>> {
    if !opts.enabled {
        return Ok(None);
    }
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => {
            let engine = std::path::Path::new(&crate::docker::socket_path()).exists()
                || std::path::Path::new(crate::plugin::DEFAULT_DIR).exists();
            if !engine {
                log::info!("no Docker Engine here: not serving the Docker plugin");
                return Ok(None);
            }
            std::path::PathBuf::from(crate::plugin::DEFAULT_DIR)
        }
    };
    let Some(mut socket) = crate::plugin::Socket::bind(&dir, &opts.name)? else {
        log::warn!(
            "{}/{}.sock is served by another router: not serving the Docker plugin (give this one --docker-plugin-name)",
            dir.display(),
            opts.name
        );
        return Ok(None);
    };
    let host: Arc<dyn crate::plugin::PluginHost> = Arc::new(PluginRouter { ctx: ctx.clone() });
    let plugin = Arc::new(crate::plugin::Plugin::new(host, state, Some(ctx.mesh.state.docker_plugin())).named(&opts.name));
    let listener = tokio::net::UnixListener::from_std(socket.take_listener().expect("just bound"))?;
    log::info!("Docker plugin {:?} (network and IPAM driver) on {}", opts.name, socket.path.display());
    // Containers and networks removed while this router was down: Docker does
    // not call again. (Taken before the plugin serves.)
    let at_start = plugin.state();
    let (p, name) = (plugin.clone(), opts.name.clone());
    std::thread::spawn(move || {
        let forget_stale = || {
            p.forget_stale(
                &at_start,
                |net| crate::docker::endpoints_of_network_blocking(net).map_err(|e| e.to_string()),
                || crate::docker::subnets_of_ipam_driver_blocking(&name).map_err(|e| e.to_string()),
            )
        };
        if !at_start.networks.is_empty() || !at_start.pools.is_empty() {
            forget_stale();
        }
        // Veth pairs of endpoints forgotten before their pair was deleted.
        p.delete_stray_ports(|| crate::docker::endpoints_of_driver_blocking(&name).map_err(|e| e.to_string()));
        // Once the calls Docker retries have come or been given up: endpoints
        // named in calls cut short that Docker never completed, and addresses
        // Docker got (or asked for) but made no endpoint with.
        if !at_start.endpoints.is_empty() || at_start.pools.values().any(|p| !p.addresses.is_empty()) {
            std::thread::sleep(crate::plugin::DOCKER_RETRY);
            forget_stale();
            p.forget_orphans(&at_start);
        }
    });
    Ok(Some((socket, plugin, listener)))
}

/// The router as the Docker plugin sees it: IPAM, the host's exposed
/// addresses, and veth pairs on the bridge.
struct PluginRouter {
    ctx: Arc<ApiCtx>,
}

impl crate::plugin::PluginHost for PluginRouter {
    fn range(&self) -> Cidr {
        self.ctx.mesh.with_ipam(|h| h.ipam.universe())
    }

    fn default_subnet(&self) -> Cidr {
        self.ctx.mesh.with_ipam(|h| h.default_subnet)
    }

    fn allocate(&self, key: &str, subnet: Cidr, exact: Option<std::net::Ipv4Addr>) -> Result<std::net::Ipv4Addr> {
        let mesh = &self.ctx.mesh;
        let spec = match exact {
            Some(ip) => AddrSpec::Exact { ip: IpAddr::V4(ip), prefix: subnet.prefix(), strict: true },
            None => AddrSpec::Any(Some(subnet)),
        };
        if let AddrSpec::Exact { ip, .. } = &spec {
            let attachments = self.ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(holder) = attachments.iter().find(|a| a.addrs.iter().any(|x| attach::same_ip(x, ip))) {
                bail!("address {ip} is attached to {}", holder.target);
            }
        }
        let requests = mesh.with_ipam(|h| ipamd::request_for(&spec, h, None).map(|r| vec![r]))?;
        let held_before = held(mesh, key);
        match allocate_all(mesh, key, std::slice::from_ref(&spec), requests) {
            Ok(addrs) => match addrs.first() {
                Some((IpAddr::V4(ip), _)) => Ok(*ip),
                _ => bail!("IPAM gave no IPv4 address"),
            },
            Err(e) => {
                release_new(mesh, key, &held_before);
                Err(e)
            }
        }
    }

    fn free(&self, key: &str, ip: std::net::Ipv4Addr) {
        if !self.ctx.mesh.with_ipam(|h| h.ipam.free(key, ip)) {
            log::warn!("docker plugin: {ip} was not allocated to {key}");
        }
    }

    fn gateway(&self, subnet: Cidr, exact: Option<std::net::Ipv4Addr>) -> Result<(std::net::Ipv4Addr, bool)> {
        let spec = match exact {
            Some(ip) => format!("ip:{ip}/{}", subnet.prefix()),
            None => format!("net:{subnet}"),
        };
        let before: Vec<String> =
            self.ctx.exposed.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|e| e.addr.clone()).collect();
        let v = expose_addrs(&self.ctx, &[spec], None)?;
        let addr = v["addresses"][0].as_str().context("expose gave no address")?.to_string();
        let ip = addr.split('/').next().and_then(|s| s.parse().ok()).context("expose gave a bad address")?;
        Ok((ip, !before.contains(&addr)))
    }

    fn release_gateway(&self, ip: std::net::Ipv4Addr, prefix: u8) -> Result<()> {
        hide_addrs(&self.ctx, &[format!("{ip}/{prefix}")], false).map(|_| ())
    }

    fn create_port(&self, host_if: &str, container_if: &str) -> Result<()> {
        let s = &self.ctx.mesh.settings;
        let bridge = netlink::link_index(&s.bridge)?.with_context(|| format!("no bridge {}", s.bridge))?;
        netlink::create_veth_for_runtime(container_if, host_if, bridge, s.mtu)?;
        if self.ctx.datapath == Datapath::Pcap {
            // Plain frames from the container, as `attach` does (the offloads
            // stay off when Docker moves the interface into the container).
            let here = meshnet_router::netns::Netns::of_pid(std::process::id())?;
            plain_frames_if_capturing(self.ctx.datapath, &here, container_if);
        }
        Ok(())
    }

    fn delete_port(&self, host_if: &str) {
        if let Err(e) = netlink::delete_link(host_if) {
            log::warn!("docker plugin: deleting {host_if}: {e}");
        }
    }

    fn ports(&self) -> Result<Vec<String>> {
        Ok(netlink::veth_ports_of(&self.ctx.mesh.settings.bridge)?)
    }

    /// The one place a container joins a meshnet network through the plugin
    /// (register its name here, e.g. in meshnet DNS). `Join` names only the
    /// endpoint; the container (its name) is known to the engine once the join
    /// completed: `docker::container_of_endpoint_blocking(&ep.network, ep_id)`
    /// a moment later (off this call: Docker waits for the answer).
    fn joined(&self, ep_id: &str, ep: &crate::plugin::Endpoint, _net: &crate::plugin::Network) {
        log::info!("docker plugin: endpoint {} joined with {} ({})", &ep_id[..12.min(ep_id.len())], ep.address, ep.host_if);
        let (network, endpoint, address) = (ep.network.clone(), ep_id.to_string(), ep.address.clone());
        let ctx = self.ctx.clone();
        std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(250));
                match crate::docker::container_of_endpoint_blocking(&network, &endpoint) {
                    Ok(Some(c)) => {
                        log::info!("docker plugin: container {} ({}) is on the overlay as {address}", c.name, c.short());
                        // Found by name in meshnet DNS: <name>.<domain>, and by
                        // its host name when that is a name of the domain
                        // (`docker run -h db.meshnet.local`), as `attach` does.
                        let ip = address.split('/').next().and_then(|a| a.parse::<IpAddr>().ok());
                        if let Some(ip) = ip {
                            let fqdn = crate::docker::inspect_blocking(&c.id).ok().and_then(|found| found.fqdn());
                            register_container(&ctx.mesh, &plugin_dns_target(&endpoint), &c.name, fqdn.as_deref(), &[ip]);
                        }
                        return;
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        log::debug!("docker plugin: which container has endpoint {endpoint}: {e}");
                        return;
                    }
                }
            }
        });
    }

    /// The one place a container leaves (undo [`Self::joined`]).
    fn left(&self, ep_id: &str, ep: &crate::plugin::Endpoint) {
        log::info!("docker plugin: endpoint {} left ({})", &ep_id[..12.min(ep_id.len())], ep.address);
        let (ctx, target) = (self.ctx.clone(), plugin_dns_target(ep_id));
        // Writes dns.json: off the async worker that answers Docker.
        std::thread::spawn(move || {
            unregister_logged(&ctx.mesh, &target, &[]);
        });
    }
}

/// A Docker container's names in meshnet DNS (attached by name, or joined
/// through the plugin), for its addresses `ips`, kept under `target`:
/// `<name>.<domain>`, and its host name `fqdn` when that is a name of the
/// domain (`docker run -h db.meshnet.local`), as `weave attach` did. A name
/// that cannot be registered is logged: the container is on the overlay anyway.
fn register_container(mesh: &Mesh, target: &str, name: &str, fqdn: Option<&str>, ips: &[IpAddr]) {
    if ips.is_empty() {
        return;
    }
    if let Err(e) = crate::dns::register(mesh, target, name, ips) {
        log::warn!("DNS: not registering container {name}: {e:#}");
    }
    if let Some(fqdn) = host_name_in_domain(mesh, fqdn) {
        if let Err(e) = crate::dns::register(mesh, target, fqdn, ips) {
            log::warn!("DNS: not registering container {name} as {fqdn}: {e:#}");
        }
    }
}

/// The DNS names of the attachment of namespace `inode` are registered: its
/// record stops saying they are to be (see [`Attachment::dns_pending`]).
fn dns_registered(ctx: &ApiCtx, inode: Option<u64>) {
    let mut a = ctx.attachments.lock().unwrap_or_else(|p| p.into_inner());
    let Some(x) = a.iter_mut().find(|x| Some(x.ns_inode) == inode && x.dns_pending) else { return };
    x.dns_pending = false;
    let target = x.target.clone();
    if let Err(e) = ctx.mesh.state.save_attachments(&a) {
        log::warn!("DNS: {e:#} (the next launch registers {target}'s names again, which changes nothing)");
    }
}

/// Before `detach` removes the DNS names of a container attached by name: its
/// record says they are to be registered ([`Attachment::dns_pending`]), so a
/// crash before the record changes gives them back at the next launch.
/// Returns the namespace inode of the record it marked, if it marked one.
fn mark_names_pending(state: &StateDir, a: &mut [Attachment], target: &str) -> Result<Option<u64>> {
    let Some(i) = attach::find_remembered(a, target) else { return Ok(None) };
    if a[i].kind != "docker" || a[i].without_dns || a[i].dns_pending {
        return Ok(None);
    }
    a[i].dns_pending = true;
    if let Err(e) = state.save_attachments(a) {
        a[i].dns_pending = false;
        return Err(e.context(format!("detach {target}")));
    }
    Ok(Some(a[i].ns_inode))
}

/// Takes back what [`mark_names_pending`] marked, on the record of namespace
/// `inode` if one is left (a detach of some of its addresses, or one that failed).
fn unmark_names_pending(state: &StateDir, a: &mut [Attachment], inode: Option<u64>) {
    let Some(x) = a.iter_mut().find(|x| inode.is_some_and(|i| x.ns_inode == i) && x.dns_pending) else { return };
    x.dns_pending = false;
    let target = x.target.clone();
    if let Err(e) = state.save_attachments(a) {
        log::warn!("DNS: {e:#} (the next launch registers {target}'s names again)");
    }
}

/// At launch: registers the DNS names of the containers attached by name whose
/// `attach` was cut short (a crash) after the record and before the names, or
/// whose `detach` was after the names and before the record. One not running
/// is left to its start, which attaches (and names) it again.
fn register_pending_dns(mesh: &Mesh, attachments: &mut [Attachment]) {
    let mut changed = false;
    for a in attachments.iter_mut().filter(|a| a.dns_pending) {
        if attach::still_there(a).is_none() {
            continue;
        }
        // Its host name, when it is one of the domain (the engine asked by ID).
        let fqdn = a.container_id.as_deref().and_then(|id| attach::resolve(id).ok()).and_then(|t| t.fqdn);
        let ips: Vec<IpAddr> = a.addrs.iter().filter_map(|c| parse_cidr(c).ok().map(|(ip, _)| ip)).collect();
        log::info!("DNS: registering the names of {}, whose attach or detach a crash cut short", a.target);
        register_container(mesh, &a.target, &a.target, fqdn.as_deref(), &ips);
        a.dns_pending = false;
        changed = true;
    }
    if changed {
        if let Err(e) = mesh.state.save_attachments(attachments) {
            log::warn!("DNS: {e:#} (the next launch registers those names again, which changes nothing)");
        }
    }
}

/// A container's host name (`Config.Hostname` with its domain), when it is a
/// name of meshnet's DNS domain.
fn host_name_in_domain<'a>(mesh: &Mesh, fqdn: Option<&'a str>) -> Option<&'a str> {
    fqdn.filter(|f| meshnet_proto::dns::normalize_name(f, &mesh.dns.config.domain).is_ok())
}

/// Removes this router's records of `target` (those of `ips`; all when
/// empty), as a target goes or stops; a failure is logged.
fn unregister_logged(mesh: &Mesh, target: &str, ips: &[IpAddr]) {
    if let Err(e) = crate::dns::unregister(mesh, target, None, ips) {
        log::warn!("DNS: removing the records of {target}: {e:#}");
    }
}

/// Removes this router's records of `target` (those of `ips`; all when
/// empty) and returns them, to be put back should what they go with fail; a
/// failure is logged.
fn unregister_returning(mesh: &Mesh, target: &str, ips: &[IpAddr]) -> Vec<(String, IpAddr)> {
    crate::dns::unregister(mesh, target, None, ips).unwrap_or_else(|e| {
        log::warn!("DNS: removing the records of {target}: {e:#}");
        Vec::new()
    })
}

/// Puts back records [`unregister_returning`] removed.
fn register_again(mesh: &Mesh, target: &str, records: &[(String, IpAddr)]) {
    for (name, ip) in records {
        if let Err(e) = crate::dns::register(mesh, target, name, &[*ip]) {
            log::warn!("DNS: putting back {name} -> {ip} of {target}: {e:#}");
        }
    }
}

/// The target a plugin endpoint's DNS records are kept under (its container's
/// name is only known after `Join`; the endpoint id is known at `Leave`).
fn plugin_dns_target(ep_id: &str) -> String {
    format!("docker-plugin:{}", &ep_id[..12.min(ep_id.len())])
}

/// Releases what `forgotten` attachments (of namespaces that are gone) held:
/// their addresses (IPAM) and this router's DNS records for them, but not what
/// the target being attached (IPAM key `key`, name `target`) takes over.
fn release_forgotten(mesh: &Mesh, forgotten: &[Attachment], key: &str, target: &str) {
    for f in forgotten {
        let fkey = attachment_key(f);
        if fkey != key {
            mesh.with_ipams(|h4, h6| {
                for h in std::iter::once(h4).chain(h6) {
                    h.deferred.retain(|(k, _, _)| k != &fkey);
                    for ip in h.ipam.free_target(&fkey) {
                        log::info!("IPAM: released {ip} of {}, which is gone", f.target);
                    }
                }
            });
        }
        if f.target != target {
            unregister_logged(mesh, &f.target, &[]);
        }
    }
}

/// At launch: frees the addresses a target still attached (or the host's
/// exposed set) holds in IPAM that its record does not list. An `attach` adding
/// an address to an attached target, an `expose` while others are exposed, or a
/// `detach`/`hide` of some addresses, cut short by a crash between IPAM and the
/// record, left one there, owned by nobody and never handed out again until the
/// whole target was detached. The records say what is in use: they are written
/// before an address reaches a target and after it left it.
fn release_unrecorded(h: &mut ipamd::IpamHost, attachments: &[Attachment], exposed: &[Exposure]) {
    let mut recorded: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for a in attachments {
        let ips = a.addrs.iter().filter_map(|s| parse_cidr(s).ok().map(|(ip, _)| ip));
        recorded.entry(attachment_key(a)).or_default().extend(ips);
    }
    if !exposed.is_empty() {
        let ips = exposed.iter().filter_map(|e| expose::parse(e).ok().map(|(ip, _)| ip));
        recorded.entry(EXPOSE_KEY.to_string()).or_default().extend(ips);
    }
    for (key, ips) in &recorded {
        for ip in h.ipam.addresses_of(key) {
            if !ips.contains(&ip) && h.ipam.free(key, ip) {
                log::info!("IPAM: released {ip} of {key}, which its record does not hold (an operation cut short)");
            }
        }
    }
}

/// The IPAM key of a remembered attachment (the same one `attach` used).
fn attachment_key(a: &Attachment) -> String {
    ipamd::key(&a.kind, &a.target, a.container_id.as_deref())
}

/// Gets an address for every spec, waiting (bounded) for consensus or donations.
fn allocate_all(
    mesh: &Mesh,
    key: &str,
    specs: &[AddrSpec],
    requests: Vec<Option<meshnet_proto::ipam::Request>>,
) -> Result<Vec<(IpAddr, u8)>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(ipamd::ALLOCATE_TIMEOUT_SECS);
    let mut addrs = Vec::new();
    for (spec, req) in specs.iter().zip(requests) {
        let Some(req) = req else {
            if let AddrSpec::Exact { ip, prefix, .. } = spec {
                addrs.push((*ip, *prefix));
            }
            continue;
        };
        // A bare CIDR before any ring exists: use it now, claim it once a ring is
        // agreed (asking now would start consensus before we have met the mesh).
        let v6 = match &req {
            meshnet_proto::ipam::Request::Any(c) => c.is_v6(),
            meshnet_proto::ipam::Request::Exact { ip, .. } => ip.is_ipv6(),
        };
        let no_ring = || anyhow::anyhow!("no IPv6 --ipalloc-range was given at launch");
        if let (AddrSpec::Exact { ip, prefix, strict: false }, meshnet_proto::ipam::Request::Exact { ip: want, .. }) = (spec, &req) {
            let deferred = mesh
                .with_ipam_for(v6, |h| {
                    let defer = !h.ipam.is_agreed();
                    if defer && !h.deferred.iter().any(|(k, a, _)| k == key && a == want) {
                        // Noted first: an address IPAM would not note could be
                        // handed out to another target before the claim.
                        let now = h.now_ms();
                        h.ipam.note_in_use(key, *want, *prefix, now)?;
                        h.deferred.push((key.to_string(), *want, *prefix));
                    }
                    Ok(defer)
                })
                .ok_or_else(no_ring)?
                .map_err(|e: meshnet_proto::ipam::IpamError| anyhow::anyhow!("{e}"))?;
            if deferred {
                log::info!("IPAM: {ip}/{prefix} for {key} will be claimed once the ring is agreed");
                addrs.push((*ip, *prefix));
                continue;
            }
        }
        loop {
            let answer = mesh
                .with_ipam_for(v6, |h| {
                    let now = h.now_ms();
                    h.ipam.allocate(key, req.clone(), now)
                })
                .ok_or_else(no_ring)?;
            match answer.map_err(|e| anyhow::anyhow!("{e}"))? {
                meshnet_proto::ipam::Allocation::Ready { ip, prefix } => {
                    // An address is only handed out once the state that records it is
                    // on disk (the flush after the call above tried to save it).
                    if let Some(e) = mesh.with_ipam_for(v6, |h| h.unsaved_error()).flatten() {
                        bail!("{ip}/{prefix} was not allocated: {e}");
                    }
                    addrs.push((ip, prefix));
                    break;
                }
                meshnet_proto::ipam::Allocation::Pending(why) => {
                    // A bare CIDR is the user's explicit choice: when nobody can answer
                    // the claim yet (no ring agreed, or its owner unreachable), use it now
                    // and let the claim complete later, as Weave does, so an isolated
                    // peer can still attach. A reachable owner is waited for: it may
                    // say the address is taken.
                    let nobody_to_ask = matches!(
                        why,
                        Waiting::Consensus { .. } | Waiting::Ring | Waiting::Owner { reachable: false, .. }
                    );
                    if let (AddrSpec::Exact { ip, prefix, strict: false }, true) = (spec, nobody_to_ask) {
                        // Noted as in use: should the claim fail, that is a conflict
                        // shown in `status ipam` and retried, not a line in the log.
                        mesh.with_ipam_for(v6, |h| {
                            let now = h.now_ms();
                            h.ipam.note_in_use(key, *ip, *prefix, now)
                        })
                        .ok_or_else(no_ring)?
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                        log::info!("IPAM: claim of {ip}/{prefix} for {key} continues in the background: {why}");
                        addrs.push((*ip, *prefix));
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        bail!("no address after {}s: {why}", ipamd::ALLOCATE_TIMEOUT_SECS);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    Ok(addrs)
}

/// The addresses `key` holds in both rings.
fn held(mesh: &Mesh, key: &str) -> Vec<IpAddr> {
    mesh.with_ipams(|h4, h6| {
        let mut v = h4.ipam.addresses_of(key);
        if let Some(h6) = h6 {
            v.extend(h6.ipam.addresses_of(key));
        }
        v
    })
}

/// `status ipam`: the IPv4 ring's view, with the IPv6 ring's under `ipv6`
/// when there is one.
fn ipam_status_json(mesh: &Mesh) -> serde_json::Value {
    mesh.with_ipams(|h4, h6| {
        let mut v = h4.status_json();
        if let Some(h6) = h6 {
            v["ipv6"] = h6.status_json();
        }
        v
    })
}

/// The undo of a change that failed half-way. A step that fails too is
/// logged and said with the change's own error, so the user learns what was
/// left behind (an address still on the bridge, a record the next launch acts
/// on) rather than only that the change failed.
#[derive(Debug, Default)]
struct Rollback {
    left_behind: Vec<String>,
}

impl Rollback {
    /// One undo step's outcome; `left` says what its failure leaves behind.
    fn step<T, E: std::fmt::Display>(&mut self, result: Result<T, E>, left: impl FnOnce() -> String) {
        if let Err(e) = result {
            let what = format!("{} ({e})", left());
            log::error!("undoing a failed change: {what}");
            self.left_behind.push(what);
        }
    }

    /// The change's error, with what its undo could not undo.
    fn error(self, e: anyhow::Error) -> anyhow::Error {
        if self.left_behind.is_empty() {
            return e;
        }
        anyhow::anyhow!("{e:#}; undoing it failed too: {}", self.left_behind.join("; "))
    }
}

/// Undoes the allocations of a failed attach: frees what `key` did not hold before.
fn release_new(mesh: &Mesh, key: &str, held_before: &[IpAddr]) {
    mesh.with_ipams(|h4, h6| {
        for h in std::iter::once(h4).chain(h6) {
            let universe = h.ipam.universe();
            if !held_before.iter().any(|ip| universe.contains(*ip)) {
                // Held nothing of this ring before: free all, and cancel what waits.
                h.ipam.free_target(key);
                continue;
            }
            for ip in h.ipam.addresses_of(key) {
                if !held_before.contains(&ip) {
                    h.ipam.free(key, ip);
                }
            }
        }
    });
}

/// A peer named by its name or its nickname.
fn resolve_peer_name(mesh: &Mesh, peer: &str) -> Result<PeerName> {
    if let Ok(p) = peer.parse::<PeerName>() {
        return Ok(p);
    }
    let matches = mesh.peers_by_nickname(peer);
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => bail!("unknown peer {peer:?}: give its name (like 02:ab:cd:ef:01:23) or the nickname of a known peer"),
        _ => bail!("nickname {peer:?} is ambiguous: give the peer name"),
    }
}

fn parse_peers(peers: &[String], port: u16) -> Result<Vec<PeerAddr>> {
    if peers.is_empty() {
        bail!("no peer given");
    }
    peers
        .iter()
        .map(|p| PeerAddr::parse(p, port).map_err(anyhow::Error::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An undo that fails too is said with the change's error (expose and hide
    /// put records and addresses back with it; its failures were thrown away,
    /// so the user learned that the change failed but not what it left).
    #[test]
    fn a_failed_undo_is_said_with_the_error() {
        let clean = Rollback::default();
        assert_eq!(format!("{:#}", clean.error(anyhow::anyhow!("disk full").context("expose"))), "expose: disk full");
        let mut rollback = Rollback::default();
        rollback.step(Ok::<(), String>(()), || unreachable!("a step that worked leaves nothing"));
        rollback.step(Err::<(), _>("Read-only file system"), || "the record still lists 10.32.0.3/12".to_string());
        rollback.step(Err::<(), _>("No such device"), || "10.32.0.4/12 stays on meshnet".to_string());
        let e = format!("{:#}", rollback.error(anyhow::anyhow!("no such device").context("expose")));
        assert_eq!(
            e,
            "expose: no such device; undoing it failed too: the record still lists 10.32.0.3/12 (Read-only file system); \
             10.32.0.4/12 stays on meshnet (No such device)"
        );
    }

    #[test]
    fn the_first_connection_is_awaited_without_end() {
        // Ten times a second for five minutes, then every two seconds: never a
        // point after which the announcement is given up.
        assert_eq!(connection_poll(Duration::ZERO), Duration::from_millis(100));
        assert_eq!(connection_poll(Duration::from_secs(299)), Duration::from_millis(100));
        for h in [1, 24, 24 * 365] {
            assert_eq!(connection_poll(Duration::from_secs(3600 * h)), Duration::from_secs(2));
        }
    }

    #[test]
    fn dns_addresses_take_a_valid_prefix_or_none() {
        let ok = |v: &[&str]| parse_dns_addrs(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            ok(&["10.32.1.5", "ip:10.32.1.6", "10.32.1.7/12", "fd32::5/64", "ip:fd32::6/128"]).unwrap(),
            ["10.32.1.5", "10.32.1.6", "10.32.1.7", "fd32::5", "fd32::6"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        for bad in ["10.32.1.5/banana", "10.32.1.5/33", "10.32.1.5/", "ip:10.32.1.5/12/3", "fd32::5/129", "fd32::5/-1", "1.2.3"] {
            let err = ok(&["10.32.1.1", bad]).expect_err(bad).to_string();
            assert!(err.starts_with(bad), "{bad}: {err}");
        }
    }
}
