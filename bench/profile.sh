#!/usr/bin/env bash
# Profiles the meshnet routers during the single-stream TCP test: builds the
# meshnet path of bench/run.sh, runs iperf3 through it while `perf record -g`
# samples each router process (h1 = sending side, h2 = receiving side), and
# writes the top symbols into the "profile" section of BENCHMARKS.md.
#
#   bench/profile.sh [--time SECS] [--no-wait] [--no-md]
# Env: MESHNET_BIN, MESHNET_MTU, BENCH_MAX_LOAD, BENCH_WAIT_MAX as for run.sh.
set -uo pipefail
source "$(dirname "$0")/lib.sh"

T=10 WAIT=1 WRITE_MD=1
ARGV=("$0" "$@")
while [ $# -gt 0 ]; do
  case $1 in
    --time) T=$2; shift ;;
    --no-wait) WAIT=0 ;;
    --no-md) WRITE_MD=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "needs root"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$BENCH_DIR/out/$STAMP-profile
mkdir -p "$OUT" "$WORK"
SECTION=$OUT/profile.md
trap cleanup_all EXIT
trap 'exit 130' INT TERM

write_section() {
  if [ $WRITE_MD = 1 ]; then
    python3 "$BENCH_DIR/report.py" --section profile "$SECTION" "$REPO_DIR/BENCHMARKS.md" && log "updated BENCHMARKS.md"
  fi
  cat "$SECTION"
}

# Does perf work here? Hardware counters often do not in a VM; the software
# cpu-clock event is enough for sampling.
HW=$(perf stat -e instructions true 2>&1 | grep -c 'not supported')
if ! command -v perf >/dev/null || ! perf record -q -e cpu-clock -o "$OUT/probe.data" true >/dev/null 2>&1; then
  {
    echo "## Profile $STAMP"
    echo
    echo "perf is unsupported on this machine (\`perf record -e cpu-clock true\` fails), so there is no profile."
  } >"$SECTION"
  write_section
  exit 0
fi
rm -f "$OUT/probe.data"

find_meshnet || die "meshnet did not build"
if [ $WAIT = 1 ]; then
  waited=0
  below() { python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$(load1)" "${BENCH_MAX_LOAD:-0.6}"; }
  while ! below && [ $waited -lt "${BENCH_WAIT_MAX:-3600}" ]; do
    [ $((waited % 60)) = 0 ] && log "waiting for load < ${BENCH_MAX_LOAD:-0.6} (now $(load1))"
    sleep 5; waited=$((waited + 5))
  done
fi
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
setup_meshnet >"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; die "meshnet setup failed"; }
wait_reachable meshnet 60 || die "meshnet: c1 cannot reach c2"
declare -A PID
for r in h1 h2; do
  PID[$r]=$(meshnet_pids $r | head -1)
  [ -n "${PID[$r]}" ] || die "no meshnet process in $(ns meshnet $r)"
done
log "routers: h1 ${PID[h1]} (sender), h2 ${PID[h2]} (receiver); recording ${T}s of TCP"
PERF=()
for r in h1 h2; do
  perf record -q -e cpu-clock -F 999 -g -p "${PID[$r]}" -o "$OUT/perf-$r.data" >"$OUT/perf-$r.log" 2>&1 &
  PERF+=($!)
done
sleep 0.5
iperf_run meshnet "$OUT/tcp1.json" -t "$T" || log "iperf3 failed"
for p in "${PERF[@]}"; do kill -INT "$p" 2>/dev/null; done
for p in "${PERF[@]}"; do wait "$p"; done
for r in h1 h2; do meshnet_status $r >"$OUT/status-$r.json"; done

GBPS=$(python3 -c "import json; print('%.2f' % (json.load(open('$OUT/tcp1.json'))['end']['sum_received']['bits_per_second']/1e9))" 2>/dev/null || echo "?")
{
  echo "## Profile $STAMP"
  echo
  echo "- command: \`${ARGV[*]#$REPO_DIR/}\`; meshnet commit ${MESHNET_COMMIT:-$(meshnet_commit)}; load before: $LOAD"
  echo "- one iperf3 TCP stream c1 → c2 for ${T} s through meshnet (${GBPS} Gbit/s while profiled), \`perf record -e cpu-clock -F 999 -g -p PID\` on each router"
  [ "$HW" -gt 0 ] && echo "- hardware counters are not available here (\`perf stat -e instructions\`: not supported), so sampling uses the software cpu-clock event"
  echo "- full reports with call graphs: \`bench/out/$(basename "$OUT")/perf-*.txt\`"
  for r in h1 h2; do
    side=$([ $r = h1 ] && echo "sending router (h1: TAP → encrypt → UDP)" || echo "receiving router (h2: UDP → decrypt → TAP)")
    perf report -i "$OUT/perf-$r.data" --stdio --no-children >"$OUT/perf-$r.txt" 2>/dev/null
    echo
    echo "### $side"
    echo
    echo "Samples by thread and kernel/user:"
    echo
    echo '```'
    perf report -i "$OUT/perf-$r.data" --stdio --no-children -g none --sort comm,dso 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12
    echo '```'
    echo
    echo "Top symbols (\`perf report --stdio --no-children -g none\`):"
    echo
    echo '```'
    perf report -i "$OUT/perf-$r.data" --stdio --no-children -g none --sort sym 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25
    echo '```'
  done
} >"$SECTION"
write_section
