//! Docker containers as attach targets, through the Docker Engine API on a Unix
//! socket (`/var/run/docker.sock`, or `DOCKER_HOST=unix://...`).
//!
//! Two things live here:
//! * [`inspect`] / [`inspect_blocking`]: a container name or ID → its ID, name
//!   and main PID (so `/proc/PID/ns/net` is its network namespace);
//! * [`watch_events`]: the engine's event stream, calling back when a container
//!   starts, dies or is removed (and each time the stream is (re)connected), so
//!   the router can attach a restarted container again and release what a
//!   removed one held.
//!
//! Every call makes its own short-lived client: the blocking callers run on
//! threads of their own with a throwaway current-thread runtime, and a hyper
//! connection must not outlive the runtime it was made on.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::query_parameters::EventsOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;

/// Where the Docker Engine listens unless `DOCKER_HOST` says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Seconds one request to the engine may take.
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// A container, as the engine names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerId {
    /// Full 64-hex-digit ID.
    pub id: String,
    /// Name without the leading `/`; may be empty when the engine did not say.
    pub name: String,
}

impl ContainerId {
    /// The 12-digit short ID that `docker ps` shows.
    pub fn short(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

/// A container found by [`inspect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: ContainerId,
    /// PID of its main process in the engine's PID namespace; `None` when it is not running.
    pub pid: Option<u32>,
    /// The engine's state word: "running", "exited", "created", ...
    pub status: String,
    /// `Config.Hostname` and `Config.Domainname` as the engine gives them.
    pub hostname: String,
    pub domainname: String,
}

impl Container {
    /// Its host name with its domain (`docker run -h db.meshnet.local`, or
    /// `--hostname db --domainname meshnet.local`), when that has a dot.
    pub fn fqdn(&self) -> Option<String> {
        fqdn_of(&self.hostname, &self.domainname)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No socket, or nothing answers on it.
    #[error("no Docker Engine at {socket}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    NoEngine { socket: String, detail: Option<String> },
    #[error("no Docker container named {0:?}")]
    NoSuchContainer(String),
    #[error("Docker container {name} ({short}) is not running (state: {status})")]
    NotRunning { name: String, short: String, status: String },
    #[error("Docker Engine at {socket}: {message}")]
    Engine { socket: String, message: String },
}

/// The engine's socket path: `DOCKER_HOST` when it is a `unix://` address, else [`DEFAULT_SOCKET`].
pub fn socket_path() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => h.trim_start_matches("unix://").to_string(),
        _ => DEFAULT_SOCKET.to_string(),
    }
}

/// Connects to the engine at `socket` and agrees on an API version (engines
/// older than this client, such as 20.10 with API 1.41, are common).
pub async fn connect(socket: &str) -> Result<Docker, DockerError> {
    if !Path::new(socket).exists() {
        return Err(DockerError::NoEngine { socket: socket.to_string(), detail: None });
    }
    let docker = Docker::connect_with_unix(socket, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .map_err(|e| engine_error(socket, e))?;
    docker.negotiate_version().await.map_err(|e| engine_error(socket, e))
}

fn engine_error(socket: &str, e: BollardError) -> DockerError {
    match e {
        BollardError::SocketNotFoundError(_) => DockerError::NoEngine { socket: socket.to_string(), detail: None },
        BollardError::DockerResponseServerError { message, .. } => {
            DockerError::Engine { socket: socket.to_string(), message }
        }
        // Connection refused, a dead socket file, a timeout: nobody serves there.
        other => DockerError::NoEngine { socket: socket.to_string(), detail: Some(other.to_string()) },
    }
}

/// Looks up a container by name or (short) ID on the engine at `socket`.
pub async fn inspect_at(socket: &str, name_or_id: &str) -> Result<Container, DockerError> {
    if !plausible_reference(name_or_id) {
        return Err(DockerError::NoSuchContainer(name_or_id.to_string()));
    }
    let docker = connect(socket).await?;
    let info = match docker.inspect_container(name_or_id, None).await {
        Ok(i) => i,
        Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => {
            return Err(DockerError::NoSuchContainer(name_or_id.to_string()))
        }
        Err(e) => return Err(engine_error(socket, e)),
    };
    let id = ContainerId {
        id: info.id.unwrap_or_default(),
        name: info.name.unwrap_or_default().trim_start_matches('/').to_string(),
    };
    let state = info.state.unwrap_or_default();
    let status = state.status.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into());
    let pid = match (state.running, state.pid) {
        (Some(true), Some(p)) if p > 0 => u32::try_from(p).ok(),
        _ => None,
    };
    let config = info.config.unwrap_or_default();
    let (hostname, domainname) = (config.hostname.unwrap_or_default(), config.domainname.unwrap_or_default());
    Ok(Container { id, pid, status, hostname, domainname })
}

/// `Config.Hostname` + `.` + `Config.Domainname`, as `weave attach` took it: a
/// name only if it has a dot (Docker's default host name, the short ID, has none).
pub fn fqdn_of(hostname: &str, domainname: &str) -> Option<String> {
    let domainname = domainname.trim_matches('.');
    let fqdn = if domainname.is_empty() { hostname.to_string() } else { format!("{hostname}.{domainname}") };
    let fqdn = fqdn.trim_end_matches('.');
    (fqdn.contains('.') && !fqdn.starts_with('.')).then(|| fqdn.to_string())
}

/// [`inspect_at`] on [`socket_path`].
pub async fn inspect(name_or_id: &str) -> Result<Container, DockerError> {
    inspect_at(&socket_path(), name_or_id).await
}

/// [`inspect`] for blocking code (the router's netlink work runs on tokio's
/// blocking pool): runs on a thread of its own with a small current-thread
/// runtime, so it works from any thread, inside a runtime or not.
pub fn inspect_blocking(name_or_id: &str) -> Result<Container, DockerError> {
    let socket = socket_path();
    block_on_own_thread(inspect_at(&socket, name_or_id))
}

/// The container that holds endpoint `endpoint_id` on network `network_id`, if
/// the engine lists it yet (the Docker plugin's `Join` names only the endpoint;
/// the engine lists the container once the join completed, so ask a little later).
pub fn container_of_endpoint_blocking(network_id: &str, endpoint_id: &str) -> Result<Option<ContainerId>, DockerError> {
    if !plausible_reference(network_id) {
        return Err(DockerError::Engine { socket: socket_path(), message: format!("invalid network ID {network_id:?}") });
    }
    let socket = socket_path();
    block_on_own_thread(async {
        let docker = connect(&socket).await?;
        let net = docker
            .inspect_network(network_id, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await
            .map_err(|e| engine_error(&socket, e))?;
        Ok(net
            .containers
            .unwrap_or_default()
            .into_iter()
            .find(|(_, c)| c.endpoint_id.as_deref() == Some(endpoint_id))
            .map(|(id, c)| ContainerId { id, name: c.name.unwrap_or_default() }))
    })
}

/// The endpoint IDs the engine lists on network `network_id` (those of its
/// running containers); `None` when the engine has no such network.
pub fn endpoints_of_network_blocking(network_id: &str) -> Result<Option<Vec<String>>, DockerError> {
    if !plausible_reference(network_id) {
        return Err(DockerError::Engine { socket: socket_path(), message: format!("invalid network ID {network_id:?}") });
    }
    let socket = socket_path();
    block_on_own_thread(async {
        let docker = connect(&socket).await?;
        match docker.inspect_network(network_id, None::<bollard::query_parameters::InspectNetworkOptions>).await {
            Ok(net) => Ok(Some(net.containers.unwrap_or_default().into_values().filter_map(|c| c.endpoint_id).collect())),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(engine_error(&socket, e)),
        }
    })
}

/// Every network the engine has.
async fn networks(docker: &Docker, socket: &str) -> Result<Vec<bollard::models::Network>, DockerError> {
    docker
        .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
        .await
        .map_err(|e| engine_error(socket, e))
}

/// The endpoint IDs the engine lists on its networks of network driver `driver`.
pub fn endpoints_of_driver_blocking(driver: &str) -> Result<Vec<String>, DockerError> {
    let socket = socket_path();
    block_on_own_thread(async {
        let docker = connect(&socket).await?;
        let nets = networks(&docker, &socket).await?;
        let mut endpoints = Vec::new();
        for id in nets.into_iter().filter(|n| n.driver.as_deref() == Some(driver)).filter_map(|n| n.id) {
            match docker.inspect_network(&id, None::<bollard::query_parameters::InspectNetworkOptions>).await {
                Ok(net) => endpoints.extend(net.containers.unwrap_or_default().into_values().filter_map(|c| c.endpoint_id)),
                // Removed since it was listed.
                Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(e) => return Err(engine_error(&socket, e)),
            }
        }
        Ok(endpoints)
    })
}

/// The subnets of the engine's networks whose IPAM driver is `driver`.
pub fn subnets_of_ipam_driver_blocking(driver: &str) -> Result<Vec<String>, DockerError> {
    let socket = socket_path();
    block_on_own_thread(async {
        let docker = connect(&socket).await?;
        let nets = networks(&docker, &socket).await?;
        Ok(nets
            .into_iter()
            .filter_map(|n| n.ipam)
            .filter(|i| i.driver.as_deref() == Some(driver))
            .flat_map(|i| i.config.unwrap_or_default())
            .filter_map(|c| c.subnet)
            .collect())
    })
}

fn block_on_own_thread<T: Send>(fut: impl Future<Output = Result<T, DockerError>> + Send) -> Result<T, DockerError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| DockerError::Engine { socket: socket_path(), message: format!("runtime: {e}") })?;
            rt.block_on(fut)
        })
        .join()
        .unwrap_or_else(|_| Err(DockerError::Engine { socket: socket_path(), message: "lookup thread panicked".into() }))
    })
}

/// Docker names are `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, IDs hex: anything else is not
/// worth asking the engine about (and must not be pasted into a URL path).
pub fn plausible_reference(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && s.len() <= 255
}

/// What the engine's event stream reports to [`watch_events`]' callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// The stream is (re)connected: events may have been missed, look again.
    Connected,
    /// A container's main process started (`docker start`, `docker restart`, a restart policy).
    Started(ContainerId),
    /// A container's main process ended; the container still exists.
    Died(ContainerId),
    /// A container was removed.
    Destroyed(ContainerId),
}

/// Watches the engine's events for containers that start, die or are removed
/// and calls `on_event` for each (events missed while disconnected are asked
/// for again, so one may come twice: callers must be idempotent). Never returns.
///
/// With no engine, it logs that once and checks again every few seconds; when
/// the engine goes away (restarts), it reconnects with backoff and asks for the
/// events it missed since the stream broke.
pub async fn watch_events(on_event: impl Fn(EngineEvent) + Send + Sync + 'static) {
    watch_events_at(socket_path(), on_event).await
}

/// [`watch_events`] on a given socket.
pub async fn watch_events_at(socket: String, on_event: impl Fn(EngineEvent) + Send + Sync + 'static) {
    let mut said_absent = false;
    let mut backoff = Duration::from_secs(1);
    let mut since: Option<i64> = None;
    loop {
        let docker = match connect(&socket).await {
            Ok(d) => d,
            Err(e) => {
                if !said_absent {
                    log::info!("{e}: not watching containers (checking again in the background)");
                    said_absent = true;
                }
                tokio::time::sleep(if matches!(e, DockerError::NoEngine { detail: None, .. }) {
                    Duration::from_secs(5)
                } else {
                    backoff
                })
                .await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if said_absent || since.is_some() {
            log::info!("Docker Engine at {socket}: watching container events again");
        } else {
            log::info!("Docker Engine at {socket}: watching container events");
        }
        said_absent = false;
        let filters: HashMap<&str, Vec<&str>> =
            HashMap::from([("type", vec!["container"]), ("event", vec!["start", "die", "destroy"])]);
        let mut opts = EventsOptionsBuilder::new().filters(&filters);
        let since_text = since.map(|s| s.to_string());
        if let Some(s) = &since_text {
            opts = opts.since(s);
        }
        let mut stream = docker.events(Some(opts.build()));
        on_event(EngineEvent::Connected);
        let mut got_any = false;
        let why = loop {
            match stream.next().await {
                None => break "the engine closed the event stream".to_string(),
                Some(Err(e)) => break e.to_string(),
                Some(Ok(ev)) => {
                    if !got_any {
                        got_any = true;
                        backoff = Duration::from_secs(1);
                    }
                    let Some(actor) = ev.actor else { continue };
                    let Some(id) = actor.id.filter(|i| !i.is_empty()) else { continue };
                    let name = actor
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get("name"))
                        .cloned()
                        .unwrap_or_default();
                    let action = ev.action.as_deref().unwrap_or("?");
                    log::debug!("container {name} ({}) {action}", &id[..id.len().min(12)]);
                    let c = ContainerId { id, name };
                    match action {
                        "start" => on_event(EngineEvent::Started(c)),
                        "die" => on_event(EngineEvent::Died(c)),
                        "destroy" => on_event(EngineEvent::Destroyed(c)),
                        _ => {}
                    }
                }
            }
        };
        // Replay from a little before the break: the engine filters by time.
        since = Some(unix_now() - 1);
        log::warn!("Docker Engine at {socket}: event stream ended ({why}); reconnecting in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_with_a_domain_are_names() {
        assert_eq!(fqdn_of("seetwo.meshnet.local", "").as_deref(), Some("seetwo.meshnet.local"));
        assert_eq!(fqdn_of("seetwo", "meshnet.local.").as_deref(), Some("seetwo.meshnet.local"));
        assert_eq!(fqdn_of("db.meshnet.local.", "").as_deref(), Some("db.meshnet.local"));
        // Docker's default host name (the short ID) and empty ones are no names.
        assert_eq!(fqdn_of("3f4e5a6b7c8d", ""), None);
        assert_eq!(fqdn_of("", ""), None);
        assert_eq!(fqdn_of("", "meshnet.local"), None);
    }

    #[test]
    fn references() {
        for ok in ["weave_test", "c1", "3f4e5a6b7c8d", "my.app-1"] {
            assert!(plausible_reference(ok), "{ok}");
        }
        for bad in ["", "/x", "../x", "a/b", "-x", "a b", "a?b", "a%2fb"] {
            assert!(!plausible_reference(bad), "{bad}");
        }
    }

    #[test]
    fn no_engine_is_said_plainly() {
        let e = block_on_own_thread(inspect_at("/nonexistent/docker.sock", "c1")).unwrap_err();
        assert!(matches!(e, DockerError::NoEngine { .. }), "{e:?}");
        assert_eq!(e.to_string(), "no Docker Engine at /nonexistent/docker.sock");
    }

    #[test]
    fn a_dead_socket_is_no_engine() {
        let dir = std::env::temp_dir().join(format!("meshnet-docker-dead-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("docker.sock");
        let _ = std::fs::remove_file(&path);
        // Bound, then dropped: the file stays, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = block_on_own_thread(inspect_at(path.to_str().unwrap(), "c1")).unwrap_err();
        assert!(matches!(e, DockerError::NoEngine { .. }), "{e:?}");
        assert!(e.to_string().starts_with(&format!("no Docker Engine at {}", path.display())), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn short_ids() {
        let c = ContainerId { id: "3f4e5a6b7c8d9e0f".into(), name: "x".into() };
        assert_eq!(c.short(), "3f4e5a6b7c8d");
        assert_eq!(ContainerId { id: "ab".into(), name: String::new() }.short(), "ab");
    }
}
