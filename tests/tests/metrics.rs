//! The observability port in a namespace lab: a real Prometheus scrapes three
//! routers; `promtool` checks the exposition; the port answers only reads and
//! survives floods and garbage; `report` tells everything in one document.
//!
//! Hosts `h1..h3` run routers with `--metrics-addr <underlay ip>:6782`; host
//! `h9` (a namespace of the lab, no router) runs Prometheus on its own
//! loopback, scraping the three every second. Needs root, `prometheus` and
//! `promtool` (Debian's packages); skips without them.

use std::path::Path;
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::Value;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const PORT: u16 = 6782;
const PROM: &str = "127.0.0.1:9090";

fn overlay(j: u8) -> String {
    format!("10.40.0.{j}")
}

fn have(bin: &str) -> bool {
    Path::new(bin).exists()
}

/// `promtool check metrics` passes on `body`, host `h`'s exposition (kept in the lab's directory).
fn assert_promtool_accepts(lab: &Lab, h: &Host, body: &str) {
    let file = lab.dir.join(format!("metrics-h{}.txt", h.i));
    std::fs::write(&file, body).unwrap();
    let check = run(
        std::process::Command::new("sh").arg("-c").arg(format!("promtool check metrics < {}", file.display())),
        SECS(30),
    );
    assert!(check.ok(), "promtool check metrics on h{}'s output: {check}\n{body}", h.i);
}

/// `curl` in `ns`: (HTTP status, body).
fn curl(ns: &str, args: &[&str]) -> (u16, String) {
    let mut a = vec!["curl", "-s", "-S", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = exec_in(ns, &a);
    let text = out.stdout.trim_end().to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A PromQL instant query through Prometheus' HTTP API, from `ns`.
fn query(ns: &str, q: &str) -> Vec<Value> {
    let url = format!("http://{PROM}/api/v1/query");
    let (code, body) = curl(ns, &["-G", &url, "--data-urlencode", &format!("query={q}")]);
    if code != 200 {
        return vec![];
    }
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of one series of a query result.
fn value(series: &Value) -> f64 {
    series["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

/// Sum of a query's series whose `instance` label is `instance`.
fn value_at(ns: &str, q: &str, instance: &str) -> Option<f64> {
    let r = query(ns, q);
    let mine: Vec<f64> = r.iter().filter(|s| s["metric"]["instance"] == instance).map(value).collect();
    (!mine.is_empty()).then(|| mine.iter().sum())
}

fn launch_with_metrics(h: &Host, peers: &[&str]) -> String {
    let addr = format!("--metrics-addr={}:{PORT}", h.ip);
    let mut args = vec![addr.as_str(), "--nickname"];
    let nick = format!("node{}", h.i);
    args.push(&nick);
    args.extend_from_slice(peers);
    h.launch(&args)
}

fn attach(h: &Host, c: &Container) {
    let cidr = format!("{}/16", overlay(c.j));
    h.meshnet(&["attach", &cidr, &c.ns]).expect_ok("attach");
}

/// Three routers in a full mesh, each with a container attached.
fn three_routers(lab: &Lab) -> (Vec<Host>, Vec<String>, Vec<Container>) {
    let hosts = vec![lab.add_host(1), lab.add_host(2), lab.add_host(3)];
    let n1 = launch_with_metrics(&hosts[0], &[]);
    let n2 = launch_with_metrics(&hosts[1], &[&hosts[0].ip]);
    let n3 = launch_with_metrics(&hosts[2], &[&hosts[0].ip, &hosts[1].ip]);
    let containers: Vec<Container> = hosts.iter().map(|h| lab.add_container(h, h.i)).collect();
    for (h, c) in hosts.iter().zip(&containers) {
        attach(h, c);
    }
    let full = wait_until(SECS(30), || {
        hosts.iter().all(|h| {
            let s = h.status_json();
            connections(&s).iter().filter(|c| c["state"] == "established").count() == 2
        })
    });
    if !full {
        lab.dump();
    }
    assert!(full, "the three routers did not reach two established connections each");
    // An agreed IPAM ring, for the IPAM series and the map's ownership chart.
    for h in &hosts {
        h.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime");
    }
    (hosts, vec![n1, n2, n3], containers)
}

/// Must show: a real Prometheus scrapes the three routers of a namespace lab;
/// its HTTP API returns the expected series with plausible values (2
/// established connections on each router, bytes moving during a transfer);
/// `promtool check metrics` passes on every router's output.
#[test]
fn prometheus_scrapes_three_routers() {
    if !have("/usr/bin/prometheus") || !have("/usr/bin/promtool") {
        eprintln!("skipping: needs /usr/bin/prometheus and /usr/bin/promtool (apt-get install prometheus)");
        return;
    }
    let Some(lab) = Lab::new("metrics") else { return };
    let (hosts, names, containers) = three_routers(&lab);
    let prom = lab.add_host(9);

    // Every router's exposition is valid for promtool.
    for h in &hosts {
        let url = format!("http://{}:{PORT}/metrics", h.ip);
        let (code, body) = curl(&prom.ns, &[&url]);
        assert_eq!(code, 200, "GET {url}: {body}");
        assert_promtool_accepts(&lab, h, &body);
        for name in [
            "meshnet_connections{state=\"established\"} 2",
            "meshnet_peer_sent_bytes_total{",
            "meshnet_peer_path_mtu_bytes{",
            "meshnet_ipam_range_addresses ",
            "meshnet_inbound_handshakes_total{",
            "meshnet_rekeys_total ",
            "meshnet_superframes_total{",
            "meshnet_peer_rtt_seconds{",
        ] {
            assert!(body.contains(name), "h{}'s /metrics lacks {name}:\n{body}", h.i);
        }
    }

    // Every metric the shipped alert rules and Grafana dashboard use is one a router exports.
    let exported = std::fs::read_to_string(lab.dir.join("metrics-h1.txt")).unwrap();
    for file in ["deploy/prometheus/meshnet-rules.yml", "deploy/grafana/meshnet-dashboard.json"] {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        let mut used: Vec<&str> = text
            .match_indices("meshnet_")
            .map(|(i, _)| {
                let end = text[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(text.len(), |e| i + e);
                &text[i..end]
            })
            .collect();
        used.sort();
        used.dedup();
        assert!(!used.is_empty(), "{file} uses no meshnet metric");
        for m in used {
            assert!(
                exported.lines().any(|l| l.starts_with(m) && l[m.len()..].starts_with(['{', ' '])),
                "{file} uses {m}, which no router exports"
            );
        }
    }

    // Prometheus in h9, on its own loopback, scraping the three every second.
    let targets: Vec<String> = hosts.iter().map(|h| format!("'{}:{PORT}'", h.ip)).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: meshnet\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    let cfg = lab.dir.join("prometheus.yml");
    std::fs::write(&cfg, config).unwrap();
    let check = run(std::process::Command::new("promtool").args(["check", "config"]).arg(&cfg), SECS(30));
    assert!(check.ok(), "promtool check config: {check}");
    let tsdb = lab.dir.join("prometheus-data");
    let server = lab.spawn_in(
        &prom.ns,
        &[
            "prometheus",
            &format!("--config.file={}", cfg.display()),
            &format!("--storage.tsdb.path={}", tsdb.display()),
            &format!("--web.listen-address={PROM}"),
        ],
    );
    let up = wait_until(SECS(60), || {
        let r = query(&prom.ns, "up{job=\"meshnet\"}");
        r.len() == 3 && r.iter().all(|s| value(s) == 1.0)
    });
    if !up {
        eprintln!("prometheus stderr:\n{}", server.stderr());
    }
    assert!(up, "Prometheus did not scrape all three routers: {:?}", query(&prom.ns, "up"));

    // A connection count of 2 on each router.
    let r = query(&prom.ns, "meshnet_connections{state=\"established\"}");
    assert_eq!(r.len(), 3, "{r:?}");
    for s in &r {
        assert_eq!(value(s), 2.0, "established connections of {}", s["metric"]["instance"]);
    }
    // Peers, with nicknames, as labels of the per-peer series.
    let h1 = format!("{}:{PORT}", hosts[0].ip);
    let r = query(&prom.ns, &format!("meshnet_peer_sent_bytes_total{{instance=\"{h1}\"}}"));
    let mut labelled: Vec<(String, String)> =
        r.iter().map(|s| (s["metric"]["peer"].as_str().unwrap_or("").into(), s["metric"]["nickname"].as_str().unwrap_or("").into())).collect();
    labelled.sort();
    let mut want = vec![(names[1].clone(), "node2".to_string()), (names[2].clone(), "node3".to_string())];
    want.sort();
    assert_eq!(labelled, want, "h1's per-peer series");

    // Bytes move during a transfer: h1 -> h2's sent bytes as Prometheus saw
    // them, before and after 40 MB from c1 to c2.
    let sent_q = format!("meshnet_peer_sent_bytes_total{{peer=\"{}\"}}", names[1]);
    let recv_q = format!("meshnet_peer_received_bytes_total{{peer=\"{}\"}}", names[0]);
    let h2 = format!("{}:{PORT}", hosts[1].ip);
    let before_sent = value_at(&prom.ns, &sent_q, &h1).expect("h1's bytes sent to h2");
    let before_recv = value_at(&prom.ns, &recv_q, &h2).expect("h2's bytes received from h1");
    const BYTES: u64 = 40 << 20;
    checked_transfer(&lab, &containers[0].ns, &containers[1].ns, &overlay(2), BYTES, SECS(120));
    let mut seen = (0.0, 0.0);
    let moved = wait_until(SECS(15), || {
        let s = value_at(&prom.ns, &sent_q, &h1).unwrap_or(0.0) - before_sent;
        let r = value_at(&prom.ns, &recv_q, &h2).unwrap_or(0.0) - before_recv;
        seen = (s, r);
        s >= BYTES as f64 && r >= BYTES as f64
    });
    eprintln!("during the transfer Prometheus saw h1 send {:.1} MB to h2 and h2 receive {:.1} MB from h1", seen.0 / 1e6, seen.1 / 1e6);
    assert!(moved, "Prometheus did not see {BYTES} bytes move h1 -> h2: sent +{}, received +{}", seen.0, seen.1);
    // Plausible: the encrypted bytes are the data plus a few percent (headers, ACKs are the other way).
    assert!(seen.0 < BYTES as f64 * 1.5, "h1 sent {} bytes for {BYTES}", seen.0);
    // The rate over the transfer, as a dashboard would show it.
    let rate = query(&prom.ns, &format!("rate(meshnet_peer_sent_bytes_total{{instance=\"{h1}\",peer=\"{}\"}}[30s])", names[1]));
    assert!(rate.first().map(value).unwrap_or(0.0) > 0.0, "no rate of bytes sent: {rate:?}");

    // IPAM: the range is the default /12 (as `status ipam` says); the three own all of it.
    let range = query(&prom.ns, "meshnet_ipam_range_addresses");
    assert!(range.iter().all(|s| value(s) == (1u64 << 20) as f64), "{range:?}");
    let owned = query(&prom.ns, &format!("sum(meshnet_ipam_owned_addresses{{instance=\"{h1}\"}})"));
    assert_eq!(owned.first().map(value), Some((1u64 << 20) as f64), "h1's view of ownership: {owned:?}");
    drop(server);
}

/// `GET` with a raw HTTP request through Python (so a test can send what curl
/// would not): prints the status line, or `closed`.
const RAW: &str = r#"
import socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode().decode('unicode_escape').encode('latin-1')
s = socket.create_connection((host, port), timeout=10)
s.sendall(data)
try:
    r = s.recv(4096)
    print(r.split(b'\r\n')[0].decode() if r else 'closed')
except socket.timeout:
    print('timeout')
"#;

/// Holds `n` connections open without sending a request (slowloris), and
/// sends `m` garbage requests, then says how many were answered or closed.
const FLOOD: &str = r#"
import socket, sys, time
host, port, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
idle = []
for i in range(n):
    try:
        idle.append(socket.create_connection((host, port), timeout=5))
    except OSError:
        pass
answered = 0
for i in range(m):
    try:
        c = socket.create_connection((host, port), timeout=5)
        c.sendall(bytes((i * 7 + j) % 256 for j in range(300)) + b'\r\n\r\n')
        if c.recv(100) is not None:
            answered += 1
        c.close()
    except OSError:
        pass
print(len(idle), answered, flush=True)
time.sleep(float(sys.argv[5]))
"#;

/// Must show: the port serves its three reads and nothing else; no request
/// changes state; a flood of idle connections and garbage does not disturb
/// the router (its containers keep talking, `status` answers, the port
/// recovers). An empty `--metrics-addr` turns the port off.
#[test]
fn metrics_port_serves_only_reads_and_survives_abuse() {
    let Some(lab) = Lab::new("metricsabuse") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let n1 = launch_with_metrics(&h1, &[]);
    launch_with_metrics(&h2, &[&h1.ip]);
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    attach(&h1, &c1);
    attach(&h2, &c2);
    assert!(ping_until(&c2.ns, &overlay(1), SECS(30)), "c2 cannot reach c1");
    let base = format!("http://{}:{PORT}", h1.ip);

    // What it serves.
    let (code, page) = curl(&h2.ns, &[&format!("{base}/")]);
    assert_eq!(code, 200);
    assert!(page.contains("<html") && page.contains("/api/mesh"), "the map page: {page}");
    let (code, body) = curl(&h2.ns, &[&format!("{base}/api/mesh")]);
    assert_eq!(code, 200);
    let mesh: Value = serde_json::from_str(&body).expect("/api/mesh is JSON");
    assert_eq!(mesh["me"], n1.as_str());
    assert_eq!(mesh["peers"].as_array().map(|a| a.len()), Some(2), "{mesh:#}");
    let (code, _) = curl(&h2.ns, &["-I", &format!("{base}/metrics")]);
    assert_eq!(code, 200, "HEAD /metrics");

    // And nothing else: other methods, other paths.
    let targets_before = h1.targets();
    let status_before = h1.status_json();
    for (method, path, want) in [
        ("POST", "/metrics", 405),
        ("PUT", "/api/mesh", 405),
        ("DELETE", "/", 405),
        ("POST", "/api/connect", 405),
        ("GET", "/api/connect", 404),
        ("GET", "/../../etc/passwd", 404),
        ("GET", "/metrics/../stop", 404),
    ] {
        let (code, _) = curl(&h2.ns, &["-X", method, "--path-as-is", "-d", "peers=10.9.9.9", &format!("{base}{path}")]);
        assert_eq!(code, want, "{method} {path}");
    }
    // Malformed requests: answered with an error or closed, never served.
    for raw in [
        "GARBAGE\\r\\n\\r\\n",
        "GET /metrics HTTP/9.9\\r\\n\\r\\n",
        "GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: -5\\r\\n\\r\\n",
        "\\x00\\x01\\x02\\x03\\xff\\r\\n\\r\\n",
    ] {
        let out = exec_in(&h2.ns, &["python3", "-c", RAW, &h1.ip, &PORT.to_string(), raw]);
        let line = out.stdout.trim().to_string();
        assert!(!line.contains(" 200"), "a malformed request was served: {raw:?} -> {line}");
    }
    let (code, _) = curl(&h2.ns, &["-H", &format!("X-Big: {}", "a".repeat(40_000)), &format!("{base}/metrics")]);
    assert!(code == 431 || code == 400 || code == 0, "a 40 kB header got {code}");

    // A flood: 200 idle connections held for 8 s (the port serves 32 at once)
    // and 300 garbage requests. Meanwhile the containers keep talking and
    // the CLI is answered.
    let flood = lab.spawn_in(&h2.ns, &["python3", "-c", FLOOD, &h1.ip, &PORT.to_string(), "200", "300", "8"]);
    let t = Instant::now();
    let pinged = ping(&c2.ns, &overlay(1), 5);
    let status = h1.meshnet(&["status", "--json"]);
    assert!(pinged, "containers stopped talking during the flood");
    assert!(status.ok(), "status failed during the flood: {status}");
    assert!(wait_until(SECS(30), || flood.stdout().contains(' ')), "the flood did not run: {}", flood.stderr());
    eprintln!("flood: {} (idle connections held, garbage requests answered or closed) in {:.1}s", flood.stdout().trim(), t.elapsed().as_secs_f64());
    drop(flood);
    // The port recovers once the idle connections are gone (closed by the client,
    // or by the router's timeouts).
    let back = wait_until(SECS(20), || curl(&h2.ns, &[&format!("{base}/metrics")]).0 == 200);
    assert!(back, "/metrics did not answer after the flood");
    assert!(ping(&c2.ns, &overlay(1), 2), "containers cannot talk after the flood");

    // Nothing changed: targets and connections are as before.
    assert_eq!(h1.targets(), targets_before, "a request changed the targets");
    let after = h1.status_json();
    assert_eq!(peer_names(&after), peer_names(&status_before));
    assert!(!h1.log().contains("panicked"), "router log: {}", h1.log());

    // An empty --metrics-addr turns the port off.
    h2.meshnet(&["stop"]).expect_ok("stop h2");
    let n2 = h2.launch(&["--metrics-addr=", &h1.ip]);
    assert!(!n2.is_empty());
    let (code, _) = curl(&h1.ns, &[&format!("http://{}:{PORT}/metrics", h2.ip)]);
    assert_eq!(code, 0, "h2 serves metrics although --metrics-addr was empty");
    let (code, _) = curl(&h2.ns, &["http://127.0.0.1:6782/metrics"]);
    assert_eq!(code, 0, "h2 serves metrics on the default address although --metrics-addr was empty");
}

/// The metric names, types and reason labels in README's "Metrics and the map"
/// table, as (name, type, label values named in its last column).
fn documented_metrics() -> Vec<(String, String, Vec<String>)> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let rows = readme
        .lines()
        .skip_while(|l| !l.starts_with("| metric | type | labels | what |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    let ticked = |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(String::from).collect() };
    let mut out = vec![];
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let [_, names, ty, _labels, what, ..] = cells.as_slice() else { panic!("README metrics row {row:?}") };
        for name in ticked(names) {
            out.push((name, ty.to_string(), ticked(what)));
        }
    }
    assert!(out.len() >= 30, "README's metrics table not found or short: {out:?}");
    out
}

/// Every metric README's table lists is served, with the type it says, and
/// nothing is served that the table leaves out; the reasons it lists for the
/// `reason`-labelled counters are series from the start (at 0), so an alert on
/// one of them has a series to watch. Two routers, a container each, a ping.
#[test]
fn every_documented_metric_is_served() {
    let Some(lab) = Lab::new("metricnames") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    // An IPv6 range too, so the IPv6 ring's gauges are served.
    let v6 = ["--ipalloc-range", "fd32::/64"];
    launch_with_metrics(&h1, &v6);
    launch_with_metrics(&h2, &[v6[0], v6[1], &h1.ip]);
    let (c1, c2) = (lab.add_container(&h1, 1), lab.add_container(&h2, 2));
    attach(&h1, &c1);
    attach(&h2, &c2);
    assert!(ping_until(&c1.ns, &overlay(2), SECS(30)), "c1 cannot ping c2");
    h1.meshnet(&["expose", "10.40.0.100/16"]).expect_ok("expose (DNS listens)");
    // Questions for a name that is not there (until the server, started by
    // `expose`, answers one): each counted as a query answered NXDOMAIN.
    let nx = wait_until(SECS(20), || {
        let dig = exec_in_timeout(&c1.ns, &["dig", "@10.40.0.100", "+time=2", "+tries=1", "nobody.meshnet.local.", "A"], SECS(10));
        dig.stdout.contains("status: NXDOMAIN")
    });
    assert!(nx, "no NXDOMAIN from h1's DNS server for nobody.meshnet.local.");
    // Both rings agreed, so each has owners (the per-peer IPAM families).
    h1.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h1");

    let url = format!("http://{}:{PORT}/metrics", h1.ip);
    let (code, text) = curl(&h1.ns, &[&url]);
    assert_eq!(code, 200, "{text}");
    let sample = |series: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    assert_eq!(sample("meshnet_ipam6_range_addresses"), Some(2f64.powi(64)), "{text}");
    assert_eq!(sample("meshnet_ipam_range_addresses"), Some(f64::from(1u32 << 20)), "{text}");
    let queries = sample("meshnet_dns_queries_total").unwrap_or(0.0);
    assert!(queries >= 1.0, "no DNS query counted:\n{text}");
    assert_eq!(sample(r#"meshnet_dns_query_outcomes_total{outcome="nxdomain"}"#), Some(queries), "{text}");
    assert_eq!(sample(r#"meshnet_dns_query_outcomes_total{outcome="answered"}"#), Some(queries), "{text}");
    if have("/usr/bin/promtool") {
        assert_promtool_accepts(&lab, &h1, &text);
    }
    let mut served: std::collections::BTreeMap<String, String> = Default::default();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, ""));
            served.insert(name.to_string(), ty.to_string());
        }
    }
    let documented = documented_metrics();
    let mut wrong = vec![];
    for (name, ty, values) in &documented {
        match served.get(name) {
            None => wrong.push(format!("{name}: documented, not served")),
            Some(t) if t != ty => wrong.push(format!("{name}: documented as {ty}, served as {t}")),
            Some(_) => {}
        }
        if name.ends_with("_total") && text.contains(&format!("{name}{{reason=")) {
            for v in values.iter().filter(|v| !v.starts_with("meshnet_")) {
                if !text.contains(&format!("{name}{{reason=\"{v}\"}}")) {
                    wrong.push(format!("{name}: no series for reason {v:?}"));
                }
            }
        }
    }
    for name in served.keys() {
        if !documented.iter().any(|(n, _, _)| n == name) {
            wrong.push(format!("{name}: served, not in README's table"));
        }
    }
    assert!(wrong.is_empty(), "README's metrics table and /metrics differ:\n{}\n\n{text}", wrong.join("\n"));
    eprintln!("{} metrics served, all documented", served.len());
}

/// A peer's nickname is free text that reaches every router by gossip: one
/// with a quote and a backslash is escaped in the label values, so
/// both routers' expositions stay valid for `promtool` and carry it intact.
#[test]
fn odd_nicknames_keep_the_exposition_valid() {
    if !have("/usr/bin/promtool") {
        eprintln!("skipping: needs /usr/bin/promtool (apt-get install prometheus)");
        return;
    }
    let Some(lab) = Lab::new("metricsnick") else { return };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let odd = "we\"ird\\name";
    let n1 = h1.launch(&["--nickname", odd]);
    h2.launch(&["--nickname", "plain", &h1.ip]);
    assert!(wait_until(SECS(30), || established_with(&h2.status_json(), &n1)), "h2 did not connect to h1");
    h1.meshnet(&["prime", "--timeout", "30"]).expect_ok("prime h1");
    let escaped = r#"nickname="we\"ird\\name""#;
    for h in [&h1, &h2] {
        let mut body = String::new();
        // h2 labels h1's connection, route and IPAM space with h1's nickname (once gossiped).
        let seen = wait_until(SECS(20), || {
            body = curl(&h.ns, &["http://127.0.0.1:6782/metrics"]).1;
            body.lines().any(|l| l.starts_with("meshnet_ipam_owned_addresses{") && l.contains(escaped))
        });
        assert!(seen, "h{}: no IPAM series labelled {escaped}:\n{body}", h.i);
        assert_promtool_accepts(&lab, h, &body);
    }
    let body = curl(&h2.ns, &["http://127.0.0.1:6782/metrics"]).1;
    let route = format!(r#"meshnet_peer_route{{peer="{n1}",{escaped},route="direct"}} 1"#);
    assert!(body.lines().any(|l| l == route), "h2 lacks {route}:\n{body}");
}
