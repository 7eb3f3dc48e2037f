#!/usr/bin/env bash
# meshnet in one command: three hosts and three containers, all network
# namespaces on this machine, joined by one encrypted Layer-2 overlay.
#
#   sudo scripts/demo.sh            build, run the demo, tear it all down
#   sudo scripts/demo.sh --keep     leave it running to poke around
#   sudo scripts/demo.sh --clean    remove what a kept (or crashed) demo left
#
# Hosts mndemoh1..3 sit on an underlay 10.250.0.0/24 (a bridge in namespace
# mndemosw, nothing connected to the real network). Containers mndemoc1..3 get
# 10.40.0.1..3/16 on the overlay. h3 is only told about h2 and finds h1 by
# gossip. Set MESHNET_BIN to use a binary instead of building one.
set -euo pipefail

P=mndemo
UNDERLAY=10.250.0
DIR=/tmp/$P
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEEP=0

if [ -t 1 ]; then B=$'\033[1m'; G=$'\033[32m'; R=$'\033[31m'; N=$'\033[0m'; else B= G= R= N=; fi
say() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
die() { printf '%sdemo: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

# meshnet on host i, showing the command as a person would type it there.
mn() {
    local i=$1
    shift
    printf '%s[h%s]$ meshnet %s%s\n' "$B" "$i" "$*" "$N"
    MESHNET_STATE_DIR=$DIR/h$i ip netns exec "${P}h$i" "$BIN" "$@"
}
# The same, quietly (for the teardown).
mn_quiet() {
    local i=$1
    shift
    MESHNET_STATE_DIR=$DIR/h$i timeout 20 ip netns exec "${P}h$i" "$BIN" "$@" >/dev/null 2>&1
}
# A command in a container, shown.
in_c() {
    local j=$1
    shift
    printf '%s[c%s]$ %s%s\n' "$B" "$j" "$*" "$N"
    ip netns exec "${P}c$j" "$@"
}

demo_namespaces() { ip netns list | awk '{print $1}' | grep -E "^${P}(sw|h[0-9]+|c[0-9]+)$" || true; }

clean() {
    local ns pids sig i
    if [ -n "${BIN:-}" ] && [ -x "$BIN" ]; then
        for i in 1 2 3; do
            if [ -d "$DIR/h$i" ] && ip netns list | awk '{print $1}' | grep -qx "${P}h$i"; then
                mn_quiet "$i" reset || true
            fi
        done
    fi
    for sig in TERM KILL; do
        pids=""
        for ns in $(demo_namespaces); do pids="$pids $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"; done
        [ -z "${pids// /}" ] && break
        kill -"$sig" $pids 2>/dev/null || true
        sleep 1
    done
    for ns in $(demo_namespaces); do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$DIR"
}

find_bin() {
    if [ -n "${MESHNET_BIN:-}" ]; then
        BIN=$MESHNET_BIN
        return
    fi
    local target=${CARGO_TARGET_DIR:-target}
    case $target in /*) ;; *) target=$ROOT/$target ;; esac
    BIN=$target/release/meshnet
}

case ${1:-} in
    "") ;;
    --keep) KEEP=1 ;;
    --clean)
        [ "$(id -u)" = 0 ] || die "needs root: sudo $0 --clean"
        find_bin
        clean
        echo "demo cleaned up"
        exit 0
        ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || die "needs root to create network namespaces: sudo $0 $*"
find_bin
if [ -z "${MESHNET_BIN:-}" ]; then
    # System packages (iproute2, ping, ...) first, as the README promises.
    if [ -x "$ROOT/scripts/deps.sh" ]; then "$ROOT/scripts/deps.sh"; fi
    command -v cargo >/dev/null || die "cargo not found (or set MESHNET_BIN to a meshnet binary)"
    say "Building meshnet (cargo build --release -p meshnet)"
    (cd "$ROOT" && cargo build --release -p meshnet)
fi
[ -x "$BIN" ] || die "no meshnet binary at $BIN"
for tool in ip ping; do command -v "$tool" >/dev/null || die "missing '$tool' (apt-get install iproute2 iputils-ping)"; done

# A crashed or kept earlier run must not get in the way.
if [ -n "$(demo_namespaces)" ] || [ -e "$DIR" ]; then
    say "Removing leftovers of an earlier demo"
    clean
fi

finish() {
    local rc=$?
    set +e
    trap '' PIPE # a closed stdout (demo.sh | head) must not stop the teardown
    if [ $rc != 0 ]; then
        printf '\n%sdemo failed (exit %s).%s\n' "$R" "$rc" "$N"
        for i in 1 2 3; do
            if [ -f "$DIR/h$i/meshnet.log" ]; then
                echo "---- last lines of h$i's $DIR/h$i/meshnet.log ----"
                tail -n 20 "$DIR/h$i/meshnet.log"
            fi
        done
    fi
    if [ $KEEP = 1 ] && [ $rc = 0 ]; then
        cat <<EOF

${B}The demo keeps running.${N} Poke around:
  ip netns exec ${P}c1 ping 10.40.0.3                  # c1 -> c3 over the overlay
  ip netns exec ${P}h1 tcpdump -ni eth0 udp port 6783   # what the wire sees: ciphertext
  less $DIR/h1/meshnet.log                              # a router's log
  MESHNET_STATE_DIR=$DIR/h3 ip netns exec ${P}h3 $BIN status
  MESHNET_STATE_DIR=$DIR/h1 ip netns exec ${P}h1 $BIN status connections
The password is in $DIR/password.
Clean up:
  sudo $0 --clean
EOF
    else
        [ $KEEP = 1 ] && echo "(--keep: the demo failed, so it is removed; rerun to try again)"
        echo
        echo "Tearing down the demo namespaces..."
        clean
        echo "done."
    fi
    exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

say "Underlay: switch ${P}sw, hosts ${P}h1..3 on ${UNDERLAY}.0/24, containers ${P}c1..3"
mkdir -p "$DIR"
ip netns add "${P}sw"
ip -n "${P}sw" link set lo up
ip -n "${P}sw" link add br0 type bridge
ip -n "${P}sw" link set br0 up
for i in 1 2 3; do
    ip netns add "${P}h$i"
    ip -n "${P}h$i" link set lo up
    ip -n "${P}sw" link add "h$i" type veth peer name eth0 netns "${P}h$i"
    ip -n "${P}sw" link set "h$i" master br0 up
    ip -n "${P}h$i" addr add "$UNDERLAY.$i/24" dev eth0
    ip -n "${P}h$i" link set eth0 up
    ip netns add "${P}c$i"
    ip -n "${P}c$i" link set lo up
    echo "  host h$i = $UNDERLAY.$i   container c$i = 10.40.0.$i (once attached)"
done

say "A password for the mesh (generated, in $DIR/password)"
umask 077
head -c 18 /dev/urandom | base64 | tr -d '/+=\n' > "$DIR/password"
umask 022
echo "  $(wc -c < "$DIR/password") characters"

say "Launch the routers: h2 joins h1; h3 is told only about h2"
mn 1 launch --nickname h1 --password-file "$DIR/password"
mn 2 launch --nickname h2 --password-file "$DIR/password" "$UNDERLAY.1"
mn 3 launch --nickname h3 --password-file "$DIR/password"
mn 3 connect "$UNDERLAY.2"

say "Attach a container to the overlay on each host"
for i in 1 2 3; do
    mn "$i" attach "10.40.0.$i/12" "${P}c$i"
done

say "Waiting for c1 to reach c3 (h3 must find h1 through h2)"
ok=0
for _ in $(seq 1 30); do
    if ip netns exec "${P}c1" ping -c 1 -W 1 -q 10.40.0.3 >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || die "c1 cannot reach c3 after 30 s"
echo "  reachable"

say "What h3 sees"
mn 3 status
echo
mn 3 status peers
echo
mn 3 status connections

say "Attached containers"
for i in 1 2 3; do mn "$i" ps; done

say "c1 -> c3 and c3 -> c1 over the encrypted overlay"
in_c 1 ping -c 3 10.40.0.3
echo
in_c 3 ping -c 3 10.40.0.1

say "IPAM: c4 on h2, attached with no address, gets a unique one from the mesh's range"
ip netns add "${P}c4"
ip -n "${P}c4" link set lo up
addr4=$(mn 2 attach "${P}c4" | tail -n 1)
echo "  c4 = $addr4"
mn 2 status ipam
echo
in_c 1 ping -c 3 "${addr4%/*}"

printf '\n%sDemo OK:%s three hosts, one encrypted Layer-2 network, containers talking across it.\n' "$G" "$N"
