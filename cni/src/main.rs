//! `meshnet-cni`: a CNI plugin (spec 1.0; results also for 0.3.x/0.4.0) that
//! puts a pod's network namespace on the meshnet overlay.
//!
//! It is a thin client of the node's meshnet router: ADD asks the router,
//! through the control socket in the state directory, to attach the namespace
//! (`CNI_NETNS`) with interface `CNI_IFNAME` and the addresses of
//! `ipam.addresses` (or, without them, addresses from meshnet's IPAM); the
//! router sets the MTU. A pod whose address is inside meshnet's range (and
//! whose configuration names no gateway or default route) gets a default route
//! through the node's exposed address in its subnet, which the router exposes
//! the first time one is needed; its bridge port gets hairpin mode (unless
//! `"hairpinMode": false`). `ipam.subnet` allocates inside that subnet. The node's
//! exposed address stays when pods go.
//! DEL detaches (idempotent), CHECK compares the router's
//! view with the previous result, VERSION lists the supported versions.
//!
//! Network configuration (stdin):
//! ```json
//! {"cniVersion": "1.0.0", "name": "meshnet", "type": "meshnet-cni",
//!  "stateDir": "/var/lib/meshnet",
//!  "ipam": {"addresses": [{"address": "10.40.0.5/16", "gateway": "10.40.0.1"}],
//!           "routes": [{"dst": "10.41.0.0/16", "gw": "10.40.0.1"}],
//!           "dns": {"nameservers": ["10.40.0.1"]}}}
//! ```
//! Errors are CNI error objects on stdout with a non-zero exit.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use meshnet_control::api::{self, ClientError, PsEntry, Request};
use meshnet_control::attach::parse_cidr;
use meshnet_control::state::{write_atomic, StateDir, DEFAULT_STATE_DIR};
use serde::Deserialize;
use serde_json::{json, Value};

/// Versions whose configuration we accept and whose result format we produce.
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long one request to the router may take (an attach enters a namespace,
/// and may wait for IPAM).
const ROUTER_TIMEOUT: Duration = Duration::from_secs(60);

// CNI error codes (spec, "Error"); 100 and up are ours.
const E_VERSION: u32 = 1;
const E_UNSUPPORTED_FIELD: u32 = 2;
const E_UNKNOWN_CONTAINER: u32 = 3;
const E_ENV: u32 = 4;
const E_IO: u32 = 5;
const E_DECODE: u32 = 6;
const E_CONFIG: u32 = 7;
const E_TRY_AGAIN: u32 = 11;
/// The router refused the request (its message is in `msg`).
const E_ROUTER: u32 = 100;
/// CHECK: the interface or its addresses are not what the previous result says.
const E_CHECK: u32 = 101;

#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

fn err(code: u32, msg: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: String::new() }
}

fn err_details(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: details.into() }
}

/// The network configuration. Unknown keys (`args`, `runtimeConfig`,
/// `capabilities`, ...) are accepted and ignored, as the spec asks.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    ipam: Option<Ipam>,
    #[serde(default)]
    dns: Option<Value>,
    #[serde(default)]
    prev_result: Option<Value>,
    /// Hairpin mode on the pod's bridge port (Weave's key; default on).
    #[serde(default)]
    hairpin_mode: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct Ipam {
    /// Absent or "meshnet": we allocate (statically or from meshnet's IPAM).
    #[serde(default, rename = "type")]
    ipam_type: Option<String>,
    #[serde(default)]
    addresses: Vec<IpamAddress>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Option<Value>,
    /// Allocate from meshnet's IPAM inside this subnet (Weave's `weave-ipam`
    /// key) rather than the default subnet; excludes `addresses`.
    #[serde(default)]
    subnet: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IpamAddress {
    Plain(String),
    Full {
        address: String,
        #[serde(default)]
        gateway: Option<IpAddr>,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct Route {
    dst: String,
    #[serde(default)]
    gw: Option<IpAddr>,
}

struct Env {
    command: String,
    container_id: String,
    netns: String,
    ifname: String,
}

fn main() -> ExitCode {
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    // The version errors are reported in: the configuration's when it is one we speak.
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_string());
    let result = match read {
        Err(e) => Err(err(E_IO, format!("reading the network configuration from stdin: {e}"))),
        Ok(_) => run(&command, &stdin),
    };
    match result {
        Ok(Some(out)) => {
            println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let out = json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details });
            println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
            ExitCode::FAILURE
        }
    }
}

fn run(command: &str, stdin: &str) -> Result<Option<Value>, CniError> {
    match command {
        "VERSION" => Ok(Some(version_result(stdin))),
        "ADD" | "DEL" | "CHECK" => {
            let conf = parse_conf(stdin)?;
            if command == "CHECK" && !has_check(&conf.cni_version) {
                // As the reference plugins' skel: CHECK is defined from 0.4.0 on.
                return Err(err_details(
                    E_VERSION,
                    "config version does not allow CHECK",
                    format!("CHECK exists from cniVersion 0.4.0 on; this configuration has {}", conf.cni_version),
                ));
            }
            let env = read_env(command)?;
            match command {
                "ADD" => add(&conf, &env).map(Some),
                "DEL" => del(&conf, &env).map(|_| None),
                _ => check(&conf, &env).map(|_| None),
            }
        }
        "" => Err(err(E_ENV, "CNI_COMMAND is not set (ADD, DEL, CHECK or VERSION)")),
        other => Err(err(E_ENV, format!("unknown CNI_COMMAND {other:?} (ADD, DEL, CHECK or VERSION)"))),
    }
}

/// Whether spec version `v` (one of [`SUPPORTED`]) has the CHECK command (0.4.0 and later).
fn has_check(v: &str) -> bool {
    !matches!(v, "0.3.0" | "0.3.1")
}

fn version_result(stdin: &str) -> Value {
    let asked = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .unwrap_or_else(|| "1.0.0".into());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED })
}

fn parse_conf(stdin: &str) -> Result<NetConf, CniError> {
    let raw: Value = serde_json::from_str(stdin)
        .map_err(|e| err_details(E_DECODE, "the network configuration is not JSON", e.to_string()))?;
    let conf: NetConf = serde_json::from_value(raw)
        .map_err(|e| err_details(E_CONFIG, "invalid network configuration", e.to_string()))?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(err_details(
            E_VERSION,
            format!("cniVersion {:?} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED.join(", ")),
        ));
    }
    let name_ok = conf.name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && conf.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !name_ok {
        return Err(err(E_CONFIG, format!("invalid network name {:?}", conf.name)));
    }
    if conf.plugin_type.is_empty() {
        return Err(err(E_CONFIG, "the network configuration has no type"));
    }
    if let Some(dir) = conf.state_dir.as_ref().filter(|d| !d.is_absolute()) {
        // The runtime's working directory is nobody's business: a relative one
        // would name no router, and "try again later" would never end.
        return Err(err(E_CONFIG, format!("stateDir {:?} is not an absolute path", dir.display().to_string())));
    }
    if let Some(ipam) = conf.ipam.as_ref() {
        if let Some(subnet) = ipam.subnet.as_deref() {
            if !ipam.addresses.is_empty() {
                return Err(err(E_CONFIG, "ipam.subnet and ipam.addresses exclude each other: give one of them"));
            }
            parse_cidr(subnet).map_err(|e| err(E_CONFIG, format!("ipam.subnet: {e:#}")))?;
        }
    }
    if let Some(t) = conf.ipam.as_ref().and_then(|i| i.ipam_type.as_deref()) {
        if t != "meshnet" {
            return Err(err_details(
                E_UNSUPPORTED_FIELD,
                format!("ipam.type {t:?} is not supported"),
                "meshnet-cni assigns addresses itself: give ipam.addresses, or leave ipam out to use meshnet's IPAM",
            ));
        }
    }
    Ok(conf)
}

fn read_env(command: &str) -> Result<Env, CniError> {
    let get = |k: &str| std::env::var(k).unwrap_or_default();
    let env = Env { command: command.into(), container_id: get("CNI_CONTAINERID"), netns: get("CNI_NETNS"), ifname: get("CNI_IFNAME") };
    if env.container_id.is_empty() {
        return Err(err(E_ENV, "CNI_CONTAINERID is not set"));
    }
    if env.ifname.is_empty() {
        return Err(err(E_ENV, "CNI_IFNAME is not set"));
    }
    let ifname_ok = env.ifname.len() <= 15
        && !matches!(env.ifname.as_str(), "." | "..")
        && !env.ifname.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if !ifname_ok {
        return Err(err(E_ENV, format!("CNI_IFNAME {:?} is not a valid interface name", env.ifname)));
    }
    if env.command != "DEL" {
        if env.netns.is_empty() {
            return Err(err(E_ENV, "CNI_NETNS is not set"));
        }
        if std::env::var_os("CNI_PATH").is_none() {
            return Err(err(E_ENV, "CNI_PATH is not set"));
        }
    }
    if !env.netns.is_empty() && !env.netns.starts_with('/') {
        return Err(err(E_ENV, format!("CNI_NETNS {:?} is not an absolute path", env.netns)));
    }
    if !env.container_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(err(E_ENV, format!("CNI_CONTAINERID {:?} has characters other than letters, digits, _ . -", env.container_id)));
    }
    Ok(env)
}

fn state_dir(conf: &NetConf) -> StateDir {
    StateDir::new(conf.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)))
}

/// Sends one request to the router, turning failures into CNI errors.
fn router(conf: &NetConf, req: &Request) -> Result<Value, CniError> {
    let state = state_dir(conf);
    api::call(&state, req, ROUTER_TIMEOUT).map_err(|e| match e {
        ClientError::NotRunning(dir) => err_details(
            E_TRY_AGAIN,
            format!("no meshnet router is running for state directory {dir}"),
            "start it (meshnet launch, the meshnet DaemonSet) and retry",
        ),
        ClientError::Router(msg) => err(E_ROUTER, format!("meshnet router: {msg}")),
        ClientError::Io(e) => err(E_IO, format!("talking to the meshnet router: {e}")),
        ClientError::Protocol(e) => err(E_IO, format!("bad answer from the meshnet router: {e}")),
    })
}

// ---------------------------------------------------------------------------
// ADD

fn add(conf: &NetConf, env: &Env) -> Result<Value, CniError> {
    if !Path::new(&env.netns).exists() {
        return Err(err(E_UNKNOWN_CONTAINER, format!("network namespace {} does not exist", env.netns)));
    }
    let ipam = conf.ipam.as_ref();
    let mut wanted: Vec<(String, Option<IpAddr>)> = Vec::new();
    for a in ipam.map(|i| i.addresses.as_slice()).unwrap_or_default() {
        let (text, gw) = match a {
            IpamAddress::Plain(s) => (s.clone(), None),
            IpamAddress::Full { address, gateway } => (address.clone(), *gateway),
        };
        let (ip, prefix) = parse_cidr(&text).map_err(|e| err(E_CONFIG, format!("ipam.addresses: {e:#}")))?;
        if let Some(g) = gw {
            if g.is_ipv4() != ip.is_ipv4() {
                return Err(err(E_CONFIG, format!("ipam.addresses: gateway {g} is not of the family of {text}")));
            }
        }
        wanted.push((format!("{ip}/{prefix}"), gw));
    }
    let routes = parse_routes(ipam.map(|i| i.routes.as_slice()).unwrap_or_default())?;
    let mut cidrs: Vec<String> = wanted.iter().map(|(c, _)| c.clone()).collect();
    if let Some(subnet) = ipam.and_then(|i| i.subnet.as_deref()) {
        // The router's `net:` form: any free address of that subnet from its
        // IPAM (it refuses a subnet outside the range, or with host bits set).
        cidrs.push(format!("net:{subnet}"));
    }

    let answer = router(
        conf,
        &Request::Attach {
            target: env.netns.clone(),
            cidrs,
            ifname: Some(env.ifname.clone()),
            no_multicast_route: false,
            without_dns: false,
            rewrite_hosts: false,
            add_hosts: vec![],
            hairpin: conf.hairpin_mode.unwrap_or(true),
        },
    )?;
    remember(conf, env)?;
    let mac = answer["mac"].as_str().unwrap_or_default().to_string();
    let addresses: Vec<String> = serde_json::from_value(answer["addresses"].clone()).unwrap_or_default();
    if addresses.is_empty() {
        return Err(err(E_ROUTER, "the meshnet router attached the interface but gave it no address"));
    }
    let mut routes = routes;
    // The pod's way off the overlay: a default route through the node's
    // address in the pod's subnet (the router exposes one when none is yet),
    // unless the configuration names a gateway or a default route itself.
    let mut gateway: Option<(String, IpAddr)> = None;
    let configured = routes.iter().any(|(ip, prefix, _)| ip.is_ipv4() && *prefix == 0)
        || wanted.iter().any(|(_, gw)| gw.is_some_and(|g| g.is_ipv4()));
    if !configured {
        if let Some((addr, gw)) = node_gateway(conf, &addresses)? {
            routes.push((IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0, Some(gw)));
            gateway = Some((addr, gw));
        }
    }
    if !routes.is_empty() {
        add_routes(&env.netns, &env.ifname, &routes)
            .map_err(|e| err_details(E_IO, format!("adding routes in {}", env.netns), e))?;
    }

    let old = conf.cni_version.starts_with("0.");
    let mut interface = json!({ "name": env.ifname, "sandbox": env.netns });
    if !mac.is_empty() {
        interface["mac"] = json!(mac);
    }
    let ips: Vec<Value> = addresses
        .iter()
        .map(|a| {
            let ip: Option<IpAddr> = a.split('/').next().and_then(|s| s.parse().ok());
            let mut o = json!({ "address": a, "interface": 0 });
            if let Some((_, Some(gw))) = wanted.iter().find(|(w, _)| w == a) {
                o["gateway"] = json!(gw.to_string());
            }
            if let Some((_, gw)) = gateway.as_ref().filter(|(g, _)| g == a) {
                o["gateway"] = json!(gw.to_string());
            }
            if old {
                o["version"] = json!(if ip.is_some_and(|i| i.is_ipv6()) { "6" } else { "4" });
            }
            o
        })
        .collect();
    let routes_out: Vec<Value> = routes
        .iter()
        .map(|r| {
            let mut o = json!({ "dst": format!("{}/{}", r.0, r.1) });
            if let Some(gw) = r.2 {
                o["gw"] = json!(gw.to_string());
            }
            o
        })
        .collect();
    let dns = conf.dns.clone().or_else(|| ipam.and_then(|i| i.dns.clone())).unwrap_or_else(|| json!({}));
    Ok(json!({
        "cniVersion": conf.cni_version,
        "interfaces": [interface],
        "ips": ips,
        "routes": routes_out,
        "dns": dns,
    }))
}

type ParsedRoute = (IpAddr, u8, Option<IpAddr>);

/// The first IPv4 address of `addresses` inside meshnet's IP allocation range,
/// and the node's exposed address in its subnet (exposed now if there is none).
fn node_gateway(conf: &NetConf, addresses: &[String]) -> Result<Option<(String, IpAddr)>, CniError> {
    let ipam = router(conf, &Request::IpamStatus)?;
    let Some(range) = ipam["range"].as_str().and_then(v4_net) else { return Ok(None) };
    let Some((addr, net)) = addresses.iter().find_map(|a| {
        let (ip, prefix) = v4_net(a)?;
        let in_range = prefix >= range.1 && mask(ip, range.1) == range.0;
        in_range.then(|| (a.clone(), (mask(ip, prefix), prefix)))
    }) else {
        return Ok(None);
    };
    let answer = router(conf, &Request::Expose { cidrs: vec![format!("net:{}/{}", net.0, net.1)], masquerade: None, name: None })
        .map_err(|e| err_details(e.code, format!("exposing the node on {}/{}: {}", net.0, net.1, e.msg), e.details))?;
    let gw = answer["addresses"][0]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .ok_or_else(|| err(E_ROUTER, format!("the meshnet router exposed no address in {}/{}", net.0, net.1)))?;
    Ok(Some((addr, gw)))
}

fn v4_net(cidr: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (ip, prefix) = cidr.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((ip.parse().ok()?, prefix))
}

fn mask(ip: std::net::Ipv4Addr, prefix: u8) -> std::net::Ipv4Addr {
    let m = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    std::net::Ipv4Addr::from(u32::from(ip) & m)
}

fn parse_routes(routes: &[Route]) -> Result<Vec<ParsedRoute>, CniError> {
    routes
        .iter()
        .map(|r| {
            let (ip, prefix) = r
                .dst
                .split_once('/')
                .and_then(|(ip, p)| Some((ip.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?)))
                .filter(|(ip, p)| *p <= if ip.is_ipv4() { 32 } else { 128 })
                .ok_or_else(|| err(E_CONFIG, format!("ipam.routes: invalid dst {:?}", r.dst)))?;
            if let Some(gw) = r.gw {
                if gw.is_ipv4() != ip.is_ipv4() {
                    return Err(err(E_CONFIG, format!("ipam.routes: gw {gw} is not of the family of {}", r.dst)));
                }
            }
            Ok((ip, prefix, r.gw))
        })
        .collect()
}

/// Adds `routes` via `ifname` inside the namespace at `netns` (existing ones are replaced).
fn add_routes(netns: &str, ifname: &str, routes: &[ParsedRoute]) -> Result<(), String> {
    use futures::TryStreamExt;
    use rtnetlink::RouteMessageBuilder;
    use std::net::{Ipv4Addr, Ipv6Addr};

    let ns = meshnet_router::netns::Netns { path: PathBuf::from(netns), label: netns.to_string() };
    let ifname = ifname.to_string();
    let routes = routes.to_vec();
    meshnet_router::netns::run_in(&ns, move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            let driver = tokio::spawn(conn);
            let result = async {
                let link = handle
                    .link()
                    .get()
                    .match_name(ifname.clone())
                    .execute()
                    .try_next()
                    .await
                    .map_err(|e| format!("look up {ifname}: {e}"))?
                    .ok_or_else(|| format!("{ifname} not found"))?;
                let index = link.header.index;
                for (dst, prefix, gw) in routes {
                    let msg = match (dst, gw) {
                        (IpAddr::V4(d), gw) => {
                            let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d, prefix).output_interface(index);
                            if let Some(IpAddr::V4(g)) = gw {
                                b = b.gateway(g);
                            }
                            b.build()
                        }
                        (IpAddr::V6(d), gw) => {
                            let mut b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d, prefix).output_interface(index);
                            if let Some(IpAddr::V6(g)) = gw {
                                b = b.gateway(g);
                            }
                            b.build()
                        }
                    };
                    handle
                        .route()
                        .add(msg)
                        .replace()
                        .execute()
                        .await
                        .map_err(|e| format!("route {dst}/{prefix}: {e}"))?;
                }
                Ok(())
            }
            .await;
            driver.abort();
            result
        })
    })
    .map_err(|e| e.to_string())?
}

// ---------------------------------------------------------------------------
// What ADD attached, so DEL without CNI_NETNS still finds it.

fn record_path(conf: &NetConf, env: &Env) -> PathBuf {
    state_dir(conf).root.join("cni").join(format!("{}-{}-{}", conf.name, env.container_id, env.ifname))
}

/// Writes the note DEL finds the pod by when the runtime gives no CNI_NETNS.
/// A note that cannot be written fails the ADD: such a DEL would find nothing
/// and say the pod is gone while it stays attached. (The runtime's DEL after a
/// failed ADD carries CNI_NETNS, and detaches it.)
fn remember(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let path = record_path(conf, env);
    let failed = |e: String| {
        err(
            E_IO,
            format!(
                "the pod is attached, but its note {} could not be written ({e}): a DEL without CNI_NETNS would not find it; make {} writable",
                path.display(),
                path.parent().unwrap_or(Path::new(".")).display()
            ),
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("create {}: {e}", dir.display())))?;
        prune_notes(dir);
    }
    let body = json!({ "netns": env.netns, "ifname": env.ifname, "containerId": env.container_id });
    write_atomic(&path, body.to_string().as_bytes(), 0o600).map_err(|e| failed(format!("{e:#}")))
}

/// Removes the notes of pods whose network namespace is gone. A DEL that
/// failed (no router running) while the namespace still existed left its note,
/// and runtimes do not send it again; once the namespace is gone a DEL needs
/// no note (the router forgets a deleted namespace itself), so each ADD sweeps.
fn prune_notes(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let netns = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["netns"].as_str().map(String::from));
        // Notes not written by `remember` (no netns in them) are left alone.
        if netns.is_some_and(|n| !n.is_empty() && !Path::new(&n).exists()) {
            // (Another ADD may have removed it first.)
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn recalled_netns(conf: &NetConf, env: &Env) -> Option<String> {
    let text = std::fs::read_to_string(record_path(conf, env)).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["netns"].as_str().map(String::from)
}

// ---------------------------------------------------------------------------
// DEL

fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let netns = if env.netns.is_empty() { recalled_netns(conf, env) } else { Some(env.netns.clone()) };
    let Some(netns) = netns else {
        // Nothing we know of: already gone.
        return Ok(());
    };
    // Only CNI_IFNAME is ours to remove. A namespace the router has attached
    // under another name (this pod's interface of another network, or of this
    // one: the DEL a runtime sends after an ADD that failed because the pod was
    // attached already) keeps that interface and its addresses.
    if Path::new(&netns).exists() {
        if let Some(entry) = attachment_of(conf, &netns)? {
            if interface_of(&entry) != env.ifname {
                // (There may be none: net1 of a pod attached as eth0 left none.)
                let _ = std::fs::remove_file(record_path(conf, env));
                return Ok(());
            }
        }
    }
    match router(conf, &Request::Detach { target: netns.clone(), cidrs: vec![] }) {
        Ok(_) => {}
        // The namespace is gone and with it the interface; the router forgets it
        // when it next starts. Nothing for the runtime to retry.
        Err(e) if e.code == E_TRY_AGAIN && !Path::new(&netns).exists() => {}
        Err(e) => return Err(e),
    }
    // The note goes once the pod is detached (none is there after a DEL done
    // already; one left behind names a detached pod: a later DEL of it
    // detaches nothing).
    let _ = std::fs::remove_file(record_path(conf, env));
    Ok(())
}

// ---------------------------------------------------------------------------
// CHECK

fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if !Path::new(&env.netns).exists() {
        return Err(err(E_UNKNOWN_CONTAINER, format!("network namespace {} does not exist", env.netns)));
    }
    let same_ns = |t: &str| t == env.netns || same_file(t, &env.netns);
    let Some(entry) = attachment_of(conf, &env.netns)? else {
        return Err(err(E_CHECK, format!("{} is not attached to meshnet", env.netns)));
    };
    let iface = interface_of(&entry);
    if iface != env.ifname {
        return Err(err(E_CHECK, format!("{} is attached as {iface}, not {}", env.netns, env.ifname)));
    }
    if entry.mac == "-" {
        return Err(err(E_CHECK, format!("{} has no interface {} any more", env.netns, env.ifname)));
    }
    let Some(prev) = &conf.prev_result else {
        return Ok(());
    };
    // Addresses of the previous result that belong to our interface.
    let ifaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let ours: BTreeMap<usize, bool> = ifaces
        .iter()
        .enumerate()
        .map(|(i, x)| (i, x["name"] == env.ifname.as_str() && x["sandbox"].as_str().is_some_and(same_ns)))
        .collect();
    for ip in prev["ips"].as_array().cloned().unwrap_or_default() {
        let Some(addr) = ip["address"].as_str() else { continue };
        let mine = match ip["interface"].as_u64() {
            Some(i) => ours.get(&(i as usize)).copied().unwrap_or(false),
            None => true,
        };
        if mine && !entry.addresses.iter().any(|a| a == addr) {
            return Err(err_details(
                E_CHECK,
                format!("{} in {} lacks address {addr}", env.ifname, env.netns),
                format!("it has: {}", entry.addresses.join(" ")),
            ));
        }
    }
    if let Some(mac) = ifaces.iter().find(|x| x["name"] == env.ifname.as_str()).and_then(|x| x["mac"].as_str()) {
        if !mac.eq_ignore_ascii_case(&entry.mac) {
            return Err(err(E_CHECK, format!("{} in {} has MAC {}, not {mac}", env.ifname, env.netns, entry.mac)));
        }
    }
    Ok(())
}

/// The router's attachment of the namespace at `netns`, if it has one.
fn attachment_of(conf: &NetConf, netns: &str) -> Result<Option<PsEntry>, CniError> {
    let ps = router(conf, &Request::Ps)?;
    let entries: Vec<PsEntry> = serde_json::from_value(ps).map_err(|e| err(E_IO, format!("bad answer from the meshnet router: {e}")))?;
    Ok(entries.into_iter().find(|e| e.target == netns || same_file(&e.target, netns)))
}

/// The interface an attachment has inside its namespace.
fn interface_of(entry: &PsEntry) -> &str {
    if entry.interface.is_empty() { "ethwe" } else { entry.interface.as_str() }
}

fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes of pods whose namespace is gone go at the next ADD (a DEL that
    /// failed with no router running left them for good); others stay.
    #[test]
    fn notes_of_gone_namespaces_are_pruned() {
        let dir = std::env::temp_dir().join(format!("meshnet-cni-notes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live = dir.join("a-namespace-that-exists");
        std::fs::write(&live, "").unwrap();
        let note = |netns: &str| json!({ "netns": netns, "ifname": "eth0", "containerId": "x" }).to_string();
        std::fs::write(dir.join("net-live-eth0"), note(&live.to_string_lossy())).unwrap();
        std::fs::write(dir.join("net-gone-eth0"), note("/var/run/netns/meshnet-test-no-such-ns")).unwrap();
        std::fs::write(dir.join("other-file"), "not a note").unwrap();
        prune_notes(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["a-namespace-that-exists", "net-live-eth0", "other-file"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pod_subnets() {
        assert_eq!(v4_net("10.2.1.5/24"), Some(("10.2.1.5".parse().unwrap(), 24)));
        assert_eq!(mask("10.2.1.5".parse().unwrap(), 24), "10.2.1.0".parse::<std::net::Ipv4Addr>().unwrap());
        assert_eq!(mask("10.47.255.1".parse().unwrap(), 12), "10.32.0.0".parse::<std::net::Ipv4Addr>().unwrap());
        assert_eq!(mask("10.2.1.5".parse().unwrap(), 0), std::net::Ipv4Addr::UNSPECIFIED);
        for bad in ["10.2.1.5", "10.2.1.5/33", "fd00::1/64", "x/8"] {
            assert_eq!(v4_net(bad), None, "{bad}");
        }
    }

    #[test]
    fn configurations() {
        let ok = r#"{"cniVersion":"1.0.0","name":"meshnet","type":"meshnet-cni","stateDir":"/x",
                     "ipam":{"addresses":["10.40.0.5/16",{"address":"10.40.0.6/16","gateway":"10.40.0.1"}]},
                     "runtimeConfig":{"a":1},"args":{}}"#;
        let c = parse_conf(ok).unwrap();
        assert_eq!(c.ipam.unwrap().addresses.len(), 2);
        assert_eq!(parse_conf("nope").unwrap_err().code, E_DECODE);
        assert_eq!(parse_conf(r#"{"name":"x","type":"t"}"#).unwrap_err().code, E_CONFIG);
        assert_eq!(parse_conf(r#"{"cniVersion":"9.9.9","name":"x","type":"t"}"#).unwrap_err().code, E_VERSION);
        assert_eq!(parse_conf(r#"{"cniVersion":"1.0.0","name":"a b","type":"t"}"#).unwrap_err().code, E_CONFIG);
        for dir in ["var/lib/meshnet", "", "./s"] {
            let rel = format!(r#"{{"cniVersion":"1.0.0","name":"x","type":"t","stateDir":"{dir}"}}"#);
            let e = parse_conf(&rel).unwrap_err();
            assert_eq!(e.code, E_CONFIG, "{dir}");
            assert!(e.msg.contains("not an absolute path"), "{}", e.msg);
        }
        let hl = r#"{"cniVersion":"1.0.0","name":"x","type":"t","ipam":{"type":"host-local"}}"#;
        assert_eq!(parse_conf(hl).unwrap_err().code, E_UNSUPPORTED_FIELD);
    }

    #[test]
    fn routes() {
        let r = parse_routes(&[Route { dst: "0.0.0.0/0".into(), gw: Some("10.40.0.1".parse().unwrap()) }]).unwrap();
        assert_eq!(r[0].1, 0);
        assert!(parse_routes(&[Route { dst: "10.0.0.0/33".into(), gw: None }]).is_err());
        assert!(parse_routes(&[Route { dst: "10.0.0.0/8".into(), gw: Some("fd00::1".parse().unwrap()) }]).is_err());
    }

    #[test]
    fn check_needs_0_4_0() {
        for v in ["0.3.0", "0.3.1"] {
            let conf = format!(r#"{{"cniVersion":"{v}","name":"meshnet","type":"meshnet-cni"}}"#);
            let e = run("CHECK", &conf).unwrap_err();
            assert_eq!((e.code, e.msg.as_str()), (E_VERSION, "config version does not allow CHECK"), "{v}");
            assert!(e.details.contains(v) && e.details.contains("0.4.0"), "{}", e.details);
        }
        // From 0.4.0 on CHECK goes on (here to the environment, which is unset).
        for v in ["0.4.0", "1.0.0"] {
            let conf = format!(r#"{{"cniVersion":"{v}","name":"meshnet","type":"meshnet-cni"}}"#);
            assert_eq!(run("CHECK", &conf).unwrap_err().code, E_ENV, "{v}");
        }
        assert!(SUPPORTED.iter().all(|v| has_check(v) == (*v >= "0.4.0")));
    }

    #[test]
    fn version() {
        let v = version_result(r#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["supportedVersions"].as_array().unwrap().iter().any(|x| x == "1.0.0"));
        assert_eq!(version_result("")["cniVersion"], "1.0.0");
    }
}
