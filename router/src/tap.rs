//! The TAP device: meshnet's port on the local bridge.
//!
//! Opened through tun-rs with `IFF_VNET_HDR` and TUNSETOFFLOAD (CSUM|TSO4|TSO6,
//! plus USO4|USO6 when the kernel takes them), so the kernel hands us and takes
//! from us *units*: a 10-byte `virtio_net_hdr` followed by a frame of up to
//! 64 KiB that may be a GSO superframe (gso_type/gso_size in the header say how
//! to cut it). meshnet carries units whole; segmentation, if ever needed,
//! happens in the kernel at the far end.
//!
//! tun-rs's `SyncDevice::recv`/`send` are plain `read(2)`/`write(2)` on the
//! descriptor: the virtio header is passed through raw. (Only its
//! `recv_multiple`/`send_multiple` split and coalesce GSO, and we do not use them.)
//!
//! This module owns the descriptor; the device disappears when the [`Tap`] is
//! dropped (it is not persistent). It never reads or writes frames on its own.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tun_rs::{DeviceBuilder, Layer, SyncDevice};

use crate::netlink::{self, NetlinkError, PortConfig, MAX_IFNAME_LEN};

/// Length of the `virtio_net_hdr` that leads every unit when [`Tap::vnet_hdr`] is true.
pub const VNET_HDR_LEN: usize = 10;

/// Largest unit the kernel hands over: header + a 64 KiB superframe.
pub const MAX_UNIT_LEN: usize = VNET_HDR_LEN + 65535;

/// Transmit queue length for the TAP: deep enough to absorb bursts from the bridge.
const TXQUEUELEN: u32 = 10_000;

/// An open TAP device on the bridge.
pub struct Tap {
    dev: SyncDevice,
    name: String,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.dev.as_raw_fd())
            .field("vnet_hdr", &self.vnet_hdr())
            .finish()
    }
}

impl Tap {
    /// Create (or attach to an existing persistent) TAP `name` in the calling
    /// thread's namespace with offloads on, a non-blocking descriptor, IPv6 off,
    /// and put it on the bridge with ifindex `bridge_index`: promiscuous, up, MTU
    /// `mtu`, txqueuelen 10000. On error the device is closed again.
    pub fn create(name: &str, bridge_index: u32, mtu: u32) -> Result<Tap, NetlinkError> {
        Ok(Self::create_queues(name, bridge_index, mtu, 1)?.remove(0))
    }

    /// [`create`](Self::create) with `queues` queues: more than one opens the
    /// device with `IFF_MULTI_QUEUE` and one descriptor per queue (the kernel
    /// picks a frame's queue by its flow, so a flow stays on one queue). The
    /// first [`Tap`] owns the device; all go together.
    pub fn create_queues(name: &str, bridge_index: u32, mtu: u32, queues: usize) -> Result<Vec<Tap>, NetlinkError> {
        let what = format!("open TAP {name}");
        if name.is_empty() || name.len() > MAX_IFNAME_LEN {
            return Err(NetlinkError::InvalidArgument {
                what,
                problem: format!("name {name:?} must be 1 to {MAX_IFNAME_LEN} bytes"),
            });
        }
        let io_err = |what: String| move |source: io::Error| NetlinkError::Io { what, cause: source };
        let dev = DeviceBuilder::new()
            .name(name)
            .layer(Layer::L2)
            .offload(true)
            .multi_queue(queues > 1)
            // Up only once IPv6 is off and it is on the bridge (below).
            .enable(false)
            .build_sync()
            .map_err(io_err(what.clone()))?;
        dev.set_nonblocking(true)
            .map_err(io_err(format!("{what}: set non-blocking")))?;
        let tap = Tap {
            dev,
            name: name.to_string(),
        };
        if !tap.vnet_hdr() {
            // tun-rs falls back silently only when IFF_VNET_HDR is compiled out.
            log::warn!("TAP {name}: no virtio-net header; superframes are off");
        }
        let mut taps = vec![tap];
        for q in 1..queues {
            let dev = taps[0].dev.try_clone().map_err(io_err(format!("{what}: queue {q}")))?;
            dev.set_nonblocking(true).map_err(io_err(format!("{what}: queue {q}: set non-blocking")))?;
            taps.push(Tap { dev, name: name.to_string() });
        }
        netlink::set_port(
            name,
            PortConfig {
                bridge_index,
                mtu: Some(mtu),
                promisc: true,
                txqueuelen: Some(TXQUEUELEN),
            },
        )?;
        Ok(taps)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether reads/writes carry the 10-byte virtio_net_hdr.
    pub fn vnet_hdr(&self) -> bool {
        self.dev.tcp_gso()
    }

    /// Whether the kernel took USO4/USO6 too (UDP superframes, Linux ≥ 6.2).
    pub fn udp_gso(&self) -> bool {
        self.dev.udp_gso()
    }

    /// The descriptor, for polling. It stays owned by the `Tap`.
    pub fn raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    /// One read of one unit (virtio hdr + frame when vnet_hdr) into buf; Ok(None)
    /// on EAGAIN. `buf` should hold [`MAX_UNIT_LEN`] bytes, or a unit is cut short.
    pub fn read_unit(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.dev.recv(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write one unit as read (virtio hdr + frame). A full queue is
    /// `ErrorKind::WouldBlock`.
    pub fn write_unit(&self, unit: &[u8]) -> io::Result<usize> {
        loop {
            match self.dev.send(unit) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.raw_fd()
    }
}
