#!/bin/bash
# Entry point of tests/docker/postgres.Dockerfile: on an empty data directory, initdb with
# POSTGRES_USER as superuser and POSTGRES_PASSWORD, create POSTGRES_DB, run
# /docker-entrypoint-initdb.d/*.sql on a socket-only server; then run PostgreSQL on all addresses.
# Arguments as the official image takes them: `postgres -c name=value ...` (compose's command),
# given to both servers.
set -euo pipefail
[[ ${1:-} == postgres ]] && shift
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"

if [[ $(id -u) -eq 0 ]]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [[ ! -s $PGDATA/PG_VERSION ]]; then
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' $*" -w start
    psql=(psql -v ON_ERROR_STOP=1 -X -q -U "$POSTGRES_USER")
    if [[ $POSTGRES_DB != postgres ]]; then
        "${psql[@]}" -d postgres -v db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
    fi
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [[ -e $f ]] || continue
        echo "postgres-entrypoint: running $f"
        "${psql[@]}" -d "$POSTGRES_DB" -f "$f"
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "postgres-entrypoint: initialized"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
