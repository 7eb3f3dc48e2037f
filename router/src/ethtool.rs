//! Transmit offloads off through the ethtool ioctl (`SIOCETHTOOL`), in the
//! calling thread's namespace: what `ethtool -K IF tx off tso off gso off gro
//! off ...` does, without the tool.
//!
//! The capture datapath needs it: libpcap sees an skb as the stack built it, so
//! a device that may hand it superframes or partial checksums must not. A
//! device without these features gets frames segmented and checksummed in
//! software *before* its transmit, including frames the bridge forwards to it.
//!
//! Features are found by name, as `ethtool -K` does (`ETHTOOL_GSTRINGS` of the
//! feature set, then `ETHTOOL_SFEATURES`): every `tx-checksum-*` and every
//! `*-segmentation` feature (TSO, TSO6, ECN/AccECN TSO, USO, GSO, ...) and
//! `rx-gro`, whatever this kernel has. The legacy per-feature ioctls miss the
//! newer ones (USO, AccECN segmentation).

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;
/// More feature words than any kernel has (NETDEV_FEATURE_COUNT is < 100).
const MAX_WORDS: usize = 8;

/// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit).
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

struct Sock(libc::c_int);

impl Sock {
    fn new() -> io::Result<Sock> {
        // SAFETY: plain syscall; the descriptor is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Sock(fd))
    }

    /// SIOCETHTOOL on `ifname` with `buf` as the command structure (its first
    /// u32 is the command). Returns the ioctl's non-negative result.
    ///
    /// # Safety
    /// `buf` must be as large as the kernel will write for that command.
    unsafe fn call(&self, ifname: &str, buf: *mut libc::c_void) -> io::Result<libc::c_int> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {ifname:?}")));
        }
        let mut req = IfreqData { name: [0; libc::IFNAMSIZ], data: buf, _pad: [0; 16] };
        for (d, s) in req.name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: the ifreq lives until the call returns; the caller vouches for buf.
        let rc = unsafe { libc::ioctl(self.0, SIOCETHTOOL as _, &mut req as *mut IfreqData) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc)
    }

    /// The names of the device features, by bit.
    fn feature_names(&self, ifname: &str) -> io::Result<Vec<String>> {
        // struct ethtool_sset_info { u32 cmd, reserved; u64 sset_mask; u32 data[1]; }
        // as three u64 words: (cmd, reserved), sset_mask, (data[0], padding).
        let mut info = [u64::from_ne_bytes(pack_u32s(ETHTOOL_GSSET_INFO, 0)), 1 << ETH_SS_FEATURES, 0];
        // SAFETY: one string set asked for: the kernel writes one u32 of data.
        unsafe { self.call(ifname, info.as_mut_ptr() as *mut libc::c_void)? };
        if info[1] & (1 << ETH_SS_FEATURES) == 0 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("{ifname}: no feature names")));
        }
        let [a, b, c, d, ..] = info[2].to_ne_bytes();
        let count = u32::from_ne_bytes([a, b, c, d]) as usize;
        if count == 0 || count > MAX_WORDS * 32 {
            return Err(io::Error::other(format!("{ifname}: {count} features")));
        }
        // struct ethtool_gstrings { u32 cmd, string_set, len; u8 data[]; }
        let mut buf = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
        buf[0] = ETHTOOL_GSTRINGS;
        buf[1] = ETH_SS_FEATURES;
        buf[2] = count as u32;
        // SAFETY: room for `count` strings, the count the kernel just gave.
        unsafe { self.call(ifname, buf.as_mut_ptr() as *mut libc::c_void)? };
        let n = (buf[2] as usize).min(count);
        let bytes: Vec<u8> = buf[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(bytes
            .chunks(ETH_GSTRING_LEN)
            .take(n)
            .map(|s| String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]).into_owned())
            .collect())
    }

    /// (words, active bits) of the device features.
    fn active(&self, ifname: &str) -> io::Result<(usize, [u32; MAX_WORDS])> {
        // struct ethtool_gfeatures { u32 cmd, size; { u32 available, requested, active, never_changed } features[]; }
        let mut buf = [0u32; 2 + 4 * MAX_WORDS];
        buf[0] = ETHTOOL_GFEATURES;
        buf[1] = MAX_WORDS as u32;
        // SAFETY: the kernel writes at most `size` (MAX_WORDS) blocks.
        unsafe { self.call(ifname, buf.as_mut_ptr() as *mut libc::c_void)? };
        let words = buf[1] as usize;
        if words == 0 || words > MAX_WORDS {
            return Err(io::Error::other(format!("{ifname}: {words} feature words")));
        }
        let mut active = [0u32; MAX_WORDS];
        for (i, a) in active.iter_mut().enumerate().take(words) {
            *a = buf[2 + 4 * i + 2];
        }
        Ok((words, active))
    }

    /// Clears the features whose bits are set in `off`.
    fn clear(&self, ifname: &str, words: usize, off: &[u32; MAX_WORDS]) -> io::Result<()> {
        // struct ethtool_sfeatures { u32 cmd, size; { u32 valid, requested; } features[]; }
        let mut buf = [0u32; 2 + 2 * MAX_WORDS];
        buf[0] = ETHTOOL_SFEATURES;
        buf[1] = words as u32;
        for i in 0..words {
            buf[2 + 2 * i] = off[i];
        }
        // SAFETY: the kernel reads `size` blocks, which the buffer holds.
        unsafe { self.call(ifname, buf.as_mut_ptr() as *mut libc::c_void)? };
        Ok(())
    }
}

fn pack_u32s(a: u32, b: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&a.to_ne_bytes());
    out[4..].copy_from_slice(&b.to_ne_bytes());
    out
}

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// Whether a feature of this name must be off for plain frames.
fn must_be_off(name: &str) -> bool {
    name.starts_with("tx-checksum-") || name.ends_with("-segmentation") || name == "rx-gro" || name == "tx-gso-list"
}

/// Switches every transmit checksum and segmentation offload, and GRO, off on
/// `ifname` (in the calling thread's namespace), then checks they are off. An
/// error names the features that stayed on.
pub fn disable_offloads(ifname: &str) -> io::Result<()> {
    let sock = Sock::new()?;
    let names = sock.feature_names(ifname)?;
    let (words, _) = sock.active(ifname)?;
    let mut off = [0u32; MAX_WORDS];
    for (bit, name) in names.iter().enumerate().take(words * 32) {
        if must_be_off(name) {
            off[bit / 32] |= 1 << (bit % 32);
        }
    }
    sock.clear(ifname, words, &off)?;
    let still = features_on(&names, words, &sock.active(ifname)?.1, must_be_off);
    if !still.is_empty() {
        return Err(io::Error::other(format!("{ifname}: offloads still on: {}", still.join(", "))));
    }
    Ok(())
}

/// The names of the features that are on for `ifname` among the transmit
/// checksum and segmentation offloads and GRO.
pub fn offloads_on(ifname: &str) -> io::Result<Vec<String>> {
    let sock = Sock::new()?;
    let names = sock.feature_names(ifname)?;
    let (words, active) = sock.active(ifname)?;
    Ok(features_on(&names, words, &active, must_be_off))
}

fn features_on(names: &[String], words: usize, active: &[u32; MAX_WORDS], which: impl Fn(&str) -> bool) -> Vec<String> {
    names
        .iter()
        .enumerate()
        .take(words * 32)
        .filter(|(bit, name)| which(name) && active[bit / 32] & (1 << (bit % 32)) != 0)
        .map(|(_, n)| n.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfreqData>(), 40);
    }

    #[test]
    fn the_right_features_are_chosen() {
        for n in ["tx-checksum-ipv4", "tx-checksum-ip-generic", "tx-tcp-segmentation", "tx-tcp-accecn-segmentation", "tx-udp-segmentation", "tx-generic-segmentation", "rx-gro", "tx-gso-list"] {
            assert!(must_be_off(n), "{n}");
        }
        for n in ["rx-checksum", "tx-scatter-gather", "rx-vlan-hw-parse", "tx-vlan-hw-insert", "rx-gro-list"] {
            assert!(!must_be_off(n), "{n}");
        }
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel() {
        let Ok(sock) = Sock::new() else { return };
        for name in ["", "sixteen-bytes-xx", "a\0b"] {
            assert_eq!(sock.feature_names(name).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        // A missing device is the kernel's ENODEV.
        assert_eq!(offloads_on("mn-no-such-if").unwrap_err().raw_os_error(), Some(libc::ENODEV));
    }

    /// Loopback has the features to look at in every namespace (read only).
    #[test]
    fn loopback_features_can_be_read() {
        let Ok(sock) = Sock::new() else { return };
        let names = sock.feature_names("lo").unwrap();
        assert!(names.iter().any(|n| n == "tx-tcp-segmentation"), "{names:?}");
        let (words, _) = sock.active("lo").unwrap();
        assert_eq!(words, names.len().div_ceil(32));
    }
}
