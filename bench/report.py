#!/usr/bin/env python3
"""Summarises one bench/run.sh output directory.

  report.py OUTDIR [--markdown BENCHMARKS.md] [--check]
  report.py --section NAME FILE BENCHMARKS.md   (replace a marked section with FILE)

Writes OUTDIR/summary.json and OUTDIR/results.md, prints the table, and with
--markdown replaces the results section of BENCHMARKS.md. With --check (smoke)
it exits 1 unless every path that was not skipped moved TCP, UDP and ping
traffic end to end.
"""
import json
import os
import re
import statistics
import sys

PATHS = ["direct", "vxlan", "meshnet", "tinc", "meshnet-trusted"]
LABEL = {
    "direct": "(a) direct veth routing, no overlay",
    "vxlan": "(b) kernel VXLAN, unencrypted",
    "meshnet": "(c) meshnet, encrypted",
    "tinc": "(d) tinc 1.0 switch mode, encrypted",
    "meshnet-trusted": "(e) meshnet, --trusted-subnets (kernel VXLAN, unencrypted)",
}
if os.environ.get("BENCH_TRUSTED") == "userspace":
    # bench/run.sh with BENCH_TRUSTED=userspace: no VXLAN device, unsealed over meshnet's UDP path.
    LABEL["meshnet-trusted"] = "(e) meshnet, --trusted-subnets, trusted (userspace): unencrypted over meshnet's own UDP path"
RSS_LIMIT_KB = 30_000_000 / 1024  # 30 MB


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def round_metrics(out, p, r):
    """All metrics of path p in round r (None where missing)."""
    f = os.path.join(out, f"r{r}-{p}")
    m = {}
    for t in ("tcp1", "tcp4"):
        d, meta = load(f"{f}-{t}.json"), load(f"{f}-{t}.json.meta.json")
        recv = (d or {}).get("end", {}).get("sum_received")
        if not recv or not meta or meta.get("rc") != 0:
            m[t + "_gbps"] = None
            continue
        m[t + "_gbps"] = recv["bits_per_second"] / 1e9
        if t == "tcp1":
            gb = recv["bytes"] / 1e9
            m["bytes"] = recv["bytes"]
            m["sys_cpu_per_gb"] = meta["sys_cpu_s"] / gb if gb else None
            m["proc_cpu_per_gb"] = meta["proc_cpu_s"] / gb if gb and meta["tunnel_pids"] else None
            m["proc_cpu_s"] = meta["proc_cpu_s"]
            m["sys_cpu_s"] = meta["sys_cpu_s"]
            m["wall_s"] = meta["wall_s"]
    d, meta = load(f"{f}-udp64.json"), load(f"{f}-udp64.json.meta.json")
    s = (d or {}).get("end", {}).get("sum")
    if s and meta and meta.get("rc") == 0 and s.get("seconds"):
        m["udp_sent_pps"] = s["packets"] / s["seconds"]
        m["udp_pps"] = (s["packets"] - s["lost_packets"]) / s["seconds"]
        m["udp_loss_pct"] = s["lost_percent"]
    else:
        m["udp_sent_pps"] = m["udp_pps"] = m["udp_loss_pct"] = None
    try:
        with open(f"{f}-ping.txt") as fh:
            text = fh.read()
        rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", text)]
        sent = re.search(r"(\d+) packets transmitted", text)
        m["rtt_ms"] = statistics.median(rtts) if rtts else None
        m["ping_replies"] = len(rtts)
        m["ping_sent"] = int(sent.group(1)) if sent else None
    except OSError:
        m["rtt_ms"], m["ping_replies"], m["ping_sent"] = None, 0, None
    rss = load(f"{f}-rss.json") or []
    m["rss_kb"] = max((x["rss_kb"] for x in rss), default=None)
    m["hwm_kb"] = max((x["hwm_kb"] for x in rss), default=None)
    env = load(f"{f}-env.json") or {}
    m["load1_before"] = env.get("load1")
    m["builds"] = env.get("builds", "").strip()
    return m


METRICS = [
    # key, header, format, better ("hi"/"lo")
    ("tcp1_gbps", "TCP ×1 Gbit/s", "{:.2f}", "hi"),
    ("tcp4_gbps", "TCP ×4 Gbit/s", "{:.2f}", "hi"),
    ("udp_pps", "UDP 64 B delivered kpps", "k", "hi"),
    ("udp_loss_pct", "UDP loss %", "{:.1f}", "lo"),
    ("udp_sent_pps", "UDP sent kpps", "k", "hi"),
    ("rtt_ms", "RTT median ms", "{:.3f}", "lo"),
    ("proc_cpu_per_gb", "tunnel procs CPU s/GB", "{:.2f}", "lo"),
    ("sys_cpu_per_gb", "system CPU s/GB", "{:.2f}", "lo"),
    ("rss_kb", "router RSS MiB", "mib", "lo"),
]


def fmt(v, f):
    if v is None:
        return "—"
    if f == "k":
        return f"{v / 1000:.1f}"
    if f == "mib":
        return f"{v / 1024:.1f}"
    return f.format(v)


def summarise(out):
    run = load(os.path.join(out, "run.json"))
    if not run:
        sys.exit(f"report.py: {out}/run.json missing or unreadable")
    paths = [p for p in PATHS if p in run["paths"]] + [p for p in run["paths"] if p not in PATHS]
    summary = {"run": run, "paths": {}}
    for p in paths:
        st = run["paths"][p]
        rounds = []
        if st["state"] == "ok":
            rounds = [round_metrics(out, p, r) for r in range(1, run["rounds"] + 1)]
        agg = {}
        for key, *_ in METRICS:
            agg[key] = med([r.get(key) for r in rounds]) if key != "rss_kb" else max(
                (r["rss_kb"] for r in rounds if r.get("rss_kb") is not None), default=None)
        agg["hwm_kb"] = max((r["hwm_kb"] for r in rounds if r.get("hwm_kb") is not None), default=None)
        summary["paths"][p] = {**st, "median": agg, "rounds": rounds}
    return summary


def ratio(a, b):
    return a / b if a is not None and b else None


# Issue 15's goals (meshnet, encrypted, against kernel VXLAN in the same run and namespaces).
GOALS = ("one TCP stream ≥ 0.8× VXLAN", "four TCP streams ≥ 0.6× VXLAN", "RTT ≤ 1.5× VXLAN",
         "64 B UDP delivered pps ≥ VXLAN's, loss < 5 %", "machine CPU per GB ≤ 1.5× VXLAN's",
         "trusted subnets, one stream ≥ 0.95× VXLAN", "router RSS < 30 MB")


def goals(summary):
    ps = summary["paths"]
    m = ps.get("meshnet", {}).get("median")
    v = ps.get("vxlan", {}).get("median")
    rows = []

    def row(goal, measured, ok):
        rows.append((goal, measured, "n/a" if ok is None else ("PASS" if ok else "FAIL")))

    if not m or not v or ps["meshnet"]["state"] != "ok" or ps["vxlan"]["state"] != "ok":
        why = "meshnet did not run" if not m or ps.get("meshnet", {}).get("state") != "ok" else "VXLAN did not run"
        for g in GOALS:
            row(g, why, None)
        return rows

    def times(goal, k, unit, want, at_least=True):
        r = ratio(m[k], v[k])
        row(goal, f"{fmt(r, '{:.2f}')}× ({fmt(m[k], '{:.3f}' if k == 'rtt_ms' else '{:.2f}')} vs {fmt(v[k], '{:.3f}' if k == 'rtt_ms' else '{:.2f}')} {unit})",
            None if r is None else (r >= want if at_least else r <= want))

    times(GOALS[0], "tcp1_gbps", "Gbit/s", 0.8)
    times(GOALS[1], "tcp4_gbps", "Gbit/s", 0.6)
    times(GOALS[2], "rtt_ms", "ms", 1.5, at_least=False)
    ok = None if m["udp_pps"] is None or v["udp_pps"] is None else (m["udp_pps"] >= v["udp_pps"] and m["udp_loss_pct"] < 5)
    row(GOALS[3],
        f"{fmt(m['udp_pps'], 'k')} vs {fmt(v['udp_pps'], 'k')} kpps, loss {fmt(m['udp_loss_pct'], '{:.1f}')} % (VXLAN {fmt(v['udp_loss_pct'], '{:.1f}')} %)", ok)
    r = ratio(m["sys_cpu_per_gb"], v["sys_cpu_per_gb"])
    r2 = ratio(m["proc_cpu_per_gb"], v["sys_cpu_per_gb"])
    row(GOALS[4],
        f"{fmt(r, '{:.2f}')}× system-wide ({fmt(m['sys_cpu_per_gb'], '{:.2f}')} vs {fmt(v['sys_cpu_per_gb'], '{:.2f}')} s/GB); "
        f"meshnet routers alone {fmt(m['proc_cpu_per_gb'], '{:.2f}')} s/GB = {fmt(r2, '{:.2f}')}× VXLAN's whole system",
        r is not None and r <= 1.5)
    t = ps.get("meshnet-trusted", {})
    if t.get("state") == "ok" and t.get("median"):
        r = ratio(t["median"]["tcp1_gbps"], v["tcp1_gbps"])
        row(GOALS[5], f"{fmt(r, '{:.2f}')}× ({fmt(t['median']['tcp1_gbps'], '{:.2f}')} vs {fmt(v['tcp1_gbps'], '{:.2f}')} Gbit/s)",
            None if r is None else r >= 0.95)
    else:
        row(GOALS[5], "path meshnet-trusted not run (`--paths ...,meshnet-trusted`)", None)
    row(GOALS[6], f"{fmt(m['rss_kb'], 'mib')} MiB (peak VmHWM {fmt(m['hwm_kb'], 'mib')} MiB)",
        m["rss_kb"] is not None and m["rss_kb"] < RSS_LIMIT_KB)
    return rows


def markdown(summary, out):
    run = summary["run"]
    ps = summary["paths"]
    L = []
    L.append(f"## Results {run['stamp']}" + (" (smoke)" if run["smoke"] else ""))
    L.append("")
    L.append(f"- command: `{run['command']}` (raw JSON: `bench/out/{os.path.basename(out.rstrip('/'))}/`)")
    L.append(f"- machine: {run['nproc']} cores ({run['cpu']}), kernel {run['kernel']}, {run['iperf3']}"
             + (f", {run['tinc']}" if run["tinc"] else ""))
    L.append(f"- meshnet forwarding queues: `--datapath-threads {run.get('meshnet_threads', 1)}"
             f" --datapath-threads-per-queue {run.get('meshnet_threads_per_queue', 1)}` on both routers")
    L.append(f"- load average (1/5/15 min) at start: {run['start_load']}; at end: {run['end_load']} (the end figure includes the benchmark's own load)")
    builds = [(p, i + 1, r["builds"]) for p, s in ps.items() for i, r in enumerate(s["rounds"]) if r.get("builds")]
    n_meas = sum(len(s["rounds"]) for s in ps.values())
    if builds:
        L.append(f"- **noise**: other engineers' build processes were running before {len(builds)} of {n_meas} measurement blocks: "
                 + "; ".join(f"round {r} {p}: {b}" for p, r, b in builds[:6]) + (" …" if len(builds) > 6 else ""))
    else:
        L.append(f"- no build process of anyone else was running before any of the {n_meas} measurement blocks")
    L.append(f"- meshnet: commit {run['meshnet_commit']}, binary `{run['meshnet_bin']}`, overlay MTU {ps.get('meshnet', {}).get('mtu', run['meshnet_mtu'])}"
             + (" (its default)" if run["meshnet_mtu"] == "default" else ""))
    L.append(f"- {run['rounds']} interleaved round(s), path order rotated each round; medians shown. TCP {run['tcp_s']} s per test, "
             f"UDP {run['udp_s']} s (`-u -l 64 -b 0`), {run['pings']} pings at 10 ms.")
    L.append("")
    hdr = ["path", "MTU"] + [h for _, h, _, _ in METRICS]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    for p, s in ps.items():
        if s["state"] != "ok":
            L.append(f"| {LABEL.get(p, p)} | {s['mtu']} | " + f"**{s['state']}**: {s['note']} |" + " |" * (len(METRICS) - 1))
            continue
        L.append(f"| {LABEL.get(p, p)} | {s['mtu']} | " + " | ".join(fmt(s["median"][k], f) for k, _, f, _ in METRICS) + " |")
    L.append("")
    L.append("CPU columns: *tunnel procs* is the utime+stime of both tunnel processes (the two meshnet routers, or the two tincd) "
             "during the single-stream TCP test, from /proc/PID/stat; kernel paths have no such process (—). *system* is all "
             "non-idle CPU of the machine from /proc/stat over the same test, which includes both iperf3 ends and the kernel, "
             "and is the like-for-like comparison. Both are divided by the GB the receiver got. RSS is the larger VmRSS of the "
             "two tunnel processes after each round (max over rounds).")
    L.append("")
    if "meshnet" in ps and "vxlan" in ps and ps["meshnet"]["state"] == "ok" and ps["vxlan"]["state"] == "ok":
        m, v = ps["meshnet"]["median"], ps["vxlan"]["median"]
        L.append("meshnet ÷ VXLAN: " + ", ".join(
            f"{h} {fmt(ratio(m[k], v[k]), '{:.2f}')}×" for k, h, f, _ in METRICS if k not in ("proc_cpu_per_gb", "rss_kb")))
        L.append("")
    if "meshnet-trusted" in ps and "vxlan" in ps and ps["meshnet-trusted"]["state"] == "ok" and ps["vxlan"]["state"] == "ok":
        m, v = ps["meshnet-trusted"]["median"], ps["vxlan"]["median"]
        r = ratio(m["tcp1_gbps"], v["tcp1_gbps"])
        L.append(f"meshnet-trusted ÷ VXLAN, one TCP stream: {fmt(r, '{:.2f}')}× ({fmt(m['tcp1_gbps'], '{:.2f}')} vs "
                 f"{fmt(v['tcp1_gbps'], '{:.2f}')} Gbit/s; goal ≥ 0.95×: **{'PASS' if r is not None and r >= 0.95 else 'FAIL'}**); "
                 + ", ".join(f"{h} {fmt(ratio(m[k], v[k]), '{:.2f}')}×" for k, h, f, _ in METRICS if k not in ("tcp1_gbps", "proc_cpu_per_gb", "rss_kb")))
        L.append("")
    L.append("### Goals (meshnet against kernel VXLAN)")
    L.append("")
    L.append("| goal | measured | verdict |")
    L.append("|---|---|---|")
    for g, meas, verdict in goals(summary):
        L.append(f"| {g} | {meas} | **{verdict}** |")
    L.append("")
    L.append("<details><summary>Per round</summary>")
    L.append("")
    L.append("| path | round | load1 before (includes this run's own previous tests) | TCP×1 | TCP×4 | UDP kpps | loss % | RTT ms | tunnel CPU s | system CPU s | RSS MiB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, s in ps.items():
        for i, r in enumerate(s["rounds"]):
            L.append(f"| {p} | {i + 1} | {r.get('load1_before')} | {fmt(r.get('tcp1_gbps'), '{:.2f}')} | {fmt(r.get('tcp4_gbps'), '{:.2f}')} | "
                     f"{fmt(r.get('udp_pps'), 'k')} | {fmt(r.get('udp_loss_pct'), '{:.1f}')} | {fmt(r.get('rtt_ms'), '{:.3f}')} | "
                     f"{fmt(r.get('proc_cpu_s'), '{:.2f}')} | {fmt(r.get('sys_cpu_s'), '{:.2f}')} | {fmt(r.get('rss_kb'), 'mib')} |")
    L.append("")
    L.append("</details>")
    return "\n".join(L) + "\n"


SKELETON = """# meshnet benchmarks

Produced by `bench/run.sh` (results) and `bench/profile.sh` (profile).

<!-- bench:results:begin -->
<!-- bench:results:end -->

<!-- bench:profile:begin -->
<!-- bench:profile:end -->
"""


def replace_section(md_path, name, body):
    text = open(md_path).read() if os.path.exists(md_path) else SKELETON
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    a = text.index(begin) + len(begin)
    b = text.index(end)
    text = text[:a] + "\n" + body.rstrip("\n") + "\n" + text[b:]
    with open(md_path, "w") as f:
        f.write(text)


def check(summary):
    bad = []
    for p, s in summary["paths"].items():
        if s["state"] == "skipped":
            print(f"smoke: {p}: skipped ({s['note']})")
            continue
        if s["state"] != "ok":
            bad.append(f"{p}: {s['note']}")
            continue
        for i, r in enumerate(s["rounds"]):
            probs = []
            if not r.get("tcp1_gbps"):
                probs.append("no TCP (1 stream)")
            if not r.get("tcp4_gbps"):
                probs.append("no TCP (4 streams)")
            if not r.get("udp_pps"):
                probs.append("no UDP delivered")
            if not r.get("ping_replies"):
                probs.append("no ping reply")
            if probs:
                bad.append(f"{p} round {i + 1}: " + ", ".join(probs))
    for b in bad:
        print(f"smoke: FAIL {b}")
    n = len([s for s in summary["paths"].values() if s["state"] != "skipped"])
    print(f"{n - len({b.split(':')[0].split()[0] for b in bad})} passed, {len({b.split(':')[0].split()[0] for b in bad})} failed")
    return not bad


def main(argv):
    if argv and argv[0] == "--section":
        name, body_file, md = argv[1:4]
        replace_section(md, name, open(body_file).read())
        return 0
    out = argv[0]
    md = argv[argv.index("--markdown") + 1] if "--markdown" in argv else None
    summary = summarise(out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    if md:
        replace_section(md, "results", text)
        print(f"updated {md}")
    if "--check" in argv:
        return 0 if check(summary) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
