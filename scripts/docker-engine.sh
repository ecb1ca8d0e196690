#!/usr/bin/env bash
# Prepares a Docker engine for the end-to-end test (tests/test_docker_stack.py) on
# a machine without systemd and without any image registry:
#   1. installs docker.io and debootstrap (Debian packages) if missing;
#   2. starts dockerd with no bridge and no iptables rules if none answers, and
#      waits for it (host networking only: nothing but loopback is ever used);
#   3. builds the local base images if missing, from Debian's mirror:
#        local/debian:bookworm          debootstrap --variant=minbase, docker import
#        local/python:3.11-bookworm     Debian's python3 (3.11) + venv, for docker/Dockerfile
#        local/postgres:15-bookworm     Debian's PostgreSQL 15, with the POSTGRES_* entry point
#   4. says what it did, one line per step.
# Idempotent: a second run finds everything and takes a second.
#
#   bash scripts/docker-engine.sh          prepare (leaves a daemon it started running)
#   bash scripts/docker-engine.sh stop     stop the daemon this script started (by its PID)
#
# Needs root (apt-get, dockerd, debootstrap). The daemon's PID and log are in
# $SVDSWEEP_DOCKERD_DIR (default /var/lib/svdsweep-dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."

state=${SVDSWEEP_DOCKERD_DIR:-/var/lib/svdsweep-dockerd}
pidfile=$state/dockerd.pid
# Debian's client (20.10): the docker 28 client some machines have on PATH lacks buildx.
docker=/usr/bin/docker
mirror=${SVDSWEEP_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "docker-engine: $*"; }
fail() { echo "docker-engine: FAIL: $*" >&2; exit 1; }

stop_daemon() {
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    local pid
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$pidfile"
    say "stopped dockerd (pid $pid), which this script had started"
  else
    say "no dockerd started by this script is running; nothing stopped"
  fi
}

if [ "${1:-}" = stop ]; then stop_daemon; exit 0; fi
[ "$(id -u)" = 0 ] || fail "needs root (apt-get, dockerd, debootstrap)"
mkdir -p "$state"

# 1. Packages.
missing=()
[ -x /usr/sbin/dockerd ] && [ -x "$docker" ] || missing+=(docker.io)
[ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  # Where an init script could start the packaged daemon (with its default bridge
  # and iptables rules), forbid service starts during the installation.
  forbid_starts=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    forbid_starts=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$forbid_starts"
    chmod +x "$forbid_starts"
  fi
  installed=0
  apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null \
    && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
      --no-install-recommends "${missing[@]}" >/dev/null || installed=$?
  [ -z "$forbid_starts" ] || rm -f "$forbid_starts"
  [ "$installed" = 0 ] || fail "apt-get install ${missing[*]} failed"
else
  say "packages: docker.io and debootstrap already installed"
fi

# 2. The daemon.
if "$docker" info >/dev/null 2>&1; then
  say "dockerd: already running ($("$docker" version --format '{{.Server.Version}}'))"
else
  # No bridge, no NAT rules: containers use the host's network (and only its
  # loopback addresses, in the tests). overlay2 fails loudly where the kernel lacks it.
  setsid /usr/sbin/dockerd --bridge=none --iptables=false --ip6tables=false \
    --storage-driver=overlay2 >"$state/dockerd.log" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 60); do
    "$docker" info >/dev/null 2>&1 && break
    kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    sleep 1
  done
  if ! "$docker" info >/dev/null 2>&1; then
    fail "dockerd did not start; last lines of $state/dockerd.log:
$(tail -n 15 "$state/dockerd.log")"
  fi
  say "dockerd: started (pid $(cat "$pidfile"), log $state/dockerd.log)"
fi

# 3. Base images.
have_image() { "$docker" image inspect "$1" >/dev/null 2>&1; }
if have_image local/debian:bookworm; then
  say "image local/debian:bookworm: present"
else
  root=$(mktemp -d)
  say "image local/debian:bookworm: debootstrap from $mirror (about a minute)"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$state/debootstrap.log" 2>&1 \
    || fail "debootstrap failed; see $state/debootstrap.log"
  # Apt inside images: the same mirror, no recommends, no caches left in layers.
  echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
  printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/90svdsweep"
  rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  tar -C "$root" -c . | "$docker" import - local/debian:bookworm >/dev/null
  rm -rf "$root"
fi
build_base() {  # IMAGE DOCKERFILE
  if have_image "$1"; then
    say "image $1: present"
  else
    say "image $1: building from $2"
    DOCKER_BUILDKIT=1 "$docker" build --network host -q -t "$1" -f "$2" docker/base >/dev/null
  fi
}
build_base local/python:3.11-bookworm docker/base/python.Dockerfile
build_base local/postgres:15-bookworm docker/base/postgres.Dockerfile
say "ready: $("$docker" version --format 'Docker {{.Server.Version}}') ($("$docker" info --format '{{.Driver}}, cgroup v{{.CgroupVersion}}'))"
