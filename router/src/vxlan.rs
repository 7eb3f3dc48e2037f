//! The kernel VXLAN device that carries data between trusted peers unencrypted
//! (`--trusted-subnets`), programmed over rtnetlink.
//!
//! Owns the device (`vxm-<bridge>`, one per router, its own UDP port), its
//! settings as a bridge port, and two kinds of forwarding entries per MAC of a
//! trusted peer:
//!
//! * a **bridge** entry, static and sticky (`bridge fdb replace MAC dev vxm-… master
//!   static sticky`): the bridge sends unicast for that MAC to the VXLAN port
//!   instead of the TAP, and learning (an ARP broadcast from the MAC arriving
//!   through the TAP) cannot move it back;
//! * a **VXLAN** entry (`… self permanent dst IP`): the device sends frames for
//!   that MAC to the peer's underlay address.
//!
//! The port has learning and all flooding off, so broadcast, multicast and
//! unknown unicast never take it (they stay on meshnet's encrypted path), and it
//! and the router's own port (TAP or capture veth) are both *isolated*: the
//! bridge never forwards between them, so a frame that came in over one overlay
//! path is never sent out over the other (no loop, no frame twice, and
//! meshnet never learns a remote MAC as local).
//!
//! Every function is blocking (see [`crate::netlink`]). Never runs `ip`.

use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::{InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};

use crate::netlink::{self, Context, NetlinkError};
use meshnet_proto::Mac;

/// The VNI every meshnet VXLAN device uses (one device per router: the port
/// tells meshes apart, the VNI only has to match).
pub const VNI: u32 = 0x6d_6e;

/// NUD_NOARP | NUD_REACHABLE: what `bridge fdb … static` asks for.
const STATIC: u16 = 0x40 | 0x02;
/// NUD_PERMANENT.
const PERMANENT: u16 = 0x80;

/// The VXLAN device's name for bridge `bridge` (at most 15 bytes).
pub fn device_name(bridge: &str) -> String {
    let stem: String = bridge.chars().take(11).collect();
    format!("vxm-{stem}")
}

/// What [`create`] makes.
#[derive(Clone, Debug)]
pub struct VxlanSpec {
    pub name: String,
    pub bridge_index: u32,
    /// The router's own bridge port (TAP or capture veth): isolated with the device.
    pub router_port: String,
    /// UDP port (both the one it listens on and the one it sends to).
    pub port: u16,
    pub mtu: u32,
    /// Local underlay address (None: any; the kernel picks the source).
    pub local: Option<Ipv4Addr>,
}

/// Makes the device (deleting a stale one of that name first), puts it on the
/// bridge with learning and flooding off, isolates it and the router's port,
/// and sets it up. Returns its ifindex. On error the device is deleted again.
pub fn create(spec: &VxlanSpec) -> Result<u32, NetlinkError> {
    let what = format!("create VXLAN device {} (UDP {})", spec.name, spec.port);
    netlink::check_ifname(&what, "device name", &spec.name)?;
    remove(&spec.name)?;
    let s = spec.clone();
    let made = netlink::on_netlink_thread(what.clone(), move |h| async move {
        let mut b = LinkVxlan::new(&s.name, VNI).port(s.port).learning(false).mtu(s.mtu);
        if let Some(local) = s.local {
            b = b.local(local);
        }
        h.link().add(b.build()).execute().await.ctx(|| what.clone())?;
        let link = netlink::link_by_name(&h, &s.name)
            .await
            .ctx(|| format!("{what}: look up"))?
            .ok_or_else(|| NetlinkError::NotFound { what: what.clone(), problem: "vanished right after it was created".into() })?;
        let index = link.header.index;
        netlink::set_ipv6_disabled(&s.name, true)?;
        netlink::set_link(&h, LinkUnspec::new_with_index(index).controller(s.bridge_index).build())
            .await
            .ctx(|| format!("put {} on bridge #{}", s.name, s.bridge_index))?;
        let flags = vec![
            InfoBridgePort::Learning(false),
            InfoBridgePort::UnicastFlood(false),
            InfoBridgePort::MulticastFlood(false),
            InfoBridgePort::BroadcastFlood(false),
            InfoBridgePort::Isolated(true),
        ];
        netlink::set_link(&h, port_data(index, flags))
            .await
            .ctx(|| format!("{}: learning and flooding off, isolated", s.name))?;
        let router = netlink::link_by_name(&h, &s.router_port)
            .await
            .ctx(|| format!("{what}: look up {}", s.router_port))?
            .ok_or_else(|| NetlinkError::NotFound { what: what.clone(), problem: format!("no router port {}", s.router_port) })?;
        netlink::set_link(&h, port_data(router.header.index, vec![InfoBridgePort::Isolated(true)]))
            .await
            .ctx(|| format!("isolate {} from {}", s.router_port, s.name))?;
        netlink::set_link(&h, LinkUnspec::new_with_index(index).up().build())
            .await
            .ctx(|| format!("set {} up", s.name))?;
        Ok(index)
    });
    if let Err(e) = &made {
        // The error said is the creation's; a device half made and not removed is logged.
        if let Err(undo) = remove(&spec.name) {
            log::warn!("{} is left behind (making it failed: {e}): {undo}", spec.name);
        }
    }
    made
}

fn port_data(index: u32, flags: Vec<InfoBridgePort>) -> rtnetlink::packet_route::link::LinkMessage {
    let mut msg = LinkUnspec::new_with_index(index).build();
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(flags)),
    ]));
    msg
}

/// Deletes VXLAN device `name` if it exists (a link of that name of another
/// kind is left alone and reported). Returns whether one was deleted.
pub fn remove(name: &str) -> Result<bool, NetlinkError> {
    let what = format!("remove VXLAN device {name}");
    netlink::check_ifname(&what, "device name", name)?;
    let name = name.to_string();
    netlink::on_netlink_thread(what.clone(), move |h| async move {
        let Some(link) = netlink::link_by_name(&h, &name).await.ctx(|| format!("{what}: look up"))? else {
            return Ok(false);
        };
        if !netlink::is_kind(&link, &InfoKind::Vxlan) {
            return Err(NetlinkError::Conflict { what, problem: format!("a link named {name} exists and is not a VXLAN device") });
        }
        netlink::delete_by_name(&h, &name, &what).await
    })
}

fn fdb_message(index: u32, mac: Mac, flags: NeighbourFlags, state: u16) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.flags = flags;
    m.header.state = NeighbourState::from(state);
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

/// Sends frames for `mac` through device `index` to `remote`: the bridge's
/// static sticky entry and the device's own entry (both replaced if present).
pub fn add_fdb(index: u32, mac: Mac, remote: Ipv4Addr) -> Result<(), NetlinkError> {
    let what = format!("forward {} to {remote} through VXLAN #{index}", fmt_mac(&mac));
    netlink::on_netlink_thread(what.clone(), move |h| async move {
        let mut own = h.neighbours().add_bridge(index, &mac).replace();
        *own.message_mut() = fdb_message(index, mac, NeighbourFlags::Own, PERMANENT);
        own.message_mut().attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(remote)));
        own.execute().await.ctx(|| format!("{what}: VXLAN entry"))?;
        let mut master = h.neighbours().add_bridge(index, &mac).replace();
        *master.message_mut() = fdb_message(index, mac, NeighbourFlags::Controller | NeighbourFlags::Sticky, STATIC);
        master.execute().await.ctx(|| format!("{what}: bridge entry"))
    })
}

/// Removes both entries of `mac` on device `index` (missing ones are no error).
pub fn del_fdb(index: u32, mac: Mac) -> Result<(), NetlinkError> {
    let what = format!("stop forwarding {} through VXLAN #{index}", fmt_mac(&mac));
    netlink::on_netlink_thread(what.clone(), move |h| async move {
        for flags in [NeighbourFlags::Controller, NeighbourFlags::Own] {
            let msg = fdb_message(index, mac, flags, 0);
            match h.neighbours().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if matches!(netlink::errno_of(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) => {}
                Err(e) => return Err(netlink::kernel(what.clone(), e)),
            }
        }
        Ok(())
    })
}

/// Packet and byte counters of device `name` (rx packets, rx bytes, tx packets,
/// tx bytes), read from sysfs; None if it does not exist.
pub fn counters(name: &str) -> Option<[u64; 4]> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{f}")).ok()?.trim().parse().ok()
    };
    Some([read("rx_packets")?, read("rx_bytes")?, read("tx_packets")?, read("tx_bytes")?])
}

fn fmt_mac(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel() {
        assert_eq!(device_name("weave"), "vxm-weave");
        let long = device_name("a-very-long-bridge-name");
        assert!(long.len() <= netlink::MAX_IFNAME_LEN, "{long}");
    }
}
