#!/bin/sh
# Entrypoint of the meshnet image.
#
#   (no arguments)            meshnet launch --foreground
#   launch [OPTIONS] [PEER..] meshnet launch --foreground [OPTIONS] [PEER..]
#                             (a container's main process must stay in the foreground)
#   any other meshnet command meshnet COMMAND ...   (status, ps, attach, expose, dns-args, ...)
#   anything else             run it (sh, ip, ...)
#
# A leading `--state-dir DIR` (or `--state-dir=DIR`), meshnet's one global
# option, may come before any of these; it is passed on as $MESHNET_STATE_DIR.
#
# Peers can also come from $MESHNET_PEERS (space separated), and from a file
# $MESHNET_PEERS_FILE (one per line; the Kubernetes DaemonSet writes it).
# The password comes from $MESHNET_PASSWORD or --password-file.
#
# launch's `--metrics-addr ADDR:PORT` with an IPv6 ADDR not in brackets (the
# DaemonSet's "$(NODE_IP):6782" on an IPv6 node) is passed on as [ADDR]:PORT.
set -eu

# "fd00::5:6782" -> "[fd00::5]:6782"; anything else (IPv4, bracketed, empty) as is.
bracket_ipv6() {
    case "$1" in
        \[*) printf '%s' "$1" ;;
        *:*:*)
            port=${1##*:}
            case "$port" in
                '' | *[!0-9]*) printf '%s' "$1" ;;
                *) printf '[%s]:%s' "${1%:*}" "$port" ;;
            esac
            ;;
        *) printf '%s' "$1" ;;
    esac
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --state-dir)
            if [ "$#" -lt 2 ] || [ -z "$2" ]; then
                echo "docker-entrypoint.sh: --state-dir needs a directory (--state-dir DIR COMMAND ...)" >&2
                exit 2
            fi
            MESHNET_STATE_DIR=$2
            export MESHNET_STATE_DIR
            shift 2
            ;;
        --state-dir=*)
            if [ -z "${1#--state-dir=}" ]; then
                echo "docker-entrypoint.sh: --state-dir needs a directory (--state-dir DIR COMMAND ...)" >&2
                exit 2
            fi
            MESHNET_STATE_DIR=${1#--state-dir=}
            export MESHNET_STATE_DIR
            shift
            ;;
        *) break ;;
    esac
done

# An empty password (say, an unset compose variable) means none, not "".
if [ -z "${MESHNET_PASSWORD:-}" ]; then
    unset MESHNET_PASSWORD
fi

if [ "$#" -eq 0 ]; then
    set -- launch
fi

case "$1" in
    launch)
        shift
        foreground=--foreground
        n=$#
        prev=
        for a in "$@"; do
            [ "$a" = "--foreground" ] && foreground=
            case "$prev" in
                --metrics-addr) a=$(bracket_ipv6 "$a") ;;
            esac
            case "$a" in
                --metrics-addr=*) a=--metrics-addr=$(bracket_ipv6 "${a#--metrics-addr=}") ;;
            esac
            set -- "$@" "$a"
            prev=$a
        done
        shift "$n"
        peers=""
        if [ -n "${MESHNET_PEERS:-}" ]; then
            peers="$MESHNET_PEERS"
        fi
        if [ -n "${MESHNET_PEERS_FILE:-}" ] && [ -r "${MESHNET_PEERS_FILE}" ]; then
            peers="$peers $(grep -v '^[[:space:]]*#' "$MESHNET_PEERS_FILE" | tr '\n' ' ')"
        fi
        # shellcheck disable=SC2086 # word splitting of the peer list is wanted
        exec meshnet launch $foreground "$@" $peers
        ;;
    # Every subcommand of `meshnet --help` (tests/tests/docker.rs checks the list).
    connect|forget|attach|detach|expose|hide|status|ps|rmpeer|report|prime|dns-add|dns-remove|dns-lookup|dns-args|stop|reset|help|--help|-h|--version|-V)
        exec meshnet "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
