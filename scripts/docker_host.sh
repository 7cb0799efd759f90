#!/usr/bin/env bash
# Make this machine a Docker host for tests/test_docker.py (CI's slow stage, `make docker-test`):
# as root, install Debian's docker.io and debootstrap when missing, and start dockerd when no
# engine answers. Containers use host networking only, so dockerd runs without its bridge and
# iptables rules (--bridge=none --iptables=false). Does nothing where an engine already answers;
# exits 0 with a message (and the test then skips, unless FEDSPEECH_REQUIRE_DOCKER=1) where it
# cannot help: not root, or no apt-get.
set -euo pipefail

say() { echo "docker_host: $*" >&2; }

if docker info >/dev/null 2>&1 && command -v debootstrap >/dev/null; then
  say "a Docker engine answers"; exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  say "not root or no apt-get: cannot install or start Docker here"; exit 0
fi
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need[@]}" >/tmp/docker_host-apt.log 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/tmp/docker_host-apt.log 2>&1; } \
    || { tail -n 20 /tmp/docker_host-apt.log >&2; exit 1; }
fi
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (--bridge=none --iptables=false; log /tmp/dockerd.log)"
  nohup dockerd --bridge=none --iptables=false >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -n 20 /tmp/dockerd.log >&2; exit 1; }
fi
say "ready: $(docker version --format 'engine {{.Server.Version}}')"
