//! The local API between the `meshnet` CLI and its router: one JSON request and
//! one JSON response per connection on the Unix socket in the state directory
//! (mode 0600, so only root — or the state directory's owner — can drive it).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::state::StateDir;

/// Longest request or response line accepted.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Connect { peers: Vec<String>, replace: bool },
    Forget { peers: Vec<String> },
    /// `target`: netns name, PID, Docker container, or a namespace path
    /// (`/var/run/netns/NAME`, `/proc/PID/ns/net`); `ifname`: the interface
    /// inside it (default `ethwe`).
    Attach {
        target: String,
        cidrs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ifname: Option<String>,
        /// Leave out the `224.0.0.0/4` route through the interface.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        no_multicast_route: bool,
        /// Do not register a Docker container's names in meshnet DNS (kept
        /// with the attachment: not when the router attaches it again either).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        without_dns: bool,
        /// Rewrite a Docker container's `/etc/hosts`: its host name at its
        /// addresses, and `add_hosts` (HOST:IP); kept with the attachment.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rewrite_hosts: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        add_hosts: Vec<String>,
        /// Hairpin mode on the bridge port (pods: a pod reaches itself through its Service).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hairpin: bool,
    },
    Detach { target: String, cidrs: Vec<String> },
    /// Give this host addresses on the overlay (`cidrs` in `attach`'s forms;
    /// none: one in the default subnet). Idempotent. Answers `addresses`.
    /// `masquerade`: `None` keeps an exposed address's setting (new ones masquerade).
    Expose {
        cidrs: Vec<String>,
        #[serde(default)]
        masquerade: Option<bool>,
        /// A DNS name for the exposed addresses (`expose -h NAME`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Take exposed addresses away again (all when `cidrs` is empty). Answers `hidden`.
    Hide { cidrs: Vec<String> },
    Ps,
    /// `Ps` of the attachments `targets` name, under any spelling (name, namespace
    /// path, PID or `/proc/PID/ns/net`, Docker name, ID or ID prefix).
    PsOf { targets: Vec<String> },
    /// Ranges per owner, free space, unreachable peers' space.
    IpamStatus,
    /// Take over a dead peer's address ranges.
    Rmpeer { peer: String },
    /// Start IPAM consensus if needed; answers whether the ring is agreed.
    Prime,
    /// Register NAME for TARGET (a netns, PID, Docker container or namespace
    /// path) with `addrs`; none: the target's attached addresses. An empty
    /// TARGET: `addrs` for no target (`dns-add ADDR... -h NAME`). No NAME: a
    /// Docker container's host name when it is in the domain, else its name
    /// (refused for other targets). Answers `name`, `added`.
    DnsAdd {
        target: String,
        #[serde(default)]
        addrs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Remove this router's records of TARGET (of `name` and `addrs` when given);
    /// an empty TARGET: the records added for no target. Answers `removed`.
    DnsRemove {
        target: String,
        #[serde(default)]
        addrs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The addresses of NAME in the table (as the server answers an A query).
    DnsLookup { name: String },
    /// The records of every router, the listen address, counters.
    DnsStatus,
    Stop,
    /// Stop and remove every device and interface this router made.
    Reset,
    /// Everything the router knows in one document (see `crate::report`).
    Report,
}

/// Request options that a router of an older build does not know: it would
/// skip them as unknown fields and do the rest, silently without them (a CLI
/// replaced by a newer build while the router still runs the older one, as in
/// an upgrade one host at a time). A router lists the ones it takes in
/// [`Status::features`], and [`call`] does not send a request that needs one
/// the router does not list. Add an option here when a request gains one that
/// must not be silently ignored.
pub const FEATURES: &[&str] = &["attach --without-dns", "attach --rewrite-hosts"];

impl Request {
    /// The [`FEATURES`] this request needs the router to take.
    pub fn needs(&self) -> Vec<&'static str> {
        match self {
            Request::Attach { without_dns, rewrite_hosts, add_hosts, .. } => {
                let mut v = Vec::new();
                if *without_dns {
                    v.push(FEATURES[0]);
                }
                if *rewrite_hosts || !add_hosts.is_empty() {
                    v.push(FEATURES[1]);
                }
                v
            }
            _ => Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub nickname: String,
    pub uid: u64,
    pub connections: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub peer: Option<String>,
    pub nickname: String,
    pub address: String,
    pub direction: String,
    /// `connecting` (handshake), `pending` (control channel up, UDP heartbeats
    /// not yet working both ways: carries no data), `established`, or, for a
    /// connect target not connected, `retrying` / `failed`.
    pub state: String,
    pub info: String,
    /// How data reaches the peer: `direct`, `relayed` (see `via`), `unreachable`.
    #[serde(default)]
    pub route: String,
    /// The next hop when relayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_nickname: Option<String>,
    /// The largest datagram (UDP payload bytes) the path to the peer carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u32>,
    /// Milliseconds since the peer's last UDP heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms_ago: Option<u64>,
    /// Where datagrams to the peer go (learned from its heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_addr: Option<String>,
    /// The epoch of the data key we send under (0: the handshake's; +1 per rekey).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<u32>,
    /// Seconds since that key was put in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_age_s: Option<u64>,
    /// Round-trip time to the peer in microseconds: the kernel's smoothed RTT
    /// of the control connection (its heartbeats and gossip), read every 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u32>,
    /// How data to the peer travels: `encrypted` or `trusted (kernel)`
    /// (`--trusted-subnets`); empty before the connection is established.
    #[serde(default)]
    pub data: String,
    /// Why it stays encrypted although trusted subnets are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_reason: Option<String>,
}

/// Limits that keep strangers and slow peers from starving the router, and
/// what they refused or closed (`status --json`: `limits`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LimitsStatus {
    /// `--conn-limit`: established connections plus our own dials.
    pub conn_limit: usize,
    pub conn_slots_used: usize,
    /// Accepted connections: handshaking now, admitted, refused by reason,
    /// handshake outcomes (see `meshnet_proto::admission`).
    #[serde(flatten)]
    pub inbound: meshnet_proto::admission::AdmissionStats,
    /// Gossip merged into gossip already queued for a slow peer.
    pub gossip_coalesced: u64,
    /// Connections closed because their send queue overflowed.
    pub closed_queue_full: u64,
    /// Connections closed because a write made no progress for 10 s.
    pub closed_write_timeout: u64,
    /// Connections closed after 35 s without a heartbeat.
    pub closed_no_heartbeat: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub nickname: String,
    pub version: String,
    pub port: u16,
    pub password: bool,
    pub discovery: bool,
    pub bridge: String,
    pub mtu: u32,
    /// `tap` or `pcap` (`meshnet launch --datapath`).
    #[serde(default)]
    pub datapath: String,
    pub peers: Vec<PeerStatus>,
    pub connections: Vec<ConnectionStatus>,
    pub targets: Vec<String>,
    pub dataplane: serde_json::Value,
    #[serde(default)]
    pub limits: LimitsStatus,
    /// Control-plane counters: route recomputations (count, last duration in ms),
    /// discovery dials deferred by the dial budget.
    #[serde(default)]
    pub control: serde_json::Value,
    /// Identities refused and gossip dropped (see [`TrustStatus`]).
    #[serde(default)]
    pub trust: TrustStatus,
    /// This host's addresses on the overlay (`meshnet expose`), as `ip/prefix`.
    #[serde(default)]
    pub exposed: Vec<String>,
    /// `--trusted-subnets` and the kernel VXLAN device.
    #[serde(default)]
    pub trusted: crate::trusted::TrustedStatus,
    /// The request options of [`FEATURES`] this router takes (none listed:
    /// an older build, which ignores them).
    #[serde(default)]
    pub features: Vec<String>,
}

/// What the router refused to believe.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrustStatus {
    /// Names pinned to keys (persisted in `keys.json`).
    pub pinned_keys: usize,
    /// Connections refused because the peer's name and key did not match the
    /// handshake or the key book.
    pub refused_identities: u64,
    /// Connections on which the peer refused our identity.
    pub refused_by_peers: u64,
    /// The latest refusals, newest last (at most 16).
    pub recent_refusals: Vec<Refusal>,
    /// Gossiped topology entries dropped, per reason (`malformed`, `version`,
    /// `bad_binding`, `key_conflict`, `bad_signature`, `full`).
    pub gossip_rejected: std::collections::BTreeMap<String, u64>,
}

/// One refused identity.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Refusal {
    /// `us` (we refused the peer) or `peer` (the peer refused us).
    pub by: String,
    /// The name the other side claimed (ours when `by` is `peer`).
    pub peer: String,
    pub address: String,
    pub reason: String,
    pub seconds_ago: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PsEntry {
    /// netns name, PID, namespace path, or the Docker container's name.
    pub target: String,
    pub kind: String,
    pub mac: String,
    pub addresses: Vec<String>,
    /// Interface inside the target (`ethwe` unless attached with another name).
    #[serde(default)]
    pub interface: String,
    /// Short Docker container ID, for kind "docker".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// Why the CLI could not reach a router. Each message holds its cause, which is
/// therefore not also chained as a `source` (a chain printed with `{:#}` would
/// show it twice).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no router is running for state directory {0} (start one with `meshnet launch`)")]
    NotRunning(String),
    #[error("{0}")]
    Router(String),
    #[error("talking to the router: {0}")]
    Io(std::io::Error),
    #[error("bad answer from the router: {0}")]
    Protocol(String),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// Sends one request to the router of `state` and returns its answer. A
/// request that needs [`FEATURES`] the router does not list (an older build,
/// which would ignore them) is not sent: an error says so.
pub fn call(state: &StateDir, req: &Request, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    let needs = req.needs();
    if !needs.is_empty() {
        let status = exchange(state, &Request::Status, timeout)?;
        let takes: Vec<String> = serde_json::from_value(status["features"].clone()).unwrap_or_default();
        if let Some(missing) = needs.iter().find(|f| !takes.iter().any(|t| t == *f)) {
            return Err(ClientError::Router(older_router(missing)));
        }
    }
    exchange(state, req, timeout)
}

/// What a router of an older build that lacks `what` is told to do.
fn older_router(what: &str) -> String {
    format!(
        "the running router is of an older build, which does not take `{what}` (it would ignore it): \
         nothing was changed; restart the router with this build (`meshnet stop`, then `meshnet launch --resume`) and try again"
    )
}

/// `ps` of the attachments `targets` name (`Request::PsOf`). A router of a
/// build before `PsOf` is asked for every attachment instead, and those whose
/// name or container ID (or its prefix) is one of `targets` are kept, as that
/// build's CLI did.
pub fn ps_of(state: &StateDir, targets: Vec<String>, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    match call(state, &Request::PsOf { targets: targets.clone() }, timeout) {
        Err(ClientError::Router(e)) if e.contains("unknown variant `ps_of`") => {
            let all: Vec<PsEntry> = serde_json::from_value(call(state, &Request::Ps, timeout)?)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let named = |e: &PsEntry, t: &str| {
                e.target == t || e.container_id.as_deref().is_some_and(|id| !t.is_empty() && (id.starts_with(t) || t.starts_with(id)))
            };
            let kept: Vec<&PsEntry> = all.iter().filter(|e| targets.iter().any(|t| named(e, t))).collect();
            serde_json::to_value(kept).map_err(|e| ClientError::Protocol(e.to_string()))
        }
        other => other,
    }
}

/// One request and its answer.
fn exchange(state: &StateDir, req: &Request, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    let path = state.socket();
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(state.root.display().to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(&stream).take(MAX_LINE as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol("router closed the connection".into()));
    }
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Error(e)) => Err(ClientError::Router(e)),
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    }
}


#[cfg(test)]
mod client_error_tests {
    use super::*;

    /// A router on `state`'s socket that answers `answers` to the requests in
    /// turn; returns the requests it got.
    fn fake_router(state: &StateDir, answers: Vec<Response>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = std::os::unix::net::UnixListener::bind(state.socket()).unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for answer in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                got.push(line.trim().to_string());
                let mut out = serde_json::to_vec(&answer).unwrap();
                out.push(b'\n');
                (&stream).write_all(&out).unwrap();
            }
            got
        })
    }

    fn scratch(name: &str) -> StateDir {
        let d = std::env::temp_dir().join(format!("meshnet-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        StateDir::new(d)
    }

    fn attach(without_dns: bool, rewrite_hosts: bool, add_hosts: &[&str]) -> Request {
        Request::Attach {
            target: "web".into(),
            cidrs: vec![],
            ifname: None,
            no_multicast_route: true,
            without_dns,
            rewrite_hosts,
            add_hosts: add_hosts.iter().map(|h| h.to_string()).collect(),
            hairpin: false,
        }
    }

    #[test]
    fn options_a_router_does_not_list_are_not_sent() {
        assert!(attach(false, false, &[]).needs().is_empty());
        assert_eq!(attach(true, false, &[]).needs(), ["attach --without-dns"]);
        assert_eq!(attach(false, false, &["h:10.0.0.1"]).needs(), ["attach --rewrite-hosts"]);
        // An older router: its status lists no features. Only the status is asked.
        let s = scratch("older");
        let router = fake_router(&s, vec![Response::Ok(serde_json::json!({"name": "02:00:00:00:00:01"}))]);
        let e = call(&s, &attach(true, true, &[]), Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("older build") && e.contains("`attach --without-dns`") && e.contains("nothing was changed"), "{e}");
        let got = router.join().unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("\"status\""), "{got:?}");
        let _ = std::fs::remove_dir_all(&s.root);
        // A router that lists them gets the request.
        let s = scratch("newer");
        let router = fake_router(
            &s,
            vec![Response::Ok(serde_json::json!({"features": FEATURES})), Response::Ok(serde_json::json!({"addresses": ["10.32.0.1/12"]}))],
        );
        call(&s, &attach(true, true, &["h:10.0.0.1"]), Duration::from_secs(5)).unwrap();
        let got = router.join().unwrap();
        assert!(got[1].contains("\"without_dns\":true") && got[1].contains("\"add_hosts\""), "{got:?}");
        let _ = std::fs::remove_dir_all(&s.root);
    }

    #[test]
    fn ps_of_a_router_before_ps_of_filters_its_ps() {
        let s = scratch("psof");
        let entry = |target: &str, id: Option<&str>| {
            serde_json::json!({"target": target, "kind": "netns", "mac": "02:00:00:00:00:01", "addresses": ["10.32.0.1/12"], "container_id": id})
        };
        let router = fake_router(
            &s,
            vec![
                Response::Error("bad request: unknown variant `ps_of`, expected one of `status`, `ps` at line 1 column 13".into()),
                Response::Ok(serde_json::json!([entry("a", None), entry("web", Some("3f4e5d6c7b8a")), entry("b", None)])),
            ],
        );
        let v = ps_of(&s, vec!["a".into(), "3f4e".into()], Duration::from_secs(5)).unwrap();
        let targets: Vec<&str> = v.as_array().unwrap().iter().map(|e| e["target"].as_str().unwrap()).collect();
        assert_eq!(targets, ["a", "web"]);
        assert_eq!(router.join().unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&s.root);
    }

    #[test]
    fn an_io_cause_is_printed_once() {
        let e = ClientError::from(std::io::Error::from_raw_os_error(libc::EROFS));
        let text = format!("{:#}", anyhow::Error::new(e).context("status"));
        assert_eq!(text.matches("Read-only file system").count(), 1, "{text}");
        assert!(text.starts_with("status: talking to the router: Read-only file system"), "{text}");
    }
}
