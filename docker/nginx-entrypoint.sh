#!/bin/sh
# The container's entry point (docker/Dockerfile): EVENT_PIPER_SOURCE (trigger, the default, or
# wal) becomes nginx.conf's event_piper_source, then the command runs (nginx in the foreground).
set -eu
source=${EVENT_PIPER_SOURCE:-trigger}
case $source in
    trigger|wal) ;;
    *) echo "nginx-entrypoint: EVENT_PIPER_SOURCE is trigger or wal, not '$source'" >&2; exit 1 ;;
esac
sed -i "s/^\([[:space:]]*event_piper_source\) [a-z]*;/\1 $source;/" /etc/nginx/nginx.conf
grep -q "^[[:space:]]*event_piper_source $source;" /etc/nginx/nginx.conf || {
    echo "nginx-entrypoint: could not set event_piper_source in /etc/nginx/nginx.conf" >&2
    exit 1
}
exec "$@"
