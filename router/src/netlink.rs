//! Kernel link plumbing over rtnetlink: the bridge, its ports, and the veth pair
//! that puts a container on it.
//!
//! Every function here is **blocking**. Each call opens its own rtnetlink
//! connection on a short-lived thread with a current-thread tokio runtime, so it
//! may be called from a plain thread or from inside a tokio runtime (wrap it in
//! `spawn_blocking` there: it blocks until the kernel answers). Work happens in
//! the namespace of the *calling thread*; work inside a container's namespace
//! goes through [`crate::netns::run_in`], on a thread that entered it.
//!
//! IPv6 is switched off on every device that only carries layer 2 (the bridge's
//! ports, the router's TAP, the container end unless it is given an IPv6
//! address) by writing `/proc/sys/net/ipv6/conf/NAME/disable_ipv6` before the
//! device goes up, so no link-local address or router solicitation ever leaks
//! onto the overlay. There is no netlink attribute for that knob. The bridge
//! itself has IPv6 off too, except while the host has an IPv6 address exposed
//! on it (`meshnet expose`, [`set_bridge_ipv6`]), and is set up to be quiet
//! when it is on: no generated address (`addr_gen_mode` none, so no
//! link-local, DAD probe or solicited-node MLD report of its own), no router
//! solicitations sent or advertisements taken (`router_solicitations` 0,
//! `accept_ra` 0) and no DAD (`accept_dad` 0: IPAM makes exposed addresses
//! unique); see [`quiet_bridge_ipv6`].
//!
//! This module never runs `ip` and never touches a namespace other than the
//! caller's and the one it is told to attach to.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth,
};

use crate::netns::{self, Netns, NetnsError};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// A link operation failed. The message names the operation and the thing it was
/// done to, e.g. "attach ethwe to netns c1: netns c1: no such namespace (/run/netns/c1)".
/// It holds its cause, which is therefore not also chained as a `source` (a
/// chain printed with `{:#}` would show the cause twice).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetlinkError {
    /// The kernel refused a request; `cause` carries its errno.
    #[error("{what}: {cause}")]
    Kernel {
        what: String,
        cause: io::Error,
    },
    /// The netlink conversation itself went wrong (unexpected or undecodable reply).
    #[error("{what}: {cause}")]
    Protocol {
        what: String,
        cause: rtnetlink::Error,
    },
    /// A local I/O step failed: a sysctl write, a socket, a thread, the TAP device.
    #[error("{what}: {cause}")]
    Io {
        what: String,
        cause: io::Error,
    },
    /// The target namespace could not be opened or entered.
    #[error("{what}: {cause}")]
    Netns {
        what: String,
        cause: NetnsError,
    },
    /// An argument is unusable (name too long, prefix out of range).
    #[error("{what}: {problem}")]
    InvalidArgument { what: String, problem: String },
    /// Something the operation needs does not exist (e.g. the bridge).
    #[error("{what}: {problem}")]
    NotFound { what: String, problem: String },
    /// Something exists that is not what we would have made (e.g. a non-bridge
    /// link with the bridge's name, or an interface in the container that is not
    /// attached to our bridge).
    #[error("{what}: {problem}")]
    Conflict { what: String, problem: String },
}

impl NetlinkError {
    /// The errno behind a kernel refusal or I/O failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { cause: source, .. } | NetlinkError::Io { cause: source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// What to attach where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// The container's network namespace.
    pub target: Netns,
    /// The bridge the host end joins; it must exist.
    pub bridge: String,
    /// Name of the host end (at most 15 bytes).
    pub host_if: String,
    /// Name of the container end, e.g. "ethwe".
    pub container_if: String,
    pub mtu: u32,
    /// Addresses for the container end, with prefix lengths.
    pub addrs: Vec<(IpAddr, u8)>,
    /// Route multicast (`224.0.0.0/4`) through the container end, so it stays
    /// on the overlay (`attach --no-multicast-route` leaves it out).
    pub multicast_route: bool,
}

/// A container end as it is in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub container_if: String,
    pub mac: [u8; 6],
    /// Every address on the container end (IPv6 link-local ones left out).
    pub addrs: Vec<(IpAddr, u8)>,
    /// The host end's name in the calling thread's namespace; empty when
    /// [`inspect`] finds no veth peer there.
    pub host_if: String,
}

// ---------------------------------------------------------------------------
// Public blocking API
// ---------------------------------------------------------------------------

/// Create bridge `name` if missing (an existing bridge of that name is used as it
/// is, MTU untouched), make its IPv6 quiet ([`quiet_bridge_ipv6`]: off, unless
/// it already was quiet and on, holding exposed addresses), and set it up.
/// Returns its ifindex.
pub fn ensure_bridge(name: &str, mtu: u32) -> Result<u32, NetlinkError> {
    let what = format!("ensure bridge {name}");
    check_ifname(&what, "bridge name", name)?;
    let name = name.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let index = match link_by_name(&h, &name)
            .await
            .ctx(|| format!("{what}: look up"))?
        {
            Some(link) => bridge_index_of(&what, &link)?,
            None => {
                let create = LinkMessageBuilder::<LinkBridge>::new(&name)
                    .mtu(mtu)
                    .build();
                match h.link().add(create).execute().await {
                    Ok(()) => {}
                    // Someone else made it between our look-up and now: use theirs.
                    Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(kernel(format!("create bridge {name} (mtu {mtu})"), e)),
                }
                match link_by_name(&h, &name)
                    .await
                    .ctx(|| format!("{what}: look up"))?
                {
                    Some(link) => bridge_index_of(&what, &link)?,
                    None => {
                        return Err(NetlinkError::NotFound {
                            what,
                            problem: "vanished right after it was created".into(),
                        })
                    }
                }
            }
        };
        quiet_bridge_ipv6(&name)?;
        set_link(&h, LinkUnspec::new_with_index(index).up().build())
            .await
            .ctx(|| format!("set bridge {name} up"))?;
        Ok(index)
    })
}

/// Pin bridge `name`'s MAC address: set it to the address it has now, so the
/// kernel stops deriving it from the lowest MAC among its ports. Otherwise it
/// changes whenever the router's TAP (or pcap veth, made anew with a random
/// MAC at every launch) or a container's veth comes or goes, and hosts and
/// containers that cached it (ARP, neighbour discovery) lose the bridge's
/// exposed addresses, and the DNS server on them, for seconds after a restart.
/// Returns the address.
pub fn pin_bridge_mac(name: &str) -> Result<[u8; 6], NetlinkError> {
    let what = format!("pin the MAC address of bridge {name}");
    check_ifname(&what, "bridge name", name)?;
    let name = name.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let link = existing_link(&h, &what, &name).await?;
        let index = bridge_index_of(&what, &link)?;
        let mac = mac_of(&link).ok_or_else(|| NetlinkError::NotFound { what: what.clone(), problem: "it has no MAC address".into() })?;
        set_link(&h, LinkUnspec::new_with_index(index).address(mac.to_vec()).build()).await.ctx(|| what)?;
        Ok(mac)
    })
}

/// The ifindex of link `name` in the calling thread's namespace, if it exists.
pub fn link_index(name: &str) -> Result<Option<u32>, NetlinkError> {
    let what = format!("look up link {name}");
    check_ifname(&what, "link name", name)?;
    let name = name.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        Ok(link_by_name(&h, &name)
            .await
            .ctx(|| what)?
            .map(|l| l.header.index))
    })
}

/// Set the MTU of link `name` in the calling thread's namespace.
pub fn set_mtu(name: &str, mtu: u32) -> Result<(), NetlinkError> {
    let what = format!("set the MTU of {name} to {mtu}");
    check_ifname(&what, "link name", name)?;
    let name = name.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let link = existing_link(&h, &what, &name).await?;
        set_link(&h, LinkUnspec::new_with_index(link.header.index).mtu(mtu).build()).await.ctx(|| what)
    })
}

/// Delete link `name` (a veth takes its peer with it). Returns whether it existed.
pub fn delete_link(name: &str) -> Result<bool, NetlinkError> {
    let what = format!("delete link {name}");
    check_ifname(&what, "link name", name)?;
    let name = name.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        delete_by_name(&h, &name, &what).await
    })
}

/// Deletes link `name` as cleanup, where the caller's outcome does not depend
/// on it: a link already gone is no failure, and a failure (the link stays) is
/// logged as a warning naming it and `why` it was to go, not returned.
pub fn clean_up_link(name: &str, why: &str) {
    if let Err(e) = delete_link(name) {
        log::warn!("{name} is left behind ({why}): {e}");
    }
}

/// The names of the veth ends that are ports of bridge `bridge` (in the calling
/// thread's namespace); none if there is no such bridge.
pub fn veth_ports_of(bridge: &str) -> Result<Vec<String>, NetlinkError> {
    let what = format!("list the veth ports of {bridge}");
    check_ifname(&what, "bridge name", bridge)?;
    let bridge = bridge.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let Some(br) = link_by_name(&h, &bridge).await.ctx(|| what.clone())? else { return Ok(Vec::new()) };
        let mut dump = h.link().get().execute();
        let mut ports = Vec::new();
        while let Some(link) = dump.try_next().await.ctx(|| what.clone())? {
            if master_of(&link) == Some(br.header.index) && is_kind(&link, &InfoKind::Veth) {
                ports.extend(name_of(&link).map(str::to_string));
            }
        }
        Ok(ports)
    })
}

/// Make link `name` a port of the bridge with ifindex `bridge_index`: IPv6 off
/// (a bridge port carries no layer 3), then master, MTU when given, promiscuous
/// when `promisc` (false leaves the flag as it is), and up.
pub fn set_master_up(
    name: &str,
    bridge_index: u32,
    mtu: Option<u32>,
    promisc: bool,
) -> Result<(), NetlinkError> {
    set_port(
        name,
        PortConfig {
            bridge_index,
            mtu,
            promisc,
            txqueuelen: None,
        },
    )
}

/// How [`set_port`] configures a bridge port.
pub(crate) struct PortConfig {
    pub bridge_index: u32,
    pub mtu: Option<u32>,
    pub promisc: bool,
    pub txqueuelen: Option<u32>,
}

/// [`set_master_up`] plus the settings only the TAP needs.
pub(crate) fn set_port(name: &str, cfg: PortConfig) -> Result<(), NetlinkError> {
    let what = format!("put {name} on bridge #{}", cfg.bridge_index);
    check_ifname(&what, "link name", name)?;
    let name = name.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let link = link_by_name(&h, &name)
            .await
            .ctx(|| format!("{what}: look up {name}"))?
            .ok_or_else(|| NetlinkError::NotFound {
                what: what.clone(),
                problem: format!("no link named {name}"),
            })?;
        configure_port(&h, &name, link.header.index, &cfg).await
    })
}

/// Make a veth pair that stays in the calling thread's namespace, for the
/// capture datapath: `bridge_end` a port of the bridge with ifindex
/// `bridge_index`, `capture_end` promiscuous; both with MTU `mtu`, IPv6 off, up.
/// Links already named so (left by a router that crashed) are deleted first; on
/// error the new pair is deleted again.
pub fn create_veth_port(
    capture_end: &str,
    bridge_end: &str,
    bridge_index: u32,
    mtu: u32,
) -> Result<(), NetlinkError> {
    make_veth_port(capture_end, bridge_end, bridge_index, mtu, true)
}

/// Make a veth pair for a container runtime that moves one end itself (the
/// Docker plugin's `Join`): `bridge_end` a port of the bridge with ifindex
/// `bridge_index` (IPv6 off, up), `other_end` left down in this namespace for
/// the runtime to move and rename; both with MTU `mtu`. As
/// [`create_veth_port`], leftovers of the same names are deleted first and a
/// failure deletes the new pair.
pub fn create_veth_for_runtime(
    other_end: &str,
    bridge_end: &str,
    bridge_index: u32,
    mtu: u32,
) -> Result<(), NetlinkError> {
    make_veth_port(other_end, bridge_end, bridge_index, mtu, false)
}

fn make_veth_port(
    capture_end: &str,
    bridge_end: &str,
    bridge_index: u32,
    mtu: u32,
    capture: bool,
) -> Result<(), NetlinkError> {
    let what = format!("create veth {capture_end}/{bridge_end}");
    check_ifname(&what, "capture end name", capture_end)?;
    check_ifname(&what, "bridge end name", bridge_end)?;
    let (capture_end, bridge_end) = (capture_end.to_string(), bridge_end.to_string());
    on_netlink_thread(what.clone(), move |h| async move {
        delete_by_name(&h, &capture_end, &what).await?;
        delete_by_name(&h, &bridge_end, &what).await?;
        h.link()
            .add(LinkVeth::new(&capture_end, &bridge_end).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| kernel(what.clone(), e))?;
        let made: Result<(), NetlinkError> = async {
            let cfg = PortConfig { bridge_index, mtu: Some(mtu), promisc: false, txqueuelen: None };
            for (name, port) in [(&bridge_end, true), (&capture_end, false)] {
                let link = link_by_name(&h, name)
                    .await
                    .ctx(|| format!("{what}: look up {name}"))?
                    .ok_or_else(|| NetlinkError::NotFound {
                        what: what.clone(),
                        problem: format!("{name} vanished after creation"),
                    })?;
                if port {
                    configure_port(&h, name, link.header.index, &cfg).await?;
                } else if capture {
                    set_ipv6_disabled(name, true)?;
                    set_link(&h, LinkUnspec::new_with_index(link.header.index).promiscuous(true).up().build())
                        .await
                        .ctx(|| format!("{what}: set {name} promiscuous and up"))?;
                }
            }
            Ok(())
        }
        .await;
        if made.is_err() {
            undo_veth(&h, &capture_end).await;
        }
        made
    })
}

/// Make a veth pair: host end on the bridge (up, IPv6 off), the other moved into
/// the target namespace (by fd), renamed to container_if, MTU set, addresses
/// added, up, IPv6 off (unless an IPv6 address is asked for), then a gratuitous
/// ARP for each IPv4 address and an unsolicited neighbour advertisement for each
/// IPv6 one sent from inside.
///
/// Idempotent: if container_if already exists in the target and its peer is on
/// our bridge, only missing addresses are added, both ends take `spec.mtu` (a
/// launch with another `--mtu`), and all addresses are re-announced.
/// If it exists and is anything else, that is a [`NetlinkError::Conflict`].
/// Errors leave nothing half-made: a new veth is deleted, addresses added by a
/// failed re-attach are removed.
pub fn attach(spec: &AttachSpec) -> Result<Attached, NetlinkError> {
    let what = format!("attach {} to {}", spec.container_if, spec.target.label);
    check_ifname(&what, "bridge name", &spec.bridge)?;
    check_ifname(&what, "host interface name", &spec.host_if)?;
    check_ifname(&what, "container interface name", &spec.container_if)?;
    check_prefixes(&what, &spec.addrs)?;

    // Opening the namespace first means a missing one costs nothing to undo.
    let target_file = spec.target.open().map_err(|source| NetlinkError::Netns {
        what: what.clone(),
        cause: source,
    })?;
    let bridge_index = link_index(&spec.bridge)?.ok_or_else(|| NetlinkError::NotFound {
        what: what.clone(),
        problem: format!("bridge {} does not exist", spec.bridge),
    })?;

    let container_if = spec.container_if.clone();
    let existing = in_ns(&spec.target, &what, move || {
        with_connection(move |h| async move { container_end(&h, &container_if).await })
    })?;

    match existing {
        Some(end) => {
            let host_if = match verified_peer(&what, &end)? {
                Some(peer) if peer.master == Some(bridge_index) => peer.name,
                _ => {
                    return Err(NetlinkError::Conflict {
                        what,
                        problem: format!(
                            "{} already exists in {} and is not attached to bridge {}",
                            spec.container_if, spec.target.label, spec.bridge
                        ),
                    })
                }
            };
            reattach(spec, &what, host_if)
        }
        None => attach_new(spec, &what, bridge_index, target_file),
    }
}

/// Remove the given addresses from container_if in the target; with none given,
/// or when none remain, delete the interface (which removes the host end too).
/// Idempotent: detaching something not attached is Ok(false). Returns whether
/// anything changed.
pub fn detach(
    target: &Netns,
    container_if: &str,
    addrs: &[(IpAddr, u8)],
) -> Result<bool, NetlinkError> {
    let what = format!("detach {container_if} in {}", target.label);
    check_ifname(&what, "container interface name", container_if)?;
    check_prefixes(&what, addrs)?;
    let name = container_if.to_string();
    let addrs = addrs.to_vec();
    let inner_what = what.clone();
    in_ns(target, &what, move || {
        with_connection(move |h| async move {
            let what = inner_what;
            let Some(link) = link_by_name(&h, &name)
                .await
                .ctx(|| format!("{what}: look up"))?
            else {
                return Ok(false);
            };
            let index = link.header.index;
            if addrs.is_empty() {
                return delete_by_name(&h, &name, &what).await;
            }
            let mut changed = false;
            for &(ip, prefix) in &addrs {
                changed |= del_address(&h, index, ip, prefix)
                    .await
                    .ctx(|| format!("{what}: remove {ip}/{prefix}"))?;
            }
            let remaining = addresses(&h, index)
                .await
                .ctx(|| format!("{what}: list addresses"))?;
            if remaining.is_empty() {
                changed |= delete_by_name(&h, &name, &what).await?;
            }
            Ok(changed)
        })
    })
}

/// Read container_if in the target: MAC and addresses, or None if absent.
pub fn inspect(target: &Netns, container_if: &str) -> Result<Option<Attached>, NetlinkError> {
    let what = format!("inspect {container_if} in {}", target.label);
    check_ifname(&what, "container interface name", container_if)?;
    let name = container_if.to_string();
    let found = in_ns(target, &what, move || {
        with_connection(move |h| async move { container_end(&h, &name).await })
    })?;
    let Some(end) = found else { return Ok(None) };
    let host_if = verified_peer(&what, &end)?
        .map(|p| p.name)
        .unwrap_or_default();
    Ok(Some(end.attached(host_if)))
}

/// The multicast block routed through an attached interface.
pub const MULTICAST: &str = "224.0.0.0/4";

/// Add `ip/prefix` to link `ifname` in the caller's namespace (the bridge, for
/// `meshnet expose`). Ok(false) if it was already there.
pub fn add_link_address(ifname: &str, ip: IpAddr, prefix: u8) -> Result<bool, NetlinkError> {
    let what = format!("add {ip}/{prefix} to {ifname}");
    check_ifname(&what, "interface name", ifname)?;
    check_prefixes(&what, &[(ip, prefix)])?;
    let name = ifname.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let link = link_by_name(&h, &name)
            .await
            .ctx(|| format!("{what}: look up"))?
            .ok_or_else(|| NetlinkError::NotFound { what: what.clone(), problem: format!("{name} does not exist") })?;
        add_address(&h, link.header.index, ip, prefix).await.ctx(|| what.clone())
    })
}

/// Remove `ip/prefix` from link `ifname` in the caller's namespace. Ok(false)
/// if it (or the link) was not there.
pub fn del_link_address(ifname: &str, ip: IpAddr, prefix: u8) -> Result<bool, NetlinkError> {
    let what = format!("remove {ip}/{prefix} from {ifname}");
    check_ifname(&what, "interface name", ifname)?;
    check_prefixes(&what, &[(ip, prefix)])?;
    let name = ifname.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let Some(link) = link_by_name(&h, &name).await.ctx(|| format!("{what}: look up"))? else {
            return Ok(false);
        };
        del_address(&h, link.header.index, ip, prefix).await.ctx(|| what.clone())
    })
}

/// The addresses of link `ifname` in the caller's namespace (IPv6 link-local
/// ones left out); empty if there is no such link.
pub fn link_addresses(ifname: &str) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
    let what = format!("list addresses of {ifname}");
    check_ifname(&what, "interface name", ifname)?;
    let name = ifname.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let Some(link) = link_by_name(&h, &name).await.ctx(|| format!("{what}: look up"))? else {
            return Ok(Vec::new());
        };
        addresses(&h, link.header.index).await.ctx(|| what.clone())
    })
}

/// Switch hairpin mode of bridge port `ifname` (in the caller's namespace) on
/// or off: a frame may then leave the port it came in on, so a pod reaches
/// itself through a Service that points back at it.
pub fn set_hairpin(ifname: &str, on: bool) -> Result<(), NetlinkError> {
    let what = format!("set hairpin mode of {ifname} {}", if on { "on" } else { "off" });
    check_ifname(&what, "interface name", ifname)?;
    let name = ifname.to_string();
    on_netlink_thread(what.clone(), move |h| async move {
        let link = link_by_name(&h, &name)
            .await
            .ctx(|| format!("{what}: look up"))?
            .ok_or_else(|| NetlinkError::NotFound { what: what.clone(), problem: format!("{name} does not exist") })?;
        let mut msg = LinkUnspec::new_with_index(link.header.index).build();
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(on)])),
        ]));
        set_link(&h, msg).await.ctx(|| what.clone())
    })
}

/// `224.0.0.0/4` through interface `index` (replacing one already there).
async fn add_multicast_route(h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::new(224, 0, 0, 0), 4)
        .output_interface(index)
        .build();
    h.route().add(msg).replace().execute().await
}

// ---------------------------------------------------------------------------
// attach, step by step
// ---------------------------------------------------------------------------

fn attach_new(
    spec: &AttachSpec,
    what: &str,
    bridge_index: u32,
    target_file: std::fs::File,
) -> Result<Attached, NetlinkError> {
    clear_half_made(spec, what)?;
    let temp = temp_ifname();
    let host_if = spec.host_if.clone();
    let mtu = spec.mtu;

    // Host side: make the pair, put our end on the bridge, send the other end away.
    let host_result = {
        let (host_if, temp, what) = (host_if.clone(), temp.clone(), what.to_string());
        on_netlink_thread(what.clone(), move |h| async move {
            h.link()
                .add(LinkVeth::new(&host_if, &temp).mtu(mtu).build())
                .execute()
                .await
                .map_err(|e| kernel(format!("{what}: create veth {host_if}"), e))?;
            let made: Result<(), NetlinkError> = async {
                let cfg = PortConfig {
                    bridge_index,
                    mtu: Some(mtu),
                    promisc: false,
                    txqueuelen: None,
                };
                let host = link_by_name(&h, &host_if)
                    .await
                    .ctx(|| format!("{what}: look up {host_if}"))?
                    .ok_or_else(|| NetlinkError::NotFound {
                        what: what.clone(),
                        problem: format!("veth {host_if} vanished after creation"),
                    })?;
                configure_port(&h, &host_if, host.header.index, &cfg).await?;
                let peer = link_by_name(&h, &temp)
                    .await
                    .ctx(|| format!("{what}: look up {temp}"))?
                    .ok_or_else(|| NetlinkError::NotFound {
                        what: what.clone(),
                        problem: format!("veth peer {temp} vanished after creation"),
                    })?;
                let fd = target_file.as_raw_fd();
                set_link(
                    &h,
                    LinkUnspec::new_with_index(peer.header.index)
                        .setns_by_fd(fd)
                        .build(),
                )
                .await
                .ctx(|| format!("{what}: move {temp} into the namespace"))?;
                Ok(())
            }
            .await;
            if made.is_err() {
                undo_veth(&h, &host_if).await;
            }
            made
        })
    };
    host_result?;

    // Container side: rename, configure, up; announce once the port forwards.
    let (container_if, addrs) = (spec.container_if.clone(), spec.addrs.clone());
    let multicast = spec.multicast_route;
    let inner_what = what.to_string();
    let inside = in_ns(&spec.target, what, move || {
        let what = inner_what;
        with_connection(move |h| async move {
            let link = link_by_name(&h, &temp)
                .await
                .ctx(|| format!("{what}: look up {temp} in the namespace"))?
                .ok_or_else(|| NetlinkError::NotFound {
                    what: what.clone(),
                    problem: format!("veth end {temp} did not arrive in the namespace"),
                })?;
            let index = link.header.index;
            set_link(
                &h,
                LinkUnspec::new_with_index(index)
                    .name(container_if.clone())
                    .mtu(mtu)
                    .build(),
            )
            .await
            .ctx(|| format!("{what}: rename {temp} to {container_if} with mtu {mtu}"))?;
            set_ipv6_disabled(&container_if, !wants_ipv6(&addrs))?;
            for &(ip, prefix) in &addrs {
                add_address(&h, index, ip, prefix)
                    .await
                    .ctx(|| format!("{what}: add {ip}/{prefix}"))?;
            }
            set_link(&h, LinkUnspec::new_with_index(index).up().build())
                .await
                .ctx(|| format!("{what}: set {container_if} up"))?;
            if multicast {
                add_multicast_route(&h, index)
                    .await
                    .ctx(|| format!("{what}: route {MULTICAST} via {container_if}"))?;
            }
            container_end(&h, &container_if)
                .await?
                .ok_or_else(|| NetlinkError::NotFound {
                    what: what.clone(),
                    problem: format!("{container_if} vanished after configuration"),
                })
        })
    });

    match inside {
        Ok(end) => {
            announce_when_forwarding(spec, what, &host_if, &end);
            Ok(end.attached(host_if))
        }
        Err(e) => {
            // Deleting the host end takes the container end with it, wherever it is.
            let cleanup = host_if.clone();
            if let Err(undo) = on_netlink_thread(format!("undo {what}"), move |h| async move {
                undo_veth(&h, &cleanup).await;
                Ok(())
            }) {
                log::warn!("undo {what}: {undo}");
            }
            Err(e)
        }
    }
}

/// Send the gratuitous ARPs and neighbour advertisements for a new container
/// end from inside its namespace.
/// The bridge enables the host end only once it has seen the carrier come up
/// (asynchronously, via linkwatch), and drops what arrives before that, so wait
/// for the port to forward first (bounded by [`PORT_WAIT`]).
fn announce_when_forwarding(spec: &AttachSpec, what: &str, host_if: &str, end: &ContainerEnd) {
    if spec.addrs.is_empty() {
        return;
    }
    let name = host_if.to_string();
    let forwarding =
        on_netlink_thread(format!("{what}: wait for {host_if}"), move |h| async move {
            Ok(wait_forwarding(&h, &name, PORT_WAIT).await)
        });
    if !matches!(forwarding, Ok(true)) {
        log::debug!("{what}: {host_if} not forwarding yet; announcing anyway");
    }
    let (name, mac, addrs) = (end.name.clone(), end.mac, spec.addrs.clone());
    if let Err(e) = in_ns(&spec.target, what, move || {
        announce(&name, mac, &addrs);
        Ok(())
    }) {
        log::warn!("{e}");
    }
}

fn reattach(spec: &AttachSpec, what: &str, host_if: String) -> Result<Attached, NetlinkError> {
    let container_if = spec.container_if.clone();
    let addrs = spec.addrs.clone();
    let multicast = spec.multicast_route;
    let mtu = spec.mtu;
    let inner_what = what.to_string();
    let end = in_ns(&spec.target, what, move || {
        let what = inner_what;
        let end = with_connection({
            let (what, addrs) = (what.clone(), addrs.clone());
            move |h| async move {
                let link = link_by_name(&h, &container_if)
                    .await
                    .ctx(|| format!("{what}: look up"))?
                    .ok_or_else(|| NetlinkError::NotFound {
                        what: what.clone(),
                        problem: format!("{container_if} vanished"),
                    })?;
                let index = link.header.index;
                let mut added = Vec::new();
                let result: Result<ContainerEnd, NetlinkError> = async {
                    if wants_ipv6(&addrs) {
                        set_ipv6_disabled(&container_if, false)?;
                    }
                    let present = addresses(&h, index)
                        .await
                        .ctx(|| format!("{what}: list addresses"))?;
                    for &(ip, prefix) in &addrs {
                        if present.contains(&(ip, prefix)) {
                            continue;
                        }
                        if add_address(&h, index, ip, prefix)
                            .await
                            .ctx(|| format!("{what}: add {ip}/{prefix}"))?
                        {
                            added.push((ip, prefix));
                        }
                    }
                    // The overlay MTU of this launch, which may not be the one
                    // the interface was made with.
                    set_link(&h, LinkUnspec::new_with_index(index).mtu(mtu).up().build())
                        .await
                        .ctx(|| format!("{what}: set {container_if} up (mtu {mtu})"))?;
                    if multicast {
                        add_multicast_route(&h, index)
                            .await
                            .ctx(|| format!("{what}: route {MULTICAST} via {container_if}"))?;
                    }
                    container_end(&h, &container_if)
                        .await?
                        .ok_or_else(|| NetlinkError::NotFound {
                            what: what.clone(),
                            problem: format!("{container_if} vanished"),
                        })
                }
                .await;
                if result.is_err() {
                    for &(ip, prefix) in &added {
                        if let Err(e) = del_address(&h, index, ip, prefix).await {
                            log::warn!("undo {what}: remove {ip}/{prefix}: {e}");
                        }
                    }
                }
                result
            }
        })?;
        announce(&end.name, end.mac, &addrs);
        Ok(end)
    })?;
    set_mtu(&host_if, mtu)?;
    Ok(end.attached(host_if))
}

/// How long [`attach`] waits for a new host end to start forwarding before it
/// sends the announcements anyway (a bridge with STP on takes much longer).
const PORT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Wait until `name` is a bridge port in forwarding state; false on timeout.
async fn wait_forwarding(h: &Handle, name: &str, limit: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(Some(link)) = link_by_name(h, name).await {
            if bridge_port_state(&link) == Some(&BridgePortState::Forwarding) {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Announce `addrs` of `container_if` in `target` again (see [`announce`]), for
/// when nobody beyond this host could hear the announcement of [`attach`] (a
/// re-attach while the router was not yet connected to the mesh). Nothing to
/// do when the interface is not there.
pub fn reannounce(target: &Netns, container_if: &str, addrs: &[(IpAddr, u8)]) -> Result<(), NetlinkError> {
    let what = format!("announce {container_if} in {}", target.label);
    check_ifname(&what, "container interface name", container_if)?;
    let (name, addrs) = (container_if.to_string(), addrs.to_vec());
    in_ns(target, &what, move || {
        let end = with_connection(move |h| async move { container_end(&h, &name).await })?;
        if let Some(end) = end {
            announce(&end.name, end.mac, &addrs);
        }
        Ok(())
    })
}

/// "`ip` is at `mac`" for each address: a gratuitous ARP (IPv4) or an
/// unsolicited neighbour advertisement (IPv6), so neighbours that knew the
/// address at another MAC (a restarted container, an address moved to another
/// target) take the new one at once. Best effort: an announcement can be lost
/// on the wire anyway, so a failure is logged, not returned.
fn announce(ifname: &str, mac: [u8; 6], addrs: &[(IpAddr, u8)]) {
    for (ip, _) in addrs {
        let sent = match ip {
            IpAddr::V4(v4) => crate::arp::gratuitous_arp(ifname, mac, *v4),
            IpAddr::V6(v6) => crate::arp::unsolicited_na(ifname, mac, *v6),
        };
        if let Err(e) = sent {
            log::warn!("{e}");
        }
    }
}

async fn undo_veth(h: &Handle, host_if: &str) {
    let what = format!("undo: delete veth {host_if}");
    if let Err(e) = delete_by_name(h, host_if, &what).await {
        log::warn!("{e}");
    }
}

/// Deletes a pair left by an attach that was cut short (the router killed
/// between making the veth and renaming its far end, here or in the target):
/// `spec.host_if` exists and its peer still has its temporary name. Left alone,
/// it made every later attach of that target fail with "File exists". Anything
/// else named `host_if` is kept (making the pair then fails, saying so).
fn clear_half_made(spec: &AttachSpec, what: &str) -> Result<(), NetlinkError> {
    let host_if = spec.host_if.clone();
    let w = what.to_string();
    let found = on_netlink_thread(w.clone(), move |h| async move {
        let Some(link) = link_by_name(&h, &host_if).await.ctx(|| format!("{w}: look up {host_if}"))? else {
            return Ok(None);
        };
        let (index, Some(peer)) = (link.header.index, peer_of(&link)) else { return Ok(None) };
        if !is_kind(&link, &InfoKind::Veth) {
            return Ok(None);
        }
        // The peer never left this namespace.
        let here = link_by_index(&h, peer).await.ctx(|| format!("{w}: look up the peer of {host_if}"))?;
        if here.is_some_and(|p| is_temp_ifname(name_of(&p).unwrap_or_default()) && peer_of(&p) == Some(index)) {
            log::info!("{w}: deleting {host_if}, left half made by an earlier attach");
            undo_veth(&h, &host_if).await;
            return Ok(None);
        }
        Ok(Some((index, peer)))
    })?;
    let Some((host_index, peer)) = found else { return Ok(()) };
    let w = what.to_string();
    let stale = in_ns(&spec.target, what, move || {
        with_connection(move |h| async move {
            let p = link_by_index(&h, peer).await.ctx(|| format!("{w}: look up interface {peer} in the namespace"))?;
            Ok(p.is_some_and(|p| {
                is_kind(&p, &InfoKind::Veth) && is_temp_ifname(name_of(&p).unwrap_or_default()) && peer_of(&p) == Some(host_index)
            }))
        })
    })?;
    if stale {
        let (host_if, w) = (spec.host_if.clone(), what.to_string());
        on_netlink_thread(w.clone(), move |h| async move {
            log::info!("{w}: deleting {host_if}, left half made by an earlier attach");
            undo_veth(&h, &host_if).await;
            Ok(())
        })?;
    }
    Ok(())
}

/// Whether `name` is one [`temp_ifname`] gives (of any process).
fn is_temp_ifname(name: &str) -> bool {
    name.strip_prefix("mnt")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(pid, n)| {
            !pid.is_empty() && !n.is_empty() && pid.chars().chain(n.chars()).all(|c| c.is_ascii_hexdigit())
        })
}

/// A unique short name for the veth end while it crosses namespaces.
fn temp_ifname() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xf_ffff;
    let name = format!("mnt{:x}-{n:x}", std::process::id());
    debug_assert!(name.len() <= MAX_IFNAME_LEN);
    name
}

fn wants_ipv6(addrs: &[(IpAddr, u8)]) -> bool {
    addrs.iter().any(|(ip, _)| ip.is_ipv6())
}

/// Run `f` inside `ns`, folding a namespace failure into a [`NetlinkError`].
fn in_ns<T: Send + 'static>(
    ns: &Netns,
    what: &str,
    f: impl FnOnce() -> Result<T, NetlinkError> + Send + 'static,
) -> Result<T, NetlinkError> {
    netns::run_in(ns, f).map_err(|source| NetlinkError::Netns {
        what: what.to_string(),
        cause: source,
    })?
}

// ---------------------------------------------------------------------------
// Reading links
// ---------------------------------------------------------------------------

/// The container end of a veth as seen from inside its namespace.
async fn container_end(h: &Handle, name: &str) -> Result<Option<ContainerEnd>, NetlinkError> {
    let what = || format!("look up {name}");
    let Some(link) = link_by_name(h, name).await.ctx(what)? else {
        return Ok(None);
    };
    let index = link.header.index;
    let addrs = addresses(h, index)
        .await
        .ctx(|| format!("list addresses of {name}"))?;
    Ok(Some(ContainerEnd {
        name: name.to_string(),
        index,
        mac: mac_of(&link).unwrap_or_default(),
        peer_index: peer_of(&link),
        addrs,
    }))
}

/// A container end plus what is needed to find its host end.
#[derive(Debug)]
struct ContainerEnd {
    name: String,
    index: u32,
    mac: [u8; 6],
    peer_index: Option<u32>,
    addrs: Vec<(IpAddr, u8)>,
}

impl ContainerEnd {
    fn attached(self, host_if: String) -> Attached {
        Attached {
            container_if: self.name,
            mac: self.mac,
            addrs: self.addrs,
            host_if,
        }
    }
}

struct HostEnd {
    name: String,
    master: Option<u32>,
}

/// The veth in the calling thread's namespace whose peer is `end`: its ifindex
/// is `end`'s peer index and its own peer index is `end`'s ifindex. Ifindexes
/// are per namespace, so both directions are checked.
fn verified_peer(what: &str, end: &ContainerEnd) -> Result<Option<HostEnd>, NetlinkError> {
    let Some(peer_index) = end.peer_index else {
        return Ok(None);
    };
    let container_index = end.index;
    let what = format!("{what}: look up the peer of {}", end.name);
    on_netlink_thread(what.clone(), move |h| async move {
        let Some(link) = link_by_index(&h, peer_index).await.ctx(|| what)? else {
            return Ok(None);
        };
        if !is_kind(&link, &InfoKind::Veth) || peer_of(&link) != Some(container_index) {
            return Ok(None);
        }
        Ok(Some(HostEnd {
            name: name_of(&link).unwrap_or_default().to_string(),
            master: master_of(&link),
        }))
    })
}

pub(crate) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Link `name`, which must exist (for `what`, the operation's description).
async fn existing_link(h: &Handle, what: &str, name: &str) -> Result<LinkMessage, NetlinkError> {
    link_by_name(h, name)
        .await
        .ctx(|| format!("{what}: look up"))?
        .ok_or_else(|| NetlinkError::NotFound { what: what.to_string(), problem: "no such link".into() })
}

async fn link_by_index(h: &Handle, index: u32) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = h.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn mac_of(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => a.as_slice().try_into().ok(),
        _ => None,
    })
}

fn master_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
fn peer_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn bridge_port_state(link: &LinkMessage) -> Option<&BridgePortState> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                port.iter().find_map(|p| match p {
                    InfoBridgePort::State(state) => Some(state),
                    _ => None,
                })
            }
            _ => None,
        }),
        _ => None,
    })
}

pub(crate) fn is_kind(link: &LinkMessage, kind: &InfoKind) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(k) if k == kind)),
        _ => false,
    })
}

fn bridge_index_of(what: &str, link: &LinkMessage) -> Result<u32, NetlinkError> {
    if is_kind(link, &InfoKind::Bridge) {
        Ok(link.header.index)
    } else {
        Err(NetlinkError::Conflict {
            what: what.to_string(),
            problem: format!(
                "a link named {} exists and is not a bridge",
                name_of(link).unwrap_or("?")
            ),
        })
    }
}

// ---------------------------------------------------------------------------
// Changing links and addresses
// ---------------------------------------------------------------------------

/// RTM_NEWLINK without NLM_F_CREATE: change an existing link (`ip link set`).
pub(crate) async fn set_link(h: &Handle, msg: LinkMessage) -> Result<(), rtnetlink::Error> {
    h.link().change(msg).execute().await
}

async fn configure_port(
    h: &Handle,
    name: &str,
    index: u32,
    cfg: &PortConfig,
) -> Result<(), NetlinkError> {
    set_ipv6_disabled(name, true)?;
    let mut msg = LinkUnspec::new_with_index(index).controller(cfg.bridge_index);
    if let Some(mtu) = cfg.mtu {
        msg = msg.mtu(mtu);
    }
    if cfg.promisc {
        msg = msg.promiscuous(true);
    }
    if let Some(len) = cfg.txqueuelen {
        msg = msg.txqueuelen(len);
    }
    set_link(h, msg.up().build()).await.ctx(|| {
        let mut s = format!("put {name} on bridge #{} and up", cfg.bridge_index);
        if let Some(mtu) = cfg.mtu {
            s += &format!(" (mtu {mtu})");
        }
        s
    })
}

pub(crate) async fn delete_by_name(h: &Handle, name: &str, what: &str) -> Result<bool, NetlinkError> {
    let Some(link) = link_by_name(h, name)
        .await
        .ctx(|| format!("{what}: look up"))?
    else {
        return Ok(false);
    };
    match h.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(kernel(what.to_string(), e)),
    }
}

fn address_message(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    match ip {
        IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(v4, prefix)
            .build(),
        IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(v6, prefix)
            .build(),
    }
}

/// Add an address; Ok(false) if it was already there.
async fn add_address(
    h: &Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
) -> Result<bool, rtnetlink::Error> {
    match h.address().add(index, ip, prefix).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove an address; Ok(false) if it was not there.
async fn del_address(
    h: &Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
) -> Result<bool, rtnetlink::Error> {
    match h
        .address()
        .del(address_message(index, ip, prefix))
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The addresses on link `index`, IPv6 link-local ones left out.
async fn addresses(h: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut dump = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = dump.try_next().await? {
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local.or(address) else {
            continue;
        };
        if let IpAddr::V6(v6) = ip {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
        }
        out.push((ip, msg.header.prefix_len));
    }
    Ok(out)
}

/// The bridge's IPv6 knobs (`/proc/sys/net/ipv6/conf/NAME/...`) and the value
/// [`quiet_bridge_ipv6`] gives each.
pub const BRIDGE_IPV6_SYSCTLS: [(&str, &str); 4] = [
    ("addr_gen_mode", "1"),
    ("accept_ra", "0"),
    ("router_solicitations", "0"),
    ("accept_dad", "0"),
];

/// Makes bridge `name` quiet for when IPv6 is on: the kernel generates no
/// address for it (`addr_gen_mode` 1, none: no link-local address, so no DAD
/// probe, no MLD report for a solicited-node group, no router solicitation),
/// it takes no router advertisements (`accept_ra` 0), solicits none, and runs
/// no DAD (IPAM already makes exposed addresses unique, and DAD would hold a
/// fresh address back for a second). A bridge not set so yet gets IPv6
/// switched off first (which drops any address it had, e.g. a generated
/// link-local one); one already set so is left as it is, IPv6 on or off, so
/// the addresses exposed on it stay across a restart. IPv6 itself is switched
/// on only while an IPv6 address is exposed ([`set_bridge_ipv6`]): with it off
/// the host neither sends onto the overlay nor routes what arrives from it.
/// Without IPv6 in the kernel (no such files) there is nothing to do.
pub fn quiet_bridge_ipv6(name: &str) -> Result<(), NetlinkError> {
    let dir = format!("/proc/sys/net/ipv6/conf/{name}");
    let read = |knob: &str| std::fs::read_to_string(format!("{dir}/{knob}")).ok().map(|v| v.trim().to_string());
    if read("disable_ipv6").is_none() {
        return Ok(());
    }
    if BRIDGE_IPV6_SYSCTLS.iter().all(|(knob, want)| read(knob).as_deref() == Some(*want)) {
        return Ok(());
    }
    set_ipv6_disabled(name, true)?;
    for (knob, value) in BRIDGE_IPV6_SYSCTLS {
        let path = format!("{dir}/{knob}");
        if let Err(source) = std::fs::write(&path, format!("{value}\n")) {
            return Err(NetlinkError::Io { what: format!("set {path} to {value}"), cause: source });
        }
    }
    Ok(())
}

/// IPv6 on (`on`, quiet: see [`quiet_bridge_ipv6`]) or off on bridge `name`,
/// for whether an IPv6 address is exposed on it. Switching it off drops every
/// IPv6 address it has.
pub fn set_bridge_ipv6(name: &str, on: bool) -> Result<(), NetlinkError> {
    let dir = format!("/proc/sys/net/ipv6/conf/{name}");
    if !on {
        return set_ipv6_disabled(name, true);
    }
    if !std::path::Path::new(&dir).exists() {
        return Err(NetlinkError::Io {
            what: format!("enable IPv6 on {name}"),
            cause: io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {dir}: IPv6 is off in this kernel, or the bridge's MTU is below IPv6's 1280"),
            ),
        });
    }
    quiet_bridge_ipv6(name)?;
    set_ipv6_disabled(name, false)
}

/// Write /proc/sys/net/ipv6/conf/NAME/disable_ipv6 for the calling thread's
/// namespace (/proc/sys/net follows the thread). A missing file means IPv6 is
/// not there at all, which is as good as off.
pub(crate) fn set_ipv6_disabled(name: &str, disabled: bool) -> Result<(), NetlinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, if disabled { "1\n" } else { "0\n" }) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetlinkError::Io {
            what: format!(
                "{} IPv6 on {name} ({path})",
                if disabled { "disable" } else { "enable" }
            ),
            cause: source,
        }),
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

pub(crate) fn check_ifname(what: &str, role: &str, name: &str) -> Result<(), NetlinkError> {
    let problem = if name.is_empty() {
        Some(format!("{role} is empty"))
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "{role} {name:?} is longer than {MAX_IFNAME_LEN} bytes"
        ))
    } else if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        Some(format!("{role} {name:?} is not a valid interface name"))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(NetlinkError::InvalidArgument {
            what: what.to_string(),
            problem,
        }),
        None => Ok(()),
    }
}

fn check_prefixes(what: &str, addrs: &[(IpAddr, u8)]) -> Result<(), NetlinkError> {
    for &(ip, prefix) in addrs {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(NetlinkError::InvalidArgument {
                what: what.to_string(),
                problem: format!("prefix length of {ip}/{prefix} is over {max}"),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running rtnetlink from blocking code
// ---------------------------------------------------------------------------

/// Run `work` with a fresh rtnetlink connection on the current thread, which must
/// not be inside a tokio runtime (a namespace thread from [`netns::run_in`] or a
/// thread from [`on_netlink_thread`]).
fn with_connection<T, F, Fut>(work: F) -> Result<T, NetlinkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetlinkError::Io {
            what: "start a runtime for rtnetlink".into(),
            cause: source,
        })?;
    runtime.block_on(async move {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Io {
                what: "open an rtnetlink socket".into(),
                cause: source,
            })?;
        let driver = tokio::spawn(connection);
        let result = work(handle).await;
        driver.abort();
        result
    })
}

/// Run `work` on a fresh thread (which stays in the caller's namespace) with its
/// own runtime and rtnetlink connection, and wait for it.
pub(crate) fn on_netlink_thread<T, F, Fut>(what: String, work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let thread = std::thread::Builder::new()
        .name("rtnetlink".into())
        .spawn(move || with_connection(work))
        .map_err(|source| NetlinkError::Io {
            what: format!("{what}: start a thread"),
            cause: source,
        })?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ---------------------------------------------------------------------------
// Error plumbing
// ---------------------------------------------------------------------------

/// The positive errno of a kernel refusal.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

pub(crate) fn kernel(what: String, e: rtnetlink::Error) -> NetlinkError {
    match errno_of(&e) {
        Some(errno) => NetlinkError::Kernel {
            what,
            cause: io::Error::from_raw_os_error(errno),
        },
        None => NetlinkError::Protocol { what, cause: e },
    }
}

pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, NetlinkError>;
}

impl<T> Context<T> for Result<T, rtnetlink::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, NetlinkError> {
        self.map_err(|e| kernel(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its sources, as anyhow's `{:#}` prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(s) = next {
            out += &format!(": {s}");
            next = s.source();
        }
        out
    }

    #[test]
    fn a_cause_is_printed_once() {
        let rofs = || io::Error::from_raw_os_error(libc::EROFS);
        let text = rofs().to_string();
        let errors = [
            NetlinkError::Io { what: "set /proc/sys/x to 1".into(), cause: rofs() },
            NetlinkError::Kernel { what: "add link".into(), cause: rofs() },
            NetlinkError::Netns {
                what: "attach ethwe to netns c1".into(),
                cause: NetnsError::Open { label: "netns c1".into(), path: "/run/netns/c1".into(), cause: rofs() },
            },
        ];
        for e in &errors {
            let c = chain(e);
            assert_eq!(c.matches(&text).count(), 1, "{c}");
        }
        assert_eq!(errors[0].errno(), Some(libc::EROFS));
    }

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(check_ifname("t", "n", "ethwe").is_ok());
        assert!(check_ifname("t", "n", "123456789012345").is_ok());
        for bad in ["", "1234567890123456", "a/b", "a:b", "a b", ".", ".."] {
            assert!(
                matches!(
                    check_ifname("t", "n", bad),
                    Err(NetlinkError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
        let err = check_ifname(
            "attach ethwe to netns c1",
            "bridge name",
            "a-very-long-bridge",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "attach ethwe to netns c1: bridge name \"a-very-long-bridge\" is longer than 15 bytes"
        );
    }

    #[test]
    fn prefixes_are_checked_per_family() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(check_prefixes("t", &[(v4, 32), (v6, 128)]).is_ok());
        assert!(check_prefixes("t", &[(v4, 33)]).is_err());
        assert!(check_prefixes("t", &[(v6, 129)]).is_err());
    }

    #[test]
    fn temp_names_fit_and_differ() {
        let a = temp_ifname();
        let b = temp_ifname();
        assert!(a.len() <= MAX_IFNAME_LEN && b.len() <= MAX_IFNAME_LEN);
        assert_ne!(a, b);
        assert!(check_ifname("t", "n", &a).is_ok());
    }

    #[test]
    fn temp_names_are_told_from_others() {
        assert!(is_temp_ifname(&temp_ifname()));
        assert!(is_temp_ifname("mnt13a-4"));
        for other in ["ethwe", "mnt", "mnt-1", "mnt12-", "mntx-1", "vmn0000b38", "eth0-1"] {
            assert!(!is_temp_ifname(other), "{other}");
        }
    }

    #[test]
    fn kernel_errors_carry_errno() {
        let msg = {
            let mut m = rtnetlink::packet_core::ErrorMessage::default();
            m.code = std::num::NonZeroI32::new(-libc::ENODEV);
            m
        };
        let err = kernel("look up link x".into(), rtnetlink::Error::NetlinkError(msg));
        assert_eq!(err.errno(), Some(libc::ENODEV));
        assert!(err.to_string().starts_with("look up link x: "), "{err}");
    }
}
