#!/usr/bin/env bash
# Runs every fuzz target for a while and prints one line per target.
#
#   fuzz/run-all.sh [SECONDS] [JOBS] [TARGET...]
#
# SECONDS: per target (default 600, the project's bar for "ran clean");
# JOBS: targets run side by side (default 1); TARGET: a subset (default: all
# in fuzz/Cargo.toml). Needs cargo-fuzz (`cargo install cargo-fuzz`). Uses
# `cargo +nightly` when rustup lists a nightly toolchain; otherwise (or when
# RUSTC_BOOTSTRAP=1 is already set) the default toolchain with
# RUSTC_BOOTSTRAP=1, which makes stable accept the -Z flags cargo fuzz passes.
# Logs and crashes stay in fuzz/runs/ and fuzz/artifacts/ (not committed).
# Exit status non-zero if any target crashed or failed to start.
set -uo pipefail
cd "$(dirname "$0")"
SECS=${1:-600}
JOBS=${2:-1}
shift 2 2>/dev/null || shift $#
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^meshnet-fuzz$')
fi
if [ -z "${RUSTC_BOOTSTRAP:-}" ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  FUZZ=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
fi
"${FUZZ[@]}" build || exit 1
mkdir -p runs
run_one() {
  local t=$1 log=runs/$1.log start end
  start=$(date +%s)
  "${FUZZ[@]}" run "$t" -- -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1
  local rc=$?
  end=$(date +%s)
  local runs cov
  runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | awk '{print $2}')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  if [ $rc -eq 0 ]; then
    printf '%-22s clean  %5ss  %12s execs  cov %s\n' "$t" "$((end - start))" "${runs:-?}" "${cov:-?}"
  else
    printf '%-22s FAILED (exit %s) after %ss, see fuzz/%s and fuzz/artifacts/%s\n' "$t" "$rc" "$((end - start))" "$log" "$t"
    return 1
  fi
}
fail=0
running=0
for t in "${TARGETS[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || fail=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || fail=1
  running=$((running - 1))
done
exit $fail
