#!/usr/bin/env bash
# Installs the system packages meshnet's build, demo and tests need (Debian/Ubuntu).
# Safe to run again: it installs only what is missing.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip       || need+=(iproute2)
have iptables || need+=(iptables)
have tcpdump  || need+=(tcpdump)
have iperf3   || need+=(iperf3)
have ping     || need+=(iputils-ping)
have ethtool  || need+=(ethtool)
have python3  || need+=(python3)
have ss       || need+=(iproute2)
have cc       || need+=(gcc)
have nft      || need+=(nftables)
have podman   || need+=(podman)
have curl     || need+=(curl)
# The DNS tests query meshnet's server with a real resolver client.
have dig      || need+=(dnsutils)
# The metrics test runs a real Prometheus and promtool; the map test a headless Chromium.
have prometheus || need+=(prometheus)
have promtool   || need+=(prometheus)
have chromium   || need+=(chromium)
# The Docker plugin test holds the router inside a call (strace) to kill it there.
have strace     || need+=(strace)
# The standard CNI plugins (portmap, chained by meshnet's conflist) as Debian ships them.
[ -x /usr/lib/cni/portmap ] || need+=(containernetworking-plugins)
[ -e /usr/include/pcap/pcap.h ] || need+=(libpcap-dev)
[ -e /usr/lib/x86_64-linux-gnu/pkgconfig/libpcap.pc ] || [ -e /usr/include/pcap/pcap.h ] || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "meshnet needs these packages: ${need[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! have cargo; then
  echo "meshnet needs a Rust toolchain (cargo); install it with rustup" >&2
  exit 1
fi
