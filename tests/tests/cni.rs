//! `meshnet-cni` driven the way a container runtime drives it (environment +
//! network configuration on stdin), against a pod network namespace in the
//! namespace lab: two hosts, a router each (launched with the CLI), the plugin
//! running in host 1's namespace and talking to host 1's router.
//!
//! Checks the result against the CNI 1.0 spec's required fields, that the pod
//! reaches a container attached on the other host, CHECK before and after DEL,
//! DEL's idempotence, and CNI error objects for bad input. Needs root (the lab
//! skips otherwise).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshnet_tests::lab::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;


/// One plugin invocation's outcome.
#[derive(Debug)]
struct Cni {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Cni {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("plugin output is not JSON ({e}), exit {:?}: {}\nstderr: {}", self.code, self.stdout, self.stderr)
        })
    }
}

/// Runs the plugin in `host_ns` as a runtime would: `env` and `stdin`.
fn cni(host_ns: &str, env: &[(&str, &str)], stdin: &str) -> Cni {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host_ns]).arg(cni_bin());
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn meshnet-cni");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    // The plugin's router timeout is 60 s; never wait longer than that here.
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > SECS(90) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Cni {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct Pod<'a> {
    host_ns: &'a str,
    id: String,
    netns: String,
    ifname: &'a str,
}

impl Pod<'_> {
    fn call(&self, command: &str, conf: &Value) -> Cni {
        self.call_raw(command, &conf.to_string(), &self.netns)
    }

    fn call_raw(&self, command: &str, stdin: &str, netns: &str) -> Cni {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", self.id.as_str()),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", self.ifname),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        let env: Vec<_> = env.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        cni(self.host_ns, &env, stdin)
    }
}

/// Hairpin mode of the bridge port (in namespace `host_ns`) whose veth peer is
/// `ifname` in namespace `pod_ns`.
fn hairpin_of(host_ns: &str, pod_ns: &str, ifname: &str) -> Option<bool> {
    let peer = link(pod_ns, ifname)?["link_index"].as_u64()?;
    let out = Command::new("bridge").args(["-n", host_ns, "-d", "-j", "link", "show"]).output().ok()?;
    let ports: Value = serde_json::from_slice(&out.stdout).ok()?;
    ports.as_array()?.iter().find(|p| p["ifindex"].as_u64() == Some(peer))?["hairpin"].as_bool()
}

fn is_cidr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(ip, p)| {
        ip.parse::<IpAddr>().is_ok_and(|ip| p.parse::<u8>().is_ok_and(|p| p <= if ip.is_ipv4() { 32 } else { 128 }))
    })
}

/// Checks a success result against the CNI 1.0 spec ("Success" result): the
/// required keys and the types of the optional ones.
#[track_caller]
fn validate_result(r: &Value, version: &str, netns: &str) {
    let o = r.as_object().unwrap_or_else(|| panic!("result is not an object: {r}"));
    assert_eq!(o.get("cniVersion").and_then(Value::as_str), Some(version), "cniVersion: {r:#}");
    let ifaces = o.get("interfaces").and_then(Value::as_array).unwrap_or_else(|| panic!("interfaces: {r:#}"));
    for i in ifaces {
        assert!(i["name"].as_str().is_some_and(|n| !n.is_empty()), "interface without name: {r:#}");
        if let Some(m) = i.get("mac") {
            assert!(m.as_str().is_some_and(is_mac), "interface mac: {r:#}");
        }
        if let Some(s) = i.get("sandbox") {
            assert!(s.is_string(), "interface sandbox: {r:#}");
        }
    }
    let ips = o.get("ips").and_then(Value::as_array).unwrap_or_else(|| panic!("ips: {r:#}"));
    assert!(!ips.is_empty(), "no ips: {r:#}");
    for ip in ips {
        assert!(ip["address"].as_str().is_some_and(is_cidr), "ips[].address must be CIDR: {r:#}");
        if let Some(g) = ip.get("gateway") {
            assert!(g.as_str().is_some_and(|g| g.parse::<IpAddr>().is_ok()), "ips[].gateway: {r:#}");
        }
        if let Some(i) = ip.get("interface") {
            let i = i.as_u64().unwrap_or_else(|| panic!("ips[].interface must be an index: {r:#}")) as usize;
            assert!(i < ifaces.len(), "ips[].interface {i} out of range: {r:#}");
            assert_eq!(ifaces[i]["sandbox"], netns, "ips[].interface must point into the sandbox: {r:#}");
        }
    }
    if let Some(routes) = o.get("routes") {
        for rt in routes.as_array().unwrap_or_else(|| panic!("routes: {r:#}")) {
            assert!(rt["dst"].as_str().is_some_and(is_cidr), "routes[].dst: {r:#}");
            if let Some(gw) = rt.get("gw") {
                assert!(gw.as_str().is_some_and(|g| g.parse::<IpAddr>().is_ok()), "routes[].gw: {r:#}");
            }
        }
    }
    if let Some(dns) = o.get("dns") {
        assert!(dns.is_object(), "dns: {r:#}");
        if let Some(ns) = dns.get("nameservers") {
            assert!(ns.as_array().is_some_and(|a| a.iter().all(Value::is_string)), "dns.nameservers: {r:#}");
        }
    }
}

/// Checks a CNI error: non-zero exit, and on stdout `{cniVersion, code, msg, details?}`.
#[track_caller]
fn expect_error(out: &Cni, code: u64, what: &str) -> Value {
    assert!(!out.ok(), "{what}: must fail: {out:?}");
    let e = out.json();
    assert!(e["cniVersion"].is_string(), "{what}: error without cniVersion: {e:#}");
    assert!(e["msg"].as_str().is_some_and(|m| !m.is_empty()), "{what}: error without msg: {e:#}");
    if let Some(d) = e.get("details") {
        assert!(d.is_string(), "{what}: details: {e:#}");
    }
    assert_eq!(e["code"].as_u64(), Some(code), "{what}: {e:#}");
    e
}

#[test]
fn cni_plugin_add_check_del() {
    let Some(lab) = Lab::new("cni") else {
        return;
    };
    let (h1, h2) = (lab.add_host(1), lab.add_host(2));
    let c2 = lab.add_container(&h2, 2);
    // Pod sandboxes: namespaces the "runtime" made, given to the plugin by path.
    let pod_ns = lab.add_container(&h1, 5);
    let pod2_ns = lab.add_container(&h1, 6);
    h1.launch(&[]);
    h2.launch(&[&h1.ip]);
    h2.meshnet(&["attach", "10.40.0.2/16", &c2.ns]).expect_ok("attach c2 on h2");

    let state = h1.state_dir.to_string_lossy().into_owned();
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "meshnet",
        "type": "meshnet-cni",
        "stateDir": state,
        "ipam": {
            "addresses": [{"address": "10.40.0.5/16", "gateway": "10.40.0.1"}],
            "routes": [{"dst": "10.41.0.0/16", "gw": "10.40.0.1"}]
        },
        "dns": {"nameservers": ["10.40.0.1"], "search": ["svc.cluster.local"]}
    });
    let pod = Pod { host_ns: &h1.ns, id: format!("pod-{}", lab.prefix), netns: format!("/run/netns/{}", pod_ns.ns), ifname: "eth0" };

    // VERSION
    let v = pod.call("VERSION", &json!({"cniVersion": "1.0.0"}));
    assert!(v.ok(), "{v:?}");
    assert!(v.json()["supportedVersions"].as_array().unwrap().iter().any(|x| x == "1.0.0"), "{v:?}");

    // ADD
    let add = pod.call("ADD", &conf);
    assert!(add.ok(), "ADD failed: {add:?}");
    let result = add.json();
    eprintln!("ADD result: {result}");
    validate_result(&result, "1.0.0", &pod.netns);
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    assert_eq!(result["ips"][0]["address"], "10.40.0.5/16");
    assert_eq!(result["ips"][0]["gateway"], "10.40.0.1");
    assert_eq!(result["routes"], json!([{"dst": "10.41.0.0/16", "gw": "10.40.0.1"}]));
    assert_eq!(result["dns"]["nameservers"], json!(["10.40.0.1"]));
    // In the pod: eth0 with the address, the router's MTU, and the route.
    let l = link(&pod_ns.ns, "eth0").unwrap_or_else(|| panic!("no eth0 in the pod: {:?}", links(&pod_ns.ns)));
    assert_eq!(ipv4_of(&l), vec!["10.40.0.5/16".to_string()]);
    let mtu = h1.status_json()["mtu"].as_u64().unwrap();
    assert_eq!(l["mtu"].as_u64(), Some(mtu), "pod MTU must be the router's");
    assert_eq!(l["address"], result["interfaces"][0]["mac"]);
    let routes = ip(&["-n", &pod_ns.ns, "route", "show", "10.41.0.0/16"]).stdout;
    assert!(routes.contains("via 10.40.0.1 dev eth0"), "route missing: {routes}");
    // The router lists it by path, as eth0.
    let ps = h1.ps_json();
    assert!(ps.iter().any(|e| e["target"] == pod.netns.as_str() && e["interface"] == "eth0"), "{ps:?}");

    // The pod reaches a container on the other host.
    assert!(ping_until(&pod_ns.ns, "10.40.0.2", SECS(20)), "pod cannot ping 10.40.0.2 on h2");
    assert!(ping(&c2.ns, "10.40.0.5", 3), "c2 cannot ping the pod");
    eprintln!("pod (CNI) <-> c2 on h2: ping ok");

    assert_eq!(hairpin_of(&h1.ns, &pod_ns.ns, "eth0"), Some(true), "the pod's bridge port has no hairpin mode");

    // ADD again (a runtime retry) is harmless.
    let again = pod.call("ADD", &conf);
    assert!(again.ok(), "{again:?}");
    validate_result(&again.json(), "1.0.0", &pod.netns);

    // CHECK with the previous result.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = result.clone();
    let chk = pod.call("CHECK", &check_conf);
    assert!(chk.ok() && chk.stdout.trim().is_empty(), "CHECK after ADD: {chk:?}");
    // CHECK notices a missing address.
    let mut wrong = check_conf.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.40.0.77/16");
    expect_error(&pod.call("CHECK", &wrong), 101, "CHECK with an address the pod lacks");

    // DEL, twice.
    let del = pod.call("DEL", &conf);
    assert!(del.ok() && del.stdout.trim().is_empty(), "DEL: {del:?}");
    assert!(link(&pod_ns.ns, "eth0").is_none(), "eth0 still in the pod after DEL");
    assert!(!h1.ps_json().iter().any(|e| e["target"] == pod.netns.as_str()));
    let del2 = pod.call("DEL", &conf);
    assert!(del2.ok(), "second DEL: {del2:?}");
    // CHECK after DEL fails.
    let e = expect_error(&pod.call("CHECK", &check_conf), 101, "CHECK after DEL");
    eprintln!("CHECK after DEL: {e}");
    // DEL of a namespace that is already gone succeeds.
    let gone = pod.call_raw("DEL", &conf.to_string(), &format!("/run/netns/{}-gone", lab.prefix));
    assert!(gone.ok(), "DEL of a missing netns: {gone:?}");

    // DEL without CNI_NETNS (the runtime lost it) still finds what ADD attached.
    let pod2 = Pod { host_ns: &h1.ns, id: format!("pod2-{}", lab.prefix), netns: format!("/run/netns/{}", pod2_ns.ns), ifname: "net1" };
    let mut conf2 = conf.clone();
    conf2["ipam"] = json!({"addresses": ["10.40.0.6/16"]});
    let add2 = pod2.call("ADD", &conf2);
    assert!(add2.ok(), "{add2:?}");
    assert!(link(&pod2_ns.ns, "net1").is_some());
    let del = pod2.call_raw("DEL", &conf2.to_string(), "");
    assert!(del.ok(), "DEL without CNI_NETNS: {del:?}");
    assert!(link(&pod2_ns.ns, "net1").is_none(), "net1 still there after DEL without CNI_NETNS");

    // Without addresses the router allocates from meshnet IPAM; DEL releases it.
    let mut no_addr = conf.clone();
    no_addr.as_object_mut().unwrap().remove("ipam");
    let out = pod.call("ADD", &no_addr);
    assert!(out.ok(), "ADD without addresses (meshnet IPAM): {out:?}");
    let r = out.json();
    validate_result(&r, "1.0.0", &pod.netns);
    let got = r["ips"][0]["address"].as_str().unwrap().to_string();
    let ip = got.split('/').next().unwrap().to_string();
    eprintln!("ADD without addresses: IPAM gave {got}");
    let allocated = |ip: &str| {
        let v = h1.meshnet(&["status", "ipam", "--json"]).expect_ok("status ipam").json();
        v["allocations"].as_array().is_some_and(|a| a.iter().any(|x| x["ip"] == ip))
    };
    assert!(allocated(&ip), "{ip} is not in the IPAM allocations");
    let mut chk = no_addr.clone();
    chk["prevResult"] = r.clone();
    assert!(pod.call("CHECK", &chk).ok(), "CHECK after an IPAM ADD");
    assert!(pod.call("DEL", &no_addr).ok());
    assert!(!allocated(&ip), "{ip} is still allocated after DEL");

    // Weave's keys: `ipam.subnet` allocates inside that subnet, and
    // `"hairpinMode": false` leaves the bridge port's hairpin mode off (the
    // first ADD above had it on, the default).
    let mut weave_keys = no_addr.clone();
    weave_keys["ipam"] = json!({"subnet": "10.40.7.0/24"});
    weave_keys["hairpinMode"] = json!(false);
    let out = pod.call("ADD", &weave_keys);
    assert!(out.ok(), "ADD with ipam.subnet: {out:?}");
    let got = out.json()["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(got.starts_with("10.40.7.") && got.ends_with("/24"), "ipam.subnet 10.40.7.0/24 gave {got}");
    assert!(allocated(got.split('/').next().unwrap()), "{got} is not in the IPAM allocations");
    assert_eq!(hairpin_of(&h1.ns, &pod_ns.ns, "eth0"), Some(false), "hairpinMode false left hairpin on");
    assert!(pod.call("DEL", &weave_keys).ok());
    let mut bad = weave_keys.clone();
    bad["ipam"]["addresses"] = json!(["10.40.7.9/24"]);
    expect_error(&pod.call("ADD", &bad), 7, "ipam.subnet with ipam.addresses");
    bad["ipam"] = json!({"subnet": "banana"});
    expect_error(&pod.call("ADD", &bad), 7, "ipam.subnet that is no CIDR");
    bad["ipam"] = json!({"subnet": "192.168.77.0/24"});
    let e = expect_error(&pod.call("ADD", &bad), 100, "ipam.subnet outside the range");
    eprintln!("ipam.subnet outside the range: {e}");
    assert!(link(&pod_ns.ns, "eth0").is_none(), "a refused ADD left eth0 in the pod");

    // Bad input: CNI error objects with the spec's codes.
    expect_error(&pod.call_raw("ADD", "{not json", &pod.netns), 6, "configuration that is not JSON");
    expect_error(&pod.call("ADD", &json!({"name": "meshnet", "type": "meshnet-cni"})), 7, "no cniVersion");
    let mut bad = conf.clone();
    bad["cniVersion"] = json!("9.9.9");
    expect_error(&pod.call("ADD", &bad), 1, "unsupported cniVersion");
    let mut bad = conf.clone();
    bad["ipam"]["addresses"] = json!(["10.40.0.999/16"]);
    expect_error(&pod.call("ADD", &bad), 7, "bad address");
    let mut bad = conf.clone();
    bad["ipam"] = json!({"type": "host-local", "subnet": "10.40.0.0/16"});
    expect_error(&pod.call("ADD", &bad), 2, "ipam.type host-local");
    expect_error(&pod.call_raw("ADD", &conf.to_string(), ""), 4, "ADD without CNI_NETNS");
    expect_error(&cni(&h1.ns, &[("CNI_COMMAND", "FROB")], "{}"), 4, "unknown CNI_COMMAND");
    let missing = pod.call_raw("ADD", &conf.to_string(), &format!("/run/netns/{}-gone", lab.prefix));
    expect_error(&missing, 3, "ADD into a missing netns");
    // No router behind the state directory: "try again later".
    let mut nowhere = conf.clone();
    nowhere["stateDir"] = json!(lab.dir.join("no-router").to_string_lossy());
    expect_error(&pod.call("ADD", &nowhere), 11, "no router running");
    // An address another target holds: the router refuses, the plugin reports it.
    // (Outside the IPAM range, so no allocation made earlier in this test can hold it.)
    let mut taken = conf.clone();
    taken["ipam"] = json!({"addresses": ["172.31.99.2/24"]});
    h1.meshnet(&["attach", "172.31.99.2/24", &pod2_ns.ns]).expect_ok("attach pod2 by name");
    let e = expect_error(&pod.call("ADD", &taken), 100, "address taken");
    assert!(e["msg"].as_str().unwrap_or_default().contains("already attached"), "{e:#}");
}

/// DEL removes only `CNI_IFNAME`. A runtime sends DEL after every failed ADD
/// (CNI spec), so when a second network's ADD (`net1`) is refused because the
/// pod is attached as `eth0` already, the DEL that follows must leave `eth0`
/// and its address alone. Before, DEL detached the whole namespace, whatever
/// the interface name: the pod lost its network.
#[test]
fn cni_del_of_another_interface_leaves_the_pod_alone() {
    let Some(lab) = Lab::new("cnidel") else {
        return;
    };
    let h1 = lab.add_host(1);
    let pod_ns = lab.add_container(&h1, 5);
    h1.launch(&[]);
    let conf = |name: &str| {
        json!({
            "cniVersion": "1.0.0",
            "name": name,
            "type": "meshnet-cni",
            "stateDir": h1.state_dir.to_string_lossy(),
            "ipam": {"addresses": [{"address": "10.40.0.5/16", "gateway": "10.40.0.1"}]}
        })
    };
    let netns = format!("/run/netns/{}", pod_ns.ns);
    let id = format!("pod-{}", lab.prefix);
    let pod = Pod { host_ns: &h1.ns, id: id.clone(), netns: netns.clone(), ifname: "eth0" };
    let add = pod.call("ADD", &conf("meshnet"));
    assert!(add.ok(), "ADD eth0: {add:?}");
    let attached = || h1.ps_json().iter().any(|e| e["target"] == netns.as_str() && e["interface"] == "eth0");
    assert!(attached());

    // A second network's ADD as net1 is refused; the runtime then sends DEL for net1.
    let second = Pod { host_ns: &h1.ns, id, netns: netns.clone(), ifname: "net1" };
    let e = expect_error(&second.call("ADD", &conf("second")), 100, "ADD net1 of an attached pod");
    assert!(e["msg"].as_str().unwrap_or_default().contains("already attached as eth0"), "{e:#}");
    let del = second.call("DEL", &conf("second"));
    assert!(del.ok() && del.stdout.trim().is_empty(), "DEL net1: {del:?}");
    let l = link(&pod_ns.ns, "eth0").unwrap_or_else(|| panic!("DEL of net1 removed eth0: {:?}", links(&pod_ns.ns)));
    assert_eq!(ipv4_of(&l), vec!["10.40.0.5/16".to_string()], "DEL of net1 took eth0's address");
    assert!(attached(), "DEL of net1 detached the pod: {:?}", h1.ps_json());
    // Without CNI_NETNS too (nothing was recorded for net1).
    assert!(second.call_raw("DEL", &conf("second").to_string(), "").ok());
    assert!(attached());

    // DEL of eth0 still removes it.
    let del = pod.call("DEL", &conf("meshnet"));
    assert!(del.ok(), "DEL eth0: {del:?}");
    assert!(link(&pod_ns.ns, "eth0").is_none(), "eth0 still in the pod after its DEL");
    assert!(!h1.ps_json().iter().any(|e| e["target"] == netns.as_str()));
}

/// Takes the immutable attribute off a directory when the test ends.
struct Mutable(std::path::PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// An ADD whose note (`stateDir/cni/`, by which a DEL without CNI_NETNS finds
/// the pod) cannot be written fails with an I/O error saying so. It succeeded,
/// and a later DEL without CNI_NETNS then found nothing, said the pod was gone,
/// and left it attached. The runtime's DEL after the failed ADD (with
/// CNI_NETNS) detaches it; with the directory writable again all works.
#[test]
fn cni_add_whose_note_cannot_be_written_fails() {
    let Some(lab) = Lab::new("cninote") else {
        return;
    };
    let h1 = lab.add_host(1);
    let pod_ns = lab.add_container(&h1, 6);
    h1.launch(&[]);
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "meshnet",
        "type": "meshnet-cni",
        "stateDir": h1.state_dir.to_string_lossy(),
        "ipam": {"addresses": [{"address": "10.40.0.6/16"}]}
    });
    let notes = h1.state_dir.join("cni");
    std::fs::create_dir_all(&notes).expect("notes dir");
    let st = Command::new("chattr").arg("+i").arg(&notes).status().expect("chattr");
    assert!(st.success(), "chattr +i {}", notes.display());
    let mutable = Mutable(notes.clone());
    let netns = format!("/run/netns/{}", pod_ns.ns);
    let pod = Pod { host_ns: &h1.ns, id: format!("pod-{}", lab.prefix), netns: netns.clone(), ifname: "eth0" };
    let attached = || h1.ps_json().iter().any(|e| e["target"] == netns.as_str());

    let e = expect_error(&pod.call("ADD", &conf), 5, "ADD whose note cannot be written");
    let msg = e["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(&notes.display().to_string()) && msg.contains("DEL without CNI_NETNS"), "{e:#}");
    // The runtime's DEL after a failed ADD.
    let del = pod.call("DEL", &conf);
    assert!(del.ok(), "DEL after the failed ADD: {del:?}");
    assert!(!attached(), "DEL left the pod attached: {:?}", h1.ps_json());

    drop(mutable);
    assert!(pod.call("ADD", &conf).ok(), "ADD with the notes dir writable again");
    assert!(attached());
    let del = pod.call_raw("DEL", &conf.to_string(), "");
    assert!(del.ok(), "DEL without CNI_NETNS: {del:?}");
    assert!(!attached(), "DEL without CNI_NETNS left the pod attached: {:?}", h1.ps_json());
}
