# Stand-in for python:3.11-slim-bookworm where no registry is reachable (the
# test suite's engine, scripts/docker-engine.sh): Debian's own Python 3.11 on
# the debootstrapped local/debian:bookworm. docker/Dockerfile needs `python`,
# its venv module and CA certificates.
FROM local/debian:bookworm
# Unpinned: these stand-ins follow bookworm's point releases, as the images they replace do.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
