//! Frames (Ethernet) of any shape to `icmp::frag_needed` and
//! `icmp::packet_too_big` with an MTU from the first two bytes. Nothing may
//! panic; a reply is a well-formed frame back to the sender: an IPv4 ICMP
//! type 3 code 4 or an ICMPv6 type 2 code 0 carrying the MTU, no longer than
//! its buffer, whose IP length field matches what was written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::plane::icmp::{frag_needed, packet_too_big, MAX_REPLY, MAX_REPLY_V6};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mtu = u16::from_le_bytes([data[0], data[1]]);
    let frame = &data[2..];
    let mut out = [0u8; MAX_REPLY];
    if let Some(n) = frag_needed(frame, mtu, &mut out) {
        assert!(n <= MAX_REPLY && n >= 14 + 20 + 8);
        assert_eq!(&out[0..6], &frame[6..12]);
        assert_eq!(usize::from(u16::from_be_bytes([out[16], out[17]])), n - 14);
        assert_eq!((out[34], out[35]), (3, 4));
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), mtu);
    }
    let mut out6 = [0u8; MAX_REPLY_V6];
    if let Some(n) = packet_too_big(frame, mtu, &mut out6) {
        assert!(n <= MAX_REPLY_V6 && n >= 14 + 40 + 8);
        assert_eq!(&out6[0..6], &frame[6..12]);
        assert_eq!(&out6[12..14], &[0x86, 0xdd]);
        assert_eq!(usize::from(u16::from_be_bytes([out6[18], out6[19]])), n - 54);
        assert_eq!((out6[54], out6[55]), (2, 0));
        assert_eq!(u32::from_be_bytes([out6[58], out6[59], out6[60], out6[61]]), u32::from(mtu));
    }
});
