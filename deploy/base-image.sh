#!/usr/bin/env bash
# Makes a local Debian bookworm image without any registry, for building
# deploy/Dockerfile where nothing can be pulled (CI, air-gapped hosts):
#
#   debootstrap --variant=minbase bookworm (+ iproute2, iputils-ping, procps, curl, libpcap0.8, nftables)
#   -> tarball cached in $MESHNET_BASE_CACHE (default /var/cache/meshnet-test)
#   -> `docker import` as $MESHNET_BASE_IMAGE (default meshnet-test-base:bookworm-<hash of the package list>)
#
# Both the tarball and the image are reused when present, so only the first run
# pays for debootstrap (a few minutes). Prints the image name on its last line.
#   deploy/base-image.sh            make or reuse
#   deploy/base-image.sh --rebuild  throw the cache away first
set -euo pipefail

SUITE="${MESHNET_BASE_SUITE:-bookworm}"
MIRROR="${MESHNET_BASE_MIRROR:-}"
# What deploy/Dockerfile installs when missing, plus ping and ps for the tests.
PACKAGES="iproute2,iputils-ping,procps,curl,ca-certificates,libpcap0.8,nftables"
# The package list is part of the names: changing it makes a new cache entry.
KEY="$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-8)"
IMAGE="${MESHNET_BASE_IMAGE:-meshnet-test-base:$SUITE-$KEY}"
CACHE="${MESHNET_BASE_CACHE:-/var/cache/meshnet-test}"
TARBALL="$CACHE/$SUITE-minbase-$KEY.tar"

if [[ "${1:-}" == "--rebuild" ]]; then
    rm -f "$TARBALL"
    docker image rm -f "$IMAGE" >/dev/null 2>&1 || true
fi

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi

mkdir -p "$CACHE"
# One builder at a time: parallel test runs wait for the first one's tarball.
exec 9>"$CACHE/.lock"
flock 9

if [[ ! -s "$TARBALL" ]]; then
    if ! command -v debootstrap >/dev/null; then
        echo "base-image: installing debootstrap" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2 \
            || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
    fi
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    root="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    echo "base-image: debootstrap --variant=minbase $SUITE from $MIRROR (once; cached in $TARBALL)" >&2
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
    # Slim it down: no apt lists, docs or caches in the image.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/debootstrap
    tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
fi

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base-image: docker import $TARBALL as $IMAGE" >&2
    docker import --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$TARBALL" "$IMAGE" >/dev/null
fi
echo "$IMAGE"
