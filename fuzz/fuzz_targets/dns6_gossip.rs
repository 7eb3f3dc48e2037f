//! Feeds arbitrary bytes as the body of a `ControlMsg::Dns6` (the IPv6 DNS
//! gossip decoder, with its bounds), merges what decodes into an IPv6 table
//! whose key book holds one peer, answers digests and summaries, and resolves
//! names (and `ip6.arpa` names) made of the input against both tables: nothing
//! may panic, and every record the table holds is a valid name inside the
//! domain. `parse_reverse6` and `reverse_name6` round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::dns::{self, DnsMsg, QueryType, Table, Table6, DEFAULT_DOMAIN};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::wire::control::{decode_message, ControlMsg};
use meshnet_proto::PeerName;

fuzz_target!(|data: &[u8]| {
    // Bincode's tag of ControlMsg::Dns6 (the eleventh variant), then the input.
    let mut body = vec![10u8];
    body.extend_from_slice(data);
    let id = Identity::from_private([7; 32]).expect("fixed key");
    let signer = Signer::from_identity(&id);
    let mut keys = KeyBook::new();
    let _ = keys.admit(&Binding::new(PeerName(1), &id, &signer));
    let mut table = Table6::new(DEFAULT_DOMAIN, PeerName(2));
    if let Ok(ControlMsg::Dns6(msg)) = decode_message(&body) {
        msg.check().expect("decoded messages are within bounds");
        match msg {
            DnsMsg::Sets(sets) => {
                let n = sets.len();
                let report = table.merge(sets, &keys);
                assert!(report.changed.len() + report.stale + report.rejected.len() <= n);
            }
            DnsMsg::Digest(d) => {
                let _ = table.on_digest(1, d, 0);
            }
            DnsMsg::Summary { versions, answer } => {
                let _ = table.on_summary(1, &versions, answer, 0);
            }
        }
    }
    for (_, r) in table.records() {
        assert!(dns::in_domain(&r.name, DEFAULT_DOMAIN));
    }
    let text = String::from_utf8_lossy(data);
    let v4 = Table::new(DEFAULT_DOMAIN, PeerName(2));
    for q in [QueryType::Aaaa, QueryType::Ptr, QueryType::A] {
        let _ = dns::resolve(&v4, &table, &text, q, data.len());
    }
    if let Some(a) = dns::parse_reverse6(&text) {
        assert_eq!(dns::parse_reverse6(&dns::reverse_name6(a)), Some(a));
    }
    if data.len() >= 16 {
        let a = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&data[..16]).unwrap());
        assert_eq!(dns::parse_reverse6(&dns::reverse_name6(a)), Some(a));
    }
});
