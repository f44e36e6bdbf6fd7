#!/usr/bin/env bash
# Installs the Debian packages this project needs, and only those that are missing.
#   scripts/deps.sh            build and run (make build, make run, make psql)
#   scripts/deps.sh package    the same plus the Debian packaging tools (make deb)
#   scripts/deps.sh test       the same plus what the tests need (make test, make unit, ...)
#   scripts/deps.sh bench      the test set plus the benchmark tools
#   scripts/deps.sh docker     build and run plus podman and what it needs here (make test-docker)
# Checks with dpkg-query first, so an up-to-date machine costs no network access and no root.
set -euo pipefail

# nginx-dev: Debian's nginx sources (scripts/build.sh builds against them) and dh_nginx.
RUN_PACKAGES=(
    build-essential g++ make
    nginx nginx-dev
    libpq-dev libcjson-dev
    postgresql-15 postgresql-client-15
    procps iproute2 curl
)
# `make deb` (debian/): debhelper with nginx-dev's nginx sequence; lintian checks the result.
PACKAGE_PACKAGES=(debhelper dpkg-dev lintian)
# openjdk-17-jdk-headless: javac and java for the Java example client's test; prometheus:
# promtool, which checks and tests the alerting rules (prometheus/). libpcre2-dev: make
# test-nginx-versions builds nginx from source, with the rewrite module (`set`, `if`, `return`),
# which needs PCRE; gzip and SSL are configured out (no zlib, no OpenSSL).
TEST_PACKAGES=(
    libgtest-dev clang-format
    python3 python3-pytest python3-psycopg2 python3-hypothesis
    chromium
    openjdk-17-jdk-headless prometheus libpcre2-dev
)
# Node.js and npm (for the real-client tests): Debian's packages unless the machine already has
# a Node.js with npm (for example from NodeSource, which Debian's npm would conflict with).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    TEST_PACKAGES+=(nodejs npm)
fi
BENCH_PACKAGES=(libnginx-mod-nchan wrk gnuplot-nox linux-perf valgrind)
# make docker-build / test-docker: podman with runc (crun refuses cgroups v1), netavark and
# aardvark-dns (compose services find each other by name), debootstrap (the debian:12 base image
# is built locally). Skipped when a Docker daemon answers. tests/docker/run.sh also runs python3.
DOCKER_PACKAGES=(podman runc netavark aardvark-dns iptables podman-compose debootstrap)

wanted=("${RUN_PACKAGES[@]}")
case "${1:-}" in
    "") ;;
    package) wanted+=("${PACKAGE_PACKAGES[@]}") ;;
    test) wanted+=("${PACKAGE_PACKAGES[@]}" "${TEST_PACKAGES[@]}") ;;
    bench) wanted+=("${PACKAGE_PACKAGES[@]}" "${TEST_PACKAGES[@]}" "${BENCH_PACKAGES[@]}") ;;
    docker)
        wanted+=(python3)
        docker info >/dev/null 2>&1 || wanted+=("${DOCKER_PACKAGES[@]}")
        ;;
    *) echo "usage: $0 [package|test|bench|docker]" >&2; exit 2 ;;
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
