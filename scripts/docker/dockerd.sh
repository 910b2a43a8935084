#!/usr/bin/env bash
# Makes sure a Docker engine answers: installs Debian's docker.io when dockerd is missing, and
# starts `dockerd --iptables=false --bridge=none` in the background when none runs (containers
# then use --network host). Its log: .cache/docker/dockerd.log.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${USERFAULTFD_CACHE:-$root/.cache}/docker
mkdir -p "$cache"
say() { echo "dockerd: $*"; }
docker info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null; then
  say "installing docker.io (Debian)"
  if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q docker.io >"$cache/apt.log" 2>&1; then
    timeout 300 apt-get update -q >>"$cache/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q docker.io >>"$cache/apt.log" 2>&1 \
      || { tail -20 "$cache/apt.log"; say "could not install docker.io"; exit 1; }
  fi
fi
say "starting dockerd --iptables=false --bridge=none"
nohup dockerd --iptables=false --bridge=none >"$cache/dockerd.log" 2>&1 &
for _ in $(seq 120); do docker info >/dev/null 2>&1 && exit 0; sleep 0.5; done
tail -20 "$cache/dockerd.log"
say "dockerd did not start"
exit 1
