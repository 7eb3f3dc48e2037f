//! The live map in a real browser: headless Chromium (Debian's `chromium`)
//! keeps the page of a three-host lab open, driven over the DevTools protocol.
//! The rendered DOM must show three peers and the three direct edges, the
//! page must log no error, and once a host is stopped the open page must show
//! it unreachable (or gone) within seconds; both IPAM rings (IPv4 and IPv6)
//! are drawn. Screenshots are saved under the
//! lab's log directory (`/tmp/meshnet-e2e-logs/<lab>-map/`).
//!
//! Chromium runs in a namespace of the lab (`h9`, no router) and reaches the
//! routers' metrics ports over the underlay. Needs root and `chromium`; skips
//! without them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const PORT: u16 = 6782;
const DEVTOOLS: u16 = 9222;

/// A minimal DevTools-protocol client (plain sockets: a WebSocket handshake
/// and frames), driving one page:
/// argv: devtools port, page URL, work dir, peer to watch for.
/// 1. opens the URL, waits until the graph shows 3 peers, writes `first.json`
///    (peers, edges, refresh count) and `first.png`;
/// 2. waits for a file `go`, then polls the *same open page* until the
///    watched peer is unreachable or gone, and writes `second.json` (with the
///    seconds it took) and `second.png`;
/// 3. writes `errors.json`: exceptions, console errors and log errors seen.
const DRIVER: &str = r#"
import base64, json, os, socket, sys, time, urllib.request
port, url, work, watch = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
deadline = time.time() + 30
while True:
    try:
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
        pages = [p for p in pages if p.get("type") == "page"]
        if pages: break
    except Exception:
        pass
    if time.time() > deadline: sys.exit("no DevTools page")
    time.sleep(0.2)
ws_url = pages[0]["webSocketDebuggerUrl"]
path = ws_url.split(str(port), 1)[1]
s = socket.create_connection(("127.0.0.1", port), timeout=30)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf: buf += s.recv(4096)
head, buf = buf.split(b"\r\n\r\n", 1)
assert b" 101 " in head.split(b"\r\n")[0], head
def recv_exact(n):
    global buf
    while len(buf) < n:
        d = s.recv(65536)
        if not d: raise EOFError
        buf += d
    out, buf = buf[:n], buf[n:]
    return out
def recv_msg():
    data = b""
    while True:
        h = recv_exact(2); fin, op, n = h[0] & 0x80, h[0] & 0x0f, h[1] & 0x7f
        if n == 126: n = int.from_bytes(recv_exact(2), "big")
        elif n == 127: n = int.from_bytes(recv_exact(8), "big")
        data += recv_exact(n)
        if fin: return data.decode()
def send_msg(text):
    p = text.encode(); mask = os.urandom(4)
    h = bytes([0x81]) + (bytes([0x80 | len(p)]) if len(p) < 126 else bytes([0x80 | 126]) + len(p).to_bytes(2, "big") if len(p) < 65536 else bytes([0x80 | 127]) + len(p).to_bytes(8, "big"))
    s.sendall(h + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p)))
errors, next_id = [], [0]
def call(method, **params):
    next_id[0] += 1; me = next_id[0]
    send_msg(json.dumps({"id": me, "method": method, "params": params}))
    while True:
        m = json.loads(recv_msg())
        if m.get("id") == me:
            if "error" in m: raise RuntimeError(f"{method}: {m['error']}")
            return m.get("result", {})
        ev, p = m.get("method"), m.get("params", {})
        if ev == "Runtime.exceptionThrown": errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif ev == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"): errors.append("console." + p["type"] + ": " + json.dumps(p.get("args"))[:500])
        elif ev == "Log.entryAdded" and p.get("entry", {}).get("level") == "error": errors.append("log: " + p["entry"].get("text", "")[:500])
def js(expr):
    r = call("Runtime.evaluate", expression=expr, returnByValue=True)
    return r.get("result", {}).get("value")
STATE = """JSON.stringify({
  peers: [...document.querySelectorAll('#peers .peer')].map(g => ({name: g.dataset.name, nickname: g.dataset.nickname, route: g.dataset.route})),
  edges: [...document.querySelectorAll('#edges .edge')].map(e => ({a: e.dataset.a, b: e.dataset.b, kind: e.dataset.kind, reason: e.querySelector('title').textContent})),
  refreshes: Number(document.body.dataset.refreshes || 0),
  status: document.getElementById('status').textContent,
  traffic_rows: document.querySelectorAll('#traffic tbody tr').length,
  ipam_parts: document.querySelectorAll('#ipam div').length,
  ipam6_parts: document.querySelectorAll('#ipam6 div').length,
  ipam6_shown: !document.getElementById('ring6').hidden,
  range6: document.getElementById('range6').textContent})"""
def state(): return json.loads(js(STATE) or "{}")
def shot(name):
    png = call("Page.captureScreenshot", format="png")["data"]
    open(os.path.join(work, name), "wb").write(base64.b64decode(png))
call("Runtime.enable"); call("Log.enable"); call("Page.enable")
call("Page.navigate", url=url)
t = time.time()
while time.time() - t < 20:
    st = state()
    if len(st.get("peers", [])) == 3 and st.get("refreshes", 0) >= 2: break
    time.sleep(0.25)
json.dump(st, open(os.path.join(work, "first.json"), "w")); shot("first.png")
while not os.path.exists(os.path.join(work, "go")): time.sleep(0.1)
t = time.time(); gone = False
while time.time() - t < 30:
    st = state()
    p = [x for x in st.get("peers", []) if x["name"] == watch]
    if not p or p[0]["route"] == "unreachable": gone = True; break
    time.sleep(0.25)
st["seconds"] = round(time.time() - t, 2); st["gone"] = gone
json.dump(st, open(os.path.join(work, "second.json"), "w")); shot("second.png")
js("0")  # collect any late events
json.dump(errors, open(os.path.join(work, "errors.json"), "w"))
print("done", flush=True)
"#;

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_default()).unwrap_or(Value::Null)
}

/// Must show: the map of a three-host lab in headless Chromium.
#[test]
fn the_map_shows_the_mesh_in_a_browser() {
    if !Path::new("/usr/bin/chromium").exists() {
        eprintln!("skipping: needs /usr/bin/chromium (apt-get install chromium)");
        return;
    }
    let Some(lab) = Lab::new("map") else { return };
    let hosts = [lab.add_host(1), lab.add_host(2), lab.add_host(3)];
    let mut names = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let addr = format!("--metrics-addr={}:{PORT}", h.ip);
        let nick = format!("node{}", h.i);
        // An IPv6 range too: the page draws both rings.
        let mut args = vec![addr.as_str(), "--nickname", nick.as_str(), "--ipalloc-range", "fd32::/64"];
        let earlier: Vec<String> = hosts[..i].iter().map(|e| e.ip.clone()).collect();
        args.extend(earlier.iter().map(String::as_str));
        names.push(h.launch(&args));
    }
    let full = wait_until(SECS(30), || {
        hosts.iter().all(|h| connections(&h.status_json()).iter().filter(|c| c["state"] == "established").count() == 2)
    });
    assert!(full, "the three routers did not connect");
    for h in &hosts {
        h.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime");
    }
    // A container on each host and some traffic, so the traffic table has rates.
    let cs: Vec<Container> = hosts.iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in hosts.iter().zip(&cs) {
        h.meshnet(&["attach", &format!("10.40.0.{}/16", c.j), &c.ns]).expect_ok("attach");
    }
    assert!(ping_until(&cs[0].ns, "10.40.0.2", SECS(20)), "c1 cannot reach c2");

    let browser_ns = lab.add_host(9);
    let work: PathBuf = lab.dir.join("browser");
    std::fs::create_dir_all(&work).unwrap();
    let profile = work.join("profile");
    let chromium = lab.spawn_in(
        &browser_ns.ns,
        &[
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--window-size=1280,720",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--remote-debugging-port={DEVTOOLS}"),
            "--remote-debugging-address=127.0.0.1",
            "about:blank",
        ],
    );
    let url = format!("http://{}:{PORT}/", hosts[0].ip);
    let driver = lab.spawn_in(
        &browser_ns.ns,
        &["python3", "-c", DRIVER, &DEVTOOLS.to_string(), &url, &work.to_string_lossy(), &names[2]],
    );
    let first_done = wait_until(SECS(60), || work.join("first.png").exists());
    if !first_done {
        eprintln!("driver: {}\n{}\nchromium: {}", driver.stdout(), driver.stderr(), chromium.stderr());
    }
    assert!(first_done, "the browser did not render the page");
    let first = read_json(&work.join("first.json"));
    eprintln!("first view: {first:#}");

    // Three peers, labelled, h1 is `me`, the others direct.
    let peers = first["peers"].as_array().cloned().unwrap_or_default();
    let mut shown: Vec<String> = peers.iter().filter_map(|p| p["name"].as_str().map(String::from)).collect();
    shown.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(shown, want, "the page shows other peers than the mesh has");
    for p in &peers {
        let me = p["name"] == names[0].as_str();
        assert_eq!(p["route"], if me { "me" } else { "direct" }, "{p}");
        assert!(p["nickname"].as_str().is_some_and(|n| n.starts_with("node")), "{p}");
    }
    // The right edges: each pair once, all direct, with a reason to hover.
    let mut edges: Vec<(String, String, String)> = first["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let (a, b) = (e["a"].as_str().unwrap_or("").to_string(), e["b"].as_str().unwrap_or("").to_string());
            let (a, b) = if a < b { (a, b) } else { (b, a) };
            assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "an edge without a reason: {e}");
            (a, b, e["kind"].as_str().unwrap_or("").to_string())
        })
        .collect();
    edges.sort();
    let mut want_edges = vec![];
    for i in 0..3 {
        for j in i + 1..3 {
            let (a, b) = if want[i] < want[j] { (want[i].clone(), want[j].clone()) } else { (want[j].clone(), want[i].clone()) };
            want_edges.push((a, b, "direct".to_string()));
        }
    }
    want_edges.sort();
    assert_eq!(edges, want_edges, "the page's edges");
    assert!(first["refreshes"].as_u64().unwrap_or(0) >= 2, "the page did not refresh: {first}");
    assert_eq!(first["traffic_rows"], 2, "traffic rows: {first}");
    assert!(first["ipam_parts"].as_u64().unwrap_or(0) >= 1, "no IPAM ownership chart: {first}");
    assert_eq!(first["ipam6_shown"], true, "no IPv6 ring on the page: {first}");
    assert_eq!(first["range6"], "fd32::/64", "{first}");
    assert!(first["ipam6_parts"].as_u64().unwrap_or(0) >= 1, "no IPv6 ownership chart: {first}");

    // Stop h3: the open page shows it unreachable or gone within seconds.
    let t = Instant::now();
    hosts[2].meshnet(&["stop"]).expect_ok("stop h3");
    std::fs::write(work.join("go"), "").unwrap();
    let second_done = wait_until(SECS(45), || work.join("second.json").exists() && work.join("errors.json").exists());
    assert!(second_done, "driver: {}\n{}", driver.stdout(), driver.stderr());
    let second = read_json(&work.join("second.json"));
    eprintln!(
        "after stopping h3 ({:.1}s ago) the open page showed it gone/unreachable after {}s: {second:#}",
        t.elapsed().as_secs_f64(),
        second["seconds"]
    );
    assert_eq!(second["gone"], true, "the page still shows h3 reachable: {second:#}");
    assert!(second["seconds"].as_f64().unwrap_or(99.0) < 10.0, "it took {}s", second["seconds"]);
    let errors = read_json(&work.join("errors.json"));
    assert_eq!(errors, serde_json::json!([]), "the page logged errors");

    // Keep the screenshots with the test's logs.
    let keep = PathBuf::from("/tmp/meshnet-e2e-logs").join(format!("{}-map", lab.prefix));
    let _ = std::fs::create_dir_all(&keep);
    for f in ["first.png", "second.png"] {
        let _ = std::fs::copy(work.join(f), keep.join(f));
    }
    eprintln!("screenshots in {}", keep.display());
    if let Ok(dir) = std::env::var("MESHNET_MAP_SCREENSHOT") {
        let _ = std::fs::copy(work.join("first.png"), dir);
    }
    drop(driver);
    drop(chromium);
}
