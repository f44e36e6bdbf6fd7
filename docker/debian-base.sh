#!/usr/bin/env bash
# Makes sure the engine has the base image debian:12 (docker.io/library/debian:12). Pulls it;
# where no image registry is reachable (our machines reach Debian's archive only), builds the
# same Debian 12 with debootstrap --variant=minbase and imports it under that name.
set -euo pipefail
# shellcheck source=docker/engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/engine.sh"

IMAGE=docker.io/library/debian:12
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

"${ENGINE[@]}" image inspect "$IMAGE" >/dev/null 2>&1 && exit 0
if "${ENGINE[@]}" pull -q "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi

echo "debian-base: $IMAGE cannot be pulled; building it with debootstrap from $MIRROR" >&2
command -v debootstrap >/dev/null || "$ENGINE_ROOT/scripts/deps.sh" docker
[[ $(id -u) -eq 0 ]] || { echo "debian-base: debootstrap needs root" >&2; exit 1; }
dir=$(mktemp -d /tmp/debian-base.XXXXXX)
trap 'rm -rf "$dir"' EXIT
if ! debootstrap --variant=minbase bookworm "$dir/root" "$MIRROR" >"$dir/log" 2>&1; then
    tail -n 20 "$dir/log" >&2
    exit 1
fi
# As the official image: updates and security sources, no package caches.
cat >"$dir/root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
SOURCES
# apt keeps no downloaded packages nor package caches in image layers (the official image's
# docker-clean); no translations.
cat >"$dir/root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
echo 'Acquire::Languages "none";' >"$dir/root/etc/apt/apt.conf.d/docker-no-languages"
rm -rf "$dir"/root/var/cache/apt/archives/*.deb "$dir"/root/var/cache/apt/*.bin "$dir"/root/var/lib/apt/lists/*
tar -C "$dir/root" -c . | "${ENGINE[@]}" import --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "debian-base: imported $IMAGE" >&2
