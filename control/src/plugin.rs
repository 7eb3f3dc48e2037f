//! Docker's plugin API: a libnetwork *remote network driver* and a *remote
//! IPAM driver*, both named after the socket (`meshnet`), served as JSON over
//! HTTP on `/run/docker/plugins/meshnet.sock`.
//!
//! What it owns: the plugin's bookkeeping ([`PluginState`]: address pools,
//! networks, endpoints and the IPAM keys of the addresses it handed out),
//! persisted in the state directory (`docker-plugin.json`) after every change,
//! because Docker does not replay its requests after a router restart. What it
//! never does: device or IPAM work of its own. Addresses come from meshnet's
//! IPAM ring, the network's gateway is the host's exposed address in the
//! subnet, and the veth pair is made on the bridge, all through the router
//! ([`PluginHost`], implemented by the daemon); so [`Plugin::handle`] is tested
//! here with a fake host.
//!
//! Docker's calls, in the order a `docker network create --driver meshnet
//! --ipam-driver meshnet --subnet S N` and a `docker run --network N` make them:
//! `IpamDriver.RequestPool` (S, inside the IP allocation range), `RequestAddress`
//! for the gateway, `NetworkDriver.CreateNetwork`; then per container
//! `RequestAddress`, `CreateEndpoint`, `Join` (a veth pair: one end on the
//! bridge, the other handed to Docker by name, which moves it into the
//! container as `ethwe0`), and on stop `Leave`, `DeleteEndpoint`,
//! `ReleaseAddress`. Errors go back as `{"Err": "..."}` (HTTP 500), which
//! Docker shows to the user.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, StatusCode};
use meshnet_proto::ipam::Cidr;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::state::{write_atomic, StateDir};

/// Where Docker looks for plugin sockets.
pub const DEFAULT_DIR: &str = "/run/docker/plugins";
/// The plugin's name, which is both drivers' name (`--driver meshnet --ipam-driver meshnet`).
pub const DEFAULT_NAME: &str = "meshnet";
/// The content type of Docker's plugin protocol.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";
/// Largest request body read.
pub const MAX_BODY: usize = 1 << 20;
/// Docker names the container's interface this plus an index (`ethwe0`).
pub const CONTAINER_IF_PREFIX: &str = "ethwe";
/// The bridge end of an endpoint's veth pair is named this plus the endpoint ID's first 12 characters.
const PORT_PREFIX: &str = "vmd";
/// `RequestAddress` option key saying what the address is for, and its value for a gateway.
const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";
/// Pool IDs are this plus the subnet.
const POOL_PREFIX: &str = "meshnet/";
/// IPAM keys of the addresses the plugin hands out are this plus a sequence number.
pub const IPAM_KEY_PREFIX: &str = "docker-plugin:";
/// How long Docker's plugin client retries a call that found no plugin (or lost
/// its connection): 30 s from its first attempt, then it fails the command.
pub const DOCKER_RETRY: std::time::Duration = std::time::Duration::from_secs(35);

/// What the plugin needs of the router.
pub trait PluginHost: Send + Sync {
    /// The IP allocation range.
    fn range(&self) -> Cidr;
    /// Where addresses come from when a network is created without `--subnet`.
    fn default_subnet(&self) -> Cidr;
    /// Allocates an address of `subnet` for `key` in meshnet's IPAM (`exact`: that one).
    fn allocate(&self, key: &str, subnet: Cidr, exact: Option<Ipv4Addr>) -> Result<Ipv4Addr>;
    /// Returns an address of `key` to IPAM.
    fn free(&self, key: &str, ip: Ipv4Addr);
    /// The host's address in `subnet` (`exact`: that one), exposed on the bridge
    /// if it is not yet: the network's gateway. Says whether it was exposed now.
    fn gateway(&self, subnet: Cidr, exact: Option<Ipv4Addr>) -> Result<(Ipv4Addr, bool)>;
    /// Hides a gateway [`PluginHost::gateway`] exposed.
    fn release_gateway(&self, ip: Ipv4Addr, prefix: u8) -> Result<()>;
    /// A veth pair: `host_if` on the bridge (up), `container_if` left for Docker to move.
    fn create_port(&self, host_if: &str, container_if: &str) -> Result<()>;
    /// Deletes the pair (either end may be gone already).
    fn delete_port(&self, host_if: &str);
    /// The veth ends that are ports of meshnet's bridge (of any naming).
    fn ports(&self) -> Result<Vec<String>>;
    /// A container joined network `net` through endpoint `ep` (the place to
    /// register it by name, e.g. in DNS).
    fn joined(&self, ep_id: &str, ep: &Endpoint, net: &Network);
    /// The container left: undo what [`PluginHost::joined`] did.
    fn left(&self, ep_id: &str, ep: &Endpoint);
}

/// Everything the plugin remembers, persisted in `docker-plugin.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginState {
    /// Address pools by pool ID.
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
    /// Networks by Docker's network ID.
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    /// Endpoints by Docker's endpoint ID.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    /// The next IPAM key's number.
    #[serde(default)]
    pub next_key: u64,
    /// The call being answered (at most one: calls are answered one at a
    /// time), kept until its answer is on its way: a router that stops meanwhile
    /// finds it here at its next start, for Docker's retry of it, which comes
    /// without its request (see [`Plugin::handle`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<Call>,
}

/// A call of Docker's as received, and its answer once its changes are saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Like `NetworkDriver.Join`.
    pub call: String,
    /// The request's JSON.
    pub body: String,
    /// The answer, saved with the changes the call made (`None`: not made yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// The subnet, inside the IP allocation range.
    pub subnet: String,
    /// `--ip-range`: where container addresses come from, inside the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_pool: Option<String>,
    /// Addresses handed out (not the gateway), each with its IPAM key.
    #[serde(default)]
    pub addresses: BTreeMap<String, String>,
    /// The gateway (`ip/prefix`), the host's exposed address in the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Whether the plugin exposed the gateway (and so hides it on release).
    #[serde(default)]
    pub gateway_exposed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Its IPv4 subnet.
    pub subnet: String,
    /// Its gateway (`ip/prefix`), if Docker gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network: String,
    /// `ip/prefix`, as IPAM gave it to Docker.
    pub address: String,
    /// The bridge end of the veth pair.
    pub host_if: String,
    /// The end handed to Docker (renamed `ethwe0` inside the container).
    pub container_if: String,
    /// Whether a container has joined (the veth pair exists).
    #[serde(default)]
    pub joined: bool,
    /// The container's network namespace, as Docker named it in `Join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

impl PluginState {
    /// Every IPAM key the plugin holds addresses under (the router must not
    /// release them as gone at startup).
    pub fn ipam_keys(&self) -> Vec<String> {
        self.pools.values().flat_map(|p| p.addresses.values().cloned()).collect()
    }
}

/// Loads the persisted state (empty when there is none).
pub fn load(state: &StateDir) -> Result<PluginState> {
    let path = state.docker_plugin();
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is corrupt (it holds the Docker plugin's networks and endpoints: move it away to launch without them, then remove and create those networks again)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PluginState::default()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// What the Docker network whose gateway `ip` is, if it is one, says about it
/// (`hide` refuses to hide it: the network's next container would be given
/// the freed address, its own gateway's).
pub fn gateway_of(state: &PluginState, ip: Ipv4Addr) -> Option<String> {
    let pool = state.pools.values().find(|p| p.gateway.as_deref().and_then(parse_ip_prefix).is_some_and(|(g, _)| g == ip))?;
    let network = state.networks.iter().find(|(_, n)| n.subnet == pool.subnet).map(|(id, _)| short(id));
    Some(match network {
        Some(id) => format!("the gateway of Docker network {id} (subnet {}): `docker network rm` it first", pool.subnet),
        None => format!("the gateway of a Docker network being made (subnet {})", pool.subnet),
    })
}

/// The plugin: its state, where it is persisted, and the router behind it.
pub struct Plugin {
    host: Arc<dyn PluginHost>,
    state: Mutex<PluginState>,
    /// The calls a previous router process was answering when it stopped
    /// (taken from the state at start), for Docker's retries of them; with the
    /// time this plugin started (Docker gives up [`DOCKER_RETRY`] after it).
    cut_short: Mutex<Vec<Call>>,
    started: std::time::Instant,
    /// Where the state is saved (`None`: not saved, for tests).
    store: Option<PathBuf>,
    /// The drivers' name (`--docker-plugin-name`), for hints in errors.
    name: String,
}

/// A failed call: the message Docker shows.
type Answer = std::result::Result<Value, String>;

// Docker's requests. Unknown fields are ignored (Docker adds some across
// versions); maps Docker may send as `null` are options.

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RequestPool {
    #[serde(default)]
    pool: String,
    #[serde(default)]
    sub_pool: String,
    #[serde(default, rename = "V6")]
    v6: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PoolRef {
    #[serde(rename = "PoolID")]
    pool_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RequestAddress {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    options: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pool_id: String,
    address: String,
}

#[derive(Deserialize)]
struct IpamData {
    #[serde(rename = "Pool", default)]
    pool: String,
    #[serde(rename = "Gateway", default)]
    gateway: String,
}

#[derive(Deserialize)]
struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "IPv4Data", default)]
    ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data", default)]
    ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Deserialize)]
struct NetworkRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
}

#[derive(Deserialize, Default)]
struct EndpointInterface {
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "AddressIPv6", default)]
    address_ipv6: String,
}

#[derive(Deserialize)]
struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(rename = "Interface", default)]
    interface: Option<EndpointInterface>,
}

#[derive(Deserialize)]
struct EndpointRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
}

#[derive(Deserialize)]
struct Join {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(rename = "SandboxKey", default)]
    sandbox_key: String,
}

fn decode<T: DeserializeOwned>(call: &str, body: &[u8]) -> std::result::Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("meshnet: bad {call} request: {e}"))
}

/// Docker's IDs are 64 hex digits; anything else is refused before it names an interface.
fn check_id(what: &str, id: &str) -> std::result::Result<(), String> {
    if id.len() < 12 || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("meshnet: invalid {what} {id:?}"));
    }
    Ok(())
}

/// `ip/prefix` → the address and prefix.
fn parse_ip_prefix(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, p) = s.split_once('/')?;
    let prefix: u8 = p.parse().ok().filter(|p| *p <= 32)?;
    Some((ip.parse().ok()?, prefix))
}

/// An address as Docker sends it: bare or `ip/prefix`.
fn parse_address(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.parse().ok()
}

impl Plugin {
    /// A plugin over `host` with `state`, saved to `store` after every change.
    pub fn new(host: Arc<dyn PluginHost>, mut state: PluginState, store: Option<PathBuf>) -> Plugin {
        let cut_short = std::mem::take(&mut state.calls);
        Plugin {
            host,
            state: Mutex::new(state),
            cut_short: Mutex::new(cut_short),
            started: std::time::Instant::now(),
            store,
            name: DEFAULT_NAME.to_string(),
        }
    }

    /// The same plugin served as `name` (both drivers' name).
    pub fn named(mut self, name: &str) -> Plugin {
        self.name = name.to_string();
        self
    }

    /// A copy of the current state.
    pub fn state(&self) -> PluginState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn save(&self, s: &PluginState) -> std::result::Result<(), String> {
        let Some(path) = &self.store else { return Ok(()) };
        let mut bytes = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        write_atomic(path, &bytes, 0o600).map_err(|e| format!("meshnet: {e:#}"))
    }

    /// Saves `next` with `answer` as the answer of the call being answered
    /// (the changes and the answer are saved together).
    fn commit(&self, next: &mut PluginState, answer: &Value) -> std::result::Result<(), String> {
        if let Some(c) = next.calls.last_mut().filter(|c| c.answer.is_none()) {
            c.answer = Some(answer.clone());
        }
        self.save(next)
    }

    /// Answers one call (`path` like `/NetworkDriver.Join`) with the JSON body
    /// Docker expects, or the error message Docker shows. One call at a time:
    /// the state is locked for the whole call.
    ///
    /// A call is kept in the state (with its answer once its changes are made)
    /// until it is answered: Docker sends a call again when its connection
    /// breaks (this router stopped while answering it), for up to
    /// [`DOCKER_RETRY`], but without its request (Docker 20.10's plugin client
    /// sends the request body it already read out); such an empty call is
    /// answered as the call that was cut short (its saved answer, or the call
    /// made now), and with an error that says so when there is none, or several.
    pub fn handle(&self, path: &str, body: &[u8]) -> Answer {
        let call = path.trim_start_matches('/');
        let empty = body.iter().all(u8::is_ascii_whitespace);
        if empty && changes_state(call) {
            return self.resent(call);
        }
        if empty && matches!(call, "NetworkDriver.ProgramExternalConnectivity" | "NetworkDriver.RevokeExternalConnectivity") {
            // Nothing to do for any endpoint (see below): the same for the one
            // whose call was cut short.
            return Ok(json!({}));
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        let text = match std::str::from_utf8(body) {
            Ok(t) if changes_state(call) => t,
            _ => return self.dispatch(s, call, body),
        };
        let mut next = s.clone();
        next.calls = vec![Call { call: call.to_string(), body: text.to_string(), answer: None }];
        self.save(&next)?;
        *s = next;
        let answer = self.dispatch(s, call, body);
        let mut next = s.clone();
        next.calls.clear();
        if let Err(e) = self.save(&next) {
            log::warn!("docker plugin: {call} answered, but not noted so: {e}");
        }
        *s = next;
        answer
    }

    /// Docker sent `call` again without its request: answers it as the call of
    /// that name a previous router process was answering when it stopped.
    fn resent(&self, call: &str) -> Answer {
        let found = {
            let mut cut = self.cut_short.lock().unwrap_or_else(|p| p.into_inner());
            let same: Vec<usize> = (0..cut.len()).filter(|i| cut[*i].call == call).collect();
            match same.as_slice() {
                [i] if self.started.elapsed() < DOCKER_RETRY => Some(cut.remove(*i)),
                _ => None,
            }
        };
        let Some(c) = found else {
            return Err(format!(
                "meshnet: Docker sent {call} again without its request (the router stopped while answering it, and Docker resends such a call empty); meshnet has no call of it to answer: nothing was done, run the command again"
            ));
        };
        match c.answer {
            // A join is made again (the same pair, made anew), so the container
            // is registered as joined by this router process too.
            Some(answer) if call != "NetworkDriver.Join" => {
                log::info!("docker plugin: {call}, cut short when the router stopped, sent again: answered as then");
                Ok(answer)
            }
            _ => {
                log::info!("docker plugin: {call}, cut short when the router stopped, sent again: answering it now");
                self.handle(call, c.body.as_bytes())
            }
        }
    }

    /// The endpoints named in calls cut short that Docker may still send again
    /// (until [`DOCKER_RETRY`] after the start).
    fn endpoints_cut_short(&self) -> Vec<String> {
        if self.started.elapsed() >= DOCKER_RETRY {
            return Vec::new();
        }
        let cut = self.cut_short.lock().unwrap_or_else(|p| p.into_inner());
        cut.iter()
            .filter_map(|c| serde_json::from_str::<Value>(&c.body).ok()?.get("EndpointID")?.as_str().map(str::to_string))
            .collect()
    }

    fn dispatch(&self, s: &mut PluginState, call: &str, body: &[u8]) -> Answer {
        match call {
            "Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
            "NetworkDriver.GetCapabilities" => Ok(json!({ "Scope": "local", "ConnectivityScope": "local" })),
            "IpamDriver.GetCapabilities" => Ok(json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })),
            "IpamDriver.GetDefaultAddressSpaces" => {
                Ok(json!({ "LocalDefaultAddressSpace": "meshnet", "GlobalDefaultAddressSpace": "meshnet" }))
            }
            "IpamDriver.RequestPool" => self.request_pool(s, decode(call, body)?),
            "IpamDriver.ReleasePool" => self.release_pool(s, decode(call, body)?),
            "IpamDriver.RequestAddress" => self.request_address(s, decode(call, body)?),
            "IpamDriver.ReleaseAddress" => self.release_address(s, decode(call, body)?),
            "NetworkDriver.CreateNetwork" => self.create_network(s, decode(call, body)?),
            "NetworkDriver.DeleteNetwork" => self.delete_network(s, decode(call, body)?),
            "NetworkDriver.CreateEndpoint" => self.create_endpoint(s, decode(call, body)?),
            "NetworkDriver.DeleteEndpoint" => self.delete_endpoint(s, decode(call, body)?),
            "NetworkDriver.EndpointOperInfo" => {
                let r: EndpointRef = decode(call, body)?;
                let ep = endpoint(s, &r)?;
                Ok(json!({ "Value": { "address": ep.address, "host_interface": ep.host_if, "joined": ep.joined } }))
            }
            "NetworkDriver.Join" => self.join(s, decode(call, body)?),
            "NetworkDriver.Leave" => self.leave(s, decode(call, body)?),
            "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => {
                let _: Value = decode(call, body)?;
                Ok(json!({}))
            }
            "NetworkDriver.ProgramExternalConnectivity" | "NetworkDriver.RevokeExternalConnectivity" => {
                // The gateway is the host's exposed address, masqueraded by
                // meshnet's nftables table: nothing per endpoint to program.
                let r: EndpointRef = decode(call, body)?;
                endpoint(s, &r)?;
                Ok(json!({}))
            }
            // Optional calls of newer engines: not implemented, said the way Docker expects.
            "NetworkDriver.AllocateNetwork" | "NetworkDriver.FreeNetwork" => {
                Err(format!("meshnet: {call} is for swarm-scope drivers; meshnet is a local-scope driver"))
            }
            _ => Err(format!("meshnet: unknown call {call:?}")),
        }
    }

    /// What an IPv4 subnet of a meshnet network may be.
    fn ipv4_hint(&self, range: Cidr) -> String {
        format!(
            "give an IPv4 --subnet inside meshnet's IP allocation range {range}, or none for the default subnet {}",
            self.host.default_subnet()
        )
    }

    fn request_pool(&self, s: &mut PluginState, r: RequestPool) -> Answer {
        let range = self.host.range();
        if r.v6 {
            let asked = if r.pool.is_empty() { String::new() } else { format!(" (asked for IPv6 subnet {})", r.pool) };
            return Err(format!(
                "meshnet: meshnet's IPAM hands out IPv4 addresses only{asked}: leave out --ipv6 and any IPv6 --subnet; {}",
                self.ipv4_hint(range)
            ));
        }
        let subnet: Cidr = if r.pool.is_empty() {
            self.host.default_subnet()
        } else {
            r.pool.parse().map_err(|e| format!("meshnet: invalid subnet {:?}: {e}", r.pool))?
        };
        if !range.contains_net(&subnet) {
            return Err(format!("meshnet: subnet {subnet} is outside meshnet's IP allocation range {range}"));
        }
        let sub_pool = if r.sub_pool.is_empty() {
            None
        } else {
            let c: Cidr = r.sub_pool.parse().map_err(|e| format!("meshnet: invalid --ip-range {:?}: {e}", r.sub_pool))?;
            if !subnet.contains_net(&c) {
                return Err(format!("meshnet: --ip-range {c} is not inside subnet {subnet}"));
            }
            Some(c.to_string())
        };
        let id = format!("{POOL_PREFIX}{subnet}");
        let used_by_a_network = s.networks.values().any(|n| n.subnet.parse::<Cidr>().is_ok_and(|c| c == subnet));
        if s.pools.contains_key(&id) && r.pool.is_empty() && !used_by_a_network {
            // Docker asks again, still holding the pool it was given, when a
            // route of this host overlaps a pool it did not ask for by name
            // (libnetwork's overlap check); the same subnet again cannot help.
            return Err(format!(
                "meshnet: Docker did not take the default subnet {subnet}: without --subnet it refuses a subnet that a route of this host overlaps (an address exposed on meshnet's bridge makes one); create the network with --subnet {subnet} (or another subnet inside {range})"
            ));
        }
        if s.pools.contains_key(&id) {
            return Err(format!(
                "meshnet: subnet {subnet} is already used by another meshnet network on this host (give another with --subnet)"
            ));
        }
        // Two pools that overlap would share addresses: the gateway one exposed
        // and the other took as its own, hidden (and handed to a container)
        // when the first network goes.
        if let Some(other) =
            s.pools.values().find(|p| p.subnet.parse::<Cidr>().is_ok_and(|c| c.contains_net(&subnet) || subnet.contains_net(&c)))
        {
            return Err(format!(
                "meshnet: subnet {subnet} overlaps subnet {} of another meshnet network on this host (give one that does not overlap with --subnet)",
                other.subnet
            ));
        }
        let mut next = s.clone();
        next.pools.insert(id.clone(), Pool { subnet: subnet.to_string(), sub_pool, ..Pool::default() });
        let answer = json!({ "PoolID": id, "Pool": subnet.to_string(), "Data": {} });
        self.commit(&mut next, &answer)?;
        *s = next;
        log::info!("docker plugin: pool {subnet}");
        Ok(answer)
    }

    fn release_pool(&self, s: &mut PluginState, r: PoolRef) -> Answer {
        let Some(pool) = s.pools.get(&r.pool_id).cloned() else {
            return Err(format!("meshnet: unknown pool {:?}", r.pool_id));
        };
        let mut next = s.clone();
        next.pools.remove(&r.pool_id);
        self.commit(&mut next, &json!({}))?;
        *s = next;
        for (ip, key) in &pool.addresses {
            if let Ok(ip) = ip.parse() {
                self.host.free(key, ip);
            }
        }
        self.release_gateway_of(&pool);
        log::info!("docker plugin: released pool {}", pool.subnet);
        Ok(json!({}))
    }

    fn release_gateway_of(&self, pool: &Pool) {
        if let (true, Some((ip, prefix))) = (pool.gateway_exposed, pool.gateway.as_deref().and_then(parse_ip_prefix)) {
            if let Err(e) = self.host.release_gateway(ip, prefix) {
                log::warn!("docker plugin: hiding gateway {ip}/{prefix}: {e:#}");
            }
        }
    }

    fn request_address(&self, s: &mut PluginState, r: RequestAddress) -> Answer {
        let pool = s.pools.get(&r.pool_id).ok_or_else(|| format!("meshnet: unknown pool {:?}", r.pool_id))?;
        let subnet: Cidr = pool.subnet.parse().map_err(|e| format!("meshnet: pool {}: {e}", pool.subnet))?;
        let exact = if r.address.is_empty() {
            None
        } else {
            let ip = parse_address(&r.address).ok_or_else(|| format!("meshnet: invalid address {:?}", r.address))?;
            if !subnet.contains(ip) {
                return Err(format!("meshnet: address {ip} is not in subnet {subnet}"));
            }
            Some(ip)
        };
        let is_gateway = r
            .options
            .as_ref()
            .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
            .and_then(Value::as_str)
            == Some(GATEWAY_TYPE);
        let mut next = s.clone();
        let p = next.pools.get_mut(&r.pool_id).expect("looked up above");
        if is_gateway {
            if p.gateway.is_some() {
                return Err(format!("meshnet: pool {subnet} already has a gateway"));
            }
            let (ip, exposed) = self.host.gateway(subnet, exact).map_err(|e| format!("meshnet: gateway of {subnet}: {e:#}"))?;
            let text = format!("{ip}/{}", subnet.prefix());
            p.gateway = Some(text.clone());
            p.gateway_exposed = exposed;
            let answer = json!({ "Address": text, "Data": {} });
            if let Err(e) = self.commit(&mut next, &answer) {
                if exposed {
                    if let Err(undo) = self.host.release_gateway(ip, subnet.prefix()) {
                        let left = format!("the gateway {ip}/{} stays exposed ({undo:#}): `meshnet hide` it", subnet.prefix());
                        log::error!("docker plugin: undoing a failed gateway request: {left}");
                        return Err(format!("{e}; {left}"));
                    }
                }
                return Err(e);
            }
            *s = next;
            log::info!("docker plugin: gateway of {subnet} is this host's {text}");
            return Ok(answer);
        }
        let from = match (&p.sub_pool, exact) {
            (Some(c), None) => c.parse().unwrap_or(subnet),
            _ => subnet,
        };
        let key = format!("{IPAM_KEY_PREFIX}{}", next.next_key);
        next.next_key += 1;
        let ip = self.host.allocate(&key, from, exact).map_err(|e| format!("meshnet: {e:#}"))?;
        let p = next.pools.get_mut(&r.pool_id).expect("looked up above");
        p.addresses.insert(ip.to_string(), key.clone());
        let answer = json!({ "Address": format!("{ip}/{}", subnet.prefix()), "Data": {} });
        if let Err(e) = self.commit(&mut next, &answer) {
            self.host.free(&key, ip);
            return Err(e);
        }
        *s = next;
        Ok(answer)
    }

    fn release_address(&self, s: &mut PluginState, r: ReleaseAddress) -> Answer {
        let pool = s.pools.get(&r.pool_id).ok_or_else(|| format!("meshnet: unknown pool {:?}", r.pool_id))?;
        let ip = parse_address(&r.address).ok_or_else(|| format!("meshnet: invalid address {:?}", r.address))?;
        let mut next = s.clone();
        let p = next.pools.get_mut(&r.pool_id).expect("looked up above");
        if pool.gateway.as_deref().and_then(parse_ip_prefix).is_some_and(|(g, _)| g == ip) {
            let old = p.clone();
            p.gateway = None;
            p.gateway_exposed = false;
            self.commit(&mut next, &json!({}))?;
            *s = next;
            self.release_gateway_of(&old);
            return Ok(json!({}));
        }
        // Docker releases an address only after it deleted the endpoint that
        // had it: a release of one an endpoint has is a late one (Docker's undo
        // of a command the router's restart cut short, sent after the address
        // went to another container): refused, or that container would lose it.
        let bound = s.endpoints.iter().find(|(_, e)| {
            parse_ip_prefix(&e.address).is_some_and(|(a, _)| a == ip)
                && s.networks.get(&e.network).is_some_and(|n| n.subnet == pool.subnet)
        });
        if let Some((id, _)) = bound {
            return Err(format!(
                "meshnet: address {ip} is not released: endpoint {} still has it (Docker releases an address after deleting its endpoint: a release that came late, after the router restarted?)",
                short(id)
            ));
        }
        let Some(key) = p.addresses.remove(&ip.to_string()) else {
            return Err(format!("meshnet: address {ip} is not allocated in pool {}", pool.subnet));
        };
        // Forget it first: a crash after this leaves the address to be released
        // as unknown at the next start, never handed out twice.
        self.commit(&mut next, &json!({}))?;
        *s = next;
        self.host.free(&key, ip);
        log::info!("docker plugin: released {ip}");
        Ok(json!({}))
    }

    fn create_network(&self, s: &mut PluginState, r: CreateNetwork) -> Answer {
        check_id("network ID", &r.network_id)?;
        if s.networks.contains_key(&r.network_id) {
            return Err(format!("meshnet: network {} exists already", r.network_id));
        }
        let data = r.ipv4_data.unwrap_or_default();
        if let Some(v6) = r.ipv6_data.as_ref().and_then(|v| v.first()) {
            // Say all that stands in the way: a network whose IPv4 subnet did not
            // come from meshnet's IPAM fails next without --ipv6 too.
            let ours = data.iter().all(|d| s.pools.values().any(|p| p.subnet == d.pool));
            let also = if ours {
                String::new()
            } else {
                format!(" and create it with --ipam-driver {}; {}", self.name, self.ipv4_hint(self.host.range()))
            };
            return Err(format!(
                "meshnet: meshnet networks carry IPv4 only (got IPv6 subnet {}): leave out --ipv6 and any IPv6 --subnet{also}",
                v6.pool
            ));
        }
        let [d] = data.as_slice() else {
            return Err(format!("meshnet: a meshnet network has exactly one IPv4 subnet (got {})", data.len()));
        };
        let subnet: Cidr =
            d.pool.parse().map_err(|e| format!("meshnet: invalid subnet {:?}: {e}", d.pool))?;
        if !s.pools.values().any(|p| p.subnet == subnet.to_string()) {
            return Err(format!(
                "meshnet: subnet {subnet} does not come from meshnet's IPAM: create the network with --ipam-driver {}",
                self.name
            ));
        }
        let gateway = (!d.gateway.is_empty()).then(|| d.gateway.clone());
        let mut next = s.clone();
        next.networks.insert(r.network_id.clone(), Network { subnet: subnet.to_string(), gateway });
        self.commit(&mut next, &json!({}))?;
        *s = next;
        log::info!("docker plugin: network {} on {subnet}", short(&r.network_id));
        Ok(json!({}))
    }

    fn delete_network(&self, s: &mut PluginState, r: NetworkRef) -> Answer {
        if !s.networks.contains_key(&r.network_id) {
            return Err(format!("meshnet: unknown network {}", r.network_id));
        }
        let in_use = s.endpoints.values().filter(|e| e.network == r.network_id).count();
        if in_use > 0 {
            return Err(format!("meshnet: network {} is in use by {in_use} endpoint(s)", short(&r.network_id)));
        }
        let mut next = s.clone();
        next.networks.remove(&r.network_id);
        self.commit(&mut next, &json!({}))?;
        *s = next;
        log::info!("docker plugin: network {} deleted", short(&r.network_id));
        Ok(json!({}))
    }

    fn create_endpoint(&self, s: &mut PluginState, r: CreateEndpoint) -> Answer {
        check_id("endpoint ID", &r.endpoint_id)?;
        let net = s.networks.get(&r.network_id).ok_or_else(|| format!("meshnet: unknown network {}", r.network_id))?;
        if s.endpoints.contains_key(&r.endpoint_id) {
            return Err(format!("meshnet: endpoint {} exists already", r.endpoint_id));
        }
        let iface = r.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err("meshnet: meshnet networks carry IPv4 only".into());
        }
        let Some((ip, _)) = parse_ip_prefix(&iface.address) else {
            return Err(format!("meshnet: endpoint needs an IPv4 address from meshnet's IPAM (got {:?})", iface.address));
        };
        let subnet: Cidr = net.subnet.parse().map_err(|e| format!("meshnet: {e}"))?;
        if !subnet.contains(ip) {
            return Err(format!("meshnet: address {ip} is not in the network's subnet {subnet}"));
        }
        let stem = &r.endpoint_id[..12];
        let ep = Endpoint {
            network: r.network_id.clone(),
            address: iface.address.clone(),
            host_if: format!("{PORT_PREFIX}{stem}"),
            container_if: format!("vmc{stem}"),
            joined: false,
            sandbox: None,
        };
        let mut next = s.clone();
        next.endpoints.insert(r.endpoint_id.clone(), ep);
        self.commit(&mut next, &json!({}))?;
        *s = next;
        // The interface keeps the MAC of the veth end: nothing to add.
        Ok(json!({}))
    }

    fn delete_endpoint(&self, s: &mut PluginState, r: EndpointRef) -> Answer {
        let ep = endpoint(s, &r)?.clone();
        let mut next = s.clone();
        next.endpoints.remove(&r.endpoint_id);
        self.commit(&mut next, &json!({}))?;
        *s = next;
        if ep.joined {
            self.host.left(&r.endpoint_id, &ep);
        }
        self.host.delete_port(&ep.host_if);
        Ok(json!({}))
    }

    fn join(&self, s: &mut PluginState, r: Join) -> Answer {
        let er = EndpointRef { network_id: r.network_id.clone(), endpoint_id: r.endpoint_id.clone() };
        let ep = endpoint(s, &er)?.clone();
        let net = s.networks.get(&r.network_id).cloned().ok_or_else(|| format!("meshnet: unknown network {}", r.network_id))?;
        self.host
            .create_port(&ep.host_if, &ep.container_if)
            .map_err(|e| format!("meshnet: join {}: {e:#}", short(&r.endpoint_id)))?;
        let mut next = s.clone();
        let e = next.endpoints.get_mut(&r.endpoint_id).expect("looked up above");
        e.joined = true;
        e.sandbox = (!r.sandbox_key.is_empty()).then(|| r.sandbox_key.clone());
        let joined = e.clone();
        let mut answer = json!({
            "InterfaceName": { "SrcName": ep.container_if, "DstPrefix": CONTAINER_IF_PREFIX },
            // No multicast route as `attach` adds: Docker 20.10 programs a
            // connected static route (RoutingType 1) as one through a next hop
            // and fails the container's start ("route for the next hop <nil>").
            "DisableGatewayService": false,
        });
        if let Some(gw) = net.gateway.as_deref().and_then(parse_address) {
            answer["Gateway"] = json!(gw.to_string());
        }
        if let Err(err) = self.commit(&mut next, &answer) {
            self.host.delete_port(&ep.host_if);
            return Err(err);
        }
        *s = next;
        self.host.joined(&r.endpoint_id, &joined, &net);
        Ok(answer)
    }

    /// Forgets what Docker removed while this router was down: its calls for it
    /// (`Leave`, `DeleteEndpoint`, `ReleaseAddress`; `DeleteNetwork`,
    /// `ReleasePool`) failed then, and Docker does not send them again. `at_start`
    /// is the state this router started with; of it, the endpoints Docker no
    /// longer lists go (their ports, the veth pairs left on the bridge, are
    /// deleted and their addresses freed), networks Docker no longer has go once
    /// they have no endpoint, and pools that no network uses go (their addresses
    /// freed, their gateway hidden), so the subnet can be used again.
    /// `listed(network)` is the endpoint IDs Docker has on that network, `None`
    /// if it has no such network; an error keeps that network and all of it.
    /// `ipam_subnets()` is the subnets of Docker's networks whose IPAM driver
    /// is this plugin (of any network driver); an error keeps every pool.
    /// An endpoint named in a call cut short that Docker may still send again
    /// is kept (Docker has not listed it yet); call this again once Docker has
    /// given up ([`DOCKER_RETRY`] after the start). Returns the endpoints forgotten.
    pub fn forget_stale(
        &self,
        at_start: &PluginState,
        listed: impl Fn(&str) -> std::result::Result<Option<Vec<String>>, String>,
        ipam_subnets: impl Fn() -> std::result::Result<Vec<String>, String>,
    ) -> Vec<String> {
        // Ask Docker without holding the state: its calls to us wait meanwhile otherwise.
        let mut answers = BTreeMap::new();
        for net in at_start.networks.keys() {
            match listed(net) {
                Ok(l) => {
                    answers.insert(net.clone(), l);
                }
                Err(e) => log::info!("docker plugin: cannot tell whether Docker still has network {}: {e}", short(net)),
            }
        }
        let in_use: Option<Vec<Cidr>> = if at_start.pools.is_empty() {
            None
        } else {
            match ipam_subnets() {
                Ok(l) => Some(l.iter().filter_map(|c| c.parse().ok()).collect()),
                Err(e) => {
                    log::info!("docker plugin: cannot tell which subnets Docker still uses: {e}");
                    None
                }
            }
        };
        let cut_short = self.endpoints_cut_short();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        let mut next = s.clone();
        let mut gone = Vec::new();
        for (id, then) in &at_start.endpoints {
            let Some(ep) = next.endpoints.get(id) else { continue };
            if cut_short.contains(id) {
                continue;
            }
            // Docker called for it since (a `Join` it retried once this router
            // was up again): Docker's answer above may predate that.
            if ep != then {
                continue;
            }
            let Some(listed) = answers.get(&ep.network) else { continue };
            if listed.as_ref().is_some_and(|l| l.contains(id)) {
                continue;
            }
            let ep = next.endpoints.remove(id).expect("looked up above");
            let freed = parse_ip_prefix(&ep.address).and_then(|(ip, _)| {
                next.pools.values_mut().find_map(|p| p.addresses.remove(&ip.to_string()).map(|key| (key, ip)))
            });
            gone.push((id.clone(), ep, freed));
        }
        for (net, listed) in &answers {
            if listed.is_none() && !next.endpoints.values().any(|e| &e.network == net) {
                next.networks.remove(net);
            }
        }
        let mut pools_gone = Vec::new();
        for (id, then) in at_start.pools.iter().filter(|_| in_use.is_some()) {
            let Some(pool) = next.pools.get(id) else { continue };
            // Docker called for it since (the gateway of a `docker network
            // create` it retried): Docker's answer above may predate that.
            if s.pools.get(id) != Some(then) {
                continue;
            }
            let subnet = pool.subnet.parse::<Cidr>().ok();
            let used = in_use.as_ref().is_some_and(|u| subnet.is_none_or(|c| u.contains(&c)));
            if used || next.networks.values().any(|n| n.subnet == pool.subnet) {
                continue;
            }
            pools_gone.push(next.pools.remove(id).expect("looked up above"));
        }
        if next == *s {
            return Vec::new();
        }
        if let Err(e) = self.save(&next) {
            log::warn!("docker plugin: not forgetting what Docker removed while this router was down: {e}");
            return Vec::new();
        }
        *s = next;
        for (id, ep, freed) in &gone {
            if ep.joined {
                self.host.left(id, ep);
            }
            self.host.delete_port(&ep.host_if);
            if let Some((key, ip)) = freed {
                self.host.free(key, *ip);
            }
            log::info!("docker plugin: endpoint {} ({}) is gone from Docker: forgot it and its port {}", short(id), ep.address, ep.host_if);
        }
        for pool in &pools_gone {
            for (ip, key) in &pool.addresses {
                if let Ok(ip) = ip.parse() {
                    self.host.free(key, ip);
                }
            }
            self.release_gateway_of(pool);
            log::info!("docker plugin: no Docker network uses pool {} any more: released it", pool.subnet);
        }
        gone.into_iter().map(|(id, _, _)| id).collect()
    }

    /// Frees the addresses of `at_start` that no endpoint uses, still held
    /// under the same IPAM key: Docker asked for them (`RequestAddress`) but
    /// never made an endpoint with them, because this router went down before
    /// Docker had its answer or its `CreateEndpoint`, and Docker's
    /// `ReleaseAddress` for them failed too. Only in pools of a meshnet network
    /// (a pool used by another network driver has no endpoints here). Call it
    /// once Docker has given up retrying the calls that were under way when
    /// this router went down ([`DOCKER_RETRY`] after it serves again), so a late
    /// `CreateEndpoint` cannot come for an address freed here. Returns them.
    pub fn forget_orphans(&self, at_start: &PluginState) -> Vec<Ipv4Addr> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        let mut next = s.clone();
        let mut freed = Vec::new();
        for (id, then) in &at_start.pools {
            let Some(pool) = next.pools.get_mut(id) else { continue };
            if !s.networks.values().any(|n| n.subnet == pool.subnet) {
                continue;
            }
            for (ip, key) in &then.addresses {
                let used = s
                    .endpoints
                    .values()
                    .chain(at_start.endpoints.values())
                    .any(|e| parse_ip_prefix(&e.address).is_some_and(|(a, _)| a.to_string() == *ip));
                if used || pool.addresses.get(ip) != Some(key) {
                    continue;
                }
                let Ok(addr) = ip.parse::<Ipv4Addr>() else { continue };
                pool.addresses.remove(ip);
                freed.push((key.clone(), addr, pool.subnet.clone()));
            }
        }
        if freed.is_empty() {
            return Vec::new();
        }
        if let Err(e) = self.save(&next) {
            log::warn!("docker plugin: not freeing addresses no endpoint uses: {e}");
            return Vec::new();
        }
        *s = next;
        for (key, ip, subnet) in &freed {
            self.host.free(key, *ip);
            log::info!("docker plugin: {ip} of pool {subnet} was handed to Docker, which made no endpoint with it (this router went down meanwhile): freed it");
        }
        freed.into_iter().map(|(_, ip, _)| ip).collect()
    }

    /// Deletes the veth pairs of the plugin's naming (`vmd` and 12 characters
    /// of an endpoint ID) on meshnet's bridge whose endpoint neither the plugin
    /// knows nor Docker lists (`docker_endpoints()`: the endpoint IDs on
    /// Docker's networks of this driver; an error keeps every pair): a router
    /// that stopped after it saved that an endpoint left or went but before it
    /// deleted the pair left it there. No other port of the bridge is touched,
    /// nor any other bridge. Returns the ports deleted.
    pub fn delete_stray_ports(&self, docker_endpoints: impl FnOnce() -> std::result::Result<Vec<String>, String>) -> Vec<String> {
        // Ports of the plugin's naming of no endpoint it knows. A `Join` makes
        // its port holding the state: none is made while it is held.
        let unknown = |listed: &[String]| -> std::result::Result<_, ()> {
            let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let ports = self.host.ports().map_err(|e| log::warn!("docker plugin: listing the bridge's ports: {e:#}"))?;
            let stray: Vec<String> = ports
                .into_iter()
                .filter(|port| {
                    let Some(stem) = port_stem(port) else { return false };
                    !guard.endpoints.values().any(|e| e.host_if == *port)
                        && !listed.iter().any(|id| id.get(..12) == Some(stem))
                })
                .collect();
            Ok((guard, stray))
        };
        match unknown(&[]) {
            Ok((_, stray)) if !stray.is_empty() => {}
            _ => return Vec::new(),
        }
        // Ask Docker without holding the state: its calls to us wait meanwhile otherwise.
        let listed = match docker_endpoints() {
            Ok(l) => l,
            Err(e) => {
                log::info!("docker plugin: cannot tell which endpoints Docker has, so no port is deleted as stray: {e}");
                return Vec::new();
            }
        };
        // Deleted holding the state: a `Join` meanwhile could make a port of that name.
        let Ok((_guard, stray)) = unknown(&listed) else { return Vec::new() };
        for port in &stray {
            self.host.delete_port(port);
            log::info!(
                "docker plugin: deleted {port} from the bridge: the port of an endpoint neither this plugin nor Docker knows (left by a router that stopped while a container left)"
            );
        }
        stray
    }

    fn leave(&self, s: &mut PluginState, r: EndpointRef) -> Answer {
        let ep = endpoint(s, &r)?.clone();
        let mut next = s.clone();
        let e = next.endpoints.get_mut(&r.endpoint_id).expect("looked up above");
        e.joined = false;
        e.sandbox = None;
        self.commit(&mut next, &json!({}))?;
        *s = next;
        if ep.joined {
            self.host.left(&r.endpoint_id, &ep);
        }
        self.host.delete_port(&ep.host_if);
        Ok(json!({}))
    }
}

/// The endpoint ID's first 12 characters in `port`, if it is named as the
/// plugin names the bridge ends of its veth pairs.
fn port_stem(port: &str) -> Option<&str> {
    let stem = port.strip_prefix(PORT_PREFIX)?;
    (stem.len() == 12 && stem.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(stem)
}

/// The calls that change the plugin's state (kept until answered, see [`Plugin::handle`]).
fn changes_state(call: &str) -> bool {
    matches!(
        call,
        "IpamDriver.RequestPool"
            | "IpamDriver.ReleasePool"
            | "IpamDriver.RequestAddress"
            | "IpamDriver.ReleaseAddress"
            | "NetworkDriver.CreateNetwork"
            | "NetworkDriver.DeleteNetwork"
            | "NetworkDriver.CreateEndpoint"
            | "NetworkDriver.DeleteEndpoint"
            | "NetworkDriver.Join"
            | "NetworkDriver.Leave"
    )
}

fn endpoint<'a>(s: &'a PluginState, r: &EndpointRef) -> std::result::Result<&'a Endpoint, String> {
    match s.endpoints.get(&r.endpoint_id) {
        Some(e) if e.network == r.network_id => Ok(e),
        Some(_) => Err(format!("meshnet: endpoint {} is not on network {}", r.endpoint_id, r.network_id)),
        None => Err(format!("meshnet: unknown endpoint {}", r.endpoint_id)),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The plugin's socket, bound; removed again by [`Socket::remove`] if it is still ours.
pub struct Socket {
    pub path: PathBuf,
    inode: u64,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl Socket {
    /// Whether a socket `NAME.sock` can be served in `dir` (made if missing):
    /// a `--docker-plugin-dir` given explicitly is checked before the launch,
    /// which fails rather than starting a router without the plugin asked for.
    pub fn check_dir(dir: &Path, name: &str) -> Result<()> {
        let path = dir.join(format!("{name}.sock"));
        // sun_path holds 108 bytes, the final NUL included.
        if path.as_os_str().len() > 107 {
            anyhow::bail!("the socket path {} is longer than a Unix socket's 107 bytes", path.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        if !std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?.is_dir() {
            anyhow::bail!("{} is not a directory", dir.display());
        }
        Ok(())
    }

    /// Binds `DIR/NAME.sock`. A socket there that answers belongs to another
    /// router: `Ok(None)`, and it is left alone; a dead one is replaced.
    pub fn bind(dir: &Path, name: &str) -> Result<Option<Socket>> {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            anyhow::bail!("docker plugin name {name:?}: not a valid file name");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("{name}.sock"));
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(&path).with_context(|| format!("remove the dead socket {}", path.display()))?;
        }
        let listener =
            std::os::unix::net::UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let inode = std::fs::metadata(&path)?.ino();
        Ok(Some(Socket { path, inode, listener: Some(listener) }))
    }

    /// The listener, once (for [`serve`]).
    pub fn take_listener(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.listener.take()
    }

    /// Removes the socket file if it is still the one we bound.
    pub fn remove(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves Docker's calls on `listener` (HTTP/1.1, one task per connection; the
/// calls themselves run on the blocking pool: they wait for IPAM and netlink).
pub async fn serve(plugin: Arc<Plugin>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let plugin = plugin.clone();
                async move { Ok::<_, Infallible>(respond(plugin, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                log::debug!("docker plugin connection: {e}");
            }
        });
    }
}

async fn respond(plugin: Arc<Plugin>, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, &json!({ "Err": format!("meshnet: {} {path}: only POST", req.method()) }));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, &json!({ "Err": format!("meshnet: {path}: {e}") })),
    };
    let call = path.clone();
    let answer = tokio::task::spawn_blocking(move || plugin.handle(&call, &body))
        .await
        .unwrap_or_else(|e| Err(format!("meshnet: internal error: {e}")));
    match answer {
        Ok(v) => reply(StatusCode::OK, &v),
        Err(e) => {
            log::info!("docker plugin: {path}: {e}");
            reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "Err": e }))
        }
    }
}

fn reply(status: StatusCode, v: &Value) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A router that records what it was asked to do.
    #[derive(Default)]
    struct Fake {
        allocated: Mutex<BTreeMap<Ipv4Addr, String>>,
        ports: Mutex<BTreeSet<String>>,
        exposed: Mutex<Vec<Ipv4Addr>>,
        joined: Mutex<Vec<String>>,
        /// The host call in which the router "stops" (panics), once.
        stop_in: Mutex<Option<&'static str>>,
    }

    impl Fake {
        fn maybe_stop(&self, here: &str) {
            let stop = self.stop_in.lock().unwrap().take_if(|s| *s == here).is_some();
            assert!(!stop, "the router stops in {here}");
        }
    }

    impl PluginHost for Fake {
        fn range(&self) -> Cidr {
            "10.40.0.0/16".parse().unwrap()
        }
        fn default_subnet(&self) -> Cidr {
            "10.40.0.0/24".parse().unwrap()
        }
        fn allocate(&self, key: &str, subnet: Cidr, exact: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
            let mut a = self.allocated.lock().unwrap();
            let ip = match exact {
                Some(ip) => ip,
                None => (1..255u32)
                    .map(|i| Ipv4Addr::from(u32::from(subnet.network_v4().expect("IPv4")) + i + 1))
                    .find(|ip| !a.contains_key(ip))
                    .unwrap(),
            };
            if a.contains_key(&ip) {
                anyhow::bail!("{ip} is in use");
            }
            a.insert(ip, key.to_string());
            Ok(ip)
        }
        fn free(&self, key: &str, ip: Ipv4Addr) {
            let mut a = self.allocated.lock().unwrap();
            assert_eq!(a.remove(&ip).as_deref(), Some(key));
        }
        fn gateway(&self, subnet: Cidr, exact: Option<Ipv4Addr>) -> Result<(Ipv4Addr, bool)> {
            let ip = exact.unwrap_or(Ipv4Addr::from(u32::from(subnet.network_v4().expect("IPv4")) + 1));
            self.exposed.lock().unwrap().push(ip);
            Ok((ip, true))
        }
        fn release_gateway(&self, ip: Ipv4Addr, _prefix: u8) -> Result<()> {
            self.exposed.lock().unwrap().retain(|x| *x != ip);
            Ok(())
        }
        fn create_port(&self, host_if: &str, _container_if: &str) -> Result<()> {
            self.maybe_stop("create_port");
            self.ports.lock().unwrap().insert(host_if.to_string());
            Ok(())
        }
        fn delete_port(&self, host_if: &str) {
            self.ports.lock().unwrap().remove(host_if);
        }
        fn ports(&self) -> Result<Vec<String>> {
            Ok(self.ports.lock().unwrap().iter().cloned().collect())
        }
        fn joined(&self, ep_id: &str, _ep: &Endpoint, _net: &Network) {
            self.maybe_stop("joined");
            self.joined.lock().unwrap().push(ep_id.to_string());
        }
        fn left(&self, ep_id: &str, _ep: &Endpoint) {
            self.joined.lock().unwrap().retain(|x| x != ep_id);
        }
    }

    const NET: &str = "4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";
    const EP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn call(p: &Plugin, path: &str, body: Value) -> Answer {
        p.handle(path, body.to_string().as_bytes())
    }

    #[track_caller]
    fn ok(p: &Plugin, path: &str, body: Value) -> Value {
        call(p, path, body).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[track_caller]
    fn err(p: &Plugin, path: &str, body: Value) -> String {
        match call(p, path, body) {
            Ok(v) => panic!("{path} should fail, answered {v}"),
            Err(e) => e,
        }
    }

    /// Docker's calls for `docker network create --subnet 10.40.5.0/24` and one
    /// `docker run` then `docker rm -f` and `docker network rm`, as the engine makes them.
    #[test]
    fn a_network_and_a_container_come_and_go() {
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), PluginState::default(), None);
        assert_eq!(ok(&p, "/Plugin.Activate", json!({}))["Implements"], json!(["NetworkDriver", "IpamDriver"]));
        assert_eq!(ok(&p, "/NetworkDriver.GetCapabilities", json!({}))["Scope"], "local");
        let pool = ok(&p, "/IpamDriver.RequestPool", json!({"AddressSpace": "meshnet", "Pool": "10.40.5.0/24", "SubPool": "", "Options": {}, "V6": false}));
        assert_eq!(pool["Pool"], "10.40.5.0/24");
        let pool_id = pool["PoolID"].as_str().unwrap().to_string();
        let gw = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        assert_eq!(gw["Address"], "10.40.5.1/24");
        assert_eq!(*fake.exposed.lock().unwrap(), vec!["10.40.5.1".parse::<Ipv4Addr>().unwrap()]);
        ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "Options": {"com.docker.network.generic": {}}, "IPv4Data": [{"AddressSpace": "meshnet", "Pool": "10.40.5.0/24", "Gateway": "10.40.5.1/24"}], "IPv6Data": []}));

        let a = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": "", "Options": null}));
        let addr = a["Address"].as_str().unwrap().to_string();
        assert!(addr.starts_with("10.40.5.") && addr.ends_with("/24") && addr != "10.40.5.1/24", "{addr}");
        assert_eq!(fake.allocated.lock().unwrap().len(), 1);
        ok(&p, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}, "Options": {}}));
        let j = ok(&p, "/NetworkDriver.Join", json!({"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/abc", "Options": {}}));
        assert_eq!(j["InterfaceName"]["SrcName"], "vmc0123456789ab");
        assert_eq!(j["InterfaceName"]["DstPrefix"], "ethwe");
        assert_eq!(j["Gateway"], "10.40.5.1");
        assert!(j.get("StaticRoutes").is_none(), "{j}");
        assert!(fake.ports.lock().unwrap().contains("vmd0123456789ab"));
        assert_eq!(*fake.joined.lock().unwrap(), vec![EP.to_string()]);
        assert_eq!(ok(&p, "/NetworkDriver.EndpointOperInfo", json!({"NetworkID": NET, "EndpointID": EP}))["Value"]["joined"], true);
        ok(&p, "/NetworkDriver.ProgramExternalConnectivity", json!({"NetworkID": NET, "EndpointID": EP, "Options": {}}));
        ok(&p, "/NetworkDriver.DiscoverNew", json!({"DiscoveryType": 1, "DiscoveryData": {}}));

        // The network is in use while the endpoint exists.
        let e = err(&p, "/NetworkDriver.DeleteNetwork", json!({"NetworkID": NET}));
        assert!(e.contains("in use"), "{e}");

        // docker rm -f: Leave, DeleteEndpoint, ReleaseAddress.
        ok(&p, "/NetworkDriver.RevokeExternalConnectivity", json!({"NetworkID": NET, "EndpointID": EP}));
        ok(&p, "/NetworkDriver.Leave", json!({"NetworkID": NET, "EndpointID": EP}));
        assert!(fake.ports.lock().unwrap().is_empty());
        assert!(fake.joined.lock().unwrap().is_empty());
        ok(&p, "/NetworkDriver.DeleteEndpoint", json!({"NetworkID": NET, "EndpointID": EP}));
        ok(&p, "/IpamDriver.ReleaseAddress", json!({"PoolID": pool_id, "Address": addr.split('/').next().unwrap()}));
        assert!(fake.allocated.lock().unwrap().is_empty());
        let e = err(&p, "/NetworkDriver.Leave", json!({"NetworkID": NET, "EndpointID": EP}));
        assert!(e.contains("unknown endpoint"), "{e}");

        // docker network rm: DeleteNetwork, ReleaseAddress (gateway), ReleasePool.
        ok(&p, "/NetworkDriver.DeleteNetwork", json!({"NetworkID": NET}));
        ok(&p, "/IpamDriver.ReleaseAddress", json!({"PoolID": pool_id, "Address": "10.40.5.1"}));
        assert!(fake.exposed.lock().unwrap().is_empty());
        ok(&p, "/IpamDriver.ReleasePool", json!({"PoolID": pool_id}));
        assert_eq!(p.state().pools.len() + p.state().networks.len() + p.state().endpoints.len(), 0);
    }

    fn request_pool(p: &Plugin, pool: &str) -> Answer {
        call(p, "/IpamDriver.RequestPool", json!({"AddressSpace": "meshnet", "Pool": pool, "SubPool": "", "Options": {}, "V6": false}))
    }

    /// Two networks of one host whose subnets overlap are refused: before,
    /// `--subnet 10.40.5.0/25` after a network on 10.40.5.0/24 was taken, its
    /// gateway was the /24's exposed address (not exposed for it), and
    /// `docker network rm` of the /24 network hid and freed that address, which
    /// the /25 network then handed to a container as its own.
    #[test]
    fn overlapping_subnets_are_refused() {
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), PluginState::default(), None);
        let pool_id = request_pool(&p, "10.40.5.0/24").unwrap()["PoolID"].as_str().unwrap().to_string();
        ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        let before = p.state();
        for (asked, inside) in [("10.40.5.0/25", "10.40.5.0/24"), ("10.40.5.128/26", "10.40.5.0/24"), ("10.40.0.0/16", "10.40.5.0/24")] {
            let e = request_pool(&p, asked).expect_err(asked);
            assert!(e.contains(&format!("subnet {asked} overlaps subnet {inside}")), "{e}");
        }
        assert_eq!(p.state(), before, "a refused pool changed the state");
        assert_eq!(*fake.exposed.lock().unwrap(), vec!["10.40.5.1".parse::<Ipv4Addr>().unwrap()]);
        // A subnet beside it is fine.
        assert_eq!(request_pool(&p, "10.40.6.0/24").unwrap()["Pool"], "10.40.6.0/24");
    }

    /// `docker network create` without `--subnet` on a host with a route that
    /// overlaps the default subnet (an address exposed on the bridge): Docker
    /// keeps the pool it got and asks again (libnetwork's overlap check), and
    /// the answer says to give `--subnet` instead of blaming another meshnet
    /// network that does not exist. With a network on the default subnet, the
    /// second network is told that one uses it.
    #[test]
    fn docker_asking_again_for_the_default_subnet_is_told_to_give_it() {
        let p = Plugin::new(Arc::new(Fake::default()), PluginState::default(), None);
        let first = request_pool(&p, "").unwrap();
        assert_eq!(first["Pool"], "10.40.0.0/24");
        let e = request_pool(&p, "").unwrap_err();
        assert!(e.contains("create the network with --subnet 10.40.0.0/24") && !e.contains("another meshnet network"), "{e}");
        ok(&p, "/IpamDriver.ReleasePool", json!({"PoolID": first["PoolID"]}));
        assert!(p.state().pools.is_empty());

        let pool_id = request_pool(&p, "").unwrap()["PoolID"].as_str().unwrap().to_string();
        let gw = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "Options": {}, "IPv4Data": [{"AddressSpace": "meshnet", "Pool": "10.40.0.0/24", "Gateway": gw["Address"]}], "IPv6Data": []}));
        let e = request_pool(&p, "").unwrap_err();
        assert!(e.contains("already used by another meshnet network"), "{e}");
    }

    /// What Docker removed while the router was down: its calls for it failed
    /// and are not sent again. At the next start the endpoints Docker no longer
    /// lists are forgotten, their ports deleted and their addresses freed;
    /// listed ones stay, and so does all of a network Docker cannot answer for.
    /// A network Docker no longer has goes with its endpoints, and a pool no
    /// Docker network uses goes (its gateway hidden), unless Docker cannot say.
    #[test]
    fn what_docker_removed_meanwhile_is_forgotten() {
        const EP2: &str = "1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        const EP3: &str = "2123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        const NET2: &str = "5a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), PluginState::default(), None);
        let mut addrs = BTreeMap::new();
        for (net, subnet, eps) in [(NET, "10.40.5.0/24", &[EP, EP2][..]), (NET2, "10.40.6.0/24", &[EP3][..])] {
            let pool = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": subnet, "V6": false}));
            let pool_id = pool["PoolID"].as_str().unwrap().to_string();
            ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": net, "IPv4Data": [{"Pool": subnet, "Gateway": ""}]}));
            for ep in eps {
                let a = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": ""}))["Address"].as_str().unwrap().to_string();
                ok(&p, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": net, "EndpointID": ep, "Interface": {"Address": a}}));
                ok(&p, "/NetworkDriver.Join", json!({"NetworkID": net, "EndpointID": ep, "SandboxKey": "/var/run/docker/netns/x"}));
                addrs.insert(*ep, a.split('/').next().unwrap().parse::<Ipv4Addr>().unwrap());
            }
        }
        // A pool whose network is not meshnet's (or whose network Docker failed to make).
        let pool = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.7.0/24", "V6": false}));
        let pool7 = pool["PoolID"].as_str().unwrap().to_string();
        ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool7, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        assert_eq!(fake.ports.lock().unwrap().len(), 3);
        assert_eq!(fake.exposed.lock().unwrap().len(), 1);
        // The router restarts (same state); Docker cannot answer for NET2 yet.
        let at_start = p.state();
        let p = Plugin::new(fake.clone(), at_start.clone(), None);
        let all = || Ok(vec!["10.40.5.0/24".to_string(), "10.40.6.0/24".to_string(), "10.40.7.0/24".to_string()]);
        let gone = p.forget_stale(
            &at_start,
            |net| match net {
                NET => Ok(Some(vec![EP2.to_string()])),
                _ => Err("engine down".into()),
            },
            all,
        );
        assert_eq!(gone, vec![EP.to_string()]);
        let s = p.state();
        assert_eq!(s.endpoints.keys().cloned().collect::<Vec<_>>(), vec![EP2.to_string(), EP3.to_string()]);
        assert!(!fake.ports.lock().unwrap().contains("vmd0123456789ab"));
        assert_eq!(fake.ports.lock().unwrap().len(), 2);
        let allocated = fake.allocated.lock().unwrap().keys().copied().collect::<Vec<_>>();
        assert_eq!(allocated, vec![addrs[EP2], addrs[EP3]], "the gone endpoint's address must be free");
        assert!(!s.pools.values().any(|p| p.addresses.contains_key(&addrs[EP].to_string())));
        assert!(!fake.joined.lock().unwrap().contains(&EP.to_string()));
        assert_eq!(s.pools.len(), 3);
        // Docker cannot list its networks: every pool stays.
        let networks_only = |net: &str| if net == NET { Ok(Some(vec![EP2.to_string()])) } else { Err("engine down".to_string()) };
        assert!(p.forget_stale(&at_start, networks_only, || Err("engine down".into())).is_empty());
        assert_eq!(p.state().pools.len(), 3);
        // Docker answers: NET2 is gone, and with it EP3 and its pool; so is 10.40.7.0/24's user.
        let gone = p.forget_stale(&at_start, |net| Ok((net == NET).then(|| vec![EP2.to_string()])), || Ok(vec!["10.40.5.0/24".to_string()]));
        assert_eq!(gone, vec![EP3.to_string()]);
        let s = p.state();
        assert_eq!(s.endpoints.keys().cloned().collect::<Vec<_>>(), vec![EP2.to_string()]);
        assert_eq!(s.networks.keys().cloned().collect::<Vec<_>>(), vec![NET.to_string()]);
        assert_eq!(s.pools.values().map(|p| p.subnet.as_str()).collect::<Vec<_>>(), vec!["10.40.5.0/24"]);
        assert_eq!(fake.allocated.lock().unwrap().keys().copied().collect::<Vec<_>>(), vec![addrs[EP2]]);
        assert!(fake.exposed.lock().unwrap().is_empty(), "the gateway of a released pool must be hidden");
        // The subnet can be used again.
        ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.6.0/24", "V6": false}));
        // Nothing more to forget: nothing changes.
        let s = p.state();
        assert!(p.forget_stale(&at_start, |_| Ok(Some(vec![EP2.to_string()])), || Ok(vec!["10.40.5.0/24".to_string(), "10.40.6.0/24".to_string()])).is_empty());
        assert_eq!(p.state(), s);
    }

    /// The router went down in the middle of `docker run`s: Docker had an
    /// address for one (`RequestAddress` answered) but its `CreateEndpoint`
    /// failed, and so did its `ReleaseAddress`; another's `CreateEndpoint` was
    /// answered, and Docker's `Join` for it, retried until this router was up
    /// again, came after Docker was asked which endpoints it has (it listed
    /// none: not joined yet). The joined endpoint stays (before, it was
    /// forgotten: its veth pair deleted under the running container and its
    /// address freed for another); the orphaned address is freed once Docker
    /// has stopped retrying (before, it was held for good), and nothing else:
    /// not an address asked for since the restart, nor one of a pool without a
    /// meshnet network. Likewise a pool whose gateway Docker asked for after
    /// the restart (its network is not made yet) stays.
    #[test]
    fn a_join_after_the_restart_is_kept_and_orphaned_addresses_freed() {
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), PluginState::default(), None);
        let pool_id = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.5.0/24"}))["PoolID"].as_str().unwrap().to_string();
        ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "10.40.5.0/24", "Gateway": ""}]}));
        let addr = |p: &Plugin, pool: &str| ok(p, "/IpamDriver.RequestAddress", json!({"PoolID": pool}))["Address"].as_str().unwrap().to_string();
        let ip = |a: &str| a.split('/').next().unwrap().parse::<Ipv4Addr>().unwrap();
        let a1 = addr(&p, &pool_id);
        ok(&p, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": a1}}));
        let orphan = addr(&p, &pool_id);
        // A pool whose network is of another driver: its addresses have no endpoint here.
        let other = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.6.0/24"}))["PoolID"].as_str().unwrap().to_string();
        let foreign = addr(&p, &other);
        // A `docker network create` whose `RequestPool` was answered.
        let pool7 = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.7.0/24"}))["PoolID"].as_str().unwrap().to_string();
        // The router restarts; Docker's calls it retried meanwhile come.
        let at_start = p.state();
        let p = Plugin::new(fake.clone(), at_start.clone(), None);
        ok(&p, "/NetworkDriver.Join", json!({"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/y"}));
        ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool7, "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        let later = addr(&p, &pool_id);
        let gone = p.forget_stale(&at_start, |_| Ok(Some(vec![])), || Ok(vec!["10.40.5.0/24".into(), "10.40.6.0/24".into()]));
        assert!(gone.is_empty(), "an endpoint Docker joined after the restart was forgotten: {gone:?}");
        assert!(p.state().pools.contains_key(&pool7), "a pool whose gateway Docker asked for after the restart was released");
        assert_eq!(fake.exposed.lock().unwrap().len(), 1);
        assert!(p.state().endpoints[EP].joined);
        assert!(fake.ports.lock().unwrap().contains("vmd0123456789ab"), "the joined endpoint's port was deleted");
        assert!(fake.allocated.lock().unwrap().contains_key(&ip(&a1)));
        // Docker no longer retries: the orphan goes, the rest stays.
        assert_eq!(p.forget_orphans(&at_start), vec![ip(&orphan)]);
        let held: Vec<Ipv4Addr> = fake.allocated.lock().unwrap().keys().copied().collect();
        let mut want = vec![ip(&a1), ip(&later), ip(&foreign)];
        want.sort();
        assert_eq!(held, want);
        assert!(!p.state().pools[&pool_id].addresses.contains_key(&ip(&orphan).to_string()));
        assert!(p.forget_orphans(&at_start).is_empty(), "nothing more to free");
        // The freed address is handed out again.
        assert_eq!(ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id, "Address": ip(&orphan).to_string()}))["Address"], orphan);
    }

    #[test]
    fn bad_requests_are_errors_and_change_nothing() {
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), PluginState::default(), None);
        let e = err(&p, "/IpamDriver.RequestPool", json!({"Pool": "192.168.7.0/24"}));
        assert!(e.contains("outside meshnet's IP allocation range 10.40.0.0/16"), "{e}");
        let e = err(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.5.1/24"}));
        assert!(e.contains("invalid subnet"), "{e}");
        // IPv6 (`docker network create --ipv6 [--subnet fd..]`): refused, saying what to do.
        let e = err(&p, "/IpamDriver.RequestPool", json!({"Pool": "", "V6": true}));
        assert!(e.contains("IPv4 addresses only: leave out --ipv6"), "{e}");
        assert!(e.contains("inside meshnet's IP allocation range 10.40.0.0/16, or none for the default subnet 10.40.0.0/24"), "{e}");
        let e = err(&p, "/IpamDriver.RequestPool", json!({"Pool": "fd99::/64", "V6": true}));
        assert!(e.contains("(asked for IPv6 subnet fd99::/64)") && e.contains("any IPv6 --subnet"), "{e}");
        // The driver without meshnet's IPAM and --ipv6: both problems named.
        let e = err(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "172.18.0.0/16"}], "IPv6Data": [{"Pool": "fd99::/64"}]}));
        assert!(e.contains("IPv4 only (got IPv6 subnet fd99::/64): leave out --ipv6"), "{e}");
        assert!(e.contains("--ipam-driver meshnet") && e.contains("10.40.0.0/16"), "{e}");
        let e = err(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.5.0/24", "SubPool": "10.41.0.0/24"}));
        assert!(e.contains("not inside subnet"), "{e}");
        assert_eq!(p.state(), PluginState::default());
        // Not JSON, wrong types, missing fields: errors, never panics.
        for (path, body) in [
            ("/IpamDriver.RequestPool", &b"{"[..]),
            ("/IpamDriver.RequestAddress", b"{}"),
            ("/IpamDriver.RequestAddress", b"{\"PoolID\": 5}"),
            ("/NetworkDriver.CreateNetwork", b"[]"),
            ("/NetworkDriver.Join", b"null"),
            ("/NetworkDriver.Nonsense", b"{}"),
        ] {
            let e = p.handle(path, body).unwrap_err();
            assert!(e.starts_with("meshnet: "), "{path}: {e}");
        }
        let e = err(&p, "/IpamDriver.RequestAddress", json!({"PoolID": "meshnet/10.40.9.0/24"}));
        assert!(e.contains("unknown pool"), "{e}");
        let e = err(&p, "/NetworkDriver.Join", json!({"NetworkID": NET, "EndpointID": EP}));
        assert!(e.contains("unknown endpoint"), "{e}");
        // A network without meshnet's IPAM.
        let e = err(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "172.18.0.0/16", "Gateway": "172.18.0.1/16"}]}));
        assert!(e.contains("--ipam-driver meshnet"), "{e}");
        // Served under another name, the hint names that one.
        let other = Plugin::new(fake.clone(), PluginState::default(), None).named("mnp");
        let e = err(&other, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "172.18.0.0/16", "Gateway": "172.18.0.1/16"}]}));
        assert!(e.contains("--ipam-driver mnp"), "{e}");
        let e = err(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": "../x", "IPv4Data": []}));
        assert!(e.contains("invalid network ID"), "{e}");
        assert_eq!(p.state(), PluginState::default());
        assert!(fake.allocated.lock().unwrap().is_empty());

        // The same subnet twice on one host; an address outside the pool; one taken.
        let pool = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": ""}));
        assert_eq!(pool["Pool"], "10.40.0.0/24");
        let e = err(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.0.0/24"}));
        assert!(e.contains("already used"), "{e}");
        // meshnet's IPAM gave the IPv4 subnet, Docker's the IPv6 one: only --ipv6 is in the way.
        let e = err(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "10.40.0.0/24"}], "IPv6Data": [{"Pool": "fd99::/64"}]}));
        assert!(e.ends_with("leave out --ipv6 and any IPv6 --subnet") && !e.contains("--ipam-driver"), "{e}");
        let id = pool["PoolID"].as_str().unwrap();
        let e = err(&p, "/IpamDriver.RequestAddress", json!({"PoolID": id, "Address": "10.40.1.5"}));
        assert!(e.contains("not in subnet"), "{e}");
        assert_eq!(ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": id, "Address": "10.40.0.9"}))["Address"], "10.40.0.9/24");
        let before = p.state();
        let e = err(&p, "/IpamDriver.RequestAddress", json!({"PoolID": id, "Address": "10.40.0.9"}));
        assert!(e.contains("in use"), "{e}");
        // A failed allocation changes nothing.
        assert_eq!(p.state(), before);
        let e = err(&p, "/IpamDriver.ReleaseAddress", json!({"PoolID": id, "Address": "10.40.0.10"}));
        assert!(e.contains("not allocated"), "{e}");
        // A late release of an address an endpoint has (it was handed out
        // again): refused, the endpoint keeps it. Before, it was freed under
        // the container using it.
        ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "10.40.0.0/24", "Gateway": ""}]}));
        ok(&p, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "10.40.0.9/24"}}));
        let before = p.state();
        let e = err(&p, "/IpamDriver.ReleaseAddress", json!({"PoolID": id, "Address": "10.40.0.9"}));
        assert!(e.contains("not released: endpoint 0123456789ab still has it"), "{e}");
        assert_eq!(p.state(), before);
        assert!(fake.allocated.lock().unwrap().contains_key(&"10.40.0.9".parse().unwrap()));
        // Once the endpoint is deleted, the release goes through.
        ok(&p, "/NetworkDriver.DeleteEndpoint", json!({"NetworkID": NET, "EndpointID": EP}));
        ok(&p, "/IpamDriver.ReleaseAddress", json!({"PoolID": id, "Address": "10.40.0.9"}));
        assert!(!fake.allocated.lock().unwrap().contains_key(&"10.40.0.9".parse().unwrap()));
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("meshnet-plugin-{}", std::process::id()));
        let state = StateDir::new(&dir);
        state.ensure().unwrap();
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), load(&state).unwrap(), Some(state.docker_plugin()));
        let pool = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.7.0/24"}));
        let id = pool["PoolID"].as_str().unwrap().to_string();
        let a = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": id}));
        let saved = load(&state).unwrap();
        assert_eq!(saved, p.state());
        assert_eq!(saved.ipam_keys(), vec!["docker-plugin:0".to_string()]);
        // A new router process reads it back and releases the address.
        let p2 = Plugin::new(fake.clone(), load(&state).unwrap(), Some(state.docker_plugin()));
        ok(&p2, "/IpamDriver.ReleaseAddress", json!({"PoolID": id, "Address": a["Address"]}));
        assert!(fake.allocated.lock().unwrap().is_empty());
        assert!(load(&state).unwrap().ipam_keys().is_empty());
        std::fs::write(state.docker_plugin(), "{ not json").unwrap();
        assert!(format!("{:#}", load(&state).unwrap_err()).contains("docker-plugin.json is corrupt"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The router stops (`kill -9`) in the middle of Docker's calls; Docker
    /// sends each again once it is back, but without its request (an empty
    /// body). Before, every such call was "bad ... request: EOF", so `docker
    /// run` failed; now the call cut short is answered: made now if its changes
    /// were not saved, else with the answer saved with them (an address is not
    /// handed out twice), and a `Join` is made again. A resent call of which
    /// nothing was kept (never read, or already answered) is an error saying
    /// so. The endpoint of a call cut short is not forgotten as gone from
    /// Docker while Docker may still send it.
    #[test]
    fn a_call_cut_short_by_a_stop_is_answered_when_docker_sends_it_again_empty() {
        let dir = std::env::temp_dir().join(format!("meshnet-plugin-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::new(&dir);
        state.ensure().unwrap();
        let fake = Arc::new(Fake::default());
        let start = || Plugin::new(fake.clone(), load(&state).unwrap(), Some(state.docker_plugin()));
        let p = start();
        let pool_id = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.5.0/24"}))["PoolID"].as_str().unwrap().to_string();
        ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "10.40.5.0/24", "Gateway": ""}]}));
        let a = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id}))["Address"].as_str().unwrap().to_string();
        ok(&p, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": a}}));
        assert!(load(&state).unwrap().calls.is_empty(), "an answered call is kept");
        let join = json!({"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/x"});
        for stop in ["create_port", "joined"] {
            // Stopped before the join was made, and after it was saved.
            *fake.stop_in.lock().unwrap() = Some(stop);
            let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&p, "/NetworkDriver.Join", join.clone())));
            assert!(cut.is_err(), "{stop}: the router did not stop");
            let at_start = load(&state).unwrap();
            let p2 = start();
            // Docker has not listed the endpoint yet: it is kept.
            assert!(p2.forget_stale(&at_start, |_| Ok(Some(vec![])), || Ok(vec!["10.40.5.0/24".into()])).is_empty(), "{stop}");
            let j = p2.handle("/NetworkDriver.Join", b"").unwrap_or_else(|e| panic!("{stop}: {e}"));
            assert_eq!(j["InterfaceName"]["SrcName"], "vmc0123456789ab", "{stop}");
            assert!(fake.ports.lock().unwrap().contains("vmd0123456789ab"), "{stop}");
            assert!(p2.state().endpoints[EP].joined, "{stop}");
            assert!(load(&state).unwrap().calls.is_empty(), "{stop}");
            // Only once: a second empty Join has nothing to answer.
            let e = p2.handle("/NetworkDriver.Join", b"").unwrap_err();
            assert!(e.contains("Docker sent NetworkDriver.Join again without its request") && e.contains("run the command again"), "{e}");
        }
        // A RequestAddress whose address was saved, its answer lost: the same
        // address again, no second one.
        let p = start();
        let body = json!({"PoolID": pool_id}).to_string();
        let b = ok(&p, "/IpamDriver.RequestAddress", serde_json::from_str(&body).unwrap());
        let held = fake.allocated.lock().unwrap().len();
        let cut = PluginState { calls: vec![Call { call: "IpamDriver.RequestAddress".into(), body, answer: Some(b.clone()) }], ..p.state() };
        let p2 = Plugin::new(fake.clone(), cut, Some(state.docker_plugin()));
        assert_eq!(p2.handle("/IpamDriver.RequestAddress", b"\n").unwrap(), b);
        assert_eq!(fake.allocated.lock().unwrap().len(), held, "a second address was handed out");
        // One that was never kept (Docker's call was not read): an error, nothing done.
        let before = p2.state();
        let e = p2.handle("/NetworkDriver.CreateEndpoint", b"").unwrap_err();
        assert!(e.contains("without its request") && e.contains("nothing was done"), "{e}");
        assert_eq!(p2.state(), before);
        // The no-op calls are answered as ever.
        assert_eq!(p2.handle("/NetworkDriver.ProgramExternalConnectivity", b"").unwrap(), json!({}));
        assert!(p2.handle("/Plugin.Activate", b"").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A veth pair of the plugin's naming on the bridge whose endpoint the
    /// plugin forgot (the router stopped between saving a `Leave` or
    /// `DeleteEndpoint` and deleting the pair) is deleted; one of an endpoint
    /// the plugin or Docker knows, and ports of other names, stay. Before,
    /// nothing removed it.
    #[test]
    fn stray_ports_of_the_plugin_are_deleted() {
        let fake = Arc::new(Fake::default());
        let p = Plugin::new(fake.clone(), PluginState::default(), None);
        let pool_id = ok(&p, "/IpamDriver.RequestPool", json!({"Pool": "10.40.5.0/24"}))["PoolID"].as_str().unwrap().to_string();
        ok(&p, "/NetworkDriver.CreateNetwork", json!({"NetworkID": NET, "IPv4Data": [{"Pool": "10.40.5.0/24", "Gateway": ""}]}));
        let a = ok(&p, "/IpamDriver.RequestAddress", json!({"PoolID": pool_id}))["Address"].as_str().unwrap().to_string();
        ok(&p, "/NetworkDriver.CreateEndpoint", json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": a}}));
        ok(&p, "/NetworkDriver.Join", json!({"NetworkID": NET, "EndpointID": EP}));
        let docker_only = "feedfacecafe0123456789abcdef0123456789abcdef0123456789abcdef0123";
        for port in ["vmdaaaaaaaaaaaa", "vmdfeedfacecafe", "vmn0000b38", "vmdshort", "vmdaaaaaaaaaaaaa", "eth0", "vmd-aaaaaaaaaaa"] {
            fake.ports.lock().unwrap().insert(port.to_string());
        }
        let all = || fake.ports.lock().unwrap().clone();
        let before = all();
        assert!(p.delete_stray_ports(|| Err("engine down".into())).is_empty());
        assert_eq!(all(), before, "Docker could not say: nothing is deleted");
        assert_eq!(p.delete_stray_ports(|| Ok(vec![docker_only.to_string()])), vec!["vmdaaaaaaaaaaaa".to_string()]);
        let after = all();
        assert!(!after.contains("vmdaaaaaaaaaaaa"));
        assert_eq!(after.len(), before.len() - 1);
        assert!(after.contains("vmd0123456789ab"), "the joined endpoint's port was deleted");
        assert!(p.delete_stray_ports(|| Ok(vec![])).contains(&"vmdfeedfacecafe".to_string()));
        // Nothing of the plugin's naming left to look at: Docker is not asked.
        assert!(p.delete_stray_ports(|| panic!("Docker asked with no stray port")).is_empty());
    }

    #[test]
    fn a_live_socket_is_left_alone_and_a_dead_one_replaced() {
        let dir = std::env::temp_dir().join(format!("meshnet-plugin-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Socket::bind(&dir, "meshnet").unwrap().expect("free");
        assert!(Socket::bind(&dir, "meshnet").unwrap().is_none(), "a live socket must not be taken over");
        drop(first); // the listener closes; the file stays
        let mut second = Socket::bind(&dir, "meshnet").unwrap().expect("a dead socket is replaced");
        assert!(second.take_listener().is_some());
        second.remove();
        assert!(!dir.join("meshnet.sock").exists());
        assert!(Socket::bind(&dir, "../x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
