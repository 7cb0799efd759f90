#!/usr/bin/env bash
# Build fedspeech's images from docker/Dockerfile: superlink, mlflow, supernode, serverapp, cli,
# tagged fedspeech/<target>:<version> (the names docker/compose.yaml uses).
#
# Usage: bash docker/build.sh [--base IMAGE] [TARGET...]
#
# The base image (the Dockerfile's BASE_IMAGE), in this order:
#   --base IMAGE, or $FEDSPEECH_DOCKER_BASE;
#   python:3.11-slim, when present or when it can be pulled;
#   local/fedspeech-base:bookworm: Debian bookworm (Python 3.11) from Debian's packages, made
#   here with debootstrap when absent (needs root and `apt-get install debootstrap`; the mirror
#   is the first one in /etc/apt, or $DEBIAN_MIRROR).
# docker/local/ gets the build host's extra CA bundle and CPU torch wheel (see its README).
# Builds use host networking: pip and apt reach their indexes the way the host does.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.1.0
LOCAL_BASE=local/fedspeech-base:bookworm
base=${FEDSPEECH_DOCKER_BASE:-}
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(superlink mlflow supernode serverapp cli)

log() { echo "docker/build.sh: $*" >&2; }

debian_mirror() {
  local uri
  uri=$(grep -h -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -h -m1 -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' || true)
  echo "${DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

build_local_base() {
  command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  local root
  root=$(mktemp -d)
  log "building $LOCAL_BASE with debootstrap from $(debian_mirror) (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libsndfile1 \
    bookworm "$root" "$(debian_mirror)" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; rm -rf "$root"; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
  rm -rf "$root" "$root.log"
}

if [ -z "$base" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 \
     || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    log "python:3.11-slim cannot be pulled: using $LOCAL_BASE"
    base=$LOCAL_BASE
    docker image inspect "$base" >/dev/null 2>&1 || build_local_base
  fi
fi

# Build-host additions: the CA bundle pip trusts here, and a CPU torch wheel pip may take here.
pip_setting() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
ca=${FEDSPEECH_DOCKER_CA:-${PIP_CERT:-$(pip_setting cert)}}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  cp "$ca" docker/local/build-host-ca.crt
fi
wheels=${FEDSPEECH_DOCKER_WHEELS:-${PIP_FIND_LINKS:-$(pip_setting find-links)}}
for wheel in "${wheels:-/nonexistent}"/torch-2.13.0*-cp311-*linux*x86_64.whl; do
  [ -f "$wheel" ] && [ ! -f "docker/local/$(basename "$wheel")" ] && cp "$wheel" docker/local/
done

for target in "${targets[@]}"; do
  log "building fedspeech/$target:$VERSION on $base"
  docker build --network host --build-arg "BASE_IMAGE=$base" -f docker/Dockerfile \
    --target "$target" -t "fedspeech/$target:$VERSION" .
done
log "built: ${targets[*]} (base $base)"
