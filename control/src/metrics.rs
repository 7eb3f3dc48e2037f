//! The observability port (`meshnet launch --metrics-addr`, default
//! 127.0.0.1:6782): Prometheus metrics at `/metrics`, the mesh as JSON at
//! `/api/mesh`, and the live map (an embedded page) at `/`.
//!
//! Everything served is read-only: no request changes any state. Only `GET`
//! and `HEAD` of those three paths are answered (anything else gets 404 or
//! 405); request bodies are never read. Connections are bounded
//! ([`MAX_CONNECTIONS`] at once, each closed after [`CONNECTION_TIMEOUT`], the
//! request head within [`HEADER_TIMEOUT`]), and the work of an answer runs on
//! a blocking thread, so a flood or a slow client costs the router's
//! forwarding threads and control tasks nothing.
//!
//! Counters are read at scrape time: the data plane's per-peer counters
//! (`meshnet_router::traffic`, one writer thread each), the control plane's
//! and IPAM's, and gauges computed from the current topology.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use meshnet_proto::PeerName;
use prometheus_client::encoding::{EncodeGaugeValue, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{Atomic, Gauge};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::mesh::Mesh;

/// Default `--metrics-addr` (Weave's metrics port, on loopback only).
pub const DEFAULT_ADDR: &str = "127.0.0.1:6782";
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection is closed this long after it was accepted, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// The request head must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The live map: one self-contained page, no assets from elsewhere.
const MAP_HTML: &str = include_str!("map.html");

/// What the port reads, besides the mesh: filled in by the daemon.
pub struct Sources {
    pub mesh: Arc<Mesh>,
    /// The host's exposed addresses (`meshnet expose`).
    pub exposed: Box<dyn Fn() -> Vec<String> + Send + Sync>,
}

/// Serves the port until the task is aborted.
pub async fn serve(src: Arc<Sources>, listener: TcpListener) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::debug!("metrics port: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let src = src.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| answer(src.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(io, service);
            // Too slow, or kept alive too long: closed, whatever it was doing.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

async fn answer(src: Arc<Sources>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let head_only = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head_only {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are served\n"));
    }
    let path = req.uri().path().to_string();
    // Prometheus asks for OpenMetrics; anything else (curl, promtool, older
    // scrapers) gets the classic text format 0.0.4.
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let page = match path.as_str() {
        "/metrics" | "/api/mesh" => {
            let json = path == "/api/mesh";
            let built = tokio::task::spawn_blocking(move || match json {
                true => serde_json::to_vec(&mesh_view(&src)).map_err(|e| e.to_string()),
                false => encode_metrics(&src)
                    .map(|t| if openmetrics { t } else { classic_text(&t) })
                    .map(String::into_bytes)
                    .map_err(|e| e.to_string()),
            })
            .await;
            match built {
                Ok(Ok(body)) => {
                    let kind = match (json, openmetrics) {
                        (true, _) => "application/json",
                        (false, true) => "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        (false, false) => "text/plain; version=0.0.4; charset=utf-8",
                    };
                    (StatusCode::OK, kind, Bytes::from(body))
                }
                Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", Bytes::from(e)),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", Bytes::from(e.to_string())),
            }
        }
        "/" | "/index.html" => (StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(MAP_HTML.as_bytes())),
        _ => return Ok(plain(StatusCode::NOT_FOUND, "not found: this port serves /, /metrics and /api/mesh\n")),
    };
    let (status, kind, body) = page;
    let body = if head_only { Bytes::new() } else { body };
    Ok(Response::builder()
        .status(status)
        .header("content-type", kind)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(body))
        .expect("static headers are valid"))
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("static headers are valid")
}

/// The mesh as the map (and `report`) show it.
#[derive(Clone, Debug, Serialize)]
pub struct MeshView {
    pub me: String,
    pub nickname: String,
    pub peers: Vec<PeerView>,
    /// Every connection some peer gossips, once per pair, plus this router's own.
    pub edges: Vec<EdgeView>,
    /// Per direct peer: bytes so far (the page turns them into rates).
    pub traffic: Vec<TrafficView>,
    pub ipam: IpamView,
    /// The IPv6 ring, where there is one (sizes saturate at 2^64 - 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipam6: Option<IpamView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub name: String,
    pub nickname: String,
    /// `me`, `direct`, `relayed` (see `via`) or `unreachable`.
    pub route: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EdgeView {
    pub a: String,
    pub b: String,
    /// `direct` (both ends list it established), `pending` (not yet carrying
    /// data), or `relayed` (this router reaches `b` through `via`).
    pub kind: String,
    /// Why it looks the way it does, for the hover text.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrafficView {
    pub peer: String,
    pub nickname: String,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub relayed_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IpamView {
    pub range: String,
    pub agreed: bool,
    pub owners: Vec<OwnerView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OwnerView {
    pub peer: String,
    pub nickname: String,
    pub size: u64,
    pub free: u64,
    pub reachable: bool,
}

/// Builds the view from the topology, routes, connections, counters and IPAM.
pub fn mesh_view(src: &Sources) -> MeshView {
    let mesh = &src.mesh;
    let me = mesh.settings.me;
    let conns = mesh.connection_status();
    let traffic = mesh.dataplane.traffic.snapshot();
    let ipam = mesh.with_ipam(|h| h.ipam.status());
    let ipam6 = mesh.with_ipam_for(true, |h| h.ipam.status());
    let g = mesh.lock();
    let nick = |p: PeerName| g.topology.get(p).map(|i| i.nickname.clone()).unwrap_or_default();
    let mut peers = Vec::new();
    for p in g.topology.peers() {
        let (route, via) = if p.name == me {
            ("me", None)
        } else {
            match g.next_hop.get(&p.name) {
                Some(&h) if h == p.name => ("direct", None),
                Some(&h) => ("relayed", Some(h)),
                None => ("unreachable", None),
            }
        };
        peers.push(PeerView {
            name: p.name.to_string(),
            nickname: p.nickname.clone(),
            route: route.into(),
            via: via.map(|h| h.to_string()),
        });
    }
    if !peers.iter().any(|p| p.route == "me") {
        peers.push(PeerView { name: me.to_string(), nickname: mesh.settings.nickname.clone(), route: "me".into(), via: None });
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    // Gossiped connections, once per pair: direct when both ends list it established.
    let mut pairs: BTreeMap<(PeerName, PeerName), (bool, bool)> = BTreeMap::new();
    for p in g.topology.peers() {
        for c in &p.connections {
            let key = if p.name < c.peer { (p.name, c.peer) } else { (c.peer, p.name) };
            let e = pairs.entry(key).or_insert((false, false));
            if p.name == key.0 {
                e.0 = c.established;
            } else {
                e.1 = c.established;
            }
        }
    }
    let mut edges = Vec::new();
    for ((a, b), (ea, eb)) in pairs {
        let (kind, reason) = match (ea, eb) {
            (true, true) => ("direct", "established: UDP works both ways".to_string()),
            (true, false) | (false, true) => {
                let (yes, no) = if ea { (a, b) } else { (b, a) };
                ("pending", format!("{}({}) lists it established, {}({}) not yet", yes, nick(yes), no, nick(no)))
            }
            (false, false) => ("pending", "handshake done, UDP heartbeats not working both ways yet".to_string()),
        };
        edges.push(EdgeView { a: a.to_string(), b: b.to_string(), kind: kind.into(), reason });
    }
    // Our own connections that carry no data, with the reason we know.
    for c in conns.iter().filter(|c| c.route == "relayed" || (c.state == "pending" && c.peer.is_some())) {
        let Some(peer) = c.peer.clone() else { continue };
        let (kind, reason) = match &c.via {
            Some(v) => ("relayed", format!("relayed via {v}({}): {}", c.via_nickname.clone().unwrap_or_default(), c.info)),
            None => ("pending", c.info.clone()),
        };
        let mine = me.to_string();
        edges.retain(|e| !((e.a == mine && e.b == peer) || (e.b == mine && e.a == peer)));
        edges.push(EdgeView { a: mine, b: peer, kind: kind.into(), reason });
    }
    let traffic = traffic
        .into_iter()
        .map(|(p, t)| TrafficView {
            peer: p.to_string(),
            nickname: nick(p),
            tx_bytes: t.tx_bytes,
            rx_bytes: t.rx_bytes,
            relayed_bytes: t.relayed_bytes,
        })
        .collect();
    let ring = |st: &meshnet_proto::ipam::IpamStatus| IpamView {
        range: st.universe.to_string(),
        agreed: matches!(st.state, meshnet_proto::ipam::RingState::Agreed { .. }),
        owners: st
            .owners
            .iter()
            .map(|o| OwnerView {
                peer: o.peer.to_string(),
                nickname: nick(o.peer),
                size: u64::try_from(o.size).unwrap_or(u64::MAX),
                free: u64::try_from(o.free).unwrap_or(u64::MAX),
                reachable: o.reachable,
            })
            .collect(),
    };
    let (ipam, ipam6) = (ring(&ipam), ipam6.as_ref().map(ring));
    MeshView { me: me.to_string(), nickname: mesh.settings.nickname.clone(), peers, edges, traffic, ipam, ipam6 }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    nickname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerReasonLabels {
    peer: String,
    nickname: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerRouteLabels {
    peer: String,
    nickname: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabels {
    family: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyReasonLabels {
    family: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// A counter family, registered, filled by the caller.
fn counters<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauges<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Gauge>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64, AtomicU64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The connection states `status` shows; every one is always exported.
pub const CONNECTION_STATES: [&str; 5] = ["established", "pending", "connecting", "retrying", "failed"];

/// `/metrics`: the Prometheus text (OpenMetrics) exposition, made afresh from
/// the current counters at every scrape.
pub fn encode_metrics(src: &Sources) -> Result<String, std::fmt::Error> {
    let mesh = &src.mesh;
    let mut reg = Registry::default();
    let conns = mesh.connection_status();
    let peers = mesh.peer_status();
    let nicknames: BTreeMap<String, String> = peers.iter().map(|p| (p.name.clone(), p.nickname.clone())).collect();
    let labels = |p: PeerName| PeerLabels { peer: p.to_string(), nickname: label_value(nicknames.get(&p.to_string()).map_or("", |n| n.as_str())) };

    // Connections and peers.
    let by_state = gauges::<StateLabels>(&mut reg, "meshnet_connections", "Connections and connect targets by state (established, pending, connecting, retrying, failed)");
    for s in CONNECTION_STATES {
        by_state.get_or_create(&StateLabels { state: s.into() }).set(conns.iter().filter(|c| c.state == s).count() as i64);
    }
    gauge(&mut reg, "meshnet_peers", "Peers known in the topology, this router included", peers.len() as i64);
    gauge(&mut reg, "meshnet_targets", "Persisted connect targets", mesh.targets().len() as i64);
    let reachable = mesh.lock().next_hop.len();
    gauge(&mut reg, "meshnet_reachable_peers", "Peers this router has a route to (not counting itself)", reachable as i64);

    // Per direct peer: traffic, drops, path, route.
    let sent_bytes = counters::<PeerLabels>(&mut reg, "meshnet_peer_sent_bytes", "UDP payload bytes sent to the peer (data, heartbeats and relayed units)");
    let recv_bytes = counters::<PeerLabels>(&mut reg, "meshnet_peer_received_bytes", "UDP payload bytes received from the peer that authenticated");
    let sent_dgrams = counters::<PeerLabels>(&mut reg, "meshnet_peer_sent_datagrams", "UDP datagrams sent to the peer");
    let recv_dgrams = counters::<PeerLabels>(&mut reg, "meshnet_peer_received_datagrams", "UDP datagrams received from the peer that authenticated");
    let relayed_bytes = counters::<PeerLabels>(&mut reg, "meshnet_peer_relayed_bytes", "Bytes of other peers' units this router relayed to the peer");
    let drops = counters::<PeerReasonLabels>(&mut reg, "meshnet_peer_dropped_frames", "Frames to or from the peer dropped, by reason");
    for (p, t) in mesh.dataplane.traffic.snapshot() {
        let l = labels(p);
        sent_bytes.get_or_create(&l).inc_by(t.tx_bytes);
        recv_bytes.get_or_create(&l).inc_by(t.rx_bytes);
        sent_dgrams.get_or_create(&l).inc_by(t.tx_datagrams);
        recv_dgrams.get_or_create(&l).inc_by(t.rx_datagrams);
        relayed_bytes.get_or_create(&l).inc_by(t.relayed_bytes);
        for (reason, n) in &t.drops {
            drops.get_or_create(&PeerReasonLabels { peer: l.peer.clone(), nickname: l.nickname.clone(), reason: reason.clone() }).inc_by(*n);
        }
    }
    let mtu = gauges::<PeerLabels>(&mut reg, "meshnet_peer_path_mtu_bytes", "Largest datagram (UDP payload) the path to the direct peer carries");
    let heard = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    reg.register("meshnet_peer_heartbeat_age_seconds", "Seconds since the direct peer's last UDP heartbeat arrived", heard.clone());
    let route = gauges::<PeerRouteLabels>(&mut reg, "meshnet_peer_route", "1 for the way data reaches the peer: direct, relayed or unreachable");
    let key_age = gauges::<PeerLabels>(&mut reg, "meshnet_peer_key_age_seconds", "Seconds since the data key to the peer was put in use");
    let rtt = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    reg.register(
        "meshnet_peer_rtt_seconds",
        "Round-trip time to the direct peer: the kernel's smoothed RTT of the control connection, read at every control heartbeat (10 s)",
        rtt.clone(),
    );
    for c in conns.iter() {
        let Some(name) = c.peer.as_ref() else { continue };
        let l = PeerLabels { peer: name.clone(), nickname: label_value(&c.nickname) };
        if let Some(m) = c.path_mtu {
            mtu.get_or_create(&l).set(m as i64);
        }
        if let Some(ms) = c.heartbeat_ms_ago {
            heard.get_or_create(&l).set(ms as f64 / 1000.0);
        }
        if let Some(a) = c.key_age_s {
            key_age.get_or_create(&l).set(a as i64);
        }
        if let Some(us) = c.rtt_us {
            rtt.get_or_create(&l).set(us as f64 / 1e6);
        }
    }
    {
        let g = mesh.lock();
        for p in g.topology.peers().filter(|p| p.name != mesh.settings.me) {
            let r = match g.next_hop.get(&p.name) {
                Some(&h) if h == p.name => "direct",
                Some(_) => "relayed",
                None => "unreachable",
            };
            for kind in ["direct", "relayed", "unreachable"] {
                let l = PeerRouteLabels { peer: p.name.to_string(), nickname: label_value(&p.nickname), route: kind.into() };
                route.get_or_create(&l).set((kind == r) as i64);
            }
        }
    }

    // Handshakes, refusals, rekeys.
    let limits = mesh.limits_status();
    let i = &limits.inbound;
    let hs = counters::<OutcomeLabels>(&mut reg, "meshnet_inbound_handshakes", "Handshakes of accepted connections by outcome (established, wrong_password, timed_out, failed)");
    for (o, n) in [
        ("established", i.handshakes_established),
        ("wrong_password", i.handshakes_wrong_password),
        ("timed_out", i.handshakes_timed_out),
        ("failed", i.handshakes_failed),
    ] {
        hs.get_or_create(&OutcomeLabels { outcome: o.into() }).inc_by(n);
    }
    let refused = counters::<ReasonLabels>(&mut reg, "meshnet_inbound_connections_refused", "Accepted connections closed before their handshake, by reason");
    for (r, n) in [
        ("rate_limited", i.refused_rate_limited),
        ("password_backoff", i.refused_password_backoff),
        ("pending_full", i.refused_pending_full),
        ("source_pending_full", i.refused_source_pending_full),
        ("conn_limit", i.refused_conn_limit),
    ] {
        refused.get_or_create(&ReasonLabels { reason: r.into() }).inc_by(n);
    }
    let closed = counters::<ReasonLabels>(&mut reg, "meshnet_connections_closed", "Established connections closed because the peer was slow or silent, by reason");
    for (r, n) in [
        ("queue_full", limits.closed_queue_full),
        ("write_timeout", limits.closed_write_timeout),
        ("no_heartbeat", limits.closed_no_heartbeat),
    ] {
        closed.get_or_create(&ReasonLabels { reason: r.into() }).inc_by(n);
    }
    let trust = mesh.trust_status();
    counter(&mut reg, "meshnet_identities_refused", "Connections refused because the peer's name and key did not match", trust.refused_identities);
    counter(&mut reg, "meshnet_identities_refused_by_peers", "Connections on which the peer refused our identity", trust.refused_by_peers);
    let gossip = counters::<ReasonLabels>(&mut reg, "meshnet_gossip_rejected_entries", "Gossiped topology entries dropped, by reason");
    // Every reason, at 0 from the start (`trust_status` lists them all).
    for (r, n) in &trust.gossip_rejected {
        gossip.get_or_create(&ReasonLabels { reason: r.clone() }).inc_by(*n);
    }

    // The data plane's own counters.
    let stats = &mesh.dataplane.stats;
    counter(&mut reg, "meshnet_rekeys", "Data-key rekeys completed (our sending key replaced), all connections", stats.rekeys.load(std::sync::atomic::Ordering::Relaxed));
    let superframes = counters::<DirectionLabels>(&mut reg, "meshnet_superframes", "Superframes (TSO/USO units up to 64 KiB) read from the TAP (tx) or written to it whole (rx)");
    let (tx_superframes, rx_superframes) = mesh.dataplane.superframes();
    superframes.get_or_create(&DirectionLabels { direction: "tx".into() }).inc_by(tx_superframes);
    superframes.get_or_create(&DirectionLabels { direction: "rx".into() }).inc_by(rx_superframes);
    counter(&mut reg, "meshnet_software_segmented_units", "Units (superframes, partial checksums) cut into plain frames in software for peers or devices that take no superframes", stats.total(|s| &s.per_frame.sw_segmented_units));
    counter(&mut reg, "meshnet_software_segmented_frames", "Plain frames those units became", stats.total(|s| &s.per_frame.sw_frames_out));
    let dp = counters::<KindLabels>(&mut reg, "meshnet_dataplane_events", "The data plane's counters of `meshnet status --json` (dataplane), by name");
    for (name, n) in stats.to_json() {
        dp.get_or_create(&KindLabels { kind: name.into() }).inc_by(n);
    }

    // IPAM: the IPv4 ring, and the IPv6 ring where there is one.
    let st = mesh.with_ipam(|h| h.ipam.status());
    ipam_metrics::<i64>(&mut reg, "meshnet_ipam", "", &st, &labels, mesh.settings.me);
    if let Some(st6) = mesh.with_ipam_for(true, |h| h.ipam.status()) {
        ipam_metrics::<f64>(&mut reg, "meshnet_ipam6", " (IPv6 range)", &st6, &labels, mesh.settings.me);
    }

    // DNS.
    let (records, own, owners) = mesh.dns.table().counts();
    gauge(&mut reg, "meshnet_dns_records", "Records in this router's DNS table (every router's)", records as i64);
    gauge(&mut reg, "meshnet_dns_own_records", "DNS records this router registered", own as i64);
    gauge(&mut reg, "meshnet_dns_owners", "Routers whose DNS record sets this router holds", owners as i64);
    gauge(&mut reg, "meshnet_dns_listening", "1 while the DNS server listens", mesh.dns.listening().is_some() as i64);
    let ds = &mesh.dns.stats;
    let load = |a: &AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    counter(&mut reg, "meshnet_dns_queries", "DNS queries the server received (UDP and TCP)", load(&ds.queries));
    let outcomes = counters::<OutcomeLabels>(
        &mut reg,
        "meshnet_dns_query_outcomes",
        "DNS queries by outcome: answered (from the table; nxdomain counts those that were NXDOMAIN), forwarded, forward_failed, dropped_garbage, refused_busy",
    );
    for (o, a) in [
        ("answered", &ds.answered),
        ("nxdomain", &ds.nxdomain),
        ("forwarded", &ds.forwarded),
        ("forward_failed", &ds.forward_failed),
        ("dropped_garbage", &ds.dropped_garbage),
        ("refused_busy", &ds.refused_busy),
    ] {
        outcomes.get_or_create(&OutcomeLabels { outcome: o.into() }).inc_by(load(a));
    }
    let sets = counters::<SetLabels>(&mut reg, "meshnet_dns_record_sets", "Gossiped DNS record sets taken (merged) or not newer than the one held (stale), by family");
    let rejected = counters::<FamilyReasonLabels>(&mut reg, "meshnet_dns_rejected_record_sets", "Gossiped DNS record sets dropped, by family and reason");
    {
        let t = mesh.dns.table();
        for (family, st) in [("ipv4", &t.v4.stats), ("ipv6", &t.v6.stats)] {
            for (o, n) in [("merged", st.sets_merged), ("stale", st.sets_stale)] {
                sets.get_or_create(&SetLabels { family: family.into(), outcome: o.into() }).inc_by(n);
            }
            for r in meshnet_proto::dns::Reject::ALL.map(|r| r.label()) {
                let n = st.sets_rejected.get(r).copied().unwrap_or(0);
                rejected.get_or_create(&FamilyReasonLabels { family: family.into(), reason: r.into() }).inc_by(n);
            }
        }
    }

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// A number of addresses as a gauge holds it: exact integers for the IPv4 ring
/// (whose series are integers since they were first exported), floats for the
/// IPv6 ring, whose sizes (2^64 in a /64) do not fit an `i64`.
trait Addresses: EncodeGaugeValue + Copy + std::fmt::Debug + Send + Sync + 'static {
    type Atomic: Atomic<Self> + Default + std::fmt::Debug + Send + Sync + 'static;
    fn of(n: u128) -> Self;
}

impl Addresses for i64 {
    type Atomic = std::sync::atomic::AtomicI64;
    fn of(n: u128) -> i64 {
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

impl Addresses for f64 {
    type Atomic = AtomicU64;
    fn of(n: u128) -> f64 {
        n as f64
    }
}

/// One ring's gauges, named `PREFIX_...` (`meshnet_ipam`, `meshnet_ipam6`).
fn ipam_metrics<N: Addresses>(
    reg: &mut Registry,
    prefix: &str,
    which: &str,
    st: &meshnet_proto::ipam::IpamStatus,
    labels: &dyn Fn(PeerName) -> PeerLabels,
    me: PeerName,
) {
    let mut one = |name: &str, help: &str, v: u128| {
        let g = Gauge::<N, N::Atomic>::default();
        g.set(N::of(v));
        reg.register(format!("{prefix}_{name}"), format!("{help}{which}"), g);
    };
    one("range_addresses", "Addresses in the IP allocation range", st.universe.size());
    let mine = st.owners.iter().find(|o| o.peer == me);
    one("owned_here_addresses", "Addresses this router owns", mine.map_or(0, |o| o.size));
    one("free_here_addresses", "Free addresses this router owns", mine.map_or(0, |o| o.free));
    one("allocated_addresses", "Addresses allocated by this router", st.allocated as u128);
    one("pending_requests", "Allocation requests waiting here (for consensus, a ring or a donation)", st.pending as u128);
    one("unreachable_addresses", "Addresses owned by peers this router cannot reach", st.unreachable_space);
    one("unreachable_peers", "Peers owning space that this router cannot reach", st.owners.iter().filter(|o| !o.reachable).count() as u128);
    one("conflicting_addresses", "Addresses used here whose claim in the ring failed (another target has them too)", st.conflicts.len() as u128);
    one("ring_agreed", "1 once the allocation ring is agreed", matches!(st.state, meshnet_proto::ipam::RingState::Agreed { .. }) as u128);
    let owned = Family::<PeerLabels, Gauge<N, N::Atomic>>::default();
    reg.register(format!("{prefix}_owned_addresses"), format!("Addresses of the range each peer owns{which}"), owned.clone());
    let free = Family::<PeerLabels, Gauge<N, N::Atomic>>::default();
    reg.register(format!("{prefix}_free_addresses"), format!("Free addresses each peer owns (as it last reported; exact for this router){which}"), free.clone());
    for o in &st.owners {
        let l = labels(o.peer);
        owned.get_or_create(&l).set(N::of(o.size));
        free.get_or_create(&l).set(N::of(o.free));
    }
}

/// A label value as the exposition must carry it: `prometheus-client` (0.24)
/// writes label values as they are, so a nickname (any peer's, from gossip)
/// holding `"`, `\` or a newline would end the value early and make the whole
/// scrape fail. Escaped as both formats (classic and OpenMetrics) want.
fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The OpenMetrics exposition `prometheus-client` writes, in the classic
/// Prometheus text format (0.0.4): there a counter's family is named as its
/// samples are (`x_total`), and there is no `# EOF` or `# UNIT` line.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The `--metrics-addr` value: an address to serve on, or `None` (empty: off).
pub fn parse_addr(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("--metrics-addr {s:?}: give ADDR:PORT (like 127.0.0.1:6782 or [::1]:6782), or an empty value to turn it off"))
}

/// For tests and `report`: text of one metric family from an exposition.
pub fn family_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nickname with a quote, a backslash or a newline comes out escaped
    /// (once) in the exposition: one line per sample, the value intact.
    #[test]
    fn odd_nicknames_are_escaped_in_label_values() {
        let mut reg = Registry::default();
        let g = gauges::<PeerLabels>(&mut reg, "meshnet_test", "test");
        g.get_or_create(&PeerLabels { peer: "p".into(), nickname: label_value("a\"b\\c\nd") }).set(1);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        let text = classic_text(&out);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples, [r#"meshnet_test{peer="p",nickname="a\"b\\c\nd"} 1"#], "{text}");
        assert_eq!(label_value("node-1 (rack 2)"), "node-1 (rack 2)");
    }

    #[test]
    fn metrics_addr_parses_or_turns_off() {
        assert_eq!(parse_addr("").unwrap(), None);
        assert_eq!(parse_addr(DEFAULT_ADDR).unwrap(), Some("127.0.0.1:6782".parse().unwrap()));
        assert_eq!(parse_addr("[::1]:9000").unwrap(), Some("[::1]:9000".parse().unwrap()));
        assert!(parse_addr("localhost").is_err());
        assert!(parse_addr("1.2.3.4").is_err());
    }

    #[test]
    fn the_map_is_self_contained() {
        // Nothing fetched from elsewhere: no external script, style, font or image.
        // (The SVG namespace URI is a name, never fetched.)
        for bad in ["src=\"http", "src=\"//", "href=\"http", "href=\"//", "url(", "@import", "fetch(\"http", "rel=\"stylesheet"] {
            assert!(!MAP_HTML.contains(bad), "the map refers to something outside: {bad}");
        }
        assert!(MAP_HTML.contains("/api/mesh"));
    }

    #[test]
    fn classic_text_names_counter_families_as_their_samples() {
        let om = "# HELP meshnet_rekeys Rekeys.\n# TYPE meshnet_rekeys counter\nmeshnet_rekeys_total 3\n# HELP meshnet_peers Peers.\n# TYPE meshnet_peers gauge\nmeshnet_peers 2\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP meshnet_rekeys_total Rekeys.\n# TYPE meshnet_rekeys_total counter\nmeshnet_rekeys_total 3\n# HELP meshnet_peers Peers.\n# TYPE meshnet_peers gauge\nmeshnet_peers 2\n"
        );
    }

    #[test]
    fn family_lines_match_whole_names() {
        let t = "meshnet_peers 3\nmeshnet_peers_x 1\nmeshnet_peer_sent_bytes_total{peer=\"a\"} 5\n";
        assert_eq!(family_lines(t, "meshnet_peers"), vec!["meshnet_peers 3"]);
        assert_eq!(family_lines(t, "meshnet_peer_sent_bytes_total").len(), 1);
    }
}
