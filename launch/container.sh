#!/usr/bin/env bash
# Build the ssl_jax GPU image (launch/Dockerfile) and train in it on this machine's GPUs: one process,
# every visible GPU, the current directory mounted at the same path so relative paths keep working.
#
# usage: launch/container.sh build
#        launch/container.sh train [options] CONFIG [--config.KEY=VALUE ...]
#
#   CONFIG               configs/<method>.py:<preset> (read from the mounted checkout, so local edits count)
#   --config.KEY=VALUE   overrides, passed through to ssl-jax unchanged
# options:
#   --workdir DIR        run directory (default: runs/<method>_<preset>; $WORKDIR also works)
#   --gpus SPEC          docker's --gpus: all (default) or a list such as 0,1
#   --mount DIR          also mount DIR (e.g. a dataset folder) read-only at the same path; repeatable
#   -h, --help           this message
# environment:
#   IMAGE                image name (default ssl-jax:latest)
#   STOP_TIMEOUT         seconds `docker stop` waits after SIGTERM before SIGKILL (default 120; docker's own
#                        default, 10, is too short for a ResNet-50 step plus a checkpoint save)
#   DRY_RUN=1            print the docker command instead of running it
#
# The run is the same as launch/gpu_single_node.sh without the restart loop: `docker stop` sends SIGTERM,
# the trainer saves and exits 0 (docker waits STOP_TIMEOUT seconds for that: --stop-timeout), and the same
# command resumes. The decoded-image cache lives in ~/.cache/ssl_jax on the host; files are written as
# your user.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "container.sh: error: $*" >&2; echo "run with -h for usage" >&2; exit 2; }
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }

IMAGE="${IMAGE:-ssl-jax:latest}"; WORKDIR="${WORKDIR:-}"; STOP_TIMEOUT="${STOP_TIMEOUT:-120}"
GPUS=all; MOUNTS=(); COMMAND=""; CONFIG=""; OVERRIDES=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --workdir|--gpus|--mount) (($# >= 2)) || die "$1 needs a value"; set -- "$1=$2" "${@:3}" ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --gpus=*) GPUS="${1#*=}"; shift ;;
    --mount=*) MOUNTS+=("${1#*=}"); shift ;;
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --config.*) (($# >= 2)) || die "$1 needs a value"; OVERRIDES+=("$1=$2"); shift 2 ;;
    -*) die "unknown option $1 (overrides are --config.KEY=VALUE)" ;;
    *) if [[ -z "$COMMAND" ]]; then COMMAND="$1"; elif [[ -z "$CONFIG" ]]; then CONFIG="$1";
       else die "unexpected argument $1"; fi; shift ;;
  esac
done
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a whole number of seconds (got $STOP_TIMEOUT)"

case "$COMMAND" in
  build) run docker build -f "$REPO_ROOT/launch/Dockerfile" -t "$IMAGE" "$REPO_ROOT" ;;
  train)
    [[ -n "$CONFIG" ]] || die "train needs CONFIG"
    if [[ -z "$WORKDIR" ]]; then
      stem="$(basename "${CONFIG%%:*}" .py)"; preset="${CONFIG#*:}"; [[ "$preset" == "$CONFIG" ]] && preset=default
      WORKDIR="runs/${stem}_${preset}"
    fi
    gpus="$GPUS"; [[ "$GPUS" == all ]] || gpus="\"device=$GPUS\""  # docker's syntax for a list
    cache="${HOME}/.cache/ssl_jax"; [[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$cache"
    args=(docker run --rm --init --stop-timeout "$STOP_TIMEOUT" --gpus "$gpus" --shm-size=16g
          --user "$(id -u):$(id -g)" -e HOME=/tmp -v "$PWD:$PWD" -w "$PWD" -v "$cache:/cache")
    for m in ${MOUNTS[@]+"${MOUNTS[@]}"}; do
      m="$(cd "$m" 2>/dev/null && pwd || echo "$m")"; args+=(-v "$m:$m:ro")
    done
    args+=("$IMAGE" train --config "$CONFIG" --workdir "$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
    # exec: a SIGTERM sent to this script (a supervisor, `timeout`) then reaches docker, which passes it on to
    # the trainer (docker run's --sig-proxy, on by default); bash would die of it and leave the run going
    if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${args[@]}"; else exec "${args[@]}"; fi ;;
  "") usage >&2; die "COMMAND is required (build or train)" ;;
  *) die "unknown command $COMMAND" ;;
esac
