//! The DNS server's decisions, sans-I/O: the bytes of one query in, what to do
//! with it out ([`handle`]), and the encoding of replies ([`encode`],
//! [`servfail`]). The server in `control` does the sockets, the counters and
//! the forwarding to the host's resolvers; DNS messages are hickory-proto's,
//! never encoded by hand.
//!
//! What a query gets: names of the tables' domain are answered from the
//! tables (A from the IPv4 one, AAAA from the IPv6 one, PTR of held
//! addresses; another type, the family a name lacks, or a class other than IN
//! an empty NOERROR for a name that exists, NXDOMAIN for one that does not;
//! negative answers carry the domain's SOA); other names, and reverse names of
//! addresses not held, are to be forwarded. A query with EDNS gets an OPT
//! record back (version 0; BADVERS for a higher one). Undecodable bytes and
//! anything but a query are dropped.

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record as DnsRecord, RecordType};

use crate::dns::{in_domain, resolve, Answer, QueryType, Table, Table6};

/// The UDP payload size this server says it takes, in its EDNS record (the
/// size DNS Flag Day 2020 settled on: no fragmentation on common paths).
pub const EDNS_PAYLOAD: u16 = 1232;

/// What one query gets.
#[derive(Debug)]
pub enum Handled {
    /// Not a query (undecodable, or a response): dropped, to be counted as garbage.
    Drop,
    /// A name outside the domain, or the reverse name of an address not held:
    /// the (decoded) query, for the host's resolvers.
    Forward(Message),
    /// Answered from the tables; `nxdomain` when the name does not exist.
    Answer { reply: Message, nxdomain: bool },
    /// Answered with an error before the tables were asked: FORMERR (not one
    /// question), NOTIMP (not a standard query), BADVERS (EDNS version > 0).
    Error(Message),
}

/// Decides what the query in `bytes` gets from the tables `v4` and `v6` (of
/// one domain), answers carrying TTL `ttl`; `turn` rotates the addresses of a
/// name with several (pass a counter).
pub fn handle(bytes: &[u8], v4: &Table, v6: &Table6, ttl: u32, turn: usize) -> Handled {
    let Ok(req) = Message::from_vec(bytes) else {
        return Handled::Drop;
    };
    if req.metadata.message_type != MessageType::Query {
        return Handled::Drop;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.recursion_available = true;
    // EDNS (RFC 6891): a query with an OPT record gets one back, and only
    // version 0 exists; a higher one is answered BADVERS.
    if let Some(asked) = &req.edns {
        let mut opt = Edns::new();
        opt.set_max_payload(EDNS_PAYLOAD).set_version(0).set_dnssec_ok(false);
        resp.set_edns(opt);
        if asked.version() > 0 {
            resp.metadata.response_code = ResponseCode::BADVERS;
            return Handled::Error(resp);
        }
    }
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return Handled::Error(resp);
    }
    let [q] = req.queries.as_slice() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return Handled::Error(resp);
    };
    resp.add_query(q.clone());
    let qname = q.name().to_lowercase().to_ascii();
    let qtype = match q.query_type() {
        RecordType::A => QueryType::A,
        RecordType::AAAA => QueryType::Aaaa,
        RecordType::PTR => QueryType::Ptr,
        _ => QueryType::Other,
    };
    // meshnet's names are of the Internet class: a question of another
    // class (CH, HS) for one gets no IN record, only NOERROR or NXDOMAIN.
    let qtype = if matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) { qtype } else { QueryType::Other };
    let mut nxdomain = false;
    match resolve(v4, v6, &qname, qtype, turn) {
        Answer::Forward => return Handled::Forward(req),
        Answer::Addresses(v) => {
            for a in v {
                resp.add_answer(DnsRecord::from_rdata(q.name().clone(), ttl, RData::A(A(a))));
            }
        }
        Answer::Addresses6(v) => {
            for a in v {
                resp.add_answer(DnsRecord::from_rdata(q.name().clone(), ttl, RData::AAAA(AAAA(a))));
            }
        }
        Answer::Names(v) => {
            for n in v {
                let Ok(name) = Name::from_ascii(&n) else { continue };
                resp.add_answer(DnsRecord::from_rdata(q.name().clone(), ttl, RData::PTR(PTR(name))));
            }
        }
        Answer::NoData => add_soa(&mut resp, v4.domain(), ttl, &qname, q.query_class()),
        Answer::NxDomain => {
            nxdomain = true;
            resp.metadata.response_code = ResponseCode::NXDomain;
            add_soa(&mut resp, v4.domain(), ttl, &qname, q.query_class());
        }
    }
    resp.metadata.authoritative = true;
    Handled::Answer { reply: resp, nxdomain }
}

/// A negative answer (NXDOMAIN, or a name without data of the type asked)
/// for a name of the domain carries the domain's SOA in its authority
/// section (RFC 2308): its minimum, the TTL, is how long a resolver may
/// remember that the name or type is not there.
fn add_soa(resp: &mut Message, domain: &str, ttl: u32, qname: &str, class: DNSClass) {
    if !matches!(class, DNSClass::IN | DNSClass::ANY) || !in_domain(qname, domain) {
        return;
    }
    let (Ok(zone), Ok(rname)) = (Name::from_ascii(domain), Name::from_ascii(format!("hostmaster.{domain}"))) else {
        return;
    };
    // No zone transfers: serial, refresh, retry and expire only fill the record.
    let soa = SOA::new(zone.clone(), rname, 1, 3600, 600, 86400, ttl);
    resp.add_authority(DnsRecord::from_rdata(zone, ttl, RData::SOA(soa)));
}

/// Encodes a reply; over UDP (`max_udp`: what the client takes) one larger
/// than that is truncated (TC set), for the client to ask again over TCP.
pub fn encode(resp: &Message, max_udp: Option<usize>) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    match max_udp {
        Some(max) if bytes.len() > max => resp.truncate().to_vec().ok(),
        _ => Some(bytes),
    }
}

/// SERVFAIL for `req` (its questions echoed): what a forwarded query gets when
/// no upstream answers, or when too many are in flight.
pub fn servfail(req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = ResponseCode::ServFail;
    for q in &req.queries {
        resp.add_query(q.clone());
    }
    resp
}

/// The UDP payload size the client of `req` takes (512 without EDNS).
pub fn max_udp(req: &Message) -> usize {
    (req.max_payload() as usize).max(512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::net::Ipv6Addr;

    use hickory_proto::op::Query;

    use crate::dns::{Record, Record6, DEFAULT_DOMAIN};
    use crate::identity::Identity;
    use crate::trust::Signer;
    use crate::PeerName;

    struct Tables {
        v4: Table,
        v6: Table6,
    }

    /// The tables of one router and the counter `turn` the server passes.
    struct Server {
        tables: RefCell<Tables>,
        turn: Cell<usize>,
        signer: Signer,
        ttl: u32,
    }

    impl Server {
        fn new() -> Server {
            let tables = Tables { v4: Table::new(DEFAULT_DOMAIN, PeerName(1)), v6: Table6::new(DEFAULT_DOMAIN, PeerName(1)) };
            let signer = Signer::from_identity(&Identity::from_private([9; 32]).expect("fixed key"));
            Server { tables: RefCell::new(tables), turn: Cell::new(0), signer, ttl: 7 }
        }

        /// With one record: `db.meshnet.local.` at 10.0.0.1.
        fn with_db() -> Server {
            let dns = Server::new();
            let rec = Record { name: "db.meshnet.local.".into(), addr: "10.0.0.1".parse().unwrap(), target: "t".into() };
            dns.tables.borrow_mut().v4.set_own(vec![rec], 1, &dns.signer).unwrap();
            dns
        }

        fn handle(&self, bytes: &[u8]) -> Handled {
            let turn = self.turn.get();
            self.turn.set(turn + 1);
            let t = self.tables.borrow();
            handle(bytes, &t.v4, &t.v6, self.ttl, turn)
        }
    }

    fn ask(dns: &Server, name: Name, qtype: RecordType) -> Message {
        ask_class(dns, name, qtype, DNSClass::IN)
    }

    fn ask_class(dns: &Server, name: Name, qtype: RecordType, class: DNSClass) -> Message {
        let mut q = Message::query();
        q.metadata.id = 42;
        q.metadata.message_type = MessageType::Query;
        let mut query = Query::query(name, qtype);
        query.set_query_class(class);
        q.add_query(query);
        match dns.handle(&q.to_vec().unwrap()) {
            // Through the wire format and back, as a client sees it.
            Handled::Answer { reply: m, .. } | Handled::Error(m) => Message::from_vec(&m.to_vec().unwrap()).unwrap(),
            Handled::Forward(_) => panic!("forwarded"),
            Handled::Drop => panic!("dropped"),
        }
    }

    /// The server's answers, as hickory encodes and decodes them: AAAA from
    /// the IPv6 table (every address, rotating, the TTL), A from the IPv4 one,
    /// PTR of the `ip6.arpa` name hickory makes of an address, NOERROR with no
    /// data for the family a name lacks, NXDOMAIN for an unknown name.
    #[test]
    fn aaaa_and_ip6_arpa_queries_are_answered() {
        let dns = Server::new();
        {
            let mut t = dns.tables.borrow_mut();
            let r4 = |n: &str, a: &str| Record { name: format!("{n}.meshnet.local."), addr: a.parse().unwrap(), target: "t".into() };
            let r6 = |n: &str, a: &str| Record6 { name: format!("{n}.meshnet.local."), addr: a.parse().unwrap(), target: "t".into() };
            t.v4.set_own(vec![r4("db", "10.0.0.1"), r4("only4", "10.0.0.2")], 1, &dns.signer).unwrap();
            t.v6.set_own(vec![r6("db", "fd32::5"), r6("db", "fd32::6")], 1, &dns.signer).unwrap();
        }
        let db = Name::from_ascii("db.meshnet.local.").unwrap();
        let mut firsts = Vec::new();
        for _ in 0..2 {
            let m = ask(&dns, db.clone(), RecordType::AAAA);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            let got: Vec<Ipv6Addr> = m.answers.iter().map(|r| match &r.data {
                RData::AAAA(a) => a.0,
                other => panic!("{other:?}"),
            }).collect();
            assert!(m.answers.iter().all(|r| r.ttl == 7));
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(sorted, ["fd32::5".parse::<Ipv6Addr>().unwrap(), "fd32::6".parse().unwrap()]);
            firsts.push(got[0]);
        }
        assert_ne!(firsts[0], firsts[1], "rotation");
        let m = ask(&dns, db.clone(), RecordType::A);
        assert!(matches!(&m.answers[..], [r] if r.data == RData::A(A("10.0.0.1".parse().unwrap()))), "{m:?}");
        let m = ask(&dns, Name::from_ascii("only4.meshnet.local.").unwrap(), RecordType::AAAA);
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        let m = ask(&dns, Name::from_ascii("nobody.meshnet.local.").unwrap(), RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // hickory's reverse name of an address is ours, and gets the name.
        let a: Ipv6Addr = "fd32::6".parse().unwrap();
        let reverse = Name::from(a);
        assert_eq!(reverse.to_lowercase().to_ascii(), crate::dns::reverse_name6(a));
        let m = ask(&dns, reverse, RecordType::PTR);
        assert!(matches!(&m.answers[..], [r] if r.data == RData::PTR(PTR(db.clone()))), "{m:?}");
    }

    /// NXDOMAIN, and NOERROR without data for a type a name lacks, carry the
    /// domain's SOA (its minimum the TTL); a positive answer has none.
    #[test]
    fn negative_answers_carry_the_domains_soa() {
        let dns = Server::with_db();
        let soa_of = |m: &Message| match &m.authorities[..] {
            [r] => match &r.data {
                RData::SOA(soa) => Some((r.name.to_ascii(), r.ttl, soa.minimum)),
                _ => None,
            },
            _ => None,
        };
        let ttl = dns.ttl;
        let m = ask(&dns, Name::from_ascii("nobody.meshnet.local.").unwrap(), RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(soa_of(&m), Some(("meshnet.local.".to_string(), ttl, ttl)), "{m:?}");
        let m = ask(&dns, Name::from_ascii("db.meshnet.local.").unwrap(), RecordType::MX);
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(soa_of(&m), Some(("meshnet.local.".to_string(), ttl, ttl)), "{m:?}");
        // A positive answer has none.
        let m = ask(&dns, Name::from_ascii("db.meshnet.local.").unwrap(), RecordType::A);
        assert!(m.answers.len() == 1 && m.authorities.is_empty(), "{m:?}");
    }

    #[test]
    fn edns_is_answered_with_edns_and_an_unknown_version_with_badvers() {
        let dns = Server::new();
        let query = |edns: Option<u8>| {
            let mut q = Message::query();
            q.metadata.id = 7;
            q.add_query(Query::query(Name::from_ascii("nobody.meshnet.local.").unwrap(), RecordType::A));
            if let Some(version) = edns {
                let mut e = Edns::new();
                e.set_max_payload(4096).set_version(version);
                q.set_edns(e);
            }
            match dns.handle(&q.to_vec().unwrap()) {
                Handled::Answer { reply: m, .. } | Handled::Error(m) => Message::from_vec(&m.to_vec().unwrap()).unwrap(),
                _ => panic!("not answered"),
            }
        };
        let m = query(None);
        assert!(m.edns.is_none(), "an OPT record to a client that sent none: {m:?}");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = query(Some(0));
        let e = m.edns.as_ref().expect("an OPT record back");
        assert_eq!((e.version(), e.max_payload(), m.metadata.response_code), (0, EDNS_PAYLOAD, ResponseCode::NXDomain));
        let m = query(Some(1));
        // 16 on the wire (hickory reads 16 back as BADSIG, which shares it).
        assert_eq!(u16::from(m.metadata.response_code), u16::from(ResponseCode::BADVERS), "{m:?}");
        assert_eq!(m.edns.as_ref().map(Edns::version), Some(0));
    }

    /// A question of another class than IN (or ANY) for a name of ours gets
    /// no IN record: NOERROR without data for a name that exists, NXDOMAIN
    /// for one that does not; class ANY is answered as IN.
    #[test]
    fn only_the_internet_class_is_answered_with_records() {
        let dns = Server::with_db();
        let db = Name::from_ascii("db.meshnet.local.").unwrap();
        let reverse = Name::from_ascii("1.0.0.10.in-addr.arpa.").unwrap();
        for class in [DNSClass::CH, DNSClass::HS] {
            let m = ask_class(&dns, db.clone(), RecordType::A, class);
            assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0), "{class:?}: {m:?}");
            // A reverse name of that class is not ours: it goes upstream, as other names do.
            let mut q = Message::query();
            let mut query = Query::query(reverse.clone(), RecordType::PTR);
            query.set_query_class(class);
            q.add_query(query);
            assert!(matches!(dns.handle(&q.to_vec().unwrap()), Handled::Forward(_)), "{class:?}: a reverse name not forwarded");
            let m = ask_class(&dns, Name::from_ascii("nobody.meshnet.local.").unwrap(), RecordType::A, class);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        }
        let m = ask_class(&dns, db.clone(), RecordType::A, DNSClass::ANY);
        assert!(matches!(&m.answers[..], [r] if r.data == RData::A(A("10.0.0.1".parse().unwrap())) && r.dns_class == DNSClass::IN), "{m:?}");
        let m = ask(&dns, reverse, RecordType::PTR);
        assert!(matches!(&m.answers[..], [r] if r.data == RData::PTR(PTR(db.clone()))), "{m:?}");
    }

    /// Garbage, a response and a message too short to be one are dropped;
    /// several questions are FORMERR, another opcode NOTIMP; the reply echoes
    /// the query's ID and question.
    #[test]
    fn what_is_no_query_is_dropped_and_odd_queries_get_errors() {
        let dns = Server::new();
        for bytes in [&b""[..], b"\x00", b"\x12\x34\x01\x00\x00\x01", &[0xff; 40]] {
            assert!(matches!(dns.handle(bytes), Handled::Drop), "{bytes:?}");
        }
        let mut resp = Message::query();
        resp.metadata.message_type = MessageType::Response;
        resp.add_query(Query::query(Name::from_ascii("db.meshnet.local.").unwrap(), RecordType::A));
        assert!(matches!(dns.handle(&resp.to_vec().unwrap()), Handled::Drop));
        let mut two = Message::query();
        two.metadata.id = 99;
        two.add_query(Query::query(Name::from_ascii("a.meshnet.local.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("b.meshnet.local.").unwrap(), RecordType::A));
        match dns.handle(&two.to_vec().unwrap()) {
            Handled::Error(m) => assert_eq!((m.metadata.id, m.metadata.response_code), (99, ResponseCode::FormErr)),
            other => panic!("{other:?}"),
        }
        let mut notify = Message::query();
        notify.metadata.op_code = OpCode::Notify;
        notify.add_query(Query::query(Name::from_ascii("a.meshnet.local.").unwrap(), RecordType::SOA));
        match dns.handle(&notify.to_vec().unwrap()) {
            Handled::Error(m) => assert_eq!(m.metadata.response_code, ResponseCode::NotImp),
            other => panic!("{other:?}"),
        }
        // A reply too large for the client's UDP size comes truncated.
        {
            let mut t = dns.tables.borrow_mut();
            let many = (0..60).map(|i| Record { name: "big.meshnet.local.".into(), addr: std::net::Ipv4Addr::new(10, 0, 1, i), target: "t".into() }).collect();
            t.v4.set_own(many, 1, &dns.signer).unwrap();
        }
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii("big.meshnet.local.").unwrap(), RecordType::A));
        let Handled::Answer { reply, .. } = dns.handle(&q.to_vec().unwrap()) else { panic!("not answered") };
        let whole = encode(&reply, None).unwrap();
        assert!(whole.len() > 512);
        let cut = Message::from_vec(&encode(&reply, Some(max_udp(&q))).unwrap()).unwrap();
        assert!(cut.metadata.truncation && cut.answers.len() < 60, "{cut:?}");
    }
}
