//! Feeds arbitrary bytes to the DNS server as one query (what a container, or
//! anyone on the overlay, sends to port 53), from tables holding names of
//! both families: nothing may panic; a reply echoes the query's ID and is a
//! response; an answer from the tables holds only records of the name asked,
//! a name the tables answer for; and every reply encodes, within the client's UDP size when asked
//! (truncated) and whole for TCP, and decodes again.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use meshnet_proto::dns::{self, Record, Record6, Table, Table6, DEFAULT_DOMAIN};
use meshnet_proto::dns_server::{encode, handle, max_udp, Handled};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::Signer;
use meshnet_proto::PeerName;

fuzz_target!(|data: &[u8]| {
    let signer = Signer::from_identity(&Identity::from_private([7; 32]).expect("fixed key"));
    let mut v4 = Table::new(DEFAULT_DOMAIN, PeerName(1));
    let mut v6 = Table6::new(DEFAULT_DOMAIN, PeerName(1));
    let r4 = |n: &str, a: [u8; 4]| Record { name: format!("{n}.{DEFAULT_DOMAIN}"), addr: Ipv4Addr::from(a), target: "t".into() };
    let r6 = |n: &str, a: u128| Record6 { name: format!("{n}.{DEFAULT_DOMAIN}"), addr: Ipv6Addr::from(a), target: "t".into() };
    let many: Vec<Record> = (0..40).map(|i| r4("big", [10, 32, 1, i])).chain([r4("db", [10, 32, 0, 1])]).collect();
    v4.set_own(many, 1, &signer).expect("valid records");
    v6.set_own(vec![r6("db", 0xfd32 << 112 | 5), r6("only6", 0xfd32 << 112 | 6)], 1, &signer).expect("valid records");

    let turn = data.first().copied().unwrap_or(0) as usize;
    let req = Message::from_vec(data).ok();
    let reply = match handle(data, &v4, &v6, 1, turn) {
        Handled::Drop => {
            assert!(req.as_ref().is_none_or(|r| r.metadata.message_type != MessageType::Query));
            return;
        }
        Handled::Forward(q) => {
            assert_eq!(q.metadata.message_type, MessageType::Query);
            return;
        }
        Handled::Answer { reply, .. } => {
            // Records of the name asked (one of the domain, a single label the
            // tables hold under it, or a reverse name of a held address).
            let q = reply.queries.first().expect("an answer echoes its question");
            let asked = q.name().to_lowercase().to_ascii();
            assert!(dns::in_domain(&asked, DEFAULT_DOMAIN) || asked.ends_with(".arpa.") || asked.matches('.').count() == 1);
            for r in &reply.answers {
                assert_eq!(&r.name, q.name());
            }
            reply
        }
        Handled::Error(reply) => reply,
    };
    let req = req.expect("a query that was answered decodes");
    assert_eq!(reply.metadata.id, req.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    let max = max_udp(&req);
    if let Some(bytes) = encode(&reply, Some(max)) {
        assert!(bytes.len() <= max, "a UDP reply over the client's size");
        let back = Message::from_vec(&bytes).expect("our reply decodes");
        assert_eq!(back.metadata.id, req.metadata.id);
    }
    if let Some(bytes) = encode(&reply, None) {
        Message::from_vec(&bytes).expect("our reply decodes");
    }
});
