#!/usr/bin/env bash
# Installs the Debian packages this project needs, and only those that are missing.
#   scripts/deps.sh          build, run and test
#   scripts/deps.sh bench    the same plus the benchmark tools
#   scripts/deps.sh docker   the same plus podman and what it needs here (make test-docker)
# Checks with dpkg-query first, so an up-to-date machine costs no network access and no root.
set -euo pipefail

BASE_PACKAGES=(
    build-essential g++ make
    nginx nginx-dev
    libpq-dev libgtest-dev
    postgresql-15 postgresql-client-15
    python3 procps iproute2 curl clang-format
    chromium
    python3-pytest python3-psycopg2
)
# Node.js and npm (for the real-client tests): Debian's packages unless the machine already has
# a Node.js with npm (for example from NodeSource, which Debian's npm would conflict with).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    BASE_PACKAGES+=(nodejs npm)
fi
BENCH_PACKAGES=(libnginx-mod-nchan wrk gnuplot-nox linux-perf valgrind)
# make docker-build / test-docker: podman with runc (crun refuses cgroups v1), netavark and
# aardvark-dns (compose services find each other by name), debootstrap (the debian:12 base image
# is built locally). Skipped when a Docker daemon answers.
DOCKER_PACKAGES=(podman runc netavark aardvark-dns iptables podman-compose debootstrap)

wanted=("${BASE_PACKAGES[@]}")
case "${1:-}" in
    "") ;;
    bench) wanted+=("${BENCH_PACKAGES[@]}") ;;
    docker) docker info >/dev/null 2>&1 || wanted+=("${DOCKER_PACKAGES[@]}") ;;
    *) echo "usage: $0 [bench|docker]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "deps: installing ${missing[*]}" >&2
as_root=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        as_root=(sudo)
    else
        echo "deps: missing packages (${missing[*]}); run this script as root" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_get=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)
"${apt_get[@]}" update -q
"${apt_get[@]}" install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
