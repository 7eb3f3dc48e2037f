//! Feeds arbitrary bytes as the body of a `ControlMsg::Dns` (the DNS gossip
//! decoder, with its bounds), merges what decodes into a table whose key book
//! holds one peer, answers digests and summaries, and resolves names made of
//! the input: nothing may panic, a refused message changes nothing, and every
//! record the table holds is a valid name inside the domain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::dns::{self, DnsMsg, QueryType, Table, DEFAULT_DOMAIN};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::wire::control::{decode_message, ControlMsg};
use meshnet_proto::PeerName;

fuzz_target!(|data: &[u8]| {
    // Bincode's tag of ControlMsg::Dns (the eighth variant), then the input.
    let mut body = vec![7u8];
    body.extend_from_slice(data);
    let id = Identity::from_private([7; 32]).expect("fixed key");
    let signer = Signer::from_identity(&id);
    let mut keys = KeyBook::new();
    let _ = keys.admit(&Binding::new(PeerName(1), &id, &signer));
    let mut table = Table::new(DEFAULT_DOMAIN, PeerName(2));
    if let Ok(ControlMsg::Dns(msg)) = decode_message(&body) {
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
    if let Ok(n) = dns::normalize_name(&text, DEFAULT_DOMAIN) {
        assert!(dns::in_domain(&n, DEFAULT_DOMAIN) && n.len() <= 254);
    }
    let _ = table.resolve(&text, QueryType::Ptr, data.len());
    let _ = dns::parse_reverse(&text);
});
