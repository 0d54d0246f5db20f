#!/usr/bin/env bash
# Make a Compose command available so `make test` can validate docker-compose*.yml without a
# Docker engine (`config` only parses and merges the files). Either the Compose v2 plugin
# (`docker compose`) or the standalone `docker-compose` will do; when neither is present, install
# Debian's `docker-compose` package. Quiet on success; a clear message and status 1 otherwise.
set -euo pipefail

have_compose() {
    if command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
        return 0
    fi
    command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1
}

fail() {
    echo "ensure_compose: $*" >&2
    echo "ensure_compose: install Docker Compose (the 'docker compose' plugin or the" \
        "'docker-compose' package) and run 'make test' again" >&2
    exit 1
}

have_compose && exit 0

command -v apt-get >/dev/null 2>&1 || fail "no Compose command and no apt-get to install one"

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        fail "no Compose command, and installing the 'docker-compose' package needs root"
    fi
fi

install() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends docker-compose >/dev/null 2>&1
}

echo "ensure_compose: installing Debian's docker-compose package (compose file checks)" >&2
# Try the package lists we have first; refresh them only when that fails (stale or missing).
if ! install; then
    "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed"
    install || fail "apt-get install docker-compose failed"
fi
have_compose || fail "docker-compose was installed but does not run"
