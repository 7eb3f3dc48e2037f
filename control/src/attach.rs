//! Attaching targets (network namespaces, PIDs, Docker containers, namespace
//! paths) to the router's bridge, and remembering them in the state directory.
//!
//! A TARGET is resolved in this order:
//! 1. `/...`: a namespace file given by path (`/var/run/netns/cni-1234`,
//!    `/proc/123/ns/net`), as a CNI runtime passes it;
//! 2. an `ip netns` name (`/run/netns/NAME`);
//! 3. a PID (its network namespace);
//! 4. a Docker container name or ID, through the Docker Engine API
//!    ([`crate::docker`]): its main process's namespace.

use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use meshnet_router::netlink::{self, AttachSpec, Attached};
use meshnet_router::netns::Netns;

use crate::docker::{self, ContainerId, DockerError};
use crate::state::{Attachment, StateDir};

/// Default interface name inside every attached target.
pub const CONTAINER_IF: &str = "ethwe";

/// `statfs` magic of nsfs, the file system of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `ioctl(fd, NS_GET_NSTYPE)`: which kind of namespace a namespace file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Parses `ip/prefix` (IPv4 or IPv6).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = s
        .split_once('/')
        .with_context(|| format!("invalid address {s:?}: expected ip/prefix like 10.40.0.1/16"))?;
    let ip: IpAddr = ip.parse().with_context(|| format!("invalid address {s:?}: {ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .with_context(|| format!("invalid address {s:?}: prefix must be 0 to {max}"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        bail!("invalid address {s:?}: not a unicast host address");
    }
    Ok((ip, prefix))
}

/// An address a user gives (not one remembered from an earlier release, which
/// [`parse_cidr`] takes as it was): refused if no interface can sensibly hold it.
/// A /0 (a route to everywhere through `ethwe`), the IPv4 broadcast address or
/// an IPv4 address that is its own subnet's network or broadcast address, and
/// an IPv6 link-local one (the kernel gives each interface its own, and
/// `ps`/`detach` do not show them).
pub fn check_new_address(s: &str, ip: IpAddr, prefix: u8) -> Result<()> {
    if prefix == 0 {
        bail!("invalid address {s:?}: prefix must be 1 to {}", if ip.is_ipv4() { 32 } else { 128 });
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => bail!("invalid address {s:?}: the broadcast address 255.255.255.255"),
        IpAddr::V4(v4) if prefix <= 30 => {
            let host = u32::MAX >> prefix;
            let net = std::net::Ipv4Addr::from(u32::from(v4) & !host);
            if u32::from(v4) & host == 0 {
                bail!("invalid address {s:?}: {v4} is the network address of {net}/{prefix}");
            }
            if u32::from(v4) & host == host {
                bail!("invalid address {s:?}: {v4} is the broadcast address of {net}/{prefix}");
            }
        }
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => {
            bail!("invalid address {s:?}: a link-local address (the kernel gives the interface its own)")
        }
        _ => {}
    }
    Ok(())
}

/// Whether `pid` is a kernel thread (`PF_KTHREAD` in `/proc/PID/stat`).
pub fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok()))
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Refuses targets `attach` must never touch: the router's own network
/// namespace (the host's: `expose` gives the host an address) and a kernel
/// thread's (the machine's first namespace, never a container's).
pub fn check_attachable(target: &str, t: &Target) -> Result<()> {
    if t.kind == "pid" && target.parse::<u32>().is_ok_and(is_kernel_thread) {
        bail!("target {target:?}: process {target} is a kernel thread, not a container");
    }
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if let (Ok(own), Ok(theirs)) = (own, t.netns.inode()) {
        if own == theirs {
            bail!("target {target:?} is in the router's own network namespace (the host's); use `meshnet expose` to give the host an address on the overlay");
        }
    }
    Ok(())
}

pub fn format_cidr(a: &(IpAddr, u8)) -> String {
    format!("{}/{}", a.0, a.1)
}

/// The interface name inside an attached target.
pub fn ifname_of(a: &Attachment) -> &str {
    a.ifname.as_deref().unwrap_or(CONTAINER_IF)
}

/// A resolved target: how to enter it, what kind it is, and how to call it.
pub struct Target {
    pub netns: Netns,
    /// "path", "netns", "pid" or "docker".
    pub kind: &'static str,
    /// How it is remembered and shown: the path, netns name or PID as given, or
    /// the Docker container's name (also when it was given by ID).
    pub name: String,
    /// The container, for kind "docker".
    pub container: Option<ContainerId>,
    /// The container's host name, when it is a domain name (kind "docker").
    pub fqdn: Option<String>,
    /// The container's `/etc/hosts` (kind "docker"), for `attach --rewrite-hosts`.
    pub hosts_file: Option<crate::hosts::HostsFile>,
}

/// Resolves TARGET (see the module docs for the order).
pub fn resolve(target: &str) -> Result<Target> {
    if target.starts_with('/') {
        return resolve_path(target);
    }
    let valid_name = !target.is_empty()
        && target != "."
        && target != ".."
        && !target.contains('/')
        && !target.contains('\0');
    let mut tried = Vec::new();
    if valid_name && Path::new("/run/netns").join(target).exists() {
        let netns = Netns::named(target).with_context(|| format!("target {target}"))?;
        return Ok(Target { netns, kind: "netns", name: target.to_string(), container: None, fqdn: None, hosts_file: None });
    }
    tried.push(if valid_name {
        format!("network namespace /run/netns/{target} (none)")
    } else {
        "network namespace (not a valid name)".to_string()
    });
    match target.parse::<u32>() {
        Ok(pid) if pid > 0 && Path::new(&format!("/proc/{pid}/ns/net")).exists() => {
            let netns = Netns::of_pid(pid).with_context(|| format!("target {target}"))?;
            return Ok(Target { netns, kind: "pid", name: target.to_string(), container: None, fqdn: None, hosts_file: None });
        }
        Ok(_) => tried.push(format!("process id {target} (no such process)")),
        Err(_) => tried.push("process id (not a number)".to_string()),
    }
    if !docker::plausible_reference(target) {
        tried.push("Docker container (not a valid container name)".to_string());
    } else {
        match docker::inspect_blocking(target) {
            Ok(c) => return docker_target(target, c),
            Err(e @ DockerError::NoSuchContainer(_)) => tried.push(format!("Docker container ({e})")),
            Err(e @ DockerError::NoEngine { .. }) => tried.push(format!("Docker container ({e})")),
            Err(DockerError::Engine { socket, message }) => {
                tried.push(format!("Docker container (the engine at {socket} said: {message})"))
            }
            Err(e @ DockerError::NotRunning { .. }) => bail!("target {target:?}: {e}"),
        }
    }
    bail!("unknown target {target:?}: tried {}", tried.join(", "))
}

fn docker_target(target: &str, c: docker::Container) -> Result<Target> {
    let Some(pid) = c.pid else {
        bail!(
            "target {target:?}: {}",
            DockerError::NotRunning { name: c.id.name.clone(), short: c.id.short().into(), status: c.status }
        );
    };
    let hint = "run the router in the host's PID namespace (docker run --pid=host, hostPID: true)";
    let netns = Netns::of_pid(pid)
        .map_err(|e| anyhow::anyhow!("Docker container {} ({}) has PID {pid}, but {e}; {hint}", c.id.name, c.id.short()))?;
    // The PID is the engine's: make sure it is the same process here, not another
    // one that happens to have that number in our own PID namespace.
    if let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        if !cg.contains(&c.id.id) && !cg.trim().is_empty() && !cg.lines().all(|l| l.ends_with(":/")) {
            bail!(
                "Docker container {} ({}) has PID {pid}, but that process here is not in the container's cgroup; {hint}",
                c.id.name,
                c.id.short()
            );
        }
    }
    let name = if c.id.name.is_empty() { target.to_string() } else { c.id.name.clone() };
    let hosts_file = Some(crate::hosts::HostsFile::of(pid, &c.hostname, &c.domainname));
    let fqdn = c.fqdn();
    Ok(Target { netns, kind: "docker", name, container: Some(c.id), fqdn, hosts_file })
}

/// A namespace file given by path: it must exist and be a network namespace.
fn resolve_path(target: &str) -> Result<Target> {
    if target.contains('\0') || target.split('/').any(|c| c == "..") {
        bail!("target {target:?}: not a valid namespace path");
    }
    let path = PathBuf::from(target);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("unknown target {target:?}: no such namespace file")
        }
        Err(e) => bail!("target {target:?}: {e}"),
    };
    let cpath = CString::new(target).context("namespace path")?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct we own.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    let is_nsfs = unsafe { libc::statfs(cpath.as_ptr(), &mut sfs) } == 0 && sfs.f_type as i64 == NSFS_MAGIC;
    if !is_nsfs {
        bail!("target {target:?}: not a namespace file (expected e.g. /var/run/netns/NAME or /proc/PID/ns/net)");
    }
    // SAFETY: ioctl NS_GET_NSTYPE on an open namespace file; no memory is passed.
    let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if nstype >= 0 && nstype != libc::CLONE_NEWNET {
        bail!("target {target:?}: not a network namespace");
    }
    let netns = Netns { path, label: target.to_string() };
    Ok(Target { netns, kind: "path", name: target.to_string(), container: None, fqdn: None, hosts_file: None })
}

/// Host-side veth name for a namespace, stable across restarts.
pub fn host_if_name(ns_inode: u64) -> String {
    format!("vmn{:08x}", (ns_inode ^ (ns_inode >> 32)) as u32)
}

/// How the interface inside an attached target is made, and what else is
/// remembered with the attachment.
#[derive(Clone, Copy, Debug)]
pub struct Inside<'a> {
    /// Its name (default [`CONTAINER_IF`]).
    pub ifname: Option<&'a str>,
    /// Route `224.0.0.0/4` through it (off: `attach --no-multicast-route`).
    pub multicast_route: bool,
    /// Keep a Docker container's names out of meshnet DNS (`attach --without-dns`).
    pub without_dns: bool,
    /// `attach --rewrite-hosts`: its `--add-host` entries (HOST:IP).
    pub rewrite_hosts: Option<&'a [String]>,
}

/// Attaches `addrs` to `target` (as interface `inside.ifname`, default
/// [`CONTAINER_IF`]) and updates the remembered attachments. Puts in
/// `forgotten` the remembered attachments of gone namespaces it forgot on the
/// way, also when it fails after that: their addresses and DNS records are the
/// caller's to release.
pub fn attach(
    state: &StateDir,
    attachments: &mut Vec<Attachment>,
    bridge: &str,
    mtu: u32,
    target: &str,
    addrs: &[(IpAddr, u8)],
    inside: Inside,
    forgotten: &mut Vec<Attachment>,
) -> Result<Attached> {
    let Inside { ifname, multicast_route, without_dns, rewrite_hosts } = inside;
    let t = resolve(target)?;
    check_attachable(target, &t)?;
    let inode = t.netns.inode().with_context(|| format!("target {target}"))?;
    let ifname = ifname.filter(|s| !s.is_empty()).unwrap_or(CONTAINER_IF);
    if let Some(e) = attachments.iter().find(|x| is_attachment_of(x, &t, inode)) {
        if ifname_of(e) != ifname {
            bail!("{target} is already attached as {} (detach it first to use {ifname})", ifname_of(e));
        }
    }
    // A stopped Docker container keeps its record, and its addresses, for its
    // restart; but its namespace is gone and the kernel hands inode numbers
    // out again, lowest first, so the namespace attached here may have its
    // old one. Then that record holds no namespace (inode 0) and no host
    // interface (the name is this namespace's now); it stays, and the
    // container gets its addresses back when it starts. One whose container
    // Docker no longer has is forgotten below.
    for x in attachments.iter_mut() {
        if x.ns_inode == inode && !same_target(x, &t) && still_there(x).is_none() && container_may_exist(x) {
            log::info!(
                "container {} is not running and its old namespace's inode number ({inode}) is {}'s now: keeping its attachment ({}) for its restart",
                x.target,
                t.name,
                x.addrs.join(" ")
            );
            x.ns_inode = 0;
            x.host_if.clear();
        }
    }
    // Forget what is remembered of namespaces that are gone and stand in the way:
    // same name (a container re-created under its old name while we did not
    // watch) or an address wanted here, unless that is a stopped container,
    // which keeps its addresses until it is removed or detached.
    // Also one remembered under this namespace's inode that is neither still there
    // nor this target: another namespace, gone, whose inode the kernel reused.
    *forgotten = forget_gone(state, attachments, Some((inode, &t.name)), |x| {
        (x.ns_inode != inode
            && (same_target(x, &t)
                || (x.addrs.iter().any(|y| addrs.iter().any(|a| same_ip(y, &a.0))) && !container_exists(x))))
            || (x.ns_inode == inode && !same_target(x, &t))
    })?;
    // An address may belong to one target only.
    for a in addrs {
        let text = format_cidr(a);
        if let Some(other) = attachments
            .iter()
            .find(|x| x.ns_inode != inode && x.addrs.iter().any(|y| same_ip(y, &a.0)))
        {
            bail!("address {text} is already attached to {}", other.target);
        }
    }
    let host_if = host_if_name(inode);
    let spec = AttachSpec {
        target: t.netns.clone(),
        bridge: bridge.to_string(),
        host_if: host_if.clone(),
        container_if: ifname.to_string(),
        mtu,
        addrs: addrs.to_vec(),
        multicast_route,
    };
    // The record goes to disk before the interface exists: a crash (or a
    // record that cannot be written) must never leave an address in a target
    // that no record holds, or the next launch frees it in IPAM while the
    // target still uses it. A launch re-creates a recorded interface missing.
    let before = attachments.clone();
    let entry = match attachments.iter_mut().find(|x| x.ns_inode == inode) {
        Some(e) => e,
        None => {
            attachments.push(Attachment {
                target: t.name.clone(),
                kind: t.kind.to_string(),
                ns_path: t.netns.path.clone(),
                ns_inode: inode,
                host_if,
                addrs: Vec::new(),
                ifname: (ifname != CONTAINER_IF).then(|| ifname.to_string()),
                container_id: t.container.as_ref().map(|c| c.id.clone()),
                no_multicast_route: !multicast_route,
                without_dns,
                rewrite_hosts: rewrite_hosts.map(<[String]>::to_vec),
                dns_pending: false,
            });
            attachments.last_mut().expect("just pushed")
        }
    };
    if still_there(entry).is_none() {
        // The same target in a new namespace that got the old one's inode (a
        // container restarted): enter it through its new path from now on.
        entry.ns_path = t.netns.path.clone();
    }
    entry.no_multicast_route = !multicast_route;
    entry.without_dns = without_dns;
    entry.rewrite_hosts = rewrite_hosts.map(<[String]>::to_vec);
    // A container attached by name gets its DNS names once attached (the
    // daemon clears this then); should a crash come first, the next launch does.
    entry.dns_pending = t.kind == "docker" && !without_dns;
    for a in addrs {
        let text = format_cidr(a);
        if !entry.addrs.contains(&text) {
            entry.addrs.push(text);
        }
    }
    if let Err(e) = state.save_attachments(attachments) {
        *attachments = before;
        return Err(e);
    }
    match netlink::attach(&spec).with_context(|| format!("attach to {target}")) {
        Ok(attached) => Ok(attached),
        Err(e) => {
            *attachments = before;
            if let Err(undo) = state.save_attachments(attachments) {
                log::error!("attach to {target} failed, and its record could not be taken back: {undo:#}");
            }
            Err(e)
        }
    }
}

/// Detaches `addrs` (all when empty) from `target`. Returns whether anything changed.
///
/// A target that no longer resolves (a container that died, a deleted netns or
/// namespace file) but is remembered, by name, container ID or path, is
/// forgotten and its host interface removed. A namespace path that is neither
/// there nor remembered is nothing to do (`Ok(false)`): CNI's DEL must be
/// idempotent.
pub fn detach(
    state: &StateDir,
    attachments: &mut Vec<Attachment>,
    target: &str,
    addrs: &[(IpAddr, u8)],
) -> Result<bool> {
    let (netns, inode, ifname) = match resolve(target) {
        Ok(t) => {
            let inode = t.netns.inode().with_context(|| format!("target {target}"))?;
            // An earlier incarnation of the same target (a restarted container).
            forget_gone(state, attachments, None, |x| x.ns_inode != inode && same_target(x, &t))?;
            let ifname = attachments
                .iter()
                .find(|x| x.ns_inode == inode)
                .map(|x| ifname_of(x).to_string())
                .unwrap_or_else(|| CONTAINER_IF.to_string());
            (t.netns, inode, ifname)
        }
        Err(e) => match find_remembered_by_name(attachments, target) {
            Some(i) => match still_there(&attachments[i]) {
                // Reachable without resolving (say the Docker Engine is down).
                Some(ns) => (ns, attachments[i].ns_inode, ifname_of(&attachments[i]).to_string()),
                None => {
                    let gone = attachments.remove(i);
                    log::info!("{} is gone; forgetting its attachment ({})", gone.target, gone.addrs.join(" "));
                    netlink::clean_up_link(&gone.host_if, &format!("{} is gone", gone.target));
                    state.save_attachments(attachments)?;
                    return Ok(true);
                }
            },
            None if target.starts_with('/') && !Path::new(target).exists() => return Ok(false),
            None => return Err(e),
        },
    };
    let remembered = attachments.iter().any(|x| x.ns_inode == inode);
    if !remembered {
        // Not ours: leave an interface whose host end is not in our namespace
        // alone (another router on this machine attached it).
        let seen = netlink::inspect(&netns, &ifname).with_context(|| format!("detach from {target}"))?;
        if seen.is_some_and(|s| s.host_if.is_empty()) {
            return Ok(false);
        }
    }
    let removed = netlink::detach(&netns, &ifname, addrs).with_context(|| format!("detach from {target}"))?;
    if let Some(i) = attachments.iter().position(|x| x.ns_inode == inode) {
        let before = attachments.clone();
        if addrs.is_empty() {
            attachments.remove(i);
        } else {
            attachments[i].addrs.retain(|y| !addrs.iter().any(|a| same_ip(y, &a.0)));
            if attachments[i].addrs.is_empty() {
                attachments.remove(i);
            }
        }
        if let Err(e) = state.save_attachments(attachments) {
            // What is remembered stays what is on disk (and what IPAM holds):
            // `ps` keeps listing the target, and `detach` again completes it.
            *attachments = before;
            return Err(e.context(format!(
                "detach from {target}: its interface is removed, but the record could not be updated                  (a restart would attach it again): run detach again once the state can be saved"
            )));
        }
    }
    Ok(removed)
}

/// Forgets the remembered attachments whose namespace is gone (deleted, its
/// process exited) and returns them, leaving Docker containers attached by name
/// alone: a stopped container keeps its addresses for when it starts again, and
/// the engine's events forget a removed one. On an error nothing is forgotten.
pub fn forget_gone_namespaces(state: &StateDir, attachments: &mut Vec<Attachment>) -> Result<Vec<Attachment>> {
    let before = attachments.clone();
    forget_gone(state, attachments, None, |x| x.container_id.is_none()).inspect_err(|_| *attachments = before)
}

/// Forgets the remembered attachments that `which` picks and whose namespace is
/// gone, removing their host interfaces, and returns them. `attaching`: the
/// inode and name of the namespace being attached, to say so when a forgotten
/// one had that inode.
fn forget_gone(
    state: &StateDir,
    attachments: &mut Vec<Attachment>,
    attaching: Option<(u64, &str)>,
    which: impl Fn(&Attachment) -> bool,
) -> Result<Vec<Attachment>> {
    let (gone, kept): (Vec<Attachment>, Vec<Attachment>) =
        std::mem::take(attachments).into_iter().partition(|x| which(x) && still_there(x).is_none());
    *attachments = kept;
    for x in &gone {
        log::info!("forgetting {} ({}): {}", x.target, x.addrs.join(" "), forget_reason(x, attaching));
        netlink::clean_up_link(&x.host_if, &format!("{} is gone", x.target));
    }
    if !gone.is_empty() {
        state.save_attachments(attachments)?;
    }
    Ok(gone)
}

/// Whether remembered attachment `x` is of namespace `t` (whose inode is `inode`),
/// under whatever spelling: the inode, and either its path still leads there or
/// it is the same target (a restarted container whose new namespace reused the inode).
pub fn is_attachment_of(x: &Attachment, t: &Target, inode: u64) -> bool {
    x.ns_inode == inode && (still_there(x).is_some() || same_target(x, t))
}

fn same_target(x: &Attachment, t: &Target) -> bool {
    x.target == t.name
        || t.container.as_ref().is_some_and(|c| x.container_id.as_deref() == Some(c.id.as_str()))
}

/// The remembered attachment `target` means: by name, path, or Docker
/// container ID (full, or a prefix of at least 12 digits); failing that, by
/// the namespace `target` resolves to (a container attached by name and
/// detached by PID or ID, a netns attached by path and detached by name).
pub fn find_remembered(attachments: &[Attachment], target: &str) -> Option<usize> {
    find_remembered_by_name(attachments, target).or_else(|| {
        let inode = resolve(target).ok()?.netns.inode().ok()?;
        // Still there: not a record of a namespace gone whose inode number `target`'s has now.
        attachments.iter().position(|a| a.ns_inode == inode && still_there(a).is_some())
    })
}

/// The remembered attachments `ps TARGET` shows: those whose name, namespace
/// path or Docker container ID (or any prefix of its 12-digit short form, or
/// a longer form of it) `target` is; failing that, the one of the namespace
/// `target` resolves to.
pub fn ps_matches(attachments: &[Attachment], target: &str) -> Vec<usize> {
    let by_name: Vec<usize> = (0..attachments.len())
        .filter(|&i| {
            let a = &attachments[i];
            let short = a.container_id.as_deref().map(|id| &id[..id.len().min(12)]);
            a.target == target
                || (target.starts_with('/') && a.ns_path == Path::new(target))
                || short.is_some_and(|s| !target.is_empty() && (s.starts_with(target) || target.starts_with(s)))
        })
        .collect();
    if !by_name.is_empty() {
        return by_name;
    }
    find_remembered(attachments, target).into_iter().collect()
}

/// [`find_remembered`] without resolving `target`.
fn find_remembered_by_name(attachments: &[Attachment], target: &str) -> Option<usize> {
    attachments.iter().position(|a| {
        a.target == target
            || (target.starts_with('/') && a.ns_path == Path::new(target))
            || a.container_id.as_deref().is_some_and(|id| id == target || (target.len() >= 12 && id.starts_with(target)))
    })
}

/// Whether `a` is a Docker container that still exists (running or stopped).
fn container_exists(a: &Attachment) -> bool {
    a.container_id.as_deref().is_some_and(|id| docker::inspect_blocking(id).is_ok())
}

/// Whether `a` is a Docker container the engine may still have: it has it,
/// or cannot say (not running, not answering).
fn container_may_exist(a: &Attachment) -> bool {
    match a.container_id.as_deref() {
        Some(id) => !matches!(docker::inspect_blocking(id), Err(docker::DockerError::NoSuchContainer(_))),
        None => false,
    }
}

/// Is `a` the attachment of Docker container `id`?
pub fn is_container(a: &Attachment, id: &ContainerId) -> bool {
    a.container_id.as_deref() == Some(id.id.as_str())
}

pub fn same_ip(cidr: &str, ip: &IpAddr) -> bool {
    cidr.split('/').next().and_then(|s| s.parse::<IpAddr>().ok()) == Some(*ip)
}

/// Why remembered attachment `a` is no longer reachable (when [`still_there`]
/// is `None`): its namespace file is gone, or it now leads to another namespace.
pub fn gone_reason(a: &Attachment) -> String {
    let path = a.ns_path.display();
    match std::fs::metadata(&a.ns_path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)) {
        Ok(i) if i == a.ns_inode => format!("its namespace {path} is still there"),
        Ok(_) => format!("{path} now leads to another network namespace (its own is gone or out of reach)"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!("its namespace is gone ({path} no longer exists)"),
        Err(e) => format!("its namespace {path} cannot be reached: {e}"),
    }
}

/// What [`forget_gone`] logs for `x`: when the namespace being attached has
/// `x`'s inode, `x`'s namespace is gone for certain (a live one keeps its
/// inode) and the kernel gave the number to the new one; otherwise [`gone_reason`].
fn forget_reason(x: &Attachment, attaching: Option<(u64, &str)>) -> String {
    match attaching {
        Some((inode, name)) if x.ns_inode == inode => format!(
            "its namespace is gone and the kernel reused its inode number ({inode}) for the namespace of {name}"
        ),
        _ => gone_reason(x),
    }
}

/// The namespace of a remembered attachment, if it is still the same one.
pub fn still_there(a: &Attachment) -> Option<Netns> {
    let ns = Netns { path: a.ns_path.clone(), label: a.target.clone() };
    match ns.inode() {
        Ok(i) if i == a.ns_inode => Some(ns),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_reject() {
        assert_eq!(parse_cidr("10.40.0.1/16").unwrap(), ("10.40.0.1".parse().unwrap(), 16));
        assert_eq!(parse_cidr("fd00::5/64").unwrap().1, 64);
        for bad in ["10.40.0.999/16", "10.40.0.1", "10.40.0.1/33", "x/8", "0.0.0.0/0", "127.0.0.1/8", "224.0.0.1/4", "fd00::1/129", "10.0.0.1/-1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_routers_own_namespace_and_kernel_threads_are_not_attached() {
        // The router's own namespace is the host's: an `ethwe` there would be
        // the host's, outside what `expose` manages.
        let own = resolve("/proc/self/ns/net").unwrap();
        let e = check_attachable("/proc/self/ns/net", &own).unwrap_err().to_string();
        assert!(e.contains("the router's own network namespace") && e.contains("meshnet expose"), "{e}");
        let me = std::process::id().to_string();
        let e = check_attachable(&me, &resolve(&me).unwrap()).unwrap_err().to_string();
        assert!(e.contains("the router's own network namespace"), "{e}");
        // A kernel thread's namespace is the host's first one, whatever it is.
        let kthread = std::fs::read_dir("/proc").unwrap().filter_map(|d| d.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|p| is_kernel_thread(*p));
        if let Some(pid) = kthread {
            let pid = pid.to_string();
            if let Ok(t) = resolve(&pid) {
                let e = check_attachable(&pid, &t).unwrap_err().to_string();
                assert!(e.contains("kernel thread"), "{e}");
            }
        } else {
            eprintln!("no kernel thread visible: that half is not checked here");
        }
        assert!(!is_kernel_thread(std::process::id()));
    }

    #[test]
    fn unknown_targets_are_clear_errors() {
        let e = format!("{:#}", resolve("definitely-not-a-namespace-xyz").err().unwrap());
        assert!(e.contains("unknown target") && e.contains("/run/netns/"), "{e}");
        assert!(e.contains("process id (not a number)") && e.contains("Docker container ("), "{e}");
        assert!(resolve("../etc").is_err());
        assert!(resolve("").is_err());
        let e = format!("{:#}", resolve("4294967295").err().unwrap());
        assert!(e.contains("process id 4294967295 (no such process)"), "{e}");
    }

    #[test]
    fn namespace_paths() {
        let t = resolve("/proc/self/ns/net").unwrap();
        assert_eq!((t.kind, t.name.as_str()), ("path", "/proc/self/ns/net"));
        let e = format!("{:#}", resolve("/proc/self/ns/pid").err().unwrap());
        assert!(e.contains("not a network namespace"), "{e}");
        let e = format!("{:#}", resolve("/etc/hostname").err().unwrap());
        assert!(e.contains("not a namespace file"), "{e}");
        let e = format!("{:#}", resolve("/var/run/netns/definitely-not-there-xyz").err().unwrap());
        assert!(e.contains("no such namespace file"), "{e}");
        assert!(resolve("/run/netns/../../etc/hostname").is_err());
    }

    fn remembered(target: &str, path: &str, id: Option<&str>) -> Attachment {
        Attachment {
            target: target.into(),
            kind: if id.is_some() { "docker" } else { "path" }.into(),
            ns_path: path.into(),
            ns_inode: 1,
            host_if: "vmnx".into(),
            addrs: vec![],
            ifname: None,
            container_id: id.map(String::from),
            no_multicast_route: false,
            without_dns: false,
            rewrite_hosts: None,
            dns_pending: false,
        }
    }

    #[test]
    fn remembered_by_name_path_or_id() {
        let id = "3f4e5a6b7c8d9e0f11223344556677889900aabbccddeeff0011223344556677";
        let a = vec![remembered("/var/run/netns/cni-1", "/var/run/netns/cni-1", None), remembered("web", "/proc/9/ns/net", Some(id))];
        assert_eq!(find_remembered(&a, "/var/run/netns/cni-1"), Some(0));
        assert_eq!(find_remembered(&a, "web"), Some(1));
        assert_eq!(find_remembered(&a, id), Some(1));
        assert_eq!(find_remembered(&a, "3f4e5a6b7c8d"), Some(1));
        assert_eq!(find_remembered(&a, "3f4e"), None);
        assert_eq!(find_remembered(&a, "other"), None);
        // Remembered by path, asked for by PID: the same namespace.
        let me = std::process::id().to_string();
        let inode = resolve(&me).unwrap().netns.inode().unwrap();
        let mut b = remembered("/proc/self/ns/net", "/proc/self/ns/net", None);
        b.ns_inode = inode;
        assert_eq!(find_remembered(&[b], &me), Some(0));
        assert!(is_container(&a[1], &ContainerId { id: id.into(), name: "web".into() }));
        assert_eq!(ifname_of(&a[0]), CONTAINER_IF);
    }

    #[test]
    fn detaching_a_gone_path_is_nothing_to_do() {
        let dir = std::env::temp_dir().join(format!("meshnet-attach-{}", std::process::id()));
        let state = StateDir::new(&dir);
        state.ensure().unwrap();
        let mut a = vec![];
        assert!(!detach(&state, &mut a, "/var/run/netns/gone-xyz", &[]).unwrap());
        // Remembered but gone: forgotten.
        let mut a = vec![remembered("/var/run/netns/gone-xyz", "/var/run/netns/gone-xyz", None)];
        assert!(detach(&state, &mut a, "/var/run/netns/gone-xyz", &[]).unwrap());
        assert!(a.is_empty());
        assert!(state.load_attachments().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gone_namespaces_are_forgotten_but_not_stopped_containers() {
        let dir = std::env::temp_dir().join(format!("meshnet-sweep-{}", std::process::id()));
        let state = StateDir::new(&dir);
        state.ensure().unwrap();
        let gone = remembered("/var/run/netns/gone-xyz", "/var/run/netns/gone-xyz", None);
        let mut here = remembered("/proc/self/ns/net", "/proc/self/ns/net", None);
        here.ns_inode = resolve("/proc/self/ns/net").unwrap().netns.inode().unwrap();
        // A stopped container: its namespace is gone, its addresses wait for its start.
        let stopped = remembered("web", "/proc/999999999/ns/net", Some("3f4e5a6b7c8d9e0f"));
        let mut a = vec![gone.clone(), here.clone(), stopped.clone()];
        state.save_attachments(&a).unwrap();
        let forgotten = forget_gone_namespaces(&state, &mut a).unwrap();
        assert_eq!(forgotten, vec![gone]);
        assert_eq!(a, vec![here.clone(), stopped.clone()]);
        assert_eq!(state.load_attachments().unwrap(), a);
        assert!(forget_gone_namespaces(&state, &mut a).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn forgetting_says_why() {
        let gone = remembered("/var/run/netns/gone-xyz", "/var/run/netns/gone-xyz", None);
        let r = gone_reason(&gone);
        assert_eq!(r, "its namespace is gone (/var/run/netns/gone-xyz no longer exists)");
        // The path is there but leads to another namespace (inode 1 is nobody's).
        let other = remembered("/proc/self/ns/net", "/proc/self/ns/net", None);
        let r = gone_reason(&other);
        assert!(r.contains("/proc/self/ns/net now leads to another network namespace"), "{r}");
        assert!(!r.contains("is gone ("), "{r}");
        // The namespace being attached got the remembered one's inode.
        let r = forget_reason(&other, Some((1, "web")));
        assert!(r.contains("reused its inode number (1) for the namespace of web"), "{r}");
        assert_eq!(forget_reason(&other, Some((2, "web"))), gone_reason(&other));
        let mut here = other.clone();
        here.ns_inode = resolve("/proc/self/ns/net").unwrap().netns.inode().unwrap();
        assert!(gone_reason(&here).contains("still there"));
    }

    #[test]
    fn host_names_fit_ifnamsiz() {
        assert!(host_if_name(u64::MAX).len() <= 15);
        assert_ne!(host_if_name(1), host_if_name(2));
    }
}
