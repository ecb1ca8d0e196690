# Stand-in for the postgres image where no registry is reachable (the test
# suite's engine, scripts/docker-engine.sh): Debian bookworm's PostgreSQL 15 and
# an entry point that honours POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB
# on an empty data directory, as the official image's does.
FROM local/debian:bookworm
# Unpinned: these stand-ins follow bookworm's point releases, as the images they replace do.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY --chmod=755 postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
# Debian gives the postgres user whatever system uid is free: the name is the stable handle.
# hadolint ignore=DL3066
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
CMD ["postgres"]
