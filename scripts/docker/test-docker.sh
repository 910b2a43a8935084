#!/usr/bin/env bash
# npm run test:docker: builds the image (Dockerfile) and runs the suite in it under the ways users
# run containers, asserting what each must do:
#   a  --device /dev/userfaultfd                                  least privilege: must pass
#   b  --cap-add SYS_PTRACE --security-opt seccomp=unconfined      the syscall path: must pass
#   c  --privileged                        must pass where the runtime allows it; where it cannot
#                                          start (this sandbox: CAP_MAC_OVERRIDE is missing from
#                                          the bounding set), reported, not a failure
#   d  Docker's defaults                   must FAIL FAST (< 60 s) with the library's EPERM
#                                          explanation and hint, not hang or crash
# Starts dockerd when none answers (installing docker.io from Debian if needed), and when
# NODE_IMAGE (default node:20-bookworm) cannot be pulled, builds a local stand-in
# (scripts/docker/standin-image.sh). Behind a TLS-intercepting proxy the CA bundle
# (CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) reaches `npm ci` as a build secret.
#
#   MODES="a b" npm run test:docker      only some modes;  extra args go to vitest
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
cache=${USERFAULTFD_CACHE:-$root/.cache}/docker
logs=$cache/logs
mkdir -p "$logs"
modes=${MODES:-a b c d}
image=${IMAGE:-userfaultfd-test}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
t0=$SECONDS
say() { echo "test:docker: $*"; }

# --- a Docker engine -----------------------------------------------------------------------
scripts/docker/dockerd.sh

# The build needs BuildKit (RUN --mount for the CA secret): a client with buildx, or Debian's
# docker.io client (20.10), which has BuildKit built in.
docker_cli=docker
if ! docker buildx version >/dev/null 2>&1; then
  for c in /usr/bin/docker docker; do
    v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$v" ] && [ "${v%%.*}" -lt 23 ]; then docker_cli=$c; break; fi
  done
fi
export DOCKER_BUILDKIT=1

# --- the base image ------------------------------------------------------------------------
base=${NODE_IMAGE:-node:20-bookworm}
if ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 120 docker pull -q "$base" >"$logs/pull.log" 2>&1; then
  say "cannot pull $base ($(tail -1 "$logs/pull.log")): using a local stand-in"
  base=userfaultfd-standin/node:$(node -p process.versions.node)-bookworm
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    DOCKER=$docker_cli scripts/docker/standin-image.sh "$base"
  fi
fi

# --- build -----------------------------------------------------------------------------------
secret=()
[ -s "$ca" ] && secret=(--secret "id=ca_bundle,src=$ca")
say "building $image FROM $base"
b0=$SECONDS
if ! timeout 900 "$docker_cli" build --network host "${secret[@]}" --build-arg "NODE_IMAGE=$base" \
    -t "$image" . >"$logs/build.log" 2>&1; then
  tail -40 "$logs/build.log"; say "docker build failed (log: $logs/build.log)"; exit 1
fi
say "built in $((SECONDS - b0)) s"

# --- the modes -------------------------------------------------------------------------------
declare -A flags=(
  [a]="--device /dev/userfaultfd"
  [b]="--cap-add SYS_PTRACE --security-opt seccomp=unconfined"
  [c]="--privileged"
  [d]=""
)
declare -A names=([a]="least privilege" [b]="syscall path" [c]="privileged" [d]="Docker defaults")
failed=0
summary=()
for mode in $modes; do
  log=$logs/mode-$mode.log
  say "mode $mode (${names[$mode]}): docker run ${flags[$mode]:-(no flags)}"
  m0=$SECONDS
  set +e
  # shellcheck disable=SC2086
  timeout --kill-after=10s 20m docker run --rm --network host ${flags[$mode]} "$image" \
    scripts/docker/run-suite.sh "$@" >"$log" 2>&1
  rc=$?
  set -e
  took=$((SECONDS - m0))
  tests=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^ +Tests ' | tr -s ' ' | tail -1 || true)
  case $mode in
    a|b)
      if [ $rc -eq 0 ]; then verdict="passed"; else verdict="FAILED (exit $rc)"; failed=1; fi ;;
    c)
      if [ $rc -eq 0 ]; then verdict="passed"
      elif [ $rc -ge 125 ] && [ $rc -le 127 ] && grep -qiE 'operation not permitted|capabilit|oci runtime' "$log"; then
        verdict="NOT RUN: this runtime cannot start privileged containers ($(grep -oiE 'unable to apply caps[^"]*|operation not permitted' "$log" | head -1)); reported, not a failure"
        tests=""
      else verdict="FAILED (exit $rc)"; failed=1; fi ;;
    d)
      # Must fail, fast, with the library's explanation: EPERM and the Docker flags in the hint.
      if [ $rc -eq 0 ]; then verdict="FAILED: succeeded without permissions?"; failed=1
      elif [ $rc -eq 124 ] || [ $took -ge 60 ]; then verdict="FAILED: not fast ($took s, exit $rc)"; failed=1
      elif ! grep -q 'FAIL: userfaultfd is not usable here (EPERM): EPERM: operation not permitted' "$log" \
           || ! grep -q -- "in Docker: '--device /dev/userfaultfd'" "$log"; then
        verdict="FAILED: no EPERM explanation + hint in the output"; failed=1
      else verdict="failed fast as required (exit $rc, EPERM explained, hint names --device /dev/userfaultfd)"; fi ;;
  esac
  [ -n "$tests" ] && verdict="$verdict; $tests"
  # Skipped tests must say why: list them with their reasons.
  skips=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^\s+↓ ' || true)
  summary+=("  $mode ${names[$mode]} (${took} s): $verdict")
  [ -n "$skips" ] && summary+=("$(echo "$skips" | sed 's/^ */      skipped: /')")
  if [[ $verdict == FAILED* ]]; then tail -60 "$log"; fi
done

say "summary (logs in $logs), $((SECONDS - t0)) s in all:"
printf '%s\n' "${summary[@]}"
exit $failed
