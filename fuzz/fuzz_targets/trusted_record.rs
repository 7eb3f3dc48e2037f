//! Feeds arbitrary bytes as the body of a `ControlMsg::Trusted` (a peer's
//! trusted-subnets record, with its bounds), verifies what decodes against a
//! fixed peer and key, and decides the data mode with addresses made of the
//! input; also parses the input as `--trusted-subnets`. Nothing may panic, a
//! record that does not verify is never used, and a decision for the kernel
//! path always means mutual trust.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::Signer;
use meshnet_proto::trusted::{self, DataMode, Sides};
use meshnet_proto::wire::control::{decode_message, ControlMsg};
use meshnet_proto::PeerName;

fuzz_target!(|data: &[u8]| {
    // Bincode's tag of ControlMsg::Trusted (the ninth variant), then the input.
    let mut body = vec![8u8];
    body.extend_from_slice(data);
    let id = Identity::from_private([7; 32]).expect("fixed key");
    let key = Signer::from_identity(&id).public();
    let ours = trusted::parse_list("10.0.0.0/8,fd00::/8").expect("fixed list");
    let (local, remote) = match data {
        [a, b, c, d, e, f, g, h, ..] => (IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)), IpAddr::V4(Ipv4Addr::new(*e, *f, *g, *h))),
        _ => (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
    };
    if let Ok(ControlMsg::Trusted(rec)) = decode_message(&body) {
        rec.check().expect("decoded records are within bounds");
        // Nobody but the fixed key's owner could have signed it: never accepted.
        if let Ok(r) = rec.verify(PeerName(1), &key) {
            panic!("a record nobody signed verified: {r:?}");
        }
        let their_userspace = data.get(8).is_some_and(|b| b & 1 != 0);
        let mode = trusted::decide(Sides { ours: &ours, our_kernel: true, local, remote, theirs: Some(&rec.record), their_userspace });
        if mode == DataMode::TrustedKernel || mode.unsealed() {
            assert!(trusted::trusts(&ours, remote) && trusted::trusts(&rec.record.subnets, local));
        }
        if mode.unsealed() {
            assert!(their_userspace, "unsealed to a peer that does not take it");
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(list) = trusted::parse_list(&text) {
        assert!(list.len() <= trusted::MAX_SUBNETS && list.iter().all(|s| s.is_valid()));
    }
});
