#!/usr/bin/env bash
# Removes what crashed end-to-end test labs (tests/src/lab.rs) left behind:
# their processes, network namespaces (mx?????sw, mx?????h<i>, mx?????c<j>),
# /tmp/meshnet-lab-* directories and /tmp/meshnet-io-* files.
#
#   scripts/lab-clean.sh          clean labs whose test process is gone
#   scripts/lab-clean.sh --all    also labs whose test process still runs
#   scripts/lab-clean.sh --dry-run
#
# It only touches namespaces with the lab pattern; the demo has its own
# `scripts/demo.sh --clean`. Needs root.
set -u

all=0
dry=0
for a in "$@"; do
    case $a in
        --all) all=1 ;;
        --dry-run|-n) dry=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "lab-clean: unknown argument $a" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then
    echo "lab-clean: needs root (namespaces)" >&2
    exit 1
fi

PATTERN='^mx[0-9a-z]{4}(sw|h[0-9]+|c[0-9]+)$'
removed=0

do_() {
    if [ $dry = 1 ]; then echo "would: $*"; else "$@"; fi
}

# Is the lab owner (file content "pid starttime") still the same live process?
owner_alive() {
    local f=$1 pid st now
    [ -f "$f" ] || return 1
    read -r pid st < "$f" || return 1
    [ -r "/proc/$pid/stat" ] || return 1
    now=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $20}')
    [ "$st" = "?" ] || [ "$st" = "$now" ]
}

kill_ns() {
    local ns=$1 pids sig
    for sig in TERM KILL; do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [ -z "${pids// /}" ] && break
        echo "  kill -$sig $pids (in $ns)"
        do_ kill -"$sig" $pids 2>/dev/null
        [ $dry = 1 ] && break
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
            sleep 0.3
        done
    done
    echo "  ip netns del $ns"
    do_ ip netns del "$ns" 2>/dev/null
    removed=$((removed + 1))
}

live_prefixes=" "
for dir in /tmp/meshnet-lab-*/; do
    [ -d "$dir" ] || continue
    prefix=$(basename "$dir")
    prefix=${prefix#meshnet-lab-}
    if [ $all = 0 ] && owner_alive "$dir/owner"; then
        echo "lab $prefix: its test (pid $(cut -d' ' -f1 "$dir/owner")) still runs; kept (use --all)"
        live_prefixes="$live_prefixes$prefix "
        continue
    fi
    echo "lab $prefix ($(cat "$dir/test" 2>/dev/null || echo '?')):"
    # Kill everything first (containers' processes too), then delete.
    for ns in $( (cat "$dir/namespaces" 2>/dev/null; ip netns list | awk '{print $1}' | grep -E "^${prefix}(sw|h[0-9]+|c[0-9]+)$") | sort -u); do
        ip netns list | awk '{print $1}' | grep -qx "$ns" && kill_ns "$ns"
    done
    do_ rm -rf "$dir"
done

# Namespaces of the lab pattern whose directory is already gone.
for ns in $(ip netns list | awk '{print $1}' | grep -E "$PATTERN"); do
    prefix=${ns:0:6}
    case $live_prefixes in *" $prefix "*) continue ;; esac
    [ -d "/tmp/meshnet-lab-$prefix" ] && [ $all = 0 ] && continue
    echo "orphan namespace $ns:"
    kill_ns "$ns"
done

# Output files of commands whose test process is gone.
for f in /tmp/meshnet-io-*; do
    [ -e "$f" ] || continue
    pid=${f#/tmp/meshnet-io-}
    pid=${pid%%-*}
    if [ $all = 1 ] || [ ! -d "/proc/$pid" ]; then do_ rm -f "$f"; fi
done

echo "lab-clean: $removed namespace(s) removed"
