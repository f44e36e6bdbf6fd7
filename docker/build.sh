#!/usr/bin/env bash
# `make docker-build`: builds the image ngx_event_piper from docker/Dockerfile with docker or
# podman (docker/engine.sh picks), after making sure the base image debian:12 is there.
#   docker/build.sh [-f DOCKERFILE -t TAG]   (defaults: docker/Dockerfile, ngx_event_piper)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=docker/engine.sh
source "$ROOT/docker/engine.sh"

file=docker/Dockerfile
tag=ngx_event_piper
while getopts f:t: opt; do
    case $opt in
        f) file=$OPTARG ;;
        t) tag=$OPTARG ;;
        *) exit 2 ;;
    esac
done

"$ROOT/docker/debian-base.sh"
cd "$ROOT"
echo "docker-build: ${ENGINE[*]} build -f $file -t $tag ." >&2
"${ENGINE[@]}" build "${BUILD_ARGS[@]}" -f "$file" -t "$tag" .
"${ENGINE[@]}" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "(^|/)$tag:" >&2 || true
