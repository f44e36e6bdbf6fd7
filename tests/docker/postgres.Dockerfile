# make test-docker: a stand-in for the official postgres:15 image, from debian:12 and Debian's
# postgresql-15, for machines that reach Debian's archive but no image registry.
# Same interface as far as docker/compose.yaml uses it: POSTGRES_DB, POSTGRES_USER,
# POSTGRES_PASSWORD, *.sql in /docker-entrypoint-initdb.d run once on an empty data directory,
# data in /var/lib/postgresql/data, `psql -U <user>` over the socket inside the container.
FROM debian:12
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY tests/docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# SIGINT: PostgreSQL's fast shutdown (as the official image).
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint.sh"]
