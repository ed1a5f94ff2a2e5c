#!/usr/bin/env bash
# One GPU machine, N GPUs: a single `ssl-jax train` process sees every visible GPU (one mesh, no
# jax.distributed needed). With --preemptible the same command is started again after the trainer was
# stopped by SIGTERM (it saves a checkpoint and exits 0) or crashed; every start resumes from the newest
# checkpoint in the workdir.
#
# usage: launch/gpu_single_node.sh [options] CONFIG [--config.KEY=VALUE ...]
#
#   CONFIG               configs/<method>.py:<preset>, e.g. configs/simclr.py:cifar10
#   --config.KEY=VALUE   overrides, passed through to ssl-jax unchanged
# options:
#   --workdir DIR        run directory (default: runs/<method>_<preset>; $WORKDIR also works)
#   --gpus LIST          CUDA_VISIBLE_DEVICES for the run, e.g. 0,1,2,3 (default: every GPU)
#   --preemptible        restart after a SIGTERM stop or a crash (at most $MAX_RESTARTS times, default 20,
#                        $RESTART_DELAY seconds apart, default 10); exit status 2 (bad config or data,
#                        non-finite loss) is never retried
#   -h, --help           this message
# environment:
#   DRY_RUN=1            print the commands instead of running them
#   SSL_JAX              the ssl-jax executable (default: ssl-jax on PATH); one that cannot be run (exit
#                        126 or 127: not found, or a venv whose Python is gone) stops the loop at once
#
# example: launch/gpu_single_node.sh --gpus 0,1 --preemptible configs/simclr.py:cifar10 \
#              --config.data.path=../shared/data/cifar10-jpeg.tar.gz
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_single_node.sh: error: $*" >&2; echo "run with -h for usage" >&2; exit 2; }
# Prints the command shell-quoted (DRY_RUN=1) or runs it.
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }

WORKDIR="${WORKDIR:-}"; GPUS=""; PREEMPTIBLE=0; CONFIG=""; OVERRIDES=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --workdir) (($# >= 2)) || die "--workdir needs a value"; WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --gpus) (($# >= 2)) || die "--gpus needs a value"; GPUS="$2"; shift 2 ;;
    --gpus=*) GPUS="${1#*=}"; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --config.*) (($# >= 2)) || die "$1 needs a value"; OVERRIDES+=("$1=$2"); shift 2 ;;
    -*) die "unknown option $1 (overrides are --config.KEY=VALUE)" ;;
    *) [[ -z "$CONFIG" ]] || die "one CONFIG only (got $CONFIG and $1)"; CONFIG="$1"; shift ;;
  esac
done
[[ -n "$CONFIG" ]] || { usage >&2; die "CONFIG is required"; }
if [[ -z "$WORKDIR" ]]; then  # configs/simclr.py:cifar10 -> runs/simclr_cifar10
  stem="$(basename "${CONFIG%%:*}" .py)"; preset="${CONFIG#*:}"; [[ "$preset" == "$CONFIG" ]] && preset=default
  WORKDIR="runs/${stem}_${preset}"
fi
SSL_JAX="${SSL_JAX:-ssl-jax}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"; RESTART_DELAY="${RESTART_DELAY:-10}"
[[ -n "$GPUS" ]] && export CUDA_VISIBLE_DEVICES="$GPUS"
CMD=("$SSL_JAX" train --config "$CONFIG" --workdir "$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})

if [[ "$PREEMPTIBLE" == 0 ]]; then
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    [[ -n "$GPUS" ]] && echo "+ export CUDA_VISIBLE_DEVICES=$GPUS"
    run "${CMD[@]}"; exit 0
  fi
  if ! command -v "$SSL_JAX" >/dev/null; then
    echo "gpu_single_node.sh: $SSL_JAX not found: activate the venv or set SSL_JAX" >&2; exit 127
  fi
  exec "${CMD[@]}"  # the trainer itself receives SIGTERM and saves
fi

# --preemptible. The trainer exits 0 both when it finishes and when SIGTERM made it save and stop, so the
# loop reads the trainer's stderr for its "stop requested" line to tell the two apart.
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  [[ -n "$GPUS" ]] && echo "+ export CUDA_VISIBLE_DEVICES=$GPUS"
  echo "# restart loop: up to $MAX_RESTARTS restarts, ${RESTART_DELAY}s apart, after a SIGTERM stop or a crash"
  run "${CMD[@]}"
  exit 0
fi
mkdir -p "$WORKDIR"
LOG="$WORKDIR/launch_stderr.log"
child=0; stopping=0
# A SIGTERM/SIGINT sent to this script (docker stop, the VM shutting down) is passed to the trainer, which
# saves; then the loop ends instead of restarting: whoever stopped us will start us again.
# One that comes between two trainers (the restart delay) ends the loop too, with 128 + its number.
on_signal() { stopping="$1"; ((child)) && kill -TERM "$child" 2>/dev/null || true; }
trap 'on_signal 15' TERM; trap 'on_signal 2' INT
restarts=0
while :; do
  if ((stopping)); then
    echo "gpu_single_node.sh: stopped by a signal before restart $restarts; not restarting" >&2
    exit "$((128 + stopping))"
  fi
  mark=$( { wc -c < "$LOG"; } 2>/dev/null || echo 0)
  # tee ignores SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and a tee killed by it would leave
  # the trainer writing its "saving" lines into a closed pipe (it then dies before saving)
  "${CMD[@]}" 2> >(trap '' INT TERM; exec tee -a "$LOG" >&2) &
  child=$!
  rc=0; wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done  # wait again after a trap
  child=0
  if ((rc == 126 || rc == 127)); then  # the shell could not run it: retrying would fail the same way
    echo "gpu_single_node.sh: $SSL_JAX could not be run (exit $rc: not found or not executable): activate the" \
         "venv or set SSL_JAX (not retried)" >&2
    exit "$rc"
  fi
  if ((stopping)); then
    echo "gpu_single_node.sh: stopped by a signal (trainer exit $rc); not restarting" >&2
    # Ctrl-C: 130, as the trainer run by hand exits (the SIGTERM passed on here may have made it exit 0)
    ((stopping == 2 && rc == 0)) && exit 130
    exit "$rc"
  fi
  # grep -c, not -q: -q stops reading at the match, and a tail still writing then dies of SIGPIPE, which
  # pipefail makes the pipeline's status (a long stderr after the line read as "not stopped")
  stopped_by_signal() { tail -c +"$((mark + 1))" "$LOG" | grep -c "stop requested (" > /dev/null; }
  # tee may still be writing the last lines: look twice before calling the run finished
  if ((rc == 0)) && ! stopped_by_signal && ! { sleep 1; stopped_by_signal; }; then exit 0; fi  # finished
  if ((rc == 2)); then echo "gpu_single_node.sh: trainer failed with exit 2 (not retried)" >&2; exit 2; fi
  if ((restarts >= MAX_RESTARTS)); then
    echo "gpu_single_node.sh: giving up after $restarts restarts" >&2; exit "$((rc ? rc : 1))"
  fi
  restarts=$((restarts + 1))
  echo "gpu_single_node.sh: trainer stopped (exit $rc); restart $restarts/$MAX_RESTARTS in ${RESTART_DELAY}s" >&2
  sleep "$RESTART_DELAY" & sleeper=$!
  wait "$sleeper" || kill "$sleeper" 2>/dev/null || true  # a trapped signal ends the wait at once
done
