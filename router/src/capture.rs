//! The capture datapath (`meshnet launch --datapath pcap`): Weave's original way
//! of joining the bridge, kept as an option.
//!
//! Instead of a TAP, the router makes a veth pair: one end (`<bridge>-pbr`) is a
//! port of the bridge, and libpcap listens on the other (`<bridge>-pcap`):
//! promiscuous, immediate mode (every frame handed over at once, no buffering
//! timeout), direction In (only what the bridge sends us, not what we inject),
//! a snapshot length that takes whole 64 KiB frames. Frames from peers are
//! injected on that same end with `pcap_sendpacket`, through a second handle
//! whose filter keeps nothing, so the kernel copies no frame to it.
//!
//! Frames are plain: no virtio header, no offloads. Transmit offloads are off on
//! both veth ends ([`crate::ethtool`]), so the kernel segments and checksums
//! whatever the bridge forwards to us before we see it; `attach` also turns them
//! off inside containers ([`plain_frames_only`]), as Weave did with `ethtool -K
//! ethwe tx off`. A frame longer than the snapshot length (a superframe that got
//! through anyway) is dropped and counted.
//!
//! Each pcap handle is used by one thread only (the TX thread reads, the RX
//! thread writes); the mutex around each makes that safe to express and is never
//! contended. The veth pair is deleted when the device is dropped.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pcap::{Active, Capture, Direction};

use crate::ethtool;
use crate::netlink::{self, NetlinkError, MAX_IFNAME_LEN};
use crate::netns::{self, Netns};

/// Snapshot length: whole frames of up to 64 KiB and then some.
pub const SNAPLEN: i32 = 262_144;
/// Kernel buffer of the capturing handle.
const CAPTURE_BUFFER: i32 = 16 << 20;

/// The veth ends for a bridge: (capture end, bridge end), at most 15 bytes each.
pub fn veth_names(bridge: &str) -> (String, String) {
    let stem: String = bridge.chars().take(MAX_IFNAME_LEN - 5).collect();
    (format!("{stem}-pcap"), format!("{stem}-pbr"))
}

/// The capture device: a veth pair, and libpcap on its far end.
pub struct CaptureDevice {
    capture_end: String,
    bridge_end: String,
    reader: Mutex<Capture<Active>>,
    writer: Mutex<Capture<Active>>,
    fd: RawFd,
    /// Frames captured cut short (longer than the snapshot length or the buffer).
    truncated: AtomicU64,
}

impl std::fmt::Debug for CaptureDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureDevice")
            .field("capture_end", &self.capture_end)
            .field("bridge_end", &self.bridge_end)
            .field("fd", &self.fd)
            .finish()
    }
}

fn pcap_err(what: String) -> impl FnOnce(pcap::Error) -> NetlinkError {
    move |e| NetlinkError::Io { what, cause: io::Error::other(e.to_string()) }
}

impl CaptureDevice {
    /// Makes the veth pair for `bridge` (ifindex `bridge_index`) with MTU `mtu`,
    /// offloads off, and opens the capturing and the injecting handle on it.
    /// On error nothing is left behind.
    pub fn create(bridge: &str, bridge_index: u32, mtu: u32) -> Result<CaptureDevice, NetlinkError> {
        let (capture_end, bridge_end) = veth_names(bridge);
        netlink::create_veth_port(&capture_end, &bridge_end, bridge_index, mtu)?;
        match Self::open(&capture_end, &bridge_end) {
            Ok(dev) => Ok(dev),
            Err(e) => {
                netlink::clean_up_link(&capture_end, "the capture device could not be opened");
                Err(e)
            }
        }
    }

    fn open(capture_end: &str, bridge_end: &str) -> Result<CaptureDevice, NetlinkError> {
        let io_err = |what: String| move |source: io::Error| NetlinkError::Io { what, cause: source };
        for end in [bridge_end, capture_end] {
            ethtool::disable_offloads(end).map_err(io_err(format!("switch offloads off on {end}")))?;
        }
        let what = format!("capture on {capture_end}");
        let reader = Capture::from_device(capture_end)
            .map_err(pcap_err(what.clone()))?
            .promisc(true)
            .immediate_mode(true)
            .snaplen(SNAPLEN)
            .buffer_size(CAPTURE_BUFFER)
            .open()
            .map_err(pcap_err(what.clone()))?
            .setnonblock()
            .map_err(pcap_err(what.clone()))?;
        reader.direction(Direction::In).map_err(pcap_err(format!("{what}: direction in")))?;
        let fd = reader.as_raw_fd();

        let what = format!("inject on {capture_end}");
        let mut writer = Capture::from_device(capture_end)
            .map_err(pcap_err(what.clone()))?
            .snaplen(64)
            .open()
            .map_err(pcap_err(what.clone()))?;
        // This handle only sends: keep no frame for it (BPF "len <= 1" matches none).
        writer.filter("less 1", true).map_err(pcap_err(format!("{what}: filter")))?;
        Ok(CaptureDevice {
            capture_end: capture_end.to_string(),
            bridge_end: bridge_end.to_string(),
            reader: Mutex::new(reader),
            writer: Mutex::new(writer),
            fd,
            truncated: AtomicU64::new(0),
        })
    }

    /// The end libpcap captures on.
    pub fn capture_end(&self) -> &str {
        &self.capture_end
    }

    /// The end that is a port of the bridge.
    pub fn bridge_end(&self) -> &str {
        &self.bridge_end
    }

    /// The capturing handle's descriptor, for polling.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Frames dropped because they were captured cut short.
    pub fn truncated(&self) -> u64 {
        self.truncated.load(Ordering::Relaxed)
    }

    /// One captured frame into `buf`; Ok(None) when none is waiting. A frame cut
    /// short (by the snapshot length or `buf`) is dropped, counted, and the next
    /// one read.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match reader.next_packet() {
                Ok(p) => {
                    let n = p.data.len();
                    if p.header.len as usize != n || n > buf.len() {
                        if self.truncated.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                            log::warn!(
                                "{}: dropped a captured frame of {} bytes: a superframe? (are offloads on somewhere on the bridge?)",
                                self.capture_end,
                                p.header.len
                            );
                        }
                        continue;
                    }
                    buf[..n].copy_from_slice(p.data);
                    return Ok(Some(n));
                }
                Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => return Ok(None),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }

    /// Injects one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.sendpacket(frame).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(frame.len())
    }
}

impl Drop for CaptureDevice {
    fn drop(&mut self) {
        if let Err(e) = netlink::delete_link(&self.capture_end) {
            log::warn!("removing {}: {e}", self.capture_end);
        }
    }
}

/// For the capture datapath: turns transmit offloads off on `ifname` inside
/// `target`, so what the container sends is plain, checksummed frames.
pub fn plain_frames_only(target: &Netns, ifname: &str) -> Result<(), NetlinkError> {
    let name = ifname.to_string();
    let what = format!("switch offloads off on {ifname} in {}", target.label);
    let result = netns::run_in(target, move || ethtool::disable_offloads(&name))
        .map_err(|source| NetlinkError::Netns { what: what.clone(), cause: source })?;
    result.map_err(|source| NetlinkError::Io { what, cause: source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit() {
        assert_eq!(veth_names("meshnet"), ("meshnet-pcap".to_string(), "meshnet-pbr".to_string()));
        let (a, b) = veth_names("a-very-long-bridge");
        assert!(a.len() <= MAX_IFNAME_LEN && b.len() <= MAX_IFNAME_LEN, "{a} {b}");
        assert_ne!(a, b);
    }
}
