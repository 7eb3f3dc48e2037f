//! The router's port on the bridge, whichever kind it is: the forwarding threads
//! read units from it and write units into it through [`Device`].
//!
//! - [`Datapath::Tap`] (default): a TAP with a virtio-net header and offloads, so
//!   units may be superframes ([`crate::tap`]).
//! - [`Datapath::Pcap`]: a veth pair, one end on the bridge, libpcap capturing
//!   on the other and injecting into it ([`crate::capture`]). Plain frames only.
//!
//! A `match` per call is the whole cost of the indirection: the TAP's methods
//! are called as they are, with no copy.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;

use crate::capture::CaptureDevice;
use crate::tap::Tap;

/// How the router exchanges frames with the local bridge (`meshnet launch --datapath`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Datapath {
    /// A TAP with the virtio-net header: superframes and offloads.
    #[default]
    Tap,
    /// libpcap on a veth pair: plain frames, Weave's original capture mode.
    Pcap,
}

impl Datapath {
    pub const ALL: [Datapath; 2] = [Datapath::Tap, Datapath::Pcap];

    pub fn as_str(self) -> &'static str {
        match self {
            Datapath::Tap => "tap",
            Datapath::Pcap => "pcap",
        }
    }
}

impl fmt::Display for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Datapath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Datapath::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("unknown datapath {s:?}: tap or pcap"))
    }
}

/// The open port on the bridge.
#[derive(Debug)]
pub enum Device {
    Tap(Tap),
    Capture(CaptureDevice),
}

impl From<Tap> for Device {
    fn from(t: Tap) -> Self {
        Device::Tap(t)
    }
}

impl From<CaptureDevice> for Device {
    fn from(c: CaptureDevice) -> Self {
        Device::Capture(c)
    }
}

impl Device {
    pub fn datapath(&self) -> Datapath {
        match self {
            Device::Tap(_) => Datapath::Tap,
            Device::Capture(_) => Datapath::Pcap,
        }
    }

    /// The name of the interface on the bridge side of us (the TAP, or the
    /// veth end that is a bridge port).
    pub fn name(&self) -> &str {
        match self {
            Device::Tap(t) => t.name(),
            Device::Capture(c) => c.bridge_end(),
        }
    }

    /// Whether units read and written carry the 10-byte virtio_net_hdr.
    #[inline]
    pub fn vnet_hdr(&self) -> bool {
        match self {
            Device::Tap(t) => t.vnet_hdr(),
            Device::Capture(_) => false,
        }
    }

    /// The descriptor to poll for readability.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Device::Tap(t) => t.raw_fd(),
            Device::Capture(c) => c.raw_fd(),
        }
    }

    /// Reads one unit (a frame alone when not [`vnet_hdr`](Self::vnet_hdr));
    /// Ok(None) when nothing is waiting. Only one thread may read.
    #[inline]
    pub fn read_unit(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Device::Tap(t) => t.read_unit(buf),
            Device::Capture(c) => c.read_frame(buf),
        }
    }

    /// Writes one unit (a frame alone when not [`vnet_hdr`](Self::vnet_hdr)).
    /// Only one thread may write.
    #[inline]
    pub fn write_unit(&self, unit: &[u8]) -> io::Result<usize> {
        match self {
            Device::Tap(t) => t.write_unit(unit),
            Device::Capture(c) => c.write_frame(unit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_names_round_trip() {
        for d in Datapath::ALL {
            assert_eq!(d.to_string().parse::<Datapath>(), Ok(d));
        }
        assert_eq!(Datapath::default(), Datapath::Tap);
        assert!("fastdp".parse::<Datapath>().unwrap_err().contains("tap or pcap"));
    }
}
