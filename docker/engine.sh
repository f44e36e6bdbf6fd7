# shellcheck shell=bash disable=SC2034  # (ENGINE, COMPOSE, BUILD_ARGS are for the sourcing script)
# Sourced by docker/build.sh, docker/debian-base.sh, `make docker-run` and tests/docker/run.sh:
# picks the container engine.
#   docker          when a Docker daemon answers (`docker info`), with `docker compose`;
#   podman          otherwise (Debian's podman, runc, netavark), with podman-compose.
# CONTAINER_ENGINE=docker|podman forces the choice. For podman, CONTAINERS_CONF defaults to
# docker/containers.conf (runc, no default ulimits: what this machine needs, see README "Docker").
# Defines ENGINE (command array), COMPOSE (command array) and BUILD_ARGS (extra `build` flags).

ENGINE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -z ${CONTAINER_ENGINE:-} ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        CONTAINER_ENGINE=docker
    else
        CONTAINER_ENGINE=podman
    fi
fi

export CONTAINER_ENGINE
case $CONTAINER_ENGINE in
    docker)
        ENGINE=(docker)
        COMPOSE=(docker compose)
        BUILD_ARGS=()
        ;;
    podman)
        "$ENGINE_ROOT/scripts/deps.sh" docker
        export CONTAINERS_CONF=${CONTAINERS_CONF:-$ENGINE_ROOT/docker/containers.conf}
        ENGINE=(podman)
        COMPOSE=(podman-compose)
        # Host network while building: apt-get inside reaches the archive the host reaches
        # (podman's build network needs nothing else to be set up).
        BUILD_ARGS=(--network=host)
        ;;
    *)
        echo "CONTAINER_ENGINE must be docker or podman, not '$CONTAINER_ENGINE'" >&2
        exit 2
        ;;
esac
