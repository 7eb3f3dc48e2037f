#!/usr/bin/env bash
# meshnet data-plane benchmark: meshnet against direct veth routing, kernel
# VXLAN and tinc 1.0, side by side, interleaved rounds, medians.
#
#   bench/run.sh                 full run (3 rounds, 10 s TCP), writes BENCHMARKS.md
#   bench/run.sh --smoke         CI: one short round; non-zero exit if a path fails
#   bench/run.sh --clean         remove leftovers of earlier runs (mnb<pid>-* namespaces)
#
# Options: --paths direct,vxlan,meshnet,tinc[,meshnet-trusted]  --rounds N  --time SECS
#          (meshnet-trusted: both routers --trusted-subnets of the underlay, so data
#          goes unencrypted through their kernel VXLAN devices; with
#          BENCH_TRUSTED=userspace, unsealed over meshnet's own path instead)
#          --no-wait (do not wait for a quiet machine)  --no-md (leave BENCHMARKS.md)
#          --threads N (both meshnet routers launched with --datapath-threads N; default:
#          the router's own default, half the cores, at least 1)
#          --threads-per-queue 1|2 (--datapath-threads-per-queue; default: the router's, 1)
# Env: MESHNET_BIN (use this binary, else build release into $CARGO_TARGET_DIR or
#      /tmp/tgt-bench), MESHNET_MTU (default: meshnet's own default),
#      MESHNET_LAUNCH_ARGS (more `meshnet launch` options, e.g. "--rekey-interval 1"),
#      BENCH_BUILD_HEAD=1 (build the committed HEAD in /tmp/mnb-src-<commit>, not
#      the work tree), BENCH_MAX_LOAD (0.6), BENCH_WAIT_MAX (seconds to wait for it, 3600).
# Needs root, iproute2, iperf3, ping, python3; tinc is optional (path skipped).
set -uo pipefail
source "$(dirname "$0")/lib.sh"

SMOKE=0 CLEAN=0 WAIT=1 WRITE_MD=1
PATHS=direct,vxlan,meshnet,tinc
ROUNDS=3 T=10 UDP_T=5 PINGS=200
ARGV=("$0" "$@")
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --clean) CLEAN=1 ;;
    --paths) PATHS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --time) T=$2; shift ;;
    --no-wait) WAIT=0 ;;
    --no-md) WRITE_MD=0 ;;
    --threads) MESHNET_THREADS=$2; shift ;;
    --threads-per-queue) MESHNET_THREADS_PER_QUEUE=$2; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
if [ -n "${MESHNET_THREADS:-}" ]; then
  [[ $MESHNET_THREADS =~ ^[0-9]+$ ]] && [ "$MESHNET_THREADS" -ge 1 ] || die "--threads $MESHNET_THREADS: a number, at least 1"
  export MESHNET_THREADS
  THREADS_USED=$MESHNET_THREADS
else
  THREADS_USED=$(( $(nproc) / 2 )); [ "$THREADS_USED" -ge 1 ] || THREADS_USED=1
fi
if [ -n "${MESHNET_THREADS_PER_QUEUE:-}" ]; then
  [[ $MESHNET_THREADS_PER_QUEUE =~ ^[12]$ ]] || die "--threads-per-queue $MESHNET_THREADS_PER_QUEUE: 1 or 2"
  export MESHNET_THREADS_PER_QUEUE
fi
if [ $SMOKE = 1 ]; then ROUNDS=1 T=2 UDP_T=1 PINGS=20 WAIT=0 WRITE_MD=0; fi

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"

if [ $CLEAN = 1 ]; then
  for pre in $(ip netns list | awk '{print $1}' | grep -oE '^mnb[0-9]+' | sort -u); do
    pid=${pre#mnb}
    if kill -0 "$pid" 2>/dev/null && [ "$pid" != $$ ] && grep -q 'bench/\(run\|profile\)\.sh' /proc/"$pid"/cmdline 2>/dev/null; then
      log "skipping $pre: its run (pid $pid) is still going"
      continue
    fi
    for d in /tmp/"$pre"/meshnet/h1 /tmp/"$pre"/meshnet/h2; do
      [ -d "$d" ] || continue
      for b in "${MESHNET_BIN:-}" /tmp/tgt-bench/release/meshnet; do
        [ -x "$b" ] && { timeout 20 "$b" --state-dir "$d" reset >/dev/null 2>&1; break; }
      done
    done
    log "removing $pre-*"
    cleanup_prefix "$pre"
    rm -rf "/tmp/$pre"
  done
  exit 0
fi

for c in ip iperf3 ping python3 ss; do command -v $c >/dev/null || die "missing $c (apt-get install iproute2 iperf3 iputils-ping python3)"; done
if [[ ,$PATHS, == *,tinc,* ]] && ! command -v tincd >/dev/null && [ $SMOKE = 0 ]; then
  log "tinc not installed: trying apt-get install tinc"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinc >/dev/null 2>&1 || log "tinc did not install; its path is skipped"
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$BENCH_DIR/out/$STAMP$([ $SMOKE = 1 ] && echo -smoke)
mkdir -p "$OUT" "$WORK"
trap cleanup_all EXIT
trap 'exit 130' INT TERM
IFS=, read -r -a PATH_LIST <<<"$PATHS"

# ---- meshnet binary (built before waiting, so our own build is not measured) ----
declare -A STATE NOTE
if [[ ,$PATHS, == *,meshnet,* ]] || [[ ,$PATHS, == *,meshnet-trusted,* ]]; then
  if ! find_meshnet; then
    for p in meshnet meshnet-trusted; do STATE[$p]=failed; NOTE[$p]="meshnet did not build"; done
  fi
fi

# ---- machine, quiet wait --------------------------------------------------
MAX_LOAD=${BENCH_MAX_LOAD:-0.6}
if [ $WAIT = 1 ]; then
  waited=0
  below() { python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$(load1)" "$MAX_LOAD"; }
  while ! below; do
    [ $waited -ge "${BENCH_WAIT_MAX:-3600}" ] && { log "load still $(load1) after ${waited}s: measuring anyway (noted)"; break; }
    [ $((waited % 60)) = 0 ] && log "waiting for load < $MAX_LOAD (now $(load1); builds: $(foreign_builds))"
    sleep 5; waited=$((waited + 5))
  done
fi
START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- topology --------------------------------------------------------------
for p in "${PATH_LIST[@]}"; do
  [ -n "${STATE[$p]:-}" ] && continue
  log "setting up $p"
  setup_path "$p" >"$OUT/setup-$p.log" 2>&1
  rc=$?
  if [ $rc = 2 ]; then STATE[$p]=skipped; NOTE[$p]="not installed"; continue; fi
  if [ $rc != 0 ]; then
    STATE[$p]=failed; NOTE[$p]="setup failed (see setup-$p.log)"
    tail -5 "$OUT/setup-$p.log" | sed "s/^/  $p: /" >&2
    for r in h1 h2; do
      [ -f "$WORK/$p/$r/meshnet.log" ] && tail -15 "$WORK/$p/$r/meshnet.log" | sed "s/^/  $r meshnet.log: /" >&2
    done
    continue
  fi
  if wait_reachable "$p" "$([ "$p" = tinc ] || [ "${p%-trusted}" = meshnet ] && echo 60 || echo 10)"; then
    STATE[$p]=ok
  else
    STATE[$p]=failed; NOTE[$p]="c1 cannot reach c2: $UNREACHABLE (see diag-$p.txt)"
    path_diag "$p" >"$OUT/diag-$p.txt" 2>&1
    log "$p: $UNREACHABLE"
  fi
done
for p in meshnet meshnet-trusted; do
  if [ "${STATE[$p]:-}" = ok ]; then
    for r in h1 h2; do meshnet_status $r $p >"$OUT/$p-status-$r-start.json"; done
  fi
done
for p in "${PATH_LIST[@]}"; do log "$p: ${STATE[$p]} ${NOTE[$p]:-}"; done

# ---- measurements: interleaved rounds, rotating the order ---------------------
measure() { # PATH ROUND
  local p=$1 r=$2 f=$OUT/r$2-$1
  printf '{"load1":%s,"builds":"%s"}\n' "$(load1)" "$(foreign_builds)" >"$f-env.json"
  log "round $r $p: tcp x1"
  iperf_run "$p" "$f-tcp1.json" -t "$T" || log "  tcp x1 failed (rc $?)"
  log "round $r $p: tcp x4"
  iperf_run "$p" "$f-tcp4.json" -t "$T" -P 4 || log "  tcp x4 failed (rc $?)"
  log "round $r $p: udp 64 B"
  iperf_run "$p" "$f-udp64.json" -t "$UDP_T" -u -l 64 -b 0 || log "  udp failed (rc $?)"
  log "round $r $p: ping x$PINGS"
  ping_run "$p" "$f-ping.txt" "$PINGS" || log "  ping lost replies"
  rss_run "$p" "$f-rss.json"
  if [ "${p%-trusted}" = meshnet ]; then
    local h; for h in h1 h2; do meshnet_status $h $p >"$f-status-$h.json"; done
  fi
}
n=${#PATH_LIST[@]}
for r in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((n - 1))); do
    p=${PATH_LIST[$(((i + r - 1) % n))]}
    [ "${STATE[$p]}" = ok ] && measure "$p" "$r"
  done
done
END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- meshnet logs ---------------------------------------------------------------
for r in h1 h2; do
  [ -f "$WORK/meshnet/$r/meshnet.log" ] && cp "$WORK/meshnet/$r/meshnet.log" "$OUT/meshnet-$r.log"
  [ -f "$WORK/meshnet-trusted/$r/meshnet.log" ] && cp "$WORK/meshnet-trusted/$r/meshnet.log" "$OUT/meshnet-trusted-$r.log"
  [ -f "$WORK/tinc/$r/tinc.log" ] && cp "$WORK/tinc/$r/tinc.log" "$OUT/tinc-$r.log"
done

# ---- report ---------------------------------------------------------------------
{
  echo "{"
  echo "\"stamp\": \"$STAMP\", \"smoke\": $SMOKE, \"rounds\": $ROUNDS, \"tcp_s\": $T, \"udp_s\": $UDP_T, \"pings\": $PINGS,"
  echo "\"command\": \"$(cd "$REPO_DIR" && echo "${ARGV[*]}" | sed "s#^$REPO_DIR/##")\","
  echo "\"start_load\": \"$START_LOAD\", \"end_load\": \"$END_LOAD\", \"nproc\": $(nproc), \"kernel\": \"$(uname -r)\","
  echo "\"cpu\": \"$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)\","
  echo "\"iperf3\": \"$(iperf3 --version | head -1)\", \"tinc\": \"$(tincd --version 2>/dev/null | head -1)\","
  echo "\"meshnet_threads\": $THREADS_USED, \"meshnet_threads_per_queue\": ${MESHNET_THREADS_PER_QUEUE:-1},"
  echo "\"meshnet_bin\": \"${MESHNET_BIN:-}\", \"meshnet_commit\": \"${MESHNET_COMMIT:-$(meshnet_commit)}\", \"meshnet_mtu\": \"$(overlay_mtu meshnet)\","
  echo "\"paths\": {"
  first=1
  for p in "${PATH_LIST[@]}"; do
    [ $first = 1 ] || echo ","
    first=0
    mtu=$(overlay_mtu "$p")
    [ "${STATE[$p]}" = ok ] && mtu=$(ip -n "$(ns "$p" c1)" -o link show "$(c1_if "$p")" | grep -oE 'mtu [0-9]+' | cut -d' ' -f2)
    printf '"%s": {"state": "%s", "note": "%s", "mtu": "%s"}' "$p" "${STATE[$p]}" "${NOTE[$p]:-}" "$mtu"
  done
  echo "}}"
} >"$OUT/run.json"

REPORT_ARGS=("$OUT")
[ $WRITE_MD = 1 ] && REPORT_ARGS+=(--markdown "$REPO_DIR/BENCHMARKS.md")
[ $SMOKE = 1 ] && REPORT_ARGS+=(--check)
python3 "$BENCH_DIR/report.py" "${REPORT_ARGS[@]}"
rc=$?
log "raw output in $OUT"
exit $rc
